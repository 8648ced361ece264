//! Retention: rules per name prefix that untag old content, applied by each garbage
//! collection pass (and `tessera gc`) before it collects, so what they untag is collected
//! in the same pass once nothing else keeps it.
//!
//! A repository follows the rule with the longest prefix covering it. Of its tags matching
//! the rule's pattern and none of its protect patterns, newest first (by when each was
//! last pointed at a new manifest), a tag goes when every condition the rule gives says so:
//! it is not among the `keep_newest`, and it is older than `older_than`. A tag is untagged
//! only while it still points where it was seen pointing: a push that moves it meanwhile
//! wins.

use std::time::{Duration, SystemTime};

use tessera_spec::name::prefix_covers;
use tessera_store::{StoreResult, TagRecord};
use wildmatch::WildMatch;

use crate::Registry;

/// One retention rule.
#[derive(Debug, Clone)]
pub struct RetentionRule {
    pub prefix: String,
    /// Which tags the rule looks at (`*` and `?` wildcards).
    pub matching: String,
    /// Keep this many of the newest matching tags in each repository.
    pub keep_newest: Option<usize>,
    /// Keep matching tags pushed more recently than this.
    pub older_than: Option<Duration>,
    /// Tags never untagged (`*` and `?` wildcards).
    pub protect: Vec<String>,
}

/// A tag a rule untagged (or, in a dry run, would).
pub type Untagged = TagRecord;

impl RetentionRule {
    /// Of one repository's tags, those this rule untags.
    fn choose(&self, tags: &[&TagRecord], now: SystemTime) -> Vec<TagRecord> {
        let matching = WildMatch::new(&self.matching);
        let protect: Vec<WildMatch> = self.protect.iter().map(|p| WildMatch::new(p)).collect();
        let mut candidates: Vec<&&TagRecord> = tags
            .iter()
            .filter(|t| matching.matches(t.tag.as_str()) && !protect.iter().any(|p| p.matches(t.tag.as_str())))
            .collect();
        // Newest first; equal times by tag, so the choice does not depend on store order.
        candidates.sort_by(|a, b| b.pushed.cmp(&a.pushed).then_with(|| b.tag.as_str().cmp(a.tag.as_str())));
        candidates
            .into_iter()
            .enumerate()
            .filter(|(i, t)| {
                let beyond_newest = self.keep_newest.is_none_or(|n| *i >= n);
                let old = self.older_than.is_none_or(|age| now.duration_since(t.pushed).unwrap_or_default() > age);
                beyond_newest && old
            })
            .map(|(_, t)| (*t).clone())
            .collect()
    }
}

impl Registry {
    /// Applies `rules` to every hosted repository they cover; returns the tags untagged.
    pub async fn apply_retention(&self, rules: &[RetentionRule]) -> StoreResult<Vec<Untagged>> {
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let now = SystemTime::now();
        let mut by_length: Vec<&RetentionRule> = rules.iter().collect();
        by_length.sort_by_key(|r| std::cmp::Reverse(r.prefix.trim_matches('/').len()));
        let mut untagged = Vec::new();
        // Each rule's repositories are read on their own: a rule over a few repositories
        // does not read every tag of the registry.
        for (i, rule) in by_length.iter().enumerate() {
            let tags = self.meta.tags_under(&rule.prefix).await?;
            // Repositories a longer prefix covers follow that rule instead.
            let governed = |t: &&TagRecord| !by_length[..i].iter().any(|r| prefix_covers(&r.prefix, t.repo.as_str()));
            let tags: Vec<&TagRecord> = tags.iter().filter(governed).collect();
            for repo in tags.chunk_by(|a, b| a.repo == b.repo) {
                for t in rule.choose(repo, now) {
                    if self.meta.untag_if(&t.repo, &t.tag, &t.digest).await? {
                        untagged.push(t);
                    }
                }
            }
        }
        untagged.sort_by(|a, b| (a.repo.as_str(), a.tag.as_str()).cmp(&(b.repo.as_str(), b.tag.as_str())));
        Ok(untagged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, age_days: u64, now: SystemTime) -> TagRecord {
        TagRecord {
            repo: "team/app".parse().unwrap(),
            tag: name.parse().unwrap(),
            digest: tessera_spec::Digest::sha256_of(name.as_bytes()),
            pushed: now - Duration::from_secs(age_days * 86_400),
        }
    }

    fn rule(keep: Option<usize>, older_days: Option<u64>) -> RetentionRule {
        RetentionRule {
            prefix: "team".into(),
            matching: "*".into(),
            keep_newest: keep,
            older_than: older_days.map(|d| Duration::from_secs(d * 86_400)),
            protect: vec!["latest".into(), "v*".into()],
        }
    }

    #[test]
    fn keeps_the_newest_protects_patterns_and_untags_only_what_every_condition_allows() {
        let now = SystemTime::now();
        let tags: Vec<TagRecord> = [("b1", 1), ("b2", 2), ("b3", 10), ("b4", 40), ("latest", 90), ("v1.0", 90)]
            .into_iter()
            .map(|(n, age)| tag(n, age, now))
            .collect();
        let refs: Vec<&TagRecord> = tags.iter().collect();
        let names = |r: &RetentionRule| r.choose(&refs, now).into_iter().map(|t| t.tag.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&rule(Some(2), None)), ["b3", "b4"], "the two newest stay; protected tags never go");
        assert_eq!(names(&rule(None, Some(7))), ["b3", "b4"]);
        assert_eq!(names(&rule(Some(3), Some(30))), ["b4"], "beyond the newest three and older than 30 days");
        let only_b = RetentionRule { matching: "b?".into(), ..rule(Some(0), None) };
        assert_eq!(names(&only_b), ["b1", "b2", "b3", "b4"]);
    }
}
