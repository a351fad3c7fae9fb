"""docs/etcd.md on a real three-member etcd cluster: two Envoy
processes (two workers each) list every member in envoy/envoy-etcd.yaml's own cluster (HTTP/2,
its outlier detection), and members stop, die and come back under them.

Each test starts its own cluster on loopback, so that what one breaks never reaches another.
What the client saw is checked against what the upstream did: never a second execution, and
every answer the original, its replay, or a clear refusal with Retry-After.
"""

import threading
import time
import uuid

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, assert_retry_after
from support.client import burst, call, Response
from support.etcd import fleet_config
from support.fleet import keep_logs_of_failures, run_dir, sources, started  # noqa: F401

SLOW = [("x-test-delay-ms", "1000")]
QUORUM_LOST_S = 3.0  # a generous bound on a 500 ms call timeout, on a busy machine


@pytest.fixture
def fleet(started, upstream):
    """Three etcd members, and Envoys A and B listing all three."""
    members = started.cluster(3)
    return members, started.pair(upstream, members, fleet_config())


@pytest.fixture
def key():
    return f"cluster-{uuid.uuid4()}"


def leader_of(members):
    (leader,) = [m for m in members if m.running and m.is_leader()]
    return leader


def assert_refused(resp):
    """A clear refusal a client retries: 503 store unavailable, or 409 while the original is
    (as far as this Envoy can tell) still in flight, both with Retry-After."""
    assert isinstance(resp, Response), f"{resp!r}"
    if resp.status == 503:
        assert_problem(resp, 503, "idempotency_store_unavailable")
    else:
        assert_problem(resp, 409, "idempotency_in_progress")
    assert assert_retry_after(resp) >= 1, resp


def run_once(envoy, name, limit_s=10.0):
    """``name``'s original, its client retrying after each refusal."""
    deadline = time.monotonic() + limit_s
    while True:
        resp = call(envoy, name)
        if resp.status == 201 or time.monotonic() > deadline:
            assert_original(resp)
            return resp
        assert_refused(resp)
        time.sleep(0.1)


def first_success_after(envoys, prefix, limit_s=20.0):
    """New keys, one after another, until one runs: its response and when it came."""
    deadline = time.monotonic() + limit_s
    n = 0
    while time.monotonic() < deadline:
        n += 1
        resp = call(envoys[n % 2], f"{prefix}-{n}")
        if resp.status == 201:
            return resp, time.monotonic()
        assert_refused(resp)
        time.sleep(0.05)
    pytest.fail(f"no new key ran within {limit_s}s")


def test_a_stopped_follower_costs_clients_at_most_its_first_ejection(fleet, upstream, key):
    members, envoys = fleet
    follower = next(m for m in members if not m.is_leader())
    follower.stop()
    results = [call(envoys[n % 2], f"{key}-{n}") for n in range(90)]
    refused = [n for n, resp in enumerate(results) if resp.status != 201]
    for n in refused:
        assert_refused(results[n])
        assert upstream.count(key=f"{key}-{n}") == 0
    for n, resp in enumerate(results):
        if n not in refused:
            assert_original(resp)
            assert upstream.count(key=f"{key}-{n}") == 1
    ejections = [e.counter("cluster.etcd.outlier_detection.ejections_enforced_total") for e in envoys]
    print(f"follower stopped: {len(refused)} of {len(results)} refused; ejections {ejections}")
    # Each Envoy's workers may each meet the stopped member once before it is ejected.
    assert len(refused) <= 4, f"{len(refused)} refused: {[results[n] for n in refused]}"
    assert all(ejections), f"the stopped member was not ejected by both Envoys: {ejections}"


def test_the_leader_killed_mid_burst_across_two_envoys_runs_the_work_once(fleet, upstream, key):
    members, envoys = fleet
    leader = leader_of(members)
    n = 20
    threading.Timer(0.3, leader.kill).start()
    killed = time.monotonic() + 0.3
    results = burst(n, lambda i: call(envoys[i % 2], key, headers=SLOW))
    originals = [r for r in results if isinstance(r, Response) and r.status == 201
                 and r.header("idempotent-replayed") is None]
    assert upstream.count(key=key) == 1, "the work ran again"
    assert len(originals) == 1, f"{len(originals)} originals: {results}"
    replays = 0
    for resp in results:
        if resp is originals[0]:
            continue
        if isinstance(resp, Response) and resp.status == 201:
            assert_replay_of(resp, originals[0])
            replays += 1
        else:
            assert_refused(resp)
    _, recovered = first_success_after(envoys, f"{key}-after")
    print(f"leader killed 0.3 s into a burst of {n}: 1 original, {replays} replays, "
          f"{n - 1 - replays} refused; first new key ran {recovered - killed:.2f} s after the kill")
    # A retry of the refused ones now replays.
    for envoy in envoys:
        assert_replay_of(call(envoy, key, headers=SLOW), originals[0])
    assert upstream.count(key=key) == 1


def test_quorum_lost_applies_the_policy_within_the_timeout_and_service_resumes(fleet, upstream, key):
    members, envoys = fleet
    a, b = envoys
    before = call(a, key + "-before")
    assert_original(before)
    assert_replay_of(call(a, key + "-before"), before)  # a copy now in A's cache
    followers = [m for m in members if not m.is_leader()]
    for member in followers:
        member.stop()
    slowest = 0.0
    for n in range(6):
        started_at = time.monotonic()
        resp = call((a, b)[n % 2], f"{key}-lost-{n}")
        took = time.monotonic() - started_at
        slowest = max(slowest, took)
        assert_problem(resp, 503, "idempotency_store_unavailable")
        assert_retry_after(resp)
        assert took < QUORUM_LOST_S, f"answered after {took:.2f}s"
        assert upstream.count(key=f"{key}-lost-{n}") == 0
    print(f"quorum lost: new keys answered 503 within {slowest * 1000:.0f} ms")
    # What this Envoy holds a copy of still replays.
    assert_replay_of(call(a, key + "-before"), before)

    for member in followers:
        member.launch()
    for member in followers:
        member.wait_ready()
    resumed, _ = first_success_after(envoys, f"{key}-back")
    assert_original(resumed)
    assert upstream.count(key=key + "-before") == 1


def test_a_member_restarted_on_its_data_serves_the_records_made_while_it_was_away(
        started, fleet, upstream, key):
    members, (a, _) = fleet
    away = next(m for m in members if not m.is_leader())
    away.stop()
    # Until the stopped member is ejected, a request may be refused: its client's retry runs.
    made = {f"{key}-{n}": run_once(a, f"{key}-{n}") for n in range(5)}
    away.start()
    # It caught up on its own log: a local (serializable) read finds every record.
    def held():
        return len(away.range_prefix("idempotency/", serializable=True))
    deadline = time.monotonic() + 10
    while held() < len(made) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held() >= len(made)
    # Without the leader, the member that was away is one of the two that hold the quorum; new
    # Envoys (empty caches) replay every record.
    leader_of(members).stop()
    c, d = started.pair(upstream, members, fleet_config())
    for n, (name, original) in enumerate(made.items()):
        deadline = time.monotonic() + 15
        while True:
            resp = call((c, d)[n % 2], name)
            if resp.status == 201 or time.monotonic() > deadline:
                break
            assert_refused(resp)  # the election under way
            time.sleep(0.1)
        assert_replay_of(resp, original)
        assert upstream.count(key=name) == 1
