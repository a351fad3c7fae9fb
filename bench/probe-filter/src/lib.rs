//! Repeats one operation `repeat` times per request, so that the cost of one operation is the
//! difference in CPU per request between two repeat counts. Configured by a plugin configuration
//! of `key=value` words, e.g. `op=shared_get size=1400 repeat=8 phase=body`:
//!
//! - `op`: none, header, headers, body, sha256, xxh3, blake3, shared_get, shared_set, time,
//!   metric, property, alloc, reply; or `floor`: once per request, only the host operations
//!   that any Idempotency-Key filter over shared data needs for a first POST (read the headers,
//!   the method among them, pause for the body and read it, claim with a read and a
//!   compare-and-swap of a `size`-byte bucket, read whether the answer came from the upstream,
//!   its headers and its body, then write the response and the bucket again), with no work of
//!   its own. Each request's bucket is one of `buckets` keys and its response one of 16 times as
//!   many, taken in a scattered order, as a table's keys are for new keys. `replay`: likewise
//!   the host operations a replay needs (headers, body, a bucket and a response read, the
//!   answer sent with `send_http_response`). `etcd`: the calls any filter over etcd needs for a
//!   first POST, with no work of its own: once the body is complete, a claim transaction to
//!   etcd's `KV.Txn` over gRPC (put a new key if absent), the request paused until it answers;
//!   once the response headers arrive, a second transaction (a put of `size` bytes), the
//!   response paused until it answers
//! - `size`: bytes for sha256, alloc and the shared-data value
//! - `phase`: `headers` (in the request headers callback) or `body` (the headers callback pauses
//!   until the whole body has arrived, as the Idempotency-Key filter does)
//!
//! Counts the HTTP contexts it creates and the streams it sees end (`probe.contexts`,
//! `probe.logs`), which shows whether Envoy entered the VM for a request at all.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use sha2::{Digest, Sha256};
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(Root { plan: None }));
}}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    None,
    Header,
    Headers,
    Body,
    Sha256,
    Xxh3,
    Blake3,
    SharedGet,
    SharedSet,
    Time,
    Metric,
    Property,
    Alloc,
    Reply,
    Floor,
    Replay,
    Etcd,
}

struct Plan {
    op: Op,
    buckets: u64,
    requests: std::cell::Cell<u64>,
    size: usize,
    repeat: usize,
    in_body: bool,
    data: Vec<u8>,
    contexts: u32,
    logs: u32,
    scratch: u32,
    /// When the VM was configured: the etcd op's keys are new in each run.
    started: u128,
}

struct Root {
    plan: Option<Rc<Plan>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = String::from_utf8_lossy(&config).into_owned();
        let (mut op, mut size, mut repeat, mut in_body) = (Op::None, 0usize, 1usize, false);
        let mut buckets = 1u64;
        for word in config.split_whitespace() {
            let (name, value) = word.split_once('=').unwrap_or((word, ""));
            match name {
                "op" => {
                    op = match value {
                        "header" => Op::Header,
                        "headers" => Op::Headers,
                        "body" => Op::Body,
                        "sha256" => Op::Sha256,
                        "xxh3" => Op::Xxh3,
                        "blake3" => Op::Blake3,
                        "shared_get" => Op::SharedGet,
                        "shared_set" => Op::SharedSet,
                        "time" => Op::Time,
                        "metric" => Op::Metric,
                        "property" => Op::Property,
                        "alloc" => Op::Alloc,
                        "reply" => Op::Reply,
                        "floor" => Op::Floor,
                        "replay" => Op::Replay,
                        "etcd" => Op::Etcd,
                        _ => Op::None,
                    }
                }
                "size" => size = value.parse().unwrap_or(0),
                "repeat" => repeat = value.parse().unwrap_or(1),
                "phase" => in_body = value == "body",
                "buckets" => buckets = value.parse().unwrap_or(1).max(1),
                _ => {}
            }
        }
        let metric = |name| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        let data = vec![0x5a; size];
        if matches!(op, Op::SharedGet | Op::Floor | Op::Replay) {
            let _ = hostcalls::set_shared_data("probe/get", Some(&data), None);
        }
        self.plan = Some(Rc::new(Plan {
            op,
            buckets,
            requests: std::cell::Cell::new(0),
            size,
            repeat,
            in_body,
            data,
            contexts: metric("probe.contexts"),
            logs: metric("probe.logs"),
            scratch: metric("probe.scratch"),
            started: hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
        }));
        let _ = hostcalls::set_tick_period(Duration::from_secs(0));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plan = self.plan.clone()?;
        let _ = hostcalls::increment_metric(plan.contexts, 1);
        let n = plan.requests.get() + 1;
        plan.requests.set(n);
        // A scattered walk over the keys: a new key's bucket is as good as random.
        let bucket = n.wrapping_mul(0x9e37_79b9) % plan.buckets;
        let response = n.wrapping_mul(0x85eb_ca6b) % (plan.buckets * 16);
        Some(Box::new(Probe {
            plan: plan.clone(),
            bucket: format!("probe/b/{bucket}"),
            response: format!("probe/r/{response}"),
            key: format!("probe/{}/{n}", plan.started),
            finishing: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    plan: Rc<Plan>,
    bucket: String,
    response: String,
    key: String,
    /// The etcd op's second transaction is in flight.
    finishing: bool,
}

impl Probe {
    /// Runs the operation; true if it answered the request itself.
    fn work(&self, body_size: usize) -> bool {
        let plan = &self.plan;
        let mut sink = 0usize;
        for _ in 0..plan.repeat {
            match plan.op {
                Op::None => {}
                Op::Header => {
                    sink += hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":method")
                        .ok()
                        .flatten()
                        .map_or(0, |v| v.len())
                }
                Op::Headers => {
                    sink += hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
                        .map_or(0, |h| h.len())
                }
                Op::Body => {
                    sink += hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                        .ok()
                        .flatten()
                        .map_or(0, |b| b.len())
                }
                Op::Sha256 => sink += Sha256::digest(&plan.data)[0] as usize,
                Op::Xxh3 => sink += xxhash_rust::xxh3::xxh3_128(&plan.data) as u8 as usize,
                Op::Blake3 => sink += blake3::hash(&plan.data).as_bytes()[0] as usize,
                Op::SharedGet => {
                    sink += hostcalls::get_shared_data("probe/get")
                        .ok()
                        .and_then(|(v, _)| v)
                        .map_or(0, |v| v.len())
                }
                Op::SharedSet => {
                    let _ = hostcalls::set_shared_data("probe/set", Some(&plan.data), None);
                }
                Op::Time => {
                    sink += hostcalls::get_current_time().map_or(0, |t| t.elapsed().is_ok() as usize)
                }
                Op::Metric => {
                    let _ = hostcalls::increment_metric(plan.scratch, 1);
                }
                Op::Property => {
                    sink += hostcalls::get_property(vec!["request", "path"])
                        .ok()
                        .flatten()
                        .map_or(0, |v| v.len())
                }
                Op::Alloc => {
                    let mut v = Vec::with_capacity(plan.size);
                    v.resize(plan.size, 1u8);
                    sink += v[plan.size / 2] as usize;
                }
                Op::Floor => {
                    sink += read_request(body_size);
                    self.bucket_round_trip();
                }
                Op::Replay => {
                    sink += read_request(body_size);
                    for _ in 0..2 {
                        sink += hostcalls::get_shared_data("probe/get")
                            .ok()
                            .and_then(|(v, _)| v)
                            .map_or(0, |v| v.len());
                    }
                    let _ = hostcalls::send_http_response(
                        201,
                        vec![("content-type", "application/json"), ("idempotent-replayed", "true")],
                        Some(b"{\"id\":\"ord_0001\",\"status\":\"created\"}"),
                    );
                    std::hint::black_box(sink);
                    return true;
                }
                Op::Etcd => {
                    std::hint::black_box(read_request(body_size));
                    let key = self.key.as_bytes();
                    return self.etcd_txn(&claim_txn(key, &plan.data[..plan.data.len().min(100)]));
                }
                Op::Reply => {
                    let _ = hostcalls::send_http_response(
                        201,
                        vec![("content-type", "application/json")],
                        Some(b"{\"id\":\"ord_0001\",\"status\":\"created\"}"),
                    );
                    return true;
                }
            }
        }
        std::hint::black_box(sink);
        false
    }
}

/// What any filter that covers a request reads of it: the headers (the method among them, as
/// the filter takes it: one call that returns bytes rather than two), the body.
fn read_request(body_size: usize) -> usize {
    let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_or(0, |h| {
        h.iter().find(|(name, _)| name == ":method").map_or(0, |(_, v)| v.len()) + h.len()
    });
    let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
        .ok()
        .flatten()
        .map_or(0, |b| b.len());
    headers + body
}

impl Probe {
    /// A claim's or a finish's bucket: read it, write it back under its CAS.
    fn bucket_round_trip(&self) {
        let (bucket, cas) = hostcalls::get_shared_data(&self.bucket).unwrap_or((None, None));
        let bucket = bucket.unwrap_or_else(|| self.plan.data.clone());
        let _ = hostcalls::set_shared_data(&self.bucket, Some(&bucket), cas);
    }
}

impl Probe {
    /// Sends `txn` to etcd's KV.Txn on the cluster `etcd`; true if it went (the caller pauses).
    fn etcd_txn(&self, txn: &[u8]) -> bool {
        // GrpcService { envoy_grpc { cluster_name: "etcd" } }
        let upstream = "\x0a\x06\x0a\x04etcd";
        hostcalls::dispatch_grpc_call(upstream, "etcdserverpb.KV", "Txn", vec![], Some(txn),
                                      Duration::from_secs(1))
            .is_ok()
    }
}

/// A length-delimited protobuf field.
fn field(number: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2];
    let mut len = payload.len();
    while len >= 0x80 {
        out.push(len as u8 | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(payload);
    out
}

/// TxnRequest { compare: [key's create_revision EQUAL 0], success: [put], failure: [range] }.
fn claim_txn(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut compare = field(3, key);
    compare.extend_from_slice(&[2 << 3, 1]); // target = CREATE
    let put = [field(1, key), field(2, value)].concat();
    [field(1, &compare), field(2, &field(2, &put)), field(3, &field(1, &field(1, key)))].concat()
}

impl Context for Probe {
    fn on_grpc_call_response(&mut self, _token: u32, _status: u32, _size: usize) {
        let answer = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, usize::MAX).ok();
        std::hint::black_box(answer);
        if self.finishing {
            let _ = hostcalls::resume_http_response();
        } else {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.plan.in_body && !end_of_stream {
            return Action::Pause;
        }
        if self.work(0) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.plan.in_body {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if self.work(body_size) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.plan.op == Op::Etcd {
            self.finishing = true;
            let finish = [field(1, self.key.as_bytes()), field(2, &self.plan.data)].concat();
            let txn = field(2, &field(2, &finish)); // TxnRequest { success: [put] }
            return if self.etcd_txn(&txn) { Action::Pause } else { Action::Continue };
        }
        if self.plan.op == Op::Floor {
            let via = hostcalls::get_property(vec!["response", "code_details"]).ok().flatten();
            let headers = hostcalls::get_map_bytes(MapType::HttpResponseHeaders).ok();
            std::hint::black_box((via, headers));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.plan.op == Op::Floor {
            let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size).ok();
            std::hint::black_box(body);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let _ = hostcalls::increment_metric(self.plan.logs, 1);
        if self.plan.op == Op::Floor {
            let response = &self.plan.data[..self.plan.data.len().min(200)];
            let _ = hostcalls::set_shared_data(&self.response, Some(response), None);
            self.bucket_round_trip();
        }
    }
}
