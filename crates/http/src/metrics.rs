//! `GET /metrics` in Prometheus' text format, encoded by `prometheus-client` (the
//! Prometheus project's own Rust library: its encoder escapes label values and keeps the
//! format right, so nothing here formats exposition text by hand).
//!
//! Two kinds of figures: those this module measures as requests go by (latency histograms
//! and bytes by endpoint family, garbage collection), kept in `prometheus-client` metrics;
//! and those others keep (the caches of the upstreams, which a reload replaces; the stores'
//! request counters; the process), read at each scrape into a [`Snapshot`].

use std::fmt;
use std::sync::atomic::Ordering;

use axum::http::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_federation::{Federation, LATENCY_BUCKETS, UPSTREAM_REQUESTS};

/// What a request asked for, as the `family` label: few values, whatever the paths.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum EndpointFamily {
    Base,
    Catalog,
    Tags,
    Manifest,
    Blob,
    Upload,
    Referrers,
    BlobLocation,
    Copy,
    Signatures,
    Token,
    Metrics,
    Probe,
    /// The web pages and their assets.
    Page,
    /// A path that is no endpoint (answered 404) or could not be parsed.
    Unknown,
}

impl EndpointFamily {
    pub fn of(endpoint: &crate::endpoint::Endpoint) -> EndpointFamily {
        use crate::endpoint::Endpoint as E;
        match endpoint {
            E::Base => EndpointFamily::Base,
            E::Metrics | E::Quotas => EndpointFamily::Metrics,
            E::Token { .. } | E::Jwks => EndpointFamily::Token,
            E::Catalog(_) => EndpointFamily::Catalog,
            E::Tags { .. } => EndpointFamily::Tags,
            E::Manifest { .. } => EndpointFamily::Manifest,
            E::Blob { .. } => EndpointFamily::Blob,
            E::UploadStart { .. } | E::Upload { .. } => EndpointFamily::Upload,
            E::Referrers { .. } => EndpointFamily::Referrers,
            E::BlobLocation { .. } => EndpointFamily::BlobLocation,
            E::Copy { .. } => EndpointFamily::Copy,
            E::Signatures { .. } | E::Lookaside { .. } => EndpointFamily::Signatures,
            E::Page(_) => EndpointFamily::Page,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            EndpointFamily::Base => "base",
            EndpointFamily::Catalog => "catalog",
            EndpointFamily::Tags => "tags",
            EndpointFamily::Manifest => "manifest",
            EndpointFamily::Blob => "blob",
            EndpointFamily::Upload => "upload",
            EndpointFamily::Referrers => "referrers",
            EndpointFamily::BlobLocation => "blob_location",
            EndpointFamily::Copy => "copy",
            EndpointFamily::Signatures => "signatures",
            EndpointFamily::Token => "token",
            EndpointFamily::Metrics => "metrics",
            EndpointFamily::Probe => "probe",
            EndpointFamily::Page => "page",
            EndpointFamily::Unknown => "unknown",
        }
    }
}

impl EncodeLabelValue for EndpointFamily {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The labels of a request's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RequestLabels {
    family: EndpointFamily,
    method: &'static str,
    /// `2xx`, `4xx`, ...
    class: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> fmt::Result {
        [("family", self.family.as_str()), ("method", self.method), ("class", self.class)].encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct FamilyLabel {
    family: EndpointFamily,
}

impl EncodeLabelSet for FamilyLabel {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> fmt::Result {
        [("family", self.family.as_str())].encode(encoder)
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        // Any other method is one label value, not one per name a client makes up.
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    ["1xx", "2xx", "3xx", "4xx", "5xx"][(status / 100).clamp(1, 5) as usize - 1]
}

type Durations = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The figures this process measures as requests go by.
pub struct Metrics {
    durations: Durations,
    received: Family<FamilyLabel, Counter>,
    sent: Family<FamilyLabel, Counter>,
    gc_passes: Counter,
    gc_tags_untagged: Counter,
    gc_manifests_deleted: Counter,
    gc_links_removed: Counter,
    gc_blobs_deleted: Counter,
    gc_bytes_freed: Counter,
    /// Requests and latency over the last minutes, for the operations page's chart.
    pub(crate) recent: RecentRate,
}

/// How often [`RecentRate`] takes a sample, and how many it keeps (ten minutes).
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const SAMPLES_KEPT: usize = 300;

/// Requests answered and their summed latency, sampled every [`SAMPLE_EVERY`] by the
/// requests themselves (no timer task: an idle server takes no samples, and the next
/// sample spans the quiet time).
pub(crate) struct RecentRate {
    started: std::time::Instant,
    count: std::sync::atomic::AtomicU64,
    latency_us: std::sync::atomic::AtomicU64,
    /// Milliseconds after `started` when the next sample is due.
    due_ms: std::sync::atomic::AtomicU64,
    samples: std::sync::Mutex<std::collections::VecDeque<RateSample>>,
}

/// One sample: the interval ending at `at`, what was answered in it.
#[derive(Clone, Copy)]
pub(crate) struct RateSample {
    pub at: std::time::Instant,
    pub span: std::time::Duration,
    pub count: u64,
    pub latency_us: u64,
}

impl Default for RecentRate {
    fn default() -> Self {
        RecentRate {
            started: std::time::Instant::now(),
            count: Default::default(),
            latency_us: Default::default(),
            due_ms: std::sync::atomic::AtomicU64::new(SAMPLE_EVERY.as_millis() as u64),
            samples: Default::default(),
        }
    }
}

impl RecentRate {
    fn add(&self, took: std::time::Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.latency_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.sample_if_due();
    }

    /// Takes a sample if one is due (one caller wins the race to take it).
    fn sample_if_due(&self) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let due = self.due_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self
                .due_ms
                .compare_exchange(due, now_ms + SAMPLE_EVERY.as_millis() as u64, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let now = std::time::Instant::now();
        let (count, latency_us) = (self.count.swap(0, Ordering::AcqRel), self.latency_us.swap(0, Ordering::AcqRel));
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let since = samples.back().map_or(self.started, |s| s.at);
        samples.push_back(RateSample { at: now, span: now - since, count, latency_us });
        while samples.len() > SAMPLES_KEPT {
            samples.pop_front();
        }
    }

    /// The samples kept, oldest first (a sample due now is taken first).
    pub(crate) fn samples(&self) -> Vec<RateSample> {
        self.sample_if_due();
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            durations: Family::new_with_constructor(latency_histogram),
            received: Family::default(),
            sent: Family::default(),
            gc_passes: Counter::default(),
            gc_tags_untagged: Counter::default(),
            gc_manifests_deleted: Counter::default(),
            gc_links_removed: Counter::default(),
            gc_blobs_deleted: Counter::default(),
            gc_bytes_freed: Counter::default(),
            recent: RecentRate::default(),
        }
    }
}

impl Metrics {
    /// Garbage collection's figures since start, in words (for the operations page).
    pub(crate) fn collection_figures(&self) -> Vec<(String, String)> {
        vec![
            ("Collection passes since start".into(), self.gc_passes.get().to_string()),
            ("Bytes freed by them".into(), tessera_ui::bytes(self.gc_bytes_freed.get())),
            ("Blobs deleted".into(), self.gc_blobs_deleted.get().to_string()),
            ("Manifests deleted".into(), self.gc_manifests_deleted.get().to_string()),
            ("Tags untagged by retention".into(), self.gc_tags_untagged.get().to_string()),
        ]
    }

    /// Counts a finished garbage collection pass.
    pub fn collected(&self, done: &tessera_registry::gc::Collected) {
        if done.elsewhere {
            return;
        }
        self.gc_passes.inc();
        self.gc_tags_untagged.inc_by(done.tags_untagged.len() as u64);
        self.gc_manifests_deleted.inc_by(done.manifests_deleted);
        self.gc_links_removed.inc_by(done.links_removed);
        self.gc_blobs_deleted.inc_by(done.blobs_deleted);
        self.gc_bytes_freed.inc_by(done.bytes_freed);
    }

    /// Counts an answer: its latency (to the answer's head; a body streams afterwards at
    /// whatever pace the client reads) and the request body's bytes.
    pub(crate) fn answered(
        &self,
        family: EndpointFamily,
        method: &Method,
        status: u16,
        took: std::time::Duration,
        body_bytes: u64,
    ) {
        let labels = RequestLabels { family, method: method_label(method), class: status_class(status) };
        self.durations.get_or_create(&labels).observe(took.as_secs_f64());
        self.recent.add(took);
        if body_bytes > 0 {
            self.received.get_or_create(&FamilyLabel { family }).inc_by(body_bytes);
        }
    }

    /// The counter of bytes sent in answers of `family`, for the answer's body to count as
    /// it streams.
    pub(crate) fn sent(&self, family: EndpointFamily) -> Counter {
        self.sent.get_or_create_owned(&FamilyLabel { family })
    }

    /// The exposition text for this process, `federation`'s caches and `registry`'s stores.
    pub(crate) fn render(
        &self,
        federation: &Federation,
        registry: &tessera_registry::Registry,
        notifier: Option<&crate::notify::Notifier>,
        quotas: &[tessera_registry::quota::QuotaUse],
        syncs: &[std::sync::Arc<tessera_federation::sync::SyncJob>],
    ) -> String {
        let mut exposition = Registry::default();
        exposition.register(
            "tessera_http_request_duration_seconds",
            "Time to answer a request (to the answer's head), by endpoint family, method and status class",
            self.durations.clone(),
        );
        exposition.register(
            "tessera_http_request_body_bytes",
            "Bytes of request bodies received, by endpoint family",
            self.received.clone(),
        );
        exposition.register(
            "tessera_http_response_body_bytes",
            "Bytes of answer bodies sent, by endpoint family",
            self.sent.clone(),
        );
        for (name, help, counter) in [
            ("tessera_gc_passes", "Garbage collection passes finished", &self.gc_passes),
            ("tessera_retention_tags_untagged", "Tags retention rules untagged", &self.gc_tags_untagged),
            ("tessera_gc_manifests_deleted", "Untagged manifests nothing kept, deleted", &self.gc_manifests_deleted),
            ("tessera_gc_links_removed", "Unreferenced blob links removed", &self.gc_links_removed),
            ("tessera_gc_blobs_deleted", "Blobs whose bytes were deleted", &self.gc_blobs_deleted),
            ("tessera_gc_bytes_freed", "Bytes of blobs deleted", &self.gc_bytes_freed),
        ] {
            exposition.register(name, help, counter.clone());
        }
        exposition.register_collector(Box::new(Snapshot::take(federation, registry, notifier, quotas, syncs)));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &exposition) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

/// Picks one counter out of a cache's stats.
type CounterOf = fn(&tessera_federation::CacheStats) -> &std::sync::atomic::AtomicU64;

/// Figures read at one scrape from where they are kept.
#[derive(Debug, Default)]
struct Snapshot {
    families: Vec<Sampled>,
}

#[derive(Debug)]
struct Sampled {
    name: &'static str,
    help: &'static str,
    samples: Samples,
}

#[derive(Debug)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Seconds(f64),
    Gauge(Vec<(Labels, i64)>),
    Histogram(Vec<(Labels, Histogram)>),
}

impl Snapshot {
    fn take(
        federation: &Federation,
        registry: &tessera_registry::Registry,
        notifier: Option<&crate::notify::Notifier>,
        quotas: &[tessera_registry::quota::QuotaUse],
        syncs: &[std::sync::Arc<tessera_federation::sync::SyncJob>],
    ) -> Snapshot {
        let mut s = Snapshot::default();
        let mut caches: Vec<_> = federation.caches().collect();
        caches.sort_by_key(|(name, _)| *name);
        let by_upstream = |pick: &dyn Fn(&tessera_federation::CacheStats) -> u64| {
            caches.iter().map(|(name, cache)| (vec![("upstream", name.to_string())], pick(cache.stats()))).collect()
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        for (name, cache) in &caches {
            let stats = cache.stats();
            for (kind, hit, miss) in [
                ("manifest", &stats.manifest_hits, &stats.manifests_fetched),
                ("blob", &stats.blob_hits, &stats.blob_misses),
            ] {
                let labels = vec![("upstream", name.to_string()), ("kind", kind.to_string())];
                hits.push((labels.clone(), load(hit)));
                misses.push((labels, load(miss)));
            }
        }
        s.counter("tessera_cache_hits", "Requests answered from what the cache held, by kind", hits);
        s.counter("tessera_cache_misses", "Requests that had to fetch from the upstream, by kind", misses);
        let counters: [(&str, &str, CounterOf); 8] = [
            ("tessera_cache_manifests_fetched", "Manifests fetched from the upstream", |c| &c.manifests_fetched),
            ("tessera_cache_blobs_fetched", "Blobs fetched from the upstream, verified and kept", |c| &c.blobs_fetched),
            ("tessera_cache_blob_bytes_fetched", "Bytes of blobs fetched from the upstream", |c| &c.blob_bytes_fetched),
            ("tessera_cache_stale_served", "Cached answers served because the upstream failed", |c| &c.stale_served),
            ("tessera_cache_digest_mismatches", "Upstream content that did not match its digest (never kept)", |c| {
                &c.digest_mismatches
            }),
            ("tessera_cache_fetch_failures", "Blob fetches that failed", |c| &c.fetch_failures),
            ("tessera_cache_evictions", "Blobs evicted to keep the cache within its bound", |c| &c.evictions),
            ("tessera_cache_rate_limited", "Upstream 429 answers and requests held back by them", |c| &c.rate_limited),
        ];
        for (name, help, field) in counters {
            let samples = by_upstream(&|c| load(field(c)));
            s.counter(name, help, samples);
        }
        let held = caches.iter().map(|(name, cache)| (vec![("upstream", name.to_string())], cache.held_bytes()));
        let (held, bounds): (Vec<_>, Vec<_>) =
            held.map(|(labels, (held, bound))| ((labels.clone(), gauge(held)), (labels, gauge(bound)))).unzip();
        s.gauge("tessera_cache_held_bytes", "Bytes of blobs the cache holds", held);
        s.gauge("tessera_cache_max_bytes", "The cache's bound in bytes (0: none)", bounds);
        let mut latency = Vec::new();
        for (name, cache) in &caches {
            for (request, histogram) in UPSTREAM_REQUESTS.iter().zip(&cache.stats().upstream_latency.0) {
                latency
                    .push((vec![("upstream", name.to_string()), ("request", request.to_string())], histogram.clone()));
            }
        }
        s.families.push(Sampled {
            name: "tessera_upstream_request_duration_seconds",
            help: "Time an upstream took to answer (to its status line), by what was asked",
            samples: Samples::Histogram(latency),
        });
        let r = &federation.delivery.redirects;
        let redirects =
            [("cdn", &r.cdn), ("mirror", &r.mirror), ("external", &r.external), ("presigned", &r.presigned)]
                .into_iter()
                .map(|(kind, c)| (vec![("delivery", kind.to_string())], load(c)))
                .collect();
        s.counter("tessera_blob_redirects", "Blob GETs answered with a redirect, by delivery", redirects);
        let mirrors = federation
            .delivery
            .mirrors()
            .map(|m| (vec![("mirror", m.config.url.to_string())], i64::from(m.healthy())))
            .collect();
        s.gauge("tessera_mirror_healthy", "Whether a mirror passed its last health check", mirrors);
        // What requests cost the shared stores (a model of scale-out reads these).
        for (name, help, count) in [
            (
                "tessera_metadata_queries",
                "Statements and transactions sent to the metadata database",
                registry.metadata_queries(),
            ),
            (
                "tessera_metadata_write_transactions",
                "Write transactions among the metadata queries (they take turns in the database)",
                registry.metadata_writes(),
            ),
            (
                "tessera_object_store_requests",
                "Requests sent to the object store, retries included",
                registry.blob_store_requests(),
            ),
        ] {
            if let Some(count) = count {
                s.counter(name, help, vec![(Vec::new(), count)]);
            }
        }
        if let Some(notifier) = notifier {
            s.notifications(notifier);
        }
        if !quotas.is_empty() {
            let of = |pick: fn(&tessera_registry::quota::QuotaUse) -> u64| {
                quotas.iter().map(|q| (vec![("prefix", q.prefix.clone())], gauge(pick(q)))).collect()
            };
            s.gauge(
                "tessera_quota_used_bytes",
                "Bytes stored under a quota's prefix (each blob once)",
                of(|q| q.used_bytes),
            );
            s.gauge("tessera_quota_max_bytes", "A quota's bound in bytes", of(|q| q.max_bytes));
        }
        if !syncs.is_empty() {
            s.syncs(syncs);
        }
        if !federation.signing.is_empty() {
            let st = &federation.signing.stats;
            let outcomes =
                [("checked", &st.checked), ("refused", &st.refused), ("unsigned_served", &st.unsigned_served)]
                    .into_iter()
                    .map(|(outcome, c)| (vec![("outcome", outcome.to_string())], load(c)))
                    .collect();
            s.counter(
                "tessera_signature_checks",
                "Manifests whose signatures a [[signatures]] rule checked, refused, or found unsigned and served",
                outcomes,
            );
        }
        s.process();
        s
    }

    fn syncs(&mut self, syncs: &[std::sync::Arc<tessera_federation::sync::SyncJob>]) {
        let job = |j: &tessera_federation::sync::SyncJob| vec![("sync", j.name.clone())];
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut images = Vec::new();
        for j in syncs {
            let s = &j.stats;
            for (result, count) in
                [("synced", &s.images_synced), ("present", &s.images_present), ("failed", &s.images_failed)]
            {
                let mut labels = job(j);
                labels.push(("result", result.to_string()));
                images.push((labels, load(count)));
            }
        }
        let passes = syncs.iter().map(|j| (job(j), load(&j.stats.passes))).collect();
        let bytes = syncs.iter().map(|j| (job(j), load(&j.stats.bytes_fetched))).collect();
        let last = syncs.iter().map(|j| (job(j), gauge(load(&j.stats.last_success)))).collect();
        self.counter("tessera_sync_passes", "Sync passes finished", passes);
        self.counter("tessera_sync_images", "Images a sync pass brought, found in place, or failed", images);
        self.counter("tessera_sync_bytes_fetched", "Blob bytes sync passes fetched from the upstream", bytes);
        self.gauge(
            "tessera_sync_last_success_timestamp_seconds",
            "When the last sync pass without a failure ended (0: never)",
            last,
        );
    }

    fn notifications(&mut self, notifier: &crate::notify::Notifier) {
        let mut events = Vec::new();
        let mut failures = Vec::new();
        let mut waiting = Vec::new();
        for (name, queued, stats) in notifier.figures() {
            let endpoint = || vec![("endpoint", name.to_string())];
            for (result, count) in [("delivered", &stats.delivered), ("dropped", &stats.dropped)] {
                let mut labels = endpoint();
                labels.push(("result", result.to_string()));
                events.push((labels, count.load(Ordering::Relaxed)));
            }
            failures.push((endpoint(), stats.failed_attempts.load(Ordering::Relaxed)));
            waiting.push((endpoint(), gauge(queued as u64)));
        }
        self.counter(
            "tessera_notify_events",
            "Notification events delivered to an endpoint, or dropped (its queue was full)",
            events,
        );
        self.counter("tessera_notify_failed_attempts", "Deliveries an endpoint did not accept (retried)", failures);
        self.gauge("tessera_notify_queued_events", "Notification events waiting on disk for an endpoint", waiting);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.families.push(Sampled { name, help, samples: Samples::Counter(samples) });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, i64)>) {
        self.families.push(Sampled { name, help, samples: Samples::Gauge(samples) });
    }

    /// The standard process figures (the names every Prometheus client library uses).
    fn process(&mut self) {
        let Some(p) = process::read() else { return };
        self.families.push(Sampled {
            name: "process_cpu_seconds",
            help: "User and system CPU time spent in seconds",
            samples: Samples::Seconds(p.cpu_seconds),
        });
        for (name, help, value) in [
            ("process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", p.virtual_bytes),
            ("process_open_fds", "Number of open file descriptors", p.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", p.max_fds),
            ("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds", p.start_time),
            ("process_threads", "Number of OS threads in the process", p.threads),
        ] {
            self.gauge(name, help, vec![(Vec::new(), gauge(value))]);
        }
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for family in &self.families {
            let kind = match family.samples {
                Samples::Counter(_) | Samples::Seconds(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram(_) => MetricType::Histogram,
            };
            // Help texts end with a full stop, as `Registry::register` writes them.
            let help = format!("{}.", family.help);
            let mut metric = encoder.encode_descriptor(family.name, &help, None, kind)?;
            match &family.samples {
                Samples::Seconds(v) => ConstCounter::new(*v).encode(metric)?,
                Samples::Counter(samples) => match samples.as_slice() {
                    [(labels, v)] if labels.is_empty() => ConstCounter::new(*v).encode(metric)?,
                    _ => {
                        for (labels, v) in samples {
                            ConstCounter::new(*v).encode(metric.encode_family(labels)?)?;
                        }
                    }
                },
                Samples::Gauge(samples) => match samples.as_slice() {
                    [(labels, v)] if labels.is_empty() => ConstGauge::new(*v).encode(metric)?,
                    _ => {
                        for (labels, v) in samples {
                            ConstGauge::new(*v).encode(metric.encode_family(labels)?)?;
                        }
                    }
                },
                Samples::Histogram(samples) => {
                    for (labels, histogram) in samples {
                        histogram.encode(metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The process's own figures, from Linux's `/proc` (elsewhere there are none).
mod process {
    pub(super) struct Figures {
        pub cpu_seconds: f64,
        pub resident_bytes: u64,
        pub virtual_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
        pub start_time: u64,
        pub threads: u64,
    }

    #[cfg(target_os = "linux")]
    pub(super) fn read() -> Option<Figures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields count from its end.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // `fields[0]` is field 3 of proc(5).
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        // SAFETY: sysconf and getrlimit only read process constants into plain integers.
        let (ticks, page, max_fds) = unsafe {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            let max_fds = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 0 };
            (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE), max_fds)
        };
        let (ticks, page) = (u64::try_from(ticks).ok().filter(|t| *t > 0)?, u64::try_from(page).ok()?);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))?;
        Some(Figures {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks as f64,
            threads: field(20)?,
            start_time: boot + field(22)? / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0),
            max_fds,
        })
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn read() -> Option<Figures> {
        None
    }
}
