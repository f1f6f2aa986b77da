"""Retry pacing: exponential backoff with jitter, and a circuit breaker that logs state changes once."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Counts consecutive failures of one outside system for one user (a lane).

    Closed: every failure waits an exponential, jittered, capped delay before the next try.
    Open (after ``threshold`` failures in a row): one log line, then probes at the capped delay
    until a success closes it again with one more log line.
    """

    def __init__(self, name: str, *, threshold: int, initial: float, cap: float, extra: Mapping[str, object],
                 gauge: Any = None) -> None:
        self.name = name
        self.gauge = gauge  # set to 1 while open (a prometheus Gauge child), if given
        self.threshold = threshold
        self.initial = initial
        self.cap = cap
        self.extra = extra
        self.failures = 0
        self.retry_at = 0.0

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at

    def delay(self) -> float:
        base: float = min(self.cap, self.initial * 2.0 ** max(0, self.failures - 1))
        return base * random.uniform(0.5, 1.0)

    def failure(self, reason: str) -> float:
        self.failures += 1
        wait = self.delay()
        self.retry_at = time.monotonic() + wait
        if self.failures == self.threshold:
            if self.gauge is not None:
                self.gauge.set(1)
            log.warning("%s unavailable, circuit open after %d failures (probing every <=%.0fs): %s",
                        self.name, self.failures, self.cap, reason,
                        extra={**self.extra, "action": "circuit_open", "system": self.name})
        elif not self.is_open:
            log.info("%s failed (%d), retrying in %.2fs: %s", self.name, self.failures, wait, reason,
                     extra={**self.extra, "action": "retry", "system": self.name})
        return wait

    def forget(self) -> None:
        """Its user stopped using the system (a lane given up): closed again, silently, and not shown open."""
        self.failures = 0
        self.retry_at = 0.0
        if self.gauge is not None:
            self.gauge.set(0)

    def success(self) -> None:
        if self.is_open:
            if self.gauge is not None:
                self.gauge.set(0)
            log.warning("%s available again, circuit closed", self.name,
                        extra={**self.extra, "action": "circuit_closed", "system": self.name})
        self.failures = 0
        self.retry_at = 0.0
