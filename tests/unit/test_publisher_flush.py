"""A fatal error that surfaces from flush (a zombie owner fenced mid-transaction) is a ProducerFailed,
handled by the lane, never an unexpected exception with a traceback. Seen in test_deployments.py's
hung-owner test: the owner woke from SIGSTOP mid-flush, fenced by the lane's new owner."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox_relay import progress
from outbox_relay.db.lanes import Row
from outbox_relay.publisher import LanePublisher, ProducerFailed


class FencedProducer:
    """Accepts the transaction's messages; its flush reports the fatal error, as librdkafka's does."""

    def __init__(self) -> None:
        self.queued = 0

    def begin_transaction(self) -> None:
        pass

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.queued += 1

    def flush(self, timeout: float) -> int:
        raise KafkaException(KafkaError(KafkaError._FENCED, "Producer attempted an operation with an old epoch",
                                        fatal=True))

    def __len__(self) -> int:
        return self.queued


def test_a_fatal_error_from_flush_is_a_producer_failure() -> None:
    publisher = LanePublisher({"bootstrap.servers": "127.0.0.1:1"}, "tx.lane-0",
                              scope=progress.Scope(str(uuid.uuid4()), 0, 1), progress_topic="p.progress")
    publisher._producer = FencedProducer()  # type: ignore[assignment]
    row = Row(1, uuid.uuid4(), "t", b"k", b"v", [], [], None, 0, dt.datetime.now(dt.UTC))
    with pytest.raises(ProducerFailed) as failed:
        publisher.publish([row])
    assert failed.value.fenced and "flush failed: _FENCED" in str(failed.value)
