//! The boundary between the request's state machine and where records live.
//!
//! A store answers each operation either now or later: Envoy's shared data answers at once, a
//! remote store (etcd through `dispatch_grpc_call`) answers in a callback. The exchange is written
//! against [`Answer`], so either kind drives it without change.

use crate::core::lifecycle::{Claim, Ending, Finished, Verdict};
use crate::core::metrics::{Gauge, Histogram};
use crate::core::record::StoredResponse;
use crate::core::Millis;
use std::fmt;

/// Identifies a call a remote store made; its answer is handed to [`Store::resume`].
pub type CallId = u32;

/// An answer that is here now, or will come later.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<T> {
    Now(T),
    /// The answer comes with the response to this call, from whichever context made it.
    Later(CallId),
    /// The operation waits for the next tick, to be carried out from the root context (it must
    /// outlive the request that asked for it).
    Queued,
}

/// Proof of ownership of a claimed record, handed back when the attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub handle: Handle,
    pub claim: Claim,
}

/// Where a claim lives, in the store that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handle {
    /// An entry of the shared-data table, and when the claim's lease on it ends.
    Entry { slot: u64, lease_ends: Millis },
    /// The revision etcd gave the claim's key.
    Revision(u64),
}

/// A remote store's call answered: its message, or why it has none.
pub type CallResponse = Result<Vec<u8>, CallFailed>;

/// A call that ended without an answer, with its gRPC status: etcd's refusal, or Envoy's own
/// (no connection, a reset, the timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailed {
    pub status: u32,
    pub message: String,
}

impl fmt::Display for CallFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gRPC status {}: {}", self.status, self.message)
    }
}

/// What resuming an operation with its call's response gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Resumed {
    Claim(Answer<Result<ClaimReply, StoreError>>),
    Finish(Answer<Result<Finished, StoreError>>),
    /// Work of the store's own, which no request waits for, went on or ended.
    Nothing,
}

/// A store's answer to a claim: the ticket to the record, or the response to replay.
pub type ClaimReply = Verdict<Ticket, Replay>;

/// A complete record found: its stored response, and when the record expires (which, against
/// the route's `ttl`, tells how old it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub response: StoredResponse,
    pub expires: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The host refused an operation.
    Host(String),
    /// The remote store answered with an error, or not at all.
    Remote(String),
    /// A record in a format this filter does not know (written by a newer version).
    Unreadable(String),
    /// Other writers kept winning the compare-and-swap.
    Contended,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Host(what) => write!(f, "store host error: {what}"),
            StoreError::Remote(what) => write!(f, "remote store error: {what}"),
            StoreError::Unreadable(what) => write!(f, "unreadable record: {what}"),
            StoreError::Contended => f.write_str("store contended: compare-and-swap kept failing"),
        }
    }
}

/// What both stores do: claim, poll for a waiting duplicate, finish, and the root context's tick.
pub trait Store {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>>;

    /// Asks again for a request waiting for `claim`'s original. A store whose every question
    /// is a call answers from what this Envoy holds unless `far`; `None`: nothing new yet.
    fn poll(
        &mut self,
        claim: &Claim,
        _far: bool,
        now: Millis,
    ) -> Option<Answer<Result<ClaimReply, StoreError>>> {
        Some(self.claim(claim, now))
    }

    fn finish(
        &mut self,
        ticket: Ticket,
        ending: Ending<StoredResponse>,
        now: Millis,
    ) -> Answer<Result<Finished, StoreError>>;

    /// Periodic work from the root context; returns operations that ended without a call.
    fn tick(&mut self, now: Millis) -> Vec<Resumed>;

    /// How long each record evicted since the last call had been stored.
    fn take_evictions(&mut self) -> Vec<Millis>;

    /// The store's gauges, asked once a second from the root context: whole-process levels
    /// ([`Gauge::is_whole`]) and this worker's part of the others.
    fn levels(&mut self, now: Millis) -> Vec<(Gauge, u64)>;

    /// The store's part that makes calls, if its operations go out as calls (etcd).
    fn remote(&mut self) -> Option<&mut dyn Remote> {
        None
    }
}

/// What a store whose operations go out as calls adds: their answers, what goes on without a
/// request, and what it sends from the root context.
pub trait Remote {
    /// A call made for an operation was answered; `None` if the call is not this store's.
    fn resume(&mut self, call: CallId, response: CallResponse, now: Millis) -> Option<Resumed>;

    /// Whether operations wait for the root context to send them now, rather than on its next
    /// tick: the worker then wakes it, and calls [`Remote::root_woke`] there.
    fn wants_root(&self) -> bool;

    /// Sends, from the root context, what waits for it; returns operations that ended without
    /// a call.
    fn root_woke(&mut self, now: Millis) -> Vec<Resumed>;

    /// Operations that waited inside the store (for another's call) and have since gone on, each
    /// under the call id it gave its asker: asked after every [`Remote::resume`] and tick.
    fn take_moved_on(&mut self) -> Vec<(CallId, Resumed)>;

    /// What the store measured of its calls since the last call.
    fn take_samples(&mut self) -> Vec<(Histogram, u64)>;
}
