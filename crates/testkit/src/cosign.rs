//! Signs like cosign (whose signing Debian's skopeo and podman leave out): an ECDSA P-256
//! key, and the signature manifest it makes for an image, one layer holding the signed
//! simple-signing payload with its signature in an annotation.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::Bytes;
use p256::ecdsa::signature::Signer as _;
use tessera_spec::Digest;

use crate::Api;

pub const ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

pub struct CosignKey {
    key: p256::ecdsa::SigningKey,
}

/// What a signature is pushed as: the two blobs, then the manifest.
pub struct SignatureManifest {
    pub payload: Bytes,
    pub config: Bytes,
    pub manifest: Bytes,
}

impl SignatureManifest {
    pub fn blobs(&self) -> [&Bytes; 2] {
        [&self.config, &self.payload]
    }

    pub fn digest(&self) -> Digest {
        Digest::sha256_of(&self.manifest)
    }
}

impl CosignKey {
    /// A key derived from `seed` (any text; distinct seeds, distinct keys).
    pub fn new(seed: &str) -> CosignKey {
        let scalar = Digest::sha256_of(seed.as_bytes());
        let bytes: Vec<u8> =
            (0..32).map(|i| u8::from_str_radix(&scalar.hex()[2 * i..2 * i + 2], 16).expect("hex")).collect();
        CosignKey { key: p256::ecdsa::SigningKey::from_slice(&bytes).expect("a P-256 scalar") }
    }

    /// Writes the public key as PEM (what `cosign generate-key-pair` writes as cosign.pub).
    pub fn write_public(&self, dir: &Path, name: &str) -> PathBuf {
        let pem =
            p256::pkcs8::EncodePublicKey::to_public_key_pem(self.key.verifying_key(), p256::pkcs8::LineEnding::LF)
                .expect("pem");
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, pem).expect("write the public key");
        path
    }

    /// The signature of the manifest `digest` claimed as `reference`; as an OCI referrer
    /// of it (`artifactType` and `subject`) when `as_referrer`, else for the `.sig` tag.
    pub fn sign(&self, digest: &Digest, reference: &str, as_referrer: bool) -> SignatureManifest {
        let payload = serde_json::json!({
            "critical": {
                "identity": { "docker-reference": reference },
                "image": { "docker-manifest-digest": digest.to_string() },
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string();
        let signature: p256::ecdsa::Signature = self.key.sign(payload.as_bytes());
        let annotation = base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes());
        let payload_digest = Digest::sha256_of(payload.as_bytes());
        let config = serde_json::json!({
            "architecture": "", "os": "", "config": {},
            "rootfs": { "type": "layers", "diff_ids": [payload_digest.to_string()] },
        })
        .to_string();
        let mut manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": config.len(),
                "digest": Digest::sha256_of(config.as_bytes()).to_string(),
            },
            "layers": [{
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "size": payload.len(),
                "digest": payload_digest.to_string(),
                "annotations": { "dev.cosignproject.cosign/signature": annotation },
            }],
        });
        if as_referrer {
            manifest["artifactType"] = ARTIFACT_TYPE.into();
            manifest["subject"] = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest.to_string(), "size": 0,
            });
        }
        SignatureManifest {
            payload: Bytes::from(payload),
            config: Bytes::from(config),
            manifest: Bytes::from(manifest.to_string()),
        }
    }

    /// Pushes the signature of `digest`, claimed as `reference`, into `name` at `api`:
    /// under the `.sig` tag, or as a referrer of the image when `as_referrer`.
    pub async fn push_signature(&self, api: &Api, name: &str, digest: &Digest, reference: &str, as_referrer: bool) {
        let signed = self.sign(digest, reference, as_referrer);
        for blob in signed.blobs() {
            api.push_blob(name, blob).await.expect("signature blob pushed");
        }
        let at = if as_referrer { signed.digest().to_string() } else { signature_tag(digest) };
        let r = api.push_manifest(name, &at, "application/vnd.oci.image.manifest.v1+json", &signed.manifest).await;
        assert_eq!(r.expect("signature manifest pushed").status(), 201, "signature manifest pushed");
    }
}

/// The tag cosign keeps the signatures of `digest` under.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}
