//! Signature verification: whether a trusted key signed a claim that a manifest digest is
//! the image named by a reference. Two families carry the same claim (the "simple
//! signing" payload: `critical.image.docker-manifest-digest` and
//! `critical.identity.docker-reference`):
//!
//! - simple signatures, OpenPGP messages wrapping the payload (`skopeo copy --sign-by`,
//!   `podman push --sign-by`), checked against armored or binary OpenPGP public keys;
//! - cosign signatures, the payload as a layer of a `sha256-<hex>.sig` manifest (or an OCI
//!   referrer) with its ECDSA P-256 signature in the `dev.cosignproject.cosign/signature`
//!   annotation, checked against PEM public keys.
//!
//! Pure computation: the caller finds the signatures and decides what a result means.

mod identity;
mod keys;

pub use identity::{Identity, Reference};
pub use keys::Keyring;

use tessera_spec::Digest;

/// The annotation of a cosign signature layer holding its base64 signature.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The media type of a cosign signature layer (the simple-signing payload).
pub const COSIGN_PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The artifact type of cosign signatures stored as OCI 1.1 referrers.
pub const COSIGN_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The largest signed payload read (a real one is a few hundred bytes).
pub const PAYLOAD_MAX_BYTES: usize = 64 * 1024;

/// The tag cosign keeps the signatures of `digest` under.
pub fn cosign_tag(digest: &Digest) -> String {
    format!("{}-{}.sig", digest.algorithm().as_str(), digest.hex())
}

/// Whether `tag` is one cosign keeps signatures under (`<algorithm>-<hex>.sig`).
pub fn is_cosign_tag(tag: &str) -> bool {
    let Some(rest) = tag.strip_suffix(".sig") else { return false };
    let Some((algorithm, hex)) = rest.split_once('-') else { return false };
    matches!(algorithm, "sha256" | "sha512")
        && hex.len() >= 64
        && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Which family a signature belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Simple,
    Cosign,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Simple => "simple signing (OpenPGP)",
            Family::Cosign => "cosign",
        })
    }
}

/// What a signature's payload claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub manifest_digest: Digest,
    /// The `docker-reference` the signer named; absent: none was named (cosign may omit it).
    pub reference: Option<Reference>,
}

/// A signature a trusted key made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub family: Family,
    /// The key, as `OpenPGP <fingerprint> (<user id>)` or `cosign <key id>`.
    pub signer: String,
    pub claim: Claim,
    /// When the signer's key expires, if it does: the signature vouches until then.
    pub key_expires: Option<std::time::SystemTime>,
}

/// The claim in a simple-signing payload of `family` (its `critical.type` must be the one
/// the family's tools write).
fn parse_claim(payload: &[u8], family: Family) -> Result<Claim, String> {
    #[derive(serde::Deserialize)]
    struct Payload {
        critical: Critical,
    }
    #[derive(serde::Deserialize)]
    struct Critical {
        #[serde(rename = "type")]
        kind: String,
        image: Image,
        identity: Option<IdentityField>,
    }
    #[derive(serde::Deserialize)]
    struct Image {
        #[serde(rename = "docker-manifest-digest")]
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct IdentityField {
        #[serde(rename = "docker-reference")]
        reference: Option<String>,
    }
    let parsed: Payload = serde_json::from_slice(payload)
        .map_err(|e| format!("the signed payload is not a simple-signing claim: {e}"))?;
    let expected_type = match family {
        Family::Simple => "atomic container signature",
        Family::Cosign => "cosign container image signature",
    };
    if !parsed.critical.kind.eq_ignore_ascii_case(expected_type) {
        return Err(format!("the signed payload's type is {:?}, not {expected_type:?}", parsed.critical.kind));
    }
    let manifest_digest = parsed
        .critical
        .image
        .digest
        .parse()
        .map_err(|_| format!("the signed manifest digest {:?} is not a digest", parsed.critical.image.digest))?;
    let reference = match parsed.critical.identity.and_then(|i| i.reference) {
        Some(r) => {
            Some(Reference::parse(&r).ok_or_else(|| format!("the signed reference {r:?} is not an image name"))?)
        }
        None if family == Family::Simple => return Err("the signed payload names no docker-reference".into()),
        None => None,
    };
    Ok(Claim { manifest_digest, reference })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosign_tags_are_an_algorithm_and_a_digest() {
        let digest: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert!(is_cosign_tag(&cosign_tag(&digest)));
        for not in [
            "v1",
            "sha256-abc.sig",
            &format!("sha256-{}.att", "ab".repeat(32)),
            &format!("md5-{}.sig", "ab".repeat(32)),
        ] {
            assert!(!is_cosign_tag(not), "{not}");
        }
    }

    #[test]
    fn claims_are_read_only_from_their_own_family_s_payloads() {
        let payload = br#"{"critical":{"type":"atomic container signature","image":{"docker-manifest-digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"identity":{"docker-reference":"example.com/a/b:1"}},"optional":{}}"#;
        let claim = parse_claim(payload, Family::Simple).unwrap();
        assert_eq!(claim.reference.unwrap().to_string(), "example.com/a/b:1");
        assert!(parse_claim(payload, Family::Cosign).unwrap_err().contains("not \"cosign container image signature\""));
        let no_reference = br#"{"critical":{"type":"atomic container signature","image":{"docker-manifest-digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"identity":{}}}"#;
        assert!(parse_claim(no_reference, Family::Simple).is_err());
        assert!(parse_claim(b"not json", Family::Simple).is_err());
    }
}
