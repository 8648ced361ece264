//! `[[signatures]]`: routes that demand signed images. Before a manifest is served under a
//! requiring rule, the signatures of its digest are found through the same sources that
//! served it (simple signatures from the signature extension, cosign signatures under the
//! `sha256-<hex>.sig` tag and as OCI referrers), checked against the rule's keys, and their
//! claims compared with the digest and the name asked for. A pass is remembered per rule,
//! route, name, tag and digest, so a signed image costs one cache lookup per pull after its
//! first; a refusal is remembered for [`REFUSAL_REMEMBERED`], so a client pulling an unsigned
//! image in a loop does not set off a search of every signature place each time.
//!
//! What a pass lets through after it (the manifests a signed index lists, the blobs of a
//! signed image, fetched by digest alone) is also recorded in the metadata store as
//! vouches, so that in a cluster every node admits them, not only the one a balancer sent
//! the index or manifest to.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tessera_config::{SignatureIdentity, SignaturePolicy};
use tessera_spec::{Accept, Digest, ErrorCode, OciError, ParsedManifest, Reference, RepoName, Tag};
use tessera_store::{ManifestRecord, MetaStore};
use tessera_trust::{COSIGN_ARTIFACT_TYPE, COSIGN_SIGNATURE_ANNOTATION, Family, Identity, Keyring, Verified};

use crate::router::{Matched, Reply, Resolved};
use crate::source::Ask;

/// How many passed checks (and index children they admit) each table remembers.
pub const VERDICTS_REMEMBERED: usize = 100_000;
/// How long a refusal (or an unsigned manifest an auditing rule served) is remembered: a
/// signature pushed meanwhile counts after this long.
pub const REFUSAL_REMEMBERED: Duration = Duration::from_secs(10);
/// How long a recorded vouch counts (and is kept) in the metadata store, unless its pass
/// ends sooner (the signer's key expires).
pub const VOUCHES_KEPT: Duration = Duration::from_secs(24 * 3600);
/// How often a pass remembered here records its vouches again, so that they stay within
/// [`VOUCHES_KEPT`] on every node for as long as this node keeps serving it.
pub const VOUCHES_RENEWED: Duration = Duration::from_secs(3600);
/// How many refusals each table remembers.
const REFUSALS_REMEMBERED: usize = 10_000;
/// The most cosign signature manifests read for one manifest.
const COSIGN_MANIFESTS_READ: usize = 16;
/// The most indexes listing a manifest whose signatures are looked at for it.
const PARENTS_READ: usize = 8;
/// The most signature layers read from one cosign signature manifest.
const COSIGN_LAYERS_READ: usize = 16;

/// One `[[signatures]]` rule, its keys loaded.
pub struct SigningRule {
    pub prefix: String,
    /// The upstream whose content the rule covers, whatever reaches it.
    pub upstream: Option<String>,
    /// What `prefix` is named as in signatures of copies kept under another name.
    pub signed_prefix: Option<String>,
    pub keys: Keyring,
    pub require: bool,
    pub identity: Identity,
    /// What the rule is, keys included, as a digest: the vouches it recorded count only for
    /// a rule with the same keys and names (after a reload, or on another node).
    fingerprint: String,
}

impl SigningRule {
    /// What the rule covers, in words: `"team"`, `every name`, `upstream "vendor"`.
    fn covering(&self) -> String {
        match (&self.upstream, self.prefix.is_empty()) {
            (None, true) => "every name".into(),
            (None, false) => format!("{:?}", self.prefix),
            (Some(u), true) => format!("upstream {u:?}"),
            (Some(u), false) => format!("upstream {u:?} under {:?}", self.prefix),
        }
    }

    /// The names a signature may claim for `name` served through `resolved`: the client's,
    /// each source's, and the client's under `signed_prefix`.
    fn names(&self, name: &RepoName, resolved: &Resolved) -> Vec<String> {
        let mut names: Vec<String> = std::iter::once(name.as_str().to_string())
            .chain(resolved.sources.iter().map(|(_, n)| n.as_str().to_string()))
            .collect();
        if let Some(signed) = &self.signed_prefix {
            let rest =
                name.as_str().strip_prefix(self.prefix.as_str()).unwrap_or(name.as_str()).trim_start_matches('/');
            names.push(match (signed.is_empty(), rest.is_empty()) {
                (true, _) => rest.to_string(),
                (false, true) => signed.clone(),
                (false, false) => format!("{signed}/{rest}"),
            });
        }
        names
    }
}

/// Counts for `/metrics`.
#[derive(Default)]
pub struct SigningStats {
    /// Manifests a requiring rule refused.
    pub refused: AtomicU64,
    /// Manifests whose signatures were checked (not answered from the remembered passes).
    pub checked: AtomicU64,
    /// Manifests a non-requiring rule found unsigned (served all the same).
    pub unsigned_served: AtomicU64,
}

/// What was found about one manifest's signatures, for `tessera explain` and refusals.
pub struct Evidence {
    pub family: Family,
    /// The signature as found: `signature-N`, or the cosign manifest and layer.
    pub origin: String,
    pub outcome: Result<Verified, String>,
}

/// The rules of one configuration, with the checks they passed.
pub struct Signing {
    rules: Vec<SigningRule>,
    /// Passed checks. A pass holds for the names of the route it was checked through: one
    /// name may be routed differently by virtual host or `ns`.
    passed: quick_cache::sync::Cache<PassKey, Pass>,
    /// Manifests an index that passed lists, until when: served by digest under its rule
    /// without signatures of their own, as clients verify an index's signature and then
    /// fetch its children.
    admitted: quick_cache::sync::Cache<(usize, Matched, RepoName, Digest), SystemTime>,
    /// Blobs of manifests that passed, until when: what a requiring rule lets a cache fetch.
    admitted_blobs: quick_cache::sync::Cache<(usize, Matched, RepoName, Digest), SystemTime>,
    /// Where vouches are recorded for every node sharing it (the hosted metadata store).
    vouches: Arc<dyn MetaStore>,
    /// When the vouches that ended were last deleted.
    vouches_pruned: Mutex<Option<Instant>>,
    /// Recent refusals, with when they were decided and why.
    refused: quick_cache::sync::Cache<PassKey, (Instant, String)>,
    pub stats: Arc<SigningStats>,
}

/// What a vouch admits.
#[derive(Clone, Copy)]
enum Vouch {
    /// A manifest, by digest (a child of an index that passed).
    Manifest,
    /// A blob of a manifest that passed.
    Blob,
}

/// A passed check: the rule, the route, the name, the tag pulled by, the manifest digest.
type PassKey = (usize, Matched, RepoName, Option<Tag>, Digest);

/// When a pass ends by itself: the signer's key expires, or the vouch it was admitted by
/// ends. `None`: it does not (it is checked again only once forgotten).
type Ends = Option<SystemTime>;

/// A pass remembered here.
#[derive(Clone, Copy)]
struct Pass {
    /// When its vouches were last recorded.
    recorded: Instant,
    ends: Ends,
}

/// Until when what a pass ending at `ends` lets through is vouched for, from now.
fn vouched_until(ends: Ends) -> SystemTime {
    let kept = SystemTime::now() + VOUCHES_KEPT;
    ends.map_or(kept, |ends| ends.min(kept))
}

/// Why a `[[signatures]]` rule could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("[[signatures]] {prefix:?}: {why}")]
pub struct SigningError {
    prefix: String,
    why: String,
}

impl Signing {
    /// The rules of `policies`, recording what passes let through in `vouches`.
    pub fn new(
        policies: &[SignaturePolicy],
        stats: Option<Arc<SigningStats>>,
        vouches: Arc<dyn MetaStore>,
    ) -> Result<Signing, SigningError> {
        let mut rules = Vec::new();
        for p in policies {
            let error = |why: String| SigningError { prefix: p.prefix().to_string(), why };
            let mut keys = Keyring::default();
            for file in &p.keys {
                keys.add_file(Path::new(file)).map_err(error)?;
            }
            let identity = match p.identity {
                SignatureIdentity::Exact => Identity::Exact,
                SignatureIdentity::Repository => Identity::Repository,
                SignatureIdentity::Any => Identity::Any,
            };
            let signed_prefix = p.signed_prefix.as_deref().map(|s| s.trim_matches('/').to_string());
            let fingerprint = Digest::sha256_of(
                format!("{:?}", (p.prefix(), &p.upstream, &signed_prefix, p.require, identity, keys.digest()))
                    .as_bytes(),
            )
            .hex()
            .to_string();
            rules.push(SigningRule {
                prefix: p.prefix().to_string(),
                upstream: p.upstream.clone(),
                signed_prefix,
                keys,
                require: p.require,
                identity,
                fingerprint,
            });
        }
        // Rules naming an upstream first, then the longest prefix: the first covering rule
        // governs.
        rules.sort_by_key(|r| (r.upstream.is_none(), std::cmp::Reverse(r.prefix.len())));
        Ok(Signing {
            rules,
            passed: quick_cache::sync::Cache::new(VERDICTS_REMEMBERED),
            admitted: quick_cache::sync::Cache::new(VERDICTS_REMEMBERED),
            refused: quick_cache::sync::Cache::new(REFUSALS_REMEMBERED),
            admitted_blobs: quick_cache::sync::Cache::new(VERDICTS_REMEMBERED),
            vouches,
            vouches_pruned: Mutex::new(None),
            stats: stats.unwrap_or_default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule governing `name` routed to `resolved`: one naming an upstream the route
    /// serves from, else the longest prefix covering the name by whole components.
    pub fn rule_for(&self, name: &RepoName, resolved: &Resolved) -> Option<(usize, &SigningRule)> {
        self.rules.iter().enumerate().find(|(_, r)| {
            covers(&r.prefix, name)
                && r.upstream.as_deref().is_none_or(|u| resolved.sources.iter().any(|(s, _)| s.upstream() == Some(u)))
        })
    }

    /// Whether `manifest`, served for `name` (the client's name) by `reference` by the
    /// source at position `answered` of `resolved`, may be served: `DENIED`, saying what
    /// was missing, when a requiring rule covers the name and no trusted key signed it for
    /// this name. Only the answering source's signatures and name count.
    pub async fn admit(
        &self,
        resolved: &Resolved,
        answered: usize,
        name: &RepoName,
        reference: &Reference,
        manifest: &ManifestRecord,
        ask: &Ask,
    ) -> Result<(), OciError> {
        let Some((rule_index, rule)) = self.rule_for(name, resolved) else { return Ok(()) };
        let digest = &manifest.digest;
        let key = (rule_index, resolved.matched, name.clone(), tag_of(reference).cloned(), digest.clone());
        if let Some(pass) = self.passed.get(&key) {
            if pass.ends.is_none_or(|ends| ends > SystemTime::now()) {
                if pass.recorded.elapsed() > VOUCHES_RENEWED {
                    self.pass(key, resolved, name, manifest, pass.ends).await;
                }
                return Ok(());
            }
            // Its key expired, or the vouch it came by ended: checked again as if new.
            self.passed.remove(&key);
        }
        if key.3.is_none()
            && let Some(until) = self.was_vouched(Vouch::Manifest, rule_index, resolved, name, digest).await
        {
            self.pass(key, resolved, name, manifest, Some(until)).await;
            return Ok(());
        }
        let source = resolved.only(answered);
        if let Some((at, what)) = self.refused.get(&key)
            && at.elapsed() < REFUSAL_REMEMBERED
        {
            return self.refuse(&source, rule, name, digest, what).await;
        }
        if is_signature_artifact(manifest, reference) {
            self.pass(key, resolved, name, manifest, None).await;
            return Ok(());
        }
        self.stats.checked.fetch_add(1, Ordering::Relaxed);
        let names = rule.names(name, &source);
        let check = Check { resolved: &source, rule, ask, names: names.iter().map(String::as_str).collect() };
        let mut reasons = Vec::new();
        if let Some(ends) = self.vouched(&check, digest, key.3.as_ref().map(Tag::as_str), &mut reasons).await? {
            self.pass(key, resolved, name, manifest, ends).await;
            return Ok(());
        }
        // A hosted platform manifest of a signed index, its index not pulled through this
        // route lately.
        if key.3.is_none()
            && let Some(ends) = self.parent_passes(rule_index, &check, name, digest).await?
        {
            self.pass(key, resolved, name, manifest, ends).await;
            return Ok(());
        }
        let what = if reasons.is_empty() { "no signatures were found".to_string() } else { reasons.join("; ") };
        self.refused.insert(key, (Instant::now(), what.clone()));
        self.refuse(&source, rule, name, digest, what).await
    }

    /// What a rule does with a manifest no trusted key signed for the name: a requiring
    /// one refuses it and drops it from the source that keeps it for another (a cache); an
    /// auditing one serves it, said and counted.
    async fn refuse(
        &self,
        source: &Resolved,
        rule: &SigningRule,
        name: &RepoName,
        digest: &Digest,
        what: String,
    ) -> Result<(), OciError> {
        if !rule.require {
            self.stats.unsigned_served.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%name, %digest, prefix = rule.prefix, "serving a manifest no trusted key signed ({what})");
            return Ok(());
        }
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        for (kept_by, source_name) in &source.sources {
            kept_by.forget(source_name, digest).await;
        }
        Err(OciError::new(
            ErrorCode::Denied,
            format!("{name}@{digest} is not signed by a key trusted for {}: {what}", rule.covering()),
        ))
    }

    /// Something that may be a signature arrived for `name` here (a signature, a manifest
    /// such as a `.sig` one): the refusals remembered are forgotten, so it counts at once.
    pub fn may_have_signed(&self, name: &RepoName) {
        if self.rules.iter().any(|r| covers(&r.prefix, name)) {
            self.refused.clear();
        }
    }

    /// A manifest a requiring rule covers is served by another server (a redirect-only
    /// route), where its signatures cannot be checked: refused under a requiring rule.
    pub fn admit_redirect(&self, resolved: &Resolved, name: &RepoName) -> Result<(), OciError> {
        match self.rule_for(name, resolved) {
            Some((_, rule)) if rule.require => Err(OciError::new(
                ErrorCode::Denied,
                format!(
                    "signatures are required for {name}, and its route sends clients elsewhere for manifests, where they cannot be checked"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether an index listing `digest` in the checked source passes its rule (by digest:
    /// its repository must match, any tag), and when that pass ends.
    async fn parent_passes(
        &self,
        rule_index: usize,
        check: &Check<'_>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Ends>, OciError> {
        for (source, source_name) in &check.resolved.sources {
            for parent in source.parents(source_name, digest, PARENTS_READ).await? {
                let key = (rule_index, check.resolved.matched, name.clone(), None, parent.clone());
                if let Some(pass) = self.passed.get(&key)
                    && pass.ends.is_none_or(|ends| ends > SystemTime::now())
                {
                    return Ok(Some(pass.ends));
                }
                if let Some(ends) = self.vouched(check, &parent, None, &mut Vec::new()).await? {
                    return Ok(Some(ends));
                }
            }
        }
        Ok(None)
    }

    /// Whether a signature of `digest` vouches under the check's rule for one of its names,
    /// pulled by `tag`, and until when (its key's expiry); why each one found does not goes
    /// to `reasons`. Simple signatures are looked at first: one that vouches spares the
    /// lookups of cosign's. A place that cannot be read does not hide the other; when
    /// neither vouches, its failure is the answer (a 503, not a refusal that would blame
    /// the image).
    async fn vouched(
        &self,
        check: &Check<'_>,
        digest: &Digest,
        tag: Option<&str>,
        reasons: &mut Vec<String>,
    ) -> Result<Option<Ends>, OciError> {
        let mut failure = None;
        for stage in [Family::Simple, Family::Cosign] {
            let evidence = match stage {
                Family::Simple => self.simple_evidence(check.resolved, check.rule, digest, check.ask).await,
                Family::Cosign => self.cosign_evidence(check.resolved, check.rule, digest, check.ask).await,
            };
            let evidence = match evidence {
                Ok(evidence) => evidence,
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            };
            for e in &evidence {
                match &e.outcome {
                    Ok(v) => match vouches(v, digest, check.rule.identity, &check.names, tag) {
                        Ok(()) => return Ok(Some(v.key_expires)),
                        Err(why) => reasons.push(format!("{} {} by {}: {why}", e.family, e.origin, v.signer)),
                    },
                    Err(why) => reasons.push(format!("{} {}: {why}", e.family, e.origin)),
                }
            }
        }
        failure.map_or(Ok(None), Err)
    }

    /// Remembers a pass ending at `ends`, and admits what it lets through after it (the
    /// manifests an index lists, the blobs an image needs) here and, recorded as vouches,
    /// on every node; never past the pass's end.
    async fn pass(&self, key: PassKey, resolved: &Resolved, name: &RepoName, manifest: &ManifestRecord, ends: Ends) {
        let (rule_index, matched) = (key.0, key.1);
        self.passed.insert(key, Pass { recorded: Instant::now(), ends });
        let Ok(parsed) = ParsedManifest::parse(Some(&manifest.media_type), &manifest.bytes) else { return };
        let children: Vec<Digest> = parsed.manifests.iter().map(|m| m.digest.clone()).collect();
        let blobs: Vec<Digest> = parsed.required_blobs().map(|b| b.digest.clone()).collect();
        let until = vouched_until(ends);
        // As in the store, the later end holds: another pass may need the same blob longer.
        let admit = |admitted: &quick_cache::sync::Cache<_, SystemTime>, digest: &Digest| {
            let key = (rule_index, matched, name.clone(), digest.clone());
            let later = admitted.get(&key).map_or(until, |known: SystemTime| known.max(until));
            admitted.insert(key, later);
        };
        for child in &children {
            admit(&self.admitted, child);
        }
        for blob in &blobs {
            admit(&self.admitted_blobs, blob);
        }
        for (vouch, digests) in [(Vouch::Manifest, children), (Vouch::Blob, blobs)] {
            if digests.is_empty() {
                continue;
            }
            let scope = self.scope(vouch, rule_index, resolved);
            if let Err(e) = self.vouches.record_vouches(&scope, name, &digests, until).await {
                tracing::warn!(%name, digest = %manifest.digest, "signature pass not recorded for other nodes: {e}");
            }
        }
        self.prune_vouches();
    }

    /// Until when a pass here or on another node lets `digest` through for `name` on this
    /// route, if one does.
    async fn was_vouched(
        &self,
        vouch: Vouch,
        rule_index: usize,
        resolved: &Resolved,
        name: &RepoName,
        digest: &Digest,
    ) -> Option<SystemTime> {
        let key = (rule_index, resolved.matched, name.clone(), digest.clone());
        let admitted = match vouch {
            Vouch::Manifest => &self.admitted,
            Vouch::Blob => &self.admitted_blobs,
        };
        if let Some(until) = admitted.get(&key) {
            if until > SystemTime::now() {
                return Some(until);
            }
            admitted.remove(&key);
        }
        let scope = self.scope(vouch, rule_index, resolved);
        match self.vouches.vouched(&scope, name, digest).await {
            Ok(Some(until)) => {
                admitted.insert(key, until);
                Some(until)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%name, %digest, "recorded signature passes not read: {e}");
                None
            }
        }
    }

    /// Where the vouches of a rule on a route are recorded: the same on every node running
    /// the same rules and routes, whatever their order.
    fn scope(&self, vouch: Vouch, rule_index: usize, resolved: &Resolved) -> String {
        let route: Vec<(String, bool)> = resolved.sources.iter().map(|(s, _)| (s.label(), s.caches())).collect();
        let what = match vouch {
            Vouch::Manifest => "manifest",
            Vouch::Blob => "blob",
        };
        let rule = &self.rules[rule_index].fingerprint;
        Digest::sha256_of(format!("{what} {rule} {:?} {route:?}", resolved.matched).as_bytes()).hex().to_string()
    }

    /// Deletes the vouches that ended, at most once per [`VOUCHES_RENEWED`] per node.
    fn prune_vouches(&self) {
        {
            let mut pruned = self.vouches_pruned.lock().unwrap_or_else(|p| p.into_inner());
            if pruned.is_some_and(|at| at.elapsed() < VOUCHES_RENEWED) {
                return;
            }
            *pruned = Some(Instant::now());
        }
        let vouches = self.vouches.clone();
        tokio::spawn(async move {
            match vouches.forget_vouches().await {
                Ok(n) => tracing::debug!("{n} signature vouches expired"),
                Err(e) => tracing::warn!("expired signature vouches not deleted: {e}"),
            }
        });
    }

    /// Whether a blob GET of `name` may go on: under a requiring rule, a pull-through cache
    /// fetches (and keeps) only the blobs of manifests that passed, so nothing a signature
    /// did not vouch for is cached or served by digest alone. Blobs a cache already holds,
    /// and blobs of other sources, are not held back.
    pub async fn admit_blob(
        &self,
        resolved: &Resolved,
        name: &RepoName,
        digest: &Digest,
        ask: &Ask,
    ) -> Result<(), OciError> {
        if !resolved.sources.iter().any(|(source, _)| source.caches()) {
            return Ok(());
        }
        let Some((rule_index, rule)) = self.rule_for(name, resolved) else { return Ok(()) };
        if !rule.require || self.was_vouched(Vouch::Blob, rule_index, resolved, name, digest).await.is_some() {
            return Ok(());
        }
        for (source, source_name) in &resolved.sources {
            if source.caches() {
                if source.holds(source_name, digest).await? {
                    return Ok(());
                }
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(OciError::new(
                    ErrorCode::Denied,
                    format!(
                        "{name}@{digest} is not a blob of an image whose signature was checked here; pull the image's manifest first"
                    ),
                ));
            }
            if matches!(source.blob_size(source_name, digest, ask).await?, crate::Found::Here(_)) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The rule that governs `name`, in a line (for `tessera explain`).
    pub fn describe(&self, name: &RepoName, resolved: &Resolved) -> String {
        match self.rule_for(name, resolved) {
            None => "signatures: not checked (no [[signatures]] rule covers this name)".into(),
            Some((_, rule)) => format!(
                "signatures: {} by [[signatures]] {} (identity {}), trusting {}",
                if rule.require { "required" } else { "checked, not required," },
                rule.covering(),
                match rule.identity {
                    Identity::Exact => "exact",
                    Identity::Repository => "repository",
                    Identity::Any => "any",
                },
                rule.keys.describe().join(", ")
            ),
        }
    }

    /// Each signature of `manifest` the route holds, who made it, what it claims and
    /// whether it vouches for this pull; then what the rule decides (for `tessera explain
    /// --live`).
    pub async fn explain(
        &self,
        resolved: &Resolved,
        answered: usize,
        name: &RepoName,
        reference: &Reference,
        manifest: &ManifestRecord,
    ) -> Result<Vec<String>, OciError> {
        let source = resolved.only(answered);
        let ask = Ask::default();
        let unchecked = SigningRule {
            prefix: String::new(),
            upstream: None,
            signed_prefix: None,
            keys: Keyring::default(),
            require: false,
            identity: Identity::Any,
            fingerprint: String::new(),
        };
        let covering = self.rule_for(name, resolved);
        let rule = covering.map_or(&unchecked, |(_, r)| r);
        let names = rule.names(name, &source);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let tag = tag_of(reference).map(Tag::as_str);
        let mut lines = Vec::new();
        for e in self.evidence(&source, rule, &manifest.digest, &ask).await? {
            let line = match (&e.outcome, covering) {
                (_, None) => format!("{} {}: found (no rule checks it)", e.family, e.origin),
                (Ok(v), Some(_)) => {
                    let claimed = v.claim.reference.as_ref().map_or("no name".to_string(), ToString::to_string);
                    match vouches(v, &manifest.digest, rule.identity, &names, tag) {
                        Ok(()) => format!(
                            "{} {}: signed by {} for {claimed}; vouches for this pull",
                            e.family, e.origin, v.signer
                        ),
                        Err(why) => format!(
                            "{} {}: signed by {} for {claimed}; does not vouch: {why}",
                            e.family, e.origin, v.signer
                        ),
                    }
                }
                (Err(why), Some(_)) => format!("{} {}: {why}", e.family, e.origin),
            };
            lines.push(line);
        }
        if lines.is_empty() {
            lines.push("no signatures found".into());
        }
        if covering.is_some() {
            let verdict = match self.admit(resolved, answered, name, reference, manifest, &ask).await {
                Ok(()) => "a pull by this reference is served".to_string(),
                Err(e) => format!("a pull by this reference is refused: {}", e.message),
            };
            lines.push(verdict);
        }
        Ok(lines)
    }

    /// Every signature of `digest` the route's sources hold, checked against `rule`'s keys.
    pub async fn evidence(
        &self,
        resolved: &Resolved,
        rule: &SigningRule,
        digest: &Digest,
        ask: &Ask,
    ) -> Result<Vec<Evidence>, OciError> {
        let mut found = self.simple_evidence(resolved, rule, digest, ask).await?;
        found.extend(self.cosign_evidence(resolved, rule, digest, ask).await?);
        Ok(found)
    }

    async fn simple_evidence(
        &self,
        resolved: &Resolved,
        rule: &SigningRule,
        digest: &Digest,
        ask: &Ask,
    ) -> Result<Vec<Evidence>, OciError> {
        let simple = resolved.first(|source, n| source.signatures(n, digest, ask)).await;
        Ok(here_or_none(simple)?
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| Evidence {
                family: Family::Simple,
                origin: format!("signature-{}", i + 1),
                outcome: rule.keys.verify_simple(&s.content),
            })
            .collect())
    }

    async fn cosign_evidence(
        &self,
        resolved: &Resolved,
        rule: &SigningRule,
        digest: &Digest,
        ask: &Ask,
    ) -> Result<Vec<Evidence>, OciError> {
        let mut found = Vec::new();
        for (manifest, origin) in self.cosign_manifests(resolved, digest, ask).await? {
            self.cosign_layers(resolved, rule, &manifest, &origin, ask, &mut found).await?;
        }
        Ok(found)
    }

    /// The cosign signature manifests of `digest`: under its `.sig` tag, and its referrers
    /// of cosign's artifact type.
    async fn cosign_manifests(
        &self,
        resolved: &Resolved,
        digest: &Digest,
        ask: &Ask,
    ) -> Result<Vec<(ManifestRecord, String)>, OciError> {
        let mut out = Vec::new();
        let any = Accept::any();
        let tag = tessera_trust::cosign_tag(digest);
        if let Ok(tag_ref) = tag.parse::<Tag>() {
            let by_tag = Reference::Tag(tag_ref);
            let served = resolved.first(|source, n| source.manifest(n, &by_tag, &any, ask)).await;
            if let Some(s) = here_or_none(served)? {
                out.push((s.manifest, format!("tag {tag}")));
            }
        }
        let referrers = resolved.first(|source, n| source.referrers(n, digest, Some(COSIGN_ARTIFACT_TYPE), ask)).await;
        let listed = here_or_none(referrers)?
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.index).ok())
            .and_then(|index| index["manifests"].as_array().cloned())
            .unwrap_or_default();
        for d in listed.iter().filter(|d| d["artifactType"] == COSIGN_ARTIFACT_TYPE) {
            if out.len() >= COSIGN_MANIFESTS_READ {
                break;
            }
            let Some(referrer) = d["digest"].as_str().and_then(|d| d.parse::<Digest>().ok()) else { continue };
            if out.iter().any(|(m, _)| m.digest == referrer) {
                continue;
            }
            let by_digest = Reference::Digest(referrer.clone());
            let served = resolved.first(|source, n| source.manifest(n, &by_digest, &any, ask)).await;
            if let Some(s) = here_or_none(served)? {
                out.push((s.manifest, format!("referrer {referrer}")));
            }
        }
        Ok(out)
    }

    /// Checks each signature layer of a cosign signature manifest.
    async fn cosign_layers(
        &self,
        resolved: &Resolved,
        rule: &SigningRule,
        manifest: &ManifestRecord,
        origin: &str,
        ask: &Ask,
        found: &mut Vec<Evidence>,
    ) -> Result<(), OciError> {
        let Ok(parsed) = ParsedManifest::parse(Some(&manifest.media_type), &manifest.bytes) else {
            found.push(Evidence {
                family: Family::Cosign,
                origin: origin.to_string(),
                outcome: Err("not a manifest".into()),
            });
            return Ok(());
        };
        let layers = parsed.layers.iter().filter(|l| l.annotations.contains_key(COSIGN_SIGNATURE_ANNOTATION));
        for layer in layers.take(COSIGN_LAYERS_READ) {
            let origin = format!("{origin} layer {}", layer.digest);
            let outcome = match self.payload(resolved, &layer.digest, layer.size, ask).await? {
                Ok(payload) => rule.keys.verify_cosign(&payload, &layer.annotations[COSIGN_SIGNATURE_ANNOTATION]),
                Err(why) => Err(why),
            };
            found.push(Evidence { family: Family::Cosign, origin, outcome });
        }
        Ok(())
    }

    /// The bytes of a signature payload blob, read through the route (streamed here
    /// whatever the delivery policy says) and checked against its digest.
    async fn payload(
        &self,
        resolved: &Resolved,
        digest: &Digest,
        size: u64,
        ask: &Ask,
    ) -> Result<Result<Vec<u8>, String>, OciError> {
        if size > tessera_trust::PAYLOAD_MAX_BYTES as u64 {
            return Ok(Err(format!("its payload is {size} bytes, more than a signed payload can be")));
        }
        let streamed = Ask { bypass_delivery: true, ..ask.clone() };
        let answer = match resolved.first(|source, n| source.blob(n, digest, None, &streamed)).await {
            Ok(Reply::Here(answer)) => answer,
            Ok(Reply::Redirect(_)) => return Ok(Err("its payload is only served elsewhere".into())),
            Err(e) if is_not_found(&e) => return Ok(Err("its payload blob is missing".into())),
            Err(e) => return Err(e),
        };
        let mut body = answer.read.body;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                tracing::warn!(%digest, "reading a signature payload: {e}");
                OciError::new(ErrorCode::Unavailable, "a signature payload could not be read")
            })?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() > tessera_trust::PAYLOAD_MAX_BYTES {
                return Ok(Err("its payload is larger than a signed payload can be".into()));
            }
        }
        if Digest::of(digest.algorithm(), &bytes) != *digest {
            return Ok(Err("its payload does not match its digest".into()));
        }
        Ok(Ok(bytes))
    }
}

/// What one check looks at: the source that served the manifest, the rule, and the names
/// a signature may claim.
struct Check<'a> {
    resolved: &'a Resolved,
    rule: &'a SigningRule,
    ask: &'a Ask,
    names: Vec<&'a str>,
}

/// Whether `prefix` covers `name` by whole components (`""` covers every name).
fn covers(prefix: &str, name: &RepoName) -> bool {
    prefix.is_empty() || name.as_str().strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn tag_of(reference: &Reference) -> Option<&Tag> {
    match reference {
        Reference::Tag(t) => Some(t),
        Reference::Digest(_) => None,
    }
}

/// Whether `manifest` is a cosign signature manifest, which the clients that verify must
/// read, and which carries signed claims and nothing that runs: asked for by its `.sig`
/// tag (or a referrer of cosign's artifact type, by digest), a small config, and layers
/// that are all signature payloads small enough to be one, each with its signature.
fn is_signature_artifact(manifest: &ManifestRecord, reference: &Reference) -> bool {
    let named_as_one = match reference {
        Reference::Tag(t) => tessera_trust::is_cosign_tag(t.as_str()),
        Reference::Digest(_) => {
            manifest.artifact_type.as_deref() == Some(COSIGN_ARTIFACT_TYPE) && manifest.subject.is_some()
        }
    };
    let small = |size: u64| size <= tessera_trust::PAYLOAD_MAX_BYTES as u64;
    named_as_one
        && ParsedManifest::parse(Some(&manifest.media_type), &manifest.bytes).is_ok_and(|p| {
            p.config.as_ref().is_none_or(|c| small(c.size))
                && !p.layers.is_empty()
                && p.layers.iter().all(|l| {
                    l.media_type == tessera_trust::COSIGN_PAYLOAD_MEDIA_TYPE
                        && small(l.size)
                        && l.annotations.contains_key(COSIGN_SIGNATURE_ANNOTATION)
                })
        })
}

/// Whether a verified signature vouches for the manifest `digest` under `names`.
fn vouches(v: &Verified, digest: &Digest, identity: Identity, names: &[&str], tag: Option<&str>) -> Result<(), String> {
    if v.claim.manifest_digest != *digest {
        return Err(format!("it signs {}, another manifest", v.claim.manifest_digest));
    }
    identity.accepts(v.claim.reference.as_ref(), names, tag)
}

fn is_not_found(e: &OciError) -> bool {
    matches!(e.code, ErrorCode::ManifestUnknown | ErrorCode::BlobUnknown | ErrorCode::NameUnknown)
}

/// A found answer's content; `None` when no source has it or one sends clients elsewhere.
fn here_or_none<T>(answer: Result<Reply<T>, OciError>) -> Result<Option<T>, OciError> {
    match answer {
        Ok(Reply::Here(v)) => Ok(Some(v)),
        Ok(Reply::Redirect(_)) => Ok(None),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
