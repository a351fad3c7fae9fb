"""docs/etcd.md's failure modes and shares, in real Envoys: etcd stopped, frozen or out of space,
a waiting duplicate riding out a failed read, responses etcd cannot keep, and one organisation
flooding it. Two Envoy processes (two workers each) share one etcd, as in test_fleet.py, whose
fixtures these tests share (support/fleet.py).
"""

import base64
import threading
import time
import uuid

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_retry_after,
                            assert_stat_deltas, stat_deltas, wait_for)
from support.client import call, in_background, timed
from support.etcd import EtcdError, fleet_config, settled_etcd_requests, settled_stats
from support.fleet import (etcd, keep_logs_of_failures, module_started, pair, pass_pair, run_dir,  # noqa: F401
                           sources, started)
from support.load import run_load
from support.upstream import binary_body

ETCD_TIMEOUT_S = 0.5  # fleet_config's etcd.timeout


@pytest.fixture
def key():
    return f"fleet-{uuid.uuid4()}"


# -- etcd down ---------------------------------------------------------------------------------

def test_etcd_down_applies_the_policy_and_service_recovers_after_a_restart(pair, pass_pair, upstream, etcd, key):
    a, b = pair
    c, d = pass_pair
    cached, uncached = key + "-cached", key + "-uncached"
    start = settled_stats(a)
    cached_original = call(a, cached)
    assert_original(cached_original)
    assert_replay_of(call(b, cached), cached_original)  # B keeps a copy
    uncached_original = call(a, uncached)  # B never saw this one
    assert_original(uncached_original)
    # Both records are stored (finishes land on later ticks) before etcd goes away.
    assert_stat_deltas(a, start, {"idempotency.stored": 2})
    # A request whose upstream is still working when etcd goes away: its client gets the answer,
    # and the record that could not be written is counted (once: A keeps sending it).
    midflight = key + "-midflight"
    before = at_midflight = a.stats()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("resp", call(a, midflight, headers=[
        ("x-test-delay-ms", "400")])))
    thread.start()
    assert wait_for(lambda: upstream.count(key=midflight) == 1), "the original never reached the upstream"

    etcd.stop()
    try:
        thread.join()
        assert_original(box["resp"])
        assert_stat_deltas(a, before, {"idempotency.store_error": 1, "idempotency.stored": 0})
        executed = upstream.total

        # reject: 503 idempotency_store_unavailable with Retry-After, at once, nothing upstream.
        for envoy, name in ((a, "A"), (b, "B")):
            before = settled_stats(envoy)
            down = f"{key}-down-{name}"
            resp, took = timed(lambda: call(envoy, down))
            assert_problem(resp, 503, "idempotency_store_unavailable")
            assert assert_retry_after(resp) >= 1, resp
            print(f"etcd down, when_full reject, Envoy {name}: 503 in {took * 1000:.1f} ms")
            assert took < ETCD_TIMEOUT_S, f"{name} took {took:.3f}s to answer with etcd down"
            assert upstream.count(key=down) == 0
            assert_stat_deltas(envoy, before, {"idempotency.store_error": 1, "idempotency.rejected": 1,
                                          "idempotency.claimed": 0})
        # A record B already copied still replays from that copy.
        assert_replay_of(call(b, cached), cached_original)

        # pass: the request goes to the upstream without idempotency (a retry runs again).
        passed = f"{key}-passed"
        for envoy, runs in ((c, 1), (d, 2)):
            before = settled_stats(envoy)
            resp, took = timed(lambda: call(envoy, passed))
            assert_original(resp)
            print(f"etcd down, when_full pass: passed in {took * 1000:.1f} ms")
            assert took < ETCD_TIMEOUT_S + 0.25, f"passing took {took:.3f}s with etcd down"
            assert upstream.count(key=passed) == runs
            assert_stat_deltas(envoy, before, {"idempotency.store_error": 1, "idempotency.bypassed": 1,
                                          "idempotency.claimed": 0})
        assert upstream.total == executed + 2
    finally:
        etcd.start()  # same ports, same data directory

    # A sends the record again once etcd is back: a retry on B replays it instead of running
    # the work a second time.
    assert_replay_of(call(b, midflight), box["resp"])
    assert upstream.count(key=midflight) == 1
    assert_stat_deltas(a, at_midflight, {"idempotency.stored": 1})

    # The requests refused while etcd was down left no claim behind: they run now.
    for envoy, name in ((a, "A"), (b, "B")):
        before = envoy.stats()
        assert_original(call(envoy, f"{key}-down-{name}"))
        assert upstream.count(key=f"{key}-down-{name}") == 1
        assert_stat_deltas(envoy, before, {"idempotency.stored": 1})
    # The records written before the outage are still there.
    assert_replay_of(call(b, uncached), uncached_original)
    assert upstream.count(key=uncached) == 1
    # New keys claim and replay across Envoys again, under both policies.
    for first, second in ((a, b), (c, d)):
        fresh = f"{key}-after-{first.number}"
        before = settled_stats(first)
        original = call(first, fresh)
        assert_original(original)
        assert_replay_of(call(second, fresh), original)
        assert upstream.count(key=fresh) == 1
        assert_stat_deltas(first, before, {"idempotency.claimed": 1, "idempotency.stored": 1,
                                      "idempotency.store_error": 0})


def test_an_etcd_that_never_answers_costs_a_request_the_timeout_not_a_hang(pair, upstream, etcd, key):
    a, b = pair
    before = settled_stats(a)
    etcd.freeze()
    try:
        resp, took = timed(lambda: call(a, key))
        assert_problem(resp, 503, "idempotency_store_unavailable")
        print(f"etcd frozen: 503 in {took * 1000:.0f} ms (timeout {ETCD_TIMEOUT_S * 1000:.0f} ms)")
        assert took < 6 * ETCD_TIMEOUT_S, f"the request took {took:.3f}s with etcd frozen"
        assert upstream.count(key=key) == 0
        assert_stat_deltas(a, before, {"idempotency.store_error": 1, "idempotency.rejected": 1})
    finally:
        etcd.thaw()
    original = call(a, key)
    assert_original(original)
    assert_replay_of(call(b, key), original)
    assert upstream.count(key=key) == 1


def test_a_waiting_duplicate_rides_out_a_failed_read_and_never_runs_unprotected(pair, pass_pair, upstream,
                                                                                etcd, key):
    # An original in flight on one Envoy of each pair, its duplicate waiting on the other; etcd
    # freezes past the call timeout, so the duplicates' reads of the key fail, then thaws. Under
    # either policy the duplicate keeps waiting and gets the original's answer.
    slow = [("x-test-delay-ms", "2500")]
    runs = []
    for (first, second), policy in ((pair, "reject"), (pass_pair, "pass")):
        own = f"{key}-{policy}"
        original = in_background(lambda first=first, own=own: call(first, own, headers=slow))
        assert wait_for(lambda: upstream.count(key=own) == 1), "the original never reached the upstream"
        before = settled_stats(second)
        duplicate = in_background(lambda second=second, own=own: call(second, own, headers=slow))
        assert wait_for(lambda: stat_deltas(second, before, ["idempotency.waited"])["idempotency.waited"] == 1)
        runs.append((own, second, before, original, duplicate))
    etcd.freeze()
    try:
        time.sleep(3 * ETCD_TIMEOUT_S)
    finally:
        etcd.thaw()
    for own, second, before, (original, original_box), (duplicate, duplicate_box) in runs:
        original.join()
        duplicate.join()
        assert_original(original_box["result"])
        assert_replay_of(duplicate_box["result"], original_box["result"])
        assert upstream.count(key=own) == 1
        failed = stat_deltas(second, before, ["idempotency.store_error"])["idempotency.store_error"]
        assert failed >= 1, "no read failed while etcd was frozen: the test proved nothing"
        assert stat_deltas(second, before, ["idempotency.bypassed", "idempotency.rejected"]) == {
            "idempotency.bypassed": 0, "idempotency.rejected": 0}


# -- responses etcd cannot keep ---------------------------------------------------------------------

def _send_too_large(envoy, key, size):
    """A first POST whose response (``size`` bytes) the store cannot keep: the client still gets
    it whole, and it is counted as too large. Its headers and the stats before it."""
    big = [("x-test-status", "200"), ("x-test-body-bytes", str(size)), ("x-test-body-seed", key)]
    before = settled_stats(envoy)
    resp = call(envoy, key, headers=big)
    assert_original(resp, 200)
    assert resp.body == binary_body(size, key), f"the client got {len(resp.body)} bytes"
    assert_stat_deltas(envoy, before, {"idempotency.response_too_large": 1, "idempotency.stored": 0,
                                       "idempotency.store_error": 0})
    return big, before


def test_a_response_over_max_value_bytes_is_kept_without_its_body(started, upstream, etcd, key):
    a, b = started.pair(upstream, etcd, fleet_config(etcd={"max_value_bytes": 4096}))
    big, _ = _send_too_large(a, key, 16 * 1024)
    for envoy in (b, a):
        assert_problem(call(envoy, key, headers=big), 409, "idempotency_response_not_stored")
    assert upstream.count(key=key) == 1


def test_a_response_etcd_refuses_as_too_large_is_kept_without_its_body(started, upstream, key):
    strict = started.etcd("strict", max_request_bytes=65536)
    a, b = started.pair(upstream, strict, fleet_config(etcd={"max_value_bytes": 1000000}))
    # 100 KiB is well within max_value_bytes: only etcd (65,536 bytes a request) refuses it.
    big, before = _send_too_large(a, key, 100 * 1024)
    # A handful of calls (lease grants, maybe the next window's too, the claim, the refused put,
    # the put without the body), and then no more: no retry loop.
    calls = settled_etcd_requests(a) - before.get("cluster.etcd.upstream_rq_total", 0)
    assert calls <= 8, f"{calls} calls to etcd for one request"
    # etcd did refuse the put with the body (its gateway answers 400 "request is too large").

    for envoy in (b, a):
        assert_problem(call(envoy, key, headers=big), 409, "idempotency_response_not_stored")
    assert upstream.count(key=key) == 1


def test_an_etcd_out_of_space_applies_the_policy_until_an_operator_frees_it(started, upstream, key):
    """NOSPACE: etcd refuses writes once its database reaches --quota-backend-bytes. docs/etcd.md's
    remedy (delete, compact, defragment, disarm the alarm) brings service back."""
    small = started.etcd("small", quota_backend_bytes=256 * 1024)
    a, b = started.pair(upstream, small, fleet_config())
    before_full = call(a, key + "-before")
    assert_original(before_full)

    filler = base64.b64encode(b"x" * 20_000).decode()
    for n in range(100):
        try:
            small.post("/v3/kv/put", {"key": base64.b64encode(f"fill/{n}".encode()).decode(),
                                      "value": filler})
        except EtcdError as error:
            assert "database space exceeded" in str(error), error
            break
    else:
        pytest.fail("etcd never ran out of space")

    full = key + "-full"
    before = settled_stats(b)
    resp = call(b, full)
    assert_problem(resp, 503, "idempotency_store_unavailable")
    assert assert_retry_after(resp) >= 1, resp
    assert upstream.count(key=full) == 0
    assert_stat_deltas(b, before, {"idempotency.store_error": 1, "idempotency.rejected": 1})
    # A record A already holds a copy of still replays there.
    assert_replay_of(call(a, key + "-before"), before_full)

    small.post("/v3/kv/deleterange", {"key": base64.b64encode(b"fill/").decode(),
                                      "range_end": base64.b64encode(b"fill0").decode()})
    revision = small.post("/v3/kv/range", {"key": "AA=="})["header"]["revision"]
    small.post("/v3/kv/compaction", {"revision": revision, "physical": True})
    small.post("/v3/maintenance/defragment", {})
    for alarm in small.post("/v3/maintenance/alarm", {"action": "GET"}).get("alarms", []):
        small.post("/v3/maintenance/alarm", {"action": "DEACTIVATE", **alarm})

    # The client's retry, after its Retry-After (no lease is asked for within 250 ms of a
    # failed grant).
    time.sleep(assert_retry_after(resp))
    original = call(b, full)
    assert_original(original)
    assert_replay_of(call(a, full), original)
    assert upstream.count(key=full) == 1


# -- one organisation's flood ------------------------------------------------------------------

FLOOD_KEYS = 1_500
STEADY_KEYS = 20
FLOODER = "Bearer ic_live_org_flood"


def test_an_organisation_flooding_etcd_holds_its_share_and_leaves_another_working(started, upstream, etcd):
    """docs/etcd.md's shares: past ``max_share_bytes`` of records written through one Envoy, an
    organisation's new records live ``lease``, not ``ttl``. It keeps being served, its retries
    within the lease replay, and what it holds in etcd falls back to a share per Envoy, while
    another organisation's records keep their ``ttl``."""
    prefix, share = f"flood-{uuid.uuid4().hex[:8]}/", 16_384
    config = fleet_config(lease="3s", etcd={"key_prefix": prefix, "max_share_bytes": share, "max_value_bytes": 4096})
    a, b = started.pair(upstream, etcd, config)
    before = [settled_stats(envoy) for envoy in (a, b)]

    floods = []
    threads = [threading.Thread(target=lambda e=envoy: floods.append(
        run_load(e.port, 0, FLOOD_KEYS // 2, f"flood-{e.port}", 8, auth=FLOODER)), daemon=True)
        for envoy in (a, b)]
    for thread in threads:
        thread.start()
    # The other organisation: first POSTs on A and their retries on B for as long as the flood
    # lasts, within its own share (STEADY_KEYS records), then retries of its earlier keys.
    other, retries = [], []
    while any(thread.is_alive() for thread in threads) or not retries:
        if len(other) < STEADY_KEYS:
            k = f"steady-{uuid.uuid4()}"
            other.append((k, call(a, k, path="/v1/load")))
        k, first = other[len(retries) % len(other)]
        retries.append((k, first, call(b, k, path="/v1/load")))
    for thread in threads:
        thread.join()

    for flood in floods:
        assert flood["statuses"] == {200: FLOOD_KEYS // 2}, flood
    for k, first, retry in retries:
        assert_original(first)
        assert_replay_of(retry, first)
        assert upstream.count(key=k) == 1
    evicted = sum(stat_deltas(envoy, start, ["idempotency.evicted"])["idempotency.evicted"]
                  for envoy, start in zip((a, b), before))
    assert evicted > FLOOD_KEYS // 2, evicted
    # Past its share, the flooder is still protected for the lease: a retry on the other Envoy
    # finds the record in etcd.
    late = f"flood-late-{uuid.uuid4()}"
    flooder = [("authorization", FLOODER)]
    first = call(a, late, headers=flooder, path="/v1/load")
    assert_original(first)
    assert_replay_of(call(b, late, headers=flooder, path="/v1/load"), first)

    # Once the lease-long records have gone, the flooder holds at most a share per Envoy.
    def held():
        return [len(k) + len(v) for k, v in etcd.range_prefix(prefix)]

    bound = 2 * share + len(other) * max(held())
    assert wait_for(lambda: sum(held()) <= bound, timeout=30), (len(held()), sum(held()), bound)
    assert len(held()) > len(other) + 1, "the flooder's records within its share are kept"
    # The other organisation's records kept their ttl: an Envoy that never saw them replays
    # every one from etcd.
    (c, _) = started.pair(upstream, etcd, config)
    for k, first in other:
        assert_replay_of(call(c, k, path="/v1/load"), first)
        assert upstream.count(key=k) == 1
