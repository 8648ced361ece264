//! The typed configuration: what `tessera serve` reads from `--config FILE` (TOML), with the
//! zero-config defaults. Every field is documented in `docs/config.md`; keep the two in step.

pub mod collage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: PathBuf, message: String },
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
}

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(pub ipnet::IpNet);

impl Network {
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.contains(ip)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(Network)
            .map_err(|_| format!("{s:?} is not a network (CIDR) or an address"))
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One `[[static]]` source; exactly one of `crane_dir` and `layout`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSource {
    /// Name used by routes (`to = "name"`), like an upstream's.
    pub name: String,
    /// A directory of Pulp `pulp-docker-redirect` JSON files (versions 2 to 4), one
    /// repository each; changes on disk are picked up without a restart.
    pub crane_dir: Option<PathBuf>,
    /// An OCI image layout: a directory, or an `http(s)://` base URL where its `index.json`
    /// and `blobs/` are served.
    pub layout: Option<String>,
    /// With `layout`: the repository name it is served as.
    pub repository: Option<String>,
    /// Seconds between checks of `crane_dir` (and of a layout URL's `index.json`) for changes.
    #[serde(default = "default_static_poll_secs")]
    pub poll_secs: u64,
}

fn default_static_poll_secs() -> u64 {
    2
}

impl StaticSource {
    /// A Crane directory source named `crane` (`tessera serve --crane-dir DIR`).
    pub fn crane(dir: PathBuf) -> StaticSource {
        StaticSource {
            name: "crane".into(),
            crane_dir: Some(dir),
            layout: None,
            repository: None,
            poll_secs: default_static_poll_secs(),
        }
    }
}

/// One `[[delivery]]` rule: how blobs of repositories under `prefix` are delivered.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// Repository-name prefix, matched by whole components; empty matches every name.
    pub prefix: String,
    pub deliver: Deliver,
    /// `deliver = "cdn"`: base URL blobs are redirected to.
    pub cdn: Option<String>,
    /// Path of a blob under a CDN or mirror base URL: `{digest}` (`sha256:ab..`),
    /// `{algorithm}`, `{hex}`, `{hex2}` (first two hex digits), `{name}`. Pulp's layout
    /// `blobs/{digest}` by default.
    pub layout: Option<String>,
    /// An expiring signature added to the redirect URL (`[delivery.token]`).
    pub token: Option<UrlToken>,
    /// Literal text replacements applied to the redirect URL, in order.
    pub rewrite: Vec<Rewrite>,
    /// `deliver = "mirrors"`: the mirrors (`[[delivery.mirror]]`).
    #[serde(rename = "mirror")]
    pub mirrors: Vec<Mirror>,
    /// Seconds between health checks of each mirror.
    pub health_interval_secs: Option<u64>,
    /// A blob every mirror holds, asked for with `HEAD` by the health check; without it the
    /// check asks for the mirror's base URL and takes any answer below 500 as healthy.
    pub health_blob: Option<String>,
    /// URLs a layer stored elsewhere (descriptor `urls`, metadata-only push) may be
    /// redirected to: `scheme://host[:port]/path-prefix`, a host may start with `*.`.
    /// Nothing is allowed by default.
    pub external_allow: Vec<String>,
    /// URLs never redirected to, even when `external_allow` matches.
    pub external_deny: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// This server sends the bytes.
    #[default]
    Stream,
    /// A 307 to the blob's path under `cdn`.
    Cdn,
    /// A 307 to the nearest healthy mirror for the client's address; with none, the next
    /// matching rule decides.
    Mirrors,
    /// A 307 to a presigned URL of the S3-compatible blob store (needs that store).
    Presigned,
}

/// An expiring signature on redirect URLs, checkable by the CDN without asking us.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UrlToken {
    pub kind: TokenKind,
    /// The shared secret (`secure_link_md5`: text; `hmac_sha256`: hex, as Akamai issues it).
    pub secret: Option<String>,
    /// File holding the secret instead (trailing newline ignored).
    pub secret_file: Option<PathBuf>,
    /// Seconds a signed URL stays valid.
    #[serde(default = "default_token_ttl_secs")]
    pub ttl_secs: u64,
    /// `secure_link_md5`: the text hashed, as in nginx's `secure_link_md5` directive, with
    /// `{expires}`, `{path}`, `{client}` (the client's address) and `{secret}`.
    #[serde(default = "default_secure_link_expression")]
    pub expression: String,
    /// `secure_link_md5`: query parameters carrying the hash and the expiry time.
    #[serde(default = "default_hash_param")]
    pub hash_param: String,
    #[serde(default = "default_expires_param")]
    pub expires_param: String,
    /// `hmac_sha256`: the query parameter carrying the token (Akamai's `__token__`).
    #[serde(default = "default_token_param")]
    pub token_param: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// nginx `secure_link` + `secure_link_md5`: `?md5=<base64url md5>&expires=<unix time>`.
    SecureLinkMd5,
    /// Akamai-style token auth: `?__token__=exp=..~acl=..~hmac=<hex HMAC-SHA256>`.
    HmacSha256,
}

fn default_token_ttl_secs() -> u64 {
    600
}
fn default_secure_link_expression() -> String {
    "{expires}{path} {secret}".into()
}
fn default_hash_param() -> String {
    "md5".into()
}
fn default_expires_param() -> String {
    "expires".into()
}
fn default_token_param() -> String {
    "__token__".into()
}

/// Replaces the first occurrence of `match` in a redirect URL with `replace`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(rename = "match")]
    pub find: String,
    pub replace: String,
}

/// A mirror of the blobs: a base URL and the client networks it serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub url: String,
    /// Client networks (CIDRs) this mirror serves; empty: every client.
    #[serde(default)]
    pub networks: Vec<Network>,
    /// Lower is preferred among the healthy mirrors serving a client.
    #[serde(default = "default_mirror_priority")]
    pub priority: u32,
}

fn default_mirror_priority() -> u32 {
    100
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file (bcrypt hashes: `htpasswd -B`) with the users who can log in.
    pub htpasswd: PathBuf,
    /// The realm named in Basic challenges; also the token `service` name.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Offer the Docker token flow (Bearer tokens from `/token`, Tessera as the issuer)
    /// instead of Basic challenges.
    #[serde(default)]
    pub token: bool,
    /// Lifetime of issued tokens, in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// PKCS#8 P-256 key signing tokens; created when missing. Default `<data>/token-key.p8`.
    #[serde(default)]
    pub token_key: Option<PathBuf>,
    /// The `iss` of tokens this registry issues.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Other issuers whose Bearer tokens are accepted (`[[auth.trusted_issuer]]`).
    #[serde(default)]
    pub trusted_issuer: Vec<TrustedIssuer>,
    /// Named groups of users (`[auth.groups]`, `team = ["alice", "bob"]`), named in
    /// `[[access]]` rules as `@team`.
    #[serde(default)]
    pub groups: std::collections::HashMap<String, Vec<String>>,
}

fn default_issuer() -> String {
    "tessera".into()
}

impl AuthConfig {
    /// Basic logins from `htpasswd`, everything else at its default.
    pub fn new(htpasswd: PathBuf) -> AuthConfig {
        AuthConfig {
            htpasswd,
            realm: default_realm(),
            token: false,
            token_ttl_secs: default_token_ttl(),
            token_key: None,
            issuer: default_issuer(),
            trusted_issuer: Vec::new(),
            groups: Default::default(),
        }
    }
}

/// An external token issuer: its tokens are verified against the keys of its JWKS (a file,
/// or a URL fetched while serving) and must name this `issuer` and `audience`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub audience: String,
    /// The JWKS document as a file, read at start-up.
    pub jwks_file: Option<PathBuf>,
    /// The JWKS document's URL (e.g. an OpenID provider's `jwks_uri`): fetched at start-up,
    /// every `jwks_refresh_secs`, and when a token names a key not yet known (at most every
    /// few seconds), so the issuer can rotate its keys.
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
}

fn default_jwks_refresh() -> u64 {
    3600
}

fn default_token_ttl() -> u64 {
    300
}

fn default_realm() -> String {
    "tessera".into()
}

/// One `[[access]]` rule. Members: user names, `*` (any logged-in user), `anonymous`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccessRule {
    pub prefix: String,
    pub pull: Vec<String>,
    pub push: Vec<String>,
    pub delete: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    #[default]
    Hosted,
    /// Only routed names exist (a read-only front such as a Collage configuration).
    None,
}

/// Another registry, reached over HTTP(S).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Name used by routes (`to = "name"` or `to = "name:path"`).
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io`. `http://` only when written so.
    pub url: String,
    /// Registry names this upstream answers for: a request with `?ns=` equal to one of them
    /// (containerd's mirror parameter) is routed here when no route matched first.
    #[serde(default)]
    pub authority: Vec<String>,
    /// Credentials for the upstream (HTTP basic, or for its token service).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Extra PEM CA bundle trusted for this upstream, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Docker Hub's rule: a one-component name `x` means `library/x`. Defaults to on when
    /// `authority` includes `docker.io`.
    pub library_rule: Option<bool>,
    /// Seconds an upstream request may take before it counts as failed.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub cache: UpstreamCache,
}

fn default_upstream_timeout() -> u64 {
    30
}

/// How manifests fetched from an upstream are cached.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamCache {
    /// Seconds a manifest fetched by tag is served without asking the upstream again; after
    /// that it is revalidated with a HEAD (which does not count against Docker Hub's limit).
    pub tag_ttl_secs: u64,
    /// Serve the cached copy when the upstream is down, times out, or answers 5xx or 429.
    pub serve_stale: bool,
    /// The oldest validation a stale answer may rest on, in seconds.
    pub max_stale_secs: u64,
    /// Seconds a "not found" from the upstream is remembered.
    pub negative_ttl_secs: u64,
    /// Bytes of blobs kept for this upstream; least recently used blobs are evicted past
    /// it. 0: no bound.
    pub max_bytes: u64,
}

impl Default for UpstreamCache {
    fn default() -> Self {
        UpstreamCache {
            tag_ttl_secs: 300,
            serve_stale: true,
            max_stale_secs: 7 * 24 * 3600,
            negative_ttl_secs: 30,
            max_bytes: 0,
        }
    }
}

/// A route's target: `"hosted"`, `"upstream"`, `"upstream:path/prefix"`, a static source's
/// name, or a list of those (a group, tried in order). Parsed once, here.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "TargetText")]
pub struct Target(pub Vec<RouteMember>);

/// One member of a route's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMember {
    Hosted,
    /// An upstream (optionally under a path of its names) or a static source, by name.
    Named {
        source: String,
        path: Option<String>,
    },
}

impl RouteMember {
    /// The upstream or static source this member names.
    pub fn source(&self) -> Option<&str> {
        match self {
            RouteMember::Hosted => None,
            RouteMember::Named { source, .. } => Some(source),
        }
    }
}

impl std::str::FromStr for RouteMember {
    type Err = String;

    fn from_str(text: &str) -> Result<RouteMember, String> {
        if text == "hosted" {
            return Ok(RouteMember::Hosted);
        }
        let (source, path) = match text.split_once(':') {
            Some((source, path)) => (source, Some(path.trim_matches('/').to_string()).filter(|p| !p.is_empty())),
            None => (text, None),
        };
        if source.is_empty() {
            return Err(format!("route target {text:?} names no upstream or static source"));
        }
        Ok(RouteMember::Named { source: source.to_string(), path })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TargetText {
    One(String),
    Group(Vec<String>),
}

impl TryFrom<TargetText> for Target {
    type Error = String;

    fn try_from(text: TargetText) -> Result<Target, String> {
        let members = match text {
            TargetText::One(t) => vec![t],
            TargetText::Group(g) if g.is_empty() => return Err("a route's group is empty".into()),
            TargetText::Group(g) => g,
        };
        members.iter().map(|m| m.parse()).collect::<Result<_, _>>().map(Target)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pull through: fetch, verify, keep, and serve from the cache afterwards.
    #[default]
    Cache,
    /// Redirect only: answer with a 307 to the upstream; no bytes pass through here.
    Redirect,
}

/// One row of the routing table. Every given matcher must match; none given matches all.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Virtual host: the request's `Host` (without port), case-insensitive.
    pub host: Option<String>,
    /// The `ns` query parameter containerd sends as a mirror (e.g. `docker.io`).
    pub authority: Option<String>,
    /// Repository-name prefix, matched by whole components; it is removed from the name
    /// before the target's path is prepended (`cool/stuff/x` -> `flavio/x`).
    pub prefix: Option<String>,
    pub to: Target,
    #[serde(default)]
    pub mode: Mode,
    /// Allow pushes (only to `hosted`). Default: true for a hosted target, else false.
    pub push: Option<bool>,
    /// Whose credentials the upstream sees: the upstream's configured ones (the default),
    /// or, with `"passthrough"`, the client's own `Authorization`, with the upstream's
    /// challenges relayed to the client. Tessera's own login does not apply to such a route
    /// (the upstream decides), and every answer, cached or not, is authorised by the
    /// upstream for that client first.
    #[serde(default)]
    pub credentials: Credentials,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Credentials {
    #[default]
    Configured,
    Passthrough,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle for client certificates (mutual TLS). A verified client certificate
    /// identifies its holder by the subject's common name.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client certificate is required, or only accepted.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Optional,
    Required,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest accepted on PUT; larger ones get 413.
    pub manifest_max_bytes: u64,
    /// Largest request head (request line plus headers); larger ones get 431.
    pub header_max_bytes: usize,
    /// Largest blob accepted by an upload; 0 means no limit.
    pub blob_max_bytes: u64,
    /// Requests per second one client address may make (a burst of as many); past it, 429
    /// with `Retry-After`. 0: no limit.
    pub requests_per_second_per_client: u32,
    /// Uploading requests (POST, PATCH, PUT with a body) one client address may have in
    /// flight at once; past it, 429. 0: no limit.
    pub uploads_per_client: usize,
    /// Seconds a request body may go without sending a byte before the request is
    /// abandoned (slow-client guard; what arrived of an upload is kept for resuming).
    pub body_idle_timeout_secs: u64,
    /// Seconds a response may wait for the client to take more bytes before the connection
    /// is closed (a client that stops reading).
    pub send_idle_timeout_secs: u64,
    /// Seconds a request without a body (GET, HEAD, DELETE) may take until its answer
    /// starts; past it, 503 with `Retry-After`. 0: no limit. (Uploads are bounded by the
    /// body timeouts and sizes instead, downloads by `send_idle_timeout_secs`.)
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Allow DELETE of manifests, tags and blobs; when false they answer 405 UNSUPPORTED.
    pub delete_enabled: bool,
    /// Upload sessions untouched for this many seconds are removed (at start-up and by each
    /// garbage collection pass).
    pub upload_expiry_secs: u64,
    /// Seconds between garbage collection passes over the hosted store; 0 turns them off.
    pub gc_interval_secs: u64,
    /// How long unreferenced links and unlinked bytes are kept before a pass removes them:
    /// longer than any push takes between its first layer and its manifest.
    pub gc_grace_secs: u64,
    /// Passes also delete manifests nothing keeps: untagged, listed by no index of their
    /// repository, not a referrer of a kept manifest (Distribution's `--delete-untagged`).
    pub gc_untagged: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// Memory for manifests, tags and blob links kept after their first read.
    pub metadata_bytes: u64,
    /// Memory for small blobs kept after their first read; 0 turns the blob cache off.
    pub blob_bytes: u64,
    /// Blobs larger than this are never cached in memory; they stream from storage.
    pub blob_max_item_bytes: u64,
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
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_max_bytes: 4 * 1024 * 1024,
            header_max_bytes: 64 * 1024,
            blob_max_bytes: 0,
            requests_per_second_per_client: 0,
            uploads_per_client: 64,
            body_idle_timeout_secs: 60,
            send_idle_timeout_secs: 60,
            request_timeout_secs: 300,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            delete_enabled: true,
            upload_expiry_secs: 7 * 24 * 3600,
            gc_interval_secs: 3600,
            gc_grace_secs: 24 * 3600,
            gc_untagged: false,
        }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache { metadata_bytes: 64 * 1024 * 1024, blob_bytes: 64 * 1024 * 1024, blob_max_item_bytes: 256 * 1024 }
    }
}

/// A TOML error as one line (`line L, column C: message`): toml's own text draws the line
/// with a caret over several lines, which does not fit an error chain.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let quoted = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}, column {column}: {message} (in `{quoted}`)")
        }
        None => message,
    }
}

impl Config {
    /// Reads and validates a TOML file. Errors name the file, line and reason.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Replaces the routing table with a Collage configuration's (see [`collage`]).
    pub fn with_collage(mut self, json: &str, mode: Mode) -> Result<Config, String> {
        let (upstreams, routes, fallback) = collage::from_collage(json, mode)?;
        self.upstreams = upstreams;
        self.routes = routes;
        self.fallback = fallback;
        self.validate()?;
        Ok(self)
    }

    /// This configuration, if it is valid (after changes made in code, e.g. by flags).
    pub fn validated(self) -> Result<Config, String> {
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), String> {
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
        Ok(())
    }
}

/// Whether `url` is an `http://` or `https://` URL (the only kinds Tessera fetches or
/// redirects to).
pub fn is_http_url(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

impl Delivery {
    fn validate(&self) -> Result<(), String> {
        match self.deliver {
            Deliver::Stream => {}
            Deliver::Cdn => match &self.cdn {
                Some(base) if is_http_url(base) => {}
                _ => return Err("deliver = \"cdn\" needs cdn = \"https://...\"".into()),
            },
            Deliver::Mirrors => {
                if self.mirrors.is_empty() {
                    return Err("deliver = \"mirrors\" needs at least one [[delivery.mirror]]".into());
                }
                for m in &self.mirrors {
                    if !is_http_url(&m.url) {
                        return Err(format!("mirror url {:?} must start with https:// or http://", m.url));
                    }
                }
            }
            Deliver::Presigned => {
                return Err("deliver = \"presigned\" needs the S3-compatible blob store, which this build \
                            does not have yet"
                    .into());
            }
        }
        if self.cdn.is_some() && self.deliver != Deliver::Cdn {
            return Err("cdn is set but deliver is not \"cdn\"".into());
        }
        if !self.mirrors.is_empty() && self.deliver != Deliver::Mirrors {
            return Err("[[delivery.mirror]] given but deliver is not \"mirrors\"".into());
        }
        if let Some(t) = &self.token
            && t.secret.is_some() == t.secret_file.is_some()
        {
            return Err("token needs exactly one of secret and secret_file".into());
        }
        if self.rewrite.iter().any(|r| r.find.is_empty()) {
            return Err("a rewrite's match must not be empty".into());
        }
        Ok(())
    }
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
    fn errors_name_the_line() {
        let e = Config::from_toml("listen = \"x\"\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = Config::from_toml("\n\nbogus = 1\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        assert!(Config::from_toml("[limits]\nheader_max_bytes = 10\n").is_err());
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
                prop_assert!(!e.is_empty());
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
