//! One network client's task: the CONNECT handshake, the packet loop, and detaching from the
//! session when the connection ends.
//!
//! The protocol version is negotiated here, per connection, from CONNECT; every later packet
//! is decoded and encoded for that version.
//!
//! The loop waits on four things at once: the socket (reads, and writes of what is buffered),
//! the session's queue (which also signals a takeover), the keep-alive deadline, and shutdown.
//! Each turn handles every packet the read buffer holds, moves queued deliveries into flight
//! and into the write buffer, and the next wait writes all of it at once.
//!
//! Lazy reads: a subscriber that only acknowledges what it receives (PUBACK, PUBREC, PUBCOMP)
//! woke the broker for each acknowledgement, although nothing waits for one: it only frees a
//! slot of the in-flight window. After [`LAZY_AFTER_ACK_READS`] such reads in a row, the
//! connection turns lazy ([`LazyReads`]): the kernel no longer wakes us for its small input,
//! and each loop turn (which the next delivery brings) reads what came meanwhile, before it
//! fills the window again. Any other packet ends lazy mode at once; so do a full in-flight
//! window, and a connection with nothing left in flight at the next [`LAZY_POLL`]. What a lazy
//! client sends other than acknowledgements therefore waits for our next delivery to it or at
//! most [`LAZY_POLL`]; its end of stream and errors still wake us at once. Plain TCP only.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use polyhub_mqtt::{
    ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, Properties, ProtocolVersion,
    PubResponse, Publish, PublishRef, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe, decode, topic,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until};

use crate::alias::{InboundAliases, OutboundAlias, OutboundAliases};
use crate::broker::{ConnectionSlot, Shared};
use crate::connection::{Connection, IoEvent, PlainSocket};
use crate::message::{Delivery, Message};
use crate::session::{Awaiting, Inflight, Session, SessionKind};
use crate::stats::Stats;
use crate::subscriptions::Subscription;

/// How long a new connection may take to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a CONNECT may wait for the previous connection of its client id to let go.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closing connection may take to write what it still has buffered.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Stop moving queued deliveries into the write buffer above this many unsent bytes; the rest
/// waits in the session queue (where the queue bound applies).
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Longest a publisher is paused for a backed-up lossless session before it is read again (it
/// pauses again at its next message into that session): backpressure, never a deadlock.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Deliveries taken from the session queue per lock.
const FILL_BATCH: usize = 64;

/// Hard cap on outbound messages in flight, below the 65,535 packet ids.
const MAX_INFLIGHT_CAP: usize = 65_000;

/// CONNECT user property (MQTT 5) by which a client asks for [`SEQ_PROPERTY`] on every
/// PUBLISH it receives; its value must be `1`.
pub(crate) const STAMP_SEQ_PROPERTY: &str = "polyhub-stamp-seq";

/// PUBLISH user property carrying the message's sequence number (decimal), for clients that
/// asked for it with [`STAMP_SEQ_PROPERTY`].
pub(crate) const SEQ_PROPERTY: &str = "polyhub-seq";

/// Timers for intervals this long or longer are not armed: the session (or delayed will) is
/// kept until the broker stops.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

thread_local! {
    /// The vector [`Client::fill`] collects deliveries in, kept per thread so that a wake-up
    /// with one delivery costs no allocation (connections are many and mostly idle, so they
    /// keep none of their own).
    static FILL_SCRATCH: Cell<Vec<(Delivery, u16)>> = const { Cell::new(Vec::new()) };
}

/// The per-thread fill vector (empty), or a new one while it is in use.
fn take_fill_scratch() -> Vec<(Delivery, u16)> {
    FILL_SCRATCH.try_with(Cell::take).unwrap_or_default()
}

/// Hand the fill vector back, emptied (a delivery kept there would pin its message).
fn return_fill_scratch(mut batch: Vec<(Delivery, u16)>) {
    batch.clear();
    let _ = FILL_SCRATCH.try_with(|scratch| scratch.set(batch));
}

/// Serve one network connection from its first byte to its close.
///
/// Design: a plain function returning the task's future, so that the stream and the peer
/// address go straight into the boxed handshake future; arguments of an `async fn` would stay
/// in the task's allocation for the connection's whole life.
pub(crate) fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + PlainSocket + 'static,
{
    // The handshake and the close are boxed: their futures are large and short-lived, and
    // boxing keeps them out of the task's allocation, which an idle connection holds for hours.
    let handshake = Box::pin(handshake(shared, stream, peer));
    async move {
        let _slot = slot;
        let Some(mut client) = handshake.await else {
            return;
        };
        let exit = client.run().await;
        Box::pin(client.finish(exit)).await;
    }
}

/// Read CONNECT (within the timeout) and answer it; `None` when the connection was closed.
async fn handshake<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr) -> Option<Client<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + PlainSocket + 'static,
{
    let mut conn = Connection::new(stream);
    let connect = tokio::select! {
        result = tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut conn, &shared)) => result,
        () = shared.shutdown.cancelled() => return None,
    };
    let connect = match connect {
        Ok(Some(connect)) => connect,
        Ok(None) => {
            conn.close(CLOSE_TIMEOUT).await;
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "No CONNECT in time; closing.");
            return None;
        }
    };
    Client::accept(shared, conn, connect, peer).await
}

/// Read until CONNECT. `None` means close: anything else first, a decode error, or EOF. An
/// unknown protocol name or level is answered with CONNACK 0x01 (3.1.1 form) first.
async fn read_connect<S>(conn: &mut Connection<S>, shared: &Shared) -> Option<Box<Connect>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_packet_size = shared.config.max_packet_size as usize;
    loop {
        match decode(&mut conn.read_buf, ProtocolVersion::V311, max_packet_size) {
            Ok(Some(Packet::Connect(connect))) => return Some(Box::new(connect)),
            Ok(Some(packet)) => {
                tracing::debug!(
                    packet_type = packet.packet_type(),
                    "First packet is not CONNECT; closing."
                );
                return None;
            }
            Ok(None) => match conn.read_more().await {
                Ok(IoEvent::Read(_)) => {}
                _ => return None,
            },
            Err(
                error @ (DecodeError::UnsupportedProtocolLevel(_)
                | DecodeError::InvalidProtocolName),
            ) => {
                tracing::debug!(%error, "Unsupported protocol in CONNECT.");
                conn.version = ProtocolVersion::V311;
                let _ = conn.send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    properties: Properties::default(),
                }));
                return None;
            }
            Err(error) => {
                tracing::debug!(%error, "Malformed CONNECT; closing.");
                return None;
            }
        }
    }
}

/// Why the packet loop ended.
#[derive(Debug)]
enum Exit {
    /// The client sent DISCONNECT; `will` unless its reason was "normal disconnection".
    Disconnect { will: bool },
    /// EOF or a socket error.
    Closed(String),
    /// Nothing received for 1.5 × keep-alive.
    KeepAliveTimeout,
    /// A protocol violation or malformed packet.
    Violation { reason: ReasonCode, detail: String },
    /// Another connection took the session over.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

impl Exit {
    fn violation(reason: ReasonCode, detail: impl Into<String>) -> Exit {
        Exit::Violation {
            reason,
            detail: detail.into(),
        }
    }

    /// Whether the will is published (everything but a normal DISCONNECT and shutdown).
    fn publishes_will(&self) -> bool {
        match self {
            Exit::Disconnect { will } => *will,
            Exit::Shutdown => false,
            Exit::Closed(_) | Exit::KeepAliveTimeout | Exit::Violation { .. } | Exit::TakenOver => {
                true
            }
        }
    }

    /// The DISCONNECT an MQTT 5 client gets, if any.
    fn disconnect_reason(&self) -> Option<(ReasonCode, String)> {
        match self {
            Exit::Violation { reason, detail } => Some((*reason, detail.clone())),
            Exit::KeepAliveTimeout => {
                Some((ReasonCode::KEEP_ALIVE_TIMEOUT, "keep alive timeout".into()))
            }
            Exit::TakenOver => Some((
                ReasonCode::SESSION_TAKEN_OVER,
                "another connection took the session over".into(),
            )),
            Exit::Shutdown => Some((
                ReasonCode::SERVER_SHUTTING_DOWN,
                "server shutting down".into(),
            )),
            Exit::Disconnect { .. } | Exit::Closed(_) => None,
        }
    }
}

/// Whether a client's keep-alive exceeds `max_keep_alive`; 0 (none) counts as above any limit
/// but the unlimited 65,535.
fn keep_alive_over_limit(keep_alive: u16, max_keep_alive: u16) -> bool {
    keep_alive > max_keep_alive || (keep_alive == 0 && max_keep_alive != u16::MAX)
}

/// Topics a network client may not publish to, as in Mosquitto: `$SYS` (the broker's own
/// statistics, which a retained message from a client would overwrite), except the
/// `$SYS/broker/connection/...` state that bridges publish about themselves, and `$share` (the
/// prefix of shared subscriptions, which no topic filter can match as a topic).
fn reserved_for_the_broker(topic: &str) -> bool {
    if topic.starts_with("$SYS/broker/connection/") {
        return false;
    }
    ["$SYS", "$share"].iter().any(|prefix| {
        topic
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Reads in a row that carried only acknowledgements before a connection turns lazy (see
/// the module docs).
const LAZY_AFTER_ACK_READS: u8 = 8;

/// The longest a lazy connection's input waits to be read when no delivery brings us to it.
const LAZY_POLL: Duration = Duration::from_millis(2);

/// When a connection is read lazily (see the module docs): the policy alone, without I/O.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct LazyReads {
    lazy: bool,
    /// Reads in a row that carried only acknowledgements, while not lazy.
    ack_only_reads: u8,
}

impl LazyReads {
    /// After a read that decoded packets, `only_acks` if every one was PUBACK, PUBREC or
    /// PUBCOMP: the mode to switch to, if it should change.
    fn after_read(&mut self, only_acks: bool) -> Option<bool> {
        if !only_acks {
            self.ack_only_reads = 0;
            return self.lazy.then_some(false);
        }
        if self.lazy {
            return None;
        }
        self.ack_only_reads = self.ack_only_reads.saturating_add(1);
        (self.ack_only_reads >= LAZY_AFTER_ACK_READS).then_some(true)
    }

    /// Before the loop waits: a full in-flight window needs its acknowledgements as they come.
    fn before_wait(&mut self, window_full: bool) -> Option<bool> {
        if self.lazy && window_full {
            self.ack_only_reads = 0;
            return Some(false);
        }
        None
    }

    /// At a lazy poll that found nothing left in flight: the stream of deliveries stopped.
    fn on_quiet(&mut self) -> Option<bool> {
        if self.lazy {
            self.ack_only_reads = 0;
            return Some(false);
        }
        None
    }

    /// The mode the socket is now in (a switch may fail, e.g. on a TLS stream).
    fn set(&mut self, lazy: bool) {
        self.lazy = lazy;
    }
}

/// What woke the packet loop.
enum Event {
    Io(IoEvent),
    IoError(std::io::Error),
    Queued,
    KeepAlive,
    /// The backed-up session this client was paused for drained (or the pause ran out).
    Resumed,
}

/// Packet counters, added to the shared stats once per loop turn.
#[derive(Debug, Default)]
struct Counters {
    packets_in: u64,
    packets_out: u64,
    publish_in: u64,
    publish_out: u64,
}

/// A connected client: its connection, its session, and what CONNECT negotiated.
struct Client<S> {
    shared: Arc<Shared>,
    conn: Connection<S>,
    session: Arc<Session>,
    /// Ownership of the session; released when detached so a takeover can proceed.
    permit: Option<OwnedSemaphorePermit>,
    peer: SocketAddr,
    v5: bool,
    /// 1.5 × the keep-alive in force; `None` when disabled.
    keep_alive: Option<Duration>,
    last_packet: Instant,
    will: Option<Box<LastWill>>,
    /// Session expiry in seconds as it stands now (DISCONNECT may change it); `u32::MAX` =
    /// never.
    session_expiry: u32,
    /// Whether CONNECT asked for expiry 0 (DISCONNECT may then not raise it).
    connect_expiry_was_zero: bool,
    /// Outbound QoS 1/2 messages allowed in flight.
    inflight_limit: usize,
    /// Largest packet we may send to this client.
    max_outbound_packet: usize,
    /// Inbound QoS 2 messages the client may have awaiting PUBREL.
    receive_maximum: usize,
    /// MQTT 5 topic aliases; boxed because most connections never use them and an idle
    /// connection should stay small.
    aliases: Option<Box<(InboundAliases, OutboundAliases)>>,
    /// The last fill stopped at the write high-water mark with deliveries still queued.
    more_queued: bool,
    /// MQTT 5 client that asked for each PUBLISH to carry the message's sequence number.
    stamp_seq: bool,
    /// Whether this connection was announced online (so its end is announced offline).
    announced_online: bool,
    counters: Counters,
    /// A lossless session this client published into that is backed up: reading pauses until
    /// it drains or `paused_until`.
    backlog: Option<Arc<Session>>,
    paused_until: Instant,
    lazy: LazyReads,
    /// The last fill stopped at the in-flight limit with deliveries still queued.
    window_full: bool,
}

/// Outcome of looking up the session for a CONNECT.
struct Acquired {
    session: Arc<Session>,
    permit: OwnedSemaphorePermit,
    present: bool,
    /// Inflight messages to resend, in order.
    resend: Vec<(u16, Awaiting, Delivery)>,
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + PlainSocket,
{
    /// Answer CONNECT. `None` when the connection was refused (and closed).
    async fn accept(
        shared: Arc<Shared>,
        mut conn: Connection<S>,
        mut connect: Box<Connect>,
        peer: SocketAddr,
    ) -> Option<Client<S>> {
        let version = connect.protocol;
        conn.version = version;
        let v5 = version.is_v5();
        let config = &shared.config;

        if shared
            .connections
            .load(std::sync::atomic::Ordering::Acquire)
            > config.max_connections
        {
            tracing::warn!(
                %peer,
                limit = config.max_connections,
                "Connection refused: too many connections."
            );
            refuse(&mut conn, ReasonCode::SERVER_BUSY, "too many connections").await;
            return None;
        }
        if v5 && connect.properties.authentication_method.is_some() {
            refuse(
                &mut conn,
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                "enhanced authentication is not supported",
            )
            .await;
            return None;
        }

        if !v5 && keep_alive_over_limit(connect.keep_alive, config.max_keep_alive) {
            // A 3.x client cannot be told a lower keep-alive; Mosquitto refuses it the same way.
            tracing::info!(
                %peer,
                keep_alive = connect.keep_alive,
                limit = config.max_keep_alive,
                "Connection refused: keep-alive above max_keep_alive."
            );
            refuse(
                &mut conn,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                "keep-alive above the broker's maximum",
            )
            .await;
            return None;
        }

        let mut assigned_client_id = None;
        let client_id = if connect.client_id.is_empty() {
            let allowed = match version {
                ProtocolVersion::V31 => false,
                ProtocolVersion::V311 => connect.clean_start,
                ProtocolVersion::V5 => true,
            };
            if !allowed {
                refuse(
                    &mut conn,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "empty client id needs clean session",
                )
                .await;
                return None;
            }
            let id = shared.assign_client_id();
            if v5 {
                assigned_client_id = Some(id.clone());
            }
            id
        } else {
            std::mem::take(&mut connect.client_id)
        };

        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let session_expiry = config
            .max_session_expiry
            .map_or(requested_expiry, |cap| requested_expiry.min(cap));

        let acquired = tokio::select! {
            result = tokio::time::timeout(
                TAKEOVER_TIMEOUT,
                acquire_session(&shared, &client_id, connect.clean_start),
            ) => result,
            () = shared.shutdown.cancelled() => return None,
        };
        let acquired = match acquired {
            Ok(Some(acquired)) => acquired,
            Ok(None) => {
                refuse(
                    &mut conn,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "client id in use by a local client",
                )
                .await;
                return None;
            }
            Err(_) => {
                tracing::warn!(
                    client_id,
                    "Previous connection did not let go of the session."
                );
                refuse(&mut conn, ReasonCode::SERVER_UNAVAILABLE, "session busy").await;
                return None;
            }
        };

        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if v5 && keep_alive_over_limit(keep_alive, config.max_keep_alive) {
            keep_alive = config.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }

        let receive_maximum = if config.receive_maximum == 0 {
            u16::MAX
        } else {
            config.receive_maximum
        };
        let client_receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        let server_inflight = if config.max_inflight == 0 {
            u16::MAX
        } else {
            config.max_inflight
        };
        let inflight_limit =
            usize::from(client_receive_maximum.min(server_inflight)).clamp(1, MAX_INFLIGHT_CAP);
        let max_outbound_packet = connect
            .properties
            .maximum_packet_size
            .unwrap_or(u32::MAX)
            .min(config.max_packet_size) as usize;

        let mut properties = Properties::default();
        if v5 {
            properties = Properties {
                session_expiry_interval: (session_expiry != requested_expiry)
                    .then_some(session_expiry),
                assigned_client_identifier: assigned_client_id,
                server_keep_alive,
                receive_maximum: (receive_maximum != u16::MAX).then_some(receive_maximum),
                topic_alias_maximum: (config.topic_alias_maximum > 0)
                    .then_some(config.topic_alias_maximum),
                maximum_packet_size: Some(config.max_packet_size),
                retain_available: Some(1),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(1),
                shared_subscription_available: Some(1),
                response_information: (connect.properties.request_response_information == Some(1))
                    .then(|| format!("polyhub/response/{client_id}")),
                ..Properties::default()
            };
        }

        // Persistence saves the session with these settings (expiry, will delay).
        acquired.session.record_connection(
            version,
            session_expiry,
            connect
                .will
                .as_ref()
                .and_then(|will| will.properties.will_delay_interval)
                .unwrap_or(0),
        );
        let mut client = Client {
            conn,
            session: acquired.session,
            permit: Some(acquired.permit),
            peer,
            v5,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_packet: Instant::now(),
            will: connect.will.take().map(Box::new),
            session_expiry,
            connect_expiry_was_zero: requested_expiry == 0,
            inflight_limit,
            max_outbound_packet,
            receive_maximum: usize::from(receive_maximum),
            aliases: v5.then(|| {
                Box::new((
                    InboundAliases::new(config.topic_alias_maximum),
                    OutboundAliases::new(connect.properties.topic_alias_maximum.unwrap_or(0)),
                ))
            }),
            more_queued: false,
            stamp_seq: v5
                && connect
                    .properties
                    .user_properties
                    .iter()
                    .any(|(name, value)| name == STAMP_SEQ_PROPERTY && value == "1"),
            announced_online: false,
            counters: Counters::default(),
            backlog: None,
            paused_until: Instant::now(),
            lazy: LazyReads::default(),
            window_full: false,
            shared,
        };

        let stats = &client.shared.stats;
        Stats::add(&stats.clients_connected, 1);
        let connected = stats
            .clients_connected
            .load(std::sync::atomic::Ordering::Relaxed);
        stats
            .clients_maximum
            .fetch_max(connected, std::sync::atomic::Ordering::Relaxed);

        let connack = Packet::ConnAck(ConnAck {
            session_present: acquired.present,
            reason_code: ReasonCode::SUCCESS,
            properties,
        });
        if client.send(&connack).is_err() {
            client
                .finish(Exit::Closed("cannot encode CONNACK".into()))
                .await;
            return None;
        }
        // While this connection owns the session: the offline of the connection it took over
        // from was announced before that one let go of it.
        client
            .shared
            .announce_presence(&client.session.client_id, true);
        client.announced_online = true;
        let now = Instant::now();
        for (packet_id, stage, delivery) in acquired.resend {
            if stage == Awaiting::Comp {
                let _ = client.send(&Packet::PubRel(PubResponse::success(packet_id)));
            } else {
                client.encode_publish(&delivery, packet_id, true, now);
            }
        }

        tracing::debug!(
            client_id = %client.session.client_id,
            %peer,
            protocol = version.level(),
            clean_start = connect.clean_start,
            session_present = acquired.present,
            keep_alive,
            "Client connected."
        );
        Some(client)
    }

    /// The packet loop; returns why the connection ends.
    async fn run(&mut self) -> Exit {
        let mut keep_alive_timer = Box::pin(sleep_until(
            self.last_packet + self.keep_alive.unwrap_or_default(),
        ));
        // A client may send packets right behind CONNECT, without waiting for CONNACK; they
        // arrived with it and no further read will announce them.
        if !self.conn.read_buf.is_empty()
            && let Err(exit) = self.handle_input()
        {
            return exit;
        }
        loop {
            // Shutdown is noticed here rather than by waiting on the broker's token: a waiter
            // on it would cost every idle connection 72 bytes, and `Broker::shutdown` wakes
            // each session's `notify` after cancelling, which brings us back here.
            if self.shared.shutdown.is_cancelled() {
                return Exit::Shutdown;
            }
            // Not while paused for a backlog: then the client's input waits in its socket.
            if self.lazy.lazy
                && self.backlog.is_none()
                && let Err(exit) = self.read_lazily()
            {
                return exit;
            }
            if self.lazy.lazy {
                // Whichever comes first: the keep-alive deadline or the next lazy poll.
                let poll_at = Instant::now() + LAZY_POLL;
                let deadline = self
                    .keep_alive
                    .map_or(poll_at, |period| (self.last_packet + period).min(poll_at));
                keep_alive_timer.as_mut().reset(deadline);
            }
            if self.fill() {
                return Exit::TakenOver;
            }
            let window_full = self.window_full;
            if let Some(lazy) = self.lazy.before_wait(window_full) {
                self.switch_lazy(lazy);
            }
            self.flush_counters();
            // At the high-water mark `fill` moved nothing: the wait must end when the write
            // buffer drains, or deliveries queued meanwhile would wait for the next wake-up.
            let report_drained = self.more_queued || self.conn.pending_write() >= WRITE_HIGH_WATER;
            let event = if let Some(backlog) = self.paused_for() {
                // Boxed: the wait's timers and notifications would otherwise be part of every
                // connection's future, which each idle connection holds.
                Box::pin(self.wait_paused(backlog)).await
            } else {
                tokio::select! {
                    biased;
                    result = self.conn.io(report_drained) => match result {
                        Ok(event) => Event::Io(event),
                        Err(error) => Event::IoError(error),
                    },
                    // Always listened to, even with a full write buffer: it also signals
                    // takeover.
                    () = self.session.notify.notified() => Event::Queued,
                    () = keep_alive_timer.as_mut(), if self.keep_alive.is_some() || self.lazy.lazy => Event::KeepAlive,
                }
            };
            match event {
                Event::Io(IoEvent::Read(_)) => {
                    if let Err(exit) = self.handle_input() {
                        return exit;
                    }
                }
                Event::Io(IoEvent::Drained) => {}
                Event::Resumed => {
                    self.backlog = None;
                    // Whatever it sent meanwhile is read now; the pause was ours, not its
                    // silence.
                    self.last_packet = Instant::now();
                    keep_alive_timer
                        .as_mut()
                        .reset(self.last_packet + self.keep_alive.unwrap_or_default());
                }
                Event::Queued => {
                    // We were woken by a publisher's task and would otherwise run right after
                    // it (before other ready sockets are polled), writing one message per
                    // syscall. Waiting
                    // until the runtime next polls for I/O lets every publisher that is ready
                    // now route first, so their messages leave in one write.
                    tokio::task::yield_now().await;
                }
                Event::Io(IoEvent::Eof) => return Exit::Closed("closed by the client".into()),
                Event::IoError(error) => return Exit::Closed(error.to_string()),
                Event::KeepAlive => {
                    if self.lazy.lazy && self.backlog.is_none() {
                        if let Err(exit) = self.read_lazily() {
                            return exit;
                        }
                        let quiet = self.session.state.lock().inflight.is_empty();
                        if quiet && let Some(lazy) = self.lazy.on_quiet() {
                            self.switch_lazy(lazy);
                        }
                    }
                    if let Some(period) = self.keep_alive {
                        let deadline = self.last_packet + period;
                        if Instant::now() >= deadline {
                            return Exit::KeepAliveTimeout;
                        }
                        keep_alive_timer.as_mut().reset(deadline);
                    }
                }
            }
        }
    }

    /// Backpressure: only writes and takeover are served; the client's packets wait in the
    /// socket, and with them the client, as TCP makes it.
    async fn wait_paused(&mut self, backlog: Arc<Session>) -> Event {
        tokio::select! {
            biased;
            result = self.conn.flush(), if self.conn.pending_write() > 0 => match result {
                Ok(()) => Event::Io(IoEvent::Drained),
                Err(error) => Event::IoError(error),
            },
            () = self.session.notify.notified() => Event::Queued,
            () = backlog.drained() => Event::Resumed,
            () = sleep_until(self.paused_until) => Event::Resumed,
        }
    }

    /// The backed-up session this client is paused for, if it still is.
    fn paused_for(&mut self) -> Option<Arc<Session>> {
        let backlog = self.backlog.as_ref()?;
        if backlog.is_backed_up() && Instant::now() < self.paused_until {
            return Some(Arc::clone(backlog));
        }
        self.backlog = None;
        None
    }

    /// Decode and handle every complete packet in the read buffer.
    fn handle_input(&mut self) -> Result<(), Exit> {
        let max_packet_size = self.shared.config.max_packet_size as usize;
        let mut received = false;
        let mut only_acks = true;
        let result = loop {
            match decode(&mut self.conn.read_buf, self.conn.version, max_packet_size) {
                // Handled by reference: a `Packet` is large, and moving it down through the
                // handlers copied it at every step.
                Ok(Some(mut packet)) => {
                    received = true;
                    only_acks &= matches!(
                        packet,
                        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)
                    );
                    self.counters.packets_in += 1;
                    if let Err(exit) = self.handle_packet(&mut packet) {
                        break Err(exit);
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(Exit::violation(error.reason_code(), error.to_string())),
            }
        };
        if received {
            self.last_packet = Instant::now();
            if let Some(lazy) = self.lazy.after_read(only_acks) {
                self.switch_lazy(lazy);
            }
        }
        result
    }

    /// Reads and handles what a lazy connection's socket holds now.
    fn read_lazily(&mut self) -> Result<(), Exit> {
        match self.conn.read_now() {
            Ok(Some(0)) => Ok(()),
            Ok(Some(_)) => self.handle_input(),
            Ok(None) => Err(Exit::Closed("closed by the client".into())),
            Err(error) => Err(Exit::Closed(error.to_string())),
        }
    }

    /// Puts the socket in lazy mode or takes it out; the policy learns the mode it is in.
    fn switch_lazy(&mut self, lazy: bool) {
        if self.lazy.lazy == lazy || !self.conn.set_lazy(lazy) {
            return;
        }
        self.lazy.set(lazy);
        let gauge = &self.shared.stats.clients_read_lazily;
        if lazy {
            Stats::add(gauge, 1);
        } else {
            Stats::sub(gauge, 1);
        }
    }

    fn handle_packet(&mut self, packet: &mut Packet) -> Result<(), Exit> {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish),
            Packet::PubAck(response) => {
                self.handle_puback(response);
                Ok(())
            }
            Packet::PubRec(response) => self.handle_pubrec(response),
            Packet::PubRel(response) => self.handle_pubrel(response),
            Packet::PubComp(response) => {
                self.handle_pubcomp(response);
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(disconnect) => Err(self.handle_disconnect(disconnect)),
            Packet::Connect(_) => Err(Exit::violation(
                ReasonCode::PROTOCOL_ERROR,
                "second CONNECT",
            )),
            Packet::Auth(_) => Err(Exit::violation(
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without an authentication method",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                Exit::violation(ReasonCode::PROTOCOL_ERROR, "packet only a server may send"),
            ),
        }
    }

    fn handle_publish(&mut self, publish: &mut Publish) -> Result<(), Exit> {
        self.counters.publish_in += 1;
        if let Some(aliases) = self.aliases.as_deref_mut() {
            aliases
                .0
                .resolve(publish)
                .map_err(|reason| Exit::violation(reason, "invalid topic alias"))?;
        } else if publish.topic.is_empty() {
            return Err(Exit::violation(
                ReasonCode::TOPIC_NAME_INVALID,
                "empty topic",
            ));
        }
        let packet_id = publish.packet_id;
        if reserved_for_the_broker(&publish.topic) {
            return self.refuse_publish(publish);
        }
        match publish.qos {
            QoS::AtMostOnce => {
                self.route(publish);
                Ok(())
            }
            QoS::AtLeastOnce => {
                let matched = self.route(publish);
                self.send(&Packet::PubAck(self.publish_response(packet_id, matched)))
            }
            QoS::ExactlyOnce => {
                {
                    let mut state = self.session.state.lock();
                    if state.awaiting_release.contains(&packet_id) {
                        // A resend of a message already routed: acknowledge it again only.
                        drop(state);
                        return self.send(&Packet::PubRec(PubResponse::success(packet_id)));
                    }
                    if self.v5 && state.awaiting_release.len() >= self.receive_maximum {
                        return Err(Exit::violation(
                            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                            "too many QoS 2 messages awaiting PUBREL",
                        ));
                    }
                    state.awaiting_release.push(packet_id);
                }
                let matched = self.route(publish);
                self.send(&Packet::PubRec(self.publish_response(packet_id, matched)))
            }
        }
    }

    /// A client's PUBLISH to a topic only the broker writes: neither routed nor retained. MQTT 5
    /// clients hear "not authorized" (0x87) at QoS 1 and 2; a 3.x acknowledgement cannot say no,
    /// so they get the usual flow for a message that went nowhere (as from Mosquitto).
    fn refuse_publish(&mut self, publish: &Publish) -> Result<(), Exit> {
        tracing::debug!(
            client_id = %self.session.client_id,
            topic = %publish.topic,
            "Client PUBLISH to a topic reserved for the broker dropped."
        );
        let packet_id = publish.packet_id;
        let refusal = if self.v5 {
            PubResponse {
                reason_code: ReasonCode::NOT_AUTHORIZED,
                ..PubResponse::success(packet_id)
            }
        } else {
            PubResponse::success(packet_id)
        };
        match publish.qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => self.send(&Packet::PubAck(refusal)),
            // A 3.x client goes on with PUBREL, answered like any PUBREL for an id not held.
            QoS::ExactlyOnce => self.send(&Packet::PubRec(refusal)),
        }
    }

    /// Routes a received message; returns how many sessions it matched. When one of them is a
    /// lossless session past its high water, this connection pauses reading (see `run`).
    fn route(&mut self, publish: &mut Publish) -> usize {
        let mut backed_up = None;
        let matched = self.shared.publish_noting_backlog(
            Message::from_publish(publish, self.session.id),
            &mut backed_up,
        );
        // Never paused by its own session: it is the one that would drain it.
        if let Some(session) = backed_up
            && !Arc::ptr_eq(&session, &self.session)
            && self.backlog.is_none()
        {
            self.backlog = Some(session);
            self.paused_until = Instant::now() + MAX_PAUSE;
        }
        matched
    }

    /// PUBACK/PUBREC for a routed message: MQTT 5 says when nobody matched.
    fn publish_response(&self, packet_id: u16, matched: usize) -> PubResponse {
        let mut response = PubResponse::success(packet_id);
        if self.v5 && matched == 0 {
            response.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
        }
        response
    }

    fn handle_puback(&mut self, response: &PubResponse) {
        let mut state = self.session.state.lock();
        if let Some(position) = state.inflight_position(response.packet_id)
            && state.inflight[position].stage == Awaiting::Ack
        {
            state.inflight.remove(position);
        }
    }

    fn handle_pubrec(&mut self, response: &PubResponse) -> Result<(), Exit> {
        let packet_id = response.packet_id;
        let reply = {
            let mut state = self.session.state.lock();
            match state.inflight_position(packet_id) {
                Some(position) if state.inflight[position].stage != Awaiting::Ack => {
                    if self.v5 && response.reason_code.is_error() {
                        // The client refused the message: the flow ends here.
                        state.inflight.remove(position);
                        return Ok(());
                    }
                    state.inflight[position].stage = Awaiting::Comp;
                    PubResponse::success(packet_id)
                }
                _ => {
                    let mut reply = PubResponse::success(packet_id);
                    if self.v5 {
                        reply.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                    }
                    reply
                }
            }
        };
        self.send(&Packet::PubRel(reply))
    }

    fn handle_pubrel(&mut self, response: &PubResponse) -> Result<(), Exit> {
        let packet_id = response.packet_id;
        let known = {
            let mut state = self.session.state.lock();
            match state
                .awaiting_release
                .iter()
                .position(|&id| id == packet_id)
            {
                Some(position) => {
                    state.awaiting_release.swap_remove(position);
                    true
                }
                None => false,
            }
        };
        let mut reply = PubResponse::success(packet_id);
        if self.v5 && !known {
            reply.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        self.send(&Packet::PubComp(reply))
    }

    fn handle_pubcomp(&mut self, response: &PubResponse) {
        let mut state = self.session.state.lock();
        if let Some(position) = state.inflight_position(response.packet_id)
            && state.inflight[position].stage == Awaiting::Comp
        {
            state.inflight.remove(position);
        }
    }

    fn handle_subscribe(&mut self, subscribe: &Subscribe) -> Result<(), Exit> {
        let identifier = if self.v5 {
            subscribe
                .properties
                .subscription_identifiers
                .first()
                .copied()
        } else {
            None
        };
        let mut reason_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        for requested in &subscribe.filters {
            let filter = requested.filter.as_str();
            let shared_group = topic::parse_shared(filter).ok().flatten().is_some();
            if !Shared::filter_is_valid(filter) {
                reason_codes.push(if self.v5 {
                    ReasonCode::TOPIC_FILTER_INVALID
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            let options = if self.v5 {
                requested.options
            } else {
                SubscriptionOptions {
                    qos: requested.options.qos,
                    ..SubscriptionOptions::default()
                }
            };
            if shared_group && options.no_local {
                return Err(Exit::violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                ));
            }
            let subscription = Subscription {
                options,
                identifier,
            };
            let is_new = self.shared.subscribe(&self.session, filter, subscription);
            reason_codes.push(ReasonCode(options.qos as u8));
            let send_retained = match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNewSubscription => is_new,
                RetainHandling::DoNotSend => false,
            };
            if send_retained && !shared_group {
                retained.extend(self.shared.retained_for(filter, &subscription));
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: Properties::default(),
        }))?;
        // Queued after the SUBACK is encoded, so they reach the client after it.
        self.session.enqueue_unbounded(retained);
        self.shared.announce_subscribed(&self.session.client_id);
        Ok(())
    }

    fn handle_unsubscribe(&mut self, unsubscribe: &Unsubscribe) -> Result<(), Exit> {
        let mut reason_codes = Vec::new();
        for filter in &unsubscribe.filters {
            let existed = self.shared.unsubscribe(&self.session, filter);
            if self.v5 {
                reason_codes.push(if existed {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::NO_SUBSCRIPTION_EXISTED
                });
            }
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Properties::default(),
        }))
    }

    fn handle_disconnect(&mut self, disconnect: &Disconnect) -> Exit {
        if !self.v5 {
            return Exit::Disconnect { will: false };
        }
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            if self.connect_expiry_was_zero && expiry != 0 {
                return Exit::violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "session expiry cannot be set at DISCONNECT when CONNECT had 0",
                );
            }
            self.session_expiry = self
                .shared
                .config
                .max_session_expiry
                .map_or(expiry, |cap| expiry.min(cap));
            self.session.record_session_expiry(self.session_expiry);
        }
        // Only "normal disconnection" discards the will (MQTT 5 §3.1.2.5): 0x04 asks for it,
        // and so does any error the client reports.
        Exit::Disconnect {
            will: disconnect.reason_code != ReasonCode::NORMAL_DISCONNECTION,
        }
    }

    /// Encode `packet` into the write buffer.
    fn send(&mut self, packet: &Packet) -> Result<(), Exit> {
        match self.conn.send(packet) {
            Ok(()) => {
                self.counters.packets_out += 1;
                Ok(())
            }
            Err(error) => Err(Exit::Closed(format!("cannot encode a packet: {error}"))),
        }
    }

    /// Move queued deliveries into flight and into the write buffer, within the inflight
    /// limit and up to the write high-water mark. Returns `true` when another connection has
    /// taken the session over (nothing is moved then).
    fn fill(&mut self) -> bool {
        self.more_queued = false;
        self.window_full = false;
        let now = Instant::now();
        let mut batch = take_fill_scratch();
        let taken_over = self.fill_with(&mut batch, now);
        return_fill_scratch(batch);
        taken_over
    }

    /// [`Client::fill`] with a scratch vector for the deliveries taken per lock.
    fn fill_with(&mut self, batch: &mut Vec<(Delivery, u16)>, now: Instant) -> bool {
        loop {
            batch.clear();
            let queue_left = {
                let mut state = self.session.state.lock();
                if state.taken_over {
                    return true;
                }
                if self.conn.pending_write() >= WRITE_HIGH_WATER {
                    self.more_queued = !state.queue.is_empty();
                    return false;
                }
                while batch.len() < FILL_BATCH {
                    let Some(front) = state.queue.front() else {
                        break;
                    };
                    let qos = front.qos;
                    if qos != QoS::AtMostOnce && state.inflight.len() >= self.inflight_limit {
                        self.window_full = true;
                        break;
                    }
                    let Some(delivery) = state.queue.pop_front() else {
                        break;
                    };
                    if delivery.message.is_expired(now) {
                        continue;
                    }
                    let packet_id = match qos {
                        QoS::AtMostOnce => 0,
                        QoS::AtLeastOnce | QoS::ExactlyOnce => {
                            let packet_id = state.allocate_packet_id();
                            state.inflight.push_back(Inflight {
                                packet_id,
                                delivery: delivery.clone(),
                                stage: if qos == QoS::AtLeastOnce {
                                    Awaiting::Ack
                                } else {
                                    Awaiting::Rec
                                },
                            });
                            packet_id
                        }
                    };
                    batch.push((delivery, packet_id));
                }
                self.session.taken(state.queue.len());
                batch.len() == FILL_BATCH && !state.queue.is_empty()
            };
            if batch.is_empty() {
                return false;
            }
            let mut not_sent = Vec::new();
            for (delivery, packet_id) in batch.iter() {
                if !self.encode_publish(delivery, *packet_id, false, now) && *packet_id != 0 {
                    not_sent.push(*packet_id);
                }
            }
            if !not_sent.is_empty() {
                // Too large for the client: behave as if delivered (MQTT 5 §3.1.2.11.4).
                let mut state = self.session.state.lock();
                state
                    .inflight
                    .retain(|entry| !not_sent.contains(&entry.packet_id));
            }
            if !queue_left {
                return false;
            }
        }
    }

    /// Encode one PUBLISH for `delivery`. Returns `false` when it was not sent because it is
    /// larger than the client accepts (counted as dropped).
    fn encode_publish(
        &mut self,
        delivery: &Delivery,
        packet_id: u16,
        dup: bool,
        now: Instant,
    ) -> bool {
        let message = &delivery.message;
        let mut alias = OutboundAlias::None;
        let mut topic = message.topic.as_str();
        // 3.x clients (no aliases) get no properties at all: nothing is built per delivery.
        let mut properties = None;
        if let Some(aliases) = self.aliases.as_deref_mut() {
            alias = aliases.1.for_topic(&message.topic);
            let topic_alias = match alias {
                OutboundAlias::None => None,
                OutboundAlias::Define(alias) => Some(alias),
                OutboundAlias::Use(alias) => {
                    topic = "";
                    Some(alias)
                }
            };
            properties =
                Some(message.publish_properties(now, &delivery.subscription_ids, topic_alias));
        }
        if self.stamp_seq {
            properties
                .get_or_insert_with(Properties::default)
                .user_properties
                .push((SEQ_PROPERTY.to_owned(), message.seq.to_string()));
        }
        let publish = PublishRef {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic,
            packet_id,
            payload: &message.payload,
            properties: properties.as_ref(),
        };
        let sent = match self
            .conn
            .send_publish_within(&publish, self.max_outbound_packet)
        {
            Ok(sent) => sent,
            Err(error) => {
                tracing::debug!(
                    client_id = %self.session.client_id,
                    %error,
                    "Cannot encode PUBLISH."
                );
                false
            }
        };
        if sent {
            self.counters.packets_out += 1;
            self.counters.publish_out += 1;
        } else {
            if let (OutboundAlias::Define(_), Some(aliases)) = (alias, self.aliases.as_deref_mut())
            {
                aliases.1.forget(&message.topic);
            }
            Stats::add(&self.shared.stats.publish_dropped, 1);
            tracing::debug!(
                client_id = %self.session.client_id,
                topic = %message.topic,
                "PUBLISH larger than the client accepts; dropped."
            );
        }
        sent
    }

    fn flush_counters(&mut self) {
        let stats = &self.shared.stats;
        let (read, written) = self.conn.take_byte_counts();
        let counters = std::mem::take(&mut self.counters);
        for (counter, value) in [
            (&stats.bytes_received, read),
            (&stats.bytes_sent, written),
            (&stats.messages_received, counters.packets_in),
            (&stats.messages_sent, counters.packets_out),
            (&stats.publish_received, counters.publish_in),
            (&stats.publish_sent, counters.publish_out),
        ] {
            if value > 0 {
                Stats::add(counter, value);
            }
        }
    }

    /// Tell an MQTT 5 client why it is disconnected, detach from the session, and close.
    async fn finish(mut self, exit: Exit) {
        let client_id = self.session.client_id.clone();
        match &exit {
            Exit::Disconnect { .. } => tracing::debug!(client_id, "Client disconnected."),
            Exit::Shutdown => tracing::debug!(client_id, "Client disconnected: shutting down."),
            Exit::TakenOver => {
                tracing::info!(
                    client_id,
                    peer = %self.peer,
                    "Client taken over by a new connection."
                )
            }
            Exit::KeepAliveTimeout => {
                tracing::info!(client_id, peer = %self.peer, "Client keep-alive timed out.")
            }
            Exit::Closed(detail) => tracing::debug!(client_id, detail, "Client connection closed."),
            Exit::Violation { reason, detail } => tracing::info!(
                client_id,
                peer = %self.peer,
                reason = reason.0,
                detail,
                "Client disconnected for a protocol violation."
            ),
        }
        if self.v5
            && let Some((reason, detail)) = exit.disconnect_reason()
        {
            let explained = Packet::Disconnect(Disconnect {
                reason_code: reason,
                properties: Properties {
                    reason_string: Some(detail),
                    ..Properties::default()
                },
            });
            // The reason string is optional: leave it out if the client's maximum packet size
            // does not allow it.
            if !matches!(
                self.conn.send_within(&explained, self.max_outbound_packet),
                Ok(true)
            ) {
                let _ = self.send(&Packet::Disconnect(Disconnect::with_reason(reason)));
            }
        }
        self.detach(&exit);
        Stats::sub(&self.shared.stats.clients_connected, 1);
        if self.lazy.lazy {
            Stats::sub(&self.shared.stats.clients_read_lazily, 1);
        }
        self.conn.close(CLOSE_TIMEOUT).await;
        self.flush_counters();
    }

    /// Leave the session: end it (expiry 0) or keep it with its expiry timer, and publish or
    /// schedule the will.
    fn detach(&mut self, exit: &Exit) {
        let taken_over = matches!(exit, Exit::TakenOver);
        let will = self.will.take().filter(|_| exit.publishes_will());
        let will_delay = will
            .as_ref()
            .and_then(|will| will.properties.will_delay_interval)
            .unwrap_or(0);
        let will = will.map(|will| Message::from_will(*will, self.session.id));
        let shared = Arc::clone(&self.shared);
        let session = Arc::clone(&self.session);
        let queue_qos0 = shared.config.queue_qos0_messages;

        // First of all: before the session is removed from the map or its permit released,
        // so a connection taking over announces its online after this.
        if self.announced_online {
            shared.announce_presence(&session.client_id, false);
        }
        session.set_online(false);
        let mut publish_now = None;
        let mut delayed_will = None;
        let (ends_now, keeps, epoch) = {
            let mut sessions = shared.sessions.lock();
            let registered = sessions
                .get(&session.client_id)
                .is_some_and(|current| Arc::ptr_eq(current, &session));
            let mut state = session.state.lock();
            state.attached = false;
            state.detach_epoch += 1;
            if !queue_qos0 {
                state
                    .queue
                    .retain(|delivery| delivery.qos != QoS::AtMostOnce);
            }
            // Expiry 0 ends the session with its connection, takeover or not; otherwise a
            // takeover keeps it only if the new connection did not ask for a clean start.
            let ends_now = registered && self.session_expiry == 0;
            let keeps = registered
                && self.session_expiry != 0
                && (!taken_over || state.takeover_keeps_session);
            if ends_now {
                sessions.remove(&session.client_id);
            }
            if let Some(will) = will {
                let delay = if keeps {
                    will_delay.min(self.session_expiry)
                } else {
                    0
                };
                if delay == 0 {
                    publish_now = Some(will);
                } else {
                    // Set before the permit is released, so a connection resuming the session
                    // cancels it.
                    state.pending_will = Some(Box::new(will));
                    delayed_will = Some(Duration::from_secs(u64::from(delay)));
                }
            }
            (ends_now, keeps, state.detach_epoch)
        };
        self.permit = None;

        if ends_now {
            shared.end_session(&session);
        }
        if let Some(will) = publish_now {
            tracing::debug!(
                client_id = %session.client_id,
                topic = %will.topic,
                "Publishing will."
            );
            shared.publish(will);
        }
        if let Some(delay) = delayed_will
            && delay < NEVER
        {
            spawn_will_timer(Arc::clone(&shared), Arc::clone(&session), epoch, delay);
        }
        // After a takeover the new connection normally attaches at once and the timer finds
        // it attached; armed anyway in case that connection never completes.
        let expiry = Duration::from_secs(u64::from(self.session_expiry));
        if keeps && expiry < NEVER {
            spawn_expiry_timer(shared, session, epoch, expiry);
        }
    }
}

/// Find or create the session for `client_id`, taking it over from a connection still
/// attached (or from a detached persistent local client), and attach to it. `None` when a
/// local client holds the id.
///
/// Waiting for the previous connection is bounded by the caller; the wait is retried in short
/// slices so that a connection that attached in between (a third client) is asked to go too.
async fn acquire_session(shared: &Shared, client_id: &str, clean_start: bool) -> Option<Acquired> {
    loop {
        let existing = shared.sessions.lock().get(client_id).cloned();
        let Some(existing) = existing else {
            let session = Arc::new(Session::new(
                shared.next_session_id(),
                client_id.to_owned(),
                SessionKind::Network,
                shared.config.max_queued_messages,
            ));
            let Ok(permit) = Arc::clone(&session.owner).try_acquire_owned() else {
                continue;
            };
            let mut sessions = shared.sessions.lock();
            if sessions.contains_key(client_id) {
                continue;
            }
            sessions.insert(client_id.to_owned(), Arc::clone(&session));
            attach(&session);
            return Some(Acquired {
                session,
                permit,
                present: false,
                resend: Vec::new(),
            });
        };
        if existing.kind() == SessionKind::Local {
            // A persistent in-process session nobody is attached to is resumed by a CONNECT
            // that asks to keep its session (a hub's parser moving from task to process
            // isolation); anything else of a local client is not for the network to take.
            if clean_start {
                return None;
            }
            let sessions = shared.sessions.lock();
            if !sessions
                .get(client_id)
                .is_some_and(|current| Arc::ptr_eq(current, &existing))
            {
                continue;
            }
            if !existing.become_network() {
                return None;
            }
            drop(sessions);
            tracing::info!(
                client_id,
                "A network client resumes the in-process session of its client id."
            );
            continue;
        }
        let attached = {
            let mut state = existing.state.lock();
            if state.attached {
                state.taken_over = true;
                state.takeover_keeps_session = !clean_start;
            }
            state.attached
        };
        if attached {
            existing.notify.notify_one();
        }
        let permit = match tokio::time::timeout(
            Duration::from_millis(100),
            Arc::clone(&existing.owner).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => continue,
        };
        let mut sessions = shared.sessions.lock();
        if !sessions
            .get(client_id)
            .is_some_and(|current| Arc::ptr_eq(current, &existing))
        {
            continue;
        }
        if clean_start {
            let session = Arc::new(Session::new(
                shared.next_session_id(),
                client_id.to_owned(),
                SessionKind::Network,
                shared.config.max_queued_messages,
            ));
            let Ok(new_permit) = Arc::clone(&session.owner).try_acquire_owned() else {
                continue;
            };
            sessions.insert(client_id.to_owned(), Arc::clone(&session));
            attach(&session);
            drop(sessions);
            shared.end_session(&existing);
            drop(permit);
            return Some(Acquired {
                session,
                permit: new_permit,
                present: false,
                resend: Vec::new(),
            });
        }
        let resend = attach(&existing);
        drop(sessions);
        return Some(Acquired {
            session: existing,
            permit,
            present: true,
            resend,
        });
    }
}

/// Mark `session` as driven by a connection; cancels a delayed will. Returns the inflight
/// messages to resend. Called with the sessions map locked, so expiry timers see either the
/// old or the new state.
fn attach(session: &Session) -> Vec<(u16, Awaiting, Delivery)> {
    let mut state = session.state.lock();
    state.attached = true;
    state.taken_over = false;
    state.takeover_keeps_session = false;
    state.pending_will = None;
    session.set_online(true);
    state
        .inflight
        .iter()
        .map(|entry| (entry.packet_id, entry.stage, entry.delivery.clone()))
        .collect()
}

/// Refuse a CONNECT with `reason` (3.x clients get the matching return code) and close.
async fn refuse<S>(conn: &mut Connection<S>, reason: ReasonCode, detail: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut properties = Properties::default();
    if conn.version.is_v5() {
        properties.reason_string = Some(detail.to_owned());
    }
    let _ = conn.send(&Packet::ConnAck(ConnAck {
        session_present: false,
        reason_code: reason,
        properties,
    }));
    conn.close(CLOSE_TIMEOUT).await;
}

/// Publish `session`'s pending will after `delay`, unless a connection resumed the session or
/// it ended (and published it) first.
pub(crate) fn spawn_will_timer(
    shared: Arc<Shared>,
    session: Arc<Session>,
    epoch: u64,
    delay: Duration,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => return,
        }
        let will = {
            let mut state = session.state.lock();
            if !state.attached && state.detach_epoch == epoch {
                state.pending_will.take()
            } else {
                None
            }
        };
        if let Some(will) = will {
            tracing::debug!(client_id = %session.client_id, "Will delay over: publishing will.");
            shared.publish(*will);
        }
    });
}

/// End `session` after `expiry` unless a connection resumed it first.
pub(crate) fn spawn_expiry_timer(
    shared: Arc<Shared>,
    session: Arc<Session>,
    epoch: u64,
    expiry: Duration,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(expiry) => {}
            () = shared.shutdown.cancelled() => return,
        }
        {
            let mut sessions = shared.sessions.lock();
            if !sessions
                .get(&session.client_id)
                .is_some_and(|current| Arc::ptr_eq(current, &session))
            {
                return;
            }
            let state = session.state.lock();
            if state.attached || state.detach_epoch != epoch {
                return;
            }
            drop(state);
            sessions.remove(&session.client_id);
        }
        tracing::debug!(client_id = %session.client_id, "Session expired.");
        shared.end_session(&session);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_after_acks() -> LazyReads {
        let mut policy = LazyReads::default();
        for _ in 1..LAZY_AFTER_ACK_READS {
            assert_eq!(policy.after_read(true), None);
        }
        assert_eq!(policy.after_read(true), Some(true));
        policy.set(true);
        policy
    }

    #[test]
    fn a_run_of_acknowledgement_only_reads_turns_a_connection_lazy() {
        let policy = lazy_after_acks();
        assert!(policy.lazy);
    }

    #[test]
    fn any_other_packet_breaks_the_run_and_ends_lazy_mode() {
        let mut policy = LazyReads::default();
        for _ in 1..LAZY_AFTER_ACK_READS {
            policy.after_read(true);
        }
        assert_eq!(policy.after_read(false), None, "not lazy: nothing to end");
        assert_eq!(policy.after_read(true), None, "the run starts again");

        let mut policy = lazy_after_acks();
        assert_eq!(policy.after_read(true), None, "stays lazy");
        assert_eq!(policy.after_read(false), Some(false));
        policy.set(false);
        assert_eq!(policy.after_read(true), None, "a new run is needed");
    }

    #[test]
    fn a_full_window_or_a_quiet_connection_ends_lazy_mode() {
        let mut policy = lazy_after_acks();
        assert_eq!(policy.before_wait(false), None);
        assert_eq!(policy.before_wait(true), Some(false));

        let mut policy = lazy_after_acks();
        assert_eq!(policy.on_quiet(), Some(false));

        let mut not_lazy = LazyReads::default();
        assert_eq!(not_lazy.before_wait(true), None);
        assert_eq!(not_lazy.on_quiet(), None);
    }

    #[test]
    fn no_keep_alive_is_over_every_limit_but_the_unlimited_one() {
        assert!(!keep_alive_over_limit(60, 60));
        assert!(keep_alive_over_limit(61, 60));
        assert!(keep_alive_over_limit(0, 60));
        assert!(!keep_alive_over_limit(0, u16::MAX));
        assert!(!keep_alive_over_limit(u16::MAX, u16::MAX));
    }

    #[test]
    fn sys_and_share_topics_are_the_brokers() {
        for topic in [
            "$SYS",
            "$SYS/broker/uptime",
            "$SYS/",
            "$share/group/x",
            "$share",
        ] {
            assert!(reserved_for_the_broker(topic), "{topic}");
        }
        for topic in [
            "$SYSTEM/x",
            "$sys/broker",
            "SYS/x",
            "a/$SYS",
            "$shared/x",
            "$other/x",
            "$SYS/broker/connection/bridge-1/state",
        ] {
            assert!(!reserved_for_the_broker(topic), "{topic}");
        }
    }

    #[test]
    fn a_switch_that_did_not_happen_leaves_the_policy_where_it_was() {
        // A TLS stream refuses lazy mode: the policy keeps asking after each run.
        let mut policy = LazyReads::default();
        for _ in 0..LAZY_AFTER_ACK_READS {
            policy.after_read(true);
        }
        assert!(!policy.lazy);
        assert_eq!(policy.after_read(true), Some(true));
    }
}
