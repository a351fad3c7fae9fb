//! The stores behind the boundary ([`crate::core::store::Store`]): the shared-data table, and
//! etcd for a fleet with the table as its local cache. Both reach the host only through the two
//! ports below, which the proxy glue implements.

pub mod etcd;
#[cfg(test)]
mod model;
pub mod table;
#[cfg(test)]
pub mod testkit;

use crate::core::config::{Config, EtcdConfig};
use crate::core::store::{CallId, Store, StoreError};
use etcd::Etcd;
use table::Table;

/// The store a configuration asks for, over this process's shared data `kv`: the table, or etcd
/// (reached through the caller `calls` makes) with the table as its local cache of complete
/// records. With it, the number unique to this VM in the process ([`Table::boot`]).
pub fn open<K, C>(
    config: &Config,
    kv: K,
    calls: impl FnOnce(EtcdConfig) -> C,
) -> Result<(Box<dyn Store>, u64), StoreError>
where
    K: Kv + Clone + 'static,
    C: Caller + 'static,
{
    let mut table = match config.etcd {
        Some(_) => Table::cache(kv.clone(), config),
        None => Table::new(kv.clone(), config),
    };
    let number = table.boot()?;
    let store: Box<dyn Store> = match config.etcd.clone() {
        Some(settings) => Box::new(Etcd::new(
            calls(settings.clone()),
            kv,
            table,
            config,
            settings,
        )),
        None => Box::new(table),
    };
    Ok((store, number))
}

/// A key-value map with compare-and-swap: Envoy's shared data, as the host really behaves.
/// `set` with `cas: None` always writes; with `Some(cas)` it writes only if the key's current
/// CAS matches — and always if the key is absent.
pub trait Kv {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// Makes a unary gRPC call to etcd (service, method, message); the answer comes to
/// [`Remote::resume`] under the returned id.
pub trait Caller {
    fn call(&self, method: etcd::Method, message: &[u8]) -> Result<CallId, StoreError>;
    /// The host's clock in microseconds, to time calls by: a round trip on loopback is tens of
    /// them.
    fn micros(&self) -> u64;
}
