"""The backlog at a glance: one snapshot for `outbox-relay status`, the metrics and the status page.

Its reads (``outbox_relay.db.monitor``) go through partial indexes, so the cost follows the backlog,
not the table. Counts stop at ``cap`` rows per question (the snapshot says when), because an exact
count of a huge backlog would scan it all.

Pending events are claimable (due, free to go), delayed (not due yet) or held: waiting behind a
failed event of their key (``OUTBOX_FAILED_KEY_POLICY=hold``). Held events are not claimable and
do not age the backlog: they wait for an operator (`outbox-relay failed retry|discard`), not for
the relay, and `status --max-age` must not blame the relay for them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from outbox_relay.db import monitor as queries
from outbox_relay.db.connection import Connection, milliseconds
from outbox_relay.db.lanes import Store

DEFAULT_CAP = 1_000_000


def session(timeout_s: float) -> str:
    """The SET statements of a connection that measures. No parallel workers: they would take the cores
    the lanes use, for an answer nobody waits for. A bound: a statement that runs on holds back vacuum
    of the tables the lanes walk, and an on-call script waiting on it learns nothing."""
    return f"SET max_parallel_workers_per_gather = 0; SET statement_timeout = {milliseconds(timeout_s)}"


@dataclasses.dataclass
class Backlog:
    """Counts for one topic or one lane."""

    pending: int = 0
    claimable: int = 0
    delayed: int = 0
    held: int = 0  # pending behind a failed event of their key: waiting for an operator
    failed: int = 0
    sent_last_minute: int = 0
    oldest_claimable_age_s: float | None = None

    def add(self, other: Backlog) -> None:
        self.pending += other.pending
        self.claimable += other.claimable
        self.delayed += other.delayed
        self.held += other.held
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
    troubles: dict[str, str] = dataclasses.field(default_factory=dict)  # live instance -> its Kafka trouble

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
            "troubles": self.troubles,
        }


def snapshot(conn: Connection, cap: int = DEFAULT_CAP, *, hold: bool = True) -> Snapshot:
    """``hold``: whether later events of a failed event's key wait (the relay's failed-key policy)."""
    state = Store.outbox_state(conn)
    lane_count, resizing = state.lane_count, state.resizing
    topics: dict[str, Backlog] = defaultdict(Backlog)
    lanes: dict[int, Backlog] = defaultdict(Backlog)
    capped = False
    for kind, rows in queries.backlog(conn, lane_count, cap, hold).items():
        if sum(row[2] for row in rows) >= cap:
            capped = True
        for topic, lane, *figures in rows:
            part = _backlog(kind, figures)
            topics[topic].add(part)
            lanes[lane].add(part)
    total = Backlog()
    for part in topics.values():
        total.add(part)
    total.oldest_claimable_age_s = queries.oldest_claimable_age(conn, hold)
    owners = [LaneOwner(*owner) for owner in queries.lane_owners(conn, lane_count)]
    return Snapshot(total, dict(topics), dict(lanes), owners, lane_count, resizing, queries.live_instances(conn),
                    capped, queries.instance_troubles(conn))


def oldest_claimable_age(conn: Connection, *, hold: bool = True) -> float | None:
    """The snapshot's exact age of the oldest claimable event alone: one row in id order, cheap whatever the
    backlog (the counts read every unsent row)."""
    return queries.oldest_claimable_age(conn, hold)


def _backlog(kind: str, figures: list[Any]) -> Backlog:
    if kind == "pending":
        pending, claimable, delayed, held, age = figures
        return Backlog(pending=pending, claimable=claimable, delayed=delayed, held=held,
                       oldest_claimable_age_s=float(age) if age is not None else None)
    if kind == "failed":
        return Backlog(failed=figures[0])
    return Backlog(sent_last_minute=figures[0])


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m" if value < 7200 else f"{value / 3600:.1f}h"


def render(snap: Snapshot) -> str:
    """The human table of `outbox-relay status`: the backlog, then the lanes."""
    header = (f"{'':<34}{'PENDING':>10}{'CLAIMABLE':>10}{'DELAYED':>9}{'HELD':>8}{'FAILED':>8}{'SENT/1m':>9}"
              f"{'OLDEST':>9}")
    lines = [header]

    def row(label: str, b: Backlog) -> str:
        return (f"{label[:33]:<34}{b.pending:>10}{b.claimable:>10}{b.delayed:>9}{b.held:>8}{b.failed:>8}"
                f"{b.sent_last_minute:>9}{_age(b.oldest_claimable_age_s):>9}")

    lines.append(row("all topics", snap.total))
    lines += [row(f"  topic {topic}", b) for topic, b in sorted(snap.topics.items())]
    lines += [row(f"  lane {lane}", b) for lane, b in sorted(snap.lanes.items())]
    if snap.capped:
        lines.append(f"(counts stop at {DEFAULT_CAP:,} rows per figure: these are lower bounds)")
    if snap.total.held:
        lines.append(f"HELD: {snap.total.held} pending {'event waits' if snap.total.held == 1 else 'events wait'}"
                     " behind failed events of their keys: see `outbox-relay failed list`, then retry or discard")
    return "\n".join([*lines, "", render_lanes(snap)])


def render_lanes(snap: Snapshot) -> str:
    """Lane count, live instances and each lane's owner (`outbox-relay lanes show`)."""
    resize = " (a lane-count change is under way)" if snap.resizing else ""
    plural = "" if snap.lane_count == 1 else "s"
    lines = [f"{snap.lane_count} lane{plural}{resize}; live instances: {', '.join(snap.instances) or '(none)'}"]
    lines += [f"  instance {name}: {trouble} (its /readyz and log say more)" for name, trouble in snap.troubles.items()]
    owned = {o.lane: o for o in snap.owners}
    for lane in range(snap.lane_count):
        o = owned.get(lane)
        who = o.owner if o and o.owner else "(free)"
        seen = f"last seen {_age(o.last_seen_s)} ago" if o and o.last_seen_s is not None else "never seen"
        lines.append(f"  lane {lane}: {who} ({seen})")
    return "\n".join(lines)
