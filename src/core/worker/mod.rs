//! One worker's requests: the claim tokens it hands out, the duplicates waiting for an original,
//! the requests waiting for a remote store's answer, and the store itself.
//!
//! The glue creates one [`Worker`] per VM, hands it each request's steps through
//! [`Worker::drive`], the answers to its calls through [`Worker::on_call_response`] (or
//! [`Worker::on_upstream_answer`]), the root context's ticks through [`Worker::tick`] and its
//! wake-ups through [`Worker::on_wake`]; the worker acts on the proxy only through [`Host`].
//! Its state sits in cells because a reply it sends can bring the host straight back into the
//! glue (the reply's own response callbacks, the stream's end) before the send returns.

use crate::core::config::Config;
use crate::core::exchange::{self, Answered, Exchange, RootRequest, Step};
use crate::core::lifecycle::{Ending, Verdict};
use crate::core::metrics::{self, Counter, Gauge, Histogram};
use crate::core::problem::LocalReply;
use crate::core::route::{Routed, Routes};
use crate::core::store::{
    Answer, CallId, CallResponse, ClaimReply, Remote, Resumed, Store, StoreError,
};
use crate::core::Millis;
use log::Level;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Arguments;
use std::rc::Rc;

/// With a remote store, waiting requests look at what this Envoy holds on every tick and ask
/// the store itself every this many ticks.
pub const REMOTE_POLL_TICKS: u64 = 5;

/// What the worker asks of the proxy.
pub trait Host {
    fn now(&self) -> Millis;
    /// Makes the host act for request `context` (not the callback's own); false if it is gone.
    fn act_for(&self, context: u32) -> bool;
    /// Makes the host act for the root context again, in one of its callbacks: a call made for
    /// a request would end with that request.
    fn act_as_root(&self);
    /// Answers the request acted for locally.
    fn reply(&self, reply: &LocalReply);
    /// Lets the paused request acted for go on.
    fn resume(&self);
    fn count(&self, counter: Counter, n: u64);
    /// Sets a gauge of the whole process ([`Gauge::is_whole`]).
    fn set_gauge(&self, gauge: Gauge, level: u64);
    /// Adds the change in this worker's part to a gauge summed over workers.
    fn add_to_gauge(&self, gauge: Gauge, change: i64);
    fn record(&self, histogram: Histogram, value: u64);
    /// Records a fact of the request acted for ([`metrics::OUTCOME`], [`metrics::RECORD_AGE`])
    /// where Envoy's access log reads it.
    fn mark(&self, fact: &'static str, value: &str);
    /// Formats `line` only if `level` is logged.
    fn log(&self, level: Level, line: Arguments);
    /// Asks for [`Worker::on_wake`] from the root context, soon.
    fn wake(&self);
    /// Sends a request upstream from the root context (the only caller); the answer comes to
    /// [`Worker::on_upstream_answer`] under the returned id.
    fn send(&self, request: &RootRequest) -> Result<CallId, StoreError>;
}

/// What a callback answers the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

struct Waiter {
    context: u32,
    exchange: Rc<RefCell<Exchange>>,
}

pub struct Worker<H: Host> {
    host: H,
    config: Rc<Config>,
    store: RefCell<Box<dyn Store>>,
    /// Unique to this VM in this Envoy process: the high bits of every claim token.
    number: u64,
    attempts: Cell<u64>,
    /// Duplicates held for an original, polled on every tick.
    waiting: RefCell<Vec<Waiter>>,
    /// Requests whose claim waits for a remote store's answer, by call.
    awaiting: RefCell<HashMap<CallId, Waiter>>,
    /// Requests to send upstream from the root context when it wakes.
    root_requests: RefCell<Vec<(Waiter, RootRequest)>>,
    /// Requests sent upstream from the root context, by call, whether or not their client is
    /// still there.
    sent: RefCell<HashMap<CallId, Waiter>>,
    ticks: Cell<u64>,
    /// Waiting requests ask the store itself every this many ticks: every tick for shared
    /// data, less often for a remote store, where each such poll is a call.
    poll_every: u64,
    /// The policies of the routes this worker has seen.
    routes: RefCell<Routes>,
    failure_quiet_until: Cell<Millis>,
    pressure_quiet_until: Cell<Millis>,
    /// When each misconfigured route may be warned of again, by name.
    route_quiet_until: RefCell<HashMap<String, Millis>>,
    /// Requests of this worker running upstream under a claim.
    owners: Cell<u64>,
    /// This worker's part of each summed gauge, as last added to Envoy's.
    reported: RefCell<[u64; Gauge::ALL.len()]>,
    /// The root context has been asked to wake and has not yet.
    woken: Cell<bool>,
}

impl<H: Host> Worker<H> {
    /// `number` is unique to this VM in the process: the high bits of its claim tokens.
    pub fn new(host: H, config: Rc<Config>, store: Box<dyn Store>, number: u64) -> Self {
        let poll_every = if config.etcd.is_some() {
            REMOTE_POLL_TICKS
        } else {
            1
        };
        Worker {
            host,
            routes: RefCell::new(Routes::new(&config)),
            config,
            store: RefCell::new(store),
            number,
            attempts: Cell::new(0),
            waiting: RefCell::new(Vec::new()),
            awaiting: RefCell::new(HashMap::new()),
            root_requests: RefCell::new(Vec::new()),
            sent: RefCell::new(HashMap::new()),
            ticks: Cell::new(0),
            poll_every,
            failure_quiet_until: Cell::new(0),
            pressure_quiet_until: Cell::new(0),
            route_quiet_until: RefCell::new(HashMap::new()),
            owners: Cell::new(0),
            reported: RefCell::new([0; Gauge::ALL.len()]),
            woken: Cell::new(false),
        }
    }

    /// What a request's route gives it; `metadata` reads the route's metadata, and is called
    /// only when the listener lets routes have their say.
    pub fn route(&self, metadata: impl FnOnce() -> Vec<u8>) -> Routed {
        let mut routes = self.routes.borrow_mut();
        if !self.config.reads_routes() {
            return routes.listener().clone();
        }
        routes.resolve(&self.config, &metadata())
    }

    /// The largest answer a request sent from the root context under `call` may bring back:
    /// its route's `max_response_body_bytes`.
    pub fn max_answer_bytes(&self, call: CallId) -> usize {
        self.sent.borrow().get(&call).map_or(0, |sent| {
            sent.exchange.borrow().policy().max_response_body_bytes
        })
    }

    /// A new request's exchange, with a claim token no other attempt in the process has.
    pub fn start(&self) -> Rc<RefCell<Exchange>> {
        let attempt = self.attempts.get().wrapping_add(1);
        self.attempts.set(attempt);
        let token = (self.number << 40) | (attempt & ((1 << 40) - 1));
        Rc::new(RefCell::new(Exchange::new(Rc::clone(&self.config), token)))
    }

    /// Carries out the steps of request `context`, from `first`, until one leaves it paused or
    /// let go.
    pub fn drive(&self, context: u32, exchange: &Rc<RefCell<Exchange>>, first: Step) -> Flow {
        let mut step = first;
        let flow = loop {
            step = match step {
                Step::Pass | Step::Forward | Step::Done => break Flow::Continue,
                Step::Buffer => break Flow::Pause,
                Step::Claim(claim) => {
                    let now = self.host.now();
                    let answer = self.store.borrow_mut().claim(&claim, now);
                    match answer {
                        Answer::Now(reply) => self.on_claim(exchange, reply, now),
                        Answer::Later(call) => {
                            self.await_call(call, context, exchange);
                            break Flow::Pause;
                        }
                        Answer::Queued => break Flow::Pause,
                    }
                }
                Step::Wait => {
                    self.waiting.borrow_mut().push(Waiter {
                        context,
                        exchange: Rc::clone(exchange),
                    });
                    break Flow::Pause;
                }
                Step::Reply(reply) => {
                    self.host.reply(&reply);
                    break Flow::Pause;
                }
                Step::SendFromRoot(request) => {
                    let waiter = Waiter {
                        context,
                        exchange: Rc::clone(exchange),
                    };
                    self.root_requests.borrow_mut().push((waiter, request));
                    self.wake_root();
                    break Flow::Pause;
                }
                Step::Finish(ticket, outcome) => {
                    self.owners.set(self.owners.get().saturating_sub(1));
                    let now = self.host.now();
                    let answer = self.store.borrow_mut().finish(ticket, outcome, now);
                    if let Answer::Now(reply) = answer {
                        if let Err(error) = &reply {
                            let id = exchange.borrow().request_id().to_string();
                            self.store_failed(&id, error);
                        }
                        exchange.borrow_mut().on_finish(reply);
                    }
                    break Flow::Continue;
                }
            }
        };
        let counts = exchange.borrow_mut().take_counts();
        let samples = exchange.borrow_mut().take_samples();
        if let Some(age) = exchange.borrow_mut().take_record_age() {
            self.host.mark(metrics::RECORD_AGE, &age.to_string());
        }
        for (histogram, value) in samples {
            self.host.record(histogram, value);
        }
        let id = exchange.borrow();
        let id = id.request_id();
        for counter in counts {
            self.host.count(counter, 1);
            if counter == Counter::Claimed {
                self.owners.set(self.owners.get() + 1);
            }
            if let Some(outcome) = counter.outcome() {
                self.host.mark(metrics::OUTCOME, outcome);
            }
            self.host
                .log(Level::Debug, format_args!("[{id}] {}", counter.name()));
            match counter {
                Counter::StoreFull => self.store_pressure(
                    "no room for a new record or response could be made (every record of its \
                     bucket in flight): raise capacity_records or capacity_bytes",
                ),
                Counter::QuotaExceeded => self.store_pressure(
                    "an organisation holds its whole max_share, all of it in flight: its new keys \
                     get 429",
                ),
                _ => {}
            }
        }
        self.observe_store();
        self.wake_root_if_wanted();
        flow
    }

    /// Wakes the root context if a remote store has what waits for it to send.
    fn wake_root_if_wanted(&self) {
        if self.remote(|remote| remote.wants_root()) == Some(true) {
            self.wake_root();
        }
    }

    /// What `act` does with the store's remote part, if it has one.
    fn remote<T>(&self, act: impl FnOnce(&mut dyn Remote) -> T) -> Option<T> {
        self.store.borrow_mut().remote().map(act)
    }

    /// Asks the root context to wake soon ([`Worker::on_wake`]): one wake-up does all that waits.
    fn wake_root(&self) {
        if !self.woken.replace(true) {
            self.host.wake();
        }
    }

    /// Request `context` ended: it waits for nothing any more. What was sent for it from the
    /// root context goes on without it (its exchange knows its client left).
    pub fn leave(&self, context: u32) {
        self.waiting
            .borrow_mut()
            .retain(|waiter| waiter.context != context);
        self.awaiting
            .borrow_mut()
            .retain(|_, waiter| waiter.context != context);
    }

    /// A remote store's call was answered, in the callback of the context that made it.
    pub fn on_call_response(&self, call: CallId, response: CallResponse) {
        let now = self.host.now();
        let resumed = self.remote(|remote| remote.resume(call, response, now));
        if let Some(resumed) = resumed.flatten() {
            self.carried_on(call, resumed, now);
        }
        self.moved_on(now);
        self.wake_root_if_wanted();
    }

    fn carried_on(&self, call: CallId, resumed: Resumed, now: Millis) {
        match resumed {
            Resumed::Claim(answer) => self.claim_answered(call, answer, now),
            other => self.ended(other),
        }
    }

    /// Operations that waited inside the store went on: their requests hear of it.
    fn moved_on(&self, now: Millis) {
        let moved_on = self.remote(|remote| remote.take_moved_on());
        for (call, resumed) in moved_on.into_iter().flatten() {
            self.carried_on(call, resumed, now);
        }
    }

    /// The root context woke: sends what the store keeps for it, and the requests that wait to
    /// go upstream from it.
    pub fn on_wake(&self) {
        self.woken.set(false);
        let now = self.host.now();
        let ended = self.remote(|remote| remote.root_woke(now));
        for resumed in ended.into_iter().flatten() {
            self.ended(resumed);
        }
        self.moved_on(now);
        let root_requests = std::mem::take(&mut *self.root_requests.borrow_mut());
        let mut unsent = Vec::new();
        for (sent, request) in root_requests {
            match self.host.send(&request) {
                Ok(call) => {
                    self.sent.borrow_mut().insert(call, sent);
                }
                Err(error) => {
                    self.store_failed(sent.exchange.borrow().request_id(), &error);
                    unsent.push(sent);
                }
            }
        }
        for sent in unsent {
            self.answered(sent, Answered::NotSent);
        }
    }

    /// Whether a new request may be sent from the root context: fewer than
    /// `outlive_client.max_in_flight` are, or wait to be. If not, it goes through the router.
    pub fn room_to_send_from_root(&self) -> bool {
        let max = self
            .config
            .outlive_client
            .as_ref()
            .map_or(0, |o| o.max_in_flight);
        let room = self.sent.borrow().len() + self.root_requests.borrow().len() < max;
        if !room {
            self.store_pressure(
                "outlive_client.max_in_flight requests are in flight from the root context: \
                 new ones go through the router",
            );
        }
        room
    }

    /// Whether `call` is a request sent upstream from the root context.
    pub fn sent_from_root(&self, call: CallId) -> bool {
        self.sent.borrow().contains_key(&call)
    }

    /// The answer to a request sent from the root context: it ends the claim, and goes to the
    /// client if it is still there.
    pub fn on_upstream_answer(&self, call: CallId, answer: Answered) {
        let sent = self.sent.borrow_mut().remove(&call);
        if let Some(sent) = sent {
            self.answered(sent, answer);
        }
    }

    fn answered(&self, sent: Waiter, answer: Answered) {
        let step = sent.exchange.borrow_mut().on_upstream_answer(answer);
        self.drive(sent.context, &sent.exchange, step);
        let reply = sent.exchange.borrow_mut().take_client_reply();
        if let Some(reply) = reply {
            if self.host.act_for(sent.context) {
                self.host.reply(&reply);
                self.host.act_as_root();
            }
        }
    }

    /// The root context's tick: polls the waiting requests and lets the store do its own work.
    pub fn tick(&self) {
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        self.poll_waiting(ticks.is_multiple_of(self.poll_every));
        let now = self.host.now();
        let ended = self.store.borrow_mut().tick(now);
        for resumed in ended {
            self.ended(resumed);
        }
        self.moved_on(now);
        self.observe_store();
        if ticks.is_multiple_of(GAUGE_TICKS) {
            self.report_levels(now);
        }
    }

    fn on_claim(
        &self,
        exchange: &Rc<RefCell<Exchange>>,
        reply: Result<ClaimReply, StoreError>,
        now: Millis,
    ) -> Step {
        if let Err(error) = &reply {
            let id = exchange.borrow().request_id().to_string();
            self.store_failed(&id, error);
        }
        let room = self.waiting.borrow().len() < self.config.max_waiting;
        exchange.borrow_mut().on_claim(reply, room, now)
    }

    fn await_call(&self, call: CallId, context: u32, exchange: &Rc<RefCell<Exchange>>) {
        let waiter = Waiter {
            context,
            exchange: Rc::clone(exchange),
        };
        self.awaiting.borrow_mut().insert(call, waiter);
    }

    /// Hands the answer to `call`'s claim to the request that waits for it, if it still does.
    fn claim_answered(
        &self,
        call: CallId,
        answer: Answer<Result<ClaimReply, StoreError>>,
        now: Millis,
    ) {
        let Some(waiter) = self.awaiting.borrow_mut().remove(&call) else {
            // Its request left before hearing (a claim sent for it from the root context goes
            // on without it): the work never ran, so a retry may claim at once.
            if let Answer::Now(Ok(Verdict::Claimed(ticket))) = answer {
                let released = self
                    .store
                    .borrow_mut()
                    .finish(ticket, Ending::Released, now);
                if let Answer::Now(reply) = released {
                    self.ended(Resumed::Finish(Answer::Now(reply)));
                }
            }
            return;
        };
        let step = match answer {
            Answer::Now(reply) => self.on_claim(&waiter.exchange, reply, now),
            Answer::Later(next) => {
                self.awaiting.borrow_mut().insert(next, waiter);
                return;
            }
            Answer::Queued => return,
        };
        self.act(&waiter, step);
    }

    /// Work no request waits for ended: a finish sent from the root context, or the store's own.
    fn ended(&self, resumed: Resumed) {
        if let Resumed::Finish(Answer::Now(reply)) = resumed {
            if let Err(error) = &reply {
                self.store_failed("-", error);
            }
            self.host.count(exchange::finish_counter(&reply), 1);
        }
    }

    /// Carries out `step` for a request other than the callback's own, resuming it if it may go on.
    fn act(&self, waiter: &Waiter, step: Step) {
        if self.host.act_for(waiter.context)
            && self.drive(waiter.context, &waiter.exchange, step) == Flow::Continue
        {
            self.host.resume();
        }
    }

    /// Asks again for every waiting request: the original may have finished or released. A
    /// remote store is asked from the root context itself, so that its answer comes back here;
    /// unless `far`, it answers only from what this Envoy holds.
    fn poll_waiting(&self, far: bool) {
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for waiter in waiting {
            let now = self.host.now();
            let step = {
                let mut exchange = waiter.exchange.borrow_mut();
                if exchange.wait_is_over(now) {
                    exchange.give_up_waiting(now)
                } else if let Some(claim) = exchange.pending_claim() {
                    let answer = self.store.borrow_mut().poll(&claim, far, now);
                    match answer {
                        None | Some(Answer::Queued) => {
                            drop(exchange);
                            self.waiting.borrow_mut().push(waiter);
                            continue;
                        }
                        Some(Answer::Now(reply)) => exchange.on_claim(reply, true, now),
                        Some(Answer::Later(call)) => {
                            drop(exchange);
                            self.awaiting.borrow_mut().insert(call, waiter);
                            continue;
                        }
                    }
                } else {
                    continue;
                }
            };
            self.act(&waiter, step);
            self.host.act_as_root();
        }
    }
}

mod reporting;
pub use reporting::GAUGE_TICKS;
#[cfg(test)]
mod tests;
