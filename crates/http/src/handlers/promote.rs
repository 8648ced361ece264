//! `POST /tessera/v1/<name>/copy`: promotion within this registry (blobs mounted,
//! manifests stored by digest, referrers along), answered with what moved.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;
use tessera_registry::copy::{Copied, Role};
use tessera_spec::{OciError, Reference, RepoName};

use super::{response, telling};
use crate::AppState;
use crate::endpoint::{CopyWhat, Endpoint};
use crate::notify::{Action, Happened};
use crate::policy::Permit;

pub(super) async fn copy(
    state: &AppState,
    permit: &Permit,
    what: &CopyWhat,
    dry_run: bool,
) -> Result<Response, OciError> {
    let Endpoint::Copy { name: asked_to, from: asked_from, .. } = &permit.endpoint else {
        return Err(OciError::internal());
    };
    let to = permit.writable()?;
    let Some(from) = &permit.copy_from else {
        tracing::error!("a copy reached its handler without a source the decision step checked");
        return Err(OciError::internal());
    };
    let registry = &state.registry;
    let mut images = Vec::new();
    let mut promoted = Vec::new();
    let mut bytes_mounted = 0;
    let one = |reference: Reference, tag| async move {
        let copied = registry.copy(from, &reference, to, tag, dry_run).await?;
        Ok::<_, OciError>((reference, copied))
    };
    match what {
        CopyWhat::One { reference, tag } => {
            let (reference, copied) = one(reference.clone(), tag.as_ref()).await?;
            bytes_mounted += copied.bytes_mounted();
            images.push(image_json(from, &reference, &copied));
            promoted.extend(happened(asked_from, asked_to, &copied));
        }
        CopyWhat::AllTags => {
            for tag in registry.all_tags(from).await? {
                let (reference, copied) = one(Reference::Tag(tag), None).await?;
                bytes_mounted += copied.bytes_mounted();
                images.push(image_json(from, &reference, &copied));
                promoted.extend(happened(asked_from, asked_to, &copied));
            }
        }
    }
    if !dry_run {
        tracing::info!(%from, %to, images = images.len(), bytes_mounted, "copied");
    }
    let body = json!({
        "from": from.to_string(),
        "to": to.to_string(),
        "dry_run": dry_run,
        "images": images,
        "bytes_mounted": bytes_mounted,
    });
    let answer = response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from(body.to_string()));
    Ok(if dry_run { answer } else { telling(state, permit, answer, promoted) })
}

/// The promotion of a copy's image, by the names the client used.
fn happened(from: &RepoName, to: &RepoName, copied: &Copied) -> Option<Happened> {
    let image = copied.manifests.iter().find(|m| m.role == Role::Image)?;
    Some(Happened {
        action: Action::Promote,
        repository: to.clone(),
        digest: Some(image.digest.clone()),
        media_type: Some(image.media_type.clone()),
        size: Some(image.size),
        tag: image.tag.clone(),
        from: Some(from.clone()),
    })
}

fn image_json(from: &RepoName, reference: &Reference, copied: &Copied) -> serde_json::Value {
    let manifests: Vec<_> = copied
        .manifests
        .iter()
        .map(|m| {
            json!({
                "digest": m.digest.to_string(),
                "mediaType": m.media_type,
                "role": m.role.as_str(),
                "tag": m.tag.as_ref().map(|t| t.to_string()),
                "present": m.present,
            })
        })
        .collect();
    let blobs: Vec<_> = copied
        .blobs
        .iter()
        .map(|b| json!({ "digest": b.digest.to_string(), "size": b.size, "present": b.present }))
        .collect();
    let separator = if matches!(reference, Reference::Digest(_)) { "@" } else { ":" };
    json!({
        "source": format!("{from}{separator}{reference}"),
        "manifests": manifests,
        "blobs": blobs,
        "signatures": copied.signatures,
    })
}
