//! Request handling: parse the endpoint once, call the registry, shape the OCI response.

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;
use tessera_registry::{BlobAt, UploadStart};
use tessera_spec::{ByteRange, ErrorCode, OciError, RepoName};
use tessera_store::{Page, UploadId};

use crate::endpoint::{self, Endpoint, Paging};
use crate::routed::{self, Found, Route};
use crate::{ApiError, AppState};

pub(crate) async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let client = parts.extensions.get::<crate::ClientAddr>().map(|c| c.0);
    let admitted = match client {
        Some(ip) => state.limits.admit(ip).and_then(|()| {
            let uploading = matches!(parts.method, Method::POST | Method::PATCH | Method::PUT);
            if uploading { state.limits.upload(ip) } else { Ok(None) }
        }),
        None => Ok(None),
    };
    let bodyless = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE);
    let result = match (admitted, state.limits.request_timeout) {
        (Ok(_slot), Some(limit)) if bodyless => {
            match tokio::time::timeout(limit, handle(&state, &parts, &mut body)).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(method = %parts.method, path = parts.uri.path(), "request timed out after {limit:?}");
                    Err(OciError::new(
                        ErrorCode::Unavailable,
                        format!("the request took longer than {} s", limit.as_secs()),
                    )
                    .with_header("retry-after", "10"))
                }
            }
        }
        (Ok(_slot), _) => handle(&state, &parts, &mut body).await,
        (Err(e), _) => Err(e),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            let mut response = ApiError(e).into_response();
            // An unread body is drained so the client reads this answer, not a reset. A body
            // the handler gave up on midway cannot be drained: the connection is closed
            // instead, said so, or the client's next request would race the close.
            let drained = match body.take() {
                Some(unread) => discard(unread).await,
                None => !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH),
            };
            if !drained {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// The request body, for the one handler step that reads it.
fn take(body: &mut Option<Body>) -> Body {
    body.take().unwrap_or_default()
}

fn unsupported_method() -> OciError {
    OciError::new(ErrorCode::Unsupported, "method not allowed on this endpoint")
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

/// All `Accept` headers joined, as clients may send the list split over several.
fn accept(headers: &HeaderMap) -> Option<String> {
    let all: Vec<&str> = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    (!all.is_empty()).then(|| all.join(","))
}

/// The request body as a byte stream, taken from its slot only when first polled: a request
/// refused before its body is read leaves the body for [`dispatch`] to drain.
fn byte_stream<'a>(
    body: &'a mut Option<Body>,
    idle: std::time::Duration,
) -> impl futures_util::Stream<Item = io::Result<bytes::Bytes>> + Send + 'a {
    let mut stream = None;
    let mut stall: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    futures_util::stream::poll_fn(move |cx| {
        let s = stream.get_or_insert_with(|| take(body).into_data_stream());
        match s.poll_next_unpin(cx) {
            std::task::Poll::Ready(item) => {
                stall = None;
                std::task::Poll::Ready(item.map(|r| r.map_err(io::Error::other)))
            }
            std::task::Poll::Pending => {
                // A body that sends nothing for `idle` is abandoned (slow-client guard).
                let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    std::task::Poll::Ready(()) => std::task::Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request body stalled",
                    )))),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    })
}

/// Reads and drops what is left of a refused request body, up to a bound. Returns whether
/// the body ended (so the connection can carry another request).
async fn discard(body: Body) -> bool {
    use axum::body::HttpBody as _;
    const DISCARD_MAX: u64 = 16 * 1024 * 1024;
    const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(5);
    // A body announced larger than we would read is not waited for at all.
    if body.size_hint().lower() > DISCARD_MAX {
        return false;
    }
    let drain = async {
        let mut seen = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => seen += chunk.len() as u64,
                Err(_) => return false,
            }
            if seen > DISCARD_MAX {
                return false;
            }
        }
        true
    };
    // Nor is a client that stops sending.
    tokio::time::timeout(DISCARD_TIME, drain).await.unwrap_or(false)
}

fn response(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    builder.body(body).unwrap_or_else(|_| ApiError(OciError::internal()).into_response())
}

/// A protected static repository (Crane's `protected`) is served only to a logged-in caller;
/// what that caller may pull is then up to the access rules, as everywhere.
fn admitted(
    state: &AppState,
    parts: &Parts,
    caller: Option<&crate::auth::Caller>,
    route: &Route,
    name: &RepoName,
) -> Result<(), OciError> {
    if !route.protected() {
        return Ok(());
    }
    match (&state.auth, caller) {
        (Some(_), Some(c)) if c.identity != tessera_access::Identity::Anonymous => Ok(()),
        (Some(auth), _) => Err(auth.login_required(parts, name)),
        (None, _) => Err(OciError::new(
            ErrorCode::Denied,
            "this repository is protected and this server has no logins configured ([auth])",
        )),
    }
}

/// The largest document a blob location PUT may send.
const LOCATION_MAX_BYTES: usize = 64 * 1024;

fn redirect(url: &str) -> Response {
    response(
        StatusCode::TEMPORARY_REDIRECT,
        &[("location", url.to_string()), ("content-length", "0".into())],
        Body::empty(),
    )
}

fn upload_location(name: &RepoName, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn session_headers(name: &RepoName, id: &UploadId, offset: u64) -> Vec<(&'static str, String)> {
    vec![
        ("location", upload_location(name, id)),
        ("range", tessera_registry::uploads::range_header(offset)),
        ("docker-upload-uuid", id.to_string()),
        ("content-length", "0".into()),
    ]
}

fn blob_created(name: &RepoName, digest: &tessera_spec::Digest) -> Response {
    response(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{digest}")),
            ("docker-content-digest", digest.to_string()),
            ("content-length", "0".into()),
        ],
        Body::empty(),
    )
}

fn listing(path: &str, key: &str, extra: Option<(&str, &str)>, paging: &Paging, page: Page) -> Response {
    let mut headers = vec![("content-type", "application/json".to_string())];
    if page.more
        && let Some(last) = page.items.last()
    {
        let n = paging.n.unwrap_or(tessera_registry::MAX_PAGE);
        let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
        headers.push(("link", format!("<{path}?n={n}&last={last}>; rel=\"next\"")));
    }
    let mut body = json!({ key: page.items });
    if let Some((k, v)) = extra {
        body[k] = json!(v);
    }
    response(StatusCode::OK, &headers, Body::from(body.to_string()))
}

async fn handle(state: &AppState, parts: &Parts, body: &mut Option<Body>) -> Result<Response, OciError> {
    let endpoint = endpoint::parse(parts.uri.path(), parts.uri.query()).map_err(|e| {
        // A tag that cannot exist is simply not found, except where a client tries to create it.
        if e.code == ErrorCode::TagInvalid && parts.method != Method::PUT {
            OciError::new(ErrorCode::ManifestUnknown, "manifest unknown")
        } else {
            e
        }
    })?;
    let registry = &state.registry;
    let headers = &parts.headers;
    let method = &parts.method;
    // The name is routed once, on one routing table, for the whole request. (A failure to
    // route is reported after the login check, so it tells an anonymous caller nothing.)
    let routed = endpoint.name().map(|name| Route::new(state, parts, name));
    // On a route that passes credentials through, the Authorization header is the
    // upstream's business and the upstream decides who may pull.
    let passthrough = state.auth.is_some()
        && crate::auth::action_of(method, &endpoint).is_some_and(|(action, _)| action == tessera_access::Action::Pull)
        && matches!(&routed, Some(Ok(route)) if route.passthrough());
    let route = move || routed.unwrap_or_else(|| Err(OciError::internal()));
    let caller = match &state.auth {
        Some(_) if passthrough => None,
        Some(auth) => {
            let caller = auth.identify(parts)?;
            auth.authorize(parts, &caller, method, &endpoint)?;
            Some(caller)
        }
        None => {
            // With no login configured, writes are anonymous: allowed only where that was chosen
            // (by default on loopback listeners only).
            if !state.anonymous_writes
                && crate::auth::action_of(method, &endpoint).is_some_and(|(a, _)| a != tessera_access::Action::Pull)
            {
                return Err(OciError::new(
                    ErrorCode::Denied,
                    "anonymous pushes and deletes are refused on this listener; configure [auth] (or anonymous_writes = true)",
                ));
            }
            None
        }
    };
    match endpoint {
        Endpoint::Base => match *method {
            Method::GET | Method::HEAD => {
                Ok(response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from("{}")))
            }
            _ => Err(unsupported_method()),
        },
        Endpoint::Metrics => match *method {
            Method::GET => {
                let text = state.metrics.render(&state.federation.load());
                Ok(response(StatusCode::OK, &[("content-type", "text/plain; version=0.0.4".into())], Body::from(text)))
            }
            _ => Err(unsupported_method()),
        },
        Endpoint::Token { scopes } => {
            let auth = state
                .auth
                .as_ref()
                .ok_or_else(|| OciError::new(ErrorCode::NotFound, "this registry does not issue tokens"))?;
            match *method {
                Method::GET => Ok(response(
                    StatusCode::OK,
                    &[("content-type", "application/json".into())],
                    Body::from(auth.token(parts, &scopes)?.to_string()),
                )),
                // containerd tries the OAuth2 POST form first and falls back to GET on 405.
                _ => Err(unsupported_method()),
            }
        }
        Endpoint::Jwks => {
            let jwks = state
                .auth
                .as_ref()
                .and_then(|a| a.jwks())
                .ok_or_else(|| OciError::new(ErrorCode::NotFound, "this registry does not issue tokens"))?;
            Ok(response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from(jwks.to_string())))
        }
        Endpoint::Catalog(paging) => {
            if *method != Method::GET {
                return Err(unsupported_method());
            }
            let page = registry.catalog(paging.n, paging.last.as_deref()).await?;
            Ok(listing("/v2/_catalog", "repositories", None, &paging, page))
        }
        Endpoint::Tags { name, paging } => {
            if *method != Method::GET {
                return Err(unsupported_method());
            }
            let route = route()?;
            admitted(state, parts, caller.as_ref(), &route, &name)?;
            match route.tags(paging.n, paging.last.as_deref()).await? {
                Found::Here((items, more)) => {
                    let page = Page { items, more };
                    Ok(listing(&format!("/v2/{name}/tags/list"), "tags", Some(("name", name.as_str())), &paging, page))
                }
                Found::Redirect(url) => Ok(redirect(&url)),
            }
        }
        Endpoint::Manifest { name, reference } => match *method {
            Method::GET | Method::HEAD => {
                let route = route()?;
                admitted(state, parts, caller.as_ref(), &route, &name)?;
                let (m, stale) = match route.manifest(&reference, accept(headers).as_deref()).await? {
                    Found::Here(found) => found,
                    Found::Redirect(url) => return Ok(redirect(&url)),
                };
                let headers = [
                    ("content-type", m.media_type.clone()),
                    ("content-length", m.bytes.len().to_string()),
                    ("docker-content-digest", m.digest.to_string()),
                    ("etag", format!("\"{}\"", m.digest)),
                ];
                let body = if *method == Method::HEAD { Body::empty() } else { Body::from(m.bytes) };
                let mut r = response(StatusCode::OK, &headers, body);
                if stale {
                    routed::stale_headers(r.headers_mut());
                }
                Ok(r)
            }
            Method::PUT => {
                let route = route()?;
                let name = route.writable()?;
                let limit = registry.settings().manifest_max_bytes;
                if content_length(headers).is_some_and(|l| l > limit) {
                    // Left in its slot: the dispatcher drains it if that is cheap, else closes.
                    return Err(registry.manifest_too_large());
                }
                let mut stream = take(body).into_data_stream();
                let mut bytes = bytes::BytesMut::new();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk
                        .map_err(|_| OciError::new(ErrorCode::ManifestInvalid, "manifest body could not be read"))?;
                    if (bytes.len() + chunk.len()) as u64 > limit {
                        discard(Body::from_stream(stream)).await;
                        return Err(registry.manifest_too_large());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                let bytes = bytes.freeze();
                let put =
                    registry.manifest_put(name, &reference, header_str(headers, header::CONTENT_TYPE), bytes).await?;
                let mut out = vec![
                    ("location", format!("/v2/{name}/manifests/{}", put.digest)),
                    ("docker-content-digest", put.digest.to_string()),
                    ("content-length", "0".into()),
                ];
                if let Some(subject) = put.subject {
                    out.push(("oci-subject", subject.to_string()));
                }
                Ok(response(StatusCode::CREATED, &out, Body::empty()))
            }
            Method::DELETE => {
                let route = route()?;
                registry.manifest_delete(route.writable()?, &reference).await?;
                Ok(StatusCode::ACCEPTED.into_response())
            }
            _ => Err(unsupported_method()),
        },
        Endpoint::Blob { name, digest, stream } => match *method {
            Method::HEAD => {
                let route = route()?;
                admitted(state, parts, caller.as_ref(), &route, &name)?;
                let size = match route.blob_size(&digest).await? {
                    Found::Here(size) => size,
                    Found::Redirect(url) => return Ok(redirect(&url)),
                };
                let headers = [
                    ("content-length", size.to_string()),
                    ("content-type", "application/octet-stream".into()),
                    ("docker-content-digest", digest.to_string()),
                    ("accept-ranges", "bytes".into()),
                ];
                Ok(response(StatusCode::OK, &headers, Body::empty()))
            }
            Method::GET => {
                // Only someone who may write the repository may skip its delivery policy.
                let stream = stream
                    && match (&state.auth, &caller) {
                        (Some(auth), Some(caller)) => auth.may_push(caller, &name),
                        _ => state.anonymous_writes,
                    };
                let route = route()?;
                admitted(state, parts, caller.as_ref(), &route, &name)?;
                let answer = match route.blob(&digest, header_str(headers, header::RANGE), stream).await? {
                    Found::Here(answer) => answer,
                    Found::Redirect(url) => return Ok(redirect(&url)),
                };
                let mut out = vec![
                    ("content-length", answer.read.len.to_string()),
                    ("content-type", "application/octet-stream".into()),
                    ("docker-content-digest", digest.to_string()),
                    ("accept-ranges", "bytes".into()),
                    ("etag", format!("\"{digest}\"")),
                ];
                let status = match answer.range {
                    Some(ByteRange { start, end }) => {
                        out.push(("content-range", format!("bytes {start}-{end}/{}", answer.size)));
                        StatusCode::PARTIAL_CONTENT
                    }
                    None => StatusCode::OK,
                };
                Ok(response(status, &out, Body::from_stream(answer.read.body)))
            }
            Method::DELETE => {
                let route = route()?;
                registry.blob_delete(route.writable()?, &digest).await?;
                Ok(StatusCode::ACCEPTED.into_response())
            }
            _ => Err(unsupported_method()),
        },
        Endpoint::UploadStart { name: _, digest, mount, from } => {
            if *method != Method::POST {
                return Err(unsupported_method());
            }
            let route = route()?;
            let name = route.writable()?;
            if let Some(digest) = digest {
                registry.upload_monolithic(name, &digest, byte_stream(body, state.limits.body_idle)).await?;
                return Ok(blob_created(name, &digest));
            }
            // Mounting reads the source repository: only from one the client may pull, and
            // without `from` (any repository) only when no login policy applies.
            let from = match (&state.auth, &caller, from) {
                (Some(auth), Some(caller), Some(from)) => Some(from).filter(|f| auth.may_pull(caller, f)),
                (_, _, from) => from,
            };
            let mount = mount.filter(|_| state.auth.is_none() || from.is_some());
            match registry.upload_start(name, mount.as_ref().map(|m| (m, from.as_ref()))).await? {
                UploadStart::Created(digest) => Ok(blob_created(name, &digest)),
                UploadStart::Session(id) => {
                    Ok(response(StatusCode::ACCEPTED, &session_headers(name, &id, 0), Body::empty()))
                }
            }
        }
        Endpoint::Upload { name: _, id, digest } => {
            let route = route()?;
            let name = route.writable()?.clone();
            let content_range =
                header_str(headers, header::CONTENT_RANGE).map(ByteRange::from_content_range).transpose()?;
            match *method {
                Method::GET => {
                    let offset = registry.upload_status(&name, &id).await?;
                    Ok(response(StatusCode::NO_CONTENT, &session_headers(&name, &id, offset), Body::empty()))
                }
                Method::PATCH => {
                    let offset = registry
                        .upload_patch(
                            &name,
                            &id,
                            content_range,
                            content_length(headers),
                            byte_stream(body, state.limits.body_idle),
                        )
                        .await?;
                    Ok(response(StatusCode::ACCEPTED, &session_headers(&name, &id, offset), Body::empty()))
                }
                Method::PUT => {
                    let Some(digest) = digest else {
                        // An unknown session is reported as such before the missing digest.
                        registry.upload_status(&name, &id).await?;
                        return Err(OciError::new(
                            ErrorCode::DigestInvalid,
                            "the digest query parameter is required to close an upload",
                        ));
                    };
                    let length = content_length(headers).or_else(|| {
                        use axum::body::HttpBody as _;
                        body.as_ref().and_then(|b| b.size_hint().exact())
                    });
                    registry
                        .upload_finish(
                            &name,
                            &id,
                            &digest,
                            content_range,
                            length,
                            byte_stream(body, state.limits.body_idle),
                        )
                        .await?;
                    Ok(blob_created(&name, &digest))
                }
                Method::DELETE => {
                    registry.upload_cancel(&name, &id).await?;
                    Ok(StatusCode::NO_CONTENT.into_response())
                }
                _ => Err(unsupported_method()),
            }
        }
        Endpoint::BlobLocation { name: _, digest } => {
            let route = route()?;
            let name = route.writable()?;
            match *method {
                Method::GET => {
                    let (size, urls) = match registry.blob_at(name, &digest).await? {
                        BlobAt::Here(size) => (size, Vec::new()),
                        BlobAt::Elsewhere { size, urls } => (size, urls),
                    };
                    let body = serde_json::json!({
                        "digest": digest.to_string(), "size": size, "here": urls.is_empty(), "urls": urls,
                    });
                    Ok(response(
                        StatusCode::OK,
                        &[("content-type", "application/json".into())],
                        Body::from(body.to_string()),
                    ))
                }
                Method::PUT => {
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Location {
                        size: u64,
                        urls: Vec<String>,
                        /// Check with a HEAD that each URL holds the blob (the default).
                        #[serde(default = "yes")]
                        verify: bool,
                    }
                    fn yes() -> bool {
                        true
                    }
                    let body = axum::body::to_bytes(take(body), LOCATION_MAX_BYTES)
                        .await
                        .map_err(|_| OciError::new(ErrorCode::TooLarge, "the blob location document is too large"))?;
                    let location: Location = serde_json::from_slice(&body).map_err(|e| {
                        OciError::new(
                            ErrorCode::LocationInvalid,
                            format!("expected {{\"size\": N, \"urls\": [...]}}: {e}"),
                        )
                    })?;
                    if let Some(refused) = location
                        .urls
                        .iter()
                        .find(|u| route.delivery().allowed_url(name, std::slice::from_ref(u)).is_none())
                    {
                        return Err(OciError::new(
                            ErrorCode::Denied,
                            format!("{refused} is not a URL the delivery policy of {name} allows (external_allow)"),
                        ));
                    }
                    if location.verify {
                        for url in &location.urls {
                            route
                                .delivery()
                                .verify_external(name, url, location.size)
                                .await
                                .map_err(|e| OciError::new(ErrorCode::LocationInvalid, e))?;
                        }
                    }
                    registry.blob_put_external(name, &digest, location.size, &location.urls).await?;
                    Ok(blob_created(name, &digest))
                }
                _ => Err(unsupported_method()),
            }
        }
        Endpoint::Referrers { name, digest, artifact_type } => {
            if *method != Method::GET {
                return Err(unsupported_method());
            }
            let route = route()?;
            admitted(state, parts, caller.as_ref(), &route, &name)?;
            let r = match route.referrers(&digest, artifact_type.as_deref()).await? {
                Found::Here(r) => r,
                Found::Redirect(url) => return Ok(redirect(&url)),
            };
            let mut out = vec![("content-type", tessera_spec::manifest::media::OCI_INDEX.to_string())];
            if r.filtered {
                out.push(("oci-filters-applied", "artifactType".into()));
            }
            Ok(response(StatusCode::OK, &out, Body::from(r.index)))
        }
    }
}
