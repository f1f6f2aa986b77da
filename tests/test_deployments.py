"""Exactly-once in the situations real deployments meet, against the real broker and database.

Each test ends with the ledger: zero lost, zero duplicated, no key out of id order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from outbox_relay import enqueue_many, migrate, progress
from outbox_relay.config import KafkaNames, Settings
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Store
from outbox_relay.errors import OutboxError
from outbox_relay.lane import LaneWorker
from outbox_relay.metrics import Metrics
from outbox_relay.publisher import LanePublisher
from outbox_relay.verify import LedgerReport
from outbox_relay.write import Event, new_event_id
from tests import kafkatools
from tests.pgtools import EVENTS, INSTANCES, LANES, SETTINGS, UNSENT, set_state_sql
from tests.relaytools import (
    ROOT,
    RelayProcess,
    Relays,
    Writers,
    free_port,
    lane_owners,
    ledger,
    pending,
    postgres_backends,
    service,
    set_lane_count,
    states,
    wait_until,
)


def kafka_names(engine: Engine, database_url: str) -> KafkaNames:
    with engine.connect() as conn:
        outbox_id = conn.execute(text(f"SELECT outbox_id::text FROM {SETTINGS}")).scalar_one()
    settings = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": database_url,
                                          "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafkatools.bootstrap()})
    return settings.kafka_names(outbox_id)


def drained(relays: Relays, database_url: str, engine: Engine, **settings: object) -> RelayProcess:
    """A relay that ran until nothing was pending, then stopped."""
    relay = relays.start(database_url, **settings)  # type: ignore[arg-type]  # name= travels in settings
    wait_until(lambda: pending(engine) == 0, 60, f"{relay.name} to drain")
    relay.stop()
    return relay


def backlog(engine: Engine, topic: str, events: int, keys: int = 20,
            event_ids: Callable[[], uuid.UUID | None] = lambda: None) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [Event(topic, {"n": n}, key=f"key-{n % keys}", event_id=event_ids())
                            for n in range(events)])


def drain_more(relays: Relays, database_url: str, engine: Engine, topic: str, events: int,
               event_ids: Callable[[], uuid.UUID | None] = lambda: None, **settings: object) -> RelayProcess:
    """Enqueue ``events`` more, then a relay that drains them and stops."""
    backlog(engine, topic, events, event_ids=event_ids)
    return drained(relays, database_url, engine, **settings)


def ledger_ok(engine: Engine, topic: str, what: str, received: int | None = None) -> LedgerReport:
    """The ledger of the topic, printed under ``what``; it must be clean (and hold ``received`` events)."""
    report = ledger(engine, [topic])
    print(f"\n{what}: {report.summary()}")
    assert report.ok, report.summary()
    assert received is None or report.received == received, report.summary()
    return report


@pytest.fixture
def second_postgres() -> Iterator[str]:
    """Another PostgreSQL server of our own (its admin URL), as a second service's would be."""
    state = ROOT / ".services" / f"second-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OUTBOX_SERVICES_DIR": str(state), "OUTBOX_SERVICES_PG_PORT": str(free_port())}
    services = [sys.executable, str(ROOT / "scripts" / "services")]
    result = subprocess.run([*services, "up", "postgres"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    try:
        url = subprocess.run([*services, "env"], env=env, capture_output=True, text=True, check=True).stdout
        yield url.split("OUTBOX_DATABASE_URL=")[1].split()[0]
    finally:
        subprocess.run([*services, "reset"], env=env, capture_output=True)


def test_two_outboxes_whose_databases_share_a_name_share_a_kafka_cluster_safely(
    engine: Engine, database_url: str, second_postgres: str, topic: str, relays: Relays,
) -> None:
    # The second server gets a database of the same name as ours: two services, one common name.
    name = make_url(database_url).database
    with psycopg.connect(conninfo(second_postgres), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    other_url = make_url(second_postgres).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(other_url, lanes=1)
    other = create_engine(other_url)
    try:
        names = {kafka_names(engine, database_url).progress_topic, kafka_names(other, other_url).progress_topic}
        assert len(names) == 2, "two outboxes got the same Kafka names"
        other_topic = kafkatools.create_topic(f"test-{uuid.uuid4().hex[:12]}", partitions=3)
        relays.start(database_url, name="first", OUTBOX_BATCH_SIZE=40)
        relays.start(other_url, name="second", OUTBOX_BATCH_SIZE=40)
        with Writers(engine, topic, threads=2, limit=1000) as w1, Writers(other, other_topic, threads=2,
                                                                          limit=1000) as w2:
            wait_until(lambda: w1.done() and w2.done(), 120, "writers to finish")
        wait_until(lambda: pending(engine) == 0 and pending(other) == 0, 60, "both relays to drain")
        for relay in relays.started:
            relay.stop()
        for eng, t, writers in ((engine, topic, w1), (other, other_topic, w2)):
            report = ledger(eng, [t])
            print(f"\n{t}: {report.summary()}")
            assert report.ok, report.summary()
            assert report.received == len(writers.committed)
    finally:
        other.dispose()


def test_the_progress_topic_and_the_relays_headers_are_reserved(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    names = kafka_names(engine, database_url)
    with engine.begin() as conn:
        with pytest.raises(OutboxError, match="reserved"):
            enqueue_many(conn, [Event(names.progress_topic, {"evil": 1}, partition=0)])
        with pytest.raises(OutboxError, match="reserved"):
            enqueue_many(conn, [Event(topic, {"n": 1}, headers={"outbox-event-id": "forged"})])
    # Raw SQL gets past the write API: the relay parks such a row instead of writing into its progress.
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {EVENTS} (topic, value, partition) VALUES (:t, 'x', 0)"),
                     {"t": names.progress_topic})
    backlog(engine, topic, 200)
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=20)
    wait_until(lambda: states(engine).get("sent", 0) == 200, 60, "the relay to publish the real events")
    relay.stop()
    assert states(engine).get("failed") == 1

    # A record nobody should have written, in the lane's progress partition: a forged range over
    # every id, and junk. Recovery must ignore both (and say so), not mark pending rows sent.
    producer = Producer({"bootstrap.servers": kafkatools.bootstrap()})
    forged = {"v": 2, "outbox": "someone-else", "lane": 0, "lane_count": 1, "ids": [[1, 10**9]]}
    absurd = {**forged, "outbox": names.outbox_id}
    for value in (json.dumps(forged).encode(), json.dumps(absurd).encode(), b"\xff junk"):
        producer.produce(names.progress_topic, key=b"lane-0", value=value, partition=0)
    producer.flush(30)
    relay = drain_more(relays, database_url, engine, topic, 100, name="again", OUTBOX_BATCH_SIZE=20)
    assert "ignored a record" in relay.log()
    ledger_ok(engine, topic, "forged progress records ignored", 300)


def test_marks_lost_by_postgresql_over_many_transactions_are_recovered(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    drain_more(relays, database_url, engine, topic, 1000, OUTBOX_BATCH_SIZE=50)
    # PostgreSQL loses the marks of the last 8 transactions, as a promoted asynchronous standby or a
    # restore would: those rows are pending again although Kafka committed them.
    with engine.begin() as conn:
        lost = conn.execute(text(set_state_sql("pending", f"e.id > (SELECT max(id) - 400 FROM {EVENTS})"))).rowcount
    assert lost == 400
    relay = drain_more(relays, database_url, engine, topic, 100, name="after-failover", OUTBOX_BATCH_SIZE=50)
    assert "recovered 400 events" in relay.log()
    ledger_ok(engine, topic, "8 transactions' marks lost", 1100)


@pytest.mark.parametrize("event_ids", [lambda: None, new_event_id], ids=["random", "time-ordered"])
def test_ids_a_promoted_standby_hands_out_again_are_not_taken_for_published_events(
    engine: Engine, database_url: str, topic: str, relays: Relays, event_ids: Callable[[], uuid.UUID | None]
) -> None:
    """Time-ordered event ids (UUID version 7, as PostgreSQL 18's uuidv7() or an application makes them)
    written within a minute share their first 32 bits: a fingerprint of those alone took the new events
    under the lost ones' ids for published, and 100 were lost."""
    drain_more(relays, database_url, engine, topic, 300, event_ids, OUTBOX_BATCH_SIZE=50)
    # The promoted standby never received the last 100 rows (published already) nor the marks of the
    # 100 before them, and its sequence hands the 100 ids out again to new events.
    with engine.begin() as conn:
        top = conn.execute(text(f"SELECT max(id) FROM {EVENTS}")).scalar_one()
        conn.execute(text(set_state_sql("pending", "e.id > :t")), {"t": top - 200})
        gone = set(conn.execute(text(f"DELETE FROM {EVENTS} WHERE id > :t RETURNING event_id::text"),
                                {"t": top - 100}).scalars())
        conn.execute(text(f"DELETE FROM {UNSENT} WHERE id > :t"), {"t": top - 100})
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{EVENTS}', 'id'), :t)"), {"t": top - 100})
    backlog(engine, topic, 150, event_ids=event_ids)  # 100 of them under the ids the lost events had
    relay = drained(relays, database_url, engine, name="after-failover", OUTBOX_BATCH_SIZE=50)
    assert "recovered 100 events" in relay.log()
    report = ledger(engine, [topic])
    print(f"\nids handed out again after a failover: {report.summary()}")
    # The 100 events the old primary took with it are in Kafka without a row: the application's loss
    # at the failover, not the relay's. Every event the new primary has is in Kafka, once.
    assert set(report.unknown) == gone
    assert not (report.lost or report.duplicates or report.reordered or report.sent_but_missing), report.summary()
    assert report.received == 450


def test_a_relay_that_stalls_across_a_lane_count_change_never_publishes_under_the_old_count(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    set_lane_count(engine, 2)
    # The stalled relay has read "2 lanes" and stalls before it locks its first lane.
    stalled = relays.start(database_url, name="stalled", OUTBOX_BATCH_SIZE=25,
                    OUTBOX_FAULT_INJECTION="before_lane_lock:1:stall=8")
    with Writers(engine, topic, threads=3, keys=30, limit=2400) as writers:
        wait_until(lambda: "stalled" in _instances(engine), 30, "the stalled relay to register")
        result = subprocess.run([sys.executable, "-m", "outbox_relay", "lanes", "set", "4", "--database-url",
                                 database_url], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        relays.start(database_url, name="live", OUTBOX_BATCH_SIZE=25)
        wait_until(lambda: "not taking lane" in stalled.log() or "lane count changed" in stalled.log(), 30,
                   "the stalled relay to wake")
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the relays to drain")
    wait_until(lambda: len(lane_owners(engine)) == 4, 30, "the relays to hold the 4 lanes")
    for relay in relays.started:
        relay.stop()
    ledger_ok(engine, topic, "stall across a lane-count change")


def test_a_lane_is_bound_to_the_count_it_was_locked_under(engine: Engine, database_url: str) -> None:
    """The two checks behind the test above, each on its own: after the lock, and in every claim."""
    backlog(engine, "t", 50)
    set_lane_count(engine, 4)  # `lanes set` finished while this worker still believed in 2 lanes
    settings = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": database_url,
                                          "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafkatools.bootstrap()})
    outbox_id = kafka_names(engine, database_url).outbox_id
    store = Store()
    worker = LaneWorker(progress.Scope(outbox_id, 0, 2), "unused", settings, store, _no_publisher, Metrics())

    assert not worker.try_acquire(), "took a lane under a lane count that is no longer the count"
    assert lane_owners(engine) == {}
    with connect(database_url, lane=True) as conn:
        assert store.claim(conn, 0, 2, 100) == [], "claimed under a stale lane count"
        assert len(store.claim(conn, 0, 4, 100)) > 0
    worker.release()


def _no_publisher() -> LanePublisher:
    raise AssertionError("no publisher may be made for a lane that is not owned")


def _instances(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text(f"SELECT name FROM {INSTANCES}")).scalars())


def test_an_error_after_the_kafka_commit_leads_to_recovery_not_a_second_publish(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    # A trigger that refuses the mark (any error that is not a lost connection: a read-only
    # session, a trigger, an internal error) while the refusal is switched on.
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE public.refuse_marks (on_ boolean)"))
        conn.execute(text("INSERT INTO public.refuse_marks VALUES (true)"))
        conn.execute(text(
            "CREATE FUNCTION public.refuse_marks() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF EXISTS (SELECT 1 FROM public.refuse_marks) THEN"
            " RAISE EXCEPTION 'marks refused by the test'; END IF; RETURN OLD; END $$"))
        conn.execute(text(f"CREATE TRIGGER refuse_marks BEFORE DELETE ON {UNSENT} FOR EACH ROW"
                          " EXECUTE FUNCTION public.refuse_marks()"))
    backlog(engine, topic, 10)
    relay = relays.start(database_url, OUTBOX_BACKOFF_MAX="0.5")
    wait_until(lambda: relay.log().count("marks refused by the test") >= 3, 60, "the mark to fail a few times")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM public.refuse_marks"))
    wait_until(lambda: pending(engine) == 0, 60, "the relay to recover")
    relay.stop()
    ledger_ok(engine, topic, "marks refused, then allowed", 10)


def test_a_hung_owner_loses_its_lane_to_a_live_instance(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    hung = relays.start(database_url, name="hung", OUTBOX_BATCH_SIZE=20)
    wait_until(lambda: lane_owners(engine).get(0) == "hung", 30, "the first relay to own the lane")
    relays.start(database_url, name="live", OUTBOX_BATCH_SIZE=20)
    # Timed from the hang on: a live relay still starting (20 s on a loaded machine) is no takeover delay.
    wait_until(lambda: "live" in _instances(engine), 60, "the live relay to register")
    with Writers(engine, topic, threads=3, limit=1500) as writers:
        wait_until(lambda: states(engine).get("sent", 0) >= 200, 60, "publishing to start")
        assert hung.process is not None
        hung.process.send_signal(signal.SIGSTOP)  # alive to the kernel, dead to the world
        stopped = time.monotonic()
        wait_until(lambda: lane_owners(engine).get(0) == "live", 30, "the live relay to take the lane")
        takeover = time.monotonic() - stopped
        sent = states(engine).get("sent", 0)
        wait_until(lambda: states(engine).get("sent", 0) > sent, 30, "the live relay to publish")
        hung.process.send_signal(signal.SIGCONT)  # wakes up fenced: it must neither publish nor mark
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the live relay to drain")
    for relay in relays.started:
        relay.stop()
    # Before: the hung owner kept its lock for as long as it hung, and no wait was long enough.
    ledger_ok(engine, topic, f"hung owner taken over in {takeover:.1f}s (instance timeout 2s)")


def test_a_killed_instances_lanes_are_taken_within_a_few_lane_intervals(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    set_lane_count(engine, 4)
    # An instance timeout far beyond the wait below: a killed instance must stop counting when its
    # session goes, not when the timeout runs out (before: lanes moved only after the timeout).
    a = relays.start(database_url, name="a", OUTBOX_INSTANCE_TIMEOUT="600")
    b = relays.start(database_url, name="b", OUTBOX_INSTANCE_TIMEOUT="600")
    wait_until(lambda: sorted(lane_owners(engine).values()) == ["a", "a", "b", "b"], 30, "an even share")
    with Writers(engine, topic, threads=2, limit=1000) as writers:
        b.kill()
        killed = time.monotonic()
        wait_until(lambda: list(lane_owners(engine).values()) == ["a"] * 4, 30, "a to take b's lanes")
        failover = time.monotonic() - killed
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "a to drain")
    a.stop()
    ledger_ok(engine, topic, f"all 4 lanes held again {failover:.1f}s after a SIGKILL (lane interval 0.3s)")


# What an instance holds besides its lanes' connections: lane management, the backlog monitor, the
# LISTEN connection, the spare that lock attempts run on, and a retention run's short-lived one.
CONNECTIONS_BESIDE_LANES = 5


def test_an_instances_connections_follow_the_lanes_it_owns_not_the_lanes_it_tried(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    """Issue 14, goal 5: 3 instances join one after another on 12 lanes. Each tries lanes its peers
    still hold; it keeps a connection only for the 4 it takes, not for every lane it tried."""
    lanes, names = 12, ["a", "b", "c"]
    set_lane_count(engine, lanes)
    started: list[RelayProcess] = []
    with Writers(engine, topic, threads=2, limit=1500) as writers:
        for name in names:  # each joins while the others hold every lane
            started.append(relays.start(database_url, name=name, OUTBOX_BATCH_SIZE=25))
            wait_until(lambda name=name: len(lane_owners(engine)) == lanes and name in lane_owners(engine).values(),
                       60,
                       f"{name} to take lanes")
        even = sorted(names * (lanes // len(names)))
        wait_until(lambda: sorted(lane_owners(engine).values()) == even, 60, "an even share (4/4/4)")
        seen = {name: 0 for name in names}
        for _ in range(10):  # steady state under load: the most each instance holds
            for relay in started:
                seen[relay.name] = max(seen[relay.name], postgres_backends(engine, relay))
            time.sleep(0.3)
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the relays to drain")
    assert sorted(lane_owners(engine).values()) == even, "lanes were dropped"
    for relay in started:
        relay.stop()
    report = ledger(engine, [topic])
    owned = lanes // len(names)
    print(f"\n{len(names)} instances on {lanes} lanes, {owned} owned each: PostgreSQL backends per instance"
          f" {seen} (bound {owned} + {CONNECTIONS_BESIDE_LANES}); {report.summary()}")
    assert report.ok, report.summary()
    assert all(count <= owned + CONNECTIONS_BESIDE_LANES for count in seen.values()), seen


def test_an_event_the_write_api_accepts_is_one_the_producer_sends(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    large = os.urandom(1_020_000)  # under the write API's limit, over librdkafka's own default
    with engine.begin() as conn:
        enqueue_many(conn, [Event(topic, large, key="big"), Event(topic, b"after", key="big")])
    relay = drained(relays, database_url, engine)
    assert states(engine) == {"sent": 2}, relay.log()[-2000:]
    received = kafkatools.consume([topic], expected=2)
    assert [m.value for m in received] == [large, b"after"]


def test_a_relay_stops_within_its_bound_while_the_broker_hangs(
    engine: Engine, database_url: str, topic: str, relays: Relays,
    restores_services: None,
) -> None:
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=20, OUTBOX_SHUTDOWN_TIMEOUT="30")
    backlog(engine, topic, 200)
    wait_until(lambda: states(engine).get("sent", 0) > 0, 60, "publishing to start")
    service("pause")  # the broker hangs mid-drain: connections open, nothing answers
    backlog(engine, topic, 200)
    time.sleep(3)
    asked = time.monotonic()
    code = relay.stop(30)
    took = time.monotonic() - asked
    service("resume")
    print(f"\nstopped {took:.1f}s after SIGTERM with the broker hung")
    assert code == 0, relay.log()[-3000:]
    assert "shutdown took longer" not in relay.log()  # ended by itself, not by its deadline
    relay = relays.start(database_url, name="after", OUTBOX_BATCH_SIZE=20)
    wait_until(lambda: pending(engine) == 0, 90, "the next relay to drain")
    relay.stop()
    report = ledger(engine, [topic])
    assert report.ok and report.received == 400, report.summary()


def test_a_progress_topic_that_deletes_old_records_is_refused(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    # Records deleted by age would leave recovery blind: the relay publishes nothing rather than risk it.
    unfit = kafkatools.create_topic(f"progress-{uuid.uuid4().hex[:8]}", partitions=1,
                                    config={"cleanup.policy": "delete"})
    backlog(engine, topic, 5)
    relay = relays.start(database_url, OUTBOX_PROGRESS_TOPIC=unfit, OUTBOX_BREAKER_THRESHOLD="2")
    wait_until(lambda: "circuit open" in relay.log(), 60, "the relay to refuse the topic")
    relay.stop()
    assert f"progress topic '{unfit}' has cleanup.policy=delete" in relay.log()
    assert pending(engine) == 5


def test_a_progress_topic_refused_then_replaced_as_the_refusal_says_does_not_stall_the_lane(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    """The refusal says "choose another with OUTBOX_PROGRESS_TOPIC". The refused topic never carried a
    record, yet it was recorded as the lane's names before the relay found it unfit: the relay under the
    new topic then settled "the last owner" under the refused topic, was refused again, and never published."""
    unfit = kafkatools.create_topic(f"progress-{uuid.uuid4().hex[:8]}", partitions=1,
                                    config={"cleanup.policy": "delete"})
    backlog(engine, topic, 5)
    relay = relays.start(database_url, name="refused", OUTBOX_PROGRESS_TOPIC=unfit, OUTBOX_BREAKER_THRESHOLD="2")
    wait_until(lambda: "circuit open" in relay.log(), 60, "the relay to refuse the topic")
    relay.stop()
    assert pending(engine) == 5
    relay = relays.start(database_url, name="replaced", OUTBOX_PROGRESS_TOPIC=f"progress-{uuid.uuid4().hex[:8]}",
                         OUTBOX_BREAKER_THRESHOLD="2")
    try:
        wait_until(lambda: pending(engine) == 0, 60, "the relay under the new topic to drain")
    finally:
        relay.stop()
    ledger_ok(engine, topic, "a refused progress topic replaced", 5)


@pytest.mark.parametrize("names", ["prefix", "progress topic"])
def test_a_lane_taken_under_other_kafka_names_settles_the_last_owners_work_first(
    engine: Engine, database_url: str, topic: str, relays: Relays, names: str
) -> None:
    """Relays of one outbox told different OUTBOX_TRANSACTIONAL_ID_PREFIX or OUTBOX_PROGRESS_TOPIC (drift
    between deployments, or a rename rolled out while one died): the next owner neither fenced the last
    one nor read its progress records, and published again the batch it had committed in Kafka but not
    marked (40 of 100 duplicated). Each owner now records its names in its lane; the next settles there."""
    suffix = uuid.uuid4().hex[:8]
    first = {"OUTBOX_TRANSACTIONAL_ID_PREFIX": f"first-{suffix}"} if names == "prefix" else {
        "OUTBOX_PROGRESS_TOPIC": f"first-{suffix}.progress"}
    backlog(engine, topic, 100)
    crashed = relays.start(database_url, name="crashed", OUTBOX_BATCH_SIZE=40, OUTBOX_FAULT_INJECTION="after_commit:1",
                           **first)
    assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    assert pending(engine) == 100  # 40 of them in Kafka, none marked
    survivor = relays.start(database_url, name="survivor", OUTBOX_BATCH_SIZE=40)  # the default names
    wait_until(lambda: pending(engine) == 0, 60, "the survivor to drain")
    survivor.stop()
    ledger_ok(engine, topic, f"a crash after the commit, taken over under another {names}", 100)
    assert "recovered 40 events" in survivor.log(), survivor.log()
    assert "was last published as transactional.id" in survivor.log()


@pytest.mark.parametrize("names", ["prefix", "progress topic"])
def test_names_alternating_across_crashes_neither_duplicate_nor_lose(
    engine: Engine, database_url: str, topic: str, relays: Relays, names: str
) -> None:
    """A, crash after a commit; B, crash after a commit; A again: each owner settles the last one's work."""
    suffix = uuid.uuid4().hex[:8]
    a = {"OUTBOX_TRANSACTIONAL_ID_PREFIX": f"a-{suffix}"} if names == "prefix" else {
        "OUTBOX_PROGRESS_TOPIC": f"a-{suffix}.progress"}
    b = {"OUTBOX_TRANSACTIONAL_ID_PREFIX": f"b-{suffix}"} if names == "prefix" else {
        "OUTBOX_PROGRESS_TOPIC": f"b-{suffix}.progress"}
    backlog(engine, topic, 100)
    for name, kafka in (("a1", a), ("b1", b)):
        crashed = relays.start(database_url, name=name, OUTBOX_BATCH_SIZE=40, OUTBOX_FAULT_INJECTION="after_commit:1",
                               **kafka)
        assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    assert pending(engine) == 60, pending(engine)  # b1 recovered a1's 40, then committed 40 it never marked
    survivor = relays.start(database_url, name="a2", OUTBOX_BATCH_SIZE=40, **a)
    wait_until(lambda: pending(engine) == 0, 60, "a2 to drain")
    survivor.stop()
    ledger_ok(engine, topic, f"names alternating by {names} across crashes", 100)
    assert "recovered 40 events" in survivor.log(), survivor.log()


def test_a_last_owners_progress_topic_deleted_for_good_is_not_made_again_empty(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    """The README: "if that owner's progress topic is gone for good, the lane waits, naming it". Settling
    the last owner made its deleted topic again, empty, read nothing back from it, and published again
    the 40 events that owner had committed but not marked (40 of 100 duplicated)."""
    old = f"old-{uuid.uuid4().hex[:8]}.progress"
    backlog(engine, topic, 100)
    crashed = relays.start(database_url, name="crashed", OUTBOX_BATCH_SIZE=40, OUTBOX_FAULT_INJECTION="after_commit:1",
                           OUTBOX_PROGRESS_TOPIC=old)
    assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    admin = kafkatools.admin()
    admin.delete_topics([old])[old].result(30)
    wait_until(lambda: old not in admin.list_topics(timeout=10).topics, 30, "the old topic to go")
    waiting = relays.start(database_url, name="waiting", OUTBOX_BATCH_SIZE=40, OUTBOX_BREAKER_THRESHOLD="2")
    wait_until(lambda: "circuit open" in waiting.log(), 60, "the relay to name the missing topic")
    waiting.stop()
    assert f"progress topic '{old}', where the lane's last owner recorded its progress, is not in Kafka" \
        in waiting.log()
    assert pending(engine) == 100 and old not in admin.list_topics(timeout=10).topics
    with engine.begin() as conn:  # the operator clears the record, as the README says
        conn.execute(text(f"UPDATE {LANES} SET transactional_id = NULL, progress_topic = NULL WHERE lane = 0"))
    drained(relays, database_url, engine, name="after", OUTBOX_BATCH_SIZE=40)
    report = ledger(engine, [topic])
    assert report.duplicates and not (report.lost or report.reordered), report.summary()  # the operator's choice


def test_a_lane_count_change_settles_work_left_under_other_kafka_names(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    """`lanes set` settles every lane before the count changes; a lane whose last owner died under another
    transactional.id prefix is settled under that one, not only under the command's own names."""
    backlog(engine, topic, 100)
    crashed = relays.start(database_url, name="crashed", OUTBOX_BATCH_SIZE=40, OUTBOX_FAULT_INJECTION="after_commit:1",
                           OUTBOX_TRANSACTIONAL_ID_PREFIX=f"first-{uuid.uuid4().hex[:8]}")
    assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    result = subprocess.run([sys.executable, "-m", "outbox_relay", "lanes", "set", "2", "--database-url",
                             database_url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(40 events recovered" in result.stdout and pending(engine) == 60, result.stdout  # before the change
    drained(relays, database_url, engine, name="after", OUTBOX_BATCH_SIZE=40)
    ledger_ok(engine, topic, "a crash under another prefix, then a lane-count change", 100)


def test_relays_that_name_the_database_differently_are_one_producer_in_kafka(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    """One outbox, two spellings of its database URL: one relay names the database in the URL, the
    next through libpq's PGDATABASE (or a PgBouncer alias, or `?dbname=`). Both reach the same
    database, the same outbox, the same lanes: they must be the same producer in Kafka (fencing) and
    read the same progress records, or a crash between the Kafka commit and the mark is published
    again by whoever takes the lane next."""
    name = make_url(database_url).database
    assert name
    elsewhere = database_url.rsplit("/", 1)[0]  # no database: libpq takes PGDATABASE
    backlog(engine, topic, 100)
    crashed = relays.start(database_url, name="crashed", OUTBOX_BATCH_SIZE=40,
                           OUTBOX_FAULT_INJECTION="after_commit:1")
    assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    assert pending(engine) == 100  # 40 of them in Kafka, none marked
    survivor = relays.start(elsewhere, name="survivor", OUTBOX_BATCH_SIZE=40, PGDATABASE=name)
    wait_until(lambda: pending(engine) == 0, 60, "the survivor to drain")
    survivor.stop()
    ledger_ok(engine, topic, "a crash after the commit, taken over through another spelling of the URL", 100)
    assert "recovered 40 events" in survivor.log(), survivor.log()
