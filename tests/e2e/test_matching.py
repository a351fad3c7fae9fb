"""Matching that survives real clients, in a real Envoy: with ``fingerprint: "json"`` a retry that
re-serialises its JSON (or form) body replays while a changed value still conflicts; with
``fingerprint_ignore`` a fresh timestamp does not count; with ``key_from_body`` a webhook
redelivered without a key header replays by the event id in its body. Each test asserts what the
client saw and how many times the upstream ran the work, over HTTP/1.1 and HTTP/2.
"""

import json

import pytest

from support.checks import assert_original, assert_problem, assert_replay_of, assert_stat_deltas
from support.client import ORG_A, call, unique_path
from support.envoy import Envoy, route_to

JSON = {"fingerprint": "json", "fingerprint_ignore": ["/sent_at", "/meta/request_id"]}
WEBHOOKS = {"key_from_body": "/id", "scope_header": "user-agent", "fingerprint": "json"}
PROVIDER = [("user-agent", "Provider-Webhooks/1.0"), ("x-test-status", "200")]
HTTP = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])

ORDER = {"amount": 1250, "currency": "eur", "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
         "note": "caf\u00e9", "sent_at": "2026-12-07T09:00:00Z", "meta": {"request_id": "r-1", "source": "app"}}


def reserialised(document, **changes):
    """``document`` as another client library writes it: members reversed, other whitespace,
    non-ASCII escaped, integers as doubles; ``changes`` replace members first."""
    def rewrite(value):
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in reversed(list(value.items()))}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    return json.dumps(rewrite({**document, **changes}), indent=3, ensure_ascii=True).encode()


def compact(document):
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


@HTTP
def test_a_reserialised_json_retry_replays_and_a_changed_value_conflicts(envoy_with, upstream, key, http2):
    envoy = envoy_with(JSON)
    path = unique_path()
    original = call(envoy, key, body=compact(ORDER), path=path, http2=http2)
    assert_original(original)
    retry = reserialised(ORDER, sent_at="2026-12-07T09:00:05Z", meta={"request_id": "r-2", "source": "app"})
    assert_replay_of(call(envoy, key, body=retry, path=path, http2=http2), original)
    for changed in [reserialised(ORDER, amount=1251), reserialised(ORDER, items=ORDER["items"][::-1]),
                    reserialised(ORDER, currency=None), reserialised(ORDER, meta={"request_id": "r-1"})]:
        assert_problem(call(envoy, key, body=changed, path=path, http2=http2), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1
    assert upstream.executions(key=key)[0].body == compact(ORDER), "the upstream gets the body as sent"


def test_with_bytes_the_default_a_reserialised_retry_conflicts(envoy, upstream, key):
    original = call(envoy, key, body=compact(ORDER))
    assert_original(original)
    assert_problem(call(envoy, key, body=reserialised(ORDER)), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1


@HTTP
def test_a_form_body_with_its_parameters_reordered_and_reencoded_replays(envoy_with, upstream, key, http2):
    envoy = envoy_with(JSON)
    form = [("content-type", "application/x-www-form-urlencoded")]
    original = call(envoy, key, body=b"amount=1250&currency=eur&description=A+caf%C3%A9&sent_at=1",
                    headers=form, http2=http2)
    assert_original(original)
    retry = b"sent_at=2&description=A%20caf%c3%a9&currency=eur&amount=1250"
    assert_replay_of(call(envoy, key, body=retry, headers=form, http2=http2), original)
    changed = b"amount=1350&currency=eur&description=A+caf%C3%A9"
    assert_problem(call(envoy, key, body=changed, headers=form, http2=http2), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1


@pytest.mark.parametrize("content_type,body", [
    ("text/plain", b"amount=1"),
    ("application/json", b'{"amount": 1,'),
    ("application/json", b'{"a": 1, "a": 2}'),
    ("application/json", b"[" * (1 << 20)),
], ids=["other-type", "invalid", "member-twice", "a-mebibyte-of-nesting"])
def test_a_body_with_no_canonical_form_goes_upstream_fingerprinted_by_its_bytes(envoy_with, upstream, key,
                                                                                content_type, body):
    envoy = envoy_with(JSON)
    before = envoy.stats()
    headers = [("content-type", content_type)]
    original = call(envoy, key, body=body, headers=headers)
    assert_original(original)
    assert_replay_of(call(envoy, key, body=body, headers=headers), original)
    assert_problem(call(envoy, key, body=body[:-1] + b" ", headers=headers), 409, "idempotency_conflict")
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {"idempotency.fingerprinted_as_bytes": 3})


@HTTP
def test_a_webhook_redelivered_without_a_key_header_replays_by_the_event_id_in_its_body(envoy_with, upstream,
                                                                                     http2):
    envoy = envoy_with(WEBHOOKS)
    path = unique_path("/v1/webhooks")
    event = {"id": f"evt_{path.rsplit('/', 1)[-1]}", "type": "invoice.paid", "data": {"amount": 1250}}
    first = call(envoy, None, auth=None, body=compact(event), path=path, headers=PROVIDER, http2=http2)
    assert_original(first, 200)
    redelivery = reserialised(event)
    assert_replay_of(call(envoy, None, auth=None, body=redelivery, path=path, headers=PROVIDER, http2=http2),
                     first)
    other = {**event, "id": event["id"] + "b"}
    assert_original(call(envoy, None, auth=None, body=compact(other), path=path, headers=PROVIDER, http2=http2),
                    200)
    assert upstream.count(path=path) == 2


def test_a_body_without_its_key_is_a_request_without_one(envoy_with, upstream):
    envoy = envoy_with(WEBHOOKS)
    path = unique_path("/v1/webhooks")
    for body, headers in [(b'{"type": "ping"}', []), (b"id=evt_1", [("content-type", "text/plain")]),
                          (b'{"id": "evt_1",', [])]:
        for _ in range(2):
            assert_original(call(envoy, None, auth=None, body=body, path=path, headers=PROVIDER + headers), 200)
    assert upstream.count(path=path) == 6, "each ran: nothing held them to one record"

    strict = envoy_with({**WEBHOOKS, "require_key": True})
    problem = assert_problem(call(strict, None, auth=None, body=b'{"type": "ping"}', path=path, headers=PROVIDER),
                             400, "idempotency_key_missing")
    assert "/id" in problem["detail"]
    for bad in [b'{"id": {"nested": 1}}', b'{"id": ""}', b'{"id": "%s"}' % (b"k" * 256)]:
        assert_problem(call(strict, None, auth=None, body=bad, path=path, headers=PROVIDER),
                       400, "idempotency_key_invalid")
    assert upstream.count(path=path) == 6


def test_routes_choose_their_own_matching_while_their_neighbours_keep_bytes(run_dir, upstream, key):
    routes = [route_to("/v1/webhooks/", {"key_from_body": "/id", "scope_header": "user-agent"}),
              route_to("/v1/orders/", {"fingerprint": "json", "fingerprint_ignore": ["/sent_at"]})]
    envoy = Envoy(run_dir / "matching-routes", {"route_metadata": True}, upstream.port, routes=routes).start()
    try:
        original = call(envoy, key, body=compact(ORDER), path="/v1/orders/1")
        assert_replay_of(call(envoy, key, body=reserialised(ORDER, sent_at="later"), path="/v1/orders/1"),
                         original)
        assert_original(call(envoy, key, body=compact(ORDER), path="/v1/customers"))
        assert_problem(call(envoy, key, body=reserialised(ORDER), path="/v1/customers"),
                       409, "idempotency_conflict")
        event = compact({"id": f"evt-{key}", "type": "invoice.paid"})
        first = call(envoy, None, auth=None, body=event, path="/v1/webhooks/in", headers=PROVIDER)
        assert_replay_of(call(envoy, None, auth=None, body=event, path="/v1/webhooks/in", headers=PROVIDER), first)
        assert upstream.count(path="/v1/webhooks/in") == 1
    finally:
        envoy.stop()
