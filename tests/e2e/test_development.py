"""docs/development.md: the test harness itself, checked through a plain Envoy (router only, no filter): if these fail,
the filter tests cannot be trusted."""

import http.client
import json
import urllib.request

import pytest

from support.client import burst, request
from support.envoy import Envoy
from support.upstream import binary_body


@pytest.fixture(scope="module")
def plain_envoy(run_dir, upstream):
    envoy = Envoy(run_dir, upstream_port=upstream.port, route_timeout="2s", wasm_path=None).start()
    yield envoy
    envoy.stop()


def test_upstream_counts_each_execution_by_method_path_and_key(plain_envoy, upstream, key):
    for _ in range(2):
        resp = plain_envoy.request("POST", "/h/count?x=1", {"idempotency-key": key}, b"abc")
        assert resp.status == 200 and resp.body == b"abc"
    plain_envoy.request("PATCH", "/h/count", {"idempotency-key": key}, b"abc")
    assert upstream.count(method="POST", path="/h/count", key=key) == 2
    assert upstream.count(method="PATCH", path="/h/count", key=key) == 1
    assert upstream.count(key=key) == 3
    seqs = [e.seq for e in upstream.executions(key=key)]
    assert len(set(seqs)) == 3 and upstream.executions(key=key)[0].query == "x=1"


def test_upstream_control_endpoints_answer_on_its_own_port_and_are_not_counted(upstream, key):
    request(upstream.port, "POST", "/h/control", {"idempotency-key": key}, b"x")
    before = upstream.total
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream.port}/__upstream/executions?key={key}") as r:
        data = json.loads(r.read())
    assert data["count"] == 1 and data["executions"][0]["path"] == "/h/control"
    assert request(upstream.port, "GET", "/__upstream/ping").body == b"pong"
    assert upstream.total == before


def test_upstream_behaviour_headers_status_cookie_and_binary_body(plain_envoy, upstream, key):
    resp = plain_envoy.request("POST", "/h/behave", [
        ("idempotency-key", key), ("x-test-status", "422"), ("x-test-body-bytes", "200000"),
        ("x-test-set-cookie", "a=1; Path=/"), ("x-test-set-cookie", "b=2; HttpOnly"),
    ], b"ignored")
    assert resp.status == 422
    assert resp.body == binary_body(200000) and len(resp.body) == 200000
    assert resp.header_all("set-cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert resp.header("x-upstream-execution") == str(upstream.executions(key=key)[0].seq)


def test_upstream_delay_and_concurrent_burst(plain_envoy, upstream, key):
    results = burst(10, lambda i: plain_envoy.request("POST", "/h/burst", {"idempotency-key": key,
                                                                          "x-test-delay-ms": "300"}, b"b"))
    assert all(r.status == 200 for r in results), results
    assert upstream.count(key=key) == 10


def test_upstream_reset_before_headers_gives_envoy_503(plain_envoy, upstream, key):
    resp = plain_envoy.request("POST", "/h/reset", {"idempotency-key": key, "x-test-reset": "before-headers"}, b"r")
    assert resp.status == 503 and b"reset" in resp.body.lower()
    assert upstream.count(key=key) == 1


def test_upstream_reset_after_headers_truncates_the_response(plain_envoy, upstream, key):
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        plain_envoy.request("POST", "/h/reset2", {"idempotency-key": key, "x-test-reset": "after-headers",
                                                  "x-test-body-bytes": "1000"}, b"r")
    assert upstream.count(key=key) == 1


def test_route_timeout_gives_envoy_504(plain_envoy, upstream, key):
    resp = plain_envoy.request("POST", "/h/slow", {"idempotency-key": key, "x-test-delay-ms": "2500"}, b"s")
    assert resp.status == 504
    assert upstream.count(key=key) == 1


def test_stats_are_parsed_into_integers(plain_envoy):
    stats = plain_envoy.stats()
    assert stats["http.ingress.downstream_rq_total"] >= 1
    assert plain_envoy.counter("no.such.stat") == 0


def test_upstream_down_gives_envoy_503_and_upstream_can_start_later(run_dir, upstream_factory, key):
    probe = upstream_factory()
    port = probe.port
    probe.stop()
    envoy = Envoy(run_dir, upstream_port=port, wasm_path=None, expect_upstream=False).start()
    try:
        resp = envoy.request("POST", "/h/down", {"idempotency-key": key}, b"d")
        assert resp.status == 503
        late = upstream_factory(port)
        resp = envoy.request("POST", "/h/down", {"idempotency-key": key}, b"d")
        assert resp.status == 200 and late.count(key=key) == 1
    finally:
        envoy.stop()
