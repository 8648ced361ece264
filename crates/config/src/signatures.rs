//! `[[signatures]]`: which keys vouch for the images under a name prefix, and whether
//! pulls of images they did not sign are refused.

use std::path::PathBuf;

use serde::Deserialize;

/// How a signature's claimed reference must match the name an image is pulled by.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignatureIdentity {
    /// The repository, and the tag when pulled by tag.
    #[default]
    Exact,
    /// The repository, any tag.
    Repository,
    /// Any name: only the manifest digest must match.
    Any,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignaturePolicy {
    /// A name prefix, by whole components, as clients name repositories (`""`, the
    /// default: every name).
    #[serde(default)]
    pub prefix: String,
    /// An `[[upstream]]`: the rule covers what that upstream serves (through its cache or
    /// a redirect), whichever route, virtual host or `ns` reaches it.
    pub upstream: Option<String>,
    /// Files of trusted public keys: OpenPGP certificates (armored or binary) and PEM
    /// public keys (cosign's ECDSA P-256).
    pub keys: Vec<PathBuf>,
    /// Refuse manifests no trusted key signed (`false`: verify, log and count only).
    #[serde(default = "yes")]
    pub require: bool,
    #[serde(default)]
    pub identity: SignatureIdentity,
    /// The prefix signatures name these repositories under, when they are copies kept
    /// under another name (promoted, synced, imported under a prefix): `prefix/rest` is
    /// also compared as `signed_prefix/rest` (c/image's `remapIdentity`). `""`: the rest
    /// alone.
    pub signed_prefix: Option<String>,
}

fn yes() -> bool {
    true
}

impl SignaturePolicy {
    pub(crate) fn check(&self, upstreams: &[crate::Upstream]) -> Result<(), String> {
        let prefix = self.prefix.trim_matches('/');
        if self.keys.is_empty() {
            return Err(format!("[[signatures]] {prefix:?}: no keys"));
        }
        if let Some(u) = &self.upstream
            && !upstreams.iter().any(|known| &known.name == u)
        {
            return Err(format!("[[signatures]] {prefix:?}: no [[upstream]] named {u:?}"));
        }
        Ok(())
    }

    /// The prefix without slashes at either end.
    pub fn prefix(&self) -> &str {
        self.prefix.trim_matches('/')
    }
}
