#!/usr/bin/env python3
"""`make bench`: the relay measured against the ceilings of Postgres and Kafka and beside Debezium, in one run.

PostgreSQL runs with production durability (fsync, synchronous_commit, full_page_writes on; wal_level=logical
for Debezium): `make bench` starts its own cluster for that (`scripts/services up bench`); tests keep the fast
dev cluster. Whatever relay code is installed is what is measured.

- drain:     a backlog of --events events of --size bytes drained by 1, 2 and 4 relay processes (4 lanes),
             against (a) a bare transactional producer publishing the same messages in the same batch size
             (Kafka's ceiling) and (b) a bare psycopg loop selecting and marking the same rows (the
             select-and-mark "ceiling"); both warmed up, repeated (--repeats), median and spread.
- peers:     the same backlog through Debezium's PostgreSQL connector + outbox EventRouter on Kafka Connect
             standalone (bench/debezium.py), and the latency runs through it (poll.interval.ms default and 10).
- latency:   steady insert rates (--rates), writer commit -> event visible to a read_committed consumer.
- scale:     the claim query with --scale-rows sent rows in the table versus an empty table.
- retention: a simulated week of --retention-per-day events a day, scaled down in time (a day lasts
             --retention-day-seconds), not in rows: claim cost and table size per day.
- write:     the enqueue-in-transaction overhead (bench/write_overhead.py).
- scaling:   (--only scaling) 1, 2, 4 lanes and processes: events/s and PostgreSQL backends (docs/scaling.md).
CPU seconds (each relay process, Connect's JVM, PostgreSQL with all its backends) and peak RSS are reported
beside each drain. A process the bench started that dies stops the run at once with its last log lines.
Prints tables and the goals of issue 14 as ratios (met/missed); writes bench-results/bench.json and .png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import create_engine

from outbox_relay import Event, enqueue_many, migrate
from outbox_relay.db.connection import connect, conninfo
from outbox_relay.db.lanes import Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' helpers (databases, topics, relay processes) serve the bench too
sys.path.insert(0, str(ROOT / "bench"))
import debezium  # noqa: E402
from watchdog import (  # noqa: E402
    MeasurementFailed,
    Watched,
    cpu_seconds,
    peak_rss_mib,
    stalled,
    tree_cpu_seconds,
    wait_until,
)

from tests import kafkatools  # noqa: E402
from tests.pgtools import EVENTS, SENT, SETTINGS, UNSENT, admin, drop_database, url_for  # noqa: E402
from tests.relaytools import Relays, free_port  # noqa: E402

RESULTS = ROOT / "bench-results"
BASE_URL = os.environ.get("OUTBOX_DATABASE_URL", "")
BOOTSTRAP = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "")
BATCH = 1000
# The latency writers commit one event per transaction up to this rate, and MANY_PER_COMMIT above it.
SINGLE_EVENT_RATE = 1000
MANY_PER_COMMIT = 20
# Relays with the default timings (not the tests' fast ones) and quiet logs, in bench-results/<name>.log.
# Whatever happens, main() stops every one before it returns.
RELAYS = Relays(RESULTS, tuning={"OUTBOX_LOG_LEVEL": "WARNING", "OUTBOX_BATCH_SIZE": str(BATCH),
                                 "OUTBOX_LANE_INTERVAL": "0.5"})
CONNECTS: list[debezium.Connect] = []  # likewise for Kafka Connect workers (and their replication slots)


# --- scaffolding ------------------------------------------------------------------------


def create_topic(partitions: int = 6) -> str:
    return kafkatools.create_topic(f"bench-{uuid.uuid4().hex[:10]}", partitions)


def drop_topics() -> None:
    """Delete the topics the bench made (its events, and the progress topics of its relays): left behind,
    they piled up (21 GB over 1,800 partitions after a few days of runs), and such a broker spent a third
    of a core at rest and slowed every system measured after it."""
    client = kafkatools.admin()
    names = [name for name in client.list_topics(timeout=30).topics
             if name.startswith(("bench-", "outbox-relay.bench_"))]
    if names:
        for future in client.delete_topics(names, operation_timeout=60).values():
            future.result(90)


def sql(url: str, statement: str, params: Any = None) -> Any:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


def create_database(name: str, template: str | None = None) -> str:
    """A database, or a copy of one; FILE_COPY copies the files instead of writing a 1M-row template into the WAL."""
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""))
    return url_for(name)


def pending(url: str) -> int:
    """Cheap on millions of rows (the unsent table is the backlog), unlike the tests' count per state."""
    return int(sql(url, f"SELECT count(*) FROM {UNSENT} WHERE state = 'pending'")[0][0])


def postmaster_pid(url: str) -> int:
    """The server's postmaster: the parent of any backend (so PostgreSQL's CPU can be read from /proc)."""
    backend = int(sql(url, "SELECT pg_backend_pid()")[0][0])
    return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])


def spread(values: list[float]) -> dict[str, Any]:
    """Median and the range over repeats: the ratios mean something only if the range is narrow."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt_spread(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f}{unit} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def fill(url: str, events: int, size: int, topic: str) -> None:
    sql(url, "CREATE EXTENSION IF NOT EXISTS pgcrypto")
    sql(url, f"INSERT INTO {EVENTS} (topic, key, value, header_names, header_values)"
             " SELECT %s, convert_to('key-' || (i %% 1000), 'UTF8'), gen_random_bytes(%s),"
             " ARRAY['content-type'], ARRAY[convert_to('application/octet-stream', 'UTF8')]"
             " FROM generate_series(1, %s) i", (topic, size, events))
    sql(url, f"VACUUM ANALYZE {EVENTS}")
    sql(url, f"VACUUM ANALYZE {UNSENT}")


class Cost:
    """CPU seconds of PostgreSQL (all its processes, reaped backends included) over a measurement."""

    def __init__(self, url: str) -> None:
        self.postmaster = postmaster_pid(url)
        self.started = tree_cpu_seconds(self.postmaster)

    def postgres_cpu(self) -> float:
        return tree_cpu_seconds(self.postmaster) - self.started


# --- ceilings ---------------------------------------------------------------------------


def kafka_ceiling(events: int, size: int, repeats: int) -> dict[str, Any]:
    """A bare transactional producer, the relay's batch size: one warm-up run, then `repeats` measured runs."""
    topic = create_topic()
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "transactional.id": f"bench-{uuid.uuid4()}",
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"})
    producer.init_transactions(30)
    values = [os.urandom(size) for _ in range(BATCH)]
    headers = [("content-type", b"application/octet-stream"), ("outbox-event-id", str(uuid.uuid4()).encode())]

    def run(count: int) -> float:
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            producer.begin_transaction()
            for i in range(start, min(count, start + BATCH)):
                while True:
                    try:
                        producer.produce(topic, key=f"key-{i % 1000}".encode(), value=values[i % BATCH],
                                         headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.commit_transaction(60)
        return count / (time.perf_counter() - started)

    run(min(events, 100_000))  # warm-up: connections, the JIT of the broker's hot paths, the page cache
    return spread([run(events) for _ in range(repeats)])


def postgres_ceiling(template: str, events: int, repeats: int) -> dict[str, Any]:
    """Select and mark the template's rows batch by batch, with no Kafka in between, on a fresh copy each time:
    the relay's own claim and mark statements, one batch of each lane in turn."""
    rates = []
    store = Store()
    for n in range(repeats):
        name = f"{template}_pg{n}"
        url = create_database(name, template)
        try:
            lanes = int(sql(url, f"SELECT lane_count FROM {SETTINGS}")[0][0])
            with connect(url, lane=True) as conn:
                for _ in range(max(1, events // BATCH // 50 // lanes)):  # warm-up (2%): plans cached, pages in
                    _claim_and_mark(store, conn, lanes)
                total, started = 0, time.perf_counter()
                while count := _claim_and_mark(store, conn, lanes):
                    total += count
                rates.append(total / (time.perf_counter() - started))
        finally:
            drop_database(name)
    return spread(rates)


def _claim_and_mark(store: Store, conn: psycopg.Connection[Any], lanes: int) -> int:
    done = 0
    for lane in range(lanes):
        if rows := store.claim(conn, lane, lanes, BATCH):
            done += store.mark_sent(conn, [row.id for row in rows])
    return done


# --- drain ------------------------------------------------------------------------------


def wait_drained(url: str, topic: str, events: int, relays: list[Any], first: FirstEvent) -> float:
    """Seconds until the relays drained the backlog of `events` into `topic`.

    Progress is read from the topic's offsets, as Debezium's is: counting the unsent rows every 0.2 s would
    cost the PostgreSQL being measured more than the relay's own claims at a million rows. The offsets count
    the transactions' commit markers too, so once they reach the backlog the exact count confirms the end.
    """
    started = time.monotonic()
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4()}"})
    try:
        before = topic_count(consumer, topic, 6)  # the same backlog drained earlier into the same topic
        wait_until(lambda: first.seen(topic_count(consumer, topic, 6) - before) >= events, relays, what="the drain")
    finally:
        consumer.close()
    wait_until(lambda: pending(url) == 0, relays, what="the drain's last events")
    return time.monotonic() - started


def relay_drain(url: str, topic: str, processes: int, events: int) -> dict[str, Any]:
    cost = Cost(url)
    started = time.monotonic()
    relays = [RELAYS.start(url, f"relay-drain-{processes}-{n}", OUTBOX_LISTEN="off") for n in range(processes)]
    first = FirstEvent(started)
    elapsed = wait_drained(url, topic, events, relays, first)
    cpu = sum(cpu_seconds(relay.pid) for relay in relays)
    rss = max(peak_rss_mib(relay.pid) for relay in relays)
    RELAYS.stop_all()
    pg_cpu = cost.postgres_cpu()
    return {"events_per_s": events / elapsed, "seconds": elapsed, "first_event_s": first.at, "cpu_s": cpu,
            "postgres_cpu_s": pg_cpu, "peak_rss_mib": rss, "us_per_event": (cpu + pg_cpu) / events * 1e6}


class FirstEvent:
    """When the first event got through, seconds after the start: a JVM's start-up shows here."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.at: float | None = None

    def seen(self, count: int) -> int:
        if count > 0 and self.at is None:
            self.at = time.monotonic() - self.started
        return count


def topic_count(consumer: Consumer, topic: str, partitions: int) -> int:
    return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))


def start_connect(url: str, name: str, poll_interval_ms: int | None = None) -> debezium.Connect:
    port = int(os.environ.get("OUTBOX_BENCH_CONNECT_PORT") or free_port())
    connect = debezium.Connect(url, RESULTS, name, BOOTSTRAP, port, poll_interval_ms).start()
    CONNECTS.append(connect)
    wait_until(connect.streaming, [connect], poll=0.5, timeout=180, what=f"{connect.name} streaming")
    return connect


def stop_connect(connect: debezium.Connect) -> None:
    connect.stop()
    connect.drop_slot()
    CONNECTS.remove(connect)


def debezium_drain(events: int, size: int) -> dict[str, Any]:
    """The same backlog through Debezium: its slot is created on an empty outbox (snapshot.mode=no_data), Connect
    stops, the backlog is written, and Connect starts again: timed from its start, like the relay's drain."""
    name = f"bench_dbz_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    topic = create_topic()
    try:
        migrate.upgrade(url, lanes=4)
        connect = start_connect(url, name)
        connect.stop()  # the slot stays: it keeps every change from here on for the connector
        print(f"  debezium: writing the backlog of {events:,} events behind its slot ...", flush=True)
        fill(url, events, size, topic)
        consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4()}"})
        cost = Cost(url)
        first = FirstEvent(time.monotonic())
        connect.start()  # still in CONNECTS: stopped (and its slot dropped) whatever happens
        elapsed = wait_until(lambda: first.seen(topic_count(consumer, topic, 6)) >= events, [connect], poll=0.2,
                             what="Debezium's drain")
        cpu, rss = cpu_seconds(connect.pid), peak_rss_mib(connect.pid)
        consumer.close()
        stop_connect(connect)
        pg_cpu = cost.postgres_cpu()
        return {"events_per_s": events / elapsed, "seconds": elapsed, "first_event_s": first.at, "cpu_s": cpu,
                "postgres_cpu_s": pg_cpu, "peak_rss_mib": rss, "us_per_event": (cpu + pg_cpu) / events * 1e6}
    finally:
        for connect in list(CONNECTS):
            stop_connect(connect)
        drop_database(name)


def print_drain_row(label: str, r: dict[str, Any]) -> None:
    print(f"  {label:<22}{r['events_per_s']:>10,.0f} ev/s  {r['seconds']:>6.1f} s (first event at"
          f" {r['first_event_s'] or 0:.1f} s)  CPU {r['cpu_s']:>6.1f} s"
          f" + PostgreSQL {r['postgres_cpu_s']:>6.1f} s ({r['postgres_cpu_s'] / r['events'] * 1e6:.1f} us/ev)"
          f"  peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)


def drain(args: argparse.Namespace) -> dict[str, Any]:
    template = f"bench_drain_{uuid.uuid4().hex[:6]}"
    topic = create_topic()
    print(f"drain: filling {args.events:,} events of {args.size} bytes ...", flush=True)
    url = create_database(template)
    migrate.upgrade(url, lanes=4)
    fill(url, args.events, args.size, topic)
    results: dict[str, Any] = {"events": args.events, "size": args.size, "batch": BATCH, "repeats": args.repeats}
    try:
        results["kafka_ceiling"] = kafka_ceiling(args.events, args.size, args.repeats)
        print(f"  kafka ceiling          {fmt_spread(results['kafka_ceiling'])} ev/s, median (range) of"
              f" {args.repeats}", flush=True)
        results["postgres_ceiling"] = postgres_ceiling(template, args.events, args.repeats)
        print(f"  select-and-mark loop   {fmt_spread(results['postgres_ceiling'])} ev/s", flush=True)
        results["relay"] = {}
        for processes in args.processes:
            name = f"{template}_r{processes}"
            try:
                r = relay_drain(create_database(name, template), topic, processes, args.events)
            finally:
                drop_database(name)
            results["relay"][processes] = {**r, "events": args.events}
            print_drain_row(f"relay x{processes}", results["relay"][processes])
    finally:
        drop_database(template)
    if "peers" in args.only:
        results["debezium"] = {**debezium_drain(args.events, args.size), "events": args.events}
        print_drain_row("Debezium (Connect JVM)", results["debezium"])
    return results


# --- latency ----------------------------------------------------------------------------


def events_per_commit(rate: int) -> int:
    """How many events each writer transaction carries at a rate.

    The writers share the 2 cores with the relay, PostgreSQL and Kafka, and a SQLAlchemy
    transaction costs them ~0.4 ms of CPU: 5,000 single-event commits/s reached ~1,100/s and
    starved everything else; 5 per commit reached ~3,500/s, 20 per commit 4,700-5,000/s.
    """
    return 1 if rate <= SINGLE_EVENT_RATE else MANY_PER_COMMIT


def _writer(url: str, topic: str, rate: float, seconds: float, threads: int, per_commit: int, out: Any) -> None:
    """`threads` writers at rate/threads events/s each, `per_commit` events per transaction, until the
    wall-clock end: a writer that falls behind (a durable commit takes milliseconds) does not catch up
    after the end, so the achieved rate is the real one."""
    engine = create_engine(url, pool_size=threads)
    committed: dict[str, float] = {}
    interval = threads * per_commit / rate
    started = time.monotonic()
    deadline = started + seconds

    def write(offset: float) -> None:
        next_at = started + offset
        while next_at < deadline and time.monotonic() < deadline:
            with engine.begin() as conn:
                event_ids = enqueue_many(conn, [Event(topic, b"x" * 512, key=f"k{(len(committed) + n) % 100}")
                                                for n in range(per_commit)])
            now = time.time()
            committed.update((str(event_id), now) for event_id in event_ids)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    workers = [threading.Thread(target=write, args=(interval * n / threads,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(committed)
    engine.dispose()


def measure_latency(url: str, topic: str, rate: int, seconds: float, watched: Iterable[Watched]) -> dict[str, float]:
    """Writers commit at `rate` for `seconds`; a read_committed consumer notes when each event shows up."""
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

    watched = list(watched)
    reader = threading.Thread(target=consume)
    reader.start()
    try:
        time.sleep(3)  # the relay takes its lanes, the consumer its partitions
        per_commit = events_per_commit(rate)
        commits = rate / per_commit
        writers = max(1, min(4, -(-int(commits) // 500)))
        threads = max(1, -(-int(commits) // writers // 100))  # at most 100 commits/s each: durable commits take ms
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        procs = [context.Process(target=_writer,
                                 args=(url, topic, rate / writers, seconds, threads, per_commit, queue))
                 for _ in range(writers)]
        for proc in procs:
            proc.start()
        committed: dict[str, float] = {}
        for _ in procs:
            committed.update(queue.get())
        for proc in procs:
            proc.join()
        try:
            wait_until(lambda: not set(committed) - set(received), watched, poll=0.1, timeout=30)
        except TimeoutError:
            pass  # reported as missing
    finally:
        stop.set()
        reader.join()
    latencies = sorted((received[e] - t) * 1000 for e, t in committed.items() if e in received)
    if not latencies:  # alive, yet nothing came through (a relay failing every batch): no figure to give
        raise stalled(watched, f"none of {len(committed)} events reached the consumer within 30 s of the last commit")
    return {"rate_asked": rate, "events_per_commit": per_commit, "rate_achieved": len(committed) / seconds,
            "missing": len(committed) - len(latencies),
            "p50_ms": statistics.median(latencies), "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
            "max_ms": latencies[-1]}


def summarize(system: str, rate: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    row = {"system": system, "rate_asked": rate, "runs": runs,
           "p50_ms": spread([r["p50_ms"] for r in runs]), "p99_ms": spread([r["p99_ms"] for r in runs]),
           "missing": sum(int(r["missing"]) for r in runs),
           "rate_achieved": statistics.median(r["rate_achieved"] for r in runs),
           "events_per_commit": events_per_commit(rate)}
    print(f"  {system:<28}{rate:>6}/s ({row['rate_achieved']:>6.0f} achieved, {row['events_per_commit']} per commit)"
          f"  p50 {fmt_spread(row['p50_ms'], ' ms', 1)}  p99 {fmt_spread(row['p99_ms'], ' ms', 1)}"
          f"  missing {row['missing']}", flush=True)
    return row


def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    name = f"bench_latency_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    migrate.upgrade(url, lanes=args.latency_lanes)
    try:
        # Discarded, like Debezium's below: the broker's JIT and PostgreSQL's caches warm up on the
        # first thousands of events (run first on a fresh broker, the relay measured p50 95 ms, not 15).
        relay = RELAYS.start(url, "relay-latency-warm-up", OUTBOX_POLL_INTERVAL="0.5")
        measure_latency(url, create_topic(3), args.rates[0], min(args.seconds, 5.0), [relay])
        relay.stop()
        for rate in args.rates:
            for listen in args.listen:
                runs = []
                for n in range(args.repeats):
                    topic = create_topic(3)
                    relay = RELAYS.start(url, f"relay-latency-{rate}-{listen}-{n}", OUTBOX_LISTEN=listen,
                                         OUTBOX_POLL_INTERVAL="0.5")
                    runs.append(measure_latency(url, topic, rate, args.seconds, [relay]))
                    relay.stop()
                rows.append({**summarize(f"relay, wake-ups {listen}", rate, runs), "listen": listen})
    finally:
        drop_database(name)
    if "peers" in args.only:
        for label, poll_ms in (("default", None), ("tuned", 10)):
            name = f"bench_dbzlat_{uuid.uuid4().hex[:6]}"
            url = create_database(name)
            try:
                migrate.upgrade(url, lanes=args.latency_lanes)
                connect = start_connect(url, name, poll_ms)
                # Discarded: Connect's JVM warms up too.
                measure_latency(url, create_topic(3), args.rates[0], min(args.seconds, 5.0), [connect])
                for rate in args.rates:
                    runs = [measure_latency(url, create_topic(3), rate, args.seconds, [connect])
                            for _ in range(args.repeats)]
                    system = f"Debezium {label}" + (f" (poll {poll_ms} ms)" if poll_ms else "")
                    rows.append({**summarize(system, rate, runs), "debezium": label})
                stop_connect(connect)
            finally:
                for connect in list(CONNECTS):
                    stop_connect(connect)
                drop_database(name)
    return rows


# --- scale and retention ----------------------------------------------------------------


def claim_ms(url: str, lanes: int = 4, runs: int = 30) -> float:
    """Median execution time of the relay's claim (lane 0, batch 1000), from EXPLAIN ANALYZE."""
    query = Store().claim_query(lanes).as_string()
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
                sql(url, f"INSERT INTO {EVENTS} (topic, key, value) SELECT 'history',"
                         " convert_to('key-' || (i %% 1000), 'UTF8'), '\\x00' FROM generate_series(1, %s) i", (sent,))
                sql(url, f"WITH d AS (DELETE FROM {UNSENT} RETURNING id) INSERT INTO {SENT} (first_id, last_id, ids)"
                         " SELECT min(id), max(id), array_agg(id ORDER BY id) FROM d GROUP BY id / 1000")
            sql(url, f"INSERT INTO {EVENTS} (topic, key, value) SELECT 'live',"
                     " convert_to('key-' || (i % 1000), 'UTF8'), '\\x00' FROM generate_series(1, 5000) i")
            for table in (EVENTS, UNSENT, SENT):
                sql(url, f"VACUUM ANALYZE {table}")
            results[f"{label}_claim_ms"] = claim_ms(url)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "outbox_relay", "status", "--json", "--database-url", url],
                           check=True, capture_output=True)
            results[f"{label}_status_s"] = time.perf_counter() - started
        finally:
            drop_database(name)
    results["claim_ratio"] = results["big_claim_ms"] / results["empty_claim_ms"]
    s = results
    print(f"  claim with {s['sent_rows']:,} sent rows: {s['big_claim_ms']:.2f} ms; empty table:"
          f" {s['empty_claim_ms']:.2f} ms; ratio {s['claim_ratio']:.2f}")
    print(f"  `outbox-relay status`: {s['big_status_s']:.2f} s with {s['sent_rows']:,} sent rows,"
          f" {s['empty_status_s']:.2f} s empty", flush=True)
    return results


# The outbox's rows and size: the events, unsent and sent tables together.
TABLE_SIZES = (
    f"SELECT (SELECT count(*) FROM {EVENTS}), (pg_table_size('{EVENTS}') + pg_table_size('{UNSENT}')"
    f" + pg_table_size('{SENT}')) / 1048576.0, (pg_indexes_size('{EVENTS}') + pg_indexes_size('{UNSENT}')"
    f" + pg_indexes_size('{SENT}')) / 1048576.0"
)


def retention(args: argparse.Namespace) -> dict[str, Any]:
    """A relay with 7 days' retention where a day lasts --retention-day-seconds: each day --retention-per-day
    events are written (in 10 bursts), drained and later deleted by the relay's own retention job."""
    day, per_day = args.retention_day_seconds, args.retention_per_day
    name = f"bench_retention_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    days: list[dict[str, Any]] = []
    print(f"retention: {args.retention_days} days of {per_day:,} events, a day lasting {day:.0f} s, 7 days kept",
          flush=True)
    try:
        migrate.upgrade(url, lanes=4)
        sql(url, "CREATE EXTENSION IF NOT EXISTS pgcrypto")
        topic = create_topic()
        relay = RELAYS.start(url, "relay-retention", OUTBOX_LISTEN="off",
                             OUTBOX_RETENTION_HOURS=str(7 * day / 3600), OUTBOX_RETENTION_INTERVAL=str(day / 10))
        for n in range(1, args.retention_days + 1):
            day_started = time.monotonic()
            write_s = 0.0
            for _ in range(10):
                started = time.monotonic()
                sql(url, f"INSERT INTO {EVENTS} (topic, key, value) SELECT %s, convert_to('key-' || (i %% 1000),"
                         " 'UTF8'), gen_random_bytes(%s) FROM generate_series(1, %s) i",
                    (topic, args.size, per_day // 10))
                write_s += time.monotonic() - started
            drained = wait_until(lambda: pending(url) == 0, [relay], what="the day's drain")
            row = {"day": n, "write_rows_per_s": per_day / write_s, "drain_s": drained, "claim_ms": claim_ms(url),
                   **dict(zip(("rows", "table_mib", "indexes_mib"), sql(url, TABLE_SIZES)[0]))}
            days.append(row)
            print(f"  day {n:>2}: {int(row['rows']):>11,} rows, table {float(row['table_mib']):>7,.0f} MiB, indexes"
                  f" {float(row['indexes_mib']):>6,.0f} MiB, claim {row['claim_ms']:.2f} ms,"
                  f" writes {row['write_rows_per_s']:,.0f} rows/s", flush=True)
            day_ends = day_started + day
            wait_until(lambda end=day_ends: time.monotonic() >= end, [relay], poll=0.5)
        relay.stop()
    finally:
        drop_database(name)
    first, last = days[0], days[-1]
    steady = days[min(7, len(days)) - 1]
    return {"per_day": per_day, "day_seconds": day, "days": days,
            "claim_ratio": last["claim_ms"] / first["claim_ms"],
            "size_ratio": float(last["table_mib"]) / float(steady["table_mib"])}


def count_backends(database: str, counts: list[int], relays: list[Watched]) -> None:
    """Sample the database's PostgreSQL backends while the relays run (the query runs in another database)."""
    while any(relay.alive for relay in relays):
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        counts.append(int(sql(BASE_URL, query, (database,))[0][0]))
        time.sleep(0.2)


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Events/s and PostgreSQL backends for 1, 2, 4 lanes x 1, 2, 4 processes (never more processes than lanes)."""
    points = []
    for lanes in (1, 2, 4):
        template = f"bench_scaling_{uuid.uuid4().hex[:6]}"
        url = create_database(template)
        migrate.upgrade(url, lanes=lanes)
        topic = create_topic()
        fill(url, args.events, args.size, topic)
        try:
            for processes in (p for p in (1, 2, 4) if p <= lanes):
                name = f"{template}_{processes}"
                copy = create_database(name, template)
                backends = [0]
                relays = [RELAYS.start(copy, f"relay-scaling-{lanes}-{processes}-{n}", OUTBOX_LISTEN="off")
                          for n in range(processes)]
                watcher = threading.Thread(target=count_backends, args=(name, backends, relays), daemon=True)
                watcher.start()
                try:
                    elapsed = wait_drained(copy, topic, args.events, relays, FirstEvent(time.monotonic()))
                    RELAYS.stop_all()
                    watcher.join()
                finally:
                    drop_database(name)
                point = {"lanes": lanes, "processes": processes, "events_per_s": args.events / elapsed,
                         "postgres_backends": max(backends)}  # the count query itself is in another database
                points.append(point)
                print(f"  {lanes} lanes, {processes} process(es): {point['events_per_s']:>9,.0f} ev/s,"
                      f" {point['postgres_backends']} PostgreSQL backends", flush=True)
        finally:
            drop_database(template)
    return points


# --- report -----------------------------------------------------------------------------


def write_overhead() -> dict[str, Any]:
    output = subprocess.run([sys.executable, str(ROOT / "bench" / "write_overhead.py")], check=True,
                            capture_output=True, text=True).stdout
    print(output, end="", flush=True)
    found = re.search(r"write overhead ratio \(outbox / plain\): ([0-9.]+)", output)
    together = re.search(r"concurrent write overhead .*?: ([0-9.]+)  a lane asleep: ([0-9.]+)", output)
    return {"ratio": float(found.group(1)) if found else float("nan"),
            "concurrent": float(together.group(1)) if together else float("nan"),
            "concurrent_asleep": float(together.group(2)) if together else float("nan")}


def goals(results: dict[str, Any]) -> list[tuple[str, float | None, str, bool | None]]:
    """Issue 14's goals: (what, measured ratio or value, target, met). None: not measured in this run."""
    out: list[tuple[str, float | None, str, bool | None]] = []

    def goal(what: str, value: float | None, target: str, ok: Callable[[float], bool]) -> None:
        out.append((what, value, target, None if value is None else ok(value)))

    d = results.get("drain", {})
    relay1 = d.get("relay", {}).get(1)
    dbz = d.get("debezium")
    kafka = d.get("kafka_ceiling", {}).get("median")
    goal("drain / Kafka ceiling (1 process)", relay1 and kafka and relay1["events_per_s"] / kafka, ">= 0.6",
         lambda v: v >= 0.6)
    goal("drain / Debezium drain (ev/s)", relay1 and dbz and relay1["events_per_s"] / dbz["events_per_s"], ">= 2",
         lambda v: v >= 2)
    goal("PostgreSQL CPU per event / Debezium's", relay1 and dbz and relay1["postgres_cpu_s"] / dbz["postgres_cpu_s"],
         "<= 2", lambda v: v <= 2)
    lat = results.get("latency", [])

    def p99(rate: int, pick: Callable[[dict[str, Any]], bool]) -> float | None:
        values = [r["p99_ms"]["median"] for r in lat if r["rate_asked"] == rate and pick(r)]
        return min(values) if values else None

    for rate, bound in ((1000, 25), (5000, 50)):
        relay = p99(rate, lambda r: r.get("listen") is not None)
        goal(f"latency p99 at {rate}/s (ms, best relay mode)", relay, f"<= {bound}", lambda v, b=bound: v <= b)
        tuned = p99(rate, lambda r: r.get("debezium") == "tuned")
        goal(f"latency p99 at {rate}/s / Debezium tuned", relay and tuned and relay / tuned, "<= 1", lambda v: v <= 1)
    write = results.get("write", {})
    goal("enqueue / plain insert (write overhead)", write.get("ratio"), "<= 1.25", lambda v: v <= 1.25)
    goal("plain / outbox commits/s, 16 writers at once", write.get("concurrent"), "<= 1.25", lambda v: v <= 1.25)
    goal("  the same while a lane sleeps", write.get("concurrent_asleep"), "<= 1.25", lambda v: v <= 1.25)
    rss = [r["peak_rss_mib"] for r in d.get("relay", {}).values()]
    goal("relay peak RSS per process (MiB)", max(rss) if rss else None, "<= 100", lambda v: v <= 100)
    sc = results.get("scale", {})
    claim = f"claim cost, {sc['sent_rows']:,} sent rows / empty" if sc else "claim cost, sent rows / empty"
    goal(claim, sc.get("claim_ratio"), "<= 2", lambda v: v <= 2)
    r = results.get("retention", {})
    goal("retention: claim cost last day / first day", r.get("claim_ratio"), "<= 2", lambda v: v <= 2)
    goal("retention: table size last day / day 7", r.get("size_ratio"), "<= 1.25", lambda v: v <= 1.25)
    return out


def report(results: dict[str, Any]) -> None:
    d = results.get("drain")
    if d:
        print(f"\nDrain of {d['events']:,} events of {d['size']} B, PostgreSQL with fsync, synchronous_commit and"
              " full_page_writes on (medians and ranges over repeats where repeated):")
        print(f"  {'':<28}{'events/s':>12}{'CPU s':>8}{'PG CPU s':>10}{'PG us/ev':>10}{'peak RSS MiB':>14}"
              f"{'1st event s':>13}")
        print(f"  {'Kafka ceiling (bare producer)':<28}{d['kafka_ceiling']['median']:>12,.0f}"
              f"   range {d['kafka_ceiling']['min']:,.0f}-{d['kafka_ceiling']['max']:,.0f}")
        print(f"  {'select-and-mark loop':<28}{d['postgres_ceiling']['median']:>12,.0f}"
              f"   range {d['postgres_ceiling']['min']:,.0f}-{d['postgres_ceiling']['max']:,.0f}")
        rows = [(f"relay x{p}", r) for p, r in d["relay"].items()]
        if "debezium" in d:
            rows.append(("Debezium 3.6.1 (Connect)", d["debezium"]))
        for label, r in rows:
            print(f"  {label:<28}{r['events_per_s']:>12,.0f}{r['cpu_s']:>8.1f}{r['postgres_cpu_s']:>10.1f}"
                  f"{r['postgres_cpu_s'] / d['events'] * 1e6:>10.1f}{r['peak_rss_mib']:>14,.0f}"
                  f"{r['first_event_s'] or 0:>13.1f}")
        if "debezium" in d:
            print("  Debezium also needs wal_level=logical, a replication slot (WAL is retained until it confirms,"
                  " forever if it is gone), a publication and a JVM; it delivers at least once (re-sends after a"
                  " crash). The relay: none of these, exactly once.")
    print(f"\nGoals of issue 14 (from this run{'' if d and d['events'] >= 1_000_000 else ', reduced size'}):")
    for what, value, target, met in goals(results):
        shown = "not measured" if value is None else f"{value:,.2f}"
        verdict = "" if met is None else ("met" if met else "MISSED")
        print(f"  {what:<46}{shown:>14}  target {target:<8} {verdict}")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    left, middle, right = axes
    if "drain" in results:
        d = results["drain"]
        labels = ["Kafka\nceiling", "select+mark\nloop", *[f"relay x{p}" for p in d["relay"]]]
        values = [d["kafka_ceiling"]["median"], d["postgres_ceiling"]["median"],
                  *[r["events_per_s"] for r in d["relay"].values()]]
        errors = [[d["kafka_ceiling"]["median"] - d["kafka_ceiling"]["min"],
                   d["postgres_ceiling"]["median"] - d["postgres_ceiling"]["min"], *[0] * len(d["relay"])],
                  [d["kafka_ceiling"]["max"] - d["kafka_ceiling"]["median"],
                   d["postgres_ceiling"]["max"] - d["postgres_ceiling"]["median"], *[0] * len(d["relay"])]]
        colors = ["#888", "#888", *["#2a7"] * len(d["relay"])]
        if "debezium" in d:
            labels.append("Debezium")
            values.append(d["debezium"]["events_per_s"])
            errors[0].append(0)
            errors[1].append(0)
            colors.append("#c63")
        left.bar(labels, values, yerr=errors, color=colors, capsize=3)
        left.set_title(f"Drain of {d['events']:,} events of {d['size']} B (events/s)", fontsize=10)
        for i, v in enumerate(values):
            left.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        cost = [("relay x1", d["relay"][min(d["relay"])])] + ([("Debezium", d["debezium"])] if "debezium" in d else [])
        xs = range(len(cost))
        own = [r["cpu_s"] / d["events"] * 1e6 for _, r in cost]
        pg = [r["postgres_cpu_s"] / d["events"] * 1e6 for _, r in cost]
        middle.bar(xs, own, color="#2a7", label="relay / Connect JVM")
        middle.bar(xs, pg, bottom=own, color="#57b", label="PostgreSQL")
        middle.set_xticks(list(xs), [f"{label}\nRSS {r['peak_rss_mib']:,.0f} MiB" for label, r in cost])
        middle.set_title("CPU per event drained (us)", fontsize=10)
        middle.legend(fontsize=8)
    if "latency" in results:
        rows = results["latency"]
        rates = sorted({r["rate_asked"] for r in rows})
        systems = list(dict.fromkeys(r["system"] for r in rows))
        width = 0.8 / len(systems)
        for k, system in enumerate(systems):
            xs_, p99, lo, hi = [], [], [], []
            for i, rate in enumerate(rates):
                row = next((r for r in rows if r["rate_asked"] == rate and r["system"] == system), None)
                if row:
                    xs_.append(i - 0.4 + width * (k + 0.5))
                    p99.append(row["p99_ms"]["median"])
                    lo.append(row["p99_ms"]["median"] - row["p99_ms"]["min"])
                    hi.append(row["p99_ms"]["max"] - row["p99_ms"]["median"])
            right.bar(xs_, p99, width=width, yerr=[lo, hi], capsize=2, label=system)
        right.set_yscale("log")
        right.set_xticks(range(len(rates)), [f"{rate}/s" for rate in rates])
        right.set_title("Commit to consumer, p99 (ms, log scale; bars: range over repeats)", fontsize=10)
        right.legend(fontsize=7)
    fig.suptitle("outbox-relay vs Debezium, PostgreSQL with production durability (make bench)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(args: argparse.Namespace, results: dict[str, Any]) -> None:
    drop_topics()  # a broker that starts each part as it would on a fresh machine
    if "drain" in args.only:
        results["drain"] = drain(args)
        drop_topics()
    if "latency" in args.only:
        print("latency: writer commit -> visible to a read_committed consumer (median and range over"
              f" {args.repeats} runs)", flush=True)
        results["latency"] = latency(args)
        drop_topics()
    if "scale" in args.only:
        results["scale"] = scale(args)
    if "retention" in args.only:
        results["retention"] = retention(args)
    if "write" in args.only:
        print("write overhead:", flush=True)
        results["write"] = write_overhead()
    if "scaling" in args.only:
        print(f"scaling: {args.events:,} events drained by n processes over m lanes", flush=True)
        results["scaling"] = scaling(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--listen", nargs="+", choices=["on", "off"], default=["on", "off"],
                        help="the relay's wake-up modes in the latency runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each latency run")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each ceiling and latency point")
    parser.add_argument("--latency-lanes", type=int, default=1, help="lanes in the latency runs")
    parser.add_argument("--scale-rows", type=int, default=10_000_000)
    parser.add_argument("--retention-per-day", type=int, default=1_000_000,
                        help="events a simulated day (the issue's volume is 10000000: ~1 hour per day here)")
    parser.add_argument("--retention-days", type=int, default=9, help="simulated days (7 are retained)")
    parser.add_argument("--retention-day-seconds", type=float, default=120.0, help="how long a simulated day lasts")
    parser.add_argument("--only", nargs="+", choices=["drain", "peers", "latency", "scale", "retention", "write",
                                                      "scaling"],
                        default=["drain", "peers", "latency", "scale", "retention", "write"],
                        help="parts to run; peers adds Debezium to drain and latency; scaling runs only when named")
    parser.add_argument("--scaling", action="store_true", help="same as --only scaling")
    args = parser.parse_args()
    if args.scaling:
        args.only = ["scaling"]
    if not BASE_URL or not BOOTSTRAP:
        print("set OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (make bench does)", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.events < BATCH:
        print(f"--repeats must be at least 1 and --events at least {BATCH}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    settings = {name: sql(BASE_URL, f"SHOW {name}")[0][0]
                for name in ("fsync", "synchronous_commit", "full_page_writes", "wal_level")}
    print("PostgreSQL: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    if "peers" in args.only and settings["wal_level"] != "logical":
        print("the Debezium runs need wal_level=logical: run `make bench` (its own PostgreSQL has it)"
              " or leave out peers (--only ...)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"postgres": settings}
    try:
        measure(args, results)
    except (MeasurementFailed, debezium.DebeziumError) as exc:  # a dead or stalled relay or Connect: its log, stop
        print(f"\nbench stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        for connect in list(CONNECTS):
            stop_connect(connect)
        RELAYS.stop_all()
        drop_topics()
    if args.only == ["scaling"]:  # its own file: a scaling run leaves the last full run's results alone
        (RESULTS / "scaling.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {RESULTS / 'scaling.json'}")
        return 0
    report(results)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    chart(results, RESULTS / "bench.png")
    print(f"\nwrote {RESULTS / 'bench.json'} and {RESULTS / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
