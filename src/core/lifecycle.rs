//! The state machine of one record, as pure functions from (current entries, request, now) to
//! (verdict, new entries). Stores apply them under their own atomicity (a compare-and-swap on a
//! bucket, a transaction on a remote store); nothing here knows where the entries live.

use crate::core::identity::Digest32;
use crate::core::record::{Bucket, Entry, State, BUCKET_ENTRIES};
use crate::core::Millis;

/// A request asking for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub tuple: Digest32,
    pub fingerprint: Digest32,
    /// Unique per attempt: it proves ownership when the attempt ends.
    pub token: u64,
    pub lease: Millis,
    /// The organisation's tag, whose share the record counts in.
    pub org: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This request owns the record now and goes upstream. `displaced` is the record that held
    /// the entry before (expired, or evicted to make room), whose share and bytes must be given
    /// back.
    Claimed {
        slot: usize,
        displaced: Option<Displaced>,
    },
    /// A complete record with the same fingerprint: replay the response at `slot`.
    Replay { slot: usize, token: u64, len: u32 },
    /// Same tuple, different fingerprint.
    Conflict,
    /// Same request, still running; the lease ends in `remaining`.
    InFlight { remaining: Millis },
    /// Same request, ended without a known outcome; held for `remaining`.
    Held { remaining: Millis },
    /// The work ran, but its response was too large to keep.
    NotStored,
    /// No entry free for this tuple.
    Full,
}

/// A record that gave up its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Displaced {
    pub entry: Entry,
    /// Live when it went: evicted before its TTL to make room.
    pub evicted: bool,
}

impl Verdict {
    /// Whether the verdict changed the bucket (and so must be written back).
    pub fn writes(&self) -> bool {
        matches!(self, Verdict::Claimed { .. })
    }
}

/// Where a claim may take an entry: the first `usable` of the bucket (the table's last bucket
/// may be partly beyond its capacity), and whether a full bucket evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub usable: usize,
    pub evict: bool,
}

/// Looks the claim up in a bucket and, where nothing live matches, takes an entry: an empty one,
/// else an expired one, else (if `evict`) the bucket's completed record nearest its expiry.
pub fn claim(bucket: &mut Bucket, claim: &Claim, room: Room, now: Millis) -> Verdict {
    if let Some((slot, entry)) = bucket
        .entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.is_live(now) && e.tuple == claim.tuple)
    {
        if entry.fingerprint != claim.fingerprint {
            return Verdict::Conflict;
        }
        let remaining = entry.deadline - now;
        return match entry.state {
            State::InFlight => Verdict::InFlight { remaining },
            State::Held => Verdict::Held { remaining },
            State::Complete => Verdict::Replay {
                slot,
                token: entry.token,
                len: entry.response_len,
            },
            State::Unstored | State::Empty | State::Sweeping => Verdict::NotStored,
        };
    }
    let usable = room.usable.min(BUCKET_ENTRIES);
    let entries = &bucket.entries[..usable];
    // Empty entries first: taking an expired one costs giving its share and bytes back.
    let free = entries
        .iter()
        .position(|e| e.state == State::Empty)
        .or_else(|| entries.iter().position(|e| !e.is_live(now)))
        .or_else(|| {
            room.evict
                .then(|| victim(bucket, usable, now, |_| true))
                .flatten()
        });
    let Some(slot) = free else {
        return Verdict::Full;
    };
    let previous = bucket.entries[slot];
    bucket.entries[slot] = Entry {
        state: State::InFlight,
        tuple: claim.tuple,
        fingerprint: claim.fingerprint,
        token: claim.token,
        deadline: now.saturating_add(claim.lease.max(1)),
        response_len: 0,
        org: claim.org,
    };
    let displaced = previous.state.is_record().then_some(Displaced {
        entry: previous,
        evicted: previous.is_live(now),
    });
    Verdict::Claimed { slot, displaced }
}

/// The completed record nearest its expiry among the first `usable` entries that `which`
/// accepts: the one to evict. Claims in flight and held claims are never evicted.
pub fn victim(
    bucket: &Bucket,
    usable: usize,
    now: Millis,
    which: impl Fn(&Entry) -> bool,
) -> Option<usize> {
    bucket.entries[..usable.min(BUCKET_ENTRIES)]
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            matches!(e.state, State::Complete | State::Unstored) && e.is_live(now) && which(e)
        })
        .min_by_key(|(_, e)| e.deadline)
        .map(|(slot, _)| slot)
}

/// How an attempt ended, as the owner reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The response is stored under the claim's token, `len` bytes; kept for `ttl`.
    Stored { len: u32, ttl: Millis },
    /// The work ran but its response is not kept; later duplicates learn that.
    Unstored { ttl: Millis },
    /// The outcome is known not to need keeping (not stored, or never reached the upstream).
    Released,
    /// The outcome is unknown: keep the claim until its lease ends.
    Held,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Done,
    /// The entry is no longer this claim's (its lease ended and another request took it).
    Lost,
}

/// Applies an ending to the entry at `slot`, if it is still this claim's.
pub fn finish(bucket: &mut Bucket, slot: usize, token: u64, ending: Ending, now: Millis) -> Finish {
    let Some(entry) = bucket.entries.get_mut(slot) else {
        return Finish::Lost;
    };
    if entry.state != State::InFlight || entry.token != token || entry.deadline <= now {
        return Finish::Lost;
    }
    match ending {
        Ending::Stored { len, ttl } => {
            entry.state = State::Complete;
            entry.deadline = now.saturating_add(ttl);
            entry.response_len = len;
        }
        Ending::Unstored { ttl } => {
            entry.state = State::Unstored;
            entry.deadline = now.saturating_add(ttl);
        }
        Ending::Released => *entry = Entry::EMPTY,
        Ending::Held => entry.state = State::Held,
    }
    Finish::Done
}

/// Expired entries the sweeper gives back: records past their deadline (their share, and a
/// complete one's response bytes), and sweeps that never ended.
fn is_reclaimable(entry: &Entry, now: Millis) -> bool {
    entry.state != State::Empty && !entry.is_live(now)
}

pub fn reclaimable(bucket: &Bucket, now: Millis) -> impl Iterator<Item = usize> + '_ {
    bucket
        .entries
        .iter()
        .enumerate()
        .filter(move |(_, e)| is_reclaimable(e, now))
        .map(|(slot, _)| slot)
}

/// Takes the record at `slot` out of the table for the sweeper or an eviction, and returns what
/// the entry held. A complete record's entry is held as `Sweeping` until `until`, so that nobody
/// writes a response there while its response is cleared; any other entry is emptied at once.
pub fn take(bucket: &mut Bucket, slot: usize, token: u64, until: Millis) -> Entry {
    let entry = &mut bucket.entries[slot];
    let taken = *entry;
    *entry = if taken.state == State::Complete {
        Entry {
            state: State::Sweeping,
            token,
            deadline: until,
            ..Entry::EMPTY
        }
    } else {
        Entry::EMPTY
    };
    taken
}

/// Ends a sweep `take` began, if the entry is still the sweeper's.
pub fn end_sweep(bucket: &mut Bucket, slot: usize, token: u64) -> bool {
    match bucket.entries.get_mut(slot) {
        Some(entry) if entry.state == State::Sweeping && entry.token == token => {
            *entry = Entry::EMPTY;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Millis = 60_000;
    const TTL: Millis = 86_400_000;

    fn request(tuple: u8, fingerprint: u8, token: u64) -> Claim {
        Claim {
            tuple: [tuple; 32],
            fingerprint: [fingerprint; 32],
            token,
            lease: LEASE,
            org: 1,
        }
    }

    /// A claim in a store that does not evict.
    fn claim_in(bucket: &mut Bucket, request: &Claim, usable: usize, now: Millis) -> Verdict {
        let room = Room {
            usable,
            evict: false,
        };
        claim(bucket, request, room, now)
    }

    fn claimed_slot(verdict: Verdict) -> usize {
        match verdict {
            Verdict::Claimed { slot, .. } => slot,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn the_first_request_claims_and_a_duplicate_sees_it_in_flight() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(
            &mut bucket,
            &request(1, 1, 10),
            BUCKET_ENTRIES,
            1000,
        ));
        assert_eq!(bucket.entries[slot].state, State::InFlight);
        assert_eq!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 1500),
            Verdict::InFlight {
                remaining: LEASE - 500
            }
        );
    }

    #[test]
    fn a_different_fingerprint_conflicts_in_flight_and_complete() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 11), BUCKET_ENTRIES, 1),
            Verdict::Conflict
        );
        let stored = Ending::Stored { len: 5, ttl: TTL };
        assert_eq!(finish(&mut bucket, slot, 10, stored, 2), Finish::Done);
        let before = bucket.clone();
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 12), BUCKET_ENTRIES, 3),
            Verdict::Conflict
        );
        assert_eq!(bucket, before, "a conflict leaves the record untouched");
    }

    #[test]
    fn a_complete_record_replays_until_its_ttl() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(
            &mut bucket,
            slot,
            10,
            Ending::Stored { len: 99, ttl: TTL },
            100,
        );
        assert_eq!(
            claim_in(
                &mut bucket,
                &request(1, 1, 11),
                BUCKET_ENTRIES,
                100 + TTL - 1
            ),
            Verdict::Replay {
                slot,
                token: 10,
                len: 99
            }
        );
        assert!(
            matches!(
                claim_in(&mut bucket, &request(1, 1, 12), BUCKET_ENTRIES, 100 + TTL),
                Verdict::Claimed { .. }
            ),
            "past the TTL the work runs again"
        );
    }

    #[test]
    fn taking_an_expired_record_gives_its_bytes_back() {
        let mut bucket = Bucket::empty();
        for n in 0..BUCKET_ENTRIES as u8 {
            let slot = claimed_slot(claim_in(
                &mut bucket,
                &request(n, 0, u64::from(n)),
                BUCKET_ENTRIES,
                0,
            ));
            finish(
                &mut bucket,
                slot,
                u64::from(n),
                Ending::Stored { len: 99, ttl: 10 },
                0,
            );
        }
        let verdict = claim_in(&mut bucket, &request(200, 0, 99), BUCKET_ENTRIES, 10);
        let Verdict::Claimed {
            displaced: Some(displaced),
            ..
        } = verdict
        else {
            panic!("expected a claim over an expired record, got {verdict:?}");
        };
        assert_eq!(displaced.entry.response_len, 99);
        assert!(!displaced.evicted, "an expired record is not evicted");
    }

    #[test]
    fn a_released_claim_lets_the_next_request_run() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        assert_eq!(
            finish(&mut bucket, slot, 10, Ending::Released, 5),
            Finish::Done
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 6),
            Verdict::Claimed { .. }
        ));
    }

    #[test]
    fn a_held_claim_answers_in_progress_until_its_lease_ends() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(&mut bucket, slot, 10, Ending::Held, 1000);
        assert_eq!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 1000),
            Verdict::Held {
                remaining: LEASE - 1000
            }
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 12), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed { .. }
        ));
    }

    #[test]
    fn a_claim_whose_owner_vanished_expires_with_its_lease() {
        let mut bucket = Bucket::empty();
        claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed { .. }
        ));
    }

    #[test]
    fn an_owner_past_its_lease_cannot_finish_over_a_newer_claim() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        let taken = claimed_slot(claim_in(
            &mut bucket,
            &request(1, 1, 11),
            BUCKET_ENTRIES,
            LEASE + 1,
        ));
        let stored = Ending::Stored { len: 1, ttl: TTL };
        assert_eq!(
            finish(&mut bucket, slot, 10, stored, LEASE + 2),
            Finish::Lost
        );
        assert_eq!(bucket.entries[taken].token, 11);
        assert_eq!(bucket.entries[taken].state, State::InFlight);
    }

    #[test]
    fn an_unstored_record_is_kept_for_the_ttl_without_its_response() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(&mut bucket, slot, 10, Ending::Unstored { ttl: TTL }, 10);
        assert_eq!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 20),
            Verdict::NotStored
        );
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 11), BUCKET_ENTRIES, 20),
            Verdict::Conflict
        );
    }

    #[test]
    fn a_full_bucket_refuses_new_tuples_but_serves_its_own() {
        let mut bucket = Bucket::empty();
        for n in 0..BUCKET_ENTRIES as u8 {
            claimed_slot(claim_in(
                &mut bucket,
                &request(n, 0, u64::from(n)),
                BUCKET_ENTRIES,
                0,
            ));
        }
        assert_eq!(
            claim_in(&mut bucket, &request(200, 0, 99), BUCKET_ENTRIES, 1),
            Verdict::Full
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(3, 0, 99), BUCKET_ENTRIES, 1),
            Verdict::InFlight { .. }
        ));
        assert!(matches!(
            claim_in(&mut bucket, &request(200, 0, 99), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed { .. }
        ));
    }

    #[test]
    fn entries_past_the_usable_ones_are_never_taken() {
        let mut bucket = Bucket::empty();
        for n in 0..4u8 {
            claimed_slot(claim_in(&mut bucket, &request(n, 0, u64::from(n)), 4, 0));
        }
        assert_eq!(
            claim_in(&mut bucket, &request(9, 0, 9), 4, 1),
            Verdict::Full
        );
    }

    #[test]
    fn expired_complete_entries_are_reclaimable() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(
            &mut bucket,
            slot,
            10,
            Ending::Stored { len: 7, ttl: 100 },
            0,
        );
        assert_eq!(reclaimable(&bucket, 99).count(), 0);
        assert_eq!(reclaimable(&bucket, 100).collect::<Vec<_>>(), [slot]);
    }
}
