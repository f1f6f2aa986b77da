"""Operator actions on events: failed-event tools and replay (their SQL: ``outbox_relay.db.operations``).

Every action is logged."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from outbox_relay.db import operations as queries
from outbox_relay.db.connection import Connection
from outbox_relay.db.operations import Selection

log = logging.getLogger(__name__)

REPLAY_HEADER = "outbox-replay-of"


@dataclasses.dataclass(frozen=True)
class ErrorGroup:
    error: str
    count: int
    topics: list[str]
    first_ids: list[int]
    first_event_ids: list[str]
    keys: list[str]  # the first few failed keys, as text (what `--key` takes); undecodable bytes escaped
    key_count: int  # distinct keys of the group (keyless events hold nothing)
    held: int  # pending events waiting behind this group's failed events of their key


def key_text(key: bytes) -> str:
    return key.decode(errors="backslashreplace")


def failed_groups(conn: Connection, limit: int = 50) -> list[ErrorGroup]:
    """Failed events grouped by their error, the largest group first, with the keys they hold."""
    return [ErrorGroup(error, count, sorted(topics), ids, event_ids, [key_text(k) for k in keys], key_count, held)
            for error, count, topics, ids, event_ids, keys, key_count, held in queries.failed_groups(conn, limit)]


def render_group(group: ErrorGroup) -> str:
    """A group of `outbox-relay failed list`: how many, where, which keys, what waits behind them."""
    more = f" (+{group.key_count - len(group.keys)} more)" if group.key_count > len(group.keys) else ""
    keys = f"  keys: {', '.join(repr(k) for k in group.keys)}{more}" if group.keys else "  keys: (none)"
    held = f"  holding {group.held} pending" if group.held else ""
    return (f"{group.count:>7} failed  topics: {', '.join(group.topics)}{keys}{held}\n"
            f"        first ids: {', '.join(f'{i} ({e})' for i, e in zip(group.first_ids, group.first_event_ids))}"
            f"\n        {group.error}")


def retry_failed(conn: Connection, selection: Selection, *, dry_run: bool = False) -> int:
    """Failed events go back to pending with a fresh attempt count."""
    return _change_failed(conn, "retry", selection, dry_run)


def discard_failed(conn: Connection, selection: Selection, *, dry_run: bool = False) -> int:
    """Give up on failed events; they stay as discarded (for the record) until retention removes them."""
    return _change_failed(conn, "discard", selection, dry_run)


def _change_failed(conn: Connection, action: str, selection: Selection, dry_run: bool) -> int:
    count = queries.change_failed(conn, action, selection, dry_run=dry_run)
    if not dry_run:
        log.warning("operator: %s %d failed events (%s)", action, count, selection.describe(),
                    extra={"action": f"failed_{action}", "count": count})
    return count


def replay(conn: Connection, selection: Selection, *, since: dt.datetime | None = None,
           until: dt.datetime | None = None, dry_run: bool = False) -> int:
    """Publish already-sent events again, as new events carrying an `outbox-replay-of` header.

    The copies go through the outbox like any event (in order, exactly once each); consumers that
    de-duplicate by `outbox-event-id` see new ids and can tell replays by the header.
    """
    chosen = selection if selection != Selection() else None
    if chosen is None and since is None and until is None:
        raise ValueError("say which events to replay: ids, a topic, a key, all, or a time range")
    count = queries.replay(conn, chosen, since, until, REPLAY_HEADER, dry_run=dry_run)
    if not dry_run:
        log.warning("operator: replay of %d sent events (%s, since=%s, until=%s)", count, selection.describe(),
                    since, until, extra={"action": "replay", "count": count})
    return count
