//! Helpers for driving real container clients and their daemons (skopeo, podman, containerd,
//! dockerd, python oras) against a [`crate::Server`] on loopback: a loopback guard for their
//! environment, short temp dirs (unix socket paths must stay < 108 bytes), a daemon guard that
//! stops its process on drop, a wait-until-ready helper, and a parser for the server's access log.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// Proxy settings that make any attempt to reach a non-loopback host fail fast
/// (`proxyconnect tcp: dial tcp 127.0.0.1:9: connection refused`) instead of going to the
/// internet. Set on every client and daemon command; both spellings, since Go reads the upper
/// case and python `requests` prefers the lower case.
pub const LOOPBACK_GUARD: [(&str, &str); 6] = [
    ("HTTPS_PROXY", "http://127.0.0.1:9"),
    ("HTTP_PROXY", "http://127.0.0.1:9"),
    ("NO_PROXY", "127.0.0.1,127.0.0.2,127.0.0.3,localhost"),
    ("https_proxy", "http://127.0.0.1:9"),
    ("http_proxy", "http://127.0.0.1:9"),
    ("no_proxy", "127.0.0.1,127.0.0.2,127.0.0.3,localhost"),
];

/// Applies [`LOOPBACK_GUARD`] to `cmd` and gives it no stdin.
pub fn guard(cmd: &mut Command) -> &mut Command {
    cmd.envs(LOOPBACK_GUARD).env_remove("ALL_PROXY").env_remove("all_proxy").stdin(Stdio::null())
}

/// `Command::new(program)` with the loopback guard applied.
pub fn guarded(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    guard(&mut cmd);
    cmd
}

/// A temp dir directly under /tmp with a short, lowercase name (`/tmp/<prefix><8 hex>`): unix
/// sockets created inside stay well below the 108-byte path limit, and podman, which names an
/// image pulled from `oci:DIR` after DIR, accepts the path as a repository name.
pub fn short_tempdir(prefix: &str) -> Result<TempDir> {
    let mut last = None;
    for _ in 0..100 {
        let seed = crate::fresh_seed();
        let name = format!("{prefix}{:08x}", (seed ^ (seed >> 29) ^ (seed >> 48)) as u32);
        match tempfile::Builder::new().prefix(&name).rand_bytes(0).tempdir_in("/tmp") {
            Ok(dir) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map(Into::into).unwrap_or_else(|| anyhow::anyhow!("no temp dir")))
}

/// [`crate::wait_until`] for a daemon coming up: polls `check` until it returns `Ok(true)`,
/// failing when `timeout` passes or when `check` returns an error (for "the daemon died,
/// stop waiting").
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let mut failed = None;
    let done = crate::wait_until(timeout, || match check() {
        Ok(done) => done,
        Err(e) => {
            failed = Some(e);
            true
        }
    });
    if let Some(e) = failed {
        return Err(e.context(format!("while waiting until {what}")));
    }
    if !done {
        bail!("timed out after {timeout:?} waiting until {what}");
    }
    Ok(())
}

/// Runs a command, failing with its output if it does not succeed. Returns stdout as bytes
/// (for binary output such as `ctr content get`).
pub fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A background daemon (containerd, dockerd) started by a test. Dropping it stops it:
/// SIGTERM, a grace period, then SIGKILL to its process group; then any mounts left under
/// the paths given to [`Daemon::unmount_on_stop`] are removed.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    unmount: Vec<PathBuf>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` in its own process group, with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Daemon> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Daemon { name: name.into(), child, log: log.into(), unmount: Vec::new(), status: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// After the daemon stopped, unmount everything mounted at or below `path` (best effort).
    pub fn unmount_on_stop(&mut self, path: &Path) {
        self.unmount.push(path.into());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error if the daemon has exited (with its log), for use inside [`wait_until`].
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            bail!("{} exited early ({status}); log:\n{}", self.name, self.log_text());
        }
        Ok(())
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Stops the daemon: SIGTERM, up to `grace` to exit, then SIGKILL to its process group.
    /// Returns its exit status, and whether it stopped within the grace period.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        let mut clean = true;
        if self.exited().is_none() {
            signal("-TERM", &self.pid().to_string());
            if !crate::wait_until(grace, || self.exited().is_some()) {
                clean = false;
                eprintln!("{} did not stop within {grace:?} of SIGTERM; killing it", self.name);
                signal("-KILL", &format!("-{}", self.pid()));
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
            }
        }
        for path in std::mem::take(&mut self.unmount) {
            unmount_under(&path);
        }
        (self.status, clean)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(30));
    }
}

fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill").args([sig, "--", target]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Unmounts every mount point at or below `path`, deepest first (best effort, lazily).
pub fn unmount_under(path: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = path.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let _ = Command::new("umount").args(["-R", "-l", &p]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// A python interpreter that can `import module`: the one named by `env_var` if set (it must
/// work then), else `python3`. `None` (skip) when there is none, but when
/// `TESSERA_REQUIRE_CLIENTS` is set that is a failure, as in [`crate::have_tool`].
pub fn python_with_module(module: &str, env_var: &str) -> Option<PathBuf> {
    let imports = |python: &Path| {
        Command::new(python)
            .args(["-c", &format!("import {module}")])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(python) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let python = PathBuf::from(python);
        assert!(imports(&python), "{env_var}={} cannot import {module}", python.display());
        return Some(python);
    }
    let python = PathBuf::from("python3");
    if imports(&python) {
        return Some(python);
    }
    if std::env::var_os("TESSERA_REQUIRE_CLIENTS").is_some() {
        panic!(
            "python module {module} is required (TESSERA_REQUIRE_CLIENTS is set) but neither \
             {env_var} nor python3 can import it"
        );
    }
    eprintln!("SKIPPED: python module {module} is not installed (set {env_var} to a venv's python)");
    None
}

/// Decompresses a gzip stream (a pushed layer) to compare its content with a diff ID.
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).context("not gzip")?;
    Ok(out)
}

/// One request line of the server's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    /// Path and query, as the client sent them.
    pub target: String,
    pub status: u16,
}

/// The requests in a server log (`… "METHOD TARGET" STATUS LENGTH TIMEms "AGENT"` lines).
pub fn access_log(text: &str) -> Vec<Access> {
    text.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(" \"")?;
            let (request, rest) = rest.split_once('"')?;
            let (method, target) = request.split_once(' ')?;
            let status = rest.split_whitespace().next()?.parse().ok()?;
            Some(Access { method: method.into(), target: target.into(), status })
        })
        .collect()
}

/// A containerd started in `dir` with its own root, state and socket, and the snapshotter
/// this kernel supports (overlayfs, else native). Stopped when dropped.
pub struct Containerd {
    pub sock: String,
    snapshotter: &'static str,
    // Declared last: dropped (stopped) after the fields above are no longer needed.
    _daemon: Daemon,
}

impl Containerd {
    pub fn start(dir: &Path) -> Result<Containerd> {
        let d = dir.display().to_string();
        let config_file = dir.join("containerd.toml");
        std::fs::write(
            &config_file,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/ctd.sock"
[ttrpc]
  address = "{d}/ctd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )?;
        let sock = format!("{d}/ctd.sock");
        let mut daemon = Daemon::spawn(
            "containerd",
            guarded("containerd").arg("--config").arg(&config_file),
            &dir.join("containerd.log"),
        )?;
        daemon.unmount_on_stop(dir);
        wait_for("containerd answers", Duration::from_secs(30), || {
            daemon.check_alive()?;
            Ok(guarded("ctr").args(["-a", &sock, "version"]).output().is_ok_and(|o| o.status.success()))
        })?;
        let plugins = crate::run(guarded("ctr").args(["-a", &sock, "plugins", "ls"]))?;
        let overlay_ok = plugins.lines().any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() >= 4 && c[0] == "io.containerd.snapshotter.v1" && c[1] == "overlayfs" && c[3] == "ok"
        });
        let snapshotter = if overlay_ok { "overlayfs" } else { "native" };
        Ok(Containerd { sock, snapshotter, _daemon: daemon })
    }

    /// Runs `ctr` against this daemon; returns its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        crate::run(guarded("ctr").args(["-a", &self.sock]).env("CONTAINERD_SNAPSHOTTER", self.snapshotter).args(args))
    }
}

/// The packaged docker CLI (a newer /usr/local/bin/docker may shadow it on PATH).
pub const DOCKER: &str = "/usr/bin/docker";

/// Files shared by the containers/image clients (skopeo, podman): an accept-anything
/// signature policy, a registries.conf, and an empty auth file, all in one dir, so nothing
/// in /etc or $HOME is needed.
pub struct ContainersFiles {
    pub policy: PathBuf,
    pub registries: PathBuf,
    pub auth: PathBuf,
}

impl ContainersFiles {
    /// The files in `dir`, with a registries.conf marking `host` insecure (plain HTTP).
    pub fn new(dir: &Path, host: &str) -> Result<ContainersFiles> {
        let conf =
            format!("unqualified-search-registries = []\n\n[[registry]]\nlocation = \"{host}\"\ninsecure = true\n");
        ContainersFiles::with_registries_conf(dir, &conf)
    }

    /// The files in `dir`, with `registries_conf` as the registries.conf.
    pub fn with_registries_conf(dir: &Path, registries_conf: &str) -> Result<ContainersFiles> {
        let policy = dir.join("policy.json");
        std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#)?;
        let registries = dir.join("registries.conf");
        std::fs::write(&registries, registries_conf)?;
        // podman insists that REGISTRY_AUTH_FILE exists.
        let auth = dir.join("auth.json");
        std::fs::write(&auth, r#"{"auths":{}}"#)?;
        Ok(ContainersFiles { policy, registries, auth })
    }

    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("CONTAINERS_REGISTRIES_CONF", &self.registries).env("REGISTRY_AUTH_FILE", &self.auth)
    }

    /// Runs skopeo with these files; returns its stdout. Panics with its output if it fails.
    pub fn skopeo(&self, args: &[&str]) -> String {
        crate::run(self.apply(&mut guarded("skopeo")).arg("--policy").arg(&self.policy).args(args)).unwrap()
    }
}

/// Podman with its own storage and configuration in `dir`. Dropped before `dir` is removed,
/// it undoes the private bind mount the overlay driver leaves on `storage/overlay`.
pub struct Podman {
    dir: PathBuf,
    pub files: ContainersFiles,
}

impl Drop for Podman {
    fn drop(&mut self) {
        unmount_under(&self.dir);
    }
}

impl Podman {
    /// Isolated podman configuration in `dir` (storage, engine, registries, policy via HOME);
    /// `files` are the registries.conf, policy and auth file to use.
    pub fn new(dir: &Path, files: ContainersFiles) -> Result<Podman> {
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ntmp_dir = \"{d}/ptmp\"\nevents_logger = \"file\"\n\
                 image_copy_tmp_dir = \"{d}/ptmp\"\ncgroup_manager = \"cgroupfs\"\n"
            ),
        )?;
        // containers/image looks for $HOME/.config/containers/policy.json before /etc.
        let user = dir.join("home/.config/containers");
        std::fs::create_dir_all(&user)?;
        std::fs::copy(&files.policy, user.join("policy.json"))?;
        std::fs::create_dir_all(dir.join("ptmp"))?;
        Ok(Podman { dir: dir.into(), files })
    }

    /// Writes a storage.conf for `driver` (storage and run dirs in the podman dir).
    pub fn set_driver(&self, driver: &str) -> Result<()> {
        let d = self.dir.display();
        std::fs::write(
            self.dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"{driver}\"\ngraphroot = \"{d}/storage-{driver}\"\nrunroot = \"{d}/run-{driver}\"\n"
            ),
        )?;
        Ok(())
    }

    /// Native overlay where the kernel allows it, else vfs. Returns the driver in use.
    pub fn use_working_driver(&self) -> Result<String> {
        self.set_driver("overlay")?;
        let driver = match crate::run(self.cmd().args(["info", "--format", "{{.Store.GraphDriverName}}"])) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("podman: overlay storage unusable, using vfs: {e:#}");
                self.set_driver("vfs")?;
                crate::run(self.cmd().args(["info", "--format", "{{.Store.GraphDriverName}}"]))?
            }
        };
        Ok(driver.trim().to_string())
    }

    /// A guarded `podman` command with this configuration.
    pub fn cmd(&self) -> Command {
        let mut cmd = guarded("podman");
        self.files.apply(&mut cmd);
        cmd.env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("HOME", self.dir.join("home"));
        cmd
    }

    /// Runs podman; returns its stdout. Panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        crate::run(self.cmd().args(args)).unwrap()
    }
}

/// A dockerd with everything under its dir (data, exec root, socket, CLI config), started
/// with overlay2 storage, else vfs. Stopped when dropped, its mounts removed.
pub struct Dockerd {
    dir: PathBuf,
    pub driver: &'static str,
    daemon: Daemon,
}

impl Dockerd {
    /// Starts dockerd in `dir` with `daemon_json` as its config file (e.g. `{}`).
    pub fn start(dir: &Path, daemon_json: &str) -> Result<Dockerd> {
        let config = dir.join("daemon.json");
        std::fs::write(&config, daemon_json)?;
        let ready = Instant::now();
        let (daemon, driver) = match Dockerd::spawn(dir, &config, "overlay2") {
            Ok(d) => (d, "overlay2"),
            Err(e) => {
                eprintln!("dockerd with overlay2 failed, trying vfs: {e:#}");
                (Dockerd::spawn(dir, &config, "vfs")?, "vfs")
            }
        };
        eprintln!("dockerd ({driver}) ready in {:.2}s", ready.elapsed().as_secs_f64());
        Ok(Dockerd { dir: dir.into(), driver, daemon })
    }

    /// Starts dockerd with `driver`; `Err` if it dies or does not answer in 60 s.
    fn spawn(dir: &Path, config: &Path, driver: &str) -> Result<Daemon> {
        let sock = format!("unix://{}/docker.sock", dir.display());
        let data = dir.join(format!("data-{driver}"));
        let mut daemon = Daemon::spawn(
            "dockerd",
            guarded("dockerd")
                .arg("--config-file")
                .arg(config)
                .arg("--data-root")
                .arg(&data)
                .arg("--exec-root")
                .arg(dir.join("x"))
                .arg("--pidfile")
                .arg(dir.join("dockerd.pid"))
                .args(["-H", &sock])
                .args([
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-masq=false",
                    "--storage-driver",
                    driver,
                ]),
            &dir.join(format!("dockerd-{driver}.log")),
        )?;
        daemon.unmount_on_stop(&data);
        daemon.unmount_on_stop(&dir.join("x"));
        wait_for("docker version answers", Duration::from_secs(60), || {
            daemon.check_alive()?;
            Ok(docker_cmd(dir).arg("version").output().is_ok_and(|o| o.status.success()))
        })?;
        Ok(daemon)
    }

    /// A guarded docker CLI command talking to this daemon.
    pub fn cmd(&self) -> Command {
        docker_cmd(&self.dir)
    }

    /// Runs the docker CLI; returns its stdout. Panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        crate::run(self.cmd().args(args)).unwrap()
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// Stops dockerd (see [`Daemon::stop`]).
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        self.daemon.stop(grace)
    }
}

fn docker_cmd(dir: &Path) -> Command {
    let mut cmd = guarded(DOCKER);
    cmd.env("DOCKER_HOST", format!("unix://{}/docker.sock", dir.display())).env("DOCKER_CONFIG", dir.join("cli"));
    cmd
}
