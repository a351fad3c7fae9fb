"""CONTRACT.md "Outcomes": first execution, verbatim replay, what is stored and what is released,
waiting on an original in flight, leases, TTL and responses too large to store."""

import http.client
import time

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, assert_retry_after, wait_for
from support.client import CUSTOMER, ORG_A, burst, call, in_background
from support.upstream import binary_body


# -- first call and replay ----------------------------------------------------------------

def test_first_request_executes_once_and_answers_from_upstream(envoy, upstream, key):
    resp = call(envoy, key)
    assert_original(resp)
    assert resp.body == CUSTOMER
    assert upstream.count(method="POST", path="/v1/customers", key=key) == 1
    assert upstream.executions(key=key)[0].body == CUSTOMER


def test_replay_is_verbatim_with_cookies_and_does_not_reach_upstream(envoy, upstream, key):
    cookies = [("x-test-set-cookie", "session=abc123; Path=/; HttpOnly"),
               ("x-test-set-cookie", "tracking=xyz; Max-Age=3600; Secure")]
    original = call(envoy, key, headers=[("x-test-status", "201")] + cookies)
    assert_original(original)
    assert original.header_all("set-cookie") == ["session=abc123; Path=/; HttpOnly",
                                                 "tracking=xyz; Max-Age=3600; Secure"]
    for _ in range(2):
        replay = call(envoy, key, headers=cookies)
        assert_replay_of(replay, original)
        assert replay.header("x-upstream-execution") == original.header("x-upstream-execution")
    assert upstream.count(key=key) == 1
    # A second later, the replay still carries the original's Date: the time the work ran.
    time.sleep(1.1)
    assert call(envoy, key, headers=cookies).header("date") == original.header("date")


def test_large_binary_response_is_replayed_byte_for_byte(envoy, upstream, key):
    size = 200 * 1024
    hdrs = [("x-test-status", "200"), ("x-test-body-bytes", str(size)), ("x-test-body-seed", key)]
    original = call(envoy, key, headers=hdrs)
    assert_original(original, 200)
    assert original.body == binary_body(size, key)
    replay = call(envoy, key, headers=hdrs)
    assert_replay_of(replay, original)
    assert replay.body == binary_body(size, key)
    assert upstream.count(key=key) == 1


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("status", [204, 201, 200])
def test_a_response_without_a_body_is_replayed_with_its_headers(envoy, upstream, key, status, http2):
    # The upstream echoes the request's (empty) body and its content-type.
    request = dict(body=b"", headers=[("x-test-status", str(status)), ("content-type", "text/plain")],
                   http2=http2)
    original = call(envoy, key, **request)
    assert_original(original, status)
    assert (original.header("content-type"), original.body) == ("text/plain", b"")
    replay = call(envoy, key, **request)
    assert_replay_of(replay, original)
    assert replay.header("content-type") == "text/plain"
    assert upstream.count(key=key) == 1


def test_client_error_answer_is_stored_and_replayed(envoy, upstream, key):
    original = call(envoy, key, headers=[("x-test-status", "422")])
    assert_original(original, 422)
    replay = call(envoy, key, headers=[("x-test-status", "422")])
    assert_replay_of(replay, original)
    assert upstream.count(key=key) == 1


# -- what is stored and what is released ----------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 408, 425, 429])
def test_unstored_status_is_not_stored_and_retry_executes_again(envoy, upstream, key, status):
    failed = call(envoy, key, headers=[("x-test-status", str(status))])
    assert_original(failed, status)
    retry = call(envoy, key, headers=[("x-test-status", str(status))])
    assert_original(retry, status)
    assert upstream.count(key=key) == 2
    # Once the work succeeds, that answer is the one kept.
    success = call(envoy, key)
    assert_original(success)
    assert_replay_of(call(envoy, key), success)
    assert upstream.count(key=key) == 3


# -- concurrency and expiry ---------------------------------------------------------------------

def test_burst_of_identical_requests_executes_exactly_once(envoy, upstream, key):
    slow = [("x-test-delay-ms", "1000")]
    answers = burst(20, lambda i: call(envoy, key, headers=slow))
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, f"{errors!r}"
    assert upstream.count(key=key) == 1

    originals = [a for a in answers if a.status == 201 and a.header("idempotent-replayed") is None]
    assert len(originals) == 1, f"{answers!r}"
    original = originals[0]
    replays = in_progress = 0
    for a in answers:
        if a is original:
            continue
        if a.status == 409:
            assert_problem(a, 409, "idempotency_in_progress")
            assert_retry_after(a)
            in_progress += 1
        else:
            assert_replay_of(a, original)
            replays += 1
    assert replays + in_progress == 19
    # After the burst, the record is complete: the next duplicate is a replay.
    assert_replay_of(call(envoy, key, headers=slow), original)
    assert upstream.count(key=key) == 1


def test_record_expires_after_ttl_and_work_runs_again(envoy_with, upstream, key):
    envoy = envoy_with({"ttl": "1s"})
    first = call(envoy, key)
    assert_original(first)
    assert_replay_of(call(envoy, key), first)
    assert upstream.count(key=key) == 1
    time.sleep(2.0)
    second = call(envoy, key)
    assert_original(second)
    assert second.header("x-upstream-execution") != first.header("x-upstream-execution")
    assert upstream.count(key=key) == 2
    assert_replay_of(call(envoy, key), second)
    assert upstream.count(key=key) == 2


# -- waiting on an original in flight -------------------------------------------------------------

def test_duplicate_while_original_in_flight_waits_and_gets_the_replay(envoy, upstream, key):
    thread, box = in_background(lambda: call(envoy, key, headers=[("x-test-delay-ms", "700")]))
    try:
        assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
        duplicate = call(envoy, key)
    finally:
        thread.join()
    assert_original(box["result"])
    assert_replay_of(duplicate, box["result"])
    assert upstream.count(key=key) == 1


def test_duplicate_waiting_past_max_wait_gets_409_in_progress(envoy_with, upstream, key):
    envoy = envoy_with({"max_wait": "250ms"})
    thread, box = in_background(lambda: call(envoy, key, headers=[("x-test-delay-ms", "1500")]))
    try:
        assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
        started = time.monotonic()
        duplicate = call(envoy, key)
        waited = time.monotonic() - started
    finally:
        thread.join()
    assert_problem(duplicate, 409, "idempotency_in_progress")
    assert_retry_after(duplicate)
    assert 0.2 <= waited < 1.2, f"answered after {waited:.2f}s with max_wait 250ms"
    assert_original(box["result"])
    assert_replay_of(call(envoy, key), box["result"])
    assert upstream.count(key=key) == 1


# -- endings with an unknown outcome hold the claim for its lease -----------------------------------

LEASE_S = 2.0


def _end_by_upstream_timeout(envoy, key):
    resp = call(envoy, key, headers=[("x-test-delay-ms", "1500")])  # the route timeout is 1s
    assert resp.status == 504, f"{resp!r}"


def _end_by_upstream_reset(envoy, key):
    resp = call(envoy, key, headers=[("x-test-reset", "before-headers")])
    assert resp.status == 503, f"{resp!r}"


def _end_by_client_leaving(envoy, key):
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
    conn.request("POST", "/v1/customers", CUSTOMER, {
        "content-type": "application/json", "authorization": ORG_A, "idempotency-key": key,
        "x-test-status": "201", "x-test-delay-ms": "1500"})
    time.sleep(0.3)
    conn.close()


UNKNOWN_ENDINGS = {
    "upstream_timeout": _end_by_upstream_timeout,
    "upstream_reset": _end_by_upstream_reset,
    "client_gone": _end_by_client_leaving,
}


@pytest.mark.parametrize("ending", sorted(UNKNOWN_ENDINGS))
def test_unknown_outcome_holds_claim_until_lease_ends(envoy_with, upstream, key, ending):
    envoy = envoy_with({"lease": "2s"}, route_timeout="1s")
    UNKNOWN_ENDINGS[ending](envoy, key)
    assert wait_for(lambda: upstream.count(key=key) == 1)
    first_at = upstream.executions(key=key)[0].at
    # Until the lease ends, duplicates get 409 in_progress (or wait and take over at its end);
    # the work never runs a second time early.
    answers = []
    while time.monotonic() < first_at + LEASE_S + 3:
        resp = call(envoy, key)
        answers.append(resp)
        if resp.status != 409:
            break
        assert_problem(resp, 409, "idempotency_in_progress")
        assert 0 <= assert_retry_after(resp) <= LEASE_S + 1, f"{resp!r}"
        assert upstream.count(key=key) == 1
        time.sleep(0.25)
    retry = answers[-1]
    assert_original(retry)
    assert upstream.count(key=key) == 2
    second_at = upstream.executions(key=key)[1].at
    assert second_at - first_at >= LEASE_S - 0.3, f"executed again {second_at - first_at:.2f}s after the first"
    assert_replay_of(call(envoy, key), retry)
    assert upstream.count(key=key) == 2


def test_lease_zero_releases_unknown_outcome_at_once(envoy_with, upstream, key):
    envoy = envoy_with({"lease": "0s"}, route_timeout="1s")
    _end_by_upstream_timeout(envoy, key)
    retry = call(envoy, key)
    assert_original(retry)
    assert upstream.count(key=key) == 2


# -- a response too large to store -------------------------------------------------------------------

def test_response_over_limit_reaches_client_and_duplicates_get_409_not_stored(envoy_with, upstream, key):
    envoy = envoy_with({"max_request_body_bytes": 1024, "max_response_body_bytes": 2048})
    hdrs = [("x-test-status", "200"), ("x-test-body-bytes", "8192"), ("x-test-body-seed", key)]
    resp = call(envoy, key, headers=hdrs)
    assert_original(resp, 200)
    assert resp.body == binary_body(8192, key)
    assert_problem(call(envoy, key, headers=hdrs), 409, "idempotency_response_not_stored")
    assert upstream.count(key=key) == 1
