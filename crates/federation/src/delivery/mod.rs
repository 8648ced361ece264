//! Delivery: where a client fetches a blob's bytes. Manifests are always ours; a blob is
//! streamed by us, or answered with a redirect to a CDN (optionally with an expiring
//! signature a plain nginx or an Akamai-style edge checks), to the nearest healthy mirror
//! for the client's address, or to the external URL the blob lives at (descriptor `urls`,
//! metadata-only push) when the repository's allow list admits it, or to a presigned URL
//! of the blob in the S3-compatible blob store.
//!
//! Rules come from `[[delivery]]`, first prefix match wins; a mirrors rule with no healthy
//! mirror for the client hands over to the next matching rule, and no rule means stream.

mod explain;
mod mirrors;
mod policy;
mod sign;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tessera_client::layout::{DEFAULT_BLOB_LAYOUT, expand_blob_layout};
use tessera_config::Deliver;
use tessera_spec::{Digest, RepoName};

pub use mirrors::MirrorState;
pub use policy::ExternalRefused;
use policy::{UrlPattern, patterns};
use sign::{Signer, unix_now};

const DEFAULT_HEALTH_INTERVAL_SECS: u64 = 30;
/// How long a presigned URL stays valid unless `ttl_secs` says otherwise: long enough for a
/// slow client to start the download, short enough that a leaked URL soon stops working.
const DEFAULT_PRESIGNED_TTL_SECS: u64 = 600;

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
    pub presigned: AtomicU64,
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
    Presigned(Duration),
}

/// Why a configuration's delivery rules could not be put to work.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("delivery {rule}: {why}")]
    Rule { rule: usize, why: String },
    #[error("mirror health checks: {0}")]
    HealthChecks(String),
    #[error("deliver = \"presigned\" needs the blobs in an S3-compatible store ([storage.s3])")]
    Presigning,
}

/// Where a blob is to be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We send the bytes.
    Stream,
    /// A 307 to this URL.
    Redirect(String),
    /// A 307 to a URL of the blob store's, signed to be valid this long.
    Presigned(Duration),
    /// The blob lives elsewhere and no URL it names is allowed here.
    NotAllowed,
}

pub use tessera_client::layout::ensure_slash;

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
            Deliver::Presigned => How::Presigned(Duration::from_secs(d.ttl_secs.unwrap_or(DEFAULT_PRESIGNED_TTL_SECS))),
        };
        let own = match &how {
            How::Cdn(base) => vec![UrlPattern::parse(base)?],
            How::Mirrors(ms) => ms.iter().map(|m| UrlPattern::parse(&m.base)).collect::<Result<_, _>>()?,
            How::Stream | How::Presigned(_) => Vec::new(),
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
}

impl Delivery {
    /// The rules of `config`. Mirrors unchanged from `previous` keep their health.
    pub fn new(config: &[tessera_config::Delivery], previous: Option<&Delivery>) -> Result<Delivery, DeliveryError> {
        let rules = config
            .iter()
            .enumerate()
            .map(|(i, d)| Rule::new(d, previous).map_err(|why| DeliveryError::Rule { rule: i + 1, why }))
            .collect::<Result<_, _>>()?;
        let redirects = previous.map(|p| p.redirects.clone()).unwrap_or_default();
        Ok(Delivery { rules, redirects, health: None, http: std::sync::OnceLock::new() })
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
                How::Presigned(ttl) => return Decision::Presigned(*ttl),
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

    /// Whether any rule delivers through presigned URLs of the blob store.
    pub fn presigns(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.how, How::Presigned(_)))
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
        // Ownership and admission compare the same parsed URL: spelled differently, the same
        // place is admitted and signed alike.
        let spelled = "HTTP://127.0.0.2:80/base/blobs/sha256:00".to_string();
        match d.external(&name("base/ubi"), std::slice::from_ref(&spelled), None) {
            Decision::Redirect(u) => assert!(u.contains("?md5="), "{u}"),
            other => panic!("{other:?}"),
        }
        assert!(d.sign_known(&spelled).contains("?md5="));
        // A path that only starts with the base's text is not under it: neither admitted
        // nor signed with the CDN's secret.
        let beside = "http://127.0.0.2/base-other/blobs/sha256:00".to_string();
        assert_eq!(d.external(&name("base/ubi"), std::slice::from_ref(&beside), None), Decision::NotAllowed);
        assert_eq!(d.sign_known(&beside), beside);
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
