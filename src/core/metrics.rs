//! What the filter tells Envoy's stats: counters of outcomes, gauges of what is held and under
//! way, histograms of waits, calls and sizes, each named `idempotency.<name>`; and what it tells
//! the access log of each request, as filter state.

/// Filter state `wasm.idempotency_outcome`: what the request's client got ([`Counter::outcome`]).
pub const OUTCOME: &str = "idempotency_outcome";
/// Filter state `wasm.idempotency_record_age_ms`: how old the record a replay came from was.
pub const RECORD_AGE: &str = "idempotency_record_age_ms";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// A request claimed a record and went upstream (first attempts and take-overs).
    Claimed,
    Replayed,
    Stored,
    Conflict,
    /// `idempotency_in_progress` answered.
    InProgress,
    /// A duplicate started waiting for the original.
    Waited,
    /// A waiting duplicate took over a released claim.
    TakenOver,
    /// A claim was released so that a retry runs the work.
    Released,
    /// A claim was held until its lease ends (outcome unknown).
    Held,
    /// A claim ended after its lease had run out and another request could take it.
    LeaseExpired,
    /// A covered request passed without idempotency (no scope, or a full store under `pass`).
    Bypassed,
    /// The store had no room: for a claim (in its bucket) or for a response (in bytes).
    StoreFull,
    /// `503` answered because the store was full or failing.
    Rejected,
    StoreError,
    KeyInvalid,
    KeyMissing,
    RequestTooLarge,
    /// A response over `max_response_body_bytes`: the record is kept without it.
    ResponseTooLarge,
    /// `409 idempotency_response_not_stored` answered.
    ResponseNotStored,
    /// A completed record made way for a new one before its TTL.
    Evicted,
    /// How long the evicted records had been stored, in seconds, summed.
    EvictedAgeSeconds,
    /// `429 idempotency_quota_exceeded` answered.
    QuotaExceeded,
    /// A claimed request went upstream from the root context (`outlive_client`).
    SentFromRoot,
    /// Such a request's answer came after its client had left: stored all the same.
    OutlivedClient,
    /// `500 idempotency_route_misconfigured` answered: the route's metadata is invalid.
    RouteMisconfigured,
    /// With `fingerprint: "json"`, a body was fingerprinted by its bytes: not JSON or a form by
    /// its content type, or without a canonical form.
    FingerprintedAsBytes,
}

impl Counter {
    pub const ALL: [Counter; 26] = [
        Counter::Claimed,
        Counter::Replayed,
        Counter::Stored,
        Counter::Conflict,
        Counter::InProgress,
        Counter::Waited,
        Counter::TakenOver,
        Counter::Released,
        Counter::Held,
        Counter::LeaseExpired,
        Counter::Bypassed,
        Counter::StoreFull,
        Counter::Rejected,
        Counter::StoreError,
        Counter::KeyInvalid,
        Counter::KeyMissing,
        Counter::RequestTooLarge,
        Counter::ResponseTooLarge,
        Counter::ResponseNotStored,
        Counter::Evicted,
        Counter::EvictedAgeSeconds,
        Counter::QuotaExceeded,
        Counter::SentFromRoot,
        Counter::OutlivedClient,
        Counter::RouteMisconfigured,
        Counter::FingerprintedAsBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Claimed => "idempotency.claimed",
            Counter::Replayed => "idempotency.replayed",
            Counter::Stored => "idempotency.stored",
            Counter::Conflict => "idempotency.conflict",
            Counter::InProgress => "idempotency.in_progress",
            Counter::Waited => "idempotency.waited",
            Counter::TakenOver => "idempotency.taken_over",
            Counter::Released => "idempotency.released",
            Counter::Held => "idempotency.held",
            Counter::LeaseExpired => "idempotency.lease_expired",
            Counter::Bypassed => "idempotency.bypassed",
            Counter::StoreFull => "idempotency.store_full",
            Counter::Rejected => "idempotency.rejected",
            Counter::StoreError => "idempotency.store_error",
            Counter::KeyInvalid => "idempotency.key_invalid",
            Counter::KeyMissing => "idempotency.key_missing",
            Counter::RequestTooLarge => "idempotency.request_too_large",
            Counter::ResponseTooLarge => "idempotency.response_too_large",
            Counter::ResponseNotStored => "idempotency.response_not_stored",
            Counter::Evicted => "idempotency.evicted",
            Counter::EvictedAgeSeconds => "idempotency.evicted_age_seconds",
            Counter::QuotaExceeded => "idempotency.quota_exceeded",
            Counter::SentFromRoot => "idempotency.sent_from_root",
            Counter::OutlivedClient => "idempotency.outlived_client",
            Counter::RouteMisconfigured => "idempotency.route_misconfigured",
            Counter::FingerprintedAsBytes => "idempotency.fingerprinted_as_bytes",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// What the request's client got, for access logs (`claimed`, `replayed`, `conflict`, ...),
    /// if this counter says it; the last such counter of a request is its outcome.
    pub fn outcome(self) -> Option<&'static str> {
        match self {
            Counter::Claimed
            | Counter::TakenOver
            | Counter::Replayed
            | Counter::Conflict
            | Counter::InProgress
            | Counter::Waited
            | Counter::Bypassed
            | Counter::Rejected
            | Counter::KeyInvalid
            | Counter::KeyMissing
            | Counter::RequestTooLarge
            | Counter::ResponseNotStored
            | Counter::QuotaExceeded
            | Counter::RouteMisconfigured => self.name().strip_prefix("idempotency."),
            _ => None,
        }
    }
}

/// A level, set from the root context's tick (once a second), never per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// Records in the shared-data table, of every worker: in flight, held, complete, unstored.
    RecordsHeld,
    /// Stored response bytes in the shared-data table, as counted against `capacity_bytes`.
    BytesHeld,
    CapacityRecords,
    CapacityBytes,
    /// Requests this Envoy is running upstream under a claim (until their finish).
    ClaimsInFlight,
    /// Duplicates held for their original.
    Waiting,
    /// Requests sent upstream from the root context (`outlive_client`), or about to be.
    SentFromRootInFlight,
    /// Claims queued in the etcd store for a call to carry them.
    EtcdClaimsQueued,
    /// Finishes etcd did not take, waiting to be sent again.
    EtcdFinishesQueued,
    /// gRPC calls to etcd awaiting their answer.
    EtcdCallsInFlight,
}

impl Gauge {
    pub const ALL: [Gauge; 10] = [
        Gauge::RecordsHeld,
        Gauge::BytesHeld,
        Gauge::CapacityRecords,
        Gauge::CapacityBytes,
        Gauge::ClaimsInFlight,
        Gauge::Waiting,
        Gauge::SentFromRootInFlight,
        Gauge::EtcdClaimsQueued,
        Gauge::EtcdFinishesQueued,
        Gauge::EtcdCallsInFlight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::RecordsHeld => "idempotency.records_held",
            Gauge::BytesHeld => "idempotency.bytes_held",
            Gauge::CapacityRecords => "idempotency.capacity_records",
            Gauge::CapacityBytes => "idempotency.capacity_bytes",
            Gauge::ClaimsInFlight => "idempotency.claims_in_flight",
            Gauge::Waiting => "idempotency.waiting",
            Gauge::SentFromRootInFlight => "idempotency.sent_from_root_in_flight",
            Gauge::EtcdClaimsQueued => "idempotency.etcd_claims_queued",
            Gauge::EtcdFinishesQueued => "idempotency.etcd_finishes_queued",
            Gauge::EtcdCallsInFlight => "idempotency.etcd_calls_in_flight",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the level is the whole process's, read from shared data (every worker sets the
    /// same value), rather than one worker's part, which each worker adds to Envoy's gauge as
    /// it changes, so that the gauge is the sum of the parts.
    pub fn is_whole(self) -> bool {
        matches!(
            self,
            Gauge::RecordsHeld | Gauge::BytesHeld | Gauge::CapacityRecords | Gauge::CapacityBytes
        )
    }
}

/// A distribution, whose buckets Envoy's `stats_config.histogram_bucket_settings` chooses (the
/// shipped configs set them; docs/metrics.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Histogram {
    /// How long a duplicate waited for its original, in milliseconds, however its wait ended.
    WaitMillis,
    /// Body bytes of each response stored, before compression.
    StoredResponseBytes,
    /// How old each record replayed was, in milliseconds: how late clients retry.
    ReplayedAgeMillis,
    /// Each gRPC call to etcd, from its dispatch to its answer, in microseconds.
    EtcdCallMicros,
    /// Operations each call to etcd carried (claims or finishes batched in one transaction).
    EtcdBatchOps,
}

impl Histogram {
    pub const ALL: [Histogram; 5] = [
        Histogram::WaitMillis,
        Histogram::StoredResponseBytes,
        Histogram::ReplayedAgeMillis,
        Histogram::EtcdCallMicros,
        Histogram::EtcdBatchOps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Histogram::WaitMillis => "idempotency.wait_ms",
            Histogram::StoredResponseBytes => "idempotency.stored_response_bytes",
            Histogram::ReplayedAgeMillis => "idempotency.replayed_age_ms",
            Histogram::EtcdCallMicros => "idempotency.etcd_call_us",
            Histogram::EtcdBatchOps => "idempotency.etcd_batch_ops",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_listed_once_at_its_index_under_a_name_of_its_own() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.index(), index);
        }
        for (index, gauge) in Gauge::ALL.iter().enumerate() {
            assert_eq!(gauge.index(), index);
        }
        for (index, histogram) in Histogram::ALL.iter().enumerate() {
            assert_eq!(histogram.index(), index);
        }
        let mut names: Vec<_> = Gauge::ALL.iter().map(|g| g.name()).collect();
        names.extend(Histogram::ALL.iter().map(|h| h.name()));
        names.extend(Counter::ALL.iter().map(|c| c.name()));
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
    }
}
