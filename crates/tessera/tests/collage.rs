//! `tessera serve --collage FILE`: Collage's own configuration, redirect-only as Collage
//! documents it, and through the pull-through cache with `--cache`.

use std::process::Command;

use tessera_spec::Digest;
use tessera_testkit::{Api, Image, Server, error_code, have_tool, run};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

struct Setup {
    a: Server,
    b: Server,
    guestbook: Image,
    etcd: Image,
    sles: Image,
    dir: tessera_testkit::TempDir,
}

async fn setup() -> Setup {
    let (a, b) = (Server::start(BIN, &[]).unwrap(), Server::start(BIN, &[]).unwrap());
    let (guestbook, etcd, sles) = (Image::random(2, 30_000), Image::random(1, 30_000), Image::random(1, 1000));
    Api::new(&a).push_image("flavio/guestbook", "v1", &guestbook).await.unwrap();
    Api::new(&a).push_image("suse/sles", "15", &sles).await.unwrap();
    Api::new(&b).push_image("coreos/etcd/etcd", "v3.3", &etcd).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let json = format!(
        r#"{{
  "mappings": {{
    "cool/stuff": "http://{a}/flavio",
    "etcd": "http://{b}/coreos/etcd"
  }},
  "vhosts": {{
    "suse.local": {{ "mappings": {{ "/": "http://{a}/suse" }} }}
  }}
}}"#,
        a = a.host(),
        b = b.host()
    );
    std::fs::write(dir.path().join("collage.json"), json).unwrap();
    Setup { a, b, guestbook, etcd, sles, dir }
}

#[tokio::test]
async fn collage_configuration_redirects_like_collage() {
    let s = setup().await;
    let collage = s.dir.path().join("collage.json");
    let mirror = Server::start(BIN, &["--collage", collage.to_str().unwrap()]).unwrap();
    let http = tessera_testkit::no_redirects();
    let base = format!("http://{}", mirror.host());

    let r = http.get(format!("{base}/v2/cool/stuff/guestbook/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("http://{}/v2/flavio/guestbook/manifests/v1", s.a.host()).as_str());
    let layer = Digest::sha256_of(&s.etcd.layers[0]);
    let r = http.get(format!("{base}/v2/etcd/etcd/blobs/{layer}")).send().await.unwrap();
    assert_eq!(r.headers()["location"], format!("http://{}/v2/coreos/etcd/etcd/blobs/{layer}", s.b.host()).as_str());
    // The vhost's root mount.
    let r = http.get(format!("{base}/v2/sles/manifests/15")).header("host", "suse.local").send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], format!("http://{}/v2/suse/sles/manifests/15", s.a.host()).as_str());
    // Read-only, and nothing outside the mounts.
    let api = Api::new(&mirror);
    let r = api.get("/v2/other/thing/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    let r = api.http.post(api.url("/v2/cool/stuff/x/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 405);

    // A real client follows the redirects and gets the image unchanged.
    if have_tool("skopeo") {
        let out = s.dir.path().join("out");
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
            .arg(format!("docker://{}/cool/stuff/guestbook:v1", mirror.host()))
            .arg(format!("oci:{}:v1", out.display()))
            .env("NO_PROXY", "127.0.0.1,localhost"))
        .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], s.guestbook.digest().to_string());
        for b in s.guestbook.blobs() {
            let d = Digest::sha256_of(b);
            assert_eq!(&std::fs::read(out.join("blobs/sha256").join(d.hex())).unwrap(), b);
        }
        let log = mirror.log_text();
        let served: Vec<&str> =
            log.lines().filter(|l| l.contains(" /v2/cool/stuff/") && l.contains("\" 200 ")).collect();
        assert!(served.is_empty(), "no bytes passed through, only redirects: {served:?}");
        assert!(log.lines().any(|l| l.contains("/v2/cool/stuff/guestbook/blobs/") && l.contains("\" 307 ")), "{log}");
    }
    drop(s.sles);
}

#[tokio::test]
async fn collage_configuration_through_the_cache() {
    let s = setup().await;
    let collage = s.dir.path().join("collage.json");
    let mirror = Server::start(BIN, &["--collage", collage.to_str().unwrap(), "--cache"]).unwrap();
    let api = Api::new(&mirror);
    let r = api.get("/v2/etcd/etcd/manifests/v3.3").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), s.etcd.manifest);
    for b in s.etcd.blobs() {
        let r = api.get(&format!("/v2/etcd/etcd/blobs/{}", Digest::sha256_of(b))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &b[..]);
    }
    let r = api.http.get(api.url("/v2/sles/manifests/15")).header("host", "suse.local").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), s.sles.manifest);
    drop((s.a, s.b, s.guestbook));
}
