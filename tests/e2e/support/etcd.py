"""What the etcd store tests need beyond the harness: a private etcd and Envoys that reach it.

    Etcd(workdir, max_request_bytes=None, quota_backend_bytes=None, certs=None)
        .start() / .stop()            a single-member etcd on loopback (kernel-picked free ports, its
                                      own data directory, --auto-compaction-retention 1h); start()
                                      again after stop() reuses the same ports and data directory
        .freeze() / .thaw()           SIGSTOP / SIGCONT: an etcd that accepts but never answers
        .kill()                       SIGKILL; start() brings it back on its data directory
        .is_leader()                  whether this member leads its cluster now
        .enable_auth(user, prefix) -> token
                                      users on: root (the tests' own calls from then on), and
                                      `user`, allowed under `prefix` only; returns its token
    make_certs(directory) -> Certs    a CA, etcd's certificate for 127.0.0.1, a client
                                      certificate, and the key pair etcd signs its JWT tokens
                                      with (openssl); an Etcd given them serves TLS, requires a
                                      client certificate and hands out JWT tokens (1 h)
        .metric(name)                 a counter of etcd's /metrics
        .kv_calls() / .raft_writes()  calls answered on its KV service; proposals less grants
        .client_port, .log_path
        .range_prefix(prefix, serializable=False) -> [(key bytes, value bytes)]
                                      what etcd holds, read directly (serializable: this member's
                                      own copy)
    EtcdEnvoy(workdir, plugin_config, upstream_port, etcd or [members])
                                      support.envoy.Envoy plus envoy/envoy-etcd.yaml's cluster
                                      ``etcd`` (HTTP/2, outlier detection) on the members' client
                                      ports; the wasm filter block is the harness's own
    LogWindow(sources)                log offsets now; .save(out_dir) writes what each log got since
    private_run_dir()                 .run/etcd-tests/<pid>: this test process's own directory, so
                                      that test runs going on at the same time never share files
    fleet_config(**extra)             a plugin configuration on the etcd store
    Started(run_dir, sources)         what a fixture's scope starts (etcds, a three-member cluster,
                                      pairs of Envoys, Envoys from a shipped config), stopped and
                                      cleaned at its end
    settled_stats(envoy)              stats once earlier finishes have landed
    etcd_requests(envoy), settled_etcd_requests(envoy)
                                      the calls an Envoy made to etcd (once they stop moving)

Nothing here uses a system etcd service: every etcd is started by the tests and stopped by them.
"""

import base64
import copy
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
import uuid
from pathlib import Path

from support.envoy import Envoy
from support.processes import ROOT, LogFile, die_with_parent, free_port, start_all, stop
from support.shipped import ENVOY_DIR, ShippedEnvoy, load

ETCD_BIN = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
ETCD_READY_TIMEOUT_S = 20


class EtcdError(RuntimeError):
    pass


@dataclass
class Certs:
    ca: Path
    server: tuple  # (certificate, key)
    client: tuple
    jwt: tuple  # (private key, public key)


def make_certs(directory):
    """Certificates for a TLS etcd with client-certificate authentication (EC keys: fast)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=idempotency-test-ca")

    def issue(name, extensions):
        # No common name: with users on, etcd refuses gateway requests whose client certificate
        # has one (the gateway cannot authenticate by it).
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O={name}")
        (directory / f"{name}.ext").write_text(extensions)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
        return directory / f"{name}.crt", directory / f"{name}.key"

    # etcd's JSON gateway calls etcd's gRPC server with etcd's own certificate: clientAuth too.
    server = issue("etcd", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                           "extendedKeyUsage=serverAuth,clientAuth\n")
    client = issue("client", "extendedKeyUsage=clientAuth\n")
    openssl("genrsa", "-out", "jwt.key", "2048")
    openssl("rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub")
    return Certs(directory / "ca.crt", server, client, (directory / "jwt.key", directory / "jwt.pub"))


class Etcd(LogFile):
    def __init__(self, workdir, max_request_bytes=None, name="etcd", quota_backend_bytes=None,
                 certs=None, cluster=None):
        self.workdir = Path(workdir)
        self.name = name
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.max_request_bytes = max_request_bytes
        self.quota_backend_bytes = quota_backend_bytes
        self.certs = certs
        # The members of its cluster, itself among them (see Started.cluster); alone if None.
        self.cluster = cluster
        self.token = None
        self.client_port = None
        self.peer_port = None
        self.proc = None

    def __repr__(self):
        return f"<Etcd {self.name} port={self.client_port} log={self.log_path}>"

    @property
    def url(self):
        scheme = "https" if self.certs else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self):
        self.launch()
        return self.wait_ready()

    def launch(self):
        """Starts the process; wait_ready() waits until it answers (a member of a cluster
        answers only once a quorum of members is up)."""
        if not (Path(ETCD_BIN).is_file() and os.access(ETCD_BIN, os.X_OK)):
            raise EtcdError(f"no etcd binary at {ETCD_BIN}: install Debian's etcd-server (`make setup`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.client_port is None:
            self.client_port, self.peer_port = free_port(), free_port()
        peer = self.peer_url
        members = self.cluster or [self]
        initial = ",".join(f"{member.name}={member.peer_url}" for member in members)
        cmd = [
            ETCD_BIN,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--auto-compaction-retention", "1h",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        if self.max_request_bytes is not None:
            cmd += ["--max-request-bytes", str(self.max_request_bytes)]
        if self.quota_backend_bytes is not None:
            cmd += ["--quota-backend-bytes", str(self.quota_backend_bytes)]
        if self.certs:
            private, public = self.certs.jwt
            cmd += ["--cert-file", str(self.certs.server[0]), "--key-file", str(self.certs.server[1]),
                    "--trusted-ca-file", str(self.certs.ca), "--client-cert-auth",
                    "--auth-token", f"jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=1h"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        finally:
            log.close()

    def wait_ready(self):
        deadline = time.monotonic() + ETCD_READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise EtcdError(f"etcd exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.post("/v3/kv/range", {"key": _b64(b"ready-probe")}, timeout=1)
                return self
            except (OSError, EtcdError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise EtcdError(f"etcd not ready after {ETCD_READY_TIMEOUT_S}s:\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self):
        proc, self.proc = self.proc, None
        stop(proc, grace=10)

    def kill(self):
        """SIGKILL: a member that dies mid-write, with no goodbye to its peers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def is_leader(self):
        status = self.post("/v3/maintenance/status", {}, timeout=2)
        return status.get("leader") == status["header"]["member_id"]

    def freeze(self):
        """Stop etcd answering without closing anything: connections hang, as with a stuck
        member. thaw() resumes it."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def enable_auth(self, user, prefix):
        """Turn on etcd's users: root, whose token the tests' own calls carry from then on, and
        ``user``, allowed to read and write keys under ``prefix`` only. Returns ``user``'s token
        (etcd's JSON gateway authenticates by token only, never by certificate)."""
        b64 = lambda text: _b64(text.encode())  # noqa: E731
        self.post("/v3/auth/user/add", {"name": "root", "password": "root-secret"})
        self.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.post("/v3/auth/role/add", {"name": "store"})
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.post("/v3/auth/role/grant", {"name": "store", "perm": {
            "permType": "READWRITE", "key": b64(prefix), "range_end": b64(end)}})
        self.post("/v3/auth/user/add", {"name": user, "password": "store-secret"})
        self.post("/v3/auth/user/grant", {"user": user, "role": "store"})
        self.post("/v3/auth/enable", {})
        self.token = self.post("/v3/auth/authenticate", {"name": "root", "password": "root-secret"})["token"]
        return self.post("/v3/auth/authenticate", {"name": user, "password": "store-secret"})["token"]

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _client_tls(self):
        if not self.certs:
            return None
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.load_cert_chain(*map(str, self.certs.client))
        return context

    def post(self, path, body, timeout=5):
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = self.token
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._client_tls()) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise EtcdError(f"etcd answered {err.code} to {path}: {err.read()[:300]!r}") from None

    def metric(self, name, labelled=""):
        """A counter from etcd's own /metrics (e.g. etcd_debugging_lease_granted_total): the sum
        of its samples whose labels hold ``labelled``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5,
                                    context=self._client_tls()) as resp:
            lines = resp.read().decode().splitlines()
        samples = (line.rsplit(" ", 1) for line in lines if line.startswith(name))
        return sum(float(value) for series, value in samples
                   if series.split("{")[0] == name and labelled in series)

    def kv_calls(self):
        """Calls etcd has answered on its KV service (reads and transactions)."""
        return self.metric("grpc_server_handled_total", 'grpc_service="etcdserverpb.KV"')

    def raft_writes(self):
        """Raft proposals etcd has committed, less its lease grants: the writes to its keys."""
        return (self.metric("etcd_server_proposals_committed_total")
                - self.metric("etcd_debugging_lease_granted_total"))

    def range_prefix(self, prefix, serializable=False):
        """[(key, value)] of every key under ``prefix`` (bytes or str), read from etcd directly;
        ``serializable``: from this member's own copy, without asking the leader."""
        prefix = prefix.encode() if isinstance(prefix, str) else prefix
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        answer = self.post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end),
                                            "serializable": serializable})
        return [(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")))
                for kv in answer.get("kvs", [])]

    def remove_data(self):
        """Delete the data directory (its WAL alone preallocates 64 MB); the log stays."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _b64(data):
    return base64.b64encode(data).decode()


class EtcdEnvoy(Envoy):
    """An Envoy running the filter, with a cluster named ``etcd`` that reaches ``etcd`` (one
    member, or a list of members): envoy/envoy-etcd.yaml's own cluster, its endpoints replaced."""

    def __init__(self, workdir, plugin_config, upstream_port, etcd, cluster="etcd", **kwargs):
        super().__init__(workdir, plugin_config, upstream_port, **kwargs)
        self.members = etcd if isinstance(etcd, list) else [etcd]
        self.cluster = cluster

    def bootstrap(self):
        config = super().bootstrap()
        config["static_resources"]["clusters"].append(shipped_etcd_cluster(
            self.cluster, [member.client_port for member in self.members]))
        return config


def shipped_etcd_cluster(name, ports):
    """The etcd cluster of envoy/envoy-etcd.yaml, named ``name``, with the members on loopback
    ``ports`` as endpoints."""
    shipped = load(ENVOY_DIR / "envoy-etcd.yaml")["static_resources"]["clusters"]
    (cluster,) = [copy.deepcopy(c) for c in shipped if c["name"] == "etcd"]
    cluster.update(name=name, type="STATIC")
    cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": port}}}}
        for port in ports]}]}
    return cluster


class LogWindow:
    """The logs (Envoys, etcds) written from now on, to keep when a test fails."""

    def __init__(self, sources):
        self.starts = [(source, source.log_size()) for source in sources]

    def save(self, out_dir, tail_lines=25):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sections = []
        for source, start in self.starts:
            text = source.log_text(start)
            label = f"envoy-{source.number}" if isinstance(source, Envoy) else f"etcd-{source.name}"
            path = out_dir / f"{label}.log"
            path.write_text(text)
            tail = "\n".join(text.splitlines()[-tail_lines:])
            sections.append(f"{source!r}\nsaved: {path}\n{tail}")
        return "\n\n".join(sections)


def private_run_dir():
    """A fresh directory for this test process; those of test processes gone are removed."""
    base = ROOT / ".run" / "etcd-tests"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        if old.name.isdigit() and not Path(f"/proc/{old.name}").exists():
            shutil.rmtree(old, ignore_errors=True)
    mine = base / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    return mine


# -- a fleet on it --------------------------------------------------------------------------

def fleet_config(**extra):
    """A plugin configuration on the etcd store (cluster ``etcd``, 500 ms calls), plus ``extra``."""
    etcd = {"cluster": "etcd", "timeout": "500ms", **extra.pop("etcd", {})}
    return {"etcd": etcd, **extra}


class Started:
    """What a fixture's scope starts: kept for the logs of a failed test, and at the scope's end
    its Envoys stopped and its etcds' data removed."""

    def __init__(self, run_dir, sources):
        self.run_dir = run_dir
        self.sources = sources
        self.envoys, self.etcds = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for envoy in self.envoys:
            envoy.stop()
        for etcd in self.etcds:
            etcd.remove_data()

    def etcd(self, name, **kwargs):
        etcd = Etcd(self.run_dir / f"etcd-{name}", name=name, **kwargs)
        self.sources.append(etcd)
        self.etcds.append(etcd)
        return etcd.start()

    def cluster(self, size=3):
        """A cluster of ``size`` etcd members on loopback, started together."""
        members = []
        for n in range(size):
            member = Etcd(self.run_dir / f"etcd-m{n}", name=f"m{n}", cluster=members)
            member.client_port, member.peer_port = free_port(), free_port()
            members.append(member)
        self.sources.extend(members)
        self.etcds.extend(members)
        for member in members:
            member.launch()
        for member in members:
            member.wait_ready()
        return members

    def pair(self, upstream, etcd, config):
        return self._envoys([EtcdEnvoy(self.run_dir, config, upstream.port, etcd) for _ in range(2)])

    def shipped(self, config, count=2):
        """Envoys started from a shipped config."""
        return self._envoys([ShippedEnvoy(self.run_dir / f"shipped-{uuid.uuid4().hex[:8]}", config)
                             for _ in range(count)])

    def _envoys(self, envoys):
        self.sources.extend(envoys)
        self.envoys.extend(envoys)
        return start_all(envoys)


def etcd_requests(envoy):
    return envoy.counter("cluster.etcd.upstream_rq_total")


def settled_etcd_requests(envoy, quiet_s=0.3):
    """The etcd cluster's request count once it has stopped moving (finishes run on ticks)."""
    last = etcd_requests(envoy)
    while True:
        time.sleep(quiet_s)
        now = etcd_requests(envoy)
        if now == last:
            return now
        last = now


def settled_stats(envoy, quiet_s=0.3, limit_s=10.0):
    """Stats once the finishes of earlier requests (run on later ticks) have landed: neither the
    filter's counters nor the calls to etcd moved for ``quiet_s``."""
    def sample():
        stats = envoy.stats()
        return stats, ({k: v for k, v in stats.items() if k.startswith("idempotency.")},
                       stats.get("cluster.etcd.upstream_rq_total", 0))

    deadline = time.monotonic() + limit_s
    stats, moving = sample()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        stats, now = sample()
        if now == moving:
            break
        moving = now
    return stats
