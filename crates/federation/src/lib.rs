//! Federation: the routing table, upstream registry clients, and the pull-through cache.

pub mod cache;
pub mod delivery;
pub mod router;
pub mod statics;
pub mod upstream;

pub use cache::{CacheStats, Fetched, PullThrough, UpstreamAuth};
pub use delivery::{Decision, Delivery};
pub use router::{Member, Resolved, RoutingTable};
pub use statics::{StaticBlob, StaticManifest, StaticSource};
pub use upstream::Upstream;

use std::collections::HashMap;
use std::sync::Arc;

use tessera_store::{BlobStore, MetaStore};

/// The routing table with a pull-through cache for each upstream.
pub struct Federation {
    pub table: RoutingTable,
    /// How blob bytes reach clients (`[[delivery]]`), with the health of the mirrors.
    pub delivery: Delivery,
    caches: HashMap<String, Arc<PullThrough>>,
}

impl Federation {
    /// Builds the table from `config`. Upstreams whose configuration is unchanged from
    /// `previous` (a reload) keep their client and cache, with tokens, fetches in flight and
    /// recency; others get `open_cache(name)`, their own stores (metadata, blobs).
    pub async fn new(
        config: &tessera_config::Config,
        previous: Option<&Federation>,
        mut open_cache: impl FnMut(&str) -> std::io::Result<(Arc<dyn MetaStore>, Arc<dyn BlobStore>)>,
    ) -> Result<Federation, String> {
        let mut upstreams = Vec::new();
        let mut caches = HashMap::new();
        for u in &config.upstreams {
            let kept = previous.and_then(|p| p.caches.get(&u.name)).filter(|c| c.upstream().config() == u);
            let cache = match kept {
                Some(cache) => cache.clone(),
                None => {
                    let upstream = Arc::new(Upstream::new(u)?);
                    let (meta, blobs) =
                        open_cache(&u.name).map_err(|e| format!("cache of upstream {}: {e}", u.name))?;
                    let cache = PullThrough::open(upstream, meta, blobs, previous.is_none())
                        .await
                        .map_err(|e| format!("cache of upstream {}: {e}", u.name))?;
                    Arc::new(cache)
                }
            };
            upstreams.push(cache.upstream().clone());
            caches.insert(u.name.clone(), cache);
        }
        let statics = open_statics(config)?;
        for s in &statics {
            s.start_polling();
        }
        let table = RoutingTable::new(config, upstreams, statics)?;
        let mut delivery = Delivery::new(&config.deliveries, previous.map(|p| &p.delivery))?;
        delivery.start_health_checks()?;
        Ok(Federation { table, delivery, caches })
    }

    /// The static sources of this table.
    pub fn statics(&self) -> &[Arc<StaticSource>] {
        self.table.statics()
    }

    /// The cache of an upstream of this table.
    pub fn cache(&self, upstream: &Upstream) -> Option<&PullThrough> {
        self.caches.get(upstream.name()).map(|c| c.as_ref())
    }

    /// Every upstream cache, by upstream name.
    pub fn caches(&self) -> impl Iterator<Item = (&str, &PullThrough)> {
        self.caches.iter().map(|(n, c)| (n.as_str(), c.as_ref()))
    }
}

/// The `[[static]]` sources of `config`, loaded (Crane directories read once here).
pub fn open_statics(config: &tessera_config::Config) -> Result<Vec<Arc<StaticSource>>, String> {
    config.statics.iter().map(|s| StaticSource::new(s).map(Arc::new)).collect()
}
