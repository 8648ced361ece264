//! Moving images across an air gap: `tessera export` writes OCI layouts (directory or
//! archive) that skopeo and podman read, and `tessera import` pushes them into another
//! registry, resumably and verified, keeping every digest.

use std::path::Path;
use std::process::Command;

use tessera_spec::Digest;
use tessera_testkit::clients::{ContainersFiles, Podman, short_tempdir};
use tessera_testkit::{Api, Image, Ran, Server, cli, have_tool};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_string()
}

fn tessera(args: &[&str]) -> Ran {
    cli(BIN, args)
}

async fn digest_of(api: &Api, name: &str, tag: &str) -> Option<String> {
    let r = api
        .http
        .get(api.url(&format!("/v2/{name}/manifests/{tag}")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    r.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn export_and_import_keep_every_digest_and_resume() {
    let work = short_tempdir("tgap").unwrap();
    let work = work.path();
    let source = Server::start(BIN, &[]).unwrap();
    let a = Api::new(&source);
    let app = Image::random(2, 120_000);
    let base = Image::random(1, 80_000);
    a.push_image("isv/app", "1", &app).await.unwrap();
    a.push_image("base/ubi", "9", &base).await.unwrap();
    let refs = [format!("{}/isv/app:1", source.host()), format!("{}/base/ubi:9", source.host())];

    // An archive, readable by skopeo and podman.
    let archive = work.join("images.tar");
    let Ran { ok, stdout: out, stderr: err } =
        tessera(&["export", &refs[0], &refs[1], "-o", &p(&archive), "--plain-http"]);
    assert!(ok, "{out}{err}");
    assert!(archive.is_file());
    if have_tool("skopeo") {
        let files = ContainersFiles::new(work, &source.host()).unwrap();
        let raw = files.skopeo(&["inspect", "--raw", &format!("oci-archive:{}:isv/app:1", p(&archive))]);
        assert_eq!(Digest::sha256_of(raw.as_bytes()), app.digest());
    }
    if have_tool("podman") {
        // podman load takes archives of one image.
        let single = work.join("app.tar");
        assert!(tessera(&["export", &refs[0], "-o", &p(&single), "--plain-http"]).ok);
        let podman = Podman::new(work, ContainersFiles::new(work, &source.host()).unwrap()).unwrap();
        podman.use_working_driver().unwrap();
        let loaded = podman.run(&["load", "-i", &p(&single)]);
        assert!(loaded.contains("isv/app:1"), "{loaded}");
        let id = podman.run(&["image", "inspect", "--format", "{{.Id}}", "isv/app:1"]);
        assert_eq!(id.trim(), Digest::sha256_of(&app.config).hex());
    }

    // Imported into another registry: the same digests, and a second run moves nothing.
    let target = Server::start(BIN, &[]).unwrap();
    let b = Api::new(&target);
    let Ran { ok, stdout: out, stderr: err } = tessera(&["import", &p(&archive), &target.host(), "--plain-http"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("isv/app:1") && out.contains("base/ubi:9"), "{out}");
    assert_eq!(digest_of(&b, "isv/app", "1").await, Some(app.digest().to_string()));
    assert_eq!(digest_of(&b, "base/ubi", "9").await, Some(base.digest().to_string()));
    let layer = Digest::sha256_of(&app.layers[1]);
    let bytes = b.get(&format!("/v2/isv/app/blobs/{layer}")).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.as_ref(), app.layers[1].as_slice());
    let Ran { ok, stderr: err, .. } =
        tessera(&["import", &p(&archive), &target.host(), "--plain-http", "--prefix", "mirror"]);
    assert!(ok, "{err}");
    assert_eq!(digest_of(&b, "mirror/isv/app", "1").await, Some(app.digest().to_string()));
    let Ran { ok, stderr: err, .. } = tessera(&["import", &p(&archive), &target.host(), "--plain-http"]);
    assert!(ok);
    assert_eq!(err.matches("already there").count(), 5, "{err}");

    // A directory export resumes: blobs already written are kept.
    let dir = work.join("layout");
    assert!(tessera(&["export", &refs[0], "-o", &p(&dir), "--plain-http"]).ok);
    let Ran { ok, stderr: err, .. } = tessera(&["export", &refs[0], "-o", &p(&dir), "--plain-http"]);
    assert!(ok);
    assert_eq!(err.matches("already exported").count(), 3, "{err}");
    assert!(!err.contains('\x1b'), "no terminal escapes in a log: {err:?}");

    // A corrupted byte in the carried layout: the import fails and tags nothing.
    let file = dir.join("blobs/sha256").join(layer.hex());
    let mut data = std::fs::read(&file).unwrap();
    data[50] ^= 0xff;
    std::fs::write(&file, &data).unwrap();
    let third = Server::start(BIN, &[]).unwrap();
    let Ran { ok, stderr: err, .. } = tessera(&["import", &p(&dir), &third.host(), "--plain-http"]);
    assert!(!ok);
    assert!(err.contains("does not match its digest"), "{err}");
    assert_eq!(digest_of(&Api::new(&third), "isv/app", "1").await, None);
}

/// On a terminal every blob's transfer is a bar with its bytes of the total (in a log it is
/// one line per blob, as the test above reads it).
#[tokio::test]
async fn transfers_draw_a_progress_bar_per_blob_on_a_terminal() {
    assert!(have_tool("script"), "util-linux script provides the terminal");
    let work = short_tempdir("tbar").unwrap();
    let source = Server::start(BIN, &[]).unwrap();
    let image = Image::random(1, 120_000);
    Api::new(&source).push_image("isv/app", "1", &image).await.unwrap();
    // Each run exports afresh (into a directory of its own).
    let on_terminal = |term: &str| {
        let out_dir = work.path().join(format!("out-{term}"));
        let command = format!("{BIN} export {}/isv/app:1 -o {} --plain-http", source.host(), p(&out_dir));
        let out = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("TERM", term)
            .output()
            .expect("script runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A terminal that cannot move its cursor gets the plain lines.
    let plain = on_terminal("dumb");
    let layer = Digest::sha256_of(&image.layers[0]);
    assert!(plain.contains(&format!("isv/app:1 [2/2] {layer}")) && !plain.contains('\x1b'), "{plain:?}");
    let shown = on_terminal("xterm");
    // Each bar is redrawn in place (carriage returns) and ends its line when done; the
    // layer's last drawing shows all its bytes, of its size, and a full bar.
    let short = layer.hex()[..12].to_string();
    let line = shown.lines().find(|l| l.contains(&short)).unwrap_or_else(|| panic!("{shown:?}"));
    let last = line.rsplit('\r').find(|d| d.contains(&short)).unwrap_or(line);
    let size = format!("{:.2} KiB", image.layers[0].len() as f64 / 1024.0);
    assert!(last.contains(&format!("{size}/{size}")) && last.contains("=]"), "the whole layer: {last:?}");
    assert!(!last.contains("exported"), "the summary starts a line of its own: {shown:?}");
}
