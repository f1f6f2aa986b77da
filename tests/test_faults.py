"""Outages and crashes under load, against the real broker and database: nothing lost, nothing twice.

Each test ends with the whole ledger: zero lost, zero duplicated, no key out of order, nothing
unknown (run with -s to see the figures).
"""

from __future__ import annotations

import time

from sqlalchemy import Engine

from tests.relaytools import (
    Relays,
    Writers,
    drain_through_fault,
    lane_owner,
    ledger,
    pending,
    service,
    states,
    wait_until,
)


def drain_through_restart(engine: Engine, database_url: str, topic: str, relays: Relays, name: str) -> None:
    def restart() -> None:
        service("down", name)
        time.sleep(3)
        service("up", name)

    report = drain_through_fault(engine, database_url, topic, relays, restart, recover_within=120)
    print(f"\n{name} restart: {report.summary()}")
    assert report.ok, report.summary()


def test_broker_restart_mid_drain(engine: Engine, database_url: str, topic: str, relays: Relays,
                                  restores_services: None) -> None:
    drain_through_restart(engine, database_url, topic, relays, "kafka")


def test_postgres_restart_mid_drain(engine: Engine, database_url: str, topic: str, relays: Relays,
                                    restores_services: None) -> None:
    drain_through_restart(engine, database_url, topic, relays, "postgres")


def test_sigkill_of_the_owner_hands_the_lane_to_the_standby(engine: Engine, database_url: str, topic: str,
                                                            relays: Relays) -> None:
    first = relays.start(database_url, "first", OUTBOX_BATCH_SIZE=20)
    wait_until(lambda: lane_owner(engine) == "first", 30, "the first relay to own the lane")
    second = relays.start(database_url, "second", OUTBOX_BATCH_SIZE=20)
    with Writers(engine, topic, threads=3, limit=1500) as writers:
        wait_until(lambda: states(engine).get("sent", 0) >= 300, 60, "publishing to start")
        assert lane_owner(engine) == "first"
        first.kill()
        killed = time.monotonic()
        wait_until(lambda: lane_owner(engine) == "second", 30, "the standby to take the lane")
        failover = time.monotonic() - killed
        sent_at_takeover = states(engine).get("sent", 0)
        wait_until(lambda: states(engine).get("sent", 0) > sent_at_takeover, 30, "the standby to publish")
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the standby to drain")
    second.stop()
    report = ledger(engine, [topic])
    print(f"\nfailover after SIGKILL: {failover:.2f}s (lane interval 0.3s); {report.summary()}")
    assert report.ok, report.summary()
    assert "took lane 0" in second.log()
