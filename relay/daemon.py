"""The relay daemon: APScheduler decides when each lane ticks; lanes do the work.

Jobs:
- ``lanes`` (every ``lane_interval``): register, take this instance's share of the lanes, heartbeat.
- ``lane-N`` (one per owned lane): one tick, then the job re-schedules itself: at once while the
  tick left work or a commit was announced, every 10 ms for a moment after it published, after
  ``poll_interval`` once it sleeps (commits then wake it). A lane never ticks twice at once.
- ``backlog`` (every ``backlog_interval``): measure the backlog for metrics and the status page; a
  measurement that took d seconds is not repeated for d / ``BACKLOG_BUDGET`` seconds, but the oldest
  claimable age (one row) is measured on every run meanwhile.
- ``retention`` (every ``retention_interval``): delete old sent and discarded events in small batches.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from outbox_relay import monitor, progress
from outbox_relay.backoff import CircuitBreaker
from outbox_relay.broker import PROBE_INTERVAL, BrokerProbe
from outbox_relay.config import KafkaNames, Settings
from outbox_relay.db.connection import HeldConnection, connect
from outbox_relay.db.lanes import OutboxState, Store
from outbox_relay.db.retention import delete_expired, delete_orphans
from outbox_relay.errors import DatabaseError, DatabaseUnavailable, StatementCancelled
from outbox_relay.lane import LaneWorker, SpareConnection
from outbox_relay.metrics import Metrics
from outbox_relay.progress import LibrdkafkaLogger
from outbox_relay.publisher import LanePublisher, validate_config
from outbox_relay.wakeups import CommitListener
from outbox_relay.web import StatusServer

log = logging.getLogger(__name__)


CONTROL_SESSION = "outbox-relay control"  # its application_name; `: <trouble>` follows while there is some
# The backlog snapshot reads every unsent row (up to its cap) and its event: with a backlog of a million
# events it takes seconds of a PostgreSQL core, which the lanes draining that backlog need. It may take
# this share of the time, so its gauges refresh less often while the backlog is huge (see
# outbox_backlog_refreshed_timestamp_seconds), never more often than every ``backlog_interval``.
BACKLOG_BUDGET = 0.05
MONITOR_TIMEOUT_S = 60.0  # a backlog measurement's statement is cancelled after this long


def lane_share(lane_count: int, live: list[str], me: str) -> tuple[int, list[int]]:
    """How many lanes this instance should hold (ceil(lanes / live instances)), and which it prefers.

    Each instance prefers the lanes whose number matches its rank among the live instances, so they
    converge on disjoint sets without negotiating; the rest follow, to pick up a dead peer's lanes.
    """
    members = live if me in live else sorted([*live, me])
    rank = members.index(me)
    preferred = sorted(range(lane_count), key=lambda lane: (lane % len(members) != rank, lane))
    return -(-lane_count // len(members)), preferred


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(hold_failed_keys=settings.failed_key_policy == "hold")
        self.stopping = threading.Event()
        self._stopped = threading.Event()
        self.workers: dict[int, LaneWorker] = {}
        self.lane_count: int | None = None
        self.names: KafkaNames | None = None  # known once the database told us the outbox's identity
        self._control = HeldConnection(settings.database_url, CONTROL_SESSION)
        self._monitor = HeldConnection(settings.database_url, "outbox-relay monitor",
                                       session=monitor.session(MONITOR_TIMEOUT_S))
        self._backlog_due = 0.0  # monotonic time before which a backlog measurement is not repeated
        self._orphans_after = 0  # where retention's next look for unsent rows without an event starts
        self._spare = SpareConnection(settings.database_url)  # lane locks are tried on it
        self._membership_seen = 0.0  # monotonic time the database last answered lane management
        self._lanes_taken = False  # a first pass took this instance's share: readiness means something now
        # The Kafka trouble the control session's name shows `outbox-relay status`, and on which session:
        # a new control session starts with the plain name.
        self._announced: tuple[object, str] = (None, "")
        # librdkafka complains per client and per retry; the broker probe and the lanes say it once, in our words.
        self._kafka_logger = LibrdkafkaLogger(quiet=True)
        self.metrics = Metrics()
        self.metrics.database_up.set_function(lambda: float(self._database_answers()))
        self.broker = BrokerProbe(settings, self.metrics)
        self.http = StatusServer(settings.http, self.metrics, self.readiness) if settings.http else None
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=8)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.UTC,
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        log.info("relay %s starting: %s", self.settings.instance_name(), self.settings.redacted(),
                 extra={"action": "start"})
        # librdkafka judges the configuration now, so a typo stops the daemon with one clear line.
        validate_config(self.settings.producer_config(), "outbox-relay.configuration-check",
                        self.settings.kafka_sources)
        now = dt.datetime.now(dt.UTC)
        self.scheduler.add_job(self._manage_lanes, "interval", seconds=self.settings.lane_interval,
                               id="lanes", next_run_time=now)
        self.scheduler.add_job(self._measure_backlog, "interval", seconds=self.settings.backlog_interval,
                               id="backlog", next_run_time=now)
        self.scheduler.add_job(self.broker.probe, "interval", seconds=PROBE_INTERVAL, id="broker",
                               next_run_time=now)
        if self.settings.retention_hours > 0:
            self.scheduler.add_job(self._retention, "interval", seconds=self.settings.retention_interval,
                                   id="retention", next_run_time=now)
        self.scheduler.start()
        if self.http is not None:
            self.http.start()
        if self.settings.listen == "on":
            breaker = CircuitBreaker("postgres listener", threshold=self.settings.breaker_threshold,
                                     initial=self.settings.backoff_initial, cap=self.settings.backoff_max, extra={})
            CommitListener(self.settings.database_url, self.wake_all, self.stopping, breaker).start()

    def stop(self) -> bool:
        """Finish the ticks in flight (each ends its transaction), release every lane.

        Ticks notice ``stopping`` within about a second. One that does not end within half the
        shutdown bound (stuck in a call that cannot be interrupted) is abandoned: its lane's
        session ends with the process, and recovery settles whatever it published. Returns False
        when a tick was abandoned.
        """
        if self.stopping.is_set():
            return True
        self.stopping.set()
        log.info("stopping: finishing transactions in flight", extra={"action": "stop"})
        self.scheduler.shutdown(wait=False)
        grace = time.monotonic() + self.settings.shutdown_timeout / 2
        abandoned = [lane for lane, worker in self.workers.items() if not worker.release(until=grace)]
        if abandoned:
            log.warning("lanes %s: their ticks did not end within %.0fs; abandoning them", abandoned,
                        self.settings.shutdown_timeout / 2, extra={"action": "abandon"})
        if self.http is not None:
            self.http.stop()
        self._spare.close()
        if self._control.is_open:
            try:
                with self._control.use() as conn:
                    self.store.deregister_instance(conn, self.settings.instance_name())
            except DatabaseError:
                pass
        self._control.close()
        log.info("stopped", extra={"action": "stopped"})
        return not abandoned

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; a second signal exits at once."""
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self.stopping.is_set():
                log.warning("second signal: exiting now", extra={"action": "abort"})
                os._exit(130)
            threading.Thread(target=self._stop_with_deadline, name="relay-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not self._stopped.wait(0.2):  # a timed wait keeps the main thread responsive to signals
            pass
        return 0

    def _stop_with_deadline(self) -> None:
        timer = threading.Timer(self.settings.shutdown_timeout, self._give_up)
        timer.daemon = True
        timer.start()
        clean = self.stop()
        timer.cancel()
        if not clean:
            # An abandoned tick's thread would hold up the interpreter's exit (it joins worker threads).
            logging.shutdown()
            os._exit(0)
        self._stopped.set()

    def _give_up(self) -> None:
        stacks = "".join(
            f"\n--- thread {thread.name}:\n" + "".join(traceback.format_stack(frame))
            for thread in threading.enumerate()
            if (frame := sys._current_frames().get(thread.ident or 0)) is not None
        )
        log.error("shutdown took longer than %.0fs: exiting; where each thread was:%s", self.settings.shutdown_timeout,
                  stacks, extra={"action": "abort"})
        os._exit(1)

    # --- jobs -----------------------------------------------------------------------------

    def _manage_lanes(self) -> None:
        """Register, then hold this instance's fair share of the lanes: ceil(lanes / live instances)."""
        if self.stopping.is_set():
            return
        view = self._read_membership()
        if view is None:
            return
        state, live = view
        count = state.lane_count
        self.metrics.lanes.set(count)
        if state.resizing:
            if any(worker.owned for worker in self.workers.values()):
                log.warning("the lane count is being changed: releasing every lane until it is done",
                            extra={"action": "resize_wait"})
            self._release(list(self.workers.values()))
            self._end_hung_resize(count)
            return
        if self.names is None or self.names.outbox_id != state.outbox_id:
            self._release(list(self.workers.values()))
            self.workers, self.lane_count = {}, None
            self.names = self.settings.kafka_names(state.outbox_id, state.database)
            self.broker.progress_topic = self.names.progress_topic
            log.info("outbox %s: transactional.id prefix %s, progress topic %s", state.outbox_id,
                     self.names.transactional_prefix, self.names.progress_topic, extra={"action": "identity"})
        if count != self.lane_count:
            if self.lane_count is not None:
                log.warning("lane count changed from %d to %d: re-taking lanes", self.lane_count, count,
                            extra={"action": "lanes_changed"})
            self._release(list(self.workers.values()))
            self.workers = {lane: self._worker(self.names, progress.Scope(state.outbox_id, lane, count))
                            for lane in range(count)}
            self.lane_count = count
        share, preferred = lane_share(count, live, self.settings.instance_name())
        owned = [lane for lane in preferred if self.workers[lane].owned]
        if len(owned) > share:
            self._release([self.workers[lane] for lane in owned[share:]])
        refused = []
        for lane in preferred:
            if sum(worker.owned for worker in self.workers.values()) >= share or self.stopping.is_set():
                break
            worker = self.workers[lane]
            if not worker.owned:
                if worker.try_acquire(self._spare):
                    self._schedule(lane, 0)
                else:
                    refused.append(lane)
        if refused and len(owned) < share:
            self._free_hung_lanes(refused)
        # Safety net: an owned lane always has its next tick scheduled or running.
        for lane, worker in self.workers.items():
            if worker.owned and not worker.ticking and self.scheduler.get_job(f"lane-{lane}") is None:
                self._schedule(lane, self.settings.poll_interval)
        self._heartbeat()
        self._announce_kafka_trouble()
        self._lanes_taken = True

    def _free_hung_lanes(self, lanes: list[int]) -> None:
        """Lanes held by an owner without a heartbeat for instance_timeout: end its sessions.

        It may be hung rather than dead (stopped, swapping, a frozen VM): its kernel still answers
        keepalives, so its lock would stay. Kafka fences it when the lane's next owner starts.
        """
        if not self._control.is_open:
            return
        try:
            with self._control.use() as conn:
                freed = self.store.terminate_stale_owners(conn, lanes, self.settings.instance_timeout)
        except DatabaseUnavailable:
            return
        if freed:
            log.warning("lanes %s: their owner showed no heartbeat for %gs; ended its sessions to take them over",
                        freed, self.settings.instance_timeout, extra={"action": "hung_owner"})

    def _end_hung_resize(self, count: int) -> None:
        """A lane-count change that shows no sign of life for instance_timeout ends: a stopped `lanes set`
        keeps its session and the resize lock, and every relay would step back for ever."""
        if not self._control.is_open:
            return
        try:
            with self._control.use() as conn:
                ended = self.store.end_hung_resize(conn, self.settings.instance_timeout)
        except DatabaseUnavailable:
            return
        except DatabaseError as exc:  # not allowed to end another role's session: its idle timeout will
            log.debug("cannot end a hung lane-count change: %s", exc, extra={"action": "hung_resize"})
            return
        if ended:
            log.warning("the lane-count change under way showed no sign of life for %gs (a stopped `lanes set`?):"
                        " ended its session; carrying on with %d lanes", self.settings.instance_timeout, count,
                        extra={"action": "hung_resize"})

    def _release(self, workers: list[LaneWorker]) -> None:
        for worker in workers:
            if worker.owned:
                worker.release()

    def _heartbeat(self) -> None:
        """Show operators which lanes this instance owns and that it is alive (the lock is the truth)."""
        owned = [lane for lane, worker in self.workers.items() if worker.owned]
        if not owned or not self._control.is_open:
            return
        try:
            with self._control.use() as conn:
                self.store.heartbeat(conn, owned, self.settings.instance_name())
        except DatabaseUnavailable:
            pass  # forgotten: the next lane-management pass connects again

    def _read_membership(self) -> tuple[OutboxState, list[str]] | None:
        """(the outbox's state, live instances), or None while the database is away."""
        try:
            with self._control.use() as conn:
                state = self.store.outbox_state(conn)
                live = self.store.register_instance(conn, self.settings.instance_name(),
                                                    self.settings.instance_timeout)
            self._membership_seen = time.monotonic()
            return state, live
        except DatabaseUnavailable as exc:
            log.debug("database unavailable for lane management: %s", exc, extra={"action": "lanes"})
            return None

    def _announce_kafka_trouble(self) -> None:
        """Name the relay's Kafka trouble in its control session: `outbox-relay status` shows it per instance.

        The instances table knows each live instance's control session (backend_pid); its
        application_name carries the cause without a schema change (63 bytes at most).
        """
        trouble = ("Kafka unreachable" if not self.broker.up
                   else "Kafka below min.insync.replicas" if self.broker.replicas_problem else "")
        if not self._control.is_open:
            return  # the next lane-management pass connects; the pass after it names the session
        try:
            with self._control.use() as conn:
                if self._announced == (conn, trouble):
                    return
                self.store.name_session(conn, f"{CONTROL_SESSION}: {trouble}" if trouble else CONTROL_SESSION)
                self._announced = (conn, trouble)
        except DatabaseUnavailable:
            pass  # forgotten: the next lane-management pass connects again

    def _database_answers(self) -> bool:
        """Lane management reached the database lately (it tries every lane interval)."""
        return time.monotonic() - self._membership_seen <= max(3 * self.settings.lane_interval, 5.0)

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready: the database answers, and every owned lane has a producer (or it waits for lanes)."""
        problems = []
        if not self._database_answers():
            problems.append("database unreachable")
        elif not self._lanes_taken:
            problems.append("taking lanes")
        if not self.broker.up:
            problems.append(self.broker.problem)
        elif self.broker.replicas_problem:
            problems.append(self.broker.replicas_problem)
        stuck = [lane for lane, worker in self.workers.items() if worker.owned and not worker.ready]
        if stuck and self.broker.up and not self.broker.replicas_problem:
            problems.append(f"no Kafka producer for lanes {stuck}")
        if self.stopping.is_set():
            problems.append("stopping")
        return not problems, problems

    def _measure_backlog(self) -> None:
        started = time.monotonic()
        if started < self._backlog_due:
            self._measure_oldest()
            return
        try:
            with self._monitor.use() as conn:
                snap = monitor.snapshot(conn, hold=self.settings.failed_key_policy == "hold")
        except StatementCancelled as exc:  # before DatabaseUnavailable, a kind of which it is
            self._backlog_not_measured(exc, started)
            return
        except DatabaseUnavailable:
            return
        except DatabaseError as exc:
            self._backlog_not_measured(exc, started)
            return
        finally:
            self._backlog_due = started + (time.monotonic() - started) / BACKLOG_BUDGET
        self.metrics.observe_backlog(snap)

    def _measure_oldest(self) -> None:
        """Between measurements, the oldest claimable age (cheap): the alert on it must not read a value from
        minutes ago. Trouble goes unsaid here: the next measurement says it."""
        try:
            with self._monitor.use() as conn:
                age = monitor.oldest_claimable_age(conn, hold=self.settings.failed_key_policy == "hold")
        except DatabaseError:
            return
        self.metrics.observe_oldest(age)

    def _backlog_not_measured(self, exc: DatabaseError, started: float) -> None:
        """Said once per try: the gauges keep the last measurement's values until the next one."""
        wait = (time.monotonic() - started) / BACKLOG_BUDGET
        log.warning("backlog not measured: %s; the backlog gauges keep their last values until the next try in"
                    " %.0f s", exc, max(wait, self.settings.backlog_interval), extra={"action": "backlog"})

    def _retention(self) -> None:
        try:
            with connect(self.settings.database_url, "outbox-relay retention") as conn:
                deleted = delete_expired(conn, dt.timedelta(hours=self.settings.retention_hours))
                orphans, self._orphans_after = delete_orphans(conn, self._orphans_after)
        except DatabaseUnavailable:
            return
        if orphans:
            log.warning("retention removed %d unsent rows whose event was deleted by hand", orphans,
                        extra={"action": "retention", "count": orphans})
        if deleted:
            self.metrics.retention_deleted.inc(deleted)
            log.info("retention deleted %d sent or discarded events older than %gh", deleted,
                     self.settings.retention_hours, extra={"action": "retention", "count": deleted})

    def _worker(self, names: KafkaNames, scope: progress.Scope) -> LaneWorker:
        def new_publisher(transactional_id: str | None = None, progress_topic: str | None = None) -> LanePublisher:
            return LanePublisher.under(self.settings, transactional_id or names.transactional_id(scope.lane),
                                       progress_topic or names.progress_topic, scope, logger=self._kafka_logger,
                                       stopping=self.stopping)

        return LaneWorker(scope, names.transactional_id(scope.lane), self.settings, self.store, new_publisher,
                          self.metrics)

    def _tick(self, lane: int) -> None:
        worker = self.workers.get(lane)
        if worker is None or self.stopping.is_set():
            return
        delay = self.settings.poll_interval
        try:
            if not self.broker.up or self.broker.blocks(lane, worker.transactional_id):
                pass  # the probe reports it, once; the lane waits without timing out on its own
            elif worker.tick(self.stopping) or worker.woken:  # woken after its last claim: go again
                delay = 0
            else:
                delay = worker.next_poll()  # soon while it just published, else the poll interval
        except Exception:
            # A bug, not an outage; still never a tight loop of tracebacks.
            log.exception("tick of lane %d failed unexpectedly", lane, extra={"lane": lane, "action": "tick"})
            delay = self.settings.backoff_max
        if worker.owned and self.workers.get(lane) is worker:
            self._schedule(lane, delay)

    def _schedule(self, lane: int, delay: float) -> None:
        if self.stopping.is_set():
            return
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        # A tick schedules its successor just before it returns, so for a moment two instances of
        # the job exist; with max_instances=1 APScheduler would skip the new one and the lane would
        # stall. The worker's own lock is what keeps two ticks of a lane from ever overlapping.
        self.scheduler.add_job(self._tick, "date", run_date=when, args=[lane], id=f"lane-{lane}",
                               replace_existing=True, max_instances=2)

    def wake_all(self) -> None:
        """New events committed: every owned lane ticks now instead of at its next poll."""
        now = dt.datetime.now(dt.UTC)
        for lane, worker in list(self.workers.items()):
            if worker.owned and not self.stopping.is_set():
                worker.wake()  # a tick under way claims again; one that just ended is rescheduled at once
                try:
                    self.scheduler.modify_job(f"lane-{lane}", next_run_time=now)
                except JobLookupError:
                    pass  # ticking right now
