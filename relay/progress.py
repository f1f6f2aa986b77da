"""Progress records: which outbox ids each Kafka transaction carried (exactly-once, after KIP-618).

Every transaction of a lane also writes one record to the progress topic (compacted, one
partition per lane, key ``lane-N``) naming the ids it carried, as ranges. It commits or aborts
with the events. Whoever takes a lane fences the old producer (``init_transactions``), then
reads the lane's last committed record and marks those ids sent before publishing anything, so
a crash between "Kafka committed" and "rows marked" never publishes a batch twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic  # type: ignore[attr-defined]

from outbox_relay.errors import BrokerUnavailable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def encode(lane: int, lane_count: int, ids: Iterable[int]) -> bytes:
    return json.dumps({"v": FORMAT_VERSION, "lane": lane, "lane_count": lane_count, "ids": to_ranges(ids)},
                      separators=(",", ":")).encode()


def decode_ids(value: bytes) -> list[int]:
    record = json.loads(value)
    return [i for start, end in record["ids"] for i in range(start, end + 1)]


def to_ranges(ids: Iterable[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 9, 10] -> [[1, 3], [7, 7], [9, 10]]: compact for the usual runs of ids."""
    ranges: list[list[int]] = []
    for i in sorted(ids):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ranges


def record_key(lane: int) -> bytes:
    return f"lane-{lane}".encode()


def ensure_topic(kafka_config: dict[str, Any], topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Create the compacted progress topic, or add partitions so every lane has its own."""
    admin = AdminClient(client_config(kafka_config))
    try:
        metadata = admin.list_topics(timeout=timeout)
        existing = metadata.topics.get(topic)
        if existing is None or existing.error is not None:
            futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                                    config={"cleanup.policy": "compact"})])
            try:
                futures[topic].result(timeout)
                log.info("created progress topic %s with %d partitions", topic, partitions,
                         extra={"action": "progress_topic_created", "topic": topic})
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        elif len(existing.partitions) < partitions:
            admin.create_partitions([NewPartitions(topic, partitions)])[topic].result(timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot prepare progress topic {topic!r}: {exc.args[0].str()}") from exc


def last_committed_ids(kafka_config: dict[str, Any], topic: str, lane: int, timeout: float = 30.0) -> list[int]:
    """The ids of the lane's last committed transaction (read_committed), or [] if it has none.

    Call only after ``init_transactions`` for the lane: that resolves any transaction still open,
    so everything up to the end of the partition is decided.
    """
    consumer = Consumer({
        **client_config(kafka_config),
        "group.id": f"outbox-relay-progress-{uuid.uuid4()}",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, lane), timeout=timeout)
        if high <= low:
            return []
        # Each transaction adds a record and a commit/abort marker; look back in growing windows.
        window = 64
        while True:
            start = max(low, high - window)
            last = _last_record(consumer, topic, lane, start, timeout)
            if last is not None or start == low:
                return decode_ids(last) if last is not None else []
            window *= 8
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot read progress of lane {lane}: {exc.args[0].str()}") from exc
    finally:
        consumer.close()


def _last_record(consumer: Consumer, topic: str, lane: int, start: int, timeout: float) -> bytes | None:
    consumer.assign([TopicPartition(topic, lane, start if start > 0 else OFFSET_BEGINNING)])
    last: bytes | None = None
    while True:
        message = consumer.poll(timeout)
        if message is None:
            raise BrokerUnavailable(f"no answer reading progress of lane {lane} within {timeout}s")
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return last
            raise KafkaException(error)
        if message.key() == record_key(lane) and message.value() is not None:
            last = message.value()


def client_config(kafka_config: dict[str, Any]) -> dict[str, Any]:
    """Connection and security settings only: producer tuning means nothing to an admin or consumer."""
    producer_only = {"enable.idempotence", "acks", "linger.ms", "compression.type", "transaction.timeout.ms",
                     "message.timeout.ms", "transactional.id", "batch.size", "batch.num.messages",
                     "queue.buffering.max.messages", "queue.buffering.max.kbytes", "retries",
                     "max.in.flight.requests.per.connection", "logger"}
    return {key: value for key, value in kafka_config.items() if key not in producer_only}
