//! Trusted public keys, and the checks each family's signatures get against them.

use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use pgp::composed::{Deserializable as _, Message, SignedPublicKey, SignedPublicSubKey};
use pgp::packet::{Signature, SignatureType};
use pgp::types::{KeyDetails as _, Timestamp};
use sha2::Digest as _;

use crate::{Family, PAYLOAD_MAX_BYTES, Verified, parse_claim};

struct OpenPgpKey {
    cert: SignedPublicKey,
    /// Upper-case hex, as gpg prints it.
    fingerprint: String,
    user: Option<String>,
}

struct CosignKey {
    key: p256::ecdsa::VerifyingKey,
    /// `sha256:` and the first 16 hex digits of the key's SubjectPublicKeyInfo digest.
    id: String,
}

/// The public keys one policy trusts.
#[derive(Default)]
pub struct Keyring {
    openpgp: Vec<OpenPgpKey>,
    cosign: Vec<CosignKey>,
    /// Every file's bytes as added, hashed: what the keys are, to their last signature.
    material: sha2::Sha256,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

impl Keyring {
    /// Adds the keys in the file at `path`: OpenPGP certificates (armored, or binary as
    /// `gpg --export` writes them; several in one file are all trusted) or a PEM public key
    /// (`-----BEGIN PUBLIC KEY-----`, cosign's ECDSA P-256).
    pub fn add_file(&mut self, path: &Path) -> Result<(), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.add(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Adds the keys in `bytes` (as [`Keyring::add_file`] reads them).
    pub fn add(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.material.update((bytes.len() as u64).to_be_bytes());
        self.material.update(bytes);
        let text = std::str::from_utf8(bytes).ok();
        if let Some(pem) = text.filter(|t| t.contains("-----BEGIN PUBLIC KEY-----")) {
            let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim())
                .map_err(|e| format!("not an ECDSA P-256 public key (the kind cosign makes): {e}"))?;
            let spki = key.to_public_key_der().map_err(|e| format!("cannot encode the key: {e}"))?;
            let id = format!("sha256:{}", &hex::encode(sha2::Sha256::digest(spki.as_bytes()))[..16]);
            self.cosign.push(CosignKey { key, id });
            return Ok(());
        }
        let certs: Vec<SignedPublicKey> = if text.is_some_and(|t| t.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----")) {
            let (certs, _) = SignedPublicKey::from_armor_many(bytes).map_err(|e| format!("not OpenPGP keys: {e}"))?;
            certs.collect::<Result<_, _>>().map_err(|e| format!("not OpenPGP keys: {e}"))?
        } else {
            SignedPublicKey::from_bytes_many(bytes)
                .and_then(|certs| certs.collect::<Result<_, _>>())
                .map_err(|e| format!("neither OpenPGP keys nor a PEM public key: {e}"))?
        };
        if certs.is_empty() {
            return Err("holds no key".into());
        }
        for cert in certs {
            // A subkey whose binding does not verify must not vouch for its primary key.
            cert.verify_bindings().map_err(|e| format!("an OpenPGP key's self-signatures do not verify: {e}"))?;
            if !cert.details.revocation_signatures.is_empty() {
                return Err("an OpenPGP key in it is revoked".into());
            }
            let fingerprint = hex::encode_upper(cert.primary_key.fingerprint().as_bytes());
            let user = cert.details.users.first().map(|u| String::from_utf8_lossy(u.id.id()).into_owned());
            self.openpgp.push(OpenPgpKey { cert, fingerprint, user });
        }
        Ok(())
    }

    /// A digest of the keys as given (hex): it changes with any change to them, a new
    /// revocation or binding included.
    pub fn digest(&self) -> String {
        hex::encode(self.material.clone().finalize())
    }

    pub fn is_empty(&self) -> bool {
        self.openpgp.is_empty() && self.cosign.is_empty()
    }

    /// Each key in a line, as signers are named.
    pub fn describe(&self) -> Vec<String> {
        self.openpgp.iter().map(openpgp_signer).chain(self.cosign.iter().map(|k| format!("cosign {}", k.id))).collect()
    }

    /// The claim of a simple signature (an OpenPGP message wrapping the payload), if one
    /// of the keys (a primary key or one of its signing subkeys, not revoked) made it and
    /// has not expired: as gpg judges a signature valid, an expired key vouches for nothing,
    /// whenever it signed.
    pub fn verify_simple(&self, signature: &[u8]) -> Result<Verified, String> {
        let message = Message::from_bytes(signature)
            .and_then(Message::decompress)
            .map_err(|e| format!("not an OpenPGP signed message: {e}"))?;
        let mut message = message;
        let mut payload = Vec::new();
        // A compressed message can expand far beyond what was stored: read no more than a
        // payload can be.
        (&mut message)
            .take(PAYLOAD_MAX_BYTES as u64 + 1)
            .read_to_end(&mut payload)
            .map_err(|e| format!("not an OpenPGP signed message: {e}"))?;
        if payload.len() > PAYLOAD_MAX_BYTES {
            return Err("the signed payload is too large".into());
        }
        // The signature is checked only once the whole message was read.
        std::io::copy(&mut message, &mut std::io::sink()).map_err(|e| format!("not an OpenPGP signed message: {e}"))?;
        let (signer, expires) = self
            .openpgp
            .iter()
            .find_map(|k| {
                if message.verify(&k.cert.primary_key).is_ok() {
                    return Some((k, primary_expires(&k.cert)));
                }
                k.cert
                    .public_subkeys
                    .iter()
                    .filter(|sub| signs(sub))
                    .find(|sub| message.verify(&sub.key).is_ok())
                    // A subkey lives no longer than its primary key.
                    .map(|sub| (k, subkey_expires(sub).into_iter().chain(primary_expires(&k.cert)).min()))
            })
            .ok_or_else(|| "no trusted key made it".to_string())?;
        if let Some(expired) = expires.filter(|at| *at <= std::time::SystemTime::now()) {
            return Err(format!(
                "made by {}, whose key expired on {}",
                openpgp_signer(signer),
                httpdate::fmt_http_date(expired)
            ));
        }
        let claim = parse_claim(&payload, Family::Simple)?;
        Ok(Verified { family: Family::Simple, signer: openpgp_signer(signer), claim, key_expires: expires })
    }

    /// The claim of a cosign signature: `payload` (the layer's bytes) and `signature` (its
    /// annotation, base64 of a DER ECDSA signature over the payload's SHA-256), if one of
    /// the keys made it.
    pub fn verify_cosign(&self, payload: &[u8], signature: &str) -> Result<Verified, String> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| "its signature annotation is not base64".to_string())?;
        let signature = p256::ecdsa::Signature::from_der(&der)
            .map_err(|_| "its signature annotation is not a DER ECDSA signature".to_string())?;
        let signer = self
            .cosign
            .iter()
            .find(|k| k.key.verify(payload, &signature).is_ok())
            .ok_or_else(|| "no trusted key made it".to_string())?;
        let claim = parse_claim(payload, Family::Cosign)?;
        // A cosign public key carries no expiry of its own.
        Ok(Verified { family: Family::Cosign, signer: format!("cosign {}", signer.id), claim, key_expires: None })
    }
}

/// Whether a subkey may sign for its primary key: its binding gives it the signing flag,
/// and the primary key has not revoked it.
fn signs(subkey: &SignedPublicSubKey) -> bool {
    let revoked = subkey.signatures.iter().any(|s| s.typ() == Some(SignatureType::SubkeyRevocation));
    !revoked && subkey.signatures.iter().any(|binding| binding.key_flags().sign())
}

/// When a primary key expires, as its newest self-signature (direct, or on a user id) says.
fn primary_expires(cert: &SignedPublicKey) -> Option<std::time::SystemTime> {
    let self_signatures =
        cert.details.direct_signatures.iter().chain(cert.details.users.iter().flat_map(|u| &u.signatures));
    expires(cert.primary_key.created_at(), self_signatures)
}

/// When a subkey expires, as its newest binding says.
fn subkey_expires(subkey: &SignedPublicSubKey) -> Option<std::time::SystemTime> {
    let bindings = subkey.signatures.iter().filter(|s| s.typ() == Some(SignatureType::SubkeyBinding));
    expires(subkey.key.created_at(), bindings)
}

/// When a key made at `created` expires by the newest of `signatures` (a key expiration
/// time counts from the key's creation; none, or zero, is never).
fn expires<'a>(created: Timestamp, signatures: impl Iterator<Item = &'a Signature>) -> Option<std::time::SystemTime> {
    let newest = signatures.max_by_key(|s| s.created().map(Timestamp::as_secs))?;
    let lifetime = std::time::Duration::from(newest.key_expiration_time()?);
    (!lifetime.is_zero())
        .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(created.as_secs())) + lifetime)
}

fn openpgp_signer(key: &OpenPgpKey) -> String {
    match &key.user {
        Some(user) => format!("OpenPGP {} ({user})", key.fingerprint),
        None => format!("OpenPGP {}", key.fingerprint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;

    const PAYLOAD: &[u8] = br#"{"critical":{"type":"cosign container image signature","image":{"docker-manifest-digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"},"identity":{"docker-reference":"example.com/team/app"}},"optional":null}"#;

    fn cosign_key(seed: u8) -> (p256::ecdsa::SigningKey, Keyring) {
        let signing = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
        let pem = signing.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap();
        let mut keys = Keyring::default();
        keys.add(pem.as_bytes()).unwrap();
        (signing, keys)
    }

    fn cosign_sign(key: &p256::ecdsa::SigningKey, payload: &[u8]) -> String {
        let signature: p256::ecdsa::Signature = key.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    #[test]
    fn cosign_signatures_verify_only_with_their_key_and_payload() {
        let (signing, keys) = cosign_key(7);
        let signature = cosign_sign(&signing, PAYLOAD);
        let verified = keys.verify_cosign(PAYLOAD, &signature).unwrap();
        assert_eq!(verified.claim.reference.unwrap().path, "team/app");
        assert!(verified.signer.starts_with("cosign sha256:"));
        let mut altered = PAYLOAD.to_vec();
        altered[60] ^= 1;
        assert_eq!(keys.verify_cosign(&altered, &signature).unwrap_err(), "no trusted key made it");
        let (_, other_keys) = cosign_key(9);
        assert!(other_keys.verify_cosign(PAYLOAD, &signature).is_err());
        assert!(keys.verify_cosign(PAYLOAD, "!!").unwrap_err().contains("base64"));
    }

    #[test]
    fn the_keyring_digest_follows_the_keys_to_the_byte() {
        let (_, seven) = cosign_key(7);
        let (_, again) = cosign_key(7);
        let (_, nine) = cosign_key(9);
        assert_eq!(seven.digest(), again.digest());
        assert_ne!(seven.digest(), nine.digest());
        assert_ne!(seven.digest(), Keyring::default().digest());
    }

    #[test]
    fn files_that_hold_no_key_are_refused() {
        let mut keys = Keyring::default();
        assert!(keys.add(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
        assert!(keys.add(b"hello").is_err());
        assert!(keys.add(b"").is_err());
        assert!(keys.is_empty());
    }

    #[test]
    fn simple_signature_garbage_is_refused_not_panicked_on() {
        let (_, keys) = cosign_key(7);
        for junk in [&b""[..], b"\x00\x01\x02", b"-----BEGIN PGP MESSAGE-----", &[0xa3, 0x01, 0xff, 0xff]] {
            assert!(keys.verify_simple(junk).is_err());
        }
    }
}
