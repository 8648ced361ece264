//! `[[sync]]`: repositories of an upstream kept mirrored on a schedule, into its cache or
//! into hosted repositories.

use serde::Deserialize;

/// Where a sync job puts what it brings.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncTarget {
    /// The upstream's pull-through cache (what its routes serve).
    #[default]
    Cache,
    /// Hosted repositories (pushed content that stays whatever the upstream does).
    Hosted,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sync {
    /// The job's name in logs and metrics (default: `sync-<n>`, its position).
    pub name: Option<String>,
    /// The `[[upstream]]` to mirror from.
    pub upstream: String,
    /// Repositories, by their names at the upstream.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Name prefixes, listed through the upstream's catalog (which Distribution, Harbor and
    /// Zot offer and Docker Hub does not).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Tags to mirror (`*` and `?` wildcards).
    #[serde(default = "every_tag")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub into: SyncTarget,
    /// With `into = "hosted"`: the hosted names are `<hosted_prefix>/<name at the upstream>`
    /// (absent: the same names).
    pub hosted_prefix: Option<String>,
    /// Seconds between passes (the first one at start-up); 0: only `tessera sync`.
    #[serde(default = "hourly")]
    pub interval_secs: u64,
}

fn every_tag() -> Vec<String> {
    vec!["*".into()]
}

fn hourly() -> u64 {
    3600
}

impl Sync {
    pub fn name_at(&self, position: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("sync-{}", position + 1))
    }

    pub(crate) fn check(&self, position: usize, upstreams: &[crate::Upstream]) -> Result<(), String> {
        let name = self.name_at(position);
        if !upstreams.iter().any(|u| u.name == self.upstream) {
            return Err(format!("[[sync]] {name}: no [[upstream]] named {:?}", self.upstream));
        }
        if self.repositories.is_empty() && self.prefixes.is_empty() {
            return Err(format!("[[sync]] {name}: give repositories, prefixes or both"));
        }
        if self.tags.is_empty() || self.tags.iter().any(String::is_empty) {
            return Err(format!("[[sync]] {name}: empty tag pattern"));
        }
        if self.hosted_prefix.is_some() && self.into != SyncTarget::Hosted {
            return Err(format!("[[sync]] {name}: hosted_prefix goes with into = \"hosted\""));
        }
        Ok(())
    }
}
