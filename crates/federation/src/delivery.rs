//! Delivery: where a client fetches a blob's bytes. Manifests are always ours; a blob is
//! streamed by us, or answered with a redirect to a CDN (optionally with an expiring
//! signature a plain nginx or an Akamai-style edge checks), to the nearest healthy mirror
//! for the client's address, or to the external URL the blob lives at (descriptor `urls`,
//! metadata-only push) when the repository's allow list admits it.
//!
//! Rules come from `[[delivery]]`, first prefix match wins; a mirrors rule with no healthy
//! mirror for the client hands over to the next matching rule, and no rule means stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ipnet::IpNet;
use md5::Digest as _;
use tessera_client::layout::{DEFAULT_BLOB_LAYOUT, expand_blob_layout};
use tessera_config::{Deliver, TokenKind};
use tessera_spec::{Digest, RepoName};

const DEFAULT_HEALTH_INTERVAL_SECS: u64 = 30;

/// The delivery rules of one configuration, with the health of their mirrors.
pub struct Delivery {
    rules: Vec<Rule>,
    /// Redirects answered, by kind; carried across reloads.
    pub redirects: Arc<RedirectCounts>,
    health: Option<tokio::task::JoinHandle<()>>,
    /// For verifying external locations; built on first use.
    http: std::sync::OnceLock<reqwest::Client>,
}

#[derive(Default)]
pub struct RedirectCounts {
    pub cdn: AtomicU64,
    pub mirror: AtomicU64,
    pub external: AtomicU64,
}

struct Rule {
    prefix: String,
    how: How,
    layout: String,
    signer: Option<Signer>,
    rewrites: Vec<(String, String)>,
    /// `external_allow` as configured.
    allow: Vec<UrlPattern>,
    /// The rule's own CDN base and mirrors: where its blobs live, so allowed for it too.
    own: Vec<UrlPattern>,
    deny: Vec<UrlPattern>,
    health_interval: Duration,
    health_blob: Option<Digest>,
}

enum How {
    Stream,
    Cdn(String),
    Mirrors(Vec<Arc<MirrorState>>),
}

/// A mirror and what its last health check found.
pub struct MirrorState {
    pub config: tessera_config::Mirror,
    base: String,
    networks: Vec<IpNet>,
    healthy: AtomicBool,
}

impl MirrorState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Where a blob is to be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We send the bytes.
    Stream,
    /// A 307 to this URL.
    Redirect(String),
    /// The blob lives elsewhere and no URL it names is allowed here.
    NotAllowed,
}

/// An expiring signature on URLs.
struct Signer {
    kind: TokenKind,
    secret: Vec<u8>,
    ttl: Duration,
    /// The `secure_link_md5` expression, split once into its parts.
    expression: Vec<Part>,
    /// The HMAC key, prepared once.
    hmac_key: ring::hmac::Key,
    hash_param: String,
    expires_param: String,
    token_param: String,
}

/// A piece of a `secure_link_md5` expression.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expires,
    Path,
    Client,
    Secret,
}

/// `"{expires}{path} {secret}"` into its parts; unknown `{...}` stay text.
fn parse_expression(expression: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = expression;
    while !rest.is_empty() {
        let placeholder = [
            ("{expires}", Part::Expires),
            ("{path}", Part::Path),
            ("{client}", Part::Client),
            ("{secret}", Part::Secret),
        ]
        .into_iter()
        .find(|(p, _)| rest.starts_with(p));
        match placeholder {
            Some((p, part)) => {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
                rest = &rest[p.len()..];
            }
            None => {
                let c = rest.chars().next().unwrap_or_default();
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

/// `scheme://host[:port]/path-prefix`, the host optionally `*.domain`.
#[derive(Debug, Clone)]
struct UrlPattern {
    scheme: String,
    host: String,
    any_subdomain: bool,
    port: Option<u16>,
    path: String,
}

/// A base URL with the trailing slash paths are appended after.
pub fn ensure_slash(base: &str) -> String {
    if base.ends_with('/') { base.to_string() } else { format!("{base}/") }
}

impl UrlPattern {
    fn parse(text: &str) -> Result<UrlPattern, String> {
        let (unstarred, any_subdomain) = match text.split_once("://*.") {
            Some((scheme, rest)) => (format!("{scheme}://{rest}"), true),
            None => (text.to_string(), false),
        };
        let url = url::Url::parse(&unstarred).map_err(|e| format!("URL pattern {text:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("URL pattern {text:?} must be an http:// or https:// URL with a host"));
        }
        Ok(UrlPattern {
            scheme: url.scheme().to_string(),
            host: url.host_str().unwrap_or_default().to_string(),
            any_subdomain,
            port: url.port_or_known_default(),
            path: url.path().to_string(),
        })
    }

    fn matches(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let host_ok = if self.any_subdomain {
            host.strip_suffix(&self.host).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1)
        } else {
            host == self.host
        };
        let path = url.path();
        let path_ok = self.path.ends_with('/') && path.starts_with(&self.path)
            || path == self.path
            || path.strip_prefix(&self.path).is_some_and(|rest| rest.starts_with('/'));
        url.scheme() == self.scheme && host_ok && url.port_or_known_default() == self.port && path_ok
    }
}

fn patterns(texts: &[String]) -> Result<Vec<UrlPattern>, String> {
    texts.iter().map(|t| UrlPattern::parse(t)).collect()
}

/// The path of an absolute URL built from a configured base (no parsing needed: it starts
/// at the first `/` after the authority and ends before any query).
fn url_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    path.split(['?', '#']).next().unwrap_or("/")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Signer {
    fn new(t: &tessera_config::UrlToken) -> Result<Signer, String> {
        let text = match (&t.secret, &t.secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("token secret_file {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            (None, None) => return Err("token needs a secret".into()),
        };
        let secret = match t.kind {
            TokenKind::SecureLinkMd5 => text.into_bytes(),
            TokenKind::HmacSha256 => hex::decode(text.trim()).map_err(|_| "an hmac_sha256 secret must be hex")?,
        };
        if secret.is_empty() {
            return Err("token secret is empty".into());
        }
        Ok(Signer {
            kind: t.kind,
            hmac_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            secret,
            ttl: Duration::from_secs(t.ttl_secs),
            expression: parse_expression(&t.expression),
            hash_param: t.hash_param.clone(),
            expires_param: t.expires_param.clone(),
            token_param: t.token_param.clone(),
        })
    }

    /// `url` with the signature for `client`, valid until now + ttl.
    fn sign(&self, url: &str, client: Option<IpAddr>, now: u64) -> String {
        let expires = now + self.ttl.as_secs();
        let path = url_path(url);
        let params = match self.kind {
            TokenKind::SecureLinkMd5 => {
                let expires_text = expires.to_string();
                let client = client.map(|c| c.to_string()).unwrap_or_default();
                let mut md5 = md5::Md5::new();
                for part in &self.expression {
                    md5.update(match part {
                        Part::Text(t) => t.as_bytes(),
                        Part::Expires => expires_text.as_bytes(),
                        Part::Path => path.as_bytes(),
                        Part::Client => client.as_bytes(),
                        Part::Secret => &self.secret,
                    });
                }
                let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(md5.finalize());
                format!("{}={hash}&{}={expires}", self.hash_param, self.expires_param)
            }
            TokenKind::HmacSha256 => {
                let fields = format!("exp={expires}~acl={path}");
                let mac = hex::encode(ring::hmac::sign(&self.hmac_key, fields.as_bytes()).as_ref());
                let token = format!("{fields}~hmac={mac}");
                let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
                format!("{}={token}", self.token_param)
            }
        };
        let joiner = if url.contains('?') { '&' } else { '?' };
        format!("{url}{joiner}{params}")
    }

    fn describe(&self) -> String {
        let kind = match self.kind {
            TokenKind::SecureLinkMd5 => "nginx secure_link_md5",
            TokenKind::HmacSha256 => "HMAC-SHA256 token",
        };
        format!("signed ({kind}, valid {} s)", self.ttl.as_secs())
    }
}

impl Rule {
    fn new(d: &tessera_config::Delivery, previous: Option<&Delivery>) -> Result<Rule, String> {
        let how = match d.deliver {
            Deliver::Stream => How::Stream,
            Deliver::Cdn => How::Cdn(ensure_slash(d.cdn.as_deref().unwrap_or_default())),
            Deliver::Mirrors => How::Mirrors(
                d.mirrors
                    .iter()
                    .map(|m| {
                        let kept = previous
                            .and_then(|p| p.mirrors().find(|s| s.config == *m && s.base == ensure_slash(&m.url)));
                        if let Some(kept) = kept {
                            return Ok(kept.clone());
                        }
                        let networks = m.networks.iter().map(|n| n.0).collect();
                        // Unknown until the first check, which runs at once.
                        Ok(Arc::new(MirrorState {
                            config: m.clone(),
                            base: ensure_slash(&m.url),
                            networks,
                            healthy: AtomicBool::new(false),
                        }))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            Deliver::Presigned => return Err("presigned delivery needs the S3-compatible blob store".into()),
        };
        let own = match &how {
            How::Cdn(base) => vec![UrlPattern::parse(base)?],
            How::Mirrors(ms) => ms.iter().map(|m| UrlPattern::parse(&m.base)).collect::<Result<_, _>>()?,
            How::Stream => Vec::new(),
        };
        let health_blob = d
            .health_blob
            .as_deref()
            .map(|h| h.parse::<Digest>().map_err(|_| format!("health_blob {h:?} is not a digest")))
            .transpose()?;
        Ok(Rule {
            prefix: d.prefix.clone(),
            how,
            layout: d.layout.clone().unwrap_or_else(|| DEFAULT_BLOB_LAYOUT.into()),
            signer: d.token.as_ref().map(Signer::new).transpose()?,
            rewrites: d.rewrite.iter().map(|r| (r.find.clone(), r.replace.clone())).collect(),
            allow: patterns(&d.external_allow)?,
            own,
            deny: patterns(&d.external_deny)?,
            health_interval: Duration::from_secs(d.health_interval_secs.unwrap_or(DEFAULT_HEALTH_INTERVAL_SECS).max(1)),
            health_blob,
        })
    }

    /// `base` + the layout path of the blob, rewritten and signed.
    fn url(&self, base: &str, name: &RepoName, digest: &Digest, client: Option<IpAddr>) -> String {
        self.finish(format!("{base}{}", expand_blob_layout(&self.layout, name, digest)), client)
    }

    fn finish(&self, mut url: String, client: Option<IpAddr>) -> String {
        for (find, replace) in &self.rewrites {
            url = url.replacen(find.as_str(), replace, 1);
        }
        match &self.signer {
            Some(s) => s.sign(&url, client, unix_now()),
            None => url,
        }
    }

    /// The healthy mirror nearest to `client`: the one whose network most specifically
    /// contains it (a mirror without networks serves all, least specifically), then by
    /// priority; equals are spread by the client's address.
    fn nearest_mirror(mirrors: &[Arc<MirrorState>], client: Option<IpAddr>) -> Option<&MirrorState> {
        let specificity = |m: &MirrorState| -> Option<u8> {
            if m.networks.is_empty() {
                return Some(0);
            }
            let client = client?;
            m.networks.iter().filter(|n| n.contains(&client)).map(|n| n.prefix_len() + 1).max()
        };
        let ranked: Vec<(&MirrorState, u8)> =
            mirrors.iter().filter(|m| m.healthy()).filter_map(|m| specificity(m).map(|s| (m.as_ref(), s))).collect();
        let best = ranked.iter().map(|(m, s)| (std::cmp::Reverse(*s), m.config.priority)).min()?;
        let equals: Vec<&MirrorState> = ranked
            .iter()
            .filter(|(m, s)| (std::cmp::Reverse(*s), m.config.priority) == best)
            .map(|(m, _)| *m)
            .collect();
        let spread = client.map(|c| match c {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => u128::from(a) as usize,
        });
        Some(equals[spread.unwrap_or(0) % equals.len()])
    }

    /// Whether this rule owns `url` (its CDN or one of its mirrors).
    fn owns(&self, url: &str) -> Option<usize> {
        match &self.how {
            How::Cdn(base) => url.starts_with(base.as_str()).then_some(base.len()),
            How::Mirrors(ms) => ms.iter().filter(|m| url.starts_with(m.base.as_str())).map(|m| m.base.len()).max(),
            How::Stream => None,
        }
    }
}

impl Delivery {
    /// The rules of `config`. Mirrors unchanged from `previous` keep their health.
    pub fn new(config: &[tessera_config::Delivery], previous: Option<&Delivery>) -> Result<Delivery, String> {
        let rules = config
            .iter()
            .enumerate()
            .map(|(i, d)| Rule::new(d, previous).map_err(|e| format!("delivery {}: {e}", i + 1)))
            .collect::<Result<_, _>>()?;
        let redirects = previous.map(|p| p.redirects.clone()).unwrap_or_default();
        Ok(Delivery { rules, redirects, health: None, http: std::sync::OnceLock::new() })
    }

    /// Every mirror of every rule.
    pub fn mirrors(&self) -> impl Iterator<Item = &Arc<MirrorState>> {
        self.rules.iter().flat_map(|r| match &r.how {
            How::Mirrors(ms) => ms.as_slice(),
            _ => &[],
        })
    }

    fn matching<'r>(&'r self, name: &'r RepoName) -> impl Iterator<Item = &'r Rule> {
        self.rules.iter().filter(move |r| tessera_spec::name::prefix_covers(&r.prefix, name.as_str()))
    }

    /// For a blob whose bytes are here: stream, or redirect to a CDN or mirror.
    pub fn local(&self, name: &RepoName, digest: &Digest, client: Option<IpAddr>) -> Decision {
        for rule in self.matching(name) {
            match &rule.how {
                How::Stream => return Decision::Stream,
                How::Cdn(base) => {
                    self.redirects.cdn.fetch_add(1, Ordering::Relaxed);
                    return Decision::Redirect(rule.url(base, name, digest, client));
                }
                How::Mirrors(mirrors) => {
                    if let Some(m) = Rule::nearest_mirror(mirrors, client) {
                        self.redirects.mirror.fetch_add(1, Ordering::Relaxed);
                        return Decision::Redirect(rule.url(&m.base, name, digest, client));
                    }
                }
            }
        }
        Decision::Stream
    }

    /// For a blob whose bytes live at `urls`: a redirect to the first the repository's rule
    /// allows, rewritten and signed by the rule whose CDN or mirror it is under.
    pub fn external(&self, name: &RepoName, urls: &[String], client: Option<IpAddr>) -> Decision {
        let decision = self.locate_external(name, urls, client);
        if matches!(decision, Decision::Redirect(_)) {
            self.redirects.external.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    /// Checks with a `HEAD` (signed like a client's redirect) that a blob of `size` bytes is
    /// at `url`, which the policy of `name` must allow.
    pub async fn verify_external(&self, name: &RepoName, url: &str, size: u64) -> Result<(), String> {
        let Decision::Redirect(signed) = self.locate_external(name, &[url.to_string()], None) else {
            return Err(format!("{url} is not a URL the delivery policy of {name} allows (external_allow)"));
        };
        let http = match self.http.get() {
            Some(h) => h,
            None => {
                let h = crate::upstream::content_client(false).map_err(|e| tessera_client::error::chain(&e))?;
                self.http.get_or_init(|| h)
            }
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), http.head(&signed).send())
            .await
            .map_err(|_| format!("HEAD {url} timed out"))?
            .map_err(|e| format!("HEAD {url} failed: {}", e.without_url()))?;
        let found = answer.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if !answer.status().is_success() {
            return Err(format!("HEAD {url} answered {}", answer.status()));
        }
        if found != Some(size) {
            return Err(format!(
                "{url} holds {} bytes, not {size}",
                found.map_or("an unknown number of".into(), |f| f.to_string())
            ));
        }
        Ok(())
    }

    /// The first of `urls` a rule covering `name` admits, signed by the rule that owns it
    /// when that rule is one of `name`'s own or an explicit `external_allow` named it (a
    /// URL a pusher merely got under some CDN is never signed with that CDN's secret).
    fn locate_external(&self, name: &RepoName, urls: &[String], client: Option<IpAddr>) -> Decision {
        let Some((url, explicitly)) = self.admitted(name, urls) else { return Decision::NotAllowed };
        let owner = self.owner_of(url);
        let may_sign = owner.is_some_and(|o| explicitly || self.matching(name).any(|r| std::ptr::eq(r, o)));
        Decision::Redirect(match owner {
            Some(rule) if may_sign => rule.finish(url.to_string(), client),
            _ => url.to_string(),
        })
    }

    /// The rule whose CDN or mirror base is the longest prefix of `url`.
    fn owner_of(&self, url: &str) -> Option<&Rule> {
        self.rules.iter().filter_map(|r| r.owns(url).map(|len| (len, r))).max_by_key(|(len, _)| *len).map(|(_, r)| r)
    }

    /// `url` (configured, not a client's: a Crane file's, a layout's) rewritten and signed
    /// by the rule that owns it; unchanged when no rule does.
    pub fn sign_known(&self, url: &str) -> String {
        match self.owner_of(url) {
            Some(rule) => rule.finish(url.to_string(), None),
            None => url.to_string(),
        }
    }

    /// The first of `urls` the rules covering `name` admit (an `external_allow` of any of
    /// them, or one's own CDN or mirrors) and none denies; and whether an explicit
    /// `external_allow` admitted it. URLs with encoded separators or dots are never
    /// admitted: servers that decode them could leave the allowed path.
    fn admitted<'u>(&self, name: &RepoName, urls: &'u [String]) -> Option<(&'u str, bool)> {
        let rules: Vec<&Rule> = self.matching(name).collect();
        urls.iter().map(String::as_str).find_map(|u| {
            let lower = u.to_ascii_lowercase();
            if ["%2f", "%5c", "%2e"].iter().any(|e| lower.contains(e)) {
                return None;
            }
            let parsed = url::Url::parse(u).ok()?;
            if rules.iter().any(|r| r.deny.iter().any(|p| p.matches(&parsed))) {
                return None;
            }
            let explicitly = rules.iter().any(|r| r.allow.iter().any(|p| p.matches(&parsed)));
            let own = rules.iter().any(|r| r.own.iter().any(|p| p.matches(&parsed)));
            (explicitly || own).then_some((u, explicitly))
        })
    }

    /// In words, for `tessera explain`: where a client is sent for a blob living at `urls`.
    pub fn describe_external(&self, name: &RepoName, urls: &[String]) -> String {
        match self.allowed_url(name, urls) {
            Some(url) => format!("lives elsewhere: 307 to {url}"),
            None => format!(
                "lives elsewhere at {}, which the delivery policy of {name} does not allow: 404",
                urls.join(", ")
            ),
        }
    }

    /// The first of `urls` the rules covering `name` admit.
    pub fn allowed_url<'u>(&self, name: &RepoName, urls: &'u [String]) -> Option<&'u str> {
        self.admitted(name, urls).map(|(u, _)| u)
    }

    /// In words, for `tessera explain`: how a blob of `name` held here is delivered (for
    /// `digest`, or with the layout shown as a template).
    pub fn describe_local(&self, name: &RepoName, digest: Option<&Digest>) -> String {
        let mut steps = Vec::new();
        for rule in self.matching(name) {
            let signed = rule.signer.as_ref().map(|s| format!(", {}", s.describe())).unwrap_or_default();
            match &rule.how {
                How::Stream => {
                    steps.push("streamed by this server".to_string());
                    return steps.join("; else ");
                }
                How::Cdn(base) => {
                    let url = match digest {
                        Some(d) => rule.url(base, name, d, None).split('?').next().unwrap_or_default().to_string(),
                        None => format!("{base}{}", rule.layout),
                    };
                    steps.push(format!("307 to CDN {url}{signed} (delivery prefix {:?})", rule.prefix));
                    return steps.join("; else ");
                }
                How::Mirrors(ms) => {
                    let list: Vec<String> = ms
                        .iter()
                        .map(|m| {
                            let nets = if m.config.networks.is_empty() {
                                "all clients".to_string()
                            } else {
                                m.config.networks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                            };
                            format!("{} for {nets}, priority {}", m.base, m.config.priority)
                        })
                        .collect();
                    steps.push(format!(
                        "307 to the nearest healthy mirror{signed} of [{}] (delivery prefix {:?})",
                        list.join("; "),
                        rule.prefix
                    ));
                }
            }
        }
        steps.push("streamed by this server".to_string());
        steps.join("; else ")
    }

    /// Starts the background health checks of every mirror; they stop when this is dropped.
    pub fn start_health_checks(&mut self) -> Result<(), String> {
        let checks: Vec<(Arc<MirrorState>, Duration, Option<String>)> = self
            .rules
            .iter()
            .flat_map(|r| {
                let probe = |m: &Arc<MirrorState>| {
                    r.health_blob.as_ref().map(|d| {
                        let name = "health".parse::<RepoName>().expect("a valid name");
                        r.url(&m.base, &name, d, None)
                    })
                };
                match &r.how {
                    How::Mirrors(ms) => ms.iter().map(|m| (m.clone(), r.health_interval, probe(m))).collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
        if checks.is_empty() {
            return Ok(());
        }
        let http = crate::upstream::content_client(false)
            .map_err(|e| format!("mirror health checks: {}", tessera_client::error::chain(&e)))?;
        self.health = Some(tokio::spawn(async move {
            let mut next = vec![tokio::time::Instant::now(); checks.len()];
            loop {
                let now = tokio::time::Instant::now();
                let due: Vec<usize> = (0..checks.len()).filter(|&i| next[i] <= now).collect();
                let results = futures_util::future::join_all(due.iter().map(|&i| {
                    let (mirror, interval, probe) = &checks[i];
                    check_mirror(&http, mirror, *interval, probe.as_deref())
                }))
                .await;
                for (&i, healthy) in due.iter().zip(results) {
                    let (mirror, interval, _) = &checks[i];
                    if mirror.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                        if healthy {
                            tracing::info!(mirror = %mirror.base, "mirror is healthy");
                        } else {
                            tracing::warn!(mirror = %mirror.base, "mirror failed its health check; skipped until it passes");
                        }
                    }
                    next[i] = tokio::time::Instant::now() + *interval;
                }
                let wake = next.iter().min().copied().unwrap_or_else(tokio::time::Instant::now);
                tokio::time::sleep_until(wake).await;
            }
        }));
        Ok(())
    }

    /// Whether every blob of `name` held here is streamed by us (no redirecting rule).
    pub fn streams(&self, name: &RepoName) -> bool {
        self.matching(name).next().is_none_or(|r| matches!(r.how, How::Stream))
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(h) = self.health.take() {
            h.abort();
        }
    }
}

/// One health check: a `HEAD` of the probe blob (2xx or 3xx passes), or of the base URL
/// (any answer below 500 passes).
async fn check_mirror(http: &reqwest::Client, mirror: &MirrorState, interval: Duration, probe: Option<&str>) -> bool {
    let url = probe.unwrap_or(&mirror.base);
    let timeout = interval.min(Duration::from_secs(5));
    match tokio::time::timeout(timeout, http.head(url).send()).await {
        Ok(Ok(r)) => {
            let status = r.status();
            if probe.is_some() { status.is_success() || status.is_redirection() } else { status.as_u16() < 500 }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Delivery {
        let config = tessera_config::Config::from_toml(toml).unwrap();
        Delivery::new(&config.deliveries, None).unwrap()
    }

    fn name(n: &str) -> RepoName {
        n.parse().unwrap()
    }

    fn digest() -> Digest {
        Digest::sha256_of(b"layer")
    }

    proptest::proptest! {
        /// Allow-list patterns and candidate URLs from anywhere: matching answers, never panics.
        #[test]
        fn url_matching_never_panics(pattern in ".{0,60}", candidate in ".{0,80}") {
            if let Ok(p) = UrlPattern::parse(&pattern)
                && let Ok(u) = url::Url::parse(&candidate)
            {
                let _ = p.matches(&u);
            }
            let d = rules("[[delivery]]\nexternal_allow = [\"https://*.example.com/\"]\n");
            let _ = d.allowed_url(&name("a"), std::slice::from_ref(&candidate));
            let _ = d.external(&name("a"), &[candidate], None);
        }
    }

    #[test]
    fn cdn_redirect_uses_the_layout_and_rewrites() {
        let d = rules(
            r#"
[[delivery]]
prefix = "isv"
deliver = "cdn"
cdn = "https://cdn.example.com/pulp"
layout = "{algorithm}/{hex2}/{hex}"
rewrite = [{ match = "cdn.example.com", replace = "edge.example.com" }]
"#,
        );
        let dg = digest();
        let hex = dg.hex();
        assert_eq!(
            d.local(&name("isv/app"), &dg, None),
            Decision::Redirect(format!("https://edge.example.com/pulp/sha256/{}/{hex}", &hex[..2]))
        );
        // Component boundary: "isvx" is not under "isv".
        assert_eq!(d.local(&name("isvx/app"), &dg, None), Decision::Stream);
    }

    #[test]
    fn expressions_split_into_parts() {
        assert_eq!(
            parse_expression("{expires}{path} {secret}"),
            vec![Part::Expires, Part::Path, Part::Text(" ".into()), Part::Secret]
        );
        assert_eq!(parse_expression("{client}-{x}é"), vec![Part::Client, Part::Text("-{x}é".into())]);
        assert_eq!(parse_expression(""), vec![]);
    }

    #[test]
    fn url_path_of_configured_urls() {
        assert_eq!(url_path("http://h:1/a/b?x=1"), "/a/b");
        assert_eq!(url_path("https://h"), "/");
        assert_eq!(url_path("https://h/p/blobs/sha256:00#f"), "/p/blobs/sha256:00");
    }

    #[test]
    fn secure_link_md5_matches_nginx() {
        // The value nginx computes for `secure_link_md5 "$secure_link_expires$uri secret"`:
        // base64url(md5("2147483647/p/blobs/x secret")), no padding.
        let signer = Signer::new(&tessera_config::UrlToken {
            kind: TokenKind::SecureLinkMd5,
            secret: Some("secret".into()),
            secret_file: None,
            ttl_secs: 2147483647 - 1000,
            expression: "{expires}{path} {secret}".into(),
            hash_param: "md5".into(),
            expires_param: "expires".into(),
            token_param: "__token__".into(),
        })
        .unwrap();
        let url = signer.sign("http://cdn/p/blobs/x", None, 1000);
        let expected =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(md5::Md5::digest(b"2147483647/p/blobs/x secret"));
        assert_eq!(url, format!("http://cdn/p/blobs/x?md5={expected}&expires=2147483647"));
    }

    #[test]
    fn hmac_token_is_akamai_shaped() {
        let signer = Signer::new(&tessera_config::UrlToken {
            kind: TokenKind::HmacSha256,
            secret: Some("00ff".into()),
            secret_file: None,
            ttl_secs: 60,
            expression: String::new(),
            hash_param: String::new(),
            expires_param: String::new(),
            token_param: "__token__".into(),
        })
        .unwrap();
        let url = signer.sign("https://cdn/a/b", None, 100);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[0x00, 0xff]);
        let mac = hex::encode(ring::hmac::sign(&key, b"exp=160~acl=/a/b").as_ref());
        assert_eq!(url, format!("https://cdn/a/b?__token__=exp%3D160%7Eacl%3D%2Fa%2Fb%7Ehmac%3D{mac}"));
    }

    #[test]
    fn external_urls_need_an_allow_and_no_deny() {
        let d = rules(
            r#"
[[delivery]]
prefix = "win"
external_allow = ["https://*.microsoft.example/", "https://dl.example.org/pub/"]
external_deny = ["https://bad.microsoft.example/"]
"#,
        );
        let n = name("win/app");
        let ok = |u: &str| d.allowed_url(&n, &[u.to_string()]).is_some();
        assert!(ok("https://go.microsoft.example/layer"));
        assert!(!ok("https://microsoft.example/layer"), "*. needs a subdomain");
        assert!(!ok("https://bad.microsoft.example/layer"), "deny wins");
        assert!(!ok("https://go.microsoft.example.evil.org/layer"));
        assert!(!ok("http://go.microsoft.example/layer"), "scheme must match");
        assert!(!ok("https://go.microsoft.example:8443/layer"), "port must match");
        assert!(ok("https://dl.example.org/pub/x"));
        assert!(!ok("https://dl.example.org/public/x"));
        assert!(!ok("https://dl.example.org/pub/../secret"), "URLs are normalised before matching");
        assert!(!ok("https://user@evil.org/pub/"));
        assert!(!ok("https://dl.example.org/pub/..%2fsecret"), "encoded separators are refused");
        assert!(!ok("https://dl.example.org/pub/%2E%2E/secret"));
        // Another prefix allows nothing.
        assert_eq!(d.external(&name("other"), &["https://go.microsoft.example/l".into()], None), Decision::NotAllowed);
    }

    #[test]
    fn nearest_healthy_mirror_wins_and_none_falls_through() {
        let d = rules(
            r#"
[[delivery]]
prefix = "fedora"
deliver = "mirrors"
[[delivery.mirror]]
url = "http://campus.example/m"
networks = ["10.1.0.0/16"]
[[delivery.mirror]]
url = "http://country.example/m/"
networks = ["10.0.0.0/8"]
[[delivery.mirror]]
url = "http://everyone.example/m/"
priority = 5

[[delivery]]
prefix = "fedora"
deliver = "cdn"
cdn = "https://cdn.example/"
"#,
        );
        let n = name("fedora/f41");
        let dg = digest();
        let client = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let at = |base: &str| Decision::Redirect(format!("{base}blobs/{dg}"));
        // Nothing checked yet: no mirror is healthy, so the CDN rule decides.
        assert_eq!(d.local(&n, &dg, client("10.1.2.3")), at("https://cdn.example/"));
        for m in d.mirrors() {
            m.healthy.store(true, Ordering::Relaxed);
        }
        assert_eq!(d.local(&n, &dg, client("10.1.2.3")), at("http://campus.example/m/"));
        assert_eq!(d.local(&n, &dg, client("10.9.2.3")), at("http://country.example/m/"));
        assert_eq!(d.local(&n, &dg, client("192.0.2.1")), at("http://everyone.example/m/"));
        d.mirrors().next().unwrap().healthy.store(false, Ordering::Relaxed);
        assert_eq!(d.local(&n, &dg, client("10.1.2.3")), at("http://country.example/m/"));
    }

    #[test]
    fn a_rules_own_cdn_is_an_allowed_external_location_and_is_signed() {
        let d = rules(
            r#"
[[delivery]]
prefix = "base"
deliver = "cdn"
cdn = "http://127.0.0.2/base/"
token = { kind = "secure_link_md5", secret = "s" }
"#,
        );
        let url = "http://127.0.0.2/base/blobs/sha256:00".to_string();
        match d.external(&name("base/ubi"), std::slice::from_ref(&url), None) {
            Decision::Redirect(u) => assert!(u.starts_with(&format!("{url}?md5=")), "{u}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.external(&name("base/ubi"), &["http://127.0.0.9/x".into()], None), Decision::NotAllowed);
    }

    #[test]
    fn a_cdn_secret_signs_only_for_its_own_names_or_explicit_allows() {
        let d = rules(
            r#"
[[delivery]]
prefix = "vendor"
deliver = "cdn"
cdn = "https://cdn.example/vendor/"
token = { kind = "secure_link_md5", secret = "vendor" }

[[delivery]]
prefix = "isv"
deliver = "cdn"
cdn = "https://cdn.example/"
external_allow = ["https://cdn.example/vendor/public/"]
"#,
        );
        let signed = |n: &str, u: &str| match d.external(&name(n), &[u.to_string()], None) {
            Decision::Redirect(r) => r.contains("md5="),
            other => panic!("{other:?}"),
        };
        // isv's own CDN base covers the vendor's path, but that does not lend it the secret.
        assert!(!signed("isv/app", "https://cdn.example/vendor/private/blob"));
        // An explicit allow is the configuration's consent: signed.
        assert!(signed("isv/app", "https://cdn.example/vendor/public/blob"));
        assert!(signed("vendor/ubi", "https://cdn.example/vendor/private/blob"));
    }
}
