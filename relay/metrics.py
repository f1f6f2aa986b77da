"""Prometheus metrics: an observer with a private registry, unit-suffixed names, small label sets.

Backlog gauges are refreshed by a scheduled job (``observe_backlog``), never by a scrape, so
Prometheus polling cannot load the database.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from outbox_relay.monitor import Snapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
HISTORY_SECONDS = 3600


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pending = Gauge("outbox_pending_events", "Unsent events (pending), per topic", ["topic"], registry=r)
        self.claimable = Gauge("outbox_claimable_events", "Pending events publishable now", ["topic"], registry=r)
        self.held = Gauge("outbox_held_events", "Pending events waiting behind a failed event of their key",
                          ["topic"], registry=r)
        self.oldest_age = Gauge("outbox_oldest_claimable_age_seconds",
                                "Age of the oldest event the relay could publish now (0 when none)", registry=r)
        self.failed = Gauge("outbox_failed_events", "Events parked as failed, per topic", ["topic"], registry=r)
        self.published = Counter("outbox_published_events_total", "Events published (Kafka committed)", ["lane"],
                                 registry=r)
        self.failures = Counter("outbox_publish_failures_total", "Failed publish attempts by reason", ["reason"],
                                registry=r)
        self.latency = Histogram("outbox_commit_to_ack_seconds",
                                 "From the event's row creation to the Kafka commit that carried it",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("outbox_batch_size_events", "Events per Kafka transaction",
                                    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000), registry=r)
        self.transaction = Histogram("outbox_transaction_duration_seconds", "Kafka transaction, begin to commit",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.lane_owned = Gauge("outbox_lane_owned", "1 when this instance owns the lane", ["lane"], registry=r)
        self.lanes = Gauge("outbox_lanes", "The outbox's lane count (outbox-relay lanes set): each wants an owner",
                           registry=r)
        self.broker_up = Gauge("outbox_kafka_up", "1 while the Kafka cluster answers the relay's probe",
                               registry=r)
        self.database_up = Gauge("outbox_database_up", "1 while PostgreSQL answers the relay's lane management",
                                 registry=r)
        self.below_min_isr = Gauge(
            "outbox_kafka_partitions_below_min_isr",
            "Partitions every transaction of a lane writes (its progress partition, its transaction log partition)"
            " with fewer in-sync replicas than min.insync.replicas: those lanes can publish nothing", registry=r)
        self.breaker_open = Gauge("outbox_circuit_open", "1 while the circuit breaker to a system is open",
                                  ["system", "lane"], registry=r)
        self.retention_deleted = Counter("outbox_retention_deleted_events_total",
                                         "Sent and discarded events removed by retention", registry=r)
        self.backlog_refreshed = Gauge("outbox_backlog_refreshed_timestamp_seconds",
                                       "When the backlog gauges were last computed", registry=r)
        # (unix time, pending, published total): the status page's chart of the last hour.
        self.history: deque[tuple[float, int, float]] = deque(maxlen=HISTORY_SECONDS // 2)
        self.last_snapshot: Snapshot | None = None
        self.measured_at: float | None = None  # unix time of last_snapshot's counts
        self._topics: set[str] = set()

    def observe_published(self, lane: int, created_at: Iterable[float], started: float, committed: float) -> None:
        ages = [committed - created for created in created_at]
        self.published.labels(lane=str(lane)).inc(len(ages))
        self.batch_size.observe(len(ages))
        self.transaction.observe(committed - started)
        for age in ages:
            self.latency.observe(max(age, 0.0))

    def observe_backlog(self, snap: Snapshot) -> None:
        for topic in self._topics - set(snap.topics):
            for gauge in (self.pending, self.claimable, self.held, self.failed):
                gauge.remove(topic)
        for topic, b in snap.topics.items():
            self.pending.labels(topic=topic).set(b.pending)
            self.claimable.labels(topic=topic).set(b.claimable)
            self.held.labels(topic=topic).set(b.held)
            self.failed.labels(topic=topic).set(b.failed)
        self._topics = set(snap.topics)
        self.oldest_age.set(snap.total.oldest_claimable_age_s or 0)
        now = time.time()
        self.backlog_refreshed.set(now)
        self.history.append((now, snap.total.pending, self.published_total()))
        self.last_snapshot = snap
        self.measured_at = now

    def observe_oldest(self, age: float | None) -> None:
        """The oldest claimable age measured alone, between two backlog measurements that wait their turn:
        the gauge the paging alert reads, and the status page's total, stay live; and once nothing is
        claimable, the claimable counts say so (OutboxRelayNotPublishing must not page for a drained backlog)."""
        self.oldest_age.set(age or 0)
        if self.last_snapshot is not None:
            self.last_snapshot.total.oldest_claimable_age_s = age
        if age is None:  # no claimable event at all: every topic's claimable count is 0, whatever it was
            for topic in self._topics:
                self.claimable.labels(topic=topic).set(0)
            if self.last_snapshot is not None:
                for backlog in (self.last_snapshot.total, *self.last_snapshot.topics.values(),
                                *self.last_snapshot.lanes.values()):
                    backlog.claimable = 0

    def published_total(self) -> float:
        return sum(sample.value for metric in self.published.collect() for sample in metric.samples
                   if sample.name.endswith("_total"))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
