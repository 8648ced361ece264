//! The auth step: who is asking (Basic credentials checked against the htpasswd file, or a
//! Bearer token Tessera issued), and may they do what this endpoint does to this name.
//! Anonymous requests that need a login get 401 with a challenge every client understands
//! (Basic, or Bearer pointing at `/token`); known users without the right, 403.

use axum::http::request::Parts;
use axum::http::{Method, header};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_access::token::{
    Grant, TokenIssuer, Verified, VerifyKey, claimed_issuer, parse_scope, token_kid, verify_with,
};
use tessera_access::{Access, Action, Decision, FailedLogins, Identity, Logins};
use tessera_spec::{ErrorCode, OciError, RepoName};

use crate::endpoint::Endpoint;

/// What a request does to which repository; `None` for endpoints outside repositories.
pub(crate) fn action_of<'e>(method: &Method, endpoint: &'e Endpoint) -> Option<(Action, &'e RepoName)> {
    match endpoint {
        Endpoint::Metrics
        | Endpoint::Quotas
        | Endpoint::Token { .. }
        | Endpoint::Jwks
        | Endpoint::Base
        | Endpoint::Catalog(_)
        | Endpoint::Page(_) => None,
        Endpoint::Tags { name, .. } | Endpoint::Referrers { name, .. } => Some((Action::Pull, name)),
        Endpoint::Lookaside { name, .. } => Some((Action::Pull, name)),
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::BlobLocation { name, .. }
        | Endpoint::Signatures { name, .. } => Some(match *method {
            Method::GET | Method::HEAD => (Action::Pull, name),
            Method::DELETE => (Action::Delete, name),
            _ => (Action::Push, name),
        }),
        Endpoint::UploadStart { name, .. } | Endpoint::Upload { name, .. } | Endpoint::Copy { name, .. } => {
            Some((Action::Push, name))
        }
    }
}

/// Another token issuer whose tokens this registry accepts (verified against its keys).
pub struct TrustedIssuer {
    pub issuer: String,
    pub audience: String,
    pub keys: Arc<IssuerKeys>,
}

/// A trusted issuer's verification keys. Keys from a JWKS URL are replaced while serving;
/// a token naming a key the set lacks wakes [`IssuerKeys::unknown_key`] (the issuer may
/// have rotated its keys), and whoever keeps the set fresh fetches it again.
#[derive(Default)]
pub struct IssuerKeys {
    keys: ArcSwap<Vec<VerifyKey>>,
    pub unknown_key: tokio::sync::Notify,
}

impl IssuerKeys {
    pub fn new(keys: Vec<VerifyKey>) -> IssuerKeys {
        IssuerKeys { keys: ArcSwap::from_pointee(keys), unknown_key: Default::default() }
    }

    pub fn current(&self) -> Arc<Vec<VerifyKey>> {
        self.keys.load_full()
    }

    pub fn replace(&self, keys: Vec<VerifyKey>) {
        self.keys.store(Arc::new(keys));
    }
}

/// Where bcrypt runs: on the blocking pool, never on an executor thread, and at most
/// `parallel` checks at once so that a flood of logins leaves CPU to everyone else. Callers
/// queue for a slot; past [`QUEUE_PER_SLOT`] waiting per slot, or after [`QUEUE_WAIT`], they
/// get 503 with `Retry-After`.
pub struct PasswordChecks {
    slots: Arc<tokio::sync::Semaphore>,
    queue: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

const QUEUE_PER_SLOT: usize = 32;
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl PasswordChecks {
    /// Half the cores, at least one: the other half keeps answering requests.
    pub fn for_this_machine() -> PasswordChecks {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        PasswordChecks::new((cores / 2).max(1))
    }

    pub fn new(parallel: usize) -> PasswordChecks {
        let parallel = parallel.max(1);
        PasswordChecks {
            slots: Arc::new(tokio::sync::Semaphore::new(parallel)),
            queue: parallel * QUEUE_PER_SLOT,
            waiting: Default::default(),
        }
    }

    fn busy() -> OciError {
        OciError::new(ErrorCode::Unavailable, "too many logins being checked; try again shortly")
            .with_header("retry-after", "1")
    }

    /// Runs `check` on the blocking pool once a slot is free.
    async fn run(&self, check: impl FnOnce() -> bool + Send + 'static) -> Result<bool, OciError> {
        use std::sync::atomic::Ordering;
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Self::busy());
        }
        let waiting = Waiting(&self.waiting);
        let slot = match tokio::time::timeout(QUEUE_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => return Err(Self::busy()),
        };
        drop(waiting);
        // The slot goes with the check: a caller that gives up does not free it early.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            check()
        })
        .await
        .map_err(|e| {
            tracing::error!("a password check failed to run: {e}");
            OciError::internal()
        })
    }
}

pub struct Auth {
    /// The htpasswd file's users; a reload (SIGHUP) swaps in the file as it is then.
    logins: ArcSwap<Logins>,
    checks: PasswordChecks,
    failed: FailedLogins,
    access: Access,
    realm: String,
    tokens: Option<TokenIssuer>,
    trusted: Vec<TrustedIssuer>,
    /// Scheme of the token realm URL (`https` when serving TLS).
    scheme: &'static str,
}

/// A user whose password checked out, and the stamp of the hash it checked against.
pub struct PasswordLogin {
    pub user: String,
    pub stamp: String,
}

/// Who sent a request, and the token they presented, if any.
pub struct Caller {
    pub identity: Identity,
    token: Option<Verified>,
}

impl Caller {
    /// A caller known by a page login (or anonymous), without a token.
    pub fn by_login(identity: Identity) -> Caller {
        Caller { identity, token: None }
    }
}

impl Auth {
    pub fn new(
        logins: Logins,
        access: Access,
        realm: String,
        tokens: Option<TokenIssuer>,
        trusted: Vec<TrustedIssuer>,
        tls: bool,
    ) -> Auth {
        Auth {
            logins: ArcSwap::from_pointee(logins),
            checks: PasswordChecks::for_this_machine(),
            failed: FailedLogins::new(0),
            access,
            realm,
            tokens,
            trusted,
            scheme: if tls { "https" } else { "http" },
        }
    }

    /// Serves the users of `logins` from now on: a removed user's next request, and any page
    /// login of a user whose password changed, is refused; remembered logins are forgotten.
    pub fn replace_users(&self, logins: Logins) {
        self.logins.store(Arc::new(logins));
    }

    /// The stamp of `user`'s current password hash (page logins carry it); `None` for a
    /// user the htpasswd file no longer lists.
    pub fn login_stamp(&self, user: &str) -> Option<String> {
        self.logins.load().stamp(user)
    }

    /// Refuses a client's logins for a while once it has failed `per_minute` times (0: never).
    pub fn with_failed_logins_per_minute(mut self, per_minute: u32) -> Auth {
        self.failed = FailedLogins::new(per_minute);
        self
    }

    /// Checks passwords with `checks` instead of the machine's default.
    pub fn with_password_checks(mut self, checks: PasswordChecks) -> Auth {
        self.checks = checks;
        self
    }

    /// Verifies a Bearer token: one of ours, or one from a trusted issuer (picked by the
    /// `iss` it claims, then checked against that issuer's keys and audience).
    fn verify_token(&self, token: &str) -> Result<Verified, &'static str> {
        let claimed = claimed_issuer(token);
        if let Some(ours) = &self.tokens
            && claimed.as_deref() == Some(ours.issuer())
        {
            return ours.verify(token);
        }
        match self.trusted.iter().find(|t| claimed.as_deref() == Some(t.issuer.as_str())) {
            Some(t) => {
                let keys = t.keys.current();
                let verified = verify_with(token, &t.issuer, &t.audience, &keys);
                let kid = token_kid(token);
                let known = match kid.as_deref() {
                    Some(kid) => keys.iter().any(|k| k.kid.as_deref() == Some(kid)),
                    None => !keys.is_empty(),
                };
                if verified.is_err() && !known {
                    t.keys.unknown_key.notify_one();
                }
                verified
            }
            None => Err("token from an issuer this registry does not trust"),
        }
    }

    /// A 401 with the challenge of this registry's login mode; `scope` names what is asked.
    /// The 401 asking for a login to pull `name`.
    pub fn login_required(&self, parts: &Parts, name: &RepoName) -> OciError {
        self.challenge(parts, "this repository is served to logged-in clients only", Some((name, Action::Pull)))
    }

    fn challenge(&self, parts: &Parts, message: &str, scope: Option<(&RepoName, Action)>) -> OciError {
        let value = match &self.tokens {
            None => format!("Basic realm=\"{}\"", self.realm.replace('"', "")),
            Some(tokens) => {
                let host = parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
                let host: String = host.chars().filter(|c| !matches!(c, '"' | '\\' | ' ')).collect();
                let mut v = format!("Bearer realm=\"{}://{host}/token\",service=\"{}\"", self.scheme, tokens.service());
                if let Some((name, action)) = scope {
                    let actions = if action == Action::Push { "pull,push" } else { action.as_str() };
                    v.push_str(&format!(",scope=\"repository:{name}:{actions}\""));
                }
                v
            }
        };
        OciError::new(ErrorCode::Unauthorized, message).with_header("www-authenticate", value)
    }

    async fn basic_user(&self, parts: &Parts, encoded: &str) -> Result<Identity, OciError> {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| self.challenge(parts, "malformed credentials", None))?;
        let (user, password) =
            decoded.split_once(':').ok_or_else(|| self.challenge(parts, "malformed credentials", None))?;
        self.password_user(parts, user, password).await
    }

    /// The user whose password this is, counted against the client's failed logins like
    /// any login; a wrong one is the 401 a registry client expects.
    pub async fn password_user(&self, parts: &Parts, user: &str, password: &str) -> Result<Identity, OciError> {
        self.password_login(parts, user, password).await.map(|login| Identity::User(login.user))
    }

    /// [`Auth::password_user`], with the stamp of the password hash that checked out, read
    /// from the same users (a reload meanwhile cannot stamp an old password's login with
    /// the new hash).
    pub async fn password_login(&self, parts: &Parts, user: &str, password: &str) -> Result<PasswordLogin, OciError> {
        let logins = self.logins.load_full();
        let login = |logins: &Logins| logins.stamp(user).map(|stamp| PasswordLogin { user: user.to_string(), stamp });
        if logins.remembered(user, password)
            && let Some(login) = login(&logins)
        {
            return Ok(login);
        }
        let client = parts.extensions.get::<crate::ClientAddr>().map(|c| c.0);
        if let Some(wait) = client.and_then(|c| self.failed.refusal(c)) {
            let seconds = wait.as_secs() + 1;
            return Err(OciError::new(
                ErrorCode::TooManyRequests,
                format!("too many failed logins from this client; try again in {seconds} s"),
            )
            .with_header("retry-after", seconds.to_string()));
        }
        let (u, p, checking) = (user.to_string(), password.to_string(), logins.clone());
        if self.checks.run(move || checking.verify(&u, &p)).await?
            && let Some(login) = login(&logins)
        {
            Ok(login)
        } else {
            if let Some(client) = client {
                self.failed.failed(client);
            }
            tracing::info!(user, "login failed");
            Err(self.challenge(parts, "invalid username or password", None))
        }
    }

    /// Who sent `parts`. Wrong credentials are refused outright (never downgraded to anonymous).
    pub async fn identify(&self, parts: &Parts) -> Result<Caller, OciError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            // A client certificate the TLS layer verified against the client CA identifies
            // its holder by the subject's common name.
            let identity = match parts.extensions.get::<crate::server::ClientCertificate>() {
                Some(cert) => Identity::User(cert.0.clone()),
                None => Identity::Anonymous,
            };
            return Ok(Caller { identity, token: None });
        };
        let value = value.to_str().map_err(|_| self.challenge(parts, "malformed credentials", None))?;
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(Caller { identity: self.basic_user(parts, rest).await?, token: None });
        }
        if scheme.eq_ignore_ascii_case("bearer") && (self.tokens.is_some() || !self.trusted.is_empty()) {
            return match self.verify_token(rest.trim()) {
                Ok(v) => Ok(Caller { identity: v.identity.clone(), token: Some(v) }),
                Err(why) => {
                    tracing::info!("token refused: {why}");
                    Err(self.challenge(parts, why, None))
                }
            };
        }
        Err(self.challenge(parts, "unsupported authorization scheme", None))
    }

    /// Checks that the caller may do what `method` on `endpoint` means. The base endpoint
    /// and the catalog need a login; repository endpoints need the action's right on the name.
    pub fn authorize(
        &self,
        parts: &Parts,
        caller: &Caller,
        method: &Method,
        endpoint: &Endpoint,
    ) -> Result<(), OciError> {
        let (action, name) = match endpoint {
            // The base endpoint always challenges a caller with neither a login nor a token,
            // even where anonymous pulls are allowed: clients only send credentials (or fetch
            // an anonymous token) after the challenge of their first probe.
            Endpoint::Base => {
                return if matches!(caller.identity, Identity::User(_)) || caller.token.is_some() {
                    Ok(())
                } else {
                    Err(self.challenge(parts, "authentication required", None))
                };
            }
            Endpoint::Catalog(_) => {
                return if matches!(caller.identity, Identity::User(_)) {
                    Ok(())
                } else {
                    Err(self.challenge(parts, "authentication required", None))
                };
            }
            _ => match action_of(method, endpoint) {
                Some(target) => target,
                None => return Ok(()),
            },
        };
        // A token with grants decides by them; one that lacks this scope sends the client
        // back for a token that has it. A token naming only an identity is decided by the
        // policy, like a login.
        match caller.token.as_ref().and_then(|t| t.allows(action, name.as_str())) {
            Some(true) => return Ok(()),
            Some(false) => return Err(self.challenge(parts, "the token does not grant this", Some((name, action)))),
            None => {}
        }
        match self.access.decide(&caller.identity, action, name.as_str()) {
            Decision::Allow => Ok(()),
            Decision::LogIn => Err(self.challenge(parts, "authentication required", Some((name, action)))),
            Decision::Deny => {
                Err(OciError::new(ErrorCode::Denied, format!("not allowed to {} {name}", action.as_str())))
            }
        }
    }

    /// Whether the caller may pull `name` (a cross-repository mount reads its source).
    pub fn may_pull(&self, caller: &Caller, name: &RepoName) -> bool {
        self.may(caller, Action::Pull, name)
    }

    pub fn may_push(&self, caller: &Caller, name: &RepoName) -> bool {
        self.may(caller, Action::Push, name)
    }

    fn may(&self, caller: &Caller, action: Action, name: &RepoName) -> bool {
        match caller.token.as_ref().and_then(|t| t.allows(action, name.as_str())) {
            Some(allowed) => allowed,
            None => self.access.decide(&caller.identity, action, name.as_str()) == Decision::Allow,
        }
    }

    /// `GET /token`: a token granting, of each requested scope, what the policy allows the
    /// caller (identified by Basic credentials, or anonymous).
    pub async fn token(&self, parts: &Parts, scopes: &[String]) -> Result<serde_json::Value, OciError> {
        let Some(tokens) = &self.tokens else {
            return Err(OciError::new(ErrorCode::NotFound, "this registry does not issue tokens"));
        };
        let identity = match parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            Some(v) => match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => self.basic_user(parts, rest).await?,
                _ => return Err(self.challenge(parts, "the token endpoint takes Basic credentials", None)),
            },
            None => Identity::Anonymous,
        };
        let grants: Vec<Grant> = scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(parse_scope)
            .filter(|(name, _)| name.parse::<RepoName>().is_ok())
            .map(|(name, wanted)| {
                let actions = self
                    .access
                    .granted(&identity, &name, &wanted)
                    .into_iter()
                    .map(|a| a.as_str().to_string())
                    .collect();
                Grant { kind: "repository".into(), name, actions }
            })
            .collect();
        let (token, expires_in) = tokens.issue(&identity, grants).map_err(|e| {
            tracing::error!("cannot issue a token: {e}");
            OciError::internal()
        })?;
        Ok(serde_json::json!({ "token": token, "access_token": token, "expires_in": expires_in }))
    }

    pub fn jwks(&self) -> Option<serde_json::Value> {
        self.tokens.as_ref().map(|t| t.jwks())
    }
}
