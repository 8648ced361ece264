//! The servers under test, each started fresh on a free loopback port and stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Result;
use tessera_spec::Digest;
use tessera_testkit::{Distribution, DistributionSetup, free_port, spawn_ready};

use crate::Content;

/// The process behind a [`Registry`].
enum Process {
    Tessera(Child),
    Distribution(Distribution),
}

pub struct Registry {
    process: Process,
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
        let (child, startup) = spawn_ready(&mut cmd, addr, "/v2/", &dir.join("log"))?;
        Ok(Registry { process: Process::Tessera(child), addr, data, startup })
    }

    /// Distribution with filesystem storage and its in-memory blob descriptor cache.
    pub fn distribution(bin: &Path, dir: &Path) -> Result<Registry> {
        let d = Distribution::start_with(DistributionSetup {
            bin: Some(bin),
            dir: Some(dir),
            quiet: true,
            ..Default::default()
        })?;
        let (addr, data, startup) = (d.addr, d.data.clone(), d.startup);
        Ok(Registry { process: Process::Distribution(d), addr, data, startup })
    }

    /// Distribution with its `s3` storage driver on `garage`'s bucket, under `root`.
    pub fn distribution_on(
        bin: &Path,
        dir: &Path,
        garage: &tessera_testkit::garage::Garage,
        root: &str,
    ) -> Result<Registry> {
        let storage = format!(
            "s3: {{accesskey: \"{}\", secretkey: \"{}\", region: {}, regionendpoint: \"{}\", bucket: {}, \
             secure: false, v4auth: true, rootdirectory: {root}}}\n  redirect: {{disable: true}}",
            garage.key_id,
            garage.secret,
            tessera_testkit::garage::Garage::REGION,
            garage.endpoint,
            garage.bucket
        );
        let d = Distribution::start_with(DistributionSetup {
            bin: Some(bin),
            dir: Some(dir),
            quiet: true,
            storage: Some(&storage),
            ..Default::default()
        })?;
        let (addr, data, startup) = (d.addr, d.data.clone(), d.startup);
        Ok(Registry { process: Process::Distribution(d), addr, data, startup })
    }

    /// Distribution as a pull-through cache (its proxy mode) of the registry at `remote`.
    pub fn distribution_proxy(bin: &Path, dir: &Path, remote: &str) -> Result<Registry> {
        let d = Distribution::start_with(DistributionSetup {
            bin: Some(bin),
            dir: Some(dir),
            quiet: true,
            proxy: Some(remote),
            ..Default::default()
        })?;
        let (addr, data, startup) = (d.addr, d.data.clone(), d.startup);
        Ok(Registry { process: Process::Distribution(d), addr, data, startup })
    }

    /// A registry client for it, with a connection pool sized for load.
    pub fn api(&self) -> tessera_testkit::Api {
        tessera_testkit::Api::at(self.addr).with_http(tessera_testkit::http_client_with_pool(64))
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Tessera(child) => child.id(),
            Process::Distribution(d) => d.pid(),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Process::Tessera(child) = &mut self.process {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        let (child, _) = spawn_ready(&mut cmd, addr, "/manifest.json", &root.join("nginx.log"))?;
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
