"""`outbox-relay lanes set N`: change the lane count without two counts ever being live at once.

0. Take the resize lock; build the new count's lane index while relays keep publishing (CREATE INDEX
   CONCURRENTLY).
1. Announce the new count (``resize_to``): relays release their lanes.
2. Take every lane's lock, so no relay publishes with the old count.
3. Settle each lane in Kafka: fence its producer, mark what its last transaction carried.
4. Give the progress topic a partition per new lane, forget lanes that died asleep, store the count,
   drop every other count's lane index; let go.
If this dies half-way, its connection (and the resize lock) goes with it and relays carry on
with the old count; running the command again finishes the change. If it hangs (stopped, frozen), PostgreSQL
ends its session once it has been idle for OUTBOX_INSTANCE_TIMEOUT (and relays of its role do too): the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator

from outbox_relay import faults, progress
from outbox_relay.config import Settings
from outbox_relay.db.connection import Connection, connect, translated
from outbox_relay.db.lanes import Store
from outbox_relay.db.names import lane_index_name
from outbox_relay.errors import ConfigurationError, DatabaseError, DatabaseUnavailable, OutboxError
from outbox_relay.progress import LibrdkafkaLogger
from outbox_relay.publisher import LanePublisher
from outbox_relay.recovery import take_over

log = logging.getLogger(__name__)


def check_lane_count(lanes: int) -> None:
    if not 1 <= lanes <= 1024:
        raise ConfigurationError(f"the lane count must be between 1 and 1024, got {lanes}")


def resize(settings: Settings, lanes: int, *, timeout: float = 120.0) -> tuple[int, int]:
    """Change the lane count; returns (old count, events recovered while settling the lanes)."""
    check_lane_count(lanes)
    store = Store()
    with connect(settings.database_url, "outbox-relay lanes") as conn:
        # Hung (stopped, frozen), this process would keep its session and so its locks: PostgreSQL ends the
        # session after OUTBOX_INSTANCE_TIMEOUT idle; alive, it runs a statement every second (_showing_life).
        store.end_session_when_idle(conn, settings.instance_timeout)
        # The lock first: a second change could otherwise see this one's build under way, wait behind it in
        # CREATE INDEX, keep what a stopped build left (IF NOT EXISTS) and switch to an INVALID index, or
        # build an index this one then drops. Relays do not step back until the announce.
        _lock_resize(settings, store, conn)
        with _showing_life(store, conn):
            with _lost(f"the change to {lanes} lanes was abandoned", "the lane count is unchanged: run"
                       f" `outbox-relay lanes set {lanes}` again"):
                faults.hit("resize_locked")
                if store.create_lane_index(conn, lanes):
                    log.warning("rebuilt the lane index for %d lanes: an earlier change to %d stopped while"
                                " building it and left it invalid", lanes, lanes,
                                extra={"action": "resize_invalid_index"})
                store.announce_resize(conn, lanes)
                current, recovered = _settle(settings, store, conn, lanes, timeout)
            with _lost(f"the lane count is now {lanes} (was {current})", "the next `outbox-relay lanes set`"
                       " drops the lane indexes of other counts this one could not"):
                for lane in range(current):
                    store.release_lane_lock(conn, lane)
                faults.hit("resize_finished")
                # Still under the lock, so no other change is building one of these.
                leftovers = [name for name in store.drop_lane_indexes_except(conn, lanes)
                             if name != lane_index_name(current)]
                if leftovers:
                    log.info("dropped lane indexes that an earlier change, stopped, left behind: %s",
                             ", ".join(leftovers), extra={"action": "resize_leftover_index"})
                store.unlock_resize(conn)
    log.info("lane count is now %d (was %d)", lanes, current, extra={"action": "resize_done"})
    return current, recovered


def _lock_resize(settings: Settings, store: Store, conn: Connection) -> None:
    """The resize lock. Its holder may be a `lanes set` stopped before its announce, which no relay ends (they
    carry on): wait up to OUTBOX_INSTANCE_TIMEOUT for it to show a sign of life, and end its session if not."""
    deadline = time.monotonic() + settings.instance_timeout + 2  # a live one shows life every second
    while not store.lock_resize(conn):
        if store.end_hung_resize(conn, settings.instance_timeout):
            log.warning("the lane-count change holding the lock showed no sign of life for %gs (a stopped"
                        " `lanes set`?): ended its session", settings.instance_timeout,
                        extra={"action": "hung_resize"})
        elif time.monotonic() > deadline:
            raise OutboxError("another lane-count change is under way; try again when it is done")
        time.sleep(0.2)


def _settle(settings: Settings, store: Store, conn: Connection, lanes: int, timeout: float) -> tuple[int, int]:
    """Steps 1 to 4 under the resize lock, up to the new count stored; returns (old count, recovered)."""
    state = store.outbox_state(conn)
    current, names = state.lane_count, settings.kafka_names(state.outbox_id, state.database)
    log.info("changing the lane count from %d to %d: waiting for relays to release their lanes",
             current, lanes, extra={"action": "resize_start"})
    faults.hit("resize_announced")
    waiting = set(range(current))
    deadline = time.monotonic() + timeout
    while waiting:
        waiting = {lane for lane in waiting if not store.try_lock_lane(conn, lane)}
        if waiting and time.monotonic() > deadline:
            raise OutboxError(f"lanes {sorted(waiting)} were not released within {timeout:.0f}s; "
                              "is a relay of an older version running? Nothing was changed")
        if waiting:
            time.sleep(0.2)
    faults.hit("resize_lanes_locked")
    recovered = 0
    for lane in range(current):
        scope = progress.Scope(state.outbox_id, lane, current)
        publisher = LanePublisher.for_lane(settings, names, scope, logger=LibrdkafkaLogger(quiet=True))
        try:
            recovered += take_over(store, conn, scope, publisher, functools.partial(
                LanePublisher.under, settings, scope=scope, logger=LibrdkafkaLogger(quiet=True)))
        finally:
            publisher.close()
    store.forget_kafka_names(conn)  # every lane settled: the next owners start from nothing, under the new count
    progress.ensure_topic(settings.producer_config(), names.progress_topic, lanes)
    _forget_sleepers(store, conn)
    faults.hit("resize_settled")
    store.finish_resize(conn, lanes)
    return current, recovered


@contextlib.contextmanager
def _showing_life(store: Store, conn: Connection, every: float = 1.0) -> Iterator[None]:
    """A statement every second while this process lives, also while it waits on Kafka: relays end the
    session of a change that shows no sign of life (``Store.end_hung_resize``)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                store.show_life(conn)
            except DatabaseError:  # Store translates psycopg errors
                if conn.closed:  # the session is gone: the main thread finds out at its next statement
                    return

    thread = threading.Thread(target=beat, name="resize-life", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def _lost(outcome: str, advice: str) -> Iterator[None]:
    """The session lost (PostgreSQL went away, or ended a hung change): say where that left the change."""
    try:
        with translated("lanes set"):
            yield
    except DatabaseUnavailable as exc:
        raise OutboxError(
            f"{outcome}: its database session was lost (PostgreSQL went away, or ended it after"
            f" OUTBOX_INSTANCE_TIMEOUT without a sign of life: was this process stopped?); {advice}") from exc


def _forget_sleepers(store: Store, conn: Connection) -> None:
    try:
        store.forget_sleepers(conn)
    except DatabaseUnavailable:
        raise
    except DatabaseError as exc:  # a role granted before 0011: only wake-ups cost more, the count still changes
        log.warning("cannot clear the idle lanes table (%s): grant what docs/least-privilege.sql grants", exc,
                    extra={"action": "resize_idle_lanes"})
