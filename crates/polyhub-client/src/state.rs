//! The client side of an MQTT session, free of I/O.
//!
//! [`MqttState`] takes requests from the handles and packets from the broker, and answers with
//! bytes appended to a write buffer (packets encoded with `polyhub_mqtt::encode`), [`Event`]s
//! queued for the application, and results sent to the requests' waiters. It never touches a
//! socket or a clock: the event loop owns those, tells the state when a connection comes and
//! goes, and writes out what the state produced. That keeps every protocol rule here testable
//! with plain byte buffers.
//!
//! What it tracks:
//! - packet identifiers for outgoing PUBLISH (QoS 1/2), SUBSCRIBE and UNSUBSCRIBE: allocated
//!   round-robin, skipping identifiers still in use, never 0;
//! - the outgoing QoS 1/2 flows (PUBLISH → PUBACK, PUBLISH → PUBREC → PUBREL → PUBCOMP) and a
//!   send window of at most `min(inflight limit, broker's receive maximum)` of them; publishes
//!   beyond the window, or made while offline, wait in a bounded FIFO (`pending`);
//! - incoming QoS 2 identifiers between PUBREC and PUBREL, so a redelivered PUBLISH is not
//!   handed to the application twice (the message is delivered on PUBLISH, "method A");
//! - with manual acknowledgements, the incoming QoS 1/2 identifiers of this connection that
//!   the application has not acknowledged yet: their PUBACK / PUBREC waits for
//!   [`Client::ack`](crate::Client::ack), and a token from an earlier connection is ignored
//!   (the broker delivers such a message again, so acknowledging it here could acknowledge
//!   another message that reuses the identifier);
//! - the subscriptions the broker granted, to subscribe again after a reconnect to a broker that
//!   did not keep the session;
//! - MQTT 5 inbound topic aliases and the limits from CONNACK (receive maximum, maximum packet
//!   size, maximum QoS, retain available).
//!
//! Acknowledgements for unknown identifiers are not errors (brokers resend after reconnects):
//! a PUBACK, PUBCOMP, SUBACK or UNSUBACK nobody waits for is ignored; a PUBREC or PUBREL for an
//! unknown identifier is answered (PUBREL / PUBCOMP, with "packet identifier not found" in
//! MQTT 5) so that the broker's flow can finish.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use bytes::BytesMut;
use polyhub_mqtt::{
    ConnAck, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, SubAck,
    Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck, Unsubscribe, encode,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::client::{AckToken, Published};
use crate::error::{ClientError, StateError};
use crate::eventloop::Event;

/// Where the result of a request goes. Dropping it tells the requester the client shut down.
pub(crate) type Waiter<T> = oneshot::Sender<Result<T, ClientError>>;

/// Most filters resubscribed in one SUBSCRIBE after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 64;

/// A request from a [`Client`](crate::Client) handle to the event loop.
#[derive(Debug)]
pub(crate) enum Request {
    /// Publish; the waiter (absent for fire-and-forget QoS 0) learns the outcome.
    Publish {
        publish: Publish,
        waiter: Option<Waiter<Published>>,
    },
    /// Subscribe; the waiter gets one SUBACK code per filter.
    Subscribe {
        filters: Vec<SubscribeFilter>,
        properties: Properties,
        waiter: Waiter<Vec<ReasonCode>>,
    },
    /// Unsubscribe; the waiter gets one code per filter (all success in 3.x).
    Unsubscribe {
        filters: Vec<String>,
        properties: Properties,
        waiter: Waiter<Vec<ReasonCode>>,
    },
    /// Acknowledge messages received with manual acknowledgements.
    Ack { tokens: Vec<AckToken> },
    /// Send DISCONNECT and stop (handled by the event loop, not the state).
    Disconnect { waiter: Waiter<()> },
}

/// Settings the state machine needs, taken from [`ClientOptions`](crate::ClientOptions).
#[derive(Debug, Clone)]
pub(crate) struct StateConfig {
    pub(crate) version: ProtocolVersion,
    /// Our own cap on outgoing QoS 1/2 publishes awaiting acknowledgement.
    pub(crate) inflight_limit: u16,
    /// Most publishes waiting for the window or the connection.
    pub(crate) pending_limit: usize,
    /// Highest inbound topic alias we announce (MQTT 5).
    pub(crate) topic_alias_maximum: u16,
    /// Incoming QoS 1/2 messages are acknowledged by the application, not on receipt.
    pub(crate) manual_acks: bool,
}

/// What the broker allows, from its last CONNACK (MQTT 5 properties; 3.x brokers allow all).
#[derive(Debug, Clone, Copy)]
struct BrokerLimits {
    receive_maximum: u16,
    maximum_packet_size: Option<u32>,
    maximum_qos: QoS,
    retain_available: bool,
}

impl BrokerLimits {
    fn from_connack(connack: &ConnAck) -> BrokerLimits {
        let properties = &connack.properties;
        BrokerLimits {
            receive_maximum: properties.receive_maximum.unwrap_or(u16::MAX),
            maximum_packet_size: properties.maximum_packet_size,
            maximum_qos: match properties.maximum_qos {
                Some(0) => QoS::AtMostOnce,
                Some(1) => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            retain_available: properties.retain_available != Some(0),
        }
    }
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            receive_maximum: u16::MAX,
            maximum_packet_size: None,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
        }
    }
}

/// An outgoing packet that holds a packet identifier until the broker acknowledges it.
#[derive(Debug)]
enum Outgoing {
    Publish(OutgoingPublish),
    /// A SUBSCRIBE or UNSUBSCRIBE (kept whole, to send again after a reconnect).
    Control(OutgoingControl),
}

#[derive(Debug)]
struct OutgoingPublish {
    /// Order of creation, so that a reconnect resends in the original order.
    seq: u64,
    stage: PublishStage,
    waiter: Option<Waiter<Published>>,
    /// Sent on the current connection, so it occupies a slot of the send window.
    in_window: bool,
}

#[derive(Debug)]
enum PublishStage {
    /// Waiting for PUBACK (QoS 1) or PUBREC (QoS 2); the PUBLISH is kept for resending,
    /// boxed because a `Packet` is large and most entries soon move on.
    AwaitingAck { qos: QoS, packet: Box<Packet> },
    /// QoS 2 after PUBREC: PUBREL sent, waiting for PUBCOMP. The payload is no longer needed;
    /// what the PUBREC said about routing is kept for the outcome.
    AwaitingComp { received: Published },
}

#[derive(Debug)]
struct OutgoingControl {
    seq: u64,
    /// `Packet::Subscribe` or `Packet::Unsubscribe`.
    packet: Box<Packet>,
    /// `None` for the SUBSCRIBEs the client sends on its own after a reconnect.
    waiter: Option<Waiter<Vec<ReasonCode>>>,
}

impl Outgoing {
    fn seq(&self) -> u64 {
        match self {
            Outgoing::Publish(publish) => publish.seq,
            Outgoing::Control(control) => control.seq,
        }
    }
}

/// A publish waiting for the send window or for the connection.
#[derive(Debug)]
struct PendingPublish {
    publish: Publish,
    waiter: Option<Waiter<Published>>,
}

/// A subscribe or unsubscribe made while offline.
#[derive(Debug)]
enum PendingControl {
    Subscribe {
        filters: Vec<SubscribeFilter>,
        properties: Properties,
        waiter: Waiter<Vec<ReasonCode>>,
    },
    Unsubscribe {
        filters: Vec<String>,
        properties: Properties,
        waiter: Waiter<Vec<ReasonCode>>,
    },
}

/// A subscription the broker granted: what is needed to make it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subscription {
    options: SubscriptionOptions,
    /// MQTT 5 subscription identifier it was made with.
    identifier: Option<u32>,
}

/// What the event loop must do after an incoming packet, beyond what the state already did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// Nothing more.
    Handled,
    /// PINGRESP: the broker is alive.
    PingResp,
    /// The broker ended the connection (MQTT 5 DISCONNECT).
    Disconnect {
        reason_code: ReasonCode,
        reason_string: Option<String>,
    },
}

/// The I/O-free MQTT client session. See the module documentation.
#[derive(Debug)]
pub(crate) struct MqttState {
    config: StateConfig,
    connected: bool,
    broker: BrokerLimits,
    next_packet_id: u16,
    next_seq: u64,
    outgoing: HashMap<u16, Outgoing>,
    /// Outgoing QoS 1/2 publishes sent on this connection and not yet completed.
    in_window: usize,
    /// Unacknowledged publishes from an earlier connection, waiting for window space to be
    /// sent again (with DUP).
    resend: VecDeque<u16>,
    pending: VecDeque<PendingPublish>,
    pending_control: VecDeque<PendingControl>,
    subscriptions: BTreeMap<String, Subscription>,
    incoming_qos2: HashSet<u16>,
    /// Inbound topic aliases of this connection; index `alias - 1`.
    aliases: Vec<Option<String>>,
    /// Counts connections, so that acknowledgement tokens of an earlier one are recognised.
    connection: u64,
    /// Manual acknowledgements: incoming QoS 1/2 messages of this connection handed to the
    /// application and not acknowledged yet, by packet identifier.
    awaiting_app_ack: HashMap<u16, QoS>,
    /// Events with, for messages to acknowledge manually, their token.
    events: VecDeque<(Event, Option<AckToken>)>,
}

impl MqttState {
    pub(crate) fn new(config: StateConfig) -> MqttState {
        MqttState {
            config,
            connected: false,
            broker: BrokerLimits::default(),
            next_packet_id: 1,
            next_seq: 0,
            outgoing: HashMap::new(),
            in_window: 0,
            resend: VecDeque::new(),
            pending: VecDeque::new(),
            pending_control: VecDeque::new(),
            subscriptions: BTreeMap::new(),
            incoming_qos2: HashSet::new(),
            aliases: Vec::new(),
            connection: 0,
            awaiting_app_ack: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// The protocol version packets are coded in.
    pub(crate) fn version(&self) -> ProtocolVersion {
        self.config.version
    }

    /// The next event for the application, if any.
    #[cfg(test)]
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front().map(|(event, _)| event)
    }

    /// The next event for the application with, for a message to acknowledge manually, its
    /// token.
    pub(crate) fn next_event_with_ack(&mut self) -> Option<(Event, Option<AckToken>)> {
        self.events.pop_front()
    }

    /// Queue an event produced outside the state (connection changes).
    pub(crate) fn push_event(&mut self, event: Event) {
        self.events.push_back((event, None));
    }

    /// Whether the event loop should take more requests now. Online, a full `pending` queue
    /// means the broker is not keeping up, so the requesters wait (backpressure); offline the
    /// loop keeps taking requests so that each gets a prompt answer (queued or refused).
    pub(crate) fn accepts_requests(&self) -> bool {
        !self.connected || self.pending.len() < self.config.pending_limit
    }

    /// Stop for good: every waiter is dropped (its requester learns
    /// [`ClientError::Closed`]); queued events stay.
    pub(crate) fn shut_down(&mut self) {
        self.connected = false;
        self.in_window = 0;
        self.outgoing.clear();
        self.resend.clear();
        self.pending.clear();
        self.pending_control.clear();
    }

    /// Handle a request from a handle. `Request::Disconnect` belongs to the event loop and is
    /// answered here only defensively.
    pub(crate) fn handle_request(&mut self, request: Request, out: &mut BytesMut) {
        match request {
            Request::Publish { publish, waiter } => self.publish(publish, waiter, out),
            Request::Subscribe {
                filters,
                properties,
                waiter,
            } => {
                if self.connected {
                    self.send_subscribe(filters, properties, Some(waiter), out);
                } else {
                    self.pending_control.push_back(PendingControl::Subscribe {
                        filters,
                        properties,
                        waiter,
                    });
                }
            }
            Request::Unsubscribe {
                filters,
                properties,
                waiter,
            } => {
                // Forget them now, so that a reconnect before UNSUBACK does not bring them back.
                for filter in &filters {
                    self.subscriptions.remove(filter);
                }
                if self.connected {
                    self.send_unsubscribe(filters, properties, waiter, out);
                } else {
                    self.pending_control.push_back(PendingControl::Unsubscribe {
                        filters,
                        properties,
                        waiter,
                    });
                }
            }
            Request::Ack { tokens } => {
                for token in tokens {
                    self.ack(token, out);
                }
            }
            Request::Disconnect { waiter } => {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Send the PUBACK (QoS 1) or PUBREC (QoS 2) of a message the application acknowledges.
    /// A token of an earlier connection, or one already used, is ignored: the broker delivers
    /// an unacknowledged message again on the next connection.
    fn ack(&mut self, token: AckToken, out: &mut BytesMut) {
        if !self.connected || token.connection != self.connection {
            debug!(
                packet_id = token.packet_id,
                "Acknowledgement of a message from an earlier connection: ignored."
            );
            return;
        }
        let Some(qos) = self.awaiting_app_ack.remove(&token.packet_id) else {
            debug!(
                packet_id = token.packet_id,
                "Acknowledgement of a message not awaiting one: ignored."
            );
            return;
        };
        let version = self.config.version;
        let response = PubResponse::success(token.packet_id);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => write_response(out, Packet::PubAck, response, version),
            QoS::ExactlyOnce => {
                // From here on a resend is only answered, and PUBREL gets PUBCOMP.
                self.incoming_qos2.insert(token.packet_id);
                write_response(out, Packet::PubRec, response, version);
            }
        }
    }

    /// A connection was established and the broker accepted it with `connack`.
    ///
    /// Resends what the broker has not acknowledged, subscribes again if the broker did not
    /// keep the session, sends what was requested while offline, and queues
    /// [`Event::Connected`].
    pub(crate) fn connected(&mut self, connack: &ConnAck, out: &mut BytesMut) {
        self.connected = true;
        self.connection += 1;
        self.awaiting_app_ack.clear();
        self.broker = BrokerLimits::from_connack(connack);
        self.aliases.clear();
        self.in_window = 0;
        self.resend.clear();
        let session_present = connack.session_present;
        self.push_event(Event::Connected {
            session_present,
            properties: connack.properties.clone(),
        });
        if !session_present {
            // A new session on the broker: it remembers no QoS 2 message of ours either way.
            self.incoming_qos2.clear();
        }

        let mut in_order: Vec<(u64, u16)> = self
            .outgoing
            .iter()
            .map(|(&packet_id, entry)| (entry.seq(), packet_id))
            .collect();
        in_order.sort_unstable();
        for (_, packet_id) in in_order {
            self.resume_outgoing(packet_id, session_present, out);
        }
        if !session_present {
            self.resubscribe(out);
        }
        while let Some(control) = self.pending_control.pop_front() {
            match control {
                PendingControl::Subscribe {
                    filters,
                    properties,
                    waiter,
                } => self.send_subscribe(filters, properties, Some(waiter), out),
                PendingControl::Unsubscribe {
                    filters,
                    properties,
                    waiter,
                } => self.send_unsubscribe(filters, properties, waiter, out),
            }
        }
        self.fill_window(out);
    }

    /// The connection is gone; everything unacknowledged is kept for the next one.
    pub(crate) fn connection_lost(&mut self) {
        self.connected = false;
        // Unacknowledged messages come again on the next connection, with new tokens.
        self.awaiting_app_ack.clear();
        self.in_window = 0;
        self.resend.clear();
        self.aliases.clear();
        for entry in self.outgoing.values_mut() {
            if let Outgoing::Publish(publish) = entry {
                publish.in_window = false;
            }
        }
    }

    /// Handle one packet from the broker (CONNACK is the event loop's, during the handshake).
    pub(crate) fn handle_packet(
        &mut self,
        packet: Packet,
        out: &mut BytesMut,
    ) -> Result<Incoming, StateError> {
        match packet {
            Packet::Publish(publish) => self.incoming_publish(publish, out)?,
            Packet::PubAck(ack) => self.puback(ack, out),
            Packet::PubRec(rec) => self.pubrec(rec, out)?,
            Packet::PubRel(rel) => self.pubrel(rel, out)?,
            Packet::PubComp(comp) => self.pubcomp(comp, out),
            Packet::SubAck(suback) => self.suback(suback),
            Packet::UnsubAck(unsuback) => self.unsuback(unsuback),
            Packet::PingResp => return Ok(Incoming::PingResp),
            Packet::Disconnect(disconnect) => {
                return Ok(Incoming::Disconnect {
                    reason_code: disconnect.reason_code,
                    reason_string: disconnect.properties.reason_string,
                });
            }
            Packet::Auth(_) => return Err(StateError::AuthNotSupported),
            other @ (Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq) => return Err(StateError::UnexpectedPacket(other.packet_type())),
        }
        Ok(Incoming::Handled)
    }

    // --- outgoing publishes -------------------------------------------------------------

    fn publish(&mut self, publish: Publish, waiter: Option<Waiter<Published>>, out: &mut BytesMut) {
        if !self.connected {
            if self.pending.len() >= self.config.pending_limit {
                if waiter.is_none() {
                    warn!(
                        topic = %publish.topic,
                        "Offline queue full: QoS 0 publish dropped."
                    );
                }
                respond(
                    waiter,
                    Err(ClientError::OfflineQueueFull {
                        limit: self.config.pending_limit,
                    }),
                );
            } else {
                self.pending.push_back(PendingPublish { publish, waiter });
            }
            return;
        }
        if let Err(error) = self.check_publish(&publish) {
            respond(waiter, Err(error));
            return;
        }
        if publish.qos == QoS::AtMostOnce {
            let result = self.encode_checked(&Packet::Publish(publish), out);
            respond(waiter, result.map(|()| Published::UNACKNOWLEDGED));
        } else if self.pending.is_empty() && self.window_open() {
            self.send_new_publish(publish, waiter, out);
        } else {
            self.pending.push_back(PendingPublish { publish, waiter });
        }
    }

    /// What the broker's CONNACK forbids.
    fn check_publish(&self, publish: &Publish) -> Result<(), ClientError> {
        if publish.qos > self.broker.maximum_qos {
            return Err(ClientError::QoSNotSupported {
                requested: publish.qos,
                maximum: self.broker.maximum_qos,
            });
        }
        if publish.retain && !self.broker.retain_available {
            return Err(ClientError::RetainNotSupported);
        }
        Ok(())
    }

    fn window_open(&self) -> bool {
        let limit = self
            .config
            .inflight_limit
            .min(self.broker.receive_maximum)
            .max(1);
        self.in_window < usize::from(limit)
    }

    /// Send a QoS 1/2 publish for the first time, under a fresh packet identifier.
    fn send_new_publish(
        &mut self,
        mut publish: Publish,
        waiter: Option<Waiter<Published>>,
        out: &mut BytesMut,
    ) {
        let Some(packet_id) = self.allocate_packet_id() else {
            respond(waiter, Err(ClientError::PacketIdsExhausted));
            return;
        };
        publish.packet_id = packet_id;
        publish.dup = false;
        let qos = publish.qos;
        let packet = Box::new(Packet::Publish(publish));
        if let Err(error) = self.encode_checked(&packet, out) {
            respond(waiter, Err(error));
            return;
        }
        let seq = self.next_seq();
        self.outgoing.insert(
            packet_id,
            Outgoing::Publish(OutgoingPublish {
                seq,
                stage: PublishStage::AwaitingAck { qos, packet },
                waiter,
                in_window: true,
            }),
        );
        self.in_window += 1;
    }

    /// Send what the window and the connection allow: resends first, then pending publishes
    /// in order (QoS 0 ones need no window space, but keep their place in the queue).
    fn fill_window(&mut self, out: &mut BytesMut) {
        while self.connected {
            if !self.resend.is_empty() {
                if !self.window_open() {
                    return;
                }
                if let Some(packet_id) = self.resend.pop_front() {
                    self.resend_publish(packet_id, out);
                }
                continue;
            }
            let Some(front) = self.pending.front() else {
                return;
            };
            if front.publish.qos != QoS::AtMostOnce && !self.window_open() {
                return;
            }
            let Some(PendingPublish { publish, waiter }) = self.pending.pop_front() else {
                return;
            };
            if let Err(error) = self.check_publish(&publish) {
                respond(waiter, Err(error));
            } else if publish.qos == QoS::AtMostOnce {
                let result = self.encode_checked(&Packet::Publish(publish), out);
                respond(waiter, result.map(|()| Published::UNACKNOWLEDGED));
            } else {
                self.send_new_publish(publish, waiter, out);
            }
        }
    }

    /// Send an unacknowledged PUBLISH again, with DUP and its original identifier.
    fn resend_publish(&mut self, packet_id: u16, out: &mut BytesMut) {
        let Some(Outgoing::Publish(entry)) = self.outgoing.get_mut(&packet_id) else {
            return;
        };
        let PublishStage::AwaitingAck { packet, .. } = &mut entry.stage else {
            return;
        };
        if let Packet::Publish(publish) = packet.as_mut() {
            publish.dup = true;
        }
        let start = out.len();
        let result = encode(packet, self.config.version, out)
            .map_err(ClientError::from)
            .and_then(|()| check_size(out, start, self.broker.maximum_packet_size));
        match result {
            Ok(()) => {
                entry.in_window = true;
                self.in_window += 1;
            }
            // Only possible if the broker lowered its maximum packet size since the first send.
            Err(error) => {
                if let Some(Outgoing::Publish(entry)) = self.outgoing.remove(&packet_id) {
                    respond(entry.waiter, Err(error));
                }
            }
        }
    }

    /// After a reconnect: put one unacknowledged packet back on its way.
    fn resume_outgoing(&mut self, packet_id: u16, session_present: bool, out: &mut BytesMut) {
        let version = self.config.version;
        let Some(entry) = self.outgoing.get_mut(&packet_id) else {
            return;
        };
        match entry {
            Outgoing::Publish(publish) => match publish.stage {
                PublishStage::AwaitingAck { .. } => {
                    publish.in_window = false;
                    self.resend.push_back(packet_id);
                }
                PublishStage::AwaitingComp { .. } if session_present => {
                    publish.in_window = true;
                    self.in_window += 1;
                    write_response(
                        out,
                        Packet::PubRel,
                        PubResponse::success(packet_id),
                        version,
                    );
                }
                // The broker took the message with PUBREC and then lost the session: nothing
                // is left to complete, and the message is not ours to deliver any more.
                PublishStage::AwaitingComp { received } => {
                    if let Some(Outgoing::Publish(publish)) = self.outgoing.remove(&packet_id) {
                        respond(publish.waiter, Ok(received));
                    }
                }
            },
            Outgoing::Control(control) => {
                if let Err(error) = encode(&control.packet, version, out)
                    && let Some(Outgoing::Control(control)) = self.outgoing.remove(&packet_id)
                {
                    respond(control.waiter, Err(error.into()));
                }
            }
        }
    }

    fn puback(&mut self, ack: PubResponse, out: &mut BytesMut) {
        let awaited = matches!(
            self.outgoing.get(&ack.packet_id),
            Some(Outgoing::Publish(OutgoingPublish {
                stage: PublishStage::AwaitingAck {
                    qos: QoS::AtLeastOnce,
                    ..
                },
                ..
            }))
        );
        if !awaited {
            debug!(
                packet_id = ack.packet_id,
                "PUBACK for no QoS 1 publish: ignored."
            );
            return;
        }
        if let Some(Outgoing::Publish(entry)) = self.outgoing.remove(&ack.packet_id) {
            self.leave_window(entry.in_window);
            respond(entry.waiter, ack_result(ack));
        }
        self.fill_window(out);
    }

    fn pubrec(&mut self, rec: PubResponse, out: &mut BytesMut) -> Result<(), StateError> {
        let version = self.config.version;
        match self.outgoing.get_mut(&rec.packet_id) {
            Some(Outgoing::Publish(entry)) => match entry.stage {
                PublishStage::AwaitingAck {
                    qos: QoS::ExactlyOnce,
                    ..
                } => {
                    if rec.reason_code.is_error() {
                        // MQTT 5: a failed PUBREC ends the flow; no PUBREL.
                        if let Some(Outgoing::Publish(entry)) = self.outgoing.remove(&rec.packet_id)
                        {
                            self.leave_window(entry.in_window);
                            respond(entry.waiter, ack_result(rec));
                        }
                        self.fill_window(out);
                        return Ok(());
                    }
                    entry.stage = PublishStage::AwaitingComp {
                        received: Published::acknowledged(rec.reason_code),
                    };
                    write_response(
                        out,
                        Packet::PubRel,
                        PubResponse::success(rec.packet_id),
                        version,
                    );
                }
                // A repeated PUBREC: our PUBREL may have been lost.
                PublishStage::AwaitingComp { .. } => write_response(
                    out,
                    Packet::PubRel,
                    PubResponse::success(rec.packet_id),
                    version,
                ),
                PublishStage::AwaitingAck { .. } => {
                    debug!(
                        packet_id = rec.packet_id,
                        "PUBREC for a QoS 1 publish: ignored."
                    );
                }
            },
            _ => {
                debug!(
                    packet_id = rec.packet_id,
                    "PUBREC for an unknown packet id: answered."
                );
                write_response(
                    out,
                    Packet::PubRel,
                    not_found(rec.packet_id, version),
                    version,
                );
            }
        }
        Ok(())
    }

    fn pubcomp(&mut self, comp: PubResponse, out: &mut BytesMut) {
        let received = match self.outgoing.get(&comp.packet_id) {
            Some(Outgoing::Publish(OutgoingPublish {
                stage: PublishStage::AwaitingComp { received },
                ..
            })) => *received,
            _ => {
                debug!(
                    packet_id = comp.packet_id,
                    "PUBCOMP for no released publish: ignored."
                );
                return;
            }
        };
        if let Some(Outgoing::Publish(entry)) = self.outgoing.remove(&comp.packet_id) {
            self.leave_window(entry.in_window);
            respond(entry.waiter, Ok(received));
        }
        self.fill_window(out);
    }

    fn leave_window(&mut self, was_in_window: bool) {
        if was_in_window {
            self.in_window = self.in_window.saturating_sub(1);
        }
    }

    // --- incoming publishes -------------------------------------------------------------

    fn incoming_publish(
        &mut self,
        mut publish: Publish,
        out: &mut BytesMut,
    ) -> Result<(), StateError> {
        if self.config.version.is_v5() {
            self.resolve_topic_alias(&mut publish)?;
        }
        let version = self.config.version;
        if self.config.manual_acks && publish.qos != QoS::AtMostOnce {
            self.incoming_publish_manual(publish, out);
            return Ok(());
        }
        match publish.qos {
            QoS::AtMostOnce => self.push_event(Event::Message(publish)),
            QoS::AtLeastOnce => {
                let packet_id = publish.packet_id;
                self.push_event(Event::Message(publish));
                write_response(
                    out,
                    Packet::PubAck,
                    PubResponse::success(packet_id),
                    version,
                );
            }
            QoS::ExactlyOnce => {
                let packet_id = publish.packet_id;
                // Delivered once, on first receipt; a resend before PUBREL is only answered.
                if self.incoming_qos2.insert(packet_id) {
                    self.push_event(Event::Message(publish));
                }
                write_response(
                    out,
                    Packet::PubRec,
                    PubResponse::success(packet_id),
                    version,
                );
            }
        }
        Ok(())
    }

    /// A QoS 1/2 message with manual acknowledgements: handed to the application with a
    /// token, unanswered until [`MqttState::ack`]. A resend on this connection of a message
    /// still awaiting the application is not handed over twice; a QoS 2 resend of one already
    /// acknowledged (PUBREC sent) is answered again, as without manual acknowledgements.
    fn incoming_publish_manual(&mut self, publish: Publish, out: &mut BytesMut) {
        let packet_id = publish.packet_id;
        if publish.qos == QoS::ExactlyOnce && self.incoming_qos2.contains(&packet_id) {
            write_response(
                out,
                Packet::PubRec,
                PubResponse::success(packet_id),
                self.config.version,
            );
            return;
        }
        if self.awaiting_app_ack.contains_key(&packet_id) {
            debug!(
                packet_id,
                "Resend of a message awaiting acknowledgement: ignored."
            );
            return;
        }
        self.awaiting_app_ack.insert(packet_id, publish.qos);
        let token = AckToken {
            connection: self.connection,
            packet_id,
            qos: publish.qos,
        };
        self.events
            .push_back((Event::Message(publish), Some(token)));
    }

    /// MQTT 5 §3.3.2.3.4: an alias with a topic (re)defines it; an alias with an empty topic
    /// stands for the topic it was last defined with on this connection.
    fn resolve_topic_alias(&mut self, publish: &mut Publish) -> Result<(), StateError> {
        let Some(alias) = publish.properties.topic_alias else {
            return if publish.topic.is_empty() {
                Err(StateError::MissingTopic)
            } else {
                Ok(())
            };
        };
        if alias == 0 || alias > self.config.topic_alias_maximum {
            return Err(StateError::TopicAliasOutOfRange(alias));
        }
        let index = usize::from(alias - 1);
        if publish.topic.is_empty() {
            match self.aliases.get(index) {
                Some(Some(topic)) => publish.topic.clone_from(topic),
                _ => return Err(StateError::UnknownTopicAlias(alias)),
            }
        } else {
            if self.aliases.len() <= index {
                self.aliases.resize(index + 1, None);
            }
            self.aliases[index] = Some(publish.topic.clone());
        }
        Ok(())
    }

    fn pubrel(&mut self, rel: PubResponse, out: &mut BytesMut) -> Result<(), StateError> {
        let version = self.config.version;
        let response = if self.incoming_qos2.remove(&rel.packet_id) {
            PubResponse::success(rel.packet_id)
        } else {
            debug!(
                packet_id = rel.packet_id,
                "PUBREL for an unknown packet id: answered."
            );
            not_found(rel.packet_id, version)
        };
        write_response(out, Packet::PubComp, response, version);
        Ok(())
    }

    // --- subscriptions ------------------------------------------------------------------

    fn send_subscribe(
        &mut self,
        filters: Vec<SubscribeFilter>,
        properties: Properties,
        waiter: Option<Waiter<Vec<ReasonCode>>>,
        out: &mut BytesMut,
    ) {
        let Some(packet_id) = self.allocate_packet_id() else {
            respond(waiter, Err(ClientError::PacketIdsExhausted));
            return;
        };
        let packet = Box::new(Packet::Subscribe(Subscribe {
            packet_id,
            filters,
            properties,
        }));
        self.send_control(packet_id, packet, waiter, out);
    }

    fn send_unsubscribe(
        &mut self,
        filters: Vec<String>,
        properties: Properties,
        waiter: Waiter<Vec<ReasonCode>>,
        out: &mut BytesMut,
    ) {
        let Some(packet_id) = self.allocate_packet_id() else {
            respond(Some(waiter), Err(ClientError::PacketIdsExhausted));
            return;
        };
        let packet = Box::new(Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters,
            properties,
        }));
        self.send_control(packet_id, packet, Some(waiter), out);
    }

    fn send_control(
        &mut self,
        packet_id: u16,
        packet: Box<Packet>,
        waiter: Option<Waiter<Vec<ReasonCode>>>,
        out: &mut BytesMut,
    ) {
        if let Err(error) = self.encode_checked(&packet, out) {
            if waiter.is_none() {
                warn!(%error, "Cannot resubscribe.");
            }
            respond(waiter, Err(error));
            return;
        }
        let seq = self.next_seq();
        self.outgoing.insert(
            packet_id,
            Outgoing::Control(OutgoingControl {
                seq,
                packet,
                waiter,
            }),
        );
    }

    /// Subscribe again to everything granted before, after the broker lost the session. One
    /// SUBSCRIBE per subscription identifier (MQTT 5 allows one per packet), in chunks.
    fn resubscribe(&mut self, out: &mut BytesMut) {
        let mut by_identifier: BTreeMap<Option<u32>, Vec<SubscribeFilter>> = BTreeMap::new();
        for (filter, subscription) in &self.subscriptions {
            by_identifier
                .entry(subscription.identifier)
                .or_default()
                .push(SubscribeFilter {
                    filter: filter.clone(),
                    options: subscription.options,
                });
        }
        for (identifier, filters) in by_identifier {
            for chunk in filters.chunks(RESUBSCRIBE_CHUNK) {
                let properties = Properties {
                    subscription_identifiers: identifier.into_iter().collect(),
                    ..Properties::default()
                };
                debug!(filters = chunk.len(), "Resubscribing.");
                self.send_subscribe(chunk.to_vec(), properties, None, out);
            }
        }
    }

    fn suback(&mut self, suback: SubAck) {
        let Some((packet, waiter)) = self.take_control(suback.packet_id, |packet| {
            matches!(packet, Packet::Subscribe(_))
        }) else {
            debug!(
                packet_id = suback.packet_id,
                "SUBACK for no SUBSCRIBE: ignored."
            );
            return;
        };
        let Packet::Subscribe(subscribe) = packet else {
            return;
        };
        let mut codes = suback.reason_codes;
        // A SUBACK must answer every filter; count missing answers as refusals.
        codes.resize(subscribe.filters.len(), ReasonCode::UNSPECIFIED_ERROR);
        let identifier = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        for (filter, &code) in subscribe.filters.iter().zip(&codes) {
            if code.is_error() {
                if waiter.is_none() {
                    self.subscriptions.remove(&filter.filter);
                    self.push_event(Event::ResubscribeFailed {
                        filter: filter.filter.clone(),
                        reason_code: code,
                    });
                }
            } else {
                let mut options = filter.options;
                // Remember what was granted: a downgraded QoS is what we get, and ask for.
                if let Some(granted) = QoS::from_u8(code.0) {
                    options.qos = options.qos.min(granted);
                }
                self.subscriptions.insert(
                    filter.filter.clone(),
                    Subscription {
                        options,
                        identifier,
                    },
                );
            }
        }
        respond(waiter, Ok(codes));
    }

    fn unsuback(&mut self, unsuback: UnsubAck) {
        let Some((packet, waiter)) = self.take_control(unsuback.packet_id, |packet| {
            matches!(packet, Packet::Unsubscribe(_))
        }) else {
            debug!(
                packet_id = unsuback.packet_id,
                "UNSUBACK for no UNSUBSCRIBE: ignored."
            );
            return;
        };
        let Packet::Unsubscribe(unsubscribe) = packet else {
            return;
        };
        let mut codes = unsuback.reason_codes;
        // 3.x UNSUBACK carries no codes: every filter succeeded.
        let fill = if codes.is_empty() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::UNSPECIFIED_ERROR
        };
        codes.resize(unsubscribe.filters.len(), fill);
        respond(waiter, Ok(codes));
    }

    // --- helpers ------------------------------------------------------------------------

    /// Remove and return the SUBSCRIBE/UNSUBSCRIBE awaiting an acknowledgement under
    /// `packet_id`, if `is_kind` accepts it; anything else under that id stays in flight.
    fn take_control(
        &mut self,
        packet_id: u16,
        is_kind: impl Fn(&Packet) -> bool,
    ) -> Option<(Packet, Option<Waiter<Vec<ReasonCode>>>)> {
        let expected = matches!(
            self.outgoing.get(&packet_id),
            Some(Outgoing::Control(control)) if is_kind(&control.packet)
        );
        if !expected {
            return None;
        }
        match self.outgoing.remove(&packet_id) {
            Some(Outgoing::Control(OutgoingControl { packet, waiter, .. })) => {
                Some((*packet, waiter))
            }
            _ => None,
        }
    }

    /// A free packet identifier: the next one after the last handed out, skipping those still
    /// in use and 0, wrapping at 65535.
    fn allocate_packet_id(&mut self) -> Option<u16> {
        if self.outgoing.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let packet_id = self.next_packet_id;
            self.next_packet_id = packet_id.checked_add(1).unwrap_or(1);
            if !self.outgoing.contains_key(&packet_id) {
                return Some(packet_id);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Encode a packet of ours, refusing it (and leaving `out` as it was) if it is larger than
    /// the broker accepts.
    fn encode_checked(&self, packet: &Packet, out: &mut BytesMut) -> Result<(), ClientError> {
        let start = out.len();
        encode(packet, self.config.version, out)?;
        check_size(out, start, self.broker.maximum_packet_size)
    }
}

/// Undo an encode that went beyond the broker's maximum packet size.
fn check_size(out: &mut BytesMut, start: usize, max: Option<u32>) -> Result<(), ClientError> {
    let size = out.len() - start;
    match max {
        Some(max) if size > max as usize => {
            out.truncate(start);
            Err(ClientError::PacketTooLarge { size, max })
        }
        _ => Ok(()),
    }
}

/// Send a result to a waiter, if there is one and it still listens.
fn respond<T>(waiter: Option<Waiter<T>>, result: Result<T, ClientError>) {
    if let Some(waiter) = waiter {
        let _ = waiter.send(result);
    }
}

/// The outcome of a PUBACK or PUBREC: MQTT 5 failure codes refuse the publish.
fn ack_result(ack: PubResponse) -> Result<Published, ClientError> {
    if ack.reason_code.is_error() {
        Err(ClientError::PublishRefused {
            reason_code: ack.reason_code,
            reason_string: ack.properties.reason_string,
        })
    } else {
        Ok(Published::acknowledged(ack.reason_code))
    }
}

/// The answer to a PUBREC/PUBREL whose identifier we do not know.
fn not_found(packet_id: u16, version: ProtocolVersion) -> PubResponse {
    let mut response = PubResponse::success(packet_id);
    if version.is_v5() {
        response.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
    }
    response
}

/// Encode an acknowledgement. These are a few bytes with no user data, so encoding cannot fail.
fn write_response(
    out: &mut BytesMut,
    kind: fn(PubResponse) -> Packet,
    response: PubResponse,
    version: ProtocolVersion,
) {
    if let Err(error) = encode(&kind(response), version, out) {
        warn!(%error, "Cannot encode an acknowledgement.");
    }
}

#[cfg(test)]
mod tests;
