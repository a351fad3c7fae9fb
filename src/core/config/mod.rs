//! The plugin configuration: serde gives it shape, `Config::parse` gives it meaning.
//!
//! Every field has a default, so `{}` is a complete configuration. Anything unknown or out of
//! range is refused with an error that names the field, and the filter then refuses to load.

use crate::core::Millis;
use serde::Deserialize;
use std::fmt;

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

#[derive(Debug, Clone)]
pub struct Config {
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
    pub max_waiting: usize,
    /// The status of `idempotency_in_progress`: 503 for clients that retry 5xx answers (the
    /// seed's loop), 409 for clients written to the IETF draft or Stripe.
    pub in_progress_status: u16,
    /// The status of `idempotency_conflict`: 409 (the seed's), or 422 (the IETF draft's).
    pub conflict_status: u16,
    pub max_request_body_bytes: usize,
    pub max_response_body_bytes: usize,
    pub unstored_statuses: Vec<StatusRule>,
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
        if lease == 0 {
            return Err(invalid(
                "lease",
                "must be longer than 0s with outlive_client: the claim must outlast the attempt",
            ));
        }
        let timeout = duration("outlive_client.timeout", &self.timeout)?;
        if timeout == 0 {
            return Err(invalid("outlive_client.timeout", "must be longer than 0s"));
        }
        if timeout >= lease.saturating_sub(finish) {
            return Err(invalid(
                "outlive_client.timeout",
                format!(
                    "must be shorter than lease ({lease}ms) less the store's finish ({finish}ms): \
                     a claim that ends before its attempt lets a retry run the work again"
                ),
            ));
        }
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

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    Code(u16),
    Text(String),
}

/// The document as written, before its meaning is checked.
struct Raw {
    methods: Vec<String>,
    key_header: String,
    require_key: bool,
    scope_header: String,
    ttl: String,
    lease: String,
    max_wait: String,
    max_waiting: usize,
    in_progress_status: u16,
    conflict_status: u16,
    max_request_body_bytes: usize,
    max_response_body_bytes: usize,
    unstored_statuses: Vec<RawStatus>,
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

/// Reads one field, naming it in the error (serde alone names the position, not the field).
fn field<T: serde::de::DeserializeOwned>(
    name: &'static str,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_json::from_value(value).map_err(|e| invalid(name, e.to_string()))
}

impl Raw {
    fn from_json(json: &[u8]) -> Result<Raw, ConfigError> {
        let document: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| invalid("(document)", e.to_string()))?;
        let serde_json::Value::Object(fields) = document else {
            return Err(invalid("(document)", "expected a JSON object"));
        };
        let mut raw = Raw::default();
        for (name, value) in fields {
            match name.as_str() {
                "methods" => raw.methods = field("methods", value)?,
                "key_header" => raw.key_header = field("key_header", value)?,
                "require_key" => raw.require_key = field("require_key", value)?,
                "scope_header" => raw.scope_header = field("scope_header", value)?,
                "ttl" => raw.ttl = field("ttl", value)?,
                "lease" => raw.lease = field("lease", value)?,
                "max_wait" => raw.max_wait = field("max_wait", value)?,
                "max_waiting" => raw.max_waiting = field("max_waiting", value)?,
                "in_progress_status" => {
                    raw.in_progress_status = field("in_progress_status", value)?
                }
                "conflict_status" => raw.conflict_status = field("conflict_status", value)?,
                "max_request_body_bytes" => {
                    raw.max_request_body_bytes = field("max_request_body_bytes", value)?
                }
                "max_response_body_bytes" => {
                    raw.max_response_body_bytes = field("max_response_body_bytes", value)?
                }
                "unstored_statuses" => raw.unstored_statuses = field("unstored_statuses", value)?,
                "capacity_records" => raw.capacity_records = field("capacity_records", value)?,
                "capacity_bytes" => raw.capacity_bytes = field("capacity_bytes", value)?,
                "max_share" => raw.max_share = field("max_share", value)?,
                "compress_responses" => {
                    raw.compress_responses = field("compress_responses", value)?
                }
                "when_full" => raw.when_full = field("when_full", value)?,
                "key_prefix" => raw.key_prefix = field("key_prefix", value)?,
                "include_paths" => raw.include_paths = field("include_paths", value)?,
                "exclude_paths" => raw.exclude_paths = field("exclude_paths", value)?,
                "etcd" => raw.etcd = field("etcd", value)?,
                "outlive_client" => raw.outlive_client = field("outlive_client", value)?,
                "" => return Err(invalid("\"\"", "unknown field (an empty name)")),
                _ => return Err(invalid(&name, "unknown field")),
            }
        }
        Ok(raw)
    }
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            methods: vec!["POST".into(), "PATCH".into()],
            key_header: "idempotency-key".into(),
            require_key: false,
            scope_header: "authorization".into(),
            ttl: "24h".into(),
            lease: "60s".into(),
            max_wait: "10s".into(),
            max_waiting: 1000,
            in_progress_status: 503,
            conflict_status: 409,
            max_request_body_bytes: 1 << 20,
            max_response_body_bytes: 1 << 20,
            unstored_statuses: vec![
                RawStatus::Text("5xx".into()),
                RawStatus::Code(408),
                RawStatus::Code(425),
                RawStatus::Code(429),
            ],
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

const DEFAULT_LEASE: Millis = 60_000;

/// Limits that keep one misconfiguration from exhausting the host.
const MAX_CAPACITY_RECORDS: usize = 10_000_000;
const MAX_BODY_BYTES: usize = 64 << 20;

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
        if raw.methods.is_empty() {
            return Err(invalid("methods", "must name at least one method"));
        }
        let mut methods = Vec::with_capacity(raw.methods.len());
        for method in &raw.methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(invalid(
                    "methods",
                    format!("`{method}` is not a method name"),
                ));
            }
            methods.push(method.to_ascii_uppercase());
        }
        let key_header = header_name("key_header", &raw.key_header)?;
        let scope_header = header_name("scope_header", &raw.scope_header)?;
        let ttl = duration("ttl", &raw.ttl)?;
        if ttl == 0 {
            return Err(invalid("ttl", "must be longer than 0s"));
        }
        let lease = duration("lease", &raw.lease)?;
        let max_wait = duration("max_wait", &raw.max_wait)?;
        if raw.max_request_body_bytes > MAX_BODY_BYTES {
            return Err(invalid(
                "max_request_body_bytes",
                format!("at most {MAX_BODY_BYTES}"),
            ));
        }
        if raw.max_response_body_bytes > MAX_BODY_BYTES {
            return Err(invalid(
                "max_response_body_bytes",
                format!("at most {MAX_BODY_BYTES}"),
            ));
        }
        let unstored_statuses = raw
            .unstored_statuses
            .iter()
            .map(status_rule)
            .collect::<Result<Vec<_>, _>>()?;
        if raw.capacity_records == 0 || raw.capacity_records > MAX_CAPACITY_RECORDS {
            return Err(invalid(
                "capacity_records",
                format!("must be between 1 and {MAX_CAPACITY_RECORDS}"),
            ));
        }
        let shard_bytes = raw.capacity_bytes / LEDGER_SHARDS;
        if shard_bytes < raw.max_response_body_bytes.max(1) {
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
        if ![409, 503].contains(&raw.in_progress_status) {
            return Err(invalid(
                "in_progress_status",
                "must be 503 (clients that retry 5xx answers) or 409 (IETF draft, Stripe)",
            ));
        }
        if ![409, 422].contains(&raw.conflict_status) {
            return Err(invalid(
                "conflict_status",
                "must be 409 (the seed document's) or 422 (the IETF draft's)",
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
        let etcd = raw.etcd.map(RawEtcd::validate).transpose()?;
        let finish = etcd.as_ref().map_or(0, |etcd| etcd.timeout);
        let outlive_client = raw
            .outlive_client
            .map(|raw| raw.validate(lease, finish))
            .transpose()?;
        Ok(Config {
            methods,
            key_header,
            require_key: raw.require_key,
            scope_header,
            ttl,
            lease,
            max_wait,
            max_waiting: raw.max_waiting,
            in_progress_status: raw.in_progress_status,
            conflict_status: raw.conflict_status,
            max_request_body_bytes: raw.max_request_body_bytes,
            max_response_body_bytes: raw.max_response_body_bytes,
            unstored_statuses,
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

    pub fn covers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// Whether requests to `path` (without its query) are covered.
    pub fn covers_path(&self, path: &[u8]) -> bool {
        let under = |prefix: &String| path.starts_with(prefix.as_bytes());
        (self.include_paths.is_empty() || self.include_paths.iter().any(under))
            && !self.exclude_paths.iter().any(under)
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

    /// The timeout of a request sent from the root context on a route whose metadata gives
    /// `route_timeout`, if any; `Err` says why that one cannot be used. Like
    /// `outlive_client.timeout`, it must end before the claim's lease, less the store's finish.
    pub fn outlive_timeout(&self, route_timeout: Option<&str>) -> Result<Millis, ConfigError> {
        let field = "route metadata idempotency.timeout";
        let default = self.outlive_client.as_ref().map_or(0, |o| o.timeout);
        let Some(text) = route_timeout else {
            return Ok(default);
        };
        let finish = self.etcd.as_ref().map_or(0, |etcd| etcd.timeout);
        let max = self.lease.saturating_sub(finish);
        match duration(field, text)? {
            0 => Err(invalid(field, "must be longer than 0s")),
            timeout if timeout >= max => Err(invalid(
                field,
                format!("must be shorter than {max}ms (the lease, less the store's finish)"),
            )),
            timeout => Ok(timeout),
        }
    }

    pub fn stores_status(&self, status: u16) -> bool {
        !self
            .unstored_statuses
            .iter()
            .any(|rule| rule.matches(status))
    }
}

fn header_name(field: &'static str, name: &str) -> Result<String, ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(field, format!("`{name}` is not a header name")));
    }
    Ok(name.to_ascii_lowercase())
}

fn status_rule(raw: &RawStatus) -> Result<StatusRule, ConfigError> {
    let field = "unstored_statuses";
    match raw {
        RawStatus::Code(code) if (100..=599).contains(code) => Ok(StatusRule::Exact(*code)),
        RawStatus::Code(code) => Err(invalid(field, format!("{code} is not an HTTP status"))),
        RawStatus::Text(text) => {
            let bytes = text.as_bytes();
            match bytes {
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
            }
        }
    }
}

/// Parses "250ms", "30s", "5m", "24h" (and "0s").
pub fn duration(field: &'static str, text: &str) -> Result<Millis, ConfigError> {
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
