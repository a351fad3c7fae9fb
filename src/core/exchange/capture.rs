//! What of an owner's response is kept, as it passes, and how its attempt ended.

use super::{Exchange, Phase, StreamEnd};
use crate::core::lifecycle::Ending;
use crate::core::metrics::Histogram;
use crate::core::record::StoredResponse;

/// Hop-by-hop headers: they are never stored, and never passed on from the root context.
pub(super) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Response headers not stored: hop-by-hop ones, and those Envoy sets itself on every answer.
pub(super) fn unstored(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || [
            "proxy-authenticate",
            "content-length",
            "x-envoy-upstream-service-time",
            ":status",
        ]
        .contains(&name)
}

#[derive(Debug, Default)]
pub(super) struct Capture {
    /// `Some` once response headers arrive from the upstream (`via_upstream`).
    pub(super) status: Option<u16>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    pub(super) complete: bool,
    /// The body went past `max_response_body_bytes`, or a header could not be stored.
    pub(super) ends_unstored: bool,
    /// Headers arrived, but from Envoy rather than the upstream.
    pub(super) local_reply: bool,
    /// The upstream said `content-length: 0`: kept for an empty body, which Envoy's local-reply
    /// path would otherwise answer without a length over HTTP/2.
    pub(super) declared_empty: bool,
}

impl Capture {
    pub(super) fn headers(
        &mut self,
        headers: &[(String, Vec<u8>)],
        via_upstream: bool,
        end_of_stream: bool,
    ) {
        if !via_upstream {
            self.local_reply = true;
            return;
        }
        for (name, value) in headers {
            if name == ":status" {
                self.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            } else if name == "content-length" {
                self.declared_empty = value.as_slice() == b"0";
            } else if !unstored(name) {
                match String::from_utf8(value.clone()) {
                    Ok(value) => self.headers.push((name.clone(), value)),
                    // Local replies carry text headers only: such a response cannot be replayed.
                    Err(_) => self.ends_unstored = true,
                }
            }
        }
        self.complete = end_of_stream;
    }

    /// One more chunk, unless the body would pass `max` (then none of it is kept).
    pub(super) fn body(&mut self, chunk: &[u8], max: usize) {
        if self.body.len() + chunk.len() > max {
            self.ends_unstored = true;
            self.body = Vec::new();
        } else {
            self.body.extend_from_slice(chunk);
        }
    }
}

impl Exchange {
    /// Response headers. `via_upstream` is false for Envoy's own local replies.
    pub fn on_response_headers(
        &mut self,
        headers: &[(String, Vec<u8>)],
        via_upstream: bool,
        end_of_stream: bool,
    ) {
        if matches!(self.phase, Phase::Owner { .. }) {
            self.capture.headers(headers, via_upstream, end_of_stream);
        }
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
            && !self.capture.ends_unstored
    }

    /// One chunk of the response body, as it streams to the client.
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) {
        if self.wants_response_body() {
            self.capture
                .body(chunk, self.policy.max_response_body_bytes);
        }
        self.capture.complete |= end_of_stream;
    }

    /// Trailers end the response body.
    pub fn on_response_trailers(&mut self) {
        self.capture.complete = true;
    }

    /// How the owner's attempt ended, from the response captured and how the stream ended.
    pub(super) fn ending(&mut self, end: StreamEnd) -> Ending<StoredResponse> {
        let capture = std::mem::take(&mut self.capture);
        let outcome = match capture.status {
            Some(status) if !self.policy.stores_status(status) => Ending::Released,
            Some(_) if !capture.complete => Ending::Held,
            Some(_) if capture.ends_unstored => Ending::Unstored { no_room: false },
            Some(status) => {
                let mut headers = capture.headers;
                if capture.declared_empty && capture.body.is_empty() {
                    headers.push(("content-length".to_string(), "0".to_string()));
                }
                let size = capture.body.len() as u64;
                self.samples.push((Histogram::StoredResponseBytes, size));
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
        match outcome {
            Ending::Held if self.policy.lease == 0 => Ending::Released,
            outcome => outcome,
        }
    }
}
