"""Monitoring against the real services: status CLI, metrics and health over HTTP, the status page
in a real headless Chromium, replay, retention and JSON logs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from outbox_relay import enqueue
from outbox_relay.db.connection import connect
from outbox_relay.db.monitor import STATUS_QUERIES
from outbox_relay.models import EVENTS_TABLE, READY_INDEX_PREFIX, SENT_TABLE
from tests import kafkatools
from tests.pgtools import EVENTS, SENT, UNSENT, set_state_sql
from tests.relaytools import Relays, cli, free_port, pending, set_lane_count, states, wait_until


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def seed(engine: Engine, topic: str) -> None:
    """3 claimable, 2 delayed, 1 failed, 4 sent in the last minute; 2 of the claimable 2 minutes old."""
    with engine.begin() as conn:
        for n in range(3):
            enqueue(conn, topic, {"n": n}, key="a")
        for n in range(2):
            enqueue(conn, topic, {"late": n}, key="b", delay=dt.timedelta(hours=1))
        for n in range(5):
            enqueue(conn, "other.topic", {"n": n}, key="c")
        conn.execute(text(f"UPDATE {EVENTS} SET created_at = now() - interval '2 minutes' WHERE id IN (1, 2)"))
        conn.execute(text(set_state_sql("sent", f"e.topic = 'other.topic' AND e.id < (SELECT max(id) FROM {EVENTS})")))
        conn.execute(text(set_state_sql("failed", f"e.id = (SELECT max(id) FROM {EVENTS})", last_error="'boom'")))


def test_status_reports_the_backlog_and_exits_on_thresholds(engine: Engine, database_url: str) -> None:
    seed(engine, "orders")
    result = cli(database_url, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["topics"]["orders"] | {"oldest_claimable_age_s": None} == {
        "pending": 5, "claimable": 3, "delayed": 2, "held": 0, "failed": 0, "sent_last_minute": 0,
        "oldest_claimable_age_s": None}
    assert 110 < status["topics"]["orders"]["oldest_claimable_age_s"] < 300
    assert status["topics"]["other.topic"] | {"oldest_claimable_age_s": None} == {
        "pending": 0, "claimable": 0, "delayed": 0, "held": 0, "failed": 1, "sent_last_minute": 4,
        "oldest_claimable_age_s": None}
    assert status["total"]["pending"] == 5 and status["total"]["failed"] == 1
    assert status["lanes"]["0"]["pending"] == 5 and status["lane_count"] == 1 and not status["capped"]

    table = cli(database_url, "status").stdout
    assert "topic orders" in table and "topic other.topic" in table and "lane 0: (free)" in table

    assert cli(database_url, "status", "--max-age", "600", "--max-pending", "5", "--max-failed", "1").returncode == 0
    breached = cli(database_url, "status", "--max-age", "60", "--max-pending", "4", "--max-failed", "0")
    assert breached.returncode == 3
    assert breached.stdout.count("THRESHOLD:") == 3 and "oldest claimable event is" in breached.stdout


def test_status_queries_walk_partial_indexes_not_the_table(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {EVENTS} (topic, key) SELECT 'history',"
                          " convert_to('k' || (i % 100), 'UTF8') FROM generate_series(1, 200000) i"))
        for first in range(1, 200_000, 1000):  # sent an hour ago, in batches of 1000
            conn.execute(text(set_state_sql("sent", f"e.id BETWEEN {first} AND {first + 999}",
                                            sent_at="now() - interval '1 hour'")))
        for n in range(50):
            enqueue(conn, "live", {"n": n}, key=str(n % 7))
        conn.execute(text(set_state_sql("failed", "e.id = 200001")))
        for table in (EVENTS, UNSENT, SENT):
            conn.execute(text(f"ANALYZE {table}"))
    with connect(database_url) as conn:
        for query in STATUS_QUERIES:
            plan = "\n".join(row[0] for row in conn.execute(b"EXPLAIN " + query.as_bytes(conn),
                                                             {"lanes": 1, "cap": 1_000_000, "hold": True}))
            # The unsent table is the backlog (it may be read whole); events and sent batches only by index.
            assert f"Seq Scan on {EVENTS_TABLE} " not in plan and f"Seq Scan on {SENT_TABLE} " not in plan, plan


def test_metrics_health_and_readiness_over_http(engine: Engine, database_url: str, topic: str,
                                                 relays: Relays) -> None:
    port = free_port()
    relay = relays.start(database_url, OUTBOX_HTTP=str(port), OUTBOX_BACKLOG_INTERVAL="0.3")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_or_none(f"{base}/readyz") == 200, 30, "the relay to be ready")
    with engine.begin() as conn:
        for n in range(40):
            enqueue(conn, topic, {"n": n}, key=str(n % 3))
        enqueue(conn, topic, b"later", delay=dt.timedelta(hours=1))
    wait_until(lambda: pending(engine) == 1, 30, "the relay to publish")
    wait_until(lambda: metric(f"{base}/metrics", f'outbox_pending_events{{topic="{topic}"}}') == 1.0, 10,
               "the backlog gauge to show the delayed event")
    text_ = get(f"{base}/metrics")[1].decode()
    assert metric_value(text_, 'outbox_published_events_total{lane="0"}') == 40
    assert metric_value(text_, f'outbox_claimable_events{{topic="{topic}"}}') == 0
    assert metric_value(text_, 'outbox_lane_owned{lane="0"}') == 1
    assert metric_value(text_, "outbox_commit_to_ack_seconds_count") == 40
    assert metric_value(text_, "outbox_batch_size_events_sum") == 40
    assert metric_value(text_, "outbox_transaction_duration_seconds_count") >= 1
    assert metric_value(text_, 'outbox_circuit_open{lane="0",system="kafka"}') == 0
    assert get(f"{base}/healthz")[0] == 200
    code, body = get(f"{base}/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "problems": []}
    status = json.loads(get(f"{base}/api/status")[1])
    assert status["snapshot"]["topics"][topic]["delayed"] == 1 and len(status["history"]) >= 1
    relay.stop()


def test_readiness_fails_when_kafka_is_unreachable(database_url: str, relays: Relays) -> None:
    port = free_port()
    relay = relays.start(database_url, OUTBOX_HTTP=str(port), OUTBOX_SHUTDOWN_TIMEOUT="3",
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    wait_until(lambda: get_or_none(f"http://127.0.0.1:{port}/healthz") == 200, 30, "the HTTP server")
    # Until its first lane-management pass ends, the relay also says "taking lanes": wait for that pass.
    code, _ = wait_until(lambda: (r := get(f"http://127.0.0.1:{port}/readyz")) and
                            json.loads(r[1])["problems"] == ["no Kafka producer for lanes [0]"] and r, 30,
                            "readiness to name the problem, and only it")
    assert code == 503
    relay.stop()


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def metric_value(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def metric(url: str, name: str) -> float | None:
    try:
        return metric_value(get(url)[1].decode(), name)
    except AssertionError:
        return None


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package", pytrace=False)
    return path


def browse(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90)


def test_status_page_in_headless_chromium(engine: Engine, database_url: str, tmp_path: Path,
                                          relays: Relays) -> None:
    seed(engine, "orders")
    port = free_port()
    relay = relays.start(database_url, OUTBOX_HTTP=str(port), OUTBOX_BACKLOG_INTERVAL="0.3",
                         OUTBOX_SHUTDOWN_TIMEOUT="3",
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")  # nothing moves
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: (get_or_none(url + "api/status") == 200
                        and json.loads(get(url + "api/status")[1])["snapshot"] is not None), 30, "a snapshot")
    dom = browse(url, "--dump-dom").stdout
    screenshot = tmp_path / "status.png"
    browse(url, f"--screenshot={screenshot}", "--window-size=412,1100")  # a phone's width
    relay.stop()
    # The page rendered the figures (its script ran against /api/status)...
    assert '<div class="v" id="pending">5</div>' in dom and '<div class="v" id="failed">1</div>' in dom
    assert '<div class="v" id="claimable">3</div>' in dom and "<td>orders</td>" in dom
    # ...and a person looking at the screenshot sees them: OCR of the real pixels.
    ocr = subprocess.run(["tesseract", str(screenshot), "-", "--psm", "11"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "pending" in ocr and "orders" in ocr and "claimable" in ocr, ocr
    assert "not ready" in ocr, ocr  # Kafka is unreachable here, and the page says so


def test_retention_deletes_old_sent_and_discarded_events_only(engine: Engine, database_url: str, topic: str,
                                                              relays: Relays) -> None:
    with engine.begin() as conn:
        for n in range(30):
            enqueue(conn, topic, {"n": n})
        conn.execute(text(set_state_sql("sent", "e.id <= 10", sent_at="now() - interval '10 days'")))
        conn.execute(text(set_state_sql("sent", "e.id BETWEEN 11 AND 15", sent_at="now() - interval '1 hour'")))
        conn.execute(text(f"UPDATE {EVENTS} SET created_at = now() - interval '10 days' WHERE id BETWEEN 16 AND 20"))
        conn.execute(text(set_state_sql("discarded", "e.id BETWEEN 16 AND 18")))
        conn.execute(text(set_state_sql("failed", "e.id BETWEEN 19 AND 20")))
    relay = relays.start(database_url, OUTBOX_RETENTION_HOURS="24", OUTBOX_RETENTION_INTERVAL="0.5")
    wait_until(lambda: states(engine) == {"sent": 15, "failed": 2}, 30, "retention and publishing")
    relay.stop()
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(text(f"SELECT id FROM {EVENTS} ORDER BY id"))]
    assert ids == [*range(11, 16), 19, 20, *range(21, 31)]
    assert "retention deleted 13 sent or discarded events" in relay.log()


def test_replay_republishes_sent_events_marked_as_replays(engine: Engine, database_url: str, topic: str,
                                                          relays: Relays) -> None:
    with engine.begin() as conn:
        originals = [str(enqueue(conn, topic, {"n": n}, key="k")) for n in range(5)]
    relay = relays.start(database_url)
    wait_until(lambda: pending(engine) == 0, 30, "first publication")
    assert "would queue 2" in cli(database_url, "replay", "--id", "2", "--id", "3", "--dry-run").stdout
    assert "queued 2" in cli(database_url, "replay", "--id", "2", "--id", "3").stdout
    assert cli(database_url, "replay").returncode == 2  # nothing selected: refuse, say why
    wait_until(lambda: states(engine) == {"sent": 7}, 30, "the replays to be published")
    relay.stop()
    received = kafkatools.consume([topic], expected=7, quiet=1.0)
    replays = [dict(m.headers).get("outbox-replay-of") for m in received]
    assert [r.decode() for r in replays if r] == originals[1:3]
    assert [m.value for m in received][-2:] == [b'{"n":1}', b'{"n":2}']


def test_json_logs_name_the_event_topic_and_lane(engine: Engine, database_url: str, relays: Relays) -> None:
    topic = kafkatools.create_topic(f"json-{uuid.uuid4().hex[:12]}", 1, {"max.message.bytes": "1000"})
    with engine.begin() as conn:
        bad = enqueue(conn, topic, os.urandom(3000), key="k")  # over the topic limit, even compressed
    relay = relays.start(database_url, OUTBOX_LOG_FORMAT="json")
    wait_until(lambda: states(engine) == {"failed": 1}, 30, "the event to be parked")
    relay.stop()
    lines = [json.loads(line) for line in relay.log().splitlines() if line.strip()]
    parked = [entry for entry in lines if entry.get("action") == "event_parked"]
    assert parked and parked[0]["event_id"] == str(bad) and parked[0]["topic"] == topic and parked[0]["lane"] == 0
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)



def test_each_lane_claims_through_its_own_index(engine: Engine, database_url: str) -> None:
    from outbox_relay.db.lanes import Store

    set_lane_count(engine, 4)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {EVENTS} (topic, key) SELECT 't', convert_to('k' || i, 'UTF8')"
                          " FROM generate_series(1, 20000) i"))
        conn.execute(text(f"ANALYZE {EVENTS}"))
        conn.execute(text(f"ANALYZE {UNSENT}"))
    with connect(database_url, lane=True) as conn:
        plan = "\n".join(row[0] for row in conn.execute(
            b"EXPLAIN " + Store().claim_query(4).as_bytes(conn), {"lane": 2, "limit": 1000, "unmarked": []}))
    assert f"Index Scan using {READY_INDEX_PREFIX}4" in plan, plan


def seed_held(engine: Engine) -> list[str]:
    """Key "k": a failed event (2 minutes old) with 3 events held behind it; key "free": 1 claimable event.

    Returns the failed event's id (UUID)."""
    with engine.begin() as conn:
        failed = str(enqueue(conn, "orders", b"poison", key="k"))
        for n in range(3):
            enqueue(conn, "orders", {"n": n}, key="k")
        enqueue(conn, "orders", b"free", key="free")
        conn.execute(text(f"UPDATE {EVENTS} SET created_at = now() - interval '2 minutes' WHERE key = 'k'"))
        conn.execute(text(set_state_sql("failed", "e.id = 1", last_error="'MSG_SIZE_TOO_LARGE: too big'", attempts=3)))
    return [failed]


def test_events_held_behind_a_failed_key_are_reported_as_held(engine: Engine, database_url: str) -> None:
    seed_held(engine)
    status = json.loads(cli(database_url, "status", "--json").stdout)
    orders = status["topics"]["orders"]
    assert (orders["pending"], orders["claimable"], orders["held"], orders["delayed"], orders["failed"]) == (4, 1, 3,
                                                                                                          0, 1)
    assert orders["oldest_claimable_age_s"] < 60 and status["total"]["oldest_claimable_age_s"] < 60
    assert status["lanes"]["0"]["held"] == 3
    # The held events do not make the relay look slow: they wait for an operator, and status says so.
    assert cli(database_url, "status", "--max-age", "60").returncode == 0
    table = cli(database_url, "status").stdout
    assert "HELD" in table and "3 pending events wait behind failed events" in table
    # With the skip policy nothing is held: the same events are claimable.
    skip = json.loads(cli(database_url, "status", "--json", "--failed-key-policy", "skip").stdout)
    assert (skip["total"]["claimable"], skip["total"]["held"]) == (4, 0)
    assert skip["total"]["oldest_claimable_age_s"] > 100

    # Metrics (and the status page, which shows the same snapshot) carry the held count.
    from outbox_relay.metrics import Metrics
    from outbox_relay.monitor import snapshot

    metrics = Metrics()
    with connect(database_url) as conn:
        metrics.observe_backlog(snapshot(conn))
    exposition = metrics.exposition().decode()
    assert metric_value(exposition, 'outbox_held_events{topic="orders"}') == 3
    assert metric_value(exposition, 'outbox_claimable_events{topic="orders"}') == 1
    assert metric_value(exposition, "outbox_oldest_claimable_age_seconds") < 60
    assert metrics.last_snapshot is not None and metrics.last_snapshot.to_json()["total"]["held"] == 3


def test_failed_list_shows_keys_and_what_they_hold_and_ids_take_uuids(engine: Engine, database_url: str) -> None:
    (failed,) = seed_held(engine)
    listing = cli(database_url, "failed", "list").stdout
    assert "1 failed  topics: orders  keys: 'k'  holding 3 pending" in listing
    assert f"first ids: 1 ({failed})" in listing and "MSG_SIZE_TOO_LARGE: too big" in listing
    (group,) = json.loads(cli(database_url, "failed", "list", "--json").stdout)
    assert group | {"error": None} == {"error": None, "count": 1, "topics": ["orders"], "first_ids": [1],
                                       "first_event_ids": [failed], "keys": ["k"], "key_count": 1, "held": 3}
    lanes = json.loads(cli(database_url, "lanes", "show", "--json").stdout)
    assert lanes["lane_count"] == 1 and lanes["owners"] == [] and lanes["instances"] == []
    # The event id from a log line or a header works wherever a row id does.
    assert cli(database_url, "failed", "retry", "--id", failed, "--dry-run").stdout.strip() == \
        "retry: would change 1 failed event"
    assert cli(database_url, "failed", "discard", "--id", failed).stdout.strip() == "discard: changed 1 failed event"
    assert states(engine) == {"discarded": 1, "pending": 4}
    # An id that is no failed event's (here: the one just discarded) changes nothing, and says why.
    assert cli(database_url, "failed", "discard", "--id", failed).stdout.strip() == (
        "discard: changed 0 failed events (none of the failed events matches; see `outbox-relay failed list`)")
    bad = cli(database_url, "failed", "retry", "--id", "not-an-id")
    assert bad.returncode == 2 and "neither a row id nor an event id" in bad.stderr


MARKUP_OWNER = '<img src=x onerror="document.body.dataset.xss=1">'


def test_status_page_shows_database_text_as_text_and_labels_its_chart(engine: Engine, database_url: str,
                                                                       relays: Relays) -> None:
    """Lane owners are free text (OUTBOX_INSTANCE): markup in one is shown, never run. HEAD answers like GET."""
    seed(engine, "orders")
    port = free_port()
    relay = relays.start(database_url, OUTBOX_HTTP=str(port), OUTBOX_BACKLOG_INTERVAL="0.3",
                         OUTBOX_SHUTDOWN_TIMEOUT="3", OUTBOX_INSTANCE=MARKUP_OWNER,
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")  # nothing moves
    url = f"http://127.0.0.1:{port}/"

    def ready_to_look() -> bool:
        if get_or_none(url + "api/status") != 200:
            return False
        status = json.loads(get(url + "api/status")[1])
        return (status["snapshot"] is not None and len(status["history"]) >= 3
                and [o["owner"] for o in status["snapshot"]["owners"]] == [MARKUP_OWNER])

    wait_until(ready_to_look, 30, "the markup owner to hold the lane, and some history")
    dom = browse(url, "--dump-dom").stdout
    measured_age = json.loads(get(url + "api/status")[1])["measured_age_s"]
    heads = {path: head(url + path) for path in ("", "metrics", "readyz", "nowhere")}
    gets = {path: get(url + path) for path in ("", "metrics")}
    relay.stop()
    # The owner's markup is text in a cell: escaped in the DOM, no element made of it, its handler never ran.
    assert "<td>&lt;img src=x onerror=\"document.body.dataset.xss=1\"&gt;</td>" in dom, dom
    assert "<img" not in dom and "data-xss" not in dom
    # The chart says what it shows: a title naming the window it really covers, axes with units.
    title = re.search(r'<h2 id="chart-title">Backlog and throughput, last (\d+) s</h2>', dom)
    assert title and 0 < int(title.group(1)) < 120, dom
    assert '>events</text>' in dom and '>events/s</text>' in dom and '>now</text>' in dom
    # The counts say when they were measured: a large backlog is counted minutes apart (BACKLOG_BUDGET).
    assert 0 <= measured_age < 30
    assert re.search(r'<p id="measured">counts measured [0-9.]+ s ago</p>', dom), dom
    # HEAD answers as GET would, without a body.
    assert heads[""] == (200, str(len(gets[""][1])), b"") and heads["metrics"][:2] == (200, heads["metrics"][1])
    assert heads["readyz"][0] == 503 and heads["nowhere"][0] == 404


def head(url: str) -> tuple[int, str | None, bytes]:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Length"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Length"], exc.read()


def test_librdkafka_lines_follow_the_json_log_format(database_url: str, relays: Relays) -> None:
    """librdkafka's own lines go through logging like every other line, from every client the relay makes
    (debug=broker makes each client log as it is created, so one without the relay's logger shows at once)."""
    relay = relays.start(database_url, OUTBOX_LOG_FORMAT="json", OUTBOX_LOG_LEVEL="DEBUG",
                         OUTBOX_SHUTDOWN_TIMEOUT="3", OUTBOX_KAFKA_TIMEOUT="2", OUTBOX_KAFKA_DEBUG="broker",
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    wait_until(lambda: '"outbox_relay.librdkafka"' in relay.log(), 30, "a librdkafka line")
    relay.stop()
    for line in relay.log().splitlines():
        assert line.startswith("{") and json.loads(line)["logger"], f"not a JSON log line: {line}"


def test_a_backlog_measurement_cancelled_by_its_timeout_is_a_warning_naming_the_next_try(
        engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL cancels the statement (the monitor session's statement_timeout, here 0.3 s instead of 60 s so the
    test is short); psycopg calls that an OperationalError, like a lost connection. It must not pass as one: the
    gauges keep their old values until the next try, 1/BACKLOG_BUDGET times the timeout later, and the on-call
    person needs a line saying so."""
    from outbox_relay import daemon
    from outbox_relay.config import Settings

    seed(engine, "orders")
    monkeypatch.setattr(daemon, "MONITOR_TIMEOUT_S", 0.3)
    relay = daemon.Relay(Settings.from_sources({}, {"OUTBOX_DATABASE_URL": database_url,
                                                    "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}))
    with connect(database_url, "test: holds the events table") as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"LOCK TABLE {EVENTS} IN ACCESS EXCLUSIVE MODE")  # the measurement waits, then times out
        with caplog.at_level(logging.WARNING, logger="outbox_relay.daemon"):
            relay._measure_backlog()
        blocker.execute("ROLLBACK")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "backlog not measured" in warnings[0] and "statement timeout" in warnings[0], warnings
    assert "next try in" in warnings[0], warnings
    assert relay.metrics.last_snapshot is None  # nothing measured, and nothing pretends it was
    relay._backlog_due = 0.0
    relay._measure_backlog()  # the next try reconnects and measures
    assert relay.metrics.last_snapshot is not None and relay.metrics.last_snapshot.total.pending == 5
    relay._monitor.close()


def test_the_oldest_claimable_age_stays_live_while_a_costly_backlog_count_waits_its_turn(
        engine: Engine, database_url: str) -> None:
    """The counts of a huge backlog are repeated only at BACKLOG_BUDGET of the time (minutes apart, 20 after a
    measurement cancelled at 60 s), but the paging alert (docs/alerts.yml, OutboxBacklogOld) reads the oldest
    claimable age: one row in id order, cheap whatever the backlog. It must not freeze at an old value."""
    from outbox_relay import daemon
    from outbox_relay.config import Settings

    seed(engine, "orders")  # two claimable events 2 minutes old
    relay = daemon.Relay(Settings.from_sources({}, {"OUTBOX_DATABASE_URL": database_url,
                                                    "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}))
    relay._measure_backlog()
    assert relay.metrics.oldest_age._value.get() > 110
    relay._backlog_due = daemon.time.monotonic() + 3600  # as after a measurement of 3 minutes
    with engine.begin() as conn:
        conn.execute(text(set_state_sql("sent", "e.topic = 'orders'")))  # the relay caught up
    relay._measure_backlog()
    assert relay.metrics.oldest_age._value.get() == 0  # nothing claimable now: the alert clears
    # ...and nothing claimable means no topic has a claimable event: OutboxRelayNotPublishing (claimable > 0 and
    # nothing published for 5 minutes) must not page for a drained backlog whose count waits its turn.
    assert relay.metrics.claimable.labels(topic="orders")._value.get() == 0
    assert relay.metrics.last_snapshot.total.claimable == 0
    assert relay.metrics.last_snapshot is not None and relay.metrics.last_snapshot.total.oldest_claimable_age_s is None
    assert relay.metrics.pending.labels(topic="orders")._value.get() == 5  # the counts wait for their turn
    relay._monitor.close()


def test_metrics_say_when_postgresql_does_not_answer_and_what_the_lane_count_is(
        engine: Engine, database_url: str, relays: Relays) -> None:
    """With PostgreSQL out of reach every lane is lost, yet no exported series said so: the lanes' breakers were
    gone with the lanes, outbox_circuit_open stayed 0 and the backlog gauges froze (OutboxBacklogOld cannot fire).
    outbox_database_up says it. And OutboxLanesUnowned compared with a lane count written into the rule, wrong
    after every `lanes set`: outbox_lanes carries the count."""
    port = free_port()
    relays.start(database_url, OUTBOX_HTTP=str(port), OUTBOX_BACKLOG_INTERVAL="0.3")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_or_none(f"{base}/readyz") == 200, 30, "the relay to be ready")
    assert metric(f"{base}/metrics", "outbox_lanes") == 1
    assert metric(f"{base}/metrics", "outbox_database_up") == 1
    assert cli(database_url, "lanes", "set", "3").returncode == 0
    wait_until(lambda: metric(f"{base}/metrics", "outbox_lanes") == 3, 30, "the lane count to follow `lanes set`")

    database = engine.url.database
    engine.dispose()
    admin_url = database_url.replace(f"/{database}", "/postgres")
    with connect(admin_url, "test") as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
    try:
        wait_until(lambda: metric(f"{base}/metrics", "outbox_database_up") == 0, 30, "outbox_database_up to drop")
        assert get(f"{base}/readyz")[0] == 503
        assert all(value == 0 for line in get(f"{base}/metrics")[1].decode().splitlines()
                   if line.startswith("outbox_lane_owned") for value in [float(line.split()[-1])])
    finally:
        with connect(admin_url, "test") as conn:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    wait_until(lambda: metric(f"{base}/metrics", "outbox_database_up") == 1, 30, "outbox_database_up to rise")
