"""Poison events: parked with a readable error, the rest published, same-key successors held."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
from sqlalchemy import Engine, text

from outbox_relay import enqueue, progress
from outbox_relay.db.lanes import Row
from outbox_relay.publisher import LanePublisher, PoisonEvent
from tests import kafkatools
from tests.pgtools import EVENT_STATES, EVENTS
from tests.relaytools import ROOT, Relays, cli, wait_until


def rows_by_value(engine: Engine) -> dict[bytes, tuple[int, str, int, str | None]]:
    with engine.connect() as conn:
        result = conn.execute(text(f"SELECT id, value, state, attempts, last_error FROM {EVENT_STATES}"))
        return {_label(value): (row_id, state, attempts, error) for row_id, value, state, attempts, error in result}


def _label(value: bytes) -> bytes:
    """The readable prefix of a test value (before its random padding)."""
    return value.split(b"|")[0]


def operator(database_url: str, *args: str) -> str:
    """What an operator's command prints (it must succeed)."""
    return cli(database_url, *args, check=True).stdout


def test_poison_events_are_parked_and_the_rest_flows(engine: Engine, database_url: str, relays: Relays) -> None:
    topic = kafkatools.create_topic(f"poison-{uuid.uuid4().hex[:12]}", partitions=3,
                                    config={"max.message.bytes": "2000"})
    with engine.begin() as conn:
        enqueue(conn, topic, b"a1", key="A")
        enqueue(conn, topic, b"a2-too-large|" + os.urandom(5000), key="A")  # over the topic's 2000, even compressed
        enqueue(conn, topic, b"a3-held", key="A")
        enqueue(conn, topic, b"b1", key="B")
        enqueue(conn, topic, b"c1-bad-partition", key="C", partition=99)
        enqueue(conn, topic, b"b2", key="B")
        # Past the write API, straight into the table: larger than the producer accepts at all.
        conn.execute(text(f"INSERT INTO {EVENTS} (topic, key, value) VALUES (:t, 'D', :v)"),
                     {"t": topic, "v": b"d1-huge|" + os.urandom(1_100_000)})
    relay = relays.start(database_url, OUTBOX_MAX_ATTEMPTS=2)
    wait_until(lambda: rows_by_value(engine)[b"c1-bad-partition"][1] == "failed", 60, "the bad partition parked")
    wait_until(lambda: rows_by_value(engine)[b"b2"][1] == "sent", 30, "b2 sent")
    rows = rows_by_value(engine)
    assert {value: state for value, (_, state, _, _) in rows.items()} == {
        b"a1": "sent", b"a2-too-large": "failed", b"a3-held": "pending", b"b1": "sent",
        b"c1-bad-partition": "failed", b"b2": "sent", b"d1-huge": "failed",
    }
    too_large = rows[b"a2-too-large"]
    assert too_large[2] == 1 and "MSG_SIZE_TOO_LARGE" in too_large[3]  # parked at once: it cannot heal
    assert rows[b"c1-bad-partition"][2] == 2 and "UNKNOWN_PARTITION" in rows[b"c1-bad-partition"][3]
    assert "MSG_SIZE_TOO_LARGE" in rows[b"d1-huge"][3]
    listing = operator(database_url, "failed", "list")
    assert listing.count(" failed  topics: ") == 3 and "UNKNOWN_PARTITION" in listing

    # The operator raises the topic's limit and retries the parked event: it and its held successor go out.
    client = kafkatools.admin()
    resource = ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("max.message.bytes", "10000", incremental_operation=AlterConfigOpType.SET)])
    client.incremental_alter_configs([resource])[resource].result(30)
    assert "would change 1" in operator(database_url, "failed", "retry", "--id", str(too_large[0]), "--dry-run")
    assert "changed 1" in operator(database_url, "failed", "retry", "--id", str(too_large[0]))
    wait_until(lambda: rows_by_value(engine)[b"a3-held"][1] == "sent", 30, "the held successor sent")
    assert "changed 1" in operator(database_url, "failed", "discard", "--id", str(rows[b"c1-bad-partition"][0]))
    relay.stop()
    received = kafkatools.consume([topic], expected=5, quiet=1.0)
    by_key: dict[bytes, list[bytes]] = {}
    for message in sorted(received, key=lambda m: (m.partition, m.offset)):
        by_key.setdefault(message.key, []).append(_label(message.value))
    assert by_key == {b"A": [b"a1", b"a2-too-large", b"a3-held"], b"B": [b"b1", b"b2"]}
    assert "parked event" in relay.log()


def test_a_topic_kafka_will_not_create_parks_its_event_and_names_the_topic(
        engine: Engine, database_url: str, relays: Relays) -> None:
    """`pay.ments` collides with an existing `pay_ments` ('.' and '_' are alike to Kafka), so the broker never
    creates it, as with auto.create.topics.enable off. librdkafka keeps such a message queued for up to
    topic.metadata.propagation.max.ms (30 s): with OUTBOX_KAFKA_TIMEOUT under that, every attempt was "1
    messages not acknowledged", blamed on Kafka (its breaker opened), the producer replaced, and the event
    never parked: its lane stalled for good. Now a timed-out flush asks the broker, and a topic it does not
    have is the event's failure, counted and parked like any other."""
    suffix = uuid.uuid4().hex[:8]
    kafkatools.create_topic(f"pay_{suffix}", partitions=1)
    elsewhere = kafkatools.create_topic(f"ok-{suffix}", partitions=1)
    with engine.begin() as conn:
        enqueue(conn, f"pay.{suffix}", b"missing-topic", key="A")
        enqueue(conn, elsewhere, b"held", key="A")
        enqueue(conn, elsewhere, b"other-key", key="B")
    relay = relays.start(database_url, OUTBOX_MAX_ATTEMPTS=2, OUTBOX_KAFKA_TIMEOUT=5, OUTBOX_BACKOFF_MAX=0.5)
    wait_until(lambda: rows_by_value(engine)[b"missing-topic"][1] == "failed", 90, "the event to be parked")
    relay.stop()
    rows = rows_by_value(engine)
    assert rows[b"missing-topic"][2] == 2, rows
    assert f"topic 'pay.{suffix}' is not in Kafka" in (rows[b"missing-topic"][3] or ""), rows
    assert rows[b"held"][1] == "pending" and rows[b"other-key"][1] == "sent", rows
    log = relay.log()
    assert "circuit open" not in log, log[-3000:]  # the event's failure, not Kafka's


def test_a_missing_topic_leaves_the_producer_able_to_publish_the_next_batch(restores_services: None) -> None:
    """A timed-out flush with a topic Kafka lacks used purge() on every queue: messages of existing topics
    still queued (the broker paused, then back in time to answer list_topics) left a gap in their partition's
    idempotence sequence, so the next transaction failed with OUT_OF_ORDER_SEQUENCE_NUMBER and its abort
    replaced the producer. Now the others settle and abort_transaction drops the held message itself."""
    suffix = uuid.uuid4().hex[:8]
    kafkatools.create_topic(f"pay_{suffix}", partitions=1)
    good = kafkatools.create_topic(f"good-{suffix}", partitions=3)
    # One message per request: with 5 requests in flight per partition, the rest of the batch stays queued.
    config = {"bootstrap.servers": kafkatools.bootstrap(), "enable.idempotence": True, "acks": "all",
              "batch.num.messages": 1}
    publisher = LanePublisher(config, f"missing-{suffix}.lane-0", scope=progress.Scope(str(uuid.uuid4()), 0, 1),
                              progress_topic=f"missing-{suffix}.progress", operation_timeout=3)
    publisher.start()
    ids = iter(range(1, 1000))

    def rows(topic: str, count: int) -> list[Row]:
        return [Row(next(ids), uuid.uuid4(), topic, f"k{i % 6}".encode(), b"v", [], [], None, 0,
                    dt.datetime.now(dt.UTC)) for i in range(count)]

    try:
        publisher.publish(rows(good, 6))
        batch = rows(good, 30) + rows(f"pay.{suffix}", 1) + rows(good, 30)
        # Signalled directly: a `scripts/services resume` starting Python on a loaded machine came late.
        kafka = int((Path(os.environ.get("OUTBOX_SERVICES_DIR", ROOT / ".services")) / "kafka" / "kafka.pid")
                    .read_text())
        os.kill(kafka, signal.SIGSTOP)
        # After the flush's 3 s, early in list_topics' own 3 s: back in time to say the topic is missing.
        resume = threading.Timer(3.5, os.kill, (kafka, signal.SIGCONT))
        resume.start()
        with pytest.raises(PoisonEvent, match=f"topic 'pay.{suffix}' is not in Kafka"):
            publisher.publish(batch)
        resume.join()
        publisher.publish(rows(good, 12))  # was ProducerFailed: skipped sequence numbers
    finally:
        publisher.close()
