//! `[auth]`: who users are (htpasswd, groups, tokens, trusted issuers).

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file (bcrypt hashes: `htpasswd -B`) with the users who can log in.
    pub htpasswd: PathBuf,
    /// The realm named in Basic challenges; also the token `service` name.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Offer the Docker token flow (Bearer tokens from `/token`, Tessera as the issuer)
    /// instead of Basic challenges.
    #[serde(default)]
    pub token: bool,
    /// Lifetime of issued tokens, in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// PKCS#8 P-256 key signing tokens; created when missing. Default `<data>/token-key.p8`.
    #[serde(default)]
    pub token_key: Option<PathBuf>,
    /// The `iss` of tokens this registry issues.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Other issuers whose Bearer tokens are accepted (`[[auth.trusted_issuer]]`).
    #[serde(default)]
    pub trusted_issuer: Vec<TrustedIssuer>,
    /// Named groups of users (`[auth.groups]`, `team = ["alice", "bob"]`), named in
    /// `[[access]]` rules as `@team`.
    #[serde(default)]
    pub groups: std::collections::HashMap<String, Vec<String>>,
}

fn default_issuer() -> String {
    "tessera".into()
}

impl AuthConfig {
    /// Basic logins from `htpasswd`, everything else at its default.
    pub fn new(htpasswd: PathBuf) -> AuthConfig {
        AuthConfig {
            htpasswd,
            realm: default_realm(),
            token: false,
            token_ttl_secs: default_token_ttl(),
            token_key: None,
            issuer: default_issuer(),
            trusted_issuer: Vec::new(),
            groups: Default::default(),
        }
    }
}

/// An external token issuer: its tokens are verified against the keys of its JWKS (a file,
/// or a URL fetched while serving) and must name this `issuer` and `audience`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub audience: String,
    /// The JWKS document as a file, read at start-up.
    pub jwks_file: Option<PathBuf>,
    /// The JWKS document's URL (e.g. an OpenID provider's `jwks_uri`): fetched at start-up,
    /// every `jwks_refresh_secs`, and when a token names a key not yet known (at most every
    /// few seconds), so the issuer can rotate its keys.
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
}

fn default_jwks_refresh() -> u64 {
    3600
}

fn default_token_ttl() -> u64 {
    300
}

fn default_realm() -> String {
    "tessera".into()
}
