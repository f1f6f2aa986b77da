"""A lane's tick, without PostgreSQL or Kafka: what it does after each outcome of a Kafka transaction.

The store and the publisher are stand-ins given to the worker's existing seams (its store and its
publisher factory); the real ones are proven against the services by the integration tests.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox_relay import progress
from outbox_relay.config import Settings
from outbox_relay.db.lanes import Row
from outbox_relay.errors import DatabaseError, DatabaseUnavailable
from outbox_relay.lane import ACTIVE_POLL_SECONDS, SECOND_LOOK_SECONDS, LaneWorker
from outbox_relay.metrics import Metrics
from outbox_relay.publisher import PoisonEvent, ProducerFailed, TransactionAborted

SCOPE = progress.Scope("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e", 0, 1)
SETTINGS = Settings.from_sources({}, {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u@h/db",
                                      "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092", "OUTBOX_BATCH_SIZE": "3",
                                      "OUTBOX_MAX_ATTEMPTS": "2", "OUTBOX_BACKOFF_INITIAL": "0.001"})


def event_id(id_: int) -> uuid.UUID:
    return uuid.UUID(int=id_ << 96 | 0x4000_8000_0000_0000_0000)


def row(id_: int, attempts: int = 0) -> Row:
    return Row(id_, event_id(id_), "t", b"k", b"v", [], [], None, attempts, dt.datetime.now(dt.UTC))


class FakeStore:
    """The outbox table in memory: pending ids, sent ids, failures."""

    def __init__(self, pending: list[int]) -> None:
        self.pending = list(pending)
        self.sent: list[int] = []
        self.failures: list[tuple[int, bool]] = []
        self.attempts: dict[int, int] = {}
        self.mark_error: Exception | None = None
        self.claim_error: Exception | None = None
        self.idle: set[int] = set()  # lanes asleep: commits notify while any is
        self.names: dict[int, tuple[str, str]] = {}  # the Kafka names each lane's owner recorded

    def kafka_names(self, _conn: object, lane: int) -> tuple[str, str] | None:
        return self.names.get(lane)

    def record_kafka_names(self, _conn: object, lane: int, transactional_id: str, progress_topic: str) -> None:
        self.names[lane] = (transactional_id, progress_topic)

    def claim(self, _conn: object, _lane: int, _lanes: int, limit: int, unmarked: list[int] | None = None) -> list[Row]:
        if self.claim_error is not None:
            raise self.claim_error
        return [row(i, self.attempts.get(i, 0)) for i in self.pending if i not in (unmarked or [])][:limit]

    def sleep(self, _conn: object, lane: int) -> None:
        self.idle.add(lane)

    def wake(self, _conn: object, lane: int) -> None:
        self.idle.discard(lane)

    def send_mark(self, conn: object, ids: list[int]) -> FakeMark:
        return FakeMark(self, conn, ids)

    def mark_sent(self, _conn: object, ids: list[int]) -> int:
        if self.mark_error is not None:
            raise self.mark_error
        marked = [i for i in ids if i in self.pending]
        self.pending = [i for i in self.pending if i not in marked]
        self.sent += marked
        return len(marked)

    def mark_recovered(self, conn: object, batch: list[tuple[int, str]]) -> tuple[int, int]:
        ours = [i for i, fp in batch
                if progress.matches(str(event_id(i)), fp) and (i in self.pending or i in self.sent)]
        return self.mark_sent(conn, ours), len(ours)

    def record_failure(self, _conn: object, id_: int, _error: str, park: bool) -> None:
        self.failures.append((id_, park))
        self.attempts[id_] = self.attempts.get(id_, 0) + 1
        if park:
            self.pending.remove(id_)

    def holds_lane_lock(self, _conn: object, _lane: int) -> bool:
        return True

    def release_owner(self, _conn: object, _lane: int, _owner: str) -> None:
        pass


class FakeMark:
    """A mark sent ahead: PostgreSQL runs it at once; its result (or error) is read later."""

    def __init__(self, store: FakeStore, conn: object, ids: list[int]) -> None:
        self.error: Exception | None = None
        try:
            self.marked = store.mark_sent(conn, ids)
        except Exception as exc:
            self.error = exc

    def wait(self) -> int:
        if self.error is not None:
            raise self.error
        return self.marked


OURS = ("tx.lane-0", "tx.progress")


class FakePublisher:
    """Kafka in memory: what each committed transaction carried, and the outcome to raise next."""

    def __init__(self, kafka: list[list[int]], outcomes: list[Exception], names: tuple[str, str] = OURS) -> None:
        self.kafka = kafka
        self.outcomes = outcomes
        self.transactional_id, self.progress_topic = names
        self.closed = False

    def start(self, *, create_topic: bool = True) -> None:
        pass

    def committed_records(self) -> list[tuple[int, bytes]]:
        return [(n, progress.encode(SCOPE, [(i, str(event_id(i))) for i in ids]))
                for n, ids in reversed(list(enumerate(self.kafka)))]

    def publish(self, rows: list[Row]) -> None:
        if self.outcomes:
            raise self.outcomes.pop(0)
        self.kafka.append([r.id for r in rows])

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, pending: list[int], outcomes: list[Exception] | None = None) -> None:
        self.store = FakeStore(pending)
        self.kafka: list[list[int]] = []
        # What each pair of Kafka names committed (the transactions' progress records, in order).
        self.kafka_under: dict[tuple[str, str], list[list[int]]] = {OURS: self.kafka}
        self.outcomes = outcomes or []
        self.publishers: list[FakePublisher] = []
        self.worker = LaneWorker(SCOPE, "tx.lane-0", SETTINGS, self.store, self._publisher,  # type: ignore[arg-type]
                                 Metrics())
        self.worker._conn = _Connection()  # type: ignore[assignment]
        self.worker.owned = True

    def _publisher(self, transactional_id: str | None = None, progress_topic: str | None = None) -> Any:
        names = (transactional_id, progress_topic) if transactional_id and progress_topic else OURS
        publisher = FakePublisher(self.kafka_under.setdefault(names, []), self.outcomes, names)
        self.publishers.append(publisher)
        return publisher

    def tick(self) -> bool:
        self.worker.kafka.retry_at = self.worker.database.retry_at = 0.0  # no waiting in unit tests
        return self.worker.tick(threading.Event())

    def published(self) -> list[int]:
        return [i for ids in self.kafka for i in ids]


class _Connection:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_committed_batch_is_marked_and_the_tick_drains_on() -> None:
    h = Harness(pending=[1, 2, 3, 4, 5])
    assert h.tick() is False  # drained within one tick: 3, then 2 (a short batch ends it)
    assert h.kafka == [[1, 2, 3], [4, 5]] and h.store.sent == [1, 2, 3, 4, 5]


def test_an_error_after_the_commit_makes_the_next_tick_recover_before_it_publishes() -> None:
    h = Harness(pending=[1, 2, 3])
    h.store.mark_error = DatabaseError("PostgreSQL refused: a trigger refused the mark")
    with pytest.raises(DatabaseError):
        h.tick()
    assert h.kafka == [[1, 2, 3]] and h.store.sent == [] and h.publishers[0].closed
    h.store.mark_error = None
    h.tick()
    # The new producer read the progress back and marked 1-3: nothing went to Kafka twice.
    assert h.kafka == [[1, 2, 3]] and h.store.sent == [1, 2, 3] and len(h.publishers) == 2


def test_a_lane_last_published_under_other_names_settles_that_owners_work_before_publishing() -> None:
    """The last owner was told another OUTBOX_TRANSACTIONAL_ID_PREFIX (or progress topic) and died with
    1-3 committed in Kafka, unmarked: this owner neither fenced it nor read its records, and published
    1-3 again. Now the names each owner recorded in its lane lead the next one to them."""
    h = Harness(pending=[1, 2, 3, 4, 5])
    other = ("other.lane-0", "other.progress")
    h.kafka_under[other] = [[1, 2, 3]]
    h.store.names[0] = other
    h.tick()
    assert h.kafka_under[other] == [[1, 2, 3]] and h.kafka == [[4, 5]]  # nothing twice
    assert h.store.sent == [1, 2, 3, 4, 5] and h.store.names[0] == OURS
    assert [p.transactional_id for p in h.publishers] == ["tx.lane-0", "other.lane-0"]
    assert h.publishers[1].closed and not h.publishers[0].closed


def test_a_poison_event_is_parked_and_the_rest_go_on() -> None:
    error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large")
    h = Harness(pending=[1, 2, 3], outcomes=[PoisonEvent(row(1), error)])
    h.tick()
    assert h.store.failures == [(1, True)] and h.kafka == [[2, 3]] and h.store.sent == [2, 3]


def test_an_event_that_may_heal_is_retried_before_it_is_parked() -> None:
    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "ACL not there yet")
    h = Harness(pending=[1], outcomes=[PoisonEvent(row(1), error), PoisonEvent(row(1, attempts=1), error)])
    h.tick()
    h.tick()
    assert h.store.failures == [(1, False), (1, True)] and h.kafka == []


def test_an_aborted_transaction_publishes_nothing_and_keeps_the_producer() -> None:
    h = Harness(pending=[1, 2], outcomes=[TransactionAborted("broker busy")])
    assert h.tick() is False and h.kafka == [] and h.store.sent == []
    h.tick()
    assert h.kafka == [[1, 2]] and len(h.publishers) == 1


def test_fenced_while_still_holding_the_lock_is_a_lost_epoch_not_a_new_owner() -> None:
    h = Harness(pending=[1], outcomes=[ProducerFailed("fenced", fenced=True)])
    h.tick()
    assert h.worker.owned and h.publishers[0].closed  # a timed-out transaction: a new producer, same lane
    h.store.holds_lane_lock = lambda _conn, _lane: False  # type: ignore[method-assign]
    h.outcomes.append(ProducerFailed("fenced", fenced=True))
    h.tick()
    assert not h.worker.owned  # someone else owns the lane now: step back


def test_a_lost_database_connection_gives_the_lane_up() -> None:
    h = Harness(pending=[1])
    h.store.claim_error = DatabaseUnavailable("PostgreSQL: server closed the connection unexpectedly")
    assert h.tick() is False
    assert not h.worker.owned and h.publishers[0].closed and h.kafka == []


def test_a_batch_is_marked_while_the_next_one_goes_to_kafka_and_never_claimed_twice() -> None:
    h = Harness(pending=[1, 2, 3, 4, 5, 6, 7])
    marked_when_published: list[list[int]] = []
    publish = FakePublisher.publish

    def watching(publisher: FakePublisher, rows: list[Row]) -> None:
        marked_when_published.append(list(h.store.sent))
        publish(publisher, rows)

    FakePublisher.publish = watching  # type: ignore[method-assign]
    try:
        assert h.tick() is False
    finally:
        FakePublisher.publish = publish  # type: ignore[method-assign]
    # Each batch went to Kafka once, with the one before it marked by then; the last is marked at the tick's end.
    assert h.kafka == [[1, 2, 3], [4, 5, 6], [7]]
    assert marked_when_published == [[], [1, 2, 3], [1, 2, 3, 4, 5, 6]] and h.store.sent == [1, 2, 3, 4, 5, 6, 7]


def test_a_mark_that_fails_while_the_next_batch_is_published_is_settled_by_recovery() -> None:
    h = Harness(pending=[1, 2, 3, 4, 5, 6])
    mark_sent = h.store.mark_sent

    def failing_after_kafka_has_two(conn: object, ids: list[int]) -> int:
        if ids == [1, 2, 3]:  # the first batch's mark, sent while the second goes to Kafka
            raise DatabaseError("PostgreSQL refused: a trigger refused the mark")
        return mark_sent(conn, ids)

    h.store.mark_sent = failing_after_kafka_has_two  # type: ignore[method-assign]
    with pytest.raises(DatabaseError):
        h.tick()
    assert h.kafka == [[1, 2, 3], [4, 5, 6]] and h.store.sent == [] and h.publishers[0].closed
    h.store.mark_sent = mark_sent  # type: ignore[method-assign]
    h.tick()
    # Recovery read both transactions back and marked them: nothing went to Kafka twice.
    assert h.kafka == [[1, 2, 3], [4, 5, 6]] and sorted(h.store.sent) == [1, 2, 3, 4, 5, 6]


def test_events_committed_while_a_partial_batch_goes_to_kafka_are_claimed_in_the_same_tick() -> None:
    """A notification during a tick: the lane claims again at once, its marks still overlapped, instead
    of ending the tick with a synchronous mark and waiting for the scheduler (latency under steady load)."""
    h = Harness(pending=[1])
    publish = FakePublisher.publish
    arrivals = [[2], [3], []]  # committed while each transaction goes to Kafka; the last one finds none

    def with_commits(publisher: FakePublisher, rows: list[Row]) -> None:
        publish(publisher, rows)
        if new := arrivals.pop(0):
            h.store.pending += new
            h.worker.wake()  # the commit notification

    FakePublisher.publish = with_commits  # type: ignore[method-assign]
    try:
        assert h.tick() is False
    finally:
        FakePublisher.publish = publish  # type: ignore[method-assign]
    assert h.kafka == [[1], [2], [3]] and h.store.sent == [1, 2, 3]
    assert not h.worker.woken


def test_a_lane_sleeps_only_after_finding_nothing_for_a_while_and_wakes_when_it_claims() -> None:
    """Commits notify (an instance-wide lock at each commit) only while a lane sleeps: not while it
    publishes, nor for LINGER_SECONDS after, when it claims every ACTIVE_POLL_SECONDS on its own."""
    h = Harness(pending=[1, 2])
    h.store.idle.add(0)  # as a lane is when taken
    h.worker._asleep = True
    assert h.tick() is False and h.kafka == [[1, 2]]
    assert h.store.idle == set() and h.worker.next_poll() == ACTIVE_POLL_SECONDS  # awake, lingering
    assert h.tick() is False and h.store.idle == set()  # nothing yet, still lingering
    h.worker._active_until = 0.0  # LINGER_SECONDS later
    assert h.tick() is True and h.store.idle == {0}  # asleep, and one more claim for commits that did not notify
    assert h.tick() is False and h.worker.next_poll() == SECOND_LOOK_SECONDS  # and one more a little later
    assert h.tick() is False and h.worker.next_poll() == SETTINGS.poll_interval
    h.store.pending.append(3)
    h.tick()
    assert h.kafka == [[1, 2], [3]] and h.store.idle == set()


def test_a_lane_that_failed_to_publish_does_not_go_to_sleep_for_it() -> None:
    h = Harness(pending=[1], outcomes=[TransactionAborted("broker busy")])
    assert h.tick() is False and h.store.idle == set() and h.kafka == []


def breaker_gauge(h: Harness, system: str) -> float | None:
    return h.worker.metrics.registry.get_sample_value("outbox_circuit_open", {"lane": "0", "system": system})


def test_a_lane_given_up_with_its_kafka_breaker_open_no_longer_reports_it_open() -> None:
    """outbox_circuit_open is per instance and lane. A lane that went to another instance (a rebalance, `lanes
    set`, a lost connection) with its Kafka breaker open kept reporting 1 from here for as long as this instance
    lived, though its new owner published: OutboxCircuitOpen paged for a breaker nobody used any more."""
    h = Harness(pending=[1], outcomes=[TransactionAborted("broker busy") for _ in range(SETTINGS.breaker_threshold)])
    for _ in range(SETTINGS.breaker_threshold):
        h.tick()
    assert h.worker.kafka.is_open and breaker_gauge(h, "kafka") == 1
    h.worker.release()
    assert not h.worker.kafka.is_open and breaker_gauge(h, "kafka") == 0
