"""Exactly-once publication and scale-out with lanes, against the real broker and database.

Every test ends with the ledger: zero lost, zero duplicated, no key out of id order.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import Engine, text

from outbox_relay import enqueue_many
from outbox_relay.faults import POINTS, RESIZE_POINTS
from outbox_relay.models.names import READY_INDEX_PREFIX, SCHEMA
from outbox_relay.write import Event
from tests.pgtools import SETTINGS
from tests.relaytools import (
    Relays,
    Writers,
    cli,
    lane_owners,
    ledger,
    pending,
    set_lane_count,
    states,
    stopped,
    wait_until,
)


def backlog(engine: Engine, topic: str, events: int, keys: int = 25) -> None:
    with engine.begin() as conn:
        enqueue_many(conn, [Event(topic, {"n": n}, key=f"key-{n % keys}") for n in range(events)])


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_point_of_a_tick_publishes_every_event_exactly_once(
    engine: Engine, database_url: str, topic: str, relays: Relays, point: str
) -> None:
    backlog(engine, topic, 600)
    crashes = 0
    for round_, nth in enumerate((1, 2, 3)):
        relay = relays.start(database_url, f"crash-{round_}", OUTBOX_BATCH_SIZE=40,
                             OUTBOX_FAULT_INJECTION=f"{point}:{nth}")
        code = relay.wait(60)
        assert code == -9, f"the relay was to die at {point}, exited {code}:\n{relay.log()}"
        crashes += 1
    survivor = relays.start(database_url, "survivor", OUTBOX_BATCH_SIZE=40)
    wait_until(lambda: pending(engine) == 0, 60, "the survivor to drain")
    survivor.stop()
    report = ledger(engine, [topic])
    print(f"\ncrash {crashes}x at {point}: {report.summary()}")
    assert report.ok, report.summary()
    assert report.received == 600
    if point in ("after_commit", "during_mark"):
        assert "recovered 40 events" in survivor.log() or "recovered 40 events" in relay.log()


def test_sigkill_loop_while_writers_insert(engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    set_lane_count(engine, 4)
    rng = random.Random(7)
    running = [relays.start(database_url, f"r{n}", OUTBOX_BATCH_SIZE=25) for n in range(2)]
    kills = 0
    with Writers(engine, topic, threads=3, keys=20) as writers:
        while kills < 30:
            time.sleep(rng.uniform(0.3, 1.2))
            victim = rng.randrange(len(running))
            running[victim].kill()
            kills += 1
            running[victim] = relays.start(database_url, f"r{victim}-{kills}", OUTBOX_BATCH_SIZE=25)
        writers.stop()
    wait_until(lambda: pending(engine) == 0, 90, "the relays to drain after the last kill")
    relays.stop_all()
    report = ledger(engine, [topic])
    print(f"\n{kills} SIGKILLs, {len(writers.committed)} events committed: {report.summary()}")
    assert report.ok, report.summary()
    assert report.received == len(writers.committed) > 500
    assert states(engine) == {"sent": len(writers.committed)}


def test_three_instances_share_eight_lanes_and_a_dead_ones_lanes_move(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    set_lane_count(engine, 8)
    trio = {name: relays.start(database_url, name, OUTBOX_BATCH_SIZE=25) for name in ("a", "b", "c")}
    with Writers(engine, topic, threads=3, keys=30, limit=3000) as writers:
        owners = wait_until(
            lambda: (o := lane_owners(engine)) and len(o) == 8 and len(set(o.values())) == 3 and
            max(list(o.values()).count(n) for n in "abc") <= 3 and o, 30, "3 instances to share 8 lanes")
        print(f"\nlanes at start: {owners}")
        trio["b"].kill()
        killed = time.monotonic()
        owners = wait_until(lambda: (o := lane_owners(engine)) and len(o) == 8 and set(o.values()) == {"a", "c"}
                            and o, 30, "b's lanes to move to a and c")
        print(f"lanes after b died ({time.monotonic() - killed:.1f}s): {owners}")
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the relays to drain")
    for name in ("a", "c"):
        trio[name].stop()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()
    assert sorted(list(owners.values()).count(n) for n in "ac") == [4, 4]


def test_changing_the_lane_count_while_writers_run(engine: Engine, database_url: str, topic: str,
                                                   relays: Relays) -> None:
    set_lane_count(engine, 2)
    for name in ("a", "b"):
        relays.start(database_url, name, OUTBOX_BATCH_SIZE=25)
    with Writers(engine, topic, threads=3, keys=30, limit=3000) as writers:
        wait_until(lambda: states(engine).get("sent", 0) > 300, 60, "publishing to start")
        result = cli(database_url, "lanes", "set", "5")
        assert result.returncode == 0, result.stderr
        assert "lane count changed from 2 to 5" in result.stdout
        wait_until(lambda: len(lane_owners(engine)) == 5, 30, "relays to take the 5 lanes")
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the relays to drain")
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT lane_count, resize_to FROM {SETTINGS}")).one() == (5, None)
    relays.stop_all()
    report = ledger(engine, [topic])
    print(f"\nresize 2 -> 5 under load: {report.summary()}")
    assert report.ok, report.summary()


def _sessions_named(engine: Engine, application_name: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                                {"name": application_name}).scalar_one())


@pytest.mark.parametrize("action", ["stop", "kill"])
@pytest.mark.parametrize("point", RESIZE_POINTS)
def test_a_lanes_set_that_hangs_or_dies_at_each_point_stops_no_relay(
        engine: Engine, database_url: str, topic: str, relays: Relays, point: str, action: str) -> None:
    """`lanes set 4` SIGSTOPped (continued much later) or SIGKILLed at each point, writers and relays going on.
    A stopped one keeps its session and so the resize lock (its kernel answers keepalives): the relays, which
    step back while a change is under way, waited for it for ever. Its session ends once it shows no sign of
    life for OUTBOX_INSTANCE_TIMEOUT and relays carry on with the old count; continued, it stops with one
    line saying where it left the change.
    Every event is published exactly once, in order per key; the next `lanes set` works and leaves no lane
    index of another count behind (one killed after storing the count left the old count's for good)."""
    set_lane_count(engine, 2)
    for name in ("a", "b"):
        relays.start(database_url, name, OUTBOX_BATCH_SIZE=25, OUTBOX_INSTANCE_TIMEOUT="3")
    fault = {**os.environ, "OUTBOX_FAULT_INJECTION": f"{point}:1:stop" if action == "stop" else f"{point}:1",
             "OUTBOX_INSTANCE_TIMEOUT": "3"}
    with Writers(engine, topic, threads=2, keys=30, limit=1500) as writers:
        wait_until(lambda: states(engine).get("sent", 0) > 100, 60, "publishing to start")
        change = subprocess.Popen([sys.executable, "-m", "outbox_relay", "lanes", "set", "4", "--database-url",
                                   database_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fault)
        try:
            if action == "stop":
                wait_until(lambda: stopped(change.pid), 60, f"lanes set to hang at {point}")
            else:
                assert change.wait(60) == -signal.SIGKILL
            wait_until(writers.done, 120, "writers to finish")
            wait_until(lambda: pending(engine) == 0, 60, "the relays to drain meanwhile")
            if action == "stop":  # continued much later: after PostgreSQL ended its idle session
                wait_until(lambda: not _sessions_named(engine, "outbox-relay lanes"), 30, "its session to end")
                os.kill(change.pid, signal.SIGCONT)
            _, stderr = change.communicate(timeout=60)
        finally:
            if change.poll() is None:
                change.kill()
                change.wait(10)
    if action == "stop":
        assert change.returncode == 1 and "Traceback" not in stderr, stderr
        assert ("error: the lane count is now 4 (was 2)" if point == "resize_finished"
                else "error: the change to 4 lanes was abandoned") in stderr, stderr
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT lane_count FROM {SETTINGS}")).scalar_one() == (
            4 if point == "resize_finished" else 2)
    result = cli(database_url, "lanes", "set", "3")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(lane_owners(engine)) == 3, 30, "relays to take the 3 lanes")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes"
                                 " WHERE schemaname = :schema AND indexname LIKE :pattern"),
                            {"schema": SCHEMA, "pattern": f"{READY_INDEX_PREFIX}%"}).scalar_one() == [
            f"{READY_INDEX_PREFIX}3"]
    relays.stop_all()
    report = ledger(engine, [topic])
    print(f"\nlanes set given SIG{action.upper()} at {point}, under load: {report.summary()}")
    assert report.ok, report.summary()
    assert report.received == len(writers.committed)
