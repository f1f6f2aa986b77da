"""The test harness's promise, checked without services: a relay process that does not stop within its
shutdown bound is killed and reported, never left running into the next test (tests/relaytools.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.relaytools import RelayDidNotStop, RelayProcess, Relays, stop_every, wait_until

# Stand-ins for `outbox-relay run`: one stops on SIGTERM, one ignores it (a relay hung in a call).
OBEDIENT = "import time; print('ready', flush=True); time.sleep(60)"
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True);"
            " time.sleep(60)")


class StandIn(RelayProcess):
    def __init__(self, log_dir: Path, name: str, program: str) -> None:
        super().__init__("postgresql+psycopg://unused@127.0.0.1/unused", log_dir, name, OUTBOX_SHUTDOWN_TIMEOUT="0.5")
        self.command = [sys.executable, "-c", program]
        self.exit_grace = 0.5  # a bound of 1 s in all

    def start(self) -> StandIn:
        super().start()
        wait_until(lambda: "ready" in self.log(), 10, f"{self.name} to start")
        return self


def test_a_relay_that_stops_in_time_gives_its_exit_code(tmp_path: Path) -> None:
    relay = StandIn(tmp_path, "obedient", OBEDIENT).start()
    assert relay.stop() == -15 and not relay.alive


def test_a_relay_that_ignores_sigterm_is_killed_and_the_test_fails(tmp_path: Path) -> None:
    relay = StandIn(tmp_path, "stubborn", STUBBORN).start()
    started = time.monotonic()
    with pytest.raises(RelayDidNotStop, match=r"relay 'stubborn' did not exit within 1s of SIGTERM and was killed"):
        relay.stop()
    assert not relay.alive and time.monotonic() - started < 5
    assert relay.process is not None and relay.process.returncode == -9


def test_stopping_many_stops_every_one_and_names_those_that_overran(tmp_path: Path) -> None:
    relays = [StandIn(tmp_path, name, program).start()
              for name, program in (("a", OBEDIENT), ("b", STUBBORN), ("c", STUBBORN), ("d", STUBBORN))]
    started = time.monotonic()
    problems = stop_every(relays)
    assert not any(relay.alive for relay in relays)
    # One bound (1 s) for all, not one after the other (3 s): a teardown of hung relays stays short.
    assert time.monotonic() - started < 2.5
    assert [problem.split("'")[1] for problem in problems] == ["b", "c", "d"]


def test_the_fixture_object_raises_once_for_all_that_overran(tmp_path: Path) -> None:
    pool = Relays(tmp_path)
    stubborn = StandIn(tmp_path, "stubborn", STUBBORN).start()
    obedient = StandIn(tmp_path, "obedient", OBEDIENT).start()
    pool.started += [stubborn, obedient]
    with pytest.raises(RelayDidNotStop, match="'stubborn'") as raised:
        pool.stop_all()
    assert "'obedient'" not in str(raised.value)
    assert not stubborn.alive and not obedient.alive
    pool.stop_all()  # nothing left to stop: no error
