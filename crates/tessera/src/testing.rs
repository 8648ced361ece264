//! An in-process server for integration tests (the `testing` feature): the state opened and
//! served exactly as `tessera serve` does it (through the same private `run`), on an
//! ephemeral 127.0.0.1 port inside the test's own tokio runtime. Tests that need a separate
//! process (a kill, a restart, a signal, the log, the CLI) start the real binary instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use tessera_config::Config;
use tokio::sync::oneshot;

/// A server running in this process with its own data directory; dropping it stops the
/// server and removes the directory.
///
/// Tests that block a thread on I/O against it (a `std::net::TcpStream`) need a runtime
/// with worker threads (`#[tokio::test(flavor = "multi_thread")]`): on a current-thread
/// runtime the server would wait behind the blocked test.
pub struct InProcess {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// Its data directory (`config.data`).
    pub data: PathBuf,
    config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// The bucket every in-process server keeps its blobs in when `TESSERA_TEST_S3` holds a
/// `[storage.s3]` table (as `with-engines` sets it), each server under a fresh prefix of its
/// own; `None` (blobs under the data directory) otherwise.
fn test_bucket(unique: &str) -> anyhow::Result<Option<tessera_config::S3>> {
    let Ok(table) = std::env::var("TESSERA_TEST_S3") else { return Ok(None) };
    let mut s3 = Config::from_toml(&table)
        .map_err(anyhow::Error::msg)
        .context("TESSERA_TEST_S3")?
        .storage
        .s3
        .context("TESSERA_TEST_S3 holds no [storage.s3]")?;
    s3.prefix = format!("{}{unique}/", s3.prefix);
    Ok(Some(s3))
}

impl InProcess {
    /// The zero-configuration server, as `tessera serve` with no options.
    pub async fn start() -> anyhow::Result<InProcess> {
        Self::with_config(Config::default()).await
    }

    /// The server `toml` configures, as `tessera serve --config` with a file holding it.
    pub async fn with_toml(toml: &str) -> anyhow::Result<InProcess> {
        Self::with_config(Config::from_toml(toml).map_err(anyhow::Error::msg)?).await
    }

    /// The server `config` describes, except that it listens on a free 127.0.0.1 port and
    /// keeps its data in a fresh directory. Returns once requests are answered, or with the
    /// error that stopped the start-up.
    pub async fn with_config(mut config: Config) -> anyhow::Result<InProcess> {
        count_server_panics();
        let dir = tempfile::Builder::new().prefix("tip").tempdir().context("cannot create a data directory")?;
        let unique = dir.path().file_name().unwrap_or_default().to_string_lossy().to_ascii_lowercase();
        if config.storage.s3.is_none() {
            config.storage.s3 = test_bucket(&unique)?;
        }
        if config.storage.postgres.is_none()
            && let Ok(url) = std::env::var("TESSERA_TEST_POSTGRES")
        {
            // A schema of its own in the shared database (see `tessera_testkit::test_storage`).
            let schema = unique.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            config.storage.postgres = Some(tessera_config::Postgres {
                url: Some(url),
                url_file: None,
                schema: Some(schema),
                ca_file: None,
                changes_poll_ms: 1000,
            });
        }
        config.data = dir.path().join("data");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot listen on 127.0.0.1")?;
        config.listen = listener.local_addr()?;
        let data = config.data.clone();
        let kept = config.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, addr) = oneshot::channel();
        let mut task = tokio::spawn(crate::run(
            config,
            None,
            listener,
            move |addr| {
                let _ = ready.send(addr);
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let addr = match addr.await {
            Ok(addr) => addr,
            // `run` returned (and dropped `ready`) before serving: its error says why.
            Err(_) => {
                return Err(match (&mut task).await {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow::anyhow!("the server stopped before it was ready"),
                    Err(e) => anyhow::anyhow!("the server task failed: {e}"),
                });
            }
        };
        Ok(InProcess { addr, data, config: kept, stop: Some(stop), task, _dir: dir })
    }

    /// The hosted blob store as the server opened it (its directory or its bucket), for
    /// tests that check what is stored.
    pub async fn blobs(&self) -> anyhow::Result<std::sync::Arc<dyn tessera_store::BlobStore>> {
        crate::BlobHome::open(&self.config).await?.hosted(&self.config)
    }

    /// `host:port`, as clients write registry references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Nothing waits for a drain in a test: the stores close now.
        self.task.abort();
    }
}

static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// How many panics this process has had outside test code (a test's own failed assertion is
/// located in its file under `tests/`, or in the testkit it called): what "the server never
/// panicked" checks for a server whose log is the test's own output.
pub fn server_panics() -> usize {
    SERVER_PANICS.load(Ordering::SeqCst)
}

/// Installs, once, a panic hook that counts panics outside test code, then reports them as
/// the hook before it did.
fn count_server_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests =
                info.location().is_some_and(|l| l.file().contains("/tests/") || l.file().contains("crates/testkit/"));
            if !in_tests {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}
