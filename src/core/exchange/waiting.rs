//! A duplicate that waits for its original: how long, and when it stops.

use super::{Exchange, Phase, Step};
use crate::core::lifecycle::Claim;
use crate::core::metrics::{Counter, Histogram};
use crate::core::problem::Problem;
use crate::core::Millis;

impl Exchange {
    /// Whether the request is held waiting for an original.
    #[cfg(test)]
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.phase,
            Phase::Claiming {
                waiting_since: Some(_),
                ..
            }
        )
    }

    /// A duplicate that waited since `since` waits no more.
    pub(super) fn waited(&mut self, since: Millis, now: Millis) {
        let waited = now.saturating_sub(since);
        self.samples.push((Histogram::WaitMillis, waited));
    }

    /// Holds a request that waits for its original, unless it has waited `max_wait`.
    pub(super) fn keep_waiting(
        &mut self,
        claim: Claim,
        since: Option<Millis>,
        now: Millis,
    ) -> Step {
        let since = since.unwrap_or(now);
        if now.saturating_sub(since) >= self.policy.max_wait {
            return self.refuse_in_progress();
        }
        self.phase = Phase::Claiming {
            claim,
            waiting_since: Some(since),
        };
        Step::Wait
    }

    /// The original is still running and this request, which has waited `max_wait`, waits no
    /// longer.
    pub fn give_up_waiting(&mut self, now: Millis) -> Step {
        if let Phase::Claiming {
            waiting_since: Some(since),
            ..
        } = self.phase
        {
            self.waited(since, now);
        }
        self.refuse_in_progress()
    }

    /// The original is still running and this request does not wait for it (any longer).
    pub(super) fn refuse_in_progress(&mut self) -> Step {
        if !matches!(self.phase, Phase::Claiming { .. }) {
            return Step::Done;
        }
        self.answer(
            Counter::InProgress,
            Problem::InProgress.reply_as(
                self.policy.in_progress_status,
                "a request with this Idempotency-Key is still being processed",
                Some(1),
            ),
        )
    }

    /// The claim a waiting request polls with.
    pub fn pending_claim(&self) -> Option<Claim> {
        match self.phase {
            Phase::Claiming { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// Whether a waiting request has waited `max_wait`.
    pub fn wait_is_over(&self, now: Millis) -> bool {
        match self.phase {
            Phase::Claiming {
                waiting_since: Some(since),
                ..
            } => now.saturating_sub(since) >= self.policy.max_wait,
            _ => false,
        }
    }
}
