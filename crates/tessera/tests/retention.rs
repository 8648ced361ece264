//! Retention rules (`[[retention]]`): `tessera gc --dry-run` lists what they would untag,
//! `tessera gc` untags it and collects what nothing keeps any more; a running server's
//! passes apply them and count what they untagged.

use std::time::Duration;

use tessera_spec::Digest;
use tessera_testkit::{Api, Image, Server, cli, have_tool, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

const RULES: &str = r#"
[[retention]]
prefix = "ci"
tags = "b*"
keep_newest = 2
protect = ["b1"]

[[retention]]
prefix = "nightly"
older_than = "2s"
"#;

async fn tags(api: &Api, name: &str) -> Vec<String> {
    let list: serde_json::Value = api.get(&format!("/v2/{name}/tags/list")).await.unwrap().json().await.unwrap();
    list["tags"].as_array().map(|t| t.iter().map(|t| t.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn skopeo_push(layout: &std::path::Path, dest: &str) {
    let out = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn tessera_gc_lists_then_untags_what_the_rules_say_and_collects_it() {
    if !have_tool("skopeo") {
        return;
    }
    let mut server = Server::start(BIN, &[]).unwrap();
    let host = server.host();
    let dir = tessera_testkit::tempdir().unwrap();
    let images: Vec<Image> = (0..5).map(|_| Image::random(1, 20_000)).collect();
    for (i, image) in images.iter().enumerate() {
        image.write_layout(&dir.path().join(i.to_string()), "v1").unwrap();
    }
    // ci/app: b1 (protected) .. b4 in push order, and "release" (not matching b*).
    for (i, tag) in ["b1", "b2", "b3", "b4"].iter().enumerate() {
        skopeo_push(&dir.path().join(i.to_string()), &format!("{host}/ci/app:{tag}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    skopeo_push(&dir.path().join("1"), &format!("{host}/ci/app:release"));
    // nightly/app: n1 old enough, n2 too young.
    skopeo_push(&dir.path().join("4"), &format!("{host}/nightly/app:n1"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    skopeo_push(&dir.path().join("4"), &format!("{host}/nightly/app:n2"));
    server.kill();

    let config = dir.path().join("gc.toml");
    std::fs::write(&config, format!("data = {:?}\n{RULES}", server.data.display().to_string())).unwrap();
    let config = config.to_str().unwrap();
    let dry = cli(BIN, &["gc", "--config", config, "--dry-run", "--untagged", "--grace-secs", "0"]);
    assert!(dry.ok, "{}", dry.output());
    let listed: Vec<&str> = dry.stdout.lines().filter_map(|l| l.strip_prefix("retention: would untag ")).collect();
    assert_eq!(listed, ["ci/app:b2", "nightly/app:n1"], "{}", dry.output());

    let done = cli(BIN, &["gc", "--config", config, "--untagged", "--grace-secs", "0"]);
    assert!(done.ok, "{}", done.output());
    assert!(done.stdout.contains("retention: untagged ci/app:b2"), "{}", done.output());
    // b2's image is kept by "release"; nothing else of it went.
    assert!(done.stdout.contains("untagged 2 tag(s); deleted 0 untagged manifest(s)"), "{}", done.output());

    server.restart().unwrap();
    let api = Api::new(&server);
    assert_eq!(tags(&api, "ci/app").await, ["b1", "b3", "b4", "release"]);
    assert_eq!(tags(&api, "nightly/app").await, ["n2"]);
    let r = api.get(&format!("/v2/ci/app/manifests/{}", images[1].digest())).await.unwrap();
    assert_eq!(r.status(), 200, "still tagged release");

    // Once "release" moves away, the next pass collects b2's image and its layer.
    api.push_image("ci/app", "release", &images[4]).await.unwrap();
    server.kill();
    let done = cli(BIN, &["gc", "--config", config, "--untagged", "--grace-secs", "0"]);
    assert!(done.stdout.contains("deleted 1 untagged manifest(s)"), "{}", done.output());
    let layer = Digest::sha256_of(&images[1].layers[0]);
    let stored = server.data.join("blobs/sha256").join(&layer.hex()[..2]).join(layer.hex());
    assert!(!stored.exists(), "the layer only b2's image used is gone");
}

#[tokio::test]
async fn a_running_server_applies_the_rules_in_its_passes() {
    let config = "[storage]\ngc_interval_secs = 1\n\n[[retention]]\nprefix = \"tmp\"\nkeep_newest = 1\n";
    let server = Server::with_config(BIN, config).unwrap();
    let api = Api::new(&server);
    for tag in ["one", "two", "three"] {
        api.push_image("tmp/app", tag, &Image::random(1, 1_000)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.push_image("kept/app", "one", &Image::random(1, 1_000)).await.unwrap();
    let untagged = wait_until_async(Duration::from_secs(10), || async {
        api.get("/metrics").await.unwrap().text().await.unwrap().contains("tessera_retention_tags_untagged_total 2")
    })
    .await;
    assert!(untagged, "{}", api.get("/metrics").await.unwrap().text().await.unwrap());
    assert_eq!(tags(&api, "tmp/app").await, ["three"]);
    assert_eq!(tags(&api, "kept/app").await, ["one"], "no rule covers it");
}

#[test]
fn a_rule_without_a_condition_is_refused() {
    let dir = tessera_testkit::tempdir().unwrap();
    for (rule, says) in [
        ("prefix = \"a\"\n", "give keep_newest, older_than or both"),
        ("prefix = \"a\"\nolder_than = \"3 weeks\"\n", "a number and s, m, h or d"),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, format!("[[retention]]\n{rule}")).unwrap();
        let ran = cli(BIN, &["gc", "--config", config.to_str().unwrap(), "--dry-run"]);
        assert!(!ran.ok && ran.output().contains(says), "{}", ran.output());
    }
}
