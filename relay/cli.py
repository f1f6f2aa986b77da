"""``outbox-relay``: a thin command line over the library. Exit codes are named below."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.config import Settings
from outbox_relay.errors import ConfigurationError, OutboxError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3  # status: a --max-* threshold was exceeded

# Settings every database-only command takes.
_DB_ONLY = ["database_url", "log_level", "log_format"]


def _add_settings(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per Settings field, its environment variable and default shown in --help."""
    for field in dataclasses.fields(Settings):
        if field.name in ("kafka_properties", "kafka_sources") or (only is not None and field.name not in only):
            continue
        meta = field.metadata
        default = "" if field.default in ("", dataclasses.MISSING) else f", default {field.default}"
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=None,
            choices=meta.get("choices"),
            help=f"{meta['help']} [env {meta['env']}{default}]",
        )


def _add_kafka_property_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-X", dest="kafka_property", action="append", metavar="PROPERTY=VALUE",
                        help="a librdkafka property, e.g. -X sasl.mechanism=PLAIN (repeatable)")


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", dest="ids", type=int, action="append", help="outbox row id (repeatable)")
    parser.add_argument("--topic", help="only events of this topic")
    parser.add_argument("--key", help="only events of this key (as text; UTF-8)")
    parser.add_argument("--all", dest="everything", action="store_true", help="every event that qualifies")
    parser.add_argument("--dry-run", action="store_true", help="only count what would change")


def _settings(args: argparse.Namespace, *, kafka: bool = True) -> Settings:
    flags = {key: value for key, value in vars(args).items() if value is not None}
    if not kafka:  # commands that only touch the database do not need Kafka settings
        flags.setdefault("bootstrap_servers", os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS") or "-")
    settings = Settings.from_sources(flags)
    from outbox_relay import logs

    logs.configure(settings.log_level, settings.log_format)
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-relay",
        description="Relay a PostgreSQL transactional outbox to Kafka, exactly once and in key order.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or upgrade the outbox tables")
    _add_settings(migrate, only=_DB_ONLY)
    migrate.add_argument("--lanes", type=int, default=None,
                         help="lane count when the outbox is first created [env OUTBOX_LANES, default 4]")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")

    run = commands.add_parser("run", help="run the relay daemon")
    _add_settings(run)
    _add_kafka_property_flag(run)

    status = commands.add_parser("status", help="the backlog per topic and lane, and who owns the lanes")
    _add_settings(status, only=_DB_ONLY)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    status.add_argument("--max-age", type=float, metavar="SECONDS",
                        help=f"exit {EXIT_THRESHOLD} if the oldest claimable event is older")
    status.add_argument("--max-pending", type=int, help=f"exit {EXIT_THRESHOLD} if more events are pending")
    status.add_argument("--max-failed", type=int, help=f"exit {EXIT_THRESHOLD} if more events have failed")

    lanes = commands.add_parser("lanes", help="show the lanes, or change their number")
    lanes_commands = lanes.add_subparsers(dest="lanes_command", required=True, metavar="ACTION")
    lanes_show = lanes_commands.add_parser("show", help="lane count, owners and live instances")
    _add_settings(lanes_show, only=_DB_ONLY)
    lanes_set = lanes_commands.add_parser(
        "set", help="change the lane count (takes every lane first, so no two counts are ever live at once)")
    lanes_set.add_argument("count", type=int, help="the new number of lanes (1-1024)")
    _add_settings(lanes_set, only=[*_DB_ONLY, "bootstrap_servers", "kafka_config_file", "transactional_id_prefix",
                                   "progress_topic"])
    _add_kafka_property_flag(lanes_set)

    failed = commands.add_parser("failed", help="list, retry or discard failed events")
    failed_commands = failed.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    _add_settings(failed_commands.add_parser("list", help="failed events grouped by error"), only=_DB_ONLY)
    for action, text in (("retry", "put failed events back to pending"), ("discard", "give up on failed events")):
        sub = failed_commands.add_parser(action, help=text)
        _add_settings(sub, only=_DB_ONLY)
        _add_selection(sub)

    verify = commands.add_parser(
        "verify", help="compare the outbox table with Kafka (read_committed): lost, duplicated, reordered events")
    _add_settings(verify, only=[*_DB_ONLY, "bootstrap_servers", "kafka_config_file"])
    _add_kafka_property_flag(verify)
    verify.add_argument("--topic", dest="topics", action="append", help="topics to read (default: every topic"
                        " in the table)")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")

    replay = commands.add_parser("replay", help="publish already-sent events again (marked with a replay header)")
    _add_settings(replay, only=_DB_ONLY)
    _add_selection(replay)
    replay.add_argument("--since", type=dt.datetime.fromisoformat, help="sent at or after (ISO 8601, with zone)")
    replay.add_argument("--until", type=dt.datetime.fromisoformat, help="sent before (ISO 8601, with zone)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ValueError as exc:  # a selection or value the command cannot act on
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutboxError as exc:
        _print_cause_chain(exc)
        return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _print_cause_chain(exc: BaseException) -> None:
    print(f"outbox-relay: error: {exc}", file=sys.stderr)
    cause = exc.__cause__
    while cause is not None:
        print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "migrate":
        return _migrate(args)
    if args.command == "run":
        from outbox_relay.daemon import Relay

        return Relay(_settings(args)).run_forever()
    if args.command == "status":
        return _status(args)
    if args.command == "lanes":
        return _lanes(args)
    if args.command == "failed":
        return _failed(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "verify":
        return _verify(args)
    raise AssertionError(args.command)


def _connect(settings: Settings) -> Any:
    from outbox_relay.store import connect

    return connect(settings.database_url, "outbox-relay cli")


def _migrate(args: argparse.Namespace) -> int:
    from outbox_relay import migrate

    settings = _settings(args, kafka=False)
    lanes = args.lanes if args.lanes is not None else int(os.environ.get("OUTBOX_LANES", "4"))
    if args.downgrade:
        migrate.downgrade(settings.database_url, args.revision)
    else:
        migrate.upgrade(settings.database_url, args.revision, lanes=lanes)
    print(f"outbox schema at {'revision ' + args.revision if args.downgrade else args.revision}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from outbox_relay import monitor

    settings = _settings(args, kafka=False)
    with _connect(settings) as conn:
        while True:
            snap = monitor.snapshot(conn)
            breaches = _breaches(args, snap)
            if args.json:
                print(json.dumps({**snap.to_json(), "breaches": breaches}, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")  # clear the terminal between refreshes
                print(monitor.render(snap))
                for breach in breaches:
                    print(f"THRESHOLD: {breach}")
            if not args.watch:
                return EXIT_THRESHOLD if breaches else EXIT_OK
            time.sleep(args.watch)


def _breaches(args: argparse.Namespace, snap: Any) -> list[str]:
    breaches = []
    age = snap.total.oldest_claimable_age_s
    if args.max_age is not None and age is not None and age > args.max_age:
        breaches.append(f"oldest claimable event is {age:.1f}s old (max {args.max_age:g}s)")
    if args.max_pending is not None and snap.total.pending > args.max_pending:
        breaches.append(f"{snap.total.pending} events pending (max {args.max_pending})")
    if args.max_failed is not None and snap.total.failed > args.max_failed:
        breaches.append(f"{snap.total.failed} events failed (max {args.max_failed})")
    return breaches


def _lanes(args: argparse.Namespace) -> int:
    if args.lanes_command == "set":
        from outbox_relay.resize import resize

        old, recovered = resize(_settings(args), args.count)
        print(f"lane count changed from {old} to {args.count} ({recovered} events recovered while settling lanes)")
        return EXIT_OK
    from outbox_relay import monitor

    with _connect(_settings(args, kafka=False)) as conn:
        snap = monitor.snapshot(conn, cap=1)
    print(monitor.render_lanes(snap))
    return EXIT_OK


def _selection(args: argparse.Namespace) -> Any:
    from outbox_relay.operations import Selection

    return Selection(ids=args.ids, topic=args.topic, key=args.key.encode() if args.key else None,
                     everything=args.everything)


def _failed(args: argparse.Namespace) -> int:
    from outbox_relay import operations

    with _connect(_settings(args, kafka=False)) as conn:
        if args.failed_command == "list":
            groups = operations.failed_groups(conn)
            for group in groups:
                print(f"{group.count:>7} failed  topics: {', '.join(group.topics)}  first ids: "
                      f"{', '.join(map(str, group.first_ids))}\n        {group.error}")
            if not groups:
                print("(no failed events)")
            return EXIT_OK
        change = operations.retry_failed if args.failed_command == "retry" else operations.discard_failed
        count = change(conn, _selection(args), dry_run=args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    print(f"{args.failed_command}: {verb} {count} failed events")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from outbox_relay import verify

    settings = _settings(args)
    with _connect(settings) as conn:
        rows = verify.read_table(conn)
    topics = args.topics or sorted({row.topic for row in rows})
    report = verify.check(rows, verify.read_topics(settings.producer_config(), topics))
    print(json.dumps(dataclasses.asdict(report), default=str, indent=2) if args.json else verify.render(report))
    return EXIT_OK if report.ok else EXIT_FAILURE


def _replay(args: argparse.Namespace) -> int:
    from outbox_relay import operations

    with _connect(_settings(args, kafka=False)) as conn:
        count = operations.replay(conn, _selection(args), since=args.since, until=args.until, dry_run=args.dry_run)
    print(f"replay: {'would queue' if args.dry_run else 'queued'} {count} events again")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
