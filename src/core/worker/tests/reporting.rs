//! What the worker tells the operator: gauges, access-log facts, rate-limited log lines.

use super::*;
use crate::core::config::ConfigError;
use crate::core::worker::reporting::PRESSURE_LOG_MILLIS;

#[test]
fn gauges_hold_the_whole_table_and_the_sum_of_every_worker_s_part() {
    let kv: &'static MemoryKv = Box::leak(Box::default());
    let mut one = Run::new(DEFAULTS, |c| Run::table_in(kv, c));
    let host = Rc::clone(&one.host);
    let mut two = Run::on(Rc::clone(&host), 2, DEFAULTS, |c| Run::table_in(kv, c));
    let gauge = |gauge: Gauge| host.gauges.borrow()[gauge.index()];
    let a_second = |one: &Run, two: &Run, from: Millis| {
        for tick in 1..=GAUGE_TICKS {
            one.tick_at(from + tick * 20);
            two.tick_at(from + tick * 20);
        }
    };
    one.arrive("a");
    one.arrive("b");
    two.arrive("a");
    two.arrive("c");
    a_second(&one, &two, 1_000_000);
    assert_eq!(
        gauge(Gauge::RecordsHeld),
        3,
        "every worker's records, not one's"
    );
    assert_eq!(gauge(Gauge::ClaimsInFlight), 3);
    assert_eq!(gauge(Gauge::Waiting), 1);
    assert_eq!(gauge(Gauge::BytesHeld), 0);
    assert_eq!(gauge(Gauge::CapacityRecords), 100_000);

    one.respond(1, "201");
    a_second(&one, &two, 1_001_000);
    assert_eq!(gauge(Gauge::RecordsHeld), 3);
    assert_eq!(gauge(Gauge::ClaimsInFlight), 2);
    assert_eq!(gauge(Gauge::Waiting), 0, "the duplicate was replayed");
    assert!(gauge(Gauge::BytesHeld) > 0);
    assert_eq!(two.replies(), [(1, 201, String::new())]);
    let waits = host.samples.borrow().clone();
    assert!(waits
        .iter()
        .any(|(h, ms)| *h == Histogram::WaitMillis && *ms > 0));
}

#[test]
fn each_request_s_outcome_and_a_replay_s_record_age_are_marked_on_its_own_stream() {
    let mut run = Run::table(DEFAULTS);
    run.arrive("k");
    run.arrive("k");
    run.respond(1, "201");
    run.tick_at(1_000_020);
    run.host.now.set(1_005_000);
    run.arrive("k");
    let marks = run.host.marks.borrow().clone();
    let marked = |context: u32, fact: &str| -> Vec<String> {
        let of = marks.iter().filter(|(c, f, _)| *c == context && *f == fact);
        of.map(|(_, _, value)| value.clone()).collect()
    };
    assert_eq!(
        marked(1, metrics::OUTCOME),
        ["claimed"],
        "stored is the record's ending, not an outcome"
    );
    assert_eq!(
        marked(2, metrics::OUTCOME),
        ["waited", "replayed"],
        "the last one marked is what the log prints"
    );
    assert_eq!(
        marked(2, metrics::RECORD_AGE),
        ["20"],
        "stored at 1_000_000"
    );
    assert_eq!(marked(3, metrics::RECORD_AGE), ["5000"]);
    assert_eq!(marked(1, metrics::RECORD_AGE), [] as [String; 0]);
    assert!(marks.iter().all(|(context, ..)| *context != ROOT));
}

#[test]
fn store_failures_are_logged_once_a_second_and_counted_every_time() {
    let mut run = Run::new(DEFAULTS, |_| Box::<Calling>::default());
    for n in 0..3 {
        let (context, _) = run.arrive(&format!("k{n}"));
        run.host.acting.set(context);
        run.worker.on_call_response(context, Err(down()));
    }
    assert_eq!(run.host.warnings(), 1, "{:?}", run.host.logs.borrow());
    assert_eq!(run.host.count_of(Counter::StoreError), 3);
    run.host.now.set(1_001_000);
    let (context, _) = run.arrive("k3");
    run.worker.on_call_response(context, Err(down()));
    assert_eq!(
        run.host.warnings(),
        2,
        "a second later, the next one is logged"
    );
}

#[test]
fn each_misconfigured_route_is_warned_of_once_a_minute() {
    let run = Run::table(r#"{"route_metadata": true}"#);
    let error = ConfigError {
        field: "ttl".into(),
        reason: "bad".into(),
    };
    for _ in 0..3 {
        run.worker.route_misconfigured("payments", &error);
        run.worker.route_misconfigured("exports", &error);
    }
    assert_eq!(run.host.warnings(), 2, "one for each route");
    run.host.now.set(run.host.now.get() + PRESSURE_LOG_MILLIS);
    run.worker.route_misconfigured("payments", &error);
    assert_eq!(run.host.warnings(), 3);
    let logs = run.host.logs.borrow();
    assert!(logs
        .iter()
        .any(|(_, line)| line.contains("route `exports`") && line.contains("`ttl`")));
}
