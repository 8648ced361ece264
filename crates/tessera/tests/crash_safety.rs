//! Storage that never lies: killed processes, concurrent writers of one blob, a full disk.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use tessera_spec::Digest;
use tessera_testkit::disk::{SmallDisk, files_under};
use tessera_testkit::{Api, Image, Server, error_code, random_bytes};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

#[tokio::test]
async fn everything_survives_a_restart() {
    let mut s = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&s);
    let image = Image::random(2, 50_000);
    api.push_image("keep/me", "v1", &image).await.unwrap();
    s.kill();
    s.restart().unwrap();
    let api = Api::new(&s);
    let r = api.get("/v2/keep/me/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    for b in image.blobs() {
        let r = api.get(&format!("/v2/keep/me/blobs/{}", Digest::sha256_of(b))).await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), &b[..]);
    }
}

#[tokio::test]
async fn upload_resumes_after_the_server_is_killed() {
    let mut s = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&s);
    let data = random_bytes(3_000_000, 21);
    let d = Digest::sha256_of(&data);
    let r = api.http.post(api.url("/v2/resume/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-range", "0-1199999")
        .body(data[..1_200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    s.kill();
    s.restart().unwrap();
    let api = Api::new(&s);
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204, "the session outlives the process");
    assert_eq!(r.headers()["range"], "0-1199999");
    // The hash state is rebuilt from the stored bytes; the rest arrives in two more requests.
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-range", "1200000-2399999")
        .body(data[1_200_000..2_400_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={d}")))
        .header("content-range", "2400000-2999999")
        .body(data[2_400_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(api.get(&format!("/v2/resume/blobs/{d}")).await.unwrap().bytes().await.unwrap(), data);
}

#[tokio::test]
async fn a_kill_mid_push_leaves_no_visible_partial_blob() {
    let mut s = Server::start(BIN, &[]).unwrap();
    let data = random_bytes(8_000_000, 22);
    let d = Digest::sha256_of(&data);
    let mut tcp = TcpStream::connect(s.addr).unwrap();
    let head = format!(
        "POST /v2/cut/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        data.len()
    );
    tcp.write_all(head.as_bytes()).unwrap();
    tcp.write_all(&data[..3_000_000]).unwrap();
    tcp.flush().unwrap();
    // Wait until the partial bytes are on disk, so the kill really lands mid-upload.
    let on_disk = tessera_testkit::wait_until(Duration::from_secs(10), || {
        files_under(&s.data.join("uploads")).iter().any(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) > 0)
    });
    assert!(on_disk, "upload never reached the disk");
    s.kill();
    drop(tcp);
    assert!(!files_under(&s.data.join("uploads")).is_empty(), "partial bytes were being written");
    s.restart().unwrap();
    let api = Api::new(&s);
    let r = api.get(&format!("/v2/cut/blobs/{d}")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(files_under(&s.data.join("blobs")).is_empty(), "no blob file");
    assert!(files_under(&s.data.join("uploads")).is_empty(), "the orphaned partial upload was swept at start-up");
    // The client simply pushes again.
    assert_eq!(api.push_blob("cut", &data).await.unwrap(), d);
}

#[tokio::test]
async fn concurrent_pushes_of_one_blob_end_with_one_copy() {
    let s = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&s);
    let data = random_bytes(4_000_000, 23);
    let d = Digest::sha256_of(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let api = api.clone();
        let data = data.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                api.push_blob(&format!("same/r{i}"), &data).await.map(|_| ())
            } else {
                // Chunked sessions racing the monolithic ones.
                let r = api.http.post(api.url(&format!("/v2/same/r{i}/blobs/uploads/"))).send().await?;
                let location = r.headers()["location"].to_str()?.to_string();
                api.http.patch(api.url(&location)).body(data[..2_000_000].to_vec()).send().await?;
                let r = api
                    .http
                    .put(api.url(&format!("{location}?digest={d}")))
                    .body(data[2_000_000..].to_vec())
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 201, "status {}", r.status());
                Ok(())
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let blobs = files_under(&s.data.join("blobs"));
    assert_eq!(blobs.len(), 1, "one copy: {blobs:?}");
    assert_eq!(std::fs::read(&blobs[0]).unwrap(), data);
    assert!(files_under(&s.data.join("uploads")).is_empty());
    for i in 0..8 {
        assert_eq!(api.get(&format!("/v2/same/r{i}/blobs/{d}")).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let Some(disk) = SmallDisk::for_test("12m") else { return };
    let data_dir = disk.path().join("data");
    let s = Server::start_in(BIN, Some(&data_dir), &[]).unwrap();
    let api = Api::new(&s);
    let small = random_bytes(2_000_000, 31);
    let small_digest = api.push_blob("full", &small).await.unwrap();
    let big = random_bytes(16_000_000, 32);
    let big_digest = Digest::sha256_of(&big);
    let r = api
        .http
        .post(api.url(&format!("/v2/full/blobs/uploads/?digest={big_digest}")))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["connection"], "close", "the half-read connection is not offered for reuse");
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(api.get(&format!("/v2/full/blobs/{big_digest}")).await.unwrap().status(), 404);
    assert!(files_under(&data_dir.join("uploads")).is_empty(), "the failed upload's bytes were removed");
    // What was there before is intact, and the server keeps working.
    assert_eq!(api.get(&format!("/v2/full/blobs/{small_digest}")).await.unwrap().bytes().await.unwrap(), small);
    assert_eq!(api.push_blob("full", b"still works").await.unwrap(), Digest::sha256_of(b"still works"));
    drop(s);
}
