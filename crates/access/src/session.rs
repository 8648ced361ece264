//! Page logins: a cookie naming the user, a stamp of their password hash and when the login
//! ends, signed with HMAC-SHA256, so any node holding the same key accepts it and no node
//! keeps sessions. The caller compares the stamp with the user's current one, so a changed
//! password or a removed user ends every login of theirs. Logging out clears the cookie; a
//! copied cookie stays valid until it expires or the password changes, which is why logins
//! are short (`[ui] session_hours`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The shortest key accepted from a file.
pub const KEY_MIN_BYTES: usize = 32;

pub struct SessionKey {
    key: hmac::Key,
    lifetime: Duration,
}

impl SessionKey {
    /// A key from `bytes` (at least [`KEY_MIN_BYTES`], e.g. a file's contents).
    pub fn from_bytes(bytes: &[u8], lifetime: Duration) -> Result<SessionKey, String> {
        if bytes.len() < KEY_MIN_BYTES {
            return Err(format!("a session key needs at least {KEY_MIN_BYTES} bytes, this one has {}", bytes.len()));
        }
        Ok(SessionKey { key: hmac::Key::new(hmac::HMAC_SHA256, bytes), lifetime })
    }

    /// A key drawn now: logins last until the process ends.
    pub fn random(lifetime: Duration) -> SessionKey {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).expect("the system's random source");
        SessionKey { key: hmac::Key::new(hmac::HMAC_SHA256, &bytes), lifetime }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The cookie value of a login by `user`, whose password hash has `stamp`, starting at `now`.
    pub fn issue(&self, user: &str, stamp: &str, now: SystemTime) -> String {
        let expires = (now + self.lifetime).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let body = format!("v2.{}.{}.{expires}", URL_SAFE_NO_PAD.encode(user), URL_SAFE_NO_PAD.encode(stamp));
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The login a cookie value holds, if this key signed it and it has not expired at `now`.
    pub fn verify(&self, value: &str, now: SystemTime) -> Option<Login> {
        let (body, tag) = value.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        hmac::verify(&self.key, body.as_bytes(), &tag).ok()?;
        let mut parts = body.split('.');
        let (version, user, stamp, expires) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "v2" || parts.next().is_some() {
            return None;
        }
        let expires = UNIX_EPOCH + Duration::from_secs(expires.parse().ok()?);
        if now >= expires {
            return None;
        }
        let text = |part: &str| String::from_utf8(URL_SAFE_NO_PAD.decode(part).ok()?).ok();
        Some(Login { user: text(user)?, stamp: text(stamp)? })
    }
}

/// A signed login: who, and the stamp of the password hash they logged in with.
#[derive(Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub stamp: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_holds_for_its_key_until_it_expires_and_cannot_be_altered() {
        let key = SessionKey::from_bytes(&[7; 32], Duration::from_secs(3600)).unwrap();
        let now = SystemTime::now();
        let cookie = key.issue("alice", "s1", now);
        let alice = Login { user: "alice".into(), stamp: "s1".into() };
        assert_eq!(key.verify(&cookie, now), Some(alice));
        assert_eq!(key.verify(&cookie, now + Duration::from_secs(3599)).map(|l| l.user).as_deref(), Some("alice"));
        assert_eq!(key.verify(&cookie, now + Duration::from_secs(3601)), None, "expired");
        let other = SessionKey::from_bytes(&[8; 32], Duration::from_secs(3600)).unwrap();
        assert_eq!(other.verify(&cookie, now), None, "another key");
        // Another user, or a later expiry, under the same signature.
        let forged = cookie.replacen(&URL_SAFE_NO_PAD.encode("alice"), &URL_SAFE_NO_PAD.encode("admin"), 1);
        assert_eq!(key.verify(&forged, now), None);
        let (body, tag) = cookie.rsplit_once('.').unwrap();
        let (head, _) = body.rsplit_once('.').unwrap();
        assert_eq!(key.verify(&format!("{head}.99999999999.{tag}"), now), None);
        let restamped = cookie.replacen(&URL_SAFE_NO_PAD.encode("s1"), &URL_SAFE_NO_PAD.encode("s2"), 1);
        assert_ne!(restamped, cookie);
        assert_eq!(key.verify(&restamped, now), None, "another stamp");
        for junk in ["", ".", "v1..", "v2.YQ.1.", "v2.YQ.YQ.1.", "x.y.z.w"] {
            assert_eq!(key.verify(junk, now), None);
        }
        assert!(SessionKey::from_bytes(&[1; 16], Duration::from_secs(1)).is_err());
    }
}
