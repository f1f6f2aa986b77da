#!/usr/bin/env python3
"""What does the inbox cost a consumer? Events applied per second through `Inbox` (id recorded, offset
stored, effects, one transaction per batch) versus a bare consumer that applies the same effects in one
transaction per batch and then commits its offsets to Kafka (at least once), side by side in one run on
the same topic, in alternating rounds so machine noise hits both alike.

    python bench/inbox_bench.py [--events 50000] [--batch 100] [--rounds 3]
Needs OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (`eval "$(scripts/services env)"`); uses a
scratch database it drops after, and a topic of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox_relay import Inbox, InboxEvent
from outbox_relay.inbox import decode_value
from outbox_relay.migrate import upgrade_inbox

EFFECT = text("INSERT INTO bench_effects (event_id, key, amount) VALUES (:event_id, :key, :amount)")


def produce(bootstrap: str, topic: str, events: int) -> None:
    """Events as the relay publishes them: JSON values, an outbox-event-id header, 4 partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20})
    for n in range(events):
        producer.produce(topic, json.dumps({"n": n, "amount": n % 97, "note": "x" * 400}).encode(),
                         key=f"account-{n % 500}".encode(),
                         headers=[("outbox-event-id", str(uuid.uuid4()).encode()),
                                  ("content-type", b"application/json")])
        if n % 10000 == 0:
            producer.flush()
    producer.flush()


class Clock:
    """From the first event applied to the last: group joins and start-up are not the consumer's rate."""

    def __init__(self, expected: int) -> None:
        self.expected, self.count, self.first, self.last = expected, 0, 0.0, 0.0
        self.done = threading.Event()

    def tick(self, n: int = 1) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.count += n
        self.last = now
        if self.count >= self.expected:
            self.done.set()

    @property
    def rate(self) -> float:
        return self.count / max(self.last - self.first, 1e-9)


def apply_effect(session: Session | Connection, event_id: Any, key: bytes | None, value: Any) -> None:
    session.execute(EFFECT, {"event_id": event_id, "key": key, "amount": value["amount"]})


def run_inbox(url: str, bootstrap: str, topic: str, events: int, batch: int) -> float:
    clock = Clock(events)

    def handler(event: InboxEvent, session: Session) -> None:
        apply_effect(session, event.event_id, event.key, event.value)
        clock.tick()

    inbox = Inbox(handler, database_url=url, bootstrap_servers=bootstrap, group=f"inbox-{uuid.uuid4().hex[:8]}",
                  topics=[topic], batch_size=batch, retention_hours=0, poll_interval=0.2)
    watcher = threading.Thread(target=lambda: (clock.done.wait(600), inbox.stop()), daemon=True)
    watcher.start()
    inbox.run(install_signals=False)
    return clock.rate


def run_bare(url: str, bootstrap: str, topic: str, events: int, batch: int) -> float:
    """The usual at-least-once consumer: apply a batch in one transaction, then commit offsets to Kafka."""
    clock = Clock(events)
    engine = create_engine(url)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed", "partition.assignment.strategy": "cooperative-sticky"})
    consumer.subscribe([topic])
    try:
        while not clock.done.is_set():
            messages = [m for m in consumer.consume(batch, 0.2) if not m.error()]
            if not messages:
                continue
            with Session(engine) as session, session.begin():
                for m in messages:
                    headers = dict(m.headers() or [])
                    value = decode_value(m.value(), headers.get("content-type", b"").decode())
                    apply_effect(session, uuid.UUID(headers["outbox-event-id"].decode()), m.key(), value)
            consumer.commit(asynchronous=True)
            clock.tick(len(messages))
    finally:
        consumer.close()
        engine.dispose()
    return clock.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50000, help="events on the topic (each round reads all)")
    parser.add_argument("--batch", type=int, default=100, help="events per database transaction, both consumers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    bootstrap = os.environ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    base = make_url(os.environ["OUTBOX_DATABASE_URL"])
    scratch = f"bench_inbox_{uuid.uuid4().hex[:8]}"
    topic = f"bench-inbox-{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{scratch}"'))
    url = base.set(database=scratch).render_as_string(hide_password=False)
    try:
        upgrade_inbox(url)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bench_effects (event_id uuid, key bytea, amount integer)"))
        produce(bootstrap, topic, args.events)
        rates: dict[str, list[float]] = {"inbox": [], "bare": []}
        for round_ in range(args.rounds):
            for name, run in (("bare", run_bare), ("inbox", run_inbox)):
                with engine.begin() as conn:
                    conn.execute(text("TRUNCATE bench_effects"))
                rates[name].append(run(url, bootstrap, topic, args.events, args.batch))
                print(f"round {round_ + 1}: {name:<5} {rates[name][-1]:>9,.0f} events/s", flush=True)
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
        admin.dispose()
        AdminClient({"bootstrap.servers": bootstrap}).delete_topics([topic])
    inbox, bare = statistics.median(rates["inbox"]), statistics.median(rates["bare"])
    print(f"\n| consumer ({args.events:,} events, batch {args.batch}, median of {args.rounds}) | events/s applied |")
    print("|---|---:|")
    print(f"| bare consumer: effects, then Kafka offset commit (at least once) | {bare:,.0f} |")
    print(f"| inbox: effects + processed id + stored offset in one transaction (exactly once) | {inbox:,.0f} |")
    print(f"| inbox / bare | **{inbox / bare:.2f}** |")
    pairs = ", ".join(f"{i / b:.2f}" for i, b in zip(rates["inbox"], rates["bare"]))
    print(f"\ninbox / bare per round: {pairs} (rounds that differ widely mean a busy machine: run again)")


if __name__ == "__main__":
    main()
