"""Settings: flags over environment over defaults, librdkafka passthrough, redaction, validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox_relay.cli import build_parser
from outbox_relay.config import Settings
from outbox_relay.errors import ConfigurationError
from outbox_relay.models import EVENTS_TABLE, SCHEMA, TOPIC_PATTERN
from outbox_relay.progress import MAX_RECORD_IDS
from outbox_relay.write import DEFAULT_MAX_MESSAGE_BYTES

BASE = {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u:hunter2@db/app", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}


def test_flags_win_over_environment_over_defaults() -> None:
    env = {**BASE, "OUTBOX_BATCH_SIZE": "70", "OUTBOX_POLL_INTERVAL": "2"}
    settings = Settings.from_sources({"batch_size": "50"}, env)
    assert (settings.batch_size, settings.poll_interval, settings.max_attempts) == (50, 2.0, 3)


def test_librdkafka_properties_pass_through_from_env_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "kafka.properties"
    config.write_text("# comment\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n")
    settings = Settings.from_sources(
        {"kafka_config_file": str(config), "kafka_property": ["sasl.mechanism=PLAIN"]},
        {**BASE, "OUTBOX_KAFKA_SASL_PASSWORD": "s3cret", "OUTBOX_KAFKA_TIMEOUT": "5"},
    )
    assert settings.kafka_properties == {"sasl.password": "s3cret", "security.protocol": "SASL_SSL",
                                         "sasl.mechanism": "PLAIN", "bootstrap.servers": "k:9092"}
    assert settings.kafka_timeout == 5.0  # our own setting, not a librdkafka property
    producer = settings.producer_config()
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    redacted = str(settings.redacted())
    assert "s3cret" not in redacted and "hunter2" not in redacted and "'sasl.password': '***'" in redacted


@pytest.mark.parametrize(("change", "message"), [
    ({"OUTBOX_BATCH_SIZE": "many"}, "OUTBOX_BATCH_SIZE='many' is not a valid int"),
    ({"OUTBOX_BATCH_SIZE": "0"}, "batch_size must be >= 1"),
    ({"OUTBOX_FAILED_KEY_POLICY": "drop"}, "choose one of hold, skip"),
    ({"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE": "false"}, "enable.idempotence=false .*would break delivery guarantees"),
    ({"OUTBOX_KAFKA_TRANSACTIONAL_ID": "x"}, "transactional.id .*is set per lane"),
    ({"OUTBOX_DATABASE_URL": ""}, "no database"),
    ({"OUTBOX_KAFKA_CONFIG_FILE": "/nonexistent"}, "does not exist"),
    # float() reads these, and the scheduler then failed with a traceback (OverflowError) or not at all
    ({"OUTBOX_BACKLOG_INTERVAL": "inf"}, "OUTBOX_BACKLOG_INTERVAL='inf' is not a finite number"),
    ({"OUTBOX_POLL_INTERVAL": "nan"}, "OUTBOX_POLL_INTERVAL='nan' is not a finite number"),
    ({"OUTBOX_INSTANCE_TIMEOUT": "NaN"}, "OUTBOX_INSTANCE_TIMEOUT='NaN' is not a finite number"),
    ({"OUTBOX_LANE_INTERVAL": "1e300"}, "OUTBOX_LANE_INTERVAL='1e300' is not a finite number"),
    ({"OUTBOX_RETENTION_HOURS": "-1"}, "retention_hours must be >= 0"),
])
def test_bad_settings_name_the_problem(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_sources({}, {**BASE, **change})


def test_every_flag_shows_its_environment_variable_in_help() -> None:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = " ".join(out.getvalue().split())  # argparse wraps lines
    for variable in ("OUTBOX_DATABASE_URL", "OUTBOX_BATCH_SIZE", "OUTBOX_LISTEN", "OUTBOX_HTTP", "OUTBOX_MAX_ATTEMPTS"):
        assert f"env {variable}" in help_text


def test_default_kafka_names_carry_the_outbox_identity_and_are_valid_kafka_names() -> None:
    settings = Settings.from_sources({}, BASE)
    names = settings.kafka_names("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e")
    assert names.transactional_id(3) == f"outbox-relay.app.{SCHEMA}.{EVENTS_TABLE}.0b5e6c1d-7a1.lane-3"
    assert names.progress_topic == f"outbox-relay.app.{SCHEMA}.{EVENTS_TABLE}.0b5e6c1d-7a1.progress"
    # Two servers whose databases are both named `app` get different names.
    assert settings.kafka_names("5d0c9e2a-0000-4000-8000-000000000000").progress_topic != names.progress_topic

    odd = Settings.from_sources({}, {**BASE, "OUTBOX_DATABASE_URL": "postgresql+psycopg://u@h/shop+eu ü"})
    topic = odd.kafka_names("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e").progress_topic
    assert re.fullmatch(TOPIC_PATTERN, topic), topic
    assert topic.startswith(f"outbox-relay.shop_eu__.{SCHEMA}.{EVENTS_TABLE}.")


def test_explicit_kafka_names_win_and_the_identity_still_travels() -> None:
    settings = Settings.from_sources({}, {**BASE, "OUTBOX_TRANSACTIONAL_ID_PREFIX": "svc",
                                          "OUTBOX_PROGRESS_TOPIC": "svc-progress"})
    names = settings.kafka_names("0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e")
    assert (names.transactional_id(0), names.progress_topic) == ("svc.lane-0", "svc-progress")
    assert names.outbox_id == "0b5e6c1d-7a1f-4a57-9b5e-0e0a1c2b3d4e"


def test_limits_agree_the_producer_sends_what_the_write_api_accepts_and_a_record_always_fits() -> None:
    settings = Settings.from_sources({}, BASE)
    assert settings.producer_config()["message.max.bytes"] == DEFAULT_MAX_MESSAGE_BYTES
    Settings.from_sources({}, {**BASE, "OUTBOX_BATCH_SIZE": str(MAX_RECORD_IDS)})
    with pytest.raises(ConfigurationError, match=f"batch_size must be <= {MAX_RECORD_IDS}"):
        Settings.from_sources({}, {**BASE, "OUTBOX_BATCH_SIZE": "100000"})


def test_every_command_shows_the_schema_and_table_variables_in_help() -> None:
    import contextlib
    import io

    for command in (["run"], ["status"], ["migrate"], ["failed", "list"], ["lanes", "show"], ["verify"], []):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        help_text = " ".join(out.getvalue().split())
        assert "OUTBOX_SCHEMA (default outbox)" in help_text and "OUTBOX_TABLE (default events)" in help_text


@pytest.mark.parametrize(("where", "source"), [
    ("env", "OUTBOX_KAFKA_PORT"), ("file", "kafka.properties:2"), ("flag", "-X port"),
])
def test_a_property_librdkafka_rejects_is_named_with_where_it_was_set(tmp_path: Path, where: str,
                                                                       source: str) -> None:
    from outbox_relay.publisher import validate_config

    config = tmp_path / "kafka.properties"
    config.write_text("linger.ms=5\nport=29092\n" if where == "file" else "linger.ms=5\n")
    env = {**BASE, "OUTBOX_KAFKA_CONFIG_FILE": str(config)}
    if where == "env":
        env["OUTBOX_KAFKA_PORT"] = "29092"
    settings = Settings.from_sources({"kafka_property": ["port=29092"]} if where == "flag" else {}, env)
    with pytest.raises(ConfigurationError) as raised:
        validate_config(settings.producer_config(), "outbox-relay.configuration-check", settings.kafka_sources)
    message = str(raised.value)
    assert 'No such configuration property: "port" (from ' in message and "\n" not in message
    assert message.endswith(f"(from {config}:2)" if where == "file" else f"(from {source})")


def test_a_weakened_guarantee_names_where_it_was_set() -> None:
    with pytest.raises(ConfigurationError, match=r"acks=1 \(from -X acks\) would break"):
        Settings.from_sources({"kafka_property": ["acks=1"]}, BASE)
    with pytest.raises(ConfigurationError, match=r"enable.idempotence=false \(from OUTBOX_KAFKA_ENABLE_IDEMPOTENCE\)"):
        Settings.from_sources({}, {**BASE, "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE": "false"})


@pytest.mark.parametrize("value", ["99999", "0.0.0.0:-1", "127.0.0.1:65536"])
def test_an_http_port_out_of_range_is_one_line(value: str) -> None:
    from outbox_relay.web import parse_address

    with pytest.raises(ConfigurationError, match=f"OUTBOX_HTTP={value!r}: the port must be 0 to 65535"):
        parse_address(value)  # was an OverflowError from bind() when the daemon started


def test_an_unknown_log_level_names_the_setting() -> None:
    from outbox_relay import logs

    with pytest.raises(ConfigurationError, match=r"log level 'bogus' .*choose DEBUG, INFO, WARNING or ERROR"):
        logs.configure("bogus")


def test_a_kafka_config_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    binary = tmp_path / "kafka.properties"
    binary.write_bytes(b"linger.ms=5\n\xff\xfe=1\n")  # was "'utf-8' codec can't decode byte 0xff", no file named
    with pytest.raises(ConfigurationError, match=f"Kafka config file '{binary}' is not UTF-8 text"):
        Settings.from_sources({}, {**BASE, "OUTBOX_KAFKA_CONFIG_FILE": str(binary)})


def test_an_outbox_variable_nothing_reads_is_named_with_the_setting_it_resembles() -> None:
    """A typo in a variable's name silently kept the setting's default: OUTBOX_BATCHSIZE=10 ran with 1000."""
    from outbox_relay.config import unknown_variables

    env = {**BASE, "OUTBOX_BATCHSIZE": "10", "OUTBOX_POLL_INTERVALL": "0.1", "OUTBOX_INBOX_GRUOP": "billing",
           "OUTBOX_WHATEVER": "1", "OUTBOX_SCHEMA": "shop", "OUTBOX_INBOX_GROUP": "billing",
           "OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN", "OUTBOX_SERVICES_PG_PORT": "1", "PATH": "/bin"}
    assert unknown_variables(env) == [
        "OUTBOX_BATCHSIZE is not a setting and is ignored: did you mean OUTBOX_BATCH_SIZE?",
        "OUTBOX_INBOX_GRUOP is not a setting and is ignored: did you mean OUTBOX_INBOX_GROUP?",
        "OUTBOX_POLL_INTERVALL is not a setting and is ignored: did you mean OUTBOX_POLL_INTERVAL?",
        "OUTBOX_WHATEVER is not a setting and is ignored",
    ]


def test_every_outbox_variable_the_project_reads_is_never_called_unread() -> None:
    """OUTBOX_INBOX_SCHEMA (the inbox's tables, models/inbox.py) and OUTBOX_LANES (migrate's lane count)
    were named "not a setting and ignored", the first with "did you mean OUTBOX_SCHEMA?", which would move
    the outbox's tables. Every name the package, its migrations or the project's tooling reads is known."""
    from outbox_relay.config import unknown_variables

    root = Path(__file__).resolve().parent.parent
    read = re.compile(r"""(?:environ\.get\(|environ\[|getenv\(|_identifier\()\s*["'](OUTBOX_[A-Z0-9_]+)["']""")
    names = {name for folder in ("relay", "models", "alembic", "scripts", "bench", "tests")
             for path in (root / folder).rglob("*.py") for name in read.findall(path.read_text())}
    assert {"OUTBOX_INBOX_SCHEMA", "OUTBOX_LANES", "OUTBOX_SCHEMA", "OUTBOX_TABLE"} <= names, names
    assert unknown_variables(dict.fromkeys(names, "1")) == []
