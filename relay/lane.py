"""One lane: its ownership (advisory lock + transactional.id) and its tick (claim -> publish -> mark)."""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Protocol

from outbox_relay import faults, progress
from outbox_relay.backoff import CircuitBreaker
from outbox_relay.config import Settings
from outbox_relay.db.connection import Connection, connect
from outbox_relay.db.lanes import MarkInFlight, Row, Store
from outbox_relay.errors import BrokerUnavailable, DatabaseError, DatabaseUnavailable
from outbox_relay.metrics import Metrics
from outbox_relay.publisher import LanePublisher, PoisonEvent, ProducerFailed, TransactionAborted
from outbox_relay.recovery import take_over

log = logging.getLogger(__name__)

ISOLATION_RETRIES = 5
TRANSACTION_POOLING = (
    "the lane's advisory lock is not held by this connection's session: a transaction-pooling proxy "
    "(PgBouncer pool_mode=transaction) stands between the relay and PostgreSQL; connect the relay directly "
    "or through session pooling"
)
DRAIN_SLICE_SECONDS = 1.0
# A lane that published keeps claiming on its own, every ACTIVE_POLL_SECONDS, until it found nothing
# for LINGER_SECONDS; only then does it sleep and let commits wake it. Commits notify only while some
# lane sleeps, and a notifying commit holds an instance-wide lock until it is durable.
ACTIVE_POLL_SECONDS = 0.01
LINGER_SECONDS = 0.1
# A commit decides whether to notify when it writes its events, so one still open when its lane fell
# asleep does not wake it: the lane looks again at once and once more this much later, then polls.
SECOND_LOOK_SECONDS = 0.05


class PublisherFactory(Protocol):
    """A producer for the lane: under its own names, or under a last owner's other ones when given."""

    def __call__(self, transactional_id: str | None = None, progress_topic: str | None = None, /) -> LanePublisher:
        ...


class _Outcome(enum.Enum):
    PUBLISHED = "published"  # committed in Kafka and marked sent
    POISONED = "poisoned"  # one event was parked or counted; the rest may go at once
    RETRY = "retry"  # nothing published; the lane backs off


class SpareConnection:
    """The one connection an instance tries lane locks on; a lane that takes its lock keeps it.

    Without it, every lane an instance ever tried kept a connection of its own, owned or not:
    instances x lanes PostgreSQL backends (117 for 4 instances on 32 lanes).
    """

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._conn: Connection | None = None

    def take(self) -> Connection:
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            conn = connect(self._database_url, "outbox-relay lane (trying locks)", lane=True)
        return conn

    def put_back(self, conn: Connection) -> None:
        if self._conn is None and not conn.closed:
            self._conn = conn
        else:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LaneWorker:
    """Owns at most one lane. Every method is called from scheduler threads; ``tick`` never runs twice at once."""

    def __init__(
        self,
        scope: progress.Scope,
        transactional_id: str,
        settings: Settings,
        store: Store,
        publisher_factory: PublisherFactory,
        metrics: Metrics,
    ) -> None:
        self.scope = scope
        self.lane = scope.lane
        self.lane_count = scope.lane_count
        self.settings = settings
        self.store = store
        self.transactional_id = transactional_id
        self.owner = settings.instance_name()
        self._new_publisher = publisher_factory
        self._conn: Connection | None = None
        self._publisher: LanePublisher | None = None
        # The last batch: committed in Kafka, its mark not sent yet. It is sent when the next batch
        # goes to Kafka (PostgreSQL writes one while Kafka commits the other) or when the tick ends.
        self._unmarked: list[int] = []
        self.metrics = metrics
        self._owned = False
        self._ticking = threading.Lock()
        # Set by every commit notification: a tick that finds it set after a claim claims again (its
        # marks overlapping), instead of ending, marking synchronously and waiting for the scheduler.
        self._woken = threading.Event()
        # Whether the lane's row is in the idle lanes table (commits notify), and until when the lane
        # claims on its own after it last published something.
        self._asleep = False
        # Whether the lane asks for notifications at all: not when the relay does not listen, nor once
        # its role turned out unable to write the idle lanes table (it polls then).
        self._wake_ups = settings.listen == "on"
        self._active_until = 0.0
        self._found_nothing = False  # the last claim came back empty (not a failure)
        self._second_look = False  # fell asleep: one more look SECOND_LOOK_SECONDS later
        self._extra = {"lane": self.lane}
        self.database, self.kafka = (
            CircuitBreaker(system, threshold=settings.breaker_threshold, initial=settings.backoff_initial,
                           cap=settings.backoff_max, extra=self._extra,
                           gauge=metrics.breaker_open.labels(system=system, lane=str(self.lane)))
            for system in ("postgres", "kafka")
        )

    @property
    def owned(self) -> bool:
        return self._owned

    @owned.setter
    def owned(self, value: bool) -> None:
        self._owned = value
        self.metrics.lane_owned.labels(lane=str(self.lane)).set(int(value))
        if not value:
            # Its Kafka breaker paced this owner's producer: another owner's is not ours to report open.
            self.kafka.forget()

    def wake(self) -> None:
        """Events committed: a tick under way claims again before it ends."""
        self._woken.set()

    @property
    def woken(self) -> bool:
        """Events committed since the last claim began."""
        return self._woken.is_set()

    def next_poll(self) -> float:
        """Seconds until the lane claims again after a tick that found no more work (asked once per tick)."""
        if time.monotonic() < self._active_until:
            return ACTIVE_POLL_SECONDS
        if self._second_look:
            self._second_look = False
            return min(SECOND_LOOK_SECONDS, self.settings.poll_interval)
        return self.settings.poll_interval

    @property
    def ticking(self) -> bool:
        return self._ticking.locked()

    @property
    def ready(self) -> bool:
        """Owns the lane with a producer that took it over in Kafka, and the broker answers."""
        return self.owned and self._publisher is not None and not self.kafka.is_open

    # --- ownership --------------------------------------------------------------------

    def try_acquire(self, spare: SpareConnection | None = None) -> bool:
        """Take the lane if it is free; True when this worker owns it afterwards.

        The lock is tried on ``spare``'s connection (or a new one), which the lane keeps only when it
        takes the lock: an instance's connections follow the lanes it owns, not the lanes it tried.
        """
        if self.owned:
            return True
        if not self.database.ready():
            return False
        conn: Connection | None = None
        locked = False
        try:
            conn = spare.take() if spare is not None else SpareConnection(self.settings.database_url).take()
            faults.hit("before_lane_lock")
            if not self.store.try_lock_lane(conn, self.lane):
                return False
            locked = True
            # What was read before the lock may be stale by now (a lane-count change may have
            # finished meanwhile): check again on the connection that holds the lock.
            state = self.store.outbox_state(conn)
            if (state.lane_count, state.resizing, state.outbox_id) != (self.lane_count, False, self.scope.outbox_id):
                self.store.release_lane_lock(conn, self.lane)
                locked = False
                log.info("not taking lane %d: the lane count changed to %d", self.lane, state.lane_count,
                         extra={**self._extra, "action": "lane_stale"})
                return False
            if not self.store.holds_lane_lock(conn, self.lane):
                # The lock went to a server session that is not ours any more: a transaction-pooling
                # proxy hands each statement to whichever session is free, and ownership means nothing
                # then. (It may hand the same session back by chance: the README warns too.)
                conn.close()
                if not self.database.failures:
                    log.error("lane %d: %s", self.lane, TRANSACTION_POOLING,
                              extra={**self._extra, "action": "transaction_pooling"})
                self.database.failure(TRANSACTION_POOLING)
                return False
            self.store.record_owner(conn, self.lane, self.owner)
            self.store.name_session(conn, f"outbox-relay lane {self.lane}")
            # Asleep until its first claim finds events; a relay that does not listen never asks for
            # notifications (and clears what a listening owner before it left).
            self._set_idle(conn, asleep=self._wake_ups)
            self._conn, conn = conn, None  # the lane keeps it: it holds the lock
        except DatabaseUnavailable as exc:
            if conn is not None:
                conn.close()
                conn = None
            self._lost_database(exc)
            return False
        finally:
            if conn is not None:  # not this lane's: the next attempt may use it, unless it holds a lock
                if spare is not None and not locked:
                    spare.put_back(conn)
                else:
                    conn.close()
        self.database.success()
        self.owned = True
        log.info("took lane %d as %s (transactional.id %s)", self.lane, self.owner, self.transactional_id,
                 extra={**self._extra, "action": "lane_acquired"})
        return True

    def release(self, until: float | None = None) -> bool:
        """Give the lane up: abort nothing committed, unlock, close. Safe to call twice.

        Waits for a running tick to end, until the monotonic time ``until`` at most; False when
        it did not end by then (the lane is left to the end of the process).
        """
        wait = -1 if until is None else max(0.0, until - time.monotonic())
        if not self._ticking.acquire(timeout=wait):
            return False
        try:
            self._drop_publisher()
            if self._conn is not None and not self._conn.closed:
                if self.owned:
                    try:
                        self._set_idle(self._conn, asleep=False)  # whoever takes the lane asks again
                        self.store.release_owner(self._conn, self.lane, self.owner)
                    except DatabaseError:
                        pass
                self._conn.close()
            if self.owned:
                log.info("released lane %d", self.lane, extra={**self._extra, "action": "lane_released"})
            self._conn = None
            self.owned = False
        finally:
            self._ticking.release()
        return True

    def _lost_database(self, exc: Exception) -> None:
        """The lane connection broke, and the advisory lock went with it: we own nothing any more."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        if self.owned:
            log.warning("lost lane %d with its database connection", self.lane,
                        extra={**self._extra, "action": "lane_lost"})
        self.owned = False
        self._drop_publisher()
        self.metrics.failures.labels(reason="database").inc()
        self.database.failure(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    def _drop_publisher(self) -> None:
        # Whatever was published and not marked yet, recovery marks from the progress records.
        self._unmarked = []
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    # --- publishing -------------------------------------------------------------------

    def tick(self, stopping: threading.Event) -> bool:
        """Drain batch after batch for up to one time slice. True when more work is waiting.

        Draining inside the tick saves a scheduler round trip per batch; the slice keeps the lane
        responsive to ownership changes and shutdown (checked between batches). After every batch
        the lane claims again until a claim comes back empty: under a steady load it goes from one
        Kafka transaction to the next with its marks overlapped, and no commit needs to notify it.
        """
        if not self._ticking.acquire(blocking=False):
            return False
        try:
            deadline = time.monotonic() + DRAIN_SLICE_SECONDS
            more = True
            try:
                while more and time.monotonic() < deadline and not stopping.is_set():
                    if not self.owned or self._conn is None or not self.kafka.ready():
                        return False
                    self._woken.clear()  # before the claim: a commit it cannot see wakes the lane again
                    more = self._tick_owned(self._conn, stopping) or self._woken.is_set()
            finally:
                self._settle_marks()
            if not more and self._fall_asleep():
                more = True  # claim once more: a commit whose trigger ran before the row existed did not notify
            return more
        finally:
            self._ticking.release()

    def _fall_asleep(self) -> bool:
        """Ask commits to notify, once the lane found nothing for LINGER_SECONDS. True when it just did."""
        if (self._asleep or not self._found_nothing or not self._wake_ups
                or time.monotonic() < self._active_until or not self.owned or self._conn is None):
            return False
        try:
            self._set_idle(self._conn, asleep=True)
        except DatabaseUnavailable as exc:
            self._lost_database(exc)
            return False
        self._second_look = self._asleep
        return self._asleep

    def _set_idle(self, conn: Connection, *, asleep: bool) -> None:
        """Put the lane's row into the idle lanes table (commits notify) or take it out.

        A role that may not write the table (granted from an earlier release's least-privilege SQL)
        costs the lane its wake-ups, never its work: it says so once and polls from then on.
        """
        try:
            (self.store.sleep if asleep else self.store.wake)(conn, self.lane)
        except DatabaseUnavailable:
            raise
        except DatabaseError as exc:
            if self._wake_ups:
                log.error("lane %d cannot write the idle lanes table (%s): commits will not wake it, it polls every "
                          "OUTBOX_POLL_INTERVAL; grant what docs/least-privilege.sql grants on it", self.lane, exc,
                          extra={**self._extra, "action": "idle_lanes_refused"})
            self._wake_ups = self._asleep = False
            return
        self._asleep = asleep

    def _tick_owned(self, conn: Connection, stopping: threading.Event) -> bool:
        try:
            # Recovery (inside _ensure_publisher) marks what the last owner left unmarked; only a
            # claim made after it can tell what is really still pending.
            publisher = self._ensure_publisher()
            if publisher is None:
                return False
            rows = self.store.claim(conn, self.lane, self.lane_count, self.settings.batch_size, self._unmarked)
            self._found_nothing = not rows
            if not rows or stopping.is_set():
                return False
            outcome = self._publish(conn, publisher, rows, overlap=True)
            if outcome is _Outcome.POISONED:
                return True  # the rest of the batch goes again at once, in a new transaction
            if outcome is _Outcome.PUBLISHED:
                self._active_until = time.monotonic() + LINGER_SECONDS
                if self._asleep:  # after the batch, so that its latency pays for no extra commit
                    self._set_idle(conn, asleep=False)  # busy: it claims again on its own, commits need not notify
                    self._second_look = False
            # Claim again at once after any batch: while the lane is awake no commit tells it of more.
            return outcome is _Outcome.PUBLISHED
        except DatabaseUnavailable as exc:
            self._lost_database(exc)
            return False

    def _publish(self, conn: Connection, publisher: LanePublisher, rows: list[Row], *,
                 overlap: bool = False) -> _Outcome:
        """One Kafka transaction for the rows; on success (only then) they are sent.

        With ``overlap`` the previous batch's mark runs in PostgreSQL while this transaction goes
        to Kafka, and this batch's mark waits for the next one (or the end of the tick). Marks of
        a lane still commit in the order of its transactions, one after the other, which is what
        recovery relies on (it reads progress back until a transaction whose rows are all marked).
        """
        started = time.time()
        marking = self._send_marks(conn) if overlap else None
        failure: PoisonEvent | TransactionAborted | ProducerFailed | None = None
        try:
            publisher.publish(rows)
        except (PoisonEvent, TransactionAborted, ProducerFailed) as exc:
            failure = exc
        finally:
            if marking is not None:
                self._finish_mark(marking)  # before anything else runs on the connection
        if isinstance(failure, PoisonEvent):
            self.metrics.failures.labels(reason="poison").inc()
            if failure.ambiguous and len(rows) > 1:
                return self._isolate(conn, publisher, rows)
            self._poison(conn, failure)
            return _Outcome.POISONED
        if isinstance(failure, ProducerFailed):
            self.metrics.failures.labels(reason="fenced" if failure.fenced else "producer").inc()
            self._producer_failed(failure)
            return _Outcome.RETRY
        if failure is not None:
            self.metrics.failures.labels(reason="aborted").inc()
            self.kafka.failure(str(failure))
            return _Outcome.RETRY
        committed = time.time()
        self.kafka.success()
        faults.hit("after_commit")
        # Only now, after Kafka acknowledged the commit, are the rows sent.
        ids = [row.id for row in rows]
        if overlap and not faults.armed("during_mark"):
            self._unmarked = ids
        else:
            try:
                self.store.mark_sent(conn, ids)
            except Exception:
                # Published but not marked: only recovery, from the progress records, can tell what
                # is sent now. Dropping the producer makes the next tick recover before it publishes.
                self._drop_publisher()
                raise
        self.metrics.observe_published(self.lane, (row.created_at.timestamp() for row in rows), started, committed)
        log.debug("published %d events", len(rows), extra={**self._extra, "action": "published"})
        return _Outcome.PUBLISHED

    def _send_marks(self, conn: Connection) -> MarkInFlight | None:
        ids, self._unmarked = self._unmarked, []
        if not ids:
            return None
        try:
            return self.store.send_mark(conn, ids)
        except Exception:
            self._drop_publisher()  # recovery settles what is marked
            raise

    def _finish_mark(self, marking: MarkInFlight) -> None:
        try:
            marking.wait()
        except Exception:
            self._drop_publisher()
            raise

    def _settle_marks(self) -> None:
        """Mark the last published batch before the tick ends: nothing is left in flight between ticks."""
        if not self._unmarked:
            return
        if self._conn is None or self._conn.closed:
            self._drop_publisher()  # the next owner's recovery marks them
            return
        try:
            self._finish_mark(self.store.send_mark(self._conn, self._unmarked))
        except DatabaseUnavailable as exc:
            self._lost_database(exc)
        finally:
            self._unmarked = []

    def _ensure_publisher(self) -> LanePublisher | None:
        """A producer that owns the lane in Kafka, after recovering what the last owner left unmarked."""
        if self._publisher is not None:
            return self._publisher
        assert self._conn is not None
        publisher = self._new_publisher()
        try:
            # Committed transactions may not have been marked (a crash, a lost connection, a
            # database that lost writes): their events are in Kafka, so they are sent, and must
            # not be published again. The last owner's first, if it published under other names.
            recovered = take_over(self.store, self._conn, self.scope, publisher, self._new_publisher)
        except BrokerUnavailable as exc:
            publisher.close()
            self.kafka.failure(str(exc))
            return None
        except BaseException:
            publisher.close()
            raise
        if recovered:
            log.warning("recovered %d events that the lane's last transactions published but never marked",
                        recovered, extra={**self._extra, "action": "recovered"})
        self._publisher = publisher
        return publisher

    def _producer_failed(self, exc: ProducerFailed) -> None:
        self._drop_publisher()
        if exc.fenced and self._still_locked():
            # Nobody else can own the lane while we hold its lock: the coordinator aborted a
            # transaction that ran past transaction.timeout.ms and bumped the epoch.
            log.warning("lane %d: the producer lost its epoch (a transaction timed out?): starting a new one",
                        self.lane, extra={**self._extra, "action": "producer_epoch_lost"})
            self.kafka.failure(str(exc))
        elif exc.fenced:
            # A newer producer holds our transactional.id: someone else owns the lane now.
            log.warning("fenced on lane %d: another relay owns it; stepping back", self.lane,
                        extra={**self._extra, "action": "fenced"})
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self.owned = False
        else:
            self.kafka.failure(str(exc))

    def _still_locked(self) -> bool:
        conn = self._conn
        try:
            return conn is not None and not conn.closed and self.store.holds_lane_lock(conn, self.lane)
        except DatabaseError:
            return False

    def _isolate(self, conn: Connection, publisher: LanePublisher, rows: list[Row]) -> _Outcome:
        """One event per transaction, in order, until the one that fails: that one is the culprit.

        Rare (only after a failure that several messages shared) and slow on purpose. The first
        transaction after an abort may be purged while the producer bumps its epoch: retry it.
        """
        for row in rows:
            for _ in range(ISOLATION_RETRIES):
                outcome = self._publish(conn, publisher, [row])
                if outcome is not _Outcome.RETRY or self._publisher is not publisher:
                    break
                time.sleep(self.kafka.delay())
            if outcome is not _Outcome.PUBLISHED:
                return outcome
        return _Outcome.PUBLISHED

    def _poison(self, conn: Connection, exc: PoisonEvent) -> None:
        row: Row = exc.row
        park = exc.permanent or row.attempts + 1 >= self.settings.max_attempts
        self.store.record_failure(conn, row.id, str(exc), park)
        extra = {**self._extra, "event_id": str(row.event_id), "topic": row.topic,
                 "action": "event_parked" if park else "event_retry"}
        if park:
            attempts = row.attempts + 1
            log.error("parked event %s as failed after %d attempt%s: %s", row.event_id, attempts,
                      "" if attempts == 1 else "s", exc, extra=extra)
        else:
            log.warning("event %s failed (attempt %d of %d): %s", row.event_id, row.attempts + 1,
                        self.settings.max_attempts, exc, extra=extra)
            self.kafka.failure(str(exc))
