//! `[[route]]` and `fallback`: the routing table.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    #[default]
    Hosted,
    /// Only routed names exist (a read-only front such as a Collage configuration).
    None,
}

/// A route's target: `"hosted"`, `"upstream"`, `"upstream:path/prefix"`, a static source's
/// name, or a list of those (a group, tried in order). Parsed once, here.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "TargetText")]
pub struct Target(pub Vec<RouteMember>);

/// One member of a route's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMember {
    Hosted,
    /// An upstream (optionally under a path of its names) or a static source, by name.
    Named {
        source: String,
        path: Option<String>,
    },
}

impl RouteMember {
    /// The upstream or static source this member names.
    pub fn source(&self) -> Option<&str> {
        match self {
            RouteMember::Hosted => None,
            RouteMember::Named { source, .. } => Some(source),
        }
    }
}

impl std::str::FromStr for RouteMember {
    type Err = String;

    fn from_str(text: &str) -> Result<RouteMember, String> {
        if text == "hosted" {
            return Ok(RouteMember::Hosted);
        }
        let (source, path) = match text.split_once(':') {
            Some((source, path)) => (source, Some(path.trim_matches('/').to_string()).filter(|p| !p.is_empty())),
            None => (text, None),
        };
        if source.is_empty() {
            return Err(format!("route target {text:?} names no upstream or static source"));
        }
        Ok(RouteMember::Named { source: source.to_string(), path })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TargetText {
    One(String),
    Group(Vec<String>),
}

impl TryFrom<TargetText> for Target {
    type Error = String;

    fn try_from(text: TargetText) -> Result<Target, String> {
        let members = match text {
            TargetText::One(t) => vec![t],
            TargetText::Group(g) if g.is_empty() => return Err("a route's group is empty".into()),
            TargetText::Group(g) => g,
        };
        members.iter().map(|m| m.parse()).collect::<Result<_, _>>().map(Target)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pull through: fetch, verify, keep, and serve from the cache afterwards.
    #[default]
    Cache,
    /// Redirect only: answer with a 307 to the upstream; no bytes pass through here.
    Redirect,
}

/// One row of the routing table. Every given matcher must match; none given matches all.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Virtual host: the request's `Host` (without port), case-insensitive.
    pub host: Option<String>,
    /// The `ns` query parameter containerd sends as a mirror (e.g. `docker.io`).
    pub authority: Option<String>,
    /// Repository-name prefix, matched by whole components; it is removed from the name
    /// before the target's path is prepended (`cool/stuff/x` -> `flavio/x`).
    pub prefix: Option<String>,
    pub to: Target,
    #[serde(default)]
    pub mode: Mode,
    /// Allow pushes (only to `hosted`). Default: true for a hosted target, else false.
    pub push: Option<bool>,
    /// Whose credentials the upstream sees: the upstream's configured ones (the default),
    /// or, with `"passthrough"`, the client's own `Authorization`, with the upstream's
    /// challenges relayed to the client. Tessera's own login does not apply to such a route
    /// (the upstream decides), and every answer, cached or not, is authorised by the
    /// upstream for that client first.
    #[serde(default)]
    pub credentials: Credentials,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Credentials {
    #[default]
    Configured,
    Passthrough,
}
