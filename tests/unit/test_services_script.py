"""scripts/services without starting anything: the parts that decide whether a fresh machine can start Kafka."""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
from types import ModuleType

from tests.relaytools import ROOT


def _services() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("services_script", str(ROOT / "scripts" / "services"))
    spec = importlib.util.spec_from_loader("services_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_a_cluster_id_never_starts_with_a_dash() -> None:
    services = _services()
    dash_first = bytes([0xF8]) + bytes(15)  # 0b111110.. encodes as '-' in URL-safe base64
    assert base64.urlsafe_b64encode(dash_first).decode().startswith("-")

    cluster_id = services.new_cluster_id(dash_first)

    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22


def test_development_ports_lie_outside_the_ephemeral_range() -> None:
    # A reconnecting client may be given any port of 32768-60999 as its own, and then Kafka cannot bind it.
    services = _services()
    cluster = [node.port for node in services.NODES.values()]
    for port in (services.PG_PORT, services.KAFKA_PORT, services.CONTROLLER_PORT, services.STANDBY_PORT, *cluster):
        assert not 32768 <= port <= 60999, port


def test_the_bench_postgres_has_production_durability_and_the_dev_one_stays_fast() -> None:
    services = _services()

    bench = dict(line.split(" = ") for line in services.BENCH_PG.settings.splitlines())
    dev = dict(line.split(" = ") for line in services.DEV_PG.settings.splitlines())

    assert bench["fsync"] == bench["synchronous_commit"] == bench["full_page_writes"] == "on"
    assert bench["wal_level"] == "logical"  # Debezium's replication slot
    assert dev == {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    assert services.BENCH_PG.dir != services.DEV_PG.dir and services.BENCH_PG.port != services.DEV_PG.port
