"""The bench's process bookkeeping: stop at once when a process it started dies, and what each one cost.

A drain or latency run waits for a condition (the backlog gone, every event seen). `wait_until` checks
the processes it depends on at every poll, so a relay (or Kafka Connect) that dies ends the run within
one poll with its last log lines, instead of leaving the bench waiting forever.
Standard library only, so the fast tier tests it without services.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

TICKS = os.sysconf("SC_CLK_TCK")


class Watched(Protocol):
    name: str

    @property
    def alive(self) -> bool: ...

    def log(self) -> str: ...


class MeasurementFailed(RuntimeError):
    """A process the bench depends on failed it: the message says which, with its last log lines."""


class ProcessDied(MeasurementFailed):
    """A process the bench depends on exited during a measurement."""


class ProcessStalled(MeasurementFailed):
    """Processes the bench depends on live but did nothing of what was measured (no event came through)."""


def last_lines(text: str, count: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])


def stalled(processes: Iterable[Watched], what: str) -> ProcessStalled:
    """The error for processes alive but idle: `what` did not happen; each one's last log lines."""
    logs = "\n".join(f"--- {process.name}:\n{last_lines(process.log()) or '(empty log)'}" for process in processes)
    return ProcessStalled(f"{what}; the last lines of their logs:\n{logs}")


def check_alive(processes: Iterable[Watched]) -> None:
    for process in processes:
        if not process.alive:
            raise ProcessDied(f"{process.name} died during the measurement; the last lines of its log:\n"
                              f"{last_lines(process.log())}")


def wait_until(done: Callable[[], bool], processes: Iterable[Watched], *, poll: float = 0.2,
               timeout: float | None = None, what: str = "the condition") -> float:
    """Poll `done` until true; raise ProcessDied as soon as one of `processes` is gone. Returns seconds waited."""
    watched = list(processes)
    started = time.monotonic()
    while True:
        check_alive(watched)
        if done():
            return time.monotonic() - started
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(poll)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU of a server and all it ever ran: the root, its live children, and its reaped children.

    PostgreSQL's backends exit and are reaped by the postmaster, whose cutime/cstime then hold their CPU.
    """
    fields = Path(f"/proc/{root_pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / TICKS
    for child in children(root_pid):
        try:
            total += cpu_seconds(child)
        except OSError:  # exited between the listing and the read: its CPU is in the parent's cutime now
            continue
    return total


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
