"""The outbox under names of the deployment's choosing: OUTBOX_SCHEMA and OUTBOX_TABLE set alike for the
migration, the writer, the relay and the ledger check, end to end against the real services.

Those names are read once, at import, so each step runs in a subprocess with its own environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import psycopg

from outbox_relay.db.connection import conninfo
from tests.relaytools import Relays, cli, wait_until

NAMES = {"OUTBOX_SCHEMA": "shop_outbox", "OUTBOX_TABLE": "order_events"}

WRITER = """
import sys
from sqlalchemy import create_engine
from outbox_relay import enqueue

url, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = create_engine(url)
with engine.begin() as conn:
    for n in range(count):
        enqueue(conn, topic, {"n": n}, key=f"k{n % 7}")
engine.dispose()
"""


def column(database_url: str, query: str) -> list[Any]:
    with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
        return [row[0] for row in conn.execute(query)]


def test_a_relay_runs_end_to_end_under_other_schema_and_table_names(empty_database_url: str, topic: str,
                                                                    relays: Relays) -> None:
    env = {**os.environ, **NAMES}
    migrated = cli(empty_database_url, "migrate", "--lanes", "2", env=env)
    assert migrated.returncode == 0, migrated.stderr
    subprocess.run([sys.executable, "-c", WRITER, empty_database_url, topic, "60"], env=env, check=True,
                   capture_output=True, timeout=120)
    # Everything lives under the chosen names; nothing under the defaults.
    tables = column(empty_database_url, "SELECT table_schema || '.' || table_name FROM information_schema.tables"
                                        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")
    assert sorted(tables) == [
        "shop_outbox.order_events", "shop_outbox.order_events_idle_lanes", "shop_outbox.order_events_instances",
        "shop_outbox.order_events_lanes",
        "shop_outbox.order_events_sent", "shop_outbox.order_events_settings", "shop_outbox.order_events_state",
        "shop_outbox.order_events_unsent", "shop_outbox.outbox_relay_version"]
    assert column(empty_database_url, "SELECT nspname FROM pg_namespace WHERE nspname = 'outbox'") == []

    relay = relays.start(empty_database_url, **NAMES)
    wait_until(lambda: column(empty_database_url, "SELECT count(*) FROM shop_outbox.order_events_state"
                                                  " WHERE state = 'sent'") == [60], 60, "the relay to publish")
    relay.stop()
    transactional_ids = re.findall(r"transactional\.id (\S+)\)", relay.log())
    assert {t.rsplit(".", 2)[0].split(".", 2)[2] for t in transactional_ids} == {"shop_outbox.order_events"}
    assert {t.rsplit(".", 1)[1] for t in transactional_ids} == {"lane-0", "lane-1"}

    ledger = cli(empty_database_url, "verify", env=env)
    assert ledger.returncode == 0, ledger.stdout + ledger.stderr
    assert ledger.stdout.startswith("OK: committed=60 received=60 lost=0 duplicated=0 reordered=0 unknown=0")
