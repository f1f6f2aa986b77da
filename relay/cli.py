"""``outbox-relay``: a thin command line over the library. Exit codes are named below."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from outbox_relay.config import Settings
from outbox_relay.errors import (
    ConfigurationError,
    ConnectionTrouble,
    DatabaseError,
    DatabaseUnavailable,
    OutboxError,
    SchemaError,
    StatementCancelled,
)

EXIT_OK = 0
EXIT_FAILURE = 1  # the command found violations (verify) or failed in an unexpected way
EXIT_USAGE = 2  # flags, settings or a selection the command cannot act on
EXIT_THRESHOLD = 3  # status: a --max-* threshold was exceeded
EXIT_UNAVAILABLE = 4  # PostgreSQL or Kafka could not be reached (or refused the connection)
EXIT_SCHEMA = 5  # the outbox schema is missing or behind: run `outbox-relay migrate`
EXIT_PIPE = 141  # stdout was closed early (`status | head`): 128 + SIGPIPE, as a shell reports it

NAMES_HELP = ("names: the PostgreSQL schema is OUTBOX_SCHEMA (default outbox) and the events table OUTBOX_TABLE "
              "(default events), read from the environment; set them identically for the application, "
              "migrations and relay")

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
    parser.add_argument("--id", dest="ids", type=_row_or_event_id, action="append", metavar="ID",
                        help="outbox row id, or event id (the UUID in logs and the outbox-event-id header); "
                             "repeatable")
    parser.add_argument("--topic", help="only events of this topic")
    parser.add_argument("--key", help="only events of this key (as text; UTF-8)")
    parser.add_argument("--all", dest="everything", action="store_true", help="every event that qualifies")
    parser.add_argument("--dry-run", action="store_true", help="only count what would change")


def _row_or_event_id(text: str) -> int | uuid.UUID:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a row id nor an event id (UUID)") from None


def _aware_datetime(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2026-11-27T10:00:00+00:00") from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add one, e.g. {value.isoformat()}+00:00 (or Z for UTC)")
    return value


def _number(text: str, convert: Callable[[str], float], accept: Callable[[float], bool], what: str) -> float:
    try:
        value = convert(text)
    except ValueError:
        value = math.nan  # accepted by no test
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _seconds(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 86_400, "a number of seconds above 0, up to 86400")


def _threshold_seconds(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number of seconds, 0 or more")


def _threshold_count(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 0, "a whole number, 0 or more"))


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    """--timeout of the commands that measure the outbox (status, lanes show)."""
    parser.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                        help=f"exit {EXIT_UNAVAILABLE} if PostgreSQL has not answered within SECONDS (default 60)")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
        epilog=f"exit codes: {EXIT_OK} ok, {EXIT_FAILURE} failure or violations found, {EXIT_USAGE} usage or "
               f"configuration, {EXIT_THRESHOLD} status threshold exceeded, {EXIT_UNAVAILABLE} PostgreSQL or "
               f"Kafka unreachable, {EXIT_SCHEMA} outbox schema missing or behind. {NAMES_HELP}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, parent: Any = commands) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, epilog=NAMES_HELP)  # type: ignore[no-any-return]

    migrate = command("migrate", "create or upgrade the outbox tables")
    _add_settings(migrate, only=_DB_ONLY)
    migrate.add_argument("--lanes", type=int, default=None,
                         help="lane count when the outbox is first created; an existing outbox keeps its count "
                              "(change it with `outbox-relay lanes set N`) [env OUTBOX_LANES, default 4]")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    migrate.add_argument("--yes", action="store_true",
                         help="confirm a downgrade that drops the outbox tables and every event in them")
    migrate.add_argument("--sql", action="store_true",
                         help="print the SQL of the upgrade from the database's current revision instead of"
                              " running it, for review (run it with psql -f)")
    migrate.add_argument("--lock-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                         help="give up (run it again later) rather than wait longer for a table lock: while a"
                              " migration waits for one, every writer of that table waits behind it (default 10)")

    run = command("run", "run the relay daemon")
    _add_settings(run)
    _add_kafka_property_flag(run)

    status = command("status", "the backlog per topic and lane, and who owns the lanes")
    _add_settings(status, only=[*_DB_ONLY, "failed_key_policy"])
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--watch", type=_seconds, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    status.add_argument("--max-age", type=_threshold_seconds, metavar="SECONDS",
                        help=f"exit {EXIT_THRESHOLD} if the oldest claimable event is older")
    status.add_argument("--max-pending", type=_threshold_count, metavar="N",
                        help=f"exit {EXIT_THRESHOLD} if more events are pending")
    status.add_argument("--max-failed", type=_threshold_count, metavar="N",
                        help=f"exit {EXIT_THRESHOLD} if more events have failed")
    _add_timeout(status)

    lanes = commands.add_parser("lanes", help="show the lanes, or change their number")
    lanes_commands = lanes.add_subparsers(dest="lanes_command", required=True, metavar="ACTION")
    lanes_show = command("show", "lane count, owners and live instances", lanes_commands)
    _add_settings(lanes_show, only=_DB_ONLY)
    lanes_show.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_timeout(lanes_show)
    lanes_set = command(
        "set", "change the lane count (takes every lane first, so no two counts are ever live at once)", lanes_commands)
    lanes_set.add_argument("count", type=int, help="the new number of lanes (1-1024)")
    _add_settings(lanes_set, only=[*_DB_ONLY, "bootstrap_servers", "kafka_config_file", "transactional_id_prefix",
                                   "progress_topic"])
    _add_kafka_property_flag(lanes_set)

    failed = commands.add_parser("failed", help="list, retry or discard failed events")
    failed_commands = failed.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    failed_list = command("list", "failed events grouped by error, with their keys and the events held behind them",
                          failed_commands)
    _add_settings(failed_list, only=_DB_ONLY)
    failed_list.add_argument("--json", action="store_true", help="print JSON for scripts")
    for action, text in (("retry", "put failed events back to pending"), ("discard", "give up on failed events")):
        sub = command(action, text, failed_commands)
        _add_settings(sub, only=_DB_ONLY)
        _add_selection(sub)

    verify = command(
        "verify", "compare the outbox table with Kafka (read_committed): lost, duplicated, reordered events")
    _add_settings(verify, only=[*_DB_ONLY, "bootstrap_servers", "kafka_config_file", "kafka_timeout"])
    _add_kafka_property_flag(verify)
    verify.add_argument("--topic", dest="topics", action="append", help="topics to read (default: every topic"
                        " in the table)")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")

    replay = command("replay", "publish already-sent events again (marked with a replay header)")
    _add_settings(replay, only=_DB_ONLY)
    _add_selection(replay)
    replay.add_argument("--since", type=_aware_datetime, help="sent at or after (ISO 8601, with zone)")
    replay.add_argument("--until", type=_aware_datetime, help="sent before (ISO 8601, with zone)")

    from outbox_relay import inbox_cli

    inbox_cli.add_commands(commands, _row_or_event_id)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("outbox-relay")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`status | head`): nothing more to say. Point stdout at /dev/null so
        # the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except Exception as exc:
        failure = _expected_failure(exc)
        if failure is None:
            raise
        return failure


def _expected_failure(exc: Exception) -> int | None:
    """One line (and the cause chain of our own errors) and a named exit code, or None for a bug."""
    if isinstance(exc, SchemaError):
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_SCHEMA
    if isinstance(exc, ConnectionTrouble):
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if isinstance(exc, ValueError):  # a selection or value the command cannot act on (InvalidEvent too)
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, DatabaseError):  # PostgreSQL refused a statement: its own words say why
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(exc, OutboxError):
        _print_cause_chain(exc)
        return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILURE
    if isinstance(exc, TimeoutError):
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException):
        error: Any = exc.args[0] if exc.args else None
        text = f"{error.name()}: {error.str()}" if hasattr(error, "name") else str(exc)
        print(f"outbox-relay: Kafka: {text}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return None


def _print_cause_chain(exc: BaseException) -> None:
    print(f"outbox-relay: error: {exc}", file=sys.stderr)
    cause = exc.__cause__
    while cause is not None:
        print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "inbox":
        from outbox_relay import inbox_cli

        return inbox_cli.dispatch(args)
    commands = {"migrate": _migrate, "run": _run, "status": _status, "lanes": _lanes, "failed": _failed,
                "replay": _replay, "verify": _verify}
    return commands[args.command](args)


def _connect(settings: Settings, *, check_schema: bool = True, again: bool = False) -> Any:
    """A connection for one command, after checking the schema is what this relay needs. ``again``: the
    address worked before (a watch reconnecting), so a failure is not blamed on it."""
    from outbox_relay import schema
    from outbox_relay.db.connection import connect

    try:
        conn = connect(settings.database_url, "outbox-relay cli")
    except DatabaseUnavailable as exc:
        if again:
            raise
        raise DatabaseUnavailable(f"{exc} (check --database-url or OUTBOX_DATABASE_URL)") from None
    if check_schema:
        try:
            schema.check(conn)
        except BaseException:
            conn.close()
            raise
    return conn


def _kafka_settings(args: argparse.Namespace) -> Settings:
    """Settings of a command that talks to Kafka; librdkafka judges its properties before anything runs,
    and a rejected one is named with the variable, file line or flag that set it."""
    from outbox_relay.publisher import validate_config

    settings = _settings(args)
    validate_config(settings.producer_config(), "outbox-relay.configuration-check", settings.kafka_sources)
    return settings


# Waiting cannot fix a wrong name, credentials or a connection setting libpq rejects (sslmode=bogus).
_NOT_WORTH_WAITING_FOR = ("does not exist", "authentication", "pg_hba", "password", "invalid ")


def _run(args: argparse.Namespace) -> int:
    """Check the configuration and the schema, then run the daemon. A database that cannot be reached
    yet is waited for (the daemon survives outages too); a missing or older schema stops here."""
    import logging

    from outbox_relay import schema
    from outbox_relay.config import unknown_variables
    from outbox_relay.daemon import Relay

    settings = _kafka_settings(args)
    settings.validate_daemon()
    log = logging.getLogger("outbox_relay.cli")
    for line in unknown_variables(os.environ):
        log.warning("%s", line, extra={"action": "unknown_variable"})
    delay, waited = settings.backoff_initial, False
    while True:
        try:
            conn = _connect(settings)
            break
        except DatabaseUnavailable as exc:
            if any(text in str(exc) for text in _NOT_WORTH_WAITING_FOR):
                raise
            if not waited:
                log.warning("%s; waiting for it", exc, extra={"action": "wait_database"})
            waited = True
            time.sleep(delay)
            delay = min(delay * 2, settings.backoff_max)
    with conn:
        for level, problem in schema.disabled_triggers(conn, listening=settings.listen == "on"):
            log.log(level, "%s", problem, extra={"action": "trigger_disabled"})
    return Relay(settings).run_forever()


def _migrate(args: argparse.Namespace) -> int:
    from outbox_relay import migrate

    settings = _settings(args, kafka=False)
    lanes_given = args.lanes if args.lanes is not None else os.environ.get("OUTBOX_LANES")
    try:
        lanes = int(lanes_given) if lanes_given is not None else 4
    except ValueError:  # only the variable can be text here: argparse reads --lanes as an int
        raise ConfigurationError(f"OUTBOX_LANES={lanes_given!r} is not a whole number (the lane count)") from None
    if lanes_given is not None:
        from outbox_relay.resize import check_lane_count

        check_lane_count(lanes)
    if args.sql:
        if args.downgrade:
            raise ConfigurationError("--sql prints upgrades only; a downgrade runs with `migrate --downgrade`")
        print(migrate.upgrade_sql(settings.database_url, args.revision, lanes=lanes), end="")
        return EXIT_OK
    with _connect(settings, check_schema=False) as conn:
        current_lanes = migrate.current_lane_count(conn)
        drops = args.downgrade and migrate.drops_outbox(conn, args.revision)
    if args.downgrade:
        if drops and not _confirm_drop(args, settings):
            print("outbox-relay: refusing to drop the outbox tables (and every event in them) without --yes",
                  file=sys.stderr)
            return EXIT_USAGE
        migrate.downgrade(settings.database_url, args.revision, lock_timeout=args.lock_timeout)
        print(f"outbox schema at revision {args.revision}")
        return EXIT_OK
    migrate.upgrade(settings.database_url, args.revision, lanes=lanes, lock_timeout=args.lock_timeout)
    print(f"outbox schema at {args.revision}")
    if current_lanes is not None and lanes_given is not None and lanes != current_lanes:
        print(f"outbox-relay: the outbox already exists with {_plural(current_lanes, 'lane')} and keeps its lane "
              f"count (--lanes only applies when the outbox is created). To change the count: "
              f"outbox-relay lanes set {lanes}", file=sys.stderr)
    return EXIT_OK


def _confirm_drop(args: argparse.Namespace, settings: Settings) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        return False
    from outbox_relay.db.connection import where
    from outbox_relay.models import EVENTS_TABLE, SCHEMA

    answer = input(f"This drops {SCHEMA}.{EVENTS_TABLE} at {where(settings.database_url)} and every event in it. "
                   f"Type {EVENTS_TABLE!r} to confirm: ")
    return answer.strip() == EVENTS_TABLE


def _status(args: argparse.Namespace) -> int:
    from outbox_relay import monitor

    settings = _settings(args, kafka=False)
    conn = _connect(settings, check_schema=False)  # checked within --timeout, by _measure
    try:
        while True:
            try:
                if conn.closed:  # given up on (its backend took no cancel) or lost (a restart, a failover)
                    conn = _connect(settings, check_schema=False, again=True)
                snap = _measure(conn, args.timeout, hold=settings.failed_key_policy == "hold")
            except DatabaseUnavailable as exc:
                if not args.watch:
                    raise
                # Someone is watching, often through a migration's lock or a database restart: say so and
                # look again, on a new connection unless a cancel (the lock) left this one usable.
                if not isinstance(exc, StatementCancelled):
                    conn.close()
                print(f"outbox-relay: {exc}; looking again in {args.watch:g}s", file=sys.stderr, flush=True)
                time.sleep(args.watch)
                continue
            breaches = _breaches(args, snap)
            if args.json:
                print(json.dumps({**snap.to_json(), "breaches": breaches}, indent=2))
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")  # clear the terminal between refreshes; a pipe keeps each
                print(monitor.render(snap))
                for breach in breaches:
                    print(f"THRESHOLD: {breach}")
            if not args.watch:
                return EXIT_THRESHOLD if breaches else EXIT_OK
            time.sleep(args.watch)
    finally:
        conn.close()


def _measure(conn: Any, timeout: float, **options: Any) -> Any:
    """A snapshot that gives up after ``timeout`` seconds in all (a lock held on the outbox tables, an
    overloaded server): a status check in a script must answer, if only to say it cannot."""
    from outbox_relay import monitor, schema
    from outbox_relay.db.connection import cancelled_after, translated

    try:
        with cancelled_after(conn, timeout):
            with translated():  # within the bound too: a backend stopped between two refreshes of --watch
                conn.execute(monitor.session(timeout))  # held this statement for as long as it stayed stopped
            schema.check(conn)  # it reads the settings table: a migration's lock held it back without bound
            return monitor.snapshot(conn, **options)
    except StatementCancelled:
        raise StatementCancelled(f"PostgreSQL did not answer within {timeout:g}s (--timeout)") from None


def _breaches(args: argparse.Namespace, snap: Any) -> list[str]:
    breaches = []
    age = snap.total.oldest_claimable_age_s
    if args.max_age is not None and age is not None and age > args.max_age:
        breaches.append(f"oldest claimable event is {age:.1f}s old (max {args.max_age:g}s)")
    if args.max_pending is not None and snap.total.pending > args.max_pending:
        breaches.append(f"{_plural(snap.total.pending, 'event')} pending (max {args.max_pending})")
    if args.max_failed is not None and snap.total.failed > args.max_failed:
        breaches.append(f"{_plural(snap.total.failed, 'event')} failed (max {args.max_failed})")
    return breaches


def _lanes(args: argparse.Namespace) -> int:
    if args.lanes_command == "set":
        from outbox_relay.resize import resize

        settings = _kafka_settings(args)
        _connect(settings).close()
        old, recovered = resize(settings, args.count)
        print(f"lane count changed from {old} to {args.count} "
              f"({_plural(recovered, 'event')} recovered while settling lanes)")
        return EXIT_OK
    from outbox_relay import monitor

    with _connect(_settings(args, kafka=False), check_schema=False) as conn:  # checked by _measure
        snap = _measure(conn, args.timeout, cap=1)
    if args.json:
        data = snap.to_json()
        print(json.dumps({key: data[key] for key in ("lane_count", "resizing", "instances", "owners")}, indent=2))
    else:
        print(monitor.render_lanes(snap))
    return EXIT_OK


def _selection(args: argparse.Namespace) -> Any:
    from outbox_relay.db.operations import Selection

    ids = [i for i in args.ids or [] if isinstance(i, int)] or None
    event_ids = [i for i in args.ids or [] if isinstance(i, uuid.UUID)] or None
    return Selection(ids=ids, event_ids=event_ids, topic=args.topic,
                     key=args.key.encode() if args.key else None, everything=args.everything)


def _failed(args: argparse.Namespace) -> int:
    from outbox_relay import operations

    with _connect(_settings(args, kafka=False)) as conn:
        if args.failed_command == "list":
            groups = operations.failed_groups(conn)
            if args.json:
                print(json.dumps([dataclasses.asdict(group) for group in groups], indent=2))
                return EXIT_OK
            for group in groups:
                print(operations.render_group(group))
            if not groups:
                print("(no failed events)")
            return EXIT_OK
        change = operations.retry_failed if args.failed_command == "retry" else operations.discard_failed
        count = change(conn, _selection(args), dry_run=args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    # Nothing matched: an id that is not a failed event's (pending, sent, or none) looked like a success.
    hint = " (none of the failed events matches; see `outbox-relay failed list`)" if count == 0 else ""
    print(f"{args.failed_command}: {verb} {_plural(count, 'failed event')}{hint}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from outbox_relay import verify

    settings = _kafka_settings(args)
    from outbox_relay.db.operations import ledger_rows, retained_since

    with _connect(settings) as conn:
        rows = ledger_rows(conn)
        topics = args.topics or sorted({row.topic for row in rows})
        rows = [row for row in rows if row.topic in topics]  # --topic: the other topics' events were not read
        # Read after the rows: every batch retention deleted before they were read was sent no later than this.
        outbox_since = retained_since(conn, dt.timedelta(hours=settings.retention_hours))
        # A live outbox has pending events (claimable, delayed, held behind a parked one): not in Kafka yet is not
        # lost. The rows are read before Kafka, so an event sent in between is in Kafka when it is read; one
        # committed in between may be there too, and is looked up once Kafka was read, rather than called unknown.
        read = verify.read_topics(settings.producer_config(), topics, timeout=settings.kafka_timeout)
        if unknown := verify.unknown_event_ids(rows, read.messages):
            rows += ledger_rows(conn, unknown)
    report = verify.check(rows, read.messages, expect_all_sent=False,
                          retained=verify.Retained(outbox_since, read.deleted_until))
    print(json.dumps(dataclasses.asdict(report), default=str, indent=2) if args.json else verify.render(report))
    return EXIT_OK if report.ok else EXIT_FAILURE


def _replay(args: argparse.Namespace) -> int:
    from outbox_relay import operations

    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ConfigurationError(f"--since {args.since.isoformat()} is not before --until {args.until.isoformat()}:"
                                 " no event was sent in between")
    with _connect(_settings(args, kafka=False)) as conn:
        count = operations.replay(conn, _selection(args), since=args.since, until=args.until, dry_run=args.dry_run)
    print(f"replay: {'would queue' if args.dry_run else 'queued'} {_plural(count, 'event')} again")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
