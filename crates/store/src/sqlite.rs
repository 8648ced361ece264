//! The SQLite [`MetaStore`]: one file (`meta.sqlite`) in WAL mode, one writer connection and
//! a few readers, so reads never wait behind a write. Every call runs on the blocking pool.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::sync::Arc;
use tessera_spec::{Digest, RepoName, Tag};

use crate::{
    ManifestRecord, MetaStore, Page, RepoSummary, StoreError, StoreResult, TagRecord, UploadId, millis, now, now_ms,
    page, time_of_ms,
};

/// Schema version kept in `PRAGMA user_version`; each step of `MIGRATIONS` raises it by one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE repos (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE blob_links (
    repo INTEGER NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL REFERENCES blobs(digest),
    PRIMARY KEY (repo, digest)
) WITHOUT ROWID;
CREATE INDEX blob_links_by_digest ON blob_links(digest);
CREATE TABLE manifests (
    seq INTEGER PRIMARY KEY,
    repo INTEGER NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    bytes BLOB NOT NULL,
    subject TEXT,
    artifact_type TEXT,
    annotations TEXT,
    created INTEGER NOT NULL,
    UNIQUE (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests(repo, subject) WHERE subject IS NOT NULL;
CREATE TABLE tags (
    repo INTEGER NOT NULL REFERENCES repos(id),
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_digest ON tags(repo, digest);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    repo INTEGER NOT NULL REFERENCES repos(id),
    created INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE tags ADD COLUMN checked_ms INTEGER;
"#,
    // Links to blobs whose bytes live elsewhere: a JSON list of URLs and the size that link
    // claims (unverified, so it never becomes the blob's size); both NULL for bytes here.
    r#"
ALTER TABLE blob_links ADD COLUMN urls TEXT;
ALTER TABLE blob_links ADD COLUMN size INTEGER;
"#,
    // Garbage collection: when each link was made and each blob last held (milliseconds;
    // what exists at the upgrade counts as made now, so it gets the full grace period), the
    // blobs each manifest references (filled from the stored manifests), and the blobs a
    // collection is deleting.
    r#"
ALTER TABLE blob_links ADD COLUMN linked_ms INTEGER NOT NULL DEFAULT 0;
UPDATE blob_links SET linked_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER);
ALTER TABLE blobs ADD COLUMN held_ms INTEGER NOT NULL DEFAULT 0;
UPDATE blobs SET held_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER);
CREATE TABLE manifest_blobs (
    repo INTEGER NOT NULL,
    digest TEXT NOT NULL,
    manifest INTEGER NOT NULL REFERENCES manifests(seq) ON DELETE CASCADE,
    PRIMARY KEY (repo, digest, manifest)
) WITHOUT ROWID;
CREATE INDEX manifest_blobs_by_manifest ON manifest_blobs(manifest);
WITH docs AS MATERIALIZED (
    SELECT seq, repo, CAST(bytes AS TEXT) AS doc FROM manifests WHERE json_valid(CAST(bytes AS TEXT))
)
INSERT OR IGNORE INTO manifest_blobs(repo, digest, manifest)
    SELECT repo, json_extract(doc, '$.config.digest'), seq FROM docs
        WHERE json_type(doc, '$.config.digest') = 'text'
    UNION ALL
    SELECT d.repo, json_extract(l.value, '$.digest'), d.seq FROM docs d, json_each(d.doc, '$.layers') l
        WHERE json_type(l.value, '$.digest') = 'text';
CREATE TABLE blobs_doomed (digest TEXT PRIMARY KEY) WITHOUT ROWID;
"#,
    // The manifests each index lists (filled from the stored indexes), which keep them from
    // a collection of untagged manifests.
    r#"
CREATE TABLE manifest_children (
    repo INTEGER NOT NULL,
    digest TEXT NOT NULL,
    parent INTEGER NOT NULL REFERENCES manifests(seq) ON DELETE CASCADE,
    PRIMARY KEY (repo, digest, parent)
) WITHOUT ROWID;
CREATE INDEX manifest_children_by_parent ON manifest_children(parent);
WITH docs AS MATERIALIZED (
    SELECT seq, repo, CAST(bytes AS TEXT) AS doc FROM manifests WHERE json_valid(CAST(bytes AS TEXT))
)
INSERT OR IGNORE INTO manifest_children(repo, digest, parent)
    SELECT d.repo, json_extract(c.value, '$.digest'), d.seq FROM docs d, json_each(d.doc, '$.manifests') c
        WHERE json_type(c.value, '$.digest') = 'text';
"#,
    // When each tag was last pointed somewhere new (retention rules read it); tags from
    // before count from the upgrade.
    r#"
ALTER TABLE tags ADD COLUMN pushed_ms INTEGER NOT NULL DEFAULT 0;
UPDATE tags SET pushed_ms = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
"#,
    // Simple signatures (the signature extension's), by manifest digest; kept apart from
    // the manifests, as clients store them for images they pushed or others did.
    r#"
CREATE TABLE signatures (
    seq INTEGER PRIMARY KEY,
    repo INTEGER NOT NULL REFERENCES repos(id),
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    content BLOB NOT NULL,
    UNIQUE (repo, digest, name)
);
"#,
    // What signature rules vouched for (see `MetaStore::record_vouches`); the names are
    // the clients', not hosted repositories.
    r#"
CREATE TABLE vouches (
    scope TEXT NOT NULL,
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, repo, digest)
) WITHOUT ROWID;
CREATE INDEX vouches_by_age ON vouches(at_ms);
"#,
    // A vouch ends at a time of its own: its signer's key may expire before the usual
    // lifetime. Vouches only spare signature checks, so the old ones are dropped, not
    // converted: what they admitted is checked again.
    r#"
DROP TABLE vouches;
CREATE TABLE vouches (
    scope TEXT NOT NULL,
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, repo, digest)
) WITHOUT ROWID;
CREATE INDEX vouches_by_end ON vouches(until_ms);
"#,
];

const READERS: usize = 4;

pub struct SqliteMetaStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // FULL: a 201 for a manifest must survive power loss, not only a process crash.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let version = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "metadata schema version {version} is newer than this build ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// (repository id, digest) rows as (repository name, digest), read in the same transaction.
fn named(conn: &Connection, rows: Vec<(i64, String)>) -> rusqlite::Result<Vec<(RepoName, Digest)>> {
    let mut name = conn.prepare_cached("SELECT name FROM repos WHERE id = ?1")?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, digest) in rows {
        let repo: String = name.query_row([id], |r| r.get(0))?;
        // Stored names and digests were validated on the way in.
        if let (Ok(repo), Ok(digest)) = (repo.parse(), digest.parse()) {
            out.push((repo, digest));
        }
    }
    Ok(out)
}

fn doomed(conn: &Connection, digest: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM blobs_doomed WHERE digest = ?1")?.exists([digest])
}

/// A transaction's refusal, carried out of it as the error the caller sees.
/// A refusal decided inside a transaction, carried out of rusqlite's closure as its error.
fn refusal(why: StoreError) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(why))
}

fn db_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::ToSqlConversionFailure(inner) => match inner.downcast::<StoreError>() {
            Ok(refused) => *refused,
            Err(other) => StoreError::Backend(io::Error::other(other)),
        },
        rusqlite::Error::SqliteFailure(code, _) if code.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::Full(io::Error::new(io::ErrorKind::StorageFull, e))
        }
        e => StoreError::Backend(io::Error::other(e)),
    }
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    s.parse().map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn repo_id(conn: &Connection, repo: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM repos WHERE name = ?1")?.query_row([repo], |r| r.get(0)).optional()
}

fn ensure_repo(conn: &Connection, repo: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO repos(name) VALUES (?1) ON CONFLICT(name) DO NOTHING")?.execute([repo])?;
    conn.prepare_cached("SELECT id FROM repos WHERE name = ?1")?.query_row([repo], |r| r.get(0))
}

fn manifest_row(r: &rusqlite::Row) -> rusqlite::Result<ManifestRecord> {
    Ok(ManifestRecord {
        digest: parse_digest(r.get(0)?)?,
        media_type: r.get(1)?,
        bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
        subject: r.get::<_, Option<String>>(3)?.map(parse_digest).transpose()?,
        artifact_type: r.get(4)?,
        annotations_json: r.get(5)?,
        blobs: Vec::new(),
        children: Vec::new(),
    })
}

impl SqliteMetaStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut writer = Connection::open(path).map_err(db_err)?;
        configure(&writer).map_err(db_err)?;
        migrate(&mut writer).map_err(db_err)?;
        Self::with_writer(path, writer, OpenFlags::default())
    }

    /// Opens an existing database for reading only (a diagnostic beside a running server:
    /// nothing is created or migrated). Its schema must be this build's.
    pub fn open_read_only(path: &Path) -> StoreResult<Self> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(db_err)?;
        configure(&conn).map_err(db_err)?;
        let version = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).map_err(db_err)? as usize;
        if version != MIGRATIONS.len() {
            return Err(StoreError::Backend(io::Error::other(format!(
                "metadata schema version {version}, this build reads version {}; start the server once to migrate",
                MIGRATIONS.len()
            ))));
        }
        Self::with_writer(path, conn, flags)
    }

    /// Writes a consistent copy of the database at `from` to `to` (which must not exist
    /// yet) without changing `from` in any way: opened read-only, never migrated. For a
    /// pass to try on, such as a garbage collection's dry run.
    pub fn copy_database(from: &Path, to: &Path) -> StoreResult<()> {
        let to = to.to_str().ok_or_else(|| io::Error::other("the copy's path is not UTF-8"))?;
        let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db_err)?;
        source.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
        source.execute("VACUUM INTO ?1", [to]).map(|_| ()).map_err(db_err)
    }

    fn with_writer(path: &Path, writer: Connection, flags: OpenFlags) -> StoreResult<Self> {
        let readers = (0..READERS)
            .map(|_| {
                let c = Connection::open_with_flags(path, flags)?;
                configure(&c)?;
                Ok(Mutex::new(c))
            })
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_err)?;
        Ok(SqliteMetaStore {
            inner: Arc::new(Inner { writer: Mutex::new(writer), readers, next_reader: AtomicUsize::new(0) }),
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len();
            let conn = inner.readers[i].lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(db_err)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Runs `f` as one transaction on the writer connection, on stable storage when it
    /// returns.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.write_with(true, f).await
    }

    /// Like [`Self::write`]; without `durable`, the commit skips its fsync (a power loss may
    /// forget it, a crash may not, and the next durable commit persists it too: the WAL is
    /// written in order). For records that only matter while this process runs.
    async fn write_with<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            // Set for every write, so nothing (not even a panic in the last one) can leave a
            // durable write without its fsync.
            conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
        .map_err(db_err)
    }
}

/// `r.name` is `?1` or under it, by whole components (`?1` is the prefix without slashes;
/// empty covers every name).
const UNDER_PREFIX: &str = "(?1 = '' OR r.name = ?1 OR substr(r.name, 1, length(?1) + 1) = ?1 || '/')";

#[async_trait]
impl MetaStore for SqliteMetaStore {
    async fn blob_link(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<u64>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT COALESCE(l.size, b.size) FROM blob_links l JOIN repos r ON r.id = l.repo
                 JOIN blobs b ON b.digest = l.digest WHERE r.name = ?1 AND l.digest = ?2",
            )?
            .query_row(params![repo, digest], |r| r.get::<_, i64>(0))
            .optional()
            .map(|o| o.map(|s| s as u64))
        })
        .await
    }

    async fn blob_known(&self, digest: &Digest) -> StoreResult<Option<u64>> {
        let digest = digest.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT b.size FROM blobs b WHERE b.digest = ?1
                 AND EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest AND l.urls IS NULL)",
            )?
            .query_row([digest], |r| r.get::<_, i64>(0))
            .optional()
            .map(|o| o.map(|s| s as u64))
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> StoreResult<()> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            if doomed(tx, &digest)? {
                return Err(refusal(StoreError::Missing(format!("{digest} is being garbage collected"))));
            }
            let id = ensure_repo(tx, &repo)?;
            // The size of bytes that are here is verified: it replaces what a link to bytes
            // elsewhere may have claimed first.
            tx.prepare_cached(
                "INSERT INTO blobs(digest, size, held_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET size = excluded.size WHERE size != excluded.size",
            )?
            .execute(params![digest, size as i64, now_ms()])?;
            // Bytes arriving for a blob that lived elsewhere make the link local.
            tx.prepare_cached(
                "INSERT INTO blob_links(repo, digest, linked_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET linked_ms = excluded.linked_ms, urls = NULL, size = NULL",
            )?
            .execute(params![id, digest, now_ms()])?;
            Ok(())
        })
        .await
    }

    async fn link_external(&self, repo: &RepoName, digest: &Digest, size: u64, urls: &[String]) -> StoreResult<()> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        let urls = serde_json::to_string(urls).map_err(io::Error::other)?;
        let mismatch = self
            .write(move |tx| {
                if doomed(tx, &digest)? {
                    return Err(refusal(StoreError::Missing(format!("{digest} is being garbage collected"))));
                }
                // Only a verified size (bytes held here) can contradict the claim.
                let known: Option<i64> = tx
                    .prepare_cached(
                        "SELECT size FROM blobs b WHERE digest = ?1
                         AND EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest AND l.urls IS NULL)",
                    )?
                    .query_row([&digest], |r| r.get(0))
                    .optional()?;
                if known.is_some_and(|k| k as u64 != size) {
                    return Ok(known);
                }
                let id = ensure_repo(tx, &repo)?;
                // The row the link needs; its size counts only once bytes arrive.
                tx.prepare_cached(
                    "INSERT INTO blobs(digest, size, held_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                )?
                .execute(params![digest, size as i64, now_ms()])?;
                tx.prepare_cached(
                    "INSERT INTO blob_links(repo, digest, urls, size, linked_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT DO UPDATE SET linked_ms = excluded.linked_ms,
                         urls = CASE WHEN urls IS NULL THEN NULL ELSE excluded.urls END,
                         size = CASE WHEN urls IS NULL THEN NULL ELSE excluded.size END",
                )?
                .execute(params![id, digest, urls, size as i64, now_ms()])?;
                Ok(None)
            })
            .await?;
        match mismatch {
            Some(known) => Err(StoreError::Contradicts(format!("the blob is held here with size {known}, not {size}"))),
            None => Ok(()),
        }
    }

    async fn blob_urls(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<String>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        let text = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT l.urls FROM blob_links l JOIN repos r ON r.id = l.repo WHERE r.name = ?1 AND l.digest = ?2",
                )?
                .query_row(params![repo, digest], |r| r.get::<_, Option<String>>(0))
                .optional()
            })
            .await?
            .flatten();
        match text {
            Some(t) => Ok(serde_json::from_str(&t).map_err(io::Error::other)?),
            None => Ok(Vec::new()),
        }
    }

    async fn bytes_under(&self, prefix: &str) -> StoreResult<u64> {
        let prefix = prefix.trim_matches('/').to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.digest IN (
                     SELECT l.digest FROM blob_links l JOIN repos r ON r.id = l.repo
                     WHERE l.urls IS NULL AND {UNDER_PREFIX})"
            ))?
            .query_row([prefix], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
        })
        .await
    }

    async fn linked_under(&self, prefix: &str, digest: &Digest) -> StoreResult<bool> {
        let (prefix, digest) = (prefix.trim_matches('/').to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT EXISTS (SELECT 1 FROM blob_links l JOIN repos r ON r.id = l.repo
                     WHERE l.digest = ?2 AND l.urls IS NULL AND {UNDER_PREFIX})"
            ))?
            .query_row(params![prefix, digest], |r| r.get::<_, bool>(0))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> StoreResult<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            let Some(id) = repo_id(tx, &repo)? else {
                return Ok(false);
            };
            Ok(tx
                .prepare_cached("DELETE FROM blob_links WHERE repo = ?1 AND digest = ?2")?
                .execute(params![id, digest])?
                > 0)
        })
        .await
    }

    async fn put_manifest(&self, repo: &RepoName, m: &ManifestRecord, tag: Option<&Tag>) -> StoreResult<()> {
        let (repo, m, tag) = (repo.to_string(), m.clone(), tag.map(|t| t.to_string()));
        self.write(move |tx| {
            let id = ensure_repo(tx, &repo)?;
            let digest = m.digest.to_string();
            // `created` is when it was last pushed: a push again gives an untagged manifest
            // the whole grace period before a collection of untagged manifests.
            tx.prepare_cached(
                "INSERT INTO manifests(repo, digest, media_type, bytes, subject, artifact_type, annotations, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(repo, digest) DO UPDATE SET created = excluded.created",
            )?
            .execute(params![
                id,
                digest,
                m.media_type,
                &m.bytes[..],
                m.subject.as_ref().map(|d| d.to_string()),
                m.artifact_type,
                m.annotations_json,
                now()
            ])?;
            if !m.blobs.is_empty() || !m.children.is_empty() {
                let seq: i64 = tx
                    .prepare_cached("SELECT seq FROM manifests WHERE repo = ?1 AND digest = ?2")?
                    .query_row(params![id, digest], |r| r.get(0))?;
                for child in &m.children {
                    let child = child.to_string();
                    if !tx.prepare_cached("SELECT 1 FROM manifests WHERE repo = ?1 AND digest = ?2")?.exists(params![id, child])? {
                        return Err(refusal(StoreError::Missing(format!("manifest {child} is not stored in {repo}"))));
                    }
                    tx.prepare_cached("INSERT OR IGNORE INTO manifest_children(repo, digest, parent) VALUES (?1, ?2, ?3)")?
                        .execute(params![id, child, seq])?;
                }
                for blob in &m.blobs {
                    let blob = blob.to_string();
                    // Checked here, not only before: a link removed since (a delete, a
                    // collection) must not leave a stored manifest naming missing bytes.
                    if !tx.prepare_cached("SELECT 1 FROM blob_links WHERE repo = ?1 AND digest = ?2")?.exists(params![id, blob])? {
                        return Err(refusal(StoreError::Missing(format!("{blob} is not linked into {repo}"))));
                    }
                    tx.prepare_cached("INSERT OR IGNORE INTO manifest_blobs(repo, digest, manifest) VALUES (?1, ?2, ?3)")?
                        .execute(params![id, blob, seq])?;
                }
            }
            if let Some(tag) = tag {
                tx.prepare_cached(
                    "INSERT INTO tags(repo, tag, digest, pushed_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(repo, tag) DO UPDATE
                     SET digest = excluded.digest,
                         pushed_ms = CASE WHEN tags.digest = excluded.digest THEN tags.pushed_ms ELSE excluded.pushed_ms END",
                )?
                .execute(params![id, tag, digest, now_ms()])?;
            }
            Ok(())
        })
        .await
    }

    async fn get_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<ManifestRecord>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT m.digest, m.media_type, m.bytes, m.subject, m.artifact_type, m.annotations
                 FROM manifests m JOIN repos r ON r.id = m.repo WHERE r.name = ?1 AND m.digest = ?2",
            )?
            .query_row(params![repo, digest], manifest_row)
            .optional()
        })
        .await
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<Digest>> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT t.digest FROM tags t JOIN repos r ON r.id = t.repo WHERE r.name = ?1 AND t.tag = ?2",
            )?
            .query_row(params![repo, tag], |r| parse_digest(r.get(0)?))
            .optional()
        })
        .await
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Option<Vec<Tag>>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            let Some(id) = repo_id(tx, &repo)? else {
                return Ok(None);
            };
            if tx
                .prepare_cached("DELETE FROM manifests WHERE repo = ?1 AND digest = ?2")?
                .execute(params![id, digest])?
                == 0
            {
                return Ok(None);
            }
            let tags = tx
                .prepare_cached("DELETE FROM tags WHERE repo = ?1 AND digest = ?2 RETURNING tag")?
                .query_map(params![id, digest], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(tags.into_iter().filter_map(|t| t.parse().ok()).collect()))
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> StoreResult<bool> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.write(move |tx| {
            let Some(id) = repo_id(tx, &repo)? else {
                return Ok(false);
            };
            Ok(tx.prepare_cached("DELETE FROM tags WHERE repo = ?1 AND tag = ?2")?.execute(params![id, tag])? > 0)
        })
        .await
    }

    async fn untag_if(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> StoreResult<bool> {
        let (repo, tag, digest) = (repo.to_string(), tag.to_string(), digest.to_string());
        self.write(move |tx| {
            let Some(id) = repo_id(tx, &repo)? else {
                return Ok(false);
            };
            Ok(tx
                .prepare_cached("DELETE FROM tags WHERE repo = ?1 AND tag = ?2 AND digest = ?3")?
                .execute(params![id, tag, digest])?
                > 0)
        })
        .await
    }

    async fn add_signature(&self, repo: &RepoName, digest: &Digest, name: &str, content: &[u8]) -> StoreResult<bool> {
        let (repo, digest, name, content) = (repo.to_string(), digest.to_string(), name.to_string(), content.to_vec());
        self.write(move |tx| {
            let id = ensure_repo(tx, &repo)?;
            let held: Option<Vec<u8>> = tx
                .prepare_cached("SELECT content FROM signatures WHERE repo = ?1 AND digest = ?2 AND name = ?3")?
                .query_row(params![id, digest, name], |r| r.get(0))
                .optional()?;
            match held {
                Some(held) if held == content => Ok(false),
                Some(_) => Err(refusal(StoreError::Contradicts(format!("signature {name} holds another content")))),
                None => {
                    tx.prepare_cached("INSERT INTO signatures(repo, digest, name, content) VALUES (?1, ?2, ?3, ?4)")?
                        .execute(params![id, digest, name, content])?;
                    Ok(true)
                }
            }
        })
        .await
    }

    async fn signatures(&self, repo: &RepoName, digest: &Digest) -> StoreResult<Vec<(String, Bytes)>> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT s.name, s.content FROM signatures s JOIN repos r ON r.id = s.repo
                 WHERE r.name = ?1 AND s.digest = ?2 ORDER BY s.seq",
            )?
            .query_map(params![repo, digest], |r| Ok((r.get::<_, String>(0)?, Bytes::from(r.get::<_, Vec<u8>>(1)?))))?
            .collect()
        })
        .await
    }

    async fn parents(&self, repo: &RepoName, digest: &Digest, limit: usize) -> StoreResult<Vec<Digest>> {
        let (repo, digest, limit) = (repo.to_string(), digest.to_string(), limit as i64);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT m.digest FROM manifest_children c JOIN repos r ON r.id = c.repo
                 JOIN manifests m ON m.seq = c.parent WHERE r.name = ?1 AND c.digest = ?2 ORDER BY m.seq LIMIT ?3",
            )?
            .query_map(params![repo, digest, limit], |r| parse_digest(r.get(0)?))?
            .collect()
        })
        .await
    }

    async fn record_vouches(
        &self,
        scope: &str,
        repo: &RepoName,
        digests: &[Digest],
        until: SystemTime,
    ) -> StoreResult<()> {
        let (scope, repo) = (scope.to_string(), repo.to_string());
        let digests: Vec<String> = digests.iter().map(Digest::to_string).collect();
        let until = millis(until);
        self.write_with(false, move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO vouches(scope, repo, digest, until_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (scope, repo, digest) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)",
            )?;
            for digest in &digests {
                insert.execute(params![scope, repo, digest, until])?;
            }
            Ok(())
        })
        .await
    }

    async fn vouched(&self, scope: &str, repo: &RepoName, digest: &Digest) -> StoreResult<Option<SystemTime>> {
        let (scope, repo, digest, now) = (scope.to_string(), repo.to_string(), digest.to_string(), now_ms());
        self.read(move |c| {
            let until: Option<i64> = c
                .prepare_cached(
                    "SELECT until_ms FROM vouches WHERE scope = ?1 AND repo = ?2 AND digest = ?3 AND until_ms > ?4",
                )?
                .query_row(params![scope, repo, digest, now], |r| r.get(0))
                .optional()?;
            Ok(until.map(time_of_ms))
        })
        .await
    }

    async fn forget_vouches(&self) -> StoreResult<u64> {
        let now = now_ms();
        self.write_with(false, move |tx| {
            Ok(tx.prepare_cached("DELETE FROM vouches WHERE until_ms <= ?1")?.execute(params![now])? as u64)
        })
        .await
    }

    async fn tags_under(&self, prefix: &str) -> StoreResult<Vec<TagRecord>> {
        let prefix = prefix.trim_matches('/').to_string();
        let rows = self
            .read(move |c| {
                c.prepare_cached(&format!(
                    "SELECT r.name, t.tag, t.digest, t.pushed_ms FROM tags t JOIN repos r ON r.id = t.repo
                     WHERE {UNDER_PREFIX} ORDER BY r.name, t.tag"
                ))?
                .query_map([prefix], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter().map(|(repo, tag, digest, ms)| TagRecord::parse(&repo, &tag, &digest, ms)).collect()
    }

    async fn repository_summaries(
        &self,
        last: Option<&str>,
        containing: &str,
        limit: usize,
    ) -> StoreResult<(Vec<RepoSummary>, bool)> {
        let (last, containing) = (last.unwrap_or("").to_string(), containing.to_string());
        let rows = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT r.name,
                    (SELECT COUNT(*) FROM tags t WHERE t.repo = r.id),
                    (SELECT COALESCE(SUM(b.size), 0) FROM blob_links l JOIN blobs b ON b.digest = l.digest
                        WHERE l.repo = r.id AND l.urls IS NULL),
                    (SELECT MAX(t.pushed_ms) FROM tags t WHERE t.repo = r.id)
                 FROM repos r WHERE r.name > ?1 AND instr(r.name, ?2) > 0 ORDER BY r.name LIMIT ?3",
                )?
                .query_map(params![last, containing, limit.saturating_add(1) as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<i64>>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let more = rows.len() > limit;
        let summaries = rows.into_iter().take(limit).map(|(n, t, b, p)| RepoSummary::parse(&n, t, b, p));
        Ok((summaries.collect::<StoreResult<_>>()?, more))
    }

    async fn recent_tags(&self, repo: Option<&RepoName>, skip: usize, limit: usize) -> StoreResult<Vec<TagRecord>> {
        let repo = repo.map(ToString::to_string);
        let rows = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT r.name, t.tag, t.digest, t.pushed_ms FROM tags t JOIN repos r ON r.id = t.repo
                     WHERE ?1 IS NULL OR r.name = ?1 ORDER BY t.pushed_ms DESC, r.name, t.tag LIMIT ?2 OFFSET ?3",
                )?
                .query_map(params![repo, limit as i64, skip as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter().map(|(repo, tag, digest, ms)| TagRecord::parse(&repo, &tag, &digest, ms)).collect()
    }

    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, at: SystemTime) -> StoreResult<()> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        let ms = millis(at);
        self.write(move |tx| {
            let Some(id) = repo_id(tx, &repo)? else { return Ok(()) };
            tx.prepare_cached("UPDATE tags SET checked_ms = ?3 WHERE repo = ?1 AND tag = ?2")?
                .execute(params![id, tag, ms])?;
            Ok(())
        })
        .await
    }

    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> StoreResult<Option<SystemTime>> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.read(move |c| {
            let ms: Option<Option<i64>> = c
                .prepare_cached(
                    "SELECT t.checked_ms FROM tags t JOIN repos r ON r.id = t.repo WHERE r.name = ?1 AND t.tag = ?2",
                )?
                .query_row(params![repo, tag], |r| r.get(0))
                .optional()?;
            Ok(ms.flatten().map(time_of_ms))
        })
        .await
    }

    async fn list_tags(&self, repo: &RepoName, last: Option<&str>, limit: usize) -> StoreResult<Option<Page>> {
        let (repo, last) = (repo.to_string(), last.unwrap_or("").to_string());
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(None);
            };
            let items = c
                .prepare_cached("SELECT tag FROM tags WHERE repo = ?1 AND tag > ?2 ORDER BY tag LIMIT ?3")?
                .query_map(params![id, last, limit.saturating_add(1) as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Some(page(items, limit)))
        })
        .await
    }

    async fn catalog(&self, last: Option<&str>, limit: usize) -> StoreResult<Page> {
        let last = last.unwrap_or("").to_string();
        self.read(move |c| {
            let items = c
                .prepare_cached("SELECT name FROM repos WHERE name > ?1 ORDER BY name LIMIT ?2")?
                .query_map(params![last, limit.saturating_add(1) as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(page(items, limit))
        })
        .await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> StoreResult<Vec<ManifestRecord>> {
        let (repo, subject) = (repo.to_string(), subject.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT m.digest, m.media_type, m.bytes, m.subject, m.artifact_type, m.annotations
                 FROM manifests m JOIN repos r ON r.id = m.repo WHERE r.name = ?1 AND m.subject = ?2 ORDER BY m.seq",
            )?
            .query_map(params![repo, subject], manifest_row)?
            .collect()
        })
        .await
    }

    async fn create_upload(&self, id: &UploadId, repo: &RepoName) -> StoreResult<()> {
        let (id, repo) = (id.to_string(), repo.to_string());
        self.write(move |tx| {
            let rid = ensure_repo(tx, &repo)?;
            tx.prepare_cached("INSERT INTO uploads(id, repo, created) VALUES (?1, ?2, ?3)")?.execute(params![
                id,
                rid,
                now()
            ])?;
            Ok(())
        })
        .await
    }

    async fn upload_repo(&self, id: &UploadId) -> StoreResult<Option<RepoName>> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT r.name FROM uploads u JOIN repos r ON r.id = u.repo WHERE u.id = ?1")?
                .query_row([id], |r| r.get::<_, String>(0))
                .optional()
                .map(|o| o.and_then(|n| n.parse().ok()))
        })
        .await
    }

    async fn delete_upload(&self, id: &UploadId) -> StoreResult<()> {
        let id = id.to_string();
        self.write(move |tx| tx.prepare_cached("DELETE FROM uploads WHERE id = ?1")?.execute([id]).map(|_| ())).await
    }

    async fn hold_blob(&self, digest: &Digest, size: u64) -> StoreResult<bool> {
        let digest = digest.to_string();
        // A hold guards a push in flight, which a power loss ends anyway.
        self.write_with(false, move |tx| {
            if doomed(tx, &digest)? {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO blobs(digest, size, held_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET held_ms = excluded.held_ms",
            )?
            .execute(params![digest, size as i64, now_ms()])?;
            Ok(true)
        })
        .await
    }

    async fn delete_untagged(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let cutoff = millis(cutoff) / 1000;
        let deleted = self
            .write(move |tx| {
                let mut deleted = Vec::new();
                loop {
                    let round = tx
                        .prepare_cached(
                            "DELETE FROM manifests AS m WHERE created < ?1
                             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
                             AND NOT EXISTS (SELECT 1 FROM manifest_children c WHERE c.repo = m.repo AND c.digest = m.digest)
                             AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repo = m.repo AND s.digest = m.subject)
                             RETURNING repo, digest",
                        )?
                        .query_map([cutoff], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    if round.is_empty() {
                        break;
                    }
                    deleted.extend(round);
                }
                named(tx, deleted)
            })
            .await?;
        Ok(deleted)
    }

    async fn unlink_unreferenced(&self, cutoff: SystemTime) -> StoreResult<Vec<(RepoName, Digest)>> {
        let cutoff = millis(cutoff);
        let removed = self
            .write(move |tx| {
                let removed = tx
                    .prepare_cached(
                        "DELETE FROM blob_links AS l WHERE linked_ms < ?1
                         AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb WHERE mb.repo = l.repo AND mb.digest = l.digest)
                         RETURNING repo, digest",
                    )?
                    .query_map([cutoff], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                named(tx, removed)
            })
            .await?;
        Ok(removed)
    }

    async fn doom_unlinked(&self, cutoff: SystemTime, stored: &[Digest], limit: usize) -> StoreResult<Vec<Digest>> {
        let cutoff = millis(cutoff);
        let stored: Vec<String> = stored.iter().map(|d| d.to_string()).collect();
        let doomed = self
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO blobs_doomed(digest)
                     SELECT digest FROM blobs b WHERE held_ms < ?1
                     AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = b.digest) LIMIT ?2",
                )?
                .execute(params![cutoff, limit as i64])?;
                tx.prepare_cached(
                    "DELETE FROM blobs WHERE digest IN (SELECT digest FROM blobs_doomed)
                     AND NOT EXISTS (SELECT 1 FROM blob_links l WHERE l.digest = blobs.digest)",
                )?
                .execute([])?;
                // Bytes without any record (stored before holds existed, or a hold a power
                // loss forgot).
                let mut orphan = tx.prepare_cached(
                    "INSERT OR IGNORE INTO blobs_doomed(digest)
                     SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
                )?;
                for digest in &stored {
                    orphan.execute([digest])?;
                }
                tx.prepare_cached("SELECT digest FROM blobs_doomed")?
                    .query_map([], |r| parse_digest(r.get(0)?))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(doomed)
    }

    async fn forget_doomed(&self, digests: &[Digest]) -> StoreResult<()> {
        let digests: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        self.write(move |tx| {
            let mut forget = tx.prepare_cached("DELETE FROM blobs_doomed WHERE digest = ?1")?;
            for digest in &digests {
                forget.execute([digest])?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetaStore::open(&dir.path().join("meta.sqlite")).unwrap();
        crate::conformance::meta_store(&store).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.sqlite");
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256_of(b"x");
        {
            let s = SqliteMetaStore::open(&path).unwrap();
            s.link_blob(&repo, &d, 1).await.unwrap();
        }
        let s = SqliteMetaStore::open(&path).unwrap();
        assert_eq!(s.blob_link(&repo, &d).await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn read_only_opening_reads_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.sqlite");
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256_of(b"x");
        SqliteMetaStore::open(&path).unwrap().link_blob(&repo, &d, 1).await.unwrap();
        let reader = SqliteMetaStore::open_read_only(&path).unwrap();
        assert_eq!(reader.blob_link(&repo, &d).await.unwrap(), Some(1));
        assert!(reader.link_blob(&repo, &Digest::sha256_of(b"y"), 1).await.is_err(), "no writes");
        assert!(SqliteMetaStore::open_read_only(&dir.path().join("none.sqlite")).is_err(), "nothing created");
        assert!(!dir.path().join("none.sqlite").exists());
    }

    /// A database from before garbage collection keeps every link its manifests reference:
    /// the upgrade reads the references out of the stored manifests.
    #[tokio::test]
    async fn upgrade_fills_the_references_of_stored_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.sqlite");
        let (config, layer, loose) = (Digest::sha256_of(b"c"), Digest::sha256_of(b"l"), Digest::sha256_of(b"x"));
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":1}}]}}"#
        );
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            let tx = conn.transaction().unwrap();
            for step in &MIGRATIONS[..3] {
                tx.execute_batch(step).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.execute("INSERT INTO repos(id, name) VALUES (1, 'old/app')", []).unwrap();
            for d in [&config, &layer, &loose] {
                tx.execute("INSERT INTO blobs(digest, size) VALUES (?1, 1)", [d.to_string()]).unwrap();
                tx.execute("INSERT INTO blob_links(repo, digest) VALUES (1, ?1)", [d.to_string()]).unwrap();
            }
            tx.execute(
                "INSERT INTO manifests(repo, digest, media_type, bytes, created) VALUES (1, ?1, 'application/vnd.oci.image.manifest.v1+json', ?2, 0)",
                params![Digest::sha256_of(doc.as_bytes()).to_string(), doc.as_bytes()],
            )
            .unwrap();
            // A tagged index listing the (untagged) image manifest.
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1}}]}}"#,
                Digest::sha256_of(doc.as_bytes())
            );
            let index_digest = Digest::sha256_of(index.as_bytes()).to_string();
            tx.execute(
                "INSERT INTO manifests(repo, digest, media_type, bytes, created) VALUES (1, ?1, 'application/vnd.oci.image.index.v1+json', ?2, 0)",
                params![index_digest, index.as_bytes()],
            )
            .unwrap();
            tx.execute("INSERT INTO tags(repo, tag, digest) VALUES (1, 'v1', ?1)", [index_digest]).unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteMetaStore::open(&path).unwrap();
        let repo: RepoName = "old/app".parse().unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        let removed = store.unlink_unreferenced(later).await.unwrap();
        assert_eq!(removed, vec![(repo.clone(), loose)]);
        assert_eq!(store.blob_link(&repo, &config).await.unwrap(), Some(1));
        assert_eq!(store.blob_link(&repo, &layer).await.unwrap(), Some(1));
        assert!(store.delete_untagged(later).await.unwrap().is_empty(), "the tagged index keeps what it lists");
    }
}
