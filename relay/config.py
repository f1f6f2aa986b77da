"""Relay settings: typed, from flags and OUTBOX_-prefixed environment variables.

Every field declares its environment variable; the CLI builds one flag per field and shows the
variable in ``--help``. Precedence: flag, then environment, then default.

Any librdkafka property passes through: ``OUTBOX_KAFKA_<PROPERTY>`` with dots written as
underscores (``OUTBOX_KAFKA_SASL_MECHANISM=PLAIN`` is ``sasl.mechanism``), a properties file
(``--kafka-config-file``) or ``-X property=value`` flags, later ones winning.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from outbox_relay.db.connection import database_name, masked
from outbox_relay.errors import ConfigurationError
from outbox_relay.limits import DEFAULT_MAX_MESSAGE_BYTES
from outbox_relay.models.names import EVENTS_TABLE, SCHEMA
from outbox_relay.progress import MAX_RECORD_IDS

KAFKA_ENV_PREFIX = "OUTBOX_KAFKA_"
MAX_FLOAT = 1e9  # seconds (31 years) or hours: any interval, timeout or retention fits in a timedelta
_SECRET = re.compile(r"password|secret|token|credential|oauthbearer\.config|ssl\.key\.pem|keystore|private", re.I)

# What a transactional, idempotent, ordered relay needs; users may tune but not weaken these.
REQUIRED_KAFKA = {"enable.idempotence": True, "acks": "all"}
DEFAULT_KAFKA = {
    # What the write API accepts, the producer sends: one limit (Kafka's broker default), not two.
    "message.max.bytes": DEFAULT_MAX_MESSAGE_BYTES,
    "linger.ms": 5,
    "compression.type": "lz4",
    "transaction.timeout.ms": 60000,
    "message.timeout.ms": 30000,
    "socket.keepalive.enable": True,
}


def _field(env: str, help: str, default: Any = dataclasses.MISSING, flag: str | None = None, **meta: Any) -> Any:
    metadata = {"env": env, "help": help, "flag": flag, **meta}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass
class Settings:
    database_url: str = _field("OUTBOX_DATABASE_URL", "PostgreSQL URL (postgresql+psycopg://user:pw@host/db)", "")
    bootstrap_servers: str = _field("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "Kafka bootstrap servers (host:port,...)", "")
    kafka_config_file: str = _field(
        "OUTBOX_KAFKA_CONFIG_FILE", "file of librdkafka properties (key=value lines)", ""
    )
    batch_size: int = _field("OUTBOX_BATCH_SIZE", "events per Kafka transaction", 1000)
    poll_interval: float = _field("OUTBOX_POLL_INTERVAL", "seconds between polls of an idle lane", 0.5)
    listen: str = _field(
        "OUTBOX_LISTEN", "on: wake lanes by LISTEN/NOTIFY when events commit; off: poll only", "on",
        choices=("on", "off"),
    )
    lane_interval: float = _field(
        "OUTBOX_LANE_INTERVAL", "seconds between attempts to take free lanes (bounds failover time)", 1.0
    )
    instance_timeout: float = _field(
        "OUTBOX_INSTANCE_TIMEOUT",
        "seconds without a heartbeat after which an instance no longer counts when sharing lanes",
        10.0,
    )
    transactional_id_prefix: str = _field(
        "OUTBOX_TRANSACTIONAL_ID_PREFIX",
        "prefix of each lane's Kafka transactional.id"
        " (default: outbox-relay.<database>.<schema>.<table>.<outbox id>)",
        "",
    )
    progress_topic: str = _field(
        "OUTBOX_PROGRESS_TOPIC",
        "compacted topic of the relay's progress records (default: <transactional id prefix>.progress)",
        "",
    )
    instance: str = _field("OUTBOX_INSTANCE", "name of this relay instance (default: host-pid)", "")
    max_attempts: int = _field(
        "OUTBOX_MAX_ATTEMPTS", "attempts before an event that keeps failing is parked as failed", 3
    )
    failed_key_policy: str = _field(
        "OUTBOX_FAILED_KEY_POLICY",
        "hold: later events of a failed event's key wait behind it; skip: they go on",
        "hold",
        choices=("hold", "skip"),
    )
    kafka_timeout: float = _field(
        "OUTBOX_KAFKA_TIMEOUT", "seconds a Kafka call (init, flush, commit) may take before it counts as failed", 30.0
    )
    backoff_initial: float = _field("OUTBOX_BACKOFF_INITIAL", "first retry delay in seconds", 0.5)
    backoff_max: float = _field("OUTBOX_BACKOFF_MAX", "retry delay cap in seconds", 30.0)
    breaker_threshold: int = _field(
        "OUTBOX_BREAKER_THRESHOLD", "consecutive failures that open the circuit breaker", 5
    )
    shutdown_timeout: float = _field(
        "OUTBOX_SHUTDOWN_TIMEOUT", "seconds a graceful shutdown may take before exiting anyway", 30.0
    )
    http: str = _field(
        "OUTBOX_HTTP",
        "serve the status page, /metrics, /healthz and /readyz on PORT (localhost) or HOST:PORT; off when empty",
        "",
    )
    backlog_interval: float = _field(
        "OUTBOX_BACKLOG_INTERVAL", "seconds between backlog measurements for metrics and the status page", 5.0
    )
    retention_hours: float = _field(
        "OUTBOX_RETENTION_HOURS", "sent and discarded events are deleted after this many hours (0: keep)", 168.0
    )
    retention_interval: float = _field("OUTBOX_RETENTION_INTERVAL", "seconds between retention runs", 60.0)
    log_level: str = _field("OUTBOX_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO")
    log_format: str = _field("OUTBOX_LOG_FORMAT", "text or json", "text", choices=("text", "json"))
    kafka_properties: dict[str, str] = dataclasses.field(default_factory=dict)
    # Where each librdkafka property came from (OUTBOX_KAFKA_PORT, file.properties:3, -X port=1),
    # so that a property librdkafka rejects is named with the place to fix it.
    kafka_sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Flags (None = not given) over environment over defaults; validates the result."""
        env = os.environ if env is None else env
        flags = flags or {}
        values = _given_values(cls, flags, env)
        settings = cls(**values)
        settings.kafka_properties = kafka_properties_from(env, settings.kafka_config_file, flags.get("kafka_property"),
                                                          sources=settings.kafka_sources)
        if settings.bootstrap_servers:
            settings.kafka_properties["bootstrap.servers"] = settings.bootstrap_servers
            settings.kafka_sources["bootstrap.servers"] = (
                "--bootstrap-servers" if flags.get("bootstrap_servers") is not None
                else "OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.database_url:
            raise ConfigurationError("no database: set OUTBOX_DATABASE_URL or --database-url")
        if "bootstrap.servers" not in self.kafka_properties:
            raise ConfigurationError("no Kafka: set OUTBOX_KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers")
        for name in ("batch_size", "max_attempts", "breaker_threshold"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > MAX_RECORD_IDS:
            # A transaction's progress record names every id it carried; it must fit in one message.
            raise ConfigurationError(f"batch_size must be <= {MAX_RECORD_IDS}, got {self.batch_size}")
        for name in ("poll_interval", "lane_interval", "instance_timeout", "kafka_timeout", "backoff_initial",
                     "backoff_max", "shutdown_timeout", "backlog_interval", "retention_interval"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.retention_hours < 0:
            raise ConfigurationError(f"retention_hours must be >= 0 (0: keep), got {self.retention_hours}")
        for key, value in REQUIRED_KAFKA.items():
            given = self.kafka_properties.get(key)
            if given is not None and str(given).lower() != str(value).lower():
                raise ConfigurationError(
                    f"Kafka property {key}={given}{self.kafka_source(key)} would break delivery guarantees; "
                    f"it must be {value}"
                )
        if "transactional.id" in self.kafka_properties:
            raise ConfigurationError(
                f"transactional.id{self.kafka_source('transactional.id')} is set per lane by the relay; use "
                "OUTBOX_TRANSACTIONAL_ID_PREFIX instead"
            )

    def validate_daemon(self) -> None:
        """What only `run` needs: its timing against the other instances'."""
        if self.instance_timeout < 2 * self.lane_interval:
            # Owners write their heartbeat once per lane interval: a shorter timeout takes every healthy owner
            # for hung, and this instance would end their lane sessions (pg_terminate_backend) on every pass.
            raise ConfigurationError(
                f"OUTBOX_INSTANCE_TIMEOUT ({self.instance_timeout:g}s) must be at least twice OUTBOX_LANE_INTERVAL"
                f" ({self.lane_interval:g}s): instances show their heartbeat once per lane interval, and a shorter"
                " timeout would take live lane owners for hung and end their sessions")

    def kafka_source(self, prop: str) -> str:
        """' (from OUTBOX_KAFKA_PORT)': where a librdkafka property was set, for error messages."""
        source = self.kafka_sources.get(prop)
        return f" (from {source})" if source else ""

    def instance_name(self) -> str:
        return self.instance or default_instance_name()

    def kafka_names(self, outbox_id: str, database: str | None = None) -> KafkaNames:
        """This outbox's names in Kafka; the defaults carry its durable identity (made by `migrate`).

        ``database`` is the database as the server names it (``OutboxState.database``): relays of one
        outbox must be one producer per lane and read one progress topic however their URLs reach the
        database (named in the URL, through PGDATABASE, ``?dbname=`` or a PgBouncer alias). Without it,
        the name the URL spells (tests and tools that know no server)."""
        database = database or database_name(self.database_url) or "postgres"
        default = kafka_safe(f"outbox-relay.{database}.{SCHEMA}.{EVENTS_TABLE}.{outbox_id[:12]}")
        prefix = self.transactional_id_prefix or default
        return KafkaNames(outbox_id, prefix, self.progress_topic or f"{prefix}.progress")

    def producer_config(self) -> dict[str, Any]:
        return {**DEFAULT_KAFKA, **self.kafka_properties, **REQUIRED_KAFKA}

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict fit for logs: secrets and passwords in URLs masked."""
        data = dataclasses.asdict(self)
        data["database_url"] = masked(self.database_url)
        data["kafka_properties"] = redact_properties(self.kafka_properties)
        return data


@dataclasses.dataclass(frozen=True)
class KafkaNames:
    """Where one outbox lives in Kafka: lane N publishes as <prefix>.lane-N, recording progress in one topic."""

    outbox_id: str
    transactional_prefix: str
    progress_topic: str

    def transactional_id(self, lane: int) -> str:
        return f"{self.transactional_prefix}.lane-{lane}"


def kafka_safe(name: str) -> str:
    """A valid Kafka topic or transactional.id part: any character outside [a-zA-Z0-9._-] becomes '_'."""
    return re.sub(r"[^a-zA-Z0-9._-]", "_", name)


def redact_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    return {key: "***" if _SECRET.search(key) else value for key, value in properties.items()}


def _convert(field: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str}[str(field.type)]
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{source}={raw!r} is not a valid {kind.__name__}") from None
    # float() reads 'nan', 'inf' and 1e300, which pass `> 0` and break the scheduler or a timedelta later.
    if kind is float and not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
        raise ConfigurationError(f"{source}={raw!r} is not a finite number (at most {MAX_FLOAT:,.0f})")
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigurationError(f"{source}={raw!r}: choose one of {', '.join(choices)}")
    return value


def _given_values(cls: type, flags: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as flags or in the environment (flags win), converted; defaults stay out."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in ("kafka_properties", "kafka_sources"):
            continue
        raw = flags.get(field.name)
        source = f"--{field.name.replace('_', '-')}"
        if raw is None and field.metadata["env"] in env:
            raw, source = env[field.metadata["env"]], field.metadata["env"]
        if raw is not None:
            values[field.name] = _convert(field, raw, source)
    return values


# Read elsewhere: the names of the outbox's and the inbox's tables (models.names, models.inbox), the lane
# count of a first `migrate` (cli, the first migration), the fault injection of the tests (faults), and
# the project's own tooling (services, scenarios, bench), never by a setting.
_OTHER_VARIABLES = frozenset({"OUTBOX_SCHEMA", "OUTBOX_TABLE", "OUTBOX_INBOX_SCHEMA", "OUTBOX_LANES",
                              "OUTBOX_FAULT_INJECTION", "OUTBOX_LOAD_SECONDS"})
_TOOLING_PREFIXES = ("OUTBOX_SERVICES_", "OUTBOX_SCENARIO_", "OUTBOX_BENCH_")


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A line for each OUTBOX_* variable that nothing reads (a typo such as OUTBOX_BATCHSIZE), naming the
    closest known one: misspelt, a setting silently keeps its default. OUTBOX_KAFKA_* variables are
    librdkafka's to judge (it names an unknown property)."""
    known = {field.metadata["env"] for cls in (Settings, InboxSettings) for field in dataclasses.fields(cls)
             if "env" in field.metadata} | _OTHER_VARIABLES
    lines = []
    for name in sorted(env):
        if (not name.startswith("OUTBOX_") or name in known or name.startswith("OUTBOX_KAFKA_")
                or name.startswith(_TOOLING_PREFIXES)):
            continue
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        lines.append(f"{name} is not a setting and is ignored" + (f": did you mean {guess[0]}?" if guess else ""))
    return lines


def kafka_properties_from(env: Mapping[str, str], config_file: str, overrides: list[str] | None,
                          sources: dict[str, str] | None = None) -> dict[str, str]:
    """librdkafka properties from OUTBOX_KAFKA_* variables, the file, then -X flags; ``sources`` (if given)
    receives where each came from."""
    # Settings of our own under the OUTBOX_KAFKA_ prefix are not librdkafka properties.
    own = {field.metadata["env"] for field in dataclasses.fields(Settings) if "env" in field.metadata}
    properties: dict[str, str] = {}
    sources = {} if sources is None else sources
    for name, value in env.items():
        if name.startswith(KAFKA_ENV_PREFIX) and name not in own:
            prop = name[len(KAFKA_ENV_PREFIX):].lower().replace("_", ".")
            properties[prop] = value
            sources[prop] = name
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigurationError(f"Kafka config file {config_file!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"Kafka config file {config_file!r} is not UTF-8 text (byte {exc.start})"
                                     ) from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ConfigurationError(f"{config_file}:{number}: expected property=value, got {line!r}")
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
            sources[key.strip()] = f"{config_file}:{number}"
    for item in overrides or []:
        if "=" not in item:
            raise ConfigurationError(f"-X {item!r}: expected property=value")
        key, value = item.split("=", 1)
        properties[key.strip()] = value.strip()
        sources[key.strip()] = f"-X {key.strip()}"
    return properties


# What an effectively-once consumer needs; users may tune but not weaken these. The offsets that count
# live in the consumer's database; Kafka's committed offsets only follow them, for lag monitoring.
REQUIRED_CONSUMER = {"isolation.level": "read_committed", "enable.auto.commit": False,
                     "enable.auto.offset.store": False}
DEFAULT_CONSUMER = {"partition.assignment.strategy": "cooperative-sticky", "auto.offset.reset": "earliest",
                    "socket.keepalive.enable": True}


@dataclasses.dataclass
class InboxSettings:
    """Settings of a consumer inbox (`outbox-relay inbox ...`); flags over environment over defaults."""

    database_url: str = _field("OUTBOX_INBOX_DATABASE_URL",
                               "the consumer's PostgreSQL URL, where the inbox and the handler's effects live", "")
    bootstrap_servers: str = _field("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "Kafka bootstrap servers (host:port,...)", "")
    kafka_config_file: str = _field(
        "OUTBOX_KAFKA_CONFIG_FILE", "file of librdkafka properties (key=value lines)", ""
    )
    group: str = _field("OUTBOX_INBOX_GROUP", "Kafka consumer group; also the inbox's de-duplication scope", "")
    topics: str = _field("OUTBOX_INBOX_TOPICS", "topics to consume, comma-separated", "")
    batch_size: int = _field("OUTBOX_INBOX_BATCH_SIZE", "events applied per database transaction", 100)
    max_attempts: int = _field(
        "OUTBOX_INBOX_MAX_ATTEMPTS", "handler attempts before an event that keeps failing is parked", 3
    )
    failed_key_policy: str = _field(
        "OUTBOX_INBOX_FAILED_KEY_POLICY",
        "hold: later events of a parked event's key wait behind it; skip: they go on",
        "hold",
        choices=("hold", "skip"),
    )
    backoff_initial: float = _field("OUTBOX_INBOX_BACKOFF_INITIAL", "first retry delay in seconds", 0.5)
    backoff_max: float = _field("OUTBOX_INBOX_BACKOFF_MAX", "retry delay cap in seconds", 30.0)
    poll_interval: float = _field(
        "OUTBOX_INBOX_POLL_INTERVAL", "seconds a poll waits for events; parked events are looked at as often", 1.0
    )
    retention_hours: float = _field(
        "OUTBOX_INBOX_RETENTION_HOURS",
        "processed event ids are deleted after this many hours (0: keep); keep it longer than any replay window",
        168.0,
    )
    retention_interval: float = _field("OUTBOX_INBOX_RETENTION_INTERVAL", "seconds between retention runs", 60.0)
    shutdown_timeout: float = _field(
        "OUTBOX_INBOX_SHUTDOWN_TIMEOUT", "seconds a graceful shutdown may take before exiting anyway", 30.0
    )
    http: str = _field("OUTBOX_INBOX_HTTP", "serve /metrics on PORT (localhost) or HOST:PORT; off when empty", "")
    log_level: str = _field("OUTBOX_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO")
    log_format: str = _field("OUTBOX_LOG_FORMAT", "text or json", "text", choices=("text", "json"))
    kafka_properties: dict[str, str] = dataclasses.field(default_factory=dict)
    kafka_sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                     *, need_kafka: bool = True) -> InboxSettings:
        env = os.environ if env is None else env
        flags = flags or {}
        values = _given_values(cls, flags, env)
        settings = cls(**values)
        settings.kafka_properties = kafka_properties_from(env, settings.kafka_config_file, flags.get("kafka_property"),
                                                          sources=settings.kafka_sources)
        if settings.bootstrap_servers:
            settings.kafka_properties["bootstrap.servers"] = settings.bootstrap_servers
        settings.validate(need_kafka=need_kafka)
        return settings

    def validate(self, *, need_kafka: bool = True) -> None:
        if not self.database_url:
            raise ConfigurationError("no database: set OUTBOX_INBOX_DATABASE_URL or --database-url")
        for name in ("batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("backoff_initial", "backoff_max", "poll_interval", "retention_interval", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.retention_hours < 0:
            raise ConfigurationError(f"retention_hours must be >= 0 (0: keep), got {self.retention_hours}")
        if not need_kafka:
            return
        if "bootstrap.servers" not in self.kafka_properties:
            raise ConfigurationError("no Kafka: set OUTBOX_KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers")
        if not self.group:
            raise ConfigurationError("no consumer group: set OUTBOX_INBOX_GROUP or --group")
        if not self.topic_list():
            raise ConfigurationError("no topics: set OUTBOX_INBOX_TOPICS or --topics (comma-separated)")
        for key, value in REQUIRED_CONSUMER.items():
            given = self.kafka_properties.get(key)
            if given is not None and str(given).lower() != str(value).lower():
                raise ConfigurationError(
                    f"Kafka property {key}={given}{self.kafka_source(key)} would break the inbox's guarantee; "
                    f"it must be {str(value).lower()}")
        if "group.id" in self.kafka_properties:
            raise ConfigurationError(f"group.id{self.kafka_source('group.id')} is the inbox's group: use "
                                     "OUTBOX_INBOX_GROUP or --group instead")

    def kafka_source(self, prop: str) -> str:
        source = self.kafka_sources.get(prop)
        return f" (from {source})" if source else ""

    def topic_list(self) -> list[str]:
        return [topic.strip() for topic in self.topics.split(",") if topic.strip()]

    def consumer_config(self) -> dict[str, Any]:
        return {**DEFAULT_CONSUMER, **self.kafka_properties, **REQUIRED_CONSUMER, "group.id": self.group}
