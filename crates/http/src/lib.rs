//! HTTP for Tessera: the axum application ([`app`]), request dispatch over the typed
//! [`endpoint::Endpoint`], OCI responses, and the listener ([`server`]) with TLS.

pub mod auth;
pub mod connections;
pub mod endpoint;
mod handlers;
pub mod limits;
mod metrics;
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
}

pub use metrics::Metrics;

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
/// request, so every log line of it carries the id) and logs one access line.
async fn access_log(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    use tracing::Instrument;
    let id = request_id();
    let id_header = HeaderValue::from_str(&id).expect("hex digits make a header value");
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        let mut response = next.run(req).await;
        response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
        response.headers_mut().insert("x-request-id", id_header);
        state.metrics.answered(response.status().as_u16());
        return response;
    }
    let span = tracing::info_span!("request", id = %id);
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0.to_string()).unwrap_or_else(|| "-".into());
    let agent = req
        .headers()
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .chars()
        .take(80)
        .collect::<String>();
    let mut response = next.run(req).instrument(span.clone()).await;
    response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
    response.headers_mut().insert("x-request-id", id_header);
    state.metrics.answered(response.status().as_u16());
    let length = response
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    span.in_scope(|| {
        tracing::info!(
            target: "access",
            "{client} \"{method} {uri}\" {} {length} {:.1}ms \"{agent}\"",
            response.status().as_u16(),
            started.elapsed().as_secs_f64() * 1000.0
        )
    });
    response
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
