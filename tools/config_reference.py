#!/usr/bin/env python3
"""Write docs/configuration.md from config.schema.json (stdlib only).

    python3 tools/config_reference.py          # rewrite the reference
    python3 tools/config_reference.py --check  # exit 1 if it is out of date

The schema is the single source: tests/config_schema.rs holds it to the filter's parser
(fields, examples, defaults, bounds) and tests/e2e/test_configuration.py holds this page to the schema.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config.schema.json"
OUT = ROOT / "docs" / "configuration.md"

INTRO = """\
# Configuration reference

The filter's configuration is one JSON object: the `configuration` (a
`google.protobuf.StringValue`) of the `envoy.filters.http.wasm` filter in Envoy, or the
`pluginConfig` of an Istio `WasmPlugin` / `TrafficExtension` (Istio turns it into the same JSON).
Every field is optional and `{}` gives the defaults below.

A configuration the filter refuses (an unknown field, a wrong type, a value out of bounds) stops
the filter from loading: Envoy logs a line that names the field, e.g.
`invalid configuration: `ttl`: `soon`: expected a duration like "500ms", "30s", "5m" or "24h"`,
and refuses the listener (or, under Istio, rejects the filter's config update). Check a
configuration before shipping it with the JSON Schema [`config.schema.json`](../config.schema.json):
editors that read JSON Schema complete and check it, and in CI, for example,

```sh
check-jsonschema --schemafile config.schema.json plugin-config.json   # pip install check-jsonschema
```

Two rules the schema cannot state are checked only at load: `capacity_bytes` must be at least
8 × `max_response_body_bytes`, and durations are at most 366 days.

Durations are strings of digits and one unit: `ms`, `s`, `m` or `h` (`"250ms"`, `"30s"`, `"5m"`,
`"24h"`). Sizes are bytes.

This page is generated from the schema by `tools/config_reference.py`; edit the schema, not
this page.

"""


def render_value(value):
    return "`" + json.dumps(value) + "`"


def type_of(prop):
    kind = prop.get("type")
    if kind == "array":
        items = prop.get("items", {})
        if "anyOf" in items:
            inner = " or ".join(sorted({branch["type"] for branch in items["anyOf"]}))
        else:
            inner = items.get("type", "any")
        return f"array of {inner}"
    if kind == "string" and prop.get("pattern") == DURATION:
        return "string (duration)"
    return kind


DURATION = "^[0-9]+(ms|s|m|h)$"
HEADER_NAME = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"


def bounds_of(prop):
    out = []
    if prop.get("pattern") == DURATION:
        out.append("more than 0, at most 366 days" if "not" in prop else "0 to 366 days")
    if prop.get("pattern") == HEADER_NAME:
        out.append("a header name (an HTTP token; case-insensitive)")
    if "enum" in prop:
        out.append("one of " + ", ".join(render_value(v) for v in prop["enum"]))
    if "minimum" in prop and "maximum" in prop:
        out.append(f"{prop['minimum']} to {prop['maximum']}")
    elif "minimum" in prop:
        out.append(f"at least {prop['minimum']}")
    elif "maximum" in prop:
        out.append(f"at most {prop['maximum']}")
    if "minItems" in prop:
        out.append(f"at least {prop['minItems']} item")
    if "minLength" in prop:
        out.append("not empty")
    if prop.get("pattern") not in (None, DURATION, HEADER_NAME):
        out.append(f"matches `{prop['pattern']}`")
    items = prop.get("items", {})
    if items.get("pattern") == "^[A-Za-z]+$":
        out.append("each a method name (letters)")
    elif items.get("pattern") == "^/":
        out.append("each a path prefix starting with `/`")
    elif items.get("pattern"):
        out.append(f"each matches `{items['pattern']}`")
    if "anyOf" in items:
        out.append("each a status 100 to 599 (number or string) or a class `\"1xx\"` to `\"5xx\"`")
    return "; ".join(out) or "-"


def table(properties, prefix=""):
    lines = ["| field | type | default | bounds |", "|---|---|---|---|"]
    for name, prop in properties.items():
        default = render_value(prop["default"]) if "default" in prop else (
            "(required)" if name == "cluster" else "none")
        lines.append(f"| `{prefix}{name}` | {type_of(prop)} | {default} | {bounds_of(prop)} |")
    return "\n".join(lines)


def route_table(route):
    lines = ["| field | type | default | bounds |", "|---|---|---|---|"]
    for name, prop in route["properties"].items():
        if "$ref" in prop:
            lines.append(f"| `{name}` | as the listener's | the listener's | as the listener's |")
        else:
            default = render_value(prop["default"]) if "default" in prop else "none"
            lines.append(f"| `{name}` | {type_of(prop)} | {default} | {bounds_of(prop)} |")
    lines.append("")
    lines += [f"`{name}`: {prop['description']}" + "\n" for name, prop in route["properties"].items()
              if "$ref" not in prop]
    return "\n".join(lines)


def section(name, prop):
    lines = [f"### `{name}`", "", prop["description"], ""]
    lines.append(f"- type: {type_of(prop)}")
    if "default" in prop:
        lines.append(f"- default: {render_value(prop['default'])}")
    lines.append(f"- bounds: {bounds_of(prop)}")
    for example in prop.get("examples", []):
        leaf = name.split(".")[-1]
        if "." in name:
            doc = {"etcd": {"cluster": "etcd", leaf: example}}
        elif name == "etcd":
            doc = {"etcd": example}
        else:
            doc = {leaf: example}
        lines.append(f"- example: `{json.dumps(doc)}`")
    return "\n".join(lines) + "\n"


def render(schema):
    props = schema["properties"]
    parts = [INTRO, "## Fields\n\n", table(props), "\n"]
    etcd = props.get("etcd")
    if etcd:
        parts += ["\nThe `etcd` object:\n\n", table(etcd["properties"], "etcd."), "\n"]
    route = schema.get("$defs", {}).get("route_policy")
    if route:
        parts += ["\n## Route policy\n\n", route["description"], "\n\n", route_table(route), "\n"]
        parts += [f"- example: `{json.dumps(example)}`\n" for example in route["examples"]]
    parts.append("\n## Each field\n\n")
    for name, prop in props.items():
        parts.append(section(name, prop) + "\n")
        for sub, sub_prop in prop.get("properties", {}).items():
            parts.append(section(f"{name}.{sub}", sub_prop) + "\n")
    return "".join(parts).rstrip("\n") + "\n"


def main(argv):
    text = render(json.loads(SCHEMA.read_text()))
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python3 tools/config_reference.py")
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
