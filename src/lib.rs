//! An Idempotency-Key filter for Envoy: a retried request with the same key does not run the work
//! twice. The decisions live in pure modules that `cargo test` runs on the host; `filter` and
//! `host` are the thin proxy-wasm glue over them.

pub mod config;
pub mod decide;
pub mod identity;
pub mod record;
pub mod store;
pub mod table;
