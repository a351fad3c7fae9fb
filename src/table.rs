//! The embedded store: a fixed table in Envoy's shared data.
//!
//! Shared-data keys can never be deleted, so the keyspace is fixed at configuration: `buckets`
//! bucket keys (the state of 16 records each, changed only by compare-and-swap, so every decision
//! about a record is atomic across workers), one response key per entry, and `LEDGER_SHARDS`
//! ledger keys accounting the response bytes against `capacity_bytes`. A tuple hashes to one
//! bucket and lives in one of its entries.
//!
//! Only the entry's owner (the claim whose token the entry holds) writes its response key, so that
//! write needs no compare-and-swap of its own; the ledger counters are shared and do.

use crate::config::{Config, Millis};
use crate::decide::{self, Claim, Ending, Finish, Verdict};
use crate::record::{Bucket, DecodeError, Ledger, StoredResponse, BUCKET_ENTRIES};
use crate::store::{
    Answer, ClaimReply, FinishReply, Kv, Outcome, Resumed, Store, StoreError, Ticket,
};

pub const LEDGER_SHARDS: usize = 8;
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

pub struct Table<K: Kv> {
    kv: K,
    prefix: String,
    buckets: u64,
    /// Entries in all: the last bucket may use fewer than `BUCKET_ENTRIES`.
    capacity: u64,
    shard_budget: u64,
    ttl: Millis,
    /// The next bucket this VM sweeps, and the token its sweeps claim with.
    sweep_cursor: u64,
    sweep_token: u64,
}

impl<K: Kv> Table<K> {
    pub fn new(kv: K, config: &Config) -> Self {
        let buckets = config.capacity_records.div_ceil(BUCKET_ENTRIES) as u64;
        Table {
            kv,
            prefix: config.key_prefix.clone(),
            buckets,
            capacity: config.capacity_records as u64,
            shard_budget: (config.capacity_bytes / LEDGER_SHARDS) as u64,
            ttl: config.ttl,
            sweep_cursor: 0,
            sweep_token: 0,
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

    fn bucket_key(&self, bucket: u64) -> String {
        format!("{}b/{bucket}", self.prefix)
    }

    fn response_key(&self, slot: u64) -> String {
        format!("{}r/{slot}", self.prefix)
    }

    fn ledger_key(&self, shard: u64) -> String {
        format!("{}l/{shard}", self.prefix)
    }

    fn bucket_of(&self, tuple: &[u8; 32]) -> u64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&tuple[..8]);
        u64::from_le_bytes(head) % self.buckets
    }

    /// Reads a bucket, lets `change` decide, and writes the bucket back if it says so; retries
    /// from a fresh read when another writer got there first.
    fn update<T>(
        &self,
        bucket: u64,
        mut change: impl FnMut(&mut Bucket) -> (T, bool),
    ) -> Result<T, StoreError> {
        let key = self.bucket_key(bucket);
        for _ in 0..MAX_ATTEMPTS {
            let (mut entries, cas) = match self.kv.get(&key)? {
                Some((bytes, cas)) => (Bucket::decode(&bytes).map_err(unreadable)?, Some(cas)),
                None => (Bucket::empty(), INSERT_IF_ABSENT),
            };
            let (result, write) = change(&mut entries);
            if !write || self.kv.set(&key, &entries.encode(), cas)? {
                return Ok(result);
            }
        }
        Err(StoreError::Contended)
    }

    fn read_bucket(&self, bucket: u64) -> Result<Bucket, StoreError> {
        match self.kv.get(&self.bucket_key(bucket))? {
            Some((bytes, _)) => Bucket::decode(&bytes).map_err(unreadable),
            None => Ok(Bucket::empty()),
        }
    }

    /// Adds `delta` response bytes to `slot`'s ledger shard; refuses (false) an addition that
    /// would take the shard past its share of `capacity_bytes`.
    fn account(&self, slot: u64, delta: i64) -> Result<bool, StoreError> {
        let key = self.ledger_key(slot % LEDGER_SHARDS as u64);
        for _ in 0..MAX_ATTEMPTS {
            let (ledger, cas) = match self.kv.get(&key)? {
                Some((bytes, cas)) => (Ledger::decode(&bytes).map_err(unreadable)?, Some(cas)),
                None => (Ledger { total: 0 }, INSERT_IF_ABSENT),
            };
            let total = ledger.total.saturating_add_signed(delta);
            if delta > 0 && total > self.shard_budget {
                return Ok(false);
            }
            if self.kv.set(&key, &Ledger { total }.encode(), cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contended)
    }

    /// Gives back the `len` bytes of the response at `slot`, which the caller owns.
    fn clear_response(&self, slot: u64, len: u32) -> Result<(), StoreError> {
        self.kv.set(&self.response_key(slot), b"", None)?;
        self.account(slot, -i64::from(len)).map(|_| ())
    }

    fn read_response(
        &self,
        slot: u64,
        tuple: &[u8; 32],
        token: u64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let Some((bytes, _)) = self.kv.get(&self.response_key(slot))? else {
            return Ok(None);
        };
        match StoredResponse::decode(&bytes, tuple, token) {
            Ok(response) => Ok(Some(response)),
            Err(DecodeError::UnknownVersion(v)) => Err(unreadable(DecodeError::UnknownVersion(v))),
            Err(DecodeError::Malformed) => Ok(None),
        }
    }

    fn try_claim(&self, claim: &Claim, now: Millis) -> Result<Option<ClaimReply>, StoreError> {
        let bucket = self.bucket_of(&claim.tuple);
        let usable = (self.capacity - bucket * BUCKET_ENTRIES as u64) as usize;
        let verdict = self.update(bucket, |entries| {
            let verdict = decide::claim(entries, claim, usable, now);
            (verdict, verdict.writes())
        })?;
        let global = |slot: usize| bucket * BUCKET_ENTRIES as u64 + slot as u64;
        Ok(Some(match verdict {
            Verdict::Claimed { slot, reclaimed } => {
                let slot = global(slot);
                if reclaimed > 0 {
                    self.clear_response(slot, reclaimed)?;
                }
                ClaimReply::Claimed(Ticket {
                    slot,
                    claim: *claim,
                })
            }
            Verdict::Replay { slot, token, .. } => {
                match self.read_response(global(slot), &claim.tuple, token)? {
                    Some(response) => ClaimReply::Replay(response),
                    // The entry moved on between the two reads: decide again.
                    None => return Ok(None),
                }
            }
            Verdict::Conflict => ClaimReply::Conflict,
            Verdict::InFlight { remaining } => ClaimReply::InFlight { remaining },
            Verdict::Held { remaining } => ClaimReply::Held { remaining },
            Verdict::NotStored => ClaimReply::NotStored,
            Verdict::Full => ClaimReply::Full,
        }))
    }

    fn end(&self, ticket: Ticket, ending: Ending, now: Millis) -> Result<Finish, StoreError> {
        let bucket = ticket.slot / BUCKET_ENTRIES as u64;
        let slot = (ticket.slot % BUCKET_ENTRIES as u64) as usize;
        self.update(bucket, |entries| {
            let finish = decide::finish(entries, slot, ticket.claim.token, ending, now);
            (finish, finish == Finish::Done)
        })
    }

    /// Looks for a complete record without claiming: used as a cache in front of a remote store.
    /// `Some(Replay)` or `Some(Conflict)` when a live complete record holds the tuple.
    pub fn peek(&self, claim: &Claim, now: Millis) -> Result<Option<ClaimReply>, StoreError> {
        let bucket = self.bucket_of(&claim.tuple);
        let entries = self.read_bucket(bucket)?;
        let Some((slot, entry)) = entries.entries.iter().enumerate().find(|(_, e)| {
            e.is_live(now) && e.tuple == claim.tuple && e.state == crate::record::State::Complete
        }) else {
            return Ok(None);
        };
        if entry.fingerprint != claim.fingerprint {
            return Ok(Some(ClaimReply::Conflict));
        }
        let global = bucket * BUCKET_ENTRIES as u64 + slot as u64;
        Ok(self
            .read_response(global, &claim.tuple, entry.token)?
            .map(ClaimReply::Replay))
    }

    /// Keeps a copy of a complete record (from a remote store) until `expires`; best effort.
    pub fn remember(
        &mut self,
        claim: &Claim,
        response: &StoredResponse,
        expires: Millis,
        now: Millis,
    ) -> Result<(), StoreError> {
        if let Answer::Now(Ok(ClaimReply::Claimed(ticket))) = self.claim(claim, now) {
            self.store_response(ticket, response, expires.saturating_sub(now), now)?;
        }
        Ok(())
    }

    fn store_response(
        &self,
        ticket: Ticket,
        response: &StoredResponse,
        ttl: Millis,
        now: Millis,
    ) -> Result<FinishReply, StoreError> {
        let bucket = ticket.slot / BUCKET_ENTRIES as u64;
        let slot = (ticket.slot % BUCKET_ENTRIES as u64) as usize;
        let entry = self.read_bucket(bucket)?.entries[slot];
        let token = ticket.claim.token;
        if entry.token != token || entry.deadline <= now {
            return Ok(FinishReply::Lost);
        }
        let unstored = Ending::Unstored { ttl };
        let without_response = |store_full| match self.end(ticket, unstored, now)? {
            Finish::Done => Ok(FinishReply::StoredWithoutResponse { store_full }),
            Finish::Lost => Ok(FinishReply::Lost),
        };
        if entry.deadline - now < COMPLETION_MARGIN {
            return without_response(false);
        }
        let bytes = response.encode(&entry.tuple, token);
        let Ok(len) = u32::try_from(bytes.len()) else {
            return without_response(false);
        };
        if !self.account(ticket.slot, i64::from(len))? {
            return without_response(true);
        }
        self.kv.set(&self.response_key(ticket.slot), &bytes, None)?;
        let stored = Ending::Stored { len, ttl };
        Ok(match self.end(ticket, stored, now)? {
            Finish::Done => FinishReply::Stored,
            Finish::Lost => {
                // The entry is another claim's now: its completion overwrites these bytes.
                self.account(ticket.slot, -i64::from(len))?;
                FinishReply::Lost
            }
        })
    }

    /// Gives back the response bytes of expired records in one bucket; returns how many.
    pub fn sweep(&self, bucket: u64, token: u64, now: Millis) -> Result<usize, StoreError> {
        let bucket = bucket % self.buckets;
        let expired: Vec<usize> = decide::reclaimable(&self.read_bucket(bucket)?, now).collect();
        let mut swept = 0;
        for slot in expired {
            // Take the entry as an owner would, so that nobody else writes its response meanwhile.
            let taken = self.update(bucket, |entries| {
                let taken = decide::take_for_sweep(entries, slot, token, now + SWEEP_LEASE, now);
                (taken, taken.is_some())
            })?;
            let Some(len) = taken else {
                continue;
            };
            let global = bucket * BUCKET_ENTRIES as u64 + slot as u64;
            self.clear_response(global, len)?;
            let ticket = Ticket {
                slot: global,
                claim: Claim {
                    tuple: [0; 32],
                    fingerprint: [0; 32],
                    token,
                    lease: SWEEP_LEASE,
                },
            };
            self.end(ticket, Ending::Released, now)?;
            swept += 1;
        }
        Ok(swept)
    }

    pub fn buckets(&self) -> u64 {
        self.buckets
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
        outcome: Outcome,
        now: Millis,
    ) -> Answer<Result<FinishReply, StoreError>> {
        let ended = |ending, reply| {
            self.end(ticket, ending, now).map(|finish| match finish {
                Finish::Done => reply,
                Finish::Lost => FinishReply::Lost,
            })
        };
        Answer::Now(match outcome {
            Outcome::Store(response) => self.store_response(ticket, &response, self.ttl, now),
            Outcome::TooLarge => ended(
                Ending::Unstored { ttl: self.ttl },
                FinishReply::StoredWithoutResponse { store_full: false },
            ),
            Outcome::Release => ended(Ending::Released, FinishReply::Released),
            Outcome::Hold => ended(Ending::Held, FinishReply::Held),
        })
    }

    /// Sweeps one bucket a tick.
    fn tick(&mut self, now: Millis) -> Vec<Resumed> {
        let bucket = self.sweep_cursor;
        self.sweep_cursor = bucket.wrapping_add(1);
        if let Err(error) = self.sweep(bucket, self.sweep_token, now) {
            log::warn!("sweeping expired records failed: {error}");
        }
        Vec::new()
    }
}

fn unreadable(error: DecodeError) -> StoreError {
    StoreError::Unreadable(format!("{error:?}"))
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    pub type Racer = Box<dyn FnOnce(&MemoryKv)>;

    /// Shared data as Envoy implements it: a global CAS counter from 1, writes to absent keys
    /// always succeed, no deletes.
    #[derive(Default)]
    pub struct MemoryKv {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        /// Runs once, between a read and the next write: a racing worker.
        pub interleave: RefCell<Option<Racer>>,
    }

    impl MemoryKv {
        pub fn bytes(&self) -> usize {
            self.map
                .borrow()
                .iter()
                .map(|(k, (v, _))| k.len() + v.len())
                .sum()
        }

        pub fn keys(&self) -> usize {
            self.map.borrow().len()
        }
    }

    impl Kv for &MemoryKv {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.map.borrow().get(key).cloned())
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            let racer = self.interleave.borrow_mut().take();
            if let Some(racer) = racer {
                racer(self);
            }
            let mut map = self.map.borrow_mut();
            if let (Some((_, current)), Some(cas)) = (map.get(key), cas) {
                if *current != cas {
                    return Ok(false);
                }
            }
            let next = self.next_cas.get().max(1);
            self.next_cas.set(next.wrapping_add(1).max(1));
            map.insert(key.to_string(), (value.to_vec(), next));
            Ok(true)
        }
    }

    pub fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).unwrap()
    }

    fn table<'a>(kv: &'a MemoryKv, json: &str) -> Table<&'a MemoryKv> {
        let mut table = Table::new(kv, &config(json));
        table.boot().unwrap();
        table
    }

    fn request(tuple: u8, fingerprint: u8, token: u64) -> Claim {
        Claim {
            tuple: [tuple; 32],
            fingerprint: [fingerprint; 32],
            token,
            lease: 60_000,
        }
    }

    fn response(body_len: usize) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("set-cookie".into(), "a=1".into())],
            body: vec![7; body_len],
        }
    }

    fn claim_now(table: &mut Table<&MemoryKv>, claim: &Claim, now: Millis) -> ClaimReply {
        match table.claim(claim, now) {
            Answer::Now(Ok(reply)) => reply,
            other => panic!("claim: {other:?}"),
        }
    }

    fn finish_now(
        table: &mut Table<&MemoryKv>,
        ticket: Ticket,
        outcome: Outcome,
        now: Millis,
    ) -> FinishReply {
        match table.finish(ticket, outcome, now) {
            Answer::Now(Ok(reply)) => reply,
            other => panic!("finish: {other:?}"),
        }
    }

    fn ticket(reply: ClaimReply) -> Ticket {
        match reply {
            ClaimReply::Claimed(ticket) => ticket,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn a_stored_response_replays_byte_for_byte() {
        let kv = MemoryKv::default();
        let mut table = table(&kv, "{}");
        let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
        let reply = finish_now(&mut table, owner, Outcome::Store(response(300)), 5);
        assert_eq!(reply, FinishReply::Stored);
        assert_eq!(
            claim_now(&mut table, &request(1, 1, 11), 6),
            ClaimReply::Replay(response(300))
        );
    }

    #[test]
    fn two_workers_racing_on_an_absent_bucket_get_one_claim() {
        let kv = MemoryKv::default();
        let mut table = table(&kv, "{}");
        // Worker B claims the same tuple between worker A's read and A's first write.
        *kv.interleave.borrow_mut() = Some(Box::new(|kv: &MemoryKv| {
            let mut other = Table::new(kv, &config("{}"));
            let reply = claim_now(&mut other, &request(1, 1, 20), 0);
            assert!(matches!(reply, ClaimReply::Claimed(_)));
        }));
        assert_eq!(
            claim_now(&mut table, &request(1, 1, 10), 0),
            ClaimReply::InFlight { remaining: 60_000 }
        );
    }

    #[test]
    fn a_released_claim_is_taken_by_exactly_one_waiter() {
        let kv = MemoryKv::default();
        let mut table = table(&kv, "{}");
        let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
        assert_eq!(
            finish_now(&mut table, owner, Outcome::Release, 1),
            FinishReply::Released
        );
        assert!(matches!(
            claim_now(&mut table, &request(1, 1, 11), 2),
            ClaimReply::Claimed(_)
        ));
        assert!(matches!(
            claim_now(&mut table, &request(1, 1, 12), 2),
            ClaimReply::InFlight { .. }
        ));
    }

    #[test]
    fn a_response_that_does_not_fit_keeps_the_record_without_it() {
        let kv = MemoryKv::default();
        let json = r#"{"capacity_bytes": 8000, "max_response_body_bytes": 1000}"#;
        let mut table = table(&kv, json);
        let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
        assert_eq!(
            finish_now(&mut table, owner, Outcome::Store(response(2000)), 1),
            FinishReply::StoredWithoutResponse { store_full: true }
        );
        assert_eq!(
            claim_now(&mut table, &request(1, 1, 11), 2),
            ClaimReply::NotStored
        );
    }

    #[test]
    fn expired_records_give_their_bytes_back_to_the_sweeper() {
        let kv = MemoryKv::default();
        let json = r#"{"capacity_records": 16, "ttl": "1s"}"#;
        let mut table = table(&kv, json);
        let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
        finish_now(&mut table, owner, Outcome::Store(response(50_000)), 0);
        let full = kv.bytes();
        assert_eq!(table.sweep(0, 99, 999).unwrap(), 0);
        assert_eq!(table.sweep(0, 99, 1000).unwrap(), 1);
        assert!(kv.bytes() < full - 50_000, "{} vs {full}", kv.bytes());
        assert!(matches!(
            claim_now(&mut table, &request(1, 1, 11), 1001),
            ClaimReply::Claimed(_)
        ));
    }

    #[test]
    fn memory_stays_bounded_by_the_capacity_whatever_the_number_of_keys() {
        let kv = MemoryKv::default();
        let json = r#"{"capacity_records": 64, "capacity_bytes": 80000, "max_response_body_bytes": 10000, "ttl": "300ms"}"#;
        let mut table = table(&kv, json);
        let mut stored = 0;
        let mut full = 0;
        for n in 0..5_000u64 {
            let mut claim = request(0, 1, n + 1);
            claim.tuple[..8].copy_from_slice(&n.to_le_bytes());
            claim.tuple[8] = (n % 251) as u8;
            let now = n * 10;
            match claim_now(&mut table, &claim, now) {
                ClaimReply::Claimed(owner) => {
                    let reply = finish_now(&mut table, owner, Outcome::Store(response(2_000)), now);
                    if reply == FinishReply::Stored {
                        stored += 1;
                    }
                }
                ClaimReply::Full => full += 1,
                other => panic!("{other:?}"),
            }
            if n % 8 == 0 {
                table.sweep(n / 8, 7, now).unwrap();
            }
        }
        assert!(stored > 3_000, "stored {stored}, full {full}");
        assert!(
            kv.keys() <= 1 + 4 + 64 + LEDGER_SHARDS,
            "{} keys",
            kv.keys()
        );
        assert!(kv.bytes() <= 80_000 + 64 * 200, "{} bytes", kv.bytes());
    }

    #[test]
    fn an_unknown_record_version_is_refused_not_overwritten() {
        let kv = MemoryKv::default();
        let mut table = table(&kv, r#"{"capacity_records": 16}"#);
        let mut bytes = Bucket::empty().encode();
        bytes[2] = 9;
        (&kv).set("idempotency/b/0", &bytes, None).unwrap();
        assert!(matches!(
            table.claim(&request(1, 1, 10), 0),
            Answer::Now(Err(StoreError::Unreadable(_)))
        ));
        assert_eq!((&kv).get("idempotency/b/0").unwrap().unwrap().0, bytes);
    }

    #[test]
    fn capacity_is_exact_when_not_a_multiple_of_the_bucket_size() {
        let kv = MemoryKv::default();
        let mut table = table(&kv, r#"{"capacity_records": 4}"#);
        for n in 0..4 {
            ticket(claim_now(&mut table, &request(n, 1, u64::from(n) + 1), 0));
        }
        assert_eq!(
            claim_now(&mut table, &request(9, 1, 99), 0),
            ClaimReply::Full
        );
    }

    #[test]
    fn boot_numbers_vms_uniquely() {
        let kv = MemoryKv::default();
        let mut a = Table::new(&kv, &config("{}"));
        let mut b = Table::new(&kv, &config("{}"));
        assert_eq!(a.boot(), Ok(1));
        assert_eq!(b.boot(), Ok(2));
    }
}
