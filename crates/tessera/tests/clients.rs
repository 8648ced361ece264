//! Real container clients against the real binary on 127.0.0.1: skopeo, podman, containerd's
//! `ctr`, dockerd with the docker CLI, and python `oras`. Each test starts its own server and
//! its own daemons in its own short temp dir, so they run in parallel. A missing client
//! skips its test, unless TESSERA_REQUIRE_CLIENTS is set (CI), which makes it a failure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_spec::Digest;
use tessera_testkit::clients::{
    Access, ContainersFiles, DOCKER, Dockerd, Podman, access_log, guarded, gunzip, output, python_with_module,
    short_tempdir,
};
use tessera_testkit::{Api, Image, Server, have_tool, random_bytes, run, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn start() -> (Server, Api) {
    let server = Server::start(BIN, &[]).expect("server starts");
    let api = Api::new(&server);
    (server, api)
}

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_string()
}

/// A manifest as the registry serves it.
struct Served {
    status: u16,
    content_type: String,
    digest: String,
    bytes: Vec<u8>,
}

impl Served {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).expect("manifest is JSON")
    }
}

async fn get_manifest(api: &Api, name: &str, reference: &str, accept: &str) -> Served {
    let r = api
        .http
        .get(api.url(&format!("/v2/{name}/manifests/{reference}")))
        .header("accept", accept)
        .send()
        .await
        .expect("GET manifest");
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (status, content_type, digest) = (r.status().as_u16(), header("content-type"), header("docker-content-digest"));
    let bytes = r.bytes().await.expect("manifest body").to_vec();
    Served { status, content_type, digest, bytes }
}

/// GETs a blob, checking status, digest header and that the bytes hash to `digest`.
async fn get_blob(api: &Api, name: &str, digest: &str) -> Vec<u8> {
    let r = api.get(&format!("/v2/{name}/blobs/{digest}")).await.expect("GET blob");
    assert_eq!(r.status(), 200, "GET /v2/{name}/blobs/{digest}");
    assert_eq!(r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()), Some(digest));
    let bytes = r.bytes().await.expect("blob body").to_vec();
    assert_eq!(Digest::sha256_of(&bytes).to_string(), digest);
    bytes
}

fn config_digest(image: &Image) -> String {
    Digest::sha256_of(&image.config).to_string()
}

fn layer_digests(image: &Image) -> Vec<String> {
    image.layers.iter().map(|l| Digest::sha256_of(l).to_string()).collect()
}

fn diff_ids(image: &Image) -> Vec<String> {
    let config: Value = serde_json::from_slice(&image.config).expect("config JSON");
    config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff id").to_string())
        .collect()
}

/// For a manifest a client re-serialised (podman, docker): its config is the image's config
/// byte for byte, and every layer the registry serves unpacks to the image's layer content.
async fn assert_same_image_content(api: &Api, name: &str, manifest: &Value, image: &Image) {
    assert_eq!(manifest["config"]["digest"].as_str(), Some(config_digest(image).as_str()));
    let config = get_blob(api, name, manifest["config"]["digest"].as_str().unwrap()).await;
    assert_eq!(config, image.config);
    let layers = manifest["layers"].as_array().expect("layers");
    let want = diff_ids(image);
    assert_eq!(layers.len(), want.len());
    for (layer, diff_id) in layers.iter().zip(&want) {
        let digest = layer["digest"].as_str().expect("layer digest");
        let blob = get_blob(api, name, digest).await;
        assert_eq!(layer["size"].as_u64(), Some(blob.len() as u64));
        let tar = gunzip(&blob).expect("layer is gzip");
        assert_eq!(&Digest::sha256_of(&tar).to_string(), diff_id);
    }
}

/// The requests the server logged after byte offset `mark` of its log.
fn requests_since(server: &Server, mark: usize) -> Vec<Access> {
    let text = server.log_text();
    access_log(text.get(mark..).unwrap_or(""))
}

/// Waits (the log is written by a thread) until the requests since `mark` satisfy `check`.
fn assert_log(server: &Server, mark: usize, what: &str, check: impl Fn(&[Access]) -> bool) {
    if !wait_until(Duration::from_secs(5), || check(&requests_since(server, mark))) {
        panic!("server log does not show {what}; log since the mark:\n{}", server.log_text().get(mark..).unwrap_or(""));
    }
}

fn served_blob_get(log: &[Access], name: &str, digest: &str) -> bool {
    log.iter().any(|a| a.method == "GET" && a.target == format!("/v2/{name}/blobs/{digest}") && a.status == 200)
}

/// A cross-repo mount into `name` of the blob with hex `hex`, answered 201 Created.
fn mounted(log: &[Access], name: &str, hex: &str) -> bool {
    log.iter().any(|a| {
        a.method == "POST"
            && a.target.starts_with(&format!("/v2/{name}/blobs/uploads/?"))
            && a.target.contains("mount=")
            && a.target.contains(hex)
            && a.status == 201
    })
}

/// The containers/image files (policy, auth, a registries.conf marking `host` insecure) in `dir`.
fn containers_files(dir: &Path, host: &str) -> ContainersFiles {
    ContainersFiles::new(dir, host).unwrap()
}

// ---------------------------------------------------------------------------------------
// skopeo

#[tokio::test]
async fn skopeo_copies_an_oci_layout_in_and_out_unchanged() {
    if !have_tool("skopeo") {
        return;
    }
    let t0 = Instant::now();
    let (server, api) = start();
    let host = server.host();
    let dir = short_tempdir("tsk").unwrap();
    let files = containers_files(dir.path(), &host);
    let image = Image::random(3, 200_000);
    let digest = image.digest().to_string();
    let src = dir.path().join("img");
    image.write_layout(&src, "v1").unwrap();

    files.skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", p(&src)),
        &format!("docker://{host}/x/a:v1"),
    ]);

    // The registry serves the manifest byte for byte, under the image's own digest.
    let served = get_manifest(&api, "x/a", "v1", OCI_MANIFEST).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.content_type, OCI_MANIFEST);
    assert_eq!(served.digest, digest);
    assert_eq!(served.bytes, image.manifest);
    for blob in image.blobs() {
        let got = get_blob(&api, "x/a", &Digest::sha256_of(blob).to_string()).await;
        assert_eq!(&got, blob);
    }

    // skopeo sees the same.
    let raw = files.skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{host}/x/a:v1")]);
    assert_eq!(raw.as_bytes(), &image.manifest[..]);
    let inspect: Value =
        serde_json::from_str(&files.skopeo(&["inspect", "--tls-verify=false", &format!("docker://{host}/x/a:v1")]))
            .unwrap();
    assert_eq!(inspect["Digest"].as_str(), Some(digest.as_str()));
    assert_eq!(inspect["Layers"], json!(layer_digests(&image)));
    assert_eq!(inspect["Architecture"], "amd64");

    // Out again, by digest, into a fresh layout: same manifest digest, same blob bytes.
    let out = dir.path().join("out");
    files.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{host}/x/a@{digest}"),
        &format!("oci:{}:v1", p(&out)),
    ]);
    let index: Value = serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"].as_str(), Some(digest.as_str()));
    for blob in image.blobs().chain(std::iter::once(&image.manifest)) {
        let path = out.join("blobs/sha256").join(Digest::sha256_of(blob).hex());
        assert_eq!(&std::fs::read(&path).unwrap(), blob, "{}", path.display());
    }

    // Registry to registry, a second tag; then tags/list.
    files.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{host}/x/a:v1"),
        &format!("docker://{host}/x/a:v2"),
    ]);
    let v2 = get_manifest(&api, "x/a", "v2", OCI_MANIFEST).await;
    assert_eq!((v2.status, v2.digest.as_str()), (200, digest.as_str()));
    assert_eq!(v2.bytes, image.manifest);
    let tags: Value =
        serde_json::from_str(&files.skopeo(&["list-tags", "--tls-verify=false", &format!("docker://{host}/x/a")]))
            .unwrap();
    let mut tags: Vec<String> = serde_json::from_value(tags["Tags"].clone()).unwrap();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);

    // Delete (skopeo resolves the tag and deletes by digest): the manifest is gone.
    let mark = server.log_text().len();
    files.skopeo(&["delete", "--tls-verify=false", &format!("docker://{host}/x/a:v1")]);
    assert_log(&server, mark, "DELETE by digest answered 202", |log| {
        log.iter().any(|a| a.method == "DELETE" && a.target == format!("/v2/x/a/manifests/{digest}") && a.status == 202)
    });
    let gone = get_manifest(&api, "x/a", &digest, OCI_MANIFEST).await;
    assert_eq!(gone.status, 404);
    let gone = get_manifest(&api, "x/a", "v1", OCI_MANIFEST).await;
    assert_eq!(gone.status, 404, "tag v1 still resolves after its manifest was deleted");

    eprintln!("skopeo test: {:.1}s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// podman

#[tokio::test]
async fn podman_pushes_and_pulls_back_by_tag_and_by_digest() {
    if !have_tool("podman") {
        return;
    }
    let t0 = Instant::now();
    let (server, api) = start();
    let host = server.host();
    let dir = short_tempdir("tpm").unwrap();
    let podman = Podman::new(dir.path(), containers_files(dir.path(), &host)).unwrap();
    let image = Image::random(3, 200_000);
    let src = dir.path().join("img");
    image.write_layout(&src, "v1").unwrap();
    let image_id = Digest::sha256_of(&image.config).hex().to_string();

    // Native overlay where the kernel allows it, else vfs.
    let driver = podman.use_working_driver().unwrap();
    eprintln!("podman storage driver: {driver}");

    let pulled = podman.run(&["pull", "-q", &format!("oci:{}:v1", p(&src))]);
    assert_eq!(pulled.trim(), image_id);
    let name_b = format!("{host}/x/b:v1");
    podman.run(&["tag", &image_id, &name_b]);
    let digestfile = dir.path().join("digest-b");
    podman.run(&["push", "--digestfile", &p(&digestfile), &name_b]);
    let pushed = std::fs::read_to_string(&digestfile).unwrap().trim().to_string();
    assert!(pushed.starts_with("sha256:"), "digestfile: {pushed:?}");

    // podman re-serialises the manifest: its digest is new, its content is the image's.
    let accept = format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}");
    let served = get_manifest(&api, "x/b", "v1", &accept).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.digest, pushed);
    assert_eq!(Digest::sha256_of(&served.bytes).to_string(), pushed);
    assert_eq!(served.json()["mediaType"].as_str(), Some(served.content_type.as_str()));
    assert_same_image_content(&api, "x/b", &served.json(), &image).await;

    // Remove everything locally, pull back by tag.
    podman.run(&["rmi", "-a", "-f"]);
    assert_eq!(podman.run(&["images", "-q"]).trim(), "");
    let mark = server.log_text().len();
    let pulled = podman.run(&["pull", "-q", &name_b]);
    assert_eq!(pulled.trim(), image_id);
    let inspect: Value = serde_json::from_str(&podman.run(&["image", "inspect", &name_b])).unwrap();
    assert_eq!(inspect[0]["Id"].as_str(), Some(image_id.as_str()));
    assert_eq!(inspect[0]["Digest"].as_str(), Some(pushed.as_str()));
    assert!(
        inspect[0]["RepoDigests"].as_array().unwrap().contains(&json!(format!("{host}/x/b@{pushed}"))),
        "RepoDigests: {}",
        inspect[0]["RepoDigests"]
    );
    let manifest = served.json();
    let blobs: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    assert_log(&server, mark, "every blob of x/b fetched again", |log| {
        blobs.iter().all(|d| served_blob_get(log, "x/b", d))
    });

    // A tagged image pushed elsewhere, then pulled by digest.
    let name_b2 = format!("{host}/x/b2:v2");
    podman.run(&["tag", &name_b, &name_b2]);
    let digestfile = dir.path().join("digest-b2");
    podman.run(&["push", "--digestfile", &p(&digestfile), &name_b2]);
    let pushed2 = std::fs::read_to_string(&digestfile).unwrap().trim().to_string();
    let served2 = get_manifest(&api, "x/b2", "v2", &accept).await;
    assert_eq!((served2.status, served2.digest.as_str()), (200, pushed2.as_str()));
    assert_eq!(Digest::sha256_of(&served2.bytes).to_string(), pushed2);
    assert_same_image_content(&api, "x/b2", &served2.json(), &image).await;

    podman.run(&["rmi", "-a", "-f"]);
    let mark = server.log_text().len();
    let by_digest = format!("{host}/x/b2@{pushed2}");
    let pulled = podman.run(&["pull", "-q", &by_digest]);
    assert_eq!(pulled.trim(), image_id);
    assert_log(&server, mark, "the manifest fetched by digest", |log| {
        log.iter().any(|a| a.method == "GET" && a.target == format!("/v2/x/b2/manifests/{pushed2}") && a.status == 200)
    });
    let inspect: Value = serde_json::from_str(&podman.run(&["image", "inspect", &by_digest])).unwrap();
    assert_eq!(inspect[0]["Id"].as_str(), Some(image_id.as_str()));
    assert_eq!(inspect[0]["Digest"].as_str(), Some(pushed2.as_str()));
    assert_eq!(
        inspect[0]["Config"]["Labels"]["seed"],
        serde_json::from_slice::<Value>(&image.config).unwrap()["config"]["Labels"]["seed"]
    );

    eprintln!("podman test ({driver}): {:.1}s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// containerd + ctr

/// The digest `ctr images ls` lists for `name`.
fn ctr_listed_digest(ls: &str, name: &str) -> Option<String> {
    ls.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&name)).then(|| cols.get(2).map(|d| d.to_string()))?
    })
}

#[tokio::test]
async fn ctr_pushes_with_cross_repo_mount_and_pulls_back() {
    if !(have_tool("containerd") && have_tool("ctr") && have_tool("tar")) {
        return;
    }
    let t0 = Instant::now();
    let (server, api) = start();
    let host = server.host();
    let dir = short_tempdir("tcd").unwrap();
    let containerd = tessera_testkit::clients::Containerd::start(dir.path()).unwrap();
    let ctr = |args: &[&str]| containerd.ctr(args).unwrap();
    let stored = || ctr(&["content", "ls", "-q"]);

    let image = Image::random(3, 200_000);
    let digest = image.digest().to_string();
    let layout = dir.path().join("img");
    image.write_layout(&layout, "v1").unwrap();
    let archive = dir.path().join("img.tar");
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg(".")).unwrap();
    let imported = format!("{host}/x/imp:v1");
    ctr(&["images", "import", "--base-name", &format!("{host}/x/imp"), &p(&archive)]);
    assert_eq!(ctr_listed_digest(&ctr(&["images", "ls"]), &imported), Some(digest.clone()));

    // A plain push uploads every blob; the registry serves the manifest unchanged.
    ctr(&["images", "push", "--plain-http", &imported]);
    let served = get_manifest(&api, "x/imp", "v1", OCI_MANIFEST).await;
    assert_eq!((served.status, served.digest.as_str()), (200, digest.as_str()));
    assert_eq!(served.bytes, image.manifest);
    for blob in image.blobs() {
        assert_eq!(&get_blob(&api, "x/imp", &Digest::sha256_of(blob).to_string()).await, blob);
    }

    // Pull it back (this records where the blobs came from), then push it under a new name:
    // every blob is mounted from x/imp, none uploaded.
    ctr(&["images", "rm", "--sync", &imported]);
    assert!(!stored().contains(&digest), "content left after rm --sync");
    ctr(&["images", "pull", "--plain-http", &imported]);
    let copy = format!("{host}/x/c:v1");
    ctr(&["images", "tag", &imported, &copy]);
    let mark = server.log_text().len();
    ctr(&["images", "push", "--plain-http", &copy]);
    let blobs: Vec<Digest> = image.blobs().map(|b| Digest::sha256_of(b)).collect();
    assert_log(&server, mark, "a 201 mount into x/c for every blob", |log| {
        blobs.iter().all(|d| mounted(log, "x/c", d.hex()))
    });
    let uploads: Vec<Access> = requests_since(&server, mark)
        .into_iter()
        .filter(|a| a.target.starts_with("/v2/x/c/blobs/uploads/") && a.method != "POST")
        .collect();
    assert!(uploads.is_empty(), "blobs uploaded despite mounts: {uploads:?}");
    let served = get_manifest(&api, "x/c", "v1", OCI_MANIFEST).await;
    assert_eq!((served.status, served.digest.as_str()), (200, digest.as_str()));
    assert_eq!(served.bytes, image.manifest);

    // Forget everything, pull the new name: fetched from the registry, bytes unchanged.
    ctr(&["images", "rm", "--sync", &imported, &copy]);
    assert!(!stored().contains(&digest), "content left after rm --sync");
    let mark = server.log_text().len();
    ctr(&["images", "pull", "--plain-http", &copy]);
    assert_eq!(ctr_listed_digest(&ctr(&["images", "ls"]), &copy), Some(digest.clone()));
    assert_log(&server, mark, "every blob of x/c fetched", |log| {
        blobs.iter().all(|d| served_blob_get(log, "x/c", &d.to_string()))
    });
    let content_get = |d: &str| output(guarded("ctr").args(["-a", &containerd.sock, "content", "get", d])).unwrap();
    assert_eq!(content_get(&digest), image.manifest);
    for blob in image.blobs() {
        assert_eq!(&content_get(&Digest::sha256_of(blob).to_string()), blob);
    }

    drop(containerd);
    eprintln!("ctr test: {:.1}s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// dockerd + docker CLI

#[tokio::test]
async fn docker_pushes_schema2_and_pulls_back() {
    if !(have_tool("dockerd") && have_tool(DOCKER) && have_tool("skopeo")) {
        return;
    }
    let t0 = Instant::now();
    let (server, api) = start();
    let host = server.host();
    let dir = short_tempdir("tdk").unwrap();
    let files = containers_files(dir.path(), &host);
    let image = Image::random(3, 200_000);
    let src = dir.path().join("img");
    image.write_layout(&src, "v1").unwrap();
    let config = config_digest(&image);
    let name_d = format!("{host}/x/d:v1");
    // `docker load` cannot read an OCI layout: convert it to a docker-archive first.
    let archive = dir.path().join("d.tar");
    files.skopeo(&["copy", &format!("oci:{}:v1", p(&src)), &format!("docker-archive:{}:{name_d}", p(&archive))]);

    let mut dockerd = Dockerd::start(dir.path(), "{}").unwrap();
    let driver = dockerd.driver;
    let docker = |args: &[&str]| dockerd.run(args);

    let loaded = docker(&["load", "-i", &p(&archive)]);
    assert!(loaded.contains(&format!("Loaded image: {name_d}")), "{loaded}");
    assert_eq!(docker(&["image", "inspect", "-f", "{{.Id}}", &name_d]).trim(), config);

    // docker converts to schema 2 (new digest); the registry serves what it pushed.
    let out = docker(&["push", &name_d]);
    let (pushed, size) = push_digest(&out);
    let served = get_manifest(&api, "x/d", "v1", DOCKER_MANIFEST).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.content_type, DOCKER_MANIFEST);
    assert_eq!(served.digest, pushed);
    assert_eq!(Digest::sha256_of(&served.bytes).to_string(), pushed);
    assert_eq!(served.bytes.len(), size);
    let manifest = served.json();
    assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
    assert_same_image_content(&api, "x/d", &manifest, &image).await;
    let layers: Vec<String> =
        manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();

    // The same image under another name: layers are mounted from x/d.
    let name_d2 = format!("{host}/x/d2:v1");
    docker(&["tag", &name_d, &name_d2]);
    let mark = server.log_text().len();
    let out = docker(&["push", &name_d2]);
    assert_eq!(push_digest(&out).0, pushed);
    assert!(out.contains("Mounted from x/d"), "{out}");
    assert_log(&server, mark, "a 201 mount into x/d2 for every layer", |log| {
        layers.iter().all(|d| mounted(log, "x/d2", d.trim_start_matches("sha256:")))
    });
    let served2 = get_manifest(&api, "x/d2", "v1", DOCKER_MANIFEST).await;
    assert_eq!((served2.status, served2.digest.as_str()), (200, pushed.as_str()));

    // Remove it locally, pull it back.
    docker(&["rmi", &name_d, &name_d2]);
    assert_eq!(docker(&["images", "-q"]).trim(), "");
    let mark = server.log_text().len();
    let out = docker(&["pull", &name_d]);
    assert!(out.contains(&format!("Digest: {pushed}")), "{out}");
    assert_eq!(docker(&["image", "inspect", "-f", "{{.Id}}", &name_d]).trim(), config);
    let repo_digests: Vec<String> =
        serde_json::from_str(&docker(&["image", "inspect", "-f", "{{json .RepoDigests}}", &name_d])).unwrap();
    assert_eq!(repo_digests, [format!("{host}/x/d@{pushed}")]);
    assert_log(&server, mark, "every layer of x/d fetched", |log| {
        layers.iter().all(|d| served_blob_get(log, "x/d", d))
    });

    let (status, clean) = dockerd.stop(Duration::from_secs(30));
    eprintln!("dockerd stopped: {status:?}, clean: {clean}");
    eprintln!("docker test ({driver}): {:.1}s", t0.elapsed().as_secs_f64());
}

/// The `<tag>: digest: sha256:… size: N` line of `docker push`.
fn push_digest(out: &str) -> (String, usize) {
    out.lines()
        .find_map(|l| {
            let rest = l.split_once(": digest: ")?.1;
            let (digest, size) = rest.split_once(" size: ")?;
            Some((digest.trim().to_string(), size.trim().parse().ok()?))
        })
        .unwrap_or_else(|| panic!("no digest in docker push output:\n{out}"))
}

// ---------------------------------------------------------------------------------------
// python oras

const ORAS_SCRIPT: &str = r#"
import json, sys
import requests, oras.client, oras.oci

reg = sys.argv[1]
c = oras.client.OrasClient(hostname=reg, insecure=True)
out = {}

r = c.push(target=f"{reg}/art/a:v1", files=["artifact.bin"],
           manifest_annotations={"org.example.k": "v", "org.example.n": "1"})
out["push"] = {"status": r.status_code, "digest": r.headers.get("Docker-Content-Digest")}
out["pulled"] = c.pull(target=f"{reg}/art/a:v1", outdir="out")
out["tags"] = c.get_tags(f"{reg}/art/a")

h = requests.head(f"http://{reg}/v2/art/a/manifests/v1",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
subject = oras.oci.Subject(mediaType=h.headers["Content-Type"],
                           digest=h.headers["Docker-Content-Digest"],
                           size=int(h.headers["Content-Length"]))
out["subject"] = {"status": h.status_code, "mediaType": subject.mediaType,
                  "digest": subject.digest, "size": subject.size}
r = c.push(target=f"{reg}/art/a:sig", files=["sig.json:application/vnd.example.sig+json"],
           manifest_config="cfg.json:application/vnd.example.sig.config+json", subject=subject)
out["sig"] = {"status": r.status_code, "digest": r.headers.get("Docker-Content-Digest"),
              "oci_subject": r.headers.get("OCI-Subject")}
print(json.dumps(out))
"#;

#[tokio::test]
async fn oras_pushes_artifacts_and_referrers() {
    let Some(python) = python_with_module("oras.client", "TESSERA_ORAS_PYTHON") else {
        return;
    };
    let t0 = Instant::now();
    let (server, api) = start();
    let host = server.host();
    let dir = short_tempdir("tor").unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let artifact = random_bytes(300_000, tessera_testkit::fresh_seed());
    std::fs::write(work.join("artifact.bin"), &artifact).unwrap();
    let sig = br#"{"signature":"not really"}"#;
    std::fs::write(work.join("sig.json"), sig).unwrap();
    std::fs::write(work.join("cfg.json"), b"{}").unwrap();
    let script = dir.path().join("drive_oras.py");
    std::fs::write(&script, ORAS_SCRIPT).unwrap();

    let stdout = run(guarded(&python).current_dir(&work).arg(&script).arg(&host)).unwrap();
    let out: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("script output is not JSON ({e}):\n{stdout}"));

    // The artifact: pushed, served, pulled back byte for byte.
    assert_eq!(out["push"]["status"], 201);
    let served = get_manifest(&api, "art/a", "v1", OCI_MANIFEST).await;
    assert_eq!(served.status, 200);
    assert_eq!(out["push"]["digest"].as_str(), Some(served.digest.as_str()));
    assert_eq!(Digest::sha256_of(&served.bytes).to_string(), served.digest);
    let manifest = served.json();
    assert_eq!(manifest["annotations"]["org.example.k"], "v");
    assert_eq!(manifest["annotations"]["org.example.n"], "1");
    let layer = &manifest["layers"][0];
    assert_eq!(layer["digest"].as_str(), Some(Digest::sha256_of(&artifact).to_string().as_str()));
    assert_eq!(layer["annotations"]["org.opencontainers.image.title"], "artifact.bin");
    assert_eq!(get_blob(&api, "art/a", layer["digest"].as_str().unwrap()).await, artifact);
    let pulled = out["pulled"][0].as_str().expect("pulled a file");
    assert_eq!(std::fs::read(pulled).unwrap(), artifact);
    assert_eq!(out["tags"], json!(["v1"]));

    // The subject, as HEAD described it.
    assert_eq!(out["subject"]["status"], 200);
    assert_eq!(out["subject"]["mediaType"], OCI_MANIFEST);
    assert_eq!(out["subject"]["digest"].as_str(), Some(served.digest.as_str()));
    assert_eq!(out["subject"]["size"], served.bytes.len());

    // The referrer: stored with its subject, and listed by the referrers API.
    assert_eq!(out["sig"]["status"], 201);
    assert_eq!(out["sig"]["oci_subject"].as_str(), Some(served.digest.as_str()));
    let sig_digest = out["sig"]["digest"].as_str().expect("sig digest").to_string();
    let sig_manifest = get_manifest(&api, "art/a", "sig", OCI_MANIFEST).await;
    assert_eq!(sig_manifest.digest, sig_digest);
    assert_eq!(sig_manifest.json()["subject"]["digest"].as_str(), Some(served.digest.as_str()));
    assert_eq!(get_blob(&api, "art/a", sig_manifest.json()["layers"][0]["digest"].as_str().unwrap()).await, sig);

    let referrers = |query: &'static str| {
        let api = api.clone();
        let path = format!("/v2/art/a/referrers/{}{query}", served.digest);
        async move {
            let r = api.get(&path).await.unwrap();
            assert_eq!(r.status(), 200, "GET {path}");
            let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let filters = r.headers().get("oci-filters-applied").and_then(|v| v.to_str().ok()).map(str::to_string);
            (ct, filters, r.json::<Value>().await.unwrap())
        }
    };
    let (ct, _, index) = referrers("").await;
    assert_eq!(ct, OCI_INDEX);
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(
        index["manifests"],
        json!([{
            "mediaType": OCI_MANIFEST,
            "digest": sig_digest,
            "size": sig_manifest.bytes.len(),
            "artifactType": "application/vnd.example.sig.config+json",
        }])
    );
    let (_, filters, index) = referrers("?artifactType=application/vnd.example.sig.config%2Bjson").await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(index["manifests"][0]["digest"].as_str(), Some(sig_digest.as_str()));
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let (_, filters, index) = referrers("?artifactType=application/vnd.example.other").await;
    assert_eq!(filters.as_deref(), Some("artifactType"));
    assert_eq!(index["manifests"], json!([]));

    let tags: Value = api.get("/v2/art/a/tags/list").await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!(["sig", "v1"]));

    eprintln!("oras test: {:.1}s", t0.elapsed().as_secs_f64());
}
