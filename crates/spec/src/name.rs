//! Repository names, tags and references, checked against the distribution spec's grammar.
//! A value of these types is proof the string matched, so later code never re-checks it.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{ErrorCode, OciError};

/// The longest repository name accepted. The spec bounds host plus name to 255 characters.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// The grammar admits no `..`, `%`, empty or absolute components, so a name can never
/// address anything outside its own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepoName {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, OciError> {
        if s.len() > MAX_NAME_LEN {
            return Err(OciError::new(
                ErrorCode::NameInvalid,
                format!("repository name longer than {MAX_NAME_LEN} characters"),
            ));
        }
        if s.split('/').all(valid_component) {
            Ok(RepoName(s.to_string()))
        } else {
            Err(OciError::new(ErrorCode::NameInvalid, "invalid repository name")
                .with_detail(serde_json::json!({ "name": s })))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, OciError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..].iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(OciError::new(ErrorCode::TagInvalid, "invalid tag").with_detail(serde_json::json!({ "tag": s })))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag, or a digest (anything containing `:`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, OciError> {
        if s.contains(':') { s.parse().map(Reference::Digest) } else { s.parse().map(Reference::Tag) }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Whether a configured name `prefix` covers `name`, by whole path components: `""` covers
/// every name, `team` covers `team` and `team/app` but not `teams`. Slashes around the
/// prefix are ignored.
pub fn prefix_covers(prefix: &str, name: &str) -> bool {
    let prefix = prefix.trim_matches('/');
    prefix.is_empty() || name == prefix || name.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_whole_components() {
        assert!(prefix_covers("", "a/b"));
        assert!(prefix_covers("team", "team") && prefix_covers("/team/", "team/app"));
        assert!(!prefix_covers("team", "teams") && !prefix_covers("team/app", "team"));
    }

    #[test]
    fn accepts_spec_names() {
        for ok in ["a", "library/ubuntu", "a0/b-c/d.e/f_g/h__i", "x---y", "cool/stuff/x", "a/b/c/d/e/f"] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "..",
            "a/../b",
            "%2e%2e",
            "a/%2e%2e/b",
            "-a",
            "a-",
            "a.",
            "a..b",
            "a___b",
            "a_-b",
            "a/.b",
            "a b",
            "a\0b",
            "ä",
            long.as_str(),
            "a\\b",
        ] {
            let e = bad.parse::<RepoName>().unwrap_err();
            assert_eq!(e.code, ErrorCode::NameInvalid, "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        for bad in ["", ".a", "-a", "a/b", "a:b", "a%2f", &"a".repeat(129)] {
            assert_eq!(bad.parse::<Tag>().unwrap_err().code, ErrorCode::TagInvalid, "{bad}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = Digest::sha256_of(b"x").to_string();
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert_eq!("sha256:nothex".parse::<Reference>().unwrap_err().code, ErrorCode::DigestInvalid);
    }
}
