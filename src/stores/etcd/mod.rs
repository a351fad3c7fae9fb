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
//! Every operation goes out as calls; their answers come back through [`Store::resume`].

mod batching;
#[cfg(test)]
pub(crate) mod fake;
mod leases;
mod retry;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

pub use wire::Method;

use crate::core::config::{Config, EtcdConfig};
use crate::core::lifecycle::{self, Claim, Ending, Finished, Room, Verdict};
use crate::core::metrics::{Gauge, Histogram};
use crate::core::record::{Bucket, Entry, State, StoredResponse, REMOTE_ENTRY_LEN};
use crate::core::store::{
    Answer, CallFailed, CallId, CallResponse, ClaimReply, Handle, Replay, Resumed, Store,
    StoreError, Ticket,
};
use crate::core::Millis;
use crate::stores::table::Table;
use crate::stores::{Caller, Kv};
use batching::Batch;
use leases::{LeaseKind, Leases};
use retry::{Retries, RETRY_MILLIS};
use std::collections::HashMap;
use wire::{Decoded, Txn};

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

/// What an operation is waiting for.
#[derive(Debug)]
enum Sent {
    /// A waiting request's read of the record.
    Look,
    /// A claim's read of the key, before it tries to create it.
    ReadFirst,
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
        step: Step,
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

/// What a claim asks etcd next.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Read the key: a claim's transaction is a raft write even when it only reads the record
    /// back, and a read is not, so while most claims find a record they read first.
    Read,
    /// Create the key if it is absent, else read it back.
    Create,
    /// Take over the expired record with this `mod_revision`.
    Takeover(u64),
}

/// Whether each of a worker's last 32 claims found a record when it first asked etcd.
#[derive(Default)]
struct Lately(u32);

impl Lately {
    fn push(&mut self, found: bool) {
        self.0 = self.0 << 1 | u32::from(found);
    }

    /// Three in four found one: then a read first costs etcd less than a claim's write, and
    /// first POSTs, which almost never find one, keep their single transaction.
    fn finding(&self) -> bool {
        self.0.count_ones() >= 24
    }
}

impl Op {
    fn first(claim: &Claim, step: Step) -> Op {
        Op::Claim {
            claim: *claim,
            rounds: 0,
            step,
        }
    }

    fn tuple(&self) -> &[u8; 32] {
        match self {
            Op::Claim { claim, .. } | Op::Finish { claim, .. } | Op::Revoke { claim, .. } => {
                &claim.tuple
            }
        }
    }

    /// Whether it is a claim that reads the key first.
    fn reads(&self) -> bool {
        matches!(
            self,
            Op::Claim {
                step: Step::Read,
                ..
            }
        )
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
        stored: 0,
    };
    entry.encode_remote(None)
}

struct Pending {
    op: Op,
    sent: Sent,
    since: Millis,
}

/// An operation waiting for a lease to be granted, under a call id of its own that no Envoy call
/// has (Envoy's ids are 0, 1 or 2 modulo 4): its request waits under that id.
struct Parked {
    id: CallId,
    kind: LeaseKind,
    op: Op,
}

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
    /// Claims waiting for a claim call to end, under ids of their own.
    waiting: Vec<(CallId, Op)>,
    last_parked: CallId,
    /// Parked operations that went on, under their ids, for [`Store::take_moved_on`].
    moved_on: Vec<(CallId, Resumed)>,
    queued: Vec<Op>,
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
    /// Call latencies and batch sizes, for [`Store::take_samples`].
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
            waiting: Vec::new(),
            last_parked: 3,
            moved_on: Vec::new(),
            queued: Vec::new(),
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
            let id = self.waiting_id();
            let resumed = later(&op, id);
            self.waiting.push((id, op));
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
                let value = claim_value(claim, now);
                match step {
                    Step::Read => (wire::range(&key), Sent::ReadFirst),
                    Step::Create => (wire::claim(&key, &value, lease, None), Sent::Create),
                    Step::Takeover(revision) => {
                        let message = wire::claim(&key, &value, lease, Some(*revision));
                        (message, Sent::Takeover)
                    }
                }
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

    /// A call's answer, for [`Store::resume`].
    fn resume_call(
        &mut self,
        call: CallId,
        response: CallResponse,
        now: Millis,
    ) -> Option<Resumed> {
        self.answered(call, true);
        if let Some(batch) = self.batches.remove(&call) {
            // Batches go out from the root context, so their answers come back to it: what
            // the claims that waited send now will not end with some request.
            self.batch_answered(call, batch, response, now);
            self.send_waiting(now);
            return Some(Resumed::Nothing);
        }
        if let Some((kind, window, _)) = self.grants.remove(&call) {
            let granted = match response {
                Ok(message) => wire::lease_answer(&message),
                Err(failed) => Err(StoreError::Remote(format!("etcd answered {failed}"))),
            };
            self.granted(kind, granted.map(|id| (window, id)), now);
            return Some(Resumed::Nothing);
        }
        let pending = self.pending.remove(&call)?;
        Some(match response {
            Ok(message) => self.on_answer(pending, &message, now),
            Err(failed) => {
                // A value etcd refuses as too large (its own limit, or gRPC's above it): keep
                // the record without its response.
                if let Op::Finish {
                    claim,
                    revision,
                    response: Some(_),
                    ..
                } = &pending.op
                {
                    if failed.message.contains("too large")
                        || failed.message.contains("larger than max")
                    {
                        let unstored = Ending::Unstored { no_room: false };
                        let op = self.finish_op(*claim, *revision, unstored, now);
                        return Some(self.advance(op, now));
                    }
                }
                let refused = failed.refused();
                let error = StoreError::Remote(format!("etcd answered {failed}"));
                self.call_failed(pending, error, !refused, now)
            }
        })
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
        self.send_waiting(now);
        let mut queued = std::mem::take(&mut self.queued);
        queued.extend(self.retries.due(now));
        ended.extend(self.send_finishes(queued, now));
        self.grant_wanted(now);
        ended.extend(self.cache.tick(now));
        ended
    }

    fn grant_backing_off(&self, now: Millis) -> bool {
        self.grant_failed_at
            .is_some_and(|failed| now < failed + GRANT_BACKOFF_MILLIS)
    }

    /// Grants the leases wanted now, one of each kind at a time: the current window's if an
    /// operation waits for it, else, in the second half of a window in which the kind was used,
    /// the next one's.
    fn grant_wanted(&mut self, now: Millis) {
        if self.grant_backing_off(now) {
            return;
        }
        for kind in LeaseKind::ALL {
            if self.grants.values().any(|(granting, ..)| *granting == kind) {
                continue;
            }
            let (window, late) = self.leases.window(kind, now);
            let window = if self.leases.granted(kind, window).is_none() {
                if !self.parked.iter().any(|parked| parked.kind == kind) {
                    continue;
                }
                window
            } else {
                // Granted by another worker, maybe.
                self.go_on(kind, now);
                let in_use = self.used[kind as usize] == Some(window);
                if !(late && in_use && self.leases.granted(kind, window + 1).is_none()) {
                    continue;
                }
                window + 1
            };
            let (_, length) = self.leases.shape(kind);
            match self.dispatch(wire::GRANT, &wire::grant(length), 1) {
                Ok(call) => {
                    self.grants.insert(call, (kind, window, now));
                }
                Err(error) => self.granted(kind, Err(error), now),
            }
        }
    }

    /// A grant of `kind` ended: the operations waiting for one go on, or fail with it.
    fn granted(&mut self, kind: LeaseKind, result: Result<(u64, i64), StoreError>, now: Millis) {
        match result {
            Ok((window, id)) => {
                self.grant_failures = 0;
                self.leases.remember(kind, window, id);
                self.go_on(kind, now);
            }
            Err(error) => {
                log::debug!("granting an etcd lease failed: {error}");
                self.grant_failures += 1;
                if self.grant_failures == 1 {
                    return;
                }
                self.grant_failed_at = Some(now);
                for parked in self.unpark(kind) {
                    let resumed = self.fail(parked.op, error.clone(), now);
                    self.moved_on.push((parked.id, resumed));
                }
            }
        }
    }

    /// The operations waiting for a lease of `kind` go on (a grant for the next window leaves
    /// them waiting again, for the current one's).
    fn go_on(&mut self, kind: LeaseKind, now: Millis) {
        for parked in self.unpark(kind) {
            let resumed = self.advance(parked.op, now);
            self.moved_on.push((parked.id, resumed));
        }
    }

    /// An id for an operation that waits inside the store: one no Envoy call has.
    fn waiting_id(&mut self) -> CallId {
        self.last_parked = self.last_parked.wrapping_add(4);
        self.last_parked
    }

    /// Keeps `op` until a lease of `kind` is granted (or its grant fails).
    fn park(&mut self, kind: LeaseKind, op: Op) -> Resumed {
        let id = self.waiting_id();
        let resumed = later(&op, id);
        self.parked.push(Parked { id, kind, op });
        resumed
    }

    fn unpark(&mut self, kind: LeaseKind) -> Vec<Parked> {
        let (unparked, still) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|parked| parked.kind == kind);
        self.parked = still;
        unparked
    }

    /// A claim's read, or its transaction that failed: decide on the record etcd sent back.
    fn decide_on(
        &mut self,
        claim: Claim,
        rounds: u8,
        existing: Option<(Vec<u8>, u64)>,
        now: Millis,
    ) -> Resumed {
        let Some((value, revision)) = existing else {
            // No record (or it went away between compare and read): claim again.
            return self.retry_claim(claim, rounds, Step::Create, now);
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
            Verdict::Claimed(_) => {
                return self.retry_claim(claim, rounds, Step::Takeover(revision), now)
            }
            Verdict::Replay(found) => match StoredResponse::decode(response, found.token) {
                Ok(response) => {
                    if let Err(error) = self.cache.remember(&claim, &response, entry.deadline, now)
                    {
                        log::warn!("caching a record locally failed: {error}");
                    }
                    Verdict::Replay(Replay {
                        response,
                        expires: entry.deadline,
                    })
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

    fn retry_claim(&mut self, claim: Claim, rounds: u8, step: Step, now: Millis) -> Resumed {
        if rounds >= MAX_ROUNDS {
            return Resumed::Claim(Answer::Now(Err(StoreError::Contended)));
        }
        let op = Op::Claim {
            claim,
            rounds: rounds + 1,
            step,
        };
        self.advance(op, now)
    }

    /// The answer to a call: decoded as what was sent expects, and the operation carried on.
    fn on_answer(&mut self, pending: Pending, message: &[u8], now: Millis) -> Resumed {
        let decoded = match pending.sent {
            Sent::Look | Sent::ReadFirst => wire::range_answer(message).map(Decoded::Found),
            _ => wire::txn_answer(message).map(Decoded::Txn),
        };
        match decoded {
            Ok(decoded) => self.carry_on(pending, decoded, now),
            Err(error) => self.call_failed(pending, error, true, now),
        }
    }

    fn carry_on(&mut self, pending: Pending, answer: Decoded, now: Millis) -> Resumed {
        match (pending.sent, pending.op, answer) {
            (Sent::Look, Op::Claim { claim, rounds, .. }, Decoded::Found(found)) => {
                self.decide_on(claim, rounds, found, now)
            }
            (Sent::ReadFirst, Op::Claim { claim, rounds, .. }, Decoded::Found(found)) => {
                self.lately.push(found.is_some());
                self.decide_on(claim, rounds, found, now)
            }
            (Sent::Create | Sent::Takeover, Op::Claim { claim, rounds, .. }, Decoded::Txn(txn)) => {
                if rounds == 0 {
                    self.lately.push(!txn.succeeded);
                }
                if txn.succeeded {
                    Resumed::Claim(Answer::Now(Ok(Verdict::Claimed(Ticket {
                        handle: Handle::Revision(txn.revision),
                        claim,
                    }))))
                } else {
                    self.decide_on(claim, rounds, txn.found, now)
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
                Decoded::Txn(Txn {
                    succeeded, found, ..
                }),
            ) => {
                // A finish sent again after an answer that never came may find that its earlier
                // attempt landed: its own value in place, or, for a release, the key gone.
                let landed = |found: Option<(Vec<u8>, u64)>| match (&value, found) {
                    (Some(value), Some((found, _))) => found == *value,
                    (None, None) => retried,
                    _ => false,
                };
                if !succeeded && !landed(found) {
                    return Resumed::Finish(Answer::Now(Ok(Finished::Lost)));
                }
                if let Some((response, expires)) = response {
                    if let Err(error) = self.cache.remember(&claim, &response, expires, now) {
                        log::warn!("caching a record locally failed: {error}");
                    }
                }
                Resumed::Finish(Answer::Now(Ok(recorded)))
            }
            (Sent::Revoke, op, Decoded::Txn(txn)) => {
                if txn.succeeded {
                    log::info!("revoked a claim whose answer was lost: its key is free again");
                } else if txn.found.is_none() {
                    // The lost transaction may still land.
                    self.retries.revoke_again(op, now);
                    return Resumed::Nothing;
                }
                // Else another claim holds the key: the lost one never landed, or is gone.
                self.retries.revoke_ended();
                Resumed::Nothing
            }
            (_, op, _) => self.fail(
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
            stored: now,
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
                if bytes.len() > self.settings.max_value_bytes {
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
                let value = entry(State::Held, now + claim.lease, 0).encode_remote(None);
                op(Some(value), LeaseKind::Claim, None)
            }
        }
    }

    /// The lease a record whose value is `written` bytes long goes under, and when it expires:
    /// its `ttl` within its organisation's share, else `lease` (an eviction at that age) unless
    /// its `ttl` is shorter. The claim's `ttl` and `lease` are at most the listener's, which
    /// the leases of their kinds last.
    fn record_lease(&mut self, claim: &Claim, written: usize, now: Millis) -> (LeaseKind, Millis) {
        let key =
            self.settings.key_prefix.len() + wire::RECORD_FORMAT.len() + 2 * claim.tuple.len();
        let bytes = (key + written) as u64;
        if self.leases.within_share(claim.org, bytes, now) {
            (LeaseKind::Record, now + claim.ttl)
        } else {
            let lives = claim.lease.min(claim.ttl);
            self.evictions.push(lives);
            (LeaseKind::Claim, now + lives)
        }
    }
}

impl<C: Caller, K: Kv> Store for Etcd<C, K> {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>> {
        if let Some(reply) = self.cached(claim, now) {
            return Answer::Now(Ok(reply));
        }
        if self.asking(&claim.tuple) {
            let id = self.waiting_id();
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
        self.queued.push(op);
        Answer::Queued
    }

    fn resume(&mut self, call: CallId, response: CallResponse, now: Millis) -> Option<Resumed> {
        let resumed = self.resume_call(call, response, now);
        self.release_followers(now);
        resumed
    }

    fn tick(&mut self, now: Millis) -> Vec<Resumed> {
        let ended = self.tick_calls(now);
        self.release_followers(now);
        ended
    }

    /// Claims that wait while batches of claims have room, and finishes while none is in
    /// flight, go out as soon as the root context can send them: under load they gather while
    /// the calls before them are out, and a lone one never waits for a tick.
    fn wants_root(&self) -> bool {
        let claims = !self.waiting.is_empty() && self.claim_batches() < CLAIM_CALLS;
        claims || (!self.queued.is_empty() && self.finish_calls() == 0)
    }

    fn root_woke(&mut self, now: Millis) -> Vec<Resumed> {
        self.release_followers(now);
        self.send_waiting(now);
        if self.finish_calls() > 0 {
            return Vec::new();
        }
        let queued = std::mem::take(&mut self.queued);
        self.send_finishes(queued, now)
    }

    fn take_moved_on(&mut self) -> Vec<(CallId, Resumed)> {
        std::mem::take(&mut self.moved_on)
    }

    fn take_samples(&mut self) -> Vec<(Histogram, u64)> {
        std::mem::take(&mut self.samples)
    }

    /// This worker's queues and calls; the records are etcd's, and etcd's own metrics count them.
    fn levels(&mut self, _now: Millis) -> Vec<(Gauge, u64)> {
        let parked_claims = self
            .parked
            .iter()
            .filter(|p| matches!(p.op, Op::Claim { .. }));
        let claims = self.waiting.len() + parked_claims.count() + self.followers.len();
        let finishes = self.queued.len() + self.retries.finishes();
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
}

fn claim_answer(resumed: Resumed) -> Answer<Result<ClaimReply, StoreError>> {
    match resumed {
        Resumed::Claim(answer) => answer,
        Resumed::Finish(_) | Resumed::Nothing => {
            Answer::Now(Err(StoreError::Remote("mixed-up operation".into())))
        }
    }
}

/// The calls of `calls` that `silent` says have gone unanswered too long.
fn silent_calls<V>(calls: &HashMap<CallId, V>, silent: impl Fn(&V) -> bool) -> Vec<CallId> {
    let silent = calls.iter().filter(|(_, value)| silent(value));
    silent.map(|(call, _)| *call).collect()
}

/// Whether a call with `sent` is a claim's.
fn claiming(sent: &Sent) -> bool {
    matches!(sent, Sent::ReadFirst | Sent::Create | Sent::Takeover)
}

/// What sending an operation ended, if anything: a finish sent (or waiting for its lease) is
/// heard of when etcd answers.
fn went_out(resumed: Resumed) -> Option<Resumed> {
    match resumed {
        Resumed::Finish(Answer::Later(_)) => None,
        other => Some(other),
    }
}

/// What an operation waiting for `call` gives its asker.
fn later(op: &Op, call: CallId) -> Resumed {
    match op {
        Op::Claim { .. } => Resumed::Claim(Answer::Later(call)),
        Op::Finish { .. } => Resumed::Finish(Answer::Later(call)),
        Op::Revoke { .. } => Resumed::Nothing,
    }
}

impl Sent {
    fn method(&self) -> Method {
        match self {
            Sent::Look | Sent::ReadFirst => wire::RANGE,
            _ => wire::TXN,
        }
    }
}
