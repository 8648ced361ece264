//! Content digests (`algorithm:hex`) and the streaming hasher that produces them.

use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

use crate::error::{ErrorCode, OciError};

/// A digest algorithm this registry can verify. Anything else is refused with
/// `DIGEST_INVALID`, because content we cannot verify must never be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest: a supported algorithm and its lowercase hex encoding. Because the
/// encoded part is checked to be exactly lowercase hex of the right length, a digest is safe
/// to use as a storage key or file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded (hex) part after the colon.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut d = Digester::new(algorithm);
        d.update(bytes);
        d.finish()
    }

    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Self::of(Algorithm::Sha256, bytes)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

fn is_algorithm_component(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl FromStr for Digest {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, OciError> {
        let invalid = |why: &str| OciError::new(ErrorCode::DigestInvalid, format!("invalid digest: {why}"));
        let (alg, hex) = s.split_once(':').ok_or_else(|| invalid("missing ':'"))?;
        // The grammar from the image spec: algorithm-component (separator algorithm-component)*
        if alg.split(['+', '.', '_', '-']).any(|c| !is_algorithm_component(c)) {
            return Err(invalid("malformed algorithm"));
        }
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b)) {
            return Err(invalid("malformed encoded part"));
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(OciError::new(
                    ErrorCode::DigestInvalid,
                    format!("unsupported digest algorithm {alg:?}; sha256 and sha512 are supported"),
                ));
            }
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("encoded part must be lowercase hex of the algorithm's length"));
        }
        Ok(Digest { algorithm, hex: hex.to_string() })
    }
}

/// Incremental hasher for either supported algorithm. sha2 picks the CPU's SHA extensions
/// at run time where present, which is why blobs are hashed through it while they stream.
#[derive(Clone)]
pub enum Digester {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Digester {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Digester::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Digester::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Digester::Sha256(_) => Algorithm::Sha256,
            Digester::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Digester::Sha256(h) => h.update(bytes),
            Digester::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything seen so far, leaving the hasher usable.
    pub fn peek(&self) -> Digest {
        self.clone().finish()
    }

    /// The hasher's state after everything seen so far, as bytes another process can
    /// continue from ([`Digester::restore`]): the algorithm's name, a colon, then sha2's
    /// serialized state (its chaining value, block count and unhashed tail).
    pub fn save(&self) -> Vec<u8> {
        use sha2::digest::common::hazmat::SerializableState;
        let (name, state) = match self {
            Digester::Sha256(h) => ("sha256", h.serialize().to_vec()),
            Digester::Sha512(h) => ("sha512", h.serialize().to_vec()),
        };
        [name.as_bytes(), b":", &state].concat()
    }

    /// The hasher [`Digester::save`] saved, or `None` if `saved` is not one.
    pub fn restore(saved: &[u8]) -> Option<Digester> {
        use sha2::digest::common::hazmat::SerializableState;
        let colon = saved.iter().position(|&b| b == b':')?;
        let (name, state) = (&saved[..colon], &saved[colon + 1..]);
        match name {
            b"sha256" => Some(Digester::Sha256(sha2::Sha256::deserialize(state.try_into().ok()?).ok()?)),
            b"sha512" => Some(Digester::Sha512(sha2::Sha512::deserialize(state.try_into().ok()?).ok()?)),
            _ => None,
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Digester::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Digester::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let s = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = s.parse().unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(d, Digest::sha256_of(b""));
    }

    #[test]
    fn a_saved_hasher_continues_where_it_stopped() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            // Cut inside a block, so the unhashed tail must travel with the state.
            let mut first = Digester::new(algorithm);
            first.update(&data[..4_099]);
            let mut resumed = Digester::restore(&first.save()).expect("restores");
            resumed.update(&data[4_099..]);
            assert_eq!(resumed.finish(), Digest::of(algorithm, &data));
        }
        assert!(Digester::restore(b"sha256:short").is_none());
        assert!(Digester::restore(b"md5:whatever").is_none());
        assert!(Digester::restore(b"").is_none());
    }

    #[test]
    fn sha512_round_trip() {
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert!(d.hex().starts_with("ddaf35a193617aba"));
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
            ":abc",
        ] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert_eq!(err.code, ErrorCode::DigestInvalid, "{bad}");
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut d = Digester::new(Algorithm::Sha256);
        d.update(b"hello ");
        assert_eq!(d.peek(), Digest::sha256_of(b"hello "));
        d.update(b"world");
        assert_eq!(d.finish(), Digest::sha256_of(b"hello world"));
    }
}
