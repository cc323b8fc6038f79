//! Retained messages, kept in a trie of topic levels so that a wildcard SUBSCRIBE visits only
//! the branches its filter can match.
//!
//! Invariant: a node exists only while it or a descendant holds a retained value.
//! The `$`-topic rule applies here too: a filter starting with `+` or `#` does not return
//! topics whose first level starts with `$`.

#[derive(Debug)]
struct Node<V> {
    children: crate::router::FastMap<Box<str>, Node<V>>,
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: crate::router::FastMap::default(),
            value: None,
        }
    }
}

/// The retained-message store: at most one value per topic name.
#[derive(Debug)]
pub struct RetainStore<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for RetainStore<V> {
    fn default() -> Self {
        RetainStore {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> RetainStore<V> {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Retains `value` for `topic`, replacing the previous one.
    pub fn insert(&mut self, topic: &str, value: V) {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.value.replace(value).is_none() {
            self.len += 1;
        }
    }

    /// The retained message of exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    /// Clears the retained message of `topic` (a PUBLISH with retain and an empty payload).
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let levels: Vec<&str> = topic.split('/').collect();
        let v = Self::remove_at(&mut self.root, &levels);
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    fn remove_at(node: &mut Node<V>, levels: &[&str]) -> Option<V> {
        let Some((first, rest)) = levels.split_first() else {
            return node.value.take();
        };
        let child = node.children.get_mut(*first)?;
        let v = Self::remove_at(child, rest);
        if child.value.is_none() && child.children.is_empty() {
            node.children.remove(*first);
        }
        v
    }

    /// Every retained value whose topic matches `filter` (no share prefix).
    pub fn matching(&self, filter: &str) -> Vec<&V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        Self::walk(&self.root, &levels, 0, &mut out);
        out
    }

    /// Mutable access to every retained value, for expiry sweeps.
    pub fn retain_values(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let removed = Self::sweep(&mut self.root, &mut keep);
        self.len -= removed;
    }

    fn sweep(node: &mut Node<V>, keep: &mut impl FnMut(&V) -> bool) -> usize {
        let mut removed = 0;
        if node.value.as_ref().is_some_and(|v| !keep(v)) {
            node.value = None;
            removed += 1;
        }
        node.children.retain(|_, child| {
            removed += Self::sweep(child, keep);
            child.value.is_some() || !child.children.is_empty()
        });
        removed
    }

    fn walk<'a>(node: &'a Node<V>, levels: &[&str], depth: usize, out: &mut Vec<&'a V>) {
        let Some(level) = levels.get(depth) else {
            out.extend(node.value.as_ref());
            return;
        };
        match *level {
            "#" => {
                // `a/#` matches `a` itself and everything below it.
                out.extend(node.value.as_ref());
                for (key, child) in &node.children {
                    if depth == 0 && key.starts_with('$') {
                        continue;
                    }
                    Self::all(child, out);
                }
            }
            "+" => {
                for (key, child) in &node.children {
                    if depth == 0 && key.starts_with('$') {
                        continue;
                    }
                    Self::walk(child, levels, depth + 1, out);
                }
            }
            exact => {
                if let Some(child) = node.children.get(exact) {
                    Self::walk(child, levels, depth + 1, out);
                }
            }
        }
    }

    fn all<'a>(node: &'a Node<V>, out: &mut Vec<&'a V>) {
        out.extend(node.value.as_ref());
        for child in node.children.values() {
            Self::all(child, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::filter_matches;

    fn sorted(v: Vec<&&str>) -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn set_replace_clear() {
        let mut r = RetainStore::new();
        r.insert("a/b", "1");
        r.insert("a/b", "2");
        assert_eq!(r.len(), 1);
        assert_eq!(sorted(r.matching("a/b")), vec!["2"]);
        assert_eq!(r.remove("a/b"), Some("2"));
        assert_eq!(r.remove("a/b"), None);
        assert!(r.is_empty());
        assert!(r.root.children.is_empty());
    }

    #[test]
    fn wildcards_and_dollar() {
        let topics = ["a", "a/b", "a/b/c", "a/c", "b", "$SYS/x", "/x", "a/"];
        let filters = [
            "#", "a/#", "a/+", "+", "+/+", "$SYS/#", "+/x", "a/b/c", "a/+/c", "#/x",
        ];
        let mut r = RetainStore::new();
        for t in topics {
            r.insert(t, t);
        }
        for f in filters {
            if f == "#/x" {
                continue; // not a valid filter; never reaches the store
            }
            let got = sorted(r.matching(f));
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| filter_matches(f, t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "filter {f}");
        }
    }

    #[test]
    fn sweep_removes_expired() {
        let mut r = RetainStore::new();
        r.insert("a/b", 1);
        r.insert("a/c", 2);
        r.insert("x", 3);
        r.retain_values(|v| *v != 2);
        assert_eq!(r.len(), 2);
        r.retain_values(|_| false);
        assert!(r.is_empty());
        assert!(r.root.children.is_empty());
    }
}
