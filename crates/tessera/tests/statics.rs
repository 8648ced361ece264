//! Static sources with real servers on loopback: a directory of Crane/Pulp redirect files
//! whose content nginx serves on 127.0.0.2 and 127.0.0.3 (published by `tessera publish`),
//! and OCI image layouts as read-only repositories, pulled by skopeo and podman.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_spec::Digest;
use tessera_testkit::cdn::Cdn;
use tessera_testkit::clients::{ContainersFiles, Podman, short_tempdir};
use tessera_testkit::{Api, Image, Server, error_code, have_tool, htpasswd_file, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_string()
}

/// Publishes `image` (tagged `tag`) under `dir` of `cdn` as Pulp does.
fn publish(image: &Image, work: &Path, tag: &str, cdn: &Cdn, dir: &str) {
    let layout = work.join(format!("layout-{}", dir.replace('/', "-")));
    image.write_layout(&layout, tag).unwrap();
    let out = tessera_testkit::cli(BIN, &["publish", &format!("oci:{}:{tag}", p(&layout)), &p(&cdn.root.join(dir))]);
    assert!(out.ok, "{}", out.stderr);
}

fn crane_file(dir: &Path, file: &str, body: Value) {
    std::fs::write(dir.join(file), serde_json::to_vec_pretty(&body).unwrap()).unwrap();
}

#[tokio::test]
async fn a_crane_directory_is_served_with_verified_manifests_and_redirected_blobs() {
    if !have_tool("nginx") {
        return;
    }
    let work = short_tempdir("tcrn").unwrap();
    let work = work.path();
    let base_cdn = Cdn::start("127.0.0.2", None).unwrap();
    let isv_cdn = Cdn::start("127.0.0.3", None).unwrap();
    let base = Image::random(2, 60_000);
    let child = Image::random(3, 50_000);
    publish(&base, work, "7.9", &base_cdn, "pulp/rhel7");
    publish(&child, work, "1", &isv_cdn, "pulp/isv-app");
    let crane = work.join("crane");
    std::fs::create_dir_all(&crane).unwrap();
    crane_file(
        &crane,
        "rhel7.json",
        json!({"type": "pulp-docker-redirect", "version": 4, "repository": "rhel7", "repo-registry-id": "rhel7",
               "url": base_cdn.url("/pulp/rhel7"), "protected": false,
               "schema2_data": ["7.9", base.digest().to_string()], "manifest_list_data": [], "manifest_list_amd64_tags": {}}),
    );
    crane_file(
        &crane,
        "isv-app.json",
        json!({"repository": "isv-app", "repo-registry-id": "isv/app", "url": isv_cdn.url("/pulp/isv-app/"),
               "version": 3, "schema2_data": ["1", child.digest().to_string()]}),
    );
    crane_file(&crane, "old.json", json!({"repo-registry-id": "old", "url": "http://x/", "version": 1, "images": []}));
    std::fs::write(crane.join("broken.json"), b"{ not json").unwrap();

    let server = Server::start(BIN, &["--crane-dir", &p(&crane)]).unwrap();
    let api = Api::new(&server);
    let http = tessera_testkit::no_redirects();
    assert!(server.wait_for_log("retired registry v1 API", Duration::from_secs(5)), "a v1 file is reported");
    assert!(server.log_text().contains("broken.json"), "a broken file is reported");

    // Manifests are fetched, verified and served by us, by tag and by digest.
    for reference in ["7.9".to_string(), base.digest().to_string()] {
        let r = http
            .get(server.url(&format!("/v2/rhel7/manifests/{reference}")))
            .header("accept", ACCEPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{reference}");
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], base.digest().to_string().as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), base.manifest.as_slice());
    }
    // Blobs are redirected to the repository's url, HEAD too.
    let layer = Digest::sha256_of(&base.layers[0]);
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = http.request(method, server.url(&format!("/v2/rhel7/blobs/{layer}"))).send().await.unwrap();
        assert_eq!(r.status(), 307);
        assert_eq!(r.headers()["location"], base_cdn.url(&format!("/pulp/rhel7/blobs/{layer}")).as_str());
    }
    let tags: Value = api.get("/v2/rhel7/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["7.9"]));
    // Read-only; unknown names are not Crane's.
    let r = api.push_manifest("rhel7", "x", OCI_MANIFEST, &base.manifest).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(r).await.as_str()), (405, "UNSUPPORTED"));
    assert_eq!(api.get("/v2/old/tags/list").await.unwrap().status(), 404);

    // A manifest on the CDN that does not match its digest is not served.
    let by_digest = isv_cdn.root.join(format!("pulp/isv-app/manifests/2/{}", child.digest()));
    let good = std::fs::read(&by_digest).unwrap();
    std::fs::write(&by_digest, &base.manifest).unwrap();
    let r = api.get(&format!("/v2/isv/app/manifests/{}", child.digest())).await.unwrap();
    assert_eq!(r.status(), 503);
    std::fs::write(&by_digest, &good).unwrap();

    // Real clients pull both repositories; blobs come from each repository's own CDN.
    if have_tool("skopeo") {
        let files = ContainersFiles::new(work, &server.host()).unwrap();
        for (name, tag, image) in [("rhel7", "7.9", &base), ("isv/app", "1", &child)] {
            let out = work.join(format!("pulled-{}", name.replace('/', "-")));
            files.skopeo(&[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/{name}:{tag}", server.host()),
                &format!("oci:{}:{tag}", p(&out)),
            ]);
            for l in &image.layers {
                assert!(out.join("blobs/sha256").join(Digest::sha256_of(l).hex()).exists());
            }
        }
        for l in &child.layers {
            assert!(isv_cdn.served(&format!("/pulp/isv-app/blobs/{}", Digest::sha256_of(l)), 200));
        }
        assert!(base_cdn.served(&format!("/pulp/rhel7/blobs/{layer}"), 200));
    }
    if have_tool("podman") {
        let podman = Podman::new(work, ContainersFiles::new(work, &server.host()).unwrap()).unwrap();
        podman.use_working_driver().unwrap();
        let id = podman.run(&["pull", "-q", &format!("{}/isv/app:1", server.host())]);
        assert_eq!(id.trim(), Digest::sha256_of(&child.config).hex());
    }

    // An edited file takes effect without a restart: a new tag appears.
    std::fs::copy(
        base_cdn.root.join("pulp/rhel7/manifests/2/7.9"),
        base_cdn.root.join("pulp/rhel7/manifests/2/latest"),
    )
    .unwrap();
    crane_file(
        &crane,
        "rhel7.json",
        json!({"type": "pulp-docker-redirect", "version": 4, "repo-registry-id": "rhel7",
               "url": base_cdn.url("/pulp/rhel7/"), "schema2_data": ["7.9", "latest"]}),
    );
    let seen = wait_until_async(Duration::from_secs(10), || async {
        let tags: Value = api.get("/v2/rhel7/tags/list").await.unwrap().json().await.unwrap();
        tags["tags"] == json!(["7.9", "latest"])
    })
    .await;
    assert!(seen, "the edited Crane file was not picked up");
    let r = http.get(server.url("/v2/rhel7/manifests/latest")).header("accept", ACCEPT).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], base.digest().to_string().as_str());
}

#[tokio::test]
async fn a_protected_crane_repository_is_served_to_logged_in_clients_only() {
    let work = tessera_testkit::tempdir().unwrap();
    let crane = work.path().join("crane");
    std::fs::create_dir_all(&crane).unwrap();
    crane_file(
        &crane,
        "open.json",
        json!({"repo-registry-id": "open/app", "url": "http://127.0.0.9:1/open/", "version": 4, "schema2_data": ["1"]}),
    );
    crane_file(
        &crane,
        "entitled.json",
        json!({"repo-registry-id": "entitled/app", "url": "http://127.0.0.9:1/e/", "version": 4,
               "protected": true, "schema2_data": ["1"]}),
    );
    let htpasswd = htpasswd_file(work.path(), &[("alice", "wonderland")]);
    let config = format!(
        "[auth]\nhtpasswd = \"{}\"\n[[access]]\nprefix = \"\"\npull = [\"anonymous\", \"*\"]\n[[static]]\nname = \"crane\"\ncrane_dir = \"{}\"\n",
        p(&htpasswd),
        p(&crane)
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let http = tessera_testkit::no_redirects();
    let tags = |name: &str, login: bool| {
        let mut r = http.get(server.url(&format!("/v2/{name}/tags/list")));
        if login {
            r = r.basic_auth("alice", Some("wonderland"));
        }
        r.send()
    };
    assert_eq!(tags("open/app", false).await.unwrap().status(), 200);
    let r = tags("entitled/app", false).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    let r = http.get(
        server.url("/v2/entitled/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000"),
    );
    assert_eq!(
        r.send().await.unwrap().status(),
        401,
        "blobs of a protected repository are not redirected to anonymous"
    );
    let r = tags("entitled/app", true).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["1"]));
}

#[tokio::test]
async fn oci_layouts_are_served_as_read_only_repositories() {
    if !have_tool("nginx") {
        return;
    }
    let work = tessera_testkit::tempdir().unwrap();
    let image = Image::random(2, 300_000);
    let dir = work.path().join("layout");
    image.write_layout(&dir, "v1").unwrap();
    let files = Cdn::start("127.0.0.2", None).unwrap();
    image.write_layout(&files.root.join("app"), "v2").unwrap();
    let config = format!(
        "[[static]]\nname = \"dir\"\nlayout = \"{}\"\nrepository = \"layouts/dir\"\n\
         [[static]]\nname = \"web\"\nlayout = \"{}\"\nrepository = \"layouts/web\"\n",
        p(&dir),
        files.url("/app/")
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let http = tessera_testkit::no_redirects();
    let layer = Digest::sha256_of(&image.layers[1]);

    // From a directory: manifests and blobs (with ranges) from its files.
    let r = http.get(server.url("/v2/layouts/dir/manifests/v1")).header("accept", ACCEPT).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], image.digest().to_string().as_str());
    let r = http.get(server.url(&format!("/v2/layouts/dir/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), image.layers[1].as_slice());
    let r = http
        .get(server.url(&format!("/v2/layouts/dir/blobs/{layer}")))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &image.layers[1][10..20]);
    let tags: Value = api.get("/v2/layouts/dir/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));

    // From a file server: manifests fetched and verified, blobs redirected.
    let r = http.get(server.url("/v2/layouts/web/manifests/v2")).header("accept", ACCEPT).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), image.manifest.as_slice());
    let r = http.get(server.url(&format!("/v2/layouts/web/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], files.url(&format!("/app/blobs/sha256/{}", layer.hex())).as_str());
    if have_tool("skopeo") {
        let containers = ContainersFiles::new(work.path(), &server.host()).unwrap();
        for (name, tag) in [("layouts/dir", "v1"), ("layouts/web", "v2")] {
            let out = work.path().join(format!("out-{tag}"));
            containers.skopeo(&[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/{name}:{tag}", server.host()),
                &format!("oci:{}:{tag}", p(&out)),
            ]);
            assert!(out.join("blobs/sha256").join(layer.hex()).exists());
        }
    }
}
