//! The S3 [`BlobStore`]: the filesystem store's layout as keys in a bucket, for any
//! S3-compatible object store (Garage, MinIO, Ceph RGW, AWS S3).
//!
//! - A blob is the object `<prefix>blobs/<algorithm>/<first two hex>/<hex>`. It appears only
//!   whole: a commit makes it with one server-side `CopyObject`, or a multipart upload of
//!   server-side `UploadPartCopy`s that becomes visible at `CompleteMultipartUpload`.
//! - An upload session is `<prefix>uploads/<id>/started` (an empty marker: the session
//!   exists) and its bytes as part objects `<prefix>uploads/<id>/part-<n>`. Every part but
//!   the last holds exactly [`PART_SIZE`] bytes, so an offset names its part, any node can
//!   read a session back while it grows, and the parts are valid parts of the multipart copy
//!   at commit (S3 wants every part but the last to be at least 5 MiB). An append that starts
//!   on a short last part reads it back and rewrites it longer; a `PUT` replaces an object
//!   atomically, so a crash leaves the old part or the new one, never half of either.
//!
//! Requests are presigned with `rusty-s3` and sent with the caller's `reqwest` client (see
//! docs/architecture.md for why not `object_store`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use rusty_s3::S3Action as _;
use tessera_spec::Digest;

use crate::{AppendError, BlobRead, BlobStore, ByteStream, StoredBlob, UploadId};

/// Bytes in every part of an upload session but its last: above S3's 5 MiB minimum for a
/// part, small enough that buffering one per append in flight costs little.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Each presigned request is valid this long: it is sent at once, so only clock skew matters.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);
/// Parts of one append on their way to the store at once, while the next one fills: the
/// store's latency overlaps the client's sending, and an upload holds at most this many
/// parts (plus the one filling) in memory.
const PARTS_IN_FLIGHT: usize = 3;
/// Requests of one commit or delete sent at once (server-side copies, deletions).
const REQUESTS_AT_ONCE: usize = 8;
/// Attempts at a request the store answered with a 5xx or that never reached it.
const ATTEMPTS: u32 = 3;
/// Marks the layout; a later release that changes it bumps this and migrates.
const LAYOUT_KEY: &str = "tessera-blobs-layout";
const LAYOUT: &str = "1\n";

/// Where the bucket is and who we are to it.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// The endpoint, e.g. `http://127.0.0.1:3900`; AWS's regional endpoint when `None`.
    pub endpoint: Option<url::Url>,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which every S3-compatible store
    /// serves; virtual-host style (`bucket.endpoint/key`) otherwise.
    pub path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// Blobs and upload sessions in an S3 bucket. Clones share the client and the keys.
#[derive(Clone)]
pub struct S3BlobStore {
    bucket: rusty_s3::Bucket,
    credentials: Option<rusty_s3::Credentials>,
    prefix: String,
    http: reqwest::Client,
    /// Requests sent to the object store (retries included), by every store sharing it.
    requests: Arc<AtomicU64>,
}

/// An object as a listing reports it.
struct Listed {
    key: String,
    size: u64,
    modified: SystemTime,
}

impl S3BlobStore {
    /// Connects to the bucket (which must exist) and checks or writes its layout marker.
    pub async fn open(settings: S3Settings, http: reqwest::Client) -> io::Result<S3BlobStore> {
        let endpoint = match settings.endpoint {
            Some(url) => url,
            None => format!("https://s3.{}.amazonaws.com", settings.region).parse().map_err(io::Error::other)?,
        };
        let style = if settings.path_style { rusty_s3::UrlStyle::Path } else { rusty_s3::UrlStyle::VirtualHost };
        let bucket = rusty_s3::Bucket::new(endpoint, style, settings.bucket.clone(), settings.region.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bucket {}: {e}", settings.bucket)))?;
        let credentials = match (settings.access_key_id, settings.secret_access_key) {
            (Some(key), Some(secret)) => Some(rusty_s3::Credentials::new(key, secret)),
            _ => None,
        };
        let mut prefix = settings.prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let store = S3BlobStore { bucket, credentials, prefix, http, requests: Arc::default() };
        store.check_layout().await?;
        Ok(store)
    }

    /// A store under another prefix of the same bucket (an upstream's cache, say).
    pub fn under(&self, sub: &str) -> S3BlobStore {
        S3BlobStore { prefix: format!("{}{}/", self.prefix, sub.trim_matches('/')), ..self.clone() }
    }

    /// Writes the layout marker of a new prefix, or checks an existing one.
    pub async fn check_layout(&self) -> io::Result<()> {
        let key = format!("{}{LAYOUT_KEY}", self.prefix);
        match self.get_bytes(&key).await? {
            Some(found) if found == LAYOUT.as_bytes() => Ok(()),
            Some(found) => Err(io::Error::other(format!(
                "s3://{}/{key} says layout {:?}, and this release knows layout {:?}",
                self.bucket.name(),
                String::from_utf8_lossy(&found).trim(),
                LAYOUT.trim()
            ))),
            None => self.put(&key, Bytes::from_static(LAYOUT.as_bytes()), &[]).await,
        }
    }

    fn blob_key(&self, digest: &Digest) -> String {
        let hex = digest.hex();
        format!("{}blobs/{}/{}/{hex}", self.prefix, digest.algorithm().as_str(), &hex[..2])
    }

    fn session_prefix(&self, id: &UploadId) -> String {
        format!("{}uploads/{id}/", self.prefix)
    }

    fn marker_key(&self, id: &UploadId) -> String {
        format!("{}started", self.session_prefix(id))
    }

    fn part_key(&self, id: &UploadId, index: usize) -> String {
        format!("{}part-{index:06}", self.session_prefix(id))
    }

    /// What the bucket said, as an I/O error naming the request.
    async fn refused(what: &str, key: &str, response: reqwest::Response) -> io::Error {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let code = xml_text(&body, "Code").unwrap_or_default();
        let message = xml_text(&body, "Message").unwrap_or_default();
        let kind = match (status, code.as_str()) {
            (StatusCode::INSUFFICIENT_STORAGE, _) | (_, "QuotaExceeded") => io::ErrorKind::StorageFull,
            (StatusCode::NOT_FOUND, _) => io::ErrorKind::NotFound,
            (StatusCode::FORBIDDEN, _) => io::ErrorKind::PermissionDenied,
            // Still failing after the retries: the store is not serving now.
            (s, _) if s.is_server_error() => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("object store: {what} {key}: {status} {code} {message}").trim_end().to_string())
    }

    /// Sends the request `build` makes, again after a 5xx or a failure to reach the store
    /// (every request here is idempotent), and returns the first other answer.
    async fn send(
        &self,
        what: &str,
        key: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> io::Result<reqwest::Response> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            match build().send().await {
                Ok(r) if r.status().is_server_error() && attempt < ATTEMPTS => {
                    tracing::warn!("object store: {what} {key}: {}; trying again", r.status());
                }
                Ok(r) => return Ok(r),
                Err(e) if attempt < ATTEMPTS && (e.is_connect() || e.is_timeout() || e.is_request()) => {
                    tracing::warn!("object store: {what} {key}: {}; trying again", causes(&e));
                }
                Err(e) => {
                    let kind = if e.is_timeout() { io::ErrorKind::TimedOut } else { io::ErrorKind::ConnectionRefused };
                    let at = self.bucket.base_url();
                    return Err(io::Error::new(kind, format!("object store at {at}: {what} {key}: {}", causes(&e))));
                }
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }

    async fn head(&self, key: &str) -> io::Result<Option<u64>> {
        let url = self.bucket.head_object(self.credentials.as_ref(), key).sign(SIGNED_FOR);
        let r = self.send("HEAD", key, || self.http.head(url.clone())).await?;
        match r.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(content_length(&r)?)),
            _ => Err(Self::refused("HEAD", key, r).await),
        }
    }

    /// The object's bytes, or `None` if there is no such object.
    async fn get_bytes(&self, key: &str) -> io::Result<Option<Bytes>> {
        let Some(r) = self.get(key, None).await? else { return Ok(None) };
        r.bytes().await.map(Some).map_err(|e| io::Error::other(format!("object store: GET {key}: {}", e.without_url())))
    }

    /// A GET of the object, of `range` (an HTTP `Range` value) of it if given.
    async fn get(&self, key: &str, range: Option<&str>) -> io::Result<Option<reqwest::Response>> {
        let url = self.bucket.get_object(self.credentials.as_ref(), key).sign(SIGNED_FOR);
        let r = self
            .send("GET", key, || {
                let request = self.http.get(url.clone());
                match range {
                    Some(range) => request.header(reqwest::header::RANGE, range),
                    None => request,
                }
            })
            .await?;
        match r.status() {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, format!("range {range:?} outside {key}")))
            }
            s if s.is_success() => Ok(Some(r)),
            _ => Err(Self::refused("GET", key, r).await),
        }
    }

    /// Puts `body` at `key`; `headers` are signed and sent with it.
    async fn put(&self, key: &str, body: Bytes, headers: &[(&'static str, String)]) -> io::Result<()> {
        let mut action = self.bucket.put_object(self.credentials.as_ref(), key);
        for (name, value) in headers {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(SIGNED_FOR);
        let r = self
            .send("PUT", key, || {
                let mut request = self.http.put(url.clone()).header(reqwest::header::CONTENT_LENGTH, body.len());
                for (name, value) in headers {
                    request = request.header(*name, value);
                }
                request.body(body.clone())
            })
            .await?;
        if !r.status().is_success() {
            return Err(Self::refused("PUT", key, r).await);
        }
        // A copy can fail after its 200 has been sent: the error is then in the body.
        if !headers.is_empty() {
            let body = r.text().await.unwrap_or_default();
            if body.contains("<Error>") {
                return Err(io::Error::other(format!("object store: copy to {key}: {body}")));
            }
        }
        Ok(())
    }

    async fn delete_key(&self, key: &str) -> io::Result<()> {
        let url = self.bucket.delete_object(self.credentials.as_ref(), key).sign(SIGNED_FOR);
        let r = self.send("DELETE", key, || self.http.delete(url.clone())).await?;
        if r.status().is_success() || r.status() == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(Self::refused("DELETE", key, r).await)
        }
    }

    /// Every object under `prefix`, in key order.
    async fn list_under(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(self.credentials.as_ref());
            action.with_prefix(prefix);
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let r = self.send("LIST", prefix, || self.http.get(url.clone())).await?;
            if !r.status().is_success() {
                return Err(Self::refused("LIST", prefix, r).await);
            }
            let text = r.text().await.map_err(|e| io::Error::other(e.without_url()))?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text)
                .map_err(|e| io::Error::other(format!("object store: LIST {prefix}: unreadable answer: {e}")))?;
            for object in page.contents {
                let modified = object
                    .last_modified
                    .as_deref()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map_or(SystemTime::UNIX_EPOCH, SystemTime::from);
                out.push(Listed { key: object.key, size: object.size.unwrap_or(0), modified });
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// The session's parts as (size) in order, or `None` if it does not exist. Parts after
    /// a gap or after a short part (what an interrupted append left) are not the
    /// session's: the next append overwrites them.
    async fn parts(&self, id: &UploadId) -> io::Result<Option<Vec<u64>>> {
        let prefix = self.session_prefix(id);
        let listed = self.list_under(&prefix).await?;
        let marker = self.marker_key(id);
        if !listed.iter().any(|o| o.key == marker) {
            return Ok(None);
        }
        let mut sizes = Vec::new();
        for object in &listed {
            let Some(index) = object.key.strip_prefix(&prefix).and_then(|k| k.strip_prefix("part-")) else { continue };
            if index.parse::<usize>().ok() != Some(sizes.len()) {
                break;
            }
            sizes.push(object.size);
            if object.size != PART_SIZE as u64 {
                break;
            }
        }
        Ok(Some(sizes))
    }

    /// Writes one part of a session.
    async fn put_part(&self, id: &UploadId, index: usize, bytes: Bytes) -> io::Result<()> {
        self.put(&self.part_key(id, index), bytes, &[]).await
    }

    /// The `x-amz-copy-source` value naming `key` in this bucket.
    fn copy_source(&self, key: &str) -> String {
        let encoded: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        format!("/{}/{}", self.bucket.name(), encoded.replace("%2F", "/"))
    }

    /// Makes `target` out of the session's parts, server-side.
    async fn assemble(&self, id: &UploadId, parts: usize, target: &str) -> io::Result<()> {
        if parts <= 1 {
            if parts == 0 {
                return self.put(target, Bytes::new(), &[]).await;
            }
            return self
                .put(target, Bytes::new(), &[("x-amz-copy-source", self.copy_source(&self.part_key(id, 0)))])
                .await;
        }
        let url = self.bucket.create_multipart_upload(self.credentials.as_ref(), target).sign(SIGNED_FOR);
        let r = self.send("CreateMultipartUpload", target, || self.http.post(url.clone())).await?;
        if !r.status().is_success() {
            return Err(Self::refused("CreateMultipartUpload", target, r).await);
        }
        let text = r.text().await.map_err(|e| io::Error::other(e.without_url()))?;
        let created = rusty_s3::actions::CreateMultipartUpload::parse_response(&text)
            .map_err(|e| io::Error::other(format!("object store: CreateMultipartUpload {target}: {e}")))?;
        let upload_id = created.upload_id().to_string();
        let copied = self.copy_parts(id, parts, target, &upload_id).await;
        let completed = match copied {
            Ok(etags) => self.complete(target, &upload_id, etags).await,
            Err(e) => Err(e),
        };
        if let Err(e) = completed {
            let url =
                self.bucket.abort_multipart_upload(self.credentials.as_ref(), target, &upload_id).sign(SIGNED_FOR);
            if let Err(abort) = self.send("AbortMultipartUpload", target, || self.http.delete(url.clone())).await {
                tracing::warn!("object store: cannot abort the multipart upload of {target}: {abort}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Copies every part into the multipart upload, several at once; the ETags in order.
    /// The bucket's unfinished multipart uploads under `prefix`: (key, upload id, started).
    /// (`ListMultipartUploads`, which rusty-s3 has no action for: signed with its signer.)
    async fn multipart_uploads(&self, prefix: &str) -> io::Result<Vec<(String, String, SystemTime)>> {
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query: Vec<(&str, &str)> = vec![("prefix", prefix), ("uploads", "")];
            if let Some((key, id)) = &markers {
                query.push(("key-marker", key));
                query.push(("upload-id-marker", id));
            }
            query.sort();
            let url = match &self.credentials {
                Some(c) => rusty_s3::signing::sign(
                    &jiff::Timestamp::now(),
                    rusty_s3::Method::Get,
                    self.bucket.base_url().clone(),
                    c.key(),
                    c.secret(),
                    c.token(),
                    self.bucket.region(),
                    SIGNED_FOR.as_secs(),
                    query.iter().copied(),
                    std::iter::empty(),
                ),
                None => {
                    let mut url = self.bucket.base_url().clone();
                    url.query_pairs_mut().extend_pairs(query.iter().copied());
                    url
                }
            };
            let r = self.send("ListMultipartUploads", prefix, || self.http.get(url.clone())).await?;
            if !r.status().is_success() {
                return Err(Self::refused("ListMultipartUploads", prefix, r).await);
            }
            let text = r.text().await.map_err(|e| io::Error::other(e.without_url()))?;
            for upload in text.split("<Upload>").skip(1) {
                let (Some(key), Some(id)) = (xml_text(upload, "Key"), xml_text(upload, "UploadId")) else { continue };
                let started = xml_text(upload, "Initiated")
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map_or(SystemTime::now(), SystemTime::from);
                out.push((key, id, started));
            }
            if xml_text(&text, "IsTruncated").as_deref() != Some("true") {
                return Ok(out);
            }
            match (xml_text(&text, "NextKeyMarker"), xml_text(&text, "NextUploadIdMarker")) {
                (Some(key), Some(id)) => markers = Some((key, id)),
                _ => return Ok(out),
            }
        }
    }

    async fn copy_parts(&self, id: &UploadId, parts: usize, target: &str, upload_id: &str) -> io::Result<Vec<String>> {
        futures_util::stream::iter(0..parts)
            .map(|index| self.copy_part(id, index, target, upload_id))
            .buffered(REQUESTS_AT_ONCE)
            .try_collect()
            .await
    }

    async fn copy_part(&self, id: &UploadId, index: usize, target: &str, upload_id: &str) -> io::Result<String> {
        let number = u16::try_from(index + 1).map_err(|_| io::Error::other("more than 65535 parts"))?;
        let source = self.copy_source(&self.part_key(id, index));
        let mut action = self.bucket.upload_part(self.credentials.as_ref(), target, number, upload_id);
        action.headers_mut().insert("x-amz-copy-source", source.clone());
        let url = action.sign(SIGNED_FOR);
        let r = self
            .send("UploadPartCopy", target, || {
                self.http
                    .put(url.clone())
                    .header("x-amz-copy-source", &source)
                    .header(reqwest::header::CONTENT_LENGTH, 0)
            })
            .await?;
        if !r.status().is_success() {
            return Err(Self::refused("UploadPartCopy", target, r).await);
        }
        let text = r.text().await.map_err(|e| io::Error::other(e.without_url()))?;
        xml_text(&text, "ETag")
            .ok_or_else(|| io::Error::other(format!("object store: UploadPartCopy {target}: no ETag in {text}")))
    }

    async fn complete(&self, target: &str, upload_id: &str, etags: Vec<String>) -> io::Result<()> {
        let action = self.bucket.complete_multipart_upload(
            self.credentials.as_ref(),
            target,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = action.body();
        let r = self.send("CompleteMultipartUpload", target, || self.http.post(url.clone()).body(body.clone())).await?;
        if !r.status().is_success() {
            return Err(Self::refused("CompleteMultipartUpload", target, r).await);
        }
        let text = r.text().await.unwrap_or_default();
        if text.contains("<Error>") {
            return Err(io::Error::other(format!("object store: CompleteMultipartUpload {target}: {text}")));
        }
        Ok(())
    }
}

/// The text of the first `<tag>` element of an S3 XML answer (error codes, ETags), quotes
/// of an ETag entity included as S3 sends them.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].replace("&quot;", "\"").replace("&amp;", "&"))
}

/// A transport error with its causes ("error sending request: … Connection refused"),
/// without the presigned URL, whose query holds a signature.
fn causes(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    match e.url() {
        Some(url) => text.replace(url.as_str(), url.path()),
        None => text,
    }
}

fn content_length(r: &reqwest::Response) -> io::Result<u64> {
    r.headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| io::Error::other("object store: an answer without Content-Length"))
}

fn body_stream(r: reqwest::Response) -> ByteStream<'static> {
    Box::pin(r.bytes_stream().map_err(|e| io::Error::other(format!("object store: {}", e.without_url()))))
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        self.head(&self.blob_key(digest)).await
    }

    async fn read(&self, digest: &Digest, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        let key = self.blob_key(digest);
        let header = match range {
            Some((start, end)) if end >= start => Some(format!("bytes={start}-{end}")),
            Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the blob")),
            None => None,
        };
        let Some(r) = self.get(&key, header.as_deref()).await? else { return Ok(None) };
        if header.is_some() && r.status() != StatusCode::PARTIAL_CONTENT {
            return Err(io::Error::other(format!("object store: GET {key} ignored the range ({})", r.status())));
        }
        let len = content_length(&r)?;
        Ok(Some(BlobRead { len, body: body_stream(r) }))
    }

    async fn delete(&self, digest: &Digest) -> io::Result<bool> {
        let key = self.blob_key(digest);
        if self.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.delete_key(&key).await?;
        Ok(true)
    }

    async fn list(&self) -> io::Result<Vec<StoredBlob>> {
        let root = format!("{}blobs/", self.prefix);
        Ok(self
            .list_under(&root)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&root)?;
                let mut parts = rest.split('/');
                let (algorithm, _shard, hex) = (parts.next()?, parts.next()?, parts.next()?);
                let digest: Digest = format!("{algorithm}:{hex}").parse().ok()?;
                Some(StoredBlob { digest, size: o.size, stored: o.modified })
            })
            .collect())
    }

    async fn upload_create(&self, id: &UploadId) -> io::Result<()> {
        self.put(&self.marker_key(id), Bytes::new(), &[]).await
    }

    async fn upload_size(&self, id: &UploadId) -> io::Result<Option<u64>> {
        Ok(self.parts(id).await?.map(|sizes| sizes.iter().sum()))
    }

    async fn upload_append(&self, id: &UploadId, mut data: ByteStream<'_>, _durable: bool) -> Result<u64, AppendError> {
        // Every PUT is durable when the store answers it: `durable` asks for nothing more.
        let sizes = self.parts(id).await.map_err(AppendError::Storage)?.ok_or_else(|| {
            AppendError::Storage(io::Error::new(io::ErrorKind::NotFound, format!("no upload session {id}")))
        })?;
        let mut index = sizes.len();
        let mut buffer = BytesMut::new();
        if let Some(&last) = sizes.last()
            && last < PART_SIZE as u64
        {
            // A short last part grows: read it back, rewrite it longer.
            index -= 1;
            if last > 0 {
                let key = self.part_key(id, index);
                let bytes = self.get_bytes(&key).await.map_err(AppendError::Storage)?.unwrap_or_default();
                if bytes.len() as u64 != last {
                    return Err(AppendError::Storage(io::Error::other(format!("{key} changed while read"))));
                }
                buffer.extend_from_slice(&bytes);
            }
        }
        let mut fresh = false;
        let mut sending: std::collections::VecDeque<tokio::task::JoinHandle<io::Result<()>>> = Default::default();
        let mut source_error = None;
        loop {
            match data.next().await {
                Some(Ok(chunk)) => {
                    let mut chunk = chunk;
                    while !chunk.is_empty() {
                        fresh = true;
                        let room = PART_SIZE - buffer.len();
                        let take = room.min(chunk.len());
                        buffer.extend_from_slice(&chunk.split_to(take));
                        if buffer.len() == PART_SIZE {
                            if sending.len() >= PARTS_IN_FLIGHT
                                && let Some(oldest) = sending.pop_front()
                            {
                                oldest
                                    .await
                                    .map_err(|e| AppendError::Storage(io::Error::other(e)))?
                                    .map_err(AppendError::Storage)?;
                            }
                            let part = std::mem::replace(&mut buffer, BytesMut::with_capacity(PART_SIZE)).freeze();
                            let store = self.clone();
                            let id = id.clone();
                            sending.push_back(tokio::spawn(async move { store.put_part(&id, index, part).await }));
                            index += 1;
                        }
                    }
                }
                Some(Err(e)) => {
                    source_error = Some(e);
                    break;
                }
                None => break,
            }
        }
        // Every part must be in before the size is reported; a part that failed fails the
        // append (the parts before it are kept, those after a gap are not the session's).
        for part in sending {
            part.await.map_err(|e| AppendError::Storage(io::Error::other(e)))?.map_err(AppendError::Storage)?;
        }
        // What arrived is kept, also when the source failed: the client resumes from it.
        let size = index as u64 * PART_SIZE as u64 + buffer.len() as u64;
        if fresh && !buffer.is_empty() {
            self.put_part(id, index, buffer.freeze()).await.map_err(AppendError::Storage)?;
        }
        match source_error {
            Some(e) => Err(AppendError::Source(e)),
            None => Ok(size),
        }
    }

    async fn upload_read(&self, id: &UploadId, start: u64) -> io::Result<ByteStream<'static>> {
        let sizes = self
            .parts(id)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no upload session {id}")))?;
        let size: u64 = sizes.iter().sum();
        let store = self.clone();
        let id = id.clone();
        let first = (start / PART_SIZE as u64) as usize;
        let pieces: Vec<(usize, u64, u64)> = (first..sizes.len())
            .filter_map(|index| {
                let part_start = index as u64 * PART_SIZE as u64;
                let from = start.max(part_start) - part_start;
                (from < sizes[index]).then(|| (index, from, sizes[index] - 1))
            })
            .collect();
        if start >= size {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        Ok(Box::pin(
            futures_util::stream::iter(pieces)
                .then(move |(index, from, to)| {
                    let store = store.clone();
                    let key = store.part_key(&id, index);
                    async move {
                        let range = format!("bytes={from}-{to}");
                        match store.get(&key, Some(&range)).await? {
                            Some(r) => Ok(body_stream(r)),
                            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("{key} is gone"))),
                        }
                    }
                })
                .try_flatten(),
        ))
    }

    async fn upload_commit(&self, id: &UploadId, digest: &Digest) -> io::Result<()> {
        let target = self.blob_key(digest);
        let sizes = self
            .parts(id)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no upload session {id}")))?;
        // Create-only: a blob already here is the same bytes (its digest says so).
        if self.head(&target).await?.is_none() {
            self.assemble(id, sizes.len(), &target).await?;
        }
        self.upload_delete(id).await
    }

    async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> io::Result<()> {
        // One PUT is atomic: the object appears whole or not at all. One already there holds
        // the same bytes (its key is their digest), so writing it again changes nothing.
        self.put(&self.blob_key(digest), bytes, &[]).await
    }

    async fn upload_delete(&self, id: &UploadId) -> io::Result<()> {
        let marker = self.marker_key(id);
        // The marker goes last, so a session half deleted is still listed and swept.
        let listed = self.list_under(&self.session_prefix(id)).await?;
        let deletes: Vec<_> = listed.iter().filter(|o| o.key != marker).map(|o| self.delete_key(&o.key)).collect();
        futures_util::stream::iter(deletes).buffer_unordered(REQUESTS_AT_ONCE).try_collect::<()>().await?;
        self.delete_key(&marker).await
    }

    async fn upload_save_hash(&self, id: &UploadId, offset: u64, state: &[u8]) -> io::Result<()> {
        if self.head(&self.marker_key(id)).await?.is_none() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no upload session {id}")));
        }
        let key = format!("{}hashstate", self.session_prefix(id));
        self.put(&key, Bytes::from(crate::encode_hash_state(offset, state)), &[]).await
    }

    async fn upload_load_hash(&self, id: &UploadId) -> io::Result<Option<(u64, Vec<u8>)>> {
        let key = format!("{}hashstate", self.session_prefix(id));
        Ok(self.get_bytes(&key).await?.as_deref().and_then(crate::decode_hash_state))
    }

    async fn sweep_interrupted_commits(&self, started_before: SystemTime) -> io::Result<usize> {
        let blobs = format!("{}blobs/", self.prefix);
        let mut aborted = 0;
        for (key, upload_id, started) in self.multipart_uploads(&blobs).await? {
            if started < started_before {
                let url =
                    self.bucket.abort_multipart_upload(self.credentials.as_ref(), &key, &upload_id).sign(SIGNED_FOR);
                let r = self.send("AbortMultipartUpload", &key, || self.http.delete(url.clone())).await?;
                if !r.status().is_success() && r.status() != StatusCode::NOT_FOUND {
                    return Err(Self::refused("AbortMultipartUpload", &key, r).await);
                }
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    fn presigned_get(&self, digest: &Digest, valid_for: Duration) -> Option<String> {
        let key = self.blob_key(digest);
        Some(self.bucket.get_object(self.credentials.as_ref(), &key).sign(valid_for).to_string())
    }

    fn requests_sent(&self) -> Option<u64> {
        Some(self.requests.load(Ordering::Relaxed))
    }

    async fn upload_list(&self) -> io::Result<Vec<(UploadId, SystemTime)>> {
        let root = format!("{}uploads/", self.prefix);
        let mut sessions: std::collections::BTreeMap<UploadId, SystemTime> = Default::default();
        for object in self.list_under(&root).await? {
            let Some(id) = object.key.strip_prefix(&root).and_then(|k| k.split('/').next()?.parse::<UploadId>().ok())
            else {
                continue;
            };
            let latest = sessions.entry(id).or_insert(object.modified);
            *latest = (*latest).max(object.modified);
        }
        Ok(sessions.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_testkit::garage::Garage;

    async fn store_on(garage: &Garage, prefix: &str) -> io::Result<S3BlobStore> {
        let settings = S3Settings {
            endpoint: Some(garage.endpoint.parse().unwrap()),
            region: Garage::REGION.into(),
            bucket: garage.bucket.clone(),
            prefix: prefix.into(),
            path_style: true,
            access_key_id: Some(garage.key_id.clone()),
            secret_access_key: Some(garage.secret.clone()),
        };
        S3BlobStore::open(settings, tessera_testkit::no_redirects()).await
    }

    fn stream_of(parts: Vec<Bytes>) -> ByteStream<'static> {
        Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok)))
    }

    async fn collect(s: ByteStream<'_>) -> Vec<u8> {
        s.try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_shared_suite_passes_on_garage() {
        let Some(garage) = Garage::for_test() else { return };
        let store = store_on(&garage, "suite").await.unwrap();
        crate::conformance::blob_store(&store).await;
        // A second prefix of the same bucket is a store of its own.
        let other = store.under("cache/up");
        crate::conformance::blob_store(&other).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn blobs_of_many_parts_arrive_in_small_and_large_appends_and_read_back_exactly() {
        let Some(garage) = Garage::for_test() else { return };
        let store = store_on(&garage, "").await.unwrap();
        let data = Bytes::from(tessera_testkit::random_bytes(3 * PART_SIZE + 3_000_001, 7));
        let digest = Digest::sha256_of(&data);
        let id = UploadId::random();
        store.upload_create(&id).await.unwrap();
        // Small appends grow a short last part; a large one crosses two part boundaries
        // in one stream; a failed one keeps what arrived.
        let mut at = 0;
        for len in [1, 999_999, 3_000_000] {
            let got = store.upload_append(&id, stream_of(vec![data.slice(at..at + len)]), true).await.unwrap();
            at += len;
            assert_eq!(got, at as u64);
        }
        let big = 2 * PART_SIZE - 1;
        let pieces: Vec<Bytes> = data.slice(at..at + big).chunks(65_536).map(Bytes::copy_from_slice).collect();
        assert_eq!(store.upload_append(&id, stream_of(pieces), true).await.unwrap(), (at + big) as u64);
        at += big;
        let failing: ByteStream = Box::pin(futures_util::stream::iter(vec![
            Ok(data.slice(at..at + 1000)),
            Err(io::Error::other("client went away")),
        ]));
        assert!(matches!(store.upload_append(&id, failing, true).await, Err(AppendError::Source(_))));
        at += 1000;
        assert_eq!(store.upload_size(&id).await.unwrap(), Some(at as u64), "the failed append's bytes are kept");
        store.upload_append(&id, stream_of(vec![data.slice(at..)]), true).await.unwrap();
        assert_eq!(store.upload_size(&id).await.unwrap(), Some(data.len() as u64));
        // Any node can read the session while it grows: from any offset, across parts.
        for start in [0, PART_SIZE as u64 - 1, PART_SIZE as u64, 2 * PART_SIZE as u64 + 5] {
            let got = collect(store.upload_read(&id, start).await.unwrap()).await;
            assert!(got == data[start as usize..], "upload_read from {start}");
        }
        store.upload_commit(&id, &digest).await.unwrap();
        assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
        let whole = store.read(&digest, None).await.unwrap().unwrap();
        assert!(collect(whole.body).await == data, "the assembled blob is the bytes appended");
        let (from, to) = (PART_SIZE as u64 - 10, 2 * PART_SIZE as u64 + 10);
        let part = store.read(&digest, Some((from, to))).await.unwrap().unwrap();
        assert_eq!(part.len, to - from + 1);
        assert!(collect(part.body).await == data[from as usize..=to as usize]);
        assert!(store.upload_list().await.unwrap().is_empty(), "the commit removed the session's parts");
        assert_eq!(store.list().await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn what_an_interrupted_append_left_after_a_gap_is_not_part_of_the_session() {
        let Some(garage) = Garage::for_test() else { return };
        let store = store_on(&garage, "gap").await.unwrap();
        let id = UploadId::random();
        store.upload_create(&id).await.unwrap();
        store.upload_append(&id, stream_of(vec![Bytes::from(vec![1u8; 100])]), true).await.unwrap();
        // Part 2 without a full part 1: as if an append died between two parts.
        store.put_part(&id, 2, Bytes::from_static(b"stale")).await.unwrap();
        assert_eq!(store.upload_size(&id).await.unwrap(), Some(100));
        store.upload_append(&id, stream_of(vec![Bytes::from(vec![2u8; 50])]), true).await.unwrap();
        let got = collect(store.upload_read(&id, 0).await.unwrap()).await;
        assert_eq!(got, [vec![1u8; 100], vec![2u8; 50]].concat());
        store.upload_delete(&id).await.unwrap();
        assert!(store.upload_list().await.unwrap().is_empty(), "every part went with the session");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_commit_cut_off_mid_copy_leaves_a_multipart_upload_that_the_sweep_aborts() {
        let Some(garage) = Garage::for_test() else { return };
        let store = store_on(&garage, "cut").await.unwrap();
        // As a commit does before it copies the parts in: then the process dies.
        let target = store.blob_key(&Digest::sha256_of(b"never completed"));
        let url = store.bucket.create_multipart_upload(store.credentials.as_ref(), &target).sign(SIGNED_FOR);
        assert!(store.http.post(url).send().await.unwrap().status().is_success());
        assert_eq!(store.multipart_uploads(&format!("{}blobs/", store.prefix)).await.unwrap().len(), 1);
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(store.sweep_interrupted_commits(long_ago).await.unwrap(), 0, "a recent one may be in progress");
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_eq!(store.sweep_interrupted_commits(later).await.unwrap(), 1);
        assert!(store.multipart_uploads(&format!("{}blobs/", store.prefix)).await.unwrap().is_empty());
        // Another prefix's are not this store's.
        let other = store_on(&garage, "elsewhere").await.unwrap();
        let url = other
            .bucket
            .create_multipart_upload(other.credentials.as_ref(), &other.blob_key(&Digest::sha256_of(b"x")))
            .sign(SIGNED_FOR);
        assert!(other.http.post(url).send().await.unwrap().status().is_success());
        assert_eq!(store.sweep_interrupted_commits(later).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_prefix_in_another_layout_is_refused() {
        let Some(garage) = Garage::for_test() else { return };
        let store = store_on(&garage, "old").await.unwrap();
        store.put(&format!("old/{LAYOUT_KEY}"), Bytes::from_static(b"9\n"), &[]).await.unwrap();
        let e = store_on(&garage, "old").await.err().expect("a layout this release does not know is refused");
        assert!(e.to_string().contains("layout \"9\""), "{e}");
    }
}
