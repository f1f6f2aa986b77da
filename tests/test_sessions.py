"""The relay's sessions with the other systems (issue 11, item 10), against the real services: a
lane's statements give up on a lock; a publisher closed mid-transaction aborts it, so read_committed
consumers are not held up until the transaction's timeout; a transaction that timed out is not
taken for fencing.
"""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import OffsetSpec
from sqlalchemy import Engine

from outbox_relay import enqueue, faults, progress
from outbox_relay.config import Settings
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Row, Store
from outbox_relay.errors import DatabaseUnavailable
from outbox_relay.publisher import LanePublisher
from tests import kafkatools
from tests.pgtools import EVENTS
from tests.relaytools import Relays, ledger, pending, wait_until


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
