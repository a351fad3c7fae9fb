use super::*;

fn field_of(json: &str) -> String {
    match Config::parse(json.as_bytes()) {
        Err(error) => error.field,
        Ok(_) => "(accepted)".into(),
    }
}

#[test]
fn empty_document_gives_the_contract_defaults() {
    let config = Config::parse(b"{}").unwrap();
    assert_eq!(config.methods, ["POST", "PATCH"]);
    assert_eq!(config.key_header, "idempotency-key");
    assert!(!config.require_key);
    assert_eq!(config.scope_header, "authorization");
    assert_eq!(config.ttl, 86_400_000);
    assert_eq!(config.lease, 60_000);
    assert_eq!(config.when_full, WhenFull::Evict);
    assert_eq!(config.max_share, 0.1);
    assert_eq!(
        (config.in_progress_status, config.conflict_status),
        (503, 409)
    );
    for status in [500, 503, 599, 408, 425, 429] {
        assert!(!config.stores_status(status), "{status}");
    }
    for status in [200, 201, 204, 301, 400, 404, 409, 422] {
        assert!(config.stores_status(status), "{status}");
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
fn durations_take_the_usual_units() {
    assert_eq!(duration("ttl", "250ms"), Ok(250));
    assert_eq!(duration("ttl", "30s"), Ok(30_000));
    assert_eq!(duration("ttl", "5m"), Ok(300_000));
    assert_eq!(duration("ttl", "24h"), Ok(86_400_000));
    assert_eq!(duration("lease", "0s"), Ok(0));
    assert!(duration("ttl", "").is_err());
    assert!(duration("ttl", "s").is_err());
    assert!(duration("ttl", "99999999999999999999h").is_err());
}

#[test]
fn status_rules_take_codes_and_classes() {
    let config = Config::parse(br#"{"unstored_statuses":["4xx", 503, "302"]}"#).unwrap();
    assert!(!config.stores_status(404));
    assert!(!config.stores_status(503));
    assert!(!config.stores_status(302));
    assert!(config.stores_status(500));
    assert!(config.stores_status(200));
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
    assert_eq!(field_of(r#"{"etcd": {}}"#), "etcd");
    assert_eq!(
        field_of(r#"{"etcd": {"cluster": "e", "timout": "1s"}}"#),
        "etcd"
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
    assert!(config.covers("POST"));
    assert!(config.covers("PUT"));
    assert!(!config.covers("PATCH"));
    assert_eq!(config.key_header, "x-idem-key");
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
    // A route's metadata may give its own timeout, held to the same rule.
    assert_eq!(config.outlive_timeout(None), Ok(30_000));
    assert_eq!(config.outlive_timeout(Some("5s")), Ok(5_000));
    assert!(config.outlive_timeout(Some("60s")).is_err());
    assert!(config.outlive_timeout(Some("soon")).is_err());

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
        (r#"{"outlive_client": {"retries": 2}}"#, "outlive_client"),
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
        let input = match g.below(4) {
            0 => g.bytes(256),
            _ => {
                let sample = g.below(valid.len());
                g.mutate(valid[sample].as_bytes())
            }
        };
        if let Err(error) = Config::parse(&input) {
            assert!(
                !error.field.is_empty() && !error.reason.is_empty(),
                "{error}"
            );
        }
    });
}
