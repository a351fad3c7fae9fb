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
//!   A finish sent again reads the key back when its compare fails, so an earlier attempt that
//!   landed without its answer counts as done, not as a lost claim.
//! - Expiry: leases shared by time bucket, one for claims in flight and one for records, so a
//!   crashed Envoy's claim frees itself and etcd drops records after their TTL.
//! - Shares: what each organisation's records written through this Envoy hold in etcd is counted
//!   by lease window; past `max_share_bytes` its new records live `lease` instead of `ttl`, as if
//!   evicted then, so a flooding organisation never holds more of etcd than its share.
//! - Complete records never change until they expire, so replays are served from a copy in this
//!   Envoy's shared data after the first fetch.
//!
//! Every operation goes out as calls; their answers come back through [`Store::resume`].

#[cfg(test)]
pub(crate) mod fake;
mod leases;
mod retry;
#[cfg(test)]
mod tests;
mod wire;

use crate::core::config::{Config, EtcdConfig};
use crate::core::lifecycle::{self, Claim, Ending, Finished, Room, Verdict};
use crate::core::record::{Bucket, Entry, State, StoredResponse, REMOTE_ENTRY_LEN};
use crate::core::store::{
    Answer, CallId, CallResponse, ClaimReply, Handle, Resumed, Store, StoreError, Ticket,
};
use crate::core::Millis;
use crate::stores::table::Table;
use crate::stores::{Caller, Kv};
use leases::{LeaseKind, Leases};
use retry::{Retries, RETRY_MILLIS};
use serde_json::Value;
use std::collections::HashMap;

/// Attempts at one claim when other Envoys keep changing the record under it.
const MAX_ROUNDS: u8 = 8;
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
        claim: Claim,
        /// The claim's revision: the record changes only if it still has it.
        revision: u64,
        /// The record's new value, `None` to delete it.
        value: Option<Vec<u8>>,
        lease: LeaseKind,
        /// What the record says once etcd has it.
        recorded: Finished,
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
    leases: Leases<K>,
    cache: Table<K>,
    settings: EtcdConfig,
    ttl: Millis,
    claim_lease: Millis,
    compress: bool,
    pending: HashMap<CallId, Pending>,
    queued: Vec<Op>,
    retries: Retries,
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
            leases: Leases::new(shared, config, &settings),
            cache,
            settings,
            ttl: config.ttl,
            claim_lease: config.claim_lease(),
            compress: config.compress_responses,
            pending: HashMap::new(),
            queued: Vec::new(),
            retries: Retries::default(),
            evictions: Vec::new(),
        }
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
            self.retries.revoke(revoke, give_up, now);
        }
        self.fail(pending.op, error, now)
    }

    /// An operation failed: its error. A finish is kept to send again (see the module); the
    /// compare-and-swap on the claim's revision makes a late one harmless. A finish reports its
    /// first failure and, if it comes to that, giving up; the failures between are quiet.
    fn fail(&mut self, mut op: Op, error: StoreError, now: Millis) -> Resumed {
        match &mut op {
            Op::Claim { .. } => Resumed::Claim(Answer::Now(Err(error))),
            Op::Revoke { .. } => {
                log::debug!("revoking a claim whose answer was lost failed: {error}");
                self.retries.revoke_again(op, now);
                Resumed::Nothing
            }
            Op::Finish {
                give_up, retried, ..
            } => {
                let first = !std::mem::replace(retried, true);
                let give_up = *give_up;
                if self.retries.keep(op, now + RETRY_MILLIS, give_up) && !first {
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
        wire::key(&self.settings.key_prefix, tuple)
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
            Some(kind) => match self.leases.current(kind, now) {
                Some(id) => Some(id),
                None => {
                    let (_, length) = self.leases.shape(kind);
                    let body = wire::grant(length);
                    return self.send(wire::GRANT, body, op, Sent::Grant(kind), now);
                }
            },
            None => None,
        };
        let (body, sent) = match &op {
            Op::Claim {
                claim, takeover, ..
            } => {
                let key = self.key(&claim.tuple);
                let body = wire::claim(&key, &claim_value(claim, now), lease, *takeover);
                let sent = match takeover {
                    None => Sent::Create,
                    Some(_) => Sent::Takeover,
                };
                (body, sent)
            }
            Op::Finish {
                claim,
                revision,
                value,
                ..
            } => {
                let key = self.key(&claim.tuple);
                let body = wire::finish(&key, *revision, value.as_deref(), lease);
                (body, Sent::Finish)
            }
            Op::Revoke { claim, value, .. } => {
                (wire::revoke(&self.key(&claim.tuple), value), Sent::Revoke)
            }
        };
        self.send(wire::TXN, body, op, sent, now)
    }

    /// A claim's transaction failed: decide on the record etcd sent back.
    fn decide_on(&mut self, claim: Claim, rounds: u8, existing: Value, now: Millis) -> Resumed {
        let Some((value, revision)) = wire::first_kv(&existing) else {
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
            evict: None,
        };
        let reply = match lifecycle::claim(&mut bucket, &claim, room, now) {
            Verdict::Claimed(_) => return self.retry_claim(claim, rounds, Some(revision), now),
            Verdict::Replay(found) => match StoredResponse::decode(response, found.token) {
                Ok(response) => {
                    if let Err(error) = self.cache.remember(&claim, &response, entry.deadline, now)
                    {
                        log::warn!("caching a record locally failed: {error}");
                    }
                    Verdict::Replay(response)
                }
                Err(error) => {
                    let error = StoreError::Unreadable(format!("etcd response: {error:?}"));
                    return Resumed::Claim(Answer::Now(Err(error)));
                }
            },
            Verdict::Blocked(block) => Verdict::Blocked(block),
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
            (Sent::Grant(kind), op) => match wire::lease_of(&answer) {
                Some(id) => {
                    self.leases.remember(kind, id, now);
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
                if wire::succeeded(&answer) {
                    match wire::revision_of(&answer) {
                        Some(revision) => {
                            Resumed::Claim(Answer::Now(Ok(Verdict::Claimed(Ticket {
                                handle: Handle::Revision(revision),
                                claim,
                            }))))
                        }
                        None => failed_claim(format!("txn answered {answer}")),
                    }
                } else {
                    self.decide_on(claim, rounds, wire::failed_read(&answer), now)
                }
            }
            (
                Sent::Finish,
                Op::Finish {
                    claim,
                    value,
                    recorded,
                    response,
                    retried,
                    ..
                },
            ) => {
                // A finish sent again after an answer that never came may find that its earlier
                // attempt landed: its own value in place, or, for a release, the key gone.
                let landed = |found: Option<(Vec<u8>, u64)>| match (&value, found) {
                    (Some(value), Some((found, _))) => found == *value,
                    (None, None) => retried,
                    _ => false,
                };
                if !wire::succeeded(&answer) && !landed(wire::first_kv(&wire::failed_read(&answer)))
                {
                    return Resumed::Finish(Answer::Now(Ok(Finished::Lost)));
                }
                if let Some((response, expires)) = response {
                    if let Err(error) = self.cache.remember(&claim, &response, expires, now) {
                        log::warn!("caching a record locally failed: {error}");
                    }
                }
                Resumed::Finish(Answer::Now(Ok(recorded)))
            }
            (Sent::Revoke, op) => {
                if wire::succeeded(&answer) {
                    log::info!("revoked a claim whose answer was lost: its key is free again");
                } else if !wire::key_found(&answer) {
                    // The lost transaction may still land.
                    self.retries.revoke_again(op, now);
                    return Resumed::Nothing;
                }
                // Else another claim holds the key: the lost one never landed, or is gone.
                self.retries.revoke_ended();
                Resumed::Nothing
            }
            (_, op) => self.fail(
                op,
                StoreError::Remote("answer to an unknown step".into()),
                now,
            ),
        }
    }

    fn finish_op(
        &mut self,
        claim: Claim,
        revision: u64,
        ending: Ending<StoredResponse>,
        now: Millis,
    ) -> Op {
        let entry = |state, deadline, response_len| Entry {
            state,
            tuple: claim.tuple,
            fingerprint: claim.fingerprint,
            token: claim.token,
            deadline,
            response_len,
            org: claim.org,
        };
        let recorded = ending.recorded();
        let give_up = now + claim.lease;
        let op = |value, lease, response| Op::Finish {
            claim,
            revision,
            value,
            lease,
            recorded,
            response,
            give_up,
            retried: false,
        };
        match ending {
            Ending::Stored(response) => {
                let bytes = response.encode(claim.token, self.compress);
                // The gateway carries values base64-encoded: 4 bytes for every 3.
                if bytes.len().div_ceil(3) * 4 > self.settings.max_value_bytes {
                    let unstored = Ending::Unstored { no_room: false };
                    return self.finish_op(claim, revision, unstored, now);
                }
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let written = REMOTE_ENTRY_LEN + bytes.len();
                let (lease, expires) = self.record_lease(&claim, written, now);
                let value = entry(State::Complete, expires, len).encode_remote(Some(&bytes));
                op(Some(value), lease, Some((response, expires)))
            }
            Ending::Unstored { .. } => {
                let (lease, expires) = self.record_lease(&claim, REMOTE_ENTRY_LEN, now);
                let value = entry(State::Unstored, expires, 0).encode_remote(None);
                op(Some(value), lease, None)
            }
            Ending::Released => op(None, LeaseKind::Claim, None),
            Ending::Held => {
                let value = entry(State::Held, now + self.claim_lease, 0).encode_remote(None);
                op(Some(value), LeaseKind::Claim, None)
            }
        }
    }

    /// The lease a record whose value is `written` bytes long goes under, and when it expires:
    /// its `ttl` within its organisation's share, else `lease` (an eviction at that age).
    fn record_lease(&mut self, claim: &Claim, written: usize, now: Millis) -> (LeaseKind, Millis) {
        let key =
            self.settings.key_prefix.len() + wire::RECORD_FORMAT.len() + 2 * claim.tuple.len();
        let bytes = (key + written) as u64;
        if self.leases.within_share(claim.org, bytes, now) {
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
        let range = wire::range(&self.key(&claim.tuple));
        let look = self.send(wire::RANGE, range, Op::first(claim), Sent::Look, now);
        Some(claim_answer(look))
    }

    /// Finishes run from the root context's tick: the request that asks may be gone before etcd
    /// answers, and Envoy cancels a call when the context that made it ends.
    fn finish(
        &mut self,
        ticket: Ticket,
        ending: Ending<StoredResponse>,
        now: Millis,
    ) -> Answer<Result<Finished, StoreError>> {
        let Handle::Revision(revision) = ticket.handle else {
            let error = format!("not a ticket of etcd: {:?}", ticket.handle);
            return Answer::Now(Err(StoreError::Host(error)));
        };
        let op = self.finish_op(ticket.claim, revision, ending, now);
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
                    claim,
                    revision,
                    response: Some(_),
                    ..
                } = &pending.op
                {
                    if error.to_string().contains("too large") {
                        let unstored = Ending::Unstored { no_room: false };
                        let op = self.finish_op(*claim, *revision, unstored, now);
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
        let mut queued = std::mem::take(&mut self.queued);
        queued.extend(self.retries.due(now));
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
