//! A fault-injecting HTTP proxy to put in front of an upstream registry: for each request it
//! picks (from a seed, so a run can be replayed) to pass the answer through or to break it
//! the ways networks and bad servers do. One request per connection, answered with
//! `Connection: close`, so every answer is framed by the proxy alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The upstream's answer as it is.
    Pass,
    /// The connection is reset (RST) part way through the body.
    Reset,
    /// The answer arrives, correct, with pauses of some hundreds of milliseconds.
    Slow,
    /// The body stops early and the connection closes (the `Content-Length` is right).
    Truncate,
    /// The `Content-Length` differs from the body's length (on a `HEAD` too).
    LieSize,
    /// One byte of the body is flipped.
    Corrupt,
}

impl Fault {
    pub const ALL: [Fault; 6] =
        [Fault::Pass, Fault::Reset, Fault::Slow, Fault::Truncate, Fault::LieSize, Fault::Corrupt];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Reset => "reset",
            Fault::Slow => "slow",
            Fault::Truncate => "truncate",
            Fault::LieSize => "lie_size",
            Fault::Corrupt => "corrupt",
        }
    }
}

struct State {
    upstream: SocketAddr,
    enabled: AtomicBool,
    rng: Mutex<u64>,
    counts: [AtomicU64; 6],
}

impl State {
    fn next(&self) -> u64 {
        let mut x = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A number in `[lo, hi)` (`lo` when the range is empty).
    fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { lo + self.next() % (hi - lo) }
    }
}

/// The proxy, listening on a loopback port until dropped.
pub struct Chaos {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Chaos {
    /// Starts a proxy to `upstream` (plain HTTP) that injects faults, chosen from `seed`.
    pub async fn start(upstream: SocketAddr, seed: u64) -> Result<Chaos> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            enabled: AtomicBool::new(true),
            rng: Mutex::new(seed | 1),
            counts: Default::default(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(client, &state).await;
                });
            }
        });
        Ok(Chaos { addr, state, task })
    }

    /// Faults on (the start) or off: off, every answer passes through untouched.
    pub fn set_enabled(&self, on: bool) {
        self.state.enabled.store(on, Ordering::SeqCst);
    }

    /// How many answers got each fault so far (faults that did not apply count as passes).
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        Fault::ALL.iter().map(|f| (f.name(), self.state.counts[*f as usize].load(Ordering::Relaxed))).collect()
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until the end of an HTTP head; returns it and whatever of the body came with it.
async fn read_head(stream: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            bail!("head too large");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the end of the head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Headers that describe the connection or the framing: the proxy writes its own.
fn hop_by_hop(line: &str) -> bool {
    let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(name.as_str(), "connection" | "keep-alive" | "content-length" | "transfer-encoding" | "proxy-connection")
}

async fn serve(mut client: TcpStream, state: &State) -> Result<()> {
    let (head, mut body) = read_head(&mut client).await?;
    let request_line = head.lines().next().context("empty request")?.to_string();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().context("no method")?, parts.next().context("no target")?);
    let is_head = method.eq_ignore_ascii_case("HEAD");
    let length: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            bail!("request body cut short");
        }
        body.extend_from_slice(&chunk[..n]);
    }

    // HTTP/1.0 to the upstream: no chunked encoding, and the answer ends where the
    // connection does.
    let mut upstream = TcpStream::connect(state.upstream).await?;
    let mut forward = format!("{method} {target} HTTP/1.0\r\n");
    for line in head.lines().skip(1).filter(|l| !l.is_empty() && !hop_by_hop(l)) {
        forward.push_str(line);
        forward.push_str("\r\n");
    }
    if length > 0 {
        forward.push_str(&format!("Content-Length: {length}\r\n"));
    }
    forward.push_str("Connection: close\r\n\r\n");
    upstream.write_all(forward.as_bytes()).await?;
    upstream.write_all(&body).await?;
    let (answer_head, mut answer) = read_head(&mut upstream).await?;
    upstream.read_to_end(&mut answer).await?;
    let announced: usize = header(&answer_head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);

    let status = answer_head.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("502");
    let mut fault = if state.enabled.load(Ordering::SeqCst) {
        // Passing cleanly about a third of the time, so that some pulls can succeed.
        match state.next() % 15 {
            0..=4 => Fault::Pass,
            5 | 6 => Fault::Reset,
            7 | 8 => Fault::Slow,
            9 | 10 => Fault::Truncate,
            11 | 12 => Fault::LieSize,
            _ => Fault::Corrupt,
        }
    } else {
        Fault::Pass
    };
    let real_len = if is_head { announced } else { answer.len() };
    // Faults on a body need one.
    if !is_head && answer.is_empty() && matches!(fault, Fault::Corrupt | Fault::Truncate | Fault::Reset) {
        fault = Fault::Pass;
    }
    if is_head && matches!(fault, Fault::Corrupt | Fault::Truncate) {
        fault = Fault::Pass;
    }
    state.counts[fault as usize].fetch_add(1, Ordering::Relaxed);

    let told_len = match fault {
        Fault::LieSize if real_len == 0 || state.next().is_multiple_of(2) => real_len + state.between(1, 4096) as usize,
        Fault::LieSize => real_len - state.between(1, real_len as u64 + 1) as usize,
        _ => real_len,
    };
    let mut out_head = format!("HTTP/1.1 {status} X\r\n");
    for line in answer_head.lines().skip(1).filter(|l| !l.is_empty() && !hop_by_hop(l)) {
        out_head.push_str(line);
        out_head.push_str("\r\n");
    }
    out_head.push_str(&format!("Content-Length: {told_len}\r\nConnection: close\r\n\r\n"));
    let body = if is_head { Vec::new() } else { answer };
    let pause = |lo, hi| tokio::time::sleep(Duration::from_millis(state.between(lo, hi)));

    match fault {
        Fault::Pass => {
            client.write_all(out_head.as_bytes()).await?;
            client.write_all(&body).await?;
        }
        Fault::Slow => {
            pause(100, 400).await;
            client.write_all(out_head.as_bytes()).await?;
            let piece = body.len().div_ceil(3).max(1);
            for part in body.chunks(piece) {
                pause(50, 200).await;
                client.write_all(part).await?;
            }
        }
        Fault::Reset => {
            let cut = state.between(0, body.len() as u64) as usize;
            client.write_all(out_head.as_bytes()).await?;
            client.write_all(&body[..cut]).await?;
            client.flush().await?;
            // Linger 0: closing sends RST instead of FIN.
            client.set_zero_linger()?;
            drop(client);
            return Ok(());
        }
        Fault::Truncate => {
            let cut = state.between(0, body.len() as u64) as usize;
            client.write_all(out_head.as_bytes()).await?;
            client.write_all(&body[..cut]).await?;
        }
        Fault::LieSize => {
            client.write_all(out_head.as_bytes()).await?;
            client.write_all(&body[..told_len.min(body.len())]).await?;
        }
        Fault::Corrupt => {
            let mut body = body;
            let at = state.between(0, body.len() as u64) as usize;
            body[at] ^= 0x20;
            client.write_all(out_head.as_bytes()).await?;
            client.write_all(&body).await?;
        }
    }
    client.shutdown().await?;
    Ok(())
}
