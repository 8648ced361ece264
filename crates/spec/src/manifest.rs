//! Manifest and index parsing: just enough structure to validate a push (every referenced
//! blob and child manifest), answer the referrers API, and refuse what we cannot serve.
//! The bytes themselves are always stored and returned exactly as pushed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{ErrorCode, OciError};

pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

    /// Every manifest media type this registry stores and serves.
    pub const ALL: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest (OCI or Docker schema 2), including artifacts.
    Image,
    /// An image index or Docker manifest list.
    Index,
}

/// A validated content descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub urls: Vec<String>,
    pub artifact_type: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: i64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    subject: Option<RawDescriptor>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedManifest {
    pub media_type: String,
    pub kind: ManifestKind,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    /// The type reported to the referrers API: `artifactType`, else the config's media type.
    pub artifact_type: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

fn invalid(msg: impl Into<String>) -> OciError {
    OciError::new(ErrorCode::ManifestInvalid, msg)
}

fn descriptor(raw: RawDescriptor, field: &str) -> Result<Descriptor, OciError> {
    let digest: Digest = raw.digest.parse().map_err(|e: OciError| invalid(format!("{field}: {}", e.message)))?;
    let size = u64::try_from(raw.size).map_err(|_| invalid(format!("{field}: negative size")))?;
    if raw.media_type.is_empty() {
        return Err(invalid(format!("{field}: empty mediaType")));
    }
    Ok(Descriptor {
        media_type: raw.media_type,
        digest,
        size,
        urls: raw.urls.unwrap_or_default(),
        artifact_type: raw.artifact_type,
        annotations: raw.annotations.unwrap_or_default(),
    })
}

/// The media type of a `Content-Type` header value, without parameters; `None` when it says
/// nothing specific (absent, empty, or plain JSON).
fn declared_type(content_type: Option<&str>) -> Option<&str> {
    let t = content_type?.split(';').next()?.trim();
    (!t.is_empty() && t != "application/json" && t != "application/octet-stream").then_some(t)
}

impl ParsedManifest {
    /// Parses and validates manifest `bytes` pushed with `content_type`.
    pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<ParsedManifest, OciError> {
        let raw: RawManifest = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("manifest is not valid JSON for its schema: {e}")))?;
        let header = declared_type(content_type);
        let media_type = match (header, raw.media_type.as_deref()) {
            (Some(h), Some(b)) if h != b => {
                return Err(invalid(format!("Content-Type {h} differs from the manifest's mediaType {b}")));
            }
            (Some(h), _) => h.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, None) => media::OCI_MANIFEST.to_string(),
        };
        let kind = match media_type.as_str() {
            media::OCI_MANIFEST | media::DOCKER_MANIFEST => ManifestKind::Image,
            media::OCI_INDEX | media::DOCKER_LIST => ManifestKind::Index,
            media::DOCKER_SCHEMA1 | media::DOCKER_SCHEMA1_SIGNED => {
                return Err(invalid("Docker schema 1 manifests are not supported; push schema 2 or OCI"));
            }
            other => {
                return Err(invalid(format!("unsupported manifest media type {other:?}")));
            }
        };
        if raw.schema_version != 2 {
            return Err(invalid("schemaVersion must be 2"));
        }
        let subject = raw.subject.map(|s| descriptor(s, "subject")).transpose()?;
        let annotations = raw.annotations.unwrap_or_default();
        match kind {
            ManifestKind::Image => {
                let config = descriptor(raw.config.ok_or_else(|| invalid("image manifest without config"))?, "config")?;
                let layers = raw
                    .layers
                    .ok_or_else(|| invalid("image manifest without layers"))?
                    .into_iter()
                    .map(|d| descriptor(d, "layers"))
                    .collect::<Result<Vec<_>, _>>()?;
                if raw.manifests.is_some() {
                    return Err(invalid("image manifest must not have manifests"));
                }
                let artifact_type = raw.artifact_type.or_else(|| Some(config.media_type.clone()));
                Ok(ParsedManifest {
                    media_type,
                    kind,
                    config: Some(config),
                    layers,
                    manifests: Vec::new(),
                    subject,
                    artifact_type,
                    annotations,
                })
            }
            ManifestKind::Index => {
                let manifests = raw
                    .manifests
                    .ok_or_else(|| invalid("index without manifests"))?
                    .into_iter()
                    .map(|d| descriptor(d, "manifests"))
                    .collect::<Result<Vec<_>, _>>()?;
                if raw.config.is_some() || raw.layers.is_some() {
                    return Err(invalid("index must not have config or layers"));
                }
                Ok(ParsedManifest {
                    media_type,
                    kind,
                    config: None,
                    layers: Vec::new(),
                    manifests,
                    subject,
                    artifact_type: raw.artifact_type,
                    annotations,
                })
            }
        }
    }

    /// Blobs this manifest needs present in the repository: config and layers, except
    /// layers that name their own `urls` (non-distributable layers live elsewhere).
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter().filter(|d| d.urls.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::sha256_of(&[n]).to_string()
    }

    fn image() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}}],"annotations":{{"a":"b"}}}}"#,
            media::OCI_MANIFEST,
            d(1),
            d(2)
        )
    }

    #[test]
    fn parses_image_manifest() {
        let m = ParsedManifest::parse(Some(media::OCI_MANIFEST), image().as_bytes()).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.required_blobs().count(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
        assert_eq!(m.annotations["a"], "b");
    }

    #[test]
    fn content_type_must_agree() {
        let e = ParsedManifest::parse(Some(media::OCI_INDEX), image().as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::ManifestInvalid);
        assert!(ParsedManifest::parse(Some("application/json; charset=utf-8"), image().as_bytes()).is_ok());
    }

    #[test]
    fn index_and_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{}","size":10}}],"subject":{{"mediaType":"{}","digest":"{}","size":5}},"artifactType":"x/y"}}"#,
            media::OCI_MANIFEST,
            d(3),
            media::OCI_MANIFEST,
            d(4)
        );
        let m = ParsedManifest::parse(None, body.as_bytes()).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.media_type, media::OCI_INDEX);
        assert_eq!(m.subject.unwrap().digest.to_string(), d(4));
        assert_eq!(m.artifact_type.as_deref(), Some("x/y"));
    }

    #[test]
    fn rejects_malformed() {
        let dup = format!(
            r#"{{"schemaVersion":2,"schemaVersion":2,"config":{{"mediaType":"a","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        for bad in [
            "".to_string(),
            "{".to_string(),
            "[]".to_string(),
            "\u{0}".to_string(),
            r#"{"schemaVersion":1}"#.to_string(),
            r#"{"schemaVersion":2}"#.to_string(),
            format!(r#"{{"schemaVersion":2,"config":{{"mediaType":"a","digest":"{}","size":-1}},"layers":[]}}"#, d(1)),
            r#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:zz","size":1},"layers":[]}"#.to_string(),
            format!(r#"{{"schemaVersion":2,"mediaType":"{}","config":{{}}}}"#, media::DOCKER_SCHEMA1),
            dup,
        ] {
            let e = ParsedManifest::parse(None, bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::ManifestInvalid, "{bad}");
        }
        assert!(ParsedManifest::parse(None, &[0xff, 0xfe, b'{']).is_err());
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{}","size":9,"urls":["https://example.com/x"]}}]}}"#,
            d(1),
            d(2)
        );
        let m = ParsedManifest::parse(None, body.as_bytes()).unwrap();
        assert_eq!(m.required_blobs().count(), 1);
    }
}
