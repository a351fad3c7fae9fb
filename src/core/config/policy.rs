//! A request's policy: which requests are covered and how their records behave. The listener's
//! configuration gives one; a route's metadata may give its own, with the same field names and
//! value formats, laid over the listener's ([`super::Config::route_policy`]).
//!
//! Every field is parsed and checked on its own as it is set, so the listener's document and a
//! route's go through the same code and name their fields the same way.

use super::{duration, invalid, ConfigError};
use crate::core::body::{json, Asked, Fingerprinting, Pointer};
use crate::core::Millis;
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

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Upper-case method names whose requests are covered.
    pub methods: Vec<String>,
    /// Lower-case header name carrying the key.
    pub key_header: String,
    pub require_key: bool,
    /// Lower-case header whose value (hashed) is the organisation.
    pub scope_header: String,
    pub ttl: Millis,
    pub lease: Millis,
    pub max_wait: Millis,
    /// The status of `idempotency_in_progress`: 503 for clients that retry 5xx answers (the
    /// seed's loop), 409 for clients written to the IETF draft or Stripe.
    pub in_progress_status: u16,
    /// The status of `idempotency_conflict`: 409 (the seed's), or 422 (the IETF draft's).
    pub conflict_status: u16,
    pub max_request_body_bytes: usize,
    pub max_response_body_bytes: usize,
    pub unstored_statuses: Vec<StatusRule>,
    /// Whether a JSON or form body counts by its bytes or by its canonical form.
    pub fingerprint: Fingerprinting,
    /// What a canonical form leaves out.
    pub fingerprint_ignore: Vec<Pointer>,
    /// Where in a JSON body the key is, instead of `key_header`.
    pub key_from_body: Option<Pointer>,
    /// Covered requests go upstream from the root context with this timeout (`outlive_client`
    /// and the route's word on it), or, when `None`, through the router.
    pub send_from_root: Option<Millis>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            methods: vec!["POST".into(), "PATCH".into()],
            key_header: "idempotency-key".into(),
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
            key_from_body: None,
            send_from_root: None,
        }
    }
}

/// The names [`Policy::set`] takes, in the order the documentation lists them.
pub const FIELDS: [&str; 15] = [
    "methods",
    "key_header",
    "key_from_body",
    "require_key",
    "scope_header",
    "ttl",
    "lease",
    "max_wait",
    "in_progress_status",
    "conflict_status",
    "max_request_body_bytes",
    "max_response_body_bytes",
    "unstored_statuses",
    "fingerprint",
    "fingerprint_ignore",
];

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    Code(u16),
    Text(String),
}

/// Reads one field, naming it in the error (serde alone names the position, not the field).
pub(super) fn field<T: serde::de::DeserializeOwned>(
    name: &str,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_json::from_value(value).map_err(|e| invalid(name, e.to_string()))
}

impl Policy {
    /// Sets field `name` from `value`, checked; `Ok(false)` if `name` is not a policy field.
    pub fn set(&mut self, name: &str, value: serde_json::Value) -> Result<bool, ConfigError> {
        let text = |value| field::<String>(name, value);
        let size = |value| -> Result<usize, ConfigError> {
            let bytes = field(name, value)?;
            if bytes > MAX_BODY_BYTES {
                return Err(invalid(name, format!("at most {MAX_BODY_BYTES}")));
            }
            Ok(bytes)
        };
        match name {
            "methods" => self.methods = methods(field(name, value)?)?,
            "key_header" => self.key_header = header_name(name, &text(value)?)?,
            "require_key" => self.require_key = field(name, value)?,
            "scope_header" => self.scope_header = header_name(name, &text(value)?)?,
            "ttl" => match duration(name, &text(value)?)? {
                0 => return Err(invalid(name, "must be longer than 0s")),
                ttl => self.ttl = ttl,
            },
            "lease" => self.lease = duration(name, &text(value)?)?,
            "max_wait" => self.max_wait = duration(name, &text(value)?)?,
            "in_progress_status" => {
                match field(name, value)? {
                    status @ (409 | 503) => self.in_progress_status = status,
                    _ => return Err(invalid(
                        name,
                        "must be 503 (clients that retry 5xx answers) or 409 (IETF draft, Stripe)",
                    )),
                }
            }
            "conflict_status" => match field(name, value)? {
                status @ (409 | 422) => self.conflict_status = status,
                _ => {
                    return Err(invalid(
                        name,
                        "must be 409 (the seed document's) or 422 (the IETF draft's)",
                    ))
                }
            },
            "max_request_body_bytes" => self.max_request_body_bytes = size(value)?,
            "max_response_body_bytes" => self.max_response_body_bytes = size(value)?,
            "unstored_statuses" => {
                let rules: Vec<RawStatus> = field(name, value)?;
                self.unstored_statuses = rules.iter().map(status_rule).collect::<Result<_, _>>()?;
            }
            "fingerprint" => match text(value)?.as_str() {
                "bytes" => self.fingerprint = Fingerprinting::Bytes,
                "json" => self.fingerprint = Fingerprinting::Json,
                other => {
                    return Err(invalid(
                        name,
                        format!("`{other}`: expected `bytes` or `json`"),
                    ))
                }
            },
            "fingerprint_ignore" => {
                let texts: Vec<String> = field(name, value)?;
                if texts.len() > json::MAX_IGNORED {
                    return Err(invalid(
                        name,
                        format!("at most {} pointers", json::MAX_IGNORED),
                    ));
                }
                self.fingerprint_ignore = texts
                    .iter()
                    .map(|text| pointer_into_body(name, text))
                    .collect::<Result<_, _>>()?;
            }
            "key_from_body" => {
                self.key_from_body = field::<Option<String>>(name, value)?
                    .map(|text| pointer_into_body(name, &text))
                    .transpose()?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// What one field cannot say alone: `fingerprint_ignore` means something only to
    /// `fingerprint: "json"`.
    pub fn check(&self) -> Result<(), ConfigError> {
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

fn methods(names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if names.is_empty() {
        return Err(invalid("methods", "must name at least one method"));
    }
    names
        .into_iter()
        .map(|method| {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(invalid(
                    "methods",
                    format!("`{method}` is not a method name"),
                ));
            }
            Ok(method.to_ascii_uppercase())
        })
        .collect()
}

fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(field, format!("`{name}` is not a header name")));
    }
    Ok(name.to_ascii_lowercase())
}

/// A JSON Pointer to a part of the body: the whole of it (`""`) is never a key, and leaving it
/// out would make every body the same.
fn pointer_into_body(field: &str, text: &str) -> Result<Pointer, ConfigError> {
    let pointer = Pointer::parse(text).map_err(|why| invalid(field, why))?;
    if pointer.is_root() {
        return Err(invalid(
            field,
            "`\"\"` is the whole body; point into it, like \"/id\"",
        ));
    }
    Ok(pointer)
}

fn status_rule(raw: &RawStatus) -> Result<StatusRule, ConfigError> {
    let field = "unstored_statuses";
    match raw {
        RawStatus::Code(code) if (100..=599).contains(code) => Ok(StatusRule::Exact(*code)),
        RawStatus::Code(code) => Err(invalid(field, format!("{code} is not an HTTP status"))),
        RawStatus::Text(text) => match text.as_bytes() {
            [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                Ok(StatusRule::Class(u16::from(d - b'0')))
            }
            _ => match text.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => Ok(StatusRule::Exact(code)),
                _ => Err(invalid(
                    field,
                    format!("`{text}`: expected a status like 429 or a class like \"5xx\""),
                )),
            },
        },
    }
}
