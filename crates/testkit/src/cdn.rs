//! nginx as a CDN origin or mirror on a loopback address of the test's choosing
//! (127.0.0.2, 127.0.0.3, ...), serving a directory, logging each request, and optionally
//! checking nginx `secure_link_md5` signatures the way a protected CDN would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

pub struct Cdn {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The directory served at `/`.
    pub root: PathBuf,
    dir: TempDir,
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// One request nginx logged: method, path (without query), query, status, and the
/// server it was passed to ("-" when nginx answered itself).
#[derive(Debug, Clone)]
pub struct CdnRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub upstream: String,
}

impl Cdn {
    /// nginx on `ip` (a free port). With `secure_link_secret`, every request must carry
    /// `?md5=..&expires=..` for `"$secure_link_expires$uri <secret>"`: 403 when the
    /// signature is wrong or missing, 410 when it has expired.
    pub fn start(ip: &str, secure_link_secret: Option<&str>) -> Result<Cdn> {
        let secure = match secure_link_secret {
            Some(secret) => format!(
                "secure_link $arg_md5,$arg_expires;\n      secure_link_md5 \"$secure_link_expires$uri {secret}\";\n      \
                 if ($secure_link = \"\") {{ return 403; }}\n      if ($secure_link = \"0\") {{ return 410; }}\n"
            ),
            None => String::new(),
        };
        Cdn::start_with(ip, &secure)
    }

    /// nginx on `ip` sending every answer at `bytes_per_second` at most: a slow origin.
    pub fn throttled(ip: &str, bytes_per_second: u64) -> Result<Cdn> {
        Cdn::start_with(ip, &format!("limit_rate {bytes_per_second};\n"))
    }

    fn start_with(ip: &str, location: &str) -> Result<Cdn> {
        let dir = tempfile::Builder::new().prefix("tcdn").tempdir()?;
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root)?;
        let addr = free_addr(ip)?;
        let server = format!(
            "default_type application/octet-stream;\n  server {{\n    listen {addr};\n    root {root};\n    \
             location / {{\n      {location}    }}\n  }}\n",
            root = root.display()
        );
        let child = run_nginx(dir.path(), addr, "1", &server)?;
        Ok(Cdn { child: Some(child), addr, root, dir })
    }

    /// `http://ip:port{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request logged so far.
    pub fn requests(&self) -> Vec<CdnRequest> {
        logged_requests(self.dir.path())
    }

    /// Whether a GET of a path ending in `tail` was answered with `status`.
    pub fn served(&self, tail: &str, status: u16) -> bool {
        self.requests().iter().any(|r| r.method == "GET" && r.path.ends_with(tail) && r.status == status)
    }

    /// Stops nginx (a mirror going down): SIGTERM, so the master takes its workers along.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_nginx(&mut c);
        }
    }

    /// The file under the root for a URL path.
    pub fn file(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Cdn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free port on `ip` (a loopback address).
pub(crate) fn free_addr(ip: &str) -> Result<SocketAddr> {
    let port = std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("cannot bind {ip}: is it a loopback address here?"))?
        .local_addr()?
        .port();
    Ok(format!("{ip}:{port}").parse()?)
}

/// Runs nginx in the foreground (`workers` worker processes, or `auto`: one per core)
/// with everything under `dir` and `http` inside its `http`
/// block (which logs each request to `dir/access.log` as `method uri "args" status
/// upstream`), and waits until it answers on `addr`.
pub(crate) fn run_nginx(dir: &Path, addr: SocketAddr, workers: &str, http: &str) -> Result<Child> {
    let user = if running_as_root() { "user root;\n" } else { "" };
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "{user}worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n  \
             log_format t '$request_method $uri \"$args\" $status $upstream_addr';\n  \
             access_log {d}/access.log t;\n  \
             client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  \
             uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  {http}}}\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("nginx.log"))?;
    let mut child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start nginx")?;
    let answering = crate::wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok() || child.try_wait().ok().flatten().is_some()
    });
    if !answering || child.try_wait()?.is_some() {
        let _ = child.kill();
        let text = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        bail!("nginx did not start on {addr}: {text}");
    }
    Ok(child)
}

/// One line of the access log [`run_nginx`] writes.
pub(crate) fn logged_requests(dir: &Path) -> Vec<CdnRequest> {
    let text = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (method, rest) = l.split_once(' ')?;
            let (path, rest) = rest.split_once(" \"")?;
            let (query, rest) = rest.rsplit_once("\" ")?;
            let (status, upstream) = rest.split_once(' ').unwrap_or((rest, "-"));
            Some(CdnRequest {
                method: method.into(),
                path: path.into(),
                query: query.into(),
                status: status.trim().parse().ok()?,
                upstream: upstream.trim().to_string(),
            })
        })
        .collect()
}

/// Stops an nginx master and its workers: SIGTERM, which it passes on (a SIGKILL would leave
/// the workers running and serving), then SIGKILL after five seconds.
pub fn stop_nginx(master: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(master.id().to_string()).status();
    if crate::wait_until(Duration::from_secs(5), || master.try_wait().ok().flatten().is_some()) {
        return;
    }
    let _ = master.kill();
    let _ = master.wait();
}
