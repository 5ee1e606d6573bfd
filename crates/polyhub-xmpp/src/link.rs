//! [`Link`]: the hub's connection to the XMPP server, as an account or as a component, behind
//! one interface, so that every stanza is written and handled by the same code in
//! [`crate::client`] whichever way the hub is connected.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_xmpp::Stanza;
use tokio_xmpp::connect::{DnsConfig, StartTlsServerConnector, TcpServerConnector};
use tokio_xmpp::jid::Jid;
use tokio_xmpp::stanzastream::StreamEvent;
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StanzaToken};
use tokio_xmpp::xmlstream::Timeouts;

use crate::component::{ComponentLogin, ComponentStream};
use crate::settings::{Connection, Transport, XmppOptions};

/// What happens on a link.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A new session (first or after a reconnection, state lost) as this address.
    Connected(Jid),
    /// The session survived a connection break (XEP-0198 resumption; accounts only).
    Resumed,
    /// The connection broke; reconnection is under way.
    Lost,
    /// A stanza arrived.
    Stanza(Box<Stanza>),
}

/// Tells whether a stanza handed to [`Link::send`] was written to the server.
pub(crate) enum Written {
    Account(StanzaToken),
    Component(oneshot::Receiver<Result<(), String>>),
}

impl Written {
    /// Waits until the stanza is written (`Ok`) or given up (`Err` with the reason).
    pub(crate) async fn outcome(self) -> Result<(), String> {
        match self {
            Written::Account(mut token) => match token.wait_for(StanzaStage::Sent).await {
                Some(StanzaState::Sent { .. } | StanzaState::Acked { .. }) => Ok(()),
                Some(StanzaState::Failed { error }) => {
                    Err(format!("writing to the XMPP server failed: {error}"))
                }
                _ => Err("the XMPP stream dropped the message".to_owned()),
            },
            Written::Component(written) => match written.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_) => Err("the XMPP component connection dropped the message".to_owned()),
            },
        }
    }
}

/// The connection, which reconnects by itself until closed.
#[derive(Debug)]
pub(crate) enum Link {
    Account(StanzaStream),
    Component(ComponentStream),
}

impl Link {
    /// Starts connecting in the background; `queue_depth` bounds the stanzas in flight each
    /// way.
    pub(crate) fn open(options: &XmppOptions, queue_depth: usize) -> Link {
        // Loopback peers answer at once; tight timeouts notice a dead server in well under a
        // minute instead of the default ten.
        let timeouts = Timeouts::tight();
        match &options.connection {
            Connection::Account {
                jid,
                password,
                endpoint,
            } => {
                let jid = Jid::from(jid.clone());
                let dns = DnsConfig::addr(&endpoint.server);
                Link::Account(match endpoint.transport {
                    Transport::Plaintext => StanzaStream::new_c2s(
                        TcpServerConnector::from(dns),
                        jid,
                        password.clone(),
                        timeouts,
                        queue_depth,
                    ),
                    Transport::StartTls => StanzaStream::new_c2s(
                        StartTlsServerConnector::from(dns),
                        jid,
                        password.clone(),
                        timeouts,
                        queue_depth,
                    ),
                })
            }
            Connection::Component {
                domain,
                secret,
                server,
            } => {
                // The devices' server answers pings for its own domain.
                let ping_to =
                    Jid::new(&options.device_domain).unwrap_or_else(|_| Jid::from(domain.clone()));
                Link::Component(ComponentStream::start(
                    ComponentLogin {
                        domain: domain.clone(),
                        secret: secret.clone(),
                        server: server.clone(),
                        ping_to,
                    },
                    queue_depth,
                ))
            }
        }
    }

    /// Queues a stanza for writing.
    pub(crate) async fn send(&self, stanza: Box<Stanza>) -> Written {
        match self {
            Link::Account(stream) => Written::Account(stream.send(stanza).await),
            Link::Component(stream) => Written::Component(stream.send(stanza).await),
        }
    }

    /// The next event; `None` once the link has stopped for good.
    pub(crate) async fn next(&mut self) -> Option<LinkEvent> {
        match self {
            Link::Account(stream) => stream.next().await.map(|event| match event {
                Event::Stream(StreamEvent::Reset { bound_jid, .. }) => {
                    LinkEvent::Connected(bound_jid)
                }
                Event::Stream(StreamEvent::Resumed) => LinkEvent::Resumed,
                Event::Stream(StreamEvent::Suspended) => LinkEvent::Lost,
                Event::Stanza(stanza) => LinkEvent::Stanza(Box::new(stanza)),
            }),
            Link::Component(stream) => stream.next().await,
        }
    }

    /// Closes politely (stream footer), within `patience`: a dead server must not hold up
    /// shutdown.
    pub(crate) async fn close(self, patience: Duration) {
        let closing = async {
            match self {
                Link::Account(stream) => stream.close().await,
                Link::Component(stream) => stream.close().await,
            }
        };
        let _ = tokio::time::timeout(patience, closing).await;
    }
}
