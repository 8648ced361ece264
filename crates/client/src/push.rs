//! `tessera push --blobs-at`: records an image in a Tessera repository while its layers stay
//! on a CDN (a metadata-only push).

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use tessera_spec::{Digest, RepoName, Tag};

use crate::error::ClientError;
use crate::layout::expand_blob_layout;
use crate::source::{Blob, SourceImage};
use crate::upstream::Upstream;

/// Ok for a 2xx; else the status and the server's error body, under `what`.
pub(crate) async fn check(what: String, r: reqwest::Response) -> Result<(), ClientError> {
    if r.status().is_success() {
        return Ok(());
    }
    let status = r.status();
    Err(ClientError::Refused { what, status, body: r.text().await.unwrap_or_default() })
}

pub(crate) fn content_type(content_type: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h
}

/// What a metadata-only push did.
pub struct PushReport {
    pub top: Digest,
    pub layers: usize,
    pub configs: usize,
    pub manifests: usize,
}

/// Records `image` in `name:tag` on the Tessera server behind `dest`, its layers as living at
/// `blobs_at` (by the blob layout `layout`). With `verify`, the server checks with a HEAD
/// (signed, when its delivery policy signs that CDN) that each layer is there with its size.
pub async fn push_metadata_only(
    image: &SourceImage,
    dest: &Upstream,
    name: &RepoName,
    tag: &Tag,
    blobs_at: &str,
    layout: &str,
    verify: bool,
) -> Result<PushReport, ClientError> {
    let base = crate::layout::ensure_slash(blobs_at);
    let located: Vec<(&Blob, String)> =
        image.layers.iter().map(|l| (l, format!("{base}{}", expand_blob_layout(layout, name, &l.digest)))).collect();
    for c in &image.configs {
        let bytes = image.blob(&c.digest).await?;
        let r = dest
            .send_push(
                Method::POST,
                name,
                &format!("/v2/{name}/blobs/uploads/?digest={}", c.digest),
                content_type("application/octet-stream"),
                bytes,
            )
            .await?;
        check(format!("config {}", c.digest), r).await?;
    }
    for (layer, url) in &located {
        let body = serde_json::json!({ "size": layer.size, "urls": [url], "verify": verify }).to_string();
        let r = dest
            .send_push(
                Method::PUT,
                name,
                &format!("/tessera/v1/{name}/blobs/{}", layer.digest),
                content_type("application/json"),
                Bytes::from(body),
            )
            .await?;
        check(format!("layer {}", layer.digest), r).await?;
    }
    let last = image.manifests.len() - 1;
    for (i, m) in image.manifests.iter().enumerate() {
        let reference = if i == last { tag.to_string() } else { m.digest.to_string() };
        let r = dest
            .send_push(
                Method::PUT,
                name,
                &format!("/v2/{name}/manifests/{reference}"),
                content_type(&m.media_type),
                m.bytes.clone(),
            )
            .await?;
        check(format!("manifest {}", m.digest), r).await?;
    }
    Ok(PushReport {
        top: image.manifests[last].digest.clone(),
        layers: image.layers.len(),
        configs: image.configs.len(),
        manifests: image.manifests.len(),
    })
}
