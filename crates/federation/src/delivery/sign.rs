//! Expiring signatures on redirect URLs: nginx `secure_link_md5` and Akamai-style HMAC
//! tokens, checkable by the CDN without asking us.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use md5::Digest as _;
use tessera_config::TokenKind;

/// An expiring signature on URLs.
pub(super) struct Signer {
    kind: TokenKind,
    secret: Vec<u8>,
    ttl: Duration,
    /// The `secure_link_md5` expression, split once into its parts.
    expression: Vec<Part>,
    /// The HMAC key, prepared once.
    hmac_key: ring::hmac::Key,
    hash_param: String,
    expires_param: String,
    token_param: String,
}

/// A piece of a `secure_link_md5` expression.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    Text(String),
    Expires,
    Path,
    Client,
    Secret,
}

/// `"{expires}{path} {secret}"` into its parts; unknown `{...}` stay text.
pub(super) fn parse_expression(expression: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = expression;
    while !rest.is_empty() {
        let placeholder = [
            ("{expires}", Part::Expires),
            ("{path}", Part::Path),
            ("{client}", Part::Client),
            ("{secret}", Part::Secret),
        ]
        .into_iter()
        .find(|(p, _)| rest.starts_with(p));
        match placeholder {
            Some((p, part)) => {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
                rest = &rest[p.len()..];
            }
            None => {
                let c = rest.chars().next().unwrap_or_default();
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

/// The path of an absolute URL built from a configured base (no parsing needed: it starts
/// at the first `/` after the authority and ends before any query).
pub(super) fn url_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    path.split(['?', '#']).next().unwrap_or("/")
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Signer {
    pub(super) fn new(t: &tessera_config::UrlToken) -> Result<Signer, String> {
        let text = match (&t.secret, &t.secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("token secret_file {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            (None, None) => return Err("token needs a secret".into()),
        };
        let secret = match t.kind {
            TokenKind::SecureLinkMd5 => text.into_bytes(),
            TokenKind::HmacSha256 => hex::decode(text.trim()).map_err(|_| "an hmac_sha256 secret must be hex")?,
        };
        if secret.is_empty() {
            return Err("token secret is empty".into());
        }
        Ok(Signer {
            kind: t.kind,
            hmac_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            secret,
            ttl: Duration::from_secs(t.ttl_secs),
            expression: parse_expression(&t.expression),
            hash_param: t.hash_param.clone(),
            expires_param: t.expires_param.clone(),
            token_param: t.token_param.clone(),
        })
    }

    /// `url` with the signature for `client`, valid until now + ttl.
    pub(super) fn sign(&self, url: &str, client: Option<IpAddr>, now: u64) -> String {
        let expires = now + self.ttl.as_secs();
        let path = url_path(url);
        let params = match self.kind {
            TokenKind::SecureLinkMd5 => {
                let expires_text = expires.to_string();
                let client = client.map(|c| c.to_string()).unwrap_or_default();
                let mut md5 = md5::Md5::new();
                for part in &self.expression {
                    md5.update(match part {
                        Part::Text(t) => t.as_bytes(),
                        Part::Expires => expires_text.as_bytes(),
                        Part::Path => path.as_bytes(),
                        Part::Client => client.as_bytes(),
                        Part::Secret => &self.secret,
                    });
                }
                let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(md5.finalize());
                format!("{}={hash}&{}={expires}", self.hash_param, self.expires_param)
            }
            TokenKind::HmacSha256 => {
                let fields = format!("exp={expires}~acl={path}");
                let mac = hex::encode(ring::hmac::sign(&self.hmac_key, fields.as_bytes()).as_ref());
                let token = format!("{fields}~hmac={mac}");
                let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
                format!("{}={token}", self.token_param)
            }
        };
        let joiner = if url.contains('?') { '&' } else { '?' };
        format!("{url}{joiner}{params}")
    }

    pub(super) fn describe(&self) -> String {
        let kind = match self.kind {
            TokenKind::SecureLinkMd5 => "nginx secure_link_md5",
            TokenKind::HmacSha256 => "HMAC-SHA256 token",
        };
        format!("signed ({kind}, valid {} s)", self.ttl.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_split_into_parts() {
        assert_eq!(
            parse_expression("{expires}{path} {secret}"),
            vec![Part::Expires, Part::Path, Part::Text(" ".into()), Part::Secret]
        );
        assert_eq!(parse_expression("{client}-{x}é"), vec![Part::Client, Part::Text("-{x}é".into())]);
        assert_eq!(parse_expression(""), vec![]);
    }

    #[test]
    fn url_path_of_configured_urls() {
        assert_eq!(url_path("http://h:1/a/b?x=1"), "/a/b");
        assert_eq!(url_path("https://h"), "/");
        assert_eq!(url_path("https://h/p/blobs/sha256:00#f"), "/p/blobs/sha256:00");
    }

    #[test]
    fn secure_link_md5_matches_nginx() {
        // The value nginx computes for `secure_link_md5 "$secure_link_expires$uri secret"`:
        // base64url(md5("2147483647/p/blobs/x secret")), no padding.
        let signer = Signer::new(&tessera_config::UrlToken {
            kind: TokenKind::SecureLinkMd5,
            secret: Some("secret".into()),
            secret_file: None,
            ttl_secs: 2147483647 - 1000,
            expression: "{expires}{path} {secret}".into(),
            hash_param: "md5".into(),
            expires_param: "expires".into(),
            token_param: "__token__".into(),
        })
        .unwrap();
        let url = signer.sign("http://cdn/p/blobs/x", None, 1000);
        let expected =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(md5::Md5::digest(b"2147483647/p/blobs/x secret"));
        assert_eq!(url, format!("http://cdn/p/blobs/x?md5={expected}&expires=2147483647"));
    }

    #[test]
    fn hmac_token_is_akamai_shaped() {
        let signer = Signer::new(&tessera_config::UrlToken {
            kind: TokenKind::HmacSha256,
            secret: Some("00ff".into()),
            secret_file: None,
            ttl_secs: 60,
            expression: String::new(),
            hash_param: String::new(),
            expires_param: String::new(),
            token_param: "__token__".into(),
        })
        .unwrap();
        let url = signer.sign("https://cdn/a/b", None, 100);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0x00, 0xff]);
        let mac = hex::encode(ring::hmac::sign(&key, b"exp=160~acl=/a/b").as_ref());
        assert_eq!(url, format!("https://cdn/a/b?__token__=exp%3D160%7Eacl%3D%2Fa%2Fb%7Ehmac%3D{mac}"));
    }
}
