"""Migrations: from empty to head matches the models exactly, and downgrade removes it all."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from outbox_relay import migrate
from outbox_relay.db import catalog
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Store
from outbox_relay.errors import MigrationBlocked
from outbox_relay.models import (
    EVENTS_TABLE,
    IDLE_LANES_TABLE,
    INSTANCES_TABLE,
    LANE_INDEX_PREFIX,
    LANES_TABLE,
    READY_INDEX_PREFIX,
    SCHEMA,
    SENT_TABLE,
    SETTINGS_TABLE,
    STATE_VIEW,
    UNSENT_TABLE,
    metadata,
)
from tests.pgtools import (
    EVENT_STATES,
    EVENTS,
    LANES,
    SENT,
    SETTINGS,
    UNSENT,
    create_database,
    drop_database,
    scratch_database,
)
from tests.relaytools import cli, wait_until


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_schemas": True,
            "include_name": lambda name, type_, parent: type_ != "schema" or name in (None, SCHEMA),
            # The lane index depends on the lane count in the database, so models cannot declare it.
            "include_object": lambda obj, name, type_, reflected, compare_to: (
                name not in ("outbox_relay_version", STATE_VIEW)
                and not (name or "").startswith((LANE_INDEX_PREFIX, READY_INDEX_PREFIX))),
        })
        diff = compare_metadata(context, metadata)
    engine.dispose()
    return diff


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    names = set(inspect(engine).get_table_names(schema=SCHEMA))
    engine.dispose()
    return names


def test_upgrade_from_empty_matches_the_models(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    assert _tables(empty_database_url) == {
        EVENTS_TABLE, UNSENT_TABLE, SENT_TABLE, INSTANCES_TABLE, LANES_TABLE, SETTINGS_TABLE, IDLE_LANES_TABLE,
        "outbox_relay_version"}
    assert _diff(empty_database_url) == []


def test_downgrade_removes_the_outbox_and_upgrade_again_works(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url, lanes=4)
    migrate.downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) == {"outbox_relay_version"}
    migrate.upgrade(empty_database_url)
    assert EVENTS_TABLE in _tables(empty_database_url)


def test_cli_migrate_sets_the_lane_count(empty_database_url: str) -> None:
    result = cli(empty_database_url, "migrate", "--lanes", "8", check=True)
    assert "outbox schema at head" in result.stdout
    engine = create_engine(empty_database_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT lane_count FROM {SETTINGS}").scalar_one() == 8
    engine.dispose()


def _psql(url: str, script: str) -> None:
    """Run a script as a DBA would: psql, stopping at the first error."""
    result = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo(url)], input=script,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_migrate_sql_prints_the_upgrade_a_dba_runs_from_the_current_revision(empty_database_url: str) -> None:
    """`migrate --sql` writes the upgrade from where the database is, for review; run with psql it makes what
    `migrate` makes. Alembic's offline mode had two faults here: every % of the DO blocks doubled, and the
    version table created before its schema."""
    script = cli(empty_database_url, "migrate", "--sql", "--lanes", "3", check=True).stdout
    assert "CONCURRENTLY" in script
    with psycopg.connect(conninfo(empty_database_url)) as conn:  # printed, not run
        assert conn.execute("SELECT to_regclass(%s)", (EVENTS,)).fetchone() == (None,)
    _psql(empty_database_url, script)
    assert _diff(empty_database_url) == [] and _diff_from_models_at(empty_database_url, "head") == []
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        assert conn.execute(f"SELECT lane_count FROM {SETTINGS}").fetchone() == (3,)
        assert conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                            (f'"{SCHEMA}"."{READY_INDEX_PREFIX}3"',)).fetchone() == (True,)
    assert cli(empty_database_url, "status", check=True).returncode == 0  # the version stamp is head
    # From a middle revision, with events in it: only what is missing, and nothing lost.
    migrate.downgrade(empty_database_url, "0008_claim_indexes")
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        conn.execute(f"INSERT INTO {EVENTS} (topic) SELECT 't' FROM generate_series(1, 3)")
        conn.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() WHERE id = 1")
    script = cli(empty_database_url, "migrate", "--sql", check=True).stdout
    assert "0008_claim_indexes -> 0009_unsent_table" in script and "-> 0001_outbox" not in script
    _psql(empty_database_url, script)
    assert _diff(empty_database_url) == []
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        assert conn.execute(f"SELECT id, state FROM {EVENT_STATES} ORDER BY id").fetchall() == [
            (1, "sent"), (2, "pending"), (3, "pending")]


def test_migrate_sql_refuses_a_downgrade_and_an_outbox_its_application_manages(empty_database_url: str) -> None:
    result = cli(empty_database_url, "migrate", "--sql", "--downgrade", "--revision", "base")
    assert result.returncode != 0 and "--sql prints upgrades only" in result.stderr.strip().splitlines()[-1]
    migrate.upgrade(empty_database_url)
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        conn.execute(f'DROP TABLE "{SCHEMA}".outbox_relay_version')
    result = cli(empty_database_url, "migrate", "--sql")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "your application's own Alembic history manages it" in result.stderr.strip().splitlines()[-1]


def _catalog(url: str) -> dict[str, list[tuple[object, ...]]]:
    """What autogenerate does not compare: constraint and index definitions, generated columns."""
    engine = create_engine(url)
    with engine.connect() as conn:
        catalog = {
            "constraints": sorted(conn.exec_driver_sql(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace = %(schema)s::regnamespace AND conrelid::regclass::text NOT LIKE %(version)s",
                {"schema": SCHEMA, "version": "%outbox_relay_version"}).all()),
            "indexes": sorted(conn.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(schema)s"
                " AND tablename <> 'outbox_relay_version' AND indexname NOT LIKE %(lane)s"
                " AND indexname NOT LIKE %(ready)s",
                {"schema": SCHEMA, "lane": LANE_INDEX_PREFIX + "%", "ready": READY_INDEX_PREFIX + "%"}).all()),
            "columns": sorted(conn.exec_driver_sql(
                "SELECT table_name, column_name, data_type, is_nullable, column_default, generation_expression"
                " FROM information_schema.columns WHERE table_schema = %(schema)s"
                " AND table_name NOT IN ('outbox_relay_version', %(view)s)", {"schema": SCHEMA, "view": STATE_VIEW}
            ).all()),
        }
    engine.dispose()
    return catalog


def test_migrated_catalog_equals_the_one_the_models_create(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    name = f"outbox_models_{uuid.uuid4().hex[:12]}"
    reference = create_database(name)
    try:
        engine = create_engine(reference)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {SCHEMA}")
            metadata.create_all(conn)
        engine.dispose()
        assert _catalog(empty_database_url) == _catalog(reference)
    finally:
        drop_database(name)


def test_the_lane_index_follows_the_lane_count(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url, lanes=4)
    engine = create_engine(empty_database_url)
    with engine.connect() as conn:
        indexes = conn.exec_driver_sql(
            f"SELECT indexdef FROM pg_indexes WHERE indexname LIKE '{LANE_INDEX_PREFIX}%%'"
            f" OR indexname LIKE '{READY_INDEX_PREFIX}%%'").scalars().all()
    engine.dispose()
    # Since 0009 the ready index (without delayed events) is on the narrow unsent table.
    assert indexes == [f"CREATE INDEX {READY_INDEX_PREFIX}4 ON {SCHEMA}.{UNSENT_TABLE} USING btree"
                       " (((lane_key % 4)), id) WHERE ((state = 'pending'::text) AND (due_at IS NULL))"]


def test_an_outbox_with_pending_sent_and_delayed_events_migrates_to_the_claim_indexes(
        empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url, "0007_instance_sessions", lanes=2)
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {EVENTS} (topic, key) SELECT 't', convert_to('k' || g, 'UTF8')"
                     " FROM generate_series(1, 40) g")
        conn.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() WHERE id <= 10")
        conn.execute(f"UPDATE {EVENTS} SET available_at = now() + interval '1 hour' WHERE id > 30")
        migrate.upgrade(empty_database_url, "head")
        store = Store()
        with connect(empty_database_url, lane=True) as lane_conn:
            claimed = sorted(row.id for lane in (0, 1) for row in store.claim(lane_conn, lane, 2, 100))
        assert claimed == list(range(11, 31))  # pending and due; not the sent, not the delayed
        indexes = {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s",
                                                  (SCHEMA,))}
        assert {f"{READY_INDEX_PREFIX}2", f"ix_{UNSENT_TABLE}_delayed"} <= indexes
        assert f"{LANE_INDEX_PREFIX}2" not in indexes
        migrate.downgrade(empty_database_url, "0007_instance_sessions")
        indexes = {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s",
                                                  (SCHEMA,))}
        assert f"{LANE_INDEX_PREFIX}2" in indexes and f"{READY_INDEX_PREFIX}2" not in indexes
        assert f"ix_{EVENTS_TABLE}_delayed" not in indexes


_V8_STATE = (f"SELECT id, state, sent_at, attempts, last_error, available_at, (available_at <= created_at)"
             f" FROM {EVENTS} ORDER BY id")


def test_an_outbox_with_events_in_every_state_moves_to_the_unsent_table_and_back(empty_database_url: str) -> None:
    """0009: pending, sent (two marks), failed, discarded, retried and delayed events keep their state,
    attempts, error, due time and sent time through the upgrade, and the downgrade restores the v8 rows."""
    migrate.upgrade(empty_database_url, "0008_claim_indexes", lanes=2)
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {EVENTS} (topic, key) SELECT 't', convert_to('k' || g, 'UTF8')"
                     " FROM generate_series(1, 40) g")
        conn.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() - interval '2 days' WHERE id <= 5")
        conn.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() - interval '1 hour'"
                     " WHERE id BETWEEN 6 AND 10")
        conn.execute(f"UPDATE {EVENTS} SET state = 'failed', attempts = 3, last_error = 'too big' WHERE id IN (11, 12)")
        conn.execute(f"UPDATE {EVENTS} SET state = 'discarded', attempts = 1, last_error = 'gone' WHERE id = 13")
        conn.execute(f"UPDATE {EVENTS} SET attempts = 2, available_at = now() WHERE id = 14")  # retried
        conn.execute(f"UPDATE {EVENTS} SET available_at = now() + interval '1 hour' WHERE id > 30")
        before = conn.execute(_V8_STATE).fetchall()
        migrate.upgrade(empty_database_url, "head")
        states = dict(conn.execute(f"SELECT state, count(*) FROM {EVENT_STATES} GROUP BY 1").fetchall())
        assert states == {"sent": 10, "failed": 2, "discarded": 1, "pending": 27}
        sent_at = conn.execute(f"SELECT id, sent_at FROM {EVENT_STATES} WHERE state = 'sent' ORDER BY id").fetchall()
        assert [(i, t) for i, _, t, *_ in before if i <= 10] == sent_at
        with connect(empty_database_url, lane=True) as lane_conn:
            claimed = {row.id: row.attempts for lane in (0, 1) for row in Store().claim(lane_conn, lane, 2, 100)}
        assert sorted(claimed) == list(range(14, 31)) and claimed[14] == 2  # not sent, parked or delayed
        migrate.downgrade(empty_database_url, "0008_claim_indexes")
        assert conn.execute(_V8_STATE).fetchall() == before
        assert _diff_from_models_at(empty_database_url, "0008_claim_indexes") == []


def test_an_upgrade_to_0009_interrupted_at_its_lock_runs_again(empty_database_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """0009 copies the sent history before it locks writers out, so its first part commits: a run that
    stops at the lock (a lock timeout, ^C while a writer's transaction is open) must not leave tables
    that make every later `migrate` fail with "relation ... already exists"."""
    migrate.upgrade(empty_database_url, "0008_claim_indexes", lanes=1)
    with psycopg.connect(conninfo(empty_database_url)) as open_writer:
        open_writer.execute(f"INSERT INTO {EVENTS} (topic) SELECT 't' FROM generate_series(1, 3)")
        open_writer.commit()
        open_writer.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() WHERE id = 1")
        open_writer.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('t')")  # id 4, still open
        monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=1s")
        with pytest.raises(MigrationBlocked, match=r"gave up waiting for a lock .*\(held by pid"):
            migrate.upgrade(empty_database_url, "head")
        monkeypatch.delenv("PGOPTIONS")
        open_writer.commit()
    migrate.upgrade(empty_database_url, "head")
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        assert conn.execute(f"SELECT id, state FROM {EVENT_STATES} ORDER BY id").fetchall() == [
            (1, "sent"), (2, "pending"), (3, "pending"), (4, "pending")]
    assert _diff(empty_database_url) == []


def test_every_migration_function_run_again_on_a_complete_outbox_changes_nothing(empty_database_url: str) -> None:
    """An application that adopts an outbox `migrate` made into its own history, or whose revision is run
    again after it stopped part-way, calls every function on what is already there. 0009 would drop the
    unsent table (every pending event) if it ran again; each function must skip what it finds done."""
    migrate.upgrade(empty_database_url, lanes=2)
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        conn.execute(f"INSERT INTO {EVENTS} (topic) SELECT 't' FROM generate_series(1, 3)")
        conn.execute(f"DELETE FROM {UNSENT} WHERE id = 1")  # as a mark does
        conn.execute(f"INSERT INTO {SENT} (first_id, last_id, ids) VALUES (1, 1, '{{1}}')")
        outbox_id = conn.execute(f"SELECT outbox_id FROM {SETTINGS}").fetchone()
        conn.execute(f'DELETE FROM "{SCHEMA}".outbox_relay_version')  # every revision runs again
    before = _catalog(empty_database_url)
    migrate.upgrade(empty_database_url, "head")
    assert _catalog(empty_database_url) == before and _diff(empty_database_url) == []
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        assert conn.execute(f"SELECT id, state FROM {EVENT_STATES} ORDER BY id").fetchall() == [
            (1, "sent"), (2, "pending"), (3, "pending")]
        assert conn.execute(f"SELECT outbox_id FROM {SETTINGS}").fetchone() == outbox_id


def _diff_from_models_at(url: str, revision: str) -> list[object]:
    """The downgraded catalog against a fresh database migrated straight to ``revision``."""
    name = f"outbox_at_{uuid.uuid4().hex[:12]}"
    reference = create_database(name)
    try:
        migrate.upgrade(reference, revision, lanes=2)
        ours, theirs = _catalog(url), _catalog(reference)
        return [(kind, sorted(set(ours[kind]) ^ set(theirs[kind]))) for kind in ours if ours[kind] != theirs[kind]]
    finally:
        drop_database(name)


def _index_builds_waiting(conn: psycopg.Connection[Any]) -> int:
    """CREATE INDEX statements of this database waiting for a lock (an older transaction or snapshot)."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%%'"
                       " AND wait_event_type = 'Lock' AND datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def test_migrations_that_index_the_events_table_never_block_its_writers(empty_database_url: str) -> None:
    """A writer's transaction is open while the migration runs: a plain CREATE INDEX would queue behind it
    and every later writer behind the CREATE INDEX. Built CONCURRENTLY, later writers go on."""
    migrate.upgrade(empty_database_url, "0003_commit_notify", lanes=2)
    with psycopg.connect(conninfo(empty_database_url)) as open_writer:
        open_writer.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('t')")
        migration = threading.Thread(target=migrate.upgrade, args=(empty_database_url, "head"), daemon=True)
        migration.start()
        with psycopg.connect(conninfo(empty_database_url), autocommit=True) as later_writer:
            wait_until(lambda: _index_builds_waiting(later_writer), 30, "the migration to wait for the open writer")
            later_writer.execute("SET lock_timeout = '2s'")
            later_writer.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('t')")  # LockNotAvailable if blocked
        open_writer.commit()
        migration.join(60)
    assert not migration.is_alive()
    assert _diff(empty_database_url) == []


def test_an_index_built_concurrently_outwaits_migrates_lock_timeout(empty_database_url: str) -> None:
    """CREATE INDEX CONCURRENTLY waits for every older snapshot in the database (a pg_dump, a report on
    another table) and blocks no writer meanwhile. Under `migrate --lock-timeout` it gave up instead, named
    nobody (the snapshot's holder locks no outbox table) and left an INVALID index that the next run's
    IF NOT EXISTS kept."""
    migrate.upgrade(empty_database_url, "0003_commit_notify", lanes=2)
    failures: list[BaseException] = []

    def upgrade() -> None:
        try:
            migrate.upgrade(empty_database_url, "0008_claim_indexes", lock_timeout=0.5)
        except BaseException as exc:  # the assertion below names it
            failures.append(exc)

    with psycopg.connect(conninfo(empty_database_url), application_name="pg_dump") as backup:
        backup.execute("CREATE TABLE public.ledger (id int)")
        backup.commit()
        backup.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        backup.execute("SELECT count(*) FROM public.ledger")  # its snapshot stays until it commits
        migration = threading.Thread(target=upgrade, daemon=True)
        migration.start()
        with psycopg.connect(conninfo(empty_database_url), autocommit=True) as observer:
            wait_until(lambda: _index_builds_waiting(observer), 30, "the index build to wait for the old snapshot")
        migration.join(2)  # four times the lock timeout: before the fix it had given up by now
        backup.commit()
    migration.join(60)
    assert not migration.is_alive() and failures == []
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        assert conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT i.indisvalid",
            (SCHEMA,)).fetchall() == []
    assert _diff_from_models_at(empty_database_url, "0008_claim_indexes") == []


def test_migrate_names_only_sessions_that_can_have_blocked_it(template_database: str, database_url: str) -> None:
    """Databases cloned from one template share their tables' oids: a lock in a sibling clone looked like
    one on this outbox. And a transaction younger than the wait cannot be what migrate waited for: a
    conflicting request queues behind migrate's (a relay's lane, busy at that moment, is not a blocker)."""
    with scratch_database("outbox_sibling", template_database) as sibling, \
            psycopg.connect(conninfo(sibling), application_name="sibling") as other, \
            psycopg.connect(conninfo(database_url), application_name="billing") as blocker, \
            psycopg.connect(conninfo(database_url), application_name="outbox-relay lane 0") as busy, \
            connect(database_url, "outbox-relay migrate") as conn:
        other.execute(f"LOCK TABLE {EVENTS} IN ACCESS SHARE MODE")
        blocker.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('t')")  # left open
        pid = blocker.info.backend_pid
        time.sleep(1.5)  # the wait, longer than the lock timeout below
        busy.execute(f"SELECT count(*) FROM {LANES}")  # a transaction begun while migrate waited
        [holder] = catalog.lock_holders(conn, waited_s=1.0)
        assert holder.startswith(f"pid {pid} (billing, idle in transaction for "), holder
        assert len(catalog.lock_holders(conn)) == 2  # without a wait to go by: every holder here


def test_the_inbox_has_its_own_history_in_a_database_without_an_outbox(empty_database_url: str) -> None:
    """The consumer inbox migrates a database that has no outbox, leaves no drift from its models, and its
    version table is its own: the outbox's history (and its head check) never sees it."""
    from outbox_relay.models.inbox import INBOX_SCHEMA, inbox_metadata

    migrate.upgrade_inbox(empty_database_url)
    engine = create_engine(empty_database_url)
    assert set(inspect(engine).get_table_names(schema=INBOX_SCHEMA)) == {
        "processed", "offsets", "parked", "outbox_inbox_version"}
    assert inspect(engine).get_table_names(schema=SCHEMA) == []
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True, "include_schemas": True,
            "include_name": lambda name, type_, parent: type_ != "schema" or name == INBOX_SCHEMA,
            "include_object": lambda obj, name, type_, reflected, compare_to: name != "outbox_inbox_version",
        })
        assert compare_metadata(context, inbox_metadata) == []
    # Both histories side by side in one database, each at its head.
    migrate.upgrade(empty_database_url)
    assert _diff(empty_database_url) == []
    migrate.downgrade_inbox(empty_database_url, "base")
    assert inspect(engine).get_table_names(schema=INBOX_SCHEMA) == ["outbox_inbox_version"]
    engine.dispose()


def _scale_factors(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Each outbox table's autovacuum_vacuum_scale_factor settings (its own and its TOAST table's)."""
    rows = conn.execute(
        "SELECT c.relname, coalesce(c.reloptions, '{}') || coalesce(t.reloptions, '{}') FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_class t ON t.oid = c.reltoastrelid"
        " WHERE n.nspname = %s AND c.relkind = 'r'", (SCHEMA,)).fetchall()
    return {name: [o for o in options if o.startswith("autovacuum_vacuum_scale_factor")] for name, options in rows
            if any(o.startswith("autovacuum_vacuum_scale_factor") for o in options)}


def test_autovacuum_follows_retention_and_an_operators_own_setting_is_kept(empty_database_url: str) -> None:
    """0010: the tables retention deletes from are vacuumed once 1% is dead (the default, 20%, let them
    grow by a day and a half of events before retention's space was reused); the downgrade resets them."""
    migrate.upgrade(empty_database_url, "0009_unsent_table")
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        assert _scale_factors(conn) == {}
        migrate.upgrade(empty_database_url, "head")
        tuned = ["autovacuum_vacuum_scale_factor=0.01"] * 2  # the table's and its TOAST table's
        assert _scale_factors(conn) == {EVENTS_TABLE: tuned, SENT_TABLE: tuned}
        migrate.downgrade(empty_database_url, "0009_unsent_table")
        assert _scale_factors(conn) == {}
        conn.execute(f"ALTER TABLE {EVENTS} SET (autovacuum_vacuum_scale_factor = 0.002)")
        migrate.upgrade(empty_database_url, "head")
        assert _scale_factors(conn)[EVENTS_TABLE] == ["autovacuum_vacuum_scale_factor=0.002",
                                                      "autovacuum_vacuum_scale_factor=0.01"]
        migrate.downgrade(empty_database_url, "0009_unsent_table")
        assert _scale_factors(conn) == {EVENTS_TABLE: ["autovacuum_vacuum_scale_factor=0.002"]}
