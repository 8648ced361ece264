//! Whose image a signature vouches for: the `docker-reference` it claims, and how strictly
//! it must match the name an image is pulled by.

use std::fmt;

/// An image reference as a signature claims it: `host/path[:tag][@digest]`, with Docker
/// Hub's short forms spelled out (`alpine` is `docker.io/library/alpine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(text: &str) -> Option<Reference> {
        let (named, digest) = match text.split_once('@') {
            Some((n, d)) => (n, Some(d.to_string())),
            None => (text, None),
        };
        // A tag is after the last ':' of the last component (a ':' before a '/' is a port).
        let (named, tag) = match named.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (named, None),
        };
        let (host, path) = match named.split_once('/') {
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => (h.to_string(), p.to_string()),
            _ => ("docker.io".to_string(), named.to_string()),
        };
        let sane = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if !sane(&host) || !path.split('/').all(sane) || !tag.as_deref().is_none_or(sane) {
            return None;
        }
        let path = if host == "docker.io" && !path.contains('/') { format!("library/{path}") } else { path };
        Some(Reference { host, path, tag, digest })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// How a signature's claimed reference must match the name an image is pulled by. The
/// host is never compared: one registry answers to many names (virtual hosts, mirrors,
/// loopback), and the trusted key, chosen per name prefix, is what vouches for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Identity {
    /// The repository, and the tag when pulled by tag (a claim naming no tag, as cosign
    /// writes them, vouches for every tag of its repository).
    #[default]
    Exact,
    /// The repository; any tag.
    Repository,
    /// Any name: only the manifest digest must match.
    Any,
}

impl Identity {
    /// Whether a claim of `claimed` vouches for the repository known as any of `names` (the
    /// name the client used, and each source's name for it), pulled by `tag` if by tag.
    pub fn accepts(self, claimed: Option<&Reference>, names: &[&str], tag: Option<&str>) -> Result<(), String> {
        if self == Identity::Any {
            return Ok(());
        }
        let Some(claimed) = claimed else {
            return Err("it names no image".into());
        };
        if !names.iter().any(|n| *n == claimed.path) {
            return Err(format!("it is for {claimed}, another repository"));
        }
        match (self, tag, &claimed.tag) {
            (Identity::Exact, Some(asked), Some(signed)) if asked != signed => {
                Err(format!("it is for {claimed}, another tag"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_spell_out_docker_hub_and_keep_ports_apart_from_tags() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!((r.host.as_str(), r.path.as_str(), r.tag), ("docker.io", "library/alpine", None));
        let r = Reference::parse("127.0.0.1:5000/team/app:1.0").unwrap();
        assert_eq!((r.host.as_str(), r.path.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", "team/app", Some("1.0")));
        let r = Reference::parse("localhost:5000/app@sha256:abc").unwrap();
        assert_eq!((r.path.as_str(), r.tag, r.digest.as_deref()), ("app", None, Some("sha256:abc")));
        assert_eq!(Reference::parse("quay.io/org/app:v2").unwrap().to_string(), "quay.io/org/app:v2");
        assert!(Reference::parse("").is_none());
        assert!(Reference::parse("host.io/").is_none());
    }

    #[test]
    fn identities_compare_repository_and_tag_as_strict_as_asked() {
        let signed = Reference::parse("registry.example/team/app:1").unwrap();
        let untagged = Reference::parse("registry.example/team/app").unwrap();
        let exact = Identity::Exact;
        assert!(exact.accepts(Some(&signed), &["team/app"], Some("1")).is_ok());
        assert!(exact.accepts(Some(&signed), &["team/app"], None).is_ok(), "by digest: the repository decides");
        assert!(exact.accepts(Some(&signed), &["team/app"], Some("2")).unwrap_err().contains("another tag"));
        assert!(exact.accepts(Some(&untagged), &["team/app"], Some("2")).is_ok());
        assert!(exact.accepts(Some(&signed), &["team/other"], Some("1")).unwrap_err().contains("another repository"));
        assert!(exact.accepts(Some(&signed), &["mirror/team/app", "team/app"], Some("1")).is_ok());
        assert!(exact.accepts(None, &["team/app"], Some("1")).is_err());
        assert!(Identity::Repository.accepts(Some(&signed), &["team/app"], Some("2")).is_ok());
        assert!(Identity::Repository.accepts(Some(&signed), &["team/other"], Some("1")).is_err());
        assert!(Identity::Any.accepts(Some(&signed), &["team/other"], Some("2")).is_ok());
    }
}
