//! The shared-data table against the model: three workers' tables over one Envoy's shared data.
//! A claim can race another worker's claim between its read and its write (the racer runs inside
//! the first write, as another thread would): the racer's decision then comes first.
//!
//! In a roomy table (no bucket can fill, shares and bytes never run out) every answer is the
//! model's exactly. In a tight one, complete records may be evicted, never within their grace:
//! an answer may then find one gone, and every record found gone must have been counted as
//! evicted.

use super::{audit, claim_of, explore, response, tick_clock};
use crate::core::config::Config;
use crate::core::garbage::Garbage;
use crate::core::lifecycle::{Block, Claim, Ending, Finished, Verdict};
use crate::core::record::StoredResponse;
use crate::core::store::{Answer, ClaimReply, Handle, Replay, Store, StoreError, Ticket};
use crate::core::Millis;
use crate::stores::table::Table;
use crate::stores::testkit::{config, MemoryKv};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

const WORKERS: usize = 3;
const LEASE: Millis = 2_000;
const TTL: Millis = 20_000;
/// An owner keeps this much of its lease to store its response (the table's margin).
const COMPLETION_MARGIN: Millis = 250;
/// No record is evicted sooner than this after it was stored: half the shorter route's TTL.
const GRACE: Millis = TTL / 8;

/// The `(lease, ttl)` of tuple `n`'s route: the even tuples' route keeps the listener's, the
/// odd ones' has its own, shorter, so records of both live side by side in every bucket.
fn policy_of(n: u64) -> (Millis, Millis) {
    if n.is_multiple_of(2) {
        (LEASE, TTL)
    } else {
        (LEASE / 2, TTL / 4)
    }
}

/// What the model says a tuple's record is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    InFlight {
        token: u64,
        fp: u8,
        until: Millis,
    },
    Held {
        fp: u8,
        until: Millis,
    },
    Complete {
        fp: u8,
        response: StoredResponse,
        until: Millis,
    },
    Unstored {
        fp: u8,
        until: Millis,
    },
}

impl Record {
    fn live(&self, now: Millis) -> bool {
        let (Record::InFlight { until, .. }
        | Record::Held { until, .. }
        | Record::Complete { until, .. }
        | Record::Unstored { until, .. }) = self;
        *until > now
    }

    fn fp(&self) -> u8 {
        let (Record::InFlight { fp, .. }
        | Record::Held { fp, .. }
        | Record::Complete { fp, .. }
        | Record::Unstored { fp, .. }) = self;
        *fp
    }

    /// Records the table may evict to make room.
    fn evictable(&self) -> bool {
        matches!(self, Record::Complete { .. } | Record::Unstored { .. })
    }
}

type Tables = Vec<Rc<RefCell<Table<&'static MemoryKv>>>>;
/// A racer's claim (its tuple and fingerprint) and what it was answered.
type Raced = (u64, u8, Claim, Answer<Result<ClaimReply, StoreError>>);

struct Model {
    /// Whether the table can evict or refuse (tight) or never does (roomy).
    tight: bool,
    records: HashMap<u64, Record>,
    /// Records found gone before their time, and evictions the tables counted.
    lost: usize,
    evicted: usize,
}

impl Model {
    /// Checks a claim's answer against the record, and learns from it.
    fn claimed(
        &mut self,
        n: u64,
        fp: u8,
        token: u64,
        reply: &Result<ClaimReply, StoreError>,
        now: Millis,
    ) -> Result<(), String> {
        let reply = reply.as_ref().map_err(|e| format!("tuple {n}: {e}"))?;
        let record = self.records.get(&n).filter(|r| r.live(now)).cloned();
        let expected = match &record {
            None => None,
            Some(r) if r.fp() != fp => Some(Verdict::Blocked(Block::Conflict)),
            Some(Record::InFlight { until, .. }) => Some(Verdict::Blocked(Block::InFlight {
                remaining: until - now,
            })),
            Some(Record::Held { until, .. }) => Some(Verdict::Blocked(Block::Held {
                remaining: until - now,
            })),
            Some(Record::Complete {
                response, until, ..
            }) => Some(Verdict::Replay(Replay {
                response: response.clone(),
                expires: *until,
            })),
            Some(Record::Unstored { .. }) => Some(Verdict::Blocked(Block::Unstored)),
        };
        let fits = match (&expected, reply) {
            (None, Verdict::Claimed(_)) => true,
            (Some(expected), reply) if expected == reply => true,
            // A tight table may refuse a new record, or have evicted the one there was.
            (None, Verdict::Blocked(Block::Full | Block::QuotaExceeded)) => self.tight,
            (
                Some(_),
                Verdict::Claimed(_) | Verdict::Blocked(Block::Full | Block::QuotaExceeded),
            ) if self.tight && record.as_ref().is_some_and(Record::evictable) => {
                self.lost += 1;
                self.records.remove(&n);
                true
            }
            _ => false,
        };
        if !fits {
            return Err(format!(
                "tuple {n} fingerprint {fp} at {now}: the model holds {record:?}, the table \
                 answered {reply:?}"
            ));
        }
        if let Verdict::Claimed(ticket) = reply {
            let Handle::Entry { lease_ends, .. } = ticket.handle else {
                return Err(format!("a table ticket without an entry: {ticket:?}"));
            };
            if lease_ends != now + policy_of(n).0 || ticket.claim.token != token {
                return Err(format!("tuple {n}: ticket {ticket:?} at {now}"));
            }
            let until = lease_ends;
            self.records
                .insert(n, Record::InFlight { token, fp, until });
        }
        if self.lost > self.evicted {
            return Err(format!(
                "{} records gone, {} evicted",
                self.lost, self.evicted
            ));
        }
        Ok(())
    }

    /// Checks a finish's answer against the record, and learns from it.
    fn finished(
        &mut self,
        n: u64,
        ticket: &Ticket,
        ending: &Ending<StoredResponse>,
        answer: &Result<Finished, StoreError>,
        now: Millis,
    ) -> Result<(), String> {
        let answer = answer.as_ref().map_err(|e| format!("tuple {n}: {e}"))?;
        let owner = match self.records.get(&n) {
            Some(Record::InFlight { token, fp, until })
                if *token == ticket.claim.token && *until > now =>
            {
                Some((*fp, *until))
            }
            _ => None,
        };
        let Some((fp, until)) = owner else {
            return match answer {
                Finished::Lost => Ok(()),
                other => Err(format!("tuple {n}: a finish past its claim was {other:?}")),
            };
        };
        let unstored = |no_room| Finished::Recorded(Ending::Unstored { no_room });
        let record = match (ending, *answer) {
            (Ending::Stored(_), a) if a == unstored(false) && until - now < COMPLETION_MARGIN => {
                Record::Unstored {
                    fp,
                    until: now + policy_of(n).1,
                }
            }
            (Ending::Stored(_), a) if a == unstored(true) && self.tight => Record::Unstored {
                fp,
                until: now + policy_of(n).1,
            },
            (Ending::Stored(response), Finished::Recorded(Ending::Stored(())))
                if until - now >= COMPLETION_MARGIN =>
            {
                let response = response.clone();
                Record::Complete {
                    fp,
                    response,
                    until: now + policy_of(n).1,
                }
            }
            (Ending::Unstored { .. }, a) if a == ending.recorded() => Record::Unstored {
                fp,
                until: now + policy_of(n).1,
            },
            (Ending::Held, Finished::Recorded(Ending::Held)) => Record::Held { fp, until },
            (Ending::Released, Finished::Recorded(Ending::Released)) => {
                self.records.remove(&n);
                return Ok(());
            }
            (ending, answer) => {
                return Err(format!(
                    "tuple {n} at {now}: {ending:?} answered {answer:?}"
                ));
            }
        };
        self.records.insert(n, record);
        Ok(())
    }
}

/// The workers' tables, each counting `reserve` records and bytes ahead of need.
fn tables(json: &str, reserve: (u64, u64)) -> (&'static MemoryKv, Tables, Config) {
    let kv: &'static MemoryKv = Box::leak(Box::default());
    let config = config(json);
    let tables = (0..WORKERS)
        .map(|_| {
            let mut table = Table::new(kv, &config).reserving(reserve.0, reserve.1);
            table.boot().unwrap();
            Rc::new(RefCell::new(table))
        })
        .collect();
    (kv, tables, config)
}

fn run(rng: &mut Garbage, steps: u64) -> Result<(), String> {
    let tight = rng.below(2) == 0;
    // Roomy: 4 buckets of 12 tuples each, room and shares for all. Tight: 60 tuples over 24
    // entries, small shares and few bytes.
    let (json, universe) = if tight {
        let json = r#"{"capacity_records": 24, "capacity_bytes": 8192, "max_share": 0.5,
            "max_response_body_bytes": 1024, "lease": "2s", "ttl": "20s"}"#;
        (json, 60)
    } else {
        let json = r#"{"capacity_records": 64, "max_share": 1.0, "lease": "2s", "ttl": "20s"}"#;
        (json, 48)
    };
    // Counts exact, or reserves of a few records and bytes ahead.
    let reserve = [(0, 0), (3, 700)][rng.below(2)];
    let (kv, tables, config) = tables(json, reserve);
    let mut model = Model {
        tight,
        records: HashMap::new(),
        lost: 0,
        evicted: 0,
    };
    let mut tickets: Vec<(u64, Ticket)> = Vec::new();
    let mut now: Millis = 1_000;
    let mut token = 0u64;
    // What a racer decided, inside another operation.
    let raced: Rc<RefCell<Vec<Raced>>> = Rc::default();
    for step in 0..steps {
        let w = rng.below(WORKERS);
        let racing = rng.below(3) == 0;
        if racing {
            token += 1;
            let other = tables[(w + 1 + rng.below(WORKERS - 1)) % WORKERS].clone();
            let (n, fp, claim) = claim_of(rng, universe, token, policy_of);
            let raced = raced.clone();
            *kv.interleave.borrow_mut() = Some(Box::new(move |_| {
                let answer = other.borrow_mut().claim(&claim, now);
                raced.borrow_mut().push((n, fp, claim, answer));
            }));
        }
        let choice = rng.below(100);
        let outcome = if choice < 45 {
            token += 1;
            let (n, fp, claim) = claim_of(rng, universe, token, policy_of);
            let answer = tables[w].borrow_mut().claim(&claim, now);
            kv.interleave.borrow_mut().take();
            settle_races(&mut model, &raced, &mut tickets, now)?;
            let Answer::Now(reply) = answer else {
                return Err(format!("the table answered later: {answer:?}"));
            };
            if let Ok(Verdict::Claimed(ticket)) = &reply {
                tickets.push((n, *ticket));
            }
            model.claimed(n, fp, token, &reply, now)
        } else if choice < 80 && !tickets.is_empty() {
            let (n, ticket) = tickets.swap_remove(rng.below(tickets.len()));
            let ending = match rng.below(10) {
                0..=4 => Ending::Stored(response(n, ticket.claim.token, rng)),
                5 => Ending::Unstored {
                    no_room: rng.below(2) == 0,
                },
                6 | 7 => Ending::Released,
                _ => Ending::Held,
            };
            let answer = tables[w].borrow_mut().finish(ticket, ending.clone(), now);
            kv.interleave.borrow_mut().take();
            settle_races(&mut model, &raced, &mut tickets, now)?;
            let Answer::Now(answer) = answer else {
                return Err(format!("the table finished later: {answer:?}"));
            };
            model.finished(n, &ticket, &ending, &answer, now)
        } else if choice < 90 {
            tables[w].borrow_mut().tick(now);
            kv.interleave.borrow_mut().take();
            settle_races(&mut model, &raced, &mut tickets, now)
        } else {
            kv.interleave.borrow_mut().take();
            // An owner that never finishes (its VM died) is forgotten now and then.
            if tickets.len() > 24 {
                tickets.swap_remove(rng.below(tickets.len()));
            }
            tick_clock(&mut now, rng, 2 * TTL);
            Ok(())
        };
        for table in &tables {
            let ages = table.borrow_mut().take_evictions();
            if let Some(young) = ages.iter().find(|age| **age < GRACE) {
                return Err(format!(
                    "step {step}: a record evicted {young} ms after it was stored"
                ));
            }
            model.evicted += ages.len();
        }
        if !tight && model.evicted > 0 {
            return Err("a roomy table evicted".into());
        }
        outcome
            .and_then(|()| {
                let tables: Vec<_> = tables.iter().map(|t| t.borrow()).collect();
                let tables: Vec<_> = tables.iter().map(|t| &**t).collect();
                audit(kv, &tables, config.capacity_records as u64)
            })
            .map_err(|why| {
                format!(
                    "step {step} ({} table): {why}",
                    ["roomy", "tight"][usize::from(tight)]
                )
            })?;
    }
    Ok(())
}

/// Checks what racers decided inside the last operation: they came first.
fn settle_races(
    model: &mut Model,
    raced: &RefCell<Vec<Raced>>,
    tickets: &mut Vec<(u64, Ticket)>,
    now: Millis,
) -> Result<(), String> {
    for (n, fp, claim, answer) in raced.borrow_mut().drain(..) {
        let Answer::Now(reply) = answer else {
            return Err(format!("the table answered a racer later: {answer:?}"));
        };
        if let Ok(Verdict::Claimed(ticket)) = &reply {
            tickets.push((n, *ticket));
        }
        model.claimed(n, fp, claim.token, &reply, now)?;
    }
    Ok(())
}

#[test]
fn the_table_keeps_every_invariant_under_random_interleavings() {
    explore("table model", run);
}
