"""docs/giving-up.md, run for real: the API document's first scenario (a
client that gives up mid-write, then its retry loop with the same key), through the router (the
default) and with outlive_client, where the work outlives its client."""

import time
import uuid

import pytest

from support.checks import (assert_original, assert_problem, assert_replay_of, assert_retry_after,
                            assert_stat_deltas)
from support.client import burst, call, send_and_vanish
from support.envoy import Envoy, route_to
from support.retry_loop import compact, run_retry_loop

CUSTOMER = {"externalId": "crm-7741", "fullName": "Jane Doe", "email": "jane@example.com"}
BODY = compact(CUSTOMER)
# The upstream works 1.5 s; the client gives up after 0.5 s (a Lambda timeout, say).
WORK = ("x-test-delay-ms", "1500")
GIVES_UP_AFTER_S = 0.5
OUTLIVE = {"outlive_client": {}}


def give_up(envoy, key, headers=(WORK,)):
    send_and_vanish(envoy.port, key, headers=list(headers), body=BODY, linger_s=GIVES_UP_AFTER_S)


def test_through_the_router_the_loop_gives_up_by_throwing_and_the_work_ran_once(envoy, upstream, key):
    """Envoy resets the upstream request when its client leaves; the upstream did the work all
    the same, so the claim is held for its lease, and the loop retries 503 in_progress until it
    gives up: it never returns the problem as if it were the customer."""
    give_up(envoy, key)
    outcome = run_retry_loop(envoy.port, key, CUSTOMER)
    assert outcome.get("threw") == "Gave up after 5 attempts", outcome
    assert [seen["status"] for seen in outcome["seen"]] == [503] * 5, outcome
    assert all('"idempotency_in_progress"' in seen["body"] and int(seen["retryAfter"]) > 40
               for seen in outcome["seen"]), outcome
    assert upstream.count(key=key) == 1


def test_with_outlive_client_the_loop_returns_the_original_answer_and_the_work_ran_once(
        envoy_with, upstream, key):
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    give_up(envoy, key)
    outcome = run_retry_loop(envoy.port, key, CUSTOMER)
    assert outcome.get("returned") == CUSTOMER, outcome
    assert [(seen["status"], seen["replayed"]) for seen in outcome["seen"]] == [(201, "true")], outcome
    assert upstream.count(key=key) == 1
    assert_stat_deltas(envoy, before, {"idempotency.sent_from_root": 1, "idempotency.outlived_client": 1,
                                       "idempotency.stored": 1, "idempotency.waited": 1,
                                       "idempotency.replayed": 1})


def test_many_clients_giving_up_on_one_key_run_the_work_once(envoy_with, upstream, key):
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    burst(8, lambda _: give_up(envoy, key))
    assert_stat_deltas(envoy, before, {"idempotency.sent_from_root": 1, "idempotency.stored": 1})
    retry = call(envoy, key, body=BODY)
    assert retry.status == 201 and retry.header("idempotent-replayed") == "true", retry
    assert retry.body == BODY
    time.sleep(0.2)
    assert upstream.count(key=key) == 1


def test_an_upstream_5xx_after_its_client_left_is_released_so_the_retry_runs_the_work(
        envoy_with, upstream, key):
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    give_up(envoy, key, headers=(WORK, ("x-test-status", "503")))
    assert_stat_deltas(envoy, before, {"idempotency.released": 1, "idempotency.outlived_client": 1})
    retry = call(envoy, key, body=BODY)
    assert_original(retry)
    assert upstream.count(key=key) == 2


def test_an_upstream_reset_after_its_client_left_holds_the_claim(envoy_with, upstream, key):
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    give_up(envoy, key, headers=(WORK, ("x-test-reset", "before-headers")))
    assert_stat_deltas(envoy, before, {"idempotency.held": 1, "idempotency.outlived_client": 1})
    retry = call(envoy, key, body=BODY)
    assert_problem(retry, 503, "idempotency_in_progress")
    assert assert_retry_after(retry) > 50
    assert upstream.count(key=key) == 1


def test_a_client_that_stays_gets_the_original_as_through_the_router(envoy_with, upstream, key):
    routed = call(envoy_with({}), key, body=BODY, headers=[("x-test-set-cookie", "s=1")])
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    other_key = f"{key}-outlive"
    original = call(envoy, other_key, body=BODY, headers=[("x-test-set-cookie", "s=1")])
    assert_original(original)
    assert (original.status, original.body, original.header_all("set-cookie")) == \
        (routed.status, routed.body, routed.header_all("set-cookie"))
    assert_replay_of(call(envoy, other_key, body=BODY), original)
    assert upstream.count(key=other_key) == 1
    assert_stat_deltas(envoy, before, {"idempotency.sent_from_root": 1, "idempotency.outlived_client": 0})


# -- which routes: the route's metadata -----------------------------------------------------------

# /v1/marked (outlive_client: true, its own 1s timeout), /v1/router (false), /v1/slow (a timeout
# longer than the lease allows), and every other path (nothing said).
SENDING_ROUTES = [route_to("/v1/marked", {"outlive_client": True, "timeout": "1s"}),
                  route_to("/v1/router", {"outlive_client": False}),
                  route_to("/v1/slow", {"outlive_client": True, "timeout": "90s"}, name="slow")]


@pytest.fixture
def routes_envoy(run_dir, upstream):
    envoys = []

    def start(routes):
        envoy = Envoy(run_dir, {"outlive_client": {"routes": routes}}, upstream.port,
                      routes=SENDING_ROUTES).start()
        envoys.append(envoy)
        return envoy

    yield start
    for envoy in envoys:
        envoy.stop()


def sent_from_root(envoy, path, headers=()):
    """Whether a covered request to ``path`` went upstream from the root context."""
    before = envoy.counter("idempotency.sent_from_root")
    response = call(envoy, f"route-{uuid.uuid4()}", path=path, headers=list(headers))
    return response, envoy.counter("idempotency.sent_from_root") - before == 1


def test_routes_marked_sends_only_from_the_routes_that_say_so_with_their_own_timeout(routes_envoy):
    envoy = routes_envoy("marked")
    assert sent_from_root(envoy, "/v1/customers")[1] is False
    assert sent_from_root(envoy, "/v1/router")[1] is False
    response, from_root = sent_from_root(envoy, "/v1/marked", headers=[("x-test-delay-ms", "2000")])
    assert from_root and response.status == 504, response
    # A route whose own timeout would outlast the claim is misconfigured: never sent at all.
    response, from_root = sent_from_root(envoy, "/v1/slow")
    assert not from_root
    doc = assert_problem(response, 500, "idempotency_route_misconfigured")
    assert "`slow`" in doc["detail"] and "`timeout`" in doc["detail"], doc


def test_routes_all_sends_from_every_route_but_those_that_say_no(routes_envoy):
    envoy = routes_envoy("all")
    assert sent_from_root(envoy, "/v1/customers")[1] is True
    assert sent_from_root(envoy, "/v1/router")[1] is False


def test_an_answer_over_max_response_body_bytes_is_not_brought_back_but_its_work_ran(
        envoy_with, upstream, key):
    envoy = envoy_with({"outlive_client": {}, "max_response_body_bytes": 1024})
    first = call(envoy, key, body=BODY, headers=[("x-test-body-bytes", "4096")])
    assert_problem(first, 502, "idempotency_response_too_large")
    assert_problem(call(envoy, key, body=BODY), 409, "idempotency_response_not_stored")
    assert upstream.count(key=key) == 1


def test_clients_leaving_just_as_their_answers_come_never_reach_a_torn_down_stream(
        envoy_with, upstream):
    """Each client leaves about when its answer comes back: the answer must still end its claim,
    and never be sent to a stream Envoy is tearing down (that would crash the VM)."""
    envoy = envoy_with(OUTLIVE)
    before = envoy.stats()
    keys = [f"leaving-{uuid.uuid4()}" for _ in range(160)]

    def leave_about_when_answered(i):
        send_and_vanish(envoy.port, keys[i], headers=[("x-test-delay-ms", "50")], body=BODY,
                        linger_s=0.045 + (i % 10) / 1000)

    for start in range(0, len(keys), 16):
        burst(16, lambda i: leave_about_when_answered(start + i))
    assert_stat_deltas(envoy, before, {"idempotency.sent_from_root": len(keys),
                                       "idempotency.stored": len(keys)})
    assert "panicked" not in envoy.log_text()
    for key in keys[:: len(keys) // 8]:
        replay = call(envoy, key, body=BODY, headers=[("x-test-delay-ms", "50")])
        assert replay.header("idempotent-replayed") == "true", replay
