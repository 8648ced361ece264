//! Mirrors: their health checks, and the nearest healthy one for a client's address.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use tessera_spec::RepoName;

use super::{Delivery, DeliveryError, How, Rule};

/// A mirror and what its last health check found.
pub struct MirrorState {
    pub config: tessera_config::Mirror,
    pub(super) base: String,
    pub(super) networks: Vec<IpNet>,
    pub(super) healthy: AtomicBool,
}

impl MirrorState {
    /// The URL blobs are fetched under.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

impl Rule {
    /// The healthy mirror nearest to `client`: the one whose network most specifically
    /// contains it (a mirror without networks serves all, least specifically), then by
    /// priority; equals are spread by the client's address.
    pub(super) fn nearest_mirror(mirrors: &[Arc<MirrorState>], client: Option<IpAddr>) -> Option<&MirrorState> {
        let specificity = |m: &MirrorState| -> Option<u8> {
            if m.networks.is_empty() {
                return Some(0);
            }
            let client = client?;
            m.networks.iter().filter(|n| n.contains(&client)).map(|n| n.prefix_len() + 1).max()
        };
        let ranked: Vec<(&MirrorState, u8)> =
            mirrors.iter().filter(|m| m.healthy()).filter_map(|m| specificity(m).map(|s| (m.as_ref(), s))).collect();
        let best = ranked.iter().map(|(m, s)| (std::cmp::Reverse(*s), m.config.priority)).min()?;
        let equals: Vec<&MirrorState> = ranked
            .iter()
            .filter(|(m, s)| (std::cmp::Reverse(*s), m.config.priority) == best)
            .map(|(m, _)| *m)
            .collect();
        let spread = client.map(|c| match c {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => u128::from(a) as usize,
        });
        Some(equals[spread.unwrap_or(0) % equals.len()])
    }
}

impl Delivery {
    /// Every mirror of every rule.
    pub fn mirrors(&self) -> impl Iterator<Item = &Arc<MirrorState>> {
        self.rules.iter().flat_map(|r| match &r.how {
            How::Mirrors(ms) => ms.as_slice(),
            _ => &[],
        })
    }

    /// Starts the background health checks of every mirror; they stop when this is dropped.
    pub fn start_health_checks(&mut self) -> Result<(), DeliveryError> {
        let checks: Vec<(Arc<MirrorState>, Duration, Option<String>)> = self
            .rules
            .iter()
            .flat_map(|r| {
                let probe = |m: &Arc<MirrorState>| {
                    r.health_blob.as_ref().map(|d| {
                        let name = "health".parse::<RepoName>().expect("a valid name");
                        r.url(&m.base, &name, d, None)
                    })
                };
                match &r.how {
                    How::Mirrors(ms) => ms.iter().map(|m| (m.clone(), r.health_interval, probe(m))).collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
        if checks.is_empty() {
            return Ok(());
        }
        let http = crate::upstream::content_client(false)
            .map_err(|e| DeliveryError::HealthChecks(tessera_client::error::chain(&e)))?;
        self.health = Some(tokio::spawn(async move {
            let mut next = vec![tokio::time::Instant::now(); checks.len()];
            loop {
                let now = tokio::time::Instant::now();
                let due: Vec<usize> = (0..checks.len()).filter(|&i| next[i] <= now).collect();
                let results = futures_util::future::join_all(due.iter().map(|&i| {
                    let (mirror, interval, probe) = &checks[i];
                    check_mirror(&http, mirror, *interval, probe.as_deref())
                }))
                .await;
                for (&i, healthy) in due.iter().zip(results) {
                    let (mirror, interval, _) = &checks[i];
                    if mirror.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                        if healthy {
                            tracing::info!(mirror = %mirror.base, "mirror is healthy");
                        } else {
                            tracing::warn!(mirror = %mirror.base, "mirror failed its health check; skipped until it passes");
                        }
                    }
                    next[i] = tokio::time::Instant::now() + *interval;
                }
                let wake = next.iter().min().copied().unwrap_or_else(tokio::time::Instant::now);
                tokio::time::sleep_until(wake).await;
            }
        }));
        Ok(())
    }
}

/// One health check: a `HEAD` of the probe blob (2xx or 3xx passes), or of the base URL
/// (any answer below 500 passes).
async fn check_mirror(http: &reqwest::Client, mirror: &MirrorState, interval: Duration, probe: Option<&str>) -> bool {
    let url = probe.unwrap_or(&mirror.base);
    let timeout = interval.min(Duration::from_secs(5));
    match tokio::time::timeout(timeout, http.head(url).send()).await {
        Ok(Ok(r)) => {
            let status = r.status();
            if probe.is_some() { status.is_success() || status.is_redirection() } else { status.as_u16() < 500 }
        }
        _ => false,
    }
}
