//! The plugin configuration: serde gives it shape, `Config::parse` gives it meaning.
//!
//! Every field has a default, so `{}` is a complete configuration. Anything unknown or out of
//! range is refused with an error that names the field, and the filter then refuses to load.
//! The fields that decide one request ([`Policy`]) may also come from a route's metadata
//! ([`Config::route_policy`]); the rest are the store's and the listener's alone.

mod policy;
mod route;

use crate::core::Millis;
use serde::Deserialize;
use std::fmt;
use std::rc::Rc;

use policy::field;
pub use policy::Policy;

/// The shared-data table accounts `capacity_bytes` in this many ledgers; each must hold any
/// storable response.
pub const LEDGER_SHARDS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenFull {
    /// The completed record nearest its expiry makes way for the new one; with none (every
    /// record in flight), `Reject`.
    Evict,
    /// Answer `503` with `Retry-After`: no request runs without its guarantee.
    Reject,
    /// Forward without idempotency: availability over the guarantee.
    Pass,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The listener's policy: every covered request's, unless its route gives its own.
    pub policy: Rc<Policy>,
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

/// Which routes send their covered requests upstream from the root context, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutliveClient {
    pub routes: OutliveRoutes,
    /// The attempt's timeout, unless the route's metadata gives its own.
    pub timeout: Millis,
    /// Requests one worker may have sent from its root context and not yet had answered;
    /// past it, new ones go through the router. Each holds its request and, once it comes,
    /// its answer: this bounds their memory.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlive {
    #[serde(default = "default_outlive_routes")]
    routes: String,
    #[serde(default = "default_outlive_timeout")]
    timeout: String,
    #[serde(default = "default_outlive_max_in_flight")]
    max_in_flight: usize,
}

fn default_outlive_routes() -> String {
    "all".into()
}

/// Envoy's own default route timeout.
fn default_outlive_timeout() -> String {
    "15s".into()
}

fn default_outlive_max_in_flight() -> usize {
    1000
}

const MAX_OUTLIVE_IN_FLIGHT: usize = 100_000;

impl RawOutlive {
    /// `lease` is the claim's; `finish` how long the store may take to record the ending.
    fn validate(self, lease: Millis, finish: Millis) -> Result<OutliveClient, ConfigError> {
        let routes = match self.routes.as_str() {
            "all" => OutliveRoutes::All,
            "marked" => OutliveRoutes::Marked,
            other => {
                return Err(invalid(
                    "outlive_client.routes",
                    format!("`{other}`: expected `all` or `marked`"),
                ))
            }
        };
        let timeout = duration("outlive_client.timeout", &self.timeout)?;
        let timeout = send_timeout("outlive_client.timeout", timeout, lease, finish)?;
        if self.max_in_flight == 0 || self.max_in_flight > MAX_OUTLIVE_IN_FLIGHT {
            return Err(invalid(
                "outlive_client.max_in_flight",
                format!("must be between 1 and {MAX_OUTLIVE_IN_FLIGHT}"),
            ));
        }
        Ok(OutliveClient {
            routes,
            timeout,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// etcd's v3 gRPC API, reached through an Envoy cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// The Envoy cluster that reaches etcd (HTTP/2).
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Prefix of every etcd key the filter writes.
    pub key_prefix: String,
    /// Every call's timeout.
    pub timeout: Millis,
    /// Sent as `token` metadata when etcd has authentication on.
    pub auth_token: Option<String>,
    /// Largest record value written to etcd; larger responses are kept without their body.
    pub max_value_bytes: usize,
    /// What one organisation's records written through this Envoy may hold in etcd for their
    /// whole `ttl`; past it, its new records live `lease`.
    pub max_share_bytes: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    cluster: String,
    #[serde(default = "default_etcd_authority")]
    authority: String,
    #[serde(default = "default_etcd_prefix")]
    key_prefix: String,
    #[serde(default = "default_etcd_timeout")]
    timeout: String,
    #[serde(default)]
    auth_token: Option<String>,
    #[serde(default = "default_etcd_max_value")]
    max_value_bytes: usize,
    #[serde(default = "default_etcd_max_share")]
    max_share_bytes: usize,
}

const MAX_UPSTREAM_NAMES: usize = 120;

fn default_etcd_authority() -> String {
    "etcd".into()
}

fn default_etcd_prefix() -> String {
    "idempotency/".into()
}

fn default_etcd_timeout() -> String {
    "1s".into()
}

/// etcd refuses requests over 1.5 MiB by default; this leaves room for the rest of the call.
fn default_etcd_max_value() -> usize {
    1_000_000
}

/// A tenth of etcd's default 2 GiB quota, across about three Envoys.
fn default_etcd_max_share() -> usize {
    64 << 20
}

impl RawEtcd {
    fn validate(self) -> Result<EtcdConfig, ConfigError> {
        if self.cluster.is_empty() {
            return Err(invalid("etcd.cluster", "must name an Envoy cluster"));
        }
        // Both travel in the `GrpcService` Envoy takes as a call's upstream, whose lengths must
        // stay single bytes.
        if self.cluster.len() + self.authority.len() > MAX_UPSTREAM_NAMES {
            return Err(invalid(
                "etcd.cluster",
                "with etcd.authority, must be at most 120 bytes",
            ));
        }
        let timeout = duration("etcd.timeout", &self.timeout)?;
        if timeout == 0 {
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
        Ok(EtcdConfig {
            cluster: self.cluster,
            authority: self.authority,
            key_prefix: self.key_prefix,
            timeout,
            auth_token: self.auth_token.filter(|t| !t.is_empty()),
            max_value_bytes: self.max_value_bytes,
            max_share_bytes: self.max_share_bytes,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: `{}`: {}",
            self.field, self.reason
        )
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// A timeout for a request sent from the root context: the claim (`lease`) must outlast it and
/// the store's finish after it, or a retry could run the work again while it is still running.
fn send_timeout(
    field: &str,
    timeout: Millis,
    lease: Millis,
    finish: Millis,
) -> Result<Millis, ConfigError> {
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

/// The listener's own fields as written, before their meaning is checked; the policy's fields
/// are checked as they are read.
struct Raw {
    policy: Policy,
    route_metadata: bool,
    max_waiting: usize,
    capacity_records: usize,
    capacity_bytes: usize,
    max_share: f64,
    compress_responses: bool,
    when_full: String,
    key_prefix: String,
    include_paths: Vec<String>,
    exclude_paths: Vec<String>,
    etcd: Option<RawEtcd>,
    outlive_client: Option<RawOutlive>,
}

/// The fields of a JSON document that must be an object.
fn object(json: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ConfigError> {
    let document: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| invalid("(document)", e.to_string()))?;
    match document {
        serde_json::Value::Object(fields) => Ok(fields),
        _ => Err(invalid("(document)", "expected a JSON object")),
    }
}

fn unknown(name: &str) -> ConfigError {
    match name {
        "" => invalid("\"\"", "unknown field (an empty name)"),
        _ => invalid(name, "unknown field"),
    }
}

impl Raw {
    fn from_json(json: &[u8]) -> Result<Raw, ConfigError> {
        let mut raw = Raw::default();
        for (name, value) in object(json)? {
            if raw.policy.set(&name, value.clone())? {
                continue;
            }
            match name.as_str() {
                "route_metadata" => raw.route_metadata = field(&name, value)?,
                "max_waiting" => raw.max_waiting = field(&name, value)?,
                "capacity_records" => raw.capacity_records = field(&name, value)?,
                "capacity_bytes" => raw.capacity_bytes = field(&name, value)?,
                "max_share" => raw.max_share = field(&name, value)?,
                "compress_responses" => raw.compress_responses = field(&name, value)?,
                "when_full" => raw.when_full = field(&name, value)?,
                "key_prefix" => raw.key_prefix = field(&name, value)?,
                "include_paths" => raw.include_paths = field(&name, value)?,
                "exclude_paths" => raw.exclude_paths = field(&name, value)?,
                "etcd" => raw.etcd = field(&name, value)?,
                "outlive_client" => raw.outlive_client = field(&name, value)?,
                _ => return Err(unknown(&name)),
            }
        }
        Ok(raw)
    }
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            policy: Policy::default(),
            route_metadata: false,
            max_waiting: 1000,
            capacity_records: 100_000,
            capacity_bytes: 128 << 20,
            max_share: 0.1,
            compress_responses: true,
            when_full: "evict".into(),
            key_prefix: "idempotency/".into(),
            include_paths: Vec::new(),
            exclude_paths: Vec::new(),
            etcd: None,
            outlive_client: None,
        }
    }
}

/// Limits that keep one misconfiguration from exhausting the host.
const MAX_CAPACITY_RECORDS: usize = 10_000_000;

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        let json = if json.iter().all(u8::is_ascii_whitespace) {
            b"{}".as_slice()
        } else {
            json
        };
        Config::validate(Raw::from_json(json)?)
    }

    fn validate(raw: Raw) -> Result<Config, ConfigError> {
        if raw.capacity_records == 0 || raw.capacity_records > MAX_CAPACITY_RECORDS {
            return Err(invalid(
                "capacity_records",
                format!("must be between 1 and {MAX_CAPACITY_RECORDS}"),
            ));
        }
        if raw.capacity_bytes / LEDGER_SHARDS < raw.policy.max_response_body_bytes.max(1) {
            return Err(invalid(
                "capacity_bytes",
                format!(
                    "must be at least {} x max_response_body_bytes, so any storable response fits",
                    LEDGER_SHARDS
                ),
            ));
        }
        if !(raw.max_share > 0.0 && raw.max_share <= 1.0) {
            return Err(invalid(
                "max_share",
                "must be a fraction above 0 and at most 1",
            ));
        }
        let when_full = match raw.when_full.as_str() {
            "evict" => WhenFull::Evict,
            "reject" => WhenFull::Reject,
            "pass" => WhenFull::Pass,
            other => {
                return Err(invalid(
                    "when_full",
                    format!("`{other}`: expected `evict`, `reject` or `pass`"),
                ))
            }
        };
        if raw.key_prefix.is_empty() {
            return Err(invalid(
                "key_prefix",
                "must not be empty: shared data is shared by every plugin of the VM",
            ));
        }
        for (field, prefixes) in [
            ("include_paths", &raw.include_paths),
            ("exclude_paths", &raw.exclude_paths),
        ] {
            if let Some(bad) = prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err(invalid(
                    field,
                    format!("`{bad}` is not a path prefix starting with /"),
                ));
            }
        }
        raw.policy.check()?;
        let etcd = raw.etcd.map(RawEtcd::validate).transpose()?;
        let finish = etcd.as_ref().map_or(0, |etcd| etcd.timeout);
        let lease = raw.policy.lease;
        let outlive_client = raw
            .outlive_client
            .map(|raw| raw.validate(lease, finish))
            .transpose()?;
        let mut policy = raw.policy;
        policy.send_from_root = outlive_client
            .as_ref()
            .filter(|outlive| outlive.covers_route(None))
            .map(|outlive| outlive.timeout);
        Ok(Config {
            policy: Rc::new(policy),
            route_metadata: raw.route_metadata,
            max_waiting: raw.max_waiting,
            capacity_records: raw.capacity_records,
            capacity_bytes: raw.capacity_bytes,
            max_share: raw.max_share,
            compress_responses: raw.compress_responses,
            when_full,
            key_prefix: raw.key_prefix,
            include_paths: raw.include_paths,
            exclude_paths: raw.exclude_paths,
            etcd,
            outlive_client,
        })
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

/// Parses "250ms", "30s", "5m", "24h" (and "0s").
pub fn duration(field: &str, text: &str) -> Result<Millis, ConfigError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale: Millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(invalid(
                field,
                format!("`{text}`: expected a duration like \"500ms\", \"30s\", \"5m\" or \"24h\""),
            ))
        }
    };
    digits
        .parse::<Millis>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| *ms <= 366 * 24 * 3_600_000)
        .ok_or_else(|| {
            invalid(
                field,
                format!("`{text}` is not a duration of at most 366 days"),
            )
        })
}

#[cfg(test)]
mod tests;
