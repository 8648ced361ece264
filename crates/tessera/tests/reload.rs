//! SIGHUP reloads the routing table without dropping requests in flight; an invalid file
//! is refused with its line and reason and the old table keeps serving.

use std::time::Duration;

use futures_util::StreamExt;
use tessera_spec::Digest;
use tessera_testkit::{Api, Image, Server};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn routing_to(target: &str, a: &Server, b: &Server) -> String {
    format!(
        "[[upstream]]\nname = \"a\"\nurl = \"http://{}\"\n\n[[upstream]]\nname = \"b\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"m\"\nto = \"{target}\"\n",
        a.host(),
        b.host()
    )
}

async fn digest_of(api: &Api, path: &str) -> String {
    let r = api.get(path).await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.headers()["docker-content-digest"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn sighup_swaps_the_routing_table() {
    let (a, b) = (Server::start(BIN, &[]).unwrap(), Server::start(BIN, &[]).unwrap());
    let (in_a, in_b) = (Image::random(1, 6_000_000), Image::random(1, 100));
    Api::new(&a).push_image("x", "v1", &in_a).await.unwrap();
    Api::new(&b).push_image("x", "v1", &in_b).await.unwrap();
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("tessera.toml");
    std::fs::write(&config, routing_to("a", &a, &b)).unwrap();
    let mirror = Server::start(BIN, &["--config", config.to_str().unwrap()]).unwrap();
    let api = Api::new(&mirror);
    assert_eq!(digest_of(&api, "/v2/m/x/manifests/v1").await, in_a.digest().to_string());

    // A download in flight across the reload finishes, with the right bytes.
    let layer = Digest::sha256_of(&in_a.layers[0]);
    let response = api.get(&format!("/v2/m/x/blobs/{layer}")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().to_vec();

    std::fs::write(&config, routing_to("b", &a, &b)).unwrap();
    mirror.hangup();
    assert!(mirror.wait_for_log("configuration reloaded", Duration::from_secs(10)), "{}", mirror.log_text());
    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(received, in_a.layers[0], "the request in flight completed");
    assert_eq!(
        digest_of(&api, "/v2/m/x/manifests/v1").await,
        in_b.digest().to_string(),
        "new requests use the new table"
    );

    // An invalid file: refused with line and reason; the table from before keeps serving.
    std::fs::write(&config, "[[route]]\nprefix = \"m\"\nto = \"a\"\nmode = \"sideways\"\n").unwrap();
    mirror.hangup();
    assert!(mirror.wait_for_log("configuration not reloaded", Duration::from_secs(10)));
    let log = mirror.log_text();
    let line = log.lines().find(|l| l.contains("configuration not reloaded")).unwrap();
    assert!(line.contains("line 4") || log.contains("line 4"), "{log}");
    assert_eq!(digest_of(&api, "/v2/m/x/manifests/v1").await, in_b.digest().to_string());
}
