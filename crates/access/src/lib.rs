//! Who may do what: identities from an htpasswd file (bcrypt), and the policy that says
//! which of them may pull, push or delete under each repository-name prefix. No HTTP here:
//! the http crate turns requests into an [`Action`] on a name and asks [`Access::decide`].

pub mod htpasswd;
pub mod session;
pub mod token;

use std::collections::HashMap;

pub use htpasswd::{FailedLogins, Htpasswd, Logins};

/// The address a per-client limit counts `client` under: an IPv4 address itself, an IPv6
/// address its /64, the block one subscriber usually holds (counting each IPv6 address
/// apart would let one subscriber be millions of clients).
pub fn subscriber(client: std::net::IpAddr) -> std::net::IpAddr {
    match client.to_canonical() {
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// What a request wants to do with a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Not allowed for anonymous: log in (401).
    LogIn,
    /// Known, but not allowed (403).
    Deny,
}

/// One rule: under `prefix`, who may do each action. Members are user names, `*` (any
/// logged-in user) or `anonymous`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub prefix: String,
    pub allow: HashMap<Action, Vec<String>>,
}

/// The policy: rules tried longest prefix first; a name no rule covers follows the default
/// (any logged-in user may do anything; anonymous nothing).
#[derive(Debug, Clone, Default)]
pub struct Access {
    rules: Vec<Rule>,
    /// Named groups of users; a rule member `@name` means every user of the group.
    groups: HashMap<String, Vec<String>>,
}

impl Access {
    pub fn new(rules: Vec<Rule>) -> Access {
        Access::with_groups(rules, HashMap::new())
    }

    /// Rules whose members may name `groups` as `@group`.
    pub fn with_groups(mut rules: Vec<Rule>, groups: HashMap<String, Vec<String>>) -> Access {
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.trim_matches('/').len()));
        Access { rules, groups }
    }

    fn in_group(&self, group: &str, user: &str) -> bool {
        self.groups.get(group).is_some_and(|members| members.iter().any(|m| m == user))
    }

    /// May `who` do `action` on repository `name`?
    pub fn decide(&self, who: &Identity, action: Action, name: &str) -> Decision {
        let allowed = match self.rules.iter().find(|r| tessera_spec::name::prefix_covers(&r.prefix, name)) {
            Some(rule) => rule.allow.get(&action).is_some_and(|members| {
                members.iter().any(|m| match (m.as_str(), who) {
                    ("anonymous", _) => true,
                    ("*", Identity::User(_)) => true,
                    (member, Identity::User(u)) => match member.strip_prefix('@') {
                        Some(group) => self.in_group(group, u),
                        None => member == u,
                    },
                    _ => false,
                })
            }),
            None => matches!(who, Identity::User(_)),
        };
        match (allowed, who) {
            (true, _) => Decision::Allow,
            (false, Identity::Anonymous) => Decision::LogIn,
            (false, Identity::User(_)) => Decision::Deny,
        }
    }

    /// The actions out of `wanted` that `who` may do on `name` (what a token grants).
    pub fn granted(&self, who: &Identity, name: &str, wanted: &[Action]) -> Vec<Action> {
        wanted.iter().copied().filter(|a| self.decide(who, *a, name) == Decision::Allow).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, pull: &[&str], push: &[&str]) -> Rule {
        let mut allow = HashMap::new();
        allow.insert(Action::Pull, pull.iter().map(|s| s.to_string()).collect());
        allow.insert(Action::Push, push.iter().map(|s| s.to_string()).collect());
        Rule { prefix: prefix.into(), allow }
    }

    #[test]
    fn rules_by_longest_prefix_and_whole_components() {
        let access = Access::new(vec![
            rule("", &["*"], &["admin"]),
            rule("public", &["anonymous"], &["alice"]),
            rule("public/secret", &["bob"], &[]),
        ]);
        let (anon, alice, bob) = (Identity::Anonymous, Identity::User("alice".into()), Identity::User("bob".into()));
        assert_eq!(access.decide(&anon, Action::Pull, "public/app"), Decision::Allow);
        assert_eq!(access.decide(&anon, Action::Push, "public/app"), Decision::LogIn);
        assert_eq!(access.decide(&alice, Action::Push, "public/app"), Decision::Allow);
        assert_eq!(access.decide(&bob, Action::Push, "public/app"), Decision::Deny);
        assert_eq!(access.decide(&alice, Action::Pull, "public/secret/x"), Decision::Deny);
        assert_eq!(access.decide(&bob, Action::Pull, "public/secret/x"), Decision::Allow);
        assert_eq!(access.decide(&anon, Action::Pull, "publicity"), Decision::LogIn, "whole components only");
        assert_eq!(access.decide(&alice, Action::Pull, "team/app"), Decision::Allow);
        assert_eq!(access.decide(&alice, Action::Delete, "team/app"), Decision::Deny);
        assert_eq!(
            access.granted(&alice, "public/app", &[Action::Pull, Action::Push, Action::Delete]),
            vec![Action::Pull, Action::Push]
        );
    }

    #[test]
    fn groups_name_their_members() {
        let mut groups = HashMap::new();
        groups.insert("maintainers".to_string(), vec!["alice".to_string(), "carol".to_string()]);
        let access =
            Access::with_groups(vec![rule("", &["*"], &["@maintainers"]), rule("x", &["@nobody"], &[])], groups);
        let user = |u: &str| Identity::User(u.into());
        assert_eq!(access.decide(&user("alice"), Action::Push, "team/app"), Decision::Allow);
        assert_eq!(access.decide(&user("carol"), Action::Push, "team/app"), Decision::Allow);
        assert_eq!(access.decide(&user("bob"), Action::Push, "team/app"), Decision::Deny);
        assert_eq!(
            access.decide(&user("@maintainers"), Action::Push, "team/app"),
            Decision::Deny,
            "a user named like a group is not one"
        );
        assert_eq!(
            access.decide(&user("alice"), Action::Pull, "x/y"),
            Decision::Deny,
            "an unknown group has no members"
        );
    }

    #[test]
    fn without_rules_logged_in_users_may_do_everything() {
        let access = Access::default();
        assert_eq!(access.decide(&Identity::User("x".into()), Action::Delete, "a"), Decision::Allow);
        assert_eq!(access.decide(&Identity::Anonymous, Action::Pull, "a"), Decision::LogIn);
    }
}
