//! Quotas (`[[quota]]`): skopeo pushes under a prefix until its quota refuses one with
//! `DENIED` naming the quota and its use; each blob counts once per prefix; a mount counts
//! too; deleting links frees room at once; the use shows in the API and in `/metrics`.

use tessera_spec::Digest;
use tessera_testkit::{Api, Image, Server, error_code, have_tool, random_layer};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// skopeo copies the image of `layout` to `dest`; its error output when it fails.
fn skopeo_push(layout: &std::path::Path, dest: &str) -> Result<(), String> {
    let out = tessera_testkit::clients::guarded("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

async fn used(api: &Api) -> u64 {
    let quotas: serde_json::Value = api.get("/tessera/v1/_quotas").await.unwrap().json().await.unwrap();
    assert_eq!(quotas["quotas"][0]["prefix"], "team", "{quotas}");
    assert_eq!(quotas["quotas"][0]["max_bytes"], 400_000, "{quotas}");
    quotas["quotas"][0]["used_bytes"].as_u64().unwrap()
}

#[tokio::test]
async fn pushes_stop_at_the_quota_and_deletes_make_room() {
    if !have_tool("skopeo") {
        return;
    }
    let server = Server::with_config(BIN, "[[quota]]\nprefix = \"team\"\nmax_bytes = 400000\n").unwrap();
    let api = Api::new(&server);
    let host = server.host();
    let dir = tessera_testkit::tempdir().unwrap();
    let seed = tessera_testkit::fresh_seed();
    let first = Image::of_layers(vec![random_layer(150_000, seed), random_layer(100_000, seed + 1)], None);
    let second = Image::of_layers(vec![random_layer(200_000, seed + 2)], None);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    first.write_layout(&a, "v1").unwrap();
    second.write_layout(&b, "v1").unwrap();
    let first_bytes: u64 = first.blobs().map(|b| b.len() as u64).sum();
    let second_bytes: u64 = second.blobs().map(|b| b.len() as u64).sum();
    assert!(first_bytes < 400_000 && first_bytes + second_bytes > 400_000);

    skopeo_push(&a, &format!("{host}/team/app:1")).unwrap();
    assert_eq!(used(&api).await, first_bytes);
    // The same blobs in another repository under the prefix count once.
    skopeo_push(&a, &format!("{host}/team/other:1")).unwrap();
    assert_eq!(used(&api).await, first_bytes);

    // The next image would pass the bound: refused, saying which quota and how full.
    let refused = skopeo_push(&b, &format!("{host}/team/app:2")).unwrap_err();
    assert!(refused.contains("denied") || refused.contains("DENIED"), "{refused}");
    // skopeo quotes the server's message, escaping its quotes.
    let said = format!("quota of \"team\" exceeded: {:.1} KiB of 390.6 KiB used", first_bytes as f64 / 1024.0);
    assert!(refused.replace('\\', "").contains(&said), "{refused}");
    assert_eq!(used(&api).await, first_bytes, "nothing of the refused push counts");
    // Outside the prefix (by whole components: "teams" is not "team") it goes in.
    skopeo_push(&b, &format!("{host}/teams/app:1")).unwrap();
    // A mount into the prefix counts like an upload, and is refused the same way.
    let layer = Digest::sha256_of(&second.layers[0]);
    let r = api
        .http
        .post(api.url(&format!("/v2/team/app/blobs/uploads/?mount={layer}&from=teams/app")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");

    // The metric says what the API says.
    let metrics = api.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("tessera_quota_used_bytes{{prefix=\"team\"}} {first_bytes}")), "{metrics}");
    assert!(metrics.contains("tessera_quota_max_bytes{prefix=\"team\"} 400000"), "{metrics}");

    // Deleting the first image's links in both repositories makes room at once.
    for repo in ["team/app", "team/other"] {
        for blob in first.blobs() {
            let url = api.url(&format!("/v2/{repo}/blobs/{}", Digest::sha256_of(blob)));
            assert_eq!(api.http.delete(url).send().await.unwrap().status(), 202);
        }
    }
    skopeo_push(&b, &format!("{host}/team/app:2")).unwrap();
    assert_eq!(used(&api).await, second_bytes);
}
