"""Progress records and recovery, without Kafka or PostgreSQL: what recovery may trust, and where it stops."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outbox_relay import progress
from outbox_relay.progress import ForeignRecord, Scope, decode, encode
from outbox_relay.recovery import recover

SCOPE = Scope("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e", 2, 4)


def event(id_: int) -> tuple[int, str]:
    """A row id and its event's UUID (made up, distinct per id)."""
    return id_, f"{id_ % 2**32:08x}-0000-4000-8000-{id_ // 2**32:012x}"


def events(*ids: int) -> list[tuple[int, str]]:
    return [event(i) for i in ids]


def record(**fields: Any) -> bytes:
    base = {"v": 2, "outbox": SCOPE.outbox_id, "lane": 2, "lane_count": 4, "ids": [[1, 3], 7],
            "fp": "00000001000000020000000300000007"}
    return json.dumps({**base, **fields}).encode()


def test_a_record_round_trips_and_stays_small() -> None:
    pairs = events(12, 1, 2, 3, 7, 9, 10)
    value = encode(SCOPE, pairs)
    assert decode(value, SCOPE) == sorted((i, progress.fingerprint(e)) for i, e in pairs)
    assert json.loads(value)["ids"] == [[1, 3], 7, [9, 10], 12]
    # The largest batch, with no two ids adjacent (the usual case with several lanes), fits in a message.
    worst = encode(SCOPE, events(*range(10**12, 10**12 + 4 * progress.MAX_RECORD_IDS, 4)))
    assert len(worst) < 1_000_000 // 3


def test_time_ordered_event_ids_that_share_their_first_32_bits_are_told_apart() -> None:
    """UUID version 7 ids written within a minute begin alike: the first 32 bits alone took one for the other."""
    first, other = "01a232d0-507b-79bd-870c-921c73967253", "01a232d0-6000-7aef-acc9-ce8a13574d70"
    print_ = progress.fingerprint(first)
    assert progress.matches(first, print_) and not progress.matches(other, print_)
    [(_, carried)] = decode(encode(SCOPE, [(5, first)]), SCOPE)
    assert carried == print_ and not progress.matches(other, carried)


def test_a_record_written_before_the_digest_still_recovers_by_the_first_32_bits() -> None:
    """Relays that wrote "fp" only are read by this one (an upgrade), and read its records (fp kept)."""
    pairs = decode(record(), SCOPE)
    assert pairs == [(1, "00000001"), (2, "00000002"), (3, "00000003"), (7, "00000007")]
    assert progress.matches(event(7)[1], pairs[-1][1]) and not progress.matches(event(8)[1], pairs[-1][1])
    assert json.loads(encode(SCOPE, events(1, 2)))["fp"] == "0000000100000002"


@pytest.mark.parametrize(("value", "reason"), [
    (record(outbox="another-outbox"), "another outbox"),
    (record(lane=3), "lane 3"),
    (record(v=3), "unknown progress record format"),
    (record(ids=[[1, 10**9]]), "more than"),
    (record(fp="0000000100000002"), "fingerprints do not match"),
    (record(fp="0000000100000002000000030000000G"), "fingerprints do not match"),
    (record(fp=None), "fingerprints do not match"),
    (record(fd="00000001"), "fingerprints do not match"),
    (record(fd="0000000100000002000000030000000g"), "fingerprints do not match"),
    (record(fd=7), "fingerprints do not match"),
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
    """Rows in memory: id -> (event id, state), as PostgreSQL shows them after whatever it lost."""

    def __init__(self, rows: dict[int, tuple[str, str]]) -> None:
        self.rows = rows
        self.marked: list[list[int]] = []

    def mark_recovered(self, _conn: object, batch: list[tuple[int, str]]) -> tuple[int, int]:
        matched = [i for i, fp in batch if i in self.rows and progress.matches(self.rows[i][0], fp)]
        marked = [i for i in matched if self.rows[i][1] == "pending"]
        for i in marked:
            self.rows[i] = (self.rows[i][0], "sent")
        self.marked.append([i for i, _ in batch])
        return len(marked), len(matched)

    def sent(self) -> set[int]:
        return {i for i, (_, state) in self.rows.items() if state == "sent"}


def table(sent: set[int], pending: set[int]) -> dict[int, tuple[str, str]]:
    return {i: (event(i)[1], "sent" if i in sent else "pending") for i in sent | pending}


def records(*batches: list[int]) -> list[tuple[int, bytes | None]]:
    """Newest first, as read_back yields them."""
    return [(offset, encode(SCOPE, events(*ids))) for offset, ids in reversed(list(enumerate(batches)))]


def test_recovery_marks_back_to_the_first_transaction_whose_marks_survived() -> None:
    # Transactions 1..5 committed in Kafka; PostgreSQL kept the marks of 1 and 2 only.
    store = FakeStore(table(sent={1, 2, 3, 4}, pending={5, 6, 7, 8, 9}))
    history = records([1, 2], [3, 4], [5, 6], [7], [8, 9])

    recovered = recover(store, None, history, SCOPE)  # type: ignore[arg-type]

    assert recovered == 5
    assert store.sent() == set(range(1, 10))
    assert store.marked == [[8, 9], [7], [5, 6], [3, 4]]  # stopped at the first fully marked one


def test_recovery_reads_one_record_when_nothing_was_lost() -> None:
    store = FakeStore(table(sent=set(range(1, 10)), pending=set()))
    assert recover(store, None, records([1, 2], [3, 4], [5, 6]), SCOPE) == 0  # type: ignore[arg-type]
    assert store.marked == [[5, 6]]


def test_ids_handed_out_again_after_a_failover_are_not_marked_and_do_not_end_the_search() -> None:
    # The promoted standby never got rows 7-9 (published by the old primary) nor the marks of 5-6;
    # new events took ids 7-9. They are not the events Kafka has: recovery must leave them pending.
    rows = table(sent={1, 2, 3, 4}, pending={5, 6})
    rows.update({i: (f"{i + 100:08x}-0000-4000-8000-000000000000", "pending") for i in (7, 8, 9)})
    store = FakeStore(rows)

    recovered = recover(store, None, records([1, 2], [3, 4], [5, 6], [7, 8, 9]), SCOPE)  # type: ignore[arg-type]

    assert recovered == 2 and store.sent() == {1, 2, 3, 4, 5, 6}
    assert store.marked == [[7, 8, 9], [5, 6], [3, 4]]


def test_recovery_skips_foreign_records_and_stops_at_an_older_generation() -> None:
    store = FakeStore(table(sent=set(), pending={1, 2, 3, 18, 19, 20}))
    older = Scope(SCOPE.outbox_id, 2, 2)
    history = [
        (9, encode(SCOPE, events(20))),
        (8, record(outbox="someone-else", ids=[[1, 3]], fp="000000010000000200000003")),  # never trusted
        (7, b"junk"),
        (6, encode(SCOPE, events(19))),
        (5, encode(older, events(1, 2, 3))),  # before the last lane-count change: settled by it
        (4, encode(SCOPE, events(18))),
    ]
    assert recover(store, None, history, SCOPE) == 2  # type: ignore[arg-type]
    assert store.sent() == {19, 20}
