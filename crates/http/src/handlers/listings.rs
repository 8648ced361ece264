//! Listings: the catalog, a repository's tags, and the referrers of a manifest.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use tessera_spec::{Digest, OciError, Paging, RepoName};

use super::{listing, redirect, response};
use crate::AppState;
use crate::policy::Permit;
use crate::routed::Reply;

pub(super) async fn catalog(state: &AppState, paging: &Paging) -> Result<Response, OciError> {
    let page = state.registry.catalog(paging).await?;
    Ok(listing("/v2/_catalog", "repositories", None, paging, page))
}

/// Tags from the first source that knows the repository.
pub(super) async fn tags(permit: &Permit, name: &RepoName, paging: &Paging) -> Result<Response, OciError> {
    let route = permit.readable()?;
    match route.first(|source, name| source.tags(name, paging, &permit.ask)).await? {
        Reply::Here(page) => {
            Ok(listing(&format!("/v2/{name}/tags/list"), "tags", Some(("name", name.as_str())), paging, page))
        }
        Reply::Redirect(url) => Ok(redirect(&url)),
    }
}

pub(super) async fn referrers(
    permit: &Permit,
    subject: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response, OciError> {
    let route = permit.readable()?;
    let found = route.first(|source, name| source.referrers(name, subject, artifact_type, &permit.ask)).await?;
    let r = match found {
        Reply::Here(r) => r,
        Reply::Redirect(url) => return Ok(redirect(&url)),
    };
    let mut out = vec![("content-type", tessera_spec::manifest::media::OCI_INDEX.to_string())];
    if r.filtered {
        out.push(("oci-filters-applied", "artifactType".into()));
    }
    Ok(response(StatusCode::OK, &out, Body::from(r.index)))
}
