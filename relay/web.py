"""The daemon's HTTP side: /metrics, /healthz, /readyz, /api/status and the status page at /.

Off unless ``OUTBOX_HTTP`` is set; a bare port binds to 127.0.0.1, so nothing is exposed
beyond the host unless an address says so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from outbox_relay.errors import ConfigurationError
from outbox_relay.metrics import Metrics

log = logging.getLogger(__name__)


def parse_address(value: str) -> tuple[str, int]:
    """'9466' -> ('127.0.0.1', 9466); '0.0.0.0:9466' -> as given."""
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigurationError(f"OUTBOX_HTTP={value!r}: expected PORT or HOST:PORT") from None
    if not 0 <= number < 65536:  # bind() would raise an OverflowError (0: any free port)
        raise ConfigurationError(f"OUTBOX_HTTP={value!r}: the port must be 0 to 65535")
    return host or "127.0.0.1", number


class StatusServer:
    def __init__(self, address: str, metrics: Metrics, readiness: Callable[[], tuple[bool, list[str]]]) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.page = resources.files("outbox_relay").joinpath("static/status.html").read_bytes()
        host, port = parse_address(address)
        handler = type("Handler", (_Handler,), {"server_side": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="outbox-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> None:
        self.thread.start()
        log.info("serving status page, metrics and health at %s", self.url, extra={"action": "http_started"})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def status(self) -> dict[str, Any]:
        ready, problems = self.readiness()
        snap, measured_at = self.metrics.last_snapshot, self.metrics.measured_at
        # Told by this server's clock, not the browser's: a large backlog is counted minutes apart.
        measured_age = time.time() - measured_at if measured_at is not None else None
        return {"ready": ready, "problems": problems, "snapshot": snap.to_json() if snap else None,
                "measured_age_s": measured_age, "history": list(self.metrics.history)}


class _Handler(BaseHTTPRequestHandler):
    server_side: StatusServer
    _head = False

    def do_HEAD(self) -> None:
        """What GET would answer, headers only (uptime checkers and curl -I use it)."""
        self._head = True
        try:
            self.do_GET()
        finally:
            self._head = False

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        side = self.server_side
        if path == "/metrics":
            self._send(200, side.metrics.exposition(), "text/plain; version=0.0.4")
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/readyz":
            ready, problems = side.readiness()
            body = json.dumps({"ready": ready, "problems": problems}).encode()
            self._send(200 if ready else 503, body, "application/json")
        elif path == "/api/status":
            self._send(200, json.dumps(side.status()).encode(), "application/json")
        elif path in ("/", "/index.html"):
            self._send(200, side.page, "text/html; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not self._head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
        pass
