//! `[storage]`: deletes, upload expiry and garbage collection.

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
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            delete_enabled: true,
            upload_expiry_secs: 7 * 24 * 3600,
            gc_interval_secs: 3600,
            gc_grace_secs: 24 * 3600,
            gc_untagged: false,
        }
    }
}
