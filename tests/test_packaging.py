"""The built wheel, installed (not editable) into a fresh venv, used by an application laid out the usual
Flask/FastAPI way: its own ``models.py``, its own module named ``relay.py`` and its own Alembic history made
by ``alembic init`` (``prepend_sys_path = .``). The README's recipes are read from README.md and run
verbatim, so they cannot go stale.

One wheel and one venv per session (pip's cache and find-links keep it to seconds after the first run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox_relay.db.connection import conninfo
from outbox_relay.db.names import VERSION_TABLE
from outbox_relay.models import SCHEMA
from tests import kafkatools
from tests.pgtools import EVENTS, SETTINGS, UNSENT, scratch_database
from tests.relaytools import FAST, wait_until
from tests.test_monitoring import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_python(heading: str, index: int = 0) -> str:
    """The index-th ```python block of the README section that starts with `heading`."""
    start = README.index(heading)
    following = re.compile(r"^##+ ", re.MULTILINE).search(README, start + len(heading))
    blocks = re.findall(r"```python\n(.*?)```", README[start:following.start() if following else None], re.DOTALL)
    return str(blocks[index])


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a shell in which this venv is activated (nothing of the test's venv leaks in)."""
        base = {key: value for key, value in os.environ.items()
                if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not key.startswith("OUTBOX_")}
        return {**base, "VIRTUAL_ENV": str(self.path), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafkatools.bootstrap(), **extra}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tracked (and new, not ignored) files: what a release would ship."""
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(source)], source,
        dict(os.environ), timeout=300)
    (built,) = dist.glob("*.whl")
    assert built.name == "outbox_relay-0.1.0-py3-none-any.whl"  # the name the README's install shows
    return built


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A clean venv (no system site-packages) with the wheel and what the application itself needs."""
    env = Venv(tmp_path_factory.mktemp("venv") / "venv")
    subprocess.run([sys.executable, "-m", "venv", str(env.path)], check=True, timeout=120)
    run([str(env.bin / "python"), "-m", "pip", "install", "--quiet", str(wheel), "sqlalchemy[asyncio]"], env.path,
        env.env(), timeout=300)
    return env


def test_the_wheel_installs_one_package_named_outbox_relay(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"outbox_relay", "outbox_relay-0.1.0.dist-info"}, top
    for shipped in ("outbox_relay/py.typed", "outbox_relay/static/status.html", "outbox_relay/models/migration.py",
                    "outbox_relay/migrations/env.py", "outbox_relay/migrations/script.py.mako",
                    "outbox_relay/migrations/versions/0001_outbox.py", "outbox_relay/migrations/inbox/env.py",
                    "outbox_relay/migrations/inbox/script.py.mako",
                    "outbox_relay/migrations/inbox/versions/i0001_inbox.py", "outbox_relay/models/inbox_migration.py"):
        assert shipped in names


def test_readme_recipe_calls_every_migration_function_in_order() -> None:
    """The recipe's upgrade() is every create_/add_*_vN of models/migration.py by N, downgrade() the reverse."""
    from outbox_relay.models import migration

    def version(name: str) -> int:
        return int(name.rsplit("_v", 1)[1])

    functions = [name for name in vars(migration) if re.fullmatch(r"(create|add|drop)_\w+_v\d+", name)]
    ups = sorted((n for n in functions if not n.startswith("drop_")), key=version)
    downs = sorted((n for n in functions if n.startswith("drop_")), key=version, reverse=True)
    recipe = readme_python("### Using your own Alembic history")
    upgrade = recipe[recipe.index("def upgrade()"):recipe.index("def downgrade()")]
    downgrade = recipe[recipe.index("def downgrade()"):]
    assert re.findall(r"(\w+_v\d+)\(", upgrade) == ups
    assert re.findall(r"(\w+_v\d+)\(", downgrade) == downs
    assert len(ups) == len(downs) == max(version(n) for n in functions)



def test_changelog_announces_the_unreleased_changes_and_every_migration_function() -> None:
    import tomllib

    from outbox_relay.models import migration

    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert changelog.index("## Unreleased") < changelog.index(f"## {version}")
    unreleased = changelog[changelog.index("## Unreleased"):changelog.index(f"## {version}")]
    ports = re.findall(r'"(OUTBOX_SERVICES_\w+_PORT)", "(\d+)"', (ROOT / "scripts" / "services").read_text())
    assert len(ports) >= 3
    for needle in ["`outbox_relay`", *(name for name, _ in ports), *(port for _, port in ports)]:
        assert needle in unreleased, f"CHANGELOG's Unreleased section does not mention {needle}"
    # An application that owns its migrations learns from the changelog which functions to call.
    from outbox_relay.models import inbox_migration

    for name in [*vars(migration), *vars(inbox_migration)]:
        if re.fullmatch(r"(create|add)_\w+_v\d+", name):
            assert f"`{name}" in changelog, f"{name} is not in CHANGELOG.md"
    # Not on PyPI yet: the README must not tell anyone to pip install it by name.
    assert not re.search(r"pip install outbox-relay\b", README)

# --- the application --------------------------------------------------------------------------------

MODELS = '''\
"""The application's own models: a module named models, as Flask/FastAPI tutorials lay it out."""
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
'''

RELAY = '''\
"""The application's own module named relay: it must not shadow the library."""
import asyncio
import sys

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from models import Order


def place_order(engine):
{readme}

async def place_order_async(engine, topic):
    from outbox_relay import enqueue

    async with AsyncSession(engine) as session, session.begin():
        order = Order(customer="grace")
        session.add(order)
        await session.flush()
        await enqueue(session, topic, {{"order": order.id}}, key=order.customer)


if __name__ == "__main__":
    url, topic = sys.argv[1], sys.argv[2]
    engine = create_engine(url)
    place_order(engine)
    engine.dispose()

    async def main():
        engine = create_async_engine(url)
        await place_order_async(engine, topic)
        await engine.dispose()

    asyncio.run(main())
'''

APP_REVISION = '''\
import sqlalchemy as sa
from alembic import op


def upgrade() -> None:
    op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("customer", sa.String(100), nullable=False))


def downgrade() -> None:
    op.drop_table("orders")
'''


def revision(number: int, body: str) -> str:
    previous = f'"{number - 1:04d}"' if number > 1 else "None"
    return (f'"""revision {number}"""\nrevision = "{number:04d}"\ndown_revision = {previous}\n'
            f"branch_labels = None\ndepends_on = None\n\n{body}")


def make_app(venv: Venv, path: Path, database_url: str, revisions: list[str]) -> Path:
    """`alembic init alembic` as a user runs it, then the edits the README asks for in env.py."""
    # The services' role is named outbox, like the outbox's schema, so PostgreSQL's default search_path
    # ("$user", public) would put the outbox schema first (the README warns). An application's role starts in public.
    with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {make_url(database_url).database} SET search_path = public".encode())
    path.mkdir()
    (path / "models.py").write_text(MODELS)
    readme_write = readme_python("## Adopting the outbox in an application")
    (path / "relay.py").write_text(RELAY.format(readme=textwrap.indent(readme_write, "    ")))
    run(["alembic", "init", "alembic"], path, venv.env())
    ini = (path / "alembic.ini").read_text()
    assert re.search(r"^prepend_sys_path = \.$", ini, re.MULTILINE), "alembic init's default changed"
    (path / "alembic.ini").write_text(re.sub(r"^sqlalchemy\.url = .*$", f"sqlalchemy.url = {database_url}",
                                             ini, flags=re.MULTILINE))
    env_py = (path / "alembic" / "env.py").read_text()
    edits = {
        "target_metadata = None\n":
            "from models import Base\n\ntarget_metadata = Base.metadata\n\n"
            + readme_python("### Using your own Alembic history", 1),
        "connection=connection, target_metadata=target_metadata\n":
            "connection=connection, target_metadata=target_metadata,\n"
            "            include_schemas=True, include_name=include_name,\n",
    }
    for old, new in edits.items():
        assert old in env_py, f"alembic init's env.py has no {old!r}"
        env_py = env_py.replace(old, new)
    (path / "alembic" / "env.py").write_text(env_py)
    for number, body in enumerate([APP_REVISION, *revisions], start=1):
        (path / "alembic" / "versions" / f"{number:04d}_app.py").write_text(revision(number, body))
    return path


def outbox_schema(url: str) -> dict[str, Any]:
    """What the outbox schema holds, as PostgreSQL describes it (the version tables aside)."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default, generation_expression"
                   f" FROM information_schema.columns WHERE table_schema = '{SCHEMA}'"
                   f" AND table_name <> '{VERSION_TABLE}'",
        "indexes": f"SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = '{SCHEMA}'"
                   f" AND tablename <> '{VERSION_TABLE}'",
        "constraints": "SELECT conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
                       f" JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = '{SCHEMA}'"
                       f" AND conname <> '{VERSION_TABLE}_pkc'",
        "triggers": "SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    f" JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{SCHEMA}' AND NOT tgisinternal",
        "functions": "SELECT proname, prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                     f" WHERE n.nspname = '{SCHEMA}'",
        "storage": "SELECT c.relname, c.reloptions, t.reloptions FROM pg_class c JOIN pg_namespace n"
                   " ON n.oid = c.relnamespace LEFT JOIN pg_class t ON t.oid = c.reltoastrelid"
                   f" WHERE n.nspname = '{SCHEMA}' AND c.relkind = 'r' AND c.relname <> '{VERSION_TABLE}'",
        # The outbox id is random by design: each outbox its own. The rest must be identical.
        "settings": f"SELECT id, lane_count, resize_to FROM {SETTINGS}",
    }
    with psycopg.connect(conninfo(url)) as conn:
        conn.execute(b"SET search_path = pg_catalog")  # definitions spelled out in full, whatever the database's
        return {name: sorted(conn.execute(query.encode()).fetchall()) for name, query in queries.items()}


@pytest.fixture
def second_database(services: None) -> Iterator[str]:
    with scratch_database("outbox_app") as url:
        yield url


@pytest.fixture
def app_relay() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Relays the test starts; stopped at teardown whatever happened."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.timeout(900)
def test_an_application_with_its_own_models_relay_and_alembic_uses_the_wheel(
        venv: Venv, tmp_path: Path, empty_database_url: str, second_database: str, topic: str,
        app_relay: list[subprocess.Popen[bytes]]) -> None:
    recipe = readme_python("### Using your own Alembic history")
    app = make_app(venv, tmp_path / "app", empty_database_url, [recipe])
    env, path_env = venv.env(), venv.env(PYTHONPATH=".")

    # Its own Alembic history, with the README's recipe as one of its revisions; downgrade works too.
    run(["alembic", "upgrade", "head"], app, env)
    run(["alembic", "downgrade", "0001"], app, env)
    with psycopg.connect(conninfo(empty_database_url)) as conn:
        assert conn.execute("SELECT to_regclass(%s), to_regclass('orders')", (EVENTS,)).fetchone() == (
            None, "orders")
    run(["alembic", "upgrade", "head"], app, env)

    # Autogenerate with the README's filter proposes nothing; without it, it would drop the outbox.
    assert "No new upgrade operations detected" in run(["alembic", "check"], app, env)
    unfiltered = run(["python", "-c", textwrap.dedent(f"""
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext
        from sqlalchemy import create_engine
        from models import Base
        with create_engine({empty_database_url!r}).connect() as conn:
            context = MigrationContext.configure(conn, opts={{"include_schemas": True}})
            print(compare_metadata(context, Base.metadata))
        """)], app, env)
    assert "remove_table" in unfiltered and "events" in unfiltered

    # The README's write, sync and async, from the application's relay.py beside its models.py.
    run(["python", "relay.py", empty_database_url, topic], app, env)
    run(["python", "-c", f"import relay; import models; from sqlalchemy import create_engine;"
                         f" relay.place_order(create_engine({empty_database_url!r}))"], app, env)

    # The README's recipe makes exactly the schema `outbox-relay migrate` makes, run from the app's folder
    # (with its own alembic/, models.py and relay.py importable through PYTHONPATH=.).
    run(["outbox-relay", "migrate", "--lanes", "4", "--database-url", second_database], app, path_env)
    assert outbox_schema(empty_database_url) == outbox_schema(second_database)

    for command_env in (env, path_env):
        status = json.loads(_stdout(["outbox-relay", "status", "--json", "--database-url", empty_database_url],
                                    app, command_env))
        assert status["total"]["pending"] == 3 and status["lane_count"] == 4
        assert set(status["topics"]) == {"orders", topic}

    # The daemon from the app's folder publishes them and serves its status page (packaged in the wheel).
    if "orders" not in kafkatools.admin().list_topics(timeout=10).topics:
        kafkatools.create_topic("orders")
    port = free_port()
    with open(tmp_path / "relay.log", "wb") as log:
        app_relay.append(subprocess.Popen(["outbox-relay", "run"], cwd=app, stdout=log, stderr=subprocess.STDOUT,
                                          env={**path_env, **FAST, "OUTBOX_DATABASE_URL": empty_database_url,
                                               "OUTBOX_HTTP": str(port), "OUTBOX_BACKLOG_INTERVAL": "0.3"}))
    wait_until(lambda: _pending(empty_database_url) == 0 or app_relay[0].poll() is not None, 90,
               "the relay to publish the application's events")
    assert app_relay[0].poll() is None, (tmp_path / "relay.log").read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        assert b"outbox-relay status" in page.read()
    received = kafkatools.consume([topic], expected=1, timeout=30, quiet=1)
    assert [json.loads(m.value)["order"] for m in received] == [2]  # the async write (order 1 was sync)
    app_relay[0].send_signal(signal.SIGTERM)
    assert app_relay[0].wait(30) == 0, (tmp_path / "relay.log").read_text()


def test_an_application_that_adopted_0_1_0_upgrades_with_the_readme_revision(
        venv: Venv, tmp_path: Path, empty_database_url: str, second_database: str) -> None:
    """0.1.0's recipe stopped at v4 (v5 to v7 came after 0.1.0's recipe); the README's upgrade revision
    brings it to what `migrate` makes."""
    recipe = readme_python("### Using your own Alembic history")
    old = recipe
    for step in ("add_lane_index_v5", "drop_lane_index_v5", "add_outbox_identity_v6", "drop_outbox_identity_v6",
                 "add_instance_sessions_v7", "drop_instance_sessions_v7", "add_claim_indexes_v8",
                 "drop_claim_indexes_v8",
                 "add_unsent_table_v9", "drop_unsent_table_v9", "add_autovacuum_settings_v10",
                 "drop_autovacuum_settings_v10", "add_idle_lanes_v11", "drop_idle_lanes_v11",
                 "add_lane_kafka_names_v12", "drop_lane_kafka_names_v12"):
        old = old.replace(f"    {step}()\n", "")
    assert old != recipe
    upgrade = readme_python("### Using your own Alembic history", 2)
    app = make_app(venv, tmp_path / "app", empty_database_url, [old, upgrade])
    env = venv.env(PYTHONPATH=".")
    run(["alembic", "upgrade", "0002"], app, env)
    behind = outbox_schema(empty_database_url)
    run(["outbox-relay", "migrate", "--lanes", "4", "--database-url", second_database], app, env)
    assert behind != outbox_schema(second_database)
    run(["alembic", "upgrade", "head"], app, env)
    assert outbox_schema(empty_database_url) == outbox_schema(second_database)
    assert "No new upgrade operations detected" in run(["alembic", "check"], app, env)


# Appended to the README's revision: STOP_BEFORE=<function> makes the run fail where that function would
# start, as ^C, a lost connection or a lock timeout would, with whatever it committed so far left behind.
INTERRUPT = '''
import os

if os.environ.get("STOP_BEFORE"):
    def _interrupted(*args, **kwargs):
        raise RuntimeError(f"interrupted before {os.environ['STOP_BEFORE']}")

    globals()[os.environ["STOP_BEFORE"]] = _interrupted
'''


def test_the_readme_revision_runs_again_after_an_interrupted_run(
        venv: Venv, tmp_path: Path, empty_database_url: str, second_database: str) -> None:
    """One revision calling every function commits part-way (each CONCURRENTLY index build commits what
    came before it) and is stamped only at its end: the next run calls create_outbox_v1 again. Stopped
    after each commit, a writer's event written meanwhile, the run is repeated until it is done: it must
    make what `migrate` makes and keep every event."""
    app = make_app(venv, tmp_path / "app", empty_database_url,
                   [readme_python("### Using your own Alembic history") + INTERRUPT])
    env = venv.env(PYTHONPATH=".")
    run(["alembic", "upgrade", "0001"], app, env)
    written = 0
    for stop in ("add_lane_index_v5", "add_outbox_identity_v6", "add_unsent_table_v9",
                 "add_autovacuum_settings_v10"):
        failed = subprocess.run(["alembic", "upgrade", "head"], cwd=app, env={**env, "STOP_BEFORE": stop},
                                capture_output=True, text=True, timeout=180)
        assert failed.returncode != 0 and f"interrupted before {stop}" in failed.stderr, failed.stderr
        with psycopg.connect(conninfo(empty_database_url)) as conn:  # the outbox exists: applications write
            conn.execute(f"INSERT INTO {EVENTS} (topic) VALUES ('orders')".encode())
            written += 1
    run(["alembic", "upgrade", "head"], app, env)
    run(["outbox-relay", "migrate", "--lanes", "4", "--database-url", second_database], app, env)
    assert outbox_schema(empty_database_url) == outbox_schema(second_database)
    assert _pending(empty_database_url) == written == 4


def test_the_readme_revision_as_offline_sql_makes_what_migrate_makes(
        venv: Venv, tmp_path: Path, empty_database_url: str, second_database: str) -> None:
    """`alembic upgrade head --sql` writes the script a DBA runs later: no step may query (there is no
    database to ask), and the script must make what `migrate` makes."""
    app = make_app(venv, tmp_path / "app", empty_database_url, [readme_python("### Using your own Alembic history")])
    env = venv.env(PYTHONPATH=".")
    script = _stdout(["alembic", "upgrade", "head", "--sql"], app, env)
    with psycopg.connect(conninfo(empty_database_url), autocommit=True) as conn:
        for statement in script.split(";\n\n"):
            lines = [line for line in statement.strip().splitlines() if not line.startswith("--")]
            if lines:  # BEGIN and COMMIT too: the script's transactions are its own
                conn.execute("\n".join(lines).encode())
    run(["outbox-relay", "migrate", "--lanes", "4", "--database-url", second_database], app, env)
    assert outbox_schema(empty_database_url) == outbox_schema(second_database)


def _stdout(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _pending(url: str) -> int:
    with psycopg.connect(conninfo(url)) as conn:
        row = conn.execute(f"SELECT count(*) FROM {UNSENT}").fetchone()
    assert row is not None
    return int(row[0])
