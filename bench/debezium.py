"""Debezium's PostgreSQL connector with the outbox EventRouter on Kafka Connect 4.1 standalone, for the bench.

The jars come from Maven Central (scripts/debezium/pom.xml) into ~/.m2, copied once into
<services dir>/debezium/jars. Each `Connect` is one standalone worker JVM with one connector reading the
events table through a logical replication slot (pgoutput) and routing each row to the topic in its `topic`
column, the event id in the `outbox-event-id` header, like the relay's messages. What it needs that the relay
does not: `wal_level=logical`, a replication slot (which retains WAL until the connector confirms it, forever
if the connector is gone: `drop_slot` runs after every run), a publication, and a JVM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg

from outbox_relay.db.connection import conninfo
from outbox_relay.models import EVENTS_TABLE, SCHEMA

ROOT = Path(__file__).resolve().parent.parent
POM = ROOT / "scripts" / "debezium" / "pom.xml"
LOG4J = ROOT / "scripts" / "kafka" / "log4j2.properties"
JARS = Path(os.environ.get("OUTBOX_SERVICES_DIR", ROOT / ".services")) / "debezium" / "jars"
# What Kafka's own bin/connect-standalone.sh gives the worker.
HEAP = os.environ.get("OUTBOX_BENCH_CONNECT_HEAP", "-Xms256M -Xmx2G")


class DebeziumError(RuntimeError):
    """Kafka Connect or its connector could not be set up."""


def resolve_jars() -> Path:
    """Copy Connect's and Debezium's jars out of Maven once per pom version (~/.m2 caches the download)."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = JARS / ".pom-sha256"
    if marker.exists() and marker.read_text() == digest:
        return JARS
    mvn = shutil.which("mvn")
    if mvn is None or shutil.which("java") is None:
        raise DebeziumError("the Debezium runs need Maven and Java 17+ (apt-get install maven openjdk-17-jre-headless)")
    print("debezium: resolving Kafka Connect and Debezium jars with Maven (first time only)", flush=True)
    shutil.rmtree(JARS, ignore_errors=True)
    result = subprocess.run([mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                             f"-DoutputDirectory={JARS}", "-DincludeScope=runtime"], text=True, capture_output=True)
    if result.returncode != 0:
        raise DebeziumError(f"Maven could not resolve the Debezium jars:\n{result.stdout[-3000:]}"
                            f"{result.stderr[-2000:]}")
    marker.write_text(digest)
    return JARS


def slot_name(name: str) -> str:
    return f"bench_{name}".replace("-", "_")[:60]


class Connect:
    """One Kafka Connect standalone worker running the Debezium connector against one database."""

    def __init__(self, database_url: str, workdir: Path, name: str, bootstrap: str, rest_port: int,
                 poll_interval_ms: int | None = None) -> None:
        self.name = f"kafka-connect-{name}"
        self.url = database_url
        self.dir = workdir / self.name
        self.slot = slot_name(name)
        self.log_path = self.dir / "connect.log"
        self.process: subprocess.Popen[bytes] | None = None
        params = psycopg.conninfo.conninfo_to_dict(conninfo(database_url))
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "offsets").unlink(missing_ok=True)
        (self.dir / "worker.properties").write_text("\n".join([
            f"bootstrap.servers={bootstrap}",
            "key.converter=org.apache.kafka.connect.converters.ByteArrayConverter",
            "value.converter=org.apache.kafka.connect.converters.ByteArrayConverter",
            f"offset.storage.file.filename={self.dir / 'offsets'}",
            "offset.flush.interval.ms=1000",
            f"listeners=http://127.0.0.1:{rest_port}",
            "plugin.discovery=service_load",  # the jars' service manifests: no seconds-long classpath scan
            "",
        ]))
        connector = {
            "name": f"outbox-{name}",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "plugin.name": "pgoutput",
            "database.hostname": str(params.get("host", "127.0.0.1")),
            "database.port": str(params.get("port", 5432)),
            "database.user": str(params.get("user", "postgres")),
            "database.password": str(params.get("password", "")),
            "database.dbname": str(params["dbname"]),
            "topic.prefix": f"bench-cdc-{name}",
            "table.include.list": f"{SCHEMA}.{EVENTS_TABLE}",
            "slot.name": self.slot,
            "publication.name": self.slot,
            "publication.autocreate.mode": "filtered",
            "snapshot.mode": "no_data",  # stream what is written from now on, like a relay on a new outbox
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "transforms.outbox.table.field.event.id": "event_id",
            "transforms.outbox.table.field.event.key": "key",
            "transforms.outbox.table.field.event.payload": "value",
            "transforms.outbox.route.by.field": "topic",
            "transforms.outbox.route.topic.replacement": "${routedByValue}",
            "transforms.outbox.table.fields.additional.placement": "event_id:header:outbox-event-id",
        }
        if poll_interval_ms is not None:
            connector["poll.interval.ms"] = str(poll_interval_ms)
        self.connector = connector
        (self.dir / "connector.properties").write_text("".join(f"{k}={v}\n" for k, v in connector.items()))

    def start(self) -> Connect:
        jars = resolve_jars()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["java", *HEAP.split(), f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={self.dir}",
                 "-cp", f"{jars}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
                 str(self.dir / "worker.properties"), str(self.dir / "connector.properties")],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for extra in sorted(self.dir.glob("*.log")):
            if extra != self.log_path:
                text += extra.read_text(errors="replace")[-20000:]
        return text

    def streaming(self) -> bool:
        """The connector holds its slot open: from here on every committed insert reaches Kafka."""
        with psycopg.connect(conninfo(self.url), autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
        return bool(row and row[0])

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def drop_slot(self) -> None:
        """A slot left behind retains WAL forever; drop it (and the publication) once Connect is gone."""
        with psycopg.connect(conninfo(self.url), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND NOT active", (self.slot,))
            conn.execute(f'DROP PUBLICATION IF EXISTS "{self.slot}"')
