"""Fault injection for tests: make the relay die at a chosen point of a tick.

Armed only by the environment variable ``OUTBOX_FAULT_INJECTION``, read once at start, e.g.
``after_commit:3`` (die with SIGKILL the 3rd time the relay passes that point) or
``before_lane_lock:1:stall=6`` (stall 6 seconds there instead, as a process that hangs between
two statements). Without the variable, ``hit`` is a dictionary lookup that finds nothing. Points:

- ``before_lane_lock``: a lane's count was read, its lock not yet asked for
- ``before_produce``: claimed, transaction begun, nothing produced
- ``before_commit``: everything produced and flushed, commit not asked for
- ``after_commit``: Kafka committed, rows not marked
- ``during_mark``: the mark's UPDATE ran but its transaction never commits
"""

from __future__ import annotations

import os
import signal
import threading
import time

POINTS = ("before_produce", "before_commit", "after_commit", "during_mark")  # the points of a tick
ENV = "OUTBOX_FAULT_INJECTION"


def _parse(spec: str | None) -> tuple[dict[str, int], float]:
    if not spec:
        return {}, 0.0
    point, _, rest = spec.partition(":")
    nth, _, action = rest.partition(":")
    if point not in (*POINTS, "before_lane_lock"):
        raise ValueError(f"{ENV}={spec!r}: the point must be one of {', '.join(POINTS)}, before_lane_lock")
    stall = float(action.removeprefix("stall=")) if action.startswith("stall=") else 0.0
    return {point: int(nth or "1")}, stall


_armed, _stall = _parse(os.environ.get(ENV))
_lock = threading.Lock()


def armed(point: str) -> bool:
    return point in _armed


def hit(point: str) -> None:
    """Die here (SIGKILL: no cleanup, like a crash), or stall, when this is the armed point's n-th pass."""
    if point not in _armed:
        return
    with _lock:
        _armed[point] -= 1
        passes_left = _armed[point]
    if _stall:
        if passes_left == 0:  # stall once
            time.sleep(_stall)
    elif passes_left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
