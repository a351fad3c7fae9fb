"""A policy per route: one listener, many APIs, each route's metadata (filter_metadata.idempotency)
overriding the listener's fields for its requests, while its neighbours keep the listener's.

The listener sets ``route_metadata: true`` and otherwise the defaults (24 h ttl, 60 s lease, 10 s
max_wait, 503 in progress, 409 conflict). Each route below overrides one thing; ``/v1/`` (the
catch-all route, ``default``) says nothing and is the neighbour every test compares with.
"""

import json
import time
import uuid

import pytest
from jsonschema import Draft202012Validator

from support.checks import assert_original, assert_problem, assert_replay_of, assert_stat_deltas, wait_for
from support.client import ORG_A, call, in_background, send_and_vanish
from support.envoy import Envoy, envoy_config, route_to
from support.processes import ROOT
from support.shipped import ENVOY_DIR, load

ROUTES = [
    route_to("/short/", {"ttl": "2s"}),
    route_to("/quick-lease/", {"lease": "1s"}),
    route_to("/strict/", {"require_key": True}),
    route_to("/search/", {"enabled": False}),
    route_to("/ietf/", {"max_wait": "0s", "in_progress_status": 409, "conflict_status": 422}),
    route_to("/puts/", {"methods": ["PUT"]}),
    route_to("/lenient/", {"unstored_statuses": []}),
    route_to("/keyed/", {"key_header": "x-request-key", "scope_header": "x-tenant"}),
    route_to("/small/", {"max_request_body_bytes": 16}),
    # Metadata the filter cannot follow, one of each kind.
    route_to("/bad-value/", {"ttl": "soon"}, name="bad-value"),
    route_to("/bad-field/", {"tll": "1h"}, name="bad-field"),
    route_to("/store-wide/", {"methods": ["PUT"], "capacity_records": 10}, name="store-wide"),
]


@pytest.fixture(scope="module")
def routes_envoy(run_dir, upstream):
    envoy = Envoy(run_dir / "routes", {"route_metadata": True}, upstream.port, routes=ROUTES).start()
    yield envoy
    envoy.stop()


def fresh_key():
    return f"route-{uuid.uuid4()}"


def twice(envoy, path, key, **kwargs):
    return call(envoy, key, path=path, **kwargs), call(envoy, key, path=path, **kwargs)


def test_a_route_s_ttl_ends_its_records_while_the_neighbours_keep_theirs(routes_envoy, upstream):
    short, long = fresh_key(), fresh_key()
    first = call(routes_envoy, short, path="/short/orders")
    assert_replay_of(call(routes_envoy, short, path="/short/orders"), first)
    kept = call(routes_envoy, long, path="/v1/orders")
    time.sleep(2.2)
    assert_original(call(routes_envoy, short, path="/short/orders"))
    assert upstream.count(key=short) == 2
    assert_replay_of(call(routes_envoy, long, path="/v1/orders"), kept)
    assert upstream.count(key=long) == 1


def test_a_route_s_lease_frees_a_claim_whose_outcome_is_unknown_sooner(routes_envoy, upstream):
    """A client that leaves mid-flight leaves its claim held for the lease: 1 s on the route, 60 s
    on its neighbour, where the retry is still told the work is in progress."""
    quick, default = fresh_key(), fresh_key()
    # The upstream answers after 2 s, long after its client has gone (0.3 s), however busy the
    # machine: the claim's outcome is unknown, and it is held.
    for key, path in [(quick, "/quick-lease/orders"), (default, "/v1/orders")]:
        send_and_vanish(routes_envoy.port, key, headers=[("x-test-delay-ms", "2000")], path=path)
        assert wait_for(lambda: upstream.count(key=key) == 1)
    time.sleep(1.5)
    assert_original(call(routes_envoy, quick, path="/quick-lease/orders"))
    assert upstream.count(key=quick) == 2
    assert_problem(call(routes_envoy, default, path="/v1/orders"), 503, "idempotency_in_progress")
    assert upstream.count(key=default) == 1


def test_require_key_on_one_route_only(routes_envoy, upstream):
    assert_problem(call(routes_envoy, None, path="/strict/payments"), 400, "idempotency_key_missing")
    assert_original(call(routes_envoy, None, path="/v1/payments"))


def test_a_disabled_route_passes_its_requests_untouched(routes_envoy, upstream):
    key = fresh_key()
    before = routes_envoy.stats()
    first, second = twice(routes_envoy, "/search/customers", key)
    assert_original(first)
    assert_original(second)
    assert upstream.count(key=key) == 2
    assert_stat_deltas(routes_envoy, before, {"idempotency.claimed": 0, "idempotency.bypassed": 0})


def test_max_wait_and_in_progress_status_on_one_route(routes_envoy, upstream):
    """The route's duplicate is answered 409 at once (max_wait 0s); the neighbour's waits for
    its original and replays it."""
    for path, duplicate_answer in [("/ietf/orders", 409), ("/v1/orders", None)]:
        key = fresh_key()
        original, box = in_background(lambda: call(routes_envoy, key, path=path,
                                                   headers=[("x-test-delay-ms", "800")]))
        assert wait_for(lambda: upstream.count(key=key) == 1)
        duplicate = call(routes_envoy, key, path=path, headers=[("x-test-delay-ms", "800")])
        original.join()
        if duplicate_answer is None:
            assert_replay_of(duplicate, box["result"])
        else:
            assert_problem(duplicate, duplicate_answer, "idempotency_in_progress")
        assert upstream.count(key=key) == 1


def test_conflict_status_on_one_route(routes_envoy, upstream):
    for path, status in [("/ietf/orders", 422), ("/v1/orders", 409)]:
        key = fresh_key()
        assert_original(call(routes_envoy, key, path=path))
        assert_problem(call(routes_envoy, key, path=path, body=b'{"other": 1}'), status,
                       "idempotency_conflict")


def test_methods_on_one_route(routes_envoy, upstream):
    put, post = fresh_key(), fresh_key()
    first, replay = twice(routes_envoy, "/puts/items", put, method="PUT")
    assert_replay_of(replay, first)
    for resp in twice(routes_envoy, "/puts/items", post):
        assert_original(resp)
    assert upstream.count(key=post) == 2
    neighbour = fresh_key()
    for resp in twice(routes_envoy, "/v1/items", neighbour, method="PUT"):
        assert_original(resp)


def test_unstored_statuses_on_one_route(routes_envoy, upstream):
    """The route stores every status, a 500 included; its neighbour releases a 500's claim so
    that the retry runs."""
    failing = [("x-test-status", "500")]
    stored = fresh_key()
    first, replay = twice(routes_envoy, "/lenient/jobs", stored, headers=failing)
    assert first.status == 500 and upstream.count(key=stored) == 1
    assert_replay_of(replay, first)
    released = fresh_key()
    twice(routes_envoy, "/v1/jobs", released, headers=failing)
    assert upstream.count(key=released) == 2


def test_key_and_scope_headers_on_one_route(routes_envoy, upstream):
    key = fresh_key()
    tenant = [("x-tenant", "acme")]
    first = call(routes_envoy, key, path="/keyed/orders", key_header="x-request-key", headers=tenant)
    assert_replay_of(call(routes_envoy, key, path="/keyed/orders", key_header="x-request-key",
                          headers=tenant), first)
    other_tenant = call(routes_envoy, key, path="/keyed/orders", key_header="x-request-key",
                        headers=[("x-tenant", "globex")])
    assert_original(other_tenant)
    # On the neighbour the same headers mean nothing: no Idempotency-Key, so no idempotency.
    for resp in twice(routes_envoy, "/v1/orders", key, key_header="x-request-key"):
        assert_original(resp)


def test_request_body_limit_on_one_route(routes_envoy, upstream):
    assert_problem(call(routes_envoy, fresh_key(), path="/small/orders"), 413, "request_too_large")
    assert_original(call(routes_envoy, fresh_key(), path="/v1/orders"))


@pytest.mark.parametrize("path,route,field", [
    ("/bad-value/orders", "bad-value", "ttl"),
    ("/bad-field/orders", "bad-field", "tll"),
    ("/store-wide/orders", "store-wide", "capacity_records"),
])
def test_a_misconfigured_route_refuses_its_covered_requests_naming_route_and_field(
        routes_envoy, upstream, path, route, field):
    key = fresh_key()
    method = "PUT" if route == "store-wide" else "POST"  # that route's own methods read
    before = routes_envoy.stats()
    for resp in twice(routes_envoy, path, key, method=method):
        doc = assert_problem(resp, 500, "idempotency_route_misconfigured")
        assert f"`{route}`" in doc["detail"] and f"`{field}`" in doc["detail"], doc
    assert upstream.count(key=key) == 0, "a request its route meant to protect never runs unprotected"
    assert_stat_deltas(routes_envoy, before, {"idempotency.route_misconfigured": 2})
    assert f"route `{route}`" in routes_envoy.log_text()
    # A request the route does not cover is not the filter's business.
    assert routes_envoy.request("GET", path).status == 200


def test_a_misconfigured_route_is_logged_at_most_once_a_minute(routes_envoy, upstream):
    before = routes_envoy.stats()
    for _ in range(6):
        call(routes_envoy, fresh_key(), path="/bad-value/orders")
    assert_stat_deltas(routes_envoy, before, {"idempotency.route_misconfigured": 6})
    # Every refusal is counted; the warning naming the route comes at most once a minute from
    # each of the two workers.
    lines = routes_envoy.log_text().count("route `bad-value`: invalid configuration")
    assert 1 <= lines <= 2, lines


def test_keyless_requests_of_a_misconfigured_route_are_refused_too(routes_envoy, upstream):
    """The route might have meant require_key: a keyless request is not let through either."""
    before = upstream.count(path="/bad-field/orders")
    resp = routes_envoy.request("POST", "/bad-field/orders", {"authorization": ORG_A}, b"{}")
    assert_problem(resp, 500, "idempotency_route_misconfigured")
    assert upstream.count(path="/bad-field/orders") == before


# -- a route policy changed in a running Envoy (RDS) ---------------------------------------------

class RdsEnvoy(Envoy):
    """The test bootstrap, but with its routes delivered by RDS from a file Envoy watches, so that
    a route's metadata can change in the running process (`load_routes`)."""

    def __init__(self, workdir, upstream_port, routes):
        super().__init__(workdir, {"route_metadata": True}, upstream_port, routes=routes)
        self.rds_dir = self.workdir / "rds"

    def write_routes(self):
        route_config = envoy_config(self.upstream_port, {}, None, routes=self.routes)
        hcm = route_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        resource = {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                    **hcm["typed_config"]["route_config"]}
        self.rds_dir.mkdir(parents=True, exist_ok=True)
        staged = self.rds_dir / "rds.json.next"
        staged.write_text(json.dumps({"resources": [resource]}))
        staged.rename(self.rds_dir / "rds.json")  # a move, which the watch sees as one change

    def bootstrap(self):
        config = super().bootstrap()
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        del hcm["route_config"]
        self.write_routes()
        hcm["rds"] = {"route_config_name": "local", "config_source": {"path_config_source": {
            "path": str(self.rds_dir / "rds.json"), "watched_directory": {"path": str(self.rds_dir)}}}}
        config["node"] = {"id": "rds-test", "cluster": "rds-test"}
        return config

    def load_routes(self, routes):
        """Delivers the routes again, and waits until Envoy took them."""
        before = self.counter("http.ingress.rds.local.update_success")
        self.routes = list(routes)
        self.write_routes()
        assert wait_for(lambda: self.counter("http.ingress.rds.local.update_success") > before, 10)


def test_a_route_policy_changed_by_rds_applies_to_new_records_and_live_ones_keep_theirs(
        run_dir, upstream):
    """The route's ttl goes from 1h to 2s: a record stored before keeps the 1h it was stored with,
    one stored after lives 2s. Disabled, the route runs its duplicates; misconfigured, it refuses
    them; enabled again, the record stored first still replays."""
    envoy = RdsEnvoy(run_dir / "rds", upstream.port, [route_to("/v1/", {"ttl": "1h"})]).start()
    try:
        before, after = fresh_key(), fresh_key()
        first = call(envoy, before, path="/v1/orders")
        envoy.load_routes([route_to("/v1/", {"ttl": "2s"})])
        second = call(envoy, after, path="/v1/orders")
        assert_replay_of(call(envoy, after, path="/v1/orders"), second)
        time.sleep(2.2)
        assert_original(call(envoy, after, path="/v1/orders"))
        assert_replay_of(call(envoy, before, path="/v1/orders"), first)

        envoy.load_routes([route_to("/v1/", {"enabled": False})])
        assert_original(call(envoy, before, path="/v1/orders"))
        envoy.load_routes([route_to("/v1/", {"ttl": "soon"})])
        assert_problem(call(envoy, before, path="/v1/orders"), 500, "idempotency_route_misconfigured")
        envoy.load_routes([route_to("/v1/", {"ttl": "1h"})])
        assert_replay_of(call(envoy, before, path="/v1/orders"), first)
        assert upstream.count(key=before) == 2, "once at first, once while the route was disabled"
        assert envoy.counter("idempotency.store_error") == 0
    finally:
        envoy.stop()


# -- Istio: envoy/istio/route-policy.yaml -----------------------------------------------------------

ISTIO_ROUTES = ENVOY_DIR / "istio" / "route-policy.yaml"
SCHEMA = json.loads((ROOT / "config.schema.json").read_text())
ROUTE_POLICY = Draft202012Validator(SCHEMA).evolve(schema=SCHEMA["$defs"]["route_policy"])


def istio_route_patches():
    """{route name: the metadata the EnvoyFilter merges into it}."""
    manifest = load(ISTIO_ROUTES)
    assert (manifest["apiVersion"], manifest["kind"]) == ("networking.istio.io/v1alpha3", "EnvoyFilter")
    assert manifest["spec"]["workloadSelector"] == load(ENVOY_DIR / "istio" / "envoyfilter.yaml")["spec"]["workloadSelector"]
    patches = {}
    for patch in manifest["spec"]["configPatches"]:
        assert patch["applyTo"] == "HTTP_ROUTE" and patch["patch"]["operation"] == "MERGE", patch
        assert patch["match"]["context"] == "GATEWAY", patch
        name = patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        assert set(patch["patch"]["value"]) == {"metadata"}, patch
        patches[name] = patch["patch"]["value"]["metadata"]
    return patches


def test_the_istio_route_policies_are_route_policies_by_the_schema():
    patches = istio_route_patches()
    assert set(patches) == {"payments", "exports", "search", "events"}
    for name, metadata in patches.items():
        assert list(metadata["filter_metadata"]) == ["idempotency"], name
        errors = [e.message for e in ROUTE_POLICY.iter_errors(metadata["filter_metadata"]["idempotency"])]
        assert errors == [], (name, errors)
    assert "route_metadata" in ISTIO_ROUTES.read_text(), "it says what the filter's configuration needs"


def test_the_istio_route_policies_merged_into_routes_run_as_they_say(run_dir, upstream):
    """Each patch merged into a route of its name (as Istio's MERGE does), behind a listener
    with route_metadata: true."""
    routes = []
    for name, metadata in istio_route_patches().items():
        route = route_to(f"/v1/{name}", name=name)
        route["metadata"] = metadata
        routes.append(route)
    envoy = Envoy(run_dir / "istio-routes", {"route_metadata": True}, upstream.port, routes=routes).start()
    try:
        assert_problem(call(envoy, None, path="/v1/payments"), 400, "idempotency_key_missing")
        key = fresh_key()
        assert_original(call(envoy, key, path="/v1/exports"))
        assert_problem(call(envoy, key, path="/v1/exports", body=b'{"other": 1}'), 422, "idempotency_conflict")
        searched = fresh_key()
        for resp in twice(envoy, "/v1/search", searched):
            assert_original(resp)
        assert upstream.count(key=searched) == 2
        provider = [("user-agent", "Provider-Webhooks/1.0")]
        event = f'{{"id": "evt-{fresh_key()}", "type": "invoice.paid"}}'.encode()
        delivered = call(envoy, None, auth=None, body=event, path="/v1/events", headers=provider)
        assert_replay_of(call(envoy, None, auth=None, body=event.replace(b": ", b":"), path="/v1/events",
                              headers=provider), delivered)
        assert upstream.count(path="/v1/events") == 1
        assert envoy.counter("idempotency.route_misconfigured") == 0
    finally:
        envoy.stop()
