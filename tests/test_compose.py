"""docker-compose.yml cannot run here (no Docker engine), so check that it is consistent with the code."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from outbox_relay.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_their_startup_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "kafka", "migrate", "relay", "writer"}
    assert services["relay"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "kafka": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("postgres", "kafka"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert services["migrate"]["command"] == ["migrate"] and services["relay"]["command"] == ["run"]
    assert services["relay"]["build"] == services["migrate"]["build"] == "."
    assert (ROOT / "Dockerfile").exists()


def test_kafka_is_the_same_major_version_as_the_local_broker() -> None:
    pom = (ROOT / "scripts" / "kafka" / "pom.xml").read_text()
    local = re.search(r"<kafka.version>(\d+)\.", pom)
    image = re.search(r"apache/kafka:(\d+)\.", compose()["services"]["kafka"]["image"])
    assert local and image and local.group(1) == image.group(1) == "4"
    env = compose()["services"]["kafka"]["environment"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1


def test_relay_environment_names_are_ones_the_relay_reads() -> None:
    known = {field.metadata["env"] for field in dataclasses.fields(Settings) if "env" in field.metadata}
    services = compose()["services"]
    for name in ("migrate", "relay", "writer"):
        for variable in services[name]["environment"]:
            assert variable in known, f"{name} sets {variable}, which the relay does not read"


def test_database_credentials_match_between_postgres_and_relay() -> None:
    services = compose()["services"]
    pg = services["postgres"]["environment"]
    url = services["relay"]["environment"]["OUTBOX_DATABASE_URL"]
    assert url == f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    bootstrap = services["relay"]["environment"]["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap.split(":")[0] == "kafka" and f"PLAINTEXT://{bootstrap}" in services["kafka"]["environment"][
        "KAFKA_ADVERTISED_LISTENERS"]


def host_ports() -> dict[str, list[int]]:
    ports: dict[str, list[int]] = {}
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            host = str(mapping).rpartition(":")[0]
            assert host, f"{name} maps {mapping}: give the host port explicitly"
            ports.setdefault(name, []).append(int(host))
    return ports


def test_host_ports_clear_the_local_services_and_the_ephemeral_range() -> None:
    services_script = (ROOT / "scripts" / "services").read_text()
    local = {int(port) for port in re.findall(r'os\.environ\.get\("OUTBOX_SERVICES_\w+_PORT", "(\d+)"\)',
                                              services_script)}
    assert {25432, 29092, 29093} <= local  # the single node; the cluster and the standby add more
    ports = host_ports()
    assert set(ports) == {"postgres", "kafka", "relay"}
    every = [port for mapped in ports.values() for port in mapped]
    assert len(every) == len(set(every)) and not set(every) & local
    assert all(1024 < port < 32768 for port in every), every  # below Linux's ephemeral range (32768-60999)
    # Kafka advertises to the host the port the host reaches it on.
    kafka = compose()["services"]["kafka"]["environment"]
    assert f"HOST://localhost:{ports['kafka'][0]}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert compose()["services"]["kafka"]["ports"] == [f"{ports['kafka'][0]}:{ports['kafka'][0]}"]
    assert f"HOST://:{ports['kafka'][0]}" in kafka["KAFKA_LISTENERS"]


def test_status_page_and_metrics_are_reachable_from_the_host() -> None:
    relay = compose()["services"]["relay"]
    host, port = relay["environment"]["OUTBOX_HTTP"].rsplit(":", 1)
    assert host == "0.0.0.0", "a bare port binds to 127.0.0.1 inside the container: unreachable through a mapping"
    assert [mapping.split(":")[1] for mapping in relay["ports"]] == [port]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_relay_has_time_to_shut_down_gracefully() -> None:
    relay = compose()["services"]["relay"]
    shutdown = float(relay["environment"].get("OUTBOX_SHUTDOWN_TIMEOUT", Settings().shutdown_timeout))
    assert _seconds(relay["stop_grace_period"]) >= shutdown + 5, "docker would SIGKILL a relay still shutting down"


def test_relay_healthcheck_asks_readyz_with_python(database_url: str, tmp_path: Path) -> None:
    """The healthcheck's command, run as Docker would against a real relay: 0 when ready, not 0 when gone."""
    from tests.relaytools import RelayProcess, wait_until
    from tests.test_monitoring import free_port, get_or_none

    relay = compose()["services"]["relay"]
    check = relay["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]  # the image has Python, not curl
    port = relay["environment"]["OUTBOX_HTTP"].rsplit(":", 1)[1]
    code = check["test"][3]
    assert f"http://127.0.0.1:{port}/readyz" in code
    local = free_port()
    code = code.replace(f":{port}/", f":{local}/")
    process = RelayProcess(database_url, tmp_path, OUTBOX_HTTP=str(local)).start()
    try:
        wait_until(lambda: get_or_none(f"http://127.0.0.1:{local}/readyz") == 200, 30, "the relay to be ready")
        assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
    finally:
        process.stop()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode != 0


def test_image_dependencies_are_pinned_within_the_project_ranges() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md alembic.ini constraints.txt ./" in dockerfile
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert dependency.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {dependency.specifier}"
        for extra in dependency.extras:  # psycopg[binary] -> psycopg-binary
            assert canonicalize_name(f"{name}-{extra}") in pins


def test_writer_commits_events_through_the_library(database_url: str) -> None:
    """The optional writer's program, run against a real database for a moment: events appear."""
    writer = compose()["services"]["writer"]
    assert writer["profiles"] == ["writer"] and writer["entrypoint"] == ["python", "-c"]
    assert writer["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    from sqlalchemy import create_engine, text

    process = subprocess.Popen([sys.executable, "-c", writer["command"][0]],
                               env={**os.environ, "OUTBOX_DATABASE_URL": database_url})
    engine = create_engine(database_url)
    try:
        from tests.relaytools import wait_until

        def events() -> int:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM outbox.events WHERE topic = 'demo.orders'"))
                           .scalar_one())

        wait_until(lambda: events() >= 3 or process.poll() is not None, 30, "the writer to commit events")
        assert process.poll() is None, "the writer exited"
    finally:
        process.kill()
        process.wait(10)
        engine.dispose()
