//! Federation: the routing table, upstream registry clients, and the pull-through cache.

pub mod cache;
pub mod router;
pub mod upstream;

pub use cache::{Fetched, PullThrough};
pub use router::{Member, Resolved, RoutingTable};
pub use upstream::Upstream;

use std::collections::HashMap;
use std::sync::Arc;

use tessera_store::{BlobStore, MetaStore};

/// The routing table with a pull-through cache for each upstream.
pub struct Federation {
    pub table: RoutingTable,
    caches: HashMap<String, PullThrough>,
}

impl Federation {
    /// `cache_meta(name)` opens the cache metadata of the upstream called `name`.
    pub fn new(
        table: RoutingTable,
        blobs: Arc<dyn BlobStore>,
        mut cache_meta: impl FnMut(&str) -> std::io::Result<Arc<dyn MetaStore>>,
    ) -> std::io::Result<Federation> {
        let mut caches = HashMap::new();
        for u in table.upstreams() {
            caches.insert(u.name().to_string(), PullThrough::new(u.clone(), cache_meta(u.name())?, blobs.clone()));
        }
        Ok(Federation { table, caches })
    }

    /// The cache of an upstream of this table.
    pub fn cache(&self, upstream: &Upstream) -> Option<&PullThrough> {
        self.caches.get(upstream.name())
    }
}
