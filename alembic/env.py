"""Alembic environment of the outbox's own migration history.

The version table lives in the outbox schema under its own name, so this history never
collides with an application's own ``alembic_version``.
"""

import contextlib
import os
from collections.abc import Iterator

from sqlalchemy import create_engine, pool, text

from alembic import context
from outbox_relay.models import SCHEMA, metadata

VERSION_TABLE = "outbox_relay_version"

config = context.config
url: str = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or os.environ.get(
    "OUTBOX_DATABASE_URL", ""
)
if not url:
    raise SystemExit("no database URL: set OUTBOX_DATABASE_URL (e.g. postgresql+psycopg://user@host/db)")


def run_migrations_offline() -> None:
    """`outbox-relay migrate --sql`: the script, for a DBA to read and run (psql -f)."""
    context.configure(url=url, target_metadata=metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"},  # a literal % stays one % (the DO blocks' format())
                      version_table=VERSION_TABLE, version_table_schema=SCHEMA)
    context.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')  # the version table's home, before it is made
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(url, poolclass=pool.NullPool)
        with engine.connect() as conn:
            _run(conn)
        engine.dispose()
    else:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # `outbox-relay migrate --lock-timeout`: a statement queued for a table lock makes every later
    # writer of that table queue behind it, so it gives up; run again, each revision carries on from there.
    lock_timeout_ms = config.attributes.get("lock_timeout_ms")
    if lock_timeout_ms:
        connection.execute(text(f"SET lock_timeout = {int(lock_timeout_ms)}"))
    # The version table sits in the outbox schema, which must exist before Alembic looks for it.
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
    connection.commit()
    context.configure(connection=connection, target_metadata=metadata,
                      version_table=VERSION_TABLE, version_table_schema=SCHEMA, include_schemas=True,
                      include_name=lambda name, type_, parent: type_ != "schema" or name in (None, SCHEMA))
    if lock_timeout_ms:
        _autocommit_blocks_wait(context.get_context(), int(lock_timeout_ms))
    with context.begin_transaction():
        context.run_migrations()


def _autocommit_blocks_wait(migration, lock_timeout_ms: int) -> None:  # type: ignore[no-untyped-def]
    """A statement outside the migration's transaction (CREATE INDEX CONCURRENTLY, 0009's copy of the
    sent history) blocks no writer while it waits, so it waits, as it did before --lock-timeout. Given up,
    CONCURRENTLY (which waits for every older snapshot in the database, a pg_dump's too) left an INVALID
    index behind, which the next run's IF NOT EXISTS kept."""
    autocommit_block = migration.autocommit_block

    @contextlib.contextmanager
    def waiting_autocommit_block() -> Iterator[None]:
        with autocommit_block():
            migration.connection.execute(text("RESET lock_timeout"))  # the session's own setting
            yield
            migration.connection.execute(text(f"SET lock_timeout = {lock_timeout_ms}"))

    migration.autocommit_block = waiting_autocommit_block


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
