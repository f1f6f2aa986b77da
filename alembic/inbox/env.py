"""Alembic environment of the consumer inbox's own history (separate from the outbox's).

Its version table is ``<inbox schema>.outbox_inbox_version``: a consumer database needs no outbox
tables, and neither history ever sees the other's revisions.
"""

import os

from sqlalchemy import create_engine, pool, text

from alembic import context
from outbox_relay.models.inbox import INBOX_SCHEMA, INBOX_VERSION_TABLE, inbox_metadata

config = context.config
url: str = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or os.environ.get(
    "OUTBOX_DATABASE_URL", ""
)
if not url:
    raise SystemExit("no database URL: set OUTBOX_DATABASE_URL (e.g. postgresql+psycopg://user@host/db)")


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=inbox_metadata, literal_binds=True,
                      version_table=INBOX_VERSION_TABLE, version_table_schema=INBOX_SCHEMA)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{INBOX_SCHEMA}"'))
        connection.commit()
        context.configure(connection=connection, target_metadata=inbox_metadata,
                          version_table=INBOX_VERSION_TABLE, version_table_schema=INBOX_SCHEMA,
                          include_schemas=True,
                          include_name=lambda name, type_, parent: type_ != "schema" or name == INBOX_SCHEMA)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
