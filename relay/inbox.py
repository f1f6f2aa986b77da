"""The consumer inbox: apply each event to the consumer's database exactly once.

The handler's effects, the event's id (in ``inbox.processed``) and the next offset to read (in
``inbox.offsets``) commit in one PostgreSQL transaction. A crash at any point leaves all three or
none; on assignment the consumer seeks to the offsets in the database, and an event seen again (a
replay, a zombie consumer after a rebalance, a producer outside the relay) is skipped by its id.
Kafka's committed offsets follow the database's, for lag monitoring only::

    from outbox_relay import Inbox

    inbox = Inbox(database_url=..., bootstrap_servers=..., group="billing", topics=["orders"])

    @inbox.handler
    def apply(event, session):          # or: async def apply(event, session: AsyncSession)
        session.execute(...)            # same transaction as the inbox's bookkeeping

    inbox.run()                         # until SIGTERM/SIGINT or inbox.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import inspect
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from outbox_relay.config import InboxSettings
from outbox_relay.db import inbox as store
from outbox_relay.db.connection import is_outage
from outbox_relay.db.inbox import Claim, ParkedRow, Position
from outbox_relay.errors import ConfigurationError

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "outbox-event-id"
REPLAY_HEADER = "outbox-replay-of"
CONTENT_TYPE_HEADER = "content-type"
# Events produced without an outbox-event-id header are identified by where they sit in Kafka.
POSITION_NAMESPACE = uuid.UUID("5b0c3c53-8f0e-4e0a-9d43-6f1c0a7d1e2b")

Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class InboxEvent:
    """One event as a handler sees it: the value decoded by its content type, and where it came from."""

    event_id: uuid.UUID  # the outbox-event-id header (or, without one, an id derived from the position)
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any  # dict/list/... for application/json, str for text/*, bytes otherwise, None for a tombstone
    raw_value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: dt.datetime | None
    replay_of: uuid.UUID | None = None  # a replay (`outbox-relay replay`) names the event it repeats

    @property
    def dedup_id(self) -> uuid.UUID:
        """What the inbox records: a replay counts as the event it repeats, so it is skipped."""
        return self.replay_of or self.event_id

    @property
    def content_type(self) -> str | None:
        value = self.header(CONTENT_TYPE_HEADER)
        return value.decode(errors="replace") if value is not None else None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        for header, value in self.headers:
            if header.lower() == name.lower():
                found = value
        return found


def decode_value(raw: bytes | None, content_type: str | None) -> Any:
    """What the write API encoded, decoded back: JSON, text in its charset, or the bytes as they are."""
    if raw is None:
        return None
    kind, _, params = (content_type or "").partition(";")
    kind = kind.strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return json.loads(raw)
    if kind.startswith("text/"):
        charset = "utf-8"
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        return raw.decode(charset)
    return raw


def _uuid(value: bytes | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value.decode("ascii", errors="replace"))
    except ValueError:
        return None


def position_id(topic: str, partition: int, offset: int) -> uuid.UUID:
    return uuid.uuid5(POSITION_NAMESPACE, f"{topic}/{partition}/{offset}")


def event_from(topic: str, partition: int, offset: int, key: bytes | None, raw: bytes | None,
               headers: Iterable[tuple[str, bytes | None]], timestamp_ms: int | None) -> InboxEvent:
    """Build the handler's event; a value its content type cannot decode raises ValueError."""
    pairs = tuple((name, value or b"") for name, value in headers)
    found = {name.lower(): value for name, value in pairs}
    event_id = _uuid(found.get(EVENT_ID_HEADER)) or position_id(topic, partition, offset)
    content_type = found.get(CONTENT_TYPE_HEADER)
    when = dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC) if timestamp_ms and timestamp_ms > 0 else None
    value = decode_value(raw, content_type.decode(errors="replace") if content_type is not None else None)
    return InboxEvent(event_id, topic, partition, offset, key, value, raw, pairs, when,
                      _uuid(found.get(REPLAY_HEADER)))


@dataclasses.dataclass
class Received:
    """A message as read from Kafka, before decoding (a value that cannot be decoded is parked too)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None

    @classmethod
    def of(cls, message: Any) -> Received:
        kind, stamp = message.timestamp()
        return cls(message.topic(), message.partition(), message.offset(), message.key(), message.value(),
                   tuple((n, v or b"") for n, v in (message.headers() or [])), stamp if kind else None)

    @classmethod
    def from_parked(cls, row: ParkedRow) -> Received:
        return cls(row.topic, row.partition, row.offset, row.key, row.value, row.headers, row.timestamp_ms)

    @property
    def position(self) -> Position:
        return (self.topic, self.partition)

    def dedup_id(self) -> uuid.UUID:
        found = {name.lower(): value for name, value in self.headers}
        return (_uuid(found.get(REPLAY_HEADER)) or _uuid(found.get(EVENT_ID_HEADER))
                or position_id(self.topic, self.partition, self.offset))

    def event(self) -> InboxEvent:
        return event_from(self.topic, self.partition, self.offset, self.key, self.raw, self.headers,
                          self.timestamp_ms)

    def parked(self, state: str, error: str | None, attempts: int) -> ParkedRow:
        return ParkedRow(0, self.topic, self.partition, self.offset, self.dedup_id(), self.key, self.raw,
                         self.headers, self.timestamp_ms, state, attempts, error)


def split_held(batch: Sequence[Received], held: dict[Position, set[bytes]], policy: str) -> list[bool]:
    """Which events of a batch wait behind a parked event of their key (the hold policy); keyless never do."""
    if policy != "hold":
        return [False] * len(batch)
    return [m.key is not None and m.key in held.get(m.position, ()) for m in batch]


class HandlerFailed(Exception):
    """The handler (or decoding) failed on ``batch[index]``; the transaction was rolled back."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.index = index
        self.cause = cause


class _Stopping(Exception):
    """A stop was asked for while waiting to retry."""


def _transient(exc: BaseException) -> bool:
    """A lost or refused database connection, or the database's own trouble: the batch is retried as it
    is, no attempt is counted. An error that is the statement's fault (a value too long for an index) is
    the event's, counted and parked like any handler failure: waited out, it stalled the consumer for ever."""
    return is_outage(exc)


class InboxMetrics:
    """Prometheus metrics of one consumer: a private registry, as the relay's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.processed = Counter("outbox_inbox_processed_events_total", "Events applied (handler committed)",
                                 ["topic"], registry=r)
        self.duplicates = Counter("outbox_inbox_duplicates_skipped_total",
                                  "Events skipped because their id was already processed", ["topic"], registry=r)
        self.failures = Counter("outbox_inbox_handler_failures_total", "Handler attempts that raised", ["topic"],
                                registry=r)
        self.parked = Counter("outbox_inbox_parked_events_total", "Events parked (failed, or held behind one)",
                              ["topic", "state"], registry=r)
        self.lag = Gauge("outbox_inbox_lag_events", "High watermark minus the next offset to apply",
                         ["topic", "partition"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Inbox:
    """Consume topics and apply each event once, through ``handler(event, session)``.

    Keyword options are those of :class:`outbox_relay.config.InboxSettings` (``batch_size``,
    ``max_attempts``, ``failed_key_policy``, ...); ``kafka`` adds librdkafka properties.
    """

    def __init__(self, handler: Handler | None = None, *, settings: InboxSettings | None = None,
                 database_url: str | None = None, bootstrap_servers: str | None = None, group: str | None = None,
                 topics: Sequence[str] | str | None = None, kafka: dict[str, Any] | None = None,
                 engine_options: dict[str, Any] | None = None, **options: Any) -> None:
        if settings is None:
            flags = {"database_url": database_url, "bootstrap_servers": bootstrap_servers, "group": group,
                     "topics": topics if isinstance(topics, str) or topics is None else ",".join(topics), **options}
            settings = InboxSettings.from_sources({k: v for k, v in flags.items() if v is not None}, env={})
        if kafka:
            settings.kafka_properties.update({k: str(v) for k, v in kafka.items()})
            settings.validate()
        self.settings = settings
        self.metrics = InboxMetrics()
        self._handler = handler
        self._engine_options = engine_options or {}
        self._stop = threading.Event()
        self._assigned: dict[Position, int] = {}  # partition -> next offset to apply
        self._held: dict[Position, set[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None
        self._async_engine: Any = None
        self._consumer: Any = None
        self._outage_logged = False
        self._outcome: tuple[set[int], set[int]] = (set(), set())

    def handler(self, function: Handler) -> Handler:
        """Decorator: ``@inbox.handler`` registers the function that applies each event."""
        self._handler = function
        return function

    def stop(self) -> None:
        """Finish the transaction in flight, then leave the group (safe from any thread or a signal)."""
        self._stop.set()

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self._handler)

    # The daemon.

    def run(self, *, install_signals: bool = True) -> int:
        """Consume until stopped; returns an exit code (0 after a graceful stop)."""
        from confluent_kafka import Consumer

        if self._handler is None:
            raise ConfigurationError("no handler: decorate a function with @inbox.handler or pass handler=")
        if install_signals and threading.current_thread() is threading.main_thread():
            self._install_signals()
        s = self.settings
        self._engine = create_engine(s.database_url, pool_pre_ping=True, **self._engine_options)
        if self.is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            self._loop = asyncio.new_event_loop()
            self._async_engine = create_async_engine(s.database_url, pool_pre_ping=True, **self._engine_options)
        if s.http:
            self._serve_metrics(s.http)
        config = {**s.consumer_config(), "logger": logging.getLogger("outbox_relay.librdkafka")}
        self._consumer = Consumer(config)
        self._consumer.subscribe(s.topic_list(), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        log.info("inbox %s consuming %s (batch %d, %s)", s.group, ", ".join(s.topic_list()), s.batch_size,
                 "async handler" if self.is_async else "sync handler", extra={"action": "inbox_start"})
        next_parked = next_retention = next_lag = 0.0
        try:
            while not self._stop.is_set():
                messages = self._consumer.consume(num_messages=s.batch_size, timeout=s.poll_interval)
                batch = []
                for message in messages:
                    if message.error():
                        log.warning("kafka: %s", message.error(), extra={"action": "consume_error"})
                    elif (message.topic(), message.partition()) in self._assigned:
                        batch.append(Received.of(message))
                if batch:
                    self._process(batch)
                now = time.monotonic()
                if now >= next_parked:
                    self._process_parked()
                    next_parked = now + max(s.poll_interval, 1.0)  # operators' retries need no faster look
                if now >= next_lag:
                    self._observe_lag()
                    next_lag = now + max(s.poll_interval, 5.0)
                if s.retention_hours > 0 and now >= next_retention:
                    self.delete_expired()
                    next_retention = now + s.retention_interval
        except _Stopping:
            pass
        finally:
            self._close()
        log.info("inbox %s stopped", s.group, extra={"action": "inbox_stop"})
        return 0

    def _serve_metrics(self, address: str) -> None:
        from prometheus_client import start_http_server

        from outbox_relay.web import parse_address

        host, port = parse_address(address)
        try:
            start_http_server(port, host, registry=self.metrics.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
        log.info("inbox: serving /metrics at http://%s:%d/metrics", host, port, extra={"action": "http_started"})

    def _install_signals(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            if self._stop.is_set():
                os._exit(1)  # a second signal: at once
            log.info("inbox: %s received, finishing the transaction in flight", signal.Signals(signum).name,
                     extra={"action": "shutdown"})
            self._stop.set()
            deadline = threading.Timer(self.settings.shutdown_timeout, self._give_up)
            deadline.daemon = True
            deadline.start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _give_up(self) -> None:
        log.error("inbox: shutdown took longer than %.0fs; exiting (the database decides what was applied)",
                  self.settings.shutdown_timeout, extra={"action": "shutdown_deadline"})
        logging.shutdown()
        os._exit(1)

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()  # leaves the group: the partitions move at once
            except Exception as exc:
                log.warning("inbox: closing the consumer: %s", exc, extra={"action": "close"})
        if self._async_engine is not None and self._loop is not None:
            self._loop.run_until_complete(self._async_engine.dispose())
            self._loop.close()
        if self._engine is not None:
            self._engine.dispose()

    # Rebalances: positions come from the database, never from Kafka's committed offsets.

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

        wanted = [(tp.topic, tp.partition) for tp in partitions]
        stored = self._retrying("reading stored offsets", lambda: self._read_offsets(wanted))
        reset = str(self.settings.consumer_config().get("auto.offset.reset", "earliest")).lower()
        start = OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING
        for tp in partitions:
            position = (tp.topic, tp.partition)
            tp.offset = stored.get(position, start)
            self._assigned[position] = stored.get(position, -1)
            self._held[position] = self._retrying("reading parked keys", functools.partial(self._read_held, position))
        consumer.incremental_assign(partitions)
        log.info("inbox: assigned %s", ", ".join(f"{t}[{p}]@{stored.get((t, p), 'start')}" for t, p in wanted),
                 extra={"action": "assign"})

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self._assigned.pop((tp.topic, tp.partition), None)
            self._held.pop((tp.topic, tp.partition), None)
            try:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        log.info("inbox: revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions),
                 extra={"action": "revoke"})

    def _read_offsets(self, wanted: list[Position]) -> dict[Position, int]:
        with self._engine.connect() as conn:
            return store.stored_offsets(conn, self.settings.group, wanted)

    def _read_held(self, position: Position) -> set[bytes]:
        if self.settings.failed_key_policy != "hold":
            return set()
        with self._engine.connect() as conn:
            return store.parked_keys(conn, self.settings.group, position)

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        """Database trouble is waited out (one line, then backoff), never fatal."""
        delay = self.settings.backoff_initial
        while True:
            try:
                result = call()
            except Exception as exc:
                if not _transient(exc):
                    raise
                if not self._outage_logged:
                    log.warning("inbox: PostgreSQL unavailable while %s, retrying: %s", what,
                                str(exc).splitlines()[0], extra={"action": "database_unavailable"})
                    self._outage_logged = True
                if self._stop.wait(delay):
                    raise _Stopping() from None
                delay = min(delay * 2, self.settings.backoff_max)
                continue
            if self._outage_logged:
                log.warning("inbox: PostgreSQL available again", extra={"action": "database_available"})
                self._outage_logged = False
            return result

    # Applying events.

    def _process(self, batch: list[Received]) -> None:
        """Apply a batch in as few transactions as failures allow, in order.

        A handler failure rolls the transaction back; the events before the culprit are applied
        again without it, the culprit alone is retried with backoff and parked after max_attempts.
        """
        start = 0
        culprit: tuple[int, BaseException] | None = None  # (index in batch, its first failure)
        while start < len(batch):
            if culprit is not None and culprit[0] == start:
                self._retry_or_park(batch[start], culprit[1])
                start, culprit = start + 1, None
                continue
            end = culprit[0] if culprit is not None else len(batch)
            try:
                self._retrying("applying events", functools.partial(self._transaction, batch[start:end]))
                start = end
            except HandlerFailed as failure:
                culprit = (start + failure.index, failure.cause)

    def _transaction(self, batch: Sequence[Received], *, park: tuple[str, str, int] | None = None,
                     unpark: int | None = None) -> None:
        if self.is_async:
            assert self._loop is not None
            self._loop.run_until_complete(self._async_transaction(batch, park, unpark))
        else:
            with Session(self._engine) as session, session.begin():
                apply = self._prepare(session, batch, park, unpark)
                for index, event in apply:
                    try:
                        self._handler(event, session)  # type: ignore[misc]
                    except Exception as exc:
                        if _transient(exc):
                            raise
                        raise HandlerFailed(index, exc) from exc
        self._committed(batch, park, unpark is not None)

    async def _async_transaction(self, batch: Sequence[Received], park: tuple[str, str, int] | None,
                                 unpark: int | None) -> None:
        from sqlalchemy.ext.asyncio import AsyncSession

        async with AsyncSession(self._async_engine) as session, session.begin():
            apply = await session.run_sync(lambda sync: self._prepare(sync, batch, park, unpark))
            for index, event in apply:
                try:
                    await self._handler(event, session)  # type: ignore[misc]
                except Exception as exc:
                    if _transient(exc):
                        raise
                    raise HandlerFailed(index, exc) from exc

    def _prepare(self, session: Session, batch: Sequence[Received], park: tuple[str, str, int] | None,
                 unpark: int | None) -> list[tuple[int, InboxEvent]]:
        """The inbox's part of a transaction, before the handlers run: which events to apply, which wait
        behind a parked event of their key; their ids recorded, the offsets advanced."""
        group = self.settings.group
        if unpark is not None:
            store.unpark(session, unpark)
        else:
            store.advance(session, group, {m.position: m.offset + 1 for m in batch})
        if park is not None:
            state, error, attempts = park
            for m in batch:
                store.park(session, group, m.parked(state, error, attempts))
            self._outcome = (set(), set())
            return []
        policy = self.settings.failed_key_policy if unpark is None else "skip"  # a parked head waits for nothing
        held = split_held(batch, self._held, policy)
        for m, wait in zip(batch, held):
            if wait:
                store.park(session, group, m.parked("held", None, 0))
        live = [m for m, wait in zip(batch, held) if not wait]
        new = store.claim(session, group, [Claim(m.dedup_id(), m.topic, m.partition, m.offset) for m in live])
        apply, seen = [], set()
        for index, (m, wait) in enumerate(zip(batch, held)):
            dedup = m.dedup_id()
            if wait or dedup not in new or dedup in seen:
                continue
            seen.add(dedup)
            try:
                apply.append((index, m.event()))
            except ValueError as exc:  # a value its content type cannot decode: the event's fault
                raise HandlerFailed(index, exc) from exc
        self._outcome = ({id(batch[i]) for i, _ in apply}, {id(m) for m, wait in zip(batch, held) if wait})
        return apply

    def _committed(self, batch: Sequence[Received], park: tuple[str, str, int] | None, unparked: bool) -> None:
        """After a commit: metrics, our positions, and Kafka's committed offsets (lag monitoring only)."""
        from confluent_kafka import TopicPartition

        applied, held = self._outcome
        self._outcome = (set(), set())
        touched: set[Position] = set()
        for m in batch:
            if park is not None:
                self.metrics.parked.labels(topic=m.topic, state=park[0]).inc()
            elif id(m) in applied:
                self.metrics.processed.labels(topic=m.topic).inc()
            elif id(m) in held:
                self.metrics.parked.labels(topic=m.topic, state="held").inc()
            else:
                self.metrics.duplicates.labels(topic=m.topic).inc()
            if not unparked and m.position in self._assigned:
                self._assigned[m.position] = max(self._assigned[m.position], m.offset + 1)
                touched.add(m.position)
        if touched and self._consumer is not None:
            try:
                self._consumer.commit(offsets=[TopicPartition(t, p, self._assigned[(t, p)]) for t, p in touched],
                                      asynchronous=True)
            except Exception as exc:  # only lag monitoring is behind
                log.debug("inbox: offset commit for monitoring failed: %s", exc, extra={"action": "commit"})

    def _retry_or_park(self, message: Received, first: BaseException, *, parked_id: int | None = None) -> bool:
        """Try one event alone until it succeeds or max_attempts ran out; then park it (or, for a parked
        event tried again, mark it failed again). Returns whether it was applied."""
        s = self.settings
        attempts, error, delay = 1, first, s.backoff_initial
        self._failed(message, error, attempts)
        while attempts < s.max_attempts:
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                raise _Stopping()
            delay = min(delay * 2, s.backoff_max)
            try:
                self._retrying("applying an event", lambda: self._transaction([message], unpark=parked_id))
                return True
            except HandlerFailed as failure:
                attempts, error = attempts + 1, failure.cause
                self._failed(message, error, attempts)
        text = f"{type(error).__name__}: {error}"
        if parked_id is not None:
            self._retrying("marking a parked event failed", lambda: self._fail_again(parked_id, text, attempts))
        else:
            self._retrying("parking an event", lambda: self._transaction([message], park=("failed", text, attempts)))
        if message.key is not None and s.failed_key_policy == "hold":
            self._held.setdefault(message.position, set()).add(message.key)
        log.error("inbox: parked event %s (%s[%d]@%d) after %d attempt%s: %s", message.dedup_id(), message.topic,
                  message.partition, message.offset, attempts, "" if attempts == 1 else "s", text,
                  extra={"action": "park", "event_id": str(message.dedup_id()), "topic": message.topic})
        return False

    def _failed(self, message: Received, error: BaseException, attempts: int) -> None:
        self.metrics.failures.labels(topic=message.topic).inc()
        log.warning("inbox: handler failed on event %s (%s[%d]@%d), attempt %d of %d: %s: %s", message.dedup_id(),
                    message.topic, message.partition, message.offset, attempts, self.settings.max_attempts,
                    type(error).__name__, error,
                    extra={"action": "handler_failed", "event_id": str(message.dedup_id()), "topic": message.topic})

    def _fail_again(self, parked_id: int, error: str, attempts: int) -> None:
        with self._engine.begin() as conn:
            store.fail_again(conn, parked_id, error, attempts)

    def _process_parked(self) -> None:
        """Parked events an operator retried, and events held behind a discarded one, in key order."""
        while not self._stop.is_set():
            rows = self._retrying("reading parked events", lambda: self._ready_parked())
            if not rows:
                # A discard may have emptied a key's queue: its next events need not wait any more.
                self._refresh_held([position for position, keys in self._held.items() if keys])
                return
            for row in rows:
                message = Received.from_parked(row)
                try:
                    self._retrying("applying a parked event",
                                   functools.partial(self._transaction, [message], unpark=row.id))
                    log.info("inbox: applied parked event %s (%s)", row.event_id, row.state,
                             extra={"action": "unpark", "event_id": str(row.event_id)})
                except HandlerFailed as failure:
                    self._retry_or_park(message, failure.cause, parked_id=row.id)
            self._refresh_held({(row.topic, row.partition) for row in rows})

    def _refresh_held(self, positions: Iterable[Position]) -> None:
        for position in positions:
            if position in self._assigned:
                self._held[position] = self._retrying("reading parked keys",
                                                      functools.partial(self._read_held, position))

    def _ready_parked(self) -> list[ParkedRow]:
        with self._engine.connect() as conn:
            return store.ready_parked(conn, self.settings.group, list(self._assigned), self.settings.batch_size)

    def _observe_lag(self) -> None:
        from confluent_kafka import TopicPartition

        for (topic, partition), applied in list(self._assigned.items()):
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
                # The consumer's position is past the transactions' commit markers; the applied offset is not.
                position = self._consumer.position([TopicPartition(topic, partition)])[0].offset
            except Exception:
                continue
            next_offset = position if position >= applied >= 0 else applied
            if high >= 0 and next_offset >= 0:
                self.metrics.lag.labels(topic=topic, partition=str(partition)).set(max(0, high - next_offset))

    def delete_expired(self) -> int:
        """Delete this group's processed ids older than the retention, in batches (bounded time)."""
        retention = dt.timedelta(hours=self.settings.retention_hours)
        deleted, deadline = 0, time.monotonic() + 5.0
        try:
            while time.monotonic() < deadline:
                with self._engine.begin() as conn:
                    count = store.delete_processed(conn, self.settings.group, retention)
                deleted += count
                if count < 1000:
                    break
        except Exception as exc:
            if not _transient(exc):
                raise
        if deleted:
            log.info("inbox: retention deleted %d processed ids", deleted, extra={"action": "retention"})
        return deleted
