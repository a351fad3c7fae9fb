//! A covered request sent from the root context (`outlive_client`), so that its work outlives
//! a client that gives up: what goes out, and how its answer ends the claim.

use super::capture::{unstored, HOP_BY_HOP};
use super::{Exchange, Phase, Step, StreamEnd};
use crate::core::metrics::Counter;
use crate::core::problem::{whole_seconds, LocalReply, Problem};
use crate::core::Millis;

/// A covered request as the root context sends it: to the route's cluster, with the client's
/// headers (less the hop-by-hop ones) and body, under the attempt's timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRequest {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Millis,
}

/// What came back for a request sent from the root context.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// A response: the upstream's, or Envoy's own when the attempt failed in its router.
    Response {
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    },
    /// A response whose body is over `max_response_body_bytes`: not read.
    TooLarge { headers: Vec<(String, Vec<u8>)> },
    /// The call ended with no response.
    Nothing,
    /// The host refused to send it: it never left.
    NotSent,
}

/// Request headers the root context does not pass on: hop-by-hop ones, and the length Envoy
/// sets for the body itself.
pub(super) fn unsent(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || name == "content-length"
}

/// The client's headers as the root context sends them on; `None` if one is not text (the
/// host takes text only), and the request then goes through the router.
pub(super) fn sendable(headers: &[(String, Vec<u8>)]) -> Option<Vec<(String, String)>> {
    let pseudo = |name: &str| {
        name.starts_with(':') && ![":method", ":path", ":authority", ":scheme"].contains(&name)
    };
    headers
        .iter()
        .filter(|(name, _)| !unsent(name) && !pseudo(name))
        .map(|(name, value)| Some((name.clone(), String::from_utf8(value.clone()).ok()?)))
        .collect()
}

/// Whether a response to a call is Envoy's own: its router answers a failed attempt itself
/// (no host, connection failure, timeout, reset) without the header it adds to every upstream
/// response.
pub(super) fn is_envoy_reply(headers: &[(String, Vec<u8>)]) -> bool {
    !headers
        .iter()
        .any(|(name, _)| name == "x-envoy-upstream-service-time")
}

/// Whether Envoy's own answer says the request never reached an upstream (so the work did not
/// run): no healthy host, or no connection made. Anything else (a timeout, a reset after the
/// request went out) may have left the work done.
pub(super) fn never_reached_upstream(body: &[u8]) -> bool {
    let body = String::from_utf8_lossy(body);
    body.starts_with("no healthy upstream")
        || body.ends_with("reset reason: connection failure")
        || body.contains("reset reason: remote connection failure")
        || body.contains("reset reason: local connection failure")
        || body.starts_with("cluster not found")
}

/// An answer as a local reply: its status, the headers Envoy does not set itself, its body.
pub(super) fn as_reply(headers: &[(String, Vec<u8>)], body: Vec<u8>) -> LocalReply {
    let status = headers
        .iter()
        .find(|(name, _)| name == ":status")
        .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
        .unwrap_or(502);
    let headers = headers
        .iter()
        .filter(|(name, _)| !unstored(name))
        .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
        .collect();
    LocalReply {
        status,
        headers,
        body,
    }
}

impl Exchange {
    /// Sends the request, if its claim is won, from the root context to `cluster` (the route's)
    /// with `timeout`, instead of through the router. Must come before the request headers.
    pub fn send_from_root(&mut self, cluster: String, timeout: Millis) {
        self.route = Some((cluster, timeout));
    }

    /// The answer to the request sent from the root context: how its claim ends, and (for
    /// [`Exchange::take_client_reply`]) what its client gets unless it left — the
    /// upstream's answer as it came, the same as any replay of it but for `Idempotent-Replayed`.
    pub fn on_upstream_answer(&mut self, answer: Answered) -> Step {
        let Phase::SentFromRoot { ticket } = self.phase else {
            return Step::Done;
        };
        self.phase = Phase::Out;
        let (end, reply) = match answer {
            Answered::Response { headers, body } => {
                let via_upstream = !is_envoy_reply(&headers);
                self.capture.headers(&headers, via_upstream, false);
                self.capture
                    .body(&body, self.policy.max_response_body_bytes);
                self.capture.complete = true;
                let end = match via_upstream || never_reached_upstream(&body) {
                    true => StreamEnd::Unflagged,
                    false => StreamEnd::Interrupted,
                };
                (end, as_reply(&headers, body))
            }
            Answered::TooLarge { headers } => {
                self.capture
                    .headers(&headers, !is_envoy_reply(&headers), false);
                self.capture.ends_unstored = true;
                self.capture.complete = true;
                let detail = format!(
                    "the upstream answered with more than {} bytes, more than a request sent \
                     from the root context brings back; its work ran",
                    self.policy.max_response_body_bytes
                );
                (
                    StreamEnd::Unflagged,
                    Problem::ResponseTooLarge.reply(&detail, None),
                )
            }
            Answered::Nothing => {
                let reply = Problem::InProgress.reply_as(
                    self.policy.in_progress_status,
                    "this request ended without a known outcome; retry after its lease ends",
                    Some(whole_seconds(self.policy.lease)),
                );
                (StreamEnd::Interrupted, reply)
            }
            Answered::NotSent => {
                // As good as Envoy's own answer for a request that never left.
                self.capture.local_reply = true;
                let reply = LocalReply {
                    status: 503,
                    headers: vec![("content-type".into(), "text/plain".into())],
                    body: b"no upstream: the request could not be sent".to_vec(),
                };
                (StreamEnd::Unflagged, reply)
            }
        };
        if self.client_left {
            self.count(Counter::OutlivedClient);
        } else {
            if reply.body.is_empty() {
                self.restore = reply.headers.clone();
            }
            self.client_reply = Some(reply);
        }
        Step::Finish(ticket, self.ending(end))
    }

    /// The answer for the client of a request sent from the root context, once it came.
    pub fn take_client_reply(&mut self) -> Option<LocalReply> {
        self.client_reply.take()
    }
}
