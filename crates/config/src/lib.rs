//! The typed configuration: what `tessera serve` reads from `--config FILE` (TOML), with the
//! zero-config defaults. Every field is documented in `docs/config.md`; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP(S) listener binds.
    pub listen: SocketAddr,
    /// Directory holding blobs (`blobs/`), upload sessions (`uploads/`) and `meta.sqlite`.
    pub data: PathBuf,
    /// Serve HTTPS with this certificate and key; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub storage: Storage,
    pub cache: Cache,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest accepted on PUT; larger ones get 413.
    pub manifest_max_bytes: u64,
    /// Largest request head (request line plus headers); larger ones get 431.
    pub header_max_bytes: usize,
    /// Largest blob accepted by an upload; 0 means no limit.
    pub blob_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Allow DELETE of manifests, tags and blobs; when false they answer 405 UNSUPPORTED.
    pub delete_enabled: bool,
    /// Upload sessions untouched for this many seconds are removed at start-up.
    pub upload_expiry_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// Memory for manifests, tags and blob links kept after their first read.
    pub metadata_bytes: u64,
    /// Memory for small blobs kept after their first read; 0 turns the blob cache off.
    pub blob_bytes: u64,
    /// Blobs larger than this are never cached in memory; they stream from storage.
    pub blob_max_item_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data: PathBuf::from("./tessera-data"),
            tls: None,
            limits: Limits::default(),
            storage: Storage::default(),
            cache: Cache::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { manifest_max_bytes: 4 * 1024 * 1024, header_max_bytes: 64 * 1024, blob_max_bytes: 0 }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage { delete_enabled: true, upload_expiry_secs: 7 * 24 * 3600 }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache { metadata_bytes: 64 * 1024 * 1024, blob_bytes: 64 * 1024 * 1024, blob_max_item_bytes: 256 * 1024 }
    }
}

impl Config {
    /// Reads and validates a TOML file. Errors name the file, line and reason.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.limits.header_max_bytes < 8192 {
            return Err("limits.header_max_bytes must be at least 8192".into());
        }
        if self.limits.manifest_max_bytes == 0 {
            return Err("limits.manifest_max_bytes must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn fields_parse() {
        let c = Config::from_toml(
            r#"
listen = "0.0.0.0:443"
data = "/srv/tessera"
[tls]
cert = "c.pem"
key = "k.pem"
[limits]
manifest_max_bytes = 1024
[storage]
delete_enabled = false
"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 443);
        assert!(!c.storage.delete_enabled);
        assert_eq!(c.limits.manifest_max_bytes, 1024);
        assert_eq!(c.limits.header_max_bytes, 64 * 1024);
        assert_eq!(c.tls.unwrap().cert, PathBuf::from("c.pem"));
    }

    #[test]
    fn errors_name_the_line() {
        let e = Config::from_toml("listen = \"x\"\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = Config::from_toml("\n\nbogus = 1\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        assert!(Config::from_toml("[limits]\nheader_max_bytes = 10\n").is_err());
    }
}
