//! The plugin configuration, declared once: each struct here says its fields, their defaults
//! and how they read (serde), and `Config::parse` checks what no one field can say alone.
//!
//! Every field has a default, so `{}` is a complete configuration. Anything unknown or out of
//! range is refused with an error that names the field, and the filter then refuses to load.
//! The fields that decide one request ([`Policy`]) may also come from a route's metadata
//! ([`Config::route_policy`]); the rest are the store's and the listener's alone.

mod policy;
mod read;
mod route;

use crate::core::Millis;
use serde::Deserialize;
use std::fmt;
use std::rc::Rc;

pub use policy::Policy;
pub use read::ConfigError;
use read::{duration, invalid, names, object, read, unknown, Fields};

/// The shared-data table accounts `capacity_bytes` in this many ledgers; each must hold any
/// storable response.
pub const LEDGER_SHARDS: usize = 8;

/// Limits that keep one misconfiguration from exhausting the host.
const MAX_CAPACITY_RECORDS: usize = 10_000_000;
const MAX_OUTLIVE_IN_FLIGHT: usize = 100_000;
/// `etcd.cluster` and `etcd.authority` travel in the `GrpcService` Envoy takes as a call's
/// upstream, whose lengths must stay single bytes.
const MAX_UPSTREAM_NAMES: usize = 120;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// The completed record nearest its expiry makes way for the new one; with none (every
    /// record in flight), `Reject`.
    Evict,
    /// Answer `503` with `Retry-After`: no request runs without its guarantee.
    Reject,
    /// Forward without idempotency: availability over the guarantee.
    Pass,
}

/// The listener's fields; its policy's are `Policy`'s, in the same document.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The listener's policy: every covered request's, unless its route gives its own.
    #[serde(skip)]
    pub policy: Rc<Policy>,
    /// The policy's fields as the listener wrote them, which a route's are laid over.
    #[serde(skip)]
    policy_fields: Written,
    /// Routes may give their own policy in their metadata (`filter_metadata.idempotency`).
    pub route_metadata: bool,
    pub max_waiting: usize,
    pub capacity_records: usize,
    pub capacity_bytes: usize,
    /// The part of `capacity_records` and `capacity_bytes` one organisation may hold.
    pub max_share: f64,
    /// Stored responses are compressed where that saves space.
    pub compress_responses: bool,
    pub when_full: WhenFull,
    pub key_prefix: String,
    /// Path prefixes the filter covers; empty means every path.
    pub include_paths: Vec<String>,
    /// Path prefixes the filter leaves alone; they win over `include_paths`.
    pub exclude_paths: Vec<String>,
    /// A cluster-wide store; without it records live in this Envoy's shared data.
    pub etcd: Option<EtcdConfig>,
    /// Covered requests go upstream from the worker's root context, so that the work outlives
    /// a client that gives up; without it they go through the router.
    pub outlive_client: Option<OutliveClient>,
}

/// Fields as written; shown by name only, since what they say is the policy they gave.
#[derive(Clone, Default)]
struct Written(Fields);

impl fmt::Debug for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Written")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Rc::default(),
            policy_fields: Written::default(),
            route_metadata: false,
            max_waiting: 1000,
            capacity_records: 100_000,
            capacity_bytes: 128 << 20,
            max_share: 0.1,
            compress_responses: true,
            when_full: WhenFull::Evict,
            key_prefix: "idempotency/".into(),
            include_paths: Vec::new(),
            exclude_paths: Vec::new(),
            etcd: None,
            outlive_client: None,
        }
    }
}

/// Which routes send their covered requests upstream from the root context, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutliveClient {
    pub routes: OutliveRoutes,
    /// The attempt's timeout, unless the route's metadata gives its own.
    #[serde(deserialize_with = "duration")]
    pub timeout: Millis,
    /// Requests one worker may have sent from its root context and not yet had answered;
    /// past it, new ones go through the router. Each holds its request and, once it comes,
    /// its answer: this bounds their memory.
    pub max_in_flight: usize,
}

impl Default for OutliveClient {
    fn default() -> Self {
        OutliveClient {
            routes: OutliveRoutes::All,
            // Envoy's own default route timeout.
            timeout: 15_000,
            max_in_flight: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutliveRoutes {
    /// Every route, unless its metadata says `outlive_client: false`.
    All,
    /// Only the routes whose metadata says `outlive_client: true`.
    Marked,
}

impl OutliveClient {
    /// Whether a route whose metadata says `marked` (if anything) sends from the root context.
    pub fn covers_route(&self, marked: Option<bool>) -> bool {
        marked.unwrap_or(self.routes == OutliveRoutes::All)
    }
}

/// etcd's v3 gRPC API, reached through an Envoy cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// The Envoy cluster that reaches etcd (HTTP/2); it has no default.
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Prefix of every etcd key the filter writes.
    pub key_prefix: String,
    /// Every call's timeout.
    #[serde(deserialize_with = "duration")]
    pub timeout: Millis,
    /// Sent as `token` metadata when etcd has authentication on.
    pub auth_token: Option<String>,
    /// Largest record value written to etcd; larger responses are kept without their body.
    pub max_value_bytes: usize,
    /// What one organisation's records written through this Envoy may hold in etcd for their
    /// whole `ttl`; past it, its new records live `lease`.
    pub max_share_bytes: usize,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            cluster: String::new(),
            authority: "etcd".into(),
            key_prefix: "idempotency/".into(),
            timeout: 1_000,
            auth_token: None,
            // etcd refuses requests over 1.5 MiB by default; this leaves room for the rest of
            // the call.
            max_value_bytes: 1_000_000,
            // A tenth of etcd's default 2 GiB quota, across about three Envoys.
            max_share_bytes: 64 << 20,
        }
    }
}

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        let (policy_names, own_names) = (names::<Policy>(), names::<Config>());
        let (mut policy_fields, mut own) = (Fields::new(), Fields::new());
        for (name, value) in object(json)? {
            if policy_names.contains(&name.as_str()) {
                policy_fields.insert(name, value);
            } else if own_names.contains(&name.as_str()) {
                own.insert(name, value);
            } else {
                return Err(unknown(&name));
            }
        }
        let mut config: Config = read(own)?;
        let policy = Policy::from_fields(policy_fields.clone())?;
        config.policy_fields = Written(policy_fields);
        config.check(policy)
    }

    /// What the listener's fields must hold together, and the policy they give.
    fn check(mut self, mut policy: Policy) -> Result<Config, ConfigError> {
        if self.capacity_records == 0 || self.capacity_records > MAX_CAPACITY_RECORDS {
            return Err(invalid(
                "capacity_records",
                format!("must be between 1 and {MAX_CAPACITY_RECORDS}"),
            ));
        }
        if self.capacity_bytes / LEDGER_SHARDS < policy.max_response_body_bytes.max(1) {
            return Err(invalid(
                "capacity_bytes",
                format!(
                    "must be at least {LEDGER_SHARDS} x max_response_body_bytes, so any storable \
                     response fits"
                ),
            ));
        }
        if !(self.max_share > 0.0 && self.max_share <= 1.0) {
            return Err(invalid(
                "max_share",
                "must be a fraction above 0 and at most 1",
            ));
        }
        if self.key_prefix.is_empty() {
            return Err(invalid(
                "key_prefix",
                "must not be empty: shared data is shared by every plugin of the VM",
            ));
        }
        for (field, prefixes) in [
            ("include_paths", &self.include_paths),
            ("exclude_paths", &self.exclude_paths),
        ] {
            if let Some(bad) = prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err(invalid(
                    field,
                    format!("`{bad}` is not a path prefix starting with /"),
                ));
            }
        }
        if let Some(etcd) = &mut self.etcd {
            etcd.check()?;
        }
        if let Some(outlive) = &self.outlive_client {
            if outlive.max_in_flight == 0 || outlive.max_in_flight > MAX_OUTLIVE_IN_FLIGHT {
                return Err(invalid(
                    "outlive_client.max_in_flight",
                    format!("must be between 1 and {MAX_OUTLIVE_IN_FLIGHT}"),
                ));
            }
            let timeout = self.send_timeout("outlive_client.timeout", outlive.timeout, &policy)?;
            policy.send_from_root = outlive.covers_route(None).then_some(timeout);
        }
        self.policy = Rc::new(policy);
        Ok(self)
    }

    /// A timeout for a request sent from the root context under `policy`: the claim (its
    /// `lease`) must outlast it and the store's finish after it, or a retry could run the work
    /// again while it is still running.
    fn send_timeout(
        &self,
        field: &str,
        timeout: Millis,
        policy: &Policy,
    ) -> Result<Millis, ConfigError> {
        let (lease, finish) = (policy.lease, self.etcd.as_ref().map_or(0, |e| e.timeout));
        if lease == 0 {
            return Err(invalid(
                "lease",
                "must be longer than 0s with outlive_client: the claim must outlast the attempt",
            ));
        }
        if timeout == 0 {
            return Err(invalid(field, "must be longer than 0s"));
        }
        if timeout >= lease.saturating_sub(finish) {
            return Err(invalid(
                field,
                format!(
                    "must be shorter than lease ({lease}ms) less the store's finish ({finish}ms): \
                     a claim that ends before its attempt lets a retry run the work again"
                ),
            ));
        }
        Ok(timeout)
    }

    /// Whether requests to `path` (without its query) are covered.
    pub fn covers_path(&self, path: &[u8]) -> bool {
        let under = |prefix: &String| path.starts_with(prefix.as_bytes());
        (self.include_paths.is_empty() || self.include_paths.iter().any(under))
            && !self.exclude_paths.iter().any(under)
    }

    /// What one organisation's records may hold in bytes (`max_share` of `capacity_bytes`),
    /// and at least the listener's largest storable response.
    pub fn share_bytes(&self) -> usize {
        ((self.capacity_bytes as f64 * self.max_share) as usize)
            .max(self.policy.max_response_body_bytes)
    }

    /// Whether routes' metadata is read at all: for route policies, or for `outlive_client`'s
    /// word per route.
    pub fn reads_routes(&self) -> bool {
        self.route_metadata || self.outlive_client.is_some()
    }
}

impl EtcdConfig {
    fn check(&mut self) -> Result<(), ConfigError> {
        if self.cluster.is_empty() {
            return Err(invalid("etcd.cluster", "must name an Envoy cluster"));
        }
        if self.cluster.len() + self.authority.len() > MAX_UPSTREAM_NAMES {
            return Err(invalid(
                "etcd.cluster",
                format!("with etcd.authority, must be at most {MAX_UPSTREAM_NAMES} bytes"),
            ));
        }
        if self.timeout == 0 {
            return Err(invalid("etcd.timeout", "must be longer than 0s"));
        }
        if self.max_value_bytes < 1024 {
            return Err(invalid("etcd.max_value_bytes", "must be at least 1024"));
        }
        if self.max_share_bytes < self.max_value_bytes {
            return Err(invalid(
                "etcd.max_share_bytes",
                "must be at least etcd.max_value_bytes, so that any record fits in a share",
            ));
        }
        self.auth_token = self.auth_token.take().filter(|t| !t.is_empty());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
