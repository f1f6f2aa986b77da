"""Progress records: which outbox ids each Kafka transaction carried (exactly-once, after KIP-618).

Every transaction of a lane also writes one record to the progress topic (compacted, one
partition per lane, key ``lane-N``) naming the ids it carried, as ranges. It commits or aborts
with the events. Whoever takes a lane fences the old producer (``init_transactions``), then
reads the lane's committed records back from the newest and marks their ids sent until it
meets a record whose ids were all marked already (``recovery.recover``). PostgreSQL may lose
the marks of several transactions (an asynchronous standby promoted, a restore), never an older
one while keeping a newer one, so that record is where the missing marks end.

A record names its outbox (the durable identity ``migrate`` made), its lane and its lane count;
recovery trusts nothing else. ``min.compaction.lag.ms`` keeps a day of records uncompacted, so
the read-back finds every transaction whose marks a failover can have lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from outbox_relay.errors import BrokerUnavailable

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# The most ids one transaction may carry: the largest batch the relay accepts. It keeps a record
# (at most ~29 bytes an id with its fingerprints) far below Kafka's default 1 MB message limit.
MAX_RECORD_IDS = 10_000
FINGERPRINT_CHARS = 8  # 32 bits of the event's UUID per id, and 32 of its digest
_HEX = re.compile(r"[0-9a-f]*")
# Records younger than this are never compacted away: recovery can read back a day of transactions.
MIN_COMPACTION_LAG_MS = 24 * 3600 * 1000
TOPIC_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(MIN_COMPACTION_LAG_MS)}
_POLL_SLICE = 0.5  # seconds; a stop request is noticed within one slice
_NOT_ALLOWED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED})
# What a partition answers while its leader is being elected or its topic is still being made.
_LEADERSHIP_SETTLING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                                  KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION})


@dataclasses.dataclass(frozen=True)
class Scope:
    """Whose progress a record is: one lane of one outbox under one lane count."""

    outbox_id: str
    lane: int
    lane_count: int


class ForeignRecord(Exception):
    """A record in the lane's partition that is not this lane's progress under this lane count."""

    def __init__(self, reason: str, *, older_generation: bool = False) -> None:
        super().__init__(reason)
        # Written under another lane count or format: everything before it was settled when the
        # count or the relay changed, so reading back may stop there.
        self.older_generation = older_generation


def fingerprint(event_id: str) -> str:
    """Enough of an event's UUID to tell it from another event that got the same row id: its first 32
    bits and 32 bits of its SHA-256 digest (``matches`` compares it)."""
    return event_id[:FINGERPRINT_CHARS] + _digest(event_id)


def _digest(event_id: str) -> str:
    # A time-ordered UUID (version 7, 6, or an application's sequential ids) begins with its time: events
    # written in the same minute share their first 32 bits, which then tell nothing apart. The digest does.
    # Of the UUID's text (PostgreSQL's uuid::text and Python's str() agree: lowercase, with hyphens), which
    # costs a fifth of parsing it first. PostgreSQL: left(encode(sha256(convert_to(event_id::text, 'UTF8')), 'hex'), 8).
    return hashlib.sha256(event_id.encode()).hexdigest()[:FINGERPRINT_CHARS]


def matches(event_id: str, fingerprint: str) -> bool:
    """Whether an event is the one a record's fingerprint names; a record written before the digest was
    added carries the first 32 bits only."""
    prefix, digest = fingerprint[:FINGERPRINT_CHARS], fingerprint[FINGERPRINT_CHARS:]
    return event_id.startswith(prefix) and (not digest or _digest(event_id) == digest)


def encode(scope: Scope, events: Iterable[tuple[int, str]]) -> bytes:
    """A record of the (row id, event id) pairs one transaction carried.

    Row ids are compact (ranges) but not identities: a promoted standby that never received some rows
    hands their ids out again. So each id travels with its event's fingerprint, and recovery marks a
    row only when both match. The fingerprint's two halves travel apart: ``fp`` as relays before the
    digest wrote it (they still read these records, in a rolling upgrade), ``fd`` the digests.
    """
    pairs = sorted(events)
    prints = [fingerprint(e) for _, e in pairs]
    return json.dumps({"v": FORMAT_VERSION, "outbox": scope.outbox_id, "lane": scope.lane,
                       "lane_count": scope.lane_count, "ids": to_ranges(i for i, _ in pairs),
                       "fp": "".join(f[:FINGERPRINT_CHARS] for f in prints),
                       "fd": "".join(f[FINGERPRINT_CHARS:] for f in prints)}, separators=(",", ":")).encode()


def decode(value: bytes | None, scope: Scope) -> list[tuple[int, str]]:
    """The (row id, fingerprint) pairs a record of this scope carried, in id order; ForeignRecord for
    anything else, however malformed."""
    try:
        record = json.loads(value) if value is not None else None
    except ValueError:
        raise ForeignRecord("not a progress record (not JSON)") from None
    if not isinstance(record, dict):
        raise ForeignRecord("not a progress record")
    if record.get("v") == 1:
        raise ForeignRecord("a record of an earlier relay version", older_generation=True)
    if record.get("v") != FORMAT_VERSION:
        raise ForeignRecord(f"unknown progress record format {record.get('v')!r}")
    if record.get("outbox") != scope.outbox_id:
        raise ForeignRecord(f"a record of another outbox ({record.get('outbox')!r}, this is {scope.outbox_id!r})")
    if record.get("lane") != scope.lane:
        raise ForeignRecord(f"a record of lane {record.get('lane')!r} in the partition of lane {scope.lane}")
    if record.get("lane_count") != scope.lane_count:
        raise ForeignRecord(f"a record written under {record.get('lane_count')!r} lanes, now {scope.lane_count}",
                            older_generation=True)
    ids = sorted(from_ranges(record.get("ids")))
    prefixes, digests = record.get("fp"), record.get("fd", "")  # no "fd": written before the digest was added
    size = FINGERPRINT_CHARS * len(ids)
    if not (isinstance(prefixes, str) and len(prefixes) == size and _HEX.fullmatch(prefixes)
            and isinstance(digests, str) and len(digests) in (0, size) and _HEX.fullmatch(digests)):
        raise ForeignRecord("malformed progress record: fingerprints do not match the ids")
    return [(i, prefixes[n * FINGERPRINT_CHARS:(n + 1) * FINGERPRINT_CHARS]
             + digests[n * FINGERPRINT_CHARS:(n + 1) * FINGERPRINT_CHARS]) for n, i in enumerate(ids)]


def to_ranges(ids: Iterable[int]) -> list[int | list[int]]:
    """[1, 2, 3, 7, 9, 10] -> [[1, 3], 7, [9, 10]]: compact for runs of ids and for lone ones."""
    ranges: list[list[int]] = []
    for i in sorted(ids):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return [start if start == end else [start, end] for start, end in ranges]


def from_ranges(ranges: Any) -> list[int]:
    """The inverse of ``to_ranges``, refusing anything a relay cannot have written."""
    if not isinstance(ranges, list):
        raise ForeignRecord("malformed progress record: ids is not a list")
    ids: list[int] = []
    for item in ranges:
        start, end = (item, item) if _is_id(item) else (item if _is_range(item) else (0, -1))
        if not (_is_id(start) and _is_id(end) and start <= end):
            raise ForeignRecord(f"malformed progress record: {item!r} is not an id or a range of ids")
        if len(ids) + end - start + 1 > MAX_RECORD_IDS:
            raise ForeignRecord(f"malformed progress record: more than {MAX_RECORD_IDS} ids")
        ids.extend(range(start, end + 1))
    return ids


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63


def _is_range(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def record_key(lane: int) -> bytes:
    return f"lane-{lane}".encode()


def ensure_topic(kafka_config: dict[str, Any], topic: str, partitions: int, timeout: float = 30.0, *,
                 create: bool = True) -> None:
    """Create the compacted progress topic, or add partitions so every lane has its own.

    An existing topic that deletes records by age would drop the progress recovery relies on:
    refuse it with one line rather than publish without a safety net. ``create=False`` (a last owner's
    topic, read only to settle its work): a missing topic is refused too, never made again empty.
    """
    admin = AdminClient(client_config(kafka_config))
    try:
        metadata = admin.list_topics(timeout=timeout)
        existing = metadata.topics.get(topic)
        if (existing is None or existing.error is not None) and not create:
            raise BrokerUnavailable(
                f"progress topic {topic!r}, where the lane's last owner recorded its progress, is not in Kafka:"
                " its committed but unmarked transactions cannot be settled. If it is gone for good, clear the"
                " lane's record (transactional_id and progress_topic in the lanes table) to go on without it"
            )
        if existing is None or existing.error is not None:
            futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                                    config=TOPIC_CONFIG)])
            try:
                futures[topic].result(timeout)
                log.info("created progress topic %s with %d partitions", topic, partitions,
                         extra={"action": "progress_topic_created", "topic": topic})
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            return
        resource = ConfigResource("topic", topic)
        try:
            config = admin.describe_configs([resource])[resource].result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_ALLOWED:
                raise
            # A least-privilege principal may lack DescribeConfigs: say what to check, and go on.
            log.warning("cannot read the configuration of progress topic %s (%s): make sure it has"
                        " cleanup.policy=compact", topic, exc.args[0].str(),
                        extra={"action": "progress_topic_unchecked", "topic": topic})
            config = {}
        policy = config["cleanup.policy"].value if "cleanup.policy" in config else "compact"
        if policy != "compact":
            # Reported like any broker trouble (the lane backs off, its breaker says it once), since
            # an operator can fix the topic while the relay runs.
            raise BrokerUnavailable(
                f"progress topic {topic!r} has cleanup.policy={policy}: the relay needs 'compact' (records kept "
                "per lane); fix the topic or choose another with OUTBOX_PROGRESS_TOPIC"
            )
        if len(existing.partitions) < partitions:
            admin.create_partitions([NewPartitions(topic, partitions)])[topic].result(timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot prepare progress topic {topic!r}: {exc.args[0].str()}") from exc


def read_back(
    kafka_config: dict[str, Any], topic: str, lane: int, *, timeout: float = 30.0,
    stopping: threading.Event | None = None,
) -> Iterator[tuple[int, bytes | None]]:
    """The lane's committed records as (offset, value), newest first, read lazily in growing windows.

    Call only after ``init_transactions`` for the lane: that settles any transaction still open,
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
        low, end = _watermarks(consumer, TopicPartition(topic, lane), timeout, stopping)
        window = 64  # each transaction adds a record and a commit marker
        while end > low:
            start = max(low, end - window)
            yield from reversed(_read_range(consumer, topic, lane, start, end, timeout, stopping))
            end, window = start, window * 4
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot read progress of lane {lane}: {exc.args[0].str()}") from exc
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, partition: TopicPartition, timeout: float,
                stopping: threading.Event | None) -> tuple[int, int]:
    """The partition's offsets, waiting out a leader still being elected (a topic just created or moved)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=timeout)
            return int(low), int(high)
        except KafkaException as exc:
            settling = exc.args[0].retriable() or exc.args[0].code() in _LEADERSHIP_SETTLING
            if not settling or time.monotonic() > deadline or (stopping and stopping.is_set()):
                raise
            time.sleep(_POLL_SLICE)


def _read_range(consumer: Consumer, topic: str, lane: int, start: int, end: int, timeout: float,
                stopping: threading.Event | None) -> list[tuple[int, bytes | None]]:
    consumer.assign([TopicPartition(topic, lane, start if start > 0 else OFFSET_BEGINNING)])
    found: list[tuple[int, bytes | None]] = []
    deadline = time.monotonic() + timeout
    while True:
        if stopping is not None and stopping.is_set():
            raise BrokerUnavailable(f"stopped while reading the progress of lane {lane}")
        message = consumer.poll(_POLL_SLICE)
        if message is None:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"no answer reading progress of lane {lane} within {timeout}s")
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return found
            raise KafkaException(error)
        offset: int = message.offset() or 0
        if offset >= end:
            return found
        if message.key() == record_key(lane):
            found.append((offset, message.value()))


class LibrdkafkaLogger:
    """Routes librdkafka's own log lines into Python logging (never printed raw).

    ``quiet`` ones keep them at DEBUG and remember the last complaint, for a message of our own.
    """

    def __init__(self, quiet: bool = False) -> None:
        self._log = logging.getLogger("outbox_relay.librdkafka")
        self._quiet = quiet
        self.last_complaint = ""

    def log(self, level: int, message: str, *args: Any) -> None:
        # confluent-kafka hands over a Python logging level and ("%s [%s] %s", facility, client, text).
        if level >= logging.WARNING:
            text = str(args[-1]) if args else message
            self.last_complaint = text.rsplit(": ", 1)[-1] if "]: " in text else text
        self._log.log(level if not self._quiet else logging.DEBUG, message, *args)


def client_config(kafka_config: dict[str, Any]) -> dict[str, Any]:
    """Connection and security settings only: producer tuning means nothing to an admin or consumer."""
    producer_only = {"enable.idempotence", "acks", "linger.ms", "compression.type", "transaction.timeout.ms",
                     "message.timeout.ms", "transactional.id", "batch.size", "batch.num.messages",
                     "queue.buffering.max.messages", "queue.buffering.max.kbytes", "retries",
                     "max.in.flight.requests.per.connection", "message.max.bytes"}
    return {"logger": LibrdkafkaLogger(quiet=True),
            **{key: value for key, value in kafka_config.items() if key not in producer_only}}
