//! `[[static]]`: read-only repositories published elsewhere.

use serde::Deserialize;
use std::path::PathBuf;

/// One `[[static]]` source; exactly one of `crane_dir` and `layout`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSource {
    /// Name used by routes (`to = "name"`), like an upstream's.
    pub name: String,
    /// A directory of Pulp `pulp-docker-redirect` JSON files (versions 2 to 4), one
    /// repository each; changes on disk are picked up without a restart.
    pub crane_dir: Option<PathBuf>,
    /// An OCI image layout: a directory, or an `http(s)://` base URL where its `index.json`
    /// and `blobs/` are served.
    pub layout: Option<String>,
    /// With `layout`: the repository name it is served as.
    pub repository: Option<String>,
    /// Where the simple signatures of its images are, in the lookaside layout
    /// (`<lookaside>/<name>@sha256=<hex>/signature-N`): a directory or an `http(s)://` base
    /// URL, as Pulp publishes them beside Crane's files. Absent: a layout's own `sigstore/`
    /// (what `tessera export` writes); none for a Crane directory.
    pub lookaside: Option<String>,
    /// Seconds between checks of `crane_dir` (and of a layout URL's `index.json`) for changes.
    #[serde(default = "default_static_poll_secs")]
    pub poll_secs: u64,
}

fn default_static_poll_secs() -> u64 {
    2
}

impl StaticSource {
    /// A Crane directory source named `crane` (`tessera serve --crane-dir DIR`).
    pub fn crane(dir: PathBuf) -> StaticSource {
        StaticSource {
            name: "crane".into(),
            crane_dir: Some(dir),
            layout: None,
            repository: None,
            lookaside: None,
            poll_secs: default_static_poll_secs(),
        }
    }
}
