//! The pure core: what the filter decides, with time passed in and no proxy-wasm in sight.
//! `cargo test` runs all of it on the host.

pub mod body;
pub mod config;
pub mod exchange;
#[cfg(test)]
pub mod garbage;
pub mod identity;
pub mod lifecycle;
pub mod metrics;
pub mod problem;
pub mod record;
pub mod route;
pub mod store;
pub mod worker;

/// Milliseconds: the filter's only unit of time.
pub type Millis = u64;
