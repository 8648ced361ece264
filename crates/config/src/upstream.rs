//! `[[upstream]]`: other registries this one pulls through or redirects to.

use serde::Deserialize;
use std::path::PathBuf;

/// Another registry, reached over HTTP(S).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Name used by routes (`to = "name"` or `to = "name:path"`).
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io`. `http://` only when written so.
    pub url: String,
    /// Registry names this upstream answers for: a request with `?ns=` equal to one of them
    /// (containerd's mirror parameter) is routed here when no route matched first.
    #[serde(default)]
    pub authority: Vec<String>,
    /// Credentials for the upstream (HTTP basic, or for its token service).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Extra PEM CA bundle trusted for this upstream, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Docker Hub's rule: a one-component name `x` means `library/x`. Defaults to on when
    /// `authority` includes `docker.io`.
    pub library_rule: Option<bool>,
    /// Seconds an upstream request may take before it counts as failed.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub cache: UpstreamCache,
    /// Base URL of the server holding this upstream's simple signatures in the lookaside
    /// layout (`<lookaside>/<name>@sha256=<hex>/signature-N`, as `registries.d` configures
    /// it), for upstreams without the signature extension.
    pub lookaside: Option<String>,
}

fn default_upstream_timeout() -> u64 {
    30
}

/// How manifests fetched from an upstream are cached.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamCache {
    /// Seconds a manifest fetched by tag is served without asking the upstream again; after
    /// that it is revalidated with a HEAD (which does not count against Docker Hub's limit).
    pub tag_ttl_secs: u64,
    /// Serve the cached copy when the upstream is down, times out, or answers 5xx or 429.
    pub serve_stale: bool,
    /// The oldest validation a stale answer may rest on, in seconds.
    pub max_stale_secs: u64,
    /// Seconds a "not found" from the upstream is remembered.
    pub negative_ttl_secs: u64,
    /// Bytes of blobs kept for this upstream; least recently used blobs are evicted past
    /// it. 0: no bound.
    pub max_bytes: u64,
}

impl Default for UpstreamCache {
    fn default() -> Self {
        UpstreamCache {
            tag_ttl_secs: 300,
            serve_stale: true,
            max_stale_secs: 7 * 24 * 3600,
            negative_ttl_secs: 30,
            max_bytes: 0,
        }
    }
}
