#!/usr/bin/env python3
"""`make bench`: the relay measured side by side with the limits Postgres and Kafka impose, in one run.

- drain:   a backlog of --events events of --size bytes drained by 1, 2 and 4 relay processes
           (4 lanes), against (a) a bare transactional producer publishing the same messages in the
           same batch size (Kafka's ceiling) and (b) a bare psycopg loop selecting and marking the
           same rows (Postgres's ceiling). Peak RSS of each relay process is reported too.
- latency: steady insert rates, writer commit -> event visible to a read_committed consumer,
           with LISTEN/NOTIFY wake-ups on and off.
- scale:   the claim query with --scale-rows sent rows in the table versus an empty table.
- write:   the enqueue-in-transaction overhead (bench/write_overhead.py).
Prints tables, writes bench-results/bench.json and bench-results/bench.png.
Needs the services (`make bench` starts them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import create_engine

from outbox_relay import enqueue, migrate
from outbox_relay.db.connection import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' helpers (databases, topics, relay processes) serve the bench too
from tests import kafkatools  # noqa: E402
from tests.pgtools import EVENTS, create_database, drop_database  # noqa: E402
from tests.relaytools import Relays  # noqa: E402

RESULTS = ROOT / "bench-results"
BASE_URL = os.environ.get("OUTBOX_DATABASE_URL", "")
BOOTSTRAP = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "")
BATCH = 1000
# Relays with the default timings (not the tests' fast ones) and quiet logs, in bench-results/<name>.log.
# Whatever happens, main() stops every one before it returns.
RELAYS = Relays(RESULTS, tuning={"OUTBOX_LOG_LEVEL": "WARNING", "OUTBOX_BATCH_SIZE": str(BATCH),
                                 "OUTBOX_LANE_INTERVAL": "0.5"})


# --- scaffolding ------------------------------------------------------------------------


def create_topic(partitions: int = 6) -> str:
    return kafkatools.create_topic(f"bench-{uuid.uuid4().hex[:10]}", partitions)


def sql(url: str, statement: str, params: Any = None) -> Any:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


def pending(url: str) -> int:
    """Cheap on millions of rows (the pending partial index), unlike the tests' count per state."""
    return int(sql(url, f"SELECT count(*) FROM {EVENTS} WHERE state = 'pending'")[0][0])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- drain ------------------------------------------------------------------------------


def fill_template(name: str, events: int, size: int, topic: str) -> None:
    url = create_database(name)
    migrate.upgrade(url, lanes=4)
    sql(url, "CREATE EXTENSION IF NOT EXISTS pgcrypto")
    sql(url, f"INSERT INTO {EVENTS} (topic, key, value, header_names, header_values)"
             " SELECT %s, convert_to('key-' || (i %% 1000), 'UTF8'), gen_random_bytes(%s),"
             " ARRAY['content-type'], ARRAY[convert_to('application/octet-stream', 'UTF8')]"
             " FROM generate_series(1, %s) i", (topic, size, events))
    sql(url, f"VACUUM ANALYZE {EVENTS}")


def kafka_ceiling(events: int, size: int) -> float:
    topic = create_topic()
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": f"bench-{uuid.uuid4()}",
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"})
    producer.init_transactions(30)
    values = [os.urandom(size) for _ in range(BATCH)]
    headers = [("content-type", b"application/octet-stream"), ("outbox-event-id", str(uuid.uuid4()).encode())]
    started = time.perf_counter()
    for start in range(0, events, BATCH):
        producer.begin_transaction()
        for i in range(start, min(events, start + BATCH)):
            while True:
                try:
                    producer.produce(topic, key=f"key-{i % 1000}".encode(), value=values[i % BATCH], headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.commit_transaction(60)
    return events / (time.perf_counter() - started)


def postgres_ceiling(url: str) -> float:
    """Select and mark the same rows, batch by batch, with no Kafka in between."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        total = 0
        started = time.perf_counter()
        while True:
            rows = conn.execute(f"SELECT id, event_id, topic, key, value, header_names, header_values FROM"
                                f" {EVENTS} WHERE state = 'pending' ORDER BY id LIMIT %s", (BATCH,),
                                binary=True).fetchall()
            if not rows:
                break
            conn.execute(f"UPDATE {EVENTS} SET state = 'sent', sent_at = now() WHERE id = ANY(%s)",
                         ([row[0] for row in rows],))
            total += len(rows)
        return total / (time.perf_counter() - started)


def relay_drain(url: str, processes: int, events: int) -> tuple[float, float]:
    relays = [RELAYS.start(url, f"relay-drain-{processes}-{n}", OUTBOX_LISTEN="off") for n in range(processes)]
    started = time.perf_counter()
    while pending(url) > 0:
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    rss = max(peak_rss_mib(relay.pid) for relay in relays)
    RELAYS.stop_all()
    return events / elapsed, rss


def drain(args: argparse.Namespace) -> dict[str, Any]:
    template = f"bench_drain_{uuid.uuid4().hex[:6]}"
    topic = create_topic()
    print(f"drain: filling {args.events:,} events of {args.size} bytes ...", flush=True)
    fill_template(template, args.events, args.size, topic)
    results: dict[str, Any] = {"events": args.events, "size": args.size, "batch": BATCH}
    try:
        results["kafka_ceiling"] = kafka_ceiling(args.events, args.size)
        print(f"  kafka ceiling      {results['kafka_ceiling']:>10,.0f} events/s", flush=True)
        name = f"{template}_pg"
        results["postgres_ceiling"] = postgres_ceiling(create_database(name, template))
        drop_database(name)
        print(f"  postgres ceiling   {results['postgres_ceiling']:>10,.0f} events/s", flush=True)
        results["relay"] = {}
        for processes in args.processes:
            name = f"{template}_r{processes}"
            rate, rss = relay_drain(create_database(name, template), processes, args.events)
            drop_database(name)
            results["relay"][processes] = {"events_per_s": rate, "peak_rss_mib": rss}
            print(f"  relay x{processes}           {rate:>10,.0f} events/s  (peak RSS {rss:.0f} MiB per process)",
                  flush=True)
    finally:
        drop_database(template)
    ceiling = min(results["kafka_ceiling"], results["postgres_ceiling"])
    results["ratio"] = {p: r["events_per_s"] / ceiling for p, r in results["relay"].items()}
    return results


# --- latency ----------------------------------------------------------------------------


def _writer(url: str, topic: str, rate: float, seconds: float, out: Any) -> None:
    engine = create_engine(url, pool_size=1)
    committed: dict[str, float] = {}
    interval = 1.0 / rate
    next_at = time.monotonic()
    deadline = next_at + seconds
    while next_at < deadline:
        with engine.begin() as conn:
            event_id = enqueue(conn, topic, b"x" * 512, key=f"k{len(committed) % 100}")
        committed[str(event_id)] = time.time()
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    out.put(committed)
    engine.dispose()


def latency_run(url: str, rate: int, listen: str, seconds: float) -> dict[str, float]:
    topic = create_topic(3)
    relay = RELAYS.start(url, f"relay-latency-{rate}-{listen}", OUTBOX_LISTEN=listen, OUTBOX_POLL_INTERVAL="0.5")
    received: dict[str, float] = {}
    stop = threading.Event()

    def consume() -> None:
        consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4()}",
                             "isolation.level": "read_committed", "fetch.wait.max.ms": 5,
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        while not stop.is_set():
            message = consumer.poll(0.05)
            if message is not None and not message.error():
                received[dict(message.headers())["outbox-event-id"].decode()] = time.time()
        consumer.close()

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(3)  # the relay takes its lanes, the consumer its partitions
    writers = max(1, min(8, rate // 500))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_writer, args=(url, topic, rate / writers, seconds, queue))
             for _ in range(writers)]
    for proc in procs:
        proc.start()
    committed: dict[str, float] = {}
    for _ in procs:
        committed.update(queue.get())
    for proc in procs:
        proc.join()
    deadline = time.time() + 30
    while len(set(committed) - set(received)) and time.time() < deadline:
        time.sleep(0.1)
    stop.set()
    reader.join()
    relay.stop()
    latencies = sorted((received[e] - t) * 1000 for e, t in committed.items() if e in received)
    return {"rate_asked": rate, "rate_achieved": len(committed) / seconds, "missing": len(committed) - len(latencies),
            "p50_ms": statistics.median(latencies), "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
            "max_ms": latencies[-1]}


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    name = f"bench_latency_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    migrate.upgrade(url, lanes=args.latency_lanes)
    rows = []
    try:
        for rate in args.rates:
            for listen in ("on", "off"):
                result = {"listen": listen, **latency_run(url, rate, listen, args.seconds)}
                rows.append(result)
                print(f"  {rate:>5}/s asked ({result['rate_achieved']:>6.0f} achieved) wake-ups {listen:<3}"
                      f" p50 {result['p50_ms']:>7.1f} ms  p99 {result['p99_ms']:>7.1f} ms"
                      f"  max {result['max_ms']:>7.1f} ms  missing {result['missing']}", flush=True)
    finally:
        drop_database(name)
    return rows


# --- scale ------------------------------------------------------------------------------


def claim_ms(url: str, runs: int = 30) -> float:
    """Median execution time of the relay's claim (lane 0 of 4, batch 1000), from EXPLAIN ANALYZE."""
    from outbox_relay.db.connection import connect
    from outbox_relay.db.lanes import Store

    query = Store().claim_query(4).as_string()
    times = []
    with connect(url, lane=True) as conn:
        for _ in range(runs):
            plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}",
                                {"lane": 0, "limit": BATCH, "unmarked": []}).fetchone()[0]  # type: ignore[index]
            times.append(plan[0]["Execution Time"])
    return statistics.median(times)


def scale(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sent_rows": args.scale_rows}
    for label, sent in (("empty", 0), ("big", args.scale_rows)):
        name = f"bench_scale_{label}_{uuid.uuid4().hex[:6]}"
        url = create_database(name)
        try:
            migrate.upgrade(url, lanes=4)
            if sent:
                print(f"scale: writing {sent:,} sent rows ...", flush=True)
                sql(url, f"INSERT INTO {EVENTS} (topic, key, value, state, sent_at) SELECT 'history',"
                         " convert_to('key-' || (i %% 1000), 'UTF8'), '\\x00', 'sent', now()"
                         " FROM generate_series(1, %s) i", (sent,))
            sql(url, f"INSERT INTO {EVENTS} (topic, key, value) SELECT 'live',"
                     " convert_to('key-' || (i % 1000), 'UTF8'), '\\x00' FROM generate_series(1, 5000) i")
            sql(url, f"VACUUM ANALYZE {EVENTS}")
            results[f"{label}_claim_ms"] = claim_ms(url)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "outbox_relay.cli", "status", "--json", "--database-url", url],
                           check=True, capture_output=True)
            results[f"{label}_status_s"] = time.perf_counter() - started
        finally:
            drop_database(name)
    results["claim_ratio"] = results["big_claim_ms"] / results["empty_claim_ms"]
    return results


# --- report -----------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if "drain" in results:
        d = results["drain"]
        labels = ["Kafka\nceiling", "Postgres\nceiling", *[f"relay x{p}" for p in d["relay"]]]
        values = [d["kafka_ceiling"], d["postgres_ceiling"], *[r["events_per_s"] for r in d["relay"].values()]]
        left.bar(labels, values, color=["#888", "#888", *["#2a7"] * len(d["relay"])])
        left.set_title(f"Drain of {d['events']:,} events of {d['size']} B (events/s)")
        for i, v in enumerate(values):
            left.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    if "latency" in results:
        rows = results["latency"]
        rates = sorted({r["rate_asked"] for r in rows})
        for offset, listen in ((-0.2, "on"), (0.2, "off")):
            p99 = [next(r["p99_ms"] for r in rows if r["rate_asked"] == rate and r["listen"] == listen)
                   for rate in rates]
            right.bar([i + offset for i in range(len(rates))], p99, width=0.4, label=f"wake-ups {listen}")
        right.set_xticks(range(len(rates)), [f"{rate}/s" for rate in rates])
        right.set_title("Commit to consumer, p99 (ms)")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if "drain" in args.only:
        results["drain"] = drain(args)
    if "latency" in args.only:
        print("latency: writer commit -> visible to a read_committed consumer", flush=True)
        results["latency"] = latency(args)
    if "scale" in args.only:
        results["scale"] = scale(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each latency run")
    parser.add_argument("--latency-lanes", type=int, default=1, help="lanes in the latency runs")
    parser.add_argument("--scale-rows", type=int, default=10_000_000)
    parser.add_argument("--only", nargs="+", choices=["drain", "latency", "scale", "write"],
                        default=["drain", "latency", "scale", "write"])
    args = parser.parse_args()
    if not BASE_URL or not BOOTSTRAP:
        print("set OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (make bench does)", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    try:
        measure(args, results)
    finally:
        RELAYS.stop_all()
    if "scale" in results:
        s = results["scale"]
        print(f"  claim with {s['sent_rows']:,} sent rows: {s['big_claim_ms']:.2f} ms; empty table:"
              f" {s['empty_claim_ms']:.2f} ms; ratio {s['claim_ratio']:.2f} (target <= 2)")
        print(f"  `outbox-relay status`: {s['big_status_s']:.2f} s with {s['sent_rows']:,} sent rows,"
              f" {s['empty_status_s']:.2f} s empty")
    if "write" in args.only:
        print("write overhead:", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "write_overhead.py")], check=True)
    if "drain" in results:
        d = results["drain"]
        ceiling = min(d["kafka_ceiling"], d["postgres_ceiling"])
        print(f"\n{'':<22}{'events/s':>12}{'ratio to min(ceilings)':>26}")
        print(f"{'Kafka ceiling':<22}{d['kafka_ceiling']:>12,.0f}")
        print(f"{'Postgres ceiling':<22}{d['postgres_ceiling']:>12,.0f}")
        for processes, r in d["relay"].items():
            print(f"{f'relay, {processes} process(es)':<22}{r['events_per_s']:>12,.0f}"
                  f"{r['events_per_s'] / ceiling:>26.2f}")
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    chart(results, RESULTS / "bench.png")
    print(f"\nwrote {RESULTS / 'bench.json'} and {RESULTS / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
