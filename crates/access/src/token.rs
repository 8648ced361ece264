//! Tessera as its own token issuer (the Docker registry token flow): ES256 JWTs carrying
//! the `access` granted for each requested scope, verified on every registry request, and
//! the public key published as a JWKS document for other services.
//!
//! Only ES256 is produced or accepted: a token with any other `alg` (`none` included) is
//! refused before its signature is looked at.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};

use crate::{Action, Identity};

/// Clock skew tolerated on `nbf` and `exp`.
const LEEWAY: u64 = 30;

/// One granted scope: the actions allowed on one repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    #[serde(default)]
    sub: String,
    aud: Audience,
    exp: u64,
    #[serde(default)]
    nbf: u64,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    jti: String,
    /// Docker-style grants. Tokens from other issuers may carry none: then the policy
    /// decides for the `sub` they name.
    #[serde(default)]
    access: Option<Vec<Grant>>,
}

/// `aud` is a string or a list of strings (RFC 7519).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn includes(&self, service: &str) -> bool {
        match self {
            Audience::One(a) => a == service,
            Audience::Many(all) => all.iter().any(|a| a == service),
        }
    }
}

/// A public key tokens may be signed with.
#[derive(Debug, Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    key: KeyKind,
}

#[derive(Debug, Clone)]
enum KeyKind {
    /// Uncompressed SEC1 P-256 point.
    Es256(Vec<u8>),
    /// RSA modulus and exponent, big-endian.
    Rs256 { n: Vec<u8>, e: Vec<u8> },
}

/// Reads the keys of a JWKS document (EC P-256 for ES256, RSA for RS256; others skipped).
pub fn jwks_keys(jwks: &serde_json::Value) -> Result<Vec<VerifyKey>, String> {
    let mut keys = Vec::new();
    for k in jwks["keys"].as_array().ok_or("a JWKS document has a \"keys\" list")? {
        let part = |name: &str| -> Result<Vec<u8>, String> {
            B64.decode(k[name].as_str().ok_or(format!("key without {name}"))?).map_err(|e| format!("key {name}: {e}"))
        };
        let kid = k["kid"].as_str().map(str::to_string);
        let key = match (k["kty"].as_str(), k["crv"].as_str()) {
            (Some("EC"), Some("P-256")) => {
                let mut point = vec![4u8];
                point.extend(part("x")?);
                point.extend(part("y")?);
                KeyKind::Es256(point)
            }
            (Some("RSA"), _) => KeyKind::Rs256 { n: part("n")?, e: part("e")? },
            _ => continue,
        };
        keys.push(VerifyKey { kid, key });
    }
    if keys.is_empty() {
        return Err("no usable key (EC P-256 or RSA) in the JWKS document".into());
    }
    Ok(keys)
}

/// Verifies `token` against `keys` (the one named by `kid` when the token names one), then
/// its issuer, audience and times. Only ES256 and RS256 are accepted.
pub fn verify_with(token: &str, issuer: &str, audience: &str, keys: &[VerifyKey]) -> Result<Verified, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("malformed token");
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(h).map_err(|_| "malformed token")?).map_err(|_| "malformed token")?;
    let alg = header["alg"].as_str().unwrap_or("");
    if alg != "ES256" && alg != "RS256" {
        return Err("unsupported token algorithm");
    }
    let kid = header["kid"].as_str();
    let signature = B64.decode(s).map_err(|_| "malformed token")?;
    let signed = format!("{h}.{c}");
    let valid = keys.iter().filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid).any(|k| {
        match (&k.key, alg) {
            (KeyKind::Es256(point), "ES256") => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(signed.as_bytes(), &signature).is_ok()
            }
            (KeyKind::Rs256 { n, e }, "RS256") => ring::signature::RsaPublicKeyComponents { n, e }
                .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &signature)
                .is_ok(),
            _ => false,
        }
    });
    if !valid {
        return Err("bad token signature");
    }
    let claims: Claims =
        serde_json::from_slice(&B64.decode(c).map_err(|_| "malformed token")?).map_err(|_| "malformed token")?;
    if claims.iss != issuer {
        return Err("token from another issuer");
    }
    if !claims.aud.includes(audience) {
        return Err("token for another service");
    }
    let t = now();
    if claims.nbf > t + LEEWAY || claims.exp + LEEWAY < t {
        return Err("token expired or not yet valid");
    }
    let identity = if claims.sub.is_empty() { Identity::Anonymous } else { Identity::User(claims.sub) };
    Ok(Verified { identity, grants: claims.access })
}

/// The issuer a token claims, read without verifying anything (to pick whose keys verify it).
/// The `kid` a token's header names, unverified (to tell a key not yet known).
pub fn token_kid(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let value: serde_json::Value = serde_json::from_slice(&B64.decode(header).ok()?).ok()?;
    value["kid"].as_str().map(str::to_string)
}

pub fn claimed_issuer(token: &str) -> Option<String> {
    let claims = token.split('.').nth(1)?;
    let value: serde_json::Value = serde_json::from_slice(&B64.decode(claims).ok()?).ok()?;
    value["iss"].as_str().map(str::to_string)
}

/// A verified token: who it was issued to and, for Docker-style tokens, what it grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub identity: Identity,
    /// `None`: the token names an identity only, and the policy decides for it.
    pub grants: Option<Vec<Grant>>,
}

impl Verified {
    /// Whether the token's grants allow `action` on repository `name` (`None` when the
    /// token carries no grants).
    pub fn allows(&self, action: Action, name: &str) -> Option<bool> {
        let grants = self.grants.as_ref()?;
        Some(grants.iter().any(|g| {
            g.kind == "repository" && g.name == name && g.actions.iter().any(|a| a == action.as_str() || a == "*")
        }))
    }
}

pub struct TokenIssuer {
    key: EcdsaKeyPair,
    kid: String,
    issuer: String,
    service: String,
    ttl: Duration,
    rng: SystemRandom,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenIssuer {
    /// Loads the PKCS#8 P-256 key at `key_file`, creating it (mode 0600) if it is missing.
    pub fn open(key_file: &Path, issuer: &str, service: &str, ttl: Duration) -> Result<TokenIssuer, String> {
        let rng = SystemRandom::new();
        let pkcs8 = match std::fs::read(key_file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| "cannot generate a token key")?;
                write_private(key_file, doc.as_ref())
                    .map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(format!("cannot read {}: {e}", key_file.display())),
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| format!("{} is not a PKCS#8 P-256 private key", key_file.display()))?;
        let kid = B64.encode(&ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref()).as_ref()[..12]);
        Ok(TokenIssuer { key, kid, issuer: issuer.into(), service: service.into(), ttl, rng })
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// A token for `who` granting `grants`; returns it with its lifetime in seconds.
    pub fn issue(&self, who: &Identity, grants: Vec<Grant>) -> Result<(String, u64), String> {
        self.issue_at(now(), who, grants)
    }

    /// A token as if issued at `iat` (seconds since the epoch).
    fn issue_at(&self, iat: u64, who: &Identity, grants: Vec<Grant>) -> Result<(String, u64), String> {
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti).map_err(|_| "no randomness")?;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: match who {
                Identity::User(u) => u.clone(),
                Identity::Anonymous => String::new(),
            },
            aud: Audience::One(self.service.clone()),
            exp: iat + self.ttl.as_secs(),
            nbf: iat,
            iat,
            jti: B64.encode(jti),
            access: Some(grants),
        };
        let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(serde_json::to_vec(&claims).map_err(|e| e.to_string())?)
        );
        let signature = self.key.sign(&self.rng, signing_input.as_bytes()).map_err(|_| "cannot sign")?;
        Ok((format!("{signing_input}.{}", B64.encode(signature.as_ref())), self.ttl.as_secs()))
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Checks signature, algorithm, issuer, audience and times; returns what the token says.
    pub fn verify(&self, token: &str) -> Result<Verified, &'static str> {
        let key = VerifyKey { kid: None, key: KeyKind::Es256(self.key.public_key().as_ref().to_vec()) };
        verify_with(token, &self.issuer, &self.service, std::slice::from_ref(&key))
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let point = self.key.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
        serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]})
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Parses a Docker token `scope` (`repository:name:pull,push`); other types are ignored.
pub fn parse_scope(scope: &str) -> Option<(String, Vec<Action>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind != "repository" {
        return None;
    }
    let actions = actions.split(',').filter_map(|a| if a == "*" { None } else { Action::parse(a) }).collect();
    Some((name.to_string(), actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(dir: &Path) -> TokenIssuer {
        TokenIssuer::open(&dir.join("key.p8"), "tessera", "registry.test", Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn issues_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let t = issuer(dir.path());
        let grant = Grant { kind: "repository".into(), name: "a/b".into(), actions: vec!["pull".into()] };
        let (token, ttl) = t.issue(&Identity::User("alice".into()), vec![grant]).unwrap();
        assert_eq!(ttl, 60);
        let v = t.verify(&token).unwrap();
        assert_eq!(v.identity, Identity::User("alice".into()));
        assert_eq!(v.allows(Action::Pull, "a/b"), Some(true));
        assert_eq!(v.allows(Action::Push, "a/b"), Some(false));
        assert_eq!(v.allows(Action::Pull, "a/c"), Some(false));
        // The key persists: a second issuer from the same file verifies the same token.
        assert!(issuer(dir.path()).verify(&token).is_ok());
        let jwks = t.jwks();
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        // Its JWKS verifies the token as another service would.
        let keys = jwks_keys(&jwks).unwrap();
        assert_eq!(
            verify_with(&token, "tessera", "registry.test", &keys).unwrap().identity,
            Identity::User("alice".into())
        );
        assert_eq!(verify_with(&token, "someone-else", "registry.test", &keys), Err("token from another issuer"));
        assert_eq!(claimed_issuer(&token).as_deref(), Some("tessera"));
        assert!(jwks_keys(&serde_json::json!({"keys": []})).is_err());
    }

    #[test]
    fn refuses_forged_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let t = issuer(dir.path());
        let (token, _) = t.issue(&Identity::User("alice".into()), vec![]).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        // alg: none, with the signature dropped.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert_eq!(t.verify(&none), Err("unsupported token algorithm"));
        // Claims changed under the original signature.
        let claims = B64.encode(
            serde_json::json!({"iss":"tessera","sub":"root","aud":"registry.test","exp":u64::MAX/2,"nbf":0,"iat":0,"jti":"x",
                "access":[{"type":"repository","name":"a","actions":["push"]}]})
                .to_string(),
        );
        assert_eq!(t.verify(&format!("{}.{claims}.{}", parts[0], parts[2])), Err("bad token signature"));
        // Another issuer's key, another audience, garbage.
        let other =
            TokenIssuer::open(&dir.path().join("other.p8"), "tessera", "registry.test", Duration::from_secs(60))
                .unwrap();
        assert_eq!(t.verify(&other.issue(&Identity::Anonymous, vec![]).unwrap().0), Err("bad token signature"));
        let wrong_aud =
            TokenIssuer::open(&dir.path().join("key.p8"), "tessera", "elsewhere", Duration::from_secs(60)).unwrap();
        assert_eq!(
            t.verify(&wrong_aud.issue(&Identity::Anonymous, vec![]).unwrap().0),
            Err("token for another service")
        );
        for junk in ["", "a.b", "a.b.c.d", "!!!.???.***"] {
            assert!(t.verify(junk).is_err());
        }
        // Expired: accepted within the leeway for clock skew, refused past it; the same for
        // a token not valid yet.
        let short =
            TokenIssuer::open(&dir.path().join("key.p8"), "tessera", "registry.test", Duration::from_secs(60)).unwrap();
        let expired_at = |seconds_ago: u64| short.issue_at(now() - 60 - seconds_ago, &Identity::Anonymous, vec![]);
        assert!(t.verify(&expired_at(LEEWAY - 5).unwrap().0).is_ok(), "within the leeway");
        assert_eq!(t.verify(&expired_at(LEEWAY + 5).unwrap().0), Err("token expired or not yet valid"));
        assert_eq!(t.verify(&expired_at(3600).unwrap().0), Err("token expired or not yet valid"));
        let (early, _) = short.issue_at(now() + LEEWAY + 5, &Identity::Anonymous, vec![]).unwrap();
        assert_eq!(t.verify(&early), Err("token expired or not yet valid"));
    }

    #[test]
    fn scopes() {
        assert_eq!(parse_scope("repository:a/b:pull,push"), Some(("a/b".into(), vec![Action::Pull, Action::Push])));
        assert_eq!(parse_scope("repository:host:5000/a:pull"), Some(("host:5000/a".into(), vec![Action::Pull])));
        assert_eq!(parse_scope("registry:catalog:*"), None);
        assert_eq!(parse_scope("garbage"), None);
    }
}
