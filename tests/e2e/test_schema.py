"""config.schema.json as editors and CI use it (the JSON Schema side).

tests/config_schema.rs checks the same file against the filter's parser: fields, examples,
defaults, bounds, and the shared cases in tests/data/config_cases.json. Here: the schema is a
valid draft 2020-12 schema that documents every field; its examples and defaults validate; the
shared cases are judged as the parser judges them; every plugin configuration the project ships
validates; and the configuration reference documents every field.
"""

import json
import re
import subprocess
import sys

import pytest
from jsonschema import Draft202012Validator

from support.processes import ROOT
from support.shipped import ENVOY_DIR, load, wasm_filters

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


def document(path, value):
    if "." in path:
        parent, field = path.split(".")
        return {parent: {"cluster": "etcd", field: value}}
    return {path: value}


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
        doc = {path: example} if path == "etcd" else document(path, example)
        assert errors(doc) == [], (path, example)
    if "default" in prop:
        assert errors(document(path, prop["default"])) == [], path


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
        assert re.search(r"at least 8 x|8 times|366 days", description), field


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
