//! Hostile and broken requests: each gets its code from the one error table, the server
//! stays up, and the stores are left exactly as they were. The server runs in-process; tests
//! that speak raw TCP from blocking sockets run on a multi-threaded runtime so it keeps
//! answering meanwhile.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::json;
use tessera::testing::{InProcess, server_panics};
use tessera_spec::Digest;
use tessera_testkit::{Api, Image, error_code, random_bytes};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A server configured by `toml` (as `tessera serve --config` with a file holding it).
async fn start(toml: &str) -> (InProcess, Api) {
    let server = InProcess::with_toml(toml).await.expect("server starts");
    let api = Api::at(server.addr);
    (server, api)
}

async fn catalog(api: &Api) -> serde_json::Value {
    api.get("/v2/_catalog").await.unwrap().json::<serde_json::Value>().await.unwrap()["repositories"].clone()
}

/// Sends raw bytes and returns what the server answers (up to a close or 5 s).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && !out.starts_with(b"HTTP/1.1 100") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_references_and_digests() {
    let (s, api) = start("").await;
    let image = Image::random(1, 10);
    api.push_image("good/repo", "v1", &image).await.unwrap();
    let before = tessera_testkit::store_files(&s.data);
    let d = Digest::sha256_of(b"x");
    let cases: Vec<(String, &str, u16, &str)> = vec![
        ("/v2/%252e%252e/manifests/v1".into(), "GET", 400, "NAME_INVALID"),
        ("/v2//etc/passwd/manifests/v1".into(), "GET", 400, "NAME_INVALID"),
        ("/v2/Good/manifests/v1".into(), "GET", 400, "NAME_INVALID"),
        ("/v2/good%2frepo/manifests/v1".into(), "GET", 400, "NAME_INVALID"),
        (format!("/v2/{}/manifests/v1", "a".repeat(300)), "GET", 400, "NAME_INVALID"),
        // A tag that cannot exist is not found (as Distribution and the conformance suite
        // have it); only creating one is refused as invalid.
        ("/v2/good/repo/manifests/..%2f..%2fmeta.sqlite".into(), "GET", 404, "MANIFEST_UNKNOWN"),
        ("/v2/good/repo/manifests/.INVALID_MANIFEST_NAME".into(), "HEAD", 404, ""),
        ("/v2/good/repo/manifests/..%2fx".into(), "PUT", 400, "TAG_INVALID"),
        ("/v2/good/repo/manifests/-bad".into(), "PUT", 400, "TAG_INVALID"),
        (format!("/v2/good/repo/manifests/{}", "t".repeat(129)), "PUT", 400, "TAG_INVALID"),
        ("/v2/good/repo/blobs/sha256:%2e%2e".into(), "GET", 400, "DIGEST_INVALID"),
        ("/v2/good/repo/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(), "GET", 400, "DIGEST_INVALID"),
        (format!("/v2/good/repo/blobs/{}", d.to_string().to_uppercase()), "GET", 400, "DIGEST_INVALID"),
        ("/v2/good/repo/blobs/uploads/..%2f..%2fblobs".into(), "PATCH", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("/v2/good/repo/blobs/uploads/00000000000000000000000000000000".into(), "PUT", 404, "BLOB_UPLOAD_UNKNOWN"),
        (format!("/v2/good/repo/blobs/uploads/?digest=sha256:{}", "0".repeat(63)), "POST", 400, "DIGEST_INVALID"),
        ("/v2/good/repo/referrers/sha256:zz".into(), "GET", 400, "DIGEST_INVALID"),
        ("/v2/good/repo/manifests/v1".into(), "POST", 405, "UNSUPPORTED"),
        ("/v2/good/repo/tags/list".into(), "DELETE", 405, "UNSUPPORTED"),
        ("/v2/_catalog".into(), "PUT", 405, "UNSUPPORTED"),
        ("/v2/good/repo/nothing".into(), "GET", 404, "NOT_FOUND"),
        ("/etc/passwd".into(), "GET", 404, "NOT_FOUND"),
    ];
    for (path, method, status, code) in cases {
        let r = api
            .http
            .request(method.parse().unwrap(), api.url(&path))
            .header("content-type", OCI_MANIFEST)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        if method == "HEAD" {
            continue;
        }
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{method} {path}");
        assert!(body["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Dot segments as sent on the wire (HTTP client libraries would normalise them away).
    for (path, status, code) in [
        ("/v2/../../etc/passwd/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/good/../repo/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/good/repo/../../../blobs/uploads/", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/good/%2E%2E/blobs/uploads/", 400, "NAME_INVALID"),
        ("/v2/good/repo/blobs/sha256:../../../meta.sqlite", 404, "NOT_FOUND"),
        ("/v2/good/repo/blobs/uploads/../../../../meta.sqlite", 404, "NOT_FOUND"),
    ] {
        let answer = raw(s.addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {answer}");
        assert!(answer.contains(code), "{path}: {answer}");
    }
    assert_eq!(tessera_testkit::store_files(&s.data), before, "stores unchanged");
    assert_eq!(catalog(&api).await, json!(["good/repo"]));
    assert_eq!(server_panics(), 0, "nothing panicked");
}

#[tokio::test]
async fn malformed_manifests_are_refused() {
    let (s, api) = start("").await;
    let image = Image::random(1, 10);
    for b in image.blobs() {
        api.push_blob("m", b).await.unwrap();
    }
    let before = tessera_testkit::store_files(&s.data);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let config = Digest::sha256_of(&image.config).to_string();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"".to_vec(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (b"{".to_vec(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (b"null".to_vec(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (deep.into_bytes(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (vec![0xff, 0xfe, 0x7b, 0x7d], OCI_MANIFEST, "MANIFEST_INVALID"),
        (br#"{"schemaVersion":2,"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#.to_vec(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (br#"{"schemaVersion":1,"name":"m","tag":"v1","fsLayers":[]}"#.to_vec(), "application/vnd.docker.distribution.manifest.v1+prettyjws", "MANIFEST_INVALID"),
        (json!({"schemaVersion":2,"config":{"mediaType":"a","digest":config,"size":-5},"layers":[]}).to_string().into_bytes(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (json!({"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:nope","size":1},"layers":[]}).to_string().into_bytes(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}).to_string().into_bytes(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (image.manifest.clone(), "text/plain", "MANIFEST_INVALID"),
    ];
    for (i, (body, content_type, code)) in cases.into_iter().enumerate() {
        let r = api.push_manifest("m", "v1", content_type, &body).await.unwrap();
        assert_eq!(r.status(), 400, "case {i}");
        assert_eq!(error_code(r).await, code, "case {i}");
    }
    // Over the 4 MiB limit: 413, whether the length is declared or streamed.
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = api.push_manifest("m", "v1", OCI_MANIFEST, &big).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "SIZE_INVALID");
    let stream = futures_util::stream::iter((0..5).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024 * 1024])));
    let r = api
        .http
        .put(api.url("/v2/m/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(api.get("/v2/m/manifests/v1").await.unwrap().status(), 404, "nothing was stored");
    assert_eq!(tessera_testkit::store_files(&s.data), before);
    assert_eq!(server_panics(), 0, "nothing panicked");
}

#[tokio::test]
async fn broken_upload_requests() {
    let (_s, api) = start("").await;
    let r = api.http.post(api.url("/v2/u/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    for (range, len, status, code) in [
        ("0-9", 5usize, 400, "SIZE_INVALID"),
        ("nonsense", 5, 400, "BLOB_UPLOAD_INVALID"),
        ("9-0", 10, 400, "BLOB_UPLOAD_INVALID"),
        ("100-104", 5, 416, "BLOB_UPLOAD_INVALID"),
        ("-5-4", 10, 400, "BLOB_UPLOAD_INVALID"),
        ("0-99999999999999999999999", 5, 400, "BLOB_UPLOAD_INVALID"),
    ] {
        let r = api
            .http
            .patch(api.url(&location))
            .header("content-range", range)
            .body(vec![1u8; len])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{range}");
        assert_eq!(error_code(r).await, code, "{range}");
    }
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.headers()["range"], "0-0", "refused chunks added nothing");
    assert_eq!(server_panics(), 0, "nothing panicked");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (s, api) = start("").await;
    let r = api.http.get(api.url("/v2/")).header("x-junk", "a".repeat(100 * 1024)).send().await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => panic!("expected a 431 answer, got {e}"),
    }
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200);
    drop(s);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_client_on_plain_listener_gets_an_http_answer_at_once() {
    let (s, _api) = start("").await;
    // The first bytes of a TLS 1.2 ClientHello record.
    let answer = raw(s.addr, &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]);
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnecting_mid_upload_loses_nothing_already_acknowledged() {
    let (s, api) = start("").await;
    let data = random_bytes(2_000_000, 11);
    let d = Digest::sha256_of(&data);
    let r = api.http.post(api.url("/v2/dc/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = api
        .http
        .patch(api.url(&location))
        .header("content-range", "0-499999")
        .body(data[..500_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // A chunk that promises 1 MB and delivers 300 kB before the connection drops.
    {
        let mut tcp = TcpStream::connect(s.addr).unwrap();
        let head = format!(
            "PATCH {location} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: 500000-1499999\r\nContent-Length: 1000000\r\n\r\n",
            s.addr
        );
        tcp.write_all(head.as_bytes()).unwrap();
        tcp.write_all(&data[500_000..800_000]).unwrap();
        tcp.flush().unwrap();
        // The client stops sending; the server is done with the cut request when it closes
        // the connection (after an error answer, or without one).
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
    }
    // The server reports what it holds; the client resumes from there.
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let range = r.headers()["range"].to_str().unwrap().to_string();
    let offset = range.trim_start_matches("0-").parse::<u64>().unwrap() + 1;
    assert!((500_000..=800_000).contains(&offset), "offset {offset}");
    let rest = &data[offset as usize..];
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={d}")))
        .header("content-range", format!("{offset}-{}", data.len() - 1))
        .body(rest.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(api.get(&format!("/v2/dc/blobs/{d}")).await.unwrap().bytes().await.unwrap(), data);
}

#[tokio::test]
async fn blob_size_limit() {
    let (s, api) = start("[limits]\nblob_max_bytes = 1000\n").await;
    let before = tessera_testkit::store_files(&s.data);
    let data = random_bytes(5000, 1);
    let d = Digest::sha256_of(&data);
    let r =
        api.http.post(api.url(&format!("/v2/big/blobs/uploads/?digest={d}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(api.get(&format!("/v2/big/blobs/{d}")).await.unwrap().status(), 404);
    assert_eq!(tessera_testkit::store_files(&s.data), before, "nothing left behind");
    assert_eq!(api.push_blob("big", &data[..1000]).await.unwrap(), Digest::sha256_of(&data[..1000]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_chunk_is_drained_and_the_connection_stays_usable() {
    let (s, _api) = start("").await;
    let mut tcp = TcpStream::connect(s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut exchange = |request: &[u8]| -> String {
        tcp.write_all(request).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let answer = exchange(b"POST /v2/keep/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    let location = answer.lines().find_map(|l| l.strip_prefix("location: ")).unwrap().trim().to_string();
    let body = vec![7u8; 200_000];
    let mut request = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Range: 100-199999\r\nContent-Length: {}\r\n\r\n",
        body.len() - 100
    )
    .into_bytes();
    request.extend_from_slice(&body[100..]);
    let answer = exchange(&request);
    assert!(answer.starts_with("HTTP/1.1 416"), "{answer}");
    assert!(!answer.to_lowercase().contains("connection: close"), "{answer}");
    let answer = exchange(format!("GET {location} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 204"), "same connection still serves: {answer}");
    assert!(answer.contains("range: 0-0"), "{answer}");
}
