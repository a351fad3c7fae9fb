//! The host, through `proxy_wasm::hostcalls` only: every call's error is handled here, so the
//! rest of the glue never meets a host `Status` (the SDK's trait helpers would panic on one).

use crate::core::config::EtcdConfig;
use crate::core::exchange::{Answered, RootRequest, StreamEnd};
use crate::core::metrics::{Counter, Gauge, Histogram};
use crate::core::problem::LocalReply;
use crate::core::store::{CallFailed, CallId, CallResponse, StoreError};
use crate::core::worker::Host;
use crate::core::Millis;
use crate::stores::etcd::{self, Method};
use crate::stores::{Caller, Kv};
use log::{debug, warn, Level};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::fmt::Arguments;
use std::time::UNIX_EPOCH;

/// Envoy's shared data (one map per `vm_id` per process, shared by every worker's VM).
#[derive(Clone, Copy)]
pub struct SharedData;

impl Kv for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((value, Some(cas))) => Ok(Some((value.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(status) => Err(host_error("get_shared_data", status)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(host_error("set_shared_data", status)),
        }
    }
}

/// gRPC calls to etcd through an Envoy cluster (HTTP/2).
pub struct EtcdCalls {
    settings: EtcdConfig,
    /// The cluster and `:authority`, as the `GrpcService` Envoy takes in place of a cluster name.
    upstream: String,
}

impl EtcdCalls {
    pub fn new(settings: EtcdConfig) -> Self {
        let upstream = etcd::wire::upstream(&settings.cluster, &settings.authority);
        // The configuration keeps both names short enough that every length is one byte below
        // 0x80: the encoding is text. Else the bare cluster name, with Envoy's authority.
        let upstream = String::from_utf8(upstream).unwrap_or_else(|_| settings.cluster.clone());
        EtcdCalls { settings, upstream }
    }
}

impl Caller for EtcdCalls {
    fn call(&self, (service, method): Method, message: &[u8]) -> Result<CallId, StoreError> {
        let settings = &self.settings;
        let metadata = match &settings.auth_token {
            Some(token) => vec![("token", token.as_bytes())],
            None => Vec::new(),
        };
        let timeout = std::time::Duration::from_millis(settings.timeout);
        hostcalls::dispatch_grpc_call(
            &self.upstream,
            service,
            method,
            metadata,
            Some(message),
            timeout,
        )
        .map_err(|status| host_error("dispatch_grpc_call", status))
    }

    fn micros(&self) -> u64 {
        micros()
    }
}

/// The answer to a gRPC call, read in the callback that delivers it.
pub fn grpc_answer(status: u32, size: usize) -> CallResponse {
    if status != 0 {
        let message = match hostcalls::get_grpc_status() {
            Ok((_, Some(message))) => message,
            Ok((_, None)) => String::new(),
            Err(status) => format!("get_grpc_status: {status:?}"),
        };
        return Err(CallFailed { status, message });
    }
    Ok(body(BufferType::GrpcReceiveBuffer, size))
}

/// The answer to a request sent from the root context, read in the callback that delivers it;
/// a body over `max_body` is left unread, so that it never grows the VM's memory.
pub fn upstream_answer(headers: usize, body_size: usize, max_body: usize) -> Answered {
    if headers == 0 {
        return Answered::Nothing;
    }
    let headers = self::headers(MapType::HttpCallResponseHeaders);
    if body_size > max_body {
        return Answered::TooLarge { headers };
    }
    Answered::Response {
        headers,
        body: body(BufferType::HttpCallResponseBody, body_size),
    }
}

/// The matched route's metadata, as Envoy serialises it (`envoy.config.core.v3.Metadata`);
/// empty when the route has none.
pub fn route_metadata() -> Vec<u8> {
    property(vec!["xds", "route_metadata"]).unwrap_or_default()
}

/// The matched route's name, for what is said of it; `(unnamed)` without one.
pub fn route_name() -> String {
    property(vec!["xds", "route_name"])
        .filter(|name| !name.is_empty())
        .map_or_else(
            || "(unnamed)".into(),
            |name| String::from_utf8_lossy(&name).into_owned(),
        )
}

/// The matched route's cluster, where a request sent from the root context goes.
pub fn route_cluster() -> Option<String> {
    property(vec!["xds", "cluster_name"]).map(|name| String::from_utf8_lossy(&name).into_owned())
}

fn host_error(call: &str, status: Status) -> StoreError {
    StoreError::Host(format!("{call}: {status:?}"))
}

/// Wall-clock milliseconds; records compare deadlines written by other workers, so this is the
/// host's clock, not a monotonic one.
pub fn now() -> Millis {
    micros() / 1_000
}

/// Wall-clock microseconds.
fn micros() -> u64 {
    match hostcalls::get_current_time() {
        Ok(time) => time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default(),
        Err(status) => {
            warn!("get_current_time failed: {status:?}");
            0
        }
    }
}

pub fn log_level() -> Option<proxy_wasm::types::LogLevel> {
    hostcalls::get_log_level().ok()
}

pub fn headers(map: MapType) -> Vec<(String, Vec<u8>)> {
    match hostcalls::get_map_bytes(map) {
        Ok(headers) => headers,
        Err(status) => {
            warn!("reading headers failed: {status:?}");
            Vec::new()
        }
    }
}

/// Up to `size` bytes of a buffer: a body, or the plugin configuration.
pub fn body(buffer: BufferType, size: usize) -> Vec<u8> {
    body_from(buffer, 0, size)
}

/// The bytes of a buffer from `from` up to `size`.
pub fn body_from(buffer: BufferType, from: usize, size: usize) -> Vec<u8> {
    match hostcalls::get_buffer(buffer, from, size.saturating_sub(from)) {
        Ok(bytes) => bytes.unwrap_or_default(),
        Err(status) => {
            warn!("reading {buffer:?} failed: {status:?}");
            Vec::new()
        }
    }
}

fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

/// Envoy's `response.flags` bits meaning the upstream may have done the work although no
/// complete response came back: timeouts, resets, terminations.
const INTERRUPTED: u64 = 0x4 // upstream request timeout
    | 0x8 // local reset
    | 0x10 // upstream remote reset
    | 0x40 // upstream connection termination
    | 0x4000 // downstream connection termination
    | 0x8000 // upstream retry limit exceeded
    | 0x10000 // stream idle timeout
    | 0x80000 // upstream max stream duration reached
    | 0x400000 // duration timeout
    | 0x800000; // upstream protocol error

/// How the stream ended, from Envoy's `response.flags` (none when absent).
pub fn stream_end() -> StreamEnd {
    let flags = property(vec!["response", "flags"])
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if flags & INTERRUPTED != 0 {
        StreamEnd::Interrupted
    } else {
        StreamEnd::Unflagged
    }
}

/// Whether the response in flight came from the upstream rather than from Envoy itself.
pub fn response_via_upstream() -> bool {
    property(vec!["response", "code_details"]).as_deref() == Some(b"via_upstream")
}

/// Adds to the response headers in flight each of `headers` whose name they lack.
pub fn add_missing_headers(headers: &[(String, String)]) {
    if headers.is_empty() {
        return;
    }
    let present = self::headers(MapType::HttpResponseHeaders);
    for (name, value) in headers {
        if present.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        if let Err(status) = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value) {
            warn!("add_map_value({name}) failed: {status:?}");
        }
    }
}

pub fn set_tick_period(millis: u64) {
    if let Err(status) = hostcalls::set_tick_period(std::time::Duration::from_millis(millis)) {
        warn!("set_tick_period failed: {status:?}");
    }
}

/// The worker's [`Host`]: the hostcalls above, and the metrics, defined once per VM.
pub struct Proxy {
    counters: Vec<Option<u32>>,
    gauges: Vec<Option<u32>>,
    histograms: Vec<Option<u32>>,
    root: u32,
    /// The shared queue that wakes the root context (with `outlive_client` only).
    wake_queue: Option<u32>,
}

impl Proxy {
    /// `root` is the root context's id; `wake_queue`, a queue it consumes.
    pub fn define(root: u32, wake_queue: Option<u32>) -> Proxy {
        let define = |kind: MetricType, name: &str| {
            hostcalls::define_metric(kind, name)
                .map_err(|status| warn!("define_metric({name}) failed: {status:?}"))
                .ok()
        };
        let counters = Counter::ALL.map(|c| define(MetricType::Counter, c.name()));
        let gauges = Gauge::ALL.map(|g| define(MetricType::Gauge, g.name()));
        let histograms = Histogram::ALL.map(|h| define(MetricType::Histogram, h.name()));
        Proxy {
            counters: counters.to_vec(),
            gauges: gauges.to_vec(),
            histograms: histograms.to_vec(),
            root,
            wake_queue,
        }
    }
}

impl Host for Proxy {
    fn now(&self) -> Millis {
        now()
    }

    fn act_for(&self, context: u32) -> bool {
        match hostcalls::set_effective_context(context) {
            Ok(()) => true,
            Err(status) => {
                warn!("set_effective_context({context}) failed: {status:?}");
                false
            }
        }
    }

    fn reply(&self, reply: &LocalReply) {
        let headers = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        if let Err(status) =
            hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body))
        {
            warn!("send_http_response failed: {status:?}");
        }
    }

    fn resume(&self) {
        if let Err(status) = hostcalls::resume_http_request() {
            warn!("resume_http_request failed: {status:?}");
        }
    }

    fn mark(&self, fact: &'static str, value: &str) {
        // Envoy keeps it as filter state `wasm.<fact>`, which access logs print with
        // %FILTER_STATE(wasm.<fact>:PLAIN)%.
        if let Err(status) = hostcalls::set_property(vec![fact], Some(value.as_bytes())) {
            debug!("set_property({fact}) failed: {status:?}");
        }
    }

    fn count(&self, counter: Counter, n: u64) {
        // Envoy refuses to add 0 to a counter.
        if let Ok(n @ 1..) = i64::try_from(n) {
            increment(&self.counters, counter.index(), counter.name(), n);
        }
    }

    fn set_gauge(&self, gauge: Gauge, level: u64) {
        record(&self.gauges, gauge.index(), gauge.name(), level);
    }

    fn add_to_gauge(&self, gauge: Gauge, change: i64) {
        increment(&self.gauges, gauge.index(), gauge.name(), change);
    }

    fn record(&self, histogram: Histogram, value: u64) {
        record(&self.histograms, histogram.index(), histogram.name(), value);
    }

    fn log(&self, level: Level, line: Arguments) {
        log::log!(level, "{line}");
    }

    fn act_as_root(&self) {
        self.act_for(self.root);
    }

    /// A message on the root context's own queue: Envoy calls it back on this worker's next turn
    /// (a tick could be 20 ms away).
    fn wake(&self) {
        let Some(queue) = self.wake_queue else {
            return;
        };
        if let Err(status) = hostcalls::enqueue_shared_queue(queue, Some(b"wake")) {
            warn!("enqueue_shared_queue failed: {status:?}");
        }
    }

    fn send(&self, request: &RootRequest) -> Result<CallId, StoreError> {
        let headers = request
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let body = Some(request.body.as_slice()).filter(|body| !body.is_empty());
        let timeout = std::time::Duration::from_millis(request.timeout);
        hostcalls::dispatch_http_call(&request.cluster, headers, body, vec![], timeout)
            .map_err(|status| host_error("dispatch_http_call", status))
    }
}

/// Adds `by` to metric `index` of `ids` (a counter or a gauge), if Envoy defined it.
fn increment(ids: &[Option<u32>], index: usize, name: &str, by: i64) {
    if let Some(Some(id)) = ids.get(index) {
        if let Err(status) = hostcalls::increment_metric(*id, by) {
            warn!("increment_metric({name}) failed: {status:?}");
        }
    }
}

/// Sets a gauge, or records a histogram's sample, if Envoy defined it.
fn record(ids: &[Option<u32>], index: usize, name: &str, value: u64) {
    if let Some(Some(id)) = ids.get(index) {
        if let Err(status) = hostcalls::record_metric(*id, value) {
            warn!("record_metric({name}) failed: {status:?}");
        }
    }
}

/// Registers the queue that wakes this VM's root context: one name per VM in the process.
pub fn wake_queue(name: &str) -> Option<u32> {
    hostcalls::register_shared_queue(name)
        .map_err(|status| warn!("register_shared_queue failed: {status:?}"))
        .ok()
}

/// Empties a queue that only wakes: its messages say nothing.
pub fn drain(queue: u32) {
    while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue) {}
}
