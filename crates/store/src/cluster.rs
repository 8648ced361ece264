//! Coordination of the nodes that share one set of stores (a cluster): locks every node
//! respects, and news of metadata changes for every node's in-memory caches.
//!
//! Both ride on the shared database, so a cluster has no parts of its own and no consensus
//! of its own: a lock is a PostgreSQL session-level advisory lock, which the server releases
//! by itself when the holder's connection ends (a node killed or cut off hands its locks
//! over without any expiry to wait for); news is a `NOTIFY` sent in the very transaction
//! that made the change, carrying the keys it changed and a counter every change bumps.
//! Each node also reads the counter every poll interval, so a node that missed a
//! notification (its listening connection was down) notices within that interval and
//! forgets everything it cached.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tessera_spec::{Digest, RepoName, Tag};

use crate::{StoreError, StoreResult};

/// A metadata change other nodes' caches must hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// A tag was moved or deleted.
    Tag(RepoName, Tag),
    /// A manifest was deleted.
    Manifest(RepoName, Digest),
    /// A blob link was made, changed or removed.
    Link(RepoName, Digest),
}

/// What a node hears of changes made anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeNews {
    /// Exactly these keys changed.
    Keys(Vec<Changed>),
    /// Something changed that the news does not name (too many keys, or news was missed):
    /// everything cached may be stale.
    Unknown,
}

/// A notification's payload must stay under PostgreSQL's 8000 bytes (with room for the
/// counter in front).
const PAYLOAD_MAX: usize = 7900;

/// The keys of a payload, after its counter: one line per key (`t repo tag`, `m repo
/// digest`, `l repo digest`; none of them holds a space), or `*` when they do not fit.
pub(crate) fn encode_keys(changes: &[Changed]) -> String {
    let mut keys = String::new();
    for change in changes {
        let line = match change {
            Changed::Tag(repo, tag) => format!("\nt {repo} {}", tag.as_str()),
            Changed::Manifest(repo, digest) => format!("\nm {repo} {digest}"),
            Changed::Link(repo, digest) => format!("\nl {repo} {digest}"),
        };
        if keys.len() + line.len() > PAYLOAD_MAX {
            return "\n*".into();
        }
        keys.push_str(&line);
    }
    keys
}

/// The counter and news of a payload; anything unreadable is news of an unknown change.
pub(crate) fn decode_news(payload: &str) -> (Option<i64>, ChangeNews) {
    let mut lines = payload.split('\n');
    let counter = lines.next().and_then(|c| c.parse().ok());
    let mut keys = Vec::new();
    for line in lines {
        let mut parts = line.splitn(3, ' ');
        let key = match (parts.next(), parts.next().map(str::parse::<RepoName>), parts.next()) {
            (Some("t"), Some(Ok(repo)), Some(tag)) => tag.parse().ok().map(|tag| Changed::Tag(repo, tag)),
            (Some("m"), Some(Ok(repo)), Some(digest)) => digest.parse().ok().map(|d| Changed::Manifest(repo, d)),
            (Some("l"), Some(Ok(repo)), Some(digest)) => digest.parse().ok().map(|d| Changed::Link(repo, d)),
            _ => None,
        };
        match key {
            Some(key) => keys.push(key),
            None => return (counter, ChangeNews::Unknown),
        }
    }
    (counter, ChangeNews::Keys(keys))
}

/// Locks every node of a cluster respects. A lock is held until its guard drops, and lost
/// when the holding node dies (its connection to the shared store ends), so no lock ever
/// outlives its holder.
#[async_trait]
pub trait ClusterLocks: Send + Sync + 'static {
    /// Takes lock `key` if no task of any node holds it.
    async fn try_lock(&self, key: &str) -> StoreResult<Option<ClusterGuard>>;
    /// Whether this node can take locks now (its coordination connection is up).
    fn connected(&self) -> bool;
}

/// A held cluster lock; dropping it releases the lock.
pub struct ClusterGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl ClusterGuard {
    pub fn new(release: impl Send + Sync + 'static) -> Self {
        ClusterGuard(Box::new(release))
    }
}

/// Takes lock `key`, waiting up to `wait` for its holder; `None` if it is still held then.
pub async fn lock_within(locks: &dyn ClusterLocks, key: &str, wait: Duration) -> StoreResult<Option<ClusterGuard>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(guard) = locks.try_lock(key).await? {
            return Ok(Some(guard));
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// How long a node waits before connecting again after its coordination connection failed:
/// briefly at first, then longer while the database stays away.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MOST: Duration = Duration::from_secs(2);
/// How long a lock request waits for the coordination connection to come back.
const RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// Opens a dedicated connection: the client, and the notifications it receives (the
/// channel closes when the connection ends).
pub(crate) type Connect = Arc<
    dyn Fn() -> futures_util::future::BoxFuture<
            'static,
            Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>), tokio_postgres::Error>,
        > + Send
        + Sync,
>;

/// The connection a node coordinates over, and which of its connections it is (locks
/// taken on an earlier one were released with it).
struct Link {
    client: Arc<tokio_postgres::Client>,
    epoch: u64,
}

/// The cluster coordination of one node over PostgreSQL: one dedicated connection that
/// holds this node's advisory locks and listens for change news.
pub struct PostgresCluster {
    link: Mutex<Option<Link>>,
    /// Keys locked by this node's tasks (advisory locks are re-entrant within one
    /// connection, so two tasks of one node are kept apart here).
    held: Mutex<HashSet<i64>>,
    /// Distinguishes this registry's locks from those of others sharing the database.
    namespace: String,
    runtime: tokio::runtime::Handle,
}

impl PostgresCluster {
    /// Connects with `connect`, listens on `channel`, and from then on tells `on_news` of
    /// every change made by any node, checking the change counter every `poll`. Keeps
    /// reconnecting, in the background, whenever the connection fails.
    pub(crate) async fn start(
        connect: Connect,
        channel: String,
        namespace: String,
        poll: Duration,
        on_news: Arc<dyn Fn(ChangeNews) + Send + Sync>,
    ) -> StoreResult<Arc<PostgresCluster>> {
        let cluster = Arc::new(PostgresCluster {
            link: Mutex::new(None),
            held: Mutex::new(HashSet::new()),
            namespace,
            runtime: tokio::runtime::Handle::current(),
        });
        // The first connection is made here, so a node that cannot coordinate does not start.
        let first = cluster.listen(&connect, &channel).await.map_err(crate::postgres::db_err)?;
        let running = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            let mut next = Some(first);
            let mut epoch = 0;
            let mut pause = RECONNECT_FIRST;
            loop {
                let connected = match next.take() {
                    Some(c) => Ok(c),
                    None => match running.upgrade() {
                        Some(cluster) => cluster.listen(&connect, &channel).await,
                        None => return,
                    },
                };
                match connected {
                    Ok((client, notifications, counter)) => {
                        epoch += 1;
                        let Some(cluster) = running.upgrade() else { return };
                        *cluster.link.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Link { client: client.clone(), epoch });
                        drop(cluster);
                        pause = RECONNECT_FIRST;
                        // Whatever changed while no news came is unknown.
                        on_news(ChangeNews::Unknown);
                        let why = follow(&client, notifications, counter, poll, &*on_news, &running).await;
                        if running.strong_count() == 0 {
                            return;
                        }
                        tracing::warn!("cluster coordination connection lost ({why}); connecting again");
                        let Some(cluster) = running.upgrade() else { return };
                        cluster.link.lock().unwrap_or_else(|p| p.into_inner()).take();
                    }
                    Err(e) => tracing::warn!("cannot connect for cluster coordination: {e}"),
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MOST);
            }
        });
        Ok(cluster)
    }

    /// The coordination connection, waiting a little for one being made again.
    async fn current_link(&self) -> StoreResult<(Arc<tokio_postgres::Client>, u64)> {
        let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
        loop {
            if let Some(link) = self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return Ok((link.client.clone(), link.epoch));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unreachable(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no connection to the database for cluster coordination",
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new connection, listening, and the change counter read after it began to.
    async fn listen(
        &self,
        connect: &Connect,
        channel: &str,
    ) -> Result<(Arc<tokio_postgres::Client>, tokio::sync::mpsc::UnboundedReceiver<String>, i64), tokio_postgres::Error>
    {
        let (client, notifications) = connect().await?;
        // The channel name is made by this crate from hex digits.
        client.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
        let counter = client.query_one("SELECT counter FROM changes", &[]).await?.get(0);
        Ok((Arc::new(client), notifications, counter))
    }

    /// Runs `f` on the current coordination connection (tests reach the server through it).
    #[cfg(test)]
    pub(crate) async fn with_client<F: std::future::Future<Output = ()>>(
        &self,
        f: impl FnOnce(Arc<tokio_postgres::Client>) -> F,
    ) {
        let client = self.link.lock().unwrap().as_ref().expect("connected").client.clone();
        f(client).await
    }

    fn key(&self, name: &str) -> i64 {
        let digest = Digest::sha256_of(format!("{}/{name}", self.namespace).as_bytes());
        let hex = &digest.hex()[..16];
        u64::from_str_radix(hex, 16).unwrap_or(0) as i64
    }
}

/// Follows the change news on one connection until it fails: notifications as they come,
/// the counter every `poll`. Returns why it stopped.
async fn follow(
    client: &tokio_postgres::Client,
    mut notifications: tokio::sync::mpsc::UnboundedReceiver<String>,
    mut seen: i64,
    poll: Duration,
    on_news: &(dyn Fn(ChangeNews) + Send + Sync),
    running: &std::sync::Weak<PostgresCluster>,
) -> String {
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            payload = notifications.recv() => {
                let Some(payload) = payload else { return "the connection ended".into() };
                hear(&payload, &mut seen, on_news);
            }
            _ = ticks.tick() => {
                if running.strong_count() == 0 {
                    return "the node stopped".into();
                }
                let counter: i64 = match client.query_one("SELECT counter FROM changes", &[]).await {
                    Ok(row) => row.get(0),
                    Err(e) => return e.to_string(),
                };
                // The server sends the news of what committed before that read ahead of its
                // answer: whatever of it is still queued here is heard first, so news merely
                // waiting its turn does not cost every cached entry.
                while counter > seen {
                    let Ok(payload) = notifications.try_recv() else { break };
                    hear(&payload, &mut seen, on_news);
                }
                if counter > seen {
                    // A change committed without its news: forget everything rather than
                    // wait to learn which.
                    seen = counter;
                    on_news(ChangeNews::Unknown);
                }
            }
        }
    }
}

/// Hears one notification, given the last change number heard.
fn hear(payload: &str, seen: &mut i64, on_news: &(dyn Fn(ChangeNews) + Send + Sync)) {
    let (counter, news) = decode_news(payload);
    match counter {
        // Changes come in counter order (every write holds the write lock), so a gap means
        // news was lost.
        Some(c) if c == *seen + 1 => {
            *seen = c;
            on_news(news);
        }
        // Older than a counter already read: the forgetting that read caused covered it.
        Some(c) if c <= *seen => {}
        Some(c) => {
            *seen = c;
            on_news(ChangeNews::Unknown);
        }
        None => on_news(ChangeNews::Unknown),
    }
}

/// Releases a node's hold of a key when its guard drops.
struct Held {
    cluster: Arc<PostgresCluster>,
    key: i64,
    client: Arc<tokio_postgres::Client>,
    epoch: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let cluster = self.cluster.clone();
        let (key, client, epoch) = (self.key, self.client.clone(), self.epoch);
        // Released on the server first, then here, so no task of this node takes the key
        // while the server still counts it held by this connection.
        self.cluster.runtime.spawn(async move {
            let current = cluster.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|l| l.epoch);
            if current == Some(epoch)
                && let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&key]).await
            {
                tracing::warn!("cannot release a cluster lock: {e}");
            }
            cluster.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        });
    }
}

#[async_trait]
impl ClusterLocks for Arc<PostgresCluster> {
    async fn try_lock(&self, name: &str) -> StoreResult<Option<ClusterGuard>> {
        let key = self.key(name);
        let (client, epoch) = self.current_link().await?;
        if !self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            return Ok(None);
        }
        let taken = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await;
        match taken {
            Ok(row) if row.get::<_, bool>(0) => {
                Ok(Some(ClusterGuard::new(Held { cluster: self.clone(), key, client, epoch })))
            }
            other => {
                self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                other.map(|_| None).map_err(crate::postgres::db_err)
            }
        }
    }

    fn connected(&self) -> bool {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|l| !l.client.is_closed())
    }
}

/// Spawns a dedicated connection's driver, forwarding its notifications' payloads.
pub(crate) fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
) -> tokio::sync::mpsc::UnboundedReceiver<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if send.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("cluster coordination connection: {e}");
                    return;
                }
            }
        }
    });
    receive
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_round_trips_and_overflows_to_unknown() {
        let repo: RepoName = "team/app".parse().unwrap();
        let changes = vec![
            Changed::Tag(repo.clone(), "v1".parse().unwrap()),
            Changed::Manifest(repo.clone(), Digest::sha256_of(b"m")),
            Changed::Link(repo.clone(), Digest::sha256_of(b"l")),
        ];
        let payload = |counter: i64, changes: &[Changed]| format!("{counter}{}", encode_keys(changes));
        assert_eq!(decode_news(&payload(7, &changes)), (Some(7), ChangeNews::Keys(changes)));
        let many: Vec<Changed> = (0..200).map(|i| Changed::Link(repo.clone(), Digest::sha256_of(&[i]))).collect();
        let payload = payload(i64::MAX, &many);
        assert!(payload.len() < 8000);
        assert_eq!(decode_news(&payload), (Some(i64::MAX), ChangeNews::Unknown));
        assert_eq!(decode_news("9\nx y z"), (Some(9), ChangeNews::Unknown));
    }
}
