//! The listener: accepts TCP connections, speaks HTTPS (rustls) or plain HTTP/1.1 and h2c,
//! and shuts down gracefully.
//!
//! A plain-HTTP listener answers a TLS ClientHello at once with an HTTP 400 and closes:
//! skopeo and podman try HTTPS first, and a prompt HTTP answer is what lets them report
//! "server gave HTTP response to HTTPS client" and fall back, instead of hanging.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tower::ServiceExt;

use tessera_config::Network;

use crate::ClientAddr;
use crate::connections::{ConnectionLimits, Connections, Refused, Slot};

/// How long a client may take to send its request head (slow-loris guard).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const HTTP_TO_TLS_CLIENT: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nThis registry speaks plain HTTP; use http:// (or --tls-verify=false).\n";

pub struct ServerOptions {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest request head in bytes; larger ones get 431.
    pub header_max_bytes: usize,
    /// A connection whose client takes no bytes for this long is closed.
    pub send_idle: Duration,
    /// Peers whose `X-Forwarded-For` is believed (see [`client_address`]).
    pub trusted_proxies: Arc<[Network]>,
    /// How many connections may be open, in total and per client.
    pub connections: ConnectionLimits,
    /// How long requests in flight get to finish after the shutdown signal.
    pub drain: Duration,
}

/// The client a request is from: the socket's peer, or, when the peer is a trusted proxy,
/// the address it forwarded. `X-Forwarded-For` is read from the right (the entry the
/// nearest proxy appended) and trusted proxies are skipped; the first address that is not
/// one is the client (entries to its left are whatever the client chose to send). An entry
/// that is not an address stops the walk at the last trusted hop.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Entries are decoded one by one: bytes a client put in its own entry must not make the
    // proxies' entries after it unreadable.
    let forwarded: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        match forwarded_ip(entry) {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn forwarded_ip(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?;
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

/// The server certificate, replaceable while serving: new handshakes use the latest one.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl CertStore {
    /// Loads the PEM certificate chain and key.
    pub fn open(cert: &Path, key: &Path) -> io::Result<Arc<CertStore>> {
        let current = arc_swap::ArcSwap::from_pointee(certified_key(cert, key)?);
        Ok(Arc::new(CertStore { cert: cert.into(), key: key.into(), current }))
    }

    /// Reads the files again; on any error the certificate in use stays.
    pub fn reload(&self) -> io::Result<()> {
        self.current.store(Arc::new(certified_key(&self.cert, &self.key)?));
        Ok(())
    }

    /// A rustls server configuration (TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN) that
    /// presents this store's current certificate. With `client_ca`, client certificates
    /// signed by it are verified (and with `required`, demanded).
    pub fn server_config(
        self: &Arc<Self>,
        client_ca: Option<&Path>,
        required: bool,
    ) -> io::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(io::Error::other)?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(ca)
                    .map_err(|e| io::Error::other(format!("cannot read {}: {e}", ca.display())))?;
                for cert in certs {
                    roots
                        .add(cert.map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?)
                        .map_err(io::Error::other)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if required { verifier } else { verifier.allow_unauthenticated() };
                builder.with_client_cert_verifier(verifier.build().map_err(io::Error::other)?)
            }
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &Path, key: &Path) -> io::Result<rustls::sign::CertifiedKey> {
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        io::Error::other(format!("{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("cannot read certificate", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cannot parse certificate", cert, &e))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("cannot read private key", key, &e))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| bad("unusable private key", cert, &e))?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| io::Error::other(format!("certificate and key do not fit together: {e}")))?;
    Ok(certified)
}

/// Connections the kernel completes before the server accepts them: as many as the system
/// allows (Linux caps it at `net.core.somaxconn`), as Distribution does, so that a burst of
/// new clients waits in the queue instead of having its SYNs dropped (a 1 s retransmit each).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with a deep accept queue ([`LISTEN_BACKLOG`]).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(options.header_max_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(options.header_max_bytes.min(u32::MAX as usize) as u32)
        // Streams one connection may run at once: a client pulling many layers over one
        // connection is served in parallel, but cannot hold a task per stream by thousands.
        .max_concurrent_streams(H2_STREAMS)
        // Streams a client opens and resets before they are answered (the "rapid reset"
        // attack) end the connection past this many.
        .max_pending_accept_reset_streams(H2_PENDING_RESETS)
        // A peer that stops answering pings is gone; its connection is closed.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    let acceptor = options.tls.map(TlsAcceptor::from);
    let connections = Connections::new(options.connections);
    let mut refusals = RefusalLog::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer_ip = peer.ip().to_canonical();
        let trusted_peer = options.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
        let slot = match connections.admit((!trusted_peer).then_some(peer_ip)) {
            Ok(slot) => slot,
            Err(why) => {
                refusals.refused(peer_ip, why);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            app: app.clone(),
            trusted_proxies: options.trusted_proxies.clone(),
            peer,
            slot: Arc::new(slot),
        };
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let send_idle = options.send_idle;
        tokio::spawn(async move { connection.serve(stream, &builder, acceptor, send_idle).await });
    }
    drop(listener);
    connections.close_all();
    tokio::select! {
        () = connections.all_closed() => {}
        () = tokio::time::sleep(options.drain) => tracing::warn!("requests still running after {:?}; stopping anyway", options.drain),
    }
    Ok(())
}

const H2_STREAMS: u32 = 128;
const H2_PENDING_RESETS: usize = 32;
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);

/// Logs refused connections at most once a minute, with how many there were.
#[derive(Default)]
struct RefusalLog {
    since: Option<std::time::Instant>,
    count: u64,
}

impl RefusalLog {
    fn refused(&mut self, peer: IpAddr, why: Refused) {
        self.count += 1;
        if self.since.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            let limit = match why {
                Refused::Total => "all connections allowed are open and busy",
                Refused::PerClient => "all connections allowed to this client are open and busy",
            };
            tracing::warn!(%peer, "refused {} connection(s) in the last minute: {limit} ([limits] connections)", self.count);
            self.since = Some(std::time::Instant::now());
            self.count = 0;
        }
    }
}

type Timed = std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<TcpStream>>>;

/// A connection ready for HTTP.
enum Opened {
    Plain(TokioIo<Timed>),
    Tls(Box<TokioIo<tokio_rustls::server::TlsStream<Timed>>>, Option<ClientCertificate>),
}

/// Readies a connection for HTTP: answers a TLS client on a plain listener, bounds how long
/// the client may stop reading, and does the TLS handshake. `None`: nothing to serve.
async fn open(
    mut stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    send_idle: Duration,
) -> Option<Opened> {
    if acceptor.is_none() && answers_tls_probe(&mut stream, peer).await {
        return None;
    }
    // A client that stops reading cannot hold a connection (and its buffers) forever.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(send_idle));
    let stream = Box::pin(stream);
    let Some(acceptor) = acceptor else { return Some(Opened::Plain(TokioIo::new(stream))) };
    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let identity = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| subject_name(c));
            Some(Opened::Tls(Box::new(TokioIo::new(tls)), identity))
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    app: Router,
    trusted_proxies: Arc<[Network]>,
    peer: SocketAddr,
    slot: Arc<Slot>,
}

impl Connection {
    async fn serve(
        self,
        stream: TcpStream,
        builder: &auto::Builder<TokioExecutor>,
        acceptor: Option<TlsAcceptor>,
        send_idle: Duration,
    ) {
        let peer = self.peer;
        // Until it has said something, a connection asked to close is simply dropped.
        let opened = tokio::select! {
            opened = open(stream, peer, acceptor, send_idle) => opened,
            () = self.slot.closing() => return,
        };
        match opened {
            Some(Opened::Plain(io)) => self.drive(builder, io, None).await,
            Some(Opened::Tls(io, identity)) => self.drive(builder, *io, identity).await,
            None => {}
        }
    }

    /// Serves HTTP on `io` until the client leaves or the connection is asked to close;
    /// then the requests in flight finish first.
    async fn drive<I>(self, builder: &auto::Builder<TokioExecutor>, io: I, identity: Option<ClientCertificate>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Connection { app, trusted_proxies, peer, slot } = self;
        let requests = slot.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let client = client_address(peer.ip().to_canonical(), req.headers(), &trusted_proxies);
            req.extensions_mut().insert(ClientAddr(client));
            if let Some(id) = &identity {
                req.extensions_mut().insert(id.clone());
            }
            // The request counts as in flight until its response body is done.
            let in_flight = requests.request();
            let answer = app.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                        let _in_flight = &in_flight;
                        frame
                    }))
                }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            () = slot.closing() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, "connection ended: {e}");
        }
    }
}

/// The verified client certificate of a TLS connection, by its subject's common name.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCertificate(pub String);

/// The subject common name of a certificate rustls has verified against the client CA.
fn subject_name(der: &CertificateDer<'_>) -> Option<ClientCertificate> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(ClientCertificate(cn))
}

/// On a plain listener, answers a client that opens with a TLS handshake. Returns whether it did.
async fn answers_tls_probe(stream: &mut TcpStream, peer: SocketAddr) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {
            tracing::info!(%peer, "TLS client on the plain HTTP listener; answered with HTTP 400");
            let _ = stream.write_all(HTTP_TO_TLS_CLIENT).await;
            let _ = stream.shutdown().await;
            true
        }
        Ok(Ok(_)) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let trusted: Vec<Network> = vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let cases: &[(&str, &[&str], &str)] = &[
            // An untrusted peer says what it likes; it stays the client.
            ("192.0.2.7", &["198.51.100.1"], "192.0.2.7"),
            // One trusted proxy: the address it appended.
            ("10.0.0.2", &["198.51.100.1"], "198.51.100.1"),
            // Entries left of the first untrusted one are the client's own words.
            ("10.0.0.2", &["203.0.113.9, 198.51.100.1"], "198.51.100.1"),
            // A chain of trusted proxies is skipped; several headers read as one list.
            ("10.0.0.2", &["198.51.100.1, 10.0.0.3", "10.0.0.4"], "198.51.100.1"),
            // All trusted: the leftmost.
            ("10.0.0.2", &["10.0.0.5, 10.0.0.3"], "10.0.0.5"),
            // Garbage stops the walk at the last trusted hop.
            ("10.0.0.2", &["198.51.100.1, unknown"], "10.0.0.2"),
            ("10.0.0.2", &["198.51.100.1, <script>, 10.0.0.3"], "10.0.0.3"),
            // No header: the proxy itself.
            ("10.0.0.2", &[], "10.0.0.2"),
            // Ports and IPv6 forms.
            ("::1", &["[2001:db8::1]:4711"], "2001:db8::1"),
            ("::1", &["198.51.100.1:80"], "198.51.100.1"),
            ("::1", &["::ffff:198.51.100.1"], "198.51.100.1"),
        ];
        for (peer, values, want) in cases {
            assert_eq!(client_address(ip(peer), &headers(values), &trusted), ip(want), "{peer} {values:?}");
        }
        // Bytes that are not text in the client's own entry do not hide the proxy's entry.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.1").unwrap());
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.1"));
        assert_eq!(client_address(ip("10.0.0.2"), &headers(&["198.51.100.1"]), &[]), ip("10.0.0.2"), "none trusted");
    }
}
