//! A client for one upstream registry: its base URL, TLS trust, credentials, and the Docker
//! token flow (401 challenge -> token from the realm for the scope -> retry), with tokens
//! cached until they expire. Upstream credentials never leave this module's requests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use tessera_config::UpstreamCache;
use tessera_spec::{Digest, RepoName};

/// An `Accept` header naming every manifest media type this registry serves.
pub fn manifest_accept() -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&tessera_spec::manifest::media::ALL.join(", ")) {
        h.insert(reqwest::header::ACCEPT, v);
    }
    h
}

/// Why an upstream request produced no usable answer. The cause, where there is one, is
/// the error's `source()`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, timed out, or the connection broke.
    #[error("upstream unreachable")]
    Unreachable(#[source] reqwest::Error),
    /// The upstream's token service refused or failed.
    #[error("upstream authentication failed")]
    Auth(#[source] AuthError),
    /// The upstream answered 429 recently; it is not asked again before this much time.
    #[error("upstream rate limit; asking again in {} s", .0.as_secs())]
    RateLimited(Duration),
}

/// Why the Docker token flow gave no token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("challenge without realm")]
    NoRealm,
    #[error("token realm is not an http(s) URL")]
    RealmNotHttp,
    #[error("token service answered {0}")]
    Refused(StatusCode),
    #[error("token service sent no usable answer")]
    Answer(#[source] reqwest::Error),
    #[error("token response without a token")]
    NoToken,
    #[error("unusable token")]
    Unusable,
}

/// Why a client could not be built: its TLS trust or its HTTP settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {}", .path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("bad certificate in {}", .path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate in {} not trusted", .path.display())]
    Trust {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS settings")]
    Tls(#[source] rustls::Error),
    #[error("HTTP client settings")]
    Http(#[source] reqwest::Error),
}

/// What a token service answers (`token`, or OAuth2's `access_token`; `expires_in` seconds).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Number>,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Scheme k="v", k2=v2`. Unknown or malformed parts are skipped, never panicked on.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect::<String>().trim().to_string();
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

/// How many upstream tokens (one per scope) an upstream client keeps at most.
pub const TOKENS_REMEMBERED: usize = 10_000;

pub struct Upstream {
    config: tessera_config::Upstream,
    name: String,
    base: String,
    authorities: Vec<String>,
    library_rule: bool,
    credentials: Option<(String, String)>,
    cache: UpstreamCache,
    http: reqwest::Client,
    /// Bearer tokens by scope (one per repository a client asked for), at most
    /// [`TOKENS_REMEMBERED`]; the least used are forgotten and fetched again when needed.
    tokens: quick_cache::sync::Cache<String, Token>,
    /// Whether the upstream asked for Basic auth (then it is sent up front).
    basic: std::sync::atomic::AtomicBool,
    /// After a 429: not before this instant (its `Retry-After` is respected).
    quiet_until: Mutex<Option<Instant>>,
    /// How the last request to the upstream went: its health as traffic sees it.
    last_contact: Mutex<Option<Contact>>,
}

/// How one request to an upstream went.
#[derive(Debug, Clone)]
pub struct Contact {
    pub at: std::time::SystemTime,
    /// Whether it answered, with a status short of a server error.
    pub answered: bool,
    /// What happened, in words: `200`, `503`, or why it could not be reached.
    pub what: String,
}

/// Seconds from a `Retry-After` header (delta-seconds form; an HTTP date or nothing: 60).
fn retry_after(headers: &HeaderMap) -> Duration {
    let secs = headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    Duration::from_secs(secs.unwrap_or(60).min(3600))
}

/// TLS for connections this process opens: the system's roots, and those of `ca_file`.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, BuildError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|source| BuildError::CaFile { path: path.to_path_buf(), source })?;
        for cert in certs {
            let cert = cert.map_err(|source| BuildError::Certificate { path: path.to_path_buf(), source })?;
            roots.add(cert).map_err(|source| BuildError::Trust { path: path.to_path_buf(), source })?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(BuildError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTP client trusting the system's roots, for plain URLs (CDNs, mirrors, content
/// servers), following up to ten redirects or none.
pub fn content_client(follow_redirects: bool) -> Result<reqwest::Client, BuildError> {
    let redirects =
        if follow_redirects { reqwest::redirect::Policy::limited(10) } else { reqwest::redirect::Policy::none() };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(None)?)
        .redirect(redirects)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(BuildError::Http)
}

impl Upstream {
    pub fn new(config: &tessera_config::Upstream) -> Result<Upstream, BuildError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(config.ca_file.as_deref())?)
            .connect_timeout(Duration::from_secs(config.timeout_secs.min(30)))
            .read_timeout(Duration::from_secs(config.timeout_secs))
            .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(BuildError::Http)?;
        let credentials = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            _ => None,
        };
        Ok(Upstream {
            config: config.clone(),
            name: config.name.clone(),
            base: config.url.trim_end_matches('/').to_string(),
            authorities: config.authority.clone(),
            library_rule: config.library_rule.unwrap_or(config.authority.iter().any(|a| a == "docker.io")),
            credentials,
            cache: config.cache.clone(),
            http,
            tokens: quick_cache::sync::Cache::new(TOKENS_REMEMBERED),
            basic: std::sync::atomic::AtomicBool::new(false),
            quiet_until: Mutex::new(None),
            last_contact: Mutex::new(None),
        })
    }

    /// How the last request to this upstream went (`None`: none was sent since start).
    pub fn last_contact(&self) -> Option<Contact> {
        self.last_contact.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records how a request went, and passes its outcome on.
    fn contact(&self, outcome: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, UpstreamError> {
        let (answered, what) = match &outcome {
            Ok(r) => (!r.status().is_server_error(), r.status().as_u16().to_string()),
            // The kind of failure only: reqwest's words carry the URL, which names the
            // repository asked for, and this is shown to anyone on the pages.
            Err(e) if e.is_timeout() => (false, "unreachable: timed out".to_string()),
            Err(e) if e.is_connect() => (false, "unreachable: could not connect".to_string()),
            Err(_) => (false, "unreachable: the connection failed".to_string()),
        };
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Contact { at: std::time::SystemTime::now(), answered, what });
        outcome.map_err(UpstreamError::Unreachable)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &tessera_config::Upstream {
        &self.config
    }

    pub fn answers_for(&self, authority: &str) -> bool {
        self.authorities.iter().any(|a| a == authority)
    }

    pub fn library_rule(&self) -> bool {
        self.library_rule
    }

    pub fn cache_settings(&self) -> &UpstreamCache {
        &self.cache
    }

    /// The URL of signature `n` (from 1) of the manifest `digest` of `name` on this
    /// upstream's lookaside server, if it has one.
    pub fn lookaside_url(&self, name: &RepoName, digest: &Digest, n: usize) -> Option<String> {
        let base = self.config.lookaside.as_deref()?.trim_end_matches('/');
        Some(format!("{base}/{}/signature-{n}", crate::layout::lookaside_entry(name, digest)))
    }

    /// GETs `url` (a lookaside signature) with this upstream's TLS trust and timeouts.
    pub async fn get_url(&self, url: &str) -> Result<reqwest::Response, reqwest::Error> {
        self.http.get(url).send().await
    }

    /// The upstream URL of an API path (`/v2/...`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        self.tokens.get(scope).filter(|t| t.expires > Instant::now()).map(|t| t.value)
    }

    fn authorization(&self, scope: &str) -> Option<HeaderValue> {
        if let Some(token) = self.cached_token(scope) {
            return HeaderValue::from_str(&format!("Bearer {token}")).ok();
        }
        if self.basic.load(std::sync::atomic::Ordering::Relaxed) {
            return self.basic_header();
        }
        None
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let (u, p) = self.credentials.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).ok()
    }

    /// Sends a pull request for `name` to `path` (`/v2/...`), answering one auth challenge.
    pub async fn send(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_as(method, name, path, headers, None, "pull").await
    }

    /// Sends a request that writes to `name` (its credentials ask for `pull,push`), with
    /// `body`, answering one auth challenge. Tessera's own client commands use this.
    pub async fn send_push(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        headers: HeaderMap,
        body: bytes::Bytes,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_as(method, name, path, headers, Some(body), "pull,push").await
    }

    /// Sends a pull request with the client's own `Authorization` (or none), for routes
    /// that pass credentials through. Challenges are not answered here: they go back to
    /// the client.
    pub async fn send_as_client(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        authorization: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.check_quiet()?;
        if let Some(a) = authorization {
            headers.insert(AUTHORIZATION, a.clone());
        }
        let response = self.contact(self.http.request(method, self.url(path)).headers(headers).send().await)?;
        // A 429 for one client's credentials is that client's: it goes back to them and
        // does not quiet the upstream for everyone else.
        Ok(response)
    }

    /// Refuses to ask during a quiet period an upstream 429 asked for.
    fn check_quiet(&self) -> Result<(), UpstreamError> {
        if let Some(until) = *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) {
            let now = Instant::now();
            if until > now {
                return Err(UpstreamError::RateLimited(until - now));
            }
        }
        Ok(())
    }

    fn note_rate_limit(&self, response: &reqwest::Response) {
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(response.headers());
            *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + wait);
        }
    }

    async fn send_as(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        headers: HeaderMap,
        body: Option<bytes::Bytes>,
        actions: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{name}:{actions}");
        let attempt = |auth: Option<HeaderValue>| {
            let mut req = self.http.request(method.clone(), self.url(path)).headers(headers.clone());
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            req.send()
        };
        self.check_quiet()?;
        let response = self.contact(attempt(self.authorization(&scope)).await)?;
        let response = if response.status() == StatusCode::UNAUTHORIZED {
            self.answer_challenge(response, &scope, attempt).await?
        } else {
            response
        };
        self.note_rate_limit(&response);
        Ok(response)
    }

    /// Answers a 401 challenge (basic or the token flow) and repeats the request once.
    async fn answer_challenge<F, Fut>(
        &self,
        response: reqwest::Response,
        scope: &str,
        attempt: F,
    ) -> Result<reqwest::Response, UpstreamError>
    where
        F: Fn(Option<HeaderValue>) -> Fut,
        Fut: Future<Output = Result<reqwest::Response, reqwest::Error>>,
    {
        let Some(challenge) =
            response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(parse_challenge)
        else {
            return Ok(response);
        };
        let auth = match challenge.scheme.as_str() {
            "basic" if self.credentials.is_some() => {
                self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                self.basic_header()
            }
            "bearer" => Some(self.fetch_token(&challenge, scope).await?),
            _ => return Ok(response),
        };
        self.contact(attempt(auth).await)
    }

    /// GETs a manifest as any supported media type: status, Content-Type and body.
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &str,
    ) -> Result<(u16, Option<String>, bytes::Bytes), UpstreamError> {
        let accept = manifest_accept();
        let response = self.send(Method::GET, name, &format!("/v2/{name}/manifests/{reference}"), accept).await?;
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = response.bytes().await.map_err(UpstreamError::Unreachable)?;
        Ok((status, content_type, body))
    }

    async fn fetch_token(&self, challenge: &Challenge, scope: &str) -> Result<HeaderValue, UpstreamError> {
        let realm = challenge.params.get("realm").ok_or(UpstreamError::Auth(AuthError::NoRealm))?;
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(UpstreamError::Auth(AuthError::RealmNotHttp));
        }
        let mut query = vec![("scope", scope.to_string())];
        if let Some(service) = challenge.params.get("service") {
            query.push(("service", service.clone()));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let response = req.send().await.map_err(UpstreamError::Unreachable)?;
        if !response.status().is_success() {
            return Err(UpstreamError::Auth(AuthError::Refused(response.status())));
        }
        let answer: TokenAnswer = response.json().await.map_err(|e| UpstreamError::Auth(AuthError::Answer(e)))?;
        let token = answer.token.or(answer.access_token).ok_or(UpstreamError::Auth(AuthError::NoToken))?;
        // Spec: expires_in defaults to 60 s. Refresh a little early.
        let lifetime = answer.expires_in.and_then(|n| n.as_u64()).unwrap_or(60).saturating_sub(5).max(1);
        let header =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| UpstreamError::Auth(AuthError::Unusable))?;
        self.tokens
            .insert(scope.to_string(), Token { value: token, expires: Instant::now() + Duration::from_secs(lifetime) });
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!((c.scheme.as_str(), c.params["realm"].as_str()), ("basic", "Registry Realm"));
        let c = parse_challenge(r#"Bearer realm="a\"b", error=invalid_token"#).unwrap();
        assert_eq!(c.params["realm"], "a\"b");
        assert_eq!(c.params["error"], "invalid_token");
        for junk in ["", "   ", "Bearer ,,,", "Bearer =x", "Bearer realm", "Bearer realm=\"unterminated", "\u{0}"] {
            let _ = parse_challenge(junk);
        }
        assert!(parse_challenge("").is_none());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_www_authenticate_parses_without_panicking(header in ".{0,300}") {
            let _ = super::parse_challenge(&header);
        }

        #[test]
        fn quoted_values_round_trip(realm in "[a-zA-Z0-9:/._-]{1,40}", service in "[a-zA-Z0-9._-]{1,20}") {
            let c = super::parse_challenge(&format!("Bearer realm=\"{realm}\",service=\"{service}\"")).unwrap();
            prop_assert_eq!(c.params.get("realm"), Some(&realm));
            prop_assert_eq!(c.params.get("service"), Some(&service));
        }
    }
}
