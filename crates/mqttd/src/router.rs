//! The subscription trie.
//!
//! `Router<V>` maps topic filters to subscribers. `V` is whatever the broker keeps per
//! subscription (its options); the router only knows levels, wildcards and share groups.
//!
//! Invariants:
//! - A node exists only while it or a descendant holds a subscription (unsubscribe prunes).
//! - A topic whose first level starts with `$` is not matched by a filter whose first level is
//!   `+` or `#` (MQTT 5.0 section 4.7.2, same in 3.1.1 section 4.7.2).
//! - A shared subscription `$share/{group}/{filter}` is stored at `filter`'s node under
//!   `group`; each matching group yields exactly one member per message, chosen round-robin
//!   among the members the caller reports as connected (any member if none is).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A client identifier, shared between the router, the sessions and the store.
pub type ClientId = Arc<str>;

/// The hasher of the broker's hot maps (client ids, topic levels, connection ids): foldhash,
/// several times faster than std's SipHash on short keys, and still seeded per map so a peer
/// cannot aim its client ids or topics at a known hash function.
pub type FastHash = foldhash::fast::RandomState;
/// A `HashMap` with [`FastHash`].
pub type FastMap<K, V> = HashMap<K, V, FastHash>;
/// A `HashSet` with [`FastHash`].
pub type FastSet<K> = HashSet<K, FastHash>;

/// A parsed topic filter: its share group (if any) and the filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSpec<'a> {
    /// `Some(group)` for `$share/group/filter`.
    pub share_group: Option<&'a str>,
    /// The filter without the `$share/group/` prefix.
    pub filter: &'a str,
}

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic name or filter.
    #[error("empty topic")]
    Empty,
    /// A wildcard in a topic name, or a misplaced wildcard in a filter.
    #[error("invalid wildcard")]
    Wildcard,
    /// A NUL character.
    #[error("NUL character in topic")]
    Nul,
    /// A malformed `$share/` filter.
    #[error("malformed shared subscription")]
    Share,
    /// Longer than the configured maximum length.
    #[error("topic too long")]
    TooLong,
    /// More levels than the configured maximum.
    #[error("too many topic levels")]
    TooManyLevels,
}

/// Checks a topic name used in PUBLISH.
pub fn validate_topic_name(
    topic: &str,
    max_len: usize,
    max_levels: usize,
) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > max_len {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if topic.split('/').count() > max_levels {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// Parses and checks a topic filter used in SUBSCRIBE/UNSUBSCRIBE.
pub fn parse_filter(
    raw: &str,
    max_len: usize,
    max_levels: usize,
) -> Result<FilterSpec<'_>, TopicError> {
    if raw.is_empty() {
        return Err(TopicError::Empty);
    }
    if raw.len() > max_len {
        return Err(TopicError::TooLong);
    }
    if raw.contains('\0') {
        return Err(TopicError::Nul);
    }
    let spec = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::Share)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::Share);
            }
            FilterSpec {
                share_group: Some(group),
                filter,
            }
        }
        None => FilterSpec {
            share_group: None,
            filter: raw,
        },
    };
    let levels: Vec<&str> = spec.filter.split('/').collect();
    if levels.len() > max_levels {
        return Err(TopicError::TooManyLevels);
    }
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => return Err(TopicError::Wildcard),
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return Err(TopicError::Wildcard),
            _ => {}
        }
    }
    Ok(spec)
}

/// Does `filter` (without a share prefix) match `topic`? The reference the trie is tested against.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[derive(Debug)]
struct SharedGroup<V> {
    members: Vec<(ClientId, V)>,
    next: usize,
}

#[derive(Debug)]
struct Node<V> {
    children: FastMap<Box<str>, Node<V>>,
    subscribers: FastMap<ClientId, V>,
    shared: FastMap<Box<str>, SharedGroup<V>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: FastMap::default(),
            subscribers: FastMap::default(),
            shared: FastMap::default(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// One subscriber chosen for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'a, V> {
    /// The subscribing client.
    pub client: &'a ClientId,
    /// The subscription's value (options).
    pub value: &'a V,
    /// True when the match came through a shared subscription.
    pub shared: bool,
}

/// The topic trie. See the module documentation for the rules.
#[derive(Debug)]
pub struct Router<V> {
    root: Node<V>,
    count: usize,
}

impl<V> Default for Router<V> {
    fn default() -> Self {
        Router {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<V> Router<V> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions (shared ones counted per member).
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there is no subscription.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces `client`'s subscription to `spec`. Returns true if it already existed.
    pub fn subscribe(&mut self, spec: &FilterSpec<'_>, client: ClientId, value: V) -> bool {
        let mut node = &mut self.root;
        for level in spec.filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let existed = match spec.share_group {
            None => node.subscribers.insert(client, value).is_some(),
            Some(group) => {
                let g = node
                    .shared
                    .entry(group.into())
                    .or_insert_with(|| SharedGroup {
                        members: Vec::new(),
                        next: 0,
                    });
                if let Some(slot) = g.members.iter_mut().find(|(c, _)| *c == client) {
                    slot.1 = value;
                    true
                } else {
                    g.members.push((client, value));
                    false
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes `client`'s subscription to `spec`. Returns true if it existed.
    pub fn unsubscribe(&mut self, spec: &FilterSpec<'_>, client: &str) -> bool {
        let levels: Vec<&str> = spec.filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, spec.share_group, client);
        if removed {
            self.count -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<V>, levels: &[&str], group: Option<&str>, client: &str) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return match group {
                None => node.subscribers.remove(client).is_some(),
                Some(group) => {
                    let Some(g) = node.shared.get_mut(group) else {
                        return false;
                    };
                    let Some(pos) = g.members.iter().position(|(c, _)| &**c == client) else {
                        return false;
                    };
                    g.members.remove(pos);
                    if g.members.is_empty() {
                        node.shared.remove(group);
                    } else if g.next > pos {
                        g.next -= 1;
                    }
                    true
                }
            };
        };
        let Some(child) = node.children.get_mut(*first) else {
            return false;
        };
        let removed = Self::remove_at(child, rest, group, client);
        if child.is_empty() {
            node.children.remove(*first);
        }
        removed
    }

    /// Calls `f` for every subscriber of `topic`: every plain subscription, and one member of each
    /// matching share group (round-robin, preferring members for which `connected` is true).
    /// A client with several matching plain subscriptions is reported once per subscription.
    pub fn route<'a>(
        &'a mut self,
        topic: &str,
        connected: &dyn Fn(&ClientId) -> bool,
        mut f: impl FnMut(Match<'a, V>),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut groups: Vec<&'a mut SharedGroup<V>> = Vec::new();
        Self::collect(&mut self.root, &levels, 0, dollar, &mut f, &mut groups);
        for g in groups {
            let n = g.members.len();
            let start = g.next % n;
            let pick = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| connected(&g.members[i].0))
                .unwrap_or(start);
            g.next = (pick + 1) % n;
            let (client, value) = &g.members[pick];
            f(Match {
                client,
                value,
                shared: true,
            });
        }
    }

    fn collect<'a>(
        node: &'a mut Node<V>,
        levels: &[&str],
        depth: usize,
        dollar: bool,
        f: &mut impl FnMut(Match<'a, V>),
        groups: &mut Vec<&'a mut SharedGroup<V>>,
    ) {
        let Node {
            children,
            subscribers,
            shared,
        } = node;
        if depth == levels.len() {
            for (client, value) in subscribers.iter() {
                f(Match {
                    client,
                    value,
                    shared: false,
                });
            }
            groups.extend(shared.values_mut());
        }
        let wild_ok = !(dollar && depth == 0);
        for (key, child) in children.iter_mut() {
            match &**key {
                "#" if wild_ok => {
                    let Node {
                        subscribers,
                        shared,
                        ..
                    } = child;
                    for (client, value) in subscribers.iter() {
                        f(Match {
                            client,
                            value,
                            shared: false,
                        });
                    }
                    groups.extend(shared.values_mut());
                }
                "+" if wild_ok && depth < levels.len() => {
                    Self::collect(child, levels, depth + 1, dollar, f, groups);
                }
                k if depth < levels.len() && k == levels[depth] && k != "+" && k != "#" => {
                    Self::collect(child, levels, depth + 1, dollar, f, groups);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(raw: &str) -> FilterSpec<'_> {
        parse_filter(raw, 65535, 128).expect("valid filter")
    }

    fn id(s: &str) -> ClientId {
        Arc::from(s)
    }

    fn route(r: &mut Router<u8>, topic: &str) -> Vec<(String, u8, bool)> {
        let mut out = Vec::new();
        r.route(topic, &|_| true, |m| {
            out.push((m.client.to_string(), *m.value, m.shared))
        });
        out.sort();
        out
    }

    #[test]
    fn filter_validation() {
        assert!(parse_filter("a/#", 100, 10).is_ok());
        assert!(parse_filter("#", 100, 10).is_ok());
        assert!(parse_filter("+/+/#", 100, 10).is_ok());
        assert_eq!(parse_filter("a/#/b", 100, 10), Err(TopicError::Wildcard));
        assert_eq!(parse_filter("a/b#", 100, 10), Err(TopicError::Wildcard));
        assert_eq!(parse_filter("a+/b", 100, 10), Err(TopicError::Wildcard));
        assert_eq!(parse_filter("", 100, 10), Err(TopicError::Empty));
        assert_eq!(parse_filter("$share/g", 100, 10), Err(TopicError::Share));
        assert_eq!(parse_filter("$share//a", 100, 10), Err(TopicError::Share));
        assert_eq!(
            parse_filter("a/b/c", 100, 2),
            Err(TopicError::TooManyLevels)
        );
        assert_eq!(parse_filter("abcdef", 3, 10), Err(TopicError::TooLong));
        let s = spec("$share/g1/a/+");
        assert_eq!(s.share_group, Some("g1"));
        assert_eq!(s.filter, "a/+");
        assert_eq!(
            validate_topic_name("a/+", 100, 10),
            Err(TopicError::Wildcard)
        );
        assert_eq!(validate_topic_name("a/\0", 100, 10), Err(TopicError::Nul));
        assert!(validate_topic_name("a/b", 100, 10).is_ok());
    }

    #[test]
    fn wildcards_match() {
        let mut r = Router::new();
        r.subscribe(&spec("a/b"), id("exact"), 0);
        r.subscribe(&spec("a/+"), id("plus"), 1);
        r.subscribe(&spec("a/#"), id("hash"), 2);
        r.subscribe(&spec("#"), id("all"), 0);
        r.subscribe(&spec("+/+/c"), id("pc"), 1);
        assert_eq!(
            route(&mut r, "a/b"),
            vec![
                ("all".into(), 0, false),
                ("exact".into(), 0, false),
                ("hash".into(), 2, false),
                ("plus".into(), 1, false)
            ]
        );
        // `a/#` matches its parent level `a`.
        assert_eq!(
            route(&mut r, "a"),
            vec![("all".into(), 0, false), ("hash".into(), 2, false)]
        );
        assert_eq!(
            route(&mut r, "a/b/c"),
            vec![
                ("all".into(), 0, false),
                ("hash".into(), 2, false),
                ("pc".into(), 1, false)
            ]
        );
        // Empty levels are levels.
        assert_eq!(route(&mut r, "a//c").len(), 3);
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards() {
        let mut r = Router::new();
        r.subscribe(&spec("#"), id("all"), 0);
        r.subscribe(&spec("+/broker/x"), id("plus"), 0);
        r.subscribe(&spec("$SYS/#"), id("sys"), 0);
        r.subscribe(&spec("$SYS/+/x"), id("sysplus"), 0);
        assert_eq!(
            route(&mut r, "$SYS/broker/x"),
            vec![("sys".into(), 0, false), ("sysplus".into(), 0, false)]
        );
        assert!(!filter_matches("#", "$SYS/a"));
        assert!(!filter_matches("+/a", "$SYS/a"));
        assert!(filter_matches("$SYS/#", "$SYS/a"));
    }

    #[test]
    fn unsubscribe_prunes() {
        let mut r = Router::new();
        r.subscribe(&spec("a/b/c"), id("c1"), 0);
        r.subscribe(&spec("$share/g/a/b/c"), id("c2"), 0);
        assert_eq!(r.len(), 2);
        assert!(!r.unsubscribe(&spec("a/b"), "c1"));
        assert!(r.unsubscribe(&spec("a/b/c"), "c1"));
        assert!(r.unsubscribe(&spec("$share/g/a/b/c"), "c2"));
        assert!(r.root.is_empty());
        assert!(r.is_empty());
    }

    #[test]
    fn resubscribe_replaces() {
        let mut r = Router::new();
        assert!(!r.subscribe(&spec("a"), id("c"), 0));
        assert!(r.subscribe(&spec("a"), id("c"), 2));
        assert_eq!(route(&mut r, "a"), vec![("c".into(), 2, false)]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn shared_round_robin() {
        let mut r = Router::new();
        for c in ["s1", "s2", "s3"] {
            r.subscribe(&spec("$share/g/t/+"), id(c), 1);
        }
        r.subscribe(&spec("$share/h/t/#"), id("h1"), 0);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            let got = route(&mut r, "t/x");
            // One from group g, one from group h.
            assert_eq!(got.len(), 2);
            for (c, _, shared) in got {
                assert!(shared);
                *counts.entry(c).or_default() += 1;
            }
        }
        assert_eq!(counts["s1"], 10);
        assert_eq!(counts["s2"], 10);
        assert_eq!(counts["s3"], 10);
        assert_eq!(counts["h1"], 30);
    }

    #[test]
    fn shared_prefers_connected_members() {
        let mut r = Router::new();
        for c in ["s1", "s2", "s3"] {
            r.subscribe(&spec("$share/g/t"), id(c), 1);
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            r.route("t", &|c| &**c != "s2", |m| got.push(m.client.to_string()));
        }
        assert_eq!(got, vec!["s1", "s3", "s1", "s3"]);
        // Nobody connected: still delivered (queued for an offline member).
        let mut got = Vec::new();
        r.route("t", &|_| false, |m| got.push(m.client.to_string()));
        assert_eq!(got.len(), 1);
        // Removing a member keeps the rotation valid.
        r.unsubscribe(&spec("$share/g/t"), "s1");
        let mut got = Vec::new();
        for _ in 0..4 {
            r.route("t", &|_| true, |m| got.push(m.client.to_string()));
        }
        got.sort();
        assert_eq!(got, vec!["s2", "s2", "s3", "s3"]);
    }

    #[test]
    fn trie_agrees_with_reference_matcher() {
        let filters = [
            "a", "a/b", "a/+", "+/b", "#", "a/#", "+/+", "+", "a/b/#", "$x/#", "$x/+", "+/#",
        ];
        let topics = [
            "a", "a/b", "a/c", "b/b", "a/b/c", "$x/a", "$x", "/", "/b", "a/",
        ];
        let mut r = Router::new();
        for (i, f) in filters.iter().enumerate() {
            r.subscribe(&spec(f), id(&i.to_string()), 0u8);
        }
        for t in topics {
            let mut got: Vec<String> = Vec::new();
            r.route(t, &|_| true, |m| got.push(m.client.to_string()));
            got.sort();
            let mut want: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, t))
                .map(|(i, _)| i.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "topic {t}");
        }
    }

    mod prop {
        use proptest::prelude::*;

        use super::super::*;
        use crate::retain::RetainStore;

        fn level() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec!["a", "b", "", "$s", "c"])
        }

        fn topic() -> impl Strategy<Value = String> {
            prop::collection::vec(level(), 1..5)
                .prop_map(|l| l.join("/"))
                .prop_filter("topic names are not empty", |t| !t.is_empty())
        }

        fn filter() -> impl Strategy<Value = String> {
            (
                prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$s", "+"]), 0..4),
                any::<bool>(),
            )
                .prop_map(|(mut l, hash)| {
                    if hash || l.is_empty() {
                        l.push("#");
                    }
                    l.join("/")
                })
                .prop_filter("filters are not empty", |f| !f.is_empty())
        }

        proptest! {
            #[test]
            fn trie_matches_like_the_reference(filters in prop::collection::vec(filter(), 1..12), topics in prop::collection::vec(topic(), 1..12)) {
                let mut r = Router::new();
                for (i, f) in filters.iter().enumerate() {
                    let spec = parse_filter(f, 1000, 100).expect("generated filters are valid");
                    r.subscribe(&spec, Arc::from(i.to_string()), ());
                }
                for t in &topics {
                    let mut got: Vec<String> = Vec::new();
                    r.route(t, &|_| true, |m| got.push(m.client.to_string()));
                    got.sort();
                    got.dedup();
                    let mut want: Vec<String> = filters
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| filter_matches(f, t))
                        .map(|(i, _)| i.to_string())
                        .collect();
                    want.sort();
                    want.dedup();
                    prop_assert_eq!(got, want, "topic {}", t);
                }
            }

            #[test]
            fn retained_lookup_matches_like_the_reference(topics in prop::collection::vec(topic(), 1..12), f in filter()) {
                let mut store = RetainStore::new();
                for t in &topics {
                    store.insert(t, t.clone());
                }
                let mut got: Vec<String> = store.matching(&f).into_iter().cloned().collect();
                got.sort();
                let mut want: Vec<String> = topics.iter().filter(|t| filter_matches(&f, t)).cloned().collect();
                want.sort();
                want.dedup();
                prop_assert_eq!(got, want, "filter {}", f);
            }

            #[test]
            fn subscribe_then_unsubscribe_leaves_nothing(filters in prop::collection::vec(filter(), 1..12)) {
                let mut r = Router::new();
                for (i, f) in filters.iter().enumerate() {
                    let spec = parse_filter(f, 1000, 100).expect("valid");
                    r.subscribe(&spec, Arc::from(i.to_string()), ());
                }
                for (i, f) in filters.iter().enumerate() {
                    let spec = parse_filter(f, 1000, 100).expect("valid");
                    r.unsubscribe(&spec, &i.to_string());
                }
                prop_assert!(r.is_empty());
                prop_assert!(r.root.is_empty());
            }
        }
    }
}
