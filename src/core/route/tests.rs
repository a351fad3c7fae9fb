use super::*;
use crate::core::garbage;
use crate::stores::testkit::config;

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::Number(n)),
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::String(s.into())),
    }
}

/// A route's metadata as Envoy serialises it, with `fields` under `namespace`.
fn metadata(namespace: &str, fields: &[(&str, Value)]) -> Vec<u8> {
    let fields = fields
        .iter()
        .map(|(name, value)| (name.to_string(), value.clone()))
        .collect();
    let mut filter_metadata = BTreeMap::new();
    filter_metadata.insert(namespace.to_string(), Struct { fields });
    Metadata { filter_metadata }.encode_to_vec()
}

const LISTENER: &str = r#"{"route_metadata": true, "methods": ["POST"]}"#;

fn policy_of(routed: Routed) -> Rc<Policy> {
    match routed {
        Routed::Policy(policy) => policy,
        other => panic!("expected a policy, got {other:?}"),
    }
}

#[test]
fn a_route_without_our_namespace_has_the_listener_s_policy() {
    let config = config(LISTENER);
    let mut routes = Routes::new(&config);
    let listener = policy_of(routes.resolve(&config, b""));
    assert!(Rc::ptr_eq(&listener, &config.policy));
    let other = metadata("envoy.lb", &[("canary", text("yes"))]);
    assert!(Rc::ptr_eq(
        &policy_of(routes.resolve(&config, &other)),
        &config.policy
    ));
}

#[test]
fn a_route_s_metadata_is_read_as_its_json_would_be() {
    let config = config(LISTENER);
    let mut routes = Routes::new(&config);
    let list = Value {
        kind: Some(Kind::List(ListValue {
            values: vec![text("put"), text("post")],
        })),
    };
    let route = metadata(
        NAMESPACE,
        &[
            ("ttl", text("1h")),
            ("max_request_body_bytes", number(1024.0)),
            ("in_progress_status", number(409.0)),
            ("methods", list),
            (
                "require_key",
                Value {
                    kind: Some(Kind::Bool(true)),
                },
            ),
        ],
    );
    let policy = policy_of(routes.resolve(&config, &route));
    assert_eq!(
        (policy.ttl, policy.max_request_body_bytes),
        (3_600_000, 1024)
    );
    assert_eq!((policy.in_progress_status, policy.require_key), (409, true));
    assert_eq!(policy.methods, ["PUT", "POST"]);
    let disabled = metadata(
        NAMESPACE,
        &[(
            "enabled",
            Value {
                kind: Some(Kind::Bool(false)),
            },
        )],
    );
    assert_eq!(routes.resolve(&config, &disabled), Routed::Disabled);
    assert!(!Routed::Disabled.covers("POST"));
}

#[test]
fn each_route_is_parsed_once_and_a_changed_route_again() {
    let config = config(LISTENER);
    let mut routes = Routes::new(&config);
    let first = metadata(NAMESPACE, &[("ttl", text("1h"))]);
    let once = policy_of(routes.resolve(&config, &first));
    assert!(Rc::ptr_eq(
        &once,
        &policy_of(routes.resolve(&config, &first))
    ));
    // RDS delivers the route again with another ttl: other bytes, another policy.
    let changed = metadata(NAMESPACE, &[("ttl", text("2h"))]);
    assert_eq!(policy_of(routes.resolve(&config, &changed)).ttl, 7_200_000);
    for n in 0..2 * CACHED_ROUTES {
        let ttl = format!("{}s", n + 1);
        routes.resolve(&config, &metadata(NAMESPACE, &[("ttl", text(&ttl))]));
        assert!(routes.parsed.len() <= CACHED_ROUTES);
    }
}

#[test]
fn a_misconfigured_route_refuses_the_methods_it_meant_to_cover() {
    let config = config(LISTENER);
    let mut routes = Routes::new(&config);
    let refused = |routed: Routed| match routed {
        Routed::Misconfigured(refused) => refused,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let own_methods = Value {
        kind: Some(Kind::List(ListValue {
            values: vec![text("PUT")],
        })),
    };
    let bad = metadata(
        NAMESPACE,
        &[("methods", own_methods), ("ttl", text("soon"))],
    );
    let routed = routes.resolve(&config, &bad);
    assert!(routed.covers("PUT") && !routed.covers("POST"));
    assert_eq!(refused(routed).error.field, "ttl");
    // Methods that do not read: the listener's are refused.
    let both_bad = metadata(
        NAMESPACE,
        &[("methods", number(1.0)), ("capacity_bytes", number(1.0))],
    );
    let routed = routes.resolve(&config, &both_bad);
    assert!(routed.covers("POST") && !routed.covers("PUT"));
    assert_eq!(refused(routed).error.field, "capacity_bytes");
    let unreadable = routes.resolve(&config, b"\xff\xff\xff");
    assert!(unreadable.covers("POST"));
    assert_eq!(refused(unreadable).error.field, "(route metadata)");
}

#[test]
fn garbage_and_mutated_route_metadata_never_panics_and_names_a_field() {
    let config = config(r#"{"route_metadata": true, "etcd": {"cluster": "etcd"}}"#);
    let valid = [
        metadata(NAMESPACE, &[("ttl", text("1h")), ("lease", text("5s"))]),
        metadata(NAMESPACE, &[("max_response_body_bytes", number(4096.0))]),
        metadata(NAMESPACE, &[("unstored_statuses", text("5xx"))]),
    ];
    // Deeply nested lists: the decoder's recursion limit refuses them, never the VM's stack.
    let mut deep = text("x");
    for _ in 0..1_000 {
        deep = Value {
            kind: Some(Kind::List(ListValue { values: vec![deep] })),
        };
    }
    let nested = metadata(NAMESPACE, &[("methods", deep)]);
    let mut routes = Routes::new(&config);
    assert!(matches!(
        routes.resolve(&config, &nested),
        Routed::Misconfigured(_)
    ));
    garbage::run("route metadata", |g| {
        let input = match g.below(3) {
            0 => g.bytes(256),
            _ => {
                let sample = g.below(valid.len());
                g.mutate(&valid[sample])
            }
        };
        if let Routed::Misconfigured(refused) = routes.resolve(&config, &input) {
            assert!(!refused.error.field.is_empty() && !refused.error.reason.is_empty());
        }
    });
}
