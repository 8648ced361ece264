//! Per-client limits: request rate (429 with Retry-After), uploads in flight, stalled bodies,
//! open connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_testkit::{Api, Server, error_code, wait_until_async};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn with_limits(limits: &str) -> Server {
    Server::with_config(BIN, &format!("[limits]\n{limits}\n")).unwrap()
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let server = with_limits("requests_per_second_per_client = 5");
    let api = Api::new(&server);
    let mut limited = None;
    for _ in 0..30 {
        let r = api.get("/v2/").await.unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the rate limit answers 429");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    // The behaviour under test: a client that waits out the limit's second is let in again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200, "allowed again after waiting");
}

/// How many GETs of `/v2/` in a burst get through before a 429, sent as `forwarded_for`.
async fn admitted_in_a_burst(api: &Api, forwarded_for: &str) -> usize {
    for n in 0..30 {
        let r = api.http.get(api.url("/v2/")).header("x-forwarded-for", forwarded_for).send().await.unwrap();
        if r.status() == 429 {
            return n;
        }
    }
    30
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() {
    let behind =
        Server::with_config(BIN, "trusted_proxies = [\"127.0.0.0/8\"]\n[limits]\nrequests_per_second_per_client = 1\n")
            .unwrap();
    let api = Api::new(&behind);
    let first = admitted_in_a_burst(&api, "198.51.100.1").await;
    assert!(first < 30, "the first client is limited");
    // Another client behind the same proxy starts with its own allowance; a client cannot
    // escape its limit by prefixing addresses of its own.
    assert!(admitted_in_a_burst(&api, "198.51.100.2").await > 0, "a second client is not limited by the first");
    assert_eq!(admitted_in_a_burst(&api, "203.0.113.5, 198.51.100.1").await, 0, "still the first client");
    assert!(behind.log_text().contains("198.51.100.2 \"GET /v2/"), "the access log names the client");

    // Without trusted proxies the header is ignored: every request is the peer's.
    let direct = with_limits("requests_per_second_per_client = 1");
    let api = Api::new(&direct);
    assert!(admitted_in_a_burst(&api, "198.51.100.1").await < 30);
    assert_eq!(admitted_in_a_burst(&api, "198.51.100.2").await, 0, "a forged header changes nothing");
}

#[tokio::test]
async fn uploads_in_flight_per_client_are_bounded() {
    let server = with_limits("uploads_per_client = 2");
    let api = Api::new(&server);
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = api.http.post(api.url("/v2/u/blobs/uploads/")).send().await.unwrap();
        let location = r.headers()["location"].to_str().unwrap().to_string();
        // A PATCH whose body is still coming holds a slot. It asks before sending its body:
        // the server's `100 Continue` shows the request was admitted and holds its slot.
        let mut tcp = TcpStream::connect(server.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(
            format!("PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut interim = [0u8; 25];
        tcp.read_exact(&mut interim).unwrap();
        assert!(interim.starts_with(b"HTTP/1.1 100 Continue"), "{}", String::from_utf8_lossy(&interim));
        tcp.write_all(b"abc").unwrap();
        held.push(tcp);
    }
    let post = || async { api.http.post(api.url("/v2/u/blobs/uploads/")).send().await.unwrap() };
    let r = post().await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    drop(held);
    let back = wait_until_async(Duration::from_secs(10), || async { post().await.status() == 202 }).await;
    assert!(back, "slots come back when those requests end");
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200, "reads are not uploads");
}

#[tokio::test]
async fn a_stalled_body_is_abandoned_and_what_arrived_is_kept() {
    let server = with_limits("body_idle_timeout_secs = 1");
    let api = Api::new(&server);
    let r = api.http.post(api.url("/v2/s/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(format!("PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").as_bytes()).unwrap();
    tcp.write_all(&[7u8; 10]).unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 64];
    let n = tcp.read(&mut answer).unwrap_or(0);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    assert!(
        n == 0 || String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    let r = api.http.get(api.url(&location)).send().await.unwrap();
    assert_eq!(r.headers()["range"], "0-9", "the 10 bytes that arrived are kept for resuming");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected() {
    let server = with_limits("send_idle_timeout_secs = 1");
    let api = Api::new(&server);
    let blob = tessera_testkit::random_bytes(64 << 20, 7);
    let digest = api.push_blob("slow/reader", &blob).await.unwrap();
    let mut conn = TcpStream::connect(server.addr).unwrap();
    write!(conn, "GET /v2/slow/reader/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Read nothing while the socket buffers fill, then drain what was sent. The behaviour
    // under test: a reader stalled well past send_idle_timeout_secs.
    std::thread::sleep(Duration::from_secs(4));
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) => panic!("the server should have closed the connection, not left it open: {e}"),
        }
    }
    assert!(received < blob.len(), "the whole blob arrived ({received} bytes): no disconnect happened");
    // The server serves others as before.
    assert_eq!(api.get("/v2/").await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_request_that_takes_too_long_gets_503() {
    // An upstream that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for c in silent.incoming() {
            open.push(c);
        }
    });
    let server = Server::with_config(
        BIN,
        &format!(
            "[limits]\nrequest_timeout_secs = 1\n[[upstream]]\nname = \"silent\"\nurl = \"http://{addr}\"\n\
             timeout_secs = 60\n[[route]]\nprefix = \"up\"\nto = \"silent\"\n"
        ),
    )
    .unwrap();
    let api = Api::new(&server);
    let started = Instant::now();
    let r = api.get("/v2/up/x/manifests/v1").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "UNAVAILABLE");
}

/// Whether the server has closed `conn` (it reads end-of-file or a reset at once).
fn closed_by_server(mut conn: &TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 1];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[tokio::test]
async fn idle_connections_make_room_and_busy_ones_are_kept() {
    let server = with_limits("connections = 30\nconnections_per_client = 4");
    let api = Api::new(&server);
    let blob = tessera_testkit::random_bytes(32 << 20, 9);
    let digest = api.push_blob("many/conns", &blob).await.unwrap();
    // A download in flight that its client reads slowly: busy, never chosen to make room.
    let mut busy = TcpStream::connect(server.addr).unwrap();
    write!(busy, "GET /v2/many/conns/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    busy.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Idle connections from the same client, far more than its limit of four.
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    // (A fresh client: the pooled connection of the push above was the longest idle.)
    let fresh = Api::new(&server);
    assert_eq!(fresh.get("/v2/").await.unwrap().status(), 200, "a new request from the same client is served");
    // Closing is asked for at once; give the connections' tasks a moment to do it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closed = idle.iter().filter(|c| closed_by_server(c)).count();
    assert!(closed >= 36, "only {closed} of the 40 idle connections were closed to make room");
    // The busy download was kept, and finishes with every byte.
    busy.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while rest.len() < blob.len() {
        match busy.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the busy download was cut: {e}"),
        }
    }
    assert!(rest.ends_with(&blob[blob.len() - 1000..]), "the download was cut after {} bytes", rest.len());
    // Past the total, the longest-idle connection of anyone makes room.
    let mut others = Vec::new();
    for i in 2..12 {
        for _ in 0..4 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("127.0.0.{i}:0").parse().unwrap()).unwrap();
            others.push(socket.connect(server.addr).await.unwrap().into_std().unwrap());
        }
    }
    let from_elsewhere =
        Api { base: api.base.clone(), http: tessera_testkit::http_client_from("127.0.0.99".parse().unwrap()) };
    assert_eq!(from_elsewhere.get("/v2/").await.unwrap().status(), 200);
    for conn in &others {
        conn.set_nonblocking(false).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still_open = others.iter().filter(|c| !closed_by_server(c)).count();
    assert!(still_open <= 30, "{still_open} of {} connections open, over the total of 30", others.len());
    assert!(still_open >= 25, "only {still_open} left open: more were closed than the limit needs");
}
