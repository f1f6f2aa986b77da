"""The relay's sessions with the other systems (issue 11, item 10), against the real services: a
lane's statements give up on a lock; a publisher closed mid-transaction aborts it, so read_committed
consumers are not held up until the transaction's timeout; a transaction that timed out is not
taken for fencing; a topic the broker's ACLs deny is retried (the ACL may not have propagated yet)
and parked only after the attempt budget.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    OffsetSpec,
    ResourcePatternType,
    ResourceType,
)
from sqlalchemy import Engine, text

from outbox_relay import enqueue, faults, progress
from outbox_relay.config import Settings
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Row, Store
from outbox_relay.errors import DatabaseUnavailable
from outbox_relay.publisher import LanePublisher
from tests import kafkatools
from tests.pgtools import EVENT_STATES, EVENTS
from tests.relaytools import Relays, ledger, pending, set_lane_count, states, wait_until


def test_a_lane_statement_gives_up_on_a_lock_instead_of_hanging(database_url: str) -> None:
    """An operator's `LOCK TABLE` (or a migration) must not hang a lane: its claim fails in lock_timeout."""
    with connect(database_url, lane=True) as lane, psycopg.connect(conninfo(database_url)) as operator:
        assert lane.execute("SHOW statement_timeout").fetchone() == ("30s",)
        assert lane.execute("SHOW lock_timeout").fetchone() == ("10s",)
        operator.execute(f"LOCK TABLE {EVENTS} IN ACCESS EXCLUSIVE MODE")  # held until the block ends
        with pytest.raises(DatabaseUnavailable) as caught:
            Store().claim(lane, 0, 1, 10)
        assert isinstance(caught.value.__cause__, psycopg.errors.LockNotAvailable)


class _Crash(Exception):
    """Stands for anything that ends a tick between the flush and the commit."""


def test_closing_a_publisher_mid_transaction_aborts_it(topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise the partition's last stable offset stays behind the open transaction and read_committed
    consumers see nothing newer until transaction.timeout.ms, set here to 15 minutes: only the
    publisher's own abort can let them through within this test."""
    settings = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u@h/db",
                                          "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafkatools.bootstrap(),
                                          "OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS": "900000"})
    names = settings.kafka_names(str(uuid.uuid4()))
    publisher = LanePublisher.for_lane(settings, names, progress.Scope(names.outbox_id, 0, 1))
    publisher.start()
    row = Row(1, uuid.uuid4(), topic, b"k", b"v", [], [], 0, 0, dt.datetime.now(dt.UTC))

    def crash_before_commit(point: str) -> None:
        if point == "before_commit":
            raise _Crash(point)

    monkeypatch.setattr(faults, "hit", crash_before_commit)
    with pytest.raises(_Crash):
        publisher.publish([row])  # produced and flushed: the event sits in the log, its transaction open
    partition = TopicPartition(topic, 0)
    assert stable_offset(partition) == 0 < high_watermark(partition)
    publisher.close()
    wait_until(lambda: stable_offset(partition) == high_watermark(partition), 60,
               "the abort marker to release read_committed consumers")


def _latest(partition: TopicPartition, isolation: IsolationLevel) -> int:
    client = kafkatools.admin()  # kept until the answer came: a dropped client cancels its requests
    result = client.list_offsets({partition: OffsetSpec.latest()}, isolation_level=isolation, request_timeout=10)
    return int(result[partition].result(15).offset)


def stable_offset(partition: TopicPartition) -> int:
    """The last stable offset: how far a read_committed consumer may read."""
    return _latest(partition, IsolationLevel.READ_COMMITTED)


def high_watermark(partition: TopicPartition) -> int:
    return _latest(partition, IsolationLevel.READ_UNCOMMITTED)


def test_a_transaction_that_times_out_is_not_taken_for_fencing(engine: Engine, database_url: str, topic: str,
                                                               relays: Relays) -> None:
    """A tick stalls between flush and commit for longer than transaction.timeout.ms (3 s) plus the
    coordinator's sweep for timed-out transactions (every 10 s): the coordinator aborts the transaction
    and bumps the producer's epoch. The lane's lock is still this relay's, so nobody fenced it: it
    starts a new producer and keeps the lane, rather than step back as if another relay owned it."""
    with engine.begin() as conn:
        for n in range(20):
            enqueue(conn, topic, {"n": n}, key=f"k{n % 4}")
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=5, OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=3000,
                         OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS=3000, OUTBOX_FAULT_INJECTION="before_commit:1:stall=20")
    wait_until(lambda: pending(engine) == 0, 120, "the relay to publish everything after the stall")
    relay.stop()
    log = relay.log()
    assert "lost its epoch" in log, log[-3000:]
    assert "fenced on lane" not in log and "released lane" in log and log.count("took lane 0") == 1, log[-3000:]
    report = ledger(engine, [topic])
    assert report.ok, report.summary()


# --- a topic denied by the broker's ACLs (the services' broker runs StandardAuthorizer) --------------


@pytest.fixture
def denied_topic(services: None) -> Iterator[str]:
    """A fresh topic that User:ANONYMOUS (every client of the test broker) may not write to, until
    `allow_writes`; the ACL is removed at teardown whatever the test did."""
    name = kafkatools.create_topic(f"denied-{uuid.uuid4().hex[:12]}", partitions=1)
    client = kafkatools.admin()
    deny = AclBinding(ResourceType.TOPIC, name, ResourcePatternType.LITERAL, "User:ANONYMOUS", "*",
                      AclOperation.WRITE, AclPermissionType.DENY)
    client.create_acls([deny])[deny].result(30)
    # The broker answers from the metadata its authorizer reads: once listed, the ACL is in force.
    wait_until(lambda: client.describe_acls(_acls_of(name)).result(30), 30, "the DENY ACL to be in force")
    yield name
    allow_writes(name)


def _acls_of(topic: str) -> AclBindingFilter:
    return AclBindingFilter(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, None, None,
                            AclOperation.ANY, AclPermissionType.ANY)


def allow_writes(topic: str) -> None:
    """Delete the topic's ACLs: with none left, the broker allows everyone again."""
    client = kafkatools.admin()
    acls = _acls_of(topic)
    client.delete_acls([acls])[acls].result(30)
    wait_until(lambda: not client.describe_acls(acls).result(30), 30, "the ACL to be gone")


def keys_in_lane(lane: int, lanes: int, count: int, prefix: str) -> list[str]:
    """Keys whose events go to `lane` (the lane key is md5-based: models.outbox.LANE_KEY_SQL)."""
    keys: list[str] = []
    n = 0
    while len(keys) < count:
        key = f"{prefix}{n}"
        if (int(hashlib.md5(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF) % lanes == lane:
            keys.append(key)
        n += 1
    return keys


def events_of(engine: Engine, topic: str) -> list[tuple[str, int, str | None]]:
    """(state, attempts, last_error) of the topic's events, in id order."""
    with engine.connect() as conn:
        result = conn.execute(
            text(f"SELECT state, attempts, last_error FROM {EVENT_STATES} WHERE topic = :t ORDER BY id"), {"t": topic})
        return [(state, attempts, error) for state, attempts, error in result]


def test_a_topic_denied_by_an_acl_is_retried_until_the_acl_goes_then_sent_once(
        engine: Engine, database_url: str, denied_topic: str, topic: str, relays: Relays) -> None:
    """TOPIC_AUTHORIZATION_FAILED may heal (an ACL granted a moment later, or one removed): the
    events stay pending while their attempts grow, and go out once the broker allows the write.
    Meanwhile the other topic's events, on the other lane, flow. (A lane retries its batch as a
    whole: events behind the denied one in its own lane wait for it, as behind any retried event.)"""
    set_lane_count(engine, 2)
    denied_keys = keys_in_lane(0, 2, 2, "denied-")
    other_keys = keys_in_lane(1, 2, 3, "other-")
    with engine.begin() as conn:
        for n in range(12):
            enqueue(conn, topic, {"n": n}, key=other_keys[n % 3])
            if n % 3 == 0:
                enqueue(conn, denied_topic, {"n": n}, key=denied_keys[n % 2])
        lanes = conn.execute(text(f"SELECT DISTINCT topic, lane_key % 2 FROM {EVENTS}")).all()
    assert sorted(lanes) == sorted([(denied_topic, 0), (topic, 1)])
    relay = relays.start(database_url, OUTBOX_MAX_ATTEMPTS=1000)

    wait_until(lambda: {state for state, _, _ in events_of(engine, topic)} == {"sent"}, 60,
               "the other topic's events sent")
    # The lane's first denied event fails each retry, and the lane's events behind it wait for it.
    def retried_or_parked() -> bool:  # parked: the assertion below says so rather than a timeout
        state, attempts, _ = events_of(engine, denied_topic)[0]
        return state != "pending" or attempts >= 3

    wait_until(retried_or_parked, 60, "the denied event's attempts to grow")
    denied = events_of(engine, denied_topic)
    assert {state for state, _, _ in denied} == {"pending"}, denied  # retried, not parked
    assert "TOPIC_AUTHORIZATION_FAILED" in str(denied[0][2]), denied

    allow_writes(denied_topic)
    wait_until(lambda: pending(engine) == 0, 60, "the denied events sent once the ACL is gone")
    relay.stop()
    assert states(engine) == {"sent": 16}
    report = ledger(engine, [topic, denied_topic])
    assert report.ok, report.summary()
    assert "failed (attempt" in relay.log() and "parked event" not in relay.log()


def test_a_topic_that_stays_denied_parks_its_event_after_the_attempt_budget(
        engine: Engine, database_url: str, denied_topic: str, topic: str, relays: Relays) -> None:
    """The ACL stays: the event is retried up to OUTBOX_MAX_ATTEMPTS, then parked with the broker's
    error, and the events behind it in its lane (another key) go out."""
    with engine.begin() as conn:
        enqueue(conn, denied_topic, b"denied", key="A")
        enqueue(conn, topic, b"after", key="B")
    relay = relays.start(database_url, OUTBOX_MAX_ATTEMPTS=3)
    wait_until(lambda: events_of(engine, denied_topic)[0][0] == "failed", 60, "the denied event parked")
    wait_until(lambda: events_of(engine, topic)[0][0] == "sent", 30, "the event behind it sent")
    relay.stop()
    (state, attempts, error), = events_of(engine, denied_topic)
    assert attempts == 3 and "TOPIC_AUTHORIZATION_FAILED" in str(error), (state, attempts, error)
    assert relay.log().count("failed (attempt") == 2 and "parked event" in relay.log()
    report = ledger(engine, [topic, denied_topic])
    assert report.ok, report.summary()
