//! The cluster-wide store: one etcd key per record, reached through Envoy on etcd's v3 JSON
//! gateway, so that every Envoy of a fleet sees the same claims.
//!
//! - Claim: one transaction, "create the key if absent, else read it back"; the loser decides on
//!   the record it read with the same [`lifecycle`] as the embedded table. An expired record is taken
//!   over by a compare-and-swap on its `mod_revision`.
//! - Lost answers: a claim whose transaction got no answer (a timeout, a reset) may still have
//!   been applied, and would then block its key for a lease with work that never ran. Such a
//!   claim is revoked: deleted if the key still holds exactly what it wrote, tried again while the
//!   key is absent (the transaction may land late), with backoff, until the claim would expire.
//! - Waiting: a duplicate looks in the local cache on every tick (the original may have finished
//!   on this Envoy) and reads the key from etcd less often; a read is served without the raft
//!   round a transaction costs, and a claim is attempted only once the record is gone or expired.
//! - Finish: a compare-and-swap on the claim's revision (store, hold) or a guarded delete
//!   (release), so an owner whose lease ran out never writes over a newer claim. A finish etcd
//!   did not take is sent again every second for up to `lease` after the response: the client
//!   has its answer, and without the record a retry after the lease would run the work again.
//! - Expiry: leases shared by time bucket, one for claims in flight and one for records, so a
//!   crashed Envoy's claim frees itself and etcd drops records after their TTL.
//! - Shares: what each organisation's records written through this Envoy hold in etcd is counted
//!   by lease window; past `max_share_bytes` its new records live `lease` instead of `ttl`, as if
//!   evicted then, so a flooding organisation never holds more of etcd than its share.
//! - Complete records never change until they expire, so replays are served from a copy in this
//!   Envoy's shared data after the first fetch.
//!
//! Every operation goes out as calls; their answers come back through [`Store::resume`].

use crate::core::config::{Config, EtcdConfig};
use crate::core::lifecycle::{self, Claim, Room, Verdict};
use crate::core::record::{Bucket, Entry, State, StoredResponse, Written};
use crate::core::store::{
    Answer, CallId, CallResponse, ClaimReply, FinishReply, Outcome, Resumed, Store, StoreError,
    Ticket,
};
use crate::core::Millis;
use crate::stores::table::{self, Table};
use crate::stores::{Caller, Kv};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Attempts at one claim when other Envoys keep changing the record under it.
const MAX_ROUNDS: u8 = 8;
/// How long a failed finish, or a revocation, waits before it is sent (again).
const RETRY_MILLIS: Millis = 1_000;
/// Bytes of finishes kept to send again, per worker; past it a failed finish is dropped (its
/// claim then ends with its lease).
const MAX_RETRY_BYTES: usize = 8 << 20;
/// Revocations of claims whose answer was lost, per worker; past it such a claim, if it
/// landed, is left to expire with its lease. Each makes a handful of calls at most.
const MAX_REVOKES: usize = 64;
/// Organisations' tags map onto this many counters of written bytes (a collision can only
/// over-count).
const SHARE_SLOTS: u16 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseKind {
    /// Claims in flight and held claims: about `lease` long.
    Claim,
    /// Complete records: about `ttl` long.
    Record,
}

impl LeaseKind {
    fn name(self) -> &'static str {
        match self {
            LeaseKind::Claim => "claim",
            LeaseKind::Record => "record",
        }
    }
}

/// What an operation is waiting for.
#[derive(Debug)]
enum Sent {
    Grant(LeaseKind),
    /// A waiting request's read of the record.
    Look,
    Create,
    Takeover,
    Finish,
    Revoke,
}

#[derive(Debug)]
enum Op {
    Claim {
        claim: Claim,
        rounds: u8,
        /// The expired record to take over (its `mod_revision`), if any.
        takeover: Option<u64>,
    },
    Finish {
        ticket: Ticket,
        /// The record's new value, `None` to delete it.
        value: Option<Vec<u8>>,
        lease: LeaseKind,
        reply: FinishReply,
        /// A stored response, kept to cache locally once etcd has it.
        response: Option<(StoredResponse, Millis)>,
        /// A lease after the response: a retry after that has run the work again anyway.
        give_up: Millis,
        /// Failed before: its error was reported once already.
        retried: bool,
    },
    /// Delete the key if it holds `value`, a claim whose transaction got no answer.
    Revoke {
        claim: Claim,
        value: Vec<u8>,
        /// When the claim would expire anyway.
        give_up: Millis,
        /// How long to wait before the next attempt, doubled each time.
        backoff: Millis,
    },
}

impl Op {
    fn first(claim: &Claim) -> Op {
        Op::Claim {
            claim: *claim,
            rounds: 0,
            takeover: None,
        }
    }

    /// What keeping it to send again costs: its value and the response kept to cache.
    fn retry_bytes(&self) -> usize {
        match self {
            Op::Claim { .. } => 0,
            Op::Finish { value, .. } => value.as_ref().map_or(0, Vec::len) * 2,
            Op::Revoke { value, .. } => value.len(),
        }
    }
}

/// What a claim writes: an entry in flight until `now` + its lease.
fn claim_value(claim: &Claim, now: Millis) -> Vec<u8> {
    let entry = Entry {
        state: State::InFlight,
        tuple: claim.tuple,
        fingerprint: claim.fingerprint,
        token: claim.token,
        deadline: now + claim.lease,
        response_len: 0,
        org: claim.org,
    };
    entry.encode_remote(None)
}

struct Pending {
    op: Op,
    sent: Sent,
    since: Millis,
}

pub struct Etcd<C: Caller, K: Kv> {
    caller: C,
    /// This Envoy's shared data, for every worker: lease ids by kind and time bucket, and what
    /// each organisation wrote by lease window.
    shared: K,
    cache: Table<K>,
    settings: EtcdConfig,
    shared_prefix: String,
    ttl: Millis,
    claim_lease: Millis,
    compress: bool,
    pending: HashMap<CallId, Pending>,
    queued: Vec<Op>,
    /// Failed finishes, with when to send them again.
    retrying: Vec<(Millis, Op)>,
    retry_bytes: usize,
    revokes: usize,
    /// Ages the records stored since [`Store::take_evictions`] was last asked will be evicted
    /// at: those of organisations past their share.
    evictions: Vec<Millis>,
}

impl<C: Caller, K: Kv> Etcd<C, K> {
    pub fn new(
        caller: C,
        shared: K,
        cache: Table<K>,
        config: &Config,
        settings: EtcdConfig,
    ) -> Self {
        Etcd {
            caller,
            shared,
            cache,
            shared_prefix: format!("{}etcd/", config.key_prefix),
            settings,
            ttl: config.ttl,
            claim_lease: config.claim_lease(),
            compress: config.compress_responses,
            pending: HashMap::new(),
            queued: Vec::new(),
            retrying: Vec::new(),
            retry_bytes: 0,
            revokes: 0,
            evictions: Vec::new(),
        }
    }

    /// Keeps `op` to send again at `at`, unless that is past `give_up` or over the bytes kept
    /// for it; whether it was kept.
    fn keep_for_later(&mut self, op: Op, at: Millis, give_up: Millis) -> bool {
        let bytes = op.retry_bytes();
        if at >= give_up || self.retry_bytes + bytes > MAX_RETRY_BYTES {
            return false;
        }
        self.retry_bytes += bytes;
        self.retrying.push((at, op));
        true
    }

    /// A call failed. If it was a claim's transaction and `maybe_applied`, etcd may still apply
    /// it: it is revoked (see the module). Then the operation fails as [`Etcd::fail`] says.
    fn call_failed(
        &mut self,
        pending: Pending,
        error: StoreError,
        maybe_applied: bool,
        now: Millis,
    ) -> Resumed {
        if let (true, Sent::Create | Sent::Takeover, Op::Claim { claim, .. }) =
            (maybe_applied, &pending.sent, &pending.op)
        {
            let give_up = pending.since + claim.lease;
            let revoke = Op::Revoke {
                claim: *claim,
                value: claim_value(claim, pending.since),
                give_up,
                backoff: RETRY_MILLIS,
            };
            if self.revokes >= MAX_REVOKES {
                log::warn!(
                    "a claim whose answer was lost is left to its lease: too many revocations"
                );
            } else if self.keep_for_later(revoke, now + RETRY_MILLIS, give_up) {
                self.revokes += 1;
            }
        }
        self.fail(pending.op, error, now)
    }

    /// A revocation goes on later, with twice the wait, unless the claim is expiring anyway.
    fn revoke_later(&mut self, mut op: Op, now: Millis) -> Resumed {
        if let Op::Revoke {
            give_up, backoff, ..
        } = &mut op
        {
            let (at, give_up) = (now + *backoff, *give_up);
            *backoff *= 2;
            if !self.keep_for_later(op, at, give_up) {
                self.revokes = self.revokes.saturating_sub(1);
            }
        }
        Resumed::Nothing
    }

    /// An operation failed: its error. A finish is kept to send again (see the module); the
    /// compare-and-swap on the claim's revision makes a late one harmless. A finish reports its
    /// first failure and, if it comes to that, giving up; the failures between are quiet.
    fn fail(&mut self, mut op: Op, error: StoreError, now: Millis) -> Resumed {
        match &mut op {
            Op::Claim { .. } => Resumed::Claim(Answer::Now(Err(error))),
            Op::Revoke { .. } => {
                log::debug!("revoking a claim whose answer was lost failed: {error}");
                self.revoke_later(op, now)
            }
            Op::Finish {
                give_up, retried, ..
            } => {
                let first = !std::mem::replace(retried, true);
                let give_up = *give_up;
                if self.keep_for_later(op, now + RETRY_MILLIS, give_up) && !first {
                    log::debug!("a finish failed again, sending it again in a second: {error}");
                    return Resumed::Finish(Answer::Queued);
                }
                Resumed::Finish(Answer::Now(Err(error)))
            }
        }
    }

    /// The reply a complete record this Envoy holds a copy of gives, if it holds one.
    fn cached(&self, claim: &Claim, now: Millis) -> Option<ClaimReply> {
        self.cache.peek(claim, now).unwrap_or_else(|error| {
            log::warn!("reading the local cache failed: {error}");
            None
        })
    }

    fn key(&self, tuple: &[u8; 32]) -> String {
        let mut key = self.settings.key_prefix.clone();
        for byte in tuple {
            key.push_str(&format!("{byte:02x}"));
        }
        key
    }

    /// Width of a lease's time bucket, and the lease's length: every record put during a bucket
    /// lives at least `span` under that bucket's lease.
    fn lease_shape(&self, kind: LeaseKind) -> (Millis, Millis) {
        let span = match kind {
            LeaseKind::Claim => self.claim_lease,
            LeaseKind::Record => self.ttl,
        };
        let width = (span / 8).max(1_000);
        (width, span + width)
    }

    fn cached_lease(&self, kind: LeaseKind, now: Millis) -> Option<i64> {
        let (width, _) = self.lease_shape(kind);
        let key = format!("{}lease/{}", self.shared_prefix, kind.name());
        let (bytes, _) = self.shared.get(&key).ok()??;
        let (bucket, id) = bytes.split_at_checked(8)?;
        let bucket = u64::from_le_bytes(bucket.try_into().ok()?);
        let id = i64::from_le_bytes(id.try_into().ok()?);
        (bucket == now / width).then_some(id)
    }

    fn remember_lease(&self, kind: LeaseKind, id: i64, now: Millis) {
        let (width, _) = self.lease_shape(kind);
        let key = format!("{}lease/{}", self.shared_prefix, kind.name());
        let mut value = (now / width).to_le_bytes().to_vec();
        value.extend_from_slice(&id.to_le_bytes());
        if let Err(error) = self.shared.set(&key, &value, None) {
            log::warn!("caching an etcd lease failed: {error}");
        }
    }

    /// Whether a record of `bytes` for `org` may live its `ttl`: so if what the organisation
    /// wrote through this Envoy that may still be in etcd leaves room for it, and it is then
    /// counted. A failing shared data lets it live its `ttl`: the share gives way to the guarantee.
    fn within_share(&self, org: u16, bytes: u64, now: Millis) -> bool {
        let (width, length) = self.lease_shape(LeaseKind::Record);
        let window = now / width;
        // A record's lease is its window's, or the next one's when its finish went out late; a
        // lease ends `length` after its grant, within its window.
        let oldest = (now.saturating_sub(length) / width).saturating_sub(2);
        let limit = self.settings.max_share_bytes as u64;
        let key = format!("{}share/{}", self.shared_prefix, org % SHARE_SLOTS);
        let counted = table::count(
            &self.shared,
            &key,
            Written::decode,
            Written::encode,
            |written| {
                let mut written = written.unwrap_or_default();
                (written.since(oldest) + bytes <= limit).then(|| {
                    written.add(window, bytes);
                    written
                })
            },
        );
        counted.unwrap_or_else(|error| {
            log::warn!("counting an organisation's share of etcd failed: {error}");
            true
        })
    }

    fn send(&mut self, path: &str, body: Value, op: Op, sent: Sent, now: Millis) -> Resumed {
        match self.caller.post(path, body.to_string().as_bytes()) {
            Ok(call) => {
                let resumed = match op {
                    Op::Claim { .. } => Resumed::Claim(Answer::Later(call)),
                    Op::Finish { .. } => Resumed::Finish(Answer::Later(call)),
                    Op::Revoke { .. } => Resumed::Nothing,
                };
                self.pending.insert(
                    call,
                    Pending {
                        op,
                        sent,
                        since: now,
                    },
                );
                resumed
            }
            Err(error) => self.fail(op, error, now),
        }
    }

    /// Carries an operation forward: a lease first if it needs one, then its transaction.
    fn advance(&mut self, op: Op, now: Millis) -> Resumed {
        let kind = match &op {
            Op::Claim { .. } => Some(LeaseKind::Claim),
            Op::Finish {
                value: Some(_),
                lease,
                ..
            } => Some(*lease),
            Op::Finish { value: None, .. } | Op::Revoke { .. } => None,
        };
        let lease = match kind {
            Some(kind) => match self.cached_lease(kind, now) {
                Some(id) => Some(id),
                None => {
                    let (_, length) = self.lease_shape(kind);
                    let body = json!({ "TTL": length.div_ceil(1000) });
                    return self.send("/v3/lease/grant", body, op, Sent::Grant(kind), now);
                }
            },
            None => None,
        };
        match &op {
            Op::Claim {
                claim, takeover, ..
            } => {
                let key = b64(self.key(&claim.tuple).as_bytes());
                let put = put(&key, &claim_value(claim, now), lease);
                let (compare, sent) = match takeover {
                    None => (
                        json!({"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}),
                        Sent::Create,
                    ),
                    Some(revision) => (
                        json!({"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision.to_string()}),
                        Sent::Takeover,
                    ),
                };
                let body = json!({
                    "compare": [compare],
                    "success": [put],
                    "failure": [{"request_range": {"key": key}}],
                });
                self.send("/v3/kv/txn", body, op, sent, now)
            }
            Op::Finish { ticket, value, .. } => {
                let key = b64(self.key(&ticket.claim.tuple).as_bytes());
                let compare = json!({"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": ticket.slot.to_string()});
                let success = match value {
                    Some(value) => put(&key, value, lease),
                    None => json!({"request_delete_range": {"key": key}}),
                };
                let body = json!({"compare": [compare], "success": [success]});
                self.send("/v3/kv/txn", body, op, Sent::Finish, now)
            }
            Op::Revoke { claim, value, .. } => {
                let key = b64(self.key(&claim.tuple).as_bytes());
                let body = json!({
                    "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": b64(value)}],
                    "success": [{"request_delete_range": {"key": key}}],
                    "failure": [{"request_range": {"key": key, "keys_only": true}}],
                });
                self.send("/v3/kv/txn", body, op, Sent::Revoke, now)
            }
        }
    }

    /// A claim's transaction failed: decide on the record etcd sent back.
    fn decide_on(&mut self, claim: Claim, rounds: u8, existing: Value, now: Millis) -> Resumed {
        let Some((value, revision)) = first_kv(&existing) else {
            // The record went away between compare and read: claim again.
            return self.retry_claim(claim, rounds, None, now);
        };
        let (entry, response) = match Entry::decode_remote(&value) {
            Ok(decoded) => decoded,
            Err(error) => {
                let error = StoreError::Unreadable(format!("etcd record: {error:?}"));
                return Resumed::Claim(Answer::Now(Err(error)));
            }
        };
        let mut bucket = Bucket::empty();
        bucket.entries[0] = entry;
        let room = Room {
            usable: 1,
            evict: false,
        };
        let reply = match lifecycle::claim(&mut bucket, &claim, room, now) {
            Verdict::Claimed { .. } => return self.retry_claim(claim, rounds, Some(revision), now),
            Verdict::Replay { token, .. } => {
                match StoredResponse::decode(response, &claim.tuple, token) {
                    Ok(response) => {
                        if let Err(error) =
                            self.cache.remember(&claim, &response, entry.deadline, now)
                        {
                            log::warn!("caching a record locally failed: {error}");
                        }
                        ClaimReply::Replay(response)
                    }
                    Err(error) => {
                        let error = StoreError::Unreadable(format!("etcd response: {error:?}"));
                        return Resumed::Claim(Answer::Now(Err(error)));
                    }
                }
            }
            Verdict::Conflict => ClaimReply::Conflict,
            Verdict::InFlight { remaining } => ClaimReply::InFlight { remaining },
            Verdict::Held { remaining } => ClaimReply::Held { remaining },
            Verdict::NotStored => ClaimReply::NotStored,
            Verdict::Full => ClaimReply::Full,
        };
        Resumed::Claim(Answer::Now(Ok(reply)))
    }

    fn retry_claim(
        &mut self,
        claim: Claim,
        rounds: u8,
        takeover: Option<u64>,
        now: Millis,
    ) -> Resumed {
        if rounds >= MAX_ROUNDS {
            return Resumed::Claim(Answer::Now(Err(StoreError::Contended)));
        }
        let op = Op::Claim {
            claim,
            rounds: rounds + 1,
            takeover,
        };
        self.advance(op, now)
    }

    fn on_answer(&mut self, pending: Pending, answer: Value, now: Millis) -> Resumed {
        match (pending.sent, pending.op) {
            (Sent::Grant(kind), op) => match answer.get("ID").and_then(int64) {
                Some(id) => {
                    self.remember_lease(kind, id as i64, now);
                    self.advance(op, now)
                }
                None => self.fail(
                    op,
                    StoreError::Remote(format!("lease grant answered {answer}")),
                    now,
                ),
            },
            (Sent::Look, Op::Claim { claim, rounds, .. }) => {
                self.decide_on(claim, rounds, answer, now)
            }
            (Sent::Create | Sent::Takeover, Op::Claim { claim, rounds, .. }) => {
                if succeeded(&answer) {
                    match revision_of(&answer) {
                        Some(slot) => {
                            Resumed::Claim(Answer::Now(Ok(ClaimReply::Claimed(Ticket {
                                slot,
                                claim,
                            }))))
                        }
                        None => failed_claim(format!("txn answered {answer}")),
                    }
                } else {
                    let existing = answer
                        .pointer("/responses/0/response_range")
                        .cloned()
                        .unwrap_or(Value::Null);
                    self.decide_on(claim, rounds, existing, now)
                }
            }
            (
                Sent::Finish,
                Op::Finish {
                    ticket,
                    reply,
                    response,
                    ..
                },
            ) => {
                if !succeeded(&answer) {
                    return Resumed::Finish(Answer::Now(Ok(FinishReply::Lost)));
                }
                if let Some((response, expires)) = response {
                    if let Err(error) = self.cache.remember(&ticket.claim, &response, expires, now)
                    {
                        log::warn!("caching a record locally failed: {error}");
                    }
                }
                Resumed::Finish(Answer::Now(Ok(reply)))
            }
            (Sent::Revoke, op) => {
                if succeeded(&answer) {
                    log::info!("revoked a claim whose answer was lost: its key is free again");
                } else if !key_found(&answer) {
                    // The lost transaction may still land.
                    return self.revoke_later(op, now);
                }
                // Else another claim holds the key: the lost one never landed, or is gone.
                self.revokes = self.revokes.saturating_sub(1);
                Resumed::Nothing
            }
            (_, op) => self.fail(
                op,
                StoreError::Remote("answer to an unknown step".into()),
                now,
            ),
        }
    }

    fn finish_op(&mut self, ticket: Ticket, outcome: Outcome, now: Millis) -> Op {
        let entry = |state, deadline, response_len| Entry {
            state,
            tuple: ticket.claim.tuple,
            fingerprint: ticket.claim.fingerprint,
            token: ticket.claim.token,
            deadline,
            response_len,
            org: ticket.claim.org,
        };
        let give_up = now + ticket.claim.lease;
        let op = |value, lease, reply, response| Op::Finish {
            ticket,
            value,
            lease,
            reply,
            response,
            give_up,
            retried: false,
        };
        match outcome {
            Outcome::Store(response) => {
                let bytes = response.encode(&ticket.claim.tuple, ticket.claim.token, self.compress);
                // The gateway carries values base64-encoded: 4 bytes for every 3.
                if bytes.len().div_ceil(3) * 4 > self.settings.max_value_bytes {
                    return self.finish_op(ticket, Outcome::TooLarge, now);
                }
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let written = entry(State::Complete, 0, len)
                    .encode_remote(Some(&bytes))
                    .len();
                let (lease, expires) = self.record_lease(&ticket, written, now);
                let value = entry(State::Complete, expires, len).encode_remote(Some(&bytes));
                op(
                    Some(value),
                    lease,
                    FinishReply::Stored,
                    Some((response, expires)),
                )
            }
            Outcome::TooLarge => {
                let written = entry(State::Unstored, 0, 0).encode_remote(None).len();
                let (lease, expires) = self.record_lease(&ticket, written, now);
                let value = entry(State::Unstored, expires, 0).encode_remote(None);
                let reply = FinishReply::StoredWithoutResponse { store_full: false };
                op(Some(value), lease, reply, None)
            }
            Outcome::Release => op(None, LeaseKind::Claim, FinishReply::Released, None),
            Outcome::Hold => {
                let value = entry(State::Held, now + self.claim_lease, 0).encode_remote(None);
                op(Some(value), LeaseKind::Claim, FinishReply::Held, None)
            }
        }
    }

    /// The lease a record whose value is `written` bytes long goes under, and when it expires:
    /// its `ttl` within its organisation's share, else `lease` (an eviction at that age).
    fn record_lease(
        &mut self,
        ticket: &Ticket,
        written: usize,
        now: Millis,
    ) -> (LeaseKind, Millis) {
        let bytes =
            (self.settings.key_prefix.len() + 2 * ticket.claim.tuple.len() + written) as u64;
        if self.within_share(ticket.claim.org, bytes, now) {
            (LeaseKind::Record, now + self.ttl)
        } else {
            self.evictions.push(self.claim_lease);
            (LeaseKind::Claim, now + self.claim_lease)
        }
    }
}

impl<C: Caller, K: Kv> Store for Etcd<C, K> {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>> {
        if let Some(reply) = self.cached(claim, now) {
            return Answer::Now(Ok(reply));
        }
        claim_answer(self.advance(Op::first(claim), now))
    }

    fn poll(
        &mut self,
        claim: &Claim,
        far: bool,
        now: Millis,
    ) -> Option<Answer<Result<ClaimReply, StoreError>>> {
        if let Some(reply) = self.cached(claim, now) {
            return Some(Answer::Now(Ok(reply)));
        }
        if !far {
            return None;
        }
        let key = b64(self.key(&claim.tuple).as_bytes());
        let look = self.send(
            "/v3/kv/range",
            json!({ "key": key }),
            Op::first(claim),
            Sent::Look,
            now,
        );
        Some(claim_answer(look))
    }

    /// Finishes run from the root context's tick: the request that asks may be gone before etcd
    /// answers, and Envoy cancels a call when the context that made it ends.
    fn finish(
        &mut self,
        ticket: Ticket,
        outcome: Outcome,
        now: Millis,
    ) -> Answer<Result<FinishReply, StoreError>> {
        let op = self.finish_op(ticket, outcome, now);
        self.queued.push(op);
        Answer::Queued
    }

    fn resume(&mut self, call: CallId, response: CallResponse, now: Millis) -> Option<Resumed> {
        let pending = self.pending.remove(&call)?;
        // etcd refused it (4xx: out of space, too large, denied): nothing was applied.
        let refused = matches!(response, Ok((400..=499, _)));
        let answer = match response {
            Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                .map_err(|e| StoreError::Remote(format!("etcd answered invalid JSON: {e}"))),
            Ok((status, body)) => Err(StoreError::Remote(format!(
                "etcd answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))),
            Err(error) => Err(error),
        };
        Some(match answer {
            Ok(answer) => self.on_answer(pending, answer, now),
            Err(error) => {
                // A value etcd refuses as too large: keep the record without its response.
                if let Op::Finish {
                    ticket,
                    response: Some(_),
                    ..
                } = &pending.op
                {
                    if error.to_string().contains("too large") {
                        let op = self.finish_op(*ticket, Outcome::TooLarge, now);
                        return Some(self.advance(op, now));
                    }
                }
                self.call_failed(pending, error, !refused, now)
            }
        })
    }

    fn tick(&mut self, now: Millis) -> Vec<Resumed> {
        let mut ended = Vec::new();
        // Calls whose answers never came (their context went away) have failed.
        let horizon = self.settings.timeout.saturating_mul(4);
        let silent: Vec<CallId> = self
            .pending
            .iter()
            .filter(|(_, pending)| now.saturating_sub(pending.since) > horizon)
            .map(|(call, _)| *call)
            .collect();
        for call in silent {
            if let Some(pending) = self.pending.remove(&call) {
                let error = StoreError::Remote("etcd never answered".into());
                ended.push(self.call_failed(pending, error, true, now));
            }
        }
        let (due, later) = std::mem::take(&mut self.retrying)
            .into_iter()
            .partition::<Vec<_>, _>(|(at, _)| *at <= now);
        self.retrying = later;
        let mut queued = std::mem::take(&mut self.queued);
        for (_, op) in due {
            self.retry_bytes = self.retry_bytes.saturating_sub(op.retry_bytes());
            queued.push(op);
        }
        for op in queued {
            match self.advance(op, now) {
                Resumed::Finish(Answer::Later(_)) => {}
                other => ended.push(other),
            }
        }
        ended.extend(self.cache.tick(now));
        ended
    }

    /// The local copies' evictions are not the records' (etcd still holds those): dropped.
    fn take_evictions(&mut self) -> Vec<Millis> {
        self.cache.take_evictions();
        std::mem::take(&mut self.evictions)
    }
}

fn claim_answer(resumed: Resumed) -> Answer<Result<ClaimReply, StoreError>> {
    match resumed {
        Resumed::Claim(answer) => answer,
        Resumed::Finish(_) | Resumed::Nothing => {
            Answer::Now(Err(StoreError::Remote("mixed-up operation".into())))
        }
    }
}

fn failed_claim(what: String) -> Resumed {
    Resumed::Claim(Answer::Now(Err(StoreError::Remote(what))))
}

fn put(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut put = json!({"key": key, "value": b64(value)});
    if let Some(lease) = lease {
        put["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": put })
}

/// A failed transaction has no `succeeded` member at all.
fn succeeded(answer: &Value) -> bool {
    answer.get("succeeded").and_then(Value::as_bool) == Some(true)
}

/// Whether a failed transaction's read found its key.
fn key_found(answer: &Value) -> bool {
    answer
        .pointer("/responses/0/response_range/kvs/0")
        .is_some()
}

fn revision_of(answer: &Value) -> Option<u64> {
    answer.pointer("/header/revision").and_then(int64)
}

fn first_kv(range: &Value) -> Option<(Vec<u8>, u64)> {
    let kv = range.pointer("/kvs/0")?;
    let value = unb64(kv.get("value").and_then(Value::as_str).unwrap_or(""))?;
    let revision = kv.get("mod_revision").and_then(int64)?;
    Some((value, revision))
}

/// etcd's int64 fields travel as strings (they exceed 2^53).
fn int64(value: &Value) -> Option<u64> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut n = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::testkit::{config, MemoryKv};
    use std::cell::RefCell;

    #[derive(Default)]
    struct Calls {
        sent: RefCell<Vec<(String, Value)>>,
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
    struct FakeEtcd {
        keys: HashMap<String, (Vec<u8>, u64)>,
        revision: u64,
        leases: u64,
    }

    impl FakeEtcd {
        fn answer(&mut self, path: &str, body: &Value) -> Value {
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
                "VALUE" => {
                    current.map(|(v, _)| b64(v)) == compare["value"].as_str().map(String::from)
                }
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

        fn kv(&self, key: &str) -> Option<Value> {
            let (value, revision) = self.keys.get(key)?;
            Some(json!({"key": key, "value": b64(value), "mod_revision": revision.to_string()}))
        }
    }

    /// Envoys sharing one etcd; each Envoy has its own shared data.
    struct World {
        calls: &'static Calls,
        etcd: FakeEtcd,
        answered: usize,
    }

    type Envoy = Etcd<&'static Calls, &'static MemoryKv>;

    impl World {
        fn new() -> Self {
            World {
                calls: Box::leak(Box::default()),
                etcd: FakeEtcd::default(),
                answered: 0,
            }
        }

        fn envoy(&self, json: &str) -> Envoy {
            let kv: &'static MemoryKv = Box::leak(Box::default());
            let config = config(json);
            let mut cache = Table::new(kv, &config);
            cache.boot().unwrap();
            let settings = config.etcd.clone().unwrap();
            Etcd::new(self.calls, kv, cache, &config, settings)
        }

        /// A claim (token `token`, fingerprint 1) made and won on `store`.
        fn claim_on(&mut self, store: &mut Envoy, token: u64, now: Millis) -> Ticket {
            let first = Resumed::Claim(store.claim(&claim_of(1, token), now));
            claimed(self.settle(store, first, now))
        }

        /// The same request on `store` replays `response()`.
        fn assert_replays(&mut self, store: &mut Envoy, token: u64, now: Millis) {
            let retry = Resumed::Claim(store.claim(&claim_of(1, token), now));
            assert_eq!(
                self.settle(store, retry, now),
                Resumed::Claim(Answer::Now(Ok(ClaimReply::Replay(response()))))
            );
        }

        /// etcd answers the last call made; the answer reaches `store` if `delivered`, else the
        /// store learns only that the call failed.
        fn answer_last<S: Store>(
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
        fn claim_sent(&mut self, store: &mut Envoy, token: u64, now: Millis) {
            let mut resumed = Resumed::Claim(store.claim(&claim_of(1, token), now));
            while self.last_path() != "/v3/kv/txn" {
                resumed = self.answer_last(store, true, now).unwrap();
            }
            assert!(matches!(resumed, Resumed::Claim(Answer::Later(_))));
        }

        fn last_path(&self) -> String {
            self.calls
                .sent
                .borrow()
                .last()
                .map(|(path, _)| path.clone())
                .unwrap_or_default()
        }

        /// Answers every call made so far, feeding answers back until the operation settles.
        fn settle<S: Store>(
            &mut self,
            store: &mut S,
            mut resumed: Resumed,
            now: Millis,
        ) -> Resumed {
            loop {
                let call = match &resumed {
                    Resumed::Claim(Answer::Later(call)) | Resumed::Finish(Answer::Later(call)) => {
                        *call
                    }
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

    const JSON: &str = r#"{"etcd": {"cluster": "etcd"}}"#;

    fn claim_of(fingerprint: u8, token: u64) -> Claim {
        Claim {
            tuple: [1; 32],
            fingerprint: [fingerprint; 32],
            token,
            lease: 60_000,
            org: 1,
        }
    }

    fn claimed(resumed: Resumed) -> Ticket {
        match resumed {
            Resumed::Claim(Answer::Now(Ok(ClaimReply::Claimed(ticket)))) => ticket,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    fn response() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("set-cookie".into(), "a=1".into())],
            body: b"created".to_vec(),
        }
    }

    fn finish(
        world: &mut World,
        store: &mut Envoy,
        ticket: Ticket,
        outcome: Outcome,
        now: Millis,
    ) -> FinishReply {
        assert_eq!(store.finish(ticket, outcome, now), Answer::Queued);
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

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            assert_eq!(unb64(&b64(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64(b"foob"), "Zm9vYg==");
        assert_eq!(b64(b"fooba"), "Zm9vYmE=");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn a_claim_is_one_create_if_absent_transaction_under_a_shared_lease() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        world.claim_on(&mut a, 10, 0);
        assert_eq!(world.etcd.leases, 1);
        // Another Envoy, same request: the transaction fails and returns the claim in flight.
        let second = Resumed::Claim(b.claim(&claim_of(1, 20), 5));
        assert_eq!(
            world.settle(&mut b, second, 5),
            Resumed::Claim(Answer::Now(Ok(ClaimReply::InFlight { remaining: 59_995 })))
        );
        let third = Resumed::Claim(b.claim(&claim_of(2, 30), 6));
        assert_eq!(
            world.settle(&mut b, third, 6),
            Resumed::Claim(Answer::Now(Ok(ClaimReply::Conflict)))
        );
    }

    #[test]
    fn a_stored_record_replays_on_another_envoy_and_then_from_its_cache() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        assert_eq!(
            finish(&mut world, &mut a, ticket, Outcome::Store(response()), 10),
            FinishReply::Stored
        );
        world.assert_replays(&mut b, 20, 20);
        let before = world.answered;
        assert_eq!(
            b.claim(&claim_of(1, 21), 30),
            Answer::Now(Ok(ClaimReply::Replay(response())))
        );
        assert_eq!(world.answered, before, "served from the local cache");
        assert_eq!(
            a.claim(&claim_of(1, 22), 30),
            Answer::Now(Ok(ClaimReply::Replay(response())))
        );
    }

    #[test]
    fn past_its_share_an_organisation_s_records_live_a_lease_and_count_as_evicted() {
        let mut world = World::new();
        let json = r#"{"ttl": "1h", "lease": "10s",
            "etcd": {"cluster": "etcd", "max_value_bytes": 1024, "max_share_bytes": 1024}}"#;
        let mut envoy = world.envoy(json);
        // Stores a response for organisation `org` under tuple `n`; when its record expires.
        let mut store = |world: &mut World, org: u16, n: u8, now: Millis| {
            let claim = Claim {
                tuple: [n; 32],
                org,
                ..claim_of(1, u64::from(n))
            };
            let first = Resumed::Claim(envoy.claim(&claim, now));
            let ticket = claimed(world.settle(&mut envoy, first, now));
            let reply = finish(world, &mut envoy, ticket, Outcome::Store(response()), now);
            assert_eq!(reply, FinishReply::Stored);
            let key = b64(envoy.key(&claim.tuple).as_bytes());
            let (entry, _) = Entry::decode_remote(&world.etcd.keys[&key].0).unwrap();
            (entry.deadline - now, envoy.take_evictions())
        };
        let (hour, lease) = (3_600_000, 10_000);
        let lives: Vec<Millis> = (1..=8).map(|n| store(&mut world, 1, n, 0).0).collect();
        let kept = lives.iter().filter(|life| **life == hour).count();
        assert!(
            (3..8).contains(&kept),
            "1 KiB holds a few records: {lives:?}"
        );
        assert!(lives[kept..].iter().all(|life| *life == lease), "{lives:?}");
        assert_eq!(store(&mut world, 1, 9, 0), (lease, vec![lease]));
        assert_eq!(
            store(&mut world, 2, 10, 0),
            (hour, vec![]),
            "another organisation"
        );
        // Once the first records' leases have surely ended, the share has room again.
        let later = hour + 4 * hour / 8;
        assert_eq!(store(&mut world, 1, 11, later), (hour, vec![]));
    }

    #[test]
    fn a_waiting_request_reads_the_record_and_claims_only_once_it_is_gone() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        let sent = world.calls.sent.borrow().len();
        assert_eq!(b.poll(&claim_of(1, 20), false, 5), None);
        assert_eq!(
            world.calls.sent.borrow().len(),
            sent,
            "a near poll makes no call"
        );
        let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 5).unwrap());
        assert_eq!(world.calls.sent.borrow()[sent].0, "/v3/kv/range");
        assert_eq!(
            world.settle(&mut b, look, 5),
            Resumed::Claim(Answer::Now(Ok(ClaimReply::InFlight { remaining: 59_995 })))
        );
        assert_eq!(
            finish(&mut world, &mut a, ticket, Outcome::Store(response()), 10),
            FinishReply::Stored
        );
        // A duplicate on the original's Envoy finds the record there, without a call.
        let sent = world.calls.sent.borrow().len();
        assert_eq!(
            a.poll(&claim_of(1, 11), false, 11),
            Some(Answer::Now(Ok(ClaimReply::Replay(response()))))
        );
        assert_eq!(world.calls.sent.borrow().len(), sent);
        let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 12).unwrap());
        assert_eq!(
            world.settle(&mut b, look, 12),
            Resumed::Claim(Answer::Now(Ok(ClaimReply::Replay(response()))))
        );
    }

    #[test]
    fn a_waiting_request_claims_a_released_record() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        assert_eq!(
            finish(&mut world, &mut a, ticket, Outcome::Release, 1),
            FinishReply::Released
        );
        let sent = world.calls.sent.borrow().len();
        let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 2).unwrap());
        let ticket = claimed(world.settle(&mut b, look, 2));
        assert_eq!(ticket.claim.token, 20);
        let paths: Vec<String> = world.calls.sent.borrow()[sent..]
            .iter()
            .map(|(path, _)| path.clone())
            .collect();
        // B's first claim needs a lease of its own: leases are cached per Envoy.
        assert_eq!(paths, ["/v3/kv/range", "/v3/lease/grant", "/v3/kv/txn"]);
    }

    #[test]
    fn a_finish_etcd_did_not_take_is_sent_again_while_the_claim_lasts() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        assert_eq!(
            a.finish(ticket, Outcome::Store(response()), 10),
            Answer::Queued
        );
        assert_eq!(a.tick(10), vec![]);
        let sent = world.calls.sent.borrow().len();
        let unavailable = Ok((503, b"etcdserver: leader changed".to_vec()));
        assert!(matches!(
            a.resume(sent as CallId, unavailable, 20),
            Some(Resumed::Finish(Answer::Now(Err(StoreError::Remote(_)))))
        ));
        assert_eq!(a.tick(500), vec![]);
        assert_eq!(world.calls.sent.borrow().len(), sent, "not before a second");
        assert_eq!(a.tick(1_020), vec![]);
        let again = world.calls.sent.borrow().len();
        assert_eq!(again, sent + 1, "sent again");
        let resumed = world.settle(
            &mut a,
            Resumed::Finish(Answer::Later(again as CallId)),
            1_030,
        );
        assert_eq!(
            resumed,
            Resumed::Finish(Answer::Now(Ok(FinishReply::Stored)))
        );
        world.assert_replays(&mut b, 20, 1_040);
    }

    #[test]
    fn a_finish_that_keeps_failing_is_given_up_a_lease_after_the_response() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        a.finish(ticket, Outcome::Store(response()), 10);
        let (mut sends, mut reported) = (0, 0);
        for now in (10..70_000).step_by(20) {
            a.tick(now);
            let sent = world.calls.sent.borrow().len() as CallId;
            match a.resume(sent, Err(StoreError::Remote("timeout".into())), now) {
                Some(Resumed::Finish(Answer::Now(Err(_)))) => {
                    (sends, reported) = (sends + 1, reported + 1)
                }
                Some(Resumed::Finish(Answer::Queued)) => sends += 1,
                None => {}
                other => panic!("{other:?}"),
            }
        }
        // Every second while the claim's lease (60 s) runs from the response, then no more;
        // the first failure and giving up are reported, the rest are quiet.
        assert_eq!(sends, 60);
        assert_eq!(reported, 2);
        assert_eq!(a.retry_bytes, 0);
    }

    #[test]
    fn a_claim_whose_answer_was_lost_is_revoked_once_it_has_landed() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        world.claim_sent(&mut a, 10, 0);
        // etcd applied it; A never heard back and answered its client 503.
        let lost = world.answer_last(&mut a, false, 500);
        assert!(matches!(lost, Some(Resumed::Claim(Answer::Now(Err(_))))));
        assert_eq!(world.etcd.keys.len(), 1, "the claim landed");
        let sent = world.calls.sent.borrow().len();
        assert_eq!(a.tick(1_000), vec![]);
        assert_eq!(world.calls.sent.borrow().len(), sent, "not before a second");
        a.tick(1_500);
        assert_eq!(world.last_path(), "/v3/kv/txn");
        assert_eq!(
            world.answer_last(&mut a, true, 1_510),
            Some(Resumed::Nothing)
        );
        assert!(world.etcd.keys.is_empty(), "revoked");
        assert_eq!(a.revokes, 0);
        // The retry, on any Envoy, runs the work instead of waiting for the lease.
        world.claim_on(&mut b, 20, 1_520);
    }

    #[test]
    fn a_lost_claim_that_lands_late_is_revoked_when_it_does() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        world.claim_sent(&mut a, 10, 0);
        let late = world.calls.sent.borrow().last().cloned().unwrap();
        let call = world.calls.sent.borrow().len() as CallId;
        a.resume(call, Err(StoreError::Remote("no answer".into())), 500);
        a.tick(1_500);
        // Not there yet: looked for again a second later, then at doubling intervals.
        assert_eq!(
            world.answer_last(&mut a, true, 1_510),
            Some(Resumed::Nothing)
        );
        world.etcd.answer(&late.0, &late.1);
        assert_eq!(world.etcd.keys.len(), 1, "the lost claim landed late");
        let sent = world.calls.sent.borrow().len();
        a.tick(2_000);
        assert_eq!(world.calls.sent.borrow().len(), sent);
        a.tick(2_510);
        assert_eq!(
            world.answer_last(&mut a, true, 2_520),
            Some(Resumed::Nothing)
        );
        assert!(world.etcd.keys.is_empty());
    }

    #[test]
    fn revoking_leaves_another_claim_alone_and_a_refused_claim_is_not_revoked() {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let mut b = world.envoy(JSON);
        world.claim_sent(&mut a, 10, 0);
        let call = world.calls.sent.borrow().len() as CallId;
        a.resume(call, Err(StoreError::Remote("no answer".into())), 500);
        world.claim_on(&mut b, 20, 600);
        a.tick(1_500);
        assert_eq!(
            world.answer_last(&mut a, true, 1_510),
            Some(Resumed::Nothing)
        );
        assert_eq!(world.etcd.keys.len(), 1, "B's claim stays");
        assert_eq!(a.revokes, 0, "done: the key is someone else's");

        // A claim etcd refused (4xx) was not applied: nothing to revoke.
        world.claim_sent(&mut a, 11, 2_000);
        let call = world.calls.sent.borrow().len() as CallId;
        let nospace = br#"{"error":"etcdserver: mvcc: database space exceeded","code":8}"#.to_vec();
        a.resume(call, Ok((429, nospace)), 2_010);
        let sent = world.calls.sent.borrow().len();
        a.tick(10_000);
        assert_eq!(world.calls.sent.borrow().len(), sent);
    }

    #[test]
    fn a_released_claim_is_deleted_only_if_still_ours() {
        let mut world = World::new();
        let mut store = world.envoy(JSON);
        let ticket = world.claim_on(&mut store, 10, 0);
        // Past the lease, another request takes the record over.
        let later = Resumed::Claim(store.claim(&claim_of(1, 11), 60_001));
        claimed(world.settle(&mut store, later, 60_001));
        assert_eq!(
            finish(&mut world, &mut store, ticket, Outcome::Release, 60_002),
            FinishReply::Lost
        );
        assert_eq!(world.etcd.keys.len(), 1, "the newer claim is untouched");
    }

    #[test]
    fn a_release_lets_the_retry_claim_again() {
        let mut world = World::new();
        let mut store = world.envoy(JSON);
        let ticket = world.claim_on(&mut store, 10, 0);
        assert_eq!(
            finish(&mut world, &mut store, ticket, Outcome::Release, 1),
            FinishReply::Released
        );
        let retry = Resumed::Claim(store.claim(&claim_of(1, 11), 2));
        claimed(world.settle(&mut store, retry, 2));
    }

    #[test]
    fn a_value_over_the_limit_keeps_the_record_without_its_response() {
        let mut world = World::new();
        let json = r#"{"etcd": {"cluster": "etcd", "max_value_bytes": 1024}}"#;
        let mut store = world.envoy(json);
        let ticket = world.claim_on(&mut store, 10, 0);
        let mut big = response();
        big.body = crate::core::record::incompressible(2048);
        assert_eq!(
            finish(&mut world, &mut store, ticket, Outcome::Store(big), 1),
            FinishReply::StoredWithoutResponse { store_full: false }
        );
        let retry = Resumed::Claim(store.claim(&claim_of(1, 11), 2));
        assert_eq!(
            world.settle(&mut store, retry, 2),
            Resumed::Claim(Answer::Now(Ok(ClaimReply::NotStored)))
        );
    }

    #[test]
    fn etcd_errors_and_silence_fail_the_operation() {
        let mut store = World::new().envoy(JSON);
        let Answer::Later(call) = store.claim(&claim_of(1, 10), 0) else {
            panic!("expected a call");
        };
        let nospace = br#"{"error":"etcdserver: mvcc: database space exceeded","code":8}"#.to_vec();
        match store.resume(call, Ok((429, nospace)), 1) {
            Some(Resumed::Claim(Answer::Now(Err(StoreError::Remote(what))))) => {
                assert!(what.contains("429"), "{what}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.resume(call, Ok((200, b"{}".to_vec())), 1),
            None,
            "answered once"
        );
    }
}
