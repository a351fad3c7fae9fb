//! What an operation is, what it waits for, and what a claim asks etcd next.

use super::leases::LeaseKind;
use super::value;
use super::wire::{self, Method};
use crate::core::lifecycle::{self, Claim, Finished};
use crate::core::record::StoredResponse;
use crate::core::store::{Answer, CallId, Resumed};
use crate::core::Millis;

/// What an operation is waiting for.
#[derive(Debug)]
pub(super) enum Sent {
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
pub(super) enum Op {
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
pub(super) enum Step {
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
pub(super) struct Lately(u32);

impl Lately {
    pub(super) fn push(&mut self, found: bool) {
        self.0 = self.0 << 1 | u32::from(found);
    }

    /// Three in four found one: then a read first costs etcd less than a claim's write, and
    /// first POSTs, which almost never find one, keep their single transaction.
    pub(super) fn finding(&self) -> bool {
        self.0.count_ones() >= 24
    }
}

impl Op {
    pub(super) fn first(claim: &Claim, step: Step) -> Op {
        Op::Claim {
            claim: *claim,
            rounds: 0,
            step,
        }
    }

    pub(super) fn tuple(&self) -> &[u8; 32] {
        match self {
            Op::Claim { claim, .. } | Op::Finish { claim, .. } | Op::Revoke { claim, .. } => {
                &claim.tuple
            }
        }
    }

    /// Whether it is a claim that reads the key first.
    pub(super) fn reads(&self) -> bool {
        matches!(
            self,
            Op::Claim {
                step: Step::Read,
                ..
            }
        )
    }

    /// What keeping it to send again costs: its value and the response kept to cache.
    pub(super) fn retry_bytes(&self) -> usize {
        match self {
            Op::Claim { .. } => 0,
            Op::Finish { value, .. } => value.as_ref().map_or(0, Vec::len) * 2,
            Op::Revoke { value, .. } => value.len(),
        }
    }
}

/// What a claim writes: an entry in flight until `now` + its lease.
pub(super) fn claim_value(claim: &Claim, now: Millis) -> Vec<u8> {
    value::encode(&lifecycle::claimed(claim, now), None)
}

pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) sent: Sent,
    pub(super) since: Millis,
}

/// An operation waiting for a lease to be granted, under a call id of its own that no Envoy call
/// has (Envoy's ids are 0, 1 or 2 modulo 4): its request waits under that id.
pub(super) struct Parked {
    pub(super) id: CallId,
    pub(super) kind: LeaseKind,
    pub(super) op: Op,
}

impl Sent {
    pub(super) fn method(&self) -> Method {
        match self {
            Sent::Look | Sent::ReadFirst => wire::RANGE,
            _ => wire::TXN,
        }
    }
}

/// Whether a call with `sent` is a claim's.
pub(super) fn claiming(sent: &Sent) -> bool {
    matches!(sent, Sent::ReadFirst | Sent::Create | Sent::Takeover)
}

/// What sending an operation ended, if anything: a finish sent (or waiting for its lease) is
/// heard of when etcd answers.
pub(super) fn went_out(resumed: Resumed) -> Option<Resumed> {
    match resumed {
        Resumed::Finish(Answer::Later(_)) => None,
        other => Some(other),
    }
}

/// What an operation waiting for `call` gives its asker.
pub(super) fn later(op: &Op, call: CallId) -> Resumed {
    match op {
        Op::Claim { .. } => Resumed::Claim(Answer::Later(call)),
        Op::Finish { .. } => Resumed::Finish(Answer::Later(call)),
        Op::Revoke { .. } => Resumed::Nothing,
    }
}
