"""docker-compose.yml cannot run here (no Docker engine), so check that it is consistent with the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from outbox_relay.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_their_startup_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "kafka", "migrate", "relay"}
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
    for name in ("migrate", "relay"):
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
