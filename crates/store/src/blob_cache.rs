//! [`CachedBlobStore`]: keeps small blobs in memory after their first read. Blobs are
//! immutable, so a cached copy is always right; only a delete removes one. Large blobs are
//! never cached: they stream from the inner store.

use std::io;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use tessera_spec::Digest;

use crate::{AppendError, BlobRead, BlobStore, ByteStream, StoredBlob, UploadId};

#[derive(Clone)]
struct ByLength;

impl Weighter<Digest, Bytes> for ByLength {
    fn weight(&self, _: &Digest, v: &Bytes) -> u64 {
        v.len() as u64 + 128
    }
}

pub struct CachedBlobStore<B> {
    inner: B,
    cache: Cache<Digest, Bytes, ByLength>,
    max_item: u64,
}

impl<B: BlobStore> CachedBlobStore<B> {
    /// Wraps `inner`, keeping up to `bytes` of blobs no larger than `max_item` each.
    pub fn new(inner: B, bytes: u64, max_item: u64) -> Self {
        let items = (bytes / max_item.max(1) * 4).max(16) as usize;
        CachedBlobStore { inner, cache: Cache::with_weighter(items, bytes.max(1), ByLength), max_item }
    }

    fn answer(bytes: &Bytes, range: Option<(u64, u64)>) -> io::Result<BlobRead> {
        let size = bytes.len() as u64;
        let part = match range {
            None => bytes.clone(),
            Some((start, end)) if start < size && end >= start => {
                bytes.slice(start as usize..=end.min(size - 1) as usize)
            }
            Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the blob")),
        };
        Ok(BlobRead {
            len: part.len() as u64,
            body: Box::pin(futures_util::stream::once(std::future::ready(Ok(part)))),
        })
    }
}

#[async_trait]
impl<B: BlobStore> BlobStore for CachedBlobStore<B> {
    async fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        // Always the store's answer: a read finishing after a delete may put the bytes back
        // in memory, and "present" must mean present on disk (a mount links on it).
        self.inner.stat(digest).await
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        if let Some(b) = self.cache.get(digest) {
            return Self::answer(&b, range).map(Some);
        }
        // A part is read as asked (parts of small blobs are rare); a whole read tells the
        // size as it starts, so a large blob streams on with no request spent on a stat
        // first (a round trip to an object store).
        if range.is_some() {
            return self.inner.read(digest, range).await;
        }
        let Some(read) = self.inner.read(digest, None).await? else { return Ok(None) };
        if read.len > self.max_item {
            return Ok(Some(read));
        }
        let mut whole = BytesMut::with_capacity(read.len as usize);
        let mut body = read.body;
        while let Some(chunk) = body.next().await {
            whole.extend_from_slice(&chunk?);
        }
        let whole = whole.freeze();
        self.cache.insert(digest.clone(), whole.clone());
        Self::answer(&whole, range).map(Some)
    }

    async fn delete(&self, digest: &Digest) -> io::Result<bool> {
        let existed = self.inner.delete(digest).await?;
        self.cache.remove(digest);
        Ok(existed)
    }

    async fn list(&self) -> io::Result<Vec<StoredBlob>> {
        self.inner.list().await
    }

    async fn upload_create(&self, id: &UploadId) -> io::Result<()> {
        self.inner.upload_create(id).await
    }

    async fn upload_size(&self, id: &UploadId) -> io::Result<Option<u64>> {
        self.inner.upload_size(id).await
    }

    async fn upload_append(&self, id: &UploadId, data: ByteStream<'_>, durable: bool) -> Result<u64, AppendError> {
        self.inner.upload_append(id, data, durable).await
    }

    async fn upload_read(&self, id: &UploadId, start: u64) -> io::Result<ByteStream<'static>> {
        self.inner.upload_read(id, start).await
    }

    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> io::Result<()> {
        self.inner.upload_commit(id, digest).await
    }

    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> io::Result<()> {
        self.inner.put_blob(digest, bytes).await
    }

    async fn upload_delete(&self, id: &UploadId) -> io::Result<()> {
        self.inner.upload_delete(id).await
    }

    async fn upload_list(&self) -> io::Result<Vec<(UploadId, SystemTime)>> {
        self.inner.upload_list().await
    }

    async fn upload_save_hash(&self, id: &UploadId, offset: u64, state: &[u8]) -> io::Result<()> {
        self.inner.upload_save_hash(id, offset, state).await
    }

    async fn upload_load_hash(&self, id: &UploadId) -> io::Result<Option<(u64, Vec<u8>)>> {
        self.inner.upload_load_hash(id).await
    }

    async fn sweep_interrupted_commits(&self, started_before: SystemTime) -> io::Result<usize> {
        self.inner.sweep_interrupted_commits(started_before).await
    }

    fn presigned_get(&self, digest: &Digest, valid_for: std::time::Duration) -> Option<String> {
        self.inner.presigned_get(digest, valid_for)
    }

    fn requests_sent(&self) -> Option<u64> {
        self.inner.requests_sent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsBlobStore;

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        // Small enough items that the suite's 3 MB blob streams and its tiny ones are cached.
        let store = CachedBlobStore::new(FsBlobStore::open(dir.path()).unwrap(), 1 << 20, 64 * 1024);
        crate::conformance::blob_store(&store).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn small_blobs_are_served_from_memory_and_forgotten_on_delete() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FsBlobStore::open(dir.path()).unwrap();
        let id = UploadId::random();
        fs.upload_create(&id).await.unwrap();
        fs.upload_append(&id, Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(b"0123456789"))])), true)
            .await
            .unwrap();
        let d = Digest::sha256_of(b"0123456789");
        fs.upload_commit(&id, &d).await.unwrap();
        let store = CachedBlobStore::new(fs, 1 << 20, 1024);
        store.read(&d, None).await.unwrap().unwrap();
        // Remove the file behind the cache's back: the cached copy still answers, ranges too.
        std::fs::remove_file(dir.path().join("blobs/sha256").join(&d.hex()[..2]).join(d.hex())).unwrap();
        let r = store.read(&d, Some((2, 4))).await.unwrap().unwrap();
        let mut body = r.body;
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"234"));
        assert_eq!(store.stat(&d).await.unwrap(), None, "stat is the disk's answer, never the cache's");
        assert!(store.read(&d, Some((10, 11))).await.is_err());
        store.delete(&d).await.unwrap();
        assert!(store.read(&d, None).await.unwrap().is_none());
    }
}
