//! Blobs through the cache: served from the bytes held, or from one shared upstream fetch
//! (single flight) that every waiting client streams from as it grows, the last byte held
//! back until the digest has verified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tessera_registry::{BlobAnswer, store_failure};
use tessera_spec::{Digest, Digester, ErrorCode, OciError, RangeRequest, RepoName};
use tessera_store::{
    AppendError, BlobRead, BlobStore, ByteStream, ClusterGuard, ClusterLocks, MetaStore, StoreError, UploadId,
};
use tokio::sync::watch;

use crate::upstream::{Upstream, UpstreamError};

use super::lru::{Lru, evict};
use super::{CacheStats, PullThrough, UpstreamAuth, count, send, unavailable};

#[derive(Clone, Debug)]
pub(super) struct FillState {
    upload: UploadId,
    size: Option<u64>,
    /// Every byte is in the session and matches the digest: readers may send the last byte.
    verified: bool,
    /// The latest checkpoint: how many bytes have been received, and the digest of exactly
    /// those. Before the blob verifies, readers send no byte past it, so that a reader whose
    /// fill fails on storage can continue from the upstream and check that the new answer
    /// begins with the bytes it already sent, without hashing what it sends.
    vouched: Option<(u64, Digest)>,
    /// `Some(Ok)` once committed, `Some(Err)` once failed.
    done: Option<Result<(), Arc<FillError>>>,
    /// The newest bytes received, for readers keeping up with the fill.
    recent: Arc<Mutex<Recent>>,
}

impl FillState {
    /// A fill that has started: nothing received, nothing known of the size yet.
    fn new(upload: UploadId) -> FillState {
        FillState { upload, size: None, verified: false, vouched: None, done: None, recent: Arc::default() }
    }
}

/// The newest bytes of a fill, as received (shared, never copied): a reader keeping up with
/// the fill sends these instead of reading them back from the session file, which would cost
/// a buffer, a read and a copy per chunk on the path every cold pull takes. A reader that
/// falls further behind than this reads from the file.
#[derive(Debug, Default)]
pub(super) struct Recent {
    chunks: std::collections::VecDeque<Bytes>,
    /// Offset in the blob of the first byte of `chunks`.
    start: u64,
    len: u64,
}

/// How many of the newest bytes of a fill [`Recent`] keeps: a few wakes' worth.
const RECENT_BYTES: u64 = 4 * WAKE_EVERY;

impl Recent {
    /// Appends the chunk that begins at `offset`, forgetting the oldest beyond the bound.
    fn push(&mut self, offset: u64, chunk: Bytes) {
        if offset != self.start + self.len {
            // A resumed transfer after a gap this never saw: start afresh from here.
            self.chunks.clear();
            self.start = offset;
            self.len = 0;
        }
        self.len += chunk.len() as u64;
        self.chunks.push_back(chunk);
        while self.len - self.chunks.front().map_or(0, |c| c.len() as u64) >= RECENT_BYTES {
            let old = self.chunks.pop_front().expect("non-empty while len > 0");
            self.start += old.len() as u64;
            self.len -= old.len() as u64;
        }
    }

    /// The bytes `[from, to)` as held, or `None` when `from` is older than what is held; may
    /// end before `to` where reception has not reached it.
    fn take(&self, from: u64, to: u64) -> Option<Vec<Bytes>> {
        if from < self.start {
            return None;
        }
        let mut out = Vec::new();
        if from >= to {
            // Caught up: nothing to hand out (and no empty slice a reader would spin on).
            return Some(out);
        }
        let mut at = self.start;
        for chunk in &self.chunks {
            let end = at + chunk.len() as u64;
            if end > from && at < to {
                let lo = from.saturating_sub(at) as usize;
                let hi = (to.min(end) - at) as usize;
                out.push(chunk.slice(lo..hi));
            }
            if end >= to {
                break;
            }
            at = end;
        }
        Some(out)
    }
}

/// A blob a fill committed moments ago is gone (evicted or deleted under us).
fn vanished(digest: &Digest) -> OciError {
    tracing::error!(%digest, "cache: a blob fetched and committed just now is no longer held");
    OciError::internal()
}

/// Why a fill did not end with the verified blob in the cache.
#[derive(Debug, thiserror::Error)]
pub(super) enum FillError {
    #[error("the upstream does not have it")]
    NotFound,
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("upstream cannot resume the transfer: {0}")]
    Resume(String),
    #[error("another node's fetch of it did not finish within {} s", .0.as_secs())]
    ElsewhereTooLong(Duration),
    #[error("upstream blob does not match its digest (got {0}); not cached")]
    Mismatch(Digest),
    #[error("upstream blob has {got} bytes, it announced {announced}")]
    Size { got: u64, announced: u64 },
    #[error("cache storage: {0}")]
    Store(#[from] StoreError),
}

impl From<UpstreamError> for FillError {
    fn from(e: UpstreamError) -> FillError {
        FillError::Upstream(e)
    }
}

impl From<std::io::Error> for FillError {
    fn from(e: std::io::Error) -> FillError {
        FillError::Store(e.into())
    }
}

/// Readers of a fill are woken about this often (in bytes received), not per chunk.
const WAKE_EVERY: u64 = 1024 * 1024;

impl PullThrough {
    /// A blob, from the cache or streamed from a (shared) upstream fetch.
    pub async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        auth: &UpstreamAuth,
    ) -> Result<BlobAnswer, OciError> {
        if auth.passthrough() {
            let path = format!("/v2/{name}/blobs/{digest}");
            let answer = self.ask(Method::HEAD, name, &path, HeaderMap::new(), auth).await;
            self.admit(answer, || OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))?;
        }
        // A link says the upstream has it; the bytes may have been evicted since.
        if let Some(size) = self.meta.blob_link(name, digest).await.map_err(|e| store_failure("cache", e))?
            && let Some(answer) = self.stored(digest, size, range).await?
        {
            count(&self.stats.blob_hits, 1);
            return Ok(answer);
        }
        if self.recently_missing(name, &digest.to_string()) {
            return Err(OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"));
        }
        // Bytes are content-addressed and were verified when stored: one copy serves every
        // repository that turns out to need it.
        if let Some(size) = self.blobs.stat(digest).await.map_err(|e| store_failure("cache", e))?
            && let Some(answer) = self.stored(digest, size, range).await?
        {
            // The link only spares a later look at the bytes: a cache that cannot write it
            // (a full disk) still serves what it holds.
            if let Err(e) = self.meta.link_blob(name, digest, size).await {
                tracing::warn!(upstream = self.upstream.name(), %name, %digest, "cache: cannot link a held blob: {e}");
            }
            count(&self.stats.blob_hits, 1);
            return Ok(answer);
        }
        let mut rx = self.join_fill(name, digest, auth).await?;
        count(&self.stats.blob_misses, 1);
        // Wait until the size is known (the upstream answered) or the fill ended. An empty
        // answer has no last byte to hold back: it waits for the digest to verify.
        let state = loop {
            let s = rx.borrow_and_update().clone();
            if s.size.is_some_and(|n| n > 0 || s.verified) || s.done.is_some() {
                break s;
            }
            if rx.changed().await.is_err() {
                return Err(unavailable(&self.upstream, "blob fetch ended unexpectedly"));
            }
        };
        match (&state.done, state.size) {
            (Some(Err(e)), _) if matches!(**e, FillError::NotFound) => {
                Err(OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry"))
            }
            (Some(Err(e)), _) if matches!(**e, FillError::Store(_)) => {
                self.uncached(name, digest, range, auth, e).await
            }
            (Some(Err(e)), _) => Err(unavailable(&self.upstream, e)),
            (Some(Ok(())), _) => {
                let size = self
                    .blobs
                    .stat(digest)
                    .await
                    .map_err(|e| store_failure("cache", e))?
                    .ok_or_else(|| vanished(digest))?;
                self.stored(digest, size, range).await?.ok_or_else(|| vanished(digest))
            }
            (None, Some(size)) => {
                let range = RangeRequest::resolve_opt(range, size)?;
                let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
                let len = if size == 0 { 0 } else { end - start + 1 };
                let direct = self.direct(name, auth);
                let body = follow(self.blobs.clone(), digest.clone(), rx, direct, start, start + len, size);
                let body = first_polled(body).await.map_err(|e| unavailable(&self.upstream, e))?;
                Ok(BlobAnswer { size, range, read: BlobRead { len, body } })
            }
            (None, None) => {
                tracing::error!(upstream = self.upstream.name(), %digest, "a fill woke its readers with no size and no end");
                Err(OciError::internal())
            }
        }
    }

    /// Whether the cache holds `digest` for `name` now (linked, and its bytes here).
    pub async fn holds(&self, name: &RepoName, digest: &Digest) -> Result<bool, OciError> {
        let linked = self.meta.blob_link(name, digest).await.map_err(|e| store_failure("cache", e))?.is_some();
        Ok(linked && self.blobs.stat(digest).await.map_err(|e| store_failure("cache", e))?.is_some())
    }

    /// The cached bytes, if still held (and marks them used).
    async fn stored(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<&RangeRequest>,
    ) -> Result<Option<BlobAnswer>, OciError> {
        let range = RangeRequest::resolve_opt(range, size)?;
        let Some(read) = self
            .blobs
            .read(digest, range.map(|r| (r.start, r.end)))
            .await
            .map_err(|e| store_failure("cache read", e))?
        else {
            return Ok(None);
        };
        self.lru.lock().unwrap_or_else(|p| p.into_inner()).touch(digest, size);
        Ok(Some(BlobAnswer { size, range, read }))
    }

    fn direct(&self, name: &RepoName, auth: &UpstreamAuth) -> Direct {
        Direct { upstream: self.upstream.clone(), stats: self.stats.clone(), auth: auth.clone(), name: name.clone() }
    }

    /// The blob straight from the upstream, kept nowhere: the fill could not store it
    /// (`why`, e.g. a full disk), and a cache that cannot keep a blob still serves it.
    async fn uncached(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        auth: &UpstreamAuth,
        why: &FillError,
    ) -> Result<BlobAnswer, OciError> {
        tracing::warn!(upstream = self.upstream.name(), %name, %digest, "serving a blob the cache cannot keep ({why})");
        let (upstream_body, size) =
            self.direct(name, auth).fetch(digest).await.map_err(|e| unavailable(&self.upstream, e))?;
        let range = RangeRequest::resolve_opt(range, size)?;
        let (start, end) = range.map_or((0, size), |r| (r.start, r.end + 1));
        let span = Span { from: start, end, size };
        let body = first_polled(relay(upstream_body, digest.clone(), span, None)).await;
        let body = body.map_err(|e| unavailable(&self.upstream, e))?;
        Ok(BlobAnswer { size, range, read: BlobRead { len: end - start, body } })
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
            // A fill whose task is gone without an answer (it cannot be: its guard takes it
            // out of the map) is never joined; a new one starts.
            if let Some(rx) = fills.get(digest)
                && rx.has_changed().is_ok()
            {
                return Ok(rx.clone());
            }
            let (tx, rx) = watch::channel(FillState::new(upload.clone()));
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
            cluster: self.cluster.clone(),
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
}

type Fills = Arc<Mutex<HashMap<Digest, watch::Receiver<FillState>>>>;

/// A fill's place in the map of fills in flight, given up however its task ends: with an
/// answer, or by a panic or the runtime stopping it. Without this, a fill that never
/// answered would stay joinable and its digest unavailable until a restart. A fill that
/// ended without an answer also leaves no upload session behind.
struct InFlight {
    fills: Fills,
    blobs: Arc<dyn BlobStore>,
    digest: Digest,
    upload: UploadId,
    /// The fill answered (and cleaned up its session itself).
    ended: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if fills.get(&self.digest).is_some_and(|rx| rx.borrow().upload == self.upload) {
            fills.remove(&self.digest);
        }
        drop(fills);
        if !self.ended {
            tracing::error!(digest = %self.digest, "a blob fetch stopped without an answer; its readers get an error");
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (blobs, upload) = (self.blobs.clone(), self.upload.clone());
                runtime.spawn(async move {
                    let _ = blobs.upload_delete(&upload).await;
                });
            }
        }
    }
}

/// How many times one blob transfer is resumed with `Range` after breaking.
const MAX_RESUMES: u32 = 3;

/// One upstream blob fetch.
struct Fill {
    upstream: Arc<Upstream>,
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    fills: Fills,
    lru: Arc<Mutex<Lru>>,
    stats: Arc<CacheStats>,
    cluster: Option<Arc<dyn ClusterLocks>>,
    name: RepoName,
    digest: Digest,
    upload: UploadId,
    /// The credentials of the request that started the fetch.
    auth: UpstreamAuth,
}

impl Fill {
    async fn run(self, tx: watch::Sender<FillState>) {
        let mut in_flight = InFlight {
            fills: self.fills.clone(),
            blobs: self.blobs.clone(),
            digest: self.digest.clone(),
            upload: self.upload.clone(),
            ended: false,
        };
        let result = self.fetch(&tx).await;
        if let Err(e) = &result {
            if !matches!(e, FillError::NotFound) {
                tracing::error!(upstream = self.upstream.name(), name = %self.name, digest = %self.digest, "blob fetch failed: {e}");
                count(&self.stats.fetch_failures, 1);
            }
            let _ = self.blobs.upload_delete(&self.upload).await;
        }
        in_flight.ended = true;
        drop(in_flight);
        tx.send_modify(|s| s.done = Some(result.map_err(Arc::new)));
    }

    async fn fetch(&self, tx: &watch::Sender<FillState>) -> Result<(), FillError> {
        // In a cluster, one node fetches a blob; the others wait for it to land.
        let _lease = match self.lease().await? {
            Lease::Landed(size) => return self.found(tx, size).await,
            Lease::Held(lease) => lease,
        };
        // A fetch that finished between this request's look at the cache and its start of a
        // new one left the blob here already.
        if let Some(size) = self.blobs.stat(&self.digest).await? {
            return self.found(tx, size).await;
        }
        self.blobs.upload_create(&self.upload).await?;
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
            let response =
                send(&self.upstream, &self.stats, &self.auth, Method::GET, &self.name, &path, headers).await?;
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
                        return Err(FillError::Resume("it answered with another range".into()));
                    }
                }
                StatusCode::NOT_FOUND => return Err(FillError::NotFound),
                s if received > 0 => return Err(FillError::Resume(format!("it answered {s}"))),
                s => return Err(FillError::Status(s)),
            }
            let tx_progress = tx.clone();
            let recent = tx.borrow().recent.clone();
            let counted = &mut received;
            let hasher = &mut digester;
            let mut unannounced = 0u64;
            let stream: ByteStream = Box::pin(response.bytes_stream().map(move |chunk| {
                let chunk = chunk.map_err(std::io::Error::other)?;
                hasher.update(&chunk);
                recent.lock().unwrap_or_else(|p| p.into_inner()).push(*counted, chunk.clone());
                *counted += chunk.len() as u64;
                unannounced += chunk.len() as u64;
                if unannounced >= WAKE_EVERY {
                    // Wake readers: about a buffer's worth more is on its way to the file.
                    unannounced = 0;
                    let checkpoint = (*counted, hasher.clone().finish());
                    tx_progress.send_modify(|s| s.vouched = Some(checkpoint));
                }
                Ok(chunk)
            }));
            // Not durable yet: the commit makes it so, and readers need not wait for that.
            match self.blobs.upload_append(&self.upload, stream, false).await {
                Ok(size) => break size,
                Err(AppendError::Source(e)) if resumes < MAX_RESUMES => {
                    // What arrived is on disk (the store keeps a failed stream's bytes); the
                    // hash covers exactly that, so the transfer can continue where it broke.
                    let on_disk = self.blobs.upload_size(&self.upload).await?;
                    if on_disk != Some(received) {
                        return Err(FillError::Resume(format!("the transfer broke ({e}) where the cache cannot see")));
                    }
                    resumes += 1;
                    tracing::warn!(upstream = self.upstream.name(), digest = %self.digest, "transfer broke at {received} bytes ({e}); resuming");
                }
                Err(AppendError::Source(e)) => {
                    return Err(FillError::Resume(format!("the transfer broke {MAX_RESUMES} times, last: {e}")));
                }
                Err(AppendError::Storage(e)) => return Err(e.into()),
            }
        };
        let actual = digester.finish();
        if actual != self.digest {
            count(&self.stats.digest_mismatches, 1);
            return Err(FillError::Mismatch(actual));
        }
        if let Some(announced) = expected_size.filter(|&announced| announced != size) {
            return Err(FillError::Size { got: size, announced });
        }
        tx.send_modify(|s| s.verified = true);
        self.blobs.upload_commit(&self.upload, &self.digest).await?;
        if let Err(e) = self.meta.link_blob(&self.name, &self.digest, size).await {
            // The bytes are held; a later pull finds them without the link.
            tracing::warn!(upstream = self.upstream.name(), name = %self.name, digest = %self.digest, "cache: cannot link a fetched blob: {e}");
        }
        self.lru.lock().unwrap_or_else(|p| p.into_inner()).touch(&self.digest, size);
        evict(&self.upstream, &self.lru, &self.blobs, &self.stats, &self.digest).await;
        count(&self.stats.blobs_fetched, 1);
        count(&self.stats.blob_bytes_fetched, size);
        Ok(())
    }
}

/// How often a node waiting for another node's fetch looks whether the blob has landed.
const LANDED_POLL: Duration = Duration::from_millis(200);
/// How long a node waits for another node's fetch of one blob before giving up (that fetch
/// is alive all along: its node would have lost the lease otherwise).
const LANDED_WAIT: Duration = Duration::from_secs(600);

/// A node's right to fetch a blob, or the blob another node fetched.
enum Lease {
    /// This node fetches; in a cluster, with the lease held until the fetch ends.
    Held(Option<ClusterGuard>),
    /// Another node fetched it meanwhile: it is in the shared store, this size.
    Landed(u64),
}

impl Fill {
    /// Takes the cluster's lease on fetching this blob, waiting while another node holds it
    /// until the blob lands there or the lease comes free (that node finished without
    /// storing it, or died: its lease ends with its database connection).
    async fn lease(&self) -> Result<Lease, FillError> {
        let Some(cluster) = &self.cluster else { return Ok(Lease::Held(None)) };
        let key = format!("fill/{}/{}", self.upstream.name(), self.digest);
        let deadline = tokio::time::Instant::now() + LANDED_WAIT;
        loop {
            if let Some(size) = self.blobs.stat(&self.digest).await? {
                return Ok(Lease::Landed(size));
            }
            if let Some(lease) = cluster.try_lock(&key).await? {
                return Ok(Lease::Held(Some(lease)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FillError::ElsewhereTooLong(LANDED_WAIT));
            }
            tokio::time::sleep(LANDED_POLL).await;
        }
    }

    /// The blob is held already: linked, and its readers told.
    async fn found(&self, tx: &watch::Sender<FillState>, size: u64) -> Result<(), FillError> {
        self.meta.link_blob(&self.name, &self.digest, size).await?;
        tx.send_modify(|s| s.verified = true);
        Ok(())
    }
}

/// Streams `[start, end)` of a blob being fetched: from the fill's session file while it
/// grows, then from the committed blob. The final byte (of a range too) waits for the
/// digest to verify.
///
/// When the fill fails because the cache cannot store the blob, the rest comes straight from
/// the upstream ([`relay`]), which checks that its answer begins with the bytes the fill's
/// last checkpoint vouches for (this reader sent no byte past it).
fn follow(
    blobs: Arc<dyn BlobStore>,
    digest: Digest,
    rx: watch::Receiver<FillState>,
    direct: Direct,
    start: u64,
    end: u64,
    size: u64,
) -> ByteStream<'static> {
    struct Cursor {
        blobs: Arc<dyn BlobStore>,
        digest: Digest,
        rx: watch::Receiver<FillState>,
        start: u64,
        offset: u64,
        end: u64,
        size: u64,
        pending: Option<ByteStream<'static>>,
        finished: bool,
        /// Taken when the answer comes from the upstream directly (once at most).
        direct: Option<Direct>,
    }
    let cursor = Cursor {
        blobs,
        digest,
        rx,
        start,
        offset: start,
        end,
        size,
        pending: None,
        finished: start >= end,
        direct: Some(direct),
    };
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
                        return Some((Err(std::io::Error::other("cached blob vanished")), c));
                    }
                    Err(e) => {
                        c.finished = true;
                        return Some((Err(e), c));
                    }
                },
                Some(Err(e)) if matches!(*e, FillError::Store(_)) && c.direct.is_some() => {
                    let direct = c.direct.take().expect("checked");
                    tracing::warn!(upstream = direct.upstream.name(), digest = %c.digest, "serving the rest of a blob the cache cannot keep ({e})");
                    // The bytes sent so far are all within the last checkpoint.
                    let check = state.vouched.clone().filter(|_| c.offset > c.start);
                    match direct.fetch(&c.digest).await {
                        Ok((upstream_body, size)) if size == c.size => {
                            let span = Span { from: c.offset, end: c.end, size };
                            c.pending = Some(relay(upstream_body, c.digest.clone(), span, check));
                            continue;
                        }
                        Ok((_, size)) => {
                            c.finished = true;
                            let e = format!("the upstream now says the blob has {size} bytes, not {}", c.size);
                            return Some((Err(std::io::Error::other(e)), c));
                        }
                        Err(e) => {
                            c.finished = true;
                            return Some((Err(std::io::Error::other(e.to_string())), c));
                        }
                    }
                }
                Some(Err(e)) => {
                    c.finished = true;
                    return Some((Err(std::io::Error::other(e.to_string())), c));
                }
                None => {}
            }
            // The last byte of this answer (of a range too: its client cannot check a
            // digest) only once the blob verified.
            let vouched = if state.verified { c.end } else { state.vouched.as_ref().map_or(0, |v| v.0).min(c.end - 1) };
            let held = state.recent.lock().unwrap_or_else(|p| p.into_inner()).take(c.offset, vouched);
            match held {
                Some(chunks) if !chunks.is_empty() => {
                    c.pending = Some(Box::pin(futures_util::stream::iter(chunks.into_iter().map(Ok))));
                    continue;
                }
                Some(_) => {}
                // Fallen behind what is held in memory: from the session file.
                None => {
                    let on_disk = c.blobs.upload_size(&state.upload).await.ok().flatten().unwrap_or(0);
                    let limit = on_disk.min(vouched);
                    if limit > c.offset
                        && let Ok(stream) = c.blobs.upload_read(&state.upload, c.offset).await
                    {
                        c.pending = Some(Box::pin(stream.scan(limit - c.offset, |left, item| {
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
                }
            }
            if c.rx.changed().await.is_err() {
                // The fill ended and its sender is gone: look at the final state once more.
                if c.rx.borrow().done.is_none() {
                    c.finished = true;
                    return Some((Err(std::io::Error::other("blob fetch ended unexpectedly")), c));
                }
            }
        }
    }))
}

/// A body whose first item has been waited for, so that a fetch failing before this
/// answer's first byte gets a status: the server buffers the head until the body's first
/// poll, so an error there would reach the client as a connection closed before any answer.
async fn first_polled(mut body: ByteStream<'static>) -> std::io::Result<ByteStream<'static>> {
    Ok(match body.next().await {
        Some(Err(e)) => return Err(e),
        Some(Ok(first)) => Box::pin(futures_util::stream::once(async move { Ok(first) }).chain(body)),
        None => body,
    })
}

/// Where to fetch a blob from when the cache cannot hold it.
struct Direct {
    upstream: Arc<Upstream>,
    stats: Arc<CacheStats>,
    auth: UpstreamAuth,
    name: RepoName,
}

impl Direct {
    /// GETs the whole blob; returns its body and size.
    async fn fetch(&self, digest: &Digest) -> Result<(ByteStream<'static>, u64), FillError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let response =
            send(&self.upstream, &self.stats, &self.auth, Method::GET, &self.name, &path, HeaderMap::new()).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(FillError::NotFound),
            s => return Err(FillError::Status(s)),
        }
        let size = response.content_length().ok_or(FillError::Resume("no Content-Length".into()))?;
        Ok((Box::pin(response.bytes_stream().map(|c| c.map_err(std::io::Error::other))), size))
    }
}

/// Which bytes of a blob of `size` a reader is still to get: `[from, end)`.
#[derive(Clone, Copy)]
struct Span {
    from: u64,
    end: u64,
    size: u64,
}

/// Streams `[from, end)` of `body`, the upstream's whole blob, keeping nothing. Every
/// byte is hashed, so the last one sent waits until the whole blob has matched `digest`;
/// with `check` (a length and the digest of that many first bytes, covering what was sent
/// before), the answer must begin with those very bytes, or the stream fails before its end.
fn relay(body: ByteStream<'static>, digest: Digest, span: Span, check: Option<(u64, Digest)>) -> ByteStream<'static> {
    struct Relay {
        body: ByteStream<'static>,
        digest: Digest,
        span: Span,
        /// Bytes of the upstream's answer read so far.
        pos: u64,
        whole: Digester,
        check: Option<(u64, Digest)>,
        /// The last byte to send, until the digest has verified.
        held: Option<Bytes>,
        done: bool,
    }
    impl Relay {
        async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
            let fail = |why: String| Err(std::io::Error::other(why));
            let Span { from, end, size } = self.span;
            while let Some(chunk) = self.body.next().await {
                let chunk = chunk?;
                let at = self.pos;
                self.pos += chunk.len() as u64;
                if self.pos > size {
                    return fail(format!("the upstream sent more than the {size} bytes it announced"));
                }
                let part = |lo: u64, hi: u64| {
                    let (lo, hi) = (lo.clamp(at, self.pos), hi.clamp(at, self.pos));
                    chunk.slice((lo - at) as usize..(hi - at) as usize)
                };
                match self.check.take() {
                    Some((length, prefix)) if length <= self.pos => {
                        self.whole.update(&part(0, length));
                        if self.whole.clone().finish() != prefix {
                            return fail("the upstream's answer does not begin with the bytes already sent".into());
                        }
                        self.whole.update(&part(length, size));
                    }
                    check => {
                        self.check = check;
                        self.whole.update(&chunk);
                    }
                }
                let mut out = part(from, end);
                if self.pos >= end && !out.is_empty() {
                    self.held = Some(out.split_off(out.len() - 1));
                }
                if !out.is_empty() {
                    return Ok(Some(out));
                }
            }
            self.done = true;
            if self.pos != size {
                return fail(format!("the upstream sent {} bytes of {size}", self.pos));
            }
            let actual = std::mem::replace(&mut self.whole, Digester::new(self.digest.algorithm())).finish();
            if actual != self.digest {
                return fail(format!("upstream blob does not match its digest (got {actual}); not served"));
            }
            Ok(self.held.take())
        }
    }
    let relay =
        Relay { body, whole: Digester::new(digest.algorithm()), check, digest, span, pos: 0, held: None, done: false };
    Box::pin(futures_util::stream::unfold(relay, |mut r| async move {
        if r.done {
            return None;
        }
        match r.next().await {
            Ok(Some(bytes)) => Some((Ok(bytes), r)),
            Ok(None) => None,
            Err(e) => {
                r.done = true;
                Some((Err(e), r))
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(bytes: &[u8], size: usize) -> ByteStream<'static> {
        let parts: Vec<std::io::Result<Bytes>> = bytes.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        Box::pin(futures_util::stream::iter(parts))
    }

    /// What a relay sends before it ends, and whether it ends with an error.
    async fn relayed(upstream: &[u8], digest: &Digest, span: Span, sent: Option<&[u8]>) -> (Vec<u8>, bool) {
        let check = sent.map(|b| (b.len() as u64, Digest::sha256_of(b)));
        let mut body = relay(chunks(upstream, 1000), digest.clone(), span, check);
        let mut out = Vec::new();
        while let Some(item) = body.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => return (out, true),
            }
        }
        (out, false)
    }

    /// Served without the cache: the requested bytes once the whole blob verified; the last
    /// one never when it does not, or when the answer does not begin with the bytes a
    /// checkpoint vouched for.
    #[tokio::test]
    async fn a_relay_sends_its_last_byte_only_for_the_right_blob() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = Digest::sha256_of(&blob);
        let size = blob.len() as u64;
        let whole = Span { from: 0, end: size, size };
        let (out, failed) = relayed(&blob, &digest, whole, None).await;
        assert!(out == blob && !failed, "{} bytes, failed: {failed}", out.len());
        // A reader of [100, 9000) that sent [100, 4321), within a checkpoint of 4500 bytes
        // (not on a chunk boundary).
        let rest = Span { from: 4321, end: 9000, size };
        let (out, failed) = relayed(&blob, &digest, rest, Some(&blob[..4500])).await;
        assert!(out == blob[4321..9000] && !failed, "{} bytes, failed: {failed}", out.len());

        let mut corrupt = blob.clone();
        corrupt[9999] ^= 1;
        let (out, failed) = relayed(&corrupt, &digest, whole, None).await;
        assert!(failed && out.len() < blob.len(), "{} bytes, failed: {failed}", out.len());
        let (out, failed) = relayed(&blob[..9000], &digest, whole, None).await;
        assert!(failed && out.len() < blob.len(), "a short answer is no complete body");
        // The first answer (what was sent) differed from this one within the checkpoint.
        let mut first = blob[..4500].to_vec();
        first[205] ^= 1;
        let (out, failed) = relayed(&blob, &digest, rest, Some(&first)).await;
        assert!(failed && out.is_empty(), "nothing after a prefix that differs: {} bytes", out.len());
    }

    /// Readers keeping up get exactly the bytes they ask for from memory, across chunk
    /// boundaries; one that fell behind what is held is told so (and reads the file).
    #[test]
    fn recent_bytes_hand_out_exact_ranges_and_forget_the_oldest() {
        let blob: Vec<u8> = (0..RECENT_BYTES * 2).map(|i| (i % 251) as u8).collect();
        let mut recent = Recent::default();
        let chunk = 100_000;
        for (i, part) in blob.chunks(chunk).enumerate() {
            recent.push((i * chunk) as u64, Bytes::copy_from_slice(part));
        }
        let joined = |parts: Vec<Bytes>| parts.concat();
        let end = blob.len() as u64;
        assert!(recent.len >= RECENT_BYTES - chunk as u64 && recent.len < RECENT_BYTES + chunk as u64);
        assert_eq!(recent.start + recent.len, end);
        let from = end - 3 * chunk as u64 - 17;
        assert_eq!(joined(recent.take(from, end - 5).unwrap()), &blob[from as usize..(end - 5) as usize]);
        // Asked past what arrived: what there is.
        assert_eq!(joined(recent.take(end - 10, end + 1000).unwrap()), &blob[(end - 10) as usize..]);
        assert!(recent.take(end, end + 10).unwrap().is_empty());
        assert!(recent.take(from, from).unwrap().is_empty(), "a reader caught up gets nothing, not an empty chunk");
        assert!(recent.take(0, 10).is_none(), "the start was forgotten");
        assert!(recent.take(recent.start - 1, recent.start + 1).is_none());
    }

    /// A reader that has sent everything the fill vouches for (all but the held last byte)
    /// waits for the fill to move: its next poll is pending, not a loop that never yields.
    #[test]
    fn a_reader_caught_up_with_the_fill_waits_for_it() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = b"a blob whose last byte waits for its digest".to_vec();
        let size = blob.len() as u64;
        let digest = Digest::sha256_of(&blob);
        let (tx, mut body) = runtime.block_on(async {
            let blobs: Arc<dyn BlobStore> = Arc::new(tessera_store::FsBlobStore::open(dir.path()).unwrap());
            let upload = UploadId::random();
            blobs.upload_create(&upload).await.unwrap();
            let recent = Arc::new(Mutex::new(Recent::default()));
            recent.lock().unwrap().push(0, Bytes::from(blob.clone()));
            let (tx, rx) = watch::channel(FillState {
                size: Some(size),
                vouched: Some((size, digest.clone())),
                recent,
                ..FillState::new(upload)
            });
            let config =
                tessera_config::Config::from_toml("[[upstream]]\nname = \"up\"\nurl = \"http://127.0.0.1:9\"\n")
                    .unwrap();
            let upstream = Arc::new(Upstream::new(&config.upstreams[0]).unwrap());
            let direct =
                Direct { upstream, stats: Arc::default(), auth: UpstreamAuth::Configured, name: "r".parse().unwrap() };
            let mut body = follow(blobs, digest.clone(), rx, direct, 0, size, size);
            let mut sent = Vec::new();
            while sent.len() + 1 < blob.len() {
                sent.extend_from_slice(&body.next().await.unwrap().unwrap());
            }
            assert_eq!(sent, blob[..blob.len() - 1]);
            (tx, body)
        });
        // Polled on its own thread, so that a reader that never yields fails this test
        // instead of hanging it.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let poller = std::thread::spawn(move || {
            let pending = runtime.block_on(async { futures_util::poll!(body.next()).is_pending() });
            done_tx.send(pending).unwrap();
            (runtime, body)
        });
        let pending = done_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the reader never yielded");
        assert!(pending, "the reader sent a byte past what the fill vouches for");
        let (runtime, mut body) = poller.join().unwrap();
        tx.send_modify(|s| s.verified = true);
        let last = runtime.block_on(body.next()).unwrap().unwrap();
        assert_eq!(&last[..], &blob[blob.len() - 1..]);
    }

    /// A fill that panics gives up its place: the digest can be fetched again at once, its
    /// readers see the end instead of waiting, and its upload session is removed.
    #[tokio::test]
    async fn a_fill_that_panics_leaves_neither_its_entry_nor_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Arc<dyn BlobStore> = Arc::new(tessera_store::FsBlobStore::open(dir.path()).unwrap());
        let fills: Fills = Arc::default();
        let digest = Digest::sha256_of(b"never arrives");
        let upload = UploadId::random();
        blobs.upload_create(&upload).await.unwrap();
        let (tx, mut reader) = watch::channel(FillState::new(upload.clone()));
        fills.lock().unwrap().insert(digest.clone(), reader.clone());
        let in_flight =
            InFlight { fills: fills.clone(), blobs: blobs.clone(), digest, upload: upload.clone(), ended: false };
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let _tx = tx;
            panic!("a bug in the middle of a fetch");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(fills.lock().unwrap().is_empty(), "the digest is free for a new fetch");
        assert!(reader.changed().await.is_err(), "readers see the end, not a wait");
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while blobs.upload_size(&upload).await.unwrap().is_some() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the session is deleted");
    }
}
