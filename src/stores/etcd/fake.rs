//! etcd itself in memory, and Envoys sharing it: what the store's unit tests run against.

use super::wire::{b64, unb64};
use super::*;
use crate::stores::testkit::{config, MemoryKv};
use serde_json::json;
use std::cell::RefCell;

#[derive(Default)]
pub struct Calls {
    pub sent: RefCell<Vec<(String, Value)>>,
}

impl Caller for &Calls {
    fn post(&self, path: &str, body: &[u8]) -> Result<CallId, StoreError> {
        let mut sent = self.sent.borrow_mut();
        sent.push((path.to_string(), serde_json::from_slice(body).unwrap()));
        Ok(sent.len() as CallId)
    }
}

/// etcd itself, in memory: enough of the txn and lease API to run the store against.
#[derive(Default)]
pub struct FakeEtcd {
    pub keys: HashMap<String, (Vec<u8>, u64)>,
    pub revision: u64,
    pub leases: u64,
}

impl FakeEtcd {
    pub fn answer(&mut self, path: &str, body: &Value) -> Value {
        if path == "/v3/lease/grant" {
            self.leases += 1;
            return json!({"ID": (7_000_000_000_000_000_000u64 + self.leases).to_string(), "TTL": body["TTL"].to_string()});
        }
        if path == "/v3/kv/range" {
            let key = body["key"].as_str().unwrap();
            let mut answer = json!({"header": {"revision": self.revision.to_string()}});
            if let Some(kv) = self.kv(key) {
                answer["kvs"] = json!([kv]);
            }
            return answer;
        }
        let compare = &body["compare"][0];
        let key = compare["key"].as_str().unwrap().to_string();
        let current = self.keys.get(&key);
        let holds = match compare["target"].as_str().unwrap() {
            "CREATE" => current.is_none(),
            "MOD" => {
                current.map(|(_, r)| r.to_string())
                    == compare["mod_revision"].as_str().map(String::from)
            }
            "VALUE" => current.map(|(v, _)| b64(v)) == compare["value"].as_str().map(String::from),
            other => panic!("{other}"),
        };
        let branch = if holds {
            &body["success"]
        } else {
            &body["failure"]
        };
        let mut responses = Vec::new();
        for request in branch.as_array().cloned().unwrap_or_default() {
            if let Some(put) = request.get("request_put") {
                self.revision += 1;
                let value = unb64(put["value"].as_str().unwrap()).unwrap();
                self.keys.insert(key.clone(), (value, self.revision));
                responses.push(json!({"response_put": {}}));
            } else if request.get("request_delete_range").is_some() {
                self.revision += 1;
                self.keys.remove(&key);
                responses.push(json!({"response_delete_range": {}}));
            } else {
                let kvs: Vec<Value> = self.kv(&key).into_iter().collect();
                responses.push(json!({"response_range": {"kvs": kvs}}));
            }
        }
        let mut answer =
            json!({"header": {"revision": self.revision.to_string()}, "responses": responses});
        if holds {
            answer["succeeded"] = json!(true);
        }
        answer
    }

    pub fn kv(&self, key: &str) -> Option<Value> {
        let (value, revision) = self.keys.get(key)?;
        Some(json!({"key": key, "value": b64(value), "mod_revision": revision.to_string()}))
    }
}

/// Envoys sharing one etcd; each Envoy has its own shared data.
pub struct World {
    pub calls: &'static Calls,
    pub etcd: FakeEtcd,
    pub answered: usize,
}

pub type Envoy = Etcd<&'static Calls, &'static MemoryKv>;

impl World {
    pub fn new() -> Self {
        World {
            calls: Box::leak(Box::default()),
            etcd: FakeEtcd::default(),
            answered: 0,
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

    /// The same request on `store` replays `response()`.
    pub fn assert_replays(&mut self, store: &mut Envoy, token: u64, now: Millis) {
        let retry = Resumed::Claim(store.claim(&claim_of(1, token), now));
        assert_eq!(
            self.settle(store, retry, now),
            Resumed::Claim(Answer::Now(Ok(Verdict::Replay(response()))))
        );
    }

    /// etcd answers the last call made; the answer reaches `store` if `delivered`, else the
    /// store learns only that the call failed.
    pub fn answer_last<S: Store>(
        &mut self,
        store: &mut S,
        delivered: bool,
        now: Millis,
    ) -> Option<Resumed> {
        let call = self.calls.sent.borrow().len() as CallId;
        let (path, body) = self.calls.sent.borrow()[call as usize - 1].clone();
        let answer = self.etcd.answer(&path, &body);
        let response = if delivered {
            Ok((200, answer.to_string().into_bytes()))
        } else {
            Err(StoreError::Remote("no answer".into()))
        };
        store.resume(call, response, now)
    }

    /// A claim on `store` whose transaction is sent (after a lease, if it needs one) but not
    /// answered yet.
    pub fn claim_sent(&mut self, store: &mut Envoy, token: u64, now: Millis) {
        let mut resumed = Resumed::Claim(store.claim(&claim_of(1, token), now));
        while self.last_path() != "/v3/kv/txn" {
            resumed = self.answer_last(store, true, now).unwrap();
        }
        assert!(matches!(resumed, Resumed::Claim(Answer::Later(_))));
    }

    pub fn last_path(&self) -> String {
        self.calls
            .sent
            .borrow()
            .last()
            .map(|(path, _)| path.clone())
            .unwrap_or_default()
    }

    /// Answers every call made so far, feeding answers back until the operation settles.
    pub fn settle<S: Store>(
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
            let (path, body) = self.calls.sent.borrow()[call as usize - 1].clone();
            self.answered += 1;
            let answer = self.etcd.answer(&path, &body);
            resumed = store
                .resume(call, Ok((200, answer.to_string().into_bytes())), now)
                .unwrap();
        }
    }
}

/// The local cache of an Envoy.
pub fn cache_of(envoy: &Envoy) -> &Table<&'static MemoryKv> {
    &envoy.cache
}

pub const JSON: &str = r#"{"etcd": {"cluster": "etcd"}}"#;

pub fn claim_of(fingerprint: u8, token: u64) -> Claim {
    Claim {
        tuple: [1; 32],
        fingerprint: [fingerprint; 16],
        token,
        lease: 60_000,
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
    let mut ended = store.tick(now);
    assert_eq!(ended.len(), 0, "finishes go out as calls: {ended:?}");
    let call = world.calls.sent.borrow().len() as CallId;
    let resumed = world.settle(store, Resumed::Finish(Answer::Later(call)), now);
    ended.push(resumed);
    match ended.pop() {
        Some(Resumed::Finish(Answer::Now(Ok(reply)))) => reply,
        other => panic!("{other:?}"),
    }
}
