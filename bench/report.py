"""The report: results.md's tables and targets, the README block and the chart."""

import json
import os
import platform
import statistics
import subprocess

from configs import (ETCD_STORE, FAR, FAR_DELAY_MS, FILTER_CONFIG, FILTERS, MATRIX, REMOTE, SCENARIOS, SMALL_BODY,
                     VARIANTS)
from host import ENVOY, LOAD_CPU, PROXY_CPU
from load import figure_for, NOISY

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
