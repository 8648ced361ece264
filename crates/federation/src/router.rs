//! The routing table: `(vhost, authority, name)` -> where the request is answered and under
//! which name there. First match wins; a request no route matches goes to hosted.

use std::sync::Arc;

use tessera_config::{Config, Fallback, Mode, Target};
use tessera_spec::{ErrorCode, OciError, RepoName};

use crate::statics::StaticSource;
use crate::upstream::Upstream;

/// One place a request can be answered.
#[derive(Clone)]
pub enum Member {
    Hosted,
    Upstream {
        upstream: Arc<Upstream>,
        path: Option<String>,
    },
    /// A read-only repository published elsewhere (`[[static]]`).
    Static(Arc<StaticSource>),
}

/// A matched route, with the name each member sees.
pub struct Resolved {
    /// Members in the order they are tried, each with its name for this request.
    pub members: Vec<(Member, RepoName)>,
    pub mode: Mode,
    pub push: bool,
    /// Which route matched (1-based, as in the configuration), or `None` for the fallback.
    pub route: Option<usize>,
    /// The client's credentials go to the upstream (and Tessera's own login does not apply).
    pub passthrough: bool,
}

struct CompiledRoute {
    host: Option<String>,
    authority: Option<String>,
    prefix: Option<String>,
    members: Vec<Member>,
    mode: Mode,
    push: bool,
    passthrough: bool,
}

pub struct RoutingTable {
    routes: Vec<CompiledRoute>,
    upstreams: Vec<Arc<Upstream>>,
    statics: Vec<Arc<StaticSource>>,
    fallback: Fallback,
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

/// `name` with `prefix` removed at a component boundary; `None` if it does not start so.
fn strip_prefix<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        return Some(name);
    }
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() { Some("") } else { rest.strip_prefix('/') }
}

impl RoutingTable {
    /// Builds the table from the configuration (already validated) and its upstream clients.
    pub fn new(
        config: &Config,
        upstreams: Vec<Arc<Upstream>>,
        statics: Vec<Arc<StaticSource>>,
    ) -> Result<RoutingTable, String> {
        let find = |name: &str| upstreams.iter().find(|u| u.name() == name).cloned();
        let mut routes = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            let targets: Vec<&str> = match &r.to {
                Target::One(t) => vec![t.as_str()],
                Target::Group(g) => g.iter().map(String::as_str).collect(),
            };
            let mut members = Vec::new();
            for t in targets {
                if t == "hosted" {
                    members.push(Member::Hosted);
                    continue;
                }
                if let Some(s) = statics.iter().find(|s| s.name() == t) {
                    members.push(Member::Static(s.clone()));
                    continue;
                }
                let (name, path) = match t.split_once(':') {
                    Some((n, p)) => (n, Some(p.trim_matches('/').to_string()).filter(|p| !p.is_empty())),
                    None => (t, None),
                };
                let upstream = find(name).ok_or_else(|| format!("route {}: no upstream {name:?}", i + 1))?;
                members.push(Member::Upstream { upstream, path });
            }
            let push = r.push.unwrap_or(matches!(members.as_slice(), [Member::Hosted]));
            routes.push(CompiledRoute {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                authority: r.authority.clone(),
                prefix: r.prefix.as_ref().map(|p| p.trim_matches('/').to_string()),
                members,
                mode: r.mode,
                push,
                passthrough: r.credentials == tessera_config::Credentials::Passthrough,
            });
        }
        Ok(RoutingTable { routes, upstreams, statics, fallback: config.fallback })
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn statics(&self) -> &[Arc<StaticSource>] {
        &self.statics
    }

    /// Finds the route for a request. `host` is the `Host` header, `authority` the `ns`
    /// parameter. Names that a prefix route would leave empty are `NAME_UNKNOWN`.
    pub fn resolve(&self, host: Option<&str>, authority: Option<&str>, name: &RepoName) -> Result<Resolved, OciError> {
        let host = host.map(|h| strip_port(h).to_ascii_lowercase());
        for (i, r) in self.routes.iter().enumerate() {
            if r.host.as_ref().is_some_and(|h| Some(h) != host.as_ref()) {
                continue;
            }
            if r.authority.as_ref().is_some_and(|a| Some(a.as_str()) != authority) {
                continue;
            }
            let rest = match &r.prefix {
                Some(p) => match strip_prefix(name.as_str(), p) {
                    Some(rest) => rest,
                    None => continue,
                },
                None => name.as_str(),
            };
            let members = r
                .members
                .iter()
                .map(|m| Ok((m.clone(), member_name(m, name, rest)?)))
                .collect::<Result<Vec<_>, OciError>>()?;
            return Ok(Resolved {
                members,
                mode: r.mode,
                push: r.push,
                route: Some(i + 1),
                passthrough: r.passthrough,
            });
        }
        // A static source that has the repository answers for it.
        if let Some(s) = self.statics.iter().find(|s| s.serves(name)) {
            return Ok(Resolved {
                members: vec![(Member::Static(s.clone()), name.clone())],
                mode: Mode::Cache,
                push: false,
                route: None,
                passthrough: false,
            });
        }
        // An upstream that declares this authority answers for it.
        if let Some(a) = authority
            && let Some(u) = self.upstreams.iter().find(|u| u.answers_for(a))
        {
            let member = Member::Upstream { upstream: u.clone(), path: None };
            let n = member_name(&member, name, name.as_str())?;
            return Ok(Resolved {
                members: vec![(member, n)],
                mode: Mode::Cache,
                push: false,
                route: None,
                passthrough: false,
            });
        }
        match self.fallback {
            Fallback::Hosted => Ok(Resolved {
                members: vec![(Member::Hosted, name.clone())],
                mode: Mode::Cache,
                push: true,
                route: None,
                passthrough: false,
            }),
            Fallback::None => Err(OciError::new(ErrorCode::NameUnknown, "no route serves this repository name")),
        }
    }
}

/// The name `member` knows the repository by: hosted keeps the client's name; an upstream
/// gets the remainder after the route's prefix, under its path, with Docker Hub's
/// `library/` rule applied.
fn member_name(member: &Member, full: &RepoName, rest: &str) -> Result<RepoName, OciError> {
    let unknown = || OciError::new(ErrorCode::NameUnknown, "repository name not known to registry");
    match member {
        Member::Hosted => Ok(full.clone()),
        Member::Upstream { upstream, path } => {
            let joined = match (path.as_deref(), rest) {
                (Some(p), "") => p.to_string(),
                (Some(p), r) => format!("{p}/{r}"),
                (None, "") => return Err(unknown()),
                (None, r) => r.to_string(),
            };
            let joined =
                if upstream.library_rule() && !joined.contains('/') { format!("library/{joined}") } else { joined };
            joined.parse().map_err(|_| unknown())
        }
        Member::Static(_) if rest.is_empty() => Err(unknown()),
        Member::Static(_) => rest.parse().map_err(|_| unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml: &str) -> RoutingTable {
        let config = Config::from_toml(toml).unwrap();
        let upstreams = config.upstreams.iter().map(|u| Arc::new(Upstream::new(u).unwrap())).collect();
        RoutingTable::new(&config, upstreams, Vec::new()).unwrap()
    }

    fn names(r: &Resolved) -> Vec<String> {
        r.members
            .iter()
            .map(|(m, n)| match m {
                Member::Hosted => format!("hosted:{n}"),
                Member::Upstream { upstream, .. } => format!("{}:{n}", upstream.name()),
                Member::Static(s) => format!("static {}:{n}", s.name()),
            })
            .collect()
    }

    fn n(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    const CONFIG: &str = r#"
[[upstream]]
name = "dockerhub"
url = "https://registry-1.docker.io"
authority = ["docker.io"]
[[upstream]]
name = "quay"
url = "https://quay.io"
authority = ["quay.io"]
[[upstream]]
name = "local"
url = "http://127.0.0.1:5001"

[[route]]
prefix = "cool/stuff"
to = "dockerhub:flavio"
mode = "redirect"
[[route]]
host = "quay.mirror.example"
to = "quay"
[[route]]
prefix = "mirror/dh"
to = "dockerhub"
[[route]]
prefix = "all"
to = ["hosted", "local", "quay:team"]
"#;

    #[test]
    fn prefixes_rewrite_names() {
        let t = table(CONFIG);
        let r = t.resolve(None, None, &n("cool/stuff/x")).unwrap();
        assert_eq!(names(&r), ["dockerhub:flavio/x"]);
        assert_eq!((r.mode, r.push, r.route), (Mode::Redirect, false, Some(1)));
        assert_eq!(names(&t.resolve(None, None, &n("mirror/dh/alpine")).unwrap()), ["dockerhub:library/alpine"]);
        assert_eq!(names(&t.resolve(None, None, &n("mirror/dh/bitnami/redis")).unwrap()), ["dockerhub:bitnami/redis"]);
        // Whole components only: "cool/stuffed" is not under "cool/stuff".
        assert_eq!(names(&t.resolve(None, None, &n("cool/stuffed")).unwrap()), ["hosted:cool/stuffed"]);
        assert_eq!(t.resolve(None, None, &n("mirror/dh")).err().map(|e| e.code), Some(ErrorCode::NameUnknown));
    }

    #[test]
    fn vhosts_authorities_and_groups() {
        let t = table(CONFIG);
        assert_eq!(names(&t.resolve(Some("Quay.Mirror.Example:5000"), None, &n("org/app")).unwrap()), ["quay:org/app"]);
        assert_eq!(names(&t.resolve(Some("other:5000"), None, &n("org/app")).unwrap()), ["hosted:org/app"]);
        // containerd's ns: an upstream declaring the authority answers, Docker Hub's rule applies.
        assert_eq!(names(&t.resolve(None, Some("docker.io"), &n("alpine")).unwrap()), ["dockerhub:library/alpine"]);
        assert_eq!(names(&t.resolve(None, Some("quay.io"), &n("y/z")).unwrap()), ["quay:y/z"]);
        assert_eq!(names(&t.resolve(None, Some("ghcr.io"), &n("y/z")).unwrap()), ["hosted:y/z"]);
        let g = t.resolve(None, None, &n("all/app")).unwrap();
        assert_eq!(names(&g), ["hosted:all/app", "local:app", "quay:team/app"]);
        assert!(!g.push, "a group pushes only when told to");
    }

    #[test]
    fn no_routes_means_hosted() {
        let t = table("");
        let r = t.resolve(None, Some("docker.io"), &n("a/b")).unwrap();
        assert_eq!(names(&r), ["hosted:a/b"]);
        assert!(r.push);
    }
}
