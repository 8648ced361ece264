//! The decision step: what a request is, who sent it, and what they may do here, decided
//! once before any handler runs. Identity and rights, credential passthrough, anonymous
//! writes, protected static repositories, cross-repository mount rights and who may bypass
//! the delivery policy all live here; handlers obey the [`Permit`] this produces.

use axum::http::request::Parts;
use axum::http::{Method, header};
use tessera_access::{Action, Identity};
use tessera_federation::{Ask, UpstreamAuth};
use tessera_spec::{Digest, ErrorCode, OciError, RepoName};

use crate::AppState;
use crate::auth::{Caller, action_of};
use crate::endpoint::{self, Endpoint};
use crate::routed::Route;

/// What a request may do, decided before its handler runs.
pub(crate) struct Permit {
    pub(crate) endpoint: Endpoint,
    /// The route of the endpoint's repository (none for endpoints outside repositories). A
    /// name that cannot be routed is reported when the handler needs the route, after the
    /// login check, so it tells an anonymous caller nothing.
    route: Option<Result<Route, OciError>>,
    /// Why this caller may not read this repository here (a protected static one).
    read_refused: Option<OciError>,
    /// How the sources are asked on this caller's behalf.
    pub(crate) ask: Ask,
    /// The cross-repository mount this caller may do: the blob, and the repository it may
    /// be read from (`None`: any, which only an open registry allows).
    pub(crate) mount: Option<(Digest, Option<RepoName>)>,
    /// For a copy, the hosted repository it reads (the caller may pull it).
    pub(crate) copy_from: Option<RepoName>,
    /// The logged-in caller's name, for notifications.
    pub(crate) actor: Option<String>,
}

impl Permit {
    /// The route, for writes and Tessera's own API (which check [`Route::writable`]).
    pub(crate) fn route(&self) -> Result<&Route, OciError> {
        match &self.route {
            Some(Ok(route)) => Ok(route),
            Some(Err(e)) => Err(e.clone()),
            None => {
                tracing::error!(endpoint = ?self.endpoint, "a handler asked for the route of a request the decision step did not route");
                Err(OciError::internal())
            }
        }
    }

    /// The route's sources, when this caller may read the repository here.
    pub(crate) fn readable(&self) -> Result<&Route, OciError> {
        let route = self.route()?;
        match &self.read_refused {
            Some(refusal) => Err(refusal.clone()),
            None => Ok(route),
        }
    }

    /// The hosted name a write goes to.
    pub(crate) fn writable(&self) -> Result<&RepoName, OciError> {
        self.route()?.writable()
    }
}

/// Parses the request and decides what it may do: the login, the rights on the name, and
/// everything that depends on who asks.
/// The endpoint a request asks for.
pub(crate) fn endpoint_of(parts: &Parts) -> Result<Endpoint, OciError> {
    endpoint::parse(parts.uri.path(), parts.uri.query()).map_err(|e| {
        // A tag that cannot exist is simply not found, except where a client tries to create it.
        if e.code == ErrorCode::TagInvalid && parts.method != Method::PUT {
            OciError::new(ErrorCode::ManifestUnknown, "manifest unknown")
        } else {
            e
        }
    })
}

pub(crate) async fn decide(state: &AppState, parts: &Parts, endpoint: Endpoint) -> Result<Permit, OciError> {
    let method = &parts.method;
    // The name is routed once, on one routing table, for the whole request.
    let federation = state.federation.load();
    let route = endpoint.name().map(|name| {
        let resolved = federation.table.resolve(host(parts), authority(parts).as_deref(), name)?;
        Ok(Route::new(resolved, std::sync::Arc::clone(&federation)))
    });
    let passthrough = matches!(&route, Some(Ok(r)) if r.resolved().passthrough);
    let action = action_of(method, &endpoint).map(|(action, _)| action);
    let caller = identify(state, parts, &endpoint, action, passthrough).await?;
    let ask = Ask {
        client: parts.extensions.get::<crate::ClientAddr>().map(|c| c.0),
        upstream_auth: if passthrough {
            UpstreamAuth::Client(parts.headers.get(header::AUTHORIZATION).cloned())
        } else {
            UpstreamAuth::Configured
        },
        bypass_delivery: bypasses_delivery(state, caller.as_ref(), method, &endpoint),
    };
    let read_refused = match (&route, endpoint.name()) {
        (Some(Ok(r)), Some(name)) if r.protected() => protected_refusal(state, parts, caller.as_ref(), name),
        _ => None,
    };
    let mount = mount_right(state, caller.as_ref(), &endpoint);
    let copy_from = match &endpoint {
        Endpoint::Copy { from, .. } => {
            let hosted = federation.table.resolve(host(parts), authority(parts).as_deref(), from)?.write_to;
            Some(copy_source(state, caller.as_ref(), from, hosted)?)
        }
        _ => None,
    };
    let actor = caller.as_ref().and_then(|c| match &c.identity {
        Identity::User(name) => Some(name.clone()),
        Identity::Anonymous => None,
    });
    Ok(Permit { endpoint, route, read_refused, ask, mount, copy_from, actor })
}

/// The caller, checked against the rights the endpoint needs. `None` when Tessera's own
/// login does not apply: none is configured, or the route passes credentials through to
/// the upstream, which then decides who may pull.
async fn identify(
    state: &AppState,
    parts: &Parts,
    endpoint: &Endpoint,
    action: Option<Action>,
    passthrough: bool,
) -> Result<Option<Caller>, OciError> {
    match &state.auth {
        Some(_) if passthrough && action == Some(Action::Pull) => Ok(None),
        Some(auth) => {
            let caller = auth.identify(parts).await?;
            auth.authorize(parts, &caller, &parts.method, endpoint)?;
            Ok(Some(caller))
        }
        // With no login configured, writes are anonymous: allowed only where that was chosen
        // (by default on loopback listeners only).
        None if !state.anonymous_writes && action.is_some_and(|a| a != Action::Pull) => Err(OciError::new(
            ErrorCode::Denied,
            "anonymous pushes and deletes are refused on this listener; configure [auth] (or anonymous_writes = true)",
        )),
        None => Ok(None),
    }
}

/// `?delivery=stream` is honoured only for someone who may write the repository.
fn bypasses_delivery(state: &AppState, caller: Option<&Caller>, method: &Method, endpoint: &Endpoint) -> bool {
    let Endpoint::Blob { name, stream: true, .. } = endpoint else { return false };
    *method == Method::GET
        && match (&state.auth, caller) {
            (Some(auth), Some(caller)) => auth.may_push(caller, name),
            _ => state.anonymous_writes,
        }
}

/// A protected static repository (Crane's `protected`) is served only to a logged-in
/// caller; what that caller may pull is then up to the access rules, as everywhere.
fn protected_refusal(state: &AppState, parts: &Parts, caller: Option<&Caller>, name: &RepoName) -> Option<OciError> {
    match (&state.auth, caller) {
        (Some(_), Some(c)) if c.identity != Identity::Anonymous => None,
        (Some(auth), _) => Some(auth.login_required(parts, name)),
        (None, _) => Some(OciError::new(
            ErrorCode::Denied,
            "this repository is protected and this server has no logins configured ([auth])",
        )),
    }
}

/// Mounting reads the source repository: only from one the caller may pull, and without
/// `from` (any repository) only when no login policy applies.
fn mount_right(state: &AppState, caller: Option<&Caller>, endpoint: &Endpoint) -> Option<(Digest, Option<RepoName>)> {
    let Endpoint::UploadStart { mount: Some(digest), from, .. } = endpoint else { return None };
    let from = match (&state.auth, caller, from) {
        (Some(auth), Some(caller), Some(from)) => Some(from.clone()).filter(|f| auth.may_pull(caller, f)),
        (_, _, from) => from.clone(),
    };
    (state.auth.is_none() || from.is_some()).then(|| (digest.clone(), from))
}

/// A copy reads its source: only one the caller may pull, and only one hosted here (its
/// blobs are mounted, never fetched).
fn copy_source(
    state: &AppState,
    caller: Option<&Caller>,
    from: &RepoName,
    hosted: Option<RepoName>,
) -> Result<RepoName, OciError> {
    if let Some(auth) = &state.auth
        && !caller.is_some_and(|c| auth.may_pull(c, from))
    {
        return Err(OciError::new(ErrorCode::Denied, format!("copying needs the pull right on {from}")));
    }
    hosted.ok_or_else(|| {
        OciError::new(
            ErrorCode::Unsupported,
            format!("{from} is not hosted here: only hosted repositories copy within this registry"),
        )
    })
}

pub(crate) fn host(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| parts.uri.host())
}

/// The `ns` query parameter containerd adds when it uses us as a mirror.
fn authority(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "ns").map(|(_, v)| v.into_owned())
}
