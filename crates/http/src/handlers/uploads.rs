//! Blob uploads into hosted: starting one (monolithic, a session, or a mount) and the
//! session's status, chunks, close and cancel.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_registry::UploadStart;
use tessera_spec::{ByteRange, Digest, ErrorCode, OciError};
use tessera_store::UploadId;

use super::{blob_created, byte_stream, content_length, header_str, response, session_headers, unsupported_method};
use crate::AppState;
use crate::policy::Permit;

/// `POST /v2/<name>/blobs/uploads/`: the whole blob with `?digest=`, a mount the caller may
/// do, or a new session.
pub(super) async fn start(
    state: &AppState,
    permit: &Permit,
    parts: &Parts,
    body: &mut Option<Body>,
    digest: Option<&Digest>,
) -> Result<Response, OciError> {
    let name = permit.writable()?;
    let registry = &state.registry;
    if let Some(digest) = digest {
        let length = content_length(&parts.headers);
        registry.upload_monolithic(name, digest, length, byte_stream(body, state.limits.body_idle)).await?;
        return Ok(blob_created(name, digest));
    }
    let mount = permit.mount.as_ref().map(|(digest, from)| (digest, from.as_ref()));
    match registry.upload_start(name, mount).await? {
        UploadStart::Created(digest) => Ok(blob_created(name, &digest)),
        UploadStart::Session(id) => Ok(response(StatusCode::ACCEPTED, &session_headers(name, &id, 0), Body::empty())),
    }
}

/// `/v2/<name>/blobs/uploads/<id>`: `GET` the offset, `PATCH` a chunk, `PUT` the last chunk
/// with the digest, `DELETE` the session.
pub(super) async fn session(
    state: &AppState,
    permit: &Permit,
    parts: &Parts,
    body: &mut Option<Body>,
    id: &UploadId,
    digest: Option<&Digest>,
) -> Result<Response, OciError> {
    let name = permit.writable()?;
    let registry = &state.registry;
    let headers = &parts.headers;
    let content_range = header_str(headers, header::CONTENT_RANGE).map(ByteRange::from_content_range).transpose()?;
    let accepted = |offset| response(StatusCode::ACCEPTED, &session_headers(name, id, offset), Body::empty());
    match parts.method {
        Method::GET => {
            let offset = registry.upload_status(name, id).await?;
            Ok(response(StatusCode::NO_CONTENT, &session_headers(name, id, offset), Body::empty()))
        }
        Method::PATCH => {
            let chunk = byte_stream(body, state.limits.body_idle);
            Ok(accepted(registry.upload_patch(name, id, content_range, content_length(headers), chunk).await?))
        }
        Method::PUT => {
            let Some(digest) = digest else {
                // An unknown session is reported as such before the missing digest.
                registry.upload_status(name, id).await?;
                return Err(OciError::new(
                    ErrorCode::DigestInvalid,
                    "the digest query parameter is required to close an upload",
                ));
            };
            let length = content_length(headers).or_else(|| {
                use axum::body::HttpBody as _;
                body.as_ref().and_then(|b| b.size_hint().exact())
            });
            let last = byte_stream(body, state.limits.body_idle);
            registry.upload_finish(name, id, digest, content_range, length, last).await?;
            Ok(blob_created(name, digest))
        }
        Method::DELETE => {
            registry.upload_cancel(name, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Err(unsupported_method()),
    }
}
