//! The proxy-wasm glue: each callback hands its event to the request's [`Exchange`] and carries
//! out the [`Step`] it gets back. Waiting duplicates are polled from the root context's tick.

use crate::core::config::Config;
use crate::core::counters::Counter;
use crate::core::exchange::{self, Exchange, Step};
use crate::core::store::{Answer, CallId, CallResponse, Resumed, Store, StoreError};
mod host;

use crate::stores::etcd::Etcd;
use crate::stores::table::Table;
use host::{EtcdCalls, Metrics, SharedData};
use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// How often waiting duplicates are polled and one bucket is swept of expired responses.
const TICK_MILLIS: u64 = 20;
/// With a remote store, waiting requests look at what this Envoy holds on every tick and ask
/// the store itself every 5 ticks (100 ms).
const REMOTE_POLL_TICKS: u64 = 5;

/// What one worker's VM shares between its root context and its HTTP contexts.
struct Vm {
    config: Rc<Config>,
    store: RefCell<Box<dyn Store>>,
    metrics: Metrics,
    /// Unique to this VM in this Envoy process: the high bits of every claim token.
    number: u64,
    attempts: Cell<u64>,
    /// Requests held for an original, polled on every tick.
    waiting: RefCell<Vec<Waiter>>,
    /// Requests whose claim waits for a remote store's answer, by call.
    awaiting: RefCell<HashMap<CallId, Waiter>>,
    ticks: Cell<u64>,
    quiet_until: Cell<u64>,
    pressure_quiet_until: Cell<u64>,
    /// Waiting requests ask the store itself every this many ticks: every tick for shared
    /// data, less often for a remote store, where each such poll is a call.
    poll_every: u64,
}

struct Waiter {
    context_id: u32,
    exchange: Rc<RefCell<Exchange>>,
}

impl Vm {
    fn next_token(&self) -> u64 {
        let attempt = self.attempts.get().wrapping_add(1);
        self.attempts.set(attempt);
        (self.number << 40) | (attempt & ((1 << 40) - 1))
    }

    fn room_to_wait(&self) -> bool {
        self.waiting.borrow().len() < self.config.max_waiting
    }

    /// Carries out steps until one leaves the request paused or let go; returns what the
    /// callback should answer the host.
    fn drive(&self, context_id: u32, exchange: &Rc<RefCell<Exchange>>, first: Step) -> Action {
        let mut step = first;
        let action = loop {
            step = match step {
                Step::Pass | Step::Forward | Step::Done => break Action::Continue,
                Step::Buffer => break Action::Pause,
                Step::Claim(claim) => {
                    let now = host::now();
                    let answer = self.store.borrow_mut().claim(&claim, now);
                    match answer {
                        Answer::Now(reply) => {
                            if let Err(error) = &reply {
                                self.store_failed(exchange.borrow().request_id(), error);
                            }
                            exchange
                                .borrow_mut()
                                .on_claim(reply, self.room_to_wait(), now)
                        }
                        Answer::Later(call) => {
                            self.await_call(call, context_id, exchange);
                            break Action::Pause;
                        }
                        Answer::Queued => break Action::Pause,
                    }
                }
                Step::Wait => {
                    self.waiting.borrow_mut().push(Waiter {
                        context_id,
                        exchange: Rc::clone(exchange),
                    });
                    break Action::Pause;
                }
                Step::Reply(reply) => {
                    host::send(&reply);
                    break Action::Pause;
                }
                Step::Finish(ticket, outcome) => {
                    let answer = self.store.borrow_mut().finish(ticket, outcome, host::now());
                    if let Answer::Now(reply) = answer {
                        if let Err(error) = &reply {
                            let exchange = exchange.borrow();
                            warn!(
                                "[{}] recording the end failed: {error}",
                                exchange.request_id()
                            );
                        }
                        exchange.borrow_mut().on_finish(reply);
                    }
                    break Action::Continue;
                }
            }
        };
        let mut exchange = exchange.borrow_mut();
        for counter in exchange.take_counts() {
            self.metrics.increment(counter);
            debug!("[{}] {}", exchange.request_id(), counter.name());
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
        self.count_evictions();
        action
    }

    fn count_evictions(&self) {
        let ages = self.store.borrow_mut().take_evictions();
        let Some(youngest) = ages.iter().min() else {
            return;
        };
        let seconds: u64 = ages.iter().map(|age| age / 1_000).sum();
        self.metrics.add(Counter::Evicted, ages.len() as u64);
        self.metrics.add(Counter::EvictedAgeSeconds, seconds);
        let raise = match self.config.etcd {
            Some(_) => "an organisation is past its share: raise etcd.max_share_bytes",
            None => "raise capacity_records",
        };
        self.store_pressure(&format!(
            "evicting records before their ttl, the youngest after {}s of {}s: {raise}",
            youngest / 1_000,
            self.config.ttl / 1_000
        ));
    }

    /// The store evicting or refusing is logged at most once a minute per worker, so that an
    /// operator learns of it from the log and not from clients; the counters count every one.
    fn store_pressure(&self, what: &str) {
        let now = host::now();
        if now >= self.pressure_quiet_until.get() {
            self.pressure_quiet_until.set(now + 60_000);
            warn!("idempotency store: {what}");
        }
    }

    /// Store failures are logged at most once a second per worker, so that an outage does not
    /// flood the log (the counters count every one).
    fn store_failed(&self, request_id: &str, error: &StoreError) {
        let now = host::now();
        if now >= self.quiet_until.get() {
            self.quiet_until.set(now + 1_000);
            warn!("[{request_id}] {error}");
        } else {
            debug!("[{request_id}] {error}");
        }
    }

    fn await_call(&self, call: CallId, context_id: u32, exchange: &Rc<RefCell<Exchange>>) {
        let waiter = Waiter {
            context_id,
            exchange: Rc::clone(exchange),
        };
        self.awaiting.borrow_mut().insert(call, waiter);
    }

    fn stop_waiting(&self, context_id: u32) {
        self.waiting
            .borrow_mut()
            .retain(|waiter| waiter.context_id != context_id);
        self.awaiting
            .borrow_mut()
            .retain(|_, waiter| waiter.context_id != context_id);
    }

    /// A remote store answered a call, in the callback of the context that made it.
    fn on_call_response(&self, call: CallId, response: CallResponse) {
        let now = host::now();
        let resumed = self.store.borrow_mut().resume(call, response, now);
        if let Some(resumed) = resumed {
            self.carry_on(call, resumed, now);
        }
    }

    /// Hands a resumed operation's answer to the request that waits for it, if any.
    fn carry_on(&self, call: CallId, resumed: Resumed, now: u64) {
        match resumed {
            Resumed::Claim(answer) => {
                let Some(waiter) = self.awaiting.borrow_mut().remove(&call) else {
                    return;
                };
                let step = match answer {
                    Answer::Now(reply) => {
                        if let Err(error) = &reply {
                            self.store_failed(waiter.exchange.borrow().request_id(), error);
                        }
                        let room = self.room_to_wait();
                        waiter.exchange.borrow_mut().on_claim(reply, room, now)
                    }
                    Answer::Later(next) => {
                        self.awaiting.borrow_mut().insert(next, waiter);
                        return;
                    }
                    Answer::Queued => return,
                };
                if host::act_for(waiter.context_id)
                    && self.drive(waiter.context_id, &waiter.exchange, step) == Action::Continue
                {
                    host::resume_request();
                }
            }
            Resumed::Finish(Answer::Now(reply)) => {
                if let Err(error) = &reply {
                    self.store_failed("-", error);
                }
                self.metrics.increment(exchange::finish_counter(&reply));
            }
            Resumed::Finish(_) | Resumed::Nothing => {}
        }
    }

    /// Asks again for every waiting request: the original may have finished or released. A
    /// remote store is asked from the root context itself, so that its answer comes back here;
    /// unless `far`, it answers only from what this Envoy holds.
    fn poll_waiting(&self, far: bool) {
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for waiter in waiting {
            let now = host::now();
            let step = {
                let mut exchange = waiter.exchange.borrow_mut();
                if exchange.wait_is_over(now) {
                    exchange.give_up_waiting()
                } else if let Some(claim) = exchange.pending_claim() {
                    let answer = self.store.borrow_mut().poll(&claim, far, now);
                    match answer {
                        None => {
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
                        Some(Answer::Queued) => Step::Wait,
                    }
                } else {
                    continue;
                }
            };
            if host::act_for(waiter.context_id)
                && self.drive(waiter.context_id, &waiter.exchange, step) == Action::Continue
            {
                host::resume_request();
            }
        }
    }

    fn tick(&self) {
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        self.poll_waiting(ticks.is_multiple_of(self.poll_every));
        let now = host::now();
        let ended = self.store.borrow_mut().tick(now);
        for resumed in ended {
            self.carry_on(0, resumed, now);
        }
        self.count_evictions();
    }
}

#[derive(Default)]
pub struct Root {
    vm: Option<Rc<Vm>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, call: u32, headers: usize, body: usize, _trailers: usize) {
        if let Some(vm) = &self.vm {
            vm.on_call_response(call, host::call_response(headers, body));
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // Log at Envoy's level for wasm, so debug lines cost nothing unless asked for.
        if let Some(level) = host::log_level() {
            proxy_wasm::set_log_level(level);
        }
        let config = match Config::parse(&host::plugin_configuration()) {
            Ok(config) => config,
            Err(problem) => {
                error!("idempotency filter refused its configuration: {problem}");
                return false;
            }
        };
        let mut table = if config.etcd.is_some() {
            Table::cache(SharedData, &config)
        } else {
            Table::new(SharedData, &config)
        };
        let number = match table.boot() {
            Ok(number) => number,
            Err(problem) => {
                error!("idempotency filter cannot use shared data: {problem}");
                return false;
            }
        };
        let poll_every = if config.etcd.is_some() {
            REMOTE_POLL_TICKS
        } else {
            1
        };
        let store: Box<dyn Store> = match config.etcd.clone() {
            // With etcd, the table is the local cache of complete records.
            Some(settings) => Box::new(Etcd::new(
                EtcdCalls {
                    settings: settings.clone(),
                },
                SharedData,
                table,
                &config,
                settings,
            )),
            None => Box::new(table),
        };
        self.vm = Some(Rc::new(Vm {
            config: Rc::new(config),
            store: RefCell::new(store),
            metrics: Metrics::define(),
            number,
            attempts: Cell::new(0),
            waiting: RefCell::new(Vec::new()),
            awaiting: RefCell::new(HashMap::new()),
            ticks: Cell::new(0),
            quiet_until: Cell::new(0),
            pressure_quiet_until: Cell::new(0),
            poll_every,
        }));
        host::set_tick_period(TICK_MILLIS);
        info!("idempotency filter configured (vm {number})");
        true
    }

    fn on_tick(&mut self) {
        if let Some(vm) = &self.vm {
            vm.tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let vm = self.vm.clone();
        let exchange = vm.as_ref().map(|vm| {
            Rc::new(RefCell::new(Exchange::new(
                Rc::clone(&vm.config),
                vm.next_token(),
            )))
        });
        Some(Box::new(Filter {
            context_id,
            vm,
            exchange,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    context_id: u32,
    vm: Option<Rc<Vm>>,
    exchange: Option<Rc<RefCell<Exchange>>>,
}

impl Filter {
    fn drive(&self, step: impl FnOnce(&mut Exchange) -> Step) -> Action {
        match (&self.vm, &self.exchange) {
            (Some(vm), Some(exchange)) => {
                let step = step(&mut exchange.borrow_mut());
                vm.drive(self.context_id, exchange, step)
            }
            _ => Action::Continue,
        }
    }

    fn exchange(&self) -> Option<std::cell::RefMut<'_, Exchange>> {
        self.exchange.as_ref().map(|e| e.borrow_mut())
    }
}

impl Context for Filter {
    fn on_http_call_response(&mut self, call: u32, headers: usize, body: usize, _trailers: usize) {
        if let Some(vm) = &self.vm {
            vm.on_call_response(call, host::call_response(headers, body));
        }
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        // One header read decides whether the request is covered at all.
        let method = host::request_header(":method").unwrap_or_default();
        let method = String::from_utf8_lossy(&method);
        if !vm.config.covers(&method) {
            return Action::Continue;
        }
        let headers = host::headers(MapType::HttpRequestHeaders);
        let path = headers
            .iter()
            .find(|(name, _)| name == ":path")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        self.drive(|exchange| exchange.on_request_headers(&method, &path, &headers, end_of_stream))
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.drive(|exchange| {
            exchange.on_request_body(size, end_of_stream, || {
                host::body(BufferType::HttpRequestBody, size)
            })
        })
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        // With trailers, the last body callback did not end the stream: this does.
        self.drive(|exchange| {
            exchange.on_request_body_end(|size| host::body(BufferType::HttpRequestBody, size))
        })
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if let Some(mut exchange) = self.exchange() {
            host::add_missing_headers(&exchange.take_headers_to_restore());
            if exchange.is_owner() {
                let via_upstream = host::response_via_upstream();
                let headers = if via_upstream {
                    host::headers(MapType::HttpResponseHeaders)
                } else {
                    Vec::new()
                };
                exchange.on_response_headers(&headers, via_upstream, end_of_stream);
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if let Some(mut exchange) = self.exchange() {
            if exchange.wants_response_body() {
                let chunk = host::body(BufferType::HttpResponseBody, size);
                exchange.on_response_body(&chunk, end_of_stream);
            } else {
                exchange.on_response_body(&[], end_of_stream);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if let Some(mut exchange) = self.exchange() {
            exchange.on_response_trailers();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(vm) = &self.vm {
            vm.stop_waiting(self.context_id);
        }
        let owner = self.exchange().is_some_and(|exchange| exchange.is_owner());
        let flags = if owner { host::response_flags() } else { 0 };
        self.drive(|exchange| exchange.on_end(flags));
    }
}
