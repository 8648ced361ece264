//! Open connections, counted in total and per client, so that thousands of idle or
//! half-open connections cannot keep a new client out: at a limit, the connection idle the
//! longest is asked to close (an idle one closes at once; one finishing a response closes
//! after it) and the newcomer is served. Only when every counted connection is busy is the
//! newcomer turned away. The same registry asks every connection to close on shutdown and
//! says when the last one has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// How many connections may be open; 0: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub total: usize,
    /// Per client address (an IPv6 client: its /64). Trusted proxies are exempt.
    pub per_client: usize,
}

impl ConnectionLimits {
    pub fn unlimited() -> ConnectionLimits {
        ConnectionLimits { total: 0, per_client: 0 }
    }
}

pub(crate) struct Connections {
    limits: ConnectionLimits,
    state: Mutex<State>,
    all_closed: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    open: HashMap<u64, Open>,
    /// Connections per client key, not counting those asked to close.
    per_client: HashMap<IpAddr, usize>,
    /// All open connections not asked to close.
    counted: usize,
}

struct Open {
    /// `None` for a client exempt from the per-client limit.
    client: Option<IpAddr>,
    requests: usize,
    idle_since: Instant,
    close: Arc<Notify>,
    closing: bool,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Total,
    PerClient,
}

impl Connections {
    pub(crate) fn new(limits: ConnectionLimits) -> Arc<Connections> {
        Arc::new(Connections { limits, state: Mutex::default(), all_closed: Notify::new() })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `client` (`None`: exempt from the per-client limit),
    /// asking the longest-idle connection to close where a limit is reached.
    pub(crate) fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Slot, Refused> {
        let client = client.map(tessera_access::subscriber);
        let mut state = self.state();
        if let Some(key) = client
            && self.limits.per_client > 0
            && state.per_client.get(&key).copied().unwrap_or(0) >= self.limits.per_client
            && !state.close_longest_idle(Some(key))
        {
            return Err(Refused::PerClient);
        }
        if self.limits.total > 0 && state.counted >= self.limits.total && !state.close_longest_idle(None) {
            return Err(Refused::Total);
        }
        let id = state.next_id;
        state.next_id += 1;
        let close = Arc::new(Notify::new());
        state
            .open
            .insert(id, Open { client, requests: 0, idle_since: Instant::now(), close: close.clone(), closing: false });
        state.counted += 1;
        if let Some(key) = client {
            *state.per_client.entry(key).or_default() += 1;
        }
        Ok(Slot { id, connections: self.clone(), close })
    }

    /// Asks every connection to close (shutdown).
    pub(crate) fn close_all(&self) {
        let mut state = self.state();
        let ids: Vec<u64> = state.open.keys().copied().collect();
        for id in ids {
            state.ask_to_close(id);
        }
    }

    /// Resolves when no connection is open.
    pub(crate) async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.state().open.is_empty() {
                return;
            }
            notified.await;
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.state().open.len()
    }
}

impl State {
    /// Asks the connection idle the longest (of `client`, or of anyone) to close; whether
    /// there was one.
    fn close_longest_idle(&mut self, client: Option<IpAddr>) -> bool {
        let victim = self
            .open
            .iter()
            .filter(|(_, c)| !c.closing && c.requests == 0 && (client.is_none() || c.client == client))
            .min_by_key(|(_, c)| c.idle_since)
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                self.ask_to_close(id);
                true
            }
            None => false,
        }
    }

    fn ask_to_close(&mut self, id: u64) {
        let Some(open) = self.open.get_mut(&id) else { return };
        if open.closing {
            return;
        }
        open.closing = true;
        // A stored permit: the connection sees it whenever it next looks.
        open.close.notify_one();
        let client = open.client;
        self.uncount(client);
    }

    fn uncount(&mut self, client: Option<IpAddr>) {
        self.counted -= 1;
        if let Some(key) = client
            && let Some(n) = self.per_client.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&key);
            }
        }
    }
}

/// One admitted connection; dropping it forgets the connection.
pub(crate) struct Slot {
    id: u64,
    connections: Arc<Connections>,
    close: Arc<Notify>,
}

impl Slot {
    /// Resolves when this connection is asked to close.
    pub(crate) async fn closing(&self) {
        self.close.notified().await
    }

    /// Marks a request in flight on this connection until the guard is dropped.
    pub(crate) fn request(&self) -> RequestGuard {
        if let Some(open) = self.connections.state().open.get_mut(&self.id) {
            open.requests += 1;
        }
        RequestGuard { id: self.id, connections: self.connections.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.connections.state();
        if let Some(open) = state.open.remove(&self.id)
            && !open.closing
        {
            state.uncount(open.client);
        }
        if state.open.is_empty() {
            self.connections.all_closed.notify_waiters();
        }
    }
}

/// A request in flight (until its response body is done or dropped).
pub(crate) struct RequestGuard {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(open) = self.connections.state().open.get_mut(&self.id) {
            open.requests -= 1;
            open.idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn closed(slot: &Slot) -> bool {
        use futures_util::FutureExt as _;
        slot.closing().now_or_never().is_some()
    }

    #[test]
    fn at_a_limit_the_longest_idle_connection_makes_room() {
        let connections = Connections::new(ConnectionLimits { total: 3, per_client: 2 });
        let a1 = connections.admit(ip("192.0.2.1")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let a2 = connections.admit(ip("192.0.2.1")).unwrap();
        // Over the per-client limit: a's oldest idle connection is asked to close.
        let a3 = connections.admit(ip("192.0.2.1")).unwrap();
        assert!(closed(&a1) && !closed(&a2) && !closed(&a3));
        // Busy connections are never chosen; when all of a client's are busy, it is refused.
        let _r2 = a2.request();
        let _r3 = a3.request();
        assert_eq!(connections.admit(ip("192.0.2.1")).err(), Some(Refused::PerClient));
        // The total limit: b's connection takes the last place, c finds only busy ones.
        let b = connections.admit(ip("192.0.2.2")).unwrap();
        let _rb = b.request();
        assert_eq!(connections.admit(ip("192.0.2.3")).err(), Some(Refused::Total));
        // A finished request makes its connection idle, and so a candidate.
        drop(_rb);
        let c = connections.admit(ip("192.0.2.3")).unwrap();
        assert!(closed(&b) && !closed(&c));
        // Exempt clients (trusted proxies) count only towards the total.
        drop((a1, b));
        assert_eq!(connections.open(), 3);
        drop((_r2, _r3, a2, a3, c));
        assert_eq!(connections.open(), 0);
        let unlimited = Connections::new(ConnectionLimits::unlimited());
        let many: Vec<Slot> = (0..1000).map(|_| unlimited.admit(ip("192.0.2.9")).unwrap()).collect();
        assert!(many.iter().all(|s| !closed(s)));
    }

    #[test]
    fn exempt_clients_and_shutdown() {
        let connections = Connections::new(ConnectionLimits { total: 0, per_client: 1 });
        let proxied: Vec<Slot> = (0..5).map(|_| connections.admit(None).unwrap()).collect();
        assert!(proxied.iter().all(|s| !closed(s)), "no per-client limit for a trusted proxy");
        connections.close_all();
        assert!(proxied.iter().all(closed));
        use futures_util::FutureExt as _;
        assert!(connections.all_closed().now_or_never().is_none());
        drop(proxied);
        assert!(connections.all_closed().now_or_never().is_some());
    }
}
