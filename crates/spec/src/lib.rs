//! The vocabulary of the OCI Distribution and Image specs, with no I/O: repository names,
//! tags, digests, byte ranges, manifest parsing and the one error table every response uses.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod name;
pub mod range;
pub mod request;

pub use digest::{Algorithm, Digest, Digester};
pub use error::{ErrorCode, OciError};
pub use manifest::{Descriptor, ManifestKind, ParsedManifest};
pub use name::{Reference, RepoName, Tag};
pub use range::{ByteRange, RangeRequest};
pub use request::{Accept, Paging};
