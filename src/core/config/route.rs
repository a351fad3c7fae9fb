//! A route's policy: the listener's, with the fields of the route's metadata laid over it. What
//! the listener's store decides stays the listener's: a route that names it is misconfigured.

use super::LEDGER_SHARDS;
use super::{duration, field, invalid, policy, send_timeout, unknown, Config, ConfigError, Policy};

/// The fields only the listener may set: a route that names one is misconfigured.
const LISTENER_FIELDS: [&str; 11] = [
    "route_metadata",
    "max_waiting",
    "capacity_records",
    "capacity_bytes",
    "max_share",
    "compress_responses",
    "when_full",
    "key_prefix",
    "include_paths",
    "exclude_paths",
    "etcd",
];

impl Config {
    /// The policy of a route whose metadata holds `fields` (its `filter_metadata.idempotency`):
    /// the listener's, with the route's fields laid over it and checked as the listener's are,
    /// or `None` if the route says `enabled: false`. Without `route_metadata` only
    /// `outlive_client` and `timeout` are taken; a policy field is then an error, never ignored.
    pub fn route_policy(
        &self,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<Policy>, ConfigError> {
        let mut policy = Policy::clone(&self.policy);
        let (mut enabled, mut marked, mut timeout) = (true, None, None);
        for (name, value) in fields {
            if policy::FIELDS.contains(&name.as_str()) && !self.route_metadata {
                return Err(invalid(
                    &name,
                    "a route policy field, but the listener does not set route_metadata: true",
                ));
            }
            if policy.set(&name, value.clone())? {
                continue;
            }
            match name.as_str() {
                "enabled" if !self.route_metadata => {
                    return Err(invalid(
                        &name,
                        "the listener does not set route_metadata: true",
                    ))
                }
                "enabled" => enabled = field(&name, value)?,
                "outlive_client" | "timeout" if self.outlive_client.is_none() => {
                    return Err(invalid(
                        &name,
                        "the listener does not set outlive_client, which this needs",
                    ))
                }
                "outlive_client" => marked = Some(field(&name, value)?),
                "timeout" => timeout = Some(duration(&name, &field::<String>(&name, value)?)?),
                listener if LISTENER_FIELDS.contains(&listener) => {
                    return Err(invalid(listener, "is the listener's alone, not a route's"))
                }
                _ => return Err(unknown(&name)),
            }
        }
        self.check_route(&policy)?;
        policy.send_from_root = match &self.outlive_client {
            Some(outlive) if outlive.covers_route(marked) => {
                let finish = self.etcd.as_ref().map_or(0, |etcd| etcd.timeout);
                let timeout = timeout.unwrap_or(outlive.timeout);
                Some(send_timeout("timeout", timeout, policy.lease, finish)?)
            }
            _ => None,
        };
        Ok(enabled.then_some(policy))
    }

    /// What a route's policy must hold that the listener's store decides: any storable
    /// response fits in a ledger and a share; on etcd, whose leases are granted for the
    /// listener's `ttl` and `lease`, a record or claim lives no longer than they do.
    fn check_route(&self, policy: &Policy) -> Result<(), ConfigError> {
        policy.check()?;
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
