//! Torture tests against the real binary: kills mid-push, a full disk, an upstream that
//! breaks its answers, and (in [`load`]) a login flood, floods of distinct keys and a
//! connection flood. Each is bounded in time and records one line of figures; they run
//! one at a time (they use the whole machine), run by `tests/torture/run`.
//!
//! A new test takes [`SERIAL`] for its whole length, keeps within a time bound
//! ([`bounded`]), and ends with [`record`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tessera_spec::Digest;
use tessera_testkit::chaos::Chaos;
use tessera_testkit::disk::{SmallDisk, files_under};
use tessera_testkit::{Api, Distribution, Server, fresh_seed, random_bytes, wait_until};

#[path = "torture/load.rs"]
mod load;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Held by each test for its whole length: the tests measure and use a lot of the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the figures of a run gather (`tests/torture/run` prints them).
fn figures_file() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("torture-figures.txt")
}

/// Reports a test's figures: on stderr, and as a line of the figures file.
fn record(name: &str, figures: &str) {
    let line = format!("TORTURE {name}: {figures}");
    eprintln!("{line}");
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(figures_file()).expect("open the figures file");
    writeln!(file, "{line}").expect("write the figures file");
}

/// Runs `f`, failing the test if it takes longer than `limit`: a hang is a failure too.
async fn bounded<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what} took longer than {limit:?}"),
    }
}

/// A seeded xorshift: the choices of a run can be replayed from its printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `[lo, hi)`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// An image of random blobs (not tars: a registry does not look inside layers).
#[derive(Clone)]
struct TestImage {
    repo: String,
    tag: String,
    config: Bytes,
    layers: Vec<Bytes>,
    manifest: Bytes,
}

impl TestImage {
    fn new(repo: &str, tag: &str, layers: Vec<Bytes>, seed: u64) -> TestImage {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "seed": seed.to_string() } },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))
        .expect("json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::sha256_of(&config).to_string(),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": Digest::sha256_of(l).to_string(),
                "size": l.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("json");
        TestImage { repo: repo.into(), tag: tag.into(), config: config.into(), layers, manifest: manifest.into() }
    }

    /// Layers of random sizes: some empty, some tiny, most up to `max` bytes.
    fn random(repo: &str, tag: &str, rng: &mut Rng, layers: u64, max: u64) -> TestImage {
        let n = rng.range(1, layers + 1);
        let layers = (0..n)
            .map(|_| {
                let size = match rng.range(0, 8) {
                    0 => 0,
                    1 | 2 => rng.range(1, 4096),
                    3..=5 => rng.range(4096, max / 6),
                    _ => rng.range(max / 6, max),
                };
                Bytes::from(random_bytes(size as usize, rng.next()))
            })
            .collect();
        TestImage::new(repo, tag, layers, rng.next())
    }

    fn blobs(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    fn digest(&self) -> Digest {
        Digest::sha256_of(&self.manifest)
    }

    fn size(&self) -> u64 {
        self.blobs().map(|b| b.len() as u64).sum::<u64>() + self.manifest.len() as u64
    }
}

/// Why a push did not finish: the connection broke (a killed server), or the registry
/// answered something other than what the protocol says.
#[derive(Debug)]
enum Failure {
    Transport(String),
    /// The status, what was asked, and the answer's body.
    Status(u16, String, String),
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Failure {
        Failure::Transport(format!("{e:?}"))
    }
}

async fn expect(r: reqwest::Response, status: u16, what: &str) -> Result<reqwest::Response, Failure> {
    if r.status() == status {
        return Ok(r);
    }
    let code = r.status().as_u16();
    Err(Failure::Status(code, what.to_string(), r.text().await.unwrap_or_default()))
}

fn location(api: &Api, r: &reqwest::Response) -> Result<String, Failure> {
    let l = r.headers().get("location").and_then(|v| v.to_str().ok());
    Ok(api.absolute(l.ok_or_else(|| Failure::Status(r.status().as_u16(), "no Location".into(), String::new()))?))
}

/// The ways a blob goes up.
#[derive(Clone, Copy, Debug)]
enum How {
    /// `POST ?digest=` with the body: one request.
    Monolithic,
    /// `POST`, then `PUT ?digest=` with the body.
    PostPut,
    /// `POST`, `PATCH`es of `n` chunks, `PUT ?digest=`.
    Chunked(u64),
}

/// A chunked upload cut short after the registry acknowledged `acked` bytes.
struct Interrupted {
    repo: String,
    location: String,
    data: Bytes,
    acked: u64,
}

async fn push_blob(
    api: &Api,
    repo: &str,
    data: &Bytes,
    how: How,
    interrupted: &Mutex<Vec<Interrupted>>,
) -> Result<(), Failure> {
    let digest = Digest::sha256_of(data);
    let uploads = api.url(&format!("/v2/{repo}/blobs/uploads/"));
    match how {
        How::Monolithic => {
            let r = api.http.post(format!("{uploads}?digest={digest}")).body(data.clone()).send().await?;
            if r.status() == 202 {
                // A registry may open a session instead (Distribution does): the body goes again.
                let r = api.http.put(Api::with_digest(&location(api, &r)?, &digest)).body(data.clone()).send().await?;
                expect(r, 201, "PUT after POST ?digest=").await?;
            } else {
                expect(r, 201, "POST ?digest=").await?;
            }
        }
        How::PostPut => {
            let r = expect(api.http.post(&uploads).send().await?, 202, "POST").await?;
            let at = location(api, &r)?;
            let r = api.http.put(Api::with_digest(&at, &digest)).body(data.clone()).send().await?;
            expect(r, 201, "PUT").await?;
        }
        How::Chunked(n) => {
            let r = expect(api.http.post(&uploads).send().await?, 202, "POST").await?;
            let mut at = location(api, &r)?;
            let piece = data.len().div_ceil(n as usize).max(1);
            let mut offset = 0;
            while offset < data.len() {
                let end = (offset + piece).min(data.len());
                let sent = api
                    .http
                    .patch(&at)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("{offset}-{}", end - 1))
                    .body(data.slice(offset..end))
                    .send()
                    .await;
                let r = match sent {
                    Ok(r) => expect(r, 202, "PATCH").await?,
                    Err(e) => {
                        // Resumable when the registry acknowledged bytes already: then the
                        // offset it reports cannot be confused with an empty session.
                        if offset > 0 {
                            let (repo, location, data) = (repo.to_string(), at, data.clone());
                            let acked = offset as u64;
                            interrupted.lock().unwrap().push(Interrupted { repo, location, data, acked });
                        }
                        return Err(e.into());
                    }
                };
                at = location(api, &r)?;
                offset = end;
            }
            let r = api.http.put(Api::with_digest(&at, &digest)).send().await?;
            expect(r, 201, "closing PUT").await?;
        }
    }
    Ok(())
}

async fn push_image(
    api: &Api,
    image: &TestImage,
    rng: &mut Rng,
    interrupted: &Mutex<Vec<Interrupted>>,
) -> Result<(), Failure> {
    for blob in image.blobs() {
        let how = match rng.range(0, 3) {
            0 if blob.len() >= 64 => How::Chunked(rng.range(2, 6)),
            0 | 1 => How::Monolithic,
            _ => How::PostPut,
        };
        push_blob(api, &image.repo, blob, how, interrupted).await?;
    }
    let r = api
        .http
        .put(api.url(&format!("/v2/{}/manifests/{}", image.repo, image.tag)))
        .header("content-type", OCI_MANIFEST)
        .body(image.manifest.clone())
        .send()
        .await?;
    expect(r, 201, "PUT manifest").await?;
    Ok(())
}

/// What is wrong with `image` as the registry at `api` serves it under `prefix` (`None`:
/// nothing, every byte and digest is right). Also returns the bytes read.
async fn check_image(api: &Api, prefix: &str, image: &TestImage) -> (Option<String>, u64) {
    let name = format!("{prefix}{}", image.repo);
    let mut read = 0;
    let r = api
        .http
        .get(api.url(&format!("/v2/{name}/manifests/{}", image.tag)))
        .header("accept", OCI_MANIFEST)
        .send()
        .await;
    let manifest = match r {
        Ok(r) if r.status() == 200 => {
            let header = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
            if header != Some(image.digest().to_string()) {
                return (Some(format!("{name}:{} has digest header {header:?}", image.tag)), read);
            }
            r.bytes().await
        }
        Ok(r) => return (Some(format!("{name}:{} answers {}", image.tag, r.status())), read),
        Err(e) => return (Some(format!("{name}:{}: {e}", image.tag)), read),
    };
    match manifest {
        Ok(m) if m == image.manifest => read += m.len() as u64,
        other => return (Some(format!("{name}:{} manifest differs: {other:?}", image.tag)), read),
    }
    for blob in image.blobs() {
        let d = Digest::sha256_of(blob);
        match api.get(&format!("/v2/{name}/blobs/{d}")).await {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(b) if Digest::sha256_of(&b) == d => read += b.len() as u64,
                Ok(b) => return (Some(format!("{name} blob {d}: {} wrong bytes", b.len())), read),
                Err(e) => return (Some(format!("{name} blob {d}: {e}")), read),
            },
            Ok(r) => return (Some(format!("{name} blob {d} answers {}", r.status())), read),
            Err(e) => return (Some(format!("{name} blob {d}: {e}")), read),
        }
    }
    (None, read)
}

/// Checks every image, a few at a time; returns what is wrong and the bytes read.
async fn check_all(api: &Api, prefix: &str, images: &[TestImage]) -> (Vec<String>, u64) {
    let results: Vec<_> = futures_util::stream::iter(images.iter().map(|i| check_image(api, prefix, i)))
        .buffer_unordered(4)
        .collect()
        .await;
    let wrong = results.iter().filter_map(|(w, _)| w.clone()).collect();
    (wrong, results.iter().map(|(_, n)| n).sum())
}

/// Every file of a blob store (`<root>/blobs/sha256/<xx>/<hex>`) whose bytes do not hash to
/// its name; and how many files were checked (one deleted meanwhile, evicted, is not).
fn half_written_blobs(root: &Path) -> (Vec<PathBuf>, usize) {
    let (mut bad, mut checked) = (Vec::new(), 0);
    for f in files_under(&root.join("blobs/sha256")) {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match std::fs::read(&f) {
            Ok(b) if Digest::sha256_of(&b).hex() == name => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            _ => bad.push(f.clone()),
        }
        checked += 1;
    }
    (bad, checked)
}

/// Finishes an interrupted chunked upload from the offset the registry reports for it.
async fn resume(api: &Api, cut: &Interrupted) -> Result<(), String> {
    let r = api.http.get(&cut.location).send().await.map_err(|e| e.to_string())?;
    if r.status() != 204 {
        return Err(format!("GET on the session answers {}", r.status()));
    }
    let range = r.headers().get("range").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let offset = range
        .strip_prefix("0-")
        .and_then(|end| end.parse::<u64>().ok())
        .map(|end| end + 1)
        .ok_or_else(|| format!("session range {range:?}"))?;
    if offset < cut.acked || offset > cut.data.len() as u64 {
        return Err(format!("session holds {offset} bytes; {} were acknowledged of {}", cut.acked, cut.data.len()));
    }
    let mut at = cut.location.clone();
    if offset < cut.data.len() as u64 {
        let r = api
            .http
            .patch(&at)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{}", cut.data.len() - 1))
            .body(cut.data.slice(offset as usize..))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != 202 {
            return Err(format!("PATCH from {offset} answers {}", r.status()));
        }
        at = api.absolute(r.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or(&at));
    }
    let digest = Digest::sha256_of(&cut.data);
    let r = api.http.put(Api::with_digest(&at, &digest)).send().await.map_err(|e| e.to_string())?;
    if r.status() != 201 {
        return Err(format!("closing PUT answers {}", r.status()));
    }
    let r = api.get(&format!("/v2/{}/blobs/{digest}", cut.repo)).await.map_err(|e| e.to_string())?;
    match r.bytes().await {
        Ok(b) if b == cut.data => Ok(()),
        _ => Err("the finished blob reads back wrong".into()),
    }
}

/// Six clients push (chunked, monolithic, POST+PUT; blobs of 0 bytes to 3 MiB) while the
/// server is SIGKILLed at a random moment, round after round. After each restart every
/// image the registry acknowledged pulls back byte for byte, no blob file is half written,
/// and chunked uploads cut short resume from the offset the registry reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistency() {
    let _serial = SERIAL.lock().await;
    const ROUNDS: usize = 8;
    const CLIENTS: usize = 6;
    let seed = fresh_seed();
    eprintln!("crash_consistency: seed {seed}");
    let mut rng = Rng::new(seed);
    let mut server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let mut acknowledged: Vec<TestImage> = Vec::new();
    let (mut checked, mut resumed, mut blob_files) = (0, 0, 0);
    let (mut lost, mut not_resumed) = (Vec::new(), Vec::new());
    bounded(Duration::from_secs(90), "crash_consistency", async {
        for round in 0..ROUNDS {
            let acked = Arc::new(Mutex::new(Vec::new()));
            let interrupted = Arc::new(Mutex::new(Vec::new()));
            let unexpected = Arc::new(Mutex::new(Vec::new()));
            let clients: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let (api, acked, interrupted, unexpected) =
                        (api.clone(), acked.clone(), interrupted.clone(), unexpected.clone());
                    let mut rng = Rng::new(rng.next());
                    tokio::spawn(async move {
                        for n in 0.. {
                            let repo = format!("crash/c{c}");
                            let image = TestImage::random(&repo, &format!("r{round}-{n}"), &mut rng, 3, 3 << 20);
                            match push_image(&api, &image, &mut rng, &interrupted).await {
                                Ok(()) => acked.lock().unwrap().push(image),
                                Err(Failure::Transport(_)) => return,
                                Err(Failure::Status(status, what, body)) => {
                                    unexpected.lock().unwrap().push(format!("{what}: {status} {body}"));
                                    return;
                                }
                            }
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(rng.range(100, 800))).await;
            server.kill();
            for c in clients {
                bounded(Duration::from_secs(10), "a client after the kill", c).await.unwrap();
            }
            let unexpected = unexpected.lock().unwrap().clone();
            assert!(unexpected.is_empty(), "round {round}: answers no client should get: {unexpected:?}");
            server.restart().unwrap();
            acknowledged.append(&mut acked.lock().unwrap());

            let (wrong, _) = check_all(&api, "", &acknowledged).await;
            checked += acknowledged.len();
            lost.extend(wrong.into_iter().map(|w| format!("round {round}: {w}")));
            let (bad, files) = half_written_blobs(&server.data);
            assert!(bad.is_empty(), "round {round}: blob files that do not hash to their names: {bad:?}");
            blob_files += files;
            let cuts = std::mem::take(&mut *interrupted.lock().unwrap());
            for cut in &cuts {
                match resume(&api, cut).await {
                    Ok(()) => resumed += 1,
                    Err(e) => not_resumed.push(format!("round {round}: {} cut at {}: {e}", cut.location, cut.acked)),
                }
            }
        }
    })
    .await;
    let total: u64 = acknowledged.iter().map(TestImage::size).sum();
    record(
        "crash_consistency",
        &format!(
            "rounds={ROUNDS} acknowledged={} ({} MiB) checked={checked} lost={} resumed_uploads={resumed} not_resumed={} blob_files_hashed={blob_files} seed={seed}",
            acknowledged.len(),
            total >> 20,
            lost.len(),
            not_resumed.len()
        ),
    );
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert!(not_resumed.is_empty(), "interrupted uploads that did not resume: {not_resumed:#?}");
    assert!(acknowledged.len() >= ROUNDS, "too few acknowledged pushes to mean anything: {}", acknowledged.len());
    assert!(resumed >= 1, "no interrupted chunked upload was resumed in {ROUNDS} rounds");
}

/// Whether a push was refused cleanly: 503 or 507 with an OCI error body.
fn is_clean_refusal(status: u16, body: &str) -> bool {
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    (status == 503 || status == 507) && body["errors"][0]["code"].is_string()
}

/// The status of a clean refusal (see [`is_clean_refusal`]), or what was answered instead.
async fn clean_refusal(r: reqwest::Response) -> Result<u16, String> {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    if is_clean_refusal(status, &body) { Ok(status) } else { Err(format!("{status} {body}")) }
}

/// Pushes against a full disk get a clean refusal and lose nothing acknowledged before;
/// pulls keep working while full; freeing space lets pushes in again. Then a pull-through
/// cache whose disk is full still serves pulls of blobs it cannot keep, and keeps them
/// once it has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full() {
    let _serial = SERIAL.lock().await;
    let Some(disk) = SmallDisk::for_test("40m") else {
        record("disk_full", "skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let seed = fresh_seed();
    eprintln!("disk_full: seed {seed}");
    let mut rng = Rng::new(seed);
    bounded(Duration::from_secs(60), "disk_full", async {
        let server = Server::start_in(BIN, Some(&disk.path().join("data")), &[]).unwrap();
        let api = Api::new(&server);
        let mut acknowledged = Vec::new();
        for n in 0..3 {
            let image = TestImage::random("full/app", &format!("early{n}"), &mut rng, 3, 1 << 20);
            push_image(&api, &image, &mut rng, &Mutex::default()).await.unwrap();
            acknowledged.push(image);
        }
        // Leave a little room, then push until the disk refuses.
        let filled = disk.fill();
        std::fs::OpenOptions::new()
            .write(true)
            .open(disk.filler())
            .and_then(|f| f.set_len(filled.saturating_sub(3 << 20)))
            .unwrap();
        let mut refusals: BTreeMap<u16, usize> = BTreeMap::new();
        for n in 0.. {
            let image = TestImage::random("full/app", &format!("more{n}"), &mut rng, 2, 1 << 20);
            let pushed = bounded(Duration::from_secs(30), "a push to a full disk", async {
                push_image(&api, &image, &mut rng, &Mutex::default()).await
            })
            .await;
            match pushed {
                Ok(()) => acknowledged.push(image),
                Err(Failure::Status(status, what, body)) => {
                    assert!(is_clean_refusal(status, &body), "a push past the limit, {what}: {status} {body}");
                    *refusals.entry(status).or_default() += 1;
                    break;
                }
                Err(Failure::Transport(e)) => panic!("a push past the limit broke the connection: {e}"),
            }
            assert!(n < 50, "the disk never filled");
        }
        let before_full = acknowledged.len();
        // More refusals, each way a push arrives: in one request, in chunks, a manifest.
        let big = Bytes::from(random_bytes(4 << 20, rng.next()));
        let d = Digest::sha256_of(&big);
        for how in 0..3 {
            let r = match how {
                0 => api.http.post(api.url(&format!("/v2/full/app/blobs/uploads/?digest={d}"))).body(big.clone()),
                1 => {
                    let r = api.http.post(api.url("/v2/full/app/blobs/uploads/")).send().await.unwrap();
                    if r.status() != 202 {
                        *refusals.entry(clean_refusal(r).await.unwrap()).or_default() += 1;
                        continue;
                    }
                    let at = location(&api, &r).unwrap();
                    api.http.patch(at).header("content-range", format!("0-{}", big.len() - 1)).body(big.clone())
                }
                _ => {
                    // A manifest of blobs already held: only metadata to write.
                    let image = &acknowledged[0];
                    api.http
                        .put(api.url("/v2/full/app/manifests/late"))
                        .header("content-type", OCI_MANIFEST)
                        .body(image.manifest.clone())
                }
            };
            let r = bounded(Duration::from_secs(30), "a refused push", r.send()).await.unwrap();
            if how == 2 && r.status() == 201 {
                // Metadata may still fit: then it is stored, and must pull back like the rest.
                let mut late = acknowledged[0].clone();
                late.tag = "late".into();
                acknowledged.push(late);
                continue;
            }
            *refusals.entry(clean_refusal(r).await.unwrap()).or_default() += 1;
        }
        let refused: usize = refusals.values().sum();
        // Everything acknowledged pulls back while the disk is full.
        let (wrong, pulled_while_full) = check_all(&api, "", &acknowledged).await;
        assert!(wrong.is_empty(), "while full: {wrong:#?}");
        disk.free();
        let image = TestImage::random("full/app", "after", &mut rng, 3, 1 << 20);
        push_image(&api, &image, &mut rng, &Mutex::default()).await.expect("a push once space is free");
        acknowledged.push(image);
        let (wrong, _) = check_all(&api, "", &acknowledged).await;
        assert!(wrong.is_empty(), "after freeing space: {wrong:#?}");
        let (bad, _) = half_written_blobs(&server.data);
        assert!(bad.is_empty(), "{bad:?}");
        drop(server);

        let cache_pulls = full_cache(&disk, &mut rng).await;
        let refusals: Vec<String> = refusals.iter().map(|(s, n)| format!("{s}x{n}")).collect();
        record(
            "disk_full",
            &format!(
                "acknowledged_before_full={before_full} refused_pushes={refused} ({}) pulled_while_full={}KiB cache_pulls_served_while_full={cache_pulls} seed={seed}",
                refusals.join(","),
                pulled_while_full >> 10
            ),
        );
    })
    .await;
}

/// A pull-through cache with its data on the full `disk`, in front of Distribution: blobs
/// it cannot keep are still served, right; once there is room a pull keeps them. Returns
/// how many pulls (manifests and blobs) were served while full.
async fn full_cache(disk: &SmallDisk, rng: &mut Rng) -> usize {
    let upstream = Distribution::start(None).unwrap();
    let layers = [3 << 20, 300_000, 10].map(|n| Bytes::from(random_bytes(n, rng.next())));
    let image = TestImage::new("lib/app", "v1", layers.to_vec(), rng.next());
    push_image(&Api::at(upstream.addr), &image, rng, &Mutex::default()).await.unwrap();
    let data = disk.path().join("cache-data");
    let config = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror/up\"\nto = \"up\"\n",
        upstream.addr
    );
    let config_file = disk.path().join("mirror.toml");
    std::fs::write(&config_file, config).unwrap();
    let mirror = Server::start_in(BIN, Some(&data), &["--config", config_file.to_str().unwrap()]).unwrap();
    let api = Api::new(&mirror);
    let cached = |d: &Digest| data.join("cache/up/blobs/sha256").join(&d.hex()[..2]).join(d.hex()).exists();
    let filled = disk.fill();
    let mut served = 0;
    // Full, then with 1 MiB of room: a fill that breaks part way, its readers already sent
    // some bytes.
    for room in [0, 1 << 20] {
        let filler = std::fs::OpenOptions::new().write(true).open(disk.filler()).unwrap();
        filler.set_len(filled - room).unwrap();
        // The manifest, by tag and by digest, which the cache cannot record either.
        let digest = Digest::sha256_of(&image.manifest);
        for reference in ["v1".to_string(), digest.to_string()] {
            let r = api.get(&format!("/v2/mirror/up/lib/app/manifests/{reference}")).await.unwrap();
            assert_eq!(r.status(), 200, "manifest {reference} through a full cache: {}", mirror.log_text());
            assert_eq!(r.bytes().await.unwrap(), image.manifest, "manifest {reference} through a full cache");
            served += 1;
        }
        for blob in image.blobs() {
            let d = Digest::sha256_of(blob);
            let r = bounded(
                Duration::from_secs(30),
                "a cache pull on a full disk",
                api.get(&format!("/v2/mirror/up/lib/app/blobs/{d}")),
            )
            .await
            .unwrap();
            assert_eq!(r.status(), 200, "blob {d} ({} bytes) through a full cache: {}", blob.len(), mirror.log_text());
            let body =
                r.bytes().await.unwrap_or_else(|e| panic!("blob {d} ({} bytes) through a full cache: {e}", blob.len()));
            assert_eq!(Digest::sha256_of(&body), d, "blob {d} through a full cache");
            served += 1;
        }
    }
    let big = image.blobs().max_by_key(|b| b.len()).unwrap();
    assert!(!cached(&Digest::sha256_of(big)), "a {} byte blob was kept on a full disk", big.len());
    disk.free();
    let (wrong, _) = check_all(&api, "mirror/up/", std::slice::from_ref(&image)).await;
    assert!(wrong.is_empty(), "{wrong:?}");
    for blob in image.blobs() {
        let d = Digest::sha256_of(blob);
        assert!(wait_until(Duration::from_secs(10), || cached(&d)), "blob {d} kept once there is room");
    }
    let (bad, _) = half_written_blobs(&data.join("cache/up"));
    assert!(bad.is_empty(), "{bad:?}");
    served
}

/// What one pull through the chaos got.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Right,
    /// An error status, or a transfer that broke before its end.
    Clean(String),
    Wrong(String),
}

/// A pull a client may make: a path, maybe a range of it, and the bytes it must get.
struct Target {
    path: String,
    range: Option<(usize, usize)>,
    expected: Bytes,
}

async fn pull(api: &Api, target: &Target) -> Outcome {
    let Target { path, range, expected } = target;
    let mut request = api.http.get(api.url(path)).header("accept", OCI_MANIFEST);
    if let Some((start, end)) = range {
        request = request.header("range", format!("bytes={start}-{}", end - 1));
    }
    let want = if range.is_some() { 206 } else { 200 };
    let r = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Wrong(format!("{path}: cannot connect: {e}")),
        Err(_) => return Outcome::Clean("broken before the head".into()),
    };
    let status = r.status().as_u16();
    if status != want {
        // The upstream has all of it: "not found" would be a lie.
        return match status {
            404 => Outcome::Wrong(format!("{path}: 404")),
            s if s >= 500 => Outcome::Clean(s.to_string()),
            s => Outcome::Wrong(format!("{path}: {s}")),
        };
    }
    // A range carries the whole blob's digest; a whole answer is checked against its own.
    let header = r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
    let digest_ok = range.is_some() || header.as_ref().is_none_or(|h| *h == Digest::sha256_of(expected).to_string());
    match r.bytes().await {
        Err(_) => Outcome::Clean("broken body".into()),
        Ok(body) if body == expected && digest_ok => Outcome::Right,
        Ok(body) => Outcome::Wrong(format!(
            "{path} {range:?}: {status} with {} bytes (expected {}), digest {header:?}",
            body.len(),
            expected.len()
        )),
    }
}

/// An upstream whose answers break every way (resets, stalls, truncation, lying sizes,
/// flipped bytes): every pull through the cache is right or fails cleanly, never a
/// complete answer with wrong bytes, and nothing wrong is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_chaos() {
    let _serial = SERIAL.lock().await;
    const PULLS: usize = 400;
    let seed = fresh_seed();
    eprintln!("upstream_chaos: seed {seed}");
    let mut rng = Rng::new(seed);
    let upstream = Distribution::start(None).unwrap();
    let mut images = Vec::new();
    for n in 0..4 {
        let sizes = [rng.range(1 << 20, 3 << 20), rng.range(4096, 300_000), rng.range(0, 100)];
        let layers = sizes.iter().map(|&n| Bytes::from(random_bytes(n as usize, rng.next()))).collect();
        let image = TestImage::new(&format!("lib/app{n}"), "v1", layers, rng.next());
        push_image(&Api::at(upstream.addr), &image, &mut rng, &Mutex::default()).await.unwrap();
        images.push(image);
    }
    let chaos = Chaos::start(upstream.addr, rng.next()).await.unwrap();
    // Tags revalidated on every pull, and a cache of 1 MiB: the large blobs are evicted
    // after each fetch, so most pulls meet the upstream (and its faults) again.
    let mirror = Server::with_config(
        BIN,
        &format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\ncache = {{ tag_ttl_secs = 0, max_bytes = 1048576 }}\n\n[[route]]\nprefix = \"mirror/up\"\nto = \"up\"\n",
            chaos.addr
        ),
    )
    .unwrap();
    let api = Api::new(&mirror);
    // Every pull a client may make: manifests by tag and digest, blobs whole and in part.
    let mut targets: Vec<Target> = Vec::new();
    for image in &images {
        let name = format!("mirror/up/{}", image.repo);
        for reference in [image.tag.clone(), image.digest().to_string()] {
            let path = format!("/v2/{name}/manifests/{reference}");
            targets.push(Target { path, range: None, expected: image.manifest.clone() });
        }
        for blob in image.blobs() {
            let path = format!("/v2/{name}/blobs/{}", Digest::sha256_of(blob));
            if blob.len() > 1000 {
                let range = (100, blob.len() / 2);
                targets.push(Target { path: path.clone(), range: Some(range), expected: blob.slice(range.0..range.1) });
            }
            targets.push(Target { path, range: None, expected: blob.clone() });
        }
    }
    let started = Instant::now();
    // In batches, four at a time; the cache's files are checked after each batch (the cache
    // is small, so what it holds changes all the time).
    let (mut bad, mut cached_files) = (Vec::new(), 0);
    let mut outcomes: Vec<Outcome> = Vec::new();
    bounded(Duration::from_secs(120), "the pulls through chaos", async {
        for _ in 0..PULLS / 50 {
            let picks: Vec<usize> = (0..50).map(|_| rng.range(0, targets.len() as u64) as usize).collect();
            let batch: Vec<Outcome> = futures_util::stream::iter(picks.into_iter().map(|i| {
                let target = &targets[i];
                let api = api.clone();
                async move {
                    match tokio::time::timeout(Duration::from_secs(30), pull(&api, target)).await {
                        Ok(outcome) => outcome,
                        Err(_) => Outcome::Wrong(format!("{}: no answer in 30 s", target.path)),
                    }
                }
            }))
            .buffer_unordered(4)
            .collect()
            .await;
            outcomes.extend(batch);
            let (b, n) = half_written_blobs(&mirror.data.join("cache/up"));
            bad.extend(b);
            cached_files += n;
        }
    })
    .await;
    let elapsed = started.elapsed();
    let right = outcomes.iter().filter(|o| **o == Outcome::Right).count();
    let wrong: Vec<&Outcome> = outcomes.iter().filter(|o| matches!(o, Outcome::Wrong(_))).collect();
    let mut clean: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &outcomes {
        if let Outcome::Clean(why) = o {
            *clean.entry(why.as_str()).or_default() += 1;
        }
    }

    // Calm again: everything pulls right, and what the cache holds is what it should.
    chaos.set_enabled(false);
    let mut after = Vec::new();
    for target in &targets {
        let outcome = bounded(Duration::from_secs(30), "a pull after the chaos", pull(&api, target)).await;
        if outcome != Outcome::Right {
            after.push(outcome);
        }
    }
    let (b, n) = half_written_blobs(&mirror.data.join("cache/up"));
    bad.extend(b);
    cached_files += n;
    let faults: Vec<String> = chaos.counts().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let clean_list: Vec<String> = clean.iter().map(|(k, v)| format!("{k}x{v}")).collect();
    record(
        "upstream_chaos",
        &format!(
            "pulls={PULLS} succeeded={right} failed_cleanly={} ({}) wrong={} in {:.1}s; faults {}; after: {} pulls, {} wrong; cached blob files checked {cached_files}, {} bad; seed={seed}",
            PULLS - right - wrong.len(),
            clean_list.join(", "),
            wrong.len(),
            elapsed.as_secs_f64(),
            faults.join(" "),
            targets.len(),
            after.len(),
            bad.len(),
        ),
    );
    assert!(wrong.is_empty(), "wrong answers through the chaos: {wrong:#?}");
    assert!(after.is_empty(), "wrong after the chaos: {after:#?}");
    assert!(bad.is_empty(), "cached blobs that do not match their names: {bad:?}");
    assert!(right > PULLS / 10, "too few pulls succeeded to mean anything: {right}");
    assert!(PULLS - right > PULLS / 10, "too few pulls met a fault to mean anything");
}
