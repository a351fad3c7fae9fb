"""Soak: a mixed workload against Envoy (2 workers) with the filter's default configuration, for a
long time, and what held.

    python tests/soak/run.py --duration 30m --out .run/soak

Sessions (32 by default) each loop over a weighted mix: a first POST, a replay, a conflict, two
duplicates at once (`waited` waits for `waited_for`, whose work takes 200 ms), an upstream 5xx and
its retry, a client that leaves before its answer, and a GET. Eight organisations share the store, which fills within a few
minutes and then evicts. The upstream (its own process) counts every execution per key against
what the client said it expects: a key executed more often is a duplicate execution.

An organisation at its share whose records are all younger than the grace is refused `429`
(`refused_at_share`): the contract's answer, counted, not a failure.

Writes ``results.md``, ``results.json`` and ``results.svg`` (Envoy's RSS and the requests/s over
time) to ``--out``, and exits 1 if a duplicate execution, a 5xx made by the filter or any other
unexpected answer was seen.
"""

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from support.envoy import Envoy  # noqa: E402
from support.load import FastUpstream, _read_message, rss_kib, serve  # noqa: E402

ORGS = [f"Bearer org_soak_{n}" for n in range(8)]
# Scenario: weight in the mix.
MIX = {"first": 30, "replay": 25, "conflict": 10, "waiting": 10, "upstream_5xx": 8,
       "aborted": 5, "get": 12}
SAMPLE_SECONDS = 5
REQUEST_TIMEOUT_S = 30


# -- the upstream: counts executions per key against what the client expects -------------------

async def _serve_upstream(port_out):
    executions = Counter()
    state = {"total": 0, "duplicates": 0, "over": []}

    async def answer(target, headers, body):
        if target.startswith("/__upstream/"):
            return "200 OK", json.dumps(state).encode() if target == "/__upstream/report" else b"pong", ""
        state["total"] += 1
        status = 200
        key = headers.get("idempotency-key")
        if key:
            scoped = (headers.get("authorization", ""), key)
            executions[scoped] += 1
            n = executions[scoped]
            if n > int(headers.get("x-soak-expect", "1")):
                state["duplicates"] += 1
                state["over"] = (state["over"] + [key])[-10:]
            statuses = headers.get("x-soak-statuses", "201").split(",")
            status = int(statuses[min(n, len(statuses)) - 1])
        delay = int(headers.get("x-soak-delay-ms", "0"))
        if delay:
            await asyncio.sleep(delay / 1000)
        return f"{status} X", body, ""

    await serve(answer, port_out)


def report_of(upstream):
    """What the upstream counted: executions, duplicate executions and the last keys run twice."""
    url = f"http://127.0.0.1:{upstream.port}/__upstream/report"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


# -- the clients ---------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.outcomes = Counter()
        self.latencies = defaultdict(list)
        self.unexpected = Counter()
        self.examples = []
        self.filter_5xx = 0
        self.requests = 0

    def saw(self, outcome, seconds):
        self.outcomes[outcome] += 1
        self.latencies[outcome].append(seconds)

    def wrong(self, scenario, what):
        self.unexpected[scenario] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{scenario}: {what}")


class Connection:
    """One keep-alive HTTP/1.1 connection to Envoy."""

    def __init__(self, port, tally):
        self.port, self.tally = port, tally
        self.reader = self.writer = None

    async def send(self, method, path, headers=(), body=b""):
        """(status, {header: value}, body, seconds)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        started = time.monotonic()
        self.writer.write((f"{method} {path} HTTP/1.1\r\nhost: soak\r\n{head}"
                           f"content-length: {len(body)}\r\n\r\n").encode() + body)
        try:
            start, answer, payload = await asyncio.wait_for(_read_message(self.reader),
                                                            REQUEST_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        seconds = time.monotonic() - started
        self.tally.requests += 1
        status = int(start.split(" ")[1])
        if status >= 500 and answer.get("content-type", "").startswith("application/problem+json"):
            self.tally.filter_5xx += 1
        if answer.get("connection", "").lower() == "close":
            self.close()
        return status, answer, payload, seconds

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def refused_at_share(status, payload):
    """The organisation holds its whole share of the store and none of its records is old enough
    to make way: its new key is refused, as the contract says."""
    return status == 429 and b"idempotency_quota_exceeded" in payload


def covered(org, key, *extra):
    return [("authorization", org), ("idempotency-key", key),
            ("content-type", "application/json"), *extra]


async def scenario(name, conns, key, org, tally):
    """Runs one scenario; records its outcomes, or what was wrong."""
    body = json.dumps({"key": key, "pad": "x" * random.randrange(16, 512)}).encode()
    a, b = conns
    path = "/v1/orders"

    async def first(*extra, conn=a, expect_replay=False):
        status, headers, payload, seconds = await conn.send("POST", path, covered(org, key, *extra), body)
        replayed = headers.get("idempotent-replayed") == "true"
        if refused_at_share(status, payload):
            tally.saw("refused_at_share", seconds)
            return None
        if status != 201 or payload != body or replayed != expect_replay:
            tally.wrong(name, f"{status} replayed={replayed} {payload[:120]!r}")
            return None
        return seconds

    if name == "get":
        status, _, _, seconds = await a.send("GET", f"/v1/orders/{key}", [("authorization", org)])
        if status == 200:
            tally.saw("get", seconds)
        else:
            tally.wrong(name, f"{status}")
    elif name in ("first", "replay", "conflict"):
        seconds = await first()
        if seconds is None:
            return
        tally.saw("first", seconds)
        if name == "replay":
            seconds = await first(expect_replay=True)
            if seconds is not None:
                tally.saw("replay", seconds)
        elif name == "conflict":
            status, headers, payload, seconds = await a.send(
                "POST", path, covered(org, key), body + b" ")
            if status == 409 and b"idempotency_conflict" in payload:
                tally.saw("conflict", seconds)
            else:
                tally.wrong(name, f"{status} {payload[:120]!r}")
    elif name == "waiting":
        slow = ("x-soak-delay-ms", "200")
        answers = await asyncio.gather(a.send("POST", path, covered(org, key, slow), body),
                                       b.send("POST", path, covered(org, key, slow), body))
        # One may be refused at its share and the other, a moment later, find room and run.
        served = [(h, sec) for st, h, p, sec in answers if not refused_at_share(st, p)]
        replayed = sorted(h.get("idempotent-replayed") == "true" for h, _ in served)
        fine = all(refused_at_share(st, p) or (st == 201 and p == body) for st, _, p, _ in answers)
        if fine and replayed in ([], [False], [False, True]):
            for _ in range(len(answers) - len(served)):
                tally.saw("refused_at_share", max(sec for *_, sec in answers))
            for headers, seconds in served:
                waited = headers.get("idempotent-replayed") == "true"
                tally.saw("waited" if waited else "waited_for", seconds)
        else:
            tally.wrong(name, f"{[(s, h.get('idempotent-replayed'), p[:60]) for s, h, p, _ in answers]}")
    elif name == "upstream_5xx":
        extra = [("x-soak-statuses", "503,201"), ("x-soak-expect", "2")]
        status, headers, payload, seconds = await a.send("POST", path, covered(org, key, *extra), body)
        if refused_at_share(status, payload):
            tally.saw("refused_at_share", seconds)
            return
        if status != 503 or headers.get("content-type", "").startswith("application/problem+json"):
            tally.wrong(name, f"{status} {payload[:120]!r}")
            return
        tally.saw("upstream_5xx", seconds)
        seconds = await first(*extra)
        if seconds is not None:
            tally.saw("retry_after_5xx", seconds)
    elif name == "aborted":
        # Leaves while its work runs: the claim is held until its lease ends, and nothing
        # retries it here.
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in covered(org, key, ("x-soak-delay-ms", "300")))
        writer.write((f"POST {path} HTTP/1.1\r\nhost: soak\r\n{head}"
                      f"content-length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        tally.saw("aborted", 0.05)


async def session(port, run, number, deadline, tally, rng):
    conns = (Connection(port, tally), Connection(port, tally))
    names, weights = list(MIX), list(MIX.values())
    n = 0
    try:
        while time.monotonic() < deadline:
            n += 1
            name = rng.choices(names, weights)[0]
            try:
                await scenario(name, conns, f"soak-{run}-{number}-{n}", rng.choice(ORGS), tally)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
                tally.wrong(name, f"{type(error).__name__}: {error}")
                for conn in conns:
                    conn.close()
    finally:
        for conn in conns:
            conn.close()


# -- the run -------------------------------------------------------------------------------------

def filter_stats(envoy):
    stats = envoy.stats()
    return {k[len("idempotency."):]: v for k, v in stats.items() if k.startswith("idempotency.")}


async def sample(envoy, deadline, tally, samples, started):
    loop = asyncio.get_running_loop()
    while True:
        stats = await loop.run_in_executor(None, filter_stats, envoy)
        samples.append({"t": round(time.monotonic() - started, 1), "rss_kib": rss_kib(envoy.proc.pid),
                        "requests": tally.requests, "evicted": stats.get("evicted", 0)})
        if time.monotonic() >= deadline:
            return stats
        await asyncio.sleep(min(SAMPLE_SECONDS, max(0.0, deadline - time.monotonic())))


async def drive(envoy, seconds, sessions, seed):
    tally, samples = Tally(), []
    started = time.monotonic()
    deadline = started + seconds
    rngs = [random.Random(f"{seed}:{n}") for n in range(sessions)]
    run = f"{seed}-{int(time.time())}"
    sampler = asyncio.ensure_future(sample(envoy, deadline, tally, samples, started))
    await asyncio.gather(*(session(envoy.port, run, n, deadline, tally, rngs[n])
                           for n in range(sessions)))
    stats = await sampler
    return tally, samples, stats, time.monotonic() - started


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def duration(text):
    m = re.fullmatch(r"(\d+)(s|m|h)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90s, 30m or 1h)")
    return int(m.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def main(argv):
    if argv[:1] == ["upstream"]:
        asyncio.run(_serve_upstream(lambda port: print(f"port {port}", flush=True)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=duration, default=duration("30m"))
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(".run/soak"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    upstream = FastUpstream([sys.executable, __file__, "upstream"]).start()
    envoy = Envoy(tempfile.mkdtemp(prefix="soak-"), {}, upstream.port)
    try:
        envoy.start()
        print(f"soak: {args.duration} s, {args.sessions} sessions, Envoy pid {envoy.proc.pid}",
              flush=True)
        tally, samples, stats, elapsed = asyncio.run(
            drive(envoy, args.duration, args.sessions, args.seed))
        executed = report_of(upstream)
    finally:
        envoy.stop()
        upstream.stop()

    result = summarise(args, tally, samples, stats, executed, elapsed)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(report(result))
    (args.out / "results.svg").write_text(chart(samples, result))
    print(report(result))
    failed = result["duplicate_executions"] or result["filter_5xx"] or result["unexpected"]
    return 1 if failed else 0


def summarise(args, tally, samples, stats, executed, elapsed):
    full_at = next((s for s in samples if s["evicted"] > 0), None)
    after_full = [s["rss_kib"] for s in samples if full_at and s["t"] >= full_at["t"]]
    return {
        "duration_s": round(elapsed),
        "sessions": args.sessions,
        "seed": args.seed,
        "requests": tally.requests,
        "requests_per_s": round(tally.requests / elapsed),
        "outcomes": dict(tally.outcomes),
        "p99_ms": {k: round(percentile(v, 0.99) * 1000, 1) for k, v in sorted(tally.latencies.items())},
        "p50_ms": {k: round(percentile(v, 0.5) * 1000, 1) for k, v in sorted(tally.latencies.items())},
        "executions": executed["total"],
        "duplicate_executions": executed["duplicates"],
        "duplicate_keys": executed["over"],
        "filter_5xx": tally.filter_5xx,
        "unexpected": sum(tally.unexpected.values()),
        "unexpected_by_scenario": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "store_full_at_s": full_at and full_at["t"],
        "rss_mib": {"start": mib(samples[0]["rss_kib"]), "end": mib(samples[-1]["rss_kib"]),
                    "peak": mib(max(s["rss_kib"] for s in samples)),
                    "when_full": mib(after_full[0]) if after_full else None,
                    "peak_after_full": mib(max(after_full)) if after_full else None},
        "filter_counters": stats,
        "samples": samples,
    }


def mib(kib):
    return round(kib / 1024, 1)


def report(r):
    lines = [f"# Soak: {r['duration_s']} s, {r['sessions']} sessions, seed {r['seed']}", "",
             f"- requests: {r['requests']:,} ({r['requests_per_s']:,}/s); upstream executions: "
             f"{r['executions']:,}",
             f"- duplicate executions: {r['duplicate_executions']}; 5xx made by the filter: "
             f"{r['filter_5xx']}; other unexpected answers: {r['unexpected']}"]
    rss = r["rss_mib"]
    full = (f"the store began evicting at {r['store_full_at_s']} s, at {rss['when_full']} MiB; "
            f"peak after that {rss['peak_after_full']} MiB" if r["store_full_at_s"] is not None
            else "the store never filled")
    lines.append(f"- Envoy RSS: {rss['start']} MiB at start, {rss['end']} MiB at the end; {full}")
    lines += ["", "| outcome | count | p50 ms | p99 ms |", "|---|---|---|---|"]
    for outcome, count in sorted(r["outcomes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {outcome} | {count:,} | {r['p50_ms'].get(outcome, 0)} | "
                     f"{r['p99_ms'].get(outcome, 0)} |")
    counters = ", ".join(f"{k} {v:,}" for k, v in sorted(r["filter_counters"].items()) if v)
    lines += ["", f"Filter counters and gauges at the end: {counters}.", ""]
    if r["unexpected_examples"]:
        lines += ["Unexpected answers (first ones):", ""]
        lines += [f"- {e}" for e in r["unexpected_examples"]] + [""]
    lines += ["![Envoy RSS and requests/s over the run](results.svg)", ""]
    return "\n".join(lines)


def chart(samples, r):
    """Two panels over time: Envoy's RSS (MiB) and requests/s."""
    width, height, pad = 720, 420, 50
    panel = (height - 3 * pad) / 2
    t_max = max(s["t"] for s in samples) or 1
    rates = [0.0] + [(b["requests"] - a["requests"]) / max(b["t"] - a["t"], 0.1)
                     for a, b in zip(samples, samples[1:])]
    series = [("Envoy RSS, MiB", [s["rss_kib"] / 1024 for s in samples], "#1f77b4"),
              ("requests/s", rates, "#2ca02c")]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, (title, values, colour) in enumerate(series):
        top = pad + i * (panel + pad)
        v_max = max(values) * 1.1 or 1
        points = " ".join(f"{pad + s['t'] / t_max * (width - 2 * pad):.1f},"
                          f"{top + panel - v / v_max * panel:.1f}" for s, v in zip(samples, values))
        out += [f'<text x="{pad}" y="{top - 8}">{title} (max {max(values):,.0f})</text>',
                f'<line x1="{pad}" y1="{top + panel}" x2="{width - pad}" y2="{top + panel}" stroke="#999"/>',
                f'<line x1="{pad}" y1="{top}" x2="{pad}" y2="{top + panel}" stroke="#999"/>',
                f'<text x="{pad - 4}" y="{top + 4}" text-anchor="end">{v_max:,.0f}</text>',
                f'<text x="{pad - 4}" y="{top + panel}" text-anchor="end">0</text>',
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>']
        if r["store_full_at_s"] is not None:
            x = pad + r["store_full_at_s"] / t_max * (width - 2 * pad)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + panel}" '
                       f'stroke="#d62728" stroke-dasharray="4 3"/>')
    out += [f'<text x="{width - pad}" y="{height - 12}" text-anchor="end">seconds (dashed: the '
            f'store begins evicting) — {t_max:.0f} s</text>', "</svg>", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
