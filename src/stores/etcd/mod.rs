//! The cluster-wide store: one etcd key per record, reached through Envoy on etcd's v3 gRPC API,
//! so that every Envoy of a fleet sees the same claims.
//!
//! - Claim: one transaction, "create the key if absent, else read it back"; the loser decides on
//!   the record it read with the same [`lifecycle`] as the embedded table. An expired record is taken
//!   over by a compare-and-swap on its `mod_revision`. While a worker has `CLAIM_CALLS` claim
//!   calls in flight, the claims made meanwhile wait, and go out together from the root
//!   context as soon as it wakes (at most `CLAIM_CALLS` such batches in flight; the rest go
//!   when one answers), each a transaction nested in one call: etcd then applies many claims
//!   in one raft round, at a quarter of the CPU each.
//! - Reading first: that transaction is a raft write even when its compare fails and it only
//!   reads the record back. While three in four of a worker's last 32 claims found a record
//!   (replays of records stored elsewhere), a claim reads the key first, and claims only if it
//!   is absent; those that wait go out as one transaction of reads only, which etcd serves
//!   without a raft round. First POSTs, which find none, keep their single transaction.
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
//!   landed without its answer counts as done, not as a lost claim. Finishes go out from the
//!   root context, woken for them while no finish is in flight; those gathered meanwhile go
//!   in one transaction once it answers (each nested, with its own compare), so under load
//!   etcd takes one raft round for many and the proxy one call.
//! - Expiry: leases shared by time bucket, one for claims in flight and one for records, so a
//!   crashed Envoy's claim frees itself and etcd drops records after their TTL. Only the root
//!   context's tick grants them: an operation that finds none waits for the grant, and while
//!   a kind is in use its next bucket's lease is granted ahead. So a worker grants at most one
//!   lease of each kind per bucket whatever the concurrency, and no call that a request's end
//!   would cancel is ever left to carry others.
//! - Shares: what each organisation's records written through this Envoy hold in etcd is counted
//!   by lease window; past `max_share_bytes` its new records live `lease` instead of `ttl`, as if
//!   evicted then, so a flooding organisation never holds more of etcd than its share.
//! - Complete records never change until they expire, so replays are served from a copy in this
//!   Envoy's shared data after the first fetch.
//!
//! Every operation goes out as calls; their answers come back through [`Remote::resume`].

mod answers;
mod batching;
#[cfg(test)]
pub(crate) mod fake;
mod finishes;
mod grants;
pub(crate) mod leases;
mod ops;
mod retry;
#[cfg(test)]
mod tests;
pub(crate) mod value;
pub(crate) mod wire;

pub use wire::Method;

use crate::core::config::{Config, EtcdConfig};
use crate::core::lifecycle::{Claim, Ending, Finished};
use crate::core::metrics::{Gauge, Histogram};
use crate::core::record::StoredResponse;
use crate::core::store::{
    Answer, CallFailed, CallId, CallResponse, ClaimReply, Handle, Remote, Resumed, Store,
    StoreError, Ticket,
};
use crate::core::Millis;
use crate::stores::table::Table;
use crate::stores::{Caller, Kv};
use answers::claim_answer;
use batching::Batch;
use leases::{LeaseKind, Leases};
use ops::{claim_value, later, Lately, Op, Parked, Pending, Sent, Step};
use retry::Retries;
use std::collections::HashMap;

/// Attempts at one claim when other Envoys keep changing the record under it.
const MAX_ROUNDS: u8 = 8;
/// After a failed grant, none is asked for this long, and operations needing a lease fail.
const GRANT_BACKOFF_MILLIS: Millis = 250;
/// Operations sent in one transaction at most (etcd refuses more operations in one than its
/// `--max-txn-ops`, 128 by default).
const MAX_BATCH: usize = 64;
/// gRPC's status for a call that ran out of time: not a refusal, so it may have been applied.
const DEADLINE_EXCEEDED: u32 = 4;
/// Claim calls a worker sends alone; past them, new claims wait and go out together, in at
/// most this many batches in flight.
const CLAIM_CALLS: usize = 4;

pub struct Etcd<C: Caller, K: Kv> {
    caller: C,
    leases: Leases<K>,
    cache: Table<K>,
    settings: EtcdConfig,
    compress: bool,
    pending: HashMap<CallId, Pending>,
    batches: HashMap<CallId, Batch>,
    /// Lease grants in flight: the kind and window, and when each was sent.
    grants: HashMap<CallId, (LeaseKind, u64, Millis)>,
    grant_failed_at: Option<Millis>,
    /// Grants failed in a row: the first is asked again at once (the member that failed it is
    /// likely ejected by then), the second fails what waits for it.
    grant_failures: u32,
    /// The window each kind of lease was last used in, by kind.
    used: [Option<u64>; 2],
    parked: Vec<Parked>,
    /// Claims queued for a batch (while claim calls are out), under ids of their own.
    queued_claims: Vec<(CallId, Op)>,
    last_parked: CallId,
    /// Parked operations that went on, under their ids, for [`Remote::take_moved_on`].
    moved_on: Vec<(CallId, Resumed)>,
    /// Finishes waiting for the root context to send them.
    queued_finishes: Vec<Op>,
    retries: Retries,
    /// Ages the records stored since [`Store::take_evictions`] was last asked will be evicted
    /// at: those of organisations past their share.
    evictions: Vec<Millis>,
    /// Claims of a tuple that another claim of this worker is asking etcd about, under ids of
    /// their own: each asks again once that answer is in (a burst of replays of one record not
    /// in the cache makes one call, the rest find the copy it left).
    followers: Vec<(CallId, Claim)>,
    lately: Lately,
    /// When each call in flight was made, in microseconds.
    dispatched: HashMap<CallId, u64>,
    /// Call latencies and batch sizes, for [`Remote::take_samples`].
    samples: Vec<(Histogram, u64)>,
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
            compress: config.compress_responses,
            pending: HashMap::new(),
            batches: HashMap::new(),
            grants: HashMap::new(),
            grant_failed_at: None,
            grant_failures: 0,
            used: [None; 2],
            parked: Vec::new(),
            queued_claims: Vec::new(),
            last_parked: 3,
            moved_on: Vec::new(),
            queued_finishes: Vec::new(),
            retries: Retries::default(),
            evictions: Vec::new(),
            followers: Vec::new(),
            lately: Lately::default(),
            dispatched: HashMap::new(),
            samples: Vec::new(),
        }
    }

    /// Makes a call carrying `ops` operations, timed until [`Etcd::answered`].
    fn dispatch(
        &mut self,
        method: Method,
        message: &[u8],
        ops: usize,
    ) -> Result<CallId, StoreError> {
        let call = self.caller.call(method, message)?;
        self.dispatched.insert(call, self.caller.micros());
        self.samples.push((Histogram::EtcdBatchOps, ops as u64));
        Ok(call)
    }

    /// A call was answered, or given up on (`timed` false: its time says nothing).
    fn answered(&mut self, call: CallId, timed: bool) {
        if let Some(at) = self.dispatched.remove(&call) {
            if timed {
                let micros = self.caller.micros().saturating_sub(at);
                self.samples.push((Histogram::EtcdCallMicros, micros));
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

    fn key(&self, tuple: &[u8; 32]) -> Vec<u8> {
        wire::key(&self.settings.key_prefix, tuple)
    }

    fn send(&mut self, method: Method, message: &[u8], op: Op, sent: Sent, now: Millis) -> Resumed {
        match self.dispatch(method, message, 1) {
            Ok(call) => {
                let resumed = later(&op, call);
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

    /// Carries an operation forward: a lease first if it needs one, then its transaction. A
    /// claim waits while the worker has `CLAIM_CALLS` claim calls in flight.
    fn advance(&mut self, op: Op, now: Millis) -> Resumed {
        if matches!(op, Op::Claim { .. }) && self.claim_calls() >= CLAIM_CALLS {
            let id = self.queued_claim_id();
            let resumed = later(&op, id);
            self.queued_claims.push((id, op));
            return resumed;
        }
        self.send_one(op, now)
    }

    /// Sends an operation's request (once it has its lease) in a call of its own.
    fn send_one(&mut self, op: Op, now: Millis) -> Resumed {
        match self.next_txn(op, now) {
            Ok((op, message, sent)) => self.send(sent.method(), &message, op, sent, now),
            Err(resumed) => resumed,
        }
    }

    /// The request an operation sends next (a transaction, or a claim's read), once it has the
    /// lease it needs; else what became of it (waiting for a lease, or failed).
    fn next_txn(&mut self, op: Op, now: Millis) -> Result<(Op, Vec<u8>, Sent), Resumed> {
        let kind = match &op {
            Op::Claim {
                step: Step::Read, ..
            } => None,
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
                Some(id) => {
                    self.used[kind as usize] = Some(self.leases.window(kind, now).0);
                    Some(id)
                }
                None if self.grant_backing_off(now) => {
                    let error = StoreError::Remote("no lease: granting one failed just now".into());
                    return Err(self.fail(op, error, now));
                }
                None => return Err(self.park(kind, op)),
            },
            None => None,
        };
        let (message, sent) = match &op {
            Op::Claim { claim, step, .. } => {
                let key = self.key(&claim.tuple);
                let (takeover, sent) = match step {
                    Step::Read => return Ok((op, wire::range(&key), Sent::ReadFirst)),
                    Step::Create => (None, Sent::Create),
                    Step::Takeover(revision) => (Some(*revision), Sent::Takeover),
                };
                let value = claim_value(claim, now);
                (wire::claim(&key, &value, lease, takeover), sent)
            }
            Op::Finish {
                claim,
                revision,
                value,
                ..
            } => {
                let key = self.key(&claim.tuple);
                let message = wire::finish(&key, *revision, value.as_deref(), lease);
                (message, Sent::Finish)
            }
            Op::Revoke { claim, value, .. } => {
                (wire::revoke(&self.key(&claim.tuple), value), Sent::Revoke)
            }
        };
        Ok((op, message, sent))
    }

    /// The tick's own work, for [`Store::tick`].
    fn tick_calls(&mut self, now: Millis) -> Vec<Resumed> {
        let mut ended = Vec::new();
        // Calls whose answers never came (their context went away) have failed.
        let horizon = self.settings.timeout.saturating_mul(4);
        let silent = |since: Millis| now.saturating_sub(since) > horizon;
        let unanswered = silent_calls(&self.pending, |p| silent(p.since));
        let error = StoreError::Remote("etcd never answered".into());
        for call in unanswered {
            self.answered(call, false);
            if let Some(pending) = self.pending.remove(&call) {
                ended.push(self.call_failed(pending, error.clone(), true, now));
            }
        }
        for call in silent_calls(&self.batches, |batch| silent(batch.since)) {
            self.answered(call, false);
            if let Some(batch) = self.batches.remove(&call) {
                let never = CallFailed {
                    status: DEADLINE_EXCEEDED,
                    message: "no answer came".into(),
                };
                self.batch_answered(call, batch, Err(never), now);
            }
        }
        for call in silent_calls(&self.grants, |(_, _, since)| silent(*since)) {
            self.answered(call, false);
            if let Some((kind, ..)) = self.grants.remove(&call) {
                let error = StoreError::Remote("etcd never answered a lease grant".into());
                self.granted(kind, Err(error), now);
            }
        }
        self.send_queued_claims(now);
        let mut queued = std::mem::take(&mut self.queued_finishes);
        queued.extend(self.retries.due(now));
        ended.extend(self.send_finishes(queued, now));
        self.grant_wanted(now);
        ended.extend(self.cache.tick(now));
        ended
    }

    /// An id for an operation that waits inside the store: one no Envoy call has.
    fn queued_claim_id(&mut self) -> CallId {
        self.last_parked = self.last_parked.wrapping_add(4);
        self.last_parked
    }
}

impl<C: Caller, K: Kv> Store for Etcd<C, K> {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>> {
        if let Some(reply) = self.cached(claim, now) {
            return Answer::Now(Ok(reply));
        }
        if self.asking(&claim.tuple) {
            let id = self.queued_claim_id();
            self.followers.push((id, *claim));
            return Answer::Later(id);
        }
        let step = if self.lately.finding() {
            Step::Read
        } else {
            Step::Create
        };
        claim_answer(self.advance(Op::first(claim, step), now))
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
        // Duplicates of one key share a read.
        if !far || self.asking(&claim.tuple) {
            return None;
        }
        let range = wire::range(&self.key(&claim.tuple));
        let op = Op::first(claim, Step::Read);
        let look = self.send(wire::RANGE, &range, op, Sent::Look, now);
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
        self.queued_finishes.push(op);
        Answer::Queued
    }

    fn tick(&mut self, now: Millis) -> Vec<Resumed> {
        let ended = self.tick_calls(now);
        self.release_followers(now);
        ended
    }

    /// This worker's queues and calls; the records are etcd's, and etcd's own metrics count them.
    fn levels(&mut self, _now: Millis) -> Vec<(Gauge, u64)> {
        let parked_claims = self
            .parked
            .iter()
            .filter(|p| matches!(p.op, Op::Claim { .. }));
        let claims = self.queued_claims.len() + parked_claims.count() + self.followers.len();
        let finishes = self.queued_finishes.len() + self.retries.finishes();
        let calls = self.pending.len() + self.batches.len() + self.grants.len();
        vec![
            (Gauge::EtcdClaimsQueued, claims as u64),
            (Gauge::EtcdFinishesQueued, finishes as u64),
            (Gauge::EtcdCallsInFlight, calls as u64),
        ]
    }

    /// The local copies' evictions are not the records' (etcd still holds those): dropped.
    fn take_evictions(&mut self) -> Vec<Millis> {
        self.cache.take_evictions();
        std::mem::take(&mut self.evictions)
    }

    fn remote(&mut self) -> Option<&mut dyn Remote> {
        Some(self)
    }
}

impl<C: Caller, K: Kv> Remote for Etcd<C, K> {
    fn resume(&mut self, call: CallId, response: CallResponse, now: Millis) -> Option<Resumed> {
        let resumed = self.resume_call(call, response, now);
        self.release_followers(now);
        resumed
    }

    /// Claims that wait while batches of claims have room, and finishes while none is in
    /// flight, go out as soon as the root context can send them: under load they gather while
    /// the calls before them are out, and a lone one never waits for a tick.
    fn wants_root(&self) -> bool {
        let claims = !self.queued_claims.is_empty() && self.claim_batches() < CLAIM_CALLS;
        claims || (!self.queued_finishes.is_empty() && self.finish_calls() == 0)
    }

    fn root_woke(&mut self, now: Millis) -> Vec<Resumed> {
        self.release_followers(now);
        self.send_queued_claims(now);
        if self.finish_calls() > 0 {
            return Vec::new();
        }
        let queued = std::mem::take(&mut self.queued_finishes);
        self.send_finishes(queued, now)
    }

    fn take_moved_on(&mut self) -> Vec<(CallId, Resumed)> {
        std::mem::take(&mut self.moved_on)
    }

    fn take_samples(&mut self) -> Vec<(Histogram, u64)> {
        std::mem::take(&mut self.samples)
    }
}

/// The calls of `calls` that `silent` says have gone unanswered too long.
fn silent_calls<V>(calls: &HashMap<CallId, V>, silent: impl Fn(&V) -> bool) -> Vec<CallId> {
    let silent = calls.iter().filter(|(_, value)| silent(value));
    silent.map(|(call, _)| *call).collect()
}
