"""The `relays` fixture and the safety net under it (tests/conftest.py), run in an inner pytest session
with stand-in processes: whatever a test does, no relay outlives it, and an overrun fails loudly."""

from __future__ import annotations

import pytest

from tests.relaytools import ROOT

pytest_plugins = ["pytester"]

INNER = '''
import os

import pytest

from tests.relaytools import STARTED
from tests.unit.test_relay_processes import OBEDIENT, STUBBORN, StandIn

PIDS = []


def started(relays, name, program):
    relay = StandIn(relays.log_dir, name, program).start()
    relays.started.append(relay)
    PIDS.append(relay.pid)


def test_fails_while_a_relay_runs(relays):
    started(relays, "running", OBEDIENT)
    raise AssertionError("the test's own failure")


def test_relay_ignores_sigterm(relays):
    started(relays, "stubborn", STUBBORN)


def test_relay_started_without_the_fixture(tmp_path):
    PIDS.append(StandIn(tmp_path, "stray", OBEDIENT).start().pid)


def test_nothing_left():
    assert len(PIDS) == 3
    for pid in PIDS:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and reaped
    assert not STARTED
'''


def test_no_relay_outlives_its_test_and_overruns_fail_loudly(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, errors=2)
    output = result.stdout.str()
    assert "AssertionError: the test's own failure" in output
    assert "ERROR at teardown of test_fails_while_a_relay_runs" not in output  # stopped, nothing more to say
    assert "relay 'stubborn' did not exit within 1s of SIGTERM and was killed" in output
    assert "relays left running by the test: ['stray']" in output

