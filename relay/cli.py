"""``outbox-relay``: a thin command line over the library. Exit codes are named below."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from relay.config import Settings
from relay.errors import OutboxError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3  # status: a --max-* threshold was exceeded


def _add_settings(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per Settings field, its environment variable and default shown in --help."""
    for field in dataclasses.fields(Settings):
        if field.name == "kafka_properties" or (only is not None and field.name not in only):
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


def _settings(args: argparse.Namespace, *, kafka: bool = True) -> Settings:
    flags = {key: value for key, value in vars(args).items() if value is not None}
    if not kafka:  # commands that only touch the database do not need Kafka settings
        flags.setdefault("bootstrap_servers", os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS") or "-")
    return Settings.from_sources(flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-relay",
        description="Relay a PostgreSQL transactional outbox to Kafka, exactly once and in key order.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or upgrade the outbox tables")
    _add_settings(migrate, only=["database_url", "log_level"])
    migrate.add_argument("--lanes", type=int, default=None,
                         help="lane count when the outbox is first created [env OUTBOX_LANES, default 4]")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")

    run = commands.add_parser("run", help="run the relay daemon")
    _add_settings(run)
    run.add_argument("-X", dest="kafka_property", action="append", metavar="PROPERTY=VALUE",
                     help="a librdkafka property, e.g. -X sasl.mechanism=PLAIN (repeatable)")

    status = commands.add_parser("status", help="show the backlog and lane owners")
    _add_settings(status, only=["database_url"])
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    lanes = commands.add_parser("lanes", help="show the lanes, or change their number")
    lanes_commands = lanes.add_subparsers(dest="lanes_command", required=True, metavar="ACTION")
    lanes_show = lanes_commands.add_parser("show", help="lane count, owners and live instances")
    _add_settings(lanes_show, only=["database_url"])
    lanes_set = lanes_commands.add_parser(
        "set", help="change the lane count (takes every lane first, so no two counts are ever live at once)")
    lanes_set.add_argument("count", type=int, help="the new number of lanes (1-1024)")
    _add_settings(lanes_set, only=["database_url", "bootstrap_servers", "kafka_config_file", "transactional_id_prefix",
                                   "progress_topic", "log_level"])
    lanes_set.add_argument("-X", dest="kafka_property", action="append", metavar="PROPERTY=VALUE",
                           help="a librdkafka property (repeatable)")

    failed = commands.add_parser("failed", help="list, retry or discard failed events")
    failed_commands = failed.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    failed_list = failed_commands.add_parser("list", help="failed events with their errors")
    _add_settings(failed_list, only=["database_url"])
    for action in ("retry", "discard"):
        sub = failed_commands.add_parser(action, help=f"{action} failed events")
        _add_settings(sub, only=["database_url"])
        sub.add_argument("--id", dest="ids", type=int, action="append", help="outbox row id (repeatable)")
        sub.add_argument("--topic", help="every failed event of this topic")
        sub.add_argument("--all", dest="everything", action="store_true", help="every failed event")
        sub.add_argument("--dry-run", action="store_true", help="only count what would change")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except OutboxError as exc:
        _print_cause_chain(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _print_cause_chain(exc: BaseException) -> None:
    print(f"outbox-relay: error: {exc}", file=sys.stderr)
    cause = exc.__cause__
    while cause is not None:
        print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__


def _dispatch(args: argparse.Namespace) -> int:
    from relay import logs

    if args.command == "migrate":
        from relay import migrate

        settings = _settings(args, kafka=False)
        logs.configure(settings.log_level)
        lanes = args.lanes if args.lanes is not None else int(os.environ.get("OUTBOX_LANES", "4"))
        if args.downgrade:
            migrate.downgrade(settings.database_url, args.revision)
        else:
            migrate.upgrade(settings.database_url, args.revision, lanes=lanes)
        print(f"outbox schema at {'revision ' + args.revision if args.downgrade else args.revision}")
        return EXIT_OK
    if args.command == "run":
        from relay.daemon import Relay

        settings = _settings(args)
        logs.configure(settings.log_level, settings.log_format)
        return Relay(settings).run_forever()
    if args.command == "status":
        return _status(_settings(args, kafka=False), as_json=args.json)
    if args.command == "failed":
        return _failed(args)
    if args.command == "lanes":
        return _lanes(args)
    raise AssertionError(args.command)


def _connect(settings: Settings) -> Any:
    from relay.store import connect

    return connect(settings.database_url, "outbox-relay cli")


def _status(settings: Settings, *, as_json: bool) -> int:
    from relay import operations

    with _connect(settings) as conn:
        topics = operations.backlog(conn)
        lanes = operations.lane_owners(conn)
    if as_json:
        print(json.dumps({
            "topics": [dataclasses.asdict(t) for t in topics],
            "lanes": [{"lane": lane, "owner": owner, "last_seen_s": age} for lane, owner, age in lanes],
        }, indent=2))
        return EXIT_OK
    print(f"{'TOPIC':<40} {'PENDING':>9} {'CLAIMABLE':>9} {'DELAYED':>9} {'FAILED':>9} {'OLDEST':>10}")
    for t in topics:
        age = "-" if t.oldest_claimable_age_s is None else f"{t.oldest_claimable_age_s:.1f}s"
        print(f"{t.topic:<40} {t.pending:>9} {t.claimable:>9} {t.delayed:>9} {t.failed:>9} {age:>10}")
    if not topics:
        print("(no pending or failed events)")
    print()
    for lane, owner, last_seen in lanes:
        seen = "-" if last_seen is None else f"{last_seen:.1f}s ago"
        print(f"lane {lane}: {owner or '(free)'} (last seen {seen})")
    return EXIT_OK


def _lanes(args: argparse.Namespace) -> int:
    from relay import logs, operations

    if args.lanes_command == "set":
        from relay.resize import resize

        settings = _settings(args)
        logs.configure(settings.log_level)
        old, recovered = resize(settings, args.count)
        print(f"lane count changed from {old} to {args.count} ({recovered} events recovered while settling lanes)")
        return EXIT_OK
    settings = _settings(args, kafka=False)
    with _connect(settings) as conn:
        count, resizing, instances = operations.lane_view(conn)
        owners = operations.lane_owners(conn)
    print(f"lanes: {count}{' (a change is under way)' if resizing else ''}")
    print(f"live instances: {', '.join(instances) or '(none)'}")
    for lane, owner, last_seen in owners:
        if lane < count:
            seen = "-" if last_seen is None else f"{last_seen:.1f}s ago"
            print(f"lane {lane}: {owner or '(free)'} (last seen {seen})")
    return EXIT_OK


def _failed(args: argparse.Namespace) -> int:
    from relay import operations

    settings = _settings(args, kafka=False)
    from relay import logs

    logs.configure(settings.log_level)
    with _connect(settings) as conn:
        if args.failed_command == "list":
            rows = operations.failed_events(conn)
            for row_id, event_id, topic, attempts, error in rows:
                print(f"{row_id}\t{event_id}\t{topic}\tattempts={attempts}\t{error}")
            if not rows:
                print("(no failed events)")
            return EXIT_OK
        change = operations.retry_failed if args.failed_command == "retry" else operations.discard_failed
        try:
            count = change(conn, ids=args.ids, topic=args.topic, everything=args.everything, dry_run=args.dry_run)
        except ValueError as exc:
            print(f"outbox-relay: {exc} (--id, --topic or --all)", file=sys.stderr)
            return EXIT_USAGE
        verb = "would change" if args.dry_run else "changed"
        print(f"{args.failed_command}: {verb} {count} failed events")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
