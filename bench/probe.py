#!/usr/bin/env python3
"""Prices the host operations the Idempotency-Key filter is made of.

The probe filter (bench/probe-filter) repeats one operation N times per request in front of a
``direct_response``; the operation's cost is the growth in the proxy's CPU per request over
N, against the same probe doing nothing. Also checks whether a filter wrapped in the matcher of
envoy/envoy-matcher.yaml is entered at all for requests it skips.

    make wasm && python3 bench/probe.py [--rounds 3] [--seconds 2]

Builds the probe filter, prints a table (and writes it to bench/.work/probe.md). Then runs the
real filter's first POSTs at several capacities. Same machine set-up as bench/run.py: proxy
pinned to CPU 0, wrk and the upstream to CPU 1. About five minutes with three rounds.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from configs import (bootstrap, BUFFER, direct, FILTER_CONFIG, listener, path_of, proxy_config,
                     run_when_covered, SCENARIOS, skip_unless_covered, SMALL_BODY, upstream_config,
                     wasm_filter)  # noqa: E402
from host import BENCH, CONNECTIONS, FILTER_WASM, LOAD_CPU, PROBE_WASM, PROXY_CPU  # noqa: E402
from load import body_of, headers_for, NOISY, one_run, send, wait_for_quiet, wrk_script  # noqa: E402
from processes import Envoy, stop_all  # noqa: E402


# (label, probe configuration, repeat, scenario): cost per operation = (cpu(repeat) - cpu(0)) / repeat
PROBES = [
    ("read one request header (:method)", "op=header", 20, "get"),
    ("read all request headers (9 headers)", "op=headers", 10, "get"),
    ("get_current_time", "op=time", 20, "get"),
    ("increment_metric", "op=metric", 20, "get"),
    ("get_property request.path", "op=property", 20, "get"),
    ("get_shared_data, 1,364 B (a bucket)", "op=shared_get size=1364", 10, "get"),
    ("set_shared_data, 1,364 B (a bucket)", "op=shared_set size=1364", 10, "get"),
    ("get_shared_data, 125,004 B (a ledger shard at 250,000 records)",
     "op=shared_get size=125004", 2, "get"),
    ("set_shared_data, 125,004 B (a ledger shard at 250,000 records)",
     "op=shared_set size=125004", 2, "get"),
    ("SHA-256 in wasm, 1 KiB", "op=sha256 size=1024", 10, "get"),
    ("SHA-256 in wasm, 64 KiB", "op=sha256 size=65536", 1, "get"),
    ("XXH3-128 in wasm, 64 KiB", "op=xxh3 size=65536", 4, "get"),
    ("BLAKE3 in wasm (no SIMD), 64 KiB", "op=blake3 size=65536", 2, "get"),
    ("allocate and fill 64 KiB in wasm", "op=alloc size=65536", 4, "get"),
    ("read the request body, 1 KiB", "op=body phase=body", 10, "nokey-1k"),
    ("read the request body, 64 KiB", "op=body phase=body", 4, "nokey-64k"),
    ("answer with send_http_response instead of direct_response", "op=reply phase=body", 1,
     "nokey-1k"),
]

WRAPS = {"skip": "ExtensionWithMatcher + SkipFilter",
         "composite": "ExtensionWithMatcher + composite filter (envoy/envoy-matcher.yaml)",
         "routes": "a route twin turning the filter off (typed_per_filter_config)"}

# capacity_records for the first-POST runs of the real filter.
CAPACITIES = (32_768, 131_072, 524_288, 2_097_152)


def probe_config(port, admin_port, probe, wrap=None):
    wasm = wasm_filter("probe", PROBE_WASM, None)
    wasm["typed_config"]["config"]["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": probe}
    wrapped = {None: wasm, "skip": skip_unless_covered(wasm) if probe else None,
               "composite": run_when_covered(wasm) if probe else None,
               "routes": wasm}[wrap]
    filters = [] if probe is None else [wrapped]
    routes = [{"match": {"prefix": "/"}, "direct_response": direct(SMALL_BODY, 201)}]
    if wrap == "routes":
        # As bench/run.py's `routes` variant: the twin of the route turns the filter off.
        covered = {"match": {"prefix": "/", "headers": [
            {"name": ":method", "string_match": {"safe_regex": {"regex": "^(POST|PATCH)$"}}},
            {"name": "idempotency-key", "present_match": True}]},
            "direct_response": direct(SMALL_BODY, 201)}
        routes = [covered, dict(routes[0], typed_per_filter_config={wasm["name"]: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}})]
    return bootstrap(admin_port, [listener("proxy", port, routes, filters + [BUFFER])])


def cpu_per_request(envoy, upstream, scenario, workdir, seconds, tag):
    script = workdir / f"probe-{scenario}.lua"
    script.write_text(wrk_script(scenario, tag, None))
    best = None
    for attempt in range(3):
        if attempt:
            wait_for_quiet()
        figures = one_run(envoy, [upstream], script, seconds, CONNECTIONS,
                              path_of(None))
        if best is None or figures["other_load"] < best["other_load"]:
            best = figures
        if figures["other_load"] < NOISY:
            break
    return best["cpu_us_per_request"]


def operations(args, workdir, upstream):
    """The host operations' table, and whether each matcher keeps skipped requests out."""
    envoys = {}
    configs = {("none-headers", None): "op=none", ("none-body", None): "op=none phase=body",
               ("skip", "skip"): "op=none", ("composite", "composite"): "op=none",
               ("routes", "routes"): "op=none"}
    for label, config, repeat, scenario in PROBES:
        configs[(label, None)] = f"{config} repeat={repeat}"
    for n, ((label, wrap), config) in enumerate(configs.items()):
        envoys[(label, wrap)] = Envoy(
            f"probe{n}", workdir,
            lambda port, admin, c=config, w=wrap: probe_config(port, admin, c, w),
            PROXY_CPU)
    envoys[("no filter", None)] = Envoy(
        "probe-none", workdir, lambda port, admin: probe_config(port, admin, None), PROXY_CPU)
    for envoy in envoys.values():
        envoy.start()
    for envoy in envoys.values():
        envoy.wait_ready()

    # Does Envoy enter the VM for a request the matcher skips?
    entered = []
    for wrap in ("skip", "composite", "routes"):
        wrapped = envoys[(wrap, wrap)]
        for scenario in ("get", "nokey-1k"):
            for _ in range(100):
                method, size, _, _ = SCENARIOS[scenario]
                send(wrapped.port, method, "/v1/payments",
                         headers_for(scenario, None), body_of(size) if size else None)
        counts = wrapped.stats("probe.")
        entered.append(f"| {WRAPS[wrap]} | {counts.get('contexts', 0)} | "
                       f"{counts.get('logs', 0)} |")
        print(entered[-1], flush=True)

    samples = {}
    fixed = {"no filter": ["get", "nokey-1k", "nokey-64k"],
             "none-headers": ["get"], "none-body": ["nokey-1k", "nokey-64k"],
             "skip": ["get", "nokey-1k", "nokey-64k"],
             "composite": ["get", "nokey-1k", "nokey-64k"],
             "routes": ["get", "nokey-1k", "nokey-64k"]}
    for number in range(args.rounds):
        for key, envoy in envoys.items():
            scenarios = fixed.get(key[0]) or [p[3] for p in PROBES if p[0] == key[0]]
            for scenario in scenarios:
                cpu = cpu_per_request(envoy, upstream, scenario, workdir, args.seconds,
                                      f"p{number}-{time.time_ns()}")
                samples.setdefault((key[0], scenario), []).append(cpu)
                print(f"  round {number + 1} {key[0][:48]:48} {scenario:10} {cpu:7.1f} us/req",
                      flush=True)
    for envoy in envoys.values():
        envoy.stop()
    med = {k: statistics.median(v) for k, v in samples.items()}
    lines = ["| a wasm filter that does nothing, wrapped in | HTTP contexts created for 200 "
             "skipped requests | on_log calls |", "|---|---:|---:|"] + entered
    lines += ["", "| skipped request (GET, key-less POST 1 KiB, 64 KiB) | extra µs per request |",
              "|---|---:|"]
    for wrap in ("skip", "composite", "routes"):
        extra = [med[(wrap, s)] - med[("no filter", s)] for s in ("get", "nokey-1k", "nokey-64k")]
        lines.append(f"| {WRAPS[wrap]} | " + " / ".join(f"{x:.1f}" for x in extra) + " |")
    lines += ["", "| operation | µs per operation |", "|---|---:|"]
    lines.append(f"| a wasm filter that does nothing (GET) | "
                 f"{med[('none-headers', 'get')] - med[('no filter', 'get')]:.1f} |")
    for size in ("1k", "64k"):
        lines.append(f"| pausing the request until its body is complete, {size} | "
                     f"{med[('none-body', 'nokey-' + size)] - med[('no filter', 'nokey-' + size)]:.1f} |")
    for label, config, repeat, scenario in PROBES:
        base = med[("none-body" if "phase=body" in config else "none-headers", scenario)]
        lines.append(f"| {label} | {(med[(label, scenario)] - base) / repeat:.1f} |")
    return lines


def capacities(args, workdir, upstream):
    """The real filter's first POSTs against `capacity_records`: what a store costs as the
    table grows."""
    lines = ["| capacity_records | first POST, 1 KiB: CPU µs/request |", "|---:|---:|"]
    for capacity in CAPACITIES:
        cpus = []
        for number in range(args.rounds):
            plugin = dict(FILTER_CONFIG, capacity_records=capacity)
            envoy = Envoy(f"capacity-{capacity}", workdir,
                              lambda port, admin: proxy_config(
                                  "filter", port, admin, upstream.port, plugin),
                              PROXY_CPU).start().wait_ready()
            try:
                cpu_per_request(envoy, upstream, "first-1k", workdir, 1, f"w{time.time_ns()}")
                cpus.append(cpu_per_request(envoy, upstream, "first-1k", workdir, 1,
                                            f"c{time.time_ns()}"))
            finally:
                envoy.stop()
        print(f"  capacity {capacity:>9,}: first POST {statistics.median(cpus):6.1f} us/req",
              flush=True)
        lines.append(f"| {capacity:,} | {statistics.median(cpus):.0f} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--part", choices=("all", "ops", "capacity"), default="all",
                        help="host operations, first POSTs against capacity, or both")
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--target", "wasm32-wasip1",
                    "--manifest-path", str(BENCH / "probe-filter" / "Cargo.toml"),
                    "--target-dir", str(BENCH / ".target")], check=True)
    if not FILTER_WASM.exists():
        raise SystemExit("build the filter first: make wasm")
    workdir = BENCH / ".work"
    workdir.mkdir(parents=True, exist_ok=True)
    upstream = Envoy("upstream", workdir, upstream_config, LOAD_CPU)
    lines = []
    try:
        upstream.start().wait_ready()
        if args.part in ("all", "ops"):
            lines += operations(args, workdir, upstream) + [""]
        if args.part in ("all", "capacity"):
            lines += capacities(args, workdir, upstream)
    finally:
        stop_all()
    text = "\n".join(lines)
    print(text)
    (workdir / "probe.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
