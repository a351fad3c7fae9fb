"""Test upstream: a threaded HTTP/1.1 server that counts the requests it executes.

Every request that reaches it (other than the control endpoints) is an
*execution*: it is recorded with its method, path, query, Idempotency-Key,
headers and body, and its answer carries ``x-upstream-execution: <n>`` (unique
per execution) so a replay can be told from a new execution.

Behaviour is chosen by request headers:

    x-test-status: 422          answer this status (default 200)
    x-test-delay-ms: 500        sleep before answering
    x-test-body-bytes: 204800   answer a deterministic pseudo-random binary body of
                                that size (see ``binary_body``); seed with x-test-body-seed
    x-test-set-cookie: a=1      add a Set-Cookie header (one per x-test-set-cookie line)
    x-test-reset: before-headers | after-headers
                                close the connection abruptly (TCP RST), either
                                without answering or after the headers and part of the body

By default the answer echoes the request body (and its content-type).

Control endpoints, answered on the upstream's own port and never counted:

    GET  /__upstream/executions[?method=&path=&key=]   {"total": n, "count": m, "executions": [...]}
    POST /__upstream/reset                              forget all executions
    GET  /__upstream/ping                               200 "pong"

    x-test-status-sequence: 503,201
                                (ScriptedUpstream) the n-th execution of a key answers the n-th
                                status, the last one repeating

Run standalone: ``python3 tests/e2e/support/upstream.py --port 8080``.
"""

import argparse
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/__upstream/"
NO_BODY_STATUSES = {204, 304}


def binary_body(size, seed=0):
    """The body the upstream answers for ``x-test-body-bytes: size`` (and seed)."""
    return random.Random(f"{seed}:{size}").randbytes(size)


@dataclass
class Execution:
    seq: int
    method: str
    path: str  # without the query string
    query: str
    key: object  # the Idempotency-Key value (str), or None when absent
    headers: list = field(repr=False)  # [(lower-case name, value)], in order
    body: bytes = field(repr=False)
    at: float = 0.0  # time.monotonic() when the request arrived

    def header(self, name):
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def as_json(self):
        return {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "key": self.key,
            "headers": self.headers,
            "body_bytes": len(self.body),
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Envoy opens many connections at once under load: the default backlog of 5 (set when the
    # server is built, so it must be a class attribute) would refuse some of them.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-upstream/1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    upstream = None  # the Upstream, set on the bound subclass

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def _read_body(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        body = self._read_body()
        if self.path.startswith(CONTROL_PREFIX):
            self._control(body)
            return
        headers = [(k.lower(), v) for k, v in self.headers.items()]
        ex = self.upstream._record(self.command, self.path, headers, body)
        get = self.headers.get

        delay_ms = int(get("x-test-delay-ms") or 0)
        if delay_ms:
            time.sleep(delay_ms / 1000)

        status = int(get("x-test-status") or 200)
        if get("x-test-body-bytes") is not None:
            payload = binary_body(int(get("x-test-body-bytes")), get("x-test-body-seed") or 0)
            content_type = "application/octet-stream"
        else:
            payload = body
            content_type = get("content-type") or "application/octet-stream"
        if status in NO_BODY_STATUSES or self.command == "HEAD":
            payload = b""

        reset = (get("x-test-reset") or "").lower()
        if reset == "before-headers":
            self._abort()
            return

        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("x-upstream-execution", str(ex.seq))
        for cookie in self.headers.get_all("x-test-set-cookie") or []:
            self.send_header("set-cookie", cookie)
        if status not in NO_BODY_STATUSES:
            self.send_header("content-length", str(len(payload) + (1 if reset == "after-headers" else 0)))
        self.end_headers()
        if reset == "after-headers":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._abort()
            return
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _abort(self):
        """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _control(self, body):
        parts = urlsplit(self.path)
        name = parts.path[len(CONTROL_PREFIX):]
        if name == "ping":
            self._reply(200, b"pong", "text/plain")
        elif name == "reset" and self.command == "POST":
            self.upstream.reset()
            self._reply(200, b'{"reset": true}')
        elif name == "executions":
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            found = self.upstream.executions(q.get("method"), q.get("path"), q.get("key"))
            out = {"total": self.upstream.total, "count": len(found), "executions": [e.as_json() for e in found]}
            self._reply(200, json.dumps(out).encode())
        else:
            self._reply(404, b'{"error": "unknown control endpoint"}')

    def _reply(self, status, payload, content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Upstream:
    """Owns the server thread and the execution log. Use as ``Upstream().start()``."""

    handler = _Handler

    def __init__(self, host="127.0.0.1", port=0, quiet=True):
        self.host = host
        self.requested_port = port
        self.quiet = quiet
        self._lock = threading.Lock()
        self._executions = []
        self._seq = 0
        self._server = None
        self._thread = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self):
        handler = type("BoundHandler", (self.handler,), {"upstream": self})
        server = _Server((self.host, self.requested_port), handler)
        server.handle_error = _quiet_when_the_peer_left(server.handle_error)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"upstream:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self):
        return self._server.server_address[1]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- execution log ---------------------------------------------------------------
    def _record(self, method, target, headers, body):
        parts = urlsplit(target)
        with self._lock:
            self._seq += 1
            ex = Execution(
                seq=self._seq,
                method=method,
                path=parts.path,
                query=parts.query,
                key=next((v for k, v in headers if k == "idempotency-key"), None),
                headers=headers,
                body=body,
                at=time.monotonic(),
            )
            self._executions.append(ex)
        if not self.quiet:
            print(f"upstream EXECUTED #{ex.seq} {method} {target} key={ex.key}", flush=True)
        return ex

    def executions(self, method=None, path=None, key=None, header=None):
        """Executions matching every given filter; ``header=(name, value)``."""
        with self._lock:
            found = list(self._executions)
        if method is not None:
            found = [e for e in found if e.method == method]
        if path is not None:
            found = [e for e in found if e.path == path]
        if key is not None:
            found = [e for e in found if e.key == key]
        if header is not None:
            found = [e for e in found if e.header(header[0]) == header[1]]
        return found

    def count(self, method=None, path=None, key=None, header=None):
        return len(self.executions(method, path, key, header))

    @property
    def total(self):
        with self._lock:
            return len(self._executions)

    def reset(self):
        with self._lock:
            self._executions.clear()


class _ScriptedHandler(_Handler):
    def _handle(self):
        sequence = self.headers.get("x-test-status-sequence")
        if sequence and not self.path.startswith("/__upstream/"):
            statuses = [s.strip() for s in sequence.split(",") if s.strip()]
            key = self.headers.get("idempotency-key")
            n = self.upstream.next_script_index(key)
            del self.headers["x-test-status"]
            self.headers["x-test-status"] = statuses[min(n, len(statuses) - 1)]
        super()._handle()


def _quiet_when_the_peer_left(handle_error):
    """Envoy closing a connection the upstream still writes to (the tests cause it on purpose) is
    not worth a traceback."""

    def handle(request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            handle_error(request, client_address)

    return handle


class ScriptedUpstream(Upstream):
    """The counting test upstream; with ``x-test-status-sequence: 503,201`` the first execution of
    a key answers 503 and every later one 201."""

    handler = _ScriptedHandler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._script_lock = threading.Lock()
        self._script_seen = Counter()

    def next_script_index(self, key):
        with self._script_lock:
            n = self._script_seen[key]
            self._script_seen[key] += 1
            return n



def main():
    parser = argparse.ArgumentParser(description="counting test upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    up = Upstream(args.host, args.port, quiet=False).start()
    print(f"test upstream on http://{args.host}:{up.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        up.stop()


# -- a test upstream with per-key scripted statuses ------------------------------------------------


if __name__ == "__main__":
    main()
