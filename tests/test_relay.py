"""The relay daemon against the real broker and database (issue: the relay daemon)."""

from __future__ import annotations

import datetime as dt
import threading
import time

from sqlalchemy import Engine, text

from outbox_relay import enqueue
from outbox_relay.db.connection import connect, listen, notifications
from outbox_relay.db.names import ENQUEUE_TRIGGER, EVENTS_TABLE, NOTIFY_TRIGGER, SCHEMA
from outbox_relay.models import IDLE_LANES_TABLE
from tests import kafkatools
from tests.relaytools import Relays, Writers, cli, ledger, pending, set_lane_count, states, wait_until


def test_committed_events_arrive_once_in_key_order_and_rolled_back_ones_never(
    engine: Engine, database_url: str, topic: str, relays: Relays
) -> None:
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=50, OUTBOX_LISTEN="off")
    with Writers(engine, topic, threads=4, limit=800) as writers:
        wait_until(writers.done, 120, "writers to finish")
    wait_until(lambda: pending(engine) == 0, 60, "the relay to drain")
    assert relay.stop() == 0, relay.log()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()
    assert report.received == len(writers.committed) >= 800
    assert states(engine) == {"sent": len(writers.committed)}
    received_ids = {m for m in writers.committed}
    assert not received_ids & set(writers.rolled_back) and writers.rolled_back
    # A tick schedules the next one as it ends; the scheduler must never drop it (a stalled lane).
    assert "skipped: maximum number of running instances" not in relay.log()


def test_headers_carry_the_event_id_and_the_rows_own_headers(engine: Engine, database_url: str, topic: str,
                                                             relays: Relays) -> None:
    with engine.begin() as conn:
        event_id = enqueue(conn, topic, "text", key="k", headers=[("a", b"\x00"), ("a", b"2")], partition=2)
    relay = relays.start(database_url)
    (message,) = kafkatools.consume([topic], expected=1, quiet=0.5)
    relay.stop()
    assert (message.key, message.value, message.partition) == (b"k", b"text", 2)
    assert message.headers == [("a", b"\x00"), ("a", b"2"), ("content-type", b"text/plain; charset=utf-8"),
                               ("outbox-event-id", str(event_id).encode())]


def test_delayed_events_are_not_published_before_available_at(engine: Engine, database_url: str, topic: str,
                                                              relays: Relays) -> None:
    relay = relays.start(database_url)
    # Only once the relay runs: a start slower than the delay (a loaded machine) would send both at once.
    wait_until(lambda: "took lane 0" in relay.log(), 30, "the relay to take the lane")
    with engine.begin() as conn:
        enqueue(conn, topic, b"later", key="k1", delay=dt.timedelta(seconds=4))
        enqueue(conn, topic, b"now", key="k2")
        written = dt.datetime.now(dt.UTC)
    (first,) = kafkatools.consume([topic], expected=1, quiet=1.0, timeout=20)
    assert first.value == b"now"
    assert states(engine) == {"sent": 1, "pending": 1}
    wait_until(lambda: pending(engine) == 0, 20, "the delayed event")
    published = dt.datetime.now(dt.UTC)
    relay.stop()
    assert published - written >= dt.timedelta(seconds=4)
    assert sorted(m.value for m in kafkatools.consume([topic], expected=2, quiet=0.5)) == [b"later", b"now"]


def test_graceful_shutdown_under_load_loses_nothing(engine: Engine, database_url: str, topic: str,
                                                   relays: Relays) -> None:
    with engine.begin() as conn:
        for n in range(3000):
            enqueue(conn, topic, {"n": n}, key=f"k{n % 17}")
    relay = relays.start(database_url, OUTBOX_BATCH_SIZE=20)
    wait_until(lambda: states(engine).get("sent", 0) >= 200, 60, "publishing to start")
    started = time.monotonic()
    assert relay.stop(timeout=30) == 0, relay.log()
    assert time.monotonic() - started < 10
    left = pending(engine)
    assert left > 0, "the relay finished before the signal; the test proved nothing"
    # Whatever was marked sent is in Kafka exactly once; the rest is still pending, not lost.
    partial = ledger(engine, [topic], quiet=1.0, expect_all_sent=False)
    assert partial.ok, partial.summary()
    second = relays.start(database_url, "second")
    wait_until(lambda: pending(engine) == 0, 60, "the second relay to drain")
    second.stop()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()
    assert "released lane 0" in relay.log()


def _commit_to_sent(engine: Engine, database_url: str, topic: str, relays: Relays, listen: str,
                    poll_interval: float) -> float:
    """The median time from commit to sent over 5 events, each waited for (60 s at most)."""
    relay = relays.start(database_url, f"listen-{listen}", OUTBOX_LISTEN=listen,
                         OUTBOX_POLL_INTERVAL=str(poll_interval))
    wait_until(lambda: "took lane 0" in relay.log(), 30, "the relay to take the lane")
    time.sleep(1)  # its first tick found nothing: the next poll is poll_interval away
    latencies = []
    for n in range(5):
        with engine.begin() as conn:
            enqueue(conn, topic, {"n": n}, key="k")
        committed = time.monotonic()
        wait_until(lambda: pending(engine) == 0, 60, "the event to be sent", poll=0.005)
        latencies.append(time.monotonic() - committed)
        time.sleep(0.3)
    relay.stop()
    return sorted(latencies)[len(latencies) // 2]


def test_listen_notify_wakes_the_relay_at_commit_and_polling_remains(engine: Engine, database_url: str,
                                                                     topic: str, relays: Relays) -> None:
    # With a 10-minute poll interval, an event sent within the 60 s each wait allows was sent because
    # its commit woke the relay: no timing assumption about a busy machine.
    woken = _commit_to_sent(engine, database_url, topic, relays, "on", poll_interval=600)
    # Without wake-ups, polling alone still sends every event.
    polled = _commit_to_sent(engine, database_url, topic, relays, "off", poll_interval=2)
    print(f"\nmedian commit-to-sent: NOTIFY (10 min poll interval) {woken * 1000:.0f} ms,"
          f" polling every 2 s {polled * 1000:.0f} ms")
    assert len(kafkatools.consume([topic], expected=10, quiet=0.5)) == 10


def _notified_by_one_commit(engine: Engine, database_url: str, topic: str) -> bool:
    """Whether committing one event sent a notification on the outbox's channel within a second."""
    with connect(database_url, "test listener") as listener:
        listen(listener)
        with engine.begin() as conn:
            enqueue(conn, topic, {"probe": True}, key="probe")
        return any(True for _ in notifications(listener, timeout=1.0))


def test_wake_ups_turned_off_in_the_database_writers_do_not_notify_and_polling_sends(
        engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    # The README's switch for write-heavy databases: a notifying commit holds an instance-wide lock
    # until it is durable (bench/write_overhead.py measures the cost). Without the trigger, commits
    # notify nobody and the relay (still listening) sends by polling alone.
    with engine.begin() as conn:
        conn.execute(text(f'INSERT INTO "{SCHEMA}"."{IDLE_LANES_TABLE}" (lane) VALUES (0)'))  # a lane asleep
    assert _notified_by_one_commit(engine, database_url, topic)
    with engine.begin() as conn:
        conn.execute(text(f'ALTER TABLE "{SCHEMA}"."{EVENTS_TABLE}" DISABLE TRIGGER "{NOTIFY_TRIGGER}"'))
    try:
        assert not _notified_by_one_commit(engine, database_url, topic)
        polled = _commit_to_sent(engine, database_url, topic, relays, "on", poll_interval=1)
        print(f"\nmedian commit-to-sent with wake-ups off in the database, polling every 1 s: {polled * 1000:.0f} ms")
        # The relay, told to listen, said at start why no commit will wake it.
        assert f"trigger {NOTIFY_TRIGGER} on {SCHEMA}.{EVENTS_TABLE} is disabled" in relays.started[-1].log()
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'ALTER TABLE "{SCHEMA}"."{EVENTS_TABLE}" ENABLE TRIGGER "{NOTIFY_TRIGGER}"'))
    with engine.begin() as conn:
        conn.execute(text(f'INSERT INTO "{SCHEMA}"."{IDLE_LANES_TABLE}" (lane) VALUES (0) ON CONFLICT DO NOTHING'))
    assert _notified_by_one_commit(engine, database_url, topic)  # its event stays unsent: the relay has stopped
    assert len(kafkatools.consume([topic], expected=7, quiet=0.5)) == 7


def test_a_relay_says_at_start_that_events_written_with_the_enqueue_trigger_disabled_are_never_published(
        engine: Engine, database_url: str, relays: Relays) -> None:
    with engine.begin() as conn:
        conn.execute(text(f'ALTER TABLE "{SCHEMA}"."{EVENTS_TABLE}" DISABLE TRIGGER "{ENQUEUE_TRIGGER}"'))
    try:
        relay = relays.start(database_url, "enqueue-disabled")
        wait_until(lambda: "took lane 0" in relay.log(), 30, "the relay to take the lane")
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'ALTER TABLE "{SCHEMA}"."{EVENTS_TABLE}" ENABLE TRIGGER "{ENQUEUE_TRIGGER}"'))
    line = next(line for line in relay.log().splitlines() if f"trigger {ENQUEUE_TRIGGER}" in line)
    assert "ERROR" in line and "never published" in line
    relay.stop()


def test_commits_notify_only_while_a_lane_sleeps(engine: Engine, database_url: str, topic: str,
                                                 relays: Relays) -> None:
    """A notifying commit holds an instance-wide lock until it is durable: while the relay keeps up
    (publishing, or claiming on its own just after), writers must not pay it."""
    def idle_lanes() -> set[int]:
        with engine.begin() as conn:
            return {row[0] for row in conn.execute(text(f'SELECT lane FROM "{SCHEMA}"."{IDLE_LANES_TABLE}"'))}

    assert not _notified_by_one_commit(engine, database_url, topic)  # no relay, no lane asleep: nobody to wake
    # With a 10-minute poll interval, only a notification can get an event out of a sleeping lane.
    relay = relays.start(database_url, "on-demand", OUTBOX_POLL_INTERVAL="600")
    wait_until(lambda: idle_lanes() == {0}, 30, "the idle lane to sleep")
    assert _notified_by_one_commit(engine, database_url, topic)
    wait_until(lambda: pending(engine) == 0, 60, "the sleeping lane to be woken")
    # Writers committing every 10 ms keep the lane awake: it claims on its own and leaves the table.
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            with engine.begin() as conn:
                enqueue(conn, topic, {"steady": True}, key="k")
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(lambda: idle_lanes() == set(), 30, "the busy lane to leave the idle lanes")
        # ...and its own claims (not the 10-minute poll) send what the writers commit meanwhile.
        wait_until(lambda: pending(engine) < 5, 60, "the awake lane to keep up")
    finally:
        stop.set()
        writer.join()
    wait_until(lambda: pending(engine) == 0 and idle_lanes() == {0}, 60, "the lane to drain and sleep again")
    relay.stop()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()


def test_a_lane_count_change_forgets_lanes_that_died_asleep(engine: Engine, database_url: str, topic: str,
                                                           relays: Relays) -> None:
    """A relay killed while its lanes slept leaves their rows: every commit notifies for nobody until a
    relay takes those lanes again, and lanes beyond a smaller count are never taken again."""
    def idle_lanes() -> set[int]:
        with engine.begin() as conn:
            return {row[0] for row in conn.execute(text(f'SELECT lane FROM "{SCHEMA}"."{IDLE_LANES_TABLE}"'))}

    set_lane_count(engine, 4)
    relay = relays.start(database_url, "dies-asleep", OUTBOX_POLL_INTERVAL="600")
    wait_until(lambda: idle_lanes() == {0, 1, 2, 3}, 30, "the idle lanes to sleep")
    relay.kill()
    assert _notified_by_one_commit(engine, database_url, topic)
    result = cli(database_url, "lanes", "set", "2")
    assert result.returncode == 0, result.stderr
    assert idle_lanes() == set()
    assert not _notified_by_one_commit(engine, database_url, topic)  # no relay runs: nobody to wake
    relay = relays.start(database_url, "after", OUTBOX_POLL_INTERVAL="600")
    wait_until(lambda: pending(engine) == 0 and idle_lanes() == {0, 1}, 60, "the two lanes to drain and sleep")
    relay.stop()
    report = ledger(engine, [topic])
    assert report.ok, report.summary()


def test_a_transaction_open_while_its_lane_fell_asleep_is_found_by_the_second_look(
        engine: Engine, database_url: str, topic: str, relays: Relays) -> None:
    # The trigger decides when the event is written, so a transaction that wrote its event while the
    # lane was awake, and commits once the lane sleeps, notifies nobody. The lane looks again at once
    # and once more 50 ms later; with a 10-minute poll interval nothing else could send the event.
    def asleep() -> bool:
        with engine.begin() as conn:
            return bool(conn.execute(text(f'SELECT count(*) FROM "{SCHEMA}"."{IDLE_LANES_TABLE}"')).scalar_one() == 1)

    relay = relays.start(database_url, "second-look", OUTBOX_POLL_INTERVAL="600")
    wait_until(asleep, 30, "the idle lane to sleep")
    with engine.begin() as conn:
        enqueue(conn, topic, {"n": "wakes the lane"}, key="k")
    wait_until(lambda: not asleep(), 30, "the lane to wake", poll=0.002)
    with engine.connect() as conn, conn.begin():
        enqueue(conn, topic, {"n": "written while the lane is awake"}, key="k")  # no lane asleep: no notify
        wait_until(asleep, 30, "the lane to fall asleep again", poll=0.002)
    # Committed now, after the lane's first look.
    wait_until(lambda: pending(engine) == 0, 60, "the second look to find the event")
    relay.stop()
    assert len(kafkatools.consume([topic], expected=2, quiet=0.5)) == 2
