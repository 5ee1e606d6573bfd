//! The subscription table: topic filter → subscribers, with `$share` groups.
//!
//! # Design
//! A trie keyed by topic levels. Each node has its literal children in a [`LevelMap`] (a small
//! vector, or a hash map once a level is wide), plus a separate slot for a `+` child, so matching a topic visits only the branches that can match: at each
//! level the literal child of that name and the `+` child. A filter ending in `/#` (or `#` alone)
//! is stored in the node of its parent level, in a separate `#` set that matches whatever
//! remains of the topic, including nothing (`a/#` matches `a`).
//!
//! Each place holds plain subscribers (session → options) and shared groups (group name →
//! members and a round-robin cursor). A shared group is identified by its name *and* its filter,
//! so `$share/g/a/+` and `$share/g/a/#` are two groups.
//!
//! Matching runs under a read lock from many connection tasks at once: it takes `&self`, keeps
//! the round-robin cursors in atomics, and does not allocate (levels are slices of the topic, and
//! the `+` branches still to visit sit on a small stack-allocated buffer).
//!
//! Topics can have up to 32,768 levels (65,535 bytes of `/`), so nothing here recurses over
//! levels: walks use explicit stacks and dropping a node flattens its subtree, otherwise a client
//! could overflow a task's stack with one deep filter.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use polyhub_mqtt::SubscriptionOptions;
use polyhub_mqtt::topic;

/// One client's subscription to one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subscription {
    /// Options from SUBSCRIBE.
    pub(crate) options: SubscriptionOptions,
    /// MQTT 5 subscription identifier, if given.
    pub(crate) identifier: Option<u32>,
}

/// Filters and who subscribed to them. `K` identifies a session.
#[derive(Debug)]
pub(crate) struct SubscriptionTree<K> {
    root: Node<K>,
    /// Subscriptions held, shared-group memberships included.
    len: usize,
}

impl<K: Clone + Eq + Hash> SubscriptionTree<K> {
    pub(crate) fn new() -> Self {
        SubscriptionTree {
            root: Node::new(),
            len: 0,
        }
    }

    /// Add or replace `key`'s subscription to `filter` (which may be `$share/<group>/<f>`).
    /// Returns `true` when the subscription did not exist before.
    ///
    /// `filter` should have passed [`topic::validate_topic_filter`]; a malformed `$share/...` is
    /// stored as a plain filter.
    pub(crate) fn subscribe(&mut self, filter: &str, key: K, subscription: Subscription) -> bool {
        let target = FilterTarget::parse(filter);
        let node = self.root.descend_or_create(target.levels());
        let subscribers = if target.multi_level {
            node.multi_level.get_or_insert_with(Box::default)
        } else {
            &mut node.exact
        };
        let added = subscribers.insert(target.group, key, subscription);
        if added {
            self.len += 1;
        }
        added
    }

    /// Remove `key`'s subscription to `filter`; `true` if there was one. Nodes left empty are
    /// removed so that churn of unique topics does not grow the tree forever.
    pub(crate) fn unsubscribe(&mut self, filter: &str, key: &K) -> bool {
        let target = FilterTarget::parse(filter);

        // First pass, read-only: find the node, and the deepest node on the path that must stay
        // if the leaf becomes empty (the root, or one holding anything besides this path).
        let mut node = &self.root;
        let mut keep_depth = 0;
        let mut depth = 0;
        for level in target.levels() {
            if node.holds_more_than_one_branch() {
                keep_depth = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return false,
            }
            depth += 1;
        }
        let subscribers = if target.multi_level {
            node.multi_level.as_deref()
        } else {
            Some(&node.exact)
        };
        if !subscribers.is_some_and(|s| s.contains(target.group, key)) {
            return false;
        }
        let leaf_becomes_empty = depth > 0
            && node.children.is_empty()
            && node.single_level.is_none()
            && node.subscription_count() == 1;

        // Second pass: either cut the now useless branch below `keep_depth`, or just remove
        // the subscription from its node.
        self.len -= 1;
        if leaf_becomes_empty {
            let mut levels = target.levels();
            let Some(keeper) = self.root.descend_mut(levels.by_ref().take(keep_depth)) else {
                return true;
            };
            if let Some(edge) = levels.next() {
                keeper.remove_child(edge);
            }
            return true;
        }
        let Some(node) = self.root.descend_mut(target.levels()) else {
            return true;
        };
        if target.multi_level {
            if let Some(multi_level) = node.multi_level.as_deref_mut() {
                multi_level.remove(target.group, key);
                if multi_level.is_empty() {
                    node.multi_level = None;
                }
            }
        } else {
            node.exact.remove(target.group, key);
        }
        true
    }

    /// Call `deliver` for every subscription matching `topic`: each plain subscription, and one
    /// member per matching `$share` group, chosen round-robin among members for which `online`
    /// holds (any member when none is online).
    ///
    /// A session subscribed through several matching filters gets one call per filter; merging
    /// them is the caller's business.
    pub(crate) fn for_each_match(
        &self,
        topic_name: &str,
        online: impl Fn(&K) -> bool,
        mut deliver: impl FnMut(&K, &Subscription),
    ) {
        // §4.7.2: a wildcard in the first level does not match a topic starting with `$`.
        let reserved = topic_name.starts_with('$');
        let mut pending = PendingBranches::new();
        let mut branch: Branch<'_, K> = (&self.root, Some(topic_name));
        let mut at_root = true;
        loop {
            let (node, rest) = branch;
            let wildcards_apply = !(at_root && reserved);
            at_root = false;
            if wildcards_apply && let Some(multi_level) = node.multi_level.as_deref() {
                multi_level.deliver(&online, &mut deliver);
            }
            let next = match rest {
                None => {
                    node.exact.deliver(&online, &mut deliver);
                    None
                }
                Some(rest) => {
                    // A byte scan: levels are short, and `split_once` with a char pattern
                    // costs a generic searcher set-up per level.
                    let (level, after) = match rest.bytes().position(|byte| byte == b'/') {
                        Some(slash) => (&rest[..slash], Some(&rest[slash + 1..])),
                        None => (rest, None),
                    };
                    if wildcards_apply && let Some(single_level) = node.single_level.as_deref() {
                        pending.push((single_level, after));
                    }
                    node.children.get(level).map(|child| (child, after))
                }
            };
            match next.or_else(|| pending.pop()) {
                Some(next) => branch = next,
                None => break,
            }
        }
    }

    /// Number of subscriptions held.
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
            stack.extend(node.single_level.as_deref());
        }
        count
    }
}

/// Where a filter lives in the trie.
struct FilterTarget<'a> {
    /// Shared group, for `$share/<group>/...`.
    group: Option<&'a str>,
    /// The levels leading to the node, `None` for the root (the filter `#`).
    path: Option<&'a str>,
    /// Whether the filter ends in `#`, stored in the `#` set of the node.
    multi_level: bool,
}

impl<'a> FilterTarget<'a> {
    fn parse(filter: &'a str) -> Self {
        let (group, plain) = match topic::parse_shared(filter) {
            Ok(Some((group, inner))) => (Some(group), inner),
            _ => (None, filter),
        };
        let (path, multi_level) = if plain == "#" {
            (None, true)
        } else if let Some(parent) = plain.strip_suffix("/#") {
            (Some(parent), true)
        } else {
            (Some(plain), false)
        };
        FilterTarget {
            group,
            path,
            multi_level,
        }
    }

    fn levels(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.path.into_iter().flat_map(|path| path.split('/'))
    }
}

/// A node still to visit while matching, with the topic levels left (`None`: all consumed).
type Branch<'a, K> = (&'a Node<K>, Option<&'a str>);

#[derive(Debug)]
struct Node<K> {
    /// Literal next levels.
    children: LevelMap<Node<K>>,
    /// The `+` next level.
    single_level: Option<Box<Node<K>>>,
    /// Filters ending at this node.
    exact: Subscribers<K>,
    /// Filters ending at this node followed by `/#` (boxed: most nodes have none).
    multi_level: Option<Box<Subscribers<K>>>,
}

impl<K> Node<K> {
    fn new() -> Self {
        Node {
            children: LevelMap::default(),
            single_level: None,
            exact: Subscribers::default(),
            multi_level: None,
        }
    }

    fn child(&self, level: &str) -> Option<&Node<K>> {
        if level == "+" {
            self.single_level.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn descend_mut<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> Option<&mut Node<K>> {
        let mut node = self;
        for level in levels {
            node = if level == "+" {
                node.single_level.as_deref_mut()?
            } else {
                node.children.get_mut(level)?
            };
        }
        Some(node)
    }

    fn descend_or_create<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> &mut Node<K> {
        let mut node = self;
        for level in levels {
            node = if level == "+" {
                node.single_level
                    .get_or_insert_with(|| Box::new(Node::new()))
            } else {
                node.children.get_or_insert_with(level, Node::new)
            };
        }
        node
    }

    fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.single_level = None;
        } else {
            self.children.remove(level);
        }
    }

    /// Whether removing one child branch would still leave something in this node.
    fn holds_more_than_one_branch(&self) -> bool {
        !self.exact.is_empty()
            || self.multi_level.is_some()
            || self.children.len() + usize::from(self.single_level.is_some()) > 1
    }

    fn subscription_count(&self) -> usize {
        self.exact.len() + self.multi_level.as_ref().map_or(0, |s| s.len())
    }

    /// Move the child nodes out, leaving this node a leaf.
    fn detach_children(&mut self, into: &mut Vec<Node<K>>) {
        self.children.drain_into(into);
        if let Some(single_level) = self.single_level.take() {
            into.push(*single_level);
        }
    }
}

impl<K> Drop for Node<K> {
    /// Drops the subtree iteratively: the derived drop would recurse once per level.
    fn drop(&mut self) {
        if self.children.is_empty() && self.single_level.is_none() {
            return;
        }
        let mut orphans = Vec::new();
        self.detach_children(&mut orphans);
        while let Some(mut node) = orphans.pop() {
            node.detach_children(&mut orphans);
        }
    }
}

/// The subscriptions of one filter: plain ones and shared groups.
#[derive(Debug)]
struct Subscribers<K> {
    plain: Members<K>,
    /// Boxed: most filters have no shared group, and an empty map would cost 48 bytes.
    #[allow(
        clippy::box_collection,
        reason = "8 bytes instead of 48 in every trie node"
    )]
    shared: Option<Box<HashMap<Box<str>, SharedGroup<K>>>>,
}

impl<K> Default for Subscribers<K> {
    fn default() -> Self {
        Subscribers {
            plain: Members::default(),
            shared: None,
        }
    }
}

impl<K> Subscribers<K> {
    fn is_empty(&self) -> bool {
        self.plain.entries.is_empty() && self.shared.is_none()
    }

    fn len(&self) -> usize {
        let shared = self.shared.as_ref().map_or(0, |groups| {
            groups
                .values()
                .map(|group| group.members.entries.len())
                .sum()
        });
        self.plain.entries.len() + shared
    }

    fn deliver(&self, online: &impl Fn(&K) -> bool, deliver: &mut impl FnMut(&K, &Subscription)) {
        for (key, subscription) in &self.plain.entries {
            deliver(key, subscription);
        }
        if let Some(groups) = &self.shared {
            for group in groups.values() {
                if let Some((key, subscription)) = group.pick(online) {
                    deliver(key, subscription);
                }
            }
        }
    }
}

impl<K: Clone + Eq + Hash> Subscribers<K> {
    fn contains(&self, group: Option<&str>, key: &K) -> bool {
        match group {
            None => self.plain.position(key).is_some(),
            Some(group) => self
                .shared
                .as_ref()
                .and_then(|groups| groups.get(group))
                .is_some_and(|group| group.members.position(key).is_some()),
        }
    }

    fn insert(&mut self, group: Option<&str>, key: K, subscription: Subscription) -> bool {
        let Some(group) = group else {
            return self.plain.insert(key, subscription);
        };
        let groups = self.shared.get_or_insert_with(Box::default);
        if !groups.contains_key(group) {
            groups.insert(group.into(), SharedGroup::default());
        }
        groups
            .get_mut(group)
            .expect("group was inserted above")
            .members
            .insert(key, subscription)
    }

    fn remove(&mut self, group: Option<&str>, key: &K) -> bool {
        let Some(group) = group else {
            return self.plain.remove(key);
        };
        let Some(groups) = self.shared.as_deref_mut() else {
            return false;
        };
        let Some(members) = groups.get_mut(group).map(|group| &mut group.members) else {
            return false;
        };
        let removed = members.remove(key);
        if members.entries.is_empty() {
            groups.remove(group);
            if groups.is_empty() {
                self.shared = None;
            }
        }
        removed
    }
}

/// Members of a shared group; `cursor` is where the next round-robin search starts.
#[derive(Debug)]
struct SharedGroup<K> {
    members: Members<K>,
    cursor: AtomicUsize,
}

impl<K> Default for SharedGroup<K> {
    fn default() -> Self {
        SharedGroup {
            members: Members::default(),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl<K> SharedGroup<K> {
    /// The next member after the previous pick that is online, or simply the next member when
    /// none is. The cursor moves with a compare-and-swap so that concurrent publishers share
    /// one strict rotation instead of picking the same member twice.
    fn pick(&self, online: &impl Fn(&K) -> bool) -> Option<&(K, Subscription)> {
        let entries = &self.members.entries;
        match entries.len() {
            0 => return None,
            1 => return entries.first(),
            _ => {}
        }
        let count = entries.len();
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        loop {
            let start = cursor % count;
            let chosen = (0..count)
                .map(|offset| (start + offset) % count)
                .find(|&index| online(&entries[index].0))
                .unwrap_or(start);
            match self.cursor.compare_exchange_weak(
                cursor,
                chosen + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return entries.get(chosen),
                Err(current) => cursor = current,
            }
        }
    }
}

/// Above this many members a set gets a position index; below half of it the index goes again.
/// Small sets (the vast majority) stay a plain vector: smaller, and faster to scan.
const INDEX_ABOVE: usize = 16;

/// A set of sessions with their options, in a vector so that fan-out iterates densely.
#[derive(Debug)]
struct Members<K> {
    entries: Vec<(K, Subscription)>,
    /// Position of each key in `entries`, present only for large sets.
    #[allow(
        clippy::box_collection,
        reason = "8 bytes instead of 48 in every trie node"
    )]
    positions: Option<Box<HashMap<K, usize>>>,
}

impl<K> Default for Members<K> {
    fn default() -> Self {
        Members {
            entries: Vec::new(),
            positions: None,
        }
    }
}

impl<K: Clone + Eq + Hash> Members<K> {
    fn position(&self, key: &K) -> Option<usize> {
        match &self.positions {
            Some(positions) => positions.get(key).copied(),
            None => self.entries.iter().position(|(k, _)| k == key),
        }
    }

    /// Add or replace; `true` when `key` was not there.
    fn insert(&mut self, key: K, subscription: Subscription) -> bool {
        if let Some(index) = self.position(&key) {
            self.entries[index].1 = subscription;
            return false;
        }
        if let Some(positions) = &mut self.positions {
            positions.insert(key.clone(), self.entries.len());
        }
        if self.entries.len() < 4 {
            // Most filters have one subscriber: do not reserve room for four.
            self.entries.reserve_exact(1);
        }
        self.entries.push((key, subscription));
        if self.positions.is_none() && self.entries.len() > INDEX_ABOVE {
            let positions = self
                .entries
                .iter()
                .enumerate()
                .map(|(index, (key, _))| (key.clone(), index))
                .collect();
            self.positions = Some(Box::new(positions));
        }
        true
    }

    fn remove(&mut self, key: &K) -> bool {
        let Some(index) = self.position(key) else {
            return false;
        };
        self.entries.swap_remove(index);
        if let Some(positions) = &mut self.positions {
            positions.remove(key);
            if let Some((moved, _)) = self.entries.get(index) {
                positions.insert(moved.clone(), index);
            }
            if self.entries.len() <= INDEX_ABOVE / 2 {
                self.positions = None;
            }
        }
        // Give memory back after a large group has mostly left.
        if self.entries.capacity() > 4 * self.entries.len().max(4) {
            self.entries.shrink_to_fit();
        }
        true
    }
}

/// Capacity of [`PendingBranches`] before it spills to the heap.
const INLINE_BRANCHES: usize = 16;

/// A LIFO of branches still to visit: on the stack for the usual shallow case, on the heap only
/// when a topic meets more than [`INLINE_BRANCHES`] `+` nodes at once.
struct PendingBranches<'a, K> {
    inline: [Option<Branch<'a, K>>; INLINE_BRANCHES],
    inline_len: usize,
    spilled: Vec<Branch<'a, K>>,
}

impl<'a, K> PendingBranches<'a, K> {
    fn new() -> Self {
        PendingBranches {
            inline: [None; INLINE_BRANCHES],
            inline_len: 0,
            spilled: Vec::new(),
        }
    }

    fn push(&mut self, branch: Branch<'a, K>) {
        if self.inline_len < INLINE_BRANCHES {
            self.inline[self.inline_len] = Some(branch);
            self.inline_len += 1;
        } else {
            self.spilled.push(branch);
        }
    }

    fn pop(&mut self) -> Option<Branch<'a, K>> {
        if let Some(branch) = self.spilled.pop() {
            return Some(branch);
        }
        if self.inline_len == 0 {
            return None;
        }
        self.inline_len -= 1;
        self.inline[self.inline_len].take()
    }
}

/// Up to this many children a node keeps them in a vector; beyond, in a hash map.
const FEW_LEVELS: usize = 8;

/// The children of a trie node by level name, shared by the subscription and retained tries.
///
/// Most nodes have one child (`devices/<id>/cmd` below `<id>`) or very many (the `<id>` level
/// itself). A hash map costs at least four buckets even for one entry, so small sets live in an
/// exactly sized vector and are searched linearly; large ones get a map.
#[derive(Debug)]
pub(crate) enum LevelMap<V> {
    /// At most [`FEW_LEVELS`] entries (a few more only while shrinking).
    Few(Vec<(Box<str>, V)>),
    /// More than [`FEW_LEVELS`] entries; boxed so that the enum stays the size of a vector.
    #[allow(
        clippy::box_collection,
        reason = "keeps every trie node 24 bytes smaller"
    )]
    Many(Box<HashMap<Box<str>, V>>),
}

impl<V> Default for LevelMap<V> {
    fn default() -> Self {
        LevelMap::Few(Vec::new())
    }
}

impl<V> LevelMap<V> {
    /// Number of children.
    pub(crate) fn len(&self) -> usize {
        match self {
            LevelMap::Few(entries) => entries.len(),
            LevelMap::Many(map) => map.len(),
        }
    }

    /// Whether there is no child.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The child named `level`.
    pub(crate) fn get(&self, level: &str) -> Option<&V> {
        self.get_key_value(level).map(|(_, value)| value)
    }

    /// The child named `level`, with the stored name (which outlives `level`).
    pub(crate) fn get_key_value(&self, level: &str) -> Option<(&str, &V)> {
        match self {
            LevelMap::Few(entries) => entries
                .iter()
                .find(|(key, _)| **key == *level)
                .map(|(key, value)| (&**key, value)),
            LevelMap::Many(map) => map.get_key_value(level).map(|(key, value)| (&**key, value)),
        }
    }

    /// The child named `level`, mutably.
    pub(crate) fn get_mut(&mut self, level: &str) -> Option<&mut V> {
        match self {
            LevelMap::Few(entries) => entries
                .iter_mut()
                .find(|(key, _)| **key == *level)
                .map(|(_, value)| value),
            LevelMap::Many(map) => map.get_mut(level),
        }
    }

    /// The entry for `level`, created with `create` if missing (only then is the key allocated).
    pub(crate) fn get_or_insert_with(&mut self, level: &str, create: impl FnOnce() -> V) -> &mut V {
        if let LevelMap::Few(entries) = self
            && entries.len() >= FEW_LEVELS
            && !entries.iter().any(|(key, _)| **key == *level)
        {
            let map: HashMap<Box<str>, V> = entries.drain(..).collect();
            *self = LevelMap::Many(Box::new(map));
        }
        match self {
            LevelMap::Few(entries) => {
                let index = match entries.iter().position(|(key, _)| **key == *level) {
                    Some(index) => index,
                    None => {
                        // Grow one by one: the default growth would double a one-child node.
                        entries.reserve_exact(1);
                        entries.push((level.into(), create()));
                        entries.len() - 1
                    }
                };
                &mut entries[index].1
            }
            LevelMap::Many(map) => {
                if !map.contains_key(level) {
                    map.insert(level.into(), create());
                }
                map.get_mut(level).expect("entry was inserted above")
            }
        }
    }

    /// Remove the child named `level`, giving memory back as the map shrinks.
    pub(crate) fn remove(&mut self, level: &str) -> Option<V> {
        match self {
            LevelMap::Few(entries) => {
                let index = entries.iter().position(|(key, _)| **key == *level)?;
                let (_, value) = entries.swap_remove(index);
                entries.shrink_to_fit();
                Some(value)
            }
            LevelMap::Many(map) => {
                let value = map.remove(level)?;
                if map.len() <= FEW_LEVELS / 2 {
                    let mut entries = Vec::with_capacity(map.len());
                    entries.extend(map.drain());
                    *self = LevelMap::Few(entries);
                } else if map.capacity() > 4 * map.len() {
                    map.shrink_to_fit();
                }
                Some(value)
            }
        }
    }

    /// Every child with its name.
    pub(crate) fn iter(&self) -> LevelIter<'_, V> {
        match self {
            LevelMap::Few(entries) => LevelIter::Few(entries.iter()),
            LevelMap::Many(map) => LevelIter::Many(map.iter()),
        }
    }

    /// Move every value out into `into`, leaving the map empty.
    pub(crate) fn drain_into(&mut self, into: &mut Vec<V>) {
        match std::mem::take(self) {
            LevelMap::Few(entries) => into.extend(entries.into_iter().map(|(_, value)| value)),
            LevelMap::Many(map) => into.extend(map.into_values()),
        }
    }
}

/// Iterator over the entries of a [`LevelMap`], in no particular order.
#[derive(Debug)]
pub(crate) enum LevelIter<'a, V> {
    /// Over a [`LevelMap::Few`].
    Few(std::slice::Iter<'a, (Box<str>, V)>),
    /// Over a [`LevelMap::Many`].
    Many(std::collections::hash_map::Iter<'a, Box<str>, V>),
}

impl<'a, V> Iterator for LevelIter<'a, V> {
    type Item = (&'a str, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, value) = match self {
            LevelIter::Few(entries) => entries.next().map(|(key, value)| (key, value)),
            LevelIter::Many(entries) => entries.next(),
        }?;
        Some((&**key, value))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    fn subscription(identifier: u32) -> Subscription {
        Subscription {
            options: SubscriptionOptions::default(),
            identifier: Some(identifier),
        }
    }

    /// Every delivery for `topic` as (key, identifier), sorted, all sessions online.
    fn deliveries<K: Clone + Eq + Hash + Ord>(
        tree: &SubscriptionTree<K>,
        topic: &str,
    ) -> Vec<(K, Option<u32>)> {
        let mut delivered = Vec::new();
        tree.for_each_match(
            topic,
            |_| true,
            |key, sub| delivered.push((key.clone(), sub.identifier)),
        );
        delivered.sort();
        delivered
    }

    fn keys_for(tree: &SubscriptionTree<&'static str>, topic: &str) -> Vec<&'static str> {
        deliveries(tree, topic)
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    #[test]
    fn wildcards_and_literals_match_like_the_spec() {
        let mut tree = SubscriptionTree::new();
        for (key, filter) in [
            ("exact", "sport/tennis/player1"),
            ("plus_end", "sport/tennis/+"),
            ("plus_mid", "sport/+/player1"),
            ("hash_parent", "sport/tennis/player1/#"),
            ("hash_sport", "sport/#"),
            ("hash_all", "#"),
            ("plus_plus", "+/+"),
            ("slash_plus", "/+"),
            ("other", "sport/golf"),
        ] {
            assert!(tree.subscribe(filter, key, subscription(0)));
        }
        assert_eq!(tree.len(), 9);

        assert_eq!(
            keys_for(&tree, "sport/tennis/player1"),
            [
                "exact",
                "hash_all",
                "hash_parent",
                "hash_sport",
                "plus_end",
                "plus_mid"
            ]
        );
        assert_eq!(
            keys_for(&tree, "sport/tennis/player1/ranking"),
            ["hash_all", "hash_parent", "hash_sport"]
        );
        assert_eq!(keys_for(&tree, "sport"), ["hash_all", "hash_sport"]);
        assert_eq!(
            keys_for(&tree, "sport/"),
            ["hash_all", "hash_sport", "plus_plus"]
        );
        assert_eq!(
            keys_for(&tree, "/finance"),
            ["hash_all", "plus_plus", "slash_plus"]
        );
        assert_eq!(keys_for(&tree, "finance"), ["hash_all"]);
        assert_eq!(
            keys_for(&tree, "sport/golf"),
            ["hash_all", "hash_sport", "other", "plus_plus"]
        );
    }

    #[test]
    fn dollar_topics_skip_wildcards_at_the_first_level_only() {
        let mut tree = SubscriptionTree::new();
        for (key, filter) in [
            ("hash", "#"),
            ("plus_hash", "+/#"),
            ("plus_monitor", "+/monitor/Clients"),
            ("sys_hash", "$SYS/#"),
            ("sys_plus", "$SYS/monitor/+"),
            ("sys_exact", "$SYS/monitor/Clients"),
        ] {
            tree.subscribe(filter, key, subscription(0));
        }
        assert_eq!(
            keys_for(&tree, "$SYS/monitor/Clients"),
            ["sys_exact", "sys_hash", "sys_plus"]
        );
        assert_eq!(keys_for(&tree, "$SYS"), ["sys_hash"]);
        assert_eq!(
            keys_for(&tree, "a/monitor/Clients"),
            ["hash", "plus_hash", "plus_monitor"]
        );
        // `$` below the first level is an ordinary character.
        assert_eq!(keys_for(&tree, "a/$x"), ["hash", "plus_hash"]);
    }

    #[test]
    fn overlapping_filters_give_one_call_each() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe("a/+", "c", subscription(1));
        tree.subscribe("a/#", "c", subscription(2));
        tree.subscribe("a/b", "c", subscription(3));
        assert_eq!(
            deliveries(&tree, "a/b"),
            [("c", Some(1)), ("c", Some(2)), ("c", Some(3))]
        );
    }

    #[test]
    fn subscribe_replaces_and_unsubscribe_removes() {
        let mut tree = SubscriptionTree::new();
        assert!(tree.subscribe("a/b", "c", subscription(1)));
        assert!(!tree.subscribe("a/b", "c", subscription(2)));
        assert_eq!(tree.len(), 1);
        assert_eq!(deliveries(&tree, "a/b"), [("c", Some(2))]);

        assert!(tree.subscribe("a/b", "d", subscription(3)));
        assert!(tree.subscribe("$share/g/a/b", "c", subscription(4)));
        assert!(!tree.subscribe("$share/g/a/b", "c", subscription(5)));
        assert_eq!(tree.len(), 3);

        assert!(!tree.unsubscribe("a/b", &"nobody"));
        assert!(!tree.unsubscribe("a/c", &"c"));
        assert!(!tree.unsubscribe("a/+", &"c"));
        assert!(!tree.unsubscribe("a/b/#", &"c"));
        assert!(!tree.unsubscribe("$share/h/a/b", &"c"));
        assert!(tree.unsubscribe("a/b", &"c"));
        assert!(!tree.unsubscribe("a/b", &"c"));
        assert_eq!(tree.len(), 2);
        assert_eq!(deliveries(&tree, "a/b"), [("c", Some(5)), ("d", Some(3))]);

        assert!(tree.unsubscribe("$share/g/a/b", &"c"));
        assert!(tree.unsubscribe("a/b", &"d"));
        assert_eq!(tree.len(), 0);
        assert_eq!(deliveries(&tree, "a/b"), []);
    }

    #[test]
    fn unsubscribe_prunes_empty_nodes_but_keeps_shared_paths() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe("a/b/c/d", "x", subscription(0));
        tree.subscribe("a/b/+/e", "x", subscription(0));
        tree.subscribe("a/b/#", "y", subscription(0));
        tree.subscribe("a/f", "y", subscription(0));
        tree.subscribe("#", "z", subscription(0));
        tree.subscribe("$share/g/a/b/c/d/#", "z", subscription(0));
        // root, a, b, c, d, +, e, f
        assert_eq!(tree.node_count(), 8);

        assert!(tree.unsubscribe("a/b/+/e", &"x"));
        assert_eq!(tree.node_count(), 6);
        // `d` still holds the shared group's `#` set.
        assert!(tree.unsubscribe("a/b/c/d", &"x"));
        assert_eq!(tree.node_count(), 6);
        assert!(tree.unsubscribe("$share/g/a/b/c/d/#", &"z"));
        assert_eq!(tree.node_count(), 4);
        // `b` still holds `a/b/#`'s subscriber.
        assert!(tree.unsubscribe("a/f", &"y"));
        assert_eq!(tree.node_count(), 3);
        assert!(tree.unsubscribe("a/b/#", &"y"));
        assert_eq!(tree.node_count(), 1);
        assert!(tree.unsubscribe("#", &"z"));
        assert_eq!(tree.node_count(), 1);
        assert_eq!(tree.len(), 0);
        assert!(tree.root.multi_level.is_none());
        assert!(tree.root.exact.is_empty());
    }

    #[test]
    fn shared_group_rotates_fairly_through_its_members() {
        let mut tree = SubscriptionTree::new();
        for key in ["m1", "m2", "m3"] {
            tree.subscribe("$share/g/sensors/+", key, subscription(0));
        }
        let mut picks = Vec::new();
        for _ in 0..300 {
            tree.for_each_match("sensors/t", |_| true, |key, _| picks.push(*key));
        }
        assert_eq!(picks.len(), 300);
        // Strict rotation: every window of three holds each member once.
        for window in picks.chunks(3) {
            let distinct: BTreeSet<_> = window.iter().collect();
            assert_eq!(distinct.len(), 3, "{window:?}");
        }
    }

    #[test]
    fn shared_group_prefers_online_members() {
        let mut tree = SubscriptionTree::new();
        for key in ["m1", "m2", "m3", "m4"] {
            tree.subscribe("$share/g/t", key, subscription(0));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for _ in 0..300 {
            tree.for_each_match(
                "t",
                |key| *key != "m2" && *key != "m3",
                |key, _| *counts.entry(*key).or_default() += 1,
            );
        }
        // The two online members share the load evenly; offline ones get nothing.
        assert_eq!(counts, BTreeMap::from([("m1", 150), ("m4", 150)]));

        // Nobody online: still one delivery per message, rotating over everyone.
        counts.clear();
        for _ in 0..400 {
            tree.for_each_match(
                "t",
                |_| false,
                |key, _| *counts.entry(*key).or_default() += 1,
            );
        }
        assert_eq!(
            counts,
            BTreeMap::from([("m1", 100), ("m2", 100), ("m3", 100), ("m4", 100)])
        );
    }

    #[test]
    fn one_delivery_per_matching_group() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe("$share/g1/a/+", "c", subscription(1));
        tree.subscribe("$share/g1/a/+", "d", subscription(1));
        tree.subscribe("$share/g2/a/#", "c", subscription(2));
        // Same group name, different filter: a different group.
        tree.subscribe("$share/g1/a/b", "c", subscription(3));
        tree.subscribe("a/b", "c", subscription(4));
        tree.subscribe("$share/g3/x", "c", subscription(5));

        let delivered = deliveries(&tree, "a/b");
        let identifiers: Vec<_> = delivered.iter().map(|(_, id)| *id).collect();
        assert_eq!(identifiers, [Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(tree.len(), 6);
    }

    #[test]
    fn concurrent_matching_keeps_a_strict_rotation() {
        let mut tree = SubscriptionTree::new();
        for key in 0..4u32 {
            tree.subscribe("$share/g/load", key, subscription(0));
        }
        let counts: [AtomicUsize; 4] = Default::default();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        tree.for_each_match(
                            "load",
                            |_| true,
                            |key, _| {
                                counts[*key as usize].fetch_add(1, Ordering::Relaxed);
                            },
                        );
                    }
                });
            }
        });
        let counts = counts.map(|count| count.into_inner());
        assert_eq!(counts, [1000; 4]);
    }

    #[test]
    fn large_groups_use_an_index_and_stay_consistent() {
        const GROUP: u32 = 1000;
        let mut tree = SubscriptionTree::new();
        for key in 0..100u32 {
            assert!(tree.subscribe("$share/g/t", key, subscription(GROUP + key)));
            assert!(tree.subscribe("t", key, subscription(key)));
        }
        assert!(!tree.subscribe("t", 42, subscription(42)));
        assert_eq!(tree.len(), 200);
        // Remove most members, in an order that moves entries around inside the index.
        for key in (0..100u32).rev().filter(|key| key % 3 != 0) {
            assert!(tree.unsubscribe("$share/g/t", &key));
            assert!(tree.unsubscribe("t", &key));
            assert!(!tree.unsubscribe("t", &key));
        }
        let remaining: BTreeSet<u32> = (0..100).filter(|key| key % 3 == 0).collect();
        assert_eq!(tree.len(), 2 * remaining.len());

        let mut group_picks = Vec::new();
        for _ in 0..remaining.len() {
            let mut plain = BTreeSet::new();
            tree.for_each_match(
                "t",
                |_| true,
                |key, sub| match sub.identifier {
                    Some(id) if id >= GROUP => group_picks.push(*key),
                    _ => {
                        plain.insert(*key);
                    }
                },
            );
            assert_eq!(plain, remaining);
        }
        // One full rotation visits every remaining member once.
        let picked: BTreeSet<u32> = group_picks.iter().copied().collect();
        assert_eq!(group_picks.len(), remaining.len());
        assert_eq!(picked, remaining);
    }

    #[test]
    fn many_pending_plus_branches_spill_to_the_heap() {
        // Along `a/a/.../a` every node also has a `+` child: 40 branches wait at once.
        let depth = 40;
        let mut tree = SubscriptionTree::new();
        tree.subscribe(&vec!["a"; depth].join("/"), 0u32, subscription(0));
        for position in 0..depth {
            let mut levels = vec!["a"; depth];
            levels[position] = "+";
            tree.subscribe(&levels.join("/"), position as u32 + 1, subscription(0));
        }
        let delivered = deliveries(&tree, &vec!["a"; depth].join("/"));
        assert_eq!(delivered.len(), depth + 1);
        assert_eq!(deliveries(&tree, &vec!["b"; depth].join("/")), []);
    }

    #[test]
    fn deep_filters_neither_recurse_nor_overflow() {
        // The longest possible filter: 32,768 levels. Recursing once per level would overflow
        // the 2 MiB stack of a test thread (and of a Tokio worker).
        let levels = 32_768;
        let filter = vec!["+"; levels].join("/");
        let topic = vec!["x"; levels].join("/");
        let mut tree = SubscriptionTree::new();
        tree.subscribe(&filter, 1u32, subscription(0));
        tree.subscribe(&topic, 2u32, subscription(0));
        tree.subscribe(&format!("{topic}/#"), 3u32, subscription(0));
        assert_eq!(
            deliveries(&tree, &topic),
            [(1, Some(0)), (2, Some(0)), (3, Some(0))]
        );
        assert!(tree.unsubscribe(&filter, &1));
        assert_eq!(tree.node_count(), levels + 1);
        // Dropping the tree with a deep branch left in it.
        drop(tree);
    }

    #[test]
    fn wide_levels_match_and_prune() {
        let mut tree = SubscriptionTree::new();
        for device in 0..50u32 {
            tree.subscribe(
                &format!("devices/{device}/cmd"),
                device,
                subscription(device),
            );
        }
        tree.subscribe("devices/+/cmd", 1000, subscription(1000));
        assert!(matches!(
            tree.root.child("devices").unwrap().children,
            LevelMap::Many(_)
        ));
        assert_eq!(
            deliveries(&tree, "devices/42/cmd"),
            [(42, Some(42)), (1000, Some(1000))]
        );
        assert_eq!(deliveries(&tree, "devices/50/cmd"), [(1000, Some(1000))]);
        for device in 0..50u32 {
            assert!(tree.unsubscribe(&format!("devices/{device}/cmd"), &device));
        }
        assert_eq!(tree.node_count(), 4);
        assert!(tree.unsubscribe("devices/+/cmd", &1000));
        assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn level_map_switches_between_vector_and_map() {
        let mut map = LevelMap::default();
        for index in 0..FEW_LEVELS {
            *map.get_or_insert_with(&index.to_string(), || 0) += index;
        }
        assert!(matches!(map, LevelMap::Few(_)));
        *map.get_or_insert_with("extra", || 100) += 1;
        assert!(matches!(map, LevelMap::Many(_)));
        assert_eq!(map.len(), FEW_LEVELS + 1);
        assert_eq!(map.get("extra"), Some(&101));
        assert_eq!(map.get("3"), Some(&3));
        assert_eq!(map.get_key_value("4"), Some(("4", &4)));
        for index in 0..FEW_LEVELS {
            assert_eq!(map.remove(&index.to_string()), Some(index));
        }
        assert!(matches!(map, LevelMap::Few(_)));
        assert_eq!(map.remove("nothing"), None);
        let mut values = Vec::new();
        map.drain_into(&mut values);
        assert_eq!(values, [101]);
        assert!(map.is_empty());
    }

    /// A subscribe or unsubscribe for the property test.
    #[derive(Debug, Clone)]
    enum Operation {
        Subscribe { filter: String, key: u32 },
        Unsubscribe { filter: String, key: u32 },
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just("a"), Just("b"), Just("$SYS"), Just("$x"),]
    }

    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("non-empty", |topic| !topic.is_empty())
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let filter_level = prop_oneof![3 => level(), 2 => Just("+")];
        let group = prop::option::of(prop_oneof![Just("g1"), Just("g2")]);
        (
            prop::collection::vec(filter_level, 0..5),
            any::<bool>(),
            group,
        )
            .prop_filter_map(
                "a filter is at least one character",
                |(mut levels, multi_level, group)| {
                    if multi_level {
                        levels.push("#");
                    }
                    let filter = levels.join("/");
                    if filter.is_empty() {
                        return None;
                    }
                    Some(match group {
                        Some(group) => format!("$share/{group}/{filter}"),
                        None => filter,
                    })
                },
            )
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            3 => (topic_filter(), 0..4u32).prop_map(|(filter, key)| Operation::Subscribe { filter, key }),
            1 => (topic_filter(), 0..4u32).prop_map(|(filter, key)| Operation::Unsubscribe { filter, key }),
        ]
    }

    proptest! {
        #[test]
        fn level_map_behaves_like_a_map(
            operations in prop::collection::vec((0..24u32, any::<bool>()), 0..200)
        ) {
            let mut map = LevelMap::default();
            let mut model = BTreeMap::new();
            for (key, insert) in operations {
                let level = key.to_string();
                if insert {
                    *map.get_or_insert_with(&level, || 0) += 1;
                    *model.entry(level).or_insert(0) += 1;
                } else {
                    prop_assert_eq!(map.remove(&level), model.remove(&level));
                }
                prop_assert_eq!(map.len(), model.len());
            }
            let mut entries: Vec<(String, u32)> =
                map.iter().map(|(level, count)| (level.to_owned(), *count)).collect();
            entries.sort();
            prop_assert_eq!(entries, model.into_iter().collect::<Vec<_>>());
        }
    }

    proptest! {
        #[test]
        fn trie_agrees_with_a_brute_force_scan(
            operations in prop::collection::vec(operation(), 0..40),
            topics in prop::collection::vec(topic_name(), 1..8),
        ) {
            let mut tree = SubscriptionTree::new();
            // The model: (filter, key) pairs, and an identifier per filter so that deliveries
            // can be traced back to it.
            let mut model: BTreeSet<(String, u32)> = BTreeSet::new();
            let mut identifiers: BTreeMap<String, u32> = BTreeMap::new();
            for operation in &operations {
                match operation {
                    Operation::Subscribe { filter, key } => {
                        let next_id = identifiers.len() as u32;
                        let id = *identifiers.entry(filter.clone()).or_insert(next_id);
                        let added = tree.subscribe(filter, *key, subscription(id));
                        prop_assert_eq!(added, model.insert((filter.clone(), *key)));
                    }
                    Operation::Unsubscribe { filter, key } => {
                        let removed = tree.unsubscribe(filter, key);
                        prop_assert_eq!(removed, model.remove(&(filter.clone(), *key)));
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
            }

            let shared_ids: BTreeSet<u32> = identifiers
                .iter()
                .filter(|(filter, _)| filter.starts_with("$share/"))
                .map(|(_, id)| *id)
                .collect();
            let online = |key: &u32| key.is_multiple_of(2);
            for topic in &topics {
                let mut expected_plain: Vec<(u32, u32)> = Vec::new();
                let mut expected_groups: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
                for (filter, key) in &model {
                    let id = identifiers[filter];
                    match topic::parse_shared(filter).unwrap() {
                        Some((_, inner)) => {
                            if topic::matches(inner, topic) {
                                expected_groups.entry(id).or_default().insert(*key);
                            }
                        }
                        None => {
                            if topic::matches(filter, topic) {
                                expected_plain.push((*key, id));
                            }
                        }
                    }
                }
                let mut actual_plain = Vec::new();
                let mut actual_groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
                tree.for_each_match(topic, online, |key, sub| {
                    let id = sub.identifier.unwrap();
                    if shared_ids.contains(&id) {
                        actual_groups.entry(id).or_default().push(*key);
                    } else {
                        actual_plain.push((*key, id));
                    }
                });
                expected_plain.sort_unstable();
                actual_plain.sort_unstable();
                prop_assert_eq!(&actual_plain, &expected_plain, "topic {}", topic);
                let actual_group_ids: BTreeSet<u32> = actual_groups.keys().copied().collect();
                let expected_group_ids: BTreeSet<u32> = expected_groups.keys().copied().collect();
                prop_assert_eq!(actual_group_ids, expected_group_ids, "topic {}", topic);
                for (id, picked) in &actual_groups {
                    let members = &expected_groups[id];
                    prop_assert_eq!(picked.len(), 1, "one delivery per group");
                    prop_assert!(members.contains(&picked[0]));
                    if members.iter().any(online) {
                        prop_assert!(online(&picked[0]), "an online member is preferred");
                    }
                }
            }

            // Removing everything leaves only the root.
            for (filter, key) in &model {
                prop_assert!(tree.unsubscribe(filter, key));
            }
            prop_assert_eq!(tree.len(), 0);
            prop_assert_eq!(tree.node_count(), 1);
        }
    }
}
