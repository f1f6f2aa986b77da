"""The write API against real PostgreSQL: atomicity, encodings, concurrency, and rejected input."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import multiprocessing
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from outbox_relay import Event, Outbox, enqueue, enqueue_many, errors
from outbox_relay.models import OutboxEvent
from tests.pgtools import EVENT_STATES, EVENTS, SENT, SETTINGS, UNSENT
from tests.relaytools import ROOT


def rows(engine: Engine) -> list[OutboxEvent]:
    with Session(engine) as session:
        return list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(OutboxEvent)).scalar_one()


def test_rollback_leaves_no_row_and_commit_leaves_exactly_one(engine: Engine) -> None:
    with Session(engine) as session:
        enqueue(session, "orders", {"id": 1})
        session.rollback()
    assert count(engine) == 0

    with Session(engine) as session, session.begin():
        event_id = enqueue(session, "orders", {"id": 2})
    stored = rows(engine)
    assert [(r.event_id, r.topic, r.value) for r in stored] == [(event_id, "orders", b'{"id":2}')]
    with engine.connect() as conn:  # the enqueue trigger made its unsent row in the same transaction
        assert conn.execute(text(f"SELECT event_id, state FROM {EVENT_STATES}")).all() == [(event_id, "pending")]


def test_enqueue_joins_a_connection_transaction_and_never_commits(engine: Engine) -> None:
    with engine.connect() as conn:
        enqueue(conn, "orders", b"raw")
        assert conn.in_transaction()
        conn.rollback()
    assert count(engine) == 0
    with engine.begin() as conn:
        enqueue(conn, "orders", b"raw")
    assert count(engine) == 1


def test_values_keys_and_headers_are_encoded_as_documented(engine: Engine) -> None:
    @dataclasses.dataclass
    class Shipped:
        order: int
        at: dt.date

    with engine.begin() as conn:
        enqueue(conn, "t", b"\x00\xff", key=b"\x01\x02")
        enqueue(conn, "t", "héllo", key="k")
        enqueue(conn, "t", Shipped(7, dt.date(2026, 1, 2)), key=42)
        enqueue(conn, "t", None, key=uuid.UUID(int=1), headers=[("a", b"\x00"), ("a", "two"), ("b", b"")])
    first, second, third, fourth = rows(engine)
    assert (first.value, first.key, first.header_names) == (b"\x00\xff", b"\x01\x02", [])
    assert (second.value, second.key) == ("héllo".encode(), b"k")
    assert dict(zip(second.header_names, second.header_values))["content-type"] == b"text/plain; charset=utf-8"
    assert third.value == b'{"order":7,"at":"2026-01-02"}' and third.key == b"42"
    assert dict(zip(third.header_names, third.header_values))["content-type"] == b"application/json"
    # A tombstone: no value, no content type; headers keep their order, duplicates and binary values.
    assert fourth.value is None and fourth.key == b"00000000-0000-0000-0000-000000000001"
    assert list(zip(fourth.header_names, fourth.header_values)) == [("a", b"\x00"), ("a", b"two"), ("b", b"")]


def test_pluggable_serializer_records_its_content_type(engine: Engine) -> None:
    outbox = Outbox(serializer=lambda value: (repr(value).encode(), "application/x-python-repr"))
    with engine.begin() as conn:
        outbox.enqueue(conn, "t", {1, 2})
    (row,) = rows(engine)
    assert row.value == b"{1, 2}"
    assert dict(zip(row.header_names, row.header_values))["content-type"] == b"application/x-python-repr"


def test_caller_event_id_partition_and_schedules(engine: Engine) -> None:
    given = uuid.uuid4()
    at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as conn:
        assert enqueue(conn, "t", b"1", event_id=given, partition=2) == given
        enqueue(conn, "t", b"2", available_at=at)
        enqueue(conn, "t", b"3", delay=dt.timedelta(hours=1))
        db_now = conn.execute(text("SELECT now()")).scalar_one()
    first, second, third = rows(engine)
    assert (first.event_id, first.partition, first.available_at) == (given, 2, first.created_at)
    assert second.available_at == at
    assert abs((third.available_at - db_now) - dt.timedelta(hours=1)) < dt.timedelta(seconds=1)


def test_enqueue_many_writes_all_in_one_call(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        ids = enqueue_many(session, [Event("t", {"n": n}, key=n % 3) for n in range(100)])
    stored = rows(engine)
    assert [r.event_id for r in stored] == ids and len(set(ids)) == 100


def test_event_ids_are_time_ordered_so_the_unique_index_grows_at_its_end(engine: Engine) -> None:
    """Random (version 4) ids put each new entry of the event_id index on a random page: at volume, that
    page is read in, dirtied, and written to the WAL whole after every checkpoint (1,300-4,600 bytes of
    WAL per commit against 900, with 10 million events in the table)."""
    import time

    ids = []
    for _ in range(3):
        with engine.begin() as conn:
            ids.append(enqueue(conn, "t", b"x"))
        time.sleep(0.002)
    assert [i.version for i in ids] == [7, 7, 7]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert abs(int.from_bytes(ids[0].bytes[:6], "big") / 1000 - time.time()) < 60  # milliseconds of Unix time


def test_trace_context_of_the_active_span_is_captured(engine: Engine) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("checkout") as span, engine.begin() as conn:
        enqueue(conn, "t", b"x")
        trace_id = format(span.get_span_context().trace_id, "032x")
    (row,) = rows(engine)
    headers = dict(zip(row.header_names, row.header_values))
    assert headers["traceparent"].decode().split("-")[1] == trace_id
    # Without an active span nothing is added.
    with engine.begin() as conn:
        enqueue(conn, "t", b"y")
    assert "traceparent" not in rows(engine)[1].header_names
    assert trace.get_current_span() is trace.INVALID_SPAN


BAD_EVENTS: list[tuple[str, dict[str, Any], type[errors.InvalidEvent], str]] = [
    ("empty topic", {"topic": ""}, errors.InvalidTopic, "invalid topic ''"),
    ("dot topic", {"topic": "."}, errors.InvalidTopic, "invalid topic '.'"),
    ("dotdot topic", {"topic": ".."}, errors.InvalidTopic, "invalid topic '..'"),
    ("long topic", {"topic": "a" * 250}, errors.InvalidTopic, "1-249 characters"),
    ("bad char topic", {"topic": "orders/eu"}, errors.InvalidTopic, "orders/eu"),
    ("oversized value", {"value": b"x" * 1_048_588}, errors.EventTooLarge, "over the limit of 1048588"),
    ("oversized headers", {"headers": {"h": b"x" * 1_048_588}}, errors.EventTooLarge, "over the limit"),
    ("header name not str", {"headers": [(b"h", b"v")]}, errors.InvalidHeader, "header name b'h'"),
    ("header value int", {"headers": {"h": 5}}, errors.InvalidHeader, "header 'h' has a int value"),
    ("header not a pair", {"headers": ["h"]}, errors.InvalidHeader, "not a (name, value) pair"),
    ("unserializable", {"value": object()}, errors.SerializationError, "cannot be serialized"),
    ("nan", {"value": {"x": float("nan")}}, errors.SerializationError, "cannot be serialized"),
    ("nested unserializable", {"value": {"x": {1, 2}}}, errors.SerializationError, "set is not JSON"),
    ("negative partition", {"partition": -1}, errors.InvalidPartition, "invalid partition -1"),
    ("bool partition", {"partition": True}, errors.InvalidPartition, "invalid partition True"),
    ("int64 partition", {"partition": 2**40}, errors.InvalidPartition, "from 0 to 2147483647"),
    ("endless delay", {"delay": dt.timedelta.max}, errors.InvalidSchedule, "from 0 to 1000 years"),
    ("naive available_at", {"available_at": dt.datetime(2030, 1, 1)}, errors.InvalidSchedule, "naive"),
    ("negative delay", {"delay": dt.timedelta(seconds=-1)}, errors.InvalidSchedule, "from 0 to 1000 years"),
    ("both schedules", {"delay": dt.timedelta(1), "available_at": dt.datetime.now(dt.UTC)},
     errors.InvalidSchedule, "not both"),
    ("float key", {"key": 1.5}, errors.InvalidKey, "key of type float"),
    ("bool key", {"key": True}, errors.InvalidKey, "bool is not a key type"),
    ("event id not uuid", {"event_id": "abc"}, errors.InvalidEvent, "is not a uuid.UUID"),
    ("NUL in header name", {"headers": {"a\x00b": b"v"}}, errors.InvalidHeader, "without NUL characters"),
    ("lone surrogate in header name", {"headers": {"a\udc80": b"v"}}, errors.InvalidHeader, "lone surrogates"),
    ("lone surrogate in header value", {"headers": {"h": "\ud800"}}, errors.InvalidHeader, "lone surrogate"),
    ("lone surrogate in key", {"key": "k\udfff"}, errors.InvalidKey, "not valid Unicode"),
    ("lone surrogate in value", {"value": "\ud800"}, errors.SerializationError, "cannot be serialized"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_bad_input_is_rejected_with_a_clear_error_and_nothing_written(
    engine: Engine, case: str, change: dict[str, Any], error: type[Exception], message: str
) -> None:
    arguments: dict[str, Any] = {"topic": "orders", "value": b"ok", **change}
    with engine.begin() as conn:
        enqueue(conn, "orders", b"accepted before")
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
            enqueue(conn, **arguments)
        assert isinstance(raised.value, errors.OutboxError) and isinstance(raised.value, ValueError)
    # The caller's transaction went on: what was accepted before is kept, the bad event is absent.
    assert [r.value for r in rows(engine)] == [b"accepted before"]


def test_a_bad_event_in_a_batch_rejects_the_whole_batch_naming_it(engine: Engine) -> None:
    with engine.begin() as conn, pytest.raises(errors.InvalidTopic, match="event #1: invalid topic 'bad topic'"):
        enqueue_many(conn, [Event("good", b"1"), Event("bad topic", b"2")])
    assert count(engine) == 0


def test_the_limit_is_configurable(engine: Engine) -> None:
    small = Outbox(max_message_bytes=1000)
    with engine.begin() as conn:
        small.enqueue(conn, "t", b"x" * 700)
        with pytest.raises(errors.EventTooLarge, match="over the limit of 1000 bytes"):
            small.enqueue(conn, "t", b"x" * 800)


def test_the_database_rejects_what_bypasses_the_api(engine: Engine) -> None:
    for column, value in (("topic", "'bad topic'"), ("partition", "-1"), ("header_names", "'{a}'")):
        with pytest.raises(Exception, match="violates check constraint"), engine.begin() as conn:
            values = {"topic": "'t'", "partition": "NULL", "header_names": "'{}'", column: value}
            conn.execute(text(f"INSERT INTO {EVENTS} (topic, partition, header_names) "
                              f"VALUES ({values['topic']}, {values['partition']}, {values['header_names']})"))
    with pytest.raises(Exception, match="violates check constraint"), engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {EVENTS} (topic) VALUES ('t')"))
        conn.execute(text(f"UPDATE {UNSENT} SET state = 'lost'"))


def test_concurrent_writer_threads_get_distinct_ids(engine: Engine) -> None:
    def write(n: int) -> None:
        for i in range(50):
            with engine.begin() as conn:
                enqueue(conn, "t", {"writer": n, "i": i}, key=n)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = rows(engine)
    assert len(stored) == 400
    assert len({r.id for r in stored}) == 400 and len({r.event_id for r in stored}) == 400


def _write_from_process(url: str, writer: int) -> None:
    engine = create_engine(url)
    for i in range(50):
        with engine.begin() as conn:
            enqueue(conn, "t", {"writer": writer, "i": i}, key=writer)
    engine.dispose()


def test_concurrent_writer_processes_get_distinct_ids(engine: Engine, database_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_from_process, args=(database_url, n)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    stored = rows(engine)
    assert len({r.id for r in stored}) == len({r.event_id for r in stored}) == 200
    # Within one writer (one key), ids follow commit order.
    for writer in range(4):
        mine = [r for r in stored if r.key == str(writer).encode()]
        assert [int(r.value.split(b'"i":')[1].rstrip(b"}")) for r in mine] == list(range(50))


def test_async_session_and_connection(database_url: str, engine: Engine) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def scenario() -> None:
        async_engine = create_async_engine(database_url)
        async with AsyncSession(async_engine) as session:
            await enqueue(session, "t", b"rolled back")
            await session.rollback()
        async with AsyncSession(async_engine) as session, session.begin():
            await enqueue(session, "t", b"session")
            await enqueue_many(session, [Event("t", b"batch")])
        async with async_engine.begin() as conn:
            await enqueue(conn, "t", b"connection")
        await async_engine.dispose()

    asyncio.run(scenario())
    assert [r.value for r in rows(engine)] == [b"session", b"batch", b"connection"]


@pytest.mark.parametrize(("returned", "shape"), [
    (b"raw", "bytes"), (("text", None), "(str, NoneType)"), ((b"x", b"type"), "(bytes, bytes)"), ((b"x",), "(bytes)"),
])
def test_a_serializer_returning_the_wrong_shape_is_told_the_right_one(engine: Engine, returned: Any,
                                                                     shape: str) -> None:
    outbox = Outbox(serializer=lambda value: returned)
    with engine.begin() as conn, pytest.raises(errors.SerializationError) as raised:
        outbox.enqueue(conn, "t", {"x": 1})
    assert f"the serializer returned {shape}" in str(raised.value)
    assert "returns (bytes, content type str or None)" in str(raised.value)
    assert count(engine) == 0


def test_a_content_type_that_is_not_unicode_is_a_serialization_error(engine: Engine) -> None:
    outbox = Outbox(serializer=lambda value: (b"x", "text/\ud800"))
    with engine.begin() as conn, pytest.raises(errors.SerializationError, match=r"content type .* not valid Unicode"):
        outbox.enqueue(conn, "t", 1)
    assert count(engine) == 0


def test_misused_targets_are_told_what_to_pass_and_nothing_is_written(engine: Engine, database_url: str) -> None:
    import psycopg
    from sqlalchemy.orm import sessionmaker

    from outbox_relay.db.connection import conninfo

    with psycopg.connect(conninfo(database_url)) as raw, pytest.raises(errors.InvalidTarget,
                                                                       match="plain driver connection"):
        enqueue(raw, "t", b"x")  # type: ignore[call-overload]
    with pytest.raises(errors.InvalidTarget, match=r"an Engine .* engine\.begin\(\) as conn"):
        enqueue(engine, "t", b"x")  # type: ignore[call-overload]
    with pytest.raises(errors.InvalidTarget, match="session factory"):
        enqueue(sessionmaker(engine), "t", b"x")  # type: ignore[call-overload]
    with pytest.raises(errors.InvalidTarget, match=r"enqueue got builtins\.str"):
        enqueue("postgresql://db", "t", b"x")  # type: ignore[call-overload]
    with engine.begin() as conn:
        with pytest.raises(errors.InvalidEvent, match=r"event #0 is a dict: .*Event\(\*\*fields\)"):
            enqueue_many(conn, [{"topic": "t", "value": b"x"}])  # type: ignore[list-item]
        with pytest.raises(errors.InvalidEvent, match="a list of Event objects, not one Event"):
            enqueue_many(conn, Event("t", b"x"))  # type: ignore[arg-type]
    assert count(engine) == 0
    for error in (errors.InvalidTarget, errors.DuplicateEvent):
        assert issubclass(error, errors.OutboxError) and issubclass(error, ValueError)


def test_autocommit_connections_and_sessions_are_refused(engine: Engine) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn, pytest.raises(errors.InvalidTarget, match="AUTOCOMMIT"):
        enqueue(conn, "t", b"x")
    with Session(autocommit) as session, pytest.raises(errors.InvalidTarget, match="AUTOCOMMIT"):
        enqueue_many(session, [Event("t", b"x")])
    assert count(engine) == 0


def test_a_duplicate_event_id_is_an_outbox_error(engine: Engine) -> None:
    given = uuid.uuid4()
    with engine.begin() as conn:
        enqueue(conn, "t", b"first", event_id=given)
    with engine.connect() as conn:
        with pytest.raises(errors.DuplicateEvent, match=f"event_id {given} is already in the outbox.*roll it back"):
            enqueue(conn, "t", b"second", event_id=given)
        conn.rollback()
    with Session(engine) as session, pytest.raises(errors.DuplicateEvent, match="an event_id of this batch"):
        enqueue_many(session, [Event("t", b"a"), Event("t", b"b", event_id=given)])
    assert [r.value for r in rows(engine)] == [b"first"]


def test_a_subclass_of_async_session_takes_the_async_path(database_url: str, engine: Engine) -> None:
    """SQLModel's AsyncSession (the usual FastAPI stack) is a subclass defined in another module."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker

    class AppAsyncSession(AsyncSession):
        pass

    AppAsyncSession.__module__ = "sqlmodel.ext.asyncio.session"

    async def scenario() -> None:
        async_engine = create_async_engine(database_url)
        async with AppAsyncSession(async_engine) as session, session.begin():
            written = enqueue(session, "t", b"subclass")
            assert asyncio.iscoroutine(written)
            await written
        scoped = async_scoped_session(async_sessionmaker(async_engine), scopefunc=asyncio.current_task)
        async with scoped.begin():
            await enqueue(scoped, "t", b"scoped")  # type: ignore[call-overload]
        await scoped.remove()
        await async_engine.dispose()

    asyncio.run(scenario())
    assert [r.value for r in rows(engine)] == [b"subclass", b"scoped"]


def test_async_autocommit_is_refused(database_url: str, engine: Engine) -> None:
    async def scenario() -> None:
        async_engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
        async with async_engine.connect() as conn:
            with pytest.raises(errors.InvalidTarget, match="AUTOCOMMIT"):
                await enqueue(conn, "t", b"x")
        await async_engine.dispose()

    asyncio.run(scenario())
    assert count(engine) == 0


def test_the_documented_writer_role_can_enqueue_and_nothing_more(engine: Engine, database_url: str) -> None:
    role = f"writer_{uuid.uuid4().hex[:8]}"
    grants = (ROOT / "docs" / "least-privilege-writer.sql").read_text().replace("outbox_writer", role)
    with engine.begin() as conn:
        conn.exec_driver_sql(grants)
    limited = create_engine(database_url.replace("://outbox@", f"://{role}@"))
    try:
        with limited.begin() as conn:
            enqueue(conn, "t", b"one", key="k")
            enqueue_many(conn, [Event("t", b"two"), Event("t", b"three")])
        with Session(limited) as session, session.begin():
            enqueue(session, "t", b"four", delay=dt.timedelta(seconds=1))
        # Its inserts write unsent rows through the enqueue trigger (SECURITY DEFINER), and nothing else.
        for statement in (f"SELECT * FROM {EVENTS}", f"UPDATE {EVENTS} SET topic = 'x'", f"DELETE FROM {EVENTS}",
                          f"SELECT * FROM {SETTINGS}", f"SELECT * FROM {UNSENT}", f"DELETE FROM {UNSENT}",
                          f"INSERT INTO {UNSENT} (id, lane_key) VALUES (-1, 0)", f"SELECT * FROM {SENT}"):
            with pytest.raises(Exception, match="permission denied"), limited.begin() as conn:
                conn.exec_driver_sql(statement)
    finally:
        limited.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert [r.value for r in rows(engine)] == [b"one", b"two", b"three", b"four"]
