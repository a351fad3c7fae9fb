"""The load and what it measures: requests, wrk's scripts and runs, the measured runs in their
rounds, and their medians."""

import http.client
import json
import resource
import statistics
import subprocess
import time

from support.etcd import Etcd
from configs import (AUTHORIZATION, baseline_scenario, ETCD_STORE, FAR, FILTERS, MATRIX, path_of,
                     proxy_config, REMOTE, SCENARIO_CONNECTIONS, SCENARIOS)
from host import CLK_TCK, LOAD_CPU, PROXY_CPU
from processes import Envoy


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
