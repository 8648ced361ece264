//! The PostgreSQL [`MetaStore`]: the SQLite store's schema and transactions on a database
//! server many processes can share (`tokio-postgres` over a `deadpool-postgres` pool).
//!
//! Every write transaction first takes one transaction-scoped advisory lock, so writes run
//! one at a time, as on SQLite's single writer connection: garbage collection's holds and
//! dooms (see docs/architecture.md) are reasoned about in that order, and a lock costs one
//! round trip where serializable isolation would need retries of whole transactions.
//! Reads take no lock and see committed transactions whole.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tessera_spec::{Digest, RepoName, Tag};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use crate::cluster::{ChangeNews, Changed, Connect, PostgresCluster, encode_keys};
use crate::{
    ManifestRecord, MetaStore, Page, RepoSummary, StoreError, StoreResult, TagRecord, UploadId, millis, now, now_ms,
    page, time_of_ms,
};

/// The schema, one step per version; the version is kept in `tessera_schema`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE repos (id BIGSERIAL PRIMARY KEY, name TEXT COLLATE "C" NOT NULL UNIQUE);
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size BIGINT NOT NULL, held_ms BIGINT NOT NULL DEFAULT 0);
CREATE TABLE blob_links (
    repo BIGINT NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL REFERENCES blobs(digest),
    urls TEXT,
    size BIGINT,
    linked_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX blob_links_by_digest ON blob_links(digest);
CREATE TABLE manifests (
    seq BIGSERIAL PRIMARY KEY,
    repo BIGINT NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    subject TEXT,
    artifact_type TEXT,
    annotations TEXT,
    created BIGINT NOT NULL,
    UNIQUE (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests(repo, subject) WHERE subject IS NOT NULL;
CREATE TABLE tags (
    repo BIGINT NOT NULL REFERENCES repos(id),
    tag TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL,
    checked_ms BIGINT,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags(repo, digest);
CREATE TABLE uploads (id TEXT PRIMARY KEY, repo BIGINT NOT NULL REFERENCES repos(id), created BIGINT NOT NULL);
CREATE TABLE manifest_blobs (
    repo BIGINT NOT NULL,
    digest TEXT NOT NULL,
    manifest BIGINT NOT NULL REFERENCES manifests(seq) ON DELETE CASCADE,
    PRIMARY KEY (repo, digest, manifest)
);
CREATE INDEX manifest_blobs_by_manifest ON manifest_blobs(manifest);
CREATE TABLE manifest_children (
    repo BIGINT NOT NULL,
    digest TEXT NOT NULL,
    parent BIGINT NOT NULL REFERENCES manifests(seq) ON DELETE CASCADE,
    PRIMARY KEY (repo, digest, parent)
);
CREATE INDEX manifest_children_by_parent ON manifest_children(parent);
CREATE TABLE blobs_doomed (digest TEXT PRIMARY KEY);
"#,
    r#"
CREATE TABLE changes (counter BIGINT NOT NULL);
INSERT INTO changes(counter) VALUES (0);
"#,
    // When each tag was last pointed somewhere new (retention rules read it); tags from
    // before count from the upgrade.
    r#"
ALTER TABLE tags ADD COLUMN pushed_ms BIGINT NOT NULL DEFAULT 0;
UPDATE tags SET pushed_ms = (extract(epoch from now()) * 1000)::BIGINT;
"#,
    // Simple signatures (the signature extension's), by manifest digest.
    r#"
CREATE TABLE signatures (
    seq BIGSERIAL PRIMARY KEY,
    repo BIGINT NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    content BYTEA NOT NULL,
    UNIQUE (repo, digest, name)
);
"#,
    // What signature rules vouched for (see `MetaStore::record_vouches`); the names are
    // the clients', not hosted repositories.
    r#"
CREATE TABLE vouches (
    scope TEXT NOT NULL,
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (scope, repo, digest)
);
CREATE INDEX vouches_by_age ON vouches(at_ms);
"#,
    // A vouch ends at a time of its own: its signer's key may expire before the usual
    // lifetime. Vouches only spare signature checks, so the old ones are dropped, not
    // converted: what they admitted is checked again.
    r#"
DROP TABLE vouches;
CREATE TABLE vouches (
    scope TEXT NOT NULL,
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL,
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (scope, repo, digest)
);
CREATE INDEX vouches_by_end ON vouches(until_ms);
"#,
];

/// Advisory lock keys (arbitrary, fixed): one for migrations, one taken by every write.
const MIGRATION_LOCK: i64 = 0x7465_7373_0001;
const WRITE_LOCK: i64 = 0x7465_7373_0002;
/// Connections per process: enough for the reads a busy node runs at once.
const POOL_SIZE: usize = 16;

pub struct PostgresMetaStore {
    pool: Pool,
    /// A new connection of its own, outside the pool, for cluster coordination.
    connect: Connect,
    /// Where this store's change news is sent (see [`crate::cluster`]).
    channel: String,
    /// The schema, or "" for the default: what tells this registry's locks from others'.
    namespace: String,
    /// Statements and transactions sent to the server (see [`MetaStore::queries_sent`]).
    queries: AtomicU64,
    /// Write transactions among them (see [`MetaStore::writes_sent`]).
    writes: AtomicU64,
}

pub(crate) fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY => {
            StoreError::Full(io::Error::new(io::ErrorKind::StorageFull, e))
        }
        Some(code) if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CANNOT_CONNECT_NOW => {
            StoreError::Unreachable(io::Error::new(io::ErrorKind::ConnectionAborted, e))
        }
        Some(_) => StoreError::Backend(io::Error::other(e)),
        // No SQL state: the connection itself failed.
        None => StoreError::Unreachable(io::Error::new(io::ErrorKind::ConnectionAborted, e)),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        e => StoreError::Unreachable(io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string())),
    }
}

/// Whether `name` is a schema name used as written: 1 to 63 lowercase ASCII letters,
/// digits and `_`, not starting with a digit (so that quoting it changes nothing).
pub fn is_schema_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn stored_digest(s: String) -> StoreResult<Digest> {
    s.parse().map_err(|_| StoreError::Backend(io::Error::other(format!("a stored digest is not one: {s:?}"))))
}

fn manifest_row(r: &Row) -> StoreResult<ManifestRecord> {
    Ok(ManifestRecord {
        digest: stored_digest(r.get(0))?,
        media_type: r.get(1),
        bytes: Bytes::from(r.get::<_, Vec<u8>>(2)),
        subject: r.get::<_, Option<String>>(3).map(stored_digest).transpose()?,
        artifact_type: r.get(4),
        annotations_json: r.get(5),
        blobs: Vec::new(),
        children: Vec::new(),
    })
}

const MANIFEST_COLUMNS: &str = "m.digest, m.media_type, m.bytes, m.subject, m.artifact_type, m.annotations";

/// Statements on a transaction, each prepared once per connection: one round trip where a
/// statement sent as text costs two (parse, then execute), and the write lock is held for
/// every round trip of a write.
type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// Sends two statements one right after the other, without waiting for the first's answer
/// (the server runs them in this order), and returns their row counts.
async fn exec_both(
    tx: &Transaction<'_>,
    (first, first_params): (&str, Params<'_>),
    (second, second_params): (&str, Params<'_>),
) -> Result<(u64, u64), tokio_postgres::Error> {
    let (first, second) = tokio::try_join!(tx.prepare_cached(first), tx.prepare_cached(second))?;
    // futures-util's `try_join` polls in order, so the first is sent first.
    futures_util::future::try_join(tx.execute(&first, first_params), tx.execute(&second, second_params)).await
}

async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

async fn rows(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query(&statement, params).await
}

async fn row(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_one(&statement, params).await
}

async fn row_opt(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_opt(&statement, params).await
}

async fn repo_id(tx: &Transaction<'_>, repo: &str) -> StoreResult<Option<i64>> {
    let found = row_opt(tx, "SELECT id FROM repos WHERE name = $1", &[&repo]).await.map_err(db_err)?;
    Ok(found.map(|r| r.get(0)))
}

/// The repository's id, made if it is new, in one round trip (writes hold the write lock,
/// so nothing inserts it between the two halves).
async fn ensure_repo(tx: &Transaction<'_>, repo: &str) -> StoreResult<i64> {
    let found = row_opt(
        tx,
        "WITH made AS (INSERT INTO repos(name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id)
         SELECT id FROM made UNION ALL SELECT id FROM repos WHERE name = $1 LIMIT 1",
        &[&repo],
    )
    .await
    .map_err(db_err)?;
    found.map(|r| r.get(0)).ok_or_else(|| StoreError::Backend(io::Error::other("a repository vanished")))
}

async fn doomed(tx: &Transaction<'_>, digest: &str) -> StoreResult<bool> {
    Ok(row_opt(tx, "SELECT 1 FROM blobs_doomed WHERE digest = $1", &[&digest]).await.map_err(db_err)?.is_some())
}

/// Tells every node of the cluster, when `tx` commits, that `changes` were made: the
/// counter bumped and the news sent in one round trip.
async fn announce(tx: &Transaction<'_>, channel: &str, changes: &[Changed]) -> StoreResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    exec(
        tx,
        "WITH bumped AS (UPDATE changes SET counter = counter + 1 RETURNING counter)
         SELECT pg_notify($1, bumped.counter::text || $2) FROM bumped",
        &[&channel, &encode_keys(changes)],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

async fn named(tx: &Transaction<'_>, rows: Vec<(i64, String)>) -> StoreResult<Vec<(RepoName, Digest)>> {
    let mut out = Vec::with_capacity(rows.len());
    for (id, digest) in rows {
        let name: String = row(tx, "SELECT name FROM repos WHERE id = $1", &[&id]).await.map_err(db_err)?.get(0);
        // Stored names and digests were validated on the way in.
        if let (Ok(repo), Ok(digest)) = (name.parse(), digest.parse()) {
            out.push((repo, digest));
        }
    }
    Ok(out)
}

/// Runs `$body` in a write transaction (`$tx`) on a pooled connection: the write lock
/// first, commit at the end, rollback (by drop) on any error.
macro_rules! write {
    ($self:ident, $tx:ident, $body:block) => {{
        $self.queries.fetch_add(1, Ordering::Relaxed);
        $self.writes.fetch_add(1, Ordering::Relaxed);
        let mut client = $self.pool.get().await.map_err(pool_err)?;
        let $tx = client.transaction().await.map_err(db_err)?;
        // The lock goes out first and the body's first statement right behind it, without
        // waiting for the lock's answer: the server runs them in order, so the body runs
        // under the lock, held one round trip less. The lock is prepared beforehand (once
        // per connection) so that nothing stands before its sending, and futures-util's
        // `try_join` polls in order (tokio's rotates which it polls first).
        let lock = $tx.prepare_cached("SELECT pg_advisory_xact_lock($1)").await.map_err(db_err)?;
        let locked = async { $tx.execute(&lock, &[&WRITE_LOCK]).await.map(|_| ()).map_err(db_err) };
        let ((), out) = futures_util::future::try_join(locked, async { $body }).await?;
        $tx.commit().await.map_err(db_err)?;
        Ok::<_, StoreError>(out)
    }};
}

impl PostgresMetaStore {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq key=value
    /// string), its tables in `schema` (created if missing; PostgreSQL's default search
    /// path, normally `public`, when `None`), creating or migrating them; refuses tables
    /// newer than this build's. With `sslmode=require` in `url`, the connection is TLS and
    /// the server's certificate and name are checked against `tls`'s roots; otherwise it
    /// is plain.
    pub async fn connect(
        url: &str,
        schema: Option<&str>,
        tls: Option<rustls::ClientConfig>,
    ) -> StoreResult<PostgresMetaStore> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Backend(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        if let Some(schema) = schema {
            if !is_schema_name(schema) {
                return Err(StoreError::Backend(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("schema {schema:?}: lowercase letters, digits and '_', not starting with a digit"),
                )));
            }
            // Quoted, so that a name that is also an SQL keyword (`user`) is taken as a name.
            config.options(format!("-c search_path=\"{schema}\""));
        }
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let (manager, connect) = match (config.get_ssl_mode(), tls) {
            (tokio_postgres::config::SslMode::Require, Some(tls)) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
                let (own, connector) = (config.clone(), tls.clone());
                let connect: Connect = Arc::new(move || {
                    let (config, connector) = (own.clone(), connector.clone());
                    Box::pin(async move {
                        let (client, connection) = config.connect(connector).await?;
                        Ok((client, crate::cluster::drive(connection)))
                    })
                });
                (Manager::from_config(config, tls, recycling), connect)
            }
            (tokio_postgres::config::SslMode::Require, None) => {
                return Err(StoreError::Backend(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "sslmode=require, but no TLS configuration was given",
                )));
            }
            // `prefer` (the default) without TLS offered is plain, as `disable` is.
            _ => {
                let plain = config.clone();
                let connect: Connect = Arc::new(move || {
                    let config = plain.clone();
                    Box::pin(async move {
                        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                        Ok((client, crate::cluster::drive(connection)))
                    })
                });
                (Manager::from_config(config, tokio_postgres::NoTls, recycling), connect)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend(io::Error::other(e)))?;
        let namespace = schema.unwrap_or("").to_string();
        // A channel is database-wide, while tables are per schema; the hash keeps the name
        // short whatever the schema's length.
        let channel = format!("tessera_changes_{}", &Digest::sha256_of(namespace.as_bytes()).hex()[..16]);
        let store = PostgresMetaStore {
            pool,
            connect,
            channel,
            namespace,
            queries: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        };
        store.migrate(schema).await?;
        Ok(store)
    }

    /// Starts this node's coordination with the others sharing the database: the locks
    /// they all respect, and news of their changes for `on_news`, which hears of every
    /// change within `poll` even when a notification is lost.
    pub async fn join_cluster(
        &self,
        poll: Duration,
        on_news: Arc<dyn Fn(ChangeNews) + Send + Sync>,
    ) -> StoreResult<Arc<PostgresCluster>> {
        PostgresCluster::start(self.connect.clone(), self.channel.clone(), self.namespace.clone(), poll, on_news).await
    }

    /// The server and database `url` names, without user or password, for messages.
    pub fn server_of(url: &str) -> String {
        let Ok(config) = url.parse::<tokio_postgres::Config>() else { return "(an unreadable URL)".into() };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect();
        format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
    }

    async fn migrate(&self, schema: Option<&str>) -> StoreResult<()> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(db_err)?;
        // Two nodes starting together: one migrates, the other then finds it done.
        exec(&tx, "SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_err)?;
        if let Some(schema) = schema {
            // Checked by `is_schema_name` in `connect`.
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")).await.map_err(db_err)?;
        }
        tx.batch_execute("CREATE TABLE IF NOT EXISTS tessera_schema (version INTEGER NOT NULL)")
            .await
            .map_err(db_err)?;
        let version: i32 = match row_opt(&tx, "SELECT version FROM tessera_schema", &[]).await.map_err(db_err)? {
            Some(row) => row.get(0),
            None => {
                exec(&tx, "INSERT INTO tessera_schema(version) VALUES (0)", &[]).await.map_err(db_err)?;
                0
            }
        };
        let known = MIGRATIONS.len() as i32;
        if version > known {
            return Err(StoreError::Backend(io::Error::other(format!(
                "metadata schema version {version} is newer than this build ({known})"
            ))));
        }
        for step in &MIGRATIONS[version as usize..] {
            tx.batch_execute(step).await.map_err(db_err)?;
        }
        exec(&tx, "UPDATE tessera_schema SET version = $1", &[&known]).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    /// Runs one read on a pooled connection.
    async fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> StoreResult<Vec<Row>> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let client = self.pool.get().await.map_err(pool_err)?;
        let statement = client.prepare_cached(sql).await.map_err(db_err)?;
        client.query(&statement, params).await.map_err(db_err)
    }
}

/// `r.name` is `$1` or under it, by whole components (`$1` is the prefix without slashes;
/// empty covers every name).
const UNDER_PREFIX: &str = "($1 = '' OR r.name = $1 OR left(r.name, length($1) + 1) = $1 || '/')";

#[async_trait]
impl MetaStore for PostgresMetaStore {
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<u64>> {
        let rows = self
            .query(
                "SELECT COALESCE(l.size, b.size) FROM blob_links l JOIN repos r ON r.id = l.repo
                 JOIN blobs b ON b.digest = l.digest WHERE r.name = $1 AND l.digest = $2",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn bytes_under(&self, prefix: &str) -> StoreResult<u64> {
        let prefix = prefix.trim_matches('/');
        let sql = format!(
            "SELECT COALESCE(SUM(b.size), 0)::BIGINT FROM blobs b WHERE b.digest IN (
                 SELECT l.digest FROM blob_links l JOIN repos r ON r.id = l.repo
                 WHERE l.urls IS NULL AND {UNDER_PREFIX})"
        );
        let rows = self.query(&sql, &[&prefix]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn linked_under(&self, prefix: &str, digest: &Digest) -> StoreResult<bool> {
        let prefix = prefix.trim_matches('/');
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM blob_links l JOIN repos r ON r.id = l.repo
                 WHERE l.digest = $2 AND l.urls IS NULL AND {UNDER_PREFIX})"
        );
        let rows = self.query(&sql, &[&prefix, &digest.to_string()]).await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn blob_known(&self, digest: &Digest) -> StoreResult<Option<u64>> {
        let rows = self
            .query(
                "SELECT b.size FROM blobs b WHERE b.digest = $1
                 AND EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest AND l.urls IS NULL)",
                &[&digest.to_string()],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> StoreResult<()> {
        let changed = [Changed::Link(repo.clone(), digest.clone())];
        let digest = digest.to_string();
        // Statements that do not wait on each other's answers go out together (the server
        // runs them in order): two round trips under the write lock instead of five.
        write!(self, tx, {
            // Either order: neither writes what the other reads.
            let (doomed, id) = tokio::try_join!(doomed(&tx, &digest), ensure_repo(&tx, repo.as_str()))?;
            if doomed {
                return Err(StoreError::Missing(format!("{digest} is being garbage collected")));
            }
            let (now, size) = (now_ms(), size as i64);
            exec_both(
                &tx,
                // The size of bytes that are here is verified: it replaces what a link to
                // bytes elsewhere may have claimed first.
                (
                    "INSERT INTO blobs(digest, size, held_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (digest) DO UPDATE SET size = excluded.size WHERE blobs.size != excluded.size",
                    &[&digest, &size, &now],
                ),
                // Bytes arriving for a blob that lived elsewhere make the link local (after
                // the blob's row, which it references).
                (
                    "INSERT INTO blob_links(repo, digest, linked_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (repo, digest) DO UPDATE SET linked_ms = excluded.linked_ms, urls = NULL, size = NULL",
                    &[&id, &digest, &now],
                ),
            )
            .await
            .map_err(db_err)?;
            announce(&tx, &self.channel, &changed).await
        })
    }

    async fn link_external(&self, repo: &RepoName, digest: &Digest, size: u64, urls: &[String]) -> StoreResult<()> {
        let changed = [Changed::Link(repo.clone(), digest.clone())];
        let digest = digest.to_string();
        let urls = serde_json::to_string(urls).map_err(io::Error::other)?;
        let mismatch: Option<i64> = write!(self, tx, {
            if doomed(&tx, &digest).await? {
                return Err(StoreError::Missing(format!("{digest} is being garbage collected")));
            }
            // Only a verified size (bytes held here) can contradict the claim.
            let known: Option<i64> = tx
                .query_opt(
                    "SELECT size FROM blobs b WHERE digest = $1
                     AND EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest AND l.urls IS NULL)",
                    &[&digest],
                )
                .await
                .map_err(db_err)?
                .map(|r| r.get(0));
            if known.is_some_and(|k| k as u64 != size) {
                return Ok(known);
            }
            let id = ensure_repo(&tx, repo.as_str()).await?;
            // The row the link needs; its size counts only once bytes arrive.
            exec(
                &tx,
                "INSERT INTO blobs(digest, size, held_ms) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
                &[&digest, &(size as i64), &now_ms()],
            )
            .await
            .map_err(db_err)?;
            exec(
                &tx,
                "INSERT INTO blob_links(repo, digest, urls, size, linked_ms) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (repo, digest) DO UPDATE SET linked_ms = excluded.linked_ms,
                     urls = CASE WHEN blob_links.urls IS NULL THEN NULL ELSE excluded.urls END,
                     size = CASE WHEN blob_links.urls IS NULL THEN NULL ELSE excluded.size END",
                &[&id, &digest, &urls, &(size as i64), &now_ms()],
            )
            .await
            .map_err(db_err)?;
            announce(&tx, &self.channel, &changed).await?;
            Ok::<_, StoreError>(None)
        })?;
        match mismatch {
            Some(known) => Err(StoreError::Contradicts(format!("the blob is held here with size {known}, not {size}"))),
            None => Ok(()),
        }
    }

    async fn blob_urls(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<String>> {
        let rows = self
            .query(
                "SELECT l.urls FROM blob_links l JOIN repos r ON r.id = l.repo WHERE r.name = $1 AND l.digest = $2",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        match rows.first().and_then(|r| r.get::<_, Option<String>>(0)) {
            Some(t) => Ok(serde_json::from_str(&t).map_err(io::Error::other)?),
            None => Ok(Vec::new()),
        }
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> StoreResult<bool> {
        let changed = [Changed::Link(repo.clone(), digest.clone())];
        let digest = digest.to_string();
        write!(self, tx, {
            let Some(id) = repo_id(&tx, repo.as_str()).await? else { return Ok(false) };
            let n = tx
                .execute("DELETE FROM blob_links WHERE repo = $1 AND digest = $2", &[&id, &digest])
                .await
                .map_err(db_err)?;
            if n > 0 {
                announce(&tx, &self.channel, &changed).await?;
            }
            Ok::<_, StoreError>(n > 0)
        })
    }

    async fn put_manifest(&self, repo: &RepoName, m: &ManifestRecord, tag: Option<&Tag>) -> StoreResult<()> {
        let digest = m.digest.to_string();
        let subject = m.subject.as_ref().map(|d| d.to_string());
        write!(self, tx, {
            let id = ensure_repo(&tx, repo.as_str()).await?;
            // `created` is when it was last pushed: a push again gives an untagged manifest
            // the whole grace period before a collection of untagged manifests.
            let seq: i64 = tx
                .query_one(
                    "INSERT INTO manifests(repo, digest, media_type, bytes, subject, artifact_type, annotations, created)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (repo, digest) DO UPDATE SET created = excluded.created RETURNING seq",
                    &[&id, &digest, &m.media_type, &&m.bytes[..], &subject, &m.artifact_type, &m.annotations_json, &now()],
                )
                .await
                .map_err(db_err)?
                .get(0);
            for child in &m.children {
                let child = child.to_string();
                let stored = tx
                    .query_opt("SELECT 1 FROM manifests WHERE repo = $1 AND digest = $2", &[&id, &child])
                    .await
                    .map_err(db_err)?;
                if stored.is_none() {
                    return Err(StoreError::Missing(format!("manifest {child} is not stored in {repo}")));
                }
                exec(
                    &tx,
                    "INSERT INTO manifest_children(repo, digest, parent) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&id, &child, &seq],
                )
                .await
                .map_err(db_err)?;
            }
            for blob in &m.blobs {
                let blob = blob.to_string();
                // Checked here, not only before: a link removed since (a delete, a
                // collection) must not leave a stored manifest naming missing bytes.
                let linked = tx
                    .query_opt("SELECT 1 FROM blob_links WHERE repo = $1 AND digest = $2", &[&id, &blob])
                    .await
                    .map_err(db_err)?;
                if linked.is_none() {
                    return Err(StoreError::Missing(format!("{blob} is not linked into {repo}")));
                }
                exec(
                    &tx,
                    "INSERT INTO manifest_blobs(repo, digest, manifest) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&id, &blob, &seq],
                )
                .await
                .map_err(db_err)?;
            }
            if let Some(tag) = tag {
                exec(
                    &tx,
                    "INSERT INTO tags(repo, tag, digest, pushed_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,
                         pushed_ms = CASE WHEN tags.digest = excluded.digest THEN tags.pushed_ms ELSE excluded.pushed_ms END",
                    &[&id, &tag.as_str(), &digest, &now_ms()],
                )
                .await
                .map_err(db_err)?;
                announce(&tx, &self.channel, &[Changed::Tag(repo.clone(), tag.clone())]).await?;
            }
            Ok::<_, StoreError>(())
        })
    }

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<ManifestRecord>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {MANIFEST_COLUMNS} FROM manifests m JOIN repos r ON r.id = m.repo
                     WHERE r.name = $1 AND m.digest = $2"
                ),
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        rows.first().map(manifest_row).transpose()
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<Digest>> {
        let rows = self
            .query(
                "SELECT t.digest FROM tags t JOIN repos r ON r.id = t.repo WHERE r.name = $1 AND t.tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        rows.first().map(|r| stored_digest(r.get(0))).transpose()
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<Vec<Tag>>> {
        let manifest = Changed::Manifest(repo.clone(), digest.clone());
        let digest = digest.to_string();
        write!(self, tx, {
            let Some(id) = repo_id(&tx, repo.as_str()).await? else { return Ok(None) };
            let deleted = tx
                .execute("DELETE FROM manifests WHERE repo = $1 AND digest = $2", &[&id, &digest])
                .await
                .map_err(db_err)?;
            if deleted == 0 {
                return Ok(None);
            }
            let tags = tx
                .query("DELETE FROM tags WHERE repo = $1 AND digest = $2 RETURNING tag", &[&id, &digest])
                .await
                .map_err(db_err)?;
            let tags: Vec<Tag> = tags.iter().filter_map(|r| r.get::<_, String>(0).parse().ok()).collect();
            let changed: Vec<Changed> =
                std::iter::once(manifest).chain(tags.iter().map(|t| Changed::Tag(repo.clone(), t.clone()))).collect();
            announce(&tx, &self.channel, &changed).await?;
            Ok::<_, StoreError>(Some(tags))
        })
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<bool> {
        write!(self, tx, {
            let Some(id) = repo_id(&tx, repo.as_str()).await? else { return Ok(false) };
            let n = tx
                .execute("DELETE FROM tags WHERE repo = $1 AND tag = $2", &[&id, &tag.as_str()])
                .await
                .map_err(db_err)?;
            if n > 0 {
                announce(&tx, &self.channel, &[Changed::Tag(repo.clone(), tag.clone())]).await?;
            }
            Ok::<_, StoreError>(n > 0)
        })
    }

    async fn untag_if(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> StoreResult<bool> {
        let digest = digest.to_string();
        write!(self, tx, {
            let Some(id) = repo_id(&tx, repo.as_str()).await? else { return Ok(false) };
            let n = tx
                .execute(
                    "DELETE FROM tags WHERE repo = $1 AND tag = $2 AND digest = $3",
                    &[&id, &tag.as_str(), &digest],
                )
                .await
                .map_err(db_err)?;
            if n > 0 {
                announce(&tx, &self.channel, &[Changed::Tag(repo.clone(), tag.clone())]).await?;
            }
            Ok::<_, StoreError>(n > 0)
        })
    }

    async fn add_signature(&self, repo: &RepoName, digest: &Digest, name: &str, content: &[u8]) -> StoreResult<bool> {
        let digest = digest.to_string();
        write!(self, tx, {
            let id = ensure_repo(&tx, repo.as_str()).await?;
            let held = row_opt(
                &tx,
                "SELECT content FROM signatures WHERE repo = $1 AND digest = $2 AND name = $3",
                &[&id, &digest, &name],
            )
            .await
            .map_err(db_err)?;
            match held.map(|r| r.get::<_, Vec<u8>>(0)) {
                Some(held) if held == content => Ok(false),
                Some(_) => Err(StoreError::Contradicts(format!("signature {name} holds another content"))),
                None => {
                    exec(
                        &tx,
                        "INSERT INTO signatures(repo, digest, name, content) VALUES ($1, $2, $3, $4)",
                        &[&id, &digest, &name, &content],
                    )
                    .await
                    .map_err(db_err)?;
                    Ok::<_, StoreError>(true)
                }
            }
        })
    }

    async fn signatures(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<(String, Bytes)>> {
        let rows = self
            .query(
                "SELECT s.name, s.content FROM signatures s JOIN repos r ON r.id = s.repo
                 WHERE r.name = $1 AND s.digest = $2 ORDER BY s.seq",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), Bytes::from(r.get::<_, Vec<u8>>(1)))).collect())
    }

    async fn parents(&self, repo: &RepoName, digest: &Digest, limit: usize) -> StoreResult<Vec<Digest>> {
        let rows = self
            .query(
                "SELECT m.digest FROM manifest_children c JOIN repos r ON r.id = c.repo
                 JOIN manifests m ON m.seq = c.parent WHERE r.name = $1 AND c.digest = $2 ORDER BY m.seq LIMIT $3",
                &[&repo.as_str(), &digest.to_string(), &(limit as i64)],
            )
            .await?;
        rows.iter().map(|r| stored_digest(r.get::<_, String>(0))).collect()
    }

    // Vouches are written outside the write lock: no other write depends on them.
    async fn record_vouches(
        &self,
        scope: &str,
        repo: &RepoName,
        digests: &[Digest],
        until: SystemTime,
    ) -> StoreResult<()> {
        let digests: Vec<String> = digests.iter().map(Digest::to_string).collect();
        self.query(
            "INSERT INTO vouches(scope, repo, digest, until_ms) SELECT $1::text, $2::text, d, $4::bigint FROM (SELECT DISTINCT unnest($3::text[]) AS d) AS listed
             ON CONFLICT (scope, repo, digest) DO UPDATE SET until_ms = GREATEST(vouches.until_ms, excluded.until_ms)",
            &[&scope, &repo.as_str(), &digests, &millis(until)],
        )
        .await?;
        Ok(())
    }

    async fn vouched(&self, scope: &str, repo: &RepoName, digest: &Digest) -> StoreResult<Option<SystemTime>> {
        let rows = self
            .query(
                "SELECT until_ms FROM vouches WHERE scope = $1 AND repo = $2 AND digest = $3 AND until_ms > $4",
                &[&scope, &repo.as_str(), &digest.to_string(), &now_ms()],
            )
            .await?;
        Ok(rows.first().map(|r| time_of_ms(r.get(0))))
    }

    async fn forget_vouches(&self) -> StoreResult<u64> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let client = self.pool.get().await.map_err(pool_err)?;
        client.execute("DELETE FROM vouches WHERE until_ms <= $1", &[&now_ms()]).await.map_err(db_err)
    }

    async fn tags_under(&self, prefix: &str) -> StoreResult<Vec<TagRecord>> {
        let prefix = prefix.trim_matches('/');
        let sql = format!(
            "SELECT r.name, t.tag, t.digest, t.pushed_ms FROM tags t JOIN repos r ON r.id = t.repo
             WHERE {UNDER_PREFIX} ORDER BY r.name, t.tag"
        );
        let rows = self.query(&sql, &[&prefix]).await?;
        rows.iter().map(|r| TagRecord::parse(r.get(0), r.get(1), r.get(2), r.get::<_, i64>(3))).collect()
    }

    async fn repository_summaries(
        &self,
        last: Option<&str>,
        containing: &str,
        limit: usize,
    ) -> StoreResult<(Vec<RepoSummary>, bool)> {
        let rows = self
            .query(
                "SELECT r.name,
                    (SELECT COUNT(*) FROM tags t WHERE t.repo = r.id),
                    (SELECT COALESCE(SUM(b.size), 0)::BIGINT FROM blob_links l JOIN blobs b ON b.digest = l.digest
                        WHERE l.repo = r.id AND l.urls IS NULL),
                    (SELECT MAX(t.pushed_ms) FROM tags t WHERE t.repo = r.id)
                 FROM repos r WHERE r.name > $1 AND strpos(r.name, $2) > 0 ORDER BY r.name LIMIT $3",
                &[&last.unwrap_or(""), &containing, &(limit.saturating_add(1).min(i64::MAX as usize) as i64)],
            )
            .await?;
        let more = rows.len() > limit;
        let summaries = rows.iter().take(limit).map(|r| RepoSummary::parse(r.get(0), r.get(1), r.get(2), r.get(3)));
        Ok((summaries.collect::<StoreResult<_>>()?, more))
    }

    async fn recent_tags(&self, repo: Option<&RepoName>, skip: usize, limit: usize) -> StoreResult<Vec<TagRecord>> {
        let rows = self
            .query(
                "SELECT r.name, t.tag, t.digest, t.pushed_ms FROM tags t JOIN repos r ON r.id = t.repo
                 WHERE $1::text IS NULL OR r.name = $1 ORDER BY t.pushed_ms DESC, r.name, t.tag LIMIT $2 OFFSET $3",
                &[
                    &repo.map(RepoName::as_str),
                    &(limit.min(i64::MAX as usize) as i64),
                    &(skip.min(i64::MAX as usize) as i64),
                ],
            )
            .await?;
        rows.iter().map(|r| TagRecord::parse(r.get(0), r.get(1), r.get(2), r.get::<_, i64>(3))).collect()
    }

    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, at: SystemTime) -> StoreResult<()> {
        let ms = millis(at);
        write!(self, tx, {
            let Some(id) = repo_id(&tx, repo.as_str()).await? else { return Ok(()) };
            exec(&tx, "UPDATE tags SET checked_ms = $3 WHERE repo = $1 AND tag = $2", &[&id, &tag.as_str(), &ms])
                .await
                .map_err(db_err)?;
            Ok::<_, StoreError>(())
        })
    }

    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<SystemTime>> {
        let rows = self
            .query(
                "SELECT t.checked_ms FROM tags t JOIN repos r ON r.id = t.repo WHERE r.name = $1 AND t.tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get::<_, Option<i64>>(0)).map(time_of_ms))
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> StoreResult<Option<Page>> {
        let known = self.query("SELECT id FROM repos WHERE name = $1", &[&repo.as_str()]).await?;
        let Some(id) = known.first().map(|r| r.get::<_, i64>(0)) else { return Ok(None) };
        let rows = self
            .query(
                "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
                &[&id, &last.unwrap_or(""), &(limit.saturating_add(1).min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(Some(page(rows.iter().map(|r| r.get(0)).collect(), limit)))
    }

    async fn catalog(&self, last: Option<&str>, limit: usize) -> StoreResult<Page> {
        let rows = self
            .query(
                "SELECT name FROM repos WHERE name > $1 ORDER BY name LIMIT $2",
                &[&last.unwrap_or(""), &(limit.saturating_add(1).min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(page(rows.iter().map(|r| r.get(0)).collect(), limit))
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> StoreResult<Vec<ManifestRecord>> {
        let rows = self
            .query(
                &format!(
                    "SELECT {MANIFEST_COLUMNS} FROM manifests m JOIN repos r ON r.id = m.repo
                     WHERE r.name = $1 AND m.subject = $2 ORDER BY m.seq"
                ),
                &[&repo.as_str(), &subject.to_string()],
            )
            .await?;
        rows.iter().map(manifest_row).collect()
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> StoreResult<()> {
        write!(self, tx, {
            let rid = ensure_repo(&tx, repo.as_str()).await?;
            exec(&tx, "INSERT INTO uploads(id, repo, created) VALUES ($1, $2, $3)", &[&id.as_str(), &rid, &now()])
                .await
                .map_err(db_err)?;
            Ok::<_, StoreError>(())
        })
    }

    async fn upload_repo(&self, id: &UploadId) -> StoreResult<Option<RepoName>> {
        let rows = self
            .query("SELECT r.name FROM uploads u JOIN repos r ON r.id = u.repo WHERE u.id = $1", &[&id.as_str()])
            .await?;
        Ok(rows.first().and_then(|r| r.get::<_, String>(0).parse().ok()))
    }

    async fn delete_upload(&self, id: &UploadId) -> StoreResult<()> {
        write!(self, tx, {
            exec(&tx, "DELETE FROM uploads WHERE id = $1", &[&id.as_str()]).await.map_err(db_err)?;
            Ok::<_, StoreError>(())
        })
    }

    async fn hold_blob(&self, digest: &Digest, size: u64) -> StoreResult<bool> {
        let (digest, size, now) = (digest.to_string(), size as i64, now_ms());
        write!(self, tx, {
            let (_, held) = exec_both(
                &tx,
                // A hold guards a push in flight, which a crash of the database ends anyway.
                ("SET LOCAL synchronous_commit = off", &[]),
                // Held unless doomed, in one statement: nothing but a collection dooms, and
                // it waits for the write lock this transaction holds.
                (
                    "INSERT INTO blobs(digest, size, held_ms)
                     SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM blobs_doomed WHERE digest = $1)
                     ON CONFLICT (digest) DO UPDATE SET held_ms = excluded.held_ms",
                    &[&digest, &size, &now],
                ),
            )
            .await
            .map_err(db_err)?;
            Ok::<_, StoreError>(held > 0)
        })
    }

    async fn delete_untagged(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let cutoff = millis(cutoff) / 1000;
        write!(self, tx, {
            let mut deleted = Vec::new();
            loop {
                let round = tx
                    .query(
                        "DELETE FROM manifests AS m WHERE created < $1
                         AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
                         AND NOT EXISTS (SELECT 1 FROM manifest_children c WHERE c.repo = m.repo AND c.digest = m.digest)
                         AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repo = m.repo AND s.digest = m.subject)
                         RETURNING repo, digest",
                        &[&cutoff],
                    )
                    .await
                    .map_err(db_err)?;
                if round.is_empty() {
                    break;
                }
                deleted.extend(round.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))));
            }
            let deleted = named(&tx, deleted).await?;
            let changed: Vec<Changed> = deleted.iter().map(|(r, d)| Changed::Manifest(r.clone(), d.clone())).collect();
            announce(&tx, &self.channel, &changed).await?;
            Ok::<_, StoreError>(deleted)
        })
    }

    async fn unlink_unreferenced(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let cutoff = millis(cutoff);
        write!(self, tx, {
            let removed = tx
                .query(
                    "DELETE FROM blob_links AS l WHERE linked_ms < $1
                     AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb WHERE mb.repo = l.repo AND mb.digest = l.digest)
                     RETURNING repo, digest",
                    &[&cutoff],
                )
                .await
                .map_err(db_err)?;
            let removed = named(&tx, removed.iter().map(|r| (r.get(0), r.get(1))).collect()).await?;
            let changed: Vec<Changed> = removed.iter().map(|(r, d)| Changed::Link(r.clone(), d.clone())).collect();
            announce(&tx, &self.channel, &changed).await?;
            Ok::<_, StoreError>(removed)
        })
    }

    async fn doom_unlinked(&self, cutoff: SystemTime, stored: &[Digest], limit: usize) -> StoreResult<Vec<Digest>> {
        let cutoff = millis(cutoff);
        let stored: Vec<String> = stored.iter().map(|d| d.to_string()).collect();
        write!(self, tx, {
            exec(
                &tx,
                "INSERT INTO blobs_doomed(digest)
                 SELECT digest FROM blobs b WHERE held_ms < $1
                 AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest) LIMIT $2
                 ON CONFLICT DO NOTHING",
                &[&cutoff, &(limit.min(i64::MAX as usize) as i64)],
            )
            .await
            .map_err(db_err)?;
            exec(
                &tx,
                "DELETE FROM blobs WHERE digest IN (SELECT digest FROM blobs_doomed)
                 AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = blobs.digest)",
                &[],
            )
            .await
            .map_err(db_err)?;
            // Bytes without any record (stored before holds existed, or a hold a crash
            // forgot).
            exec(
                &tx,
                "INSERT INTO blobs_doomed(digest)
                 SELECT d FROM unnest($1::text[]) AS d WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE digest = d)
                 ON CONFLICT DO NOTHING",
                &[&stored],
            )
            .await
            .map_err(db_err)?;
            let rows = rows(&tx, "SELECT digest FROM blobs_doomed", &[]).await.map_err(db_err)?;
            rows.iter().map(|r| stored_digest(r.get(0))).collect::<StoreResult<Vec<_>>>()
        })
    }

    async fn forget_doomed(&self, digests: &[Digest]) -> StoreResult<()> {
        let digests: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        write!(self, tx, {
            exec(&tx, "DELETE FROM blobs_doomed WHERE digest = ANY($1)", &[&digests]).await.map_err(db_err)?;
            Ok::<_, StoreError>(())
        })
    }

    fn queries_sent(&self) -> Option<u64> {
        Some(self.queries.load(Ordering::Relaxed))
    }

    fn writes_sent(&self) -> Option<u64> {
        Some(self.writes.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterLocks;
    use tessera_testkit::postgres::Postgres;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_shared_suite_passes_on_postgres() {
        let Some(pg) = Postgres::for_test() else { return };
        let url = pg.database("suite").unwrap();
        let store = PostgresMetaStore::connect(&url, None, None).await.unwrap();
        crate::conformance::meta_store(&store).await;
        // A schema of its own in the same database is a store of its own.
        let other = PostgresMetaStore::connect(&url, Some("second_registry"), None).await.unwrap();
        crate::conformance::meta_store(&other).await;
        // A name that is also a keyword is a name.
        PostgresMetaStore::connect(&url, Some("user"), None).await.unwrap();
        assert!(PostgresMetaStore::connect(&url, Some("1reg"), None).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_connection_finds_the_schema_and_a_newer_schema_is_refused() {
        let Some(pg) = Postgres::for_test() else { return };
        let url = pg.database("schema").unwrap();
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256_of(b"x");
        PostgresMetaStore::connect(&url, None, None).await.unwrap().link_blob(&repo, &d, 1).await.unwrap();
        let again = PostgresMetaStore::connect(&url, None, None).await.unwrap();
        assert_eq!(again.blob_link(&repo, &d).await.unwrap(), Some(1), "kept across connections");
        let client = again.pool.get().await.unwrap();
        client.execute("UPDATE tessera_schema SET version = version + 1", &[]).await.unwrap();
        let refused = PostgresMetaStore::connect(&url, None, None).await.err().expect("a newer schema is refused");
        assert!(refused.to_string().contains("newer than this build"), "{refused}");
    }

    /// A node: its cached store over `url`, hearing the others' changes, and its locks.
    async fn node(url: &str, poll: Duration) -> (Arc<crate::CachedMetaStore<PostgresMetaStore>>, Arc<PostgresCluster>) {
        let meta = Arc::new(crate::CachedMetaStore::new(
            PostgresMetaStore::connect(url, Some("cluster"), None).await.unwrap(),
            1 << 20,
        ));
        let hearing = Arc::downgrade(&meta);
        let on_news = Arc::new(move |news| {
            if let Some(m) = hearing.upgrade() {
                m.hear(news)
            }
        });
        let cluster = meta.inner().join_cluster(poll, on_news).await.unwrap();
        (meta, cluster)
    }

    /// Waits up to `within` for `check`; whether it came true.
    async fn eventually<F: std::future::Future<Output = bool>>(within: Duration, check: impl Fn() -> F) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_node_hears_another_nodes_changes_and_answers_cached_reads_without_queries() {
        let Some(pg) = Postgres::for_test() else { return };
        let url = pg.database("news").unwrap();
        // A poll far longer than the test: only notifications can tell in time.
        let (a, _a_cluster) = node(&url, Duration::from_secs(3600)).await;
        let (b, _b_cluster) = node(&url, Duration::from_secs(3600)).await;
        let repo: RepoName = "team/app".parse().unwrap();
        let tag: Tag = "v1".parse().unwrap();
        let manifest = |body: &[u8]| ManifestRecord {
            digest: Digest::sha256_of(body),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: Bytes::copy_from_slice(body),
            subject: None,
            artifact_type: None,
            annotations_json: None,
            blobs: Vec::new(),
            children: Vec::new(),
        };
        let (first, second) = (manifest(b"first"), manifest(b"second"));
        a.put_manifest(&repo, &first, Some(&tag)).await.unwrap();
        a.put_manifest(&repo, &second, None).await.unwrap();
        assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), Some(first.digest.clone()));
        assert!(b.get_manifest(&repo, &first.digest).await.unwrap().is_some());
        // Cached and still valid: no query at all. (News of A's writes may still be on its
        // way, and make B forget what it has just read and read it once more.)
        let free = eventually(Duration::from_secs(2), || async {
            let before = b.queries_sent().unwrap();
            for _ in 0..10 {
                assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), Some(first.digest.clone()));
                assert!(b.get_manifest(&repo, &first.digest).await.unwrap().is_some());
            }
            b.queries_sent().unwrap() == before
        });
        assert!(free.await, "cached answers cost the database nothing");
        // The tag moves on A: B's cache forgets it.
        a.put_manifest(&repo, &second, Some(&tag)).await.unwrap();
        let moved = eventually(Duration::from_secs(2), || async {
            b.resolve_tag(&repo, &tag).await.unwrap() == Some(second.digest.clone())
        });
        assert!(moved.await, "B sees the moved tag");
        // A deleted manifest, and a removed tag.
        a.delete_manifest(&repo, &first.digest).await.unwrap();
        let gone = eventually(Duration::from_secs(2), || async {
            b.get_manifest(&repo, &first.digest).await.unwrap().is_none()
        });
        assert!(gone.await, "B forgets the deleted manifest");
        a.delete_tag(&repo, &tag).await.unwrap();
        let untagged =
            eventually(Duration::from_secs(2), || async { b.resolve_tag(&repo, &tag).await.unwrap().is_none() });
        assert!(untagged.await, "B forgets the deleted tag");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missed_news_is_caught_by_the_counter_within_the_poll() {
        let Some(pg) = Postgres::for_test() else { return };
        let url = pg.database("missed").unwrap();
        let (b, _b_cluster) = node(&url, Duration::from_millis(200)).await;
        let repo: RepoName = "team/app".parse().unwrap();
        let tag: Tag = "v1".parse().unwrap();
        let writer = PostgresMetaStore::connect(&url, Some("cluster"), None).await.unwrap();
        let (d1, d2) = (Digest::sha256_of(b"1"), Digest::sha256_of(b"2"));
        let client = writer.pool.get().await.unwrap();
        // A change made behind the news's back (as if its notification were lost): only
        // the counter says something changed.
        let tag_to = |d: &Digest| {
            format!(
                "INSERT INTO repos(name) VALUES ('{repo}') ON CONFLICT DO NOTHING;
                 INSERT INTO tags(repo, tag, digest) SELECT id, '{}', '{d}' FROM repos WHERE name = '{repo}'
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest;",
                tag.as_str()
            )
        };
        client.batch_execute(&tag_to(&d1)).await.unwrap();
        assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), Some(d1.clone()));
        client.batch_execute(&tag_to(&d2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), Some(d1.clone()), "no news, no counter: still cached");
        client.batch_execute("UPDATE changes SET counter = counter + 1").await.unwrap();
        let caught = eventually(Duration::from_secs(2), || async {
            b.resolve_tag(&repo, &tag).await.unwrap() == Some(d2.clone())
        });
        assert!(caught.await, "the counter moved: B forgot within the poll");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cluster_lock_is_one_holders_and_goes_with_a_dead_node() {
        let Some(pg) = Postgres::for_test() else { return };
        let url = pg.database("locks").unwrap();
        let (_a, a) = node(&url, Duration::from_secs(1)).await;
        let (_b, b) = node(&url, Duration::from_secs(1)).await;
        let held = a.try_lock("upload/1").await.unwrap().expect("free");
        assert!(a.try_lock("upload/1").await.unwrap().is_none(), "another task of the same node waits");
        assert!(b.try_lock("upload/1").await.unwrap().is_none(), "another node waits");
        assert!(b.try_lock("upload/2").await.unwrap().is_some(), "other keys are free");
        drop(held);
        let b_took = eventually(Duration::from_secs(2), || async { b.try_lock("upload/1").await.unwrap().is_some() });
        assert!(b_took.await, "released when dropped");
        // A node that dies (its connection ends with it) leaves its locks to the others.
        let kept = a.try_lock("gc").await.unwrap().expect("free");
        std::mem::forget(kept);
        assert!(b.try_lock("gc").await.unwrap().is_none());
        b.with_client(|client| async move {
            client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid != pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        })
        .await;
        let handed_over = eventually(Duration::from_secs(5), || async { b.try_lock("gc").await.unwrap().is_some() });
        assert!(handed_over.await, "the dead holder's lock is taken over");
        // And the node whose connection died connects again and coordinates as before.
        let back = eventually(Duration::from_secs(5), || async { matches!(a.try_lock("other").await, Ok(Some(_))) });
        assert!(back.await, "the node reconnected");
    }

    /// A rustls configuration trusting only the certificates in `pem` (none: nothing).
    fn trusting(pem: Option<&std::path::Path>) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = pem {
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(pem).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
        }
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sslmode_require_talks_tls_and_checks_the_servers_certificate() {
        let Some(bin) = Postgres::binaries() else { return };
        let pg = Postgres::start_with_tls(&bin).unwrap();
        let url = format!("{}?sslmode=require", pg.database("tls").unwrap());
        let store = PostgresMetaStore::connect(&url, None, Some(trusting(pg.certificate()))).await.unwrap();
        let client = store.pool.get().await.unwrap();
        let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
        assert!(row.get::<_, bool>(0), "the connection is TLS");
        crate::conformance::meta_store(&store).await;
        let untrusted = PostgresMetaStore::connect(&url, None, Some(trusting(None))).await;
        assert!(untrusted.is_err(), "a certificate nobody vouches for is refused");
        assert!(PostgresMetaStore::connect(&url, None, None).await.is_err(), "require without TLS is an error");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_database_that_went_away_is_unreachable_then_serves_again() {
        let Some(pg) = Postgres::for_test() else { return };
        let store = PostgresMetaStore::connect(&pg.database("away").unwrap(), None, None).await.unwrap();
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256_of(b"x");
        store.link_blob(&repo, &d, 1).await.unwrap();
        pg.stop().unwrap();
        match store.blob_link(&repo, &d).await {
            Err(StoreError::Unreachable(_)) => {}
            other => panic!("expected unreachable, got {other:?}"),
        }
        pg.restart().unwrap();
        // Broken connections are dropped from the pool; a fresh one serves.
        let mut answered = None;
        for _ in 0..20 {
            if let Ok(found) = store.blob_link(&repo, &d).await {
                answered = Some(found);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(answered, Some(Some(1)));
    }
}
