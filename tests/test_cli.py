"""The command line against the real services: expected failures are one line and a named exit code,
every command checks the schema it needs, and the first hour's surprises are gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from outbox_relay import cli as cli_module
from outbox_relay import enqueue, schema
from outbox_relay.db.connection import cancelled_after, connect, conninfo, translated
from outbox_relay.db.names import NOTIFY_TRIGGER, VERSION_TABLE, lane_index_name
from outbox_relay.errors import StatementCancelled
from outbox_relay.migrate import script_location
from outbox_relay.models import SCHEMA
from outbox_relay.models.names import SETTINGS_TABLE
from tests.pgtools import EVENTS, INSTANCES, LANES, SENT, SETTINGS, UNSENT, set_state_sql, url_for
from tests.relaytools import ROOT, Relays, stopped, wait_until

# Every command that reads or writes the outbox, with what it needs beyond --database-url.
COMMANDS = [["status"], ["status", "--json"], ["failed", "list"], ["failed", "retry", "--all"],
            ["failed", "discard", "--all"], ["lanes", "show"], ["lanes", "set", "2"], ["verify"],
            ["replay", "--all"], ["run"]]


def cli(database_url: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox_relay", *args, "--database-url", database_url],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **env})


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """An expected failure says one line on stderr, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_on_an_unmigrated_database_says_run_migrate(empty_database_url: str,
                                                                  command: list[str]) -> None:
    result = cli(empty_database_url, *command)
    assert result.returncode == cli_module.EXIT_SCHEMA == 5
    line = one_line(result)
    assert "no outbox" in line and "run `outbox-relay migrate`" in line


def test_a_schema_behind_this_relay_is_named_with_the_fix(engine: Engine, database_url: str) -> None:
    # Managed by `outbox-relay migrate`, behind.
    downgraded = cli(database_url, "migrate", "--downgrade", "--revision", "0006_outbox_identity")
    assert downgraded.returncode == 0, downgraded.stderr
    line = one_line(cli(database_url, "status"))
    # Behind by 0007, 0008 (the claim indexes), 0009 (the unsent table), 0010, 0011 (the idle lanes) and
    # 0012 (the lanes' Kafka names).
    assert ("behind this relay (table outbox.events_unsent, table outbox.events_sent, column"
            " events_lanes.transactional_id, column events_lanes.progress_topic, column"
            " events_instances.backend_pid, table outbox.events_idle_lanes, trigger events_enqueue, ready lane"
            " index, unsent ready lane index)" in line and "run `outbox-relay migrate`" in line)
    assert ("outbox_relay.models.migration.add_claim_indexes_v8(), add_idle_lanes_v11(), add_instance_sessions_v7(),"
            " add_lane_kafka_names_v12(), add_unsent_table_v9()" in line)
    assert cli(database_url, "migrate").returncode == 0
    assert cli(database_url, "status").returncode == 0

    # Owned by the application's own Alembic history (no outbox version table), missing v3 and v5.
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {SCHEMA}.{VERSION_TABLE}"))
        conn.execute(text(f"DROP TRIGGER {NOTIFY_TRIGGER} ON {EVENTS}"))
        conn.execute(text(f"DROP INDEX {SCHEMA}.{lane_index_name(1)}"))  # the ready lane index (v8)
    result = cli(database_url, "failed", "list")
    assert result.returncode == 5
    line = one_line(result)
    assert "trigger events_notify" in line and "lane index" in line
    assert "add_commit_notify_v3(), add_lane_index_v5()" in line


def test_a_revision_behind_with_the_same_structure_is_named(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {SCHEMA}.{VERSION_TABLE} SET version_num = '0006_outbox_identity'"))
    result = cli(database_url, "lanes", "show")
    assert result.returncode == 5
    assert f"revision 0006_outbox_identity, this relay needs {schema.HEAD_REVISION}" in one_line(result)


def test_a_revision_newer_than_this_relay_says_upgrade_the_relay_not_migrate(engine: Engine, database_url: str) -> None:
    """A relay of this release, restarted after a later release migrated the database: `migrate` cannot help
    (Alembic would not find the revision); the relay must be upgraded."""
    later = f"{int(schema.HEAD_REVISION.partition('_')[0]) + 1:04d}_from_a_later_release"
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {SCHEMA}.{VERSION_TABLE} SET version_num = '{later}'"))
    result = cli(database_url, "status")
    assert result.returncode == 5
    line = one_line(result)
    assert "behind" not in line and "run `outbox-relay migrate`" not in line, line
    assert (f"the outbox schema is newer than this relay (revision {later}, this relay knows up to"
            f" {schema.HEAD_REVISION}): upgrade outbox-relay") in line, line


def test_a_lane_count_that_is_not_a_number_names_its_variable(empty_database_url: str) -> None:
    result = cli(empty_database_url, "migrate", OUTBOX_LANES="four")
    assert result.returncode == 2
    assert one_line(result) == "outbox-relay: error: OUTBOX_LANES='four' is not a whole number (the lane count)"


def test_run_on_an_unmigrated_database_stops_with_one_line(empty_database_url: str) -> None:
    result = cli(empty_database_url, "run", timeout=30)
    assert result.returncode == 5
    assert "run `outbox-relay migrate`" in one_line(result)


def test_unreachable_or_misnamed_databases_are_one_line(database_url: str) -> None:
    misnamed = url_for("no_such_database_here")
    result = cli(misnamed, "status")
    assert result.returncode == cli_module.EXIT_UNAVAILABLE == 4
    assert 'database "no_such_database_here" does not exist' in one_line(result)
    refused = database_url.replace(f":{os.environ['OUTBOX_SERVICES_PG_PORT']}/", ":1/") if \
        "OUTBOX_SERVICES_PG_PORT" in os.environ else "postgresql+psycopg://outbox@127.0.0.1:1/outbox"
    for command in (["status"], ["failed", "list"], ["migrate"], ["lanes", "show"]):
        result = cli(refused, *command)
        assert result.returncode == 4, result.stderr
        assert "Connection refused" in one_line(result)
    # A wrong name or a setting libpq rejects is not waited for, even by the daemon.
    result = cli(misnamed, "run", timeout=30)
    assert result.returncode == 4 and "does not exist" in one_line(result)
    # The daemon names a variable that nothing reads first: here, OUTBOX_BATCH_SIZE misspelt.
    result = cli(misnamed, "run", timeout=30, OUTBOX_BATCHSIZE="10")
    assert result.returncode == 4 and result.stderr.count("\n") == 2, result.stderr
    assert "OUTBOX_BATCHSIZE is not a setting and is ignored: did you mean OUTBOX_BATCH_SIZE?" in result.stderr
    result = cli(f"{database_url}?sslmode=bogus", "run", timeout=30)
    assert result.returncode == 4 and 'invalid sslmode value: "bogus"' in one_line(result)


def test_unreachable_kafka_is_one_line(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        enqueue(conn, "orders", b"x")
    result = cli(database_url, "verify", "--bootstrap-servers", "127.0.0.1:1", "--kafka-timeout", "2")
    assert result.returncode == 4
    assert "Kafka" in one_line(result)
    # lanes set narrates its steps at INFO; the failure is its last line, librdkafka's own lines are not shown.
    result = cli(database_url, "lanes", "set", "2", "--bootstrap-servers", "127.0.0.1:1", OUTBOX_KAFKA_TIMEOUT="2")
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "rdkafka" not in result.stderr and "init_transactions failed" in result.stderr.strip().splitlines()[-1]


def test_lanes_set_rebuilds_a_lane_index_an_interrupted_change_left_invalid(engine: Engine, database_url: str) -> None:
    """`lanes set 8` stopped while building its index (^C, a lost connection) leaves it INVALID: claims cannot
    use it, writers maintain it, and CREATE INDEX IF NOT EXISTS kept it for the next `lanes set 8`."""
    name = lane_index_name(8)
    with engine.begin() as conn:
        enqueue(conn, "orders", b"x", key="same")
        enqueue(conn, "orders", b"y", key="same")
    # A build that fails half-way leaves its index INVALID, as a stopped one does.
    with psycopg.connect(conninfo(database_url), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON {UNSENT} (lane_key)'.encode())
    result = cli(database_url, "lanes", "set", "8")
    assert result.returncode == 0, result.stderr
    assert "rebuilt the lane index for 8 lanes" in result.stderr
    with psycopg.connect(conninfo(database_url)) as conn:
        assert conn.execute("SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
                            " WHERE i.indexrelid = to_regclass(%s)", (f'"{SCHEMA}"."{name}"',)).fetchone() == (
            True, f"CREATE INDEX {name} ON {UNSENT} USING btree (((lane_key % 8)), id)"
                  " WHERE ((state = 'pending'::text) AND (due_at IS NULL))")


def test_a_second_lanes_set_never_switches_to_the_index_a_first_one_was_building(engine: Engine,
                                                                                   database_url: str) -> None:
    """Two `lanes set 8` at once, the first stopped while building the index (^C, a lost connection). The
    second saw the build under way (not a leftover to drop), then its CREATE INDEX IF NOT EXISTS waited for
    it and kept what it left: 8 lanes went live on an INVALID index (claims cannot use it, nothing rebuilds
    it). The first now builds under the resize lock: the second is refused at once, and the next one
    rebuilds the leftover."""
    name = lane_index_name(8)
    building = ("SELECT p.pid FROM pg_stat_progress_create_index p JOIN pg_class c ON c.oid = p.index_relid"
                " WHERE c.relname = %s AND p.datname = current_database()")
    count_is_8 = f"SELECT lane_count = 8 FROM {SCHEMA}.{SETTINGS_TABLE}".encode()
    command = [sys.executable, "-m", "outbox_relay", "lanes", "set", "8", "--database-url", database_url]
    started: list[subprocess.Popen[str]] = []
    try:
        with psycopg.connect(conninfo(database_url)) as writer, \
                psycopg.connect(conninfo(database_url), autocommit=True) as probe:
            writer.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('orders')".encode())  # the build waits for it
            started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            builder = wait_until(lambda: probe.execute(building, (name,)).fetchone(), 60, "the first build")[0]
            started.append(second := subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                      text=True))
            wait_until(lambda: second.poll() is not None or probe.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'outbox-relay lanes' AND pid <> %s"
                " AND wait_event_type = 'Lock'", (builder,)).fetchone(), 60, "the second to end or wait")
            probe.execute("SELECT pg_terminate_backend(%s)", (builder,))  # the first stops mid-build
            wait_until(lambda: second.poll() is not None or probe.execute(count_is_8).fetchone() == (True,),
                       120, "the second lanes set to end or switch")
            valid = probe.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                                  (f'"{SCHEMA}"."{name}"',)).fetchone()
            assert probe.execute(count_is_8).fetchone() == (False,) or valid == (True,), \
                "8 lanes went live on an INVALID index"
            writer.commit()
            _, err = second.communicate(timeout=120)
            assert second.returncode == 1 and "another lane-count change is under way" in err, err
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(30)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
    result = cli(database_url, "lanes", "set", "8")
    assert result.returncode == 0 and "rebuilt the lane index for 8 lanes" in result.stderr, result.stderr
    with psycopg.connect(conninfo(database_url)) as conn:
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                            (f'"{SCHEMA}"."{name}"',)).fetchone() == (True,)


def test_lanes_set_ends_a_lanes_set_that_hangs_holding_the_lock_before_its_announce(database_url: str) -> None:
    """A `lanes set` stopped after it took the resize lock, before its announce: relays carry on (nothing is
    announced), so none ends it, and every later `lanes set` was refused for as long as it hung. The next one
    ends a holder that has shown no sign of life for OUTBOX_INSTANCE_TIMEOUT and goes on."""
    hung = subprocess.Popen([sys.executable, "-m", "outbox_relay", "lanes", "set", "8", "--database-url", database_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OUTBOX_FAULT_INJECTION": "resize_locked:1:stop"})
    try:
        wait_until(lambda: stopped(hung.pid), 60, "the first lanes set to hang holding the lock")
        result = cli(database_url, "lanes", "set", "4", OUTBOX_INSTANCE_TIMEOUT="1")
        assert result.returncode == 0 and "lane count changed from 1 to 4" in result.stdout, result.stderr
        assert "showed no sign of life for 1s" in result.stderr, result.stderr
        hung.send_signal(signal.SIGCONT)
        _, err = hung.communicate(timeout=60)
        assert hung.returncode != 0 and "Traceback" not in err and err.strip(), err
    finally:
        if hung.poll() is None:
            hung.kill()
            hung.communicate(timeout=30)
    with psycopg.connect(conninfo(database_url)) as conn:
        assert conn.execute(f"SELECT lane_count, resize_to FROM {SCHEMA}.{SETTINGS_TABLE}".encode()).fetchone() == (
            4, None)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["lanes", "show"]])
def test_status_answers_within_its_timeout_while_a_lock_blocks_the_outbox(engine: Engine, database_url: str,
                                                                          command: list[str]) -> None:
    """A status check in a pager script must answer, if only to say it cannot (a migration holding the
    events table, a wedged server); without a bound it waited for as long as the lock was held."""
    with engine.begin() as conn:
        enqueue(conn, "orders", b"x")
    with psycopg.connect(conninfo(database_url)) as blocker:
        blocker.execute(f"LOCK TABLE {EVENTS}, {UNSENT} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = cli(database_url, *command, "--timeout", "2", timeout=45)
        took = time.monotonic() - started
    assert result.returncode == cli_module.EXIT_UNAVAILABLE
    assert one_line(result) == "outbox-relay: PostgreSQL did not answer within 2s (--timeout)"
    assert took < 30
    assert cli(database_url, *command, "--timeout", "2").returncode == 0  # the lock gone, it answers


def test_status_timeout_bounds_the_whole_check_not_each_statement(engine: Engine, database_url: str) -> None:
    """A status check runs about eight statements. A server slow on each one (here: a lock taken again and
    again for 1 s, less than --timeout) made `status --timeout 2.5` answer after 8 s, with exit 0: a pager
    script waited up to eight timeouts. Now the check as a whole gives up after --timeout."""
    with engine.begin() as conn:
        enqueue(conn, "orders", b"x")
    stop = threading.Event()

    def take_the_tables_again_and_again() -> None:
        with psycopg.connect(conninfo(database_url), autocommit=True) as blocker:
            while not stop.is_set():
                with blocker.transaction():
                    blocker.execute(f"LOCK TABLE {SETTINGS}, {EVENTS}, {UNSENT}, {SENT}, {LANES}, {INSTANCES}"
                                    " IN ACCESS EXCLUSIVE MODE")
                    time.sleep(1.0)

    blocker = threading.Thread(target=take_the_tables_again_and_again)
    blocker.start()
    try:
        result = cli(database_url, "status", "--timeout", "2.5", timeout=60)
    finally:
        stop.set()
        blocker.join()
    assert result.returncode == cli_module.EXIT_UNAVAILABLE, result.stdout + result.stderr
    assert one_line(result) == "outbox-relay: PostgreSQL did not answer within 2.5s (--timeout)"


def test_the_whole_check_cancel_leaves_the_connection_usable_and_spares_a_fast_check(database_url: str) -> None:
    """What `status --watch` relies on: a check cut off at its deadline leaves the connection ready for the
    next one, and a check that ends in time is never cancelled afterwards."""
    with connect(database_url) as conn:
        with pytest.raises(StatementCancelled), cancelled_after(conn, 0.2):
            conn.execute("SELECT 1").fetchone()
            with translated():
                conn.execute("SELECT pg_sleep(30)")
        with cancelled_after(conn, 0.2):
            assert conn.execute("SELECT 2").fetchone() == (2,)
        time.sleep(0.4)  # past the deadline of the block that ended
        assert conn.execute("SELECT 3, pg_sleep(0.3)").fetchone() == (3, "")


def test_a_timeout_below_a_millisecond_still_bounds_the_wait(engine: Engine, database_url: str) -> None:
    """PostgreSQL counts its timeouts in whole milliseconds, and 0 means no timeout at all: rounded down,
    `--timeout 0.0004` waited for as long as the lock was held."""
    with psycopg.connect(conninfo(database_url)) as blocker:
        blocker.execute(f"LOCK TABLE {EVENTS}, {UNSENT} IN ACCESS EXCLUSIVE MODE")
        result = cli(database_url, "status", "--timeout", "0.0004", timeout=45)
    assert result.returncode == cli_module.EXIT_UNAVAILABLE, result.stderr
    assert one_line(result) == "outbox-relay: PostgreSQL did not answer within 0.0004s (--timeout)"


def test_a_watch_says_postgresql_did_not_answer_and_watches_on(database_url: str, tmp_path: Path) -> None:
    """`status --watch` is someone watching, often while a migration holds a lock: the watch says it got no
    answer and looks again, instead of ending at the first lock held longer than --timeout."""
    out, err = tmp_path / "out", tmp_path / "err"
    with psycopg.connect(conninfo(database_url)) as blocker, open(out, "w") as stdout, open(err, "w") as stderr:
        blocker.execute(f"LOCK TABLE {EVENTS}, {UNSENT} IN ACCESS EXCLUSIVE MODE")
        watch = subprocess.Popen(
            [sys.executable, "-m", "outbox_relay", "status", "--watch", "0.2", "--timeout", "0.5",
             "--database-url", database_url], stdout=stdout, stderr=stderr, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_until(lambda: "did not answer within 0.5s" in err.read_text() or watch.poll() is not None, 30,
                       "the watch to say PostgreSQL did not answer")
            blocker.rollback()
            wait_until(lambda: "all topics" in out.read_text() or watch.poll() is not None, 30,
                       "the watch to show the outbox once the lock is gone")
            assert watch.poll() is None, err.read_text()
            assert "all topics" in out.read_text()
            assert err.read_text().splitlines()[0] == (
                "outbox-relay: PostgreSQL did not answer within 0.5s (--timeout); looking again in 0.2s")
        finally:
            watch.terminate()
            watch.wait(30)


def test_a_closed_pipe_ends_quietly(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        for n in range(5):
            enqueue(conn, f"topic{n}", b"x")
    process = subprocess.Popen([sys.executable, "-m", "outbox_relay", "status", "--database-url", database_url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the command prints, as with `status | head -0`
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(60) == cli_module.EXIT_PIPE == 141
    assert stderr == ""


def test_an_invalid_pass_through_property_names_its_variable(database_url: str) -> None:
    result = cli(database_url, "run", timeout=30, OUTBOX_KAFKA_PORT="29092")
    assert result.returncode == 2
    assert one_line(result).endswith('No such configuration property: "port" (from OUTBOX_KAFKA_PORT)')
    # librdkafka names a bad value by its own name of the property (compression.codec), not the one set.
    result = cli(database_url, "run", "-X", "compression.type=gzipp", timeout=30)
    assert result.returncode == 2
    assert one_line(result).endswith('for configuration property "compression.codec" (from -X compression.type)')


def test_migrate_on_an_existing_outbox_says_it_keeps_the_lane_count(database_url: str) -> None:
    result = cli(database_url, "migrate", "--lanes", "8")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "already exists with 1 lane and keeps its lane count" in line and "outbox-relay lanes set 8" in line
    assert "already exists" not in cli(database_url, "migrate", "--lanes", "1").stderr  # nothing to say


def test_migrate_gives_up_on_a_lock_held_by_a_long_transaction_and_names_it(empty_database_url: str) -> None:
    """0009 rewrites the events table (ACCESS EXCLUSIVE). Queued behind an application's open transaction,
    it would make every writer of the outbox queue behind it, for as long as that transaction lasts."""
    assert cli(empty_database_url, "migrate", "--revision", "0008_claim_indexes").returncode == 0
    with psycopg.connect(conninfo(empty_database_url), application_name="billing") as app:
        app.execute(f"INSERT INTO {EVENTS} (topic, key, value) VALUES ('orders', 'k', 'v')")  # left open
        pid = app.info.backend_pid
        started = time.monotonic()
        result = cli(empty_database_url, "migrate", "--lock-timeout", "2", timeout=45)
        took = time.monotonic() - started
        app.rollback()
    assert result.returncode == cli_module.EXIT_UNAVAILABLE and took < 30
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after Alembic's narration of the step it tried
    assert line.startswith("outbox-relay: migrate gave up waiting 2s for a lock on the outbox's tables"
                           f" (held by pid {pid} (billing, idle in transaction for "), line
    assert cli(empty_database_url, "status").returncode == cli_module.EXIT_SCHEMA  # still behind: nothing changed
    assert cli(empty_database_url, "migrate", "--lock-timeout", "2").returncode == 0  # the transaction gone


def test_a_lock_timeout_below_a_millisecond_still_gives_up(empty_database_url: str) -> None:
    """Rounded down to 0 ms, `--lock-timeout 0.0004` set no lock timeout at all: migrate waited for ever."""
    assert cli(empty_database_url, "migrate", "--revision", "0008_claim_indexes").returncode == 0
    with psycopg.connect(conninfo(empty_database_url), application_name="billing") as app:
        app.execute(f"INSERT INTO {EVENTS} (topic, key, value) VALUES ('orders', 'k', 'v')")  # left open
        result = cli(empty_database_url, "migrate", "--lock-timeout", "0.0004", timeout=45)
        app.rollback()
    assert result.returncode == cli_module.EXIT_UNAVAILABLE, result.stderr
    assert "migrate gave up waiting 0.0004s for a lock on the outbox's tables" in result.stderr.strip().splitlines()[-1]


def test_downgrade_to_base_needs_confirmation(engine: Engine, database_url: str) -> None:
    def has_outbox() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("SELECT to_regclass(:name)"), {"name": EVENTS}).scalar() is not None

    steps = len(list(ScriptDirectory(script_location()).walk_revisions()))
    for revision in ("base", f"-{steps}"):  # as many steps down as there are revisions: base too
        result = cli(database_url, "migrate", "--downgrade", "--revision", revision)
        assert result.returncode == 2 and "without --yes" in one_line(result)
        assert has_outbox()
    assert cli(database_url, "migrate", "--downgrade", "--revision", "-1").returncode == 0  # keeps every event
    result = cli(database_url, "migrate", "--downgrade", "--revision", "base", "--yes")
    assert result.returncode == 0, result.stderr
    assert not has_outbox()


def test_replay_refuses_a_naive_timestamp(database_url: str) -> None:
    result = cli(database_url, "replay", "--since", "2026-11-27T10:00:00")
    assert result.returncode == 2
    assert "has no time zone: add one, e.g. 2026-11-27T10:00:00+00:00" in result.stderr


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "outbox_relay", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"outbox-relay {version('outbox-relay')}"


def test_verify_judges_order_per_stream_and_finds_parked_rows_in_kafka(engine: Engine, database_url: str,
                                                                        tmp_path: Path) -> None:
    import uuid

    from tests import kafkatools
    from tests.relaytools import RelayProcess, pending, wait_until

    suffix = uuid.uuid4().hex[:8]
    # One key on two topics, the later event on the topic that sorts first: no order between them.
    later_first, earlier_second = (kafkatools.create_topic(f"{name}-{suffix}", partitions=1) for name in ("b", "a"))
    with engine.begin() as conn:
        enqueue(conn, later_first, b"1", key="k")
        enqueue(conn, earlier_second, b"2", key="k")
        enqueue(conn, later_first, b"3", key="k")
    relay = RelayProcess(database_url, tmp_path).start()
    try:
        wait_until(lambda: pending(engine) == 0, 30, "publication")
    finally:
        relay.stop()
    result = cli(database_url, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reordered=0" in result.stdout

    # An operator (or a bug) parks a row that Kafka already has: retrying it would publish it twice.
    with engine.begin() as conn:
        conn.execute(text(set_state_sql("failed", "e.id = 2", last_error="'x'")))
    result = cli(database_url, "verify")
    assert result.returncode == 1
    assert "parked as failed or discarded, yet in Kafka: 1" in result.stdout


def test_verify_on_a_live_outbox_does_not_call_events_not_published_yet_lost(engine: Engine, database_url: str,
                                                                              topic: str) -> None:
    """An event delayed an hour, or one waiting for the relay, is pending, not lost: `verify` exits 0 and says so."""
    import datetime

    with engine.begin() as conn:
        delayed = enqueue(conn, topic, b"later", key="k", delay=datetime.timedelta(hours=1))
        enqueue(conn, topic, b"now", key="j")
    result = cli(database_url, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: committed=2 received=0 lost=0 "), result.stdout
    assert "not published yet (pending: claimable, delayed or held; not a violation): 2" in result.stdout
    assert str(delayed) not in result.stdout

    # A row marked sent that Kafka lacks is still lost.
    with engine.begin() as conn:
        conn.execute(text(set_state_sql("sent", "e.event_id <> :delayed")), {"delayed": delayed})
    result = cli(database_url, "verify")
    assert result.returncode == 1 and "lost=1 " in result.stdout and "marked sent but not in Kafka: 1" in result.stdout
    assert "not published yet (pending: claimable, delayed or held; not a violation): 1" in result.stdout


def test_verify_of_one_topic_compares_that_topics_events_only(engine: Engine, database_url: str) -> None:
    """`verify --topic A` reads A from Kafka: the events of other topics are not in what it read, so not lost."""
    import uuid

    from confluent_kafka import Producer

    from tests import kafkatools

    suffix = uuid.uuid4().hex[:8]
    first, second = (kafkatools.create_topic(f"{name}-{suffix}", partitions=1) for name in ("a", "b"))
    producer = Producer({"bootstrap.servers": kafkatools.bootstrap()})
    with engine.begin() as conn:
        for topic in (first, second):
            event_id = enqueue(conn, topic, b"x", key="k")
            producer.produce(topic, key=b"k", value=b"x", headers=[("outbox-event-id", str(event_id).encode())])
        conn.execute(text(set_state_sql("sent", "TRUE")))
    producer.flush(10)
    assert cli(database_url, "verify").stdout.startswith("OK: committed=2 received=2 lost=0 ")
    result = cli(database_url, "verify", "--topic", first)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: committed=1 received=1 lost=0 "), result.stdout


def test_verify_looks_up_events_committed_and_published_while_it_read_kafka(
        engine: Engine, database_url: str, topic: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """On a live outbox, an event committed after `verify` read the table and published before it read
    Kafka is not one "in Kafka without a row": before, it was, and verify exited 1."""
    from confluent_kafka import Producer

    from outbox_relay import verify
    from tests import kafkatools

    read_topics = verify.read_topics

    def an_event_is_committed_and_published_meanwhile(*args: Any, **kwargs: Any) -> verify.KafkaRead:
        with engine.begin() as conn:
            event_id = enqueue(conn, topic, b"meanwhile", key="k")
        producer = Producer({"bootstrap.servers": kafkatools.bootstrap()})
        producer.produce(topic, key=b"k", value=b"meanwhile", headers=[("outbox-event-id", str(event_id).encode())])
        producer.flush(10)
        return read_topics(*args, **kwargs)

    with engine.begin() as conn:
        enqueue(conn, topic, b"before", key="k")
    monkeypatch.setattr(verify, "read_topics", an_event_is_committed_and_published_meanwhile)
    code = cli_module.main(["verify", "--topic", topic, "--database-url", database_url])
    out = capsys.readouterr().out
    assert code == cli_module.EXIT_OK, out
    assert out.startswith("OK: committed=2 received=1 lost=0 duplicated=0 reordered=0 unknown=0 "), out


def test_verify_excuses_what_retention_deleted_on_either_side_and_nothing_newer(engine: Engine,
                                                                               database_url: str) -> None:
    """The outbox deletes sent rows after OUTBOX_RETENTION_HOURS (7 days by default), Kafka a topic's old
    messages after its own retention: verify of any outbox older than either called their events "in Kafka
    without a row" or "lost", and exited 1 every time. Now what retention may have deleted is its own line;
    a message newer than the rows deleted, or a row newer than the messages deleted, is still a violation."""
    import datetime
    import uuid

    from confluent_kafka import Producer, TopicPartition

    from outbox_relay.db.retention import delete_expired
    from tests import kafkatools

    topic = kafkatools.create_topic(f"retained-{uuid.uuid4().hex[:8]}", partitions=1)
    producer = Producer({"bootstrap.servers": kafkatools.bootstrap()})

    def publish(event_ids: list[uuid.UUID], sent_at: str) -> None:
        for event_id in event_ids:
            producer.produce(topic, key=b"k", value=b"x", headers=[("outbox-event-id", str(event_id).encode())])
        producer.flush(10)
        with engine.begin() as conn:
            conn.execute(text(set_state_sql("sent", "e.event_id = ANY(:ids)", sent_at=sent_at)), {"ids": event_ids})

    with engine.begin() as conn:
        old = [enqueue(conn, topic, b"x", key="k") for _ in range(2)]
        kept = [enqueue(conn, topic, b"x", key="k") for _ in range(2)]
    publish(old, "now() - interval '8 days'")
    publish(kept, "now()")
    with engine.begin() as conn:  # the relay's retention, at its default of 7 days
        assert delete_expired(conn.connection.driver_connection, datetime.timedelta(hours=168)) == 2
    result = cli(database_url, "verify", "--topic", topic)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: committed=2 received=4 lost=0 duplicated=0 reordered=0 unknown=0 ")
    assert "in Kafka, rows deleted by the outbox's retention (OUTBOX_RETENTION_HOURS; not a violation): 2" in (
        result.stdout)

    # The topic's retention deletes its oldest messages, among them the first kept event's.
    admin = kafkatools.admin()  # held: the futures need the client alive
    for future in admin.delete_records([TopicPartition(topic, 0, 3)]).values():
        future.result(10)
    result = cli(database_url, "verify", "--topic", topic)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: committed=2 received=1 lost=0 ")
    assert "sent, messages deleted by Kafka's retention (the topic's retention.ms; not a violation): 1" in (
        result.stdout)

    # Newer than what either side deleted: a stranger, and a sent row Kafka never had.
    later = int((time.time() + 300) * 1000)
    producer.produce(topic, key=b"k", value=b"x", timestamp=later,
                     headers=[("outbox-event-id", str(uuid.uuid4()).encode())])
    producer.flush(10)
    with engine.begin() as conn:
        never = enqueue(conn, topic, b"x", key="k")
        conn.execute(text(f"UPDATE {EVENTS} SET created_at = now() + interval '5 minutes' WHERE event_id = :e"),
                     {"e": never})
        conn.execute(text(set_state_sql("sent", "e.event_id = :e")), {"e": never})
    result = cli(database_url, "verify", "--topic", topic)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "lost=1 duplicated=0 reordered=0 unknown=1 " in result.stdout, result.stdout
    assert str(never) in result.stdout


def test_the_demo_stops_when_the_relay_dies_and_shows_its_last_lines(database_url: str) -> None:
    import time

    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=45, cwd=ROOT,
                            env={**os.environ, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_KAFKA_PORT": "29092"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 30  # not the 60 s wait for events that will never come
    assert "the relay exited with code 2; its last log lines" in result.stdout
    assert 'No such configuration property: "port" (from OUTBOX_KAFKA_PORT)' in result.stdout


@pytest.mark.parametrize("command", [["status"], ["lanes", "show"]])
def test_the_timeout_covers_the_schema_check_a_migration_lock_blocks(engine: Engine, database_url: str,
                                                                      command: list[str]) -> None:
    """The schema check before the measure reads the settings table: a lock on it alone (a migration) kept
    `status --timeout 1` waiting for as long as it was held, with exit 0."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as blocker, blocker.transaction():
        blocker.execute(f"LOCK TABLE {SETTINGS} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        result = cli(database_url, *command, "--timeout", "1", timeout=60)
        assert time.monotonic() - started < 15
    assert result.returncode == cli_module.EXIT_UNAVAILABLE, result.stdout + result.stderr
    assert one_line(result) == "outbox-relay: PostgreSQL did not answer within 1s (--timeout)"


def _status_process(database_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "outbox_relay", "status", *args, "--database-url", database_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _backend_waiting_for_a_lock(database_url: str) -> int | None:
    """The status command's backend, once it waits for a lock (pg_stat_activity is read outside any
    transaction: inside one it is a snapshot)."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as observer:
        row = observer.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'outbox-relay cli'"
                               " AND wait_event_type = 'Lock'").fetchone()
    return row[0] if row else None


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """A PostgreSQL backend stopped (a frozen VM, a debugger): it takes no cancel, yet its kernel still
    answers TCP keepalives."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_stopped_backend_cannot_hold_status_past_its_timeout(database_url: str) -> None:
    """Before, `status --timeout 3` waited for as long as its backend stayed stopped: neither
    statement_timeout nor a cancel reaches a stopped process. Now, once a second of cancels went
    unanswered, it gives the connection up and says so in its one line."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as blocker, blocker.transaction():
        blocker.execute(f"LOCK TABLE {SETTINGS} IN ACCESS EXCLUSIVE MODE")
        status = _status_process(database_url, "--timeout", "3")
        try:
            backend = wait_until(lambda: _backend_waiting_for_a_lock(database_url), 30, "status to wait for the lock")
            with _stopped(backend):
                started = time.monotonic()
                _, stderr = status.communicate(timeout=30)
                waited = time.monotonic() - started
        finally:
            status.kill()
    assert status.returncode == cli_module.EXIT_UNAVAILABLE and waited < 10, (waited, stderr)
    assert stderr.strip() == "outbox-relay: PostgreSQL did not answer within 3s (--timeout)", stderr


def test_status_watch_connects_again_after_giving_up_on_a_stopped_backend(database_url: str) -> None:
    """`status --watch` says it could not look, then looks again on a new connection (the one it gave up
    is closed), and shows the outbox once PostgreSQL answers."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as blocker:
        with blocker.transaction():
            blocker.execute(f"LOCK TABLE {SETTINGS} IN ACCESS EXCLUSIVE MODE")
            status = _status_process(database_url, "--watch", "0.5", "--timeout", "3", "--json")
            try:
                backend = wait_until(lambda: _backend_waiting_for_a_lock(database_url), 30, "status to wait")
                with _stopped(backend):
                    assert status.stderr is not None
                    line = status.stderr.readline()  # blocks until status gives up
            except BaseException:
                status.kill()
                raise
        try:
            assert line.strip() == ("outbox-relay: PostgreSQL did not answer within 3s (--timeout);"
                                    " looking again in 0.5s")
            assert status.stdout is not None
            assert status.stdout.readline().strip() == "{"  # a snapshot, on the new connection
        finally:
            status.kill()
            status.communicate()


def test_status_watch_gives_up_on_a_backend_stopped_between_refreshes(database_url: str) -> None:
    """A backend stopped while `status --watch` sleeps between refreshes (where it spends nearly all its
    time): the next refresh's first statement, its session settings, ran outside the --timeout bound and
    waited for as long as the backend stayed stopped, with no line at all. Now it says so within the
    timeout and a second, and looks again on a new connection."""
    status = _status_process(database_url, "--watch", "0.5", "--timeout", "2", "--json")
    try:
        assert status.stdout is not None and status.stderr is not None
        stderr = status.stderr
        assert status.stdout.readline().strip() == "{"  # the first snapshot: the backend is idle now
        with psycopg.connect(conninfo(database_url), autocommit=True) as observer:
            backend = observer.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'outbox-relay cli'"
                                       ).fetchone()
        assert backend is not None
        with _stopped(backend[0]):
            started = time.monotonic()
            said: list[str] = []
            reader = threading.Thread(target=lambda: said.append(stderr.readline()), daemon=True)
            reader.start()
            reader.join(20)
            waited = time.monotonic() - started
        assert said == ["outbox-relay: PostgreSQL did not answer within 2s (--timeout); looking again in 0.5s\n"], (
            waited, said)
        assert waited < 10
        while status.stdout.readline().strip() != "{":  # a snapshot on the new connection
            pass
    finally:
        status.kill()
        status.communicate()


def test_a_busy_http_port_is_one_line(database_url: str) -> None:
    """It was two: the line, then 'caused by: OSError: [Errno 98] Address already in use'."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(database_url, "run", "--http", f"127.0.0.1:{port}", timeout=60)
    assert result.returncode == cli_module.EXIT_USAGE, result.stderr
    assert one_line(result) == f"outbox-relay: error: cannot serve HTTP on 127.0.0.1:{port}: Address already in use"


@contextlib.contextmanager
def _watching(database_url: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[tuple[float, str]]]]:
    """`status <args>` running, and the lines it printed so far with when they came (a thread reads them)."""
    status = _status_process(database_url, *args)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert status.stdout is not None
        for line in status.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield status, lines
    finally:
        status.kill()
        status.wait()
        reader.join(10)
        for pipe in (status.stdout, status.stderr):
            if pipe is not None:
                pipe.close()


def test_status_watch_into_a_pipe_or_a_file_writes_no_terminal_codes(database_url: str) -> None:
    """`status --watch 1 | tee status.log` (or `> file`) filled the file with screen-clearing escape codes."""
    with _watching(database_url, "--watch", "0.2") as (_status, lines):
        wait_until(lambda: sum("PENDING" in line for _, line in lines) >= 2, 30, "two refreshes")
    assert not any("\033" in line for _, line in lines), lines


def test_status_watch_goes_on_through_a_lost_connection(database_url: str) -> None:
    """An on-call person watches through a database restart or failover. A lost connection (here:
    pg_terminate_backend) ended `status --watch` with exit 4; it now says so and looks again."""
    with _watching(database_url, "--watch", "0.3", "--json") as (status, lines):
        def snapshots() -> list[float]:
            return [at for at, line in lines if line.rstrip() == "{"]

        wait_until(snapshots, 30, "a first snapshot")
        with psycopg.connect(conninfo(database_url), autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                  " WHERE application_name = 'outbox-relay cli'").fetchone()
        assert ended == (1,)
        assert status.stderr is not None
        line = status.stderr.readline()  # the next refresh finds the connection gone
        lost = time.monotonic()
        assert "looking again in 0.3s" in line and "Traceback" not in line, line
        wait_until(lambda: snapshots()[-1] > lost, 30, "a snapshot on a new connection")
        assert status.poll() is None  # still watching


def test_verify_ends_while_the_relay_publishes_steadily(engine: Engine, database_url: str, relays: Relays) -> None:
    """An operator runs `verify` on a live outbox: while writers commit and the relay publishes, a partition
    always has a transaction in flight, so the consumer never met the end (PARTITION_EOF) and `verify` read new
    events for as long as they came (10 minutes and more, silent). It reads up to the end it found at start."""
    import uuid

    from tests import kafkatools
    from tests.relaytools import pending

    topic = kafkatools.create_topic(f"live-{uuid.uuid4().hex[:8]}", partitions=1)
    relays.start(database_url, "live")
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            with engine.begin() as conn:
                enqueue(conn, topic, {"n": n}, key=str(n % 5))
            n += 1
            time.sleep(0.005)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        wait_until(lambda: pending(engine) < 50, 30, "the relay keeping up")
        time.sleep(2)
        started = time.monotonic()
        result = cli(database_url, "verify", timeout=60)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        writer.join(10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: "), result.stdout
    assert elapsed < 30, elapsed


def test_a_relay_whose_instance_timeout_is_shorter_than_two_lane_intervals_does_not_start(
        database_url: str, relays: Relays) -> None:
    """Owners write their heartbeat once per lane interval. A relay started with OUTBOX_INSTANCE_TIMEOUT=0.1 took
    every healthy owner for hung and ended its lane sessions every second (pg_terminate_backend), fleet-wide,
    for as long as it ran. It now stops at start with one line naming both settings."""
    owner = relays.start(database_url, "owner")
    wait_until(lambda: "took lane 0" in owner.log(), 30, "the owner to take its lane")
    result = cli(database_url, "run", timeout=20, OUTBOX_INSTANCE_TIMEOUT="0.5", OUTBOX_LANE_INTERVAL="1",
                 OUTBOX_HTTP="")
    assert result.returncode == cli_module.EXIT_USAGE == 2, result.stderr
    line = one_line(result)
    assert "OUTBOX_INSTANCE_TIMEOUT" in line and "OUTBOX_LANE_INTERVAL" in line, line
    assert "lost lane" not in owner.log()


def test_a_killed_instance_is_no_longer_listed_as_live(database_url: str, relays: Relays) -> None:
    """After a SIGKILL the relays stop counting an instance as soon as its session is gone, but `status` and
    `lanes show` kept listing it among the live instances for a minute: on call, a dead relay looked alive."""
    import json

    def live() -> list[str]:
        result = cli(database_url, "lanes", "show", "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout)["instances"])

    doomed = relays.start(database_url, "doomed")
    relays.start(database_url, "survivor")
    wait_until(lambda: live() == ["doomed", "survivor"], 30, "both instances to register")
    doomed.kill()
    wait_until(lambda: live() == ["survivor"], 10, "the killed instance to leave the live list")


@pytest.mark.parametrize("count", ["0", "-3", "1025"])
def test_a_lane_count_out_of_range_is_a_usage_error(database_url: str, count: str) -> None:
    """`lanes set 0` said what was wrong but exited 1 (\"violations found or an unexpected failure\"): a script or
    a runbook step cannot tell a typo from a failed change. Exit 2, as for every other bad value."""
    result = cli(database_url, "lanes", "set", count)
    assert result.returncode == cli_module.EXIT_USAGE == 2, result.stderr
    assert f"between 1 and 1024, got {count}" in one_line(result)
