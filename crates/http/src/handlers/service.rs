//! The endpoints outside repositories: the API base, metrics, and the token service.

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
        (Endpoint::Base, &Method::GET | &Method::HEAD) => Ok(json("{}".into())),
        (Endpoint::Metrics, &Method::GET) => {
            let text = state.metrics.render(&state.federation.load());
            Ok(response(StatusCode::OK, &[("content-type", "text/plain; version=0.0.4".into())], Body::from(text)))
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
