"""What runs: the variants, the scenarios and the matrix of both, and the Envoy configurations
of each variant."""

import json
import random

from support.etcd import shipped_etcd_cluster
from host import EMPTY_WASM, FILTER_WASM, FLOOR_PROBE, PROBE_WASM, UNOBSERVED_WASM

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
# The variants that call etcd, and those of them that reach it through the relay.
REMOTE = ("etcd", "etcd-floor", "etcd-far", "etcd-floor-far")
FAR = ("etcd-far", "etcd-floor-far")
# Each way, through the relay.
FAR_DELAY_MS = 1

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
