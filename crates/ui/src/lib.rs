//! The read-only web pages of Tessera, rendered on the server: each page is a function of
//! what the server gathered for it ([`model`]), returning a whole HTML document. No
//! inline script or style: the pages run under a CSP of `'self'` only, so the one
//! stylesheet and the one script are served beside them ([`STYLESHEET`], [`SCRIPT`]), and
//! bars and charts are SVG drawn here.

pub mod model;

use std::time::SystemTime;

use maud::{DOCTYPE, Markup, html};

use model::*;

/// The stylesheet, served at [`STYLESHEET_PATH`].
pub const STYLESHEET: &str = include_str!("../assets/tessera.css");
/// The script (copy buttons), served at [`SCRIPT_PATH`].
pub const SCRIPT: &str = include_str!("../assets/tessera.js");
/// The icon, served at [`ICON_PATH`].
pub const ICON: &str = include_str!("../assets/icon.svg");
pub const STYLESHEET_PATH: &str = "/ui/assets/tessera.css";
pub const ICON_PATH: &str = "/ui/assets/icon.svg";
pub const SCRIPT_PATH: &str = "/ui/assets/tessera.js";

/// The frame around every page: head, skip link, navigation, search, who is logged in.
pub struct Frame<'a> {
    pub title: &'a str,
    pub viewer: &'a Viewer,
    pub section: Section,
    /// The server's version (also busts the assets' caches).
    pub version: &'a str,
}

fn page(frame: &Frame<'_>, main: Markup) -> String {
    let nav = [
        (Section::Routes, "/", "Routes"),
        (Section::Repositories, "/ui/repositories", "Repositories"),
        (Section::Operations, "/ui/operations", "Operations"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (frame.title) " · Tessera" }
                link rel="stylesheet" href={ (STYLESHEET_PATH) "?v=" (frame.version) };
                link rel="icon" type="image/svg+xml" href=(ICON_PATH);
                script src={ (SCRIPT_PATH) "?v=" (frame.version) } defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Tessera" }
                    nav aria-label="Main" {
                        ul {
                            @for (section, href, label) in nav {
                                li {
                                    a href=(href) aria-current=[(section == frame.section).then_some("page")] { (label) }
                                }
                            }
                        }
                    }
                    form.search role="search" action="/ui/repositories" method="get" {
                        label for="search-box" { "Search repositories" }
                        input #search-box type="search" name="q" placeholder="name contains…" autocomplete="off";
                        button type="submit" { "Search" }
                    }
                    div.viewer {
                        @if let Some(user) = &frame.viewer.user {
                            span { "Signed in as " strong { (user) } }
                            form method="post" action="/ui/logout" { button type="submit" { "Log out" } }
                        } @else if frame.viewer.can_log_in {
                            a href="/ui/login" { "Log in" }
                        }
                    }
                }
                main #main { (main) }
                footer { "Tessera " (frame.version) " · a read-only view: nothing here changes the registry." }
            }
        }
    }
    .into_string()
}

/// `/`: the routing table as cards of what each route matches and where it goes.
pub fn home(frame: &Frame<'_>, home: &Home) -> String {
    let main = html! {
        h1 { "Routes" }
        p.lead {
            "A name is served by the first route that matches it; each route asks its sources in order. "
            "Where the bytes of each layer come from is on each image's page."
        }
        @if home.routes.is_empty() {
            p { "No routes are configured." }
        } @else {
            ol.routes {
                @for card in &home.routes { li { (route_card(card)) } }
            }
        }
        h2 { "When no route matches" }
        ol.routes {
            @for card in &home.otherwise { li { (route_card(card)) } }
        }
        @if !home.upstreams.is_empty() {
            h2 #upstreams { "Upstreams" }
            (upstream_table(&home.upstreams))
        }
        @if !home.mirrors.is_empty() {
            h2 #mirrors { "Mirrors" }
            (mirror_table(&home.mirrors))
        }
    };
    page(frame, main)
}

fn route_card(card: &RouteCard) -> Markup {
    html! {
        section.route aria-label=(card.title) {
            div.matches {
                h3 { (card.title) }
                @if card.matches.is_empty() {
                    span.chip { "any name" }
                }
                @for (what, value) in &card.matches {
                    span.chip { span.what { (what) } " " code { (value) } }
                }
            }
            div.arrow aria-hidden="true" { "→" }
            ol.sources {
                @for source in &card.sources {
                    li class={ "source kind-" (source.kind.key()) } {
                        span.kind { (source.kind.word()) }
                        " " strong { (source.name) }
                        @if let Some(detail) = &source.detail {
                            " " code.detail { (detail) }
                        }
                        @if let Some(health) = &source.health {
                            " " (health_badge(health))
                        }
                    }
                }
            }
            div.notes {
                @if let Some(pushes) = &card.pushes { p { "Pushes: " (pushes) } } @else { p { "Read-only" } }
                @for note in &card.notes { p { (note) } }
            }
        }
    }
}

fn health_badge(health: &Health) -> Markup {
    let (class, word) = match health.state {
        HealthState::Healthy => ("health ok", "healthy"),
        HealthState::Failing => ("health failing", "failing"),
        HealthState::Unknown => ("health unknown", "not asked yet"),
    };
    html! { span class=(class) title=(health.words) { (word) span.visually-hidden { ": " (health.words) } } }
}

fn upstream_table(rows: &[UpstreamRow]) -> Markup {
    html! {
        div.scroll {
            table {
                caption { "Each upstream, its cache, and how its last request went" }
                thead { tr {
                    th scope="col" { "Upstream" } th scope="col" { "URL" } th scope="col" { "Answers for (ns)" }
                    th scope="col" { "Cache held" } th scope="col" { "Hits / misses" } th scope="col" { "Failed fetches" }
                    th scope="col" { "Health" }
                } }
                tbody {
                    @for u in rows {
                        tr {
                            th scope="row" { (u.name) }
                            td { code { (u.url) } }
                            td { @if u.authorities.is_empty() { "—" } @else { (u.authorities.join(", ")) } }
                            td { (usage(u.held, u.bound)) }
                            td { (u.hits) " / " (u.misses) }
                            td { (u.failures) }
                            td { (health_badge(&u.health)) " " small { (u.health.words) } }
                        }
                    }
                }
            }
        }
    }
}

fn mirror_table(rows: &[MirrorRow]) -> Markup {
    html! {
        div.scroll {
            table {
                caption { "Mirrors clients are sent to, by their network" }
                thead { tr { th scope="col" { "Mirror" } th scope="col" { "Serves" } th scope="col" { "Health" } } }
                tbody {
                    @for m in rows {
                        tr {
                            th scope="row" { code { (m.base) } }
                            td { (m.serves) }
                            td { (health_badge(&m.health)) " " small { (m.health.words) } }
                        }
                    }
                }
            }
        }
    }
}

/// A held/bound figure with a meter.
fn usage(held: u64, bound: u64) -> Markup {
    html! {
        @if bound > 0 {
            meter min="0" max=(bound) value=(held) { (bytes(held)) " of " (bytes(bound)) }
            " " (bytes(held)) " of " (bytes(bound))
        } @else {
            (bytes(held))
        }
    }
}

/// `/ui/repositories`: hosted repositories (paged), static sources, what caches hold.
pub fn repositories(frame: &Frame<'_>, list: &Repositories) -> String {
    let main = html! {
        h1 { "Repositories" }
        @if !list.query.is_empty() {
            p.lead { "Names containing " code { (list.query) } ". " a href="/ui/repositories" { "Show all" } }
        }
        @if let Some(all) = &list.all_groups {
            p.lead { "One group of repositories. " a href=(all) { "Every group" } }
        }
        @for group in &list.groups {
            section.group aria-labelledby={ "group-" (slug(&group.title)) } {
                h2 id={ "group-" (slug(&group.title)) } { span class={ "kind kind-" (group.kind.key()) } { (group.kind.word()) } " " (group.title) }
                @if let Some(note) = &group.note { p.note { (note) } }
                @if group.rows.is_empty() {
                    p { "None." }
                } @else {
                    div.scroll {
                        table.repos {
                            caption { "Repositories " (group.title) }
                            thead { tr {
                                th scope="col" { "Repository" } th scope="col" { "Tags" }
                                th scope="col" { "Size" } th scope="col" { "Last push" }
                            } }
                            tbody {
                                @for row in &group.rows {
                                    tr {
                                        th scope="row" {
                                            @if row.link { a href={ "/ui/r/" (row.name) } { (row.name) } } @else { (row.name) }
                                        }
                                        td.num { @if let Some(t) = row.tags { (t) } @else { "—" } }
                                        td.num { @if let Some(b) = row.bytes { (bytes(b)) } @else { "—" } }
                                        td { @if let Some(p) = row.pushed { (when(p)) } @else { "—" } }
                                    }
                                }
                            }
                        }
                    }
                }
                @if let Some(next) = &group.next {
                    nav.paging aria-label={ (group.title) " pages" } { a rel="next" href=(next) { "Next page →" } }
                }
            }
        }
    };
    page(frame, main)
}

/// `/ui/r/NAME`: its tags, newest first.
pub fn repository(frame: &Frame<'_>, repo: &Repository) -> String {
    let main = html! {
        h1 { (repo.name) }
        ul.served { @for line in &repo.served_by { li { (line) } } }
        @if let Some(why) = &repo.empty {
            p { (why) }
        } @else {
            div.scroll {
                table.tags {
                    caption { "Tags, most recently pushed first" }
                    thead { tr {
                        th scope="col" { "Tag" } th scope="col" { "Digest" } th scope="col" { "Type" }
                        th scope="col" { "Size" } th scope="col" { "Platforms" } th scope="col" { "Pushed" }
                        th scope="col" { "Referrers" }
                    } }
                    tbody {
                        @for t in &repo.tags {
                            tr {
                                th scope="row" { a href={ "/ui/r/" (repo.name) "/-/" (t.tag) } { (t.tag) } }
                                td { code.digest title=(t.digest) { (short_digest(&t.digest)) } }
                                td { (media_word(&t.media_type)) }
                                td.num { (bytes(t.size)) }
                                td { (t.platforms.join(", ")) }
                                td { @if let Some(p) = t.pushed { (when(p)) } @else { "—" } }
                                td {
                                    @for r in &t.referrers {
                                        a.referrer href={ "/ui/r/" (repo.name) "/-/" (r.digest) } { (r.kind) } " "
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (paging(repo.previous.as_deref(), repo.next.as_deref(), "Tag pages"))
    };
    page(frame, main)
}

fn paging(previous: Option<&str>, next: Option<&str>, label: &str) -> Markup {
    html! {
        @if previous.is_some() || next.is_some() {
            nav.paging aria-label=(label) {
                @if let Some(p) = previous { a rel="prev" href=(p) { "← Newer" } }
                @if let Some(n) = next { a rel="next" href=(n) { "Older →" } }
            }
        }
    }
}

/// `/ui/r/NAME/-/REFERENCE`: one image, and where a client is sent for each of its blobs.
pub fn image(frame: &Frame<'_>, image: &Image) -> String {
    let total: u64 = image.by_via.iter().map(|(_, _, b)| b).sum();
    let main = html! {
        h1 { (image.name) span.reference { (separator(&image.reference)) (image.reference) } }
        dl.facts {
            dt { "Digest" } dd { code { (image.digest) } }
            dt { "Type" } dd { (image.media_type) }
            dt { "Answered by" } dd { (image.answered_by) }
            @if let Some(config) = &image.config {
                dt { "Platform" } dd { (config.platform) }
                @if let Some(created) = &config.created { dt { "Created" } dd { (created) } }
                @if let Some(command) = &config.command { dt { "Runs" } dd { code { (command) } } }
            }
        }
        section aria-labelledby="pull" {
            h2 #pull { "Pull it" }
            ul.pulls {
                @for (client, line) in &image.pulls {
                    li {
                        span.client { (client) }
                        code.command { (line) }
                        button.copy type="button" data-copy=(line) aria-label={ "Copy the " (client) " command" } { "Copy" }
                    }
                }
            }
        }
        @if !image.platforms.is_empty() {
            section aria-labelledby="platforms" {
                h2 #platforms { "Platforms" }
                table {
                    caption { "The manifest of each platform" }
                    thead { tr { th scope="col" { "Platform" } th scope="col" { "Manifest" } th scope="col" { "Size" } } }
                    tbody {
                        @for p in &image.platforms {
                            tr {
                                th scope="row" { (p.platform) }
                                td { a href={ "/ui/r/" (image.name) "/-/" (p.digest) } { code { (short_digest(&p.digest)) } } }
                                td.num { (bytes(p.size)) }
                            }
                        }
                    }
                }
            }
        }
        @if !image.blobs.is_empty() {
            section aria-labelledby="sources" {
                h2 #sources { "Where the bytes come from" }
                (stacked_bar(&image.by_via, total))
                ul.legend {
                    @for (key, name, b) in &image.by_via {
                        li { span class={ "swatch via-" (key) } {} " " (name) ": " (bytes(*b)) }
                    }
                }
                div.scroll {
                    table.blobs {
                        caption { "Each blob, and where a client is sent for it" }
                        thead { tr {
                            th scope="col" { "Blob" } th scope="col" { "Digest" } th scope="col" { "Size" }
                            th scope="col" { "A client is sent to" }
                        } }
                        tbody {
                            @for b in &image.blobs {
                                tr {
                                    th scope="row" { (b.role) }
                                    td { code.digest title=(b.digest) { (short_digest(&b.digest)) } }
                                    td.num { (bytes(b.size)) }
                                    td { span class={ "via via-" (b.via_key) } { (b.via_name) } " " small { (b.words) } }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(config) = &image.config && !config.labels.is_empty() {
            section aria-labelledby="labels" {
                h2 #labels { "Labels" }
                dl.labels { @for (k, v) in &config.labels { dt { (k) } dd { (v) } } }
            }
        }
        section aria-labelledby="signatures" {
            h2 #signatures { "Signatures and referrers" }
            @if image.signatures.is_empty() && image.referrers.is_empty() { p { "None found." } }
            ul {
                @for line in &image.signatures { li { (line) } }
                @for r in &image.referrers {
                    li { (r.kind) ": " a href={ "/ui/r/" (image.name) "/-/" (r.digest) } { code { (short_digest(&r.digest)) } } }
                }
            }
        }
    };
    page(frame, main)
}

/// One bar, a segment per kind of place, as wide as its share of the bytes.
fn stacked_bar(parts: &[(&'static str, &'static str, u64)], total: u64) -> Markup {
    const WIDTH: f64 = 1000.0;
    let mut x = 0.0;
    let mut segments = Vec::new();
    for (key, name, b) in parts {
        let w = *b as f64 * WIDTH / total.max(1) as f64;
        segments.push((*key, *name, *b, x, w));
        x += w;
    }
    let described: Vec<String> = parts
        .iter()
        .map(|(_, name, b)| format!("{name} {}%", (*b as f64 * 100.0 / total.max(1) as f64).round()))
        .collect();
    html! {
        svg.bar viewBox="0 0 1000 40" preserveAspectRatio="none" role="img" aria-label={ "Bytes by source: " (described.join(", ")) } {
            @for (key, name, b, x, w) in segments {
                rect class={ "via-" (key) } x=(format!("{x:.1}")) y="0" width=(format!("{w:.1}")) height="40" {
                    title { (name) ": " (bytes(b)) }
                }
            }
        }
    }
}

/// `/ui/operations`: storage, caches, garbage collection, recent pushes, health, traffic.
pub fn operations(frame: &Frame<'_>, ops: &Operations) -> String {
    let main = html! {
        h1 { "Operations" }
        section aria-labelledby="storage" {
            h2 #storage { "Storage" }
            dl.facts {
                dt { "Hosted blobs" } dd { @if let Some(b) = ops.stored_bytes { (bytes(b)) } @else { "—" } }
                @for c in &ops.caches { dt { "Cache of " (c.name) } dd { (usage(c.held, c.bound)) } }
                @for (what, value) in &ops.figures { dt { (what) } dd { (value) } }
            }
        }
        section aria-labelledby="traffic" {
            h2 #traffic { "Requests" }
            (chart(&ops.samples))
        }
        section aria-labelledby="recent" {
            h2 #recent { "Recent pushes" }
            @if ops.recent.is_empty() { p { "None yet." } } @else {
                table {
                    caption { "The most recent pushes you may see" }
                    thead { tr { th scope="col" { "Image" } th scope="col" { "Digest" } th scope="col" { "Pushed" } } }
                    tbody {
                        @for p in &ops.recent {
                            tr {
                                th scope="row" { a href={ "/ui/r/" (p.name) "/-/" (p.tag) } { (p.name) ":" (p.tag) } }
                                td { code.digest title=(p.digest) { (short_digest(&p.digest)) } }
                                td { (when(p.pushed)) }
                            }
                        }
                    }
                }
            }
        }
        @if !ops.upstreams.is_empty() {
            section aria-labelledby="upstream-health" {
                h2 #upstream-health { "Upstreams" }
                (upstream_table(&ops.upstreams))
            }
        }
        @if !ops.mirrors.is_empty() {
            section aria-labelledby="mirror-health" {
                h2 #mirror-health { "Mirrors" }
                (mirror_table(&ops.mirrors))
            }
        }
    };
    page(frame, main)
}

/// Requests per second and mean latency over the recent intervals, as two lines.
fn chart(samples: &[Sample]) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    if samples.len() < 2 {
        return html! { p { "The chart fills in as the server answers requests (a point every few seconds)." } };
    }
    let span = samples.iter().map(|s| s.seconds_ago).max().unwrap_or(1).max(1) as f64;
    let top_rate = samples.iter().map(|s| s.per_second).fold(0.0, f64::max).max(1.0);
    let top_latency = samples.iter().map(|s| s.latency_ms).fold(0.0, f64::max).max(1.0);
    let line = |value: &dyn Fn(&Sample) -> f64, top: f64| -> String {
        samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", W - s.seconds_ago as f64 * W / span, H - value(s) * (H - 4.0) / top))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let last = samples.iter().min_by_key(|s| s.seconds_ago);
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (W) " " (H) } role="img"
                aria-label={ "Requests per second (peak " (format!("{top_rate:.1}")) ") and mean latency (peak " (format!("{top_latency:.1}")) " ms) over the last " (span as u64) " s" } {
                polyline.rate points=(line(&|s| s.per_second, top_rate)) {}
                polyline.latency points=(line(&|s| s.latency_ms, top_latency)) {}
            }
            figcaption {
                span.swatch.rate {} " requests per second (peak " (format!("{top_rate:.1}")) ")  "
                span.swatch.latency {} " mean latency (peak " (format!("{top_latency:.1}")) " ms)"
                @if let Some(s) = last { " · now: " (format!("{:.1}", s.per_second)) " req/s, " (format!("{:.1}", s.latency_ms)) " ms" }
                " · last " (span as u64) " s"
            }
        }
    }
}

/// `/ui/login`: the form, with what went wrong last time.
pub fn login(frame: &Frame<'_>, next: &str, failed: Option<&str>) -> String {
    let main = html! {
        h1 { "Log in" }
        @if let Some(why) = failed { p.error role="alert" { (why) } }
        form.login method="post" action="/ui/login" {
            input type="hidden" name="next" value=(next);
            p { label for="username" { "User" } input #username name="username" autocomplete="username" required; }
            p { label for="password" { "Password" } input #password type="password" name="password" autocomplete="current-password" required; }
            p { button type="submit" { "Log in" } }
        }
        p.note { "The same users and passwords as for pulling and pushing. Pages show only what you may pull." }
    };
    page(frame, main)
}

/// A page saying why there is nothing to show (not found, refused).
pub fn problem(frame: &Frame<'_>, heading: &str, why: &str) -> String {
    page(frame, html! { h1 { (heading) } p { (why) } p { a href="/" { "Back to the routes" } } })
}

fn separator(reference: &str) -> &'static str {
    if reference.contains(':') { "@" } else { ":" }
}

fn slug(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

fn short_digest(digest: &str) -> &str {
    let hex_at = digest.find(':').map_or(0, |i| i + 1);
    // Digests are ASCII; text that is not (from a careless upstream) is shown whole.
    digest.get(..(hex_at + 12).min(digest.len())).unwrap_or(digest)
}

/// A media type in a word or two.
fn media_word(media_type: &str) -> &str {
    match media_type {
        "application/vnd.oci.image.index.v1+json" => "OCI index",
        "application/vnd.oci.image.manifest.v1+json" => "OCI image",
        "application/vnd.docker.distribution.manifest.list.v2+json" => "Docker list",
        "application/vnd.docker.distribution.manifest.v2+json" => "Docker image",
        other => other,
    }
}

/// Bytes in the largest unit that keeps a number of at least 1, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A time as `<time>`: how long ago, with the UTC date in its attribute and title.
fn when(at: SystemTime) -> Markup {
    let (stamp, words) = (utc(at), ago(at, SystemTime::now()));
    html! { time datetime=(stamp) title=(stamp) { (words) } }
}

fn ago(at: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(at).map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_and_sizes_read_as_people_write_them() {
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_490_994)), "2026-12-05T17:16:34Z");
        assert_eq!(utc(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500), "1.5 kB");
        assert_eq!(bytes(12_300_000), "12.3 MB");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "sha256:0123456789ab");
        assert_eq!(short_digest("sha256:a€€€€"), "sha256:a€€€€", "not cut inside a character");
        let now = SystemTime::now();
        assert_eq!(ago(now - Duration::from_secs(130), now), "2 min ago");
        assert_eq!(ago(now - Duration::from_secs(3 * 86_400), now), "3 days ago");
    }

    #[test]
    fn what_clients_named_is_escaped() {
        let viewer = Viewer { user: Some("<b>eve</b>".into()), can_log_in: true };
        let frame = Frame { title: "x", viewer: &viewer, section: Section::Routes, version: "1" };
        let html = problem(&frame, "Not found", "<script>alert(1)</script>");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{html}");
        assert!(html.contains("&lt;b&gt;eve&lt;/b&gt;"));
        assert!(!html.contains("<script>alert"));
    }
}
