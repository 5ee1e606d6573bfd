//! Retained messages by topic, queried with topic filters when a subscription is made.
//!
//! Placeholder implementation (map scan) with the final interface; replaced by a trie.

use std::collections::HashMap;

use polyhub_mqtt::topic;

/// Retained messages keyed by topic name. `M` is the broker's message type.
#[derive(Debug)]
pub(crate) struct RetainedStore<M> {
    messages: HashMap<String, M>,
}

impl<M> RetainedStore<M> {
    pub(crate) fn new() -> Self {
        RetainedStore {
            messages: HashMap::new(),
        }
    }

    /// Store `message` as the retained message of `topic_name`, replacing any previous one.
    pub(crate) fn insert(&mut self, topic_name: &str, message: M) {
        self.messages.insert(topic_name.to_owned(), message);
    }

    /// Forget the retained message of `topic_name`; `true` if there was one.
    pub(crate) fn remove(&mut self, topic_name: &str) -> bool {
        self.messages.remove(topic_name).is_some()
    }

    /// Call `found` for each retained message whose topic matches `filter` (a plain filter,
    /// not `$share/...`).
    pub(crate) fn for_each_match(&self, filter: &str, mut found: impl FnMut(&str, &M)) {
        for (topic_name, message) in &self.messages {
            if topic::matches(filter, topic_name) {
                found(topic_name, message);
            }
        }
    }

    /// Number of retained messages.
    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }
}
