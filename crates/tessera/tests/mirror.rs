//! The routing table and the pull-through cache, with real upstream registries on loopback:
//! a second Tessera and Distribution (`docker-registry`).

use std::path::Path;

use std::time::{Duration, Instant};

use tessera_spec::Digest;
use tessera_testkit::clients::{Access, ContainersFiles, DOCKER, Dockerd, Podman, access_log, short_tempdir};
use tessera_testkit::{Api, Distribution, Image, Server, error_code, have_tool, wait_until, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn mirror_of(upstream: &Server, extra: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "up"
url = "http://{}"
cache = {{ tag_ttl_secs = 0 }}

[[route]]
prefix = "mirror/up"
to = "up"
{extra}
"#,
        upstream.host()
    )
}

/// Lines of a server's access log for requests whose path contains `needle`.
fn requests(server: &Server, needle: &str) -> Vec<String> {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("\"GET ") || l.contains("\"HEAD "))
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn pulls_through_and_serves_from_cache_when_the_upstream_is_gone() {
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(2, 100_000);
    Api::new(&upstream).push_image("lib/app", "v1", &image).await.unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let api = Api::new(&mirror);

    let r = api
        .http
        .get(api.url("/v2/mirror/up/lib/app/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], image.digest().to_string().as_str());
    assert!(r.headers().get("warning").is_none());
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    for b in image.blobs() {
        let r = api.get(&format!("/v2/mirror/up/lib/app/blobs/{}", Digest::sha256_of(b))).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), &b[..]);
    }
    assert!(image.blobs().all(|b| wait_cached(&mirror, &Digest::sha256_of(b))), "blobs kept in the upstream's cache");
    // Names outside the route stay hosted: nothing there.
    assert_eq!(api.get("/v2/lib/app/manifests/v1").await.unwrap().status(), 404);

    upstream.kill();
    let r = api.get("/v2/mirror/up/lib/app/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 200, "stale-if-error");
    assert!(r.headers().get("warning").is_some_and(|w| w.to_str().unwrap().contains("Stale")));
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tessera_cache_stale_served_total{upstream=\"up\"} 1"), "{metrics}");
    assert!(metrics.contains("tessera_cache_blobs_fetched_total{upstream=\"up\"} 3"), "{metrics}");
    assert!(
        metrics
            .contains("tessera_http_request_duration_seconds_count{family=\"manifest\",method=\"GET\",class=\"2xx\"}"),
        "{metrics}"
    );
    let r = api.get(&format!("/v2/mirror/up/lib/app/manifests/{}", image.digest())).await.unwrap();
    assert_eq!(r.status(), 200, "by digest: immutable, no upstream needed");
    for b in image.blobs() {
        let r = api.get(&format!("/v2/mirror/up/lib/app/blobs/{}", Digest::sha256_of(b))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &b[..]);
    }
    // Something never fetched cannot be served: a clear 503, not a hang.
    let r = api.get("/v2/mirror/up/lib/other/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
}

#[tokio::test]
async fn a_moved_tag_is_seen_after_revalidation_and_404s_pass_through() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let up = Api::new(&upstream);
    let (a, b) = (Image::random(1, 1000), Image::random(1, 1000));
    up.push_image("lib/app", "v1", &a).await.unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let api = Api::new(&mirror);
    let r = api.get("/v2/mirror/up/lib/app/manifests/v1").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], a.digest().to_string().as_str());
    up.push_image("lib/app", "v1", &b).await.unwrap();
    let r = api.get("/v2/mirror/up/lib/app/manifests/v1").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], b.digest().to_string().as_str(), "TTL 0: every pull revalidates");
    let r = api.get("/v2/mirror/up/lib/app/manifests/nope").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = api.get(&format!("/v2/mirror/up/lib/app/blobs/{}", Digest::sha256_of(b"nope"))).await.unwrap();
    assert_eq!(r.status(), 404);
    let tags: serde_json::Value = api.get("/v2/mirror/up/lib/app/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(tags["name"], "mirror/up/lib/app");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    // Revalidation is a HEAD: only the changed manifest was fetched with GET by digest.
    let heads = upstream.log_text().lines().filter(|l| l.contains("\"HEAD /v2/lib/app/manifests/v1")).count();
    assert!(heads >= 2, "{heads} HEADs");
}

#[tokio::test]
async fn concurrent_cold_pulls_make_one_upstream_get_per_blob() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 8_000_000);
    Api::new(&upstream).push_image("big/app", "v1", &image).await.unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let api = Api::new(&mirror);
    let layer = &image.layers[0];
    let d = Digest::sha256_of(layer);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let api = api.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let r = api.get(&format!("/v2/mirror/up/big/app/blobs/{d}")).await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), &layer[..], "every client gets the verified bytes");
    }
    let gets = requests(&upstream, &format!("\"GET /v2/big/app/blobs/{d}"));
    assert_eq!(gets.len(), 1, "exactly one upstream GET: {gets:?}");
    // Ranges are served from the cached copy.
    let r = api
        .http
        .get(api.url(&format!("/v2/mirror/up/big/app/blobs/{d}")))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &layer[100..200]);
}

#[tokio::test]
async fn a_corrupted_upstream_blob_is_an_error_and_never_cached() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 600_000);
    Api::new(&upstream).push_image("bad/app", "v1", &image).await.unwrap();
    let d = Digest::sha256_of(&image.layers[0]);
    tessera_testkit::corrupt_stored_blob(&upstream, &d, 1000);

    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let api = Api::new(&mirror);
    for _ in 0..2 {
        // Either an error status, or a transfer that breaks before its end: never the
        // complete unverified blob. The break may come before even the status line leaves:
        // when the fetch fails between the answer's start and its first byte, the server
        // closes the connection with the head still in its buffer.
        match api.http.get(api.url(&format!("/v2/mirror/up/bad/app/blobs/{d}"))).send().await {
            Err(e) => assert!(e.is_request() && !e.is_connect(), "only a broken transfer: {e:?}"),
            Ok(r) if r.status() == 200 => {
                if let Ok(b) = r.bytes().await {
                    assert_ne!(b, image.layers[0]);
                }
            }
            Ok(r) => assert_eq!(r.status(), 503),
        }
        assert!(!cached(&mirror, &d), "nothing committed");
    }
    assert!(mirror.wait_for_log("does not match its digest", Duration::from_secs(5)));
    let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("tessera_cache_digest_mismatches_total{upstream=\"up\"} 0"), "counted: {metrics}");
    assert!(metrics.contains("tessera_cache_blobs_fetched_total{upstream=\"up\"} 0"), "nothing kept: {metrics}");
}

/// Whether the mirror's cache of upstream `up` holds the bytes of `d`.
fn cached(server: &Server, d: &Digest) -> bool {
    server.data.join("cache/up/blobs/sha256").join(&d.hex()[..2]).join(d.hex()).exists()
}

/// Waits for the cache to hold `d`: clients get the verified bytes before the commit (and
/// its fsync) finishes, so the file may appear a moment after a pull returns.
fn wait_cached(server: &Server, d: &Digest) -> bool {
    wait_until(Duration::from_secs(10), || cached(server, d))
}

#[tokio::test]
async fn redirect_routes_and_read_only_mirrors() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 100);
    Api::new(&upstream).push_image("flavio/x", "v1", &image).await.unwrap();
    let toml = format!(
        r#"
[[upstream]]
name = "up"
url = "http://{}"

[[route]]
prefix = "cool/stuff"
to = "up:flavio"
mode = "redirect"
"#,
        upstream.host()
    );
    let mirror = Server::with_config(BIN, &toml).unwrap();
    let no_redirects = tessera_testkit::no_redirects();
    let r = no_redirects.get(format!("http://{}/v2/cool/stuff/x/manifests/v1", mirror.host())).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("http://{}/v2/flavio/x/manifests/v1", upstream.host()).as_str());
    let d = Digest::sha256_of(&image.layers[0]);
    let r = no_redirects.get(format!("http://{}/v2/cool/stuff/x/blobs/{d}", mirror.host())).send().await.unwrap();
    assert_eq!(r.status(), 307);
    // Followed, the redirect yields the upstream's bytes; nothing passed through the mirror.
    let api = Api::new(&mirror);
    assert_eq!(api.get("/v2/cool/stuff/x/manifests/v1").await.unwrap().bytes().await.unwrap(), image.manifest);
    assert!(!cached(&mirror, &d), "redirect mode keeps nothing");
    // Pushing into a mirrored name is refused.
    let r = api.http.post(api.url("/v2/cool/stuff/x/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    let r = api.push_manifest("cool/stuff/x", "v2", OCI_MANIFEST, &image.manifest).await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn a_group_answers_from_hosted_first_then_the_upstream() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let (theirs, ours) = (Image::random(1, 100), Image::random(1, 100));
    Api::new(&upstream).push_image("team/app", "v1", &theirs).await.unwrap();
    Api::new(&upstream).push_image("team/app", "shared", &theirs).await.unwrap();
    let toml = format!(
        r#"
[[upstream]]
name = "up"
url = "http://{}"

[[route]]
prefix = "team"
to = ["hosted", "up:team"]
push = true
"#,
        upstream.host()
    );
    let server = Server::with_config(BIN, &toml).unwrap();
    let api = Api::new(&server);
    api.push_image("team/app", "shared", &ours).await.unwrap();
    let r = api.get("/v2/team/app/manifests/shared").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], ours.digest().to_string().as_str(), "hosted first");
    let r = api.get("/v2/team/app/manifests/v1").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], theirs.digest().to_string().as_str(), "then the upstream");
}

#[tokio::test]
async fn containerd_pulls_two_registries_through_one_tessera_by_ns() {
    if !have_tool("/usr/bin/docker-registry") || !have_tool("ctr") || !have_tool("containerd") {
        return;
    }
    // "docker.io" is a second Tessera, "quay.io" is Distribution.
    let hub = Server::start(BIN, &[]).unwrap();
    let quay = Distribution::start(None).unwrap();
    let (a, b) = (Image::random(2, 50_000), Image::random(1, 50_000));
    Api::new(&hub).push_image("library/alpine", "v1", &a).await.unwrap();
    let quay_api = Api::at(quay.addr);
    quay_api.push_image("team/tool", "v1", &b).await.unwrap();

    let dir = tessera_testkit::clients::short_tempdir("tmr").unwrap();
    let toml = format!(
        r#"
[[upstream]]
name = "hub"
url = "http://{}"
authority = ["docker.io"]

[[upstream]]
name = "quay"
url = "http://{}"
authority = ["quay.io"]
"#,
        hub.host(),
        quay.addr
    );
    let mirror = Server::with_config(BIN, &toml).unwrap();
    let ctd = tessera_testkit::clients::Containerd::start(dir.path()).unwrap();
    for registry in ["docker.io", "quay.io"] {
        let hosts = dir.path().join("hosts").join(registry);
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"https://{registry}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                mirror.host()
            ),
        )
        .unwrap();
    }
    let hosts_dir = dir.path().join("hosts");
    for (reference, image) in [("docker.io/library/alpine:v1", &a), ("quay.io/team/tool:v1", &b)] {
        let out = ctd.ctr(&["images", "pull", "--hosts-dir", hosts_dir.to_str().unwrap(), reference]).unwrap();
        assert!(out.contains("done") || out.contains("elapsed"), "{out}");
        let listed = ctd.ctr(&["images", "ls"]).unwrap();
        assert!(listed.contains(&image.digest().to_string()), "{reference} pulled with its digest:\n{listed}");
    }
    let log = mirror.log_text();
    assert!(log.contains("/v2/library/alpine/manifests/v1?ns=docker.io"), "{log}");
    assert!(log.contains("/v2/team/tool/manifests/v1?ns=quay.io"), "{log}");
    assert!(requests(&hub, "/v2/library/alpine/blobs/").len() >= 2, "docker.io content came from the hub upstream");
}

/// A Tessera standing in for Docker Hub, holding `library/alpine:v1`; returns it, the image
/// and the manifest digest it serves for the tag.
async fn fake_hub() -> (Server, Image, String) {
    let hub = Server::start(BIN, &[]).unwrap();
    let image = Image::random(2, 50_000);
    let api = Api::new(&hub);
    api.push_image("library/alpine", "v1", &image).await.unwrap();
    let r =
        api.http.get(api.url("/v2/library/alpine/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let served = r.headers()["docker-content-digest"].to_str().unwrap().to_string();
    assert_eq!(served, image.digest().to_string());
    (hub, image, served)
}

/// The hub as the upstream `hub`, answering for docker.io (so its library/ rule applies).
fn hub_upstream(hub: &Server) -> String {
    format!("[[upstream]]\nname = \"hub\"\nurl = \"http://{}\"\nauthority = [\"docker.io\"]\n", hub.host())
}

/// Waits (the access log is written by a thread) until `server`'s requests after byte `mark`
/// of its log satisfy `check`.
fn assert_requests(server: &Server, mark: usize, what: &str, check: impl Fn(&[Access]) -> bool) {
    let since = || server.log_text().get(mark..).unwrap_or("").to_string();
    if !wait_until(Duration::from_secs(5), || check(&access_log(&since()))) {
        panic!("server log does not show {what}:\n{}", since());
    }
}

fn answered(log: &[Access], method: &str, target: &str) -> bool {
    log.iter().any(|a| a.method == method && a.target == target && a.status == 200)
}

/// The config and layer digests of `image`.
fn blob_digests(image: &Image) -> Vec<String> {
    std::iter::once(&image.config).chain(&image.layers).map(|b| Digest::sha256_of(b).to_string()).collect()
}

#[tokio::test]
async fn dockerd_pulls_docker_hub_names_through_the_mirror() {
    if !have_tool("dockerd") || !have_tool(DOCKER) {
        return;
    }
    let t0 = Instant::now();
    let dir = short_tempdir("tmd").unwrap();
    let (hub, image, digest) = fake_hub().await;
    let hub_mark = hub.log_text().len();
    let mirror = Server::with_config(BIN, &format!("{}\n[[route]]\nto = \"hub\"\n", hub_upstream(&hub))).unwrap();
    // The guard on dockerd makes a mirror miss fail instead of reaching registry-1.docker.io.
    let mut dockerd =
        Dockerd::start(dir.path(), &format!(r#"{{"registry-mirrors": ["http://{}"]}}"#, mirror.host())).unwrap();

    let out = dockerd.run(&["pull", "alpine:v1"]);
    assert!(out.contains(&format!("Digest: {digest}")), "{out}");
    let config = Digest::sha256_of(&image.config).to_string();
    assert_eq!(dockerd.run(&["image", "inspect", "-f", "{{.Id}}", "alpine:v1"]).trim(), config);
    let repo_digests: Vec<String> =
        serde_json::from_str(&dockerd.run(&["image", "inspect", "-f", "{{json .RepoDigests}}", "alpine:v1"])).unwrap();
    assert_eq!(repo_digests, [format!("alpine@{digest}")], "the manifest kept as the hub serves it");

    let blobs = blob_digests(&image);
    assert_requests(&mirror, 0, "the mirror serving library/alpine's manifest and blobs", |log| {
        (answered(log, "GET", &format!("/v2/library/alpine/manifests/{digest}"))
            || answered(log, "GET", "/v2/library/alpine/manifests/v1"))
            && blobs.iter().all(|d| answered(log, "GET", &format!("/v2/library/alpine/blobs/{d}")))
    });
    assert_requests(&hub, hub_mark, "the hub asked for library/alpine", |log| {
        log.iter().any(|a| a.target == "/v2/library/alpine/manifests/v1" && a.status == 200)
            && blobs.iter().all(|d| answered(log, "GET", &format!("/v2/library/alpine/blobs/{d}")))
    });

    let (status, clean) = dockerd.stop(Duration::from_secs(30));
    eprintln!("dockerd stopped: {status:?}, clean: {clean}");
    eprintln!("dockerd mirror test ({}): {:.1}s", dockerd.driver, t0.elapsed().as_secs_f64());
}

#[tokio::test]
async fn podman_pulls_through_a_registries_conf_mirror() {
    if !have_tool("podman") {
        return;
    }
    let t0 = Instant::now();
    let dir = short_tempdir("tmp").unwrap();
    let (hub, image, digest) = fake_hub().await;
    let hub_mark = hub.log_text().len();
    let mirror =
        Server::with_config(BIN, &format!("{}\n[[route]]\nprefix = \"mirror/dh\"\nto = \"hub\"\n", hub_upstream(&hub)))
            .unwrap();
    let conf = format!(
        "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io/library\"\n\
         location = \"docker.io/library\"\n[[registry.mirror]]\nlocation = \"{}/mirror/dh\"\ninsecure = true\n",
        mirror.host()
    );
    let files = ContainersFiles::with_registries_conf(dir.path(), &conf).unwrap();
    let podman = Podman::new(dir.path(), files).unwrap();
    let driver = podman.use_working_driver().unwrap();

    let name = "docker.io/library/alpine:v1";
    let pulled = podman.run(&["pull", "-q", name]);
    assert_eq!(pulled.trim(), Digest::sha256_of(&image.config).hex());
    let inspect: serde_json::Value = serde_json::from_str(&podman.run(&["image", "inspect", name])).unwrap();
    assert_eq!(inspect[0]["Digest"].as_str(), Some(digest.as_str()));
    let want = serde_json::json!(format!("docker.io/library/alpine@{digest}"));
    assert!(inspect[0]["RepoDigests"].as_array().unwrap().contains(&want), "{}", inspect[0]["RepoDigests"]);

    let blobs = blob_digests(&image);
    assert_requests(&mirror, 0, "the mirror serving mirror/dh/alpine", |log| {
        answered(log, "GET", "/v2/mirror/dh/alpine/manifests/v1")
            && blobs.iter().all(|d| answered(log, "GET", &format!("/v2/mirror/dh/alpine/blobs/{d}")))
    });
    // `alpine` on an upstream answering for docker.io is `library/alpine`.
    assert_requests(&hub, hub_mark, "the hub asked for library/alpine", |log| {
        log.iter().any(|a| a.target == "/v2/library/alpine/manifests/v1" && a.status == 200)
            && blobs.iter().all(|d| answered(log, "GET", &format!("/v2/library/alpine/blobs/{d}")))
    });
    drop(podman);
    eprintln!("podman mirror test ({driver}): {:.1}s", t0.elapsed().as_secs_f64());
}

#[tokio::test]
async fn the_cache_keeps_to_its_size_bound_evicting_least_recently_used() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(4, 1_000_000);
    Api::new(&upstream).push_image("lru/app", "v1", &image).await.unwrap();
    // Room for about two and a half layers.
    let toml = mirror_of(&upstream, "")
        .replace("cache = { tag_ttl_secs = 0 }", "cache = { tag_ttl_secs = 0, max_bytes = 2600000 }");
    let mirror = Server::with_config(BIN, &toml).unwrap();
    let api = Api::new(&mirror);
    let layers: Vec<Digest> = image.layers.iter().map(|l| Digest::sha256_of(l)).collect();
    let pull = |d: &Digest| {
        let api = api.clone();
        let path = format!("/v2/mirror/up/lru/app/blobs/{d}");
        async move { api.get(&path).await.unwrap().bytes().await.unwrap() }
    };
    // A fill marks its blob used after the commit (the file appears a moment earlier): wait
    // for the fill to end before using another blob, or the order would be a race.
    let fetched = |n: u32| {
        let api = api.clone();
        async move {
            let want = format!("tessera_cache_blobs_fetched_total{{upstream=\"up\"}} {n}");
            let reached = wait_until_async(Duration::from_secs(10), || async {
                api.get("/metrics").await.unwrap().text().await.unwrap().contains(&want)
            })
            .await;
            assert!(reached, "{want}");
        }
    };
    pull(&layers[0]).await;
    assert!(wait_cached(&mirror, &layers[0]));
    fetched(1).await;
    pull(&layers[1]).await;
    assert!(wait_cached(&mirror, &layers[1]));
    fetched(2).await;
    pull(&layers[0]).await; // layer 0 is now more recently used than layer 1
    pull(&layers[2]).await; // over the bound: layer 1 goes
    assert!(wait_cached(&mirror, &layers[2]));
    fetched(3).await;
    assert!(cached(&mirror, &layers[0]), "recently used stay");
    assert!(!cached(&mirror, &layers[1]), "least recently used is evicted");
    let held: u64 = layers.iter().filter(|d| cached(&mirror, d)).count() as u64 * 1_000_000;
    assert!(held <= 2_600_000, "within the bound");
    // An evicted blob is fetched again when asked for, and still verified.
    assert_eq!(pull(&layers[1]).await, &image.layers[1][..]);
    assert!(wait_cached(&mirror, &layers[1]));
    let gets = requests(&upstream, &format!("\"GET /v2/lru/app/blobs/{}", layers[1]));
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(mirror.wait_for_log("evicted from the cache", Duration::from_secs(5)));
}

/// `skopeo copy` of `reference` out of the mirror into an OCI layout; its stderr on failure.
fn skopeo_pull(reference: &str, out: &Path) -> Result<String, String> {
    let result = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:v1", out.display()))
        .output()
        .map_err(|e| e.to_string())?;
    if result.status.success() {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        Ok(index["manifests"][0]["digest"].as_str().unwrap_or("").to_string())
    } else {
        Err(String::from_utf8_lossy(&result.stderr).into_owned())
    }
}

#[tokio::test]
async fn skopeo_pulls_from_the_cache_after_the_upstream_dies() {
    if !have_tool("skopeo") {
        return;
    }
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(2, 100_000);
    Api::new(&upstream).push_image("lib/app", "v1", &image).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let reference = format!("{}/mirror/up/lib/app:v1", mirror.host());
    assert_eq!(skopeo_pull(&reference, &dir.path().join("first")).unwrap(), image.digest().to_string());
    upstream.kill();
    assert_eq!(
        skopeo_pull(&reference, &dir.path().join("second")).unwrap(),
        image.digest().to_string(),
        "served from the cache"
    );
    for b in image.layers.iter() {
        let d = Digest::sha256_of(b);
        assert_eq!(&std::fs::read(dir.path().join("second/blobs/sha256").join(d.hex())).unwrap(), b);
    }
}

#[tokio::test]
async fn twenty_concurrent_skopeo_pulls_make_one_upstream_get_per_blob() {
    if !have_tool("skopeo") {
        return;
    }
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(3, 2_000_000);
    Api::new(&upstream).push_image("hot/app", "v1", &image).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let reference = format!("{}/mirror/up/hot/app:v1", mirror.host());
    let pulls: Vec<_> = (0..20)
        .map(|i| {
            let reference = reference.clone();
            let out = dir.path().join(format!("out{i}"));
            std::thread::spawn(move || skopeo_pull(&reference, &out))
        })
        .collect();
    for p in pulls {
        assert_eq!(p.join().unwrap().unwrap(), image.digest().to_string());
    }
    for b in image.blobs() {
        let d = Digest::sha256_of(b);
        let gets = requests(&upstream, &format!("\"GET /v2/hot/app/blobs/{d}"));
        assert_eq!(gets.len(), 1, "one upstream GET for {d}: {gets:?}");
    }
}

#[tokio::test]
async fn skopeo_fails_on_a_corrupted_upstream_blob_and_nothing_is_kept() {
    if !have_tool("skopeo") {
        return;
    }
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 500_000);
    Api::new(&upstream).push_image("bad/app", "v1", &image).await.unwrap();
    let d = Digest::sha256_of(&image.layers[0]);
    tessera_testkit::corrupt_stored_blob(&upstream, &d, 4242);
    let dir = tessera_testkit::tempdir().unwrap();
    let mirror = Server::with_config(BIN, &mirror_of(&upstream, "")).unwrap();
    let err = skopeo_pull(&format!("{}/mirror/up/bad/app:v1", mirror.host()), &dir.path().join("out")).unwrap_err();
    assert!(!err.is_empty());
    assert!(!cached(&mirror, &d), "the corrupted blob was not kept");
    assert!(mirror.wait_for_log("does not match its digest", Duration::from_secs(5)));
}
