//! What a finish writes, and under which lease.

use super::leases::LeaseKind;
use super::ops::Op;
use super::{value, wire, Etcd};
use crate::core::lifecycle::{Claim, Ending};
use crate::core::record::{Entry, State, StoredResponse};
use crate::core::Millis;
use crate::stores::{Caller, Kv};

impl<C: Caller, K: Kv> Etcd<C, K> {
    pub(super) fn finish_op(
        &mut self,
        claim: Claim,
        revision: u64,
        ending: Ending<StoredResponse>,
        now: Millis,
    ) -> Op {
        let entry = |state, deadline, response_len| Entry {
            state,
            tuple: claim.tuple,
            fingerprint: claim.fingerprint,
            token: claim.token,
            deadline,
            response_len,
            org: claim.org,
            stored: now,
        };
        let recorded = ending.recorded();
        let give_up = now + claim.lease;
        let op = |value, lease, response| Op::Finish {
            claim,
            revision,
            value,
            lease,
            recorded,
            response,
            give_up,
            retried: false,
        };
        match ending {
            Ending::Stored(response) => {
                let bytes = response.encode(claim.token, self.compress);
                if bytes.len() > self.settings.max_value_bytes {
                    let unstored = Ending::Unstored { no_room: false };
                    return self.finish_op(claim, revision, unstored, now);
                }
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let written = value::ENTRY_LEN + bytes.len();
                let (lease, expires) = self.record_lease(&claim, written, now);
                let value = value::encode(&entry(State::Complete, expires, len), Some(&bytes));
                op(Some(value), lease, Some((response, expires)))
            }
            Ending::Unstored { .. } => {
                let (lease, expires) = self.record_lease(&claim, value::ENTRY_LEN, now);
                let value = value::encode(&entry(State::Unstored, expires, 0), None);
                op(Some(value), lease, None)
            }
            Ending::Released => op(None, LeaseKind::Claim, None),
            Ending::Held => {
                let value = value::encode(&entry(State::Held, now + claim.lease, 0), None);
                op(Some(value), LeaseKind::Claim, None)
            }
        }
    }

    /// The lease a record whose value is `written` bytes long goes under, and when it expires:
    /// its `ttl` within its organisation's share, else `lease` (an eviction at that age) unless
    /// its `ttl` is shorter. The claim's `ttl` and `lease` are at most the listener's, which
    /// the leases of their kinds last.
    pub(super) fn record_lease(
        &mut self,
        claim: &Claim,
        written: usize,
        now: Millis,
    ) -> (LeaseKind, Millis) {
        let key =
            self.settings.key_prefix.len() + wire::RECORD_FORMAT.len() + 2 * claim.tuple.len();
        let bytes = (key + written) as u64;
        if self.leases.within_share(claim.org, bytes, now) {
            (LeaseKind::Record, now + claim.ttl)
        } else {
            let lives = claim.lease.min(claim.ttl);
            self.evictions.push(lives);
            (LeaseKind::Claim, now + lives)
        }
    }
}
