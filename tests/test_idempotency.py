"""The wire behaviour of CONTRACT.md ("Which requests", "Matching", "Outcomes"), through a real
Envoy running the filter in front of the counting upstream. Every test checks what the client saw
and what the upstream executed."""

import http.client
import json
import threading
import time
import uuid

import pytest

from harness import Envoy, EnvoyError, burst
from upstream import binary_body

ORG_A = "Bearer ic_live_org_a"
ORG_B = "Bearer ic_live_org_b"
CUSTOMER = json.dumps({"externalId": "crm-7741", "fullName": "Jane Doe", "email": "jane@example.com"}).encode()

# Headers a replay may legitimately not repeat byte for byte: set per hop or per answer by Envoy.
NOT_REPLAYED = {"date", "x-envoy-upstream-service-time", "idempotent-replayed",
                "connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


# -- helpers ----------------------------------------------------------------------------

def call(envoy, key, body=CUSTOMER, path="/v1/customers", method="POST", auth=ORG_A, headers=(),
         key_header="idempotency-key"):
    """A covered request as the seed document shows it; the upstream answers 201 unless
    headers say otherwise. key=None sends no Idempotency-Key, auth=None no Authorization."""
    hdrs = [("content-type", "application/json"), ("x-test-status", "201")]
    if auth is not None:
        hdrs.append(("authorization", auth))
    if key is not None:
        hdrs.append((key_header, key))
    names = {name for name, _ in headers}
    hdrs = [(n, v) for n, v in hdrs if n not in names] + list(headers)
    return envoy.request(method, path, hdrs, body)


def comparable_headers(resp):
    out = {}
    for name, value in resp.headers:
        if name not in NOT_REPLAYED:
            out.setdefault(name, []).append(value)
    return out


def assert_original(resp, status=201):
    """An answer that came from an upstream execution, not a replay."""
    assert resp.status == status, f"{resp!r}"
    assert resp.header("idempotent-replayed") is None, f"{resp!r}"
    assert resp.header("x-upstream-execution") is not None, f"{resp!r}"


def assert_replay_of(replay, original):
    """The stored response verbatim: status, headers (Set-Cookie included), body byte for byte,
    plus idempotent-replayed: true."""
    assert replay.status == original.status, f"{replay!r}"
    assert replay.header_all("idempotent-replayed") == ["true"], f"{replay!r}"
    assert replay.body == original.body, f"replayed body differs: {len(replay.body)} vs {len(original.body)} bytes"
    assert comparable_headers(replay) == comparable_headers(original)


def assert_problem(resp, status, code):
    """An RFC 9457 problem answer with the contract's code."""
    assert resp.status == status, f"{resp!r}"
    content_type = (resp.header("content-type") or "").split(";")[0].strip()
    assert content_type == "application/problem+json", f"{resp!r}"
    doc = resp.json()
    assert doc["code"] == code, f"{doc!r}"
    assert doc["status"] == status, f"{doc!r}"
    assert isinstance(doc.get("detail"), str) and doc["detail"], f"{doc!r}"
    assert "title" in doc and "type" in doc, f"{doc!r}"
    assert resp.header("idempotent-replayed") is None, f"{resp!r}"
    return doc


def assert_retry_after(resp):
    value = resp.header("retry-after")
    assert value is not None and value.isdigit(), f"Retry-After must be delay-seconds, got {value!r}: {resp}"
    return int(value)


def wait_for(predicate, timeout=2.0):
    """Poll until predicate() is true (stats move after the answer is on the wire)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def stat_deltas(envoy, before, names):
    after = envoy.stats()
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


def unique_path(prefix="/v1/probe"):
    return f"{prefix}/{uuid.uuid4().hex}"


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


def test_client_error_answer_is_stored_and_replayed(envoy, upstream, key):
    original = call(envoy, key, headers=[("x-test-status", "422")])
    assert_original(original, 422)
    replay = call(envoy, key, headers=[("x-test-status", "422")])
    assert_replay_of(replay, original)
    assert upstream.count(key=key) == 1


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
def test_fingerprint_covers_every_byte_of_a_large_request_body(envoy, upstream, key, framing):
    body = binary_body(600 * 1024, key)
    changed = body[:-1] + bytes([body[-1] ^ 1])
    frame = (lambda b: [b[i:i + 65536] for i in range(0, len(b), 65536)]) if framing == "chunked" else bytes
    original = call(envoy, key, body=frame(body))
    assert_original(original)
    assert original.body == body
    assert upstream.executions(key=key)[0].body == body
    assert_replay_of(call(envoy, key, body=frame(body)), original)
    assert_problem(call(envoy, key, body=frame(changed)), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1


# -- conflicts -------------------------------------------------------------------------------

def test_different_body_is_conflict_and_leaves_record_untouched(envoy, upstream, key):
    original = call(envoy, key)
    assert_original(original)
    other = json.dumps({"externalId": "crm-7741", "fullName": "Janet Doe"}).encode()
    assert_problem(call(envoy, key, body=other), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1
    # The record still holds the first answer: the original request still replays it.
    assert_replay_of(call(envoy, key), original)
    assert_problem(call(envoy, key, body=other), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1


def test_changed_query_string_is_conflict(envoy, upstream, key):
    original = call(envoy, key, path="/v1/customers?source=crm")
    assert_original(original)
    assert_problem(call(envoy, key, path="/v1/customers?source=zapier"), 409, "idempotency_conflict")
    assert_problem(call(envoy, key, path="/v1/customers"), 409, "idempotency_conflict")
    assert_replay_of(call(envoy, key, path="/v1/customers?source=crm"), original)
    assert upstream.count(key=key) == 1


def test_different_body_while_original_in_flight_is_conflict(envoy, upstream, key):
    slow = [("x-test-delay-ms", "1000")]
    box = {}
    first = threading.Thread(target=lambda: box.setdefault("resp", call(envoy, key, headers=slow)))
    first.start()
    try:
        assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
        started = time.monotonic()
        conflict = call(envoy, key, body=b'{"externalId": "other"}', headers=slow)
        assert_problem(conflict, 409, "idempotency_conflict")
        assert time.monotonic() - started < 0.9, "a conflict must not wait for the original"
    finally:
        first.join()
    assert_original(box["resp"])
    assert_replay_of(call(envoy, key), box["resp"])
    assert upstream.count(key=key) == 1


# -- matching: the tuple (scope, method, path, key) -----------------------------------------

def test_method_path_and_authorization_scope_never_interfere(envoy, upstream, key):
    variants = [
        dict(method="POST", path="/v1/customers", auth=ORG_A),
        dict(method="PATCH", path="/v1/customers", auth=ORG_A),
        dict(method="POST", path="/v1/orders", auth=ORG_A),
        dict(method="POST", path="/v1/customers", auth=ORG_B),
    ]
    originals = [call(envoy, key, **v) for v in variants]
    for resp in originals:
        assert_original(resp)
    assert len({r.header("x-upstream-execution") for r in originals}) == 4
    for v, original in zip(variants, originals):
        assert_replay_of(call(envoy, key, **v), original)
    assert upstream.count(method="POST", path="/v1/customers", key=key) == 2
    assert upstream.count(method="POST", path="/v1/customers", key=key, header=("authorization", ORG_A)) == 1
    assert upstream.count(method="POST", path="/v1/customers", key=key, header=("authorization", ORG_B)) == 1
    assert upstream.count(method="PATCH", path="/v1/customers", key=key) == 1
    assert upstream.count(method="POST", path="/v1/orders", key=key) == 1
    assert upstream.count(key=key) == 4


# The configurable parts of request selection and matching, on one shared instance.
CUSTOM = {"scope_header": "x-org-id", "key_header": "x-request-key", "methods": ["POST", "PUT"],
          "unstored_statuses": ["5xx", 409]}


def test_configured_scope_header_alone_decides_the_scope(envoy_with, upstream, key):
    envoy = envoy_with(CUSTOM)
    org = lambda name: [("x-org-id", name)]  # noqa: E731
    first = call(envoy, key, key_header="x-request-key", auth=ORG_A, headers=org("org-1"))
    assert_original(first)
    assert_original(call(envoy, key, key_header="x-request-key", auth=ORG_A, headers=org("org-2")))
    # Same organization, another Authorization value: the same scope.
    assert_replay_of(call(envoy, key, key_header="x-request-key", auth=ORG_B, headers=org("org-1")), first)
    assert upstream.count(key=None, header=("x-request-key", key)) == 2
    # No scope header: passes untouched.
    for _ in range(2):
        assert_original(call(envoy, key, key_header="x-request-key", path="/v1/no-scope"))
    assert upstream.count(path="/v1/no-scope", header=("x-request-key", key)) == 2


def test_configured_methods_and_key_header_select_the_requests(envoy_with, upstream, key):
    envoy = envoy_with(CUSTOM)
    scoped = [("x-org-id", "org-1")]
    put = call(envoy, key, method="PUT", key_header="x-request-key", headers=scoped)
    assert_original(put)
    assert_replay_of(call(envoy, key, method="PUT", key_header="x-request-key", headers=scoped), put)
    assert upstream.count(method="PUT", header=("x-request-key", key)) == 1
    for _ in range(2):  # PATCH is no longer covered
        assert_original(call(envoy, key, method="PATCH", key_header="x-request-key", headers=scoped))
    assert upstream.count(method="PATCH", header=("x-request-key", key)) == 2
    for _ in range(2):  # Idempotency-Key is not the configured header: no key, passes untouched
        assert_original(call(envoy, key, method="POST", key_header="idempotency-key", headers=scoped))
    assert upstream.count(method="POST", key=key) == 2


def test_configured_unstored_statuses_decide_what_is_stored(envoy_with, upstream, key):
    envoy = envoy_with(CUSTOM)
    for status, stored in [(409, False), (500, False), (429, True)]:
        k = f"{key}-{status}"
        hdrs = [("x-org-id", "org-1"), ("x-test-status", str(status))]
        first = call(envoy, k, key_header="x-request-key", headers=hdrs)
        assert_original(first, status)
        again = call(envoy, k, key_header="x-request-key", headers=hdrs)
        if stored:
            assert_replay_of(again, first)
        else:
            assert_original(again, status)
        assert upstream.count(header=("x-request-key", k)) == (1 if stored else 2), status


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


def test_envoy_local_reply_for_down_upstream_is_not_stored(envoy_with, upstream_factory, key):
    probe = upstream_factory()
    port = probe.port
    probe.stop()  # nothing listens on port now
    envoy = envoy_with({}, upstream_port=port, fresh=True)

    for _ in range(2):  # released at once: the retry is not held as in progress
        down = call(envoy, key)
        assert down.status == 503, f"{down!r}"
        assert down.header("idempotent-replayed") is None, f"{down!r}"
        assert down.header("x-upstream-execution") is None, f"{down!r}"

    upstream = upstream_factory(port)
    resp = call(envoy, key)
    assert_original(resp)
    assert upstream.count(key=key) == 1
    assert_replay_of(call(envoy, key), resp)
    assert upstream.count(key=key) == 1


# -- the key ----------------------------------------------------------------------------------

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
}


@pytest.mark.parametrize("case", sorted(INVALID_KEYS))
def test_invalid_key_is_400_and_never_reaches_upstream(envoy, upstream, key, case):
    path = unique_path()
    resp = call(envoy, None, path=path, headers=INVALID_KEYS[case](key))
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


def test_request_without_scope_header_passes_untouched(envoy, upstream, key):
    before = envoy.stats()
    for _ in range(2):
        assert_original(call(envoy, key, auth=None))
    assert upstream.count(key=key) == 2
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.bypassed"])["idempotency.bypassed"] >= 2)


# -- bounds -------------------------------------------------------------------------------------

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


# -- stats --------------------------------------------------------------------------------------

def test_stats_count_each_outcome(envoy, upstream, key):
    names = ["idempotency.claimed", "idempotency.stored", "idempotency.replayed",
             "idempotency.conflict", "idempotency.key_invalid"]
    before = envoy.stats()
    original = call(envoy, key)
    assert_original(original)
    assert_replay_of(call(envoy, key), original)
    assert_replay_of(call(envoy, key), original)
    assert_problem(call(envoy, key, body=b"{}"), 409, "idempotency_conflict")
    assert_problem(call(envoy, None, headers=[("idempotency-key", "")]), 400, "idempotency_key_invalid")
    assert upstream.count(key=key) == 1
    expected = {"idempotency.claimed": 1, "idempotency.stored": 1, "idempotency.replayed": 2,
                "idempotency.conflict": 1, "idempotency.key_invalid": 1}
    wait_for(lambda: stat_deltas(envoy, before, names) == expected)
    assert stat_deltas(envoy, before, names) == expected


# -- waiting on an original in flight -------------------------------------------------------------

def _in_background(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()))
    thread.start()
    return thread, box


def test_duplicate_while_original_in_flight_waits_and_gets_the_replay(envoy, upstream, key):
    thread, box = _in_background(lambda: call(envoy, key, headers=[("x-test-delay-ms", "700")]))
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
    thread, box = _in_background(lambda: call(envoy, key, headers=[("x-test-delay-ms", "1500")]))
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


# -- bounds: store capacity and configuration ------------------------------------------------------

def _fill(envoy, n, prefix):
    keys = [f"{prefix}-{uuid.uuid4()}" for _ in range(n)]
    return keys, [call(envoy, k) for k in keys]


def test_full_store_with_reject_policy_answers_503_store_full(envoy_with, upstream):
    envoy = envoy_with({"capacity_records": 16, "when_full": "reject"})
    before = envoy.stats()
    keys, answers = _fill(envoy, 48, "full")
    accepted = [(k, a) for k, a in zip(keys, answers) if a.status == 201]
    refused = [(k, a) for k, a in zip(keys, answers) if a.status != 201]
    assert 1 <= len(accepted) <= 16, f"{len(accepted)} records stored with capacity_records 16"
    assert refused, "the store never filled up"
    for k, a in refused:
        assert_problem(a, 503, "store_full")
        assert_retry_after(a)
        assert upstream.count(key=k) == 0
    for k, a in accepted:  # what was stored is still served
        assert_original(a)
        assert_replay_of(call(envoy, k), a)
        assert upstream.count(key=k) == 1
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.store_full"])["idempotency.store_full"]
                    >= len(refused))


def test_full_store_with_pass_policy_forwards_without_idempotency(envoy_with, upstream):
    envoy = envoy_with({"capacity_records": 16, "when_full": "pass"})
    before = envoy.stats()
    keys, answers = _fill(envoy, 48, "pass")
    for k, a in zip(keys, answers):
        assert_original(a)
        assert upstream.count(key=k) == 1
    # The last key could not be recorded: its duplicate runs the work again rather than failing.
    assert_original(call(envoy, keys[-1]))
    assert upstream.count(key=keys[-1]) == 2
    assert wait_for(lambda: stat_deltas(envoy, before, ["idempotency.store_full"])["idempotency.store_full"] >= 1)


def test_store_never_holds_more_records_than_capacity_records(envoy_with, upstream):
    envoy = envoy_with({"capacity_records": 4, "when_full": "reject"})
    keys, answers = _fill(envoy, 12, "cap")
    stored = [k for k, a in zip(keys, answers) if a.status == 201]
    assert 1 <= len(stored) <= 4, f"{len(stored)} records stored with capacity_records 4"


@pytest.mark.parametrize("config,field", [
    ({"ttl": "soon"}, "ttl"),
    ({"tll": "1s"}, "tll"),
    ({"when_full": "drop"}, "when_full"),
    ({"max_wait": -1}, "max_wait"),
])
def test_bad_configuration_is_refused_at_load_naming_the_field(run_dir, upstream, config, field):
    envoy = Envoy(run_dir, config, upstream.port)
    try:
        with pytest.raises(EnvoyError):
            envoy.start()
    finally:
        envoy.stop()
    lines = [line for line in envoy.log_text().splitlines()
             if "[wasm]" in line and ("[error]" in line or "[critical]" in line)]
    assert any(f"`{field}`" in line or f'"{field}"' in line or f" {field}" in line for line in lines), \
        "no error line names the field:\n" + "\n".join(lines)
