"""Shared helpers for the contract tests: requests shaped like the seed document's, and
assertions for originals, verbatim replays and problem answers."""

import json
import threading
import time
import uuid

from harness import Response

ORG_A = "Bearer ic_live_org_a"
ORG_B = "Bearer ic_live_org_b"
CUSTOMER = json.dumps({"externalId": "crm-7741", "fullName": "Jane Doe", "email": "jane@example.com"}).encode()

# Headers a replay may legitimately not repeat byte for byte: set per hop or per answer by Envoy.
NOT_REPLAYED = {"date", "x-envoy-upstream-service-time", "idempotent-replayed",
                "connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


def call(envoy, key, body=CUSTOMER, path="/v1/customers", method="POST", auth=ORG_A, headers=(),
         key_header="idempotency-key", http2=False):
    """A covered request as the seed document shows it; the upstream answers 201 unless
    headers say otherwise. key=None sends no Idempotency-Key, auth=None no Authorization;
    http2=True sends it over HTTP/2."""
    hdrs = [("content-type", "application/json"), ("x-test-status", "201")]
    if auth is not None:
        hdrs.append(("authorization", auth))
    if key is not None:
        hdrs.append((key_header, key))
    names = {name for name, _ in headers}
    hdrs = [(n, v) for n, v in hdrs if n not in names] + list(headers)
    return envoy.request(method, path, hdrs, body, http2=http2)


def comparable_headers(resp):
    out = {}
    for name, value in resp.headers:
        if name not in NOT_REPLAYED:
            out.setdefault(name, []).append(value)
    return out


def timed(fn):
    """(fn(), seconds it took)."""
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


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
    assert stat_deltas(envoy, before, expected) == expected


def unique_path(prefix="/v1/probe"):
    return f"{prefix}/{uuid.uuid4().hex}"


def in_background(fn):
    """Run fn() in a thread; join() the thread, then read box["result"] (or box["error"])."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box
