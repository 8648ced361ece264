//! The web pages (`[ui]`): what the server gathers for each, under who is looking. Pages
//! change nothing (logging in and out only set a cookie); they show only repositories the
//! viewer may pull, and a repository the viewer may not see is answered like one that does
//! not exist.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use tessera_access::Identity;
use tessera_access::session::SessionKey;
use tessera_federation::{Ask, Federation, Found, Resolved, Source, SourceKind, Via};
use tessera_spec::{Accept, Digest, OciError, ParsedManifest, Reference, RepoName};
use tessera_store::TagRecord;
use tessera_ui::model::{self as ui, HealthState, Section};
use tessera_ui::{Frame, SCRIPT, STYLESHEET};

use crate::AppState;
use crate::auth::Caller;
use crate::endpoint::{Asset, Page};

/// The cookie a page login lives in.
const SESSION_COOKIE: &str = "tessera_session";
/// Rows per page of repositories and of tags.
const ROWS: usize = 50;
/// How many store pages one page of repositories reads at most to find ROWS the viewer
/// may see.
const SCANS: usize = 20;
/// The most pages of tags (a bound on the offset a query skips).
const PAGES_MAX: usize = 100_000;
/// The most blobs of one image located and listed.
const BLOBS_SHOWN: usize = 500;
/// The largest login form read.
const FORM_MAX: usize = 8 * 1024;
/// The largest image config read for its summary.
const CONFIG_MAX: usize = 256 * 1024;

/// The pages' settings, when they are served.
pub struct UiSettings {
    pub session: SessionKey,
    /// Whether the listener is TLS (the cookie is then `Secure`).
    pub tls: bool,
}

/// Who is looking at a page.
struct Viewer {
    caller: Option<Caller>,
}

impl Viewer {
    fn user(&self) -> Option<&str> {
        match self.caller.as_ref().map(|c| &c.identity) {
            Some(Identity::User(name)) => Some(name),
            _ => None,
        }
    }
}

/// The answer to a page request.
pub(super) async fn answer(state: &AppState, parts: &Parts, body: &mut Option<Body>, page: Page) -> Response {
    let Some(settings) = &state.ui else {
        return plain(StatusCode::NOT_FOUND, "no such endpoint (the web pages are off: [ui] enabled = false)");
    };
    if let Page::Asset(asset) = page {
        return asset_answer(asset);
    }
    let viewer = viewer(state, settings, parts).await;
    let frame_viewer = ui::Viewer { user: viewer.user().map(str::to_string), can_log_in: state.auth.is_some() };
    let version = env!("CARGO_PKG_VERSION");
    let frame = |title: &'static str, section| Frame { title, viewer: &frame_viewer, section, version };
    let federation = state.federation.load();
    let method = &parts.method;
    let result: Result<Response, PageError> = match (&page, method) {
        (Page::Home, &Method::GET | &Method::HEAD) => {
            Ok(html(tessera_ui::home(&frame("Routes", Section::Routes), &home(&federation))))
        }
        (Page::Repositories { query, after, group }, &Method::GET | &Method::HEAD) => {
            let list =
                repositories(state, &federation, &viewer, parts, query, after.as_deref(), group.as_deref()).await;
            list.map(|l| html(tessera_ui::repositories(&frame("Repositories", Section::Repositories), &l)))
        }
        (Page::Repository { name, page }, &Method::GET | &Method::HEAD) => {
            let repo = repository(state, &federation, &viewer, parts, name, *page).await;
            repo.map(|r| html(tessera_ui::repository(&frame("Repository", Section::Repositories), &r)))
        }
        (Page::Image { name, reference }, &Method::GET | &Method::HEAD) => {
            let image = image(state, &federation, &viewer, parts, name, reference).await;
            image.map(|i| html(tessera_ui::image(&frame("Image", Section::Repositories), &i)))
        }
        (Page::Operations, &Method::GET | &Method::HEAD) => {
            let ops = operations(state, &federation, &viewer, parts).await;
            Ok(html(tessera_ui::operations(&frame("Operations", Section::Operations), &ops)))
        }
        (Page::Login, &Method::GET | &Method::HEAD) => {
            let next = next_of(parts.uri.query());
            Ok(html(tessera_ui::login(&frame("Log in", Section::Login), &next, no_logins(state))))
        }
        (Page::Login, &Method::POST) => {
            return log_in(state, settings, parts, body, &frame("Log in", Section::Login)).await;
        }
        (Page::Logout, &Method::POST) => Ok(logged_out(settings)),
        _ => Err(PageError::Method),
    };
    match result {
        Ok(response) => response,
        Err(PageError::NotFound) => with_status(
            StatusCode::NOT_FOUND,
            html(tessera_ui::problem(
                &frame("Not found", Section::Repositories),
                "Not found",
                "Nothing by that name is here, or you may not see it. Logging in may show more.",
            )),
        ),
        Err(PageError::Method) => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this page"),
        Err(PageError::Failed(e)) => {
            tracing::warn!(path = parts.uri.path(), "page failed: {}", e.message);
            with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                html(tessera_ui::problem(&frame("Unavailable", Section::Routes), "Unavailable", &e.message)),
            )
        }
    }
}

enum PageError {
    NotFound,
    Method,
    Failed(OciError),
}

impl From<OciError> for PageError {
    fn from(e: OciError) -> Self {
        PageError::Failed(e)
    }
}

impl From<tessera_store::StoreError> for PageError {
    fn from(e: tessera_store::StoreError) -> Self {
        PageError::Failed(tessera_registry::store_failure("metadata", e))
    }
}

fn no_logins(state: &AppState) -> Option<&'static str> {
    state.auth.is_none().then_some("This server has no logins: every page is open to whoever reaches it.")
}

/// The viewer: a page login (the cookie), else credentials sent as to the API (Basic or a
/// token), else anonymous. Credentials that do not check out make an anonymous viewer.
async fn viewer(state: &AppState, settings: &UiSettings, parts: &Parts) -> Viewer {
    let Some(auth) = &state.auth else { return Viewer { caller: None } };
    if let Some(login) = cookie(parts, SESSION_COOKIE).and_then(|v| settings.session.verify(v, SystemTime::now()))
        && auth.login_stamp(&login.user).as_deref() == Some(login.stamp.as_str())
    {
        return Viewer { caller: Some(Caller::by_login(Identity::User(login.user))) };
    }
    let caller = auth.identify(parts).await.unwrap_or_else(|_| Caller::by_login(Identity::Anonymous));
    Viewer { caller: Some(caller) }
}

fn cookie<'p>(parts: &'p Parts, name: &str) -> Option<&'p str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Whether the viewer may see `name` served through `resolved`: what they may pull, and a
/// protected static repository only once logged in.
fn may_see(state: &AppState, viewer: &Viewer, name: &RepoName, resolved: &Resolved) -> bool {
    let protected = resolved.sources.iter().any(|(s, n)| s.protected(n));
    match (&state.auth, &viewer.caller) {
        (None, _) => !protected,
        (Some(auth), Some(caller)) => {
            (!protected || caller.identity != Identity::Anonymous) && auth.may_pull(caller, name)
        }
        (Some(_), None) => false,
    }
}

fn resolve(federation: &Federation, parts: &Parts, name: &RepoName) -> Option<Resolved> {
    federation.table.resolve(crate::policy::host(parts), None, name).ok()
}

fn kind(kind: SourceKind) -> ui::SourceKind {
    match kind {
        SourceKind::Hosted => ui::SourceKind::Hosted,
        SourceKind::Cache => ui::SourceKind::Cache,
        SourceKind::Redirect => ui::SourceKind::Redirect,
        SourceKind::Static => ui::SourceKind::Static,
    }
}

// ---- Routes ----

fn home(federation: &Federation) -> ui::Home {
    let upstream_health = |name: &str| {
        federation.caches().find(|(n, _)| *n == name).map(|(_, cache)| contact_health(cache.upstream().last_contact()))
    };
    let card_of = |source: &Arc<dyn Source>| {
        let upstream = source.upstream();
        let (name, detail) = match (source.kind(), upstream) {
            (SourceKind::Hosted, _) => ("this server's repositories".to_string(), None),
            (SourceKind::Static, _) => {
                let label = source.label();
                let name = label.strip_prefix("static ").unwrap_or(&label).to_string();
                let location = federation.statics().find(|s| s.name() == name).map(|s| s.location());
                (name, location)
            }
            (_, Some(u)) => {
                let url = federation.caches().find(|(n, _)| *n == u).map(|(_, c)| c.upstream().config().url.clone());
                (u.to_string(), url)
            }
            (_, None) => (source.label(), None),
        };
        ui::SourceCard { kind: kind(source.kind()), health: upstream.and_then(upstream_health), name, detail }
    };
    let routes = federation
        .table
        .routes()
        .into_iter()
        .map(|r| {
            let mut matches = Vec::new();
            if let Some(p) = &r.prefix {
                matches.push(("prefix", format!("{p}/…")));
            }
            if let Some(h) = &r.host {
                matches.push(("host", h.clone()));
            }
            if let Some(a) = &r.authority {
                matches.push(("ns", a.clone()));
            }
            let mut notes = Vec::new();
            if r.passthrough {
                notes.push("Clients' credentials go to the upstream, which decides who may pull.".to_string());
            }
            ui::RouteCard {
                title: format!("Route {}", r.number),
                matches,
                sources: r.members.iter().map(card_of).collect(),
                pushes: r.push.then(|| "to this server's repositories".to_string()),
                notes,
            }
        })
        .collect();
    let mut otherwise = Vec::new();
    let statics: Vec<_> = federation.statics().collect();
    if !statics.is_empty() {
        otherwise.push(ui::RouteCard {
            title: "A static source that has the name".into(),
            matches: Vec::new(),
            sources: statics
                .iter()
                .map(|s| ui::SourceCard {
                    kind: ui::SourceKind::Static,
                    name: s.name().to_string(),
                    detail: Some(format!("{} ({} repositories)", s.location(), s.repository_count())),
                    health: None,
                })
                .collect(),
            pushes: None,
            notes: Vec::new(),
        });
    }
    for (upstream, source) in federation.table.authorities() {
        let mut card = card_of(source);
        card.detail = Some(upstream.config().url.clone());
        otherwise.push(ui::RouteCard {
            title: format!("containerd asking for {}", upstream.config().authority.join(", ")),
            matches: upstream.config().authority.iter().map(|a| ("ns", a.clone())).collect(),
            sources: vec![card],
            pushes: None,
            notes: Vec::new(),
        });
    }
    otherwise.push(match federation.table.fallback() {
        tessera_config::Fallback::Hosted => ui::RouteCard {
            title: "Every other name".into(),
            matches: Vec::new(),
            sources: vec![ui::SourceCard {
                kind: ui::SourceKind::Hosted,
                name: "this server's repositories".into(),
                detail: None,
                health: None,
            }],
            pushes: Some("to this server's repositories".into()),
            notes: Vec::new(),
        },
        tessera_config::Fallback::None => ui::RouteCard {
            title: "Every other name".into(),
            matches: Vec::new(),
            sources: Vec::new(),
            pushes: None,
            notes: vec!["Not found (fallback = \"none\").".into()],
        },
    });
    ui::Home { routes, otherwise, upstreams: upstream_rows(federation), mirrors: mirror_rows(federation) }
}

fn contact_health(contact: Option<tessera_federation::upstream::Contact>) -> ui::Health {
    match contact {
        None => ui::Health { state: HealthState::Unknown, words: "no request sent since start".into() },
        Some(c) => ui::Health {
            state: if c.answered { HealthState::Healthy } else { HealthState::Failing },
            words: format!(
                "last request {} at {}: {}",
                if c.answered { "answered" } else { "failed" },
                tessera_ui::utc(c.at),
                c.what
            ),
        },
    }
}

fn upstream_rows(federation: &Federation) -> Vec<ui::UpstreamRow> {
    let mut rows: Vec<ui::UpstreamRow> = federation
        .caches()
        .map(|(name, cache)| {
            let (held, bound) = cache.held_bytes();
            let stats = cache.stats();
            let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            ui::UpstreamRow {
                name: name.to_string(),
                url: cache.upstream().config().url.clone(),
                authorities: cache.upstream().config().authority.clone(),
                held,
                bound,
                hits: load(&stats.manifest_hits) + load(&stats.blob_hits),
                misses: load(&stats.blob_misses),
                failures: load(&stats.fetch_failures),
                health: contact_health(cache.upstream().last_contact()),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

fn mirror_rows(federation: &Federation) -> Vec<ui::MirrorRow> {
    federation
        .delivery
        .mirrors()
        .map(|m| ui::MirrorRow {
            base: m.base().to_string(),
            serves: if m.config.networks.is_empty() {
                "every client".into()
            } else {
                m.config.networks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            },
            health: if m.healthy() {
                ui::Health { state: HealthState::Healthy, words: "its health check passes".into() }
            } else {
                ui::Health { state: HealthState::Failing, words: "its health check fails (or has not run yet)".into() }
            },
        })
        .collect()
}

// ---- Repositories ----

/// The group of hosted repositories, as `in=` names it.
const HOSTED_GROUP: &str = "hosted";
/// How many store pages a cache's group reads for the overview of every group (its own
/// page, `in=cache:...`, reads up to [`SCANS`]).
const OVERVIEW_SCANS: usize = 2;

/// Every group of repositories the viewer may see (hosted, each static source, each
/// cache), fifty a page, or only `group`, paged by `after`.
async fn repositories(
    state: &AppState,
    federation: &Federation,
    viewer: &Viewer,
    parts: &Parts,
    query: &str,
    after: Option<&str>,
    group: Option<&str>,
) -> Result<ui::Repositories, PageError> {
    let visible = |name: &RepoName| resolve(federation, parts, name).is_some_and(|r| may_see(state, viewer, name, &r));
    let shown = |id: &str| group.is_none_or(|g| g == id);
    // `after` without `in` pages the hosted group, as before groups were paged.
    let after_in = |id: &str| if group.unwrap_or(HOSTED_GROUP) == id { after } else { None };
    let next = |id: &str, cursor: Option<String>| {
        cursor.map(|after| format!("/ui/repositories?{}", encode(&[("q", query), ("in", id), ("after", &after)])))
    };
    let mut groups = Vec::new();
    if shown(HOSTED_GROUP) {
        // The store applies the search; what is left is shown or hidden.
        let (rows, more, cursor) =
            scan_repositories(state.registry.meta().as_ref(), after_in(HOSTED_GROUP), query, SCANS, |s| {
                if visible(&s.name) { Seen::Shown(summary_row(s.name.to_string(), s)) } else { Seen::Hidden }
            })
            .await?;
        let note = (more && rows.is_empty() && cursor.is_none())
            .then(|| "Many repositories here are not ones you may see; search for a name to find yours.".to_string());
        let next = next(HOSTED_GROUP, cursor);
        groups.push(ui::RepoGroup { title: "on this server".into(), kind: ui::SourceKind::Hosted, rows, next, note });
    }
    for source in federation.statics() {
        let id = format!("static:{}", source.name());
        if !shown(&id) {
            continue;
        }
        let start = after_in(&id);
        let anonymous = viewer.user().is_none();
        let names = source.repositories();
        let mut matching = names.iter().filter(|n| {
            start.is_none_or(|a| n.as_str() > a)
                && n.as_str().contains(query)
                && !(anonymous && source.protected(n))
                && visible(n)
        });
        let rows: Vec<ui::RepoRow> = matching
            .by_ref()
            .take(ROWS)
            .map(|n| ui::RepoRow { name: n.to_string(), link: true, tags: None, bytes: None, pushed: None })
            .collect();
        let more = rows.len() == ROWS && matching.next().is_some();
        let next = next(&id, more.then(|| rows.last().map(|r| r.name.clone())).flatten());
        groups.push(ui::RepoGroup {
            title: format!("static source {}", source.name()),
            kind: ui::SourceKind::Static,
            rows,
            next,
            note: Some(format!("Published at {}.", source.location())),
        });
    }
    for (upstream, cache) in federation.caches() {
        let id = format!("cache:{upstream}");
        if !shown(&id) {
            continue;
        }
        // The cache keeps upstream names; the search and the viewer's rights apply to the
        // names clients pull by, so the store is read unfiltered and paged by its own names.
        let scans = if group.is_some() { SCANS } else { OVERVIEW_SCANS };
        let (rows, more, cursor) = scan_repositories(cache.meta().as_ref(), after_in(&id), "", scans, |s| {
            match federation.table.client_name(upstream, &s.name) {
                Some(client) if visible(&client) => match client.as_str().contains(query) {
                    true => Seen::Shown(summary_row(client.to_string(), s)),
                    false => Seen::Passed,
                },
                _ => Seen::Hidden,
            }
        })
        .await?;
        let note = match (more && rows.is_empty(), cursor.is_some()) {
            (true, true) => "None of the names read so far; the next page reads on.",
            (true, false) => "Many names here are not ones you may see.",
            (false, _) => "What the cache holds now, under the names clients pull it by; bytes are what it keeps.",
        };
        groups.push(ui::RepoGroup {
            title: format!("cached from upstream {upstream}"),
            kind: ui::SourceKind::Cache,
            rows,
            next: next(&id, cursor),
            note: Some(note.into()),
        });
    }
    if groups.is_empty() {
        // `in=` named no group this server has.
        return Err(PageError::NotFound);
    }
    let all_groups = group.map(|_| format!("/ui/repositories?{}", encode(&[("q", query)])));
    Ok(ui::Repositories { query: query.to_string(), groups, all_groups })
}

fn summary_row(name: String, s: tessera_store::RepoSummary) -> ui::RepoRow {
    ui::RepoRow { name, link: true, tags: Some(s.tags), bytes: Some(s.bytes), pushed: s.pushed }
}

/// What one repository a store lists is to the viewer of a page.
enum Seen {
    Shown(ui::RepoRow),
    /// One they may see that the search does not match: a page may start after it.
    Passed,
    /// One they may not see: no link may name it.
    Hidden,
}

/// Up to [`ROWS`] rows of the repositories `meta` holds after `after` (names containing
/// `query`), read a store page at a time, at most `scans` pages: the rows, whether more
/// follow, and where the next page starts when they do: after the last name read that the
/// viewer may see, so no hidden name ever appears in a link. More follow when a further
/// row was found, or the reads ran out before the store did.
async fn scan_repositories(
    meta: &dyn tessera_store::MetaStore,
    after: Option<&str>,
    query: &str,
    scans: usize,
    see: impl Fn(tessera_store::RepoSummary) -> Seen,
) -> Result<(Vec<ui::RepoRow>, bool, Option<String>), PageError> {
    let mut rows = Vec::new();
    let mut cursor = after.map(str::to_string);
    let mut resume = None;
    for _ in 0..scans {
        let (summaries, more_stored) = meta.repository_summaries(cursor.as_deref(), query, ROWS).await?;
        for s in summaries {
            let stored = s.name.to_string();
            cursor = Some(stored.clone());
            match see(s) {
                Seen::Shown(_) if rows.len() == ROWS => return Ok((rows, true, resume)),
                Seen::Shown(row) => {
                    rows.push(row);
                    resume = Some(stored);
                }
                Seen::Passed => resume = Some(stored),
                Seen::Hidden => {}
            }
        }
        if !more_stored {
            return Ok((rows, false, None));
        }
    }
    Ok((rows, true, resume))
}

fn encode(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

// ---- A repository ----

fn served_by(resolved: &Resolved) -> Vec<String> {
    let numbered = resolved.sources.len() > 1;
    resolved
        .sources
        .iter()
        .enumerate()
        .map(|(i, (source, n))| {
            let step = if numbered { format!("{}. ", i + 1) } else { String::new() };
            // Any tag: the words show where a tag's manifest comes from.
            format!("{step}{}", source.describe(n, &Reference::Tag("TAG".parse().expect("a tag"))))
        })
        .collect()
}

async fn repository(
    state: &AppState,
    federation: &Federation,
    viewer: &Viewer,
    parts: &Parts,
    name: &RepoName,
    page: usize,
) -> Result<ui::Repository, PageError> {
    let resolved = resolve(federation, parts, name).ok_or(PageError::NotFound)?;
    if !may_see(state, viewer, name, &resolved) {
        return Err(PageError::NotFound);
    }
    let page = page.min(PAGES_MAX);
    let skip = (page - 1) * ROWS;
    let page_link = |p: usize| format!("/ui/r/{name}?page={p}");
    let mut tags = Vec::new();
    let mut empty = None;
    let mut more = false;
    match resolved.sources.first() {
        Some((source, source_name)) if source.kind() == SourceKind::Hosted || source.caches() => {
            let meta = if source.caches() {
                let upstream = source.upstream().unwrap_or_default();
                federation.caches().find(|(n, _)| *n == upstream).map(|(_, c)| c.meta().clone())
            } else {
                Some(state.registry.meta().clone())
            };
            if let Some(meta) = meta {
                let records = meta.recent_tags(Some(source_name), skip, ROWS + 1).await?;
                more = records.len() > ROWS;
                for record in records.into_iter().take(ROWS) {
                    tags.push(tag_row(meta.as_ref(), &record).await?);
                }
            }
            if tags.is_empty()
                && !source.caches()
                && state.registry.meta().list_tags(source_name, None, 1).await?.is_none()
            {
                return Err(PageError::NotFound);
            }
            if tags.is_empty() {
                empty = Some(if source.caches() {
                    "The cache holds no tag of it yet: pull one, and it shows here.".to_string()
                } else {
                    "No tags.".to_string()
                });
            }
        }
        Some((source, source_name)) => {
            // A static source or a redirect: its tags in name order, without push times.
            let paging = tessera_spec::Paging { n: Some(skip + ROWS + 1), last: None };
            match source.tags(source_name, &paging, &Ask::default()).await? {
                Found::Here(listed) => {
                    more = listed.more || listed.items.len() > skip + ROWS;
                    for tag in listed.items.iter().skip(skip).take(ROWS) {
                        tags.push(ui::TagRow {
                            tag: tag.clone(),
                            digest: String::new(),
                            media_type: String::new(),
                            size: 0,
                            platforms: Vec::new(),
                            pushed: None,
                            referrers: Vec::new(),
                        });
                    }
                }
                Found::Redirect(_) => {
                    empty =
                        Some("Clients are sent to the upstream for this repository; its tags are listed there.".into())
                }
                Found::Absent(_) => return Err(PageError::NotFound),
            }
        }
        None => return Err(PageError::NotFound),
    }
    Ok(ui::Repository {
        name: name.to_string(),
        served_by: served_by(&resolved),
        tags,
        previous: (page > 1).then(|| page_link(page - 1)),
        next: more.then(|| page_link(page + 1)),
        empty,
    })
}

async fn tag_row(meta: &dyn tessera_store::MetaStore, record: &TagRecord) -> Result<ui::TagRow, PageError> {
    let manifest = meta.get_manifest(&record.repo, &record.digest).await?;
    let (media_type, size, platforms) = match &manifest {
        Some(m) => match ParsedManifest::parse(Some(&m.media_type), &m.bytes) {
            Ok(parsed) => {
                let referenced: u64 =
                    parsed.manifests.iter().chain(&parsed.config).chain(&parsed.layers).map(|d| d.size).sum();
                let platforms = platforms_of(&m.bytes).into_iter().map(|(_, p)| p).collect();
                (m.media_type.clone(), m.bytes.len() as u64 + referenced, platforms)
            }
            Err(_) => (m.media_type.clone(), m.bytes.len() as u64, Vec::new()),
        },
        None => (String::new(), 0, Vec::new()),
    };
    let referrers = meta.referrers(&record.repo, &record.digest).await?.iter().map(referrer).collect();
    Ok(ui::TagRow {
        tag: record.tag.to_string(),
        digest: record.digest.to_string(),
        media_type,
        size,
        platforms,
        pushed: Some(record.pushed),
        referrers,
    })
}

/// The platform of each manifest an index lists (digest, `os/arch[/variant]`).
fn platforms_of(index: &[u8]) -> Vec<(String, String)> {
    let Ok(index) = serde_json::from_slice::<serde_json::Value>(index) else { return Vec::new() };
    let Some(listed) = index["manifests"].as_array() else { return Vec::new() };
    listed
        .iter()
        .filter_map(|d| {
            let p = &d["platform"];
            let (os, arch) = (p["os"].as_str()?, p["architecture"].as_str()?);
            let text = match p["variant"].as_str() {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            };
            Some((d["digest"].as_str()?.to_string(), text))
        })
        .collect()
}

/// What a referrer is, in a word: its artifact type, named where it is well known.
fn referrer(m: &tessera_store::ManifestRecord) -> ui::Referrer {
    ui::Referrer { kind: artifact_word(m.artifact_type.as_deref()), digest: m.digest.to_string() }
}

fn artifact_word(artifact_type: Option<&str>) -> String {
    match artifact_type {
        Some(t) if t.contains("cosign") && t.contains("sig") => "signature".into(),
        Some(t) if t.contains("notary") || t.contains("signature") => "signature".into(),
        Some(t) if t.contains("spdx") || t.contains("cyclonedx") || t.contains("sbom") => "SBOM".into(),
        Some(t) if t.contains("in-toto") || t.contains("attestation") => "attestation".into(),
        Some(t) => t.to_string(),
        None => "artifact".into(),
    }
}

// ---- An image ----

async fn image(
    state: &AppState,
    federation: &Federation,
    viewer: &Viewer,
    parts: &Parts,
    name: &RepoName,
    reference: &Reference,
) -> Result<ui::Image, PageError> {
    let resolved = resolve(federation, parts, name).ok_or(PageError::NotFound)?;
    if !may_see(state, viewer, name, &resolved) {
        return Err(PageError::NotFound);
    }
    if resolved.passthrough {
        // Its upstream decides who may pull, from the client's own credentials, which a
        // page does not have.
        return Err(PageError::Failed(OciError::new(
            tessera_spec::ErrorCode::Unsupported,
            "this route passes clients' credentials to its upstream; pull the image to see it",
        )));
    }
    let ask = Ask { client: parts.extensions.get::<crate::ClientAddr>().map(|c| c.0), ..Ask::default() };
    for (position, (source, source_name)) in resolved.sources.iter().enumerate() {
        let manifest = match source.manifest(source_name, reference, &Accept::any(), &ask).await? {
            Found::Here(served) => served.manifest,
            Found::Redirect(url) => {
                return Ok(redirected_image(name, reference, source.label(), &url, parts));
            }
            Found::Absent(_) => continue,
        };
        let parsed = ParsedManifest::parse(Some(&manifest.media_type), &manifest.bytes)?;
        let mut blobs = Vec::new();
        let roles = parsed
            .config
            .iter()
            .map(|d| ("config", d))
            .chain(parsed.layers.iter().map(|d| ("layer", d)))
            .take(BLOBS_SHOWN);
        for (role, d) in roles {
            let located = source.locate(source_name, d).await;
            blobs.push(ui::Blob {
                role,
                digest: d.digest.to_string(),
                media_type: d.media_type.clone(),
                size: d.size,
                via_key: located.via.key(),
                via_name: located.via.name(),
                words: located.words,
            });
        }
        let mut by_via: Vec<(&'static str, &'static str, u64)> = Via::ALL
            .iter()
            .map(|v| (v.key(), v.name(), blobs.iter().filter(|b| b.via_key == v.key()).map(|b| b.size).sum()))
            .filter(|(_, _, bytes)| *bytes > 0)
            .collect();
        by_via.sort_by_key(|v| std::cmp::Reverse(v.2));
        // The config's bytes are read where they are kept, whatever a client would be sent to.
        let reading = Ask { bypass_delivery: true, ..ask.clone() };
        // A cache's config is read only when the cache holds it already: a page fetches
        // nothing from an upstream a pull would not, and nothing a signature rule holds back.
        let config = match &parsed.config {
            Some(d) if d.size <= CONFIG_MAX as u64 => {
                let held = !source.caches() || source.holds(source_name, &d.digest).await.unwrap_or(false);
                if held { config_summary(source.as_ref(), source_name, &d.digest, &reading).await } else { None }
            }
            _ => None,
        };
        let signatures = match federation.signing.rule_for(name, &resolved) {
            Some(_) => federation
                .signing
                .explain(&resolved, position, name, reference, &manifest)
                .await
                .unwrap_or_else(|e| vec![format!("signatures could not be read: {}", e.message)]),
            None => Vec::new(),
        };
        let referrers = match source.referrers(source_name, &manifest.digest, None, &ask).await {
            Ok(Found::Here(found)) => referrer_rows(&found),
            _ => Vec::new(),
        };
        let named = platforms_of(&manifest.bytes);
        let platforms = parsed
            .manifests
            .iter()
            .map(|d| {
                let digest = d.digest.to_string();
                let platform =
                    named.iter().find(|(n, _)| *n == digest).map_or("unnamed".to_string(), |(_, p)| p.clone());
                ui::Platform { platform, digest, size: d.size }
            })
            .collect();
        return Ok(ui::Image {
            name: name.to_string(),
            reference: reference.to_string(),
            digest: manifest.digest.to_string(),
            media_type: manifest.media_type.clone(),
            answered_by: format!("{} (as {source_name})", source.label()),
            platforms,
            config,
            blobs,
            by_via,
            pulls: pull_lines(parts, name, reference),
            signatures,
            referrers,
        });
    }
    Err(PageError::NotFound)
}

fn redirected_image(name: &RepoName, reference: &Reference, label: String, url: &str, parts: &Parts) -> ui::Image {
    ui::Image {
        name: name.to_string(),
        reference: reference.to_string(),
        digest: String::new(),
        media_type: String::new(),
        answered_by: format!("{label}: clients are sent to {url}"),
        platforms: Vec::new(),
        config: None,
        blobs: Vec::new(),
        by_via: Vec::new(),
        pulls: pull_lines(parts, name, reference),
        signatures: Vec::new(),
        referrers: Vec::new(),
    }
}

fn referrer_rows(found: &tessera_registry::Referrers) -> Vec<ui::Referrer> {
    let Ok(index) = serde_json::from_slice::<serde_json::Value>(&found.index) else { return Vec::new() };
    index["manifests"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|d| {
                    Some(ui::Referrer {
                        kind: artifact_word(d["artifactType"].as_str()),
                        digest: d["digest"].as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The image config's platform, creation time, command and labels, when its bytes are at
/// hand (not when the client is sent elsewhere for them).
async fn config_summary(source: &dyn Source, name: &RepoName, digest: &Digest, ask: &Ask) -> Option<ui::ConfigSummary> {
    use futures_util::StreamExt as _;
    let Ok(Found::Here(answer)) = source.blob(name, digest, None, ask).await else { return None };
    if answer.size > CONFIG_MAX as u64 {
        return None;
    }
    let mut bytes = Vec::with_capacity(answer.size as usize);
    let mut stream = answer.read.body;
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.ok()?);
        if bytes.len() > CONFIG_MAX {
            return None;
        }
    }
    let config: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let command: Vec<String> = ["Entrypoint", "Cmd"]
        .iter()
        .filter_map(|k| config["config"][k].as_array())
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let labels = config["config"]["Labels"]
        .as_object()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    Some(ui::ConfigSummary {
        platform: format!(
            "{}/{}",
            text(&config["os"]).unwrap_or_default(),
            text(&config["architecture"]).unwrap_or_default()
        ),
        created: text(&config["created"]),
        command: (!command.is_empty()).then(|| command.join(" ")),
        labels,
    })
}

fn pull_lines(parts: &Parts, name: &RepoName, reference: &Reference) -> Vec<(&'static str, String)> {
    let host = crate::policy::host(parts).unwrap_or("localhost");
    let image = match reference {
        Reference::Tag(t) => format!("{host}/{name}:{t}"),
        Reference::Digest(d) => format!("{host}/{name}@{d}"),
    };
    let file = name.as_str().rsplit('/').next().unwrap_or("image");
    vec![
        ("docker", format!("docker pull {image}")),
        ("podman", format!("podman pull {image}")),
        ("skopeo", format!("skopeo copy docker://{image} oci-archive:{file}.tar")),
    ]
}

// ---- Operations ----

async fn operations(state: &AppState, federation: &Federation, viewer: &Viewer, parts: &Parts) -> ui::Operations {
    let meta = state.registry.meta();
    let stored_bytes = meta.bytes_under("").await.ok();
    let recent = meta.recent_tags(None, 0, 30).await.unwrap_or_default();
    let recent = recent
        .into_iter()
        .filter(|t| resolve(federation, parts, &t.repo).is_some_and(|r| may_see(state, viewer, &t.repo, &r)))
        .take(10)
        .map(|t| ui::RecentPush {
            name: t.repo.to_string(),
            tag: t.tag.to_string(),
            digest: t.digest.to_string(),
            pushed: t.pushed,
        })
        .collect();
    let now = std::time::Instant::now();
    let samples = state
        .metrics
        .recent
        .samples()
        .into_iter()
        .map(|s| ui::Sample {
            seconds_ago: now.duration_since(s.at).as_secs(),
            per_second: s.count as f64 / s.span.as_secs_f64().max(0.001),
            latency_ms: if s.count == 0 { 0.0 } else { s.latency_us as f64 / s.count as f64 / 1000.0 },
        })
        .collect();
    let caches = federation
        .caches()
        .map(|(name, cache)| {
            let (held, bound) = cache.held_bytes();
            ui::CacheUse { name: name.to_string(), held, bound }
        })
        .collect();
    ui::Operations {
        stored_bytes,
        caches,
        figures: state.metrics.collection_figures(),
        recent,
        mirrors: mirror_rows(federation),
        upstreams: upstream_rows(federation),
        samples,
    }
}

// ---- Logging in and out ----

/// Where to go after logging in: a path on this server only (never another site).
fn next_of(query: Option<&str>) -> String {
    let next =
        form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| k == "next").map(|(_, v)| v.into_owned());
    safe_next(next.as_deref())
}

fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.chars().any(|c| c == '\\' || c.is_control() || c.is_whitespace()) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

async fn log_in(
    state: &AppState,
    settings: &UiSettings,
    parts: &Parts,
    body: &mut Option<Body>,
    frame: &Frame<'_>,
) -> Response {
    let Some(auth) = &state.auth else {
        return with_status(StatusCode::NOT_FOUND, html(tessera_ui::login(frame, "/", no_logins(state))));
    };
    let form = match axum::body::to_bytes(super::take(body), FORM_MAX).await {
        Ok(bytes) => bytes,
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "the login form is too large"),
    };
    let fields: Vec<(String, String)> = form_urlencoded::parse(&form).into_owned().collect();
    let field = |k: &str| fields.iter().find(|(name, _)| name == k).map(|(_, v)| v.as_str());
    let next = safe_next(field("next"));
    let (Some(user), Some(password)) = (field("username"), field("password")) else {
        return with_status(
            StatusCode::BAD_REQUEST,
            html(tessera_ui::login(frame, &next, Some("Give a user and a password."))),
        );
    };
    match auth.password_login(parts, user, password).await {
        Ok(login) => {
            let value = settings.session.issue(&login.user, &login.stamp, SystemTime::now());
            let cookie = session_cookie(settings, &value, settings.session.lifetime().as_secs());
            see_other(&next, Some(cookie))
        }
        Err(_) => {
            // Too many failures from this client are refused like any wrong password, here.
            with_status(
                StatusCode::UNAUTHORIZED,
                html(tessera_ui::login(frame, &next, Some("That user and password did not match."))),
            )
        }
    }
}

fn logged_out(settings: &UiSettings) -> Response {
    see_other("/", Some(session_cookie(settings, "", 0)))
}

fn session_cookie(settings: &UiSettings, value: &str, max_age: u64) -> String {
    let secure = if settings.tls { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

// ---- Answers ----

/// Headers every page answer carries: no script or style but this server's, no framing,
/// no sniffing, and no caching of what depends on who is looking.
pub(super) fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name: &'static str, value: &'static str| {
        headers.insert(name, axum::http::HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "x-frame-options", "DENY");
    set(headers, "referrer-policy", "same-origin");
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, "cache-control", "no-store");
    }
    response
}

fn html(text: String) -> Response {
    secured(super::response(StatusCode::OK, &[("content-type", "text/html; charset=utf-8".into())], Body::from(text)))
}

fn plain(status: StatusCode, text: &str) -> Response {
    secured(super::response(
        status,
        &[("content-type", "text/plain; charset=utf-8".into())],
        Body::from(text.to_string()),
    ))
}

fn with_status(status: StatusCode, mut response: Response) -> Response {
    *response.status_mut() = status;
    response
}

fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut headers = vec![("location", location.to_string()), ("content-length", "0".to_string())];
    if let Some(c) = cookie {
        headers.push(("set-cookie", c));
    }
    secured(super::response(StatusCode::SEE_OTHER, &headers, Body::empty()))
}

fn asset_answer(asset: Asset) -> Response {
    let (content_type, text) = match asset {
        Asset::Stylesheet => ("text/css; charset=utf-8", STYLESHEET),
        Asset::Script => ("text/javascript; charset=utf-8", SCRIPT),
        Asset::Icon => ("image/svg+xml", tessera_ui::ICON),
    };
    secured(super::response(
        StatusCode::OK,
        &[("content-type", content_type.into()), ("cache-control", "public, max-age=86400".into())],
        Body::from(text),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_logging_in_a_client_goes_only_somewhere_on_this_server() {
        assert_eq!(safe_next(Some("/ui/r/team/app")), "/ui/r/team/app");
        for elsewhere in [
            None,
            Some("https://evil.example/"),
            Some("//evil.example/"),
            Some("/\\evil.example"),
            Some("/\t/evil.example"),
            Some("/ui\r\nSet-Cookie: x=y"),
            Some("ui"),
        ] {
            assert_eq!(safe_next(elsewhere), "/", "{elsewhere:?}");
        }
    }
}
