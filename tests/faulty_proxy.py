"""A fault-injecting HTTP reverse proxy for tests: put it between s3fs and moto to see retries work.

Each request is relayed to the target as it came (method, path, query, headers, body: Content-Length,
chunked or aws-chunked) and the answer relayed back, on kept-alive connections. Instead, a seeded
share of requests is answered `503 SlowDown` (S3's throttling reply, XML body and all) and a share is
dropped: the connection reset with no answer. A share can also be lost: relayed, then the connection
reset before the answer (the store acted, the client cannot know). Requests whose path matches
`delay_path` wait `delay_s` first. `on_request(method, path)` sees every request before that and may
force its fate by returning "pass", "fail", "drop" or "lose" (None: let the dice decide).

    with FaultyProxy("http://127.0.0.1:5000", fail_rate=0.2, drop_rate=0.1, seed=0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        ...
        assert proxy.counts.failed > 0

As a process (prints its endpoint, then on SIGTERM/SIGINT its counts as JSON):
    python -m tests.faulty_proxy --target http://127.0.0.1:5000 --port 0 --fail-rate 0.1 --drop-rate 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

# Meaningful for one connection only; we manage both connections ourselves. Expect is answered here
# (BaseHTTPRequestHandler sends the 100 Continue), so the target gets the body without asking.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
SLOW_DOWN = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>{id}</RequestId>"
    "<HostId>faulty-proxy</HostId></Error>"
)
OUTCOMES = ("pass", "fail", "drop", "lose")
COUNTER = {"fail": "failed", "drop": "dropped", "lose": "lost"}


@dataclass
class Counts:
    """What the proxy did so far."""

    requests: int = 0
    forwarded: int = 0  # relayed to the target (and its answer back, unless lost)
    failed: int = 0  # answered 503 SlowDown instead
    dropped: int = 0  # connection reset instead
    lost: int = 0  # relayed, then the connection reset instead of the answer
    delayed: int = 0
    upstream_errors: int = 0  # the target did not answer (answered 502)

    @property
    def faults(self) -> int:
        """Injected faults: failed + dropped + lost."""
        return self.failed + self.dropped + self.lost


class FaultyProxy:
    """A threaded reverse proxy to `target` on 127.0.0.1 that fails, drops or loses a share of requests."""

    def __init__(
        self,
        target: str,
        *,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        lose_rate: float = 0.0,
        seed: int = 0,
        delay_path: str | None = None,
        delay_s: float = 0.0,
        on_request: Callable[[str, str], str | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout_s: float = 120.0,
    ):
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be http://host:port, got {target!r}")
        self.target = (parts.hostname, parts.port or 80)
        self.fail_rate, self.drop_rate, self.lose_rate = fail_rate, drop_rate, lose_rate  # may change while running
        self.delay_path = re.compile(delay_path) if delay_path else None
        self.delay_s = delay_s
        self.on_request = on_request
        self.upstream_timeout_s = upstream_timeout_s
        self.counts = Counts()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def endpoint(self) -> str:
        """http://127.0.0.1:PORT of the running proxy."""
        if self._server is None:
            raise RuntimeError("the proxy is not running; call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyProxy:
        """Listen and serve in a background thread."""
        self._stopping.clear()
        self._server = _Server(self._address, _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="faulty-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, cut open connections and wait for the handler threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_all()
        self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def decide(self, method: str, path: str) -> str:
        """This request's fate: "pass", "fail", "drop" or "lose" (and count it)."""
        forced = self.on_request(method, path) if self.on_request else None
        if forced not in (None, *OUTCOMES):
            raise ValueError(f"on_request must return None or one of {OUTCOMES}, got {forced!r}")
        with self._lock:
            self.counts.requests += 1
            draw = self._rng.random()  # drawn even when forced, so forcing one request keeps the rest as seeded
        outcome, edge = "pass", 0.0
        for rate, name in ((self.fail_rate, "fail"), (self.drop_rate, "drop"), (self.lose_rate, "lose")):
            edge += rate
            if draw < edge:
                outcome = name
                break
        outcome = forced or outcome
        if outcome != "pass":
            self.count(COUNTER[outcome])
        return outcome

    def hold(self, path: str) -> bool:
        """Wait delay_s if path matches delay_path; False if stop() came first."""
        if self.delay_path is not None and self.delay_s > 0 and self.delay_path.search(path):
            self.count("delayed")
            return not self._stopping.wait(self.delay_s)
        return not self._stopping.is_set()

    def count(self, name: str) -> None:
        """Add one to a counter."""
        with self._lock:
            setattr(self.counts, name, getattr(self.counts, name) + 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, proxy: FaultyProxy):
        self.proxy = proxy
        self._open: dict[socket.socket, threading.Thread] = {}
        self._resets: set[socket.socket] = set()
        self._guard = threading.Lock()
        super().__init__(address, handler)

    def track(self, sock: socket.socket, alive: bool) -> None:
        with self._guard:
            if alive:
                self._open[sock] = threading.current_thread()
            else:
                self._open.pop(sock, None)

    def reset_on_close(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
        with self._guard:
            self._resets.add(sock)

    def shutdown_request(self, request) -> None:
        with self._guard:
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            self.close_request(request)  # no shutdown(): it would send a polite FIN before the RST
        else:
            super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up is routine here
            super().handle_error(request, client_address)

    def close_all(self) -> None:
        """Cut every client connection so blocked handler threads return, then wait for them."""
        with self._guard:
            open_now = dict(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in open_now.values():
            thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server
    timeout = 300  # an idle client connection is closed after this

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; without this Nagle holds the body for the ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: http.client.HTTPConnection | None = None
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.upstream is not None:
                self.upstream.close()
            self.server.track(self.connection, alive=False)

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; every method is relayed the same way
        if name.startswith("do_"):
            return self._relay
        raise AttributeError(name)

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: tests read the counters

    def _relay(self) -> None:
        body = self._read_body()  # always whole, so a kept-alive connection stays in step
        proxy = self.server.proxy
        outcome = proxy.decide(self.command, self.path)
        if outcome == "drop":
            self._reset()
            return
        if outcome == "fail":
            self._slow_down()
            return
        if not proxy.hold(self.path):  # stopped while holding it: the connection is being cut anyway
            self.close_connection = True
            return
        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException) as exc:
            proxy.count("upstream_errors")
            self._answer(502, "Bad Gateway", [("Content-Type", "text/plain")], f"faulty proxy: {exc}".encode())
            return
        proxy.count("forwarded")
        if outcome == "lose":
            self._reset()
            return
        self._answer(status, reason, headers, data)

    def _reset(self) -> None:
        self.close_connection = True
        self.server.reset_on_close(self.connection)

    def _read_body(self) -> bytes:
        """The request body exactly as sent, chunk framing and trailers included."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = []
            while True:
                line = self.rfile.readline(65537)
                raw.append(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                raw.append(self.rfile.read(size + 2))  # data and its CRLF
            while raw[-1] not in (b"\r\n", b"\n", b""):  # trailers (aws-chunked checksums), then a blank line
                raw.append(self.rfile.readline(65537))
            return b"".join(raw)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the target as it came; its (status, reason, headers, decoded body)."""
        for reused in (self.upstream is not None, False):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(
                    *self.server.proxy.target, timeout=self.server.proxy.upstream_timeout_s
                )
            try:
                self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.upstream.putheader(name, value)
                self.upstream.endheaders(body or None)
                response = self.upstream.getresponse()
                data = response.read()
                return response.status, response.reason, response.getheaders(), data
            except Exception as exc:
                self.upstream.close()  # in an unknown state now
                self.upstream = None
                if not (reused and isinstance(exc, (ConnectionError, http.client.BadStatusLine))):
                    raise  # only a kept-alive connection the target closed meanwhile is worth a 2nd try
        raise AssertionError("unreachable")

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status, reason)
        # the body is re-framed with Content-Length (it was read whole); HEAD keeps the target's length
        framing = {"transfer-encoding"} | ({"content-length"} if self.command != "HEAD" else set())
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP | framing:
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _slow_down(self) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = SLOW_DOWN.format(id=request_id).encode()
        self._answer(503, "Slow Down", [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], body)


def main(argv: list[str] | None = None) -> None:
    """Run a FaultyProxy until SIGTERM/SIGINT; print its endpoint first and its counts (JSON) last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="http://127.0.0.1:PORT to relay to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share answered 503 SlowDown")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="share dropped (connection reset)")
    parser.add_argument("--lose-rate", type=float, default=0.0, help="share relayed, then reset before the answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay-path", help="regex: matching request paths are held --delay seconds")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with FaultyProxy(
        args.target,
        fail_rate=args.fail_rate,
        drop_rate=args.drop_rate,
        lose_rate=args.lose_rate,
        seed=args.seed,
        delay_path=args.delay_path,
        delay_s=args.delay,
        port=args.port,
    ) as proxy:
        print(proxy.endpoint, flush=True)
        while not stop.wait(0.5):
            pass
    print(json.dumps(asdict(proxy.counts)), flush=True)


if __name__ == "__main__":
    main()
