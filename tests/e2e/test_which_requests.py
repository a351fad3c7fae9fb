"""CONTRACT.md "Which requests": the covered methods, the key's syntax, require_key, the scope
header and the request body limit. Each test checks what the client saw and what the upstream
executed."""


import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, stat_deltas, wait_for
from support.client import CUSTOMER, ORG_A, call, unique_path


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
