"""The bench's watchdog: a dead relay ends a measurement at once, with its last log lines (no services)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.relaytools import ROOT


def _watchdog():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_watchdog", ROOT / "bench" / "watchdog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_watchdog"] = module
    spec.loader.exec_module(module)
    return module


class Child:
    """A real child process with a log file, like the bench's relays."""

    def __init__(self, tmp_path: Path, code: str, name: str = "relay-drain-1-0") -> None:
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()


def test_a_relay_that_dies_ends_the_wait_with_its_last_log_lines(tmp_path: Path) -> None:
    watchdog = _watchdog()
    dying = Child(tmp_path, "import sys; [print(f'line {n}') for n in range(50)];"
                            " print('FATAL: lost the database'); sys.exit(3)")
    healthy = Child(tmp_path, "import time; time.sleep(30)", name="relay-drain-1-1")
    try:
        started = time.monotonic()
        with pytest.raises(watchdog.ProcessDied) as raised:
            watchdog.wait_until(lambda: False, [healthy, dying], poll=0.05)  # the backlog never drains
        message = str(raised.value)
        assert time.monotonic() - started < 20  # the bound of the test, not a timing claim: it did not hang
        assert message.startswith("relay-drain-1-0 died during the measurement")
        assert "FATAL: lost the database" in message
        assert "line 49" in message and "line 10\n" not in message  # the last lines, not the whole log
    finally:
        healthy.process.kill()
        healthy.process.wait()


def test_relays_alive_but_idle_give_an_error_with_each_ones_last_log_lines(tmp_path: Path) -> None:
    """A relay that lives but fails every batch published nothing: the latency run had no figure to give and
    stopped with a StatisticsError traceback. Now one error names what did not happen and shows the logs."""
    watchdog = _watchdog()
    failing = Child(tmp_path, "[print(f'line {n}') for n in range(50)]; print('ERROR: lane 0: tick failed')")
    quiet = Child(tmp_path, "pass", name="relay-latency-1000-on-1")
    failing.process.wait()
    quiet.process.wait()
    error = watchdog.stalled([failing, quiet], "none of 10 events reached the consumer")
    assert isinstance(error, watchdog.MeasurementFailed)
    message = str(error)
    assert message.startswith("none of 10 events reached the consumer; the last lines of their logs:")
    assert "--- relay-drain-1-0:\n" in message and "ERROR: lane 0: tick failed" in message
    assert "line 49" in message and "line 10\n" not in message
    assert message.endswith("--- relay-latency-1000-on-1:\n(empty log)")


def test_the_wait_returns_when_done_and_everyone_lives(tmp_path: Path) -> None:
    watchdog = _watchdog()
    healthy = Child(tmp_path, "import time; time.sleep(30)")
    polls = iter(range(100))
    try:
        waited = watchdog.wait_until(lambda: next(polls) >= 3, [healthy], poll=0.01)
        assert waited >= 0
    finally:
        healthy.process.kill()
        healthy.process.wait()


def test_cpu_of_a_process_tree_includes_its_reaped_children() -> None:
    watchdog = _watchdog()
    before = watchdog.tree_cpu_seconds(os.getpid())
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert watchdog.tree_cpu_seconds(os.getpid()) > before
    assert watchdog.peak_rss_mib(os.getpid()) > 1
