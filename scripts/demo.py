#!/usr/bin/env python3
"""`make demo`: the relay moving real events from PostgreSQL to Kafka, and a consumer applying them once.

Migrates the database, starts `outbox-relay run`, writes orders in real transactions (some roll
back), and shows the committed ones arriving in Kafka through a read_committed consumer. Then the
consumer side: an inbox in a database of its own applies each order to a per-customer total, exactly
once, and skips every event of an `outbox-relay replay`.
Expects OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (`make demo` sets them).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox_relay import Inbox, InboxEvent, enqueue

TOPIC = "demo.orders"
ORDERS = 20
ROOT = Path(__file__).resolve().parent.parent


def ensure_topic(bootstrap: str) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if TOPIC not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])[TOPIC].result(30)
    return len(admin.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions)


def consumer_from_now(bootstrap: str, partitions: int) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "outbox-demo",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    ends = [consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in range(partitions)]
    consumer.assign([TopicPartition(TOPIC, p, end) for p, end in enumerate(ends)])
    return consumer


def main() -> int:
    url = os.environ["OUTBOX_DATABASE_URL"]
    bootstrap = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    cli = [sys.executable, "-m", "outbox_relay"]
    migrated = subprocess.run([*cli, "migrate"], check=False)
    if migrated.returncode:
        print(f"\n== migrate failed (exit {migrated.returncode}); see its message above")
        return migrated.returncode
    partitions = ensure_topic(bootstrap)
    consumer = consumer_from_now(bootstrap, partitions)

    log_path = Path(os.environ.get("OUTBOX_SERVICES_DIR", ROOT / ".services")) / "demo-relay.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== starting the relay (log: {log_path})")
    with open(log_path, "wb") as log_file:
        relay = subprocess.Popen([*cli, "run", "--poll-interval", "0.2"], stdout=log_file, stderr=log_file)

    def relay_died() -> bool:
        """The relay exited: say so at once with its last log lines, rather than wait for events."""
        if relay.poll() is None:
            return False
        lines = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"\n== the relay exited with code {relay.returncode}; its last log lines ({log_path}):")
        print("\n".join(f"   {line}" for line in lines) or "   (empty)")
        return True

    try:
        time.sleep(1)  # a configuration the relay rejects stops it within a second
        if relay_died():
            return 1
        started = dt.datetime.now(dt.UTC)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS demo_orders (id bigserial PRIMARY KEY, customer text)"))
        print(f"== writing {ORDERS} orders, each with its event, in one transaction per order")
        committed: set[str] = set()
        rolled_back: set[str] = set()
        for n in range(ORDERS):
            customer = random.choice(["ada", "grace", "linus", "barbara"])
            with engine.connect() as conn, conn.begin() as transaction:
                order_id = conn.execute(text("INSERT INTO demo_orders (customer) VALUES (:c) RETURNING id"),
                                        {"c": customer}).scalar_one()
                event_id = str(enqueue(conn, TOPIC, {"order": order_id, "customer": customer}, key=customer))
                if n % 5 == 4:
                    transaction.rollback()  # the business change failed: its event must never appear
                    rolled_back.add(event_id)
                    print(f"   order {order_id:>4} for {customer:<8} ROLLED BACK")
                    continue
            committed.add(event_id)
            print(f"   order {order_id:>4} for {customer:<8} committed   event {event_id}")
            if relay_died():
                return 1

        print(f"== reading {TOPIC} (read_committed) until all {len(committed)} committed events arrived")
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while seen != committed and time.monotonic() < deadline:
            if relay_died():
                return 1
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            event_id = dict(message.headers() or [])["outbox-event-id"].decode()
            seen.add(event_id)
            print(f"   partition {message.partition()} offset {message.offset():>5} key {message.key().decode():<8}"
                  f" {message.value().decode()}")
        consumer.close()
        missing, leaked = committed - seen, seen & rolled_back
        print(f"\n== {len(seen & committed)}/{len(committed)} committed events arrived; "
              f"{len(leaked)} of {len(rolled_back)} rolled-back events leaked; {len(missing)} missing")
        subprocess.run([*cli, "status"], check=False)
        if missing or leaked:
            return 1
        return consume_exactly_once(url, bootstrap, committed, cli, started)
    finally:
        if relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)


def consume_exactly_once(url: str, bootstrap: str, committed: set[str], cli: list[str], since: dt.datetime) -> int:
    """The consumer side: an inbox in the consumer's own database applies each order once, replays skipped."""
    base = make_url(url)
    consumer_url = base.set(database=f"{base.database}_consumer").render_as_string(hide_password=False)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"),
                            {"d": f"{base.database}_consumer"}).scalar():
            conn.execute(text(f'CREATE DATABASE "{base.database}_consumer"'))
    admin.dispose()
    print(f"\n== the consumer side: an inbox in its own database ({make_url(consumer_url).database})")
    subprocess.run([*cli, "inbox", "migrate", "--database-url", consumer_url], check=True)
    engine = create_engine(consumer_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS demo_applied (event_id uuid, customer text, replay boolean)"))
        conn.execute(text("CREATE TABLE IF NOT EXISTS demo_totals (customer text PRIMARY KEY, orders integer)"))

    applied: list[str] = []

    def apply(event: InboxEvent, session: Session) -> None:
        """Runs in the inbox's transaction: the order counts once, whatever crashes or replays come."""
        customer = event.value["customer"]
        session.execute(text("INSERT INTO demo_totals VALUES (:c, 1) ON CONFLICT (customer) DO UPDATE"
                             " SET orders = demo_totals.orders + 1"), {"c": customer})
        session.execute(text("INSERT INTO demo_applied VALUES (:e, :c, :r)"),
                        {"e": event.event_id, "c": customer, "r": event.replay_of is not None})
        applied.append(str(event.event_id))
        print(f"   applied order {event.value['order']:>4} for {customer:<8} (partition {event.partition},"
              f" offset {event.offset})")

    inbox = Inbox(apply, database_url=consumer_url, bootstrap_servers=bootstrap, group="outbox-demo-inbox",
                  topics=[TOPIC], poll_interval=0.2)
    thread = threading.Thread(target=inbox.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not committed <= set(applied) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"== replaying this run's events (outbox-relay replay --topic {TOPIC}): the inbox must skip them all")
    subprocess.run([*cli, "replay", "--topic", TOPIC, "--since", since.isoformat()], check=True)
    deadline = time.monotonic() + 30
    duplicates = 0.0
    while duplicates < len(committed) and time.monotonic() < deadline:
        time.sleep(0.2)
        duplicates = inbox.metrics.duplicates.labels(topic=TOPIC)._value.get()
    inbox.stop()
    thread.join(30)
    mine = [event_id for event_id in applied if event_id in committed]
    print(f"\n== inbox: {len(set(mine))}/{len(committed)} committed orders applied, {len(mine) - len(set(mine))}"
          f" applied twice, {duplicates:.0f} replayed events skipped as duplicates")
    subprocess.run([*cli, "inbox", "status", "--database-url", consumer_url], check=False)
    engine.dispose()
    return 0 if set(mine) == committed and len(mine) == len(committed) and duplicates >= len(committed) else 1


if __name__ == "__main__":
    sys.exit(main())
