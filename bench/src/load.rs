//! Load generation with wrk, and resident-memory sampling from /proc.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct Wrk {
    pub seconds: u64,
}

pub struct WrkResult {
    pub rps: f64,
    pub p99_ms: f64,
    pub gbps: f64,
}

fn duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn bytes_per_sec(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(v * scale)
}

impl Wrk {
    /// `wrk` against `url` with `connections` (2 threads), GET or HEAD.
    pub fn get(&self, url: &str, connections: u32, accept: Option<&str>, head: bool) -> Result<WrkResult> {
        let mut cmd = Command::new("wrk");
        cmd.args(["-t", &connections.min(2).to_string(), "-c", &connections.to_string()]).args([
            "-d",
            &format!("{}s", self.seconds),
            "--latency",
        ]);
        if let Some(a) = accept {
            cmd.args(["-H", &format!("Accept: {a}")]);
        }
        let script = std::env::temp_dir().join(format!("tessera-bench-head-{}.lua", std::process::id()));
        if head {
            std::fs::write(&script, "wrk.method = \"HEAD\"\n")?;
            cmd.arg("-s").arg(&script);
        }
        let out = cmd.arg(url).output().context("cannot run wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("wrk failed on {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        if text.contains("Non-2xx") {
            bail!("wrk saw error answers from {url}:\n{text}");
        }
        let field =
            |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()));
        let rps =
            field("Requests/sec:").and_then(|v| v.parse().ok()).context(format!("no Requests/sec in:\n{text}"))?;
        let gbps = field("Transfer/sec:").and_then(|v| bytes_per_sec(&v)).unwrap_or(0.0) / 1e9;
        let p99_ms = field("99%").and_then(|v| duration_ms(&v)).unwrap_or(f64::NAN);
        Ok(WrkResult { rps, p99_ms, gbps })
    }
}

/// HEAD requests at `addr` over `connections` keep-alive connections for `seconds`.
/// wrk cannot measure HEAD (it waits for a body the Content-Length announces), so this
/// case has its own small generator; all three servers are measured with it.
pub async fn head_rate(
    addr: std::net::SocketAddr,
    path: &str,
    accept: &str,
    connections: usize,
    seconds: u64,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("HEAD {path} HTTP/1.1\r\nHost: bench\r\nAccept: {accept}\r\n\r\n").into_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; 4096];
            let mut done = 0u64;
            while tokio::time::Instant::now() < deadline {
                s.write_all(&request).await?;
                let mut len = 0;
                loop {
                    let n = s.read(&mut buf[len..]).await?;
                    anyhow::ensure!(n > 0, "connection closed");
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                    anyhow::ensure!(len < buf.len(), "response head too large");
                }
                anyhow::ensure!(
                    buf.starts_with(b"HTTP/1.1 200"),
                    "HEAD answered {:?}",
                    String::from_utf8_lossy(&buf[..12])
                );
                done += 1;
            }
            Ok::<u64, anyhow::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}

/// Resident memory of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU-seconds (user and system) process `pid` has used so far, from `/proc/<pid>/stat`
/// (in clock ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (user, system): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some((user + system) / 100.0)
}

/// The whole machine's CPU-seconds so far, from `/proc/stat`: (busy, stolen), busy being
/// user, nice, system, irq and softirq time of every core, stolen what the hypervisor gave
/// to other guests while this one wanted to run.
pub fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).map_while(|t| t.parse().ok()).collect();
    let (user, nice, system, irq, softirq, steal) =
        (ticks.first()?, ticks.get(1)?, ticks.get(2)?, ticks.get(5)?, ticks.get(6)?, ticks.get(7)?);
    Some(((user + nice + system + irq + softirq) / 100.0, steal / 100.0))
}

/// Samples a process's RSS every 20 ms until stopped; reports the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<f64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0f64;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { stop, thread }
    }

    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_units() {
        assert_eq!(duration_ms("1.50ms"), Some(1.5));
        assert_eq!(duration_ms("250.00us"), Some(0.25));
        assert_eq!(duration_ms("2.00s"), Some(2000.0));
        assert_eq!(bytes_per_sec("2.00GB"), Some(2.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(bytes_per_sec("512.00KB"), Some(512.0 * 1024.0));
    }
}
