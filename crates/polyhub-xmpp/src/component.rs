//! The component connection (XEP-0114): what tokio-xmpp's `StanzaStream` is for an account,
//! for a component.
//!
//! `StanzaStream` cannot carry a component (it insists on resource binding) and tokio-xmpp's
//! `Component` neither reconnects nor survives a quiet minute (it ends on the read timeout),
//! so this module keeps one worker task per component that connects, performs the handshake
//! (`<handshake>` with SHA-1 of stream id and secret), reconnects with the same backoff as
//! the account stream (1 s doubling up to 30 s), and pings the server when the line has been
//! silent so a dead server is noticed.
//!
//! Stanzas are never queued across connections: one handed over while the component is not
//! connected, or lost with a connection, is reported failed at once. A command is then
//! retried by the command service instead of reaching the device twice.
//!
//! Namespaces: on a component stream, stanzas are in `jabber:component:accept`, and Prosody
//! only routes stanzas in the stream's own namespace (an explicit `xmlns='jabber:client'` is
//! "unhandled"). tokio-xmpp's `component` feature would switch xmpp-parsers' namespace of
//! *every* stanza to it, breaking account mode in the same program, so it stays off and this
//! module moves stanzas between the two namespaces itself ([`in_namespace`]): the rest of the
//! crate only ever sees client stanzas. For the same reason the server's stream header is
//! given the `version='1.0'` that tokio-xmpp requires and XEP-0114 servers such as Prosody
//! omit ([`HeaderFix`]).

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, BufStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::minidom::{Element, Node};
use tokio_xmpp::parsers::component::Handshake;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::stream_error::StreamError;
use tokio_xmpp::xmlstream::{ReadError, StreamHeader, Timeouts, XmlStream, initiate_stream};

use crate::link::LinkEvent;

/// First reconnection delay; doubled after each failure up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_secs(1);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);
/// Longest a connection attempt (TCP, stream header, handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Id prefix of the keep-alive pings, whose answers are not passed on.
const PING_ID_PREFIX: &str = "polyhub-component-ping-";

/// Where a written (or failed) stanza is reported.
pub(crate) type WriteReport = oneshot::Sender<Result<(), String>>;

/// Elements are read untyped: the handshake answer is not a stanza, and a stanza that does
/// not parse must not end the connection.
type Stream = XmlStream<HeaderFix<BufStream<TcpStream>>, Element>;
/// The longest server stream header accepted.
const MAX_HEADER: usize = 4096;

/// Who the component is and where it connects.
#[derive(Debug, Clone)]
pub(crate) struct ComponentLogin {
    pub domain: BareJid,
    pub secret: String,
    /// `host:port` of the component listener.
    pub server: String,
    /// Where keep-alive pings go: a domain the server answers for.
    pub ping_to: Jid,
}

/// Handle to the worker task; dropping it (or [`ComponentStream::close`]) ends the
/// connection.
#[derive(Debug)]
pub(crate) struct ComponentStream {
    outgoing: mpsc::Sender<(Box<Stanza>, WriteReport)>,
    events: mpsc::Receiver<LinkEvent>,
}

impl ComponentStream {
    /// Starts connecting in the background.
    pub(crate) fn start(login: ComponentLogin, queue_depth: usize) -> ComponentStream {
        let (outgoing, outgoing_rx) = mpsc::channel(queue_depth);
        let (events_tx, events) = mpsc::channel(queue_depth);
        let worker = Worker {
            login,
            outgoing: outgoing_rx,
            events: events_tx,
            pings: 0,
        };
        tokio::spawn(worker.run());
        ComponentStream { outgoing, events }
    }

    /// Hands a stanza to the worker; the receiver says whether it was written.
    pub(crate) async fn send(&self, stanza: Box<Stanza>) -> oneshot::Receiver<Result<(), String>> {
        let (report, written) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, report))) = self.outgoing.send((stanza, report)).await
        {
            let _ = report.send(Err("the XMPP component connection has stopped".to_owned()));
        }
        written
    }

    /// The next connection change or received stanza; `None` once the worker has stopped.
    pub(crate) async fn next(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }

    /// Ends the connection (stream footer sent) and waits for the worker to finish.
    pub(crate) async fn close(self) {
        let ComponentStream {
            outgoing,
            mut events,
        } = self;
        drop(outgoing);
        while events.recv().await.is_some() {}
    }
}

/// How a connection ended.
enum Ended {
    /// The handle is gone: stop for good.
    Closed,
    /// The connection broke: reconnect.
    Lost(String),
}

struct Worker {
    login: ComponentLogin,
    outgoing: mpsc::Receiver<(Box<Stanza>, WriteReport)>,
    events: mpsc::Sender<LinkEvent>,
    pings: u64,
}

impl Worker {
    async fn run(mut self) {
        let mut delay = FIRST_RECONNECT_DELAY;
        loop {
            let Some(attempt) = self.connect_refusing_stanzas().await else {
                return;
            };
            let mut stream = match attempt {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(component = %self.login.domain, server = %self.login.server, %error, "XMPP component connection failed; retrying in {delay:?}");
                    if !self.wait_refusing_stanzas(delay).await {
                        return;
                    }
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                    continue;
                }
            };
            delay = FIRST_RECONNECT_DELAY;
            let address = Jid::from(self.login.domain.clone());
            if self
                .events
                .send(LinkEvent::Connected(address))
                .await
                .is_err()
            {
                close(stream).await;
                return;
            }
            match self.serve(&mut stream).await {
                Ended::Closed => {
                    close(stream).await;
                    return;
                }
                Ended::Lost(error) => {
                    tracing::warn!(component = %self.login.domain, %error, "lost the XMPP component connection; reconnecting");
                    if self.events.send(LinkEvent::Lost).await.is_err() {
                        return;
                    }
                    if !self.wait_refusing_stanzas(FIRST_RECONNECT_DELAY).await {
                        return;
                    }
                }
            }
        }
    }

    /// One connection attempt, refusing stanzas meanwhile; `None` once the handle is gone.
    async fn connect_refusing_stanzas(&mut self) -> Option<Result<Stream, String>> {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.login));
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                result = &mut attempt => {
                    return Some(result.unwrap_or_else(|_| {
                        Err(format!("no handshake within {CONNECT_TIMEOUT:?}"))
                    }));
                }
                request = self.outgoing.recv() => refuse(request?),
            }
        }
    }

    /// Waits `delay`, refusing stanzas meanwhile; `false` once the handle is gone.
    async fn wait_refusing_stanzas(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                request = self.outgoing.recv() => match request {
                    Some(request) => refuse(request),
                    None => return false,
                },
            }
        }
    }

    /// Passes stanzas both ways until the connection or the handle ends.
    async fn serve(&mut self, stream: &mut Stream) -> Ended {
        loop {
            tokio::select! {
                request = self.outgoing.recv() => {
                    let Some((mut stanza, report)) = request else {
                        return Ended::Closed;
                    };
                    // The server needs to know which of the component's addresses speaks;
                    // the shared stanza code leaves `from` empty as a client would.
                    stamp_from(&mut stanza, &self.login.domain);
                    let written = stream.send(&to_wire(*stanza)).await;
                    let failed = written.as_ref().err().map(ToString::to_string);
                    let _ = report.send(written.map_err(|error| error.to_string()));
                    if let Some(error) = failed {
                        return Ended::Lost(format!("writing: {error}"));
                    }
                }
                element = stream.next() => {
                    let element = match element {
                        Some(Ok(element)) => element,
                        Some(Err(ReadError::SoftTimeout)) => {
                            if let Err(error) = self.ping(stream).await {
                                return Ended::Lost(format!("writing a ping: {error}"));
                            }
                            continue;
                        }
                        Some(Err(ReadError::ParseError(error))) => {
                            return Ended::Lost(format!("malformed XML: {error}"));
                        }
                        Some(Err(ReadError::HardError(error))) => return Ended::Lost(error.to_string()),
                        Some(Err(ReadError::StreamFooterReceived)) | None => {
                            return Ended::Lost("the server closed the stream".to_owned());
                        }
                    };
                    if element.is("error", ns::STREAM) {
                        return Ended::Lost(describe_stream_error(element));
                    }
                    match from_wire(element) {
                        Ok(stanza) if is_ping_answer(&stanza) => {}
                        Ok(stanza) => {
                            if self.events.send(LinkEvent::Stanza(Box::new(stanza))).await.is_err() {
                                return Ended::Closed;
                            }
                        }
                        // One element we cannot use is not worth the connection.
                        Err(error) => tracing::debug!(%error, "unusable element from the XMPP server ignored"),
                    }
                }
            }
        }
    }

    /// Asks the server for an answer, so that a silent line is either proven alive or
    /// ends in the stream's hard timeout.
    async fn ping(&mut self, stream: &mut Stream) -> Result<(), String> {
        self.pings += 1;
        let id = format!("{PING_ID_PREFIX}{}", self.pings);
        let ping = Iq::from_get(id, Ping)
            .with_to(self.login.ping_to.clone())
            .with_from(Jid::from(self.login.domain.clone()));
        stream
            .send(&to_wire(ping.into()))
            .await
            .map_err(|error| error.to_string())
    }
}

/// Reports a stanza that could not go out because there is no connection.
fn refuse((_, report): (Box<Stanza>, WriteReport)) {
    let _ = report.send(Err("not connected to the XMPP server".to_owned()));
}

/// Connects, opens the component stream and shakes hands.
async fn connect(login: &ComponentLogin) -> Result<Stream, String> {
    let tcp = TcpStream::connect(&login.server)
        .await
        .map_err(|error| format!("connecting to {}: {error}", login.server))?;
    let header = StreamHeader {
        from: None,
        to: Some(Cow::Owned(login.domain.to_string())),
        id: None,
    };
    let mut pending = initiate_stream(
        HeaderFix::new(BufStream::new(tcp)),
        ns::COMPONENT,
        header,
        Timeouts::tight(),
    )
    .await
    .map_err(|error| format!("opening the component stream: {error}"))?;
    let stream_id = pending
        .take_header()
        .id
        .ok_or("the server's stream header has no id to shake hands with")?
        .into_owned();
    // A component stream has no features: the handshake comes right after the header.
    let mut stream: Stream = pending.skip_features();
    let handshake = Handshake::from_stream_id_and_password(stream_id, &login.secret);
    stream
        .send(&handshake)
        .await
        .map_err(|error| format!("sending the handshake: {error}"))?;
    loop {
        match stream.next().await {
            Some(Ok(element)) if element.is("handshake", ns::COMPONENT) => return Ok(stream),
            Some(Ok(element)) if element.is("error", ns::STREAM) => {
                // Prosody answers a wrong secret with not-authorized, an unknown domain with
                // host-unknown.
                return Err(format!(
                    "the server refused the component {}: {} (check component_domain and \
                     component_secret against the server's Component section)",
                    login.domain,
                    describe_stream_error(element)
                ));
            }
            Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(error)) => return Err(format!("during the handshake: {error}")),
            None => return Err("the server closed the connection during the handshake".to_owned()),
        }
    }
}

fn describe_stream_error(element: Element) -> String {
    match StreamError::try_from(element) {
        Ok(error) => format!("stream error: {error}"),
        Err(_) => "stream error".to_owned(),
    }
}

/// A stanza as the component stream carries it: in `jabber:component:accept`.
fn to_wire(stanza: Stanza) -> Element {
    in_namespace(Element::from(stanza), ns::JABBER_CLIENT, ns::COMPONENT)
}

/// A stanza from the component stream, in the client namespace the rest of the crate parses.
fn from_wire(element: Element) -> Result<Stanza, String> {
    Stanza::try_from(in_namespace(element, ns::COMPONENT, ns::JABBER_CLIENT))
        .map_err(|error| error.to_string())
}

/// `element` with every element of namespace `from` (the stanza and the children that share
/// its namespace, such as `<body/>`) moved to `to`; payloads of other namespaces untouched.
fn in_namespace(mut element: Element, from: &str, to: &str) -> Element {
    let namespace = element.ns();
    let namespace = if namespace == from {
        to
    } else {
        namespace.as_str()
    };
    let mut moved = Element::builder(element.name(), namespace).build();
    *moved.attrs_mut() = element.attrs().clone();
    for node in element.take_nodes() {
        match node {
            Node::Element(child) => {
                moved.append_child(in_namespace(child, from, to));
            }
            Node::Text(text) => moved.append_text_node(text),
        }
    }
    moved
}

/// Shows the XML parser a server stream header it accepts (see the module documentation):
/// `version='1.0'` added if missing. Everything after the header, and every write, passes
/// through untouched.
pub(crate) struct HeaderFix<Io> {
    inner: Io,
    /// The server's header as read so far; `None` once it has been rewritten.
    raw: Option<Vec<u8>>,
    /// The rewritten header (and what followed it in the same reads), not yet consumed.
    replacement: Vec<u8>,
    replacement_read: usize,
}

impl<Io> HeaderFix<Io> {
    pub(crate) fn new(inner: Io) -> HeaderFix<Io> {
        HeaderFix {
            inner,
            raw: Some(Vec::new()),
            replacement: Vec::new(),
            replacement_read: 0,
        }
    }
}

impl<Io: AsyncBufRead + Unpin> AsyncBufRead for HeaderFix<Io> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while let Some(raw) = this.raw.as_mut() {
            let chunk = ready!(Pin::new(&mut this.inner).poll_fill_buf(cx))?;
            if chunk.is_empty() {
                // Closed before a whole header: let the parser see what there is.
                this.replacement = this.raw.take().unwrap_or_default();
                break;
            }
            let taken = chunk.len();
            raw.extend_from_slice(chunk);
            Pin::new(&mut this.inner).consume(taken);
            if let Some(end) = stream_header_end(raw) {
                let mut replacement = rewrite_stream_header(&raw[..end]);
                replacement.extend_from_slice(&raw[end..]);
                this.replacement = replacement;
                this.raw = None;
            } else if raw.len() > MAX_HEADER {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server's stream header is too long",
                )));
            }
        }
        if this.replacement_read < this.replacement.len() {
            return Poll::Ready(Ok(&this.replacement[this.replacement_read..]));
        }
        Pin::new(&mut this.inner).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amount: usize) {
        let this = self.get_mut();
        let left = this.replacement.len() - this.replacement_read;
        if left > 0 {
            this.replacement_read += amount.min(left);
        } else {
            Pin::new(&mut this.inner).consume(amount);
        }
    }
}

impl<Io: AsyncBufRead + Unpin> AsyncRead for HeaderFix<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let amount = available.len().min(buf.remaining());
        buf.put_slice(&available[..amount]);
        self.consume(amount);
        Poll::Ready(Ok(()))
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for HeaderFix<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the server's stream start tag ends (just after its `>`), skipping an XML
/// declaration; `None` while it is incomplete.
fn stream_header_end(raw: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let open = at + raw[at..].iter().position(|&byte| byte == b'<')?;
        if raw.get(open + 1) == Some(&b'?') {
            let close = raw[open..].windows(2).position(|pair| pair == b"?>")?;
            at = open + close + 2;
            continue;
        }
        let mut quote = None;
        for (offset, &byte) in raw[open..].iter().enumerate() {
            match (quote, byte) {
                (None, b'\'' | b'"') => quote = Some(byte),
                (Some(open_quote), _) if byte == open_quote => quote = None,
                (None, b'>') => return Some(open + offset + 1),
                _ => {}
            }
        }
        return None;
    }
}

/// The server's stream header as the parser needs it.
fn rewrite_stream_header(header: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(header);
    let tag_start = text.rfind('<').unwrap_or(0);
    let (declaration, tag) = text.split_at(tag_start);
    let mut tag = tag.to_owned();
    if !tag.contains(" version=") {
        let end = tag.len() - 1;
        tag.insert_str(end, " version='1.0'");
    }
    format!("{declaration}{tag}").into_bytes()
}

/// Closes politely; a dead server must not hold up shutdown.
async fn close(mut stream: Stream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        <Stream as SinkExt<&Element>>::close(&mut stream),
    )
    .await;
}

/// Sets `from` to the component's domain where the stanza has none.
fn stamp_from(stanza: &mut Stanza, domain: &BareJid) {
    let from = match stanza {
        Stanza::Message(message) => &mut message.from,
        Stanza::Presence(presence) => &mut presence.from,
        Stanza::Iq(iq) => iq.from_mut(),
    };
    if from.is_none() {
        *from = Some(Jid::from(domain.clone()));
    }
}

fn is_ping_answer(stanza: &Stanza) -> bool {
    matches!(
        stanza,
        Stanza::Iq(Iq::Result { id, .. } | Iq::Error { id, .. }) if id.starts_with(PING_ID_PREFIX)
    )
}

#[cfg(test)]
mod tests {
    use tokio_xmpp::parsers::message::Message;
    use tokio_xmpp::parsers::presence::Presence;

    use super::*;

    fn domain() -> BareJid {
        BareJid::new("hub.localhost").unwrap()
    }

    #[test]
    fn stanzas_without_a_sender_get_the_component_domain() {
        let mut message: Stanza = Message::chat(Some(Jid::new("dev1@localhost").unwrap())).into();
        stamp_from(&mut message, &domain());
        let Stanza::Message(message) = message else {
            unreachable!("a message stays a message");
        };
        assert_eq!(message.from, Some(Jid::from(domain())));

        // An explicit sender within the domain is kept.
        let mut presence: Stanza = Presence::probe()
            .with_from(Jid::new("polyhub@hub.localhost").unwrap())
            .into();
        stamp_from(&mut presence, &domain());
        let Stanza::Presence(presence) = presence else {
            unreachable!("a presence stays a presence");
        };
        assert_eq!(
            presence.from,
            Some(Jid::new("polyhub@hub.localhost").unwrap())
        );
    }

    #[test]
    fn the_server_header_gets_a_version() {
        let prosody =
            b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
            xmlns='jabber:component:accept' id='a>b' from='hub.localhost'><handshake/>";
        let end = stream_header_end(prosody).expect("a complete header");
        assert_eq!(&prosody[end..], b"<handshake/>");
        let rewritten = String::from_utf8(rewrite_stream_header(&prosody[..end])).unwrap();
        assert_eq!(
            rewritten,
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
            xmlns='jabber:component:accept' id='a>b' from='hub.localhost' version='1.0'>"
        );
        // Incomplete: more bytes needed.
        assert_eq!(stream_header_end(&prosody[..30]), None);
        assert_eq!(stream_header_end(b"<?xml version='1.0'"), None);
        // A header that has a version keeps it.
        let versioned = b"<stream:stream xmlns='jabber:component:accept' version='1.0' id='x'>";
        let rewritten = rewrite_stream_header(versioned);
        assert_eq!(
            rewritten,
            b"<stream:stream xmlns='jabber:component:accept' version='1.0' id='x'>"
        );
    }

    #[tokio::test]
    async fn the_header_fix_passes_everything_after_the_header_through() {
        use tokio::io::AsyncReadExt;
        let (mut server, client) = tokio::io::duplex(1024);
        let mut fixed = HeaderFix::new(tokio::io::BufReader::new(client));
        tokio::io::AsyncWriteExt::write_all(
            &mut server,
            b"<stream:stream xmlns='jabber:component:accept' id='1'><handshake/><message/>",
        )
        .await
        .unwrap();
        drop(server);
        let mut read = String::new();
        fixed.read_to_string(&mut read).await.unwrap();
        assert_eq!(
            read,
            "<stream:stream xmlns='jabber:component:accept' id='1' version='1.0'><handshake/><message/>"
        );
    }

    #[test]
    fn stanzas_move_between_the_client_and_component_namespaces() {
        let mut message = Message::chat(Some(Jid::new("dev1@localhost").unwrap()))
            .with_body(Default::default(), "{\"id\":\"c1\"}".to_owned())
            .with_payload(tokio_xmpp::parsers::receipts::Request);
        message.id = Some(tokio_xmpp::parsers::message::Id("c1".to_owned()));
        let wire = to_wire(message.clone().into());
        assert!(wire.is("message", ns::COMPONENT));
        assert!(wire.has_child("body", ns::COMPONENT));
        assert!(wire.has_child("request", ns::RECEIPTS));
        assert_eq!(wire.attr("to"), Some("dev1@localhost"));
        assert_eq!(from_wire(wire).unwrap(), Stanza::Message(message));
        // Something that is no stanza is refused, not mistaken for one.
        assert!(from_wire(Element::bare("handshake", ns::COMPONENT)).is_err());
    }

    #[test]
    fn only_answers_to_our_pings_are_swallowed() {
        let pong: Stanza = Iq::empty_result(
            Jid::new("hub.localhost").unwrap(),
            format!("{PING_ID_PREFIX}3"),
        )
        .into();
        assert!(is_ping_answer(&pong));
        let other: Stanza = Iq::empty_result(Jid::new("hub.localhost").unwrap(), "cmd-1").into();
        assert!(!is_ping_answer(&other));
    }
}
