//! Where blobs and manifests sit in the trees Tessera reads and writes, computed in this one
//! place:
//!
//! - the OCI image layout (image-spec `image-layout.md`): an `oci-layout` marker, an
//!   `index.json` naming the images, and every blob at `blobs/<algorithm>/<hex>`, in a
//!   directory, an archive, or under a base URL;
//! - the blob layout of a published tree (a CDN origin, a `[[delivery]]` base URL): a path
//!   template, Pulp's `blobs/{digest}` unless configured, and Pulp's manifest folders
//!   (`manifests/2/{ref}`, `manifests/list/{ref}`, `manifests/1/{ref}`), where a publish
//!   writes manifests and a Crane static source finds them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_spec::manifest::{ManifestKind, media};
use tessera_spec::{Digest, RepoName};

/// The file marking a directory as an OCI image layout.
pub const OCI_LAYOUT_FILE: &str = "oci-layout";
/// The layout's index of images.
pub const INDEX_FILE: &str = "index.json";
/// The annotation naming an image of a layout (`NAME:TAG`, or a bare tag).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd (and `docker save` since Docker 25) names images by.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A blob's place relative to the layout's root: `blobs/<algorithm>/<hex>`. Appended to a
/// base URL ending in `/`, it is the blob's URL.
pub fn blob_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// A blob's file in the layout directory `root`.
pub fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs").join(digest.algorithm().as_str()).join(digest.hex())
}

/// The `index.json` of the layout directory `root`.
pub fn index_path(root: &Path) -> PathBuf {
    root.join(INDEX_FILE)
}

/// Whether `root` looks like an OCI image layout (it has an `index.json`).
pub fn is_layout(root: &Path) -> bool {
    index_path(root).is_file()
}

/// The `oci-layout` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciLayout {
    pub image_layout_version: String,
}

impl Default for OciLayout {
    fn default() -> Self {
        OciLayout { image_layout_version: "1.0.0".into() }
    }
}

/// A layout's `index.json`, read leniently: what is missing is empty, and entries are
/// checked where they are used (see [`IndexEntry::digest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<IndexEntry>,
}

/// One image an `index.json` lists: a descriptor with its names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// An OCI image index listing `manifests`, as a layout's `index.json` is written.
    pub fn new(manifests: Vec<IndexEntry>) -> ImageIndex {
        ImageIndex { schema_version: 2, media_type: Some(media::OCI_INDEX.into()), manifests }
    }

    pub fn parse(bytes: &[u8]) -> Result<ImageIndex, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The named images: (`ref.name`, digest, media type), entries without a name or with an
    /// invalid digest left out.
    pub fn named(&self) -> impl Iterator<Item = (&str, Digest, Option<&str>)> {
        self.manifests.iter().filter_map(|e| Some((e.ref_name()?, e.digest()?, e.media_type.as_deref())))
    }
}

impl IndexEntry {
    /// An entry for the manifest `digest` of `media_type` and `size`, named `ref_name`.
    pub fn named(media_type: &str, digest: &Digest, size: u64, ref_name: &str) -> IndexEntry {
        IndexEntry {
            media_type: Some(media_type.into()),
            digest: digest.to_string(),
            size,
            annotations: BTreeMap::from([(REF_NAME.to_string(), ref_name.to_string())]),
        }
    }

    /// The digest, if it is a valid one.
    pub fn digest(&self) -> Option<Digest> {
        self.digest.parse().ok()
    }

    /// The `org.opencontainers.image.ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }

    /// Every name the entry has: its `ref.name`, then its containerd name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        [REF_NAME, CONTAINERD_NAME].into_iter().filter_map(|k| self.annotations.get(k).map(String::as_str))
    }
}

/// The blob layout a published tree has unless configured otherwise (Pulp's).
pub const DEFAULT_BLOB_LAYOUT: &str = "blobs/{digest}";

/// Where a blob lives in a published tree whose blob layout is `template`: `{digest}`,
/// `{algorithm}`, `{hex}`, `{hex2}` (the first two hex digits) and `{name}` (the
/// repository) are filled in.
pub fn expand_blob_layout(template: &str, name: &RepoName, digest: &Digest) -> String {
    if template == DEFAULT_BLOB_LAYOUT {
        return format!("blobs/{digest}");
    }
    let hex = digest.hex();
    template
        .replace("{digest}", &digest.to_string())
        .replace("{algorithm}", digest.algorithm().as_str())
        .replace("{hex2}", &hex[..2])
        .replace("{hex}", hex)
        .replace("{name}", name.as_str())
}

/// Pulp's manifest folders in a published tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PulpManifests {
    /// `manifests/1/`: Docker schema 1.
    Schema1,
    /// `manifests/2/`: image manifests.
    Schema2,
    /// `manifests/list/`: indexes and manifest lists.
    List,
}

impl PulpManifests {
    /// The folder of a manifest of `kind`.
    pub fn of(kind: ManifestKind) -> PulpManifests {
        match kind {
            ManifestKind::Image => PulpManifests::Schema2,
            ManifestKind::Index => PulpManifests::List,
        }
    }

    /// `manifests/<folder>/<reference>`.
    pub fn key(self, reference: &str) -> String {
        let folder = match self {
            PulpManifests::Schema1 => "1",
            PulpManifests::Schema2 => "2",
            PulpManifests::List => "list",
        };
        format!("manifests/{folder}/{reference}")
    }
}

/// A base URL with the trailing slash paths are appended after.
pub fn ensure_slash(base: &str) -> String {
    if base.ends_with('/') { base.to_string() } else { format!("{base}/") }
}

/// Where the simple signatures of `name@digest` are kept in a layout directory, in the
/// lookaside layout: `sigstore/<name>@<algorithm>=<hex>/signature-<N>`.
pub fn lookaside_dir(dir: &Path, name: &RepoName, digest: &Digest) -> PathBuf {
    dir.join(lookaside_key(name, digest, None))
}

/// The path of `digest`'s signatures in the lookaside layout under a tree's `sigstore/`,
/// or of its signature `n` (from 1).
pub fn lookaside_key(name: &RepoName, digest: &Digest, n: Option<usize>) -> String {
    let entry = format!("sigstore/{}", lookaside_entry(name, digest));
    match n {
        Some(n) => format!("{entry}/signature-{n}"),
        None => entry,
    }
}

/// The directory of `digest`'s signatures in the lookaside layout, below its base:
/// `<name>@<algorithm>=<hex>`.
pub fn lookaside_entry(name: &RepoName, digest: &Digest) -> String {
    format!("{name}@{}={}", digest.algorithm().as_str(), digest.hex())
}

/// The name a signature of `digest` read from a lookaside (which names none) is kept
/// under: its content's, so reading it again adds nothing.
pub fn signature_name(digest: &Digest, content: &[u8]) -> String {
    format!("{digest}@{}", &Digest::sha256_of(content).hex()[..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(blob_key(&d), format!("blobs/sha256/{}", d.hex()));
        assert_eq!(blob_path(Path::new("l"), &d), Path::new("l").join(blob_key(&d)));
        let name: RepoName = "isv/app".parse().unwrap();
        assert_eq!(expand_blob_layout(DEFAULT_BLOB_LAYOUT, &name, &d), format!("blobs/{d}"));
        assert_eq!(
            expand_blob_layout("{name}/{algorithm}/{hex2}/{hex}", &name, &d),
            format!("isv/app/sha256/{}/{}", &d.hex()[..2], d.hex())
        );
        assert_eq!(PulpManifests::of(ManifestKind::Index).key("v1"), "manifests/list/v1");
        assert_eq!(PulpManifests::of(ManifestKind::Image).key("v1"), "manifests/2/v1");
        assert_eq!(PulpManifests::Schema1.key("v1"), "manifests/1/v1");
    }

    #[test]
    fn indexes_read_leniently_and_round_trip() {
        let d = Digest::sha256_of(b"m");
        let index = ImageIndex::new(vec![IndexEntry::named(media::OCI_MANIFEST, &d, 3, "isv/app:1")]);
        let bytes = serde_json::to_vec(&index).unwrap();
        assert_eq!(ImageIndex::parse(&bytes).unwrap(), index);
        let named: Vec<_> = index.named().collect();
        assert_eq!(named, vec![("isv/app:1", d.clone(), Some(media::OCI_MANIFEST))]);
        let odd = br#"{"manifests":[{"digest":"nonsense","annotations":{"org.opencontainers.image.ref.name":"x"}},{"digest":"sha256:00"}]}"#;
        assert_eq!(ImageIndex::parse(odd).unwrap().named().count(), 0);
        assert!(ImageIndex::parse(b"{}").unwrap().manifests.is_empty());
        assert_eq!(serde_json::to_string(&OciLayout::default()).unwrap(), r#"{"imageLayoutVersion":"1.0.0"}"#);
    }
}
