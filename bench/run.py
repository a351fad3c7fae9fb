#!/usr/bin/env python3
"""What the Idempotency-Key filter costs against a plain Envoy.

Runs, on one machine and in one go:

  * an upstream Envoy answering every request itself (``direct_response``), so that it is never
    the bottleneck;
  * proxy Envoys, one per variant, each ``--concurrency 1`` and pinned to CPU 0:
      plain     router only: the limit for anything that goes upstream
      empty     a proxy-wasm filter that does nothing: the cost of any wasm filter at all
      filter    this filter
      raw       this filter with compress_responses off: what compressing stored responses costs
      skip      this filter wrapped in an ExtensionWithMatcher whose SkipFilter action skips it
                for requests it cannot cover
      matcher   this filter run by Envoy's composite filter only for requests it can cover
                (ExtensionWithMatcher + ExecuteFilterAction: envoy/envoy-matcher.yaml)
      direct    ``direct_response`` at the proxy: the limit for an answer made at the edge
      etcd      this filter with the cluster-wide store: records in an etcd (one member, on
                loopback, pinned with wrk and the upstream) that a second proxy shares, and
                replays served from the local cache once fetched
      pausing   the probe filter (bench/probe-filter) pausing until the body is complete, and
                nothing else: what any filter that reads the whole body costs
      replay-floor  the probe filter doing only the host operations a replay needs
      floor     the probe filter doing, once per request, only the host
                operations any Idempotency-Key filter over shared data needs for a first POST,
                and no work of its own: the least a first POST can cost
      etcd-floor  the probe filter making, once per request, only the calls any filter over
                etcd needs for a first POST (a claim transaction before the upstream, a put
                after), over gRPC on the etcd variant's cluster: the least an etcd call costs
      outlive   this filter with outlive_client: covered requests sent upstream from the root
                context (dispatch_http_call) instead of through the router
      routes    (not run by default) this filter, turned off by a route for requests it cannot
                cover: each route has a twin matching the method and the key header
  * wrk, pinned to CPU 1 (with the upstream and etcd).

Each scenario runs against each variant in interleaved rounds; the figures are medians over the
rounds. Writes bench/results.md, bench/results.json and bench/results.svg.

Standard library only. Needs wrk, taskset, etcd and the two wasm modules (``make bench`` builds or
installs them).
"""

import argparse
import http.client
import itertools
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from support.etcd import ETCD_BIN, Etcd, EtcdError, shipped_etcd_cluster  # noqa: E402 - the tests' etcd, started the same way
ENVOY = Path(os.environ.get("ENVOY", ROOT / ".venv" / "bin" / "envoy"))
FILTER_WASM = Path(os.environ.get(
    "FILTER_WASM", ROOT / "target" / "wasm32-wasip1" / "release" / "idempotency_filter.wasm"))
# This filter as it was before its gauges, histograms and access-log facts (make bench builds
# it from the history): what they cost is the filter's CPU above it.
UNOBSERVED_WASM = Path(os.environ.get(
    "UNOBSERVED_WASM", ROOT / "bench" / ".target" / "unobserved" / "idempotency_filter.wasm"))
EMPTY_WASM = Path(os.environ.get(
    "EMPTY_WASM", BENCH / ".target" / "wasm32-wasip1" / "release" / "empty_filter.wasm"))
PROBE_WASM = Path(os.environ.get(
    "PROBE_WASM", BENCH / ".target" / "wasm32-wasip1" / "release" / "probe_filter.wasm"))
# The floor variant's probe: buckets of the filter's size (16 entries of 71 B and a header), as
# many as the bench's table has (250,000 records).
FLOOR_PROBE = "op=floor phase=body size=1140 buckets=15625"

PROXY_CPU = "0"
LOAD_CPU = "1"
# wrk connections: enough to keep one proxy worker busy through the upstream's round trips.
CONNECTIONS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# The upstream's answer to every POST: the record the filter stores is this response.
SMALL_BODY = '{"id":"ord_0001","status":"created"}'


def json_answer(size):
    """A JSON answer of exactly `size` bytes, shaped like an API's list of customers (ids,
    names, e-mails, dates and amounts that differ from one to the next), for what compression makes
    of a real answer."""
    rng = random.Random(size)
    names = ["Jane Doe", "Grace Hopper", "Ada Lovelace", "Alan Turing", "Edsger Dijkstra",
             "Barbara Liskov", "Ken Thompson", "Margaret Hamilton", "Donald Knuth", "Frances Allen"]
    items = []
    while True:
        n = rng.randrange(1, 999_999)
        name = rng.choice(names)
        item = json.dumps({
            "id": f"cus_{n:06d}", "externalId": f"crm-{rng.randrange(10_000)}", "fullName": name,
            "email": f"{name.split()[0].lower()}.{n}@example.com",
            "createdAt": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T"
                         f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
            "balance": rng.randrange(-50_000, 500_000), "currency": rng.choice(["eur", "usd", "gbp"]),
            "active": rng.random() < 0.8}, separators=(",", ":"))
        if len(",".join(items + [item])) + 24 > size:
            break
        items.append(item)
    head = '{"data":[' + ",".join(items) + '],"more":"'
    return head + "x" * (size - len(head) - 2) + '"}'
AUTHORIZATION = "Bearer bench-tenant"

# The filter's configuration for the bench: room for every record a round creates, all of it
# for the bench's one organisation. capacity_bytes must be at least 8 x max_response_body_bytes
# (one ledger shard holds any record).
FILTER_CONFIG = {
    "capacity_records": 250_000,
    "capacity_bytes": 1 << 30,
    "max_share": 1,
    "max_response_body_bytes": 128 << 10,
    "max_request_body_bytes": 1 << 20,
}

VARIANTS = {
    "plain": "Envoy, router only",
    "empty": "Envoy + empty wasm filter",
    "filter": "Envoy + this filter",
    "raw": "Envoy + this filter, responses not compressed",
    "skip": "Envoy + this filter, SkipFilter matcher",
    "matcher": "Envoy + this filter, composite matcher",
    "direct": "Envoy direct_response",
    "routes": "Envoy + this filter, off by route",
    "etcd": "Envoy + this filter, etcd store",
    "outlive": "Envoy + this filter, outlive_client",
    "policy-listener": "Envoy + this filter, route_metadata, route without a policy",
    "policy-route": "Envoy + this filter, route_metadata, route with its own policy",
    "json": "Envoy + this filter, fingerprint json",
    "unobserved": "Envoy + this filter without its gauges, histograms and access-log facts",
    "floor": "Envoy + the host operations a first POST needs",
    "pausing": "Envoy + a filter pausing for the body",
    "replay-floor": "Envoy + the host operations a replay needs",
    "etcd-floor": "Envoy + the etcd calls a first POST needs",
    "etcd-far": "Envoy + this filter, etcd store 1 ms away",
    "etcd-floor-far": "Envoy + the etcd calls a first POST needs, 1 ms away",
}
DEFAULT_VARIANTS = ["plain", "empty", "pausing", "floor", "replay-floor", "filter", "raw", "skip", "matcher", "direct", "etcd",
                    "etcd-floor", "etcd-far", "etcd-floor-far", "outlive", "policy-listener", "policy-route",
                    "json", "unobserved"]
FILTERS = ("filter", "raw", "skip", "matcher", "routes", "etcd", "etcd-far", "outlive", "policy-listener",
           "policy-route", "json", "unobserved")

# The json variant's matching: canonical JSON, less the client's own timestamp.
JSON_MATCHING = {"fingerprint": "json", "fingerprint_ignore": ["/sent_at"]}

# The policy-route variant's route policy (filter_metadata.idempotency): a few fields of the
# listener's, as a payments route might set them.
ROUTE_POLICY = {"ttl": "12h", "lease": "30s", "require_key": False, "conflict_status": 409}

# The etcd variant's store: every call through the Envoy cluster "etcd".
ETCD_STORE = {"cluster": "etcd", "timeout": "500ms"}

# name: (method, request body bytes, key: None | "unique" | "same" | "other" | "cold",
#        description). "cold": every request replays another record, stored through a second
#        proxy, so this proxy's local cache has never seen it (etcd store only).
SCENARIOS = {
    "get": ("GET", 0, None, "GET (not covered)"),
    "nokey-1k": ("POST", 1024, None, "POST without a key, 1 KiB"),
    "nokey-64k": ("POST", 65536, None, "POST without a key, 64 KiB"),
    "first-1k": ("POST", 1024, "unique", "first POST (new key), 1 KiB"),
    "first-64k": ("POST", 65536, "unique", "first POST (new key), 64 KiB"),
    "replay-1k": ("POST", 1024, "same", "replay (same key and body), 1 KiB"),
    "replay-64k": ("POST", 65536, "same", "replay (same key and body), 64 KiB"),
    "replay-cold-1k": ("POST", 1024, "cold", "replay, record not in the local cache, 1 KiB"),
    "conflict-1k": ("POST", 1024, "other", "conflict (same key, other body), 1 KiB"),
    "conflict-64k": ("POST", 65536, "other", "conflict (same key, other body), 64 KiB"),
    "first-json-16k": ("POST", 1024, "unique", "first POST, 1 KiB, answered 16 KiB of JSON"),
    "first-lone-1k": ("POST", 1024, "unique", "first POST, 1 KiB, one connection"),
    "replay-json-16k": ("POST", 1024, "same", "replay of a 16 KiB JSON answer"),
}
# Scenarios run over other than --connections: a lone client's latency, with nothing to batch.
SCENARIO_CONNECTIONS = {"first-lone-1k": 1}
# Where a scenario's requests go (the upstream answers by path); the rest go to /v1/payments.
SCENARIO_PATHS = {"first-json-16k": "/r/json-16k", "replay-json-16k": "/r/json-16k"}


def path_of(scenario):
    return SCENARIO_PATHS.get(scenario, "/v1/payments")


# The JSON answers the upstream serves at /r/json-<name>.
JSON_ANSWERS = {"1k": 1024, "16k": 16_384, "64k": 65_536}

# Which variants run in which scenario's group. For plain, empty and direct every POST is the
# same work (the key header means nothing to them): in a group they run the key-less POST of the
# group's body size, next to the runs they are compared with. Plain runs in every group, since
# every target is a ratio to it; direct_response where a target is a ratio to it (replays).
MATRIX = {
    "plain": list(SCENARIOS),
    "empty": ["get", "nokey-1k", "nokey-64k"],
    "direct": ["get", "nokey-1k", "nokey-64k", "replay-1k", "replay-64k", "replay-cold-1k"],
    "filter": [s for s in SCENARIOS if SCENARIOS[s][2] != "cold"],
    # What compressing stored responses costs: answers it shrinks, stored and replayed.
    "raw": ["first-json-16k", "replay-json-16k"],
    # What a matcher changes is whether requests the filter cannot cover enter the VM; covered
    # requests run the filter as without it (the composite matcher runs every scenario).
    "skip": ["get", "nokey-1k", "nokey-64k"],
    "matcher": [s for s in SCENARIOS if SCENARIOS[s][2] != "cold"],
    "routes": ["get", "nokey-1k", "nokey-64k", "first-1k", "replay-1k"],
    # What the store changes: claims, replays from the local cache and replays fetched from etcd.
    "etcd": ["first-1k", "replay-1k", "replay-cold-1k", "first-lone-1k"],
    "etcd-floor": ["first-1k", "first-lone-1k"],
    # The same with etcd a zone away: 1 ms each way through the bench's relay.
    "etcd-far": ["first-1k", "replay-1k", "replay-cold-1k", "first-lone-1k"],
    "etcd-floor-far": ["first-1k", "first-lone-1k"],
    # What sending from the root context changes: first POSTs (a replay never goes upstream).
    "outlive": ["first-1k", "first-64k", "replay-1k"],
    # What reading the route's metadata costs every request, covered or not.
    "policy-listener": ["get", "first-1k", "replay-1k"],
    "policy-route": ["get", "first-1k", "replay-1k"],
    # What canonicalising a JSON body costs, once per covered request.
    "json": ["first-1k", "first-64k", "replay-1k", "replay-64k"],
    # What the gauges, histograms and access-log facts cost a covered request.
    "unobserved": ["first-1k", "replay-1k", "conflict-1k"],
    # The least a first POST can cost: the same requests through the floor probe.
    "floor": ["first-1k", "first-64k"],
    "pausing": ["first-1k", "first-lone-1k"],
    "replay-floor": ["replay-1k"],
}
# Every variant of a group sends its requests to the group scenario's path.


def baseline_scenario(scenario):
    """The workload a baseline variant runs in `scenario`'s group."""
    method, size, _, _ = SCENARIOS[scenario]
    if method == "GET":
        return "get"
    return "nokey-1k" if size == 1024 else "nokey-64k"


# -- Envoy configurations -------------------------------------------------------------------


def wasm_filter(name, wasm_path, plugin_config):
    config = {
        "name": name,
        "root_id": name,
        "allow_on_headers_stop_iteration": True,
        "failure_policy": "FAIL_CLOSED",
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm_path)}},
        },
    }
    if plugin_config is not None:
        config["configuration"] = {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            # A string goes as it is (the probe's words); anything else as JSON.
            "value": plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config),
        }
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config,
        },
    }


def header_input(name):
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": name,
        },
    }


def covered_predicate(methods, key_header):
    """True for a request the filter can cover: a covered method and a key header."""
    return {"and_matcher": {"predicate": [
        {"single_predicate": {
            "input": header_input(":method"),
            "value_match": {"safe_regex": {"google_re2": {}, "regex": "^(" + "|".join(methods) + ")$"}},
        }},
        {"single_predicate": {
            "input": header_input(key_header),
            "value_match": {"safe_regex": {"google_re2": {}, "regex": ".*"}},
        }},
    ]}}


def skip_unless_covered(filter_config, methods=("POST", "PATCH"), key_header="idempotency-key"):
    """Wraps a filter so that Envoy skips it (SkipFilter) for requests whose method is not
    covered and for requests without the key header. Envoy still creates the filter's context in
    the VM and calls its on_log for those requests: the wasm filter is an access logger too."""
    return {
        "name": "idempotency-skipped-unless-covered",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": filter_config,
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [{
                        "predicate": {"not_matcher": covered_predicate(methods, key_header)},
                        "on_match": {"action": {
                            "name": "skip",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.common"
                                         ".matcher.action.v3.SkipFilter",
                            },
                        }},
                    }],
                },
            },
        },
    }


def run_when_covered(filter_config, methods=("POST", "PATCH"), key_header="idempotency-key"):
    """Envoy's composite filter, running `filter_config` only for requests with a covered method
    and the key header. Other requests never reach the wasm VM."""
    return {
        "name": "idempotency-when-covered",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {
                "name": "composite",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite",
                },
            },
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [{
                        "predicate": covered_predicate(methods, key_header),
                        "on_match": {"action": {
                            "name": "idempotency",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http"
                                         ".composite.v3.ExecuteFilterAction",
                                "typed_config": filter_config,
                            },
                        }},
                    }],
                },
            },
        },
    }


# Holds the request until its body is complete. In front of a direct_response, so that the answer
# comes after the whole request was read: answered earlier, Envoy closes an HTTP/1.1 connection
# (the rest of the body is never read), and every POST would pay for a new connection.
BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 2 << 20,
    },
}

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def direct(body, status=200):
    return {"status": status, "body": {"inline_string": body}}


def listener(name, port, routes, http_filters, max_direct_body=None):
    route_config = {
        "name": name,
        "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
    }
    if max_direct_body:
        route_config["max_direct_response_body_size_bytes"] = max_direct_body
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network"
                         ".http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "codec_type": "AUTO",
                "route_config": route_config,
                "http_filters": http_filters + [ROUTER],
            },
        }]}],
    }


def bootstrap(admin_port, listeners, clusters=()):
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": list(clusters)},
    }


def upstream_config(port, admin_port):
    """Answers everything itself. /r/json-<size> answer JSON of that size (records of that size
    for the memory figures and the compression runs), /fail answers 503 (a claim the filter
    releases), the rest answers SMALL_BODY."""
    routes = [
        {"match": {"prefix": f"/r/json-{label}"}, "direct_response": direct(json_answer(size), 201)}
        for label, size in JSON_ANSWERS.items()
    ] + [
        {"match": {"prefix": "/fail"}, "direct_response": direct("unavailable", 503)},
        {"match": {"prefix": "/"}, "direct_response": direct(SMALL_BODY, 201)},
    ]
    return bootstrap(admin_port,
                     [listener("upstream", port, routes, [BUFFER], max_direct_body=70_000)])


def static_cluster(name, port):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def proxy_config(variant, port, admin_port, upstream_port, plugin_config=None, etcd_port=None):
    plugin_config = FILTER_CONFIG if plugin_config is None else plugin_config
    to_upstream = [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "15s"}}]
    cluster = static_cluster("upstream", upstream_port)
    if variant in REMOTE:
        store = (wasm_filter("idempotency", FILTER_WASM, dict(plugin_config, etcd=ETCD_STORE))
                 if variant in FILTERS else
                 wasm_filter("etcd_floor", PROBE_WASM, "op=etcd phase=body size=200"))
        return bootstrap(admin_port, [listener("proxy", port, to_upstream, [store])],
                         [cluster, shipped_etcd_cluster(ETCD_STORE["cluster"], [etcd_port])])
    if variant == "raw":
        plugin_config = dict(plugin_config, compress_responses=False)
    if variant == "outlive":
        plugin_config = dict(plugin_config, outlive_client={})
    if variant == "json":
        plugin_config = dict(plugin_config, **JSON_MATCHING)
    if variant in ("policy-listener", "policy-route"):
        plugin_config = dict(plugin_config, route_metadata=True)
        if variant == "policy-route":
            to_upstream = [dict(to_upstream[0], metadata={
                "filter_metadata": {"idempotency": ROUTE_POLICY}})]
    idempotency = wasm_filter("idempotency", FILTER_WASM, plugin_config)
    if variant == "unobserved":
        idempotency = wasm_filter("idempotency", UNOBSERVED_WASM, plugin_config)
    if variant == "direct":
        # Like a replay, the answer comes once the whole request has been read.
        routes = [{"match": {"prefix": "/"}, "direct_response": direct(SMALL_BODY, 201)}]
        return bootstrap(admin_port, [listener("proxy", port, routes, [BUFFER])])
    if variant == "routes":
        # Covered requests take the first route; the rest take its twin, which turns the wasm
        # filter off: Envoy then never creates it for them.
        covered = {"match": {"prefix": "/", "headers": [
            {"name": ":method", "string_match": {"safe_regex": {"regex": "^(POST|PATCH)$"}}},
            {"name": "idempotency-key", "present_match": True}]},
            "route": {"cluster": "upstream", "timeout": "15s"}}
        other = {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "15s"},
                 "typed_per_filter_config": {idempotency["name"]: {
                     "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                     "disabled": True}}}
        return bootstrap(admin_port, [listener("proxy", port, [covered, other], [idempotency])],
                         [cluster])
    filters = {
        "plain": [],
        "empty": [wasm_filter("empty", EMPTY_WASM, None)],
        "filter": [idempotency],
        "raw": [idempotency],
        "skip": [skip_unless_covered(idempotency)],
        "matcher": [run_when_covered(idempotency)],
        "outlive": [idempotency],
        "policy-listener": [idempotency],
        "policy-route": [idempotency],
        "json": [idempotency],
        "unobserved": [idempotency],
        "floor": [wasm_filter("floor", PROBE_WASM, FLOOR_PROBE)],
        "pausing": [wasm_filter("pausing", PROBE_WASM, "op=none phase=body")],
        "replay-floor": [wasm_filter("replay_floor", PROBE_WASM, "op=replay phase=body size=1140")],
    }[variant]
    return bootstrap(admin_port, [listener("proxy", port, to_upstream, filters)], [cluster])


# -- processes ------------------------------------------------------------------------------


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


# -- HTTP -----------------------------------------------------------------------------------


def body_of(size, variant="a"):
    """A JSON request body of exactly `size` bytes, shaped as an API's are: an order's members,
    a list of line items (objects of strings and numbers), and a note that pads it out."""
    head = '{"amount":1250,"currency":"eur","sent_at":"2026-12-07T09:00:00Z","customer":{"id":"cus_1","email":"jane@example.com"},"items":['
    tail = '],"note":"'
    item = '{{"sku":"{v}-{n:05d}","qty":{q},"price":12.5,"name":"Caf\\u00e9 item {n}"}}'
    items, length = [], len(head) + len(tail) + 2 + 16
    while True:
        next_item = item.format(v=variant, n=len(items), q=len(items) % 7 + 1)
        length += len(next_item) + (1 if items else 0)
        if length > size:
            break
        items.append(next_item)
    body = head + ",".join(items) + tail
    body += variant * (size - len(body) - 2) + '"}'
    assert len(body) == size, (len(body), size)
    return body.encode()


def headers_for(scenario, key):
    headers = {"authorization": AUTHORIZATION}
    method, size, _, _ = SCENARIOS[scenario]
    if method == "POST":
        headers["content-type"] = "application/json"
    if key is not None:
        headers["idempotency-key"] = key
    return headers


def send(port, method, path, headers, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict((k.lower(), v) for k, v in response.getheaders()), response.read()
    finally:
        conn.close()


# -- wrk ------------------------------------------------------------------------------------

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\"requests\":%d,\"duration_us\":%d,\"status_errors\":%d,\"socket_errors\":%d," ..
    "\"p50_us\":%d,\"p99_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def lua_string(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def wrk_script(scenario, run_id, key, stored=0):
    """The Lua script of a run. `key` is the one key of a "same" or "other" run; a "cold" run
    replays keys run_id-1 .. run_id-`stored`, in turn."""
    method, size, key_mode, _ = SCENARIOS[scenario]
    lines = [f"wrk.method = {lua_string(method)}"]
    for name, value in headers_for(scenario, None).items():
        lines.append(f"wrk.headers[{lua_string(name)}] = {lua_string(value)}")
    if size:
        fill = "b" if key_mode == "other" else "a"
        lines.append(f"wrk.body = {lua_string(body_of(size, fill).decode())}")
    if key_mode == "unique":
        # A new key per request: every request claims, forwards and stores a record.
        lines += [
            "local counter = 0",
            f"local prefix = {lua_string(run_id + '-')}",
            "request = function()",
            "  counter = counter + 1",
            "  wrk.headers['idempotency-key'] = prefix .. counter",
            "  return wrk.format()",
            "end",
        ]
    elif key_mode == "cold":
        lines += [
            "local counter = 0",
            f"local prefix = {lua_string(run_id + '-')}",
            "request = function()",
            f"  counter = counter % {stored} + 1",
            "  wrk.headers['idempotency-key'] = prefix .. counter",
            "  return wrk.format()",
            "end",
        ]
    elif key is not None:
        lines.append(f"wrk.headers['idempotency-key'] = {lua_string(key)}")
    return "\n".join(lines) + "\n" + WRK_DONE


def machine_busy_seconds():
    """CPU time every CPU of the machine spent busy (not idle or waiting on I/O), /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def run_wrk(port, script_path, seconds, connections, path=path_of(None)):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
         "--latency", "-s", str(script_path), f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in result.stdout.splitlines() if l.startswith("BENCH ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    figures = json.loads(line[len("BENCH "):])
    figures["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return figures


# -- the measured runs ----------------------------------------------------------------------


# Other work on the machine (CPU time outside the proxy, the upstream and wrk) above this many
# CPUs makes a run suspect: it is run again, after waiting for a quieter moment.
NOISY = 0.25


def wait_for_quiet(limit_s=15.0):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        before = machine_busy_seconds()
        time.sleep(0.5)
        if (machine_busy_seconds() - before) / 0.5 < NOISY:
            return


class RetryBudget:
    """Seconds the whole bench may spend running noisy runs again."""

    def __init__(self, seconds):
        self.left = seconds

    def take(self, seconds):
        if self.left < seconds:
            return False
        self.left -= seconds
        return True


# A cold run replays records a second proxy stored just before, for this many times its length:
# a replay fetched from etcd is one etcd call, a first POST two calls (both writes) and the
# upstream's answer, so replays run through records 2-5 times as fast as they are stored. A
# run that replays a record twice shows it in its etcd calls per request (below 1).
POPULATE_FACTOR = 6


def populate(peer, workdir, seconds, connections, run_id):
    """Records stored through `peer` under keys run_id-1, run_id-2, ...: how many a cold run may
    replay. The last `connections` keys may have been cut off by wrk's end, so they are left out."""
    script = workdir / "populate.lua"
    script.write_text(wrk_script("first-1k", run_id, None))
    figures = run_wrk(peer.port, script, seconds * POPULATE_FACTOR, connections)
    time.sleep(0.2)  # finishes are written on the next timer ticks
    return max(figures["requests"] - connections, 1)


def measure(proxy, load, scenario, workdir, seconds, connections, run_id, retries, budget,
            peer=None, path=path_of(None)):
    """One wrk run of `scenario` against `proxy` (again, up to `retries` times while the budget
    lasts, if other work on the machine competed with it); returns the figures of the quietest.
    `load` is what serves the proxy (the upstream, etcd); `peer` stores a cold run's records;
    `path` is where the requests go."""
    method, size, key_mode, _ = SCENARIOS[scenario]
    key = None
    if key_mode in ("same", "other"):
        # The record every request of the run meets: stored once, before the run.
        key = f"{run_id}-seed"
        status, headers, _ = send(proxy.port, "POST", path,
                                  headers_for(scenario, key), body_of(size, "a"))
        if status != 201:
            raise SystemExit(f"{proxy.name}: seeding {scenario} answered {status}")
    script = workdir / f"{scenario}.lua"
    best = None
    for attempt in range(retries + 1):
        if attempt:
            if not budget.take(seconds + 5):
                break
            wait_for_quiet(5.0)
        attempt_id = f"{run_id}-{attempt}"
        stored = populate(peer, workdir, seconds, connections, attempt_id) if key_mode == "cold" else 0
        script.write_text(wrk_script(scenario, attempt_id, key, stored))
        figures = one_run(proxy, load, script, seconds, connections, path)
        figures["attempts"] = attempt + 1
        if best is None or figures["other_load"] < best["other_load"]:
            best = figures
        if figures["other_load"] < NOISY:
            break
    return best


def store_calls(proxy):
    """Requests the proxy sent to etcd: the filter's only way to reach it."""
    return proxy.counter(f"cluster.{ETCD_STORE['cluster']}.upstream_rq_total")


# The variants that call etcd, and those of them that reach it through the relay.
REMOTE = ("etcd", "etcd-floor", "etcd-far", "etcd-floor-far")
FAR = ("etcd-far", "etcd-floor-far")
# Each way, through the relay.
FAR_DELAY_MS = 1


def leases_granted(load):
    """Leases etcd has granted (its own counter): the proxy's, as its peer is idle meanwhile."""
    (etcd,) = [p for p in load if isinstance(p, Etcd)]
    return etcd.metric("etcd_debugging_lease_granted_total")


def one_run(proxy, load, script, seconds, connections, path):
    counted = proxy.name in FILTERS
    remote = proxy.name in REMOTE
    stats_before = proxy.stats() if counted else {}
    calls_before = store_calls(proxy) if remote else 0
    grants_before = leases_granted(load) if remote else 0
    cpu_before, load_before = proxy.cpu_seconds(), [p.cpu_seconds() for p in load]
    machine_before, wall_before = machine_busy_seconds(), time.time()
    figures = run_wrk(proxy.port, script, seconds, connections, path)
    cpu = proxy.cpu_seconds() - cpu_before
    load_cpu = {p.name: p.cpu_seconds() - b for p, b in zip(load, load_before)}
    up_cpu = sum(load_cpu.values())
    machine_busy = machine_busy_seconds() - machine_before
    wall = time.time() - wall_before
    stats_after = proxy.stats() if counted else {}
    if remote:
        time.sleep(0.1)  # the run's last finishes go out on the next timer ticks
        stats_before["etcd_calls"] = calls_before
        stats_after["etcd_calls"] = store_calls(proxy)
        stats_before["etcd_leases_granted"] = grants_before
        stats_after["etcd_leases_granted"] = leases_granted(load)
    requests = max(figures["requests"], 1)
    if remote:
        figures["etcd_connections"] = proxy.counter(
            f"cluster.{ETCD_STORE['cluster']}.upstream_cx_active")
    figures.update({
        "rps": figures["requests"] / (figures["duration_us"] / 1e6),
        "cpu_us_per_request": cpu * 1e6 / requests,
        "load_cpu_us_per_request": {name: t * 1e6 / requests for name, t in load_cpu.items()},
        "proxy_busy": cpu / wall,
        "load_core_busy": (figures["wrk_cpu_s"] + up_cpu) / wall,
        "other_load": max(0.0, machine_busy - cpu - up_cpu - figures["wrk_cpu_s"]) / wall,
        "counters": {k: v - stats_before.get(k, 0) for k, v in stats_after.items()
                     if v - stats_before.get(k, 0)},
    })
    return figures


# The proxy that stores the records a cold run replays, next to the etcd variant's: it shares
# its etcd, never its local cache. It runs on the load CPU and is idle while anything is measured.
PEER = "etcd-peer"


def start_proxies(workdir, upstream, variants, etcd, relay):
    """The variants' proxies, by variant, and the etcd variant's peer."""
    proxies = {}
    peer = any(v in REMOTE for v in variants)
    wanted = [(v, PROXY_CPU) for v in variants] + ([(PEER, LOAD_CPU)] if peer else [])
    for name, cpu in wanted:
        variant = "etcd" if name == PEER else name
        port_of = (lambda v: relay.port if v in FAR else etcd.client_port) if etcd else (lambda v: None)
        envoy = Envoy(name, workdir,
                      lambda port, admin, v=variant: proxy_config(
                          v, port, admin, upstream.port, etcd_port=port_of(v)),
                      cpu)
        proxies[name] = envoy.start()
    for envoy in proxies.values():
        envoy.wait_ready()
    return proxies


def warm_up(proxies, workdir, connections, variants):
    """JIT tiers, connection pools and allocator caches settle before anything is measured."""
    for variant in variants:
        scenario = "first-1k" if variant in FILTERS else "nokey-1k"
        script = workdir / "warm.lua"
        script.write_text(wrk_script(scenario, f"warm-{variant}-{time.time_ns()}", None))
        run_wrk(proxies[variant].port, script, 1, connections)
    time.sleep(0.5)  # the last warm-up requests end before anything is counted


BASELINES = ("plain", "empty", "direct")


def workload(variant, scenario):
    """What `variant` runs in `scenario`'s group."""
    return baseline_scenario(scenario) if variant in BASELINES else scenario


def plan_runs(args):
    """Groups of (scenario, variant) runs, one group per scenario asked for."""
    groups = []
    for scenario in args.scenarios:
        group = [(scenario, v) for v in args.variants if scenario in MATRIX[v]]
        if group:
            groups.append(group)
    return groups


def rounds(workdir, upstream, etcd, relay, args):
    runs = {}  # (variant, scenario) -> [figures per round]
    budget = RetryBudget(args.retry_budget)
    groups = plan_runs(args)
    total = sum(len(g) for g in groups) * args.rounds
    done = 0
    for number in range(args.rounds):
        # Fresh proxies each round: the stores start empty, so first POSTs never fill them.
        proxies = start_proxies(workdir, upstream, args.variants, etcd, relay)
        try:
            warm_up(proxies, workdir, args.connections, args.variants)
            # Rotate the order of variants each round, so drift does not favour one of them.
            for group in groups:
                shift = number % len(group)
                for s, v in group[shift:] + group[:shift]:
                    done += 1
                    run_id = f"r{number}-{v}-{s}-{time.time_ns()}"
                    load = ([upstream, etcd] + ([relay] if v in FAR else [])
                            if v in REMOTE else [upstream])
                    figures = measure(proxies[v], load, workload(v, s), workdir,
                                      args.seconds, SCENARIO_CONNECTIONS.get(s, args.connections),
                                      run_id, args.retries,
                                      budget, proxies.get(PEER), path_of(s))
                    runs.setdefault((v, s), []).append(figures)
                    print(f"  [{done:3}/{total}] round {number + 1} {v:8} {s:14} "
                          f"{figures['rps']:9.0f} req/s  p50 {figures['p50_us'] / 1000:6.2f} ms  "
                          f"p99 {figures['p99_us'] / 1000:6.2f} ms  "
                          f"{figures['cpu_us_per_request']:6.1f} us/req  "
                          f"proxy busy {figures['proxy_busy']:4.0%}  "
                          f"load core {figures['load_core_busy']:4.0%}  "
                          f"other {figures['other_load']:4.0%}"
                          + (f" (try {figures['attempts']})" if figures['attempts'] > 1 else "")
                          + (f"  non-2xx {figures['status_errors']}" if figures['status_errors'] else "")
                          + (f"  {figures['counters']}" if figures['counters'] else ""),
                          flush=True)
        finally:
            for proxy in proxies.values():
                proxy.stop()
    return runs


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


def summarise(runs):
    summary = {}
    for (variant, scenario), figures in runs.items():
        counters = {}
        for f in figures:
            for k, v in f["counters"].items():
                counters[k] = counters.get(k, 0) + v
        summary[(variant, scenario)] = {
            "rps": median_of(figures, "rps"),
            "p50_us": median_of(figures, "p50_us"),
            "p99_us": median_of(figures, "p99_us"),
            "cpu_us_per_request": median_of(figures, "cpu_us_per_request"),
            "etcd_cpu_us_per_request": statistics.median(
                f.get("load_cpu_us_per_request", {}).get("etcd", 0) for f in figures),
            "proxy_busy": median_of(figures, "proxy_busy"),
            "load_core_busy": max(f["load_core_busy"] for f in figures),
            "other_load": max(f["other_load"] for f in figures),
            "status_errors": sum(f["status_errors"] for f in figures),
            "socket_errors": sum(f["socket_errors"] for f in figures),
            "requests": sum(f["requests"] for f in figures),
            "counters": counters,
            "etcd_connections": max(f.get("etcd_connections", 0) for f in figures),
            "rounds": [round(f["rps"]) for f in figures],
            "per_round": [{"rps": f["rps"], "cpu_us_per_request": f["cpu_us_per_request"],
                           "p50_us": f["p50_us"]} for f in figures],
        }
    return summary


def figure_for(summary, variant, scenario):
    """The figures of `variant` in `scenario`'s group (a baseline run only with a subset of
    scenarios, --scenarios, stands in for the group's when it is missing)."""
    found = summary.get((variant, scenario))
    if found is None and variant in BASELINES:
        found = summary.get((variant, baseline_scenario(scenario)))
    return found


# -- memory per record ----------------------------------------------------------------------


def fill(port, path, size, count, prefix, connections=4):
    """Sends `count` first POSTs with new keys to `path`, over a few kept-alive connections."""
    body = body_of(size)
    statuses = {}
    lock = threading.Lock()

    def worker(start):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        for n in range(start, count, connections):
            conn.request("POST", path, body=body, headers=headers_for("first-1k", f"{prefix}-{n}"))
            response = conn.getresponse()
            response.read()
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def snapshot(envoy):
    """(RSS, allocated bytes, records stored so far), once RSS stops moving."""
    time.sleep(1.0)
    last = envoy.rss_bytes()
    for _ in range(10):
        time.sleep(0.3)
        now = envoy.rss_bytes()
        if abs(now - last) < 64 * 1024:
            break
        last = now
    return envoy.rss_bytes(), envoy.allocated_bytes(), envoy.stats().get("stored", 0)


# name: (label, upstream path answering a body of that size, body bytes, table capacity,
#        records stored to use up the allocator's free heap, records measured, compressed)
MEMORY_CASES = {
    "1k": ("1 KiB JSON", "/r/json-1k", 1024, 65_536, 12_000, 16_000, True),
    "1k-raw": ("1 KiB JSON, not compressed", "/r/json-1k", 1024, 65_536, 12_000, 16_000, False),
    "16k": ("16 KiB JSON", "/r/json-16k", 16_384, 16_384, 2_000, 4_000, True),
    "16k-raw": ("16 KiB JSON, not compressed", "/r/json-16k", 16_384, 16_384, 2_000, 4_000, False),
    "64k": ("64 KiB JSON", "/r/json-64k", 65_536, 4_096, 500, 1_000, True),
}


def memory(workdir, upstream, cases):
    """Memory of the proxy per stored record.

    Buckets (the state of 16 records each) are created on first use and then stay, so the table
    is first touched all over by claims the filter releases (the upstream answers 503 on /fail,
    sent by wrk with a new key per request): what is left is what one more record costs. Then a
    first batch of records uses up the free heap Envoy's allocator already holds (resident, so
    RSS would not see the records that land in it), and the second batch is measured: RSS growth
    (/proc/<pid>/statm) and allocated-bytes growth (admin /memory), over the records stored
    (the filter's `stored` counter).
    """
    results = []
    for label, path, size, capacity, absorb, count, compressed in cases:
        plugin = dict(FILTER_CONFIG, capacity_records=capacity, compress_responses=compressed)
        envoy = Envoy(f"memory-{size}", workdir,
                      lambda port, admin: proxy_config("filter", port, admin, upstream.port, plugin),
                      PROXY_CPU).start().wait_ready()
        try:
            fill(envoy.port, path, size, 50, f"warm-{size}")
            before_touch = snapshot(envoy)
            script = workdir / "touch.lua"
            script.write_text(wrk_script("first-1k", f"touch-{size}-{time.time_ns()}", None))
            buckets = capacity // 16
            # Enough claims for every bucket to have been hit (coupon collector, with margin).
            seconds = 2 + int(buckets * 12 / 5000)
            run_wrk(envoy.port, script, seconds, 16, path="/fail")
            touched = snapshot(envoy)
            fill(envoy.port, path, size, absorb, f"absorb-{size}")
            start = snapshot(envoy)
            statuses = fill(envoy.port, path, size, count, f"fill-{size}")
            end = snapshot(envoy)
            stored = max(end[2] - start[2], 1)
            _, headers, sample = send(envoy.port, "POST", path,
                                      headers_for("first-1k", f"fill-{size}-0"), body_of(size))
            results.append({
                "label": label,
                "body_bytes": len(sample),
                "replayed": headers.get("idempotent-replayed") == "true",
                "requested": count,
                "stored": end[2] - start[2],
                "statuses": statuses,
                "capacity_records": capacity,
                "rss_per_record": (end[0] - start[0]) / stored,
                "allocated_per_record": (None if end[1] is None or start[1] is None
                                         else (end[1] - start[1]) / stored),
                "table_allocated_per_capacity_record": (
                    None if touched[1] is None or before_touch[1] is None
                    else (touched[1] - before_touch[1]) / capacity),
                "rss_total": end[0],
            })
        finally:
            envoy.stop()
    return results


def compacted_in_use(etcd):
    """etcd's database bytes in use, once compacted to its current revision."""
    revision = etcd.post("/v3/kv/range", {"key": "AA=="})["header"]["revision"]
    try:
        # Physical: it answers once the compaction is on disk, which after a whole bench of
        # records takes etcd far longer than any other call.
        etcd.post("/v3/kv/compaction", {"revision": revision, "physical": True}, timeout=120)
    except EtcdError as error:
        if "has been compacted" not in str(error):  # nothing written since
            raise
    return int(etcd.post("/v3/maintenance/status", {})["dbSizeInUse"])


def etcd_storage(workdir, upstream, etcd, cases):
    """etcd's database bytes per record (`dbSizeInUse` of /v3/maintenance/status), for records
    stored through a proxy with the etcd store, once compacted (the claim's revision gone): what
    an etcd with --auto-compaction-retention holds in the long run."""
    results = []
    envoy = Envoy("etcd-storage", workdir,
                  lambda port, admin: proxy_config("etcd", port, admin, upstream.port,
                                                   etcd_port=etcd.client_port),
                  PROXY_CPU).start().wait_ready()
    try:
        for label, path, size, _, _, count, compressed in cases:
            if not compressed:  # the etcd proxy runs the defaults
                continue
            before = compacted_in_use(etcd)
            stored_before = envoy.stats().get("stored", 0)
            fill(envoy.port, path, size, min(count, 5_000), f"etcd-{size}-{time.time_ns()}",
                 connections=16)
            time.sleep(0.5)  # the last finishes go out on the next ticks
            stored = max(envoy.stats().get("stored", 0) - stored_before, 1)
            results.append({"label": label, "body_bytes": size, "stored": stored,
                            "bytes_per_record": (compacted_in_use(etcd) - before) / stored})
    finally:
        envoy.stop()
    return results


# -- report ---------------------------------------------------------------------------------


def machine():
    model, mhz = "unknown CPU", None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    cpus = os.cpu_count()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    envoy_version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True).stdout
    envoy_version = envoy_version.strip().split("version:")[-1].strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0]
    return (f"{model}" + (f" at {mhz:.0f} MHz" if mhz else "") + f", nproc {nproc} ({cpus} CPUs)"
            f"{mem}; Linux {platform.release()}; Envoy {envoy_version}; {wrk_version.strip()}")


def fmt_ratio(value):
    return "–" if value is None else f"{value:.2f}×"


WHO = {"filter": "filter alone", "skip": "SkipFilter matcher", "matcher": "composite matcher",
       "routes": "off by route", "floor": "floor: the host operations alone",
       "replay-floor": "floor: the host operations alone"}


def targets():
    """(scenario, variant, against, at least, label) for every ratio target. The floor's rows
    are what the host allows: the least a first POST can cost, against the same target."""
    out = []
    for scenario, what in (("get", "GET"), ("nokey-1k", "POST without a key, 1 KiB"),
                           ("nokey-64k", "POST without a key, 64 KiB")):
        for variant in ("filter", "skip", "matcher", "routes"):
            out.append((scenario, variant, "plain", 0.97, f"{what} ≥ 0.97× plain ({WHO[variant]})"))
    for size, least in (("1k", 0.75), ("64k", 0.6)):
        kib = "1 KiB" if size == "1k" else "64 KiB"
        for variant in ("filter", "matcher", "floor"):
            out.append((f"first-{size}", variant, "plain", least,
                        f"first POST ≥ {least}× plain, {kib} ({WHO[variant]})"))
    for variant in ("filter", "matcher", "replay-floor"):
        out.append(("replay-1k", variant, "plain", 1.3, f"replay ≥ 1.3× plain, 1 KiB ({WHO[variant]})"))
        out.append(("replay-1k", variant, "direct", 0.6,
                    f"replay ≥ 0.6× direct_response, 1 KiB ({WHO[variant]})"))
    for variant in ("filter", "matcher"):
        for kind in ("replay", "conflict"):
            out.append((f"{kind}-64k", variant, "plain", 1.0,
                        f"{kind} ≥ 1.0× plain, 64 KiB ({WHO[variant]})"))
    return out


# The proxy CPU a first POST of 1 KiB may spend above a filter that only pauses for the body.
CPU_ABOVE_PAUSING_US = 15
# The proxy CPU a covered request may spend above the filter without route_metadata: on a route
# without a policy of its own, and on one with it (a GET, not covered, reads the route too).
CPU_ROUTE_POLICY_US = {"policy-listener": 10, "policy-route": 15}
# The proxy CPU a covered request may spend with fingerprint json above the filter's bytes.
CPU_JSON_US = {"1k": 15, "64k": 250}
# The proxy CPU the gauges, histograms and access-log facts may cost a covered request.
CPU_OBSERVING_US = 3


def cpu_target_row(label, values, limit, blank_columns=0):
    """A target row for CPU µs, round by round: at most `limit`, met by the median."""
    median = statistics.median(values)
    return (f"| {label} | {median:.0f} µs | {min(values):.0f}–{max(values):.0f} µs |"
            + " |" * blank_columns + f" {'yes' if median <= limit else 'no'} |")


def cpu_above(summary, scenario, variant, against):
    """Proxy CPU µs per request of `variant` above `against`'s in `scenario`, round by round."""
    mine, theirs = figure_for(summary, variant, scenario), figure_for(summary, against, scenario)
    if not mine or not theirs:
        return []
    return [a["cpu_us_per_request"] - b["cpu_us_per_request"]
            for a, b in zip(mine["per_round"], theirs["per_round"])]


def per_round_ratios(summary, scenario, variant, against, key):
    """`key` of `variant` over `key` of `against`, round by round: the two runs of a round ran
    seconds apart, so whatever else slowed the machine down then slowed both."""
    mine, theirs = figure_for(summary, variant, scenario), figure_for(summary, against, scenario)
    if not mine or not theirs:
        return []
    return [a[key] / b[key] for a, b in zip(mine["per_round"], theirs["per_round"]) if b[key]]


def ratio(summary, scenario, variant, against):
    """Requests/s of `variant` over those of `against`: the median of the per-round ratios."""
    ratios = per_round_ratios(summary, scenario, variant, against, "rps")
    return statistics.median(ratios) if ratios else None


def ratio_range(summary, scenario, variant, against):
    ratios = per_round_ratios(summary, scenario, variant, against, "rps")
    return (min(ratios), max(ratios)) if ratios else None


def cpu_ratio(summary, scenario, variant, against):
    """The same from the proxy's CPU per request (theirs over mine): what the ratio would be on
    a saturated core, less sensitive to how much of its core the proxy got."""
    ratios = per_round_ratios(summary, scenario, variant, against, "cpu_us_per_request")
    return statistics.median(1 / r for r in ratios) if ratios else None


def report(summary, mem, storage, args, elapsed, machine_text):
    lines = []
    lines.append("# Benchmark results\n")
    lines.append("Generated by `make bench` (bench/run.py); do not edit by hand.\n")
    lines.append(f"- Machine: {machine_text}")
    lines.append(f"- Proxy: Envoy `--concurrency 1` pinned to CPU {PROXY_CPU} (`taskset`); "
                 f"wrk (1 thread, {args.connections} connections) and the upstream Envoy "
                 f"(`direct_response`, `--concurrency 1`) pinned to CPU {LOAD_CPU}.")
    lines.append(f"- {args.rounds} interleaved rounds × {args.seconds} s per run; figures are medians "
                 f"over the rounds; the proxies restart, with empty stores, at each round. "
                 + ("" if elapsed is None else f"Whole run: {elapsed / 60:.1f} min."))
    lines.append(f"- Filter configuration: `{json.dumps(FILTER_CONFIG)}`; requests carry "
                 f"`authorization` (the record's scope). Every POST is answered by the upstream "
                 f"with a {len(SMALL_BODY)}-byte body, the response a record stores.")
    lines.append("- Reproduce: `make bench` (or `python3 bench/run.py --help` for shorter runs).\n")

    lines.append("## Throughput and latency\n")
    lines.append("Requests/s, latency and CPU are medians over the rounds. CPU is the proxy "
                 "Envoy's (utime + stime from `/proc/<pid>/stat`) per request. `vs plain` and "
                 "`vs direct` are requests/s against plain Envoy (router only) and against Envoy "
                 "answering with `direct_response`: the median of the ratios within each round. "
                 "Plain, empty and direct do the same work for every POST of a body size: in "
                 "each scenario's group they run the key-less POST of that size, seconds from "
                 "the runs they are compared with. Conflicts are answered 409, hence their "
                 "non-2xx.\n")
    lines.append("| scenario | variant | req/s | p50 ms | p99 ms | CPU µs/req | vs plain | vs direct | non-2xx | filter counters |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for scenario in args.scenarios:
        for variant in args.variants:
            if scenario not in MATRIX[variant]:
                continue
            f = summary.get((variant, scenario))
            if not f:
                continue
            counters = ", ".join(f"{k} {v}" for k, v in sorted(f["counters"].items()))
            lines.append(
                f"| {SCENARIOS[scenario][3]} | {VARIANTS[variant]} | {f['rps']:,.0f} | "
                f"{f['p50_us'] / 1000:.2f} | {f['p99_us'] / 1000:.2f} | "
                f"{f['cpu_us_per_request']:.1f} | "
                f"{fmt_ratio(ratio(summary, scenario, variant, 'plain'))} | "
                f"{fmt_ratio(ratio(summary, scenario, variant, 'direct'))} | "
                f"{f['status_errors']:,} | {counters} |")
    lines.append("")
    busy = [f["load_core_busy"] for f in summary.values()] or [0]
    proxy_busy = [f["proxy_busy"] for f in summary.values()] or [0]
    other = [f["other_load"] for f in summary.values()] or [0]
    lines.append(f"Proxy core busy: {min(proxy_busy):.0%}–{max(proxy_busy):.0%} of a CPU "
                 f"(the proxy is the bottleneck when this is near 100%); load-generator core busy "
                 f"(wrk + upstream): at most {max(busy):.0%}. Other work on the machine during "
                 f"the runs kept (CPU time outside the proxy, the upstream and wrk): median "
                 f"{statistics.median(other):.0%}, at most {max(other):.0%} of a CPU; a run "
                 f"with more than {NOISY:.0%} is run again when the time allows.\n")
    lines.append("![requests per second](results.svg)\n")
    lines += etcd_section(summary, storage)
    lines += outlive_section(summary)

    lines.append("## Targets\n")
    lines.append("Measured is the median over the rounds of the ratio of requests/s within a "
                 "round (the two runs of a round ran seconds apart), with the lowest and highest "
                 "of those ratios; the CPU column is the same from the proxy's CPU per request, "
                 "which does not depend on how much of its core the proxy got.\n")
    lines.append("| target | measured | per-round range | from CPU/request | met |")
    lines.append("|---|---:|---:|---:|:---:|")
    for scenario, variant, against, least, label in targets():
        if scenario not in args.scenarios or variant not in args.variants:
            continue
        r = ratio(summary, scenario, variant, against)
        c = cpu_ratio(summary, scenario, variant, against)
        spread = ratio_range(summary, scenario, variant, against)
        spread = "–" if spread is None else f"{spread[0]:.2f}–{spread[1]:.2f}"
        lines.append(f"| {label} | {fmt_ratio(r)} | {spread} | {fmt_ratio(c)} | "
                     f"{'yes' if r is not None and r >= least else 'no'} |")
    for variant in ("filter", "floor"):
        above = cpu_above(summary, "first-1k", variant, "pausing")
        if above:
            lines.append(cpu_target_row(f"proxy CPU of a first POST, 1 KiB, ≤ {CPU_ABOVE_PAUSING_US} "
                                        f"µs above a pausing filter ({WHO[variant]})",
                                        above, CPU_ABOVE_PAUSING_US, blank_columns=1))
    for variant, limit in CPU_ROUTE_POLICY_US.items():
        for scenario in ("get", "first-1k", "replay-1k"):
            above = cpu_above(summary, scenario, variant, "filter")
            if above:
                lines.append(cpu_target_row(
                    f"proxy CPU of a {SCENARIOS[scenario][3]} ≤ {limit} µs above the filter "
                    f"without route_metadata ({VARIANTS[variant].split(', ', 1)[1]})",
                    above, limit, blank_columns=1))
    for size, limit in CPU_JSON_US.items():
        for kind in ("first", "replay"):
            above = cpu_above(summary, f"{kind}-{size}", "json", "filter")
            if above:
                lines.append(cpu_target_row(
                    f"proxy CPU of a {SCENARIOS[f'{kind}-{size}'][3]} ≤ {limit} µs above the filter "
                    f"with fingerprint bytes (fingerprint json)", above, limit, blank_columns=1))
    for scenario in MATRIX["unobserved"]:
        above = cpu_above(summary, scenario, "filter", "unobserved")
        if above:
            lines.append(cpu_target_row(
                f"proxy CPU of a {SCENARIOS[scenario][3]} ≤ {CPU_OBSERVING_US} µs above the filter "
                f"without its gauges, histograms and access-log facts", above, CPU_OBSERVING_US,
                blank_columns=1))
    for m in mem:
        limit = m["body_bytes"] + 256
        lines.append(f"| memory ≤ record + 256 B, {m['label']} record (RSS) | "
                     f"{m['rss_per_record']:,.0f} B (limit {limit:,}) | | | "
                     f"{'yes' if m['rss_per_record'] <= limit else 'no'} |")
        if m["allocated_per_record"] is not None:
            lines.append(f"| memory ≤ record + 256 B, {m['label']} record (allocated) | "
                         f"{m['allocated_per_record']:,.0f} B (limit {limit:,}) | | | "
                         f"{'yes' if m['allocated_per_record'] <= limit else 'no'} |")
    lines.append("")

    if mem:
        lines.append("## Memory per stored record\n")
        lines.append("A record here is the upstream's answer to a first POST: status, headers "
                     "(`content-type`, `date`, `server`, `location`) and a body of the size shown. "
                     "Growth of the proxy's resident memory (`/proc/<pid>/statm`) and of the bytes "
                     "Envoy's allocator has handed out (admin `/memory`, `allocated`) over the "
                     "records stored (the filter's `stored` counter), in a table whose buckets "
                     "already exist, after a first batch of records has used up the free heap the "
                     "allocator held. The buckets themselves (the state of 16 records each, "
                     "created on first use and never freed) cost the last column per record of "
                     "`capacity_records`, stored or not.\n")
        lines.append("| record body | capacity_records | records measured | RSS per record | "
                     "allocated per record | allocated over the body | buckets, per record of capacity |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for m in mem:
            alloc = m["allocated_per_record"]
            table = m["table_allocated_per_capacity_record"]
            lines.append(
                f"| {m['label']} ({m['body_bytes']:,} B) | {m['capacity_records']:,} | "
                f"{m['stored']:,} of {m['requested']:,} | {m['rss_per_record']:,.0f} B | "
                + ("– | – | " if alloc is None else
                   f"{alloc:,.0f} B | {alloc - m['body_bytes']:,.0f} B | ")
                + ("– |" if table is None else f"{table:,.0f} B |"))
        lines.append("")
    return "\n".join(lines)


def outlive_section(summary):
    """What outlive_client costs: the same requests sent from the root context against the
    router's path, in the same rounds."""
    rows = [s for s in MATRIX["outlive"] if ("outlive", s) in summary and ("filter", s) in summary]
    if not rows:
        return []
    lines = ["## Sent from the root context (outlive_client)\n",
             "The filter with `\"outlive_client\": {}` against the same filter through the "
             "router: requests/s and proxy CPU per request, the median of the ratios within each "
             "round.\n",
             "| scenario | req/s | vs the router's path | per-round range | proxy CPU µs/req | router's path CPU µs/req |",
             "|---|---:|---:|---:|---:|---:|"]
    for scenario in rows:
        f, routed = summary[("outlive", scenario)], summary[("filter", scenario)]
        spread = ratio_range(summary, scenario, "outlive", "filter")
        spread = "–" if spread is None else f"{spread[0]:.2f}–{spread[1]:.2f}"
        lines.append(f"| {SCENARIOS[scenario][3]} | {f['rps']:,.0f} | "
                     f"{fmt_ratio(ratio(summary, scenario, 'outlive', 'filter'))} | {spread} | "
                     f"{f['cpu_us_per_request']:.1f} | {routed['cpu_us_per_request']:.1f} |")
    lines.append("")
    return lines


# The etcd store's targets: (label, scenario, variant, against scenario, against variant, least).
ETCD_TARGETS = [
    ("etcd first POST ≥ 0.5× the shared-data store's", "first-1k", "etcd", "first-1k", "filter", 0.5),
    ("etcd replay not in the local cache ≥ 0.5× a cached one", "replay-cold-1k", "etcd",
     "replay-1k", "etcd", 0.5),
    ("etcd first POST ≥ 0.8× the floor's (what etcd serves of a first POST's two calls here)",
     "first-1k", "etcd", "first-1k", "etcd-floor", 0.8),
    ("etcd 1 ms away: first POST ≥ 0.5× the shared-data store's", "first-1k", "etcd-far", "first-1k",
     "filter", 0.5),
    ("etcd 1 ms away: replay not in the local cache ≥ 0.5× a cached one", "replay-cold-1k",
     "etcd-far", "replay-1k", "etcd-far", 0.5),
    ("etcd 1 ms away: first POST ≥ 0.8× the floor's", "first-1k", "etcd-far", "first-1k",
     "etcd-floor-far", 0.8),
]
# The proxy CPU an etcd operation may cost, on a first POST: its claim and its finish, each a
# call of its own for the floor, and transactions nested in calls shared with other requests'
# for the filter.
CPU_PER_ETCD_OPERATION_US = 40
OPERATIONS_PER_FIRST_POST = 2


def etcd_calls_per_request(figures):
    return figures["counters"].get("etcd_calls", 0) / max(figures["requests"], 1)


def cpu_per_etcd_operation(summary, variant, against):
    """The proxy CPU a first POST of `variant` spends above one of `against`, per etcd
    operation (its claim, its finish), round by round."""
    mine, theirs = summary.get((variant, "first-1k")), figure_for(summary, against, "first-1k")
    if not mine or not theirs:
        return []
    return [(a["cpu_us_per_request"] - b["cpu_us_per_request"]) / OPERATIONS_PER_FIRST_POST
            for a, b in zip(mine["per_round"], theirs["per_round"])]


# What a lone first POST through etcd may wait above one on the shared-data store: two etcd
# round trips (the floor probe's two calls at one connection, above a filter that only pauses),
# and this much.
LONE_SLACK_MS = 1


def lone_latency_row(summary, variant, floor, where):
    """A target row: the p50 of a first POST at one connection through `variant`, above the
    shared-data store's, against two round trips as the `floor` probe measures them."""
    runs = [figure_for(summary, v, "first-lone-1k") for v in (variant, "filter", floor, "pausing")]
    if not all(runs):
        return None
    mine, store, probe, pausing = ([f["p50_us"] / 1000 for f in r["per_round"]] for r in runs)
    above = statistics.median(a - b for a, b in zip(mine, store))
    trips = statistics.median(a - b for a, b in zip(probe, pausing))
    return (f"| lone first POST (one connection){where}: p50 ≤ two etcd round trips "
            f"({trips:.2f} ms) + {LONE_SLACK_MS} ms above the shared-data store | {above:.2f} ms | "
            f"p99 {figure_for(summary, variant, 'first-lone-1k')['p99_us'] / 1000:.2f} ms | "
            f"{'yes' if above <= trips + LONE_SLACK_MS else 'no'} |")


def etcd_section(summary, storage):
    """What the cluster-wide store costs: where the time goes, what etcd does per request and
    what it stores per record."""
    rows = [(v, s) for v in REMOTE for s in MATRIX[v] if (v, s) in summary]
    if not rows:
        return []
    lines = ["## The etcd store\n",
             "The filter with `\"etcd\": " + json.dumps(ETCD_STORE) + "`, over gRPC on "
             "envoy/envoy-etcd.yaml's cluster (HTTP/2), and the same table as its "
             "local cache. etcd is one member on loopback (Debian's etcd-server, data directory "
             "on this machine's disk), pinned to the load CPU with wrk and the upstream: its work "
             "is part of the load core's. A second proxy sharing the etcd stores, just before "
             "each cold run, the records that run replays: this proxy's cache has never seen "
             "them. Warm replays repeat one key, whose record the proxy fetched or stored "
             "before. etcd calls and CPU are per request: a first POST claims (one transaction) "
             "and stores (one transaction), a cold replay reads the record (in its claim's "
             "transaction, or, once most of a worker's claims find one, in a read of its own "
             "that waits with others in read-only transactions), a warm replay makes no call; claims and finishes go out nested "
             "in shared transactions, so there are fewer calls than transactions. The floor is the probe filter making only "
             "a first POST's two calls (bench/probe-filter, `op=etcd`), with no work of its own. "
             "Connections: the most the proxy held to "
             "etcd at the end of a run; leases: what etcd granted during the runs, per round.\n",
             "| scenario | req/s | vs plain | p50 ms | p99 ms | proxy CPU µs/req | "
             "etcd CPU µs/req | etcd calls/req | connections | leases granted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, scenario in rows:
        f = summary[(variant, scenario)]
        calls = etcd_calls_per_request(f)
        leases = f["counters"].get("etcd_leases_granted", 0) / len(f["rounds"])
        floor = " (floor: the calls alone)" if variant not in FILTERS else ""
        far = f", etcd {FAR_DELAY_MS} ms away" if variant in FAR else ""
        lines.append(f"| {SCENARIOS[scenario][3]}{floor}{far} | {f['rps']:,.0f} | "
                     f"{fmt_ratio(ratio(summary, scenario, variant, 'plain'))} | "
                     f"{f['p50_us'] / 1000:.2f} | {f['p99_us'] / 1000:.2f} | "
                     f"{f['cpu_us_per_request']:.0f} | "
                     f"{f['etcd_cpu_us_per_request']:.0f} | {calls:.2f} | "
                     f"{f['etcd_connections']} | {leases:.1f} |")
    lines += ["", "| target | measured | per-round range | met |", "|---|---:|---:|:---:|"]
    for label, scenario, variant, theirs, against, least in ETCD_TARGETS:
        mine, other = summary.get((variant, scenario)), summary.get((against, theirs))
        if not mine or not other:
            continue
        ratios = [a["rps"] / b["rps"] for a, b in zip(mine["per_round"], other["per_round"])
                  if b["rps"]]
        median = statistics.median(ratios)
        lines.append(f"| {label} | {median:.2f}× | {min(ratios):.2f}–{max(ratios):.2f} | "
                     f"{'yes' if median >= least else 'no'} |")
    for variant, floor, where in (("etcd", "etcd-floor", ""), ("etcd-far", "etcd-floor-far", ", 1 ms away")):
        row = lone_latency_row(summary, variant, floor, where)
        if row:
            lines.append(row)
    for label, variant, against in (("this filter, above the shared-data store", "etcd", "filter"),
                                    ("floor: the calls alone, above a pausing filter",
                                     "etcd-floor", "pausing")):
        added = cpu_per_etcd_operation(summary, variant, against)
        if added:
            lines.append(cpu_target_row(f"proxy CPU per etcd operation of a first POST (claim, "
                                        f"finish) ≤ {CPU_PER_ETCD_OPERATION_US} µs ({label})",
                                        added, CPU_PER_ETCD_OPERATION_US))
    lines.append("")
    if storage:
        lines += ["etcd's database per record: the growth of `dbSizeInUse` "
                  "(`/v3/maintenance/status`) over the records stored, after a compaction has "
                  "dropped the claims' revisions, which is what an etcd with "
                  "`--auto-compaction-retention` holds in the long run. The record is the "
                  "upstream's answer (status, four headers, the body).\n",
                  "| record body | records stored | etcd database per record |",
                  "|---|---:|---:|"]
        lines += [f"| {e['label']} | {e['stored']:,} | {e['bytes_per_record']:,.0f} B |"
                  for e in storage]
        lines.append("")
    return lines


def pivot_table(summary, args):
    """One row per scenario, one column per variant: requests/s (ratio to plain Envoy)."""
    head = "| scenario | " + " | ".join(VARIANTS[v] for v in args.variants) + " |"
    lines = [head, "|---|" + "---:|" * len(args.variants)]
    for scenario in args.scenarios:
        cells = []
        for variant in args.variants:
            f = figure_for(summary, variant, scenario)
            ran = scenario in MATRIX[variant]
            if f is None or not ran:
                cells.append("")
                continue
            r = ratio(summary, scenario, variant, "plain")
            cells.append(f"{f['rps']:,.0f}" + ("" if variant == "plain" or r is None
                                               else f" ({r:.2f}×)"))
        lines.append(f"| {SCENARIOS[scenario][3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_BEGIN = "<!-- results:begin (written by bench/run.py) -->"
README_END = "<!-- results:end -->"


def update_readme(path, summary, mem, args):
    """Replaces the results block of bench/README.md with this run's tables."""
    if not path.exists():
        return
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    block = [README_BEGIN, "",
             f"{machine_short()}. {args.rounds} interleaved rounds × {args.seconds} s; "
             f"requests/s (ratio to plain Envoy, median of the per-round ratios). "
             f"Every figure, with latency and CPU per request: [results.md](results.md).", "",
             pivot_table(summary, args), "", "![requests per second](results.svg)", ""]
    met = [(label, ratio(summary, s, v, a), least) for s, v, a, least, label in targets()
           if s in args.scenarios and v in args.variants]
    block += ["| target | measured | met |", "|---|---:|:---:|"]
    block += [f"| {label} | {fmt_ratio(r)} | {'yes' if r is not None and r >= least else 'no'} |"
              for label, r, least in met]
    for m in mem:
        limit = m["body_bytes"] + 256
        block.append(f"| memory ≤ record + 256 B, {m['label']} record | "
                     f"{m['rss_per_record']:,.0f} B resident per record (limit {limit:,}) | "
                     f"{'yes' if m['rss_per_record'] <= limit else 'no'} |")
    block += ["", README_END]
    start = text.index(README_BEGIN)
    end = text.index(README_END) + len(README_END)
    path.write_text(text[:start] + "\n".join(block) + text[end:])


def svg_chart(summary, args):
    """Grouped horizontal bars: requests/s per scenario and variant, with the ratio to plain."""
    colours = {"plain": "#4c78a8", "empty": "#9ecae9", "filter": "#f58518", "raw": "#eeca3b",
               "skip": "#ff9da6", "matcher": "#e45756", "direct": "#54a24b",
               "routes": "#b279a2", "etcd": "#72b7b2", "outlive": "#9d755d",
               "floor": "#bab0ac", "pausing": "#d6d6d6", "replay-floor": "#8c8c8c",
               "etcd-floor": "#a5d5d0", "policy-listener": "#d8b5a5", "policy-route": "#79706e",
               "json": "#c7a0cb", "unobserved": "#bab0ac", "etcd-far": "#4c9a96",
               "etcd-floor-far": "#cfe9e7"}
    rows = []
    for scenario in args.scenarios:
        group = []
        for variant in args.variants:
            f = figure_for(summary, variant, scenario)
            if f is not None and scenario in MATRIX[variant]:
                group.append((variant, f["rps"], ratio(summary, scenario, variant, "plain")))
        if group:
            rows.append((scenario, group))
    top = max(rps for _, g in rows for _, rps, _ in g) if rows else 1
    bar, gap, label_w, width = 14, 14, 270, 960
    plot_w = width - label_w - 130
    per_row = 3
    legend_rows = (len(args.variants) + per_row - 1) // per_row
    first_bar = 44 + 18 * legend_rows
    height = first_bar + sum(len(g) * bar + gap for _, g in rows) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
           f'Requests/s through one Envoy worker (median of {args.rounds} rounds)</text>']
    for n, variant in enumerate(args.variants):
        x, y = 20 + (n % per_row) * 310, 36 + 18 * (n // per_row)
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colours[variant]}"/>'
                   f'<text x="{x + 16}" y="{y + 10}">{VARIANTS[variant]}</text>')
    y = first_bar
    for scenario, group in rows:
        mid = y + len(group) * bar / 2
        out.append(f'<text x="{label_w - 8}" y="{mid + 4}" text-anchor="end">'
                   f'{SCENARIOS[scenario][3]}</text>')
        for variant, rps, r in group:
            w = plot_w * rps / top
            out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 2}" '
                       f'fill="{colours[variant]}"/>')
            text = f"{rps:,.0f}" + (f" ({r:.2f}×)" if r is not None and variant != "plain" else "")
            out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 4}" font-size="10">{text}</text>')
            y += bar
        y += gap
    out.append(f'<line x1="{label_w}" y1="{first_bar - 4}" x2="{label_w}" y2="{y}" stroke="#333"/>')
    out.append(f'<text x="{label_w}" y="{y + 18}" font-size="10" fill="#555">'
               f'in brackets: ratio to plain Envoy (median of the per-round ratios); '
               f'{machine_short()}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def machine_short():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} CPUs; proxy on 1 CPU, wrk + upstream on the other"


# -- main -----------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Many short rounds rather than a few long ones: the machine's speed drifts over seconds, and
    # a ratio taken within a round, runs a second apart, sees little of the drift.
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=1, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"among {','.join(VARIANTS)}")
    parser.add_argument("--retries", type=int, default=2,
                        help="runs again a run that other work on the machine competed with")
    parser.add_argument("--retry-budget", type=int, default=60,
                        help="seconds the whole bench may spend on such runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    parser.add_argument("--memory", default=",".join(MEMORY_CASES),
                        help="record sizes for the memory figures (1k, 64k)")
    parser.add_argument("--out", default=str(BENCH), help="where results.* are written")
    parser.add_argument("--render", action="store_true",
                        help="only write results.md, results.svg and the README block again "
                             "from results.json")
    parser.add_argument("--validate-only", action="store_true",
                        help="write and validate the Envoy configurations, then stop")
    args = parser.parse_args()
    if args.render:
        render(Path(args.out))
        return
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    args.memory = [m for m in args.memory.split(",") if m]
    for name in args.memory:
        if name not in MEMORY_CASES:
            parser.error(f"unknown record size {name}")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name}")
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name}")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (make bench installs wrk)")
    if any(v in REMOTE for v in args.variants) and not os.access(ETCD_BIN, os.X_OK):
        raise SystemExit(f"etcd not found at {ETCD_BIN} (make bench installs it)")
    for path in (ENVOY, FILTER_WASM, UNOBSERVED_WASM, EMPTY_WASM, PROBE_WASM):
        if not path.exists():
            raise SystemExit(f"missing {path.relative_to(ROOT) if ROOT in path.parents else path} "
                             f"(make bench builds it)")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: one for the proxy, one for wrk and the upstream")

    workdir = BENCH / ".work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.time()

    upstream = Envoy("upstream", workdir, upstream_config, LOAD_CPU)
    upstream.validate()
    for variant in args.variants:
        # etcd's port is picked when it starts; any port makes a valid configuration.
        Envoy(variant, workdir,
              lambda port, admin, v=variant: proxy_config(v, port, admin, upstream.port,
                                                          etcd_port=2379),
              PROXY_CPU).validate()
    print(f"configurations valid ({workdir.relative_to(ROOT)})")
    if args.validate_only:
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    etcd = PinnedEtcd(workdir / "etcd") if any(v in REMOTE for v in args.variants) else None
    relay = Relay(workdir) if any(v in FAR for v in args.variants) else None
    try:
        upstream.start().wait_ready()
        if etcd:
            etcd.start()
        if relay:
            relay.start(etcd.client_port)
        plan = sum(len(g) for g in plan_runs(args))
        print(f"{args.rounds} rounds x {plan} runs x {args.seconds} s "
              f"(proxy on CPU {PROXY_CPU}; wrk and upstream on CPU {LOAD_CPU})", flush=True)
        runs = rounds(workdir, upstream, etcd, relay, args)
        mem, storage = [], []
        if not args.no_memory:
            print("memory per record:", flush=True)
            cases = [MEMORY_CASES[size] for size in args.memory]
            mem = memory(workdir, upstream, cases)
            for m in mem:
                alloc = m["allocated_per_record"]
                print(f"  {m['label']}: {m['rss_per_record']:,.0f} B RSS, "
                      + ("" if alloc is None else f"{alloc:,.0f} B allocated ")
                      + f"per record ({m['stored']} stored)", flush=True)
            if etcd:
                storage = etcd_storage(workdir, upstream, etcd, cases)
                for e in storage:
                    print(f"  etcd, {e['label']}: {e['bytes_per_record']:,.0f} B per record",
                          flush=True)
    finally:
        stop_all()
        if relay:
            relay.stop()
        if etcd:
            etcd.remove_data()
    write_results(Path(args.out), runs, mem, storage, args, time.time() - started, machine())


def write_results(out, runs, mem, storage, args, elapsed, machine_text):
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    # The measurements first: whatever fails in rendering them, `--render` can redo from them.
    (out / "results.json").write_text(json.dumps({
        "machine": machine_text,
        "elapsed_s": None if elapsed is None else round(elapsed),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "render")},
        "runs": [{"variant": v, "scenario": s, "rounds": f} for (v, s), f in runs.items()],
        "memory": mem,
        "etcd_storage": storage,
    }, indent=1) + "\n")
    text = report(summary, mem, storage, args, elapsed, machine_text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.svg").write_text(svg_chart(summary, args))
    update_readme(out / "README.md", summary, mem, args)
    print()
    print(text)


def render(out):
    """Writes results.md, results.svg and the README block again from results.json."""
    saved = json.loads((out / "results.json").read_text())
    args = argparse.Namespace(**saved["args"])
    runs = {(r["variant"], r["scenario"]): r["rounds"] for r in saved["runs"]}
    write_results(out, runs, saved["memory"], saved.get("etcd_storage", []), args,
                  saved.get("elapsed_s"), saved["machine"])


if __name__ == "__main__":
    main()
