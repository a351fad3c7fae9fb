//! A route's policy: the listener's policy fields with the route's metadata laid over them, read
//! by the same declaration. What the listener's store decides stays the listener's: a route that
//! names it is misconfigured.

use super::read::{duration, invalid, names, read, unknown, ConfigError, Fields};
use super::{Config, Policy, LEDGER_SHARDS};
use crate::core::Millis;
use serde::{Deserialize, Deserializer};

/// What a route says beside its policy.
#[derive(Deserialize)]
#[serde(default)]
struct RouteFields {
    enabled: bool,
    /// Its word on `outlive_client`: whether it sends from the root context.
    outlive_client: Option<bool>,
    /// Its own timeout for what it sends from the root context.
    #[serde(deserialize_with = "some_duration")]
    timeout: Option<Millis>,
}

impl Default for RouteFields {
    fn default() -> Self {
        RouteFields {
            enabled: true,
            outlive_client: None,
            timeout: None,
        }
    }
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
    duration(d).map(Some)
}

impl Config {
    /// The policy of a route whose metadata holds `fields` (its `filter_metadata.idempotency`):
    /// the listener's, with the route's fields laid over it and checked as the listener's are,
    /// or `None` if the route says `enabled: false`. Without `route_metadata` only
    /// `outlive_client` and `timeout` are taken; a policy field is then an error, never ignored.
    pub fn route_policy(&self, fields: Fields) -> Result<Option<Policy>, ConfigError> {
        let policy_names = names::<Policy>();
        let (mut laid, mut own) = (self.policy_fields.0.clone(), Fields::new());
        for (name, value) in fields {
            match name.as_str() {
                policy if policy_names.contains(&policy) => {
                    if !self.route_metadata {
                        return Err(invalid(
                            policy,
                            "a route policy field, but the listener does not set route_metadata: true",
                        ));
                    }
                    laid.insert(name, value);
                    continue;
                }
                "enabled" if !self.route_metadata => {
                    return Err(invalid(
                        &name,
                        "the listener does not set route_metadata: true",
                    ))
                }
                "outlive_client" | "timeout" if self.outlive_client.is_none() => {
                    return Err(invalid(
                        &name,
                        "the listener does not set outlive_client, which this needs",
                    ))
                }
                "enabled" | "outlive_client" | "timeout" => {}
                listener if names::<Config>().contains(&listener) => {
                    return Err(invalid(listener, "is the listener's alone, not a route's"))
                }
                _ => return Err(unknown(&name)),
            }
            own.insert(name, value);
        }
        let mut policy = Policy::from_fields(laid)?;
        let route: RouteFields = read(own)?;
        self.check_route(&policy)?;
        policy.send_from_root = match &self.outlive_client {
            Some(outlive) if outlive.covers_route(route.outlive_client) => {
                let timeout = route.timeout.unwrap_or(outlive.timeout);
                Some(self.send_timeout("timeout", timeout, &policy)?)
            }
            _ => None,
        };
        Ok(route.enabled.then_some(policy))
    }

    /// What a route's policy must hold that the listener's store decides: any storable
    /// response fits in a ledger and a share; on etcd, whose leases are granted for the
    /// listener's `ttl` and `lease`, a record or claim lives no longer than they do.
    fn check_route(&self, policy: &Policy) -> Result<(), ConfigError> {
        let largest = (self.capacity_bytes / LEDGER_SHARDS).min(self.share_bytes());
        if policy.max_response_body_bytes > largest {
            return Err(invalid(
                "max_response_body_bytes",
                format!(
                    "at most {largest}, what one ledger of capacity_bytes and one organisation's \
                     share of it hold"
                ),
            ));
        }
        if self.etcd.is_some() {
            if policy.ttl > self.policy.ttl {
                return Err(invalid(
                    "ttl",
                    format!(
                        "at most the listener's ttl ({}ms) with the etcd store, whose leases last that long",
                        self.policy.ttl
                    ),
                ));
            }
            if policy.claim_lease() > self.policy.claim_lease() {
                return Err(invalid(
                    "lease",
                    format!(
                        "at most the listener's lease ({}ms) with the etcd store, whose leases last that long",
                        self.policy.claim_lease()
                    ),
                ));
            }
        }
        Ok(())
    }
}
