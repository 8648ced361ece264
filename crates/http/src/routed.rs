//! A request's route: the sources the routing table chose for its name, asked in order
//! until one has the content (one loop for every kind of read).

use std::sync::Arc;

use tessera_federation::{Answer, Delivery, Found, Resolved, Source};
use tessera_spec::{ErrorCode, OciError, RepoName};

/// Content from a source, or the URL the client is sent to for it.
pub(crate) enum Reply<T> {
    Here(T),
    Redirect(String),
}

pub(crate) struct Route {
    resolved: Resolved,
    /// The delivery policy of the table this request was resolved with (a reload swaps in
    /// a new table for later requests; this one keeps its own).
    delivery: Arc<Delivery>,
}

impl Route {
    pub(crate) fn new(resolved: Resolved, delivery: Arc<Delivery>) -> Route {
        Route { resolved, delivery }
    }

    pub(crate) fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    pub(crate) fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The hosted name a write goes to, if this route takes writes.
    pub(crate) fn writable(&self) -> Result<&RepoName, OciError> {
        self.resolved.write_to.as_ref().ok_or_else(|| {
            OciError::new(
                ErrorCode::Unsupported,
                "this repository is served from another registry and is read-only here",
            )
        })
    }

    /// Whether the repository is a protected static one (logged-in clients only).
    pub(crate) fn protected(&self) -> bool {
        self.resolved.sources.iter().any(|(source, name)| source.protected(name))
    }

    /// Asks each source in turn (`ask(source, its name for the repository)`) until one has
    /// the content or says where it is; a failure ends the search. When none has it, the
    /// last source's not-found is the answer.
    pub(crate) async fn first<'r, T, Fut>(
        &'r self,
        ask: impl Fn(&'r dyn Source, &'r RepoName) -> Fut,
    ) -> Result<Reply<T>, OciError>
    where
        Fut: Future<Output = Answer<T>>,
    {
        let mut last = None;
        for (source, name) in &self.resolved.sources {
            match ask(source.as_ref(), name).await? {
                Found::Here(v) => return Ok(Reply::Here(v)),
                Found::Redirect(url) => return Ok(Reply::Redirect(url)),
                Found::Absent(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| OciError::new(ErrorCode::NameUnknown, "repository name not known to registry")))
    }
}
