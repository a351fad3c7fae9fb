"""Load and what it costs, each in its own process so that the test process, the load and the
upstream do not share one interpreter lock (this file runs as a script too, on the standard
library alone):

    serve(answer, port_out)         an asyncio HTTP/1.1 server whose answers ``answer`` gives
    FastUpstream()                  a minimal asyncio HTTP/1.1 upstream that answers 201 with the
                                    request body echoed, counts its executions, and answers
                                    ``GET /__upstream/count`` (not counted) and ``/__upstream/ping``
    run_load(port, first, count, ...)
                                    ``count`` POSTs with distinct keys ``<prefix>-<first + i>`` over
                                    keep-alive connections; returns statuses and problem codes
    rss_kib(pid), RssSampler(pid)   a process's resident memory (VmRSS) in KiB, now and at peak

Run ``python tests/e2e/support/load.py upstream`` or ``... load PORT FIRST COUNT`` by hand to
try them.
"""

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path


# The organisation of a load run by hand.
ORG = "Bearer ic_live_org_load"


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


async def serve(answer, port_out):
    """An asyncio HTTP/1.1 server on a loopback port, which it hands to ``port_out``:
    ``await answer(target, headers, body)`` gives each request's (status, payload, extra header
    lines); every answer is JSON."""

    async def handle(reader, writer):
        try:
            while True:
                try:
                    start, headers, body = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                target = start.split(" ")[1] if " " in start else "/"
                status, payload, extra = await answer(target, headers, body)
                writer.write(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}"
                             f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    port_out(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


async def _serve_fast_upstream(port_out):
    executions = 0

    async def answer(target, _headers, body):
        nonlocal executions
        if target.startswith("/__upstream/"):
            count = json.dumps({"executions": executions}).encode()
            return "200 OK", count if target.startswith("/__upstream/count") else b"pong", ""
        executions += 1
        return "201 Created", body, f"x-upstream-execution: {executions}\r\n"

    await serve(answer, port_out)


class FastUpstream:
    """The asyncio upstream in its own process. ``executions()`` asks it how many it ran.
    ``command`` runs another server instead, one that prints ``port <n>`` once it listens."""

    def __init__(self, command=None):
        self.command = command or [sys.executable, __file__, "upstream"]
        self.proc = None
        self.port = None

    def start(self):
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"{self.command} did not start: {line!r}")
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


def run_load(port, first, count, prefix, concurrency=64, path="/v1/load", *, auth, timeout=600):
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
        sys.exit("usage: load.py upstream | load PORT FIRST COUNT [PREFIX CONCURRENCY PATH AUTH]")


if __name__ == "__main__":
    _main(sys.argv[1:])
