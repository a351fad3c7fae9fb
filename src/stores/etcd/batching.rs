//! What goes out together: claims that wait while a worker's claim calls are out, finishes,
//! and claims of a key another claim is already asking about.

use super::ops::{claiming, went_out, Op, Pending, Sent};
use super::{wire, Etcd, CLAIM_CALLS, MAX_BATCH};
use crate::core::store::{CallId, CallResponse, Resumed, Store, StoreError};
use crate::core::Millis;
use crate::stores::{Caller, Kv};

/// Operations sent together, one nested transaction each, in one call.
pub(super) struct Batch {
    members: Vec<Member>,
    pub(super) since: Millis,
}

/// An operation of a batch: what it sent, and the id its request waits under (a finish's
/// request waits for none).
pub(super) struct Member {
    op: Op,
    sent: Sent,
    waiter: Option<CallId>,
}

/// The members of the next batch, with their requests.
#[derive(Default)]
pub(super) struct Batching {
    members: Vec<(Member, Vec<u8>)>,
    bytes: usize,
}

impl Batching {
    /// Whether an operation on `tuple` whose transaction is `len` bytes long joins this batch:
    /// etcd refuses a transaction that writes one key twice, or above `--max-request-bytes`,
    /// which `max_value_bytes` stays below.
    pub(super) fn fits(&self, tuple: &[u8; 32], len: usize, max_bytes: usize) -> bool {
        self.members.len() < MAX_BATCH
            && self.bytes + len <= max_bytes
            && !self
                .members
                .iter()
                .any(|(member, _)| member.op.tuple() == tuple)
    }

    pub(super) fn push(&mut self, member: Member, txn: Vec<u8>) {
        self.bytes += txn.len();
        self.members.push((member, txn));
    }
}

impl<C: Caller, K: Kv> Etcd<C, K> {
    /// Whether a claim of `tuple` (or a waiting request's read of it) is out or about to go.
    pub(super) fn asking(&self, tuple: &[u8; 32]) -> bool {
        let claims = |op: &Op| matches!(op, Op::Claim { .. }) && op.tuple() == tuple;
        self.pending.values().any(|p| claims(&p.op))
            || (self.batches.values()).any(|b| b.members.iter().any(|m| claims(&m.op)))
            || self.queued_claims.iter().any(|(_, op)| claims(op))
            || self.parked.iter().any(|p| claims(&p.op))
    }

    /// The followers whose tuple is no longer asked about ask now.
    pub(super) fn release_followers(&mut self, now: Millis) {
        for (id, claim) in std::mem::take(&mut self.followers) {
            if self.asking(&claim.tuple) {
                self.followers.push((id, claim));
                continue;
            }
            let answer = self.claim(&claim, now);
            self.moved_on.push((id, Resumed::Claim(answer)));
        }
    }

    /// Claim calls in flight: claims sent alone, and batches of claims.
    pub(super) fn claim_calls(&self) -> usize {
        let alone = self.pending.values().filter(|p| claiming(&p.sent)).count();
        alone + self.claim_batches()
    }

    pub(super) fn claim_batches(&self) -> usize {
        let batches = self.batches.values();
        batches
            .filter(|b| b.members.iter().any(|m| claiming(&m.sent)))
            .count()
    }

    /// Sends finishes (and revocations) together, as few transactions as etcd takes; the rest
    /// one by one. Returns those that ended at once.
    pub(super) fn send_finishes(&mut self, ops: Vec<Op>, now: Millis) -> Vec<Resumed> {
        let mut ended = Vec::new();
        let mut batching = Batching::default();
        for op in ops {
            match self.next_txn(op, now) {
                Ok((op, txn, Sent::Finish)) => {
                    let max_bytes = self.settings.max_value_bytes;
                    if !batching.fits(op.tuple(), txn.len(), max_bytes) {
                        let full = std::mem::take(&mut batching);
                        ended.extend(self.send_batch(full, now));
                    }
                    let sent = Sent::Finish;
                    batching.push(
                        Member {
                            op,
                            sent,
                            waiter: None,
                        },
                        txn,
                    );
                }
                Ok((op, txn, sent)) => {
                    ended.extend(went_out(self.send(wire::TXN, &txn, op, sent, now)))
                }
                Err(resumed) => ended.extend(went_out(resumed)),
            }
        }
        ended.extend(self.send_batch(batching, now));
        ended
    }

    /// Calls in flight that carry finishes.
    pub(super) fn finish_calls(&self) -> usize {
        let finishing = |sent: &Sent| matches!(sent, Sent::Finish);
        let alone = self.pending.values().filter(|p| finishing(&p.sent)).count();
        let batches = self.batches.values();
        alone
            + batches
                .filter(|b| b.members.iter().any(|m| finishing(&m.sent)))
                .count()
    }

    /// Sends the claims that waited, as few transactions as etcd takes, while fewer than
    /// `CLAIM_CALLS` batches of claims are in flight. Claims sent alone do not count here: a
    /// request that leaves takes its call with it, unanswered, and the claims after it must not
    /// wait for that. Claims that read first go in batches of their own, which etcd serves
    /// without a raft round.
    pub(super) fn send_queued_claims(&mut self, now: Millis) {
        while self.claim_batches() < CLAIM_CALLS && !self.queued_claims.is_empty() {
            let reading = self.queued_claims.first().is_some_and(|(_, op)| op.reads());
            let mut batching = Batching::default();
            let mut next = Vec::new();
            for (id, op) in std::mem::take(&mut self.queued_claims) {
                // A claim's request is small: only the count and the keys limit a batch.
                if op.reads() != reading || !batching.fits(op.tuple(), 0, usize::MAX) {
                    next.push((id, op));
                    continue;
                }
                match self.next_txn(op, now) {
                    Ok((op, message, sent)) => {
                        let waiter = Some(id);
                        batching.push(Member { op, sent, waiter }, message);
                    }
                    Err(resumed) => self.moved_on.push((id, resumed)),
                }
            }
            self.queued_claims = next;
            self.send_batch(batching, now);
        }
    }

    /// Sends what was gathered: one operation in a call of its own, several as one batch. What
    /// became of each at once goes to the request waiting under its id; the rest (finishes
    /// that ended at once) is returned.
    pub(super) fn send_batch(&mut self, batching: Batching, now: Millis) -> Vec<Resumed> {
        let mut members = batching.members;
        let sent: Vec<(Option<CallId>, Resumed)> = if members.len() <= 1 {
            let alone = members.pop().map(|(member, message)| {
                let method = member.sent.method();
                let resumed = self.send(method, &message, member.op, member.sent, now);
                (member.waiter, resumed)
            });
            alone.into_iter().collect()
        } else {
            self.send_together(members, now)
        };
        let mut ended = Vec::new();
        for (waiter, resumed) in sent {
            match waiter {
                Some(id) => self.moved_on.push((id, resumed)),
                None => ended.extend(went_out(resumed)),
            }
        }
        ended
    }

    /// Several operations in one call: what became of those that failed at once.
    pub(super) fn send_together(
        &mut self,
        members: Vec<(Member, Vec<u8>)>,
        now: Millis,
    ) -> Vec<(Option<CallId>, Resumed)> {
        let part = |(member, message): &(Member, Vec<u8>)| match member.sent {
            Sent::ReadFirst => wire::Part::Range(message.clone()),
            _ => wire::Part::Txn(message.clone()),
        };
        let parts: Vec<wire::Part> = members.iter().map(part).collect();
        let members = members.into_iter().map(|(member, _)| member);
        match self.dispatch(wire::TXN, &wire::batch(&parts), parts.len()) {
            Ok(call) => {
                let members = members.collect();
                self.batches.insert(
                    call,
                    Batch {
                        members,
                        since: now,
                    },
                );
                Vec::new()
            }
            Err(error) => members
                .map(|member| (member.waiter, self.fail(member.op, error.clone(), now)))
                .collect(),
        }
    }

    /// A batch's answer: each operation carries on as if it had gone alone, and its request
    /// hears of it under its own id. A batch etcd refused whole (a lease gone, too large, out of
    /// space) goes out again operation by operation, so that each meets its own answer.
    pub(super) fn batch_answered(
        &mut self,
        call: CallId,
        batch: Batch,
        response: CallResponse,
        now: Millis,
    ) {
        let answers = match response {
            Ok(message) => wire::batch_answer(&message, batch.members.len()),
            Err(failed) if wire::refused(&failed) => {
                for member in batch.members {
                    let resumed = self.send_one(member.op, now);
                    self.moved_on.push((member.waiter.unwrap_or(call), resumed));
                }
                return;
            }
            Err(failed) => Err(StoreError::Remote(format!("etcd answered {failed}"))),
        };
        let since = batch.since;
        let pending = |member: Member| {
            let waiter = member.waiter.unwrap_or(call);
            let (op, sent) = (member.op, member.sent);
            (waiter, Pending { op, sent, since })
        };
        match answers {
            Ok(answers) => {
                for (member, answer) in batch.members.into_iter().zip(answers) {
                    let (waiter, pending) = pending(member);
                    let resumed = self.carry_on(pending, answer, now);
                    self.moved_on.push((waiter, resumed));
                }
            }
            Err(error) => {
                for member in batch.members {
                    let (waiter, pending) = pending(member);
                    let resumed = self.call_failed(pending, error.clone(), true, now);
                    self.moved_on.push((waiter, resumed));
                }
            }
        }
    }
}
