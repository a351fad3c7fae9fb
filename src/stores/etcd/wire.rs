//! etcd's v3 gRPC API on the wire: the few messages of `etcdserverpb` the store sends and reads,
//! with the fields it uses (protobuf skips the others), and the calls that carry them.

use crate::core::store::{CallFailed, StoreError};
use crate::core::Millis;
use prost::Message;

/// A unary call of etcd's: its gRPC service and method.
pub type Method = (&'static str, &'static str);

pub const GRANT: Method = ("etcdserverpb.Lease", "LeaseGrant");
pub const RANGE: Method = ("etcdserverpb.KV", "Range");
pub const TXN: Method = ("etcdserverpb.KV", "Txn");

/// Whether etcd refused a call before applying it (out of space, too large, denied, an unknown
/// lease) rather than its fate being unknown (unavailable, a timeout, a reset).
pub fn refused(failed: &CallFailed) -> bool {
    // INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
    // FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED, UNAUTHENTICATED.
    matches!(failed.status, 3 | 5 | 6 | 7 | 8 | 9 | 11 | 12 | 16)
}

/// The records' keys live under this, after `key_prefix`: a filter with another record format
/// never meets the records of this one (as the table's format is in its keys too).
pub const RECORD_FORMAT: &str = "r2/";

/// A record's key: `prefix`, the format and the tuple in hex.
pub fn key(prefix: &str, tuple: &[u8; 32]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = Vec::with_capacity(prefix.len() + RECORD_FORMAT.len() + 64);
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(RECORD_FORMAT.as_bytes());
    for byte in tuple {
        key.push(HEX[usize::from(byte >> 4)]);
        key.push(HEX[usize::from(byte & 15)]);
    }
    key
}

/// Envoy's `GrpcService` naming `cluster`, with `authority` as every call's `:authority`: what
/// `dispatch_grpc_call` takes as its upstream.
pub fn upstream(cluster: &str, authority: &str) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.into(),
            authority: authority.into(),
        }),
    }
    .encode_to_vec()
}

/// A lease of `length`, in whole seconds.
pub fn grant(length: Millis) -> Vec<u8> {
    let ttl = i64::try_from(length.div_ceil(1000)).unwrap_or(i64::MAX);
    LeaseGrantRequest { ttl }.encode_to_vec()
}

pub fn range(key: &[u8]) -> Vec<u8> {
    range_request(key, false).encode_to_vec()
}

/// Puts `value` at `key` if the key is absent (or, with `takeover`, if its `mod_revision` is
/// still that one), else reads the key back in the same round trip.
pub fn claim(key: &[u8], value: &[u8], lease: Option<i64>, takeover: Option<u64>) -> Vec<u8> {
    let compare = match takeover {
        None => compare(key, Target::Create, Against::CreateRevision(0)),
        Some(revision) => compare(key, Target::Mod, Against::ModRevision(int64(revision))),
    };
    txn(compare, put(key, value, lease), range_request(key, false))
}

/// Puts `value` at `key` (deletes the key for `None`) if its `mod_revision` is still `revision`,
/// else reads the key back.
pub fn finish(key: &[u8], revision: u64, value: Option<&[u8]>, lease: Option<i64>) -> Vec<u8> {
    let compare = compare(key, Target::Mod, Against::ModRevision(int64(revision)));
    let success = match value {
        Some(value) => put(key, value, lease),
        None => Request::DeleteRange(DeleteRangeRequest { key: key.into() }),
    };
    txn(compare, success, range_request(key, false))
}

/// Deletes `key` if it holds exactly `value`, else reads whether it exists.
pub fn revoke(key: &[u8], value: &[u8]) -> Vec<u8> {
    let compare = compare(key, Target::Value, Against::Value(value.into()));
    let success = Request::DeleteRange(DeleteRangeRequest { key: key.into() });
    txn(compare, success, range_request(key, true))
}

/// Requests in one transaction, all applied at one revision: transactions (as [`finish`]
/// makes them) each nested in the outer one's `success` with its own compare and branches, or
/// reads (as [`range`] makes them). etcd refuses a batch that writes one key twice, so the keys
/// must differ; one of reads alone is served on etcd's read path, without a raft round.
pub fn batch(parts: &[Part]) -> Vec<u8> {
    let success = parts.iter().map(|part| Nested {
        part: Some(part.clone()),
    });
    BatchRequest {
        success: success.collect(),
    }
    .encode_to_vec()
}

/// A batch's answer: each part's, in order (`count` of them).
pub fn batch_answer(message: &[u8], count: usize) -> Result<Vec<Decoded>, StoreError> {
    let answer = decode::<BatchResponse>(message)?;
    if answer.responses.len() != count {
        let got = answer.responses.len();
        return Err(StoreError::Remote(format!(
            "{got} answers to a batch of {count}"
        )));
    }
    let revision = revision_of(answer.header);
    answer
        .responses
        .iter()
        .map(|nested| match &nested.part {
            Some(Part::Range(range)) => range_answer(range).map(Decoded::Found),
            Some(Part::Txn(txn)) => {
                let txn = decode::<TxnResponse>(txn)?;
                // etcd gives a nested answer no header: it was applied at the batch's revision.
                Ok(Decoded::Txn(Txn {
                    revision,
                    ..txn_of(txn)
                }))
            }
            None => Err(StoreError::Remote("an empty answer in a batch".into())),
        })
        .collect()
}

/// An answer, decoded as its call expects: a read's, or a transaction's.
#[derive(Debug)]
pub enum Decoded {
    Found(Option<(Vec<u8>, u64)>),
    Txn(Txn),
}

/// A transaction's answer: whether its compare held, the revision it was applied at, and, if
/// it did not hold, the key its read found (value and `mod_revision`).
#[derive(Debug)]
pub struct Txn {
    pub succeeded: bool,
    pub revision: u64,
    pub found: Option<(Vec<u8>, u64)>,
}

pub fn txn_answer(message: &[u8]) -> Result<Txn, StoreError> {
    decode::<TxnResponse>(message).map(txn_of)
}

fn txn_of(answer: TxnResponse) -> Txn {
    let found = answer
        .responses
        .into_iter()
        .next()
        .and_then(|op| match op.response {
            Some(Response::Range(range)) => first_kv(range),
            _ => None,
        });
    Txn {
        succeeded: answer.succeeded,
        revision: revision_of(answer.header),
        found,
    }
}

/// A read's key, if it exists: its value and `mod_revision`.
pub fn range_answer(message: &[u8]) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
    decode::<RangeResponse>(message).map(first_kv)
}

pub fn lease_answer(message: &[u8]) -> Result<i64, StoreError> {
    let answer = decode::<LeaseGrantResponse>(message)?;
    match answer.id {
        0 => Err(StoreError::Remote(format!(
            "lease grant refused: {}",
            answer.error
        ))),
        id => Ok(id),
    }
}

fn decode<M: Message + Default>(message: &[u8]) -> Result<M, StoreError> {
    M::decode(message).map_err(|error| StoreError::Remote(format!("etcd answered: {error}")))
}

fn first_kv(range: RangeResponse) -> Option<(Vec<u8>, u64)> {
    let kv = range.kvs.into_iter().next()?;
    Some((kv.value, u64::try_from(kv.mod_revision).unwrap_or(0)))
}

fn revision_of(header: Option<ResponseHeader>) -> u64 {
    header.map_or(0, |header| u64::try_from(header.revision).unwrap_or(0))
}

fn int64(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn compare(key: &[u8], target: Target, against: Against) -> Compare {
    Compare {
        result: 0, // EQUAL
        target: target as i32,
        key: key.into(),
        against: Some(against),
    }
}

fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Request {
    Request::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        lease: lease.unwrap_or(0),
    })
}

fn range_request(key: &[u8], keys_only: bool) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        keys_only,
    }
}

fn txn(compare: Compare, success: Request, failure: RangeRequest) -> Vec<u8> {
    TxnRequest {
        compare: vec![compare],
        success: vec![RequestOp {
            request: Some(success),
        }],
        failure: vec![RequestOp {
            request: Some(Request::Range(failure)),
        }],
    }
    .encode_to_vec()
}

// The messages, as `api/etcdserverpb/rpc.proto` and `api/mvccpb/kv.proto` number their fields.

#[derive(Clone, Copy)]
enum Target {
    Create = 1,
    Mod = 2,
    Value = 3,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Compare {
    #[prost(int32, tag = "1")]
    pub result: i32,
    #[prost(int32, tag = "2")]
    pub target: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    #[prost(oneof = "Against", tags = "5, 6, 7")]
    pub against: Option<Against>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Against {
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    #[prost(bytes = "vec", tag = "7")]
    Value(Vec<u8>),
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct RequestOp {
    #[prost(oneof = "Request", tags = "1, 2, 3")]
    pub request: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Request {
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    #[prost(message, tag = "2")]
    Put(PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeRequest),
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bool, tag = "8")]
    pub keys_only: bool,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct ResponseHeader {
    #[prost(int64, tag = "3")]
    pub revision: i64,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct TxnResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct ResponseOp {
    #[prost(oneof = "Response", tags = "1, 2, 3")]
    pub response: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum Response {
    #[prost(message, tag = "1")]
    Range(RangeResponse),
    #[prost(message, tag = "2")]
    Put(Header),
    #[prost(message, tag = "3")]
    DeleteRange(Header),
}

/// A put's or a delete's answer: the store reads nothing of it beyond the transaction's own.
#[derive(Clone, PartialEq, Message)]
pub(super) struct Header {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LeaseGrantResponse {
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

/// A `TxnRequest` with no compare, whose `success` holds `RequestOp`s each already encoded, as
/// a nested message is on the wire.
#[derive(Clone, PartialEq, Message)]
pub(super) struct BatchRequest {
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<Nested>,
}

/// A `RequestOp` or a `ResponseOp` of a batch, its content still encoded.
#[derive(Clone, PartialEq, Message)]
pub(super) struct Nested {
    #[prost(oneof = "Part", tags = "1, 4")]
    pub part: Option<Part>,
}

/// A batch's part: its `request_range` or `request_txn` (answered by `response_range` or
/// `response_txn`, numbered alike).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Part {
    #[prost(bytes = "vec", tag = "1")]
    Range(Vec<u8>),
    #[prost(bytes = "vec", tag = "4")]
    Txn(Vec<u8>),
}

/// A batch's `TxnResponse`: its header and the nested transactions' answers.
#[derive(Clone, PartialEq, Message)]
pub(super) struct BatchResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<Nested>,
}

// envoy.config.core.v3.GrpcService, with only its `envoy_grpc`.
#[derive(Clone, PartialEq, Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}
