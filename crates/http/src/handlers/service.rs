//! The endpoints outside repositories: the API base, metrics, the token service, and the
//! load balancer's probes.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use tessera_spec::{ErrorCode, OciError};

use super::{response, unsupported_method};
use crate::AppState;
use crate::endpoint::Endpoint;

pub(super) async fn handle(state: &AppState, parts: &Parts, endpoint: &Endpoint) -> Result<Response, OciError> {
    let json =
        |text: String| response(StatusCode::OK, &[("content-type", "application/json".into())], Body::from(text));
    let no_tokens = || OciError::new(ErrorCode::NotFound, "this registry does not issue tokens");
    match (endpoint, &parts.method) {
        (Endpoint::Base, &Method::GET | &Method::HEAD) => {
            let mut answer = json("{}".into());
            // Simple signatures are kept here (the signature extension API): clients store
            // and find them through it.
            answer.headers_mut().insert("x-registry-supports-signatures", axum::http::HeaderValue::from_static("1"));
            Ok(answer)
        }
        (Endpoint::Metrics, &Method::GET) => {
            // A store that cannot answer leaves the quota figures out, not the rest.
            let quotas = state.registry.quota_use().await.unwrap_or_default();
            let notifier = state.notifier.as_deref();
            let text = state.metrics.render(&state.federation.load(), &state.registry, notifier, &quotas, &state.syncs);
            Ok(response(StatusCode::OK, &[("content-type", crate::metrics::CONTENT_TYPE.into())], Body::from(text)))
        }
        (Endpoint::Quotas, &Method::GET) => {
            let quotas: Vec<_> = state
                .registry
                .quota_use()
                .await?
                .into_iter()
                .map(
                    |q| serde_json::json!({ "prefix": q.prefix, "max_bytes": q.max_bytes, "used_bytes": q.used_bytes }),
                )
                .collect();
            Ok(json(serde_json::json!({ "quotas": quotas }).to_string()))
        }
        (Endpoint::Token { scopes }, method) => {
            let auth = state.auth.as_ref().ok_or_else(no_tokens)?;
            // containerd tries the OAuth2 POST form first and falls back to GET on 405.
            if method != Method::GET {
                return Err(unsupported_method());
            }
            Ok(json(auth.token(parts, scopes).await?.to_string()))
        }
        (Endpoint::Jwks, _) => {
            let jwks = state.auth.as_ref().and_then(|a| a.jwks()).ok_or_else(no_tokens)?;
            Ok(json(jwks.to_string()))
        }
        _ => Err(unsupported_method()),
    }
}

/// `/healthz`: the process lives and answers.
pub(super) fn healthz() -> Response {
    response(StatusCode::OK, &[("content-type", "text/plain".into())], Body::from("ok\n"))
}

/// How long `/readyz` waits for the stores: a load balancer's probe gives up soon too.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `/readyz`: 200 while the stores answer, 503 naming the one that does not.
pub(super) async fn readyz(state: &AppState) -> Response {
    let checked = tokio::time::timeout(READY_WAIT, state.registry.check_stores())
        .await
        .unwrap_or(Err("the stores did not answer in time"));
    let (status, text) = match checked {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    };
    response(status, &[("content-type", "text/plain".into()), ("retry-after", "5".into())], Body::from(text))
}
