"""The processes the tests start (Envoys, etcds, upstreams, load), and what every one of them
needs: to die with the test process, a free port, and a log to read.

    ROOT                    the repository
    die_with_parent()       pre-exec for a child: the kernel kills it if the test process dies
    stop(proc, grace)       SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds
    free_port()             a loopback port free right now (for a process that cannot be given 0)
    LogFile                 mixin: ``log_path``, ``log_size()``, ``log_text(start)``, ``log_tail()``
    start_all(envoys)       start Envoys in parallel, each waiting until it is ready
"""

import ctypes
import signal
import socket
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def die_with_parent():
    """Child pre-exec: ask the kernel to kill the child if the test process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop(proc, grace):
    """Ends a child that may still run: asked first, killed if it has not gone in ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


_given = set()
_given_lock = threading.Lock()


def free_port():
    """A loopback port free right now (for processes that cannot be given port 0), and never one
    this process was given before: the kernel may hand the same port out twice in a row once the
    probing socket closes, and an etcd given it for both its client and peer URLs cannot start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with _given_lock:
            if port not in _given:
                _given.add(port)
                return port


class LogFile:
    """What a process the tests started wrote to its log (``self.log_path``)."""

    def log_size(self):
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, start=0):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40, start=0):
        return "\n".join(self.log_text(start).splitlines()[-lines:])


def start_all(envoys):
    """Start every Envoy at once (each takes a second or two to load the module); raise the first
    failure after stopping them all. Each is spawned from a thread that lives as long as its
    process: Envoy is sent SIGTERM when the thread that spawned it ends."""
    errors = []
    started = []

    def run(envoy, done):
        try:
            envoy.start()
            proc = envoy.proc
        except Exception as exc:  # noqa: BLE001 - raised below
            errors.append(exc)
            return
        finally:
            done.set()
        proc.wait()

    for envoy in envoys:
        done = threading.Event()
        threading.Thread(target=run, args=(envoy, done), daemon=True, name=f"envoy-{envoy.number}").start()
        started.append(done)
    for done in started:
        done.wait()
    if errors:
        for envoy in envoys:
            envoy.stop()
        raise errors[0]
    return envoys
