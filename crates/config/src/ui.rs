//! `[ui]`: the read-only web pages `tessera serve` shows at `/`.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ui {
    /// Serve the pages. Default: on loopback listeners only, where only this machine's
    /// users see what the registry holds; elsewhere, say so.
    pub enabled: Option<bool>,
    /// How long a page login lasts, in hours.
    pub session_hours: u64,
    /// A file of at least 32 bytes that signs page logins. Every node of a cluster needs
    /// the same one, so a login made through one node holds on the others. Absent: a key
    /// drawn at start, so a restart logs everyone out.
    pub session_key_file: Option<PathBuf>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui { enabled: None, session_hours: 12, session_key_file: None }
    }
}
