"""Kafka's health as the relay sees it: one small admin client asks the cluster for metadata.

It tells the lanes whether to start producers (an unreachable cluster is said once, here, not by every
lane after its producer's timeouts) and whether the partitions every transaction writes are below
min.insync.replicas (the brokers answer, yet acknowledge nothing).
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from outbox_relay import progress
from outbox_relay.config import Settings
from outbox_relay.metrics import Metrics
from outbox_relay.progress import LibrdkafkaLogger

log = logging.getLogger(__name__)


# How often the broker is asked for metadata, how long it has to answer, and how many answers may be
# missing in a row: Kafka going away is noticed (readiness, metrics, one log line) within about
# PROBE_FAILURES x (PROBE_INTERVAL + PROBE_TIMEOUT) seconds, 14 at most, usually less.
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 5.0
PROBE_FAILURES = 2  # failed probes in a row that make Kafka count as unreachable
TRANSACTION_LOG = "__transaction_state"


def java_string_hash(text: str) -> int:
    """Java's String.hashCode (UTF-16 code units, 32-bit overflow): Kafka places a transactional.id with it."""
    h = 0
    data = text.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i:i + 2], "big")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def transaction_log_partition(transactional_id: str, partitions: int) -> int:
    """The __transaction_state partition whose leader coordinates this transactional.id (Kafka's partitionFor)."""
    h = java_string_hash(transactional_id)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


class BrokerProbe:
    """Whether the Kafka cluster answers, asked by one small client for the whole relay.

    Lanes do not start producers while it does not, so an unreachable broker is reported once,
    by this probe, in seconds, instead of by every lane after its producer's timeouts.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._logger = LibrdkafkaLogger(quiet=True)
        self._config: dict[str, Any] = {**progress.client_config(settings.producer_config()), "logger": self._logger}
        self._admin: AdminClient | None = None  # made at the first probe, after the configuration check
        self._bootstrap = settings.kafka_properties.get("bootstrap.servers", "")
        self._gauge = metrics.broker_up
        self._below_min_isr_gauge = metrics.below_min_isr
        self.up = True  # until the probes say otherwise: a fresh start tries at once
        self.problem = ""
        self._failures = 0
        self.progress_topic = ""  # set once the relay knows its outbox's names
        self.replicas_problem = ""  # the cause, while partitions the lanes write are below min.insync.replicas
        self._short: set[tuple[str, int]] = set()  # those partitions
        self._log_partitions = 0  # how many partitions the transaction log has
        self._min_isr: dict[str, int] = {}

    def probe(self) -> None:
        if self._admin is None:
            self._admin = AdminClient(self._config)
        try:
            metadata = self._admin.list_topics(timeout=PROBE_TIMEOUT)
        except KafkaException as exc:
            self._admin.poll(0)  # delivers librdkafka's log lines, which name the cause
            cause = self._logger.last_complaint or exc.args[0].str()
            self._failures += 1
            # Two in a row: one slow answer on a busy machine is not an outage worth a flapping /readyz.
            if self._failures == PROBE_FAILURES:
                log.warning("Kafka unreachable at %s: %s; lanes wait for it", self._bootstrap, cause,
                            extra={"action": "kafka_down"})
                self.up, self.problem = False, f"Kafka unreachable at {self._bootstrap}: {cause}"
        else:
            if not self.up:
                log.info("Kafka reachable again at %s", self._bootstrap, extra={"action": "kafka_up"})
            self.up, self.problem, self._failures = True, "", 0
            self._check_replicas(metadata.topics)
        self._logger.last_complaint = ""
        self._gauge.set(int(self.up))

    def blocks(self, lane: int, transactional_id: str) -> bool:
        """Whether this lane's transactions cannot commit now: a partition each of them writes is below min ISR."""
        if not self._short:
            return False
        return (self.progress_topic, lane) in self._short or (
            self._log_partitions > 0
            and (TRANSACTION_LOG, transaction_log_partition(transactional_id, self._log_partitions)) in self._short)

    def _check_replicas(self, topics: dict[str, Any]) -> None:
        """Below min.insync.replicas the brokers answer, yet acknowledge nothing: say so once, with the numbers.

        Every transaction writes its lane's progress partition and its coordinator's transaction log
        partition; either below min ISR stops the lane whatever events it carries.
        """
        short: list[tuple[str, int, int, int]] = []
        if TRANSACTION_LOG in topics:
            self._log_partitions = len(topics[TRANSACTION_LOG].partitions)
        for name in (TRANSACTION_LOG, self.progress_topic):
            topic = topics.get(name) if name else None
            if topic is None:
                continue
            lagging = [p for p in topic.partitions.values() if len(p.isrs) < len(p.replicas)]
            if lagging and (need := self._required_isr(name)):
                short += [(name, p.id, len(p.isrs), need) for p in sorted(lagging, key=lambda p: p.id)
                          if len(p.isrs) < need]
        self._short = {(name, partition) for name, partition, _, _ in short}
        self._below_min_isr_gauge.set(len(short))
        if short and not self.replicas_problem:
            name, partition, isr, need = short[0]
            self.replicas_problem = (
                f"Kafka below min.insync.replicas: {len(short)} partitions every transaction writes have too few"
                f" in-sync replicas ({name}-{partition}: {isr} of the {need} required); lanes wait for brokers"
                " to return")
            log.warning("%s", self.replicas_problem, extra={"action": "kafka_below_min_isr"})
        elif not short and self.replicas_problem:
            self.replicas_problem = ""
            log.info("Kafka in-sync replicas back to min.insync.replicas: lanes publish again",
                     extra={"action": "kafka_min_isr_restored"})

    def _required_isr(self, topic: str) -> int:
        """The topic's min.insync.replicas (asked once; 0 when the cluster will not say)."""
        if topic not in self._min_isr:
            assert self._admin is not None
            resource = ConfigResource("topic", topic)
            try:
                configs = self._admin.describe_configs([resource], request_timeout=PROBE_TIMEOUT)[resource].result()
            except KafkaException:
                return 0  # asked again at the next probe
            self._min_isr[topic] = int(configs["min.insync.replicas"].value)
        return self._min_isr[topic]
