//! The filesystem [`BlobStore`]: `blobs/<algorithm>/<first two hex>/<hex>` for content and
//! `uploads/<id>/data` for sessions, under one root so a commit is a hard link (create-only,
//! atomic) on one filesystem.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tessera_spec::Digest;
use tokio::sync::mpsc;

use crate::{AppendError, BlobRead, BlobStore, ByteStream, StoredBlob, UploadId};

/// Written at the root; a later release that changes the layout bumps it and migrates.
const LAYOUT_FILE: &str = "tessera-blobs-layout";
const LAYOUT: &str = "1\n";
/// Blobs up to this size are read in one go; larger ones stream from a reader thread.
const SMALL_READ: u64 = 256 * 1024;
/// Bytes per read or write on the streaming paths: large enough that per-chunk overhead
/// (a thread hop, a syscall) is noise next to copying the bytes.
const CHUNK: usize = 1024 * 1024;

/// Chunks per batch, however small the chunks a client sends: each batch stays one
/// `writev` (the kernel takes at most 1024 slices a call).
const BATCH_SLICES: usize = 256;

/// Writes every chunk of `batch` in order, as few `writev` calls as the kernel allows.
fn write_all_vectored(file: &mut File, batch: &[Bytes]) -> io::Result<u64> {
    let mut slices: Vec<io::IoSlice<'_>> = batch.iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    let total = batch.iter().map(|b| b.len() as u64).sum();
    io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Starts writing dirty pages to disk every few MiB while an upload streams in, so the
/// `fdatasync` that makes the upload durable at its end has little left to wait for.
struct Writeback {
    unsynced_from: u64,
    offset: u64,
}

const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;

impl Writeback {
    fn new(offset: u64) -> Self {
        Writeback { unsynced_from: offset, offset }
    }

    fn wrote(&mut self, file: &File, len: u64) {
        self.offset += len;
        if self.offset - self.unsynced_from >= WRITEBACK_EVERY {
            start_writeback(file, self.unsynced_from, self.offset - self.unsynced_from);
            self.unsynced_from = self.offset;
        }
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advisory syscall on a descriptor this function borrows; it reads no memory.
    // Its result is ignored on purpose: the final fdatasync reports any real I/O error.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// A blob opened for reading: small ones already read, larger ones to stream from an offset.
enum Opened {
    Whole(Bytes),
    Stream(File, u64),
}

pub struct FsBlobStore {
    root: PathBuf,
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> impl Future<Output = io::Result<T>> {
    let task = tokio::task::spawn_blocking(f);
    async move { task.await.map_err(io::Error::other)? }
}

fn not_found_as_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, making each new entry durable in its parent.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Opens the file at `path` for reading, the whole of it or the inclusive byte `range`:
/// small files in one read, larger ones streamed with read-ahead. `None` if there is no file.
pub async fn read_file(path: PathBuf, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
    // Open, size and (for small blobs) read in one trip to the blocking pool.
    let opened = blocking(move || {
        let Some(file) = not_found_as_none(File::open(path))? else { return Ok(None) };
        let size = file.metadata()?.len();
        let (start, len) = match range {
            Some((start, end)) if start < size && end >= start => (start, end.min(size - 1) - start + 1),
            Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the blob")),
            None => (0, size),
        };
        if len <= SMALL_READ {
            return Ok(Some((len, Opened::Whole(read_whole(&file, start, len)?))));
        }
        Ok(Some((len, Opened::Stream(file, start))))
    })
    .await?;
    Ok(opened.map(|(len, content)| {
        let body: ByteStream<'static> = match content {
            Opened::Whole(bytes) => Box::pin(futures_util::stream::once(std::future::ready(Ok(bytes)))),
            Opened::Stream(file, start) => stream_file(file, start, len),
        };
        BlobRead { len, body }
    }))
}

/// Reads `len` bytes of `file` from `start` in one call (small blobs).
fn read_whole(file: &File, start: u64, len: u64) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(Bytes::from(buf))
}

/// Streams `len` bytes of `file` from `start`, read ahead by a blocking thread so disk reads
/// overlap with sending.
fn stream_file(file: File, start: u64, len: u64) -> ByteStream<'static> {
    if len <= SMALL_READ {
        return Box::pin(futures_util::stream::once(
            async move { blocking(move || read_whole(&file, start, len)).await },
        ));
    }
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut offset = start;
        let end = start + len;
        while offset < end {
            let n = CHUNK.min((end - offset) as usize);
            let mut buf = BytesMut::zeroed(n);
            let result = file.read_exact_at(&mut buf, offset).map(|()| buf.freeze());
            let failed = result.is_err();
            if tx.blocking_send(result).is_err() || failed {
                return;
            }
            offset += n as u64;
        }
    });
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

impl FsBlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        create_dir_durable(&root.join("blobs"))?;
        create_dir_durable(&root.join("uploads"))?;
        let layout = root.join(LAYOUT_FILE);
        match fs::read_to_string(&layout) {
            Ok(v) if v == LAYOUT => {}
            Ok(v) => {
                return Err(io::Error::other(format!(
                    "blob store at {} has layout {:?}, this build knows {:?}",
                    root.display(),
                    v.trim(),
                    LAYOUT.trim()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&layout, LAYOUT)?;
                sync_dir(&root)?;
            }
            Err(e) => return Err(e),
        }
        Ok(FsBlobStore { root })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("blobs").join(digest.algorithm().as_str()).join(&hex[..2]).join(hex)
    }

    fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    fn upload_data(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("data")
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        let path = self.blob_path(digest);
        blocking(move || not_found_as_none(fs::metadata(path).map(|m| m.len()))).await
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        read_file(self.blob_path(digest), range).await
    }

    async fn delete(&self, digest: &Digest) -> io::Result<bool> {
        let path = self.blob_path(digest);
        blocking(move || not_found_as_none(fs::remove_file(path)).map(|o| o.is_some())).await
    }

    async fn list(&self) -> io::Result<Vec<StoredBlob>> {
        let root = self.root.join("blobs");
        blocking(move || {
            let mut out = Vec::new();
            for algorithm in fs::read_dir(&root)? {
                let algorithm = algorithm?;
                let Some(alg) = algorithm.file_name().to_str().map(str::to_string) else { continue };
                for shard in fs::read_dir(algorithm.path())? {
                    for blob in fs::read_dir(shard?.path())? {
                        let blob = blob?;
                        let name = blob.file_name();
                        // Only files named by a valid digest count; anything else is not ours.
                        let Some(digest) = name.to_str().and_then(|hex| format!("{alg}:{hex}").parse::<Digest>().ok())
                        else {
                            continue;
                        };
                        let meta = blob.metadata()?;
                        out.push(StoredBlob {
                            digest,
                            size: meta.len(),
                            stored: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn upload_create(&self, id: &UploadId) -> io::Result<()> {
        let dir = self.upload_dir(id);
        blocking(move || {
            fs::create_dir(&dir)?;
            File::create(dir.join("data"))?;
            Ok(())
        })
        .await
    }

    async fn upload_size(&self, id: &UploadId) -> io::Result<Option<u64>> {
        let path = self.upload_data(id);
        blocking(move || not_found_as_none(fs::metadata(path).map(|m| m.len()))).await
    }

    async fn upload_append(&self, id: &UploadId, mut data: ByteStream<'_>, durable: bool) -> Result<u64, AppendError> {
        let path = self.upload_data(id);
        let file = blocking(move || OpenOptions::new().append(true).open(path)).await.map_err(AppendError::Storage)?;
        // One writer thread per append: the network side gathers the next batch while the
        // previous one is written. A batch is the received chunks themselves, written with
        // one vectored write: no copy into a buffer of our own.
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(2);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut file = file;
            // Early writeback only where a sync follows: a cache fill's pages are written
            // when its commit syncs them, after its readers have their bytes.
            let mut writeback = if durable { Some(Writeback::new(file.metadata()?.len())) } else { None };
            while let Some(batch) = rx.blocking_recv() {
                let len = write_all_vectored(&mut file, &batch)?;
                if let Some(writeback) = writeback.as_mut() {
                    writeback.wrote(&file, len);
                }
            }
            if durable {
                file.sync_data()?;
            }
            Ok(file.metadata()?.len())
        });
        let mut batch = Vec::new();
        let mut batched = 0;
        let mut source_error = None;
        let mut writer_gone = false;
        while let Some(item) = data.next().await {
            match item {
                Ok(bytes) => {
                    batched += bytes.len();
                    batch.push(bytes);
                    if batched >= CHUNK || batch.len() >= BATCH_SLICES {
                        batched = 0;
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
                            writer_gone = true;
                            break;
                        }
                    }
                }
                Err(e) => {
                    source_error = Some(e);
                    break;
                }
            }
        }
        if !writer_gone && !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        drop(tx);
        let written = writer.await.map_err(|e| AppendError::Storage(io::Error::other(e)))?;
        match (written, source_error) {
            (Err(e), _) => Err(AppendError::Storage(e)),
            (Ok(_), Some(e)) => Err(AppendError::Source(e)),
            (Ok(size), None) => Ok(size),
        }
    }

    async fn upload_read(&self, id: &UploadId, start: u64) -> io::Result<ByteStream<'static>> {
        let path = self.upload_data(id);
        let (file, size) = blocking(move || {
            let f = File::open(path)?;
            let size = f.metadata()?.len();
            Ok((f, size))
        })
        .await?;
        Ok(stream_file(file, start.min(size), size.saturating_sub(start)))
    }

    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> io::Result<()> {
        let dir = self.upload_dir(id);
        let target = self.blob_path(digest);
        blocking(move || {
            let data = dir.join("data");
            File::open(&data)?.sync_all()?;
            let shard = target.parent().ok_or_else(|| io::Error::other("blob path has no parent"))?;
            create_dir_durable(shard)?;
            match fs::hard_link(&data, &target) {
                Ok(()) => sync_dir(shard)?,
                // Someone else committed the same digest first: theirs is the copy.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            fs::remove_dir_all(&dir)
        })
        .await
    }

    async fn upload_delete(&self, id: &UploadId) -> io::Result<()> {
        let dir = self.upload_dir(id);
        blocking(move || not_found_as_none(fs::remove_dir_all(dir)).map(|_| ())).await
    }

    async fn upload_save_hash(&self, id: &UploadId, offset: u64, state: &[u8]) -> io::Result<()> {
        let dir = self.upload_dir(id);
        let bytes = crate::encode_hash_state(offset, state);
        // Replaced by a rename, so a reader sees the old state or the new one. Not synced: a
        // state lost in a crash only means hashing the session again from its bytes.
        blocking(move || {
            let temporary = dir.join("hashstate.new");
            fs::write(&temporary, bytes)?;
            fs::rename(temporary, dir.join("hashstate"))
        })
        .await
    }

    async fn upload_load_hash(&self, id: &UploadId) -> io::Result<Option<(u64, Vec<u8>)>> {
        let path = self.upload_dir(id).join("hashstate");
        let stored = blocking(move || not_found_as_none(fs::read(path))).await?;
        Ok(stored.as_deref().and_then(crate::decode_hash_state))
    }

    async fn upload_list(&self) -> io::Result<Vec<(UploadId, SystemTime)>> {
        let dir = self.root.join("uploads");
        blocking(move || {
            let mut out = Vec::new();
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let Some(id) = entry.file_name().to_str().and_then(|s| s.parse::<UploadId>().ok()) else {
                    continue;
                };
                // A session being created has its directory before its data file.
                let modified = fs::metadata(entry.path().join("data"))
                    .or_else(|_| entry.metadata())
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| SystemTime::now());
                out.push((id, modified));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        crate::conformance::blob_store(&store).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refuses_unknown_layout() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LAYOUT_FILE), "99\n").unwrap();
        assert!(FsBlobStore::open(dir.path()).is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn committed_blob_lives_at_its_digest_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = UploadId::random();
        store.upload_create(&id).await.unwrap();
        let data: ByteStream = Box::pin(futures_util::stream::iter(vec![Ok(Bytes::from_static(b"abc"))]));
        store.upload_append(&id, data, true).await.unwrap();
        let d = Digest::sha256_of(b"abc");
        store.upload_commit(&id, &d).await.unwrap();
        let path = dir.path().join("blobs/sha256").join(&d.hex()[..2]).join(d.hex());
        assert_eq!(fs::read(&path).unwrap(), b"abc");
        assert!(!dir.path().join("uploads").join(id.as_str()).exists());
    }
}
