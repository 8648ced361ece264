//! Request handling: the dispatcher (client limits, time limit, draining refused bodies),
//! the decision step, then one handler per endpoint family, and the helpers that shape OCI
//! responses.

mod blobs;
mod listings;
mod manifests;
pub mod pages;
mod promote;
mod service;
mod signatures;
mod uploads;

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;
use tessera_spec::{ErrorCode, OciError, RepoName};
use tessera_store::{Page, UploadId};

use crate::endpoint::{Endpoint, Paging};
use crate::notify::{Happened, Happenings};
use crate::policy::Permit;
use crate::{ApiError, AppState, EndpointFamily};

pub(crate) async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    // A load balancer's probes pass before limits and login: it asks often, from one
    // address, and never logs in.
    // Every answer on a page path carries the pages' security headers, errors (a name
    // that does not parse, a rate limit, a time limit) included.
    let page_path = req.uri().path() == "/" || req.uri().path().starts_with("/ui/");
    let (mut answer, family) = match req.uri().path() {
        "/healthz" => (service::healthz(), EndpointFamily::Probe),
        "/readyz" => (service::readyz(&state).await, EndpointFamily::Probe),
        _ => {
            let mut family = EndpointFamily::Unknown;
            (answered(&state, req, &mut family).await, family)
        }
    };
    answer.extensions_mut().insert(family);
    if page_path { pages::secured(answer) } else { answer }
}

/// The answer to a request the probes did not take; `family` says what it asked for, as
/// soon as that is known.
async fn answered(state: &AppState, req: Request, family: &mut EndpointFamily) -> Response {
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
            match tokio::time::timeout(limit, handle(state, &parts, &mut body, family)).await {
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
        (Ok(_slot), _) => handle(state, &parts, &mut body, family).await,
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
    builder.body(body).unwrap_or_else(|e| {
        tracing::error!("cannot build a response: {e}");
        ApiError(OciError::internal()).into_response()
    })
}

/// `response`, carrying `events` to the notifier when one listens.
fn telling(state: &AppState, permit: &Permit, mut response: Response, events: Vec<Happened>) -> Response {
    if state.notifier.is_some() && !events.is_empty() {
        response.extensions_mut().insert(Happenings { events, actor: permit.actor.clone() });
    }
    response
}

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

/// One request after the dispatcher admitted it: the decision step, then the handler of its
/// endpoint family.
async fn handle(
    state: &AppState,
    parts: &Parts,
    body: &mut Option<Body>,
    family: &mut EndpointFamily,
) -> Result<Response, OciError> {
    let endpoint = crate::policy::endpoint_of(parts)?;
    *family = EndpointFamily::of(&endpoint);
    if let Endpoint::Page(page) = endpoint {
        return Ok(pages::answer(state, parts, body, page).await);
    }
    let permit = crate::policy::decide(state, parts, endpoint).await?;
    let method = &parts.method;
    match &permit.endpoint {
        Endpoint::Base | Endpoint::Metrics | Endpoint::Quotas | Endpoint::Token { .. } | Endpoint::Jwks => {
            service::handle(state, parts, &permit.endpoint).await
        }
        Endpoint::Catalog(paging) if *method == Method::GET => listings::catalog(state, paging).await,
        Endpoint::Tags { name, paging } if *method == Method::GET => listings::tags(&permit, name, paging).await,
        Endpoint::Referrers { name: _, digest, artifact_type } if *method == Method::GET => {
            listings::referrers(&permit, digest, artifact_type.as_deref()).await
        }
        Endpoint::Manifest { reference, .. } => match *method {
            Method::GET | Method::HEAD => manifests::get(state, &permit, parts, reference).await,
            Method::PUT => manifests::put(state, &permit, parts, body, reference).await,
            Method::DELETE => manifests::delete(state, &permit, reference).await,
            _ => Err(unsupported_method()),
        },
        Endpoint::Blob { digest, .. } => match *method {
            Method::HEAD => blobs::head(&permit, digest).await,
            Method::GET => blobs::get(&permit, parts, digest).await,
            Method::DELETE => blobs::delete(state, &permit, digest).await,
            _ => Err(unsupported_method()),
        },
        Endpoint::UploadStart { digest, .. } if *method == Method::POST => {
            uploads::start(state, &permit, parts, body, digest.as_ref()).await
        }
        Endpoint::Upload { id, digest, .. } => uploads::session(state, &permit, parts, body, id, digest.as_ref()).await,
        Endpoint::BlobLocation { digest, .. } => match (permit.writable()?, method) {
            (_, &Method::GET) => blobs::location(state, &permit, digest).await,
            (_, &Method::PUT) => blobs::record_location(state, &permit, body, digest).await,
            _ => Err(unsupported_method()),
        },
        Endpoint::Signatures { digest, .. } => match *method {
            Method::GET => signatures::list(&permit, digest).await,
            Method::PUT => signatures::add(state, &permit, body, digest).await,
            _ => Err(unsupported_method()),
        },
        Endpoint::Lookaside { digest, index, .. } if *method == Method::GET => {
            signatures::lookaside(&permit, digest, *index).await
        }
        Endpoint::Copy { what, dry_run, .. } if *method == Method::POST => {
            promote::copy(state, &permit, what, *dry_run).await
        }
        // Answered before the decision step, above.
        Endpoint::Page(_) => Err(OciError::new(ErrorCode::NotFound, "no such endpoint")),
        Endpoint::Catalog(_)
        | Endpoint::Tags { .. }
        | Endpoint::Referrers { .. }
        | Endpoint::UploadStart { .. }
        | Endpoint::Lookaside { .. }
        | Endpoint::Copy { .. } => Err(unsupported_method()),
    }
}
