//! `[storage]`: deletes, upload expiry, garbage collection, and where blobs live.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Allow DELETE of manifests, tags and blobs; when false they answer 405 UNSUPPORTED.
    pub delete_enabled: bool,
    /// Upload sessions untouched for this many seconds are removed (at start-up and by each
    /// garbage collection pass).
    pub upload_expiry_secs: u64,
    /// Seconds between garbage collection passes over the hosted store; 0 turns them off.
    pub gc_interval_secs: u64,
    /// How long unreferenced links and unlinked bytes are kept before a pass removes them:
    /// longer than any push takes between its first layer and its manifest.
    pub gc_grace_secs: u64,
    /// Passes also delete manifests nothing keeps: untagged, listed by no index of their
    /// repository, not a referrer of a kept manifest (Distribution's `--delete-untagged`).
    pub gc_untagged: bool,
    /// `[storage.s3]`: blobs (hosted, upload sessions and every upstream's cache) in an
    /// S3-compatible bucket instead of under `data`.
    pub s3: Option<S3>,
    /// `[storage.postgres]`: metadata in a PostgreSQL database instead of `meta.sqlite`
    /// under `data`.
    pub postgres: Option<Postgres>,
}

/// A PostgreSQL database for the metadata.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// `postgres://user@host:port/database` (or libpq's `key=value` form); give this or
    /// `url_file`.
    pub url: Option<String>,
    /// A file holding the URL, for one with a password in it (trailing newline ignored).
    pub url_file: Option<PathBuf>,
    /// The schema the tables live in (created if missing), so one database can hold
    /// several registries; PostgreSQL's default (`public`) when omitted. 1 to 63 lowercase
    /// letters, digits and `_`, not starting with a digit (checked when connecting).
    pub schema: Option<String>,
    /// PEM certificates to trust besides the system's, for the server's certificate when
    /// the URL says `sslmode=require`.
    pub ca_file: Option<PathBuf>,
    /// Nodes sharing the database hear of each other's changes at once (`LISTEN`/`NOTIFY`);
    /// each also reads the change counter this often, so no cached answer outlives a
    /// change by more than this even when news is lost.
    #[serde(default = "default_changes_poll_ms")]
    pub changes_poll_ms: u64,
}

fn default_changes_poll_ms() -> u64 {
    1000
}

/// An S3-compatible bucket (Garage, MinIO, Ceph RGW, AWS S3).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3 {
    /// `http(s)://host:port` of the store; AWS's regional endpoint when omitted.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key, so one bucket can hold several registries.
    #[serde(default)]
    pub prefix: String,
    /// Path-style requests (`endpoint/bucket/key`), which every S3-compatible store
    /// serves; `false` for virtual-host style (`bucket.endpoint/key`). Default: path style
    /// with an `endpoint`, virtual-host style on AWS.
    pub path_style: Option<bool>,
    /// Files holding the access key id and the secret key; when omitted, the environment's
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            delete_enabled: true,
            upload_expiry_secs: 7 * 24 * 3600,
            gc_interval_secs: 3600,
            gc_grace_secs: 24 * 3600,
            gc_untagged: false,
            s3: None,
            postgres: None,
        }
    }
}
