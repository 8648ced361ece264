//! Static sources: read-only repositories published elsewhere.
//!
//! - A directory of Crane/Pulp redirect files (`pulp-docker-redirect`, versions 2 to 4):
//!   each file is one repository whose content Pulp published under its `url` as
//!   `manifests/2/{ref}`, `manifests/list/{ref}` and `blobs/{digest}`. Crane answered every
//!   request with a redirect; here manifests are fetched, verified, cached and served by us
//!   (right media type, `Docker-Content-Digest`), and only blobs are redirected. The
//!   directory is polled, so edited files take effect without a restart.
//! - An OCI image layout as one repository: a directory (manifests and blobs served from
//!   its files) or the base URL of a static file server (manifests fetched and verified,
//!   blobs redirected).
//!
//! Redirect and fetch URLs under a `[[delivery]]` rule's CDN are rewritten and signed by it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tessera_client::layout::{self, DEFAULT_BLOB_LAYOUT, ImageIndex, PulpManifests, expand_blob_layout};
use tessera_registry::BlobAnswer;
use tessera_registry::signatures::{SIGNATURE_MAX_BYTES, SIGNATURES_PER_MANIFEST, Signature};
use tessera_spec::manifest::media;
use tessera_spec::{Accept, Digest, ErrorCode, OciError, ParsedManifest, RangeRequest, Reference, RepoName};
use tessera_store::ManifestRecord;

use crate::delivery::Delivery;

/// How long a manifest fetched by tag (and a layout URL's index) is served from memory.
const TAG_TTL: Duration = Duration::from_secs(30);
/// The largest manifest (or layout index) read from a publishing server.
const MANIFEST_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Manifest entries kept in memory per source before the cache starts over.
const CACHE_ENTRIES: usize = 4096;

/// A manifest answer: served by us, or (a schema-1-only Crane repository) a redirect.
pub enum StaticManifest {
    Here(ManifestRecord),
    Redirect(String),
}

/// A blob answer: bytes from a layout directory, or a redirect to where it is published.
pub enum StaticBlob {
    Bytes(BlobAnswer),
    Redirect(String),
}

/// One repository of a Crane directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CraneRepo {
    pub url: String,
    pub protected: bool,
    pub version: u64,
    schema2: HashSet<String>,
    lists: HashSet<String>,
    amd64: HashMap<String, (String, u64)>,
}

enum Kind {
    Crane { dir: PathBuf, repos: RwLock<Arc<HashMap<String, CraneRepo>>>, seen: Mutex<Vec<(PathBuf, SystemTime, u64)>> },
    Layout { repository: RepoName, root: LayoutRoot },
}

enum LayoutRoot {
    Dir(PathBuf),
    Url(String),
}

/// Where a static source's signatures are.
enum Lookaside {
    Dir(PathBuf),
    Url(String),
}

pub struct StaticSource {
    name: String,
    kind: Kind,
    lookaside: Option<Lookaside>,
    poll: Duration,
    http: reqwest::Client,
    /// Fetched manifests by URL, with when they were fetched.
    manifests: Mutex<HashMap<String, (ManifestRecord, Instant)>>,
    /// A layout URL's `index.json`, with when it was fetched.
    index: Mutex<Option<(Bytes, Instant)>>,
    poller: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn unknown(reference: &str) -> OciError {
    OciError::new(ErrorCode::ManifestUnknown, "manifest unknown")
        .with_detail(serde_json::json!({ "reference": reference }))
}

fn unavailable(what: &str) -> OciError {
    OciError::new(ErrorCode::Unavailable, format!("the server publishing this repository {what}"))
}

/// The directory of `digest`'s signatures in a layout's `sigstore/`, under whatever name
/// the image was exported as (the first found).
async fn exported_entry(sigstore: &Path, digest: &Digest) -> Option<PathBuf> {
    let suffix = format!("@{}={}", digest.algorithm().as_str(), digest.hex());
    let mut pending = vec![sigstore.to_path_buf()];
    // Names have several components: walk the directories, a few levels deep.
    for _ in 0..8 {
        let mut next = Vec::new();
        for dir in pending {
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else { continue };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                if path.file_name().is_some_and(|f| f.to_string_lossy().ends_with(&suffix)) {
                    return Some(path);
                }
                if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                    next.push(path);
                }
            }
        }
        pending = next;
    }
    None
}

/// `url` without the user name and password it may carry (for showing it).
fn without_user_info(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(a URL that does not parse)".to_string(),
    }
}

/// Reads one Crane/Pulp redirect file: its repository name and description, or why it is
/// not used.
pub fn parse_crane_file(text: &str) -> Result<(RepoName, CraneRepo), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(t) = v["type"].as_str()
        && t != "pulp-docker-redirect"
    {
        return Err(format!("type {t:?} is not pulp-docker-redirect"));
    }
    let version = v["version"].as_u64().ok_or("no version")?;
    match version {
        1 => return Err("version 1 describes the retired registry v1 API; skipped".into()),
        2..=4 => {}
        other => return Err(format!("version {other} is not known (2 to 4 are)")),
    }
    let id = v["repo-registry-id"].as_str().ok_or("no repo-registry-id")?;
    let name: RepoName = id.parse().map_err(|e: OciError| format!("repo-registry-id {id:?}: {}", e.message))?;
    let url = v["url"].as_str().ok_or("no url")?;
    if !tessera_config::is_http_url(url) {
        return Err(format!("url {url:?} is not http(s)"));
    }
    let strings = |key: &str| -> HashSet<String> {
        v[key].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let amd64 = v["manifest_list_amd64_tags"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(tag, pair)| Some((tag.clone(), (pair[0].as_str()?.to_string(), pair[1].as_u64()?))))
        .collect();
    Ok((
        name,
        CraneRepo {
            url: crate::delivery::ensure_slash(url),
            protected: v["protected"].as_bool().unwrap_or(false),
            version,
            schema2: strings("schema2_data"),
            lists: strings("manifest_list_data"),
            amd64,
        },
    ))
}

/// Every `*.json` file of `dir` with its modification time and size: what a change is.
fn crane_files(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.modified().ok()?, m.len()))
        })
        .collect();
    out.sort();
    out
}

fn load_crane_dir(source: &str, files: &[(PathBuf, SystemTime, u64)]) -> HashMap<String, CraneRepo> {
    let mut repos = HashMap::new();
    for (path, _, _) in files {
        let parsed = std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| parse_crane_file(&t));
        match parsed {
            Ok((name, repo)) => {
                if repos.insert(name.to_string(), repo).is_some() {
                    tracing::warn!(static_source = source, file = %path.display(), %name, "repository defined twice; the later file wins");
                }
            }
            Err(e) => tracing::warn!(static_source = source, file = %path.display(), "Crane file not used: {e}"),
        }
    }
    tracing::info!(static_source = source, repositories = repos.len(), "Crane directory loaded");
    repos
}

/// Why a `[[static]]` source cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("static {name}: crane_dir {dir} is not a directory")]
    NotADirectory { name: String, dir: PathBuf },
    #[error("static {name}: {layout} is not an OCI image layout")]
    NotALayout { name: String, layout: String },
    #[error("static {name}: repository: {why}")]
    Repository { name: String, why: String },
    #[error("static {name}: needs crane_dir or layout with repository")]
    Incomplete { name: String },
    #[error("static {name}")]
    Client {
        name: String,
        #[source]
        source: crate::upstream::BuildError,
    },
}

impl StaticSource {
    pub fn new(config: &tessera_config::StaticSource) -> Result<StaticSource, StaticError> {
        let name = || config.name.clone();
        let kind = match (&config.crane_dir, &config.layout, &config.repository) {
            (Some(dir), _, _) => {
                if !dir.is_dir() {
                    return Err(StaticError::NotADirectory { name: name(), dir: dir.clone() });
                }
                let files = crane_files(dir);
                let repos = load_crane_dir(&config.name, &files);
                Kind::Crane { dir: dir.clone(), repos: RwLock::new(Arc::new(repos)), seen: Mutex::new(files) }
            }
            (None, Some(layout), Some(repository)) => {
                let repository = repository
                    .parse()
                    .map_err(|e: OciError| StaticError::Repository { name: name(), why: e.message })?;
                let root = if tessera_config::is_http_url(layout) {
                    LayoutRoot::Url(crate::delivery::ensure_slash(layout))
                } else {
                    let dir = PathBuf::from(layout);
                    if !layout::is_layout(&dir) {
                        return Err(StaticError::NotALayout { name: name(), layout: layout.clone() });
                    }
                    LayoutRoot::Dir(dir)
                };
                Kind::Layout { repository, root }
            }
            _ => return Err(StaticError::Incomplete { name: name() }),
        };
        let http =
            crate::upstream::content_client(true).map_err(|source| StaticError::Client { name: name(), source })?;
        let lookaside = match (&config.lookaside, &kind) {
            (Some(l), _) if tessera_config::is_http_url(l) => Some(Lookaside::Url(crate::delivery::ensure_slash(l))),
            (Some(l), _) => Some(Lookaside::Dir(PathBuf::from(l))),
            (None, Kind::Layout { root: LayoutRoot::Dir(d), .. }) => Some(Lookaside::Dir(d.join("sigstore"))),
            (None, Kind::Layout { root: LayoutRoot::Url(u), .. }) => Some(Lookaside::Url(format!("{u}sigstore/"))),
            (None, Kind::Crane { .. }) => None,
        };
        Ok(StaticSource {
            name: config.name.clone(),
            kind,
            lookaside,
            poll: Duration::from_secs(config.poll_secs.max(1)),
            http,
            manifests: Mutex::new(HashMap::new()),
            index: Mutex::new(None),
            poller: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts watching a Crane directory for changed files; stops when this is dropped.
    pub fn start_polling(self: &Arc<Self>) {
        if !matches!(self.kind, Kind::Crane { .. }) {
            return;
        }
        let weak = Arc::downgrade(self);
        let poll = self.poll;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                let Some(source) = weak.upgrade() else { return };
                let Kind::Crane { dir, repos, seen } = &source.kind else { return };
                let (dir, name) = (dir.clone(), source.name.clone());
                let known = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // Reading and parsing files is blocking work: off the async workers.
                let scanned = tokio::task::spawn_blocking(move || {
                    let files = crane_files(&dir);
                    let loaded = (files != known).then(|| load_crane_dir(&name, &files));
                    (files, loaded)
                })
                .await;
                let Ok((files, loaded)) = scanned else { continue };
                if let Some(loaded) = loaded {
                    *repos.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = files;
                    source.manifests.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            }
        });
        *self.poller.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    fn crane(&self, name: &RepoName) -> Option<CraneRepo> {
        match &self.kind {
            Kind::Crane { repos, .. } => repos.read().unwrap_or_else(|p| p.into_inner()).get(name.as_str()).cloned(),
            Kind::Layout { .. } => None,
        }
    }

    /// Whether this source has a repository `name`.
    pub fn serves(&self, name: &RepoName) -> bool {
        match &self.kind {
            Kind::Crane { repos, .. } => repos.read().unwrap_or_else(|p| p.into_inner()).contains_key(name.as_str()),
            Kind::Layout { repository, .. } => repository == name,
        }
    }

    /// How many repositories it serves (without listing them).
    pub fn repository_count(&self) -> usize {
        match &self.kind {
            Kind::Crane { repos, .. } => repos.read().unwrap_or_else(|p| p.into_inner()).len(),
            Kind::Layout { .. } => 1,
        }
    }

    /// The repositories this source has, in name order.
    pub fn repositories(&self) -> Vec<RepoName> {
        match &self.kind {
            Kind::Crane { repos, .. } => {
                let mut names: Vec<RepoName> =
                    repos.read().unwrap_or_else(|p| p.into_inner()).keys().filter_map(|n| n.parse().ok()).collect();
                names.sort();
                names
            }
            Kind::Layout { repository, .. } => vec![repository.clone()],
        }
    }

    /// Where it is published: the Crane directory, the layout's directory or URL.
    pub fn location(&self) -> String {
        match &self.kind {
            Kind::Crane { dir, .. } => dir.display().to_string(),
            Kind::Layout { root: LayoutRoot::Dir(d), .. } => d.display().to_string(),
            Kind::Layout { root: LayoutRoot::Url(u), .. } => without_user_info(u),
        }
    }

    /// Whether `name` is a protected repository (served only to admitted clients).
    pub fn protected(&self, name: &RepoName) -> bool {
        self.crane(name).is_some_and(|r| r.protected)
    }

    /// In words, for `tessera explain`.
    pub fn describe(&self, name: &RepoName) -> String {
        match (&self.kind, self.crane(name)) {
            (Kind::Crane { dir, .. }, Some(r)) => format!(
                "Crane file (version {}) in {}: manifests fetched from {}manifests/..., verified and served here; blobs 307 to {}blobs/<digest>{}",
                r.version,
                dir.display(),
                r.url,
                r.url,
                if r.protected { "; protected: logged-in clients only" } else { "" }
            ),
            (Kind::Crane { dir, .. }, None) => format!("no Crane file in {} names this repository", dir.display()),
            (Kind::Layout { root: LayoutRoot::Dir(d), .. }, _) => {
                format!("OCI image layout {}: manifests and blobs served from its files", d.display())
            }
            (Kind::Layout { root: LayoutRoot::Url(u), .. }, _) => {
                format!(
                    "OCI image layout at {u}: manifests fetched, verified and served here; blobs 307 to {u}blobs/..."
                )
            }
        }
    }

    /// The simple signatures of the manifest `digest` of `name` on the source's lookaside,
    /// read as c/image does (`signature-1`, `-2`, ... until one is missing), each named by
    /// its content. A layout directory's own `sigstore/` is also searched under the name
    /// the image was exported as.
    pub async fn signatures(
        &self,
        name: &RepoName,
        digest: &Digest,
        delivery: &Delivery,
    ) -> Result<Vec<Signature>, OciError> {
        let Some(lookaside) = &self.lookaside else { return Ok(Vec::new()) };
        let entry = layout::lookaside_entry(name, digest);
        let dir_entry = match lookaside {
            Lookaside::Dir(dir) if dir.join(&entry).is_dir() => Some(dir.join(&entry)),
            Lookaside::Dir(dir) if matches!(self.kind, Kind::Layout { .. }) => exported_entry(dir, digest).await,
            Lookaside::Dir(_) | Lookaside::Url(_) => None,
        };
        let mut found = Vec::new();
        for n in 1..=SIGNATURES_PER_MANIFEST {
            let content = match lookaside {
                Lookaside::Dir(_) => match &dir_entry {
                    Some(at) => tokio::fs::read(at.join(format!("signature-{n}"))).await.ok().map(Bytes::from),
                    None => None,
                },
                Lookaside::Url(base) => {
                    let url = delivery.sign_known(&format!("{base}{entry}/signature-{n}"));
                    match self.http.get(&url).send().await {
                        Ok(r) if r.status().is_success() => {
                            crate::cache::read_limited(r, SIGNATURE_MAX_BYTES).await.ok()
                        }
                        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => None,
                        Ok(r) => {
                            tracing::warn!(static_source = %self.name, url, status = %r.status(), "signature not read");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(static_source = %self.name, url, "signature not read: {}", e.without_url());
                            None
                        }
                    }
                }
            };
            let Some(content) = content.filter(|c| !c.is_empty() && c.len() <= SIGNATURE_MAX_BYTES) else { break };
            found.push(Signature { name: layout::signature_name(digest, &content), content });
        }
        Ok(found)
    }

    /// Tags, sorted.
    pub async fn tags(&self, name: &RepoName, delivery: &Delivery) -> Result<Vec<String>, OciError> {
        let mut tags: Vec<String> = match &self.kind {
            Kind::Crane { .. } => {
                let r = self.crane(name).ok_or_else(|| OciError::new(ErrorCode::NameUnknown, "repository unknown"))?;
                r.schema2.iter().chain(r.lists.iter()).chain(r.amd64.keys()).cloned().collect()
            }
            Kind::Layout { .. } => self.layout_index(delivery).await?.into_iter().map(|(tag, _, _)| tag).collect(),
        };
        tags.retain(|t| t.parse::<Digest>().is_err() && t.parse::<tessera_spec::Tag>().is_ok());
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// A manifest by tag or digest, verified.
    pub async fn manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        accept: &Accept,
        delivery: &Delivery,
    ) -> Result<StaticManifest, OciError> {
        match &self.kind {
            Kind::Crane { .. } => {
                let repo = self.crane(name).ok_or_else(|| unknown(&reference.to_string()))?;
                self.crane_manifest(&repo, reference, accept, delivery).await
            }
            Kind::Layout { root, .. } => {
                let (digest, media_type) = match reference {
                    Reference::Digest(d) => (d.clone(), None),
                    Reference::Tag(t) => self
                        .layout_index(delivery)
                        .await?
                        .into_iter()
                        .find(|(tag, _, _)| tag == t.as_str())
                        .map(|(_, d, m)| (d, Some(m)))
                        .ok_or_else(|| unknown(t.as_str()))?,
                };
                let record = match root {
                    LayoutRoot::Dir(dir) => {
                        let path = layout::blob_path(dir, &digest);
                        let bytes = match tokio::fs::read(&path).await {
                            Ok(b) => Bytes::from(b),
                            Err(_) => return Err(unknown(&digest.to_string())),
                        };
                        record(&digest.to_string(), bytes, Some(&digest), media_type.as_deref())?
                    }
                    LayoutRoot::Url(base) => {
                        let url = format!("{base}{}", layout::blob_key(&digest));
                        self.fetch(&url, &digest.to_string(), Some(&digest), media_type.as_deref(), delivery).await?
                    }
                };
                if let Reference::Tag(_) = reference
                    && (record.media_type == media::OCI_INDEX || record.media_type == media::DOCKER_LIST)
                    && !accept.admits(&record.media_type)
                {
                    return Err(unknown(&reference.to_string()));
                }
                Ok(StaticManifest::Here(record))
            }
        }
    }

    /// Crane's choice of what to serve for a reference, by what the client accepts.
    async fn crane_manifest(
        &self,
        repo: &CraneRepo,
        reference: &Reference,
        accept: &Accept,
        delivery: &Delivery,
    ) -> Result<StaticManifest, OciError> {
        let id = reference.to_string();
        let wanted = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        };
        let (path, media_type) = if repo.lists.contains(&id) && accept.admits(media::DOCKER_LIST) {
            (PulpManifests::List.key(&id), media::DOCKER_LIST)
        } else if let Some((digest, version)) = repo.amd64.get(&id) {
            if *version != 2 || !accept.admits(media::DOCKER_MANIFEST) {
                return Ok(StaticManifest::Redirect(delivery.sign_known(&format!(
                    "{}{}",
                    repo.url,
                    PulpManifests::Schema1.key(digest)
                ))));
            }
            let digest: Digest = digest.parse().map_err(|_| unknown(&id))?;
            let url = format!("{}{}", repo.url, PulpManifests::Schema2.key(&digest.to_string()));
            let record = self.fetch(&url, &id, Some(&digest), Some(media::DOCKER_MANIFEST), delivery).await?;
            return Ok(StaticManifest::Here(record));
        } else if repo.schema2.contains(&id) {
            (PulpManifests::Schema2.key(&id), media::DOCKER_MANIFEST)
        } else if repo.lists.contains(&id) {
            (PulpManifests::List.key(&id), media::DOCKER_LIST)
        } else if repo.version == 2 || (repo.schema2.is_empty() && repo.lists.is_empty()) {
            // Only schema 1 was published: its signed payloads are not re-served, but sent
            // on as Crane did.
            return Ok(StaticManifest::Redirect(delivery.sign_known(&format!(
                "{}{}",
                repo.url,
                PulpManifests::Schema1.key(&id)
            ))));
        } else {
            return Err(unknown(&id));
        };
        let url = format!("{}{path}", repo.url);
        let record = self.fetch(&url, &id, wanted, Some(media_type), delivery).await?;
        Ok(StaticManifest::Here(record))
    }

    /// Fetches a manifest (cached: by digest for good, by tag for `TAG_TTL`), checks it
    /// against `wanted` and parses it.
    async fn fetch(
        &self,
        url: &str,
        reference: &str,
        wanted: Option<&Digest>,
        media_type: Option<&str>,
        delivery: &Delivery,
    ) -> Result<ManifestRecord, OciError> {
        if let Some((record, at)) = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).get(url)
            && match wanted {
                Some(w) => &record.digest == w,
                None => at.elapsed() < TAG_TTL,
            }
        {
            return Ok(record.clone());
        }
        let answer = self.http.get(delivery.sign_known(url)).send().await.map_err(|e| {
            tracing::warn!(static_source = %self.name, url, "fetch failed: {}", e.without_url());
            unavailable("could not be reached")
        })?;
        match answer.status().as_u16() {
            200 => {}
            404 | 410 => return Err(unknown(reference)),
            status => {
                tracing::warn!(static_source = %self.name, url, status, "fetch refused");
                return Err(unavailable(&format!("answered {status}")));
            }
        }
        let bytes = crate::cache::read_limited(answer, MANIFEST_MAX_BYTES).await.map_err(|e| {
            tracing::warn!(static_source = %self.name, url, "manifest not read: {e}");
            unavailable("sent no usable manifest")
        })?;
        let record = record(reference, bytes, wanted, media_type).inspect_err(|e| {
            tracing::warn!(static_source = %self.name, url, "manifest refused: {}", e.message);
        })?;
        let mut cache = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(url.to_string(), (record.clone(), Instant::now()));
        Ok(record)
    }

    /// A layout's tagged manifests: (tag, digest, media type).
    async fn layout_index(&self, delivery: &Delivery) -> Result<Vec<(String, Digest, String)>, OciError> {
        let Kind::Layout { root, .. } = &self.kind else { return Ok(Vec::new()) };
        let bytes = match root {
            LayoutRoot::Dir(dir) => Bytes::from(
                tokio::fs::read(layout::index_path(dir)).await.map_err(|_| unavailable("has no index.json"))?,
            ),
            LayoutRoot::Url(base) => {
                let cached = self.index.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match cached {
                    Some((bytes, at)) if at.elapsed() < TAG_TTL.min(self.poll) => bytes,
                    _ => {
                        let url = delivery.sign_known(&format!("{base}{}", layout::INDEX_FILE));
                        let answer =
                            self.http.get(url).send().await.map_err(|_| unavailable("could not be reached"))?;
                        if !answer.status().is_success() {
                            return Err(unavailable(&format!("answered {} for index.json", answer.status())));
                        }
                        let bytes = crate::cache::read_limited(answer, MANIFEST_MAX_BYTES)
                            .await
                            .map_err(|_| unavailable("sent no usable index.json"))?;
                        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = Some((bytes.clone(), Instant::now()));
                        bytes
                    }
                }
            }
        };
        let index =
            ImageIndex::parse(&bytes).map_err(|_| unavailable("has an index.json that is not an image index"))?;
        Ok(index
            .named()
            .map(|(tag, digest, media_type)| {
                (tag.to_string(), digest, media_type.unwrap_or(media::OCI_MANIFEST).to_string())
            })
            .collect())
    }

    /// A blob: bytes from a layout directory, else a redirect to where it is published.
    pub async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        delivery: &Delivery,
    ) -> Result<StaticBlob, OciError> {
        let blob_unknown = || {
            OciError::new(ErrorCode::BlobUnknown, "blob unknown to registry")
                .with_detail(serde_json::json!({ "digest": digest.to_string() }))
        };
        match &self.kind {
            Kind::Crane { .. } => {
                let repo = self.crane(name).ok_or_else(blob_unknown)?;
                let path = expand_blob_layout(DEFAULT_BLOB_LAYOUT, name, digest);
                Ok(StaticBlob::Redirect(delivery.sign_known(&format!("{}{path}", repo.url))))
            }
            Kind::Layout { root: LayoutRoot::Url(base), .. } => {
                Ok(StaticBlob::Redirect(delivery.sign_known(&format!("{base}{}", layout::blob_key(digest)))))
            }
            Kind::Layout { root: LayoutRoot::Dir(dir), .. } => {
                let path = layout::blob_path(dir, digest);
                let size = tokio::fs::metadata(&path).await.map_err(|_| blob_unknown())?.len();
                let range = RangeRequest::resolve_opt(range, size)?;
                let read = tessera_store::fs::read_file(path, range.map(|r| (r.start, r.end)))
                    .await
                    .map_err(|_| blob_unknown())?
                    .ok_or_else(blob_unknown)?;
                Ok(StaticBlob::Bytes(BlobAnswer { size, range, read }))
            }
        }
    }
}

impl Drop for StaticSource {
    fn drop(&mut self) {
        if let Some(task) = self.poller.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// A verified manifest record: the bytes must hash to `wanted` when given, and parse.
fn record(
    reference: &str,
    bytes: Bytes,
    wanted: Option<&Digest>,
    media_type: Option<&str>,
) -> Result<ManifestRecord, OciError> {
    let digest = match wanted {
        Some(w) => {
            let actual = Digest::of(w.algorithm(), &bytes);
            if &actual != w {
                return Err(OciError::new(
                    ErrorCode::Unavailable,
                    "the published manifest does not match its digest; it is not served",
                )
                .with_detail(serde_json::json!({ "reference": reference })));
            }
            actual
        }
        None => Digest::sha256_of(&bytes),
    };
    // The document's own mediaType, else what the layout or folder says it is.
    let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string));
    let media_type = declared.or(media_type.map(str::to_string)).unwrap_or_else(|| media::OCI_MANIFEST.into());
    let parsed = ParsedManifest::parse(Some(&media_type), &bytes)?;
    Ok(ManifestRecord::new(digest, bytes, &parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_location_keeps_no_password() {
        assert_eq!(without_user_info("https://bob:secret@files.example/layout/"), "https://files.example/layout/");
        assert_eq!(without_user_info("http://127.0.0.1:8080/x/"), "http://127.0.0.1:8080/x/");
    }

    #[test]
    fn crane_files_of_each_version() {
        let v4 = r#"{"type":"pulp-docker-redirect","version":4,"repository":"zoo","repo-registry-id":"redhat/zoo",
            "url":"http://cdn.example/zoo/bar","protected":true,
            "schema2_data":["sha256:a1d963a97357110bdbfc70767a495c8df6ddfa9bda4da3183165ca73c3b990d2","1.25.1-musl"],
            "manifest_list_data":["bar","latest"],
            "manifest_list_amd64_tags":{"bar":["sha256:c55544de64a01e157b9d931f5db7a16554a14be19c367f91c9a8cdc46db086bf",2]}}"#;
        let (name, repo) = parse_crane_file(v4).unwrap();
        assert_eq!(name.as_str(), "redhat/zoo");
        assert_eq!(repo.url, "http://cdn.example/zoo/bar/");
        assert!(repo.protected && repo.lists.contains("latest") && repo.schema2.contains("1.25.1-musl"));
        assert_eq!(repo.amd64["bar"].1, 2);
        let v3 = r#"{"repository":"foo","repo-registry-id":"redhat/foo","url":"http://cdn.example/foo","version":3,"schema2_data":["1"]}"#;
        assert_eq!(parse_crane_file(v3).unwrap().1.version, 3);
        let v1 = r#"{"repo-registry-id":"old","url":"http://x/","version":1,"images":[],"tags":{}}"#;
        assert!(parse_crane_file(v1).unwrap_err().contains("retired"));
        assert!(parse_crane_file(r#"{"repo-registry-id":"../x","url":"http://x/","version":4}"#).is_err());
        assert!(parse_crane_file(r#"{"repo-registry-id":"x","url":"file:///etc/","version":4}"#).is_err());
        assert!(parse_crane_file(r#"{"type":"other","repo-registry-id":"x","url":"http://x/","version":4}"#).is_err());
    }

    proptest::proptest! {
        /// Whatever a Crane directory holds, reading a file answers or refuses; it never panics.
        #[test]
        fn crane_files_never_panic(text in ".{0,300}", version in 0u64..8, id in ".{0,40}", url in ".{0,40}") {
            let _ = parse_crane_file(&text);
            let doc = serde_json::json!({"repo-registry-id": id, "url": url, "version": version,
                "schema2_data": [id.clone()], "manifest_list_amd64_tags": {"t": [url.clone(), version]}});
            let _ = parse_crane_file(&doc.to_string());
        }
    }

    #[test]
    fn records_are_verified_against_their_digest() {
        let body = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:a1d963a97357110bdbfc70767a495c8df6ddfa9bda4da3183165ca73c3b990d2","size":1},"layers":[]}"#);
        let right = Digest::sha256_of(&body);
        assert_eq!(record("x", body.clone(), Some(&right), None).unwrap().digest, right);
        let wrong = Digest::sha256_of(b"other");
        assert_eq!(record("x", body, Some(&wrong), None).unwrap_err().code, ErrorCode::Unavailable);
    }
}
