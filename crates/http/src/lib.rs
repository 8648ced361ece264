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

async fn access_log(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        let mut response = next.run(req).await;
        response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
        state.metrics.answered(response.status().as_u16());
        return response;
    }
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
    let mut response = next.run(req).await;
    response.headers_mut().insert("docker-distribution-api-version", API_VERSION);
    state.metrics.answered(response.status().as_u16());
    let length = response
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    tracing::info!(
        target: "access",
        "{client} \"{method} {uri}\" {} {length} {:.1}ms \"{agent}\"",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    response
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
