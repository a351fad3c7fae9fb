//! config.schema.json against the real parser (`Config::parse`): every field the parser knows is
//! in the schema and nothing else; every example parses; every default is the parser's default;
//! every integer bound is the parser's bound; and the shared cases in tests/data/config_cases.json
//! are judged by the parser as the schema judges them (tests/e2e/test_configuration.py checks the schema).

// A test crate: its helpers fail loudly too, like the #[test] functions clippy already allows.
#![allow(clippy::panic)]

use idempotency_filter::Config;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

fn read_json(relative: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema() -> Value {
    read_json("config.schema.json")
}

fn properties(node: &Value) -> &Map<String, Value> {
    node["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no properties in {node}"))
}

fn parse(document: &Value) -> Result<Config, String> {
    Config::parse(document.to_string().as_bytes()).map_err(|e| e.to_string())
}

fn debug(document: &Value) -> String {
    match parse(document) {
        Ok(config) => format!("{config:#?}"),
        Err(error) => panic!("{document} was refused: {error}"),
    }
}

/// Field names at one nesting depth of a pretty Debug dump (`indent` spaces before `name: `).
fn debug_fields(dump: &str, indent: usize) -> BTreeSet<String> {
    dump.lines()
        .filter(|line| line.len() > indent && line[..indent].bytes().all(|b| b == b' '))
        .map(|line| &line[indent..])
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter_map(|rest| rest.split_once(": ").map(|(name, _)| name.to_string()))
        .filter(|name| name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .collect()
}

/// The smallest document holding `object` (one of the schema's objects) with its defaults.
fn minimal(object: &str) -> Value {
    match object {
        "etcd" => json!({ "etcd": { "cluster": "etcd" } }),
        other => json!({ other: {} }),
    }
}

/// A document with one field set, inside its object for an object's own fields.
/// The fields a field means something only beside (the schema's top-level `if` names it, and
/// its `then` says what they must be), with those values.
fn needs(field: &str) -> serde_json::Map<String, Value> {
    let schema = schema();
    let required = schema["if"]["required"].as_array().into_iter().flatten();
    if !required.into_iter().any(|name| name == field) {
        return serde_json::Map::new();
    }
    let needed = schema["then"]["properties"]
        .as_object()
        .into_iter()
        .flatten();
    needed
        .map(|(name, rule)| (name.clone(), rule["const"].clone()))
        .collect()
}

fn with_field(path: &[&str], value: &Value) -> Value {
    match path {
        [field] => {
            let mut document = needs(field);
            document.insert(field.to_string(), value.clone());
            Value::Object(document)
        }
        [object, field] => {
            let mut document = minimal(object);
            document[*object][*field] = value.clone();
            document
        }
        _ => unreachable!(),
    }
}

/// Every property of the schema with its path, the objects' own fields included.
fn all_properties(schema: &Value) -> Vec<(Vec<&str>, &Value)> {
    let mut out = Vec::new();
    for (name, property) in properties(schema) {
        out.push((vec![name.as_str()], property));
        if property.get("properties").is_some() {
            for (sub, sub_property) in properties(property) {
                out.push((vec![name.as_str(), sub.as_str()], sub_property));
            }
        }
    }
    out
}

/// The listener's fields as the parser holds them: its own, and its policy's (less what the
/// policy derives from `outlive_client`, and the policy's fields as written, kept for routes).
fn listener_fields(dump: &str) -> BTreeSet<String> {
    let mut fields = debug_fields(dump, 4);
    fields.remove("policy");
    fields.remove("policy_fields");
    fields.extend(debug_fields(dump, 8));
    fields.remove("send_from_root");
    fields
}

#[test]
fn the_schema_names_exactly_the_parsers_fields() {
    let schema = schema();
    let top: BTreeSet<String> = properties(&schema).keys().cloned().collect();
    assert_eq!(listener_fields(&debug(&json!({}))), top);

    for object in ["etcd", "outlive_client"] {
        let fields: BTreeSet<String> = properties(&schema["properties"][object])
            .keys()
            .cloned()
            .collect();
        let dump = debug(&minimal(object));
        assert_eq!(debug_fields(&dump, 12), fields, "{object}");
    }
}

#[test]
fn every_example_parses() {
    let schema = schema();
    for (path, property) in all_properties(&schema) {
        let examples = property["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{path:?} has no examples"));
        assert!(!examples.is_empty(), "{path:?} has no examples");
        for example in examples {
            let document = if path.len() == 1 && example.is_object() {
                json!({ path[0]: example })
            } else {
                with_field(&path, example)
            };
            if let Err(error) = parse(&document) {
                panic!("example {document} of {path:?} is refused: {error}");
            }
            if path.len() == 1 && !needs(path[0]).is_empty() {
                let alone = json!({ path[0]: example });
                assert!(parse(&alone).is_err(), "{alone} needs nothing after all");
            }
        }
    }
}

#[test]
fn every_default_is_the_parsers_default() {
    let schema = schema();
    let mut checked = 0;
    for (path, property) in all_properties(&schema) {
        let Some(default) = property.get("default") else {
            // Only what is absent unless given: the objects, etcd's cluster and auth_token.
            assert!(
                matches!(
                    path[..],
                    ["etcd"] | ["outlive_client"] | ["etcd", "cluster"] | ["etcd", "auth_token"]
                ),
                "{path:?} has no default"
            );
            continue;
        };
        let expected = match path[..] {
            [field] => debug(&Value::Object(needs(field))),
            [object, _] => debug(&minimal(object)),
            _ => unreachable!(),
        };
        assert_eq!(
            debug(&with_field(&path, default)),
            expected,
            "the schema's default for {path:?} is not the parser's"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} defaults checked");
}

#[test]
fn integer_bounds_are_the_parsers_bounds() {
    let schema = schema();
    for (path, property) in all_properties(&schema) {
        if property["type"] != "integer" {
            continue;
        }
        // capacity_bytes must hold 8 x max_response_body_bytes (their descriptions say so):
        // each is probed with the other out of its way.
        let context = |document: Value| -> Value {
            let mut document = document;
            if path == ["capacity_bytes"] {
                document["max_response_body_bytes"] = json!(0);
            }
            if path == ["max_response_body_bytes"] {
                document["capacity_bytes"] = json!(1_u64 << 30);
            }
            // Likewise etcd.max_share_bytes must hold etcd.max_value_bytes, and the reverse.
            if path == ["etcd", "max_share_bytes"] {
                document["etcd"]["max_value_bytes"] = json!(1024);
            }
            if path == ["etcd", "max_value_bytes"] {
                document["etcd"]["max_share_bytes"] = json!(1_u64 << 40);
            }
            document
        };
        let accepts = |n: i64| parse(&context(with_field(&path, &json!(n)))).is_ok();
        if let Some(min) = property["minimum"].as_i64() {
            assert!(accepts(min), "{path:?}: the minimum {min} is refused");
            assert!(
                !accepts(min - 1),
                "{path:?}: {} is accepted below the minimum",
                min - 1
            );
        }
        if let Some(max) = property["maximum"].as_i64() {
            assert!(accepts(max), "{path:?}: the maximum {max} is refused");
            assert!(
                !accepts(max + 1),
                "{path:?}: {} is accepted above the maximum",
                max + 1
            );
        }
    }
}

#[test]
fn enumerations_are_the_parsers() {
    let schema = schema();
    for (path, property) in all_properties(&schema) {
        let Some(values) = property["enum"].as_array() else {
            continue;
        };
        for value in values {
            assert!(
                parse(&with_field(&path, value)).is_ok(),
                "{path:?}: {value} refused"
            );
        }
        assert!(parse(&with_field(&path, &json!("not-one-of-them"))).is_err());
    }
}

#[test]
fn the_shared_cases_are_judged_alike() {
    let cases = read_json("tests/data/config_cases.json");
    for document in cases["valid"].as_array().unwrap_or(&Vec::new()) {
        if let Err(error) = parse(document) {
            panic!("{document} is refused: {error}");
        }
    }
    for key in ["invalid", "invalid_beyond_schema"] {
        let documents = cases[key].as_array().cloned().unwrap_or_default();
        assert!(!documents.is_empty(), "no {key} cases");
        for document in documents {
            assert!(parse(&document).is_err(), "{key}: {document} is accepted");
        }
    }
}

/// A route policy as the filter reads it under a listener that lets routes have their say.
fn route(fields: &Value) -> Result<(), String> {
    let listener = json!({ "route_metadata": true, "outlive_client": {"routes": "marked"} });
    let config = parse(&listener).unwrap_or_else(|e| panic!("{e}"));
    let fields = fields.as_object().cloned().unwrap_or_default();
    config
        .route_policy(fields)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn the_route_policy_schema_names_exactly_what_a_route_may_say() {
    let schema = schema();
    let route_policy = &schema["$defs"]["route_policy"];
    for example in route_policy["examples"].as_array().into_iter().flatten() {
        route(example).unwrap_or_else(|e| panic!("example {example} is refused: {e}"));
    }
    for (name, property) in properties(route_policy) {
        // A listener field the route shares points at it, examples and all.
        let property = match property["$ref"].as_str() {
            Some(pointer) => {
                assert_eq!(pointer, format!("#/properties/{name}"));
                &schema["properties"][name]
            }
            None => property,
        };
        for example in property["examples"].as_array().into_iter().flatten() {
            let mut fields = needs(name);
            fields.insert(name.clone(), example.clone());
            let fields = Value::Object(fields);
            route(&fields).unwrap_or_else(|e| panic!("route {fields} is refused: {e}"));
        }
        assert!(
            route(&json!({ name.as_str(): {"not": "a value"} })).is_err(),
            "{name}"
        );
    }
    let listener_only = properties(&schema)
        .iter()
        .filter(|(name, _)| !properties(route_policy).contains_key(*name));
    let mut refused = 0;
    for (name, property) in listener_only {
        let example = &property["examples"][0];
        assert!(
            route(&json!({ name.as_str(): example })).is_err(),
            "a route may not say {name}"
        );
        refused += 1;
    }
    assert!(refused >= 11, "only {refused} listener fields refused");
    assert!(route(&json!({ "no_such_field": 1 })).is_err());
}
