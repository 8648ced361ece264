//! Tags through the cache: how long a cached tag is trusted, revalidation, serving stale,
//! remembered "not found" answers, and tag listings.

use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use reqwest::header::HeaderMap;
use tessera_registry::store_failure;
use tessera_spec::{Digest, ErrorCode, OciError, Paging, RepoName, Tag};
use tessera_store::Page;

use crate::upstream::manifest_accept;

use super::{Fetched, PullThrough, UpstreamAuth, classify::Answer, count, read_limited, unavailable};

impl PullThrough {
    pub(super) fn recently_missing(&self, name: &RepoName, reference: &str) -> bool {
        let ttl = Duration::from_secs(self.upstream.cache_settings().negative_ttl_secs);
        let key = (name.clone(), reference.to_string());
        match self.missing.get(&key) {
            Some(at) if at.elapsed() < ttl => true,
            Some(_) => {
                self.missing.remove(&key);
                false
            }
            None => false,
        }
    }

    pub(super) fn remember_missing(&self, name: &RepoName, reference: &str) {
        self.missing.insert((name.clone(), reference.to_string()), Instant::now());
    }
    /// A manifest by tag: the cached one within its TTL, else revalidated with a HEAD
    /// (or the passthrough HEAD already made, `authorised`); stale when the upstream fails.
    pub(super) async fn manifest_by_tag(
        &self,
        name: &RepoName,
        t: &Tag,
        authorised: Option<reqwest::Response>,
        auth: &UpstreamAuth,
    ) -> Result<Fetched, OciError> {
        let not_found = || OciError::new(ErrorCode::ManifestUnknown, "manifest unknown");
        let store_err = |e| store_failure("cache metadata", e);
        let cached = match self.meta.resolve_tag(name, t).await.map_err(store_err)? {
            Some(d) => self.meta.get_manifest(name, &d).await.map_err(store_err)?,
            None => None,
        };
        let key = (name.clone(), t.clone());
        let remembered = self.checked.get(&key);
        let checked = match remembered {
            Some(at) => Some(at),
            None if cached.is_some() => self.meta.tag_checked(name, t).await.map_err(store_err)?,
            None => None,
        };
        let age = |at: SystemTime| SystemTime::now().duration_since(at).unwrap_or_default();
        let settings = self.upstream.cache_settings();
        if let (Some(m), Some(at), None) = (&cached, checked, &authorised)
            && age(at) < Duration::from_secs(settings.tag_ttl_secs)
        {
            count(&self.stats.manifest_hits, 1);
            return Ok(Fetched { manifest: m.clone(), stale: false });
        }
        if cached.is_none() && authorised.is_none() && self.recently_missing(name, t.as_str()) {
            return Err(not_found());
        }
        let path = format!("/v2/{name}/manifests/{t}");
        let answer = match authorised {
            Some(r) => Answer::Ok(r),
            None => self.ask(Method::HEAD, name, &path, manifest_accept(), auth).await,
        };
        let fresh = match answer {
            Answer::Ok(r) => {
                let upstream_digest = r
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<Digest>().ok());
                match (&cached, upstream_digest) {
                    (Some(m), Some(d)) if m.digest == d => {
                        count(&self.stats.manifest_hits, 1);
                        Ok(m.clone())
                    }
                    (_, Some(d)) => match self.meta.get_manifest(name, &d).await.map_err(store_err)? {
                        Some(m) => {
                            count(&self.stats.manifest_hits, 1);
                            Ok(m)
                        }
                        None => self.fetch_manifest(name, &d.to_string(), Some(&d), auth).await?.ok_or_else(not_found),
                    },
                    (_, None) => self.fetch_manifest(name, t.as_str(), None, auth).await?.ok_or_else(not_found),
                }
            }
            Answer::NotFound => {
                self.remember_missing(name, t.as_str());
                if cached.is_some() {
                    let _ = self.meta.delete_tag(name, t).await;
                }
                Err(not_found())
            }
            Answer::Refused(e) => Err(e),
            Answer::Failing(e) if auth.passthrough() => Err(e),
            Answer::Failing(e) => {
                let age_ok = checked.is_some_and(|at| age(at) < Duration::from_secs(settings.max_stale_secs));
                match cached {
                    Some(m) if settings.serve_stale && age_ok => {
                        tracing::warn!(upstream = self.upstream.name(), %name, tag = %t, "serving a stale manifest: {}", e.message);
                        count(&self.stats.stale_served, 1);
                        return Ok(Fetched { manifest: m, stale: true });
                    }
                    _ => Err(e),
                }
            }
        };
        let m = fresh?;
        let now = SystemTime::now();
        let kept = match self.meta.put_manifest(name, &m, Some(t)).await {
            Ok(()) => self.meta.set_tag_checked(name, t, now).await,
            Err(e) => Err(e),
        };
        match kept {
            Ok(()) => {
                self.checked.insert(key, now);
            }
            Err(e) => self.not_kept(name, t.as_str(), e),
        }
        Ok(Fetched { manifest: m, stale: false })
    }

    /// A page of a repository's tags from the upstream (its paging passed on: more pages
    /// when it links to one); the cached tags when it cannot answer.
    pub async fn tags(&self, name: &RepoName, paging: &Paging, auth: &UpstreamAuth) -> Result<Page, OciError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let path = format!("/v2/{name}/tags/list{}", crate::source::paging_query(paging));
        match self.ask(Method::GET, name, &path, HeaderMap::new(), auth).await {
            Answer::Ok(r) => {
                let more = r.headers().contains_key("link");
                let body = read_limited(r, 16 * 1024 * 1024).await.map_err(|e| unavailable(&self.upstream, e))?;
                let list: TagList = serde_json::from_slice(&body)
                    .map_err(|e| unavailable(&self.upstream, format!("tags list: {e}")))?;
                Ok(Page { items: list.tags.unwrap_or_default(), more })
            }
            Answer::NotFound => Err(OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")),
            Answer::Refused(e) => Err(e),
            Answer::Failing(e) if auth.passthrough() => Err(e),
            Answer::Failing(e) => {
                let page = self
                    .meta
                    .list_tags(name, None, tessera_registry::MAX_PAGE)
                    .await
                    .map_err(|e| store_failure("cache tags", e))?;
                match page {
                    Some(p) if self.upstream.cache_settings().serve_stale => Ok(Page { items: p.items, more: false }),
                    _ => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MISSING_REMEMBERED;
    use crate::upstream::Upstream;
    use std::sync::Arc;

    /// Misses are keyed by what clients ask for: a flood of distinct missing names stays
    /// within the bound, and what was just found missing is still remembered.
    #[tokio::test]
    async fn remembered_misses_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let config = tessera_config::Config::from_toml(
            "[[upstream]]\nname = \"up\"\nurl = \"http://127.0.0.1:9\"\n[upstream.cache]\nnegative_ttl_secs = 600\n",
        )
        .unwrap();
        let upstream = Arc::new(Upstream::new(&config.upstreams[0]).unwrap());
        let meta = Arc::new(tessera_store::SqliteMetaStore::open(&dir.path().join("meta.sqlite")).unwrap());
        let blobs = Arc::new(tessera_store::FsBlobStore::open(dir.path().join("blobs")).unwrap());
        let cache = PullThrough::open(upstream, meta, blobs, true, None).await.unwrap();
        let name: RepoName = "flood".parse().unwrap();
        for i in 0..3 * MISSING_REMEMBERED {
            cache.remember_missing(&name, &format!("tag{i}"));
        }
        assert!(cache.missing.len() <= MISSING_REMEMBERED, "{} remembered", cache.missing.len());
        assert!(cache.recently_missing(&name, &format!("tag{}", 3 * MISSING_REMEMBERED - 1)));
    }
}
