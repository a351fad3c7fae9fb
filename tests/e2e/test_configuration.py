"""The README's "Configuration".

- config.schema.json as editors and CI use it: tests/config_schema.rs checks it against the
  filter's parser (fields, examples, defaults, bounds, and the shared cases in
  tests/data/config_cases.json). Here: the schema is a valid draft 2020-12 schema that documents
  every field; its examples and defaults validate; the shared cases are judged as the parser
  judges them; every plugin configuration the project ships validates; and the configuration
  reference documents every field.
- A bad configuration is refused at load, with a log line naming the field.
- The configurable parts of request selection and matching, in the real Envoy.
- Per-route control, with the shipped envoy/envoy-routes.yaml (its events route taking the key
  from a webhook's body): it turns the filter off on
  /webhooks/ with Envoy's generic per-route FilterConfig (disabled: true), and its plugin
  configuration covers /v1/ except /v1/uploads/ (include_paths / exclude_paths) with require_key
  on. Duplicates execute twice where the filter is off or the path is not covered, and are
  replayed where it is on.
"""

import json
import re
import subprocess
import sys
import uuid

import pytest
from jsonschema import Draft202012Validator

from support.checks import assert_original, assert_problem, assert_replay_of, assert_retry_after, wait_for
from support.client import ORG_A, ORG_B, call, in_background
from support.envoy import Envoy, EnvoyError
from support.processes import ROOT
from support.shipped import ENVOY_DIR, load, localise, plugin_configuration, ShippedEnvoy, wasm_filters


# -- the schema and the reference -----------------------------------------------------------------

SCHEMA = json.loads((ROOT / "config.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
CASES = json.loads((ROOT / "tests" / "data" / "config_cases.json").read_text())
REFERENCE = ROOT / "docs" / "configuration.md"


def properties(node=SCHEMA):
    for name, prop in node["properties"].items():
        yield name, prop
        if "properties" in prop:
            for sub, sub_prop in prop["properties"].items():
                yield f"{name}.{sub}", sub_prop


def needs(field):
    """What the schema's top-level if/then asks beside ``field``."""
    if field not in SCHEMA["if"]["required"]:
        return {}
    return {name: rule["const"] for name, rule in SCHEMA["then"]["properties"].items()}


def document(path, value):
    if "." in path:
        parent, field = path.split(".")
        return {parent: {**({"cluster": "etcd"} if parent == "etcd" else {}), field: value}}
    return {**needs(path), path: value}


def errors(doc):
    return sorted(e.message for e in VALIDATOR.iter_errors(doc))


def test_the_schema_is_a_valid_draft_2020_12_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["type"] == "object" and SCHEMA["additionalProperties"] is False


def test_every_field_has_a_type_a_description_and_examples():
    for path, prop in properties():
        assert prop.get("type"), path
        assert len(prop.get("description", "")) > 20, path
        assert prop.get("examples"), path
        if prop["type"] == "object":
            assert prop["additionalProperties"] is False, path


@pytest.mark.parametrize("path,prop", list(properties()), ids=[p for p, _ in properties()])
def test_every_example_and_default_validates(path, prop):
    for example in prop["examples"]:
        doc = {path: example} if isinstance(example, dict) else document(path, example)
        assert errors(doc) == [], (path, example)
        if needs(path):
            assert errors({path: example}) != [], f"{path} needs nothing after all"
    if "default" in prop:
        assert errors(document(path, prop["default"])) == [], path


def test_the_route_policy_schema_takes_its_examples_and_refuses_what_only_a_listener_says():
    route_policy = VALIDATOR.evolve(schema=SCHEMA["$defs"]["route_policy"])
    for example in SCHEMA["$defs"]["route_policy"]["examples"]:
        assert list(route_policy.iter_errors(example)) == [], example
    for name, prop in route_policy.schema["properties"].items():
        assert "$ref" in prop or prop.get("examples"), name
    assert list(route_policy.iter_errors({"ttl": "soon"})) != []
    for listener_only in ("capacity_records", "when_full", "etcd", "route_metadata"):
        example = SCHEMA["properties"][listener_only]["examples"][0]
        assert list(route_policy.iter_errors({listener_only: example})) != [], listener_only


def test_the_defaults_together_are_a_valid_configuration():
    defaults = {name: prop["default"] for name, prop in SCHEMA["properties"].items() if "default" in prop}
    assert errors(defaults) == []


@pytest.mark.parametrize("doc", CASES["valid"], ids=lambda d: json.dumps(d)[:60])
def test_the_shared_valid_cases_validate(doc):
    assert errors(doc) == []


@pytest.mark.parametrize("doc", CASES["invalid"], ids=lambda d: json.dumps(d)[:60])
def test_the_shared_invalid_cases_do_not(doc):
    assert errors(doc) != []


@pytest.mark.parametrize("doc", CASES["invalid_beyond_schema"], ids=lambda d: json.dumps(d)[:60])
def test_what_only_the_parser_refuses_is_said_in_the_schemas_descriptions(doc):
    """JSON Schema cannot compare two fields or bound a duration string; the parser does, and the
    descriptions of the fields involved say so."""
    assert errors(doc) == []
    for field in doc:
        description = SCHEMA["properties"][field]["description"]
        assert re.search(r"at least 8 x|8 times|366 days|shorter than lease", description), field


def shipped_plugin_configs():
    """Every plugin configuration the project ships: the wasm filters of envoy/*.yaml and the
    Istio manifests' pluginConfig / EnvoyFilter configuration."""
    found = []
    for path in sorted(ENVOY_DIR.glob("*.yaml")):
        doc = load(path)
        if isinstance(doc, dict) and "static_resources" in doc:
            for wasm in wasm_filters(doc):
                found.append((path.name, json.loads(wasm["config"]["configuration"]["value"])))
    istio = ENVOY_DIR / "istio"
    envoy_filter = load(istio / "envoyfilter.yaml")
    for patch in envoy_filter["spec"]["configPatches"]:
        if patch["applyTo"] == "EXTENSION_CONFIG":
            value = patch["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
            found.append(("istio/envoyfilter.yaml", json.loads(value)))
    found.append(("istio/wasmplugin.yaml", load(istio / "wasmplugin.yaml")["spec"]["pluginConfig"]))
    found.append(("istio/trafficextension.yaml",
                  load(istio / "trafficextension.yaml")["spec"]["wasm"]["pluginConfig"]))
    return found


@pytest.mark.parametrize("where,config", shipped_plugin_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_plugin_configuration_validates(where, config):
    assert errors(config) == [], where


def test_the_configuration_reference_documents_every_field_with_its_default():
    text = REFERENCE.read_text()
    for path, prop in properties():
        name = path.split(".")[-1]
        assert f"`{path}`" in text or f"`{name}`" in text, f"{path} is not in {REFERENCE.name}"
    for name, prop in SCHEMA["properties"].items():
        if "default" in prop:
            row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
            assert row is not None, f"no table row for {name}"
            assert json.dumps(prop["default"]) in row, f"{name}: the table's default is not {prop['default']!r}"


def test_the_configuration_reference_is_generated_from_the_current_schema():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# -- a bad configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("config,field", [
    ({"ttl": "soon"}, "ttl"),
    ({"tll": "1s"}, "tll"),
    ({"when_full": "drop"}, "when_full"),
    ({"max_wait": -1}, "max_wait"),
    ({"outlive_client": {"timeout": "60s"}}, "outlive_client.timeout"),
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


# -- the configurable parts of request selection and matching, on one shared instance ------------

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


def test_configured_statuses_answer_in_progress_409_and_conflict_422(envoy_with, upstream, key):
    """For clients written to the IETF draft (and Stripe's 409 for a request in progress)."""
    envoy = envoy_with({"in_progress_status": 409, "conflict_status": 422, "max_wait": "0s"})
    thread, box = in_background(lambda: call(envoy, key, headers=[("x-test-delay-ms", "800")]))
    assert wait_for(lambda: upstream.count(key=key) == 1), "the original never reached the upstream"
    in_progress = call(envoy, key)
    assert_problem(in_progress, 409, "idempotency_in_progress")
    assert_retry_after(in_progress)
    assert_problem(call(envoy, key, body=b'{"other": 1}'), 422, "idempotency_conflict")
    thread.join()
    assert_original(box["result"])
    assert upstream.count(key=key) == 1


# -- per-route control: envoy/envoy-routes.yaml ------------------------------------------------

ROUTES_CONFIG = ENVOY_DIR / "envoy-routes.yaml"


@pytest.fixture(scope="module")
def routes_envoy(run_dir, upstream):
    instance = ShippedEnvoy(run_dir / "routes", localise(load(ROUTES_CONFIG), upstream.port), upstream.port).start()
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
    config = load(ROUTES_CONFIG)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm_name = hcm["http_filters"][0]["name"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    off = [r for r in routes if "typed_per_filter_config" in r]
    assert [r["match"]["prefix"] for r in off] == ["/webhooks/"]
    assert off[0]["typed_per_filter_config"][wasm_name] == {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    assert plugin_configuration(config) == {
        "require_key": True, "include_paths": ["/v1/"], "exclude_paths": ["/v1/uploads/"],
        "route_metadata": True}


def test_duplicates_are_replayed_where_the_filter_is_on(routes_envoy, upstream):
    key = f"routes-{uuid.uuid4()}"
    first, second = twice(routes_envoy, "/v1/orders", key)
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    assert second.header("idempotent-replayed") == "true", second
    assert upstream.count(key=key) == 1


def test_a_route_with_the_filter_disabled_executes_duplicates_twice(routes_envoy, upstream):
    key = f"routes-{uuid.uuid4()}"
    path = f"/webhooks/{key}"
    assert_executed_twice(upstream, twice(routes_envoy, path, key), path)
    assert upstream.count(key=key) == 2


def test_the_filter_does_not_run_at_all_on_a_disabled_route(routes_envoy, upstream):
    """require_key would answer 400 on any covered path; on the disabled route nothing does."""
    path = f"/webhooks/{uuid.uuid4()}"
    assert_executed_twice(upstream, twice(routes_envoy, path, None), path)
    missing = routes_envoy.request("POST", f"/v1/orders/{uuid.uuid4()}", {"authorization": "Bearer routes"}, b"{}")
    assert missing.status == 400 and missing.json()["code"] == "idempotency_key_missing", missing


@pytest.mark.parametrize("path", ["/v2/orders", "/v1/uploads/avatar", "/v1/uploads/avatar?part=1", "/v1"])
def test_paths_outside_include_paths_or_inside_exclude_paths_execute_duplicates_twice(routes_envoy, upstream, path):
    key = f"routes-{uuid.uuid4()}"
    assert_executed_twice(upstream, twice(routes_envoy, path, key), path)
    assert upstream.count(key=key) == 2
    # And require_key does not apply there either.
    assert routes_envoy.request("POST", path, {"authorization": "Bearer routes"}, b"{}").status == 200


def test_an_exclusion_is_a_prefix_and_wins_only_under_it(routes_envoy, upstream):
    """/v1/uploads-archive is under the inclusion /v1/ but not under the exclusion /v1/uploads/."""
    key = f"routes-{uuid.uuid4()}"
    first, second = twice(routes_envoy, "/v1/uploads-archive", key)
    assert second.header("idempotent-replayed") == "true", second
    assert upstream.count(key=key) == 1


def test_the_example_s_route_policies_decide_their_routes(routes_envoy, upstream):
    """/v1/exports answers as the IETF draft says; /v1/search is left alone, key or not, although
    the plugin requires a key everywhere else under /v1/."""
    key = f"routes-{uuid.uuid4()}"
    first, _ = twice(routes_envoy, "/v1/exports", key)
    conflict = routes_envoy.request("POST", "/v1/exports", {"authorization": "Bearer routes",
                                                             "idempotency-key": key}, b'{"n":2}')
    assert first.status == 200 and conflict.status == 422, conflict
    assert conflict.json()["code"] == "idempotency_conflict"
    path = f"/v1/search/{uuid.uuid4()}"
    assert_executed_twice(upstream, twice(routes_envoy, path, None), path)


def test_the_example_s_events_route_replays_a_redelivered_webhook_by_its_body_s_id(routes_envoy, upstream):
    """/v1/events takes the key from the event's id, with no key header; a redelivery written
    another way replays; an event without an id is refused, as require_key says."""
    provider = {"user-agent": "Provider-Webhooks/1.0", "content-type": "application/json"}
    event_id = f"evt_{uuid.uuid4().hex}"
    path = f"/v1/events/{event_id}"
    first = routes_envoy.request("POST", path, provider, json.dumps({"id": event_id, "type": "paid"}).encode())
    again = routes_envoy.request("POST", path, provider, json.dumps({"type": "paid", "id": event_id}, indent=1).encode())
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    assert again.header("idempotent-replayed") == "true" and again.body == first.body, again
    assert upstream.count(path=path) == 1
    keyless = routes_envoy.request("POST", path, provider, b'{"type": "ping"}')
    assert keyless.status == 400 and keyless.json()["code"] == "idempotency_key_missing", keyless
