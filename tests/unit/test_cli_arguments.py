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
