//! The etcd store against the model: three Envoys, each with its local cache, sharing one etcd
//! whose answers come late, out of order, twice, or never (the request lost, or its answer).
//! Envoy fails a call at its timeout, so no answer comes later than that.
//!
//! What each call changed in etcd is checked as it is applied: a live record is never replaced
//! or removed by another claim, a complete record never changes before its TTL, and a record
//! completes only for the claim that holds it. What each Envoy answers is checked against what
//! etcd held: a replay is a complete record of that tuple and fingerprint, still live; a claim
//! is granted only what etcd wrote for it, with a lease not yet over.

use super::{audit, claim_of, explore, response, tick_clock};
use crate::core::garbage::Garbage;
use crate::core::lifecycle::{Block, Ending, Verdict};
use crate::core::record::{State, StoredResponse};
use crate::core::store::{
    Answer, CallId, CallResponse, ClaimReply, Handle, Remote, Resumed, Store, StoreError, Ticket,
};
use crate::core::Millis;
use crate::stores::etcd::fake::{cache_of, lost, parked, Calls, Envoy, FakeEtcd, World};
use crate::stores::testkit::MemoryKv;
use std::collections::HashMap;

const ENVOYS: usize = 3;
const TUPLES: u64 = 12;
const LEASE: Millis = 2_000;
const TTL: Millis = 20_000;
const TIMEOUT: Millis = 500;
const JSON: &str = r#"{"capacity_records": 64, "lease": "2s", "ttl": "20s",
    "etcd": {"cluster": "etcd", "timeout": "500ms"}}"#;

/// A call in flight: who made it, when, and for which claim (none for a finish or the store's
/// own work).
struct Call {
    envoy: usize,
    sent: Millis,
    claim: Option<(u64, u8)>,
}

/// Complete records etcd has held, per tuple: fingerprint, response and expiry.
type Completed = HashMap<u64, Vec<(u8, StoredResponse, Millis)>>;

struct Run {
    world: World,
    envoys: Vec<Envoy>,
    kvs: Vec<&'static MemoryKv>,
    calls: HashMap<CallId, Call>,
    /// Answers delivered once and kept to deliver again.
    delivered: Vec<(CallId, usize, Vec<u8>)>,
    /// Claims waiting inside an Envoy for a lease, by Envoy and the id they wait under.
    parked: HashMap<(usize, CallId), (u64, u8)>,
    completed: Completed,
    /// The revision etcd gave each claim it wrote, by token.
    written: HashMap<u64, u64>,
    /// Claims granted and not yet finished: tuple, Envoy, ticket.
    tickets: Vec<(u64, usize, Ticket)>,
    now: Millis,
}

impl Run {
    /// Registers the calls `envoy` made since `before`, for the claim of tuple `n` if any.
    fn made(&mut self, envoy: usize, before: usize, claim: Option<(u64, u8)>) {
        let after = self.world.calls.sent.borrow().len();
        for index in before..after {
            let sent = self.now;
            self.calls
                .insert(Calls::id(index), Call { envoy, sent, claim });
        }
    }

    /// A claim of tuple `n` (fingerprint `fp`) on `envoy` now waits under `call`.
    fn waits(&mut self, envoy: usize, call: CallId, claim: Option<(u64, u8)>) {
        if parked(call) {
            if let Some(claim) = claim {
                self.parked.insert((envoy, call), claim);
            }
        } else if let Some(made) = self.calls.get_mut(&call) {
            made.claim = claim;
        }
    }

    /// Checks what the claims waiting inside `envoy` that went on give; `lease_ends` when
    /// those answered were sent in a batch whose claims' leases end then.
    fn moved_on(&mut self, envoy: usize, lease_ends: Option<Millis>) -> Result<(), String> {
        for (call, resumed) in self.envoys[envoy].take_moved_on() {
            let Some((n, fp)) = self.parked.remove(&(envoy, call)) else {
                continue;
            };
            match resumed {
                Resumed::Claim(Answer::Later(next)) => self.waits(envoy, next, Some((n, fp))),
                Resumed::Claim(Answer::Now(reply)) => {
                    self.answered(envoy, n, fp, &reply, lease_ends)?
                }
                other => return Err(format!("a parked claim went on as {other:?}")),
            }
        }
        Ok(())
    }

    fn sent(&self) -> usize {
        self.world.calls.sent.borrow().len()
    }

    /// What `envoy` answered a claim of tuple `n` with fingerprint `fp`, now.
    fn answered(
        &mut self,
        envoy: usize,
        n: u64,
        fp: u8,
        reply: &Result<ClaimReply, StoreError>,
        granted_lease_ends: Option<Millis>,
    ) -> Result<(), String> {
        let now = self.now;
        let Ok(reply) = reply else {
            return Ok(()); // etcd unreachable or contended: a clear error, never a wrong answer
        };
        let held = self
            .completed
            .get(&n)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let fits = match reply {
            Verdict::Replay(response) => held
                .iter()
                .any(|(f, r, until)| *f == fp && *r == response.response && *until > now),
            Verdict::Claimed(ticket) => {
                self.tickets.push((n, envoy, *ticket));
                let written = self.written.get(&ticket.claim.token).copied();
                granted_lease_ends.is_some_and(|ends| ends > now)
                    && written.map(Handle::Revision) == Some(ticket.handle)
            }
            Verdict::Blocked(Block::Full | Block::QuotaExceeded) => false,
            Verdict::Blocked(_) => true,
        };
        if !fits {
            return Err(format!(
                "Envoy {envoy}, tuple {n} fingerprint {fp} at {now}: answered {reply:?}; etcd \
                 completed {held:?}"
            ));
        }
        Ok(())
    }

    /// etcd applies call `call`'s request; checks what it changed at each key it is about. Its
    /// answer.
    fn apply(&mut self, call: CallId) -> Result<Vec<u8>, String> {
        let (method, message) = self.world.calls.get(call);
        let keys = FakeEtcd::keys_of(method, &message);
        let etcd = &self.world.etcd;
        let before: Vec<_> = keys.iter().map(|k| etcd.keys.get(k).cloned()).collect();
        let answer = self.world.etcd.answer(method, &message);
        for (key, before) in keys.iter().zip(before) {
            let after = self.world.etcd.keys.get(key).cloned();
            self.changed(call, before, after)?;
        }
        Ok(answer)
    }

    /// Checks one key's change by call `call`.
    fn changed(
        &mut self,
        call: CallId,
        before: Option<(Vec<u8>, u64)>,
        after: Option<(Vec<u8>, u64)>,
    ) -> Result<(), String> {
        if before != after {
            let decode = |v: &Option<(Vec<u8>, u64)>| {
                v.as_ref().map(|(bytes, _)| {
                    let (entry, response) = crate::stores::etcd::value::decode(bytes).unwrap();
                    (entry, response.to_vec())
                })
            };
            let sent = self.calls.get(&call).map_or(self.now, |c| c.sent);
            let (old, new) = (decode(&before), decode(&after));
            if let Some((old, _)) = &old {
                let own = new.as_ref().is_some_and(|(e, _)| e.token == old.token);
                let live = old.deadline > sent;
                let changeable = old.state == State::InFlight && (own || new.is_none());
                if live && !changeable {
                    return Err(format!(
                        "call {call} at {sent} changed live {old:?} to {new:?}"
                    ));
                }
            }
            if let Some((entry, bytes)) = &new {
                let n = u64::from_le_bytes(entry.tuple[..8].try_into().unwrap());
                let taken = old.as_ref().is_some_and(|(o, _)| o.token != entry.token);
                if entry.state != State::InFlight && (taken || old.is_none()) {
                    return Err(format!("call {call}: {entry:?} written without a claim"));
                }
                if entry.state == State::InFlight {
                    let revision = after.as_ref().map_or(0, |(_, r)| *r);
                    self.written.insert(entry.token, revision);
                }
                if entry.state == State::Complete {
                    let response = StoredResponse::decode(bytes, entry.token).unwrap();
                    let fp = entry.fingerprint[0];
                    self.completed
                        .entry(n)
                        .or_default()
                        .push((fp, response, entry.deadline));
                }
            }
        }
        Ok(())
    }

    /// Hands `response` to the Envoy that made `call`, and checks what it gives.
    fn resume(&mut self, call: CallId, response: CallResponse) -> Result<(), String> {
        let Some(made) = self.calls.remove(&call) else {
            return Ok(());
        };
        let before = self.sent();
        let resumed = self.envoys[made.envoy].resume(call, response, self.now);
        self.made(made.envoy, before, made.claim);
        match resumed {
            Some(Resumed::Claim(Answer::Now(reply))) => {
                let (n, fp) = made.claim.ok_or("a claim's answer to a call of no claim")?;
                let lease_ends = made.sent + LEASE;
                self.answered(made.envoy, n, fp, &reply, Some(lease_ends))?;
            }
            Some(Resumed::Claim(Answer::Later(next))) => self.waits(made.envoy, next, made.claim),
            None => return Err(format!("Envoy {} did not know its call {call}", made.envoy)),
            Some(_) => {}
        }
        self.moved_on(made.envoy, Some(made.sent + LEASE))
    }
}

fn run(rng: &mut Garbage, steps: u64) -> Result<(), String> {
    let world = World::new();
    let (envoys, kvs) = (0..ENVOYS).map(|_| world.envoy_with_kv(JSON)).unzip();
    let mut run = Run {
        world,
        envoys,
        kvs,
        calls: HashMap::new(),
        delivered: Vec::new(),
        parked: HashMap::new(),
        completed: HashMap::new(),
        written: HashMap::new(),
        tickets: Vec::new(),
        now: 1_000,
    };
    let mut token = 0u64;
    for step in 0..steps {
        let e = rng.below(ENVOYS);
        let choice = rng.below(100);
        let outcome = if choice < 30 {
            token += 1;
            let (n, fp, claim) = claim_of(rng, TUPLES, token, |_| (LEASE, TTL));
            let before = run.sent();
            // A first attempt, or a duplicate waiting for it that looks again.
            let answer = match rng.below(3) {
                0 => run.envoys[e].poll(&claim, rng.below(2) == 0, run.now),
                _ => Some(run.envoys[e].claim(&claim, run.now)),
            };
            run.made(e, before, Some((n, fp)));
            match answer {
                Some(Answer::Now(reply)) => run.answered(e, n, fp, &reply, None),
                Some(Answer::Later(call)) => {
                    run.waits(e, call, Some((n, fp)));
                    Ok(())
                }
                _ => Ok(()),
            }
        } else if choice < 45 && !run.tickets.is_empty() {
            let (n, owner, ticket) = run.tickets.swap_remove(rng.below(run.tickets.len()));
            let ending = match rng.below(10) {
                0..=4 => Ending::Stored(response(n, ticket.claim.token, rng)),
                5 => Ending::Unstored { no_room: false },
                6 | 7 => Ending::Released,
                _ => Ending::Held,
            };
            run.envoys[owner].finish(ticket, ending, run.now);
            Ok(())
        } else if choice < 55 {
            // The root context's tick, or its waking for what waits on it.
            let before = run.sent();
            match rng.below(2) {
                0 => run.envoys[e].tick(run.now),
                _ if run.envoys[e].wants_root() => run.envoys[e].root_woke(run.now),
                _ => Vec::new(),
            };
            run.made(e, before, None);
            run.moved_on(e, None)
        } else if choice < 90 && !run.calls.is_empty() {
            // Any call in flight, in any order: answered, lost either way, or answered twice.
            let mut pending: Vec<CallId> = run.calls.keys().copied().collect();
            pending.sort_unstable();
            let call = pending[rng.below(pending.len())];
            match rng.below(20) {
                0 => run.resume(call, Err(lost())),
                1 => run.apply(call).and_then(|_| run.resume(call, Err(lost()))),
                2 => run.apply(call).and_then(|answer| {
                    let envoy = run.calls[&call].envoy;
                    run.delivered.push((call, envoy, answer.clone()));
                    run.resume(call, Ok(answer))
                }),
                _ => run
                    .apply(call)
                    .and_then(|answer| run.resume(call, Ok(answer))),
            }
        } else {
            // The same answer again: the Envoy has forgotten the call.
            let again = run.delivered.pop().map(|(call, envoy, answer)| {
                let known = run.envoys[envoy].resume(call, Ok(answer), run.now);
                match known {
                    None => Ok(()),
                    Some(resumed) => Err(format!("call {call} answered twice gave {resumed:?}")),
                }
            });
            again.unwrap_or(Ok(())).and_then(|()| {
                tick_clock(&mut run.now, rng, 2 * TTL);
                // Envoy fails every call at its timeout: applied or not.
                let late: Vec<CallId> = run
                    .calls
                    .iter()
                    .filter(|(_, c)| run.now - c.sent >= TIMEOUT)
                    .map(|(call, _)| *call)
                    .collect();
                late.into_iter().try_for_each(|call| {
                    if rng.below(2) == 0 {
                        run.apply(call)?;
                    }
                    run.resume(call, Err(lost()))
                })
            })
        };
        outcome
            .and_then(|()| {
                run.kvs
                    .iter()
                    .zip(&run.envoys)
                    .try_for_each(|(kv, envoy)| audit(kv, &[cache_of(envoy)], 64))
            })
            .map_err(|why| format!("step {step}: {why}"))?;
    }
    Ok(())
}

#[test]
fn the_etcd_store_keeps_every_invariant_with_answers_late_lost_and_twice() {
    explore("etcd model", run);
}
