"""The lanes' named queries: ownership, lane management, claim and mark.

Each lane owner keeps one connection that holds the lane's advisory lock. Claims and marks run
on that same connection, so a relay whose connection (and with it the lock) is gone cannot mark
rows any more: ownership and writes fail together.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from typing import Any

import psycopg
from psycopg import generators, pq, sql

from outbox_relay import faults
from outbox_relay.db.connection import milliseconds, translate_errors, translated
from outbox_relay.db.names import EVENTS as _EVENTS
from outbox_relay.db.names import IDLE_LANES as _IDLE_LANES
from outbox_relay.db.names import INSTANCES as _INSTANCES
from outbox_relay.db.names import LANES as _LANES
from outbox_relay.db.names import LOCK_CLASS, RESIZE_LOCK, lane_index_name
from outbox_relay.db.names import SENT as _SENT
from outbox_relay.db.names import SETTINGS as _SETTINGS
from outbox_relay.db.names import UNSENT as _UNSENT
from outbox_relay.models import (
    EVENTS_READY_INDEX_PREFIX,
    LANE_INDEX_PREFIX,
    READY_INDEX_PREFIX,
    READY_PREDICATE,
    SCHEMA,
    SETTINGS_TABLE,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One claimed outbox event, as the publisher needs it."""

    id: int
    event_id: uuid.UUID
    topic: str
    key: bytes | None
    value: bytes | None
    header_names: list[str]
    header_values: list[bytes]
    partition: int | None
    attempts: int
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxState:
    """The deployment-wide settings relays follow, as one read sees them."""

    lane_count: int
    resizing: bool  # a lane-count change is under way: relays hold no lanes meanwhile
    outbox_id: str
    # The database as the server names it (current_database()), not as a URL spells it: a URL may name
    # it through PGDATABASE, `?dbname=` or a PgBouncer alias. Part of the default Kafka names.
    database: str = ""


_COLUMNS = sql.SQL(
    "e.id, e.event_id, e.topic, e.key, e.value, e.header_names, e.header_values, e.partition, u.attempts, e.created_at"
)
# The claim walks the narrow unsent table and reads each claimed event's row by its primary key.
# The lane count is written into the claim as a literal so that the planner matches the lane's
# ready index ((lane_key % N), id): each lane then walks only its own pending rows, in id order,
# however far the other lanes are behind. Delayed events (due_at set) are not in that index: they
# are found through the delayed index, by due time, so a claim reads only the delayed events that
# are due, never the ones still waiting.
# Ids of the lane's last batch, published but whose mark is still on its way, are left out (a
# hashed NOT IN: `<> ALL(array)` compared every row with every id, 30 ms per claim of 1,000).
# The lane count the claim was built for must still be the count: a relay that missed a change
# (`outbox-relay lanes set`) claims nothing rather than publish a key next to its new owner.
_CLAIM = sql.SQL(
    "SELECT * FROM ("
    "(SELECT {columns} FROM {unsent} u JOIN {events} e ON e.id = u.id"
    " WHERE u.state = 'pending' AND {ready} AND (u.lane_key %% {lanes}) = %(lane)s {hold}"
    " AND u.id NOT IN (SELECT unnest(%(unmarked)s::bigint[])) AND {current} ORDER BY u.id LIMIT %(limit)s)"
    " UNION ALL "
    "(SELECT {columns} FROM {unsent} u JOIN {events} e ON e.id = u.id"
    " WHERE u.state = 'pending' AND NOT {ready} AND u.due_at <= now() AND (u.lane_key %% {lanes}) = %(lane)s"
    " {hold} AND u.id NOT IN (SELECT unnest(%(unmarked)s::bigint[])) AND {current}"
    " ORDER BY u.due_at, u.id LIMIT %(limit)s)"
    ") c ORDER BY 1 LIMIT %(limit)s"
)
_CURRENT_COUNT = sql.SQL("EXISTS (SELECT 1 FROM {settings} WHERE id = 1 AND lane_count = {lanes})")
# A failed event holds back the later events of its key (per-key order over progress). Events of
# one key share a lane_key, which the failed index starts with. Whether any event is failed at all
# is asked once per claim (an InitPlan): usually none is, and no row needs the per-row probe.
_HOLD = sql.SQL(
    "AND (e.key IS NULL OR NOT EXISTS (SELECT 1 FROM {unsent} WHERE state = 'failed')"
    " OR NOT EXISTS (SELECT 1 FROM {unsent} fu JOIN {events} f ON f.id = fu.id"
    " WHERE fu.state = 'failed' AND fu.lane_key = u.lane_key AND fu.id < u.id AND f.key = e.key))"
)
# Marking sent: the batch's unsent rows go, one row of the sent table records them. Returns the
# number of rows that were still pending (no row at all when none was).
_MARK = (
    "WITH d AS (DELETE FROM {unsent} WHERE id = ANY({ids}) AND state = 'pending' RETURNING id)"
    " INSERT INTO {sent} (first_id, last_id, ids) SELECT min(id), max(id), array_agg(id ORDER BY id) FROM d"
    " HAVING count(*) > 0 RETURNING cardinality(ids)"
)


@translate_errors
class Store:
    """Named queries. Methods take the connection to run on; the lane's for lane work."""

    def __init__(self, hold_failed_keys: bool = True) -> None:
        self._hold = _HOLD.format(events=_EVENTS, unsent=_UNSENT) if hold_failed_keys else sql.SQL("")
        self._claims: dict[int, sql.Composed] = {}  # built once per lane count, not once per claim

    def claim_query(self, lanes: int) -> sql.Composed:
        if lanes not in self._claims:
            count = sql.Literal(int(lanes))
            self._claims[lanes] = _CLAIM.format(
                columns=_COLUMNS, events=_EVENTS, unsent=_UNSENT, lanes=count, hold=self._hold,
                ready=sql.SQL(f"({READY_PREDICATE})"),
                current=_CURRENT_COUNT.format(settings=_SETTINGS, lanes=count))
        return self._claims[lanes]

    @staticmethod
    def create_lane_index(conn: psycopg.Connection[Any], lanes: int) -> bool:
        """The index each lane's claim walks, for this lane count (built without blocking writers).

        True when an invalid index of that name was dropped first."""
        # A build that was stopped (^C, a lost connection) leaves an INVALID index, which claims cannot use
        # and writers still maintain, and which IF NOT EXISTS would keep for ever: drop it, unless another
        # `lanes set` is building it right now.
        leftover = conn.execute(
            "SELECT 1 FROM pg_index i WHERE i.indexrelid = to_regclass(%s) AND NOT i.indisvalid"
            " AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p"
            " WHERE p.index_relid = i.indexrelid AND p.datname = current_database())",
            (f'"{SCHEMA}"."{lane_index_name(lanes)}"',)).fetchone()
        if leftover:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(SCHEMA, lane_index_name(lanes))))
        conn.execute(sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {unsent} ((lane_key % {lanes}), id)"
            " WHERE state = 'pending' AND {ready}"
        ).format(name=sql.Identifier(lane_index_name(lanes)), unsent=_UNSENT, lanes=sql.Literal(int(lanes)),
                 ready=sql.SQL(READY_PREDICATE)))
        return leftover is not None

    @staticmethod
    def drop_lane_indexes_except(conn: psycopg.Connection[Any], lanes: int) -> list[str]:
        """Drop the lane indexes of every other count; returns their names.

        The previous count's, and any that a change stopped before it dropped them left behind (writers
        maintain them for nothing). Also those of releases before 0009 on the events table. An index some
        session is building right now is not this change's to drop."""
        keep = {lane_index_name(lanes), f"{EVENTS_READY_INDEX_PREFIX}{lanes}", f"{LANE_INDEX_PREFIX}{lanes}"}
        pattern = "^(" + "|".join(re.escape(prefix) for prefix in
                                  (READY_INDEX_PREFIX, EVENTS_READY_INDEX_PREFIX, LANE_INDEX_PREFIX)) + ")[0-9]+$"
        rows = conn.execute(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname ~ %s"
            " AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.indexrelid"
            " AND p.datname = current_database()) ORDER BY 1", (SCHEMA, pattern)).fetchall()
        dropped = [name for (name,) in rows if name not in keep]
        for name in dropped:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))
        return dropped

    @staticmethod
    def outbox_state(conn: psycopg.Connection[Any]) -> OutboxState:
        """The lane count, whether a lane-count change is under way right now, and the outbox's identity."""
        row = conn.execute(
            sql.SQL(
                "SELECT lane_count, resize_to IS NOT NULL AND EXISTS (SELECT 1 FROM pg_locks WHERE"
                " locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database()) AND classid = %s AND objid = %s AND objsubid = 2),"
                " outbox_id::text, current_database()::text FROM {} WHERE id = 1"
            ).format(_SETTINGS),
            (LOCK_CLASS, RESIZE_LOCK),
        ).fetchone()
        if row is None:
            raise LookupError(f"{SCHEMA}.{SETTINGS_TABLE} has no row; run `outbox-relay migrate`")
        return OutboxState(int(row[0]), bool(row[1]), str(row[2]), str(row[3]))

    @staticmethod
    def register_instance(conn: psycopg.Connection[Any], name: str, timeout_s: float) -> list[str]:
        """Say this instance is alive; returns the names of all live instances, sorted.

        Live: a heartbeat within the timeout (a hung instance stops counting) and its control
        session still there (a killed one stops counting at once, not after the timeout).
        """
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (name, backend_pid) VALUES (%s, pg_backend_pid())"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), backend_pid = pg_backend_pid()"
            ).format(_INSTANCES),
            (name,),
        )
        # Instances silent for ten timeouts are gone for good; forget them.
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE heartbeat_at < now() - make_interval(secs => %s)").format(_INSTANCES),
            (timeout_s * 10,),
        )
        rows = conn.execute(
            sql.SQL(
                "SELECT name FROM {} i WHERE heartbeat_at >= now() - make_interval(secs => %s)"
                " AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = i.backend_pid) ORDER BY name"
            ).format(_INSTANCES),
            (timeout_s,),
        ).fetchall()
        return [row[0] for row in rows]

    @staticmethod
    def terminate_stale_owners(conn: psycopg.Connection[Any], lanes: list[int], timeout_s: float) -> list[int]:
        """End the sessions holding these lanes whose owner has not shown a heartbeat within the timeout.

        A hung owner (stopped, swapping, frozen) keeps its session and so its advisory lock: its
        kernel answers keepalives. Ending its session frees the lane; Kafka fences its producer
        when the next owner takes the lane, so if it wakes up it can neither publish nor mark.
        Returns the lanes freed.
        """
        rows = conn.execute(
            sql.SQL(
                "SELECT l.objid::int, pg_terminate_backend(l.pid) FROM pg_locks l JOIN {} o ON o.lane = l.objid::int"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objsubid = 2"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND l.objid::int = ANY(%s) AND l.pid <> pg_backend_pid()"
                " AND o.heartbeat_at < now() - make_interval(secs => %s)"
            ).format(_LANES),
            (LOCK_CLASS, lanes, timeout_s),
        ).fetchall()
        return [row[0] for row in rows if row[1]]

    @staticmethod
    def deregister_instance(conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(_INSTANCES), (name,))

    @staticmethod
    def lock_resize(conn: psycopg.Connection[Any]) -> bool:
        """Take the resize lock; False if another lane-count change holds it. Under it, only this change
        builds or drops lane indexes. Clears the announce of a change that died (nobody holds the lock)."""
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, RESIZE_LOCK)).fetchone()
        if not (row and row[0]):
            return False
        conn.execute(sql.SQL("UPDATE {} SET resize_to = NULL WHERE id = 1 AND resize_to IS NOT NULL").format(
            _SETTINGS))
        return True

    @staticmethod
    def announce_resize(conn: psycopg.Connection[Any], lanes: int) -> None:
        """Announce the new lane count, under the resize lock: relays step back."""
        conn.execute(sql.SQL("UPDATE {} SET resize_to = %s WHERE id = 1").format(_SETTINGS), (lanes,))

    @staticmethod
    def unlock_resize(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, RESIZE_LOCK))

    @staticmethod
    def end_session_when_idle(conn: psycopg.Connection[Any], timeout_s: float) -> None:
        """PostgreSQL (14+) ends this session once it has been idle for the timeout: the bound on a hung
        `lanes set` that needs no privilege (relays of another role can neither see nor end its session)."""
        if conn.info.server_version >= 140000:
            conn.execute("SELECT set_config('idle_session_timeout', %s, false)",
                         (f"{milliseconds(timeout_s)}ms",))

    @staticmethod
    def show_life(conn: psycopg.Connection[Any]) -> None:
        """A statement, so that the session's state_change says its process is alive (see end_hung_resize)."""
        conn.execute("SELECT 1")

    @staticmethod
    def end_hung_resize(conn: psycopg.Connection[Any], timeout_s: float) -> list[int]:
        """End the session of a lane-count change that has shown no sign of life for the timeout.

        A stopped or frozen `lanes set` keeps its session, so the resize lock, and relays step back for
        ever. A live one runs a statement every second (``show_life``); one busy in a statement is
        alive. Its end is its death: relays carry on with the old count. Returns the pids ended.
        """
        rows = conn.execute(
            "SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.pid <> pg_backend_pid() AND a.state <> 'active'"
            " AND a.state_change < now() - make_interval(secs => %s)",
            (LOCK_CLASS, RESIZE_LOCK, timeout_s),
        ).fetchall()
        return [row[0] for row in rows if row[1]]

    @staticmethod
    def finish_resize(conn: psycopg.Connection[Any], lanes: int) -> None:
        conn.execute(
            sql.SQL("UPDATE {} SET lane_count = %s, resize_to = NULL WHERE id = 1").format(_SETTINGS), (lanes,)
        )

    @staticmethod
    def forget_sleepers(conn: psycopg.Connection[Any]) -> None:
        """While every lane's lock is held, no lane sleeps: rows left by a relay that died asleep, or
        numbered beyond a smaller count, would make commits notify for nobody."""
        conn.execute(sql.SQL("DELETE FROM {}").format(_IDLE_LANES))

    @staticmethod
    def try_lock_lane(conn: psycopg.Connection[Any], lane: int) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, lane)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def record_owner(conn: psycopg.Connection[Any], lane: int, owner: str) -> None:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (lane, owner, acquired_at, heartbeat_at) VALUES (%s, %s, now(), now())"
                " ON CONFLICT (lane) DO UPDATE SET owner = EXCLUDED.owner, acquired_at = now(), heartbeat_at = now()"
            ).format(_LANES),
            (lane, owner),
        )

    @staticmethod
    def kafka_names(conn: psycopg.Connection[Any], lane: int) -> tuple[str, str] | None:
        """The transactional.id and progress topic the lane's last owner published under (None: not recorded)."""
        row = conn.execute(
            sql.SQL("SELECT transactional_id, progress_topic FROM {} WHERE lane = %s").format(_LANES), (lane,)
        ).fetchone()
        return (row[0], row[1]) if row is not None and row[0] is not None and row[1] is not None else None

    @staticmethod
    def record_kafka_names(conn: psycopg.Connection[Any], lane: int, transactional_id: str,
                           progress_topic: str) -> None:
        """Before the lane's owner publishes anything: whoever takes the lane after it settles its work under these.

        Durable before it returns, unlike the lane session's other writes (``synchronous_commit=off``): a
        crash of PostgreSQL must not leave the names of an owner before this one. Unchanged names write nothing.
        """
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute(
                sql.SQL("UPDATE {} SET transactional_id = %s, progress_topic = %s WHERE lane = %s"
                        " AND (transactional_id, progress_topic) IS DISTINCT FROM (%s, %s)").format(_LANES),
                (transactional_id, progress_topic, lane, transactional_id, progress_topic),
            )

    @staticmethod
    def forget_kafka_names(conn: psycopg.Connection[Any]) -> None:
        """Every lane settled (a lane-count change): no owner's work is left under any names."""
        conn.execute(sql.SQL("UPDATE {} SET transactional_id = NULL, progress_topic = NULL").format(_LANES))

    @staticmethod
    def heartbeat(conn: psycopg.Connection[Any], lanes: list[int], owner: str) -> None:
        conn.execute(
            sql.SQL("UPDATE {} SET heartbeat_at = now() WHERE lane = ANY(%s) AND owner = %s").format(_LANES),
            (lanes, owner),
        )

    @staticmethod
    def holds_lane_lock(conn: psycopg.Connection[Any], lane: int) -> bool:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
            " AND classid = %s AND objid = %s AND objsubid = 2)", (LOCK_CLASS, lane)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def release_lane_lock(conn: psycopg.Connection[Any], lane: int) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, lane))

    @staticmethod
    def release_owner(conn: psycopg.Connection[Any], lane: int, owner: str) -> None:
        conn.execute(
            sql.SQL("UPDATE {} SET owner = NULL, heartbeat_at = now() WHERE lane = %s AND owner = %s").format(_LANES),
            (lane, owner),
        )
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, lane))

    @staticmethod
    def sleep(conn: psycopg.Connection[Any], lane: int) -> None:
        """The lane sleeps until a commit wakes it: from now on (until ``wake``) commits notify."""
        conn.execute(sql.SQL("INSERT INTO {} (lane) VALUES (%s) ON CONFLICT DO NOTHING").format(_IDLE_LANES),
                     (lane,))

    @staticmethod
    def wake(conn: psycopg.Connection[Any], lane: int) -> None:
        """The lane is publishing and claims again on its own: commits need not notify for it."""
        conn.execute(sql.SQL("DELETE FROM {} WHERE lane = %s").format(_IDLE_LANES), (lane,))

    def claim(self, conn: psycopg.Connection[Any], lane: int, lanes: int, limit: int,
              unmarked: list[int] | None = None) -> list[Row]:
        """The lane's next available pending events in id order, leaving out ``unmarked`` (published,
        mark under way). Reads only: the lock is the claim."""
        # Binary results: bytea arrives as is instead of hex text twice its size.
        cursor = conn.execute(self.claim_query(lanes), {"lane": lane, "limit": limit, "unmarked": unmarked or []},
                              binary=True)
        return [Row(*record) for record in cursor.fetchall()]

    @staticmethod
    def mark_sent(conn: psycopg.Connection[Any], ids: list[int]) -> int:
        """Mark published rows sent, in one statement; returns how many were still pending."""
        query = sql.SQL(_MARK).format(unsent=_UNSENT, sent=_SENT, ids=sql.SQL("%s::bigint[]"))
        if faults.armed("during_mark"):
            with conn.transaction():
                conn.execute(query, (ids,))
                faults.hit("during_mark")  # dies with the mark done but never committed
        row = conn.execute(query, (ids,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def send_mark(conn: psycopg.Connection[Any], ids: list[int]) -> MarkInFlight:
        """Send the mark of published rows and return at once: the lane publishes its next batch to
        Kafka while PostgreSQL writes this one. Nothing else may run on ``conn`` until
        ``MarkInFlight.wait`` returned, which is also when the mark is known to be committed.
        """
        return MarkInFlight(conn, ids)

    @staticmethod
    def mark_recovered(conn: psycopg.Connection[Any], events: list[tuple[int, str]]) -> tuple[int, int]:
        """Mark sent the rows that are these events (id and fingerprint match) and still pending.

        Returns (rows marked now, rows that are these events at all).
        """
        row = conn.execute(
            sql.SQL(
                "WITH r AS (SELECT * FROM unnest(%s::bigint[], %s::text[]) AS r(id, fp)),"
                # progress.matches: the UUID's first 32 bits, and 32 of its digest when the record has them.
                " m AS (SELECT e.id FROM {events} e JOIN r ON e.id = r.id"
                " AND left(e.event_id::text, 8) = left(r.fp, 8) AND (length(r.fp) = 8"
                " OR substr(r.fp, 9) = left(encode(sha256(convert_to(e.event_id::text, 'UTF8')), 'hex'), 8))),"
                " d AS (DELETE FROM {unsent} u USING m WHERE u.id = m.id AND u.state = 'pending' RETURNING u.id),"
                " s AS (INSERT INTO {sent} (first_id, last_id, ids) SELECT min(id), max(id), array_agg(id ORDER BY id)"
                " FROM d HAVING count(*) > 0 RETURNING 1)"
                " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM m)"
            ).format(events=_EVENTS, unsent=_UNSENT, sent=_SENT),
            ([i for i, _ in events], [fp for _, fp in events]),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    @staticmethod
    def record_failure(conn: psycopg.Connection[Any], event_id: int, error: str, park: bool) -> None:
        """Count a failed attempt; park the event as failed when it cannot or may no longer be retried."""
        conn.execute(
            sql.SQL(
                "UPDATE {} SET attempts = attempts + 1, last_error = %s,"
                " state = CASE WHEN %s THEN 'failed' ELSE state END WHERE id = %s AND state = 'pending'"
            ).format(_UNSENT),
            (error[:2000], park, event_id),
        )

    @staticmethod
    def name_session(conn: psycopg.Connection[Any], application_name: str) -> None:
        """What operators see in pg_stat_activity for this connection (a lane's, once it holds the lock)."""
        conn.execute("SELECT set_config('application_name', %s, false)", (application_name,))

_MARK_SENT = sql.SQL(_MARK).format(unsent=_UNSENT, sent=_SENT, ids=sql.SQL("$1::bigint[]"))


@translate_errors
class MarkInFlight:
    """One mark_sent statement sent on a lane connection, its result not read yet (see Store.send_mark).

    Sent as one autocommit statement (the protocol's Sync ends its implicit transaction), so the
    server commits it whether or not the relay reads the result. Marks of one lane commit in the
    order they were sent: a lane sends a mark only after the previous one's result came back.
    """

    def __init__(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        self._conn = conn
        self.ids = ids
        with translated():
            conn.pgconn.send_query_params(_MARK_SENT.as_bytes(conn), [("{" + ",".join(map(str, ids)) + "}").encode()])
            conn.wait(generators.send(conn.pgconn))
        self._done: int | None = None

    def wait(self) -> int:
        """Read the mark's result: how many rows were still pending. Raises what the statement raised."""
        if self._done is not None:
            return self._done
        results = self._conn.wait(generators.fetch_many(self._conn.pgconn))
        self._done = 0
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self._conn.info.encoding)
            if result.ntuples:  # one row (the count) when any row was still pending, none otherwise
                self._done = int(result.get_value(0, 0) or 0)
        return self._done
