//! Records sharded across several etcd clusters, and a reshard while a fleet runs: the protocol
//! of docs/etcd.md's "Sharding", checked before any store implements it.
//!
//! A tuple's record lives on the cluster its list of clusters ranks highest for it (rendezvous
//! hashing: adding a cluster moves only the tuples it now ranks highest). A reshard from list
//! `old` to list `new` goes in three phases, each Envoy moving on in its own time:
//! 0. every Envoy claims and finishes on `old`'s cluster for the tuple;
//! 1. once an Envoy has `new` too, it claims on both clusters (one, where they agree), in a fixed
//!    order, taking a record found on either as the answer, and finishes on both;
//! 2. once every Envoy is in phase 1, and a lease and a `ttl` have passed since the last got
//!    there (its old VM's claims end within a lease), an Envoy may drop `old`.
//!
//! Two Envoys in adjacent phases share a cluster for every tuple, where create-if-absent lets
//! one claim win; no Envoy is in phase 2 while another is in phase 0; and what was written in
//! phase 0 alone has expired before anyone stops looking there. So no key runs twice across a
//! reshard. The model runs a fleet through one, each claim's steps on its clusters interleaved
//! with everything else, and checks after every step that no tuple ran again while a claim of
//! it was live or its record unexpired. Dropping `old` too early must be caught.

use crate::core::garbage::Garbage;
use crate::core::Millis;
use std::collections::HashMap;

const ENVOYS: usize = 4;
const TUPLES: u64 = 16;
const LEASE: Millis = 1_000;
const TTL: Millis = 8_000;

type Cluster = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    InFlight { token: u64, until: Millis },
    Complete { token: u64, until: Millis },
}

impl Record {
    fn token(self) -> u64 {
        match self {
            Record::InFlight { token, .. } | Record::Complete { token, .. } => token,
        }
    }

    fn live(self, now: Millis) -> bool {
        match self {
            Record::InFlight { until, .. } | Record::Complete { until, .. } => until > now,
        }
    }
}

/// The cluster of `list` that ranks highest for tuple `n`.
fn owner(list: &[Cluster], n: u64) -> Cluster {
    let rank = |c: &Cluster| (n ^ (u64::from(*c) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7;
    list.iter().copied().max_by_key(rank).unwrap_or_default()
}

/// A claim going through its clusters, one step each, on the lists its Envoy had when the
/// request came (an Envoy's old VM finishes its requests with the old configuration). Its lease
/// runs from then: a claim not through its clusters by the lease's end gives up.
struct Claiming {
    envoy: usize,
    n: u64,
    token: u64,
    clusters: Vec<Cluster>,
    done: usize,
    lease_ends: Millis,
}
struct Fleet {
    clusters: HashMap<(Cluster, u64), Record>,
    /// Each Envoy's lists: `[old]`, `[old, new]` or `[new]`.
    lists: Vec<Vec<Vec<Cluster>>>,
    claiming: Vec<Claiming>,
    /// Owners running the work: tuple, token, clusters to finish on, lease end.
    running: Vec<(u64, u64, Vec<Cluster>, Millis)>,
    /// When each tuple last ran and until when that run's claim or record protects it.
    protected: HashMap<u64, Millis>,
    /// When the last Envoy entered phase 1.
    all_in_phase_one: Option<Millis>,
    now: Millis,
}

impl Fleet {
    /// The clusters an Envoy claims tuple `n` on, in a fixed order.
    fn clusters_of(&self, envoy: usize, n: u64) -> Vec<Cluster> {
        let mut clusters: Vec<Cluster> = self.lists[envoy].iter().map(|l| owner(l, n)).collect();
        clusters.sort_unstable();
        clusters.dedup();
        clusters
    }

    /// One claim's next cluster: create-if-absent (or over an expired record). A live record
    /// found ends the claim (a replay, or in progress), as does its lease ending; either way
    /// it undoes what it wrote.
    fn step(&mut self, at: usize) -> Result<(), String> {
        let now = self.now;
        let claim = &self.claiming[at];
        let key = (claim.clusters[claim.done], claim.n);
        if now >= claim.lease_ends || self.clusters.get(&key).is_some_and(|r| r.live(now)) {
            let claim = self.claiming.swap_remove(at);
            for cluster in &claim.clusters[..claim.done] {
                let mine = |r: &Record| r.token() == claim.token;
                if self.clusters.get(&(*cluster, claim.n)).is_some_and(mine) {
                    self.clusters.remove(&(*cluster, claim.n));
                }
            }
            return Ok(());
        }
        let (token, until) = (claim.token, claim.lease_ends);
        self.clusters.insert(key, Record::InFlight { token, until });
        let claim = &mut self.claiming[at];
        claim.done += 1;
        if claim.done < claim.clusters.len() {
            return Ok(());
        }
        let claim = self.claiming.swap_remove(at);
        if let Some(until) = self.protected.get(&claim.n).filter(|u| **u > now) {
            return Err(format!(
                "tuple {} ran again at {now}, protected until {until}, on Envoy {} (lists {:?})",
                claim.n, claim.envoy, self.lists
            ));
        }
        self.protected.insert(claim.n, claim.lease_ends);
        let run = (claim.n, claim.token, claim.clusters, claim.lease_ends);
        self.running.push(run);
        Ok(())
    }

    /// An owner's work ends: its record completes on each of its clusters that it still holds.
    fn finish(&mut self, at: usize) {
        let (n, token, clusters, lease_ends) = self.running.swap_remove(at);
        if lease_ends <= self.now {
            return;
        }
        let until = self.now + TTL;
        for cluster in clusters {
            if let Some(record) = self.clusters.get_mut(&(cluster, n)) {
                if record.token() == token {
                    *record = Record::Complete { token, until };
                }
            }
        }
        self.protected.insert(n, until);
    }

    /// Moves one Envoy a phase on, if the protocol allows it: phase 2 once the last record
    /// written in phase 0 alone has expired, a lease and a `ttl` after the last Envoy left it
    /// (`early`: without waiting).
    fn reshard(&mut self, envoy: usize, new: &[Cluster], early: bool) {
        match self.lists[envoy].len() {
            1 if self.lists[envoy][0] != new => {
                self.lists[envoy].push(new.to_vec());
                if self.lists.iter().all(|l| l.len() == 2 || l[0] == new) {
                    self.all_in_phase_one = Some(self.now);
                }
            }
            2 => {
                let waited = self
                    .all_in_phase_one
                    .is_some_and(|since| self.now >= since + LEASE + TTL);
                if early || waited {
                    self.lists[envoy] = vec![new.to_vec()];
                }
            }
            _ => {}
        }
    }
}

/// A fleet running claims and finishes while it reshards from two clusters to three, or from
/// three to two.
fn run(rng: &mut Garbage, steps: u64, early: bool) -> Result<(), String> {
    let (old, new): (Vec<Cluster>, Vec<Cluster>) = match rng.below(2) {
        0 => (vec![0, 1], vec![0, 1, 2]),
        _ => (vec![0, 1, 2], vec![0, 2]),
    };
    let mut fleet = Fleet {
        clusters: HashMap::new(),
        lists: vec![vec![old]; ENVOYS],
        claiming: Vec::new(),
        running: Vec::new(),
        protected: HashMap::new(),
        all_in_phase_one: None,
        now: 1_000,
    };
    for token in 1..=steps {
        match rng.below(100) {
            0..=34 => {
                let (envoy, n) = (rng.below(ENVOYS), rng.below(TUPLES as usize) as u64);
                let clusters = fleet.clusters_of(envoy, n);
                let lease_ends = fleet.now + LEASE;
                fleet.claiming.push(Claiming {
                    envoy,
                    n,
                    token,
                    clusters,
                    done: 0,
                    lease_ends,
                });
            }
            35..=69 if !fleet.claiming.is_empty() => {
                fleet.step(rng.below(fleet.claiming.len()))?;
            }
            70..=84 if !fleet.running.is_empty() => fleet.finish(rng.below(fleet.running.len())),
            85..=89 => fleet.reshard(rng.below(ENVOYS), &new, early),
            _ => fleet.now += rng.below(400) as Millis,
        }
    }
    let ran = fleet.protected.len();
    let finished = fleet
        .lists
        .iter()
        .all(|lists| lists.len() == 1 && lists[0] == new);
    if finished && ran > 0 {
        Ok(())
    } else {
        let lists = &fleet.lists;
        Err(format!(
            "the reshard did not finish ({lists:?}), {ran} tuples ran"
        ))
    }
}

#[test]
fn no_key_runs_twice_across_a_reshard_of_two_clusters_to_three_or_three_to_two() {
    super::explore("shards model", |rng, steps| run(rng, steps, false));
}

#[test]
fn the_model_catches_a_fleet_that_drops_the_old_clusters_before_their_records_expire() {
    let twice = |seed| {
        run(&mut Garbage::new(seed), 2_000, true).is_err_and(|why| why.contains("ran again"))
    };
    assert!(
        (1..=200u64).any(twice),
        "dropping old too early ran no key twice in 200 runs"
    );
}
