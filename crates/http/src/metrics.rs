//! Counters in Prometheus' text format at `GET /metrics`: requests by status class, and
//! for each upstream cache its fetches, stale answers, digest mismatches and evictions.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_federation::Federation;

/// Picks one counter out of a cache's stats.
type CounterOf = fn(&tessera_federation::CacheStats) -> &AtomicU64;

/// Request counters of this process.
#[derive(Default)]
pub struct Metrics {
    /// Answers by status class: index 0 is 1xx, 4 is 5xx.
    by_class: [AtomicU64; 5],
    gc_passes: AtomicU64,
    gc_manifests_deleted: AtomicU64,
    gc_links_removed: AtomicU64,
    gc_blobs_deleted: AtomicU64,
    gc_bytes_freed: AtomicU64,
}

impl Metrics {
    /// Counts a finished garbage collection pass.
    pub fn collected(&self, done: &tessera_registry::gc::Collected) {
        if done.elsewhere {
            return;
        }
        self.gc_passes.fetch_add(1, Ordering::Relaxed);
        self.gc_manifests_deleted.fetch_add(done.manifests_deleted, Ordering::Relaxed);
        self.gc_links_removed.fetch_add(done.links_removed, Ordering::Relaxed);
        self.gc_blobs_deleted.fetch_add(done.blobs_deleted, Ordering::Relaxed);
        self.gc_bytes_freed.fetch_add(done.bytes_freed, Ordering::Relaxed);
    }

    pub(crate) fn answered(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text for these counters and `federation`'s caches.
    pub(crate) fn render(&self, federation: &Federation, registry: &tessera_registry::Registry) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP tessera_http_requests_total Requests answered, by status class.");
        let _ = writeln!(out, "# TYPE tessera_http_requests_total counter");
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(out, "tessera_http_requests_total{{class=\"{}xx\"}} {}", i + 1, c.load(Ordering::Relaxed));
        }
        let mut caches: Vec<_> = federation.caches().collect();
        caches.sort_by_key(|(name, _)| *name);
        let families: [(&str, &str, CounterOf); 8] = [
            ("tessera_cache_manifests_fetched_total", "Manifests fetched from the upstream.", |s| &s.manifests_fetched),
            ("tessera_cache_blobs_fetched_total", "Blobs fetched from the upstream, verified and kept.", |s| {
                &s.blobs_fetched
            }),
            ("tessera_cache_blob_bytes_fetched_total", "Bytes of blobs fetched from the upstream.", |s| {
                &s.blob_bytes_fetched
            }),
            ("tessera_cache_stale_served_total", "Cached manifests served because the upstream failed.", |s| {
                &s.stale_served
            }),
            (
                "tessera_cache_digest_mismatches_total",
                "Upstream content that did not match its digest (never kept).",
                |s| &s.digest_mismatches,
            ),
            ("tessera_cache_fetch_failures_total", "Blob fetches that failed.", |s| &s.fetch_failures),
            ("tessera_cache_evictions_total", "Blobs evicted to keep the cache within its bound.", |s| &s.evictions),
            ("tessera_cache_rate_limited_total", "Upstream 429 answers and requests held back by them.", |s| {
                &s.rate_limited
            }),
        ];
        for (name, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (upstream, cache) in &caches {
                let _ =
                    writeln!(out, "{name}{{upstream=\"{upstream}\"}} {}", field(cache.stats()).load(Ordering::Relaxed));
            }
        }
        let delivery = &federation.delivery;
        let _ = writeln!(out, "# HELP tessera_blob_redirects_total Blob GETs answered with a redirect, by delivery.");
        let _ = writeln!(out, "# TYPE tessera_blob_redirects_total counter");
        let r = &delivery.redirects;
        for (kind, counter) in
            [("cdn", &r.cdn), ("mirror", &r.mirror), ("external", &r.external), ("presigned", &r.presigned)]
        {
            let _ = writeln!(
                out,
                "tessera_blob_redirects_total{{delivery=\"{kind}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP tessera_mirror_healthy Whether a mirror passed its last health check.");
        let _ = writeln!(out, "# TYPE tessera_mirror_healthy gauge");
        for m in delivery.mirrors() {
            let _ = writeln!(out, "tessera_mirror_healthy{{mirror=\"{}\"}} {}", m.config.url, u8::from(m.healthy()));
        }
        for (name, help, counter) in [
            ("tessera_gc_passes_total", "Garbage collection passes finished.", &self.gc_passes),
            (
                "tessera_gc_manifests_deleted_total",
                "Untagged manifests nothing kept, deleted.",
                &self.gc_manifests_deleted,
            ),
            ("tessera_gc_links_removed_total", "Unreferenced blob links removed.", &self.gc_links_removed),
            ("tessera_gc_blobs_deleted_total", "Blobs whose bytes were deleted.", &self.gc_blobs_deleted),
            ("tessera_gc_bytes_freed_total", "Bytes of blobs deleted.", &self.gc_bytes_freed),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        // What requests cost the shared stores (a model of scale-out reads these).
        for (name, help, count) in [
            (
                "tessera_metadata_queries_total",
                "Statements and transactions sent to the metadata database.",
                registry.metadata_queries(),
            ),
            (
                "tessera_metadata_write_transactions_total",
                "Write transactions among the metadata queries (they take turns in the database).",
                registry.metadata_writes(),
            ),
            (
                "tessera_object_store_requests_total",
                "Requests sent to the object store, retries included.",
                registry.blob_store_requests(),
            ),
        ] {
            if let Some(count) = count {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
                let _ = writeln!(out, "{name} {count}");
            }
        }
        out
    }
}
