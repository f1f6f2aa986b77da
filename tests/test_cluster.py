"""Faults of a 3-broker Kafka cluster under writer load (replication factor 3, min.insync.replicas=2,
transaction state log RF 3 / min ISR 2): leader elections, coordinator moves, ISR shrinks.

The cluster is `scripts/services up cluster` (started here when it is not running, stopped again
at the end if this session started it). Each scenario ends with the ledger: 0 lost, 0 duplicated,
0 reordered. `make test` runs the CI-size ones; `make verify` all at full size (tests/scenarios.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import Engine

from outbox_relay.broker import TRANSACTION_LOG, transaction_log_partition
from outbox_relay.verify import LedgerReport
from tests.relaytools import (
    ROOT,
    RelayProcess,
    Relays,
    Writers,
    cli,
    free_port,
    lane_owners,
    ledger,
    pending,
    service,
    set_lane_count,
    wait_until,
)
from tests.scenarios import FULL, LOAD_AFTER, Sampler, full_size_only, report_line

SERVICES = [sys.executable, str(ROOT / "scripts" / "services")]
BROKER_IDS = (1, 2, 3)


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[str]:
    """The cluster's bootstrap servers; fails loudly (never skips) when it cannot start."""
    was_up = subprocess.run([*SERVICES, "status", "cluster"], capture_output=True).returncode == 0
    started = time.monotonic()
    up = subprocess.run([*SERVICES, "up", "cluster"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"the 3-broker Kafka cluster did not start (`scripts/services up cluster`):\n{up.stderr}",
                    pytrace=False)
    if not was_up:
        print(f"\nKafka cluster started in {time.monotonic() - started:.1f}s")
    env = subprocess.run([*SERVICES, "env", "cluster"], capture_output=True, text=True, check=True).stdout
    bootstrap = next(line.split("=", 1)[1] for line in env.splitlines() if "KAFKA_BOOTSTRAP" in line).strip("'")
    yield bootstrap
    if not was_up:
        subprocess.run([*SERVICES, "down", "cluster"], capture_output=True)


@pytest.fixture
def cluster(kafka_cluster: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test talks to the cluster (relays, ledger); every node runs again afterwards."""
    monkeypatch.setenv("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", kafka_cluster)
    yield kafka_cluster
    subprocess.run([*SERVICES, "resume", "broker-1", "broker-2", "broker-3"], capture_output=True)
    subprocess.run([*SERVICES, "up", "cluster"], capture_output=True, check=True)


@pytest.fixture
def busy_topic(cluster: str) -> str:
    """3 partitions, each on all 3 brokers."""
    name = f"cluster-{uuid.uuid4().hex[:12]}"
    client = admin(cluster)
    client.create_topics([NewTopic(name, num_partitions=3, replication_factor=3)])[name].result(30)
    wait_until(lambda: all(len(p.isrs) == 3 for p in partitions(cluster, name).values()), 30, "the topic's ISR")
    return name


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})  # a dead broker is expected here


def partitions(bootstrap: str, topic: str) -> dict[int, Any]:
    metadata = admin(bootstrap).list_topics(topic, timeout=10)
    return dict(metadata.topics[topic].partitions)


def leader_of(bootstrap: str, topic: str, partition: int) -> int:
    return int(partitions(bootstrap, topic)[partition].leader)


def coordinator_of(bootstrap: str, transactional_id: str) -> int:
    """The broker leading the transaction log partition of this transactional.id (Kafka's partitionFor)."""
    log = partitions(bootstrap, TRANSACTION_LOG)
    return leader_of(bootstrap, TRANSACTION_LOG, transaction_log_partition(transactional_id, len(log)))


def wait_fully_replicated(bootstrap: str, topics: list[str], timeout: float = 120) -> None:
    def replicated() -> bool:
        return all(len(p.isrs) == 3 and p.leader >= 0
                   for topic in topics for p in partitions(bootstrap, topic).values())
    wait_until(replicated, timeout, f"every replica of {topics} in sync", poll=0.5)


class Scenario:
    """Writers and relays on the cluster; the fault is the test's, the ending is common."""

    def __init__(self, engine: Engine, database_url: str, topic: str, relays: Relays, bootstrap: str,
                 **settings: str) -> None:
        self.engine, self.database_url, self.topic, self.started = engine, database_url, topic, relays
        self.bootstrap = bootstrap
        self.prefix = f"cluster-{uuid.uuid4().hex[:8]}"
        self.progress_topic = f"{self.prefix}.progress"
        self.settings = {"OUTBOX_BATCH_SIZE": "50", "OUTBOX_TRANSACTIONAL_ID_PREFIX": self.prefix,
                         "OUTBOX_PROGRESS_TOPIC": self.progress_topic, **settings}
        self.relays: dict[str, RelayProcess] = {}
        self.sampler = Sampler(engine)
        self.writers = Writers(engine, topic, threads=3)

    def relay(self, name: str = "relay") -> RelayProcess:
        self.relays[name] = self.started.start(self.database_url, name, **self.settings)
        return self.relays[name]

    def __enter__(self) -> Scenario:
        self.sampler.__enter__()
        self.writers.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.writers.stop()
        self.sampler.__exit__()
        for relay in self.relays.values():
            if relay.alive:
                relay.stop(timeout=60)

    def wait_publishing(self, events: int = 200) -> None:
        wait_until(lambda: self.sampler.sent >= events, 90, f"{events} events published")

    def wait_resumed(self, since: float, events: int = 100, timeout: float = 120) -> float:
        """Seconds from `since` until `events` more were published."""
        wait_until(lambda: self.sampler.published_since(since) >= events, timeout, "publishing to resume")
        return time.monotonic() - since

    def finish(self, name: str, recovery: float, detail: str = "", since: float | None = None) -> LedgerReport:
        time.sleep(LOAD_AFTER)
        self.writers.stop()
        wait_until(lambda: pending(self.engine) == 0, 180, "the relay to drain by itself")
        dead = [name for name, relay in self.relays.items() if not relay.alive and relay.process is not None
                and relay.process.returncode != -9]
        assert not dead, f"relays died instead of recovering: {dead}\n" + "\n".join(
            self.relays[name].log()[-3000:] for name in dead)
        for relay in self.relays.values():
            if relay.alive:
                relay.stop(timeout=60)
        report = ledger(self.engine, [self.topic], timeout=120)
        report_line(name, report, recovery, detail, self.sampler, since)
        assert not report.lost and not report.duplicates and not report.reordered, report.summary()
        assert report.ok, report.summary()
        assert report.committed == len(self.writers.committed)
        return report

    def logs(self) -> str:
        return "\n".join(relay.log() for relay in self.relays.values())


def scenario(engine: Engine, database_url: str, topic: str, relays: Relays, cluster: str, **settings: str) -> Scenario:
    return Scenario(engine, database_url, topic, relays, cluster, **settings)


def test_partition_leader_sigkilled_mid_transaction_then_restarted(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    with scenario(engine, database_url, busy_topic, relays, cluster) as s:
        s.relay()
        s.wait_publishing()
        leader = leader_of(cluster, busy_topic, 0)
        killed = time.monotonic()
        service("kill", f"broker-{leader}")  # the relay always has a transaction open under this load
        elected = wait_until(lambda: leader_of(cluster, busy_topic, 0) not in (leader, -1) and time.monotonic(),
                             60, "a new leader") - killed
        s.wait_resumed(killed)
        service("up", f"broker-{leader}")
        recovery = s.sampler.stall(killed)
        s.finish("partition leader SIGKILLed mid-transaction, restarted", recovery,
                 f"broker-{leader} led partition 0; new leader elected after {elected:.1f}s", since=killed)


@full_size_only
@pytest.mark.timeout(900)
def test_transaction_coordinator_sigkilled_mid_commit(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    """Twice: the lane's coordinator dies while the relay commits a transaction every few
    milliseconds (EndTxn in flight or markers being written), then comes back."""
    with scenario(engine, database_url, busy_topic, relays, cluster) as s:
        s.relay()
        s.wait_publishing()
        stalls, victims, begin = [], [], time.monotonic()
        for _ in range(2):
            coordinator = coordinator_of(cluster, f"{s.prefix}.lane-0")
            victims.append(coordinator)
            killed = time.monotonic()
            service("kill", f"broker-{coordinator}")
            s.wait_resumed(killed)
            service("up", f"broker-{coordinator}")
            wait_fully_replicated(cluster, ["__transaction_state", busy_topic])
            stalls.append(s.sampler.stall(killed))
        s.finish("transaction coordinator SIGKILLed mid-commit (2x), restarted", max(stalls),
                 f"coordinators broker-{victims[0]}, broker-{victims[1]}; stalls "
                 + ", ".join(f"{x:.1f}s" for x in stalls), since=begin)


@full_size_only
@pytest.mark.timeout(900)
def test_broker_paused_longer_than_session_and_transaction_timeouts(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    """A zombie leader: SIGSTOP for 15 s (> broker session timeout 9 s, > transaction timeout 5 s)."""
    with scenario(engine, database_url, busy_topic, relays, cluster,
                  OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS="5000", OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS="4000") as s:
        s.relay()
        s.wait_publishing()
        leader = leader_of(cluster, busy_topic, 0)
        paused = time.monotonic()
        service("pause", f"broker-{leader}")
        time.sleep(15)
        service("resume", f"broker-{leader}")
        resumed = time.monotonic()
        s.wait_resumed(paused)
        wait_fully_replicated(cluster, [busy_topic])
        recovery = s.sampler.stall(paused)
        during = s.sampler.published_since(paused) - s.sampler.published_since(resumed)
        s.finish("leader SIGSTOPped 15 s (> session and transaction timeouts), resumed", recovery,
                 f"broker-{leader} led partition 0; {during} events published while it was stopped;"
                 f" back in the ISR {time.monotonic() - resumed:.1f}s after SIGCONT", since=paused)


@full_size_only
@pytest.mark.timeout(900)
def test_rolling_restart_of_all_three_brokers(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    """What every upgrade does: each broker in turn stopped (SIGTERM, controlled shutdown), started,
    and waited for until every replica is back in sync."""
    with scenario(engine, database_url, busy_topic, relays, cluster) as s:
        s.relay()
        s.wait_publishing()
        started = time.monotonic()
        for broker in BROKER_IDS:
            service("down", f"broker-{broker}")
            service("up", f"broker-{broker}")
            wait_fully_replicated(cluster, [busy_topic, "__transaction_state", s.progress_topic])
        took = time.monotonic() - started
        s.wait_resumed(started)
        s.finish("rolling restart of all 3 brokers", s.sampler.stall(started), f"the restart took {took:.0f}s",
                 since=started)


@pytest.mark.timeout(900)
def test_two_brokers_down_below_min_insync_replicas(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    """One broker of three left: nothing can be acknowledged by 2 replicas. The relay publishes
    nothing, marks nothing, loses nothing, says why once (one log line, /readyz, the
    outbox_kafka_partitions_below_min_isr metric, `outbox-relay status`), and drains by itself
    when the brokers return, then says so.

    The relay's Kafka calls give up after 5 s (OUTBOX_KAFKA_TIMEOUT), well before librdkafka's
    30 s message timeout, so a transaction is abandoned with messages still in flight: the leader
    may have appended them, and a retry that reuses their sequence numbers is acknowledged as a
    duplicate without being written (5 events marked sent, found only in an aborted transaction).
    """
    outage = 25.0 if FULL else 15.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cause = "Kafka below min.insync.replicas"
    with scenario(engine, database_url, busy_topic, relays, cluster, OUTBOX_KAFKA_TIMEOUT="5",
                  OUTBOX_HTTP=str(port)) as s:
        s.relay()
        s.wait_publishing()
        assert http_get(f"{base}/readyz")[0] == 200
        service("kill", "broker-2", "broker-3")
        killed = time.monotonic()
        time.sleep(2)  # a commit acknowledged just before the kill may still be marked
        frozen = s.sampler.sent
        # The controller shrinks the ISR once the dead brokers' sessions expire (9 s), the probe sees it
        # within 2 s more; a busy machine may take longer. The outage lasts until all was checked.
        code, ready = wait_until(lambda: (r := http_get(f"{base}/readyz")) and cause.encode() in r[1] and r,
                                 60, "/readyz to name the cause")
        named = time.monotonic() - killed
        assert code == 503 and not any("no Kafka producer" in p for p in json.loads(ready)["problems"]), ready
        assert metric(base, "outbox_kafka_partitions_below_min_isr") > 0
        # status reads the cause from the relay's control session, renamed at the end of its next
        # lane-management pass: a pass may wait behind lanes whose Kafka calls take up to 5 s here.
        wait_until(lambda: f"instance relay: {cause}" in cli(database_url, "status").stdout, 30,
                   "`outbox-relay status` to name the cause")
        time.sleep(max(0.0, outage - (time.monotonic() - killed)))
        assert s.sampler.sent == frozen, "events were marked sent while only one broker of three was up"
        assert pending(engine) > 0
        during = s.logs()
        returning = time.monotonic()
        service("up", "broker-2", "broker-3")  # returns once both registered and transactions work
        back = time.monotonic() - returning
        s.wait_resumed(returning)
        resumed = s.sampler.first_progress_after(returning)
        assert resumed is not None
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, 60, "readiness once the replicas are back")
        assert metric(base, "outbox_kafka_partitions_below_min_isr") == 0
        wait_until(lambda: "instance relay:" not in cli(database_url, "status").stdout, 30,
                   "`outbox-relay status` to stop naming a cause")
        said = [line.split(" ", 3)[-1][:160] for line in during.splitlines()
                if " WARNING " in line or " ERROR " in line or "action=retry" in line]
        assert sum(cause in line for line in s.logs().splitlines()) == 1, "the cause is logged once"
        assert "in-sync replicas back to min.insync.replicas" in s.logs()
        s.finish(f"2 of 3 brokers down for {outage:.0f} s (below min.insync.replicas)", resumed,
                 f"0 events marked during the outage; the cause named {named:.1f}s after the kill; publishing"
                 f" resumed {resumed:.1f}s after the brokers were started (their start took {back:.1f}s) after"
                 f" {returning - killed:.0f}s down; the relay said during the outage: {said}", since=killed)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(base: str, name: str) -> float:
    """The value of an unlabelled metric on the relay's /metrics."""
    text = http_get(f"{base}/metrics")[1].decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"{name} ")))


@full_size_only
@pytest.mark.timeout(900)
def test_progress_topic_leader_killed_while_lanes_are_taken_over(
    engine: Engine, database_url: str, busy_topic: str, relays: Relays, cluster: str
) -> None:
    """Two relays on 4 lanes (2/2). One is SIGKILLed together with the broker leading the progress
    partitions of its lanes: the survivor must fence, read progress from a partition whose leader
    is being re-elected, and carry on without a duplicate."""
    set_lane_count(engine, 4)
    with scenario(engine, database_url, busy_topic, relays, cluster) as s:
        s.relay("a")
        s.relay("b")
        wait_until(lambda: sorted(list(lane_owners(engine).values()).count(n) for n in "ab") == [2, 2], 60,
                   "a 2/2 split of the 4 lanes")
        s.wait_publishing(400)
        lanes_of_a = [lane for lane, owner in lane_owners(engine).items() if owner == "a"]
        leaders = [leader_of(cluster, s.progress_topic, lane) for lane in lanes_of_a]
        victim = max(set(leaders), key=leaders.count)
        killed = time.monotonic()
        s.relays["a"].kill()
        service("kill", f"broker-{victim}")
        took = wait_until(lambda: list(lane_owners(engine).values()) == ["b"] * 4 and time.monotonic(), 120,
                          "b to take all 4 lanes") - killed
        s.wait_resumed(killed)
        service("up", f"broker-{victim}")
        recovery = s.sampler.stall(killed)
        s.finish("progress partition leader SIGKILLed with a relay, its lanes taken over", recovery,
                 f"broker-{victim} led the progress of lanes {lanes_of_a}; b held 4/4 lanes after {took:.1f}s",
                 since=killed)
        assert "took lane" in s.relays["b"].log()
