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
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from support.etcd import ETCD_BIN  # noqa: E402
from configs import (DEFAULT_VARIANTS, FAR, proxy_config, REMOTE, SCENARIOS, upstream_config, VARIANTS)  # noqa: E402
from host import (BENCH, CONNECTIONS, EMPTY_WASM, ENVOY, FILTER_WASM, LOAD_CPU, PROBE_WASM, PROXY_CPU, ROOT,
                  UNOBSERVED_WASM)  # noqa: E402
from load import plan_runs, rounds, summarise  # noqa: E402
from memory import etcd_storage, memory, MEMORY_CASES  # noqa: E402
from processes import Envoy, PinnedEtcd, Relay, stop_all  # noqa: E402
from report import machine, report, svg_chart, update_readme  # noqa: E402


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
