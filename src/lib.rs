//! An Idempotency-Key filter for Envoy: a retried request with the same key does not run the work
//! twice.
//!
//! Three layers, each depending only on the ones before it:
//! - `core`: the decisions, pure Rust with time passed in: configuration, identity, a record's
//!   lifecycle and formats, one request's exchange, problems, counters, and the store boundary.
//! - `stores`: the shared-data table and etcd, behind that boundary.
//! - `proxy` (wasm32 only): the proxy-wasm glue, a few lines per callback.
// The glue is built for wasm32 only, so what only it uses looks dead to a host build; dead code
// is judged by the wasm32 build.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod core;
mod stores;

#[cfg(target_arch = "wasm32")]
mod proxy;

pub use crate::core::config::{Config, ConfigError};

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context| Box::new(proxy::Root::new(context)));
}}
