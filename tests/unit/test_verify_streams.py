"""The ledger check's logic, without services: what counts as reordered, and parked rows found in Kafka."""

from __future__ import annotations

from outbox_relay.verify import LedgerMessage, LedgerRow, check, render


def row(id: int, key: bytes | None = b"k", state: str = "sent", topic: str = "t") -> LedgerRow:
    return LedgerRow(id, f"e{id}", topic, key, state)


def message(id: int, partition: int = 0, offset: int | None = None, topic: str = "t",
            key: bytes | None = b"k") -> LedgerMessage:
    return LedgerMessage(topic, partition, id if offset is None else offset, key, f"e{id}")


def test_order_is_judged_per_topic_and_partition_never_across_streams() -> None:
    # Key k on two topics: topic "a" got event 2, topic "b" got event 1 (sorted by topic, 2 comes first).
    rows = [row(1, topic="b"), row(2, topic="a")]
    assert check(rows, [message(1, topic="b"), message(2, topic="a")]).reordered == []
    # Key k on two partitions of one topic (explicit partition=): 3 on partition 0, 1 and 2 on partition 1.
    rows = [row(1), row(2), row(3)]
    report = check(rows, [message(3, partition=0, offset=0), message(1, partition=1, offset=0),
                          message(2, partition=1, offset=1)])
    assert report.ok, report.summary()


def test_a_key_out_of_id_order_within_a_partition_is_reordered() -> None:
    rows = [row(1), row(2), row(3, key=b"other")]
    report = check(rows, [message(2, offset=0), message(1, offset=1), message(3, offset=2)])
    assert report.reordered == [(b"k", "e2", "e1")] and not report.ok


def test_parked_rows_that_are_in_kafka_are_reported() -> None:
    rows = [row(1), row(2, state="failed"), row(3, state="discarded"), row(4, state="failed")]
    report = check(rows, [message(1), message(2), message(3)])
    assert report.parked_but_published == ["e2", "e3"] and not report.ok
    assert "parked_but_published=2" in report.summary()
    assert "parked as failed or discarded, yet in Kafka: 2" in render(report)
    assert report.lost == []  # e4 was parked and is not in Kafka: as it should be
