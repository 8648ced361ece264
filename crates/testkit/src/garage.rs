//! A real S3-compatible object store for tests: Garage, as a single-node cluster on
//! loopback, with a bucket and a key made for the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::clients::{Daemon, output, wait_for};
use crate::{TempDir, free_port};

/// A running Garage with one bucket and a key that may read and write it.
pub struct Garage {
    daemon: Daemon,
    config: PathBuf,
    binary: PathBuf,
    /// `http://127.0.0.1:<port>`, path-style, region [`Garage::REGION`].
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    _dir: TempDir,
}

impl Garage {
    pub const REGION: &'static str = "garage";

    /// Where the Garage binary is: `TESSERA_GARAGE`, else where `.ci/run` installs it
    /// (`target/garage/bin/garage`), else `garage` on the `PATH`.
    pub fn binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("TESSERA_GARAGE") {
            return Some(path.into());
        }
        let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/garage/bin/garage");
        if installed.is_file() {
            return Some(installed);
        }
        crate::have_tool("garage").then(|| PathBuf::from("garage"))
    }

    /// A Garage for one test, or `None` (the test is skipped) where it is not installed and
    /// `TESSERA_REQUIRE_CLIENTS` is not set; where it is set, a missing Garage fails.
    pub fn for_test() -> Option<Garage> {
        let binary = Garage::binary()?;
        Some(Garage::start(&binary).expect("Garage starts"))
    }

    pub fn start(binary: &Path) -> Result<Garage> {
        let dir = crate::tempdir()?;
        let (s3, rpc, admin) = (free_port()?, free_port()?, free_port()?);
        let secret = random_hex(32);
        let token = random_hex(16);
        let root = dir.path();
        let config = root.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
                 [s3_api]\ns3_region = \"{region}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n",
                meta = root.join("meta").display(),
                data = root.join("data").display(),
                region = Garage::REGION,
            ),
        )?;
        let mut daemon = Daemon::spawn(
            "garage",
            Command::new(binary).arg("-c").arg(&config).arg("server").env("RUST_LOG", "garage=warn"),
            &root.join("garage.log"),
        )?;
        let cli = |args: &[&str]| -> Result<String> {
            let out = output(Command::new(binary).arg("-c").arg(&config).args(args))?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        };
        wait_for("garage to answer", Duration::from_secs(30), || {
            daemon.check_alive()?;
            Ok(cli(&["status"]).is_ok())
        })?;
        let node = cli(&["node", "id", "-q"])?;
        let node = node.trim().split('@').next().context("garage node id")?.to_string();
        cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        cli(&["layout", "apply", "--version", "1"])?;
        let bucket = "tessera".to_string();
        // The layout takes a moment to be in effect everywhere, bucket creation included.
        wait_for("garage to take its layout", Duration::from_secs(30), || {
            Ok(cli(&["bucket", "create", &bucket]).is_ok())
        })?;
        let key = cli(&["key", "create", "tessera-key"])?;
        let field = |name: &str| -> Result<String> {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim_start_matches([':', ' ']).trim().to_string()))
                .with_context(|| format!("no {name} in garage's answer: {key}"))
        };
        let (key_id, secret_key) = (field("Key ID")?, field("Secret key")?);
        cli(&["bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "tessera-key"])?;
        let endpoint = format!("http://127.0.0.1:{s3}");
        let garage = Garage {
            daemon,
            config,
            binary: binary.to_path_buf(),
            endpoint,
            bucket,
            key_id,
            secret: secret_key,
            _dir: dir,
        };
        wait_for("the bucket to answer", Duration::from_secs(30), || Ok(garage.reachable()))?;
        Ok(garage)
    }

    /// Whether the S3 endpoint accepts connections.
    fn reachable(&self) -> bool {
        let addr = self.endpoint.trim_start_matches("http://");
        std::net::TcpStream::connect(addr).is_ok()
    }

    /// Runs `garage` with this cluster's configuration.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = output(Command::new(&self.binary).arg("-c").arg(&self.config).args(args))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The `[storage.s3]` table that points Tessera at this bucket under `prefix`, its
    /// credentials in files written under `dir`.
    pub fn storage_toml(&self, dir: &Path, prefix: &str) -> Result<String> {
        let (id_file, secret_file) = (dir.join("s3-key-id"), dir.join("s3-secret"));
        std::fs::write(&id_file, &self.key_id)?;
        std::fs::write(&secret_file, &self.secret)?;
        Ok(format!(
            "[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\n\
             access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint,
            Garage::REGION,
            self.bucket,
            id_file.display(),
            secret_file.display()
        ))
    }

    /// Stops the server (the bucket's data stays until the Garage is dropped).
    pub fn stop(&mut self) {
        self.daemon.stop(Duration::from_secs(10));
    }

    /// Starts the stopped server again, on the same addresses and data.
    pub fn restart(&mut self) -> Result<()> {
        let log = self.config.with_file_name("garage.log");
        self.daemon = Daemon::spawn(
            "garage",
            Command::new(&self.binary).arg("-c").arg(&self.config).arg("server").env("RUST_LOG", "garage=warn"),
            &log,
        )?;
        wait_for("garage to answer again", Duration::from_secs(30), || {
            self.daemon.check_alive()?;
            Ok(self.reachable() && self.cli(&["status"]).is_ok())
        })
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if self.daemon.exited().is_none() {
            self.daemon.stop(Duration::from_secs(5));
        }
    }
}

/// `bytes` random bytes in hex, different in every process and call.
fn random_hex(bytes: usize) -> String {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        ^ u64::from(std::process::id()) << 32;
    crate::random_bytes(bytes, seed).iter().map(|b| format!("{b:02x}")).collect()
}
