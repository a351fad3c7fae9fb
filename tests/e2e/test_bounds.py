"""docs/bounds.md, in a real Envoy with two workers: a store with no room left
under each policy, eviction and fair shares, one organisation's flood of distinct keys, and
Envoy's resident memory under far more distinct keys than the store holds.

The memory test sends IDEMPOTENCY_LOAD_REQUESTS requests per regime (default 100000, ten times
the store's capacity); set it lower for a quick run. Its figures are printed (run pytest with -s
to see them)."""

import os
import threading
import time
import urllib.request
import uuid

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_retry_after,
                            assert_stat_deltas, stat_deltas, wait_for)
from support.client import ORG_A, call, call_headers, in_background
from support.envoy import worker_connections
from support.load import FastUpstream, rss_kib, RssSampler, run_load

LOAD_REQUESTS = int(os.environ.get("IDEMPOTENCY_LOAD_REQUESTS", "100000"))
WARMUP_REQUESTS = 1000
LOAD_CONNECTIONS = 64
# The store's own bound, per docs/bounds.md: about 200 bytes of bookkeeping per record plus
# the response bytes. Envoy's footprint is not otherwise fixed to the byte (allocator caches,
# buffers at peak concurrency): this much more is allowed.
BYTES_PER_RECORD = 200
RSS_SLACK_BYTES = 8 << 20


# -- a store with no room left ----------------------------------------------------------------------

# 16 records: a single bucket, so keys cannot spread; one organisation may fill it.
ONE_BUCKET = {"capacity_records": 16, "ttl": "1h", "max_share": 1}


def fill(envoy, upstream, n=16):
    keys = [f"fill-{uuid.uuid4()}" for _ in range(n)]
    answers = [call(envoy, k) for k in keys]
    for k, answer in zip(keys, answers):
        assert_original(answer)
        assert upstream.count(key=k) == 1
    return keys, answers


def test_full_store_under_reject_answers_the_17th_key_503_store_full(envoy_with, upstream):
    envoy = envoy_with({**ONE_BUCKET, "when_full": "reject"}, fresh=True)
    before = envoy.stats()
    keys, answers = fill(envoy, upstream)
    extra = f"extra-{uuid.uuid4()}"

    for _ in range(2):
        refused = call(envoy, extra)
        assert_problem(refused, 503, "idempotency_store_full")
        assert 1 <= assert_retry_after(refused) <= 60, f"{refused!r}"
    assert upstream.count(key=extra) == 0
    # What is stored is still served while the store is full.
    assert_replay_of(call(envoy, keys[0]), answers[0])
    assert_replay_of(call(envoy, keys[-1]), answers[-1])
    assert upstream.count(key=keys[0]) == 1 and upstream.count(key=keys[-1]) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 16, "idempotency.stored": 16, "idempotency.store_full": 2,
        "idempotency.rejected": 2, "idempotency.bypassed": 0, "idempotency.replayed": 2})


def test_full_store_under_pass_forwards_the_17th_key_without_idempotency(envoy_with, upstream):
    envoy = envoy_with({**ONE_BUCKET, "when_full": "pass"}, fresh=True)
    before = envoy.stats()
    keys, answers = fill(envoy, upstream)
    extra = f"extra-{uuid.uuid4()}"

    passed = call(envoy, extra)

    assert_original(passed)
    assert upstream.count(key=extra) == 1
    # Not recorded: its retry runs the work again (the policy trades the guarantee for availability).
    assert_original(call(envoy, extra))
    assert upstream.count(key=extra) == 2
    assert_replay_of(call(envoy, keys[0]), answers[0])
    assert upstream.count(key=keys[0]) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 16, "idempotency.stored": 16, "idempotency.store_full": 2,
        "idempotency.bypassed": 2, "idempotency.rejected": 0, "idempotency.replayed": 1})


def test_full_store_takes_new_keys_again_once_its_records_expire(envoy_with, upstream):
    envoy = envoy_with({**ONE_BUCKET, "ttl": "1s", "when_full": "reject"}, fresh=True)
    before = envoy.stats()
    fill(envoy, upstream)
    extra = f"extra-{uuid.uuid4()}"
    assert_problem(call(envoy, extra), 503, "idempotency_store_full")

    time.sleep(1.2)
    later = call(envoy, extra)

    assert_original(later)
    assert_replay_of(call(envoy, extra), later)
    assert upstream.count(key=extra) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 17, "idempotency.stored": 17, "idempotency.store_full": 1,
        "idempotency.replayed": 1})


# A record is never evicted sooner than this after it was stored (10 s, or half the TTL).
SHORT_TTL, GRACE_S = "8s", 4.0


def test_a_full_store_evicts_its_oldest_completed_record_and_never_a_claim_in_flight(envoy_with, upstream):
    envoy = envoy_with({**ONE_BUCKET, "ttl": SHORT_TTL}, fresh=True)  # when_full: evict, the default
    before = envoy.stats()
    slow = f"slow-{uuid.uuid4()}"
    in_flight, box = in_background(lambda: call(envoy, slow, headers=[("x-test-delay-ms", "1500")]))
    assert wait_for(lambda: upstream.count(key=slow) == 1), "the slow original never reached the upstream"
    keys, answers = fill(envoy, upstream, n=15)
    # Within their grace, the records are safe: the store is full for a new key.
    assert_problem(call(envoy, f"early-{uuid.uuid4()}"), 503, "idempotency_store_full")
    time.sleep(GRACE_S)

    newcomer = f"new-{uuid.uuid4()}"
    first = call(envoy, newcomer)
    assert_original(first)
    # The oldest completed record made way: its retry runs again (and evicts the next oldest).
    assert_original(call(envoy, keys[0]))
    assert upstream.count(key=keys[0]) == 2
    # The claim in flight kept its entry: its answer is stored and replays.
    in_flight.join()
    assert_original(box["result"])
    assert_replay_of(call(envoy, slow), box["result"])
    assert upstream.count(key=slow) == 1
    for k, answer in ((newcomer, first), (keys[-1], answers[-1])):
        assert_replay_of(call(envoy, k), answer)
        assert upstream.count(key=k) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.evicted": 2, "idempotency.store_full": 1, "idempotency.rejected": 1,
        "idempotency.claimed": 18, "idempotency.stored": 18})


def test_an_organisation_whose_whole_share_is_in_flight_gets_429_and_no_one_else_does(envoy_with, upstream):
    envoy = envoy_with({**ONE_BUCKET, "max_share": 0.25, "ttl": SHORT_TTL}, fresh=True)  # 4 records
    before = envoy.stats()
    slow = [("x-test-delay-ms", "1500")]
    keys = [f"busy-{uuid.uuid4()}" for _ in range(4)]
    running = [in_background(lambda k=k: call(envoy, k, headers=slow)) for k in keys]
    assert wait_for(lambda: all(upstream.count(key=k) == 1 for k in keys))

    extra = f"busy-{uuid.uuid4()}"
    refused = call(envoy, extra)
    assert_problem(refused, 429, "idempotency_quota_exceeded")
    assert assert_retry_after(refused) >= 1
    assert upstream.count(key=extra) == 0
    other = f"other-{uuid.uuid4()}"
    other_org = call_headers(other, auth="Bearer ic_live_org_other")
    assert_original(envoy.request("POST", "/v1/customers", other_org, b"{}"))
    for thread, box in running:
        thread.join()
        assert_original(box["result"])
    # Its records complete and, past their grace, the next key makes way with the oldest of them.
    time.sleep(GRACE_S)
    assert_original(call(envoy, extra))
    assert_stat_deltas(envoy, before, {"idempotency.quota_exceeded": 1, "idempotency.evicted": 1,
                                       "idempotency.claimed": 6})


FLOOD_REQUESTS = 100_000
STEADY_KEYS = 300  # well inside its share of a store that holds 10 000
FLOOD_STORE = {"capacity_records": 10_000, "capacity_bytes": 4 << 20, "max_response_body_bytes": 64 << 10}


def test_one_organisation_flooding_distinct_keys_never_locks_another_out(envoy_with, fast_upstream):
    # The defaults (evict, max_share 0.1) on a store the flood overfills ten times.
    envoy = envoy_with(FLOOD_STORE, upstream_port=fast_upstream.port, fresh=True)
    quiet_logs(envoy)
    before = envoy.stats()
    rss_start = rss_kib(envoy.proc.pid)
    flood = {}
    done = threading.Event()

    def flooding():
        try:
            flood.update(run_load(envoy.port, 0, FLOOD_REQUESTS, f"flood-{uuid.uuid4().hex[:8]}", 32,
                                  auth="Bearer ic_live_org_flood"))
        finally:
            done.set()

    with RssSampler(envoy.proc.pid) as sampler:
        thread = threading.Thread(target=flooding, daemon=True)
        thread.start()
        # The organisation that keeps working: first POSTs and their replays for as long as the
        # flood lasts, then replays of its earlier keys.
        other = []
        while not done.is_set() or not other:
            if len(other) < STEADY_KEYS:
                k = f"steady-{uuid.uuid4()}"
                first = call(envoy, k, body=b'{"steady": true}', path="/v1/load")
            else:
                k, first = other[len(other) % STEADY_KEYS][0], other[len(other) % STEADY_KEYS][1]
            other.append((k, first, call(envoy, k, body=b'{"steady": true}', path="/v1/load")))
        thread.join()
    growth = max(sampler.peak, rss_kib(envoy.proc.pid)) - rss_start

    deltas = stat_deltas(envoy, before, ["idempotency.evicted", "idempotency.store_full",
                                         "idempotency.rejected", "idempotency.quota_exceeded",
                                         "idempotency.evicted_age_seconds"])
    print(f"\nflood of {FLOOD_REQUESTS} keys in {flood['seconds']}s: statuses {flood['statuses']} codes "
          f"{flood['codes']}; the other organisation: {len(other)} first POSTs and replays; VmRSS growth "
          f"{growth} KiB; {deltas}")
    for _, first, replay in other:
        assert first.status == 201 and first.header("idempotent-replayed") is None, f"{first!r}"
        assert replay.status == 201 and replay.header("idempotent-replayed") == "true", f"{replay!r}"
        assert replay.body == first.body
    # The flood was held to its share: its own records stored at least the grace (10 s) ago made
    # way for its new keys, and a key that found none of them was refused 429, never 503.
    assert set(flood["statuses"]) <= {201, 429}, flood
    assert flood["codes"].get("idempotency_quota_exceeded", 0) == flood["statuses"].get(429, 0), flood
    assert flood["statuses"].get(201, 0) >= FLOOD_STORE["capacity_records"] // 10, flood
    assert deltas["idempotency.store_full"] == 0 and deltas["idempotency.rejected"] == 0, deltas
    assert deltas["idempotency.evicted_age_seconds"] >= 10 * deltas["idempotency.evicted"], deltas
    assert len([w for w, n in worker_connections(envoy).items() if n > 0]) == 2, "one worker took it all"
    bound_kib = (FLOOD_STORE["capacity_records"] * BYTES_PER_RECORD + FLOOD_STORE["capacity_bytes"]
                 + RSS_SLACK_BYTES) // 1024
    assert growth < bound_kib, f"VmRSS grew {growth} KiB (bound {bound_kib} KiB)"


# -- memory under far more keys than capacity --------------------------------------------------------

LOAD_STORE = {"capacity_records": 10_000, "capacity_bytes": 2 << 20, "max_response_body_bytes": 16 << 10,
              "max_share": 1}
REGIMES = {
    # Records expire within a second: the store turns over many times, responses are rewritten.
    # Small enough to fill at any load rate this suite sees (from about 600 keys a second, a
    # bucket meets 16 live records), where 10,000 records filled only above about 5,000/s.
    "churning_store_under_reject": {**LOAD_STORE, "capacity_records": 1_024, "ttl": "1s",
                                    "when_full": "reject"},
    # Records live for an hour: the store fills to capacity and stays full.
    "full_store_under_pass": {**LOAD_STORE, "ttl": "1h", "when_full": "pass"},
}


@pytest.fixture
def fast_upstream():
    up = FastUpstream().start()
    yield up
    up.stop()


def quiet_logs(envoy):
    """Envoy at a production log level for wasm: per-request debug lines are not what is measured."""
    req = urllib.request.Request(f"http://127.0.0.1:{envoy.admin_port}/logging?wasm=warning", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_envoy_memory_stays_bounded_under_far_more_distinct_keys_than_capacity(
        envoy_with, fast_upstream, regime):
    config = REGIMES[regime]
    envoy = envoy_with(config, upstream_port=fast_upstream.port, fresh=True)
    quiet_logs(envoy)
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    pid = envoy.proc.pid

    warmup = run_load(envoy.port, 0, WARMUP_REQUESTS, prefix, LOAD_CONNECTIONS, auth=ORG_A)
    warmed = warmup["statuses"].get(201, 0)
    if config["when_full"] == "reject":  # a small store may refuse a few already
        assert set(warmup["statuses"]) <= {201, 503}, warmup
        assert warmup["codes"].get("idempotency_store_full", 0) == warmup["statuses"].get(503, 0), warmup
    else:
        assert warmed == WARMUP_REQUESTS, warmup
    before = envoy.stats()
    rss_start = rss_kib(pid)
    with RssSampler(pid) as sampler:
        load = run_load(envoy.port, WARMUP_REQUESTS, LOAD_REQUESTS, prefix, LOAD_CONNECTIONS, auth=ORG_A)
    rss_end = rss_kib(pid)

    bound_kib = (config["capacity_records"] * BYTES_PER_RECORD + config["capacity_bytes"] + RSS_SLACK_BYTES) // 1024
    growth, peak_growth = rss_end - rss_start, sampler.peak - rss_start
    print(f"\n[{regime}] {LOAD_REQUESTS} distinct keys in {load['seconds']}s "
          f"({LOAD_REQUESTS / load['seconds']:.0f}/s) over {LOAD_CONNECTIONS} connections; "
          f"statuses {load['statuses']} codes {load['codes']}; Envoy VmRSS after {WARMUP_REQUESTS} warm-up "
          f"requests {rss_start} KiB, at the end {rss_end} KiB, peak {sampler.peak} KiB: growth {growth} KiB "
          f"(peak {peak_growth} KiB), bound {bound_kib} KiB")

    # What the clients saw and what the upstream did.
    statuses = load["statuses"]
    stored = statuses.get(201, 0)
    executions = fast_upstream.executions()
    if config["when_full"] == "reject":
        assert set(statuses) <= {201, 503}, load
        assert load["codes"].get("idempotency_store_full", 0) == statuses.get(503, 0), load
        assert executions == warmed + stored, "a refused request reached the upstream"
        assert stored >= 3 * config["capacity_records"], f"records expire and make room: {load}"
    else:
        assert statuses == {201: LOAD_REQUESTS}, load
        assert executions == warmed + LOAD_REQUESTS
    deltas = {name: envoy.stats().get(name, 0) - before.get(name, 0)
              for name in ["idempotency.claimed", "idempotency.stored", "idempotency.store_full",
                           "idempotency.rejected", "idempotency.bypassed", "idempotency.store_error"]}
    assert deltas["idempotency.store_error"] == 0, deltas
    assert deltas["idempotency.store_full"] > 0, f"the store never filled: {deltas}"
    assert deltas["idempotency.claimed"] + deltas["idempotency.store_full"] == LOAD_REQUESTS, deltas
    if config["when_full"] == "pass":  # the store filled to exactly its capacity, and stayed there
        assert WARMUP_REQUESTS + deltas["idempotency.claimed"] == config["capacity_records"], deltas
        assert deltas["idempotency.bypassed"] == deltas["idempotency.store_full"], deltas
    else:
        assert deltas["idempotency.rejected"] == deltas["idempotency.store_full"], deltas

    # Memory: the growth from warm-up to the end stays within the store's bound.
    assert growth < bound_kib, f"VmRSS grew {growth} KiB (bound {bound_kib} KiB)"
    assert peak_growth < bound_kib, f"VmRSS peaked {peak_growth} KiB above the start (bound {bound_kib} KiB)"

    # New keys are still served at the end, under the configured policy.
    if config["when_full"] == "reject":
        time.sleep(1.2)  # every record of the load has expired: its room is free again
        for i in range(20):
            key = f"{prefix}-after-{i}"
            fresh = call(envoy, key)
            assert_original(fresh)
            assert_replay_of(call(envoy, key), fresh)
    else:
        kept = call(envoy, f"{prefix}-0", body=b'{"n":0}', path="/v1/load")  # a warm-up record: kept
        assert kept.status == 201 and kept.header("idempotent-replayed") == "true", f"{kept!r}"
        for i in range(20):
            assert_original(call(envoy, f"{prefix}-after-{i}"))
    executions_after = fast_upstream.executions()
    assert executions_after == executions + 20, "each new key ran exactly once"
