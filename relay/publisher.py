"""The relay's only door to Kafka: one transactional producer per lane.

``publish(rows)`` puts a batch into one Kafka transaction and returns only once the transaction
committed, or raises one of the outcomes below, following librdkafka's transactional error
classes (retriable: retry the call; abortable: abort and retry the batch; fatal: new producer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from outbox_relay import faults, progress
from outbox_relay.errors import BrokerUnavailable, ConfigurationError, OutboxError
from outbox_relay.store import Row

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "outbox-event-id"

# Errors that say "this message can never be published as it is": park the event at once.
PERMANENT_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
})
# Errors that blame the message but may heal (a topic or partition created later): retry, then park.
EVENT_CODES = frozenset({
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

    def __init__(self, row: Row, error: KafkaError, *, ambiguous: bool = False) -> None:
        self.row = row
        self.error = error
        self.permanent = error.code() in PERMANENT_CODES
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


class QuietKafkaLogger:
    """librdkafka's own lines at DEBUG, for short-lived clients of CLI commands: a broker that cannot be
    reached is one error when the command gives up, not a line per reconnect."""

    _log = logging.getLogger("outbox_relay.librdkafka")

    def log(self, level: int, message: str, *args: Any) -> None:
        self._log.debug(message, *args)


def validate_config(config: dict[str, Any], transactional_id: str, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigurationError naming what librdkafka rejects in the producer configuration, and
    where the property was set when ``sources`` says (property -> variable, file line or flag)."""
    try:
        Producer({**config, "transactional.id": transactional_id, "logger": QuietKafkaLogger()})
    except KafkaException as exc:
        message = exc.args[0].str()
        where = [source for prop, source in (sources or {}).items() if f'"{prop}"' in message]
        hint = f" (from {', '.join(where)})" if where else ""
        raise ConfigurationError(f"invalid Kafka configuration: {message}{hint}") from None


def describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


class LanePublisher:
    """A transactional, idempotent producer bound to one lane's transactional.id.

    Each transaction carries the events and the lane's progress record (which ids it carried).
    """

    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str,
        *,
        lane: int,
        lane_count: int,
        progress_topic: str,
        operation_timeout: float = 30.0,
        logger: Any = None,
    ) -> None:
        self.transactional_id = transactional_id
        self.lane = lane
        self.lane_count = lane_count
        self.progress_topic = progress_topic
        self.operation_timeout = operation_timeout
        self._config = config
        conf = {**config, "transactional.id": transactional_id}
        if logger is not None:
            conf["logger"] = logger
        self._producer = Producer(conf)

    def start(self) -> list[int]:
        """Take over the lane in Kafka; returns the ids its last committed transaction carried.

        ``init_transactions`` fences any older producer of this transactional.id and settles its
        open transaction, so the progress read afterwards is final. The caller marks those ids sent
        before publishing anything new.
        """
        try:
            self._retrying(lambda: self._producer.init_transactions(self.operation_timeout))
        except KafkaException as exc:
            raise _fatal(exc.args[0], "init_transactions") from exc
        progress.ensure_topic(self._config, self.progress_topic, self.lane_count, self.operation_timeout)
        return progress.last_committed_ids(self._config, self.progress_topic, self.lane, self.operation_timeout)

    def close(self) -> None:
        """Drop the producer; an open transaction is aborted by the coordinator (fencing or timeout)."""
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
        faults.hit("before_produce")
        reports: list[KafkaError | None] = [None] * len(rows)
        for index, row in enumerate(rows):
            try:
                self._produce(row, _recorder(reports, index))
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
        remaining = producer.flush(self.operation_timeout)
        if remaining:
            self.abort()
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
            raise TransactionAborted(f"delivery of event {row.event_id} failed: {describe(error)}")
        faults.hit("before_commit")
        self._commit()

    def _produce(self, row: Row, on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        headers = list(zip(row.header_names, row.header_values))
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
                self._producer.poll(0.05)

    def _produce_progress(self, rows: Sequence[Row]) -> None:
        value = progress.encode(self.lane, self.lane_count, (row.id for row in rows))
        try:
            self._producer.produce(self.progress_topic, key=progress.record_key(self.lane), value=value,
                                   partition=self.lane)
        except BufferError:
            self._producer.poll(0.05)
            self._produce_progress(rows)
        except KafkaException as exc:
            self.abort()
            raise TransactionAborted(f"progress record not accepted: {describe(exc.args[0])}") from exc

    def _commit(self) -> None:
        try:
            # A commit that times out is retriable and goes on in the background: call it again.
            self._retrying(lambda: self._producer.commit_transaction(self.operation_timeout))
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.txn_requires_abort():
                self.abort()
                raise TransactionAborted(f"commit failed: {describe(error)}") from exc
            raise _fatal(error, "commit_transaction") from exc

    def abort(self) -> None:
        try:
            self._retrying(lambda: self._producer.abort_transaction(self.operation_timeout))
        except KafkaException as exc:
            raise _fatal(exc.args[0], "abort_transaction") from exc

    def _retrying(self, call: Callable[[], None]) -> None:
        """Repeat a transactional call while librdkafka says the same call may be retried."""
        deadline = time.monotonic() + self.operation_timeout
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not error.retriable() or time.monotonic() > deadline:
                    raise
                log.debug("retrying transactional call after %s", describe(error), extra={"action": "retry"})
                time.sleep(0.1)


def _recorder(reports: list[KafkaError | None], index: int) -> Callable[[KafkaError | None, Any], None]:
    def on_delivery(error: KafkaError | None, _message: Any) -> None:
        reports[index] = error

    return on_delivery


def _fatal(error: KafkaError, during: str) -> ProducerFailed:
    fenced = error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
    return ProducerFailed(f"{during} failed: {describe(error)}", fenced=fenced)
