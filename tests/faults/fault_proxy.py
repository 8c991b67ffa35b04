"""A fault-injecting HTTP proxy for the S3 tests: it forwards every request to the real (moto) S3 server unchanged
(Host header included, so signatures still verify) and, by a fixed schedule, answers a burst of 503s, drops the
connection without an answer, or answers slowly. Counts what it injected."""
from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FaultSchedule:
    """Request n (counted from 1) gets: a 503 burst of `burst` answers every `burst_every` requests, a dropped
    connection every `drop_every`, a `slow_s` delay every `slow_every`; everything else is forwarded."""

    def __init__(self, burst_every: int = 6, burst: int = 2, drop_every: int = 7, slow_every: int = 5,
                 slow_s: float = 0.5):
        self.burst_every, self.burst, self.drop_every = burst_every, burst, drop_every
        self.slow_every, self.slow_s = slow_every, slow_s
        self.n = 0
        self.burst_left = 0
        self.injected: Counter = Counter()
        self.lock = threading.Lock()

    def next(self) -> str:
        with self.lock:
            self.n += 1
            if self.burst_left:
                self.burst_left -= 1
                kind = "503"
            elif self.n % self.burst_every == 0:
                self.burst_left = self.burst - 1
                kind = "503"
            elif self.n % self.drop_every == 0:
                kind = "drop"
            elif self.n % self.slow_every == 0:
                kind = "slow"
            else:
                kind = "pass"
            self.injected[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    schedule: FaultSchedule

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = self.schedule.next()
        if kind == "drop":  # the request arrived; the connection dies before any answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "503":
            payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if kind == "slow":
            time.sleep(self.schedule.slow_s)
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # a HEAD answer has no body but says the object's length: pass it on as it is
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up on a slow answer: expected
        pass


class FaultProxy:
    """Listening on 127.0.0.1 (a free port) in a thread of the test process; stop() ends it."""

    def __init__(self, upstream_url: str, schedule: FaultSchedule):
        up = urlparse(upstream_url)
        handler = type("Handler", (_Handler,), {"upstream": (up.hostname, up.port), "schedule": schedule})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.schedule = schedule
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
