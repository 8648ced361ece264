//! Whose credentials an upstream sees: by default only its configured ones (a client's
//! never leave Tessera); on a route with `credentials = "passthrough"`, the client's own,
//! with the upstream's challenges relayed and every answer, cached or not, authorised by
//! the upstream for that client. Tessera runs in-process; a test that waits on a blocking
//! client program runs on a multi-threaded runtime so it keeps answering meanwhile.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use tessera::testing::InProcess;
use tessera_spec::Digest;
use tessera_testkit::clients::ContainersFiles;
use tessera_testkit::{Api, Distribution, Image, have_tool, htpasswd_file};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test(flavor = "multi_thread")]
async fn passed_through_credentials_are_checked_by_the_upstream_for_every_answer() {
    if !have_tool("/usr/bin/docker-registry") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let upstream_users = htpasswd_file(dir.path(), &[("alice", "secret")]);
    let dist = Distribution::start(Some(&upstream_users)).unwrap();
    let image = Image::random(2, 40_000);
    Api::at(dist.addr).logged_in("alice", "secret").push_image("team/app", "v1", &image).await.unwrap();

    let ours = dir.path().join("ours");
    std::fs::create_dir_all(&ours).unwrap();
    let our_users = htpasswd_file(&ours, &[("bob", "builder")]);
    let server = InProcess::with_toml(&format!(
        "[auth]\nhtpasswd = \"{}\"\n[[upstream]]\nname = \"dist\"\nurl = \"http://{}\"\n\
             [[route]]\nprefix = \"priv\"\nto = \"dist\"\ncredentials = \"passthrough\"\n",
        our_users.display(),
        dist.addr
    ))
    .await
    .unwrap();
    let http = tessera_testkit::http_client();
    let get = |path: &str, user: Option<(&str, &str)>| {
        let mut r = http.get(server.url(path)).header("accept", OCI_MANIFEST);
        if let Some((u, p)) = user {
            r = r.basic_auth(u, Some(p));
        }
        r.send()
    };
    let manifest = "/v2/priv/team/app/manifests/v1";
    let layer = Digest::sha256_of(&image.layers[0]);
    let blob = format!("/v2/priv/team/app/blobs/{layer}");

    // Anonymous: the upstream's own challenge comes back.
    let r = get(manifest, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"test-realm\"");
    // The upstream's user gets the image (and Tessera caches it).
    let r = get(manifest, Some(("alice", "secret"))).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], image.digest().to_string().as_str());
    let r = get(&blob, Some(("alice", "secret"))).await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), image.layers[0].as_slice());
    // Cached or not, nobody else gets it: not anonymous, not a wrong password, not a user
    // of Tessera's own login.
    for user in [None, Some(("alice", "wrong")), Some(("bob", "builder"))] {
        assert_eq!(get(manifest, user).await.unwrap().status(), 401, "{user:?}");
        assert_eq!(get(&blob, user).await.unwrap().status(), 401, "{user:?}");
        assert_eq!(get(&format!("/v2/priv/team/app/manifests/{}", image.digest()), user).await.unwrap().status(), 401);
    }
    let tags = get("/v2/priv/team/app/tags/list", Some(("alice", "secret"))).await.unwrap();
    assert_eq!(tags.status(), 200);
    // Elsewhere Tessera's own login applies as before.
    let r = get("/v2/local/x/tags/list", None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("tessera"));

    // skopeo logs in to the upstream through Tessera.
    if have_tool("skopeo") {
        let files = ContainersFiles::new(dir.path(), &server.host()).unwrap();
        let out = dir.path().join("pulled");
        files.skopeo(&[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "alice:secret",
            &format!("docker://{}/priv/team/app:v1", server.host()),
            &format!("oci:{}:v1", out.display()),
        ]);
        assert!(out.join("blobs/sha256").join(layer.hex()).exists());
    }
    // The tag moves upstream: the HEAD that authorises the client also revalidates the tag,
    // so the client sees the move at once (one HEAD, not a cached answer within the TTL).
    let moved = Image::random(1, 20_000);
    Api::at(dist.addr).logged_in("alice", "secret").push_image("team/app", "v1", &moved).await.unwrap();
    let r = get(manifest, Some(("alice", "secret"))).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], moved.digest().to_string().as_str());
}

/// An upstream that records each request head and answers 404.
fn recording_upstream() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            recorded.lock().unwrap().push(head);
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn client_credentials_reach_an_upstream_only_through_a_passthrough_route() {
    let (addr, heads) = recording_upstream();
    let server = InProcess::with_toml(&format!(
        "[[upstream]]\nname = \"rec\"\nurl = \"http://{addr}\"\nusername = \"configured\"\npassword = \"pw\"\n\
             [[upstream]]\nname = \"rec-for-clients\"\nurl = \"http://{addr}\"\n\
             [[route]]\nprefix = \"cached\"\nto = \"rec\"\n\
             [[route]]\nprefix = \"passed\"\nto = \"rec-for-clients\"\ncredentials = \"passthrough\"\n"
    ))
    .await
    .unwrap();
    let http = tessera_testkit::http_client();
    let client_auth = "Basic Y2xpZW50OnNlY3JldA=="; // client:secret
    for path in ["/v2/cached/one/manifests/v1", "/v2/passed/two/manifests/v1"] {
        let r = http.get(server.url(path)).header("authorization", client_auth).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    let heads = heads.lock().unwrap().clone();
    let asked = |path: &str| heads.iter().filter(|h| h.contains(path)).map(|h| h.to_lowercase()).collect::<Vec<_>>();
    let (cached, passed) = (asked(" /v2/one/"), asked(" /v2/two/"));
    assert!(!cached.is_empty() && !passed.is_empty(), "the upstream was asked by both routes: {heads:?}");
    let carries_client = |h: &String| h.contains(&format!("authorization: {}", client_auth.to_lowercase()));
    assert!(!cached.iter().any(carries_client), "a cache route forwarded the client's credentials: {cached:?}");
    assert!(passed.iter().all(carries_client), "the passthrough route did not forward them: {passed:?}");
}
