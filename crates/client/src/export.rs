//! `tessera export`: images from a registry written as one OCI image layout (a directory, or
//! an OCI archive), to carry across an air gap.

use std::path::{Path, PathBuf};

use crate::error::ClientError;
use crate::layout::{self, ImageIndex, IndexEntry, OciLayout};
use crate::progress;
use crate::reference::RegistryReference;
use crate::source::{Blob, Source, SourceImage};

/// Where an export goes: a layout directory, or (a name ending in `.tar`) an OCI archive.
fn layout_dir_for(output: &Path) -> PathBuf {
    if output.extension().is_some_and(|e| e == "tar") {
        output.with_extension("tar.partial-layout")
    } else {
        output.to_path_buf()
    }
}

/// Writes the images `references` as one OCI image layout at `output` (a directory, or an
/// OCI archive when it ends in `.tar`), each named `NAME:TAG` (or `NAME:DIGEST`) in its
/// `index.json`. Blobs already there with their size are kept, so an interrupted export
/// resumes. Returns the number of images.
pub async fn export(
    references: &[RegistryReference],
    output: &Path,
    plain_http: bool,
    creds: Option<&str>,
) -> Result<usize, ClientError> {
    let dir = layout_dir_for(output);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let mut entries = Vec::new();
    for reference in references {
        let (name, tag) = (&reference.image.name, &reference.image.reference);
        let image = SourceImage::read(&Source::Registry(reference.clone()), plain_http, creds).await?;
        let blobs: Vec<&Blob> = image.configs.iter().chain(image.layers.iter()).collect();
        for (i, b) in blobs.iter().enumerate() {
            let path = layout::blob_path(&dir, &b.digest);
            std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == b.size) {
                eprintln!("{name}:{tag} [{}/{}] {} already exported", i + 1, blobs.len(), b.digest);
                continue;
            }
            let bar = progress::blob(&format!("{name}:{tag} [{}/{}]", i + 1, blobs.len()), &b.digest, b.size);
            image.copy_blob(&b.digest, &path, &bar).await?;
            progress::finish(&bar);
        }
        for m in &image.manifests {
            std::fs::write(layout::blob_path(&dir, &m.digest), &m.bytes)?;
        }
        // Simple signatures travel in the layout too, in the lookaside layout under
        // `sigstore/` (which `import` reads, and any tool can use as a `file://` lookaside).
        let source = crate::registry_client(&reference.host, plain_http, creds)?;
        for m in &image.manifests {
            let contents = crate::copy::signature_contents(&source, name, &m.digest).await?;
            if contents.is_empty() {
                continue;
            }
            let at = layout::lookaside_dir(&dir, name, &m.digest);
            std::fs::create_dir_all(&at)?;
            for (i, content) in contents.iter().enumerate() {
                std::fs::write(at.join(format!("signature-{}", i + 1)), content)?;
            }
            eprintln!("{name}:{tag} {} signature(s) of {}", contents.len(), m.digest);
        }
        let top = image.manifests.last().ok_or_else(|| ClientError::NoManifest { what: reference.to_string() })?;
        let size = top.bytes.len() as u64;
        entries.push(IndexEntry::named(&top.media_type, &top.digest, size, &format!("{name}:{tag}")));
    }
    std::fs::write(dir.join(layout::OCI_LAYOUT_FILE), serde_json::to_vec(&OciLayout::default())?)?;
    std::fs::write(layout::index_path(&dir), serde_json::to_vec_pretty(&ImageIndex::new(entries))?)?;
    if dir != output {
        let partial = output.with_extension("tar.partial");
        {
            let file = std::fs::File::create(&partial)?;
            let mut tar = tar::Builder::new(file);
            tar.follow_symlinks(false);
            tar.append_dir_all(".", &dir)?;
            tar.into_inner()?.sync_all()?;
        }
        std::fs::rename(&partial, output)?;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(references.len())
}
