//! A request's policy: which requests are covered and how their records behave. The listener's
//! configuration gives one; a route's metadata may give its own, with the same field names and
//! value formats, laid over the listener's ([`super::Config::route_policy`]).
//!
//! Each field is declared once, here, with how it is read and checked; what one field cannot
//! say alone is [`Policy::check`]'s.

use super::read::{duration, invalid, positive_duration, read, ConfigError, Fields};
use crate::core::body::{json, Asked, Fingerprinting, Pointer};
use crate::core::Millis;
use serde::de::{Deserializer, Error};
use serde::Deserialize;

/// Limits that keep one misconfiguration from exhausting the host.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// With `lease: 0s` unknown endings release at once, but a claim whose owner vanishes must still
/// expire: it then lives this long.
const DEFAULT_LEASE: Millis = 60_000;

/// Which upstream statuses are not stored (their claim is released so a retry runs the work).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusRule {
    Exact(u16),
    /// `5xx`: every status in the hundred.
    Class(u16),
}

impl StatusRule {
    fn matches(&self, status: u16) -> bool {
        match self {
            StatusRule::Exact(code) => *code == status,
            StatusRule::Class(hundred) => status / 100 == *hundred,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Upper-case method names whose requests are covered.
    #[serde(deserialize_with = "methods")]
    pub methods: Vec<String>,
    /// Lower-case header name carrying the key.
    #[serde(deserialize_with = "header_name")]
    pub key_header: String,
    /// Where in a JSON body the key is, instead of `key_header`.
    #[serde(deserialize_with = "key_pointer")]
    pub key_from_body: Option<Pointer>,
    pub require_key: bool,
    /// Lower-case header whose value (hashed) is the organisation.
    #[serde(deserialize_with = "header_name")]
    pub scope_header: String,
    #[serde(deserialize_with = "positive_duration")]
    pub ttl: Millis,
    #[serde(deserialize_with = "duration")]
    pub lease: Millis,
    #[serde(deserialize_with = "duration")]
    pub max_wait: Millis,
    /// The status of `idempotency_in_progress`: 503 for clients that retry 5xx answers (the
    /// seed's loop), 409 for clients written to the IETF draft or Stripe.
    #[serde(deserialize_with = "in_progress_status")]
    pub in_progress_status: u16,
    /// The status of `idempotency_conflict`: 409 (the seed's), or 422 (the IETF draft's).
    #[serde(deserialize_with = "conflict_status")]
    pub conflict_status: u16,
    #[serde(deserialize_with = "body_bytes")]
    pub max_request_body_bytes: usize,
    #[serde(deserialize_with = "body_bytes")]
    pub max_response_body_bytes: usize,
    #[serde(deserialize_with = "status_rules")]
    pub unstored_statuses: Vec<StatusRule>,
    /// Whether a JSON or form body counts by its bytes or by its canonical form.
    #[serde(deserialize_with = "fingerprinting")]
    pub fingerprint: Fingerprinting,
    /// What a canonical form leaves out.
    #[serde(deserialize_with = "ignored_pointers")]
    pub fingerprint_ignore: Vec<Pointer>,
    /// Covered requests go upstream from the root context with this timeout (`outlive_client`
    /// and the route's word on it), or, when `None`, through the router.
    #[serde(skip)]
    pub send_from_root: Option<Millis>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            methods: vec!["POST".into(), "PATCH".into()],
            key_header: "idempotency-key".into(),
            key_from_body: None,
            require_key: false,
            scope_header: "authorization".into(),
            ttl: 86_400_000,
            lease: 60_000,
            max_wait: 10_000,
            in_progress_status: 503,
            conflict_status: 409,
            max_request_body_bytes: 1 << 20,
            max_response_body_bytes: 1 << 20,
            unstored_statuses: vec![
                StatusRule::Class(5),
                StatusRule::Exact(408),
                StatusRule::Exact(425),
                StatusRule::Exact(429),
            ],
            fingerprint: Fingerprinting::Bytes,
            fingerprint_ignore: Vec::new(),
            send_from_root: None,
        }
    }
}

impl Policy {
    /// The policy `fields` give, the defaults for the rest, checked.
    pub fn from_fields(fields: Fields) -> Result<Policy, ConfigError> {
        let policy: Policy = read(fields)?;
        policy.check()?;
        Ok(policy)
    }

    /// What one field cannot say alone: `fingerprint_ignore` means something only to
    /// `fingerprint: "json"`.
    fn check(&self) -> Result<(), ConfigError> {
        if !self.fingerprint_ignore.is_empty() && self.fingerprint != Fingerprinting::Json {
            return Err(invalid(
                "fingerprint_ignore",
                "only with fingerprint: \"json\"; bytes are never left out of a fingerprint",
            ));
        }
        Ok(())
    }

    /// What this policy asks of a request's body.
    pub fn asked(&self) -> Asked<'_> {
        Asked {
            fingerprint: self.fingerprint,
            ignore: &self.fingerprint_ignore,
            key: self.key_from_body.as_ref(),
        }
    }

    pub fn covers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// How long a claim in flight is protected. With `lease: 0s` unknown endings release at
    /// once, but a claim whose owner vanishes must still expire: it then uses the default.
    pub fn claim_lease(&self) -> Millis {
        if self.lease == 0 {
            DEFAULT_LEASE
        } else {
            self.lease
        }
    }

    pub fn stores_status(&self, status: u16) -> bool {
        !self
            .unstored_statuses
            .iter()
            .any(|rule| rule.matches(status))
    }
}

fn methods<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    if names.is_empty() {
        return Err(D::Error::custom("must name at least one method"));
    }
    names
        .into_iter()
        .map(|method| {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(D::Error::custom(format!("`{method}` is not a method name")));
            }
            Ok(method.to_ascii_uppercase())
        })
        .collect()
}

fn header_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(D::Error::custom(format!("`{name}` is not a header name")));
    }
    Ok(name.to_ascii_lowercase())
}

fn in_progress_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match u16::deserialize(d)? {
        status @ (409 | 503) => Ok(status),
        _ => Err(D::Error::custom(
            "must be 503 (clients that retry 5xx answers) or 409 (IETF draft, Stripe)",
        )),
    }
}

fn conflict_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match u16::deserialize(d)? {
        status @ (409 | 422) => Ok(status),
        _ => Err(D::Error::custom(
            "must be 409 (the seed document's) or 422 (the IETF draft's)",
        )),
    }
}

fn body_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        bytes if bytes > MAX_BODY_BYTES => {
            Err(D::Error::custom(format!("at most {MAX_BODY_BYTES}")))
        }
        bytes => Ok(bytes),
    }
}

fn fingerprinting<'de, D: Deserializer<'de>>(d: D) -> Result<Fingerprinting, D::Error> {
    match String::deserialize(d)?.as_str() {
        "bytes" => Ok(Fingerprinting::Bytes),
        "json" => Ok(Fingerprinting::Json),
        other => Err(D::Error::custom(format!(
            "`{other}`: expected `bytes` or `json`"
        ))),
    }
}

fn ignored_pointers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Pointer>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    if texts.len() > json::MAX_IGNORED {
        return Err(D::Error::custom(format!(
            "at most {} pointers",
            json::MAX_IGNORED
        )));
    }
    texts
        .iter()
        .map(|text| pointer_into_body(text).map_err(D::Error::custom))
        .collect()
}

fn key_pointer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pointer>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| pointer_into_body(&text).map_err(D::Error::custom))
        .transpose()
}

/// A JSON Pointer to a part of the body: the whole of it (`""`) is never a key, and leaving it
/// out would make every body the same.
fn pointer_into_body(text: &str) -> Result<Pointer, String> {
    let pointer = Pointer::parse(text)?;
    if pointer.is_root() {
        return Err("`\"\"` is the whole body; point into it, like \"/id\"".into());
    }
    Ok(pointer)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    Code(u16),
    Text(String),
}

fn status_rules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StatusRule>, D::Error> {
    Vec::<RawStatus>::deserialize(d)?
        .iter()
        .map(|raw| status_rule(raw).map_err(D::Error::custom))
        .collect()
}

fn status_rule(raw: &RawStatus) -> Result<StatusRule, String> {
    match raw {
        RawStatus::Code(code) if (100..=599).contains(code) => Ok(StatusRule::Exact(*code)),
        RawStatus::Code(code) => Err(format!("{code} is not an HTTP status")),
        RawStatus::Text(text) => match text.as_bytes() {
            [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                Ok(StatusRule::Class(u16::from(d - b'0')))
            }
            _ => match text.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => Ok(StatusRule::Exact(code)),
                _ => Err(format!(
                    "`{text}`: expected a status like 429 or a class like \"5xx\""
                )),
            },
        },
    }
}
