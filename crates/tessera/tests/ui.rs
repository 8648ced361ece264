//! The web pages, on a registry that holds every kind of content: hosted images (one
//! delivered from a CDN, one from a mirror, one only a logged-in user may pull), a Crane
//! source with a protected repository, and a pull-through cache of another Tessera. The
//! pages are read as a browser would (plain HTTP, a login form, a cookie) and, when
//! Chromium is installed, in headless Chromium through Selenium, which writes a screenshot
//! of each page.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tessera_spec::Digest;
use tessera_testkit::cdn::Cdn;
use tessera_testkit::clients::short_tempdir;
use tessera_testkit::{Api, Image, Server, have_tool};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// The registry the pages are tested on, and what it holds.
struct Federated {
    server: Server,
    upstream: Server,
    _cdn: Cdn,
    work: tessera_testkit::TempDir,
    public: Image,
    secret: Image,
    base: Image,
    upstream_image: Image,
    /// An index of `public` and another image, tagged `multi` in `public/app`.
    index_digest: Digest,
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Federated {
    /// `None` where nginx (the CDN and mirror) is not installed.
    async fn start() -> Option<Federated> {
        if !have_tool("nginx") {
            return None;
        }
        let work = short_tempdir("tui").unwrap();
        let cdn = Cdn::start("127.0.0.2", None).unwrap();
        // The Crane source: an image Pulp published to the CDN, and a protected repository.
        let base = Image::random(2, 40_000);
        let layout = work.path().join("layout");
        base.write_layout(&layout, "9").unwrap();
        let out =
            tessera_testkit::cli(BIN, &["publish", &format!("oci:{}:9", p(&layout)), &p(&cdn.root.join("pulp/base"))]);
        assert!(out.ok, "{}", out.stderr);
        let crane = work.path().join("crane");
        std::fs::create_dir_all(&crane).unwrap();
        for (file, repo, protected) in [("base.json", "vendor/base", false), ("private.json", "vendor/private", true)] {
            let body = json!({"repository": repo, "repo-registry-id": repo, "url": cdn.url("/pulp/base/"),
                              "version": 3, "protected": protected, "schema2_data": ["9", base.digest().to_string()]});
            std::fs::write(crane.join(file), body.to_string()).unwrap();
        }
        // The upstream behind the cache.
        let upstream = Server::start(BIN, &[]).unwrap();
        let upstream_image = Image::random(2, 30_000);
        Api::new(&upstream).push_image("library/base", "v1", &upstream_image).await.unwrap();

        let htpasswd = tessera_testkit::htpasswd_file(work.path(), &[("alice", "wonder land")]);
        let config = format!(
            "[auth]\nhtpasswd = \"{}\"\n\n\
             [[access]]\nprefix = \"\"\npull = [\"anonymous\"]\npush = [\"anonymous\"]\n\n\
             [[access]]\nprefix = \"secret\"\npull = [\"alice\"]\npush = [\"anonymous\"]\n\n\
             [[upstream]]\nname = \"hub\"\nurl = \"http://{}\"\n\n\
             [[route]]\nprefix = \"mirror\"\nto = \"hub\"\n\n\
             [[static]]\nname = \"crane\"\ncrane_dir = \"{}\"\n\n\
             [[delivery]]\nprefix = \"public\"\ndeliver = \"cdn\"\ncdn = \"{}\"\n\n\
             [[delivery]]\nprefix = \"nearby\"\ndeliver = \"mirrors\"\nhealth_interval_secs = 1\n\
             [[delivery.mirror]]\nurl = \"{}\"\n",
            p(&htpasswd),
            upstream.host(),
            p(&crane),
            cdn.url("/cdn/"),
            cdn.url("/mirror/"),
        );
        let server = Server::with_config(BIN, &config).unwrap();
        let api = Api::new(&server);
        let (public, secret, nearby) = (Image::random(2, 50_000), Image::random(1, 20_000), Image::random(1, 10_000));
        api.push_image("public/app", "v1", &public).await.unwrap();
        api.push_image("secret/app", "v1", &secret).await.unwrap();
        api.push_image("nearby/app", "v1", &nearby).await.unwrap();
        let other = Image::random(1, 5_000);
        api.push_image("public/app", "other", &other).await.unwrap();
        let index_digest =
            api.push_index("public/app", "multi", &[(&public, "amd64"), (&other, "arm64")]).await.unwrap();
        // Sixty tags, for paging (pushed a moment apart, so newest first is defined).
        for blob in other.blobs() {
            api.push_blob("public/many", blob).await.unwrap();
        }
        for i in 0..60 {
            let tag = format!("t{i:02}");
            let r =
                api.push_manifest("public/many", &tag, "application/vnd.oci.image.manifest.v1+json", &other.manifest);
            assert_eq!(r.await.unwrap().status(), 201);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Some(Federated { server, upstream, _cdn: cdn, work, public, secret, base, upstream_image, index_digest })
    }

    /// A page as `cookie`'s holder (anonymous without one): status, headers, body.
    async fn page(&self, path: &str, cookie: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = tessera_testkit::no_redirects().get(self.server.url(path));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let r = req.send().await.unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        (status, headers, r.text().await.unwrap())
    }

    /// Logs in through the form; the session cookie (`name=value`).
    async fn log_in(&self, user: &str, password: &str) -> Result<String, u16> {
        let r = tessera_testkit::no_redirects()
            .post(self.server.url("/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("username={user}&password={}&next=%2Fui%2Frepositories", password.replace(' ', "+")))
            .send()
            .await
            .unwrap();
        if r.status() != 303 {
            return Err(r.status().as_u16());
        }
        assert_eq!(r.headers()["location"], "/ui/repositories");
        let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attribute), "{set}");
        }
        assert!(!set.contains("Secure"), "not over plain HTTP: {set}");
        Ok(set.split(';').next().unwrap().to_string())
    }
}

#[tokio::test]
async fn the_pages_show_routes_repositories_tags_and_where_each_layer_comes_from() {
    let Some(f) = Federated::start().await else { return };

    // Home: every route and source, with the upstream's URL and health.
    let (status, headers, home) = f.page("/", None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline") && csp.contains("frame-ancestors 'none'")
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    for expected in [
        "Route 1",
        "mirror/…",
        "hub",
        &format!("http://{}", f.upstream.host()),
        "not asked yet",
        "crane",
        "(2 repositories)",
        "Every other name",
    ] {
        assert!(home.contains(expected), "home shows {expected:?}");
    }
    assert!(!home.contains("<script>"), "no inline script");
    // The API stays where clients look for it.
    let api = Api::new(&f.server);
    assert_eq!(api.get("/v2/").await.unwrap().status(), 401, "the API still challenges");

    // Repositories: hosted with figures, the Crane source's, none that are hidden.
    let (status, _, list) = f.page("/ui/repositories", None).await;
    assert_eq!(status, 200);
    for expected in ["public/app", "public/many", "nearby/app", "vendor/base", "static source crane"] {
        assert!(list.contains(expected), "listed: {expected}");
    }
    assert!(!list.contains("secret/app"), "an anonymous viewer does not see what it may not pull");
    assert!(!list.contains("vendor/private"), "nor a protected static repository");
    // The page after: fifty repositories the viewer may see, and a link that names only
    // one of them. With 46 more names before them, the 50th name in store order is hidden.
    let filler = Image::random(1, 1_000);
    for i in 0..46 {
        api.push_image(&format!("aaa/r{i:02}"), "v1", &filler).await.unwrap();
    }
    for name in ["secret/a00", "secret/a01", "zzz/r00", "zzz/r01"] {
        api.push_image(name, "v1", &filler).await.unwrap();
    }
    let (_, _, first) = f.page("/ui/repositories", None).await;
    assert!(
        !first.contains("secret/") && !first.contains("secret%2F"),
        "no hidden name, not even in the next page's link"
    );
    assert!(first.contains("href=\"/ui/r/zzz/r00\"") && first.contains("after=zzz%2Fr00"), "paged past them");
    let (_, _, second) = f.page("/ui/repositories?after=zzz%2Fr00", None).await;
    assert!(second.contains("href=\"/ui/r/zzz/r01\"") && !second.contains("secret/") && !second.contains("aaa/r"));
    // Exactly fifty visible, the last of them the last stored: no link to an empty page.
    let (_, _, exact) = f.page("/ui/repositories?after=aaa%2Fr00", None).await;
    assert!(exact.contains("href=\"/ui/r/zzz/r01\"") && !exact.contains("rel=\"next\""), "no next page");
    // Answers on page paths carry the pages' headers, errors too.
    let (status, headers, _) = f.page("/ui/r/Not..Valid", None).await;
    assert!(status >= 400);
    assert!(headers["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    assert_eq!(headers["x-frame-options"], "DENY");
    let (_, _, found) = f.page("/ui/repositories?q=many", None).await;
    assert!(found.contains("public/many") && !found.contains("public/app<"), "search");

    // A repository: tags newest first, fifty a page, the index's platforms, sizes.
    let (status, _, many) = f.page("/ui/r/public/many", None).await;
    assert_eq!(status, 200);
    assert_eq!(many.matches("<tr><th scope=\"row\"><a href=\"/ui/r/public/many/-/t").count(), 50);
    let (newest, oldest) = (many.find(">t59<").unwrap(), many.find(">t10<").unwrap());
    assert!(newest < oldest, "newest first");
    assert!(!many.contains(">t09<") && many.contains("href=\"/ui/r/public/many?page=2\""));
    let (_, _, second) = f.page("/ui/r/public/many?page=2", None).await;
    assert_eq!(second.matches("<a href=\"/ui/r/public/many/-/t").count(), 10);
    assert!(second.contains(">t00<") && second.contains("href=\"/ui/r/public/many?page=1\""));
    let (_, _, app) = f.page("/ui/r/public/app", None).await;
    assert!(app.contains("linux/amd64, linux/arm64"), "an index's platforms");
    assert!(app.contains(&f.index_digest.to_string()[..19]));

    // An image: every blob with where a client is sent, the bar, and pull commands.
    let (status, _, image) = f.page("/ui/r/public/app/-/v1", None).await;
    assert_eq!(status, 200);
    assert!(image.contains(&f.public.digest().to_string()));
    assert!(image.contains("<dt>Platform</dt><dd>linux/amd64</dd>"), "the config's summary");
    assert!(image.contains("via via-cdn") && image.contains("307 to CDN"), "CDN-delivered layers");
    assert!(image.contains("<svg class=\"bar\"") && image.contains("Bytes by source: CDN 100%"));
    let host = f.server.host();
    for line in [format!("docker pull {host}/public/app:v1"), format!("podman pull {host}/public/app:v1")] {
        assert!(image.contains(&line), "{line}");
    }
    let (_, _, nearby) = f.page("/ui/r/nearby/app/-/v1", None).await;
    assert!(nearby.contains("via via-mirror") || nearby.contains("via via-here"), "a mirror rule");
    let (_, _, crane) = f.page("/ui/r/vendor/base/-/9", None).await;
    assert!(crane.contains("via via-external") && crane.contains(&f.base.digest().to_string()), "Crane blobs");
    // Through the cache: not held until pulled, then held.
    let (status, _, cached) = f.page("/ui/r/mirror/library/base/-/v1", None).await;
    assert_eq!(status, 200, "{cached}");
    assert!(cached.contains("via via-fetched"), "not in the cache yet");
    for blob in f.upstream_image.blobs() {
        assert_eq!(
            api.get(&format!("/v2/mirror/library/base/blobs/{}", Digest::sha256_of(blob))).await.unwrap().status(),
            200
        );
    }
    // The cache keeps what it streamed once the fill is done, a moment after the client has it.
    let mut held = false;
    for _ in 0..50 {
        let (_, _, cached) = f.page("/ui/r/mirror/library/base/-/v1", None).await;
        held = cached.contains("via via-cached") && !cached.contains("via via-fetched");
        if held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held, "held now");
    let (_, _, home) = f.page("/", None).await;
    assert!(home.contains("health ok"), "the upstream answered");
    let (_, _, list) = f.page("/ui/repositories", None).await;
    assert!(list.contains("cached from upstream hub") && list.contains("mirror/library/base"), "what the cache holds");

    // Operations: storage, the cache against its bound, recent pushes.
    let (status, _, ops) = f.page("/ui/operations", None).await;
    assert_eq!(status, 200);
    for expected in ["Hosted blobs", "Cache of hub", "Recent pushes", "zzz/r01:v1", "Collection passes"] {
        assert!(ops.contains(expected), "operations: {expected}");
    }
    assert!(!ops.contains("secret/"), "recent pushes only of what the viewer may pull");
    let (_, _, css) = f.page("/ui/assets/tessera.css", None).await;
    assert!(css.contains(".via-cdn"));
}

#[tokio::test]
async fn a_login_shows_what_that_user_may_pull_and_nothing_else_changes() {
    let Some(f) = Federated::start().await else { return };
    // Hidden from anonymous viewers exactly as a name that does not exist.
    let (hidden, _, hidden_page) = f.page("/ui/r/secret/app", None).await;
    let (missing, _, missing_page) = f.page("/ui/r/no/such", None).await;
    assert_eq!((hidden, missing), (404, 404));
    assert_eq!(hidden_page.replace("secret/app", ""), missing_page.replace("no/such", ""));
    assert_eq!(f.page("/ui/r/secret/app/-/v1", None).await.0, 404);
    assert_eq!(f.page("/ui/r/vendor/private", None).await.0, 404);

    assert_eq!(f.log_in("alice", "wrong").await, Err(401));
    let cookie = f.log_in("alice", "wonder land").await.unwrap();
    let (_, _, list) = f.page("/ui/repositories", Some(&cookie)).await;
    assert!(list.contains("secret/app") && list.contains("vendor/private") && list.contains("Signed in as"));
    let (status, _, secret) = f.page("/ui/r/secret/app/-/v1", Some(&cookie)).await;
    assert_eq!(status, 200);
    assert!(secret.contains(&f.secret.digest().to_string()));
    // A cookie that was altered is no login.
    let forged = format!("{}x", cookie);
    assert!(!f.page("/ui/repositories", Some(&forged)).await.2.contains("secret/app"));
    // A reload (SIGHUP) reads the htpasswd file again: alice's new password ends her page
    // login and her old password's API access; a file that does not parse changes nothing.
    let sees_secret = |cookie: String| {
        let f = &f;
        async move { f.page("/ui/repositories", Some(&cookie)).await.2.contains("secret/app") }
    };
    let api_pull = |password: &'static str| {
        let url = f.server.url("/v2/secret/app/manifests/v1");
        async move {
            let r = reqwest::Client::new().get(url).basic_auth("alice", Some(password)).send().await.unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(api_pull("wonder land").await, 200);
    tessera_testkit::htpasswd_file(f.work.path(), &[("alice", "looking glass")]);
    f.server.hangup();
    assert!(f.server.wait_for_log("users reloaded: 1", Duration::from_secs(10)), "{}", f.server.log_text());
    assert!(!sees_secret(cookie.clone()).await, "a login made with the old password");
    assert_eq!(api_pull("wonder land").await, 401);
    assert_eq!(api_pull("looking glass").await, 200);
    let renewed = f.log_in("alice", "looking glass").await.unwrap();
    assert!(sees_secret(renewed.clone()).await);
    std::fs::write(f.work.path().join("htpasswd"), "alice:not-bcrypt\n").unwrap();
    f.server.hangup();
    assert!(f.server.wait_for_log("users not reloaded", Duration::from_secs(10)), "{}", f.server.log_text());
    assert!(sees_secret(renewed).await, "the previous users keep their logins");
    // Logging out clears the cookie.
    let r = tessera_testkit::no_redirects().post(f.server.url("/ui/logout")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    // No page changes anything: writes to page paths are refused.
    for path in ["/", "/ui/repositories", "/ui/r/public/app"] {
        let r = tessera_testkit::no_redirects().post(f.server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "{path}");
    }
    // After login, a path on this server only.
    let r = tessera_testkit::no_redirects()
        .post(f.server.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("username=alice&password=looking+glass&next=https%3A%2F%2Fevil.example%2F")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/");
}

/// The "Next page" links of a page, as a browser follows them.
fn next_links(html: &str) -> Vec<String> {
    html.split("rel=\"next\" href=\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].replace("&amp;", "&"))
        .collect()
}

#[tokio::test]
async fn every_group_of_repositories_pages_on_its_own() {
    let work = short_tempdir("tup").unwrap();
    // A Crane source of sixty repositories, and a cache holding fifty-five: fifty `lib/r..`
    // and, after them in name order, five `lib/x..`.
    let crane = work.path().join("crane");
    std::fs::create_dir_all(&crane).unwrap();
    let digest = Digest::sha256_of(b"never fetched here").to_string();
    for i in 0..60 {
        let repo = format!("team/c{i:02}");
        let body = json!({"repository": repo, "repo-registry-id": repo, "url": "http://127.0.0.1:9/",
                          "version": 3, "protected": false, "schema2_data": ["1", digest]});
        std::fs::write(crane.join(format!("c{i:02}.json")), body.to_string()).unwrap();
    }
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 100);
    let cached: Vec<String> =
        (0..50).map(|i| format!("lib/r{i:02}")).chain((0..5).map(|i| format!("lib/x{i:02}"))).collect();
    for name in &cached {
        Api::new(&upstream).push_image(name, "v1", &image).await.unwrap();
    }
    let config = format!(
        "[[upstream]]\nname = \"hub\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"hub\"\n\n\
         [[static]]\nname = \"crane\"\ncrane_dir = \"{}\"\n",
        upstream.host(),
        p(&crane)
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    for name in &cached {
        let r = api.get(&format!("/v2/mirror/{name}/manifests/v1")).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let page = |path: String| {
        let url = server.url(&path);
        async move {
            let r = tessera_testkit::http_client().get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let shows = |html: &str, name: &str| html.contains(&format!(">{name}<"));

    let (_, first) = page("/ui/repositories".into()).await;
    assert!(shows(&first, "team/c49") && !shows(&first, "team/c50"), "fifty of the Crane source's");
    assert!(shows(&first, "mirror/lib/r49") && !shows(&first, "mirror/lib/x00"), "fifty of the cache's");
    let links = next_links(&first);
    assert_eq!(links.len(), 2, "a next page for each group that has one: {links:?}");
    let crane_next = links.iter().find(|l| l.contains("in=static%3Acrane")).expect("the Crane source's");
    assert!(crane_next.contains("after=team%2Fc49"), "{crane_next}");
    let (_, rest) = page(crane_next.clone()).await;
    assert!(shows(&rest, "team/c50") && shows(&rest, "team/c59") && !shows(&rest, "team/c49"));
    assert!(!rest.contains("on this server") && !rest.contains("cached from upstream"), "only that group");
    assert!(rest.contains("Every group"), "and a way back to every group");
    assert!(next_links(&rest).is_empty(), "the last page");
    let cache_next = links.iter().find(|l| l.contains("in=cache%3Ahub")).expect("the cache's");
    let (_, rest) = page(cache_next.clone()).await;
    assert!(shows(&rest, "mirror/lib/x00") && shows(&rest, "mirror/lib/x04") && !shows(&rest, "mirror/lib/r49"));
    assert!(!rest.contains("static source crane") && next_links(&rest).is_empty());
    // A search within a group, on the names clients pull by: fifty match and fill the
    // page, and no link leads to a page of none after them.
    let (_, found) = page("/ui/repositories?q=mirror%2Flib%2Fr&in=cache%3Ahub".into()).await;
    assert!(shows(&found, "mirror/lib/r00") && shows(&found, "mirror/lib/r49") && !shows(&found, "mirror/lib/x00"));
    assert!(next_links(&found).is_empty(), "nothing more matches: {:?}", next_links(&found));
    let (_, found) = page("/ui/repositories?q=lib%2Fx&in=cache%3Ahub".into()).await;
    assert!(shows(&found, "mirror/lib/x00") && shows(&found, "mirror/lib/x04") && !shows(&found, "mirror/lib/r49"));
    // A group this server does not have.
    assert_eq!(page("/ui/repositories?in=static%3Anone".into()).await.0, 404);
}

#[tokio::test]
async fn the_pages_are_off_where_configured_and_by_default_off_loopback() {
    let server = Server::with_config(BIN, "[ui]\nenabled = false\n").unwrap();
    let api = Api::new(&server);
    assert_eq!(api.get("/").await.unwrap().status(), 404);
    assert_eq!(api.get("/ui/repositories").await.unwrap().status(), 404);
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200, "the API is unchanged");
    let on = Server::start(BIN, &[]).unwrap();
    assert_eq!(Api::new(&on).get("/").await.unwrap().status(), 200, "on by default on loopback");
}

/// The pages in headless Chromium (Selenium drives it): each loads without console errors,
/// shows what it should, paging works, an anonymous viewer does not see a protected
/// repository and a logged-in one does; a screenshot of each page goes to
/// `target/ui-screenshots/`.
#[tokio::test]
async fn the_pages_work_in_a_real_browser() {
    let Some(python) = tessera_testkit::clients::python_with_module("selenium", "TESSERA_SELENIUM_PYTHON") else {
        return;
    };
    if !have_tool("chromium") || !have_tool("chromedriver") {
        return;
    }
    let Some(f) = Federated::start().await else { return };
    // The cache holds part of the upstream image, as after a pull cut short: its config
    // and first layer are held, the other layer is fetched when asked.
    let api = Api::new(&f.server);
    api.get("/v2/mirror/library/base/manifests/v1").await.unwrap();
    for blob in [&f.upstream_image.config, &f.upstream_image.layers[0]] {
        let r = api.get(&format!("/v2/mirror/library/base/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let held = || async {
        let (_, _, page) = f.page("/ui/r/mirror/library/base/-/v1", None).await;
        page.matches("via via-cached").count() == 2
    };
    assert!(tessera_testkit::wait_until_async(Duration::from_secs(10), held).await, "the cache holds two blobs");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui_browser.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .env("TESSERA_URL", format!("http://{}", f.server.host()))
        .env("TESSERA_SHOTS", &shots)
        .env("TESSERA_USER", "alice")
        .env("TESSERA_PASSWORD", "wonder land")
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser checks failed:\n{said}");
    for page in [
        "home",
        "repositories",
        "repository",
        "image",
        "mirrored-image",
        "static-image",
        "cached-image",
        "operations",
        "login",
    ] {
        let shot = shots.join(format!("{page}.png"));
        assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "a screenshot of {page}: {said}");
    }
}
