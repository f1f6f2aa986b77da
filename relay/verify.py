"""The ledger check: compare what the outbox table committed with what Kafka holds.

Given the table's rows and the messages a read_committed consumer saw, it reports events lost
(committed, not in Kafka), duplicated (one event id more than once), reordered (a key's events
out of id order within one partition of one topic: the only order a consumer can see), unknown
(in Kafka, but no row produced it), rows marked sent that Kafka lacks, and rows parked as failed
or discarded that Kafka has nevertheless (retrying them would publish them twice).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from typing import Any


@dataclasses.dataclass(frozen=True)
class LedgerRow:
    id: int
    event_id: str
    topic: str
    key: bytes | None
    state: str


@dataclasses.dataclass(frozen=True)
class LedgerMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    event_id: str | None


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
    rows: Iterable[LedgerRow], messages: Iterable[LedgerMessage], *, expect_all_sent: bool = True
) -> LedgerReport:
    """Compare the table with Kafka. With ``expect_all_sent`` every pending row also counts as lost."""
    rows = list(rows)
    messages = sorted(messages, key=lambda m: (m.topic, m.partition, m.offset))
    by_event = {row.event_id: row for row in rows}
    counts = Counter(m.event_id for m in messages if m.event_id is not None)
    # Failed and discarded rows were parked on purpose; pending ones are lost once all should be sent.
    lost = [r.event_id for r in rows
            if r.event_id not in counts and (r.state == "sent" or (expect_all_sent and r.state == "pending"))]
    sent_but_missing = [r.event_id for r in rows if r.state == "sent" and r.event_id not in counts]
    pending = [] if expect_all_sent else [r.event_id for r in rows
                                          if r.state == "pending" and r.event_id not in counts]
    unknown = [m.event_id or f"{m.topic}/{m.partition}@{m.offset}" for m in messages
               if m.event_id is None or m.event_id not in by_event]
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


def read_topics(kafka_config: dict[str, Any], topics: Iterable[str], timeout: float = 30.0) -> list[LedgerMessage]:
    """Everything committed in the topics (read_committed), from the beginning to the current end."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    from outbox_relay.progress import client_config
    from outbox_relay.publisher import EVENT_ID_HEADER

    consumer = Consumer({**client_config(kafka_config), "group.id": f"outbox-relay-verify-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    messages: list[LedgerMessage] = []
    try:
        assignment = []
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
            if metadata.error is not None:
                continue  # a topic that no longer exists holds nothing to compare
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
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
            messages.append(LedgerMessage(
                str(message.topic()), int(message.partition() or 0), int(message.offset() or 0),
                key.encode() if isinstance(key, str) else key,
                event_id.decode() if isinstance(event_id, bytes) else event_id,
            ))
    finally:
        consumer.close()
    return messages


def render(report: LedgerReport, limit: int = 10) -> str:
    lines = [("OK" if report.ok else "VIOLATIONS") + f": {report.summary()}"]
    for title, items in (("lost (committed, not in Kafka)", report.lost),
                         ("duplicated (event id: copies)", [f"{k}: {v}" for k, v in report.duplicates.items()]),
                         ("out of key order (key, earlier, later)", [str(r) for r in report.reordered]),
                         ("in Kafka without a row (or deleted by retention)", report.unknown),
                         ("marked sent but not in Kafka", report.sent_but_missing),
                         ("parked as failed or discarded, yet in Kafka", report.parked_but_published)):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {item}" for item in list(items)[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
    if report.pending:
        lines.append(f"not published yet (pending: claimable, delayed or held; not a violation): {len(report.pending)}")
    return "\n".join(lines)
