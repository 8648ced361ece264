//! Simple signatures made by skopeo with a throwaway GPG key: stored in Tessera through the
//! signature extension API, verified by skopeo pulls with `signedBy` policies (the
//! unsigned, the wrongly signed and a signature replayed onto another name all refused),
//! and served in the lookaside layout for images another registry holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use tessera_spec::Digest;
use tessera_testkit::clients::{ContainersFiles, Podman, short_tempdir};
use tessera_testkit::cosign::{self, CosignKey};
use tessera_testkit::{Api, Distribution, Image, Server, error_code, have_tool};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A GPG home with one new key: its fingerprint and armored public key file.
struct Key {
    home: PathBuf,
    fingerprint: String,
    public: PathBuf,
}

impl Key {
    fn new(dir: &Path, name: &str) -> Key {
        Key::made(dir, name, "never", None, false)
    }

    /// A primary key that only certifies, and signs through a subkey made to sign.
    fn signing_by_subkey(dir: &Path, name: &str) -> Key {
        Key::made(dir, name, "never", None, true)
    }

    /// A key made on 1 January 2020 that expired a day later. Its GPG home lives in that
    /// day for good (`faked-system-time`), so it still signs.
    fn expired(dir: &Path, name: &str) -> Key {
        Key::made(dir, name, "1d", Some("20200101T000000"), false)
    }

    fn made(dir: &Path, name: &str, expire: &str, faked_time: Option<&str>, subkey_signs: bool) -> Key {
        let home = dir.join(format!("gnupg-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        if let Some(time) = faked_time {
            std::fs::write(home.join("gpg.conf"), format!("faked-system-time {time}\n")).unwrap();
        }
        let uid = format!("{name} <{name}@example.com>");
        let (algorithm, usage) = if subkey_signs { ("ed25519", "cert") } else { ("default", "default") };
        gpg_in(&home, None, &["--passphrase", "", "--quick-gen-key", &uid, algorithm, usage, expire]);
        let listing = String::from_utf8(gpg_in(&home, None, &["--list-keys", "--with-colons"])).unwrap();
        let fingerprint = listing.lines().find_map(|l| l.strip_prefix("fpr:")).unwrap().trim_matches(':').to_string();
        if subkey_signs {
            gpg_in(&home, None, &["--passphrase", "", "--quick-add-key", &fingerprint, "ed25519", "sign", "never"]);
        }
        let key = Key { home, fingerprint, public: dir.join(format!("{name}.asc")) };
        key.export(&key.public);
        key
    }

    fn export(&self, to: &Path) {
        std::fs::write(to, gpg_in(&self.home, None, &["--armor", "--export", &self.fingerprint])).unwrap();
    }

    /// Revokes the first subkey, and writes the public key with its revocation to `to`.
    fn revoke_subkey(&self, to: &Path) {
        // gpg's dialogue: select subkey 1, revoke it, confirm, reason 0, no comment, confirm.
        gpg_in(
            &self.home,
            Some("key 1\nrevkey\ny\n0\n\ny\nsave\n"),
            &["--command-fd", "0", "--edit-key", &self.fingerprint],
        );
        self.export(to);
    }

    /// Signs `digest` for `reference` as skopeo does (a simple signature) and stores the
    /// signature in `api`'s signature extension under `name`.
    async fn sign_into(&self, api: &Api, name: &str, reference: &str, digest: &Digest) {
        let payload = serde_json::json!({
            "critical": {
                "type": "atomic container signature",
                "image": { "docker-manifest-digest": digest.to_string() },
                "identity": { "docker-reference": reference },
            },
            "optional": {},
        });
        let signed = gpg_in(
            &self.home,
            Some(&payload.to_string()),
            &["--pinentry-mode", "loopback", "--passphrase", "", "--local-user", &self.fingerprint, "--sign"],
        );
        let body = serde_json::json!({
            "schemaVersion": 2,
            "type": "atomic",
            "name": format!("{digest}@{}", &Digest::sha256_of(&signed).hex()[..32]),
            "content": base64::engine::general_purpose::STANDARD.encode(&signed),
        });
        let url = api.url(&format!("/extensions/v2/{name}/signatures/{digest}"));
        let r = api.http.put(&url).body(body.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// A `signedBy` policy trusting this key for every image of `host`.
    fn policy(&self, dir: &Path, host: &str) -> PathBuf {
        self.write_policy(dir.join(format!("policy-{}.json", &self.fingerprint[..8])), host, None)
    }

    /// Like [`Key::policy`], for images whose signatures name them `signed_prefix...` while
    /// they are pulled as `prefix...` (a mirror, a promoted copy, the far side of an air gap).
    fn remapped_policy(&self, dir: &Path, host: &str, prefix: &str, signed_prefix: &str) -> PathBuf {
        let identity = serde_json::json!({ "type": "remapIdentity", "prefix": prefix, "signedPrefix": signed_prefix });
        self.write_policy(dir.join(format!("policy-{}-remapped.json", &self.fingerprint[..8])), host, Some(identity))
    }

    fn write_policy(&self, path: PathBuf, host: &str, identity: Option<serde_json::Value>) -> PathBuf {
        let mut requirement = serde_json::json!({ "type": "signedBy", "keyType": "GPGKeys", "keyPath": self.public });
        if let Some(identity) = identity {
            requirement["signedIdentity"] = identity;
        }
        let policy = serde_json::json!({
            "default": [{ "type": "reject" }],
            "transports": { "docker": { host: [requirement] } },
        });
        std::fs::write(&path, policy.to_string()).unwrap();
        path
    }
}

/// The signature extension's answer listing `digest`'s simple signatures in `name`.
async fn listed_signatures(api: &Api, name: &str, digest: &Digest) -> serde_json::Value {
    let r = api.get(&format!("/extensions/v2/{name}/signatures/{digest}")).await.unwrap();
    assert_eq!(r.status(), 200, "signatures of {name}@{digest}");
    r.json().await.unwrap()
}

/// gpg in `home` with `args`, fed `input`; its output.
fn gpg_in(home: &Path, input: Option<&str>, args: &[&str]) -> Vec<u8> {
    let mut child = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--yes"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "gpg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// skopeo with `args`; Ok(stdout) or Err(stderr).
fn skopeo(gnupg: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = tessera_testkit::clients::guarded("skopeo");
    if let Some(home) = gnupg {
        cmd.env("GNUPGHOME", home);
    }
    let out = cmd.args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Writes `image` as an OCI layout under `dir` and copies it with skopeo to `dest`
/// (`HOST/NAME:TAG`, plain HTTP), signing it with `key` as it goes when one is given.
fn skopeo_push(dir: &Path, image: &Image, key: Option<&Key>, dest: &str) {
    let at = dir.join(format!("layout-{}", &image.digest().hex()[..16]));
    image.write_layout(&at, "v1").unwrap();
    let (layout, dest) = (format!("oci:{}:v1", at.display()), format!("docker://{dest}"));
    let mut args = vec!["--insecure-policy", "copy", "--dest-tls-verify=false"];
    if let Some(key) = key {
        args.extend(["--sign-by", &key.fingerprint]);
    }
    args.extend([layout.as_str(), dest.as_str()]);
    skopeo(key.map(|k| k.home.as_path()), &args).unwrap();
}

fn pull(policy: &Path, reference: &str, out: &Path, registries_d: Option<&Path>) -> Result<String, String> {
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    if let Some(d) = registries_d {
        args.extend(["--registries.d", d.to_str().unwrap()]);
    }
    let dest = format!("oci:{}:pulled", out.display());
    let source = format!("docker://{reference}");
    // The policy is checked on the source; an OCI layout cannot keep the signatures.
    args.extend(["copy", "--remove-signatures", "--src-tls-verify=false", &source, &dest]);
    skopeo(None, &args)
}

#[tokio::test]
async fn skopeo_signs_into_tessera_and_only_a_trusted_signature_for_that_name_verifies() {
    if !have_tool("skopeo") || !have_tool("podman") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let (trusted, other) = (Key::new(dir.path(), "release"), Key::new(dir.path(), "stranger"));
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let image = Image::random(1, 20_000);
    let r = api.get("/v2/").await.unwrap();
    assert_eq!(r.headers()["x-registry-supports-signatures"], "1");

    // Signed by skopeo as it pushes: the signature goes to the extension API.
    let push = |key: Option<&Key>, dest: &str| skopeo_push(dir.path(), &image, key, &format!("{host}/{dest}"));
    push(Some(&trusted), "signed/app:v1");
    push(None, "unsigned/app:v1");
    push(Some(&other), "stranger/app:v1");
    let digest = image.digest();
    let listed = listed_signatures(&api, "signed/app", &digest).await;
    let signatures = listed["signatures"].as_array().unwrap();
    assert_eq!(signatures.len(), 1, "{listed}");
    assert_eq!(signatures[0]["type"], "atomic");
    assert!(signatures[0]["name"].as_str().unwrap().starts_with(&format!("{digest}@")), "{listed}");
    let content = base64::engine::general_purpose::STANDARD.decode(signatures[0]["content"].as_str().unwrap()).unwrap();
    // The same bytes in the lookaside layout.
    let lookaside = format!("/sigstore/signed/app@sha256={}/signature-1", digest.hex());
    assert_eq!(api.get(&lookaside).await.unwrap().bytes().await.unwrap(), Bytes::from(content.clone()));
    let r = api.get(&format!("/sigstore/signed/app@sha256={}/signature-2", digest.hex())).await.unwrap();
    assert_eq!(r.status(), 404);

    // Pulls under a policy trusting one key.
    let policy = trusted.policy(dir.path(), &host);
    let out = |n: &str| dir.path().join(format!("out-{n}"));
    pull(&policy, &format!("{host}/signed/app:v1"), &out("signed"), None).expect("signed by the trusted key");
    let unsigned = pull(&policy, &format!("{host}/unsigned/app:v1"), &out("unsigned"), None).unwrap_err();
    assert!(unsigned.contains("signature"), "{unsigned}");
    let stranger = pull(&policy, &format!("{host}/stranger/app:v1"), &out("stranger"), None).unwrap_err();
    assert!(stranger.contains("signature"), "{stranger}");
    // podman, with the same policy, judges the same.
    podman_pull(&policy, &host, &format!("{host}/signed/app:v1")).expect("podman verifies the trusted signature");
    let stranger = podman_pull(&policy, &host, &format!("{host}/stranger/app:v1")).unwrap_err();
    assert!(stranger.contains("signature"), "{stranger}");

    // podman signs as it pushes too, into the same API.
    let podman_dir = short_tempdir("tsg").unwrap();
    let podman = Podman::new(podman_dir.path(), ContainersFiles::new(podman_dir.path(), &host).unwrap()).unwrap();
    podman.use_working_driver().unwrap();
    // podman names what it pulls from a layout by the layout's path: a lowercase one.
    image.write_layout(&podman_dir.path().join("img"), "v1").unwrap();
    let image_id = podman.run(&["pull", "-q", &format!("oci:{}:v1", podman_dir.path().join("img").display())]);
    let pushed = podman
        .cmd()
        .env("GNUPGHOME", &trusted.home)
        .args(["push", "--tls-verify=false", "--sign-by", &trusted.fingerprint, image_id.trim()])
        .arg(format!("{host}/podman/app:v1"))
        .output()
        .unwrap();
    assert!(pushed.status.success(), "podman push --sign-by: {}", String::from_utf8_lossy(&pushed.stderr));
    pull(&policy, &format!("{host}/podman/app:v1"), &out("podman"), None).expect("podman's signature verifies");
    drop(podman);

    // The trusted signature copied onto another name is refused: it names signed/app.
    push(None, "replayed/app:v1");
    let name = format!("{digest}@replayed");
    let body = serde_json::json!({
        "schemaVersion": 2, "type": "atomic", "name": name,
        "content": base64::engine::general_purpose::STANDARD.encode(&content),
    });
    let url = api.url(&format!("/extensions/v2/replayed/app/signatures/{digest}"));
    let r = api.http.put(&url).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let replayed = pull(&policy, &format!("{host}/replayed/app:v1"), &out("replayed"), None).unwrap_err();
    assert!(replayed.contains("signed/app"), "the identity mismatch is named: {replayed}");

    // Promotion carries the signature, within this registry and to another one; a policy
    // that maps the promoted name back to the signed one verifies it there.
    let promoted = tessera_testkit::cli(
        BIN,
        &["copy", "--plain-http", &format!("{host}/signed/app@{digest}"), &format!("{host}/stable/app:v1")],
    );
    assert!(promoted.ok && promoted.stdout.contains("copied 1 signature(s)"), "{}", promoted.output());
    let other_server = Server::start(BIN, &[]).unwrap();
    let far = other_server.host();
    let carried = tessera_testkit::cli(
        BIN,
        &["copy", "--plain-http", &format!("{host}/signed/app@{digest}"), &format!("{far}/signed/app:v1")],
    );
    assert!(carried.ok && carried.stdout.contains("copied 1 signature(s)"), "{}", carried.output());
    for (server_host, name) in [(&host, "stable/app"), (&far, "signed/app")] {
        let url = format!("http://{server_host}/extensions/v2/{name}/signatures/{digest}");
        let listed: serde_json::Value = api.http.get(url).send().await.unwrap().json().await.unwrap();
        let kept =
            base64::engine::general_purpose::STANDARD.decode(listed["signatures"][0]["content"].as_str().unwrap());
        assert_eq!(kept.unwrap(), content, "{name} at {server_host}");
    }
    let remapped = trusted.remapped_policy(dir.path(), &far, &far, &host);
    pull(&remapped, &format!("{far}/signed/app:v1"), &out("far"), None).expect("verified on the far registry");

    // What the extension refuses.
    for (body, why) in [
        (serde_json::json!({"schemaVersion": 2, "type": "atomic", "name": "sha256:0@x", "content": "AA=="}), "name"),
        (
            serde_json::json!({"schemaVersion": 1, "type": "atomic", "name": format!("{digest}@x"), "content": "AA=="}),
            "version",
        ),
        (
            serde_json::json!({"schemaVersion": 2, "type": "atomic", "name": format!("{digest}@x"), "content": "%%"}),
            "base64",
        ),
    ] {
        let r = api.http.put(&url).body(body.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400, "{why}");
        assert_eq!(error_code(r).await, "SIGNATURE_INVALID", "{why}");
    }
}

#[tokio::test]
async fn tessera_is_the_lookaside_server_for_images_another_registry_holds() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "vendor");
    let distribution = Distribution::start(None).unwrap();
    let registry = distribution.addr.to_string();
    let (signed, unsigned) = (Image::random(1, 10_000), Image::random(1, 10_000));
    let upstream = Api::at(distribution.addr);
    upstream.push_image("vendor/app", "1", &signed).await.unwrap();
    upstream.push_image("vendor/app", "2", &unsigned).await.unwrap();

    // Signed for the name Distribution serves it under, kept in Tessera.
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, &signed.manifest).unwrap();
    let signature = dir.path().join("signature");
    let reference = format!("{registry}/vendor/app:1");
    skopeo(
        Some(&key.home),
        &[
            "standalone-sign",
            manifest.to_str().unwrap(),
            &reference,
            &key.fingerprint,
            "--output",
            signature.to_str().unwrap(),
        ],
    )
    .unwrap();
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let digest = Digest::sha256_of(&signed.manifest);
    let body = serde_json::json!({
        "schemaVersion": 2, "type": "atomic", "name": format!("{digest}@vendor"),
        "content": base64::engine::general_purpose::STANDARD.encode(std::fs::read(&signature).unwrap()),
    });
    let r = api.http.put(api.url(&format!("/extensions/v2/vendor/app/signatures/{digest}"))).body(body.to_string());
    assert_eq!(r.send().await.unwrap().status(), 201);

    // Clients pull from Distribution and read signatures from Tessera.
    let registries_d = dir.path().join("registries.d");
    std::fs::create_dir_all(&registries_d).unwrap();
    let config = format!("docker:\n  \"{registry}\":\n    lookaside: http://{}/sigstore\n", server.host());
    std::fs::write(registries_d.join("tessera.yaml"), config).unwrap();
    let policy = key.policy(dir.path(), &registry);
    pull(&policy, &reference, &dir.path().join("one"), Some(&registries_d)).expect("verified through the lookaside");
    let refused = pull(&policy, &format!("{registry}/vendor/app:2"), &dir.path().join("two"), Some(&registries_d));
    assert!(refused.unwrap_err().contains("signature"));
    let asked = server.log_text();
    assert!(asked.contains(&format!("GET /sigstore/vendor/app@sha256={}/signature-1", digest.hex())), "{asked}");

    // A cache route over Distribution reads the signatures from the upstream's lookaside,
    // so a requiring rule passes the signed image, and clients verify it through the mirror.
    let config = format!(
        "[[upstream]]\nname = \"dist\"\nurl = \"http://{registry}\"\nlookaside = \"http://{}/sigstore\"\n\n\
         [[route]]\nprefix = \"mirror\"\nto = \"dist\"\n\n[[signatures]]\nprefix = \"mirror\"\nkeys = [{:?}]\n",
        server.host(),
        key.public
    );
    let mirror = Server::with_config(BIN, &config).unwrap();
    let through = format!("{}/mirror/vendor/app:1", mirror.host());
    let policy = key.remapped_policy(dir.path(), &mirror.host(), &format!("{}/mirror", mirror.host()), &registry);
    pull(&policy, &through, &dir.path().join("mirrored"), None).expect("verified through the mirror");
    let refused = pull(&policy, &format!("{}/mirror/vendor/app:2", mirror.host()), &dir.path().join("m2"), None);
    let refused = refused.unwrap_err();
    assert!(refused.contains("is not signed by a key trusted for"), "refused by the mirror itself: {refused}");
    let listed = listed_signatures(&Api::new(&mirror), "mirror/vendor/app", &digest).await;
    assert_eq!(listed["signatures"].as_array().map(Vec::len), Some(1), "read once from the lookaside: {listed}");
}

#[tokio::test]
async fn signatures_come_through_the_cache_and_stay_when_the_upstream_is_gone() {
    if !have_tool("skopeo") || !have_tool("podman") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "upstream");
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 20_000);
    skopeo_push(dir.path(), &image, Some(&key), &format!("{}/signed/app:v1", upstream.host()));
    let config = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n",
        upstream.host()
    );
    let mirror = Server::with_config(BIN, &config).unwrap();
    // The signature names the upstream's name; the policy maps the mirror's name onto it.
    let policy =
        key.remapped_policy(dir.path(), &mirror.host(), &format!("{}/mirror", mirror.host()), &upstream.host());
    let through = format!("{}/mirror/signed/app:v1", mirror.host());
    pull(&policy, &through, &dir.path().join("first"), None).expect("verified through the cache");
    upstream.kill();
    pull(&policy, &through, &dir.path().join("second"), None)
        .expect("the kept signature verifies with the upstream gone");
    podman_pull(&policy, &mirror.host(), &through).expect("podman verifies it through the cache too");
    let digest = image.digest();
    let listed = listed_signatures(&Api::new(&mirror), "mirror/signed/app", &digest).await;
    assert_eq!(listed["signatures"].as_array().map(Vec::len), Some(1), "{listed}");
}

#[tokio::test]
async fn signatures_cross_the_air_gap_with_export_and_import() {
    if !have_tool("skopeo") || !have_tool("podman") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "connected");
    let connected = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 20_000);
    skopeo_push(dir.path(), &image, Some(&key), &format!("{}/signed/app:v1", connected.host()));

    let archive = dir.path().join("carried.tar");
    let reference = format!("{}/signed/app:v1", connected.host());
    let exported = tessera_testkit::cli(BIN, &["export", "--plain-http", &reference, "-o", archive.to_str().unwrap()]);
    assert!(exported.ok, "{}", exported.output());
    let disconnected = Server::start(BIN, &[]).unwrap();
    for _ in 0..2 {
        let imported =
            tessera_testkit::cli(BIN, &["import", "--plain-http", archive.to_str().unwrap(), &disconnected.host()]);
        assert!(imported.ok, "{}", imported.output());
    }
    let digest = image.digest();
    let listed = listed_signatures(&Api::new(&disconnected), "signed/app", &digest).await;
    assert_eq!(listed["signatures"].as_array().map(Vec::len), Some(1), "imported once, twice: {listed}");
    let policy = key.remapped_policy(dir.path(), &disconnected.host(), &disconnected.host(), &connected.host());
    let far = format!("{}/signed/app:v1", disconnected.host());
    pull(&policy, &far, &dir.path().join("far"), None).expect("verified on the far side of the air gap");
    podman_pull(&policy, &disconnected.host(), &far).expect("podman verifies it on the far side too");
}

/// podman pulling `reference` (plain HTTP to `host`) under the signature policy `policy`:
/// Ok, or what it said.
fn podman_pull(policy: &Path, host: &str, reference: &str) -> Result<(), String> {
    let dir = short_tempdir("tsp").unwrap();
    let files = ContainersFiles::new(dir.path(), host).unwrap();
    std::fs::copy(policy, &files.policy).unwrap();
    let podman = Podman::new(dir.path(), files).unwrap();
    podman.use_working_driver().unwrap();
    let out = podman.cmd().args(["pull", "-q", reference]).output().unwrap();
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// A manifest GET's status, and its error message when refused.
async fn manifest_answer(api: &Api, name: &str, reference: &str) -> (u16, String) {
    let r = api.get(&format!("/v2/{name}/manifests/{reference}")).await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let message = format!("{} {}", body["errors"][0]["code"].as_str().unwrap_or(""), body["errors"][0]["message"]);
    (status, message)
}

#[tokio::test]
async fn requiring_routes_serve_only_what_a_trusted_key_signed_for_that_name() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let (trusted, stranger) = (Key::new(dir.path(), "release"), Key::new(dir.path(), "stranger"));
    let (cosign, cosign_stranger) = (CosignKey::new("cosign"), CosignKey::new("cosign-stranger"));
    let cosign_public = cosign.write_public(dir.path(), "cosign");
    let config = format!(
        "[[signatures]]\nprefix = \"secure\"\nkeys = [{:?}, {:?}]\n\n[[signatures]]\nprefix = \"audit\"\nkeys = [{:?}]\nrequire = false\n",
        trusted.public, cosign_public, trusted.public
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let image = Image::random(1, 20_000);
    let digest = image.digest();
    let push = |key: Option<&Key>, dest: &str| skopeo_push(dir.path(), &image, key, &format!("{host}/{dest}"));
    // Pushes are never refused: a signature arrives after its manifest.
    push(Some(&trusted), "secure/app:v1");
    push(None, "secure/unsigned:v1");
    push(Some(&stranger), "secure/stranger:v1");
    push(None, "audit/app:v1");

    // A pull with no policy of its own: the registry decides.
    let insecure_pull = |reference: &str, out: &str| {
        let dest = format!("oci:{}:pulled", dir.path().join(out).display());
        let source = format!("docker://{host}/{reference}");
        skopeo(None, &["--insecure-policy", "copy", "--remove-signatures", "--src-tls-verify=false", &source, &dest])
    };
    insecure_pull("secure/app:v1", "signed").expect("signed by a trusted key");
    assert_eq!(manifest_answer(&api, "secure/app", &digest.to_string()).await.0, 200, "by digest too");
    let refused = insecure_pull("secure/unsigned:v1", "unsigned").unwrap_err();
    assert!(refused.contains("is not signed by a key trusted for"), "{refused}");
    let (status, why) = manifest_answer(&api, "secure/unsigned", "v1").await;
    assert_eq!((status, why.starts_with("DENIED")), (403, true), "{why}");
    assert!(why.contains("no signatures were found"), "{why}");
    let (status, why) = manifest_answer(&api, "secure/stranger", "v1").await;
    assert_eq!(status, 403);
    assert!(why.contains("no trusted key made it"), "{why}");

    // The trusted signature is for secure/app:v1: not for another tag, nor another name.
    let r = api.push_manifest("secure/app", "v2", "application/vnd.oci.image.manifest.v1+json", &image.manifest);
    assert_eq!(r.await.unwrap().status(), 201);
    let (status, why) = manifest_answer(&api, "secure/app", "v2").await;
    assert_eq!(status, 403);
    assert!(why.contains("another tag"), "{why}");
    let listed = listed_signatures(&api, "secure/app", &digest).await;
    let mut replayed = listed["signatures"][0].clone();
    replayed["name"] = format!("{digest}@replayed").into();
    push(None, "secure/replayed:v1");
    let url = api.url(&format!("/extensions/v2/secure/replayed/signatures/{digest}"));
    assert_eq!(api.http.put(&url).body(replayed.to_string()).send().await.unwrap().status(), 201);
    let (status, why) = manifest_answer(&api, "secure/replayed", "v1").await;
    assert_eq!(status, 403);
    assert!(why.contains("another repository"), "{why}");
    let refused = insecure_pull("secure/replayed:v1", "replayed").unwrap_err();
    assert!(refused.contains("another repository"), "skopeo shows the reason: {refused}");

    // Cosign signatures: under the .sig tag and as a referrer, by the trusted key only.
    for (name, key, as_referrer, expected) in [
        ("secure/cosigned", &cosign, false, 200),
        ("secure/cosign-referrer", &cosign, true, 200),
        ("secure/cosign-stranger", &cosign_stranger, false, 403),
    ] {
        let other = Image::random(1, 5_000);
        api.push_image(name, "v1", &other).await.unwrap();
        assert_eq!(manifest_answer(&api, name, "v1").await.0, 403, "{name} before it is signed");
        key.push_signature(&api, name, &other.digest(), &format!("{host}/{name}"), as_referrer).await;
        let (status, why) = manifest_answer(&api, name, "v1").await;
        assert_eq!(status, expected, "{name}: {why}");
    }
    // The signature manifests themselves stay readable for the clients that verify.
    let cosigned = api.get("/v2/secure/cosigned/tags/list").await.unwrap().json::<serde_json::Value>().await.unwrap();
    let sig_tag = cosigned["tags"].as_array().unwrap().iter().find_map(|t| t.as_str().filter(|t| t.ends_with(".sig")));
    assert_eq!(manifest_answer(&api, "secure/cosigned", sig_tag.unwrap()).await.0, 200);

    // An index signed as a whole vouches for the manifests it lists.
    let (amd, arm) = (Image::random(1, 3_000), Image::random(1, 3_000));
    api.push_image("secure/multi", "amd", &amd).await.unwrap();
    api.push_image("secure/multi", "arm", &arm).await.unwrap();
    let index_digest = api.push_index("secure/multi", "all", &[(&amd, "amd64"), (&arm, "arm64")]).await.unwrap();
    cosign.push_signature(&api, "secure/multi", &index_digest, &format!("{host}/secure/multi"), false).await;
    // Asked first, as a node of a cluster that did not serve the index would be: the
    // stored index that lists it is found, and its signature vouches.
    let child = amd.digest().to_string();
    assert_eq!(manifest_answer(&api, "secure/multi", &child).await.0, 200, "vouched for by its signed index");
    assert_eq!(manifest_answer(&api, "secure/multi", "all").await.0, 200);
    assert_eq!(manifest_answer(&api, "secure/multi", &arm.digest().to_string()).await.0, 200);
    // A manifest listed only by an unsigned index is refused, by digest as by tag.
    let lone = Image::random(1, 3_000);
    api.push_image("secure/multi", "lone", &lone).await.unwrap();
    let unsigned_index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [lone.descriptor("amd64")]})
    .to_string();
    let r = api.push_manifest(
        "secure/multi",
        "unsigned",
        "application/vnd.oci.image.index.v1+json",
        unsigned_index.as_bytes(),
    );
    assert_eq!(r.await.unwrap().status(), 201);
    assert_eq!(manifest_answer(&api, "secure/multi", &lone.digest().to_string()).await.0, 403);
    assert_eq!(manifest_answer(&api, "secure/multi", "unsigned").await.0, 403);

    // explain shows each image's signatures, who made them, and what the rule decides.
    let explain_config = dir.path().join("explain.toml");
    std::fs::write(&explain_config, format!("data = {:?}\n{config}\n{}", server.data, server.storage_tables()))
        .unwrap();
    let explain = |reference: &str| {
        let ran =
            tessera_testkit::cli(BIN, &["explain", "--config", explain_config.to_str().unwrap(), "--live", reference]);
        assert!(ran.ok, "{}", ran.output());
        ran.stdout
    };
    let out = explain("secure/app:v1");
    assert!(out.contains("signatures: required by [[signatures]] \"secure\" (identity exact)"), "{out}");
    assert!(out.contains(&format!("OpenPGP {}", trusted.fingerprint)), "the trusted keys are listed: {out}");
    let signed_line = format!(
        "simple signing (OpenPGP) signature-1: signed by OpenPGP {} (release <release@example.com>) for {host}/secure/app:v1; vouches for this pull",
        trusted.fingerprint
    );
    assert!(out.contains(&signed_line), "{out}");
    assert!(out.contains("a pull by this reference is served"), "{out}");
    let out = explain("secure/replayed:v1");
    assert!(out.contains("does not vouch: it is for"), "{out}");
    assert!(out.contains("a pull by this reference is refused"), "{out}");
    let out = explain("secure/cosign-referrer:v1");
    assert!(out.contains("cosign referrer sha256:"), "{out}");
    assert!(out.contains("signed by cosign sha256:"), "{out}");
    let out = explain("other/app:v1");
    assert!(out.contains("signatures: not checked (no [[signatures]] rule covers this name)"), "{out}");

    // What only looks like a signature manifest is checked like any other: its layers
    // claim the payload type but it is not asked for by a .sig tag, or carries no signature.
    let disguised = Image::random(1, 3_000);
    for b in disguised.blobs() {
        api.push_blob("secure/disguised", b).await.unwrap();
    }
    let mut manifest: serde_json::Value = serde_json::from_slice(&disguised.manifest).unwrap();
    manifest["layers"][0]["mediaType"] = "application/vnd.dev.cosign.simplesigning.v1+json".into();
    let as_tag = manifest.to_string();
    manifest["layers"][0]["annotations"] = serde_json::json!({"dev.cosignproject.cosign/signature": "AAAA"});
    let annotated = manifest.to_string();
    let sig_tag = cosign::signature_tag(&Digest::sha256_of(b"elsewhere"));
    for (tag, bytes) in [("evil", &as_tag), ("evil2", &annotated), (sig_tag.as_str(), &as_tag)] {
        let r =
            api.push_manifest("secure/disguised", tag, "application/vnd.oci.image.manifest.v1+json", bytes.as_bytes());
        assert_eq!(r.await.unwrap().status(), 201);
        assert_eq!(manifest_answer(&api, "secure/disguised", tag).await.0, 403, "{tag}");
    }
    // A child of a signed index is admitted by digest, not under a tag of its own.
    let r = api.push_manifest("secure/multi", "child-tag", "application/vnd.oci.image.manifest.v1+json", &amd.manifest);
    assert_eq!(r.await.unwrap().status(), 201);
    assert_eq!(manifest_answer(&api, "secure/multi", "child-tag").await.0, 403);

    // A rule that does not require: served, and counted.
    insecure_pull("audit/app:v1", "audit").expect("an auditing rule serves unsigned images");
    let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
    let count = |outcome: &str| {
        let line = format!("tessera_signature_checks_total{{outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(count("unsigned_served"), Some(1), "{metrics}");
    assert!(count("refused").unwrap() >= 7, "{metrics}");
}

#[tokio::test]
async fn a_key_that_expired_vouches_for_nothing_it_signed() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let (old, current) = (Key::expired(dir.path(), "old"), Key::new(dir.path(), "current"));
    let config = format!("[[signatures]]\nprefix = \"secure\"\nkeys = [{:?}, {:?}]\n", old.public, current.public);
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let (by_old, by_current) = (Image::random(1, 4_000), Image::random(1, 4_000));
    skopeo_push(dir.path(), &by_old, Some(&old), &format!("{}/secure/old:v1", server.host()));
    skopeo_push(dir.path(), &by_current, Some(&current), &format!("{}/secure/current:v1", server.host()));
    let (status, why) = manifest_answer(&api, "secure/old", "v1").await;
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("whose key expired on Thu, 02 Jan 2020"), "{why}");
    assert_eq!(manifest_answer(&api, "secure/current", "v1").await.0, 200, "the same rule's other key");
    // skopeo, trusting the old key by its policy.json, judges the same where no rule stops it.
    skopeo_push(dir.path(), &by_old, Some(&old), &format!("{}/open/old:v1", server.host()));
    let policy = old.policy(dir.path(), &server.host());
    let refused = pull(&policy, &format!("{}/open/old:v1", server.host()), &dir.path().join("out"), None).unwrap_err();
    // Summary 32 is gpgme's GPGME_SIGSUM_KEY_EXPIRED.
    assert!(refused.contains("Source image rejected") && refused.contains("Summary:32,"), "{refused}");
}

#[tokio::test]
async fn a_pass_ends_when_its_key_expires() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    // Long enough to push and pull before it expires on a slow machine.
    let key = Key::made(dir.path(), "brief", "seconds=40", None, false);
    let listing = String::from_utf8(gpg_in(&key.home, None, &["--list-keys", "--with-colons"])).unwrap();
    let expires: u64 =
        listing.lines().find(|l| l.starts_with("pub:")).unwrap().split(':').nth(6).unwrap().parse().unwrap();
    let config = format!("[[signatures]]\nprefix = \"secure\"\nkeys = [{:?}]\n", key.public);
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    // A signed image, and a signed index listing an unsigned one, which the index's pass
    // admits by digest.
    let image = Image::random(1, 4_000);
    skopeo_push(dir.path(), &image, Some(&key), &format!("{}/secure/app:v1", server.host()));
    let child = Image::random(1, 3_000);
    api.push_image("secure/app", "unsigned", &child).await.unwrap();
    let index = api.push_index("secure/app", "multi", &[(&child, "arm64")]).await.unwrap();
    key.sign_into(&api, "secure/app", &format!("{}/secure/app:multi", server.host()), &index).await;
    let (by_digest, child_by_digest) = (image.digest().to_string(), child.digest().to_string());
    assert_eq!(manifest_answer(&api, "secure/app", "unsigned").await.0, 403, "the child has no signature of its own");
    for reference in ["v1", by_digest.as_str(), "multi", child_by_digest.as_str()] {
        let (status, why) = manifest_answer(&api, "secure/app", reference).await;
        assert_eq!(status, 200, "{reference} before the key expires: {why}");
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(now < expires, "the images were pulled only after the key expired; give the key longer");
    tokio::time::sleep(Duration::from_secs(expires - now + 1)).await;
    // The passes remembered from the pulls above, and what they admitted, end with the key.
    for reference in ["v1", by_digest.as_str(), "multi"] {
        let (status, why) = manifest_answer(&api, "secure/app", reference).await;
        assert_eq!(status, 403, "{reference} after the key expired: {why}");
        assert!(why.contains("whose key expired on"), "{why}");
    }
    let (status, why) = manifest_answer(&api, "secure/app", &child_by_digest).await;
    assert_eq!(status, 403, "the index's child after the key expired: {why}");
}

#[tokio::test]
async fn a_signing_subkey_vouches_for_its_primary_key_until_revoked() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::signing_by_subkey(dir.path(), "subkeyed");
    let revoked = dir.path().join("subkeyed-revoked.asc");
    let config = format!(
        "[[signatures]]\nprefix = \"before\"\nkeys = [{:?}]\n\n[[signatures]]\nprefix = \"after\"\nkeys = [{:?}]\n",
        key.public, revoked
    );
    // Signed by the subkey (the primary key cannot sign), before its revocation; the
    // revocation reaches the rule by a reload.
    key.export(&revoked);
    let config_file = dir.path().join("tessera.toml");
    std::fs::write(&config_file, config).unwrap();
    let server = Server::start(BIN, &["--config", config_file.to_str().unwrap()]).unwrap();
    let image = Image::random(1, 4_000);
    for name in ["before/app:v1", "after/app:v1"] {
        skopeo_push(dir.path(), &image, Some(&key), &format!("{}/{name}", server.host()));
    }
    key.revoke_subkey(&revoked);
    server.hangup();
    assert!(server.wait_for_log("configuration reloaded", Duration::from_secs(10)), "{}", server.log_text());
    let api = Api::new(&server);
    assert_eq!(manifest_answer(&api, "before/app", "v1").await.0, 200, "the subkey signs for its primary key");
    let (status, why) = manifest_answer(&api, "after/app", "v1").await;
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("no trusted key made it"), "{why}");
}

#[tokio::test]
async fn a_requiring_cache_route_neither_serves_nor_keeps_what_its_upstream_did_not_sign() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "vendor");
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let (image, other) = (Image::random(1, 20_000), Image::random(1, 20_000));
    for (dest, signer, from) in
        [("signed/app:v1", Some(&key), &image), ("unsigned/app:v1", None, &image), ("other/app:v1", None, &other)]
    {
        skopeo_push(dir.path(), from, signer, &format!("{}/{dest}", upstream.host()));
    }
    // A cosign-signed image upstream: its .sig tag is read through the cache.
    let cosign_key = CosignKey::new("vendor-cosign");
    let cosign_public = cosign_key.write_public(dir.path(), "vendor-cosign");
    let cosigned = Image::random(1, 10_000);
    let upstream_api = Api::new(&upstream);
    upstream_api.push_image("cosigned/app", "v1", &cosigned).await.unwrap();
    let signed_for = format!("{}/cosigned/app", upstream.host());
    cosign_key.push_signature(&upstream_api, "cosigned/app", &cosigned.digest(), &signed_for, false).await;
    let config = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\nauthority = [\"vendor.example\"]\n\n\
         [[route]]\nprefix = \"mirror\"\nto = \"up\"\n\n[[signatures]]\nupstream = \"up\"\nkeys = [{:?}, {:?}]\n",
        upstream.host(),
        key.public,
        cosign_public
    );
    let mirror = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&mirror);
    // The signature names the upstream's repository, which the mirror's name maps to.
    let pull = |name: &str, out: &str| {
        let dest = format!("oci:{}:pulled", dir.path().join(out).display());
        let source = format!("docker://{}/{name}", mirror.host());
        skopeo(None, &["--insecure-policy", "copy", "--remove-signatures", "--src-tls-verify=false", &source, &dest])
    };
    pull("mirror/signed/app:v1", "signed").expect("signed upstream image through the requiring cache");
    let refused = pull("mirror/unsigned/app:v1", "unsigned").unwrap_err();
    assert!(refused.contains("is not signed by a key trusted for"), "{refused}");

    pull("mirror/cosigned/app:v1", "cosigned").expect("cosign-signed upstream image through the requiring cache");
    // The rule names the upstream: it holds however the upstream is reached, here by
    // containerd's ?ns= with the upstream's own names.
    for (name, expected) in [("signed/app", 200), ("unsigned/app", 403)] {
        let r = api.get(&format!("/v2/{name}/manifests/v1?ns=vendor.example")).await.unwrap();
        assert_eq!(r.status(), expected, "{name} by ns");
    }

    // Nor is a blob of an image no signature vouched for fetched into the cache by digest.
    let layer = Digest::sha256_of(&other.layers[0]);
    let r = api.get(&format!("/v2/mirror/other/app/blobs/{layer}")).await.unwrap();
    assert_eq!(r.status(), 403);
    let fetched = format!("\"GET /v2/other/app/blobs/{layer}");
    assert!(!upstream.log_text().contains(&fetched), "the upstream was not asked for it");
    assert_eq!(manifest_answer(&api, "mirror/other/app", "v1").await.0, 403);

    // The cache keeps nothing it refused: asked again by digest, it fetches the manifest from
    // the upstream again (a kept one would be answered from the cache).
    let digest = image.digest();
    let fetches = || upstream.log_text().matches(&format!("GET /v2/unsigned/app/manifests/{digest}")).count();
    let before = fetches();
    let (status, why) = manifest_answer(&api, "mirror/unsigned/app", &digest.to_string()).await;
    assert_eq!(status, 403, "{why}");
    assert_eq!(fetches(), before + 1, "{}", upstream.log_text());
    // With the upstream gone, what passed is still served from the cache.
    upstream.kill();
    assert_eq!(manifest_answer(&api, "mirror/signed/app", "v1").await.0, 200);
    assert_eq!(manifest_answer(&api, "mirror/unsigned/app", &digest.to_string()).await.0, 503);
}

#[tokio::test]
async fn signatures_come_along_with_sync_into_the_cache_and_into_hosted() {
    if !have_tool("skopeo") || !have_tool("gpg") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "synced");
    let mut upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 20_000);
    skopeo_push(dir.path(), &image, Some(&key), &format!("{}/signed/app:v1", upstream.host()));

    let data = dir.path().join("data");
    let config = format!(
        "data = {:?}\n\n[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n\n\
         [[sync]]\nname = \"cached\"\nupstream = \"up\"\nrepositories = [\"signed/app\"]\ninterval_secs = 0\n\n\
         [[sync]]\nname = \"hosted\"\nupstream = \"up\"\nrepositories = [\"signed/app\"]\ninto = \"hosted\"\n\
         hosted_prefix = \"synced\"\ninterval_secs = 0\n\n[[signatures]]\nprefix = \"mirror\"\nkeys = [{:?}]\n\n\
         [[signatures]]\nprefix = \"synced\"\nsigned_prefix = \"\"\nkeys = [{:?}]\n",
        data.display().to_string(),
        upstream.host(),
        key.public,
        key.public
    );
    let config_file = dir.path().join("tessera.toml");
    std::fs::write(&config_file, &config).unwrap();
    for _ in 0..2 {
        let ran = tessera_testkit::cli(BIN, &["sync", "--config", config_file.to_str().unwrap()]);
        assert!(ran.ok && ran.stdout.contains("0 failed"), "{}", ran.output());
    }
    upstream.kill();

    // With the upstream gone, both copies verify on the synced side, and pass its rule.
    let server = Server::start_in(BIN, Some(&data), &["--config", config_file.to_str().unwrap()]).unwrap();
    let host = server.host();
    let digest = image.digest();
    for name in ["synced/signed/app", "mirror/signed/app"] {
        let listed = listed_signatures(&Api::new(&server), name, &digest).await;
        assert_eq!(listed["signatures"].as_array().map(Vec::len), Some(1), "{name}, synced twice: {listed}");
        let prefix = name.trim_end_matches("/signed/app");
        let policy = key.remapped_policy(dir.path(), &host, &format!("{host}/{prefix}"), &upstream.host());
        pull(&policy, &format!("{host}/{name}:v1"), &dir.path().join(prefix), None).expect(name);
    }
}

#[tokio::test]
async fn static_sources_serve_the_signatures_published_beside_them() {
    if !have_tool("skopeo") || !have_tool("gpg") || !have_tool("nginx") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let key = Key::new(dir.path(), "publisher");

    // A Crane directory whose images nginx serves, and a lookaside directory beside it.
    let work = short_tempdir("tsc").unwrap();
    let cdn = tessera_testkit::cdn::Cdn::start("127.0.0.2", None).unwrap();
    let (signed, unsigned) = (Image::random(1, 20_000), Image::random(1, 20_000));
    let crane = work.path().join("crane");
    std::fs::create_dir_all(&crane).unwrap();
    for (image, name) in [(&signed, "isv/app"), (&unsigned, "isv/other")] {
        let layout = work.path().join(name.replace('/', "-"));
        image.write_layout(&layout, "1").unwrap();
        let published = cdn.root.join("pulp").join(name.replace('/', "-"));
        let out = tessera_testkit::cli(
            BIN,
            &["publish", &format!("oci:{}:1", layout.display()), published.to_str().unwrap()],
        );
        assert!(out.ok, "{}", out.output());
        let file = serde_json::json!({"type": "pulp-docker-redirect", "version": 4, "repo-registry-id": name,
            "url": cdn.url(&format!("/pulp/{}/", name.replace('/', "-"))), "protected": false,
            "schema2_data": ["1", image.digest().to_string()], "manifest_list_data": [], "manifest_list_amd64_tags": {}});
        std::fs::write(crane.join(format!("{}.json", name.replace('/', "-"))), file.to_string()).unwrap();
    }
    let lookaside = work.path().join("sigstore");
    let config = format!(
        "[[static]]\nname = \"pulp\"\ncrane_dir = {:?}\nlookaside = {:?}\n\n[[signatures]]\nprefix = \"isv\"\nkeys = [{:?}]\n",
        crane, lookaside, key.public
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let host = server.host();
    // Signed for this registry's name, as Pulp's signing service does with skopeo.
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, &signed.manifest).unwrap();
    let digest = signed.digest();
    let at = lookaside.join(format!("isv/app@sha256={}", digest.hex()));
    std::fs::create_dir_all(&at).unwrap();
    let reference = format!("{host}/isv/app:1");
    let signature = at.join("signature-1");
    let args = [
        "standalone-sign",
        manifest.to_str().unwrap(),
        &reference,
        &key.fingerprint,
        "--output",
        signature.to_str().unwrap(),
    ];
    skopeo(Some(&key.home), &args).unwrap();

    let policy = key.policy(dir.path(), &host);
    pull(&policy, &reference, &dir.path().join("crane-signed"), None).expect("verified from the Crane lookaside");
    let api = Api::new(&server);
    let (status, why) = manifest_answer(&api, "isv/other", "1").await;
    assert_eq!(status, 403, "the unsigned Crane image is refused by the rule: {why}");

    // A signed image in a registry, published as Pulp does: its signature goes into the
    // published tree's sigstore/, which a Crane source reads as its lookaside URL.
    let connected = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 20_000);
    skopeo_push(dir.path(), &image, Some(&key), &format!("{}/signed/app:v1", connected.host()));
    let tree = cdn.root.join("pulp").join("published");
    let source = format!("docker://{}/signed/app:v1", connected.host());
    let ran = tessera_testkit::cli(
        BIN,
        &["publish", "--src-plain-http", "--name", "signed/app", &source, tree.to_str().unwrap()],
    );
    assert!(ran.ok && ran.stdout.contains("1 signature(s)"), "{}", ran.output());
    let crane_file = serde_json::json!({"type": "pulp-docker-redirect", "version": 4, "repo-registry-id": "signed/app",
        "url": cdn.url("/pulp/published/"), "schema2_data": ["v1", image.digest().to_string()],
        "manifest_list_data": [], "manifest_list_amd64_tags": {}});
    let published_crane = work.path().join("published-crane");
    std::fs::create_dir_all(&published_crane).unwrap();
    std::fs::write(published_crane.join("app.json"), crane_file.to_string()).unwrap();
    let config = format!(
        "[[static]]\nname = \"published\"\ncrane_dir = {:?}\nlookaside = {:?}\n\n\
         [[signatures]]\nprefix = \"signed\"\nkeys = [{:?}]\n",
        published_crane,
        cdn.url("/pulp/published/sigstore/"),
        key.public
    );
    let from_cdn = Server::with_config(BIN, &config).unwrap();
    let cdn_host = from_cdn.host();
    let remapped = key.remapped_policy(dir.path(), &cdn_host, &cdn_host, &connected.host());
    pull(&remapped, &format!("{cdn_host}/signed/app:v1"), &dir.path().join("published"), None)
        .expect("verified from the published tree's sigstore/");
    let exported = dir.path().join("exported");
    let reference = format!("{}/signed/app:v1", connected.host());
    let ran = tessera_testkit::cli(BIN, &["export", "--plain-http", &reference, "-o", exported.to_str().unwrap()]);
    assert!(ran.ok, "{}", ran.output());
    let config = format!(
        "[[static]]\nname = \"carried\"\nlayout = {:?}\nrepository = \"carried/app\"\n\n\
         [[signatures]]\nprefix = \"carried\"\nsigned_prefix = \"signed\"\nkeys = [{:?}]\n",
        exported, key.public
    );
    let far = Server::with_config(BIN, &config).unwrap();
    let far_host = far.host();
    let digest = image.digest();
    let listed = listed_signatures(&Api::new(&far), "carried/app", &digest).await;
    assert_eq!(listed["signatures"].as_array().map(Vec::len), Some(1), "{listed}");
    let remapped = key.remapped_policy(
        dir.path(),
        &far_host,
        &format!("{far_host}/carried"),
        &format!("{}/signed", connected.host()),
    );
    pull(&remapped, &format!("{far_host}/carried/app@{digest}"), &dir.path().join("far"), None)
        .expect("verified from the layout's own sigstore");
}
