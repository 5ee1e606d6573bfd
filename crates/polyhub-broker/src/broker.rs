//! The broker's public handle, its shared state, and the accept loops.
//!
//! Tasks: one accept loop per listener (`serve`, `serve_tls`), one task per connection (TLS
//! handshake included), one `$SYS` publisher, and short timers for delayed wills and session
//! expiry. Everything they share sits in one [`Shared`] behind an `Arc`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client;
use crate::config::{BrokerConfig, SocketOptions};
use crate::error::BrokerError;
use crate::local::LocalClient;
use crate::message::Message;
use crate::persist::{self, RestoreSummary, Snapshot};
use crate::retained::RetainedStore;
use crate::session::{Session, SessionKey, SessionKind};
use crate::stats::Stats;
use crate::subscriptions::SubscriptionTree;
use crate::sys;

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after an accept error such as EMFILE, so the loop does not spin while the process is
/// out of descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Presence events a slow [`Broker::presence_events`] receiver may fall behind by before it
/// misses some (it then gets `RecvError::Lagged` and can resynchronise with
/// [`Broker::connected_clients`]).
const PRESENCE_CAPACITY: usize = 4096;

/// A network client connected to or disconnected from the broker; see
/// [`Broker::presence_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPresence {
    /// The client id of the connection.
    pub client_id: String,
    /// `true` when the connection was accepted (CONNACK success), `false` when it ended.
    pub online: bool,
    /// When it happened.
    pub at: SystemTime,
}

/// Handle on a running broker; clones share the same state.
#[derive(Debug, Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

/// State shared by every task of one broker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    /// Applied to every accepted socket, before its task starts.
    sockets: SocketOptions,
    pub(crate) stats: Stats,
    pub(crate) subscriptions: RwLock<SubscriptionTree<SessionKey>>,
    pub(crate) retained: Mutex<RetainedStore<Arc<Message>>>,
    /// Sessions by client id, connected or not, local clients included.
    pub(crate) sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub(crate) started: Instant,
    /// Open network connections, counted from accept (so before CONNECT) to close.
    pub(crate) connections: AtomicUsize,
    /// Cancelled by [`Broker::close_network`] (and so by [`Broker::shutdown`]): accept loops
    /// and network connections end.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled by [`Broker::shutdown`] only: in-process clients stop. Separate from
    /// `shutdown` so that a program can disconnect every device first and still let its
    /// in-process consumers finish what they received.
    pub(crate) local_shutdown: CancellationToken,
    tasks: TaskCount,
    /// The next message sequence number (see [`Shared::next_seq`]).
    next_seq: AtomicU64,
    /// Connect and disconnect events of network clients.
    presence: broadcast::Sender<ClientPresence>,
    /// Client ids of network clients that subscribed (see [`Broker::subscription_events`]).
    subscribed: broadcast::Sender<String>,
    next_session_id: AtomicU64,
    next_assigned_id: AtomicU64,
    sys_started: AtomicBool,
}

/// Counts the connection tasks so that shutdown can wait for them.
#[derive(Debug, Default)]
struct TaskCount {
    running: AtomicUsize,
    idle: Notify,
}

/// An open network connection: counted in `connections` (for `max_connections`) and in the
/// tasks that [`Broker::shutdown`] waits for, until dropped with its task, however that ends.
///
/// Design: the slot travels inside the connection's future instead of a wrapper future around
/// it; a wrapper would hold the inner future twice (captured and awaited) and double the
/// memory of every idle connection.
pub(crate) struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        if self.0.tasks.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.tasks.idle.notify_waiters();
        }
    }
}

impl Shared {
    /// A new message sequence number: unique for this broker and, as the counter starts above
    /// both the wall clock in microseconds and the last number persisted, across restarts too.
    /// Relaxed: only uniqueness matters, and a publisher routes its messages in order, so its
    /// numbers increase.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The highest sequence number handed out so far (or the counter's start, less one).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Make sure every number handed out from now on is above `seq` (restoring a snapshot).
    pub(crate) fn seq_above(&self, seq: u64) {
        self.next_seq
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
    }

    /// Tell the presence receivers that `client_id` went online or offline. Callers order
    /// these per client id: an offline is announced before the session is released to the
    /// next connection, whose online comes after it has the session.
    pub(crate) fn announce_presence(&self, client_id: &str, online: bool) {
        if self.presence.receiver_count() == 0 {
            return;
        }
        // An error only means that every receiver went away in between.
        let _ = self.presence.send(ClientPresence {
            client_id: client_id.to_owned(),
            online,
            at: SystemTime::now(),
        });
    }

    /// Tell the subscription receivers that the network client `client_id` subscribed.
    pub(crate) fn announce_subscribed(&self, client_id: &str) {
        if self.subscribed.receiver_count() == 0 {
            return;
        }
        // An error only means that every receiver went away in between.
        let _ = self.subscribed.send(client_id.to_owned());
    }

    /// A new session id (0 is reserved for the broker itself).
    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A client id for a client that sent an empty one.
    pub(crate) fn assign_client_id(&self) -> String {
        let n = self.next_assigned_id.fetch_add(1, Ordering::Relaxed);
        format!("polyhub-{:x}-{n}", std::process::id())
    }

    async fn wait_for_tasks(&self) {
        loop {
            let idle = self.tasks.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.tasks.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Take a connection slot; counted against `max_connections` at CONNECT.
    fn open_connection(self: &Arc<Self>) -> ConnectionSlot {
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.tasks.running.fetch_add(1, Ordering::AcqRel);
        Stats::add(&self.stats.connections_total, 1);
        ConnectionSlot(Arc::clone(self))
    }

    /// Refresh the gauges that are cheaper to compute on demand than on the hot path.
    pub(crate) fn refresh_gauges(&self) {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let mut disconnected = 0u64;
        let mut stored = 0u64;
        for session in &sessions {
            if !session.is_online() {
                disconnected += 1;
            }
            let state = session.state.lock();
            let unacked = state.local.as_ref().map_or(0, |acks| acks.len());
            stored += (state.queue.len() + state.inflight.len() + unacked) as u64;
        }
        self.stats
            .clients_disconnected
            .store(disconnected, Ordering::Relaxed);
        self.stats.messages_stored.store(stored, Ordering::Relaxed);
        let retained = self.retained.lock().len() as u64;
        self.stats
            .retained_messages
            .store(retained, Ordering::Relaxed);
        let subscriptions = self.subscriptions.read().len() as u64;
        self.stats
            .subscriptions
            .store(subscriptions, Ordering::Relaxed);
    }

    /// Start the `$SYS` publisher once, from inside the runtime.
    fn start_sys(self: &Arc<Self>) {
        if self.config.sys_interval == 0 || self.sys_started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(sys::run(Arc::clone(self)));
    }
}

impl Broker {
    /// A broker with the given limits, the default socket options (TCP_NODELAY on) and no
    /// listeners yet.
    pub fn new(config: BrokerConfig) -> Broker {
        Broker::with_socket_options(config, SocketOptions::default())
    }

    /// A broker with the given limits and socket options (`[mqtt] tcp_nodelay`, see
    /// [`crate::MqttConfig::socket_options`]) and no listeners yet.
    pub fn with_socket_options(config: BrokerConfig, sockets: SocketOptions) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                sockets,
                stats: Stats::default(),
                subscriptions: RwLock::new(SubscriptionTree::new()),
                retained: Mutex::new(RetainedStore::new()),
                sessions: Mutex::new(HashMap::new()),
                started: Instant::now(),
                connections: AtomicUsize::new(0),
                shutdown: CancellationToken::new(),
                local_shutdown: CancellationToken::new(),
                tasks: TaskCount::default(),
                next_seq: AtomicU64::new(initial_seq()),
                presence: broadcast::channel(PRESENCE_CAPACITY).0,
                subscribed: broadcast::channel(PRESENCE_CAPACITY).0,
                next_session_id: AtomicU64::new(1),
                next_assigned_id: AtomicU64::new(1),
                sys_started: AtomicBool::new(false),
            }),
        }
    }

    /// The limits this broker enforces.
    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// The options this broker applies to the sockets it accepts.
    pub fn socket_options(&self) -> SocketOptions {
        self.shared.sockets
    }

    /// Accept MQTT connections on `listener` until `shutdown` completes (or
    /// [`Broker::shutdown`] is called). Connections already open keep running; call
    /// [`Broker::shutdown`] to end them.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BrokerError> {
        self.shared.start_sys();
        tracing::info!(address = ?listener.local_addr().ok(), "MQTT listener ready.");
        let shared = &self.shared;
        accept_loop(shared, &listener, shutdown, |stream, peer| {
            let slot = shared.open_connection();
            tokio::spawn(client::run(Arc::clone(shared), stream, peer, slot));
        })
        .await;
        Ok(())
    }

    /// Accept MQTT-over-TLS connections on `listener` until `shutdown` completes. The TLS
    /// handshake runs in each connection's own task, never in the accept loop.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BrokerError> {
        self.shared.start_sys();
        tracing::info!(address = ?listener.local_addr().ok(), "MQTT TLS listener ready.");
        let shared = &self.shared;
        accept_loop(shared, &listener, shutdown, |stream, peer| {
            let slot = shared.open_connection();
            let acceptor = acceptor.clone();
            let task_shared = Arc::clone(shared);
            tokio::spawn(async move {
                let accepting =
                    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                let handshake = tokio::select! {
                    result = accepting => result,
                    () = task_shared.shutdown.cancelled() => return,
                };
                match handshake {
                    Ok(Ok(tls)) => client::run(task_shared, tls, peer, slot).await,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed.");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
                }
            });
        })
        .await;
        Ok(())
    }

    /// Disconnect every client (MQTT 5 clients get DISCONNECT "server shutting down") and wait
    /// until their tasks have ended. Listeners stop accepting and `serve` returns; local
    /// clients' `recv` returns `None` once their queue is empty.
    pub async fn shutdown(&self) {
        self.close_network().await;
        self.shared.local_shutdown.cancel();
        for session in self.shared.sessions.lock().values() {
            if session.kind() == SessionKind::Local {
                session.notify.notify_one();
            }
        }
    }

    /// The first half of [`Broker::shutdown`]: stop accepting, disconnect every network
    /// client (as `shutdown` does) and wait until their tasks have ended, but leave in-process
    /// clients working: they can still receive what is queued for them, acknowledge it and
    /// publish. A graceful stop calls this first, so that nothing new arrives, then lets its
    /// in-process consumers finish, then calls `shutdown`.
    pub async fn close_network(&self) {
        self.shared.shutdown.cancel();
        // Connection tasks do not wait on the token (it would enlarge every idle connection);
        // they check it whenever their session's notify wakes them. A session registered
        // after this loop was registered after the cancel, and its task sees the token
        // cancelled before it first waits.
        for session in self.shared.sessions.lock().values() {
            session.notify.notify_one();
        }
        self.shared.wait_for_tasks().await;
    }

    /// Counters behind `$SYS/broker/...`. The gauges that are computed on demand (stored
    /// messages, disconnected clients) are refreshed by this call.
    pub fn stats(&self) -> &Stats {
        self.shared.refresh_gauges();
        &self.shared.stats
    }

    /// Time since the broker was created.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Publish the `$SYS/broker/...` topics now (they are also published every
    /// `sys_interval` seconds while a listener runs).
    pub fn publish_sys(&self) {
        sys::publish(&self.shared);
    }

    /// What persistence saves, taken now: retained messages and persistent sessions (see
    /// [`persist`](crate::persist)). Each session is locked briefly, one at a time.
    pub fn snapshot(&self) -> Snapshot {
        persist::snapshot(&self.shared)
    }

    /// Put a saved state back, before the listeners start: retained messages replace those on
    /// the same topics, and sessions come back disconnected, their expiry and will-delay
    /// timers starting now. A session whose client id is in use is skipped. Needs a tokio
    /// runtime.
    pub fn restore(&self, snapshot: Snapshot) -> Result<RestoreSummary, BrokerError> {
        persist::restore(&self.shared, snapshot)
    }

    /// Connect and disconnect events of network clients, from now on: `online` when a
    /// connection is accepted (CONNACK success), `offline` when it ends for whatever reason
    /// (DISCONNECT, socket closed, keep-alive timeout, protocol violation, takeover,
    /// shutdown). For one client id an offline always comes before the online of the
    /// connection that took over. In-process clients are not reported.
    ///
    /// To know who is online, subscribe first, then read [`Broker::connected_clients`]; a
    /// receiver that falls more than a few thousand events behind gets
    /// `RecvError::Lagged` and should read [`Broker::connected_clients`] again.
    pub fn presence_events(&self) -> broadcast::Receiver<ClientPresence> {
        self.shared.presence.subscribe()
    }

    /// The client id of each network client that subscribes, once its subscriptions are in
    /// place (its SUBACK is on its way): the moment a message for it can be routed to it,
    /// which [`Broker::client_subscribed`] then confirms. Sent whether or not the filters were
    /// accepted or new. In-process clients are not reported. A receiver more than a few
    /// thousand events behind gets `RecvError::Lagged` and misses those.
    pub fn subscription_events(&self) -> broadcast::Receiver<String> {
        self.shared.subscribed.subscribe()
    }

    /// Client ids of the network clients connected now.
    pub fn connected_clients(&self) -> Vec<String> {
        let sessions = self.shared.sessions.lock();
        sessions
            .values()
            .filter(|session| session.kind() == SessionKind::Network && session.is_online())
            .map(|session| session.client_id.clone())
            .collect()
    }

    /// Whether the network client `client_id` can be sent to: connected, and subscribed to
    /// something (`None`: no network session of that id). Until a device that just connected
    /// has subscribed, a command published to it would reach nobody.
    pub fn client_reachable(&self, client_id: &str) -> Option<bool> {
        let session = self.network_session(client_id)?;
        if !session.is_online() {
            return Some(false);
        }
        let state = session.state.lock();
        Some(!state.subscriptions.is_empty())
    }

    /// Whether the network client `client_id` would receive a message on `topic`: its session
    /// (connected or not) has a subscription matching it (`None`: no network session of that
    /// id). A device's commands use this to tell "connected, but not subscribed to its command
    /// topic yet" from "can be sent to".
    pub fn client_subscribed(&self, client_id: &str, topic: &str) -> Option<bool> {
        let session = self.network_session(client_id)?;
        let state = session.state.lock();
        Some(state.subscriptions.iter().any(|(filter, _)| {
            let plain = match polyhub_mqtt::topic::parse_shared(filter) {
                Ok(Some((_group, inner))) => inner,
                _ => filter,
            };
            polyhub_mqtt::topic::matches(plain, topic)
        }))
    }

    /// The session of the network client `client_id`, if there is one (in-process clients'
    /// sessions are not devices).
    fn network_session(&self, client_id: &str) -> Option<Arc<Session>> {
        let session = self.shared.sessions.lock().get(client_id).cloned()?;
        (session.kind() == SessionKind::Network).then_some(session)
    }

    /// The sequence number of the most recently routed message (see [`LocalMessage::seq`]).
    ///
    /// [`LocalMessage::seq`]: crate::LocalMessage::seq
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq()
    }

    /// An in-process client with a **persistent** session: the session outlives the client
    /// (dropping the client detaches it; subscriptions and queue stay, and the queue keeps
    /// filling), it is saved in snapshots and restored, and its client acknowledges what it
    /// has processed ([`LocalClient::ack`]): a message taken and not acknowledged is handed
    /// out again, marked redelivered, to the next client that attaches, after a restore too.
    ///
    /// Resumes the session of `client_id` if there is one that no client is attached to
    /// ([`LocalClient::session_present`] then says so); otherwise creates it, with a queue
    /// bound of `max_queued` (0: unbounded; a resumed session keeps its own). A persistent
    /// network session that no connection is attached to is resumed too, its messages in flight
    /// handed out again. Fails if the id belongs to a connected network client, to a
    /// non-persistent local client, or to a persistent one that a client is attached to, or
    /// after shutdown. End the session for good with
    /// [`LocalClient::end_session`] or [`Broker::discard_local_session`].
    pub fn local_client_persistent(
        &self,
        client_id: &str,
        max_queued: usize,
    ) -> Result<LocalClient, BrokerError> {
        self.admit_local_client(client_id)?;
        let in_use = || BrokerError::InvalidRequest(format!("client id {client_id:?} is in use"));
        let mut sessions = self.shared.sessions.lock();
        let (session, present) = match sessions.get(client_id) {
            Some(existing) => {
                // A detached persistent network session is resumed as well (a hub's parser
                // moving from process to task isolation).
                if existing.kind() != SessionKind::Local && !existing.become_local() {
                    return Err(in_use());
                }
                {
                    let mut state = existing.state.lock();
                    match state.local.as_deref_mut() {
                        Some(acks) if !acks.attached => {
                            acks.attached = true;
                            acks.redeliver_unacked();
                        }
                        _ => return Err(in_use()),
                    }
                }
                (Arc::clone(existing), true)
            }
            None => {
                let session = Arc::new(Session::new_local_persistent(
                    self.shared.next_session_id(),
                    client_id.to_owned(),
                    max_queued,
                    VecDeque::new(),
                    &self.shared.config,
                ));
                if let Some(acks) = session.state.lock().local.as_deref_mut() {
                    acks.attached = true;
                }
                sessions.insert(client_id.to_owned(), Arc::clone(&session));
                (session, false)
            }
        };
        drop(sessions);
        session.set_online(true);
        // Anything queued or to be redelivered is waiting already: make sure recv looks.
        session.notify.notify_one();
        Ok(LocalClient::new(Arc::clone(&self.shared), session, present))
    }

    /// End the persistent in-process session of `client_id` that no client is attached to
    /// (one restored from a snapshot, or one whose client was dropped): its subscriptions,
    /// queue and unacknowledged messages go. Returns whether there was such a session.
    pub fn discard_local_session(&self, client_id: &str) -> bool {
        let session = {
            let mut sessions = self.shared.sessions.lock();
            let detached = sessions.get(client_id).is_some_and(|session| {
                session.kind() == SessionKind::Local
                    && session
                        .state
                        .lock()
                        .local
                        .as_deref()
                        .is_some_and(|acks| !acks.attached)
            });
            if !detached {
                return false;
            }
            sessions.remove(client_id)
        };
        if let Some(session) = session {
            session.state.lock().local = None;
            self.shared.end_session(&session);
        }
        true
    }

    /// An in-process client with the given client id. Fails if a session with that id exists
    /// (a network client's, even disconnected, or another local client's) or after shutdown.
    pub fn local_client(&self, client_id: &str) -> Result<LocalClient, BrokerError> {
        self.local_client_with_queue(client_id, self.shared.config.max_queued_messages)
    }

    /// What every in-process client must pass before it gets a session: the broker is not
    /// shut down and the id is not empty. Starts `$SYS` publishing with the first one.
    fn admit_local_client(&self, client_id: &str) -> Result<(), BrokerError> {
        if self.shared.local_shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        if client_id.is_empty() {
            return Err(BrokerError::InvalidRequest("empty client id".into()));
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.shared.start_sys();
        }
        Ok(())
    }

    /// An in-process client whose queue holds up to `max_queued` undelivered messages
    /// (0: unbounded) instead of `max_queued_messages`: for consumers that take bursts larger
    /// than a network client's queue, such as ingestion.
    pub fn local_client_with_queue(
        &self,
        client_id: &str,
        max_queued: usize,
    ) -> Result<LocalClient, BrokerError> {
        self.admit_local_client(client_id)?;
        let session = {
            let mut sessions = self.shared.sessions.lock();
            if sessions.contains_key(client_id) {
                return Err(BrokerError::InvalidRequest(format!(
                    "client id {client_id:?} is in use"
                )));
            }
            let session = Arc::new(Session::new(
                self.shared.next_session_id(),
                client_id.to_owned(),
                SessionKind::Local,
                max_queued,
            ));
            sessions.insert(client_id.to_owned(), Arc::clone(&session));
            session
        };
        Ok(LocalClient::new(Arc::clone(&self.shared), session, false))
    }
}

/// Where a new broker's sequence numbers start: the wall clock in microseconds since the Unix
/// epoch, so that a broker restarted without its snapshot (or after numbers handed out since
/// the last save) still starts above every number of its previous run, unless that run
/// averaged more than a million messages a second. [`Broker::restore`] raises it above the
/// snapshot's numbers.
fn initial_seq() -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    u64::try_from(micros).unwrap_or(u64::MAX / 2).max(1)
}

/// Accept connections until `shutdown` completes or the broker shuts down, handing each to
/// `spawn`. Accept errors (EMFILE, a connection reset before accept) are logged and the loop
/// goes on.
async fn accept_loop(
    shared: &Shared,
    listener: &TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    mut spawn: impl FnMut(TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Set explicitly either way: an accepted socket may inherit options from the
                // listener, which the broker does not own.
                if let Err(error) = stream.set_nodelay(shared.sockets.tcp_nodelay) {
                    tracing::debug!(%peer, %error, "Cannot set TCP_NODELAY.");
                }
                spawn(stream, peer);
            }
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, "Connection failed before accept.");
            }
            Err(error) => {
                tracing::warn!(%error, "Accept failed; retrying shortly.");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    () = &mut shutdown => break,
                    () = shared.shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!(address = ?listener.local_addr().ok(), "MQTT listener stopped.");
}

/// Errors that concern only the connection being accepted.
fn is_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionRefused
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;

    /// TCP_NODELAY as read back (getsockopt) from the socket that the accept loop of a broker
    /// with `tcp_nodelay` hands to its connection task. The listener is given the opposite
    /// setting, because Linux copies TCP_NODELAY from a listener to the sockets it accepts:
    /// a broker that left the accepted socket alone would report the listener's value.
    async fn accepted_socket_nodelay(tcp_nodelay: bool) -> bool {
        let broker =
            Broker::with_socket_options(BrokerConfig::default(), SocketOptions { tcp_nodelay });
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_nodelay(!tcp_nodelay).unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let listener = socket.listen(16).unwrap();
        let address = listener.local_addr().unwrap();

        let stop = CancellationToken::new();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let mut seen_tx = Some(seen_tx);
        let accepting = accept_loop(&broker.shared, &listener, stop.cancelled(), |stream, _| {
            if let Some(seen_tx) = seen_tx.take() {
                let _ = seen_tx.send(stream.nodelay());
            }
        });
        let connecting = async {
            let _client = TcpStream::connect(address).await.unwrap();
            let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx).await;
            stop.cancel();
            seen
        };
        let ((), seen) = tokio::join!(accepting, connecting);
        seen.expect("no connection accepted within 5 s")
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn accepted_sockets_get_tcp_nodelay_when_configured() {
        assert!(accepted_socket_nodelay(true).await);
    }

    #[tokio::test]
    async fn accepted_sockets_keep_nagle_when_tcp_nodelay_is_off() {
        assert!(!accepted_socket_nodelay(false).await);
    }

    #[test]
    fn the_default_broker_sets_tcp_nodelay() {
        assert!(
            Broker::new(BrokerConfig::default())
                .socket_options()
                .tcp_nodelay
        );
    }
}
