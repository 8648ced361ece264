//! Quotas: bytes stored per name prefix, each blob counted once per prefix however many of
//! its repositories link it (blobs that live on another server are not counted: they are
//! not stored here). A link that would take a quota past its bound is refused with
//! `DENIED`, naming the quota and its use.
//!
//! What a prefix holds is asked of the metadata store and kept for [`FRESH_FOR`], grown by
//! this process's own links meanwhile; a refusal is always decided on a fresh figure, so a
//! deletion or a garbage collection frees room within that time. Uploads finishing at the
//! same moment may together overshoot a quota by what they add (as with every registry
//! that checks quotas without serialising uploads).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_spec::name::prefix_covers;
use tessera_spec::{Digest, ErrorCode, OciError, RepoName};

use crate::{Registry, store_failure};

/// How long a quota's use, once asked of the store, is trusted.
pub const FRESH_FOR: Duration = Duration::from_secs(30);

/// One quota: at most `max_bytes` under `prefix`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    pub prefix: String,
    pub max_bytes: u64,
}

/// A quota and what its prefix holds, as last known.
#[derive(Debug)]
pub struct Counted {
    pub quota: Quota,
    used: Mutex<Option<(u64, Instant)>>,
}

/// A quota's use at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaUse {
    pub prefix: String,
    pub max_bytes: u64,
    pub used_bytes: u64,
}

impl Counted {
    pub fn new(quota: Quota) -> Counted {
        Counted { quota, used: Mutex::new(None) }
    }

    fn known(&self, fresh_for: Duration) -> Option<u64> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.filter(|(_, at)| at.elapsed() < fresh_for).map(|(n, _)| n)
    }

    fn set(&self, used: u64) {
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = Some((used, Instant::now()));
    }

    fn grow(&self, by: u64) {
        if let Some((used, _)) = self.used.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            *used += by;
        }
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

impl Registry {
    /// The quotas that apply to `repo`.
    fn quotas_of<'a>(&'a self, repo: &RepoName) -> impl Iterator<Item = &'a Counted> + use<'a> {
        let repo = repo.as_str().to_string();
        self.quotas.iter().filter(move |q| prefix_covers(&q.quota.prefix, &repo))
    }

    /// What `counted`'s prefix holds: as last known if fresher than `fresh_for`, else
    /// asked of the store.
    async fn used(&self, counted: &Counted, fresh_for: Duration) -> Result<u64, OciError> {
        if let Some(used) = counted.known(fresh_for) {
            return Ok(used);
        }
        let used = self.meta.bytes_under(&counted.quota.prefix).await.map_err(|e| store_failure("quota use", e))?;
        counted.set(used);
        Ok(used)
    }

    /// Refuses to link `digest` (`size` bytes, held here) into `repo` when that would take
    /// a quota past its bound. Returns the quotas it would grow, for [`Registry::counted`].
    pub(crate) async fn check_quotas(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<Vec<&Counted>, OciError> {
        let mut growing = Vec::new();
        if self.quotas.is_empty() {
            return Ok(growing);
        }
        for counted in self.quotas_of(repo) {
            let prefix = &counted.quota.prefix;
            if self.meta.linked_under(prefix, digest).await.map_err(|e| store_failure("quota check", e))? {
                continue;
            }
            let max = counted.quota.max_bytes;
            if self.used(counted, FRESH_FOR).await?.saturating_add(size) > max {
                // Decided on a fresh figure only: what a deletion freed counts at once.
                let used = self.used(counted, Duration::ZERO).await?;
                if used.saturating_add(size) > max {
                    return Err(OciError::new(
                        ErrorCode::Denied,
                        format!(
                            "quota of {prefix:?} exceeded: {} of {} used, and this blob adds {}",
                            human(used),
                            human(max),
                            human(size)
                        ),
                    )
                    .with_detail(
                        json!({ "quota": prefix, "max_bytes": max, "used_bytes": used, "blob_bytes": size }),
                    ));
                }
            }
            growing.push(counted);
        }
        Ok(growing)
    }

    /// Counts a link [`Registry::check_quotas`] allowed, once it is made.
    pub(crate) fn counted(growing: &[&Counted], size: u64) {
        for counted in growing {
            counted.grow(size);
        }
    }

    /// Every quota with what its prefix holds now (at most [`FRESH_FOR`] old).
    pub async fn quota_use(&self) -> Result<Vec<QuotaUse>, OciError> {
        let mut uses = Vec::with_capacity(self.quotas.len());
        for counted in &self.quotas {
            uses.push(QuotaUse {
                prefix: counted.quota.prefix.clone(),
                max_bytes: counted.quota.max_bytes,
                used_bytes: self.used(counted, FRESH_FOR).await?,
            });
        }
        Ok(uses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 * 1024 * 1024 * 1024), "10.0 GiB");
    }
}
