"""Recovery on taking a lane: mark sent what Kafka committed but PostgreSQL does not show as sent.

Marks are lost in two ways: a crash between "Kafka committed" and "rows marked" (the last two
transactions: a lane's mark of one transaction runs while the next one goes to Kafka), and
PostgreSQL losing committed writes (an asynchronous standby promoted, a crash with
``synchronous_commit=off``, a restore: the last several transactions). Either way the lost marks
are the newest ones of the lane, in the order its transactions committed, because a lane's marks
commit one after the other in that order (it sends a mark only once the previous one is known
to be committed). So reading the lane's progress records back from the newest, the first record
whose rows are all marked already ends the search.

A row counts as a record's only when its event matches the record's fingerprint: PostgreSQL may
also have lost the rows themselves and handed their ids to new events, which are not sent. A
record none of whose rows are left (lost, or deleted by retention) tells nothing; reading goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from outbox_relay import progress
from outbox_relay.db.connection import Connection
from outbox_relay.db.lanes import Store

if TYPE_CHECKING:
    from outbox_relay.publisher import LanePublisher

log = logging.getLogger(__name__)


def recover(
    store: Store, conn: Connection, records: Iterable[tuple[int, bytes | None]], scope: progress.Scope
) -> int:
    """Mark the ids of the lane's committed transactions whose marks are missing; returns how many."""
    recovered = 0
    extra = {"lane": scope.lane}
    for offset, value in records:
        try:
            ids = progress.decode(value, scope)
        except progress.ForeignRecord as exc:
            if exc.older_generation:
                break
            # Trusting it could mark unpublished rows sent: report it loudly and read on.
            log.error("ignored a record at offset %d of the progress partition of lane %d: %s", offset, scope.lane,
                      exc, extra={**extra, "action": "foreign_progress_record"})
            continue
        marked, matched = store.mark_recovered(conn, ids)
        recovered += marked
        if matched and not marked:
            break  # this transaction's marks survived, and so did every earlier one's
    return recovered


def take_over(store: Store, conn: Connection, scope: progress.Scope, mine: LanePublisher,
              publisher_for: Callable[[str, str], LanePublisher]) -> int:
    """Make ``mine`` the lane's producer in Kafka, once nothing a last owner committed can go out again;
    returns how many events were marked sent on the way.

    If the last owner published under other names (relays told another OUTBOX_TRANSACTIONAL_ID_PREFIX or
    OUTBOX_PROGRESS_TOPIC, or a rename), its producer is fenced and its transactions recovered first, as
    its own next owner would have: before ``mine`` starts, so a last owner that shared its transactional.id
    but not its progress topic does not fence it. Its progress topic is never made again (deleted, it would
    read back nothing, and what that owner committed would go out twice): the lane waits, naming it.
    Then ``mine`` starts (fences its own transactional.id) and, once it has, its names are recorded for
    whoever comes next, before it publishes: never names that could not start (a progress topic refused as
    unfit, which the operator then replaces, would be settled under, and refused, for ever). Last, ``mine``
    recovers from its own records.
    """
    recovered = 0
    last = store.kafka_names(conn, scope.lane)
    if last is not None and last != (mine.transactional_id, mine.progress_topic):
        log.warning("lane %d was last published as transactional.id %s with progress topic %s, and this relay "
                    "publishes as %s with %s: settling the last owner's transactions first. Relays of one outbox "
                    "should share OUTBOX_TRANSACTIONAL_ID_PREFIX and OUTBOX_PROGRESS_TOPIC", scope.lane, last[0],
                    last[1], mine.transactional_id, mine.progress_topic,
                    extra={"lane": scope.lane, "action": "other_kafka_names"})
        previous = publisher_for(*last)
        try:
            previous.start(create_topic=False)  # fences the last owner's producer, settles its open transaction
            recovered = recover(store, conn, previous.committed_records(), scope)
        finally:
            previous.close()
    mine.start()
    store.record_kafka_names(conn, scope.lane, mine.transactional_id, mine.progress_topic)
    return recovered + recover(store, conn, mine.committed_records(), scope)
