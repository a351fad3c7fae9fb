//! Lease grants: asked from the root context's tick, and what waits for them.

use super::leases::LeaseKind;
use super::ops::{later, Op, Parked};
use super::{wire, Etcd, GRANT_BACKOFF_MILLIS};
use crate::core::store::{Resumed, StoreError};
use crate::core::Millis;
use crate::stores::{Caller, Kv};

impl<C: Caller, K: Kv> Etcd<C, K> {
    pub(super) fn grant_backing_off(&self, now: Millis) -> bool {
        self.grant_failed_at
            .is_some_and(|failed| now < failed + GRANT_BACKOFF_MILLIS)
    }

    /// Grants the leases wanted now, one of each kind at a time: the current window's if an
    /// operation waits for it, else, in the second half of a window in which the kind was used,
    /// the next one's.
    pub(super) fn grant_wanted(&mut self, now: Millis) {
        if self.grant_backing_off(now) {
            return;
        }
        for kind in LeaseKind::ALL {
            if self.grants.values().any(|(granting, ..)| *granting == kind) {
                continue;
            }
            let (window, late) = self.leases.window(kind, now);
            let window = if self.leases.granted(kind, window).is_none() {
                if !self.parked.iter().any(|parked| parked.kind == kind) {
                    continue;
                }
                window
            } else {
                // Granted by another worker, maybe.
                self.go_on(kind, now);
                let in_use = self.used[kind as usize] == Some(window);
                if !(late && in_use && self.leases.granted(kind, window + 1).is_none()) {
                    continue;
                }
                window + 1
            };
            let (_, length) = self.leases.shape(kind);
            match self.dispatch(wire::GRANT, &wire::grant(length), 1) {
                Ok(call) => {
                    self.grants.insert(call, (kind, window, now));
                }
                Err(error) => self.granted(kind, Err(error), now),
            }
        }
    }

    /// A grant of `kind` ended: the operations waiting for one go on, or fail with it.
    pub(super) fn granted(
        &mut self,
        kind: LeaseKind,
        result: Result<(u64, i64), StoreError>,
        now: Millis,
    ) {
        match result {
            Ok((window, id)) => {
                self.grant_failures = 0;
                self.leases.remember(kind, window, id);
                self.go_on(kind, now);
            }
            Err(error) => {
                log::debug!("granting an etcd lease failed: {error}");
                self.grant_failures += 1;
                if self.grant_failures == 1 {
                    return;
                }
                self.grant_failed_at = Some(now);
                for parked in self.unpark(kind) {
                    let resumed = self.fail(parked.op, error.clone(), now);
                    self.moved_on.push((parked.id, resumed));
                }
            }
        }
    }

    /// The operations waiting for a lease of `kind` go on (a grant for the next window leaves
    /// them waiting again, for the current one's).
    pub(super) fn go_on(&mut self, kind: LeaseKind, now: Millis) {
        for parked in self.unpark(kind) {
            let resumed = self.advance(parked.op, now);
            self.moved_on.push((parked.id, resumed));
        }
    }

    /// Keeps `op` until a lease of `kind` is granted (or its grant fails).
    pub(super) fn park(&mut self, kind: LeaseKind, op: Op) -> Resumed {
        let id = self.queued_claim_id();
        let resumed = later(&op, id);
        self.parked.push(Parked { id, kind, op });
        resumed
    }

    pub(super) fn unpark(&mut self, kind: LeaseKind) -> Vec<Parked> {
        let (unparked, still) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|parked| parked.kind == kind);
        self.parked = still;
        unparked
    }
}
