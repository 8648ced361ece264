//! Tessera's registry client and the transfer commands built on it.
//!
//! - [`upstream`]: a client for one registry as any registry client talks to it (TLS trust,
//!   credentials, the Docker token flow), used by federation for its upstreams and by the
//!   commands below.
//! - [`reference`]: image references (`NAME[:TAG|@DIGEST]`, `HOST/NAME...`), one grammar.
//! - [`layout`]: where blobs and indexes sit in an OCI image layout and in a published tree.
//! - [`source`]: reading an image from a layout, a `docker save` archive or a registry.
//! - [`push`], [`publish`], [`export`], [`import`]: the transfer commands.
//!
//! This crate knows no server: it depends on `tessera-spec` and `tessera-config` only.

pub mod archive;
pub mod copy;
pub mod error;
pub mod export;
pub mod import;
pub mod layout;
pub mod progress;
pub mod publish;
pub mod push;
pub mod reference;
pub mod source;
pub mod upstream;

use std::sync::Arc;

pub use copy::{CopyOptions, CopyReport, copy};
pub use error::ClientError;
pub use export::export;
pub use import::import;
pub use publish::{PublishTarget, Published, publish};
pub use push::{PushReport, push_metadata_only};
pub use reference::{ImageReference, ReferenceError, RegistryReference};
pub use source::{Source, SourceImage};
pub use upstream::{AuthError, BuildError, Upstream, UpstreamError};

/// A registry client for `host` (`http://` with `plain_http`), with optional `USER:PASS`
/// credentials, for the transfer commands (no upstream cache settings apply).
pub fn registry_client(host: &str, plain_http: bool, creds: Option<&str>) -> Result<Arc<Upstream>, ClientError> {
    let (username, password) = match creds.map(|c| c.split_once(':')) {
        Some(Some((u, p))) => (Some(u.to_string()), Some(p.to_string())),
        Some(None) => return Err(ClientError::CredentialsSyntax),
        None => (None, None),
    };
    let scheme = if plain_http { "http" } else { "https" };
    let config = tessera_config::Upstream {
        name: host.to_string(),
        url: format!("{scheme}://{host}"),
        authority: Vec::new(),
        username,
        password,
        ca_file: None,
        library_rule: Some(false),
        timeout_secs: 300,
        cache: Default::default(),
        lookaside: None,
    };
    let upstream = Upstream::new(&config).map_err(|source| ClientError::Client { target: host.to_string(), source })?;
    Ok(Arc::new(upstream))
}
