//! The servers under test, each started fresh on a free loopback port and stopped on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_spec::Digest;

use crate::Content;

const READY_DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The HTTP status of `GET path`, or `None` if nothing answers yet.
pub fn probe(addr: &SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Spawns `cmd` and waits until `GET path` answers 200; returns the child and the wait.
fn spawn_ready(mut cmd: Command, addr: SocketAddr, path: &str, log: &Path) -> Result<(Child, Duration)> {
    let log = std::fs::File::create(log)?;
    let started = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn().context("cannot start server")?;
    loop {
        if probe(&addr, path) == Some(200) {
            return Ok((child, started.elapsed()));
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited with {status} before answering");
        }
        if started.elapsed() > READY_DEADLINE {
            let _ = child.kill();
            bail!("server not ready after {READY_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub startup: Duration,
}

impl Registry {
    /// Tessera on its embedded default, access log off (as Distribution's is here).
    pub fn tessera(bin: &Path, dir: &Path) -> Result<Registry> {
        Self::tessera_with(bin, dir, None)
    }

    /// Tessera with a configuration file holding `toml`.
    pub fn tessera_with(bin: &Path, dir: &Path, toml: Option<&str>) -> Result<Registry> {
        std::fs::create_dir_all(dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data = dir.join("data");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--listen").arg(addr.to_string()).arg("--data").arg(&data).env("RUST_LOG", "warn");
        if let Some(toml) = toml {
            let config = dir.join("tessera.toml");
            std::fs::write(&config, toml)?;
            cmd.arg("--config").arg(config);
        }
        let (child, startup) = spawn_ready(cmd, addr, "/v2/", &dir.join("log"))?;
        Ok(Registry { child, addr, data, startup })
    }

    /// Distribution with filesystem storage and its in-memory blob descriptor cache.
    pub fn distribution(bin: &Path, dir: &Path) -> Result<Registry> {
        std::fs::create_dir_all(dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data = dir.join("data");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\n  cache: {{blobdescriptor: inmemory}}\nhttp: {{addr: \"{addr}\"}}\nhealth: {{storagedriver: {{enabled: false}}}}\n",
                data.display()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config);
        let (child, startup) = spawn_ready(cmd, addr, "/v2/", &dir.join("log"))?;
        Ok(Registry { child, addr, data, startup })
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median start-up time in milliseconds over `runs` fresh starts.
pub fn median_startup(start: impl Fn(usize) -> Result<Registry>, runs: usize) -> Result<f64> {
    let mut times: Vec<f64> =
        (0..runs).map(|i| start(i).map(|r| r.startup.as_secs_f64() * 1000.0)).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

/// nginx serving the very files Tessera stored: the practical ceiling for bytes from disk.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
}

impl Nginx {
    pub fn start(root: &Path, tessera_data: &Path, content: &Content) -> Result<Nginx> {
        let www = root.join("www");
        std::fs::create_dir_all(&www)?;
        let blob = |bytes: &[u8]| {
            let d = Digest::sha256_of(bytes);
            tessera_data.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex())
        };
        std::fs::write(www.join("manifest.json"), &content.manifest)?;
        std::fs::hard_link(blob(&content.small), www.join("small.blob"))?;
        std::fs::hard_link(blob(&content.big), www.join("big.blob"))?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let user = if running_as_root() { "user root;\n" } else { "" };
        let conf = root.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "{user}worker_processes 2;\ndaemon off;\npid {root}/nginx.pid;\nerror_log {root}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 10000000;\n  default_type application/octet-stream;\n  client_body_temp_path {root}/nginx-tmp;\n  proxy_temp_path {root}/nginx-tmp;\n  fastcgi_temp_path {root}/nginx-tmp;\n  uwsgi_temp_path {root}/nginx-tmp;\n  scgi_temp_path {root}/nginx-tmp;\n  server {{ listen {addr}; root {www}; }}\n}}\n",
                root = root.display(),
                www = www.display()
            ),
        )?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(root);
        let (child, _) = spawn_ready(cmd, addr, "/manifest.json", &root.join("nginx.log"))?;
        Ok(Nginx { child, addr })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        tessera_testkit::cdn::stop_nginx(&mut self.child);
    }
}
