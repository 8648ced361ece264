//! What each page shows, gathered by the server and handed over whole: the pages only
//! render it.

use std::time::SystemTime;

/// Who is looking.
pub struct Viewer {
    /// The logged-in user, if any.
    pub user: Option<String>,
    /// Whether this server has logins (so a login link makes sense).
    pub can_log_in: bool,
}

/// The main sections, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Routes,
    Repositories,
    Operations,
    Login,
}

/// How a source is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Hosted,
    Cache,
    Redirect,
    Static,
}

impl SourceKind {
    pub fn word(self) -> &'static str {
        match self {
            SourceKind::Hosted => "hosted",
            SourceKind::Cache => "pull-through cache",
            SourceKind::Redirect => "redirect",
            SourceKind::Static => "static",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            SourceKind::Hosted => "hosted",
            SourceKind::Cache => "cache",
            SourceKind::Redirect => "redirect",
            SourceKind::Static => "static",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    Failing,
    Unknown,
}

/// The health of an upstream or mirror, with what it rests on.
pub struct Health {
    pub state: HealthState,
    pub words: String,
}

/// One member of a route.
pub struct SourceCard {
    pub kind: SourceKind,
    pub name: String,
    /// The upstream's URL, the static source's location.
    pub detail: Option<String>,
    pub health: Option<Health>,
}

/// A route, or one of the ways a name is served when no route matches.
pub struct RouteCard {
    pub title: String,
    /// What it matches: (`prefix`, `team`), (`host`, ...), (`ns`, ...).
    pub matches: Vec<(&'static str, String)>,
    pub sources: Vec<SourceCard>,
    /// Where pushes go, if anywhere.
    pub pushes: Option<String>,
    pub notes: Vec<String>,
}

pub struct UpstreamRow {
    pub name: String,
    pub url: String,
    pub authorities: Vec<String>,
    pub held: u64,
    pub bound: u64,
    pub hits: u64,
    pub misses: u64,
    pub failures: u64,
    pub health: Health,
}

pub struct MirrorRow {
    pub base: String,
    pub serves: String,
    pub health: Health,
}

pub struct Home {
    pub routes: Vec<RouteCard>,
    pub otherwise: Vec<RouteCard>,
    pub upstreams: Vec<UpstreamRow>,
    pub mirrors: Vec<MirrorRow>,
}

pub struct RepoRow {
    pub name: String,
    /// Whether the page of the repository can be opened (hosted and static ones).
    pub link: bool,
    pub tags: Option<u64>,
    pub bytes: Option<u64>,
    pub pushed: Option<SystemTime>,
}

/// A group of repositories: hosted, a static source, a cache.
pub struct RepoGroup {
    pub title: String,
    pub kind: SourceKind,
    pub rows: Vec<RepoRow>,
    /// The link to the next page of this group.
    pub next: Option<String>,
    pub note: Option<String>,
}

pub struct Repositories {
    pub query: String,
    pub groups: Vec<RepoGroup>,
    /// Set when one group is shown alone: the page of every group.
    pub all_groups: Option<String>,
}

pub struct Referrer {
    pub kind: String,
    pub digest: String,
}

pub struct TagRow {
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    /// The manifest's own size plus what it references (config and layers of an image;
    /// the manifests of an index).
    pub size: u64,
    pub platforms: Vec<String>,
    pub pushed: Option<SystemTime>,
    pub referrers: Vec<Referrer>,
}

pub struct Repository {
    pub name: String,
    /// How the name is served, in words (the route and its sources).
    pub served_by: Vec<String>,
    pub tags: Vec<TagRow>,
    pub previous: Option<String>,
    pub next: Option<String>,
    /// Why no tags are listed, when none are.
    pub empty: Option<String>,
}

/// Where one blob comes from.
pub struct Blob {
    pub role: &'static str,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// The `Via` key and its name.
    pub via_key: &'static str,
    pub via_name: &'static str,
    pub words: String,
}

pub struct Platform {
    pub platform: String,
    pub digest: String,
    pub size: u64,
}

pub struct ConfigSummary {
    pub platform: String,
    pub created: Option<String>,
    pub command: Option<String>,
    pub labels: Vec<(String, String)>,
}

pub struct Image {
    pub name: String,
    pub reference: String,
    pub digest: String,
    pub media_type: String,
    /// The source that answered, in words.
    pub answered_by: String,
    pub platforms: Vec<Platform>,
    pub config: Option<ConfigSummary>,
    pub blobs: Vec<Blob>,
    /// Bytes per kind of place (`Via` key, name, bytes), largest first.
    pub by_via: Vec<(&'static str, &'static str, u64)>,
    pub pulls: Vec<(&'static str, String)>,
    pub signatures: Vec<String>,
    pub referrers: Vec<Referrer>,
}

pub struct CacheUse {
    pub name: String,
    pub held: u64,
    pub bound: u64,
}

/// One point of the request chart.
pub struct Sample {
    pub seconds_ago: u64,
    pub per_second: f64,
    /// Mean time to an answer's head over the interval, in milliseconds.
    pub latency_ms: f64,
}

pub struct RecentPush {
    pub name: String,
    pub tag: String,
    pub digest: String,
    pub pushed: SystemTime,
}

pub struct Operations {
    pub stored_bytes: Option<u64>,
    pub caches: Vec<CacheUse>,
    /// Garbage collection and other figures, in words: (what, value).
    pub figures: Vec<(String, String)>,
    pub recent: Vec<RecentPush>,
    pub mirrors: Vec<MirrorRow>,
    pub upstreams: Vec<UpstreamRow>,
    pub samples: Vec<Sample>,
}
