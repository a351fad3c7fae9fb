//! The embedded store: a fixed table in Envoy's shared data.
//!
//! Shared-data keys can never be deleted, so the keyspace is fixed at configuration: `buckets`
//! bucket keys (the state of 16 records each, changed only by compare-and-swap, so every decision
//! about a record is atomic across workers), one response key per entry, `LEDGER_SHARDS` ledger
//! keys accounting the response bytes against `capacity_bytes`, and at most `SHARE_SLOTS` share
//! keys counting each organisation's records and bytes against its share. A tuple hashes to one
//! bucket and lives in one of its entries; a bucket's responses are accounted in one ledger
//! shard, so evicting within the bucket frees bytes where they are needed.
//!
//! Only the entry's owner (the claim whose token the entry holds, or the sweeper holding it as
//! `Sweeping`) writes its response key, so that write needs no compare-and-swap of its own; the
//! ledger and share counters are shared and do ([`tally`]).

pub mod bucket;
mod census;
mod room;
pub(crate) mod tally;

use crate::core::config::{Config, WhenFull, LEDGER_SHARDS};
use crate::core::lifecycle::{Block, Claim, Ending, Finished, Verdict};
use crate::core::metrics::Gauge;
use crate::core::record::{DecodeError, State, StoredResponse};
use crate::core::store::{Answer, ClaimReply, Handle, Replay, Resumed, Store, StoreError, Ticket};
use crate::core::Millis;
use crate::stores::Kv;
use bucket::{Bucket, Room, Taken, BUCKET_ENTRIES};
pub(crate) use census::Census;
use std::cell::Cell;
pub use tally::{count, Amount, Tally};
use tally::{Limits, Reserves};

/// Organisations' tags map onto this many share counters: two organisations whose tags share a
/// slot share one share (a collision can only over-count).
const SHARE_SLOTS: u16 = 4096;
/// The table's keys live under this, after `key_prefix` and before its capacity: a filter with
/// another table format, or another `capacity_records` (whose buckets a key hashes onto), starts
/// a table of its own instead of misreading this one or leaving its counters half-used.
const TABLE_FORMAT: &str = "t4/";
/// Compare-and-swap attempts before an operation gives up as contended.
const MAX_ATTEMPTS: usize = 64;
/// Shared data writes an absent key whatever CAS is passed, and fails a present key unless its CAS
/// matches. Every VM writes its boot key before any table key, so no table key ever holds CAS 1
/// and `Some(1)` means "insert if absent".
const INSERT_IF_ABSENT: Option<u32> = Some(1);
/// An owner stores its response only with this much of its lease left, so that it can never
/// write over the response of a request that took the entry after the lease ended.
const COMPLETION_MARGIN: Millis = 250;
/// How long the sweeper holds an entry while it gives its bytes back.
const SWEEP_LEASE: Millis = 5_000;
/// Buckets an organisation at its share looks through, from the new key's own, for one of its
/// completed records to make way.
const SHARE_PROBES: u64 = 8;
/// A record stored less than this long ago (or half its TTL, if less) is never evicted: its
/// client may be retrying right now (the API document's loop retries within about 8 s). Where
/// nothing older can make way, the new key is refused with `Retry-After` instead.
const EVICTION_GRACE: Millis = 10_000;

/// A claim this table made, at entry `slot` of the whole table (a [`Handle::Entry`]).
#[derive(Debug, Clone, Copy)]
struct Owner {
    slot: u64,
    claim: Claim,
    lease_ends: Millis,
}

pub struct Table<K: Kv> {
    kv: K,
    /// `key_prefix`: the boot key's.
    prefix: String,
    /// Where the table's own keys live: `key_prefix`, `TABLE_FORMAT`, the capacity.
    space: String,
    buckets: u64,
    /// Entries in all: the last bucket may use fewer than `BUCKET_ENTRIES`.
    capacity: u64,
    /// What a ledger shard and one organisation may hold.
    limits: Limits,
    /// What this worker counted in them ahead of need.
    reserves: Reserves,
    /// Whether organisations' shares are counted (`max_share` below 1).
    shares: bool,
    /// A full bucket makes way for a new record by evicting its completed record nearest expiry.
    evict: bool,
    /// How long a new record is safe from eviction ([`bucket::evictable`]).
    grace: Millis,
    /// Stored responses are compressed where that saves space.
    compress: bool,
    /// The next bucket this VM sweeps, and the token its sweeps and evictions hold entries with.
    sweep_cursor: u64,
    sweep_token: u64,
    /// Ages of the records evicted since [`Store::take_evictions`] was last asked.
    evictions: Vec<Millis>,
    capacity_bytes: u64,
    /// What this worker's bucket writes changed in the records and bytes held, since it last
    /// added that to the census key: one compare-and-swap a second instead of one per write.
    census: Cell<Census>,
}

impl<K: Kv> Table<K> {
    pub fn new(kv: K, config: &Config) -> Self {
        let buckets = config.capacity_records.div_ceil(BUCKET_ENTRIES) as u64;
        let limits = Limits {
            shard_bytes: (config.capacity_bytes / LEDGER_SHARDS) as u64,
            share: Amount {
                records: ((config.capacity_records as f64 * config.max_share) as u64).max(1),
                // Any storable response fits in one organisation's share.
                bytes: config.share_bytes() as u64,
            },
        };
        Table {
            kv,
            prefix: config.key_prefix.clone(),
            space: format!(
                "{}{TABLE_FORMAT}{}/",
                config.key_prefix, config.capacity_records
            ),
            buckets,
            capacity: config.capacity_records as u64,
            limits,
            reserves: Reserves::new(&limits),
            shares: config.max_share < 1.0,
            evict: config.when_full == WhenFull::Evict,
            grace: EVICTION_GRACE,
            compress: config.compress_responses,
            sweep_cursor: 0,
            sweep_token: 0,
            evictions: Vec::new(),
            capacity_bytes: config.capacity_bytes as u64,
            census: Cell::new(Census::default()),
        }
    }

    /// A table that keeps copies of records held elsewhere: a full bucket always evicts, any
    /// record (a copy evicted is fetched again).
    pub fn cache(kv: K, config: &Config) -> Self {
        Table {
            evict: true,
            grace: 0,
            ..Table::new(kv, config)
        }
    }

    /// Called once per VM before any other operation: writes this VM's boot key (see
    /// `INSERT_IF_ABSENT`) and returns a number unique to this VM in this process. Claim tokens
    /// are `number << 40 | attempt` with attempts from 1; this VM's sweeps use attempt 0.
    pub fn boot(&mut self) -> Result<u64, StoreError> {
        let key = format!("{}boot", self.prefix);
        for _ in 0..MAX_ATTEMPTS {
            let (number, cas) = match self.kv.get(&key)? {
                Some((bytes, cas)) => (read_u64(&bytes).unwrap_or(0) + 1, Some(cas)),
                None => (1, None),
            };
            if self.kv.set(&key, &number.to_le_bytes(), cas)? {
                self.sweep_token = number << 40;
                // Each worker starts sweeping at a different bucket.
                self.sweep_cursor = number.wrapping_mul(self.buckets / 7 + 1);
                return Ok(number);
            }
        }
        Err(StoreError::Contended)
    }

    /// Counts `records` and `bytes` ahead of need in every counter, whatever its limit.
    #[cfg(test)]
    pub(crate) fn reserving(self, records: u64, bytes: u64) -> Self {
        Table {
            reserves: self.reserves.with_top_ups(records, bytes),
            ..self
        }
    }

    /// What this worker holds of a counter ahead of need.
    #[cfg(test)]
    pub(crate) fn reserved(&self, tally: Tally) -> Amount {
        self.reserves.held(tally)
    }

    pub(crate) fn key(&self, kind: &str, n: u64) -> String {
        key_in(&self.space, kind, n)
    }

    fn bucket_of(&self, tuple: &[u8; 32]) -> u64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&tuple[..8]);
        u64::from_le_bytes(head) % self.buckets
    }

    /// Entries of `bucket` that records may use (the last bucket may be partly past capacity).
    fn usable(&self, bucket: u64) -> usize {
        (self.capacity - bucket * BUCKET_ENTRIES as u64).min(BUCKET_ENTRIES as u64) as usize
    }

    fn room(&self, bucket: u64) -> Room {
        Room {
            usable: self.usable(bucket),
            evict: self.evict.then_some(self.grace),
        }
    }

    /// Reads a bucket, lets `change` decide, and writes the bucket back if it says so; retries
    /// from a fresh read when another writer got there first.
    fn update<T>(
        &self,
        bucket: u64,
        mut change: impl FnMut(&mut Bucket) -> (T, bool),
    ) -> Result<T, StoreError> {
        let key = self.key("b", bucket);
        for _ in 0..MAX_ATTEMPTS {
            let (mut entries, cas) = match self.kv.get(&key)? {
                Some((bytes, cas)) => (Bucket::decode(&bytes).map_err(unreadable)?, Some(cas)),
                None => (Bucket::empty(), INSERT_IF_ABSENT),
            };
            let before = Census::of(&entries);
            let (result, write) = change(&mut entries);
            if !write {
                return Ok(result);
            }
            if self.kv.set(&key, &entries.encode(), cas)? {
                let changed = Census::of(&entries).minus(before);
                self.census.set(self.census.get().plus(changed));
                return Ok(result);
            }
        }
        Err(StoreError::Contended)
    }

    fn read_bucket(&self, bucket: u64) -> Result<Bucket, StoreError> {
        match self.kv.get(&self.key("b", bucket))? {
            Some((bytes, _)) => Bucket::decode(&bytes).map_err(unreadable),
            None => Ok(Bucket::empty()),
        }
    }

    /// Whether the table keeps the counter: with `max_share` 1 a share can never bind before the
    /// store's own limits do, and counting it would only let reserves held elsewhere refuse early.
    pub(crate) fn counts(&self, tally: Tally) -> bool {
        self.shares || matches!(tally, Tally::Ledger(_))
    }

    fn read_response(&self, slot: u64, token: u64) -> Result<Option<StoredResponse>, StoreError> {
        let Some((bytes, _)) = self.kv.get(&self.key("r", slot))? else {
            return Ok(None);
        };
        match StoredResponse::decode(&bytes, token) {
            Ok(response) => Ok(Some(response)),
            Err(DecodeError::UnknownVersion(v)) => Err(unreadable(DecodeError::UnknownVersion(v))),
            Err(DecodeError::Malformed) => Ok(None),
        }
    }

    fn try_claim(&mut self, claim: &Claim, now: Millis) -> Result<Option<ClaimReply>, StoreError> {
        let bucket = self.bucket_of(&claim.tuple);
        let room = self.room(bucket);
        let verdict = self.update(bucket, |entries| {
            let verdict = bucket::claim(entries, claim, room, now);
            (verdict, verdict.writes())
        })?;
        let global = |slot: usize| bucket * BUCKET_ENTRIES as u64 + slot as u64;
        Ok(Some(match verdict {
            Verdict::Claimed(Taken {
                slot,
                lease_ends,
                displaced,
            }) => {
                let owner = Owner {
                    slot: global(slot),
                    claim: *claim,
                    lease_ends,
                };
                if let Some(displaced) = displaced {
                    self.give_back(owner.slot, &displaced.entry)?;
                    if displaced.evicted {
                        self.note_eviction(&displaced.entry, now);
                    }
                }
                if self.take_share(owner, now)? {
                    Verdict::Claimed(Ticket {
                        handle: Handle::Entry {
                            slot: owner.slot,
                            lease_ends,
                        },
                        claim: *claim,
                    })
                } else {
                    Verdict::Blocked(Block::QuotaExceeded)
                }
            }
            Verdict::Replay(found) => {
                match self.read_response(global(found.slot), found.token)? {
                    Some(response) => Verdict::Replay(Replay {
                        response,
                        expires: found.expires,
                    }),
                    // The entry moved on between the two reads: decide again.
                    None => return Ok(None),
                }
            }
            Verdict::Blocked(block) => Verdict::Blocked(block),
        }))
    }

    fn end(
        &self,
        owner: Owner,
        ending: Ending<u32>,
        ttl: Millis,
        now: Millis,
    ) -> Result<Finished, StoreError> {
        let bucket = owner.slot / BUCKET_ENTRIES as u64;
        let slot = (owner.slot % BUCKET_ENTRIES as u64) as usize;
        self.update(bucket, |entries| {
            let finished = bucket::finish(entries, slot, owner.claim.token, ending, ttl, now);
            (finished, finished != Finished::Lost)
        })
    }

    /// Looks for a complete record without claiming: used as a cache in front of a remote store.
    /// `Some(Replay)` or `Some(Conflict)` when a live complete record holds the tuple.
    pub fn peek(&self, claim: &Claim, now: Millis) -> Result<Option<ClaimReply>, StoreError> {
        let bucket = self.bucket_of(&claim.tuple);
        let entries = self.read_bucket(bucket)?;
        let Some((slot, entry)) =
            entries.entries.iter().enumerate().find(|(_, e)| {
                e.is_live(now) && e.tuple == claim.tuple && e.state == State::Complete
            })
        else {
            return Ok(None);
        };
        if entry.fingerprint != claim.fingerprint {
            return Ok(Some(Verdict::Blocked(Block::Conflict)));
        }
        let global = bucket * BUCKET_ENTRIES as u64 + slot as u64;
        let expires = entry.deadline;
        Ok(self
            .read_response(global, entry.token)?
            .map(|response| Verdict::Replay(Replay { response, expires })))
    }

    /// Keeps a copy of a complete record (from a remote store) until `expires`; best effort.
    pub fn remember(
        &mut self,
        claim: &Claim,
        response: &StoredResponse,
        expires: Millis,
        now: Millis,
    ) -> Result<(), StoreError> {
        if let Answer::Now(Ok(Verdict::Claimed(ticket))) = self.claim(claim, now) {
            let owner = self.owner_of(&ticket)?;
            self.store_response(owner, response, expires.saturating_sub(now), now)?;
        }
        Ok(())
    }

    fn store_response(
        &mut self,
        owner: Owner,
        response: &StoredResponse,
        ttl: Millis,
        now: Millis,
    ) -> Result<Finished, StoreError> {
        // The entry is the owner's until its lease ends (nothing else takes a claim in flight),
        // so it need not be read again: the final update checks the token all the same.
        if owner.lease_ends <= now {
            return Ok(Finished::Lost);
        }
        let unstored =
            |table: &Self, no_room| table.end(owner, Ending::Unstored { no_room }, ttl, now);
        if owner.lease_ends - now < COMPLETION_MARGIN {
            return unstored(self, false);
        }
        let token = owner.claim.token;
        let bytes = response.encode(token, self.compress);
        let Ok(len) = u32::try_from(bytes.len()) else {
            return unstored(self, false);
        };
        if !self.make_room(owner, len, now)? {
            return unstored(self, true);
        }
        self.kv.set(&self.key("r", owner.slot), &bytes, None)?;
        let finished = self.end(owner, Ending::Stored(len), ttl, now)?;
        if finished == Finished::Lost {
            // The entry is another claim's now: its completion overwrites these bytes.
            self.give(Self::ledger_of(owner.slot), 0, u64::from(len))?;
            self.give(Self::share_of(owner.claim.org), 0, u64::from(len))?;
        }
        Ok(finished)
    }

    /// The claim a ticket of this table names.
    fn owner_of(&self, ticket: &Ticket) -> Result<Owner, StoreError> {
        match ticket.handle {
            Handle::Entry { slot, lease_ends } if slot < self.capacity => Ok(Owner {
                slot,
                claim: ticket.claim,
                lease_ends,
            }),
            other => Err(StoreError::Host(format!(
                "not a ticket of this table: {other:?}"
            ))),
        }
    }

    /// Gives back what the expired records of one bucket held; returns how many.
    pub fn sweep(&self, bucket: u64, now: Millis) -> Result<usize, StoreError> {
        let bucket = bucket % self.buckets;
        let expired: Vec<usize> = bucket::reclaimable(&self.read_bucket(bucket)?, now).collect();
        let (token, until) = (self.sweep_token, now + SWEEP_LEASE);
        let mut swept = 0;
        for slot in expired {
            let taken = self.update(bucket, |entries| {
                let still_expired = bucket::reclaimable(entries, now).any(|at| at == slot);
                let taken = still_expired.then(|| bucket::take(entries, slot, token, until));
                (taken, taken.is_some())
            })?;
            if let Some(record) = taken {
                self.release_taken(bucket, slot, &record)?;
                swept += usize::from(record.state.is_record());
            }
        }
        Ok(swept)
    }
}

impl<K: Kv> Store for Table<K> {
    fn claim(&mut self, claim: &Claim, now: Millis) -> Answer<Result<ClaimReply, StoreError>> {
        for _ in 0..MAX_ATTEMPTS {
            match self.try_claim(claim, now) {
                Ok(None) => continue,
                Ok(Some(reply)) => return Answer::Now(Ok(reply)),
                Err(error) => return Answer::Now(Err(error)),
            }
        }
        Answer::Now(Err(StoreError::Contended))
    }

    fn finish(
        &mut self,
        ticket: Ticket,
        ending: Ending<StoredResponse>,
        now: Millis,
    ) -> Answer<Result<Finished, StoreError>> {
        let owner = match self.owner_of(&ticket) {
            Ok(owner) => owner,
            Err(error) => return Answer::Now(Err(error)),
        };
        // The record lives as long as its claim's route says.
        let ttl = owner.claim.ttl;
        Answer::Now(match ending {
            Ending::Stored(response) => self.store_response(owner, &response, ttl, now),
            Ending::Unstored { no_room } => self.end(owner, Ending::Unstored { no_room }, ttl, now),
            Ending::Released => match self.end(owner, Ending::Released, ttl, now) {
                Ok(Finished::Recorded(ended)) => self
                    .give(Self::share_of(owner.claim.org), 1, 0)
                    .map(|()| Finished::Recorded(ended)),
                other => other,
            },
            Ending::Held => self.end(owner, Ending::Held, ttl, now),
        })
    }

    /// Sweeps one bucket a tick, and gives back reserves gone idle.
    fn tick(&mut self, now: Millis) -> Vec<Resumed> {
        let bucket = self.sweep_cursor;
        self.sweep_cursor = bucket.wrapping_add(1);
        if let Err(error) = self.sweep(bucket, now) {
            log::warn!("sweeping expired records failed: {error}");
        }
        for (tally, held) in self.reserves.idle(now) {
            if let Err(error) = self.give(tally, held.records, held.bytes) {
                log::warn!("giving back a reserve of {tally:?} failed: {error}");
                self.reserves.keep(tally, held, now);
            }
        }
        Vec::new()
    }

    fn take_evictions(&mut self) -> Vec<Millis> {
        std::mem::take(&mut self.evictions)
    }

    /// Adds this worker's changes to the census key, whose total every worker reports: the
    /// whole table's, never one worker's view of it.
    fn levels(&mut self, _now: Millis) -> Vec<(Gauge, u64)> {
        let whole = match self.count_census() {
            Ok(whole) => whole,
            Err(error) => {
                log::warn!("counting the records held failed: {error}");
                return Vec::new();
            }
        };
        vec![
            (Gauge::RecordsHeld, whole.records.max(0) as u64),
            (Gauge::BytesHeld, whole.bytes.max(0) as u64),
            (Gauge::CapacityRecords, self.capacity),
            (Gauge::CapacityBytes, self.capacity_bytes),
        ]
    }
}

/// The key of the `n`th of a `kind` of the table's keys, in its `space`.
fn key_in(space: &str, kind: &str, n: u64) -> String {
    format!("{space}{kind}/{n}")
}

fn unreadable(error: DecodeError) -> StoreError {
    StoreError::Unreadable(format!("{error:?}"))
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests;
