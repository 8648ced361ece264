//! htpasswd files with bcrypt hashes (`user:$2y$...`), the format Distribution and Apache
//! use. Other hash kinds are refused when the file is read, not silently never matched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

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

    /// A short fingerprint of `user`'s current hash, if the file lists them: a page login
    /// carries it, so changing the password or removing the user ends the login.
    pub fn stamp(&self, user: &str) -> Option<String> {
        let hash = self.users.get(user)?;
        use base64::Engine as _;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sha2::Sha256::digest(hash.as_bytes())[..9]))
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
/// Checking is split in two so that the caller can run the slow half where it blocks no one.
pub struct Logins {
    htpasswd: Htpasswd,
    salt: [u8; 16],
    /// Keyed by the salted hash of user and password; only successes enter, so it holds at
    /// most one entry per user and password in use, and never more than [`LOGINS_REMEMBERED`].
    remembered: quick_cache::sync::Cache<[u8; 32], Instant>,
}

/// How long a successful login is remembered.
const REMEMBER: Duration = Duration::from_secs(300);
/// How many successful logins are remembered at most.
pub const LOGINS_REMEMBERED: usize = 10_000;

impl Logins {
    pub fn new(htpasswd: Htpasswd) -> Logins {
        let mut salt = [0u8; 16];
        // Without randomness the salt would be guessable; there is no sensible way to go on.
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .expect("the operating system's random source failed");
        Logins { htpasswd, salt, remembered: quick_cache::sync::Cache::new(LOGINS_REMEMBERED) }
    }

    fn key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether `password` was `user`'s a moment ago (cheap: no bcrypt).
    pub fn remembered(&self, user: &str, password: &str) -> bool {
        let key = self.key(user, password);
        match self.remembered.get(&key) {
            Some(at) if at.elapsed() < REMEMBER => true,
            Some(_) => {
                self.remembered.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Whether `password` is `user`'s, by bcrypt (slow on purpose: run it off the async
    /// executor); a success is remembered.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let ok = self.htpasswd.verify(user, password);
        if ok {
            self.remembered.insert(self.key(user, password), Instant::now());
        }
        ok
    }

    /// See [`Htpasswd::stamp`].
    pub fn stamp(&self, user: &str) -> Option<String> {
        self.htpasswd.stamp(user)
    }

    /// Whether `password` is `user`'s: remembered, or verified now.
    pub fn check(&self, user: &str, password: &str) -> bool {
        self.remembered(user, password) || self.verify(user, password)
    }
}

/// Failed logins per client, as a token bucket: a client may fail `per_minute` times in a
/// burst, then once every `60 / per_minute` seconds. A client out of tries is refused
/// before its password costs a bcrypt. IPv6 clients are counted per /64, the block one
/// subscriber usually holds.
pub struct FailedLogins {
    per_minute: u32,
    /// Tries left and when that was counted, per client; at most [`CLIENTS_TRACKED`].
    clients: quick_cache::sync::Cache<IpAddr, (f64, Instant)>,
}

/// How many clients' failed logins are tracked at most (the least recent are forgotten).
pub const CLIENTS_TRACKED: usize = 10_000;

impl FailedLogins {
    /// `per_minute` = 0: no limit.
    pub fn new(per_minute: u32) -> FailedLogins {
        FailedLogins { per_minute, clients: quick_cache::sync::Cache::new(CLIENTS_TRACKED) }
    }

    fn tries_left(&self, client: IpAddr, now: Instant) -> f64 {
        let full = f64::from(self.per_minute);
        match self.clients.get(&crate::subscriber(client)) {
            Some((left, at)) => (left + now.duration_since(at).as_secs_f64() * full / 60.0).min(full),
            None => full,
        }
    }

    /// How long `client` must wait before its next login is checked; `None`: check it now.
    pub fn refusal(&self, client: IpAddr) -> Option<Duration> {
        if self.per_minute == 0 {
            return None;
        }
        let left = self.tries_left(client, Instant::now());
        (left < 1.0).then(|| Duration::from_secs_f64((1.0 - left) * 60.0 / f64::from(self.per_minute)))
    }

    /// Counts a failed login of `client`.
    pub fn failed(&self, client: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let now = Instant::now();
        let left = (self.tries_left(client, now) - 1.0).max(0.0);
        self.clients.insert(crate::subscriber(client), (left, now));
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
        assert!(logins.remembered("bob", "pw"));
        assert!(!logins.remembered("bob", "pw2"), "failures are not remembered");
    }

    #[test]
    fn failed_logins_run_out_and_come_back() {
        let limit = FailedLogins::new(3);
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limit.refusal(client), None);
            limit.failed(client);
        }
        let wait = limit.refusal(client).expect("out of tries");
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        assert_eq!(limit.refusal(other), None, "counted per client");
        // One /64 is one subscriber; the next /64 is another.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for _ in 0..3 {
            limit.failed(v6("2001:db8:0:1::1"));
        }
        assert!(limit.refusal(v6("2001:db8:0:1:ffff::2")).is_some());
        assert_eq!(limit.refusal(v6("2001:db8:0:2::1")), None);
        // A refill rate of one per 60 ms.
        let fast = FailedLogins::new(1000);
        for _ in 0..1000 {
            fast.failed(client);
        }
        assert!(fast.refusal(client).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(fast.refusal(client), None, "tries come back with time");
        assert_eq!(FailedLogins::new(0).refusal(client), None, "0: no limit");
    }

    #[test]
    fn remembered_logins_are_bounded() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let logins = Logins::new(Htpasswd::parse(&format!("bob:{hash}\n")).unwrap());
        for i in 0..LOGINS_REMEMBERED * 2 {
            logins.remembered.insert(logins.key("bob", &i.to_string()), Instant::now());
        }
        assert!(logins.remembered.len() <= LOGINS_REMEMBERED, "{}", logins.remembered.len());
    }
}
