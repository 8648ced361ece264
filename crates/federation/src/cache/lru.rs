//! The size bound of a cache: least recently used blobs go first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tessera_spec::Digest;
use tessera_store::BlobStore;

use super::{CacheStats, count};
use crate::upstream::Upstream;

/// Which cached blobs were used least recently, and how many bytes they hold.
#[derive(Default)]
pub(super) struct Lru {
    by_digest: HashMap<Digest, (u64, u64)>,
    by_use: std::collections::BTreeMap<u64, Digest>,
    clock: u64,
    pub(super) total: u64,
}

impl Lru {
    pub(super) fn touch(&mut self, digest: &Digest, size: u64) {
        self.clock += 1;
        if let Some((old_size, tick)) = self.by_digest.insert(digest.clone(), (size, self.clock)) {
            self.by_use.remove(&tick);
            self.total -= old_size;
        }
        self.by_use.insert(self.clock, digest.clone());
        self.total += size;
    }

    /// Takes least recently used blobs out until at most `max` bytes remain, sparing `keep`.
    pub(super) fn evict(&mut self, max: u64, keep: &Digest) -> Vec<Digest> {
        let mut victims = Vec::new();
        let mut spared = None;
        while self.total > max {
            let Some((tick, digest)) = self.by_use.pop_first() else { break };
            if &digest == keep {
                spared = Some((tick, digest));
                continue;
            }
            if let Some((size, _)) = self.by_digest.remove(&digest) {
                self.total -= size;
            }
            victims.push(digest);
        }
        if let Some((tick, digest)) = spared {
            self.by_use.insert(tick, digest);
        }
        victims
    }
}

/// Deletes least recently used blobs until the cache fits its bound (`keep` excepted: it is
/// being served right now). Links stay: they record what the upstream has, and a blob whose
/// bytes were evicted is fetched again when next asked for.
pub(super) async fn evict(
    upstream: &Upstream,
    lru: &Mutex<Lru>,
    blobs: &Arc<dyn BlobStore>,
    stats: &CacheStats,
    keep: &Digest,
) {
    let max = upstream.cache_settings().max_bytes;
    if max == 0 {
        return;
    }
    let victims = lru.lock().unwrap_or_else(|p| p.into_inner()).evict(max, keep);
    for digest in victims {
        match blobs.delete(&digest).await {
            Ok(_) => {
                count(&stats.evictions, 1);
                tracing::info!(upstream = upstream.name(), %digest, "evicted from the cache")
            }
            Err(e) => tracing::warn!(upstream = upstream.name(), %digest, "cannot evict: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used_first_and_spares_what_is_being_served() {
        let d = |s: &str| Digest::sha256_of(s.as_bytes());
        let mut lru = Lru::default();
        for name in ["a", "b", "c"] {
            lru.touch(&d(name), 10);
        }
        lru.touch(&d("a"), 10);
        // Order of use is now b, c, a; c is being served and must stay.
        let victims = lru.evict(10, &d("c"));
        assert_eq!(victims, vec![d("b"), d("a")]);
        assert_eq!(lru.total, 10);
        assert!(lru.by_digest.contains_key(&d("c")));
        assert!(lru.evict(10, &d("c")).is_empty(), "within the bound: nothing more");
    }
}
