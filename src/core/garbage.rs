//! Seeded garbage for tests of the parsers: random bytes, and valid inputs mutated. A failing
//! case names its seed, so `GARBAGE_SEED=<seed> cargo test <test>` replays it; `GARBAGE_CASES`
//! sets how many cases each test tries (`make fuzz` runs a million).

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Cases per test in `cargo test`: enough to cover every branch of a decoder many times over.
const DEFAULT_CASES: u64 = 20_000;

pub struct Garbage {
    state: u64,
}

impl Garbage {
    pub fn new(seed: u64) -> Garbage {
        Garbage { state: seed | 1 }
    }

    /// xorshift64*: small, seeded, and the same on every machine.
    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// `valid` with a few bytes flipped, cut, inserted or repeated, or a random prefix of it.
    pub fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut out = valid.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(5) {
                0 if at < out.len() => out[at] ^= 1 << self.below(8),
                1 => out.truncate(at),
                2 => out.insert(at, self.next() as u8),
                3 if at < out.len() => {
                    let end = (at + self.below(16)).min(out.len());
                    let run = out[at..end].to_vec();
                    out.splice(at..at, run);
                }
                _ if at < out.len() => out[at] = self.next() as u8,
                _ => out.push(self.next() as u8),
            }
        }
        out
    }

    /// One case for a parser: one time in four up to `max` random bytes, else one of `valid`
    /// mutated.
    pub fn input<T: AsRef<[u8]>>(&mut self, valid: &[T], max: usize) -> Vec<u8> {
        match self.below(4) {
            0 => self.bytes(max),
            _ => {
                let sample = self.below(valid.len());
                self.mutate(valid[sample].as_ref())
            }
        }
    }
}

/// Runs `case` on `GARBAGE_CASES` seeded generators; a panic fails the test with its seed.
pub fn run(name: &str, mut case: impl FnMut(&mut Garbage)) {
    let cases = env_u64("GARBAGE_CASES").unwrap_or(DEFAULT_CASES);
    let first = env_u64("GARBAGE_SEED");
    let base = first.unwrap_or(0x9e37_79b9_7f4a_7c15);
    let count = if first.is_some() { 1 } else { cases };
    for n in 0..count {
        let seed = base.wrapping_add(n.wrapping_mul(0x6a09_e667_f3bc_c909)) | 1;
        let mut garbage = Garbage::new(seed);
        if catch_unwind(AssertUnwindSafe(|| case(&mut garbage))).is_err() {
            panic!("{name}: case {n} failed: replay it with GARBAGE_SEED={seed}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}
