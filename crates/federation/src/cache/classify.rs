//! What an upstream's answer means to the cache: data, not found, a failure to ride out
//! with a stale copy, or a refusal of the client's own credentials to pass back.

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use tessera_spec::{ErrorCode, OciError, RepoName};

use crate::upstream::UpstreamError;

use super::{PullThrough, UpstreamAuth, count, send, unavailable};

/// The status of an upstream answer, sorted by what the cache does with it.
pub(super) enum Answer {
    Ok(reqwest::Response),
    NotFound,
    /// Unreachable, 5xx or 429: serve stale if we can.
    Failing(OciError),
    /// The upstream refused the client's own credentials (passthrough): its challenge or
    /// refusal goes back to the client, and nothing cached is served instead.
    Refused(OciError),
}

impl PullThrough {
    pub(super) async fn ask(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        headers: HeaderMap,
        auth: &UpstreamAuth,
    ) -> Answer {
        match send(&self.upstream, &self.stats, auth, method, name, path, headers).await {
            Err(e @ (UpstreamError::Unreachable(_) | UpstreamError::Auth(_))) => {
                Answer::Failing(unavailable(&self.upstream, tessera_client::error::chain(&e)))
            }
            Err(UpstreamError::RateLimited(wait)) => {
                count(&self.stats.rate_limited, 1);
                Answer::Failing(
                    OciError::new(ErrorCode::TooManyRequests, "upstream rate limit")
                        .with_header("retry-after", wait.as_secs().max(1).to_string()),
                )
            }
            Ok(r) if r.status().is_success() => Answer::Ok(r),
            Ok(r) if r.status() == StatusCode::NOT_FOUND => Answer::NotFound,
            Ok(r) if auth.passthrough() && r.status() == StatusCode::UNAUTHORIZED => {
                let mut e = OciError::new(ErrorCode::Unauthorized, "the upstream asks for credentials");
                if let Some(challenge) = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()) {
                    e = e.with_header("www-authenticate", challenge);
                }
                Answer::Refused(e)
            }
            Ok(r) if auth.passthrough() && r.status() == StatusCode::FORBIDDEN => {
                Answer::Refused(OciError::new(ErrorCode::Denied, "the upstream refused these credentials"))
            }
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).unwrap_or("60").to_string();
                tracing::warn!(upstream = self.upstream.name(), "rate limited; retry after {retry}");
                count(&self.stats.rate_limited, 1);
                Answer::Failing(
                    OciError::new(ErrorCode::TooManyRequests, "upstream rate limit").with_header("retry-after", retry),
                )
            }
            Ok(r) => Answer::Failing(unavailable(&self.upstream, format!("{path} answered {}", r.status()))),
        }
    }
    /// Passes when the upstream answers a `HEAD` with success for this client; otherwise
    /// the refusal, a not-found, or the failure (never a cached copy instead).
    pub(super) fn admit(&self, answer: Answer, not_found: impl Fn() -> OciError) -> Result<(), OciError> {
        match answer {
            Answer::Ok(_) => Ok(()),
            Answer::NotFound => Err(not_found()),
            Answer::Failing(e) | Answer::Refused(e) => Err(e),
        }
    }
}
