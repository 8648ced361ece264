//! Delivery in words, for `tessera explain`.

use tessera_spec::{Digest, RepoName};

use super::{Delivery, How};
use crate::source::{Located, Via};

impl Delivery {
    /// In words, for `tessera explain`: where a client is sent for a blob living at `urls`.
    pub fn describe_external(&self, name: &RepoName, urls: &[String]) -> Located {
        match self.allowed_url(name, urls) {
            Some(url) => Located::new(Via::Elsewhere, format!("lives elsewhere: 307 to {url}")),
            None => Located::new(
                Via::Unavailable,
                format!(
                    "lives elsewhere at {}, which the delivery policy of {name} does not allow: 404",
                    urls.join(", ")
                ),
            ),
        }
    }

    /// In words, for `tessera explain`: how a blob of `name` held here is delivered (for
    /// `digest`, or with the layout shown as a template).
    /// The kind is the first step that applies now (a mirrors rule: while one is healthy).
    pub fn describe_local(&self, name: &RepoName, digest: Option<&Digest>) -> Located {
        let mut steps = Vec::new();
        let mut via = None;
        for rule in self.matching(name) {
            let signed = rule.signer.as_ref().map(|s| format!(", {}", s.describe())).unwrap_or_default();
            match &rule.how {
                How::Stream => {
                    steps.push("streamed by this server".to_string());
                    return Located::new(via.unwrap_or(Via::ThisServer), steps.join("; else "));
                }
                How::Cdn(base) => {
                    let url = match digest {
                        Some(d) => rule.url(base, name, d, None).split('?').next().unwrap_or_default().to_string(),
                        None => format!("{base}{}", rule.layout),
                    };
                    steps.push(format!("307 to CDN {url}{signed} (delivery prefix {:?})", rule.prefix));
                    return Located::new(via.unwrap_or(Via::Cdn), steps.join("; else "));
                }
                How::Presigned(ttl) => {
                    steps.push(format!(
                        "307 to a presigned URL of the blob store, valid {}s (delivery prefix {:?})",
                        ttl.as_secs(),
                        rule.prefix
                    ));
                    return Located::new(via.unwrap_or(Via::Presigned), steps.join("; else "));
                }
                How::Mirrors(ms) => {
                    if ms.iter().any(|m| m.healthy()) {
                        via = via.or(Some(Via::Mirror));
                    }
                    let list: Vec<String> = ms
                        .iter()
                        .map(|m| {
                            let nets = if m.config.networks.is_empty() {
                                "all clients".to_string()
                            } else {
                                m.config.networks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                            };
                            format!("{} for {nets}, priority {}", m.base, m.config.priority)
                        })
                        .collect();
                    steps.push(format!(
                        "307 to the nearest healthy mirror{signed} of [{}] (delivery prefix {:?})",
                        list.join("; "),
                        rule.prefix
                    ));
                }
            }
        }
        steps.push("streamed by this server".to_string());
        Located::new(via.unwrap_or(Via::ThisServer), steps.join("; else "))
    }
}
