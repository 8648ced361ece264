//! Simple signatures ("atomic" container signatures, what `skopeo copy --sign-by` and
//! `podman push --sign-by` make): stored per repository and manifest digest, as the
//! signature extension API (`/extensions/v2/<name>/signatures/<digest>`, OpenShift's) and
//! the lookaside layout (`<name>@sha256=<hex>/signature-N`) hand them out. Tessera keeps
//! them as sent: clients verify them against their own `policy.json`.

use bytes::Bytes;
use tessera_spec::{Digest, ErrorCode, OciError, RepoName};
use tessera_store::StoreError;

use crate::{Registry, store_failure};

/// The largest signature kept (an OpenPGP signature of the small signed payload is well
/// under a kilobyte).
pub const SIGNATURE_MAX_BYTES: usize = 64 * 1024;
/// The most signatures one manifest of one repository may have.
pub const SIGNATURES_PER_MANIFEST: usize = 64;

/// One stored signature: its name (`<digest>@<unique part>`) and content.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub name: String,
    pub content: Bytes,
}

fn invalid(why: impl Into<String>) -> OciError {
    OciError::new(ErrorCode::SignatureInvalid, why)
}

/// Whether `content` named `name` can be kept as a signature of `digest`: its name is
/// `<digest>@<unique part>`, and its size within [`SIGNATURE_MAX_BYTES`].
pub fn check(digest: &Digest, name: &str, content: &[u8]) -> Result<(), OciError> {
    let unique = name
        .strip_prefix(&format!("{digest}@"))
        .ok_or_else(|| invalid(format!("a signature's name is {digest}@<unique part>")))?;
    if unique.is_empty()
        || unique.len() > 128
        || !unique.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid("the unique part of a signature's name is 1 to 128 letters, digits, '-', '_' and '.'"));
    }
    if content.is_empty() || content.len() > SIGNATURE_MAX_BYTES {
        return Err(invalid(format!("a signature is 1 to {SIGNATURE_MAX_BYTES} bytes")));
    }
    Ok(())
}

impl Registry {
    /// The signatures of the manifest `digest` in `repo`, in the order they were added.
    pub async fn signatures(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Signature>, OciError> {
        let found = self.meta.signatures(repo, digest).await.map_err(|e| store_failure("signatures", e))?;
        Ok(found.into_iter().map(|(name, content)| Signature { name, content }).collect())
    }

    /// The indexes in `repo` that list the manifest `digest` (at most `limit`): a
    /// platform manifest is vouched for by its index's signatures.
    pub async fn parents(&self, repo: &RepoName, digest: &Digest, limit: usize) -> Result<Vec<Digest>, OciError> {
        self.meta.parents(repo, digest, limit).await.map_err(|e| store_failure("parents", e))
    }

    /// Keeps a signature of the manifest `digest` in `repo`; `false` when it was kept
    /// already. The manifest need not be here: a registry may keep the signatures of images
    /// it does not hold (as a lookaside server for another).
    pub async fn add_signature(
        &self,
        repo: &RepoName,
        digest: &Digest,
        name: &str,
        content: &[u8],
    ) -> Result<bool, OciError> {
        check(digest, name, content)?;
        let kept = self.signatures(repo, digest).await?;
        if kept.iter().any(|s| s.name == name && s.content == content) {
            return Ok(false);
        }
        if kept.len() >= SIGNATURES_PER_MANIFEST {
            return Err(OciError::new(
                ErrorCode::Denied,
                format!("{repo}@{digest} has {SIGNATURES_PER_MANIFEST} signatures, the most it may have"),
            ));
        }
        self.meta.add_signature(repo, digest, name, content).await.map_err(|e| match e {
            StoreError::Contradicts(why) => invalid(why),
            e => store_failure("signature", e),
        })
    }
}
