//! Garbage collection while the server runs: deleted images give their bytes back, images
//! that share them keep pulling with a real client, a push in flight is not broken, and
//! `tessera gc` works on a data directory no server holds (and refuses one that a server
//! holds).

use std::path::Path;
use std::time::Duration;

use tessera_spec::Digest;
use tessera_testkit::clients::{ContainersFiles, short_tempdir};
use tessera_testkit::{Api, Image, Server, cli, error_code, have_tool, wait_until, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn blob_file(data: &Path, digest: &Digest) -> std::path::PathBuf {
    data.join("blobs").join(digest.algorithm().as_str()).join(&digest.hex()[..2]).join(digest.hex())
}

fn blob_digests(image: &Image) -> Vec<Digest> {
    image.blobs().map(|b| Digest::sha256_of(b)).collect()
}

async fn metric(api: &Api, name: &str) -> f64 {
    let text = api.get("/metrics").await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

async fn wait_for_metric(api: &Api, name: &str, at_least: f64) {
    let reached = wait_until_async(Duration::from_secs(20), || async { metric(api, name).await >= at_least }).await;
    assert!(reached, "{name} stayed below {at_least}");
}

/// Whether `tessera args` succeeded, and all it printed.
fn tessera(args: &[&str]) -> (bool, String) {
    let ran = cli(BIN, args);
    (ran.ok, ran.output())
}

/// Every blob of `image` in `name` comes back with its digest.
async fn pulls(api: &Api, name: &str, image: &Image) {
    for d in blob_digests(image) {
        let r = api.get(&format!("/v2/{name}/blobs/{d}")).await.unwrap();
        assert_eq!(r.status(), 200, "{name} {d}");
        assert_eq!(Digest::sha256_of(&r.bytes().await.unwrap()), d);
    }
}

#[tokio::test]
async fn deleted_images_give_their_bytes_back_while_the_server_runs() {
    let grace = Duration::from_secs(3);
    let mut server = Server::with_config(BIN, "[storage]\ngc_interval_secs = 1\ngc_grace_secs = 3\n").unwrap();
    let api = Api::new(&server);
    let gone = Image::random(2, 60_000);
    let kept = Image::random(2, 60_000);
    api.push_image("team/gone", "v1", &gone).await.unwrap();
    api.push_image("team/kept", "v1", &kept).await.unwrap();
    // The same bytes under a second name: referenced there, so they stay.
    api.push_image("team/gone", "also", &kept).await.unwrap();

    // A push that takes a while between its layers and its manifest, with passes running
    // meanwhile, still succeeds inside the grace period.
    let slow = Image::random(1, 30_000);
    let passes = metric(&api, "tessera_gc_passes_total").await;
    for b in slow.blobs() {
        api.push_blob("team/slow", b).await.unwrap();
    }
    let r = api.get(&format!("/v2/team/gone/manifests/{}", gone.digest())).await.unwrap();
    assert_eq!(r.status(), 200);
    let deleted = api.http.delete(api.url(&format!("/v2/team/gone/manifests/{}", gone.digest()))).send().await.unwrap();
    assert_eq!(deleted.status(), 202);
    // Two more passes: at least one whole pass runs while the push is unfinished.
    wait_for_metric(&api, "tessera_gc_passes_total", passes + 2.0).await;
    let r = api.push_manifest("team/slow", "v1", MANIFEST, &slow.manifest).await.unwrap();
    assert_eq!(r.status(), 201, "a push within the grace period is whole");

    // Within a few passes after the grace period, the deleted image's own bytes are gone.
    let reclaimed = wait_until(grace + Duration::from_secs(30), || {
        blob_digests(&gone).iter().all(|d| !blob_file(&server.data, d).exists())
    });
    assert!(reclaimed, "the deleted image's blobs were not reclaimed:\n{}", server.log_text());
    // The counters move when the pass that deleted the files ends.
    wait_for_metric(&api, "tessera_gc_blobs_deleted_total", 3.0).await;
    wait_for_metric(&api, "tessera_gc_bytes_freed_total", 120_000.0).await;
    for d in blob_digests(&kept).iter().chain(&blob_digests(&slow)) {
        assert!(blob_file(&server.data, d).exists(), "{d} is referenced and stays");
    }
    let r = api.get(&format!("/v2/team/gone/blobs/{}", blob_digests(&gone)[1])).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    pulls(&api, "team/kept", &kept).await;
    pulls(&api, "team/gone", &kept).await;
    pulls(&api, "team/slow", &slow).await;
    if have_tool("skopeo") {
        let work = short_tempdir("tgc").unwrap();
        let files = ContainersFiles::new(work.path(), &server.host()).unwrap();
        for (name, image) in [("team/kept:v1", &kept), ("team/gone:also", &kept), ("team/slow:v1", &slow)] {
            let out = work.path().join(name.replace(['/', ':'], "_"));
            files.skopeo(&[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/{name}", server.host()),
                &format!("oci:{}:x", out.display()),
            ]);
            for d in blob_digests(image) {
                assert!(out.join("blobs/sha256").join(d.hex()).is_file(), "skopeo copied {d} of {name}");
            }
        }
    }

    // The bytes come back with a new push of the same image.
    api.push_image("team/gone", "v2", &gone).await.unwrap();
    pulls(&api, "team/gone", &gone).await;

    // A layer left unreferenced past the grace period is collected; the manifest that
    // comes too late is refused with a clear error and nothing is stored.
    let late = Image::random(1, 20_000);
    for b in late.blobs() {
        api.push_blob("team/late", b).await.unwrap();
    }
    let collected = wait_until(grace + Duration::from_secs(30), || {
        blob_digests(&late).iter().all(|d| !blob_file(&server.data, d).exists())
    });
    assert!(collected, "unreferenced layers were not collected");
    let r = api.push_manifest("team/late", "v1", MANIFEST, &late.manifest).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(api.get("/v2/team/late/manifests/v1").await.unwrap().status(), 404);

    // `tessera gc` refuses a data directory a server holds, and works on one it does not.
    let data = server.data.to_string_lossy().into_owned();
    let (ok, out) = tessera(&["gc", "--data", &data, "--grace-secs", "0"]);
    assert!(!ok && out.contains("in use by another tessera process"), "{out}");
    let loose = api.push_blob("team/loose", b"never referenced").await.unwrap();
    server.kill();
    let (ok, out) = tessera(&["gc", "--data", &data, "--grace-secs", "0", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("would delete 1 blob(s), 16 bytes"), "{out}");
    assert!(blob_file(&server.data, &loose).exists(), "a dry run deletes nothing");
    let (ok, out) = tessera(&["gc", "--data", &data, "--grace-secs", "0", "--dry-run"]);
    assert!(ok && out.contains("would delete 1 blob(s), 16 bytes"), "and changes nothing: {out}");
    let (ok, out) = tessera(&["gc", "--data", &data, "--grace-secs", "0"]);
    assert!(ok, "{out}");
    assert!(out.contains("deleted 1 blob(s), 16 bytes"), "{out}");
    assert!(!blob_file(&server.data, &loose).exists());
    server.restart().unwrap();
    let api = Api::new(&server);
    pulls(&api, "team/kept", &kept).await;
    pulls(&api, "team/gone", &gone).await;

    // A mistyped directory is refused, and nothing is created there.
    let typo = server.data.with_file_name("no-such-data");
    let (ok, out) = tessera(&["gc", "--data", &typo.to_string_lossy(), "--dry-run"]);
    assert!(!ok && out.contains("holds no Tessera data"), "{out}");
    assert!(!typo.exists());
}

/// With `gc_untagged`, a tag moved to a new image lets the old one go, bytes and all, while
/// what a tag still reaches stays: an index's children, a kept image's referrers.
#[tokio::test]
async fn untagged_manifests_go_when_asked_and_only_those() {
    let server =
        Server::with_config(BIN, "[storage]\ngc_interval_secs = 1\ngc_grace_secs = 2\ngc_untagged = true\n").unwrap();
    let api = Api::new(&server);
    let (old, new) = (Image::random(1, 40_000), Image::random(1, 40_000));
    api.push_image("team/app", "latest", &old).await.unwrap();
    api.push_image("team/app", "latest", &new).await.unwrap();

    // A multi-platform index whose platform manifests are pushed by digest only.
    let (amd, arm) = (Image::random(1, 30_000), Image::random(1, 30_000));
    for image in [&amd, &arm] {
        api.push_image("team/multi", &image.digest().to_string(), image).await.unwrap();
    }
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [amd.descriptor("amd64"), arm.descriptor("arm64")]}))
    .unwrap();
    let r = api.push_manifest("team/multi", "v1", "application/vnd.oci.image.index.v1+json", &index).await.unwrap();
    assert_eq!(r.status(), 201);

    // A signature-like referrer of the current image, untagged.
    let empty = api.push_blob("team/app", b"{}").await.unwrap();
    let signature = api.push_blob("team/app", b"a signature").await.unwrap();
    let referrer = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": signature.to_string(), "size": 11}],
        "subject": {"mediaType": MANIFEST, "digest": new.digest().to_string(), "size": new.manifest.len()}}))
    .unwrap();
    let referrer_digest = Digest::sha256_of(&referrer);
    let r = api.push_manifest("team/app", &referrer_digest.to_string(), MANIFEST, &referrer).await.unwrap();
    assert_eq!(r.status(), 201);

    let collected =
        wait_until(Duration::from_secs(40), || blob_digests(&old).iter().all(|d| !blob_file(&server.data, d).exists()));
    assert!(collected, "the untagged image was not collected:\n{}", server.log_text());
    assert_eq!(api.get(&format!("/v2/team/app/manifests/{}", old.digest())).await.unwrap().status(), 404);
    wait_for_metric(&api, "tessera_gc_manifests_deleted_total", 1.0).await;
    pulls(&api, "team/app", &new).await;
    for image in [&amd, &arm] {
        let r = api.get(&format!("/v2/team/multi/manifests/{}", image.digest())).await.unwrap();
        assert_eq!(r.status(), 200, "an index keeps its children");
        pulls(&api, "team/multi", image).await;
    }
    let r = api.get(&format!("/v2/team/app/referrers/{}", new.digest())).await.unwrap();
    let listed = r.text().await.unwrap();
    assert!(listed.contains(&referrer_digest.to_string()), "a kept image keeps its referrers: {listed}");
    assert!(blob_file(&server.data, &signature).exists());
    if have_tool("skopeo") {
        let work = short_tempdir("tgu").unwrap();
        let files = ContainersFiles::new(work.path(), &server.host()).unwrap();
        let out = work.path().join("multi");
        files.skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/team/multi:v1", server.host()),
            &format!("oci:{}:v1", out.display()),
        ]);
        for image in [&amd, &arm] {
            for d in blob_digests(image) {
                assert!(out.join("blobs/sha256").join(d.hex()).is_file(), "skopeo copied {d}");
            }
        }
    }
}
