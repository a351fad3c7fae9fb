//! What a worker tells the operator: its gauges once a second, what its store measured and
//! evicted, and log lines about pressure and failures, each kind at most so often.

use super::{Host, Worker};
use crate::core::config::ConfigError;
use crate::core::metrics::{Counter, Gauge};
use crate::core::store::StoreError;
use crate::core::Millis;
use log::Level;
use std::cell::Cell;

/// Store failures are logged at most this often per worker (the counters count every one).
pub(super) const FAILURE_LOG_MILLIS: Millis = 1_000;
/// A store evicting or refusing, or a misconfigured route, is logged at most this often per
/// worker.
pub(super) const PRESSURE_LOG_MILLIS: Millis = 60_000;
/// Misconfigured routes a worker remembers having warned of.
pub(super) const MISCONFIGURED_ROUTES_KEPT: usize = 256;
/// Gauges are reported every this many ticks (a second), not per request.
pub const GAUGE_TICKS: u64 = 50;

impl<H: Host> Worker<H> {
    /// Sets the gauges: the store's levels, and this worker's own.
    pub(super) fn report_levels(&self, now: Millis) {
        let mut levels = self.store.borrow_mut().levels(now);
        let sent = self.sent.borrow().len() + self.root_requests.borrow().len();
        levels.extend([
            (Gauge::ClaimsInFlight, self.owners.get()),
            (Gauge::Waiting, self.waiting.borrow().len() as u64),
            (Gauge::SentFromRootInFlight, sent as u64),
        ]);
        let mut reported = self.reported.borrow_mut();
        for (gauge, level) in levels {
            if gauge.is_whole() {
                self.host.set_gauge(gauge, level);
                continue;
            }
            let last = std::mem::replace(&mut reported[gauge.index()], level);
            if level != last {
                self.host.add_to_gauge(gauge, level as i64 - last as i64);
            }
        }
    }

    /// What the store saw since last asked: its samples, and the records it evicted.
    pub(super) fn observe_store(&self) {
        let samples = self.remote(|remote| remote.take_samples());
        for (histogram, value) in samples.into_iter().flatten() {
            self.host.record(histogram, value);
        }
        let ages = self.store.borrow_mut().take_evictions();
        let Some(youngest) = ages.iter().min() else {
            return;
        };
        let seconds: u64 = ages.iter().map(|age| age / 1_000).sum();
        self.host.count(Counter::Evicted, ages.len() as u64);
        self.host.count(Counter::EvictedAgeSeconds, seconds);
        let raise = match self.config.etcd {
            Some(_) => "an organisation is past its share: raise etcd.max_share_bytes",
            None => "raise capacity_records",
        };
        self.store_pressure(&format!(
            "evicting records before their ttl, the youngest after {}s: {raise}",
            youngest / 1_000
        ));
    }

    /// A route whose metadata the filter cannot follow is logged at most once a minute per
    /// route; its covered requests are refused meanwhile (and counted, every one).
    pub fn route_misconfigured(&self, route: &str, error: &ConfigError) {
        let now = self.host.now();
        let mut quiet = self.route_quiet_until.borrow_mut();
        if quiet.get(route).is_some_and(|until| now < *until) {
            return;
        }
        // A listener has few routes; should names churn, forgetting them only logs sooner.
        if quiet.len() >= MISCONFIGURED_ROUTES_KEPT {
            quiet.clear();
        }
        quiet.insert(route.to_string(), now + PRESSURE_LOG_MILLIS);
        self.host.log(
            Level::Warn,
            format_args!(
                "idempotency filter: route `{route}`: {error} (in filter_metadata.idempotency); \
                 its covered requests get 500 idempotency_route_misconfigured"
            ),
        );
    }

    /// The store evicting or refusing is logged at most once a minute, so that an operator
    /// learns of it from the log and not from clients.
    pub(super) fn store_pressure(&self, what: &str) {
        if self.quiet(&self.pressure_quiet_until, PRESSURE_LOG_MILLIS) {
            self.host
                .log(Level::Warn, format_args!("idempotency store: {what}"));
        }
    }

    /// Store failures are logged at most once a second, so that an outage does not flood the log.
    pub(super) fn store_failed(&self, request_id: &str, error: &StoreError) {
        let level = if self.quiet(&self.failure_quiet_until, FAILURE_LOG_MILLIS) {
            Level::Warn
        } else {
            Level::Debug
        };
        self.host.log(level, format_args!("[{request_id}] {error}"));
    }

    /// Whether the quiet period in `until` is over; if so, it starts again for `millis`.
    fn quiet(&self, until: &Cell<Millis>, millis: Millis) -> bool {
        let now = self.host.now();
        let over = now >= until.get();
        if over {
            until.set(now + millis);
        }
        over
    }
}
