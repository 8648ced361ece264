//! Notifications (`[[notify]]`): what happened to a repository (a push, a pull, a delete,
//! a promotion) told to HTTP endpoints in Distribution's envelope
//! (`application/vnd.docker.distribution.events.v1+json`), so receivers written for
//! Distribution read them unchanged.
//!
//! Handlers only say what happened (a [`Happenings`] extension on their answer); the
//! access layer adds who asked and how, and [`Notifier::publish`] writes each event to the
//! queue of every endpoint that wants it: one file per event in the endpoint's directory
//! under the data directory, so events outlive a restart, a killed process and an endpoint
//! that is down (the files are not fsynced: a power loss may lose the newest). A task per
//! endpoint sends the oldest events, up to [`BATCH`] per request, removes them once the
//! endpoint answered 2xx, and otherwise retries with a backoff doubling from one second to
//! `backoff_max_secs`. A queue holds at most `queue_max_events`; past it the oldest go,
//! counted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tessera_config::Notify as NotifyConfig;
use tessera_spec::{Digest, RepoName, Tag};

/// Events per request to an endpoint.
pub const BATCH: usize = 100;

const ENVELOPE: &str = "application/vnd.docker.distribution.events.v1+json";

/// What happened, as the `action` of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Push,
    Pull,
    Delete,
    Promote,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Pull => "pull",
            Action::Delete => "delete",
            Action::Promote => "promote",
        }
    }
}

/// One thing that happened to a repository, as a handler saw it.
#[derive(Debug, Clone)]
pub struct Happened {
    pub action: Action,
    pub repository: RepoName,
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    pub tag: Option<Tag>,
    /// Where a promotion copied from.
    pub from: Option<RepoName>,
}

/// The answer extension a handler leaves for the notifier: what happened, and who did it
/// (the login's name; `None` for an anonymous caller).
#[derive(Debug, Clone, Default)]
pub struct Happenings {
    pub events: Vec<Happened>,
    pub actor: Option<String>,
}

/// Who asked, and how: the envelope's `request` and `actor`.
pub(crate) struct Asked<'a> {
    pub id: &'a str,
    pub addr: Option<std::net::IpAddr>,
    pub host: Option<&'a str>,
    pub method: &'a str,
    pub user_agent: Option<&'a str>,
    pub actor: Option<&'a str>,
}

/// Figures of one endpoint, for `/metrics`.
#[derive(Default)]
pub struct EndpointStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped: AtomicU64,
}

struct Endpoint {
    config: NotifyConfig,
    name: String,
    dir: PathBuf,
    /// Sequence numbers of the events waiting (oldest first).
    queue: Mutex<BTreeSet<u64>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
    stats: EndpointStats,
}

/// Every configured endpoint with its queue and sender.
pub struct Notifier {
    endpoints: Vec<Arc<Endpoint>>,
    /// This process, as every event's `source` names it.
    instance: String,
    /// The listener's scheme and address, once bound ([`Notifier::listening`]).
    listener: std::sync::OnceLock<(&'static str, String)>,
}

impl Notifier {
    /// Opens each endpoint's queue under `<data>/notify/<name>/` (events left by an earlier
    /// run are sent first) and starts its sender. `None` without endpoints. Runs inside the
    /// server's runtime.
    pub fn start(configs: &[NotifyConfig], data: &Path) -> std::io::Result<Option<Arc<Notifier>>> {
        if configs.is_empty() {
            return Ok(None);
        }
        let http = tessera_client::upstream::content_client(false).map_err(std::io::Error::other)?;
        let mut endpoints = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let name = config.name_at(i);
            let dir = data.join("notify").join(&name);
            std::fs::create_dir_all(&dir)?;
            let mut waiting = BTreeSet::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let file = entry.file_name();
                let file = file.to_string_lossy();
                match file.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()) {
                    Some(seq) => {
                        waiting.insert(seq);
                    }
                    // Half-written by a process that died mid-write.
                    None if file.ends_with(".partial") => std::fs::remove_file(entry.path())?,
                    None => {}
                }
            }
            if !waiting.is_empty() {
                tracing::info!(endpoint = name, "{} notification(s) left from before are sent first", waiting.len());
            }
            let next = waiting.last().map_or(1, |n| n + 1);
            let endpoint = Arc::new(Endpoint {
                config: config.clone(),
                name,
                dir,
                queue: Mutex::new(waiting),
                next: AtomicU64::new(next),
                wake: tokio::sync::Notify::new(),
                stats: EndpointStats::default(),
            });
            tokio::spawn(send_forever(endpoint.clone(), http.clone()));
            endpoints.push(endpoint);
        }
        let instance = uuid::Uuid::new_v4().to_string();
        Ok(Some(Arc::new(Notifier { endpoints, instance, listener: std::sync::OnceLock::new() })))
    }

    /// Names the listener once it is bound: events carry its address as their `source`,
    /// and target URLs its scheme.
    pub fn listening(&self, scheme: &'static str, addr: std::net::SocketAddr) {
        let _ = self.listener.set((scheme, addr.to_string()));
    }

    /// Whether any endpoint hears of `action` (pulls are common: a handler asks first).
    pub fn wants(&self, action: Action) -> bool {
        self.endpoints.iter().any(|e| e.wants(action))
    }

    /// Queues an event for each of `happened` at every endpoint that wants it, before the
    /// answer goes out. The queue files are written on the blocking pool, so a slow disk
    /// holds up this answer only, never the requests sharing its thread.
    pub(crate) async fn publish(&self, happened: &[Happened], asked: &Asked<'_>) {
        let timestamp = jiff::Timestamp::now().to_string();
        let mut queued: Vec<(Arc<Endpoint>, Arc<str>)> = Vec::new();
        for (i, h) in happened.iter().enumerate() {
            let wanting = self.endpoints.iter().filter(|e| e.wants(h.action));
            let mut event = None;
            for endpoint in wanting {
                let bytes = event.get_or_insert_with(|| {
                    Arc::<str>::from(self.event(h, asked, &format!("{}-{i}", asked.id), &timestamp).to_string())
                });
                queued.push((endpoint.clone(), bytes.clone()));
            }
        }
        if queued.is_empty() {
            return;
        }
        let written = tokio::task::spawn_blocking(move || {
            for (endpoint, bytes) in queued {
                endpoint.enqueue(&bytes);
            }
        });
        if let Err(e) = written.await {
            tracing::error!("notifications not queued: {e}");
        }
    }

    fn event(&self, h: &Happened, asked: &Asked<'_>, id: &str, timestamp: &str) -> serde_json::Value {
        let mut target = json!({ "repository": h.repository.to_string() });
        if let Some(d) = &h.digest {
            target["digest"] = json!(d.to_string());
            let (scheme, listener) = self.listener.get().map_or(("http", ""), |(s, a)| (*s, a.as_str()));
            let host = asked.host.unwrap_or(listener);
            let url = format!("{scheme}://{host}/v2/{}/manifests/{d}", h.repository);
            target["url"] = json!(url);
        }
        if let Some(m) = &h.media_type {
            target["mediaType"] = json!(m);
        }
        if let Some(size) = h.size {
            target["size"] = json!(size);
            target["length"] = json!(size);
        }
        if let Some(tag) = &h.tag {
            target["tag"] = json!(tag.to_string());
        }
        if let Some(from) = &h.from {
            target["fromRepository"] = json!(from.to_string());
        }
        json!({
            "id": id,
            "timestamp": timestamp,
            "action": h.action.as_str(),
            "target": target,
            "request": {
                "id": asked.id,
                "addr": asked.addr.map(|a| a.to_string()),
                "host": asked.host,
                "method": asked.method,
                "useragent": asked.user_agent,
            },
            "actor": { "name": asked.actor },
            "source": {
                "addr": self.listener.get().map(|(_, addr)| addr.as_str()),
                "instanceID": self.instance,
            },
        })
    }

    /// Each endpoint's name, events waiting and figures.
    pub fn figures(&self) -> impl Iterator<Item = (&str, usize, &EndpointStats)> {
        self.endpoints.iter().map(|e| (e.name.as_str(), e.waiting(), &e.stats))
    }
}

impl Endpoint {
    fn wants(&self, action: Action) -> bool {
        self.config.events.iter().any(|e| e == action.as_str())
    }

    fn waiting(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// Writes the event (through a temporary name, so a reader never sees half of one) and
    /// wakes the sender; past the bound, the oldest event goes.
    fn enqueue(&self, event: &str) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let partial = self.dir.join(format!("{seq:020}.partial"));
        let written = std::fs::write(&partial, event).and_then(|()| std::fs::rename(&partial, self.path(seq)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            tracing::error!(endpoint = self.name, "cannot queue a notification: {e}");
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dropped = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.insert(seq);
            let excess = queue.len().saturating_sub(self.config.queue_max_events);
            (0..excess).filter_map(|_| queue.pop_first()).collect::<Vec<_>>()
        };
        if !dropped.is_empty() {
            tracing::warn!(endpoint = self.name, "notification queue full: dropped the {} oldest", dropped.len());
            self.stats.dropped.fetch_add(dropped.len() as u64, Ordering::Relaxed);
            for seq in dropped {
                let _ = std::fs::remove_file(self.path(seq));
            }
        }
        self.wake.notify_one();
    }

    /// The oldest waiting events, up to [`BATCH`], read from their files (an unreadable
    /// one is dropped, said so).
    fn oldest(&self) -> Vec<(u64, serde_json::Value)> {
        let seqs: Vec<u64> = self.queue.lock().unwrap_or_else(|p| p.into_inner()).iter().take(BATCH).copied().collect();
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match std::fs::read(self.path(seq)).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
                Ok(Ok(event)) => events.push((seq, event)),
                Ok(Err(_)) | Err(_) => {
                    tracing::error!(endpoint = self.name, seq, "a queued notification is unreadable; dropped");
                    self.forget(&[seq]);
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        events
    }

    /// Takes sent (or dropped) events out of the queue and off the disk.
    fn forget(&self, seqs: &[u64]) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !seqs.contains(s));
        for seq in seqs {
            let _ = std::fs::remove_file(self.path(*seq));
        }
    }

    async fn send(&self, http: &reqwest::Client, events: Vec<serde_json::Value>) -> Result<(), String> {
        let mut request = http
            .post(&self.config.url)
            .header("content-type", ENVELOPE)
            .timeout(Duration::from_secs(self.config.timeout_secs))
            .body(json!({ "events": events }).to_string());
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("answered {}", r.status())),
            Err(e) => Err(tessera_client::error::chain(&e)),
        }
    }
}

/// Sends `endpoint`'s events for as long as the process runs.
async fn send_forever(endpoint: Arc<Endpoint>, http: reqwest::Client) {
    let max_wait = Duration::from_secs(endpoint.config.backoff_max_secs);
    let mut wait = Duration::from_secs(1);
    loop {
        let batch = endpoint.oldest();
        if batch.is_empty() {
            endpoint.wake.notified().await;
            continue;
        }
        let (seqs, events): (Vec<u64>, Vec<serde_json::Value>) = batch.into_iter().unzip();
        match endpoint.send(&http, events).await {
            Ok(()) => {
                endpoint.forget(&seqs);
                endpoint.stats.delivered.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                wait = Duration::from_secs(1);
            }
            Err(why) => {
                endpoint.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    endpoint = endpoint.name,
                    waiting = endpoint.waiting(),
                    "notifications not delivered ({why}); retrying in {} s",
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(max_wait);
            }
        }
    }
}
