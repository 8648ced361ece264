//! Per-client limits, applied before any work: a request rate (429 with `Retry-After`),
//! how many uploads one client may have in flight, and how long a request body may stall.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tessera_spec::{ErrorCode, OciError};

type Limiter = RateLimiter<IpAddr, governor::state::keyed::HashMapStateStore<IpAddr>, DefaultClock>;

/// How many clients the rate limiter tracks before it forgets idle ones. Clients are
/// counted by [`tessera_access::subscriber`], so the state grows with the addresses (IPv6:
/// the /64 blocks) that completed a TCP handshake within the last second, not with what
/// a client writes in a request.
const TRACKED: usize = 10_000;

pub struct ClientLimits {
    rate: Option<Limiter>,
    uploads_per_client: usize,
    uploads: Arc<Mutex<HashMap<IpAddr, usize>>>,
    pub(crate) body_idle: Duration,
    /// Longest time until a request without a body is answered; `None`: no limit.
    pub request_timeout: Option<Duration>,
}

/// Holds one upload slot of a client until dropped.
pub struct UploadSlot {
    client: IpAddr,
    uploads: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = uploads.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                uploads.remove(&self.client);
            }
        }
    }
}

fn too_many(message: &str, retry_after: Duration) -> OciError {
    OciError::new(ErrorCode::TooManyRequests, message)
        .with_header("retry-after", retry_after.as_secs().max(1).to_string())
}

impl ClientLimits {
    pub fn new(requests_per_second: u32, uploads_per_client: usize, body_idle: Duration) -> ClientLimits {
        let rate = NonZeroU32::new(requests_per_second).map(|r| RateLimiter::hashmap(Quota::per_second(r)));
        ClientLimits { rate, uploads_per_client, uploads: Arc::default(), body_idle, request_timeout: None }
    }

    /// These limits, answering requests without a body within `timeout` (zero: no limit).
    pub fn with_request_timeout(mut self, timeout: Duration) -> ClientLimits {
        self.request_timeout = Some(timeout).filter(|t| !t.is_zero());
        self
    }

    /// No limits at all (tests and embedding).
    pub fn unlimited() -> ClientLimits {
        ClientLimits::new(0, 0, Duration::from_secs(3600))
    }

    /// Counts a request from `client` against its rate.
    pub(crate) fn admit(&self, client: IpAddr) -> Result<(), OciError> {
        let Some(rate) = &self.rate else { return Ok(()) };
        if rate.len() > TRACKED {
            rate.retain_recent();
        }
        rate.check_key(&tessera_access::subscriber(client)).map_err(|not_until| {
            too_many("too many requests from this client", not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Takes an upload slot for `client`, or refuses when it has too many in flight.
    pub(crate) fn upload(&self, client: IpAddr) -> Result<Option<UploadSlot>, OciError> {
        if self.uploads_per_client == 0 {
            return Ok(None);
        }
        let client = tessera_access::subscriber(client);
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let n = uploads.entry(client).or_default();
        if *n >= self.uploads_per_client {
            return Err(too_many("too many uploads in flight from this client", Duration::from_secs(1)));
        }
        *n += 1;
        Ok(Some(UploadSlot { client, uploads: self.uploads.clone() }))
    }
}
