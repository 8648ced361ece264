//! Simple signatures: the signature extension API (`GET` a manifest's signatures, `PUT`
//! one more) and the lookaside layout (`GET` one signature's bytes).

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use serde_json::json;
use tessera_registry::signatures::{SIGNATURE_MAX_BYTES, Signature};
use tessera_spec::{Digest, ErrorCode, OciError};

use super::{response, take};
use crate::AppState;
use crate::policy::Permit;
use crate::routed::Reply;

/// The signatures of `digest` from the first of the route's sources that keeps any; none
/// is an empty list, as the extension's clients expect.
async fn kept(permit: &Permit, digest: &Digest) -> Result<Vec<Signature>, OciError> {
    let route = permit.readable()?;
    match route.first(|source, name| source.signatures(name, digest, &permit.ask)).await {
        Ok(Reply::Here(found)) => Ok(found),
        Ok(Reply::Redirect(_)) => Ok(Vec::new()),
        Err(e) if matches!(e.code, ErrorCode::ManifestUnknown | ErrorCode::NameUnknown) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `GET /extensions/v2/<name>/signatures/<digest>`.
pub(super) async fn list(permit: &Permit, digest: &Digest) -> Result<Response, OciError> {
    let engine = base64::engine::general_purpose::STANDARD;
    let signatures: Vec<_> = kept(permit, digest)
        .await?
        .iter()
        .map(|s| json!({ "schemaVersion": 2, "type": "atomic", "name": s.name, "content": engine.encode(&s.content) }))
        .collect();
    let body = json!({ "signatures": signatures }).to_string();
    Ok(response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from(body)))
}

/// `PUT /extensions/v2/<name>/signatures/<digest>` with one signature object
/// (`schemaVersion` 2, `type` "atomic" or absent, `name` `<digest>@<unique part>`,
/// `content` in base64).
pub(super) async fn add(
    state: &AppState,
    permit: &Permit,
    body: &mut Option<Body>,
    digest: &Digest,
) -> Result<Response, OciError> {
    let repo = permit.writable()?;
    // Base64 and the JSON around it: a third more than the signature, and a little.
    let limit = SIGNATURE_MAX_BYTES * 4 / 3 + 4096;
    let bytes = axum::body::to_bytes(take(body), limit)
        .await
        .map_err(|_| OciError::new(ErrorCode::TooLarge, "the signature document is too large"))?;
    #[derive(serde::Deserialize)]
    struct Sent {
        #[serde(rename = "schemaVersion")]
        version: u32,
        #[serde(rename = "type")]
        kind: Option<String>,
        name: String,
        content: String,
    }
    let sent: Sent = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!("expected {{\"schemaVersion\": 2, \"type\": \"atomic\", \"name\", \"content\"}}: {e}"))
    })?;
    if sent.version != 2 || sent.kind.as_deref().is_some_and(|k| k != "atomic") {
        return Err(invalid("only schemaVersion 2 \"atomic\" signatures are kept"));
    }
    let content = base64::engine::general_purpose::STANDARD
        .decode(sent.content.as_bytes())
        .map_err(|_| invalid("the content is not base64"))?;
    state.registry.add_signature(repo, digest, &sent.name, &content).await?;
    permit.route()?.signing().may_have_signed(repo);
    Ok(response(StatusCode::CREATED, &[("content-length", "0".into())], Body::empty()))
}

/// `GET /sigstore/<name>@<algorithm>=<hex>/signature-<index>`: the signature's bytes.
pub(super) async fn lookaside(permit: &Permit, digest: &Digest, index: usize) -> Result<Response, OciError> {
    let signature = kept(permit, digest).await?.into_iter().nth(index - 1).ok_or_else(|| {
        // A client reads signature-1, -2, ... until one is not found.
        OciError::new(ErrorCode::NotFound, "no such signature")
    })?;
    Ok(response(
        StatusCode::OK,
        &[("content-type", "application/octet-stream".into()), ("content-length", signature.content.len().to_string())],
        Body::from(signature.content),
    ))
}

fn invalid(why: impl Into<String>) -> OciError {
    OciError::new(ErrorCode::SignatureInvalid, why)
}
