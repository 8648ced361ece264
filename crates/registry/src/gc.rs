//! Garbage collection of the hosted store, online.
//!
//! A pass removes links that no manifest of their repository references once they are
//! older than the grace period (layers of a deleted manifest, a push that never sent its
//! manifest), then deletes the bytes of blobs that nothing links and nobody held during the
//! grace period, and abandoned upload sessions. Pushes go on meanwhile: the rules that keep
//! them whole are in [`tessera_store::MetaStore`]'s garbage collection methods.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tessera_spec::Digest;
pub use tessera_store::Collected;
use tessera_store::StoreResult;

use crate::Registry;

/// What a collection pass does.
#[derive(Debug, Clone)]
pub struct Collect {
    /// Bounds how long a push may take between uploading a layer and sending the manifest
    /// that references it (and, with `untagged`, between pushing a manifest and tagging it
    /// or the index that lists it).
    pub grace: Duration,
    /// How long an idle upload session is kept.
    pub upload_expiry: Duration,
    /// How long an upload session with bytes but no record is kept: the grace period while
    /// serving (a monolithic upload in flight looks like that), zero with no server running.
    pub orphan_uploads_after: Duration,
    /// Also delete manifests nothing keeps (see [`tessera_store::MetaStore::delete_untagged`]).
    pub untagged: bool,
    /// Retention rules applied first (see [`crate::retention`]).
    pub retention: Vec<crate::retention::RetentionRule>,
    /// Count what would go without deleting any file: for a pass over a copy of the
    /// metadata, whose changes are thrown away.
    pub dry_run: bool,
}

/// The cluster lock a collection pass holds: one node collects at a time.
const GC_LOCK: &str = "gc";

impl Registry {
    /// One collection pass; in a cluster, none while another node runs one.
    pub async fn collect_garbage(&self, how: &Collect) -> StoreResult<Collected> {
        let Some(_lease) = self.gc_lease().await? else {
            return Ok(Collected { elsewhere: true, ..Default::default() });
        };
        self.collect_garbage_now(how).await
    }

    /// The cluster's collection lock: `Some` when taken (or outside a cluster), `None` while
    /// another node holds it.
    async fn gc_lease(&self) -> StoreResult<Option<Option<tessera_store::ClusterGuard>>> {
        match &self.cluster {
            None => Ok(Some(None)),
            Some(cluster) => Ok(cluster.try_lock(GC_LOCK).await?.map(Some)),
        }
    }

    async fn collect_garbage_now(&self, how: &Collect) -> StoreResult<Collected> {
        let cutoff = SystemTime::now() - how.grace;
        let mut done = Collected::default();
        let untagged = self.apply_retention(&how.retention).await?;
        done.tags_untagged = untagged.iter().map(|t| format!("{}:{}", t.repo, t.tag)).collect();
        if how.untagged {
            done.manifests_deleted = self.meta.delete_untagged(cutoff).await?.len() as u64;
        }
        done.links_removed = self.meta.unlink_unreferenced(cutoff).await?.len() as u64;
        // In batches, so no blob stays doomed (and a push of it waiting) for long. Each blob
        // is handled once a pass: what cannot be deleted stays doomed for the next pass, and
        // a dry run's files, still there, are not counted again as bytes without a record.
        let mut handled = HashSet::new();
        loop {
            let doomed = self.meta.doom_unlinked(cutoff, &[], DOOM_BATCH).await?;
            let todo: Vec<Digest> = doomed.into_iter().filter(|d| !handled.contains(d)).collect();
            if todo.is_empty() {
                break;
            }
            self.delete_doomed(&todo, &mut done, how.dry_run).await?;
            handled.extend(todo);
        }
        let stored: Vec<_> =
            self.blobs.list().await?.into_iter().filter(|b| b.stored < cutoff).map(|b| b.digest).collect();
        for batch in stored.chunks(DOOM_BATCH) {
            let doomed = self.meta.doom_unlinked(cutoff, batch, 0).await?;
            let todo: Vec<Digest> = doomed.into_iter().filter(|d| !handled.contains(d)).collect();
            self.delete_doomed(&todo, &mut done, how.dry_run).await?;
            handled.extend(todo);
        }
        done.uploads_removed =
            self.sweep_uploads(how.upload_expiry, how.orphan_uploads_after, how.dry_run).await? as u64;
        Ok(done)
    }

    /// Finishes what an interrupted pass doomed (its blobs cannot be held meanwhile).
    /// Run at start-up.
    pub async fn finish_interrupted_collection(&self) -> StoreResult<u64> {
        // A node collecting now finishes them itself.
        let Some(_lease) = self.gc_lease().await? else { return Ok(0) };
        // Dooms nothing new: only the leftovers are returned.
        let doomed = self.meta.doom_unlinked(SystemTime::UNIX_EPOCH, &[], 0).await?;
        let mut done = Collected::default();
        self.delete_doomed(&doomed, &mut done, false).await?;
        Ok(done.blobs_deleted)
    }

    /// Deletes the bytes of doomed blobs and ends each doom as soon as its bytes are gone.
    /// A file that cannot be deleted stays doomed (so nothing links it) for the next pass.
    async fn delete_doomed(&self, doomed: &[Digest], done: &mut Collected, dry_run: bool) -> StoreResult<()> {
        for digest in doomed {
            let size = self.blobs.stat(digest).await.ok().flatten();
            let deleted = if dry_run { Ok(size.is_some()) } else { self.blobs.delete(digest).await };
            let size = size.unwrap_or(0);
            match deleted {
                Ok(existed) => {
                    self.meta.forget_doomed(std::slice::from_ref(digest)).await?;
                    if existed {
                        done.blobs_deleted += 1;
                        done.bytes_freed += size;
                    }
                }
                Err(e) => tracing::warn!(%digest, "cannot delete a collected blob, kept for the next pass: {e}"),
            }
        }
        Ok(())
    }
}

/// How many blobs one pass dooms at a time.
const DOOM_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tessera_spec::{Reference, RepoName};

    use super::*;
    use crate::test_registry as registry;

    async fn push_blob(r: &Registry, repo: &RepoName, content: &'static [u8]) -> Digest {
        let digest = Digest::sha256_of(content);
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(content))]);
        r.upload_monolithic(repo, &digest, None, body).await.unwrap();
        digest
    }

    async fn push_manifest(r: &Registry, repo: &RepoName, tag: &str, config: &Digest, layers: &[&Digest]) -> Digest {
        let desc = |d: &Digest, t: &str| format!(r#"{{"mediaType":"{t}","digest":"{d}","size":1}}"#);
        let layers: Vec<String> = layers.iter().map(|d| desc(d, "application/vnd.oci.image.layer.v1.tar")).collect();
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}]}}"#,
            desc(config, "application/vnd.oci.image.config.v1+json"),
            layers.join(",")
        );
        let reference = Reference::Tag(tag.parse().unwrap());
        let put = r
            .manifest_put(repo, &reference, Some("application/vnd.oci.image.manifest.v1+json"), Bytes::from(doc))
            .await
            .unwrap();
        put.digest
    }

    async fn held(r: &Registry, d: &Digest) -> bool {
        r.blobs.stat(d).await.unwrap().is_some()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pass_reclaims_what_no_manifest_references_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let (app, other): (RepoName, RepoName) = ("team/app".parse().unwrap(), "team/other".parse().unwrap());
        let config = push_blob(&r, &app, b"c").await;
        let (shared, own) = (push_blob(&r, &app, b"s").await, push_blob(&r, &app, b"o").await);
        let loose = push_blob(&r, &other, b"l").await;
        let first = push_manifest(&r, &app, "v1", &config, &[&shared, &own]).await;
        push_manifest(&r, &app, "v2", &config, &[&shared]).await;
        r.manifest_delete(&app, &Reference::Digest(first)).await.unwrap();

        let how = |grace: Duration| Collect {
            grace,
            upload_expiry: Duration::from_secs(7 * 24 * 3600),
            orphan_uploads_after: grace,
            untagged: false,
            retention: Vec::new(),
            dry_run: false,
        };
        let kept = r.collect_garbage(&how(Duration::from_secs(3600))).await.unwrap();
        assert_eq!(kept, Collected::default(), "everything is younger than the grace period");

        tokio::time::sleep(Duration::from_millis(5)).await;
        let done = r.collect_garbage(&how(Duration::ZERO)).await.unwrap();
        assert_eq!((done.links_removed, done.blobs_deleted, done.bytes_freed), (2, 2, 2), "{done:?}");
        assert!(!held(&r, &own).await && !held(&r, &loose).await, "unreferenced bytes are gone");
        assert!(held(&r, &shared).await && held(&r, &config).await, "referenced bytes stay");
        let v2 =
            r.manifest_get(&app, &Reference::Tag("v2".parse().unwrap()), &tessera_spec::Accept::any()).await.unwrap();
        assert!(r.blob_get(&app, &shared, None).await.is_ok(), "v2 still pulls");
        assert!(!v2.bytes.is_empty());
        assert_eq!(r.collect_garbage(&how(Duration::ZERO)).await.unwrap(), Collected::default(), "nothing left");
    }

    /// Without the hold, the commit would keep the copy the collection is about to delete
    /// and link bytes that are gone.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_commit_waits_for_a_collection_deleting_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(registry(dir.path()));
        let repo: RepoName = "team/app".parse().unwrap();
        let blob = push_blob(&r, &repo, b"bytes").await;
        r.blob_delete(&repo, &blob).await.unwrap();
        let doomed = r.meta.doom_unlinked(SystemTime::now() + Duration::from_secs(60), &[], 10).await.unwrap();
        assert_eq!(doomed, vec![blob.clone()]);

        let pusher = {
            let (r, repo) = (r.clone(), repo.clone());
            tokio::spawn(async move { push_blob(&r, &repo, b"bytes").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pusher.is_finished(), "the commit waits while the bytes are doomed");
        r.delete_doomed(&doomed, &mut Collected::default(), false).await.unwrap();
        pusher.await.unwrap();
        assert!(held(&r, &blob).await, "the pushed bytes were stored again");
        assert!(r.blob_get(&repo, &blob, None).await.is_ok());
    }
}
