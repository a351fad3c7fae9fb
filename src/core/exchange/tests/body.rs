//! What the exchange makes of a body it reads: its canonical form (`fingerprint: "json"`) and
//! the key in it (`key_from_body`). The readers themselves are `core::body`'s.

use super::*;

const JSON: (&str, &[u8]) = ("content-type", b"application/json");
const ORG: (&str, &[u8]) = ("authorization", b"Bearer org-a");

impl Run {
    /// A POST with `pairs` for headers and `body` in one chunk, carried through the store.
    fn post(&mut self, pairs: &[(&str, &[u8])], body: &[u8]) -> (Exchange, Step) {
        let mut exchange = self.exchange();
        let step = exchange.on_request_headers("POST", b"/v1/events", &headers(pairs), false);
        if step != Step::Buffer {
            return (exchange, step);
        }
        let step = exchange.on_request_body(body.len(), true, |from| body[from..].to_vec());
        let step = self.settle(&mut exchange, step);
        (exchange, step)
    }

    /// A first POST that runs and is answered `201`.
    fn stored(&mut self, pairs: &[(&str, &[u8])], body: &[u8]) {
        let (mut first, step) = self.post(pairs, body);
        assert_eq!(step, Step::Forward);
        self.respond(&mut first, "201", b"ok");
    }
}

#[test]
fn with_json_fingerprints_a_reserialised_retry_replays_and_a_changed_one_conflicts() {
    let mut run = Run::new(r#"{"fingerprint": "json", "fingerprint_ignore": ["/sent_at"]}"#);
    let with_key = [ORG, JSON, ("idempotency-key", b"k")];
    run.stored(
        &with_key,
        br#"{"amount": 5, "currency": "eur", "sent_at": "12:00:00"}"#,
    );
    let (_, retry) = run.post(
        &with_key,
        b"{\"currency\":\"eur\",\"sent_at\":\"12:00:07\",\"amount\":5.0}",
    );
    assert_eq!(reply_of(retry).status, 201);
    let (_, changed) = run.post(&with_key, br#"{"amount": 6, "currency": "eur"}"#);
    assert_eq!(code_of(changed), (409, "idempotency_conflict".into()));
}

#[test]
fn with_bytes_a_reserialised_retry_conflicts() {
    let mut run = Run::new("{}");
    let with_key = [ORG, JSON, ("idempotency-key", b"k")];
    run.stored(&with_key, br#"{"a": 1, "b": 2}"#);
    let (_, retry) = run.post(&with_key, br#"{"b":2,"a":1}"#);
    assert_eq!(code_of(retry), (409, "idempotency_conflict".into()));
}

#[test]
fn with_json_a_body_fingerprinted_by_its_bytes_is_counted() {
    let mut run = Run::new(r#"{"fingerprint": "json"}"#);
    for (content_type, body) in [
        (&b"text/plain"[..], &b"{}"[..]),
        (b"application/json", b"{"),
    ] {
        let pairs = [
            ORG,
            ("content-type", content_type),
            ("idempotency-key", b"k"),
        ];
        let (mut exchange, step) = run.post(&pairs, body);
        assert_ne!(step, Step::Pass);
        assert!(exchange
            .take_counts()
            .contains(&Counter::FingerprintedAsBytes));
    }
}

#[test]
fn a_webhook_redelivered_without_a_key_header_replays_by_the_key_in_its_body() {
    let mut run = Run::new(r#"{"key_from_body": "/id", "scope_header": "user-agent"}"#);
    let provider = [("user-agent", &b"Provider/1.0"[..]), JSON];
    let event = br#"{"id": "evt_123", "type": "paid"}"#;
    run.stored(&provider, event);
    let (_, redelivery) = run.post(&provider, event);
    assert_eq!(reply_of(redelivery).status, 201);
    let (_, same_key_other_body) = run.post(&provider, br#"{"id":"evt_123","type":"refunded"}"#);
    assert_eq!(
        code_of(same_key_other_body),
        (409, "idempotency_conflict".into())
    );
    let (_, other_event) = run.post(&provider, br#"{"id":"evt_124","type":"paid"}"#);
    assert_eq!(other_event, Step::Forward, "another key is another record");
}

#[test]
fn with_key_from_body_the_key_header_is_not_read() {
    let mut run = Run::new(r#"{"key_from_body": "/id"}"#);
    run.stored(
        &[ORG, JSON, ("idempotency-key", b"a")],
        br#"{"id":"evt_1"}"#,
    );
    let (_, step) = run.post(
        &[ORG, JSON, ("idempotency-key", b"b")],
        br#"{"id":"evt_1"}"#,
    );
    assert_eq!(reply_of(step).status, 201);
}

#[test]
fn a_body_without_its_key_is_a_request_without_a_key() {
    let mut run = Run::new(r#"{"key_from_body": "/data/id"}"#);
    let (_, not_json) = run.post(
        &[ORG, ("content-type", b"text/plain")],
        br#"{"data":{"id":"x"}}"#,
    );
    assert_eq!(
        not_json,
        Step::Pass,
        "decided at the headers: the body is not JSON"
    );
    for body in [&br#"{"data":{}}"#[..], b"{\"data\":", b""] {
        let (mut exchange, step) = run.post(&[ORG, JSON], body);
        assert_eq!(step, Step::Pass, "{body:?}");
        assert_eq!(exchange.take_counts(), []);
    }
    assert_eq!(run.kv.keys(), 1, "only the boot key: nothing was claimed");

    let mut strict = Run::new(r#"{"key_from_body": "/data/id", "require_key": true}"#);
    let (_, step) = strict.post(&[ORG, JSON], br#"{"data":{}}"#);
    let reply = reply_of(step);
    assert_eq!(reply.status, 400);
    let problem: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(problem["code"], "idempotency_key_missing");
    assert!(
        problem["detail"].as_str().unwrap().contains("`/data/id`"),
        "{problem}"
    );
}

#[test]
fn a_key_in_the_body_follows_the_key_rules() {
    let mut run = Run::new(r#"{"key_from_body": "/id"}"#);
    let (_, number) = run.post(&[ORG, JSON], br#"{"id": 42.0}"#);
    assert_eq!(number, Step::Forward, "a number is its canonical text");
    for body in [
        &br#"{"id": {"a":1}}"#[..],
        br#"{"id": ""}"#,
        br#"{"id": "caf\u00e9"}"#,
        br#"{"id": null}"#,
    ] {
        let (_, step) = run.post(&[ORG, JSON], body);
        assert_eq!(
            code_of(step),
            (400, "idempotency_key_invalid".into()),
            "{body:?}"
        );
    }
    let long = format!(r#"{{"id": "{}"}}"#, "k".repeat(256));
    let (_, step) = run.post(&[ORG, JSON], long.as_bytes());
    assert_eq!(code_of(step), (400, "idempotency_key_invalid".into()));
}

#[test]
fn a_body_held_to_be_read_is_the_one_sent_from_the_root_context() {
    let mut run = Run::new(r#"{"outlive_client": {"timeout": "20s"}, "fingerprint": "json"}"#);
    let mut exchange = run.exchange();
    exchange.send_from_root("app".into(), 20_000);
    let pairs = headers(&[
        ORG,
        JSON,
        ("idempotency-key", b"k"),
        (":path", b"/v1/events"),
    ]);
    let body = br#"{"b": 1, "a": [1, 2]}"#;
    assert_eq!(
        exchange.on_request_headers("POST", b"/v1/events", &pairs, false),
        Step::Buffer
    );
    assert_eq!(
        exchange.on_request_body(9, false, |from| body[from..9].to_vec()),
        Step::Buffer
    );
    let step = exchange.on_request_body(body.len(), true, |from| body[from..].to_vec());
    match run.settle(&mut exchange, step) {
        Step::SendFromRoot(request) => assert_eq!(request.body, body, "as the client sent it"),
        other => panic!("expected a send from the root context, got {other:?}"),
    }
}
