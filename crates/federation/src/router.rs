//! The routing table: `(vhost, authority, name)` -> the sources that answer, each with the
//! name it knows the repository by. First match wins; a request no route matches goes to
//! hosted.

use std::sync::Arc;

use tessera_config::{Config, Fallback, Mode, RouteMember};
use tessera_spec::{ErrorCode, OciError, RepoName};

use crate::FederationError;
use crate::source::{Source, SourceSet};
use crate::statics::StaticSource;
use crate::upstream::Upstream;

/// A matched route: the sources to ask, in order, each with its name for this request.
pub struct Resolved {
    pub sources: Vec<(Arc<dyn Source>, RepoName)>,
    /// Where a push goes: the hosted name, when the route takes pushes.
    pub write_to: Option<RepoName>,
    pub matched: Matched,
    /// The client's credentials go to the upstream (and Tessera's own login does not apply).
    pub passthrough: bool,
}

/// Content from a source, or the URL the client is sent to for it.
pub enum Reply<T> {
    Here(T),
    Redirect(String),
}

impl Resolved {
    /// Asks each source in turn (`ask(source, its name for the repository)`) until one has
    /// the content or says where it is; a failure ends the search. When none has it, the
    /// last source's not-found is the answer.
    pub async fn first<'r, T, Fut>(
        &'r self,
        ask: impl Fn(&'r dyn Source, &'r RepoName) -> Fut,
    ) -> Result<Reply<T>, OciError>
    where
        Fut: Future<Output = crate::Answer<T>>,
    {
        Ok(self.first_answering(ask).await?.0)
    }

    /// Like [`Resolved::first`], with the position of the source that answered.
    pub async fn first_answering<'r, T, Fut>(
        &'r self,
        ask: impl Fn(&'r dyn Source, &'r RepoName) -> Fut,
    ) -> Result<(Reply<T>, usize), OciError>
    where
        Fut: Future<Output = crate::Answer<T>>,
    {
        let mut last = None;
        for (i, (source, name)) in self.sources.iter().enumerate() {
            match ask(source.as_ref(), name).await? {
                crate::Found::Here(v) => return Ok((Reply::Here(v), i)),
                crate::Found::Redirect(url) => return Ok((Reply::Redirect(url), i)),
                crate::Found::Absent(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")))
    }

    /// This route narrowed to its source at `position` (the one that answered).
    pub fn only(&self, position: usize) -> Resolved {
        Resolved {
            sources: self.sources.get(position).cloned().into_iter().collect(),
            write_to: None,
            matched: self.matched,
            passthrough: self.passthrough,
        }
    }
}

/// Which rule of the table answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Matched {
    /// A `[[route]]`, 1-based as in the configuration.
    Route(usize),
    /// A static source that has the repository.
    Static,
    /// The upstream declaring the request's `?ns=` authority.
    Authority,
    /// No rule: the fallback (hosted).
    Fallback,
}

/// How a member of a route names the repository.
#[derive(Clone)]
enum Rename {
    /// The client's name (hosted).
    Same,
    /// What is left after the route's prefix (a static source).
    Rest,
    /// The rest under the upstream's `path`, with Docker Hub's `library/` rule.
    Upstream { path: Option<String>, library_rule: bool },
}

#[derive(Clone)]
struct Mount {
    source: Arc<dyn Source>,
    rename: Rename,
}

struct CompiledRoute {
    host: Option<String>,
    authority: Option<String>,
    prefix: Option<String>,
    members: Vec<Mount>,
    /// Pushes go to the first member, which is hosted.
    push: bool,
    passthrough: bool,
}

/// One route, as the pages show it.
pub struct RouteInfo {
    /// Its place in the configuration, from 1.
    pub number: usize,
    pub host: Option<String>,
    pub authority: Option<String>,
    pub prefix: Option<String>,
    pub members: Vec<Arc<dyn Source>>,
    pub push: bool,
    pub passthrough: bool,
}

pub struct RoutingTable {
    routes: Vec<CompiledRoute>,
    hosted: Arc<dyn Source>,
    upstreams: Vec<(Arc<Upstream>, Arc<dyn Source>)>,
    statics: Vec<(Arc<StaticSource>, Arc<dyn Source>)>,
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
    /// Builds the table from the configuration (already validated) and its sources.
    pub fn new(config: &Config, sources: &SourceSet) -> Result<RoutingTable, FederationError> {
        let mut routes = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            let mut members = Vec::new();
            for member in &r.to.0 {
                let (source, path) = match member {
                    RouteMember::Hosted => {
                        members.push(Mount { source: sources.hosted.clone(), rename: Rename::Same });
                        continue;
                    }
                    RouteMember::Named { source, path } => (source, path),
                };
                if let Some((_, s)) = sources.statics.iter().find(|(s, _)| s.name() == source) {
                    members.push(Mount { source: s.clone(), rename: Rename::Rest });
                    continue;
                }
                let u = sources
                    .upstreams
                    .iter()
                    .find(|u| u.upstream.name() == source)
                    .ok_or_else(|| FederationError::UnknownTarget { route: i + 1, target: source.clone() })?;
                let source = if r.mode == Mode::Redirect { u.redirect.clone() } else { u.cached.clone() };
                let rename = Rename::Upstream { path: path.clone(), library_rule: u.upstream.library_rule() };
                members.push(Mount { source, rename });
            }
            let hosted_only = matches!(r.to.0.as_slice(), [RouteMember::Hosted]);
            let push = r.push.unwrap_or(hosted_only) && r.to.0.first() == Some(&RouteMember::Hosted);
            routes.push(CompiledRoute {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                authority: r.authority.clone(),
                prefix: r.prefix.as_ref().map(|p| p.trim_matches('/').to_string()),
                members,
                push,
                passthrough: r.credentials == tessera_config::Credentials::Passthrough,
            });
        }
        Ok(RoutingTable {
            routes,
            hosted: sources.hosted.clone(),
            upstreams: sources.upstreams.iter().map(|u| (u.upstream.clone(), u.cached.clone())).collect(),
            statics: sources.statics.clone(),
            fallback: config.fallback,
        })
    }

    /// The static sources of this table.
    pub fn statics(&self) -> impl Iterator<Item = &Arc<StaticSource>> {
        self.statics.iter().map(|(s, _)| s)
    }

    /// The routes, in order (for the pages).
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.routes
            .iter()
            .enumerate()
            .map(|(i, r)| RouteInfo {
                number: i + 1,
                host: r.host.clone(),
                authority: r.authority.clone(),
                prefix: r.prefix.clone(),
                members: r.members.iter().map(|m| m.source.clone()).collect(),
                push: r.push,
                passthrough: r.passthrough,
            })
            .collect()
    }

    /// Where names no route or static source takes go.
    pub fn fallback(&self) -> Fallback {
        self.fallback
    }

    /// The upstreams that answer containerd's `?ns=` for their authorities, with the
    /// source that does.
    pub fn authorities(&self) -> impl Iterator<Item = (&Arc<Upstream>, &Arc<dyn Source>)> {
        self.upstreams.iter().filter(|(u, _)| !u.config().authority.is_empty()).map(|(u, s)| (u, s))
    }

    /// The name a client pulls to reach `name` of `upstream` through the first route (with
    /// no host or `ns` condition) that mounts its cache, if one does.
    pub fn client_name(&self, upstream: &str, name: &RepoName) -> Option<RepoName> {
        self.routes.iter().filter(|r| r.host.is_none() && r.authority.is_none()).find_map(|r| {
            r.members.iter().find_map(|m| {
                let Rename::Upstream { path, library_rule } = &m.rename else { return None };
                if m.source.upstream() != Some(upstream) || !m.source.caches() {
                    return None;
                }
                let rest = match path {
                    Some(p) => strip_prefix(name.as_str(), p)?,
                    None if *library_rule => name.as_str().strip_prefix("library/").unwrap_or(name.as_str()),
                    None => name.as_str(),
                };
                let joined = match (r.prefix.as_deref(), rest) {
                    (Some(p), "") => p.to_string(),
                    (Some(p), rest) => format!("{p}/{rest}"),
                    (None, rest) => rest.to_string(),
                };
                joined.parse().ok()
            })
        })
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
            let sources = r
                .members
                .iter()
                .map(|m| Ok((m.source.clone(), rename(&m.rename, name, rest)?)))
                .collect::<Result<Vec<_>, OciError>>()?;
            return Ok(Resolved {
                sources,
                write_to: r.push.then(|| name.clone()),
                matched: Matched::Route(i + 1),
                passthrough: r.passthrough,
            });
        }
        let only = |source: &Arc<dyn Source>, name: RepoName, matched| Resolved {
            sources: vec![(source.clone(), name)],
            write_to: None,
            matched,
            passthrough: false,
        };
        // A static source that has the repository answers for it.
        if let Some((_, source)) = self.statics.iter().find(|(s, _)| s.serves(name)) {
            return Ok(only(source, name.clone(), Matched::Static));
        }
        // An upstream that declares this authority answers for it.
        if let Some(a) = authority
            && let Some((u, source)) = self.upstreams.iter().find(|(u, _)| u.answers_for(a))
        {
            let renamed =
                rename(&Rename::Upstream { path: None, library_rule: u.library_rule() }, name, name.as_str())?;
            return Ok(only(source, renamed, Matched::Authority));
        }
        match self.fallback {
            Fallback::Hosted => {
                Ok(Resolved { write_to: Some(name.clone()), ..only(&self.hosted, name.clone(), Matched::Fallback) })
            }
            Fallback::None => Err(OciError::new(ErrorCode::NameUnknown, "no route serves this repository name")),
        }
    }
}

/// The name a member knows the repository by: hosted keeps the client's name (`full`); an
/// upstream gets the remainder after the route's prefix (`rest`), under its path, with
/// Docker Hub's `library/` rule applied; a static source gets the remainder.
fn rename(how: &Rename, full: &RepoName, rest: &str) -> Result<RepoName, OciError> {
    let unknown = || OciError::new(ErrorCode::NameUnknown, "repository name not known to registry");
    match how {
        Rename::Same => Ok(full.clone()),
        Rename::Upstream { path, library_rule } => {
            let joined = match (path.as_deref(), rest) {
                (Some(p), "") => p.to_string(),
                (Some(p), r) => format!("{p}/{r}"),
                (None, "") => return Err(unknown()),
                (None, r) => r.to_string(),
            };
            let joined = if *library_rule && !joined.contains('/') { format!("library/{joined}") } else { joined };
            joined.parse().map_err(|_| unknown())
        }
        Rename::Rest if rest.is_empty() => Err(unknown()),
        Rename::Rest => rest.parse().map_err(|_| unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::{Answer, Ask, Found, Served, UpstreamSources};
    use tessera_registry::{BlobAnswer, Referrers};
    use tessera_spec::{Accept, Descriptor, Digest, Paging, RangeRequest, Reference};
    use tessera_store::Page;

    /// A source that only says which it is: routing never asks a source anything.
    struct Named(String);

    fn absent<T>() -> Answer<T> {
        Ok(Found::Absent(OciError::new(ErrorCode::NameUnknown, "test source")))
    }

    #[async_trait::async_trait]
    impl Source for Named {
        fn label(&self) -> String {
            self.0.clone()
        }
        fn kind(&self) -> crate::SourceKind {
            crate::SourceKind::Hosted
        }
        fn describe(&self, _: &RepoName, _: &Reference) -> String {
            self.0.clone()
        }
        async fn manifest(&self, _: &RepoName, _: &Reference, _: &Accept, _: &Ask) -> Answer<Served> {
            absent()
        }
        async fn blob_size(&self, _: &RepoName, _: &Digest, _: &Ask) -> Answer<u64> {
            absent()
        }
        async fn blob(&self, _: &RepoName, _: &Digest, _: Option<&RangeRequest>, _: &Ask) -> Answer<BlobAnswer> {
            absent()
        }
        async fn tags(&self, _: &RepoName, _: &Paging, _: &Ask) -> Answer<Page> {
            absent()
        }
        async fn referrers(&self, _: &RepoName, _: &Digest, _: Option<&str>, _: &Ask) -> Answer<Referrers> {
            absent()
        }
        async fn locate(&self, _: &RepoName, _: &Descriptor) -> crate::Located {
            crate::Located::new(crate::Via::ThisServer, self.0.clone())
        }
    }

    fn named(label: &str) -> Arc<dyn Source> {
        Arc::new(Named(label.to_string()))
    }

    /// The table of `toml`; an upstream's cached face is labelled with its name, its
    /// redirect face with `(307)` after it.
    fn table(toml: &str) -> RoutingTable {
        let config = Config::from_toml(toml).unwrap();
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| UpstreamSources {
                upstream: Arc::new(Upstream::new(u).unwrap()),
                cached: named(&u.name),
                redirect: named(&format!("{}(307)", u.name)),
            })
            .collect();
        RoutingTable::new(&config, &SourceSet { hosted: named("hosted"), upstreams, statics: Vec::new() }).unwrap()
    }

    fn names(r: &Resolved) -> Vec<String> {
        r.sources.iter().map(|(s, n)| format!("{}:{n}", s.label())).collect()
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
        assert_eq!(names(&r), ["dockerhub(307):flavio/x"]);
        assert_eq!((r.write_to.is_some(), r.matched), (false, Matched::Route(1)));
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
        assert!(g.write_to.is_none(), "a group pushes only when told to");
    }

    #[test]
    fn no_routes_means_hosted() {
        let t = table("");
        let r = t.resolve(None, Some("docker.io"), &n("a/b")).unwrap();
        assert_eq!(names(&r), ["hosted:a/b"]);
        assert_eq!(r.write_to, Some(n("a/b")));
    }
}
