#!/usr/bin/env python3
"""What does the outbox cost a writer? One business row per transaction, with its event written by
`enqueue` versus the same payload inserted into a plain table, measured side by side in one run
(interleaved rounds, so machine noise hits both alike). Prints the ratio; the target is <= 1.25.

Then the same under concurrency (--writers connections committing at once, psycopg without SQLAlchemy,
so the client's CPU does not hide the server's cost): commits/s with a plain insert, with the outbox's
insert while no lane sleeps (relays keeping up: commits do not notify), and while a lane sleeps (every
commit notifies). A transaction that notifies holds a lock on the whole PostgreSQL instance from its
commit until the commit is durable, so notifying commits cannot share a WAL flush (group commit).

    python bench/write_overhead.py [--transactions 2000] [--rounds 5] [--writers 16] [--seconds 5]
Needs OUTBOX_DATABASE_URL (`eval "$(scripts/services env)"`); uses a scratch database it drops after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid

from sqlalchemy import Column, Integer, LargeBinary, MetaData, Table, Text, create_engine, insert, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.engine import make_url

from outbox_relay import enqueue, migrate
from outbox_relay.db.connection import conninfo
from outbox_relay.db.names import EVENTS_TABLE, SCHEMA
from outbox_relay.models import IDLE_LANES_TABLE

meta = MetaData()
orders = Table("bench_orders", meta, Column("id", Integer, primary_key=True), Column("customer", Text))
plain = Table("bench_plain_events", meta, Column("id", Integer, primary_key=True), Column("event_id", UUID),
              Column("topic", Text), Column("key", LargeBinary), Column("value", LargeBinary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=2000, help="transactions per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writers", type=int, default=16, help="connections committing at once")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each concurrent round")
    args = parser.parse_args()

    base = make_url(os.environ["OUTBOX_DATABASE_URL"])
    scratch = f"bench_write_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{scratch}"'))
    url = base.set(database=scratch).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        engine = create_engine(url)
        meta.create_all(engine)
        payload = {"order": 0, "customer": "ada", "items": [{"sku": "x1", "qty": 2}], "note": "n" * 300}

        def with_outbox(n: int) -> None:
            with engine.begin() as conn:
                conn.execute(insert(orders).values(customer="ada"))
                enqueue(conn, "orders", {**payload, "order": n}, key="ada")

        def with_plain(n: int) -> None:
            with engine.begin() as conn:
                conn.execute(insert(orders).values(customer="ada"))
                conn.execute(insert(plain).values(event_id=uuid.uuid4(), topic="orders", key=b"ada",
                                                  value=json.dumps({**payload, "order": n}).encode()))

        for warmup in (with_outbox, with_plain):
            for n in range(200):
                warmup(n)
        timings: dict[str, list[float]] = {"outbox": [], "plain": []}
        for _ in range(args.rounds):
            for name, variant in (("outbox", with_outbox), ("plain", with_plain)):
                started = time.perf_counter()
                for n in range(args.transactions):
                    variant(n)
                timings[name].append((time.perf_counter() - started) / args.transactions)
        engine.dispose()
        rates = concurrent_rates(url, args.writers, args.seconds, args.rounds)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
        admin.dispose()

    outbox, plain_ = statistics.median(timings["outbox"]), statistics.median(timings["plain"])
    print(f"{'variant':<28}{'median µs/txn':>14}{'per round':>40}")
    for name, label in (("outbox", "business row + enqueue"), ("plain", "business row + plain insert")):
        rounds = " ".join(f"{t * 1e6:.0f}" for t in timings[name])
        print(f"{label:<28}{statistics.median(timings[name]) * 1e6:>14.0f}{rounds:>40}")
    print(f"write overhead ratio (outbox / plain): {outbox / plain_:.3f}  (target <= 1.25)")
    print(f"\n{args.writers} concurrent writers, psycopg{'median commits/s':>26}{'per round':>40}")
    for name, label in (("plain", "business row + plain insert"), ("outbox", "business row + outbox row"),
                        ("asleep", "  the same while a lane sleeps")):
        rounds = " ".join(f"{r:.0f}" for r in rates[name])
        print(f"{label:<44}{statistics.median(rates[name]):>10.0f}{rounds:>40}")
    plain_rate = statistics.median(rates["plain"])
    print(f"concurrent write overhead (plain / outbox commits/s): {plain_rate / statistics.median(rates['outbox']):.3f}"
          f"  a lane asleep: {plain_rate / statistics.median(rates['asleep']):.3f}  (target <= 1.25)")


def concurrent_rates(url: str, writers: int, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Commits/s of `writers` connections at once, each variant in turn, `rounds` times."""
    import psycopg

    info = conninfo(url)
    value = b"v" * 400
    statements = {
        "plain": "INSERT INTO bench_plain_events (event_id, topic, key, value) VALUES (%s, 'orders', 'ada', %s)",
        "outbox": f'INSERT INTO "{SCHEMA}"."{EVENTS_TABLE}" (event_id, topic, key, value, header_names, '
                  "header_values) VALUES (%s, 'orders', 'ada', %s, '{}', '{}')",
    }

    def run(statement: str) -> float:
        done = [0] * writers
        deadline = time.monotonic() + seconds

        def write(n: int) -> None:
            with psycopg.connect(info) as conn:
                while time.monotonic() < deadline:
                    with conn.transaction():
                        conn.execute("INSERT INTO bench_orders (customer) VALUES ('ada')")
                        conn.execute(statement, (uuid.uuid4(), value))
                    done[n] += 1

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done) / seconds

    def lane_asleep(asleep: bool) -> None:
        idle = f'"{SCHEMA}"."{IDLE_LANES_TABLE}"'
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {idle} (lane) VALUES (0)" if asleep else f"DELETE FROM {idle}")

    rates: dict[str, list[float]] = {"plain": [], "outbox": [], "asleep": []}
    run(statements["outbox"])  # warm-up
    for _ in range(rounds):
        rates["plain"].append(run(statements["plain"]))
        rates["outbox"].append(run(statements["outbox"]))
        lane_asleep(True)
        try:
            rates["asleep"].append(run(statements["outbox"]))
        finally:
            lane_asleep(False)
    return rates


if __name__ == "__main__":
    main()
