//! Three Tessera nodes on one Garage bucket and one PostgreSQL database, behind nginx
//! balancing round robin with no stickiness: one registry to every client. Real clients
//! push and pull through the balancer; uploads move from node to node; a node is killed in
//! the middle of a push; a tag moved on one node is served by the others within the bound;
//! cold pulls through the cache make one upstream fetch for the whole cluster; garbage
//! collection on one node loses nothing the others push.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_spec::Digest;
use tessera_store::{BlobStore, S3BlobStore, S3Settings};
use tessera_testkit::balancer::Balancer;
use tessera_testkit::cdn::Cdn;
use tessera_testkit::clients::{ContainersFiles, DOCKER, Dockerd, Podman, short_tempdir};
use tessera_testkit::cosign::CosignKey;
use tessera_testkit::garage::Garage;
use tessera_testkit::postgres::Postgres;
use tessera_testkit::{Api, Image, Server, have_tool, random_bytes, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const NODES: usize = 3;
/// `changes_poll_ms` of the nodes: the documented bound on how long a node may serve an
/// answer another node's change made stale.
const CHANGES_POLL: Duration = Duration::from_millis(1000);

/// The engines, three nodes sharing them, and the balancer in front.
struct Cluster {
    balancer: Balancer,
    nodes: Vec<Server>,
    garage: Garage,
    prefix: String,
    /// The configuration every node runs with, and the database's URL in it.
    config: String,
    url: String,
    pg: Postgres,
    _keys: tessera_testkit::TempDir,
}

impl Cluster {
    /// `None` where the engines are not installed (`.ci/run` installs them).
    fn start(name: &str, extra: &str) -> Option<Cluster> {
        let garage = Garage::for_test()?;
        let pg = Postgres::for_test()?;
        let keys = tessera_testkit::tempdir().unwrap();
        let prefix = format!("{name}/");
        let storage = garage.storage_toml(keys.path(), &prefix).unwrap();
        let url = pg.database("registry").unwrap();
        let config = format!(
            "{extra}\n{storage}\n[storage.postgres]\nurl = \"{url}\"\nchanges_poll_ms = {}\n",
            CHANGES_POLL.as_millis()
        );
        let nodes: Vec<Server> = (0..NODES).map(|_| Server::with_config(BIN, &config).expect("node starts")).collect();
        let balancer = Balancer::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>()).unwrap();
        Some(Cluster { balancer, nodes, garage, prefix, config, url, pg, _keys: keys })
    }

    /// The registry as clients see it: through the balancer.
    fn api(&self) -> Api {
        Api::at(self.balancer.addr)
    }

    fn node(&self, i: usize) -> Api {
        Api::new(&self.nodes[i])
    }

    /// The bucket under the cluster's prefix (plus `sub`), as the nodes see it.
    async fn bucket(&self, sub: &str) -> S3BlobStore {
        let settings = S3Settings {
            endpoint: Some(self.garage.endpoint.parse().unwrap()),
            region: Garage::REGION.into(),
            bucket: self.garage.bucket.clone(),
            prefix: format!("{}{sub}", self.prefix),
            path_style: true,
            access_key_id: Some(self.garage.key_id.clone()),
            secret_access_key: Some(self.garage.secret.clone()),
        };
        S3BlobStore::open(settings, tessera_testkit::no_redirects()).await.expect("the bucket opens")
    }

    fn logs(&self) -> String {
        self.nodes.iter().enumerate().map(|(i, n)| format!("--- node {i}\n{}", n.log_text())).collect()
    }
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The image's manifest and every blob, read from `api`, are the image's.
async fn assert_serves(api: &Api, name: &str, reference: &str, image: &Image) {
    let r = api
        .http
        .get(api.url(&format!("/v2/{name}/manifests/{reference}")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{} serves {name}:{reference}", api.base);
    assert_eq!(r.bytes().await.unwrap(), image.manifest, "{} serves the manifest", api.base);
    for blob in image.blobs() {
        let r = api.get(&format!("/v2/{name}/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
        assert_eq!(r.status(), 200, "{} serves a blob of {name}", api.base);
        assert!(r.bytes().await.unwrap() == blob[..], "{} serves the blob whole", api.base);
    }
}

/// The digest a registry answers for `name:reference` (`None`: not found).
async fn served_digest(api: &Api, name: &str, reference: &str) -> Option<String> {
    let r = api
        .http
        .head(api.url(&format!("/v2/{name}/manifests/{reference}")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    match r.status().as_u16() {
        200 => Some(r.headers()["docker-content-digest"].to_str().unwrap().to_string()),
        404 => None,
        s => panic!("HEAD {name}:{reference} answered {s}"),
    }
}

/// `tessera_metadata_queries_total` of a node.
async fn queries(api: &Api) -> u64 {
    let text = api.get("/metrics").await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tessera_metadata_queries_total "))
        .expect("the metric is there with PostgreSQL")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn real_clients_push_and_pull_through_the_balancer_and_every_node_serves_it() {
    if !have_tool("skopeo") {
        return;
    }
    let Some(cluster) = Cluster::start("clients", "") else { return };
    let host = cluster.balancer.host();
    let dir = short_tempdir("tcl").unwrap();
    let files = ContainersFiles::new(dir.path(), &host).unwrap();
    let image = Image::random(3, 300_000);
    let src = dir.path().join("img");
    image.write_layout(&src, "v1").unwrap();

    files.skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", p(&src)),
        &format!("docker://{host}/team/app:v1"),
    ]);
    for i in 0..NODES {
        assert_serves(&cluster.node(i), "team/app", "v1", &image).await;
    }
    let back = dir.path().join("back");
    files.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{host}/team/app:v1"),
        &format!("oci:{}:v1", p(&back)),
    ]);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], image.digest().to_string(), "skopeo pulled it back unchanged");

    // ("-": answered by nginx itself, such as a client closing before the answer.)
    let spread: std::collections::HashSet<String> =
        cluster.balancer.requests().into_iter().map(|r| r.upstream).filter(|u| u != "-").collect();
    assert_eq!(spread.len(), NODES, "the balancer sent requests to every node: {spread:?}");

    if have_tool("podman") {
        let pdir = short_tempdir("tcp").unwrap();
        let podman = Podman::new(pdir.path(), ContainersFiles::new(pdir.path(), &host).unwrap()).unwrap();
        podman.use_working_driver().unwrap();
        let image_id = Digest::sha256_of(&image.config).hex().to_string();
        let pulled = podman.run(&["pull", "-q", &format!("{host}/team/app:v1")]);
        assert_eq!(pulled.trim(), image_id, "podman pulled the image through the balancer");
        let pushed_name = format!("{host}/team/podman:v1");
        podman.run(&["tag", &image_id, &pushed_name]);
        podman.run(&["push", &pushed_name]);
        podman.run(&["rmi", "-a", "-f"]);
        assert_eq!(podman.run(&["pull", "-q", &pushed_name]).trim(), image_id, "and pushed it and pulled it back");
    }

    if have_tool("dockerd") && have_tool(DOCKER) {
        let ddir = short_tempdir("tcd").unwrap();
        let archive = ddir.path().join("d.tar");
        let name = format!("{host}/team/docker:v1");
        files.skopeo(&["copy", &format!("oci:{}:v1", p(&src)), &format!("docker-archive:{}:{name}", p(&archive))]);
        let dockerd = Dockerd::start(ddir.path(), "{}").unwrap();
        dockerd.run(&["load", "-i", &p(&archive)]);
        let pushed = dockerd.run(&["push", &name]);
        assert!(pushed.contains("digest: sha256:"), "{pushed}");
        dockerd.run(&["rmi", &name]);
        let pulled = dockerd.run(&["pull", &name]);
        assert!(pulled.contains("Downloaded newer image") || pulled.contains("Pull complete"), "{pulled}");
        let config = format!("sha256:{}", Digest::sha256_of(&image.config).hex());
        assert_eq!(dockerd.run(&["image", "inspect", "-f", "{{.Id}}", &name]).trim(), config);
    }
}

#[tokio::test]
async fn a_chunked_upload_moves_from_node_to_node() {
    let Some(cluster) = Cluster::start("chunks", "") else { return };
    let blob = Bytes::from(random_bytes(20 * 1024 * 1024 + 333, 15));
    let digest = Digest::sha256_of(&blob);
    let r = cluster.node(0).http.post(cluster.node(0).url("/v2/lib/moving/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with('/'), "a location any node answers: {location}");
    // Each chunk to another node; the first ends inside an 8 MiB part, the second crosses one.
    let cuts = [0, 9 * 1024 * 1024 + 7, 17 * 1024 * 1024 + 1, blob.len()];
    for (i, w) in cuts.windows(2).enumerate().take(2) {
        let node = cluster.node(1 + i);
        let r = node
            .http
            .patch(node.url(&location))
            .header("content-range", format!("{}-{}", w[0], w[1] - 1))
            .body(blob.slice(w[0]..w[1]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "PATCH on node {}: {}", 1 + i, r.text().await.unwrap());
    }
    let r = cluster.node(0).http.get(cluster.node(0).url(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", cuts[2] - 1).as_str(), "node 0 knows the offset node 2 left");
    let node = cluster.node(1);
    let r = node
        .http
        .put(node.url(&Api::with_digest(&location, &digest)))
        .header("content-range", format!("{}-{}", cuts[2], blob.len() - 1))
        .body(blob.slice(cuts[2]..))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for i in 0..NODES {
        let r = cluster.node(i).get(&format!("/v2/lib/moving/blobs/{digest}")).await.unwrap();
        assert!(r.bytes().await.unwrap() == blob, "node {i} serves the blob whole");
    }
    assert!(cluster.bucket("").await.upload_list().await.unwrap().is_empty(), "the session is gone everywhere");
}

#[tokio::test]
async fn a_node_killed_in_the_middle_of_a_patch_leaves_the_upload_to_the_others() {
    let Some(mut cluster) = Cluster::start("killed", "") else { return };
    let blob = Bytes::from(random_bytes(28 * 1024 * 1024 + 5, 16));
    let digest = Digest::sha256_of(&blob);
    let victim = cluster.node(0);
    let location = victim.start_upload("lib/survivor").await.unwrap();
    let path = location.trim_start_matches(&victim.base).to_string();

    // The PATCH streams the first 20 MiB, then stalls with the node still reading.
    let (send, receive) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let first = blob.slice(..20 * 1024 * 1024);
    tokio::spawn(async move {
        for piece in first.chunks(1024 * 1024) {
            if send.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                return;
            }
        }
        // Held open: the request never ends while the node lives.
        std::future::pending::<()>().await;
    });
    let stream = tokio_stream_from(receive);
    let patch = victim.http.patch(victim.url(&path)).body(reqwest::Body::wrap_stream(stream)).send();
    let patching = tokio::spawn(patch);
    let other = cluster.node(1);
    let stored = wait_until_async(Duration::from_secs(30), || {
        let (other, path) = (&other, &path);
        async move {
            let r = other.http.get(other.url(path)).send().await.unwrap();
            let range = r.headers().get("range").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            range
                .rsplit('-')
                .next()
                .and_then(|end| end.parse::<u64>().ok())
                .is_some_and(|end| end >= 16 * 1024 * 1024 - 1)
        }
    })
    .await;
    assert!(stored, "two parts of the PATCH reached the bucket:\n{}", cluster.logs());
    cluster.nodes[0].kill();
    assert!(patching.await.unwrap().is_err(), "the client of the dead node lost its request");

    // The client asks the balancer (the dead node is skipped) for the true offset.
    let api = cluster.api();
    let r = api.http.get(api.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 204, "the upload lives on");
    let end: usize = r.headers()["range"].to_str().unwrap().rsplit('-').next().unwrap().parse().unwrap();
    let offset = end + 1;
    assert!((16 * 1024 * 1024..=20 * 1024 * 1024).contains(&offset), "offset {offset}: what reached the bucket");
    for i in 1..NODES {
        let r = cluster.node(i).http.head(cluster.node(i).url(&format!("/v2/lib/survivor/blobs/{digest}"))).send();
        assert_eq!(r.await.unwrap().status(), 404, "no partial blob is visible on node {i}");
    }
    assert!(cluster.bucket("").await.stat(&digest).await.unwrap().is_none(), "no partial blob in the bucket");
    let r = api
        .http
        .patch(api.url(&path))
        .header("content-range", format!("{offset}-{}", blob.len() - 1))
        .body(blob.slice(offset..))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let r = api.http.put(api.url(&Api::with_digest(&path, &digest))).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for i in 1..NODES {
        let r = cluster.node(i).get(&format!("/v2/lib/survivor/blobs/{digest}")).await.unwrap();
        assert!(r.bytes().await.unwrap() == blob, "node {i} serves the finished blob whole");
    }

    // A real client pushes through the balancer with a node down, and while another dies.
    if have_tool("skopeo") {
        let dir = short_tempdir("tck").unwrap();
        let files = ContainersFiles::new(dir.path(), &cluster.balancer.host()).unwrap();
        let image = Image::random(4, 6 * 1024 * 1024);
        let src = dir.path().join("img");
        image.write_layout(&src, "v1").unwrap();
        let dest = format!("docker://{}/team/pushed:v1", cluster.balancer.host());
        let source = format!("oci:{}:v1", p(&src));
        let copy = std::thread::spawn(move || {
            files.skopeo(&["copy", "--retry-times", "5", "--dest-tls-verify=false", &source, &dest]);
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.nodes[1].kill();
        copy.join().expect("skopeo finished the push through the node left");
        assert_serves(&cluster.node(2), "team/pushed", "v1", &image).await;
        assert_serves(&cluster.api(), "team/pushed", "v1", &image).await;
    }
}

/// A stream of what `receive` yields (reqwest wants a `Stream`).
fn tokio_stream_from(
    mut receive: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| receive.poll_recv(cx))
}

#[tokio::test]
async fn a_tag_moved_through_one_node_is_served_by_the_others_within_the_bound() {
    let Some(cluster) = Cluster::start("tags", "") else { return };
    let (first, second) = (Image::random(1, 10_000), Image::random(1, 10_000));
    cluster.node(0).push_image("team/app", "stable", &first).await.unwrap();
    for i in 1..NODES {
        assert_eq!(served_digest(&cluster.node(i), "team/app", "stable").await, Some(first.digest().to_string()));
    }

    // Cached and valid: reads cost the database nothing (after the first of each).
    let reader = cluster.node(1);
    let layer = Digest::sha256_of(&first.layers[0]);
    let head_layer = || reader.http.head(reader.url(&format!("/v2/team/app/blobs/{layer}"))).send();
    assert_eq!(head_layer().await.unwrap().status(), 200);
    // (News of the push may still be on its way, and make the node read once more.)
    let free = wait_until_async(Duration::from_secs(5), || async {
        let before = queries(&reader).await;
        for _ in 0..50 {
            assert!(served_digest(&reader, "team/app", "stable").await.is_some());
            assert!(served_digest(&reader, "team/app", &first.digest().to_string()).await.is_some());
            assert_eq!(head_layer().await.unwrap().status(), 200);
        }
        queries(&reader).await == before
    })
    .await;
    assert!(free, "150 cached reads made no query");

    // Moved on node 0: the others serve the new digest within the bound.
    let moved_at = Instant::now();
    cluster.node(0).push_image("team/app", "stable", &second).await.unwrap();
    let pushed = moved_at.elapsed();
    let seen = wait_until_async(CHANGES_POLL + Duration::from_secs(2), || async {
        let mut all = true;
        for i in 1..NODES {
            all &= served_digest(&cluster.node(i), "team/app", "stable").await == Some(second.digest().to_string());
        }
        all
    })
    .await;
    assert!(seen, "every node serves the moved tag:\n{}", cluster.logs());
    eprintln!("tag moved: seen by every node {:?} after the push finished", moved_at.elapsed() - pushed);

    // Deleted on node 2: gone from the others too.
    let r = cluster.node(2).http.delete(cluster.node(2).url(&format!("/v2/team/app/manifests/{}", second.digest())));
    assert_eq!(r.send().await.unwrap().status(), 202);
    let gone = wait_until_async(CHANGES_POLL + Duration::from_secs(2), || async {
        let mut all = true;
        for i in 0..2 {
            all &= served_digest(&cluster.node(i), "team/app", "stable").await.is_none();
            all &= served_digest(&cluster.node(i), "team/app", &second.digest().to_string()).await.is_none();
        }
        all
    })
    .await;
    assert!(gone, "every node forgot the deleted manifest and its tag");
}

/// An upstream on a slow nginx serving one blob where a registry serves it, and the routes
/// that mount it as `mirror/`.
fn slow_upstream(rate: u64, name: &str, blob: &[u8]) -> (Cdn, String) {
    let cdn = Cdn::throttled("127.0.0.1", rate).unwrap();
    let path = format!("v2/{name}/blobs/{}", Digest::sha256_of(blob));
    std::fs::create_dir_all(cdn.file(&path).parent().unwrap()).unwrap();
    std::fs::write(cdn.file(&path), blob).unwrap();
    let routes = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n",
        cdn.url("")
    );
    (cdn, routes)
}

/// The upstream's GETs of `blob` so far.
fn upstream_gets(cdn: &Cdn, blob: &[u8]) -> usize {
    let tail = Digest::sha256_of(blob).to_string();
    cdn.requests().iter().filter(|r| r.method == "GET" && r.path.ends_with(&tail)).count()
}

#[tokio::test]
async fn eight_cold_pulls_over_three_nodes_make_one_upstream_get() {
    let blob = random_bytes(12 * 1024 * 1024, 17);
    let (cdn, routes) = slow_upstream(6 * 1024 * 1024, "lib/app", &blob);
    let Some(cluster) = Cluster::start("fill", &routes) else { return };
    let digest = Digest::sha256_of(&blob);
    let pulls: Vec<_> = (0..8)
        .map(|i| {
            let (node, digest) = (cluster.node(i % NODES), digest.clone());
            tokio::spawn(async move {
                let r = node.get(&format!("/v2/mirror/lib/app/blobs/{digest}")).await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap())
            })
        })
        .collect();
    for pull in pulls {
        let (status, body) = pull.await.unwrap();
        assert_eq!(status, 200);
        assert!(body == blob[..], "every client got the blob whole");
    }
    assert_eq!(upstream_gets(&cdn, &blob), 1, "one upstream GET for the cluster:\n{}", cluster.logs());
}

#[tokio::test]
async fn a_node_that_dies_while_filling_hands_the_fetch_over() {
    let blob = random_bytes(8 * 1024 * 1024, 18);
    let (cdn, routes) = slow_upstream(2 * 1024 * 1024, "lib/app", &blob);
    let Some(mut cluster) = Cluster::start("handover", &routes) else { return };
    let digest = Digest::sha256_of(&blob);
    let path = format!("/v2/mirror/lib/app/blobs/{digest}");
    let filler = cluster.node(0);
    let first = {
        let path = path.clone();
        tokio::spawn(async move { filler.get(&path).await.ok()?.bytes().await.ok() })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let waiting: Vec<_> = (1..NODES)
        .map(|i| {
            let (node, path) = (cluster.node(i), path.clone());
            tokio::spawn(async move {
                let r = node.get(&path).await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[0].kill();
    assert!(first.await.unwrap().is_none(), "the dead node's client lost its answer");
    for pull in waiting {
        let (status, body) = pull.await.unwrap();
        assert_eq!(status, 200);
        assert!(body == blob[..], "the waiting clients got the blob whole from the node that took over");
    }
    assert_eq!(upstream_gets(&cdn, &blob), 2, "the dead node's fetch, then one more:\n{}", cluster.logs());
    assert!(cluster.bucket("cache/up/").await.stat(&digest).await.unwrap().is_some(), "the blob landed once");
}

#[tokio::test]
async fn garbage_collection_on_one_node_loses_nothing_the_others_push() {
    let gc = "[storage]\ngc_interval_secs = 1\ngc_grace_secs = 3\ngc_untagged = true\n";
    let Some(cluster) = Cluster::start("gc", gc) else { return };
    let doomed = Image::random(2, 40_000);
    cluster.api().push_image("team/doomed", "v1", &doomed).await.unwrap();
    let r = cluster.api().http.delete(cluster.api().url(&format!("/v2/team/doomed/manifests/{}", doomed.digest())));
    assert_eq!(r.send().await.unwrap().status(), 202);

    // Pushes through the balancer for several collection passes, some with their layers
    // waiting through a pass before their manifest comes (within the grace period).
    let started = Instant::now();
    let mut pushed = Vec::new();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let image = Image::random(2, 30_000);
        let api = cluster.api();
        for blob in image.blobs() {
            api.push_blob(&format!("team/app{round}"), blob).await.unwrap();
        }
        if round % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let r = api
            .push_manifest(
                &format!("team/app{round}"),
                "v1",
                "application/vnd.oci.image.manifest.v1+json",
                &image.manifest,
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "round {round}: {}", r.text().await.unwrap());
        pushed.push((format!("team/app{round}"), image));
        round += 1;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    for i in 0..NODES {
        for (name, image) in &pushed {
            assert_serves(&cluster.node(i), name, "v1", image).await;
        }
    }
    let bucket = cluster.bucket("").await;
    for blob in doomed.layers.iter() {
        let digest = Digest::sha256_of(blob);
        let gone = wait_until_async(Duration::from_secs(20), || {
            let (bucket, digest) = (&bucket, &digest);
            async move { bucket.stat(digest).await.unwrap().is_none() }
        })
        .await;
        assert!(gone, "the deleted image's layer left the bucket");
    }
    let passes: usize = cluster.nodes.iter().map(|n| n.log_text().matches("garbage collection pass").count()).sum();
    assert!(passes >= 4, "collection passes ran ({passes}):\n{}", cluster.logs());
}

#[tokio::test]
async fn one_node_collects_garbage_at_a_time() {
    // The nodes collect only when asked, so the test decides who holds the lease.
    let Some(cluster) = Cluster::start("lease", "[storage]\ngc_interval_secs = 0\n") else { return };
    let doomed = Image::random(1, 30_000);
    cluster.api().push_image("team/doomed", "v1", &doomed).await.unwrap();
    let r = cluster.api().http.delete(cluster.api().url(&format!("/v2/team/doomed/manifests/{}", doomed.digest())));
    assert_eq!(r.send().await.unwrap().status(), 202);

    // Another node in the middle of a pass: this process takes the lease as a node does.
    let store = tessera_store::PostgresMetaStore::connect(&cluster.url, None, None).await.unwrap();
    let other = store.join_cluster(Duration::from_secs(1), std::sync::Arc::new(|_| {})).await.unwrap();
    let lease = tessera_store::ClusterLocks::try_lock(&other, "gc").await.unwrap().expect("the lease is free");
    let dir = tessera_testkit::tempdir().unwrap();
    let config = dir.path().join("tessera.toml");
    std::fs::write(&config, &cluster.config).unwrap();
    let gc = {
        let (config, data) = (p(&config), p(&dir.path().join("data")));
        move || tessera_testkit::cli(BIN, &["gc", "--config", &config, "--data", &data, "--grace-secs", "0"])
    };
    let waited = tokio::task::spawn_blocking(gc.clone()).await.unwrap();
    assert!(waited.ok, "{}", waited.output());
    assert!(waited.stdout.contains("another node is collecting garbage now; nothing done"), "{}", waited.output());
    let layer = Digest::sha256_of(&doomed.layers[0]);
    assert!(cluster.bucket("").await.stat(&layer).await.unwrap().is_some(), "nothing was collected");

    // The lease given back (as a node that finished or died does), the pass runs.
    drop(lease);
    let ran = wait_until_async(Duration::from_secs(10), || {
        let gc = gc.clone();
        async move { !tokio::task::spawn_blocking(gc).await.unwrap().stdout.contains("nothing done") }
    })
    .await;
    assert!(ran, "the pass ran once the lease was free");
    assert!(cluster.bucket("").await.stat(&layer).await.unwrap().is_none(), "the deleted image's layer is gone");
    assert_eq!(served_digest(&cluster.node(1), "team/doomed", &doomed.digest().to_string()).await, None);
}

#[tokio::test]
async fn probes_say_whether_a_node_can_serve_and_a_stopping_node_finishes_its_requests() {
    let Some(cluster) = Cluster::start("probes", "") else { return };
    let node = cluster.node(0);
    let r = node.get("/healthz").await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap().trim().to_string()), (200, "ok".to_string()));
    assert_eq!(node.get("/readyz").await.unwrap().status(), 200);
    cluster.pg.stop().unwrap();
    let r = node.get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503, "not ready without its metadata database");
    let why = r.text().await.unwrap();
    assert!(why.contains("metadata store"), "{why}");
    assert!(!why.contains("127.0.0.1"), "no internal address is told to an anonymous prober: {why}");
    assert_eq!(node.get("/healthz").await.unwrap().status(), 200, "but alive");
    cluster.pg.restart().unwrap();
    let ready =
        wait_until_async(Duration::from_secs(20), || async { node.get("/readyz").await.unwrap().status() == 200 });
    assert!(ready.await, "ready again once the database is back");

    // SIGTERM with a PATCH streaming: the request finishes, then the node exits.
    let location = node.start_upload("lib/draining").await.unwrap();
    let (send, receive) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let patch = node.http.patch(&location).body(reqwest::Body::wrap_stream(tokio_stream_from(receive))).send();
    let patching = tokio::spawn(patch);
    send.send(Ok(Bytes::from(vec![1u8; 1024 * 1024]))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = cluster.nodes[0].pid();
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(cluster.nodes[0].wait_for_log("shutting down", Duration::from_secs(5)), "the node heard SIGTERM");
    send.send(Ok(Bytes::from(vec![2u8; 1024 * 1024]))).await.unwrap();
    drop(send);
    let r = patching.await.unwrap().unwrap();
    assert_eq!(r.status(), 202, "the request in flight finished");
    assert_eq!(r.headers()["range"], format!("0-{}", 2 * 1024 * 1024 - 1).as_str());
    assert!(cluster.nodes[0].wait_for_log("stopped", Duration::from_secs(10)), "then the node exited");
    // The balancer sends everything to the others.
    let api = cluster.api();
    for _ in 0..6 {
        assert_eq!(api.get("/v2/").await.unwrap().status(), 200);
    }
}

/// A requiring cache route in a cluster, behind a balancer that is not sticky: what a
/// signature vouched for through one node (the platform manifests a signed index lists,
/// fetched by digest; the blobs of a manifest that passed) every other node serves; a blob
/// no signature vouched for, none fetches.
#[tokio::test]
async fn what_a_signature_vouched_for_through_one_node_every_node_serves() {
    let upstream = Server::start(BIN, &[]).unwrap();
    let up = Api::new(&upstream);
    let (amd, arm, unsigned) = (Image::random(2, 5_000), Image::random(1, 5_000), Image::random(1, 5_000));
    up.push_image("vendor/app", "amd", &amd).await.unwrap();
    up.push_image("vendor/app", "arm", &arm).await.unwrap();
    up.push_image("vendor/other", "v1", &unsigned).await.unwrap();
    let index = up.push_index("vendor/app", "v1", &[(&amd, "amd64"), (&arm, "arm64")]).await.unwrap();
    let key = CosignKey::new("vendor");
    let signed_as = format!("{}/vendor/app", upstream.host());
    key.push_signature(&up, "vendor/app", &index, &signed_as, false).await;
    let keys = tessera_testkit::tempdir().unwrap();
    let routes = format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{}\"\n\n[[route]]\nprefix = \"mirror\"\nto = \"up\"\n\n\
         [[signatures]]\nupstream = \"up\"\nkeys = [{:?}]\n",
        upstream.host(),
        key.write_public(keys.path(), "vendor")
    );
    let Some(cluster) = Cluster::start("vouch", &routes) else { return };

    let status = |r: reqwest::Response| r.status().as_u16();
    let index_answer = cluster.node(0).get("/v2/mirror/vendor/app/manifests/v1").await.unwrap();
    assert_eq!(status(index_answer), 200, "the signed index:\n{}", cluster.logs());
    // Each platform manifest is asked for, by digest, of a node that never saw the index;
    // its blobs of a node that saw neither.
    for (i, image) in [(1, &amd), (2, &arm)] {
        let r = cluster.node(i).get(&format!("/v2/mirror/vendor/app/manifests/{}", image.digest())).await.unwrap();
        assert_eq!(r.status(), 200, "node {i} serves a manifest of the signed index:\n{}", cluster.logs());
        assert_eq!(r.bytes().await.unwrap(), image.manifest);
        let other = cluster.node((i + 1) % NODES);
        for blob in image.blobs() {
            let r = other.get(&format!("/v2/mirror/vendor/app/blobs/{}", Digest::sha256_of(blob))).await.unwrap();
            assert_eq!(r.status(), 200, "a blob of a vouched manifest:\n{}", cluster.logs());
            assert!(r.bytes().await.unwrap() == blob[..], "served whole");
        }
    }

    // Nothing vouched for the other image: refused by every node, its blob never fetched.
    let layer = Digest::sha256_of(&unsigned.layers[0]);
    for i in 0..NODES {
        let node = cluster.node(i);
        assert_eq!(status(node.get("/v2/mirror/vendor/other/manifests/v1").await.unwrap()), 403);
        assert_eq!(status(node.get(&format!("/v2/mirror/vendor/other/blobs/{layer}")).await.unwrap()), 403);
    }
    assert!(!upstream.log_text().contains(&format!("/v2/vendor/other/blobs/{layer}")), "never fetched");
}
