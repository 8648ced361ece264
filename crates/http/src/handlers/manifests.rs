//! Manifests: read from the route's sources, written to and deleted from hosted.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tessera_spec::{Accept, ErrorCode, OciError, Reference};

use super::{content_length, discard, header_str, redirect, response, take, telling};
use crate::AppState;
use crate::notify::{Action, Happened};
use crate::policy::Permit;
use crate::routed::Reply;

/// `GET` and `HEAD`: the manifest from the first source that has it, with its exact bytes.
pub(super) async fn get(
    state: &AppState,
    permit: &Permit,
    parts: &Parts,
    reference: &Reference,
) -> Result<Response, OciError> {
    let route = permit.readable()?;
    let accept = Accept::parse(parts.headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()));
    let name = permit.endpoint.name().ok_or_else(OciError::internal)?;
    let signing = route.signing();
    let answered = route.first_answering(|source, name| source.manifest(name, reference, &accept, &permit.ask));
    let (served, source) = match answered.await? {
        (Reply::Here(served), source) => (served, source),
        (Reply::Redirect(url), _) => {
            signing.admit_redirect(route.resolved(), name)?;
            return Ok(redirect(&url));
        }
    };
    let m = served.manifest;
    signing.admit(route.resolved(), source, name, reference, &m, &permit.ask).await?;
    let pulled = (parts.method == Method::GET && state.notifier.as_ref().is_some_and(|n| n.wants(Action::Pull)))
        .then(|| happened(Action::Pull, permit, reference, &m.digest, &m.media_type, m.bytes.len()))
        .flatten();
    let headers = [
        ("content-type", m.media_type.clone()),
        ("content-length", m.bytes.len().to_string()),
        ("docker-content-digest", m.digest.to_string()),
        ("etag", format!("\"{}\"", m.digest)),
    ];
    let body = if parts.method == Method::HEAD { Body::empty() } else { Body::from(m.bytes) };
    let mut r = response(StatusCode::OK, &headers, body);
    if served.stale {
        // The answer came from the cache while the upstream could not be asked.
        r.headers_mut().insert(header::WARNING, header::HeaderValue::from_static("110 tessera \"Response is Stale\""));
    }
    Ok(telling(state, permit, r, pulled.into_iter().collect()))
}

/// What a manifest request did, for the notifier: by the name the client used.
fn happened(
    action: Action,
    permit: &Permit,
    reference: &Reference,
    digest: &tessera_spec::Digest,
    media_type: &str,
    size: usize,
) -> Option<Happened> {
    Some(Happened {
        action,
        repository: permit.endpoint.name()?.clone(),
        digest: Some(digest.clone()),
        media_type: Some(media_type.to_string()),
        size: Some(size as u64),
        tag: match reference {
            Reference::Tag(t) => Some(t.clone()),
            Reference::Digest(_) => None,
        },
        from: None,
    })
}

/// `PUT`: a manifest of at most the configured size, stored in hosted as sent.
pub(super) async fn put(
    state: &AppState,
    permit: &Permit,
    parts: &Parts,
    body: &mut Option<Body>,
    reference: &Reference,
) -> Result<Response, OciError> {
    let name = permit.writable()?;
    let registry = &state.registry;
    let limit = registry.settings().manifest_max_bytes;
    if content_length(&parts.headers).is_some_and(|l| l > limit) {
        // Left in its slot: the dispatcher drains it if that is cheap, else closes.
        return Err(registry.manifest_too_large());
    }
    let mut stream = take(body).into_data_stream();
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| OciError::new(ErrorCode::ManifestInvalid, "manifest body could not be read"))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            discard(Body::from_stream(stream)).await;
            return Err(registry.manifest_too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let content_type = header_str(&parts.headers, header::CONTENT_TYPE);
    let size = bytes.len();
    let put = registry.manifest_put(name, reference, content_type, bytes.freeze()).await?;
    permit.route()?.signing().may_have_signed(name);
    let mut out = vec![
        ("location", format!("/v2/{name}/manifests/{}", put.digest)),
        ("docker-content-digest", put.digest.to_string()),
        ("content-length", "0".into()),
    ];
    if let Some(subject) = put.subject {
        out.push(("oci-subject", subject.to_string()));
    }
    let pushed = happened(Action::Push, permit, reference, &put.digest, &put.media_type, size);
    Ok(telling(state, permit, response(StatusCode::CREATED, &out, Body::empty()), pushed.into_iter().collect()))
}

pub(super) async fn delete(state: &AppState, permit: &Permit, reference: &Reference) -> Result<Response, OciError> {
    state.registry.manifest_delete(permit.writable()?, reference).await?;
    let (digest, tag) = match reference {
        Reference::Digest(d) => (Some(d.clone()), None),
        Reference::Tag(t) => (None, Some(t.clone())),
    };
    let repository = permit.endpoint.name().cloned();
    let deleted = repository.map(|repository| Happened {
        action: Action::Delete,
        repository,
        digest,
        media_type: None,
        size: None,
        tag,
        from: None,
    });
    Ok(telling(state, permit, StatusCode::ACCEPTED.into_response(), deleted.into_iter().collect()))
}
