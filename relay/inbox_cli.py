"""``outbox-relay inbox ...``: the consumer inbox's commands (migrate, run, failed, status)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from outbox_relay.config import InboxSettings, unknown_variables
from outbox_relay.errors import ConfigurationError, DatabaseUnavailable

INBOX_NAMES_HELP = ("the inbox's tables live in the consumer's database, in the schema OUTBOX_INBOX_SCHEMA "
                    "(default inbox), read from the environment")
_DB_ONLY = ["database_url", "log_level", "log_format"]


def _add_settings(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    for field in dataclasses.fields(InboxSettings):
        if field.name in ("kafka_properties", "kafka_sources") or (only is not None and field.name not in only):
            continue
        meta = field.metadata
        default = "" if field.default in ("", dataclasses.MISSING) else f", default {field.default}"
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            choices=meta.get("choices"), help=f"{meta['help']} [env {meta['env']}{default}]")


def add_commands(commands: Any, row_or_event_id: Any) -> None:
    inbox = commands.add_parser("inbox", help="the consumer inbox: apply events to your database exactly once")
    actions = inbox.add_subparsers(dest="inbox_command", required=True, metavar="ACTION")

    def command(name: str, help: str, parent: Any = actions) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, epilog=INBOX_NAMES_HELP)  # type: ignore[no-any-return]

    migrate = command("migrate", "create or upgrade the inbox tables in the consumer's database")
    _add_settings(migrate, only=_DB_ONLY)
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    migrate.add_argument("--yes", action="store_true",
                         help="confirm a downgrade to base, which drops the inbox tables (processed ids, offsets)")

    run = command("run", "consume and apply events through HANDLER, exactly once, until SIGTERM")
    run.add_argument("handler", metavar="MODULE:HANDLER",
                     help="import path of handler(event, session), sync (Session) or async (AsyncSession)")
    _add_settings(run)
    run.add_argument("-X", dest="kafka_property", action="append", metavar="PROPERTY=VALUE",
                     help="a librdkafka consumer property, e.g. -X sasl.mechanism=PLAIN (repeatable)")

    failed = command("failed", "list, retry or discard parked events")
    failed_actions = failed.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    failed_list = command("list", "parked events: failed ones with their error, and those held behind them",
                          failed_actions)
    _add_settings(failed_list, only=[*_DB_ONLY, "group"])
    failed_list.add_argument("--json", action="store_true", help="print JSON for scripts")
    for action, text in (("retry", "hand failed events back to the running consumer, which applies them in key"
                                   " order"),
                         ("discard", "give up on failed events (never applied); what they held goes on")):
        sub = command(action, text, failed_actions)
        _add_settings(sub, only=[*_DB_ONLY, "group"])
        sub.add_argument("--id", dest="ids", type=row_or_event_id, action="append", metavar="ID",
                         help="parked row id, or event id (UUID); repeatable")
        sub.add_argument("--topic", help="only events of this topic")
        sub.add_argument("--key", help="only events of this key (as text; UTF-8)")
        sub.add_argument("--all", dest="everything", action="store_true", help="every failed event")
        sub.add_argument("--dry-run", action="store_true", help="only count what would change")

    status = command("status", "stored offsets per group and partition, and parked events")
    _add_settings(status, only=[*_DB_ONLY, "group"])
    status.add_argument("--json", action="store_true", help="print JSON for scripts")


def _settings(args: argparse.Namespace, *, kafka: bool = False) -> InboxSettings:
    from outbox_relay import logs

    flags = {key: value for key, value in vars(args).items() if value is not None}
    settings = InboxSettings.from_sources(flags, need_kafka=kafka)
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _engine(settings: InboxSettings, *, check_schema: bool = True) -> Any:
    """An engine whose first connection worked and whose inbox tables exist."""
    from outbox_relay.db import inbox as store

    try:
        return store.open_engine(settings.database_url, check_schema=check_schema)
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(f"{exc} (check --database-url or OUTBOX_INBOX_DATABASE_URL)") from None


def load_handler(path: str) -> Any:
    """``module:attribute``: a handler function, or an Inbox whose handler is registered."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"handler {path!r}: expected MODULE:HANDLER, e.g. myapp.consumers:apply_order")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the application's modules are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"handler {path!r}: cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(f"handler {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    from outbox_relay.inbox import Inbox

    if isinstance(target, Inbox):
        target = target._handler
    if not callable(target):
        raise ConfigurationError(f"handler {path!r} is a {type(target).__name__}, not a function")
    return target


def dispatch(args: argparse.Namespace) -> int:
    from outbox_relay.db import inbox as inbox_store
    from outbox_relay.migrate import downgrade_inbox, upgrade_inbox

    if args.inbox_command == "migrate":
        settings = _settings(args)
        _engine(settings, check_schema=False).dispose()
        if args.downgrade:
            if args.revision == "base" and not args.yes:
                print("outbox-relay: refusing to drop the inbox tables (processed ids and offsets) without --yes",
                      file=sys.stderr)
                return 2
            downgrade_inbox(settings.database_url, args.revision)
            print(f"inbox schema at revision {args.revision}")
            return 0
        upgrade_inbox(settings.database_url, args.revision)
        print(f"inbox schema at {args.revision}")
        return 0
    if args.inbox_command == "run":
        from confluent_kafka import KafkaException

        from outbox_relay.inbox import Inbox

        settings = _settings(args, kafka=True)
        for line in unknown_variables(os.environ):
            logging.getLogger("outbox_relay.inbox").warning("%s", line, extra={"action": "unknown_variable"})
        handler = load_handler(args.handler)
        _engine(settings).dispose()
        try:
            from confluent_kafka import Consumer

            Consumer({**settings.consumer_config()}).close()  # librdkafka judges the properties first
        except KafkaException as exc:
            from outbox_relay.publisher import with_source

            raise ConfigurationError(f"Kafka consumer configuration rejected: "
                                     f"{with_source(exc.args[0].str(), settings.kafka_sources)}") from None
        return Inbox(handler, settings=settings).run()
    settings = _settings(args)
    engine = _engine(settings)
    group = settings.group or None
    try:
        if args.inbox_command == "status":
            with engine.connect() as conn:
                rows = inbox_store.status(conn, group)
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("(no stored offsets)")
            else:
                print(f"{'group':<20} {'topic':<30} {'part':>4} {'next offset':>12} {'failed':>6} {'waiting':>7}")
                for r in rows:
                    print(f"{r['group']:<20} {r['topic']:<30} {r['partition']:>4} {r['next_offset']:>12} "
                          f"{r['failed']:>6} {r['waiting']:>7}")
            return 0
        if args.failed_command == "list":
            with engine.connect() as conn:
                parked = inbox_store.list_parked(conn, group)
            if args.json:
                print(json.dumps([{"group": g, **{k: v for k, v in dataclasses.asdict(row).items()
                                                  if k not in ("value", "headers", "key")},
                                   "key": row.key.decode(errors="replace") if row.key is not None else None}
                                  for g, row in parked], default=str, indent=2))
            elif not parked:
                print("(no parked events)")
            for g, row in parked if not args.json else []:
                key = row.key.decode(errors="replace") if row.key is not None else "-"
                detail = f"{row.attempts} attempts: {row.error}" if row.state == "failed" else row.state
                print(f"#{row.id} {g} {row.topic}[{row.partition}]@{row.offset} key={key} event {row.event_id}:"
                      f" {detail}")
            return 0
        import uuid

        selection = inbox_store.ParkedSelection(
            group=group, ids=tuple(i for i in args.ids or [] if isinstance(i, int)),
            event_ids=tuple(i for i in args.ids or [] if isinstance(i, uuid.UUID)), topic=args.topic,
            key=args.key.encode() if args.key else None, everything=args.everything)
        change = inbox_store.retry_parked if args.failed_command == "retry" else inbox_store.discard_parked
        with engine.begin() as conn:
            count = change(conn, selection, dry_run=args.dry_run)
        verb = "would change" if args.dry_run else "changed"
        print(f"inbox failed {args.failed_command}: {verb} {count} failed event{'' if count == 1 else 's'}")
        return 0
    finally:
        engine.dispose()
