//! Device accounts by XEP-0077 in-band registration.
//!
//! Registration happens before authentication, so it needs its own short-lived stream (the
//! hub's logged-in session cannot register a different account): connect, optionally
//! STARTTLS, ask for `<device>@<domain>` with a fresh random password, read the answer, close.
//! It does not need the hub to be logged in, so a component can register devices too, given
//! the server's client-to-server listener ([`ClientEndpoint`]).

use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use polyhub_polyglot::backend::{BackendError, Credentials};
use tokio::io::{AsyncBufRead, AsyncWrite, BufStream};
use tokio::net::TcpStream;
use tokio_xmpp::Stanza;
use tokio_xmpp::connect::starttls::starttls;
use tokio_xmpp::jid::BareJid;
use tokio_xmpp::parsers::ibr::LegacyQuery;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::stanza_error::DefinedCondition;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmlStream, XmppStreamElement,
    initiate_stream,
};

use crate::settings::{ClientEndpoint, Transport};

const REGISTER_IQ_ID: &str = "polyhub-register";
/// Random bytes in a generated password (hex-encoded: twice as many characters).
const PASSWORD_BYTES: usize = 18;

/// Creates the account `jid` on the server at `endpoint` with a random password, within
/// `timeout`.
pub(crate) async fn register(
    endpoint: &ClientEndpoint,
    timeout: Duration,
    jid: &BareJid,
) -> Result<Credentials, BackendError> {
    let Some(username) = jid.node().map(|node| node.as_str().to_owned()) else {
        return Err(BackendError::Rejected(format!(
            "{jid} has no local part to register"
        )));
    };
    let password = random_password()?;
    let query = LegacyQuery {
        username: Some(username),
        password: Some(password.clone()),
        ..LegacyQuery::default()
    };
    let domain = jid.domain().as_str();
    tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(&endpoint.server)
            .await
            .map_err(|error| unavailable("connecting to the XMPP server", error))?;
        let tcp = BufStream::new(tcp);
        match endpoint.transport {
            Transport::Plaintext => request_registration(open(tcp, domain).await?, query).await,
            Transport::StartTls => {
                let plain = open(tcp, domain).await?;
                let (tls, _binding) = starttls(plain, domain)
                    .await
                    .map_err(|error| unavailable("STARTTLS", error))?;
                request_registration(open(BufStream::new(tls), domain).await?, query).await
            }
        }
    })
    .await
    .map_err(|_| {
        BackendError::Unavailable(format!("registering {jid} took longer than {timeout:?}"))
    })??;
    Ok(Credentials {
        username: jid.to_string(),
        password,
    })
}

type Stream<Io> = XmlStream<Io, FallibleStreamElement>;

async fn open<Io: AsyncBufRead + AsyncWrite + Unpin>(
    io: Io,
    domain: &str,
) -> Result<Stream<Io>, BackendError> {
    let header = StreamHeader {
        from: None,
        to: Some(Cow::Borrowed(domain)),
        id: None,
    };
    let pending = initiate_stream(io, ns::JABBER_CLIENT, header, Timeouts::tight())
        .await
        .map_err(|error| unavailable("opening the XMPP stream", error))?;
    let (_features, stream) = pending
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|error| unavailable("reading the stream features", error))?;
    Ok(stream)
}

async fn request_registration<Io: AsyncBufRead + AsyncWrite + Unpin>(
    mut stream: Stream<Io>,
    query: LegacyQuery,
) -> Result<(), BackendError> {
    let request = XmppStreamElement::Stanza(Iq::from_set(REGISTER_IQ_ID, query).into());
    stream
        .send(&request)
        .await
        .map_err(|error| unavailable("sending the registration", error))?;
    let outcome = loop {
        let element = match stream.next().await {
            Some(Ok(element)) => element.into_read_error(),
            Some(Err(error)) => Err(error),
            None => Err(ReadError::StreamFooterReceived),
        };
        match element {
            Ok(XmppStreamElement::Stanza(Stanza::Iq(Iq::Result { id, .. })))
                if id == REGISTER_IQ_ID =>
            {
                break Ok(());
            }
            Ok(XmppStreamElement::Stanza(Stanza::Iq(Iq::Error { id, error, .. })))
                if id == REGISTER_IQ_ID =>
            {
                break Err(match error.defined_condition {
                    DefinedCondition::Conflict => {
                        BackendError::Rejected("the XMPP account already exists".to_owned())
                    }
                    DefinedCondition::NotAllowed
                    | DefinedCondition::Forbidden
                    | DefinedCondition::ServiceUnavailable
                    | DefinedCondition::FeatureNotImplemented => {
                        BackendError::Unsupported(format!(
                            "the XMPP server refuses in-band registration ({:?})",
                            error.defined_condition
                        ))
                    }
                    other => BackendError::Rejected(format!(
                        "the XMPP server refused the registration ({other:?})"
                    )),
                });
            }
            Ok(_) | Err(ReadError::SoftTimeout) | Err(ReadError::ParseError(_)) => continue,
            Err(ReadError::HardError(error)) => {
                break Err(unavailable("reading the registration answer", error));
            }
            Err(ReadError::StreamFooterReceived) => {
                break Err(BackendError::Unavailable(
                    "the XMPP server closed the stream during registration".to_owned(),
                ));
            }
        }
    };
    // Best effort: the answer is what matters, not a clean goodbye.
    let _ = <Stream<Io> as SinkExt<&XmppStreamElement>>::close(&mut stream).await;
    outcome
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("{what}: {error}"))
}

/// A password from the operating system's random source.
fn random_password() -> Result<String, BackendError> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut source| source.read_exact(&mut bytes))
        .map_err(|error| {
            BackendError::Unsupported(format!("no random source for a password: {error}"))
        })?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_and_distinct() {
        let first = random_password().unwrap();
        let second = random_password().unwrap();
        assert_eq!(first.len(), PASSWORD_BYTES * 2);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(first, second);
    }
}
