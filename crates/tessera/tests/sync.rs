//! Scheduled sync (`[[sync]]`) from a Distribution upstream: into the cache by a running
//! server's first pass (then served with the upstream gone), and into hosted repositories
//! by `tessera sync` (a second pass finds everything in place; a new upstream tag comes in
//! the next one).

use std::time::Duration;

use tessera_testkit::{Api, Distribution, Image, Server, cli, have_tool, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// skopeo copies `reference` into an OCI layout; the pulled manifest's digest, or stderr.
fn skopeo_pull(reference: &str, out: &std::path::Path) -> Result<String, String> {
    let result = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:pulled", out.display()))
        .output()
        .unwrap();
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).into_owned());
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    Ok(index["manifests"][0]["digest"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_servers_first_pass_fills_the_cache_before_anyone_pulls() {
    if !have_tool("skopeo") {
        return;
    }
    let distribution = Distribution::start(None).unwrap();
    let upstream = Api::at(distribution.addr);
    let images: Vec<(&str, Image)> = vec![
        ("1.0", Image::random(2, 40_000)),
        ("1.1", Image::random(1, 40_000)),
        ("2.0-rc", Image::random(1, 40_000)),
    ];
    for (tag, image) in &images {
        upstream.push_image("vendor/app", tag, image).await.unwrap();
    }
    let config = format!(
        "[[upstream]]\nname = \"dist\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"dist\"\n\n\
         [[sync]]\nname = \"vendor\"\nupstream = \"dist\"\nrepositories = [\"vendor/app\"]\ntags = [\"1.*\"]\n",
        distribution.addr
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let synced = wait_until_async(Duration::from_secs(20), || async {
        let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
        metrics.contains("tessera_sync_images_total{sync=\"vendor\",result=\"synced\"} 2")
            && metrics.contains("tessera_sync_passes_total{sync=\"vendor\"} 1")
    })
    .await;
    assert!(synced, "{}", api.get("/metrics").await.unwrap().text().await.unwrap());
    assert!(server.log_text().contains("synced"), "progress in the log: {}", server.log_text());

    // The link goes down: what the pass brought is served, what it was told to skip is not.
    drop(distribution);
    let dir = tessera_testkit::tempdir().unwrap();
    for (i, (tag, image)) in images.iter().enumerate() {
        let pulled =
            skopeo_pull(&format!("{}/mirror/vendor/app:{tag}", server.host()), &dir.path().join(i.to_string()));
        if tag.starts_with("1.") {
            assert_eq!(pulled.unwrap(), image.digest().to_string(), "{tag} from the cache");
        } else {
            assert!(pulled.is_err(), "{tag} was never synced");
        }
    }
}

#[tokio::test]
async fn tessera_sync_mirrors_into_hosted_and_a_second_pass_fetches_only_what_is_new() {
    if !have_tool("skopeo") {
        return;
    }
    let distribution = Distribution::start(None).unwrap();
    let upstream = Api::at(distribution.addr);
    let first = Image::random(2, 30_000);
    upstream.push_image("vendor/app", "1.0", &first).await.unwrap();
    upstream.push_image("tools/lint", "3", &Image::random(1, 10_000)).await.unwrap();
    upstream.push_image("other/thing", "1", &Image::random(1, 10_000)).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("tessera.toml");
    std::fs::write(
        &config,
        format!(
            "data = {:?}\n\n[[upstream]]\nname = \"dist\"\nurl = \"http://{}\"\n\n\
             [[sync]]\nname = \"inside\"\nupstream = \"dist\"\nrepositories = [\"vendor/app\"]\nprefixes = [\"tools\"]\n\
             into = \"hosted\"\nhosted_prefix = \"mirror\"\ninterval_secs = 0\n",
            data.display().to_string(),
            distribution.addr
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let pass = || {
        let ran = cli(BIN, &["sync", "--config", config]);
        assert!(ran.ok, "{}", ran.output());
        ran.stdout
    };
    let first_bytes: usize = first.blobs().map(Vec::len).sum::<usize>();
    let once = pass();
    assert!(once.contains("inside: 2 image(s) synced, 0 already in place, 0 failed"), "{once}");
    let again = pass();
    assert!(again.contains("inside: 0 image(s) synced, 2 already in place, 0 failed; 0 bytes fetched"), "{again}");
    // A new tag sharing a layer: only what is new travels.
    let second = Image::of_layers(vec![first.layers[0].clone(), tessera_testkit::random_layer(20_000, 7)], None);
    upstream.push_image("vendor/app", "1.1", &second).await.unwrap();
    let third = pass();
    let new_bytes = second.config.len() + second.layers[1].len();
    assert!(
        third.contains(&format!("inside: 1 image(s) synced, 2 already in place, 0 failed; {new_bytes} bytes fetched")),
        "{third} (the first image was {first_bytes} bytes)"
    );

    // Served by a server on that data directory, under the hosted names.
    let server = Server::start_in(BIN, Some(&data), &[]).unwrap();
    let pulled = skopeo_pull(&format!("{}/mirror/vendor/app:1.1", server.host()), &dir.path().join("out")).unwrap();
    assert_eq!(pulled, second.digest().to_string());
    let api = Api::new(&server);
    let catalog: serde_json::Value = api.get("/v2/_catalog").await.unwrap().json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["mirror/tools/lint", "mirror/vendor/app"]), "{catalog}");
}

#[test]
fn a_sync_naming_an_unknown_upstream_is_refused() {
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[[sync]]\nupstream = \"nowhere\"\nrepositories = [\"a/b\"]\n").unwrap();
    let ran = cli(BIN, &["sync", "--config", config.to_str().unwrap()]);
    assert!(!ran.ok && ran.output().contains("no [[upstream]] named \"nowhere\""), "{}", ran.output());
}
