"""The processes a run starts: Envoys pinned to a CPU, etcd, and the relay that puts etcd 1 ms
away."""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from support.etcd import Etcd
from host import CLK_TCK, ENVOY, LOAD_CPU, PAGE, ROOT
from configs import FAR_DELAY_MS

# Ports for the proxies, below the kernel's ephemeral range: an outgoing connection (the
# proxies' to etcd and the upstream, wrk's) can then never take one between picking and binding.
_PORTS = itertools.count(10_000)


def free_port():
    lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in _PORTS:
        if port >= lowest_ephemeral:
            break
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port below the ephemeral range")


class Envoy:
    """One Envoy process, pinned to `cpu`, with its own admin port."""

    live = []

    def __init__(self, name, workdir, make_config, cpu):
        self.name = name
        self.port = free_port()
        self.admin_port = free_port()
        self.cpu = cpu
        self.workdir = workdir
        self.config_path = workdir / f"{name}.json"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(json.dumps(make_config(self.port, self.admin_port), indent=1))
        self.process = None

    def validate(self):
        result = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(self.config_path), "--log-level", "error"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{self.name}: envoy --mode validate failed:\n{result.stdout}{result.stderr}")

    def start(self):
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                ["taskset", "-c", self.cpu, str(ENVOY), "-c", str(self.config_path),
                 "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        Envoy.live.append(self)
        return self

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name}: Envoy exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self


            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: Envoy not ready after {timeout}s")

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self in Envoy.live:
            Envoy.live.remove(self)

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def counter(self, name):
        """One of Envoy's own counters (0 while it does not exist)."""
        pattern = urllib.parse.quote("^" + name.replace(".", r"\.") + "$")
        for line in self.admin("/stats?filter=" + pattern).splitlines():
            found, _, value = line.partition(": ")
            if found == name and value.strip().isdigit():
                return int(value)
        return 0

    def stats(self, prefix="idempotency."):
        """The filter's counters (shown as wasmcustom.idempotency.<name> in /stats), not its
        gauges."""
        out = {}
        query = "/stats?type=Counters&filter=" + prefix.replace(".", r"\.")
        for line in self.admin(query).splitlines():
            name, _, value = line.partition(": ")
            head, found, tail = name.partition(prefix)
            if found and value.strip().isdigit():
                out[tail] = int(value)
        return out

    def cpu_seconds(self):
        return cpu_seconds(self.process.pid)

    def rss_bytes(self):
        with open(f"/proc/{self.process.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def allocated_bytes(self):
        """Bytes the allocator has handed out (admin /memory), a steadier figure than RSS."""
        try:
            return int(json.loads(self.admin("/memory"))["allocated"])
        except (OSError, KeyError, ValueError):
            return None


def stop_all():
    for envoy in list(Envoy.live):
        envoy.stop()


def cpu_seconds(pid):
    """utime + stime of every thread of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class PinnedEtcd(Etcd):
    """The tests' single-member etcd on loopback, on the load generator's CPU: its work is part
    of what serves the etcd variant, like the upstream's."""

    def start(self):
        super().start()
        subprocess.run(["taskset", "-a", "-c", "-p", LOAD_CPU, str(self.proc.pid)],
                       check=True, capture_output=True)
        return self

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)


class Relay:
    """bench/relay.py between the far variants and etcd, on the load generator's CPU: its copying
    is part of what serves them, like etcd's."""

    name = "relay"

    def __init__(self, workdir):
        self.port = free_port()
        self.log_path = workdir / "relay.log"
        self.proc = None

    def start(self, etcd_port):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", LOAD_CPU, sys.executable, str(ROOT / "bench" / "relay.py"),
                 "--listen", str(self.port), "--to", str(etcd_port), "--delay-ms", str(FAR_DELAY_MS)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the relay did not start: {self.log_path.read_text()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)
