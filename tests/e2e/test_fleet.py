"""docs/etcd.md, in real Envoys: two Envoy processes (two workers each) share one
etcd, so a retry that lands on the other Envoy of a fleet still replays, waits or conflicts.

Every Envoy here runs the filter with {"etcd": {"cluster": "etcd", "timeout": "500ms", ...}} and a
STATIC cluster ``etcd`` on a private etcd that the tests start (and stop, to see an outage).
Each test checks what the client saw and what the upstream did (its execution count).
"""

import copy
import json
import re
import threading
import time
import uuid

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_stat_deltas,
                            stat_deltas, wait_for)
from support.client import CUSTOMER, ORG_A, burst, call, Response, timed
from support.etcd import (etcd_requests, fleet_config, make_certs, settled_etcd_requests,
                          settled_stats)
from support.fleet import (etcd, keep_logs_of_failures, module_started, pair, pass_pair, run_dir,  # noqa: F401
                           sources, started)
from support.shipped import ENVOY_DIR, load, localise, wasm_filters

OTHER = json.dumps({"externalId": "crm-7741", "fullName": "Jane B. Doe", "email": "jane@example.com"}).encode()
ETCD_PREFIX = "idempotency/"



@pytest.fixture
def key():
    return f"fleet-{uuid.uuid4()}"


# -- one store for both Envoys ------------------------------------------------------------------

def _istio_etcd_cluster():
    """The cluster envoy/istio/etcd-cluster.yaml adds to Istio's gateway."""
    (patch,) = load(ENVOY_DIR / "istio" / "etcd-cluster.yaml")["spec"]["configPatches"]
    assert patch["applyTo"] == "CLUSTER" and patch["patch"]["operation"] == "ADD"
    return patch["patch"]["value"]


def _shipped_etcd_config(upstream, etcd, cluster=None, **store):
    """envoy/envoy-etcd.yaml as shipped, its etcd cluster (or ``cluster`` in its place, the
    plugin pointed at it) reaching ``etcd``; ``store`` adds to the plugin's etcd section."""
    config = localise(load(ENVOY_DIR / "envoy-etcd.yaml"), upstream.port)
    clusters = config["static_resources"]["clusters"]
    index = next(n for n, c in enumerate(clusters) if c["name"] == "etcd")
    if cluster is not None:
        clusters[index] = copy.deepcopy(cluster)
    cluster = clusters[index]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"].update(address="127.0.0.1", port_value=etcd.client_port)
    (wasm,) = wasm_filters(config)
    plugin = json.loads(wasm["config"]["configuration"]["value"])
    plugin["etcd"].update(cluster=cluster["name"], **store)
    wasm["config"]["configuration"]["value"] = json.dumps(plugin)
    return config


@pytest.mark.parametrize("cluster_from", ["envoy-etcd.yaml", "istio/etcd-cluster.yaml"])
def test_two_envoys_started_from_the_shipped_etcd_config_share_records(started, upstream, etcd, key,
                                                                      cluster_from):
    """envoy/envoy-etcd.yaml as shipped, with its own etcd cluster or the one the Istio
    EnvoyFilter adds to a gateway, on this test's etcd."""
    cluster = _istio_etcd_cluster() if cluster_from.startswith("istio/") else None
    a, b = started.shipped(_shipped_etcd_config(upstream, etcd, cluster))
    original = call(a, key)
    assert_original(original)
    assert_replay_of(call(b, key), original)
    assert_problem(call(b, key, body=OTHER), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1
    assert etcd.range_prefix("idempotency/"), "the shipped key_prefix holds nothing"


def test_etcd_with_tls_client_certificates_and_users(started, run_dir, upstream, key):
    """The production set-up: TLS with a client certificate on the cluster, etcd's users on, and
    the filter's user, allowed under its key_prefix only, sending its token (a JWT)."""
    certs = make_certs(run_dir / "certs")
    secure = started.etcd("secure", certs=certs)
    token = secure.enable_auth("idempotency", "idempotency/")
    config = localise(load(ENVOY_DIR / "envoy-etcd.yaml"), upstream.port)
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "etcd"]
    certificate, private_key = certs.client
    cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "localhost",
        "common_tls_context": {
            "alpn_protocols": ["h2"],  # gRPC servers may refuse TLS without it
            "tls_certificates": [{"certificate_chain": {"filename": str(certificate)},
                                  "private_key": {"filename": str(private_key)}}],
            "validation_context": {"trusted_ca": {"filename": str(certs.ca)}}}}}
    a, b = started.shipped(_shipped_etcd_config(upstream, secure, cluster, auth_token=token))
    original = call(a, key)
    assert_original(original)
    assert_replay_of(call(b, key), original)
    assert upstream.count(key=key) == 1
    assert secure.range_prefix("idempotency/"), "nothing stored under the user's prefix"

    # Without the token etcd refuses the filter's calls: the policy applies, nothing runs.
    (anonymous,) = started.shipped(_shipped_etcd_config(upstream, secure, cluster), 1)
    refused = key + "-anonymous"
    assert_problem(call(anonymous, refused), 503, "idempotency_store_unavailable")
    assert upstream.count(key=refused) == 0


def test_retry_on_the_other_envoy_replays_and_then_comes_from_its_local_copy(pair, upstream, etcd, key):
    a, b = pair
    cookie = [("x-test-set-cookie", "session=fleet1; Path=/; HttpOnly")]
    original = call(a, key, headers=cookie)
    assert_original(original)
    assert original.body == CUSTOMER
    assert original.header_all("set-cookie") == ["session=fleet1; Path=/; HttpOnly"]

    b_calls = settled_etcd_requests(b, quiet_s=0.15)
    replay = call(b, key, headers=cookie)
    assert_replay_of(replay, original)
    assert etcd_requests(b) > b_calls, "B's first replay did not come from etcd"
    assert replay.header("x-upstream-execution") == original.header("x-upstream-execution")
    assert upstream.count(key=key) == 1

    # B now holds a copy: a second retry on B does not ask etcd.
    b_calls = settled_etcd_requests(b)
    again = call(b, key, headers=cookie)
    assert_replay_of(again, original)
    assert etcd_requests(b) == b_calls, "the second replay on B went to etcd"
    # A kept the copy it stored.
    a_calls = settled_etcd_requests(a)
    assert_replay_of(call(a, key, headers=cookie), original)
    assert etcd_requests(a) == a_calls, "a replay on A went to etcd"
    assert upstream.count(key=key) == 1

    # etcd holds the record under the configured prefix, by hash only: no raw key, no credential.
    records = etcd.range_prefix(ETCD_PREFIX)
    assert records, "nothing stored in etcd"
    for name, value in records:
        assert re.fullmatch(rb"idempotency/r2/[0-9a-f]{64}", name), name
        assert key.encode() not in name + value
        assert ORG_A.encode() not in value


def _settled_kv_calls(etcd, *envoys):
    """etcd's KV calls once the Envoys' own calls have stopped moving."""
    for envoy in envoys:
        settled_etcd_requests(envoy)
    return etcd.kv_calls()


def test_a_burst_of_replays_the_other_envoy_has_not_seen_asks_etcd_once_per_worker(pair, upstream, etcd,
                                                                                    key):
    """A record stored through A, then retried 16 times at once through B, whose cache has never
    seen it: each of B's workers asks etcd once, and its other retries wait for that answer."""
    a, b = pair
    original = call(a, key)
    assert_original(original)
    before = _settled_kv_calls(etcd, a, b)
    results = burst(16, lambda i: call(b, key))
    for resp in results:
        assert_replay_of(resp, original)
    assert upstream.count(key=key) == 1
    # One claim per worker (lease grants are not KV calls).
    asked = _settled_kv_calls(etcd, a, b) - before
    assert 1 <= asked <= 2, f"B asked etcd {asked} times for 16 replays of one record"


def test_replays_of_records_stored_elsewhere_read_etcd_and_write_nothing(started, upstream, etcd):
    """Records stored through A, retried through B: a claim's transaction is a raft write even when
    it only finds the record, so once three in four of a worker's last 32 claims found one, its
    claims read first, and replays write nothing to etcd. A pair of its own, whose workers have
    made no claim before."""
    a, b = started.pair(upstream, etcd, fleet_config())
    keys = [f"fleet-cold-{uuid.uuid4()}" for _ in range(128)]
    originals = [call(a, k) for k in keys]
    for original in originals:
        assert_original(original)

    def raft_writes_replaying(numbered):
        """etcd's raft writes while B replays keys[n] for n in numbered."""
        settled_etcd_requests(a)
        before = etcd.raft_writes()
        for n in numbered:
            assert_replay_of(call(b, keys[n]), originals[n])
        settled_etcd_requests(b)
        return etcd.raft_writes() - before

    # Each of B's two workers claims by transaction until 24 of its claims have found a record.
    first = raft_writes_replaying(range(96))
    assert first in (24, 48), f"{first} raft writes for the first 96 replays"
    assert raft_writes_replaying(range(96, 128)) == 0, "replays read first, and write nothing"
    assert all(upstream.count(key=k) == 1 for k in keys)


def test_a_burst_split_across_both_envoys_executes_once(pair, upstream, key):
    n = 20
    slow = [("x-test-delay-ms", "500")]
    before = [settled_stats(e) for e in pair]
    ended = [0.0] * n

    def one(i):
        resp = call(pair[i % 2], key, headers=slow)
        ended[i] = time.monotonic()
        return resp

    started = time.monotonic()
    results = burst(n, one)
    elapsed = time.monotonic() - started

    for resp in results:
        assert isinstance(resp, Response), f"{resp!r}"
    originals = [i for i, r in enumerate(results) if r.header("idempotent-replayed") is None]
    assert len(originals) == 1, f"{len(originals)} answers were not replays: {[results[i] for i in originals]}"
    original = results[originals[0]]
    assert_original(original)
    assert original.body == CUSTOMER
    for resp in results:
        if resp is not original:
            assert_replay_of(resp, original)
    assert upstream.count(key=key) == 1

    names = ["idempotency.claimed", "idempotency.replayed"]
    wait_for(lambda: sum(stat_deltas(e, s, names)["idempotency.replayed"] for e, s in zip(pair, before)) == n - 1)
    totals = {name: sum(stat_deltas(e, s, [name])[name] for e, s in zip(pair, before)) for name in names}
    assert totals == {"idempotency.claimed": 1, "idempotency.replayed": n - 1}
    # The other Envoy's waiters poll etcd every 100 ms: they are answered soon after the original.
    lag = max(ended) - ended[originals[0]]
    print(f"burst of {n} over 2 Envoys: {elapsed:.3f}s, last replay {lag * 1000:.0f} ms after the original")
    assert lag < 1.0, f"the last replay came {lag:.3f}s after the original"
    assert elapsed < 3.0, f"the burst took {elapsed:.3f}s"


def test_concurrent_first_posts_grant_one_lease_per_kind_and_window_per_worker(started, upstream, key):
    etcd = started.etcd("leases")
    a, _ = started.pair(upstream, etcd, fleet_config())
    n = 48
    results = burst(n, lambda i: call(a, f"{key}-{i}"))
    for i, resp in enumerate(results):
        assert_original(resp)
        assert upstream.count(key=f"{key}-{i}") == 1
    granted = etcd.metric("etcd_debugging_lease_granted_total")
    # Claims that find no lease wait for their worker's one grant. Each of A's two workers
    # grants a claim lease and a record lease, and perhaps the next window's of each ahead.
    assert 1 <= granted <= 2 * 2 * 2, f"{granted:.0f} leases granted for {n} concurrent claims"


def test_etcd_calls_are_timed_and_sized_and_the_queues_drain(pair, upstream, key):
    """Each gRPC call's latency and operations land in histograms (docs/metrics.md); finishes
    that end together go out in one call; nothing stays queued or in flight once traffic stops."""
    a, _ = pair

    def seen():
        samples = a.prometheus()[0]
        return {name: samples.get(f"idempotency_{name}{{}}", 0)
                for name in ("etcd_call_us_count", "etcd_call_us_sum", "etcd_batch_ops_count",
                             "etcd_batch_ops_sum", "etcd_calls_in_flight", "etcd_claims_queued",
                             "etcd_finishes_queued")}
    before = seen()
    n = 24
    # Upstream answers that come back together: their finishes meet on one tick.
    results = burst(n, lambda i: call(a, f"{key}-{i}", headers=[("x-test-delay-ms", "300")]))
    for i, resp in enumerate(results):
        assert_original(resp)
        assert upstream.count(key=f"{key}-{i}") == 1

    def moved():
        return {name: value - before[name] for name, value in seen().items()}
    assert wait_for(lambda: moved()["etcd_batch_ops_sum"] >= 2 * n, timeout=10), moved()
    delta = moved()
    calls = delta["etcd_call_us_count"]
    assert calls >= 2 and delta["etcd_batch_ops_count"] >= calls
    assert delta["etcd_batch_ops_count"] < 2 * n, "some calls carried several operations"
    # Microseconds: a round trip through Envoy to etcd on loopback takes more than 20 and far
    # less than a second.
    assert 20 < delta["etcd_call_us_sum"] / calls < 1_000_000, delta
    assert wait_for(lambda: [seen()[name] for name in ("etcd_calls_in_flight", "etcd_claims_queued",
                                                      "etcd_finishes_queued")] == [0, 0, 0], timeout=5)


def test_a_different_body_on_the_other_envoy_conflicts(pair, upstream, key):
    a, b = pair
    original = call(a, key)
    assert_original(original)
    assert_problem(call(b, key, body=OTHER), 409, "idempotency_conflict")
    # The record is untouched: the original request still replays on both.
    assert_replay_of(call(b, key), original)
    assert_replay_of(call(a, key), original)
    assert upstream.count(key=key) == 1

    # While the original is still in flight on A, too, and without waiting for it.
    in_flight = key + "-in-flight"
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("resp", call(a, in_flight, headers=[
        ("x-test-delay-ms", "800")])))
    thread.start()
    assert wait_for(lambda: upstream.count(key=in_flight) == 1), "the original never reached the upstream"
    conflict, took = timed(lambda: call(b, in_flight, body=OTHER))
    assert_problem(conflict, 409, "idempotency_conflict")
    assert took < 0.5, f"the conflict took {took:.3f}s: it waited for the original"
    thread.join()
    assert_original(box["resp"])
    assert upstream.count(key=in_flight) == 1


def test_a_webhook_redelivered_to_the_other_envoy_replays_by_the_event_id_in_its_body(started, upstream, etcd,
                                                                                      key):
    """A provider redelivers event evt_... with no Idempotency-Key header; its second delivery
    lands on the other Envoy of the fleet, re-serialised, and while the first is still running."""
    a, b = started.pair(upstream, etcd, fleet_config(key_from_body="/id", scope_header="user-agent",
                                                     fingerprint="json"))
    path = f"/v1/webhooks/{key}"
    provider = [("user-agent", "Provider-Webhooks/1.0"), ("x-test-status", "200")]
    event = {"id": f"evt_{key}", "type": "invoice.paid", "data": {"amount": 1250, "currency": "eur"}}
    compact = json.dumps(event, separators=(",", ":")).encode()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("first", call(
        a, None, auth=None, body=compact, path=path, headers=provider + [("x-test-delay-ms", "500")])))
    thread.start()
    assert wait_for(lambda: upstream.count(path=path) == 1), "the first delivery never reached the upstream"
    redelivered = json.dumps(dict(reversed(list(event.items()))), indent=2).encode()
    waited = call(b, None, auth=None, body=redelivered, path=path, headers=provider)
    thread.join()
    assert_original(box["first"], 200)
    assert_replay_of(waited, box["first"])
    assert_replay_of(call(a, None, auth=None, body=redelivered, path=path, headers=provider), box["first"])
    assert upstream.count(path=path) == 1


def test_a_5xx_on_one_envoy_releases_so_a_retry_on_the_other_runs(pair, upstream, key):
    a, b = pair
    before = settled_stats(a)
    failed = call(a, key, headers=[("x-test-status", "503")])
    assert_original(failed, 503)
    assert_stat_deltas(a, before, {"idempotency.released": 1, "idempotency.stored": 0})

    retry = call(b, key)
    assert_original(retry, 201)
    assert retry.header("x-upstream-execution") != failed.header("x-upstream-execution")
    assert upstream.count(key=key) == 2
    # And that retry's answer is the one kept, for both Envoys.
    assert_replay_of(call(a, key), retry)
    assert upstream.count(key=key) == 2

    # A duplicate already waiting on B when A's original fails takes the claim over and runs.
    waiting = key + "-waiting"
    before_b = settled_stats(b)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("resp", call(a, waiting, headers=[
        ("x-test-status", "503"), ("x-test-delay-ms", "600")])))
    thread.start()
    assert wait_for(lambda: upstream.count(key=waiting) == 1), "the original never reached the upstream"
    taken = call(b, waiting)
    thread.join()
    assert_original(box["resp"], 503)
    assert_original(taken, 201)
    assert upstream.count(key=waiting) == 2
    assert_stat_deltas(b, before_b, {"idempotency.waited": 1, "idempotency.taken_over": 1, "idempotency.claimed": 1})
    assert_replay_of(call(a, waiting), taken)
    assert upstream.count(key=waiting) == 2
