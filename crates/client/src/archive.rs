//! Tar archives: unpacking one safely, and reading a `docker save` archive from before
//! Docker 25 (`manifest.json` naming a config file and uncompressed layer tars).

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use tessera_spec::manifest::media;
use tessera_spec::{Algorithm, Digest, Digester};

use crate::error::ClientError;

/// Unpacks the regular files and directories of a tar archive into `into`. Links and
/// special files are skipped, and no entry may land outside `into`.
pub fn unpack(file: &Path, into: &Path) -> Result<(), ClientError> {
    let f = std::fs::File::open(file).map_err(|source| ClientError::Open { path: file.to_path_buf(), source })?;
    let mut archive = tar::Archive::new(f);
    let unreadable = |source| ClientError::Unreadable { path: file.to_path_buf(), source };
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        if !entry.unpack_in(into).map_err(unreadable)? {
            let entry = entry.path().ok().map(|p| p.into_owned());
            return Err(ClientError::ArchiveEscape { path: file.to_path_buf(), entry });
        }
    }
    Ok(())
}

/// One image of a legacy archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedImage {
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// The image of a legacy archive, as a Docker schema 2 manifest over its files.
pub struct LegacyImage {
    /// The manifest's bytes (its digest is the image's).
    pub manifest: Bytes,
    /// Each blob's file, by digest: the config first, then the layers.
    pub files: Vec<(Digest, PathBuf)>,
    /// The first of the image's `RepoTags`, `NAME:TAG`.
    pub repo_tag: Option<String>,
}

/// Reads the first image of the legacy archive unpacked at `dir`.
pub fn legacy_image(dir: &Path) -> Result<LegacyImage, ClientError> {
    let listing = std::fs::read(dir.join("manifest.json")).map_err(ClientError::NotAnArchive)?;
    let listing: Vec<ListedImage> = serde_json::from_slice(&listing).map_err(ClientError::ArchiveListing)?;
    let entry = listing.into_iter().next().ok_or(ClientError::ArchiveEmpty)?;
    let file_blob = |rel: &str| -> Result<(Digest, u64, PathBuf), ClientError> {
        // Only plain relative names of regular files inside the archive: no absolute path,
        // no `..`, no link that could point at a file of this machine.
        if rel.is_empty() || !Path::new(rel).components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ClientError::ArchivePath(rel.to_string()));
        }
        let path = dir.join(rel);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            return Err(ClientError::ArchiveNotAFile(rel.to_string()));
        }
        let mut f =
            std::fs::File::open(&path).map_err(|source| ClientError::ArchiveLacks { name: rel.to_string(), source })?;
        let mut digester = Digester::new(Algorithm::Sha256);
        let mut buf = vec![0; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            digester.update(&buf[..n]);
            size += n as u64;
        }
        Ok((digester.finish(), size, path))
    };
    let (config_digest, config_size, config_path) =
        file_blob(entry.config.as_deref().ok_or(ClientError::ArchiveNoConfig)?)?;
    let mut files = vec![(config_digest.clone(), config_path)];
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (d, size, path) = file_blob(l)?;
        files.push((d.clone(), path));
        layers.push(serde_json::json!({ "mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": d.to_string(), "size": size }));
    }
    // Written through serde_json's map (keys in order) so the same archive always makes
    // the same manifest, byte for byte.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::DOCKER_MANIFEST,
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest.to_string(), "size": config_size },
        "layers": layers,
    });
    let repo_tag = entry.repo_tags.and_then(|t| t.into_iter().next());
    Ok(LegacyImage { manifest: Bytes::from(serde_json::to_vec(&manifest)?), files, repo_tag })
}
