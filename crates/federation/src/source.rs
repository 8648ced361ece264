//! Sources: every place a repository's content can come from, behind one trait. Routing
//! yields an ordered list of sources (each with the name it knows the repository by); the
//! HTTP layer asks them in turn, and `tessera explain` describes the same list.
//!
//! Adding a kind of source is one `impl Source` here and one line where [`SourceSet`] is
//! built ([`crate::Federation::new`]).

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tessera_registry::signatures::Signature;
use tessera_registry::{BlobAnswer, BlobAt, Opened, Referrers, Registry};
use tessera_spec::manifest::media;
use tessera_spec::{Accept, Descriptor, Digest, ErrorCode, OciError, Paging, RangeRequest, Reference, RepoName};
use tessera_store::{ManifestRecord, Page};

use crate::cache::{PullThrough, UpstreamAuth};
use crate::delivery::{Decision, Delivery};
use crate::statics::{StaticBlob, StaticManifest, StaticSource};
use crate::upstream::Upstream;

/// A source's answer: the content, where the client should fetch it instead, or that this
/// source does not have it (the next source is asked; the last one's reason is reported).
pub enum Found<T> {
    Here(T),
    Redirect(String),
    Absent(OciError),
}

/// What a source answers: a [`Found`], or a failure that ends the request (an upstream
/// that cannot be asked, a refused credential, a store error).
pub type Answer<T> = Result<Found<T>, OciError>;

impl<T> Found<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Found<U> {
        match self {
            Found::Here(v) => Found::Here(f(v)),
            Found::Redirect(url) => Found::Redirect(url),
            Found::Absent(e) => Found::Absent(e),
        }
    }

    /// `result`'s not-found errors (name, manifest, blob unknown) as [`Found::Absent`].
    pub fn from_result(result: Result<T, OciError>) -> Answer<T> {
        match result {
            Ok(v) => Ok(Found::Here(v)),
            Err(e) if is_not_found(&e) => Ok(Found::Absent(e)),
            Err(e) => Err(e),
        }
    }
}

fn is_not_found(e: &OciError) -> bool {
    matches!(e.code, ErrorCode::ManifestUnknown | ErrorCode::BlobUnknown | ErrorCode::NameUnknown)
}

/// A manifest as served, and whether it is a cached copy served because its upstream could
/// not be asked.
pub struct Served {
    pub manifest: ManifestRecord,
    pub stale: bool,
}

/// Who is asking, beyond the name: decided before the sources are asked.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// The client's address, which picks the nearest mirror.
    pub client: Option<IpAddr>,
    /// Whose credentials the route's upstreams see.
    pub upstream_auth: UpstreamAuth,
    /// Bytes held here are streamed whatever the delivery policy says (`?delivery=stream`
    /// from a caller who may push).
    pub bypass_delivery: bool,
}

/// Somewhere a repository's manifests, blobs, tags and referrers come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// What the source is, in a few words (`hosted`, `upstream quay`, `static crane`).
    fn label(&self) -> String;

    /// How this source answers for `name`, in one line (for `tessera explain`).
    fn describe(&self, name: &RepoName, reference: &Reference) -> String;

    /// Whether `name` is served to logged-in clients only.
    fn protected(&self, _name: &RepoName) -> bool {
        false
    }

    async fn manifest(&self, name: &RepoName, reference: &Reference, accept: &Accept, ask: &Ask) -> Answer<Served>;

    async fn blob_size(&self, name: &RepoName, digest: &Digest, ask: &Ask) -> Answer<u64>;

    /// A blob's bytes (the whole blob, or the `range` resolved against its size), or where
    /// the delivery policy sends the client for them.
    async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        ask: &Ask,
    ) -> Answer<BlobAnswer>;

    async fn tags(&self, name: &RepoName, paging: &Paging, ask: &Ask) -> Answer<Page>;

    async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        ask: &Ask,
    ) -> Answer<Referrers>;

    /// Where a client is sent for `blob`, a descriptor in a manifest this source served
    /// (for `tessera explain --live` and the pages).
    async fn locate(&self, name: &RepoName, blob: &Descriptor) -> Located;

    /// The simple signatures of the manifest `digest` (the signature extension's); absent
    /// where this source keeps none for it.
    async fn signatures(&self, _name: &RepoName, _digest: &Digest, _ask: &Ask) -> Answer<Vec<Signature>> {
        Ok(Found::Absent(OciError::new(ErrorCode::ManifestUnknown, "no signatures kept here")))
    }

    /// What kind of source this is.
    fn kind(&self) -> SourceKind;

    /// The `[[upstream]]` this source serves from, if it does (its cache or redirects).
    fn upstream(&self) -> Option<&str> {
        None
    }

    /// Whether this source keeps what it fetches from elsewhere (a pull-through cache):
    /// what a requiring `[[signatures]]` rule must not let it fetch unchecked.
    fn caches(&self) -> bool {
        false
    }

    /// Whether a cache holds the blob `digest` of `name` already.
    async fn holds(&self, _name: &RepoName, _digest: &Digest) -> Result<bool, OciError> {
        Ok(false)
    }

    /// The indexes this source holds that list the manifest `digest` (at most `limit`),
    /// where it records them (hosted does).
    async fn parents(&self, _name: &RepoName, _digest: &Digest, _limit: usize) -> Result<Vec<Digest>, OciError> {
        Ok(Vec::new())
    }

    /// Drops what this source keeps of the manifest `digest` on another's behalf (a cache's
    /// copy of a manifest a requiring route refused); content it hosts stays.
    async fn forget(&self, _name: &RepoName, _digest: &Digest) {}
}

/// Signatures a source keeps; none is absent, so a later source of the route is asked.
fn kept_signatures(found: Vec<Signature>) -> Answer<Vec<Signature>> {
    if found.is_empty() {
        return Ok(Found::Absent(OciError::new(ErrorCode::ManifestUnknown, "no signatures")));
    }
    Ok(Found::Here(found))
}

/// The kinds of sources a route is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Hosted,
    /// An upstream through its pull-through cache.
    Cache,
    /// An upstream clients are redirected to.
    Redirect,
    /// A `[[static]]` source.
    Static,
}

/// Where a client is sent for a blob: the kind, and the whole answer in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub via: Via,
    pub words: String,
}

impl Located {
    pub fn new(via: Via, words: impl Into<String>) -> Located {
        Located { via, words: words.into() }
    }
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words)
    }
}

/// The kinds of places a client is sent for bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// Streamed by this server (hosted, or a layout's files).
    ThisServer,
    /// A CDN redirect.
    Cdn,
    /// A presigned URL of the blob store.
    Presigned,
    /// The nearest healthy mirror.
    Mirror,
    /// A URL the blob lives at (a foreign layer, a metadata-only push, a Crane redirect).
    Elsewhere,
    /// An upstream's cache, which holds it.
    Cached,
    /// An upstream, through the cache, which fetches it when first asked.
    Fetched,
    /// A redirect to an upstream.
    Upstream,
    /// Nowhere this server may send a client.
    Unavailable,
}

impl Via {
    pub const ALL: [Via; 9] = [
        Via::ThisServer,
        Via::Cdn,
        Via::Presigned,
        Via::Mirror,
        Via::Elsewhere,
        Via::Cached,
        Via::Fetched,
        Via::Upstream,
        Via::Unavailable,
    ];

    /// The kind in a few words.
    pub fn name(self) -> &'static str {
        match self {
            Via::ThisServer => "this server",
            Via::Cdn => "CDN",
            Via::Presigned => "presigned store URL",
            Via::Mirror => "mirror",
            Via::Elsewhere => "external URL",
            Via::Cached => "upstream cache (held)",
            Via::Fetched => "upstream cache (fetched when asked)",
            Via::Upstream => "redirect to upstream",
            Via::Unavailable => "unavailable",
        }
    }

    /// A short stable key (CSS classes, test ids).
    pub fn key(self) -> &'static str {
        match self {
            Via::ThisServer => "here",
            Via::Cdn => "cdn",
            Via::Presigned => "presigned",
            Via::Mirror => "mirror",
            Via::Elsewhere => "external",
            Via::Cached => "cached",
            Via::Fetched => "fetched",
            Via::Upstream => "upstream",
            Via::Unavailable => "unavailable",
        }
    }
}

fn is_manifest(d: &Descriptor) -> bool {
    media::ALL.contains(&d.media_type.as_str())
}

/// Every source one configuration names, built once per routing table.
pub struct SourceSet {
    pub hosted: Arc<dyn Source>,
    /// Each upstream with its two faces: through its cache, and redirect-only.
    pub upstreams: Vec<UpstreamSources>,
    /// Each `[[static]]` source with its face as a source.
    pub statics: Vec<(Arc<StaticSource>, Arc<dyn Source>)>,
}

pub struct UpstreamSources {
    pub upstream: Arc<Upstream>,
    pub cached: Arc<dyn Source>,
    pub redirect: Arc<dyn Source>,
}

/// The hosted registry: content pushed here, blobs delivered by the delivery policy.
pub struct Hosted {
    pub registry: Arc<Registry>,
    pub delivery: Arc<Delivery>,
}

impl Hosted {
    /// Streams the bytes, or redirects to a CDN or mirror by the delivery policy; a blob
    /// whose bytes live elsewhere goes to the external URL the policy allows.
    async fn deliver(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        ask: &Ask,
    ) -> Result<Decided, OciError> {
        let open = || async {
            Ok(match self.registry.blob_get(name, digest, range).await? {
                Opened::Bytes(answer) => Decided::Bytes(answer),
                Opened::Elsewhere(urls) => self.delivery.external(name, &urls, ask.client).into(),
            })
        };
        if ask.bypass_delivery || self.delivery.streams(name) {
            return open().await;
        }
        match self.registry.blob_at(name, digest).await? {
            BlobAt::Here(_) => match self.delivery.local(name, digest, ask.client) {
                Decision::Redirect(url) => Ok(Decided::Redirect(url)),
                Decision::Presigned(ttl) => match self.registry.presigned_blob_url(digest, ttl) {
                    Some(url) => {
                        self.delivery.redirects.presigned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok(Decided::Redirect(url))
                    }
                    None => open().await,
                },
                Decision::Stream | Decision::NotAllowed => open().await,
            },
            BlobAt::Elsewhere { urls, .. } => Ok(self.delivery.external(name, &urls, ask.client).into()),
        }
    }
}

/// What the delivery policy made of a hosted blob read.
enum Decided {
    Bytes(BlobAnswer),
    Redirect(String),
    /// The blob lives elsewhere and no URL it names is allowed.
    NotAllowed,
}

impl From<Decision> for Decided {
    /// For a blob living elsewhere: only a redirect can deliver it.
    fn from(decision: Decision) -> Decided {
        match decision {
            Decision::Redirect(url) => Decided::Redirect(url),
            Decision::Stream | Decision::NotAllowed | Decision::Presigned(_) => Decided::NotAllowed,
        }
    }
}

#[async_trait]
impl Source for Hosted {
    fn label(&self) -> String {
        "hosted".into()
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Hosted
    }

    fn describe(&self, name: &RepoName, _: &Reference) -> String {
        format!(
            "hosted repository {name}: manifest from this server's stores; blobs: {}",
            self.delivery.describe_local(name, None)
        )
    }

    async fn manifest(&self, name: &RepoName, reference: &Reference, accept: &Accept, _: &Ask) -> Answer<Served> {
        let found = self.registry.manifest_get(name, reference, accept).await;
        Found::from_result(found.map(|manifest| Served { manifest, stale: false }))
    }

    async fn blob_size(&self, name: &RepoName, digest: &Digest, _: &Ask) -> Answer<u64> {
        Found::from_result(self.registry.blob_size(name, digest).await)
    }

    async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        ask: &Ask,
    ) -> Answer<BlobAnswer> {
        match Found::from_result(self.deliver(name, digest, range, ask).await)? {
            Found::Here(Decided::Bytes(answer)) => Ok(Found::Here(answer)),
            Found::Here(Decided::Redirect(url)) | Found::Redirect(url) => Ok(Found::Redirect(url)),
            Found::Absent(e) => Ok(Found::Absent(e)),
            Found::Here(Decided::NotAllowed) => Ok(Found::Absent(
                OciError::new(
                    ErrorCode::BlobUnknown,
                    "the blob lives at an external URL this repository's delivery policy does not allow",
                )
                .with_detail(serde_json::json!({ "digest": digest.to_string() })),
            )),
        }
    }

    async fn tags(&self, name: &RepoName, paging: &Paging, _: &Ask) -> Answer<Page> {
        Found::from_result(self.registry.tags(name, paging).await)
    }

    async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        _: &Ask,
    ) -> Answer<Referrers> {
        Found::from_result(self.registry.referrers(name, subject, artifact_type).await)
    }

    async fn locate(&self, name: &RepoName, blob: &Descriptor) -> Located {
        if is_manifest(blob) {
            return Located::new(Via::ThisServer, "from this server");
        }
        match self.registry.blob_at(name, &blob.digest).await {
            Ok(BlobAt::Here(_)) => self.delivery.describe_local(name, Some(&blob.digest)),
            Ok(BlobAt::Elsewhere { urls, .. }) => self.delivery.describe_external(name, &urls),
            Err(e) => Located::new(Via::Unavailable, e.message),
        }
    }

    async fn parents(&self, name: &RepoName, digest: &Digest, limit: usize) -> Result<Vec<Digest>, OciError> {
        self.registry.parents(name, digest, limit).await
    }

    async fn signatures(&self, name: &RepoName, digest: &Digest, _: &Ask) -> Answer<Vec<Signature>> {
        let found = self.registry.signatures(name, digest).await?;
        kept_signatures(found)
    }
}

/// An upstream through its pull-through cache.
pub struct Cached(pub Arc<PullThrough>);

#[async_trait]
impl Source for Cached {
    fn label(&self) -> String {
        format!("upstream {}", self.0.upstream().name())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Cache
    }

    fn describe(&self, name: &RepoName, reference: &Reference) -> String {
        let upstream = self.0.upstream();
        let c = upstream.cache_settings();
        format!(
            "upstream {} as {name}: pulled through the cache from {} (tags revalidated after {} s{}); blobs fetched once, verified, then served from this server",
            upstream.name(),
            upstream.url(&format!("/v2/{name}/manifests/{reference}")),
            c.tag_ttl_secs,
            if c.serve_stale { ", served stale when the upstream fails" } else { "" }
        )
    }

    async fn manifest(&self, name: &RepoName, reference: &Reference, _: &Accept, ask: &Ask) -> Answer<Served> {
        let fetched = self.0.manifest(name, reference, &ask.upstream_auth).await;
        Found::from_result(fetched.map(|f| Served { manifest: f.manifest, stale: f.stale }))
    }

    async fn blob_size(&self, name: &RepoName, digest: &Digest, ask: &Ask) -> Answer<u64> {
        Found::from_result(self.0.blob_size(name, digest, &ask.upstream_auth).await)
    }

    async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        ask: &Ask,
    ) -> Answer<BlobAnswer> {
        Found::from_result(self.0.blob(name, digest, range, &ask.upstream_auth).await)
    }

    async fn tags(&self, name: &RepoName, paging: &Paging, ask: &Ask) -> Answer<Page> {
        Found::from_result(self.0.tags(name, paging, &ask.upstream_auth).await)
    }

    async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        ask: &Ask,
    ) -> Answer<Referrers> {
        Found::from_result(self.0.referrers(name, subject, artifact_type, &ask.upstream_auth).await)
    }

    async fn signatures(&self, name: &RepoName, digest: &Digest, ask: &Ask) -> Answer<Vec<Signature>> {
        let found = self.0.signatures(name, digest, &ask.upstream_auth).await?;
        kept_signatures(found.into_iter().map(|(name, content)| Signature { name, content }).collect())
    }

    async fn locate(&self, name: &RepoName, blob: &Descriptor) -> Located {
        let upstream = self.0.upstream().name();
        let held = !is_manifest(blob) && self.0.holds(name, &blob.digest).await.unwrap_or(false);
        foreign_or(
            blob,
            if held {
                Located::new(Via::Cached, format!("held in the cache of {upstream}"))
            } else {
                Located::new(Via::Fetched, format!("from {upstream} through the cache"))
            },
        )
    }

    async fn forget(&self, name: &RepoName, digest: &Digest) {
        self.0.forget(name, digest).await;
    }

    fn caches(&self) -> bool {
        true
    }

    fn upstream(&self) -> Option<&str> {
        Some(self.0.upstream().name())
    }

    async fn holds(&self, name: &RepoName, digest: &Digest) -> Result<bool, OciError> {
        self.0.holds(name, digest).await
    }
}

/// Where a layer naming its own URLs (a foreign layer) is, else `otherwise`.
fn foreign_or(blob: &Descriptor, otherwise: Located) -> Located {
    if blob.urls.is_empty() {
        otherwise
    } else {
        Located::new(Via::Elsewhere, format!("foreign layer at {}", blob.urls.join(", ")))
    }
}

/// An upstream the client is sent to (307) for everything: no bytes pass through here.
pub struct RedirectOnly(pub Arc<Upstream>);

impl RedirectOnly {
    fn to<T>(&self, path: String) -> Answer<T> {
        Ok(Found::Redirect(self.0.url(&path)))
    }
}

#[async_trait]
impl Source for RedirectOnly {
    fn label(&self) -> String {
        format!("upstream {}", self.0.name())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Redirect
    }

    fn upstream(&self) -> Option<&str> {
        Some(self.0.name())
    }

    fn describe(&self, name: &RepoName, reference: &Reference) -> String {
        format!(
            "upstream {} as {name}: redirect (307) to {} and to {} for blobs; no bytes pass through",
            self.0.name(),
            self.0.url(&format!("/v2/{name}/manifests/{reference}")),
            self.0.url(&format!("/v2/{name}/blobs/<digest>"))
        )
    }

    async fn manifest(&self, name: &RepoName, reference: &Reference, _: &Accept, _: &Ask) -> Answer<Served> {
        self.to(format!("/v2/{name}/manifests/{reference}"))
    }

    async fn blob_size(&self, name: &RepoName, digest: &Digest, _: &Ask) -> Answer<u64> {
        self.to(format!("/v2/{name}/blobs/{digest}"))
    }

    async fn blob(&self, name: &RepoName, digest: &Digest, _: Option<&RangeRequest>, _: &Ask) -> Answer<BlobAnswer> {
        self.to(format!("/v2/{name}/blobs/{digest}"))
    }

    async fn tags(&self, name: &RepoName, paging: &Paging, _: &Ask) -> Answer<Page> {
        self.to(format!("/v2/{name}/tags/list{}", paging_query(paging)))
    }

    async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        _: &Ask,
    ) -> Answer<Referrers> {
        let query = artifact_type
            .map(|t| format!("?artifactType={}", form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()))
            .unwrap_or_default();
        self.to(format!("/v2/{name}/referrers/{subject}{query}"))
    }

    async fn locate(&self, _: &RepoName, blob: &Descriptor) -> Located {
        foreign_or(blob, Located::new(Via::Upstream, format!("redirect to {}", self.0.name())))
    }
}

/// `?n=..&last=..` for another registry's tags list (`last` encoded: it is the client's text
/// and must not add parameters upstream); empty without paging.
pub fn paging_query(paging: &Paging) -> String {
    let mut params = form_urlencoded::Serializer::new(String::new());
    if let Some(n) = paging.n {
        params.append_pair("n", &n.to_string());
    }
    if let Some(last) = &paging.last {
        params.append_pair("last", last);
    }
    let query = params.finish();
    if query.is_empty() { query } else { format!("?{query}") }
}

/// A `[[static]]` source: repositories published elsewhere, read-only.
pub struct Published {
    pub source: Arc<StaticSource>,
    pub delivery: Arc<Delivery>,
}

impl Published {
    async fn blob_answer(&self, name: &RepoName, digest: &Digest, range: Option<&RangeRequest>) -> Answer<BlobAnswer> {
        Ok(match Found::from_result(self.source.blob(name, digest, range, &self.delivery).await)? {
            Found::Here(StaticBlob::Bytes(answer)) => Found::Here(answer),
            Found::Here(StaticBlob::Redirect(url)) | Found::Redirect(url) => Found::Redirect(url),
            Found::Absent(e) => Found::Absent(e),
        })
    }
}

#[async_trait]
impl Source for Published {
    fn label(&self) -> String {
        format!("static {}", self.source.name())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Static
    }

    fn describe(&self, name: &RepoName, _: &Reference) -> String {
        format!("static source {} as {name}: {}", self.source.name(), self.source.describe(name))
    }

    fn protected(&self, name: &RepoName) -> bool {
        self.source.protected(name)
    }

    async fn manifest(&self, name: &RepoName, reference: &Reference, accept: &Accept, _: &Ask) -> Answer<Served> {
        let answer = self.source.manifest(name, reference, accept, &self.delivery).await;
        Ok(match Found::from_result(answer)? {
            Found::Here(StaticManifest::Here(manifest)) => Found::Here(Served { manifest, stale: false }),
            Found::Here(StaticManifest::Redirect(url)) | Found::Redirect(url) => Found::Redirect(url),
            Found::Absent(e) => Found::Absent(e),
        })
    }

    async fn blob_size(&self, name: &RepoName, digest: &Digest, _: &Ask) -> Answer<u64> {
        Ok(self.blob_answer(name, digest, None).await?.map(|answer| answer.size))
    }

    async fn blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&RangeRequest>,
        _: &Ask,
    ) -> Answer<BlobAnswer> {
        self.blob_answer(name, digest, range).await
    }

    async fn tags(&self, name: &RepoName, paging: &Paging, _: &Ask) -> Answer<Page> {
        let tags = match Found::from_result(self.source.tags(name, &self.delivery).await)? {
            Found::Here(tags) => tags,
            Found::Redirect(url) => return Ok(Found::Redirect(url)),
            Found::Absent(e) => return Ok(Found::Absent(e)),
        };
        // Sorted already: the page starts after `last` and holds at most `n`.
        let after: Vec<String> =
            tags.into_iter().filter(|t| paging.last.as_deref().is_none_or(|l| t.as_str() > l)).collect();
        let n = paging.n.unwrap_or(tessera_registry::MAX_PAGE).min(tessera_registry::MAX_PAGE);
        let more = after.len() > n;
        Ok(Found::Here(Page { items: after.into_iter().take(n).collect(), more }))
    }

    async fn referrers(&self, _: &RepoName, _: &Digest, artifact_type: Option<&str>, _: &Ask) -> Answer<Referrers> {
        // Published trees carry no referrers index.
        Ok(Found::Here(Referrers::empty(artifact_type.is_some())))
    }

    async fn signatures(&self, name: &RepoName, digest: &Digest, _: &Ask) -> Answer<Vec<Signature>> {
        let found = self.source.signatures(name, digest, &self.delivery).await?;
        kept_signatures(found)
    }

    async fn locate(&self, name: &RepoName, blob: &Descriptor) -> Located {
        if is_manifest(blob) {
            return Located::new(Via::ThisServer, "fetched, verified, served here");
        }
        match self.blob_answer(name, &blob.digest, None).await {
            Ok(Found::Redirect(url)) => {
                Located::new(Via::Elsewhere, format!("307 to {}", url.split('?').next().unwrap_or_default()))
            }
            Ok(Found::Here(_)) => Located::new(Via::ThisServer, "served from the layout's files"),
            Ok(Found::Absent(e)) | Err(e) => Located::new(Via::Unavailable, e.message),
        }
    }
}
