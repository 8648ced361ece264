//! HTTP for Tessera: the axum application ([`app`]), request dispatch over the typed
//! [`endpoint::Endpoint`], OCI responses, and the listener ([`server`]) with TLS.

pub mod auth;
pub mod connections;
pub mod endpoint;
pub mod handlers;
pub mod limits;
mod metrics;
pub mod notify;
mod policy;
mod response;
mod routed;
pub mod server;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use tessera_registry::Registry;

pub use response::ApiError;

/// Everything a request handler can reach. Built once by the binary (or a test).
pub struct AppState {
    pub registry: Arc<Registry>,
    /// The routing table and the caches of its upstreams; swapped whole on a reload.
    pub federation: arc_swap::ArcSwap<tessera_federation::Federation>,
    pub metrics: metrics::Metrics,
    /// Login and access policy; `None` when no login is asked.
    pub auth: Option<auth::Auth>,
    pub limits: limits::ClientLimits,
    /// Without a login configured, whether anonymous clients may push and delete.
    pub anonymous_writes: bool,
    /// Where events go (`[[notify]]`); `None` without endpoints.
    pub notifier: Option<Arc<notify::Notifier>>,
    /// The `[[sync]]` jobs, with their figures.
    pub syncs: Vec<Arc<tessera_federation::sync::SyncJob>>,
    /// The web pages' settings; `None` when they are off.
    pub ui: Option<UiSettings>,
}

pub use handlers::pages::UiSettings;

pub use metrics::{EndpointFamily, Metrics};

/// The client's address (the socket's peer, or the one a trusted proxy forwarded), put
/// into request extensions by [`server`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// The application: every request goes through one dispatcher; every response carries the
/// API version header and is logged as one line.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .fallback(handlers::dispatch)
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(state, access_log))
}

/// A new request id: this process's random prefix and a count, so ids are unique within a
/// process and, but for a one-in-four-billion chance, across the nodes of a cluster.
fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    // The standard library's hasher keys are random per process: no random crate needed.
    let prefix = *PREFIX.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish() as u32);
    format!("{prefix:08x}{:012x}", COUNT.fetch_add(1, Ordering::Relaxed))
}

/// Gives every request an id (the `X-Request-Id` answer header, and a span around the
/// request, so every log line of it carries the id), measures it, and logs one access line.
async fn access_log(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    use tracing::Instrument;
    let id = request_id();
    let id_header = HeaderValue::from_str(&id).expect("hex digits make a header value");
    let started = Instant::now();
    let method = req.method().clone();
    let logged = tracing::enabled!(target: "access", tracing::Level::INFO);
    let uri = logged.then(|| req.uri().clone());
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let agent = logged.then(|| {
        let agent = req.headers().get(axum::http::header::USER_AGENT).and_then(|v| v.to_str().ok());
        agent.unwrap_or("-").chars().take(80).collect::<String>()
    });
    let host_and_agent = state.notifier.as_ref().map(|_| {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        (header(axum::http::header::HOST), header(axum::http::header::USER_AGENT))
    });
    let (req, received) = count_request_body(req);
    let span = logged.then(|| tracing::info_span!("request", id = %id));
    let mut response = match &span {
        Some(span) => next.run(req).instrument(span.clone()).await,
        None => next.run(req).await,
    };
    let took = started.elapsed();
    let status = response.status().as_u16();
    response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
    response.headers_mut().insert("x-request-id", id_header);
    let family = response.extensions().get::<EndpointFamily>().copied().unwrap_or(EndpointFamily::Unknown);
    let received = received.map_or(0, |r| r.load(std::sync::atomic::Ordering::Relaxed));
    state.metrics.answered(family, &method, status, took, received);
    if let Some(notifier) = &state.notifier
        && let Some(happenings) = response.extensions_mut().remove::<notify::Happenings>()
    {
        let (host, agent) = host_and_agent.unwrap_or_default();
        let asked = notify::Asked {
            id: &id,
            addr: client,
            host: host.as_deref(),
            method: method.as_str(),
            user_agent: agent.as_deref(),
            actor: happenings.actor.as_deref(),
        };
        notifier.publish(&happenings.events, &asked).await;
    }
    if let (Some(span), Some(uri), Some(agent)) = (span, uri, agent) {
        let length =
            response.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-");
        let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
        span.in_scope(|| {
            tracing::info!(
                target: "access",
                "{client} \"{method} {uri}\" {status} {length} {:.1}ms \"{agent}\"",
                took.as_secs_f64() * 1000.0
            )
        });
    }
    count_response_body(response, || state.metrics.sent(family))
}

/// The request with its body's bytes counted as they are read; `None` for a request that
/// says it has no body (most of them: they are spared the counting).
fn count_request_body(req: Request) -> (Request, Option<Arc<std::sync::atomic::AtomicU64>>) {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt as _;
    if req.body().is_end_stream() {
        return (req, None);
    }
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let req = req.map(|body| {
        axum::body::Body::new(body.inspect_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }))
    });
    (req, Some(received))
}

/// The answer with its body's bytes counted in `sent` as they go out; an empty answer (a
/// HEAD, a redirect) looks up no counter.
fn count_response_body(
    response: Response,
    sent: impl FnOnce() -> prometheus_client::metrics::counter::Counter,
) -> Response {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt as _;
    if response.body().is_end_stream() {
        return response;
    }
    let sent = sent();
    response.map(|body| {
        axum::body::Body::new(body.inspect_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                sent.inc_by(data.len() as u64);
            }
        }))
    })
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
