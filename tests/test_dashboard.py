"""docs/grafana-dashboard.json and docs/alerts.yml query only metrics, and labels, that a real relay exposes:
a relay publishes (and parks one event, so every labelled family has samples) and its /metrics is scraped."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from outbox_relay import enqueue
from tests import kafkatools
from tests.relaytools import ROOT, RelayProcess, states, wait_until
from tests.test_monitoring import free_port, get, get_or_none

METRIC = re.compile(r"\boutbox_[a-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^}]*)\}")
TARGET_LABELS = {"instance", "job"}  # Prometheus adds them to every scraped series


def queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every dashboard panel target and every alert rule."""
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    found = [(f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", ""))
             for panel in dashboard["panels"] for target in panel.get("targets", [])]
    alerts = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    found += [(f"alert {rule['alert']}", rule["expr"], "") for group in alerts["groups"] for rule in group["rules"]]
    return found


def exposed(exposition: str) -> dict[str, set[str]]:
    """Sample name -> its label names, as Prometheus would scrape them."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_dashboard_is_importable() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "outbox-relay"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
    # Every metric the relay exports is on the dashboard.
    on_dashboard = {name for _, expr, _ in queries() for name in METRIC.findall(expr)}
    from outbox_relay.metrics import Metrics

    families = {family.name for family in Metrics().registry.collect()}
    assert all(any(name.startswith(family) for name in on_dashboard) for family in families), families


def test_every_panel_and_alert_queries_what_a_real_relay_exposes(engine: Engine, database_url: str, topic: str,
                                                                  tmp_path: Path) -> None:
    small = kafkatools.create_topic(f"small-{uuid.uuid4().hex[:12]}", 1, {"max.message.bytes": "1000"})
    with engine.begin() as conn:
        for n in range(10):
            enqueue(conn, topic, {"n": n}, key=str(n % 3))
        enqueue(conn, small, os.urandom(3000), key="big")  # over the topic's limit: parked, a failure counted
    port = free_port()
    relay = RelayProcess(database_url, tmp_path, OUTBOX_HTTP=str(port), OUTBOX_BACKLOG_INTERVAL="0.3",
                         OUTBOX_RETENTION_HOURS="1", OUTBOX_RETENTION_INTERVAL="0.5").start()
    try:
        wait_until(lambda: states(engine) == {"sent": 10, "failed": 1}, 60, "publishing and parking")
        wait_until(lambda: get_or_none(f"http://127.0.0.1:{port}/readyz") == 200, 30, "readiness")
        names = exposed(get(f"http://127.0.0.1:{port}/metrics")[1].decode())
    finally:
        relay.stop()

    problems = []
    for where, expr, legend in queries():
        metrics = METRIC.findall(expr)
        if not metrics:
            problems.append(f"{where}: queries no outbox metric: {expr}")
        missing = [name for name in metrics if name not in names]
        if missing:
            problems.append(f"{where}: {missing} not exposed by the relay")
            continue
        labels = set().union(*(names[name] for name in metrics)) | TARGET_LABELS
        used = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
        used |= {m.split("=")[0].strip(" !~") for group in MATCHER.findall(expr.replace("{{", "").replace("}}", ""))
                 for m in group.split(",") if m.strip()}
        used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if used - labels:
            problems.append(f"{where}: labels {sorted(used - labels)} not on {metrics}")
    assert not problems, "\n".join(problems)
