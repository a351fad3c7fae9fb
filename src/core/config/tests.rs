use super::*;
use crate::core::body::{Fingerprinting, Pointer};

fn field_of(json: &str) -> String {
    match Config::parse(json.as_bytes()) {
        Err(error) => error.field,
        Ok(_) => "(accepted)".into(),
    }
}

#[test]
fn empty_document_gives_the_contract_defaults() {
    let config = Config::parse(b"{}").unwrap();
    assert_eq!(config.policy.methods, ["POST", "PATCH"]);
    assert_eq!(config.policy.key_header, "idempotency-key");
    assert!(!config.policy.require_key);
    assert_eq!(config.policy.scope_header, "authorization");
    assert_eq!(config.policy.ttl, 86_400_000);
    assert_eq!(config.policy.lease, 60_000);
    assert_eq!(config.when_full, WhenFull::Evict);
    assert_eq!(config.max_share, 0.1);
    assert_eq!(
        (
            config.policy.in_progress_status,
            config.policy.conflict_status
        ),
        (503, 409)
    );
    for status in [500, 503, 599, 408, 425, 429] {
        assert!(!config.policy.stores_status(status), "{status}");
    }
    for status in [200, 201, 204, 301, 400, 404, 409, 422] {
        assert!(config.policy.stores_status(status), "{status}");
    }
}

#[test]
fn blank_configuration_is_the_empty_document() {
    assert!(Config::parse(b"").is_ok());
    assert!(Config::parse(b"  \n").is_ok());
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let error = Config::parse(br#"{"ttl":"1h","tll":"2h"}"#).unwrap_err();
    assert!(error.to_string().contains("`tll`"), "{error}");
    assert!(Config::parse(b"[]").is_err());
}

#[test]
fn bad_values_name_their_field() {
    assert_eq!(field_of(r#"{"ttl":"soon"}"#), "ttl");
    assert_eq!(
        field_of(r#"{"in_progress_status":500}"#),
        "in_progress_status"
    );
    assert_eq!(field_of(r#"{"conflict_status":400}"#), "conflict_status");
    assert_eq!(field_of(r#"{"ttl":"0s"}"#), "ttl");
    assert_eq!(field_of(r#"{"lease":"5 s"}"#), "lease");
    assert_eq!(field_of(r#"{"methods":[]}"#), "methods");
    assert_eq!(field_of(r#"{"methods":["PO ST"]}"#), "methods");
    assert_eq!(field_of(r#"{"key_header":"idem key"}"#), "key_header");
    assert_eq!(
        field_of(r#"{"unstored_statuses":[700]}"#),
        "unstored_statuses"
    );
    assert_eq!(
        field_of(r#"{"unstored_statuses":["6xx"]}"#),
        "unstored_statuses"
    );
    assert_eq!(field_of(r#"{"capacity_records":0}"#), "capacity_records");
    assert_eq!(field_of(r#"{"capacity_bytes":1024}"#), "capacity_bytes");
    assert_eq!(field_of(r#"{"when_full":"drop"}"#), "when_full");
    assert_eq!(field_of(r#"{"key_prefix":""}"#), "key_prefix");
    assert_eq!(field_of(r#"{"require_key":"yes"}"#), "require_key");
    assert_eq!(field_of(r#"{"max_waiting":-1}"#), "max_waiting");
}

#[test]
fn bodies_are_read_as_fingerprint_and_its_pointers_say() {
    let config = Config::parse(br#"{"fingerprint": "json", "fingerprint_ignore": ["/a~1b", "/m/0"], "key_from_body": "/data/id"}"#).unwrap();
    assert_eq!(config.policy.fingerprint, Fingerprinting::Json);
    assert_eq!(config.policy.fingerprint_ignore.len(), 2);
    assert_eq!(config.policy.key_from_body, Pointer::parse("/data/id").ok());
    let defaults = Config::parse(b"{}").unwrap().policy;
    assert_eq!(
        (defaults.fingerprint, &defaults.key_from_body),
        (Fingerprinting::Bytes, &None)
    );
    for (json, field) in [
        (r#"{"fingerprint": "xml"}"#, "fingerprint"),
        (r#"{"fingerprint_ignore": ["/a"]}"#, "fingerprint_ignore"),
        (
            r#"{"fingerprint": "bytes", "fingerprint_ignore": ["/a"]}"#,
            "fingerprint_ignore",
        ),
        (
            r#"{"fingerprint": "json", "fingerprint_ignore": ["a"]}"#,
            "fingerprint_ignore",
        ),
        (
            r#"{"fingerprint": "json", "fingerprint_ignore": [""]}"#,
            "fingerprint_ignore",
        ),
        (
            r#"{"fingerprint": "json", "fingerprint_ignore": ["/~2"]}"#,
            "fingerprint_ignore",
        ),
        (
            r#"{"fingerprint": "json", "fingerprint_ignore": "/a"}"#,
            "fingerprint_ignore",
        ),
        (r#"{"key_from_body": ""}"#, "key_from_body"),
        (r#"{"key_from_body": "id"}"#, "key_from_body"),
        (r#"{"key_from_body": 1}"#, "key_from_body"),
    ] {
        assert_eq!(field_of(json), field, "{json}");
    }
    let many: Vec<String> = (0..65).map(|n| format!("/f{n}")).collect();
    let json = serde_json::json!({"fingerprint": "json", "fingerprint_ignore": many});
    assert_eq!(field_of(&json.to_string()), "fingerprint_ignore");
}

#[test]
fn durations_take_the_usual_units() {
    use read::parse_duration;
    assert_eq!(parse_duration("250ms"), Ok(250));
    assert_eq!(parse_duration("30s"), Ok(30_000));
    assert_eq!(parse_duration("5m"), Ok(300_000));
    assert_eq!(parse_duration("24h"), Ok(86_400_000));
    assert_eq!(parse_duration("0s"), Ok(0));
    assert!(parse_duration("").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
}

#[test]
fn status_rules_take_codes_and_classes() {
    let config = Config::parse(br#"{"unstored_statuses":["4xx", 503, "302"]}"#).unwrap();
    assert!(!config.policy.stores_status(404));
    assert!(!config.policy.stores_status(503));
    assert!(!config.policy.stores_status(302));
    assert!(config.policy.stores_status(500));
    assert!(config.policy.stores_status(200));
}

#[test]
fn path_prefixes_select_what_is_covered_and_exclusions_win() {
    let all = Config::parse(b"{}").unwrap();
    assert!(all.covers_path(b"/anything"));
    let config =
        Config::parse(br#"{"include_paths":["/v1/"],"exclude_paths":["/v1/webhooks"]}"#).unwrap();
    assert!(config.covers_path(b"/v1/customers"));
    assert!(!config.covers_path(b"/v2/customers"));
    assert!(!config.covers_path(b"/v1/webhooks/stripe"));
    assert_eq!(field_of(r#"{"include_paths":["v1"]}"#), "include_paths");
    assert_eq!(field_of(r#"{"exclude_paths":"/v1"}"#), "exclude_paths");
}

#[test]
fn the_etcd_store_needs_a_cluster_and_takes_defaults_for_the_rest() {
    assert!(Config::parse(b"{}").unwrap().etcd.is_none());
    let config = Config::parse(br#"{"etcd": {"cluster": "etcd"}}"#).unwrap();
    let etcd = config.etcd.unwrap();
    assert_eq!(etcd.cluster, "etcd");
    assert_eq!(etcd.timeout, 1_000);
    assert_eq!(etcd.key_prefix, "idempotency/");
    assert_eq!(etcd.auth_token, None);
    assert_eq!(etcd.max_share_bytes, 64 << 20);
    assert_eq!(field_of(r#"{"etcd": {}}"#), "etcd.cluster");
    assert_eq!(
        field_of(r#"{"etcd": {"cluster": "e", "timout": "1s"}}"#),
        "etcd.timout"
    );
    assert_eq!(
        field_of(r#"{"etcd": {"cluster": "e", "timeout": "0s"}}"#),
        "etcd.timeout"
    );
    assert_eq!(field_of(r#"{"etcd": {"cluster": ""}}"#), "etcd.cluster");
    assert_eq!(
        field_of(r#"{"etcd": {"cluster": "e", "max_share_bytes": 4096}}"#),
        "etcd.max_share_bytes"
    );
}

#[test]
fn methods_and_headers_are_normalised() {
    let config = Config::parse(br#"{"methods":["post","Put"],"key_header":"X-Idem-Key"}"#).unwrap();
    assert!(config.policy.covers("POST"));
    assert!(config.policy.covers("PUT"));
    assert!(!config.policy.covers("PATCH"));
    assert_eq!(config.policy.key_header, "x-idem-key");
}

#[test]
fn outlive_client_needs_a_timeout_that_ends_before_the_claim() {
    assert!(Config::parse(b"{}").unwrap().outlive_client.is_none());
    let outlive = Config::parse(br#"{"outlive_client": {}}"#)
        .unwrap()
        .outlive_client
        .unwrap();
    assert_eq!(
        (outlive.routes, outlive.timeout),
        (OutliveRoutes::All, 15_000)
    );
    assert!(outlive.covers_route(None) && !outlive.covers_route(Some(false)));
    let marked = r#"{"outlive_client": {"routes": "marked", "timeout": "30s"}}"#;
    let config = Config::parse(marked.as_bytes()).unwrap();
    let marked = config.outlive_client.as_ref().unwrap();
    assert!(!marked.covers_route(None) && marked.covers_route(Some(true)));
    assert_eq!(
        config.policy.send_from_root, None,
        "marked: no route is unless it says so"
    );
    let all = Config::parse(br#"{"outlive_client": {"timeout": "30s"}}"#).unwrap();
    assert_eq!(all.policy.send_from_root, Some(30_000));

    for (json, field) in [
        (
            r#"{"outlive_client": {"routes": "some"}}"#,
            "outlive_client.routes",
        ),
        (
            r#"{"outlive_client": {"timeout": "0s"}}"#,
            "outlive_client.timeout",
        ),
        (
            r#"{"outlive_client": {"timeout": "60s"}}"#,
            "outlive_client.timeout",
        ),
        (r#"{"outlive_client": {}, "lease": "0s"}"#, "lease"),
        (
            r#"{"outlive_client": {"retries": 2}}"#,
            "outlive_client.retries",
        ),
        (
            r#"{"outlive_client": {"max_in_flight": 0}}"#,
            "outlive_client.max_in_flight",
        ),
        // With etcd the finish is one more call: the claim must outlast it too.
        (
            r#"{"outlive_client": {"timeout": "59500ms"}, "etcd": {"cluster": "etcd"}}"#,
            "outlive_client.timeout",
        ),
    ] {
        assert_eq!(field_of(json), field, "{json}");
    }
}

#[test]
fn garbage_and_mutated_configurations_are_refused_naming_a_field() {
    use crate::core::garbage;
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("../../../tests/data/config_cases.json")).unwrap();
    let valid: Vec<String> = cases["valid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|document| document.to_string())
        .collect();
    garbage::run("configurations", |g| {
        let input = g.input(&valid, 256);
        if let Err(error) = Config::parse(&input) {
            assert!(
                !error.field.is_empty() && !error.reason.is_empty(),
                "{error}"
            );
        }
    });
}

/// The policy a route whose metadata holds `fields` gets under the listener `listener`.
fn route_of(listener: &str, fields: &str) -> Result<Option<Policy>, ConfigError> {
    let config = Config::parse(listener.as_bytes()).unwrap();
    match serde_json::from_str(fields).unwrap() {
        serde_json::Value::Object(fields) => config.route_policy(fields),
        other => panic!("not an object: {other}"),
    }
}

/// The field a route's `fields` are refused for under `listener` (`(accepted)` if they are not).
fn refused(listener: &str, fields: &str) -> String {
    route_of(listener, fields).map_or_else(|e| e.field, |_| "(accepted)".into())
}

/// What a route whose metadata holds `fields` sends from the root context with, if anything.
fn sends(listener: &str, fields: &str) -> Option<Millis> {
    route_of(listener, fields).unwrap().unwrap().send_from_root
}

const ROUTES: &str = r#"{"route_metadata": true, "ttl": "12h", "require_key": true}"#;

#[test]
fn a_route_lays_its_fields_over_the_listener_s_policy() {
    let listener = Config::parse(ROUTES.as_bytes()).unwrap();
    assert_eq!(
        route_of(ROUTES, "{}"),
        Ok(Some(Policy::clone(&listener.policy)))
    );
    let policy = route_of(
        ROUTES,
        r#"{"ttl": "1h", "lease": "5s", "methods": ["put"], "in_progress_status": 409,
            "conflict_status": 422, "unstored_statuses": ["4xx"], "max_wait": "0s",
            "key_header": "X-Key", "scope_header": "x-org", "max_request_body_bytes": 10,
            "max_response_body_bytes": 20, "fingerprint": "json",
            "fingerprint_ignore": ["/sent_at"], "key_from_body": "/id"}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (policy.ttl, policy.lease, policy.max_wait),
        (3_600_000, 5_000, 0)
    );
    assert_eq!(policy.methods, ["PUT"]);
    assert_eq!(
        (policy.in_progress_status, policy.conflict_status),
        (409, 422)
    );
    assert!(!policy.stores_status(404) && policy.stores_status(500));
    assert_eq!(
        (policy.key_header.as_str(), policy.scope_header.as_str()),
        ("x-key", "x-org")
    );
    assert_eq!(
        (
            policy.max_request_body_bytes,
            policy.max_response_body_bytes
        ),
        (10, 20)
    );
    assert_eq!(policy.fingerprint, Fingerprinting::Json);
    assert_eq!(
        policy.fingerprint_ignore,
        [Pointer::parse("/sent_at").unwrap()]
    );
    assert_eq!(policy.key_from_body, Pointer::parse("/id").ok());
    assert!(
        policy.require_key,
        "what the route does not say is the listener's"
    );
    assert_eq!(route_of(ROUTES, r#"{"enabled": false}"#), Ok(None));
}

#[test]
fn a_route_that_says_what_it_may_not_is_refused_naming_the_field() {
    let ignoring =
        r#"{"route_metadata": true, "fingerprint": "json", "fingerprint_ignore": ["/a"]}"#;
    assert_eq!(
        refused(ignoring, r#"{"fingerprint": "bytes"}"#),
        "fingerprint_ignore"
    );
    assert_eq!(
        refused(
            ignoring,
            r#"{"fingerprint": "bytes", "fingerprint_ignore": []}"#
        ),
        "(accepted)"
    );
    for (fields, field) in [
        (r#"{"ttl": "soon"}"#, "ttl"),
        (r#"{"ttl": 3600}"#, "ttl"),
        (r#"{"methods": []}"#, "methods"),
        (r#"{"enabled": "no"}"#, "enabled"),
        (r#"{"in_progress_status": 500}"#, "in_progress_status"),
        (r#"{"capacity_records": 10}"#, "capacity_records"),
        (r#"{"when_full": "pass"}"#, "when_full"),
        (r#"{"etcd": {"cluster": "etcd"}}"#, "etcd"),
        (r#"{"route_metadata": false}"#, "route_metadata"),
        (r#"{"tll": "1h"}"#, "tll"),
        (r#"{"outlive_client": true}"#, "outlive_client"),
        (r#"{"timeout": "1s"}"#, "timeout"),
        // Any storable response must fit one ledger (an eighth of capacity_bytes) and a share.
        (
            r#"{"max_response_body_bytes": 20000000}"#,
            "max_response_body_bytes",
        ),
    ] {
        assert_eq!(refused(ROUTES, fields), field, "{fields}");
    }
}

#[test]
fn without_route_metadata_a_route_may_only_say_how_it_sends() {
    let outlive = r#"{"outlive_client": {"routes": "marked", "timeout": "5s"}}"#;
    assert_eq!(
        sends(outlive, r#"{"outlive_client": true, "timeout": "2s"}"#),
        Some(2_000)
    );
    assert_eq!(sends(outlive, "{}"), None);
    // Never silently ignored.
    assert_eq!(refused(outlive, r#"{"ttl": "1h"}"#), "ttl");
    assert_eq!(refused(outlive, r#"{"enabled": false}"#), "enabled");
    // A route's timeout, like the listener's, must end before its claim's lease does.
    let all = r#"{"route_metadata": true, "outlive_client": {}}"#;
    assert_eq!(sends(all, "{}"), Some(15_000));
    assert_eq!(refused(all, r#"{"timeout": "90s"}"#), "timeout");
    assert_eq!(refused(all, r#"{"lease": "10s"}"#), "timeout");
    assert_eq!(refused(all, r#"{"lease": "0s"}"#), "lease");
    assert_eq!(
        sends(all, r#"{"lease": "10s", "timeout": "5s"}"#),
        Some(5_000)
    );
    assert_eq!(sends(all, r#"{"outlive_client": false}"#), None);
}

#[test]
fn on_etcd_a_route_s_records_live_no_longer_than_the_listener_s_leases() {
    let etcd = r#"{"route_metadata": true, "ttl": "1h", "lease": "30s", "etcd": {"cluster": "e"}}"#;
    assert_eq!(
        refused(etcd, r#"{"ttl": "10m", "lease": "5s"}"#),
        "(accepted)"
    );
    assert_eq!(refused(etcd, r#"{"ttl": "2h"}"#), "ttl");
    assert_eq!(refused(etcd, r#"{"lease": "60s"}"#), "lease");
    // A zero lease holds a vanished owner's claim for the default 60 s.
    assert_eq!(refused(etcd, r#"{"lease": "0s"}"#), "lease");
    let table = r#"{"route_metadata": true, "ttl": "1h"}"#;
    assert_eq!(
        refused(table, r#"{"ttl": "48h"}"#),
        "(accepted)",
        "the table keeps any ttl"
    );
}
