//! Assembly: the one place that turns a [`Config`] into stores, a registry, an HTTP app and a
//! running listener. `main` and the tests both come through here.

mod explain;
#[cfg(feature = "testing")]
pub mod testing;

pub use explain::{explain, explain_live};

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_config::Config;
use tessera_federation::Federation;
use tessera_http::AppState;
use tessera_http::auth::IssuerKeys;
use tessera_http::server::{CertStore, ServerOptions};
use tessera_registry::{Registry, Settings};
use tessera_store::{
    BlobStore, CachedBlobStore, CachedMetaStore, FsBlobStore, MetaStore, PostgresMetaStore, S3BlobStore, S3Settings,
    SqliteMetaStore,
};

/// Where blob bytes live: under the data directory (the default), or in the S3-compatible
/// bucket of `[storage.s3]`.
#[derive(Clone)]
enum BlobHome {
    Data(std::path::PathBuf),
    Bucket(Box<S3BlobStore>),
}

impl BlobHome {
    async fn open(config: &Config) -> anyhow::Result<BlobHome> {
        let Some(s3) = &config.storage.s3 else { return Ok(BlobHome::Data(config.data.clone())) };
        let http = tessera_client::upstream::content_client(false)?;
        let store = S3BlobStore::open(s3_settings(s3)?, http)
            .await
            .with_context(|| format!("cannot open the blob store s3://{}/{}", s3.bucket, s3.prefix))?;
        Ok(BlobHome::Bucket(Box::new(store)))
    }

    /// The hosted registry's blobs, behind the in-memory blob cache when it is on.
    fn hosted(&self, config: &Config) -> anyhow::Result<Arc<dyn BlobStore>> {
        fn cached<B: BlobStore>(blobs: B, config: &Config) -> Arc<dyn BlobStore> {
            if config.cache.blob_bytes > 0 {
                Arc::new(CachedBlobStore::new(blobs, config.cache.blob_bytes, config.cache.blob_max_item_bytes))
            } else {
                Arc::new(blobs)
            }
        }
        Ok(match self {
            BlobHome::Data(data) => cached(
                FsBlobStore::open(data).with_context(|| format!("cannot open blob store in {}", data.display()))?,
                config,
            ),
            BlobHome::Bucket(bucket) => cached(S3BlobStore::clone(bucket), config),
        })
    }

    /// The blobs of upstream `name`'s cache: `<cache_dir>/<name>/`, or the bucket's
    /// `cache/<name>/`.
    fn cache(&self, cache_dir: &std::path::Path, name: &str) -> std::io::Result<Arc<dyn BlobStore>> {
        Ok(match self {
            BlobHome::Data(_) => Arc::new(FsBlobStore::open(cache_dir.join(name))?),
            BlobHome::Bucket(bucket) => Arc::new(bucket.under(&format!("cache/{name}"))),
        })
    }
}

/// The store settings of `[storage.s3]`, credentials read from their files or the
/// environment.
fn s3_settings(s3: &tessera_config::S3) -> anyhow::Result<S3Settings> {
    let secret = |file: &Option<std::path::PathBuf>, var: &str| -> anyhow::Result<Option<String>> {
        match file {
            Some(path) => Ok(Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .trim()
                    .to_string(),
            )),
            None => Ok(std::env::var(var).ok()),
        }
    };
    let endpoint = match &s3.endpoint {
        Some(url) => Some(url.parse().with_context(|| format!("[storage.s3] endpoint {url:?}"))?),
        None => None,
    };
    Ok(S3Settings {
        path_style: s3.path_style.unwrap_or(endpoint.is_some()),
        endpoint,
        region: s3.region.clone(),
        bucket: s3.bucket.clone(),
        prefix: s3.prefix.clone(),
        access_key_id: secret(&s3.access_key_id_file, "AWS_ACCESS_KEY_ID")?,
        secret_access_key: secret(&s3.secret_access_key_file, "AWS_SECRET_ACCESS_KEY")?,
    })
}

/// Opens the hosted registry: metadata in PostgreSQL (`[storage.postgres]`) or in
/// `config.data`, blobs in `blobs`.
async fn open_registry(config: &Config, blobs: &BlobHome) -> anyhow::Result<Registry> {
    let data = &config.data;
    std::fs::create_dir_all(data).with_context(|| format!("cannot create data directory {}", data.display()))?;
    if let Some(pg) = &config.storage.postgres {
        // Other nodes may share the database: this one joins them, its cache hearing of
        // their changes, its upload sessions and collections locked against theirs.
        let meta = Arc::new(CachedMetaStore::new(open_postgres(pg).await?, config.cache.metadata_bytes));
        let hearing = Arc::downgrade(&meta);
        let on_news = Arc::new(move |news| {
            if let Some(meta) = hearing.upgrade() {
                meta.hear(news);
            }
        });
        let poll = Duration::from_millis(pg.changes_poll_ms.max(10));
        let cluster = meta
            .inner()
            .join_cluster(poll, on_news)
            .await
            .context("cannot start coordinating with other nodes through the metadata database")?;
        return Ok(Registry::new(blobs.hosted(config)?, meta, registry_settings(config))
            .in_cluster(Arc::new(cluster))
            .with_quotas(quotas(config)));
    }
    let meta = SqliteMetaStore::open(&data.join("meta.sqlite"))
        .with_context(|| format!("cannot open metadata in {}", data.display()))?;
    registry_over(config, meta, blobs)
}

/// Connects to the metadata database of `[storage.postgres]`.
async fn open_postgres(pg: &tessera_config::Postgres) -> anyhow::Result<PostgresMetaStore> {
    let url = match (&pg.url, &pg.url_file) {
        (Some(url), _) => url.clone(),
        (None, Some(file)) => {
            std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?.trim().to_string()
        }
        (None, None) => anyhow::bail!("[storage.postgres] needs url or url_file"),
    };
    // The URL may hold a password: messages name the server only.
    let tls = tessera_client::upstream::tls_config(pg.ca_file.as_deref())?;
    PostgresMetaStore::connect(&url, pg.schema.as_deref(), Some(tls))
        .await
        .with_context(|| format!("cannot open the metadata database {}", PostgresMetaStore::server_of(&url)))
}

/// The hosted registry over `blobs` and `meta`.
fn registry_over<M: MetaStore>(config: &Config, meta: M, blobs: &BlobHome) -> anyhow::Result<Registry> {
    let meta = CachedMetaStore::new(meta, config.cache.metadata_bytes);
    Ok(Registry::new(blobs.hosted(config)?, Arc::new(meta), registry_settings(config)).with_quotas(quotas(config)))
}

/// The `[[retention]]` rules (validated with the configuration).
fn retention_rules(config: &Config) -> Vec<tessera_registry::retention::RetentionRule> {
    let rule = |r: &tessera_config::Retention| tessera_registry::retention::RetentionRule {
        prefix: r.prefix.trim_matches('/').to_string(),
        matching: r.tags.clone(),
        keep_newest: r.keep_newest,
        older_than: r.older_than_secs().ok().flatten().map(Duration::from_secs),
        protect: r.protect.clone(),
    };
    config.retention.iter().map(rule).collect()
}

fn quotas(config: &Config) -> Vec<tessera_registry::quota::Quota> {
    let quota = |q: &tessera_config::Quota| tessera_registry::quota::Quota {
        prefix: q.prefix.trim_matches('/').to_string(),
        max_bytes: q.max_bytes,
    };
    config.quotas.iter().map(quota).collect()
}

fn registry_settings(config: &Config) -> Settings {
    Settings {
        manifest_max_bytes: config.limits.manifest_max_bytes,
        blob_max_bytes: config.limits.blob_max_bytes,
        delete_enabled: config.storage.delete_enabled,
    }
}

/// Runs at start-up, before any request: what a crash or a stop cut off is finished or
/// removed.
async fn recover(registry: &Registry, config: &Config) -> anyhow::Result<()> {
    let finished = registry.finish_interrupted_collection().await.context("cannot finish garbage collection")?;
    if finished > 0 {
        tracing::info!("deleted {finished} blob(s) an interrupted garbage collection had doomed");
    }
    // Record-less sessions are monolithic uploads a crash cut off, unless other nodes share
    // the stores: theirs may be in flight, so they get the grace period.
    let orphan_after = match config.storage.postgres {
        Some(_) => Duration::from_secs(config.storage.gc_grace_secs),
        None => Duration::ZERO,
    };
    let swept = registry
        .sweep_uploads(Duration::from_secs(config.storage.upload_expiry_secs), orphan_after, false)
        .await
        .context("cannot sweep upload sessions")?;
    if swept > 0 {
        tracing::info!("removed {swept} abandoned upload session(s)");
    }
    Ok(())
}

/// Opens the embedded default stores under `config.data` and builds the application state.
pub async fn open_state(config: &Config) -> anyhow::Result<AppState> {
    let blobs = BlobHome::open(config).await?;
    let registry = Arc::new(open_registry(config, &blobs).await?);
    let federation = open_federation(config, None, registry.clone()).await?;
    recover(&registry, config).await?;
    let (auth, jwks) = open_auth(config)?;
    start_jwks_fetching(jwks).await?;
    let limits = tessera_http::limits::ClientLimits::new(
        config.limits.requests_per_second_per_client,
        config.limits.uploads_per_client,
        Duration::from_secs(config.limits.body_idle_timeout_secs.max(1)),
    )
    .with_request_timeout(Duration::from_secs(config.limits.request_timeout_secs));
    Ok(AppState {
        registry,
        federation: arc_swap::ArcSwap::from_pointee(federation),
        metrics: Default::default(),
        auth,
        limits,
        anonymous_writes: anonymous_writes(config),
        notifier: tessera_http::notify::Notifier::start(&config.notify, &config.data)
            .context("cannot open the notification queues")?,
        syncs: tessera_federation::sync::jobs(config).map_err(anyhow::Error::msg)?,
        ui: open_ui(config)?,
    })
}

/// The web pages' settings, when they are on: as configured, else on loopback listeners
/// only (elsewhere they would show any visitor what the registry holds before an operator
/// chose to).
fn open_ui(config: &Config) -> anyhow::Result<Option<tessera_http::UiSettings>> {
    if !config.ui.enabled.unwrap_or_else(|| config.listen.ip().is_loopback()) {
        return Ok(None);
    }
    let lifetime = Duration::from_secs(config.ui.session_hours.max(1) * 3600);
    let session = match &config.ui.session_key_file {
        Some(file) => {
            let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            tessera_access::session::SessionKey::from_bytes(&bytes, lifetime)
                .map_err(|e| anyhow::anyhow!("[ui] session_key_file {}: {e}", file.display()))?
        }
        None => tessera_access::session::SessionKey::random(lifetime),
    };
    Ok(Some(tessera_http::UiSettings { session, tls: config.tls.is_some() }))
}

/// Whether anonymous clients may write when no login is configured: as configured, else
/// only on loopback listeners (the zero-config default stays open where only this machine
/// can reach it).
fn anonymous_writes(config: &Config) -> bool {
    config.anonymous_writes.unwrap_or_else(|| config.listen.ip().is_loopback())
}

/// The login step: users from the htpasswd file, rights from the `[[access]]` rules.
fn open_auth(config: &Config) -> anyhow::Result<(Option<tessera_http::auth::Auth>, Vec<JwksSource>)> {
    use tessera_access::{Access, Action, Logins, Rule};
    let Some(auth) = &config.auth else {
        if !config.listen.ip().is_loopback() {
            if anonymous_writes(config) {
                tracing::warn!(
                    "no login on {} and anonymous_writes = true: anyone who can reach it may push and delete",
                    config.listen
                );
            } else {
                tracing::warn!(
                    "no login on {}: pulls are open, pushes and deletes refused; configure [auth] (docs/security.md)",
                    config.listen
                );
            }
        }
        return Ok((None, Vec::new()));
    };
    let htpasswd = read_users(&auth.htpasswd)?;
    let rules = config
        .access
        .iter()
        .map(|r| Rule {
            prefix: r.prefix.clone(),
            allow: [(Action::Pull, r.pull.clone()), (Action::Push, r.push.clone()), (Action::Delete, r.delete.clone())]
                .into_iter()
                .collect(),
        })
        .collect();
    let tokens = if auth.token {
        let key = auth.token_key.clone().unwrap_or_else(|| config.data.join("token-key.p8"));
        let ttl = std::time::Duration::from_secs(auth.token_ttl_secs);
        Some(
            tessera_access::token::TokenIssuer::open(&key, &auth.issuer, &auth.realm, ttl)
                .map_err(anyhow::Error::msg)?,
        )
    } else {
        None
    };
    tracing::info!(
        "login required ({}): {} user(s) from {}",
        if tokens.is_some() { "token flow" } else { "basic" },
        htpasswd.len(),
        auth.htpasswd.display()
    );
    let mut fetched = Vec::new();
    let trusted = auth
        .trusted_issuer
        .iter()
        .map(|t| {
            let keys = match (&t.jwks_file, &t.jwks_url) {
                (Some(file), _) => {
                    let text =
                        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
                    let jwks: serde_json::Value =
                        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
                    let keys = tessera_access::token::jwks_keys(&jwks)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                    Arc::new(IssuerKeys::new(keys))
                }
                (None, url) => {
                    let keys = Arc::new(IssuerKeys::default());
                    let url = url.clone().context("a trusted issuer needs jwks_file or jwks_url")?;
                    let refresh = Duration::from_secs(t.jwks_refresh_secs);
                    fetched.push(JwksSource { issuer: t.issuer.clone(), url, refresh, keys: keys.clone() });
                    keys
                }
            };
            Ok(tessera_http::auth::TrustedIssuer { issuer: t.issuer.clone(), audience: t.audience.clone(), keys })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let auth = tessera_http::auth::Auth::new(
        Logins::new(htpasswd),
        Access::with_groups(rules, auth.groups.clone()),
        auth.realm.clone(),
        tokens,
        trusted,
        config.tls.is_some(),
    )
    .with_failed_logins_per_minute(config.limits.failed_logins_per_minute_per_client);
    Ok((Some(auth), fetched))
}

/// The users of an htpasswd file, which must list at least one.
fn read_users(path: &std::path::Path) -> anyhow::Result<tessera_access::Htpasswd> {
    let htpasswd = tessera_access::Htpasswd::from_file(path).map_err(anyhow::Error::msg)?;
    if htpasswd.is_empty() {
        anyhow::bail!("{} lists no users", path.display());
    }
    Ok(htpasswd)
}

/// A trusted issuer's JWKS to keep fetching.
struct JwksSource {
    issuer: String,
    url: String,
    refresh: Duration,
    keys: Arc<IssuerKeys>,
}

/// A JWKS larger than this is refused (real ones are a few KiB).
const JWKS_MAX_BYTES: usize = 1 << 20;
/// One fetch, connection to last byte.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed fetch, the next try comes this soon.
const JWKS_RETRY: Duration = Duration::from_secs(30);
/// Tokens naming unknown keys ask for a fetch at most this often (anyone can send such a
/// token; the issuer must not be hammered for it).
const JWKS_MIN_SPACING: Duration = Duration::from_secs(2);

impl JwksSource {
    /// Fetches the document and replaces the keys; a failure keeps the keys there were.
    async fn fetch(&self, http: &reqwest::Client) -> bool {
        let result = async {
            let response = http.get(&self.url).send().await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let body = tessera_federation::cache::read_limited(response, JWKS_MAX_BYTES).await?;
            let jwks: serde_json::Value = serde_json::from_slice(&body).map_err(|_| "not JSON".to_string())?;
            tessera_access::token::jwks_keys(&jwks)
        };
        // Bounded as a whole: a server trickling bytes must not stop every later refresh.
        let result = tokio::time::timeout(JWKS_FETCH_TIMEOUT, result)
            .await
            .unwrap_or_else(|_| Err(format!("no whole answer within {JWKS_FETCH_TIMEOUT:?}")));
        match result {
            Ok(keys) => {
                tracing::info!(issuer = %self.issuer, "fetched {} key(s) from {}", keys.len(), self.url);
                self.keys.replace(keys);
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, "cannot fetch the JWKS from {}: {e}; keeping the keys there were", self.url);
                false
            }
        }
    }

    /// Fetches now (telling `first` when done), then again every `refresh` (every
    /// `JWKS_RETRY` while failing), and soon after a token names a key not in the set.
    async fn keep_fresh(self, http: reqwest::Client, first: tokio::sync::oneshot::Sender<()>) {
        let mut ok = self.fetch(&http).await;
        let _ = first.send(());
        let mut last = tokio::time::Instant::now();
        loop {
            let wait = if ok { self.refresh } else { JWKS_RETRY };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.keys.unknown_key.notified() => {
                    tokio::time::sleep_until(last + JWKS_MIN_SPACING).await;
                }
            }
            ok = self.fetch(&http).await;
            last = tokio::time::Instant::now();
        }
    }
}

/// Fetches every JWKS, all at once, and waits for them (so tokens work from the first
/// request; an issuer that cannot be reached delays start-up by one fetch timeout at most
/// and costs only its own tokens), then keeps each fresh in the background.
async fn start_jwks_fetching(sources: Vec<JwksSource>) -> anyhow::Result<()> {
    if sources.is_empty() {
        return Ok(());
    }
    // A JWKS lives where it is configured: no redirect takes the fetch elsewhere.
    let http = tessera_federation::upstream::content_client(false)?;
    let mut fetched = Vec::new();
    for source in sources {
        let (done, first) = tokio::sync::oneshot::channel();
        tokio::spawn(source.keep_fresh(http.clone(), done));
        fetched.push(first);
    }
    for first in fetched {
        let _ = first.await;
    }
    Ok(())
}

/// On SIGHUP: the TLS certificate is read again (new handshakes use it), and with `reload`
/// the routing table is rebuilt. Whatever fails keeps what was serving.
async fn reload_on_hangup(
    state: Arc<AppState>,
    running: Config,
    reload: Option<Reload>,
    certs: Option<Arc<CertStore>>,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP; configuration reload is off: {e}");
            return;
        }
    };
    let reload = reload.map(Arc::new);
    let running = Arc::new(running);
    while hangups.recv().await.is_some() {
        // Reading files, parsing them, loading Crane directories and opening cache stores is
        // blocking work: it runs on the blocking pool, never on a thread serving requests.
        let (state, running, reload, certs) = (state.clone(), running.clone(), reload.clone(), certs.clone());
        let runtime = tokio::runtime::Handle::current();
        let done = tokio::task::spawn_blocking(move || {
            reload_once(&runtime, &state, &running, reload.as_deref(), certs.as_deref())
        })
        .await;
        if let Err(e) = done {
            tracing::error!("configuration reload failed to run: {e}");
        }
    }
}

/// One reload (SIGHUP): the TLS certificate, the htpasswd file's users, then the routing
/// table; what fails to load is logged and the previous one keeps serving.
fn reload_once(
    runtime: &tokio::runtime::Handle,
    state: &Arc<AppState>,
    running: &Config,
    reload: Option<&Reload>,
    certs: Option<&CertStore>,
) {
    if let Some(certs) = certs {
        match certs.reload() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => tracing::error!("TLS certificate not reloaded; the previous one keeps serving: {e}"),
        }
    }
    if let (Some(auth), Some(configured)) = (&state.auth, &running.auth) {
        match read_users(&configured.htpasswd) {
            Ok(htpasswd) => {
                let count = htpasswd.len();
                auth.replace_users(tessera_access::Logins::new(htpasswd));
                tracing::info!("users reloaded: {count} from {}", configured.htpasswd.display());
            }
            Err(e) => tracing::error!("users not reloaded; the previous ones keep their logins: {e:#}"),
        }
    }
    let Some(reload) = reload else { return };
    let reloaded = (|| {
        let new = reload()?;
        // Only the routing table is live; listener, data and limits need a restart.
        let mut effective = running.clone();
        effective.upstreams = new.upstreams;
        effective.routes = new.routes;
        effective.fallback = new.fallback;
        let previous = state.federation.load();
        let federation = runtime.block_on(open_federation(&effective, Some(&previous), state.registry.clone()))?;
        anyhow::Ok((federation, effective))
    })();
    match reloaded {
        Ok((federation, effective)) => {
            state.federation.store(Arc::new(federation));
            tracing::info!(
                "configuration reloaded: {} upstream(s), {} route(s)",
                effective.upstreams.len(),
                effective.routes.len()
            );
        }
        Err(e) => tracing::error!("configuration not reloaded; the previous routing table keeps serving: {e:#}"),
    }
}

/// The routing table, an upstream client per `[[upstream]]`, and each upstream's cache:
/// its metadata in `<data>/cache/<name>/`, its blobs there too or under the bucket's
/// `cache/<name>/` (its own stores, so eviction touches nothing else).
async fn open_federation(
    config: &Config,
    previous: Option<&Federation>,
    hosted: Arc<Registry>,
) -> anyhow::Result<Federation> {
    let blobs = BlobHome::open(config).await?;
    open_federation_in(config, previous, hosted, &config.data.join("cache"), &blobs).await
}

/// [`open_federation`] with the upstream caches' metadata under `cache_dir` and their
/// blobs in `blobs`.
async fn open_federation_in(
    config: &Config,
    previous: Option<&Federation>,
    hosted: Arc<Registry>,
    cache_dir: &std::path::Path,
    blobs: &BlobHome,
) -> anyhow::Result<Federation> {
    let metadata_bytes = config.cache.metadata_bytes;
    let federation = Federation::new(config, previous, hosted, |name| {
        let dir = cache_dir.join(name);
        let cache_blobs = blobs.cache(cache_dir, name)?;
        std::fs::create_dir_all(&dir)?;
        let meta = SqliteMetaStore::open(&dir.join("meta.sqlite"))?;
        Ok((Arc::new(CachedMetaStore::new(meta, metadata_bytes / 4)) as Arc<dyn MetaStore>, cache_blobs))
    })
    .await?;
    Ok(federation)
}

/// Takes the data directory for this process alone (an exclusive lock on
/// `<data>/tessera.lock`, released when the returned file is dropped or the process ends):
/// two servers, or a server and an offline collection, must never share one.
pub fn lock_data_dir(data: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create data directory {}", data.display()))?;
    let path = data.join("tessera.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another tessera process (a running server collects garbage itself, see gc_interval_secs)",
            data.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// One garbage collection pass over the hosted store under `config.data`, with no server
/// running on it. A dry run collects on a copy of the metadata and deletes no file, so it
/// reports what the same pass would do; neither touches a directory that holds no data.
pub async fn collect_garbage(
    config: &Config,
    grace: Duration,
    dry_run: bool,
) -> anyhow::Result<tessera_registry::gc::Collected> {
    let database = config.data.join("meta.sqlite");
    let shared = config.storage.postgres.is_some();
    if !shared && !database.is_file() {
        anyhow::bail!("{} holds no Tessera data (no meta.sqlite)", config.data.display());
    }
    if shared && dry_run {
        anyhow::bail!(
            "a dry run collects on a copy of the metadata, which only the embedded SQLite store can make; \
             with [storage.postgres], run a pass without --dry-run (the grace period keeps what is still wanted)"
        );
    }
    let _lock = lock_data_dir(&config.data)?;
    let how = tessera_registry::gc::Collect {
        grace,
        upload_expiry: Duration::from_secs(config.storage.upload_expiry_secs),
        // No server on this data directory, so no upload in flight: sessions without a
        // record are leftovers; a shared database may have servers elsewhere, so there
        // they get the grace period, as a running server gives them.
        orphan_uploads_after: if shared { grace } else { Duration::ZERO },
        untagged: config.storage.gc_untagged,
        retention: retention_rules(config),
        dry_run,
    };
    // The pass itself finishes what an interrupted one doomed, so a dry run counts it too.
    let blobs = BlobHome::open(config).await?;
    if !dry_run {
        let registry = open_registry(config, &blobs).await?;
        return registry.collect_garbage(&how).await.context("garbage collection failed");
    }
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let copy = scratch.path().join("meta.sqlite");
    SqliteMetaStore::copy_database(&database, &copy).context("cannot copy the metadata")?;
    let registry = registry_over(config, SqliteMetaStore::open(&copy)?, &blobs)?;
    registry.collect_garbage(&how).await.context("garbage collection (dry run) failed")
}

/// Runs `job` at start-up and every `interval` while the server runs.
async fn sync_periodically(state: Arc<AppState>, job: Arc<tessera_federation::sync::SyncJob>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        run_sync(&state, &job).await;
    }
}

/// One pass of `job` on the current routing table, logged.
pub async fn run_sync(
    state: &AppState,
    job: &tessera_federation::sync::SyncJob,
) -> Option<tessera_federation::sync::SyncReport> {
    // With other nodes on the same stores, one of them runs each job's pass.
    let _lease = match state.registry.cluster() {
        Some(cluster) => match cluster.try_lock(&format!("sync/{}", job.name)).await {
            Ok(Some(guard)) => Some(guard),
            Ok(None) => {
                tracing::debug!(sync = job.name, "sync pass left to the node running it");
                return None;
            }
            Err(e) => {
                tracing::warn!(sync = job.name, "cannot coordinate the sync pass with other nodes: {e}");
                return None;
            }
        },
        None => None,
    };
    let federation = state.federation.load_full();
    match federation.sync(job, &state.registry).await {
        Ok(r) => {
            tracing::info!(
                sync = job.name,
                synced = r.synced,
                present = r.present,
                failed = r.failed,
                bytes_fetched = r.bytes_fetched,
                "sync pass"
            );
            Some(r)
        }
        Err(e) => {
            tracing::warn!(sync = job.name, "sync pass failed: {}", e.message);
            None
        }
    }
}

/// One pass of each `[[sync]]` job of `config` (those named in `only`, if any), with no
/// server running on its data directory.
pub async fn sync_once(
    config: &Config,
    only: &[String],
) -> anyhow::Result<Vec<(String, Option<tessera_federation::sync::SyncReport>)>> {
    let _lock = lock_data_dir(&config.data)?;
    let state = open_state(config).await?;
    if let Some(unknown) = only.iter().find(|n| !state.syncs.iter().any(|j| &j.name == *n)) {
        anyhow::bail!("no [[sync]] named {unknown:?}");
    }
    let mut reports = Vec::new();
    for job in state.syncs.iter().filter(|j| only.is_empty() || only.contains(&j.name)) {
        reports.push((job.name.clone(), run_sync(&state, job).await));
    }
    Ok(reports)
}

/// Collects garbage every `gc_interval_secs` while the server runs.
async fn collect_garbage_periodically(
    state: Arc<AppState>,
    storage: tessera_config::Storage,
    retention: Vec<tessera_registry::retention::RetentionRule>,
) {
    let period = Duration::from_secs(storage.gc_interval_secs);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let grace = Duration::from_secs(storage.gc_grace_secs);
        let how = tessera_registry::gc::Collect {
            grace,
            upload_expiry: Duration::from_secs(storage.upload_expiry_secs),
            orphan_uploads_after: grace,
            untagged: storage.gc_untagged,
            retention: retention.clone(),
            dry_run: false,
        };
        match state.registry.collect_garbage(&how).await {
            Ok(done) if done.elsewhere => tracing::debug!("garbage collection pass left to the node running one"),
            Ok(done) => {
                tracing::info!(
                    tags_untagged = done.tags_untagged.len(),
                    manifests_deleted = done.manifests_deleted,
                    links_removed = done.links_removed,
                    blobs_deleted = done.blobs_deleted,
                    bytes_freed = done.bytes_freed,
                    uploads_removed = done.uploads_removed,
                    "garbage collection pass"
                );
                state.metrics.collected(&done);
            }
            Err(e) => tracing::warn!("garbage collection pass failed: {e}"),
        }
    }
}

/// The connection limits of `limits`, within what the open-file limit (raised to its hard
/// limit first, as Go programs such as Distribution do) leaves: each busy connection may
/// hold a socket and a file, and some descriptors stay for the store and upstreams.
fn connection_limits(limits: &tessera_config::Limits) -> tessera_http::connections::ConnectionLimits {
    let soft = usize::try_from(raise_open_file_limit(0)).unwrap_or(usize::MAX);
    let allowed = (soft.saturating_sub(128) / 2).max(16);
    let total = if limits.connections == 0 { allowed } else { limits.connections.min(allowed) };
    if limits.connections > allowed && limits.connections != tessera_config::Limits::default().connections {
        tracing::warn!(
            "[limits] connections = {} is more than the open-file limit allows; serving at most {total}",
            limits.connections
        );
    }
    tessera_http::connections::ConnectionLimits { total, per_client: limits.connections_per_client }
}

/// Raises this process's open-file limit: to `wanted` where that is allowed (past the hard
/// limit only with the privilege to raise it), else the soft limit to the hard one. Returns
/// the soft limit now.
pub fn raise_open_file_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        let most = limit.rlim_max.max(wanted);
        for raised in [most, limit.rlim_max] {
            let raised = libc::rlimit { rlim_cur: raised, rlim_max: raised };
            if raised.rlim_cur > limit.rlim_cur && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// Produces the configuration again from its sources, for a reload.
pub type Reload = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// Runs the server until `shutdown` resolves. With `reload`, SIGHUP builds the configuration
/// again and swaps in its routing table (upstreams, routes, fallback); requests in flight
/// finish on the table they started with, and an invalid configuration is refused with its
/// reason while the old table keeps serving.
pub async fn serve(config: Config, reload: Option<Reload>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener =
        tessera_http::server::listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    run(config, reload, listener, |_| {}, shutdown).await
}

/// The one assembly of a running server, for `serve` and the in-process test harness alike:
/// TLS, the data directory's lock, the state, the background tasks (reload on SIGHUP,
/// periodic garbage collection) and the HTTP app on `listener`. `ready` is told the address
/// once requests are answered; the background tasks end when this returns.
async fn run(
    config: Config,
    reload: Option<Reload>,
    listener: tokio::net::TcpListener,
    ready: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let certs = match &config.tls {
        Some(t) => Some(CertStore::open(&t.cert, &t.key)?),
        None => None,
    };
    let tls = match (&certs, &config.tls) {
        (Some(c), Some(t)) => {
            Some(c.server_config(t.client_ca.as_deref(), t.client_auth == tessera_config::ClientAuth::Required)?)
        }
        _ => None,
    };
    let _lock = lock_data_dir(&config.data)?;
    let state = open_state(&config).await?;
    let state = Arc::new(state);
    // Dropped (and so aborted) when the server stops.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(reload_on_hangup(state.clone(), config.clone(), reload, certs));
    for (job, entry) in state.syncs.iter().zip(&config.syncs) {
        if entry.interval_secs > 0 {
            background.spawn(sync_periodically(state.clone(), job.clone(), Duration::from_secs(entry.interval_secs)));
        }
    }
    if config.storage.gc_interval_secs > 0 {
        background.spawn(collect_garbage_periodically(state.clone(), config.storage.clone(), retention_rules(&config)));
    }
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(notifier) = &state.notifier {
        notifier.listening(scheme, addr);
    }
    let blobs = match &config.storage.s3 {
        Some(s3) => format!("blobs in s3://{}/{}", s3.bucket, s3.prefix),
        None => "filesystem blobs".to_string(),
    };
    let metadata = match &config.storage.postgres {
        Some(pg) => {
            format!("PostgreSQL metadata{}", pg.schema.as_deref().map(|s| format!(" (schema {s})")).unwrap_or_default())
        }
        None => "SQLite metadata".to_string(),
    };
    tracing::info!(
        "tessera {} listening on {scheme}://{addr}, data in {} ({blobs}, {metadata})",
        env!("CARGO_PKG_VERSION"),
        config.data.display()
    );
    let app = tessera_http::app(state);
    ready(addr);
    tessera_http::server::serve(
        listener,
        app,
        ServerOptions {
            tls,
            header_max_bytes: config.limits.header_max_bytes,
            send_idle: Duration::from_secs(config.limits.send_idle_timeout_secs.max(1)),
            trusted_proxies: config.trusted_proxies.clone().into(),
            connections: connection_limits(&config.limits),
            drain: Duration::from_secs(config.limits.drain_timeout_secs),
        },
        shutdown,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}
