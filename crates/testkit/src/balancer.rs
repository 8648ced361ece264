//! nginx as the load balancer in front of several Tessera nodes: round robin, no
//! stickiness, bodies streamed both ways (no buffering of uploads or downloads), and a
//! request that could not reach a node (refused, reset before an answer) passed to the
//! next, as a production balancer is set up.

use std::net::SocketAddr;
use std::process::Child;

use anyhow::Result;
use tempfile::TempDir;

use crate::cdn::{CdnRequest, free_addr, logged_requests, run_nginx, stop_nginx};

pub struct Balancer {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Balancer {
    /// nginx on 127.0.0.1 (a free port) spreading requests over `nodes`.
    pub fn start(nodes: &[SocketAddr]) -> Result<Balancer> {
        Balancer::start_with(nodes, true)
    }

    /// Like [`Balancer::start`], logging no request and with a worker per core (for
    /// benchmarks).
    pub fn start_quiet(nodes: &[SocketAddr]) -> Result<Balancer> {
        Balancer::start_with(nodes, false)
    }

    fn start_with(nodes: &[SocketAddr], log: bool) -> Result<Balancer> {
        let dir = tempfile::Builder::new().prefix("tlb").tempdir()?;
        let addr = free_addr("127.0.0.1")?;
        let quiet = if log { "" } else { "access_log off;\n    " };
        let servers: String = nodes.iter().map(|n| format!("    server {n} max_fails=1 fail_timeout=2s;\n")).collect();
        // Connections to the nodes are kept open, as a production balancer keeps them.
        let http = format!(
            "upstream tessera {{\n{servers}    keepalive 64;\n  }}\n  \
             server {{\n    listen {addr};\n    client_max_body_size 0;\n    \
             proxy_request_buffering off;\n    proxy_buffering off;\n    proxy_http_version 1.1;\n    \
             proxy_set_header Host $http_host;\n    proxy_set_header Connection \"\";\n    \
             proxy_read_timeout 300s;\n    proxy_send_timeout 300s;\n    \
             proxy_next_upstream error timeout;\n    {quiet}\
             location / {{ proxy_pass http://tessera; }}\n  }}\n"
        );
        let child = run_nginx(dir.path(), addr, if log { "1" } else { "auto" }, &http)?;
        Ok(Balancer { child: Some(child), addr, dir })
    }

    /// `host:port`, as clients write registry references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request answered so far, with the node that answered it.
    pub fn requests(&self) -> Vec<CdnRequest> {
        logged_requests(self.dir.path())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_nginx(&mut c);
        }
    }
}
