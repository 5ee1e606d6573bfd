//! Routing: subscriptions, retained messages, and fanning a published message out to the
//! queues of the sessions whose subscriptions match it.
//!
//! Routing runs in the publisher's task. It holds the subscription tree's read lock only while
//! collecting targets, then pushes one [`Delivery`] per target session into that session's
//! queue. It never waits for a subscriber: a slow or offline one only fills its own bounded
//! queue.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use polyhub_mqtt::{QoS, topic};
use tokio::time::Instant;

use crate::broker::Shared;
use crate::message::{Delivery, Message};
use crate::session::{Session, SessionKey};
use crate::subscriptions::Subscription;

thread_local! {
    /// The vector routing collects targets in, kept per thread so that routing a message
    /// allocates nothing for it; always left empty (a target holds its session alive).
    static TARGET_SCRATCH: Cell<Vec<Target>> = const { Cell::new(Vec::new()) };
}

/// One session a message goes to, merged over all its matching subscriptions.
struct Target {
    session: SessionKey,
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
}

impl Shared {
    /// Route `message`: give it its sequence number, store or clear it as retained, then queue
    /// it for every matching session. Returns how many sessions it matched.
    pub(crate) fn publish(&self, message: Message) -> usize {
        self.publish_noting_backlog(message, &mut None)
    }

    /// [`Shared::publish`], also setting `backed_up` to a matched session whose publishers
    /// should pause (see [`Session::is_backed_up`]).
    pub(crate) fn publish_noting_backlog(
        &self,
        mut message: Message,
        backed_up: &mut Option<Arc<Session>>,
    ) -> usize {
        message.seq = self.next_seq();
        let message = Arc::new(message);
        if message.retain {
            let mut retained = self.retained.lock();
            if message.payload.is_empty() {
                retained.remove(&message.topic);
            } else {
                retained.insert(&message.topic, Arc::clone(&message));
            }
            self.stats
                .retained_messages
                .store(retained.len() as u64, Ordering::Relaxed);
        }

        let mut targets = TARGET_SCRATCH.try_with(Cell::take).unwrap_or_default();
        self.collect_targets(&message, &mut targets);
        let matched = targets.len();
        // The last target takes the message without an extra reference count round trip.
        let last = targets.pop();
        for target in targets.drain(..) {
            self.deliver(target, Arc::clone(&message), backed_up);
        }
        if let Some(target) = last {
            self.deliver(target, message, backed_up);
        }
        let _ = TARGET_SCRATCH.try_with(|scratch| scratch.set(targets));
        matched
    }

    fn deliver(&self, target: Target, message: Arc<Message>, backed_up: &mut Option<Arc<Session>>) {
        let delivery = Delivery {
            message,
            qos: target.qos,
            retain: target.retain,
            subscription_ids: target.subscription_ids,
        };
        let session = target.session.0;
        session.enqueue(delivery, &self.config, &self.stats);
        if session.is_backed_up() {
            *backed_up = Some(session);
        }
    }

    /// Matching sessions with the highest QoS of their matching subscriptions, every matching
    /// subscription identifier, and the retain flag per retain-as-published. One entry per
    /// session (MQTT 3.1.1 §3.3.5 requires it; MQTT 5 allows it).
    fn collect_targets(&self, message: &Message, targets: &mut Vec<Target>) {
        {
            let tree = self.subscriptions.read();
            tree.for_each_match(
                &message.topic,
                |key| key.0.is_online(),
                |key, subscription| {
                    if subscription.options.no_local && key.0.id == message.publisher {
                        return;
                    }
                    targets.push(Target {
                        session: key.clone(),
                        qos: message.qos.min(subscription.options.qos),
                        retain: message.retain && subscription.options.retain_as_published,
                        subscription_ids: subscription.identifier.into_iter().collect(),
                    });
                },
            );
        }
        if targets.len() > 1 {
            merge_per_session(targets);
        }
    }

    /// Add or replace `session`'s subscription to `filter`. Returns whether it is new.
    pub(crate) fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        subscription: Subscription,
    ) -> bool {
        let key = SessionKey(Arc::clone(session));
        let is_new = {
            let mut tree = self.subscriptions.write();
            let is_new = tree.subscribe(filter, key, subscription);
            self.stats
                .subscriptions
                .store(tree.len() as u64, Ordering::Relaxed);
            is_new
        };
        session
            .state
            .lock()
            .subscriptions
            .insert_with(filter.to_owned(), subscription);
        is_new
    }

    /// Remove `session`'s subscription to `filter`. Returns whether there was one.
    pub(crate) fn unsubscribe(&self, session: &Arc<Session>, filter: &str) -> bool {
        let key = SessionKey(Arc::clone(session));
        let existed = {
            let mut tree = self.subscriptions.write();
            let existed = tree.unsubscribe(filter, &key);
            self.stats
                .subscriptions
                .store(tree.len() as u64, Ordering::Relaxed);
            existed
        };
        session.state.lock().subscriptions.remove(filter);
        existed
    }

    /// Deliveries of the retained messages matching `filter` for a new subscription with
    /// `subscription`'s options: retain flag set, QoS capped, expired ones skipped.
    pub(crate) fn retained_for(&self, filter: &str, subscription: &Subscription) -> Vec<Delivery> {
        let now = Instant::now();
        let mut deliveries = Vec::new();
        let mut expired = Vec::new();
        let mut retained = self.retained.lock();
        retained.for_each_match(filter, |topic_name, message| {
            if message.is_expired(now) {
                expired.push(topic_name.to_owned());
                return;
            }
            deliveries.push(Delivery {
                message: Arc::clone(message),
                qos: message.qos.min(subscription.options.qos),
                retain: true,
                subscription_ids: subscription.identifier.into_iter().collect(),
            });
        });
        // Expired retained messages are forgotten when a subscription finds them.
        for topic_name in &expired {
            retained.remove(topic_name);
        }
        deliveries
    }

    /// End `session`: drop all its subscriptions and publish a will still waiting for its
    /// delay. The caller has already removed it from the sessions map.
    pub(crate) fn end_session(&self, session: &Arc<Session>) {
        let (filters, pending_will) = {
            let mut state = session.state.lock();
            state.queue.clear();
            state.inflight.clear();
            session.taken(0);
            (
                std::mem::take(&mut state.subscriptions),
                state.pending_will.take(),
            )
        };
        if !filters.is_empty() {
            let key = SessionKey(Arc::clone(session));
            let mut tree = self.subscriptions.write();
            for filter in &filters {
                tree.unsubscribe(filter, &key);
            }
            self.stats
                .subscriptions
                .store(tree.len() as u64, Ordering::Relaxed);
        }
        if let Some(will) = pending_will {
            tracing::debug!(client_id = %session.client_id, "Session ended: publishing its will.");
            self.publish(*will);
        }
    }

    /// Remove `session` from the sessions map if it is still the one registered for its client
    /// id. Returns whether it was.
    pub(crate) fn unregister_session(&self, session: &Arc<Session>) -> bool {
        let mut sessions = self.sessions.lock();
        match sessions.get(&session.client_id) {
            Some(current) if Arc::ptr_eq(current, session) => {
                sessions.remove(&session.client_id);
                true
            }
            _ => false,
        }
    }

    /// Whether `filter` may be subscribed to.
    pub(crate) fn filter_is_valid(filter: &str) -> bool {
        topic::validate_topic_filter(filter).is_ok()
    }
}

/// Merge targets of the same session into one: highest QoS, retain if any asks, all
/// subscription identifiers. In place: fan-out to many distinct sessions allocates nothing.
fn merge_per_session(targets: &mut Vec<Target>) {
    targets.sort_unstable_by_key(|target| target.session.0.id);
    targets.dedup_by(|later, kept| {
        if later.session != kept.session {
            return false;
        }
        kept.qos = kept.qos.max(later.qos);
        kept.retain |= later.retain;
        kept.subscription_ids.append(&mut later.subscription_ids);
        true
    });
}
