//! Test helpers shared by every integration suite: start the real `tessera` binary on an
//! ephemeral loopback port, make random OCI images, drive the HTTP API, and find the real
//! client programs (skopeo, podman, ctr, dockerd, python oras).

pub mod balancer;
pub mod cdn;
pub mod chaos;
pub mod clients;
pub mod cosign;
pub mod disk;
pub mod garage;
pub mod postgres;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
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
    storage: String,
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
        let unique = config_dir.path().file_name().unwrap_or_default().to_string_lossy().into_owned();
        let storage = test_storage(&unique, toml);
        std::fs::write(&config, format!("{toml}\n{storage}"))?;
        let mut server = Self::start(bin, &["--config", &config.to_string_lossy()])?;
        // Restarts read the file again, so it lives as long as the server.
        server.config_dir = Some(config_dir);
        server.storage = storage;
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
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let unique = dir.path().file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut storage = String::new();
        if !extra.iter().any(|a| a == "--config") {
            storage = test_storage(&unique, "");
            if !storage.is_empty() {
                let config = dir.path().join("storage.toml");
                std::fs::write(&config, &storage)?;
                extra.extend(["--config".to_string(), config.to_string_lossy().into_owned()]);
            }
        }
        let (child, addr) = spawn(Path::new(bin), &data, &log, listen, &extra)?;
        Ok(Server { addr, data, log, bin: bin.into(), extra, child, _dir: Some(dir), config_dir: None, storage })
    }

    /// `host:port`, as clients write registry references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The storage tables `with-engines` gave this server (empty without it), for a
    /// configuration of the CLI's own that must find the same stores.
    pub fn storage_tables(&self) -> &str {
        &self.storage
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
        wait_until(timeout, || self.log_text().contains(needle))
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

/// The storage tables a test server gets from `with-engines` (nothing without it), for a
/// configuration `existing` that does not give its own: `[storage.s3]` from
/// `TESSERA_TEST_S3` with the prefix `unique/`, `[storage.postgres]` with the URL of
/// `TESSERA_TEST_POSTGRES` and the schema `unique`, so that servers share the engines but
/// nothing else.
pub fn test_storage(unique: &str, existing: &str) -> String {
    let unique = unique.to_ascii_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let mut tables = String::new();
    if let Ok(table) = std::env::var("TESSERA_TEST_S3")
        && !existing.contains("[storage.s3]")
    {
        for line in table.lines().filter(|l| !l.trim_start().starts_with("prefix")) {
            tables.push_str(line);
            tables.push('\n');
        }
        tables.push_str(&format!("prefix = \"{unique}/\"\n"));
    }
    if let Ok(url) = std::env::var("TESSERA_TEST_POSTGRES")
        && !existing.contains("[storage.postgres]")
    {
        tables.push_str(&format!("[storage.postgres]\nurl = \"{url}\"\nschema = \"{unique}\"\n"));
    }
    tables
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
        Image::of_layers(layers, Some(json!({ "seed": seed.to_string() })))
    }

    /// An OCI image (linux/amd64) of `layers` (gzip'd tars), its config listing their
    /// diff_ids and carrying `labels`.
    pub fn of_layers(layers: Vec<Vec<u8>>, labels: Option<serde_json::Value>) -> Image {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| {
                let mut tar = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&l[..]), &mut tar).expect("gzip'd layer");
                Digest::sha256_of(&tar).to_string()
            })
            .collect();
        let mut run = json!({ "Cmd": ["/bin/true"] });
        if let Some(labels) = labels {
            run["Labels"] = labels;
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": run,
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

    /// The image's descriptor in an index, as the linux image for `architecture`.
    pub fn descriptor(&self, architecture: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.digest().to_string(),
            "size": self.manifest.len(),
            "platform": { "architecture": architecture, "os": "linux" },
        })
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
        Api::at(server.addr)
    }

    /// A client for the registry at `addr` (plain HTTP), whatever runs it: the real binary,
    /// an in-process server, Distribution.
    pub fn at(addr: SocketAddr) -> Api {
        Api { base: format!("http://{addr}"), http: http_client() }
    }

    /// The same registry, sending `user`'s Basic credentials with every request.
    pub fn logged_in(self, user: &str, password: &str) -> Api {
        use base64::Engine as _;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut value = reqwest::header::HeaderValue::try_from(format!("Basic {credentials}")).expect("header");
        value.set_sensitive(true);
        let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().default_headers(headers).build().expect("client");
        Api { http, ..self }
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

    /// Pushes an OCI index listing `images` (each the linux image for its architecture,
    /// pushed already) as `name:tag`; returns the index's digest.
    pub async fn push_index(&self, name: &str, tag: &str, images: &[(&Image, &str)]) -> Result<Digest> {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": images.iter().map(|(image, arch)| image.descriptor(arch)).collect::<Vec<_>>(),
        })
        .to_string();
        let r = self.push_manifest(name, tag, "application/vnd.oci.image.index.v1+json", index.as_bytes()).await?;
        if r.status() != 201 {
            bail!("push index: {} {}", r.status(), r.text().await?);
        }
        Ok(Digest::sha256_of(index.as_bytes()))
    }

    pub async fn get(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self.http.get(self.url(path)).send().await?)
    }

    /// The same registry through `http` (e.g. a client with a larger connection pool).
    pub fn with_http(self, http: reqwest::Client) -> Api {
        Api { http, ..self }
    }

    /// Opens an upload session (`POST uploads/`); returns its absolute location.
    pub async fn start_upload(&self, name: &str) -> Result<String> {
        let r = self.http.post(self.url(&format!("/v2/{name}/blobs/uploads/"))).send().await?;
        if r.status() != 202 {
            bail!("POST upload: {}", r.status());
        }
        Ok(self.absolute(location_of(&r)?))
    }

    /// A `Location` as a URL (registries may answer with a path).
    pub fn absolute(&self, location: &str) -> String {
        if location.starts_with("http") { location.to_string() } else { self.url(location) }
    }

    /// `location` with `digest=` added to its query.
    pub fn with_digest(location: &str, digest: &Digest) -> String {
        let sep = if location.contains('?') { '&' } else { '?' };
        format!("{location}{sep}digest={digest}")
    }

    /// POST, then PUT with the whole body and its digest.
    pub async fn push_monolithic(&self, name: &str, blob: Bytes) -> Result<()> {
        let digest = Digest::sha256_of(&blob);
        let location = self.start_upload(name).await?;
        let r = self.http.put(Self::with_digest(&location, &digest)).body(blob).send().await?;
        if r.status() != 201 {
            bail!("PUT blob: {}", r.status());
        }
        Ok(())
    }

    /// POST, PATCHes of `chunk` bytes each (the same buffer repeated until `total` bytes
    /// are sent), PUT with the digest.
    pub async fn push_chunked(&self, name: &str, chunk: &Bytes, total: u64) -> Result<()> {
        let mut location = self.start_upload(name).await?;
        let mut digester = tessera_spec::Digester::new(tessera_spec::Algorithm::Sha256);
        let mut offset = 0u64;
        while offset < total {
            let part = chunk.slice(..chunk.len().min((total - offset) as usize));
            digester.update(&part);
            let sent = part.len() as u64;
            location = self.patch(&location, offset, part).await?;
            offset += sent;
        }
        self.close_upload(&location, &digester.finish()).await
    }

    /// POST, PATCHes of `blob` in pieces of `chunk` bytes, PUT with the digest.
    pub async fn push_in_chunks(&self, name: &str, blob: &Bytes, chunk: usize) -> Result<()> {
        let mut location = self.start_upload(name).await?;
        let mut offset = 0usize;
        while offset < blob.len() {
            let end = (offset + chunk).min(blob.len());
            location = self.patch(&location, offset as u64, blob.slice(offset..end)).await?;
            offset = end;
        }
        self.close_upload(&location, &Digest::sha256_of(blob)).await
    }

    /// One `PATCH` of `part` at `offset`; returns the session's next location.
    async fn patch(&self, location: &str, offset: u64, part: Bytes) -> Result<String> {
        let end = offset + part.len() as u64 - 1;
        let r = self
            .http
            .patch(location)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(part)
            .send()
            .await?;
        if r.status() != 202 {
            bail!("PATCH: {}", r.status());
        }
        Ok(self.absolute(location_of(&r)?))
    }

    /// The closing `PUT` of a session, with no body.
    async fn close_upload(&self, location: &str, digest: &Digest) -> Result<()> {
        let r = self.http.put(Self::with_digest(location, digest)).send().await?;
        if r.status() != 201 {
            bail!("PUT close: {}", r.status());
        }
        Ok(())
    }

    /// Mounts `digest` from repository `from` into `name`.
    pub async fn mount(&self, name: &str, digest: &Digest, from: &str) -> Result<()> {
        let r =
            self.http.post(self.url(&format!("/v2/{name}/blobs/uploads/?mount={digest}&from={from}"))).send().await?;
        if r.status() != 201 {
            bail!("mount: {}", r.status());
        }
        Ok(())
    }

    /// Puts an OCI image manifest, expecting 201.
    pub async fn put_manifest(&self, name: &str, reference: &str, manifest: &Bytes) -> Result<()> {
        let r = self
            .http
            .put(self.url(&format!("/v2/{name}/manifests/{reference}")))
            .header("content-type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await?;
        if r.status() != 201 {
            bail!("PUT manifest: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// Pushes `blobs` (each POST then PUT) and `manifest` as `name:tag`.
    pub async fn push_blobs_and_manifest(
        &self,
        name: &str,
        tag: &str,
        blobs: &[&Bytes],
        manifest: &Bytes,
    ) -> Result<()> {
        for b in blobs {
            self.push_monolithic(name, (*b).clone()).await?;
        }
        self.put_manifest(name, tag, manifest).await
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A response's `Location` header.
fn location_of(r: &reqwest::Response) -> Result<&str> {
    Ok(r.headers().get("location").context("no Location")?.to_str()?)
}

/// An HTTP client for tests. The workspace builds reqwest with rustls but no default crypto
/// provider (the server picks ring explicitly), so tests install ring as the default first.
pub fn http_client() -> reqwest::Client {
    http_client_with_pool(4)
}

/// [`http_client`] keeping up to `idle` connections per host (load tests want many).
pub fn http_client_with_pool(idle: usize) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().pool_max_idle_per_host(idle).build().expect("client")
}

/// An HTTP client whose connections come from `ip` (any 127.x.y.z on loopback), to act as
/// one of several client addresses.
pub fn http_client_from(ip: std::net::IpAddr) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().local_address(ip).build().expect("client")
}

/// An HTTP client that shows redirects instead of following them.
pub fn no_redirects() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// Polls `condition` until it holds (true) or `timeout` passes (false). For what a test can
/// only observe by asking again: a file appearing, a log line, a counter reaching a value.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`wait_until`] for a condition that is a request: polls without blocking the runtime
/// (an in-process server keeps answering meanwhile).
pub async fn wait_until_async<F: Future<Output = bool>>(timeout: Duration, mut condition: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// What a finished command did: whether it succeeded, and its output as text.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Runs `cmd` to its end (a command that cannot start is a test failure).
    pub fn of(cmd: &mut Command) -> Ran {
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// stdout followed by stderr, for messages and for "says X somewhere".
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the command-line program `bin` (the `tessera` binary under test) with `args`.
pub fn cli(bin: &str, args: &[&str]) -> Ran {
    Ran::of(Command::new(bin).args(args))
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

/// The HTTP status of `GET path` at `addr`, or `None` while nothing answers: a probe that
/// needs no client library and no runtime.
pub fn probe(addr: &SocketAddr, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// How long a server may take to answer its first request.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Spawns `cmd` (output to `log`) and waits until `GET path` at `addr` gets an answer that
/// is not a server error; returns the child and how long that took. It asks every
/// millisecond, so the time is a start-up measurement (the benchmarks report it).
pub fn spawn_ready(cmd: &mut Command, addr: SocketAddr, path: &str, log: &Path) -> Result<(Child, Duration)> {
    let log = std::fs::File::create(log)?;
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    loop {
        if probe(&addr, path).is_some_and(|status| status < 500) {
            return Ok((child, started.elapsed()));
        }
        if let Some(status) = child.try_wait()? {
            bail!("{cmd:?} exited with {status} before answering");
        }
        if started.elapsed() > READY_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} not answering after {READY_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A free loopback port (free when asked; the server that takes it binds it soon after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How to run a [`Distribution`].
#[derive(Default)]
pub struct DistributionSetup<'a> {
    /// The `registry` binary; Debian's `/usr/bin/docker-registry` when `None`.
    pub bin: Option<&'a Path>,
    /// Where its configuration, storage (`data`) and log go; a fresh temp dir when `None`.
    pub dir: Option<&'a Path>,
    /// Logins required, from this htpasswd file.
    pub htpasswd: Option<&'a Path>,
    /// As measured by the benchmarks: errors-only log without access log, the in-memory
    /// blob descriptor cache, no storage health check.
    pub quiet: bool,
    /// Run as a pull-through cache of this registry URL (`proxy: {remoteurl: …}`).
    pub proxy: Option<&'a str>,
    /// Its storage driver, as the YAML of the `storage:` entries (e.g. `s3: {…}`), in place
    /// of the filesystem under `data`.
    pub storage: Option<&'a str>,
}

/// Distribution (the reference registry, Debian's `docker-registry`) on a free loopback
/// port, with its own storage; killed when dropped.
pub struct Distribution {
    child: Child,
    pub addr: SocketAddr,
    /// Its storage root.
    pub data: PathBuf,
    /// How long it took to answer its first request.
    pub startup: Duration,
    root: PathBuf,
    _dir: Option<TempDir>,
}

impl Distribution {
    /// Debian's Distribution in a fresh temp dir, optionally behind an htpasswd file.
    pub fn start(htpasswd: Option<&Path>) -> Result<Distribution> {
        Self::start_with(DistributionSetup { htpasswd, ..Default::default() })
    }

    pub fn start_with(setup: DistributionSetup<'_>) -> Result<Distribution> {
        let temp = match setup.dir {
            Some(_) => None,
            None => Some(tempfile::Builder::new().prefix("tdist").tempdir()?),
        };
        let root = setup
            .dir
            .map_or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_default(), Path::to_path_buf);
        std::fs::create_dir_all(&root)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data = root.join("data");
        let auth = setup
            .htpasswd
            .map_or(String::new(), |h| format!("auth:\n  htpasswd: {{realm: test-realm, path: {}}}\n", h.display()));
        let (log, cache, health) = if setup.quiet {
            (
                "{level: error, accesslog: {disabled: true}}",
                "  cache: {blobdescriptor: inmemory}\n",
                "health: {storagedriver: {enabled: false}}\n",
            )
        } else {
            ("{level: info}", "", "")
        };
        let proxy = setup.proxy.map_or(String::new(), |url| format!("proxy: {{remoteurl: \"{url}\"}}\n"));
        let driver = match setup.storage {
            Some(yaml) => yaml.to_string(),
            None => format!("filesystem: {{rootdirectory: {}}}", data.display()),
        };
        let config = root.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {log}\nstorage:\n  {driver}\n  delete: {{enabled: true}}\n{cache}http: {{addr: \"{addr}\"}}\n{health}{auth}{proxy}",
            ),
        )?;
        let bin = setup.bin.unwrap_or(Path::new("/usr/bin/docker-registry"));
        // Its AWS SDK panics at start when AWS_CA_BUNDLE is set (LoadCustomCABundleError).
        let mut command = Command::new(bin);
        command.arg("serve").arg(&config).env_remove("AWS_CA_BUNDLE");
        let (child, startup) = spawn_ready(&mut command, addr, "/v2/", &root.join("registry.log"))
            .context("Distribution did not start")?;
        Ok(Distribution { child, addr, data, startup, root, _dir: temp })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.root.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
