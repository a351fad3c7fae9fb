"""The README's "What is guaranteed", for matching: a record belongs to (organisation, method,
path, key), one key is one record over either protocol, and "the same request" also means the
same fingerprint (query string and body bytes). Exactly one execution and verbatim replay are
test_outcomes.py's."""

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
