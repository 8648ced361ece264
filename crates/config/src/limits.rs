//! `[limits]`: sizes, rates and timeouts that keep one client from starving the rest.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest accepted on PUT; larger ones get 413.
    pub manifest_max_bytes: u64,
    /// Largest request head (request line plus headers); larger ones get 431.
    pub header_max_bytes: usize,
    /// Largest blob accepted by an upload; 0 means no limit.
    pub blob_max_bytes: u64,
    /// Requests per second one client address may make (a burst of as many); past it, 429
    /// with `Retry-After`. 0: no limit.
    pub requests_per_second_per_client: u32,
    /// Connections that may be open at once (never more than the open-file limit allows).
    /// At the limit, the connection idle the longest is closed to make room; only when all
    /// are busy is a new connection refused. 0: as many as the open-file limit allows.
    pub connections: usize,
    /// Connections one client address (an IPv6 client: its /64) may have open, with the
    /// same rule: its longest-idle connection makes room. Trusted proxies are exempt. 0: no
    /// limit.
    pub connections_per_client: usize,
    /// Failed logins one client address (an IPv6 client: its /64) may make in a burst, then
    /// one more every `60 / n` seconds; past it, its logins get 429 with `Retry-After`
    /// before their password is checked. 0: no limit.
    pub failed_logins_per_minute_per_client: u32,
    /// Uploading requests (POST, PATCH, PUT with a body) one client address may have in
    /// flight at once; past it, 429. 0: no limit.
    pub uploads_per_client: usize,
    /// Seconds a request body may go without sending a byte before the request is
    /// abandoned (slow-client guard; what arrived of an upload is kept for resuming).
    pub body_idle_timeout_secs: u64,
    /// Seconds a response may wait for the client to take more bytes before the connection
    /// is closed (a client that stops reading).
    pub send_idle_timeout_secs: u64,
    /// Seconds a request without a body (GET, HEAD, DELETE) may take until its answer
    /// starts; past it, 503 with `Retry-After`. 0: no limit. (Uploads are bounded by the
    /// body timeouts and sizes instead, downloads by `send_idle_timeout_secs`.)
    pub request_timeout_secs: u64,
    /// On SIGTERM or Ctrl-C, seconds the requests in flight get to finish (no new
    /// connection is taken meanwhile) before the process exits anyway.
    pub drain_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_max_bytes: 4 * 1024 * 1024,
            header_max_bytes: 64 * 1024,
            blob_max_bytes: 0,
            requests_per_second_per_client: 0,
            connections: 10_000,
            connections_per_client: 512,
            failed_logins_per_minute_per_client: 10,
            uploads_per_client: 64,
            body_idle_timeout_secs: 60,
            send_idle_timeout_secs: 60,
            request_timeout_secs: 300,
            drain_timeout_secs: 30,
        }
    }
}
