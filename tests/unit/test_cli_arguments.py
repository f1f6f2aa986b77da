"""Odd numbers on the command line are one line naming the option, before anything connects."""

from __future__ import annotations

import pytest

from outbox_relay.cli import build_parser


@pytest.mark.parametrize("value", ["inf", "1e12", "nan", "-1", "0"])
def test_a_watch_interval_that_is_not_a_duration_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--watch inf` or `1e12` was a traceback from time.sleep after the first refresh (OverflowError),
    `-1` and `nan` a line that named no option. `0` was refused as not "from 0 to 86400"."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["status", "--watch", value])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument --watch: {value!r} is not a number of seconds above 0, up to 86400")


def test_a_watch_that_cannot_connect_again_does_not_blame_the_address_that_worked(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --watch` through a database restart: while the server was down, every refresh said
    "... (check --database-url or OUTBOX_DATABASE_URL)", advice for a first connection, not for a
    watch whose address answered a moment before."""
    from outbox_relay import cli
    from outbox_relay.db import connection
    from outbox_relay.errors import DatabaseUnavailable

    class Lost:
        closed = True

        def close(self) -> None:
            pass

    attempts = iter([Lost(), DatabaseUnavailable("connection refused"), KeyboardInterrupt()])

    def connect(*_args: object, **_kwargs: object) -> Lost:
        outcome = next(attempts)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(connection, "connect", connect)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    code = cli.main(["status", "--watch", "1", "--database-url", "postgresql://127.0.0.1:1/x"])
    assert code == 130
    assert capsys.readouterr().err.splitlines() == ["outbox-relay: connection refused; looking again in 1s"]


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--max-age", "-5", "is not a number of seconds, 0 or more"),
    ("--max-age", "nan", "is not a number of seconds, 0 or more"),
    ("--max-age", "soon", "is not a number of seconds, 0 or more"),
    ("--max-pending", "-1", "is not a whole number, 0 or more"),
    ("--max-failed", "1.5", "is not a whole number, 0 or more"),
])
def test_a_status_threshold_below_zero_is_one_line(flag: str, value: str, expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`status --max-age -5` was accepted: every check then breached it, and a pager fired for nothing."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["status", flag, value])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {value!r} {expected}")


def test_a_replay_window_that_ends_before_it_starts_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`replay --since` after `--until` said "queued 0 events again", as if nothing had been sent then."""
    from outbox_relay import cli

    code = cli.main(["replay", "--since", "2026-12-01T10:00:00+00:00", "--until", "2026-12-01T09:00:00+00:00",
                     "--database-url", "postgresql://127.0.0.1:1/never-reached"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "outbox-relay: error: --since 2026-12-01T10:00:00+00:00 is not before --until 2026-12-01T09:00:00+00:00:"
        " no event was sent in between")


@pytest.mark.parametrize("lanes", ["0", "1025"])
def test_migrate_refuses_a_lane_count_out_of_range_before_it_connects(lanes: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate --lanes 0` on an existing outbox advised "To change the count: outbox-relay lanes set 0"."""
    from outbox_relay import cli

    code = cli.main(["migrate", "--lanes", lanes, "--database-url", "postgresql://127.0.0.1:1/never-reached"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"outbox-relay: error: the lane count must be between 1 and 1024, got {lanes}")
