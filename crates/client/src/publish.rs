//! `tessera publish`: writes an image's blobs and manifests in the layout a CDN origin
//! serves (Pulp's: `blobs/{digest}`, `manifests/2/{ref}`, `manifests/list/{ref}`), into a
//! directory or an S3-compatible bucket.

use std::collections::HashSet;
use std::path::PathBuf;

use bytes::Bytes;
use indicatif::ProgressBar;
use tessera_spec::{Digest, ParsedManifest, RepoName};

use crate::error::ClientError;
use crate::layout::{PulpManifests, expand_blob_layout, lookaside_key};
use crate::progress;
use crate::source::{Blob, SourceImage};

/// Where `publish` writes: a directory a web server serves, or an S3-compatible bucket.
pub enum PublishTarget {
    Dir(PathBuf),
    S3(Box<S3Target>),
}

/// A bucket and key prefix on an S3-compatible store, written through presigned requests.
pub struct S3Target {
    bucket: rusty_s3::Bucket,
    credentials: Option<rusty_s3::Credentials>,
    prefix: String,
    /// A canned ACL given to every object written (e.g. `public-read` for a bucket a CDN
    /// or clients read anonymously).
    acl: Option<String>,
    http: reqwest::Client,
}

/// How long each presigned request stays valid.
const PRESIGN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

impl PublishTarget {
    /// `s3://BUCKET[/PREFIX]` (at `endpoint`, with credentials from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` when set), or a directory.
    pub fn parse(
        dest: &str,
        endpoint: Option<&str>,
        region: &str,
        acl: Option<&str>,
    ) -> Result<PublishTarget, ClientError> {
        let Some(rest) = dest.strip_prefix("s3://") else {
            return Ok(PublishTarget::Dir(PathBuf::from(dest)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoint = endpoint.ok_or(ClientError::S3NoEndpoint)?;
        let endpoint_url = url::Url::parse(endpoint)
            .map_err(|source| ClientError::S3Endpoint { endpoint: endpoint.to_string(), source })?;
        let bucket =
            rusty_s3::Bucket::new(endpoint_url, rusty_s3::UrlStyle::Path, bucket.to_string(), region.to_string())
                .map_err(|source| ClientError::Bucket { bucket: bucket.to_string(), source })?;
        let credentials = match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(key), Ok(secret)) => Some(rusty_s3::Credentials::new(key, secret)),
            _ => None,
        };
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let http = crate::upstream::content_client(false)
            .map_err(|source| ClientError::Client { target: endpoint.to_string(), source })?;
        let acl = acl.map(str::to_string);
        Ok(PublishTarget::S3(Box::new(S3Target { bucket, credentials, prefix, acl, http })))
    }

    /// Whether `key` is already there with `size` bytes.
    async fn has(&self, key: &str, size: u64) -> Result<bool, ClientError> {
        match self {
            PublishTarget::Dir(dir) => Ok(std::fs::metadata(dir.join(key)).is_ok_and(|m| m.len() == size)),
            PublishTarget::S3(s3) => {
                use rusty_s3::S3Action as _;
                let url =
                    s3.bucket.head_object(s3.credentials.as_ref(), &format!("{}{key}", s3.prefix)).sign(PRESIGN_TTL);
                let r = s3.http.head(url).send().await.map_err(|e| ClientError::S3Request {
                    method: "HEAD",
                    key: key.to_string(),
                    source: e.without_url(),
                })?;
                // The header, not the body's length: a HEAD answer has no body.
                let length = r.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                Ok(r.status().is_success() && length == Some(size))
            }
        }
    }

    /// Writes blob `digest` of `image` at `key`, verified on the way.
    async fn put_blob(
        &self,
        image: &SourceImage,
        digest: &Digest,
        key: &str,
        bar: &ProgressBar,
    ) -> Result<(), ClientError> {
        match self {
            PublishTarget::Dir(dir) => {
                let path = dir.join(key);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                image.copy_blob(digest, &path, bar).await
            }
            PublishTarget::S3(s3) => {
                // Verified into a local file first, so nothing unverified reaches the bucket.
                let staging = tempfile::Builder::new().prefix("tessera-publish").tempdir()?;
                let path = staging.path().join("blob");
                image.copy_blob(digest, &path, bar).await?;
                let size = std::fs::metadata(&path)?.len();
                let file = tokio::fs::File::open(&path).await?;
                s3.put(key, reqwest::Body::from(file), size).await
            }
        }
    }

    async fn put_bytes(&self, key: &str, bytes: &Bytes) -> Result<(), ClientError> {
        match self {
            PublishTarget::Dir(dir) => {
                let path = dir.join(key);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Ok(std::fs::write(path, bytes)?)
            }
            PublishTarget::S3(s3) => s3.put(key, reqwest::Body::from(bytes.clone()), bytes.len() as u64).await,
        }
    }
}

impl S3Target {
    async fn put(&self, key: &str, body: reqwest::Body, size: u64) -> Result<(), ClientError> {
        use rusty_s3::S3Action as _;
        let object = format!("{}{key}", self.prefix);
        let mut action = self.bucket.put_object(self.credentials.as_ref(), &object);
        let mut request = self.http.put(action.sign(PRESIGN_TTL));
        if let Some(acl) = &self.acl {
            // Signed with the request, so it must be sent exactly so.
            action.headers_mut().insert("x-amz-acl", acl.clone());
            request = request.header("x-amz-acl", acl);
        }
        let mut request = request.header(reqwest::header::CONTENT_LENGTH, size).body(body).build()?;
        *request.url_mut() = action.sign(PRESIGN_TTL);
        let r = self.http.execute(request).await.map_err(|e| ClientError::S3Request {
            method: "PUT",
            key: key.to_string(),
            source: e.without_url(),
        })?;
        if !r.status().is_success() {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            return Err(ClientError::S3Refused { key: key.to_string(), status, body });
        }
        Ok(())
    }
}

/// Writes every blob of `image` to `target` by the blob layout `layout`, and its manifests
/// as Pulp publishes them (`manifests/2/{ref}` for images, `manifests/list/{ref}` for
/// indexes, by digest and, for the top one, by `tag`). Blobs already there with the right
/// size are kept, so an interrupted publish resumes. Returns (blobs written, blobs kept).
pub async fn publish(
    image: &SourceImage,
    target: &PublishTarget,
    name: &RepoName,
    layout: &str,
    tag: Option<&str>,
) -> Result<Published, ClientError> {
    let mut seen = HashSet::new();
    let (mut written, mut kept) = (0, 0);
    let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
    for (i, b) in blobs.iter().enumerate() {
        if !seen.insert(b.digest.clone()) {
            continue;
        }
        let key = expand_blob_layout(layout, name, &b.digest);
        if target.has(&key, b.size).await? {
            kept += 1;
            continue;
        }
        let bar = progress::blob(&format!("[{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
        target.put_blob(image, &b.digest, &key, &bar).await?;
        progress::finish(&bar);
        written += 1;
    }
    let last = image.manifests.len() - 1;
    for (i, m) in image.manifests.iter().enumerate() {
        let kind = ParsedManifest::parse(Some(&m.media_type), &m.bytes).map(|p| p.kind);
        let folder = kind.map_or(PulpManifests::Schema2, PulpManifests::of);
        target.put_bytes(&folder.key(&m.digest.to_string()), &m.bytes).await?;
        if i == last
            && let Some(tag) = tag
        {
            target.put_bytes(&folder.key(tag), &m.bytes).await?;
        }
    }
    // The image's simple signatures, in the lookaside layout beside the tree (a
    // `[[static]] lookaside` or a `registries.d` lookaside reads them there).
    let mut signatures = 0;
    if let Some(top) = image.manifests.last() {
        for (i, content) in image.signatures(name, &top.digest).await?.into_iter().enumerate() {
            target.put_bytes(&lookaside_key(name, &top.digest, Some(i + 1)), &Bytes::from(content)).await?;
            signatures += 1;
        }
    }
    Ok(Published { written, kept, signatures })
}

/// What `publish` wrote.
pub struct Published {
    /// Blobs written, and blobs already in the target.
    pub written: usize,
    pub kept: usize,
    /// Simple signatures written under `sigstore/`.
    pub signatures: usize,
}
