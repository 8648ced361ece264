//! Turning the one error table into HTTP responses.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_spec::OciError;

/// An [`OciError`] on its way out as a response.
#[derive(Debug)]
pub struct ApiError(pub OciError);

impl From<OciError> for ApiError {
    fn from(e: OciError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], e.body().to_string()).into_response();
        for (name, value) in &e.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                response.headers_mut().insert(n, v);
            }
        }
        response
    }
}
