//! `tessera explain`: the route and sources of a name, without a running server.

use std::process::Command;

use tessera_testkit::{Ran, cli};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

const CONFIG: &str = r#"
[[upstream]]
name = "dockerhub"
url = "https://registry-1.docker.io"
authority = ["docker.io"]

[[upstream]]
name = "quay"
url = "https://quay.io"
authority = ["quay.io"]

[[route]]
prefix = "cool/stuff"
to = "dockerhub:flavio"
mode = "redirect"

[[route]]
prefix = "all"
to = ["hosted", "dockerhub", "quay:team"]
push = true
"#;

fn explain(args: &[&str]) -> String {
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = Ran::of(Command::new(BIN).arg("explain").arg("--config").arg(&config).args(args));
    assert!(out.ok, "{}", out.stderr);
    out.stdout
}

#[test]
fn explains_redirects_caches_groups_and_authorities() {
    let out = explain(&["cool/stuff/x:v2"]);
    assert!(out.contains("route 1"), "{out}");
    assert!(out.contains("redirect (307) to https://registry-1.docker.io/v2/flavio/x/manifests/v2"), "{out}");
    assert!(out.contains("refused (read-only)"), "{out}");

    let out = explain(&["all/app:v1"]);
    assert!(out.contains("route 2"), "{out}");
    assert!(out.contains("1. hosted repository all/app"), "{out}");
    assert!(out.contains("2. upstream dockerhub as library/app"), "{out}");
    assert!(out.contains("3. upstream quay as team/app"), "{out}");
    assert!(out.contains("accepted (hosted)"), "{out}");

    let out = explain(&[
        "--ns",
        "quay.io",
        "org/tool@sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    ]);
    assert!(out.contains("upstream quay as org/tool"), "{out}");
    assert!(out.contains("/v2/org/tool/manifests/sha256:2cf24dba"), "{out}");

    let out = explain(&["mine/app"]);
    assert!(out.contains("no route matched; hosted"), "{out}");
}

#[test]
fn refuses_bad_names_and_configs() {
    let out = cli(BIN, &["explain", "../etc"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("invalid repository name"));
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[[route]]\nto = \"nowhere\"\n").unwrap();
    let out = Ran::of(Command::new(BIN).arg("explain").arg("--config").arg(&config).arg("a"));
    assert!(!out.ok);
    assert!(out.stderr.contains("nowhere"));
}

/// A failed command says what went wrong on one line, causes included, and never prints a
/// backtrace, even where the environment asks for backtraces.
#[test]
fn cli_errors_are_one_line_without_backtrace() {
    let dir = tessera_testkit::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    for backtrace in ["1", "full", "0"] {
        let out = Ran::of(
            Command::new(BIN)
                .env("RUST_BACKTRACE", backtrace)
                .env("RUST_LIB_BACKTRACE", backtrace)
                .arg("explain")
                .arg("--config")
                .arg(&missing)
                .arg("a"),
        );
        assert!(!out.ok);
        let err = out.stderr;
        assert_eq!(err.trim_end().lines().count(), 1, "RUST_BACKTRACE={backtrace}: {err}");
        assert!(err.starts_with("tessera: "), "{err}");
        assert!(err.contains("missing.toml"), "the file is named: {err}");
        assert!(!err.contains("backtrace") && !err.contains("Stack"), "{err}");
    }
    // A syntax error says where, still on one line (toml's own text spans several).
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:5000\"\nroute = [\n").unwrap();
    let out = Ran::of(Command::new(BIN).env("RUST_BACKTRACE", "1").arg("explain").arg("--config").arg(&bad).arg("a"));
    let err = out.stderr;
    assert!(!out.ok);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
}

// Multi-threaded: the in-process upstream answers while the test waits for the command.
#[tokio::test(flavor = "multi_thread")]
async fn live_explain_asks_the_upstream() {
    let upstream = tessera::testing::InProcess::start().await.unwrap();
    let image = tessera_testkit::Image::random(2, 1000);
    tessera_testkit::Api::at(upstream.addr).push_image("flavio/x", "v1", &image).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"cool/stuff\"\nto = \"up:flavio\"\n", upstream.host()),
    )
    .unwrap();
    let out =
        Ran::of(Command::new(BIN).arg("explain").arg("--config").arg(&config).args(["--live", "cool/stuff/x:v1"]));
    assert!(out.ok, "{}", out.stderr);
    let text = out.stdout;
    assert!(text.contains(&format!("upstream up answers {}", image.digest())), "{text}");
    for b in image.blobs() {
        let d = tessera_spec::Digest::sha256_of(b);
        assert!(text.contains(&format!("{d} {} bytes (from up through the cache)", b.len())), "{text}");
    }
    let out =
        Ran::of(Command::new(BIN).arg("explain").arg("--config").arg(&config).args(["--live", "cool/stuff/none:v1"]));
    assert!(out.stdout.contains("answers 404"));
}
