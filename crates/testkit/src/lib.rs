//! Test helpers shared by every integration suite: start the real `tessera` binary on an
//! ephemeral loopback port, make random OCI images, drive the HTTP API, and find the real
//! client programs (skopeo, podman, ctr, dockerd, python oras).

pub mod cdn;
pub mod clients;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tessera_spec::Digest;

pub use tempfile::{TempDir, tempdir};

/// A running `tessera serve` with its own data directory, killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub log: PathBuf,
    bin: PathBuf,
    extra: Vec<String>,
    child: Child,
    _dir: Option<TempDir>,
    config_dir: Option<TempDir>,
}

impl Server {
    /// Starts `bin serve` on 127.0.0.1 (a free port), with a fresh data directory and `extra` args.
    pub fn start(bin: &str, extra: &[&str]) -> Result<Server> {
        Self::start_in(bin, None, extra)
    }

    /// Like [`Server::start`], with `toml` as its configuration file (`--config`).
    pub fn with_config(bin: &str, toml: &str) -> Result<Server> {
        let config_dir = tempfile::Builder::new().prefix("tcf").tempdir()?;
        let config = config_dir.path().join("tessera.toml");
        std::fs::write(&config, toml)?;
        let mut server = Self::start(bin, &["--config", &config.to_string_lossy()])?;
        // Restarts read the file again, so it lives as long as the server.
        server.config_dir = Some(config_dir);
        Ok(server)
    }

    /// Like [`Server::start`], keeping data in `data` instead of a fresh directory.
    pub fn start_in(bin: &str, data: Option<&Path>, extra: &[&str]) -> Result<Server> {
        Self::start_with(bin, data, "127.0.0.1:0", extra)
    }

    /// Like [`Server::start`], listening on `listen` (e.g. `0.0.0.0:0`).
    pub fn start_on(bin: &str, listen: &str, extra: &[&str]) -> Result<Server> {
        Self::start_with(bin, None, listen, extra)
    }

    fn start_with(bin: &str, data: Option<&Path>, listen: &str, extra: &[&str]) -> Result<Server> {
        let dir = tempfile::Builder::new().prefix("tsr").tempdir()?;
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let log = dir.path().join("server.log");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(Path::new(bin), &data, &log, listen, &extra)?;
        Ok(Server { addr, data, log, bin: bin.into(), extra, child, _dir: Some(dir), config_dir: None })
    }

    /// `host:port`, as clients write registry references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP (configuration reload).
    pub fn hangup(&self) {
        let _ = Command::new("kill").arg("-HUP").arg(self.pid().to_string()).status();
    }

    /// Waits until the log contains `needle` (for events the server reports only there).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the process at once (SIGKILL): nothing gets to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the binary again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let (child, addr) = spawn(&self.bin, &self.data, &self.log, &self.addr.to_string(), &self.extra)?;
        self.child = child;
        self.addr = addr;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(bin: &Path, data: &Path, log: &Path, listen: &str, extra: &[String]) -> Result<(Child, SocketAddr)> {
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--data")
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log_file, "{line}");
            if let Some(rest) = line.split(" listening on ").nth(1).filter(|r| r.starts_with("http")) {
                let addr =
                    rest.split(',').next().unwrap_or("").trim_start_matches("http://").trim_start_matches("https://");
                let _ = tx.send(addr.to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Ok((child, addr.parse().with_context(|| format!("bad address in startup line: {addr}"))?)),
        Err(_) => {
            let _ = child.kill();
            bail!("server did not start; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seed that differs between runs and between calls.
pub fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ (COUNTER.fetch_add(1, Ordering::Relaxed) << 48) ^ std::process::id() as u64
}

/// A gzip'd tar with one file of `size` random bytes: a real, unpackable image layer.
pub fn random_layer(size: usize, seed: u64) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let data = random_bytes(size, seed);
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, format!("file-{seed:x}"), &data[..]).expect("tar in memory");
    let tar = tar.into_inner().expect("tar in memory");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

/// A whole image: its blobs and manifest.
pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
}

impl Image {
    /// An OCI image (linux/amd64) with `layers` random layers of about `layer_size` bytes.
    pub fn random(layers: usize, layer_size: usize) -> Image {
        let seed = fresh_seed();
        let layers: Vec<Vec<u8>> = (0..layers).map(|i| random_layer(layer_size, seed.wrapping_add(i as u64))).collect();
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| {
                let mut tar = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&l[..]), &mut tar).expect("own gzip");
                Digest::sha256_of(&tar).to_string()
            })
            .collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/bin/true"], "Labels": { "seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .expect("json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(&config).to_string(), "size": config.len() },
            "layers": layers.iter().map(|l| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": Digest::sha256_of(l).to_string(),
                "size": l.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("json");
        Image { config, layers, manifest }
    }

    pub fn digest(&self) -> Digest {
        Digest::sha256_of(&self.manifest)
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    /// Writes the image as an OCI image layout in `dir`, tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        for b in self.blobs().chain(std::iter::once(&self.manifest)) {
            std::fs::write(blobs.join(Digest::sha256_of(b).hex()), b)?;
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.digest().to_string(),
                "size": self.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// A thin HTTP client for the registry API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        Api { base: format!("http://{}", server.addr), http: http_client() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Pushes a blob in one request (`POST ?digest=`), or with POST then PUT where the
    /// registry opens a session instead (Distribution does); returns its digest.
    pub async fn push_blob(&self, name: &str, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::sha256_of(bytes);
        let r = self
            .http
            .post(self.url(&format!("/v2/{name}/blobs/uploads/?digest={d}")))
            .body(bytes.to_vec())
            .send()
            .await?;
        let r = if r.status() == 202 {
            let location = r.headers().get("location").context("202 without Location")?.to_str()?.to_string();
            let location = if location.starts_with("http") { location } else { self.url(&location) };
            let sep = if location.contains('?') { '&' } else { '?' };
            self.http.put(format!("{location}{sep}digest={d}")).body(bytes.to_vec()).send().await?
        } else {
            r
        };
        if r.status() != 201 {
            bail!("push blob: {} {}", r.status(), r.text().await?);
        }
        Ok(d)
    }

    pub async fn push_manifest(
        &self,
        name: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<reqwest::Response> {
        Ok(self
            .http
            .put(self.url(&format!("/v2/{name}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await?)
    }

    /// Pushes all blobs and the manifest of `image` as `name:tag`.
    pub async fn push_image(&self, name: &str, tag: &str, image: &Image) -> Result<Digest> {
        for b in image.blobs() {
            self.push_blob(name, b).await?;
        }
        let r = self.push_manifest(name, tag, "application/vnd.oci.image.manifest.v1+json", &image.manifest).await?;
        if r.status() != 201 {
            bail!("push manifest: {} {}", r.status(), r.text().await?);
        }
        Ok(image.digest())
    }

    pub async fn get(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self.http.get(self.url(path)).send().await?)
    }
}

/// An HTTP client for tests. The workspace builds reqwest with rustls but no default crypto
/// provider (the server picks ring explicitly), so tests install ring as the default first.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().pool_max_idle_per_host(4).build().expect("client")
}

/// The OCI error code of a response body, for assertions.
pub async fn error_code(r: reqwest::Response) -> String {
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    body["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

/// Whether a client program is installed. When `TESSERA_REQUIRE_CLIENTS` is set (CI sets
/// it), a missing program is a failure, so a client test can never pass by not running.
pub fn have_tool(program: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {program}")).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("TESSERA_REQUIRE_CLIENTS").is_some() {
            panic!("{program} is required (TESSERA_REQUIRE_CLIENTS is set) but not installed");
        }
        eprintln!("SKIPPED: {program} is not installed; .ci/run installs it");
    }
    found
}

/// Runs a command, failing with its output if it does not succeed. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    clients::output(cmd).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Every file under a data directory with its size, except SQLite's own files (WAL
/// checkpoints change them without any content changing): what "the stores are
/// unchanged" compares.
pub fn store_files(data: &Path) -> Vec<(String, u64)> {
    fn walk(dir: &Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if !p.to_string_lossy().contains(".sqlite") {
                out.push((p.display().to_string(), e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    let mut out = Vec::new();
    walk(data, &mut out);
    out.sort();
    out
}

/// Flips one byte of a blob a Tessera server stores (it serves files as they are), to play
/// an upstream that lies.
pub fn corrupt_stored_blob(server: &Server, digest: &Digest, at: usize) {
    let path = server.data.join("blobs").join(digest.algorithm().as_str()).join(&digest.hex()[..2]).join(digest.hex());
    let mut bytes = std::fs::read(&path).expect("stored blob");
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).expect("rewrite blob");
}

/// An htpasswd file (bcrypt, cost 5 to keep tests quick) with `users` in `dir`.
pub fn htpasswd_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("htpasswd");
    let text: String = users.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 5).expect("bcrypt"))).collect();
    std::fs::write(&path, text).expect("write htpasswd");
    path
}

/// Distribution from Debian's `docker-registry` on a free loopback port, with its own
/// storage, optionally behind an htpasswd file; killed when dropped.
pub struct Distribution {
    child: Child,
    pub addr: String,
    dir: TempDir,
}

impl Distribution {
    pub fn start(htpasswd: Option<&Path>) -> Result<Distribution> {
        let dir = tempfile::Builder::new().prefix("tdist").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let auth = htpasswd
            .map_or(String::new(), |h| format!("auth:\n  htpasswd: {{realm: test-realm, path: {}}}\n", h.display()));
        let config = dir.path().join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: \"{addr}\"}}\n{auth}",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let mut child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start docker-registry")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                bail!("Distribution did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Distribution { child, addr, dir })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
