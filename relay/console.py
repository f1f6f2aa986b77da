"""The `outbox-relay` command: the CLI, or one line when OUTBOX_SCHEMA or OUTBOX_TABLE is not a usable name.

Those two are read once, when the models are imported (models, migrations and the relay must agree on
them), which is before the CLI's own error handling exists.
"""

from __future__ import annotations

import sys

from outbox_relay.errors import ConfigurationError


def main() -> int:
    try:
        from outbox_relay import cli
    except ConfigurationError as exc:
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return 2  # cli.EXIT_USAGE: configuration
    return cli.main()
