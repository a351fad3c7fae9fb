"""Concurrency and failure endings (CONTRACT.md "Outcomes"), in a real Envoy with two workers in
front of the counting upstream: bursts of duplicates, bounded waiting, take-over of a released
claim, and the endings whose outcome is unknown (held for the lease) or known (released at once).
Every test checks what the clients saw, what the upstream executed, and the counters that moved."""

import time

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_retry_after,
                            assert_stat_deltas, stat_deltas, wait_for)
from support.client import burst, call, in_background, send_and_vanish, timed, tolerant_request
from support.envoy import worker_connections
from support.processes import free_port
from support.upstream import ScriptedUpstream

LEASE_S = 2.0
LEASED = {"lease": "2s"}  # with route_timeout="1s": endings with an unknown outcome come fast


@pytest.fixture(scope="module")
def upstream():
    """The counting test upstream, with per-key scripted statuses (x-test-status-sequence)."""
    up = ScriptedUpstream().start()
    yield up
    up.stop()


def slow(ms):
    return [("x-test-delay-ms", str(ms))]


def answer_of(thread, box):
    thread.join()
    assert "error" not in box, f"{box['error']!r}"
    return box["result"]


# -- a burst of identical requests -----------------------------------------------------------------

def test_burst_of_30_identical_requests_runs_once_and_every_client_gets_the_original_answer(
        envoy_with, upstream, key):
    envoy = envoy_with({})
    before, workers_before = envoy.stats(), worker_connections(envoy)

    answers = burst(30, lambda i: call(envoy, key, headers=slow(1500)))

    assert not [a for a in answers if isinstance(a, Exception)], f"{answers!r}"
    assert upstream.count(key=key) == 1
    originals = [a for a in answers if a.header("idempotent-replayed") is None]
    assert len(originals) == 1, f"{answers!r}"
    original = originals[0]
    assert_original(original)
    for answer in answers:
        if answer is not original:
            assert_replay_of(answer, original)
    # Every duplicate waited for the original (none was turned away), on both workers.
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 1, "idempotency.stored": 1, "idempotency.waited": 29,
        "idempotency.replayed": 29, "idempotency.in_progress": 0, "idempotency.taken_over": 0})
    workers_after = worker_connections(envoy)
    busy = [w for w in workers_after if workers_after[w] > workers_before.get(w, 0)]
    assert len(busy) == 2, f"the burst did not reach both workers: {workers_before} -> {workers_after}"


# -- waiting is bounded --------------------------------------------------------------------------

def test_duplicates_waiting_past_max_wait_get_409_in_progress_with_retry_after(envoy_with, upstream, key):
    envoy = envoy_with({"max_wait": "300ms"})
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(2000)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"

    duplicates = burst(3, lambda i: timed(lambda: call(envoy, key)))

    for resp, took in duplicates:
        assert_problem(resp, 409, "idempotency_in_progress")
        assert 1 <= assert_retry_after(resp) <= 60, f"{resp!r}"
        assert 0.25 <= took < 1.5, f"answered after {took:.2f}s with max_wait 300ms"
    assert upstream.count(key=key) == 1
    original = answer_of(thread, box)
    assert_original(original)
    assert_replay_of(call(envoy, key), original)
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 1, "idempotency.waited": 3, "idempotency.in_progress": 3,
        "idempotency.stored": 1, "idempotency.replayed": 1})


def test_duplicates_beyond_max_waiting_get_409_in_progress_at_once(envoy_with, upstream, key):
    envoy = envoy_with({"max_waiting": 1})  # one waiting request per worker
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(2500)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"

    duplicates = burst(8, lambda i: timed(lambda: call(envoy, key)))

    turned_away = [(r, t) for r, t in duplicates if r.status == 409]
    waited = [r for r, _ in duplicates if r.status != 409]
    assert 1 <= len(waited) <= 2, f"{len(waited)} waited with max_waiting 1 on 2 workers: {duplicates!r}"
    for resp, took in turned_away:
        assert_problem(resp, 409, "idempotency_in_progress")
        assert_retry_after(resp)
        assert took < 1.2, f"turned away only after {took:.2f}s: not at once"
    original = answer_of(thread, box)
    assert_original(original)
    for resp in waited:
        assert_replay_of(resp, original)
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 1, "idempotency.waited": len(waited),
        "idempotency.in_progress": len(turned_away), "idempotency.replayed": len(waited)})


# -- endings with an unknown outcome hold the claim until its lease ends ------------------------------

def assert_held_until_the_lease_ends(envoy, upstream, key, before):
    """After an ending with an unknown outcome: no second execution within the lease (a retry gets
    409 in_progress with the lease's remainder in Retry-After); a client that honours Retry-After
    gets the work run on its next try; that answer is then the record."""
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.held"])["idempotency.held"] == 1), \
        f"the claim was not held: {stat_deltas(envoy, before, ['idempotency.held', 'idempotency.released'])}"
    assert upstream.count(key=key) == 1
    first_at = upstream.executions(key=key)[0].at

    retry = call(envoy, key)
    assert_problem(retry, 409, "idempotency_in_progress")
    seconds = assert_retry_after(retry)
    remainder = first_at + LEASE_S - time.monotonic()
    assert 1 <= seconds <= LEASE_S and seconds >= remainder - 0.1, \
        f"Retry-After {seconds} for a lease ending in {remainder:.2f}s"
    assert upstream.count(key=key) == 1

    time.sleep(seconds)
    again = call(envoy, key)
    assert_original(again)
    assert upstream.count(key=key) == 2
    second_at = upstream.executions(key=key)[1].at
    assert second_at - first_at >= LEASE_S - 0.25, f"ran again {second_at - first_at:.2f}s after the first"
    assert_replay_of(call(envoy, key), again)
    assert upstream.count(key=key) == 2
    assert_stat_deltas(envoy, before, {
        "idempotency.held": 1, "idempotency.released": 0, "idempotency.in_progress": 1,
        "idempotency.claimed": 2, "idempotency.stored": 1, "idempotency.replayed": 1})


def test_client_gone_mid_flight_holds_the_claim_until_the_lease_ends(envoy_with, upstream, key):
    envoy = envoy_with(LEASED, route_timeout="1s")
    before = envoy.stats()
    send_and_vanish(envoy.port, key, headers=slow(800), linger_s=0.3)
    assert_held_until_the_lease_ends(envoy, upstream, key, before)


@pytest.mark.parametrize("reset", ["before-headers", "after-headers"])
def test_upstream_reset_holds_the_claim_until_the_lease_ends(envoy_with, upstream, key, reset):
    envoy = envoy_with(LEASED, route_timeout="1s")
    before = envoy.stats()
    resp, complete = tolerant_request(envoy.port, key, headers=[("x-test-reset", reset)])
    if reset == "before-headers":
        assert resp.status == 503 and resp.header("x-upstream-execution") is None, f"{resp!r}"
    else:  # the client got the headers and part of the body, then the connection was cut
        assert resp.status == 201 and not complete, f"{resp!r} complete={complete}"
    assert_held_until_the_lease_ends(envoy, upstream, key, before)


def test_upstream_past_the_route_timeout_holds_the_claim_until_the_lease_ends(envoy_with, upstream, key):
    envoy = envoy_with(LEASED, route_timeout="1s")
    before = envoy.stats()
    resp = call(envoy, key, headers=slow(1500))
    assert resp.status == 504, f"{resp!r}"
    assert_held_until_the_lease_ends(envoy, upstream, key, before)


def test_duplicates_waiting_on_an_original_that_ends_held_get_409_with_the_lease_remainder(
        envoy_with, upstream, key):
    envoy = envoy_with({"lease": "4s"}, route_timeout="1s")
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(1500)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
    first_at = upstream.executions(key=key)[0].at

    duplicates = burst(3, lambda i: timed(lambda: call(envoy, key)))

    assert answer_of(thread, box).status == 504
    for resp, took in duplicates:
        assert_problem(resp, 409, "idempotency_in_progress")
        # Answered when the original timed out (1s), not after max_wait (10s); told to come back
        # when the lease (4s from the claim) ends, about 3s later.
        assert took < 2.5, f"answered after {took:.2f}s"
        assert 2 <= assert_retry_after(resp) <= 4, f"{resp!r}"
    assert time.monotonic() - first_at < 4
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 1, "idempotency.held": 1, "idempotency.waited": 3,
        "idempotency.in_progress": 3, "idempotency.taken_over": 0})


def test_client_gone_with_lease_zero_releases_so_the_retry_runs_at_once(envoy_with, upstream, key):
    envoy = envoy_with({"lease": "0s"}, route_timeout="1s")
    before = envoy.stats()
    send_and_vanish(envoy.port, key, headers=slow(800), linger_s=0.3)
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.released"])["idempotency.released"] == 1)

    retry, took = timed(lambda: call(envoy, key))

    assert_original(retry)
    assert took < 1.0, f"the retry took {took:.2f}s"
    assert upstream.count(key=key) == 2
    assert_replay_of(call(envoy, key), retry)
    assert upstream.count(key=key) == 2
    assert_stat_deltas(envoy, before, {
        "idempotency.released": 1, "idempotency.held": 0, "idempotency.claimed": 2,
        "idempotency.stored": 1, "idempotency.in_progress": 0})


# -- endings known not to have run the work release the claim at once -----------------------------------

def test_upstream_down_releases_the_claim_and_the_retry_runs_once_it_is_up(envoy_with, upstream_factory, key):
    port = free_port()
    envoy = envoy_with({}, upstream_port=port)
    before = envoy.stats()
    for _ in range(2):  # not held: each retry goes to the (still down) upstream again
        down = call(envoy, key)
        assert down.status == 503, f"{down!r}"
        assert down.header("x-upstream-execution") is None, f"{down!r}"
        assert down.header("idempotent-replayed") is None, f"{down!r}"

    up = upstream_factory(port)
    retry = call(envoy, key)

    assert_original(retry)
    assert up.count(key=key) == 1
    assert_replay_of(call(envoy, key), retry)
    assert up.count(key=key) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.released": 2, "idempotency.held": 0, "idempotency.claimed": 3,
        "idempotency.stored": 1, "idempotency.replayed": 1})


def test_original_failing_with_503_is_taken_over_by_exactly_one_waiting_duplicate(envoy_with, upstream, key):
    envoy = envoy_with({})
    before = envoy.stats()
    script = [("x-test-status-sequence", "503,201")] + slow(1000)  # first execution 503, then 201

    answers = burst(10, lambda i: call(envoy, key, headers=script))

    assert not [a for a in answers if isinstance(a, Exception)], f"{answers!r}"
    assert upstream.count(key=key) == 2
    failed = [a for a in answers if a.status == 503]
    assert len(failed) == 1, f"{answers!r}"
    assert_original(failed[0], status=503)
    taken_over = [a for a in answers if a.status == 201 and a.header("idempotent-replayed") is None]
    assert len(taken_over) == 1, f"{answers!r}"
    assert_original(taken_over[0])
    replays = [a for a in answers if a is not failed[0] and a is not taken_over[0]]
    assert len(replays) == 8
    for resp in replays:
        assert_replay_of(resp, taken_over[0])
    first, second = upstream.executions(key=key)
    assert second.at - first.at >= 0.9, "the take-over ran before the original ended"
    assert_replay_of(call(envoy, key), taken_over[0])
    assert upstream.count(key=key) == 2
    assert_stat_deltas(envoy, before, {
        "idempotency.waited": 9, "idempotency.taken_over": 1, "idempotency.released": 1,
        "idempotency.claimed": 2, "idempotency.stored": 1, "idempotency.replayed": 9,
        "idempotency.in_progress": 0})


# -- short TTL and lease ------------------------------------------------------------------------

def test_record_replays_within_a_1s_ttl_and_the_work_runs_again_after(envoy_with, upstream, key):
    envoy = envoy_with({"ttl": "1s"})
    before = envoy.stats()
    first, took = timed(lambda: call(envoy, key))
    assert_original(first)
    assert_replay_of(call(envoy, key), first)
    assert upstream.count(key=key) == 1

    time.sleep(1.2)
    second = call(envoy, key)

    assert_original(second)
    assert second.header("x-upstream-execution") != first.header("x-upstream-execution")
    assert upstream.count(key=key) == 2
    assert_replay_of(call(envoy, key), second)
    assert upstream.count(key=key) == 2
    assert_stat_deltas(envoy, before, {"idempotency.claimed": 2, "idempotency.stored": 2,
                                       "idempotency.replayed": 2})


def test_claim_expires_with_its_lease_and_the_late_owner_does_not_replace_the_record(envoy_with, upstream, key):
    envoy = envoy_with({"lease": "1s"})
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(1800)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
    first_at = upstream.executions(key=key)[0].at

    # Waits for the original; when the lease runs out, takes the claim over and runs the work.
    duplicate = call(envoy, key)

    assert_original(duplicate)
    assert upstream.count(key=key) == 2
    assert upstream.executions(key=key)[1].at - first_at >= 0.9
    late = answer_of(thread, box)
    assert_original(late)  # the slow original still reaches its own client
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.lease_expired"])["idempotency.lease_expired"] == 1)
    replay = call(envoy, key)
    assert_replay_of(replay, duplicate)
    assert replay.header("x-upstream-execution") != late.header("x-upstream-execution")
    assert upstream.count(key=key) == 2
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 2, "idempotency.waited": 1, "idempotency.taken_over": 1,
        "idempotency.lease_expired": 1, "idempotency.stored": 1, "idempotency.replayed": 1})
