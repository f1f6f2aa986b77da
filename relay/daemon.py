"""The relay daemon: APScheduler decides when each lane ticks; lanes do the work.

Jobs:
- ``lanes`` (every ``lane_interval``): register, take this instance's share of the lanes, heartbeat.
- ``lane-N`` (one per owned lane): one tick, then the job re-schedules itself: at once while a
  full batch came back (drain) or a commit was announced, after ``poll_interval`` when idle.
  A lane never ticks twice at once.
- ``backlog`` (every ``backlog_interval``): measure the backlog for metrics and the status page.
- ``retention`` (every ``retention_interval``): delete old sent and discarded events in small batches.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import psycopg
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from outbox_relay import monitor, operations
from outbox_relay.backoff import CircuitBreaker
from outbox_relay.config import Settings
from outbox_relay.lane import LaneWorker
from outbox_relay.metrics import Metrics
from outbox_relay.publisher import LanePublisher, validate_config
from outbox_relay.store import Store, connect
from outbox_relay.wakeups import CommitListener
from outbox_relay.web import StatusServer

log = logging.getLogger(__name__)


def new_lane_publisher(settings: Settings, lane: int, lane_count: int, logger: Any = None) -> LanePublisher:
    return LanePublisher(settings.producer_config(), settings.transactional_id(lane), lane=lane,
                         lane_count=lane_count, progress_topic=settings.progress_topic_name(),
                         operation_timeout=settings.kafka_timeout, logger=logger)


class _LibrdkafkaLogger:
    """Routes librdkafka's own log lines into Python logging (never printed raw)."""

    def __init__(self) -> None:
        self._log = logging.getLogger("outbox_relay.librdkafka")

    def log(self, level: int, message: str, *args: Any) -> None:
        # `level` is a Python level (ERROR for each refused connection, per client and attempt). The relay
        # reports Kafka trouble itself, once (circuit breaker), so librdkafka's own lines are detail.
        self._log.debug(message, *args)


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(hold_failed_keys=settings.failed_key_policy == "hold")
        self.stopping = threading.Event()
        self._stopped = threading.Event()
        self._woken: set[int] = set()  # lanes notified while their tick was running
        self.workers: dict[int, LaneWorker] = {}
        self.lane_count: int | None = None
        self._control: psycopg.Connection[Any] | None = None
        self._monitor: psycopg.Connection[Any] | None = None
        self._membership_seen = 0.0  # monotonic time the database last answered lane management
        self._kafka_logger = _LibrdkafkaLogger()
        self.metrics = Metrics()
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
        validate_config({**self.settings.producer_config(), "logger": self._kafka_logger},
                        self.settings.transactional_id(0))
        now = dt.datetime.now(dt.UTC)
        self.scheduler.add_job(self._manage_lanes, "interval", seconds=self.settings.lane_interval,
                               id="lanes", next_run_time=now)
        self.scheduler.add_job(self._measure_backlog, "interval", seconds=self.settings.backlog_interval,
                               id="backlog", next_run_time=now)
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

    def stop(self) -> None:
        """Finish the ticks in flight (each ends its transaction), release every lane."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("stopping: finishing transactions in flight", extra={"action": "stop"})
        self.scheduler.shutdown(wait=True)
        for worker in self.workers.values():
            worker.release()
        if self.http is not None:
            self.http.stop()
        if self._control is not None and not self._control.closed:
            try:
                self.store.deregister_instance(self._control, self.settings.instance_name())
            except psycopg.Error:
                pass
            self._control.close()
        log.info("stopped", extra={"action": "stopped"})

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
        self.stop()
        timer.cancel()
        self._stopped.set()

    def _give_up(self) -> None:
        log.error("shutdown took longer than %.0fs: exiting", self.settings.shutdown_timeout,
                  extra={"action": "abort"})
        os._exit(1)

    # --- jobs -----------------------------------------------------------------------------

    def _manage_lanes(self) -> None:
        """Register, then hold this instance's fair share of the lanes: ceil(lanes / live instances)."""
        if self.stopping.is_set():
            return
        view = self._read_membership()
        if view is None:
            return
        count, resizing, live = view
        if resizing:
            if any(worker.owned for worker in self.workers.values()):
                log.warning("the lane count is being changed: releasing every lane until it is done",
                            extra={"action": "resize_wait"})
            self._release(list(self.workers.values()))
            return
        if count != self.lane_count:
            if self.lane_count is not None:
                log.warning("lane count changed from %d to %d: re-taking lanes", self.lane_count, count,
                            extra={"action": "lanes_changed"})
            self._release(list(self.workers.values()))
            self.workers = {lane: self._worker(lane, count) for lane in range(count)}
            self.lane_count = count
        me = self.settings.instance_name()
        members = live if me in live else sorted([*live, me])
        share = -(-count // len(members))
        rank = members.index(me)
        # Prefer lanes spread by rank, so instances converge on disjoint sets without negotiating.
        preferred = sorted(self.workers, key=lambda lane: (lane % len(members) != rank, lane))
        owned = [lane for lane in preferred if self.workers[lane].owned]
        if len(owned) > share:
            self._release([self.workers[lane] for lane in owned[share:]])
        for lane in preferred:
            if sum(worker.owned for worker in self.workers.values()) >= share:
                break
            worker = self.workers[lane]
            if not worker.owned and worker.try_acquire():
                self._schedule(lane, 0)
        # Safety net: an owned lane always has its next tick scheduled or running.
        for lane, worker in self.workers.items():
            if worker.owned and not worker.ticking and self.scheduler.get_job(f"lane-{lane}") is None:
                self._schedule(lane, self.settings.poll_interval)
        self._heartbeat()

    def _release(self, workers: list[LaneWorker]) -> None:
        for worker in workers:
            if worker.owned:
                worker.release()

    def _heartbeat(self) -> None:
        """Show operators which lanes this instance owns and that it is alive (the lock is the truth)."""
        owned = [lane for lane, worker in self.workers.items() if worker.owned]
        if not owned or self._control is None:
            return
        try:
            self.store.heartbeat(self._control, owned, self.settings.instance_name())
        except psycopg.OperationalError:
            self._control.close()
            self._control = None

    def _read_membership(self) -> tuple[int, bool, list[str]] | None:
        """(lane count, resize under way, live instances), or None while the database is away."""
        try:
            if self._control is None or self._control.closed:
                self._control = connect(self.settings.database_url, "outbox-relay control")
            count, resizing = self.store.lane_settings(self._control)
            live = self.store.register_instance(self._control, self.settings.instance_name(),
                                                self.settings.instance_timeout)
            self._membership_seen = time.monotonic()
            return count, resizing, live
        except psycopg.OperationalError as exc:
            if self._control is not None:
                self._control.close()
            self._control = None
            log.debug("database unavailable for lane management: %s", exc, extra={"action": "lanes"})
            return None

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready: the database answers, and every owned lane has a producer (or it waits for lanes)."""
        problems = []
        if time.monotonic() - self._membership_seen > max(3 * self.settings.lane_interval, 5.0):
            problems.append("database unreachable")
        stuck = [lane for lane, worker in self.workers.items() if worker.owned and not worker.ready]
        if stuck:
            problems.append(f"no Kafka producer for lanes {stuck}")
        if self.stopping.is_set():
            problems.append("stopping")
        return not problems, problems

    def _measure_backlog(self) -> None:
        try:
            if self._monitor is None or self._monitor.closed:
                self._monitor = connect(self.settings.database_url, "outbox-relay monitor")
            self.metrics.observe_backlog(monitor.snapshot(self._monitor))
        except psycopg.OperationalError:
            if self._monitor is not None:
                self._monitor.close()
            self._monitor = None

    def _retention(self) -> None:
        try:
            with connect(self.settings.database_url, "outbox-relay retention") as conn:
                deleted = operations.delete_expired(conn, dt.timedelta(hours=self.settings.retention_hours))
        except psycopg.OperationalError:
            return
        if deleted:
            self.metrics.retention_deleted.inc(deleted)
            log.info("retention deleted %d sent or discarded events older than %gh", deleted,
                     self.settings.retention_hours, extra={"action": "retention", "count": deleted})

    def _worker(self, lane: int, count: int) -> LaneWorker:
        def new_publisher() -> LanePublisher:
            return new_lane_publisher(self.settings, lane, count, logger=self._kafka_logger)

        return LaneWorker(lane, count, self.settings, self.store, new_publisher, self.metrics)

    def _tick(self, lane: int) -> None:
        worker = self.workers.get(lane)
        if worker is None or self.stopping.is_set():
            return
        delay = self.settings.poll_interval
        self._woken.discard(lane)
        try:
            if worker.tick(self.stopping) or lane in self._woken:
                delay = 0
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
                try:
                    self.scheduler.modify_job(f"lane-{lane}", next_run_time=now)
                except JobLookupError:
                    # Ticking right now, maybe past its last claim: have it go again at once.
                    self._woken.add(lane)
