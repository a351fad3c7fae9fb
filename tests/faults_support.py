"""What the fault and capacity tests need beyond the harness and the test upstream.

    ScriptedUpstream()              the test upstream, plus ``x-test-status-sequence: 503,201``:
                                    the n-th execution of an Idempotency-Key answers the n-th status
                                    (the last one repeats)
    free_port()                     a loopback port nothing listens on (yet)
    rss_kib(pid)                    a process's resident memory (VmRSS), in KiB
    send_and_vanish(...)            send a whole request, then close the socket before the answer
    tolerant_request(...)           a request whose answer may be cut short (upstream reset)
    worker_connections(envoy)       accepted connections per Envoy worker thread
    call                            a request as the seed document shows it (checks: contract.py)

Load (used by test_capacity.py), each in its own process so that the test process, the load and
the upstream do not share one interpreter lock:

    FastUpstream()                  a minimal asyncio HTTP/1.1 upstream that answers 201 with the
                                    request body echoed, counts its executions, and answers
                                    ``GET /__upstream/count`` (not counted) and ``/__upstream/ping``
    run_load(port, first, count, ...)
                                    ``count`` POSTs with distinct keys ``<prefix>-<first + i>`` over
                                    keep-alive connections; returns statuses and problem codes

Run ``python tests/faults_support.py upstream`` or ``... load PORT FIRST COUNT`` by hand to try them.
"""

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from harness import Response
from upstream import Upstream, _Handler

ORG = "Bearer ic_live_org_faults"
BODY = json.dumps({"externalId": "crm-9001", "fullName": "Ada Lovelace", "email": "ada@example.com"}).encode()


# -- requests and what to check ---------------------------------------------------------------

def request_headers(key, auth=ORG, extra=()):
    hdrs = [("content-type", "application/json"), ("x-test-status", "201"), ("authorization", auth)]
    if key is not None:
        hdrs.append(("idempotency-key", key))
    names = {name for name, _ in extra}
    return [(n, v) for n, v in hdrs if n not in names] + list(extra)


def call(envoy, key, headers=(), body=BODY, path="/v1/customers", method="POST", timeout=30):
    """A covered request (the upstream answers 201 unless headers say otherwise)."""
    return envoy.request(method, path, request_headers(key, extra=headers), body, timeout=timeout)


def worker_connections(envoy):
    """{worker: downstream connections accepted} from the listener's per-worker stats."""
    out = {}
    for name, value in envoy.stats().items():
        m = re.match(r"listener\.127\.0\.0\.1_\d+\.(worker_\d+)\.downstream_cx_total$", name)
        if m:
            out[m.group(1)] = value
    return out


# -- connections that end badly -----------------------------------------------------------------

def _raw_request(method, path, headers, body):
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    lines += [f"{n}: {v}" for n, v in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_and_vanish(port, key, headers=(), body=BODY, path="/v1/customers", linger_s=0.3):
    """Send a whole covered request, wait ``linger_s`` (the upstream is working on it), then close
    the connection without reading the answer: a client gone mid-flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(_raw_request("POST", path, request_headers(key, extra=headers), body))
        time.sleep(linger_s)
    finally:
        sock.close()


def tolerant_request(port, key, headers=(), body=BODY, path="/v1/customers", timeout=30):
    """Like call(), but an answer cut short is returned as (Response with the partial body,
    complete=False) instead of raising."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in request_headers(key, extra=headers):
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        hdrs = [(k.lower(), v) for k, v in resp.getheaders()]
        try:
            data, complete = resp.read(), True
        except http.client.IncompleteRead as cut:
            data, complete = cut.partial, False
        except (ConnectionError, OSError):
            data, complete = b"", False
        return Response(resp.status, resp.reason, hdrs, data), complete
    finally:
        conn.close()


# -- a test upstream with per-key scripted statuses ------------------------------------------------

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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._script_lock = threading.Lock()
        self._script_seen = Counter()

    def next_script_index(self, key):
        with self._script_lock:
            n = self._script_seen[key]
            self._script_seen[key] += 1
            return n

    def start(self):
        from http.server import ThreadingHTTPServer

        handler = type("ScriptedBoundHandler", (_ScriptedHandler,), {"upstream": self})
        server = ThreadingHTTPServer((self.host, self.requested_port), handler)
        server.daemon_threads = True
        server.request_queue_size = 128
        server.handle_error = _quiet_when_the_peer_left(server.handle_error)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"scripted:{self.port}", daemon=True)
        self._thread.start()
        return self


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- memory ---------------------------------------------------------------------------------------

def rss_kib(pid):
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every ``period`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid, period=0.25):
        self.pid = pid
        self.period = period
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self):
        return max(self.samples, default=0)


# -- load: a fast upstream and a keep-alive client, each in its own process -------------------------

async def _read_message(reader):
    """(start line, {lower-case header: value}, body) of one HTTP/1.1 message."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(chunks)
    else:
        length = int(headers.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
    return lines[0], headers, body


async def _serve_fast_upstream(port_out):
    executions = 0

    async def handle(reader, writer):
        nonlocal executions
        try:
            while True:
                try:
                    start, headers, body = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                target = start.split(" ")[1] if " " in start else "/"
                if target.startswith("/__upstream/"):
                    payload = json.dumps({"executions": executions}).encode() if target.startswith(
                        "/__upstream/count") else b"pong"
                    status = "200 OK"
                else:
                    executions += 1
                    payload = body
                    status = "201 Created"
                writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                             f"x-upstream-execution: {executions}\r\n"
                             f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    port_out(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class FastUpstream:
    """The asyncio upstream in its own process. ``executions()`` asks it how many it ran."""

    def __init__(self):
        self.proc = None
        self.port = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "upstream"], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"fast upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def executions(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/__upstream/count")
            return json.loads(conn.getresponse().read())["executions"]
        finally:
            conn.close()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def _load(port, first, count, prefix, concurrency, path, auth):
    statuses = Counter()
    codes = Counter()
    next_index = iter(range(first, first + count))

    async def connection():
        reader = writer = None
        try:
            for i in next_index:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                body = b'{"n":%d}' % i
                writer.write((f"POST {path} HTTP/1.1\r\nhost: load\r\nauthorization: {auth}\r\n"
                              f"idempotency-key: {prefix}-{i}\r\ncontent-type: application/json\r\n"
                              f"content-length: {len(body)}\r\n\r\n").encode() + body)
                start, headers, payload = await _read_message(reader)
                status = int(start.split(" ")[1])
                statuses[status] += 1
                if headers.get("content-type", "").startswith("application/problem+json"):
                    codes[json.loads(payload).get("code", "?")] += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    started = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {"statuses": {str(k): v for k, v in statuses.items()}, "codes": dict(codes),
            "seconds": round(time.monotonic() - started, 3), "requests": count}


def run_load(port, first, count, prefix, concurrency=64, path="/v1/load", auth=ORG, timeout=600):
    """``count`` covered POSTs, each with its own key, from a separate process; returns
    {"statuses": {"201": n, ...}, "codes": {problem code: n}, "seconds": s, "requests": count}."""
    out = subprocess.run([sys.executable, __file__, "load", str(port), str(first), str(count), prefix,
                          str(concurrency), path, auth], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"load failed ({out.returncode}): {out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    result["statuses"] = {int(k): v for k, v in result["statuses"].items()}
    return result


def _main(argv):
    if argv[:1] == ["upstream"]:
        asyncio.run(_serve_fast_upstream(lambda port: print(f"port {port}", flush=True)))
    elif argv[:1] == ["load"] and len(argv) >= 4:
        port, first, count = int(argv[1]), int(argv[2]), int(argv[3])
        prefix = argv[4] if len(argv) > 4 else f"load-{os.getpid()}"
        concurrency = int(argv[5]) if len(argv) > 5 else 64
        path = argv[6] if len(argv) > 6 else "/v1/load"
        auth = argv[7] if len(argv) > 7 else ORG
        print(json.dumps(asyncio.run(_load(port, first, count, prefix, concurrency, path, auth))))
    else:
        sys.exit("usage: faults_support.py upstream | load PORT FIRST COUNT [PREFIX CONCURRENCY PATH AUTH]")


if __name__ == "__main__":
    _main(sys.argv[1:])
