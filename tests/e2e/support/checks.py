"""What the tests check: originals, verbatim replays, problem answers, and counters.

    assert_original(resp, status=201)       an answer from the upstream, not a replay
    assert_replay_of(replay, original)      the same answer byte for byte, marked replayed
    assert_problem(resp, status, code)      an RFC 9457 problem document with this code
    assert_retry_after(resp) -> seconds     a Retry-After of whole seconds
    wait_for(predicate, timeout)            poll until true (counters move after the answer)
    stat_deltas / assert_stat_deltas        how counters moved since a snapshot
"""

import re
import time

from support.client import Response
from support.processes import ROOT

# Headers a replay may legitimately not repeat byte for byte: set per hop or per answer by Envoy.
NOT_REPLAYED = {"date", "x-envoy-upstream-service-time", "idempotent-replayed",
                "connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


def comparable_headers(resp):
    out = {}
    for name, value in resp.headers:
        if name not in NOT_REPLAYED:
            out.setdefault(name, []).append(value)
    return out


def assert_original(resp, status=201):
    """An answer that came from an upstream execution, not a replay."""
    assert isinstance(resp, Response), f"{resp!r}"
    assert resp.status == status, f"{resp!r}"
    assert resp.header("idempotent-replayed") is None, f"{resp!r}"
    assert resp.header("x-upstream-execution") is not None, f"{resp!r}"


def assert_replay_of(replay, original):
    """The stored response verbatim: status, headers (Set-Cookie included), body byte for byte,
    plus idempotent-replayed: true."""
    assert isinstance(replay, Response), f"{replay!r}"
    assert replay.status == original.status, f"{replay!r}"
    assert replay.header_all("idempotent-replayed") == ["true"], f"{replay!r}"
    assert replay.body == original.body, f"replayed body differs: {len(replay.body)} vs {len(original.body)} bytes"
    assert comparable_headers(replay) == comparable_headers(original), f"{replay!r} vs {original!r}"


def assert_problem(resp, status, code):
    """An RFC 9457 problem answer with the contract's code; returns the document."""
    assert isinstance(resp, Response), f"{resp!r}"
    assert resp.status == status, f"{resp!r}"
    content_type = (resp.header("content-type") or "").split(";")[0].strip()
    assert content_type == "application/problem+json", f"{resp!r}"
    doc = resp.json()
    assert doc["code"] == code, f"{doc!r}"
    assert doc["status"] == status, f"{doc!r}"
    assert isinstance(doc.get("detail"), str) and doc["detail"], f"{doc!r}"
    assert "title" in doc and "type" in doc, f"{doc!r}"
    assert resp.header("idempotent-replayed") is None, f"{resp!r}"
    assert resp.header("x-upstream-execution") is None, f"{resp!r}"
    return doc


def assert_retry_after(resp):
    value = resp.header("retry-after")
    assert value is not None and value.isdigit(), f"Retry-After must be delay-seconds, got {value!r}: {resp}"
    return int(value)


def wait_for(predicate, timeout=3.0):
    """Poll until predicate() is true (stats move after the answer is on the wire)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def stat_deltas(envoy, before, names):
    after = envoy.stats()
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


def assert_stat_deltas(envoy, before, expected, timeout=3.0):
    """Each named stat moved by exactly the given amount since ``before`` (a dict of stats)."""
    wait_for(lambda: stat_deltas(envoy, before, expected) == expected, timeout)
    moved = stat_deltas(envoy, before, expected)
    assert moved == expected, f"counters moved by {moved}, expected {expected}"


def filter_metrics(kind=None):
    """{name: kind} of the metrics src/core/metrics.rs defines (idempotency.<name>), kind being
    counter, gauge or histogram; only those of ``kind`` if given."""
    source = (ROOT / "src" / "core" / "metrics.rs").read_text()
    metrics = {name: kind.lower() for kind, name in
               re.findall(r'(Counter|Gauge|Histogram)::\w+ => "(idempotency\.[a-z_]+)"', source)}
    assert len(metrics) >= 30, metrics
    return {name: k for name, k in sorted(metrics.items()) if kind in (None, k)}


def exported_series():
    """Every series name Envoy's /stats/prometheus gives the filter's metrics: a histogram's as
    its _bucket, _sum and _count."""
    series = set()
    for name, kind in filter_metrics().items():
        name = name.replace(".", "_")
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        series.update(name + suffix for suffix in suffixes)
    return series
