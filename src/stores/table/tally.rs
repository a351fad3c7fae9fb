//! The table's shared counters (the ledger shards and the organisations' shares), and what this
//! worker holds of them ahead of need.
//!
//! Every record counts in its organisation's share and every stored response in a ledger shard,
//! each by a compare-and-swap on a key all workers write. A worker that must count takes a top-up
//! more than it needs (a 256th of the counter's limit) and counts its next claims and stores out
//! of that reserve, touching no shared counter. A counter then holds what its records hold plus
//! every worker's reserve: never more than its limit, and more than its records by at most a
//! top-up per worker, so a limit can refuse or evict that much early. Whatever is given back goes
//! straight to the counter, and a reserve unused for `RESERVE_IDLE` goes back from the tick.

use super::{unreadable, INSERT_IF_ABSENT, MAX_ATTEMPTS};
use crate::core::record::{decode_counts, encode_counts, DecodeError};
use crate::core::store::StoreError;
use crate::core::Millis;
use crate::stores::Kv;
use std::collections::HashMap;

const LEDGER_MAGIC: [u8; 2] = *b"IL";
const SHARE_MAGIC: [u8; 2] = *b"IS";

/// The response bytes one ledger shard accounts for. Bytes are added before a response is
/// written and taken off after it is cleared, so an interrupted owner can only over-count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    pub total: u64,
}

impl Ledger {
    pub fn encode(&self) -> Vec<u8> {
        encode_counts(LEDGER_MAGIC, &[self.total])
    }

    pub fn decode(bytes: &[u8]) -> Result<Ledger, DecodeError> {
        let [total] = decode_counts(bytes, LEDGER_MAGIC)?;
        Ok(Ledger { total })
    }
}

/// What the organisations whose tags share one slot of the share table hold: records (live or
/// not yet reclaimed), and bytes of stored responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    pub records: u64,
    pub bytes: u64,
}

impl Share {
    pub fn encode(&self) -> Vec<u8> {
        encode_counts(SHARE_MAGIC, &[self.records, self.bytes])
    }

    pub fn decode(bytes: &[u8]) -> Result<Share, DecodeError> {
        let [records, bytes] = decode_counts(bytes, SHARE_MAGIC)?;
        Ok(Share { records, bytes })
    }
}

/// A reserve is at most this part of its counter's limit, so limits too small to part keep
/// exact counts.
const TOP_UP_PART: u64 = 256;
const MAX_TOP_UP_RECORDS: u64 = 64;
const MAX_TOP_UP_BYTES: u64 = 256 << 10;
/// A reserve untouched this long goes back. A VM that stops (a trap, or torn down within this
/// of its last request) leaves its reserves counted until Envoy restarts.
pub const RESERVE_IDLE: Millis = 1_000;
/// Idle reserves given back in one tick, so that the tick after a burst over many organisations
/// stays short.
const RETURNS_PER_TICK: usize = 16;

/// One shared counter: a ledger shard, or a slot of the share table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tally {
    Ledger(u64),
    Share(u64),
}

impl Tally {
    /// Its key in shared data, under the table's `space`.
    fn key(self, space: &str) -> String {
        match self {
            Tally::Ledger(shard) => super::key_in(space, "l", shard),
            Tally::Share(slot) => super::key_in(space, "s", slot),
        }
    }
}

/// Records and response bytes (a ledger shard counts bytes only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub records: u64,
    pub bytes: u64,
}

impl Amount {
    pub fn bytes(bytes: u64) -> Amount {
        Amount { records: 0, bytes }
    }

    pub fn records(records: u64) -> Amount {
        Amount { records, bytes: 0 }
    }

    fn short_of(self, need: Amount) -> Amount {
        Amount {
            records: need.records.saturating_sub(self.records),
            bytes: need.bytes.saturating_sub(self.bytes),
        }
    }

    /// `self` and a top-up more, in what `self` has any of.
    fn ahead(self, top_up: Amount) -> Amount {
        let more = |short: u64, top_up: u64| if short > 0 { short + top_up } else { 0 };
        Amount {
            records: more(self.records, top_up.records),
            bytes: more(self.bytes, top_up.bytes),
        }
    }
}

/// What each counter may reach.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub shard_bytes: u64,
    pub share: Amount,
}

/// Adds `records` and `bytes` (either may be negative) to counter `tally` of the table in
/// `space`; refuses (false) an addition past `limits`. Taking off is never refused.
pub fn add(
    kv: &impl Kv,
    space: &str,
    tally: Tally,
    limits: &Limits,
    records: i64,
    bytes: i64,
) -> Result<bool, StoreError> {
    let key = &tally.key(space);
    match tally {
        Tally::Ledger(_) => count(kv, key, Ledger::decode, Ledger::encode, |ledger| {
            let total = ledger.map_or(0, |l| l.total).saturating_add_signed(bytes);
            (bytes <= 0 || total <= limits.shard_bytes).then_some(Ledger { total })
        }),
        Tally::Share(_) => count(kv, key, Share::decode, Share::encode, |share| {
            let share = share.unwrap_or_default();
            let next = Share {
                records: share.records.saturating_add_signed(records),
                bytes: share.bytes.saturating_add_signed(bytes),
            };
            let over = (records > 0 && next.records > limits.share.records)
                || (bytes > 0 && next.bytes > limits.share.bytes);
            (!over).then_some(next)
        }),
    }
}

/// Reads a counter in shared data, lets `change` compute its next value (`None`: refused), and
/// writes it under compare-and-swap; whether it was written.
pub fn count<T>(
    kv: &impl Kv,
    key: &str,
    decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
    encode: impl Fn(&T) -> Vec<u8>,
    change: impl Fn(Option<T>) -> Option<T>,
) -> Result<bool, StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let (current, cas) = match kv.get(key)? {
            Some((bytes, cas)) => (Some(decode(&bytes).map_err(unreadable)?), Some(cas)),
            None => (None, INSERT_IF_ABSENT),
        };
        let Some(next) = change(current) else {
            return Ok(false);
        };
        if kv.set(key, &encode(&next), cas)? {
            return Ok(true);
        }
    }
    Err(StoreError::Contended)
}

#[derive(Debug, Clone, Copy)]
struct Reserve {
    held: Amount,
    used: Millis,
}

/// This worker's reserves, at most one per counter.
#[derive(Debug)]
pub struct Reserves {
    ledger_top_up: Amount,
    share_top_up: Amount,
    held: HashMap<Tally, Reserve>,
}

impl Reserves {
    pub fn new(limits: &Limits) -> Reserves {
        let part = |limit: u64, max: u64| (limit / TOP_UP_PART).min(max);
        Reserves {
            ledger_top_up: Amount::bytes(part(limits.shard_bytes, MAX_TOP_UP_BYTES)),
            share_top_up: Amount {
                records: part(limits.share.records, MAX_TOP_UP_RECORDS),
                bytes: part(limits.share.bytes, MAX_TOP_UP_BYTES),
            },
            held: HashMap::new(),
        }
    }

    /// Counts `need` in `tally`: out of the reserve where it covers it, else by `add` to the
    /// shared counter (false: refused past its limit), a top-up ahead where the limit allows.
    /// False when the counter cannot take `need`.
    pub fn take<E>(
        &mut self,
        tally: Tally,
        need: Amount,
        now: Millis,
        mut add: impl FnMut(Amount) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let top_up = match tally {
            Tally::Ledger(_) => self.ledger_top_up,
            Tally::Share(_) => self.share_top_up,
        };
        let reserve = self.held.entry(tally).or_insert(Reserve {
            held: Amount::default(),
            used: now,
        });
        let held = &mut reserve.held;
        let short = held.short_of(need);
        if short != Amount::default() {
            let ahead = short.ahead(top_up);
            let got = if ahead != short && add(ahead)? {
                ahead
            } else if add(short)? {
                short
            } else {
                return Ok(false);
            };
            held.records += got.records;
            held.bytes += got.bytes;
        }
        held.records -= need.records;
        held.bytes -= need.bytes;
        reserve.used = now;
        Ok(true)
    }

    /// Takes out some of the reserves unused for `RESERVE_IDLE`, to be given back.
    pub fn idle(&mut self, now: Millis) -> Vec<(Tally, Amount)> {
        let idle: Vec<Tally> = self
            .held
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.used) >= RESERVE_IDLE)
            .map(|(tally, _)| *tally)
            .take(RETURNS_PER_TICK)
            .collect();
        idle.into_iter()
            .filter_map(|tally| Some((tally, self.held.remove(&tally)?.held)))
            .filter(|(_, held)| *held != Amount::default())
            .collect()
    }

    /// Keeps a reserve that could not be given back, to give it back later.
    pub fn keep(&mut self, tally: Tally, held: Amount, now: Millis) {
        self.held.insert(tally, Reserve { held, used: now });
    }

    #[cfg(test)]
    pub fn held(&self, tally: Tally) -> Amount {
        self.held
            .get(&tally)
            .map_or_else(Amount::default, |r| r.held)
    }

    /// Top-ups of `records` and `bytes` for every counter, whatever its limit.
    #[cfg(test)]
    pub fn with_top_ups(self, records: u64, bytes: u64) -> Reserves {
        Reserves {
            ledger_top_up: Amount::bytes(bytes),
            share_top_up: Amount { records, bytes },
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledgers_and_shares_round_trip_and_check_their_length() {
        let ledger = Ledger { total: 123_456 };
        assert_eq!(Ledger::decode(&ledger.encode()), Ok(ledger));
        let mut long = ledger.encode();
        long.push(0);
        assert_eq!(Ledger::decode(&long), Err(DecodeError::Malformed));
        let share = Share {
            records: 7,
            bytes: 1 << 40,
        };
        assert_eq!(Share::decode(&share.encode()), Ok(share));
        let mut long = share.encode();
        long.push(0);
        assert_eq!(Share::decode(&long), Err(DecodeError::Malformed));
    }

    #[test]
    fn counters_refuse_garbage_without_panicking() {
        use crate::core::garbage;
        let samples = [
            Ledger { total: 5 }.encode(),
            Share {
                records: 2,
                bytes: 900,
            }
            .encode(),
        ];
        garbage::run("counters", |g| {
            let input = g.input(&samples, 64);
            if let Ok(ledger) = Ledger::decode(&input) {
                assert_eq!(Ledger::decode(&ledger.encode()), Ok(ledger));
            }
            if let Ok(share) = Share::decode(&input) {
                assert_eq!(Share::decode(&share.encode()), Ok(share));
            }
        });
    }
}
