"""Serve /metrics, /healthz and /readyz over HTTP from a background thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bmsd.errors import BmsdError

#: Returns (ok, details); details say what is not ready.
Probe = Callable[[], tuple[bool, dict[str, object]]]


class HealthServer:
    """An HTTP endpoint for Prometheus and for liveness/readiness probes."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 alive: Probe, ready: Probe) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _probe(alive),
            "/readyz": lambda: _probe(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds are not news

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise BmsdError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror}; set [metrics] addr"
                " or BMSD_METRICS_ADDR to a free address") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="bmsd-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _probe(probe: Probe) -> tuple[int, str, bytes]:
    ok, details = probe()
    body = json.dumps({"ok": ok, **details}).encode() + b"\n"
    return (200 if ok else 503), "application/json", body
