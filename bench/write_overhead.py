#!/usr/bin/env python3
"""What does the outbox cost a writer? One business row per transaction, with its event written by
`enqueue` versus the same payload inserted into a plain table, measured side by side in one run
(interleaved rounds, so machine noise hits both alike). Prints the ratio; the target is <= 1.25.

    python bench/write_overhead.py [--transactions 2000] [--rounds 5]
Needs OUTBOX_DATABASE_URL (`eval "$(scripts/services env)"`); uses a scratch database it drops after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

from sqlalchemy import Column, Integer, LargeBinary, MetaData, Table, Text, create_engine, insert, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.engine import make_url

from outbox_relay import enqueue, migrate

meta = MetaData()
orders = Table("bench_orders", meta, Column("id", Integer, primary_key=True), Column("customer", Text))
plain = Table("bench_plain_events", meta, Column("id", Integer, primary_key=True), Column("event_id", UUID),
              Column("topic", Text), Column("key", LargeBinary), Column("value", LargeBinary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=2000, help="transactions per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
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


if __name__ == "__main__":
    main()
