//! Storage contracts and their embedded backends.
//!
//! [`BlobStore`] keeps bytes by digest plus an area for upload sessions; [`MetaStore`] keeps
//! everything else (repositories, blob links, manifests, tags, upload records) and changes
//! it only in whole transactions. Neither knows HTTP. Every backend runs the same
//! [`conformance`] suite.

pub mod blob_cache;
pub mod cached;
pub mod cluster;
pub mod conformance;
pub mod fs;
pub mod postgres;
pub mod s3;
pub mod sqlite;

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use tessera_spec::{Digest, RepoName, Tag};

pub use blob_cache::CachedBlobStore;
pub use cached::CachedMetaStore;
pub use cluster::{ChangeNews, Changed, ClusterGuard, ClusterLocks, PostgresCluster, lock_within};
pub use fs::FsBlobStore;
pub use postgres::PostgresMetaStore;
pub use s3::{S3BlobStore, S3Settings};
pub use sqlite::SqliteMetaStore;

/// A stream of bytes, as received from a client or read from a store.
pub type ByteStream<'a> = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'a>>;

/// An upload session id: 32 lowercase hex characters. Checked on parse, so it is safe as a
/// storage key and no client-chosen string ever becomes a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId(String);

impl UploadId {
    pub fn random() -> Self {
        UploadId(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UploadId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(UploadId(s.to_string()))
        } else {
            Err(())
        }
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blob as [`BlobStore::list`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    pub stored: SystemTime,
}

/// A readable blob (or part of one): its length and its bytes.
pub struct BlobRead {
    pub len: u64,
    pub body: ByteStream<'static>,
}

/// Why appending to an upload stopped.
#[derive(Debug)]
pub enum AppendError {
    /// The incoming stream failed (client went away, limit exceeded). What arrived before
    /// the failure is kept: the upload can be resumed from its reported size.
    Source(io::Error),
    /// The store could not write (disk full, I/O error).
    Storage(io::Error),
}

/// Why a store did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A write needs something that is not (or no longer) there: a blob link, a child
    /// manifest, a blob being collected. Nothing was stored.
    #[error("{0}")]
    Missing(String),
    /// The caller's claim contradicts what is stored (an external link's size against the
    /// bytes held here). Nothing was stored.
    #[error("{0}")]
    Contradicts(String),
    /// No space left for the write (disk, database or bucket).
    #[error("storage is full: {0}")]
    Full(#[source] io::Error),
    /// A store across the network (an object store, a database server) cannot be reached
    /// or is not answering now; it may come back by itself.
    #[error("storage is unreachable: {0}")]
    Unreachable(#[source] io::Error),
    /// The disk, the database, or the way to them failed.
    #[error(transparent)]
    Backend(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> StoreError {
        use io::ErrorKind::*;
        match e.kind() {
            StorageFull => StoreError::Full(e),
            ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut | HostUnreachable
            | NetworkUnreachable => StoreError::Unreachable(e),
            _ => StoreError::Backend(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Bytes by digest, and the scratch area of upload sessions.
///
/// Contract: a blob is visible under a digest only after [`BlobStore::upload_commit`] has
/// moved fully written, durable bytes there; committing a digest that already exists keeps
/// the existing copy (create-only), so concurrent pushes of one blob end with one copy.
/// The store trusts the caller to have verified the digest.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size of the blob, if present.
    async fn stat(&self, digest: &Digest) -> io::Result<Option<u64>>;
    /// Reads `[start, end]` (inclusive) of the blob, or all of it.
    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>>;
    /// Removes the blob's bytes. Returns whether it existed.
    async fn delete(&self, digest: &Digest) -> io::Result<bool>;
    /// Every blob held, with its size and when it was stored.
    async fn list(&self) -> io::Result<Vec<StoredBlob>>;

    /// Starts an empty upload session.
    async fn upload_create(&self, id: &UploadId) -> io::Result<()>;
    /// Bytes received so far by the session, or `None` if it does not exist.
    async fn upload_size(&self, id: &UploadId) -> io::Result<Option<u64>>;
    /// Appends everything `data` yields and returns the new size. With `durable`, the bytes
    /// are on stable storage when it returns (an upload chunk the client is told was
    /// received); without, only readable (a cache fill, made durable by its commit).
    async fn upload_append(&self, id: &UploadId, data: ByteStream<'_>, durable: bool) -> Result<u64, AppendError>;
    /// Reads back what the session holds from byte `start` to its size when called (used
    /// to rebuild hash state after a restart, and to follow a cache fill as it grows).
    async fn upload_read(&self, id: &UploadId, start: u64) -> io::Result<ByteStream<'static>>;
    /// Makes the session's bytes the blob `digest` and ends the session.
    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> io::Result<()>;
    /// Stores `bytes`, already verified to be `digest`, as that blob, whole or not at all:
    /// for a small blob received in one request. By default through a session of its own;
    /// a store that writes an object in one request does that instead (S3: one `PUT`
    /// where a session costs a marker, a part, a copy and its deletions).
    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> io::Result<()> {
        let id = UploadId::random();
        self.upload_create(&id).await?;
        let body: ByteStream = Box::pin(futures_util::stream::once(async move { Ok(bytes) }));
        let stored = match self.upload_append(&id, body, true).await {
            Ok(_) => self.upload_commit(&id, digest).await,
            Err(AppendError::Source(e) | AppendError::Storage(e)) => Err(e),
        };
        if stored.is_err() {
            let _ = self.upload_delete(&id).await;
        }
        stored
    }
    /// Ends the session and drops its bytes. Missing sessions are fine.
    async fn upload_delete(&self, id: &UploadId) -> io::Result<()>;
    /// All sessions with their last-modified time.
    async fn upload_list(&self) -> io::Result<Vec<(UploadId, SystemTime)>>;
    /// Keeps `state`, a hasher's saved state after the session's first `offset` bytes, in
    /// place of any earlier one, so that a restarted (or another) node continues the hash
    /// without reading back what was hashed. Missing sessions are an error.
    async fn upload_save_hash(&self, id: &UploadId, offset: u64, state: &[u8]) -> io::Result<()>;
    /// The session's last saved hash state and the offset it covers, if any.
    async fn upload_load_hash(&self, id: &UploadId) -> io::Result<Option<(u64, Vec<u8>)>>;

    /// Removes what a commit cut off before `started_before` left outside any session (an
    /// object store's unfinished multipart uploads) and returns how many; nothing to do
    /// for a store whose commit is one atomic step.
    async fn sweep_interrupted_commits(&self, _started_before: SystemTime) -> io::Result<usize> {
        Ok(0)
    }

    /// A URL that lets its holder GET the blob straight from the store for `valid_for`,
    /// where the store can hand one out (an object store's presigned URL); `None` otherwise.
    /// Signing is local: nothing is asked of the store, so the blob may not exist.
    fn presigned_get(&self, _digest: &Digest, _valid_for: std::time::Duration) -> Option<String> {
        None
    }

    /// Requests sent to an object store so far, for a store that talks to one (what a
    /// request costs the shared store).
    fn requests_sent(&self) -> Option<u64> {
        None
    }
}

/// A saved hash state as stored: the offset it covers in decimal, a newline, the state.
fn encode_hash_state(offset: u64, state: &[u8]) -> Vec<u8> {
    [format!("{offset}\n").as_bytes(), state].concat()
}

/// The offset and state [`encode_hash_state`] stored; `None` for anything else.
fn decode_hash_state(stored: &[u8]) -> Option<(u64, Vec<u8>)> {
    let newline = stored.iter().position(|&b| b == b'\n')?;
    let offset = std::str::from_utf8(&stored[..newline]).ok()?.parse().ok()?;
    Some((offset, stored[newline + 1..].to_vec()))
}

/// A manifest as stored: exact bytes plus what queries need.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    /// The manifest's own annotations as a JSON object (carried into referrer descriptors).
    pub annotations_json: Option<String>,
    /// Blobs the manifest references that must be linked into the repository when it is
    /// stored: checked in the storing transaction and kept as its references, which
    /// garbage collection follows. Empty where manifests arrive before their blobs (a cache)
    /// and in records read back.
    pub blobs: Vec<Digest>,
    /// Likewise for the manifests an index lists, which must be stored in the repository.
    pub children: Vec<Digest>,
}

impl ManifestRecord {
    /// The record of a parsed manifest whose bytes hash to `digest`.
    pub fn new(digest: Digest, bytes: Bytes, parsed: &tessera_spec::ParsedManifest) -> ManifestRecord {
        ManifestRecord {
            digest,
            media_type: parsed.media_type.clone(),
            bytes,
            subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
            artifact_type: parsed.artifact_type.clone(),
            annotations_json: (!parsed.annotations.is_empty())
                .then(|| serde_json::to_string(&parsed.annotations).unwrap_or_default()),
            blobs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// The same record, requiring (and referencing) the config and every layer of `parsed`,
    /// and every manifest it lists if it is an index.
    pub fn with_references(mut self, parsed: &tessera_spec::ParsedManifest) -> ManifestRecord {
        self.blobs = parsed.config.iter().chain(&parsed.layers).map(|d| d.digest.clone()).collect();
        self.blobs.sort();
        self.blobs.dedup();
        self.children = parsed.manifests.iter().map(|d| d.digest.clone()).collect();
        self.children.sort();
        self.children.dedup();
        self
    }
}

/// What one garbage collection pass found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    /// Tags retention rules untagged (`name:tag`).
    pub tags_untagged: Vec<String>,
    /// Untagged manifests nothing kept (only when asked to delete them).
    pub manifests_deleted: u64,
    /// Links no manifest of their repository references, made before the grace period.
    pub links_removed: u64,
    /// Blobs whose bytes were deleted (no link, not held during the grace period).
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    /// Upload sessions left idle past their expiry.
    pub uploads_removed: u64,
    /// Another node of the cluster was collecting: this pass did nothing.
    pub elsewhere: bool,
}

/// One page of a listing, and whether more follows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

/// A repository with what the pages say of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoSummary {
    pub name: RepoName,
    pub tags: u64,
    /// Bytes of the distinct blobs it links that are held here (not those living elsewhere).
    pub bytes: u64,
    /// When one of its tags was last pointed at a new manifest.
    pub pushed: Option<SystemTime>,
}

/// The first `limit` of `items` (one more was asked for), and whether more follow.
fn page(mut items: Vec<String>, limit: usize) -> Page {
    let more = items.len() > limit;
    items.truncate(limit);
    Page { items, more }
}

/// Seconds since the epoch, as the metadata stores keep creation times.
fn now() -> i64 {
    millis(SystemTime::now()) / 1000
}

/// Milliseconds since the epoch, as the metadata stores keep link, hold and check times.
fn millis(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn now_ms() -> i64 {
    millis(SystemTime::now())
}

/// The time a stored millisecond count stands for.
fn time_of_ms(ms: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Metadata: repositories, blob links, manifests, tags, referrers and upload records.
///
/// A tag, where it points and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub repo: RepoName,
    pub tag: Tag,
    pub digest: Digest,
    /// When the tag was created or last moved to another manifest.
    pub pushed: SystemTime,
}

impl RepoSummary {
    /// A summary read back from a store's columns.
    pub(crate) fn parse(name: &str, tags: i64, bytes: i64, pushed_ms: Option<i64>) -> StoreResult<RepoSummary> {
        Ok(RepoSummary {
            name: name
                .parse()
                .map_err(|_| StoreError::Backend(io::Error::other("stored repository name is invalid")))?,
            tags: tags.max(0) as u64,
            bytes: bytes.max(0) as u64,
            pushed: pushed_ms.map(time_of_ms),
        })
    }
}

impl TagRecord {
    /// A record read back from a store's columns.
    pub(crate) fn parse(repo: &str, tag: &str, digest: &str, pushed_ms: i64) -> StoreResult<TagRecord> {
        let bad = |what: &str| StoreError::Backend(io::Error::other(format!("stored {what} is invalid")));
        Ok(TagRecord {
            repo: repo.parse().map_err(|_| bad("repository name"))?,
            tag: tag.parse().map_err(|_| bad("tag"))?,
            digest: digest.parse().map_err(|_| bad("digest"))?,
            pushed: time_of_ms(pushed_ms),
        })
    }
}

/// Contract: every write is one transaction; readers never see half of one. A blob is
/// visible in a repository only through a link. Repositories come into being with their
/// first link, manifest or upload.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Size of `digest` if it is linked into `repo`.
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<u64>>;
    /// Size of `digest` if any repository links it to bytes held here.
    async fn blob_known(&self, digest: &Digest) -> StoreResult<Option<u64>>;
    /// Links a blob of `size` bytes into `repo` (idempotent).
    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> StoreResult<()>;
    /// Links a blob whose bytes live elsewhere, at `urls` (a foreign layer, or a layer
    /// pushed metadata-only), with the size this link claims (it stays the link's own: it
    /// is never taken as the blob's size for others). A link to bytes held here stays as
    /// it is. Fails with [`StoreError::Contradicts`] when the bytes are held here with another size.
    async fn link_external(&self, repo: &RepoName, digest: &Digest, size: u64, urls: &[String]) -> StoreResult<()>;
    /// Where the bytes of a blob linked into `repo` live, when not here; empty otherwise.
    async fn blob_urls(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<String>>;
    /// Removes the link; returns whether there was one.
    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> StoreResult<bool>;
    /// Bytes of the distinct blobs held here that repositories under `prefix` link (each
    /// blob once, however many of them link it; blobs living elsewhere not counted). The
    /// prefix covers whole name components, as [`tessera_spec::name::prefix_covers`]; `""`
    /// covers every repository.
    async fn bytes_under(&self, prefix: &str) -> StoreResult<u64>;
    /// Whether a repository under `prefix` links `digest` to bytes held here.
    async fn linked_under(&self, prefix: &str, digest: &Digest) -> StoreResult<bool>;
    /// Every tag of the repositories under `prefix` (as [`MetaStore::bytes_under`]), with
    /// when it was last pointed at a new manifest, by repository and tag.
    async fn tags_under(&self, prefix: &str) -> StoreResult<Vec<TagRecord>>;
    /// At most `limit` repositories in name order after `last` whose names contain
    /// `containing` (every one when empty), with their figures; and whether more follow.
    async fn repository_summaries(
        &self,
        last: Option<&str>,
        containing: &str,
        limit: usize,
    ) -> StoreResult<(Vec<RepoSummary>, bool)>;
    /// The tags of `repo` (of every repository when `None`), the most recently pushed first
    /// (then by repository and tag), skipping `skip`, at most `limit`.
    async fn recent_tags(&self, repo: Option<&RepoName>, skip: usize, limit: usize) -> StoreResult<Vec<TagRecord>>;
    /// Deletes `tag` if it still points at `digest` (a push that moved it meanwhile wins).
    async fn untag_if(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> StoreResult<bool>;
    /// Keeps a simple signature of the manifest `digest` under `name`; `false` when that
    /// name holds it already. Another content under a name already used is refused with
    /// [`StoreError::Contradicts`]: a signature, once stored, does not change.
    async fn add_signature(&self, repo: &RepoName, digest: &Digest, name: &str, content: &[u8]) -> StoreResult<bool>;
    /// The simple signatures of the manifest `digest` in `repo` (name, content), in the
    /// order they were added.
    async fn signatures(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<(String, Bytes)>>;
    /// The indexes in `repo` that list the manifest `digest`, oldest first, at most `limit`.
    async fn parents(&self, repo: &RepoName, digest: &Digest, limit: usize) -> StoreResult<Vec<Digest>>;

    /// Records that a signature rule vouches for `digests` of `repo` under `scope` (the
    /// rule, the route and what they are: the manifests a signed index lists, the blobs of
    /// a signed image) until `until`, so that every node sharing this store admits them,
    /// not only the one that checked the signature. Of two records of one, the later end
    /// holds: each comes from a pass of its own (two images sharing a layer, one signed by
    /// a key that expires sooner), and a rule with other keys has another scope. Not
    /// durable: a crash may forget the last ones, which costs a signature check again.
    async fn record_vouches(
        &self,
        scope: &str,
        repo: &RepoName,
        digests: &[Digest],
        until: SystemTime,
    ) -> StoreResult<()>;
    /// Until when `digest` of `repo` is vouched for under `scope`; `None` when it is not,
    /// or no longer.
    async fn vouched(&self, scope: &str, repo: &RepoName, digest: &Digest) -> StoreResult<Option<SystemTime>>;
    /// Forgets the vouches that have ended; returns how many.
    async fn forget_vouches(&self) -> StoreResult<u64>;

    /// Stores a manifest (idempotent by digest) and, if given, points `tag` at it, in one
    /// transaction. Fails with [`StoreError::Missing`], storing nothing, when a digest of
    /// `manifest.blobs` is not linked into `repo`, or one of `manifest.children` is not
    /// stored there, at that moment.
    async fn put_manifest(&self, repo: &RepoName, manifest: &ManifestRecord, tag: Option<&Tag>) -> StoreResult<()>;
    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<ManifestRecord>>;
    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<Digest>>;
    /// Deletes a manifest and every tag pointing at it. Returns the removed tags, or `None`
    /// if there was no such manifest.
    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<Vec<Tag>>>;
    /// Removes one tag; returns whether it existed.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<bool>;
    /// Records when an existing tag was last confirmed by its source (caches use this to
    /// bound how stale an answer may be, across restarts).
    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, at: SystemTime) -> StoreResult<()>;
    /// When the tag was last confirmed, if it exists and ever was.
    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<SystemTime>>;
    /// Tags in lexical order after `last`, at most `limit`; `None` if the repository is unknown.
    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> StoreResult<Option<Page>>;
    /// Repository names in lexical order after `last`, at most `limit`.
    async fn catalog(&self, last: Option<&str>, limit: usize) -> StoreResult<Page>;
    /// Manifests in `repo` whose subject is `subject`, oldest first.
    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> StoreResult<Vec<ManifestRecord>>;

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> StoreResult<()>;
    /// The repository an upload session belongs to.
    async fn upload_repo(&self, id: &UploadId) -> StoreResult<Option<RepoName>>;
    async fn delete_upload(&self, id: &UploadId) -> StoreResult<()>;

    // Garbage collection. A blob's bytes may be deleted once nothing links them and nobody
    // held them during the grace period; every path that is about to link bytes it found or
    // kept in the blob store holds them first, so collection can never delete bytes a link
    // is about to name (see docs/architecture.md).

    /// Holds `digest` (`size` bytes): a collection will not doom it for a grace period from
    /// now. `false` while a collection is deleting its bytes: wait until it has finished.
    async fn hold_blob(&self, digest: &Digest, size: u64) -> StoreResult<bool>;
    /// Deletes manifests stored before `cutoff` that nothing keeps: no tag, no index of the
    /// repository listing them, no subject stored in the repository (a referrer lives as
    /// long as its subject). Repeats until nothing more goes (an index deleted frees its
    /// children) and returns what was deleted.
    async fn delete_untagged(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>>;
    /// Removes links made before `cutoff` that no manifest of their repository references,
    /// and returns them.
    async fn unlink_unreferenced(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>>;
    /// Dooms up to `limit` blobs that nothing links and nobody held since `cutoff`, and
    /// each of `stored` (bytes held before `cutoff`) that has no record at all; returns
    /// everything doomed, including what an interrupted collection left. Doomed blobs can
    /// be neither held nor linked until [`MetaStore::forget_doomed`].
    async fn doom_unlinked(&self, cutoff: SystemTime, stored: &[Digest], limit: usize) -> StoreResult<Vec<Digest>>;
    /// Ends the doom of blobs whose bytes are gone.
    async fn forget_doomed(&self, digests: &[Digest]) -> StoreResult<()>;

    /// Statements and transactions sent to a database server so far, for a store that
    /// talks to one (what a request costs the shared database).
    fn queries_sent(&self) -> Option<u64> {
        None
    }

    /// Write transactions among [`MetaStore::queries_sent`] (they take turns: see the
    /// PostgreSQL store).
    fn writes_sent(&self) -> Option<u64> {
        None
    }
}
