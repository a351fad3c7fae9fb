//! Room for a record: the byte ledger, its organisation's share, and eviction within its bucket.

use super::bucket::{self, BUCKET_ENTRIES};
use super::tally::{self, Amount, Tally};
use super::{Owner, Table, SHARE_PROBES, SHARE_SLOTS, SWEEP_LEASE};
use crate::core::config::LEDGER_SHARDS;
use crate::core::lifecycle::Ending;
use crate::core::record::{Entry, State};
use crate::core::store::StoreError;
use crate::core::Millis;
use crate::stores::Kv;

impl<K: Kv> Table<K> {
    /// The ledger shard that accounts the responses of `slot`'s bucket.
    pub(super) fn ledger_of(slot: u64) -> Tally {
        Tally::Ledger(slot / BUCKET_ENTRIES as u64 % LEDGER_SHARDS as u64)
    }

    /// The share counter of organisation `org`.
    pub(super) fn share_of(org: u16) -> Tally {
        Tally::Share(u64::from(org % SHARE_SLOTS))
    }

    /// Takes `records` and `bytes` off a shared counter.
    pub(super) fn give(&self, tally: Tally, records: u64, bytes: u64) -> Result<(), StoreError> {
        if !self.counts(tally) {
            return Ok(());
        }
        let (records, bytes) = (-(records as i64), -(bytes as i64));
        tally::add(&self.kv, &self.space, tally, &self.limits, records, bytes).map(drop)
    }

    /// Counts `need` in a counter, out of this worker's reserve where it can; refuses (false)
    /// what would take the counter past its limit.
    pub(super) fn take(
        &mut self,
        tally: Tally,
        need: Amount,
        now: Millis,
    ) -> Result<bool, StoreError> {
        if !self.counts(tally) {
            return Ok(true);
        }
        let (kv, space, limits) = (&self.kv, &self.space, &self.limits);
        self.reserves.take(tally, need, now, |more| {
            let (records, bytes) = (more.records as i64, more.bytes as i64);
            tally::add(kv, space, tally, limits, records, bytes)
        })
    }

    /// Gives back what a record that left `slot` held: its response and bytes if it was
    /// complete, and its place in its organisation's share. The caller owns the entry.
    pub(super) fn give_back(&self, slot: u64, record: &Entry) -> Result<(), StoreError> {
        let len = u64::from(record.response_len);
        if record.state == State::Complete {
            self.kv.set(&self.key("r", slot), b"", None)?;
            self.give(Self::ledger_of(slot), 0, len)?;
        }
        if record.state.is_record() {
            let bytes = if record.state == State::Complete {
                len
            } else {
                0
            };
            self.give(Self::share_of(record.org), 1, bytes)?;
        }
        Ok(())
    }

    pub(super) fn note_eviction(&mut self, record: &Entry, now: Millis) {
        self.evictions.push(now.saturating_sub(record.stored));
    }

    /// Evicts the completed record nearest its expiry that `which` accepts from `bucket`, if it
    /// was stored at least `grace` ago; what it held, or `None` if there is none.
    pub(super) fn evict_in(
        &mut self,
        bucket: u64,
        now: Millis,
        which: impl Fn(&Entry) -> bool,
    ) -> Result<Option<Entry>, StoreError> {
        let usable = self.usable(bucket);
        let (token, until) = (self.sweep_token, now + SWEEP_LEASE);
        let grace = self.grace;
        let which = |e: &Entry| bucket::evictable(e, grace, now) && which(e);
        let taken = self.update(bucket, |entries| {
            let taken = bucket::victim(entries, usable, now, which)
                .map(|slot| (slot, bucket::take(entries, slot, token, until)));
            (taken, taken.is_some())
        })?;
        let Some((slot, record)) = taken else {
            return Ok(None);
        };
        self.release_taken(bucket, slot, &record)?;
        self.note_eviction(&record, now);
        Ok(Some(record))
    }

    /// Gives back a record `bucket::take` took out of `slot`, and ends the sweep that holds it.
    pub(super) fn release_taken(
        &self,
        bucket: u64,
        slot: usize,
        record: &Entry,
    ) -> Result<(), StoreError> {
        let global = bucket * BUCKET_ENTRIES as u64 + slot as u64;
        self.give_back(global, record)?;
        if record.state == State::Complete {
            let token = self.sweep_token;
            self.update(bucket, |entries| {
                ((), bucket::end_sweep(entries, slot, token))
            })?;
        }
        Ok(())
    }

    /// Counts a new claim in its organisation's share. At its share, one of the organisation's
    /// own completed records makes way (the one nearest expiry in the first of `SHARE_PROBES`
    /// buckets that holds any); with none, the claim is undone and refused (false).
    pub(super) fn take_share(&mut self, owner: Owner, now: Millis) -> Result<bool, StoreError> {
        let org = owner.claim.org;
        let home = owner.slot / BUCKET_ENTRIES as u64;
        let mut probe = 0;
        while !self.take(Self::share_of(org), Amount::records(1), now)? {
            let own = |e: &Entry| e.org == org;
            let made_way = loop {
                if probe == SHARE_PROBES.min(self.buckets) {
                    break false;
                }
                if self
                    .evict_in((home + probe) % self.buckets, now, own)?
                    .is_some()
                {
                    break true;
                }
                probe += 1;
            };
            if !made_way {
                self.end(owner, Ending::Released, 0, now)?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Makes room for `len` response bytes of `owner`'s record: in the store's bytes (where a
    /// full store evicts, the bucket's completed record nearest expiry makes way) and in its
    /// organisation's share (its own record makes way). False when there is none to be made.
    pub(super) fn make_room(
        &mut self,
        owner: Owner,
        len: u32,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let org = owner.claim.org;
        let (ledger, share) = (Self::ledger_of(owner.slot), Self::share_of(org));
        let bytes = Amount::bytes(u64::from(len));
        let bucket = owner.slot / BUCKET_ENTRIES as u64;
        let complete = |e: &Entry| e.state == State::Complete;
        for _ in 0..=BUCKET_ENTRIES {
            let evicted = if !self.take(ledger, bytes, now)? {
                if !self.evict {
                    return Ok(false);
                }
                self.evict_in(bucket, now, complete)?
            } else if self.take(share, bytes, now)? {
                return Ok(true);
            } else {
                self.give(ledger, 0, bytes.bytes)?;
                self.evict_in(bucket, now, |e| complete(e) && e.org == org)?
            };
            if evicted.is_none() {
                return Ok(false);
            }
        }
        Ok(false)
    }
}
