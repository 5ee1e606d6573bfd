//! Retained messages by topic, queried with topic filters when a subscription is made.
//!
//! # Design
//! A trie keyed by topic levels, so a filter only walks the branches it can match: a literal
//! level follows one child, `+` visits every child at that level and `#` the whole subtree,
//! including the node of the parent level (`a/#` finds the message retained on `a`). At the
//! first level, `+` and `#` skip topics starting with `$` (§4.7.2).
//!
//! Topic names are not stored: the walk rebuilds each name in one buffer as it descends, which
//! keeps memory at one copy of each level. Topics can have up to 32,768 levels, so the walk uses
//! an explicit stack and dropping a node flattens its subtree instead of recursing per level.

use crate::subscriptions::LevelMap;

/// Retained messages keyed by topic name. `M` is the broker's message type.
#[derive(Debug)]
pub(crate) struct RetainedStore<M> {
    root: Node<M>,
    /// Messages held, kept here so that [`RetainedStore::len`] is O(1).
    len: usize,
}

impl<M> RetainedStore<M> {
    pub(crate) fn new() -> Self {
        RetainedStore {
            root: Node::new(),
            len: 0,
        }
    }

    /// Store `message` as the retained message of `topic_name`, replacing any previous one.
    pub(crate) fn insert(&mut self, topic_name: &str, message: M) {
        let mut node = &mut self.root;
        for level in topic_name.split('/') {
            node = node.children.get_or_insert_with(level, Node::new);
        }
        if node.message.replace(message).is_none() {
            self.len += 1;
        }
    }

    /// Forget the retained message of `topic_name`; `true` if there was one. Nodes left empty
    /// are removed.
    pub(crate) fn remove(&mut self, topic_name: &str) -> bool {
        // First pass, read-only: find the node, and the deepest node on the path that must stay
        // if the leaf goes (the root, or one holding anything besides this path).
        let mut node = &self.root;
        let mut keep_depth = 0;
        for (depth, level) in topic_name.split('/').enumerate() {
            if node.message.is_some() || node.children.len() > 1 {
                keep_depth = depth;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        if node.message.is_none() {
            return false;
        }
        let leaf_becomes_empty = node.children.is_empty();

        // Second pass: cut the branch below `keep_depth`, or only take the message.
        self.len -= 1;
        let mut levels = topic_name.split('/');
        if leaf_becomes_empty {
            if let Some(keeper) = self.root.descend_mut(levels.by_ref().take(keep_depth))
                && let Some(edge) = levels.next()
            {
                keeper.children.remove(edge);
            }
        } else if let Some(node) = self.root.descend_mut(levels) {
            node.message = None;
        }
        true
    }

    /// Call `found` for each retained message whose topic matches `filter` (a valid plain
    /// filter, not `$share/...`).
    pub(crate) fn for_each_match(&self, filter: &str, mut found: impl FnMut(&str, &M)) {
        let mut topic_name = String::new();
        let mut pending = Vec::new();
        self.root
            .visit(Some(filter), true, "", &mut pending, &mut found);
        while let Some(visit) = pending.pop() {
            topic_name.truncate(visit.parent_len);
            if !visit.parent_is_root {
                topic_name.push('/');
            }
            topic_name.push_str(visit.level);
            visit.node.visit(
                visit.filter_rest,
                false,
                &topic_name,
                &mut pending,
                &mut found,
            );
        }
    }

    /// Number of retained messages.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Nodes in the trie, the root included (to check pruning).
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += 1;
            stack.extend(node.children.iter().map(|(_, child)| child));
        }
        count
    }
}

/// A node still to visit in [`RetainedStore::for_each_match`].
struct Visit<'a, M> {
    node: &'a Node<M>,
    /// Its level name.
    level: &'a str,
    /// Filter levels left for it, `None` when the filter is used up.
    filter_rest: Option<&'a str>,
    /// Length of the parent's topic name in the shared buffer.
    parent_len: usize,
    /// The root's children are not preceded by a `/`.
    parent_is_root: bool,
}

#[derive(Debug)]
struct Node<M> {
    message: Option<M>,
    children: LevelMap<Node<M>>,
}

impl<M> Node<M> {
    fn new() -> Self {
        Node {
            message: None,
            children: LevelMap::default(),
        }
    }

    fn descend_mut<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> Option<&mut Node<M>> {
        let mut node = self;
        for level in levels {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    /// Report this node (named `topic_name`) if the filter is used up, or queue the children the
    /// next filter level selects.
    fn visit<'a>(
        &'a self,
        filter_rest: Option<&'a str>,
        is_root: bool,
        topic_name: &str,
        pending: &mut Vec<Visit<'a, M>>,
        found: &mut impl FnMut(&str, &M),
    ) {
        let Some(filter_rest) = filter_rest else {
            if let Some(message) = &self.message {
                found(topic_name, message);
            }
            return;
        };
        let (level, after) = match filter_rest.split_once('/') {
            Some((level, after)) => (level, Some(after)),
            None => (filter_rest, None),
        };
        let mut queue = |level: &'a str, node: &'a Node<M>, filter_rest: Option<&'a str>| {
            pending.push(Visit {
                node,
                level,
                filter_rest,
                parent_len: topic_name.len(),
                parent_is_root: is_root,
            });
        };
        let wildcard_child = |level: &str| !(is_root && level.starts_with('$'));
        match level {
            "#" => {
                // `#` includes the parent level, then every descendant with `#` again.
                if let Some(message) = &self.message {
                    found(topic_name, message);
                }
                for (child_level, child) in self.children.iter() {
                    if wildcard_child(child_level) {
                        queue(child_level, child, Some(filter_rest));
                    }
                }
            }
            "+" => {
                for (child_level, child) in self.children.iter() {
                    if wildcard_child(child_level) {
                        queue(child_level, child, after);
                    }
                }
            }
            literal => {
                if let Some((child_level, child)) = self.children.get_key_value(literal) {
                    queue(child_level, child, after);
                }
            }
        }
    }
}

impl<M> Drop for Node<M> {
    /// Drops the subtree iteratively: the derived drop would recurse once per level.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut orphans = Vec::new();
        self.children.drain_into(&mut orphans);
        while let Some(mut node) = orphans.pop() {
            node.children.drain_into(&mut orphans);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use polyhub_mqtt::topic;
    use proptest::prelude::*;

    use super::*;

    fn found(store: &RetainedStore<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut found = Vec::new();
        store.for_each_match(filter, |topic_name, message| {
            found.push((topic_name.to_owned(), *message));
        });
        found.sort();
        found
    }

    fn topics(store: &RetainedStore<u32>, filter: &str) -> Vec<String> {
        found(store, filter)
            .into_iter()
            .map(|(topic_name, _)| topic_name)
            .collect()
    }

    fn sample_store() -> RetainedStore<u32> {
        let mut store = RetainedStore::new();
        for (index, topic_name) in [
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/golf",
            "sport/",
            "/finance",
            "/",
            "$SYS/broker/uptime",
            "$SYS",
            "a/$b",
        ]
        .into_iter()
        .enumerate()
        {
            store.insert(topic_name, index as u32);
        }
        store
    }

    #[test]
    fn filters_find_the_messages_they_match() {
        let store = sample_store();
        assert_eq!(store.len(), 11);
        assert_eq!(topics(&store, "sport/tennis"), ["sport/tennis"]);
        assert_eq!(
            topics(&store, "sport/tennis/#"),
            [
                "sport/tennis",
                "sport/tennis/player1",
                "sport/tennis/player1/ranking"
            ]
        );
        assert_eq!(
            topics(&store, "sport/+"),
            ["sport/", "sport/golf", "sport/tennis"]
        );
        assert_eq!(topics(&store, "sport/+/player1"), ["sport/tennis/player1"]);
        assert_eq!(topics(&store, "+"), ["sport"]);
        assert_eq!(
            topics(&store, "+/+"),
            [
                "/",
                "/finance",
                "a/$b",
                "sport/",
                "sport/golf",
                "sport/tennis"
            ]
        );
        assert_eq!(topics(&store, "/+"), ["/", "/finance"]);
        assert_eq!(topics(&store, "/"), ["/"]);
        assert_eq!(topics(&store, "+/#").len(), 9);
        assert_eq!(topics(&store, "nothing/#"), Vec::<String>::new());
        assert_eq!(found(&store, "sport/golf"), [("sport/golf".to_owned(), 4)]);
    }

    #[test]
    fn wildcards_skip_dollar_topics_at_the_first_level() {
        let store = sample_store();
        let everything = topics(&store, "#");
        assert_eq!(everything.len(), 9);
        assert!(
            everything
                .iter()
                .all(|topic_name| !topic_name.starts_with('$'))
        );
        assert!(everything.contains(&"a/$b".to_owned()));
        assert_eq!(topics(&store, "+/broker/uptime"), Vec::<String>::new());
        assert_eq!(topics(&store, "$SYS/#"), ["$SYS", "$SYS/broker/uptime"]);
        assert_eq!(topics(&store, "$SYS/+/uptime"), ["$SYS/broker/uptime"]);
        assert_eq!(topics(&store, "a/+"), ["a/$b"]);
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut store = RetainedStore::new();
        store.insert("a/b/c", 1);
        store.insert("a/b/c", 2);
        assert_eq!(store.len(), 1);
        assert_eq!(found(&store, "a/b/c"), [("a/b/c".to_owned(), 2)]);

        store.insert("a", 3);
        store.insert("a/b/d/e", 4);
        // root, a, b, c, d, e
        assert_eq!(store.node_count(), 6);
        assert!(!store.remove("a/b"));
        assert!(!store.remove("a/b/x"));
        assert!(!store.remove("a/b/c/d"));
        assert_eq!(store.len(), 3);

        assert!(store.remove("a/b/d/e"));
        assert!(!store.remove("a/b/d/e"));
        assert_eq!(store.node_count(), 4);
        // `a` keeps its own message while its subtree goes.
        assert!(store.remove("a/b/c"));
        assert_eq!(store.node_count(), 2);
        assert_eq!(topics(&store, "#"), ["a"]);
        // A node with children loses its message but stays.
        store.insert("a/b", 5);
        assert!(store.remove("a"));
        assert_eq!(store.node_count(), 3);
        assert_eq!(topics(&store, "#"), ["a/b"]);
        assert!(store.remove("a/b"));
        assert_eq!(store.node_count(), 1);
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn wide_levels_match_and_prune() {
        let mut store = RetainedStore::new();
        for device in 0..50u32 {
            store.insert(&format!("devices/{device}/state"), device);
        }
        store.insert("devices/7", 700);
        assert_eq!(found(&store, "devices/+/state").len(), 50);
        assert_eq!(
            found(&store, "devices/7/#"),
            [
                ("devices/7".to_owned(), 700),
                ("devices/7/state".to_owned(), 7)
            ]
        );
        assert_eq!(found(&store, "devices/+"), [("devices/7".to_owned(), 700)]);
        for device in 0..50u32 {
            assert!(store.remove(&format!("devices/{device}/state")));
        }
        assert_eq!(store.node_count(), 3);
        assert!(store.remove("devices/7"));
        assert_eq!(store.node_count(), 1);
    }

    #[test]
    fn deep_topics_neither_recurse_nor_overflow() {
        // 32,768 levels: the longest topic there can be.
        let levels = 32_768;
        let deep = vec!["x"; levels].join("/");
        let mut store = RetainedStore::new();
        store.insert(&deep, 1);
        store.insert(&format!("{}/y", vec!["x"; 100].join("/")), 2);
        assert_eq!(found(&store, "#").len(), 2);
        assert_eq!(
            found(&store, &vec!["+"; levels].join("/")),
            [(deep.clone(), 1)]
        );
        assert!(store.remove(&deep));
        assert_eq!(store.node_count(), 102);
        store.insert(&deep, 3);
        // Dropping the store with the deep branch in it.
        drop(store);
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just("a"), Just("b"), Just("$SYS"), Just("$x")]
    }

    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("non-empty", |topic_name| !topic_name.is_empty())
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let filter_level = prop_oneof![3 => level(), 2 => Just("+")];
        (prop::collection::vec(filter_level, 0..5), any::<bool>()).prop_filter_map(
            "a filter is at least one character",
            |(mut levels, multi_level)| {
                if multi_level {
                    levels.push("#");
                }
                let filter = levels.join("/");
                (!filter.is_empty()).then_some(filter)
            },
        )
    }

    proptest! {
        #[test]
        fn trie_agrees_with_a_brute_force_scan(
            operations in prop::collection::vec((topic_name(), prop::option::of(0..100u32)), 0..40),
            filters in prop::collection::vec(topic_filter(), 1..8),
        ) {
            let mut store = RetainedStore::new();
            let mut model = BTreeMap::new();
            for (topic_name, message) in &operations {
                match message {
                    Some(message) => {
                        store.insert(topic_name, *message);
                        model.insert(topic_name.clone(), *message);
                    }
                    None => {
                        prop_assert_eq!(store.remove(topic_name), model.remove(topic_name).is_some());
                    }
                }
                prop_assert_eq!(store.len(), model.len());
            }
            for filter in &filters {
                let expected: Vec<(String, u32)> = model
                    .iter()
                    .filter(|(topic_name, _)| topic::matches(filter, topic_name))
                    .map(|(topic_name, message)| (topic_name.clone(), *message))
                    .collect();
                prop_assert_eq!(found(&store, filter), expected, "filter {}", filter);
            }
            for topic_name in model.keys() {
                prop_assert!(store.remove(topic_name));
            }
            prop_assert_eq!(store.len(), 0);
            prop_assert_eq!(store.node_count(), 1);
        }
    }
}
