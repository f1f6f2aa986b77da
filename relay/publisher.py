"""The relay's only door to Kafka: one transactional producer per lane.

``publish(rows)`` puts a batch into one Kafka transaction and returns only once the transaction
committed, or raises one of the outcomes below, following librdkafka's transactional error
classes (retriable: retry the call; abortable: abort and retry the batch; fatal: new producer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from outbox_relay import faults, progress
from outbox_relay.config import KafkaNames, Settings
from outbox_relay.db.lanes import Row
from outbox_relay.errors import BrokerUnavailable, ConfigurationError, OutboxError

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "outbox-event-id"
# A Kafka call that may block is made in slices this long, so a stop request is noticed in time.
_CALL_SLICE = 1.0

# Errors that say "this message can never be published as it is": park the event at once.
PERMANENT_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
})
# Errors that blame the message but may heal (a topic or partition created later, an ACL that has
# not propagated yet): retry, then park.
EVENT_CODES = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
})
# What the other messages of an aborted batch report; never the culprit.
_COLLATERAL_CODES = frozenset({
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._STATE,
    KafkaError._FENCED,
})


class PoisonEvent(OutboxError):
    """One event of the batch was rejected; the batch was aborted and nothing of it is visible."""

    def __init__(self, row: Row, error: KafkaError, *, ambiguous: bool = False, reserved: bool = False) -> None:
        self.row = row
        self.error = error
        self.permanent = reserved or error.code() in PERMANENT_CODES
        # Several messages failed together (the broker rejects a whole record batch at once), so the
        # first of them is only a suspect: publish one by one to find the real culprit.
        self.ambiguous = ambiguous
        super().__init__(f"event {row.event_id} (id {row.id}, topic {row.topic!r}) rejected: {describe(error)}")


class TransactionAborted(BrokerUnavailable):
    """The Kafka transaction was aborted for a reason that is not one event's fault; retry the batch later."""


class ProducerFailed(BrokerUnavailable):
    """The producer hit a fatal error (fenced by a newer owner, or broken); it must be replaced."""

    def __init__(self, message: str, fenced: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced


# librdkafka names a rejected value by its own name for the property, not by the alias that was set.
_LIBRDKAFKA_NAMES = {"compression.type": "compression.codec", "linger.ms": "queue.buffering.max.ms",
                     "acks": "request.required.acks", "retries": "message.send.max.retries",
                     "delivery.timeout.ms": "message.timeout.ms", "bootstrap.servers": "metadata.broker.list",
                     "max.in.flight": "max.in.flight.requests.per.connection", "sasl.mechanism": "sasl.mechanisms"}


def validate_config(config: dict[str, Any], transactional_id: str, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigurationError naming what librdkafka rejects in the producer configuration, and
    where the property was set when ``sources`` says (property -> variable, file line or flag)."""
    try:
        Producer({**config, "transactional.id": transactional_id, "logger": progress.LibrdkafkaLogger(quiet=True)})
    except KafkaException as exc:
        raise ConfigurationError(f"invalid Kafka configuration: {with_source(exc.args[0].str(), sources)}") from None


def with_source(message: str, sources: Mapping[str, str] | None) -> str:
    """librdkafka's complaint about a property, and where that property was set (variable, file line, flag)."""
    where = [source for prop, source in (sources or {}).items()
             if f'"{prop}"' in message or f'"{_LIBRDKAFKA_NAMES.get(prop)}"' in message]
    return f"{message} (from {', '.join(where)})" if where else message


def describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


class LanePublisher:
    """A transactional, idempotent producer bound to one lane's transactional.id.

    Each transaction carries the events and the lane's progress record (which ids it carried).
    Once ``stopping`` is set, calls that wait on the broker give up within about a second: the
    lane then ends unmarked, which recovery settles, rather than hold up a shutdown.
    """

    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str,
        *,
        scope: progress.Scope,
        progress_topic: str,
        operation_timeout: float = 30.0,
        logger: Any = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.transactional_id = transactional_id
        self.scope = scope
        self.progress_topic = progress_topic
        self.operation_timeout = operation_timeout
        self._config = config
        self._stopping = stopping or threading.Event()
        self._in_transaction = False
        conf = {**config, "transactional.id": transactional_id}
        if logger is not None:
            conf["logger"] = logger
        self._producer = Producer(conf)

    @classmethod
    def for_lane(cls, settings: Settings, names: KafkaNames, scope: progress.Scope, *, logger: Any = None,
                 stopping: threading.Event | None = None) -> LanePublisher:
        """The publisher of one lane of this outbox, as the settings configure it."""
        return cls.under(settings, names.transactional_id(scope.lane), names.progress_topic, scope, logger=logger,
                         stopping=stopping)

    @classmethod
    def under(cls, settings: Settings, transactional_id: str, progress_topic: str, scope: progress.Scope, *,
              logger: Any = None, stopping: threading.Event | None = None) -> LanePublisher:
        """The publisher of one lane under the given names (a last owner's, recorded in its lane)."""
        return cls(settings.producer_config(), transactional_id, scope=scope, progress_topic=progress_topic,
                   operation_timeout=settings.kafka_timeout, logger=logger, stopping=stopping)

    def start(self, *, create_topic: bool = True) -> None:
        """Take over the lane in Kafka: fence any older producer of this transactional.id.

        ``init_transactions`` also settles the old producer's open transaction, so the progress
        read afterwards (``committed_records``) is final. The caller recovers from it before
        publishing anything new.
        """
        try:
            self._retrying(self._producer.init_transactions)
        except KafkaException as exc:
            raise _fatal(exc.args[0], "init_transactions") from exc
        progress.ensure_topic(self._config, self.progress_topic, self.scope.lane_count, self.operation_timeout,
                              create=create_topic)

    def committed_records(self) -> Iterator[tuple[int, bytes | None]]:
        """The lane's committed progress records, newest first (read lazily)."""
        return progress.read_back(self._config, self.progress_topic, self.scope.lane,
                                  timeout=self.operation_timeout, stopping=self._stopping)

    def close(self) -> None:
        """Abort an open transaction (read_committed consumers would wait for its timeout), drop the producer."""
        try:
            if self._in_transaction:
                self._producer.abort_transaction(_CALL_SLICE)
        except KafkaException:
            pass  # the coordinator aborts it anyway: on fencing or at its timeout
        try:
            self._producer.purge()
            self._producer.flush(0)
        except (KafkaException, RuntimeError):
            pass

    def publish(self, rows: Sequence[Row]) -> None:
        """Publish rows in one transaction, in order; return only after the commit was acknowledged."""
        producer = self._producer
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            raise _fatal(exc.args[0], "begin_transaction") from exc
        self._in_transaction = True
        faults.hit("before_produce")
        reports: list[KafkaError | None] = [None] * len(rows)
        settled = [False] * len(rows)  # a delivery report came, whatever it said
        for index, row in enumerate(rows):
            if row.topic == self.progress_topic:
                self.abort()
                raise PoisonEvent(row, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                                  "the relay's own progress topic is reserved"), reserved=True)
            try:
                self._produce(row, _recorder(reports, settled, index))
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                self.abort()
                if error.fatal():
                    raise _fatal(error, "produce") from exc
                if error.txn_requires_abort() or error.retriable():
                    raise TransactionAborted(f"produce failed: {describe(error)}") from exc
                # A synchronous rejection: the message was never queued, so committing would lose it.
                raise PoisonEvent(row, error) from exc
        self._produce_progress(rows)
        remaining = self._flush()
        if remaining:
            unacknowledged = [row for row, done in zip(rows, settled, strict=True) if not done]
            missing = self._topics_kafka_lacks({row.topic for row in unacknowledged})
            if not missing:
                self.abort()
            else:
                # Never sent: librdkafka holds them until the topic appears (up to
                # topic.metadata.propagation.max.ms), so abort() would wait for them in vain.
                # abort_transaction drops the messages held for the missing topic itself, and keeps the
                # idempotence sequences right; purge() would not (the next transaction failed on a gap).
                self.abort(held=sum(1 for row in unacknowledged if row.topic in missing))
                row = next(row for row in unacknowledged if row.topic in missing)
                raise PoisonEvent(row, KafkaError(KafkaError._UNKNOWN_TOPIC, f"topic {row.topic!r} is not in Kafka"
                                                  " (not created: auto.create.topics.enable off, or a name that"
                                                  " collides with another's, '.' and '_' being alike)"))
            raise TransactionAborted(f"{remaining} messages not acknowledged within {self.operation_timeout}s")
        failed = [(rows[i], error) for i, error in enumerate(reports) if error is not None]
        if failed:
            self.abort()
            suspects = [(row, e) for row, e in failed if e.code() not in _COLLATERAL_CODES]
            if suspects and suspects[0][1].code() in PERMANENT_CODES | EVENT_CODES:
                raise PoisonEvent(*suspects[0], ambiguous=len(suspects) > 1)
            row, error = (suspects or failed)[0]
            if error.fatal():
                raise _fatal(error, "delivery")
            if any(e.code() == KafkaError._MSG_TIMED_OUT for _, e in failed):
                # Messages that timed out leave their partitions' idempotence sequences in doubt: this
                # producer held the next message to such a partition until the flush timed out (30 s
                # after Kafka was back). A new producer starts from a fresh epoch and sequences.
                raise ProducerFailed(f"delivery of event {row.event_id} failed: {describe(error)}")
            raise TransactionAborted(f"delivery of event {row.event_id} failed: {describe(error)}")
        faults.hit("before_commit")
        self._commit()

    def _topics_kafka_lacks(self, topics: set[str]) -> set[str]:
        """Those of ``topics`` the cluster says it does not have; none when it does not answer."""
        lacking = set()
        for topic in sorted(topics):
            try:
                metadata = self._producer.list_topics(topic, timeout=min(_CALL_SLICE * 5, self.operation_timeout))
            except KafkaException:
                return set()  # Kafka does not answer: its trouble, not the event's
            error = metadata.topics[topic].error if topic in metadata.topics else None
            if error is not None and error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                lacking.add(topic)
        return lacking

    def _flush(self, leave: int = 0) -> int:
        """Wait for every message's acknowledgement but ``leave``; returns how many are still unacknowledged."""
        deadline = time.monotonic() + self.operation_timeout
        # flush() returns early only once nothing is left: with messages to leave, look more often.
        slice_ = _CALL_SLICE if not leave else 0.05
        while True:
            try:
                remaining: int = self._producer.flush(min(slice_, max(0.0, deadline - time.monotonic())))
            except KafkaException as exc:  # a fatal error (fenced) surfaces here too
                raise _fatal(exc.args[0], "flush") from exc
            if remaining <= leave or time.monotonic() >= deadline or self._stopping.is_set():
                return remaining

    def _produce(self, row: Row, on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        # The event id header is the relay's: a row's own header of that name (raw SQL) is dropped.
        headers = [(name, value) for name, value in zip(row.header_names, row.header_values)
                   if name != EVENT_ID_HEADER]
        headers.append((EVENT_ID_HEADER, str(row.event_id).encode()))
        kwargs: dict[str, Any] = {"key": row.key, "value": row.value, "headers": headers, "on_delivery": on_delivery}
        if row.partition is not None:
            kwargs["partition"] = row.partition
        while True:
            try:
                self._producer.produce(row.topic, **kwargs)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then retry this message.
                if self._stopping.is_set():
                    raise TransactionAborted("stopping: the local queue stayed full") from None
                self._producer.poll(0.05)

    def _produce_progress(self, rows: Sequence[Row]) -> None:
        value = progress.encode(self.scope, ((row.id, str(row.event_id)) for row in rows))
        try:
            self._producer.produce(self.progress_topic, key=progress.record_key(self.scope.lane), value=value,
                                   partition=self.scope.lane)
        except BufferError:
            self._producer.poll(0.05)
            self._produce_progress(rows)
        except KafkaException as exc:
            self.abort()
            raise TransactionAborted(f"progress record not accepted: {describe(exc.args[0])}") from exc

    def _commit(self) -> None:
        try:
            # A commit that times out is retriable and goes on in the background: call it again.
            self._retrying(self._producer.commit_transaction)
            self._in_transaction = False
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.txn_requires_abort():
                self.abort()
                raise TransactionAborted(f"commit failed: {describe(error)}") from exc
            raise _fatal(error, "commit_transaction") from exc

    def abort(self, held: int = 0) -> None:
        """Abort the transaction once its messages settled, but for ``held`` ones librdkafka keeps for a
        topic Kafka lacks (never sent: abort_transaction drops them)."""
        # An abort purges messages still queued or in flight, yet a leader may have appended them
        # already. Seen on the 3-broker cluster below min ISR: 5 events whose only copy sat in the
        # aborted transaction were marked sent after the retry "succeeded". Let them settle first;
        # if they cannot, replace the producer (init_transactions bumps the epoch, aborts the rest).
        if len(self._producer) > held and self._flush(leave=held) > held:
            raise ProducerFailed(f"abort_transaction: {len(self._producer)} messages still unacknowledged")
        try:
            self._retrying(self._producer.abort_transaction)
            self._in_transaction = False
        except KafkaException as exc:
            raise _fatal(exc.args[0], "abort_transaction") from exc

    def _retrying(self, call: Callable[[float], None]) -> None:
        """Make a transactional call in short slices, repeating it while librdkafka says it may be retried.

        A call that times out goes on in the background and may be made again to wait for its
        outcome; slicing lets a stop request end the wait within a slice.
        """
        deadline = time.monotonic() + self.operation_timeout
        while True:
            try:
                call(max(0.1, min(_CALL_SLICE, deadline - time.monotonic())))
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not error.retriable() or time.monotonic() > deadline:
                    raise
                if self._stopping.is_set():
                    raise TransactionAborted(f"stopping: gave up waiting for the broker ({describe(error)})") from exc
                log.debug("retrying transactional call after %s", describe(error), extra={"action": "retry"})
                time.sleep(0.05)


def _recorder(reports: list[KafkaError | None], settled: list[bool],
              index: int) -> Callable[[KafkaError | None, Any], None]:
    def on_delivery(error: KafkaError | None, _message: Any) -> None:
        reports[index] = error
        settled[index] = True

    return on_delivery


def _fatal(error: KafkaError, during: str) -> ProducerFailed:
    fenced = error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
    return ProducerFailed(f"{during} failed: {describe(error)}", fenced=fenced)
