//! What the stores' and the core's unit tests share: shared data in memory, as Envoy implements
//! it, and a configuration from JSON.

use crate::core::config::Config;
use crate::core::store::StoreError;
use crate::stores::Kv;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

pub type Racer = Box<dyn FnOnce(&MemoryKv)>;

/// Shared data as Envoy implements it: a global CAS counter from 1, writes to absent keys
/// always succeed, no deletes.
#[derive(Default)]
pub struct MemoryKv {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    /// Runs once, between a read and the next write: a racing worker.
    pub interleave: RefCell<Option<Racer>>,
}

impl MemoryKv {
    pub fn bytes(&self) -> usize {
        self.map
            .borrow()
            .iter()
            .map(|(k, (v, _))| k.len() + v.len())
            .sum()
    }

    pub fn keys(&self) -> usize {
        self.map.borrow().len()
    }
}

impl Kv for &MemoryKv {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.map.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let racer = self.interleave.borrow_mut().take();
        if let Some(racer) = racer {
            racer(self);
        }
        let mut map = self.map.borrow_mut();
        if let (Some((_, current)), Some(cas)) = (map.get(key), cas) {
            if *current != cas {
                return Ok(false);
            }
        }
        let next = self.next_cas.get().max(1);
        self.next_cas.set(next.wrapping_add(1).max(1));
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(true)
    }
}

pub fn config(json: &str) -> Config {
    Config::parse(json.as_bytes()).unwrap()
}
