//! Where an image comes from, in skopeo's transport syntax, and the image read from it: its
//! manifests, configs and layers, with every byte checked against its digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use reqwest::Method;
use reqwest::header::HeaderMap;
use tessera_spec::{Digest, Digester, ParsedManifest, RepoName};

use crate::error::ClientError;
use crate::layout::{self, ImageIndex};
use crate::reference::RegistryReference;
use crate::upstream::Upstream;
use crate::{archive, registry_client};

/// Where an image comes from, in skopeo's transport syntax.
#[derive(Debug, Clone)]
pub enum Source {
    /// `oci:DIR[:TAG]`
    Layout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE`
    Archive(PathBuf),
    /// `docker://HOST/NAME[:TAG|@DIGEST]`
    Registry(RegistryReference),
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, ClientError> {
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
            return Ok(Source::Registry(RegistryReference::parse(rest)?));
        }
        Err(ClientError::SourceSyntax(text.to_string()))
    }
}

/// `text` if it is a valid tag (tags name files and URL paths, so nothing else passes).
fn valid_tag(text: &str) -> Option<String> {
    text.parse::<tessera_spec::Tag>().ok().map(|t| t.to_string())
}

/// The tag of an image's name in a layout or archive: what follows the last `:` of
/// `NAME:TAG`, or the whole of a bare tag; only a valid tag.
fn tag_of(name: &str) -> Option<String> {
    valid_tag(name.rsplit_once(':').map_or(name, |(_, t)| t))
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
    /// An OCI image layout directory.
    Layout(PathBuf),
    /// Files of a legacy `docker save` archive, by digest.
    Files(Vec<(Digest, PathBuf)>),
    Registry(Arc<Upstream>, RepoName),
}

impl SourceImage {
    /// The simple signatures of the manifest `digest` where the source keeps them: a
    /// registry's signature extension, a layout's `sigstore/` under `name`.
    pub async fn signatures(&self, name: &RepoName, digest: &Digest) -> Result<Vec<Vec<u8>>, ClientError> {
        match &self.blobs {
            BlobSource::Registry(client, source_name) => {
                crate::copy::signature_contents(client, source_name, digest).await
            }
            BlobSource::Layout(dir) => {
                let at = crate::layout::lookaside_dir(dir, name, digest);
                Ok((1..).map_while(|n| std::fs::read(at.join(format!("signature-{n}"))).ok()).collect())
            }
            BlobSource::Files(_) => Ok(Vec::new()),
        }
    }

    fn empty(blobs: BlobSource, tag: Option<String>, unpacked: Option<tempfile::TempDir>) -> SourceImage {
        SourceImage { manifests: Vec::new(), configs: Vec::new(), layers: Vec::new(), blobs, tag, _unpacked: unpacked }
    }

    /// Reads the image `source` names; a `docker://` source is reached over plain HTTP with
    /// `src_plain_http`, with `src_creds` (`USER:PASSWORD`) when given.
    pub async fn read(
        source: &Source,
        src_plain_http: bool,
        src_creds: Option<&str>,
    ) -> Result<SourceImage, ClientError> {
        match source {
            Source::Layout { dir, tag } => Self::from_layout(dir, tag.as_deref(), None),
            Source::Archive(file) => {
                let unpacked = tempfile::Builder::new().prefix("tessera-archive").tempdir()?;
                archive::unpack(file, unpacked.path())?;
                if layout::is_layout(unpacked.path()) {
                    // Docker 25 and later save an OCI image layout.
                    let dir = unpacked.path().to_path_buf();
                    Self::from_layout(&dir, None, Some(unpacked))
                } else {
                    Self::from_legacy_archive(unpacked)
                }
            }
            Source::Registry(reference) => Self::from_registry(reference, src_plain_http, src_creds).await,
        }
    }

    async fn from_registry(
        reference: &RegistryReference,
        plain_http: bool,
        creds: Option<&str>,
    ) -> Result<SourceImage, ClientError> {
        let (host, name) = (&reference.host, &reference.image.name);
        let upstream = registry_client(host, plain_http, creds)?;
        let tag = reference.image.tag().map(ToString::to_string);
        let mut image = Self::empty(BlobSource::Registry(upstream.clone(), name.clone()), tag, None);
        let (status, content_type, bytes) = upstream.get_manifest(name, &reference.image.reference.to_string()).await?;
        if status != 200 {
            return Err(ClientError::Status {
                what: format!("{reference}: the registry"),
                status: status_code(status),
            });
        }
        let mut pending = vec![(bytes, content_type)];
        let mut order = Vec::new();
        while let Some((bytes, content_type)) = pending.pop() {
            let parsed = ParsedManifest::parse(content_type.as_deref(), &bytes)
                .map_err(|error| ClientError::Manifest { what: format!("{host}/{name}"), error })?;
            for child in &parsed.manifests {
                let (status, ct, b) = upstream.get_manifest(name, &child.digest.to_string()).await?;
                if status != 200 || Digest::of(child.digest.algorithm(), &b) != child.digest {
                    let what = format!("{host}/{name}@{}", child.digest);
                    return Err(ClientError::NotServedCorrectly { what, status: status_code(status) });
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

    /// The image of the layout directory `dir` named `tag` (its `ref.name` or containerd
    /// name, whole or after the `:` of `NAME:TAG`), else its first image.
    pub(crate) fn from_layout(
        dir: &Path,
        tag: Option<&str>,
        unpacked: Option<tempfile::TempDir>,
    ) -> Result<SourceImage, ClientError> {
        let index = read_index(dir)?;
        let entries = &index.manifests;
        let chosen = match tag {
            Some(tag) => entries
                .iter()
                .find(|e| e.names().any(|n| n == tag))
                .or_else(|| entries.iter().find(|e| e.names().any(|n| n.ends_with(&format!(":{tag}")))))
                .ok_or_else(|| ClientError::NoSuchTag { dir: dir.to_path_buf(), tag: tag.to_string() })?,
            None => entries.first().ok_or_else(|| ClientError::EmptyLayout { dir: dir.to_path_buf() })?,
        };
        let read_blob = |d: &Digest| -> Result<Bytes, ClientError> {
            let path = layout::blob_path(dir, d);
            let bytes = std::fs::read(&path).map_err(|source| ClientError::MissingBlob {
                digest: d.clone(),
                place: format!("the layout {}", dir.display()),
                source,
            })?;
            if Digest::of(d.algorithm(), &bytes) != *d {
                return Err(ClientError::Corrupt(path));
            }
            Ok(Bytes::from(bytes))
        };
        let top = chosen.digest().ok_or_else(|| ClientError::IndexDigest { dir: dir.to_path_buf() })?;
        // The tag names files a publish writes: only a valid tag is kept.
        let tag = chosen.names().next().and_then(tag_of);
        let mut image = Self::empty(BlobSource::Layout(dir.to_path_buf()), tag, unpacked);
        let mut order = Vec::new();
        let mut pending = vec![(top, chosen.media_type.clone())];
        while let Some((digest, media_type)) = pending.pop() {
            let bytes = read_blob(&digest)?;
            let parsed = ParsedManifest::parse(media_type.as_deref(), &bytes)
                .map_err(|error| ClientError::Manifest { what: digest.to_string(), error })?;
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

    /// A `docker save` archive from before Docker 25. The image is the Docker schema 2
    /// manifest of its config and layer files.
    fn from_legacy_archive(unpacked: tempfile::TempDir) -> Result<SourceImage, ClientError> {
        let legacy = archive::legacy_image(unpacked.path())?;
        let media_type = tessera_spec::manifest::media::DOCKER_MANIFEST;
        let parsed = ParsedManifest::parse(Some(media_type), &legacy.manifest)
            .map_err(|error| ClientError::Manifest { what: "the archive's image".into(), error })?;
        let tag = legacy.repo_tag.as_deref().and_then(|t| t.rsplit_once(':')).and_then(|(_, t)| valid_tag(t));
        let mut image = Self::empty(BlobSource::Files(legacy.files), tag, Some(unpacked));
        image.add(legacy.manifest, parsed);
        Ok(image)
    }

    /// The local file holding blob `d` (layouts and archives).
    fn blob_file(&self, d: &Digest) -> Result<Option<PathBuf>, ClientError> {
        Ok(match &self.blobs {
            BlobSource::Layout(dir) => Some(layout::blob_path(dir, d)),
            BlobSource::Files(files) => Some(
                files
                    .iter()
                    .find(|(fd, _)| fd == d)
                    .map(|(_, p)| p.clone())
                    .ok_or(ClientError::UnknownBlob(d.clone()))?,
            ),
            BlobSource::Registry(..) => None,
        })
    }

    /// A blob's bytes, whole and verified (configs are small).
    pub async fn blob(&self, d: &Digest) -> Result<Bytes, ClientError> {
        let bytes = match (&self.blobs, self.blob_file(d)?) {
            (_, Some(path)) => Bytes::from(tokio::fs::read(path).await?),
            (BlobSource::Registry(upstream, name), None) => {
                let r = upstream.send(Method::GET, name, &format!("/v2/{name}/blobs/{d}"), HeaderMap::new()).await?;
                if !r.status().is_success() {
                    return Err(ClientError::Status { what: format!("{d}: the source registry"), status: r.status() });
                }
                r.bytes().await?
            }
            (_, None) => return Err(ClientError::UnknownBlob(d.clone())),
        };
        if Digest::of(d.algorithm(), &bytes) != *d {
            return Err(ClientError::SourceMismatch(d.clone()));
        }
        Ok(bytes)
    }

    /// The answer to a GET of blob `d` from a registry source, its body still to read.
    pub(crate) async fn blob_answer(&self, d: &Digest) -> Result<reqwest::Response, ClientError> {
        let BlobSource::Registry(upstream, name) = &self.blobs else {
            return Err(ClientError::UnknownBlob(d.clone()));
        };
        let r = upstream.send(Method::GET, name, &format!("/v2/{name}/blobs/{d}"), HeaderMap::new()).await?;
        if !r.status().is_success() {
            return Err(ClientError::Status { what: format!("{d}: the source registry"), status: r.status() });
        }
        Ok(r)
    }

    /// Copies a blob into `path` (through a temporary file, verified, then renamed).
    pub(crate) async fn copy_blob(&self, d: &Digest, path: &Path, bar: &ProgressBar) -> Result<(), ClientError> {
        use tokio::io::AsyncWriteExt as _;
        let partial = path.with_extension("partial");
        let mut out = tokio::fs::File::create(&partial).await?;
        let mut digester = Digester::new(d.algorithm());
        match (&self.blobs, self.blob_file(d)?) {
            (_, Some(source)) => {
                let mut input = tokio::fs::File::open(&source).await.map_err(|source| ClientError::MissingBlob {
                    digest: d.clone(),
                    place: "the source".into(),
                    source,
                })?;
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
            (BlobSource::Registry(upstream, name), None) => {
                // A Tessera source streams what it holds instead of redirecting to its CDN
                // (which may be the very place being published to); others ignore this.
                let path = format!("/v2/{name}/blobs/{d}?delivery=stream");
                let mut r = upstream.send(Method::GET, name, &path, HeaderMap::new()).await?;
                if !r.status().is_success() {
                    return Err(ClientError::Status { what: format!("{d}: the source registry"), status: r.status() });
                }
                while let Some(chunk) = r.chunk().await? {
                    digester.update(&chunk);
                    out.write_all(&chunk).await?;
                    bar.inc(chunk.len() as u64);
                }
            }
            (_, None) => return Err(ClientError::UnknownBlob(d.clone())),
        }
        out.sync_all().await?;
        if digester.finish() != *d {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ClientError::SourceMismatch(d.clone()));
        }
        tokio::fs::rename(&partial, path).await?;
        Ok(())
    }
}

/// The `index.json` of the layout directory `dir`.
pub(crate) fn read_index(dir: &Path) -> Result<ImageIndex, ClientError> {
    let bytes = std::fs::read(layout::index_path(dir))
        .map_err(|source| ClientError::NotALayout { dir: dir.to_path_buf(), source })?;
    ImageIndex::parse(&bytes).map_err(|source| ClientError::BadIndex { dir: dir.to_path_buf(), source })
}

fn status_code(status: u16) -> reqwest::StatusCode {
    reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY)
}
