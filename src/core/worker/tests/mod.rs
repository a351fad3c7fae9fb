use super::*;
use crate::core::exchange::StreamEnd;
use crate::core::lifecycle::{Block, Claim, Ending, Finished, Verdict};
use crate::core::record::StoredResponse;
use crate::core::store::{CallFailed, Handle, Ticket};
use crate::stores::table::Table;
use crate::stores::testkit::{config, MemoryKv};

/// The proxy as the worker sees it, recording what it is asked to do.
#[derive(Default)]
struct FakeHost {
    now: Cell<Millis>,
    /// The request the host acts for: the callback's own, or the last `act_for`'s.
    acting: Cell<u32>,
    gone: RefCell<Vec<u32>>,
    replies: RefCell<Vec<(u32, u16, String)>>,
    resumed: RefCell<Vec<u32>>,
    counts: RefCell<Vec<(Counter, u64)>>,
    /// Each gauge as Envoy would hold it: set, or summed from the changes added.
    gauges: RefCell<[i64; Gauge::ALL.len()]>,
    samples: RefCell<Vec<(Histogram, u64)>>,
    /// Facts marked for the access log, with the context the host acted for.
    marks: RefCell<Vec<(u32, &'static str, String)>>,
    logs: RefCell<Vec<(Level, String)>>,
    wakes: Cell<u32>,
    /// Requests sent upstream, with the context the host acted for when each was sent.
    sent: RefCell<Vec<(u32, RootRequest)>>,
}

/// The root context's id, as far as these tests go.
const ROOT: u32 = 0;

impl Host for Rc<FakeHost> {
    fn now(&self) -> Millis {
        self.now.get()
    }

    fn act_for(&self, context: u32) -> bool {
        self.acting.set(context);
        !self.gone.borrow().contains(&context)
    }

    fn reply(&self, reply: &LocalReply) {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        let code = body["code"].as_str().unwrap_or("").to_string();
        let context = self.acting.get();
        self.replies
            .borrow_mut()
            .push((context, reply.status, code));
    }

    fn resume(&self) {
        self.resumed.borrow_mut().push(self.acting.get());
    }

    fn count(&self, counter: Counter, n: u64) {
        self.counts.borrow_mut().push((counter, n));
    }

    fn set_gauge(&self, gauge: Gauge, level: u64) {
        self.gauges.borrow_mut()[gauge.index()] = level as i64;
    }

    fn add_to_gauge(&self, gauge: Gauge, change: i64) {
        self.gauges.borrow_mut()[gauge.index()] += change;
    }

    fn record(&self, histogram: Histogram, value: u64) {
        self.samples.borrow_mut().push((histogram, value));
    }

    fn mark(&self, fact: &'static str, value: &str) {
        let context = self.acting.get();
        self.marks
            .borrow_mut()
            .push((context, fact, value.to_string()));
    }

    fn log(&self, level: Level, line: Arguments) {
        self.logs.borrow_mut().push((level, line.to_string()));
    }

    fn act_as_root(&self) {
        self.acting.set(ROOT);
    }

    fn wake(&self) {
        self.wakes.set(self.wakes.get() + 1);
    }

    fn send(&self, request: &RootRequest) -> Result<CallId, StoreError> {
        let mut sent = self.sent.borrow_mut();
        sent.push((self.acting.get(), request.clone()));
        Ok(100 + sent.len() as CallId)
    }
}

impl FakeHost {
    fn count_of(&self, counter: Counter) -> u64 {
        let counts = self.counts.borrow();
        counts
            .iter()
            .filter(|(c, _)| *c == counter)
            .map(|(_, n)| n)
            .sum()
    }

    fn warnings(&self) -> usize {
        let logs = self.logs.borrow();
        logs.iter()
            .filter(|(level, _)| *level == Level::Warn)
            .count()
    }
}

struct Run {
    host: Rc<FakeHost>,
    worker: Worker<Rc<FakeHost>>,
    requests: Vec<Rc<RefCell<Exchange>>>,
}

impl Run {
    fn new(json: &str, store: impl FnOnce(&Config) -> Box<dyn Store>) -> Self {
        let host = Rc::new(FakeHost::default());
        host.now.set(1_000_000);
        Run::on(host, 1, json, store)
    }

    /// Worker `number` on `host`, which other workers of the same Envoy may share.
    fn on(
        host: Rc<FakeHost>,
        number: u64,
        json: &str,
        store: impl FnOnce(&Config) -> Box<dyn Store>,
    ) -> Self {
        let config = config(json);
        let store = store(&config);
        let worker = Worker::new(Rc::clone(&host), Rc::new(config), store, number);
        Run {
            host,
            worker,
            requests: Vec::new(),
        }
    }

    /// A worker over the shared-data table.
    fn table(json: &str) -> Self {
        let kv: &'static MemoryKv = Box::leak(Box::default());
        Run::new(json, |config| Run::table_in(kv, config))
    }

    fn table_in(kv: &'static MemoryKv, config: &Config) -> Box<dyn Store> {
        let mut table = Table::new(kv, config);
        table.boot().unwrap();
        Box::new(table)
    }

    /// Request `context` (from 1, in order) arrives: a covered POST with `key`.
    fn arrive(&mut self, key: &str) -> (u32, Flow) {
        let exchange = self.worker.start();
        self.requests.push(Rc::clone(&exchange));
        let context = self.requests.len() as u32;
        let headers = vec![
            ("authorization".to_string(), b"Bearer org-a".to_vec()),
            ("idempotency-key".to_string(), key.as_bytes().to_vec()),
        ];
        let step =
            exchange
                .borrow_mut()
                .on_request_headers("POST", b"/v1/customers", &headers, true);
        (context, self.callback(context, step))
    }

    /// A callback of request `context` hands `step` to the worker.
    fn callback(&self, context: u32, step: Step) -> Flow {
        self.host.acting.set(context);
        let exchange = Rc::clone(&self.requests[context as usize - 1]);
        self.worker.drive(context, &exchange, step)
    }

    /// The upstream answers request `context` with `status`, and its stream ends.
    fn respond(&self, context: u32, status: &str) -> Flow {
        let exchange = Rc::clone(&self.requests[context as usize - 1]);
        let headers = vec![(":status".to_string(), status.as_bytes().to_vec())];
        let step = {
            let mut exchange = exchange.borrow_mut();
            exchange.on_response_headers(&headers, true, false);
            exchange.on_response_body(b"{}", true);
            exchange.on_end(StreamEnd::Unflagged)
        };
        self.worker.leave(context);
        self.callback(context, step)
    }

    fn tick_at(&self, now: Millis) {
        self.host.now.set(now);
        self.host.acting.set(ROOT);
        self.worker.tick();
    }

    /// Request `context` arrives on a route that sends it from the root context.
    fn arrive_from_root(&mut self, key: &str) -> (u32, Flow) {
        let exchange = self.worker.start();
        exchange.borrow_mut().send_from_root("app".into(), 15_000);
        self.requests.push(exchange);
        let context = self.requests.len() as u32;
        let headers = vec![
            ("authorization".to_string(), b"Bearer org-a".to_vec()),
            ("idempotency-key".to_string(), key.as_bytes().to_vec()),
        ];
        let step = self.requests[context as usize - 1]
            .borrow_mut()
            .on_request_headers("POST", b"/v1/customers", &headers, true);
        (context, self.callback(context, step))
    }

    /// The root context wakes and sends what waits to go.
    fn wake(&self) {
        self.host.acting.set(ROOT);
        self.worker.on_wake();
    }

    /// Request `context`'s client leaves. Envoy may still know its context for a while.
    fn client_leaves(&self, context: u32) {
        self.worker.leave(context);
        let step = self.requests[context as usize - 1]
            .borrow_mut()
            .on_end(StreamEnd::Interrupted);
        self.callback(context, step);
    }

    /// The answer to call `call`, in the root context.
    fn upstream_answers(&self, call: CallId, status: &str) {
        self.host.acting.set(ROOT);
        let headers = vec![
            (":status".to_string(), status.as_bytes().to_vec()),
            ("x-envoy-upstream-service-time".to_string(), b"1".to_vec()),
        ];
        let body = b"{}".to_vec();
        assert!(self.worker.sent_from_root(call));
        self.worker
            .on_upstream_answer(call, Answered::Response { headers, body });
    }

    fn replies(&self) -> Vec<(u32, u16, String)> {
        self.host.replies.borrow().clone()
    }
}

const DEFAULTS: &str = "{}";

#[test]
fn a_waiting_duplicate_is_replayed_on_the_tick_after_its_original_stores() {
    let mut run = Run::table(DEFAULTS);
    assert_eq!(
        run.arrive("k"),
        (1, Flow::Continue),
        "the original goes upstream"
    );
    assert_eq!(run.arrive("k"), (2, Flow::Pause), "the duplicate waits");
    run.tick_at(1_000_020);
    assert_eq!(run.replies(), [], "nothing to replay yet");
    assert_eq!(run.respond(1, "201"), Flow::Continue);
    run.tick_at(1_000_040);
    assert_eq!(run.replies(), [(2, 201, String::new())]);
    assert_eq!(
        *run.host.resumed.borrow(),
        [] as [u32; 0],
        "a replay is not resumed"
    );
    assert_eq!(run.host.count_of(Counter::Replayed), 1);
}

#[test]
fn a_released_original_lets_one_waiting_duplicate_take_over_and_go_upstream() {
    let mut run = Run::table(DEFAULTS);
    run.arrive("k");
    run.arrive("k");
    run.arrive("k");
    run.respond(1, "503");
    run.tick_at(1_000_020);
    assert_eq!(
        *run.host.resumed.borrow(),
        [2],
        "the first waiter claims and is resumed"
    );
    assert_eq!(run.replies(), [], "the second still waits");
    run.respond(2, "201");
    run.tick_at(1_000_040);
    assert_eq!(run.replies(), [(3, 201, String::new())]);
}

#[test]
fn a_duplicate_waits_max_wait_and_no_longer() {
    let mut run = Run::table(r#"{"max_wait": "1s"}"#);
    run.arrive("k");
    run.arrive("k");
    run.tick_at(1_000_999);
    assert_eq!(run.replies(), []);
    run.tick_at(1_001_000);
    assert_eq!(run.replies(), [(2, 503, "idempotency_in_progress".into())]);
    run.tick_at(1_002_000);
    assert_eq!(run.replies().len(), 1, "it left the waiting room");
}

#[test]
fn a_full_waiting_room_answers_at_once_and_a_request_that_ended_is_never_acted_for() {
    let mut run = Run::table(r#"{"max_waiting": 1}"#);
    run.arrive("k");
    assert_eq!(run.arrive("k"), (2, Flow::Pause));
    assert_eq!(run.arrive("k"), (3, Flow::Pause));
    assert_eq!(run.replies(), [(3, 503, "idempotency_in_progress".into())]);
    // The waiting client goes away; its context must not be touched again.
    run.worker.leave(2);
    run.respond(1, "201");
    run.tick_at(1_000_020);
    assert_eq!(run.replies().len(), 1);
    assert!(run.host.resumed.borrow().is_empty());
}

/// A remote store: every claim is a call, answered when its response comes: `Claimed` if it
/// says so, else a conflict. With `batching`, as etcd's past their calls, claims wait for the
/// root context to wake and send them (here it only counts them).
#[derive(Default)]
struct Calling {
    calls: u32,
    /// The endings of the finishes asked for.
    finished: Rc<RefCell<Vec<String>>>,
    batching: bool,
    waiting: u32,
    sent_from_root: Rc<Cell<u32>>,
}

impl Store for Calling {
    fn claim(&mut self, _: &Claim, _: Millis) -> Answer<Result<ClaimReply, StoreError>> {
        if self.batching {
            self.waiting += 1;
            return Answer::Later(1_000 + self.waiting);
        }
        self.calls += 1;
        Answer::Later(self.calls)
    }

    fn poll(
        &mut self,
        _: &Claim,
        _: bool,
        _: Millis,
    ) -> Option<Answer<Result<ClaimReply, StoreError>>> {
        None
    }

    fn finish(
        &mut self,
        _: Ticket,
        ending: Ending<StoredResponse>,
        _: Millis,
    ) -> Answer<Result<Finished, StoreError>> {
        self.finished
            .borrow_mut()
            .push(format!("{:?}", ending.recorded()));
        Answer::Queued
    }

    fn tick(&mut self, _: Millis) -> Vec<Resumed> {
        Vec::new()
    }

    fn take_evictions(&mut self) -> Vec<Millis> {
        Vec::new()
    }

    fn levels(&mut self, _: Millis) -> Vec<(Gauge, u64)> {
        Vec::new()
    }

    fn remote(&mut self) -> Option<&mut dyn Remote> {
        Some(self)
    }
}

impl Remote for Calling {
    fn resume(&mut self, call: CallId, response: CallResponse, _: Millis) -> Option<Resumed> {
        let reply = response
            .map(|message| match &message[..] {
                b"claimed" => Verdict::Claimed(Ticket {
                    handle: Handle::Revision(7),
                    claim: Claim {
                        tuple: [1; 32],
                        fingerprint: [1; 16],
                        token: 1,
                        lease: 60_000,
                        ttl: 86_400_000,
                        org: 1,
                    },
                }),
                _ => Verdict::Blocked(Block::Conflict),
            })
            .map_err(|failed| StoreError::Remote(failed.to_string()));
        (call <= self.calls).then_some(Resumed::Claim(Answer::Now(reply)))
    }

    fn wants_root(&self) -> bool {
        self.waiting > 0
    }

    fn root_woke(&mut self, _: Millis) -> Vec<Resumed> {
        let sent = &self.sent_from_root;
        sent.set(sent.get() + std::mem::take(&mut self.waiting));
        Vec::new()
    }

    fn take_moved_on(&mut self) -> Vec<(CallId, Resumed)> {
        Vec::new()
    }

    fn take_samples(&mut self) -> Vec<(Histogram, u64)> {
        Vec::new()
    }
}

#[test]
fn a_remote_store_s_answer_reaches_the_request_whose_call_it_is() {
    let mut run = Run::new(DEFAULTS, |_| Box::<Calling>::default());
    assert_eq!(run.arrive("a"), (1, Flow::Pause));
    assert_eq!(run.arrive("b"), (2, Flow::Pause));
    // Call 2 is answered first (in request 2's callback): a conflict for request 2 only.
    run.host.acting.set(2);
    run.worker.on_call_response(2, Ok(Vec::new()));
    assert_eq!(run.replies(), [(2, 409, "idempotency_conflict".into())]);
    // An answer to a call nobody waits for any more is dropped.
    run.worker.leave(1);
    run.worker.on_call_response(1, Ok(Vec::new()));
    assert_eq!(run.replies().len(), 1);
}

#[test]
fn a_claim_answered_after_its_request_left_is_released() {
    let remote = Calling::default();
    let finished = Rc::clone(&remote.finished);
    let mut run = Run::new(DEFAULTS, |_| Box::new(remote));
    assert_eq!(run.arrive("a"), (1, Flow::Pause));
    run.worker.leave(1);
    run.worker.on_call_response(1, Ok(b"claimed".to_vec()));
    assert_eq!(*finished.borrow(), ["Recorded(Released)"]);
    assert!(run.replies().is_empty());
}

fn down() -> CallFailed {
    CallFailed {
        status: 14,
        message: "down".into(),
    }
}

const OUTLIVE: &str = r#"{"outlive_client": {}}"#;

#[test]
fn a_request_sent_from_the_root_context_outlives_its_client_and_its_retry_replays() {
    let mut run = Run::table(OUTLIVE);
    assert_eq!(run.arrive_from_root("k"), (1, Flow::Pause));
    assert_eq!(
        run.host.wakes.get(),
        1,
        "the root context is woken to send it"
    );
    assert!(
        run.host.sent.borrow().is_empty(),
        "nothing is sent from a request's own callback"
    );
    run.wake();
    assert_eq!(
        run.host.sent.borrow()[0].0,
        ROOT,
        "sent as the root context"
    );
    run.client_leaves(1);
    assert_eq!(
        run.arrive_from_root("k"),
        (2, Flow::Pause),
        "a retry waits for it"
    );
    run.upstream_answers(101, "201");
    assert_eq!(run.host.count_of(Counter::Stored), 1);
    assert_eq!(run.host.count_of(Counter::OutlivedClient), 1);
    run.tick_at(1_000_020);
    assert_eq!(
        run.replies(),
        [(2, 201, String::new())],
        "only the waiting retry is answered"
    );
    assert_eq!(run.host.sent.borrow().len(), 1, "the work ran once");
}

#[test]
fn past_max_in_flight_new_requests_go_through_the_router_until_one_is_answered() {
    let mut run = Run::table(r#"{"outlive_client": {"max_in_flight": 1}}"#);
    assert!(run.worker.room_to_send_from_root());
    run.arrive_from_root("a");
    assert!(!run.worker.room_to_send_from_root(), "one waits to be sent");
    run.wake();
    assert!(!run.worker.room_to_send_from_root(), "one is in flight");
    assert_eq!(run.host.warnings(), 1);
    run.upstream_answers(101, "201");
    assert!(run.worker.room_to_send_from_root());
}

#[test]
fn a_client_that_stays_gets_the_answer_and_the_host_acts_as_the_root_again() {
    let mut run = Run::table(OUTLIVE);
    run.arrive_from_root("k");
    run.wake();
    run.upstream_answers(101, "201");
    assert_eq!(run.replies(), [(1, 201, String::new())]);
    assert_eq!(run.host.acting.get(), ROOT);
    assert_eq!(run.host.count_of(Counter::OutlivedClient), 0);
}

#[test]
fn after_answering_a_waiting_request_a_tick_acts_as_the_root_again() {
    // A call made for a request would be cancelled when that request ends.
    let mut run = Run::table(DEFAULTS);
    run.arrive("k");
    run.arrive("k");
    run.respond(1, "201");
    run.tick_at(1_000_020);
    assert_eq!(run.replies(), [(2, 201, String::new())]);
    assert_eq!(run.host.acting.get(), ROOT);
}

#[test]
fn a_listener_without_route_metadata_never_reads_a_route() {
    let run = Run::table("{}");
    let routed = run
        .worker
        .route(|| unreachable!("the route's metadata was read"));
    assert!(routed.covers("POST") && !routed.covers("GET"));
}

#[test]
fn operations_waiting_for_the_root_context_wake_it_once_and_go_out_when_it_wakes() {
    let store = Calling {
        batching: true,
        ..Calling::default()
    };
    let sent = Rc::clone(&store.sent_from_root);
    let mut run = Run::new(DEFAULTS, |_| Box::new(store));
    for key in ["a", "b", "c"] {
        assert_eq!(run.arrive(key).1, Flow::Pause);
    }
    assert_eq!(run.host.wakes.get(), 1, "one wake-up for all that waits");
    run.wake();
    assert_eq!(
        sent.get(),
        3,
        "sent when the root context woke, not on a tick"
    );
    run.arrive("d");
    assert_eq!(run.host.wakes.get(), 2);
}

mod reporting;
