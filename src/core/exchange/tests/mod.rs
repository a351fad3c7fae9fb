use super::*;
use crate::core::store::{Answer, Store};
use crate::stores::table::Table;
use crate::stores::testkit::{config, MemoryKv};

const POST_HEADERS: [(&str, &[u8]); 2] = [
    ("authorization", b"Bearer org-a"),
    ("idempotency-key", b"key-1"),
];

fn headers(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect()
}

struct Run {
    kv: &'static MemoryKv,
    store: Table<&'static MemoryKv>,
    config: Rc<Config>,
    tokens: u64,
    now: Millis,
}

impl Run {
    /// A fresh store (its shared data lives as long as the test binary) and configuration.
    fn new(json: &str) -> Self {
        let kv: &'static MemoryKv = Box::leak(Box::default());
        let config = config(json);
        let mut store = Table::new(kv, &config);
        store.boot().unwrap();
        Run {
            kv,
            store,
            config: Rc::new(config),
            tokens: 0,
            now: 1_000_000,
        }
    }

    fn exchange(&mut self) -> Exchange {
        self.tokens += 1;
        Exchange::new(Rc::clone(&self.config), self.tokens)
    }

    /// A request that has claimed its record and gone upstream.
    fn forwarded(&mut self) -> Exchange {
        let mut exchange = self.exchange();
        assert_eq!(self.request(&mut exchange, "POST", b"{}"), Step::Forward);
        exchange
    }

    /// Carries a step through the store, as the glue does.
    fn settle(&mut self, exchange: &mut Exchange, mut step: Step) -> Step {
        loop {
            step = match step {
                Step::Claim(claim) => match self.store.claim(&claim, self.now) {
                    Answer::Now(reply) => exchange.on_claim(reply, true, self.now),
                    other => panic!("shared data answers now: {other:?}"),
                },
                Step::Finish(ticket, outcome) => {
                    match self.store.finish(ticket, outcome, self.now) {
                        Answer::Now(reply) => exchange.on_finish(reply),
                        other => panic!("shared data answers now: {other:?}"),
                    }
                    return Step::Done;
                }
                other => return other,
            }
        }
    }

    fn request(&mut self, exchange: &mut Exchange, method: &str, body: &[u8]) -> Step {
        let step = exchange.on_request_headers(
            method,
            b"/v1/customers?x=1",
            &headers(&POST_HEADERS),
            false,
        );
        assert_eq!(step, Step::Buffer);
        let step = exchange.on_request_body(body.len(), true, |from| body[from..].to_vec());
        self.settle(exchange, step)
    }

    fn respond(&mut self, exchange: &mut Exchange, status: &str, body: &[u8]) -> Step {
        let response = headers(&[
            (":status", status.as_bytes()),
            ("set-cookie", b"s=1"),
            ("content-length", b"2"),
        ]);
        exchange.on_response_headers(&response, true, false);
        exchange.on_response_body(body, true);
        let step = exchange.on_end(StreamEnd::Unflagged);
        self.settle(exchange, step)
    }
}

fn reply_of(step: Step) -> LocalReply {
    match step {
        Step::Reply(reply) => reply,
        other => panic!("expected a local reply, got {other:?}"),
    }
}

fn code_of(step: Step) -> (u16, String) {
    let reply = reply_of(step);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    (
        reply.status,
        body["code"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn uncovered_methods_and_keyless_requests_pass_untouched() {
    let mut run = Run::new("{}");
    let mut get = run.exchange();
    assert_eq!(
        get.on_request_headers("GET", b"/v1", &headers(&POST_HEADERS), true),
        Step::Pass
    );
    let mut keyless = run.exchange();
    let step =
        keyless.on_request_headers("POST", b"/v1", &headers(&[("authorization", b"x")]), false);
    assert_eq!(step, Step::Pass);
    assert_eq!(run.kv.keys(), 1, "only the boot key: nothing was stored");
}

#[test]
fn require_key_refuses_keyless_requests() {
    let mut run = Run::new(r#"{"require_key": true}"#);
    let mut exchange = run.exchange();
    let step = exchange.on_request_headers("POST", b"/v1", &headers(&[]), true);
    assert_eq!(code_of(step), (400, "idempotency_key_missing".into()));
    assert_eq!(exchange.take_counts(), [Counter::KeyMissing]);
}

#[test]
fn invalid_keys_are_refused_before_the_body() {
    let mut run = Run::new("{}");
    let mut exchange = run.exchange();
    let bad = headers(&[("idempotency-key", &[b'k'; 256])]);
    let step = exchange.on_request_headers("POST", b"/v1", &bad, false);
    assert_eq!(code_of(step), (400, "idempotency_key_invalid".into()));
}

#[test]
fn requests_without_a_scope_are_not_given_a_shared_record() {
    let mut run = Run::new("{}");
    let absent = headers(&[("idempotency-key", b"k")]);
    let blank = headers(&[("idempotency-key", b"k"), ("authorization", b" ")]);
    for request in [absent, blank] {
        let mut exchange = run.exchange();
        let step = exchange.on_request_headers("POST", b"/v1", &request, false);
        assert_eq!(step, Step::Pass);
        assert_eq!(exchange.take_counts(), [Counter::Bypassed]);
    }
}

#[test]
fn excluded_paths_pass_untouched() {
    let mut run = Run::new(r#"{"exclude_paths": ["/v1/customers"]}"#);
    let mut exchange = run.exchange();
    let step =
        exchange.on_request_headers("POST", b"/v1/customers?x=1", &headers(&POST_HEADERS), false);
    assert_eq!(step, Step::Pass);
}

#[test]
fn an_oversized_request_body_is_refused_with_413() {
    let mut run = Run::new(r#"{"max_request_body_bytes": 10}"#);
    let mut exchange = run.exchange();
    exchange.on_request_headers("POST", b"/v1", &headers(&POST_HEADERS), false);
    assert_eq!(
        exchange.on_request_body(10, false, |_| vec![b'x'; 10]),
        Step::Buffer
    );
    let step = exchange.on_request_body(11, false, |_| panic!("not read"));
    assert_eq!(code_of(step), (413, "request_too_large".into()));
}

#[test]
fn first_request_forwards_and_its_stored_response_replays_verbatim() {
    let mut run = Run::new("{}");
    let mut first = run.exchange();
    assert_eq!(run.request(&mut first, "POST", b"{}"), Step::Forward);
    run.respond(&mut first, "201", b"ok");
    assert_eq!(first.take_counts(), [Counter::Claimed, Counter::Stored]);
    assert_eq!(first.take_samples(), [(Histogram::StoredResponseBytes, 2)]);

    let mut again = run.exchange();
    let reply = reply_of(run.request(&mut again, "POST", b"{}"));
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body, b"ok");
    assert_eq!(
        reply.headers,
        [
            ("set-cookie".to_string(), "s=1".to_string()),
            ("idempotent-replayed".to_string(), "true".to_string())
        ],
        "hop-by-hop and length headers are not stored"
    );
}

#[test]
fn an_empty_bodied_replay_asks_for_its_headers_back() {
    let mut run = Run::new("{}");
    let mut first = run.forwarded();
    let response = [
        (":status", b"201".as_slice()),
        ("content-type", b"text/plain"),
        ("content-length", b"0"),
    ];
    first.on_response_headers(&headers(&response), true, true);
    let step = first.on_end(StreamEnd::Unflagged);
    run.settle(&mut first, step);
    assert!(first.take_headers_to_restore().is_empty());
    let mut again = run.exchange();
    let reply = reply_of(run.request(&mut again, "POST", b"{}"));
    assert!(reply.body.is_empty());
    assert!(reply
        .headers
        .contains(&("content-length".to_string(), "0".to_string())));
    assert_eq!(again.take_headers_to_restore(), reply.headers);
    assert!(again.take_headers_to_restore().is_empty(), "once");
}

#[test]
fn a_different_body_conflicts() {
    let mut run = Run::new("{}");
    let mut first = run.forwarded();
    run.respond(&mut first, "201", b"ok");
    let mut other = run.exchange();
    let step = run.request(&mut other, "POST", b"{\"a\":1}");
    assert_eq!(code_of(step), (409, "idempotency_conflict".into()));
}

#[test]
fn unstored_statuses_release_the_claim_so_a_retry_runs() {
    let mut run = Run::new("{}");
    for status in ["500", "503", "408", "425", "429"] {
        let mut attempt = run.exchange();
        assert_eq!(
            run.request(&mut attempt, "POST", b"{}"),
            Step::Forward,
            "{status}"
        );
        run.respond(&mut attempt, status, b"no");
        assert_eq!(attempt.take_counts(), [Counter::Claimed, Counter::Released]);
    }
}

#[test]
fn a_duplicate_waits_then_replays_the_original() {
    let mut run = Run::new("{}");
    let mut first = run.forwarded();
    let mut duplicate = run.exchange();
    assert_eq!(run.request(&mut duplicate, "POST", b"{}"), Step::Wait);
    assert!(duplicate.is_waiting());
    run.respond(&mut first, "201", b"ok");
    run.now += 20;
    let claim = duplicate.pending_claim().unwrap();
    let reply = reply_of(run.settle(&mut duplicate, Step::Claim(claim)));
    assert_eq!(reply.body, b"ok");
    assert_eq!(
        duplicate.take_counts(),
        [Counter::Waited, Counter::Replayed]
    );
    assert_eq!(
        duplicate.take_samples(),
        [
            (Histogram::ReplayedAgeMillis, 20),
            (Histogram::WaitMillis, 20)
        ],
        "stored 20 ms before it replays, when the duplicate had waited 20 ms"
    );
    assert_eq!(duplicate.take_record_age(), Some(20));
}

#[test]
fn a_waiting_duplicate_takes_over_a_released_claim() {
    let mut run = Run::new("{}");
    let mut first = run.forwarded();
    let mut duplicate = run.exchange();
    assert_eq!(run.request(&mut duplicate, "POST", b"{}"), Step::Wait);
    run.respond(&mut first, "503", b"down");
    let claim = duplicate.pending_claim().unwrap();
    assert_eq!(
        run.settle(&mut duplicate, Step::Claim(claim)),
        Step::Forward
    );
    assert_eq!(
        duplicate.take_counts(),
        [Counter::Waited, Counter::Claimed, Counter::TakenOver]
    );
    assert!(duplicate.is_owner());
}

#[test]
fn waiting_ends_with_in_progress_after_max_wait() {
    let mut run = Run::new(r#"{"max_wait": "100ms"}"#);
    let _original = run.forwarded();
    let mut duplicate = run.exchange();
    assert_eq!(run.request(&mut duplicate, "POST", b"{}"), Step::Wait);
    run.now += 100;
    assert!(duplicate.wait_is_over(run.now));
    let reply = reply_of(duplicate.give_up_waiting(run.now));
    assert_eq!(reply.status, 503, "a status the seed's loop retries");
    assert!(reply.headers.iter().any(|(n, _)| n == "retry-after"));
    assert_eq!(duplicate.take_samples(), [(Histogram::WaitMillis, 100)]);
}

#[test]
fn a_store_failure_while_waiting_never_sends_the_duplicate_upstream() {
    let mut run = Run::new(r#"{"when_full": "pass", "max_wait": "100ms"}"#);
    let _original = run.forwarded();
    let mut duplicate = run.exchange();
    assert_eq!(run.request(&mut duplicate, "POST", b"{}"), Step::Wait);
    let failed = || Err(StoreError::Remote("timeout".into()));
    assert_eq!(duplicate.on_claim(failed(), true, run.now + 50), Step::Wait);
    assert!(duplicate.is_waiting());
    let step = duplicate.on_claim(failed(), true, run.now + 100);
    assert_eq!(code_of(step), (503, "idempotency_in_progress".into()));
    assert_eq!(
        duplicate.take_counts(),
        [
            Counter::Waited,
            Counter::StoreError,
            Counter::StoreError,
            Counter::InProgress
        ]
    );
}

#[test]
fn without_room_to_wait_a_duplicate_is_answered_in_progress_at_once() {
    let mut run = Run::new("{}");
    let _original = run.forwarded();
    let mut duplicate = run.exchange();
    duplicate.on_request_headers("POST", b"/v1/customers?x=1", &headers(&POST_HEADERS), false);
    let Step::Claim(claim) = duplicate.on_request_body(2, true, |_| b"{}".to_vec()) else {
        panic!("expected a claim");
    };
    let Answer::Now(reply) = run.store.claim(&claim, run.now) else {
        panic!("shared data answers now");
    };
    let step = duplicate.on_claim(reply, false, run.now);
    assert_eq!(code_of(step), (503, "idempotency_in_progress".into()));
}

#[test]
fn unknown_endings_hold_the_claim_and_known_local_replies_release_it() {
    let mut run = Run::new("{}");
    // Upstream timeout: Envoy's own 504, flagged UT.
    let mut timed_out = run.forwarded();
    timed_out.on_response_headers(&[], false, false);
    let step = timed_out.on_end(StreamEnd::Interrupted);
    assert!(matches!(&step, Step::Finish(ticket, Ending::Held) if ticket.claim.token == 1));
    run.settle(&mut timed_out, step);
    let mut retry = run.exchange();
    let (status, code) = code_of(run.request(&mut retry, "POST", b"{}"));
    assert_eq!((status, code.as_str()), (503, "idempotency_in_progress"));
    // Connection failure: Envoy's own 503, flagged UF (not an interruption): never ran.
    let mut other = run.exchange();
    let step = other.on_request_headers("POST", b"/v2", &headers(&POST_HEADERS), true);
    let step = run.settle(&mut other, step);
    assert_eq!(step, Step::Forward);
    other.on_response_headers(&[], false, false);
    assert!(matches!(
        other.on_end(StreamEnd::Unflagged),
        Step::Finish(_, Ending::Released)
    ));
}

#[test]
fn a_client_gone_mid_body_holds_the_claim() {
    let mut run = Run::new("{}");
    let mut first = run.forwarded();
    first.on_response_headers(&headers(&[(":status", b"201")]), true, false);
    first.on_response_body(b"partial", false);
    assert!(matches!(
        first.on_end(StreamEnd::Interrupted),
        Step::Finish(_, Ending::Held)
    ));
}

#[test]
fn with_a_zero_lease_unknown_endings_release_at_once() {
    let mut run = Run::new(r#"{"lease": "0s"}"#);
    let mut first = run.forwarded();
    assert!(matches!(
        first.on_end(StreamEnd::Interrupted),
        Step::Finish(_, Ending::Released)
    ));
}

#[test]
fn an_oversized_response_reaches_its_client_and_keeps_the_record_without_it() {
    let mut run = Run::new(r#"{"max_response_body_bytes": 4}"#);
    let mut first = run.forwarded();
    run.respond(&mut first, "201", b"too long");
    assert_eq!(
        first.take_counts(),
        [Counter::Claimed, Counter::ResponseTooLarge]
    );
    let mut retry = run.exchange();
    let step = run.request(&mut retry, "POST", b"{}");
    assert_eq!(
        code_of(step),
        (409, "idempotency_response_not_stored".into())
    );
}

#[test]
fn a_full_store_rejects_or_passes_as_configured() {
    for (policy, expect_reply) in [("reject", true), ("pass", false)] {
        let json =
            format!(r#"{{"capacity_records": 16, "max_share": 1, "when_full": "{policy}"}}"#);
        let mut run = Run::new(&json);
        for n in 0..16u8 {
            let mut exchange = run.exchange();
            let key = [b'k', b'a' + n];
            let pairs = [
                ("authorization", b"a".as_slice()),
                ("idempotency-key", &key),
            ];
            let step = exchange.on_request_headers("POST", b"/v1", &headers(&pairs), true);
            let step = run.settle(&mut exchange, step);
            assert_eq!(step, Step::Forward);
        }
        let mut exchange = run.exchange();
        let pairs = [
            ("authorization", b"a".as_slice()),
            ("idempotency-key", b"last"),
        ];
        let step = exchange.on_request_headers("POST", b"/v1", &headers(&pairs), true);
        let step = run.settle(&mut exchange, step);
        if expect_reply {
            assert_eq!(code_of(step), (503, "idempotency_store_full".into()));
        } else {
            assert_eq!(step, Step::Forward);
            assert!(!exchange.is_owner());
        }
    }
}

#[test]
fn the_in_progress_and_conflict_statuses_are_the_configured_ones() {
    let mut run = Run::new(r#"{"in_progress_status": 409, "conflict_status": 422}"#);
    let _original = run.forwarded();
    let mut duplicate = run.exchange();
    let step = run.request(&mut duplicate, "POST", b"{}");
    assert_eq!(step, Step::Wait);
    assert_eq!(
        code_of(duplicate.give_up_waiting(run.now)),
        (409, "idempotency_in_progress".into())
    );
    let mut other = run.exchange();
    let step = run.request(&mut other, "POST", b"{\"other\": 1}");
    assert_eq!(code_of(step), (422, "idempotency_conflict".into()));
}

#[test]
fn a_route_s_policy_decides_its_requests_and_its_records_lifetimes() {
    let mut run = Run::new(r#"{"route_metadata": true}"#);
    let fields = serde_json::json!({"ttl": "1h", "lease": "5s", "require_key": true});
    let route = run
        .config
        .route_policy(fields.as_object().cloned().unwrap());
    let route = Rc::new(route.unwrap().unwrap());
    let mut keyless = run.exchange();
    keyless.follow(Rc::clone(&route));
    let step = keyless.on_request_headers("POST", b"/v1", &headers(&[]), true);
    assert_eq!(code_of(step), (400, "idempotency_key_missing".into()));
    let mut exchange = run.exchange();
    exchange.follow(route);
    let step = exchange.on_request_headers("POST", b"/v1", &headers(&POST_HEADERS), true);
    let Step::Claim(claim) = step else {
        panic!("expected a claim, got {step:?}");
    };
    assert_eq!((claim.ttl, claim.lease), (3_600_000, 5_000));
    // The listener's own requests keep the listener's.
    let mut listener = run.exchange();
    let step = listener.on_request_headers("POST", b"/v1", &headers(&POST_HEADERS), true);
    assert!(matches!(
        step,
        Step::Claim(Claim {
            ttl: 86_400_000,
            lease: 60_000,
            ..
        })
    ));
}

#[test]
fn a_request_on_a_misconfigured_route_is_refused_naming_the_route_and_field() {
    let mut run = Run::new("{}");
    let mut exchange = run.exchange();
    let error = ConfigError {
        field: "ttl".into(),
        reason: "must be longer than 0s".into(),
    };
    let reply = reply_of(exchange.refuse_route("payments", &error));
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        (reply.status, body["code"].as_str()),
        (500, Some("idempotency_route_misconfigured"))
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("`payments`") && detail.contains("`ttl`"),
        "{detail}"
    );
    assert_eq!(exchange.take_counts(), [Counter::RouteMisconfigured]);
    assert_eq!(run.kv.keys(), 1, "nothing was claimed");
}

#[test]
fn each_body_callback_reads_only_the_bytes_that_are_new() {
    let mut run = Run::new("{}");
    let mut exchange = run.exchange();
    let body = b"{\"name\":\"Jane\"}";
    exchange.on_request_headers("POST", b"/v1?x=1", &headers(&POST_HEADERS), false);
    let mut reads = Vec::new();
    for (size, end) in [(5, false), (5, false), (11, false), (body.len(), true)] {
        let step = exchange.on_request_body(size, end, |from| {
            reads.push(from..size);
            body[from..size].to_vec()
        });
        if end {
            let Step::Claim(claim) = step else {
                panic!("expected a claim, got {step:?}");
            };
            assert_eq!(claim.fingerprint, identity::fingerprint_of(b"x=1", body));
        }
    }
    assert_eq!(reads, [0..5, 5..11, 11..body.len()]);
}

mod body;
mod from_root;
