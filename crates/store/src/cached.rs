//! [`CachedMetaStore`]: a MetaStore wrapper that answers repeated manifest, tag and blob-link
//! lookups from memory. Only found values are cached; every write through the wrapper
//! invalidates what it changes.
//!
//! A lookup that misses reads the inner store and fills the cache only if no write happened
//! meanwhile (a generation counter, checked and bumped under one lock), so a slow reader
//! can never put back a value a concurrent write just replaced. The cache is per process:
//! with several nodes on one shared MetaStore, each node's wrapper must [hear](CachedMetaStore::hear)
//! the others' changes (see [`crate::cluster`]).

use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use tessera_spec::{Digest, RepoName, Tag};

use crate::{ChangeNews, Changed, ManifestRecord, MetaStore, Page, RepoSummary, StoreResult, TagRecord, UploadId};

/// Rough fixed cost of an entry beyond its payload (keys, node overhead).
const ENTRY_OVERHEAD: u64 = 256;

#[derive(Clone)]
struct ByPayload;

impl Weighter<(RepoName, Digest), ManifestRecord> for ByPayload {
    fn weight(&self, _: &(RepoName, Digest), v: &ManifestRecord) -> u64 {
        v.bytes.len() as u64 + v.annotations_json.as_ref().map_or(0, |a| a.len() as u64) + ENTRY_OVERHEAD
    }
}

pub struct CachedMetaStore<M> {
    inner: M,
    manifests: Cache<(RepoName, Digest), ManifestRecord, ByPayload>,
    tags: Cache<(RepoName, Tag), Digest>,
    links: Cache<(RepoName, Digest), u64>,
    /// Where linked blobs live when not here (empty: here, or not linked).
    urls: Cache<(RepoName, Digest), Vec<String>>,
    /// Bumped by every invalidation; guards fills (see the module docs).
    generation: Mutex<u64>,
}

impl<M: MetaStore> CachedMetaStore<M> {
    /// Wraps `inner`, keeping about `bytes` of cached metadata.
    pub fn new(inner: M, bytes: u64) -> Self {
        let manifest_bytes = bytes / 4 * 3;
        let small_items = ((bytes / 8) / ENTRY_OVERHEAD).max(16) as usize;
        CachedMetaStore {
            inner,
            manifests: Cache::with_weighter((manifest_bytes / 4096).max(16) as usize, manifest_bytes.max(1), ByPayload),
            tags: Cache::new(small_items),
            links: Cache::new(small_items),
            urls: Cache::new(small_items),
            generation: Mutex::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fill<K, V, W>(&self, cache: &Cache<K, V, W>, seen: u64, key: K, value: &V)
    where
        K: Eq + std::hash::Hash + Clone,
        V: Clone,
        W: Weighter<K, V> + Clone,
    {
        let generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        if *generation == seen {
            cache.insert(key, value.clone());
        }
    }

    fn invalidate(&self, f: impl FnOnce()) {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *generation += 1;
        f();
    }

    /// Forgets what changes made elsewhere (another node on the same store) made stale.
    pub fn hear(&self, news: ChangeNews) {
        self.invalidate(|| match news {
            ChangeNews::Keys(keys) => {
                for key in keys {
                    match key {
                        Changed::Tag(repo, tag) => {
                            self.tags.remove(&(repo, tag));
                        }
                        Changed::Manifest(repo, digest) => {
                            self.manifests.remove(&(repo, digest));
                        }
                        Changed::Link(repo, digest) => {
                            let key = (repo, digest);
                            self.links.remove(&key);
                            self.urls.remove(&key);
                        }
                    }
                }
            }
            ChangeNews::Unknown => {
                self.manifests.clear();
                self.tags.clear();
                self.links.clear();
                self.urls.clear();
            }
        });
    }
}

#[async_trait]
impl<M: MetaStore> MetaStore for CachedMetaStore<M> {
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<u64>> {
        let key = (repo.clone(), digest.clone());
        if let Some(size) = self.links.get(&key) {
            return Ok(Some(size));
        }
        let seen = self.generation();
        let found = self.inner.blob_link(repo, digest).await?;
        if let Some(size) = &found {
            self.fill(&self.links, seen, key, size);
        }
        Ok(found)
    }

    async fn blob_known(&self, digest: &Digest) -> StoreResult<Option<u64>> {
        self.inner.blob_known(digest).await
    }

    async fn bytes_under(&self, prefix: &str) -> StoreResult<u64> {
        self.inner.bytes_under(prefix).await
    }

    async fn linked_under(&self, prefix: &str, digest: &Digest) -> StoreResult<bool> {
        self.inner.linked_under(prefix, digest).await
    }

    async fn add_signature(&self, repo: &RepoName, digest: &Digest, name: &str, content: &[u8]) -> StoreResult<bool> {
        self.inner.add_signature(repo, digest, name, content).await
    }

    async fn signatures(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<(String, bytes::Bytes)>> {
        self.inner.signatures(repo, digest).await
    }

    async fn parents(&self, repo: &RepoName, digest: &Digest, limit: usize) -> StoreResult<Vec<Digest>> {
        self.inner.parents(repo, digest, limit).await
    }

    async fn record_vouches(
        &self,
        scope: &str,
        repo: &RepoName,
        digests: &[Digest],
        until: SystemTime,
    ) -> StoreResult<()> {
        self.inner.record_vouches(scope, repo, digests, until).await
    }

    async fn vouched(&self, scope: &str, repo: &RepoName, digest: &Digest) -> StoreResult<Option<SystemTime>> {
        self.inner.vouched(scope, repo, digest).await
    }

    async fn forget_vouches(&self) -> StoreResult<u64> {
        self.inner.forget_vouches().await
    }

    async fn tags_under(&self, prefix: &str) -> StoreResult<Vec<TagRecord>> {
        self.inner.tags_under(prefix).await
    }

    async fn repository_summaries(
        &self,
        last: Option<&str>,
        containing: &str,
        limit: usize,
    ) -> StoreResult<(Vec<RepoSummary>, bool)> {
        self.inner.repository_summaries(last, containing, limit).await
    }

    async fn recent_tags(&self, repo: Option<&RepoName>, skip: usize, limit: usize) -> StoreResult<Vec<TagRecord>> {
        self.inner.recent_tags(repo, skip, limit).await
    }

    async fn untag_if(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> StoreResult<bool> {
        let untagged = self.inner.untag_if(repo, tag, digest).await?;
        self.invalidate(|| {
            self.tags.remove(&(repo.clone(), tag.clone()));
        });
        Ok(untagged)
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> StoreResult<()> {
        let linked = self.inner.link_blob(repo, digest, size).await;
        // A blob that lived elsewhere is now here, with its verified size.
        self.invalidate(|| {
            let key = (repo.clone(), digest.clone());
            self.links.remove(&key);
            self.urls.remove(&key);
        });
        linked
    }

    async fn link_external(&self, repo: &RepoName, digest: &Digest, size: u64, urls: &[String]) -> StoreResult<()> {
        let linked = self.inner.link_external(repo, digest, size, urls).await;
        self.invalidate(|| {
            let key = (repo.clone(), digest.clone());
            self.links.remove(&key);
            self.urls.remove(&key);
        });
        linked
    }

    async fn blob_urls(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<String>> {
        let key = (repo.clone(), digest.clone());
        if let Some(urls) = self.urls.get(&key) {
            return Ok(urls);
        }
        let seen = self.generation();
        let urls = self.inner.blob_urls(repo, digest).await?;
        self.fill(&self.urls, seen, key, &urls);
        Ok(urls)
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> StoreResult<bool> {
        let removed = self.inner.unlink_blob(repo, digest).await?;
        self.invalidate(|| {
            let key = (repo.clone(), digest.clone());
            self.links.remove(&key);
            self.urls.remove(&key);
        });
        Ok(removed)
    }

    async fn put_manifest(&self, repo: &RepoName, manifest: &ManifestRecord, tag: Option<&Tag>) -> StoreResult<()> {
        self.inner.put_manifest(repo, manifest, tag).await?;
        if let Some(tag) = tag {
            self.invalidate(|| {
                self.tags.remove(&(repo.clone(), tag.clone()));
            });
        }
        Ok(())
    }

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<ManifestRecord>> {
        let key = (repo.clone(), digest.clone());
        if let Some(m) = self.manifests.get(&key) {
            return Ok(Some(m));
        }
        let seen = self.generation();
        let found = self.inner.get_manifest(repo, digest).await?;
        if let Some(m) = &found {
            self.fill(&self.manifests, seen, key, m);
        }
        Ok(found)
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<Digest>> {
        let key = (repo.clone(), tag.clone());
        if let Some(d) = self.tags.get(&key) {
            return Ok(Some(d));
        }
        let seen = self.generation();
        let found = self.inner.resolve_tag(repo, tag).await?;
        if let Some(d) = &found {
            self.fill(&self.tags, seen, key, d);
        }
        Ok(found)
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<Vec<Tag>>> {
        let removed = self.inner.delete_manifest(repo, digest).await?;
        self.invalidate(|| {
            self.manifests.remove(&(repo.clone(), digest.clone()));
            for tag in removed.iter().flatten() {
                self.tags.remove(&(repo.clone(), tag.clone()));
            }
        });
        Ok(removed)
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<bool> {
        let removed = self.inner.delete_tag(repo, tag).await?;
        self.invalidate(|| {
            self.tags.remove(&(repo.clone(), tag.clone()));
        });
        Ok(removed)
    }

    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, at: std::time::SystemTime) -> StoreResult<()> {
        self.inner.set_tag_checked(repo, tag, at).await
    }

    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<std::time::SystemTime>> {
        self.inner.tag_checked(repo, tag).await
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> StoreResult<Option<Page>> {
        self.inner.list_tags(repo, last, limit).await
    }

    async fn catalog(&self, last: Option<&str>, limit: usize) -> StoreResult<Page> {
        self.inner.catalog(last, limit).await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> StoreResult<Vec<ManifestRecord>> {
        self.inner.referrers(repo, subject).await
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> StoreResult<()> {
        self.inner.create_upload(id, repo).await
    }

    async fn upload_repo(&self, id: &UploadId) -> StoreResult<Option<RepoName>> {
        self.inner.upload_repo(id).await
    }

    async fn delete_upload(&self, id: &UploadId) -> StoreResult<()> {
        self.inner.delete_upload(id).await
    }

    async fn hold_blob(&self, digest: &Digest, size: u64) -> StoreResult<bool> {
        self.inner.hold_blob(digest, size).await
    }

    async fn delete_untagged(&self, cutoff: std::time::SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let deleted = self.inner.delete_untagged(cutoff).await?;
        self.invalidate(|| {
            for key in &deleted {
                self.manifests.remove(key);
            }
        });
        Ok(deleted)
    }

    async fn unlink_unreferenced(&self, cutoff: std::time::SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let removed = self.inner.unlink_unreferenced(cutoff).await?;
        self.invalidate(|| {
            for key in &removed {
                self.links.remove(key);
                self.urls.remove(key);
            }
        });
        Ok(removed)
    }

    async fn doom_unlinked(
        &self,
        cutoff: std::time::SystemTime,
        stored: &[Digest],
        limit: usize,
    ) -> StoreResult<Vec<Digest>> {
        self.inner.doom_unlinked(cutoff, stored, limit).await
    }

    async fn forget_doomed(&self, digests: &[Digest]) -> StoreResult<()> {
        self.inner.forget_doomed(digests).await
    }

    fn queries_sent(&self) -> Option<u64> {
        self.inner.queries_sent()
    }

    fn writes_sent(&self) -> Option<u64> {
        self.inner.writes_sent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteMetaStore;

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = CachedMetaStore::new(SqliteMetaStore::open(&dir.path().join("meta.sqlite")).unwrap(), 1 << 20);
        crate::conformance::meta_store(&store).await;
    }
}
