"""LISTEN/NOTIFY wake-ups: a lane ticks as soon as events commit, not half a poll interval later.

Polling stays the safety net: a missed notification (connection lost, listener restarting)
only costs latency, never events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from outbox_relay.backoff import CircuitBreaker
from outbox_relay.db.connection import connect, listen, notifications
from outbox_relay.errors import DatabaseError

log = logging.getLogger(__name__)


class CommitListener:
    """A thread that LISTENs on the outbox channel and calls ``on_commit`` for each notification."""

    def __init__(self, database_url: str, on_commit: Callable[[], None], stopping: threading.Event,
                 breaker: CircuitBreaker) -> None:
        self.database_url = database_url
        self.on_commit = on_commit
        self.stopping = stopping
        self.breaker = breaker
        self.thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with connect(self.database_url, "outbox-relay listener") as conn:
                    listen(conn)
                    self.breaker.success()
                    while not self.stopping.is_set():
                        # A timeout keeps the loop checking for shutdown.
                        for _ in notifications(conn, timeout=1.0):
                            self.on_commit()
            except DatabaseError as exc:
                wait = self.breaker.failure(str(exc))
                self.stopping.wait(wait)
