//! The proxy-wasm glue: each callback hands its event to the request's [`Exchange`] and carries
//! out the [`Step`] it gets back. Waiting duplicates are polled from the root context's tick.

use crate::config::Config;
use crate::exchange::{Exchange, Step};
use crate::host::{self, Metrics, SharedData};
use crate::metrics::Counter;
use crate::store::{Answer, Store};
use crate::table::Table;
use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// How often waiting duplicates are polled and one bucket is swept of expired responses.
const TICK_MILLIS: u64 = 20;

/// What one worker's VM shares between its root context and its HTTP contexts.
struct Vm {
    config: Rc<Config>,
    store: RefCell<Table<SharedData>>,
    metrics: Metrics,
    /// Unique to this VM in this Envoy process: the high bits of every claim token.
    number: u64,
    attempts: Cell<u64>,
    waiting: RefCell<Vec<Waiter>>,
    sweep_cursor: Cell<u64>,
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
                            exchange
                                .borrow_mut()
                                .on_claim(reply, self.room_to_wait(), now)
                        }
                        Answer::Later => break Action::Pause,
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
            log_outcome(exchange.request_id(), counter);
        }
        action
    }

    fn stop_waiting(&self, context_id: u32) {
        self.waiting
            .borrow_mut()
            .retain(|waiter| waiter.context_id != context_id);
    }

    /// Asks again for every waiting request: the original may have finished or released.
    fn poll_waiting(&self) {
        let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
        for waiter in waiting {
            let now = host::now();
            let step = {
                let mut exchange = waiter.exchange.borrow_mut();
                if exchange.wait_is_over(now) {
                    exchange.give_up_waiting()
                } else if let Some(claim) = exchange.pending_claim() {
                    Step::Claim(claim)
                } else {
                    continue;
                }
            };
            if !host::act_for(waiter.context_id) {
                continue;
            }
            if self.drive(waiter.context_id, &waiter.exchange, step) == Action::Continue {
                host::resume_request();
            }
        }
    }

    fn sweep(&self) {
        let cursor = self.sweep_cursor.get();
        self.sweep_cursor.set(cursor.wrapping_add(1));
        let store = self.store.borrow();
        if let Err(error) = store.sweep(cursor, self.next_token(), host::now()) {
            warn!("sweeping expired records failed: {error}");
        }
    }
}

/// Every outcome at debug; those an operator should see without asking, higher.
fn log_outcome(request_id: &str, counter: Counter) {
    let name = counter.name();
    match counter {
        Counter::StoreError => warn!("[{request_id}] {name}"),
        Counter::StoreFull | Counter::Rejected | Counter::LeaseExpired => {
            info!("[{request_id}] {name}")
        }
        _ => debug!("[{request_id}] {name}"),
    }
}

#[derive(Default)]
pub struct Root {
    vm: Option<Rc<Vm>>,
}

impl Context for Root {}

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
        let store = Table::new(SharedData, &config);
        let number = match store.boot() {
            Ok(number) => number,
            Err(problem) => {
                error!("idempotency filter cannot use shared data: {problem}");
                return false;
            }
        };
        // Start sweeping at a different bucket in each worker.
        let sweep_start = number.wrapping_mul(store.buckets() / 7 + 1);
        self.vm = Some(Rc::new(Vm {
            config: Rc::new(config),
            store: RefCell::new(store),
            metrics: Metrics::define(),
            number,
            attempts: Cell::new(0),
            waiting: RefCell::new(Vec::new()),
            sweep_cursor: Cell::new(sweep_start),
        }));
        host::set_tick_period(TICK_MILLIS);
        info!("idempotency filter configured (vm {number})");
        true
    }

    fn on_tick(&mut self) {
        if let Some(vm) = &self.vm {
            vm.poll_waiting();
            vm.sweep();
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

impl Context for Filter {}

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
