//! One request's way through the filter, as a state machine driven by host events.
//!
//! The glue hands each event in (headers, a body chunk, the store's answer, the response, the
//! end of the stream) and gets back a [`Step`] to carry out. Store operations are steps too, so
//! a store that answers later (by callback) drives the same machine as one that answers now.

use crate::core::config::{Config, WhenFull};
use crate::core::counters::Counter;
use crate::core::identity::{self, Digest32, InvalidKey};
use crate::core::lifecycle::{Block, Claim, Ending, Finished, Verdict};
use crate::core::problem::{self, whole_seconds, LocalReply, Problem};
use crate::core::record::StoredResponse;
use crate::core::store::{ClaimReply, StoreError, Ticket};
use crate::core::Millis;
use std::rc::Rc;

/// What the glue must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Let the request go on, untouched by idempotency.
    Pass,
    /// Hold the request while its body arrives.
    Buffer,
    /// Ask the store for this claim and hand the answer to [`Exchange::on_claim`].
    Claim(Claim),
    /// Send the request upstream as the record's owner.
    Forward,
    /// Hold the request; ask the store again (with the same claim) on the next poll.
    Wait,
    /// Answer locally; nothing reaches the upstream.
    Reply(LocalReply),
    /// Record how the owner's attempt ended, and hand the answer to [`Exchange::on_finish`].
    Finish(Ticket, Ending<StoredResponse>),
    /// Nothing more to do.
    Done,
}

/// How the stream ended, as far as an owner with no complete response is concerned; the glue
/// tells it from Envoy's response flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamEnd {
    /// No flag saying why the response is missing or cut short.
    #[default]
    Unflagged,
    /// A timeout, reset or termination: the upstream may have done the work although no
    /// complete response came back.
    Interrupted,
}

/// Hop-by-hop headers, and those Envoy sets itself on every answer, are not stored.
const UNSTORED_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "content-length",
    "x-envoy-upstream-service-time",
    ":status",
];

/// A request's place in the flow.
#[derive(Debug)]
enum Phase {
    /// Not looked at yet.
    New,
    /// Covered; its body is being buffered.
    Buffering {
        tuple: Digest32,
        org: u16,
        query: Vec<u8>,
        size: usize,
    },
    /// Waiting for the store's answer to `claim`.
    Claiming {
        claim: Claim,
        waiting_since: Option<Millis>,
    },
    /// Forwarded as the owner of `ticket`; the response is being captured.
    Owner { ticket: Ticket },
    /// Finished with idempotency (passed, answered locally, or ended).
    Out,
}

#[derive(Debug, Default)]
struct Capture {
    /// `Some` once response headers arrive from the upstream (`via_upstream`).
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    complete: bool,
    /// The body went past `max_response_body_bytes`, or a header could not be stored.
    unstorable: bool,
    /// Headers arrived, but from Envoy rather than the upstream.
    local_reply: bool,
    /// The upstream said `content-length: 0`: kept for an empty body, which Envoy's local-reply
    /// path would otherwise answer without a length over HTTP/2.
    declared_empty: bool,
}

pub struct Exchange {
    config: Rc<Config>,
    phase: Phase,
    capture: Capture,
    counts: Vec<Counter>,
    token: u64,
    /// Envoy's `x-request-id`, for log lines.
    request_id: String,
    /// The headers of an empty-bodied replay, which Envoy's local-reply path drops
    /// (`content-type`): put back when the reply's own headers pass the filter.
    restore: Vec<(String, String)>,
}

impl Exchange {
    /// `token` must be unique to this attempt across every worker of the process.
    pub fn new(config: Rc<Config>, token: u64) -> Exchange {
        Exchange {
            config,
            phase: Phase::New,
            capture: Capture::default(),
            counts: Vec::new(),
            token,
            request_id: String::new(),
            restore: Vec::new(),
        }
    }

    /// Envoy's `x-request-id`, for log lines.
    pub fn set_request_id(&mut self, id: String) {
        self.request_id = id;
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The counters this exchange moved since the last call.
    pub fn take_counts(&mut self) -> Vec<Counter> {
        std::mem::take(&mut self.counts)
    }

    fn count(&mut self, counter: Counter) {
        self.counts.push(counter);
    }

    fn answer(&mut self, counter: Counter, reply: LocalReply) -> Step {
        self.count(counter);
        self.phase = Phase::Out;
        Step::Reply(reply)
    }

    /// Whether the request is held waiting for an original.
    #[cfg(test)]
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.phase,
            Phase::Claiming {
                waiting_since: Some(_),
                ..
            }
        )
    }

    /// The request headers: decides whether the request is covered and, if so, its record.
    pub fn on_request_headers(
        &mut self,
        method: &str,
        path: &[u8],
        headers: &[(String, Vec<u8>)],
        end_of_stream: bool,
    ) -> Step {
        let (path, query) = identity::split_path(path);
        if !self.config.covers(method) || !self.config.covers_path(path) {
            self.phase = Phase::Out;
            return Step::Pass;
        }
        let key = match identity::key_of(headers, &self.config.key_header) {
            Ok(Some(key)) => key,
            Ok(None) if self.config.require_key => {
                let detail = format!("{} requests need an Idempotency-Key header", method);
                return self.answer(
                    Counter::KeyMissing,
                    Problem::KeyMissing.reply(&detail, None),
                );
            }
            Ok(None) => {
                self.phase = Phase::Out;
                return Step::Pass;
            }
            Err(InvalidKey(why)) => {
                let detail = format!("{why}; a key is 1 to 255 visible ASCII characters");
                return self.answer(
                    Counter::KeyInvalid,
                    Problem::KeyInvalid.reply(&detail, None),
                );
            }
        };
        let scope = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&self.config.scope_header))
            .and_then(|(_, value)| identity::scope_of_header(value));
        let Some(scope) = scope else {
            // No organisation to keep records apart: never share one record between strangers.
            self.count(Counter::Bypassed);
            self.phase = Phase::Out;
            return Step::Pass;
        };
        let tuple = identity::tuple_of(&scope, method, path, key);
        self.phase = Phase::Buffering {
            tuple,
            org: identity::org_tag(&scope),
            query: query.to_vec(),
            size: 0,
        };
        if end_of_stream {
            self.on_request_body(0, true, Vec::new)
        } else {
            Step::Buffer
        }
    }

    /// The request body: `size` bytes buffered so far; at the end of the stream `read` gives
    /// them all. Bodies over `max_request_body_bytes` are refused before they are read.
    pub fn on_request_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: impl FnOnce() -> Vec<u8>,
    ) -> Step {
        let Phase::Buffering {
            tuple, org, query, ..
        } = &self.phase
        else {
            return Step::Pass;
        };
        if size > self.config.max_request_body_bytes {
            let detail = format!(
                "the request body is larger than {} bytes",
                self.config.max_request_body_bytes
            );
            return self.answer(
                Counter::RequestTooLarge,
                Problem::RequestTooLarge.reply(&detail, None),
            );
        }
        if !end_of_stream {
            if let Phase::Buffering { size: buffered, .. } = &mut self.phase {
                *buffered = size;
            }
            return Step::Buffer;
        }
        let claim = Claim {
            tuple: *tuple,
            fingerprint: identity::fingerprint_of(query, &read()),
            token: self.token,
            lease: self.config.claim_lease(),
            org: *org,
        };
        self.phase = Phase::Claiming {
            claim,
            waiting_since: None,
        };
        Step::Claim(claim)
    }

    /// Request trailers end the body: its size is what the last body callback reported.
    pub fn on_request_body_end(&mut self, read: impl FnOnce(usize) -> Vec<u8>) -> Step {
        match self.phase {
            Phase::Buffering { size, .. } => self.on_request_body(size, true, || read(size)),
            _ => Step::Pass,
        }
    }

    /// Whether this request owns its record (and so captures the response).
    pub fn is_owner(&self) -> bool {
        matches!(self.phase, Phase::Owner { .. })
    }

    /// The store's answer to the claim. `room_to_wait` says whether the waiting room (bounded by
    /// `max_waiting`) has a place for this request.
    pub fn on_claim(
        &mut self,
        reply: Result<ClaimReply, StoreError>,
        room_to_wait: bool,
        now: Millis,
    ) -> Step {
        let Phase::Claiming {
            claim,
            waiting_since,
        } = self.phase
        else {
            return Step::Done;
        };
        let reply = match reply {
            Ok(reply) => reply,
            // A request that has seen its key claimed by another attempt never goes upstream on
            // a store failure: it asks again on the next poll, within `max_wait`.
            Err(_) if waiting_since.is_some() => {
                self.count(Counter::StoreError);
                return self.keep_waiting(claim, waiting_since, now);
            }
            Err(_) => {
                self.count(Counter::StoreError);
                return self.when_full(
                    Problem::StoreUnavailable,
                    "the idempotency store cannot be reached right now",
                );
            }
        };
        match reply {
            Verdict::Claimed(ticket) => {
                self.count(Counter::Claimed);
                if waiting_since.is_some() {
                    self.count(Counter::TakenOver);
                }
                self.phase = Phase::Owner { ticket };
                Step::Forward
            }
            Verdict::Replay(response) => {
                let reply = problem::replay(response);
                if reply.body.is_empty() {
                    self.restore = reply.headers.clone();
                }
                self.answer(Counter::Replayed, reply)
            }
            Verdict::Blocked(Block::Conflict) => self.answer(
                Counter::Conflict,
                Problem::Conflict.reply(
                    "this Idempotency-Key was used with a different request body or query string",
                    None,
                ),
            ),
            Verdict::Blocked(Block::InFlight { .. }) if waiting_since.is_some() => {
                self.keep_waiting(claim, waiting_since, now)
            }
            Verdict::Blocked(Block::InFlight { .. }) if room_to_wait && self.config.max_wait > 0 => {
                self.count(Counter::Waited);
                self.keep_waiting(claim, Some(now), now)
            }
            Verdict::Blocked(Block::InFlight { .. }) => self.give_up_waiting(),
            Verdict::Blocked(Block::Held { remaining }) => self.answer(
                Counter::InProgress,
                Problem::InProgress.reply(
                    "an earlier request with this Idempotency-Key ended without a known outcome; \
                     retry after its lease ends",
                    Some(whole_seconds(remaining)),
                ),
            ),
            Verdict::Blocked(Block::NotStored) => self.answer(
                Counter::ResponseNotStored,
                Problem::ResponseNotStored.reply(
                    "the request with this Idempotency-Key ran, but its response was too large to store",
                    None,
                ),
            ),
            Verdict::Blocked(Block::Full) => {
                self.count(Counter::StoreFull);
                self.when_full(Problem::StoreFull, "no room for another record right now")
            }
            Verdict::Blocked(Block::QuotaExceeded) => self.answer(
                Counter::QuotaExceeded,
                Problem::QuotaExceeded.reply(
                    "this organisation holds its whole share of the idempotency store, \
                     all of it still in flight",
                    Some(1),
                ),
            ),
        }
    }

    fn when_full(&mut self, problem: Problem, detail: &str) -> Step {
        match self.config.when_full {
            WhenFull::Pass => {
                self.count(Counter::Bypassed);
                self.phase = Phase::Out;
                Step::Forward
            }
            WhenFull::Evict | WhenFull::Reject => {
                self.answer(Counter::Rejected, problem.reply(detail, Some(1)))
            }
        }
    }

    /// Response headers. `via_upstream` is false for Envoy's own local replies.
    pub fn on_response_headers(
        &mut self,
        headers: &[(String, Vec<u8>)],
        via_upstream: bool,
        end_of_stream: bool,
    ) {
        if !matches!(self.phase, Phase::Owner { .. }) {
            return;
        }
        if !via_upstream {
            self.capture.local_reply = true;
            return;
        }
        for (name, value) in headers {
            if name == ":status" {
                self.capture.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            } else if name == "content-length" {
                self.capture.declared_empty = value.as_slice() == b"0";
            } else if !UNSTORED_HEADERS.contains(&name.as_str()) {
                match String::from_utf8(value.clone()) {
                    Ok(value) => self.capture.headers.push((name.clone(), value)),
                    // Local replies carry text headers only: such a response cannot be replayed.
                    Err(_) => self.capture.unstorable = true,
                }
            }
        }
        self.capture.complete = end_of_stream;
    }

    /// The headers a replay sent without a body must carry, once, when its response headers
    /// pass the filter (the glue adds the ones Envoy left out).
    pub fn take_headers_to_restore(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.restore)
    }

    /// Whether the glue should copy response body chunks (the response is being captured).
    pub fn wants_response_body(&self) -> bool {
        matches!(self.phase, Phase::Owner { .. })
            && self.capture.status.is_some()
            && !self.capture.unstorable
    }

    /// One chunk of the response body, as it streams to the client.
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) {
        if self.wants_response_body() {
            if self.capture.body.len() + chunk.len() > self.config.max_response_body_bytes {
                self.capture.unstorable = true;
                self.capture.body = Vec::new();
            } else {
                self.capture.body.extend_from_slice(chunk);
            }
        }
        self.capture.complete |= end_of_stream;
    }

    /// Trailers end the response body.
    pub fn on_response_trailers(&mut self) {
        self.capture.complete = true;
    }

    /// The stream ended (`on_log`).
    pub fn on_end(&mut self, end: StreamEnd) -> Step {
        let Phase::Owner { ticket } = self.phase else {
            self.phase = Phase::Out;
            return Step::Done;
        };
        self.phase = Phase::Out;
        let capture = std::mem::take(&mut self.capture);
        let outcome = match capture.status {
            Some(status) if !self.config.stores_status(status) => Ending::Released,
            Some(_) if !capture.complete => Ending::Held,
            Some(_) if capture.unstorable => Ending::Unstored { no_room: false },
            Some(status) => {
                let mut headers = capture.headers;
                if capture.declared_empty && capture.body.is_empty() {
                    headers.push(("content-length".to_string(), "0".to_string()));
                }
                Ending::Stored(StoredResponse {
                    status,
                    headers,
                    body: capture.body,
                })
            }
            None if end == StreamEnd::Interrupted => Ending::Held,
            // Envoy answered without the upstream: connection failure, no healthy host, no route.
            None if capture.local_reply => Ending::Released,
            // No answer at all and no flag saying why: assume the work may have run.
            None => Ending::Held,
        };
        let outcome = match outcome {
            Ending::Held if self.config.lease == 0 => Ending::Released,
            outcome => outcome,
        };
        Step::Finish(ticket, outcome)
    }

    /// The store's answer to the finish.
    pub fn on_finish(&mut self, reply: Result<Finished, StoreError>) {
        self.count(finish_counter(&reply));
    }

    /// Holds a request that waits for its original, unless it has waited `max_wait`.
    fn keep_waiting(&mut self, claim: Claim, since: Option<Millis>, now: Millis) -> Step {
        let since = since.unwrap_or(now);
        if now.saturating_sub(since) >= self.config.max_wait {
            return self.give_up_waiting();
        }
        self.phase = Phase::Claiming {
            claim,
            waiting_since: Some(since),
        };
        Step::Wait
    }

    /// The original is still running and this request waits no longer (`max_wait` over, or no
    /// room in the waiting room).
    pub fn give_up_waiting(&mut self) -> Step {
        if !matches!(self.phase, Phase::Claiming { .. }) {
            return Step::Done;
        }
        self.answer(
            Counter::InProgress,
            Problem::InProgress.reply(
                "a request with this Idempotency-Key is still being processed",
                Some(1),
            ),
        )
    }

    /// The claim a waiting request polls with.
    pub fn pending_claim(&self) -> Option<Claim> {
        match self.phase {
            Phase::Claiming { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// Whether a waiting request has waited `max_wait`.
    pub fn wait_is_over(&self, now: Millis) -> bool {
        match self.phase {
            Phase::Claiming {
                waiting_since: Some(since),
                ..
            } => now.saturating_sub(since) >= self.config.max_wait,
            _ => false,
        }
    }
}

/// The counter for how a finish went (also for finishes whose request is gone).
pub fn finish_counter(reply: &Result<Finished, StoreError>) -> Counter {
    match reply {
        Ok(Finished::Recorded(ending)) => match ending {
            Ending::Stored(()) => Counter::Stored,
            Ending::Unstored { no_room: true } => Counter::StoreFull,
            Ending::Unstored { no_room: false } => Counter::ResponseTooLarge,
            Ending::Released => Counter::Released,
            Ending::Held => Counter::Held,
        },
        Ok(Finished::Lost) => Counter::LeaseExpired,
        Err(_) => Counter::StoreError,
    }
}

#[cfg(test)]
mod tests {
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
            let step = exchange.on_request_body(body.len(), true, || body.to_vec());
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
        let step = exchange.on_request_headers(
            "POST",
            b"/v1/customers?x=1",
            &headers(&POST_HEADERS),
            false,
        );
        assert_eq!(step, Step::Pass);
    }

    #[test]
    fn an_oversized_request_body_is_refused_with_413() {
        let mut run = Run::new(r#"{"max_request_body_bytes": 10}"#);
        let mut exchange = run.exchange();
        exchange.on_request_headers("POST", b"/v1", &headers(&POST_HEADERS), false);
        assert_eq!(exchange.on_request_body(10, false, Vec::new), Step::Buffer);
        let step = exchange.on_request_body(11, false, || panic!("not read"));
        assert_eq!(code_of(step), (413, "request_too_large".into()));
    }

    #[test]
    fn first_request_forwards_and_its_stored_response_replays_verbatim() {
        let mut run = Run::new("{}");
        let mut first = run.exchange();
        assert_eq!(run.request(&mut first, "POST", b"{}"), Step::Forward);
        run.respond(&mut first, "201", b"ok");
        assert_eq!(first.take_counts(), [Counter::Claimed, Counter::Stored]);

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
        let reply = reply_of(duplicate.give_up_waiting());
        assert_eq!(reply.status, 409);
        assert!(reply.headers.iter().any(|(n, _)| n == "retry-after"));
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
        assert_eq!(code_of(step), (409, "idempotency_in_progress".into()));
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
        let Step::Claim(claim) = duplicate.on_request_body(2, true, || b"{}".to_vec()) else {
            panic!("expected a claim");
        };
        let Answer::Now(reply) = run.store.claim(&claim, run.now) else {
            panic!("shared data answers now");
        };
        let step = duplicate.on_claim(reply, false, run.now);
        assert_eq!(code_of(step), (409, "idempotency_in_progress".into()));
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
        assert_eq!((status, code.as_str()), (409, "idempotency_in_progress"));
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
}
