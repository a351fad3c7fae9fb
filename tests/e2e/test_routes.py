"""Per-route control (envoy/envoy-routes.yaml), in the real Envoy.

The shipped example turns the filter off on /webhooks/ with Envoy's generic per-route
FilterConfig (disabled: true), and its plugin configuration covers /v1/ except /v1/uploads/
(include_paths / exclude_paths) with require_key on. Duplicates execute twice where the filter
is off or the path is not covered, and are replayed where it is on.
"""

import uuid

import pytest

from support.shipped import ENVOY_DIR, load, localise, plugin_configuration, ShippedEnvoy

CONFIG = ENVOY_DIR / "envoy-routes.yaml"


@pytest.fixture(scope="module")
def envoy(run_dir, upstream):
    instance = ShippedEnvoy(run_dir / "routes", localise(load(CONFIG), upstream.port), upstream.port).start()
    yield instance
    instance.stop()


def twice(envoy, path, key):
    headers = {"authorization": "Bearer routes", "content-type": "application/json"}
    if key is not None:
        headers["idempotency-key"] = key
    return [envoy.request("POST", path, headers, b'{"n":1}') for _ in range(2)]


def assert_executed_twice(upstream, responses, path):
    for resp in responses:
        assert resp.status == 200, resp
        assert resp.header("idempotent-replayed") is None, resp
    assert responses[0].header("x-upstream-execution") != responses[1].header("x-upstream-execution")
    assert upstream.count(path=path.split("?")[0]) >= 2


def test_the_example_disables_the_filter_on_a_route_by_its_http_filter_name():
    config = load(CONFIG)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm_name = hcm["http_filters"][0]["name"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    off = [r for r in routes if "typed_per_filter_config" in r]
    assert [r["match"]["prefix"] for r in off] == ["/webhooks/"]
    assert off[0]["typed_per_filter_config"][wasm_name] == {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    assert plugin_configuration(config) == {
        "require_key": True, "include_paths": ["/v1/"], "exclude_paths": ["/v1/uploads/"]}


def test_duplicates_are_replayed_where_the_filter_is_on(envoy, upstream):
    key = f"routes-{uuid.uuid4()}"
    first, second = twice(envoy, "/v1/orders", key)
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    assert second.header("idempotent-replayed") == "true", second
    assert upstream.count(key=key) == 1


def test_a_route_with_the_filter_disabled_executes_duplicates_twice(envoy, upstream):
    key = f"routes-{uuid.uuid4()}"
    path = f"/webhooks/{key}"
    assert_executed_twice(upstream, twice(envoy, path, key), path)
    assert upstream.count(key=key) == 2


def test_the_filter_does_not_run_at_all_on_a_disabled_route(envoy, upstream):
    """require_key would answer 400 on any covered path; on the disabled route nothing does."""
    path = f"/webhooks/{uuid.uuid4()}"
    assert_executed_twice(upstream, twice(envoy, path, None), path)
    missing = envoy.request("POST", f"/v1/orders/{uuid.uuid4()}", {"authorization": "Bearer routes"}, b"{}")
    assert missing.status == 400 and missing.json()["code"] == "idempotency_key_missing", missing


@pytest.mark.parametrize("path", ["/v2/orders", "/v1/uploads/avatar", "/v1/uploads/avatar?part=1", "/v1"])
def test_paths_outside_include_paths_or_inside_exclude_paths_execute_duplicates_twice(envoy, upstream, path):
    key = f"routes-{uuid.uuid4()}"
    assert_executed_twice(upstream, twice(envoy, path, key), path)
    assert upstream.count(key=key) == 2
    # And require_key does not apply there either.
    assert envoy.request("POST", path, {"authorization": "Bearer routes"}, b"{}").status == 200


def test_an_exclusion_is_a_prefix_and_wins_only_under_it(envoy, upstream):
    """/v1/uploads-archive is under the inclusion /v1/ but not under the exclusion /v1/uploads/."""
    key = f"routes-{uuid.uuid4()}"
    first, second = twice(envoy, "/v1/uploads-archive", key)
    assert second.header("idempotent-replayed") == "true", second
    assert upstream.count(key=key) == 1
