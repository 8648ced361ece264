//! `[[notify]]`: HTTP endpoints told of pushes, pulls, deletes and promotions, in
//! Distribution's notification envelope.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The actions an endpoint may ask to hear of.
pub const NOTIFY_EVENTS: [&str; 4] = ["push", "pull", "delete", "promote"];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Where events are POSTed.
    pub url: String,
    /// The endpoint's name in logs, metrics and its queue's directory (default: its
    /// position, `notify-1` for the first); the URL may hold a secret, so it is never shown.
    pub name: Option<String>,
    /// Which actions it hears of: `push` (a manifest stored), `pull` (a manifest served by
    /// GET; off by default, it is the busiest), `delete` (a manifest, tag or blob link),
    /// `promote` (an image copied within the registry).
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Headers sent with every request (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Seconds a delivery may take before it counts as failed (and is retried).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Events kept waiting on disk at most; past it the oldest are dropped (and counted).
    #[serde(default = "default_queue")]
    pub queue_max_events: usize,
    /// The longest wait between retries: after a failure the wait starts at one second and
    /// doubles up to this.
    #[serde(default = "default_backoff")]
    pub backoff_max_secs: u64,
}

fn default_events() -> Vec<String> {
    vec!["push".into(), "delete".into(), "promote".into()]
}

fn default_timeout() -> u64 {
    5
}

fn default_queue() -> usize {
    10_000
}

fn default_backoff() -> u64 {
    300
}

impl Notify {
    /// The endpoint's name: as configured, else `notify-<n>` (1-based position).
    pub fn name_at(&self, position: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("notify-{}", position + 1))
    }

    pub(crate) fn check(&self, position: usize) -> Result<(), String> {
        let name = self.name_at(position);
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("[[notify]] {name}: url must start with https:// or http://"));
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(format!("[[notify]] {name:?}: a name is letters, digits, '-', '_' and '.'"));
        }
        if let Some(unknown) = self.events.iter().find(|e| !NOTIFY_EVENTS.contains(&e.as_str())) {
            return Err(format!("[[notify]] {name}: unknown event {unknown:?} (one of {})", NOTIFY_EVENTS.join(", ")));
        }
        if self.timeout_secs == 0 || self.queue_max_events == 0 || self.backoff_max_secs == 0 {
            return Err(format!(
                "[[notify]] {name}: timeout_secs, queue_max_events and backoff_max_secs must be positive"
            ));
        }
        Ok(())
    }
}
