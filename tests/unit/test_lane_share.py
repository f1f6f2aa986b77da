"""Sharing lanes among instances, as a pure function: even shares, disjoint preferences, a dead peer's lanes."""

from __future__ import annotations

from outbox_relay.daemon import lane_share


def test_instances_prefer_disjoint_lanes_that_cover_every_lane() -> None:
    live = ["a", "b", "c"]
    shares = {me: lane_share(8, live, me) for me in live}
    assert {me: share for me, (share, _) in shares.items()} == {"a": 3, "b": 3, "c": 3}
    first_choices = [set(preferred[:3]) for _, preferred in shares.values()]
    assert first_choices == [{0, 3, 6}, {1, 4, 7}, {2, 5, 0}]  # c has two of its own, then the first free
    assert set().union(*first_choices) == set(range(8))


def test_an_instance_not_yet_registered_counts_itself() -> None:
    share, preferred = lane_share(4, ["a"], "b")
    assert share == 2 and preferred[:2] == [1, 3]


def test_alone_an_instance_takes_every_lane_and_more_instances_than_lanes_take_one_each() -> None:
    assert lane_share(4, ["a"], "a") == (4, [0, 1, 2, 3])
    assert lane_share(2, ["a", "b", "c"], "c")[0] == 1
