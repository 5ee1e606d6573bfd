//! The event loop: the only code that touches the socket.
//!
//! An [`EventLoop`] owns the connection, the receiving end of the request channel and the
//! [`MqttState`]. Each [`EventLoop::poll`] moves things along until there is an [`Event`] for
//! the application: it connects (and reconnects, with exponential backoff), reads and decodes
//! packets, hands them and the handles' requests to the state, writes what the state encoded,
//! and keeps the connection alive.
//!
//! Write coalescing: requests are taken from the channel in batches and encoded into one write
//! buffer, together with the acknowledgements for whatever was read, and the buffer goes out in
//! as few `write` calls as the socket allows. Reading and writing progress together inside one
//! future, so a broker that is itself blocked writing to us can never deadlock the connection.
//!
//! Keep-alive: a timer ticks every half keep-alive. At a tick, if a PINGREQ is outstanding for
//! a whole keep-alive the connection is declared dead; otherwise a PINGREQ goes out if we wrote
//! nothing, or read nothing, since the previous tick. So the broker hears from us at least once
//! per keep-alive, and a silent broker is noticed within one and a half.

use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use polyhub_mqtt::{
    ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, ReasonCode, decode,
    encode,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, info};

use crate::client::{AckToken, Client, Events};
use crate::error::{ConnectionError, StateError};
use crate::options::ClientOptions;
use crate::state::{Incoming, MqttState, Request, Waiter};
use crate::tls::Transport;

/// Most requests taken from the channel before the write buffer goes out.
const REQUEST_BATCH: usize = 256;

/// Above this many unsent bytes no further requests are taken: the socket sets the pace.
const WRITE_HIGH_WATER: usize = 1024 * 1024;

/// First read buffer reservation; doubled while reads fill it, up to [`MAX_READ_CHUNK`]. Small
/// at first so that thousands of idle connections stay cheap.
const MIN_READ_CHUNK: usize = 2 * 1024;
const MAX_READ_CHUNK: usize = 64 * 1024;

/// How long a clean DISCONNECT (or a protocol-error DISCONNECT) may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What happened, for the application.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted a connection (CONNACK success). Subscriptions have been renewed if
    /// it did not keep the session, and unacknowledged publishes are on their way again.
    Connected {
        /// Whether the broker resumed a stored session (always `false` with MQTT 3.1, whose
        /// CONNACK has no such flag).
        session_present: bool,
        /// MQTT 5 CONNACK properties (assigned client id, server keep-alive, limits, ...).
        properties: Properties,
    },
    /// A message arrived on a subscription. Topic aliases are already resolved; QoS 1/2
    /// messages are acknowledged by the client, unless [`ClientOptions::manual_acks`] is on:
    /// then the application acknowledges them with the token that comes with the event
    /// ([`EventLoop::poll_with_ack`], [`Events::recv_with_ack`]).
    Message(Publish),
    /// After a reconnect, the broker refused a subscription that was granted before; it is
    /// forgotten.
    ResubscribeFailed {
        /// The filter.
        filter: String,
        /// The SUBACK code.
        reason_code: ReasonCode,
    },
    /// An established connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// A connection attempt failed (before or without CONNACK success).
    ConnectFailed {
        /// Why.
        error: ConnectionError,
        /// When the next attempt starts, or `None` if there is none (reconnect disabled).
        retry_in: Option<Duration>,
    },
}

/// Why an established connection ended.
#[derive(Debug)]
pub enum DisconnectReason {
    /// We sent DISCONNECT: [`Client::disconnect`] was called, or every handle was dropped. The
    /// broker discards the will.
    ClientDisconnect,
    /// The broker sent DISCONNECT (MQTT 5).
    ServerDisconnect {
        /// Its reason code.
        reason_code: ReasonCode,
        /// Its explanation, if any.
        reason_string: Option<String>,
    },
    /// The connection failed: socket error, closed by the broker, keep-alive timeout, protocol
    /// violation.
    Error(ConnectionError),
}

/// The connection task's state, driven by [`poll`](EventLoop::poll).
///
/// Create it with [`EventLoop::new`], which also returns the first [`Client`] handle. Either
/// call `poll` in your own loop, or [`spawn`](EventLoop::spawn) it onto the runtime. Dropping
/// an `EventLoop` closes the socket at once, without DISCONNECT, so the broker publishes the
/// will; [`Client::disconnect`] is the clean way out.
#[derive(Debug)]
pub struct EventLoop {
    options: ClientOptions,
    state: MqttState,
    requests: mpsc::Receiver<Request>,
    phase: Phase,
    backoff: Backoff,
    /// The client id in use: the configured one, or the one the broker (or we, for 3.1) assigned.
    client_id: String,
    /// Whether a CONNACK has ever succeeded (MQTT 5 reconnects then resume the session).
    connected_once: bool,
}

#[derive(Debug)]
enum Phase {
    /// Connect at the next poll.
    Connect,
    /// Offline until then; requests are still answered.
    Backoff(Instant),
    Connected(Box<Connection>),
    /// Shut down: only queued events remain.
    Finished,
}

#[derive(Debug)]
struct Connection {
    io: Io,
    keep_alive: Option<KeepAlive>,
}

/// The socket and its buffers.
#[derive(Debug)]
struct Io {
    stream: Transport,
    read_buf: BytesMut,
    read_chunk: usize,
    write_buf: BytesMut,
    flush_needed: bool,
    read_activity: bool,
    write_activity: bool,
}

#[derive(Debug)]
struct KeepAlive {
    period: Duration,
    ticker: Interval,
    /// Ticks since the outstanding PINGREQ was sent.
    ping_outstanding: Option<u8>,
}

/// What one round of socket I/O achieved.
#[derive(Debug)]
enum Drive {
    Read,
    Wrote,
    Eof,
}

/// What woke the connected loop.
// Design: a short-lived stack value; boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Step {
    Io(io::Result<Drive>),
    Request(Option<Request>),
    Tick,
}

impl EventLoop {
    /// An event loop for `options` and the first handle on it. No I/O happens until
    /// [`poll`](EventLoop::poll).
    pub fn new(options: ClientOptions) -> (Client, EventLoop) {
        let (sender, requests) = mpsc::channel(options.request_capacity);
        let client_id = if options.client_id.is_empty() && options.protocol == ProtocolVersion::V31
        {
            random_client_id()
        } else {
            options.client_id.clone()
        };
        let event_loop = EventLoop {
            state: MqttState::new(options.state_config()),
            requests,
            phase: Phase::Connect,
            backoff: Backoff::new(&options),
            client_id,
            connected_once: false,
            options,
        };
        (Client::new(sender), event_loop)
    }

    /// Run until the next event; `None` once the client has shut down (after
    /// [`Client::disconnect`], after every handle was dropped, or after a connection loss with
    /// reconnect disabled) and every event has been returned.
    ///
    /// Between events it connects, reconnects after the backoff delay, answers requests, reads
    /// and acknowledges messages, and pings. Requests are only served while `poll` runs, so an
    /// application driving the loop itself must keep calling it.
    ///
    /// Cancel safety: dropping the future between events loses nothing, except during a
    /// connection attempt, which then starts over at the next call.
    pub async fn poll(&mut self) -> Option<Event> {
        self.poll_with_ack().await.map(|(event, _)| event)
    }

    /// [`poll`](EventLoop::poll), with the token that acknowledges a QoS 1/2 message when
    /// [`ClientOptions::manual_acks`] is on (`None` for every other event).
    pub async fn poll_with_ack(&mut self) -> Option<(Event, Option<AckToken>)> {
        loop {
            if let Some(event) = self.state.next_event_with_ack() {
                return Some(event);
            }
            match self.phase {
                Phase::Finished => return None,
                Phase::Connect => self.attempt().await,
                Phase::Backoff(until) => self.wait_offline(until).await,
                Phase::Connected(_) => self.step_connected().await,
            }
        }
    }

    /// Run the event loop on its own task and return its events. Every event is kept until
    /// read (the channel holds [`ClientOptions::event_capacity`] of them, then the task waits);
    /// dropping the [`Events`] discards them instead. The task ends when the client shuts down.
    pub fn spawn(mut self) -> Events {
        let (sender, receiver) = mpsc::channel(self.options.event_capacity);
        tokio::spawn(async move {
            while let Some(event) = self.poll_with_ack().await {
                // Without a receiver the events are simply dropped; requests still work.
                let _ = sender.send(event).await;
            }
        });
        Events::new(receiver)
    }

    /// One connection attempt now; on failure the error is returned and the loop moves to
    /// its backoff (no event is queued for it).
    pub(crate) async fn connect_now(&mut self) -> Result<(), ConnectionError> {
        match self.establish().await {
            Ok(connection) => {
                self.phase = Phase::Connected(connection);
                self.after_connect().await;
                Ok(())
            }
            Err(error) => {
                let delay = self.backoff.next_delay();
                self.phase = Phase::Backoff(Instant::now() + delay);
                Err(error)
            }
        }
    }

    async fn attempt(&mut self) {
        match self.establish().await {
            Ok(connection) => {
                self.phase = Phase::Connected(connection);
                self.after_connect().await;
            }
            Err(error) => {
                info!(client_id = %self.client_id, %error, "Connection attempt failed.");
                if self.options.reconnect {
                    let delay = self.backoff.next_delay();
                    self.phase = Phase::Backoff(Instant::now() + delay);
                    self.state.push_event(Event::ConnectFailed {
                        error,
                        retry_in: Some(delay),
                    });
                } else {
                    self.finish();
                    self.state.push_event(Event::ConnectFailed {
                        error,
                        retry_in: None,
                    });
                }
            }
        }
    }

    /// TCP, TLS, CONNECT → CONNACK; on success the state learns about the new connection.
    async fn establish(&mut self) -> Result<Box<Connection>, ConnectionError> {
        let connect = self.connect_packet();
        let timeout = self.options.connect_timeout;
        let (stream, read_buf, connack) =
            tokio::time::timeout(timeout, handshake(&self.options, connect))
                .await
                .map_err(|_| ConnectionError::ConnectTimeout(timeout))??;
        if connack.reason_code.is_error() {
            return Err(ConnectionError::Refused {
                reason_code: connack.reason_code,
                reason_string: connack.properties.reason_string,
            });
        }
        self.backoff.reset();
        self.connected_once = true;
        if let Some(assigned) = &connack.properties.assigned_client_identifier {
            self.client_id.clone_from(assigned);
        }
        let keep_alive = connack
            .properties
            .server_keep_alive
            .unwrap_or(self.options.keep_alive_secs());
        info!(
            client_id = %self.client_id,
            session_present = connack.session_present,
            "Connected."
        );
        let mut connection = Box::new(Connection {
            io: Io {
                stream,
                read_buf,
                read_chunk: MIN_READ_CHUNK,
                write_buf: BytesMut::new(),
                flush_needed: false,
                read_activity: false,
                write_activity: false,
            },
            keep_alive: KeepAlive::new(keep_alive),
        });
        self.state.connected(&connack, &mut connection.io.write_buf);
        Ok(connection)
    }

    /// Packets may have arrived right behind the CONNACK (a resumed session's queue).
    async fn after_connect(&mut self) {
        self.on_readable().await;
    }

    fn connect_packet(&self) -> Connect {
        let options = &self.options;
        let v5 = options.protocol.is_v5();
        let properties = if v5 {
            Properties {
                session_expiry_interval: options.session_expiry_interval,
                receive_maximum: options.receive_maximum,
                maximum_packet_size: options.max_packet_size,
                topic_alias_maximum: (options.topic_alias_maximum > 0)
                    .then_some(options.topic_alias_maximum),
                user_properties: options.connect_user_properties.clone(),
                ..Properties::default()
            }
        } else {
            Properties::default()
        };
        Connect {
            protocol: options.protocol,
            // MQTT 5 separates starting clean from ending the session, so only the first
            // connection starts clean and reconnects resume whatever the broker kept.
            clean_start: options.clean_start && !(v5 && self.connected_once),
            keep_alive: options.keep_alive_secs(),
            client_id: self.client_id.clone(),
            will: options.will.clone(),
            username: options.username.clone(),
            password: options.password.clone(),
            properties,
        }
    }

    /// Offline: answer requests until it is time for the next attempt.
    async fn wait_offline(&mut self, until: Instant) {
        let request = tokio::select! {
            () = tokio::time::sleep_until(until) => {
                self.phase = Phase::Connect;
                return;
            }
            request = self.requests.recv() => request,
        };
        match request {
            // Every handle is gone and there is no connection to close.
            None => self.finish(),
            Some(Request::Disconnect { waiter }) => {
                self.finish();
                let _ = waiter.send(Ok(()));
            }
            // Offline, the state queues or refuses; it writes nothing.
            Some(request) => self.state.handle_request(request, &mut BytesMut::new()),
        }
    }

    async fn step_connected(&mut self) {
        let accepts_requests = self.state.accepts_requests();
        let Phase::Connected(connection) = &mut self.phase else {
            return;
        };
        let Connection { io, keep_alive } = &mut **connection;
        let accepts_requests = accepts_requests && io.write_buf.len() < WRITE_HIGH_WATER;
        let step = tokio::select! {
            drive = io.drive() => Step::Io(drive),
            request = self.requests.recv(), if accepts_requests => Step::Request(request),
            () = tick(keep_alive) => Step::Tick,
        };
        match step {
            Step::Io(Ok(Drive::Read)) => self.on_readable().await,
            Step::Io(Ok(Drive::Wrote)) => {}
            Step::Io(Ok(Drive::Eof)) => {
                self.connection_lost(DisconnectReason::Error(ConnectionError::ClosedByBroker));
            }
            Step::Io(Err(error)) => {
                self.connection_lost(DisconnectReason::Error(ConnectionError::Io(error)));
            }
            Step::Request(Some(request)) => self.on_requests(request).await,
            Step::Request(None) => self.disconnect(None).await,
            Step::Tick => self.on_tick(),
        }
    }

    /// Decode and handle every complete packet in the read buffer.
    async fn on_readable(&mut self) {
        let max_packet_size = self.options.max_incoming_packet_size();
        let version = self.state.version();
        let Phase::Connected(connection) = &mut self.phase else {
            return;
        };
        let outcome = loop {
            let packet = match decode(&mut connection.io.read_buf, version, max_packet_size) {
                Ok(Some(packet)) => packet,
                Ok(None) => break Ok(()),
                Err(error) => break Err((error.reason_code(), ConnectionError::Decode(error))),
            };
            match self
                .state
                .handle_packet(packet, &mut connection.io.write_buf)
            {
                Ok(Incoming::Handled) => {}
                Ok(Incoming::PingResp) => {
                    if let Some(keep_alive) = &mut connection.keep_alive {
                        keep_alive.ping_outstanding = None;
                    }
                }
                Ok(Incoming::Disconnect {
                    reason_code,
                    reason_string,
                }) => {
                    info!(
                        client_id = %self.client_id,
                        reason_code = reason_code.0,
                        "The broker disconnected us."
                    );
                    self.connection_lost(DisconnectReason::ServerDisconnect {
                        reason_code,
                        reason_string,
                    });
                    return;
                }
                Err(error) => {
                    break Err((error.reason_code(), ConnectionError::Protocol(error)));
                }
            }
        };
        if let Err((reason_code, error)) = outcome {
            if version.is_v5() {
                // Tell the broker why before hanging up (MQTT 5 §4.13.1); best effort.
                let disconnect = Packet::Disconnect(Disconnect::with_reason(reason_code));
                if encode(&disconnect, version, &mut connection.io.write_buf).is_ok() {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.io.flush()).await;
                }
            }
            self.connection_lost(DisconnectReason::Error(error));
        }
    }

    /// Handle a request, then more of them while the channel has some ready, so that they
    /// leave in one write.
    async fn on_requests(&mut self, first: Request) {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(request) = next.take() {
            let Phase::Connected(connection) = &mut self.phase else {
                self.state.handle_request(request, &mut BytesMut::new());
                return;
            };
            if let Request::Disconnect { waiter } = request {
                self.disconnect(Some(waiter)).await;
                return;
            }
            self.state
                .handle_request(request, &mut connection.io.write_buf);
            handled += 1;
            if handled < REQUEST_BATCH
                && self.state.accepts_requests()
                && connection.io.write_buf.len() < WRITE_HIGH_WATER
            {
                next = self.requests.try_recv().ok();
            }
        }
    }

    fn on_tick(&mut self) {
        let version = self.state.version();
        let Phase::Connected(connection) = &mut self.phase else {
            return;
        };
        let Connection { io, keep_alive } = &mut **connection;
        let Some(keep_alive) = keep_alive else {
            return;
        };
        let read = std::mem::take(&mut io.read_activity);
        let wrote = std::mem::take(&mut io.write_activity);
        if let Some(ticks) = &mut keep_alive.ping_outstanding {
            *ticks += 1;
            // Ticks come every half keep-alive: two of them make a whole one.
            if *ticks >= 2 {
                let period = keep_alive.period;
                info!(client_id = %self.client_id, "No PINGRESP: the broker is gone.");
                self.connection_lost(DisconnectReason::Error(ConnectionError::KeepAliveTimeout(
                    period,
                )));
            }
            return;
        }
        if !read || !wrote {
            if let Err(error) = encode(&Packet::PingReq, version, &mut io.write_buf) {
                debug!(%error, "Cannot encode PINGREQ.");
            }
            keep_alive.ping_outstanding = Some(0);
        }
    }

    /// Send DISCONNECT (what was requested before it goes out first) and shut down.
    async fn disconnect(&mut self, waiter: Option<Waiter<()>>) {
        let version = self.state.version();
        if let Phase::Connected(connection) = &mut self.phase {
            let disconnect =
                Packet::Disconnect(Disconnect::with_reason(ReasonCode::NORMAL_DISCONNECTION));
            if encode(&disconnect, version, &mut connection.io.write_buf).is_ok() {
                let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    connection.io.flush().await?;
                    connection.io.stream.shutdown().await?;
                    drain_until_closed(&mut connection.io.stream).await
                })
                .await;
                if !matches!(closed, Ok(Ok(()))) {
                    debug!(client_id = %self.client_id, "DISCONNECT may not have gone out.");
                }
            }
            info!(client_id = %self.client_id, "Disconnected.");
            self.state.push_event(Event::Disconnected {
                reason: DisconnectReason::ClientDisconnect,
            });
        }
        self.finish();
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(()));
        }
    }

    /// The connection is gone: keep the session for the next one, or shut down.
    fn connection_lost(&mut self, reason: DisconnectReason) {
        if let DisconnectReason::Error(error) = &reason {
            info!(client_id = %self.client_id, %error, "Connection lost.");
        }
        self.state.connection_lost();
        self.state.push_event(Event::Disconnected { reason });
        if self.options.reconnect {
            let delay = self.backoff.next_delay();
            self.phase = Phase::Backoff(Instant::now() + delay);
        } else {
            self.finish();
        }
    }

    /// Stop for good: close the socket and the request channel, and fail whatever waits.
    fn finish(&mut self) {
        self.phase = Phase::Finished;
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            // Requests queued behind the end: a disconnect is done; the rest learn `Closed`
            // from their dropped waiters.
            if let Request::Disconnect { waiter } = request {
                let _ = waiter.send(Ok(()));
            }
        }
        self.state.shut_down();
    }
}

/// Reads and drops whatever still arrives until the broker closes the connection (it does on
/// DISCONNECT). Closing a socket with unread input makes the kernel reset the connection, and
/// a reset can discard what was sent last and not yet read by the broker: the PUBACKs and the
/// DISCONNECT itself, which would turn a clean disconnect into an abnormal one (will sent,
/// messages delivered again).
async fn drain_until_closed(stream: &mut Transport) -> io::Result<()> {
    let mut scratch = [0_u8; 2048];
    loop {
        match stream.read(&mut scratch).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A TLS peer that closes without close_notify: closed all the same.
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}

/// Open the transport, send CONNECT and read up to CONNACK. Bytes after the CONNACK stay in the
/// returned read buffer.
async fn handshake(
    options: &ClientOptions,
    connect: Connect,
) -> Result<(Transport, BytesMut, ConnAck), ConnectionError> {
    let tcp = TcpStream::connect((options.host.as_str(), options.port))
        .await
        .map_err(|source| ConnectionError::Connect {
            address: format!("{}:{}", options.host, options.port),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let mut stream = match &options.tls {
        Some(tls) => Transport::Tls(Box::new(tls.connect(&options.host, tcp).await?)),
        None => Transport::Tcp(tcp),
    };
    let version = connect.protocol;
    let mut write_buf = BytesMut::new();
    encode(&Packet::Connect(connect), version, &mut write_buf)
        .map_err(ConnectionError::InvalidConnect)?;
    stream.write_all(&write_buf).await?;
    stream.flush().await?;

    let mut read_buf = BytesMut::with_capacity(MIN_READ_CHUNK);
    let max_packet_size = options.max_incoming_packet_size();
    loop {
        if let Some(packet) = decode(&mut read_buf, version, max_packet_size)? {
            return match packet {
                Packet::ConnAck(connack) => Ok((stream, read_buf, connack)),
                other => Err(StateError::UnexpectedPacket(other.packet_type()).into()),
            };
        }
        read_buf.reserve(MIN_READ_CHUNK);
        if stream.read_buf(&mut read_buf).await? == 0 {
            return Err(ConnectionError::ClosedByBroker);
        }
    }
}

/// Wait for the next keep-alive tick; never, without keep-alive.
async fn tick(keep_alive: &mut Option<KeepAlive>) {
    match keep_alive {
        Some(keep_alive) => {
            keep_alive.ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl KeepAlive {
    fn new(seconds: u16) -> Option<KeepAlive> {
        if seconds == 0 {
            return None;
        }
        let period = Duration::from_secs(u64::from(seconds));
        let half = period / 2;
        let mut ticker = tokio::time::interval_at(Instant::now() + half, half);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(KeepAlive {
            period,
            ticker,
            ping_outstanding: None,
        })
    }
}

impl Io {
    /// Write what is buffered and read what arrives, whichever the socket allows; ready when
    /// something was read, the peer closed, or the write buffer made progress.
    fn drive(&mut self) -> impl Future<Output = io::Result<Drive>> + '_ {
        poll_fn(move |cx| self.poll_drive(cx))
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Drive>> {
        let mut wrote = false;
        while !self.write_buf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.write_buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    self.write_buf.advance(written);
                    wrote = true;
                    self.flush_needed = true;
                    self.write_activity = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => break,
            }
        }
        if self.write_buf.is_empty() && self.flush_needed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_needed = false,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }

        let spare = self.read_buf.capacity() - self.read_buf.len();
        if spare < self.read_chunk / 2 {
            self.read_buf.reserve(self.read_chunk);
        }
        let spare = self.read_buf.capacity() - self.read_buf.len();
        let read = pin!(self.stream.read_buf(&mut self.read_buf)).poll(cx);
        match read {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(Drive::Eof)),
            Poll::Ready(Ok(read)) => {
                if read >= spare {
                    // The buffer was the limit: read in bigger bites.
                    self.read_chunk = (self.read_chunk * 2).min(MAX_READ_CHUNK);
                }
                self.read_activity = true;
                Poll::Ready(Ok(Drive::Read))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending if wrote => Poll::Ready(Ok(Drive::Wrote)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Write out the whole buffer.
    async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all_buf(&mut self.write_buf).await?;
        self.stream.flush().await
    }
}

/// Exponential backoff between connection attempts.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    jitter: bool,
    attempt: u32,
}

impl Backoff {
    fn new(options: &ClientOptions) -> Backoff {
        Backoff {
            min: options.backoff_min,
            max: options.backoff_max,
            jitter: options.backoff_jitter,
            attempt: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self
            .min
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        if self.jitter {
            // Between half and all of the delay.
            let fraction = (random_u64() % 1024) as f64 / 1024.0;
            delay / 2 + delay.mul_f64(fraction / 2.0)
        } else {
            delay
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number from the standard library's randomly keyed hasher: plenty for jitter and
/// client ids, without a dependency.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A client id for MQTT 3.1, which does not let the broker assign one: at most 23 characters.
fn random_client_id() -> String {
    format!("polyhub-{:012x}", random_u64() & 0xFFFF_FFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: bool) -> Backoff {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            jitter,
            attempt: 0,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut backoff = backoff(false);
        let delays: Vec<u64> = (0..6)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        let mut backoff = backoff(true);
        for _ in 0..50 {
            backoff.reset();
            let first = backoff.next_delay();
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        }
    }

    #[test]
    fn random_client_ids_fit_mqtt_3_1() {
        let id = random_client_id();
        assert!(id.len() <= 23, "{id}");
        assert_ne!(random_client_id(), random_client_id());
    }
}
