//! Leases shared by time window, and each organisation's share of etcd counted by the same
//! windows, both kept in this Envoy's shared data for every worker.
//!
//! A lease per kind and window, so that a record put during a window lives at least its span
//! under the window's lease, and etcd drops it at most two windows later; the share counts what
//! an organisation wrote in each window, so that what has expired drops out without a sweep.
//! A window's lease is granted ahead, in the second half of the window before, from the root
//! context's tick, so that requests seldom wait for a grant.

use crate::core::config::{Config, EtcdConfig};
use crate::core::record::{decode_counts, encode_counts, DecodeError};
use crate::core::Millis;
use crate::stores::{table, Kv};

/// Organisations' tags map onto this many counters of written bytes (a collision can only
/// over-count).
const SHARE_SLOTS: u16 = 4096;

const WRITTEN_MAGIC: [u8; 2] = *b"IW";

/// Lease windows a [`Written`] remembers: more than the thirteen that the etcd store counts as
/// possibly live (a record lease is `ttl` and one window long, a window `ttl / 8` or longer).
const WRITTEN_WINDOWS: usize = 16;

/// The bytes an organisation (all those whose tags share one slot) wrote into etcd through this
/// Envoy, by the lease window they were written in: what has expired drops out without a sweep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// (window, bytes), at `window % WRITTEN_WINDOWS`.
    windows: [(u64, u64); WRITTEN_WINDOWS],
}

impl Written {
    /// Bytes written in window `oldest` or later.
    pub fn since(&self, oldest: u64) -> u64 {
        self.windows
            .iter()
            .filter(|(window, _)| *window >= oldest)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// Adds `bytes` to `window`, reusing the slot of a window long past.
    pub fn add(&mut self, window: u64, bytes: u64) {
        let slot = &mut self.windows[window as usize % WRITTEN_WINDOWS];
        if slot.0 != window {
            *slot = (window, 0);
        }
        slot.1 = slot.1.saturating_add(bytes);
    }

    pub fn encode(&self) -> Vec<u8> {
        let counts: Vec<u64> = self.windows.iter().flat_map(|(w, b)| [*w, *b]).collect();
        encode_counts(WRITTEN_MAGIC, &counts)
    }

    pub fn decode(bytes: &[u8]) -> Result<Written, DecodeError> {
        let counts: [u64; 2 * WRITTEN_WINDOWS] = decode_counts(bytes, WRITTEN_MAGIC)?;
        let mut written = Written::default();
        for (slot, pair) in written.windows.iter_mut().zip(counts.chunks_exact(2)) {
            *slot = (pair[0], pair[1]);
        }
        Ok(written)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// Claims in flight and held claims, and records past their organisation's share: about
    /// `lease` long.
    Claim,
    /// Complete records: about `ttl` long.
    Record,
}

impl LeaseKind {
    pub const ALL: [LeaseKind; 2] = [LeaseKind::Claim, LeaseKind::Record];

    fn name(self) -> &'static str {
        match self {
            LeaseKind::Claim => "claim",
            LeaseKind::Record => "record",
        }
    }
}

pub struct Leases<K: Kv> {
    shared: K,
    prefix: String,
    ttl: Millis,
    claim_lease: Millis,
    max_share_bytes: u64,
}

impl<K: Kv> Leases<K> {
    pub fn new(shared: K, config: &Config, settings: &EtcdConfig) -> Self {
        Leases {
            shared,
            prefix: format!("{}etcd/", config.key_prefix),
            ttl: config.policy.ttl,
            claim_lease: config.policy.claim_lease(),
            max_share_bytes: settings.max_share_bytes as u64,
        }
    }

    /// Width of a lease's window, and the lease's length: every record put during a window
    /// lives at least `span` under that window's lease, granted as early as a window before.
    pub fn shape(&self, kind: LeaseKind) -> (Millis, Millis) {
        let span = match kind {
            LeaseKind::Claim => self.claim_lease,
            LeaseKind::Record => self.ttl,
        };
        let width = (span / 8).max(1_000);
        (width, span + 2 * width)
    }

    /// The lease of `kind` granted for the window of `now`, if one was.
    pub fn current(&self, kind: LeaseKind, now: Millis) -> Option<i64> {
        let (width, _) = self.shape(kind);
        self.granted(kind, now / width)
    }

    /// The window of `now` for leases of `kind`, and whether `now` is in its second half.
    pub fn window(&self, kind: LeaseKind, now: Millis) -> (u64, bool) {
        let (width, _) = self.shape(kind);
        (now / width, now % width >= width / 2)
    }

    /// Two slots per kind, the current window's and the next one's.
    fn slot(&self, kind: LeaseKind, window: u64) -> String {
        format!("{}lease/{}/{}", self.prefix, kind.name(), window % 2)
    }

    pub fn granted(&self, kind: LeaseKind, window: u64) -> Option<i64> {
        let (bytes, _) = self.shared.get(&self.slot(kind, window)).ok()??;
        let (granted, id) = bytes.split_at_checked(8)?;
        let granted = u64::from_le_bytes(granted.try_into().ok()?);
        let id = i64::from_le_bytes(id.try_into().ok()?);
        (granted == window).then_some(id)
    }

    pub fn remember(&self, kind: LeaseKind, window: u64, id: i64) {
        let mut value = window.to_le_bytes().to_vec();
        value.extend_from_slice(&id.to_le_bytes());
        if let Err(error) = self.shared.set(&self.slot(kind, window), &value, None) {
            log::warn!("caching an etcd lease failed: {error}");
        }
    }

    /// Whether a record of `bytes` for `org` may live its `ttl`: so if what the organisation
    /// wrote through this Envoy that may still be in etcd leaves room for it, and it is then
    /// counted. A failing shared data lets it live its `ttl`: the share gives way to the guarantee.
    pub fn within_share(&self, org: u16, bytes: u64, now: Millis) -> bool {
        let (width, length) = self.shape(LeaseKind::Record);
        let window = now / width;
        // A record's lease is its window's, or the next one's when its finish went out late; a
        // lease ends `length` after its grant, within its window.
        let oldest = (now.saturating_sub(length) / width).saturating_sub(2);
        let key = format!("{}share/{}", self.prefix, org % SHARE_SLOTS);
        let counted = table::count(
            &self.shared,
            &key,
            Written::decode,
            Written::encode,
            |written| {
                let mut written = written.unwrap_or_default();
                (written.since(oldest) + bytes <= self.max_share_bytes).then(|| {
                    written.add(window, bytes);
                    written
                })
            },
        );
        counted.unwrap_or_else(|error| {
            log::warn!("counting an organisation's share of etcd failed: {error}");
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_bytes_drop_out_with_their_window_and_round_trip() {
        let mut written = Written::default();
        written.add(100, 10);
        written.add(100, 5);
        written.add(105, 1);
        assert_eq!(written.since(100), 16);
        assert_eq!(written.since(101), 1);
        // Window 116 takes window 100's slot: what was written then is gone.
        written.add(116, 7);
        assert_eq!(written.since(0), 8);
        assert_eq!(Written::decode(&written.encode()), Ok(written));
        let mut long = written.encode();
        long.push(0);
        assert_eq!(Written::decode(&long), Err(DecodeError::Malformed));
    }

    #[test]
    fn written_bytes_refuse_garbage_without_panicking() {
        use crate::core::garbage;
        let mut written = Written::default();
        written.add(3, 900);
        let sample = written.encode();
        garbage::run("written bytes", |g| {
            let input = g.input(&[&sample], 512);
            if let Ok(read) = Written::decode(&input) {
                assert_eq!(Written::decode(&read.encode()), Ok(read));
            }
        });
    }
}
