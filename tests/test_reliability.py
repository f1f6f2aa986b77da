"""The reliability suite: faults, load, bad input and configuration, security basics.

Every fault scenario runs writers against a draining relay and ends with the ledger check.
Sizes come from the environment so `make verify` can run the long version:
OUTBOX_LOAD_SECONDS (default 20; make verify: 120).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text

from outbox_relay import enqueue
from outbox_relay.web import parse_address
from tests import kafkatools
from tests.pgtools import EVENT_STATES, EVENTS, SETTINGS, set_state_sql
from tests.relaytools import (
    ROOT,
    Relays,
    Writers,
    cli,
    drain_through_fault,
    free_port,
    lane_owners,
    ledger,
    pending,
    service,
    set_lane_count,
    states,
    stopped,
    wait_until,
)

LOAD_SECONDS = float(os.environ.get("OUTBOX_LOAD_SECONDS", "20"))


def test_verify_command_reports_a_clean_ledger_and_catches_violations(engine: Engine, database_url: str, topic: str,
                                                                       relays: Relays) -> None:
    with engine.begin() as conn:
        ids = [enqueue(conn, topic, {"n": n}, key=f"k{n % 3}") for n in range(30)]
    relay = relays.start(database_url)
    wait_until(lambda: pending(engine) == 0, 30, "publication")
    relay.stop()
    clean = cli(database_url, "verify")
    assert clean.returncode == 0 and clean.stdout.startswith("OK: committed=30 received=30 lost=0 duplicated=0")
    # A duplicate written behind the relay's back, and a row marked sent that Kafka never got.
    producer = Producer({"bootstrap.servers": kafkatools.bootstrap()})
    producer.produce(topic, key=b"k0", value=b"{}", headers=[("outbox-event-id", str(ids[0]).encode())])
    producer.flush(10)
    with engine.begin() as conn:
        enqueue(conn, topic, b"never published", key="k9")
        conn.execute(text(set_state_sql("sent", "TRUE")))
    broken = cli(database_url, "verify")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "duplicated=1" in broken.stdout and "marked sent but not in Kafka: 1" in broken.stdout
    assert str(ids[0]) in broken.stdout


def run_with_fault(engine: Engine, database_url: str, topic: str, relays: Relays, fault: Callable[[], None],
                   **settings: str) -> str:
    report = drain_through_fault(engine, database_url, topic, relays, fault, **settings)
    assert report.ok, report.summary()
    return report.summary()


def test_broker_sigkill_and_restart(engine: Engine, database_url: str, topic: str, relays: Relays,
                                   restores_services: None) -> None:
    def fault() -> None:
        service("kill")
        time.sleep(2)
        service("up", "kafka")

    print(f"\nbroker SIGKILL: {run_with_fault(engine, database_url, topic, relays, fault)}")


def test_broker_paused_longer_than_the_transaction_timeout(engine: Engine, database_url: str, topic: str,
                                                          relays: Relays, restores_services: None) -> None:
    def fault() -> None:
        service("pause")
        time.sleep(8)  # the relay's transaction timeout is 5 s
        service("resume")

    summary = run_with_fault(engine, database_url, topic, relays, fault,
                             OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS="5000", OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS="4000")
    print(f"\nbroker SIGSTOP 8 s > transaction timeout: {summary}")


def test_relay_connections_terminated_by_postgres(engine: Engine, database_url: str, topic: str,
                                                  relays: Relays) -> None:
    def fault() -> None:
        with engine.begin() as conn:
            killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                       " WHERE application_name LIKE 'outbox-relay%' AND datname = current_database()"))
            assert killed.scalar_one() >= 2

    print(f"\npg_terminate_backend: {run_with_fault(engine, database_url, topic, relays, fault)}")


def test_two_relays_started_at_the_same_moment(engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    set_lane_count(engine, 4)
    with Writers(engine, topic, threads=3, limit=1500) as writers:
        pair = [relays.start(database_url, name, OUTBOX_BATCH_SIZE="50") for name in ("x", "y")]
        owners = wait_until(lambda: (o := lane_owners(engine)) and len(o) == 4 and
                            sorted(list(o.values()).count(name) for name in "xy") == [2, 2] and o, 30,
                            "the two relays to split the 4 lanes evenly")
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "draining")
    for relay in pair:
        relay.stop()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()
    print(f"\ntwo relays started together: lanes {owners}; {report.summary()}")


def test_topic_deleted_under_the_relay(engine: Engine, database_url: str, relays: Relays) -> None:
    """Events published before the deletion are gone with the topic (that is what deleting means);
    every event written after it is either published to the re-created topic or parked with a
    readable error. None is marked sent without being in Kafka."""
    topic = kafkatools.create_topic(f"doomed-{uuid.uuid4().hex[:10]}", 1)
    relay = relays.start(database_url, OUTBOX_MAX_ATTEMPTS="2")
    with engine.begin() as conn:
        for n in range(20):
            enqueue(conn, topic, {"before": n})
    wait_until(lambda: pending(engine) == 0, 30, "the first events")
    client = kafkatools.admin()  # must outlive the future
    client.delete_topics([topic])[topic].result(30)
    with engine.begin() as conn:
        watermark = conn.execute(text(f"SELECT max(id) FROM {EVENTS}")).scalar_one()
        for n in range(20):
            enqueue(conn, topic, {"after": n})
    wait_until(lambda: pending(engine) == 0, 90, "the later events to be published or parked")
    relay.stop()
    received = {m.event_id for m in kafkatools.consume([topic], expected=1, quiet=2.0)}
    with engine.connect() as conn:
        later = conn.execute(text(f"SELECT event_id::text, state, last_error FROM {EVENT_STATES} WHERE id > :w"),
                             {"w": watermark}).all()
    for event_id, state, error in later:
        assert (state == "sent" and event_id in received) or (state == "failed" and error), (event_id, state, error)


def _load_writer(url: str, topic: str, writer: int, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    engine = create_engine(url)
    committed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            for i in range(5):
                enqueue(conn, topic, {"writer": writer, "n": committed + i}, key=f"w{writer}-k{(committed + i) % 5}")
        committed += 5
    out.put(committed)
    engine.dispose()


def test_load_eight_writer_processes(engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    set_lane_count(engine, 4)
    relay = relays.start(database_url, OUTBOX_LOG_LEVEL="WARNING")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [context.Process(target=_load_writer, args=(database_url, topic, n, LOAD_SECONDS, queue))
               for n in range(8)]
    curve = []
    started = time.monotonic()
    for writer in writers:
        writer.start()
    while any(w.is_alive() for w in writers) or pending(engine):
        curve.append((round(time.monotonic() - started), pending(engine)))
        time.sleep(1)
        assert time.monotonic() - started < LOAD_SECONDS + 180, "the relay did not catch up"
    total = sum(queue.get(timeout=30) for _ in writers)
    relay.stop()
    report = ledger(engine, [topic], timeout=120)
    print(f"\nload: 8 writers for {LOAD_SECONDS:.0f}s wrote {total} events ({total / LOAD_SECONDS:.0f}/s);"
          f" backlog (s, pending): {curve}; {report.summary()}")
    assert report.ok, report.summary()
    assert report.committed == total


def test_bad_configuration_says_what_is_wrong_in_one_line(database_url: str) -> None:
    unknown = cli(database_url, "run", "-X", "no.such.property=1")
    assert unknown.returncode == 2
    assert 'error: invalid Kafka configuration: No such configuration property: "no.such.property"' in unknown.stderr
    weakened = cli(database_url, "run", "-X", "acks=1")
    assert weakened.returncode == 2 and "acks=1 (from -X acks) would break delivery guarantees" in weakened.stderr
    no_kafka = cli(database_url, "run",
                   env={k: v for k, v in os.environ.items() if k != "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"})
    assert no_kafka.returncode == 2 and "no Kafka: set OUTBOX_KAFKA_BOOTSTRAP_SERVERS" in no_kafka.stderr


def test_unreachable_broker_and_wrong_credentials_wait_without_publishing_or_leaking_secrets(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        enqueue(conn, topic, b"waits")
    port = kafkatools.bootstrap().rsplit(":", 1)[1]
    relay = relays.start(database_url, OUTBOX_BREAKER_THRESHOLD="2", OUTBOX_SHUTDOWN_TIMEOUT="5",
                         OUTBOX_KAFKA_TIMEOUT="3",
                         OUTBOX_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", OUTBOX_KAFKA_SASL_MECHANISM="PLAIN",
                         OUTBOX_KAFKA_SASL_USERNAME="relay", OUTBOX_KAFKA_SASL_PASSWORD=secret,
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    wait_until(lambda: "Kafka unreachable" in relay.log(), 30, "the relay to report the broker unusable")
    time.sleep(6)
    assert relay.alive and states(engine) == {"pending": 1}
    relay.stop()
    log = relay.log()
    assert secret not in log and "'sasl.password': '***'" in log
    assert log.count("Kafka unreachable") == 1, "one line per state change, not a log storm"


def test_kafka_trouble_is_reported_once_and_within_seconds(
    engine: Engine, database_url: str, topic: str, relays: Relays, restores_services: None
) -> None:
    # A wrong port: one line that names the address and the cause, not a timeout minutes later.
    closed = free_port()
    wrong = relays.start(database_url, name="wrong-port", OUTBOX_SHUTDOWN_TIMEOUT="5",
                         OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed}")
    started = time.monotonic()
    wait_until(lambda: "Kafka unreachable" in wrong.log(), 30, "the relay to say Kafka is unreachable")
    print(f"\nwrong port reported after {time.monotonic() - started:.1f}s")
    time.sleep(5)
    wrong.stop()
    lines = [line for line in wrong.log().splitlines() if "Kafka unreachable" in line or "librdkafka" in line]
    assert len(lines) == 1 and f"127.0.0.1:{closed}" in lines[0] and "refused" in lines[0].lower(), lines

    # The broker goes away under a running relay: readiness, the metric and the log say so in seconds.
    http = free_port()
    relay = relays.start(database_url, OUTBOX_HTTP=str(http))
    with engine.begin() as conn:
        enqueue(conn, topic, b"before")
    wait_until(lambda: pending(engine) == 0 and _ready(http), 60, "the relay to publish and be ready")
    service("down", "kafka")
    stopped = time.monotonic()
    wait_until(lambda: not _ready(http), 30, "readiness to fail")
    print(f"not ready {time.monotonic() - stopped:.1f}s after the broker stopped")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    assert "outbox_kafka_up 0.0" in metrics
    with engine.begin() as conn:
        enqueue(conn, topic, b"during")
    time.sleep(4)
    service("up", "kafka")
    wait_until(lambda: pending(engine) == 0 and _ready(http), 90, "the relay to drain by itself")
    relay.stop()
    assert relay.log().count("Kafka unreachable") == 1, relay.log()[-3000:]
    assert "Kafka reachable again" in relay.log()
    report = ledger(engine, [topic])
    assert report.ok and report.received == 2, report.summary()


def _ready(port: int) -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_no_secret_in_status_output_or_metrics_and_http_is_local_by_default(engine: Engine, database_url: str,
                                                                            relays: Relays) -> None:
    assert parse_address("9466") == ("127.0.0.1", 9466)
    with_password = database_url.replace("outbox@", "outbox:pw-not-shown@")
    status = cli(with_password, "status", "--json")
    assert status.returncode == 0 and "pw-not-shown" not in status.stdout + status.stderr
    port = str(free_port())
    relay = relays.start(with_password, OUTBOX_HTTP=port)
    wait_until(lambda: "serving status page" in relay.log(), 30, "the HTTP server")
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]  # local address
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10).read().decode()
    relay.stop()
    assert "pw-not-shown" not in metrics + page + relay.log()
    assert "outbox:***@" in relay.log()


def _least_privileged(engine: Engine, database_url: str) -> tuple[str, str]:
    """A new role granted what docs/least-privilege.sql grants, and the database URL that logs in as it."""
    role = f"relay_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql((ROOT / "docs" / "least-privilege.sql").read_text().replace("outbox_relay", role))
    return role, database_url.replace("://outbox@", f"://{role}@")


def test_relay_runs_under_the_documented_least_privilege_role(engine: Engine, database_url: str, topic: str,
                                                              relays: Relays) -> None:
    role, limited = _least_privileged(engine, database_url)
    with engine.begin() as conn:
        for n in range(50):
            enqueue(conn, topic, {"n": n}, key=str(n % 4))
    relay = relays.start(limited, OUTBOX_RETENTION_INTERVAL="1", OUTBOX_HTTP="")
    try:
        wait_until(lambda: pending(engine) == 0, 30, "the limited relay to publish")
        relay.stop()
        assert "permission denied" not in relay.log() and "InsufficientPrivilege" not in relay.log()
        # The role does the relay's work and nothing more: it cannot write events or change the schema.
        limited_engine = create_engine(limited)
        for statement in (f"INSERT INTO {EVENTS} (topic) VALUES ('x')", f"DROP TABLE {EVENTS}",
                          f"UPDATE {SETTINGS} SET lane_count = 2"):
            with pytest.raises(Exception, match=r"permission denied|must be owner"), limited_engine.begin() as conn:
                conn.exec_driver_sql(statement)
        limited_engine.dispose()
    finally:
        relay.stop()  # before its role is dropped (a no-op if it already stopped)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
    report = ledger(engine, [topic])
    assert report.ok, report.summary()


def test_relays_under_the_least_privilege_role_carry_on_when_a_lanes_set_hangs(
        engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    """`lanes set` runs as the owner, relays as the documented least-privilege role: they can neither see
    the state of the owner's sessions nor end them, so a `lanes set` stopped after its announce stopped
    them for good. Its session now bounds its own idleness (idle_session_timeout): PostgreSQL ends it."""
    set_lane_count(engine, 2)
    role, limited = _least_privileged(engine, database_url)
    with engine.begin() as conn:
        for n in range(200):
            enqueue(conn, topic, {"n": n}, key=str(n % 8))
    hung: subprocess.Popen[str] | None = None
    try:
        for name in ("a", "b"):
            relays.start(limited, name, OUTBOX_HTTP="", OUTBOX_INSTANCE_TIMEOUT="3")
        wait_until(lambda: pending(engine) == 0, 60, "the limited relays to publish")
        hung = subprocess.Popen([sys.executable, "-m", "outbox_relay", "lanes", "set", "4", "--database-url",
                                 database_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OUTBOX_FAULT_INJECTION": "resize_announced:1:stop",
                                     "OUTBOX_INSTANCE_TIMEOUT": "3"})
        wait_until(lambda: stopped(hung.pid), 60, "lanes set to hang after its announce")
        wait_until(lambda: lane_owners(engine) == {}, 30, "the relays to step back for the change")
        with engine.begin() as conn:
            for n in range(200):
                enqueue(conn, topic, {"n": 200 + n}, key=str(n % 8))
        wait_until(lambda: pending(engine) == 0, 60, "the limited relays to publish while lanes set hangs")
        hung.send_signal(signal.SIGCONT)
        _, err = hung.communicate(timeout=60)
        assert hung.returncode == 1 and "the change to 4 lanes was abandoned" in err, err
        relays.stop_all()  # before the role is dropped
    finally:
        if hung is not None and hung.poll() is None:
            hung.kill()
            hung.communicate(timeout=30)
        relays.stop_all()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
    report = ledger(engine, [topic])
    assert report.ok and report.received == 400, report.summary()


def test_a_relay_role_granted_before_the_idle_lanes_existed_still_publishes_and_says_what_is_missing(
        engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    """After `migrate` to 0011, a role made from an earlier release's docs/least-privilege.sql cannot write
    the idle lanes table. The lanes must still publish (by polling), and the relay must say what to grant."""
    role = f"relay_{uuid.uuid4().hex[:8]}"
    grants = "\n".join(line for line in (ROOT / "docs" / "least-privilege.sql").read_text().splitlines()
                        if "events_idle_lanes" not in line).replace("outbox_relay", role)
    with engine.begin() as conn:
        conn.exec_driver_sql(grants)
        for n in range(20):
            enqueue(conn, topic, {"n": n}, key=str(n % 4))
    relay = relays.start(database_url.replace("://outbox@", f"://{role}@"), OUTBOX_HTTP="")
    try:
        wait_until(lambda: pending(engine) == 0, 60, "the relay without idle-lane grants to publish")
        assert "events_idle_lanes" in relay.log() and "docs/least-privilege.sql" in relay.log()
        relay.stop()
    finally:
        relay.stop()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}; DROP ROLE {role}")
    report = ledger(engine, [topic])
    assert report.ok, report.summary()


def test_a_broker_that_cannot_run_transactions_is_reported_and_waited_for(
    engine: Engine, database_url: str, tmp_path: Path, relays: Relays
) -> None:
    """A second, single-node broker whose transaction log needs 3 replicas: its transaction
    coordinator can never start, so init_transactions can never succeed. The relay must say so
    once and wait, publishing nothing."""
    import shutil
    import socket

    def listening(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    java = shutil.which("java")
    jars = Path(os.environ.get("OUTBOX_SERVICES_DIR", ROOT / ".services")) / "kafka" / "jars"  # as scripts/services
    assert java and jars.is_dir(), "the local Kafka jars are missing: run `scripts/services up` first"
    port, controller = free_port(), free_port()
    config = tmp_path / "server.properties"
    config.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1", f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}", "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT", f"log.dirs={tmp_path / 'data'}",
        "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=3",
        "transaction.state.log.min.isr=2", ""]))
    command = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={ROOT / 'scripts' / 'kafka' / 'log4j2.properties'}",
               f"-Dkafka.logs.dir={tmp_path / 'logs'}", "-cp", f"{jars}/*"]
    subprocess.run([*command, "kafka.tools.StorageTool", "format", "--standalone", "-t", "bm8tdHhuLXRlc3QtY2x1c3Rlcg",
                    "-c", str(config)], check=True, capture_output=True)
    broker = subprocess.Popen([*command, "kafka.Kafka", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port), 60, "the second broker")
        with engine.begin() as conn:
            enqueue(conn, "no-transactions", b"waits")
        relay = relays.start(database_url, OUTBOX_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
                             OUTBOX_BREAKER_THRESHOLD="2", OUTBOX_KAFKA_TIMEOUT="3", OUTBOX_SHUTDOWN_TIMEOUT="5")
        wait_until(lambda: "circuit open" in relay.log(), 90, "the relay to report the broker unusable")
        assert relay.alive and states(engine) == {"pending": 1}
        relay.stop()  # while its broker still runs
    finally:
        broker.kill()
        broker.wait(30)
    opened = [line for line in relay.log().splitlines() if "circuit open" in line]
    assert len(opened) == 1 and "init_transactions" in opened[0], opened


def test_the_first_batch_after_kafka_came_back_is_not_held_for_a_message_timeout(restores_services: None) -> None:
    """Kafka stopped mid-transaction: the messages timed out (message.timeout.ms), the transaction was
    aborted, and the lane retried on the same producer once Kafka was back. That producer's first batch
    then timed out too, a whole message timeout later (an operator saw every lane publish again at once
    but one, 30 s later). A producer whose messages timed out is now replaced, as for a ProducerFailed."""
    import datetime as dt

    from outbox_relay import progress
    from outbox_relay.db.lanes import Row
    from outbox_relay.publisher import LanePublisher, ProducerFailed, TransactionAborted

    suffix = uuid.uuid4().hex[:8]
    good = kafkatools.create_topic(f"away-{suffix}", partitions=3)
    config = {"bootstrap.servers": kafkatools.bootstrap(), "enable.idempotence": True, "acks": "all",
              "message.timeout.ms": 8000, "batch.num.messages": 1}
    scope = progress.Scope(str(uuid.uuid4()), 0, 1)
    ids = iter(range(1, 1000))

    def started() -> LanePublisher:
        publisher = LanePublisher(config, f"away-{suffix}.lane-0", scope=scope,
                                  progress_topic=f"away-{suffix}.progress", operation_timeout=20)
        publisher.start()
        return publisher

    def rows(count: int) -> list[Row]:
        return [Row(next(ids), uuid.uuid4(), good, f"k{i % 6}".encode(), b"v", [], [], None, 0,
                    dt.datetime.now(dt.UTC)) for i in range(count)]

    publisher: LanePublisher | None = started()
    try:
        publisher.publish(rows(6))
        service("down", "kafka")
        with pytest.raises((ProducerFailed, TransactionAborted), match="_MSG_TIMED_OUT") as outage:
            publisher.publish(rows(30))
        if isinstance(outage.value, ProducerFailed):  # what the lane does: a new producer (after recovery)
            publisher.close()
            publisher = None
        service("up", "kafka")
        back = time.monotonic()
        publisher = publisher or started()
        publisher.publish(rows(12))  # was _MSG_TIMED_OUT again, a whole message timeout later
        assert time.monotonic() - back < 6
    finally:
        if publisher is not None:
            publisher.close()
