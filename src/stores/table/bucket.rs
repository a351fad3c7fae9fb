//! A bucket: the entries of up to [`BUCKET_ENTRIES`] records under one shared-data key, written
//! by one compare-and-swap; and what a claim, a finish, an eviction and the sweeper do to it.

use crate::core::lifecycle::{self, Block, Claim, Decision, Ending, Finished, Verdict};
use crate::core::record::{check_header, DecodeError, Entry, Reader, State, ENTRY_LEN, HEADER_LEN};
use crate::core::Millis;

pub const BUCKET_ENTRIES: usize = 16;
const BUCKET_MAGIC: [u8; 2] = *b"IB";
/// Version 2 added each entry's organisation tag; version 3 holds a 16-byte fingerprint
/// (XXH3-128) where version 2 held a SHA-256: an old fingerprint is never compared with a new.
/// Version 4 adds when each record was stored: records of routes with other `ttl`s sit side by
/// side, so a record's age can no longer be told from its deadline.
const BUCKET_VERSION: u8 = 4;
/// An entry in a bucket: the entry, its organisation's tag and when it was stored.
const BUCKET_ENTRY_LEN: usize = ENTRY_LEN + 2 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub entries: [Entry; BUCKET_ENTRIES],
}

impl Bucket {
    pub fn empty() -> Bucket {
        Bucket {
            entries: [Entry::EMPTY; BUCKET_ENTRIES],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + BUCKET_ENTRIES * BUCKET_ENTRY_LEN);
        out.extend_from_slice(&BUCKET_MAGIC);
        out.push(BUCKET_VERSION);
        out.push(BUCKET_ENTRIES as u8);
        for entry in &self.entries {
            entry.encode_into(&mut out);
            out.extend_from_slice(&entry.org.to_le_bytes());
            out.extend_from_slice(&entry.stored.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Bucket, DecodeError> {
        let mut reader = Reader::new(bytes);
        check_header(&mut reader, BUCKET_MAGIC, BUCKET_VERSION)?;
        if usize::from(reader.u8()?) != BUCKET_ENTRIES
            || bytes.len() != HEADER_LEN + BUCKET_ENTRIES * BUCKET_ENTRY_LEN
        {
            return Err(DecodeError::Malformed);
        }
        let mut bucket = Bucket::empty();
        for entry in bucket.entries.iter_mut() {
            *entry = Entry::read(&mut reader)?;
            entry.org = reader.u16()?;
            entry.stored = reader.u64()?;
        }
        Ok(bucket)
    }
}

/// The entry a claim took in a bucket, and the record that held it before (expired, or evicted
/// to make room), whose share and bytes must be given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub slot: usize,
    /// When the claim's lease ends.
    pub lease_ends: Millis,
    pub displaced: Option<Displaced>,
}

/// A complete record's entry in a bucket: its response lies under `token`, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub slot: usize,
    pub token: u64,
    pub len: u32,
    pub expires: Millis,
}

/// A record that gave up its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Displaced {
    pub entry: Entry,
    /// Live when it went: evicted before its TTL to make room.
    pub evicted: bool,
}

/// Where a claim may take an entry: the first `usable` of the bucket (the table's last bucket
/// may be partly beyond its capacity), and whether a full bucket evicts: `Some(grace)` evicts
/// only a record that [`evictable`] says has been stored long enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub usable: usize,
    pub evict: Option<Millis>,
}

/// Whether a completed record may be evicted: once stored `grace` ago, or half its own `ttl`
/// if that is less, so that a record stored a moment ago, whose client may be retrying now, is
/// never the one to go.
pub fn evictable(entry: &Entry, grace: Millis, now: Millis) -> bool {
    let ttl = entry.deadline.saturating_sub(entry.stored);
    now.saturating_sub(entry.stored) >= grace.min(ttl / 2)
}

/// Looks the claim up in a bucket and, where nothing live matches, takes an entry: an empty one,
/// else an expired one, else (if `evict`) the bucket's completed record nearest its expiry.
pub fn claim(bucket: &mut Bucket, claim: &Claim, room: Room, now: Millis) -> Verdict<Taken, Found> {
    for (slot, entry) in bucket.entries.iter().enumerate() {
        match lifecycle::decide(entry, claim, now) {
            Decision::Take => continue,
            Decision::Replay => {
                return Verdict::Replay(Found {
                    slot,
                    token: entry.token,
                    len: entry.response_len,
                    expires: entry.deadline,
                })
            }
            Decision::Block(block) => return Verdict::Blocked(block),
        }
    }
    let usable = room.usable.min(BUCKET_ENTRIES);
    let entries = &bucket.entries[..usable];
    // Empty entries first: taking an expired one costs giving its share and bytes back.
    let free = entries
        .iter()
        .position(|e| e.state == State::Empty)
        .or_else(|| entries.iter().position(|e| !e.is_live(now)))
        .or_else(|| {
            let grace = room.evict?;
            victim(bucket, usable, now, |e| evictable(e, grace, now))
        });
    let Some(slot) = free else {
        return Verdict::Blocked(Block::Full);
    };
    let previous = bucket.entries[slot];
    bucket.entries[slot] = lifecycle::claimed(claim, now);
    let displaced = previous.state.is_record().then_some(Displaced {
        entry: previous,
        evicted: previous.is_live(now),
    });
    Verdict::Claimed(Taken {
        slot,
        lease_ends: bucket.entries[slot].deadline,
        displaced,
    })
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

/// Applies an ending to the entry at `slot`, if it is still this claim's; a record kept lives
/// `ttl`.
pub fn finish(
    bucket: &mut Bucket,
    slot: usize,
    token: u64,
    ending: Ending<u32>,
    ttl: Millis,
    now: Millis,
) -> Finished {
    let Some(entry) = bucket.entries.get_mut(slot) else {
        return Finished::Lost;
    };
    if entry.state != State::InFlight || entry.token != token || entry.deadline <= now {
        return Finished::Lost;
    }
    match ending {
        Ending::Stored(len) => {
            entry.state = State::Complete;
            entry.deadline = now.saturating_add(ttl);
            entry.stored = now;
            entry.response_len = len;
        }
        Ending::Unstored { .. } => {
            entry.state = State::Unstored;
            entry.deadline = now.saturating_add(ttl);
            entry.stored = now;
        }
        Ending::Released => *entry = Entry::EMPTY,
        Ending::Held => entry.state = State::Held,
    }
    ending.recorded()
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
    use crate::core::record::tests::sample_entry;

    #[test]
    fn buckets_round_trip() {
        let mut bucket = Bucket::empty();
        bucket.entries[3] = Entry {
            org: 0xbeef,
            ..sample_entry()
        };
        bucket.entries[15].state = State::Held;
        assert_eq!(Bucket::decode(&bucket.encode()), Ok(bucket));
    }

    #[test]
    fn unknown_versions_and_foreign_bytes_are_refused() {
        let mut bytes = Bucket::empty().encode();
        bytes[2] = 1;
        assert_eq!(Bucket::decode(&bytes), Err(DecodeError::UnknownVersion(1)));
        let bytes = Bucket::empty().encode();
        assert_eq!(
            Bucket::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Malformed)
        );
        assert_eq!(Bucket::decode(b""), Err(DecodeError::Malformed));
        assert_eq!(Bucket::decode(b"hello world"), Err(DecodeError::Malformed));
    }

    #[test]
    fn a_bucket_refuses_garbage_without_panicking_and_what_it_reads_round_trips() {
        use crate::core::garbage;
        let mut bucket = Bucket::empty();
        bucket.entries[3] = sample_entry();
        let sample = bucket.encode();
        garbage::run("buckets", |g| {
            let input = g.input(&[&sample], 2048);
            if let Ok(bucket) = Bucket::decode(&input) {
                assert_eq!(Bucket::decode(&bucket.encode()), Ok(bucket));
            }
        });
    }

    const LEASE: Millis = 60_000;
    const TTL: Millis = 86_400_000;

    fn request(tuple: u8, fingerprint: u8, token: u64) -> Claim {
        Claim {
            tuple: [tuple; 32],
            fingerprint: [fingerprint; 16],
            token,
            lease: LEASE,
            ttl: TTL,
            org: 1,
        }
    }

    /// A claim in a store that does not evict.
    fn claim_in(
        bucket: &mut Bucket,
        request: &Claim,
        usable: usize,
        now: Millis,
    ) -> Verdict<Taken, Found> {
        let room = Room {
            usable,
            evict: None,
        };
        claim(bucket, request, room, now)
    }

    fn claimed_slot(verdict: Verdict<Taken, Found>) -> usize {
        match verdict {
            Verdict::Claimed(Taken { slot, .. }) => slot,
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
            Verdict::Blocked(Block::InFlight {
                remaining: LEASE - 500
            })
        );
    }

    #[test]
    fn a_different_fingerprint_conflicts_in_flight_and_complete() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 11), BUCKET_ENTRIES, 1),
            Verdict::Blocked(Block::Conflict)
        );
        let stored = Ending::Stored(5);
        assert_eq!(
            finish(&mut bucket, slot, 10, stored, TTL, 2),
            Finished::Recorded(Ending::Stored(()))
        );
        let before = bucket.clone();
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 12), BUCKET_ENTRIES, 3),
            Verdict::Blocked(Block::Conflict)
        );
        assert_eq!(bucket, before, "a conflict leaves the record untouched");
    }

    #[test]
    fn a_complete_record_replays_until_its_ttl() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(&mut bucket, slot, 10, Ending::Stored(99), TTL, 100);
        assert_eq!(
            claim_in(
                &mut bucket,
                &request(1, 1, 11),
                BUCKET_ENTRIES,
                100 + TTL - 1
            ),
            Verdict::Replay(Found {
                slot,
                token: 10,
                len: 99,
                expires: 100 + TTL
            })
        );
        assert!(
            matches!(
                claim_in(&mut bucket, &request(1, 1, 12), BUCKET_ENTRIES, 100 + TTL),
                Verdict::Claimed(_)
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
            finish(&mut bucket, slot, u64::from(n), Ending::Stored(99), 10, 0);
        }
        let verdict = claim_in(&mut bucket, &request(200, 0, 99), BUCKET_ENTRIES, 10);
        let Verdict::Claimed(Taken {
            displaced: Some(displaced),
            ..
        }) = verdict
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
            finish(&mut bucket, slot, 10, Ending::Released, TTL, 5),
            Finished::Recorded(Ending::Released)
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 6),
            Verdict::Claimed(_)
        ));
    }

    #[test]
    fn a_held_claim_answers_in_progress_until_its_lease_ends() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(&mut bucket, slot, 10, Ending::Held, TTL, 1000);
        assert_eq!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 1000),
            Verdict::Blocked(Block::Held {
                remaining: LEASE - 1000
            })
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 12), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed(_)
        ));
    }

    #[test]
    fn a_claim_whose_owner_vanished_expires_with_its_lease() {
        let mut bucket = Bucket::empty();
        claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        assert!(matches!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed(_)
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
        let stored = Ending::Stored(1);
        assert_eq!(
            finish(&mut bucket, slot, 10, stored, TTL, LEASE + 2),
            Finished::Lost
        );
        assert_eq!(bucket.entries[taken].token, 11);
        assert_eq!(bucket.entries[taken].state, State::InFlight);
    }

    #[test]
    fn an_unstored_record_is_kept_for_the_ttl_without_its_response() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        let unstored = Ending::Unstored { no_room: false };
        finish(&mut bucket, slot, 10, unstored, TTL, 10);
        assert_eq!(
            claim_in(&mut bucket, &request(1, 1, 11), BUCKET_ENTRIES, 20),
            Verdict::Blocked(Block::Unstored)
        );
        assert_eq!(
            claim_in(&mut bucket, &request(1, 2, 11), BUCKET_ENTRIES, 20),
            Verdict::Blocked(Block::Conflict)
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
            Verdict::Blocked(Block::Full)
        );
        assert!(matches!(
            claim_in(&mut bucket, &request(3, 0, 99), BUCKET_ENTRIES, 1),
            Verdict::Blocked(Block::InFlight { .. })
        ));
        assert!(matches!(
            claim_in(&mut bucket, &request(200, 0, 99), BUCKET_ENTRIES, LEASE),
            Verdict::Claimed(_)
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
            Verdict::Blocked(Block::Full)
        );
    }

    #[test]
    fn expired_complete_entries_are_reclaimable() {
        let mut bucket = Bucket::empty();
        let slot = claimed_slot(claim_in(&mut bucket, &request(1, 1, 10), BUCKET_ENTRIES, 0));
        finish(&mut bucket, slot, 10, Ending::Stored(7), 100, 0);
        assert_eq!(reclaimable(&bucket, 99).count(), 0);
        assert_eq!(reclaimable(&bucket, 100).collect::<Vec<_>>(), [slot]);
    }
}
