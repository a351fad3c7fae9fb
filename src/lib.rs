//! An Idempotency-Key filter for Envoy: a retried request with the same key does not run the work
//! twice. The decisions live in pure modules that `cargo test` runs on the host; `filter` and
//! `host` are the thin proxy-wasm glue over them.

pub mod config;
pub mod decide;
pub mod etcd;
pub mod exchange;
pub mod identity;
pub mod metrics;
pub mod problem;
pub mod record;
pub mod store;
pub mod table;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(filter::Root::default()));
}}
