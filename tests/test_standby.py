"""PostgreSQL failures that lose committed writes, under writer load: a primary crashed and its
streaming standby promoted (the relay follows through a multi-host URL with
target_session_attrs=read-write), and one server crashed in immediate mode and restarted.

The development primary runs with synchronous_commit=off (like many production databases for
throughput): a crash may take the last commits with it, and an asynchronous standby lags. What an
application committed that the surviving server does not have is the application's loss, not the
relay's: each test tells them apart (the writers' committed event ids against the rows that
exist afterwards). The relay must lose nothing that exists, publish nothing twice and keep key
order, even though the marks of its last transactions may be gone too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from outbox_relay.db.connection import conninfo
from outbox_relay.verify import LedgerReport
from tests import kafkatools
from tests.pgtools import EVENTS
from tests.relaytools import ROOT, Relays, Writers, ledger, pending, service, wait_until
from tests.scenarios import LOAD_AFTER, Sampler, full_size_only, report_line

SERVICES = [sys.executable, str(ROOT / "scripts" / "services")]


def _env(*targets: str) -> dict[str, str]:
    out = subprocess.run([*SERVICES, "env", *targets], capture_output=True, text=True, check=True).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    return {key: value.strip("'") for key, value in pairs}


@pytest.fixture(params=["async"])
def standby(request: pytest.FixtureRequest, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A streaming standby of this test's database's server; yields a multi-host URL for the database.

    Afterwards the (crashed) primary runs again and the standby is gone, so the next test starts
    from the usual single server (this fixture is torn down before the database is dropped).
    """
    if request.param == "sync":
        monkeypatch.setenv("OUTBOX_SERVICES_STANDBY_SYNC", "1")
    up = subprocess.run([*SERVICES, "up", "standby"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"the PostgreSQL standby did not start (`scripts/services up standby`):\n{up.stderr}",
                    pytrace=False)
    name = make_url(database_url).database
    both = make_url(_env("standby")["OUTBOX_DATABASE_URL"]).set(database=name).render_as_string(hide_password=False)
    standby_port = make_url(both).query["host"][1].rsplit(":", 1)[1]

    def replicated() -> bool:
        try:
            with psycopg.connect(conninfo(database_url), port=standby_port, connect_timeout=2) as conn:
                return conn.execute(f"SELECT to_regclass('{EVENTS}') IS NOT NULL").fetchone() == (True,)
        except psycopg.OperationalError:
            return False

    wait_until(replicated, 30, "the test database on the standby")
    if request.param == "sync":  # commits wait for the standby (the dev primary's default is off)
        with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
    try:
        yield both
    finally:
        subprocess.run([*SERVICES, "resume", "replication"], capture_output=True)
        subprocess.run([*SERVICES, "up", "postgres"], capture_output=True, check=True)
        subprocess.run([*SERVICES, "down", "standby"], capture_output=True, check=True)


def existing_event_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(text(f"SELECT event_id::text FROM {EVENTS}"))}


def progress_ids(progress_topic: str) -> set[int]:
    """Every outbox id named by a committed progress record (what recovery trusts)."""
    ids: set[int] = set()
    for message in kafkatools.consume([progress_topic], expected=0, timeout=30, quiet=2.0):
        if message.value:
            ids.update(i for start, end in json.loads(message.value)["ids"] for i in range(start, end + 1))
    return ids


def judge(name: str, engine: Engine, topic: str, writers: Writers, recovery: float, detail: str,
          progress_topic: str) -> LedgerReport:
    """The ledger, with the application's own loss (committed, then gone with the server) told apart."""
    report = ledger(engine, [topic], timeout=120)
    application_lost = set(writers.committed) - existing_event_ids(engine)
    # Published before the crash, its row gone with the old primary: in Kafka with no row ("unknown").
    published_then_lost = application_lost & set(report.unknown)
    with engine.connect() as conn:
        missing = conn.execute(text(f"SELECT id FROM {EVENTS} WHERE event_id::text = ANY(:e)"),
                               {"e": report.sent_but_missing}).scalars().all()
    # A row marked sent that Kafka never got, whose id a progress record names: the id was handed out
    # again by the promoted standby's sequence, and recovery marked a different event under it.
    reissued = sorted(set(missing) & progress_ids(progress_topic)) if missing else []
    report_line(name, report, recovery,
                f"{detail}; the application lost {len(application_lost)} committed events with the server,"
                f" {len(published_then_lost)} of them already in Kafka"
                + (f"; {len(reissued)} rows marked sent by recovery under ids that a progress record names for"
                   f" an event lost with the old primary: {reissued[:10]}" if reissued else ""))
    assert not report.lost and not report.sent_but_missing, f"the relay lost events: {report.summary()}"
    assert not report.duplicates, f"published twice: {report.summary()}"
    assert not report.reordered, report.summary()
    assert set(report.unknown) <= application_lost, "Kafka has events the application never committed"
    return report


def test_multi_host_url_reaches_libpq_as_host_and_port_lists() -> None:
    url = "postgresql+psycopg://app@/shop?host=db-a:5432&host=db-b:5433&target_session_attrs=read-write"
    assert conninfo(url) == ("postgresql://app@/shop?host=db-a%2Cdb-b&port=5432%2C5433"
                             "&target_session_attrs=read-write")
    assert conninfo("postgresql+psycopg://app@db-a:5432/shop") == "postgresql://app@db-a:5432/shop"


def relay_settings() -> dict[str, str]:
    prefix = f"standby-{uuid.uuid4().hex[:8]}"
    return {"OUTBOX_BATCH_SIZE": "50", "OUTBOX_TRANSACTIONAL_ID_PREFIX": prefix,
            "OUTBOX_PROGRESS_TOPIC": f"{prefix}.progress"}


def _primary_crash_and_promotion(standby: str, topic: str, relays: Relays, lag: float, mode: str) -> None:
    engine = create_engine(standby, pool_pre_ping=True)
    settings = relay_settings()
    relay = relays.start(standby, **settings)
    try:
        with Sampler(engine) as sampler, Writers(engine, topic, threads=3) as writers:
            wait_until(lambda: sampler.sent >= 300, 90, "publishing to start")
            # The standby falls `lag` seconds behind, as a busy or distant one does, then the primary dies.
            service("pause", "replication")
            time.sleep(lag)
            crashed = time.monotonic()
            service("crash", "postgres")
            service("resume", "replication")
            service("promote")
            promoted = time.monotonic() - crashed
            wait_until(lambda: sampler.published_since(crashed + promoted) >= 100, 120,
                       "the relay to publish through the promoted standby")
            recovery = sampler.stall(crashed)
            time.sleep(LOAD_AFTER)
            writers.stop()
            wait_until(lambda: pending(engine) == 0, 180, "the relay to drain the new primary")
        assert relay.alive, f"the relay died instead of following the new primary:\n{relay.log()[-3000:]}"
        assert "took lane 0" in relay.log()
        relay.stop(timeout=60)
        recovered = [line.split("WARNING", 1)[-1].split(" lane=")[0].strip() for line in relay.log().splitlines()
                     if "recovered" in line]
        judge(f"primary crashed (immediate), {mode} standby promoted, relay follows by itself", engine, topic,
              writers,
              recovery, f"replication paused {lag:.0f}s before the crash; promoted {promoted:.1f}s after it;"
              f" the relay logged {recovered}", settings["OUTBOX_PROGRESS_TOPIC"])
    finally:
        if relay.alive:
            relay.stop(timeout=60)
        engine.dispose()


def test_primary_crashed_and_async_standby_promoted_under_load(standby: str, topic: str, relays: Relays) -> None:
    _primary_crash_and_promotion(standby, topic, relays, lag=1.0, mode="asynchronous")


@full_size_only
@pytest.mark.parametrize("standby", ["sync"], indirect=True)
def test_primary_crashed_and_synchronous_standby_promoted_under_load(standby: str, topic: str,
                                                                     relays: Relays) -> None:
    """synchronous_standby_names plus synchronous_commit=on: nothing committed is lost with the primary."""
    _primary_crash_and_promotion(standby, topic, relays, lag=1.0, mode="synchronous")


def test_postgres_crashed_in_immediate_mode_mid_drain(engine: Engine, database_url: str, topic: str,
                                                      relays: Relays, restores_services: None) -> None:
    """One server, no standby: `pg_ctl stop -m immediate` (no checkpoint, as in a crash), restarted 2 s later."""
    settings = relay_settings()
    relay = relays.start(database_url, **settings)
    try:
        with Sampler(engine) as sampler, Writers(engine, topic, threads=3) as writers:
            wait_until(lambda: sampler.sent >= 300, 90, "publishing to start")
            crashed = time.monotonic()
            service("crash", "postgres")
            time.sleep(2)
            service("up", "postgres")
            wait_until(lambda: sampler.published_since(crashed + 2) >= 100, 120, "the relay to publish again")
            recovery = sampler.stall(crashed)
            time.sleep(LOAD_AFTER)
            writers.stop()
            wait_until(lambda: pending(engine) == 0, 180, "the relay to drain")
        assert relay.alive, f"the relay died instead of recovering:\n{relay.log()[-3000:]}"
    finally:
        if relay.alive:
            relay.stop(timeout=60)
    judge("PostgreSQL crashed in immediate mode mid-drain, restarted", engine, topic, writers, recovery,
          "down 2s", settings["OUTBOX_PROGRESS_TOPIC"])

