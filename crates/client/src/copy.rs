//! `tessera copy`: promotion by digest. Within one Tessera the server does it (its blobs
//! are mounted, no byte moves); between two registries the image streams through this
//! process, only what the destination lacks, mounted where the destination can.

use std::collections::HashSet;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderMap;
use tessera_spec::{Digest, Reference, RepoName, Tag};

use crate::error::ClientError;
use crate::import::{BlobChunks, upload};
use crate::progress;
use crate::push::{check, content_type};
use crate::reference::{ImageReference, RegistryReference};
use crate::source::{Source, SourceImage};
use crate::upstream::Upstream;

/// How a copy runs.
#[derive(Debug, Default, Clone)]
pub struct CopyOptions {
    /// Every tag of the source repository, each under the same tag.
    pub all_tags: bool,
    /// Only say what would move.
    pub dry_run: bool,
    pub plain_http: bool,
    pub src_creds: Option<String>,
    pub dest_creds: Option<String>,
}

/// What a copy did (or would do).
#[derive(Debug, Default)]
pub struct CopyReport {
    /// Done by the destination server itself (within one Tessera).
    pub server_side: bool,
    /// One line per manifest and blob, for the terminal.
    pub lines: Vec<String>,
    /// Bytes streamed through this process.
    pub bytes_sent: u64,
    /// Bytes linked at the destination without being sent.
    pub bytes_mounted: u64,
}

/// Copies `src` to `dest` (see the module docs).
pub async fn copy(
    src: &RegistryReference,
    dest: &RegistryReference,
    options: &CopyOptions,
) -> Result<CopyReport, ClientError> {
    let dest_client = crate::registry_client(&dest.host, options.plain_http, options.dest_creds.as_deref())?;
    if src.host == dest.host
        && let Some(report) = server_side(src, dest, &dest_client, options).await?
    {
        return Ok(report);
    }
    let mut report = CopyReport::default();
    let images: Vec<(ImageReference, Option<Tag>)> = if options.all_tags {
        let src_client = crate::registry_client(&src.host, options.plain_http, options.src_creds.as_deref())?;
        tags(&src_client, &src.image.name)
            .await?
            .into_iter()
            .map(|t| (ImageReference { name: src.image.name.clone(), reference: Reference::Tag(t.clone()) }, Some(t)))
            .collect()
    } else {
        let tag = match &dest.image.reference {
            Reference::Tag(t) => Some(t.clone()),
            Reference::Digest(_) => None,
        };
        vec![(src.image.clone(), tag)]
    };
    for (image, tag) in images {
        let from = RegistryReference { host: src.host.clone(), image };
        stream_image(&from, &dest.host, &dest.image.name, tag.as_ref(), &dest_client, options, &mut report).await?;
    }
    Ok(report)
}

/// Asks a Tessera destination to copy within itself. `None` when it cannot (another
/// registry, or a source it does not host): then the image streams instead.
async fn server_side(
    src: &RegistryReference,
    dest: &RegistryReference,
    dest_client: &Upstream,
    options: &CopyOptions,
) -> Result<Option<CopyReport>, ClientError> {
    let to = &dest.image.name;
    let mut query = form_urlencoded_pairs(&[("from", src.image.name.as_str())]);
    if options.all_tags {
        query.push_str("&all_tags=true");
    } else {
        query.push_str(&format!("&reference={}", src.image.reference));
        if let Reference::Tag(t) = &dest.image.reference {
            query.push_str(&format!("&tag={t}"));
        }
    }
    if options.dry_run {
        query.push_str("&dry_run=true");
    }
    let path = format!("/tessera/v1/{to}/copy?{query}");
    let r = dest_client.send_push(Method::POST, to, &path, HeaderMap::new(), Bytes::new()).await?;
    let status = r.status();
    if !status.is_success() {
        let body = r.text().await.unwrap_or_default();
        let code = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
        // Not Tessera (no such endpoint), or not a source it hosts: stream instead.
        return match code.as_deref() {
            None | Some("NOT_FOUND" | "UNSUPPORTED") => Ok(None),
            Some(_) => Err(ClientError::Refused { what: format!("copy to {dest}"), status, body }),
        };
    }
    let answer: serde_json::Value = r.json().await?;
    let verb = |present: bool, doing: &'static str| if present { "already there" } else { doing };
    let (mount, store) = if options.dry_run { ("would mount", "would store") } else { ("mounted", "stored") };
    let mut report = CopyReport { server_side: true, ..CopyReport::default() };
    for image in answer["images"].as_array().into_iter().flatten() {
        let source = image["source"].as_str().unwrap_or("?");
        for b in image["blobs"].as_array().into_iter().flatten() {
            let present = b["present"].as_bool().unwrap_or(false);
            report.lines.push(format!(
                "{source}: blob {} ({} bytes) {}",
                b["digest"].as_str().unwrap_or("?"),
                b["size"],
                verb(present, mount)
            ));
        }
        for m in image["manifests"].as_array().into_iter().flatten() {
            let present = m["present"].as_bool().unwrap_or(false) && m["tag"].is_null();
            let tag = m["tag"].as_str().map(|t| format!(" as {to}:{t}")).unwrap_or_default();
            report.lines.push(format!(
                "{source}: {} {}{tag} {}",
                m["role"].as_str().unwrap_or("manifest"),
                m["digest"].as_str().unwrap_or("?"),
                verb(present, store)
            ));
        }
    }
    for image in answer["images"].as_array().into_iter().flatten() {
        let signatures = image["signatures"].as_u64().unwrap_or(0);
        if signatures > 0 {
            let source = image["source"].as_str().unwrap_or("?");
            let done = if options.dry_run { "would copy" } else { "copied" };
            report.lines.push(format!("{source}: {done} {signatures} signature(s)"));
        }
    }
    report.bytes_mounted = answer["bytes_mounted"].as_u64().unwrap_or(0);
    Ok(Some(report))
}

fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
        .collect::<Vec<_>>()
        .join("&")
}

/// Every tag of `name`, following the registry's pages.
async fn tags(client: &Upstream, name: &RepoName) -> Result<Vec<Tag>, ClientError> {
    let mut tags = Vec::new();
    let mut path = format!("/v2/{name}/tags/list");
    loop {
        let r = client.send(Method::GET, name, &path, HeaderMap::new()).await?;
        if !r.status().is_success() {
            return Err(ClientError::Status { what: format!("tags of {name}"), status: r.status() });
        }
        let next = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.split_once('<'))
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(link, _)| link.to_string());
        let page: serde_json::Value = r.json().await?;
        for t in page["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str()) {
            // A tag this registry would refuse is not copied silently wrong: it fails.
            tags.push(t.parse().map_err(|_| ClientError::Status {
                what: format!("{name}: tag {t:?}"),
                status: reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            })?);
        }
        match next {
            Some(link) => path = link,
            None => return Ok(tags),
        }
    }
}

/// Streams one image (and its referrers) from `src` into `to` on `dest_client`.
async fn stream_image(
    src: &RegistryReference,
    dest_host: &str,
    to: &RepoName,
    tag: Option<&Tag>,
    dest_client: &Upstream,
    options: &CopyOptions,
    report: &mut CopyReport,
) -> Result<(), ClientError> {
    let same_registry = src.host == dest_host;
    let src_client = crate::registry_client(&src.host, options.plain_http, options.src_creds.as_deref())?;
    let mut pending = vec![(src.image.reference.clone(), tag.cloned(), "image")];
    let mut seen = HashSet::new();
    while let Some((reference, tag, role)) = pending.pop() {
        let from = RegistryReference {
            host: src.host.clone(),
            image: ImageReference { name: src.image.name.clone(), reference },
        };
        let image =
            SourceImage::read(&Source::Registry(from.clone()), options.plain_http, options.src_creds.as_deref())
                .await?;
        let Some(top) = image.manifests.last() else { continue };
        if !seen.insert(top.digest.clone()) {
            continue;
        }
        for blob in image.configs.iter().chain(&image.layers) {
            let path = format!("/v2/{to}/blobs/{}", blob.digest);
            let head = dest_client.send_push(Method::HEAD, to, &path, HeaderMap::new(), Bytes::new()).await?;
            let line = |what: &str| format!("{from}: blob {} ({} bytes) {what}", blob.digest, blob.size);
            if head.status().is_success() {
                report.lines.push(line("already there"));
                continue;
            }
            if options.dry_run {
                report.lines.push(line(if same_registry { "would mount or send" } else { "would send" }));
                continue;
            }
            if same_registry {
                let path = format!("/v2/{to}/blobs/uploads/?mount={}&from={}", blob.digest, src.image.name);
                let r = dest_client.send_push(Method::POST, to, &path, HeaderMap::new(), Bytes::new()).await?;
                if r.status().as_u16() == 201 {
                    report.bytes_mounted += blob.size;
                    report.lines.push(line("mounted"));
                    continue;
                }
                // A session the mount opened instead is left to expire; the upload opens its own.
            }
            let bar = progress::blob(&format!("{from}"), &blob.digest, blob.size);
            let answer = image.blob_answer(&blob.digest).await?;
            upload(dest_client, to, &blob.digest, BlobChunks::Answer(answer), &bar).await?;
            progress::finish(&bar);
            report.bytes_sent += blob.size;
            report.lines.push(line("sent"));
        }
        let last = image.manifests.len() - 1;
        for (i, m) in image.manifests.iter().enumerate() {
            let reference = match (&tag, i == last) {
                (Some(t), true) => t.to_string(),
                _ => m.digest.to_string(),
            };
            let what = if i == last { role } else { "child" };
            let shown = if i == last && tag.is_some() { format!(" as {to}:{reference}") } else { String::new() };
            let head = dest_client
                .send_push(
                    Method::HEAD,
                    to,
                    &format!("/v2/{to}/manifests/{}", m.digest),
                    HeaderMap::new(),
                    Bytes::new(),
                )
                .await?;
            let present = head.status().is_success() && shown.is_empty();
            let done = match (present, options.dry_run) {
                (true, _) => "already there",
                (false, true) => "would store",
                (false, false) => {
                    let path = format!("/v2/{to}/manifests/{reference}");
                    let r = dest_client
                        .send_push(Method::PUT, to, &path, content_type(&m.media_type), m.bytes.clone())
                        .await?;
                    check(format!("manifest {}", m.digest), r).await?;
                    "stored"
                }
            };
            report.lines.push(format!("{from}: {what} {}{shown} {done}", m.digest));
        }
        for m in &image.manifests {
            let signatures = simple_signatures(&src_client, &src.image.name, &m.digest).await?;
            let mut copied = 0;
            for signature in &signatures {
                if options.dry_run {
                    continue;
                }
                let path = format!("/extensions/v2/{to}/signatures/{}", m.digest);
                let r = dest_client
                    .send_push(
                        Method::PUT,
                        to,
                        &path,
                        content_type("application/json"),
                        Bytes::from(signature.to_string()),
                    )
                    .await?;
                if r.status().is_success() {
                    copied += 1;
                } else {
                    report.lines.push(format!(
                        "{from}: signature of {} not kept (the destination answered {})",
                        m.digest,
                        r.status()
                    ));
                }
            }
            if !signatures.is_empty() {
                let done = if options.dry_run { "would copy" } else { "copied" };
                let n = if options.dry_run { signatures.len() } else { copied };
                report.lines.push(format!("{from}: {done} {n} signature(s) of {}", m.digest));
            }
            for referrer in referrers(&src_client, &src.image.name, &m.digest).await? {
                if !seen.contains(&referrer) {
                    pending.push((Reference::Digest(referrer), None, "referrer"));
                }
            }
        }
    }
    Ok(())
}

/// The simple signatures of `digest` in `name`, as the signature extension API answers
/// them (none where the registry has no such extension).
pub(crate) async fn simple_signatures(
    client: &Upstream,
    name: &RepoName,
    digest: &Digest,
) -> Result<Vec<serde_json::Value>, ClientError> {
    let path = format!("/extensions/v2/{name}/signatures/{digest}");
    let r = client.send(Method::GET, name, &path, HeaderMap::new()).await?;
    if !r.status().is_success() {
        return Ok(Vec::new());
    }
    let list: serde_json::Value = r.json().await.unwrap_or_default();
    Ok(list["signatures"].as_array().cloned().unwrap_or_default())
}

/// The contents of the simple signatures of `digest` in `name`, decoded (none where the
/// registry has no signature extension).
pub(crate) async fn signature_contents(
    client: &Upstream,
    name: &RepoName,
    digest: &Digest,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let engine = base64::engine::general_purpose::STANDARD;
    Ok(simple_signatures(client, name, digest)
        .await?
        .iter()
        .filter_map(|s| s["content"].as_str())
        .filter_map(|c| base64::Engine::decode(&engine, c).ok())
        .collect())
}

/// The digests of `subject`'s referrers in `name` (none where the registry has no
/// referrers API).
async fn referrers(client: &Upstream, name: &RepoName, subject: &Digest) -> Result<Vec<Digest>, ClientError> {
    let r = client.send(Method::GET, name, &format!("/v2/{name}/referrers/{subject}"), HeaderMap::new()).await?;
    if !r.status().is_success() {
        return Ok(Vec::new());
    }
    let index: serde_json::Value = r.json().await.unwrap_or_default();
    Ok(index["manifests"].as_array().into_iter().flatten().filter_map(|m| m["digest"].as_str()?.parse().ok()).collect())
}
