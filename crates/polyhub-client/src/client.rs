//! [`Client`], the cheap cloneable handle; [`Message`], an outgoing publish; [`Events`], the
//! event stream of a spawned client; [`AckToken`], what acknowledges a received message when
//! acknowledgements are manual.
//!
//! A handle validates what it can on its own (topic names, filters), then sends a request over
//! the bounded channel to the event loop and, for anything the broker acknowledges, waits on a
//! oneshot channel for the outcome. The channel's bound is the backpressure: when the event
//! loop cannot keep up, requesters wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use polyhub_mqtt::topic::{validate_topic_filter, validate_topic_name};
use polyhub_mqtt::{Properties, Publish, QoS, ReasonCode, SubscribeFilter, SubscriptionOptions};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ClientError, ConnectionError};
use crate::eventloop::{Event, EventLoop};
use crate::options::ClientOptions;

use crate::state::Request;

/// A handle on an MQTT client. Clones are cheap and share one connection.
///
/// When every handle is dropped the client sends DISCONNECT (after everything requested before)
/// and stops.
#[derive(Debug, Clone)]
pub struct Client {
    requests: mpsc::Sender<Request>,
}

impl Client {
    pub(crate) fn new(requests: mpsc::Sender<Request>) -> Client {
        Client { requests }
    }

    /// Connect to the broker and run the client on a background task.
    ///
    /// Returns once the broker has accepted the first connection, or with the error of that
    /// first attempt; later connection losses are handled by reconnecting, and reported as
    /// [`Event`]s. The first event is [`Event::Connected`].
    pub async fn connect(options: ClientOptions) -> Result<(Client, Events), ConnectionError> {
        let (client, mut event_loop) = EventLoop::new(options);
        event_loop.connect_now().await?;
        Ok((client, event_loop.spawn()))
    }

    /// Publish `payload` on `topic` and wait until it is done: written out for QoS 0 (queued,
    /// strictly), acknowledged by PUBACK for QoS 1, by PUBCOMP for QoS 2.
    ///
    /// While offline, publishes wait for the connection in a queue of
    /// [`ClientOptions::pending_limit`] entries; beyond it they fail with
    /// [`ClientError::OfflineQueueFull`].
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<Published, ClientError> {
        self.publish_message(Message::new(topic, payload).qos(qos).retain(retain))
            .await
    }

    /// Publish a [`Message`] (with MQTT 5 properties, if any) and wait until it is done, as
    /// [`publish`](Client::publish) does.
    pub async fn publish_message(&self, message: Message) -> Result<Published, ClientError> {
        self.begin_publish(message).await?.await
    }

    /// Hand a message to the client and return as soon as it is queued, with a future for its
    /// acknowledgement. Lets one task keep many QoS 1/2 publishes in flight:
    ///
    /// ```no_run
    /// # async fn demo(client: polyhub_client::Client) -> Result<(), polyhub_client::ClientError> {
    /// use polyhub_client::{Message, QoS};
    /// let mut acks = Vec::new();
    /// for n in 0..100 {
    ///     let message = Message::new("load/test", n.to_string()).qos(QoS::AtLeastOnce);
    ///     acks.push(client.begin_publish(message).await?);
    /// }
    /// for ack in acks {
    ///     ack.await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// For QoS 0 the returned future is already complete.
    pub async fn begin_publish(&self, message: Message) -> Result<PublishAck, ClientError> {
        let (request, ack) = message.into_request()?;
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(ack)
    }

    /// [`begin_publish`](Client::begin_publish) without waiting: fails with
    /// [`ClientError::RequestChannelFull`] when the channel to the event loop is full. Usable
    /// outside async code.
    pub fn try_publish(&self, message: Message) -> Result<PublishAck, ClientError> {
        let (request, ack) = message.into_request()?;
        self.requests
            .try_send(request)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => ClientError::RequestChannelFull,
                mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
            })?;
        Ok(ack)
    }

    /// Subscribe to one filter and return the QoS the broker granted.
    ///
    /// Fails with [`ClientError::SubscriptionRefused`] if the broker refuses. The client
    /// remembers granted subscriptions and makes them again after reconnecting to a broker that
    /// did not keep the session. Made while offline, the subscription is sent on connecting.
    pub async fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<QoS, ClientError> {
        let filter = filter.into();
        let options = SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        };
        let codes = self
            .subscribe_many(
                [SubscribeFilter {
                    filter: filter.clone(),
                    options,
                }],
                Properties::default(),
            )
            .await?;
        match codes.first().and_then(|code| QoS::from_u8(code.0)) {
            Some(granted) => Ok(granted),
            None => Err(ClientError::SubscriptionRefused {
                filter,
                reason_code: codes
                    .first()
                    .copied()
                    .unwrap_or(ReasonCode::UNSPECIFIED_ERROR),
            }),
        }
    }

    /// Subscribe to several filters in one SUBSCRIBE, with full MQTT 5 options and properties
    /// (subscription identifier, user properties). Returns the SUBACK code of each filter in
    /// order: a granted QoS (0–2) or a refusal (0x80 and above); a partial refusal is not an
    /// error.
    pub async fn subscribe_many(
        &self,
        filters: impl IntoIterator<Item = SubscribeFilter>,
        properties: Properties,
    ) -> Result<Vec<ReasonCode>, ClientError> {
        let filters: Vec<SubscribeFilter> = filters.into_iter().collect();
        if filters.is_empty() {
            return Err(ClientError::NoFilters);
        }
        for filter in &filters {
            check_filter(&filter.filter)?;
        }
        let (waiter, outcome) = oneshot::channel();
        self.request(Request::Subscribe {
            filters,
            properties,
            waiter,
        })
        .await?;
        outcome.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Unsubscribe from one filter. Fails with [`ClientError::UnsubscribeRefused`] if an MQTT 5
    /// broker refuses ("no subscription existed" is not a refusal).
    pub async fn unsubscribe(&self, filter: impl Into<String>) -> Result<(), ClientError> {
        let filter = filter.into();
        let codes = self
            .unsubscribe_many([filter.clone()], Properties::default())
            .await?;
        match codes.first() {
            Some(code) if code.is_error() => Err(ClientError::UnsubscribeRefused {
                filter,
                reason_code: *code,
            }),
            _ => Ok(()),
        }
    }

    /// Unsubscribe from several filters in one UNSUBSCRIBE; returns the code of each (all
    /// success with MQTT 3.x, whose UNSUBACK carries none).
    pub async fn unsubscribe_many(
        &self,
        filters: impl IntoIterator<Item = String>,
        properties: Properties,
    ) -> Result<Vec<ReasonCode>, ClientError> {
        let filters: Vec<String> = filters.into_iter().collect();
        if filters.is_empty() {
            return Err(ClientError::NoFilters);
        }
        for filter in &filters {
            check_filter(filter)?;
        }
        let (waiter, outcome) = oneshot::channel();
        self.request(Request::Unsubscribe {
            filters,
            properties,
            waiter,
        })
        .await?;
        outcome.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Send DISCONNECT after everything requested before it, close the connection and stop
    /// the client; the broker discards the will. Unacknowledged QoS 1/2 publishes then fail
    /// with [`ClientError::Closed`]. Disconnecting a client that has already stopped succeeds.
    ///
    /// With a caller-driven [`EventLoop`], `poll` must run for this to complete.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let (waiter, outcome) = oneshot::channel();
        if self
            .requests
            .send(Request::Disconnect { waiter })
            .await
            .is_err()
        {
            return Ok(());
        }
        outcome.await.unwrap_or(Ok(()))
    }

    /// Acknowledge a message received with [`ClientOptions::manual_acks`]: sends its PUBACK
    /// (QoS 1) or PUBREC (QoS 2; the PUBREL → PUBCOMP that follows is handled by the client).
    /// Returns once the request is queued for the connection.
    ///
    /// A token from an earlier connection is stale and acknowledging it does nothing (the
    /// broker delivers an unacknowledged message again after a reconnect, with a new token);
    /// so does a second acknowledgement with the same token. Fails only with
    /// [`ClientError::Closed`] when the client has stopped.
    pub async fn ack(&self, token: AckToken) -> Result<(), ClientError> {
        self.ack_all([token]).await
    }

    /// [`ack`](Client::ack) for several messages in one request (one write on the socket).
    pub async fn ack_all(
        &self,
        tokens: impl IntoIterator<Item = AckToken>,
    ) -> Result<(), ClientError> {
        let tokens: Vec<AckToken> = tokens.into_iter().collect();
        if tokens.is_empty() {
            return Ok(());
        }
        self.request(Request::Ack { tokens }).await
    }

    /// Whether the client has stopped: no request can succeed any more.
    pub fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    async fn request(&self, request: Request) -> Result<(), ClientError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

fn check_filter(filter: &str) -> Result<(), ClientError> {
    validate_topic_filter(filter).map_err(|source| ClientError::InvalidFilter {
        filter: filter.to_owned(),
        source,
    })
}

/// An outgoing message: topic, payload, QoS, retain, and MQTT 5 properties.
///
/// ```
/// use polyhub_client::{Message, QoS};
/// let request = Message::new("rpc/clock", "now?")
///     .qos(QoS::AtLeastOnce)
///     .response_topic("rpc/clock/reply")
///     .correlation_data(&b"42"[..])
///     .user_property("origin", "doc-test");
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    properties: Properties,
}

impl Message {
    /// A QoS 0, non-retained message. The payload is not copied (`Bytes`, `Vec<u8>`,
    /// `String` and `&'static` slices convert without copying).
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        }
    }

    /// Delivery QoS.
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Retain flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// All MQTT 5 properties at once, replacing any set before.
    pub fn properties(mut self, properties: Properties) -> Self {
        self.properties = properties;
        self
    }

    /// Add an MQTT 5 user property (names may repeat; order is kept).
    pub fn user_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties
            .user_properties
            .push((name.into(), value.into()));
        self
    }

    /// MQTT 5 response topic, for request/response.
    pub fn response_topic(mut self, topic: impl Into<String>) -> Self {
        self.properties.response_topic = Some(topic.into());
        self
    }

    /// MQTT 5 correlation data, for request/response.
    pub fn correlation_data(mut self, data: impl Into<Bytes>) -> Self {
        self.properties.correlation_data = Some(data.into());
        self
    }

    /// MQTT 5 message expiry interval, in seconds.
    pub fn message_expiry_interval(mut self, seconds: u32) -> Self {
        self.properties.message_expiry_interval = Some(seconds);
        self
    }

    /// MQTT 5 content type (a MIME type).
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.properties.content_type = Some(content_type.into());
        self
    }

    /// MQTT 5 payload format indicator: the payload is UTF-8 text.
    pub fn utf8_payload(mut self) -> Self {
        self.properties.payload_format_indicator = Some(1);
        self
    }

    /// The request for the event loop, and the future for its outcome.
    fn into_request(self) -> Result<(Request, PublishAck), ClientError> {
        validate_topic_name(&self.topic).map_err(|source| ClientError::InvalidTopic {
            topic: self.topic.clone(),
            source,
        })?;
        let (waiter, ack) = if self.qos == QoS::AtMostOnce {
            (None, PublishAck { outcome: None })
        } else {
            let (waiter, outcome) = oneshot::channel();
            (
                Some(waiter),
                PublishAck {
                    outcome: Some(outcome),
                },
            )
        };
        let publish = Publish {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic,
            packet_id: 0,
            payload: self.payload,
            properties: self.properties,
        };
        Ok((Request::Publish { publish, waiter }, ack))
    }
}

/// What the broker answered to a publish it took.
///
/// MQTT 5 brokers say in the PUBACK (QoS 1) or PUBREC (QoS 2) whether any subscription
/// matched: a message that matched none reached nobody, which a sender of commands needs to
/// know (Mosquitto answers so, and so does polyhub's broker). MQTT 3.1/3.1.1 acknowledgements
/// carry no such code, and QoS 0 has no acknowledgement at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    reason_code: Option<ReasonCode>,
}

impl Published {
    /// A QoS 0 publish, written out with no acknowledgement to come.
    pub(crate) const UNACKNOWLEDGED: Published = Published { reason_code: None };

    /// Acknowledged with `reason_code` (always success before MQTT 5).
    pub(crate) fn acknowledged(reason_code: ReasonCode) -> Published {
        Published {
            reason_code: Some(reason_code),
        }
    }

    /// The reason code of the broker's acknowledgement; `None` for QoS 0.
    pub fn reason_code(&self) -> Option<ReasonCode> {
        self.reason_code
    }

    /// Whether the broker said that no subscription matched (MQTT 5 reason code 0x10): the
    /// message was accepted and reached nobody. `false` when the broker did not say (QoS 0,
    /// MQTT 3.1/3.1.1).
    pub fn no_matching_subscribers(&self) -> bool {
        self.reason_code == Some(ReasonCode::NO_MATCHING_SUBSCRIBERS)
    }
}

/// The outcome of a publish handed over with [`Client::begin_publish`]: resolves when the
/// broker acknowledges it (QoS 1/2), at once for QoS 0.
#[derive(Debug)]
#[must_use = "dropping the acknowledgement does not cancel the publish, but loses its outcome"]
pub struct PublishAck {
    outcome: Option<oneshot::Receiver<Result<Published, ClientError>>>,
}

impl Future for PublishAck {
    type Output = Result<Published, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().outcome {
            None => Poll::Ready(Ok(Published::UNACKNOWLEDGED)),
            Some(outcome) => Pin::new(outcome)
                .poll(cx)
                .map(|received| received.unwrap_or(Err(ClientError::Closed))),
        }
    }
}

/// Acknowledges one QoS 1/2 message received with [`ClientOptions::manual_acks`]; pass it
/// to [`Client::ack`]. It names the message by its packet identifier on the connection it
/// arrived on, so it goes stale when that connection ends.
///
/// [`ClientOptions::manual_acks`]: crate::ClientOptions::manual_acks
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckToken {
    /// Which connection of this client the message arrived on.
    pub(crate) connection: u64,
    pub(crate) packet_id: u16,
    pub(crate) qos: QoS,
}

impl AckToken {
    /// The packet identifier of the message.
    pub fn packet_id(&self) -> u16 {
        self.packet_id
    }

    /// The QoS it was delivered with (1 or 2).
    pub fn qos(&self) -> QoS {
        self.qos
    }
}

/// The events of a client running on its own task ([`Client::connect`],
/// [`EventLoop::spawn`]).
#[derive(Debug)]
pub struct Events {
    receiver: mpsc::Receiver<(Event, Option<AckToken>)>,
}

impl Events {
    pub(crate) fn new(receiver: mpsc::Receiver<(Event, Option<AckToken>)>) -> Events {
        Events { receiver }
    }

    /// The next event; `None` once the client has stopped and every event was read. With
    /// manual acknowledgements use [`recv_with_ack`](Events::recv_with_ack) instead, or the
    /// messages are never acknowledged.
    pub async fn recv(&mut self) -> Option<Event> {
        self.receiver.recv().await.map(|(event, _)| event)
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.receiver.try_recv().ok().map(|(event, _)| event)
    }

    /// The next event with, for a QoS 1/2 message received with manual acknowledgements, the
    /// token that acknowledges it ([`Client::ack`]); `None` once the client has stopped and
    /// every event was read.
    pub async fn recv_with_ack(&mut self) -> Option<(Event, Option<AckToken>)> {
        self.receiver.recv().await
    }

    /// [`recv_with_ack`](Events::recv_with_ack) without waiting: the next event if one is
    /// ready.
    pub fn try_recv_with_ack(&mut self) -> Option<(Event, Option<AckToken>)> {
        self.receiver.try_recv().ok()
    }
}
