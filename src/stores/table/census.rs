//! How many records and stored response bytes the table holds, for its gauges: each worker
//! adds what its own bucket writes changed to one shared census key, once a second, so that the
//! total is the whole table's whichever worker reads it.

use super::bucket::Bucket;
use super::{Table, INSERT_IF_ABSENT, MAX_ATTEMPTS};
use crate::core::record::State;
use crate::core::store::StoreError;
use crate::stores::Kv;

/// Records and stored response bytes, or a change in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Census {
    pub records: i64,
    pub bytes: i64,
}

impl Census {
    pub(super) fn of(bucket: &Bucket) -> Census {
        let mut census = Census::default();
        for entry in &bucket.entries {
            census.records += i64::from(entry.state.is_record());
            if entry.state == State::Complete {
                census.bytes += i64::from(entry.response_len);
            }
        }
        census
    }

    pub(super) fn plus(self, other: Census) -> Census {
        Census {
            records: self.records + other.records,
            bytes: self.bytes + other.bytes,
        }
    }

    pub(super) fn minus(self, other: Census) -> Census {
        self.plus(Census {
            records: -other.records,
            bytes: -other.bytes,
        })
    }

    fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.records.to_le_bytes());
        out[8..].copy_from_slice(&self.bytes.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Census> {
        let half = |at: usize| Some(i64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        Some(Census {
            records: half(0)?,
            bytes: half(8)?,
        })
    }
}

impl<K: Kv> Table<K> {
    /// Adds what this worker changed to the census key; returns the table's census.
    pub(crate) fn count_census(&self) -> Result<Census, StoreError> {
        let key = self.key("g", 0);
        let changed = self.census.get();
        for _ in 0..MAX_ATTEMPTS {
            let (whole, cas) = match self.kv.get(&key)? {
                Some((bytes, cas)) => (Census::decode(&bytes).unwrap_or_default(), Some(cas)),
                None => (Census::default(), INSERT_IF_ABSENT),
            };
            if changed == Census::default() {
                return Ok(whole);
            }
            let whole = whole.plus(changed);
            if self.kv.set(&key, &whole.encode(), cas)? {
                self.census.set(Census::default());
                return Ok(whole);
            }
        }
        Err(StoreError::Contended)
    }
}
