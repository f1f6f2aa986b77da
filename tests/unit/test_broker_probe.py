"""The broker probe's judgement of in-sync replicas, on metadata as librdkafka returns it (no Kafka)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from outbox_relay.broker import TRANSACTION_LOG, BrokerProbe, java_string_hash, transaction_log_partition
from outbox_relay.config import Settings
from outbox_relay.metrics import Metrics

SETTINGS = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u@h/db",
                                      "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"})
PROGRESS = "outbox-relay.db.outbox.events.0123456789ab.progress"


def topic(isrs: list[list[int]]) -> SimpleNamespace:
    return SimpleNamespace(partitions={n: SimpleNamespace(id=n, replicas=[1, 2, 3], isrs=isr)
                                       for n, isr in enumerate(isrs)})


def probe() -> tuple[BrokerProbe, Metrics]:
    metrics = Metrics()
    broker = BrokerProbe(SETTINGS, metrics)
    broker.progress_topic = PROGRESS
    broker._min_isr = {TRANSACTION_LOG: 2, PROGRESS: 2}  # what describe_configs would say
    return broker, metrics


def test_java_string_hash_places_transactional_ids_as_kafka_does() -> None:
    # Java: "hello".hashCode() == 99162322; "polygenelubricants".hashCode() == Integer.MIN_VALUE.
    assert java_string_hash("hello") == 99162322 and java_string_hash("") == 0
    assert transaction_log_partition("polygenelubricants", 50) == 0  # Kafka's Utils.abs(MIN_VALUE) is 0
    assert transaction_log_partition("hello", 50) == 99162322 % 50


def test_partitions_below_min_isr_are_said_once_block_their_lanes_and_clear(caplog: pytest.LogCaptureFixture) -> None:
    broker, metrics = probe()
    log_partition = transaction_log_partition("tx.lane-1", 3)
    healthy = {TRANSACTION_LOG: topic([[1, 2, 3]] * 3), PROGRESS: topic([[1, 2, 3], [1, 2]])}
    short_log = [[1, 2, 3]] * 3
    short_log[log_partition] = [1]
    outage = {TRANSACTION_LOG: topic(short_log), PROGRESS: topic([[1, 2, 3], [1]])}
    caplog.set_level(logging.INFO, "outbox_relay.broker")

    broker._check_replicas(healthy)  # one replica behind is not below min ISR
    assert not broker.replicas_problem and not broker.blocks(1, "tx.lane-1")
    for _ in range(3):
        broker._check_replicas(outage)
    assert broker.blocks(1, "tx.lane-1")  # its progress partition and its coordinator's log partition
    assert broker.blocks(0, "tx.lane-1")  # its coordinator's log partition only
    assert transaction_log_partition("tx.lane-0", 3) != log_partition
    assert not broker.blocks(0, "tx.lane-0")  # neither of its partitions is short
    assert metrics.below_min_isr._value.get() == 2
    assert broker.replicas_problem.startswith("Kafka below min.insync.replicas: 2 partitions")
    said = [r.getMessage() for r in caplog.records if "min.insync.replicas" in r.getMessage()]
    assert len(said) == 1 and f"{TRANSACTION_LOG}-{log_partition}: 1 of the 2 required" in said[0]

    broker._check_replicas(healthy)
    assert not broker.replicas_problem and not broker.blocks(1, "tx.lane-1")
    assert metrics.below_min_isr._value.get() == 0
    assert "in-sync replicas back" in caplog.records[-1].getMessage()


def test_java_string_hash_matches_java() -> None:
    # Java: "".hashCode() == 0, "a".hashCode() == 97, "hello".hashCode() == 99162322,
    # "polygenelubricants".hashCode() == Integer.MIN_VALUE (Kafka's Utils.abs maps it to 0).
    assert java_string_hash("") == 0 and java_string_hash("a") == 97 and java_string_hash("hello") == 99162322
    assert java_string_hash("polygenelubricants") == -(1 << 31)
