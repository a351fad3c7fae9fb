"""The README's "Outcomes and failure modes", in a real Envoy with two workers in front of the
counting upstream: which requests are covered and what a bad one gets, the first execution and
its verbatim replay, what is stored and what is released, bursts of duplicates and bounded
waiting, take-over of a released claim, the endings whose outcome is unknown (held for the lease)
or known (released at once), TTL and leases, and a response too large to store. Each test checks
what the clients saw, what the upstream executed, and where it matters the counters that moved."""

import time

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_retry_after,
                            assert_stat_deltas, stat_deltas, wait_for)
from support.client import (CUSTOMER, ORG_A, burst, call, in_background, send_and_vanish, timed,
                            tolerant_request, unique_path)
from support.envoy import worker_connections
from support.processes import free_port
from support.upstream import binary_body, ScriptedUpstream


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


# -- which requests: the key, the scope, the methods, the body --------------------------------------

def test_key_of_255_visible_ascii_chars_is_accepted(envoy, upstream, key):
    long_key = f"{key} ~!#$%&'()*+,-./:;<=>?@[]^_`{{|}}".ljust(255, "k")
    assert len(long_key) == 255
    original = call(envoy, long_key)
    assert_original(original)
    assert upstream.executions(key=long_key)[0].key == long_key
    assert_replay_of(call(envoy, long_key), original)
    assert upstream.count(key=long_key) == 1


INVALID_KEYS = {
    "256_chars": lambda k: [("idempotency-key", k.ljust(256, "k"))],
    "empty": lambda k: [("idempotency-key", "")],
    "tab_control_char": lambda k: [("idempotency-key", f"{k}\tx".encode())],
    "non_ascii": lambda k: [("idempotency-key", f"{k}-caf\u00e9".encode())],
    "header_twice": lambda k: [("idempotency-key", k), ("idempotency-key", k)],
    "only_spaces": lambda k: [("idempotency-key", "   ")],
}


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("case", sorted(INVALID_KEYS))
def test_invalid_key_is_400_and_never_reaches_upstream(envoy, upstream, key, case, http2):
    path = unique_path()
    resp = call(envoy, None, path=path, headers=INVALID_KEYS[case](key), http2=http2)
    assert_problem(resp, 400, "idempotency_key_invalid")
    assert upstream.count(path=path) == 0


def test_missing_key_passes_untouched_by_default(envoy, upstream):
    path = unique_path()
    for _ in range(2):
        assert_original(call(envoy, None, path=path))
    assert upstream.count(method="POST", path=path) == 2


def test_require_key_answers_400_when_key_missing(envoy_with, upstream, key):
    envoy = envoy_with({"require_key": True})
    path = unique_path()
    assert_problem(call(envoy, None, path=path), 400, "idempotency_key_missing")
    assert_problem(call(envoy, None, path=path, method="PATCH"), 400, "idempotency_key_missing")
    assert upstream.count(path=path) == 0
    # With a key it works as usual, and uncovered methods still need none.
    original = call(envoy, key, path=path)
    assert_original(original)
    assert_replay_of(call(envoy, key, path=path), original)
    assert envoy.request("GET", path, {"authorization": ORG_A}).status == 200
    assert upstream.count(method="POST", path=path) == 1
    assert upstream.count(method="GET", path=path) == 1


@pytest.mark.parametrize("method,body", [("GET", None), ("PUT", CUSTOMER), ("DELETE", None)])
def test_uncovered_method_with_key_passes_untouched(envoy, upstream, key, method, body):
    answers = [call(envoy, key, method=method, body=body, headers=[("x-test-status", "200")]) for _ in range(2)]
    for resp in answers:
        assert_original(resp, 200)
        assert resp.body == (body or b"")
    assert answers[0].header("x-upstream-execution") != answers[1].header("x-upstream-execution")
    assert upstream.count(method=method, key=key) == 2


# (scope header, its value or None for absent, over HTTP/2): a blank value names no organisation.
NO_SCOPE = {
    "absent": ("authorization", None, False),
    "empty": ("authorization", "", False),
    "whitespace_over_http2": ("authorization", " \t ", True),
    "configured_header_blank_over_http2": ("x-org-id", "  ", True),
}


@pytest.mark.parametrize("case", sorted(NO_SCOPE))
def test_request_without_a_scope_passes_untouched(envoy_with, upstream, key, case):
    scope_header, value, http2 = NO_SCOPE[case]
    envoy = envoy_with({} if scope_header == "authorization" else {"scope_header": scope_header})
    scope = [] if value is None else [(scope_header, value)]
    before = envoy.stats()
    for _ in range(2):
        assert_original(call(envoy, key, auth=None, headers=scope, http2=http2))
    assert upstream.count(key=key) == 2
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.bypassed"])["idempotency.bypassed"] >= 2)


# -- the request body ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1025, 64 * 1024])
def test_request_body_over_limit_is_413_and_never_reaches_upstream(envoy_with, upstream, key, size):
    envoy = envoy_with({"max_request_body_bytes": 1024, "max_response_body_bytes": 2048})
    assert_problem(call(envoy, key, body=b"x" * size), 413, "request_too_large")
    assert upstream.count(key=key) == 0
    # A request at the limit goes through, with the same key: the refusal kept no claim.
    original = call(envoy, key, body=b"y" * 1024)
    assert_original(original)
    assert original.body == b"y" * 1024
    assert_replay_of(call(envoy, key, body=b"y" * 1024), original)
    assert upstream.count(key=key) == 1


def test_default_request_body_limit_is_1_mib_with_a_problem_answer(envoy, upstream, key):
    limit = 1024 * 1024
    assert_problem(call(envoy, key, body=b"z" * (limit + 1)), 413, "request_too_large")
    assert upstream.count(key=key) == 0
    original = call(envoy, key, body=b"z" * limit, headers=[("x-test-body-bytes", "16")])
    assert_original(original)
    assert upstream.executions(key=key)[0].body == b"z" * limit
    assert_replay_of(call(envoy, key, body=b"z" * limit, headers=[("x-test-body-bytes", "16")]), original)
    assert upstream.count(key=key) == 1


# -- first call and replay ----------------------------------------------------------------------

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
    # After the burst, the record is complete: the next duplicate is a replay.
    assert_replay_of(call(envoy, key, headers=slow(1500)), original)
    assert upstream.count(key=key) == 1


# -- waiting is bounded --------------------------------------------------------------------------

def test_duplicates_waiting_past_max_wait_get_503_in_progress_with_retry_after(envoy_with, upstream, key):
    envoy = envoy_with({"max_wait": "300ms"})
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(2000)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"

    duplicates = burst(3, lambda i: timed(lambda: call(envoy, key)))

    for resp, took in duplicates:
        assert_problem(resp, 503, "idempotency_in_progress")
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


def test_duplicates_beyond_max_waiting_get_503_in_progress_at_once(envoy_with, upstream, key):
    envoy = envoy_with({"max_waiting": 1})  # one waiting request per worker
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(2500)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"

    duplicates = burst(8, lambda i: timed(lambda: call(envoy, key)))

    turned_away = [(r, t) for r, t in duplicates if r.status == 503]
    waited = [r for r, _ in duplicates if r.status != 503]
    assert 1 <= len(waited) <= 2, f"{len(waited)} waited with max_waiting 1 on 2 workers: {duplicates!r}"
    for resp, took in turned_away:
        assert_problem(resp, 503, "idempotency_in_progress")
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
    503 in_progress with the lease's remainder in Retry-After); a client that honours Retry-After
    gets the work run on its next try; that answer is then the record."""
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.held"])["idempotency.held"] == 1), \
        f"the claim was not held: {stat_deltas(envoy, before, ['idempotency.held', 'idempotency.released'])}"
    assert upstream.count(key=key) == 1
    first_at = upstream.executions(key=key)[0].at

    retry = call(envoy, key)
    assert_problem(retry, 503, "idempotency_in_progress")
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


def test_duplicates_waiting_on_an_original_that_ends_held_get_503_with_the_lease_remainder(
        envoy_with, upstream, key):
    envoy = envoy_with({"lease": "4s"}, route_timeout="1s")
    before = envoy.stats()
    thread, box = in_background(lambda: call(envoy, key, headers=slow(1500)))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
    first_at = upstream.executions(key=key)[0].at

    duplicates = burst(3, lambda i: timed(lambda: call(envoy, key)))

    assert answer_of(thread, box).status == 504
    for resp, took in duplicates:
        assert_problem(resp, 503, "idempotency_in_progress")
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


# -- a response too large to store ----------------------------------------------------------------

def test_response_over_the_limit_reaches_its_client_whole_and_a_retry_gets_409_not_stored(
        envoy_with, upstream, key):
    envoy = envoy_with({"max_response_body_bytes": 1024})
    before = envoy.stats()
    big = [("x-test-body-bytes", "4096"), ("x-test-body-seed", key)]

    first = call(envoy, key, headers=big)

    assert_original(first)
    assert first.body == binary_body(4096, key)
    retry = call(envoy, key, headers=big)
    assert_problem(retry, 409, "idempotency_response_not_stored")
    assert retry.header("retry-after") is None
    # The record is kept without its response: a different request under the key still conflicts.
    assert_problem(call(envoy, key, body=b'{"other": true}'), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {
        "idempotency.claimed": 1, "idempotency.response_too_large": 1, "idempotency.stored": 0,
        "idempotency.response_not_stored": 1, "idempotency.conflict": 1})
