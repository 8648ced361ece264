//! The Docker token flow with Tessera as its own issuer: real clients log in through it,
//! forged and foreign tokens are refused, and a Tessera mirror pulls through an upstream
//! Tessera that requires tokens.

use std::path::Path;

use tessera_spec::Digest;
use tessera_testkit::clients::{Containerd, ContainersFiles, Dockerd, Podman, short_tempdir};
use tessera_testkit::{Api, Image, Server, have_tool};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A token-flow registry: alice may do anything, anonymous may pull `public/`.
fn token_server(dir: &Path) -> Server {
    let htpasswd = tessera_testkit::htpasswd_file(dir, &[("alice", "alice-pass")]);
    let config = dir.join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhtpasswd = \"{}\"\nrealm = \"registry.test\"\ntoken = true\n\n[[access]]\nprefix = \"public\"\npull = [\"anonymous\"]\npush = [\"alice\"]\n",
            htpasswd.display()
        ),
    )
    .unwrap();
    Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap()
}

async fn token(api: &Api, scope: &str, creds: Option<(&str, &str)>) -> reqwest::Response {
    let mut req = api.http.get(api.url("/token")).query(&[("service", "registry.test"), ("scope", scope)]);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn the_token_flow_step_by_step() {
    let dir = tessera_testkit::tempdir().unwrap();
    let server = token_server(dir.path());
    let api = Api::new(&server);
    let r = api.get("/v2/").await.unwrap();
    assert_eq!(r.status(), 401, "the probe challenges, so clients fetch a token (anonymous if they must)");
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        format!("Bearer realm=\"http://{}/token\",service=\"registry.test\"", server.host())
    );
    let r = api.http.post(api.url("/v2/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/token\",service=\"registry.test\",scope=\"repository:team/app:pull,push\"",
            server.host()
        )
    );

    assert_eq!(token(&api, "repository:team/app:pull,push", Some(("alice", "nope"))).await.status(), 401);
    let body: serde_json::Value =
        token(&api, "repository:team/app:pull,push", Some(("alice", "alice-pass"))).await.json().await.unwrap();
    let t = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], t.as_str());
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    let r = api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 202, "the token grants push");
    let r = api.http.post(api.url("/v2/other/app/blobs/uploads/")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 401, "not for another repository");
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"repository:other/app:pull,push\""));

    // Anonymous gets a token with only what anonymous may do.
    let body: serde_json::Value = token(&api, "repository:public/x:pull,push", None).await.json().await.unwrap();
    let anon = body["token"].as_str().unwrap();
    let r = api.http.get(api.url("/v2/public/x/tags/list")).bearer_auth(anon).send().await.unwrap();
    assert_eq!(r.status(), 404, "pull allowed (nothing there yet)");
    let r = api.http.post(api.url("/v2/public/x/blobs/uploads/")).bearer_auth(anon).send().await.unwrap();
    assert_eq!(r.status(), 401, "push not granted");

    // Forged and foreign tokens.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = t.split('.').collect();
    let none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["access"][0]["name"] = serde_json::json!("other/app");
    let tampered = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
    for (bad, why) in [(none.as_str(), "alg none"), (tampered.as_str(), "changed claims"), ("x.y.z", "garbage")] {
        let r = api.http.post(api.url("/v2/other/app/blobs/uploads/")).bearer_auth(bad).send().await.unwrap();
        assert_eq!(r.status(), 401, "{why}");
    }
    let other_dir = tessera_testkit::tempdir().unwrap();
    let other = token_server(other_dir.path());
    let body: serde_json::Value =
        token(&Api::new(&other), "repository:team/app:pull,push", Some(("alice", "alice-pass")))
            .await
            .json()
            .await
            .unwrap();
    let foreign = body["token"].as_str().unwrap();
    let r = api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(foreign).send().await.unwrap();
    assert_eq!(r.status(), 401, "signed by another registry's key");

    let jwks: serde_json::Value = api.get("/.well-known/jwks.json").await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    assert!(!server.log_text().contains("alice-pass"));
}

#[tokio::test]
async fn real_clients_log_in_through_the_token_flow() {
    let dir = short_tempdir("ttk").unwrap();
    let server = token_server(dir.path());
    let host = server.host();
    let image = Image::random(2, 40_000);
    let layout = dir.path().join("img");
    image.write_layout(&layout, "v1").unwrap();
    let mut clients_ran = 0;
    if have_tool("skopeo") {
        clients_ran += 1;
        let files = ContainersFiles::new(dir.path(), &host).unwrap();
        files.skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "alice:alice-pass",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://{host}/team/app:v1"),
        ]);
        let raw = files.skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--raw",
            "--creds",
            "alice:alice-pass",
            &format!("docker://{host}/team/app:v1"),
        ]);
        assert_eq!(raw.as_bytes(), &image.manifest[..]);
        // Anonymous pull of public/ works through an anonymous token.
        files.skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "alice:alice-pass",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://{host}/public/app:v1"),
        ]);
        let raw = files.skopeo(&["inspect", "--tls-verify=false", "--raw", &format!("docker://{host}/public/app:v1")]);
        assert_eq!(raw.as_bytes(), &image.manifest[..]);
    }
    if have_tool("podman") {
        clients_ran += 1;
        let pdir = dir.path().join("pd");
        std::fs::create_dir_all(&pdir).unwrap();
        let podman = Podman::new(&pdir, ContainersFiles::new(&pdir, &host).unwrap()).unwrap();
        podman.use_working_driver().unwrap();
        podman.run(&["login", "-u", "alice", "-p", "alice-pass", &host]);
        podman.run(&["pull", &format!("{host}/team/app:v1")]);
        podman.run(&["tag", &format!("{host}/team/app:v1"), &format!("{host}/team/podman:v1")]);
        podman.run(&["push", &format!("{host}/team/podman:v1")]);
    }
    if have_tool("dockerd") {
        clients_ran += 1;
        let ddir = dir.path().join("dk");
        std::fs::create_dir_all(&ddir).unwrap();
        let docker = Dockerd::start(&ddir, "{}").unwrap();
        docker.run(&["login", "-u", "alice", "-p", "alice-pass", &host]);
        docker.run(&["pull", &format!("{host}/team/app:v1")]);
        docker.run(&["tag", &format!("{host}/team/app:v1"), &format!("{host}/team/docker:v1")]);
        docker.run(&["push", &format!("{host}/team/docker:v1")]);
    }
    if have_tool("ctr") && have_tool("containerd") {
        clients_ran += 1;
        let cdir = dir.path().join("ct");
        std::fs::create_dir_all(&cdir).unwrap();
        let ctd = Containerd::start(&cdir).unwrap();
        let reference = format!("{host}/team/app:v1");
        ctd.ctr(&["images", "pull", "--plain-http", "--user", "alice:alice-pass", &reference]).unwrap();
        assert!(ctd.ctr(&["images", "ls"]).unwrap().contains(&image.digest().to_string()));
    }
    let log = server.log_text();
    assert!(clients_ran == 0 || log.contains("\"GET /token?"), "clients fetched tokens: {log}");
    assert!(!log.contains("alice-pass"));
}

#[tokio::test]
async fn a_mirror_pulls_through_an_upstream_that_wants_tokens() {
    let dir = tessera_testkit::tempdir().unwrap();
    let upstream = token_server(dir.path());
    let image = Image::random(1, 30_000);
    // Push as alice through the token flow, by hand.
    let api = Api::new(&upstream);
    let body: serde_json::Value =
        token(&api, "repository:team/app:pull,push", Some(("alice", "alice-pass"))).await.json().await.unwrap();
    let t = body["token"].as_str().unwrap();
    for b in image.blobs() {
        let r = api
            .http
            .post(api.url(&format!("/v2/team/app/blobs/uploads/?digest={}", Digest::sha256_of(b))))
            .bearer_auth(t)
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let r = api
        .http
        .put(api.url("/v2/team/app/manifests/v1"))
        .bearer_auth(t)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(image.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let mdir = tessera_testkit::tempdir().unwrap();
    let config = mdir.path().join("m.toml");
    std::fs::write(&config, format!("[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\nusername = \"alice\"\npassword = \"alice-pass\"\n\n[[route]]\nprefix = \"m\"\nto = \"up\"\n", upstream.host())).unwrap();
    let mirror = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let mapi = Api::new(&mirror);
    let r = mapi.get("/v2/m/team/app/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest);
    for b in image.blobs() {
        assert_eq!(
            mapi.get(&format!("/v2/m/team/app/blobs/{}", Digest::sha256_of(b))).await.unwrap().bytes().await.unwrap(),
            &b[..]
        );
    }
    let log = upstream.log_text();
    let token_requests = log.lines().filter(|l| l.contains("\"GET /token?")).count();
    assert!(token_requests >= 1, "the mirror fetched a token");
    assert!(token_requests <= 2, "and reused it: {token_requests} token requests");
}

/// A token-flow registry with its own issuer name and service.
fn issuer_server(dir: &Path, issuer: &str, service: &str) -> Server {
    let htpasswd = tessera_testkit::htpasswd_file(dir, &[("alice", "alice-pass")]);
    let config = dir.join("i.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhtpasswd = \"{}\"\nrealm = \"{service}\"\ntoken = true\nissuer = \"{issuer}\"\n",
            htpasswd.display()
        ),
    )
    .unwrap();
    Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap()
}

async fn token_from(server: &Server, service: &str, scope: &str) -> String {
    let api = Api::new(server);
    let r = api
        .http
        .get(api.url("/token"))
        .query(&[("service", service), ("scope", scope)])
        .basic_auth("alice", Some("alice-pass"))
        .send()
        .await
        .unwrap();
    r.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn tokens_from_a_trusted_external_issuer() {
    let (idp_dir, rogue_dir, dir) =
        (tessera_testkit::tempdir().unwrap(), tessera_testkit::tempdir().unwrap(), tessera_testkit::tempdir().unwrap());
    // The external issuer (another Tessera), its JWKS saved for the registry to trust.
    let idp = issuer_server(idp_dir.path(), "idp.example", "registry.test");
    let jwks = Api::new(&idp).get("/.well-known/jwks.json").await.unwrap().text().await.unwrap();
    let jwks_file = dir.path().join("idp-jwks.json");
    std::fs::write(&jwks_file, jwks).unwrap();
    let htpasswd = tessera_testkit::htpasswd_file(dir.path(), &[("bob", "bob-pass")]);
    let config = dir.path().join("r.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhtpasswd = \"{}\"\nrealm = \"registry.test\"\n\n[[auth.trusted_issuer]]\nissuer = \"idp.example\"\naudience = \"registry.test\"\njwks_file = \"{}\"\n",
            htpasswd.display(),
            jwks_file.display()
        ),
    )
    .unwrap();
    let registry = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&registry);

    let good = token_from(&idp, "registry.test", "repository:team/app:pull,push").await;
    let r = api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(r.status(), 202, "the trusted issuer's grant is honoured");
    let r = api.http.post(api.url("/v2/other/app/blobs/uploads/")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(r.status(), 401, "only what it grants");

    // Same issuer name, other key: refused. Trusted issuer, other audience: refused.
    let rogue = issuer_server(rogue_dir.path(), "idp.example", "registry.test");
    let forged = token_from(&rogue, "registry.test", "repository:team/app:pull,push").await;
    assert_eq!(
        api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(&forged).send().await.unwrap().status(),
        401
    );
    // The trusted issuer's own key, but tokens for another service: refused on audience.
    let other_config = idp_dir.path().join("elsewhere.toml");
    let text = std::fs::read_to_string(idp_dir.path().join("i.toml"))
        .unwrap()
        .replace("realm = \"registry.test\"", "realm = \"elsewhere\"");
    std::fs::write(&other_config, text).unwrap();
    // Its own data directory (one server per directory), with the issuer's signing key.
    let elsewhere_data = idp_dir.path().join("elsewhere-data");
    std::fs::create_dir_all(&elsewhere_data).unwrap();
    std::fs::copy(idp.data.join("token-key.p8"), elsewhere_data.join("token-key.p8")).unwrap();
    let idp_elsewhere =
        Server::start_in(BIN, Some(&elsewhere_data), &["--config", other_config.to_str().unwrap()]).unwrap();
    let elsewhere = token_from(&idp_elsewhere, "elsewhere", "repository:team/app:pull,push").await;
    assert_eq!(
        api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(&elsewhere).send().await.unwrap().status(),
        401
    );
    assert!(
        registry.wait_for_log("token for another service", std::time::Duration::from_secs(5)),
        "{}",
        registry.log_text()
    );
    assert!(
        registry.wait_for_log("bad token signature", std::time::Duration::from_secs(5)),
        "the rogue key was refused"
    );
}

/// Keys from the issuer's JWKS URL: fetched at start-up, fetched again when a token names a
/// key not yet known (the issuer rotated), and an issuer that cannot be reached only costs
/// its own tokens.
#[tokio::test]
async fn keys_from_a_jwks_url_follow_the_issuers_rotation() {
    let (idp_dir, dir) = (tessera_testkit::tempdir().unwrap(), tessera_testkit::tempdir().unwrap());
    let mut idp = issuer_server(idp_dir.path(), "idp.example", "registry.test");
    let htpasswd = tessera_testkit::htpasswd_file(dir.path(), &[("bob", "bob-pass")]);
    let config = dir.path().join("r.toml");
    let write_config = |jwks_url: &str| {
        std::fs::write(
            &config,
            format!(
                "[auth]\nhtpasswd = \"{}\"\nrealm = \"registry.test\"\n\n[[auth.trusted_issuer]]\nissuer = \"idp.example\"\naudience = \"registry.test\"\njwks_url = \"{jwks_url}\"\n",
                htpasswd.display()
            ),
        )
        .unwrap();
    };
    write_config(&format!("http://{}/.well-known/jwks.json", idp.host()));
    let registry = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&registry);
    let upload = |token: String| {
        let api = &api;
        async move {
            api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(token).send().await.unwrap().status()
        }
    };
    let old = token_from(&idp, "registry.test", "repository:team/app:pull,push").await;
    assert_eq!(upload(old.clone()).await, 202, "keys fetched at start-up:\n{}", registry.log_text());

    // The issuer rotates its key: a token signed with the new one is honoured once the
    // registry has fetched again (which that token itself asks for); the old key is gone.
    idp.kill();
    std::fs::remove_file(idp.data.join("token-key.p8")).unwrap();
    idp.restart().unwrap();
    let new = token_from(&idp, "registry.test", "repository:team/app:pull,push").await;
    assert_ne!(tessera_access::token::token_kid(&new), tessera_access::token::token_kid(&old));
    let fetched = tessera_testkit::wait_until_async(std::time::Duration::from_secs(15), || async {
        upload(new.clone()).await == 202
    })
    .await;
    assert!(fetched, "the rotated key was never fetched:\n{}", registry.log_text());
    assert_eq!(upload(old).await, 401, "the retired key no longer verifies");
    assert_eq!(registry.log_text().matches("fetched 1 key(s)").count(), 2, "{}", registry.log_text());

    // An issuer that cannot be reached: the registry starts, its tokens are refused, the
    // reason is logged, and nothing else is affected.
    write_config("http://127.0.0.1:9/.well-known/jwks.json");
    let cut_off = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&cut_off);
    let token = token_from(&idp, "registry.test", "repository:team/app:pull,push").await;
    let r = api.http.post(api.url("/v2/team/app/blobs/uploads/")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        api.http.post(api.url("/v2/team/app/blobs/uploads/")).basic_auth("bob", Some("bob-pass")).send().await.unwrap();
    assert_eq!(r.status(), 202, "logins still work");
    assert!(cut_off.log_text().contains("cannot fetch the JWKS"), "{}", cut_off.log_text());
}
