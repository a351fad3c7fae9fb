//! Operations kept to send again, within per-worker budgets: finishes etcd did not take, and
//! revocations of claims whose answer was lost.

use super::ops::Op;
use crate::core::Millis;

/// How long a failed finish, or a revocation, waits before it is sent (again).
pub const RETRY_MILLIS: Millis = 1_000;
/// Bytes of finishes kept to send again, per worker; past it a failed finish is dropped (its
/// claim then ends with its lease).
const MAX_RETRY_BYTES: usize = 8 << 20;
/// Revocations of claims whose answer was lost, per worker; past it such a claim, if it
/// landed, is left to expire with its lease. Each makes a handful of calls at most.
const MAX_REVOKES: usize = 64;

#[derive(Default)]
pub struct Retries {
    /// Operations with when to send them again.
    kept: Vec<(Millis, Op)>,
    pub(super) bytes: usize,
    pub(super) revokes: usize,
}

impl Retries {
    /// Keeps `op` to send again at `at`, unless that is past `give_up` or over the bytes kept
    /// for it; whether it was kept.
    pub fn keep(&mut self, op: Op, at: Millis, give_up: Millis) -> bool {
        let bytes = op.retry_bytes();
        if at >= give_up || self.bytes + bytes > MAX_RETRY_BYTES {
            return false;
        }
        self.bytes += bytes;
        self.kept.push((at, op));
        true
    }

    /// Starts revoking a claim whose answer was lost (an [`Op::Revoke`]), a retry from now.
    pub fn revoke(&mut self, revoke: Op, give_up: Millis, now: Millis) {
        if self.revokes >= MAX_REVOKES {
            log::warn!("a claim whose answer was lost is left to its lease: too many revocations");
        } else if self.keep(revoke, now + RETRY_MILLIS, give_up) {
            self.revokes += 1;
        }
    }

    /// A revocation goes on later, with twice the wait, unless the claim is expiring anyway.
    pub fn revoke_again(&mut self, mut op: Op, now: Millis) {
        if let Op::Revoke {
            give_up, backoff, ..
        } = &mut op
        {
            let (at, give_up) = (now + *backoff, *give_up);
            *backoff *= 2;
            if !self.keep(op, at, give_up) {
                self.revoke_ended();
            }
        }
    }

    pub fn revoke_ended(&mut self) {
        self.revokes = self.revokes.saturating_sub(1);
    }

    /// Finishes kept to send again.
    pub fn finishes(&self) -> usize {
        let kept = self.kept.iter();
        kept.filter(|(_, op)| matches!(op, Op::Finish { .. }))
            .count()
    }

    /// The operations due by `now`, no longer kept.
    pub fn due(&mut self, now: Millis) -> Vec<Op> {
        let (due, later) = std::mem::take(&mut self.kept)
            .into_iter()
            .partition::<Vec<_>, _>(|(at, _)| *at <= now);
        self.kept = later;
        due.into_iter()
            .map(|(_, op)| {
                self.bytes = self.bytes.saturating_sub(op.retry_bytes());
                op
            })
            .collect()
    }
}
