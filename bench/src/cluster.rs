//! Throughput of 1, 2 and 3 Tessera nodes behind nginx on the scale-out engines (Garage,
//! PostgreSQL), and what each request costs every shared part: metadata queries and
//! object-store requests (the nodes' own counters), CPU time of the nodes, PostgreSQL,
//! Garage and nginx (from /proc). docs/scale-out.md builds its model on these figures.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use tessera_spec::Digest;
use tessera_testkit::balancer::Balancer;
use tessera_testkit::garage::Garage;
use tessera_testkit::postgres::Postgres;
use tessera_testkit::{Api, random_bytes};

use crate::load::Wrk;
use crate::servers::Registry;
use crate::{ACCEPT, Args, Better, Content, OCI_MANIFEST, Scale, Table, manifest_of};

const MOST_NODES: usize = 3;
/// Clients pushing at once in the push case.
const PUSHERS: usize = 8;
/// Writers at once in the metadata write case.
const WRITERS: usize = 16;
/// The layer too large for the nodes' in-memory blob cache: every GET reads the bucket.
const MIB_BLOB: usize = 1 << 20;

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Processes whose command name is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect()
}

/// What the shared parts have done so far.
#[derive(Clone, Copy, Default)]
struct Spent {
    queries: f64,
    writes: f64,
    object_requests: f64,
    tessera_cpu: f64,
    postgres_cpu: f64,
    garage_cpu: f64,
    nginx_cpu: f64,
}

impl Spent {
    async fn now(nodes: &[Registry]) -> Result<Spent> {
        let mut spent = Spent::default();
        for node in nodes {
            let text = node.api().get("/metrics").await?.text().await?;
            let metric =
                |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
            spent.queries += metric("tessera_metadata_queries_total ");
            spent.writes += metric("tessera_metadata_write_transactions_total ");
            spent.object_requests += metric("tessera_object_store_requests_total ");
            spent.tessera_cpu += cpu_seconds(node.pid());
        }
        let sum = |comm: &str| pids_named(comm).into_iter().map(cpu_seconds).sum::<f64>();
        spent.postgres_cpu = sum("postgres");
        spent.garage_cpu = sum("garage");
        spent.nginx_cpu = sum("nginx");
        Ok(spent)
    }

    /// What each of `requests` cost between `self` and `later`.
    fn per_request(&self, later: &Spent, requests: f64) -> Spent {
        let per = |a: f64, b: f64| (b - a).max(0.0) / requests.max(1.0);
        Spent {
            queries: per(self.queries, later.queries),
            writes: per(self.writes, later.writes),
            object_requests: per(self.object_requests, later.object_requests),
            tessera_cpu: per(self.tessera_cpu, later.tessera_cpu),
            postgres_cpu: per(self.postgres_cpu, later.postgres_cpu),
            garage_cpu: per(self.garage_cpu, later.garage_cpu),
            nginx_cpu: per(self.nginx_cpu, later.nginx_cpu),
        }
    }

    fn report(&self, table: &mut Table, case: &str) {
        table.add(format!("cost per {case}: metadata queries"), "queries", Better::Lower, self.queries, None, None);
        table.add(
            format!("cost per {case}: of which write transactions"),
            "writes",
            Better::Lower,
            self.writes,
            None,
            None,
        );
        table.add(
            format!("cost per {case}: object-store requests"),
            "requests",
            Better::Lower,
            self.object_requests,
            None,
            None,
        );
        for (part, cpu) in [
            ("Tessera", self.tessera_cpu),
            ("PostgreSQL", self.postgres_cpu),
            ("Garage", self.garage_cpu),
            ("nginx", self.nginx_cpu),
        ] {
            table.add(format!("cost per {case}: {part} CPU"), "µs", Better::Lower, cpu * 1e6, None, None);
        }
    }
}

/// Pushes small images (a config, one 4 KiB layer, a manifest) through `api` from
/// [`PUSHERS`] clients at once for `seconds`; returns how many were pushed.
async fn push_for(api: &Api, seconds: u64, round: usize) -> Result<u64> {
    let pushed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for w in 0..PUSHERS {
        let (api, pushed) = (api.clone(), pushed.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let seed = ((round * PUSHERS + w) as u64) << 32 | i;
                let config = Bytes::from(format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#));
                let layer = Bytes::from(random_bytes(4096, seed));
                let manifest = manifest_of(&config, &[&layer]);
                let name = format!("push/w{w}");
                api.push_blob(&name, &config).await?;
                api.push_blob(&name, &layer).await?;
                let r = api.push_manifest(&name, &format!("r{round}-{i}"), OCI_MANIFEST, &manifest).await?;
                anyhow::ensure!(r.status() == 201, "manifest push answered {}", r.status());
                pushed.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(pushed.load(Ordering::Relaxed))
}

/// Write transactions per second the metadata database takes, straight through the store
/// (no HTTP, no object store): [`WRITERS`] at once, each linking new blobs for `seconds`.
/// Writes take turns on one advisory lock, so this is the ceiling of every write path.
async fn metadata_writes_per_second(url: &str, seconds: u64) -> Result<f64> {
    use tessera_store::MetaStore;
    let store = Arc::new(tessera_store::PostgresMetaStore::connect(url, Some("writes"), None).await?);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, done) = (store.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let repo: tessera_spec::RepoName = format!("writes/w{w}").parse()?;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let digest = Digest::sha256_of(format!("{w}/{i}").as_bytes());
                store.link_blob(&repo, &digest, 1).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

pub async fn on_many_nodes(args: &Args, root: &Path, table: &mut Table, content: &Content) -> Result<()> {
    let scale = Scale::of(args);
    let garage_bin = Garage::binary().context("no Garage (cargo install garage --locked --root target/garage)")?;
    let pg_bin = Postgres::binaries().context("no PostgreSQL (apt-get install postgresql)")?;
    eprintln!("== starting Garage, PostgreSQL and {MOST_NODES} Tessera nodes");
    let garage = Garage::start(&garage_bin)?;
    let postgres = Postgres::start(&pg_bin)?;
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys)?;
    let url = postgres.database("tessera")?;
    let storage = format!("{}[storage.postgres]\nurl = \"{url}\"\n", garage.storage_toml(&keys, "cluster/")?);
    let nodes: Vec<Registry> = (0..MOST_NODES)
        .map(|i| Registry::tessera_with(&args.tessera, &root.join(format!("node{i}")), Some(&storage)))
        .collect::<Result<_>>()?;
    nodes[0]
        .api()
        .push_blobs_and_manifest("bench/app", "v1", &[&content.config, &content.small, &content.big], &content.manifest)
        .await?;
    let mib = Bytes::from(random_bytes(MIB_BLOB, 9));
    nodes[0].api().push_monolithic("bench/app", mib.clone()).await?;
    let mib_path = format!("/v2/bench/app/blobs/{}", Digest::sha256_of(&mib));
    let wrk = Wrk { seconds: scale.seconds };
    let tag_path = "/v2/bench/app/manifests/v1";
    let small_path = format!("/v2/bench/app/blobs/{}", Digest::sha256_of(&content.small));
    let mut one_node: Option<(f64, f64, f64, f64)> = None;
    for n in 1..=MOST_NODES {
        eprintln!("== {n} node(s) behind nginx");
        let addrs: Vec<_> = nodes[..n].iter().map(|r| r.addr).collect();
        let balancer = Balancer::start_quiet(&addrs)?;
        let api = Api::at(balancer.addr);
        // Every node's caches warm, as on a cluster that has been serving.
        for node in &nodes[..n] {
            node.api().get(tag_path).await?;
            node.api().get(&small_path).await?;
        }
        let before = Spent::now(&nodes).await?;
        let manifests = wrk.get(&balancer.url(tag_path), 64, Some(ACCEPT), false)?;
        let after_manifests = Spent::now(&nodes).await?;
        let blobs = wrk.get(&balancer.url(&small_path), 64, None, false)?;
        let after_blobs = Spent::now(&nodes).await?;
        let mibs = wrk.get(&balancer.url(&mib_path), 16, None, false)?;
        let after_mibs = Spent::now(&nodes).await?;
        let started = Instant::now();
        let pushed = push_for(&api, scale.seconds, n).await?;
        let pushes = pushed as f64 / started.elapsed().as_secs_f64();
        let after_pushes = Spent::now(&nodes).await?;
        let reference = one_node.unwrap_or((manifests.rps, blobs.rps, mibs.rps, pushes));
        let vs_one = |v: f64| (n > 1).then_some(v);
        table.add(
            format!("{n} node(s): manifest GET by tag, 64 connections"),
            "req/s",
            Better::Higher,
            manifests.rps,
            vs_one(reference.0),
            None,
        );
        table.add(
            format!("{n} node(s): 4 KiB blob GET, 64 connections"),
            "req/s",
            Better::Higher,
            blobs.rps,
            vs_one(reference.1),
            None,
        );
        table.add(
            format!("{n} node(s): 1 MiB blob GET (from the bucket), 16 connections"),
            "req/s",
            Better::Higher,
            mibs.rps,
            vs_one(reference.2),
            None,
        );
        table.add(
            format!("{n} node(s): image pushes, {PUSHERS} clients"),
            "images/s",
            Better::Higher,
            pushes,
            vs_one(reference.3),
            None,
        );
        if n == 1 {
            one_node = Some(reference);
        }
        if n == MOST_NODES {
            let seconds = scale.seconds as f64;
            before.per_request(&after_manifests, manifests.rps * seconds).report(table, "manifest GET");
            after_manifests.per_request(&after_blobs, blobs.rps * seconds).report(table, "4 KiB blob GET");
            after_blobs.per_request(&after_mibs, mibs.rps * seconds).report(table, "1 MiB blob GET");
            after_mibs.per_request(&after_pushes, pushed as f64).report(table, "image push");
        }
    }
    let writes = metadata_writes_per_second(&url, scale.seconds).await?;
    table.add(
        format!("PostgreSQL: metadata write transactions, {WRITERS} writers"),
        "writes/s",
        Better::Higher,
        writes,
        None,
        None,
    );
    Ok(())
}
