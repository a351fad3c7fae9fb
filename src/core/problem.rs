//! The filter's own answers: RFC 9457 problem documents, and replays of stored responses.

use crate::core::record::StoredResponse;

/// A response the filter sends itself; the request does not reach the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    KeyMissing,
    KeyInvalid,
    Conflict,
    InProgress,
    ResponseNotStored,
    /// An answer too large to bring back to a request sent from the root context.
    ResponseTooLarge,
    RequestTooLarge,
    StoreFull,
    StoreUnavailable,
    QuotaExceeded,
    /// The request's route has metadata the filter cannot follow.
    RouteMisconfigured,
}

impl Problem {
    fn parts(self) -> (u16, &'static str, &'static str) {
        match self {
            Problem::KeyMissing => (400, "idempotency_key_missing", "Idempotency-Key missing"),
            Problem::KeyInvalid => (400, "idempotency_key_invalid", "Idempotency-Key invalid"),
            Problem::Conflict => (409, "idempotency_conflict", "Idempotency-Key reused"),
            Problem::InProgress => (409, "idempotency_in_progress", "Request in progress"),
            Problem::ResponseNotStored => (
                409,
                "idempotency_response_not_stored",
                "Response not stored",
            ),
            Problem::ResponseTooLarge => {
                (502, "idempotency_response_too_large", "Response too large")
            }
            Problem::RequestTooLarge => (413, "request_too_large", "Request body too large"),
            Problem::StoreFull => (503, "idempotency_store_full", "Idempotency store full"),
            Problem::QuotaExceeded => (
                429,
                "idempotency_quota_exceeded",
                "Idempotency store share used up",
            ),
            Problem::RouteMisconfigured => (
                500,
                "idempotency_route_misconfigured",
                "Route's idempotency policy invalid",
            ),
            Problem::StoreUnavailable => (
                503,
                "idempotency_store_unavailable",
                "Idempotency store unavailable",
            ),
        }
    }

    /// The problem document, with `Retry-After` in whole seconds where given.
    pub fn reply(self, detail: &str, retry_after_secs: Option<u64>) -> LocalReply {
        self.reply_as(self.parts().0, detail, retry_after_secs)
    }

    /// The problem document under `status` instead of the problem's own (a configured one).
    pub fn reply_as(self, status: u16, detail: &str, retry_after_secs: Option<u64>) -> LocalReply {
        let (_, code, title) = self.parts();
        let body = serde_json::json!({
            "type": format!("urn:idempotency:{code}"),
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
        });
        let mut headers = vec![(
            "content-type".to_string(),
            "application/problem+json".to_string(),
        )];
        if let Some(secs) = retry_after_secs {
            headers.push(("retry-after".to_string(), secs.max(1).to_string()));
        }
        LocalReply {
            status,
            headers,
            body: body.to_string().into_bytes(),
        }
    }
}

/// A stored response as replayed: verbatim, marked `Idempotent-Replayed: true`.
pub fn replay(response: StoredResponse) -> LocalReply {
    let mut headers = response.headers;
    headers.push(("idempotent-replayed".to_string(), "true".to_string()));
    LocalReply {
        status: response.status,
        headers,
        body: response.body,
    }
}

/// Seconds for `Retry-After`, rounded up so a client never retries early.
pub fn whole_seconds(millis: u64) -> u64 {
    millis.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(reply: &LocalReply) -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn problems_are_rfc9457_documents_with_a_code() {
        let reply = Problem::Conflict.reply("a different body", None);
        assert_eq!(reply.status, 409);
        assert!(reply
            .headers
            .contains(&("content-type".into(), "application/problem+json".into())));
        let body = json(&reply);
        assert_eq!(body["code"], "idempotency_conflict");
        assert_eq!(body["status"], 409);
        assert_eq!(body["detail"], "a different body");
        assert!(body["type"]
            .as_str()
            .unwrap()
            .ends_with("idempotency_conflict"));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let reply = Problem::InProgress.reply("wait", Some(whole_seconds(1001)));
        assert!(reply.headers.contains(&("retry-after".into(), "2".into())));
        assert_eq!(whole_seconds(0), 1);
        assert_eq!(whole_seconds(60_000), 60);
    }

    #[test]
    fn a_replay_is_the_stored_response_marked_replayed() {
        let reply = replay(StoredResponse {
            status: 201,
            headers: vec![("set-cookie".into(), "a=1".into())],
            body: b"{}".to_vec(),
        });
        assert_eq!(reply.status, 201);
        assert_eq!(
            reply.headers,
            [
                ("set-cookie".to_string(), "a=1".to_string()),
                ("idempotent-replayed".to_string(), "true".to_string())
            ]
        );
        assert_eq!(reply.body, b"{}");
    }
}
