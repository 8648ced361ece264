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

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tessera_registry::BlobAnswer;
use tessera_spec::{
    Digest, Digester, ErrorCode, OciError, Paging, ParsedManifest, RangeRequest, Reference, RepoName, Tag,
};
use tessera_store::{AppendError, BlobRead, BlobStore, ByteStream, ManifestRecord, MetaStore, Page, UploadId};
use tokio::sync::watch;

use crate::upstream::{Upstream, UpstreamError, manifest_accept};

/// A manifest answered through the cache.
pub struct Fetched {
    pub manifest: ManifestRecord,
    /// Served from the cache because the upstream could not be asked.
    pub stale: bool,
}

#[derive(Clone, Debug)]
struct FillState {
    upload: UploadId,
    size: Option<u64>,
    /// Every byte is in the session and matches the digest: readers may send the last byte.
    verified: bool,
    /// `Some(Ok)` once committed, `Some(Err)` once failed.
    done: Option<Result<(), String>>,
}

/// Readers of a fill are woken about this often (in bytes received), not per chunk.
const WAKE_EVERY: u64 = 1024 * 1024;

/// Counters of one upstream's cache, exported at `/metrics`.
#[derive(Default)]
pub struct CacheStats {
    pub manifests_fetched: AtomicU64,
    pub blobs_fetched: AtomicU64,
    pub blob_bytes_fetched: AtomicU64,
    pub stale_served: AtomicU64,
    pub digest_mismatches: AtomicU64,
    pub fetch_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub rate_limited: AtomicU64,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Which cached blobs were used least recently, and how many bytes they hold.
#[derive(Default)]
struct Lru {
    by_digest: HashMap<Digest, (u64, u64)>,
    by_use: std::collections::BTreeMap<u64, Digest>,
    clock: u64,
    total: u64,
}

impl Lru {
    fn touch(&mut self, digest: &Digest, size: u64) {
        self.clock += 1;
        if let Some((old_size, tick)) = self.by_digest.insert(digest.clone(), (size, self.clock)) {
            self.by_use.remove(&tick);
            self.total -= old_size;
        }
        self.by_use.insert(self.clock, digest.clone());
        self.total += size;
    }

    /// Takes least recently used blobs out until at most `max` bytes remain, sparing `keep`.
    fn evict(&mut self, max: u64, keep: &Digest) -> Vec<Digest> {
        let mut victims = Vec::new();
        let mut spared = None;
        while self.total > max {
            let Some((tick, digest)) = self.by_use.pop_first() else { break };
            if &digest == keep {
                spared = Some((tick, digest));
                continue;
            }
            if let Some((size, _)) = self.by_digest.remove(&digest) {
                self.total -= size;
            }
            victims.push(digest);
        }
        if let Some((tick, digest)) = spared {
            self.by_use.insert(tick, digest);
        }
        victims
    }
}

pub struct PullThrough {
    upstream: Arc<Upstream>,
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    /// When each cached tag was last confirmed by the upstream (also persisted in `meta`,
    /// so a restart keeps the bound on how stale an answer may be).
    checked: Mutex<HashMap<(RepoName, Tag), SystemTime>>,
    /// Recent "not found" answers.
    missing: Mutex<HashMap<(RepoName, String), Instant>>,
    fills: Arc<Mutex<HashMap<Digest, watch::Receiver<FillState>>>>,
    lru: Arc<Mutex<Lru>>,
    stats: Arc<CacheStats>,
}

fn unavailable(upstream: &Upstream, why: impl std::fmt::Display) -> OciError {
    tracing::warn!(upstream = upstream.name(), "{why}");
    OciError::new(ErrorCode::Unavailable, format!("upstream {} is not available", upstream.name()))
        .with_header("retry-after", "10")
}

/// The status of an upstream answer, sorted by what the cache does with it.
enum Answer {
    Ok(reqwest::Response),
    NotFound,
    /// Unreachable, 5xx or 429: serve stale if we can.
    Failing(OciError),
    /// The upstream refused the client's own credentials (passthrough): its challenge or
    /// refusal goes back to the client, and nothing cached is served instead.
    Refused(OciError),
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
async fn send(
    upstream: &Upstream,
    auth: &UpstreamAuth,
    method: Method,
    name: &RepoName,
    path: &str,
    headers: HeaderMap,
) -> Result<reqwest::Response, UpstreamError> {
    match auth {
        UpstreamAuth::Configured => upstream.send(method, name, path, headers).await,
        UpstreamAuth::Client(authorization) => {
            upstream.send_as_client(method, path, headers, authorization.as_ref()).await
        }
    }
}

impl PullThrough {
    /// A cache over `meta` and `blobs`, which belong to this upstream alone: eviction
    /// deletes bytes from `blobs`. Blobs already held are ranked by when they were stored.
    /// At start-up (`sweep`), upload sessions left by fetches a crash cut short are removed;
    /// not on a reload, where fetches of the previous table may still be writing them.
    pub async fn open(
        upstream: Arc<Upstream>,
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn BlobStore>,
        sweep: bool,
    ) -> io::Result<Self> {
        if sweep {
            for (id, _) in blobs.upload_list().await? {
                blobs.upload_delete(&id).await?;
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
            checked: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            fills: Arc::new(Mutex::new(HashMap::new())),
            lru: Arc::new(Mutex::new(lru)),
            stats: Arc::new(CacheStats::default()),
        };
        if let Some(newest) = held.last() {
            evict(&cache.upstream, &cache.lru, &cache.blobs, &cache.stats, &newest.digest).await;
        }
        Ok(cache)
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    async fn ask(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        headers: HeaderMap,
        auth: &UpstreamAuth,
    ) -> Answer {
        match send(&self.upstream, auth, method, name, path, headers).await {
            Err(e @ (UpstreamError::Unreachable(_) | UpstreamError::Auth(_))) => {
                Answer::Failing(unavailable(&self.upstream, tessera_client::error::chain(&e)))
            }
            Err(UpstreamError::RateLimited(wait)) => {
                count(&self.stats.rate_limited, 1);
                Answer::Failing(
                    OciError::new(ErrorCode::TooManyRequests, "upstream rate limit")
                        .with_header("retry-after", wait.as_secs().max(1).to_string()),
                )
            }
            Ok(r) if r.status().is_success() => Answer::Ok(r),
            Ok(r) if r.status() == StatusCode::NOT_FOUND => Answer::NotFound,
            Ok(r) if auth.passthrough() && r.status() == StatusCode::UNAUTHORIZED => {
                let mut e = OciError::new(ErrorCode::Unauthorized, "the upstream asks for credentials");
                if let Some(challenge) = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()) {
                    e = e.with_header("www-authenticate", challenge);
                }
                Answer::Refused(e)
            }
            Ok(r) if auth.passthrough() && r.status() == StatusCode::FORBIDDEN => {
                Answer::Refused(OciError::new(ErrorCode::Denied, "the upstream refused these credentials"))
            }
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).unwrap_or("60").to_string();
                tracing::warn!(upstream = self.upstream.name(), "rate limited; retry after {retry}");
                count(&self.stats.rate_limited, 1);
                Answer::Failing(
                    OciError::new(ErrorCode::TooManyRequests, "upstream rate limit").with_header("retry-after", retry),
                )
            }
            Ok(r) => Answer::Failing(unavailable(&self.upstream, format!("{path} answered {}", r.status()))),
        }
    }

    fn recently_missing(&self, name: &RepoName, reference: &str) -> bool {
        let ttl = Duration::from_secs(self.upstream.cache_settings().negative_ttl_secs);
        let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        let key = (name.clone(), reference.to_string());
        match missing.get(&key) {
            Some(at) if at.elapsed() < ttl => true,
            Some(_) => {
                missing.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, name: &RepoName, reference: &str) {
        self.missing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((name.clone(), reference.to_string()), Instant::now());
    }

    /// A manifest, from the cache or the upstream (see the module docs for the rules).
    pub async fn manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        auth: &UpstreamAuth,
    ) -> Result<Fetched, OciError> {
        let not_found = || OciError::new(ErrorCode::ManifestUnknown, "manifest unknown");
        let store_err = |e: io::Error| {
            tracing::error!("cache metadata: {e}");
            OciError::internal()
        };
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
                    return Ok(Fetched { manifest: m, stale: false });
                }
                if self.recently_missing(name, &d.to_string()) {
                    return Err(not_found());
                }
                let m = self.fetch_manifest(name, &d.to_string(), Some(d), auth).await?.ok_or_else(not_found)?;
                self.meta.put_manifest(name, &m, None).await.map_err(store_err)?;
                Ok(Fetched { manifest: m, stale: false })
            }
            Reference::Tag(t) => {
                let cached = match self.meta.resolve_tag(name, t).await.map_err(store_err)? {
                    Some(d) => self.meta.get_manifest(name, &d).await.map_err(store_err)?,
                    None => None,
                };
                let key = (name.clone(), t.clone());
                let remembered = self.checked.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
                let checked = match remembered {
                    Some(at) => Some(at),
                    None if cached.is_some() => self.meta.tag_checked(name, t).await.map_err(store_err)?,
                    None => None,
                };
                let age = |at: SystemTime| SystemTime::now().duration_since(at).unwrap_or_default();
                let settings = self.upstream.cache_settings();
                if let (Some(m), Some(at), None) = (&cached, checked, &authorised)
                    && age(at) < Duration::from_secs(settings.tag_ttl_secs)
                {
                    return Ok(Fetched { manifest: m.clone(), stale: false });
                }
                if cached.is_none() && authorised.is_none() && self.recently_missing(name, t.as_str()) {
                    return Err(not_found());
                }
                let path = format!("/v2/{name}/manifests/{t}");
                let answer = match authorised {
                    Some(r) => Answer::Ok(r),
                    None => self.ask(Method::HEAD, name, &path, manifest_accept(), auth).await,
                };
                let fresh = match answer {
                    Answer::Ok(r) => {
                        let upstream_digest = r
                            .headers()
                            .get("docker-content-digest")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<Digest>().ok());
                        match (&cached, upstream_digest) {
                            (Some(m), Some(d)) if m.digest == d => Ok(m.clone()),
                            (_, Some(d)) => match self.meta.get_manifest(name, &d).await.map_err(store_err)? {
                                Some(m) => Ok(m),
                                None => self
                                    .fetch_manifest(name, &d.to_string(), Some(&d), auth)
                                    .await?
                                    .ok_or_else(not_found),
                            },
                            (_, None) => self.fetch_manifest(name, t.as_str(), None, auth).await?.ok_or_else(not_found),
                        }
                    }
                    Answer::NotFound => {
                        self.remember_missing(name, t.as_str());
                        if cached.is_some() {
                            let _ = self.meta.delete_tag(name, t).await;
                        }
                        Err(not_found())
                    }
                    Answer::Refused(e) => Err(e),
                    Answer::Failing(e) if auth.passthrough() => Err(e),
                    Answer::Failing(e) => {
                        let age_ok = checked.is_some_and(|at| age(at) < Duration::from_secs(settings.max_stale_secs));
                        match cached {
                            Some(m) if settings.serve_stale && age_ok => {
                                tracing::warn!(upstream = self.upstream.name(), %name, tag = %t, "serving a stale manifest: {}", e.message);
                                count(&self.stats.stale_served, 1);
                                return Ok(Fetched { manifest: m, stale: true });
                            }
                            _ => Err(e),
                        }
                    }
                };
                let m = fresh?;
                self.meta.put_manifest(name, &m, Some(t)).await.map_err(store_err)?;
                let now = SystemTime::now();
                self.meta.set_tag_checked(name, t, now).await.map_err(store_err)?;
                self.checked.lock().unwrap_or_else(|p| p.into_inner()).insert(key, now);
                Ok(Fetched { manifest: m, stale: false })
            }
        }
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
            && let Some(size) = self.meta.blob_link(name, digest).await.map_err(|_| OciError::internal())?
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

    /// Passes when the upstream answers a `HEAD` with success for this client; otherwise
    /// the refusal, a not-found, or the failure (never a cached copy instead).
    fn admit(&self, answer: Answer, not_found: impl Fn() -> OciError) -> Result<(), OciError> {
        match answer {
            Answer::Ok(_) => Ok(()),
            Answer::NotFound => Err(not_found()),
            Answer::Failing(e) | Answer::Refused(e) => Err(e),
        }
    }

    /// A blob, from the cache or streamed from a (shared) upstream fetch.
    pub async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        auth: &UpstreamAuth,
    ) -> Result<BlobAnswer, OciError> {
        let internal = |e: io::Error| {
            tracing::error!("cache: {e}");
            OciError::internal()
        };
        if auth.passthrough() {
            let path = format!("/v2/{name}/blobs/{digest}");
            let answer = self.ask(Method::HEAD, name, &path, HeaderMap::new(), auth).await;
            self.admit(answer, || OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))?;
        }
        // A link says the upstream has it; the bytes may have been evicted since.
        if let Some(size) = self.meta.blob_link(name, digest).await.map_err(internal)?
            && let Some(answer) = self.stored(digest, size, range).await?
        {
            return Ok(answer);
        }
        if self.recently_missing(name, &digest.to_string()) {
            return Err(OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"));
        }
        // Bytes are content-addressed and were verified when stored: one copy serves every
        // repository that turns out to need it.
        if let Some(size) = self.blobs.stat(digest).await.map_err(internal)?
            && let Some(answer) = self.stored(digest, size, range).await?
        {
            self.meta.link_blob(name, digest, size).await.map_err(internal)?;
            return Ok(answer);
        }
        let mut rx = self.join_fill(name, digest, auth).await?;
        // Wait until the size is known (the upstream answered) or the fill ended.
        let state = loop {
            let s = rx.borrow_and_update().clone();
            if s.size.is_some() || s.done.is_some() {
                break s;
            }
            if rx.changed().await.is_err() {
                return Err(unavailable(&self.upstream, "blob fetch ended unexpectedly"));
            }
        };
        match (&state.done, state.size) {
            (Some(Err(e)), _) if e == "not found" => {
                Err(OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))
            }
            (Some(Err(e)), _) => Err(unavailable(&self.upstream, e)),
            (Some(Ok(())), _) => {
                let size = self.blobs.stat(digest).await.map_err(internal)?.ok_or_else(OciError::internal)?;
                self.stored(digest, size, range).await?.ok_or_else(OciError::internal)
            }
            (None, Some(size)) => {
                let range = RangeRequest::resolve_opt(range, size)?;
                let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
                let len = if size == 0 { 0 } else { end - start + 1 };
                let mut body = follow(self.blobs.clone(), digest.clone(), rx, start, start + len, size);
                // A fetch that fails before this answer's first byte gets a status: the server
                // buffers the head until the body's first poll, so an error there would reach
                // the client as a connection closed before any answer.
                let body: ByteStream<'static> = match body.next().await {
                    Some(Err(e)) => return Err(unavailable(&self.upstream, e)),
                    Some(Ok(first)) => Box::pin(futures_util::stream::once(async move { Ok(first) }).chain(body)),
                    None => body,
                };
                Ok(BlobAnswer { size, range, read: BlobRead { len, body } })
            }
            (None, None) => Err(OciError::internal()),
        }
    }

    /// The cached bytes, if still held (and marks them used).
    async fn stored(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<&RangeRequest>,
    ) -> Result<Option<BlobAnswer>, OciError> {
        let range = RangeRequest::resolve_opt(range, size)?;
        let Some(read) =
            self.blobs.read(digest, range.map(|r| (r.start, r.end))).await.map_err(|_| OciError::internal())?
        else {
            return Ok(None);
        };
        self.lru.lock().unwrap_or_else(|p| p.into_inner()).touch(digest, size);
        Ok(Some(BlobAnswer { size, range, read }))
    }

    /// Joins the fetch of `digest` in progress, or starts one.
    async fn join_fill(
        &self,
        name: &RepoName,
        digest: &Digest,
        auth: &UpstreamAuth,
    ) -> Result<watch::Receiver<FillState>, OciError> {
        let upload = UploadId::random();
        let tx = {
            let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rx) = fills.get(digest) {
                return Ok(rx.clone());
            }
            let (tx, rx) =
                watch::channel(FillState { upload: upload.clone(), size: None, verified: false, done: None });
            fills.insert(digest.clone(), rx);
            tx
        };
        let fill = Fill {
            upstream: self.upstream.clone(),
            meta: self.meta.clone(),
            blobs: self.blobs.clone(),
            fills: self.fills.clone(),
            lru: self.lru.clone(),
            stats: self.stats.clone(),
            name: name.clone(),
            digest: digest.clone(),
            upload,
            auth: auth.clone(),
        };
        let rx = tx.subscribe();
        // Detached: a client that goes away does not stop the fetch others wait on.
        tokio::spawn(fill.run(tx));
        Ok(rx)
    }

    /// A page of a repository's tags from the upstream (its paging passed on: more pages
    /// when it links to one); the cached tags when it cannot answer.
    pub async fn tags(&self, name: &RepoName, paging: &Paging, auth: &UpstreamAuth) -> Result<Page, OciError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let path = format!("/v2/{name}/tags/list{}", crate::source::paging_query(paging));
        match self.ask(Method::GET, name, &path, HeaderMap::new(), auth).await {
            Answer::Ok(r) => {
                let more = r.headers().contains_key("link");
                let body = read_limited(r, 16 * 1024 * 1024).await.map_err(|e| unavailable(&self.upstream, e))?;
                let list: TagList = serde_json::from_slice(&body)
                    .map_err(|e| unavailable(&self.upstream, format!("tags list: {e}")))?;
                Ok(Page { items: list.tags.unwrap_or_default(), more })
            }
            Answer::NotFound => Err(OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")),
            Answer::Refused(e) => Err(e),
            Answer::Failing(e) if auth.passthrough() => Err(e),
            Answer::Failing(e) => {
                let page = self
                    .meta
                    .list_tags(name, None, tessera_registry::MAX_PAGE)
                    .await
                    .map_err(|_| OciError::internal())?;
                match page {
                    Some(p) if self.upstream.cache_settings().serve_stale => Ok(Page { items: p.items, more: false }),
                    _ => Err(e),
                }
            }
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
                let cached = self.meta.referrers(name, subject).await.map_err(|_| e.clone())?;
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

/// Deletes least recently used blobs until the cache fits its bound (`keep` excepted: it is
/// being served right now). Links stay: they record what the upstream has, and a blob whose
/// bytes were evicted is fetched again when next asked for.
async fn evict(upstream: &Upstream, lru: &Mutex<Lru>, blobs: &Arc<dyn BlobStore>, stats: &CacheStats, keep: &Digest) {
    let max = upstream.cache_settings().max_bytes;
    if max == 0 {
        return;
    }
    let victims = lru.lock().unwrap_or_else(|p| p.into_inner()).evict(max, keep);
    for digest in victims {
        match blobs.delete(&digest).await {
            Ok(_) => {
                count(&stats.evictions, 1);
                tracing::info!(upstream = upstream.name(), %digest, "evicted from the cache")
            }
            Err(e) => tracing::warn!(upstream = upstream.name(), %digest, "cannot evict: {e}"),
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

/// How many times one blob transfer is resumed with `Range` after breaking.
const MAX_RESUMES: u32 = 3;

/// One upstream blob fetch.
struct Fill {
    upstream: Arc<Upstream>,
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    fills: Arc<Mutex<HashMap<Digest, watch::Receiver<FillState>>>>,
    lru: Arc<Mutex<Lru>>,
    stats: Arc<CacheStats>,
    name: RepoName,
    digest: Digest,
    upload: UploadId,
    /// The credentials of the request that started the fetch.
    auth: UpstreamAuth,
}

impl Fill {
    async fn run(self, tx: watch::Sender<FillState>) {
        let result = self.fetch(&tx).await;
        if let Err(e) = &result {
            if e != "not found" {
                tracing::error!(upstream = self.upstream.name(), name = %self.name, digest = %self.digest, "blob fetch failed: {e}");
                count(&self.stats.fetch_failures, 1);
            }
            let _ = self.blobs.upload_delete(&self.upload).await;
        }
        self.fills.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.digest);
        tx.send_modify(|s| s.done = Some(result));
    }

    async fn fetch(&self, tx: &watch::Sender<FillState>) -> Result<(), String> {
        // A fetch that finished between this request's look at the cache and its start of a
        // new one left the blob here already.
        if let Some(size) = self.blobs.stat(&self.digest).await.map_err(|e| e.to_string())? {
            self.meta.link_blob(&self.name, &self.digest, size).await.map_err(|e| e.to_string())?;
            tx.send_modify(|s| s.verified = true);
            return Ok(());
        }
        self.blobs.upload_create(&self.upload).await.map_err(|e| e.to_string())?;
        let path = format!("/v2/{}/blobs/{}", self.name, self.digest);
        let mut digester = Digester::new(self.digest.algorithm());
        let mut received = 0u64;
        let mut expected_size = None;
        let mut resumes = 0;
        let size = loop {
            // After a broken transfer, ask only for the rest.
            let mut headers = HeaderMap::new();
            if received > 0
                && let Ok(v) = HeaderValue::from_str(&format!("bytes={received}-"))
            {
                headers.insert(reqwest::header::RANGE, v);
            }
            let response = send(&self.upstream, &self.auth, Method::GET, &self.name, &path, headers)
                .await
                .map_err(|e| e.to_string())?;
            match response.status() {
                StatusCode::OK if received == 0 => {
                    expected_size = response.content_length();
                    if expected_size.is_some() {
                        tx.send_modify(|s| s.size = expected_size);
                    }
                }
                StatusCode::PARTIAL_CONTENT if received > 0 => {
                    let starts_here = response
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&format!("bytes {received}-")));
                    if !starts_here {
                        return Err("upstream answered the resumption with another range".into());
                    }
                }
                StatusCode::NOT_FOUND => return Err("not found".into()),
                s if received > 0 => return Err(format!("upstream cannot resume the transfer ({s})")),
                s => return Err(format!("upstream answered {s}")),
            }
            let tx_progress = tx.clone();
            let counted = &mut received;
            let hasher = &mut digester;
            let mut unannounced = 0u64;
            let stream: ByteStream = Box::pin(response.bytes_stream().map(move |chunk| {
                let chunk = chunk.map_err(io::Error::other)?;
                hasher.update(&chunk);
                *counted += chunk.len() as u64;
                unannounced += chunk.len() as u64;
                if unannounced >= WAKE_EVERY {
                    // Wake readers: about a buffer's worth more is on its way to the file.
                    unannounced = 0;
                    tx_progress.send_modify(|_| {});
                }
                Ok(chunk)
            }));
            // Not durable yet: the commit makes it so, and readers need not wait for that.
            match self.blobs.upload_append(&self.upload, stream, false).await {
                Ok(size) => break size,
                Err(AppendError::Source(e)) if resumes < MAX_RESUMES => {
                    // What arrived is on disk (the store keeps a failed stream's bytes); the
                    // hash covers exactly that, so the transfer can continue where it broke.
                    let on_disk = self.blobs.upload_size(&self.upload).await.map_err(|e| e.to_string())?;
                    if on_disk != Some(received) {
                        return Err(format!("transfer broke ({e}) and cannot be resumed"));
                    }
                    resumes += 1;
                    tracing::warn!(upstream = self.upstream.name(), digest = %self.digest, "transfer broke at {received} bytes ({e}); resuming");
                }
                Err(e) => return Err(format!("{e:?}")),
            }
        };
        let actual = digester.finish();
        if actual != self.digest {
            count(&self.stats.digest_mismatches, 1);
            return Err(format!("upstream blob does not match its digest (got {actual}); not cached"));
        }
        if expected_size.is_some_and(|e| e != size) {
            return Err(format!("upstream blob has {size} bytes, it announced {expected_size:?}"));
        }
        tx.send_modify(|s| s.verified = true);
        self.blobs.upload_commit(&self.upload, &self.digest).await.map_err(|e| e.to_string())?;
        self.meta.link_blob(&self.name, &self.digest, size).await.map_err(|e| e.to_string())?;
        self.lru.lock().unwrap_or_else(|p| p.into_inner()).touch(&self.digest, size);
        evict(&self.upstream, &self.lru, &self.blobs, &self.stats, &self.digest).await;
        count(&self.stats.blobs_fetched, 1);
        count(&self.stats.blob_bytes_fetched, size);
        Ok(())
    }
}

/// Streams `[start, end)` of a blob being fetched: from the fill's session file while it
/// grows, then from the committed blob. The final byte waits for the digest to verify.
fn follow(
    blobs: Arc<dyn BlobStore>,
    digest: Digest,
    rx: watch::Receiver<FillState>,
    start: u64,
    end: u64,
    size: u64,
) -> ByteStream<'static> {
    struct Cursor {
        blobs: Arc<dyn BlobStore>,
        digest: Digest,
        rx: watch::Receiver<FillState>,
        offset: u64,
        end: u64,
        size: u64,
        pending: Option<ByteStream<'static>>,
        finished: bool,
    }
    let cursor = Cursor { blobs, digest, rx, offset: start, end, size, pending: None, finished: start >= end };
    Box::pin(futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if c.finished {
                return None;
            }
            if let Some(pending) = c.pending.as_mut() {
                match pending.next().await {
                    Some(Ok(chunk)) => {
                        let room = (c.end - c.offset) as usize;
                        let chunk = if chunk.len() > room { chunk.slice(..room) } else { chunk };
                        if chunk.is_empty() {
                            c.pending = None;
                            continue;
                        }
                        c.offset += chunk.len() as u64;
                        if c.offset >= c.end {
                            c.finished = true;
                        }
                        return Some((Ok(chunk), c));
                    }
                    Some(Err(e)) => {
                        c.finished = true;
                        return Some((Err(e), c));
                    }
                    None => {
                        c.pending = None;
                        continue;
                    }
                }
            }
            let state = c.rx.borrow_and_update().clone();
            match state.done {
                Some(Ok(())) => match c.blobs.read(&c.digest, Some((c.offset, c.end - 1))).await {
                    Ok(Some(read)) => {
                        c.pending = Some(read.body);
                        continue;
                    }
                    Ok(None) => {
                        c.finished = true;
                        return Some((Err(io::Error::other("cached blob vanished")), c));
                    }
                    Err(e) => {
                        c.finished = true;
                        return Some((Err(e), c));
                    }
                },
                Some(Err(e)) => {
                    c.finished = true;
                    return Some((Err(io::Error::other(e)), c));
                }
                None => {}
            }
            // Bytes the session file holds now; the last byte of the blob only once verified.
            let on_disk = c.blobs.upload_size(&state.upload).await.ok().flatten().unwrap_or(0);
            let unverified_limit = if state.verified { c.size } else { c.size.saturating_sub(1) };
            let limit = on_disk.min(c.end).min(unverified_limit);
            if limit > c.offset
                && let Ok(stream) = c.blobs.upload_read(&state.upload, c.offset).await
            {
                let take = limit - c.offset;
                c.pending = Some(Box::pin(stream.scan(take, |left, item| {
                    let out = match item {
                        Ok(_) if *left == 0 => return std::future::ready(None),
                        Ok(chunk) => {
                            let n = (chunk.len() as u64).min(*left);
                            *left -= n;
                            Ok(chunk.slice(..n as usize))
                        }
                        Err(e) => Err(e),
                    };
                    std::future::ready(Some(out))
                })));
                continue;
            }
            if c.rx.changed().await.is_err() {
                // The fill ended and its sender is gone: look at the final state once more.
                if c.rx.borrow().done.is_none() {
                    c.finished = true;
                    return Some((Err(io::Error::other("blob fetch ended unexpectedly")), c));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used_first_and_spares_what_is_being_served() {
        let d = |s: &str| Digest::sha256_of(s.as_bytes());
        let mut lru = Lru::default();
        for name in ["a", "b", "c"] {
            lru.touch(&d(name), 10);
        }
        lru.touch(&d("a"), 10);
        // Order of use is now b, c, a; c is being served and must stay.
        let victims = lru.evict(10, &d("c"));
        assert_eq!(victims, vec![d("b"), d("a")]);
        assert_eq!(lru.total, 10);
        assert!(lru.by_digest.contains_key(&d("c")));
        assert!(lru.evict(10, &d("c")).is_empty(), "within the bound: nothing more");
    }
}
