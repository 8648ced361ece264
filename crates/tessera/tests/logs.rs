//! Log lines: `--log-format json` writes one JSON object per line, access lines included,
//! and every line a request logs carries the request's id, which its answer names in
//! `X-Request-Id`.

use std::time::Duration;

use serde_json::Value;
use tessera_testkit::{Api, Server, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// The log's lines, each parsed as JSON (a line that is not JSON fails the test).
fn json_lines(server: &Server) -> Vec<Value> {
    server
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers().get("x-request-id").expect("every answer names its request").to_str().unwrap().to_string()
}

#[tokio::test]
async fn json_logs_carry_each_requests_id_on_every_line_of_it() {
    // A route to an upstream that is not there: the request logs a warning before its
    // access line.
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("tessera.toml");
    let closed = free_port().unwrap();
    std::fs::write(
        &config,
        format!("[[upstream]]\nname = \"up\"\nurl = \"http://127.0.0.1:{closed}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n"),
    )
    .unwrap();
    let server = Server::start(BIN, &["--config", &config.to_string_lossy(), "--log-format", "json"]).unwrap();
    let api = Api::new(&server);
    let failing = api.get("/v2/mirror/lib/app/manifests/v1").await.unwrap();
    assert_eq!(failing.status(), 503);
    let failing_id = request_id(&failing);
    let other_id = request_id(&api.get("/v2/").await.unwrap());
    assert_ne!(failing_id, other_id, "each request has its own id");

    assert!(
        wait_until(Duration::from_secs(5), || server.log_text().contains(&other_id)),
        "both requests are logged:\n{}",
        server.log_text()
    );
    let lines = json_lines(&server);
    let of = |id: &str| -> Vec<&Value> { lines.iter().filter(|l| l["span"]["id"] == id).collect() };
    let failing_lines = of(&failing_id);
    assert!(
        failing_lines.iter().any(|l| l["level"] == "WARN" && l["target"] != "access"),
        "the upstream's failure is logged under the request's id:\n{failing_lines:#?}"
    );
    let access = failing_lines.iter().find(|l| l["target"] == "access").expect("an access line with the id");
    let message = access["message"].as_str().unwrap();
    assert!(message.contains("\"GET /v2/mirror/lib/app/manifests/v1\" 503"), "{message}");
    assert!(of(&other_id).iter().any(|l| l["target"] == "access"));
    // Lines outside any request (start-up) are JSON too, without a request id.
    assert!(lines.iter().any(|l| l["message"].as_str().is_some_and(|m| m.contains("listening on"))));
}

#[tokio::test]
async fn text_logs_name_the_request_too() {
    let server = Server::start(BIN, &[]).unwrap();
    let api = Api::new(&server);
    let id = request_id(&api.get("/v2/nothing/manifests/v1").await.unwrap());
    assert!(
        wait_until(Duration::from_secs(5), || server.log_text().contains(&format!("request{{id={id}}}"))),
        "the access line names the request:\n{}",
        server.log_text()
    );
}
