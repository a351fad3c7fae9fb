"""Run a real Envoy with the idempotency filter in front of the test upstream.

The pieces tests use (through the fixtures in conftest.py):

    Envoy(workdir, plugin_config, upstream_port, route_timeout="5s", failure_policy="FAIL_CLOSED",
          concurrency=2, routes=())
        .start() / .stop()            start (and wait until ready) / always kill
        .port, .admin_port            the listener and admin ports (both picked by the kernel)
        .request(method, path, headers=None, body=None, timeout=30, http2=False) -> Response
        .stats() -> {name: int}       admin /stats, counters and gauges
        .counter(name) -> int         one stat, 0 when absent
        .prometheus()                 admin /stats/prometheus: ({series: value}, {name: type})
        .log_path                     Envoy's log file

    worker_connections(envoy)         accepted connections per Envoy worker thread
"""

import atexit
import http.client
import itertools
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from support.client import request
from support.processes import ROOT, LogFile, die_with_parent, stop

ENVOY_BIN = os.environ.get("ENVOY_BIN", str(ROOT / ".venv" / "bin" / "envoy"))
WASM_PATH = os.environ.get("IDEMPOTENCY_WASM", str(ROOT / "target" / "wasm32-wasip1" / "release" / "idempotency_filter.wasm"))
READY_TIMEOUT_S = 30

_instance_numbers = itertools.count(1)
_live = set()  # every Envoy started and not yet stopped, killed at exit whatever happens


# -- Envoy configuration ----------------------------------------------------------------

# Must exceed the plugin's max_request_body_bytes (default 1 MiB): over this listener limit Envoy
# answers 413 itself (text/plain) before the filter can answer with its problem document.
BUFFER_LIMIT_BYTES = 2 * 1024 * 1024


# The histograms' buckets, as every shipped config sets them; histograms merged every second
# (Envoy's default is every 5 s), so that a test sees its samples soon.
STATS_CONFIG = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())["stats_config"]
STATS_FLUSH_INTERVAL = "1s"


def route_to(prefix, idempotency=None, name=None, route_timeout="5s"):
    """A route to the upstream for paths under ``prefix``, named ``name`` (the prefix if not
    given), whose metadata holds ``idempotency`` (filter_metadata.idempotency) if given."""
    route = {"name": name or prefix, "match": {"prefix": prefix},
             "route": {"cluster": "upstream", "timeout": route_timeout}}
    if idempotency is not None:
        route["metadata"] = {"filter_metadata": {"idempotency": idempotency}}
    return route


# What every test Envoy's access log says of a request: the filter's outcome as the shipped
# configs print it (envoy/envoy.yaml), beside what identifies the request.
ACCESS_LOG_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "idempotency_key": "%REQ(IDEMPOTENCY-KEY)%",
    "idempotency": "%FILTER_STATE(wasm.idempotency_outcome:PLAIN)%",
    "record_age_ms": "%FILTER_STATE(wasm.idempotency_record_age_ms:PLAIN)%",
}


def envoy_config(upstream_port, plugin_config, wasm_path, route_timeout="5s",
                 failure_policy="FAIL_CLOSED", routes=(), access_log_path=None):
    """The Envoy bootstrap: one listener (kernel-picked port) -> [wasm filter] -> router ->
    cluster ``upstream`` on 127.0.0.1:upstream_port. ``plugin_config`` is the plugin's JSON
    configuration as a dict (or a raw string, to send it verbatim); with ``wasm_path=None``
    the filter is left out (plain Envoy). ``routes`` (see ``route_to``) come before the route
    of every other path, which says nothing. With ``access_log_path`` each request is logged
    there as a line of JSON (``ACCESS_LOG_FORMAT``)."""
    http_filters = []
    if wasm_path is not None:
        configuration = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
        http_filters.append({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "idempotency",
                    "root_id": "idempotency",
                    "allow_on_headers_stop_iteration": True,
                    "failure_policy": failure_policy,
                    "vm_config": {
                        "vm_id": "idempotency",
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": str(wasm_path)}},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": configuration,
                    },
                },
            },
        })
    http_filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    loopback = lambda port: {"socket_address": {"address": "127.0.0.1", "port_value": port}}  # noqa: E731
    return {
        "admin": {"address": loopback(0)},
        "stats_config": STATS_CONFIG,
        "stats_flush_interval": STATS_FLUSH_INTERVAL,
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": loopback(0),
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "codec_type": "AUTO",
                        "route_config": {
                            "name": "local",
                            "virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [*routes, route_to("/", name="default",
                                                             route_timeout=route_timeout)],
                            }],
                        },
                        "http_filters": http_filters,
                        "access_log": [] if access_log_path is None else [{
                            "name": "envoy.access_loggers.file",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                                         "FileAccessLog",
                                "path": str(access_log_path),
                                "log_format": {"json_format": ACCESS_LOG_FORMAT},
                            },
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "upstream",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": loopback(upstream_port)}}]}],
                },
            }],
        },
    }


# -- Envoy process ----------------------------------------------------------------------

class EnvoyError(RuntimeError):
    pass


class Envoy(LogFile):
    def __init__(self, workdir, plugin_config=None, upstream_port=None, route_timeout="5s",
                 wasm_path=WASM_PATH, expect_upstream=True, failure_policy="FAIL_CLOSED",
                 concurrency=2, routes=()):
        self.number = next(_instance_numbers)
        self.workdir = Path(workdir) / f"envoy-{self.number}"
        self.plugin_config = {} if plugin_config is None else plugin_config
        self.upstream_port = upstream_port
        self.route_timeout = route_timeout
        self.wasm_path = wasm_path
        self.expect_upstream = expect_upstream
        self.failure_policy = failure_policy
        self.concurrency = concurrency
        self.routes = list(routes)
        # Unique per instance and per test process, so several Envoys (and several test
        # runs) can share the machine's hot-restart shared memory namespace.
        self.base_id = 1000 + (os.getpid() % 100_000) * 64 + self.number % 64
        self.proc = None
        self.port = None
        self.admin_port = None
        self.log_path = self.workdir / "envoy.log"
        self.access_log_path = self.workdir / "access.log"

    def __repr__(self):
        return f"<Envoy #{self.number} port={self.port} config={self.plugin_config!r} log={self.log_path}>"

    # -- lifecycle --
    def bootstrap(self):
        """The bootstrap this instance runs; a subclass may extend it (another cluster, say)."""
        return envoy_config(self.upstream_port, self.plugin_config, self.wasm_path, self.route_timeout,
                            self.failure_policy, self.routes, self.access_log_path)

    def start(self):
        if self.wasm_path is not None and not Path(self.wasm_path).is_file():
            raise EnvoyError(f"{self.wasm_path} is missing: build it with `make wasm`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "envoy.json"
        config = self.bootstrap()
        config_path.write_text(json.dumps(config, indent=2))
        # The access log is written out every 100 ms, for the tests that read it.
        self._launch([ENVOY_BIN, "-c", str(config_path), "--concurrency", str(self.concurrency),
                      "--log-level", "info", "--component-log-level", "wasm:debug",
                      "--file-flush-interval-msec", "100"])
        return self

    def _launch(self, cmd, cwd=None):
        """Runs Envoy's command line ``cmd`` with this instance's own base id, admin address file
        and no drain time, and waits until it is ready."""
        admin_file = self.workdir / "admin-address"
        admin_file.unlink(missing_ok=True)
        cmd = [*cmd, "--base-id", str(self.base_id), "--admin-address-path", str(admin_file),
               "--drain-time-s", "0"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        _live.add(self)
        try:
            self._wait_ready(admin_file)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        proc, self.proc = self.proc, None
        _live.discard(self)
        stop(proc, grace=5)

    def _fail(self, why):
        raise EnvoyError(f"Envoy #{self.number} not ready: {why}\n--- {self.log_path} (tail) ---\n"
                         + self.log_tail(40))

    def _wait_ready(self, admin_file):
        deadline = time.monotonic() + READY_TIMEOUT_S
        step = "admin address"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode} while waiting for {step}")
            try:
                if self.admin_port is None:
                    text = admin_file.read_text().strip() if admin_file.exists() else ""
                    if not text:
                        raise EnvoyError("no admin address yet")
                    self.admin_port = int(text.rsplit(":", 1)[1])
                    step = "/ready"
                if self.port is None:
                    if self.admin_get("/ready")[0] != 200:
                        raise EnvoyError("not ready yet")
                    listeners = json.loads(self.admin_get("/listeners?format=json")[1])
                    self.port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                    step = "a request through the listener"
                # One request end to end (a GET: never covered by the filter, never counted).
                resp = self.request("GET", "/__upstream/ping", timeout=5)
                if self.expect_upstream and resp.status != 200:
                    raise EnvoyError(f"probe answered {resp.status}")
                return
            except (OSError, EnvoyError, ValueError, KeyError, IndexError, http.client.HTTPException):
                time.sleep(0.05)
        self._fail(f"timed out after {READY_TIMEOUT_S}s waiting for {step}")

    # -- use --
    def request(self, method, path, headers=None, body=None, timeout=30, http2=False):
        return request(self.port, method, path, headers, body, timeout, http2=http2)

    def admin_get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stats(self):
        """Admin /stats as {name: int}; histogram lines are skipped. The filter's own metrics
        appear as ``wasmcustom.<name>`` in /stats; they are also given under ``<name>``
        (e.g. ``idempotency.replayed``)."""
        status, text = self.admin_get("/stats")
        if status != 200:
            raise EnvoyError(f"/stats answered {status}")
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
                if name.startswith("wasmcustom."):
                    out[name[len("wasmcustom."):]] = int(value)
        return out

    def counter(self, name):
        return self.stats().get(name, 0)

    def prometheus(self):
        """Admin /stats/prometheus as ({series{labels}: float}, {name: type}): what a scrape
        reads."""
        status, text = self.admin_get("/stats/prometheus")
        if status != 200:
            raise EnvoyError(f"/stats/prometheus answered {status}")
        samples, types = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                samples[series] = float(value)
        return samples, types

    def access_log(self):
        """The access log's lines so far, as dicts (``ACCESS_LOG_FORMAT``); Envoy writes them
        out within its flush interval."""
        if not self.access_log_path.exists():
            return []
        return [json.loads(line) for line in self.access_log_path.read_text().splitlines() if line]


def worker_connections(envoy):
    """{worker: downstream connections accepted} from the listener's per-worker stats."""
    out = {}
    for name, value in envoy.stats().items():
        m = re.match(r"listener\.127\.0\.0\.1_\d+\.(worker_\d+)\.downstream_cx_total$", name)
        if m:
            out[m.group(1)] = value
    return out


@atexit.register
def _kill_leftovers():
    for envoy in list(_live):
        envoy.stop()
