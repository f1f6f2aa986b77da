"""``python -m outbox_relay``: the ``outbox-relay`` command, where the script is not on PATH."""

import sys

from outbox_relay.console import main

sys.exit(main())
