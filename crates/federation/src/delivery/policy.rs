//! Which external URLs a repository may send clients to (`external_allow`, `external_deny`,
//! a rule's own CDN and mirrors), and which rule's signature they carry. Every comparison
//! goes through a parsed URL.

use std::net::IpAddr;
use std::time::Duration;

use tessera_spec::RepoName;

use super::{Decision, Delivery, Rule};

/// `scheme://host[:port]/path-prefix`, the host optionally `*.domain`.
#[derive(Debug, Clone)]
pub(super) struct UrlPattern {
    scheme: String,
    host: String,
    any_subdomain: bool,
    port: Option<u16>,
    pub(super) path: String,
}

impl UrlPattern {
    pub(super) fn parse(text: &str) -> Result<UrlPattern, String> {
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

    pub(super) fn matches(&self, url: &url::Url) -> bool {
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

pub(super) fn patterns(texts: &[String]) -> Result<Vec<UrlPattern>, String> {
    texts.iter().map(|t| UrlPattern::parse(t)).collect()
}

/// Why an external location was not accepted (a metadata-only push with `verify`).
#[derive(Debug, thiserror::Error)]
pub enum ExternalRefused {
    #[error("{url} is not a URL the delivery policy of {name} allows (external_allow)")]
    NotAllowed { url: String, name: RepoName },
    #[error("HEAD {url} timed out")]
    TimedOut { url: String },
    #[error("HEAD {url} failed: {why}")]
    Unreachable { url: String, why: String },
    #[error("HEAD {url} answered {status}")]
    Status { url: String, status: reqwest::StatusCode },
    #[error("{url} holds {found} bytes, not {size}")]
    WrongSize { url: String, found: String, size: u64 },
    #[error("no HTTP client: {0}")]
    Client(String),
}

impl Rule {
    /// How specifically this rule owns `url` (its CDN or one of its mirrors): the length of
    /// the longest of its own base paths that covers it.
    fn owns(&self, url: &url::Url) -> Option<usize> {
        self.own.iter().filter(|p| p.matches(url)).map(|p| p.path.len()).max()
    }
}

impl Delivery {
    /// Checks with a `HEAD` (signed like a client's redirect) that a blob of `size` bytes is
    /// at `url`, which the policy of `name` must allow.
    pub async fn verify_external(&self, name: &RepoName, url: &str, size: u64) -> Result<(), ExternalRefused> {
        let Decision::Redirect(signed) = self.locate_external(name, &[url.to_string()], None) else {
            return Err(ExternalRefused::NotAllowed { url: url.into(), name: name.clone() });
        };
        let http = match self.http.get() {
            Some(h) => h,
            None => {
                let h = crate::upstream::content_client(false)
                    .map_err(|e| ExternalRefused::Client(tessera_client::error::chain(&e)))?;
                self.http.get_or_init(|| h)
            }
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), http.head(&signed).send())
            .await
            .map_err(|_| ExternalRefused::TimedOut { url: url.into() })?
            .map_err(|e| ExternalRefused::Unreachable { url: url.into(), why: e.without_url().to_string() })?;
        let found = answer.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if !answer.status().is_success() {
            return Err(ExternalRefused::Status { url: url.into(), status: answer.status() });
        }
        if found != Some(size) {
            let found = found.map_or("an unknown number of".into(), |f| f.to_string());
            return Err(ExternalRefused::WrongSize { url: url.into(), found, size });
        }
        Ok(())
    }

    /// The first of `urls` a rule covering `name` admits, signed by the rule that owns it
    /// when that rule is one of `name`'s own or an explicit `external_allow` named it (a
    /// URL a pusher merely got under some CDN is never signed with that CDN's secret).
    pub(super) fn locate_external(&self, name: &RepoName, urls: &[String], client: Option<IpAddr>) -> Decision {
        let Some((url, parsed, explicitly)) = self.admitted(name, urls) else { return Decision::NotAllowed };
        let owner = self.owner_of(&parsed);
        let may_sign = owner.is_some_and(|o| explicitly || self.matching(name).any(|r| std::ptr::eq(r, o)));
        Decision::Redirect(match owner {
            Some(rule) if may_sign => rule.finish(url.to_string(), client),
            _ => url.to_string(),
        })
    }

    /// The rule whose CDN or mirror base covers `url` most specifically.
    fn owner_of(&self, url: &url::Url) -> Option<&Rule> {
        self.rules.iter().filter_map(|r| r.owns(url).map(|len| (len, r))).max_by_key(|(len, _)| *len).map(|(_, r)| r)
    }

    /// `url` (configured, not a client's: a Crane file's, a layout's) rewritten and signed
    /// by the rule that owns it; unchanged when no rule does.
    pub fn sign_known(&self, url: &str) -> String {
        let parsed = url::Url::parse(url).ok();
        match parsed.as_ref().and_then(|u| self.owner_of(u)) {
            Some(rule) => rule.finish(url.to_string(), None),
            None => url.to_string(),
        }
    }

    /// The first of `urls` the rules covering `name` admit (an `external_allow` of any of
    /// them, or one's own CDN or mirrors) and none denies; and whether an explicit
    /// `external_allow` admitted it. URLs with encoded separators or dots are never
    /// admitted: servers that decode them could leave the allowed path.
    fn admitted<'u>(&self, name: &RepoName, urls: &'u [String]) -> Option<(&'u str, url::Url, bool)> {
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
            (explicitly || own).then_some((u, parsed, explicitly))
        })
    }

    /// The first of `urls` the rules covering `name` admit.
    pub fn allowed_url<'u>(&self, name: &RepoName, urls: &'u [String]) -> Option<&'u str> {
        self.admitted(name, urls).map(|(u, _, _)| u)
    }
}
