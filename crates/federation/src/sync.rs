//! Scheduled sync (`[[sync]]`): chosen repositories of an upstream kept mirrored before
//! anyone pulls them, into the upstream's pull-through cache or into hosted repositories,
//! for sites that want the content inside before the link goes down.
//!
//! A pass lists each repository's tags at the upstream (or, for a prefix, the upstream's
//! catalog first), keeps those matching the job's patterns, and brings each image with
//! every manifest an index lists and every blob they need:
//! - into the cache, through the cache itself (the same verified, single-flight fills a
//!   client's pull makes), so a pass and a client asking at once fetch a blob once;
//! - into hosted, by the hosted registry's own rules: a blob it already links is skipped,
//!   one held for another repository is mounted, others stream from the upstream and are
//!   verified against their digest as they are stored; an image whose tag already points at
//!   the upstream's digest is not fetched at all.
//!
//! An image that fails is counted and logged, and the pass goes on with the next.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use reqwest::Method;
use reqwest::header::HeaderMap;
use tessera_registry::Registry;
use tessera_spec::manifest::ManifestKind;
use tessera_spec::name::prefix_covers;
use tessera_spec::{Digest, ErrorCode, OciError, Paging, ParsedManifest, Reference, RepoName, Tag};
use wildmatch::WildMatch;

use crate::upstream::manifest_accept;
use crate::{Federation, PullThrough, UpstreamAuth};

/// Where a job puts what it brings.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncInto {
    /// The upstream's pull-through cache.
    Cache,
    /// Hosted repositories, named `prefix/<upstream name>` (or as at the upstream).
    Hosted { prefix: Option<String> },
}

/// One `[[sync]]` job with its figures.
#[derive(Debug)]
pub struct SyncJob {
    pub name: String,
    pub upstream: String,
    pub repositories: Vec<RepoName>,
    pub prefixes: Vec<String>,
    /// Tag patterns (`*` and `?` wildcards).
    pub tags: Vec<String>,
    pub into: SyncInto,
    pub stats: SyncStats,
}

/// What a job's passes did, for `/metrics`.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub passes: AtomicU64,
    /// Images brought in (or refreshed).
    pub images_synced: AtomicU64,
    /// Images found already in place.
    pub images_present: AtomicU64,
    pub images_failed: AtomicU64,
    /// Blob bytes fetched from the upstream.
    pub bytes_fetched: AtomicU64,
    /// When the last pass without a failure ended (seconds since the epoch; 0: never).
    pub last_success: AtomicU64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncReport {
    pub synced: u64,
    pub present: u64,
    pub failed: u64,
    pub bytes_fetched: u64,
}

impl SyncJob {
    fn wants(&self, tag: &Tag) -> bool {
        self.tags.iter().any(|p| WildMatch::new(p).matches(tag.as_str()))
    }

    fn hosted_name(&self, name: &RepoName, prefix: Option<&str>) -> Result<RepoName, OciError> {
        match prefix.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
            Some(p) => format!("{p}/{name}").parse(),
            None => Ok(name.clone()),
        }
    }
}

/// What one image brought: whether it was already in place, and blob bytes fetched.
struct Brought {
    present: bool,
    bytes: u64,
}

impl Federation {
    /// One pass of `job` (see the module docs); `hosted` takes what a hosted job brings.
    pub async fn sync(&self, job: &SyncJob, hosted: &Registry) -> Result<SyncReport, OciError> {
        let cache = self.caches.get(&job.upstream).ok_or_else(|| {
            OciError::new(ErrorCode::Unsupported, format!("sync {}: no upstream {:?}", job.name, job.upstream))
        })?;
        let mut report = SyncReport::default();
        let mut repositories = job.repositories.clone();
        for prefix in &job.prefixes {
            for name in catalog(cache, prefix).await? {
                if !repositories.contains(&name) {
                    repositories.push(name);
                }
            }
        }
        for name in &repositories {
            let tags = match all_tags(cache, name).await {
                Ok(tags) => tags,
                Err(e) => {
                    tracing::warn!(sync = job.name, %name, "cannot list the upstream's tags: {}", e.message);
                    report.failed += 1;
                    continue;
                }
            };
            for tag in tags.iter().filter(|t| job.wants(t)) {
                let brought = match &job.into {
                    SyncInto::Cache => into_cache(cache, name, tag).await,
                    SyncInto::Hosted { prefix } => {
                        let to = job.hosted_name(name, prefix.as_deref())?;
                        into_hosted(cache, hosted, name, &to, tag).await
                    }
                };
                match brought {
                    Ok(Brought { present: true, .. }) => report.present += 1,
                    Ok(Brought { bytes, .. }) => {
                        report.synced += 1;
                        report.bytes_fetched += bytes;
                        tracing::info!(sync = job.name, %name, %tag, bytes, "synced");
                    }
                    Err(e) => {
                        report.failed += 1;
                        tracing::warn!(sync = job.name, %name, %tag, "not synced: {}", e.message);
                    }
                }
            }
        }
        let stats = &job.stats;
        stats.passes.fetch_add(1, Ordering::Relaxed);
        stats.images_synced.fetch_add(report.synced, Ordering::Relaxed);
        stats.images_present.fetch_add(report.present, Ordering::Relaxed);
        stats.images_failed.fetch_add(report.failed, Ordering::Relaxed);
        stats.bytes_fetched.fetch_add(report.bytes_fetched, Ordering::Relaxed);
        if report.failed == 0 {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            stats.last_success.store(now.as_secs(), Ordering::Relaxed);
        }
        Ok(report)
    }
}

/// Names under `prefix` in the upstream's catalog, following its pages.
async fn catalog(cache: &PullThrough, prefix: &str) -> Result<Vec<RepoName>, OciError> {
    let upstream = cache.upstream();
    // The token scope a catalog needs is the registry's; the prefix's name stands in where
    // a repository is asked for.
    let scope: RepoName = prefix.trim_matches('/').parse().unwrap_or_else(|_| "library".parse().expect("valid"));
    let mut names = Vec::new();
    let mut path = "/v2/_catalog?n=1000".to_string();
    loop {
        let r = upstream
            .send(Method::GET, &scope, &path, HeaderMap::new())
            .await
            .map_err(|e| unavailable(&format!("catalog: {}", tessera_client::error::chain(&e))))?;
        if !r.status().is_success() {
            return Err(unavailable(&format!("catalog answered {}", r.status())));
        }
        let next = next_link(r.headers());
        let page: serde_json::Value = r.json().await.map_err(|e| unavailable(&format!("catalog: {e}")))?;
        for name in page["repositories"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
            if prefix_covers(prefix, name)
                && let Ok(name) = name.parse()
            {
                names.push(name);
            }
        }
        match next {
            Some(link) => path = link,
            None => return Ok(names),
        }
    }
}

fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    let (_, rest) = link.split_once('<')?;
    Some(rest.split_once('>')?.0.to_string())
}

/// Every tag of `name` at the upstream.
async fn all_tags(cache: &PullThrough, name: &RepoName) -> Result<Vec<Tag>, OciError> {
    let mut tags = Vec::new();
    let mut paging = Paging { n: Some(1000), last: None };
    loop {
        let page = cache.tags(name, &paging, &UpstreamAuth::Configured).await?;
        tags.extend(page.items.iter().filter_map(|t| t.parse::<Tag>().ok()));
        match (page.more, page.items.last()) {
            (true, Some(last)) => paging.last = Some(last.clone()),
            _ => return Ok(tags),
        }
    }
}

/// Brings `name:tag` into the upstream's cache: its manifests, and every blob read through
/// the cache to its end (which is what keeps it).
async fn into_cache(cache: &PullThrough, name: &RepoName, tag: &Tag) -> Result<Brought, OciError> {
    let auth = UpstreamAuth::Configured;
    let top = cache.manifest(name, &Reference::Tag(tag.clone()), &auth).await?.manifest;
    // The cache keeps the signatures it reads, for the route's clients and rules.
    if let Err(e) = cache.signatures(name, &top.digest, &auth).await {
        tracing::warn!(%name, %tag, "signatures not synced: {}", e.message);
    }
    let mut fetched = 0;
    let mut pending = vec![top];
    while let Some(m) = pending.pop() {
        let parsed = ParsedManifest::parse(Some(&m.media_type), &m.bytes)?;
        if parsed.kind == ManifestKind::Index {
            for child in &parsed.manifests {
                pending.push(cache.manifest(name, &Reference::Digest(child.digest.clone()), &auth).await?.manifest);
            }
        }
        for blob in parsed.required_blobs() {
            let held = cache.holds(name, &blob.digest).await?;
            let answer = cache.blob(name, &blob.digest, None, &auth).await?;
            let mut body = answer.read.body;
            while let Some(chunk) = body.next().await {
                chunk.map_err(|e| unavailable(&format!("{}: {e}", blob.digest)))?;
            }
            if !held {
                fetched += blob.size;
            }
        }
    }
    Ok(Brought { present: fetched == 0, bytes: fetched })
}

/// Brings `name:tag` from the upstream into the hosted repository `to`.
async fn into_hosted(
    cache: &PullThrough,
    hosted: &Registry,
    name: &RepoName,
    to: &RepoName,
    tag: &Tag,
) -> Result<Brought, OciError> {
    let upstream = cache.upstream();
    let failed = |e: crate::upstream::UpstreamError| unavailable(&tessera_client::error::chain(&e));
    // The upstream's digest for the tag, with a HEAD: a tag already in place costs nothing more.
    let head = upstream
        .send(Method::HEAD, name, &format!("/v2/{name}/manifests/{tag}"), manifest_accept())
        .await
        .map_err(failed)?;
    let upstream_digest = head
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let here = hosted.manifest_digest(to, tag).await?;
    if let Some(digest) = &upstream_digest
        && here.as_ref() == Some(digest)
    {
        // Signatures may have been added since the image was brought.
        hosted_signatures(cache, hosted, name, to, digest).await;
        return Ok(Brought { present: true, bytes: 0 });
    }
    // Manifests first (verified), children before the index that lists them.
    let mut order = Vec::new();
    let mut pending = vec![(tag.to_string(), upstream_digest)];
    while let Some((reference, expected)) = pending.pop() {
        let (status, content_type, bytes) = upstream.get_manifest(name, &reference).await.map_err(failed)?;
        if status != 200 {
            return Err(unavailable(&format!("{name}:{reference} answered {status}")));
        }
        let digest = Digest::sha256_of(&bytes);
        if let Some(expected) = &expected
            && Digest::of(expected.algorithm(), &bytes) != *expected
        {
            return Err(unavailable(&format!("{name}:{reference} does not match its digest {expected}")));
        }
        let parsed = ParsedManifest::parse(content_type.as_deref(), &bytes)?;
        for child in &parsed.manifests {
            pending.push((child.digest.to_string(), Some(child.digest.clone())));
        }
        order.push((reference, digest, content_type, bytes, parsed));
    }
    let mut fetched = 0;
    for (_, _, _, _, parsed) in &order {
        for blob in parsed.required_blobs() {
            if hosted.blob_size(to, &blob.digest).await.is_ok() || hosted.mount(to, &blob.digest, None).await?.is_some()
            {
                continue;
            }
            let path = format!("/v2/{name}/blobs/{}", blob.digest);
            let r = upstream.send(Method::GET, name, &path, HeaderMap::new()).await.map_err(failed)?;
            if !r.status().is_success() {
                return Err(unavailable(&format!("{path} answered {}", r.status())));
            }
            let length = r.content_length();
            let body = r.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other));
            hosted.upload_monolithic(to, &blob.digest, length, body).await?;
            fetched += blob.size;
        }
    }
    // Stored in reverse discovery order: every child before its index, the tag last.
    for (reference, digest, content_type, bytes, _) in order.into_iter().rev() {
        let top = reference == tag.as_str();
        let reference = if top { Reference::Tag(tag.clone()) } else { Reference::Digest(digest.clone()) };
        hosted.manifest_put(to, &reference, content_type.as_deref(), bytes).await?;
        if top {
            hosted_signatures(cache, hosted, name, to, &digest).await;
        }
    }
    Ok(Brought { present: false, bytes: fetched })
}

/// Copies the upstream's simple signatures of `digest` (its extension's and its
/// lookaside's) to the hosted repository `to`; a failure is logged, the image stays.
async fn hosted_signatures(cache: &PullThrough, hosted: &Registry, name: &RepoName, to: &RepoName, digest: &Digest) {
    let signatures = match cache.signatures(name, digest, &UpstreamAuth::Configured).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(%name, %digest, "signatures not synced: {}", e.message);
            return;
        }
    };
    for (signature_name, content) in signatures {
        if let Err(e) = hosted.add_signature(to, digest, &signature_name, &content).await {
            tracing::warn!(%to, %digest, "signature not synced: {}", e.message);
        }
    }
}

fn unavailable(why: &str) -> OciError {
    OciError::new(ErrorCode::Unavailable, why.to_string())
}

/// The jobs of `config`'s `[[sync]]` entries; an entry naming a repository that cannot
/// exist is an error.
pub fn jobs(config: &tessera_config::Config) -> Result<Vec<Arc<SyncJob>>, String> {
    let mut jobs = Vec::new();
    for (i, s) in config.syncs.iter().enumerate() {
        let name = s.name_at(i);
        let repositories = s
            .repositories
            .iter()
            .map(|r| r.parse().map_err(|e: OciError| format!("[[sync]] {name}: {r:?}: {}", e.message)))
            .collect::<Result<_, _>>()?;
        jobs.push(Arc::new(SyncJob {
            name,
            upstream: s.upstream.clone(),
            repositories,
            prefixes: s.prefixes.clone(),
            tags: s.tags.clone(),
            into: match s.into {
                tessera_config::SyncTarget::Cache => SyncInto::Cache,
                tessera_config::SyncTarget::Hosted => SyncInto::Hosted { prefix: s.hosted_prefix.clone() },
            },
            stats: SyncStats::default(),
        }));
    }
    Ok(jobs)
}
