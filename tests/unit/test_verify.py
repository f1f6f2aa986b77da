"""The ledger check (`outbox_relay.verify.check`) on hand-made rows and messages: every branch.

Every real-service test ends with this check, so it is tested on its own, without PostgreSQL or Kafka.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from outbox_relay.verify import LedgerMessage, LedgerRow, Retained, check, render


def row(id_: int, key: bytes | None = b"k", state: str = "sent", topic: str = "t") -> LedgerRow:
    return LedgerRow(id_, f"e{id_}", topic, key, state)


def message(event_id: str | None, offset: int, key: bytes | None = b"k", partition: int = 0,
            topic: str = "t") -> LedgerMessage:
    return LedgerMessage(topic, partition, offset, key, event_id)


def delivered(*rows: LedgerRow) -> list[LedgerMessage]:
    """Each row once, in the order given, as a read_committed consumer would see it."""
    return [message(r.event_id, offset, r.key) for offset, r in enumerate(rows)]


def test_every_row_sent_once_in_id_order_is_ok() -> None:
    rows = [row(1), row(2), row(3, key=b"other")]
    report = check(rows, delivered(*rows))
    assert report.ok
    assert (report.committed, report.received, report.duplicate_count) == (3, 3, 0)
    assert report.summary() == ("committed=3 received=3 lost=0 duplicated=0 reordered=0 unknown=0"
                                " sent_but_missing=0 parked_but_published=0")
    assert render(report).startswith("OK: committed=3")


def test_a_sent_row_missing_from_kafka_is_lost_and_sent_but_missing() -> None:
    rows = [row(1), row(2)]
    report = check(rows, delivered(rows[0]))
    assert not report.ok
    assert report.lost == ["e2"] and report.sent_but_missing == ["e2"]


def test_a_pending_row_is_lost_only_when_all_should_be_sent() -> None:
    rows = [row(1), row(2, state="pending")]
    assert check(rows, delivered(rows[0])).lost == ["e2"]
    partial = check(rows, delivered(rows[0]), expect_all_sent=False)
    assert partial.ok and partial.lost == [] and partial.sent_but_missing == [] and partial.pending == ["e2"]
    assert render(partial).endswith("not published yet (pending: claimable, delayed or held; not a violation): 1")


def test_parked_rows_are_neither_lost_nor_missing() -> None:
    rows = [row(1), row(2, state="failed"), row(3, state="discarded")]
    report = check(rows, delivered(rows[0]))
    assert report.ok and report.committed == 3 and report.received == 1


def test_an_event_seen_twice_is_duplicated() -> None:
    rows = [row(1), row(2)]
    messages = [*delivered(*rows), message("e1", 2)]
    report = check(rows, messages)
    assert not report.ok
    assert report.duplicates == {"e1": 2} and report.duplicate_count == 1 and report.received == 3
    assert report.lost == [] and report.reordered == []  # a late copy is a duplicate, not a reorder


def test_duplicate_count_adds_every_extra_copy() -> None:
    rows = [row(1), row(2)]
    messages = [message("e1", 0), message("e1", 1), message("e1", 2), message("e2", 3), message("e2", 4)]
    report = check(rows, messages)
    assert report.duplicates == {"e1": 3, "e2": 2} and report.duplicate_count == 3


def test_a_key_whose_events_arrive_out_of_id_order_is_reordered() -> None:
    rows = [row(1), row(2), row(3)]
    report = check(rows, delivered(rows[0], rows[2], rows[1]))
    assert not report.ok
    assert report.reordered == [(b"k", "e3", "e2")]
    assert report.lost == [] and report.duplicates == {}


def test_order_is_judged_by_offset_not_by_the_order_messages_were_handed_over() -> None:
    rows = [row(1), row(2)]
    shuffled = [message("e2", 1), message("e1", 0)]
    assert check(rows, shuffled).ok


def test_order_is_per_key() -> None:
    rows = [row(1, key=b"a"), row(2, key=b"b"), row(3, key=b"a")]
    # b's event arrives after a later event of a: no violation, keys are independent.
    report = check(rows, [message("e1", 0, b"a"), message("e3", 1, b"a"), message("e2", 0, b"b", partition=1)])
    assert report.ok


def test_keyless_events_have_no_order_to_keep() -> None:
    rows = [row(1, key=None), row(2, key=None)]
    assert check(rows, delivered(rows[1], rows[0])).ok


def test_only_the_first_copy_of_an_event_counts_for_order() -> None:
    rows = [row(1), row(2)]
    # e1, e2, then a late copy of e1: a duplicate, but the key's first sightings are in order.
    report = check(rows, [message("e1", 0), message("e2", 1), message("e1", 2)])
    assert report.reordered == [] and report.duplicates == {"e1": 2}


def test_a_message_no_row_produced_is_unknown() -> None:
    rows = [row(1)]
    report = check(rows, [*delivered(rows[0]), message("e-stranger", 1)])
    assert not report.ok and report.unknown == ["e-stranger"]


def test_a_message_without_an_event_id_is_unknown_by_its_position() -> None:
    rows = [row(1)]
    report = check(rows, [*delivered(rows[0]), message(None, 7, partition=2, topic="orders")])
    assert report.unknown == ["orders/2@7"] and report.duplicates == {}


T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def test_a_message_older_than_the_oldest_batch_kept_lost_its_row_to_retention_not_unknown() -> None:
    """The outbox deleted the rows of the batches sent before the oldest it kept: their messages are
    retention's work; a message newer than that (a minute of clock margin) with no row is still unknown."""
    rows = [dataclasses.replace(row(9), created_at=T0)]
    old = [dataclasses.replace(message(f"e{n}", n), timestamp=T0 - dt.timedelta(hours=n)) for n in (1, 2)]
    recent = dataclasses.replace(message("e-recent", 3), timestamp=T0 + dt.timedelta(minutes=2))
    messages = [*old, recent, dataclasses.replace(message("e9", 4), timestamp=T0)]
    assert sorted(check(rows, messages).unknown) == ["e-recent", "e1", "e2"]  # without a horizon: strict
    report = check(rows, messages, retained=Retained(outbox_since=T0))
    assert report.unknown == ["e-recent"] and not report.ok
    assert sorted(report.row_deleted) == ["e1", "e2"]
    report = check(rows, [*old, messages[-1], old[0]], retained=Retained(outbox_since=T0))
    assert not report.ok and report.duplicates == {"e1": 2}  # a row's absence does not hide its copies
    assert "in Kafka, rows deleted by the outbox's retention (OUTBOX_RETENTION_HOURS; not a violation): 2" in (
        render(check(rows, messages, retained=Retained(outbox_since=T0))))


def test_a_sent_row_created_before_what_its_topic_kept_lost_its_message_to_kafkas_retention_not_lost() -> None:
    rows = [dataclasses.replace(row(n, topic=topic), created_at=T0 + dt.timedelta(hours=n))
            for n, topic in ((1, "t"), (2, "t"), (3, "other"), (5, "t"))]
    retained = Retained(kafka_since={"t": T0 + dt.timedelta(hours=4)})  # "t" kept its messages from 4h on
    report = check(rows, delivered(rows[3]), retained=retained)
    assert report.message_deleted == ["e1", "e2"]
    assert report.lost == ["e3"] and report.sent_but_missing == ["e3"]  # "other" kept everything
    report = check(rows[:2] + rows[3:], [message("e5", 0)], retained=retained)
    assert report.ok and "sent, messages deleted by Kafka's retention" in render(report)
    late = dataclasses.replace(row(6), created_at=T0 + dt.timedelta(hours=5))
    assert check([late], [], retained=retained).lost == ["e6"]  # created after what "t" kept: lost


def test_render_names_each_violation_and_cuts_long_lists() -> None:
    rows = [row(n) for n in range(1, 16)]
    messages = [message("e15", 0), message("e14", 1), message("e15", 2), message("ghost", 3)]
    text = render(check(rows, messages), limit=3)
    assert text.startswith("VIOLATIONS: committed=15 received=4 lost=13 duplicated=1 reordered=1 unknown=1")
    assert "lost (committed, not in Kafka): 13" in text and "  ... and 10 more" in text
    assert "duplicated (event id: copies): 1\n  e15: 2" in text
    assert "out of key order (key, earlier, later): 1\n  (b'k', 'e15', 'e14')" in text
    assert "in Kafka without a row: 1\n  ghost" in text
    assert "marked sent but not in Kafka: 13" in text
