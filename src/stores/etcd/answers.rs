//! What etcd's answers make of the operations that wait for them.

use super::ops::{claim_value, Op, Pending, Sent, Step};
use super::retry::RETRY_MILLIS;
use super::{value, wire, Etcd, MAX_ROUNDS};
use crate::core::lifecycle::{self, Claim, Decision, Ending, Finished, Verdict};
use crate::core::record::StoredResponse;
use crate::core::store::{
    Answer, CallId, CallResponse, ClaimReply, Handle, Replay, Resumed, StoreError, Ticket,
};
use crate::core::Millis;
use crate::stores::{Caller, Kv};
use wire::{Decoded, Txn};

impl<C: Caller, K: Kv> Etcd<C, K> {
    /// A call's answer, for [`Remote::resume`].
    pub(super) fn resume_call(
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
            self.send_queued_claims(now);
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
                let refused = wire::refused(&failed);
                let error = StoreError::Remote(format!("etcd answered {failed}"));
                self.call_failed(pending, error, !refused, now)
            }
        })
    }

    /// A call failed. If it was a claim's transaction and `maybe_applied`, etcd may still apply
    /// it: it is revoked (see the module). Then the operation fails as [`Etcd::fail`] says.
    pub(super) fn call_failed(
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
    pub(super) fn fail(&mut self, mut op: Op, error: StoreError, now: Millis) -> Resumed {
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

    /// A claim's read, or its transaction that failed: decide on the record etcd sent back.
    pub(super) fn decide_on(
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
        let (entry, response) = match value::decode(&value) {
            Ok(decoded) => decoded,
            Err(error) => {
                let error = StoreError::Unreadable(format!("etcd record: {error:?}"));
                return Resumed::Claim(Answer::Now(Err(error)));
            }
        };
        let reply = match lifecycle::decide(&entry, &claim, now) {
            Decision::Take => {
                return self.retry_claim(claim, rounds, Step::Takeover(revision), now)
            }
            Decision::Replay => match StoredResponse::decode(response, entry.token) {
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
            Decision::Block(block) => Verdict::Blocked(block),
        };
        Resumed::Claim(Answer::Now(Ok(reply)))
    }

    pub(super) fn retry_claim(
        &mut self,
        claim: Claim,
        rounds: u8,
        step: Step,
        now: Millis,
    ) -> Resumed {
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
    pub(super) fn on_answer(&mut self, pending: Pending, message: &[u8], now: Millis) -> Resumed {
        let decoded = match pending.sent {
            Sent::Look | Sent::ReadFirst => wire::range_answer(message).map(Decoded::Found),
            _ => wire::txn_answer(message).map(Decoded::Txn),
        };
        match decoded {
            Ok(decoded) => self.carry_on(pending, decoded, now),
            Err(error) => self.call_failed(pending, error, true, now),
        }
    }

    pub(super) fn carry_on(&mut self, pending: Pending, answer: Decoded, now: Millis) -> Resumed {
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
}

pub(super) fn claim_answer(resumed: Resumed) -> Answer<Result<ClaimReply, StoreError>> {
    match resumed {
        Resumed::Claim(answer) => answer,
        Resumed::Finish(_) | Resumed::Nothing => {
            Answer::Now(Err(StoreError::Remote("mixed-up operation".into())))
        }
    }
}
