"""CONTRACT.md "Matching": a record belongs to (scope, method, path, key), and "the same request"
also means the same fingerprint (query string and body bytes)."""

import json
import threading
import time

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, wait_for
from support.client import ORG_A, ORG_B, call
from support.upstream import binary_body


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


def test_one_key_is_one_record_over_http1_and_http2_whatever_the_whitespace(envoy, upstream, key):
    # HTTP/2 passes the values as sent; HTTP/1.1 trims them before the filter sees them.
    executed = upstream.total
    original = call(envoy, f"  {key} ", auth=f"\t{ORG_A}  ", http2=True)
    assert_original(original)
    assert_replay_of(call(envoy, key), original)
    assert_replay_of(call(envoy, f" {key}\t", auth=f" {ORG_A}", http2=True), original)
    assert upstream.total == executed + 1


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
