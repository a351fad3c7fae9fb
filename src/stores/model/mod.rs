//! The stores against a model: seeded random interleavings of several workers' claims, finishes
//! of every ending, waits, take-overs, sweeps and a clock that jumps, over the shared-data table
//! (`table`) and over etcd with answers delayed, reordered, duplicated and lost (`etcd`); and the
//! protocol for records sharded over several etcd clusters through a reshard (`shards`). After
//! every step the invariants of the README's guarantees are checked against what the model
//! knows:
//! - at most one owner per tuple within a lease;
//! - a complete record replays unchanged until its TTL (or, where the table evicts, until it is
//!   counted as evicted);
//! - a conflict never alters a record;
//! - nothing replays into another scope (every tuple's responses name the tuple);
//! - the bytes and records the ledgers and shares account are the ones the table holds, with
//!   what each worker counted ahead of need.
//!
//! `MODEL_STEPS` sets the steps of each test (`make fuzz` runs many more); a failure names its
//! run's seed, and `MODEL_SEED=<seed> cargo test <test>` replays that run alone.

mod etcd;
mod shards;
mod table;

use crate::core::config::LEDGER_SHARDS;
use crate::core::garbage::Garbage;
use crate::core::identity::Digest32;
use crate::core::lifecycle::Claim;
use crate::core::record::{State, StoredResponse};
use crate::core::Millis;
use crate::stores::table::bucket::{Bucket, BUCKET_ENTRIES};
use crate::stores::table::tally::{Ledger, Share};
use crate::stores::table::{Census, Table, Tally};
use crate::stores::testkit::MemoryKv;
use crate::stores::Kv;
use std::collections::HashMap;

/// Steps of each model test in a plain `cargo test` (`make unit` runs a million in release).
const DEFAULT_STEPS: u64 = 20_000;
/// Steps of one run, each with a fresh store and its own seed.
const RUN_STEPS: u64 = 2_000;

/// Runs `steps` (`MODEL_STEPS`) steps of `run` as runs of `RUN_STEPS`, each from its own seed.
pub fn explore(name: &str, mut run: impl FnMut(&mut Garbage, u64) -> Result<(), String>) {
    let steps = env_u64("MODEL_STEPS").unwrap_or(DEFAULT_STEPS);
    let only = env_u64("MODEL_SEED");
    let runs = if only.is_some() {
        1
    } else {
        steps.div_ceil(RUN_STEPS)
    };
    let base = only.unwrap_or(0x243f_6a88_85a3_08d3);
    for n in 0..runs {
        let seed = base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        if let Err(why) = run(&mut Garbage::new(seed), RUN_STEPS) {
            panic!("{name}: run {n} broke an invariant: {why}\nreplay it with MODEL_SEED={seed}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// A claim of one of `universe` tuples, with one of two fingerprints, under the `(lease, ttl)`
/// that `policy` gives the tuple's route: the tuple's number, the fingerprint's, and the claim.
pub fn claim_of(
    rng: &mut Garbage,
    universe: u64,
    token: u64,
    policy: impl Fn(u64) -> (Millis, Millis),
) -> (u64, u8, Claim) {
    let n = rng.below(universe as usize) as u64;
    let (lease, ttl) = policy(n);
    let fp = 1 + rng.below(2) as u8;
    let claim = Claim {
        tuple: tuple(n),
        fingerprint: [fp; 16],
        token,
        lease,
        ttl,
        org: (n % u64::from(ORGS)) as u16,
    };
    (n, fp, claim)
}

/// A tuple of the model: its number, in the first bytes (which pick its bucket) and the rest.
pub fn tuple(n: u64) -> Digest32 {
    let mut tuple = [n as u8; 32];
    tuple[..8].copy_from_slice(&n.to_le_bytes());
    tuple
}

/// The response the upstream gives attempt `token` at tuple `n`: it names both, so a replay of
/// it anywhere else is seen.
pub fn response(n: u64, token: u64, rng: &mut Garbage) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("x-tuple".into(), n.to_string())],
        body: format!("{n}:{token}:{}", "x".repeat(rng.below(400))).into_bytes(),
    }
}

/// What a table holds, read back key by key: each ledger shard must account exactly the bytes
/// of its buckets' complete records and each organisation's share exactly its records and their
/// bytes, with what every worker's table (`tables`, over `kv`) reserved of them; each response
/// key must hold its record's bytes. No sweep is half-done between steps.
pub fn audit(kv: &MemoryKv, tables: &[&Table<&MemoryKv>], capacity: u64) -> Result<(), String> {
    let table = tables.first().ok_or("no table to audit")?;
    let reserved = |tally| {
        tables.iter().fold((0, 0), |(records, bytes), table| {
            let held = table.reserved(tally);
            (records + held.records, bytes + held.bytes)
        })
    };
    let read = |key: String| (&kv).get(&key).map_err(|e| e.to_string());
    let mut ledgers = [0u64; LEDGER_SHARDS];
    let mut shares: HashMap<u16, Share> = HashMap::new();
    for bucket in 0..capacity.div_ceil(BUCKET_ENTRIES as u64) {
        let Some((bytes, _)) = read(table.key("b", bucket))? else {
            continue;
        };
        let entries = Bucket::decode(&bytes).map_err(|e| format!("bucket {bucket}: {e:?}"))?;
        for (slot, entry) in entries.entries.iter().enumerate() {
            let global = bucket * BUCKET_ENTRIES as u64 + slot as u64;
            if entry.state == State::Sweeping {
                return Err(format!("entry {global} is left sweeping"));
            }
            if !entry.state.is_record() {
                continue;
            }
            let share = shares.entry(entry.org).or_default();
            share.records += 1;
            if entry.state == State::Complete {
                let len = u64::from(entry.response_len);
                ledgers[bucket as usize % LEDGER_SHARDS] += len;
                share.bytes += len;
                let held = read(table.key("r", global))?.map_or(0, |(v, _)| v.len() as u64);
                if held != len {
                    return Err(format!(
                        "entry {global} accounts {len} B, its key holds {held}"
                    ));
                }
            }
        }
    }
    // Once every worker has added its changes, the census is the table's exactly.
    let mut census = None;
    for table in tables {
        census = Some(table.count_census().map_err(|e| e.to_string())?);
    }
    let records = shares.values().map(|share| share.records as i64).sum();
    let bytes = ledgers.iter().sum::<u64>() as i64;
    if census != Some(Census { records, bytes }) {
        return Err(format!(
            "the census counts {census:?}, the buckets hold {records} records and {bytes} B"
        ));
    }
    for (shard, held) in ledgers.iter().enumerate() {
        let ledger = read(table.key("l", shard as u64))?;
        let counted = ledger.map_or(Ok(0), |(v, _)| Ledger::decode(&v).map(|l| l.total));
        let (_, reserved) = reserved(Tally::Ledger(shard as u64));
        if counted != Ok(*held + reserved) {
            return Err(format!(
                "ledger {shard} counts {counted:?}, its buckets hold {held}, the tables reserved \
                 {reserved}"
            ));
        }
    }
    for org in 0..ORGS {
        let held = shares.remove(&org).unwrap_or_default();
        let counted = match read(table.key("s", u64::from(org)))? {
            Some((v, _)) => Share::decode(&v).map_err(|e| format!("share {org}: {e:?}"))?,
            None => Share::default(),
        };
        let (records, bytes) = reserved(Tally::Share(u64::from(org)));
        let held = if table.counts(Tally::Share(0)) {
            held
        } else {
            Share::default()
        };
        if (counted.records, counted.bytes) != (held.records + records, held.bytes + bytes) {
            return Err(format!(
                "organisation {org}'s share counts {counted:?}, holds {held:?}, the tables \
                 reserved {records} records and {bytes} B"
            ));
        }
    }
    Ok(())
}

/// Organisations the model's tuples belong to (tuple `n` to `n % ORGS`).
pub const ORGS: u16 = 3;

/// A clock that mostly creeps and sometimes jumps far past leases and TTLs.
pub fn tick_clock(now: &mut Millis, rng: &mut Garbage, far: Millis) {
    *now += match rng.below(50) {
        0 => far / 2 + rng.below(far as usize) as Millis,
        _ => rng.below(300) as Millis,
    };
}
