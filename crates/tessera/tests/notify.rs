//! Notifications (`[[notify]]`) received by a real HTTP server (Python's http.server, in
//! its own process): pushes and pulls by skopeo, a delete and a promotion; the receiver is
//! stopped, Tessera is killed and started again, and once the receiver is back every
//! event arrives, in Distribution's envelope.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::Value;
use tessera_testkit::{Api, Image, Server, cli, free_port, have_tool, spawn_ready, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// Writes each POST it receives as one JSON line (path, headers, body) to a file.
const RECEIVER: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out = sys.argv[2]
class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(out, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": json.loads(body)}) + "\n")
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
"#;

struct Receiver {
    child: Child,
    addr: SocketAddr,
    out: PathBuf,
    dir: PathBuf,
}

impl Receiver {
    fn start(addr: SocketAddr, dir: &Path) -> Receiver {
        let out = dir.join("received.jsonl");
        let mut cmd = Command::new("python3");
        cmd.args(["-c", RECEIVER, &addr.port().to_string(), out.to_str().unwrap()]);
        let (child, _) = spawn_ready(&mut cmd, addr, "/", &dir.join("receiver.log")).unwrap();
        Receiver { child, addr, out, dir: dir.to_path_buf() }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        *self = Receiver::start(self.addr, &self.dir.clone());
    }

    /// Every request received so far.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every event received so far.
    fn events(&self) -> Vec<Value> {
        self.requests().iter().flat_map(|r| r["body"]["events"].as_array().cloned().unwrap_or_default()).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn events_of<'a>(events: &'a [Value], action: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["action"] == action).collect()
}

async fn metric(api: &Api, line_start: &str) -> f64 {
    let text = api.get("/metrics").await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
}

#[tokio::test]
async fn events_reach_a_receiver_that_was_down_across_a_killed_server() {
    if !have_tool("skopeo") || !have_tool("python3") {
        return;
    }
    let dir = tessera_testkit::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let mut receiver = Receiver::start(addr, dir.path());
    let config = format!(
        "[[notify]]\nname = \"hooks\"\nurl = \"http://{addr}/events\"\nevents = [\"push\", \"pull\", \"delete\", \"promote\"]\n\
         headers = {{ Authorization = \"Bearer s3cret\" }}\ntimeout_secs = 2\nbackoff_max_secs = 1\n"
    );
    let mut server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let host = server.host();

    // A push and a pull by skopeo.
    let image = Image::random(1, 30_000);
    image.write_layout(&dir.path().join("layout"), "v1").unwrap();
    let skopeo = |args: &[&str]| {
        let out = tessera_testkit::clients::guarded("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let layout = format!("oci:{}:v1", dir.path().join("layout").display());
    skopeo(&[&layout, &format!("docker://{host}/candidate/app:v1")]);
    skopeo(&[
        &format!("docker://{host}/candidate/app:v1"),
        &format!("oci:{}:pulled", dir.path().join("out").display()),
    ]);
    let digest = image.digest().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || !events_of(&receiver.events(), "pull").is_empty()),
        "push and pull arrive: {:?}",
        receiver.events()
    );
    let request = &receiver.requests()[0];
    eprintln!("{}", serde_json::to_string_pretty(&request["body"]["events"][0]).unwrap());
    assert_eq!(request["path"], "/events");
    assert_eq!(request["headers"]["content-type"], "application/vnd.docker.distribution.events.v1+json");
    assert_eq!(request["headers"]["authorization"], "Bearer s3cret");
    let events = receiver.events();
    let push = events_of(&events, "push");
    assert_eq!(push.len(), 1, "{events:?}");
    let target = &push[0]["target"];
    assert_eq!(target["repository"], "candidate/app");
    assert_eq!(target["digest"], digest.as_str());
    assert_eq!(target["tag"], "v1");
    assert_eq!(target["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(target["size"], image.manifest.len());
    assert_eq!(push[0]["request"]["method"], "PUT");
    assert_eq!(push[0]["request"]["addr"], "127.0.0.1");
    assert_eq!(push[0]["source"]["addr"], host.as_str());
    assert_eq!(target["url"], format!("http://{host}/v2/candidate/app/manifests/{digest}").as_str());
    assert!(push[0]["request"]["useragent"].as_str().is_some_and(|a| !a.is_empty()), "{}", push[0]);
    assert!(push[0]["timestamp"].as_str().is_some_and(|t| t.starts_with("20") && t.ends_with('Z')), "{}", push[0]);
    assert_eq!(events_of(&events, "pull")[0]["target"]["digest"], digest.as_str());

    // The receiver goes down; a delete of the tag and a promotion wait on disk.
    receiver.stop();
    let promoted =
        cli(BIN, &["copy", "--plain-http", &format!("{host}/candidate/app@{digest}"), &format!("{host}/stable/app:1")]);
    assert!(promoted.ok, "{}", promoted.output());
    let r = api.http.delete(api.url("/v2/candidate/app/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let queued = tessera_testkit::wait_until_async(Duration::from_secs(10), || async {
        metric(&api, "tessera_notify_failed_attempts_total{endpoint=\"hooks\"}").await >= 1.0
    })
    .await;
    assert!(queued, "a failed delivery is counted");
    assert_eq!(metric(&api, "tessera_notify_queued_events{endpoint=\"hooks\"}").await, 2.0);

    // Killed and started again while the receiver is still down: the queue is on disk.
    server.restart().unwrap();
    assert!(server.wait_for_log("notification(s) left from before", Duration::from_secs(5)), "{}", server.log_text());
    receiver.restart();
    assert!(
        wait_until(Duration::from_secs(15), || events_of(&receiver.events(), "promote").len() == 1
            && events_of(&receiver.events(), "delete").len() == 1),
        "the queued events arrive: {:?}",
        receiver.events()
    );
    let events = receiver.events();
    let promote = events_of(&events, "promote")[0];
    assert_eq!(promote["target"]["repository"], "stable/app");
    assert_eq!(promote["target"]["fromRepository"], "candidate/app");
    assert_eq!(promote["target"]["digest"], digest.as_str());
    assert_eq!(promote["target"]["tag"], "1");
    let delete = events_of(&events, "delete")[0];
    assert_eq!(delete["target"]["repository"], "candidate/app");
    assert_eq!(delete["target"]["tag"], "v1");
    // Each event once, each with its own id.
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "{events:?}");
    assert_eq!(events_of(&events, "push").len(), 1, "{events:?}");
    let api = Api::new(&server);
    assert_eq!(metric(&api, "tessera_notify_queued_events{endpoint=\"hooks\"}").await, 0.0);
}

#[tokio::test]
async fn a_full_queue_drops_its_oldest_events_and_counts_them() {
    let dir = tessera_testkit::tempdir().unwrap();
    // Nothing listens here: every delivery fails.
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let config =
        format!("[[notify]]\nname = \"down\"\nurl = \"http://{addr}/\"\nqueue_max_events = 3\nbackoff_max_secs = 1\n");
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    for tag in ["a", "b", "c", "d", "e"] {
        api.push_image("team/app", tag, &Image::random(1, 1_000)).await.unwrap();
    }
    assert_eq!(metric(&api, "tessera_notify_queued_events{endpoint=\"down\"}").await, 3.0);
    assert_eq!(metric(&api, "tessera_notify_events_total{endpoint=\"down\",result=\"dropped\"}").await, 2.0);
    let queued: Vec<String> = std::fs::read_dir(server.data.join("notify/down"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(queued.len(), 3);
    for tag in ["c", "d", "e"] {
        assert!(queued.iter().any(|e| e.contains(&format!("\"tag\":\"{tag}\""))), "the newest are kept: {queued:?}");
    }
    drop(dir);
}

#[test]
fn a_misconfigured_endpoint_is_refused_at_start() {
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[[notify]]\nurl = \"http://127.0.0.1:1/\"\nevents = [\"push\", \"mount\"]\n").unwrap();
    let ran = cli(BIN, &["serve", "--config", config.to_str().unwrap()]);
    assert!(!ran.ok);
    assert!(ran.output().contains("unknown event \"mount\""), "{}", ran.output());
}
