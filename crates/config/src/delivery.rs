//! `[[delivery]]`: how blob bytes reach clients, per name prefix.

use serde::Deserialize;
use std::path::PathBuf;

use crate::{Network, is_http_url};

/// One `[[delivery]]` rule: how blobs of repositories under `prefix` are delivered.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Repository-name prefix, matched by whole components; empty matches every name.
    pub prefix: String,
    pub deliver: Deliver,
    /// `deliver = "cdn"`: base URL blobs are redirected to.
    pub cdn: Option<String>,
    /// Path of a blob under a CDN or mirror base URL: `{digest}` (`sha256:ab..`),
    /// `{algorithm}`, `{hex}`, `{hex2}` (first two hex digits), `{name}`. Pulp's layout
    /// `blobs/{digest}` by default.
    pub layout: Option<String>,
    /// An expiring signature added to the redirect URL (`[delivery.token]`).
    pub token: Option<UrlToken>,
    /// Literal text replacements applied to the redirect URL, in order.
    pub rewrite: Vec<Rewrite>,
    /// `deliver = "mirrors"`: the mirrors (`[[delivery.mirror]]`).
    #[serde(rename = "mirror")]
    pub mirrors: Vec<Mirror>,
    /// Seconds between health checks of each mirror.
    pub health_interval_secs: Option<u64>,
    /// A blob every mirror holds, asked for with `HEAD` by the health check; without it the
    /// check asks for the mirror's base URL and takes any answer below 500 as healthy.
    pub health_blob: Option<String>,
    /// URLs a layer stored elsewhere (descriptor `urls`, metadata-only push) may be
    /// redirected to: `scheme://host[:port]/path-prefix`, a host may start with `*.`.
    /// Nothing is allowed by default.
    pub external_allow: Vec<String>,
    /// URLs never redirected to, even when `external_allow` matches.
    pub external_deny: Vec<String>,
    /// `deliver = "presigned"`: seconds each presigned URL stays valid (default 600).
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// This server sends the bytes.
    #[default]
    Stream,
    /// A 307 to the blob's path under `cdn`.
    Cdn,
    /// A 307 to the nearest healthy mirror for the client's address; with none, the next
    /// matching rule decides.
    Mirrors,
    /// A 307 to a presigned, expiring URL of the blob in the S3-compatible blob store
    /// (needs `[storage.s3]`), so the bytes never pass through Tessera.
    Presigned,
}

/// An expiring signature on redirect URLs, checkable by the CDN without asking us.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UrlToken {
    pub kind: TokenKind,
    /// The shared secret (`secure_link_md5`: text; `hmac_sha256`: hex, as Akamai issues it).
    pub secret: Option<String>,
    /// File holding the secret instead (trailing newline ignored).
    pub secret_file: Option<PathBuf>,
    /// Seconds a signed URL stays valid.
    #[serde(default = "default_token_ttl_secs")]
    pub ttl_secs: u64,
    /// `secure_link_md5`: the text hashed, as in nginx's `secure_link_md5` directive, with
    /// `{expires}`, `{path}`, `{client}` (the client's address) and `{secret}`.
    #[serde(default = "default_secure_link_expression")]
    pub expression: String,
    /// `secure_link_md5`: query parameters carrying the hash and the expiry time.
    #[serde(default = "default_hash_param")]
    pub hash_param: String,
    #[serde(default = "default_expires_param")]
    pub expires_param: String,
    /// `hmac_sha256`: the query parameter carrying the token (Akamai's `__token__`).
    #[serde(default = "default_token_param")]
    pub token_param: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// nginx `secure_link` + `secure_link_md5`: `?md5=<base64url md5>&expires=<unix time>`.
    SecureLinkMd5,
    /// Akamai-style token auth: `?__token__=exp=..~acl=..~hmac=<hex HMAC-SHA256>`.
    HmacSha256,
}

fn default_token_ttl_secs() -> u64 {
    600
}
fn default_secure_link_expression() -> String {
    "{expires}{path} {secret}".into()
}
fn default_hash_param() -> String {
    "md5".into()
}
fn default_expires_param() -> String {
    "expires".into()
}
fn default_token_param() -> String {
    "__token__".into()
}

/// Replaces the first occurrence of `match` in a redirect URL with `replace`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(rename = "match")]
    pub find: String,
    pub replace: String,
}

/// A mirror of the blobs: a base URL and the client networks it serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub url: String,
    /// Client networks (CIDRs) this mirror serves; empty: every client.
    #[serde(default)]
    pub networks: Vec<Network>,
    /// Lower is preferred among the healthy mirrors serving a client.
    #[serde(default = "default_mirror_priority")]
    pub priority: u32,
}

fn default_mirror_priority() -> u32 {
    100
}

impl Delivery {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self.deliver {
            Deliver::Stream => {}
            Deliver::Cdn => match &self.cdn {
                Some(base) if is_http_url(base) => {}
                _ => return Err("deliver = \"cdn\" needs cdn = \"https://...\"".into()),
            },
            Deliver::Mirrors => {
                if self.mirrors.is_empty() {
                    return Err("deliver = \"mirrors\" needs at least one [[delivery.mirror]]".into());
                }
                for m in &self.mirrors {
                    if !is_http_url(&m.url) {
                        return Err(format!("mirror url {:?} must start with https:// or http://", m.url));
                    }
                }
            }
            Deliver::Presigned => {
                if self.token.is_some() || !self.rewrite.is_empty() {
                    return Err(
                        "deliver = \"presigned\" URLs carry the store's own signature: no token or rewrite".into()
                    );
                }
                if self.ttl_secs == Some(0) || self.ttl_secs.is_some_and(|t| t > 7 * 24 * 3600) {
                    return Err("ttl_secs of a presigned URL must be between 1 and 604800 (7 days, S3's limit)".into());
                }
            }
        }
        if self.ttl_secs.is_some() && self.deliver != Deliver::Presigned {
            return Err("ttl_secs is set but deliver is not \"presigned\"".into());
        }
        if self.cdn.is_some() && self.deliver != Deliver::Cdn {
            return Err("cdn is set but deliver is not \"cdn\"".into());
        }
        if !self.mirrors.is_empty() && self.deliver != Deliver::Mirrors {
            return Err("[[delivery.mirror]] given but deliver is not \"mirrors\"".into());
        }
        if let Some(t) = &self.token
            && t.secret.is_some() == t.secret_file.is_some()
        {
            return Err("token needs exactly one of secret and secret_file".into());
        }
        if self.rewrite.iter().any(|r| r.find.is_empty()) {
            return Err("a rewrite's match must not be empty".into());
        }
        Ok(())
    }
}
