//! Load that one hostile or broken client can create: a login flood, floods of distinct
//! keys, a connection flood.

use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tessera_spec::Digest;

use super::{BIN, SERIAL, bounded, record};
use tessera_testkit::{Api, Distribution, DistributionSetup, Image, Server, http_client_from, http_client_with_pool};

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The `q`-quantile of `samples` (sorted here).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kib * 1024
}

/// Others' `GET /v2/` latencies while `flooders` clients (from their own addresses) fail
/// logins in a loop for `length`. Returns the latencies and the flooders' answers by status.
async fn latency_under_login_flood(
    server: &Server,
    flooders: u8,
    length: Duration,
) -> (Vec<Duration>, std::collections::BTreeMap<u16, u64>) {
    let base = format!("http://{}", server.addr);
    let until = Instant::now() + length;
    let mut floods = tokio::task::JoinSet::new();
    for i in 0..flooders {
        let (http, url) = (http_client_from(loopback(10 + i)), format!("{base}/v2/"));
        floods.spawn(async move {
            let mut answers = std::collections::BTreeMap::new();
            while Instant::now() < until {
                let status = match http.get(&url).basic_auth("alice", Some(format!("guess {i}"))).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                *answers.entry(status).or_insert(0u64) += 1;
            }
            answers
        });
    }
    // Let the flood fill the password-check queue before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut probes = tokio::task::JoinSet::new();
    for i in 0..2 {
        let (http, url) = (http_client_from(loopback(2 + i)), format!("{base}/v2/"));
        probes.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let r = http.get(&url).send().await.expect("GET /v2/");
                assert_eq!(r.status(), 401, "an anonymous probe is asked to log in");
                latencies.push(started.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies
        });
    }
    let latencies: Vec<Duration> = probes.join_all().await.into_iter().flatten().collect();
    let mut answers = std::collections::BTreeMap::new();
    for flood in floods.join_all().await {
        for (status, n) in flood {
            *answers.entry(status).or_insert(0) += n;
        }
    }
    (latencies, answers)
}

/// Eight clients failing logins against a cost-12 htpasswd cannot slow anyone else: bcrypt
/// runs on the blocking pool, a bounded number at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_flood() {
    let _serial = SERIAL.lock().await;
    let dir = tessera_testkit::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("right", 12).unwrap())).unwrap();
    let config = |limit: u32| {
        format!(
            "[auth]\nhtpasswd = \"{}\"\n\n[limits]\nfailed_logins_per_minute_per_client = {limit}\n",
            htpasswd.display()
        )
    };
    // Every try costs a bcrypt: the failed-login limit is off.
    let server = Server::with_config(BIN, &config(0)).unwrap();
    let (mut latencies, answers) = bounded(
        Duration::from_secs(60),
        "the login flood",
        latency_under_login_flood(&server, 8, Duration::from_secs(8)),
    )
    .await;
    let (median, p99) = (quantile(&mut latencies, 0.5), quantile(&mut latencies, 0.99));
    let checked = answers.get(&401).copied().unwrap_or(0);
    assert!(checked >= 8, "the flood's logins were checked: {answers:?}");
    assert!(
        median < Duration::from_millis(20) && p99 < Duration::from_millis(100),
        "others' GET /v2/ under the flood: median {}, p99 {} (limits 20 ms, 100 ms)",
        ms(median),
        ms(p99)
    );
    drop(server);
    // With a failed-login limit (2 a minute here, so that each flooder runs out within the
    // few tries this short run gives it), the flood runs out of tries and costs no more.
    let server = Server::with_config(BIN, &config(2)).unwrap();
    let (mut limited, limited_answers) = bounded(
        Duration::from_secs(60),
        "the limited login flood",
        latency_under_login_flood(&server, 8, Duration::from_secs(4)),
    )
    .await;
    let refused = limited_answers.get(&429).copied().unwrap_or(0);
    assert!(limited_answers.get(&401).copied().unwrap_or(0) <= 8 * 2, "{limited_answers:?}");
    assert!(refused > 0, "out of tries, the flood is refused: {limited_answers:?}");
    record(
        "login_flood",
        &format!(
            "8 clients failing logins (cost 12), no failed-login limit: {checked} checked, answers {answers:?}; others' GET /v2/ ({} samples) median {}, p99 {} | with a limit of 2 a minute: {refused} refused with 429 before bcrypt, others' median {}, p99 {}",
            latencies.len(),
            ms(median),
            ms(p99),
            ms(quantile(&mut limited, 0.5)),
            ms(quantile(&mut limited, 0.99)),
        ),
    );
}

/// Sends `count` GETs of distinct paths (`path(i)`), 32 at a time; returns the answers by status.
async fn distinct_gets(
    api: &Api,
    count: usize,
    path: impl Fn(usize) -> String,
) -> std::collections::BTreeMap<u16, u64> {
    let answers = futures_util::stream::iter(0..count)
        .map(|i| {
            let request = api.http.get(api.url(&path(i)));
            async move { request.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(32)
        .collect::<Vec<u16>>()
        .await;
    let mut by_status = std::collections::BTreeMap::new();
    for status in answers {
        *by_status.entry(status).or_insert(0u64) += 1;
    }
    by_status
}

/// Distinct keys per flood (`TESSERA_TORTURE_FLOOD` overrides it for a quick local run).
fn flood() -> usize {
    std::env::var("TESSERA_TORTURE_FLOOD").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000)
}
const RSS_SLACK: u64 = 50 << 20;

/// A mirror with a cache route to `upstream` (its `[[upstream]]` table extended by
/// `credentials`) is sent `flood` GETs of distinct `path`s, each a clean 404, after a
/// warm-up, within `limit`; its RSS must stay within [`RSS_SLACK`]. Returns the flood's time and the RSS
/// before and after, in bytes.
async fn rss_across_flood(
    upstream: std::net::SocketAddr,
    credentials: &str,
    flood: usize,
    (what, limit): (&str, Duration),
    path: impl Fn(usize) -> String,
) -> (Duration, u64, u64) {
    let mirror = Server::with_config(
        BIN,
        &format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{upstream}\"\n{credentials}\n[[route]]\nprefix = \"mirror/up\"\nto = \"up\"\n"
        ),
    )
    .unwrap();
    let api = Api { base: format!("http://{}", mirror.addr), http: http_client_with_pool(32) };
    // Warm up (allocator arenas, connection pools), then measure.
    distinct_gets(&api, 2_000, |i| path(flood + i)).await;
    let before = rss(mirror.pid());
    let started = Instant::now();
    let answers = bounded(limit, what, distinct_gets(&api, flood, &path)).await;
    let took = started.elapsed();
    let after = rss(mirror.pid());
    assert_eq!(answers.get(&404).copied(), Some(flood as u64), "every missing name is a clean 404: {answers:?}");
    assert!(after < before + RSS_SLACK, "RSS grew from {before} to {after} bytes over {flood} {what}");
    (took, before, after)
}

/// 100,000 distinct missing names through a cache route, and 100,000 distinct token scopes
/// asked of an upstream: the maps they feed are bounded, so memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_under_distinct_key_floods() {
    let _serial = SERIAL.lock().await;
    let flood = flood();
    // Missing names, through a cache route to Distribution.
    let distribution = Distribution::start_with(DistributionSetup { quiet: true, ..Default::default() }).unwrap();
    let missing = |i: usize| format!("/v2/mirror/up/missing/n{i}/manifests/latest");
    let (names_time, before, after) =
        rss_across_flood(distribution.addr, "", flood, ("missing names", Duration::from_secs(600)), missing).await;
    let names = format!(
        "{flood} distinct missing names through a cache route in {:.0} s: RSS {} -> {} MiB",
        names_time.as_secs_f64(),
        before >> 20,
        after >> 20
    );
    drop(distribution);

    // Token scopes: the upstream (another Tessera, logins required) wants a token per
    // repository, which the mirror fetches with its credentials.
    let dir = tessera_testkit::tempdir().unwrap();
    let htpasswd = tessera_testkit::htpasswd_file(dir.path(), &[("admin", "secret")]);
    let upstream =
        Server::with_config(BIN, &format!("[auth]\nhtpasswd = \"{}\"\ntoken = true\n", htpasswd.display())).unwrap();
    let scoped = |i: usize| format!("/v2/mirror/up/flood/s{i}/manifests/latest");
    let credentials = "username = \"admin\"\npassword = \"secret\"\n";
    let (scopes_time, before, after) =
        rss_across_flood(upstream.addr, credentials, flood, ("token scopes", Duration::from_secs(900)), scoped).await;
    let tokens_issued = upstream.log_text().matches("\"GET /token").count();
    assert!(tokens_issued >= flood, "each name needed its own token: only {tokens_issued} were asked for");
    record(
        "memory_floods",
        &format!(
            "{names} | {flood} distinct token scopes ({tokens_issued} tokens fetched) in {:.0} s: RSS {} -> {} MiB",
            scopes_time.as_secs_f64(),
            before >> 20,
            after >> 20
        ),
    );
}

/// 3,000 idle connections opened one after another connect at once, and an ordinary client
/// then still pulls an image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_flood() {
    let _serial = SERIAL.lock().await;
    const CONNECTIONS: usize = 3_000;
    if tessera::raise_open_file_limit(CONNECTIONS as u64 * 2) < CONNECTIONS as u64 + 200 {
        assert!(std::env::var_os("TESSERA_REQUIRE_CLIENTS").is_none(), "cannot open {CONNECTIONS} sockets here");
        eprintln!("SKIPPED: the open-file limit is below {CONNECTIONS} sockets");
        return;
    }
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let image = Image::random(2, 300_000);
    api.push_image("flood/app", "v1", &image).await.unwrap();
    let addr = server.addr;
    let (idle, took, slowest) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        let idle: Vec<TcpStream> = (0..CONNECTIONS)
            .map(|_| {
                let t = Instant::now();
                let c = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
                slowest = slowest.max(t.elapsed());
                c
            })
            .collect();
        (idle, started.elapsed(), slowest)
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(2), "{CONNECTIONS} connections took {took:?} (slowest {slowest:?})");
    let started = Instant::now();
    let pulled = bounded(Duration::from_secs(30), "the pull after the flood", async {
        let fresh = Api::new(&server);
        let r = fresh.get("/v2/flood/app/manifests/v1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), image.manifest);
        for blob in image.blobs() {
            let r = fresh.get(&format!("/v2/flood/app/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
            assert_eq!(r.bytes().await.unwrap(), &blob[..]);
        }
    });
    pulled.await;
    let pull_time = started.elapsed();
    drop(idle);
    record(
        "connection_flood",
        &format!(
            "{CONNECTIONS} idle connections opened one after another in {} (slowest {}); an image pulled after them in {}",
            ms(took),
            ms(slowest),
            ms(pull_time)
        ),
    );
}
