"""The ledger check: compare what the outbox table committed with what Kafka holds.

Given the table's rows and the messages a read_committed consumer saw, it reports events lost
(committed, not in Kafka), duplicated (one event id more than once), reordered (a key's events
out of id order within one partition of one topic: the only order a consumer can see), unknown
(in Kafka, but no row produced it), rows marked sent that Kafka lacks, and rows parked as failed
or discarded that Kafka has nevertheless (retrying them would publish them twice).

Retention removes events on both sides, each on its own clock: the outbox deletes sent rows after
OUTBOX_RETENTION_HOURS, Kafka deletes old messages after the topic's retention. An event whose row or
message retention may have deleted is reported as such, not as unknown or lost (see ``Retained``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any


@dataclasses.dataclass(frozen=True)
class LedgerRow:
    id: int
    event_id: str
    topic: str
    key: bytes | None
    state: str
    created_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class LedgerMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    event_id: str | None
    timestamp: dt.datetime | None = None  # when it was produced (or appended, by the topic's setting)


# The relay's clock stamps a message, PostgreSQL's the row and its batch: they may disagree by this much.
CLOCK_MARGIN = dt.timedelta(minutes=1)


@dataclasses.dataclass(frozen=True)
class Retained:
    """Where retention may have deleted events, on either side.

    ``outbox_since``: the outbox deletes sent batches oldest first, so every deleted row was sent no later
    than the oldest batch it kept (or than the retention ago, when it kept none); a message older than that
    may be an event whose row is gone.

    ``kafka_since``, per topic: a partition whose log starts past offset 0 lost its oldest messages to the
    topic's retention, up to its first message kept (or now, when it kept none); an event created before
    that may have been among them.
    """

    outbox_since: dt.datetime | None = None
    kafka_since: Mapping[str, dt.datetime] = dataclasses.field(default_factory=dict)

    def row_deleted(self, message: LedgerMessage) -> bool:
        return (self.outbox_since is not None and message.timestamp is not None
                and message.timestamp <= self.outbox_since + CLOCK_MARGIN)

    def message_deleted(self, row: LedgerRow) -> bool:
        since = self.kafka_since.get(row.topic)
        return since is not None and row.created_at is not None and row.created_at < since + CLOCK_MARGIN


@dataclasses.dataclass
class LedgerReport:
    committed: int
    received: int
    lost: list[str]
    duplicates: dict[str, int]
    reordered: list[tuple[bytes, str, str]]
    unknown: list[str]
    sent_but_missing: list[str]
    parked_but_published: list[str] = dataclasses.field(default_factory=list)
    # Pending rows not in Kafka yet (claimable, delayed, held) when they are not counted as lost: no violation.
    pending: list[str] = dataclasses.field(default_factory=list)
    # Retention's work, no violation either: messages whose rows the outbox deleted, rows whose messages Kafka did.
    row_deleted: list[str] = dataclasses.field(default_factory=list)
    message_deleted: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.reordered or self.unknown or self.sent_but_missing
                    or self.parked_but_published)

    @property
    def duplicate_count(self) -> int:
        return sum(n - 1 for n in self.duplicates.values())

    def summary(self) -> str:
        return (f"committed={self.committed} received={self.received} lost={len(self.lost)} "
                f"duplicated={self.duplicate_count} reordered={len(self.reordered)} unknown={len(self.unknown)} "
                f"sent_but_missing={len(self.sent_but_missing)} parked_but_published={len(self.parked_but_published)}")


def check(
    rows: Iterable[LedgerRow], messages: Iterable[LedgerMessage], *, expect_all_sent: bool = True,
    retained: Retained = Retained(),
) -> LedgerReport:
    """Compare the table with Kafka. With ``expect_all_sent`` every pending row also counts as lost."""
    rows = list(rows)
    messages = sorted(messages, key=lambda m: (m.topic, m.partition, m.offset))
    by_event = {row.event_id: row for row in rows}
    counts = Counter(m.event_id for m in messages if m.event_id is not None)
    missing: list[LedgerRow] = []  # rows Kafka lacks, but those whose message its retention deleted
    message_deleted: list[str] = []
    for r in rows:
        if r.event_id not in counts:
            if r.state == "sent" and retained.message_deleted(r):
                message_deleted.append(r.event_id)
            else:
                missing.append(r)
    # Failed and discarded rows were parked on purpose; pending ones are lost once all should be sent.
    lost = [r.event_id for r in missing if r.state == "sent" or (expect_all_sent and r.state == "pending")]
    sent_but_missing = [r.event_id for r in missing if r.state == "sent"]
    pending = [] if expect_all_sent else [r.event_id for r in missing if r.state == "pending"]
    unknown: list[str] = []  # messages no row produced, but those whose row the outbox's retention deleted
    row_deleted: dict[str, None] = {}  # each event id once, in order
    for m in messages:
        if m.event_id is not None and m.event_id in by_event:
            continue
        if m.event_id is not None and retained.row_deleted(m):
            row_deleted[m.event_id] = None
        else:
            unknown.append(m.event_id or f"{m.topic}/{m.partition}@{m.offset}")
    parked_but_published = [r.event_id for r in rows if r.state in ("failed", "discarded") and r.event_id in counts]
    # Order is judged per stream, (topic, partition), and per key in it: a key's events on two topics,
    # or on two partitions (an explicit partition=), have no order between them that anyone can see.
    # Within a stream, the first sighting of each event must follow id order.
    first_seen: dict[tuple[str, int, bytes], list[LedgerRow]] = defaultdict(list)
    seen: set[tuple[str, int, str]] = set()
    for message in messages:
        row = by_event.get(message.event_id or "")
        if row is None or row.key is None or (message.topic, message.partition, row.event_id) in seen:
            continue
        seen.add((message.topic, message.partition, row.event_id))
        first_seen[(message.topic, message.partition, row.key)].append(row)
    reordered = [
        (key, earlier.event_id, later.event_id)
        for (_topic, _partition, key), sequence in first_seen.items()
        for earlier, later in pairwise(sequence)
        if later.id < earlier.id
    ]
    return LedgerReport(
        committed=len(rows),
        received=len(messages),
        lost=lost,
        duplicates={event_id: n for event_id, n in counts.items() if n > 1},
        reordered=reordered,
        unknown=unknown,
        sent_but_missing=sent_but_missing,
        parked_but_published=parked_but_published,
        pending=pending,
        row_deleted=list(row_deleted),
        message_deleted=message_deleted,
    )


def unknown_event_ids(rows: Iterable[LedgerRow], messages: Iterable[LedgerMessage]) -> list[uuid.UUID]:
    """The event ids in Kafka that none of ``rows`` has (junk that is no UUID left out): rows committed and
    published after ``rows`` were read, unless the table has none of them either."""
    known = {row.event_id for row in rows}
    found: set[uuid.UUID] = set()
    for message in messages:
        if message.event_id is not None and message.event_id not in known:
            try:
                found.add(uuid.UUID(message.event_id))
            except ValueError:
                pass  # reported as unknown
    return sorted(found)


@dataclasses.dataclass
class KafkaRead:
    messages: list[LedgerMessage]
    # Per topic whose retention deleted messages: the oldest time a deleted message may have (see Retained).
    deleted_until: dict[str, dt.datetime]


def read_topics(kafka_config: dict[str, Any], topics: Iterable[str], timeout: float = 30.0) -> KafkaRead:
    """Everything committed in the topics (read_committed), from the beginning to the current end."""
    from confluent_kafka import (
        OFFSET_BEGINNING,
        TIMESTAMP_NOT_AVAILABLE,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    from outbox_relay.progress import client_config
    from outbox_relay.publisher import EVENT_ID_HEADER

    consumer = Consumer({**client_config(kafka_config), "group.id": f"outbox-relay-verify-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    messages: list[LedgerMessage] = []
    first_kept: dict[tuple[str, int], dt.datetime] = {}
    try:
        assignment = []
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
            if metadata.error is not None:
                continue  # a topic that no longer exists holds nothing to compare
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        # Read up to the end each partition has now. PARTITION_EOF alone never comes while a relay keeps
        # publishing: a transaction is always in flight, and read_committed stops short of it.
        watermarks = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
                      for tp in assignment}
        consumer.assign(assignment)
        open_partitions = {(tp.topic, tp.partition) for tp in assignment}
        while open_partitions:
            message = consumer.poll(timeout)
            if message is None:
                raise TimeoutError(f"no answer from Kafka within {timeout}s; still reading {sorted(open_partitions)}")
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard((message.topic(), message.partition()))
                    continue
                raise KafkaException(error)
            event_id = dict(message.headers() or []).get(EVENT_ID_HEADER)
            key = message.key()
            kind, ms = message.timestamp()
            stamp = None if kind == TIMESTAMP_NOT_AVAILABLE else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
            messages.append(LedgerMessage(
                str(message.topic()), int(message.partition() or 0), int(message.offset() or 0),
                key.encode() if isinstance(key, str) else key,
                event_id.decode() if isinstance(event_id, bytes) else event_id,
                stamp,
            ))
            if stamp is not None:
                first_kept.setdefault((messages[-1].topic, messages[-1].partition), stamp)
            if int(message.offset() or 0) + 1 >= watermarks[(messages[-1].topic, messages[-1].partition)][1]:
                open_partitions.discard((message.topic(), message.partition()))  # read up to its end at start
        # A log that starts past offset 0 lost its beginning to retention (or to deleted records): up to its
        # first message kept, or up to now when it kept none.
        deleted_until: dict[str, dt.datetime] = {}
        for (topic, partition), (low, _end) in watermarks.items():
            if low > 0:
                until = first_kept.get((topic, partition), dt.datetime.now(dt.UTC))
                deleted_until[topic] = max(until, deleted_until.get(topic, until))
    finally:
        consumer.close()
    return KafkaRead(messages, deleted_until)


def render(report: LedgerReport, limit: int = 10) -> str:
    lines = [("OK" if report.ok else "VIOLATIONS") + f": {report.summary()}"]
    for title, items in (("lost (committed, not in Kafka)", report.lost),
                         ("duplicated (event id: copies)", [f"{k}: {v}" for k, v in report.duplicates.items()]),
                         ("out of key order (key, earlier, later)", [str(r) for r in report.reordered]),
                         ("in Kafka without a row", report.unknown),
                         ("marked sent but not in Kafka", report.sent_but_missing),
                         ("parked as failed or discarded, yet in Kafka", report.parked_but_published)):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {item}" for item in list(items)[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
    if report.pending:
        lines.append(f"not published yet (pending: claimable, delayed or held; not a violation): {len(report.pending)}")
    if report.row_deleted:
        lines.append(f"in Kafka, rows deleted by the outbox's retention (OUTBOX_RETENTION_HOURS; not a violation):"
                     f" {len(report.row_deleted)}")
    if report.message_deleted:
        lines.append(f"sent, messages deleted by Kafka's retention (the topic's retention.ms; not a violation):"
                     f" {len(report.message_deleted)}")
    return "\n".join(lines)
