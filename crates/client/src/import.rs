//! `tessera import`: every image of an OCI image layout (a directory or a `.tar` archive, as
//! export writes) pushed to a registry.

use std::path::Path;

use bytes::Bytes;
use indicatif::ProgressBar;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use tessera_spec::{Digest, Digester, OciError, RepoName};

use crate::error::ClientError;
use crate::layout;
use crate::progress;
use crate::push::{check, content_type};
use crate::reference::{ImageReference, ReferenceError};
use crate::source::{Blob, SourceImage, read_index};
use crate::upstream::Upstream;

/// Bytes per upload request of an import: bounded memory, and a broken transfer loses at
/// most one chunk.
const IMPORT_CHUNK: usize = 16 * 1024 * 1024;

/// Pushes every `NAME:TAG` image of an OCI layout (a directory or a `.tar` archive) to the
/// registry behind `dest`, under `prefix`. Blobs the registry already has are skipped, so a
/// repeated import resumes; each blob is checked against its digest as it is read, and a
/// manifest is pushed only after all it needs. Returns the references pushed.
pub async fn import(input: &Path, dest: &Upstream, prefix: Option<&str>) -> Result<Vec<String>, ClientError> {
    let unpacked;
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        unpacked = tempfile::Builder::new().prefix("tessera-import").tempdir()?;
        crate::archive::unpack(input, unpacked.path())?;
        unpacked.path().to_path_buf()
    };
    let refs: Vec<String> =
        read_index(&dir)?.manifests.iter().filter_map(|e| e.ref_name()).map(str::to_string).collect();
    if refs.is_empty() {
        return Err(ClientError::NothingNamed { path: input.to_path_buf() });
    }
    let mut pushed = Vec::new();
    for reference in refs {
        let (name, tag) = ImageReference::parse_tagged(&reference)?;
        let full = match prefix {
            Some(p) => format!("{}/{name}", p.trim_matches('/')),
            None => name.to_string(),
        };
        let repo: RepoName =
            full.parse().map_err(|error: OciError| ReferenceError::Invalid { text: full.clone(), error })?;
        let image = SourceImage::from_layout(&dir, Some(&reference), None)?;
        let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
        for (i, b) in blobs.iter().enumerate() {
            let path = format!("/v2/{repo}/blobs/{}", b.digest);
            let head = dest.send_push(Method::HEAD, &repo, &path, HeaderMap::new(), Bytes::new()).await?;
            if head.status().is_success() {
                eprintln!("{repo}:{tag} [{}/{}] {} already there", i + 1, blobs.len(), b.digest);
                continue;
            }
            let bar = progress::blob(&format!("{repo}:{tag} [{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
            upload_file(dest, &repo, &b.digest, &layout::blob_path(&dir, &b.digest), &bar).await?;
            progress::finish(&bar);
        }
        let last = image.manifests.len() - 1;
        for (i, m) in image.manifests.iter().enumerate() {
            let reference = if i == last { tag.to_string() } else { m.digest.to_string() };
            let path = format!("/v2/{repo}/manifests/{reference}");
            let r = dest.send_push(Method::PUT, &repo, &path, content_type(&m.media_type), m.bytes.clone()).await?;
            check(format!("manifest {}", m.digest), r).await?;
        }
        for m in &image.manifests {
            import_signatures(dest, &dir, &name, &repo, &m.digest).await?;
        }
        pushed.push(format!("{repo}:{tag}"));
    }
    Ok(pushed)
}

/// Puts the simple signatures an export kept for `name@digest` (its `sigstore/` files) to
/// `repo` on `dest`, each named by its content so a repeated import adds none twice.
async fn import_signatures(
    dest: &Upstream,
    dir: &Path,
    name: &RepoName,
    repo: &RepoName,
    digest: &Digest,
) -> Result<(), ClientError> {
    let at = layout::lookaside_dir(dir, name, digest);
    for n in 1.. {
        let Ok(content) = std::fs::read(at.join(format!("signature-{n}"))) else { break };
        let engine = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({
            "schemaVersion": 2, "type": "atomic", "name": layout::signature_name(digest, &content),
            "content": base64::Engine::encode(&engine, &content),
        });
        let path = format!("/extensions/v2/{repo}/signatures/{digest}");
        let r = dest
            .send_push(Method::PUT, repo, &path, content_type("application/json"), Bytes::from(body.to_string()))
            .await?;
        check(format!("signature {n} of {repo}@{digest}"), r).await?;
    }
    Ok(())
}

/// Where the bytes of a blob being uploaded come from.
pub(crate) enum BlobChunks {
    File(tokio::fs::File, std::path::PathBuf),
    /// A registry's answer to the blob's GET.
    Answer(reqwest::Response),
}

impl BlobChunks {
    /// Up to `max` bytes; an empty chunk at the end.
    async fn next(&mut self, max: usize) -> Result<Vec<u8>, ClientError> {
        use tokio::io::AsyncReadExt as _;
        let mut chunk = Vec::with_capacity(max.min(1 << 20));
        match self {
            BlobChunks::File(file, _) => {
                chunk.resize(max, 0);
                let mut filled = 0;
                while filled < max {
                    let n = file.read(&mut chunk[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                chunk.truncate(filled);
            }
            // HTTP frames are small: gathered into one chunk of `max`, or what is left.
            BlobChunks::Answer(r) => {
                while chunk.len() < max {
                    match r.chunk().await? {
                        Some(frame) => chunk.extend_from_slice(&frame),
                        None => break,
                    }
                }
            }
        }
        Ok(chunk)
    }

    fn mismatch(&self, digest: &Digest) -> ClientError {
        match self {
            BlobChunks::File(_, path) => ClientError::CorruptUpload { path: path.clone(), digest: digest.clone() },
            BlobChunks::Answer(_) => ClientError::SourceMismatch(digest.clone()),
        }
    }
}

/// Uploads a file as the blob `digest` in chunks, verifying the digest as it reads.
async fn upload_file(
    dest: &Upstream,
    repo: &RepoName,
    digest: &Digest,
    path: &Path,
    bar: &ProgressBar,
) -> Result<(), ClientError> {
    let file = tokio::fs::File::open(path).await.map_err(|source| ClientError::MissingBlob {
        digest: digest.clone(),
        place: "the layout".into(),
        source,
    })?;
    upload(dest, repo, digest, BlobChunks::File(file, path.to_path_buf()), bar).await
}

/// Uploads the blob `digest` from `source` in chunks of [`IMPORT_CHUNK`] (a chunk may
/// outgrow it by one HTTP frame), verifying the digest as it reads: the session is closed
/// only when the bytes match.
pub(crate) async fn upload(
    dest: &Upstream,
    repo: &RepoName,
    digest: &Digest,
    mut source: BlobChunks,
    bar: &ProgressBar,
) -> Result<(), ClientError> {
    let start = dest
        .send_push(Method::POST, repo, &format!("/v2/{repo}/blobs/uploads/"), HeaderMap::new(), Bytes::new())
        .await?;
    if start.status().as_u16() != 202 {
        check(format!("upload of {digest}"), start).await?;
        return Err(ClientError::NoSession(digest.clone()));
    }
    let mut location = session_path(dest, &start)?;
    let mut digester = Digester::new(digest.algorithm());
    let mut offset = 0u64;
    loop {
        let chunk = source.next(IMPORT_CHUNK).await?;
        if chunk.is_empty() {
            break;
        }
        digester.update(&chunk);
        let mut headers = content_type("application/octet-stream");
        let range = format!("{offset}-{}", offset + chunk.len() as u64 - 1);
        // Digits and a dash: always a valid header value.
        if let Ok(range) = HeaderValue::from_str(&range) {
            headers.insert("content-range", range);
        }
        offset += chunk.len() as u64;
        let r = dest.send_push(Method::PATCH, repo, &location, headers, Bytes::from(chunk)).await?;
        if r.status().as_u16() != 202 {
            check(format!("upload of {digest}"), r).await?;
            return Err(ClientError::UnexpectedAnswer(digest.clone()));
        }
        location = session_path(dest, &r)?;
        bar.set_position(offset);
    }
    if digester.finish() != *digest {
        let _ = dest.send_push(Method::DELETE, repo, &location, HeaderMap::new(), Bytes::new()).await;
        return Err(source.mismatch(digest));
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = dest
        .send_push(Method::PUT, repo, &format!("{location}{sep}digest={digest}"), HeaderMap::new(), Bytes::new())
        .await?;
    check(format!("upload of {digest}"), r).await
}

/// The path of an upload session from a `Location` header (relative, or absolute on the
/// same registry).
fn session_path(dest: &Upstream, r: &reqwest::Response) -> Result<String, ClientError> {
    let location = r.headers().get("location").and_then(|v| v.to_str().ok()).ok_or(ClientError::NoLocation)?;
    let base = dest.url("");
    match location.strip_prefix(&base) {
        Some(rest) => Ok(rest.to_string()),
        None if location.starts_with('/') => Ok(location.to_string()),
        None => Err(ClientError::ForeignLocation(location.to_string())),
    }
}
