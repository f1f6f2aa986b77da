"""Fault scenarios on production topologies (tests/test_cluster.py, tests/test_standby.py).

Sizes: ``OUTBOX_SCENARIO_SIZE=ci`` (the default; `make test` runs the scenarios CI needs, with a
few seconds of load after recovery) or ``full`` (`make verify`: every scenario, 30 s of load after
recovery). Every scenario prints one line for the README's reliability table:

    SCENARIO <name>: events=N lost=0 duplicated=0 reordered=0 recovery=1.2s (...)

Recovery is measured from the moment of the fault: the longest time during which the relay
published nothing although events were pending (sampled every 0.2 s from the table).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from itertools import pairwise

import pytest
from sqlalchemy import Engine, text

from outbox_relay.verify import LedgerReport
from tests.pgtools import EVENT_STATES

SIZE = os.environ.get("OUTBOX_SCENARIO_SIZE", "ci")
if SIZE not in ("ci", "full"):
    raise ValueError(f"OUTBOX_SCENARIO_SIZE={SIZE!r}: ci or full")
FULL = SIZE == "full"
# Seconds of writer load kept up after the relay recovered, before the drain.
LOAD_AFTER = float(os.environ.get("OUTBOX_SCENARIO_LOAD_SECONDS", "30" if FULL else "3"))

# The longest scenarios run in `make verify` only: `make test` deselects them (-m "not verify_only"),
# so CI never reports a skipped integration test.
full_size_only = pytest.mark.verify_only


@dataclasses.dataclass
class Sample:
    at: float
    sent: int
    pending: int


class Sampler:
    """Counts sent and pending rows every `interval` seconds in a thread; tolerates a database outage."""

    def __init__(self, engine: Engine, interval: float = 0.2) -> None:
        self.engine = engine
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        query = text("SELECT count(*) FILTER (WHERE state = 'sent'), count(*) FILTER (WHERE state = 'pending')"
                     f" FROM {EVENT_STATES}")
        while not self._stop.is_set():
            try:
                with self.engine.connect() as conn:
                    sent, pending = conn.execute(query).one()
                self.samples.append(Sample(time.monotonic(), sent, pending))
            except Exception:  # the database is down or failing over: no sample
                pass
            self._stop.wait(self.interval)

    @property
    def sent(self) -> int:
        return self.samples[-1].sent if self.samples else 0

    def published_since(self, at: float) -> int:
        """Events marked sent since `at` (0 while nothing was, even if the count went down in a failover)."""
        after = [s.sent for s in self.samples if s.at > at]  # counted on whichever server answers now
        return max(after) - after[0] if after else 0

    def stall(self, start: float, end: float | None = None) -> float:
        """The longest time after `start` during which the sent count did not grow while work was pending."""
        before = [s for s in self.samples if s.at < start][-1:]  # compared with the first sample after
        window = before + [s for s in self.samples if s.at >= start and (end is None or s.at <= end)]
        longest, last_progress, previous = 0.0, start, None
        for sample in window:
            if previous is not None and sample.sent > previous.sent:
                longest = max(longest, sample.at - last_progress)
                last_progress = sample.at
            elif previous is not None and previous.pending == 0 and sample.pending == 0:
                last_progress = sample.at  # nothing to publish is no stall
            previous = sample
        return longest

    def longest_gap(self, start: float) -> float:
        """The longest time without a sample after `start` (the sampler itself held up: a stall measured
        across such a gap is an upper bound)."""
        times = [s.at for s in self.samples if s.at >= start]
        return max((b - a for a, b in pairwise(times)), default=0.0)

    def first_progress_after(self, at: float) -> float | None:
        """Seconds from `at` to the first sample whose sent count grew over the previous one."""
        previous = None
        for sample in self.samples:
            if sample.at > at and previous is not None and sample.sent > previous.sent:
                return sample.at - at
            previous = sample
        return None


def report_line(name: str, report: LedgerReport, recovery: float, detail: str = "",
                sampler: Sampler | None = None, since: float | None = None) -> str:
    if sampler is not None and since is not None and (gap := sampler.longest_gap(since)) > 1.0:
        detail += f"; the sampler itself was held up {gap:.1f}s, so the recovery time is an upper bound"
    line = (f"SCENARIO {name}: events={report.committed} lost={len(report.lost)} "
            f"duplicated={report.duplicate_count} reordered={len(report.reordered)} recovery={recovery:.1f}s"
            + (f" ({detail})" if detail else "") + f" [{SIZE} size; {report.summary()}]")
    print(f"\n{line}")
    return line
