//! Tessera on the scale-out engines, real ones on loopback: `[storage.s3]` on Garage (an
//! S3-compatible object store) and `[storage.postgres]` on PostgreSQL. What lives in the
//! bucket, garbage collection there, an upstream's cache there, uploads resumed by a
//! restarted server, a server with a fresh data directory serving what another pushed, and
//! the stores going away and coming back. (The OCI API
//! and real-client suites run on Garage and PostgreSQL too: `.ci/run` runs them under
//! `with-engines`.)

use std::time::Duration;

use bytes::Bytes;
use tessera_spec::Digest;
use tessera_store::{BlobStore, S3BlobStore, S3Settings};
use tessera_testkit::garage::Garage;
use tessera_testkit::postgres::Postgres;
use tessera_testkit::{Api, Image, Server, error_code, random_bytes, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// The bucket as the server sees it under `prefix` (its hosted blobs), or a sub-prefix.
async fn bucket(garage: &Garage, prefix: &str) -> S3BlobStore {
    let settings = S3Settings {
        endpoint: Some(garage.endpoint.parse().unwrap()),
        region: Garage::REGION.into(),
        bucket: garage.bucket.clone(),
        prefix: prefix.into(),
        path_style: true,
        access_key_id: Some(garage.key_id.clone()),
        secret_access_key: Some(garage.secret.clone()),
    };
    S3BlobStore::open(settings, tessera_testkit::no_redirects()).await.expect("the bucket opens")
}

fn server_on(garage: &Garage, keys: &std::path::Path, prefix: &str, extra: &str) -> Server {
    let storage = garage.storage_toml(keys, prefix).unwrap();
    Server::with_config(BIN, &format!("{extra}\n{storage}")).expect("server starts")
}

#[tokio::test]
async fn blobs_live_in_the_bucket_and_garbage_collection_deletes_them_there() {
    let Some(garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let server = server_on(&garage, keys.path(), "gc/", "[storage]\ngc_interval_secs = 1\ngc_grace_secs = 1\n");
    let api = Api::new(&server);
    let (kept, gone) = (Image::random(2, 50_000), Image::random(2, 50_000));
    api.push_image("team/kept", "v1", &kept).await.unwrap();
    api.push_image("team/gone", "v1", &gone).await.unwrap();
    let stored = bucket(&garage, "gc/").await;
    for blob in kept.blobs().chain(gone.blobs()) {
        assert_eq!(stored.stat(&Digest::sha256_of(blob)).await.unwrap(), Some(blob.len() as u64), "in the bucket");
    }
    assert!(std::fs::read_dir(server.data.join("blobs")).is_err(), "no blob under the data directory");

    let r = api.http.delete(api.url(&format!("/v2/team/gone/manifests/{}", gone.digest()))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let gone_blobs: Vec<Digest> = gone.blobs().map(|b| Digest::sha256_of(b)).collect();
    let collected = wait_until_async(Duration::from_secs(40), || {
        let stored = &stored;
        let gone_blobs = &gone_blobs;
        async move {
            for d in gone_blobs {
                if stored.stat(d).await.unwrap().is_some() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(collected, "the deleted image's blobs left the bucket:\n{}", server.log_text());
    for blob in kept.blobs() {
        assert!(stored.stat(&Digest::sha256_of(blob)).await.unwrap().is_some(), "a referenced blob stays");
    }
    let r = api.get(&format!("/v2/team/gone/blobs/{}", gone_blobs[0])).await.unwrap();
    assert_eq!(r.status(), 404);
    for blob in kept.blobs() {
        let r = api.get(&format!("/v2/team/kept/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &blob[..]);
    }
}

#[tokio::test]
async fn an_upstreams_cache_lives_under_its_own_prefix_of_the_bucket() {
    let Some(garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(2, 80_000);
    Api::new(&upstream).push_image("lib/app", "v1", &image).await.unwrap();
    let routes = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n",
        upstream.host()
    );
    let mirror = server_on(&garage, keys.path(), "m/", &routes);
    let api = Api::new(&mirror);
    for blob in image.blobs() {
        let r = api.get(&format!("/v2/mirror/lib/app/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &blob[..]);
    }
    let cache = bucket(&garage, "m/cache/up/").await;
    for blob in image.blobs() {
        let digest = Digest::sha256_of(blob);
        let landed = wait_until_async(Duration::from_secs(10), || {
            let (cache, digest) = (&cache, &digest);
            async move { cache.stat(digest).await.unwrap().is_some() }
        })
        .await;
        assert!(landed, "{digest} is cached in the bucket");
    }
    assert!(bucket(&garage, "m/").await.list().await.unwrap().is_empty(), "the cache is not the hosted store");

    upstream.kill();
    for blob in image.blobs() {
        let r = api.get(&format!("/v2/mirror/lib/app/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.status(), 200, "served from the bucket with the upstream gone");
        assert_eq!(r.bytes().await.unwrap(), &blob[..]);
    }
}

#[tokio::test]
async fn a_restarted_server_continues_a_chunked_upload_kept_in_the_bucket() {
    let Some(garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let mut server = server_on(&garage, keys.path(), "resume/", "");
    let api = Api::new(&server);
    let blob = Bytes::from(random_bytes(12 * 1024 * 1024 + 77, 3));
    let r = api.http.post(api.url("/v2/lib/big/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let cut = 9 * 1024 * 1024 + 5;
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-range", format!("0-{}", cut - 1))
        .body(blob.slice(..cut))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Killed and started again: the session, its bytes and its hash state are in the bucket.
    server.restart().unwrap();
    let api = Api::new(&server);
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", cut - 1).as_str(), "the offset survived the restart");
    let digest = Digest::sha256_of(&blob);
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={digest}")))
        .header("content-range", format!("{cut}-{}", blob.len() - 1))
        .body(blob.slice(cut..))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let r = api.get(&format!("/v2/lib/big/blobs/{digest}")).await.unwrap();
    assert!(r.bytes().await.unwrap() == blob, "the blob reads back whole");
    let stored = bucket(&garage, "resume/").await;
    assert!(stored.upload_list().await.unwrap().is_empty(), "the session's parts are gone from the bucket");
}

#[tokio::test]
async fn the_store_going_away_is_a_503_and_its_return_needs_no_restart() {
    let Some(mut garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let server = server_on(&garage, keys.path(), "away/", "");
    let api = Api::new(&server);
    let image = Image::random(1, 20_000);
    api.push_image("lib/app", "v1", &image).await.unwrap();
    let layer = Digest::sha256_of(&image.layers[0]);

    garage.stop();
    let r = api.get(&format!("/v2/lib/app/blobs/{layer}")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some(), "a client is told when to try again");
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    let r = api.http.post(api.url("/v2/lib/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 503);

    garage.restart().unwrap();
    let r = api.get(&format!("/v2/lib/app/blobs/{layer}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.layers[0]);
    api.push_image("lib/app", "v2", &Image::random(1, 20_000)).await.unwrap();
}

#[tokio::test]
async fn a_store_unreachable_at_start_up_is_one_clear_line() {
    let Some(garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let mut storage = garage.storage_toml(keys.path(), "").unwrap();
    let closed = tessera_testkit::free_port().unwrap();
    storage = storage.replace(&garage.endpoint, &format!("http://127.0.0.1:{closed}"));
    let config = keys.path().join("tessera.toml");
    std::fs::write(&config, storage).unwrap();
    let data = keys.path().join("data");
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the blob store s3://tessera/"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{closed}")) || stderr.contains("tessera-blobs-layout"), "{stderr}");
}

#[tokio::test]
async fn presigned_delivery_sends_clients_to_the_bucket_and_skopeo_verifies_what_it_gets_there() {
    let Some(garage) = Garage::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let server = server_on(
        &garage,
        keys.path(),
        "pre/",
        "[[delivery]]\nprefix = \"dl\"\ndeliver = \"presigned\"\nttl_secs = 120\n",
    );
    let api = Api::new(&server);
    let image = Image::random(2, 60_000);
    api.push_image("dl/app", "v1", &image).await.unwrap();
    api.push_image("other/app", "v1", &image).await.unwrap();
    let http = tessera_testkit::no_redirects();
    for blob in image.blobs() {
        let digest = Digest::sha256_of(blob);
        let r = http.get(server.url(&format!("/v2/dl/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 307);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(location.starts_with(&garage.endpoint), "to the bucket: {location}");
        assert!(location.contains("X-Amz-Expires=120") && location.contains("X-Amz-Signature="), "{location}");
        let fetched = http.get(&location).send().await.unwrap();
        assert_eq!(fetched.status(), 200);
        assert_eq!(fetched.bytes().await.unwrap(), &blob[..], "the bucket serves the blob's bytes");
        // HEAD is answered here; names outside the rule are streamed.
        let r = http.head(server.url(&format!("/v2/dl/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = http.get(server.url(&format!("/v2/other/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tessera_blob_redirects_total{delivery=\"presigned\"} 3"), "{metrics}");

    // A real client follows the redirects to Garage and checks every digest.
    if !tessera_testkit::have_tool("skopeo") {
        return;
    }
    let dir = tessera_testkit::clients::short_tempdir("tpre").unwrap();
    let files = tessera_testkit::clients::ContainersFiles::new(dir.path(), &server.host()).unwrap();
    let out = dir.path().join("out");
    files.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/dl/app:v1", server.host()),
        &format!("oci:{}:v1", out.display()),
    ]);
    for blob in image.blobs() {
        let path = out.join("blobs/sha256").join(Digest::sha256_of(blob).hex());
        assert_eq!(&std::fs::read(&path).unwrap(), blob);
    }
}

#[tokio::test]
async fn presigned_delivery_without_a_bucket_is_refused_at_start_up() {
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("tessera.toml");
    std::fs::write(&config, "[[delivery]]\ndeliver = \"presigned\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env_remove("TESSERA_TEST_S3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("presigned") && stderr.contains("[storage.s3]"), "{stderr}");
}

fn postgres_toml(pg: &Postgres, database: &str) -> String {
    format!("[storage.postgres]\nurl = \"{}\"\n", pg.database(database).unwrap())
}

#[tokio::test]
async fn a_server_with_a_fresh_data_directory_serves_what_another_pushed_to_the_same_stores() {
    let Some(garage) = Garage::for_test() else { return };
    let Some(pg) = Postgres::for_test() else { return };
    let keys = tessera_testkit::tempdir().unwrap();
    let metadata = postgres_toml(&pg, "shared");
    let image = Image::random(3, 70_000);
    {
        let first = server_on(&garage, keys.path(), "shared/", &metadata);
        Api::new(&first).push_image("team/app", "v1", &image).await.unwrap();
    }
    // Nothing of the first server's data directory is reused.
    let second = server_on(&garage, keys.path(), "shared/", &metadata);
    let api = Api::new(&second);
    let r = api
        .http
        .get(api.url("/v2/team/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    for blob in image.blobs() {
        let r = api.get(&format!("/v2/team/app/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &blob[..]);
    }
    let tags: serde_json::Value = api.get("/v2/team/app/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    assert!(!second.data.join("meta.sqlite").exists(), "the metadata is in PostgreSQL, not the data directory");
}

#[tokio::test]
async fn the_database_going_away_is_a_503_and_its_return_needs_no_restart() {
    let Some(pg) = Postgres::for_test() else { return };
    let server = Server::with_config(BIN, &postgres_toml(&pg, "away")).expect("server starts");
    let api = Api::new(&server);
    let image = Image::random(1, 20_000);
    api.push_image("lib/app", "v1", &image).await.unwrap();

    pg.stop().unwrap();
    let r = api.get("/v2/lib/app/tags/list").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r).await, "UNAVAILABLE");

    pg.restart().unwrap();
    let back = wait_until_async(Duration::from_secs(20), || {
        let api = &api;
        async move { api.get("/v2/lib/app/tags/list").await.unwrap().status() == 200 }
    })
    .await;
    assert!(back, "the server uses the database again by itself");
    api.push_image("lib/app", "v2", &Image::random(1, 20_000)).await.unwrap();
}

#[tokio::test]
async fn a_database_unreachable_at_start_up_is_one_clear_line_without_its_password() {
    let dir = tessera_testkit::tempdir().unwrap();
    let closed = tessera_testkit::free_port().unwrap();
    let config = dir.path().join("tessera.toml");
    std::fs::write(
        &config,
        format!("[storage.postgres]\nurl = \"postgres://tessera:s3cret@127.0.0.1:{closed}/tessera\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env_remove("TESSERA_TEST_S3")
        .env_remove("TESSERA_TEST_POSTGRES")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot open the metadata database 127.0.0.1:{closed}/tessera")), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the password stays out of the message: {stderr}");
}
