"""The inbox's pure logic: decoding, de-duplication ids, holding keys, and the order of a failing batch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from outbox_relay.config import InboxSettings
from outbox_relay.errors import ConfigurationError
from outbox_relay.inbox import HandlerFailed, Inbox, Received, decode_value, event_from, position_id, split_held


def received(offset: int, key: bytes | None = b"k", headers: tuple[tuple[str, bytes], ...] = ()) -> Received:
    return Received("orders", 0, offset, key, json.dumps({"n": offset}).encode(),
                    (("content-type", b"application/json"), *headers), None)


def test_values_are_decoded_by_their_content_type() -> None:
    assert decode_value(b'{"a":[1,2]}', "application/json") == {"a": [1, 2]}
    assert decode_value(b'{"a":1}', "application/vnd.order+json") == {"a": 1}
    assert decode_value("é".encode(), "text/plain; charset=utf-8") == "é"
    assert decode_value("é".encode("latin-1"), "text/plain; charset=latin-1") == "é"
    assert decode_value(b"\x00\x01", None) == b"\x00\x01"
    assert decode_value(b"\x00\x01", "application/avro") == b"\x00\x01"
    assert decode_value(None, "application/json") is None  # a tombstone
    with pytest.raises(ValueError):
        decode_value(b"{not json", "application/json")


def test_the_event_id_is_the_header_and_a_replay_counts_as_the_event_it_repeats() -> None:
    original, replay = uuid.uuid4(), uuid.uuid4()
    event = event_from("orders", 1, 7, b"k", b"{}", [("outbox-event-id", str(original).encode()),
                                                       ("content-type", b"application/json")], 1_700_000_000_000)
    assert (event.event_id, event.dedup_id, event.value, event.replay_of) == (original, original, {}, None)
    assert event.timestamp is not None and event.timestamp.year == 2023
    again = event_from("orders", 1, 9, b"k", b"{}", [("outbox-event-id", str(replay).encode()),
                                                      ("outbox-replay-of", str(original).encode())], None)
    assert (again.event_id, again.dedup_id) == (replay, original)
    assert Received("orders", 1, 9, b"k", b"{}", (("outbox-event-id", str(replay).encode()),
                                                  ("outbox-replay-of", str(original).encode())), None
                    ).dedup_id() == original


def test_an_event_without_an_id_header_is_identified_by_its_position() -> None:
    first = event_from("orders", 2, 40, None, b"x", [], None)
    assert first.event_id == position_id("orders", 2, 40) == event_from("orders", 2, 40, None, b"y", [], None).event_id
    assert first.event_id != position_id("orders", 2, 41)
    assert event_from("orders", 2, 40, None, b"x", [("outbox-event-id", b"not-a-uuid")], None).event_id == (
        first.event_id)


def test_only_keyed_events_of_a_parked_key_wait_and_only_under_hold() -> None:
    batch = [received(1, b"a"), received(2, b"b"), received(3, None), received(4, b"a")]
    held = {("orders", 0): {b"a"}}
    assert split_held(batch, held, "hold") == [True, False, False, True]
    assert split_held(batch, held, "skip") == [False, False, False, False]
    assert split_held(batch, {("orders", 1): {b"a"}}, "hold") == [False] * 4


@pytest.mark.parametrize(("flags", "message"), [
    ({"topics": "t"}, "no consumer group: set OUTBOX_INBOX_GROUP or --group"),
    ({"group": "g"}, "no topics: set OUTBOX_INBOX_TOPICS or --topics (comma-separated)"),
    ({"group": "g", "topics": "t", "batch_size": "0"}, "batch_size must be >= 1, got 0"),
    ({"group": "g", "topics": "t", "kafka_property": ["enable.auto.commit=true"]},
     "Kafka property enable.auto.commit=true (from -X enable.auto.commit) would break the inbox's guarantee; "
     "it must be false"),
    ({"group": "g", "topics": "t", "kafka_property": ["group.id=x"]},
     "group.id (from -X group.id) is the inbox's group: use OUTBOX_INBOX_GROUP or --group instead"),
])
def test_settings_that_would_break_the_guarantee_are_refused_in_one_line(flags: dict[str, object],
                                                                         message: str) -> None:
    base = {"database_url": "postgresql+psycopg://u@h/db", "bootstrap_servers": "k:9092"}
    with pytest.raises(ConfigurationError) as refused:
        InboxSettings.from_sources({**base, **flags}, env={})
    assert str(refused.value) == message


def test_the_consumer_is_read_committed_cooperative_and_never_auto_commits() -> None:
    settings = InboxSettings.from_sources({"database_url": "postgresql+psycopg://u@h/db", "bootstrap_servers": "k:1",
                                           "group": "g", "topics": "a, b"}, env={})
    config = settings.consumer_config()
    assert settings.topic_list() == ["a", "b"]
    assert (config["isolation.level"], config["enable.auto.commit"], config["partition.assignment.strategy"],
            config["group.id"]) == ("read_committed", False, "cooperative-sticky", "g")


class RecordingInbox(Inbox):
    """The batch logic of the inbox with transactions recorded instead of run: a poison offset always fails."""

    def __init__(self, poison: set[int], policy: str = "hold") -> None:
        super().__init__(lambda event, session: None, database_url="postgresql+psycopg://u@h/db",
                         bootstrap_servers="k:1", group="g", topics="orders", max_attempts=3,
                         backoff_initial=0.001, backoff_max=0.001, failed_key_policy=policy)
        self.poison = poison
        self.transactions: list[tuple[str, list[int]]] = []
        self.tries: dict[int, int] = {}

    def _transaction(self, batch: Sequence[Received], *, park: tuple[str, str, int] | None = None,
                     unpark: int | None = None) -> None:
        if park is not None:
            self.transactions.append((f"park {park[0]} after {park[2]}", [m.offset for m in batch]))
            return
        for index, message in enumerate(batch):
            if message.offset in self.poison:
                self.tries[message.offset] = self.tries.get(message.offset, 0) + 1
                raise HandlerFailed(index, ValueError(f"offset {message.offset} is poison"))
        self.transactions.append(("commit", [m.offset for m in batch]))


def test_a_failing_event_is_tried_max_attempts_times_alone_then_parked_and_the_rest_keeps_its_order() -> None:
    inbox = RecordingInbox({2})
    inbox._process([received(n, key=b"a" if n == 2 else b"b") for n in range(6)])
    assert inbox.transactions == [("commit", [0, 1]), ("park failed after 3", [2]), ("commit", [3, 4, 5])]
    assert inbox.tries == {2: 3}
    assert inbox._held == {("orders", 0): {b"a"}}  # later events of key a wait behind it (hold)


def test_under_skip_a_parked_key_holds_nothing() -> None:
    inbox = RecordingInbox({0, 3}, policy="skip")
    inbox._process([received(n) for n in range(5)])
    assert inbox.transactions == [("park failed after 3", [0]), ("commit", [1, 2]), ("park failed after 3", [3]),
                                  ("commit", [4])]
    assert inbox._held == {}


def test_every_inbox_flag_shows_its_environment_variable_in_help() -> None:
    import contextlib
    import dataclasses
    import io

    from outbox_relay.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["inbox", "run", "--help"])
    help_text = " ".join(out.getvalue().split())
    for field in dataclasses.fields(InboxSettings):
        if "env" in field.metadata:
            assert f"env {field.metadata['env']}" in help_text
    assert "OUTBOX_INBOX_SCHEMA (default inbox)" in help_text


def test_the_readmes_inbox_module_can_be_imported_without_running(tmp_path: Path) -> None:
    """`outbox-relay inbox run billing.consumer:apply` imports the module for its handler. The README's module
    ended in a bare `inbox.run()`: the import started the module's own inbox first (a second one after ^C,
    which then waited out its 30 s shutdown deadline)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Consuming exactly once"):]
    module = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert module is not None
    (tmp_path / "billing_consumer.py").write_text(module.group(1))
    imported = subprocess.run([sys.executable, "-c", "import billing_consumer as m; print(m.apply.__name__)"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and imported.stdout == "apply\n", imported.stdout + imported.stderr
