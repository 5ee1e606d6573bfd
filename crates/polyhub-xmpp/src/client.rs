//! [`XmppBackend`]: the hub on an XMPP server (as an account or as a component) as a
//! Polyglot backend client.
//!
//! One task owns the connection (a [`Link`]: tokio-xmpp's `StanzaStream` for an account, the
//! [`crate::component`] worker for a component; both reconnect by themselves with a backoff
//! of 1 s doubling up to 30 s) and does everything that touches it: writing the stanzas
//! callers hand it, and turning what arrives into [`BackendEvent`]s. The stanzas are the same
//! in both modes; a component's carry its domain as sender. Callers only share small tables
//! with the task (connection state, device presence, JID → device id), so `send_command`
//! never waits on event handling.
//!
//! Presence: after every (re)connection the client sends a subscription request to every
//! known device of its protocol; devices accept it (or were pre-approved) and the server then
//! forwards their presence. An account also sends its own presence, on which its server sends
//! the current presence of every subscribed contact. A component has no session presence for
//! the server to act on, so it asks for the current presence itself: with a probe, sent only
//! once the device's server has confirmed the subscription (`subscribed`, which Prosody sends
//! both on approval and in answer to a request that was approved before). Never earlier:
//! Prosody answers a probe from a contact that is not (yet) subscribed with `unsubscribed`
//! on the device's behalf, which cancels the pending request before the device sees it.
//! Subscription requests *from* known devices are approved in both modes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use polyhub_polyglot::backend::{
    BackendClient, BackendError, BackendEvent, Credentials, SendOutcome,
};
use polyhub_store::{Command, Device, ListQuery, Store, StoreError, now_millis};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Id, Lang, Message, MessageType};
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::receipts::{Received, Request as ReceiptRequest};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::link::{Link, LinkEvent, Written};
use crate::settings::XmppOptions;
use crate::wire::{Body, classify_body, command_body, device_jid};
use crate::{admin, provision};

/// Outgoing stanzas waiting for the stream task.
const REQUEST_QUEUE: usize = 256;
/// Stanzas the stream may hold while it writes or reconnects.
const STREAM_QUEUE: usize = 64;
/// Devices read from the store per page when (re)subscribing.
const DEVICE_PAGE: u32 = 1_000;

/// State shared between callers and the stream task.
#[derive(Debug)]
struct Shared {
    options: XmppOptions,
    connected: AtomicBool,
    /// Device id → its resources currently available (online iff not empty).
    presence: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Bare JID → device id, for the devices this client knows.
    devices: Mutex<HashMap<BareJid, String>>,
}

impl Shared {
    fn known_device(&self, jid: &BareJid) -> Option<String> {
        self.devices.lock().get(jid).cloned()
    }

    /// Remembers a device's JID; `true` if it was not known.
    fn remember(&self, jid: BareJid, device_id: &str) -> bool {
        self.devices
            .lock()
            .insert(jid, device_id.to_owned())
            .as_deref()
            != Some(device_id)
    }
}

/// A stanza for the stream task, with where to report its transmission token.
enum Request {
    Stanza {
        stanza: Box<Stanza>,
        token: Option<oneshot::Sender<Written>>,
    },
    /// An IQ request whose answer (result or error, matched by id) goes to `answer`.
    Iq {
        iq: Box<Iq>,
        answer: oneshot::Sender<Iq>,
    },
}

/// The XMPP backend client. Cheap to share; its task stops on the shutdown token.
#[derive(Debug)]
pub struct XmppBackend {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl XmppBackend {
    /// Connects (in the background: the first connection and every reconnection are made by
    /// the stream task) and starts reporting on `events`.
    pub fn start(
        options: XmppOptions,
        events: mpsc::Sender<BackendEvent>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> XmppBackend {
        let link = Link::open(&options, STREAM_QUEUE);
        let shared = Arc::new(Shared {
            options,
            connected: AtomicBool::new(false),
            presence: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
        });
        let (requests, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let task = StreamTask {
            shared: shared.clone(),
            link,
            requests: requests_rx,
            events,
            store,
            pending_iqs: HashMap::new(),
        };
        tokio::spawn(task.run(shutdown));
        XmppBackend { shared, requests }
    }

    /// Whether the hub is logged in (account) or connected (component) right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Queues a stanza; with `wait`, returns once it was written to the server.
    async fn send_stanza(&self, stanza: Stanza, wait: bool) -> Result<(), BackendError> {
        let (token_tx, token_rx) = oneshot::channel();
        self.requests
            .send(Request::Stanza {
                stanza: Box::new(stanza),
                token: wait.then_some(token_tx),
            })
            .await
            .map_err(|_| BackendError::Unavailable("the XMPP client has stopped".to_owned()))?;
        if !wait {
            return Ok(());
        }
        let timeout = self.shared.options.send_timeout;
        let written = async {
            match token_rx.await {
                Ok(written) => written.outcome().await,
                Err(_) => Err("the XMPP client stopped before writing the message".to_owned()),
            }
        };
        match tokio::time::timeout(timeout, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(BackendError::Unavailable(reason)),
            Err(_) => Err(BackendError::Unavailable(format!(
                "the XMPP server did not take the message within {timeout:?}"
            ))),
        }
    }

    /// Sends an IQ request and waits (up to the send timeout) for its answer.
    async fn request(&self, iq: Iq) -> Result<Iq, BackendError> {
        if !self.is_connected() {
            return Err(BackendError::Unavailable(
                "not connected to the XMPP server".to_owned(),
            ));
        }
        let (answer, answered) = oneshot::channel();
        self.requests
            .send(Request::Iq {
                iq: Box::new(iq),
                answer,
            })
            .await
            .map_err(|_| BackendError::Unavailable("the XMPP client has stopped".to_owned()))?;
        let timeout = self.shared.options.send_timeout;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(BackendError::Unavailable(
                "the XMPP connection was lost before the server answered".to_owned(),
            )),
            Err(_) => Err(BackendError::Unavailable(format!(
                "the XMPP server did not answer within {timeout:?}"
            ))),
        }
    }

    /// The device's JID, remembered (and subscribed to, the first time) so its presence and
    /// answers are recognised.
    async fn resolve(&self, device: &Device) -> Result<BareJid, BackendError> {
        let jid = device_jid(device, &self.shared.options.device_domain)
            .map_err(BackendError::Rejected)?;
        if self.shared.remember(jid.clone(), &device.id) && self.is_connected() {
            self.send_stanza(subscribe(&jid), false).await?;
        }
        Ok(jid)
    }
}

#[async_trait]
impl BackendClient for XmppBackend {
    fn protocol(&self) -> &str {
        &self.shared.options.protocol
    }

    async fn send_command(
        &self,
        device: &Device,
        command: &Command,
    ) -> Result<SendOutcome, BackendError> {
        let jid = self.resolve(device).await?;
        if !self.is_connected() {
            return Err(BackendError::Unavailable(
                "not connected to the XMPP server".to_owned(),
            ));
        }
        let mut message = Message::chat(Some(Jid::from(jid)))
            .with_body(Lang::default(), command_body(command))
            .with_payload(ReceiptRequest);
        message.id = Some(Id(command.id.clone()));
        self.send_stanza(message.into(), true).await?;
        Ok(SendOutcome::Sent)
    }

    async fn device_added(&self, device: &Device) -> Result<(), BackendError> {
        // Remembered and asked for its presence now, not at the next login.
        self.resolve(device).await.map(|_| ())
    }

    async fn provision_device(&self, device: &Device) -> Result<Option<Credentials>, BackendError> {
        let jid = device_jid(device, &self.shared.options.device_domain)
            .map_err(BackendError::Rejected)?;
        let Some(endpoint) = &self.shared.options.registration else {
            return Err(BackendError::Unsupported(format!(
                "cannot create the XMPP account {jid}: [polyglot.{}] is in component mode, which \
                 has no client connection to register accounts on; set registration_server to \
                 the server's client listener, or create the account on the server",
                self.shared.options.protocol
            )));
        };
        let credentials =
            provision::register(endpoint, self.shared.options.send_timeout, &jid).await?;
        // Known from now on, so its presence counts as soon as it logs in.
        self.resolve(device).await?;
        Ok(Some(credentials))
    }

    async fn remove_device(&self, device: &Device) -> Result<(), BackendError> {
        let jid = device_jid(device, &self.shared.options.device_domain)
            .map_err(BackendError::Rejected)?;
        if self.shared.options.is_component() {
            // XEP-0133 commands run with the rights of a logged-in admin account; a component
            // is not one, and polyhub keeps no device password to cancel the registration with.
            return Err(BackendError::Unsupported(format!(
                "cannot remove the XMPP account {jid}: [polyglot.{}] is in component mode, and \
                 only an admin account can delete accounts; delete it on the server",
                self.shared.options.protocol
            )));
        }
        let host = BareJid::from_parts(None, jid.domain());
        let request_id = format!("polyhub-delete-{}", device.id);
        let opened = self
            .request(admin::execute_request(&request_id, &host))
            .await?;
        let session = admin::session_of(opened, &jid)?;
        let completed = self
            .request(admin::submit_request(&request_id, &host, &session, &jid))
            .await?;
        admin::check_completed(completed, &jid)?;
        // Forgotten: its presence no longer counts and its messages are no longer a device's.
        self.shared.devices.lock().remove(&jid);
        self.shared.presence.lock().remove(&device.id);
        Ok(())
    }

    fn is_online(&self, device_id: &str) -> Option<bool> {
        if !self.is_connected() {
            return Some(false);
        }
        Some(
            self.shared
                .presence
                .lock()
                .get(device_id)
                .is_some_and(|resources| !resources.is_empty()),
        )
    }
}

fn subscribe(jid: &BareJid) -> Stanza {
    Presence::subscribe().with_to(jid.clone()).into()
}

/// The task that owns the stream.
struct StreamTask {
    shared: Arc<Shared>,
    link: Link,
    requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<BackendEvent>,
    store: Arc<dyn Store>,
    /// IQ requests of ours waiting for their answer, by id.
    pending_iqs: HashMap<String, oneshot::Sender<Iq>>,
}

impl StreamTask {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                request = self.requests.recv() => match request {
                    Some(Request::Stanza { stanza, token }) => {
                        let sent = self.link.send(stanza).await;
                        if let Some(token) = token {
                            let _ = token.send(sent);
                        }
                    }
                    Some(Request::Iq { iq, answer }) => {
                        self.pending_iqs.retain(|_, waiting| !waiting.is_closed());
                        self.pending_iqs.insert(iq.id().to_owned(), answer);
                        self.send(Stanza::Iq(*iq)).await;
                    }
                    // Every handle is gone: nobody can send any more.
                    None => break,
                },
                event = self.link.next() => match event {
                    Some(LinkEvent::Connected(address)) => {
                        tracing::info!(protocol = %self.shared.options.protocol, jid = %address, "logged in to the XMPP server");
                        self.on_connected().await;
                    }
                    Some(LinkEvent::Resumed) => {
                        self.shared.connected.store(true, Ordering::SeqCst);
                    }
                    Some(LinkEvent::Lost) => {
                        tracing::warn!(protocol = %self.shared.options.protocol, "lost the XMPP connection; reconnecting");
                        self.on_disconnected().await;
                    }
                    Some(LinkEvent::Stanza(stanza)) => self.on_stanza(*stanza).await,
                    None => break,
                },
            }
        }
        self.on_disconnected().await;
        self.link.close(std::time::Duration::from_secs(2)).await;
    }

    async fn emit(&self, event: BackendEvent) {
        if self.events.send(event).await.is_err() {
            tracing::debug!("backend events channel closed; event dropped");
        }
    }

    async fn send(&mut self, stanza: Stanza) {
        // Untracked: if the stream breaks these are redone on the next connection anyway.
        drop(self.link.send(Box::new(stanza)).await);
    }

    async fn on_connected(&mut self) {
        // A new session: presence learnt on the old one is void until re-announced.
        self.on_disconnected().await;
        if !self.shared.options.is_component() {
            // Broadcast to the account's roster; a component has none.
            self.send(Presence::available().into()).await;
        }
        match self.load_devices().await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "could not list devices to subscribe to their presence")
            }
        }
        let jids: Vec<BareJid> = self.shared.devices.lock().keys().cloned().collect();
        for jid in jids {
            self.send(subscribe(&jid)).await;
        }
        self.shared.connected.store(true, Ordering::SeqCst);
    }

    /// Reports every device seen online as offline: without a session nothing reaches them.
    async fn on_disconnected(&mut self) {
        self.shared.connected.store(false, Ordering::SeqCst);
        // Answers to requests of a lost session never come: their callers hear so now.
        self.pending_iqs.clear();
        let gone: Vec<String> = {
            let mut presence = self.shared.presence.lock();
            presence
                .drain()
                .filter(|(_, resources)| !resources.is_empty())
                .map(|(device_id, _)| device_id)
                .collect()
        };
        let at = now_millis();
        for device_id in gone {
            self.emit(BackendEvent::Presence {
                device_id,
                online: false,
                at,
            })
            .await;
        }
    }

    async fn load_devices(&self) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let page = self
                .store
                .list_devices(ListQuery {
                    parent: None,
                    after: after.clone(),
                    limit: DEVICE_PAGE,
                })
                .await?;
            for device in &page {
                if device.protocol != self.shared.options.protocol {
                    continue;
                }
                match device_jid(device, &self.shared.options.device_domain) {
                    Ok(jid) => {
                        self.shared.remember(jid, &device.id);
                    }
                    Err(error) => tracing::warn!(%error, "device has no usable JID"),
                }
            }
            match page.last() {
                Some(last) if page.len() >= DEVICE_PAGE as usize => after = Some(last.id.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// The device a JID belongs to: a known one, or `<id>@<device_domain>` of a device of this
    /// protocol created since the last (re)connection.
    async fn device_of(&self, jid: &BareJid) -> Option<String> {
        if let Some(device_id) = self.shared.known_device(jid) {
            return Some(device_id);
        }
        if jid.domain().as_str() != self.shared.options.device_domain {
            return None;
        }
        let node = jid.node()?;
        let device = self.store.get_device(node.as_str()).await.ok()?;
        let expected = device_jid(&device, &self.shared.options.device_domain).ok()?;
        if device.protocol != self.shared.options.protocol || &expected != jid {
            return None;
        }
        self.shared.remember(expected, &device.id);
        Some(device.id)
    }

    async fn on_stanza(&mut self, stanza: Stanza) {
        match stanza {
            Stanza::Presence(presence) => self.on_presence(presence).await,
            Stanza::Message(message) => self.on_message(message).await,
            Stanza::Iq(iq) => self.on_iq(iq).await,
        }
    }

    async fn on_presence(&mut self, presence: Presence) {
        let Some(from) = presence.from.clone() else {
            return;
        };
        let bare = from.to_bare();
        let Some(device_id) = self.device_of(&bare).await else {
            tracing::debug!(from = %from, "presence from an unknown JID ignored");
            return;
        };
        let resource = from
            .resource()
            .map(|resource| resource.as_str().to_owned())
            .unwrap_or_default();
        let change = match presence.type_ {
            PresenceType::None => Some(true),
            PresenceType::Unavailable | PresenceType::Error => Some(false),
            PresenceType::Subscribe => {
                // A device that asks to follow the hub is followed back: its presence then
                // reaches the hub even if it was registered after the hub logged in.
                self.send(Presence::subscribed().with_to(bare.clone()).into())
                    .await;
                self.send(subscribe(&bare)).await;
                None
            }
            PresenceType::Subscribed if self.shared.options.is_component() => {
                // Subscribed now, so a probe is answered with the device's presence (see the
                // module documentation for why not before).
                self.send(Presence::probe().with_to(bare.clone()).into())
                    .await;
                None
            }
            _ => None,
        };
        let Some(available) = change else {
            return;
        };
        let transition = {
            let mut table = self.shared.presence.lock();
            let resources = table.entry(device_id.clone()).or_default();
            let was_online = !resources.is_empty();
            if available {
                resources.insert(resource);
            } else if presence.type_ == PresenceType::Error || resource.is_empty() {
                resources.clear();
            } else {
                resources.remove(&resource);
            }
            let online = !resources.is_empty();
            (was_online != online).then_some(online)
        };
        if let Some(online) = transition {
            self.emit(BackendEvent::Presence {
                device_id,
                online,
                at: now_millis(),
            })
            .await;
        }
    }

    async fn on_message(&mut self, message: Message) {
        let Some(from) = message.from.clone() else {
            return;
        };
        let Some(device_id) = self.device_of(&from.to_bare()).await else {
            tracing::debug!(from = %from, "message from an unknown JID ignored");
            return;
        };
        let at = now_millis();
        if message.type_ == MessageType::Error {
            // The server bounced something we sent: a command, if the id is one.
            if let Some(Id(command_id)) = message.id.clone() {
                let reason = message
                    .payloads
                    .iter()
                    .find_map(|payload| StanzaError::try_from(payload.clone()).ok())
                    .map(|error| format!("XMPP error: {:?}", error.defined_condition))
                    .unwrap_or_else(|| "XMPP error".to_owned());
                self.emit(BackendEvent::Reply {
                    device_id,
                    command_id: Some(command_id),
                    name: None,
                    ok: false,
                    reply: None,
                    reason: Some(reason),
                    at,
                })
                .await;
            }
            return;
        }
        for payload in &message.payloads {
            if let Ok(received) = Received::try_from(payload.clone()) {
                self.emit(BackendEvent::Delivered {
                    command_id: received.id,
                    at,
                })
                .await;
            }
        }
        if !matches!(message.type_, MessageType::Chat | MessageType::Normal) {
            return;
        }
        let wants_receipt = message
            .payloads
            .iter()
            .any(|payload| ReceiptRequest::try_from(payload.clone()).is_ok());
        if let (true, Some(Id(id))) = (wants_receipt, message.id.clone()) {
            let mut receipt = Message::new(Some(from.clone())).with_payload(Received { id });
            receipt.type_ = message.type_.clone();
            self.send(receipt.into()).await;
        }
        // Prosody tags bodies with the stream's xml:lang: take whichever body there is.
        let Some(body) = message.bodies.values().next() else {
            return;
        };
        match classify_body(body) {
            Body::Reply {
                command_id,
                ok,
                reply,
                reason,
            } => {
                self.emit(BackendEvent::Reply {
                    device_id,
                    command_id: Some(command_id),
                    name: None,
                    ok,
                    reply,
                    reason,
                    at,
                })
                .await;
            }
            Body::Telemetry(values) => {
                self.emit(BackendEvent::Telemetry {
                    device_id,
                    values,
                    at,
                })
                .await;
            }
            Body::Ignored(why) => {
                tracing::debug!(device = %device_id, why, "message body ignored");
            }
        }
    }

    async fn on_iq(&mut self, iq: Iq) {
        // Requests must be answered (RFC 6120 §8.2.3); this client offers no IQ services.
        let (from, id) = match iq {
            Iq::Get { from, id, .. } | Iq::Set { from, id, .. } => (from, id),
            Iq::Result { .. } | Iq::Error { .. } => {
                if let Some(waiting) = self.pending_iqs.remove(iq.id()) {
                    let _ = waiting.send(iq);
                }
                return;
            }
        };
        let error = StanzaError::new(
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "en",
            "polyhub offers no IQ services",
        );
        let mut reply = Iq::from_error(id, error);
        if let (Some(from), Iq::Error { to, .. }) = (from, &mut reply) {
            *to = Some(from);
        }
        self.send(reply.into()).await;
    }
}
