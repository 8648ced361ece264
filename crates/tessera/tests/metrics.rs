//! `/metrics` read by a real Prometheus text parser (Python's `prometheus_client`, the
//! Prometheus project's own), after skopeo pulled through a cache and pushed.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use tessera_testkit::clients::python_with_module;
use tessera_testkit::{Api, Image, Server, have_tool};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// An upstream name that needs escaping in a label value.
const UPSTREAM: &str = r#"up "quoted" \ name"#;

/// One sample: its name (with `_bucket`, `_count`, `_total` ...), labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// The samples of `text` as `prometheus_client.parser` reads them; panics if it cannot.
fn parse(python: &Path, text: &str) -> Vec<Sample> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused the text: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let parsed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_string(),
            labels: serde_json::from_value(s["labels"].clone()).unwrap(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "one {name} {labels:?} in {:?}", samples.iter().map(|s| &s.name).collect::<Vec<_>>());
    found[0].value
}

fn skopeo(args: &[&str]) {
    let out = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_prometheus_parser_reads_latency_bytes_cache_and_process_figures() {
    let Some(python) = python_with_module("prometheus_client", "TESSERA_METRICS_PYTHON") else { return };
    if !have_tool("skopeo") {
        return;
    }
    let upstream = Server::start(BIN, &[]).unwrap();
    let image = Image::random(2, 300_000);
    Api::new(&upstream).push_image("lib/app", "v1", &image).await.unwrap();
    let config = format!(
        "[[upstream]]\nname = '{UPSTREAM}'\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = '{UPSTREAM}'\n",
        upstream.host()
    );
    let server = Server::with_config(BIN, &config).unwrap();
    let api = Api::new(&server);
    let dir = tessera_testkit::tempdir().unwrap();
    let pulled = |n: u32| format!("oci:{}:v1", dir.path().join(format!("pull{n}")).display());
    let source = format!("docker://{}/mirror/lib/app:v1", server.host());
    skopeo(&[&source, &pulled(1)]);
    skopeo(&[&source, &pulled(2)]);
    skopeo(&[&pulled(1), &format!("docker://{}/team/app:v1", server.host())]);

    let samples = parse(&python, &api.get("/metrics").await.unwrap().text().await.unwrap());
    let blob_bytes: u64 = image.blobs().map(|b| b.len() as u64).sum();
    let blobs = image.blobs().count() as f64;

    // Latency: one histogram per (family, method, class), buckets cumulative up to +Inf.
    let manifest_gets = [("family", "manifest"), ("method", "GET"), ("class", "2xx")];
    let count = value(&samples, "tessera_http_request_duration_seconds_count", &manifest_gets);
    assert!(count >= 2.0, "two pulls read the manifest: {count}");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| {
            s.name == "tessera_http_request_duration_seconds_bucket"
                && manifest_gets.iter().all(|(k, v)| s.labels[*k] == *v)
        })
        .map(|s| (s.labels["le"].parse::<f64>().unwrap(), s.value))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {buckets:?}");
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    assert!(value(&samples, "tessera_http_request_duration_seconds_sum", &manifest_gets) > 0.0);
    let uploads = value(
        &samples,
        "tessera_http_request_duration_seconds_count",
        &[("family", "upload"), ("class", "2xx"), ("method", "PUT")],
    );
    assert!(uploads >= 1.0, "the push closed its uploads: {uploads}");

    // Bytes: the push's bodies in, both pulls' blobs out.
    let received = value(&samples, "tessera_http_request_body_bytes_total", &[("family", "upload")]);
    assert!(received >= blob_bytes as f64, "received {received} of {blob_bytes}");
    let sent = value(&samples, "tessera_http_response_body_bytes_total", &[("family", "blob")]);
    assert!(sent >= 2.0 * blob_bytes as f64, "sent {sent}, two pulls of {blob_bytes}");

    // The cache: the first pull missed every blob, the second hit every one; the label
    // value with a quote and a backslash came through the escaping intact.
    let of = |kind| [("upstream", UPSTREAM), ("kind", kind)];
    assert_eq!(value(&samples, "tessera_cache_misses_total", &of("blob")), blobs);
    assert_eq!(value(&samples, "tessera_cache_hits_total", &of("blob")), blobs);
    assert!(value(&samples, "tessera_cache_hits_total", &of("manifest")) >= 1.0);
    let upstream_blobs = [("upstream", UPSTREAM), ("request", "blob")];
    assert_eq!(value(&samples, "tessera_upstream_request_duration_seconds_count", &upstream_blobs), blobs);
    let held = value(&samples, "tessera_cache_held_bytes", &[("upstream", UPSTREAM)]);
    assert_eq!(held, blob_bytes as f64);

    // The process.
    assert!(value(&samples, "process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(value(&samples, "process_open_fds", &[]) >= 3.0);
    assert!(value(&samples, "process_cpu_seconds_total", &[]) > 0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = value(&samples, "process_start_time_seconds", &[]);
    assert!(started <= now && now - started < 600.0, "started {started}, now {now}");
}
