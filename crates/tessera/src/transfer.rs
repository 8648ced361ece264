//! Moving images from a source (an OCI image layout, a `docker save` archive, another
//! registry) to where they are served: `tessera push --blobs-at` records an image in a
//! Tessera repository while its layers stay on a CDN (metadata-only push), and
//! `tessera publish` writes an image's blobs and manifests in the layout a CDN origin
//! serves (Pulp's: `blobs/{digest}`, `manifests/2/{ref}`, `manifests/list/{ref}`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use tessera_federation::Upstream;
use tessera_spec::manifest::{ManifestKind, media};
use tessera_spec::{Digest, ParsedManifest, RepoName};

/// Where an image comes from, in skopeo's transport syntax.
pub enum Source {
    /// `oci:DIR[:TAG]`
    Layout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE`
    Archive(PathBuf),
    /// `docker://HOST/NAME[:TAG|@DIGEST]`
    Registry { host: String, name: RepoName, reference: String },
}

impl Source {
    pub fn parse(text: &str) -> Result<Source> {
        if let Some(rest) = text.strip_prefix("oci:") {
            return Ok(match rest.rsplit_once(':').filter(|(_, t)| !t.contains('/') && !t.is_empty()) {
                Some((dir, tag)) => Source::Layout { dir: dir.into(), tag: Some(tag.into()) },
                None => Source::Layout { dir: rest.into(), tag: None },
            });
        }
        if let Some(rest) = text.strip_prefix("docker-archive:") {
            return Ok(Source::Archive(rest.into()));
        }
        if let Some(rest) = text.strip_prefix("docker://") {
            let (host, name, reference) = split_reference(rest)?;
            return Ok(Source::Registry { host, name, reference });
        }
        bail!("{text:?}: a source is oci:DIR[:TAG], docker-archive:FILE or docker://HOST/NAME[:TAG]")
    }
}

/// `HOST[:PORT]/NAME[:TAG|@DIGEST]` into its parts (the tag defaults to `latest`).
pub fn split_reference(text: &str) -> Result<(String, RepoName, String)> {
    let (host, rest) = text.split_once('/').ok_or_else(|| anyhow!("{text:?} has no HOST/ before the name"))?;
    let (name, reference) = match rest.split_once('@') {
        Some((n, d)) => (n, d.to_string()),
        None => match rest.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((n, t)) => (n, t.to_string()),
            None => (rest, "latest".to_string()),
        },
    };
    let name = name.parse().map_err(|e: tessera_spec::OciError| anyhow!("{name:?}: {}", e.message))?;
    Ok((host.to_string(), name, reference))
}

/// A registry client for `host` (`http://` with `plain_http`), with optional `USER:PASS`.
pub fn registry_client(host: &str, plain_http: bool, creds: Option<&str>) -> Result<Arc<Upstream>> {
    let (username, password) = match creds.map(|c| c.split_once(':')) {
        Some(Some((u, p))) => (Some(u.to_string()), Some(p.to_string())),
        Some(None) => bail!("credentials are USER:PASSWORD"),
        None => (None, None),
    };
    let scheme = if plain_http { "http" } else { "https" };
    let config = tessera_config::Upstream {
        name: host.to_string(),
        url: format!("{scheme}://{host}"),
        authority: Vec::new(),
        username,
        password,
        ca_file: None,
        library_rule: Some(false),
        timeout_secs: 300,
        cache: Default::default(),
    };
    Ok(Arc::new(Upstream::new(&config)?))
}

/// `text` if it is a valid tag (tags name files and URL paths, so nothing else passes).
fn valid_tag(text: &str) -> Option<String> {
    text.parse::<tessera_spec::Tag>().ok().map(|t| t.to_string())
}

/// Unpacks the regular files and directories of a tar archive into `into`. Links and
/// special files are skipped, and no entry may land outside `into`.
fn unpack_archive(file: &Path, into: &Path) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut archive = tar::Archive::new(f);
    let unreadable = || format!("{} is not a readable tar archive", file.display());
    for entry in archive.entries().with_context(unreadable)? {
        let mut entry = entry.with_context(unreadable)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        if !entry.unpack_in(into).with_context(unreadable)? {
            bail!("{} has an entry outside the archive: {:?}", file.display(), entry.path().ok());
        }
    }
    Ok(())
}

/// A manifest of the image, as stored.
pub struct SourceManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// A blob an image needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// An image read from a source: its manifests (children before the index that lists them;
/// the last is the one a tag names), its config blobs and its layers.
pub struct SourceImage {
    pub manifests: Vec<SourceManifest>,
    pub configs: Vec<Blob>,
    pub layers: Vec<Blob>,
    /// Where blob bytes are read from.
    blobs: BlobSource,
    /// The tag the source named, if any.
    pub tag: Option<String>,
    _unpacked: Option<tempfile::TempDir>,
}

enum BlobSource {
    /// `blobs/<algorithm>/<hex>` under a layout directory.
    Layout(PathBuf),
    /// Files of a legacy `docker save` archive, by digest.
    Files(Vec<(Digest, PathBuf)>),
    Registry(Arc<Upstream>, RepoName),
}

impl SourceImage {
    pub async fn read(source: &Source, src_plain_http: bool, src_creds: Option<&str>) -> Result<SourceImage> {
        match source {
            Source::Layout { dir, tag } => Self::from_layout(dir, tag.as_deref(), None),
            Source::Archive(file) => {
                let unpacked = tempfile::Builder::new().prefix("tessera-archive").tempdir()?;
                unpack_archive(file, unpacked.path())?;
                if unpacked.path().join("index.json").exists() {
                    // Docker 25 and later save an OCI image layout.
                    let dir = unpacked.path().to_path_buf();
                    Self::from_layout(&dir, None, Some(unpacked))
                } else {
                    Self::from_legacy_archive(unpacked)
                }
            }
            Source::Registry { host, name, reference } => {
                let upstream = registry_client(host, src_plain_http, src_creds)?;
                let mut image = SourceImage {
                    manifests: Vec::new(),
                    configs: Vec::new(),
                    layers: Vec::new(),
                    blobs: BlobSource::Registry(upstream.clone(), name.clone()),
                    tag: valid_tag(reference),
                    _unpacked: None,
                };
                let (status, content_type, bytes) = upstream.get_manifest(name, reference).await?;
                if status != 200 {
                    bail!("{host}/{name}:{reference}: the registry answered {status}");
                }
                let mut pending = vec![(bytes, content_type)];
                let mut order = Vec::new();
                while let Some((bytes, content_type)) = pending.pop() {
                    let parsed = ParsedManifest::parse(content_type.as_deref(), &bytes)
                        .map_err(|e| anyhow!("{host}/{name}: {}", e.message))?;
                    for child in &parsed.manifests {
                        let (status, ct, b) = upstream.get_manifest(name, &child.digest.to_string()).await?;
                        if status != 200 || Digest::of(child.digest.algorithm(), &b) != child.digest {
                            bail!("{host}/{name}@{}: not served correctly (status {status})", child.digest);
                        }
                        pending.push((b, ct));
                    }
                    order.push((bytes, parsed));
                }
                for (bytes, parsed) in order.into_iter().rev() {
                    image.add(bytes, parsed);
                }
                Ok(image)
            }
        }
    }

    fn add(&mut self, bytes: Bytes, parsed: ParsedManifest) {
        let blob = |d: &tessera_spec::manifest::Descriptor| Blob { digest: d.digest.clone(), size: d.size };
        if let Some(c) = &parsed.config
            && !self.configs.contains(&blob(c))
        {
            self.configs.push(blob(c));
        }
        for l in &parsed.layers {
            if !self.layers.contains(&blob(l)) {
                self.layers.push(blob(l));
            }
        }
        self.manifests.push(SourceManifest { digest: Digest::sha256_of(&bytes), media_type: parsed.media_type, bytes });
    }

    fn from_layout(dir: &Path, tag: Option<&str>, unpacked: Option<tempfile::TempDir>) -> Result<SourceImage> {
        let index_path = dir.join("index.json");
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&index_path).with_context(|| format!("{} is not an OCI image layout", dir.display()))?,
        )?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let names = |e: &serde_json::Value| {
            ["org.opencontainers.image.ref.name", "io.containerd.image.name"]
                .iter()
                .filter_map(|k| e["annotations"][k].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        };
        let chosen = match tag {
            Some(tag) => entries
                .iter()
                .find(|e| names(e).iter().any(|n| n == tag))
                .or_else(|| entries.iter().find(|e| names(e).iter().any(|n| n.ends_with(&format!(":{tag}")))))
                .ok_or_else(|| anyhow!("{} has no image tagged {tag:?}", dir.display()))?,
            None => entries.first().ok_or_else(|| anyhow!("{} lists no image", dir.display()))?,
        };
        let read_blob = |d: &Digest| -> Result<Bytes> {
            let path = dir.join("blobs").join(d.algorithm().as_str()).join(d.hex());
            let bytes = std::fs::read(&path).with_context(|| format!("{d} is not in the layout {}", dir.display()))?;
            if Digest::of(d.algorithm(), &bytes) != *d {
                bail!("{} does not match its digest", path.display());
            }
            Ok(Bytes::from(bytes))
        };
        let top: Digest = chosen["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|_| anyhow!("index.json of {} names an invalid digest", dir.display()))?;
        // The tag names files a publish writes: only a valid tag is kept.
        let tag = names(chosen).first().map(|n| n.rsplit_once(':').map_or(n.as_str(), |(_, t)| t)).and_then(valid_tag);
        let mut image = SourceImage {
            manifests: Vec::new(),
            configs: Vec::new(),
            layers: Vec::new(),
            blobs: BlobSource::Layout(dir.to_path_buf()),
            tag,
            _unpacked: unpacked,
        };
        let mut order = Vec::new();
        let mut pending = vec![(top, chosen["mediaType"].as_str().map(str::to_string))];
        while let Some((digest, media_type)) = pending.pop() {
            let bytes = read_blob(&digest)?;
            let parsed = ParsedManifest::parse(media_type.as_deref(), &bytes).map_err(|e| anyhow!("{}", e.message))?;
            for child in &parsed.manifests {
                pending.push((child.digest.clone(), Some(child.media_type.clone())));
            }
            order.push((bytes, parsed));
        }
        for (bytes, parsed) in order.into_iter().rev() {
            image.add(bytes, parsed);
        }
        Ok(image)
    }

    /// A `docker save` archive from before Docker 25: `manifest.json` naming a config file
    /// and uncompressed layer tars. The image is the Docker schema 2 manifest of those.
    fn from_legacy_archive(unpacked: tempfile::TempDir) -> Result<SourceImage> {
        let dir = unpacked.path();
        let listing: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json"))
                .context("the archive has neither index.json nor manifest.json")?,
        )?;
        let entry = listing.get(0).ok_or_else(|| anyhow!("the archive's manifest.json lists no image"))?;
        let file_blob = |rel: &str| -> Result<(Digest, u64, PathBuf)> {
            // Only plain relative names of regular files inside the archive: no absolute path,
            // no `..`, no link that could point at a file of this machine.
            if rel.is_empty() || !Path::new(rel).components().all(|c| matches!(c, std::path::Component::Normal(_))) {
                bail!("the archive names a path outside itself: {rel:?}");
            }
            let path = dir.join(rel);
            if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
                bail!("the archive lacks {rel} as a regular file (links are not followed)");
            }
            let mut f = std::fs::File::open(&path).with_context(|| format!("the archive lacks {rel}"))?;
            let mut digester = tessera_spec::Digester::new(tessera_spec::Algorithm::Sha256);
            let mut buf = vec![0; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                digester.update(&buf[..n]);
                size += n as u64;
            }
            Ok((digester.finish(), size, path))
        };
        let (config_digest, config_size, config_path) =
            file_blob(entry["Config"].as_str().ok_or_else(|| anyhow!("manifest.json has no Config"))?)?;
        let mut files = vec![(config_digest.clone(), config_path)];
        let mut layers = Vec::new();
        for l in entry["Layers"].as_array().into_iter().flatten() {
            let (d, size, path) = file_blob(l.as_str().unwrap_or_default())?;
            files.push((d.clone(), path));
            layers.push(serde_json::json!({ "mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": d.to_string(), "size": size }));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::DOCKER_MANIFEST,
            "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest.to_string(), "size": config_size },
            "layers": layers,
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest)?);
        let parsed =
            ParsedManifest::parse(Some(media::DOCKER_MANIFEST), &bytes).map_err(|e| anyhow!("{}", e.message))?;
        let tag = entry["RepoTags"][0].as_str().and_then(|t| t.rsplit_once(':')).and_then(|(_, t)| valid_tag(t));
        let mut image = SourceImage {
            manifests: Vec::new(),
            configs: Vec::new(),
            layers: Vec::new(),
            blobs: BlobSource::Files(files),
            tag,
            _unpacked: Some(unpacked),
        };
        image.add(bytes, parsed);
        Ok(image)
    }

    /// A blob's bytes, whole and verified (configs are small).
    pub async fn blob(&self, d: &Digest) -> Result<Bytes> {
        let bytes = match &self.blobs {
            BlobSource::Layout(dir) => {
                Bytes::from(tokio::fs::read(dir.join("blobs").join(d.algorithm().as_str()).join(d.hex())).await?)
            }
            BlobSource::Files(files) => {
                let path = files.iter().find(|(fd, _)| fd == d).map(|(_, p)| p).ok_or_else(|| anyhow!("no {d}"))?;
                Bytes::from(tokio::fs::read(path).await?)
            }
            BlobSource::Registry(upstream, name) => {
                let r = upstream.send(Method::GET, name, &format!("/v2/{name}/blobs/{d}"), HeaderMap::new()).await?;
                if !r.status().is_success() {
                    bail!("{d}: the source registry answered {}", r.status());
                }
                r.bytes().await?
            }
        };
        if Digest::of(d.algorithm(), &bytes) != *d {
            bail!("{d}: the source's bytes do not match the digest");
        }
        Ok(bytes)
    }

    /// Copies a blob into `path` (through a temporary file, verified, then renamed).
    async fn copy_blob(&self, d: &Digest, path: &Path, bar: &ProgressBar) -> Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let partial = path.with_extension("partial");
        let mut out = tokio::fs::File::create(&partial).await?;
        let mut digester = tessera_spec::Digester::new(d.algorithm());
        match &self.blobs {
            BlobSource::Registry(upstream, name) => {
                // A Tessera source streams what it holds instead of redirecting to its CDN
                // (which may be the very place being published to); others ignore this.
                let mut r = upstream
                    .send(Method::GET, name, &format!("/v2/{name}/blobs/{d}?delivery=stream"), HeaderMap::new())
                    .await?;
                if !r.status().is_success() {
                    bail!("{d}: the source registry answered {}", r.status());
                }
                while let Some(chunk) = r.chunk().await? {
                    digester.update(&chunk);
                    out.write_all(&chunk).await?;
                    bar.inc(chunk.len() as u64);
                }
            }
            BlobSource::Layout(_) | BlobSource::Files(_) => {
                let source = match &self.blobs {
                    BlobSource::Layout(dir) => dir.join("blobs").join(d.algorithm().as_str()).join(d.hex()),
                    BlobSource::Files(files) => {
                        files.iter().find(|(fd, _)| fd == d).map(|(_, p)| p.clone()).ok_or_else(|| anyhow!("no {d}"))?
                    }
                    BlobSource::Registry(..) => unreachable!("handled above"),
                };
                let mut input =
                    tokio::fs::File::open(&source).await.with_context(|| format!("{d} is not in the source"))?;
                let mut buf = vec![0; 1 << 20];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut input, &mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    digester.update(&buf[..n]);
                    out.write_all(&buf[..n]).await?;
                    bar.inc(n as u64);
                }
            }
        }
        out.sync_all().await?;
        if digester.finish() != *d {
            let _ = tokio::fs::remove_file(&partial).await;
            bail!("{d}: the source's bytes do not match the digest");
        }
        tokio::fs::rename(&partial, path).await?;
        Ok(())
    }
}

/// Where a blob lives under a base URL or directory, by `layout`.
pub fn blob_path(layout: &str, name: &RepoName, digest: &Digest) -> String {
    tessera_federation::delivery::expand_layout(layout, name, digest)
}

/// Ok for a 2xx; else the status and the server's error body, under `what`.
async fn check(what: String, r: reqwest::Response) -> Result<()> {
    if r.status().is_success() {
        return Ok(());
    }
    let status = r.status();
    Err(anyhow!("{what}: {status} {}", r.text().await.unwrap_or_default()))
}

fn json_headers(content_type: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h
}

/// What a metadata-only push did.
pub struct PushReport {
    pub top: Digest,
    pub layers: usize,
    pub configs: usize,
    pub manifests: usize,
}

/// Records `image` in `name:tag` on the Tessera server behind `dest`, its layers as living at
/// `blobs_at` (by `layout`). With `verify`, the server checks with a HEAD (signed, when its
/// delivery policy signs that CDN) that each layer is there with its size.
pub async fn push_metadata_only(
    image: &SourceImage,
    dest: &Upstream,
    name: &RepoName,
    tag: &str,
    blobs_at: &str,
    layout: &str,
    verify: bool,
) -> Result<PushReport> {
    let base = if blobs_at.ends_with('/') { blobs_at.to_string() } else { format!("{blobs_at}/") };
    let located: Vec<(&Blob, String)> =
        image.layers.iter().map(|l| (l, format!("{base}{}", blob_path(layout, name, &l.digest)))).collect();
    for c in &image.configs {
        let bytes = image.blob(&c.digest).await?;
        let r = dest
            .send_push(
                Method::POST,
                name,
                &format!("/v2/{name}/blobs/uploads/?digest={}", c.digest),
                json_headers("application/octet-stream"),
                bytes,
            )
            .await?;
        check(format!("config {}", c.digest), r).await?;
    }
    for (layer, url) in &located {
        let body = serde_json::json!({ "size": layer.size, "urls": [url], "verify": verify }).to_string();
        let r = dest
            .send_push(
                Method::PUT,
                name,
                &format!("/tessera/v1/{name}/blobs/{}", layer.digest),
                json_headers("application/json"),
                Bytes::from(body),
            )
            .await?;
        check(format!("layer {}", layer.digest), r).await?;
    }
    let last = image.manifests.len() - 1;
    for (i, m) in image.manifests.iter().enumerate() {
        let reference = if i == last { tag.to_string() } else { m.digest.to_string() };
        let r = dest
            .send_push(
                Method::PUT,
                name,
                &format!("/v2/{name}/manifests/{reference}"),
                json_headers(&m.media_type),
                m.bytes.clone(),
            )
            .await?;
        check(format!("manifest {}", m.digest), r).await?;
    }
    Ok(PushReport {
        top: image.manifests[last].digest.clone(),
        layers: image.layers.len(),
        configs: image.configs.len(),
        manifests: image.manifests.len(),
    })
}

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
    pub fn parse(dest: &str, endpoint: Option<&str>, region: &str, acl: Option<&str>) -> Result<PublishTarget> {
        let Some(rest) = dest.strip_prefix("s3://") else {
            return Ok(PublishTarget::Dir(PathBuf::from(dest)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoint = endpoint.ok_or_else(|| anyhow!("an s3:// destination needs --s3-endpoint URL"))?;
        let endpoint = url::Url::parse(endpoint).map_err(|e| anyhow!("--s3-endpoint {endpoint}: {e}"))?;
        let bucket = rusty_s3::Bucket::new(endpoint, rusty_s3::UrlStyle::Path, bucket.to_string(), region.to_string())
            .map_err(|e| anyhow!("bucket {bucket}: {e}"))?;
        let credentials = match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(key), Ok(secret)) => Some(rusty_s3::Credentials::new(key, secret)),
            _ => None,
        };
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let http = tessera_federation::upstream::content_client(false)?;
        let acl = acl.map(str::to_string);
        Ok(PublishTarget::S3(Box::new(S3Target { bucket, credentials, prefix, acl, http })))
    }

    /// Whether `key` is already there with `size` bytes.
    async fn has(&self, key: &str, size: u64) -> Result<bool> {
        match self {
            PublishTarget::Dir(dir) => Ok(std::fs::metadata(dir.join(key)).is_ok_and(|m| m.len() == size)),
            PublishTarget::S3(s3) => {
                use rusty_s3::S3Action as _;
                let url =
                    s3.bucket.head_object(s3.credentials.as_ref(), &format!("{}{key}", s3.prefix)).sign(PRESIGN_TTL);
                let r = s3.http.head(url).send().await.map_err(|e| anyhow!("HEAD {key}: {}", e.without_url()))?;
                // The header, not the body's length: a HEAD answer has no body.
                let length = r.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                Ok(r.status().is_success() && length == Some(size))
            }
        }
    }

    /// Writes blob `digest` of `image` at `key`, verified on the way.
    async fn put_blob(&self, image: &SourceImage, digest: &Digest, key: &str, bar: &ProgressBar) -> Result<()> {
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

    async fn put_bytes(&self, key: &str, bytes: &Bytes) -> Result<()> {
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
    async fn put(&self, key: &str, body: reqwest::Body, size: u64) -> Result<()> {
        use rusty_s3::S3Action as _;
        let object = format!("{}{key}", self.prefix);
        let mut action = self.bucket.put_object(self.credentials.as_ref(), &object);
        let mut request = self.http.put(reqwest::Url::parse("http://unused/")?);
        if let Some(acl) = &self.acl {
            // Signed with the request, so it must be sent exactly so.
            action.headers_mut().insert("x-amz-acl", acl.clone());
            request = request.header("x-amz-acl", acl);
        }
        let mut request = request.header(reqwest::header::CONTENT_LENGTH, size).body(body).build()?;
        *request.url_mut() = action.sign(PRESIGN_TTL);
        let r = self.http.execute(request).await.map_err(|e| anyhow!("PUT {key}: {}", e.without_url()))?;
        if !r.status().is_success() {
            let status = r.status();
            bail!("PUT {key}: the store answered {status}: {}", r.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

/// Writes every blob of `image` to `target` by `layout`, and its manifests as Pulp
/// publishes them (`manifests/2/{ref}` for images, `manifests/list/{ref}` for indexes, by
/// digest and, for the top one, by `tag`). Blobs already there with the right size are kept,
/// so an interrupted publish resumes. Returns (blobs written, blobs kept).
pub async fn publish(
    image: &SourceImage,
    target: &PublishTarget,
    name: &RepoName,
    layout: &str,
    tag: Option<&str>,
) -> Result<(usize, usize)> {
    let mut seen = HashSet::new();
    let (mut written, mut kept) = (0, 0);
    let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
    for (i, b) in blobs.iter().enumerate() {
        if !seen.insert(b.digest.clone()) {
            continue;
        }
        let key = blob_path(layout, name, &b.digest);
        if target.has(&key, b.size).await? {
            kept += 1;
            continue;
        }
        let bar = blob_progress(&format!("[{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
        target.put_blob(image, &b.digest, &key, &bar).await?;
        finish(&bar);
        written += 1;
    }
    let last = image.manifests.len() - 1;
    for (i, m) in image.manifests.iter().enumerate() {
        let kind = ParsedManifest::parse(Some(&m.media_type), &m.bytes).map(|p| p.kind).ok();
        let folder = if kind == Some(ManifestKind::Index) { "list" } else { "2" };
        target.put_bytes(&format!("manifests/{folder}/{}", m.digest), &m.bytes).await?;
        if i == last
            && let Some(tag) = tag
        {
            target.put_bytes(&format!("manifests/{folder}/{tag}"), &m.bytes).await?;
        }
    }
    Ok((written, kept))
}

/// Where an export goes: a layout directory, or (a name ending in `.tar`) an OCI archive.
fn layout_dir_for(output: &Path) -> PathBuf {
    if output.extension().is_some_and(|e| e == "tar") {
        output.with_extension("tar.partial-layout")
    } else {
        output.to_path_buf()
    }
}

/// The progress of one blob's transfer on stderr: on a terminal that can draw it, a bar with
/// bytes, rate and time left (indicatif), the digest shortened as docker does; elsewhere
/// (a log, CI, `TERM=dumb`) one line with the whole digest as the blob starts, no escapes.
fn blob_progress(what: &str, digest: &Digest, size: u64) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if bar.is_hidden() {
        eprintln!("{what} {digest} {}", megabytes(size));
        return bar;
    }
    let style = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.with_style(style).with_message(format!("{what} {}", &digest.hex()[..12]))
}

/// Leaves a finished bar on its own line.
fn finish(bar: &ProgressBar) {
    if !bar.is_hidden() {
        bar.finish();
        eprintln!();
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Writes the images `references` (`HOST/NAME:TAG`) as one OCI image layout at `output`
/// (a directory, or an OCI archive when it ends in `.tar`), each tagged `NAME:TAG` in its
/// `index.json`. Blobs already there with their size are kept, so an interrupted export
/// resumes. Returns the number of images.
pub async fn export(references: &[String], output: &Path, plain_http: bool, creds: Option<&str>) -> Result<usize> {
    let dir = layout_dir_for(output);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let mut entries = Vec::new();
    for reference in references {
        let (host, name, tag) = split_reference(reference)?;
        let image = SourceImage::read(
            &Source::Registry { host, name: name.clone(), reference: tag.clone() },
            plain_http,
            creds,
        )
        .await?;
        let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
        for (i, b) in blobs.iter().enumerate() {
            let path = dir.join("blobs").join(b.digest.algorithm().as_str()).join(b.digest.hex());
            std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == b.size) {
                eprintln!("{name}:{tag} [{}/{}] {} already exported", i + 1, blobs.len(), b.digest);
                continue;
            }
            let bar = blob_progress(&format!("{name}:{tag} [{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
            image.copy_blob(&b.digest, &path, &bar).await?;
            finish(&bar);
        }
        for m in &image.manifests {
            let path = dir.join("blobs").join(m.digest.algorithm().as_str()).join(m.digest.hex());
            std::fs::write(path, &m.bytes)?;
        }
        let top = image.manifests.last().ok_or_else(|| anyhow!("{reference}: no manifest"))?;
        entries.push(serde_json::json!({
            "mediaType": top.media_type,
            "digest": top.digest.to_string(),
            "size": top.bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": format!("{name}:{tag}") },
        }));
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": entries });
    std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    if dir != output {
        let partial = output.with_extension("tar.partial");
        {
            let file = std::fs::File::create(&partial)?;
            let mut tar = tar::Builder::new(file);
            tar.follow_symlinks(false);
            tar.append_dir_all(".", &dir)?;
            tar.into_inner()?.sync_all()?;
        }
        std::fs::rename(&partial, output)?;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(references.len())
}

/// The `NAME:TAG` references an OCI layout's `index.json` lists.
fn layout_refs(dir: &Path) -> Result<Vec<String>> {
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("index.json"))
            .with_context(|| format!("{} is not an OCI image layout", dir.display()))?,
    )?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["annotations"]["org.opencontainers.image.ref.name"].as_str().map(str::to_string))
        .collect())
}

/// Bytes per upload request of an import: bounded memory, and a broken transfer loses at
/// most one chunk.
const IMPORT_CHUNK: usize = 16 * 1024 * 1024;

/// Pushes every `NAME:TAG` image of an OCI layout (a directory or a `.tar` archive) to the
/// registry behind `dest`, under `prefix`. Blobs the registry already has are skipped, so a
/// repeated import resumes; each blob is checked against its digest as it is read, and a
/// manifest is pushed only after all it needs. Returns the references pushed.
pub async fn import(input: &Path, dest: &Upstream, prefix: Option<&str>) -> Result<Vec<String>> {
    let unpacked;
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        unpacked = tempfile::Builder::new().prefix("tessera-import").tempdir()?;
        unpack_archive(input, unpacked.path())?;
        unpacked.path().to_path_buf()
    };
    let refs = layout_refs(&dir)?;
    if refs.is_empty() {
        bail!("{} names no image (no org.opencontainers.image.ref.name annotations)", input.display());
    }
    let mut pushed = Vec::new();
    for reference in refs {
        let (name, tag) = reference
            .rsplit_once(':')
            .filter(|(_, t)| valid_tag(t).is_some())
            .ok_or_else(|| anyhow!("{reference:?} is not NAME:TAG"))?;
        let full = match prefix {
            Some(p) => format!("{}/{name}", p.trim_matches('/')),
            None => name.to_string(),
        };
        let repo: RepoName = full.parse().map_err(|e: tessera_spec::OciError| anyhow!("{full:?}: {}", e.message))?;
        let image = SourceImage::from_layout(&dir, Some(&reference), None)?;
        let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
        for (i, b) in blobs.iter().enumerate() {
            let head = dest
                .send_push(
                    Method::HEAD,
                    &repo,
                    &format!("/v2/{repo}/blobs/{}", b.digest),
                    HeaderMap::new(),
                    Bytes::new(),
                )
                .await?;
            if head.status().is_success() {
                eprintln!("{repo}:{tag} [{}/{}] {} already there", i + 1, blobs.len(), b.digest);
                continue;
            }
            let bar = blob_progress(&format!("{repo}:{tag} [{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
            let path = dir.join("blobs").join(b.digest.algorithm().as_str()).join(b.digest.hex());
            upload_file(dest, &repo, &b.digest, &path, &bar).await?;
            finish(&bar);
        }
        let last = image.manifests.len() - 1;
        for (i, m) in image.manifests.iter().enumerate() {
            let reference = if i == last { tag.to_string() } else { m.digest.to_string() };
            let r = dest
                .send_push(
                    Method::PUT,
                    &repo,
                    &format!("/v2/{repo}/manifests/{reference}"),
                    json_headers(&m.media_type),
                    m.bytes.clone(),
                )
                .await?;
            check(format!("manifest {}", m.digest), r).await?;
        }
        pushed.push(format!("{repo}:{tag}"));
    }
    Ok(pushed)
}

/// Uploads a file as the blob `digest` in chunks, verifying the digest as it reads.
async fn upload_file(dest: &Upstream, repo: &RepoName, digest: &Digest, path: &Path, bar: &ProgressBar) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut file = tokio::fs::File::open(path).await.with_context(|| format!("{digest} is not in the layout"))?;
    let start = dest
        .send_push(Method::POST, repo, &format!("/v2/{repo}/blobs/uploads/"), HeaderMap::new(), Bytes::new())
        .await?;
    if start.status().as_u16() != 202 {
        check(format!("upload of {digest}"), start).await?;
        bail!("upload of {digest}: the registry did not open a session");
    }
    let mut location = session_path(dest, &start)?;
    let mut digester = tessera_spec::Digester::new(digest.algorithm());
    let mut offset = 0u64;
    loop {
        let mut chunk = vec![0u8; IMPORT_CHUNK];
        let mut filled = 0;
        while filled < chunk.len() {
            let n = file.read(&mut chunk[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        chunk.truncate(filled);
        if chunk.is_empty() {
            break;
        }
        digester.update(&chunk);
        let mut headers = json_headers("application/octet-stream");
        let range = format!("{offset}-{}", offset + chunk.len() as u64 - 1);
        headers.insert("content-range", HeaderValue::from_str(&range)?);
        offset += chunk.len() as u64;
        let r = dest.send_push(Method::PATCH, repo, &location, headers, Bytes::from(chunk)).await?;
        if r.status().as_u16() != 202 {
            check(format!("upload of {digest}"), r).await?;
            bail!("upload of {digest}: unexpected answer");
        }
        location = session_path(dest, &r)?;
        bar.set_position(offset);
    }
    if digester.finish() != *digest {
        bail!("{} does not match its digest {digest}; nothing of this image is tagged", path.display());
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = dest
        .send_push(Method::PUT, repo, &format!("{location}{sep}digest={digest}"), HeaderMap::new(), Bytes::new())
        .await?;
    check(format!("upload of {digest}"), r).await
}

/// The path of an upload session from a `Location` header (relative, or absolute on the
/// same registry).
fn session_path(dest: &Upstream, r: &reqwest::Response) -> Result<String> {
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow!("the registry sent no upload Location"))?;
    let base = dest.url("");
    match location.strip_prefix(&base) {
        Some(rest) => Ok(rest.to_string()),
        None if location.starts_with('/') => Ok(location.to_string()),
        None => bail!("the registry sent the upload elsewhere ({location}); not followed"),
    }
}
