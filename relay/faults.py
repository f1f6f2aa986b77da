"""Fault injection for tests: make the relay die at a chosen point of a tick.

Armed only by the environment variable ``OUTBOX_FAULT_INJECTION``, read once at start, e.g.
``after_commit:3`` (die with SIGKILL the 3rd time the relay passes that point) or
``before_lane_lock:1:stall=6`` (stall 6 seconds there instead, as a process that hangs between
two statements), or ``resize_announced:1:stop`` (SIGSTOP: hang there until SIGCONT, if ever). Without
the variable, ``hit`` is a dictionary lookup that finds nothing. Points:

- ``before_lane_lock``: a lane's count was read, its lock not yet asked for
- ``before_produce``: claimed, transaction begun, nothing produced
- ``before_commit``: everything produced and flushed, commit not asked for
- ``after_commit``: Kafka committed, rows not marked
- ``during_mark``: the mark's UPDATE ran but its transaction never commits

and of ``outbox-relay lanes set`` (``RESIZE_POINTS``):

- ``resize_locked``: the resize lock taken, the new count's index not built, nothing announced
- ``resize_announced``: the new count announced under the resize lock, no lane taken yet
- ``resize_lanes_locked``: every lane of the old count locked, none settled in Kafka
- ``resize_settled``: every lane settled, the new count not stored
- ``resize_finished``: the new count stored and the resize lock let go, the old index not dropped
"""

from __future__ import annotations

import os
import signal
import threading
import time

POINTS = ("before_produce", "before_commit", "after_commit", "during_mark")  # the points of a tick
RESIZE_POINTS = ("resize_locked", "resize_announced", "resize_lanes_locked", "resize_settled", "resize_finished")
ENV = "OUTBOX_FAULT_INJECTION"


def _parse(spec: str | None) -> tuple[dict[str, int], float, bool]:
    if not spec:
        return {}, 0.0, False
    point, _, rest = spec.partition(":")
    nth, _, action = rest.partition(":")
    if point not in (*POINTS, "before_lane_lock", *RESIZE_POINTS):
        raise ValueError(f"{ENV}={spec!r}: the point must be one of"
                         f" {', '.join((*POINTS, 'before_lane_lock', *RESIZE_POINTS))}")
    stall = float(action.removeprefix("stall=")) if action.startswith("stall=") else 0.0
    return {point: int(nth or "1")}, stall, action == "stop"


_armed, _stall, _stop = _parse(os.environ.get(ENV))
_lock = threading.Lock()


def armed(point: str) -> bool:
    return point in _armed


def hit(point: str) -> None:
    """Die here (SIGKILL: no cleanup, like a crash), stall, or stop (SIGSTOP: a process that hangs, its
    sessions and locks kept), when this is the armed point's n-th pass."""
    if point not in _armed:
        return
    with _lock:
        _armed[point] -= 1
        passes_left = _armed[point]
    if _stall:
        if passes_left == 0:  # stall once
            time.sleep(_stall)
    elif _stop:
        if passes_left == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
    elif passes_left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
