//! The subscription table: topic filter → subscribers, with `$share` groups.
//!
//! Placeholder implementation (linear scan) with the final interface; replaced by a trie.

use std::hash::Hash;

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
    entries: Vec<(String, K, Subscription)>,
}

impl<K: Clone + Eq + Hash> SubscriptionTree<K> {
    pub(crate) fn new() -> Self {
        SubscriptionTree {
            entries: Vec::new(),
        }
    }

    /// Add or replace `key`'s subscription to `filter` (which may be `$share/<group>/<f>`).
    /// Returns `true` when the subscription did not exist before.
    pub(crate) fn subscribe(&mut self, filter: &str, key: K, subscription: Subscription) -> bool {
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|(f, k, _)| f == filter && *k == key)
        {
            entry.2 = subscription;
            return false;
        }
        self.entries.push((filter.to_owned(), key, subscription));
        true
    }

    /// Remove `key`'s subscription to `filter`; `true` if there was one.
    pub(crate) fn unsubscribe(&mut self, filter: &str, key: &K) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(f, k, _)| !(f == filter && k == key));
        self.entries.len() != before
    }

    /// Call `deliver` for every subscription matching `topic`: each plain subscription, and one
    /// member per matching `$share` group, chosen round-robin among members for which `online`
    /// holds (any member when none is online).
    pub(crate) fn for_each_match(
        &self,
        topic_name: &str,
        online: impl Fn(&K) -> bool,
        mut deliver: impl FnMut(&K, &Subscription),
    ) {
        let _ = online;
        for (filter, key, subscription) in &self.entries {
            let inner = match topic::parse_shared(filter) {
                Ok(Some((_, inner))) => inner,
                _ => filter.as_str(),
            };
            if topic::matches(inner, topic_name) {
                deliver(key, subscription);
            }
        }
    }

    /// Number of subscriptions held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
