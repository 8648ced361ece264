//! Requests after routing: each name is resolved through the routing table, and reads try
//! the route's members in order (hosted, or an upstream through its cache, or a redirect).
//! Writes go only to a hosted member of a route that allows pushes.

use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use std::sync::Arc;
use tessera_config::Mode;

use tessera_federation::{Decision, Delivery, Federation, Member, Resolved, StaticBlob, StaticManifest, UpstreamAuth};
use tessera_registry::{BlobAnswer, BlobAt, Opened, Referrers};
use tessera_spec::{Digest, ErrorCode, OciError, Reference, RepoName};
use tessera_store::ManifestRecord;

use crate::AppState;

/// An answer from a member, or a redirect to where the client should fetch it.
pub(crate) enum Found<T> {
    Here(T),
    Redirect(String),
}

pub(crate) struct Route<'a> {
    state: &'a AppState,
    /// The routing table this request was resolved with (a reload swaps in a new one for
    /// later requests; this one keeps the table it started with).
    federation: Arc<Federation>,
    resolved: Resolved,
    /// The client's address, which picks the nearest mirror.
    client: Option<std::net::IpAddr>,
    /// Whose credentials the route's upstreams see.
    upstream_auth: UpstreamAuth,
}

fn is_not_found(e: &OciError) -> bool {
    matches!(e.code, ErrorCode::ManifestUnknown | ErrorCode::BlobUnknown | ErrorCode::NameUnknown)
}

fn host(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| parts.uri.host())
}

/// The `ns` query parameter containerd adds when it uses us as a mirror.
fn authority(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "ns").map(|(_, v)| v.into_owned())
}

impl<'a> Route<'a> {
    pub(crate) fn new(state: &'a AppState, parts: &Parts, name: &RepoName) -> Result<Route<'a>, OciError> {
        let federation = state.federation.load_full();
        let resolved = federation.table.resolve(host(parts), authority(parts).as_deref(), name)?;
        let client = parts.extensions.get::<crate::ClientAddr>().map(|c| c.0);
        let upstream_auth = if resolved.passthrough {
            UpstreamAuth::Client(parts.headers.get(header::AUTHORIZATION).cloned())
        } else {
            UpstreamAuth::Configured
        };
        Ok(Route { state, federation, resolved, client, upstream_auth })
    }

    /// Whether the client's credentials are for the upstream (Tessera's login not applied).
    pub(crate) fn passthrough(&self) -> bool {
        self.resolved.passthrough
    }

    /// The delivery policy of the table this request was resolved with.
    pub(crate) fn delivery(&self) -> &Delivery {
        &self.federation.delivery
    }

    /// The hosted name a write goes to, if this route takes writes.
    pub(crate) fn writable(&self) -> Result<&RepoName, OciError> {
        match self.resolved.members.first() {
            Some((Member::Hosted, name)) if self.resolved.push => Ok(name),
            _ => Err(OciError::new(
                ErrorCode::Unsupported,
                "this repository is served from another registry and is read-only here",
            )),
        }
    }

    /// Tries each member in turn until one has the content. In redirect mode, answers with
    /// the first upstream's URL for `path(name)` instead.
    async fn first<T, F, Fut>(&self, path: impl Fn(&RepoName) -> String, mut each: F) -> Result<Found<T>, OciError>
    where
        F: FnMut(&'a AppState, &Member, &RepoName) -> Fut,
        Fut: Future<Output = Result<T, OciError>>,
    {
        if self.resolved.mode == Mode::Redirect
            && let Some((Member::Upstream { upstream, .. }, name)) = self.resolved.members.first()
        {
            return Ok(Found::Redirect(upstream.url(&path(name))));
        }
        let mut last = None;
        for (member, name) in &self.resolved.members {
            match each(self.state, member, name).await {
                Ok(v) => return Ok(Found::Here(v)),
                Err(e) if is_not_found(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")))
    }

    /// A manifest and whether it is a stale cached copy.
    pub(crate) async fn manifest(
        &self,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Found<(ManifestRecord, bool)>, OciError> {
        let found = self
            .first(
                |n| format!("/v2/{n}/manifests/{reference}"),
                |state, member, name| {
                    let (member, name, reference, accept) =
                        (member.clone(), name.clone(), reference.clone(), accept.map(str::to_string));
                    let fed = self.federation.clone();
                    let auth = self.upstream_auth.clone();
                    async move {
                        match member {
                            Member::Hosted => state
                                .registry
                                .manifest_get(&name, &reference, accept.as_deref())
                                .await
                                .map(|m| Found::Here((m, false))),
                            Member::Upstream { upstream, .. } => {
                                let cache = fed.cache(&upstream).ok_or_else(OciError::internal)?;
                                cache
                                    .manifest(&name, &reference, &auth)
                                    .await
                                    .map(|f| Found::Here((f.manifest, f.stale)))
                            }
                            Member::Static(source) => {
                                match source.manifest(&name, &reference, accept.as_deref(), &fed.delivery).await? {
                                    StaticManifest::Here(m) => Ok(Found::Here((m, false))),
                                    StaticManifest::Redirect(url) => Ok(Found::Redirect(url)),
                                }
                            }
                        }
                    }
                },
            )
            .await?;
        Ok(flatten(found))
    }

    pub(crate) async fn blob_size(&self, digest: &Digest) -> Result<Found<u64>, OciError> {
        let found = self
            .first(
                |n| format!("/v2/{n}/blobs/{digest}"),
                |state, member, name| {
                    let (member, name, digest) = (member.clone(), name.clone(), digest.clone());
                    let fed = self.federation.clone();
                    let auth = self.upstream_auth.clone();
                    async move {
                        match member {
                            Member::Hosted => state.registry.blob_size(&name, &digest).await.map(Found::Here),
                            Member::Upstream { upstream, .. } => fed
                                .cache(&upstream)
                                .ok_or_else(OciError::internal)?
                                .blob_size(&name, &digest, &auth)
                                .await
                                .map(Found::Here),
                            Member::Static(source) => {
                                Ok(static_blob(source.blob(&name, &digest, None, &fed.delivery).await?)
                                    .map(|answer| answer.size))
                            }
                        }
                    }
                },
            )
            .await?;
        Ok(flatten(found))
    }

    /// A blob: its bytes, or a redirect to where the delivery policy sends the client.
    /// With `stream`, bytes held here are streamed whatever the delivery policy says.
    pub(crate) async fn blob(
        &self,
        digest: &Digest,
        range: Option<&str>,
        stream: bool,
    ) -> Result<Found<BlobAnswer>, OciError> {
        let client = self.client;
        let found = self
            .first(
                |n| format!("/v2/{n}/blobs/{digest}"),
                |state, member, name| {
                    let (member, name, digest, range) =
                        (member.clone(), name.clone(), digest.clone(), range.map(str::to_string));
                    let fed = self.federation.clone();
                    let auth = self.upstream_auth.clone();
                    async move {
                        match member {
                            Member::Hosted => {
                                hosted_blob(state, &fed.delivery, &name, &digest, range, client, stream).await
                            }
                            Member::Upstream { upstream, .. } => {
                                let cache = fed.cache(&upstream).ok_or_else(OciError::internal)?;
                                cache.blob(&name, &digest, range.as_deref(), &auth).await.map(Found::Here)
                            }
                            Member::Static(source) => {
                                Ok(static_blob(source.blob(&name, &digest, range.as_deref(), &fed.delivery).await?))
                            }
                        }
                    }
                },
            )
            .await?;
        Ok(flatten(found))
    }

    /// Tags from the first member that knows the repository, as (tags, upstream Link).
    pub(crate) async fn tags(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Found<(Vec<String>, bool)>, OciError> {
        // `last` is the client's text: encoded, so it cannot add parameters upstream.
        let query = {
            let mut params = form_urlencoded::Serializer::new(String::new());
            if let Some(n) = n {
                params.append_pair("n", &n.to_string());
            }
            if let Some(l) = last {
                params.append_pair("last", l);
            }
            params.finish()
        };
        let query = if query.is_empty() { query } else { format!("?{query}") };
        self.first(
            |name| format!("/v2/{name}/tags/list{query}"),
            |state, member, name| {
                let (member, name, last, query) =
                    (member.clone(), name.clone(), last.map(str::to_string), query.clone());
                let fed = self.federation.clone();
                let auth = self.upstream_auth.clone();
                async move {
                    match member {
                        Member::Hosted => {
                            state.registry.tags(&name, n, last.as_deref()).await.map(|p| (p.items, p.more))
                        }
                        Member::Upstream { upstream, .. } => {
                            let cache = fed.cache(&upstream).ok_or_else(OciError::internal)?;
                            let (tags, link) = cache.tags(&name, &query, &auth).await?;
                            let tags = tags
                                .as_array()
                                .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                                .unwrap_or_default();
                            Ok((tags, link.is_some()))
                        }
                        Member::Static(source) => {
                            let tags = source.tags(&name, &fed.delivery).await?;
                            let after: Vec<String> =
                                tags.into_iter().filter(|t| last.as_deref().is_none_or(|l| t.as_str() > l)).collect();
                            let n = n.unwrap_or(tessera_registry::MAX_PAGE).min(tessera_registry::MAX_PAGE);
                            let more = after.len() > n;
                            Ok((after.into_iter().take(n).collect(), more))
                        }
                    }
                }
            },
        )
        .await
    }

    /// Referrers from the first member: hosted answers from its own manifests, an upstream
    /// from its referrers API.
    pub(crate) async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Found<Referrers>, OciError> {
        let query = artifact_type
            .map(|t| format!("?artifactType={}", form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()))
            .unwrap_or_default();
        let (member, name) = self.resolved.members.first().ok_or_else(OciError::internal)?;
        match member {
            Member::Hosted => self.state.registry.referrers(name, subject, artifact_type).await.map(Found::Here),
            Member::Upstream { upstream, .. } if self.resolved.mode == Mode::Redirect => {
                Ok(Found::Redirect(upstream.url(&format!("/v2/{name}/referrers/{subject}{query}"))))
            }
            Member::Upstream { upstream, .. } => {
                let cache = self.federation.cache(upstream).ok_or_else(OciError::internal)?;
                cache.referrers(name, subject, artifact_type, &self.upstream_auth).await.map(Found::Here)
            }
            // Published trees carry no referrers index.
            Member::Static(_) => Ok(Found::Here(Referrers::empty(artifact_type.is_some()))),
        }
    }

    /// Whether the repository is a protected static one (logged-in clients only).
    pub(crate) fn protected(&self) -> bool {
        self.resolved.members.iter().any(|(m, name)| matches!(m, Member::Static(s) if s.protected(name)))
    }
}

fn flatten<T>(found: Found<Found<T>>) -> Found<T> {
    match found {
        Found::Here(inner) => inner,
        Found::Redirect(url) => Found::Redirect(url),
    }
}

fn static_blob(blob: StaticBlob) -> Found<BlobAnswer> {
    match blob {
        StaticBlob::Bytes(answer) => Found::Here(answer),
        StaticBlob::Redirect(url) => Found::Redirect(url),
    }
}

impl<T> Found<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Found<U> {
        match self {
            Found::Here(v) => Found::Here(f(v)),
            Found::Redirect(url) => Found::Redirect(url),
        }
    }
}

/// A hosted blob: streamed, redirected to a CDN or mirror by the delivery policy, or (when
/// its bytes live elsewhere) redirected to the external URL the policy allows.
async fn hosted_blob(
    state: &AppState,
    delivery: &Delivery,
    name: &RepoName,
    digest: &Digest,
    range: Option<String>,
    client: Option<std::net::IpAddr>,
    stream: bool,
) -> Result<Found<BlobAnswer>, OciError> {
    let registry = &state.registry;
    let open = || async {
        match registry.blob_get(name, digest, range.as_deref()).await? {
            Opened::Bytes(answer) => Ok::<_, OciError>(Ok(Found::Here(answer))),
            Opened::Elsewhere(urls) => Ok(Err(urls)),
        }
    };
    let opened = if stream || delivery.streams(name) {
        open().await?
    } else {
        match registry.blob_at(name, digest).await? {
            BlobAt::Here(_) => match delivery.local(name, digest, client) {
                Decision::Redirect(url) => Ok(Found::Redirect(url)),
                Decision::Stream | Decision::NotAllowed => open().await?,
            },
            BlobAt::Elsewhere { urls, .. } => Err(urls),
        }
    };
    let urls = match opened {
        Ok(found) => return Ok(found),
        Err(urls) => urls,
    };
    match delivery.external(name, &urls, client) {
        Decision::Redirect(url) => Ok(Found::Redirect(url)),
        Decision::Stream | Decision::NotAllowed => Err(OciError::new(
            ErrorCode::BlobUnknown,
            "the blob lives at an external URL this repository's delivery policy does not allow",
        )
        .with_detail(serde_json::json!({ "digest": digest.to_string() }))),
    }
}

/// Headers that say an answer came from the cache while the upstream could not be asked.
pub(crate) fn stale_headers(headers: &mut HeaderMap) {
    headers.insert(header::WARNING, header::HeaderValue::from_static("110 tessera \"Response is Stale\""));
}
