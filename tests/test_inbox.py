"""The consumer inbox against the real PostgreSQL and Kafka: every event applied exactly once.

The consumer's database is another database than the outbox's. The application (tests/inbox_app.py)
writes one effect row per event and a counter per key; `applied` compares them with the outbox
ledger: each committed event applied once, none twice, each key's events applied in id order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import secrets
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from outbox_relay import enqueue
from outbox_relay.migrate import upgrade_inbox
from tests import inbox_app, kafkatools
from tests.pgtools import EVENTS
from tests.relaytools import Relays, Writers, cli, free_port, pending, wait_until
from tests.scenarios import FULL, SIZE, full_size_only

GROUP = "billing"


@pytest.fixture
def consumer_url(empty_database_url: str) -> str:
    """The consumer's own database: the inbox's tables and the application's, no outbox."""
    upgrade_inbox(empty_database_url)
    engine = create_engine(empty_database_url)
    with engine.begin() as conn:
        inbox_app.create_schema(conn)
    engine.dispose()
    return empty_database_url


@pytest.fixture
def consumer_engine(consumer_url: str) -> Iterator[Engine]:
    engine = create_engine(consumer_url)
    yield engine
    engine.dispose()


@dataclasses.dataclass
class Applied:
    committed: int
    applied: int
    missing: list[str]
    repeated: list[str]
    unknown: list[str]
    reordered_keys: list[str]
    counters_wrong: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.repeated or self.unknown or self.reordered_keys or self.counters_wrong)

    def summary(self) -> str:
        return (f"committed={self.committed} applied={self.applied} missing={len(self.missing)} "
                f"repeated={len(self.repeated)} unknown={len(self.unknown)} reordered keys={len(self.reordered_keys)}"
                f" wrong counters={len(self.counters_wrong)}")


def applied(outbox: Engine, consumer: Engine, topic: str) -> Applied:
    """The consumer's effects against the outbox ledger (replays excluded: they must never apply)."""
    with outbox.connect() as conn:
        rows = conn.execute(text(
            f"SELECT event_id::text, convert_from(key, 'UTF8') FROM {EVENTS} WHERE topic = :topic"
            " AND NOT ('outbox-replay-of' = ANY(header_names)) ORDER BY id"), {"topic": topic}).all()
    with consumer.connect() as conn:
        effects = conn.execute(text("SELECT event_id::text, key, n FROM app.effects WHERE topic = :topic"),
                               {"topic": topic}).all()
        counters = dict(conn.execute(text("SELECT key, n FROM app.counters")).all())
    expected = {event_id for event_id, _ in rows}
    seen = collections.Counter(event_id for event_id, _, _ in effects)
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for event_id, key in rows:
        by_key[key].append(event_id)
    applied_order: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for event_id, key, n in effects:
        applied_order[key].append((n, event_id))
    reordered = [key for key, ids in by_key.items()
                 if [event_id for _, event_id in sorted(applied_order.get(key, []))] != ids
                 and sorted(applied_order.get(key, [])) and set(ids) <= seen.keys()]
    return Applied(
        committed=len(expected), applied=len(effects),
        missing=sorted(expected - seen.keys()), repeated=sorted(e for e, c in seen.items() if c > 1),
        unknown=sorted(seen.keys() - expected), reordered_keys=sorted(reordered),
        counters_wrong=sorted(k for k, ids in by_key.items() if counters.get(k) != len(ids)),
    )


def wait_while_progressing(count: Callable[[], int], target: int, what: str, stall: float = 60) -> None:
    """Wait until count() reaches target; fail only when it stops growing for `stall` seconds (a loaded
    machine applies slowly, a stuck consumer not at all)."""
    last, since = -1, time.monotonic()
    while (current := count()) < target:
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since > stall:
            raise AssertionError(f"{what}: stuck at {current} of {target} for {stall:.0f}s")
        time.sleep(0.5)


def effects(consumer: Engine) -> int:
    with consumer.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM app.effects")).scalar_one())


def stored_offsets(consumer: Engine) -> int:
    with consumer.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(next_offset), 0) FROM inbox.offsets")).scalar_one())


def write(engine: Engine, topic: str, values: list[tuple[str, dict[str, object]]]) -> list[uuid.UUID]:
    with engine.begin() as conn:
        return [enqueue(conn, topic, value, key=key) for key, value in values]


def test_every_event_is_applied_once_and_replays_are_skipped(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    write(engine, topic, [(f"k{n % 7}", {"n": n}) for n in range(300)])
    port = free_port()
    consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                                  OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_BATCH_SIZE=40, OUTBOX_INBOX_HTTP=port)
    wait_until(lambda: effects(consumer_engine) >= 300, 180, "the consumer to apply 300 events")
    result = cli(database_url, "replay", "--topic", topic)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: pending(engine) == 0, 180, "the relay to publish the replays")
    # Offsets count the transactions' commit markers too: wait for the last message of each partition.
    last = {}
    for message in kafkatools.consume([topic], expected=600):
        last[message.partition] = max(last.get(message.partition, -1), message.offset)
    wait_until(lambda: stored_offsets(consumer_engine) >= sum(last.values()) + len(last), 60,
               "the consumer to read past the replays")
    time.sleep(1)
    report = applied(engine, consumer_engine, topic)
    print(f"\nreplayed 300: {report.summary()}")
    assert report.ok, report.summary()
    assert report.applied == 300
    def metrics() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    exposition = metrics()
    assert f'outbox_inbox_processed_events_total{{topic="{topic}"}} 300.0' in exposition
    assert f'outbox_inbox_duplicates_skipped_total{{topic="{topic}"}} 300.0' in exposition
    # Lag is observed every few seconds, once the consumer has seen each partition's high watermark.
    wait_until(lambda: "outbox_inbox_lag_events{" in metrics(), 60, "the consumer to report its lag")
    assert consumer.stop() == 0
    assert "inbox billing stopped" in consumer.log()
    status = cli(consumer_url, "inbox", "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert {row["partition"]: row["next_offset"] - 1 for row in rows} == last
    assert {(row["group"], row["failed"], row["waiting"]) for row in rows} == {(GROUP, 0, 0)}


def test_an_async_handler_applies_every_event_once(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    write(engine, topic, [(f"k{n % 5}", {"n": n}) for n in range(200)])
    relays.start_inbox(consumer_url, "tests.inbox_app:apply_async", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                       OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_BATCH_SIZE=25)
    wait_until(lambda: effects(consumer_engine) >= 200, 180, "the async consumer to apply 200 events")
    relays.stop_all()
    report = applied(engine, consumer_engine, topic)
    assert report.ok, report.summary()
    assert report.applied == 200


def parked(consumer_url: str) -> list[dict[str, object]]:
    result = cli(consumer_url, "inbox", "failed", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_failing_event_is_retried_parked_then_retried_or_discarded_by_an_operator(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    # Key "bad": a poison event, then two good ones that must wait behind it (hold). Key "good" flows.
    poison, *held = write(engine, topic, [("bad", {"poison": True}), ("bad", {"n": 1}), ("bad", {"n": 2})])
    write(engine, topic, [("good", {"n": n}) for n in range(20)])
    consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                                  OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_MAX_ATTEMPTS=3)
    wait_until(lambda: len(parked(consumer_url)) == 3, 180, "the poison event and the two behind it to be parked")
    wait_until(lambda: effects(consumer_engine) == 20, 120, "the other key to flow")
    rows = {row["event_id"]: row for row in parked(consumer_url)}
    assert rows[str(poison)]["state"] == "failed"
    assert rows[str(poison)]["attempts"] == 3
    assert "Poisoned: event" in str(rows[str(poison)]["error"])
    assert {rows[str(e)]["state"] for e in held} == {"held"}
    assert consumer.log().count("handler failed on event") == 3
    listing = cli(consumer_url, "inbox", "failed", "list")
    assert f"event {poison}: 3 attempts: Poisoned" in listing.stdout

    # The operator fixes the cause and retries: the poison event, then what it held, in order.
    with consumer_engine.begin() as conn:
        conn.execute(text("INSERT INTO app.cured VALUES (:id)"), {"id": poison})
    result = cli(consumer_url, "inbox", "failed", "retry", "--id", str(poison))
    assert result.returncode == 0 and "changed 1 failed event" in result.stdout, result.stderr
    wait_until(lambda: not parked(consumer_url), 120, "the retried event and those it held to be applied")
    with consumer_engine.connect() as conn:
        order = conn.execute(text("SELECT event_id FROM app.effects WHERE key = 'bad' ORDER BY n")).scalars().all()
    assert order == [poison, *held]

    # A second poison event is discarded instead: never applied, and the one behind it goes on.
    second, after = write(engine, topic, [("bad", {"poison": True}), ("bad", {"n": 3})])
    wait_until(lambda: len(parked(consumer_url)) == 2, 180, "the second poison event to be parked")
    assert cli(consumer_url, "inbox", "failed", "discard", "--id", str(second), "--dry-run").stdout.strip() == (
        "inbox failed discard: would change 1 failed event")
    result = cli(consumer_url, "inbox", "failed", "discard", "--id", str(second))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not parked(consumer_url), 120, "the held event to go on after the discard")
    with consumer_engine.connect() as conn:
        applied_ids = set(conn.execute(text("SELECT event_id FROM app.effects")).scalars())
    assert after in applied_ids and second not in applied_ids
    nothing = cli(consumer_url, "inbox", "failed", "retry")
    assert nothing.returncode == 2 and "say which parked events" in nothing.stderr


def test_skip_policy_lets_later_events_of_a_failed_key_go_on(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    poison, later = write(engine, topic, [("bad", {"poison": True}), ("bad", {"n": 1})])
    relays.start_inbox(consumer_url, "tests.inbox_app:apply", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                       OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_MAX_ATTEMPTS=2,
                       OUTBOX_INBOX_FAILED_KEY_POLICY="skip")
    wait_until(lambda: effects(consumer_engine) == 1, 180, "the later event to be applied")
    with consumer_engine.connect() as conn:
        assert conn.execute(text("SELECT event_id FROM app.effects")).scalar_one() == later
    rows = parked(consumer_url)
    assert [(row["event_id"], row["state"], row["attempts"]) for row in rows] == [(str(poison), "failed", 2)]


def test_an_event_postgresql_refuses_for_good_is_parked_not_retried_for_ever(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    """A handler error of psycopg's OperationalError family that is the event's own fault, never an outage:
    a note too long for its btree index (SQLSTATE 54000, program limit exceeded). It is retried, parked
    after the attempts, and the other keys flow; it must not be waited out as a lost database would be
    (that retried the whole batch for ever: nothing of any key was applied again)."""
    relays.start(database_url, "relay")
    refused, *held = write(engine, topic, [("bad", {"note": secrets.token_hex(20_000)}), ("bad", {"n": 1}),
                                           ("bad", {"n": 2})])
    write(engine, topic, [("good", {"n": n}) for n in range(20)])
    consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply_noted", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                                  OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_MAX_ATTEMPTS=3)
    wait_until(lambda: effects(consumer_engine) == 20, 120, "the other key to flow")
    wait_until(lambda: len(parked(consumer_url)) == 3, 120, "the refused event and the two behind it to be parked")
    rows = {row["event_id"]: row for row in parked(consumer_url)}
    assert rows[str(refused)]["state"] == "failed"
    assert "ProgramLimitExceeded" in str(rows[str(refused)]["error"]), rows[str(refused)]
    assert {rows[str(e)]["state"] for e in held} == {"held"}
    assert "PostgreSQL unavailable" not in consumer.log()


def test_a_rebalance_between_two_consumers_loses_and_repeats_nothing(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    settings = {"OUTBOX_INBOX_GROUP": GROUP, "OUTBOX_INBOX_TOPICS": topic, "OUTBOX_INBOX_BATCH_SIZE": 20}
    with Writers(engine, topic, threads=3, keys=12) as writers:
        first = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "first", **settings)
        wait_until(lambda: effects(consumer_engine) > 100, 180, "the first consumer to apply events")
        second = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "second", **settings)
        wait_until(lambda: "inbox: assigned" in second.log(), 180, "the second consumer to take partitions")
        before = effects(consumer_engine)
        wait_until(lambda: effects(consumer_engine) > before + 100, 180, "both consumers to apply events")
        assert first.stop() == 0  # a graceful leave: its partitions move to the second
        wait_until(lambda: second.log().count("inbox: assigned") >= 2, 180, "the second to take them over")
        time.sleep(1)
        writers.stop()
    wait_until(lambda: pending(engine) == 0, 180, "the relay to drain")
    wait_while_progressing(lambda: effects(consumer_engine), len(writers.committed), "the survivor to catch up")
    time.sleep(1)
    report = applied(engine, consumer_engine, topic)
    print(f"\nrebalance: {report.summary()}")
    assert report.ok, report.summary()
    assert "revoked" in first.log()


def test_the_consumers_database_connections_killed_under_load_are_survived(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    relays.start(database_url, "relay")
    consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "consumer", OUTBOX_INBOX_GROUP=GROUP,
                                  OUTBOX_INBOX_TOPICS=topic, OUTBOX_INBOX_BATCH_SIZE=20)
    terminated = 0
    with Writers(engine, topic, threads=3, keys=12, limit=1500) as writers:
        wait_until(lambda: effects(consumer_engine) > 100, 180, "the consumer to apply events")
        for _ in range(5):
            with consumer_engine.begin() as conn:
                terminated += conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one()
            time.sleep(0.7)
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 180, "the relay to drain")
    wait_while_progressing(lambda: effects(consumer_engine), len(writers.committed),
                           "the consumer to catch up by itself")
    time.sleep(1)
    assert consumer.alive, consumer.log()[-3000:]
    report = applied(engine, consumer_engine, topic)
    print(f"\n{terminated} consumer connections terminated: {report.summary()}")
    assert report.ok, report.summary()
    assert terminated >= 1


KILLS = 30 if FULL else 6


def _sigkill_loop(engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str,
                  relays: Relays, kills: int) -> None:
    rng = random.Random(16)
    relays.start(database_url, "relay")
    settings = {"OUTBOX_INBOX_GROUP": GROUP, "OUTBOX_INBOX_TOPICS": topic, "OUTBOX_INBOX_BATCH_SIZE": 25}
    consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply", "c0", **settings)
    with Writers(engine, topic, threads=3, keys=15) as writers:
        for kill in range(1, kills + 1):
            # Each kill hits a consumer at work: one that has applied events of its own (a loaded machine
            # may take many seconds to start one and join the group), some random time later.
            before = effects(consumer_engine)
            wait_until(lambda b=before: effects(consumer_engine) > b, 180, f"consumer {kill - 1} to apply events")
            time.sleep(rng.uniform(0.0, 1.0))
            consumer.kill()
            consumer = relays.start_inbox(consumer_url, "tests.inbox_app:apply", f"c{kill}", **settings)
        writers.stop()
    wait_until(lambda: pending(engine) == 0, 90, "the relay to drain")
    wait_while_progressing(lambda: effects(consumer_engine), len(writers.committed), "the consumer to catch up")
    time.sleep(2)  # anything applied twice would show now
    relays.stop_all()
    report = applied(engine, consumer_engine, topic)
    print(f"\nSCENARIO inbox SIGKILL x{kills} while the relay publishes and writers insert: {report.summary()}"
          f" [{SIZE} size]")
    assert report.ok, report.summary()
    assert report.committed == len(writers.committed) > 300


@pytest.mark.timeout(600)  # each restart joins the group anew: a minute or two, longer on a busy machine
def test_a_consumer_sigkilled_repeatedly_applies_every_event_exactly_once(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    _sigkill_loop(engine, database_url, consumer_url, consumer_engine, topic, relays, KILLS)


@full_size_only
@pytest.mark.timeout(1800)
def test_a_consumer_sigkilled_30_times_applies_every_event_exactly_once(
    engine: Engine, database_url: str, consumer_url: str, consumer_engine: Engine, topic: str, relays: Relays
) -> None:
    _sigkill_loop(engine, database_url, consumer_url, consumer_engine, topic, relays, 30)


def test_the_inbox_commands_say_what_is_wrong_in_one_line(empty_database_url: str) -> None:
    result = cli(empty_database_url, "inbox", "failed", "list")
    assert result.returncode == 5 and "run `outbox-relay inbox migrate`" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = cli(empty_database_url, "inbox", "run", "no_such_module:apply", "--group", "g", "--topics", "t")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "outbox-relay: error: handler 'no_such_module:apply': cannot import 'no_such_module': "
        "No module named 'no_such_module'"]
    result = cli(empty_database_url, "inbox", "run", "tests.inbox_app:apply", "--topics", "t")
    assert result.returncode == 2 and "no consumer group" in result.stderr
    result = cli(empty_database_url, "inbox", "run", "tests.inbox_app:apply", "--group", "g", "--topics", "t",
                 "-X", "isolation.level=read_uncommitted")
    assert result.returncode == 2 and "isolation.level=read_uncommitted (from -X isolation.level)" in result.stderr
    migrated = cli(empty_database_url, "inbox", "migrate")
    assert migrated.returncode == 0 and "inbox schema at head" in migrated.stdout, migrated.stderr
    result = cli(empty_database_url, "inbox", "run", "tests.inbox_app:apply", "--group", "g", "--topics", "t",
                 "-X", "auto.offset.reset=bogus")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [  # and where it was set
        'outbox-relay: error: Kafka consumer configuration rejected: Invalid value "bogus" for configuration '
        'property "auto.offset.reset" (from -X auto.offset.reset)'], result.stderr
    assert cli(empty_database_url, "inbox", "failed", "list").stdout.strip() == "(no parked events)"
    engine = create_engine(empty_database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regclass('outbox.events')")).scalar() is None  # no outbox needed
        assert conn.execute(text("SELECT version_num FROM inbox.outbox_inbox_version")).scalar() == "i0001_inbox"
    engine.dispose()
    refused = cli(empty_database_url, "inbox", "migrate", "--downgrade", "--revision", "base")
    assert refused.returncode == 2 and "without --yes" in refused.stderr
    dropped = cli(empty_database_url, "inbox", "migrate", "--downgrade", "--revision", "base", "--yes")
    assert dropped.returncode == 0, dropped.stderr


def test_retention_deletes_a_groups_old_processed_ids_in_batches(consumer_engine: Engine) -> None:
    import datetime as dt

    from outbox_relay.db import inbox as inbox_store

    with consumer_engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO inbox.processed (consumer_group, event_id, topic, partition, \"offset\", processed_at)"
            " SELECT g, gen_random_uuid(), 't', 0, n, now() - make_interval(hours => h)"
            " FROM (VALUES ('billing', 200, 2500), ('billing', 1, 10), ('other', 200, 5)) AS v(g, h, c),"
            " generate_series(1, c) AS n"))
    deleted = []
    while True:
        with consumer_engine.begin() as conn:
            count = inbox_store.delete_processed(conn, GROUP, dt.timedelta(hours=168), batch=1000)
        deleted.append(count)
        if count < 1000:
            break
    assert deleted == [1000, 1000, 500]
    with consumer_engine.connect() as conn:
        left = dict(conn.execute(text("SELECT consumer_group, count(*) FROM inbox.processed GROUP BY 1")).all())
    assert left == {"billing": 10, "other": 5}  # recent ids stay; another group's are its own business
