//! Blobs: read from the route's sources (bytes, or a redirect the delivery policy chose),
//! deleted from hosted; and Tessera's blob location API (where a blob lives; a blob that
//! stays on another server recorded by metadata only).

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_registry::BlobAt;
use tessera_spec::{ByteRange, Digest, ErrorCode, OciError, RangeRequest};

use super::{blob_created, header_str, redirect, response, take};
use crate::AppState;
use crate::policy::Permit;
use crate::routed::Reply;

/// The largest document a blob location PUT may send.
const LOCATION_MAX_BYTES: usize = 64 * 1024;

pub(super) async fn head(permit: &Permit, digest: &Digest) -> Result<Response, OciError> {
    let route = permit.readable()?;
    let size = match route.first(|source, name| source.blob_size(name, digest, &permit.ask)).await? {
        Reply::Here(size) => size,
        Reply::Redirect(url) => return Ok(redirect(&url)),
    };
    let headers = [
        ("content-length", size.to_string()),
        ("content-type", "application/octet-stream".into()),
        ("docker-content-digest", digest.to_string()),
        ("accept-ranges", "bytes".into()),
    ];
    Ok(response(StatusCode::OK, &headers, Body::empty()))
}

/// `GET`: the bytes (all, or the one range asked for), or a redirect to where they are.
pub(super) async fn get(permit: &Permit, parts: &Parts, digest: &Digest) -> Result<Response, OciError> {
    let route = permit.readable()?;
    if let Some(name) = permit.endpoint.name() {
        route.signing().admit_blob(route.resolved(), name, digest, &permit.ask).await?;
    }
    let range = header_str(&parts.headers, header::RANGE).and_then(RangeRequest::parse);
    let answer = match route.first(|source, name| source.blob(name, digest, range.as_ref(), &permit.ask)).await? {
        Reply::Here(answer) => answer,
        Reply::Redirect(url) => return Ok(redirect(&url)),
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

pub(super) async fn delete(state: &AppState, permit: &Permit, digest: &Digest) -> Result<Response, OciError> {
    state.registry.blob_delete(permit.writable()?, digest).await?;
    let deleted = permit.endpoint.name().map(|name| crate::notify::Happened {
        action: crate::notify::Action::Delete,
        repository: name.clone(),
        digest: Some(digest.clone()),
        media_type: Some("application/octet-stream".into()),
        size: None,
        tag: None,
        from: None,
    });
    Ok(super::telling(state, permit, StatusCode::ACCEPTED.into_response(), deleted.into_iter().collect()))
}

/// `GET /tessera/v1/<name>/blobs/<digest>`: whether the blob is here, or the URLs it lives at.
pub(super) async fn location(state: &AppState, permit: &Permit, digest: &Digest) -> Result<Response, OciError> {
    let name = permit.writable()?;
    let (size, urls) = match state.registry.blob_at(name, digest).await? {
        BlobAt::Here(size) => (size, Vec::new()),
        BlobAt::Elsewhere { size, urls } => (size, urls),
    };
    let body = serde_json::json!({
        "digest": digest.to_string(), "size": size, "here": urls.is_empty(), "urls": urls,
    });
    Ok(response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from(body.to_string())))
}

/// `PUT /tessera/v1/<name>/blobs/<digest>` with `{"size", "urls", "verify"}`: records a blob
/// that stays at `urls` (metadata-only push). Every URL must be one the repository's
/// delivery policy allows, and, unless `verify` is false, must answer a `HEAD` with the size.
pub(super) async fn record_location(
    state: &AppState,
    permit: &Permit,
    body: &mut Option<Body>,
    digest: &Digest,
) -> Result<Response, OciError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Location {
        size: u64,
        urls: Vec<String>,
        #[serde(default = "yes")]
        verify: bool,
    }
    fn yes() -> bool {
        true
    }
    let route = permit.route()?;
    let name = route.writable()?;
    let body = axum::body::to_bytes(take(body), LOCATION_MAX_BYTES)
        .await
        .map_err(|_| OciError::new(ErrorCode::TooLarge, "the blob location document is too large"))?;
    let location: Location = serde_json::from_slice(&body).map_err(|e| {
        OciError::new(ErrorCode::LocationInvalid, format!("expected {{\"size\": N, \"urls\": [...]}}: {e}"))
    })?;
    let delivery = route.delivery();
    if let Some(refused) = location.urls.iter().find(|u| delivery.allowed_url(name, std::slice::from_ref(u)).is_none())
    {
        return Err(OciError::new(
            ErrorCode::Denied,
            format!("{refused} is not a URL the delivery policy of {name} allows (external_allow)"),
        ));
    }
    if location.verify {
        for url in &location.urls {
            delivery
                .verify_external(name, url, location.size)
                .await
                .map_err(|e| OciError::new(ErrorCode::LocationInvalid, e.to_string()))?;
        }
    }
    state.registry.blob_put_external(name, digest, location.size, &location.urls).await?;
    Ok(blob_created(name, digest))
}
