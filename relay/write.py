"""The write API: application code adds events to the outbox inside its own transaction.

    from outbox_relay import enqueue

    with Session(engine) as session, session.begin():
        session.add(order)
        enqueue(session, "orders", {"id": order.id}, key=order.id)

``enqueue`` joins the caller's transaction (Session, Connection, AsyncSession, AsyncConnection)
and never commits: the event exists if and only if the caller's transaction commits. With an
async target it returns a coroutine: ``await enqueue(async_session, ...)``.
Everything is validated before anything is written; a bad event raises an ``InvalidEvent``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard, cast, overload

from sqlalchemy import Connection, Engine, bindparam, func, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from outbox_relay import errors
from outbox_relay.limits import DEFAULT_MAX_MESSAGE_BYTES
from outbox_relay.models import EVENTS_TABLE, TOPIC_PATTERN, OutboxEvent

# Record framing, the relay's outbox-event-id header and a content-type header, with margin.
RECORD_OVERHEAD_BYTES = 256

CONTENT_TYPE_HEADER = "content-type"
MAX_PARTITION = 2**31 - 1  # Kafka partitions are int32
MAX_DELAY = dt.timedelta(days=365 * 1000)  # far inside PostgreSQL's timestamps; longer is a mistake
_TOPIC = re.compile(TOPIC_PATTERN)  # the rule the table's CHECK constraint enforces too
# The relay's own: progress topics (by their default names) and the headers it sets itself.
_RESERVED_TOPIC = re.compile(r"^outbox-relay\..*\.progress$")
RESERVED_HEADERS = frozenset({"outbox-event-id", "outbox-replay-of"})

Serializer: TypeAlias = Callable[[Any], tuple[bytes, str | None]]
"""Turns a value into (bytes, content type or None). Raise TypeError/ValueError for what it cannot encode."""

HeadersInput: TypeAlias = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]] | None
if TYPE_CHECKING:  # sqlalchemy.ext.asyncio needs greenlet, which sync applications need not install
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

SyncTarget: TypeAlias = "Session | Connection"
AsyncTarget: TypeAlias = "AsyncSession | AsyncConnection"


_UNIQUE_EVENT_ID = f"uq_{EVENTS_TABLE}_event_id"


def _is_async(target: object) -> TypeGuard[AsyncTarget]:
    """Decided by type, so subclasses (SQLModel's AsyncSession) are what they derive from.

    sqlalchemy.ext.asyncio is looked up, never imported: if the application has not imported it,
    the target cannot be one of its objects (and sync applications need not install greenlet).
    """
    if isinstance(target, Session | Connection):
        return False
    asyncio_module = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_module is not None and isinstance(target, asyncio_module.AsyncSession | asyncio_module.AsyncConnection):
        return True
    raise errors.InvalidTarget(_target_advice(target))


def _target_advice(target: object) -> str:
    kind = f"{type(target).__module__}.{type(target).__qualname__}"
    if isinstance(target, Engine) or kind.endswith("AsyncEngine"):
        return (f"enqueue got an Engine ({kind}), which has no transaction of yours to join: pass the connection "
                "or session of your transaction, e.g. `with engine.begin() as conn: enqueue(conn, ...)`")
    if isinstance(target, sessionmaker) or kind.endswith("async_sessionmaker"):
        return (f"enqueue got a session factory ({kind}): pass a session with a transaction, e.g. "
                "`with Session() as session, session.begin(): enqueue(session, ...)`")
    if type(target).__module__.split(".")[0] in ("psycopg", "psycopg2", "asyncpg", "pg8000"):
        return (f"enqueue got a plain driver connection ({kind}): pass a SQLAlchemy Connection or Session "
                "running your transaction, e.g. `with engine.begin() as conn: enqueue(conn, ...)`")
    return (f"enqueue got {kind}: pass the SQLAlchemy Session, Connection, AsyncSession or AsyncConnection "
            "of your transaction")


def _autocommit_refused(dbapi_connection: Any) -> None:
    """An AUTOCOMMIT connection would commit the event at once, whatever the caller's transaction does."""
    if getattr(dbapi_connection, "autocommit", False):
        raise errors.InvalidTarget(
            "enqueue got a connection in AUTOCOMMIT mode: the event would be committed at once, whether or not "
            "your business change commits. Pass a connection or session inside a transaction "
            "(without isolation_level='AUTOCOMMIT'), e.g. `with engine.begin() as conn: enqueue(conn, ...)`"
        )


def _sync_connection(target: SyncTarget) -> Connection:
    if isinstance(target, Session):
        return target.connection(bind_arguments={"mapper": OutboxEvent.__mapper__})
    return target


def _duplicate(exc: IntegrityError, rows: list[dict[str, Any]]) -> errors.OutboxError | None:
    if _UNIQUE_EVENT_ID not in str(exc.orig):
        return None
    which = f"event_id {rows[0]['event_id']}" if len(rows) == 1 else "an event_id of this batch"
    return errors.DuplicateEvent(
        f"{which} is already in the outbox: pass a new uuid.UUID (or no event_id to get a fresh one). "
        "The database aborted your transaction: roll it back."
    )


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, uuid.UUID | decimal.Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def default_serializer(value: Any) -> tuple[bytes, str | None]:
    """bytes as is, str as UTF-8 text, dicts/lists/dataclasses (and JSON scalars) as JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    if isinstance(value, dict | list | tuple | int | float | bool) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        encoded = json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False)
        return encoded.encode(), "application/json"
    raise TypeError(f"{type(value).__name__} has no default encoding; pass bytes or a serializer")


def new_event_id() -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random bits.

    Time-ordered, so a new event's entry lands at the end of the event_id unique index, on a page just
    written, instead of on a random page of an index that outgrew memory (read, dirtied, and written to
    the WAL whole after each checkpoint)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    return uuid.UUID(int=(ms & (1 << 48) - 1) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


def encode_key(key: bytes | str | int | uuid.UUID | None) -> bytes | None:
    """The one key encoding: bytes as is; str, int and UUID as the UTF-8 of their text form.

    So 42, "42" and b"42" are the same key, and a UUID key is its canonical 36-character form.
    """
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, bool):
        raise errors.InvalidKey(f"key {key!r}: bool is not a key type; use bytes, str, int or UUID")
    if isinstance(key, str) and not _encodable(key):
        raise errors.InvalidKey(f"key {key!r} is not valid Unicode (a lone surrogate); pass bytes or valid text")
    if isinstance(key, str | int | uuid.UUID):
        return str(key).encode()
    raise errors.InvalidKey(f"key of type {type(key).__name__}: use bytes, str, int or uuid.UUID")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unscoped(target: Any) -> Any:
    """A scoped_session (Flask-SQLAlchemy's db.session) stands for the session of the current scope."""
    if isinstance(target, scoped_session):
        return target()
    asyncio_module = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_module is not None and isinstance(target, asyncio_module.async_scoped_session):
        return target()
    return target


@dataclasses.dataclass(frozen=True)
class Event:
    """One event for ``enqueue_many``; the fields mean what ``enqueue``'s arguments mean."""

    topic: str
    value: Any
    key: bytes | str | int | uuid.UUID | None = None
    headers: HeadersInput = None
    partition: int | None = None
    event_id: uuid.UUID | None = None
    delay: dt.timedelta | None = None
    available_at: dt.datetime | None = None


class Outbox:
    """Write API with its settings; ``relay.enqueue`` is the default instance's method."""

    def __init__(
        self,
        *,
        serializer: Serializer = default_serializer,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        capture_trace_context: bool = True,
    ) -> None:
        self.serializer = serializer
        self.max_message_bytes = max_message_bytes
        self.capture_trace_context = capture_trace_context
        table = OutboxEvent.__table__  # a Table: typed as FromClause by the declarative base
        # One statement for every call: the delay is added by the database clock, the same one
        # the relay compares available_at with.
        self._insert = insert(OutboxEvent).inline().values(
            event_id=bindparam("event_id"),
            topic=bindparam("topic"),
            key=bindparam("key"),
            value=bindparam("value"),
            header_names=bindparam("header_names"),
            header_values=bindparam("header_values"),
            partition=bindparam("partition"),
            available_at=func.coalesce(
                bindparam("available_at", type_=table.c.available_at.type),
                func.now() + func.make_interval(0, 0, 0, 0, 0, 0, bindparam("delay_seconds")),
            ),
        )

    @overload
    def enqueue(
        self,
        target: SyncTarget,
        topic: str,
        value: Any,
        *,
        key: bytes | str | int | uuid.UUID | None = ...,
        headers: HeadersInput = ...,
        partition: int | None = ...,
        event_id: uuid.UUID | None = ...,
        delay: dt.timedelta | None = ...,
        available_at: dt.datetime | None = ...,
    ) -> uuid.UUID: ...

    @overload
    def enqueue(
        self,
        target: AsyncTarget,
        topic: str,
        value: Any,
        *,
        key: bytes | str | int | uuid.UUID | None = ...,
        headers: HeadersInput = ...,
        partition: int | None = ...,
        event_id: uuid.UUID | None = ...,
        delay: dt.timedelta | None = ...,
        available_at: dt.datetime | None = ...,
    ) -> Coroutine[Any, Any, uuid.UUID]: ...

    def enqueue(
        self,
        target: SyncTarget | AsyncTarget,
        topic: str,
        value: Any,
        *,
        key: bytes | str | int | uuid.UUID | None = None,
        headers: HeadersInput = None,
        partition: int | None = None,
        event_id: uuid.UUID | None = None,
        delay: dt.timedelta | None = None,
        available_at: dt.datetime | None = None,
    ) -> uuid.UUID | Coroutine[Any, Any, uuid.UUID]:
        """Add one event to the caller's transaction and return its event id.

        value: bytes, str, or anything the serializer takes (JSON by default); None is a tombstone.
        key: bytes, str, int or UUID (see ``encode_key``); events of one key keep their order.
        headers: a mapping or a sequence of (name, value) pairs; names may repeat.
        partition: an explicit partition, or None for the producer's partitioner.
        delay / available_at: publish no earlier than that (one or the other).
        """
        event = Event(topic, value, key, headers, partition, event_id, delay, available_at)
        target = _unscoped(target)
        row = self._row(event)
        if _is_async(target):
            return self._execute_async(target, [row])
        self._execute(cast("SyncTarget", target), [row])
        return row["event_id"]  # type: ignore[no-any-return]

    @overload
    def enqueue_many(self, target: SyncTarget, events: Iterable[Event]) -> list[uuid.UUID]: ...

    @overload
    def enqueue_many(
        self, target: AsyncTarget, events: Iterable[Event]
    ) -> Coroutine[Any, Any, list[uuid.UUID]]: ...

    def enqueue_many(
        self, target: SyncTarget | AsyncTarget, events: Iterable[Event]
    ) -> list[uuid.UUID] | Coroutine[Any, Any, list[uuid.UUID]]:
        """Add several events in one round trip; all are validated before any is written."""
        target = _unscoped(target)
        if isinstance(events, Event | Mapping | str | bytes):
            raise errors.InvalidEvent(
                f"enqueue_many takes a list of Event objects, not one {type(events).__name__}: "
                "enqueue_many(target, [Event(topic, value, ...), ...])"
            )
        rows = []
        for index, event in enumerate(events):
            if not isinstance(event, Event):
                hint = " (Event(**fields) makes one from a dict)" if isinstance(event, Mapping) else ""
                raise errors.InvalidEvent(
                    f"event #{index} is a {type(event).__name__}: pass Event(topic, value, key=...) objects{hint}"
                )
            try:
                rows.append(self._row(event))
            except errors.InvalidEvent as exc:
                raise type(exc)(f"event #{index}: {exc}") from exc
        if _is_async(target):
            return self._execute_many_async(target, rows)
        if rows:
            self._execute(cast("SyncTarget", target), rows)
        return [row["event_id"] for row in rows]

    def _execute(self, target: SyncTarget, rows: list[dict[str, Any]]) -> None:
        _autocommit_refused(_sync_connection(target).connection.dbapi_connection)
        try:
            target.execute(self._insert, rows[0] if len(rows) == 1 else rows)
        except IntegrityError as exc:
            duplicate = _duplicate(exc, rows)
            if duplicate is None:
                raise
            raise duplicate from exc

    async def _execute_async_rows(self, target: AsyncTarget, rows: list[dict[str, Any]]) -> None:
        connection = await target.connection() if hasattr(target, "sync_session") else target
        sync_connection = connection.sync_connection  # type: ignore[union-attr]
        if sync_connection is not None:
            _autocommit_refused(sync_connection.connection.dbapi_connection)
        try:
            await target.execute(self._insert, rows[0] if len(rows) == 1 else rows)
        except IntegrityError as exc:
            duplicate = _duplicate(exc, rows)
            if duplicate is None:
                raise
            raise duplicate from exc

    async def _execute_async(self, target: AsyncTarget, rows: list[dict[str, Any]]) -> uuid.UUID:
        await self._execute_async_rows(target, rows)
        return rows[0]["event_id"]  # type: ignore[no-any-return]

    async def _execute_many_async(self, target: AsyncTarget, rows: list[dict[str, Any]]) -> list[uuid.UUID]:
        if rows:
            await self._execute_async_rows(target, rows)
        return [row["event_id"] for row in rows]

    def _row(self, event: Event) -> dict[str, Any]:
        """Validate and encode one event into insert parameters."""
        if not isinstance(event.topic, str) or not _TOPIC.match(event.topic) or event.topic in (".", ".."):
            raise errors.InvalidTopic(
                f"invalid topic {event.topic!r}: Kafka topic names are 1-249 characters of "
                "[a-zA-Z0-9._-] and not '.' or '..'"
            )
        if _RESERVED_TOPIC.match(event.topic):
            raise errors.InvalidTopic(f"topic {event.topic!r} is reserved for the relay's progress records")
        if event.partition is not None and (
            not isinstance(event.partition, int) or isinstance(event.partition, bool)
            or not 0 <= event.partition <= MAX_PARTITION
        ):
            raise errors.InvalidPartition(
                f"invalid partition {event.partition!r}: use an int from 0 to {MAX_PARTITION} or None")
        if event.event_id is not None and not isinstance(event.event_id, uuid.UUID):
            raise errors.InvalidEvent(f"event_id {event.event_id!r} is not a uuid.UUID")
        key = encode_key(event.key)
        names, values = self._headers(event.headers)
        value: bytes | None = None
        if event.value is not None:
            try:
                encoded = self.serializer(event.value)
            except (TypeError, ValueError) as exc:
                raise errors.SerializationError(f"value for topic {event.topic!r} cannot be serialized: {exc}") from exc
            if not (isinstance(encoded, tuple) and len(encoded) == 2 and isinstance(encoded[0], bytes)
                    and (encoded[1] is None or isinstance(encoded[1], str))):
                shape = type(encoded).__name__ if not isinstance(encoded, tuple) else (
                    f"({', '.join(type(part).__name__ for part in encoded)})")
                raise errors.SerializationError(
                    f"the serializer returned {shape}: a serializer returns (bytes, content type str or None), "
                    "e.g. lambda v: (avro_bytes(v), 'application/avro')"
                )
            value, content_type = encoded
            if content_type is not None and not _encodable(content_type):
                raise errors.SerializationError(f"the serializer's content type {content_type!r} is not valid "
                                                "Unicode (a lone surrogate)")
            if content_type and CONTENT_TYPE_HEADER not in names:
                names.append(CONTENT_TYPE_HEADER)
                values.append(content_type.encode())
        if self.capture_trace_context:
            _add_trace_context(names, values)
        size = len(key or b"") + len(value or b"") + sum(len(n.encode()) + len(v) for n, v in zip(names, values))
        if size + RECORD_OVERHEAD_BYTES > self.max_message_bytes:
            raise errors.EventTooLarge(
                f"event for topic {event.topic!r} is {size} bytes (key + value + headers) plus "
                f"{RECORD_OVERHEAD_BYTES} of record overhead, over the limit of {self.max_message_bytes} bytes"
            )
        return {
            "event_id": event.event_id or new_event_id(),
            "topic": event.topic,
            "key": key,
            "value": value,
            "header_names": names,
            "header_values": values,
            "partition": event.partition,
            **_schedule(event.delay, event.available_at),
        }

    @staticmethod
    def _headers(headers: HeadersInput) -> tuple[list[str], list[bytes]]:
        if headers is None:
            return [], []
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        names: list[str] = []
        values: list[bytes] = []
        try:
            items = list(pairs)
        except TypeError:
            raise errors.InvalidHeader(f"headers must be a mapping or (name, value) pairs, not {headers!r}") from None
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise errors.InvalidHeader(f"header {item!r} is not a (name, value) pair")
            name, value = item
            if not isinstance(name, str) or not name:
                raise errors.InvalidHeader(f"header name {name!r} must be a non-empty str")
            if "\x00" in name or not _encodable(name):
                raise errors.InvalidHeader(
                    f"header name {name!r} must be text without NUL characters or lone surrogates")
            if name.lower() in RESERVED_HEADERS:
                raise errors.InvalidHeader(f"header {name!r} is reserved: the relay sets it")
            if isinstance(value, str):
                if not _encodable(value):
                    raise errors.InvalidHeader(f"header {name!r}: value {value!r} is not valid Unicode "
                                               "(a lone surrogate); pass bytes or valid text")
                value = value.encode()
            elif isinstance(value, bytearray | memoryview):
                value = bytes(value)
            elif not isinstance(value, bytes):
                raise errors.InvalidHeader(
                    f"header {name!r} has a {type(value).__name__} value; header values must be bytes or str"
                )
            names.append(name)
            values.append(value)
        return names, values


def _schedule(delay: dt.timedelta | None, available_at: dt.datetime | None) -> dict[str, Any]:
    if delay is not None and available_at is not None:
        raise errors.InvalidSchedule("give delay or available_at, not both")
    if available_at is not None:
        if not isinstance(available_at, dt.datetime) or available_at.utcoffset() is None:
            raise errors.InvalidSchedule(
                f"available_at {available_at!r} is naive; pass a timezone-aware datetime "
                "(e.g. datetime.now(timezone.utc) + timedelta(minutes=5))"
            )
        return {"available_at": available_at, "delay_seconds": 0.0}
    if delay is not None:
        if not isinstance(delay, dt.timedelta) or not dt.timedelta(0) <= delay <= MAX_DELAY:
            raise errors.InvalidSchedule(
                f"delay {delay!r} must be a datetime.timedelta from 0 to {MAX_DELAY.days // 365} years")
        return {"available_at": None, "delay_seconds": delay.total_seconds()}
    return {"available_at": None, "delay_seconds": 0.0}


def _add_trace_context(names: list[str], values: list[bytes]) -> None:
    """Carry the active OpenTelemetry span (W3C traceparent/tracestate) to the consumer."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for name, value in carrier.items():
        if name not in names:
            names.append(name)
            values.append(value.encode())


_default = Outbox()
enqueue = _default.enqueue
enqueue_many = _default.enqueue_many
