//! The boundary between the request's state machine and where records live.
//!
//! A store answers each operation either now or later: Envoy's shared data answers at once, a
//! remote store (etcd through `dispatch_http_call`) answers in a callback. The exchange is written
//! against [`Answer`], so either kind drives it without change.

use crate::config::Millis;
use crate::decide::Claim;
use crate::record::StoredResponse;
use std::fmt;

/// An answer that is here now, or will be delivered to the exchange by a callback.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<T> {
    Now(T),
    Later,
}

/// Proof of ownership of a claimed record, handed back when the attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub slot: u64,
    pub token: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ClaimReply {
    Claimed(Ticket),
    Replay(StoredResponse),
    Conflict,
    InFlight { remaining: Millis },
    Held { remaining: Millis },
    NotStored,
    Full,
}

/// How the owner's attempt ended, with what the store needs to record it.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep this response for the TTL.
    Store(StoredResponse),
    /// The work ran; its response is too large to keep.
    TooLarge,
    Release,
    Hold,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FinishReply {
    Stored,
    /// The record is kept for the TTL without its response (too large, or no bytes left).
    StoredWithoutResponse {
        store_full: bool,
    },
    Released,
    Held,
    /// The claim's lease had ended and the record is no longer ours: nothing was written.
    Lost,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The host refused an operation.
    Host(String),
    /// A record in a format this filter does not know (written by a newer version).
    Unreadable(String),
    /// Other writers kept winning the compare-and-swap.
    Contended,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Host(what) => write!(f, "store host error: {what}"),
            StoreError::Unreadable(what) => write!(f, "unreadable record: {what}"),
            StoreError::Contended => f.write_str("store contended: compare-and-swap kept failing"),
        }
    }
}

pub trait Store {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>>;

    fn finish(
        &mut self,
        ticket: Ticket,
        outcome: Outcome,
        now: Millis,
    ) -> Answer<Result<FinishReply, StoreError>>;
}

/// A key-value map with compare-and-swap: Envoy's shared data, as the host really behaves.
/// `set` with `cas: None` always writes; with `Some(cas)` it writes only if the key's current
/// CAS matches — and always if the key is absent.
pub trait Kv {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}
