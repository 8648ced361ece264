//! `[[access]]`: who may pull, push and delete under each name prefix.

use serde::Deserialize;

/// One `[[access]]` rule. Members: user names, `*` (any logged-in user), `anonymous`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccessRule {
    pub prefix: String,
    pub pull: Vec<String>,
    pub push: Vec<String>,
    pub delete: Vec<String>,
}
