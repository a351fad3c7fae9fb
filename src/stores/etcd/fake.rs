//! etcd itself in memory, and Envoys sharing it: what the store's unit tests run against.

use super::wire::{
    Against, BatchRequest, BatchResponse, DeleteRangeRequest, Header, KeyValue, LeaseGrantRequest,
    LeaseGrantResponse, Nested, Part, RangeRequest, RangeResponse, Request, RequestOp, Response,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse, GRANT, RANGE,
};
use super::*;
use crate::core::lifecycle::Verdict;
use crate::core::store::{CallFailed, Replay};
use crate::stores::testkit::{config, MemoryKv};
use prost::Message;
use std::cell::RefCell;

/// Every call the Envoys made, in order; the `i`th has id `4 i + 1`, as Envoy numbers gRPC calls.
#[derive(Default)]
pub struct Calls {
    pub sent: RefCell<Vec<(Method, Vec<u8>)>>,
    /// The host's clock, in microseconds.
    pub micros: std::cell::Cell<u64>,
}

impl Calls {
    pub fn id(index: usize) -> CallId {
        index as CallId * 4 + 1
    }

    pub fn get(&self, call: CallId) -> (Method, Vec<u8>) {
        self.sent.borrow()[(call / 4) as usize].clone()
    }

    pub fn last(&self) -> CallId {
        Calls::id(self.sent.borrow().len() - 1)
    }
}

impl Caller for &Calls {
    fn call(&self, method: Method, message: &[u8]) -> Result<CallId, StoreError> {
        let mut sent = self.sent.borrow_mut();
        sent.push((method, message.to_vec()));
        Ok(Calls::id(sent.len() - 1))
    }

    fn micros(&self) -> u64 {
        self.micros.get()
    }
}

/// etcd itself, in memory: enough of the txn and lease API to run the store against.
#[derive(Default)]
pub struct FakeEtcd {
    pub keys: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    pub revision: u64,
    pub leases: u64,
}

impl FakeEtcd {
    /// Applies a call; its answer's message.
    pub fn answer(&mut self, method: Method, message: &[u8]) -> Vec<u8> {
        if method == GRANT {
            LeaseGrantRequest::decode(message).unwrap();
            self.leases += 1;
            let id = 7_000_000_000_000_000_000 + self.leases as i64;
            return LeaseGrantResponse {
                id,
                error: String::new(),
            }
            .encode_to_vec();
        }
        if method == RANGE {
            return self
                .range(&RangeRequest::decode(message).unwrap())
                .encode_to_vec();
        }
        let txn = TxnRequest::decode(message).unwrap();
        if txn.compare.is_empty() {
            return self.batch(message);
        }
        let compare = &txn.compare[0];
        let current = self.keys.get(&compare.key);
        let holds = match &compare.against {
            Some(Against::CreateRevision(0)) => current.is_none(),
            Some(Against::ModRevision(revision)) => {
                current.map(|(_, r)| *r as i64) == Some(*revision)
            }
            Some(Against::Value(value)) => current.map(|(v, _)| v) == Some(value),
            other => panic!("{other:?}"),
        };
        let branch = if holds { &txn.success } else { &txn.failure };
        let mut responses = Vec::new();
        for RequestOp { request } in branch {
            let response = match request.as_ref().unwrap() {
                Request::Put(put) => {
                    self.revision += 1;
                    let value = (put.value.clone(), self.revision);
                    self.keys.insert(put.key.clone(), value);
                    Response::Put(Header::default())
                }
                Request::DeleteRange(DeleteRangeRequest { key }) => {
                    self.revision += 1;
                    self.keys.remove(key);
                    Response::DeleteRange(Header::default())
                }
                Request::Range(range) => Response::Range(self.range(range)),
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        TxnResponse {
            header: Some(self.header()),
            succeeded: holds,
            responses,
        }
        .encode_to_vec()
    }

    /// Nested transactions and reads, applied one after another at one revision (as etcd does,
    /// whose nested answers carry no header); like etcd, it refuses one that writes a key twice.
    fn batch(&mut self, message: &[u8]) -> Vec<u8> {
        let batch = BatchRequest::decode(message).unwrap();
        let mut keys: Vec<Vec<u8>> = batch.success.iter().map(FakeEtcd::part_key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys.len(),
            batch.success.len(),
            "etcd refuses a batch writing a key twice"
        );
        let before = self.revision;
        let mut responses = Vec::new();
        for nested in &batch.success {
            let part = match nested.part.as_ref().unwrap() {
                Part::Range(range) => Part::Range(self.answer(wire::RANGE, range)),
                Part::Txn(txn) => {
                    let answer = TxnResponse::decode(&*self.answer(wire::TXN, txn)).unwrap();
                    let answer = TxnResponse {
                        header: None,
                        ..answer
                    };
                    Part::Txn(answer.encode_to_vec())
                }
            };
            responses.push(Nested { part: Some(part) });
        }
        // One revision for the whole transaction: every key it wrote has it.
        let written = self.revision > before;
        if written {
            self.revision = before + 1;
            for (_, revision) in self.keys.values_mut() {
                if *revision > before {
                    *revision = before + 1;
                }
            }
        }
        BatchResponse {
            header: Some(self.header()),
            responses,
        }
        .encode_to_vec()
    }

    /// The keys a transaction (or each transaction of a batch) is about.
    pub fn keys_of(method: Method, message: &[u8]) -> Vec<Vec<u8>> {
        match FakeEtcd::key_of(method, message) {
            Some(key) => vec![key],
            None if method == wire::TXN => BatchRequest::decode(message)
                .map(|batch| batch.success.iter().map(FakeEtcd::part_key).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn part_key(nested: &Nested) -> Vec<u8> {
        match nested.part.as_ref().unwrap() {
            Part::Range(range) => RangeRequest::decode(&**range).unwrap().key,
            Part::Txn(txn) => FakeEtcd::key_of(wire::TXN, txn).unwrap(),
        }
    }

    /// Whether a call makes etcd write (a raft round): all but a range, and a transaction
    /// holding only ranges.
    pub fn writes(method: Method, message: &[u8]) -> bool {
        if method != wire::TXN {
            return method != RANGE;
        }
        let txn = TxnRequest::decode(message).unwrap();
        if !txn.compare.is_empty() {
            return true;
        }
        let batch = BatchRequest::decode(message).unwrap();
        let read = |nested: &Nested| matches!(nested.part, Some(Part::Range(_)));
        !batch.success.iter().all(read)
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            revision: self.revision as i64,
        }
    }

    fn range(&self, range: &RangeRequest) -> RangeResponse {
        let kvs = self.keys.get(&range.key).map(|(value, revision)| KeyValue {
            key: range.key.clone(),
            mod_revision: *revision as i64,
            value: if range.keys_only {
                Vec::new()
            } else {
                value.clone()
            },
        });
        RangeResponse {
            header: Some(self.header()),
            kvs: kvs.into_iter().collect(),
        }
    }

    /// The key a call's request is about, if it is a transaction.
    pub fn key_of(method: Method, message: &[u8]) -> Option<Vec<u8>> {
        (method == wire::TXN)
            .then(|| TxnRequest::decode(message).ok())
            .flatten()
            .and_then(|txn| txn.compare.first().map(|c| c.key.clone()))
    }
}

/// Envoys sharing one etcd; each Envoy has its own shared data.
pub struct World {
    pub calls: &'static Calls,
    pub etcd: FakeEtcd,
    pub answered: usize,
    /// What went on inside a store, by the id it waited under, until asked for.
    moved: HashMap<CallId, Resumed>,
}

pub type Envoy = Etcd<&'static Calls, &'static MemoryKv>;

impl World {
    pub fn new() -> Self {
        World {
            calls: Box::leak(Box::default()),
            etcd: FakeEtcd::default(),
            answered: 0,
            moved: HashMap::new(),
        }
    }

    pub fn envoy(&self, json: &str) -> Envoy {
        self.envoy_with_kv(json).0
    }

    /// An Envoy, and its shared data.
    pub fn envoy_with_kv(&self, json: &str) -> (Envoy, &'static MemoryKv) {
        let kv: &'static MemoryKv = Box::leak(Box::default());
        let config = config(json);
        let mut cache = Table::new(kv, &config);
        cache.boot().unwrap();
        let settings = config.etcd.clone().unwrap();
        (Etcd::new(self.calls, kv, cache, &config, settings), kv)
    }

    /// A claim (token `token`, fingerprint 1) made and won on `store`.
    pub fn claim_on(&mut self, store: &mut Envoy, token: u64, now: Millis) -> Ticket {
        let first = Resumed::Claim(store.claim(&claim_of(1, token), now));
        claimed(self.settle(store, first, now))
    }

    /// The same request on `store` replays `response()`, stored at `stored`.
    pub fn assert_replays(&mut self, store: &mut Envoy, token: u64, now: Millis, stored: Millis) {
        let retry = Resumed::Claim(store.claim(&claim_of(1, token), now));
        assert_eq!(
            self.settle(store, retry, now),
            Resumed::Claim(Answer::Now(Ok(replay_stored_at(stored))))
        );
    }

    /// etcd answers the last call made; the answer reaches `store` if `delivered`, else the
    /// store learns only that the call failed.
    pub fn answer_last<S: Store + Remote>(
        &mut self,
        store: &mut S,
        delivered: bool,
        now: Millis,
    ) -> Option<Resumed> {
        let call = self.calls.last();
        let (method, message) = self.calls.get(call);
        let answer = self.etcd.answer(method, &message);
        let response = if delivered { Ok(answer) } else { Err(lost()) };
        store.resume(call, response, now)
    }

    /// A tick of `store`, with the lease grants it sends answered: what waited for them goes
    /// on. What the tick ended, and what went on.
    pub fn tick_granting<S: Store + Remote>(
        &mut self,
        store: &mut S,
        now: Millis,
    ) -> (Vec<Resumed>, Vec<(CallId, Resumed)>) {
        let before = self.calls.sent.borrow().len();
        let ended = store.tick(now);
        let after = self.calls.sent.borrow().len();
        for index in before..after {
            let call = Calls::id(index);
            let (method, message) = self.calls.get(call);
            if method == GRANT {
                let answer = self.etcd.answer(method, &message);
                store.resume(call, Ok(answer), now);
            }
        }
        (ended, store.take_moved_on())
    }

    /// A claim on `store` whose transaction is sent (after a lease, if it needs one) but not
    /// answered yet.
    pub fn claim_sent(&mut self, store: &mut Envoy, token: u64, now: Millis) {
        let mut resumed = Resumed::Claim(store.claim(&claim_of(1, token), now));
        if let Resumed::Claim(Answer::Later(call)) = resumed {
            if parked(call) {
                resumed = self.went_on(store, call, now);
            }
        }
        assert_eq!(self.last_method(), wire::TXN);
        assert!(matches!(resumed, Resumed::Claim(Answer::Later(_))));
    }

    /// The operation waiting under `call` inside `store`, once it went on: after a tick has
    /// granted its lease, or sent it in a batch of claims that etcd answers.
    fn went_on<S: Store + Remote>(&mut self, store: &mut S, call: CallId, now: Millis) -> Resumed {
        if let Some(resumed) = self.moved.remove(&call) {
            return resumed;
        }
        let before = self.calls.sent.borrow().len();
        let (_, moved) = self.tick_granting(store, now);
        self.moved.extend(moved);
        let after = self.calls.sent.borrow().len();
        for batch in (before..after).map(Calls::id) {
            let (method, message) = self.calls.get(batch);
            if method == wire::TXN && FakeEtcd::key_of(method, &message).is_none() {
                let answer = self.etcd.answer(method, &message);
                store.resume(batch, Ok(answer), now);
                self.moved.extend(store.take_moved_on());
            }
        }
        self.moved
            .remove(&call)
            .expect("the waiting operation went on")
    }

    pub fn last_method(&self) -> Method {
        self.calls.get(self.calls.last()).0
    }

    /// Answers every call made so far, feeding answers back until the operation settles.
    pub fn settle<S: Store + Remote>(
        &mut self,
        store: &mut S,
        mut resumed: Resumed,
        now: Millis,
    ) -> Resumed {
        loop {
            let call = match &resumed {
                Resumed::Claim(Answer::Later(call)) | Resumed::Finish(Answer::Later(call)) => *call,
                _ => return resumed,
            };
            if parked(call) {
                resumed = self.went_on(store, call, now);
                continue;
            }
            let (method, message) = self.calls.get(call);
            self.answered += 1;
            let answer = self.etcd.answer(method, &message);
            resumed = store.resume(call, Ok(answer), now).unwrap();
        }
    }
}

/// Whether an operation's call id is one the store gave it while it waits for a lease.
pub fn parked(call: CallId) -> bool {
    call % 4 == 3
}

/// A call that ended without an answer.
pub fn lost() -> CallFailed {
    CallFailed {
        status: 14,
        message: "no healthy upstream".into(),
    }
}

/// The local cache of an Envoy.
pub fn cache_of(envoy: &Envoy) -> &Table<&'static MemoryKv> {
    &envoy.cache
}

pub const JSON: &str = r#"{"etcd": {"cluster": "etcd"}}"#;

/// The replay of `response()`, stored at `stored` under `claim_of`'s day-long ttl.
pub fn replay_stored_at(stored: Millis) -> ClaimReply {
    Verdict::Replay(Replay {
        response: response(),
        expires: stored + 86_400_000,
    })
}

pub fn claim_of(fingerprint: u8, token: u64) -> Claim {
    Claim {
        tuple: [1; 32],
        fingerprint: [fingerprint; 16],
        token,
        lease: 60_000,
        ttl: 86_400_000,
        org: 1,
    }
}

pub fn claimed(resumed: Resumed) -> Ticket {
    match resumed {
        Resumed::Claim(Answer::Now(Ok(Verdict::Claimed(ticket)))) => ticket,
        other => panic!("expected a claim, got {other:?}"),
    }
}

pub fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("set-cookie".into(), "a=1".into())],
        body: b"created".to_vec(),
    }
}

pub fn finish(
    world: &mut World,
    store: &mut Envoy,
    ticket: Ticket,
    ending: Ending<StoredResponse>,
    now: Millis,
) -> Finished {
    assert_eq!(store.finish(ticket, ending, now), Answer::Queued);
    let before = world.calls.sent.borrow().len();
    let (ended, _) = world.tick_granting(store, now);
    assert_eq!(ended.len(), 0, "finishes go out as calls: {ended:?}");
    let after = world.calls.sent.borrow().len();
    let txns: Vec<CallId> = (before..after)
        .map(Calls::id)
        .filter(|call| world.calls.get(*call).0 == wire::TXN)
        .collect();
    assert_eq!(txns.len(), 1, "one finish");
    match world.settle(store, Resumed::Finish(Answer::Later(txns[0])), now) {
        Resumed::Finish(Answer::Now(Ok(reply))) => reply,
        other => panic!("{other:?}"),
    }
}
