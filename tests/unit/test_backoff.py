"""The circuit breaker (`outbox_relay.backoff`): exponential, jittered, capped waits, and one log line
per state change. No PostgreSQL, no Kafka: time and jitter are pinned."""

from __future__ import annotations

import logging

import pytest

from outbox_relay import backoff
from outbox_relay.backoff import CircuitBreaker


class Gauge:
    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float) -> None:
        self.values.append(value)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic() as seen by the breaker: now[0], moved by the test."""
    now = [1000.0]
    monkeypatch.setattr(backoff.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff.random, "uniform", lambda low, high: high)


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=backoff.__name__)


def breaker(threshold: int = 3, gauge: Gauge | None = None, *, failed: int = 0) -> CircuitBreaker:
    """A breaker for "kafka" (0.5 s doubling up to 4 s) that has failed `failed` times in a row."""
    subject = CircuitBreaker("kafka", threshold=threshold, initial=0.5, cap=4.0, extra={"lane": 7}, gauge=gauge)
    for _ in range(failed):
        subject.failure("down")
    return subject


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == backoff.__name__]


def test_waits_double_from_the_initial_delay_up_to_the_cap(no_jitter: None, clock: list[float]) -> None:
    subject = breaker(threshold=100)
    assert [subject.failure("down") for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_takes_between_half_and_all_of_the_delay(monkeypatch: pytest.MonkeyPatch, clock: list[float]) -> None:
    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return low

    monkeypatch.setattr(backoff.random, "uniform", uniform)
    subject = breaker(threshold=100)
    assert [subject.failure("down") for _ in range(3)] == [0.25, 0.5, 1.0]
    assert asked == [(0.5, 1.0)] * 3


def test_real_jitter_stays_within_its_bounds(clock: list[float]) -> None:
    subject = breaker(threshold=100)
    for failures in range(1, 12):
        wait = subject.failure("down")
        base = min(4.0, 0.5 * 2 ** (failures - 1))
        assert base / 2 <= wait <= base


def test_not_ready_until_the_wait_has_passed(no_jitter: None, clock: list[float]) -> None:
    subject = breaker()
    assert subject.ready()  # nothing failed yet
    wait = subject.failure("down")
    assert subject.retry_at == 1000.0 + wait and not subject.ready()
    clock[0] += wait - 0.01
    assert not subject.ready()
    clock[0] += 0.01
    assert subject.ready()


def test_opens_after_threshold_failures_in_a_row_with_one_warning(
    no_jitter: None, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    gauge = Gauge()
    subject = breaker(threshold=3, gauge=gauge, failed=2)
    assert not subject.is_open and gauge.values == []
    subject.failure("refused")
    assert subject.is_open and gauge.values == [1]
    for _ in range(20):  # probing while open: no more lines, no more gauge changes
        subject.failure("refused")
    assert gauge.values == [1]
    assert messages(caplog) == [
        "kafka failed (1), retrying in 0.50s: down",
        "kafka failed (2), retrying in 1.00s: down",
        "kafka unavailable, circuit open after 3 failures (probing every <=4s): refused",
    ]
    opened = [r for r in caplog.records if getattr(r, "action", None) == "circuit_open"]
    assert len(opened) == 1 and opened[0].levelno == logging.WARNING
    assert (opened[0].system, opened[0].lane) == ("kafka", 7)  # type: ignore[attr-defined]


def test_a_success_closes_the_circuit_once_and_starts_over(
    no_jitter: None, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    gauge = Gauge()
    subject = breaker(threshold=2, gauge=gauge, failed=2)
    caplog.clear()
    subject.success()
    assert not subject.is_open and subject.failures == 0 and subject.retry_at == 0.0 and subject.ready()
    assert gauge.values == [1, 0]
    assert messages(caplog) == ["kafka available again, circuit closed"]
    assert caplog.records[0].action == "circuit_closed"  # type: ignore[attr-defined]
    assert subject.failure("down") == 0.5  # the delay starts from the beginning again


def test_a_success_while_closed_says_nothing(no_jitter: None, clock: list[float],
                                             caplog: pytest.LogCaptureFixture) -> None:
    gauge = Gauge()
    subject = breaker(threshold=3, gauge=gauge, failed=1)
    caplog.clear()
    subject.success()
    assert messages(caplog) == [] and gauge.values == [] and subject.failures == 0


def test_a_breaker_without_a_gauge_works_the_same(no_jitter: None, clock: list[float]) -> None:
    subject = breaker(threshold=1, failed=1)
    assert subject.is_open
    subject.success()
    assert not subject.is_open
