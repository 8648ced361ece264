//! Federation: the routing table, the sources it routes to (hosted, upstream registries
//! through their pull-through cache or redirect-only, static trees), and the delivery policy.

pub mod cache;
pub mod delivery;
pub mod router;
pub mod signing;
pub mod source;
pub mod statics;
pub mod sync;

/// The registry client each upstream is reached through, from `tessera-client`.
pub use tessera_client::upstream;

pub use cache::{CacheStats, Fetched, LATENCY_BUCKETS, PullThrough, UPSTREAM_REQUESTS, UpstreamAuth, UpstreamLatency};
pub use delivery::{Decision, Delivery};
pub use router::{Matched, Reply, Resolved, RouteInfo, RoutingTable};
pub use source::{Answer, Ask, Found, Located, Served, Source, SourceKind, Via};
pub use statics::{StaticBlob, StaticManifest, StaticSource};
pub use upstream::Upstream;

use std::collections::HashMap;
use std::sync::Arc;

use tessera_registry::Registry;
use tessera_store::{BlobStore, MetaStore, StoreError};

use source::{Cached, Hosted, Published, RedirectOnly, SourceSet, UpstreamSources};

/// Why a configuration's routing table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("route {route}: no upstream or static source {target:?}")]
    UnknownTarget { route: usize, target: String },
    #[error("upstream {name}")]
    Upstream {
        name: String,
        #[source]
        source: upstream::BuildError,
    },
    #[error("cache of upstream {name}")]
    Cache {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Static(#[from] statics::StaticError),
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    #[error(transparent)]
    Signing(#[from] signing::SigningError),
}

/// The routing table with a pull-through cache for each upstream.
pub struct Federation {
    pub table: RoutingTable,
    /// How blob bytes reach clients (`[[delivery]]`), with the health of the mirrors.
    pub delivery: Arc<Delivery>,
    /// Which keys vouch for which names, and the checks they passed (`[[signatures]]`).
    pub signing: signing::Signing,
    caches: HashMap<String, Arc<PullThrough>>,
}

impl Federation {
    /// Builds the table from `config`, with `hosted` as the hosted source. Upstreams whose
    /// configuration is unchanged from `previous` (a reload) keep their client and cache,
    /// with tokens, fetches in flight and recency; others get `open_cache(name)`, their own
    /// stores (metadata, blobs).
    pub async fn new(
        config: &tessera_config::Config,
        previous: Option<&Federation>,
        hosted: Arc<Registry>,
        mut open_cache: impl FnMut(&str) -> Result<(Arc<dyn MetaStore>, Arc<dyn BlobStore>), StoreError>,
    ) -> Result<Federation, FederationError> {
        let mut caches = HashMap::new();
        for u in &config.upstreams {
            let kept = previous.and_then(|p| p.caches.get(&u.name)).filter(|c| c.upstream().config() == u);
            let cache = match kept {
                Some(cache) => cache.clone(),
                None => {
                    let upstream = Upstream::new(u)
                        .map_err(|source| FederationError::Upstream { name: u.name.clone(), source })?;
                    let cache_error = |source| FederationError::Cache { name: u.name.clone(), source };
                    let (meta, blobs) = open_cache(&u.name).map_err(cache_error)?;
                    let cluster = hosted.cluster().cloned();
                    let cache = PullThrough::open(Arc::new(upstream), meta, blobs, previous.is_none(), cluster)
                        .await
                        .map_err(cache_error)?;
                    Arc::new(cache)
                }
            };
            caches.insert(u.name.clone(), cache);
        }
        let mut delivery = Delivery::new(&config.deliveries, previous.map(|p| p.delivery.as_ref()))
            .map_err(FederationError::Delivery)?;
        delivery.start_health_checks().map_err(FederationError::Delivery)?;
        if delivery.presigns() && !hosted.presigns() {
            return Err(FederationError::Delivery(delivery::DeliveryError::Presigning));
        }
        let delivery = Arc::new(delivery);
        let statics = open_statics(config)?;
        for s in &statics {
            s.start_polling();
        }
        // The one place each kind of source is made.
        let vouches = hosted.meta().clone();
        let sources = SourceSet {
            hosted: Arc::new(Hosted { registry: hosted, delivery: delivery.clone() }),
            upstreams: config
                .upstreams
                .iter()
                .filter_map(|u| caches.get(&u.name))
                .map(|cache| UpstreamSources {
                    upstream: cache.upstream().clone(),
                    cached: Arc::new(Cached(cache.clone())),
                    redirect: Arc::new(RedirectOnly(cache.upstream().clone())),
                })
                .collect(),
            statics: statics
                .into_iter()
                .map(|source| {
                    let face: Arc<dyn Source> =
                        Arc::new(Published { source: source.clone(), delivery: delivery.clone() });
                    (source, face)
                })
                .collect(),
        };
        let table = RoutingTable::new(config, &sources)?;
        // The counts carry over a reload; the passed checks do not (the keys may differ).
        let signing = signing::Signing::new(&config.signatures, previous.map(|p| p.signing.stats.clone()), vouches)?;
        Ok(Federation { table, delivery, signing, caches })
    }

    /// The static sources of this table.
    pub fn statics(&self) -> impl Iterator<Item = &Arc<StaticSource>> {
        self.table.statics()
    }

    /// Every upstream cache, by upstream name.
    pub fn caches(&self) -> impl Iterator<Item = (&str, &PullThrough)> {
        self.caches.iter().map(|(n, c)| (n.as_str(), c.as_ref()))
    }
}

/// The `[[static]]` sources of `config`, loaded (Crane directories read once here).
fn open_statics(config: &tessera_config::Config) -> Result<Vec<Arc<StaticSource>>, FederationError> {
    config.statics.iter().map(|s| StaticSource::new(s).map(Arc::new).map_err(FederationError::Static)).collect()
}
