"""The backlog at a glance: one snapshot for `outbox-relay status`, the metrics and the status page.

Every query goes through a partial index (pending, failed, recently sent), so the cost follows the
backlog, not the table: ten million sent rows cost nothing. Counts stop at ``cap`` rows per
question (the snapshot says when), because an exact count of a huge backlog would scan it all.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.models import EVENTS_TABLE, INSTANCES_TABLE, LANES_TABLE, SCHEMA
from outbox_relay.store import Store

_EVENTS = sql.Identifier(SCHEMA, EVENTS_TABLE)
DEFAULT_CAP = 1_000_000


@dataclasses.dataclass
class Backlog:
    """Counts for one topic or one lane."""

    pending: int = 0
    claimable: int = 0
    delayed: int = 0
    failed: int = 0
    sent_last_minute: int = 0
    oldest_claimable_age_s: float | None = None

    def add(self, other: Backlog) -> None:
        self.pending += other.pending
        self.claimable += other.claimable
        self.delayed += other.delayed
        self.failed += other.failed
        self.sent_last_minute += other.sent_last_minute
        ages = [a for a in (self.oldest_claimable_age_s, other.oldest_claimable_age_s) if a is not None]
        self.oldest_claimable_age_s = max(ages) if ages else None


@dataclasses.dataclass
class LaneOwner:
    lane: int
    owner: str | None
    last_seen_s: float | None


@dataclasses.dataclass
class Snapshot:
    total: Backlog
    topics: dict[str, Backlog]
    lanes: dict[int, Backlog]
    owners: list[LaneOwner]
    lane_count: int
    resizing: bool
    instances: list[str]
    capped: bool  # True when a count reached the cap: the figures are lower bounds

    def to_json(self) -> dict[str, Any]:
        return {
            "total": dataclasses.asdict(self.total),
            "topics": {topic: dataclasses.asdict(b) for topic, b in sorted(self.topics.items())},
            "lanes": {str(lane): dataclasses.asdict(b) for lane, b in sorted(self.lanes.items())},
            "owners": [dataclasses.asdict(o) for o in self.owners],
            "lane_count": self.lane_count,
            "resizing": self.resizing,
            "instances": self.instances,
            "capped": self.capped,
        }


def snapshot(conn: psycopg.Connection[Any], cap: int = DEFAULT_CAP) -> Snapshot:
    state = Store.outbox_state(conn)
    lane_count, resizing = state.lane_count, state.resizing
    topics: dict[str, Backlog] = defaultdict(Backlog)
    lanes: dict[int, Backlog] = defaultdict(Backlog)
    capped = False
    params = {"lanes": lane_count, "cap": cap}
    for kind, query in _QUERIES.items():
        rows = conn.execute(query, params).fetchall()
        if sum(row[2] for row in rows) >= cap:
            capped = True
        for topic, lane, *figures in rows:
            part = _backlog(kind, figures)
            topics[topic].add(part)
            lanes[lane].add(part)
    total = Backlog()
    for part in topics.values():
        total.add(part)
    # The exact oldest claimable event: the first in the pending index, whatever the cap.
    oldest = conn.execute(_OLDEST).fetchone()
    total.oldest_claimable_age_s = float(oldest[0]) if oldest and oldest[0] is not None else None
    owners = [LaneOwner(lane, owner, float(age) if age is not None else None)
              for lane, owner, age in conn.execute(_OWNERS, (lane_count,))]
    instances = [row[0] for row in conn.execute(_INSTANCES)]
    return Snapshot(total, dict(topics), dict(lanes), owners, lane_count, resizing, instances, capped)


def _backlog(kind: str, figures: list[Any]) -> Backlog:
    if kind == "pending":
        pending, claimable, delayed, age = figures
        return Backlog(pending=pending, claimable=claimable, delayed=delayed,
                       oldest_claimable_age_s=float(age) if age is not None else None)
    if kind == "failed":
        return Backlog(failed=figures[0])
    return Backlog(sent_last_minute=figures[0])


_QUERIES = {
    "pending": sql.SQL(
        "SELECT topic, lane_key %% %(lanes)s, count(*), count(*) FILTER (WHERE available_at <= now()),"
        " count(*) FILTER (WHERE available_at > now()),"
        " extract(epoch FROM now() - min(created_at) FILTER (WHERE available_at <= now()))"
        " FROM (SELECT topic, lane_key, available_at, created_at FROM {} WHERE state = 'pending' LIMIT %(cap)s) p"
        " GROUP BY 1, 2"
    ).format(_EVENTS),
    "failed": sql.SQL(
        "SELECT topic, lane_key %% %(lanes)s, count(*)"
        " FROM (SELECT topic, lane_key FROM {} WHERE state = 'failed' LIMIT %(cap)s) f GROUP BY 1, 2"
    ).format(_EVENTS),
    "sent": sql.SQL(
        "SELECT topic, lane_key %% %(lanes)s, count(*) FROM (SELECT topic, lane_key FROM {}"
        " WHERE state = 'sent' AND sent_at > now() - interval '1 minute' LIMIT %(cap)s) s GROUP BY 1, 2"
    ).format(_EVENTS),
}
_OLDEST = sql.SQL(
    "SELECT extract(epoch FROM now() - created_at) FROM {}"
    " WHERE state = 'pending' AND available_at <= now() ORDER BY id LIMIT 1"
).format(_EVENTS)
_OWNERS = sql.SQL(
    "SELECT lane, owner, extract(epoch FROM now() - heartbeat_at) FROM {} WHERE lane < %s ORDER BY lane"
).format(sql.Identifier(SCHEMA, LANES_TABLE))
_INSTANCES = sql.SQL(
    "SELECT name FROM {} WHERE heartbeat_at > now() - interval '1 minute' ORDER BY name"
).format(sql.Identifier(SCHEMA, INSTANCES_TABLE))

STATUS_QUERIES = [*_QUERIES.values(), _OLDEST]  # what the EXPLAIN test checks


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m" if value < 7200 else f"{value / 3600:.1f}h"


def render(snap: Snapshot) -> str:
    """The human table of `outbox-relay status`: the backlog, then the lanes."""
    header = f"{'':<34}{'PENDING':>10}{'CLAIMABLE':>10}{'DELAYED':>9}{'FAILED':>8}{'SENT/1m':>9}{'OLDEST':>9}"
    lines = [header]

    def row(label: str, b: Backlog) -> str:
        return (f"{label[:33]:<34}{b.pending:>10}{b.claimable:>10}{b.delayed:>9}{b.failed:>8}"
                f"{b.sent_last_minute:>9}{_age(b.oldest_claimable_age_s):>9}")

    lines.append(row("all topics", snap.total))
    lines += [row(f"  topic {topic}", b) for topic, b in sorted(snap.topics.items())]
    lines += [row(f"  lane {lane}", b) for lane, b in sorted(snap.lanes.items())]
    if snap.capped:
        lines.append(f"(counts stop at {DEFAULT_CAP:,} rows per figure: these are lower bounds)")
    return "\n".join([*lines, "", render_lanes(snap)])


def render_lanes(snap: Snapshot) -> str:
    """Lane count, live instances and each lane's owner (`outbox-relay lanes show`)."""
    resize = " (a lane-count change is under way)" if snap.resizing else ""
    plural = "" if snap.lane_count == 1 else "s"
    lines = [f"{snap.lane_count} lane{plural}{resize}; live instances: {', '.join(snap.instances) or '(none)'}"]
    owned = {o.lane: o for o in snap.owners}
    for lane in range(snap.lane_count):
        o = owned.get(lane)
        who = o.owner if o and o.owner else "(free)"
        seen = f"last seen {_age(o.last_seen_s)} ago" if o and o.last_seen_s is not None else "never seen"
        lines.append(f"  lane {lane}: {who} ({seen})")
    return "\n".join(lines)
