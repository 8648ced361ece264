//! The one place a request's path and query become a typed [`Endpoint`]. Handlers never
//! look at the raw path again.

use tessera_spec::{Digest, ErrorCode, OciError, Reference, RepoName};
use tessera_store::UploadId;

pub use tessera_spec::Paging;

/// Every endpoint of the OCI Distribution API (v1.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// `/v2/`
    Base,
    /// `/metrics` (Prometheus text format; not part of the distribution API)
    Metrics,
    /// `/tessera/v1/_quotas`: each quota with its use. Tessera's own API.
    Quotas,
    /// `/token`: the Docker token flow's token endpoint, with its `scope` values.
    Token { scopes: Vec<String> },
    /// `/.well-known/jwks.json`: the token signing key.
    Jwks,
    /// `/v2/_catalog`
    Catalog(Paging),
    /// `/v2/<name>/tags/list`
    Tags { name: RepoName, paging: Paging },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: RepoName, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`; `?delivery=stream` asks for the bytes instead of a
    /// redirect (honoured for callers who may push: publishing to a CDN reads this way).
    Blob { name: RepoName, digest: Digest, stream: bool },
    /// `/v2/<name>/blobs/uploads/` with its optional `digest`, `mount`, `from`.
    UploadStart { name: RepoName, digest: Option<Digest>, mount: Option<Digest>, from: Option<RepoName> },
    /// `/v2/<name>/blobs/uploads/<id>` with the `digest` that closes it.
    Upload { name: RepoName, id: UploadId, digest: Option<Digest> },
    /// `/v2/<name>/referrers/<digest>` with an optional `artifactType` filter.
    Referrers { name: RepoName, digest: Digest, artifact_type: Option<String> },
    /// `/tessera/v1/<name>/blobs/<digest>`: where a blob lives; a PUT records a blob that
    /// stays on another server (metadata-only push). Tessera's own API, not the spec's.
    BlobLocation { name: RepoName, digest: Digest },
    /// `POST /tessera/v1/<name>/copy?from=<name>&reference=<tag or digest>[&tag=<tag>]`
    /// (or `&all_tags=true` instead of a reference), `&dry_run=true` to only list: a
    /// promotion within this registry. Tessera's own API.
    Copy { name: RepoName, from: RepoName, what: CopyWhat, dry_run: bool },
    /// `/extensions/v2/<name>/signatures/<digest>`: the simple signatures of a manifest
    /// (the signature extension API, OpenShift's registry's).
    Signatures { name: RepoName, digest: Digest },
    /// `/sigstore/<name>@<algorithm>=<hex>/signature-<index>`: one simple signature in the
    /// lookaside layout (`registries.d`'s `lookaside`), `index` from 1.
    Lookaside { name: RepoName, digest: Digest, index: usize },
    /// `/` and `/ui/...`: a web page (`[ui]`). Not part of the distribution API; pages
    /// decide who sees what themselves, repository by repository.
    Page(Page),
}

/// The web pages.
#[derive(Debug, Clone, PartialEq)]
pub enum Page {
    /// `/`: the routing table.
    Home,
    /// `/ui/repositories?q=<text>&after=<name>`
    /// `group` (`in=`): one group only, `hosted`, `static:<name>` or `cache:<upstream>`,
    /// paged by `after`; without it, the first page of every group (`after` pages hosted).
    Repositories { query: String, after: Option<String>, group: Option<String> },
    /// `/ui/r/<name>?page=<n>`: its tags, newest first.
    Repository { name: RepoName, page: usize },
    /// `/ui/r/<name>/-/<tag or digest>`
    Image { name: RepoName, reference: Reference },
    /// `/ui/operations`
    Operations,
    /// `/ui/login` (GET: the form; POST: logging in)
    Login,
    /// `POST /ui/logout`
    Logout,
    /// `/ui/assets/tessera.css`, `/ui/assets/tessera.js`, `/ui/assets/icon.svg`
    Asset(Asset),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Stylesheet,
    Script,
    Icon,
}

/// What a copy takes from its source repository.
#[derive(Debug, Clone, PartialEq)]
pub enum CopyWhat {
    /// One image, tagged `tag` at the destination (default: the source's tag, if any).
    One { reference: Reference, tag: Option<tessera_spec::Tag> },
    /// Every tag, each under the same tag.
    AllTags,
}

impl Endpoint {
    /// The repository the endpoint is about, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Endpoint::Base
            | Endpoint::Metrics
            | Endpoint::Quotas
            | Endpoint::Token { .. }
            | Endpoint::Jwks
            | Endpoint::Catalog(_)
            | Endpoint::Page(_) => None,
            Endpoint::Tags { name, .. }
            | Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::UploadStart { name, .. }
            | Endpoint::Upload { name, .. }
            | Endpoint::Referrers { name, .. }
            | Endpoint::BlobLocation { name, .. }
            | Endpoint::Copy { name, .. }
            | Endpoint::Signatures { name, .. }
            | Endpoint::Lookaside { name, .. } => Some(name),
        }
    }
}

/// A page under `/ui/`.
fn page(rest: &str, q: &Query) -> Result<Page, OciError> {
    Ok(match rest {
        "repositories" => Page::Repositories {
            query: q.get("q").unwrap_or("").trim().to_string(),
            after: q.get("after").filter(|a| !a.is_empty()).map(str::to_string),
            group: q.get("in").filter(|g| !g.is_empty()).map(str::to_string),
        },
        "operations" => Page::Operations,
        "login" => Page::Login,
        "logout" => Page::Logout,
        "assets/tessera.css" => Page::Asset(Asset::Stylesheet),
        "assets/tessera.js" => Page::Asset(Asset::Script),
        "assets/icon.svg" => Page::Asset(Asset::Icon),
        _ => {
            let rest = rest.strip_prefix("r/").ok_or_else(not_found)?;
            match rest.split_once("/-/") {
                Some((name, reference)) => Page::Image { name: name.parse()?, reference: reference.parse()? },
                None => Page::Repository {
                    name: rest.parse()?,
                    page: q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1),
                },
            }
        }
    })
}

fn not_found() -> OciError {
    OciError::new(ErrorCode::NotFound, "no such endpoint")
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(form_urlencoded::parse(q.unwrap_or("").as_bytes()).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn digest(&self, key: &str) -> Result<Option<Digest>, OciError> {
        self.get(key).map(str::parse).transpose()
    }

    fn paging(&self) -> Result<Paging, OciError> {
        let n = self
            .get("n")
            .map(|n| {
                n.parse::<usize>()
                    .map_err(|_| OciError::new(ErrorCode::PaginationNumberInvalid, "n must be a non-negative integer"))
            })
            .transpose()?;
        Ok(Paging { n, last: self.get("last").map(str::to_string) })
    }
}

/// Parses a request target. `path` is the raw (still percent-encoded) path: names are
/// matched against the spec grammar as sent, so encoded traversal never decodes into one.
pub fn parse(path: &str, query: Option<&str>) -> Result<Endpoint, OciError> {
    if path == "/" {
        return Ok(Endpoint::Page(Page::Home));
    }
    if let Some(rest) = path.strip_prefix("/ui/") {
        return page(rest, &Query::parse(query)).map(Endpoint::Page);
    }
    match path {
        "/metrics" => return Ok(Endpoint::Metrics),
        "/.well-known/jwks.json" => return Ok(Endpoint::Jwks),
        "/token" => {
            let scopes = Query::parse(query).0.into_iter().filter(|(k, _)| k == "scope").map(|(_, v)| v).collect();
            return Ok(Endpoint::Token { scopes });
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/extensions/v2/") {
        let (name, digest) = rest.rsplit_once("/signatures/").ok_or_else(not_found)?;
        return Ok(Endpoint::Signatures { name: name.parse()?, digest: digest.parse()? });
    }
    if let Some(rest) = path.strip_prefix("/sigstore/") {
        return lookaside(rest);
    }
    if let Some(rest) = path.strip_prefix("/tessera/v1/") {
        if rest == "_quotas" {
            return Ok(Endpoint::Quotas);
        }
        if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
            return Ok(Endpoint::BlobLocation { name: name.parse()?, digest: digest.parse()? });
        }
        let name = rest.strip_suffix("/copy").ok_or_else(not_found)?;
        return copy(name.parse()?, &Query::parse(query));
    }
    let rest = path.strip_prefix("/v2").ok_or_else(not_found)?;
    if rest.is_empty() || rest == "/" {
        return Ok(Endpoint::Base);
    }
    let rest = rest.strip_prefix('/').ok_or_else(not_found)?;
    let q = Query::parse(query);
    if rest == "_catalog" {
        return Ok(Endpoint::Catalog(q.paging()?));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let name = |n: usize| -> Result<RepoName, OciError> {
        if n == 0 {
            return Err(OciError::new(ErrorCode::NameInvalid, "missing repository name"));
        }
        segments[..n].join("/").parse()
    };
    let k = segments.len();
    match segments.as_slice() {
        [.., "blobs", "uploads", ""] | [.., "blobs", "uploads"] => {
            let n = if segments[k - 1].is_empty() { k - 3 } else { k - 2 };
            Ok(Endpoint::UploadStart {
                name: name(n)?,
                digest: q.digest("digest")?,
                mount: q.digest("mount")?,
                // An unusable `from` only means the mount cannot happen; the spec then wants
                // an ordinary upload session, not an error.
                from: q.get("from").and_then(|f| f.parse().ok()),
            })
        }
        [.., "blobs", "uploads", id] => {
            let name = name(k - 3)?;
            let id = id
                .parse()
                .map_err(|()| OciError::new(ErrorCode::BlobUploadUnknown, "blob upload unknown to registry"))?;
            Ok(Endpoint::Upload { name, id, digest: q.digest("digest")? })
        }
        [.., "tags", "list"] => Ok(Endpoint::Tags { name: name(k - 2)?, paging: q.paging()? }),
        [.., "manifests", reference] => {
            let name = name(k - 2)?;
            Ok(Endpoint::Manifest { name, reference: reference.parse()? })
        }
        [.., "blobs", digest] => {
            let name = name(k - 2)?;
            Ok(Endpoint::Blob { name, digest: digest.parse()?, stream: q.get("delivery") == Some("stream") })
        }
        [.., "referrers", digest] => {
            let name = name(k - 2)?;
            Ok(Endpoint::Referrers {
                name,
                digest: digest.parse()?,
                artifact_type: q.get("artifactType").map(str::to_string),
            })
        }
        _ => Err(not_found()),
    }
}

/// `<name>@<algorithm>=<hex>/signature-<index>`.
fn lookaside(rest: &str) -> Result<Endpoint, OciError> {
    let (image, file) = rest.rsplit_once('/').ok_or_else(not_found)?;
    let index = file.strip_prefix("signature-").and_then(|n| n.parse::<usize>().ok()).filter(|n| *n > 0);
    let index = index.ok_or_else(not_found)?;
    let (name, digest) = image.rsplit_once('@').ok_or_else(not_found)?;
    let (algorithm, hex) = digest.split_once('=').ok_or_else(not_found)?;
    Ok(Endpoint::Lookaside { name: name.parse()?, digest: format!("{algorithm}:{hex}").parse()?, index })
}

fn copy(name: RepoName, q: &Query) -> Result<Endpoint, OciError> {
    let invalid = |why: &str| OciError::new(ErrorCode::Unsupported, format!("copy: {why}"));
    let flag = |key: &str| matches!(q.get(key), Some("true" | "1"));
    let from = q.get("from").ok_or_else(|| invalid("from=<repository> is required"))?.parse()?;
    let what = match (flag("all_tags"), q.get("reference")) {
        (true, None) if q.get("tag").is_none() => CopyWhat::AllTags,
        (true, _) => return Err(invalid("all_tags copies every tag as it is: no reference or tag with it")),
        (false, Some(reference)) => {
            CopyWhat::One { reference: reference.parse()?, tag: q.get("tag").map(str::parse).transpose()? }
        }
        (false, None) => return Err(invalid("reference=<tag or digest> (or all_tags=true) is required")),
    };
    Ok(Endpoint::Copy { name, from, what, dry_run: flag("dry_run") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Digest {
        Digest::sha256_of(b"x")
    }

    #[test]
    fn parses_every_endpoint() {
        assert_eq!(parse("/v2/", None).unwrap(), Endpoint::Base);
        assert_eq!(parse("/v2", None).unwrap(), Endpoint::Base);
        assert_eq!(
            parse("/v2/_catalog", Some("n=5&last=a")).unwrap(),
            Endpoint::Catalog(Paging { n: Some(5), last: Some("a".into()) })
        );
        let name: RepoName = "a/blobs/b".parse().unwrap();
        assert_eq!(
            parse("/v2/a/blobs/b/manifests/v1", None).unwrap(),
            Endpoint::Manifest { name: name.clone(), reference: "v1".parse().unwrap() }
        );
        assert_eq!(
            parse(&format!("/v2/a/blobs/b/blobs/{}", d()), None).unwrap(),
            Endpoint::Blob { name: name.clone(), digest: d(), stream: false }
        );
        assert_eq!(
            parse("/v2/a/blobs/b/blobs/uploads/", Some(&format!("mount={}&from=x%2Fy", d()))).unwrap(),
            Endpoint::UploadStart {
                name: name.clone(),
                digest: None,
                mount: Some(d()),
                from: Some("x/y".parse().unwrap())
            }
        );
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse(&format!("/v2/a/blobs/b/blobs/uploads/{id}"), Some(&format!("digest={}", d()))).unwrap(),
            Endpoint::Upload { name: name.clone(), id: id.parse().unwrap(), digest: Some(d()) }
        );
        assert_eq!(
            parse("/v2/a/tags/list", Some("n=0")).unwrap(),
            Endpoint::Tags { name: "a".parse().unwrap(), paging: Paging { n: Some(0), last: None } }
        );
        assert_eq!(
            parse(&format!("/v2/a/referrers/{}", d()), Some("artifactType=application%2Fx")).unwrap(),
            Endpoint::Referrers {
                name: "a".parse().unwrap(),
                digest: d(),
                artifact_type: Some("application/x".into())
            }
        );
        assert_eq!(
            parse(&format!("/tessera/v1/a/blobs/b/blobs/{}", d()), None).unwrap(),
            Endpoint::BlobLocation { name: name.clone(), digest: d() }
        );
        assert!(parse("/tessera/v1/a/blobs/", None).is_err());
        assert!(parse(&format!("/tessera/v1/../blobs/{}", d()), None).is_err());
    }

    #[test]
    fn refuses_hostile_paths() {
        let code = |p: &str| parse(p, None).unwrap_err().code;
        assert_eq!(code("/v2/../etc/manifests/x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/a/%2e%2e/b/manifests/x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2//etc/passwd/manifests/x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/manifests/x"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/a/manifests/..%2f"), ErrorCode::TagInvalid);
        assert_eq!(code("/v2/a/blobs/sha256:..%2f..%2f"), ErrorCode::DigestInvalid);
        assert_eq!(code("/v2/a/blobs/uploads/..%2f..%2fx"), ErrorCode::BlobUploadUnknown);
        assert_eq!(code("/v2/a/blobs/uploads/../../meta.sqlite"), ErrorCode::NotFound);
        assert_eq!(code("/v3/"), ErrorCode::NotFound);
        assert_eq!(code("/v2/a"), ErrorCode::NotFound);
        assert_eq!(parse("/v2/a/tags/list", Some("n=-1")).unwrap_err().code, ErrorCode::PaginationNumberInvalid);
        assert_eq!(parse("/v2/a/blobs/uploads/", Some("digest=md5:00")).unwrap_err().code, ErrorCode::DigestInvalid);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn arbitrary_targets_never_panic(path in "/v2/[a-z0-9/._%:-]{0,200}", query in proptest::option::of(".{0,100}")) {
            let _ = super::parse(&path, query.as_deref());
        }

        #[test]
        fn arbitrary_bytes_never_panic(path in ".{0,200}") {
            let _ = super::parse(&path, Some(&path));
        }
    }
}
