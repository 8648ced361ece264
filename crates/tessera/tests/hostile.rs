//! A table of hostile requests, sent as raw bytes (no client library normalises them), each
//! with the answer it must get; afterwards the stores must be exactly as before. The server
//! runs in-process, on a multi-threaded runtime so it answers while the test blocks on a socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tessera::testing::{InProcess, server_panics};
use tessera_spec::Digest;
use tessera_testkit::{Api, Image};

struct Case {
    what: &'static str,
    request: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    what: &'static str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    status: u16,
    code: &'static str,
) -> Case {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"))
    {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    Case { what, request, status, code }
}

/// Sends raw bytes, returns (status, body).
fn send(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_and_more_hostile_requests() {
    let server = InProcess::start().await.unwrap();
    let api = Api::at(server.addr);
    let image = Image::random(1, 5000);
    api.push_image("good/repo", "v1", &image).await.unwrap();
    let layer = Digest::sha256_of(&image.layers[0]).to_string();
    let r = api.http.post(api.url("/v2/good/repo/blobs/uploads/")).send().await.unwrap();
    let upload = r.headers()["location"].to_str().unwrap().to_string();
    let before = tessera_testkit::store_files(&server.data);
    let catalog_before = api.get("/v2/_catalog").await.unwrap().text().await.unwrap();

    let om = "application/vnd.oci.image.manifest.v1+json";
    let deep_json = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let wide_json = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{om}\",\"config\":{{\"mediaType\":\"x\",\"digest\":\"{layer}\",\"size\":1}},\"layers\":[{}]}}",
        vec!["{}"; 50_000].join(",")
    );
    let dup_keys = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{om}\",\"mediaType\":\"{om}\",\"config\":{{\"mediaType\":\"x\",\"digest\":\"{layer}\",\"size\":1}},\"layers\":[]}}"
    );
    let blob_path = format!("/v2/good/repo/blobs/{layer}");
    let other_repo_upload = upload.replace("/good/repo/", "/evil/repo/");
    let forged_upload = "/v2/good/repo/blobs/uploads/ffffffffffffffffffffffffffffffff";
    let cases = vec![
        // Traversal in every segment, plain, encoded and double-encoded.
        case("dotdot in name", "GET", "/v2/../good/repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("dotdot mid name", "GET", "/v2/good/../../repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("encoded dotdot", "GET", "/v2/%2e%2e/repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("upper encoded dotdot", "GET", "/v2/good/%2E%2E/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("double encoded dotdot", "GET", "/v2/%252e%252e/repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("encoded slash", "GET", "/v2/good%2frepo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("backslash", "GET", "/v2/good\\repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("absolute in name", "GET", "/v2//etc/passwd/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("dot segment", "GET", "/v2/./good/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("null byte", "GET", "/v2/good%00repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("traversal as tag", "GET", "/v2/good/repo/manifests/..%2f..%2fmeta.sqlite", &[], b"", 404, "MANIFEST_UNKNOWN"),
        case("traversal as tag on PUT", "PUT", "/v2/good/repo/manifests/..%2fx", &[("Content-Type", om)], b"{}", 400, "TAG_INVALID"),
        case("traversal as digest", "GET", "/v2/good/repo/blobs/sha256:..%2f..%2f..%2fmeta.sqlite", &[], b"", 400, "DIGEST_INVALID"),
        case("raw traversal after blobs", "GET", "/v2/good/repo/blobs/sha256:../../../meta.sqlite", &[], b"", 404, "NOT_FOUND"),
        case("traversal as upload id", "PATCH", "/v2/good/repo/blobs/uploads/..%2f..%2fmeta.sqlite", &[], b"x", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("raw traversal after uploads", "PATCH", "/v2/good/repo/blobs/uploads/../../../../x", &[], b"x", 404, "NOT_FOUND"),
        case("uppercase digest", "GET", &format!("/v2/good/repo/blobs/{}", layer.to_uppercase()), &[], b"", 400, "DIGEST_INVALID"),
        case("short digest", "GET", "/v2/good/repo/blobs/sha256:abc", &[], b"", 400, "DIGEST_INVALID"),
        case("unknown algorithm", "GET", "/v2/good/repo/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", &[], b"", 400, "DIGEST_INVALID"),
        case("name too long", "GET", &format!("/v2/{}/manifests/v1", "a".repeat(400)), &[], b"", 400, "NAME_INVALID"),
        case("uppercase name", "GET", "/v2/Good/Repo/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        case("invalid UTF-8 in path", "GET", "/v2/good/\u{fffd}/manifests/v1", &[], b"", 400, "NAME_INVALID"),
        // Ranges.
        case("huge range start", "GET", &blob_path, &[("Range", "bytes=99999999999999999-")], b"", 416, "RANGE_INVALID"),
        case("overflowing range", "GET", &blob_path, &[("Range", "bytes=0-999999999999999999999999")], b"", 416, "RANGE_INVALID"),
        case("negative range", "GET", &blob_path, &[("Range", "bytes=-0")], b"", 416, "RANGE_INVALID"),
        case("reversed range", "GET", &blob_path, &[("Range", "bytes=10-5")], b"", 416, "RANGE_INVALID"),
        case("multi range", "GET", &blob_path, &[("Range", "bytes=0-1,2-3")], b"", 416, "RANGE_INVALID"),
        case("garbage range", "GET", &blob_path, &[("Range", "bytes=a-b")], b"", 416, "RANGE_INVALID"),
        // Forged and foreign upload state.
        case("forged upload id", "PUT", &format!("{forged_upload}?digest={layer}"), &[], b"", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("another repository's upload", "PATCH", &other_repo_upload, &[], b"abc", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("upload status of a forged id", "GET", forged_upload, &[], b"", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("cancel a forged id", "DELETE", forged_upload, &[], b"", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("out of order chunk", "PATCH", &upload, &[("Content-Range", "100-102")], b"abc", 416, "BLOB_UPLOAD_INVALID"),
        case("range and length disagree", "PATCH", &upload, &[("Content-Range", "0-9")], b"abc", 400, "SIZE_INVALID"),
        case("malformed content-range", "PATCH", &upload, &[("Content-Range", "zero-nine")], b"abc", 400, "BLOB_UPLOAD_INVALID"),
        case("negative content-range", "PATCH", &upload, &[("Content-Range", "-3-0")], b"abc", 400, "BLOB_UPLOAD_INVALID"),
        case("close without digest", "PUT", &upload, &[], b"", 400, "DIGEST_INVALID"),
        case("close with a bad digest", "PUT", &format!("{upload}?digest=sha256:nothex"), &[], b"", 400, "DIGEST_INVALID"),
        case("monolithic with a wrong digest", "POST", &format!("/v2/good/repo/blobs/uploads/?digest={}", Digest::sha256_of(b"other")), &[], b"payload", 400, "DIGEST_INVALID"),
        case("monolithic with an invalid digest", "POST", "/v2/good/repo/blobs/uploads/?digest=sha256:zz", &[], b"payload", 400, "DIGEST_INVALID"),
        // Manifests.
        case("deep JSON", "PUT", "/v2/good/repo/manifests/bomb", &[("Content-Type", om)], deep_json.as_bytes(), 400, "MANIFEST_INVALID"),
        case("wide JSON", "PUT", "/v2/good/repo/manifests/wide", &[("Content-Type", om)], wide_json.as_bytes(), 400, "MANIFEST_INVALID"),
        case("duplicate keys", "PUT", "/v2/good/repo/manifests/dup", &[("Content-Type", om)], dup_keys.as_bytes(), 400, "MANIFEST_INVALID"),
        case("invalid UTF-8 manifest", "PUT", "/v2/good/repo/manifests/utf", &[("Content-Type", om)], &[0x7b, 0xff, 0xfe, 0x7d], 400, "MANIFEST_INVALID"),
        case("empty manifest", "PUT", "/v2/good/repo/manifests/empty", &[("Content-Type", om)], b"", 400, "MANIFEST_INVALID"),
        case("manifest of nulls", "PUT", "/v2/good/repo/manifests/nul", &[("Content-Type", om)], &[0u8; 64], 400, "MANIFEST_INVALID"),
        case("schema 1", "PUT", "/v2/good/repo/manifests/s1", &[("Content-Type", "application/vnd.docker.distribution.manifest.v1+prettyjws")], b"{\"schemaVersion\":1}", 400, "MANIFEST_INVALID"),
        case("unknown media type", "PUT", "/v2/good/repo/manifests/mt", &[("Content-Type", "text/html")], b"<html>", 400, "MANIFEST_INVALID"),
        case("huge declared manifest", "PUT", "/v2/good/repo/manifests/big", &[("Content-Type", om), ("Content-Length", "104857600")], b"", 413, "SIZE_INVALID"),
        case("manifest with missing blobs", "PUT", "/v2/good/repo/manifests/missing", &[("Content-Type", om)], format!("{{\"schemaVersion\":2,\"mediaType\":\"{om}\",\"config\":{{\"mediaType\":\"x\",\"digest\":\"{}\",\"size\":1}},\"layers\":[]}}", Digest::sha256_of(b"nope")).as_bytes(), 400, "MANIFEST_BLOB_UNKNOWN"),
        case("manifest with a lying size", "PUT", "/v2/good/repo/manifests/liar", &[("Content-Type", om)], format!("{{\"schemaVersion\":2,\"mediaType\":\"{om}\",\"config\":{{\"mediaType\":\"x\",\"digest\":\"{layer}\",\"size\":1}},\"layers\":[]}}").as_bytes(), 400, "SIZE_INVALID"),
        case("manifest with a negative size", "PUT", "/v2/good/repo/manifests/neg", &[("Content-Type", om)], format!("{{\"schemaVersion\":2,\"mediaType\":\"{om}\",\"config\":{{\"mediaType\":\"x\",\"digest\":\"{layer}\",\"size\":-1}},\"layers\":[]}}").as_bytes(), 400, "MANIFEST_INVALID"),
        case("manifest by a digest it does not have", "PUT", &format!("/v2/good/repo/manifests/{}", Digest::sha256_of(b"x")), &[("Content-Type", om)], &image.manifest, 400, "DIGEST_INVALID"),
        // Methods, endpoints, protocol.
        case("method not allowed", "POST", "/v2/good/repo/manifests/v1", &[], b"", 405, "UNSUPPORTED"),
        case("unknown method", "BREW", "/v2/", &[], b"", 405, "UNSUPPORTED"),
        case("delete the catalog", "DELETE", "/v2/_catalog", &[], b"", 405, "UNSUPPORTED"),
        case("unknown endpoint", "GET", "/v2/good/repo/secrets", &[], b"", 404, "NOT_FOUND"),
        case("not the API", "GET", "/etc/passwd", &[], b"", 404, "NOT_FOUND"),
        case("pagination not a number", "GET", "/v2/good/repo/tags/list?n=-5", &[], b"", 400, "PAGINATION_NUMBER_INVALID"),
        case("pagination overflow", "GET", "/v2/_catalog?n=99999999999999999999999", &[], b"", 400, "PAGINATION_NUMBER_INVALID"),
        case("oversized header", "GET", "/v2/", &[("X-Junk", &"a".repeat(100_000))], b"", 431, ""),
        // containerd's ns pointing at internal addresses: nothing configured answers for it.
        case("ns at loopback", "GET", "/v2/good/repo/manifests/v1?ns=127.0.0.1:22", &[], b"", 200, ""),
        case("ns at metadata service", "GET", "/v2/evil/x/manifests/v1?ns=169.254.169.254", &[], b"", 404, "MANIFEST_UNKNOWN"),
        case("ns with a URL", "GET", "/v2/evil/x/manifests/v1?ns=http://10.0.0.1/", &[], b"", 404, "MANIFEST_UNKNOWN"),
        // Authorization headers on an open registry are ignored, not trusted.
        case("alg none token", "GET", "/v2/good/repo/manifests/v1", &[("Authorization", "Bearer eyJhbGciOiJub25lIn0.e30.")], b"", 200, ""),
        // Tessera's blob location API (metadata-only push): names, digests, documents, URLs.
        case("location traversal", "PUT", &format!("/tessera/v1/../../etc/blobs/{layer}"), &[], b"{}", 400, "NAME_INVALID"),
        case("location encoded traversal", "PUT", &format!("/tessera/v1/good%2F..%2Frepo/blobs/{layer}"), &[], b"{}", 400, "NAME_INVALID"),
        case("location bad digest", "GET", "/tessera/v1/good/repo/blobs/sha256:zz", &[], b"", 400, "DIGEST_INVALID"),
        case("location not JSON", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l1")), &[], b"not json", 400, "BLOB_LOCATION_INVALID"),
        case("location huge document", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l2")), &[], "a".repeat(100_000).as_bytes(), 413, "SIZE_INVALID"),
        case("location javascript URL", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l3")), &[], br#"{"size":1,"urls":["javascript:alert(1)"]}"#, 403, "DENIED"),
        case("location file URL", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l4")), &[], br#"{"size":1,"urls":["file:///etc/passwd"]}"#, 403, "DENIED"),
        case("location metadata service", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l5")), &[], br#"{"size":1,"urls":["http://169.254.169.254/latest/"]}"#, 403, "DENIED"),
        case("location without URLs", "PUT", &format!("/tessera/v1/good/repo/blobs/{}", Digest::sha256_of(b"l6")), &[], br#"{"size":1,"urls":[]}"#, 400, "BLOB_LOCATION_INVALID"),
        case("location of a blob never linked", "GET", &format!("/tessera/v1/nope/x/blobs/{layer}"), &[], b"", 404, "BLOB_UNKNOWN"),
        case("stream asked where nothing redirects", "GET", &format!("{blob_path}?delivery=stream"), &[], b"", 200, ""),
    ];
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for c in &cases {
        let (status, body) = send(server.addr, &c.request);
        assert_eq!(status, c.status, "{}: {body}", c.what);
        if !c.code.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            assert_eq!(v["errors"][0]["code"], c.code, "{}: {body}", c.what);
            assert!(
                !body.contains("/tmp") && !body.contains("tessera-data") && !body.contains("panicked"),
                "{}: leaks {body}",
                c.what
            );
        }
    }
    assert_eq!(tessera_testkit::store_files(&server.data), before, "stores unchanged by every hostile request");
    assert_eq!(api.get("/v2/_catalog").await.unwrap().text().await.unwrap(), catalog_before);
    assert_eq!(api.get("/v2/good/repo/manifests/v1").await.unwrap().status(), 200, "still serving");
    assert_eq!(server_panics(), 0, "nothing panicked");
}
