//! The stores behind the boundary ([`crate::core::store::Store`]): the shared-data table, and
//! etcd for a fleet with the table as its local cache. Both reach the host only through the two
//! ports below, which the proxy glue implements.

pub mod etcd;
pub mod table;
#[cfg(test)]
pub mod testkit;

use crate::core::store::{CallId, StoreError};

/// A key-value map with compare-and-swap: Envoy's shared data, as the host really behaves.
/// `set` with `cas: None` always writes; with `Some(cas)` it writes only if the key's current
/// CAS matches — and always if the key is absent.
pub trait Kv {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// Sends a POST to etcd's gateway; the answer comes to [`crate::core::store::Store::resume`] under the returned id.
pub trait Caller {
    fn post(&self, path: &str, body: &[u8]) -> Result<CallId, StoreError>;
}
