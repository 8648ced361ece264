//! A real PostgreSQL for tests: Debian's server binaries, a cluster initialised in a
//! temporary directory and listening on a loopback port, stopped when dropped. PostgreSQL
//! refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::clients::{output, wait_for};
use crate::{TempDir, free_port};

/// A running PostgreSQL cluster with a `tessera` superuser (trust authentication on
/// loopback) and a database per [`Postgres::database`] call.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
    /// The server's self-signed certificate, when it serves TLS.
    certificate: Option<PathBuf>,
    _dir: TempDir,
}

impl Postgres {
    /// Where Debian keeps the server binaries (`/usr/lib/postgresql/<version>/bin`): the
    /// newest version installed.
    pub fn binaries() -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|bin| bin.join("initdb").is_file())
            .collect();
        versions.sort();
        versions.pop()
    }

    /// A cluster for one test, or `None` (the test is skipped) where PostgreSQL is not
    /// installed and `TESSERA_REQUIRE_CLIENTS` is not set; where it is set, that fails.
    pub fn for_test() -> Option<Postgres> {
        let Some(bin) = Postgres::binaries() else {
            if std::env::var_os("TESSERA_REQUIRE_CLIENTS").is_some() {
                panic!("PostgreSQL is required (TESSERA_REQUIRE_CLIENTS is set) but not installed");
            }
            eprintln!("SKIPPED: PostgreSQL is not installed; .ci/run installs it");
            return None;
        };
        Some(Postgres::start(&bin).expect("PostgreSQL starts"))
    }

    pub fn start(bin: &Path) -> Result<Postgres> {
        Postgres::start_with(bin, false)
    }

    /// A cluster that also serves TLS, with a self-signed certificate for `127.0.0.1`
    /// ([`Postgres::certificate`]).
    pub fn start_with_tls(bin: &Path) -> Result<Postgres> {
        Postgres::start_with(bin, true)
    }

    /// The PEM certificate of the authority that issued a TLS cluster's certificate.
    pub fn certificate(&self) -> Option<&Path> {
        self.certificate.as_deref()
    }

    fn start_with(bin: &Path, tls: bool) -> Result<Postgres> {
        let dir = crate::tempdir()?;
        let certificate = if tls { Some(make_certificates(dir.path())?) } else { None };
        let as_postgres = running_as_root();
        let data = dir.path().join("data");
        if as_postgres {
            // The cluster's owner must be able to reach and write its directory.
            run(Command::new("chown").arg("-R").arg("postgres").arg(dir.path()))?;
            run(Command::new("chmod").arg("755").arg(dir.path()))?;
        }
        let port = free_port()?;
        let pg = Postgres { bin: bin.to_path_buf(), data, port, as_postgres, certificate, _dir: dir };
        pg.run_as(Command::new(pg.bin.join("initdb")).arg("-D").arg(&pg.data).args([
            "-A",
            "trust",
            "-U",
            "tessera",
            "--no-sync",
        ]))?;
        pg.restart().with_context(|| {
            let log = pg.socket_dir().join("postgres.log");
            format!("pg_ctl start; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
        })?;
        wait_for("PostgreSQL to accept connections", Duration::from_secs(30), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        Ok(pg)
    }

    fn socket_dir(&self) -> PathBuf {
        self.data.parent().expect("data has a parent").to_path_buf()
    }

    fn run_as(&self, cmd: &mut Command) -> Result<()> {
        if self.as_postgres {
            let program = cmd.get_program().to_owned();
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let mut wrapped = Command::new("runuser");
            wrapped.args(["-u", "postgres", "--"]).arg(program).args(args);
            run(&mut wrapped)
        } else {
            run(cmd)
        }
    }

    /// Creates database `name` and returns its URL.
    pub fn database(&self, name: &str) -> Result<String> {
        let psql = self.bin.join("psql");
        run(Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "tessera", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\"")))?;
        Ok(self.url(name))
    }

    /// The URL of database `name` for user `tessera`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://tessera@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server at once (`immediate`: as a crash would), keeping its data.
    pub fn stop(&self) -> Result<()> {
        self.run_as(Command::new(self.bin.join("pg_ctl")).arg("-D").arg(&self.data).args(["-m", "immediate", "stop"]))
    }

    /// Starts the server (again, after [`Postgres::stop`]) on its port.
    pub fn restart(&self) -> Result<()> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.socket_dir().display()
        );
        if let Some(ca) = &self.certificate {
            let (cert, key) = (ca.with_file_name("server.crt"), ca.with_file_name("server.key"));
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let log = self.socket_dir().join("postgres.log");
        self.run_as(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-o", &options, "-l"])
                .arg(&log)
                .args(["-w", "-t", "30", "start"]),
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A test authority (`ca.crt`) and the server certificate it issued for 127.0.0.1
/// (`server.crt`, `server.key`) in `dir`; returns the authority's certificate.
fn make_certificates(dir: &Path) -> Result<PathBuf> {
    let at = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tessera test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(at("server.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ])?;
    // PostgreSQL refuses a key others may read.
    run(Command::new("chmod").arg("600").arg(at("server.key")))?;
    Ok(at("ca.crt"))
}

fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(|_| ())
}

/// Whether this process runs as root (PostgreSQL will not).
fn running_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
}
