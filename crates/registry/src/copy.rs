//! Promotion within one registry: an image copied from one repository to another by
//! mounting its blobs (no byte is read or written; a layer that lives on a CDN stays
//! there) and storing its manifests by digest: an index's children first, then the image,
//! then its referrers (signatures, SBOMs), and theirs; and the simple signatures of each.

use std::collections::HashSet;

use tessera_spec::manifest::ManifestKind;
use tessera_spec::{Digest, ErrorCode, OciError, ParsedManifest, Reference, RepoName, Tag};
use tessera_store::ManifestRecord;

use crate::{Registry, manifest_unknown, store_failure};

/// Why a manifest is part of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The image asked for (tagged at the destination when a tag was given).
    Image,
    /// A manifest an index lists.
    Child,
    /// A manifest whose subject is one of the others.
    Referrer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Image => "image",
            Role::Child => "child",
            Role::Referrer => "referrer",
        }
    }
}

/// One manifest of a copy.
#[derive(Debug, Clone)]
pub struct CopiedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub role: Role,
    /// The destination tag, for the image.
    pub tag: Option<Tag>,
    /// Whether the destination held it already.
    pub present: bool,
}

/// One blob of a copy.
#[derive(Debug, Clone)]
pub struct CopiedBlob {
    pub digest: Digest,
    pub size: u64,
    /// Whether the destination linked it already (else it is mounted).
    pub present: bool,
}

/// What a copy did, or (a dry run) would do.
#[derive(Debug, Clone, Default)]
pub struct Copied {
    pub manifests: Vec<CopiedManifest>,
    pub blobs: Vec<CopiedBlob>,
    /// Simple signatures of the copied manifests the destination did not have.
    pub signatures: usize,
}

impl Copied {
    /// Bytes linked into the destination by this copy (none of them written).
    pub fn bytes_mounted(&self) -> u64 {
        self.blobs.iter().filter(|b| !b.present).map(|b| b.size).sum()
    }
}

impl Registry {
    /// Copies `from:reference` (with its index children and referrers) into `to`, tagging
    /// the image `tag` there (`None`: the source's tag, if it named one). With `dry_run`,
    /// only says what would be mounted and stored.
    pub async fn copy(
        &self,
        from: &RepoName,
        reference: &Reference,
        to: &RepoName,
        tag: Option<&Tag>,
        dry_run: bool,
    ) -> Result<Copied, OciError> {
        let top = self.manifest_in(from, reference).await?.ok_or_else(|| manifest_unknown(reference))?;
        let tag = tag.or(match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        });
        // Everything to store, in an order where each manifest's children come first.
        let mut order: Vec<(ManifestRecord, ParsedManifest, Role)> = Vec::new();
        let mut seen = HashSet::new();
        self.gather(from, top, Role::Image, &mut order, &mut seen).await?;
        let mut copied = Copied::default();
        let mut blobs_seen = HashSet::new();
        for (record, parsed, role) in &order {
            for d in parsed.required_blobs() {
                if !blobs_seen.insert(d.digest.clone()) {
                    continue;
                }
                let present = self.linked(to, &d.digest).await?.is_some();
                copied.blobs.push(CopiedBlob { digest: d.digest.clone(), size: d.size, present });
            }
            let present = self.manifest_in(to, &Reference::Digest(record.digest.clone())).await?.is_some();
            let tag = (*role == Role::Image).then(|| tag.cloned()).flatten();
            copied.manifests.push(CopiedManifest {
                digest: record.digest.clone(),
                media_type: record.media_type.clone(),
                size: record.bytes.len() as u64,
                role: *role,
                tag,
                present,
            });
        }
        // Simple signatures come along with the manifests they sign.
        let mut signatures = Vec::new();
        for (record, _, _) in &order {
            let there = self.signatures(to, &record.digest).await?;
            for signature in self.signatures(from, &record.digest).await? {
                if !there.contains(&signature) {
                    signatures.push((record.digest.clone(), signature));
                }
            }
        }
        copied.signatures = signatures.len();
        if dry_run {
            return Ok(copied);
        }
        for blob in copied.blobs.iter().filter(|b| !b.present) {
            if self.mount(to, &blob.digest, Some(from)).await?.is_none() {
                // Its bytes are being collected (unlinked everywhere meanwhile).
                return Err(OciError::new(
                    ErrorCode::BlobUnknown,
                    format!("{} left {from} while it was being copied", blob.digest),
                ));
            }
        }
        for ((record, _, _), m) in order.iter().zip(&copied.manifests) {
            if m.present && m.tag.is_none() {
                continue;
            }
            let reference = match &m.tag {
                Some(t) => Reference::Tag(t.clone()),
                None => Reference::Digest(record.digest.clone()),
            };
            self.manifest_put(to, &reference, Some(&record.media_type), record.bytes.clone()).await?;
        }
        for (digest, signature) in &signatures {
            self.add_signature(to, digest, &signature.name, &signature.content).await?;
        }
        Ok(copied)
    }

    /// Adds `record` to `order` after its children, then its referrers after it.
    async fn gather(
        &self,
        repo: &RepoName,
        record: ManifestRecord,
        role: Role,
        order: &mut Vec<(ManifestRecord, ParsedManifest, Role)>,
        seen: &mut HashSet<Digest>,
    ) -> Result<(), OciError> {
        // Iterative, so a deep or cyclic chain of referrers cannot exhaust the stack.
        let mut pending = vec![(record, role, false)];
        while let Some((record, role, children_done)) = pending.pop() {
            if !children_done {
                if !seen.insert(record.digest.clone()) {
                    continue;
                }
                let parsed = ParsedManifest::parse(Some(&record.media_type), &record.bytes)?;
                let children = if parsed.kind == ManifestKind::Index { parsed.manifests.clone() } else { Vec::new() };
                pending.push((record, role, true));
                for child in children.iter().rev() {
                    let found = self.manifest_in(repo, &Reference::Digest(child.digest.clone())).await?;
                    let child = found.ok_or_else(|| {
                        OciError::new(
                            ErrorCode::ManifestBlobUnknown,
                            format!("{repo} lacks {}, which an index being copied lists", child.digest),
                        )
                    })?;
                    pending.push((child, Role::Child, false));
                }
                continue;
            }
            let parsed = ParsedManifest::parse(Some(&record.media_type), &record.bytes)?;
            let referrers =
                self.meta.referrers(repo, &record.digest).await.map_err(|e| store_failure("referrers", e))?;
            order.push((record, parsed, role));
            for referrer in referrers.into_iter().rev() {
                if !seen.contains(&referrer.digest) {
                    pending.push((referrer, Role::Referrer, false));
                }
            }
        }
        Ok(())
    }

    async fn manifest_in(&self, repo: &RepoName, reference: &Reference) -> Result<Option<ManifestRecord>, OciError> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                match self.meta.resolve_tag(repo, t).await.map_err(|e| store_failure("tag lookup", e))? {
                    Some(d) => d,
                    None => return Ok(None),
                }
            }
        };
        self.meta.get_manifest(repo, &digest).await.map_err(|e| store_failure("manifest lookup", e))
    }

    async fn linked(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, OciError> {
        self.meta.blob_link(repo, digest).await.map_err(|e| store_failure("blob link lookup", e))
    }

    /// Every tag of `repo`, in order.
    pub async fn all_tags(&self, repo: &RepoName) -> Result<Vec<Tag>, OciError> {
        let mut tags = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .meta
                .list_tags(repo, last.as_deref(), crate::MAX_PAGE)
                .await
                .map_err(|e| store_failure("tags list", e))?
                .ok_or_else(|| OciError::new(ErrorCode::NameUnknown, format!("{repo} is not known here")))?;
            for t in &page.items {
                tags.push(t.parse::<Tag>()?);
            }
            match (page.more, page.items.last()) {
                (true, Some(l)) => last = Some(l.clone()),
                _ => return Ok(tags),
            }
        }
    }
}
