//! [`LocalBus`]: the hub's bus over the embedded broker's in-process clients.
//!
//! Persistent connects use the broker's persistent in-process sessions
//! ([`Broker::local_client_persistent`]): the broker keeps the subscriptions, the queue
//! (unbounded, never drops) and every message handed out and not acknowledged, saves them in
//! its snapshot (`broker.db`) and restores them, so a parser's session survives a restart of
//! polyhub, and a stopped hub's devices keep being queued for it. The hub needs this: a parser
//! acknowledges only what it has committed, and a parser that is restarted (in this process
//! or after a restart of polyhub) must get back what it had received but not committed.
//!
//! Within the process, the connector keeps the client id's [`LocalClient`] attached between
//! [`BusClient`] handles; the next handle with that id first gets every message that was
//! handed out and not acknowledged, marked redelivered and with its `seq`, then what arrived
//! since. A new handle takes the session over from one still alive, which then fails with
//! [`BusError::Closed`]. A non-persistent connect discards any session kept for its id (kept
//! here, or restored by the broker) and ends its own with the handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use polyhub_broker::{Broker, LocalClient, LocalMessage, MessageProperties, QoS};
use polyhub_hub::bus::{
    AckToken, BusClient, BusConnector, BusError, BusMessage, Outgoing, Routing,
};
use tokio_util::sync::CancellationToken;

use super::broker_error;

/// The hub's bus over the embedded broker: one per process, shared by every parser (it keeps
/// the persistent sessions).
#[derive(Debug)]
pub(crate) struct LocalBus {
    broker: Broker,
    /// Sessions of persistent client ids, kept between handles.
    persistent: Mutex<HashMap<String, Arc<Slot>>>,
}

/// A persistent client id's session and who owns it now.
#[derive(Debug)]
struct Slot {
    /// The owning handle's token; cancelled when another handle takes the session over, so
    /// that the old one lets go of the session lock at once.
    owner: Mutex<CancellationToken>,
    session: Arc<tokio::sync::Mutex<SessionState>>,
}

/// One client id's broker session and which handle owns it. The acknowledgement state (what
/// was handed out and not acknowledged, by token) is the broker's, in the session itself.
#[derive(Debug)]
struct SessionState {
    /// `None` once a non-persistent connect discarded the session.
    client: Option<LocalClient>,
    /// Which handle owns the session; older handles are refused.
    generation: u64,
}

impl SessionState {
    fn new(client: LocalClient) -> SessionState {
        SessionState {
            client: Some(client),
            generation: 0,
        }
    }

    /// Give the session to a new handle: what the previous one did not acknowledge is handed
    /// out again first (the broker's tokens are never reused within a session, so a token of
    /// an earlier handle can never acknowledge a later message).
    fn take_over(&mut self) -> u64 {
        self.generation += 1;
        if let Some(client) = &self.client {
            client.redeliver_unacknowledged();
        }
        self.generation
    }
}

impl LocalBus {
    /// A bus over `broker`.
    pub(crate) fn new(broker: Broker) -> LocalBus {
        LocalBus {
            broker,
            persistent: Mutex::new(HashMap::new()),
        }
    }

    /// A plain broker client for `client_id` (implicit acknowledgement, ends with the
    /// handle): unbounded, because ingest must never drop.
    fn local_client(&self, client_id: &str) -> Result<LocalClient, BusError> {
        self.broker
            .local_client_with_queue(client_id, 0)
            .map_err(broker_error)
    }

    /// The persistent broker session of `client_id`, resumed if the broker has it (kept from
    /// before, or restored from its snapshot): unbounded, because ingest must never drop.
    fn persistent_client(&self, client_id: &str) -> Result<LocalClient, BusError> {
        self.broker
            .local_client_persistent(client_id, 0)
            .map_err(broker_error)
    }

    /// The kept session of `client_id`, created if there is none.
    fn slot(&self, client_id: &str) -> Result<Arc<Slot>, BusError> {
        let mut persistent = self
            .persistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = persistent.get(client_id) {
            return Ok(Arc::clone(slot));
        }
        let slot = Arc::new(Slot {
            owner: Mutex::new(CancellationToken::new()),
            session: Arc::new(tokio::sync::Mutex::new(SessionState::new(
                self.persistent_client(client_id)?,
            ))),
        });
        persistent.insert(client_id.to_owned(), Arc::clone(&slot));
        Ok(slot)
    }

    /// End the kept session of `client_id`, if any (kept here, or restored by the broker and
    /// not resumed yet): its handle is cut off and the broker session (subscriptions, queue,
    /// unacknowledged messages) ends.
    async fn discard(&self, client_id: &str) {
        if !self.broker.discard_local_session(client_id)
            && let Ok(client) = self.broker.local_client_persistent(client_id, 0)
        {
            // A detached network session of that id (a process parser's): resumed here only to
            // end it.
            client.end_session();
        }
        let slot = self
            .persistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(client_id);
        if let Some(slot) = slot {
            slot.owner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .cancel();
            let mut state = slot.session.lock().await;
            state.generation += 1;
            // Ended (not only detached) before the id is reused.
            if let Some(client) = state.client.take() {
                client.end_session();
            }
        }
    }
}

#[async_trait]
impl BusConnector for LocalBus {
    async fn connect(
        &self,
        client_id: &str,
        persistent: bool,
    ) -> Result<Box<dyn BusClient>, BusError> {
        if !persistent {
            self.discard(client_id).await;
            let session = SessionState::new(self.local_client(client_id)?);
            return Ok(Box::new(LocalBusClient {
                client_id: client_id.to_owned(),
                session: Arc::new(tokio::sync::Mutex::new(session)),
                generation: 0,
                cancelled: CancellationToken::new(),
            }));
        }
        let slot = self.slot(client_id)?;
        let cancelled = CancellationToken::new();
        let previous = std::mem::replace(
            &mut *slot.owner.lock().unwrap_or_else(PoisonError::into_inner),
            cancelled.clone(),
        );
        previous.cancel();
        let generation = {
            let mut state = slot.session.lock().await;
            if state.client.is_none() {
                // The last handle let go (see `Drop for LocalBusClient`): resume the broker's
                // session, which a parser in another isolation may have used meanwhile.
                state.client = Some(self.persistent_client(client_id)?);
            }
            state.take_over()
        };
        Ok(Box::new(LocalBusClient {
            client_id: client_id.to_owned(),
            session: Arc::clone(&slot.session),
            generation,
            cancelled,
        }))
    }

    /// Creates (or resumes) the session as an unbounded in-process one and lets go of it: the
    /// child's CONNECT that keeps its session then resumes it as a network session with that
    /// queue bound (none), instead of `[mqtt.limits] max_queued_messages`.
    async fn prepare_session(&self, client_id: &str) -> Result<(), BusError> {
        drop(self.connect(client_id, true).await?);
        Ok(())
    }
}

/// One handle on a client id's session.
#[derive(Debug)]
struct LocalBusClient {
    client_id: String,
    session: Arc<tokio::sync::Mutex<SessionState>>,
    /// The session generation this handle owns.
    generation: u64,
    /// Cancelled when another handle takes the session over.
    cancelled: CancellationToken,
}

impl LocalBusClient {
    /// The session, if this handle still owns it. Never waits behind a newer owner: a
    /// takeover cancels this handle first.
    async fn session(&self) -> Result<tokio::sync::MutexGuard<'_, SessionState>, BusError> {
        let state = tokio::select! {
            state = self.session.lock() => state,
            () = self.cancelled.cancelled() => return Err(self.taken_over()),
        };
        if state.generation != self.generation || state.client.is_none() {
            return Err(self.taken_over());
        }
        Ok(state)
    }

    fn taken_over(&self) -> BusError {
        BusError::Closed(format!(
            "another connection took the session of {:?} over",
            self.client_id
        ))
    }
}

impl Drop for LocalBusClient {
    /// The handle that owns the session detaches the broker client when it goes, so that the
    /// session is free for whoever comes next: a parser of the same hub in process isolation
    /// resumes it over TCP (the broker turns it into a network session), or a later handle
    /// here resumes it. A handle that was taken over owns nothing.
    fn drop(&mut self) {
        if self.cancelled.is_cancelled() {
            return;
        }
        // Free unless a newer handle holds it, which would have cancelled this one first.
        if let Ok(mut state) = self.session.try_lock()
            && state.generation == self.generation
        {
            state.client = None;
        }
    }
}

/// The hub's view of a message from the broker.
fn bus_message(message: LocalMessage) -> BusMessage {
    BusMessage {
        topic: message.topic,
        payload: message.payload,
        qos: message.qos as u8,
        seq: Some(message.seq),
        redelivered: message.redelivered,
        token: AckToken(message.token),
        response_topic: message.properties.response_topic,
        correlation_data: message.properties.correlation_data,
        received_at: polyhub_store::now_millis(),
    }
}

#[async_trait]
impl BusClient for LocalBusClient {
    async fn subscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        let state = self.session().await?;
        let Some(client) = state.client.as_ref() else {
            return Err(self.taken_over());
        };
        // Routing sees each subscription as soon as it is made, so returning is enough.
        for filter in filters {
            client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(broker_error)?;
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        let state = self.session().await?;
        let Some(client) = state.client.as_ref() else {
            return Err(self.taken_over());
        };
        for filter in filters {
            client.unsubscribe(filter).await.map_err(broker_error)?;
        }
        Ok(())
    }

    /// Cancel safe: nothing is taken from the session while this waits.
    async fn recv(&mut self) -> Result<Option<BusMessage>, BusError> {
        let mut state = self.session().await?;
        let Some(client) = state.client.as_mut() else {
            return Err(self.taken_over());
        };
        // The session lock is held while waiting: only a takeover (which cancels this handle
        // first) needs it meanwhile.
        let received = tokio::select! {
            received = client.recv() => received,
            () = self.cancelled.cancelled() => return Err(self.taken_over()),
        };
        Ok(received.map(bus_message))
    }

    async fn ack(&mut self, tokens: &[AckToken]) -> Result<(), BusError> {
        let state = self.session().await?;
        let Some(client) = state.client.as_ref() else {
            return Err(self.taken_over());
        };
        // Unknown tokens (QoS 0, already acknowledged) are nothing to do.
        let tokens: Vec<u64> = tokens.iter().map(|token| token.0).collect();
        client.ack(&tokens);
        Ok(())
    }

    async fn publish(&mut self, message: Outgoing) -> Result<Routing, BusError> {
        let qos = QoS::from_u8(message.qos)
            .ok_or_else(|| BusError::Refused(format!("QoS {} does not exist", message.qos)))?;
        let state = self.session().await?;
        let Some(client) = state.client.as_ref() else {
            return Err(self.taken_over());
        };
        let properties = MessageProperties {
            correlation_data: message.correlation_data,
            response_topic: message.response_topic,
            ..MessageProperties::default()
        };
        let matched = client
            .publish_now(
                &message.topic,
                message.payload,
                qos,
                message.retain,
                properties,
            )
            .map_err(broker_error)?;
        // Routing is done by the time the call returns, whatever the QoS.
        Ok(if matched == 0 {
            Routing::NoSubscribers
        } else {
            Routing::Matched
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use polyhub_broker::BrokerConfig;

    use super::*;
    use crate::bus::test_support::{WAIT, filters, next, nothing_within, outgoing};

    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(50);

    async fn nothing(client: &mut Box<dyn BusClient>) {
        nothing_within(client, QUIET).await;
    }

    fn broker() -> Broker {
        Broker::new(BrokerConfig {
            sys_interval: 0,
            ..BrokerConfig::default()
        })
    }

    #[tokio::test]
    async fn unacknowledged_messages_come_again_to_the_next_handle_first() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        for n in ["1", "2", "3"] {
            device.publish(outgoing("data/x", n, 1)).await.unwrap();
        }
        let first = next(&mut parser).await;
        let second = next(&mut parser).await;
        assert_eq!(
            (first.payload.as_ref(), second.payload.as_ref()),
            (&b"1"[..], &b"2"[..])
        );
        assert!(!first.redelivered);
        let (first_seq, second_seq) = (first.seq.unwrap(), second.seq.unwrap());
        assert!(second_seq > first_seq);
        parser.ack(&[first.token]).await.unwrap();
        drop(parser);

        // Published while no handle is there: kept by the session.
        device.publish(outgoing("data/x", "4", 1)).await.unwrap();
        let mut parser = bus.connect("parser", true).await.unwrap();
        let again = next(&mut parser).await;
        assert_eq!(again.payload, Bytes::from_static(b"2"));
        assert!(again.redelivered);
        assert_eq!(again.seq, Some(second_seq));
        assert_ne!(again.token, second.token);
        // Then what had not been handed out yet, in order, as new messages.
        for payload in ["3", "4"] {
            let message = next(&mut parser).await;
            assert_eq!(message.payload, Bytes::from(payload));
            assert!(!message.redelivered);
        }
        nothing(&mut parser).await;
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn acknowledged_messages_are_not_redelivered() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        for n in ["1", "2"] {
            device.publish(outgoing("data/x", n, 1)).await.unwrap();
        }
        let tokens = [next(&mut parser).await.token, next(&mut parser).await.token];
        parser.ack(&tokens).await.unwrap();
        // A stale or repeated token is nothing to do.
        parser.ack(&tokens).await.unwrap();
        drop(parser);
        let mut parser = bus.connect("parser", true).await.unwrap();
        nothing(&mut parser).await;
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn a_redelivered_message_unacknowledged_again_comes_a_third_time() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        for n in ["1", "2"] {
            device.publish(outgoing("data/x", n, 1)).await.unwrap();
        }
        let _ = next(&mut parser).await;
        let _ = next(&mut parser).await;
        drop(parser);
        let mut parser = bus.connect("parser", true).await.unwrap();
        // Only the first of the two is handed out again before this handle goes too.
        assert_eq!(next(&mut parser).await.payload, Bytes::from_static(b"1"));
        drop(parser);
        let mut parser = bus.connect("parser", true).await.unwrap();
        for payload in ["1", "2"] {
            let message = next(&mut parser).await;
            assert_eq!(message.payload, Bytes::from(payload));
            assert!(message.redelivered);
        }
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn a_new_handle_takes_the_session_over_from_a_live_one() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut old = bus.connect("parser", true).await.unwrap();
        old.subscribe(&filters(&["data/#"])).await.unwrap();
        // The old handle is waiting in recv, holding the session.
        let waiting = tokio::spawn(async move {
            let result = old.recv().await;
            (old, result)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut new = tokio::time::timeout(WAIT, bus.connect("parser", true))
            .await
            .expect("takeover does not wait for the old handle")
            .unwrap();
        let (mut old, result) = waiting.await.unwrap();
        assert!(matches!(result, Err(BusError::Closed(_))), "{result:?}");
        assert!(matches!(old.ack(&[]).await, Err(BusError::Closed(_))));

        let mut device = bus.connect("device", false).await.unwrap();
        device.publish(outgoing("data/x", "1", 1)).await.unwrap();
        assert_eq!(next(&mut new).await.payload, Bytes::from_static(b"1"));
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn subscribe_and_unsubscribe_are_effective_on_return() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", false).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        parser.subscribe(&filters(&["a", "b/+"])).await.unwrap();
        // The in-process broker says whom a message reached, whatever its QoS.
        let routed = device.publish(outgoing("a", "1", 1)).await.unwrap();
        assert_eq!(routed, Routing::Matched);
        let routed = device.publish(outgoing("b/c", "2", 0)).await.unwrap();
        assert_eq!(routed, Routing::Matched);
        let first = next(&mut parser).await;
        assert_eq!((first.topic.as_str(), first.qos), ("a", 1));
        let second = next(&mut parser).await;
        assert_eq!((second.topic.as_str(), second.qos), ("b/c", 0));

        parser.unsubscribe(&filters(&["a"])).await.unwrap();
        let routed = device.publish(outgoing("a", "3", 1)).await.unwrap();
        assert_eq!(routed, Routing::NoSubscribers);
        let routed = device.publish(outgoing("a", "3", 0)).await.unwrap();
        assert_eq!(routed, Routing::NoSubscribers);
        device.publish(outgoing("b/d", "4", 1)).await.unwrap();
        assert_eq!(next(&mut parser).await.topic, "b/d");
        nothing(&mut parser).await;

        let refused = parser.subscribe(&filters(&["bad/#/filter"])).await;
        assert!(matches!(refused, Err(BusError::Refused(_))), "{refused:?}");
        let refused = device.publish(outgoing("bad/+", "x", 1)).await;
        assert!(matches!(refused, Err(BusError::Refused(_))), "{refused:?}");
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn publish_carries_retain_correlation_data_and_response_topic() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut device = bus.connect("device", false).await.unwrap();
        device
            .publish(Outgoing {
                topic: "reply/x".into(),
                payload: Bytes::from_static(b"{}"),
                qos: 1,
                retain: true,
                correlation_data: Some(Bytes::from_static(b"\x01\x02")),
                response_topic: Some("reply/x/answers".into()),
            })
            .await
            .unwrap();
        // The retained message reaches a later subscriber, its MQTT 5 properties included.
        let mut watcher = bus.connect("watcher", false).await.unwrap();
        watcher.subscribe(&filters(&["reply/#"])).await.unwrap();
        let message = next(&mut watcher).await;
        assert_eq!(
            message.correlation_data,
            Some(Bytes::from_static(b"\x01\x02"))
        );
        assert_eq!(message.response_topic.as_deref(), Some("reply/x/answers"));
        assert!(message.seq.is_some());
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn a_non_persistent_connect_ends_the_kept_session() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        drop(parser);
        let mut parser = bus.connect("parser", false).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        device.publish(outgoing("data/x", "1", 1)).await.unwrap();
        nothing(&mut parser).await;
        broker.shutdown().await;
    }

    /// A hub deleted after running in process isolation: its parser's detached network
    /// session ends too (and with it the subscription that would keep collecting).
    #[tokio::test]
    async fn a_non_persistent_connect_ends_a_detached_network_session_too() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let broker = broker();
        let serving = broker.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        let network = crate::bus::MqttBus::new(address);
        let mut child = network.connect("parser", true).await.unwrap();
        child.subscribe(&filters(&["data/#"])).await.unwrap();
        drop(child);

        let bus = LocalBus::new(broker.clone());
        // The network client's session may take a moment to detach.
        let mut discarded = None;
        for _ in 0..100 {
            if let Ok(client) = bus.connect("parser", false).await {
                discarded = Some(client);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(discarded.expect("the plain client takes the freed id"));
        let mut device = bus.connect("device", false).await.unwrap();
        device.publish(outgoing("data/x", "1", 1)).await.unwrap();
        let mut resumed = bus.connect("parser", true).await.unwrap();
        nothing(&mut resumed).await;
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_ends_recv_with_none() {
        let broker = broker();
        let bus = LocalBus::new(broker.clone());
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let waiting = tokio::spawn(async move { parser.recv().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        broker.shutdown().await;
        let result = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
        assert!(matches!(result, Ok(None)), "{result:?}");
        assert!(bus.connect("other", true).await.is_err());
    }
}
