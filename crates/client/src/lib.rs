//! Tessera's registry client and the transfer commands built on it: talking to a registry
//! as a client does (TLS trust, credentials, the Docker token flow).
//!
//! This crate knows no server: it depends on `tessera-spec` and `tessera-config` only, so
//! the federation layer (which asks upstream registries) and the command line (which
//! pushes, publishes, exports and imports) share one client.

pub mod error;
pub mod upstream;

pub use upstream::{AuthError, BuildError, Upstream, UpstreamError};
