"""Progress records and recovery, without Kafka or PostgreSQL: what recovery may trust, and where it stops."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outbox_relay import progress
from outbox_relay.progress import ForeignRecord, Scope, decode, encode
from outbox_relay.recovery import recover

SCOPE = Scope("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e", 2, 4)


def record(**fields: Any) -> bytes:
    base = {"v": 2, "outbox": SCOPE.outbox_id, "lane": 2, "lane_count": 4, "ids": [[1, 3], 7]}
    return json.dumps({**base, **fields}).encode()


def test_a_record_round_trips_and_stays_small() -> None:
    ids = [1, 2, 3, 7, 9, 10, 12]
    value = encode(SCOPE, ids)
    assert decode(value, SCOPE) == ids
    assert json.loads(value)["ids"] == [[1, 3], 7, [9, 10], 12]
    # The largest batch, with no two ids adjacent (the usual case with several lanes), fits in a message.
    worst = encode(SCOPE, range(10**12, 10**12 + 4 * progress.MAX_RECORD_IDS, 4))
    assert len(worst) < 1_000_000 // 5


@pytest.mark.parametrize(("value", "reason"), [
    (record(outbox="another-outbox"), "another outbox"),
    (record(lane=3), "lane 3"),
    (record(v=3), "unknown progress record format"),
    (record(ids=[[1, 10**9]]), "more than"),
    (record(ids=[[5, 1]]), "not an id or a range"),
    (record(ids=[0]), "not an id or a range"),
    (record(ids=[True]), "not an id or a range"),
    (record(ids=["7"]), "not an id or a range"),
    (record(ids=[[1, 2, 3]]), "not an id or a range"),
    (record(ids="1-3"), "ids is not a list"),
    (b"\xff junk", "not JSON"),
    (b"[1, 2]", "not a progress record"),
    (None, "not a progress record"),
])
def test_recovery_trusts_nothing_but_this_lanes_own_records(value: bytes | None, reason: str) -> None:
    with pytest.raises(ForeignRecord, match=reason) as caught:
        decode(value, SCOPE)
    assert not caught.value.older_generation


@pytest.mark.parametrize("value", [record(lane_count=2), record(v=1)])
def test_records_of_an_earlier_lane_count_or_format_end_the_read_back(value: bytes) -> None:
    with pytest.raises(ForeignRecord) as caught:
        decode(value, SCOPE)
    assert caught.value.older_generation


class FakeStore:
    """Marks in memory: `sent` holds the ids PostgreSQL shows as sent."""

    def __init__(self, sent: set[int]) -> None:
        self.sent = sent
        self.marked: list[list[int]] = []

    def mark_sent(self, _conn: object, ids: list[int]) -> int:
        new = [i for i in ids if i not in self.sent]
        self.sent.update(new)
        self.marked.append(ids)
        return len(new)


def records(*batches: list[int]) -> list[tuple[int, bytes | None]]:
    """Newest first, as read_back yields them."""
    return [(offset, encode(SCOPE, ids)) for offset, ids in reversed(list(enumerate(batches)))]


def test_recovery_marks_back_to_the_first_transaction_whose_marks_survived() -> None:
    # Transactions 1..5 committed in Kafka; PostgreSQL kept the marks of 1 and 2 only.
    store = FakeStore(sent={1, 2, 3, 4})
    history = records([1, 2], [3, 4], [5, 6], [7], [8, 9])

    recovered = recover(store, None, history, SCOPE)  # type: ignore[arg-type]

    assert recovered == 5
    assert store.sent == set(range(1, 10))
    assert store.marked == [[8, 9], [7], [5, 6], [3, 4]]  # stopped at the first fully marked one


def test_recovery_reads_one_record_when_nothing_was_lost() -> None:
    store = FakeStore(sent=set(range(1, 10)))
    assert recover(store, None, records([1, 2], [3, 4], [5, 6]), SCOPE) == 0  # type: ignore[arg-type]
    assert store.marked == [[5, 6]]


def test_recovery_skips_foreign_records_and_stops_at_an_older_generation() -> None:
    store = FakeStore(sent=set())
    older = Scope(SCOPE.outbox_id, 2, 2)
    history = [
        (9, encode(SCOPE, [20])),
        (8, record(outbox="someone-else", ids=[[1, 10]])),  # never trusted, never stops the search
        (7, b"junk"),
        (6, encode(SCOPE, [19])),
        (5, encode(older, [1, 2, 3])),  # before the last lane-count change: settled by it
        (4, encode(SCOPE, [18])),
    ]
    assert recover(store, None, history, SCOPE) == 2  # type: ignore[arg-type]
    assert store.sent == {19, 20}
