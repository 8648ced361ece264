//! Errors of the client crate, and how to put one in words where only a string fits.

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;

use reqwest::StatusCode;
use tessera_spec::{Digest, OciError};

use crate::reference::ReferenceError;
use crate::upstream::{BuildError, UpstreamError};

/// Why a transfer (push, publish, export, import) or reading its source failed. Messages
/// are for the person at the terminal; causes are the error's `source()` chain.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?}: a source is oci:DIR[:TAG], docker-archive:FILE or docker://HOST/NAME[:TAG]")]
    SourceSyntax(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("credentials are USER:PASSWORD")]
    CredentialsSyntax,
    #[error("client for {target}")]
    Client {
        target: String,
        #[source]
        source: BuildError,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),

    // Reading a source.
    #[error("cannot open {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a readable tar archive", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has an entry outside the archive: {entry:?}", .path.display())]
    ArchiveEscape { path: PathBuf, entry: Option<PathBuf> },
    #[error("the archive has neither index.json nor manifest.json")]
    NotAnArchive(#[source] std::io::Error),
    #[error("the archive's manifest.json is not what docker save writes")]
    ArchiveListing(#[source] serde_json::Error),
    #[error("the archive's manifest.json lists no image")]
    ArchiveEmpty,
    #[error("manifest.json has no Config")]
    ArchiveNoConfig,
    #[error("the archive names a path outside itself: {0:?}")]
    ArchivePath(String),
    #[error("the archive lacks {0} as a regular file (links are not followed)")]
    ArchiveNotAFile(String),
    #[error("the archive lacks {name}")]
    ArchiveLacks {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an OCI image layout", .dir.display())]
    NotALayout {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the index.json of {} is not an image index", .dir.display())]
    BadIndex {
        dir: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("index.json of {} names an invalid digest", .dir.display())]
    IndexDigest { dir: PathBuf },
    #[error("{} has no image tagged {tag:?}", .dir.display())]
    NoSuchTag { dir: PathBuf, tag: String },
    #[error("{} lists no image", .dir.display())]
    EmptyLayout { dir: PathBuf },
    #[error("{} names no image (no org.opencontainers.image.ref.name annotations)", .path.display())]
    NothingNamed { path: PathBuf },
    #[error("{digest} is not in {place}")]
    MissingBlob {
        digest: Digest,
        place: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no {0}")]
    UnknownBlob(Digest),
    #[error("{} does not match its digest", .0.display())]
    Corrupt(PathBuf),
    #[error("{0}: the source's bytes do not match the digest")]
    SourceMismatch(Digest),
    /// A manifest that does not parse, or that the registry cannot serve.
    #[error("{what}: {}", .error.message)]
    Manifest { what: String, error: OciError },
    /// `what` is who answered: `HOST/NAME:TAG: the registry`, `DIGEST: the source registry`.
    #[error("{what} answered {status}")]
    Status { what: String, status: StatusCode },
    #[error("{what}: not served correctly (status {status})")]
    NotServedCorrectly { what: String, status: StatusCode },
    #[error("{what}: no manifest")]
    NoManifest { what: String },

    // Writing to a registry.
    /// The registry refused: its status and its error body.
    #[error("{what}: {status} {body}")]
    Refused { what: String, status: StatusCode, body: String },
    #[error("upload of {0}: the registry did not open a session")]
    NoSession(Digest),
    #[error("upload of {0}: unexpected answer")]
    UnexpectedAnswer(Digest),
    #[error("the registry sent no upload Location")]
    NoLocation,
    #[error("the registry sent the upload elsewhere ({0}); not followed")]
    ForeignLocation(String),
    #[error("{} does not match its digest {digest}; nothing of this image is tagged", .path.display())]
    CorruptUpload { path: PathBuf, digest: Digest },

    // Writing to a published tree.
    #[error("an s3:// destination needs --s3-endpoint URL")]
    S3NoEndpoint,
    #[error("--s3-endpoint {endpoint}")]
    S3Endpoint {
        endpoint: String,
        #[source]
        source: url::ParseError,
    },
    #[error("bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: rusty_s3::BucketError,
    },
    #[error("{method} {key}")]
    S3Request {
        method: &'static str,
        key: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("PUT {key}: the store answered {status}: {body}")]
    S3Refused { key: String, status: StatusCode, body: String },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// An error and its causes in one line, `a: b: c`, for logs and string errors that cannot
/// carry a `source()`.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
