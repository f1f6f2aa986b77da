#!/usr/bin/env python3
"""Takes docs/status-page.png: a relay serving its status page while a writer keeps it busy.

Expects the services (`eval "$(scripts/services env)"`) and Debian's chromium.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from outbox_relay import enqueue, migrate
from outbox_relay.models import EVENTS_TABLE, SCHEMA, UNSENT_TABLE

EVENTS = f"{SCHEMA}.{EVENTS_TABLE}"  # the configured names (OUTBOX_SCHEMA, OUTBOX_TABLE)
UNSENT = f"{SCHEMA}.{UNSENT_TABLE}"

ROOT = Path(__file__).resolve().parent.parent
base = os.environ["OUTBOX_DATABASE_URL"]
name = f"screenshot_{uuid.uuid4().hex[:6]}"
admin = create_engine(base, isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    conn.execute(text(f'CREATE DATABASE "{name}"'))
url = base.rsplit("/", 1)[0] + f"/{name}"
migrate.upgrade(url, lanes=4)
engine = create_engine(url)
stop = threading.Event()


def write() -> None:
    n = 0
    while not stop.is_set():
        with engine.begin() as conn:
            for topic in ("orders", "payments", "shipments"):
                enqueue(conn, topic, {"n": n}, key=f"customer-{n % 50}")
            if n % 40 == 0:
                enqueue(conn, "payments", {"n": n}, key="later", delay=__import__("datetime").timedelta(hours=1))
        n += 1
        time.sleep(0.004)


env = {**os.environ, "OUTBOX_DATABASE_URL": url, "OUTBOX_HTTP": "18466", "OUTBOX_BACKLOG_INTERVAL": "2",
       "OUTBOX_INSTANCE": "relay-a", "OUTBOX_LOG_LEVEL": "WARNING"}
relay = subprocess.Popen([sys.executable, "-m", "outbox_relay", "run"], env=env)
writer = threading.Thread(target=write)
writer.start()
try:
    time.sleep(75)  # over a minute of history for the chart
    with engine.begin() as conn:  # one parked event, as an operator would see it
        conn.execute(text(f"INSERT INTO {UNSENT} (id, lane_key, state, attempts, last_error) SELECT id, lane_key,"
                          f" 'failed', 1, 'MSG_SIZE_TOO_LARGE' FROM {EVENTS} e WHERE id = (SELECT max(id) FROM"
                          f" {EVENTS} s WHERE NOT EXISTS (SELECT 1 FROM {UNSENT} u WHERE u.id = s.id))"))
    time.sleep(4)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", "--virtual-time-budget=4000", "--window-size=430,1400",
                    f"--screenshot={ROOT / 'docs' / 'status-page.png'}", "http://127.0.0.1:18466/"], check=True)
finally:
    stop.set()
    writer.join()
    relay.send_signal(signal.SIGTERM)
    relay.wait(30)
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
print(f"wrote {ROOT / 'docs' / 'status-page.png'}")
