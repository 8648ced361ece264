//! A request's route: the sources the routing table chose for its name, asked in order
//! until one has the content (one loop for every kind of read).

use std::sync::Arc;

pub(crate) use tessera_federation::Reply;
use tessera_federation::signing::Signing;
use tessera_federation::{Answer, Delivery, Federation, Resolved, Source};
use tessera_spec::{ErrorCode, OciError, RepoName};

pub(crate) struct Route {
    resolved: Resolved,
    /// The table this request was resolved with, for its delivery policy and signature
    /// rules (a reload swaps in a new table for later requests; this one keeps its own).
    federation: Arc<Federation>,
}

impl Route {
    pub(crate) fn new(resolved: Resolved, federation: Arc<Federation>) -> Route {
        Route { resolved, federation }
    }

    pub(crate) fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    pub(crate) fn delivery(&self) -> &Delivery {
        &self.federation.delivery
    }

    pub(crate) fn signing(&self) -> &Signing {
        &self.federation.signing
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

    /// Asks each source in turn until one has the content or says where it is (see
    /// [`Resolved::first`]).
    pub(crate) async fn first<'r, T, Fut>(
        &'r self,
        ask: impl Fn(&'r dyn Source, &'r RepoName) -> Fut,
    ) -> Result<Reply<T>, OciError>
    where
        Fut: Future<Output = Answer<T>>,
    {
        self.resolved.first(ask).await
    }

    /// Like [`Route::first`], with the position of the source that answered.
    pub(crate) async fn first_answering<'r, T, Fut>(
        &'r self,
        ask: impl Fn(&'r dyn Source, &'r RepoName) -> Fut,
    ) -> Result<(Reply<T>, usize), OciError>
    where
        Fut: Future<Output = Answer<T>>,
    {
        self.resolved.first_answering(ask).await
    }
}
