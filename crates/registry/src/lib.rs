//! Hosted repositories: the operations of the OCI Distribution API over a [`BlobStore`] and
//! a [`MetaStore`], with every rule the spec sets on them (digest verification, upload
//! offsets, manifest references, tags, referrers, deletes). No HTTP here: inputs are typed
//! values and byte streams, outputs are data or an [`OciError`] from the one error table.

pub mod copy;
pub mod gc;
pub mod quota;
pub mod retention;
pub mod signatures;
pub mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::json;
use tessera_spec::manifest::{ManifestKind, media};
use tessera_spec::{
    Accept, ByteRange, Digest, ErrorCode, OciError, Paging, ParsedManifest, RangeRequest, Reference, RepoName,
};
use tessera_store::{BlobRead, BlobStore, ClusterLocks, ManifestRecord, MetaStore, Page, StoreError, UploadId};

use uploads::UploadState;

/// Limits and switches of a hosted registry.
#[derive(Debug, Clone)]
pub struct Settings {
    pub manifest_max_bytes: u64,
    /// 0 = unlimited.
    pub blob_max_bytes: u64,
    pub delete_enabled: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { manifest_max_bytes: 4 * 1024 * 1024, blob_max_bytes: 0, delete_enabled: true }
    }
}

/// The most entries one tags or catalog page returns, whatever `n` asks for.
pub const MAX_PAGE: usize = 100_000;

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    settings: Settings,
    /// Per upload session: a lock serialising its requests, holding the running hash.
    sessions: Mutex<HashMap<UploadId, Arc<tokio::sync::Mutex<Option<UploadState>>>>>,
    /// With other nodes on the same stores: the locks they respect too (upload sessions,
    /// garbage collection).
    cluster: Option<Arc<dyn ClusterLocks>>,
    /// Bytes stored per name prefix, at most.
    quotas: Vec<quota::Counted>,
}

/// A blob ready to send: the part to send (if ranged) and the bytes.
pub struct BlobAnswer {
    pub size: u64,
    pub range: Option<ByteRange>,
    pub read: BlobRead,
}

/// Where a blob linked into a repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobAt {
    /// Its bytes are in this registry's blob store.
    Here(u64),
    /// Its bytes live at these URLs (a foreign layer, or a metadata-only push).
    Elsewhere { size: u64, urls: Vec<String> },
}

/// An opened blob, or the URLs its bytes live at.
pub enum Opened {
    Bytes(BlobAnswer),
    Elsewhere(Vec<String>),
}

/// Result of `POST .../blobs/uploads/`.
pub enum UploadStart {
    /// The blob was mounted or uploaded whole; it is now in the repository.
    Created(Digest),
    /// A session was opened.
    Session(UploadId),
}

/// A stored manifest pushed successfully.
pub struct ManifestPut {
    pub digest: Digest,
    pub media_type: String,
    pub subject: Option<Digest>,
}

/// The referrers index, and whether an `artifactType` filter was applied.
pub struct Referrers {
    pub index: Bytes,
    pub filtered: bool,
}

impl Referrers {
    /// An index listing no referrers.
    pub fn empty(filtered: bool) -> Referrers {
        Self::of(Vec::new(), filtered)
    }

    /// An index listing these descriptors.
    pub fn of(descriptors: Vec<serde_json::Value>, filtered: bool) -> Referrers {
        Referrers { index: referrers_index(descriptors), filtered }
    }
}

fn referrers_index(manifests: Vec<serde_json::Value>) -> Bytes {
    Bytes::from(json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests }).to_string())
}

/// Logs a store failure once, with its cause, and turns it into the client-safe error: 503
/// with `Retry-After` when storage is full or unreachable, 500 otherwise.
pub fn store_failure(context: &str, e: impl Into<StoreError>) -> OciError {
    match e.into() {
        full @ StoreError::Full(_) => {
            tracing::error!("{context}: {full}");
            OciError::new(ErrorCode::Unavailable, "storage is full").with_header("retry-after", "60")
        }
        gone @ StoreError::Unreachable(_) => {
            tracing::error!("{context}: {gone}");
            OciError::new(ErrorCode::Unavailable, "storage is unreachable; try again shortly")
                .with_header("retry-after", "5")
        }
        e => {
            tracing::error!("{context}: {e}");
            OciError::internal()
        }
    }
}

fn blob_unknown(digest: &Digest) -> OciError {
    OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry")
        .with_detail(json!({ "digest": digest.to_string() }))
}

fn manifest_unknown(reference: &Reference) -> OciError {
    OciError::new(ErrorCode::ManifestUnknown, "manifest unknown")
        .with_detail(json!({ "reference": reference.to_string() }))
}

fn deletes_disabled() -> OciError {
    OciError::new(ErrorCode::Unsupported, "deletes are disabled on this registry")
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, settings: Settings) -> Self {
        Registry { blobs, meta, settings, sessions: Mutex::new(HashMap::new()), cluster: None, quotas: Vec::new() }
    }

    /// The registry with `quotas` on what name prefixes store.
    pub fn with_quotas(mut self, quotas: Vec<quota::Quota>) -> Self {
        self.quotas = quotas.into_iter().map(quota::Counted::new).collect();
        self
    }

    /// The registry as one node of a cluster: requests of an upload session, and garbage
    /// collection passes, are serialised across every node through `locks`.
    pub fn in_cluster(mut self, locks: Arc<dyn ClusterLocks>) -> Self {
        self.cluster = Some(locks);
        self
    }

    /// Whether both stores answer now (for a load balancer's readiness probe): `Err` names
    /// the one that does not, without the cause (which may name internal addresses, and
    /// the probe needs no login); the cause is logged at debug level.
    pub async fn check_stores(&self) -> Result<(), &'static str> {
        let absent = Digest::sha256_of(b"");
        let (meta, blobs) = tokio::join!(self.meta.catalog(None, 1), self.blobs.stat(&absent));
        if let Err(e) = meta {
            tracing::debug!("not ready: metadata store: {e}");
            return Err("the metadata store does not answer");
        }
        if let Err(e) = blobs {
            tracing::debug!("not ready: blob store: {e}");
            return Err("the blob store does not answer");
        }
        if self.cluster.as_ref().is_some_and(|c| !c.connected()) {
            return Err("no connection to the metadata store for cluster coordination");
        }
        Ok(())
    }

    /// The metadata store, shared by every node of a cluster.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// The locks of the cluster this node is one of, if any.
    pub fn cluster(&self) -> Option<&Arc<dyn ClusterLocks>> {
        self.cluster.as_ref()
    }

    /// Statements and transactions sent to the metadata database so far, if it is a server.
    pub fn metadata_queries(&self) -> Option<u64> {
        self.meta.queries_sent()
    }

    /// Write transactions among [`Registry::metadata_queries`].
    pub fn metadata_writes(&self) -> Option<u64> {
        self.meta.writes_sent()
    }

    /// Requests sent to the object store holding the blobs so far, if they are in one.
    pub fn blob_store_requests(&self) -> Option<u64> {
        self.blobs.requests_sent()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Size of a blob linked into `repo`.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, OciError> {
        self.meta
            .blob_link(repo, digest)
            .await
            .map_err(|e| store_failure("blob link lookup", e))?
            .ok_or_else(|| blob_unknown(digest))
    }

    /// Whether the blob store hands out presigned URLs (an object store).
    pub fn presigns(&self) -> bool {
        self.blobs.presigned_get(&Digest::sha256_of(b""), std::time::Duration::from_secs(1)).is_some()
    }

    /// A URL to GET `digest` straight from the blob store for `valid_for`, where the store
    /// can give one. The caller has checked that the blob is here and linked.
    pub fn presigned_blob_url(&self, digest: &Digest, valid_for: std::time::Duration) -> Option<String> {
        self.blobs.presigned_get(digest, valid_for)
    }

    /// Where a blob linked into `repo` is: here, or at other URLs (metadata only). Two
    /// metadata lookups, both cached. A link that names URLs never serves bytes held here
    /// for another repository: only its own push of the bytes makes it local.
    pub async fn blob_at(&self, repo: &RepoName, digest: &Digest) -> Result<BlobAt, OciError> {
        let size = self.blob_size(repo, digest).await?;
        let urls = self.meta.blob_urls(repo, digest).await.map_err(|e| store_failure("blob urls lookup", e))?;
        if urls.is_empty() { Ok(BlobAt::Here(size)) } else { Ok(BlobAt::Elsewhere { size, urls }) }
    }

    /// Opens a blob linked into `repo`, honouring a `Range` header; or says where it lives.
    pub async fn blob_get(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
    ) -> Result<Opened, OciError> {
        let size = match self.blob_at(repo, digest).await? {
            BlobAt::Here(size) => size,
            BlobAt::Elsewhere { urls, .. } => return Ok(Opened::Elsewhere(urls)),
        };
        let range = RangeRequest::resolve_opt(range, size)?;
        let read = self
            .blobs
            .read(digest, range.map(|r| (r.start, r.end)))
            .await
            .map_err(|e| store_failure("blob read", e))?
            .ok_or_else(|| {
                tracing::error!(%repo, %digest, "blob is linked but its bytes are missing from the blob store");
                blob_unknown(digest)
            })?;
        Ok(Opened::Bytes(BlobAnswer { size, range, read }))
    }

    /// Records that `digest` (`size` bytes) lives at `urls` and links it into `repo`: the
    /// metadata-only push of a layer already on a CDN. Which URLs are acceptable is the
    /// caller's policy.
    pub async fn blob_put_external(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        urls: &[String],
    ) -> Result<(), OciError> {
        if urls.is_empty() {
            return Err(OciError::new(ErrorCode::LocationInvalid, "a blob stored elsewhere needs at least one URL"));
        }
        self.link_external(repo, digest, size, urls).await
    }

    async fn link_external(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        urls: &[String],
    ) -> Result<(), OciError> {
        self.meta.link_external(repo, digest, size, urls).await.map_err(|e| match e {
            StoreError::Contradicts(why) => OciError::new(ErrorCode::SizeInvalid, format!("{digest}: {why}")),
            e => store_failure("external blob link", e),
        })
    }

    pub async fn blob_delete(&self, repo: &RepoName, digest: &Digest) -> Result<(), OciError> {
        if !self.settings.delete_enabled {
            return Err(deletes_disabled());
        }
        // Only the link goes: the bytes may be linked elsewhere, and reclaiming unlinked
        // bytes safely (against a push that just found them) is garbage collection's job.
        if self.meta.unlink_blob(repo, digest).await.map_err(|e| store_failure("blob unlink", e))? {
            Ok(())
        } else {
            Err(blob_unknown(digest))
        }
    }

    /// Links an existing blob into `repo` from `from` (or, without `from`, from any
    /// repository). `None` when it cannot be mounted, and the client should upload.
    pub async fn mount(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<Option<u64>, OciError> {
        let known = match from {
            Some(from) => self.meta.blob_link(from, digest).await,
            None => self.meta.blob_known(digest).await,
        }
        .map_err(|e| store_failure("mount lookup", e))?;
        let Some(size) = known else { return Ok(None) };
        // A blob that lives elsewhere mounts as the same record, and only as that.
        if let Some(from) = from {
            let urls = self.meta.blob_urls(from, digest).await.map_err(|e| store_failure("mount urls lookup", e))?;
            if !urls.is_empty() {
                self.link_external(repo, digest, size, &urls).await?;
                return Ok(Some(size));
            }
        }
        let growing = self.check_quotas(repo, digest, size).await?;
        // Held before the bytes are looked at, so a collection cannot delete them before the
        // link names them; bytes being collected are not mounted, the client uploads them.
        if !self.meta.hold_blob(digest, size).await.map_err(|e| store_failure("mount hold", e))?
            || self.blobs.stat(digest).await.map_err(|e| store_failure("mount stat", e))?.is_none()
        {
            return Ok(None);
        }
        self.meta.link_blob(repo, digest, size).await.map_err(|e| store_failure("mount link", e))?;
        Self::counted(&growing, size);
        Ok(Some(size))
    }

    /// Resolves a reference to the stored manifest, applying `Accept` to tag lookups:
    /// an index is not handed to a client that says it cannot read one.
    pub async fn manifest_get(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<ManifestRecord, OciError> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self
                .meta
                .resolve_tag(repo, t)
                .await
                .map_err(|e| store_failure("tag lookup", e))?
                .ok_or_else(|| manifest_unknown(reference))?,
        };
        let m = self
            .meta
            .get_manifest(repo, &digest)
            .await
            .map_err(|e| store_failure("manifest lookup", e))?
            .ok_or_else(|| manifest_unknown(reference))?;
        let is_index = m.media_type == media::OCI_INDEX || m.media_type == media::DOCKER_LIST;
        if matches!(reference, Reference::Tag(_)) && is_index && !accept.admits(&m.media_type) {
            return Err(OciError::new(
                ErrorCode::ManifestUnknown,
                format!("the tag names a {}, which the request's Accept header does not allow", m.media_type),
            ));
        }
        Ok(m)
    }

    /// Validates and stores a manifest. Every blob it needs and every child manifest of an
    /// index must already be in the repository.
    pub async fn manifest_put(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<ManifestPut, OciError> {
        if body.len() as u64 > self.settings.manifest_max_bytes {
            return Err(self.manifest_too_large());
        }
        let parsed = ParsedManifest::parse(content_type, &body)?;
        let (digest, tag) = match reference {
            Reference::Digest(d) => {
                let actual = Digest::of(d.algorithm(), &body);
                if &actual != d {
                    return Err(OciError::new(
                        ErrorCode::DigestInvalid,
                        "manifest content does not match the digest in the URL",
                    )
                    .with_detail(json!({ "expected": d.to_string(), "actual": actual.to_string() })));
                }
                (actual, None)
            }
            Reference::Tag(t) => (Digest::sha256_of(&body), Some(t)),
        };
        for d in parsed.required_blobs() {
            let size =
                self.meta.blob_link(repo, &d.digest).await.map_err(|e| store_failure("manifest blob check", e))?;
            check_reference(d, size, "blob")?;
        }
        if parsed.kind == ManifestKind::Index {
            for d in &parsed.manifests {
                let child = self
                    .meta
                    .get_manifest(repo, &d.digest)
                    .await
                    .map_err(|e| store_failure("manifest child check", e))?;
                check_reference(d, child.map(|c| c.bytes.len() as u64), "manifest")?;
            }
        }
        // Valid: layers that name their own URLs are linked as living there (unless this
        // repository links them already);
        // whether a client is sent to those URLs is the delivery policy's decision.
        for d in parsed.layers.iter().filter(|d| !d.urls.is_empty()) {
            let linked =
                self.meta.blob_link(repo, &d.digest).await.map_err(|e| store_failure("manifest blob check", e))?;
            if linked.is_none() {
                self.link_external(repo, &d.digest, d.size, &d.urls).await?;
            }
        }
        let record = ManifestRecord::new(digest.clone(), body, &parsed).with_references(&parsed);
        self.meta.put_manifest(repo, &record, tag).await.map_err(|e| match e {
            // A link checked above went away meanwhile (a delete, a collection).
            StoreError::Missing(why) => OciError::new(
                ErrorCode::ManifestBlobUnknown,
                format!("manifest references a blob unknown to this repository: {why}"),
            ),
            e => store_failure("manifest put", e),
        })?;
        Ok(ManifestPut { digest, media_type: record.media_type, subject: record.subject })
    }

    pub fn manifest_too_large(&self) -> OciError {
        OciError::new(
            ErrorCode::TooLarge,
            format!("manifest larger than the {} byte limit", self.settings.manifest_max_bytes),
        )
    }

    /// Deletes a manifest (by digest, with its tags) or a tag (by tag).
    pub async fn manifest_delete(&self, repo: &RepoName, reference: &Reference) -> Result<(), OciError> {
        if !self.settings.delete_enabled {
            return Err(deletes_disabled());
        }
        let found = match reference {
            Reference::Digest(d) => self.meta.delete_manifest(repo, d).await.map(|o| o.is_some()),
            Reference::Tag(t) => self.meta.delete_tag(repo, t).await,
        }
        .map_err(|e| store_failure("manifest delete", e))?;
        if found { Ok(()) } else { Err(manifest_unknown(reference)) }
    }

    /// Where `tag` points in `repo`, if anywhere.
    pub async fn manifest_digest(&self, repo: &RepoName, tag: &tessera_spec::Tag) -> Result<Option<Digest>, OciError> {
        self.meta.resolve_tag(repo, tag).await.map_err(|e| store_failure("tag lookup", e))
    }

    pub async fn tags(&self, repo: &RepoName, paging: &Paging) -> Result<Page, OciError> {
        let limit = paging.n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
        self.meta
            .list_tags(repo, paging.last.as_deref(), limit)
            .await
            .map_err(|e| store_failure("tags list", e))?
            .ok_or_else(|| {
                OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")
                    .with_detail(json!({ "name": repo.to_string() }))
            })
    }

    pub async fn catalog(&self, paging: &Paging) -> Result<Page, OciError> {
        let limit = paging.n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
        self.meta.catalog(paging.last.as_deref(), limit).await.map_err(|e| store_failure("catalog", e))
    }

    /// The referrers of `subject` in `repo` as an OCI image index (empty if none).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Referrers, OciError> {
        let found = self.meta.referrers(repo, subject).await.map_err(|e| store_failure("referrers", e))?;
        let manifests: Vec<serde_json::Value> = found
            .iter()
            .filter(|m| artifact_type.is_none() || m.artifact_type.as_deref() == artifact_type)
            .map(referrer_descriptor)
            .collect();
        Ok(Referrers { index: referrers_index(manifests), filtered: artifact_type.is_some() })
    }
}

/// The descriptor of a referrer manifest in a referrers index: media type, digest, size,
/// `artifactType` and the manifest's annotations.
pub fn referrer_descriptor(m: &ManifestRecord) -> serde_json::Value {
    let mut d = json!({ "mediaType": m.media_type, "digest": m.digest.to_string(), "size": m.bytes.len() });
    if let Some(t) = &m.artifact_type {
        d["artifactType"] = json!(t);
    }
    if let Some(a) = m.annotations_json.as_deref().and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok()) {
        d["annotations"] = a;
    }
    d
}

/// A descriptor's target must exist (`found` is its stored size) with the declared size.
fn check_reference(d: &tessera_spec::Descriptor, found: Option<u64>, what: &str) -> Result<(), OciError> {
    match found {
        None => Err(OciError::new(
            ErrorCode::ManifestBlobUnknown,
            format!("manifest references a {what} unknown to this repository"),
        )
        .with_detail(json!({ "digest": d.digest.to_string() }))),
        Some(size) if size != d.size => Err(OciError::new(
            ErrorCode::SizeInvalid,
            format!("descriptor says {} bytes but the {what} has {size}", d.size),
        )
        .with_detail(json!({ "digest": d.digest.to_string() }))),
        Some(_) => Ok(()),
    }
}

/// A registry over the embedded stores in `dir`, for this crate's tests.
#[cfg(test)]
fn test_registry(dir: &std::path::Path) -> Registry {
    Registry::new(
        Arc::new(tessera_store::FsBlobStore::open(dir).unwrap()),
        Arc::new(tessera_store::SqliteMetaStore::open(&dir.join("meta.sqlite")).unwrap()),
        Settings::default(),
    )
}
