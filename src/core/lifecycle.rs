//! The state machine of one record: what a claim finds ([`decide`], the one decision both stores
//! make, on a bucket's entries or etcd's value), what it writes ([`claimed`]), and how an attempt
//! ends ([`Ending`]). Stores apply them under their own atomicity (a compare-and-swap on a
//! bucket, a transaction in etcd); nothing here knows where the entries live.

use crate::core::identity::{Digest32, Fingerprint};
use crate::core::record::{Entry, State};
use crate::core::Millis;

/// A request asking for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub tuple: Digest32,
    pub fingerprint: Fingerprint,
    /// Unique per attempt: it proves ownership when the attempt ends.
    pub token: u64,
    pub lease: Millis,
    /// How long the record lives once complete: its route's `ttl`.
    pub ttl: Millis,
    /// The organisation's tag, whose share the record counts in.
    pub org: u16,
}

/// What a claim finds, wherever it is decided. `T` is what taking the record gives and `R` what
/// a replay carries: an entry of a bucket and where its response lies (here), a ticket and the
/// response itself (a store's answer, `ClaimReply` at the store boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<T, R> {
    /// This request owns the record now and goes upstream.
    Claimed(T),
    /// A complete record with the same fingerprint: its response is replayed.
    Replay(R),
    /// Neither: what stops this request from running or replaying now.
    Blocked(Block),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Same tuple, different fingerprint.
    Conflict,
    /// Same request, still running; the lease ends in `remaining`.
    InFlight { remaining: Millis },
    /// Same request, ended without a known outcome; held for `remaining`.
    Held { remaining: Millis },
    /// The work ran, but its response is not kept.
    Unstored,
    /// No entry free for this tuple.
    Full,
    /// The organisation holds its share of the store, and none of its records could make way.
    QuotaExceeded,
}

/// What a claim finds in one record's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No live record of this request's tuple: the claim may take the entry.
    Take,
    /// A complete record with the same fingerprint: its response is replayed.
    Replay,
    /// What stops this request from running or replaying now.
    Block(Block),
}

/// Where a replay is decided: what `claim` finds in `entry` at `now`.
pub fn decide(entry: &Entry, claim: &Claim, now: Millis) -> Decision {
    if !entry.is_live(now) || entry.tuple != claim.tuple {
        return Decision::Take;
    }
    if entry.fingerprint != claim.fingerprint {
        return Decision::Block(Block::Conflict);
    }
    let remaining = entry.deadline - now;
    match entry.state {
        State::InFlight => Decision::Block(Block::InFlight { remaining }),
        State::Held => Decision::Block(Block::Held { remaining }),
        State::Complete => Decision::Replay,
        State::Unstored | State::Empty | State::Sweeping => Decision::Block(Block::Unstored),
    }
}

/// The entry a claim writes: in flight, its lease ending at `now` + the claim's lease.
pub fn claimed(claim: &Claim, now: Millis) -> Entry {
    Entry {
        state: State::InFlight,
        tuple: claim.tuple,
        fingerprint: claim.fingerprint,
        token: claim.token,
        deadline: now.saturating_add(claim.lease.max(1)),
        response_len: 0,
        org: claim.org,
        stored: 0,
    }
}

impl<T, R> Verdict<T, R> {
    /// Whether the verdict changed the bucket (and so must be written back).
    pub fn writes(&self) -> bool {
        matches!(self, Verdict::Claimed(_))
    }
}

/// How an owner's attempt ended, and so what its record becomes. `R` is the response where it is
/// carried: the response itself (the exchange to a store), its length (a bucket's entry), or
/// nothing (a store's answer, [`Finished`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<R> {
    /// The response is kept for `ttl`, and replayed to duplicates.
    Stored(R),
    /// The work ran but its response is not kept: too large, or (`no_room`) no room for it.
    Unstored { no_room: bool },
    /// The outcome is known not to need keeping (not stored, or never reached the upstream).
    Released,
    /// The outcome is unknown: the claim is held until its lease ends.
    Held,
}

/// How a finish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The record now says this.
    Recorded(Ending<()>),
    /// The entry is no longer this claim's (its lease ended and another request took it).
    Lost,
}

impl<R> Ending<R> {
    /// The ending without what it carries, as recorded.
    pub fn recorded(&self) -> Finished {
        Finished::Recorded(match self {
            Ending::Stored(_) => Ending::Stored(()),
            Ending::Unstored { no_room } => Ending::Unstored { no_room: *no_room },
            Ending::Released => Ending::Released,
            Ending::Held => Ending::Held,
        })
    }
}
