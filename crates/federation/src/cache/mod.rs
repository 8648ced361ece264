//! The pull-through cache of one upstream.
//!
//! - Manifests by digest and blobs are immutable: once fetched and verified they are kept.
//! - A manifest by tag is served from the cache for `tag_ttl_secs`, then revalidated with a
//!   HEAD (compare `Docker-Content-Digest`); when the upstream fails (unreachable, 5xx, 429)
//!   the cached copy is served, marked stale, for up to `max_stale_secs`.
//! - "Not found" answers are remembered for `negative_ttl_secs`.
//! - A blob is fetched once however many clients ask at the same time (single flight): the
//!   fetch writes into an upload session while hashing; every client streams from that
//!   session as it grows, and the last byte is held back until the digest has verified. A
//!   blob that fails verification is never committed, and its readers see an error.
//! - A blob the cache cannot store (its disk is full) is still served: its readers get it
//!   straight from the upstream, verified the same way, and nothing is kept.

mod classify;
mod fill;
mod lru;
mod tags;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use tessera_registry::store_failure;
use tessera_spec::{Digest, ErrorCode, OciError, ParsedManifest, Reference, RepoName, Tag};
use tessera_store::{BlobStore, ClusterLocks, ManifestRecord, MetaStore, StoreError};
use tokio::sync::watch;

use crate::upstream::{Upstream, UpstreamError, manifest_accept};
use classify::Answer;
use fill::FillState;
use lru::{Lru, evict};

/// A manifest answered through the cache.
pub struct Fetched {
    pub manifest: ManifestRecord,
    /// Served from the cache because the upstream could not be asked.
    pub stale: bool,
}

/// Counters of one upstream's cache, exported at `/metrics`.
#[derive(Default)]
pub struct CacheStats {
    /// Manifest requests answered from the cache (fresh, or confirmed by the upstream).
    pub manifest_hits: AtomicU64,
    /// Blob requests answered from bytes the cache held.
    pub blob_hits: AtomicU64,
    /// Blob requests that waited for a fetch from the upstream (their own or one shared).
    pub blob_misses: AtomicU64,
    pub manifests_fetched: AtomicU64,
    pub blobs_fetched: AtomicU64,
    pub blob_bytes_fetched: AtomicU64,
    pub stale_served: AtomicU64,
    pub digest_mismatches: AtomicU64,
    pub fetch_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub rate_limited: AtomicU64,
    /// How long the upstream took to answer (to its status line), by what was asked.
    pub upstream_latency: UpstreamLatency,
}

/// Upper bounds (seconds) of the latency histograms' buckets: from a loopback answer to a
/// request that hit its time limit.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// What a request to an upstream asked for, as the `request` label of its latency.
pub const UPSTREAM_REQUESTS: [&str; 5] = ["manifest", "blob", "tags", "referrers", "other"];

/// One latency histogram per kind of upstream request ([`UPSTREAM_REQUESTS`]).
pub struct UpstreamLatency(pub [prometheus_client::metrics::histogram::Histogram; 5]);

impl Default for UpstreamLatency {
    fn default() -> Self {
        UpstreamLatency(std::array::from_fn(|_| prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS)))
    }
}

impl UpstreamLatency {
    fn observe(&self, path: &str, took: Duration) {
        let kind = ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
            .iter()
            .position(|part| path.contains(part))
            .unwrap_or(4);
        self.0[kind].observe(took.as_secs_f64());
    }
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// How many "not found" answers one upstream's cache remembers (about 100 bytes each).
pub const MISSING_REMEMBERED: usize = 10_000;
/// How many tags' last upstream check one upstream's cache keeps in memory.
pub const CHECKS_REMEMBERED: usize = 10_000;

pub struct PullThrough {
    upstream: Arc<Upstream>,
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    /// When each cached tag was last confirmed by the upstream, for the most used
    /// [`CHECKS_REMEMBERED`] tags; the rest are read from `meta`, where every check is
    /// persisted (so a restart keeps the bound on how stale an answer may be).
    checked: quick_cache::sync::Cache<(RepoName, Tag), SystemTime>,
    /// Recent "not found" answers, at most [`MISSING_REMEMBERED`]: the keys are whatever
    /// clients ask for, so a flood of distinct misses pushes out old ones, not memory.
    missing: quick_cache::sync::Cache<(RepoName, String), Instant>,
    fills: Arc<Mutex<HashMap<Digest, watch::Receiver<FillState>>>>,
    lru: Arc<Mutex<Lru>>,
    stats: Arc<CacheStats>,
    /// With other nodes on the same stores: the locks that make one of them fetch a blob
    /// while the others wait for it to land.
    cluster: Option<Arc<dyn ClusterLocks>>,
}

/// In a cluster, a fill's upload session idle this long was left by a node that died: no
/// live fetch pauses that long (its transfer would have timed out).
pub const ABANDONED_FILL: Duration = Duration::from_secs(3600);

fn unavailable(upstream: &Upstream, why: impl std::fmt::Display) -> OciError {
    tracing::warn!(upstream = upstream.name(), "{why}");
    OciError::new(ErrorCode::Unavailable, format!("upstream {} is not available", upstream.name()))
        .with_header("retry-after", "10")
}

/// Whose credentials a request to the upstream carries.
#[derive(Debug, Clone, Default)]
pub enum UpstreamAuth {
    /// The upstream's configured credentials.
    #[default]
    Configured,
    /// The client's own `Authorization` (or none): the upstream decides for each client,
    /// also before anything cached is served to it.
    Client(Option<HeaderValue>),
}

impl UpstreamAuth {
    fn passthrough(&self) -> bool {
        matches!(self, UpstreamAuth::Client(_))
    }
}

/// Sends `method path` to `upstream` with the credentials `auth` says.
/// One request to the upstream, its latency counted in `stats`.
async fn send(
    upstream: &Upstream,
    stats: &CacheStats,
    auth: &UpstreamAuth,
    method: Method,
    name: &RepoName,
    path: &str,
    headers: HeaderMap,
) -> Result<reqwest::Response, UpstreamError> {
    let started = Instant::now();
    let answer = match auth {
        UpstreamAuth::Configured => upstream.send(method, name, path, headers).await,
        UpstreamAuth::Client(authorization) => {
            upstream.send_as_client(method, path, headers, authorization.as_ref()).await
        }
    };
    if answer.is_ok() {
        stats.upstream_latency.observe(path, started.elapsed());
    }
    answer
}

impl PullThrough {
    /// A cache over `meta` and `blobs`, which belong to this upstream alone: eviction
    /// deletes bytes from `blobs`. Blobs already held are ranked by when they were stored.
    /// At start-up (`sweep`), upload sessions left by fetches a crash cut short are removed;
    /// not on a reload, where fetches of the previous table may still be writing them. In a
    /// `cluster`, other nodes' fetches may be writing theirs: only sessions idle for
    /// [`ABANDONED_FILL`] go.
    pub async fn open(
        upstream: Arc<Upstream>,
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn BlobStore>,
        sweep: bool,
        cluster: Option<Arc<dyn ClusterLocks>>,
    ) -> Result<Self, StoreError> {
        if sweep {
            let idle_for = if cluster.is_some() { ABANDONED_FILL } else { Duration::ZERO };
            let now = SystemTime::now();
            for (id, modified) in blobs.upload_list().await? {
                if now.duration_since(modified).unwrap_or_default() >= idle_for {
                    blobs.upload_delete(&id).await?;
                }
            }
        }
        let mut held = blobs.list().await?;
        held.sort_by_key(|b| b.stored);
        let mut lru = Lru::default();
        for b in &held {
            lru.touch(&b.digest, b.size);
        }
        let cache = PullThrough {
            upstream,
            meta,
            blobs,
            checked: quick_cache::sync::Cache::new(CHECKS_REMEMBERED),
            missing: quick_cache::sync::Cache::new(MISSING_REMEMBERED),
            fills: Arc::new(Mutex::new(HashMap::new())),
            lru: Arc::new(Mutex::new(lru)),
            stats: Arc::new(CacheStats::default()),
            cluster,
        };
        if let Some(newest) = held.last() {
            evict(&cache.upstream, &cache.lru, &cache.blobs, &cache.stats, &newest.digest).await;
        }
        Ok(cache)
    }

    /// What this cache holds, by the upstream's names.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes of blobs the cache holds, and its bound (`max_bytes`; 0: none).
    pub fn held_bytes(&self) -> (u64, u64) {
        let held = self.lru.lock().unwrap_or_else(|p| p.into_inner()).total;
        (held, self.upstream.cache_settings().max_bytes)
    }
    /// A manifest, from the cache or the upstream (see the module docs for the rules).
    pub async fn manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        auth: &UpstreamAuth,
    ) -> Result<Fetched, OciError> {
        let not_found = || OciError::new(ErrorCode::ManifestUnknown, "manifest unknown");
        let store_err = |e| store_failure("cache metadata", e);
        // With passthrough, the HEAD that authorises this client also says what the tag
        // points at now: it stands in for the revalidation, whatever the tag TTL.
        let mut authorised = None;
        if auth.passthrough() {
            let path = format!("/v2/{name}/manifests/{reference}");
            match self.ask(Method::HEAD, name, &path, manifest_accept(), auth).await {
                Answer::Ok(r) => authorised = Some(r),
                refused => self.admit(refused, not_found)?,
            }
        }
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.meta.get_manifest(name, d).await.map_err(store_err)? {
                    count(&self.stats.manifest_hits, 1);
                    return Ok(Fetched { manifest: m, stale: false });
                }
                if self.recently_missing(name, &d.to_string()) {
                    return Err(not_found());
                }
                let m = self.fetch_manifest(name, &d.to_string(), Some(d), auth).await?.ok_or_else(not_found)?;
                if let Err(e) = self.meta.put_manifest(name, &m, None).await {
                    self.not_kept(name, &d.to_string(), e);
                }
                Ok(Fetched { manifest: m, stale: false })
            }
            Reference::Tag(t) => self.manifest_by_tag(name, t, authorised, auth).await,
        }
    }

    /// A verified manifest the cache could not store (a full disk, say) is served all the
    /// same: only the caching failed, and the next pull asks the upstream again.
    fn not_kept(&self, name: &RepoName, reference: &str, e: tessera_store::StoreError) {
        tracing::warn!(upstream = self.upstream.name(), %name, reference, "serving a manifest the cache cannot keep ({e})");
    }

    /// GETs a manifest and verifies it against `expected` (or computes its digest).
    async fn fetch_manifest(
        &self,
        name: &RepoName,
        reference: &str,
        expected: Option<&Digest>,
        auth: &UpstreamAuth,
    ) -> Result<Option<ManifestRecord>, OciError> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let response = match self.ask(Method::GET, name, &path, manifest_accept(), auth).await {
            Answer::Ok(r) => r,
            Answer::NotFound => {
                self.remember_missing(name, reference);
                return Ok(None);
            }
            Answer::Failing(e) | Answer::Refused(e) => return Err(e),
        };
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = read_limited(response, 4 * 1024 * 1024).await.map_err(|e| unavailable(&self.upstream, e))?;
        let digest = match expected {
            Some(d) => {
                let actual = Digest::of(d.algorithm(), &bytes);
                if &actual != d {
                    tracing::error!(upstream = self.upstream.name(), %name, expected = %d, %actual, "upstream manifest does not match its digest; not cached");
                    count(&self.stats.digest_mismatches, 1);
                    return Err(unavailable(&self.upstream, "upstream sent a manifest that does not match its digest"));
                }
                actual
            }
            None => Digest::sha256_of(&bytes),
        };
        count(&self.stats.manifests_fetched, 1);
        let parsed = ParsedManifest::parse(content_type.as_deref(), &bytes)
            .map_err(|e| unavailable(&self.upstream, format!("upstream manifest unusable: {}", e.message)))?;
        Ok(Some(ManifestRecord::new(digest, bytes, &parsed)))
    }

    /// Size of a blob, from the cache or a HEAD upstream.
    pub async fn blob_size(&self, name: &RepoName, digest: &Digest, auth: &UpstreamAuth) -> Result<u64, OciError> {
        if !auth.passthrough()
            && let Some(size) =
                self.meta.blob_link(name, digest).await.map_err(|e| store_failure("cache metadata", e))?
        {
            return Ok(size);
        }
        let unknown = || OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry");
        match self.ask(Method::HEAD, name, &format!("/v2/{name}/blobs/{digest}"), HeaderMap::new(), auth).await {
            Answer::Ok(r) => r
                .content_length()
                .filter(|l| *l > 0)
                .or_else(|| {
                    r.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
                })
                .ok_or_else(|| unavailable(&self.upstream, "blob HEAD without a length")),
            Answer::NotFound => Err(unknown()),
            Answer::Failing(e) | Answer::Refused(e) => Err(e),
        }
    }
}

impl PullThrough {
    /// The upstream's referrers of `subject`, filtered by `artifact_type` here if the
    /// upstream did not. An upstream without the referrers API has none to report.
    pub async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        auth: &UpstreamAuth,
    ) -> Result<tessera_registry::Referrers, OciError> {
        let mut path = format!("/v2/{name}/referrers/{subject}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.extend(form_urlencoded::byte_serialize(t.as_bytes()));
        }
        let response = match self.ask(Method::GET, name, &path, HeaderMap::new(), auth).await {
            Answer::Ok(r) => r,
            Answer::NotFound => return Ok(tessera_registry::Referrers::empty(artifact_type.is_some())),
            Answer::Refused(e) => return Err(e),
            Answer::Failing(e) if self.upstream.cache_settings().serve_stale && !auth.passthrough() => {
                // The referrer manifests already pulled through this cache, as a fallback.
                let cached = self.meta.referrers(name, subject).await.map_err(|cause| {
                    tracing::error!(upstream = self.upstream.name(), "cache referrers: {cause}");
                    e.clone()
                })?;
                tracing::warn!(upstream = self.upstream.name(), %name, %subject, "serving cached referrers: {}", e.message);
                count(&self.stats.stale_served, 1);
                let manifests = cached
                    .iter()
                    .filter(|m| artifact_type.is_none() || m.artifact_type.as_deref() == artifact_type)
                    .map(tessera_registry::referrer_descriptor)
                    .collect();
                return Ok(tessera_registry::Referrers::of(manifests, artifact_type.is_some()));
            }
            Answer::Failing(e) => return Err(e),
        };
        let upstream_filtered = response.headers().contains_key("oci-filters-applied");
        let body = read_limited(response, 4 * 1024 * 1024).await.map_err(|e| unavailable(&self.upstream, e))?;
        let index: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| unavailable(&self.upstream, format!("referrers answer: {e}")))?;
        let manifests: Vec<serde_json::Value> = index["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| upstream_filtered || artifact_type.is_none_or(|t| m["artifactType"].as_str() == Some(t)))
            .collect();
        Ok(tessera_registry::Referrers::of(manifests, artifact_type.is_some()))
    }
}

impl PullThrough {
    /// The upstream's simple signatures of the manifest `digest`, from its signature
    /// extension API and its lookaside server (when configured), kept with the cache's
    /// metadata as they arrive; the kept ones when the upstream cannot be asked (or has
    /// neither). A signature that could not be a signature of `digest` is not kept;
    /// clients and `[[signatures]]` rules verify the rest.
    pub async fn signatures(
        &self,
        name: &RepoName,
        digest: &Digest,
        auth: &UpstreamAuth,
    ) -> Result<Vec<(String, Bytes)>, OciError> {
        let kept =
            || async { self.meta.signatures(name, digest).await.map_err(|e| store_failure("cache signatures", e)) };
        let path = format!("/extensions/v2/{name}/signatures/{digest}");
        let mut arrived = Vec::new();
        match self.ask(Method::GET, name, &path, HeaderMap::new(), auth).await {
            Answer::Ok(response) => {
                let body = read_limited(response, 4 * 1024 * 1024).await.map_err(|e| unavailable(&self.upstream, e))?;
                let list: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| unavailable(&self.upstream, format!("signatures: {e}")))?;
                let engine = base64::engine::general_purpose::STANDARD;
                for s in list["signatures"].as_array().into_iter().flatten() {
                    let atomic = s["schemaVersion"] == 2 && (s["type"].is_null() || s["type"] == "atomic");
                    let (Some(signature_name), Some(content)) = (s["name"].as_str(), s["content"].as_str()) else {
                        continue;
                    };
                    if let (true, Ok(content)) = (atomic, base64::Engine::decode(&engine, content)) {
                        arrived.push((signature_name.to_string(), content));
                    }
                }
            }
            Answer::NotFound => {}
            Answer::Failing(_) if !auth.passthrough() => {}
            Answer::Failing(e) | Answer::Refused(e) => return Err(e),
        }
        arrived.extend(self.lookaside_signatures(name, digest).await);
        let already = kept().await?;
        let mut room = tessera_registry::signatures::SIGNATURES_PER_MANIFEST.saturating_sub(already.len());
        for (signature_name, content) in arrived {
            if tessera_registry::signatures::check(digest, &signature_name, &content).is_err()
                || already.iter().any(|(_, c)| c.as_ref() == content.as_slice())
            {
                continue;
            }
            // An upstream cannot grow what is kept past what a push may store.
            if room == 0 {
                tracing::warn!(upstream = self.upstream.name(), %name, %digest, "more signatures than are kept; the rest skipped");
                break;
            }
            room -= 1;
            if let Err(e) = self.meta.add_signature(name, digest, &signature_name, &content).await {
                tracing::warn!(upstream = self.upstream.name(), %name, %digest, "cannot keep a signature: {e}");
            }
        }
        kept().await
    }

    /// The signatures of `digest` on the upstream's lookaside server, read as c/image does
    /// (`signature-1`, `-2`, ... until one is missing), each named by its content. None when
    /// no lookaside is configured or it cannot be read (the kept ones are served then).
    async fn lookaside_signatures(&self, name: &RepoName, digest: &Digest) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        for n in 1..=tessera_registry::signatures::SIGNATURES_PER_MANIFEST {
            let Some(url) = self.upstream.lookaside_url(name, digest, n) else { break };
            let response = match self.upstream.get_url(&url).await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => break,
                Ok(r) => {
                    tracing::warn!(upstream = self.upstream.name(), url, status = %r.status(), "lookaside signature not read");
                    break;
                }
                Err(e) => {
                    tracing::warn!(upstream = self.upstream.name(), url, "lookaside signature not read: {e}");
                    break;
                }
            };
            match read_limited(response, tessera_registry::signatures::SIGNATURE_MAX_BYTES).await {
                Ok(content) => found.push((tessera_client::layout::signature_name(digest, &content), content.to_vec())),
                Err(e) => {
                    tracing::warn!(upstream = self.upstream.name(), url, "lookaside signature not read: {e}");
                    break;
                }
            }
        }
        found
    }
}

impl PullThrough {
    /// Drops the cached manifest `digest` of `name` and the tags pointing at it (a manifest
    /// a requiring route refused is not kept).
    pub async fn forget(&self, name: &RepoName, digest: &Digest) {
        match self.meta.delete_manifest(name, digest).await {
            Ok(Some(tags)) => {
                for tag in tags {
                    self.checked.remove(&(name.clone(), tag));
                }
                tracing::info!(upstream = self.upstream.name(), %name, %digest, "dropped a refused manifest from the cache");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(upstream = self.upstream.name(), %name, %digest, "cannot drop a refused manifest: {e}")
            }
        }
    }
}

/// Reads a response body of at most `limit` bytes.
/// The whole body of `response`, refused once it grows past `limit` bytes.
pub async fn read_limited(response: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if out.len() + chunk.len() > limit {
            return Err(format!("upstream answer larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}
