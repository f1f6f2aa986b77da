#!/usr/bin/env python3
"""Where does a lane's tick spend its time? Drains the same backlog through the serial tick (claim ->
Kafka transaction -> mark, one after the other, as releases up to 0.3 did) and the overlapped tick (the
previous batch's mark runs in PostgreSQL while the next batch's Kafka transaction commits), in
interleaved rounds so machine noise hits both alike. Prints each stage's median per batch and the
drain rate of both, side by side, and the ratio.

Then the claim with delayed events waiting: the claim before 0008 (the v5 lane index, which holds
them) against today's (ready index + delayed index), with --delayed events not due for an hour.

    python bench/tick_profile.py [--events 200000] [--batch 1000] [--rounds 2] [--delayed 200000]

Needs OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (`eval "$(scripts/services env)"`); uses a
scratch database it drops after. PostgreSQL runs with production durability while it measures (fsync,
synchronous_commit and full_page_writes on, set with ALTER SYSTEM and reset after); --keep-durability
leaves the server's own settings alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy.engine import make_url

from outbox_relay import migrate, progress
from outbox_relay.config import Settings
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Store
from outbox_relay.publisher import LanePublisher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers name the table
from tests.pgtools import EVENTS, SENT, UNSENT

DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")
TOPIC = "bench-tick-profile"
# The claim of releases before 0008: every pending row of the lane, due or not, in one lane index
# (here on the unsent table, as such an index would be now), each row's event read as the claim does.
OLD_CLAIM = (
    f"SELECT e.* FROM {UNSENT} u JOIN {EVENTS} e ON e.id = u.id WHERE u.state = 'pending'"
    " AND coalesce(u.due_at, '-infinity') <= now() AND (u.lane_key %% 1) = 0 ORDER BY u.id LIMIT %(limit)s"
)


def load(conn: psycopg.Connection[Any], events: int, delay: str = "0 seconds") -> None:
    conn.execute("SET statement_timeout = 0")  # a large backlog takes longer than a lane's bound
    conn.execute(f"TRUNCATE {EVENTS}, {UNSENT}, {SENT}")
    conn.execute(
        f"INSERT INTO {EVENTS} (topic, key, value, available_at)"
        " SELECT %s, convert_to('key-' || (g %% 1000), 'UTF8'), convert_to(repeat('x', 512), 'UTF8'),"
        " now() + %s::interval FROM generate_series(1, %s) g", (TOPIC, delay, events))
    conn.execute(f"VACUUM ANALYZE {EVENTS}")
    conn.execute(f"VACUUM ANALYZE {UNSENT}")
    conn.execute("CHECKPOINT")
    conn.execute("SET statement_timeout = 30000")  # back to the lane session's


def drain(store: Store, conn: psycopg.Connection[Any], publisher: LanePublisher, batch: int,
          overlapped: bool) -> dict[str, list[float]]:
    """Drain the lane; per-batch seconds of each stage (the overlapped tick's 'mark' is the wait for it)."""
    stages: dict[str, list[float]] = {"claim": [], "kafka": [], "mark": [], "total": []}
    unmarked: list[int] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        rows = store.claim(conn, 0, 1, batch, unmarked)
        t1 = time.perf_counter()
        if not rows:
            break
        marking = store.send_mark(conn, unmarked) if overlapped and unmarked else None
        publisher.publish(rows)
        t2 = time.perf_counter()
        if overlapped:
            if marking is not None:
                marking.wait()
            unmarked = [row.id for row in rows]
        else:
            store.mark_sent(conn, [row.id for row in rows])
        t3 = time.perf_counter()
        for name, seconds in (("claim", t1 - t0), ("kafka", t2 - t1), ("mark", t3 - t2)):
            stages[name].append(seconds)
    if unmarked:
        store.mark_sent(conn, unmarked)
    stages["total"].append(time.perf_counter() - started)
    return stages


def claim_cost(conn: psycopg.Connection[Any], query: Any, params: dict[str, Any],
               repeats: int = 20) -> tuple[float, int]:
    """Median ms of a claim and the shared buffers it touched."""
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        conn.execute(query, params, binary=True).fetchall()
        timings.append(time.perf_counter() - t0)
    plan = conn.execute(b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + _text(conn, query), params).fetchone()
    assert plan is not None
    node = plan[0][0]["Plan"]
    return statistics.median(timings) * 1e3, int(node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0))


def _text(conn: psycopg.Connection[Any], query: Any) -> bytes:
    return query.encode() if isinstance(query, str) else query.as_bytes(conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="backlog drained per variant and round")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delayed", type=int, default=200_000, help="not-due events for the claim comparison")
    parser.add_argument("--keep-durability", action="store_true", help="do not switch the server to fsync=on etc.")
    args = parser.parse_args()

    base = make_url(os.environ["OUTBOX_DATABASE_URL"])
    scratch = f"bench_tick_{uuid.uuid4().hex[:8]}"
    url = base.set(database=scratch).render_as_string(hide_password=False)
    admin = psycopg.connect(conninfo(base.render_as_string(hide_password=False)), autocommit=True)
    admin.execute(f'CREATE DATABASE "{scratch}"')
    try:
        if not args.keep_durability:
            for name in DURABILITY:
                admin.execute(f"ALTER SYSTEM SET {name} = on")
            admin.execute("SELECT pg_reload_conf()")
        migrate.upgrade(url, lanes=1)
        conn = connect(url, lane=True)
        # The server's settings: the lane session itself commits with synchronous_commit=off.
        shown = {name: admin.execute(f"SHOW {name}").fetchone()[0] for name in DURABILITY}  # type: ignore[index]
        print("PostgreSQL " + ", ".join(f"{k}={v}" for k, v in shown.items()) + " (lane sessions:"
              f" synchronous_commit={conn.execute('SHOW synchronous_commit').fetchone()[0]})")  # type: ignore[index]
        bootstrap = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
        AdminClient({"bootstrap.servers": bootstrap}).create_topics([NewTopic(TOPIC, 1, 1)])
        settings = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": url, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap})
        outbox_id = str(conn.execute("SELECT outbox_id FROM outbox.events_settings").fetchone()[0])  # type: ignore[index]
        publisher = LanePublisher.for_lane(settings, settings.kafka_names(outbox_id), progress.Scope(outbox_id, 0, 1))
        publisher.start()
        store = Store()
        results: dict[str, list[dict[str, list[float]]]] = {"serial": [], "overlapped": []}
        load(conn, 5000)
        drain(store, conn, publisher, args.batch, True)  # warm-up: producer, topic metadata, plans
        for _ in range(args.rounds):
            for name in results:
                load(conn, args.events)
                results[name].append(drain(store, conn, publisher, args.batch, name == "overlapped"))
        publisher.close()

        print(f"\n{args.events} events, batch {args.batch}, {args.rounds} rounds; median ms per batch")
        print(f"{'tick':<12}{'claim':>8}{'kafka':>8}{'mark':>8}{'events/s':>10}   per round")
        rates: dict[str, float] = {}
        for name, rounds in results.items():
            merged = {stage: [s for r in rounds for s in r[stage]] for stage in ("claim", "kafka", "mark")}
            per_round = [args.events / r["total"][0] for r in rounds]
            rates[name] = statistics.median(per_round)
            print(f"{name:<12}" + "".join(f"{statistics.median(merged[s]) * 1e3:>8.1f}" for s in merged)
                  + f"{rates[name]:>10.0f}   " + " ".join(f"{r:.0f}" for r in per_round))
        print(f"drain ratio (overlapped / serial): {rates['overlapped'] / rates['serial']:.2f}")
        print("  (overlapped 'mark' = waiting for the previous batch's mark after Kafka committed)")

        if args.delayed:
            load(conn, args.delayed, "1 hour")
            conn.execute("SET statement_timeout = 0")
            conn.execute(f"INSERT INTO {EVENTS} (topic, value) SELECT %s, convert_to(repeat('x', 512), 'UTF8')"
                         " FROM generate_series(1, %s)", (TOPIC, args.batch))
            conn.execute(f"CREATE INDEX bench_old_lane_index ON {UNSENT} ((lane_key % 1), id) WHERE state = 'pending'")
            conn.execute(f"ANALYZE {UNSENT}")
            params = {"lane": 0, "limit": args.batch, "unmarked": []}
            before = claim_cost(conn, OLD_CLAIM, params)
            after = claim_cost(conn, store.claim_query(1), params)
            print(f"\nclaim of {args.batch} due events with {args.delayed} not due in the lane:")
            print(f"  before 0008 (v5 lane index): {before[0]:7.1f} ms, {before[1]:>7} buffers")
            print(f"  now (ready + delayed index): {after[0]:7.1f} ms, {after[1]:>7} buffers")
        conn.close()
    finally:
        if not args.keep_durability:
            for name in DURABILITY:
                admin.execute(f"ALTER SYSTEM RESET {name}")
            admin.execute("SELECT pg_reload_conf()")
        admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
