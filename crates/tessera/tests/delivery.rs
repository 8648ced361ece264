//! Federated delivery with real servers on loopback: nginx as CDN origins and mirrors on
//! 127.0.0.2 and 127.0.0.3 (each with its own access log), Tessera in front. Blobs are
//! redirected with signatures nginx's `secure_link` checks, mirrors are chosen by client
//! network and health, layers pushed metadata-only live on the CDN only, external URLs
//! obey the allow list, and real clients (skopeo, podman, containerd) follow all of it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_spec::Digest;
use tessera_testkit::cdn::Cdn;
use tessera_testkit::clients::{Containerd, ContainersFiles, Podman, short_tempdir};
use tessera_testkit::{Api, Image, Ran, Server, cli, error_code, have_tool, random_layer, run, store_files};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_string()
}

fn tessera(args: &[&str]) -> Ran {
    cli(BIN, args)
}

fn tessera_ok(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(out.ok, "tessera {args:?} failed: {}", out.output());
    out.stdout
}

/// Writes `image` as a layout and publishes its blobs under `cdn`'s `dir/` (Pulp layout).
fn publish(image: &Image, work: &Path, cdn: &Cdn, dir: &str) {
    let layout = work.join(format!("layout-{dir}"));
    image.write_layout(&layout, "v1").unwrap();
    let out = tessera_ok(&["publish", &format!("oci:{}:v1", p(&layout)), &p(&cdn.root.join(dir))]);
    assert!(out.contains("blob(s) written"), "{out}");
}

fn layer_digests(image: &Image) -> Vec<Digest> {
    image.layers.iter().map(|l| Digest::sha256_of(l)).collect()
}

async fn metric(api: &Api, line_start: &str) -> Option<f64> {
    let text = api.get("/metrics").await.ok()?.text().await.ok()?;
    text.lines().find(|l| l.starts_with(line_start))?.rsplit(' ').next()?.parse().ok()
}

async fn wait_metric(api: &Api, line_start: &str, value: f64) {
    let became = tessera_testkit::wait_until_async(Duration::from_secs(15), || async {
        metric(api, line_start).await == Some(value)
    })
    .await;
    assert!(became, "{line_start} never became {value}");
}

#[tokio::test]
async fn cdn_redirects_are_signed_and_nginx_enforces_the_signature() {
    if !have_tool("nginx") {
        return;
    }
    let work = tessera_testkit::tempdir().unwrap();
    let cdn = Cdn::start("127.0.0.2", Some("s3cret")).unwrap();
    let server = Server::with_config(
        BIN,
        &format!(
            r#"
[[delivery]]
prefix = "rh"
deliver = "cdn"
cdn = "{}"
token = {{ kind = "secure_link_md5", secret = "s3cret", ttl_secs = 3 }}
"#,
            cdn.url("/pulp/")
        ),
    )
    .unwrap();
    let api = Api::new(&server);
    let image = Image::random(2, 50_000);
    api.push_image("rh/base", "v1", &image).await.unwrap();
    publish(&image, work.path(), &cdn, "pulp");
    let http = tessera_testkit::no_redirects();
    let layer = &layer_digests(&image)[0];

    // Manifests are always ours; HEAD is answered here with the size.
    let m = http.get(server.url("/v2/rh/base/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(m.status(), 200);
    let head = http.head(server.url(&format!("/v2/rh/base/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], image.layers[0].len().to_string().as_str());

    // GET: a 307 to the CDN path with nginx's secure_link parameters, which nginx accepts.
    let r = http.get(server.url(&format!("/v2/rh/base/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&cdn.url(&format!("/pulp/blobs/{layer}?md5="))), "{location}");
    assert!(location.contains("&expires="), "{location}");
    let fetched = http.get(&location).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), image.layers[0].as_slice());

    // A forged signature, a missing one, and (after the 3 s ttl) an expired one are refused.
    let forged = location.replacen("md5=", "md5=A", 1);
    assert_eq!(http.get(&forged).send().await.unwrap().status(), 403);
    assert_eq!(http.get(cdn.url(&format!("/pulp/blobs/{layer}"))).send().await.unwrap().status(), 403);
    // The behaviour under test: the link's 3 s lifetime runs out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(http.get(&location).send().await.unwrap().status(), 410, "nginx refuses an expired link");

    // Other repositories stream, and the redirects are counted.
    api.push_image("other/x", "v1", &image).await.unwrap();
    let r = http.get(server.url(&format!("/v2/other/x/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(metric(&api, "tessera_blob_redirects_total{delivery=\"cdn\"}").await, Some(1.0));
}

#[tokio::test]
async fn metadata_only_push_records_layers_that_stay_on_the_cdn() {
    if !have_tool("nginx") {
        return;
    }
    let work = tessera_testkit::tempdir().unwrap();
    let cdn = Cdn::start("127.0.0.2", Some("vendor-key")).unwrap();
    let base_url = cdn.url("/base/");
    let server = Server::with_config(
        BIN,
        &format!(
            r#"
[[delivery]]
prefix = "base"
deliver = "cdn"
cdn = "{base_url}"
token = {{ kind = "secure_link_md5", secret = "vendor-key" }}
"#
        ),
    )
    .unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let image = Image::random(2, 80_000);
    let layout = work.path().join("base");
    image.write_layout(&layout, "v1").unwrap();
    let source = format!("oci:{}:v1", p(&layout));

    // Before the layers are on the CDN, the server's check (a signed HEAD) refuses the push.
    let out = tessera(&["push", &source, &format!("{host}/base/ubi:v1"), "--blobs-at", &base_url, "--plain-http"]);
    assert!(!out.ok);
    let err = out.stderr;
    assert!(err.contains("BLOB_LOCATION_INVALID") && err.contains("404"), "{err}");
    // A base URL the policy does not allow is refused whatever is there.
    let out = tessera(&[
        "push",
        &source,
        &format!("{host}/base/ubi:v1"),
        "--blobs-at",
        "http://127.0.0.9:1/elsewhere/",
        "--plain-http",
        "--no-verify",
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("DENIED"));

    publish(&image, work.path(), &cdn, "base");
    let out = tessera_ok(&["push", &source, &format!("{host}/base/ubi:v1"), "--blobs-at", &base_url, "--plain-http"]);
    assert!(out.contains("2 layer(s) recorded"), "{out}");

    // The layers are recorded, not stored: only the config's bytes are here.
    for layer in layer_digests(&image) {
        let info: Value = api.get(&format!("/tessera/v1/base/ubi/blobs/{layer}")).await.unwrap().json().await.unwrap();
        assert_eq!(info["here"], false);
        assert_eq!(info["urls"], json!([format!("{base_url}blobs/{layer}")]));
    }
    let config = Digest::sha256_of(&image.config);
    let info: Value = api.get(&format!("/tessera/v1/base/ubi/blobs/{config}")).await.unwrap().json().await.unwrap();
    assert_eq!(info["here"], true, "the config is uploaded");
    // On the filesystem (not under with-engines, where the bytes are in a bucket), the
    // files say the same.
    if std::env::var_os("TESSERA_TEST_S3").is_none() {
        let stored: Vec<String> = store_files(&server.data).into_iter().map(|(f, _)| f).collect();
        for layer in layer_digests(&image) {
            assert!(!stored.iter().any(|f| f.ends_with(layer.hex())), "layer bytes must not be stored");
        }
        assert!(stored.iter().any(|f| f.ends_with(config.hex())), "the config's bytes are stored");
    }

    // HEAD says the layer exists (a child push skips it); GET sends the client to the CDN.
    let http = tessera_testkit::no_redirects();
    let layer = &layer_digests(&image)[1];
    let head = http.head(server.url(&format!("/v2/base/ubi/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let r = http.get(server.url(&format!("/v2/base/ubi/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(&format!("{base_url}blobs/{layer}?md5=")), "{location}");
    assert_eq!(http.get(location).send().await.unwrap().bytes().await.unwrap().as_ref(), image.layers[1].as_slice());

    // A mount carries the record into another repository.
    let r = http
        .post(server.url(&format!("/v2/base/child/blobs/uploads/?mount={layer}&from=base/ubi")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http.get(server.url(&format!("/v2/base/child/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);

    // Explain lists where each layer of the image comes from.
    let config_file = work.path().join("t.toml");
    std::fs::write(
        &config_file,
        format!(
            "data = \"{}\"\n[[delivery]]\nprefix = \"base\"\ndeliver = \"cdn\"\ncdn = \"{base_url}\"\n{}",
            p(&server.data),
            server.storage_tables()
        ),
    )
    .unwrap();
    let explained = tessera_ok(&["explain", "--config", &p(&config_file), "--live", "base/ubi:v1"]);
    assert!(explained.contains(&format!("layer {layer}")), "{explained}");
    assert!(explained.contains(&format!("307 to {base_url}blobs/{layer}")), "{explained}");
    assert!(explained.contains(&format!("config {config}")), "{explained}");

    // skopeo pulls the image: layers from the CDN (signed), checked against their digests.
    if have_tool("skopeo") {
        let files = ContainersFiles::new(work.path(), &host).unwrap();
        let out = work.path().join("pulled");
        files.skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{host}/base/ubi:v1"),
            &format!("oci:{}:v1", p(&out)),
        ]);
        for layer in layer_digests(&image) {
            assert!(out.join("blobs/sha256").join(layer.hex()).exists());
            assert!(cdn.served(&format!("/base/blobs/{layer}"), 200), "{:?}", cdn.requests());
        }
    }
}

#[tokio::test]
async fn the_nearest_healthy_mirror_serves_and_a_dead_one_is_skipped() {
    if !have_tool("nginx") {
        return;
    }
    let work = tessera_testkit::tempdir().unwrap();
    let mut near = Cdn::start("127.0.0.3", None).unwrap();
    let far = Cdn::start("127.0.0.2", None).unwrap();
    let server = Server::with_config(
        BIN,
        &format!(
            r#"
[[delivery]]
prefix = "fedora"
deliver = "mirrors"
health_interval_secs = 1
[[delivery.mirror]]
url = "{}"
networks = ["10.0.0.0/8"]
[[delivery.mirror]]
url = "{}"
networks = ["127.0.0.0/8"]
"#,
            far.url("/mirror/"),
            near.url("/mirror/")
        ),
    )
    .unwrap();
    let api = Api::new(&server);
    let image = Image::random(2, 40_000);
    api.push_image("fedora/f41", "v1", &image).await.unwrap();
    publish(&image, work.path(), &near, "mirror");
    publish(&image, work.path(), &far, "mirror");
    let near_metric = format!("tessera_mirror_healthy{{mirror=\"{}\"}}", near.url("/mirror/"));
    wait_metric(&api, &near_metric, 1.0).await;

    // A client on 127.0.0.1 gets the mirror serving 127.0.0.0/8, never the 10/8 one.
    let http = tessera_testkit::no_redirects();
    let layer = &layer_digests(&image)[0];
    let r = http.get(server.url(&format!("/v2/fedora/f41/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], near.url(&format!("/mirror/blobs/{layer}")).as_str());

    // The mirror goes down: the health check notices, and the blob is streamed instead.
    near.stop();
    wait_metric(&api, &near_metric, 0.0).await;
    let r = http.get(server.url(&format!("/v2/fedora/f41/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), image.layers[0].as_slice());
    if have_tool("skopeo") {
        let files = ContainersFiles::new(work.path(), &server.host()).unwrap();
        let out = work.path().join("pulled");
        files.skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/fedora/f41:v1", server.host()),
            &format!("oci:{}:v1", p(&out)),
        ]);
    }
    assert!(far.requests().iter().all(|r| r.method == "HEAD"), "only health checks reach the far mirror");
}

#[tokio::test]
async fn foreign_layer_urls_are_followed_only_where_allowed() {
    let server = Server::with_config(
        BIN,
        r#"
[[delivery]]
prefix = "win"
external_allow = ["https://*.example.com/layers/"]
external_deny = ["https://bad.example.com/"]
"#,
    )
    .unwrap();
    let api = Api::new(&server);
    let config = br#"{"architecture":"amd64","os":"windows","rootfs":{"type":"layers","diff_ids":[]}}"#;
    api.push_blob("win/app", config).await.unwrap();
    api.push_blob("other/app", config).await.unwrap();
    let foreign = Digest::sha256_of(b"a foreign layer");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(config).to_string(), "size": config.len() },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": foreign.to_string(),
            "size": 15,
            "urls": ["https://bad.example.com/layers/x", "http://10.0.0.1/layers/x", "https://go.example.com/layers/x"],
        }],
    }))
    .unwrap();
    for repo in ["win/app", "other/app"] {
        assert_eq!(api.push_manifest(repo, "v1", OCI_MANIFEST, &manifest).await.unwrap().status(), 201);
    }
    let http = tessera_testkit::no_redirects();
    let r = http.get(server.url(&format!("/v2/win/app/blobs/{foreign}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], "https://go.example.com/layers/x", "first allowed URL; deny wins");
    // Without an allow list, nothing is redirected to: a clear not-found, no open redirect.
    let r = http.get(server.url(&format!("/v2/other/app/blobs/{foreign}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    // The location API refuses URLs outside the allow list and malformed documents.
    let put = |body: String| {
        http.put(server.url(&format!("/tessera/v1/win/app/blobs/{}", Digest::sha256_of(b"y")))).body(body).send()
    };
    let r = put(json!({"size": 1, "urls": ["https://evil.org/layers/y"]}).to_string()).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(r).await.as_str()), (403, "DENIED"));
    let r = put("{\"size\": -1}".into()).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(r).await.as_str()), (400, "BLOB_LOCATION_INVALID"));
    let r = put(json!({"size": 1, "urls": []}).to_string()).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(r).await.as_str()), (400, "BLOB_LOCATION_INVALID"));
}

/// The ISV scenario: the base vendor's layers live on the base vendor's CDN (127.0.0.2,
/// signed URLs), the ISV's own on the ISV's CDN (127.0.0.3); Tessera serves the names.
#[tokio::test]
async fn isv_image_on_a_vendor_base_is_pulled_from_both_cdns_by_real_clients() {
    if !(have_tool("nginx") && have_tool("skopeo") && have_tool("podman") && have_tool("ctr")) {
        return;
    }
    let dir = short_tempdir("tisv").unwrap();
    let work = dir.path();
    let vendor = Cdn::start("127.0.0.2", Some("vendor-key")).unwrap();
    let isv = Cdn::start("127.0.0.3", None).unwrap();
    let server = Server::with_config(
        BIN,
        &format!(
            r#"
[[delivery]]
prefix = "vendor"
deliver = "cdn"
cdn = "{vendor_url}"
token = {{ kind = "secure_link_md5", secret = "vendor-key", ttl_secs = 600 }}

[[delivery]]
prefix = "isv"
deliver = "cdn"
cdn = "{isv_url}"
external_allow = ["{vendor_url}"]
"#,
            vendor_url = vendor.url("/vendor/"),
            isv_url = isv.url("/isv/")
        ),
    )
    .unwrap();
    let host = server.host();
    let base = Image::random(2, 100_000);
    publish(&base, work, &vendor, "vendor");
    let base_layout = work.join("layout-vendor");
    tessera_ok(&[
        "push",
        &format!("oci:{}:v1", p(&base_layout)),
        &format!("{host}/vendor/ubi:v1"),
        "--blobs-at",
        &vendor.url("/vendor/"),
        "--plain-http",
    ]);

    // podman pulls the base through Tessera (layers from the vendor's CDN), then pushes the
    // ISV's child image: the base layers are mounted, not uploaded.
    let files = ContainersFiles::new(work, &host).unwrap();
    let podman = Podman::new(work, ContainersFiles::new(work, &host).unwrap()).unwrap();
    podman.use_working_driver().unwrap();
    podman.run(&["pull", "-q", &format!("{host}/vendor/ubi:v1")]);
    let own = random_layer(60_000, tessera_testkit::fresh_seed());
    let child = child_of(&base, &own);
    let child_layout = work.join("child");
    child.write_layout(&child_layout, "1").unwrap();
    let child_id = podman.run(&["pull", "-q", &format!("oci:{}:1", p(&child_layout))]);
    let mark = server.log_text().len();
    podman.run(&["push", "-q", child_id.trim(), &format!("{host}/isv/app:1")]);
    let pushed = tessera_testkit::clients::access_log(&server.log_text()[mark..]);
    for layer in layer_digests(&base) {
        assert!(
            !pushed.iter().any(|a| (a.method == "PUT" || a.method == "PATCH" || a.method == "POST")
                && a.target.contains(layer.hex())
                && !a.target.contains("mount=")),
            "base layer {layer} was uploaded: {pushed:?}"
        );
        let api = Api::new(&server);
        let info: Value = api.get(&format!("/tessera/v1/isv/app/blobs/{layer}")).await.unwrap().json().await.unwrap();
        assert_eq!(info["here"], false, "{info}");
    }

    // The ISV's own blobs land on its CDN by another means: `tessera publish`.
    let child_source = format!("docker://{host}/isv/app:1");
    tessera_ok(&["publish", &child_source, &p(&isv.root.join("isv")), "--src-plain-http"]);

    // skopeo, podman and containerd pull the child: each layer from the server that owns it.
    let out = work.join("pulled");
    files.skopeo(&["copy", "--src-tls-verify=false", &child_source, &format!("oci:{}:1", p(&out))]);
    let manifest: Value =
        serde_json::from_str(&files.skopeo(&["inspect", "--tls-verify=false", "--raw", &child_source])).unwrap();
    let layers: Vec<String> =
        manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(layers.len(), 3);
    for (i, layer) in layers.iter().enumerate() {
        let from_vendor = vendor.served(&format!("/vendor/blobs/{layer}"), 200);
        let from_isv = isv.served(&format!("/isv/blobs/{layer}"), 200);
        if i < 2 {
            assert!(from_vendor && !from_isv, "base layer {layer}: vendor {from_vendor}, isv {from_isv}");
        } else {
            assert!(from_isv && !from_vendor, "own layer {layer}: vendor {from_vendor}, isv {from_isv}");
        }
    }
    // Each further client fetches every layer again, each from the server that owns it.
    let fetched = |layer: &str| {
        let count = |cdn: &Cdn, path: &str| {
            cdn.requests().iter().filter(|r| r.method == "GET" && r.status == 200 && r.path == path).count()
        };
        (count(&vendor, &format!("/vendor/blobs/{layer}")), count(&isv, &format!("/isv/blobs/{layer}")))
    };
    let assert_each_from_its_owner = |client: &str, before: &[(usize, usize)]| {
        for (i, layer) in layers.iter().enumerate() {
            let (vendor_now, isv_now) = fetched(layer);
            let (vendor_then, isv_then) = before[i];
            let expected = if i < 2 { (vendor_then + 1, isv_then) } else { (vendor_then, isv_then + 1) };
            assert_eq!((vendor_now, isv_now), expected, "{client}: layer {i} {layer}");
        }
    };
    podman.run(&["rmi", "-a", "-f"]);
    let before: Vec<_> = layers.iter().map(|l| fetched(l)).collect();
    podman.run(&["pull", "-q", &format!("{host}/isv/app:1")]);
    assert_each_from_its_owner("podman", &before);
    let ctd_dir = short_tempdir("tisvc").unwrap();
    let containerd = Containerd::start(ctd_dir.path()).unwrap();
    let before: Vec<_> = layers.iter().map(|l| fetched(l)).collect();
    containerd.ctr(&["images", "pull", "--plain-http", &format!("{host}/isv/app:1")]).unwrap();
    assert_each_from_its_owner("containerd", &before);

    // A corrupted byte on the ISV's CDN: the client's digest check fails the pull.
    let own_digest = &layers[2];
    let file = isv.root.join("isv/blobs").join(own_digest);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let broken = run(files.apply(&mut Command::new("skopeo")).arg("--policy").arg(&files.policy).args([
        "copy",
        "--src-tls-verify=false",
        &child_source,
        &format!("oci:{}:1", p(&work.join("broken"))),
    ]));
    let err = format!("{:#}", broken.expect_err("a corrupted layer must fail the pull"));
    assert!(err.to_lowercase().contains("digest"), "{err}");
}

/// An image whose layers are `base`'s and then `own`.
fn child_of(base: &Image, own: &[u8]) -> Image {
    let mut layers = base.layers.clone();
    layers.push(own.to_vec());
    Image::of_layers(layers, None)
}

/// An S3-compatible store (moto's server) on loopback, killed when dropped.
struct S3Server {
    child: std::process::Child,
    url: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3(python: &Path, log: &Path) -> S3Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(python)
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("moto server starts");
    let started = tessera_testkit::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(started, "moto server did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
    S3Server { child, url: format!("http://127.0.0.1:{port}") }
}

#[tokio::test]
async fn publish_fills_an_s3_bucket_that_serves_as_the_cdn() {
    let Some(python) = tessera_testkit::clients::python_with_module("moto.server", "TESSERA_S3_PYTHON") else {
        return;
    };
    let work = tessera_testkit::tempdir().unwrap();
    let s3 = start_s3(&python, &work.path().join("s3.log"));
    let http = tessera_testkit::no_redirects();
    assert!(http.put(format!("{}/cdn", s3.url)).send().await.unwrap().status().is_success(), "bucket created");

    let image = Image::random(2, 70_000);
    let layout = work.path().join("layout");
    image.write_layout(&layout, "v1").unwrap();
    let source = format!("oci:{}:v1", p(&layout));
    let publish = |env_key: &str| {
        Ran::of(
            Command::new(BIN)
                .args(["publish", &source, "s3://cdn/pulp/isv", "--s3-endpoint", &s3.url, "--s3-acl", "public-read"])
                .env("AWS_ACCESS_KEY_ID", env_key)
                .env("AWS_SECRET_ACCESS_KEY", "secret"),
        )
    };
    let out = publish("test");
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("3 blob(s) written, 0 already there"));
    let fetch = |url: String| {
        let http = http.clone();
        async move { http.get(&url).send().await.unwrap().bytes().await.unwrap().to_vec() }
    };
    for layer in &image.layers {
        let stored = fetch(format!("{}/cdn/pulp/isv/blobs/{}", s3.url, Digest::sha256_of(layer))).await;
        assert!(stored == *layer, "the bucket holds {} bytes for a {} byte layer", stored.len(), layer.len());
    }
    let stored = fetch(format!("{}/cdn/pulp/isv/manifests/2/v1", s3.url)).await;
    assert!(stored == image.manifest, "the tagged manifest is published");
    // Published again: everything is already there.
    let out = publish("test");
    assert!(out.stdout.contains("0 blob(s) written, 3 already there"));

    // The bucket is the CDN: the image is pushed metadata-only and pulled from it.
    let base = format!("{}/cdn/pulp/isv/", s3.url);
    let server =
        Server::with_config(BIN, &format!("[[delivery]]\nprefix = \"isv\"\ndeliver = \"cdn\"\ncdn = \"{base}\"\n"))
            .unwrap();
    tessera_ok(&["push", &source, &format!("{}/isv/app:v1", server.host()), "--blobs-at", &base, "--plain-http"]);
    let layer = Digest::sha256_of(&image.layers[0]);
    let r = http.get(server.url(&format!("/v2/isv/app/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(fetch(location).await == image.layers[0], "the redirect leads to the layer");
}

#[tokio::test]
async fn only_writers_may_ask_for_bytes_instead_of_the_redirect() {
    let dir = tessera_testkit::tempdir().unwrap();
    let users = tessera_testkit::htpasswd_file(dir.path(), &[("alice", "a"), ("bob", "b")]);
    let server = Server::with_config(
        BIN,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n[[access]]\nprefix = \"\"\npull = [\"anonymous\", \"*\"]\npush = [\"alice\"]\n\
             [[delivery]]\nprefix = \"app\"\ndeliver = \"cdn\"\ncdn = \"https://cdn.example/\"\n",
            users.display()
        ),
    )
    .unwrap();
    let http = tessera_testkit::no_redirects();
    let blob = b"bytes that live on the CDN";
    let digest = Digest::sha256_of(blob);
    let r = http
        .post(server.url(&format!("/v2/app/x/blobs/uploads/?digest={digest}")))
        .basic_auth("alice", Some("a"))
        .body(blob.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let path = format!("/v2/app/x/blobs/{digest}?delivery=stream");
    for user in [None, Some(("bob", "b"))] {
        let mut r = http.get(server.url(&path));
        if let Some((u, p)) = user {
            r = r.basic_auth(u, Some(p));
        }
        assert_eq!(r.send().await.unwrap().status(), 307, "{user:?} may only be redirected");
    }
    let r = http.get(server.url(&path)).basic_auth("alice", Some("a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), blob);
}

#[tokio::test]
async fn a_link_to_bytes_elsewhere_never_reads_bytes_held_for_others() {
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let http = tessera_testkit::no_redirects();
    let secret = b"someone else's layer";
    let digest = api.push_blob("private/app", secret).await.unwrap();
    // A manifest elsewhere names the same digest as a foreign layer at some URL.
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    api.push_blob("mine/app", config).await.unwrap();
    let unknown = Digest::sha256_of(b"not pushed anywhere yet");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(config).to_string(), "size": config.len() },
        "layers": [
            { "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "digest": digest.to_string(), "size": secret.len(), "urls": ["https://example.com/x"] },
            { "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "digest": unknown.to_string(), "size": 5, "urls": ["https://example.com/y"] },
        ],
    }))
    .unwrap();
    assert_eq!(api.push_manifest("mine/app", "v1", OCI_MANIFEST, &manifest).await.unwrap().status(), 201);
    // The link in mine/app names URLs: it is never answered with the bytes held for private/app.
    let r = http.get(server.url(&format!("/v2/mine/app/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    // A wrong size claimed by that manifest (5) is its own: the real bytes, pushed later in
    // another repository, keep their size there.
    let real = b"not pushed anywhere yet";
    assert_eq!(api.push_blob("honest/app", real).await.unwrap(), unknown);
    let size_in = |repo: &str| {
        let http = http.clone();
        let url = server.url(&format!("/v2/{repo}/blobs/{unknown}"));
        async move { http.head(url).send().await.unwrap().headers()["content-length"].to_str().unwrap().to_string() }
    };
    assert_eq!(size_in("honest/app").await, real.len().to_string());
    assert_eq!(size_in("mine/app").await, "5");
    let head = http.head(server.url(&format!("/v2/private/app/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(head.headers()["content-length"], secret.len().to_string().as_str());
}

#[tokio::test]
async fn publish_never_writes_outside_its_directory_and_archives_cannot_reach_local_files() {
    let work = tessera_testkit::tempdir().unwrap();
    let image = Image::random(1, 20_000);
    // A layout whose tag tries to climb out of the destination.
    let layout = work.path().join("layout");
    image.write_layout(&layout, "v1").unwrap();
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap().replace("\"v1\"", "\"../../../escaped\"");
    std::fs::write(layout.join("index.json"), index).unwrap();
    let dest = work.path().join("a/b/c/dest");
    let out = tessera(&["publish", &format!("oci:{}", p(&layout)), &p(&dest)]);
    assert!(out.ok, "{}", out.stderr);
    let mut written = Vec::new();
    let mut stack = vec![work.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                written.push(e.path());
            }
        }
    }
    assert!(written.iter().all(|f| !f.to_string_lossy().contains("escaped")), "{written:?}");
    assert!(dest.join(format!("manifests/2/{}", image.digest())).exists());

    // A legacy `docker save` archive naming an absolute path, and one with a link out.
    for (config, link) in [("/etc/hostname", false), ("cfg.json", true)] {
        let archive = work.path().join(format!("bad-{link}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        let manifest = json!([{ "Config": config, "RepoTags": ["x:1"], "Layers": [] }]).to_string();
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, "manifest.json", manifest.as_bytes()).unwrap();
        if link {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, "cfg.json", "/etc/hostname").unwrap();
        }
        tar.finish().unwrap();
        let out = tessera(&["publish", &format!("docker-archive:{}", p(&archive)), &p(&work.path().join("pub"))]);
        assert!(!out.ok, "archive with link={link} was accepted");
        let err = out.stderr;
        assert!(err.contains("outside itself") || err.contains("links are not followed"), "{err}");
    }
}
