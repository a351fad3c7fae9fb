//! One request's way through the filter, as a state machine driven by host events.
//!
//! The glue hands each event in (headers, a body chunk, the store's answer, the response, the
//! end of the stream) and gets back a [`Step`] to carry out. Store operations are steps too, so
//! a store that answers later (by callback) drives the same machine as one that answers now.
//!
//! Here: the request's side and the store's verdicts. Beside it: what of the owner's response is
//! kept and how its attempt ended ([`capture`]), a request sent from the root context
//! ([`from_root`]), and a duplicate waiting for its original ([`waiting`]).

use crate::core::body::{Body, Found, Kind};
use crate::core::config::{Config, ConfigError, Policy, WhenFull};
use crate::core::identity::{self, Digest32, InvalidKey};
use crate::core::lifecycle::{Block, Claim, Ending, Finished, Verdict};
use crate::core::metrics::{Counter, Histogram};
use crate::core::problem::{self, whole_seconds, LocalReply, Problem};
use crate::core::record::StoredResponse;
use crate::core::store::{ClaimReply, Replay, StoreError, Ticket};
use crate::core::Millis;
use std::rc::Rc;

mod capture;
mod from_root;
mod waiting;

use capture::Capture;
use from_root::sendable;
pub use from_root::{Answered, RootRequest};

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
    /// Send the request upstream as the record's owner, from the root context, so that the
    /// attempt outlives its client; hand the answer to [`Exchange::on_upstream_answer`].
    SendFromRoot(RootRequest),
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

/// A request's place in the flow.
#[derive(Debug)]
enum Phase {
    /// Not looked at yet.
    New,
    /// Covered; its body is being buffered, and fingerprinted as it comes.
    Buffering {
        tuple: Tuple,
        org: u16,
        body: Body,
        /// Body bytes read so far.
        read: usize,
    },
    /// Waiting for the store's answer to `claim`.
    Claiming {
        claim: Claim,
        waiting_since: Option<Millis>,
    },
    /// Forwarded as the owner of `ticket`; the response is being captured.
    Owner { ticket: Ticket },
    /// Sent from the root context as the owner of `ticket`; its answer ends the claim, whether
    /// or not the client is still there.
    SentFromRoot { ticket: Ticket },
    /// Finished with idempotency (passed, answered locally, or ended).
    Out,
}

/// The record's identity, or what makes it once the body gives the key (`key_from_body`).
#[derive(Debug)]
enum Tuple {
    Known(Digest32),
    KeyInBody {
        scope: Digest32,
        method: String,
        path: Vec<u8>,
    },
}

pub struct Exchange {
    config: Rc<Config>,
    /// The policy of the request's route: the listener's unless the route gives its own.
    policy: Rc<Policy>,
    phase: Phase,
    capture: Capture,
    counts: Vec<Counter>,
    samples: Vec<(Histogram, u64)>,
    /// How old the record replayed was, for the access log.
    record_age: Option<Millis>,
    token: u64,
    /// Envoy's `x-request-id`, for log lines.
    request_id: String,
    /// The headers of an empty-bodied replay, which Envoy's local-reply path drops
    /// (`content-type`): put back when the reply's own headers pass the filter.
    restore: Vec<(String, String)>,
    /// Where the request goes if it is sent from the root context, once the glue says so.
    route: Option<(String, Millis)>,
    /// The request to send from the root context, gathered as it arrives.
    outgoing: Option<RootRequest>,
    /// The answer for the client of a request sent from the root context, if it is still there.
    client_reply: Option<LocalReply>,
    /// The client's stream ended. Envoy may still know its context for a while, but a reply to
    /// it would reach a stream being torn down.
    client_left: bool,
}

impl Exchange {
    /// `token` must be unique to this attempt across every worker of the process.
    pub fn new(config: Rc<Config>, token: u64) -> Exchange {
        Exchange {
            policy: Rc::clone(&config.policy),
            config,
            phase: Phase::New,
            capture: Capture::default(),
            counts: Vec::new(),
            samples: Vec::new(),
            record_age: None,
            token,
            request_id: String::new(),
            restore: Vec::new(),
            route: None,
            outgoing: None,
            client_reply: None,
            client_left: false,
        }
    }

    /// Decides the request by its route's `policy` instead of the listener's. Must come before
    /// the request headers.
    pub fn follow(&mut self, policy: Rc<Policy>) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Refuses a covered request on a route whose metadata the filter cannot follow (its
    /// `error`): it never runs with less protection than its route meant it to have.
    pub fn refuse_route(&mut self, route: &str, error: &ConfigError) -> Step {
        let detail = format!(
            "route `{route}` has an idempotency policy this filter cannot follow: `{}`: {}",
            error.field, error.reason
        );
        self.answer(
            Counter::RouteMisconfigured,
            Problem::RouteMisconfigured.reply(&detail, None),
        )
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

    /// What this exchange measured since the last call.
    pub fn take_samples(&mut self) -> Vec<(Histogram, u64)> {
        std::mem::take(&mut self.samples)
    }

    /// How old the record a replay came from was, once.
    pub fn take_record_age(&mut self) -> Option<Millis> {
        self.record_age.take()
    }

    fn answer(&mut self, counter: Counter, reply: LocalReply) -> Step {
        self.count(counter);
        self.phase = Phase::Out;
        Step::Reply(reply)
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
        if !self.policy.covers(method) || !self.config.covers_path(path) {
            self.phase = Phase::Out;
            return Step::Pass;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_slice())
        };
        let kind = Kind::of(header("content-type"));
        let key = match &self.policy.key_from_body {
            // The key comes with the body, which a bodiless or non-JSON request has not.
            Some(_) if kind != Kind::Json || end_of_stream => return self.keyless(method),
            Some(_) => None,
            None => match identity::key_of(headers, &self.policy.key_header) {
                Ok(Some(key)) => Some(key),
                Ok(None) => return self.keyless(method),
                Err(why) => return self.refuse_key(why),
            },
        };
        let Some(scope) = header(&self.policy.scope_header).and_then(identity::scope_of_header)
        else {
            // No organisation to keep records apart: never share one record between strangers.
            self.count(Counter::Bypassed);
            self.phase = Phase::Out;
            return Step::Pass;
        };
        let tuple = match key {
            Some(key) => Tuple::Known(identity::tuple_of(&scope, method, path, key)),
            None => Tuple::KeyInBody {
                scope,
                method: method.to_string(),
                path: path.to_vec(),
            },
        };
        if let Some((cluster, timeout)) = self.route.take() {
            self.outgoing = sendable(headers).map(|headers| RootRequest {
                cluster,
                headers,
                body: Vec::new(),
                timeout,
            });
        }
        self.phase = Phase::Buffering {
            tuple,
            org: identity::org_tag(&scope),
            body: Body::new(query, kind, self.policy.asked()),
            read: 0,
        };
        if end_of_stream {
            self.claim()
        } else {
            Step::Buffer
        }
    }

    /// A covered request with no key: refused under `require_key`, else passed untouched.
    fn keyless(&mut self, method: &str) -> Step {
        self.outgoing = None;
        self.phase = Phase::Out;
        if !self.policy.require_key {
            return Step::Pass;
        }
        let detail = match &self.policy.key_from_body {
            Some(pointer) => {
                format!("{method} requests need an idempotency key at `{pointer}` in a JSON body")
            }
            None => format!("{method} requests need an Idempotency-Key header"),
        };
        self.answer(
            Counter::KeyMissing,
            Problem::KeyMissing.reply(&detail, None),
        )
    }

    fn refuse_key(&mut self, InvalidKey(why): InvalidKey) -> Step {
        let detail = format!("{why}; a key is 1 to 255 visible ASCII characters");
        self.answer(
            Counter::KeyInvalid,
            Problem::KeyInvalid.reply(&detail, None),
        )
    }

    /// The request body: `size` bytes buffered so far, of which `read` gives those from an
    /// offset on. Each callback reads only the bytes that are new and fingerprints them as they
    /// arrive. Bodies over `max_request_body_bytes` are refused before they are read.
    pub fn on_request_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        read: impl FnOnce(usize) -> Vec<u8>,
    ) -> Step {
        let Phase::Buffering {
            body, read: done, ..
        } = &mut self.phase
        else {
            return Step::Pass;
        };
        if size > self.policy.max_request_body_bytes {
            let detail = format!(
                "the request body is larger than {} bytes",
                self.policy.max_request_body_bytes
            );
            return self.answer(
                Counter::RequestTooLarge,
                Problem::RequestTooLarge.reply(&detail, None),
            );
        }
        if size > *done {
            let chunk = read(*done);
            *done += chunk.len();
            match &mut self.outgoing {
                Some(outgoing) if !body.holds() => outgoing.body.extend_from_slice(&chunk),
                _ => {}
            }
            body.update(chunk);
        }
        if end_of_stream {
            self.claim()
        } else {
            Step::Buffer
        }
    }

    /// Request trailers end the body, all of which the body callbacks read. Such a request goes
    /// through the router: the root context would send it without its trailers.
    pub fn on_request_body_end(&mut self) -> Step {
        self.outgoing = None;
        self.claim()
    }

    /// The whole body has come: the claim to ask the store for.
    fn claim(&mut self) -> Step {
        let Phase::Buffering {
            tuple, org, body, ..
        } = std::mem::replace(&mut self.phase, Phase::Out)
        else {
            return Step::Pass;
        };
        let whole = body.finish(self.policy.asked());
        if let Some(why) = whole.as_bytes {
            log::debug!(
                "request {}: fingerprinted by its bytes: {}",
                self.request_id,
                why.why()
            );
            self.count(Counter::FingerprintedAsBytes);
        }
        if let (Some(outgoing), Some(held)) = (&mut self.outgoing, whole.held) {
            outgoing.body = held;
        }
        let tuple = match tuple {
            Tuple::Known(tuple) => tuple,
            Tuple::KeyInBody {
                scope,
                method,
                path,
            } => match whole.key {
                None => return self.keyless(&method),
                Some(Found::NotText) => {
                    return self.refuse_key(InvalidKey(
                        "the key in the body is not a string or a number",
                    ))
                }
                Some(Found::Text(key)) => match identity::validate_key(identity::trim_ows(&key)) {
                    Ok(key) => identity::tuple_of(&scope, &method, &path, key),
                    Err(why) => return self.refuse_key(why),
                },
            },
        };
        let claim = Claim {
            tuple,
            fingerprint: whole.fingerprint,
            token: self.token,
            lease: self.policy.claim_lease(),
            ttl: self.policy.ttl,
            org,
        };
        self.phase = Phase::Claiming {
            claim,
            waiting_since: None,
        };
        Step::Claim(claim)
    }

    /// Whether this request owns its record (and so captures the response).
    pub fn is_owner(&self) -> bool {
        matches!(self.phase, Phase::Owner { .. })
    }

    /// Whether [`Exchange::on_end`] needs to know how the stream ended: only an owner that got
    /// no response from the upstream does.
    pub fn needs_stream_end(&self) -> bool {
        self.is_owner() && self.capture.status.is_none()
    }

    /// The store's answer to the claim. `room_to_wait` says whether the waiting room (bounded by
    /// `max_waiting`) has a place for this request.
    pub fn on_claim(
        &mut self,
        reply: Result<ClaimReply, StoreError>,
        room_to_wait: bool,
        now: Millis,
    ) -> Step {
        let waited_since = match self.phase {
            Phase::Claiming { waiting_since, .. } => waiting_since,
            _ => None,
        };
        let step = self.decide(reply, room_to_wait, now);
        if let (Some(since), false) = (waited_since, matches!(step, Step::Wait)) {
            self.waited(since, now);
        }
        step
    }

    fn decide(
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
                match self.outgoing.take() {
                    Some(outgoing) => {
                        self.count(Counter::SentFromRoot);
                        self.phase = Phase::SentFromRoot { ticket };
                        Step::SendFromRoot(outgoing)
                    }
                    None => {
                        self.phase = Phase::Owner { ticket };
                        Step::Forward
                    }
                }
            }
            Verdict::Replay(Replay { response, expires }) => {
                // The record was stored its route's ttl before it expires.
                let age = self.policy.ttl.saturating_sub(expires.saturating_sub(now));
                self.samples.push((Histogram::ReplayedAgeMillis, age));
                self.record_age = Some(age);
                let reply = problem::replay(response);
                if reply.body.is_empty() {
                    self.restore = reply.headers.clone();
                }
                self.answer(Counter::Replayed, reply)
            }
            Verdict::Blocked(Block::Conflict) => self.answer(
                Counter::Conflict,
                Problem::Conflict.reply_as(
                    self.policy.conflict_status,
                    "this Idempotency-Key was used with a different request body or query string",
                    None,
                ),
            ),
            Verdict::Blocked(Block::InFlight { .. }) if waiting_since.is_some() => {
                self.keep_waiting(claim, waiting_since, now)
            }
            Verdict::Blocked(Block::InFlight { .. }) if room_to_wait && self.policy.max_wait > 0 => {
                self.count(Counter::Waited);
                self.keep_waiting(claim, Some(now), now)
            }
            Verdict::Blocked(Block::InFlight { .. }) => self.refuse_in_progress(),
            Verdict::Blocked(Block::Held { remaining }) => self.answer(
                Counter::InProgress,
                Problem::InProgress.reply_as(
                    self.policy.in_progress_status,
                    "an earlier request with this Idempotency-Key ended without a known outcome; \
                     retry after its lease ends",
                    Some(whole_seconds(remaining)),
                ),
            ),
            Verdict::Blocked(Block::Unstored) => self.answer(
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

    /// The stream ended (`on_log`). A request sent from the root context stays the owner: its
    /// answer, not its client, ends the claim.
    pub fn on_end(&mut self, end: StreamEnd) -> Step {
        let Phase::Owner { ticket } = self.phase else {
            if matches!(self.phase, Phase::SentFromRoot { .. }) {
                self.client_left = true;
            } else {
                self.phase = Phase::Out;
            }
            return Step::Done;
        };
        self.phase = Phase::Out;
        Step::Finish(ticket, self.ending(end))
    }

    /// The store's answer to the finish.
    pub fn on_finish(&mut self, reply: Result<Finished, StoreError>) {
        self.count(finish_counter(&reply));
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
mod tests;
