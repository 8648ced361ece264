//! HTTPS with rustls: a real client verifies our certificate; old protocol versions and
//! plain HTTP on the TLS port are refused.

use std::path::Path;
use std::process::Command;

use tessera_testkit::{Image, Server, have_tool, run};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A self-signed certificate for 127.0.0.1 in `dir` (cert.pem, key.pem, and ca.crt for
/// containers' cert-dir convention).
fn make_cert(dir: &Path) {
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")))
    .unwrap();
    std::fs::copy(dir.join("cert.pem"), dir.join("ca.crt")).unwrap();
}

fn tls_server(dir: &Path) -> Server {
    make_cert(dir);
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    Server::start(BIN, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]).unwrap()
}

#[test]
fn https_is_served_and_verified() {
    if !have_tool("openssl") || !have_tool("curl") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let s = tls_server(dir.path());
    assert!(s.log_text().contains("listening on https://"));
    let url = format!("https://{}/v2/", s.addr);
    let out =
        run(Command::new("curl").args(["-sS", "-i", "--cacert"]).arg(dir.path().join("ca.crt")).arg(&url)).unwrap();
    assert!(out.starts_with("HTTP/2 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_lowercase().contains("docker-distribution-api-version: registry/2.0"), "{out}");
    let out = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_version}", "--http1.1", "--cacert"])
        .arg(dir.path().join("ca.crt"))
        .arg(&url))
    .unwrap();
    assert_eq!(out, "1.1");
    // An unknown certificate is refused by the client; TLS 1.1 is refused by us.
    assert!(Command::new("curl").args(["-sS", &url]).output().unwrap().status.code() != Some(0));
    let old = Command::new("curl").args(["-sS", "-k", "--tlsv1.1", "--tls-max", "1.1"]).arg(&url).output().unwrap();
    assert!(!old.status.success(), "TLS 1.1 must not be accepted");
    // Plain HTTP to the TLS port gets no registry answer.
    let plain = Command::new("curl").args(["-sS", "-m", "5"]).arg(format!("http://{}/v2/", s.addr)).output().unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("{}"));
}

#[test]
fn skopeo_pushes_and_pulls_over_verified_tls() {
    if !have_tool("openssl") || !have_tool("skopeo") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let s = tls_server(dir.path());
    let image = Image::random(2, 50_000);
    let layout = dir.path().join("img");
    image.write_layout(&layout, "v1").unwrap();
    let certs = dir.path().to_str().unwrap().to_string();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-cert-dir", &certs])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/tls/app:v1", s.host()))
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "127.0.0.1,localhost"))
    .unwrap();
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--cert-dir", &certs])
        .arg(format!("docker://{}/tls/app:v1", s.host()))
        .env("NO_PROXY", "127.0.0.1,localhost"))
    .unwrap();
    assert_eq!(raw.as_bytes(), &image.manifest[..], "manifest bytes survive the round trip");
}

#[test]
fn sighup_reloads_the_certificate() {
    if !have_tool("openssl") || !have_tool("curl") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let s = tls_server(dir.path());
    let url = format!("https://{}/v2/", s.addr);
    let old_ca = dir.path().join("old.crt");
    std::fs::copy(dir.path().join("ca.crt"), &old_ca).unwrap();
    let trusts = |ca: &Path| {
        Command::new("curl").args(["-sS", "-o", "/dev/null", "--cacert"]).arg(ca).arg(&url).status().unwrap().success()
    };
    assert!(trusts(&old_ca));
    // A new certificate in the same files, then SIGHUP: new connections see it.
    std::fs::remove_file(dir.path().join("cert.pem")).unwrap();
    std::fs::remove_file(dir.path().join("key.pem")).unwrap();
    make_cert(dir.path());
    s.hangup();
    assert!(s.wait_for_log("TLS certificate reloaded", std::time::Duration::from_secs(10)));
    assert!(trusts(&dir.path().join("ca.crt")), "the new certificate is presented");
    assert!(!trusts(&old_ca), "the old one is gone");
    // A broken file is refused and the current certificate keeps serving.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    s.hangup();
    assert!(s.wait_for_log("TLS certificate not reloaded", std::time::Duration::from_secs(10)));
    assert!(trusts(&dir.path().join("ca.crt")));
}

/// A CA and a client certificate it signs for `cn`, in `dir` (ca.pem, client.pem, client-key.pem).
fn make_client_cert(dir: &Path, cn: &str) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=test client CA"])
        .arg("-keyout")
        .arg(dir.join("ca-key.pem"))
        .arg("-out")
        .arg(dir.join("ca.pem")))
    .unwrap();
    run(Command::new("openssl")
        .args(["req"])
        .args(ec)
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(dir.join("client-key.pem"))
        .arg("-out")
        .arg(dir.join("client.csr")))
    .unwrap();
    // X.509 v3 with a client-auth usage: webpki refuses v1 certificates.
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(dir.join("client.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca-key.pem"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(dir.join("client.ext"))
        .arg("-out")
        .arg(dir.join("client.pem")))
    .unwrap();
}

#[test]
fn client_certificates_identify_their_holder() {
    if !have_tool("openssl") || !have_tool("curl") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    make_cert(dir.path());
    make_client_cert(dir.path(), "alice");
    let htpasswd = tessera_testkit::htpasswd_file(dir.path(), &[("bob", "bob-pass")]);
    let start = |mode: &str| {
        let config = dir.path().join(format!("{mode}.toml"));
        std::fs::write(
            &config,
            format!(
                "[tls]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\nclient_ca = \"{d}/ca.pem\"\nclient_auth = \"{mode}\"\n\n[auth]\nhtpasswd = \"{h}\"\n\n[[access]]\nprefix = \"protected\"\npull = [\"alice\"]\npush = [\"alice\"]\n",
                d = dir.path().display(),
                h = htpasswd.display()
            ),
        )
        .unwrap();
        Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap()
    };
    let curl = |s: &Server, with_cert: bool, path: &str| -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]).arg(dir.path().join("ca.crt"));
        if with_cert {
            cmd.arg("--cert").arg(dir.path().join("client.pem")).arg("--key").arg(dir.path().join("client-key.pem"));
        }
        let out = cmd.arg(format!("https://{}{path}", s.addr)).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let optional = start("optional");
    assert_eq!(
        curl(&optional, true, "/v2/protected/app/tags/list"),
        "404",
        "alice by certificate: allowed (nothing there)"
    );
    assert_eq!(curl(&optional, false, "/v2/protected/app/tags/list"), "401", "no certificate: a login is asked");
    assert_eq!(curl(&optional, true, "/v2/_catalog"), "200", "a certificate is a login");
    drop(optional);
    let required = start("required");
    assert_eq!(curl(&required, true, "/v2/protected/app/tags/list"), "404");
    assert_eq!(curl(&required, false, "/v2/"), "000", "no certificate: no TLS session at all");
}
