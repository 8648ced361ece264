//! Logins and access rules, with the real clients logging in: skopeo, podman, docker,
//! containerd's ctr and python oras.

use std::path::Path;

use tessera_spec::Digest;
use tessera_testkit::clients::{
    Containerd, ContainersFiles, Dockerd, Podman, guarded, python_with_module, short_tempdir,
};
use tessera_testkit::{Api, Image, Server, error_code, have_tool, run};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

async fn status(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    creds: Option<(&str, &str)>,
) -> (u16, String, Option<String>) {
    let mut req = api.http.request(method, api.url(path));
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.unwrap();
    let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    let s = r.status().as_u16();
    (s, error_code(r).await, challenge)
}

#[tokio::test]
async fn one_flag_requires_a_login_for_everything() {
    let dir = tessera_testkit::tempdir().unwrap();
    let file = tessera_testkit::htpasswd_file(dir.path(), &[("alice", "wonder land")]);
    let server = Server::start(BIN, &["--htpasswd", file.to_str().unwrap()]).unwrap();
    let api = Api::new(&server);
    let (s, code, challenge) = status(&api, reqwest::Method::GET, "/v2/", None).await;
    assert_eq!((s, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"tessera\""));
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/", Some(("alice", "wrong"))).await.0, 401);
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/", Some(("mallory", "wonder land"))).await.0, 401);
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/", Some(("alice", "wonder land"))).await.0, 200);
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/a/b/manifests/v1", None).await.0, 401);
    assert_eq!(status(&api, reqwest::Method::POST, "/v2/a/b/blobs/uploads/", None).await.0, 401);
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/_catalog", None).await.0, 401);
    assert_eq!(
        status(&api, reqwest::Method::POST, "/v2/a/b/blobs/uploads/", Some(("alice", "wonder land"))).await.0,
        202
    );
    assert!(!server.log_text().contains("wonder"), "passwords are never logged");
}

#[tokio::test]
async fn access_rules_per_prefix() {
    let dir = tessera_testkit::tempdir().unwrap();
    let file = tessera_testkit::htpasswd_file(dir.path(), &[("alice", "a-pass"), ("bob", "b-pass")]);
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhtpasswd = \"{}\"\n\n[[access]]\nprefix = \"public\"\npull = [\"anonymous\"]\npush = [\"alice\"]\n\n[[access]]\nprefix = \"team\"\npull = [\"*\"]\npush = [\"alice\", \"bob\"]\ndelete = [\"alice\"]\n",
            file.display()
        ),
    )
    .unwrap();
    let server = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&server);
    let alice = Some(("alice", "a-pass"));
    let bob = Some(("bob", "b-pass"));
    // Anonymous may pull public content, not push it; the probe still challenges, so that
    // clients with credentials send them.
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/", None).await.0, 401);
    assert_eq!(
        status(&api, reqwest::Method::GET, "/v2/public/app/tags/list", None).await.0,
        404,
        "allowed; just empty"
    );
    assert_eq!(status(&api, reqwest::Method::POST, "/v2/public/app/blobs/uploads/", None).await.0, 401);
    let (s, code, _) = status(&api, reqwest::Method::POST, "/v2/public/app/blobs/uploads/", bob).await;
    assert_eq!((s, code.as_str()), (403, "DENIED"), "known but not allowed");
    assert_eq!(status(&api, reqwest::Method::POST, "/v2/public/app/blobs/uploads/", alice).await.0, 202);
    assert_eq!(status(&api, reqwest::Method::POST, "/v2/team/app/blobs/uploads/", bob).await.0, 202);
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/team/app/tags/list", None).await.0, 401);
    assert_eq!(
        status(&api, reqwest::Method::DELETE, &format!("/v2/team/app/blobs/{}", Digest::sha256_of(b"x")), bob).await.0,
        403
    );
    assert_eq!(
        status(&api, reqwest::Method::DELETE, &format!("/v2/team/app/blobs/{}", Digest::sha256_of(b"x")), alice)
            .await
            .0,
        404
    );
    // Names no rule covers: any logged-in user.
    assert_eq!(status(&api, reqwest::Method::POST, "/v2/other/app/blobs/uploads/", bob).await.0, 202);
    // A mount reads its source: bob cannot mount from a repository he may not pull.
    let http = tessera_testkit::http_client();
    let blob = b"secret layer";
    let d = Digest::sha256_of(blob);
    let r = http
        .post(api.url(&format!("/v2/private/x/blobs/uploads/?digest={d}")))
        .basic_auth("alice", Some("a-pass"))
        .body(&blob[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let config2 = std::fs::read_to_string(&config).unwrap()
        + "\n[[access]]\nprefix = \"private\"\npull = [\"alice\"]\npush = [\"alice\"]\n";
    std::fs::write(&config, config2).unwrap();
    drop(server);
    let server = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&server);
    let r = http
        .post(api.url(&format!("/v2/team/y/blobs/uploads/?mount={d}&from=private/x")))
        .basic_auth("bob", Some("b-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "no mount from a repository bob may not read: an upload instead");
}

/// A registry with alice as its one user, and an image pushed by her.
#[tokio::test]
async fn groups_in_access_rules() {
    let dir = tessera_testkit::tempdir().unwrap();
    let file = tessera_testkit::htpasswd_file(dir.path(), &[("alice", "a"), ("bob", "b"), ("carol", "c")]);
    let server = Server::with_config(
        BIN,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n[auth.groups]\nmaintainers = [\"alice\", \"carol\"]\n\
             [[access]]\nprefix = \"\"\npull = [\"*\"]\npush = [\"@maintainers\"]\n",
            file.display()
        ),
    )
    .unwrap();
    let api = Api::new(&server);
    let start = "/v2/team/app/blobs/uploads/";
    assert_eq!(status(&api, reqwest::Method::POST, start, Some(("alice", "a"))).await.0, 202);
    assert_eq!(status(&api, reqwest::Method::POST, start, Some(("carol", "c"))).await.0, 202);
    let (s, code, _) = status(&api, reqwest::Method::POST, start, Some(("bob", "b"))).await;
    assert_eq!((s, code.as_str()), (403, "DENIED"));
    assert_eq!(status(&api, reqwest::Method::GET, "/v2/team/app/tags/list", Some(("bob", "b"))).await.0, 200);
    // A rule naming a group nobody defined is a configuration error, not an open door.
    let bad = Server::with_config(
        BIN,
        &format!("[auth]\nhtpasswd = \"{}\"\n[[access]]\nprefix = \"\"\npush = [\"@ghosts\"]\n", file.display()),
    );
    assert!(bad.is_err(), "a server with an undefined group must not start");
}

async fn locked_server(dir: &Path) -> (Server, Image) {
    let file = tessera_testkit::htpasswd_file(dir, &[("alice", "s3cret-pass")]);
    let server = Server::start(BIN, &["--htpasswd", file.to_str().unwrap()]).unwrap();
    (server, Image::random(2, 50_000))
}

#[tokio::test]
async fn skopeo_and_podman_log_in() {
    if !have_tool("skopeo") || !have_tool("podman") {
        return;
    }
    let dir = short_tempdir("tau").unwrap();
    let (server, image) = locked_server(dir.path()).await;
    let host = server.host();
    let layout = dir.path().join("img");
    image.write_layout(&layout, "v1").unwrap();
    let files = ContainersFiles::new(dir.path(), &host).unwrap();
    let no_creds = run(files
        .apply(&mut guarded("skopeo"))
        .arg("--policy")
        .arg(&files.policy)
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{host}/sk/app:v1")));
    assert!(no_creds.is_err(), "anonymous push refused");
    files.skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret-pass",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{host}/sk/app:v1"),
    ]);
    let raw = files.skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        "alice:s3cret-pass",
        &format!("docker://{host}/sk/app:v1"),
    ]);
    assert_eq!(raw.as_bytes(), &image.manifest[..]);

    let podman = Podman::new(dir.path(), ContainersFiles::new(dir.path(), &host).unwrap()).unwrap();
    podman.use_working_driver().unwrap();
    assert!(
        run(podman.cmd().args(["login", "-u", "alice", "-p", "wrong", &host])).is_err(),
        "a wrong password is refused"
    );
    podman.run(&["login", "-u", "alice", "-p", "s3cret-pass", &host]);
    podman.run(&["pull", &format!("{host}/sk/app:v1")]);
    podman.run(&["tag", &format!("{host}/sk/app:v1"), &format!("{host}/pd/app:v1")]);
    podman.run(&["push", &format!("{host}/pd/app:v1")]);
    podman.run(&["logout", &host]);
    assert!(run(podman.cmd().args(["pull", &format!("{host}/pd/app:v1")])).is_err(), "logged out: refused");
    drop(podman);
}

#[tokio::test]
async fn docker_logs_in() {
    if !have_tool("dockerd") {
        return;
    }
    let dir = short_tempdir("tad").unwrap();
    let (server, image) = locked_server(dir.path()).await;
    let host = server.host();
    let api = Api::new(&server);
    // Seed with alice's credentials through the API.
    let http = tessera_testkit::http_client();
    for b in image.blobs() {
        let r = http
            .post(api.url(&format!("/v2/dk/app/blobs/uploads/?digest={}", Digest::sha256_of(b))))
            .basic_auth("alice", Some("s3cret-pass"))
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = http
        .put(api.url("/v2/dk/app/manifests/v1"))
        .basic_auth("alice", Some("s3cret-pass"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(image.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let docker = Dockerd::start(dir.path(), "{}").unwrap();
    assert!(run(docker.cmd().args(["pull", &format!("{host}/dk/app:v1")])).is_err(), "not logged in");
    assert!(run(docker.cmd().args(["login", "-u", "alice", "-p", "nope", &host])).is_err());
    docker.run(&["login", "-u", "alice", "-p", "s3cret-pass", &host]);
    docker.run(&["pull", &format!("{host}/dk/app:v1")]);
    docker.run(&["tag", &format!("{host}/dk/app:v1"), &format!("{host}/dk/copy:v1")]);
    docker.run(&["push", &format!("{host}/dk/copy:v1")]);
    let r = http.get(api.url("/v2/dk/copy/tags/list")).basic_auth("alice", Some("s3cret-pass")).send().await.unwrap();
    let tags: serde_json::Value = r.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}

#[tokio::test]
async fn ctr_and_oras_use_credentials() {
    if !have_tool("ctr") || !have_tool("containerd") {
        return;
    }
    let dir = short_tempdir("tac").unwrap();
    let (server, image) = locked_server(dir.path()).await;
    let host = server.host();
    let layout = dir.path().join("img");
    image.write_layout(&layout, "v1").unwrap();
    let archive = dir.path().join("img.tar");
    run(std::process::Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg(".")).unwrap();
    let ctd = Containerd::start(dir.path()).unwrap();
    ctd.ctr(&["images", "import", "--base-name", &format!("{host}/ct/app"), archive.to_str().unwrap()]).unwrap();
    let reference = format!("{host}/ct/app:v1");
    assert!(ctd.ctr(&["images", "push", "--plain-http", &reference]).is_err(), "no credentials: refused");
    ctd.ctr(&["images", "push", "--plain-http", "--user", "alice:s3cret-pass", &reference]).unwrap();
    ctd.ctr(&["images", "rm", "--sync", &reference]).unwrap();
    ctd.ctr(&["images", "pull", "--plain-http", "--user", "alice:s3cret-pass", &reference]).unwrap();
    assert!(ctd.ctr(&["images", "ls"]).unwrap().contains(&image.digest().to_string()));

    let Some(python) = python_with_module("oras.client", "TESSERA_ORAS_PYTHON") else { return };
    let work = dir.path().join("oras");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("note.txt"), b"artifact behind a login").unwrap();
    let script = format!(
        r#"
import oras.client
# The registry challenges with Basic, so the client uses its basic backend.
c = oras.client.OrasClient(hostname="{host}", insecure=True, auth_backend="basic")
c.auth.set_basic_auth("alice", "s3cret-pass")  # what login() does before it asks a docker daemon
c.push(target="{host}/art/note:v1", files=["note.txt"])
print(c.pull(target="{host}/art/note:v1", outdir="out"))
"#
    );
    std::fs::write(work.join("drive.py"), script).unwrap();
    let out = run(guarded(&python).current_dir(&work).arg("drive.py")).unwrap();
    assert!(out.contains("note.txt"), "{out}");
    assert_eq!(std::fs::read(work.join("out/note.txt")).unwrap(), b"artifact behind a login");
}

#[tokio::test]
async fn without_a_login_only_loopback_listeners_take_anonymous_writes() {
    let server = Server::start_on(BIN, "0.0.0.0:0", &[]).unwrap();
    let api = Api { base: format!("http://127.0.0.1:{}", server.addr.port()), http: tessera_testkit::http_client() };
    let r = api.http.post(api.url("/v2/a/b/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let r = api.http.delete(api.url(&format!("/v2/a/b/blobs/{}", Digest::sha256_of(b"x")))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200, "pulls stay open");
    assert!(server.wait_for_log("pushes and deletes refused", std::time::Duration::from_secs(5)));
    // Chosen explicitly, anonymous writes are allowed off loopback too.
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(&config, "anonymous_writes = true\n").unwrap();
    let open = Server::start_on(BIN, "0.0.0.0:0", &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api { base: format!("http://127.0.0.1:{}", open.addr.port()), http: tessera_testkit::http_client() };
    assert_eq!(api.http.post(api.url("/v2/a/b/blobs/uploads/")).send().await.unwrap().status(), 202);
}

/// A client (by address) that keeps failing is refused before its password is checked;
/// other clients, and logins this client just proved, go on.
#[tokio::test]
async fn a_client_that_keeps_failing_logins_gets_429() {
    let dir = tessera_testkit::tempdir().unwrap();
    let file = tessera_testkit::htpasswd_file(dir.path(), &[("alice", "right")]);
    let server = Server::with_config(
        BIN,
        &format!(
            "[auth]\nhtpasswd = \"{}\"\ntoken = true\n\n[limits]\nfailed_logins_per_minute_per_client = 3\n",
            file.display()
        ),
    )
    .unwrap();
    let from = |ip: &str| Api {
        base: format!("http://127.0.0.1:{}", server.addr.port()),
        http: tessera_testkit::http_client_from(ip.parse().unwrap()),
    };
    let (mallory, alice) = (from("127.0.0.1"), from("127.0.0.2"));
    assert_eq!(status(&mallory, reqwest::Method::GET, "/token", Some(("alice", "right"))).await.0, 200);
    for _ in 0..3 {
        assert_eq!(status(&mallory, reqwest::Method::GET, "/token", Some(("alice", "guess"))).await.0, 401);
    }
    let r = mallory.http.get(mallory.url("/token")).basic_auth("alice", Some("guess")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=21).contains(&wait), "one more try within 20 s: {wait}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(
        status(&mallory, reqwest::Method::GET, "/token", Some(("alice", "another guess"))).await.0,
        429,
        "still out of tries"
    );
    assert_eq!(
        status(&mallory, reqwest::Method::GET, "/token", Some(("alice", "right"))).await.0,
        200,
        "a login proved a moment ago costs no bcrypt and passes"
    );
    assert_eq!(status(&alice, reqwest::Method::GET, "/token", Some(("alice", "right"))).await.0, 200, "per client");
    assert_eq!(status(&alice, reqwest::Method::GET, "/token", Some(("alice", "guess"))).await.0, 401);
    // The log is read as the server writes it: wait for the last request's line.
    let last = "127.0.0.2 \"GET /token\" 401";
    assert!(server.wait_for_log(last, std::time::Duration::from_secs(10)));
    let log = server.log_text();
    assert_eq!(log.matches("login failed").count(), 4, "refused tries were never checked: {log}");
}
