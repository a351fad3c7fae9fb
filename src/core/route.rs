//! Which policy a request's route gives it: the listener's, the route's own from its metadata
//! (`filter_metadata.idempotency`), none (`enabled: false`), or a refusal naming the field
//! when that metadata is wrong.
//!
//! Route metadata comes by RDS after the filter has loaded, so a bad one cannot be refused at
//! load: its covered requests are answered with a problem instead, so that a request its route
//! meant to protect never runs unprotected. Each distinct metadata is parsed once per worker.

use crate::core::config::{Config, ConfigError, Policy};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// The namespace of the route's metadata the filter reads.
pub const NAMESPACE: &str = "idempotency";
/// Distinct route metadata one worker keeps parsed, each its bytes and its policy (about 1 KB):
/// a listener has as many as it has routes that differ (under Istio every route carries
/// metadata of its own). Past it, the cache starts again, and each costs one parse to bring back.
const CACHED_ROUTES: usize = 1024;

/// What a route gives its requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    Policy(Rc<Policy>),
    /// `enabled: false`: the route's requests pass untouched.
    Disabled,
    Misconfigured(Rc<Misconfigured>),
}

/// A route whose metadata the filter cannot follow.
#[derive(Debug, PartialEq)]
pub struct Misconfigured {
    pub error: ConfigError,
    /// The methods its requests are refused for: the route's own `methods` where that field
    /// reads, else the listener's.
    pub methods: Vec<String>,
}

impl Routed {
    /// Whether a request with `method` on this route is the filter's business.
    pub fn covers(&self, method: &str) -> bool {
        match self {
            Routed::Policy(policy) => policy.covers(method),
            Routed::Disabled => false,
            Routed::Misconfigured(refused) => refused.methods.iter().any(|m| m == method),
        }
    }
}

/// One worker's parsed route policies, by the bytes of the route's metadata: a route changed
/// by RDS has other bytes, and so is parsed again.
pub struct Routes {
    listener: Routed,
    parsed: HashMap<Vec<u8>, Routed>,
}

impl Routes {
    pub fn new(config: &Config) -> Routes {
        Routes {
            listener: Routed::Policy(Rc::clone(&config.policy)),
            parsed: HashMap::new(),
        }
    }

    /// The listener's own policy, for requests whose route says nothing.
    pub fn listener(&self) -> &Routed {
        &self.listener
    }

    /// What the route whose metadata is `metadata` (an `envoy.config.core.v3.Metadata`, as
    /// Envoy serialises `xds.route_metadata`) gives its requests.
    pub fn resolve(&mut self, config: &Config, metadata: &[u8]) -> Routed {
        if metadata.is_empty() {
            return self.listener.clone();
        }
        if let Some(routed) = self.parsed.get(metadata) {
            return routed.clone();
        }
        let routed = match fields_of(metadata) {
            Ok(None) => self.listener.clone(),
            Ok(Some(fields)) => route(config, fields),
            Err(error) => Routed::Misconfigured(Rc::new(Misconfigured {
                error,
                methods: config.policy.methods.clone(),
            })),
        };
        if self.parsed.len() >= CACHED_ROUTES {
            self.parsed.clear();
        }
        self.parsed.insert(metadata.to_vec(), routed.clone());
        routed
    }
}

fn route(config: &Config, fields: serde_json::Map<String, serde_json::Value>) -> Routed {
    let methods = fields.get("methods").cloned();
    match config.route_policy(fields) {
        Ok(Some(policy)) => Routed::Policy(Rc::new(policy)),
        Ok(None) => Routed::Disabled,
        Err(error) => {
            let own = methods.map(|methods| {
                Policy::from_fields(std::iter::once(("methods".into(), methods)).collect())
            });
            let methods = match own {
                Some(Ok(own)) => own.methods,
                _ => config.policy.methods.clone(),
            };
            Routed::Misconfigured(Rc::new(Misconfigured { error, methods }))
        }
    }
}

/// The fields of the route metadata's `idempotency` namespace, as JSON; `None` without it.
fn fields_of(
    metadata: &[u8],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ConfigError> {
    let unreadable = |reason: String| ConfigError {
        field: "(route metadata)".into(),
        reason,
    };
    let metadata = Metadata::decode(metadata).map_err(|e| unreadable(e.to_string()))?;
    let Some(ours) = metadata.filter_metadata.get(NAMESPACE) else {
        return Ok(None);
    };
    Ok(Some(
        ours.fields
            .iter()
            .map(|(name, value)| (name.clone(), json(value)))
            .collect(),
    ))
}

/// A `google.protobuf.Value` as JSON. Struct numbers are doubles: a whole one becomes an
/// integer, so that a count such as `max_request_body_bytes: 1024` reads as it does in the
/// listener's JSON.
fn json(value: &Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match &value.kind {
        None | Some(Kind::Null(_)) => Json::Null,
        Some(Kind::Number(n)) if n.fract() == 0.0 && n.abs() < 9e15 => Json::from(*n as i64),
        Some(Kind::Number(n)) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::String(s)) => Json::String(s.clone()),
        Some(Kind::Bool(b)) => Json::Bool(*b),
        Some(Kind::Struct(s)) => Json::Object(
            s.fields
                .iter()
                .map(|(name, value)| (name.clone(), json(value)))
                .collect(),
        ),
        Some(Kind::List(list)) => Json::Array(list.values.iter().map(json).collect()),
    }
}

/// `envoy.config.core.v3.Metadata`, as far as the filter reads it.
#[derive(Clone, PartialEq, Message)]
struct Metadata {
    #[prost(btree_map = "string, message", tag = "1")]
    filter_metadata: BTreeMap<String, Struct>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, Message)]
struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`.
#[derive(Clone, PartialEq, Message)]
struct Value {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6")]
    kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(int32, tag = "1")]
    Null(i32),
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Struct(Struct),
    #[prost(message, tag = "6")]
    List(ListValue),
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, Message)]
struct ListValue {
    #[prost(message, repeated, tag = "1")]
    values: Vec<Value>,
}

#[cfg(test)]
mod tests;
