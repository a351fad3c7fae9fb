//! The proxy-wasm glue: each callback reads what the host offers, hands it to the request's
//! [`Exchange`] and the steps it gets back to the VM's [`Worker`], and answers the host.

mod host;

use crate::core::config::Config;
use crate::core::exchange::{Exchange, Step};
use crate::core::route::Routed;
use crate::core::worker::{Flow, Worker};
use crate::stores;
use host::{EtcdCalls, Proxy, SharedData};
use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::cell::RefCell;
use std::rc::Rc;

/// How often waiting duplicates are polled and one bucket is swept of expired responses.
const TICK_MILLIS: u64 = 20;

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

pub struct Root {
    context: u32,
    worker: Option<Rc<Worker<Proxy>>>,
}

impl Root {
    pub fn new(context: u32) -> Root {
        Root {
            context,
            worker: None,
        }
    }
}

/// A call's answer comes to whichever context made it: the root (requests sent from it,
/// finishes, polls, lease grants) or a request (claims).
fn http_call_answered(worker: &Option<Rc<Worker<Proxy>>>, call: u32, headers: usize, body: usize) {
    if let Some(worker) = worker {
        if worker.sent_from_root(call) {
            let max_body = worker.max_answer_bytes(call);
            worker.on_upstream_answer(call, host::upstream_answer(headers, body, max_body));
        }
    }
}

fn grpc_call_answered(worker: &Option<Rc<Worker<Proxy>>>, call: u32, status: u32, size: usize) {
    if let Some(worker) = worker {
        worker.on_call_response(call, host::grpc_answer(status, size));
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, call: u32, headers: usize, body: usize, _trailers: usize) {
        http_call_answered(&self.worker, call, headers, body);
    }

    fn on_grpc_call_response(&mut self, call: u32, status: u32, size: usize) {
        grpc_call_answered(&self.worker, call, status, size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // Log at Envoy's level for wasm, so debug lines cost nothing unless asked for.
        if let Some(level) = host::log_level() {
            proxy_wasm::set_log_level(level);
        }
        let config = match Config::parse(&host::body(BufferType::PluginConfiguration, usize::MAX)) {
            Ok(config) => config,
            Err(problem) => {
                error!("idempotency filter refused its configuration: {problem}");
                return false;
            }
        };
        let calls = EtcdCalls::new;
        let (store, number) = match stores::open(&config, SharedData, calls) {
            Ok(opened) => opened,
            Err(problem) => {
                error!("idempotency filter cannot use shared data: {problem}");
                return false;
            }
        };
        // The root context is woken to send requests that outlive their clients, and etcd calls
        // that carry several requests' operations.
        let wake_queue = if config.outlive_client.is_some() || config.etcd.is_some() {
            let Some(queue) = host::wake_queue(&format!("{}wake/{number}", config.key_prefix))
            else {
                error!("idempotency filter cannot register the queue that wakes its root context");
                return false;
            };
            Some(queue)
        } else {
            None
        };
        let proxy = Proxy::define(self.context, wake_queue);
        let worker = Worker::new(proxy, Rc::new(config), store, number);
        self.worker = Some(Rc::new(worker));
        host::set_tick_period(TICK_MILLIS);
        info!("idempotency filter configured (vm {number})");
        true
    }

    fn on_queue_ready(&mut self, queue: u32) {
        host::drain(queue);
        if let Some(worker) = &self.worker {
            worker.on_wake();
        }
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker {
            worker.tick();
        }
    }

    fn create_http_context(&self, context: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone();
        let exchange = worker.as_ref().map(|worker| worker.start());
        Some(Box::new(Filter {
            context,
            worker,
            exchange,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    context: u32,
    worker: Option<Rc<Worker<Proxy>>>,
    exchange: Option<Rc<RefCell<Exchange>>>,
}

impl Filter {
    /// Hands an event to the exchange and the step it gives to the worker.
    fn hand(&self, event: impl FnOnce(&mut Exchange) -> Step) -> Action {
        match (&self.worker, &self.exchange) {
            (Some(worker), Some(exchange)) => {
                let step = event(&mut exchange.borrow_mut());
                action(worker.drive(self.context, exchange, step))
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
        http_call_answered(&self.worker, call, headers, body);
    }

    fn on_grpc_call_response(&mut self, call: u32, status: u32, size: usize) {
        grpc_call_answered(&self.worker, call, status, size);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(worker) = &self.worker else {
            return Action::Continue;
        };
        // One read of the whole map: a host call that returns bytes costs more than the bytes
        // (the host calls back into the VM to allocate them), so the method comes from it too.
        let headers = host::headers(MapType::HttpRequestHeaders);
        let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        #[cfg(feature = "fault-injection")]
        if value("x-idempotency-fault").is_some() {
            ::core::arch::wasm32::unreachable();
        }
        let method = String::from_utf8_lossy(value(":method").map_or(&[][..], |m| m.as_slice()));
        let route = worker.route(host::route_metadata);
        if !route.covers(&method) {
            return Action::Continue;
        }
        let request_id = value("x-request-id").map(|id| String::from_utf8_lossy(id).into_owned());
        let policy = match route {
            Routed::Policy(policy) => policy,
            Routed::Misconfigured(refused) => {
                let name = host::route_name();
                worker.route_misconfigured(&name, &refused.error);
                return self.hand(|exchange| {
                    exchange.set_request_id(request_id.unwrap_or_default());
                    exchange.refuse_route(&name, &refused.error)
                });
            }
            Routed::Disabled => return Action::Continue,
        };
        let path = value(":path").cloned().unwrap_or_default();
        let upstream = policy
            .send_from_root
            .filter(|_| worker.room_to_send_from_root())
            .and_then(|timeout| Some((host::route_cluster()?, timeout)));
        self.hand(|exchange| {
            exchange.follow(policy);
            if let Some((cluster, timeout)) = upstream {
                exchange.send_from_root(cluster, timeout);
            }
            exchange.set_request_id(request_id.unwrap_or_default());
            exchange.on_request_headers(&method, &path, &headers, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.hand(|exchange| {
            exchange.on_request_body(size, end_of_stream, |from| {
                host::body_from(BufferType::HttpRequestBody, from, size)
            })
        })
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        // With trailers, the last body callback did not end the stream: this does.
        self.hand(|exchange| exchange.on_request_body_end())
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
        if let Some(worker) = &self.worker {
            worker.leave(self.context);
        }
        let unanswered = self
            .exchange()
            .is_some_and(|exchange| exchange.needs_stream_end());
        let end = if unanswered {
            host::stream_end()
        } else {
            Default::default()
        };
        self.hand(|exchange| exchange.on_end(end));
    }
}
