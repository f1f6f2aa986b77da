"""Fault injection for tests: make the relay die at a chosen point of a tick.

Armed only by the environment variable ``OUTBOX_FAULT_INJECTION``, read once at start, e.g.
``after_commit:3`` (die with SIGKILL the 3rd time the relay passes that point). Without the
variable, ``hit`` is a dictionary lookup that finds nothing. Points, in tick order:

- ``before_produce``: claimed, transaction begun, nothing produced
- ``before_commit``: everything produced and flushed, commit not asked for
- ``after_commit``: Kafka committed, rows not marked
- ``during_mark``: the mark's UPDATE ran but its transaction never commits
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("before_produce", "before_commit", "after_commit", "during_mark")
ENV = "OUTBOX_FAULT_INJECTION"


def _parse(spec: str | None) -> dict[str, int]:
    if not spec:
        return {}
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: the point must be one of {', '.join(POINTS)}")
    return {point: int(nth or "1")}


_armed = _parse(os.environ.get(ENV))
_lock = threading.Lock()


def armed(point: str) -> bool:
    return point in _armed


def hit(point: str) -> None:
    """Die here (SIGKILL: no cleanup, like a crash) when this is the armed point's n-th pass."""
    if point not in _armed:
        return
    with _lock:
        _armed[point] -= 1
        if _armed[point] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
