"""The daemon does not load what only applications and migrations need (SQLAlchemy, Alembic): its
memory is the batch's, and the schema check it runs at start reads a manifest kept equal to the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from outbox_relay import schema
from outbox_relay.db.connection import conninfo, database_name, where
from outbox_relay.errors import ConfigurationError
from outbox_relay.migrate import script_location
from outbox_relay.models import metadata

# Every module `outbox-relay run` (and status, failed, replay, lanes, verify) imports.
DAEMON = ("outbox_relay.console", "outbox_relay.cli", "outbox_relay.daemon", "outbox_relay.schema", "outbox_relay.web",
          "outbox_relay.monitor", "outbox_relay.operations", "outbox_relay.resize", "outbox_relay.verify",
          "outbox_relay.db.retention")


def test_the_daemon_never_imports_sqlalchemy_or_alembic() -> None:
    code = (f"import {', '.join(DAEMON)}, sys\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic')}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_schema_manifest_is_what_the_models_and_the_history_declare() -> None:
    declared = {table.name: (tuple(c.name for c in table.columns), tuple(sorted(str(i.name) for i in table.indexes)))
                for table in metadata.tables.values()}
    assert {name: (columns, tuple(sorted(indexes))) for name, (columns, indexes) in schema.REQUIRED.items()} == declared
    head = ScriptDirectory(script_location()).get_current_head()
    assert head == schema.HEAD_REVISION


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://outbox@127.0.0.1:25432/outbox",
    "postgresql+psycopg://user:p%40ss%2Fw@db.example:6432/my%20db?sslmode=require",
    "postgresql://u@h/",
    "postgresql+psycopg://u@/outbox?host=a:5432&host=b:5433",
    "postgresql+psycopg://u@/outbox?host=/var/run/postgresql",
    # Generated passwords hold '#', '?' and '/' unencoded; SQLAlchemy reads them up to the '@'.
    "postgresql+psycopg://outbox:s3#cr?t/x@db.example:6432/orders",
    "postgresql+psycopg://outbox:a#b@db.example/orders?sslmode=require",
    "postgresql+psycopg://outbox:pw@db.example/orders#2",
])
def test_database_urls_read_as_sqlalchemy_reads_them(url: str) -> None:
    """The database name is part of the default transactional.id prefix: it must not change with the parser."""
    parsed = make_url(url)
    assert database_name(url) == (parsed.database or "")
    assert where(url).endswith(f"/{parsed.database or ''}")
    assert conninfo(url).startswith("postgresql://")
    # And libpq connects where SQLAlchemy's URL points, as whom it names.
    libpq = conninfo_to_dict(conninfo(url))
    assert (libpq.get("user"), libpq.get("password"), libpq.get("dbname") or None) == (
        parsed.username, parsed.password, parsed.database or None)
    if parsed.host:
        assert (libpq.get("host"), libpq.get("port")) == (parsed.host, parsed.port and str(parsed.port))


def test_several_hosts_become_libpq_lists() -> None:
    assert conninfo("postgresql+psycopg://u@/outbox?host=a:5432&host=b:5433&sslmode=require") == (
        "postgresql://u@/outbox?host=a%2Cb&port=5432%2C5433&sslmode=require")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "outbox", "postgresql+psycopg://u:secret@h:notaport/db"])
def test_a_url_that_is_not_postgresql_is_one_clear_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        conninfo(url)
        where(url)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_table_name_whose_derived_names_postgresql_would_cut_is_refused() -> None:
    """0009's ready lane index of the unsent table is the longest name made from OUTBOX_TABLE: a name
    PostgreSQL cuts at 63 silently makes a schema that `migrate` calls current and every command behind."""
    def names(table: str) -> subprocess.CompletedProcess[str]:
        code = "from outbox_relay.models import READY_INDEX_PREFIX; print(len(READY_INDEX_PREFIX + '1024'))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "OUTBOX_TABLE": table})

    fits = names("e" * 37)
    assert fits.returncode == 0 and int(fits.stdout) == 63
    refused = names("e" * 38)
    assert refused.returncode != 0 and "is 38 characters; at most 37" in refused.stderr


@pytest.mark.parametrize("variable", ["OUTBOX_TABLE", "OUTBOX_SCHEMA"])
def test_the_command_names_a_bad_schema_or_table_name_in_one_line(variable: str) -> None:
    """Both are read when the models are imported, before the CLI's own error handling: the console entry
    point catches it, so an operator's typo is one line and exit code 2 (usage), not a traceback."""
    command = Path(sys.executable).parent / "outbox-relay"
    result = subprocess.run([str(command), "status"], capture_output=True, text=True,
                            env={**os.environ, variable: "Orders-Outbox"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"outbox-relay: {variable}='Orders-Outbox' is not a plain lower-case SQL identifier ([a-z_][a-z0-9_]*, max 63)"
    ]


def test_a_bad_schema_name_is_one_line_from_python_dash_m() -> None:
    """OUTBOX_SCHEMA is read when the models are imported, before the CLI's error handling exists."""
    result = subprocess.run([sys.executable, "-m", "outbox_relay", "status"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "OUTBOX_SCHEMA": "bad name;"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("outbox-relay: OUTBOX_SCHEMA='bad name;' is not a plain lower-case SQL"
                                     " identifier ([a-z_][a-z0-9_]*, max 63)")
