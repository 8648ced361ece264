//! Promotion with `tessera copy`: within one Tessera (blobs mounted, no byte written),
//! with index children and referrers, every tag, a dry run, the rights it needs; and
//! between registries (Distribution to Tessera), sending only what the destination lacks.

use bytes::Bytes;
use serde_json::json;
use tessera_spec::Digest;
use tessera_testkit::{Api, Distribution, Image, Ran, Server, cli, have_tool, store_files};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn copy(args: &[&str]) -> Ran {
    let ran = cli(BIN, &[&["copy", "--plain-http"], args].concat());
    assert!(ran.ok, "tessera copy {args:?}: {}", ran.output());
    ran
}

/// An index of two images pushed to `name` under `tag`, with a signature-like artifact
/// whose subject is the index. Returns the index's digest, the children, the referrer.
async fn push_index_with_referrer(api: &Api, name: &str, tag: &str) -> (Digest, [Image; 2], Digest) {
    let images = [Image::random(2, 50_000), Image::random(1, 80_000)];
    for image in &images {
        api.push_image(name, &image.digest().to_string(), image).await.unwrap();
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": images.iter().zip(["amd64", "arm64"]).map(|(i, arch)| json!({
            "mediaType": OCI_MANIFEST,
            "digest": i.digest().to_string(),
            "size": i.manifest.len(),
            "platform": { "os": "linux", "architecture": arch },
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let url = api.url(&format!("/v2/{name}/manifests/{tag}"));
    let r = api.http.put(url).header("content-type", OCI_INDEX).body(index.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let index_digest = Digest::sha256_of(&index);
    let signature = b"a signature over the index".to_vec();
    api.push_blob(name, &signature).await.unwrap();
    let empty = b"{}".to_vec();
    api.push_blob(name, &empty).await.unwrap();
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::sha256_of(&empty).to_string(), "size": 2 },
        "layers": [{ "mediaType": "application/vnd.example.signature", "digest": Digest::sha256_of(&signature).to_string(), "size": signature.len() }],
        "subject": { "mediaType": OCI_INDEX, "digest": index_digest.to_string(), "size": index.len() },
    }))
    .unwrap();
    let referrer_digest = Digest::sha256_of(&referrer);
    api.put_manifest(name, &referrer_digest.to_string(), &Bytes::from(referrer)).await.unwrap();
    (index_digest, images, referrer_digest)
}

async fn manifest_status(api: &Api, name: &str, reference: &str) -> u16 {
    let accept = format!("{OCI_INDEX}, {OCI_MANIFEST}");
    let url = api.url(&format!("/v2/{name}/manifests/{reference}"));
    api.http.head(url).header("accept", accept).send().await.unwrap().status().as_u16()
}

async fn tags(api: &Api, name: &str) -> Vec<String> {
    let list: serde_json::Value = api.get(&format!("/v2/{name}/tags/list")).await.unwrap().json().await.unwrap();
    list["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn promotion_within_one_tessera_writes_no_blob_byte_and_brings_children_and_referrers() {
    if !have_tool("skopeo") {
        return;
    }
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let (index, images, referrer) = push_index_with_referrer(&api, "candidate/app", "build-7").await;
    let blobs_before = store_files(&server.data.join("blobs"));

    // A dry run lists what would move and changes nothing.
    let source = format!("{host}/candidate/app@{index}");
    let dry = copy(&["--dry-run", &source, &format!("{host}/stable/app:41")]);
    assert!(dry.stdout.contains("dry run, nothing changed within the registry"), "{}", dry.output());
    assert!(dry.stdout.contains(&format!("image {index} as stable/app:41 would store")), "{}", dry.output());
    assert!(dry.stdout.contains(&format!("referrer {referrer} would store")), "{}", dry.output());
    for image in &images {
        assert!(dry.stdout.contains(&format!("child {} would store", image.digest())), "{}", dry.output());
    }
    assert_eq!(manifest_status(&api, "stable/app", "41").await, 404);

    let done = copy(&[&source, &format!("{host}/stable/app:41")]);
    eprintln!("{}", done.stdout);
    let image_bytes: usize = images.iter().flat_map(Image::blobs).map(Vec::len).sum();
    assert!(done.stdout.contains("copied within the registry"), "{}", done.output());
    assert!(done.stdout.contains(" 0 bytes sent"), "{}", done.output());
    assert_eq!(store_files(&server.data.join("blobs")), blobs_before, "no blob byte written");
    assert!(image_bytes > 100_000);

    // skopeo pulls the promoted index, every platform, from the stable name.
    let dir = tessera_testkit::tempdir().unwrap();
    let out = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/stable/app:41"))
        .arg(format!("oci:{}:pulled", dir.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for blob in images.iter().flat_map(Image::blobs) {
        let d = Digest::sha256_of(blob);
        assert_eq!(&std::fs::read(dir.path().join("blobs/sha256").join(d.hex())).unwrap(), blob);
    }
    let index_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index_json["manifests"][0]["digest"], index.to_string());
    // The signature came along.
    let referrers: serde_json::Value =
        api.get(&format!("/v2/stable/app/referrers/{index}")).await.unwrap().json().await.unwrap();
    assert_eq!(referrers["manifests"][0]["digest"], referrer.to_string(), "{referrers}");

    // Copied again: everything is there already.
    let again = copy(&[&source, &format!("{host}/stable/app:41")]);
    assert!(again.stdout.contains("0 bytes mounted"), "{}", again.output());
}

#[tokio::test]
async fn all_tags_are_promoted_and_a_missing_source_fails_clearly() {
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let host = server.host();
    for tag in ["1.0", "1.1", "latest"] {
        api.push_image("candidate/tool", tag, &Image::random(1, 10_000)).await.unwrap();
    }
    copy(&["--all-tags", &format!("{host}/candidate/tool"), &format!("{host}/stable/tool")]);
    assert_eq!(tags(&api, "stable/tool").await, ["1.0", "1.1", "latest"]);
    for tag in ["1.0", "1.1", "latest"] {
        let digest = |name: &str| {
            let api = &api;
            let path = format!("/v2/{name}/manifests/{tag}");
            async move { api.get(&path).await.unwrap().headers()["docker-content-digest"].clone() }
        };
        assert_eq!(digest("candidate/tool").await, digest("stable/tool").await);
    }

    let missing =
        cli(BIN, &["copy", "--plain-http", &format!("{host}/candidate/tool:2.0"), &format!("{host}/stable/tool:2.0")]);
    assert!(!missing.ok);
    assert!(missing.output().contains("MANIFEST_UNKNOWN"), "{}", missing.output());
}

#[tokio::test]
async fn copying_needs_pull_on_the_source_and_push_on_the_destination() {
    let dir = tessera_testkit::tempdir().unwrap();
    let file = tessera_testkit::htpasswd_file(dir.path(), &[("release", "r-pass"), ("dev", "d-pass")]);
    let config = format!(
        "[auth]\nhtpasswd = \"{}\"\n\n[[access]]\nprefix = \"candidate\"\npull = [\"release\", \"dev\"]\npush = [\"dev\"]\n\n\
         [[access]]\nprefix = \"stable\"\npull = [\"*\"]\npush = [\"release\"]\n\n[[access]]\nprefix = \"secret\"\npush = [\"dev\"]\n",
        file.display()
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let host = server.host();
    let image = Image::random(1, 20_000);
    let (name, digest) = ("candidate/app", image.digest());
    // Pushed as dev, through the registry's own Basic login.
    let dev_api = Api::new(&server).with_http(
        reqwest::Client::builder()
            .default_headers({
                let mut h = reqwest::header::HeaderMap::new();
                let basic = format!("Basic {}", base64_of("dev:d-pass"));
                h.insert("authorization", basic.parse().unwrap());
                h
            })
            .build()
            .unwrap(),
    );
    dev_api.push_image(name, "rc1", &image).await.unwrap();
    dev_api.push_image("secret/app", "rc1", &image).await.unwrap();
    let attempt = |creds: &str, src: &str, dest: &str| {
        cli(BIN, &["copy", "--plain-http", "--creds", creds, &format!("{host}/{src}"), &format!("{host}/{dest}")])
    };
    // dev may not push to stable; release may not pull secret.
    let refused = attempt("dev:d-pass", &format!("{name}@{digest}"), "stable/app:1");
    assert!(!refused.ok && refused.output().contains("DENIED"), "{}", refused.output());
    let refused = attempt("release:r-pass", "secret/app:rc1", "stable/app:1");
    assert!(!refused.ok && refused.output().contains("DENIED"), "{}", refused.output());
    assert!(refused.output().contains("pull right on secret/app"), "{}", refused.output());
    let allowed = attempt("release:r-pass", &format!("{name}@{digest}"), "stable/app:1");
    assert!(allowed.ok, "{}", allowed.output());
    let r = dev_api.get("/v2/stable/app/manifests/1").await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], digest.to_string().as_str());
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn between_registries_only_what_the_destination_lacks_is_sent() {
    let distribution = Distribution::start(None).unwrap();
    let source = Api::at(distribution.addr);
    let shared = tessera_testkit::random_layer(200_000, tessera_testkit::fresh_seed());
    let first = Image::of_layers(vec![shared.clone(), tessera_testkit::random_layer(30_000, 1)], None);
    let second = Image::of_layers(vec![shared.clone(), tessera_testkit::random_layer(40_000, 2)], None);
    source.push_image("vendor/app", "1", &first).await.unwrap();
    source.push_image("vendor/app", "2", &second).await.unwrap();
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let (from, to) = (distribution.addr.to_string(), server.host());

    let one = copy(&[&format!("{from}/vendor/app:1"), &format!("{to}/mirror/app:1")]);
    let first_bytes: usize = first.blobs().map(Vec::len).sum();
    assert!(
        one.stdout.contains(&format!("through this client: 0 bytes mounted, {first_bytes} bytes sent")),
        "{}",
        one.output()
    );
    // The second image shares a layer: only its own blobs travel.
    let two = copy(&[&format!("{from}/vendor/app:2"), &format!("{to}/mirror/app:2")]);
    let second_bytes: usize = second.blobs().map(Vec::len).sum::<usize>() - shared.len();
    assert!(two.stdout.contains(&format!("{second_bytes} bytes sent")), "{}", two.output());
    let shared_line = format!("blob {} ({} bytes) already there", Digest::sha256_of(&shared), shared.len());
    assert!(two.stdout.contains(&shared_line), "{}", two.output());
    for (tag, image) in [("1", &first), ("2", &second)] {
        let r = api.get(&format!("/v2/mirror/app/manifests/{tag}")).await.unwrap();
        assert_eq!(r.headers()["docker-content-digest"], image.digest().to_string().as_str());
    }
    // Into another repository of the same Tessera: mounted from there, nothing sent.
    let three = copy(&[&format!("{to}/mirror/app:1"), &format!("{to}/other/app:1")]);
    assert!(three.stdout.contains("within the registry"), "{}", three.output());
}

#[tokio::test]
async fn a_layer_living_on_a_cdn_stays_there_when_promoted() {
    let server =
        Server::with_config(BIN, "[[delivery]]\nprefix = \"\"\nexternal_allow = [\"https://cdn.example.com/\"]\n")
            .unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    api.push_blob("candidate/app", config).await.unwrap();
    let layer = Digest::sha256_of(b"a layer that lives on the CDN");
    let url = format!("https://cdn.example.com/blobs/{}", layer.hex());
    let located = json!({ "size": 29, "urls": [url], "verify": false }).to_string();
    let r =
        api.http.put(api.url(&format!("/tessera/v1/candidate/app/blobs/{layer}"))).body(located).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(config).to_string(), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 29 }],
    }))
    .unwrap();
    let digest = Digest::sha256_of(&manifest);
    api.put_manifest("candidate/app", "rc", &Bytes::from(manifest)).await.unwrap();

    copy(&[&format!("{host}/candidate/app@{digest}"), &format!("{host}/stable/app:1")]);
    let info: serde_json::Value =
        api.get(&format!("/tessera/v1/stable/app/blobs/{layer}")).await.unwrap().json().await.unwrap();
    assert_eq!(info["here"], false, "{info}");
    assert_eq!(info["urls"], json!([url]), "{info}");
    let r =
        tessera_testkit::no_redirects().get(server.url(&format!("/v2/stable/app/blobs/{layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], url.as_str());
}
