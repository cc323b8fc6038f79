//! Topic access control from an ACL file (`acl_file`), in mosquitto's format so an existing
//! `acl_file` works unchanged:
//!
//! ```text
//! # Rules before any `user` line apply to clients without a username.
//! topic read public/#
//! user alice
//! topic readwrite fleet/#        # `topic fleet/#` means the same
//! topic deny fleet/secret/#
//! # Patterns apply to every client; %u is the username, %c the client identifier.
//! pattern write devices/%c/telemetry
//! pattern read devices/%c/commands/#
//! ```
//!
//! With an ACL file, everything not allowed is denied. A `deny` rule that matches wins over
//! any allow rule (mosquitto 2's order). Checks, all sans-IO in the broker core:
//! - PUBLISH needs `write` on its topic (denied: 5.0 gets Not Authorized in its PUBACK/PUBREC,
//!   3.1.1 has no way to say it and is acknowledged, as mosquitto does; nothing is routed);
//! - SUBSCRIBE needs a `read` rule whose filter covers the whole requested filter (denied:
//!   the SUBACK carries Not Authorized, 3.1.1 its failure code);
//! - every delivery needs `read` on the message's topic, so a subscription to `#` allowed by
//!   a broader rule never leaks a topic a `deny` rule protects. Retained messages likewise,
//!   and messages queued for a persistent session are checked again when they are sent.
//!
//! A client's rules are resolved once at CONNECT ([`Acl::rules_for`]), so the checks cost a
//! few topic matches, not a file lookup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::router::filter_matches;

/// An ACL file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a rule.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, want: Want) -> bool {
        matches!(
            (self, want),
            (Access::ReadWrite, _) | (Access::Read, Want::Read) | (Access::Write, Want::Write)
        )
    }
}

/// The access a check asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Read,
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Rules for clients without a username.
    anonymous: Vec<Rule>,
    /// Rules per username, in file order.
    users: Vec<(String, Vec<Rule>)>,
    /// `pattern` rules for every client, with `%u`/`%c` unsubstituted.
    patterns: Vec<Rule>,
}

impl Acl {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(&text, path)
    }

    /// Parses the text of an ACL file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<usize> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| AclError::Line {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a username".into()));
                    }
                    let at = match acl.users.iter().position(|(u, _)| u == rest) {
                        Some(at) => at,
                        None => {
                            acl.users.push((rest.to_owned(), Vec::new()));
                            acl.users.len() - 1
                        }
                    };
                    user = Some(at);
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(err)?;
                    match (keyword, user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(at)) => acl.users[at].1.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword `{other}` (expected user, topic or pattern)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to one client, with its patterns' `%u` and `%c` filled in.
    pub fn rules_for(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let mut rules: Vec<Rule> = match username {
            None => self.anonymous.clone(),
            Some(u) => self
                .users
                .iter()
                .find(|(name, _)| name == u)
                .map(|(_, r)| r.clone())
                .unwrap_or_default(),
        };
        for p in &self.patterns {
            // A pattern naming %u does not apply to a client without a username, nor one
            // whose identifiers would inject levels or wildcards into the filter.
            if p.filter.contains("%u") && username.is_none() {
                continue;
            }
            let unsafe_id = |s: &str| s.contains(['/', '+', '#']);
            if (p.filter.contains("%u") && username.is_some_and(unsafe_id))
                || (p.filter.contains("%c") && unsafe_id(client_id))
            {
                continue;
            }
            let filter = p
                .filter
                .replace("%u", username.unwrap_or(""))
                .replace("%c", client_id);
            rules.push(Rule {
                access: p.access,
                filter,
            });
        }
        ClientAcl {
            rules: Arc::from(rules),
            username: username.map(Arc::from),
        }
    }
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (access, filter) = match first {
        "read" => (Access::Read, tail.trim()),
        "write" => (Access::Write, tail.trim()),
        "readwrite" => (Access::ReadWrite, tail.trim()),
        "deny" => (Access::Deny, tail.trim()),
        _ => (Access::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err("a rule needs a topic filter".into());
    }
    if !valid_filter(filter) {
        return Err(format!("`{filter}` is not a valid topic filter"));
    }
    Ok(Rule {
        access,
        filter: filter.to_owned(),
    })
}

fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['#', '+']),
    })
}

/// The rules of one connected client ([`Acl::rules_for`]); cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Arc<[Rule]>,
    /// The username they were resolved for (to resolve them again from a reloaded file).
    username: Option<Arc<str>>,
}

impl ClientAcl {
    /// The username these rules were resolved for.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    fn allows(&self, want: Want, topic: &str) -> bool {
        let matching = || {
            self.rules
                .iter()
                .filter(|r| filter_matches(&r.filter, topic))
        };
        !matching().any(|r| r.access == Access::Deny) && matching().any(|r| r.access.grants(want))
    }

    /// May the client publish to `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        self.allows(Want::Write, topic)
    }

    /// May the client receive a message on `topic`?
    pub fn may_receive(&self, topic: &str) -> bool {
        self.allows(Want::Read, topic)
    }

    /// May the client subscribe to `filter`? A read rule must cover every topic the filter
    /// matches, and no deny rule may cover all of them (a deny covering only some of them
    /// is enforced message by message with [`ClientAcl::may_receive`]).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let covering = || {
            self.rules
                .iter()
                .filter(|r| filter_covers(&r.filter, filter))
        };
        !covering().any(|r| r.access == Access::Deny)
            && covering().any(|r| r.access.grants(Want::Read))
    }
}

/// Whether every topic `sub` matches is also matched by `acl`.
fn filter_covers(acl: &str, sub: &str) -> bool {
    if sub.starts_with('$') && acl.starts_with(['+', '#']) {
        // A wildcard first level never matches `$` topics.
        return false;
    }
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y && y != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text, Path::new("acl")).expect("valid ACL")
    }

    #[test]
    fn matching_and_covering_follow_mqtt_wildcards() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/+/c", "a/+/#"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(!filter_covers("$SYS/x", "#"));
        assert!(filter_covers("$SYS/#", "$SYS/broker/+"));
    }

    #[test]
    fn users_anonymous_and_patterns_get_their_own_rules() {
        let a = acl(
            "# public\ntopic read public/#\n\nuser alice\ntopic fleet/#\ntopic deny fleet/secret/#\n\
             user bob\ntopic write fleet/bob\npattern write devices/%c/telemetry\n\
             pattern read users/%u/#\n",
        );
        let anon = a.rules_for(None, "dev-1");
        assert!(anon.may_receive("public/news") && !anon.may_publish("public/news"));
        assert!(anon.may_publish("devices/dev-1/telemetry"));
        assert!(!anon.may_publish("devices/dev-2/telemetry"));
        assert!(!anon.may_subscribe("users/#"), "%u needs a username");
        let alice = a.rules_for(Some("alice"), "a1");
        assert!(alice.may_publish("fleet/1") && alice.may_receive("fleet/1"));
        assert!(!alice.may_receive("fleet/secret/key") && !alice.may_publish("fleet/secret/x"));
        assert!(
            !alice.may_receive("public/news"),
            "anonymous rules are not alice's"
        );
        assert!(
            alice.may_subscribe("fleet/#"),
            "deny covers only part of it"
        );
        assert!(!alice.may_subscribe("fleet/secret/#"));
        assert!(alice.may_subscribe("users/alice/inbox"));
        assert!(!alice.may_subscribe("users/bob/inbox"));
        let bob = a.rules_for(Some("bob"), "b1");
        assert!(bob.may_publish("fleet/bob") && !bob.may_receive("fleet/bob"));
        assert!(!bob.may_subscribe("fleet/#"));
        let stranger = a.rules_for(Some("carol"), "c1");
        assert!(!stranger.may_publish("fleet/1") && stranger.may_publish("devices/c1/telemetry"));
        // Identifiers with separators or wildcards do not widen a pattern.
        let sneaky = a.rules_for(None, "x/#");
        assert!(!sneaky.may_publish("devices/x/#/telemetry"));
        assert!(!sneaky.may_publish("devices/x/y/telemetry"));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, needle) in [
            ("topic\n", "acl:1: a rule needs a topic filter"),
            ("user\n", "acl:1: `user` needs a username"),
            (
                "\ntopic read a/#/b\n",
                "acl:2: `a/#/b` is not a valid topic filter",
            ),
            ("topic read a+\n", "not a valid topic filter"),
            ("allow all\n", "unknown keyword `allow`"),
        ] {
            let err = Acl::parse(text, Path::new("acl"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
