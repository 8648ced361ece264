//! Image references as people type them: `NAME[:TAG|@DIGEST]`, and with the registry in
//! front, `HOST[:PORT]/NAME[:TAG|@DIGEST]`. One grammar for every command that takes one.

use std::fmt;

use tessera_spec::{Digest, OciError, Reference, RepoName, Tag};

/// Why a text is not an image reference.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{text:?} has no HOST/ before the name")]
    NoHost { text: String },
    #[error("{text:?} is not NAME:TAG")]
    NoTag { text: String },
    /// The name or the tag/digest part broke the spec's grammar (`error` says which).
    #[error("{text:?}: {}", .error.message)]
    Invalid { text: String, error: OciError },
}

/// `NAME[:TAG|@DIGEST]`, checked against the spec's grammar. A `:` after the last `/`
/// starts the tag; without tag or digest the tag is `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    pub name: RepoName,
    /// The tag or digest.
    pub reference: Reference,
}

/// The name part and, when the text has one, the tag-or-digest part.
fn split(text: &str) -> (&str, Option<&str>) {
    match text.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => match text.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((name, tag)) => (name, Some(tag)),
            None => (text, None),
        },
    }
}

fn invalid(text: &str) -> impl FnOnce(OciError) -> ReferenceError + '_ {
    move |error| ReferenceError::Invalid { text: text.to_string(), error }
}

impl ImageReference {
    /// Parses `NAME[:TAG|@DIGEST]`; the tag defaults to `latest`.
    pub fn parse(text: &str) -> Result<ImageReference, ReferenceError> {
        let (name, reference) = split(text);
        let name = name.parse().map_err(invalid(name))?;
        let reference = reference.unwrap_or("latest");
        let reference = reference.parse().map_err(invalid(reference))?;
        Ok(ImageReference { name, reference })
    }

    /// Parses `NAME:TAG`, the tag written out (as an OCI layout's `ref.name` names images).
    pub fn parse_tagged(text: &str) -> Result<(RepoName, Tag), ReferenceError> {
        let no_tag = || ReferenceError::NoTag { text: text.to_string() };
        if text.contains('@') {
            return Err(no_tag());
        }
        let (name, Some(tag)) = split(text) else { return Err(no_tag()) };
        let tag = tag.parse().map_err(|_| no_tag())?;
        Ok((name.parse().map_err(invalid(name))?, tag))
    }

    pub fn name(&self) -> &RepoName {
        &self.name
    }

    /// The tag, when the reference is one.
    pub fn tag(&self) -> Option<&Tag> {
        match &self.reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }

    /// The digest, when the reference is one.
    pub fn digest(&self) -> Option<&Digest> {
        match &self.reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

/// `NAME:TAG` or `NAME@DIGEST`.
impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.name),
            Reference::Digest(d) => write!(f, "{}@{d}", self.name),
        }
    }
}

/// `HOST[:PORT]/NAME[:TAG|@DIGEST]`: an image on a given registry. Everything before the
/// first `/` is the registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryReference {
    pub host: String,
    pub image: ImageReference,
}

impl RegistryReference {
    pub fn parse(text: &str) -> Result<RegistryReference, ReferenceError> {
        let (host, rest) = text.split_once('/').ok_or_else(|| ReferenceError::NoHost { text: text.to_string() })?;
        Ok(RegistryReference { host: host.to_string(), image: ImageReference::parse(rest)? })
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_and_digests() {
        let r = ImageReference::parse("isv/app").unwrap();
        assert_eq!((r.name.as_str(), r.tag().map(Tag::as_str)), ("isv/app", Some("latest")));
        let r = ImageReference::parse("isv/app:1.2").unwrap();
        assert_eq!(r.to_string(), "isv/app:1.2");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageReference::parse(&format!("isv/app@{digest}")).unwrap();
        assert_eq!(r.digest().map(ToString::to_string), Some(digest.clone()));
        assert_eq!(r.to_string(), format!("isv/app@{digest}"));
        assert!(ImageReference::parse("Bad/Name").unwrap_err().to_string().contains("invalid repository name"));
        assert!(ImageReference::parse("app@sha256:short").is_err());
    }

    #[test]
    fn with_a_registry() {
        let r = RegistryReference::parse("127.0.0.1:5000/isv/app:v1").unwrap();
        assert_eq!((r.host.as_str(), r.image.to_string().as_str()), ("127.0.0.1:5000", "isv/app:v1"));
        assert_eq!(r.to_string(), "127.0.0.1:5000/isv/app:v1");
        let r = RegistryReference::parse("localhost:5000/app").unwrap();
        assert_eq!(r.image.tag().map(Tag::as_str), Some("latest"));
        assert!(matches!(RegistryReference::parse("app"), Err(ReferenceError::NoHost { .. })));
    }

    #[test]
    fn tagged_names_need_their_tag() {
        let (name, tag) = ImageReference::parse_tagged("base/ubi:9").unwrap();
        assert_eq!((name.as_str(), tag.as_str()), ("base/ubi", "9"));
        for text in ["base/ubi", "base/ubi:", "base/ubi:../x", "x@sha256:abc", "Bad:1"] {
            assert!(ImageReference::parse_tagged(text).is_err(), "{text}");
        }
    }
}
