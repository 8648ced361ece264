//! Upload sessions: POST/PATCH/PUT/GET/DELETE on `/blobs/uploads/`. Bytes are hashed while
//! they stream to the store; the digest is checked before the blob becomes visible.
//!
//! The running hash lives in memory beside the session lock, and is saved to the blob store
//! after every chunk. After a restart, or on another node of a cluster, it is restored
//! from there (or, lacking that, rebuilt by reading the session's bytes back), so a session
//! is fully described by what the shared stores hold. In a cluster, a session's requests
//! are serialised across nodes by a cluster lock, which a node that dies releases with its
//! connection to the database.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde_json::json;
use tessera_spec::{Algorithm, ByteRange, Digest, Digester, ErrorCode, OciError, RepoName};
use tessera_store::{AppendError, ByteStream, ClusterGuard, StoreResult, UploadId, lock_within};

use crate::{Registry, UploadStart, store_failure};

/// One request's hold of a session: this node's lock (with the running hash) and, in a
/// cluster, the cluster's.
struct SessionGuard {
    state: tokio::sync::OwnedMutexGuard<Option<UploadState>>,
    _cluster: Option<ClusterGuard>,
}

impl std::ops::Deref for SessionGuard {
    type Target = Option<UploadState>;
    fn deref(&self) -> &Self::Target {
        &self.state
    }
}

impl std::ops::DerefMut for SessionGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.state
    }
}

/// How long a request waits for another request of its session running on another node (a
/// client retrying a chunk whose first try is still streaming there).
const SESSION_WAIT: Duration = Duration::from_secs(30);

/// The hash of a session's first `offset` bytes.
pub struct UploadState {
    offset: u64,
    digester: Digester,
}

/// A blob up to this size, sent whole in one request that declares its length, is taken
/// in memory, verified and stored in one step ([`tessera_store::BlobStore::put_blob`]):
/// on an object store, one request instead of a session's many.
pub const SMALL_BLOB: u64 = 4 << 20;

/// How long a commit waits for a collection deleting the same blob: it deletes files, so
/// seconds at most.
const HOLD_ATTEMPTS: u32 = 200;
const HOLD_RETRY: Duration = Duration::from_millis(50);

fn upload_unknown() -> OciError {
    OciError::new(ErrorCode::BlobUploadUnknown, "blob upload unknown to registry")
}

/// The `Range` header value for a session holding `offset` bytes (Distribution's form:
/// `0-0` when empty).
pub fn range_header(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

impl Registry {
    fn session_lock(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<Option<UploadState>>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.entry(id.clone()).or_default().clone()
    }

    fn forget_session(&self, id: &UploadId) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Takes the session's cluster lock, if this node is one of a cluster; `None` outside one.
    async fn cluster_session_lock(&self, id: &UploadId, wait: Duration) -> Result<Option<ClusterGuard>, OciError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        match lock_within(cluster.as_ref(), &format!("upload/{id}"), wait).await {
            Ok(Some(guard)) => Ok(Some(guard)),
            Ok(None) => Err(OciError::new(
                ErrorCode::Unavailable,
                "another request of this upload is still running on another node; ask for its offset and retry",
            )
            .with_header("retry-after", "1")),
            Err(e) => Err(store_failure("upload lock", e)),
        }
    }

    /// Locks the session `id` of `repo` for one request and returns its size. An id that
    /// names no session leaves no lock entry behind, so probing random ids costs no memory.
    async fn open_session(&self, repo: &RepoName, id: &UploadId) -> Result<(SessionGuard, u64), OciError> {
        let state = self.session_lock(id).lock_owned().await;
        let guard = SessionGuard { state, _cluster: self.cluster_session_lock(id, SESSION_WAIT).await? };
        let owner = self.meta.upload_repo(id).await.map_err(|e| store_failure("upload lookup", e))?;
        let size = match &owner {
            Some(owner) if owner == repo => {
                self.blobs.upload_size(id).await.map_err(|e| store_failure("upload size", e))?
            }
            _ => None,
        };
        match size {
            Some(size) => Ok((guard, size)),
            None => {
                drop(guard);
                // Only an id that names no session at all is forgotten: a session of another
                // repository keeps its lock, or its requests could stop being serialised.
                if owner.is_none() {
                    self.forget_session(id);
                }
                Err(upload_unknown())
            }
        }
    }

    /// Opens a session for `repo`, or mounts `mount` if it can (see [`Registry::mount`]).
    pub async fn upload_start(
        &self,
        repo: &RepoName,
        mount: Option<(&Digest, Option<&RepoName>)>,
    ) -> Result<UploadStart, OciError> {
        if let Some((digest, from)) = mount
            && self.mount(repo, digest, from).await?.is_some()
        {
            return Ok(UploadStart::Created(digest.clone()));
        }
        let id = UploadId::random();
        self.blobs.upload_create(&id).await.map_err(|e| store_failure("upload create", e))?;
        if let Err(e) = self.meta.create_upload(&id, repo).await {
            let _ = self.blobs.upload_delete(&id).await;
            return Err(store_failure("upload record", e));
        }
        Ok(UploadStart::Session(id))
    }

    /// A whole blob in one request (`POST ?digest=`), of `content_length` bytes when the
    /// request says. Nothing is left behind on failure.
    pub async fn upload_monolithic<S>(
        &self,
        repo: &RepoName,
        digest: &Digest,
        content_length: Option<u64>,
        body: S,
    ) -> Result<(), OciError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        if content_length.is_some_and(|n| n <= SMALL_BLOB) {
            return self.store_whole(repo, digest, body).await;
        }
        let id = UploadId::random();
        self.blobs.upload_create(&id).await.map_err(|e| store_failure("upload create", e))?;
        let mut state = None;
        let result = async {
            self.append(&id, &mut state, 0, body).await?;
            self.commit(repo, &id, digest, &mut state).await
        }
        .await;
        if result.is_err() {
            let _ = self.blobs.upload_delete(&id).await;
        }
        result
    }

    /// Bytes received so far. Takes no lock: a client asking where to resume (after its
    /// request failed, perhaps on another node still writing) gets the bytes stored now,
    /// without waiting for a request that may never finish in its eyes.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<u64, OciError> {
        let owner = self.meta.upload_repo(id).await.map_err(|e| store_failure("upload lookup", e))?;
        if owner.as_ref() != Some(repo) {
            return Err(upload_unknown());
        }
        self.blobs.upload_size(id).await.map_err(|e| store_failure("upload size", e))?.ok_or_else(upload_unknown)
    }

    /// Appends a chunk. `content_range`, when sent, must start where the session stands.
    pub async fn upload_patch<S>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        content_range: Option<ByteRange>,
        content_length: Option<u64>,
        body: S,
    ) -> Result<u64, OciError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let (mut state, size) = self.open_session(repo, id).await?;
        check_chunk(size, content_range, content_length)?;
        let new_size = self.append(id, &mut state, size, body).await?;
        if let Some(s) = state.as_ref() {
            // For the next request, wherever it lands: without it, only a re-read of the
            // whole session could rebuild the hash.
            if let Err(e) = self.blobs.upload_save_hash(id, s.offset, &s.digester.save()).await {
                tracing::warn!(upload = %id, "cannot save the hash state: {e}");
            }
        }
        Ok(new_size)
    }

    /// Ends a session: appends an optional last chunk, verifies `digest` over everything
    /// received and makes the blob visible in `repo`. A wrong digest discards the session.
    pub async fn upload_finish<S>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        content_range: Option<ByteRange>,
        content_length: Option<u64>,
        body: S,
    ) -> Result<(), OciError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let (mut state, size) = self.open_session(repo, id).await?;
        let whole = size == 0 && content_length.is_some_and(|n| n > 0 && n <= SMALL_BLOB);
        if whole && content_range.is_none_or(|r| r.start == 0) {
            // The whole blob in its closing request (POST, then PUT with the body): stored
            // in one step, and the empty session dropped.
            check_chunk(size, content_range, content_length)?;
            let result = self.store_whole(repo, digest, body).await;
            if result.as_ref().is_ok() || result.as_ref().is_err_and(|e| e.code == ErrorCode::DigestInvalid) {
                self.discard(id).await;
                drop(state);
                self.forget_session(id);
            }
            return result;
        }
        if content_length != Some(0) {
            check_chunk(size, content_range, content_length)?;
            self.append(id, &mut state, size, body).await?;
        }
        let result = self.commit(repo, id, digest, &mut state).await;
        match &result {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::DigestInvalid || e.code == ErrorCode::TooLarge => {
                self.discard(id).await;
            }
            Err(_) => {}
        }
        drop(state);
        if result.is_ok() {
            self.forget_session(id);
        }
        result
    }

    pub async fn upload_cancel(&self, repo: &RepoName, id: &UploadId) -> Result<(), OciError> {
        let (state, _) = self.open_session(repo, id).await?;
        self.discard(id).await;
        drop(state);
        self.forget_session(id);
        Ok(())
    }

    async fn discard(&self, id: &UploadId) {
        if let Err(e) = self.blobs.upload_delete(id).await {
            tracing::warn!(upload = %id, "cannot remove upload bytes: {e}");
        }
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, "cannot remove upload record: {e}");
        }
    }

    /// Streams `body` into the session (which holds `size` bytes), hashing as it goes.
    async fn append<S>(
        &self,
        id: &UploadId,
        state: &mut Option<UploadState>,
        size: u64,
        body: S,
    ) -> Result<u64, OciError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let mut digester = match state.take() {
            Some(s) if s.offset == size => s.digester,
            _ => self.rehash(id, Algorithm::Sha256, size).await?,
        };
        let limit = self.settings.blob_max_bytes;
        let mut received = size;
        let mut over_limit = false;
        let hashed: ByteStream = Box::pin(body.map(|chunk| {
            let chunk = chunk?;
            received += chunk.len() as u64;
            if limit > 0 && received > limit {
                over_limit = true;
                return Err(io::Error::other("blob size limit exceeded"));
            }
            digester.update(&chunk);
            Ok(chunk)
        }));
        match self.blobs.upload_append(id, hashed, true).await {
            Ok(new_size) => {
                *state = Some(UploadState { offset: new_size, digester });
                Ok(new_size)
            }
            Err(AppendError::Source(e)) if over_limit => {
                tracing::info!(upload = %id, "upload refused: {e}");
                Err(OciError::new(ErrorCode::TooLarge, format!("blob larger than the {limit} byte limit")))
            }
            Err(AppendError::Source(e)) => {
                tracing::info!(upload = %id, "upload body ended early: {e}");
                Err(OciError::new(
                    ErrorCode::BlobUploadInvalid,
                    "upload body ended before its declared end; resume from the reported offset",
                ))
            }
            Err(AppendError::Storage(e)) => Err(store_failure("upload append", e)),
        }
    }

    /// Rebuilds the hash of a session holding `size` bytes: from its saved hash state and
    /// the bytes after it, or from all its bytes when no usable state was saved.
    async fn rehash(&self, id: &UploadId, algorithm: Algorithm, size: u64) -> Result<Digester, OciError> {
        let saved = match self.blobs.upload_load_hash(id).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(upload = %id, "cannot load the hash state, hashing the session again: {e}");
                None
            }
        };
        let (start, digester) = saved
            .filter(|(offset, _)| *offset <= size)
            .and_then(|(offset, state)| Some((offset, Digester::restore(&state)?)))
            .filter(|(_, d)| d.algorithm() == algorithm)
            .unwrap_or_else(|| (0, Digester::new(algorithm)));
        let stream = self.blobs.upload_read(id, start).await.map_err(|e| store_failure("upload read", e))?;
        stream
            .try_fold(digester, |mut d, chunk| async move {
                d.update(&chunk);
                Ok(d)
            })
            .await
            .map_err(|e| store_failure("upload rehash", e))
    }

    /// Takes a small blob whole into memory, hashing it, and stores and links it if it is
    /// `digest` (see [`SMALL_BLOB`]).
    async fn store_whole<S>(&self, repo: &RepoName, digest: &Digest, body: S) -> Result<(), OciError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let mut digester = Digester::new(digest.algorithm());
        let mut bytes = bytes::BytesMut::new();
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                tracing::info!("upload body ended early: {e}");
                OciError::new(ErrorCode::BlobUploadInvalid, "upload body ended before its declared end; send it again")
            })?;
            if bytes.len() as u64 + chunk.len() as u64 > SMALL_BLOB {
                return Err(OciError::new(ErrorCode::SizeInvalid, "the body is longer than its Content-Length"));
            }
            digester.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        let limit = self.settings.blob_max_bytes;
        if limit > 0 && bytes.len() as u64 > limit {
            return Err(OciError::new(ErrorCode::TooLarge, format!("blob larger than the {limit} byte limit")));
        }
        let actual = digester.finish();
        if &actual != digest {
            return Err(digest_mismatch(digest, &actual));
        }
        let size = bytes.len() as u64;
        let growing = self.check_quotas(repo, digest, size).await?;
        self.hold(digest, size).await?;
        self.blobs.put_blob(digest, bytes.freeze()).await.map_err(|e| store_failure("blob store", e))?;
        self.meta.link_blob(repo, digest, size).await.map_err(|e| store_failure("blob link", e))?;
        Self::counted(&growing, size);
        Ok(())
    }

    async fn commit(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        state: &mut Option<UploadState>,
    ) -> Result<(), OciError> {
        let size = self
            .blobs
            .upload_size(id)
            .await
            .map_err(|e| store_failure("upload size", e))?
            .ok_or_else(upload_unknown)?;
        let actual = match state.as_ref() {
            Some(s) if s.offset == size && s.digester.algorithm() == digest.algorithm() => s.digester.peek(),
            _ => self.rehash(id, digest.algorithm(), size).await?.finish(),
        };
        if &actual != digest {
            return Err(digest_mismatch(digest, &actual));
        }
        let growing = self.check_quotas(repo, digest, size).await?;
        self.hold(digest, size).await?;
        self.blobs.upload_commit(id, digest).await.map_err(|e| store_failure("upload commit", e))?;
        *state = None;
        self.meta.link_blob(repo, digest, size).await.map_err(|e| store_failure("blob link", e))?;
        Self::counted(&growing, size);
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, "cannot remove finished upload record: {e}");
        }
        Ok(())
    }

    /// Holds a verified blob about to be committed (see [`MetaStore::hold_blob`]); while a
    /// collection is deleting the same bytes, waits for it to finish, so the commit stores
    /// them again instead of keeping a copy that is about to go.
    async fn hold(&self, digest: &Digest, size: u64) -> Result<(), OciError> {
        for _ in 0..HOLD_ATTEMPTS {
            if self.meta.hold_blob(digest, size).await.map_err(|e| store_failure("blob hold", e))? {
                return Ok(());
            }
            tokio::time::sleep(HOLD_RETRY).await;
        }
        Err(OciError::new(ErrorCode::Unavailable, "garbage collection is removing this blob; finish the upload again")
            .with_header("retry-after", "5"))
    }

    /// Removes sessions untouched for longer than `expiry`, and sessions whose bytes have no
    /// record (a monolithic upload cut off by a crash) untouched for longer than
    /// `orphan_after` (zero at start-up, when no upload is in flight). With `dry_run`, only
    /// counts them.
    pub async fn sweep_uploads(&self, expiry: Duration, orphan_after: Duration, dry_run: bool) -> StoreResult<usize> {
        let mut removed = 0;
        let now = SystemTime::now();
        let listed = self.blobs.upload_list().await?;
        for (id, modified) in &listed {
            let age = now.duration_since(*modified).unwrap_or_default();
            let orphan = age >= orphan_after && self.meta.upload_repo(id).await?.is_none();
            let stale = age > expiry;
            if orphan || stale {
                if !dry_run {
                    // Under the session's lock, so no request of it is half done; and its
                    // lock and hash state go with it, or abandoned sessions would pile up.
                    let _guard = self.session_lock(id).lock_owned().await;
                    // A session a request on another node is writing to right now is not
                    // abandoned after all.
                    let Ok(_cluster) = self.cluster_session_lock(id, Duration::ZERO).await else { continue };
                    self.blobs.upload_delete(id).await?;
                    self.meta.delete_upload(id).await?;
                    self.forget_session(id);
                }
                removed += 1;
            }
        }
        // Sessions this node served that another node finished or cancelled: their lock and
        // hash state stay here otherwise, as nothing asks for them again.
        if !dry_run {
            let listed: std::collections::HashSet<&UploadId> = listed.iter().map(|(id, _)| id).collect();
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.retain(|id, lock| listed.contains(id) || Arc::strong_count(lock) > 1);
        }
        // A commit cut off between starting and completing an object store's multipart
        // copy leaves its parts there: gone with the sessions that expire at the same age.
        if !dry_run && let Some(cutoff) = now.checked_sub(expiry) {
            let aborted = self.blobs.sweep_interrupted_commits(cutoff).await?;
            if aborted > 0 {
                tracing::info!("aborted {aborted} multipart upload(s) that interrupted commits left");
            }
        }
        Ok(removed)
    }
}

fn digest_mismatch(expected: &Digest, actual: &Digest) -> OciError {
    OciError::new(ErrorCode::DigestInvalid, "uploaded content does not match the digest")
        .with_detail(json!({ "expected": expected.to_string(), "actual": actual.to_string() }))
}

/// A chunk must start where the session stands, and its range and length must agree.
fn check_chunk(size: u64, content_range: Option<ByteRange>, content_length: Option<u64>) -> Result<(), OciError> {
    let Some(range) = content_range else {
        return Ok(());
    };
    if range.start != size {
        return Err(OciError::new(
            ErrorCode::UploadRangeInvalid,
            format!("chunk starts at {} but the upload holds {size} bytes", range.start),
        )
        .with_header("range", range_header(size)));
    }
    if let Some(len) = content_length
        && len != range.len()
    {
        return Err(OciError::new(ErrorCode::SizeInvalid, "Content-Length does not match Content-Range"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_registry as registry;

    fn sessions(r: &Registry) -> usize {
        r.sessions.lock().unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn probing_unknown_sessions_keeps_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let repo: RepoName = "a".parse().unwrap();
        for _ in 0..100 {
            let e = r.upload_status(&repo, &UploadId::random()).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::BlobUploadUnknown);
        }
        assert_eq!(sessions(&r), 0);

        // A real session keeps its state, also when asked for under another repository.
        let UploadStart::Session(id) = r.upload_start(&repo, None).await.unwrap() else { panic!("expected a session") };
        let body = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"abc"))]);
        assert_eq!(r.upload_patch(&repo, &id, None, Some(3), body).await.unwrap(), 3);
        let other: RepoName = "b".parse().unwrap();
        assert_eq!(r.upload_status(&other, &id).await.unwrap_err().code, ErrorCode::BlobUploadUnknown);
        assert_eq!(sessions(&r), 1);
        let d = Digest::sha256_of(b"abc");
        r.upload_finish(&repo, &id, &d, None, Some(0), futures_util::stream::empty()).await.unwrap();
        assert_eq!(sessions(&r), 0, "a finished session is forgotten");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn another_process_continues_a_session_from_its_saved_hash_state() {
        let dir = tempfile::tempdir().unwrap();
        let repo: RepoName = "a".parse().unwrap();
        let (first, second) = (vec![7u8; 100_000], vec![9u8; 5_000]);
        let id = {
            let r = registry(dir.path());
            let UploadStart::Session(id) = r.upload_start(&repo, None).await.unwrap() else { panic!("a session") };
            let body = futures_util::stream::iter(vec![Ok(Bytes::from(first.clone()))]);
            r.upload_patch(&repo, &id, None, None, body).await.unwrap();
            id
        };
        // A fresh registry over the same stores (a restart, or another node) knows nothing
        // of the session in memory. The stored bytes are spoiled behind its back: only a
        // hash continued from the saved state, which never reads them, still matches.
        let data = dir.path().join("uploads").join(id.as_str()).join("data");
        std::fs::write(&data, vec![0u8; first.len()]).unwrap();
        let r = registry(dir.path());
        let body = futures_util::stream::iter(vec![Ok(Bytes::from(second.clone()))]);
        assert_eq!(r.upload_patch(&repo, &id, None, None, body).await.unwrap(), 105_000);
        let digest = Digest::sha256_of(&[first, second].concat());
        r.upload_finish(&repo, &id, &digest, None, Some(0), futures_util::stream::empty()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_small_blob_sent_whole_is_verified_and_stored_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let repo: RepoName = "a".parse().unwrap();
        let whole = |bytes: &'static [u8]| futures_util::stream::iter(vec![Ok(Bytes::from_static(bytes))]);
        let right = Digest::sha256_of(b"small");

        // POST ?digest= with the whole body.
        let wrong = Digest::sha256_of(b"other");
        let e = r.upload_monolithic(&repo, &wrong, Some(5), whole(b"small")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert_eq!(r.blobs.stat(&wrong).await.unwrap(), None);
        assert_eq!(r.blobs.stat(&right).await.unwrap(), None, "nothing stored under either digest");
        r.upload_monolithic(&repo, &right, Some(5), whole(b"small")).await.unwrap();
        assert_eq!(r.blob_size(&repo, &right).await.unwrap(), 5);

        // POST, then PUT with the whole body: the empty session goes with it.
        let other: RepoName = "b".parse().unwrap();
        let UploadStart::Session(id) = r.upload_start(&other, None).await.unwrap() else { panic!("a session") };
        let e = r.upload_finish(&other, &id, &wrong, None, Some(5), whole(b"small")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert_eq!(r.upload_status(&other, &id).await.unwrap_err().code, ErrorCode::BlobUploadUnknown);
        let UploadStart::Session(id) = r.upload_start(&other, None).await.unwrap() else { panic!("a session") };
        r.upload_finish(&other, &id, &right, None, Some(5), whole(b"small")).await.unwrap();
        assert_eq!(r.blob_size(&other, &right).await.unwrap(), 5);
        assert!(r.blobs.upload_list().await.unwrap().is_empty(), "no session is left");
        assert_eq!(sessions(&r), 0);

        // A body that breaks stores nothing; the session stays for a retry.
        let UploadStart::Session(id) = r.upload_start(&other, None).await.unwrap() else { panic!("a session") };
        let broken = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"sm")), Err(io::Error::other("gone"))]);
        let e = r.upload_finish(&other, &id, &right, None, Some(5), broken).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::BlobUploadInvalid);
        assert_eq!(r.upload_status(&other, &id).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn expired_sessions_are_forgotten_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let repo: RepoName = "a".parse().unwrap();
        for _ in 0..5 {
            let UploadStart::Session(id) = r.upload_start(&repo, None).await.unwrap() else { panic!("a session") };
            let body = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"abandoned"))]);
            r.upload_patch(&repo, &id, None, None, body).await.unwrap();
        }
        assert_eq!(sessions(&r), 5);
        assert_eq!(r.sweep_uploads(Duration::ZERO, Duration::ZERO, false).await.unwrap(), 5);
        assert_eq!(sessions(&r), 0, "a swept session leaves no lock or hash state behind");
        assert!(r.blobs.upload_list().await.unwrap().is_empty());
    }
}
