//! The OCI Distribution Spec's content discovery and content management areas, against the
//! server run in-process; the command line's own checks against the real binary.

use tessera::testing::InProcess;
use tessera_spec::Digest;
use tessera_testkit::{Api, Image, cli, error_code};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A server configured by `toml` (as `tessera serve --config` with a file holding it).
async fn start(toml: &str) -> (InProcess, Api) {
    let server = InProcess::with_toml(toml).await.expect("server starts");
    let api = Api::at(server.addr);
    (server, api)
}

fn link(r: &reqwest::Response) -> Option<String> {
    r.headers().get("link").and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn tag_image(api: &Api, name: &str, image: &Image, tags: &[&str]) {
    api.push_image(name, tags[0], image).await.unwrap();
    for t in &tags[1..] {
        assert_eq!(api.push_manifest(name, t, OCI_MANIFEST, &image.manifest).await.unwrap().status(), 201);
    }
}

#[tokio::test]
async fn tags_list_is_sorted_and_paginated() {
    let (_s, api) = start("").await;
    let image = Image::random(1, 10);
    tag_image(&api, "t/list", &image, &["v3", "v1", "latest", "v2", "a_b"]).await;
    let r = api.get("/v2/t/list/tags/list").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(link(&r).is_none(), "everything fits: no Link");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["name"], "t/list");
    assert_eq!(body["tags"], serde_json::json!(["a_b", "latest", "v1", "v2", "v3"]));

    let r = api.get("/v2/t/list/tags/list?n=2").await.unwrap();
    let next = link(&r).expect("Link header when more follow");
    assert_eq!(next, "</v2/t/list/tags/list?n=2&last=latest>; rel=\"next\"");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["a_b", "latest"]));
    let url = next.trim_start_matches('<').split('>').next().unwrap();
    let r = api.get(url).await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["v1", "v2"]));
    let r = api.get("/v2/t/list/tags/list?n=2&last=v2").await.unwrap();
    assert!(link(&r).is_none());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["v3"]));

    let body: serde_json::Value = api.get("/v2/t/list/tags/list?n=0").await.unwrap().json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!([]));
    let r = api.get("/v2/t/list/tags/list?n=x").await.unwrap();
    assert_eq!(r.status(), 400);

    let r = api.get("/v2/no/such/tags/list").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn catalog_lists_repositories() {
    let (_s, api) = start("").await;
    let image = Image::random(1, 10);
    for name in ["zeta", "alpha/one", "alpha/two", "mid"] {
        api.push_image(name, "v1", &image).await.unwrap();
    }
    let body: serde_json::Value = api.get("/v2/_catalog").await.unwrap().json().await.unwrap();
    assert_eq!(body["repositories"], serde_json::json!(["alpha/one", "alpha/two", "mid", "zeta"]));
    let r = api.get("/v2/_catalog?n=3").await.unwrap();
    assert_eq!(link(&r).unwrap(), "</v2/_catalog?n=3&last=mid>; rel=\"next\"");
    let body: serde_json::Value = api.get("/v2/_catalog?n=3&last=mid").await.unwrap().json().await.unwrap();
    assert_eq!(body["repositories"], serde_json::json!(["zeta"]));
}

#[tokio::test]
async fn delete_tag_manifest_and_blob() {
    let (_s, api) = start("").await;
    let image = Image::random(2, 100);
    tag_image(&api, "del", &image, &["v1", "v2"]).await;
    let digest = image.digest();

    // Deleting a tag leaves the manifest and other tags.
    let r = api.http.delete(api.url("/v2/del/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(api.get("/v2/del/manifests/v1").await.unwrap().status(), 404);
    assert_eq!(api.get("/v2/del/manifests/v2").await.unwrap().status(), 200);
    assert_eq!(api.get(&format!("/v2/del/manifests/{digest}")).await.unwrap().status(), 200);
    let r = api.http.delete(api.url("/v2/del/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Deleting by digest removes the manifest and every tag on it.
    let r = api.http.delete(api.url(&format!("/v2/del/manifests/{digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = api.get(&format!("/v2/del/manifests/{digest}")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert_eq!(api.get("/v2/del/manifests/v2").await.unwrap().status(), 404);
    let body: serde_json::Value = api.get("/v2/del/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!([]));

    let layer = Digest::sha256_of(&image.layers[0]);
    let r = api.http.delete(api.url(&format!("/v2/del/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = api.get(&format!("/v2/del/blobs/{layer}")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = api.http.delete(api.url(&format!("/v2/del/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_tag_moves_to_the_newest_push() {
    let (_s, api) = start("").await;
    let a = Image::random(1, 10);
    let b = Image::random(1, 10);
    api.push_image("mv", "latest", &a).await.unwrap();
    let r = api.get("/v2/mv/manifests/latest").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], a.digest().to_string().as_str());
    api.push_image("mv", "latest", &b).await.unwrap();
    let r = api.get("/v2/mv/manifests/latest").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], b.digest().to_string().as_str(), "served from cache yet current");
    assert_eq!(api.get(&format!("/v2/mv/manifests/{}", a.digest())).await.unwrap().status(), 200);
}

#[tokio::test]
async fn deletes_can_be_switched_off() {
    let (_s, api) = start("[storage]\ndelete_enabled = false\n").await;
    let image = Image::random(1, 10);
    api.push_image("keep", "v1", &image).await.unwrap();
    for path in [
        "/v2/keep/manifests/v1".to_string(),
        format!("/v2/keep/manifests/{}", image.digest()),
        format!("/v2/keep/blobs/{}", Digest::sha256_of(&image.config)),
    ] {
        let r = api.http.delete(api.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }
    assert_eq!(api.get("/v2/keep/manifests/v1").await.unwrap().status(), 200);
}

#[tokio::test]
async fn invalid_config_is_refused_with_its_line() {
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\n\n[limits]\nmanifest_max_bytes = \"big\"\n").unwrap();
    let out = cli(BIN, &["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.ok);
    let err = out.stderr;
    assert!(err.contains("line 4") && err.contains("manifest_max_bytes"), "{err}");
}

#[test]
fn help_explains_every_flag() {
    let help = cli(BIN, &["serve", "--help"]).stdout;
    for flag in ["--listen", "--data", "--config", "--tls-cert", "--tls-key"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(cli(BIN, &["--help"]).stdout.contains("serve"));
}
