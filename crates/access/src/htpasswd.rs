//! htpasswd files with bcrypt hashes (`user:$2y$...`), the format Distribution and Apache
//! use. Other hash kinds are refused when the file is read, not silently never matched.

use std::collections::HashMap;
use std::path::Path;

use sha2::Digest as _;

pub struct Htpasswd {
    users: HashMap<String, String>,
    /// A hash to check against for unknown users, so that an unknown name costs the same
    /// time as a wrong password.
    decoy: String,
}

impl Htpasswd {
    pub fn from_file(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or_else(|| format!("line {}: expected user:hash", i + 1))?;
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                return Err(format!("line {}: only bcrypt hashes are supported (htpasswd -B)", i + 1));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        let decoy = users.values().next().cloned().unwrap_or_else(|| "$2y$05$".to_string() + &"a".repeat(53));
        Ok(Htpasswd { users, decoy })
    }

    /// Whether `password` is `user`'s. Takes as long for unknown users as for known ones.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.decoy);
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Checks logins against an [`Htpasswd`], remembering successful ones for a few minutes:
/// bcrypt is slow on purpose, and clients using Basic auth send the password with every
/// request. Remembered logins are keyed by a salted hash, never by the password itself.
pub struct Logins {
    htpasswd: Htpasswd,
    salt: [u8; 16],
    remembered: std::sync::Mutex<HashMap<[u8; 32], std::time::Instant>>,
}

const REMEMBER: std::time::Duration = std::time::Duration::from_secs(300);

impl Logins {
    pub fn new(htpasswd: Htpasswd) -> Logins {
        let mut salt = [0u8; 16];
        // Process-unique: the address of a fresh allocation mixed with the clock is enough
        // to keep the keys of this in-memory map from being precomputed.
        let seed = format!("{:?}{:p}", std::time::SystemTime::now(), &salt);
        salt.copy_from_slice(&sha2::Sha256::digest(seed.as_bytes())[..16]);
        Logins { htpasswd, salt, remembered: std::sync::Mutex::new(HashMap::new()) }
    }

    fn key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether `password` is `user`'s.
    pub fn check(&self, user: &str, password: &str) -> bool {
        let key = self.key(user, password);
        {
            let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
            match remembered.get(&key) {
                Some(at) if at.elapsed() < REMEMBER => return true,
                Some(_) => {
                    remembered.remove(&key);
                }
                None => {}
            }
        }
        let ok = self.htpasswd.verify(user, password);
        if ok {
            let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
            remembered.retain(|_, at| at.elapsed() < REMEMBER);
            remembered.insert(key, std::time::Instant::now());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_bcrypt_users() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let h = Htpasswd::parse(&format!("# comment\nalice:{hash}\n\n")).unwrap();
        assert!(h.verify("alice", "s3cret"));
        assert!(!h.verify("alice", "wrong"));
        assert!(!h.verify("mallory", "s3cret"));
        assert!(Htpasswd::parse("bob:{SHA}abc\n").is_err(), "non-bcrypt refused");
        assert!(Htpasswd::parse("nocolon\n").is_err());
    }

    #[test]
    fn logins_remember_only_successes() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let logins = Logins::new(Htpasswd::parse(&format!("bob:{hash}\n")).unwrap());
        assert!(logins.check("bob", "pw"));
        assert!(logins.check("bob", "pw"), "remembered");
        assert!(!logins.check("bob", "pw2"));
        assert!(!logins.check("bo", "bpw"), "the key separates user and password");
    }
}
