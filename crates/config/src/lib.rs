//! The typed configuration: what `tessera serve` reads from `--config FILE` (TOML), with the
//! zero-config defaults. Every field is documented in `docs/config.md`; keep the two in step.

mod access;
mod auth;
mod cache;
pub mod collage;
mod delivery;
mod limits;
mod network;
mod notify;
mod route;
mod signatures;
mod statics;
mod storage;
mod sync;
mod tls;
mod ui;
mod upstream;

pub use access::AccessRule;
pub use auth::{AuthConfig, TrustedIssuer};
pub use cache::Cache;
pub use delivery::{Deliver, Delivery, Mirror, Rewrite, TokenKind, UrlToken};
pub use limits::Limits;
pub use network::Network;
pub use notify::{NOTIFY_EVENTS, Notify};
pub use route::{Credentials, Fallback, Mode, Route, RouteMember, Target};
pub use signatures::{SignatureIdentity, SignaturePolicy};
pub use statics::StaticSource;
pub use storage::{Postgres, S3, Storage};
pub use sync::{Sync, SyncTarget};
pub use tls::{ClientAuth, TlsConfig};
pub use ui::Ui;
pub use upstream::{Upstream, UpstreamCache};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Anything below, found in a file.
    #[error("invalid configuration in {path}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    /// Not TOML, or TOML of the wrong shape; `text` is the line it was found on.
    #[error("line {line}, column {column}: {message} (in `{text}`)")]
    Syntax { line: usize, column: usize, message: String, text: String },
    /// A TOML error toml could not place on a line.
    #[error("{0}")]
    Toml(String),
    /// Well-formed, but breaks a rule (a route naming an unknown upstream, ...).
    #[error("{0}")]
    Rule(String),
    #[error("collage configuration: {0}")]
    Collage(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP(S) listener binds.
    pub listen: SocketAddr,
    /// Directory holding blobs (`blobs/`), upload sessions (`uploads/`) and `meta.sqlite`.
    pub data: PathBuf,
    /// Serve HTTPS with this certificate and key; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub storage: Storage,
    pub cache: Cache,
    /// Other registries this one can pull through or redirect to (`[[upstream]]`).
    #[serde(rename = "upstream")]
    pub upstreams: Vec<Upstream>,
    /// The routing table (`[[route]]`), first match wins. Requests no route matches go to
    /// the hosted repositories.
    #[serde(rename = "route")]
    pub routes: Vec<Route>,
    /// Where requests no route matches go: `hosted` (the default) or `none` (not found).
    pub fallback: Fallback,
    /// Authentication; absent: no login asked (the open default, for loopback use).
    pub auth: Option<AuthConfig>,
    /// Without `[auth]`: may anonymous clients push and delete? Default: only when
    /// `listen` is a loopback address.
    pub anonymous_writes: Option<bool>,
    /// Who may pull, push and delete under each name prefix (`[[access]]`), longest prefix
    /// first. Names no rule covers: any logged-in user may do anything, anonymous nothing.
    pub access: Vec<AccessRule>,
    /// How blob bytes reach clients, per name prefix (`[[delivery]]`), first match wins:
    /// streamed by us (no rule), a CDN redirect, the nearest mirror; and which external
    /// layer URLs may be redirected to.
    #[serde(rename = "delivery")]
    pub deliveries: Vec<Delivery>,
    /// Read-only repositories published elsewhere (`[[static]]`): a directory of Crane/Pulp
    /// redirect files, or an OCI image layout (a directory, or the base URL of a static file
    /// server). Their names are served unless a route matched first; routes may also name
    /// them as targets.
    #[serde(rename = "static")]
    pub statics: Vec<StaticSource>,
    /// Reverse proxies (addresses or networks) whose `X-Forwarded-For` names the client:
    /// the address that rate limits, upload limits, mirror choice and the access log use.
    /// Empty (the default): the socket's peer is the client, and the header is ignored.
    pub trusted_proxies: Vec<Network>,
    /// HTTP endpoints told of pushes, pulls, deletes and promotions (`[[notify]]`).
    #[serde(rename = "notify")]
    pub notify: Vec<Notify>,
    /// Bytes the hosted repositories under a name prefix may store (`[[quota]]`).
    #[serde(rename = "quota")]
    pub quotas: Vec<Quota>,
    /// Which tags garbage collection passes untag, per name prefix (`[[retention]]`).
    pub retention: Vec<Retention>,
    /// Repositories of upstreams kept mirrored on a schedule (`[[sync]]`).
    #[serde(rename = "sync")]
    pub syncs: Vec<Sync>,
    /// Which keys vouch for the images under a name prefix, and whether pulls of images
    /// they did not sign are refused (`[[signatures]]`), longest prefix first.
    pub signatures: Vec<SignaturePolicy>,
    /// The web pages (`[ui]`).
    pub ui: Ui,
}

/// `[[retention]]`: which tags of the repositories under `prefix` go (see
/// docs/config.md): those matching `tags` and no `protect` pattern that are beyond the
/// `keep_newest` and older than `older_than`, as far as each is given.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub prefix: String,
    /// Which tags the rule looks at (`*` and `?` wildcards).
    #[serde(default = "every_tag")]
    pub tags: String,
    pub keep_newest: Option<usize>,
    /// A duration: a number and `s`, `m`, `h` or `d` (`"30d"`).
    pub older_than: Option<String>,
    /// Tags never untagged (`*` and `?` wildcards).
    #[serde(default)]
    pub protect: Vec<String>,
}

fn every_tag() -> String {
    "*".into()
}

impl Retention {
    /// `older_than` in seconds.
    pub fn older_than_secs(&self) -> Result<Option<u64>, String> {
        let Some(text) = &self.older_than else { return Ok(None) };
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("older_than {text:?}: a number and s, m, h or d (\"30d\")")),
        };
        let n: u64 = number.parse().map_err(|_| format!("older_than {text:?}: a number and s, m, h or d (\"30d\")"))?;
        Ok(Some(n.saturating_mul(scale)))
    }
}

/// `[[quota]]`: at most `max_bytes` stored under `prefix` (each blob counted once).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// A name prefix, by whole components (`team` covers `team/app`, not `teams`).
    pub prefix: String,
    pub max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data: PathBuf::from("./tessera-data"),
            tls: None,
            limits: Limits::default(),
            storage: Storage::default(),
            cache: Cache::default(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            fallback: Fallback::Hosted,
            auth: None,
            anonymous_writes: None,
            access: Vec::new(),
            deliveries: Vec::new(),
            statics: Vec::new(),
            trusted_proxies: Vec::new(),
            notify: Vec::new(),
            quotas: Vec::new(),
            retention: Vec::new(),
            syncs: Vec::new(),
            signatures: Vec::new(),
            ui: Ui::default(),
        }
    }
}

/// A TOML error as one line: toml's own text draws the line with a caret over several
/// lines, which does not fit an error chain.
fn toml_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let text = text.lines().nth(line - 1).unwrap_or("").trim().to_owned();
            ConfigError::Syntax { line, column, message, text }
        }
        None => ConfigError::Toml(message),
    }
}

impl Config {
    /// Reads and validates a TOML file. Errors name the file, line and reason.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| ConfigError::InFile { path: path.to_owned(), source: Box::new(e) })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.validated()
    }

    /// Replaces the routing table with a Collage configuration's (see [`collage`]).
    pub fn with_collage(mut self, json: &str, mode: Mode) -> Result<Config, ConfigError> {
        let (upstreams, routes, fallback) = collage::from_collage(json, mode).map_err(ConfigError::Collage)?;
        self.upstreams = upstreams;
        self.routes = routes;
        self.fallback = fallback;
        self.validated()
    }

    /// This configuration, if it is valid (after changes made in code, e.g. by flags).
    pub fn validated(self) -> Result<Config, ConfigError> {
        self.check_rules().map_err(ConfigError::Rule)?;
        Ok(self)
    }

    fn check_rules(&self) -> Result<(), String> {
        if self.limits.header_max_bytes < 8192 {
            return Err("limits.header_max_bytes must be at least 8192".into());
        }
        if self.limits.manifest_max_bytes == 0 {
            return Err("limits.manifest_max_bytes must be positive".into());
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            if u.name.is_empty() || u.name == "hosted" || u.name.contains(':') {
                return Err(format!("upstream name {:?} is not usable (empty, \"hosted\" or with ':')", u.name));
            }
            if !names.insert(u.name.as_str()) {
                return Err(format!("upstream {:?} is defined twice", u.name));
            }
            if !is_http_url(&u.url) {
                return Err(format!("upstream {:?}: url must start with https:// or http://", u.name));
            }
            if u.lookaside.as_deref().is_some_and(|l| !is_http_url(l)) {
                return Err(format!("upstream {:?}: lookaside must start with https:// or http://", u.name));
            }
        }
        for rule in &self.access {
            for member in rule.pull.iter().chain(&rule.push).chain(&rule.delete) {
                if let Some(group) = member.strip_prefix('@')
                    && !self.auth.as_ref().is_some_and(|a| a.groups.contains_key(group))
                {
                    return Err(format!(
                        "[[access]] {:?} names group @{group}, which [auth.groups] does not define",
                        rule.prefix
                    ));
                }
            }
        }
        if let Some(all) = self.trusted_proxies.iter().find(|n| n.0.prefix_len() == 0) {
            return Err(format!(
                "trusted_proxies: {all} trusts every address, so any client could choose its own; list the proxies"
            ));
        }
        for t in self.auth.iter().flat_map(|a| &a.trusted_issuer) {
            match (&t.jwks_file, &t.jwks_url) {
                (Some(_), None) => {}
                (None, Some(url)) if is_http_url(url) => {}
                (None, Some(_)) => {
                    return Err(format!("trusted issuer {:?}: jwks_url must start with https:// or http://", t.issuer));
                }
                _ => return Err(format!("trusted issuer {:?}: give exactly one of jwks_file and jwks_url", t.issuer)),
            }
            if t.jwks_refresh_secs == 0 {
                return Err(format!("trusted issuer {:?}: jwks_refresh_secs must be positive", t.issuer));
            }
        }
        for s in &self.statics {
            if s.name.is_empty() || s.name == "hosted" || s.name.contains(':') || !names.insert(s.name.as_str()) {
                return Err(format!("static source name {:?} is empty, \"hosted\", has ':' or is taken", s.name));
            }
            match (&s.crane_dir, &s.layout, &s.repository) {
                (Some(_), None, None) => {}
                (None, Some(_), Some(r)) if !r.is_empty() => {}
                (None, Some(_), _) => return Err(format!("static {:?}: layout needs repository = \"name\"", s.name)),
                _ => return Err(format!("static {:?}: give exactly one of crane_dir and layout", s.name)),
            }
        }
        if let Some(s3) = &self.storage.s3 {
            if s3.bucket.is_empty() || s3.region.is_empty() {
                return Err("[storage.s3] needs bucket and region".into());
            }
            if let Some(endpoint) = s3.endpoint.as_deref().filter(|e| !is_http_url(e)) {
                return Err(format!("[storage.s3] endpoint {endpoint:?} must start with https:// or http://"));
            }
            if s3.access_key_id_file.is_some() != s3.secret_access_key_file.is_some() {
                return Err("[storage.s3] give both access_key_id_file and secret_access_key_file, or neither".into());
            }
        }
        if let Some(pg) = &self.storage.postgres
            && pg.url.is_some() == pg.url_file.is_some()
        {
            return Err("[storage.postgres] needs exactly one of url and url_file".into());
        }
        for (i, d) in self.deliveries.iter().enumerate() {
            d.validate().map_err(|e| format!("delivery {}: {e}", i + 1))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            let members = &r.to.0;
            let hosted = members.contains(&RouteMember::Hosted);
            for source in members.iter().filter_map(RouteMember::source) {
                if !names.contains(source) {
                    return Err(format!(
                        "route {}: target {source:?} is neither \"hosted\" nor a defined upstream or static source",
                        i + 1
                    ));
                }
            }
            if r.push == Some(true) && !hosted {
                return Err(format!("route {}: push is only possible to hosted", i + 1));
            }
            if r.credentials == Credentials::Passthrough {
                // One upstream only: a client's credentials go to the registry they are for,
                // not on to the next member of a group.
                let upstream = members.first().and_then(RouteMember::source);
                let is_upstream = self.upstreams.iter().any(|u| Some(u.name.as_str()) == upstream);
                if members.len() != 1 || !is_upstream || r.mode == Mode::Redirect {
                    return Err(format!(
                        "route {}: credentials = \"passthrough\" needs exactly one upstream target, in cache mode",
                        i + 1
                    ));
                }
                // Its cache holds what clients' own credentials fetched: nothing else may
                // serve from it without asking the upstream for each client.
                let shared = self.routes.iter().any(|o| {
                    o.credentials != Credentials::Passthrough
                        && o.to.0.iter().any(|t| t.source().is_some() && t.source() == upstream)
                });
                let declares_authority =
                    self.upstreams.iter().any(|u| Some(u.name.as_str()) == upstream && !u.authority.is_empty());
                if shared || declares_authority {
                    return Err(format!(
                        "route {}: upstream {:?} passes clients' credentials through, so no route without \
                         passthrough (and no `authority`) may use it",
                        i + 1,
                        upstream.unwrap_or("")
                    ));
                }
            }
            if r.mode == Mode::Redirect && hosted {
                return Err(format!("route {}: mode = \"redirect\" needs upstream targets only", i + 1));
            }
        }
        let mut quota_prefixes = std::collections::HashSet::new();
        for q in &self.quotas {
            let prefix = q.prefix.trim_matches('/');
            if q.max_bytes == 0 {
                return Err(format!("[[quota]] {prefix:?}: max_bytes must be positive"));
            }
            if !quota_prefixes.insert(prefix) {
                return Err(format!("[[quota]] {prefix:?} is given twice"));
            }
        }
        let mut retention_prefixes = std::collections::HashSet::new();
        for r in &self.retention {
            let prefix = r.prefix.trim_matches('/');
            let older_than = r.older_than_secs().map_err(|e| format!("[[retention]] {prefix:?}: {e}"))?;
            if r.keep_newest.is_none() && older_than.is_none() {
                return Err(format!("[[retention]] {prefix:?}: give keep_newest, older_than or both"));
            }
            if r.tags.is_empty() || r.protect.iter().any(String::is_empty) {
                return Err(format!("[[retention]] {prefix:?}: empty tag pattern"));
            }
            if !retention_prefixes.insert(prefix) {
                return Err(format!("[[retention]] {prefix:?} is given twice"));
            }
        }
        let mut sync_names = std::collections::HashSet::new();
        for (i, s) in self.syncs.iter().enumerate() {
            s.check(i, &self.upstreams)?;
            if !sync_names.insert(s.name_at(i)) {
                return Err(format!("[[sync]] {} is named twice", s.name_at(i)));
            }
        }
        let mut signature_prefixes = std::collections::HashSet::new();
        for p in &self.signatures {
            p.check(&self.upstreams)?;
            if !signature_prefixes.insert((p.prefix(), p.upstream.as_deref())) {
                return Err(format!("[[signatures]] {:?} is given twice", p.prefix()));
            }
        }
        let mut notify_names = std::collections::HashSet::new();
        for (i, n) in self.notify.iter().enumerate() {
            n.check(i)?;
            if !notify_names.insert(n.name_at(i)) {
                return Err(format!("[[notify]] {} is named twice", n.name_at(i)));
            }
        }
        Ok(())
    }
}

/// Whether `url` is an `http://` or `https://` URL (the only kinds Tessera fetches or
/// redirects to).
pub fn is_http_url(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn fields_parse() {
        let c = Config::from_toml(
            r#"
listen = "0.0.0.0:443"
data = "/srv/tessera"
[tls]
cert = "c.pem"
key = "k.pem"
[limits]
manifest_max_bytes = 1024
[storage]
delete_enabled = false
"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 443);
        assert!(!c.storage.delete_enabled);
        assert_eq!(c.limits.manifest_max_bytes, 1024);
        assert_eq!(c.limits.header_max_bytes, 64 * 1024);
        assert_eq!(c.tls.unwrap().cert, PathBuf::from("c.pem"));
    }

    #[test]
    fn passthrough_routes_have_their_upstream_to_themselves() {
        let base = "[[upstream]]\nname = \"a\"\nurl = \"https://a\"\n[[upstream]]\nname = \"b\"\nurl = \"https://b\"\n";
        let with = |routes: &str| Config::from_toml(&format!("{base}{routes}"));
        assert!(with("[[route]]\nprefix = \"p\"\nto = \"a\"\ncredentials = \"passthrough\"\n").is_ok());
        for bad in [
            // A group would hand one registry's credentials to the next.
            "[[route]]\nto = [\"a\", \"b\"]\ncredentials = \"passthrough\"\n",
            "[[route]]\nto = \"hosted\"\ncredentials = \"passthrough\"\n",
            "[[route]]\nto = \"a\"\nmode = \"redirect\"\ncredentials = \"passthrough\"\n",
            // The same cache served without asking the upstream per client.
            "[[route]]\nprefix = \"p\"\nto = \"a\"\ncredentials = \"passthrough\"\n[[route]]\nprefix = \"q\"\nto = \"a:x\"\n",
        ] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let with_authority = base.replace("url = \"https://a\"", "url = \"https://a\"\nauthority = [\"a.io\"]");
        assert!(
            Config::from_toml(&format!("{with_authority}[[route]]\nto = \"a\"\ncredentials = \"passthrough\"\n"))
                .is_err()
        );
        let with_static = format!(
            "{base}[[static]]\nname = \"s\"\ncrane_dir = \"/x\"\n[[route]]\nto = \"s\"\ncredentials = \"passthrough\"\n"
        );
        assert!(Config::from_toml(&with_static).is_err(), "a static source has no credentials to pass to");
    }

    #[test]
    fn routing_table_parses_and_validates() {
        let c = Config::from_toml(
            r#"
[[upstream]]
name = "dockerhub"
url = "https://registry-1.docker.io"
authority = ["docker.io"]
cache = { tag_ttl_secs = 60 }

[[upstream]]
name = "quay"
url = "https://quay.io"

[[route]]
prefix = "cool/stuff"
to = "dockerhub:flavio"
mode = "redirect"

[[route]]
to = ["hosted", "dockerhub", "quay"]
"#,
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].cache.tag_ttl_secs, 60);
        assert!(c.upstreams[0].cache.serve_stale);
        assert_eq!(c.routes[0].mode, Mode::Redirect);
        let named = |s: &str| RouteMember::Named { source: s.into(), path: None };
        assert_eq!(c.routes[1].to, Target(vec![RouteMember::Hosted, named("dockerhub"), named("quay")]));
        for bad in [
            "[[route]]\nto = \"nowhere\"\n",
            "[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"\n",
            "[[upstream]]\nname = \"a\"\nurl = \"https://x\"\n[[upstream]]\nname = \"a\"\nurl = \"https://y\"\n",
            "[[upstream]]\nname = \"a\"\nurl = \"https://x\"\n[[route]]\nto = \"a\"\npush = true\n",
            "[[route]]\nto = \"hosted\"\nmode = \"redirect\"\n",
            "[[route]]\nto = []\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trusted_issuers_take_one_key_source_and_proxies_take_networks() {
        let issuer = |keys: &str| {
            format!("[auth]\nhtpasswd = \"h\"\n[[auth.trusted_issuer]]\nissuer = \"i\"\naudience = \"a\"\n{keys}")
        };
        let c = Config::from_toml(&issuer("jwks_url = \"https://idp.example/jwks\"\n")).unwrap();
        assert_eq!(c.auth.unwrap().trusted_issuer[0].jwks_refresh_secs, 3600);
        assert!(Config::from_toml(&issuer("jwks_file = \"k.json\"\n")).is_ok());
        for bad in [
            "",
            "jwks_file = \"k.json\"\njwks_url = \"https://idp.example/jwks\"\n",
            "jwks_url = \"file:///etc/jwks\"\n",
            "jwks_url = \"https://idp.example/jwks\"\njwks_refresh_secs = 0\n",
        ] {
            assert!(Config::from_toml(&issuer(bad)).is_err(), "{bad}");
        }
        let c = Config::from_toml("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n").unwrap();
        assert!(c.trusted_proxies[0].contains(&"10.2.3.4".parse().unwrap()));
        assert!(c.trusted_proxies[1].contains(&"::1".parse().unwrap()));
        assert!(!c.trusted_proxies[1].contains(&"::2".parse().unwrap()));
        assert!(Config::from_toml("trusted_proxies = [\"10.0.0.0/33\"]\n").is_err());
        assert!(Config::from_toml("trusted_proxies = [\"0.0.0.0/0\"]\n").is_err());
        assert!(Config::from_toml("trusted_proxies = [\"::/0\"]\n").is_err());
        assert!(Config::from_toml("trusted_proxies = [\"proxy.example\"]\n").is_err());
    }

    #[test]
    fn signature_rules_name_keys_and_known_upstreams_once() {
        let base = "[[upstream]]\nname = \"up\"\nurl = \"https://up\"\n";
        let with = |rules: &str| Config::from_toml(&format!("{base}{rules}")).map_err(|e| e.to_string());
        let c = with("[[signatures]]\nprefix = \"/team/\"\nkeys = [\"k.asc\"]\n").unwrap();
        assert_eq!((c.signatures[0].prefix(), c.signatures[0].require), ("team", true));
        assert_eq!(c.signatures[0].identity, SignatureIdentity::Exact);
        let c = with("[[signatures]]\nupstream = \"up\"\nkeys = [\"k.pem\"]\nidentity = \"any\"\nrequire = false\n")
            .unwrap();
        assert_eq!((c.signatures[0].prefix(), c.signatures[0].upstream.as_deref()), ("", Some("up")));
        assert!(with("[[signatures]]\nprefix = \"a\"\nkeys = []\n").unwrap_err().contains("no keys"));
        assert!(with("[[signatures]]\nupstream = \"nope\"\nkeys = [\"k\"]\n").unwrap_err().contains("no [[upstream]]"));
        let twice = "[[signatures]]\nprefix = \"a\"\nkeys = [\"k\"]\n";
        assert!(with(&format!("{twice}{twice}")).unwrap_err().contains("twice"));
        assert!(with("[[signatures]]\nprefix = \"a\"\nkeys = [\"k\"]\nidentity = \"loose\"\n").is_err());
    }

    #[test]
    fn errors_name_the_line() {
        let e = Config::from_toml("listen = \"x\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 1, .. }), "{e}");
        let e = Config::from_toml("\n\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        let e = Config::from_toml("[limits]\nheader_max_bytes = 10\n").unwrap_err();
        assert!(matches!(&e, ConfigError::Rule(m) if m.contains("header_max_bytes")), "{e}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_text_is_a_config_or_a_clear_error(text in "(?s).{0,400}") {
            if let Err(e) = super::Config::from_toml(&text) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn any_json_is_a_collage_config_or_a_clear_error(text in "(?s).{0,300}") {
            if let Err(e) = super::collage::from_collage(&text, super::Mode::Redirect) {
                prop_assert!(!e.is_empty());
            }
        }
    }
}
