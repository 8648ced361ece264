//! How the pull-through cache treats what upstreams say: rate limits, referrers, and
//! credentials (Distribution behind htpasswd basic auth).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tessera_spec::Digest;
use tessera_testkit::{Api, Image, Server, error_code, wait_until, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An upstream that answers every request with 429 and `Retry-After: 30`, counting them.
fn rate_limited_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_rate_limited_upstream_is_left_alone_for_its_retry_after() {
    let (addr, requests) = rate_limited_upstream();
    let mirror = Server::with_config(
        BIN,
        &format!("[[upstream]]\nname = \"up\"\nurl = \"http://{addr}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n"),
    )
    .unwrap();
    let api = Api::new(&mirror);
    for _ in 0..3 {
        let r = api.get("/v2/m/lib/app/manifests/v1").await.unwrap();
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=30).contains(&retry), "{retry}");
        assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 1, "asked once, then left alone until Retry-After");
}

#[tokio::test]
async fn referrers_pass_through_with_filtering() {
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let up = Api::new(&upstream);
    let image = Image::random(1, 100);
    let subject = up.push_image("lib/app", "v1", &image).await.unwrap();
    let empty = up.push_blob("lib/app", b"{}").await.unwrap();
    let mut referrers = Vec::new();
    for (t, tag) in [("application/vnd.example.sig", "sig"), ("application/vnd.example.sbom", "sbom")] {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": t,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": image.manifest.len()},
        }))
        .unwrap();
        assert_eq!(up.push_manifest("lib/app", tag, OCI_MANIFEST, &m).await.unwrap().status(), 201);
        referrers.push(Digest::sha256_of(&m));
    }
    let mirror = Server::with_config(
        BIN,
        &format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n",
            upstream.host()
        ),
    )
    .unwrap();
    let api = Api::new(&mirror);
    let r = api.get(&format!("/v2/m/lib/app/referrers/{subject}")).await.unwrap();
    assert_eq!(r.status(), 200);
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    let r =
        api.get(&format!("/v2/m/lib/app/referrers/{subject}?artifactType=application/vnd.example.sbom")).await.unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["artifactType"], "application/vnd.example.sbom");
    // A subject nobody refers to: an empty index, never a 404.
    let r = api.get(&format!("/v2/m/lib/app/referrers/{}", Digest::sha256_of(b"x"))).await.unwrap();
    assert_eq!(r.status(), 200);
    // Referrer manifests pulled through the cache answer when the upstream is gone.
    for d in &referrers {
        assert_eq!(api.get(&format!("/v2/m/lib/app/manifests/{d}")).await.unwrap().status(), 200);
    }
    upstream.kill();
    let r = api.get(&format!("/v2/m/lib/app/referrers/{subject}")).await.unwrap();
    assert_eq!(r.status(), 200);
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "from the cache: {index}");
}

#[tokio::test]
async fn pulls_through_an_upstream_that_requires_a_login() {
    if !tessera_testkit::have_tool("/usr/bin/docker-registry") {
        return;
    }
    let users = tessera_testkit::tempdir().unwrap();
    let upstream = tessera_testkit::Distribution::start(Some(&tessera_testkit::htpasswd_file(
        users.path(),
        &[("puller", "s3cret pass")],
    )))
    .unwrap();
    let image = Image::random(1, 20_000);
    // Seed it with an authenticated client.
    let locked = Api::at(upstream.addr);
    assert_eq!(locked.get("/v2/").await.unwrap().status(), 401, "the upstream is locked");
    locked.logged_in("puller", "s3cret pass").push_image("private/app", "v1", &image).await.unwrap();

    let toml = |password: &str| {
        format!(
            "[[upstream]]\nname = \"locked\"\nurl = \"http://{}\"\nusername = \"puller\"\npassword = \"{password}\"\n\n[[route]]\nprefix = \"m\"\nto = \"locked\"\n",
            upstream.addr
        )
    };
    let mirror = Server::with_config(BIN, &toml("s3cret pass")).unwrap();
    let api = Api::new(&mirror);
    let r =
        api.http.get(api.url("/v2/m/private/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    for b in image.blobs() {
        let r = api.get(&format!("/v2/m/private/app/blobs/{}", Digest::sha256_of(b))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &b[..]);
    }
    // The client never saw a challenge or the upstream's credentials.
    assert!(!mirror.log_text().contains("s3cret"));

    // Wrong credentials: a clear failure, not the upstream's 401 handed to our client.
    let wrong = Server::with_config(BIN, &toml("wrong")).unwrap();
    let r = Api::new(&wrong).get("/v2/m/private/app/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("www-authenticate").is_none());
    let seen = wait_until(Duration::from_secs(5), || upstream.log_text().contains("puller"));
    assert!(seen, "the upstream saw our login");
}

/// What a [`meddling_proxy`] does to the first answer to a blob GET without `Range`.
#[derive(Clone)]
enum Meddle {
    /// Cut it after this many bytes.
    Cut(usize),
    /// Stop passing it on after this many bytes (and say so in `paused`) until `go_on`.
    Pause { at: usize, paused: Arc<AtomicBool>, go_on: Arc<AtomicBool> },
}

/// A TCP proxy to `target` that meddles with the first answer to a blob GET without
/// `Range`, and passes everything else through (one request per connection).
fn meddling_proxy(target: String, meddle: Meddle) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let meddled = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let (target, meddled, meddle) = (target.clone(), meddled.clone(), meddle.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let request_line = text.lines().next().unwrap_or("").to_string();
                let ranged = text.to_ascii_lowercase().contains("\r\nrange:");
                let forwarded: String = text
                    .split("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.is_empty())
                    .map(|l| format!("{l}\r\n"))
                    .collect::<String>()
                    + "Connection: close\r\n\r\n";
                let Ok(mut upstream) = std::net::TcpStream::connect(&target) else { return };
                let _ = upstream.write_all(forwarded.as_bytes());
                let this_one = request_line.starts_with("GET ")
                    && request_line.contains("/blobs/")
                    && !ranged
                    && !meddled.swap(true, Ordering::SeqCst);
                let mut sent = 0usize;
                let mut buf = [0u8; 16384];
                loop {
                    let n = upstream.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let (n, pause_after) = match &meddle {
                        Meddle::Cut(cut) if this_one => (n.min(cut.saturating_sub(sent)), None),
                        Meddle::Pause { at, .. } if this_one && sent < *at && sent + n >= *at => (n, Some(at - sent)),
                        _ => (n, None),
                    };
                    let (before, after) = buf[..n].split_at(pause_after.unwrap_or(n));
                    if client.write_all(before).is_err() {
                        break;
                    }
                    if let (Some(_), Meddle::Pause { paused, go_on, .. }) = (pause_after, &meddle) {
                        paused.store(true, Ordering::SeqCst);
                        // Stalled until the test lets it go on (or gives up on it).
                        wait_until(Duration::from_secs(60), || go_on.load(Ordering::SeqCst));
                    }
                    if client.write_all(after).is_err() {
                        break;
                    }
                    sent += n;
                    if matches!(meddle, Meddle::Cut(cut) if this_one && sent >= cut) {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_broken_upstream_transfer_is_resumed_with_range() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 3_000_000);
    Api::new(&upstream).push_image("big/app", "v1", &image).await.unwrap();
    let proxy = meddling_proxy(upstream.host(), Meddle::Cut(1_000_000));
    let mirror = Server::with_config(
        BIN,
        &format!("[[upstream]]\nname = \"up\"\nurl = \"http://{proxy}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n"),
    )
    .unwrap();
    let api = Api::new(&mirror);
    let d = Digest::sha256_of(&image.layers[0]);
    let r = api.get(&format!("/v2/m/big/app/blobs/{d}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), &image.layers[0][..], "the whole blob, verified");
    assert!(mirror.wait_for_log("resuming", std::time::Duration::from_secs(5)), "{}", mirror.log_text());
    let log = upstream.log_text();
    assert!(
        log.lines().any(|l| l.contains(&format!("/v2/big/app/blobs/{d}")) && l.contains("\" 206 ")),
        "the rest came with Range: {log}"
    );
}

/// Readers that join a fill late read what it wrote, then the bytes it holds in memory;
/// readers ahead of it wait; all get exactly the blob, from one upstream GET.
#[tokio::test]
async fn readers_joining_a_fill_late_or_ahead_of_it_get_the_verified_bytes() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 12_000_000);
    Api::new(&upstream).push_image("big/app", "v1", &image).await.unwrap();
    let layer = image.layers[0].clone();
    let (paused, go_on) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let proxy =
        meddling_proxy(upstream.host(), Meddle::Pause { at: 9_000_000, paused: paused.clone(), go_on: go_on.clone() });
    let mirror = Server::with_config(
        BIN,
        &format!("[[upstream]]\nname = \"up\"\nurl = \"http://{proxy}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n"),
    )
    .unwrap();
    let api = Api::new(&mirror);
    let d = Digest::sha256_of(&layer);
    let path = format!("/v2/m/big/app/blobs/{d}");
    let get = |range: Option<&'static str>| {
        let (api, path) = (api.clone(), path.clone());
        tokio::spawn(async move {
            let mut request = api.http.get(api.url(&path));
            if let Some(range) = range {
                request = request.header("range", range);
            }
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        })
    };
    let first = get(None);
    // The fill is far into the blob (further than the bytes it keeps in memory) and stalled.
    let stalled = wait_until_async(Duration::from_secs(20), || std::future::ready(paused.load(Ordering::SeqCst))).await;
    assert!(stalled, "the fill never got going");
    // Far into the blob: the fill's session file holds more than the middle range below.
    let uploads = mirror.data.join("cache/up/uploads");
    let far = wait_until(Duration::from_secs(20), || {
        tessera_testkit::store_files(&uploads).iter().any(|(_, size)| *size >= 8_000_000)
    });
    assert!(far, "the fill did not write what it received: {:?}", tessera_testkit::store_files(&uploads));
    let late = get(None);
    let middle = get(Some("bytes=6000000-7999999"));
    let ahead = get(Some("bytes=10000000-10000099"));
    let last_byte = get(Some("bytes=-1"));
    // A negative check needs a window: 200 ms in which a wrong early answer would complete.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first.is_finished() && !ahead.is_finished() && !last_byte.is_finished(), "nothing unverified is complete");
    // Not even a range of bytes already fetched: its client cannot check them against a digest.
    assert!(!middle.is_finished(), "a range waits for the blob to verify");
    go_on.store(true, Ordering::SeqCst);
    let whole = |(status, bytes): (u16, bytes::Bytes)| {
        assert_eq!(status, 200);
        assert!(bytes == layer[..], "the whole blob");
    };
    whole(first.await.unwrap());
    whole(late.await.unwrap());
    assert_eq!(middle.await.unwrap(), (206, bytes::Bytes::copy_from_slice(&layer[6_000_000..8_000_000])));
    assert_eq!(ahead.await.unwrap(), (206, bytes::Bytes::copy_from_slice(&layer[10_000_000..10_000_100])));
    assert_eq!(last_byte.await.unwrap(), (206, bytes::Bytes::copy_from_slice(&layer[layer.len() - 1..])));
    let gets = upstream.log_text().lines().filter(|l| l.contains(&format!("\"GET /v2/big/app/blobs/{d}"))).count();
    assert_eq!(gets, 1, "one upstream GET");
}

#[tokio::test]
async fn the_stale_bound_holds_across_a_restart() {
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 1000);
    Api::new(&upstream).push_image("lib/app", "v1", &image).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let host = upstream.host();
    let toml = |max_stale: u64| {
        format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{host}\"\ncache = {{ tag_ttl_secs = 0, max_stale_secs = {max_stale} }}\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n"
        )
    };
    let config = dir.path().join("tessera.toml");
    std::fs::write(&config, toml(3600)).unwrap();
    let mut mirror = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    assert_eq!(Api::new(&mirror).get("/v2/m/lib/app/manifests/v1").await.unwrap().status(), 200);
    upstream.kill();

    // Restarted, with the upstream gone: the last confirmation was recorded, so the cached
    // tag is served stale within the bound...
    mirror.restart().unwrap();
    let r = Api::new(&mirror).get("/v2/m/lib/app/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("warning"));
    // ...and refused past it.
    std::fs::write(&config, toml(1)).unwrap();
    // The behaviour under test: the last confirmation grows older than max_stale_secs.
    std::thread::sleep(Duration::from_millis(1100));
    mirror.restart().unwrap();
    let r = Api::new(&mirror).get("/v2/m/lib/app/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 503, "older than max_stale_secs");
}

#[tokio::test]
async fn tag_paging_is_passed_upstream_encoded() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 100);
    for t in ["a", "b", "c"] {
        Api::new(&upstream).push_image("lib/app", t, &image).await.unwrap();
    }
    let mirror = Server::with_config(
        BIN,
        &format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n",
            upstream.host()
        ),
    )
    .unwrap();
    let api = Api::new(&mirror);
    let tags: serde_json::Value = api.get("/v2/m/lib/app/tags/list?n=1&last=a").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["b"]));
    // A `last` smuggling another parameter stays one value upstream.
    let tags: serde_json::Value =
        api.get("/v2/m/lib/app/tags/list?n=1&last=a%26n%3D100").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), 1, "{tags}");
    assert!(
        upstream.wait_for_log("/v2/lib/app/tags/list?n=1&last=a%26n%3D100\"", std::time::Duration::from_secs(5)),
        "{}",
        upstream.log_text()
    );
}

/// An upstream that answers every request `200` with an empty body, whatever was asked.
fn empty_answering_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    addr
}

/// An empty answer has no last byte to hold back until the digest verifies: a client must
/// not get it as a complete blob before it has.
#[tokio::test]
async fn an_empty_answer_for_a_blob_that_is_not_empty_is_an_error() {
    let addr = empty_answering_upstream();
    let mirror = Server::with_config(
        BIN,
        &format!("[[upstream]]\nname = \"up\"\nurl = \"http://{addr}\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n"),
    )
    .unwrap();
    let api = Api::new(&mirror);
    let d = Digest::sha256_of(b"not empty");
    let r = api.get(&format!("/v2/m/lib/app/blobs/{d}")).await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.headers());
    assert!(mirror.wait_for_log("does not match its digest", Duration::from_secs(5)));
}
