"""Smoke tests: the real broker honours transactions, and SQLAlchemy on psycopg 3 reaches PostgreSQL."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer
from sqlalchemy import Engine, text

from tests import kafkatools


def test_sqlalchemy_reaches_postgres_through_psycopg3(engine: Engine) -> None:
    with engine.connect() as conn:
        assert engine.dialect.driver == "psycopg"
        version = conn.execute(text("SHOW server_version_num")).scalar_one()
    assert int(version) >= 150000


def test_committed_transaction_is_seen_and_aborted_one_is_not(topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafkatools.bootstrap(),
                         "transactional.id": f"smoke-{uuid.uuid4()}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"committed")
    producer.commit_transaction(30)

    received = kafkatools.consume([topic], expected=1, quiet=1.0)

    assert [m.value for m in received] == [b"committed"]
    # The aborted record did reach the log: read_uncommitted sees it, so the filter above was real.
    uncommitted = kafkatools.consume([topic], expected=2, quiet=1.0, isolation="read_uncommitted")
    assert sorted(m.value for m in uncommitted) == [b"aborted", b"committed"]
