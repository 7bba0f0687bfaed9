//! The shard workers of the layer ranges this node runs for chains, by
//! `<model>/<first layer>/<end layer>` (what the data plane's shard path
//! names): what holds them adds and drops them, the data plane finds them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use weft_worker::Supervisor;

/// Shard workers by range, shared between what holds them and the data
/// plane.
#[derive(Clone, Default)]
pub struct Shards {
    by_range: Arc<RwLock<HashMap<String, Supervisor>>>,
}

impl Shards {
    /// The shard worker running `key` (`<model>/<first layer>/<end layer>`).
    pub fn get(&self, key: &str) -> Option<Supervisor> {
        self.by_range
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Runs `key`'s chain steps on `worker` from now on (`None`: no more).
    pub fn set(&self, key: &str, worker: Option<Supervisor>) {
        let mut shards = self.by_range.write().unwrap_or_else(|e| e.into_inner());
        match worker {
            Some(w) => shards.insert(key.to_string(), w),
            None => shards.remove(key),
        };
    }
}
