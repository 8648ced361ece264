//! Collage's configuration, read as-is: `{"mappings": {"mount": "host/path", ...},
//! "vhosts": {"host": {"mappings": {...}}}}`. A source without a scheme is `https://`;
//! `http://` marks an insecure upstream. A mapping for `/` mounts one source at the root and
//! overrides the others of its block, as in Collage.
//!
//! Each distinct registry becomes an `[[upstream]]`, each mapping a `[[route]]` (vhost
//! blocks first, longest mount first), in redirect mode as Collage does, or through the
//! pull-through cache. Names no mapping covers are not found: Collage is read-only.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::{Fallback, Mode, Route, RouteMember, Target, Upstream, UpstreamCache};

#[derive(Deserialize)]
struct CollageFile {
    #[serde(default)]
    mappings: BTreeMap<String, String>,
    #[serde(default)]
    vhosts: BTreeMap<String, VHost>,
}

#[derive(Deserialize)]
struct VHost {
    #[serde(default)]
    mappings: BTreeMap<String, String>,
}

/// The registry base URL and the path under it of a Collage source.
fn split_source(source: &str) -> Result<(String, String), String> {
    let (scheme, rest) = match source.split_once("://") {
        Some(("http", rest)) => ("http", rest),
        Some(("https", rest)) => ("https", rest),
        Some((other, _)) => return Err(format!("source {source:?}: unsupported scheme {other:?}")),
        None => ("https", source),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(format!("source {source:?} names no registry"));
    }
    // Docker Hub's registry API lives at registry-1.docker.io, whatever the image names say.
    let host = if host == "docker.io" { "registry-1.docker.io" } else { host };
    Ok((format!("{scheme}://{host}"), path.trim_matches('/').to_string()))
}

/// An upstream name for a base URL: the host, with characters routes cannot carry replaced.
fn upstream_name(base: &str) -> String {
    let host = base.split_once("://").map_or(base, |(_, h)| h);
    host.replace(':', "_")
}

/// Translates a Collage configuration into upstreams, routes and the fallback.
pub fn from_collage(json: &str, mode: Mode) -> Result<(Vec<Upstream>, Vec<Route>, Fallback), String> {
    let file: CollageFile = serde_json::from_str(json).map_err(|e| format!("not a Collage configuration: {e}"))?;
    let mut upstreams: HashMap<String, Upstream> = HashMap::new();
    let mut routes = Vec::new();
    let blocks =
        file.vhosts.iter().map(|(h, v)| (Some(h.clone()), &v.mappings)).chain(std::iter::once((None, &file.mappings)));
    for (host, mappings) in blocks {
        let mut mounts: Vec<(&String, &String)> = match mappings.get_key_value("/") {
            Some(root) => vec![root],
            None => mappings.iter().collect(),
        };
        // Longest mount first, so nested mounts win over their parents.
        mounts.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        for (mount, source) in mounts {
            let (base, path) = split_source(source)?;
            let name = upstream_name(&base);
            let docker_hub = base.ends_with("docker.io");
            upstreams.entry(name.clone()).or_insert_with(|| Upstream {
                name: name.clone(),
                url: base.clone(),
                authority: Vec::new(),
                username: None,
                password: None,
                ca_file: None,
                library_rule: Some(docker_hub),
                timeout_secs: 30,
                cache: UpstreamCache::default(),
                lookaside: None,
            });
            let mount = mount.trim_matches('/');
            let path = path.trim_matches('/');
            let to = RouteMember::Named { source: name, path: (!path.is_empty()).then(|| path.to_string()) };
            routes.push(Route {
                host: host.clone(),
                authority: None,
                prefix: (!mount.is_empty()).then(|| mount.to_string()),
                to: Target(vec![to]),
                mode,
                push: Some(false),
                credentials: Default::default(),
            });
        }
    }
    let mut upstreams: Vec<Upstream> = upstreams.into_values().collect();
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((upstreams, routes, Fallback::None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collage_example_translates() {
        let (upstreams, routes, fallback) = from_collage(
            r#"{
              "mappings": {
                "cool/stuff": "index.docker.io/flavio",
                "cool/distro": "index.docker.io/opensuse",
                "etcd": "quay.io/coreos/etcd",
                "local": "http://127.0.0.1:5001/team"
              },
              "vhosts": { "suse.example": { "mappings": { "/": "registry.suse.com/suse" } } }
            }"#,
            Mode::Redirect,
        )
        .unwrap();
        let urls: Vec<&str> = upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(
            urls,
            ["http://127.0.0.1:5001", "https://index.docker.io", "https://quay.io", "https://registry.suse.com"]
        );
        assert_eq!(upstreams[0].name, "127.0.0.1_5001");
        assert_eq!(upstreams[1].library_rule, Some(true), "Docker Hub's library/ rule");
        assert_eq!(routes[0].host.as_deref(), Some("suse.example"));
        assert_eq!(routes[0].prefix, None);
        let suse = RouteMember::Named { source: "registry.suse.com".into(), path: Some("suse".into()) };
        assert_eq!(routes[0].to, Target(vec![suse]));
        let prefixes: Vec<_> = routes[1..].iter().map(|r| r.prefix.clone().unwrap()).collect();
        assert_eq!(prefixes, ["cool/distro", "cool/stuff", "local", "etcd"]);
        assert!(routes.iter().all(|r| r.mode == Mode::Redirect && r.push == Some(false)));
        assert_eq!(fallback, Fallback::None);
        assert!(from_collage("{\"mappings\": {\"x\": \"ftp://a/b\"}}", Mode::Cache).is_err());
        assert!(from_collage("[1]", Mode::Cache).is_err());
    }
}
