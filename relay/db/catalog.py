"""What the database holds of the outbox: catalog reads for the schema check and `outbox-relay migrate`.

A handful of cheap reads, whatever the table's size.
"""

from __future__ import annotations

from psycopg import sql

from outbox_relay.db.connection import Connection, translated
from outbox_relay.db.names import SETTINGS, SETTINGS_REGCLASS, VERSION, VERSION_REGCLASS
from outbox_relay.models import EVENTS_TABLE, SCHEMA

_COLUMNS = (
    "SELECT c.relname, a.attname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
    " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')"
)
_INDEXES = "SELECT indexname FROM pg_indexes WHERE schemaname = %s"
# tgenabled: 'O' fires in ordinary sessions, 'A' always; 'D' is disabled, 'R' fires only while replicating.
_TRIGGER = (
    "SELECT t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s AND t.tgname = %s"
)
_VERSION_READABLE = "SELECT has_table_privilege(to_regclass(%s), 'SELECT')"


@translated()
def columns(conn: Connection) -> dict[str, set[str]]:
    """The columns of each table in the outbox's schema."""
    found: dict[str, set[str]] = {}
    for table, column in conn.execute(_COLUMNS, (SCHEMA,)):
        found.setdefault(table, set()).add(column)
    return found


@translated()
def indexes(conn: Connection) -> set[str]:
    return {row[0] for row in conn.execute(_INDEXES, (SCHEMA,))}


@translated()
def has_trigger(conn: Connection, name: str) -> bool:
    """Whether the events table has this trigger."""
    return conn.execute(_TRIGGER, (SCHEMA, EVENTS_TABLE, name)).fetchone() is not None


@translated()
def trigger_fires(conn: Connection, name: str) -> bool:
    """Whether the events table's trigger fires when an application inserts (not disabled by ALTER TABLE)."""
    row = conn.execute(_TRIGGER, (SCHEMA, EVENTS_TABLE, name)).fetchone()
    return row is not None and row[0] in ("O", "A")


@translated()
def lane_count(conn: Connection) -> int | None:
    """The outbox's lane count, or None when it has no settings table or no settings row."""
    exists = conn.execute("SELECT to_regclass(%s)", (SETTINGS_REGCLASS,)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(sql.SQL("SELECT lane_count FROM {} WHERE id = 1").format(SETTINGS)).fetchone()
    return int(row[0]) if row else None


@translated()
def managed_revision(conn: Connection) -> tuple[bool, str | None]:
    """(whether `outbox-relay migrate` manages the schema: its version table is there and readable,
    the revision it records)."""
    readable = conn.execute(_VERSION_READABLE, (VERSION_REGCLASS,)).fetchone()
    if not (readable and readable[0]):
        return False, None
    row = conn.execute(sql.SQL("SELECT max(version_num) FROM {}").format(VERSION)).fetchone()
    return True, row[0] if row else None


@translated()
def lock_holders(conn: Connection, waited_s: float = 0.0) -> list[str]:
    """Other sessions holding a lock on a table of the outbox's schema, oldest transaction first:
    'pid 4242 (billing, idle in transaction for 95s)'. After a wait of ``waited_s`` for a lock, only
    transactions at least that old: a conflicting request made meanwhile queued behind the waiter."""
    rows = conn.execute(
        "SELECT DISTINCT a.pid, a.application_name, a.state, extract(epoch FROM now() - a.xact_start)"
        " FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        # A clone of the same template has the same oids: only this database's locks.
        " WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND n.nspname = %s AND l.granted AND l.pid <> pg_backend_pid()"
        " AND a.xact_start <= now() - make_interval(secs => %s) ORDER BY 4 DESC",
        (SCHEMA, waited_s)).fetchall()
    return [f"pid {pid} ({name or 'no application_name'}, {state or 'state unknown'}"
            + (f" for {age:.0f}s)" if age is not None else ")") for pid, name, state, age in rows]
