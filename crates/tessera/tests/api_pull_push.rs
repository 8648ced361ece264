//! The OCI Distribution Spec's pull and push areas, against the server run in-process.

use reqwest::header::HeaderMap;
use serde_json::json;
use tessera::testing::InProcess;
use tessera_spec::{Algorithm, Digest};
use tessera_testkit::{Api, Image, error_code, random_bytes};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

async fn start() -> (InProcess, Api) {
    let server = InProcess::start().await.expect("server starts");
    let api = Api::at(server.addr);
    (server, api)
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let (_s, api) = start().await;
    let r = api.get("/v2/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(r.headers(), "docker-distribution-api-version"), "registry/2.0");
    let r = api.get("/v2").await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn pushed_image_pulls_back_byte_for_byte() {
    let (_s, api) = start().await;
    let image = Image::random(3, 100_000);
    let digest = api.push_image("lib/app", "v1", &image).await.unwrap();

    let r = api.http.get(api.url("/v2/lib/app/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(r.headers(), "content-type"), OCI_MANIFEST);
    assert_eq!(h(r.headers(), "docker-content-digest"), digest.to_string());
    assert_eq!(h(r.headers(), "content-length"), image.manifest.len().to_string());
    assert_eq!(r.bytes().await.unwrap(), image.manifest);

    let r = api.http.head(api.url(&format!("/v2/lib/app/manifests/{digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(r.headers(), "content-length"), image.manifest.len().to_string());
    assert_eq!(h(r.headers(), "docker-content-digest"), digest.to_string());
    assert!(r.bytes().await.unwrap().is_empty());

    for blob in image.blobs() {
        let d = Digest::sha256_of(blob);
        let r = api.get(&format!("/v2/lib/app/blobs/{d}")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(h(r.headers(), "docker-content-digest"), d.to_string());
        assert_eq!(r.bytes().await.unwrap(), &blob[..]);
        let r = api.http.head(api.url(&format!("/v2/lib/app/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(h(r.headers(), "content-length"), blob.len().to_string());
    }
}

#[tokio::test]
async fn unknown_things_are_404_with_their_code() {
    let (_s, api) = start().await;
    let image = Image::random(1, 10);
    api.push_image("a/b", "v1", &image).await.unwrap();
    let missing = Digest::sha256_of(b"missing");
    let r = api.get("/v2/a/b/manifests/nope").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = api.get(&format!("/v2/a/b/manifests/{missing}")).await.unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = api.get("/v2/no/such/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 404);
    let r = api.get(&format!("/v2/a/b/blobs/{missing}")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = api.http.head(api.url(&format!("/v2/a/b/blobs/{missing}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn blobs_are_visible_only_in_repositories_that_link_them() {
    let (_s, api) = start().await;
    let d = api.push_blob("team/one", b"private layer").await.unwrap();
    assert_eq!(api.get(&format!("/v2/team/one/blobs/{d}")).await.unwrap().status(), 200);
    let r = api.get(&format!("/v2/team/two/blobs/{d}")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn range_reads() {
    let (_s, api) = start().await;
    let data = random_bytes(1_000_000, 7);
    let d = api.push_blob("r/x", &data).await.unwrap();
    let url = api.url(&format!("/v2/r/x/blobs/{d}"));
    let r = api.http.get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(h(r.headers(), "content-range"), "bytes 10-19/1000000");
    assert_eq!(r.bytes().await.unwrap(), &data[10..20]);
    let r = api.http.get(&url).header("range", "bytes=999000-").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &data[999_000..]);
    let r = api.http.get(&url).header("range", "bytes=-5").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), &data[999_995..]);
    let r = api.http.get(&url).header("range", "bytes=1000000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(h(r.headers(), "content-range"), "bytes */1000000");
    let r = api.http.get(&url).header("range", "bytes=5-1").send().await.unwrap();
    assert_eq!(r.status(), 416);
}

#[tokio::test]
async fn post_then_put_upload() {
    let (_s, api) = start().await;
    let data = random_bytes(300_000, 1);
    let d = Digest::sha256_of(&data);
    let r = api.http.post(api.url("/v2/p/q/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = h(r.headers(), "location").to_string();
    assert!(location.starts_with("/v2/p/q/blobs/uploads/"), "{location}");
    assert!(!h(r.headers(), "docker-upload-uuid").is_empty());
    let r = api.http.put(api.url(&format!("{location}?digest={d}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(h(r.headers(), "location"), format!("/v2/p/q/blobs/{d}"));
    assert_eq!(h(r.headers(), "docker-content-digest"), d.to_string());
    assert_eq!(api.get(&format!("/v2/p/q/blobs/{d}")).await.unwrap().bytes().await.unwrap(), data);
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let (_s, api) = start().await;
    let data = random_bytes(3_000_000, 2);
    let d = Digest::sha256_of(&data);
    let r = api.http.post(api.url("/v2/c/blobs/uploads/")).send().await.unwrap();
    let mut location = h(r.headers(), "location").to_string();
    let id = h(r.headers(), "docker-upload-uuid").to_string();

    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(h(r.headers(), "range"), "0-0");

    let (a, rest) = data.split_at(1_000_000);
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-type", "application/octet-stream")
        .header("content-range", "0-999999")
        .body(a.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(h(r.headers(), "range"), "0-999999");
    assert_eq!(h(r.headers(), "docker-upload-uuid"), id);
    location = h(r.headers(), "location").to_string();

    // A chunk that does not start at the current offset: 416 and the offset in Range.
    let r = api.http.patch(api.url(&location)).header("content-range", "5-9").body(vec![0u8; 5]).send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(h(r.headers(), "range"), "0-999999");
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");

    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(h(r.headers(), "range"), "0-999999");
    assert_eq!(h(r.headers(), "docker-upload-uuid"), id);

    let (b, c) = rest.split_at(1_500_000);
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-range", "1000000-2499999")
        .body(b.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(h(r.headers(), "range"), "0-2499999");
    // The last chunk arrives with the closing PUT.
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={d}")))
        .header("content-range", "2500000-2999999")
        .body(c.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(api.get(&format!("/v2/c/blobs/{d}")).await.unwrap().bytes().await.unwrap(), data);
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404, "a finished upload is gone");
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn chunks_without_content_range_append() {
    let (_s, api) = start().await;
    let data = random_bytes(200_000, 3);
    let r = api.http.post(api.url("/v2/c/blobs/uploads/")).send().await.unwrap();
    let location = h(r.headers(), "location").to_string();
    for part in data.chunks(64_000) {
        let r = api.http.patch(api.url(&location)).body(part.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let d = Digest::sha256_of(&data);
    let r = api.http.put(api.url(&format!("{location}?digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn wrong_digest_is_refused_and_leaves_nothing() {
    let (s, api) = start().await;
    let wrong = Digest::sha256_of(b"something else");
    let r = api
        .http
        .post(api.url(&format!("/v2/w/blobs/uploads/?digest={wrong}")))
        .body("actual bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert_eq!(api.get(&format!("/v2/w/blobs/{wrong}")).await.unwrap().status(), 404);

    let r = api.http.post(api.url("/v2/w/blobs/uploads/")).send().await.unwrap();
    let location = h(r.headers(), "location").to_string();
    let r = api.http.put(api.url(&format!("{location}?digest={wrong}"))).body("other bytes").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert_eq!(api.http.get(api.url(&location)).send().await.unwrap().status(), 404, "the failed session is discarded");
    let stored = s.blobs().await.unwrap();
    assert!(stored.upload_list().await.unwrap().is_empty(), "no upload bytes left behind");
    assert!(stored.list().await.unwrap().is_empty(), "no blob stored");

    let r = api.http.put(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404, "closing a discarded session");
}

#[tokio::test]
async fn put_without_digest_and_unknown_sessions() {
    let (_s, api) = start().await;
    let r = api.http.post(api.url("/v2/u/blobs/uploads/")).send().await.unwrap();
    let location = h(r.headers(), "location").to_string();
    let r = api.http.put(api.url(&location)).body("x").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    let r = api.get("/v2/u/blobs/uploads/0123456789abcdef0123456789abcdef").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = api.get("/v2/u/blobs/uploads/not-an-id").await.unwrap();
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // A session belongs to the repository it was opened in.
    let other = location.replace("/v2/u/", "/v2/other/");
    let r = api.http.patch(api.url(&other)).body("x").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn cancel_upload() {
    let (_s, api) = start().await;
    let r = api.http.post(api.url("/v2/x/blobs/uploads/")).send().await.unwrap();
    let location = h(r.headers(), "location").to_string();
    api.http.patch(api.url(&location)).body("abc").send().await.unwrap();
    let r = api.http.delete(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = api.http.delete(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn cross_repository_mount() {
    let (_s, api) = start().await;
    let d = api.push_blob("src/repo", b"shared base layer").await.unwrap();
    let r =
        api.http.post(api.url(&format!("/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(h(r.headers(), "location"), format!("/v2/dst/repo/blobs/{d}"));
    assert_eq!(h(r.headers(), "docker-content-digest"), d.to_string());
    assert_eq!(
        api.get(&format!("/v2/dst/repo/blobs/{d}")).await.unwrap().bytes().await.unwrap(),
        &b"shared base layer"[..]
    );

    // Not mountable from a repository that lacks it: an ordinary session instead.
    let r = api.http.post(api.url(&format!("/v2/dst/two/blobs/uploads/?mount={d}&from=no/such"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = h(r.headers(), "location").to_string();
    let r =
        api.http.put(api.url(&format!("{location}?digest={d}"))).body(&b"shared base layer"[..]).send().await.unwrap();
    assert_eq!(r.status(), 201);

    // Without `from`, a blob the registry already has is mounted.
    let r = api.http.post(api.url(&format!("/v2/dst/three/blobs/uploads/?mount={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let unknown = Digest::sha256_of(b"never pushed");
    let r = api.http.post(api.url(&format!("/v2/dst/four/blobs/uploads/?mount={unknown}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn sha512_blobs_and_manifests() {
    let (_s, api) = start().await;
    let data = random_bytes(50_000, 9);
    let d = Digest::of(Algorithm::Sha512, &data);
    let r =
        api.http.post(api.url(&format!("/v2/s/blobs/uploads/?digest={d}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(api.get(&format!("/v2/s/blobs/{d}")).await.unwrap().bytes().await.unwrap(), data);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d.to_string(), "size": data.len()},
        "layers": [],
    }))
    .unwrap();
    let md = Digest::of(Algorithm::Sha512, &manifest);
    let r = api.push_manifest("s", &md.to_string(), OCI_MANIFEST, &manifest).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(h(r.headers(), "docker-content-digest"), md.to_string());
    assert_eq!(api.get(&format!("/v2/s/manifests/{md}")).await.unwrap().bytes().await.unwrap(), manifest);
    let r = api
        .http
        .post(api.url("/v2/s/blobs/uploads/?digest=md5:d41d8cd98f00b204e9800998ecf8427e"))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
}

#[tokio::test]
async fn manifests_must_reference_known_content() {
    let (_s, api) = start().await;
    let image = Image::random(2, 1000);
    // Only the config is pushed: the layers are missing.
    api.push_blob("m/x", &image.config).await.unwrap();
    let r = api.push_manifest("m/x", "v1", OCI_MANIFEST, &image.manifest).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(api.get("/v2/m/x/manifests/v1").await.unwrap().status(), 404, "nothing stored");

    // A manifest by digest must hash to that digest.
    for l in &image.layers {
        api.push_blob("m/x", l).await.unwrap();
    }
    let wrong = Digest::sha256_of(b"other");
    let r = api.push_manifest("m/x", &wrong.to_string(), OCI_MANIFEST, &image.manifest).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = api.push_manifest("m/x", &image.digest().to_string(), OCI_MANIFEST, &image.manifest).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(h(r.headers(), "location"), format!("/v2/m/x/manifests/{}", image.digest()));

    // A descriptor whose size disagrees with the blob.
    let mut m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    m["layers"][0]["size"] = json!(1);
    let r = api.push_manifest("m/x", "bad-size", OCI_MANIFEST, &serde_json::to_vec(&m).unwrap()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "SIZE_INVALID");
}

async fn push_index(
    api: &Api,
    name: &str,
    tag: &str,
    children: &[&Image],
    media_type: &str,
    child_type: &str,
) -> (reqwest::StatusCode, Vec<u8>) {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media_type,
        "manifests": children.iter().enumerate().map(|(i, c)| json!({
            "mediaType": child_type, "digest": c.digest().to_string(), "size": c.manifest.len(),
            "platform": {"architecture": if i == 0 { "amd64" } else { "arm64" }, "os": "linux"},
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let r = api.push_manifest(name, tag, media_type, &index).await.unwrap();
    (r.status(), index)
}

#[tokio::test]
async fn image_index_needs_its_children_and_respects_accept() {
    let (_s, api) = start().await;
    let a = Image::random(1, 100);
    let b = Image::random(1, 100);
    api.push_image("multi", "amd64", &a).await.unwrap();
    let (status, _) = push_index(&api, "multi", "latest", &[&a, &b], OCI_INDEX, OCI_MANIFEST).await;
    assert_eq!(status, 400, "child b is missing");
    api.push_image("multi", "arm64", &b).await.unwrap();
    let (status, index) = push_index(&api, "multi", "latest", &[&a, &b], OCI_INDEX, OCI_MANIFEST).await;
    assert_eq!(status, 201);

    let r = api
        .http
        .get(api.url("/v2/multi/manifests/latest"))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(r.headers(), "content-type"), OCI_INDEX);
    assert_eq!(r.bytes().await.unwrap(), index);
    let r = api.http.get(api.url("/v2/multi/manifests/latest")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 404, "a client that cannot read an index is not handed one");
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = api.http.get(api.url("/v2/multi/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 200, "no Accept means anything");
}

#[tokio::test]
async fn docker_schema2_manifest_and_list() {
    let (_s, api) = start().await;
    let image = Image::random(1, 500);
    for b in image.blobs() {
        api.push_blob("d/s2", b).await.unwrap();
    }
    let mut m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    m["mediaType"] = json!("application/vnd.docker.distribution.manifest.v2+json");
    m["config"]["mediaType"] = json!("application/vnd.docker.container.image.v1+json");
    m["layers"][0]["mediaType"] = json!("application/vnd.docker.image.rootfs.diff.tar.gzip");
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    let r =
        api.push_manifest("d/s2", "v1", "application/vnd.docker.distribution.manifest.v2+json", &bytes).await.unwrap();
    assert_eq!(r.status(), 201);
    let r = api.get("/v2/d/s2/manifests/v1").await.unwrap();
    assert_eq!(h(r.headers(), "content-type"), "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(r.bytes().await.unwrap(), bytes, "pretty-printed bytes kept exactly");

    let child = Image { config: image.config.clone(), layers: image.layers.clone(), manifest: bytes.clone() };
    let (status, _) = push_index(
        &api,
        "d/s2",
        "list",
        &[&child],
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    .await;
    assert_eq!(status, 201);
    let r = api.get("/v2/d/s2/manifests/list").await.unwrap();
    assert_eq!(h(r.headers(), "content-type"), "application/vnd.docker.distribution.manifest.list.v2+json");
}

#[tokio::test]
async fn artifacts_with_subject_and_referrers() {
    let (_s, api) = start().await;
    let image = Image::random(1, 100);
    let subject = api.push_image("art", "v1", &image).await.unwrap();

    let r = api.get(&format!("/v2/art/referrers/{subject}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(r.headers(), "content-type"), OCI_INDEX);
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index["manifests"], json!([]), "no referrers yet: an empty index");

    let empty = api.push_blob("art", b"{}").await.unwrap();
    let sig = api.push_blob("art", b"signature bytes").await.unwrap();
    let mut referrer_digests = Vec::new();
    for (artifact_type, note) in [("application/vnd.example.sig", "first"), ("application/vnd.example.sbom", "second")]
    {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig.to_string(), "size": 15}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": image.manifest.len()},
            "annotations": {"note": note},
        }))
        .unwrap();
        let d = Digest::sha256_of(&m);
        let r = api.push_manifest("art", &d.to_string(), OCI_MANIFEST, &m).await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(h(r.headers(), "oci-subject"), subject.to_string());
        referrer_digests.push((d, m.len()));
    }

    let r = api.get(&format!("/v2/art/referrers/{subject}")).await.unwrap();
    assert!(r.headers().get("oci-filters-applied").is_none());
    let index: serde_json::Value = r.json().await.unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    assert_eq!(manifests[0]["digest"], referrer_digests[0].0.to_string());
    assert_eq!(manifests[0]["size"], referrer_digests[0].1);
    assert_eq!(manifests[0]["artifactType"], "application/vnd.example.sig");
    assert_eq!(manifests[0]["annotations"]["note"], "first");
    assert_eq!(manifests[0]["mediaType"], OCI_MANIFEST);

    let r = api.get(&format!("/v2/art/referrers/{subject}?artifactType=application/vnd.example.sbom")).await.unwrap();
    assert_eq!(h(r.headers(), "oci-filters-applied"), "artifactType");
    let index: serde_json::Value = r.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["annotations"]["note"], "second");

    // A subject that does not exist (yet) is fine: referrers may arrive first.
    let ghost = Digest::sha256_of(b"ghost");
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": ghost.to_string(), "size": 1},
    }))
    .unwrap();
    let r = api.push_manifest("art", "ghost-sig", OCI_MANIFEST, &m).await.unwrap();
    assert_eq!(r.status(), 201);
    let index: serde_json::Value = api.get(&format!("/v2/art/referrers/{ghost}")).await.unwrap().json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let r = api.get("/v2/art/referrers/sha256:abc").await.unwrap();
    assert_eq!(r.status(), 400);
}
