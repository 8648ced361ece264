//! The benchmark harness: Tessera against Distribution (`docker-registry`) and nginx serving
//! the same blob files, on loopback, in one run. Prints one table with Tessera's ratio to
//! each, and optionally writes it as JSON. See BENCHMARKS.md.

mod cluster;
mod load;
mod servers;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Parser;
use serde::Serialize;
use tessera_spec::{Digest, Digester};
use tessera_testkit::random_bytes;

use crate::load::{RssSampler, Wrk};
use crate::servers::{Nginx, Registry};

#[derive(Parser)]
#[command(about = "Benchmark Tessera against Distribution and nginx on loopback")]
struct Args {
    /// The tessera binary to measure (a release build).
    #[arg(long, default_value = "target/release/tessera")]
    tessera: PathBuf,
    /// The Distribution binary.
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    distribution: PathBuf,
    /// Seconds of load per request-rate case.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// A quick run with small sizes and 1 s cases: checks the harness, not the numbers.
    #[arg(long)]
    smoke: bool,
    /// Also write the table as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Only the pulls through the cache (cold and warm, against Distribution's proxy): for
    /// iterating on the cache's path.
    #[arg(long)]
    pulls_only: bool,
    /// Only the web pages of a registry of 10,000 repositories and 10,000 tags in one.
    #[arg(long)]
    pages_only: bool,
    /// Where Tessera keeps its data: `fs` (the embedded default: the full table), `s3pg`
    /// (blobs in Garage, metadata in PostgreSQL, against Distribution on the same Garage),
    /// or `cluster` (1, 2 and 3 nodes on Garage and PostgreSQL behind nginx, and what each
    /// request costs every part).
    #[arg(long, default_value = "fs", value_parser = ["fs", "s3pg", "cluster"])]
    backend: String,
}

/// Sizes of one run.
struct Scale {
    seconds: u64,
    big_blob: usize,
    push_blob: usize,
    chunk: usize,
    rss_push: u64,
    small_images: usize,
    many: usize,
}

impl Scale {
    fn of(args: &Args) -> Scale {
        if args.smoke {
            Scale {
                seconds: 1,
                big_blob: 8 << 20,
                push_blob: 32 << 20,
                chunk: 8 << 20,
                rss_push: 128 << 20,
                small_images: 20,
                many: 200,
            }
        } else {
            Scale {
                seconds: args.seconds,
                big_blob: 64 << 20,
                push_blob: 256 << 20,
                chunk: 8 << 20,
                rss_push: 2 << 30,
                small_images: 100,
                many: 10_000,
            }
        }
    }
}

#[derive(Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Better {
    Higher,
    Lower,
}

/// One row of the table.
#[derive(Serialize)]
struct Figure {
    case: String,
    unit: &'static str,
    better: Better,
    tessera: f64,
    distribution: Option<f64>,
    nginx: Option<f64>,
}

impl Figure {
    /// Tessera's advantage: above 1 means Tessera is better, whichever way the unit points.
    fn ratio(&self, other: Option<f64>) -> Option<f64> {
        let o = other?;
        if o == 0.0 || self.tessera == 0.0 {
            return None;
        }
        Some(match self.better {
            Better::Higher => self.tessera / o,
            Better::Lower => o / self.tessera,
        })
    }
}

struct Table(Vec<Figure>);

impl Table {
    fn add(
        &mut self,
        case: impl Into<String>,
        unit: &'static str,
        better: Better,
        t: f64,
        d: Option<f64>,
        n: Option<f64>,
    ) {
        let f = Figure { case: case.into(), unit, better, tessera: t, distribution: d, nginx: n };
        eprintln!("  {:<48} tessera {:>10} distribution {:>10} nginx {:>10}", f.case, fmt(t), opt(d), opt(n));
        self.0.push(f);
    }

    /// Prints the table and writes it as JSON where asked.
    fn finish(&self, args: &Args) -> Result<()> {
        self.print();
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&self.0)?)?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }

    fn print(&self) {
        println!();
        println!(
            "| {:<50} | {:>12} | {:>12} | {:>12} | {:>9} | {:>9} |",
            "case", "Tessera", "Distribution", "nginx", "T vs D", "T vs nginx"
        );
        println!("|{:-<52}|{:->14}|{:->14}|{:->14}|{:->11}|{:->11}|", "", "", "", "", "", "");
        for f in &self.0 {
            let ratio = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}×"));
            println!(
                "| {:<50} | {:>12} | {:>12} | {:>12} | {:>9} | {:>9} |",
                format!("{} ({})", f.case, f.unit),
                fmt(f.tessera),
                opt(f.distribution),
                opt(f.nginx),
                ratio(f.ratio(f.distribution)),
                ratio(f.ratio(f.nginx)),
            );
        }
        println!();
        println!("Ratios are Tessera's advantage: above 1× Tessera is better (faster, more requests, less memory).");
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), fmt)
}

/// The content every server gets: one image with a 4 KiB and a large layer.
struct Content {
    config: Bytes,
    small: Bytes,
    big: Bytes,
    manifest: Bytes,
}

impl Content {
    fn generate(big: usize) -> Content {
        let config = Bytes::from(r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
        let small = Bytes::from(random_bytes(4096, 1));
        let big = Bytes::from(random_bytes(big, 2));
        let manifest = manifest_of(&config, &[&small, &big]);
        Content { config, small, big, manifest }
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Runs `jobs` futures produced by `make(i)`, `width` at a time.
async fn concurrently<F, Fut>(jobs: usize, width: usize, make: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    use futures_util::StreamExt;
    let mut results = futures_util::stream::iter((0..jobs).map(make)).buffer_unordered(width);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

fn require(program: &str, package: &str) -> Result<()> {
    let found =
        std::process::Command::new("sh").arg("-c").arg(format!("command -v {program}")).output()?.status.success();
    if !found {
        bail!("{program} not found; install the Debian package {package} (bench/run does)");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scale = Scale::of(&args);
    require("wrk", "wrk")?;
    require("nginx", "nginx-light")?;
    if !args.distribution.exists() {
        bail!("{} not found; install the Debian package docker-registry", args.distribution.display());
    }
    if !args.tessera.exists() {
        bail!("{} not found; build it with cargo build --release -p tessera", args.tessera.display());
    }
    let dir = tempfile_dir()?;
    let root = dir.path();
    eprintln!("== generating content");
    let content = Content::generate(scale.big_blob);
    let mut table = Table(Vec::new());
    if args.backend == "s3pg" {
        on_the_scale_out_engines(&args, root, &mut table, &content).await?;
        return table.finish(&args);
    }
    if args.backend == "cluster" {
        cluster::on_many_nodes(&args, root, &mut table, &content).await?;
        return table.finish(&args);
    }

    if args.pages_only {
        pages_at_scale(&args, root, &mut table, &content, &Wrk { seconds: scale.seconds }).await?;
        return table.finish(&args);
    }

    eprintln!("== start-up to first 200 on /v2/ (median of 5)");
    let t_start = servers::median_startup(|i| Registry::tessera(&args.tessera, &root.join(format!("start-t{i}"))), 5)?;
    let d_start =
        servers::median_startup(|i| Registry::distribution(&args.distribution, &root.join(format!("start-d{i}"))), 5)?;
    table.add("start-up to first 200 on /v2/", "ms", Better::Lower, t_start, Some(d_start), None);

    let tessera = Registry::tessera(&args.tessera, &root.join("tessera"))?;
    let distribution = Registry::distribution(&args.distribution, &root.join("distribution"))?;
    let t = tessera.api();
    let d = distribution.api();
    if args.pulls_only {
        let first = Bytes::from(random_bytes(scale.push_blob, 3));
        t.push_monolithic("bench/mono", first.clone()).await?;
        d.push_monolithic("bench/mono", first.clone()).await?;
        pulls_through_the_cache(&args, root, &mut table, [&tessera, &distribution], first).await?;
        return table.finish(&args);
    }

    eprintln!("== pushing the same image into both");
    for c in [&t, &d] {
        c.push_blobs_and_manifest(
            "bench/app",
            "v1",
            &[&content.config, &content.small, &content.big],
            &content.manifest,
        )
        .await?;
    }
    let nginx = Nginx::start(root, &tessera.data, &content)?;
    let manifest_digest = Digest::sha256_of(&content.manifest);
    let small_digest = Digest::sha256_of(&content.small);
    let big_digest = Digest::sha256_of(&content.big);

    eprintln!("== request rates");
    let wrk = Wrk { seconds: scale.seconds };
    let t_rss = RssSampler::start(tessera.pid());
    let d_rss = RssSampler::start(distribution.pid());
    let tag_path = "/v2/bench/app/manifests/v1";
    let (tr, dr, nr) = (
        wrk.get(&tessera.url(tag_path), 32, Some(ACCEPT), false)?,
        wrk.get(&distribution.url(tag_path), 32, Some(ACCEPT), false)?,
        wrk.get(&nginx.url("/manifest.json"), 32, None, false)?,
    );
    table.add("manifest GET by tag, 32 connections", "req/s", Better::Higher, tr.rps, Some(dr.rps), Some(nr.rps));
    table.add(
        "manifest GET by tag, 32 connections: p99",
        "ms",
        Better::Lower,
        tr.p99_ms,
        Some(dr.p99_ms),
        Some(nr.p99_ms),
    );
    let digest_path = format!("/v2/bench/app/manifests/{manifest_digest}");
    let (tr, dr, nr) = (
        load::head_rate(tessera.addr, &digest_path, ACCEPT, 32, scale.seconds).await?,
        load::head_rate(distribution.addr, &digest_path, ACCEPT, 32, scale.seconds).await?,
        load::head_rate(nginx.addr, "/manifest.json", ACCEPT, 32, scale.seconds).await?,
    );
    table.add("manifest HEAD by digest, 32 connections", "req/s", Better::Higher, tr, Some(dr), Some(nr));
    let small_path = format!("/v2/bench/app/blobs/{small_digest}");
    let (tr, dr, nr) = (
        wrk.get(&tessera.url(&small_path), 32, None, false)?,
        wrk.get(&distribution.url(&small_path), 32, None, false)?,
        wrk.get(&nginx.url("/small.blob"), 32, None, false)?,
    );
    table.add("4 KiB blob GET, 32 connections", "req/s", Better::Higher, tr.rps, Some(dr.rps), Some(nr.rps));
    let big_path = format!("/v2/bench/app/blobs/{big_digest}");
    let (tr, dr, nr) = (
        wrk.get(&tessera.url(&big_path), 4, None, false)?,
        wrk.get(&distribution.url(&big_path), 4, None, false)?,
        wrk.get(&nginx.url("/big.blob"), 4, None, false)?,
    );
    let size_name = if scale.big_blob >= 1 << 20 {
        format!("{} MiB", scale.big_blob >> 20)
    } else {
        format!("{} B", scale.big_blob)
    };
    table.add(
        format!("{size_name} blob GET, 4 connections"),
        "GB/s",
        Better::Higher,
        tr.gbps,
        Some(dr.gbps),
        Some(nr.gbps),
    );
    let (t_peak, d_peak) = (t_rss.stop(), d_rss.stop());
    table.add("peak RSS during the GET load", "MiB", Better::Lower, t_peak, Some(d_peak), None);

    // Federated delivery: a blob GET answered with a signed redirect to a CDN should cost
    // no more than a manifest GET (both are a metadata lookup and a small answer).
    eprintln!("== redirected blob GETs (CDN delivery, signed)");
    let cdn = Registry::tessera_with(
        &args.tessera,
        &root.join("cdn"),
        Some(
            "[[delivery]]\nprefix = \"bench\"\ndeliver = \"cdn\"\ncdn = \"https://cdn.example/pulp/\"\n\
             token = { kind = \"secure_link_md5\", secret = \"bench\" }\n",
        ),
    )?;
    cdn.api()
        .push_blobs_and_manifest(
            "bench/app",
            "v1",
            &[&content.config, &content.small],
            &manifest_of(&content.config, &[&content.small]),
        )
        .await?;
    let redirect = wrk.get(&cdn.url(&small_path), 32, None, false)?;
    let manifest = wrk.get(&cdn.url(tag_path), 32, Some(ACCEPT), false)?;
    table.add(
        "blob GET answered with a signed CDN redirect, 32 connections",
        "req/s",
        Better::Higher,
        redirect.rps,
        None,
        None,
    );
    table.add(
        "redirected blob GET / manifest GET, same server",
        "x",
        Better::Higher,
        redirect.rps / manifest.rps,
        None,
        None,
    );
    drop(cdn);

    // Signature checks are remembered per rule, name, tag and digest: under a requiring
    // [[signatures]] rule, a pull of a signed image should cost about what it costs without.
    eprintln!("== manifest GETs under a requiring [[signatures]] rule");
    let signer = tessera_testkit::cosign::CosignKey::new("bench");
    let key = signer.write_public(root, "bench-cosign");
    let signing = Registry::tessera_with(
        &args.tessera,
        &root.join("signing"),
        Some(&format!(
            "[[signatures]]\nprefix = \"signed\"\nkeys = [{key:?}]\n\n[[signatures]]\nprefix = \"unsigned\"\nkeys = [{key:?}]\n"
        )),
    )?;
    let small_manifest = manifest_of(&content.config, &[&content.small]);
    let api = signing.api();
    for name in ["signed/app", "open/app"] {
        api.push_blobs_and_manifest(name, "v1", &[&content.config, &content.small], &small_manifest).await?;
    }
    let signature = signer.sign(&Digest::sha256_of(&small_manifest), &format!("{}/signed/app", signing.addr), false);
    let sig_tag = tessera_testkit::cosign::signature_tag(&Digest::sha256_of(&small_manifest));
    api.push_blobs_and_manifest("signed/app", &sig_tag, &signature.blobs(), &signature.manifest).await?;
    for (name, expected) in [("signed/app", 200), ("unsigned/app", 403)] {
        if name == "unsigned/app" {
            api.push_blobs_and_manifest(name, "v1", &[&content.config, &content.small], &small_manifest).await?;
        }
        let status = api.get(&format!("/v2/{name}/manifests/v1")).await?.status();
        anyhow::ensure!(status == expected, "{name} under the requiring rule answered {status}");
    }
    let signed = wrk.get(&signing.url("/v2/signed/app/manifests/v1"), 32, Some(ACCEPT), false)?;
    let open = wrk.get(&signing.url("/v2/open/app/manifests/v1"), 32, Some(ACCEPT), false)?;
    table.add(
        "manifest GET by tag under a requiring [[signatures]] rule, 32 connections",
        "req/s",
        Better::Higher,
        signed.rps,
        None,
        None,
    );
    table.add(
        "manifest GET with a requiring rule / without, same server",
        "x",
        Better::Higher,
        signed.rps / open.rps,
        None,
        None,
    );
    drop(signing);

    pages_at_scale(&args, root, &mut table, &content, &wrk).await?;

    eprintln!("== pushes");
    let push_blob = Bytes::from(random_bytes(scale.push_blob, 3));
    let mb = scale.push_blob >> 20;
    let tt = timed(t.push_monolithic("bench/mono", push_blob.clone())).await?;
    let dt = timed(d.push_monolithic("bench/mono", push_blob.clone())).await?;
    table.add(format!("monolithic push {mb} MiB (POST + PUT)"), "s", Better::Lower, tt, Some(dt), None);
    let chunk = push_blob.slice(..scale.chunk);
    let chunked_blob = Bytes::from(random_bytes(scale.push_blob, 4));
    let tt = timed(t.push_in_chunks("bench/chunked", &chunked_blob, scale.chunk)).await?;
    let dt = timed(d.push_in_chunks("bench/chunked", &chunked_blob, scale.chunk)).await?;
    table.add(
        format!("chunked push {mb} MiB in {} MiB PATCHes", scale.chunk >> 20),
        "s",
        Better::Lower,
        tt,
        Some(dt),
        None,
    );

    let images: Vec<(Bytes, Bytes, Bytes)> = (0..scale.small_images).map(|i| small_image(i as u64)).collect();
    let mut times = Vec::new();
    for c in [&t, &d] {
        let started = Instant::now();
        concurrently(images.len(), 8, |i| {
            let (config, layer, manifest) = images[i].clone();
            let c = c.clone();
            async move { c.push_blobs_and_manifest(&format!("bench/small{i}"), "v1", &[&config, &layer], &manifest).await }
        })
        .await?;
        times.push(started.elapsed().as_secs_f64());
    }
    table.add(
        format!("{} small images pushed by 8 clients", scale.small_images),
        "s",
        Better::Lower,
        times[0],
        Some(times[1]),
        None,
    );

    pulls_through_the_cache(&args, root, &mut table, [&tessera, &distribution], push_blob).await?;

    eprintln!("== RSS across a {} MiB push", scale.rss_push >> 20);
    let mut growth = Vec::new();
    let mut peaks = Vec::new();
    for (c, reg) in [(&t, &tessera), (&d, &distribution)] {
        let before = load::rss_mib(reg.pid()).unwrap_or(0.0);
        let sampler = RssSampler::start(reg.pid());
        c.push_chunked("bench/huge", &chunk, scale.rss_push).await?;
        let peak = sampler.stop();
        peaks.push(peak);
        growth.push(peak - before);
    }
    table.add(
        format!("peak RSS during a {} MiB push", scale.rss_push >> 20),
        "MiB",
        Better::Lower,
        peaks[0],
        Some(peaks[1]),
        None,
    );
    table.add(
        format!("RSS growth during a {} MiB push", scale.rss_push >> 20),
        "MiB",
        Better::Lower,
        growth[0].max(0.01),
        Some(growth[1].max(0.01)),
        None,
    );

    eprintln!("== tags list of {} tags, catalog of {} repositories", scale.many, scale.many);
    let empty = Bytes::from_static(b"{}");
    let empty_digest = Digest::sha256_of(&empty);
    let artifact = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.bench",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest.to_string(), "size": 2},
            "layers": [],
        }))
        .expect("json"),
    );
    for c in [&t, &d] {
        c.push_blobs_and_manifest("bench/tags", "t0", &[&empty], &artifact).await?;
        concurrently(scale.many, 8, |i| {
            let c = c.clone();
            let artifact = artifact.clone();
            async move { c.put_manifest("bench/tags", &format!("t{i:05}"), &artifact).await }
        })
        .await?;
        concurrently(scale.many, 8, |i| {
            let c = c.clone();
            let artifact = artifact.clone();
            let empty_digest = empty_digest.clone();
            async move {
                let name = format!("many/r{i:05}");
                c.mount(&name, &empty_digest, "bench/tags").await?;
                c.put_manifest(&name, "v1", &artifact).await
            }
        })
        .await?;
    }
    let (tr, dr) = (
        wrk.get(&tessera.url("/v2/bench/tags/tags/list"), 8, None, false)?,
        wrk.get(&distribution.url("/v2/bench/tags/tags/list"), 8, None, false)?,
    );
    table.add(format!("tags list of {} tags", scale.many), "req/s", Better::Higher, tr.rps, Some(dr.rps), None);
    // Distribution caps a catalog page at 1000 entries; both are asked for that page size.
    let (tr, dr) = (
        wrk.get(&tessera.url("/v2/_catalog?n=1000"), 8, None, false)?,
        wrk.get(&distribution.url("/v2/_catalog?n=1000"), 8, None, false)?,
    );
    table.add(
        format!("catalog page of 1000 (of {}+ repositories)", scale.many),
        "req/s",
        Better::Higher,
        tr.rps,
        Some(dr.rps),
        None,
    );

    drop(nginx);
    table.finish(&args)
}

/// Cold and warm pulls of `first` (already in both registries as `bench/mono`) and of fresh
/// blobs through Tessera's cache and Distribution's proxy, both in front of `distribution`.
/// Tessera with blobs in Garage and metadata in PostgreSQL, against Distribution with its
/// `s3` driver on the same Garage, and against Tessera on the filesystem default for what
/// the object store costs.
async fn on_the_scale_out_engines(args: &Args, root: &Path, table: &mut Table, content: &Content) -> Result<()> {
    use tessera_testkit::garage::Garage;
    use tessera_testkit::postgres::Postgres;
    let scale = Scale::of(args);
    let garage_bin = Garage::binary()
        .ok_or_else(|| anyhow::anyhow!("no Garage (cargo install garage --locked --root target/garage)"))?;
    let pg_bin = Postgres::binaries().ok_or_else(|| anyhow::anyhow!("no PostgreSQL (apt-get install postgresql)"))?;
    eprintln!("== starting Garage and PostgreSQL");
    let garage = Garage::start(&garage_bin)?;
    let postgres = Postgres::start(&pg_bin)?;
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys)?;
    let storage = format!(
        "{}[storage.postgres]\nurl = \"{}\"\n",
        garage.storage_toml(&keys, "tessera/")?,
        postgres.database("tessera")?
    );
    let tessera = Registry::tessera_with(&args.tessera, &root.join("tessera-s3pg"), Some(&storage))?;
    let distribution = Registry::distribution_on(&args.distribution, &root.join("dist-s3"), &garage, "/dist")?;
    let plain = Registry::tessera(&args.tessera, &root.join("tessera-fs"))?;
    let (t, d, f) = (tessera.api(), distribution.api(), plain.api());

    eprintln!("== pushing the same image into all three");
    for c in [&t, &d, &f] {
        c.push_blobs_and_manifest(
            "bench/app",
            "v1",
            &[&content.config, &content.small, &content.big],
            &content.manifest,
        )
        .await?;
    }
    let wrk = Wrk { seconds: scale.seconds };
    let tag_path = "/v2/bench/app/manifests/v1";
    let (tr, dr, fr) = (
        wrk.get(&tessera.url(tag_path), 32, Some(ACCEPT), false)?,
        wrk.get(&distribution.url(tag_path), 32, Some(ACCEPT), false)?,
        wrk.get(&plain.url(tag_path), 32, Some(ACCEPT), false)?,
    );
    table.add("S3+PG: manifest GET by tag, 32 connections", "req/s", Better::Higher, tr.rps, Some(dr.rps), None);
    table.add("S3+PG: manifest GET by tag, 32 connections: p99", "ms", Better::Lower, tr.p99_ms, Some(dr.p99_ms), None);
    let big_path = format!("/v2/bench/app/blobs/{}", Digest::sha256_of(&content.big));
    let mb = scale.big_blob >> 20;
    let (tb, db, fb) = (
        wrk.get(&tessera.url(&big_path), 4, None, false)?,
        wrk.get(&distribution.url(&big_path), 4, None, false)?,
        wrk.get(&plain.url(&big_path), 4, None, false)?,
    );
    table.add(format!("S3+PG: {mb} MiB blob GET, 4 connections"), "GB/s", Better::Higher, tb.gbps, Some(db.gbps), None);

    eprintln!("== pushes");
    let push_blob = Bytes::from(random_bytes(scale.push_blob, 3));
    let push_mb = scale.push_blob >> 20;
    let tt = timed(t.push_monolithic("bench/mono", push_blob.clone())).await?;
    let dt = timed(d.push_monolithic("bench/mono", push_blob.clone())).await?;
    let ft = timed(f.push_monolithic("bench/mono", push_blob.clone())).await?;
    table.add(format!("S3+PG: monolithic push {push_mb} MiB (POST + PUT)"), "s", Better::Lower, tt, Some(dt), None);
    let chunked = Bytes::from(random_bytes(scale.push_blob, 4));
    let tc = timed(t.push_in_chunks("bench/chunked", &chunked, scale.chunk)).await?;
    let dc = timed(d.push_in_chunks("bench/chunked", &chunked, scale.chunk)).await?;
    let fc = timed(f.push_in_chunks("bench/chunked", &chunked, scale.chunk)).await?;
    table.add(
        format!("S3+PG: chunked push {push_mb} MiB in {} MiB PATCHes", scale.chunk >> 20),
        "s",
        Better::Lower,
        tc,
        Some(dc),
        None,
    );
    // What the engines cost: the same Tessera on its filesystem default, in the reference
    // column of these rows.
    table.add("S3+PG vs filesystem: manifest GET, 32 connections", "req/s", Better::Higher, tr.rps, Some(fr.rps), None);
    table.add(format!("S3+PG vs filesystem: {mb} MiB blob GET"), "GB/s", Better::Higher, tb.gbps, Some(fb.gbps), None);
    table.add(format!("S3+PG vs filesystem: monolithic push {push_mb} MiB"), "s", Better::Lower, tt, Some(ft), None);
    table.add(format!("S3+PG vs filesystem: chunked push {push_mb} MiB"), "s", Better::Lower, tc, Some(fc), None);
    Ok(())
}

async fn pulls_through_the_cache(
    args: &Args,
    root: &Path,
    table: &mut Table,
    [tessera, distribution]: [&Registry; 2],
    first: Bytes,
) -> Result<()> {
    let scale = Scale::of(args);
    let mb = scale.push_blob >> 20;
    let (t, d) = (tessera.api(), distribution.api());
    // A pull is a GET whose bytes the client verifies as they arrive, as every client does.
    eprintln!("== pulls through the cache: Tessera in front of Distribution");
    let mirror = Registry::tessera_with(
        &args.tessera,
        &root.join("mirror"),
        Some(&format!(
            "[[upstream]]\nname = \"dist\"\nurl = \"{}\"\n\n[[route]]\nprefix = \"m\"\nto = \"dist\"\n",
            distribution.base()
        )),
    )?;
    // Each cold pull needs a blob the cache has never seen; single 256 MiB pulls vary by a
    // half from one to the next on this machine, so each number is a median of PULL_RUNS.
    const PULL_RUNS: usize = 3;
    let mut cold_blobs = vec![Digest::sha256_of(&first)];
    for i in 1..PULL_RUNS {
        let blob = Bytes::from(random_bytes(scale.push_blob, 10 + i as u64));
        d.push_monolithic("bench/mono", blob.clone()).await?;
        cold_blobs.push(Digest::sha256_of(&blob));
    }
    // The anchor: Distribution's own pull-through proxy of the same upstream.
    let proxy = Registry::distribution_proxy(&args.distribution, &root.join("dproxy"), &distribution.base())?;
    let (mut cold, mut direct, mut rss_growth) = (Vec::new(), Vec::new(), 0f64);
    let (mut cold_cpu, mut proxy_cold, mut proxy_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for digest in &cold_blobs {
        let path = format!("/v2/bench/mono/blobs/{digest}");
        timed_pull(&d.http, &distribution.url(&path), digest).await?; // page cache warm, as for every later read
        direct.push(timed_pull(&d.http, &distribution.url(&path), digest).await?);
        let before = load::rss_mib(mirror.pid()).unwrap_or(0.0);
        let sampler = RssSampler::start(mirror.pid());
        let cached = mirror.data.join("cache/dist/blobs/sha256").join(&digest.hex()[..2]).join(digest.hex());
        let window = Window::start();
        let (time, cpu) =
            cpu_timed_pull(&t.http, &mirror, &format!("/v2/m/bench/mono/blobs/{digest}"), digest, &cached).await?;
        window.end("cold pull through Tessera's cache");
        cold.push(time);
        cold_cpu.push(cpu);
        rss_growth = rss_growth.max(sampler.stop() - before);
        let stored =
            proxy.data.join("docker/registry/v2/blobs/sha256").join(&digest.hex()[..2]).join(digest.hex()).join("data");
        let window = Window::start();
        let (time, cpu) = cpu_timed_pull(&d.http, &proxy, &path, digest, &stored).await?;
        window.end("cold pull through Distribution's proxy");
        proxy_cold.push(time);
        proxy_cpu.push(cpu);
    }
    let mono = &cold_blobs[0];
    let (mut warm, mut hosted, mut proxy_warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PULL_RUNS {
        warm.push(timed_pull(&t.http, &mirror.url(&format!("/v2/m/bench/mono/blobs/{mono}")), mono).await?);
        hosted.push(timed_pull(&t.http, &tessera.url(&format!("/v2/bench/mono/blobs/{mono}")), mono).await?);
        proxy_warm.push(timed_pull(&d.http, &proxy.url(&format!("/v2/bench/mono/blobs/{mono}")), mono).await?);
    }
    drop(proxy);
    table.add(
        format!("cold {mb} MiB blob pull through the cache (vs Distribution's proxy), median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(cold.clone()),
        Some(median(proxy_cold)),
        None,
    );
    table.add(
        format!("CPU-seconds of the server per cold {mb} MiB pull (vs Distribution's proxy), median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(cold_cpu),
        Some(median(proxy_cpu)),
        None,
    );
    table.add(
        format!("warm {mb} MiB blob pull through the cache (vs Distribution's proxy), median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(warm.clone()),
        Some(median(proxy_warm)),
        None,
    );
    table.add(
        format!("cold {mb} MiB blob pull through the cache (vs direct from Distribution), median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(cold),
        Some(median(direct)),
        None,
    );
    table.add(
        format!("warm {mb} MiB blob pull through the cache, median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(warm),
        None,
        None,
    );
    table.add(
        format!("hosted {mb} MiB blob pull, median of {PULL_RUNS}"),
        "s",
        Better::Lower,
        median(hosted),
        None,
        None,
    );
    table.add(
        format!("RSS growth during a cold {mb} MiB pull through the cache (largest)"),
        "MiB",
        Better::Lower,
        rss_growth.max(0.01),
        None,
        None,
    );
    drop(mirror);
    Ok(())
}

/// An OCI image manifest for a config and layers.
fn manifest_of(config: &Bytes, layers: &[&Bytes]) -> Bytes {
    let descriptor = |media_type: &str, bytes: &Bytes| serde_json::json!({ "mediaType": media_type, "digest": Digest::sha256_of(bytes).to_string(), "size": bytes.len() });
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        }))
        .expect("json"),
    )
}

fn small_image(seed: u64) -> (Bytes, Bytes, Bytes) {
    let config = Bytes::from(format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#));
    let layer = Bytes::from(random_bytes(64 * 1024, 1000 + seed));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(&config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": Digest::sha256_of(&layer).to_string(), "size": layer.len()}],
    }))
    .expect("json");
    (config, layer, Bytes::from(manifest))
}

/// Seconds to pull a blob as a client does: GET `url`, hashing the body as it arrives, and
/// check it against `digest`.
async fn timed_pull(http: &reqwest::Client, url: &str, digest: &Digest) -> Result<f64> {
    use futures_util::StreamExt;
    let started = Instant::now();
    let response = http.get(url).send().await?;
    if response.status() != 200 {
        bail!("GET {url}: {}", response.status());
    }
    let mut digester = Digester::new(digest.algorithm());
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        digester.update(&chunk?);
    }
    if &digester.finish() != digest {
        bail!("GET {url}: wrong bytes");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A [`timed_pull`] from `server`, with the CPU-seconds the server spent on it until it
/// holds the blob at `stored` (a cache finishes storing after its reader is served; the
/// warm pulls start only then).
async fn cpu_timed_pull(
    http: &reqwest::Client,
    server: &Registry,
    path: &str,
    digest: &Digest,
    stored: &Path,
) -> Result<(f64, f64)> {
    let cpu = || load::cpu_seconds(server.pid()).ok_or_else(|| anyhow::anyhow!("no CPU time for {}", server.pid()));
    let before = cpu()?;
    let machine_before = load::machine_cpu_seconds();
    let time = timed_pull(http, &server.url(path), digest).await?;
    if let (Some((busy0, stolen0)), Some((busy1, stolen1))) = (machine_before, load::machine_cpu_seconds()) {
        // Whether the pull was bound by the machine's cores rather than by waiting.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        eprintln!(
            "  during the pull: {:.2} of {cores} cores busy, {:.2} stolen",
            (busy1 - busy0) / time,
            (stolen1 - stolen0) / time
        );
    }
    if !tessera_testkit::wait_until_async(Duration::from_secs(60), || std::future::ready(stored.exists())).await {
        bail!("{} never stored {digest}", server.base());
    }
    Ok((time, cpu()? - before))
}

/// The wall-clock span of one case, printed in the form `perf report --time` takes, so that
/// a system-wide profile (`perf record -a -k realtime`) of a run can be cut to that case.
struct Window(SystemTime);

impl Window {
    fn start() -> Window {
        Window(SystemTime::now())
    }

    fn end(self, case: &str) {
        let at = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        eprintln!("  window {:.6},{:.6} {case}", at(self.0), at(SystemTime::now()));
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

async fn timed(f: impl Future<Output = Result<()>>) -> Result<f64> {
    let started = Instant::now();
    f.await?;
    Ok(started.elapsed().as_secs_f64())
}

fn tempfile_dir() -> Result<tessera_testkit::TempDir> {
    Ok(tessera_testkit::tempdir()?)
}

/// The web pages of a registry of 10,000 repositories, one of which has 10,000 tags: the
/// time to each page (one connection, so the mean time per request is the server's time
/// to render it plus loopback), against the issue's bound of 100 ms.
async fn pages_at_scale(
    args: &Args,
    root: &std::path::Path,
    table: &mut Table,
    content: &Content,
    wrk: &Wrk,
) -> Result<()> {
    const REPOSITORIES: usize = 10_000;
    const TAGS: usize = 10_000;
    eprintln!("== pages of {REPOSITORIES} repositories and {TAGS} tags in one");
    let pages = Registry::tessera(&args.tessera, &root.join("pages"))?;
    let api = pages.api();
    let manifest = manifest_of(&content.config, &[&content.small]);
    api.push_blobs_and_manifest("seed/app", "v1", &[&content.config, &content.small], &manifest).await?;
    let (config, small) = (Digest::sha256_of(&content.config), Digest::sha256_of(&content.small));
    // Sixteen at a time: each repository mounts the two blobs and gets the manifest.
    let work: Vec<_> = (0..REPOSITORIES).collect();
    for chunk in work.chunks(16) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let (api, manifest, config, small) = (api.clone(), manifest.clone(), config.clone(), small.clone());
            tasks.spawn(async move {
                let name = format!("team{:02}/app{i:05}", i % 50);
                api.mount(&name, &config, "seed/app").await?;
                api.mount(&name, &small, "seed/app").await?;
                api.put_manifest(&name, "v1", &manifest).await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
    }
    let tags: Vec<_> = (0..TAGS).collect();
    for chunk in tags.chunks(16) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let (api, manifest) = (api.clone(), manifest.clone());
            tasks.spawn(async move { api.put_manifest("seed/app", &format!("build-{i:05}"), &manifest).await });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
    }
    let last_page = TAGS.div_ceil(50);
    for (what, path) in [
        ("page: routes (/)", "/".to_string()),
        ("page: repositories, first of 10,000", "/ui/repositories".to_string()),
        ("page: repositories, a name searched among 10,000", "/ui/repositories?q=app04321".to_string()),
        ("page: a repository of 10,000 tags, newest 50", "/ui/r/seed/app".to_string()),
        ("page: a repository of 10,000 tags, oldest page", format!("/ui/r/seed/app?page={last_page}")),
        ("page: an image with where each blob comes from", "/ui/r/seed/app/-/v1".to_string()),
        ("page: operations", "/ui/operations".to_string()),
    ] {
        let r = wrk.get(&pages.url(&path), 1, None, false)?;
        table.add(what, "ms", Better::Lower, 1000.0 / r.rps, None, None);
    }
    Ok(())
}
