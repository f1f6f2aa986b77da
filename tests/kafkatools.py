"""Test helpers that talk to the real Kafka broker: topics and a read_committed ledger reader."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def bootstrap() -> str:
    return os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]


def admin() -> AdminClient:
    # Notices and up: librdkafka's info line about events left in a discarded handle's queue
    # ("Purging 1 unserved events from background queue") is not news in a test or bench log.
    return AdminClient({"bootstrap.servers": bootstrap(), "log_level": 5})


def create_topic(name: str, partitions: int = 3, config: dict[str, str] | None = None) -> str:
    client = admin()  # must outlive the future, or the handle is destroyed before the answer
    futures = client.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                             config=config or {})])
    futures[name].result(30)
    return name


@dataclasses.dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def event_id(self) -> str | None:
        value = dict(self.headers).get("outbox-event-id")
        return value.decode() if value is not None else None


def consume(topics: list[str], *, expected: int, timeout: float = 60.0, quiet: float = 2.0,
            isolation: str = "read_committed") -> list[Received]:
    """Read from the beginning until `expected` messages came and `quiet` seconds pass with no more.

    Waiting past `expected` is what lets a test see duplicates instead of stopping just before them.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap(),
        "group.id": f"test-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    # assign() instead of subscribe(): no consumer-group rebalance to wait for.
    assignment = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
    consumer.assign(assignment)
    received: list[Received] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                if len(received) >= expected and time.monotonic() - last >= quiet:
                    break
                continue
            if message.error():
                if message.error().code() == message.error().UNKNOWN_TOPIC_OR_PART:
                    continue
                raise KafkaException(message.error())
            last = time.monotonic()
            received.append(Received(message.topic(), message.partition(), message.offset(), message.key(),
                                     message.value(), list(message.headers() or [])))
    finally:
        consumer.close()
    return received

