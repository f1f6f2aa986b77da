"""Logging set-up for the CLI (library modules only ever call ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

from outbox_relay.errors import ConfigurationError

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is structured data.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return text


def configure(level: str = "INFO", fmt: str = "text") -> None:
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ConfigurationError(f"log level {level!r} (OUTBOX_LOG_LEVEL or --log-level): choose DEBUG, INFO, WARNING"
                                 " or ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler narrates every job run at INFO; our ticks run many times a second. It also warns
    # whenever a periodic job's next run comes while the last one still runs: that is our design
    # (a slow run is simply not repeated), not news.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").addFilter(_not_still_running)
    # Alembic announces its plugins whenever a migration script directory is read (the schema check too).
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _not_still_running(record: logging.LogRecord) -> bool:
    return "maximum number of running instances reached" not in record.getMessage()
