//! `[cache]`: memory kept for metadata and small blobs.

use serde::Deserialize;

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

impl Default for Cache {
    fn default() -> Self {
        Cache { metadata_bytes: 64 * 1024 * 1024, blob_bytes: 64 * 1024 * 1024, blob_max_item_bytes: 256 * 1024 }
    }
}
