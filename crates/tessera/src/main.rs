use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tessera_client::{ImageReference, PublishTarget, RegistryReference, Source, SourceImage};
use tessera_config::{AuthConfig, Config, Mode, TlsConfig};

/// Tessera: a federating OCI container registry.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text` for people, `json` (one object per line,
    /// the access log included) for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry. With no flags: http://127.0.0.1:5000, data in ./tessera-data.
    Serve(ServeArgs),
    /// Show which route a name takes and where its manifest and blobs would come from.
    Explain(ExplainArgs),
    /// Push an image's manifests and configs to a Tessera repository while its layers stay
    /// where they already are (metadata-only push).
    Push(PushArgs),
    /// Write an image's blobs and manifests in the layout a CDN origin serves.
    Publish(PublishArgs),
    /// Write images from a registry as one OCI image layout (directory, or .tar archive),
    /// to carry across an air gap.
    Export(ExportArgs),
    /// Push every image of an OCI image layout (directory or .tar) written by export.
    Import(ImportArgs),
    /// Run one pass of the [[sync]] jobs of a configuration (a running server runs them
    /// every interval_secs itself) on a data directory no server is using.
    Sync(SyncArgs),
    /// Copy an image by digest, with its index children and referrers (signatures, SBOMs):
    /// within one Tessera the server mounts its blobs (no byte is copied); between
    /// registries only what the destination lacks is sent.
    Copy(CopyArgs),
    /// Collect garbage in a data directory no server is using: links no manifest references
    /// and bytes nothing links, older than the grace period. A running server does this
    /// itself every gc_interval_secs.
    Gc(GcArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// HOST[:PORT]/NAME:TAG of each image.
    #[arg(required = true)]
    references: Vec<String>,
    /// A directory, or a file ending in .tar (an OCI archive podman load and skopeo read).
    #[arg(long, short)]
    output: PathBuf,
    /// Reach the registry over plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// USER:PASSWORD for the registry.
    #[arg(long, value_name = "USER:PASSWORD", env = "TESSERA_CREDS")]
    creds: Option<String>,
}

#[derive(clap::Args)]
struct SyncArgs {
    /// TOML configuration file with the [[sync]] jobs and their upstreams.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Only this job (by its name; repeatable) [default: every job].
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
}

#[derive(clap::Args)]
struct CopyArgs {
    /// HOST[:PORT]/NAME[:TAG|@DIGEST] to copy (with --all-tags: HOST[:PORT]/NAME).
    source: String,
    /// HOST[:PORT]/NAME[:TAG]: the tag the image gets there (`@DIGEST`: none, stored by
    /// digest only; with --all-tags: HOST[:PORT]/NAME).
    dest: String,
    /// Copy every tag of the source repository, each under the same tag.
    #[arg(long)]
    all_tags: bool,
    /// List what would be mounted, sent and stored; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Reach the registries over plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// USER:PASSWORD for both registries (--src-creds and --dest-creds override it).
    #[arg(long, value_name = "USER:PASSWORD", env = "TESSERA_CREDS")]
    creds: Option<String>,
    /// USER:PASSWORD for the source registry.
    #[arg(long, value_name = "USER:PASSWORD")]
    src_creds: Option<String>,
    /// USER:PASSWORD for the destination registry.
    #[arg(long, value_name = "USER:PASSWORD")]
    dest_creds: Option<String>,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The layout directory or .tar archive.
    input: PathBuf,
    /// HOST[:PORT] of the registry to push to.
    dest: String,
    /// Put every repository under this name prefix.
    #[arg(long)]
    prefix: Option<String>,
    /// Reach the registry over plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// USER:PASSWORD for the registry.
    #[arg(long, value_name = "USER:PASSWORD", env = "TESSERA_CREDS")]
    creds: Option<String>,
}

/// Where the source image is read from, for push and publish.
#[derive(clap::Args)]
struct SourceArgs {
    /// oci:DIR[:TAG] (an OCI image layout), docker-archive:FILE (a `docker save` tar) or
    /// docker://HOST/NAME[:TAG|@DIGEST] (another registry).
    source: String,
    /// Reach a docker:// source over plain HTTP.
    #[arg(long)]
    src_plain_http: bool,
    /// USER:PASSWORD for a docker:// source.
    #[arg(long, value_name = "USER:PASSWORD", env = "TESSERA_SRC_CREDS")]
    src_creds: Option<String>,
    /// Path of a blob under the base URL or directory: {digest}, {algorithm}, {hex},
    /// {hex2}, {name}.
    #[arg(long, default_value = tessera_client::layout::DEFAULT_BLOB_LAYOUT)]
    layout: String,
}

#[derive(clap::Args)]
struct PushArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// HOST[:PORT]/NAME[:TAG] on a Tessera server.
    dest: String,
    /// Base URL the layers already live under (e.g. https://cdn.example.com/pulp/isv-app/).
    #[arg(long, value_name = "BASE_URL")]
    blobs_at: String,
    /// Do not check with a HEAD that each layer is at its URL with the right size.
    #[arg(long)]
    no_verify: bool,
    /// Reach the destination over plain HTTP.
    #[arg(long)]
    plain_http: bool,
    /// USER:PASSWORD for the destination.
    #[arg(long, value_name = "USER:PASSWORD", env = "TESSERA_CREDS")]
    creds: Option<String>,
}

#[derive(clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Directory the CDN origin serves, or s3://BUCKET[/PREFIX] (credentials from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    dest: String,
    /// The S3-compatible endpoint for an s3:// destination (e.g. http://127.0.0.1:3900).
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// The region the store signs for.
    #[arg(long, default_value = "us-east-1", env = "AWS_REGION")]
    s3_region: String,
    /// A canned ACL for every object written to s3:// (e.g. public-read, for a bucket that
    /// clients or a CDN read anonymously).
    #[arg(long, value_name = "ACL")]
    s3_acl: Option<String>,
    /// Repository name for a {name} in --layout, and the name the image's signatures are
    /// written under in sigstore/ (the lookaside layout).
    #[arg(long, default_value = "image")]
    name: String,
}

#[derive(clap::Args)]
struct GcArgs {
    /// TOML configuration file naming the data directory and the grace period.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: the configuration's, else ./tessera-data].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Keep what changed within this many seconds [default: the configuration's
    /// gc_grace_secs]. With no push in flight, 0 reclaims everything unreferenced now.
    #[arg(long, value_name = "SECS")]
    grace_secs: Option<u64>,
    /// Also delete manifests nothing keeps: untagged, listed by no index, not a referrer
    /// of a kept manifest [default: the configuration's gc_untagged].
    #[arg(long)]
    untagged: bool,
    /// Report what a pass would delete, and delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// TOML configuration file whose routing table to use (none: everything is hosted).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The virtual host the client would use (its Host header).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// The authority containerd would send as ?ns= (e.g. docker.io).
    #[arg(long, value_name = "REGISTRY")]
    ns: Option<String>,
    /// Also ask the upstreams: which manifest they answer with and which blobs it needs.
    #[arg(long)]
    live: bool,
    /// NAME, NAME:TAG or NAME@DIGEST, as the client would request it.
    reference: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see docs/config.md). Flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for blobs, upload sessions and the SQLite metadata [default: ./tessera-data].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// PEM certificate chain; with --tls-key, serve HTTPS instead of HTTP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A Collage configuration (JSON `mappings` and `vhosts`) as the routing table: its
    /// mounts answered with redirects, as Collage does, and nothing else served.
    #[arg(long, value_name = "FILE")]
    collage: Option<PathBuf>,
    /// Require a login for every request, from the users of this htpasswd file (bcrypt);
    /// any of them may pull and push. Finer rules: [[access]] in the config file.
    #[arg(long, value_name = "FILE")]
    htpasswd: Option<PathBuf>,
    /// Serve a directory of Crane/Pulp redirect files (pulp-docker-redirect JSON, versions 2
    /// to 4) as read-only repositories; edited files take effect without a restart.
    #[arg(long, value_name = "DIR")]
    crane_dir: Option<PathBuf>,
    /// With --collage: serve the mounts through the pull-through cache instead of redirecting.
    #[arg(long, requires = "collage")]
    cache: bool,
}

impl ServeArgs {
    /// The configuration these flags describe: the file (if any), the Collage mounts (if
    /// any) as its routing table, then the flags. Called again on every reload.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(path) = &self.collage {
            let json =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let mode = if self.cache { Mode::Cache } else { Mode::Redirect };
            config = config.with_collage(&json, mode).with_context(|| path.display().to_string())?;
        }
        if let Some(dir) = &self.crane_dir {
            config.statics.push(tessera_config::StaticSource::crane(dir.clone()));
            config = config.validated()?;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data) = &self.data {
            config.data = data.clone();
        }
        if let Some(htpasswd) = &self.htpasswd {
            let template = config.auth.clone().unwrap_or_else(|| AuthConfig::new(htpasswd.clone()));
            config.auth = Some(AuthConfig { htpasswd: htpasswd.clone(), ..template });
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let (client_ca, client_auth) =
                config.tls.as_ref().map_or((None, Default::default()), |t| (t.client_ca.clone(), t.client_auth));
            config.tls = Some(TlsConfig { cert: cert.clone(), key: key.clone(), client_ca, client_auth });
        }
        Ok(config)
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

/// Errors end the program with one line naming the failure and its causes (`a: b: c`),
/// never a backtrace, whatever `RUST_BACKTRACE` says: they are answers for the person at the
/// terminal. Panics keep their backtraces: they are bugs.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // glibc gives every thread that allocates its own arena and keeps freed memory in it;
    // with 1 MiB I/O buffers passing through many blocking-pool threads that is tens of MiB
    // held for nothing. Two arenas suit this two-core target and keep RSS flat.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; mallopt only sets an allocator knob.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => {
            logs.with_target(false).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
        }
        // The event's fields at the top level, with the request span's (its id) beside them.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            let reload: Option<tessera::Reload> = (args.config.is_some() || args.collage.is_some())
                .then(|| Box::new(move || args.config()) as tessera::Reload);
            runtime.block_on(tessera::serve(config, reload, shutdown_signal()))
        }
        Command::Gc(args) => {
            let mut config = match &args.config {
                Some(path) => Config::from_file(path)?,
                None => Config::default(),
            };
            if let Some(data) = args.data {
                config.data = data;
            }
            config.storage.gc_untagged |= args.untagged;
            let grace = std::time::Duration::from_secs(args.grace_secs.unwrap_or(config.storage.gc_grace_secs));
            let done = runtime.block_on(tessera::collect_garbage(&config, grace, args.dry_run))?;
            if done.elsewhere {
                println!("another node is collecting garbage now; nothing done");
                return Ok(());
            }
            let (delete, remove) = if args.dry_run { ("would delete", "would remove") } else { ("deleted", "removed") };
            let untag = if args.dry_run { "would untag" } else { "untagged" };
            for tag in &done.tags_untagged {
                println!("retention: {untag} {tag}");
            }
            println!(
                "{untag} {} tag(s); {delete} {} untagged manifest(s); {remove} {} unreferenced link(s) and {} abandoned upload(s); {delete} {} blob(s), {} bytes",
                done.tags_untagged.len(),
                done.manifests_deleted,
                done.links_removed,
                done.uploads_removed,
                done.blobs_deleted,
                done.bytes_freed
            );
            Ok(())
        }
        Command::Explain(args) => {
            let config = match &args.config {
                Some(path) => Config::from_file(path)?,
                None => Config::default(),
            };
            let mut text = runtime.block_on(tessera::explain(
                &config,
                args.host.as_deref(),
                args.ns.as_deref(),
                &args.reference,
            ))?;
            if args.live {
                text += &runtime.block_on(tessera::explain_live(
                    &config,
                    args.host.as_deref(),
                    args.ns.as_deref(),
                    &args.reference,
                ))?;
            }
            print!("{text}");
            Ok(())
        }
        Command::Push(args) => runtime.block_on(push(args)),
        Command::Publish(args) => runtime.block_on(publish(args)),
        Command::Export(args) => runtime.block_on(async {
            let references =
                args.references.iter().map(|r| RegistryReference::parse(r)).collect::<Result<Vec<_>, _>>()?;
            let n = tessera_client::export(&references, &args.output, args.plain_http, args.creds.as_deref()).await?;
            println!("exported {n} image(s) to {}", args.output.display());
            Ok(())
        }),
        Command::Copy(args) => runtime.block_on(copy(args)),
        Command::Sync(args) => {
            let config = Config::from_file(&args.config)?;
            let reports = runtime.block_on(tessera::sync_once(&config, &args.names))?;
            let mut failed = false;
            for (name, report) in reports {
                match report {
                    Some(r) => {
                        failed |= r.failed > 0;
                        println!(
                            "{name}: {} image(s) synced, {} already in place, {} failed; {} bytes fetched",
                            r.synced, r.present, r.failed, r.bytes_fetched
                        );
                    }
                    None => {
                        failed = true;
                        println!("{name}: the pass failed (see the log)");
                    }
                }
            }
            if failed {
                anyhow::bail!("some images were not synced");
            }
            Ok(())
        }
        Command::Import(args) => runtime.block_on(async {
            let dest = tessera_client::registry_client(&args.dest, args.plain_http, args.creds.as_deref())?;
            for reference in tessera_client::import(&args.input, &dest, args.prefix.as_deref()).await? {
                println!("imported {}/{reference}", args.dest);
            }
            Ok(())
        }),
    }
}

async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    let src = RegistryReference::parse(&args.source)?;
    let dest = RegistryReference::parse(&args.dest)?;
    let options = tessera_client::CopyOptions {
        all_tags: args.all_tags,
        dry_run: args.dry_run,
        plain_http: args.plain_http,
        src_creds: args.src_creds.or_else(|| args.creds.clone()),
        dest_creds: args.dest_creds.or(args.creds),
    };
    let report = tessera_client::copy(&src, &dest, &options).await?;
    for line in &report.lines {
        println!("{line}");
    }
    let how = if report.server_side { "within the registry" } else { "through this client" };
    let done = if args.dry_run { "dry run, nothing changed" } else { "copied" };
    println!("{done} {how}: {} bytes mounted, {} bytes sent", report.bytes_mounted, report.bytes_sent);
    Ok(())
}

async fn read_source(args: &SourceArgs) -> anyhow::Result<SourceImage> {
    let source = Source::parse(&args.source)?;
    Ok(SourceImage::read(&source, args.src_plain_http, args.src_creds.as_deref()).await?)
}

async fn push(args: PushArgs) -> anyhow::Result<()> {
    let RegistryReference { host, image: ImageReference { name, reference } } = RegistryReference::parse(&args.dest)?;
    let tessera_spec::Reference::Tag(tag) = reference else {
        anyhow::bail!("the destination needs a tag, not a digest");
    };
    let image = read_source(&args.source).await?;
    let dest = tessera_client::registry_client(&host, args.plain_http, args.creds.as_deref())?;
    let report = tessera_client::push_metadata_only(
        &image,
        &dest,
        &name,
        &tag,
        &args.blobs_at,
        &args.source.layout,
        !args.no_verify,
    )
    .await?;
    println!(
        "pushed {host}/{name}:{tag} ({}): {} manifest(s), {} config(s) uploaded; {} layer(s) recorded at {}{}",
        report.top,
        report.manifests,
        report.configs,
        report.layers,
        args.blobs_at,
        if args.no_verify { " (not verified)" } else { " (each verified with a HEAD)" }
    );
    Ok(())
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let name = args.name.parse().map_err(|e: tessera_spec::OciError| anyhow::anyhow!("{}", e.message))?;
    let target =
        PublishTarget::parse(&args.dest, args.s3_endpoint.as_deref(), &args.s3_region, args.s3_acl.as_deref())?;
    if let PublishTarget::Dir(dir) = &target {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let image = read_source(&args.source).await?;
    let published = tessera_client::publish(&image, &target, &name, &args.source.layout, image.tag.as_deref()).await?;
    println!(
        "published {} into {}: {} blob(s) written, {} already there, {} manifest(s), {} signature(s)",
        image.manifests.last().map(|m| m.digest.to_string()).unwrap_or_default(),
        args.dest,
        published.written,
        published.kept,
        image.manifests.len(),
        published.signatures
    );
    Ok(())
}
