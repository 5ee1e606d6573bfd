//! Test harness: the test kit's brokers (Mosquitto and polyhub's, on free loopback ports) and
//! PKI, the client options the tests use, and bounded waits on client events.
//!
//! Every wait is bounded: event waits give up after [`WAIT`], and tests wrap themselves in
//! [`bounded`].

#![allow(dead_code, unreachable_pub, unused_macros, unused_imports)]

pub mod scenarios;

use std::future::Future;
use std::time::Duration;

use polyhub_client::{AckToken, ClientOptions, Event, Events, ProtocolVersion, Publish};
use polyhub_testkit::brokers::TestBroker as KitBroker;

pub use polyhub_testkit::brokers::{Mosquitto, MosquittoTls, PolyhubBroker, free_port};
pub use polyhub_testkit::pki::Pki;

/// How long to wait for an expected event.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long to wait to be confident that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(500);

/// Run a test body with an overall time limit.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(90), body)
        .await
        .expect("test took longer than 90 s");
}

/// One test per scenario of [`scenarios`] and protocol version, each with a fresh broker from
/// `super::start_broker()` of the including test file.
macro_rules! scenario_tests {
    ($($scenario:ident),* $(,)?) => {
        scenario_tests!(@version v31, V31, $($scenario),*);
        scenario_tests!(@version v311, V311, $($scenario),*);
        scenario_tests!(@version v5, V5, $($scenario),*);
    };
    (@version $module:ident, $version:ident, $($scenario:ident),*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::common::bounded(async {
                        let mut broker = super::start_broker().await;
                        super::common::scenarios::$scenario(
                            &mut broker,
                            polyhub_client::ProtocolVersion::$version,
                        )
                        .await;
                    })
                    .await;
                }
            )*
        }
    };
}

/// A broker the scenarios can run against (the kit's [`KitBroker`]), with the options of a
/// test client.
pub trait TestBroker: KitBroker {
    /// Test client options: fast reconnects, bounded connect.
    fn options(&self, client_id: &str, version: ProtocolVersion) -> ClientOptions {
        ClientOptions::new(client_id, "127.0.0.1", self.port())
            .protocol(version)
            .keep_alive(Duration::from_secs(10))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .connect_timeout(Duration::from_secs(5))
    }
}

impl<B: KitBroker> TestBroker for B {}

// --- waiting on events --------------------------------------------------------------------

/// The next event, within [`WAIT`].
pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for an event")
        .expect("the client stopped")
}

/// Wait for `Connected`, skipping failed attempts and disconnections; returns session present.
pub async fn connected(events: &mut Events) -> bool {
    loop {
        match next_event(events).await {
            Event::Connected {
                session_present, ..
            } => return session_present,
            Event::ConnectFailed { .. } | Event::Disconnected { .. } => {}
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

/// Wait for `Disconnected`, skipping messages and `Connected`.
pub async fn disconnected(events: &mut Events) -> polyhub_client::DisconnectReason {
    loop {
        match next_event(events).await {
            Event::Disconnected { reason } => return reason,
            Event::Message(_) | Event::Connected { .. } => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
}

/// The next message, skipping connection events.
pub async fn next_message(events: &mut Events) -> Publish {
    loop {
        match next_event(events).await {
            Event::Message(message) => return message,
            Event::Connected { .. } | Event::ConnectFailed { .. } | Event::Disconnected { .. } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Assert that no message arrives within [`QUIET`].
pub async fn no_message(events: &mut Events) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return,
            Ok(Some(Event::Message(message))) => panic!("unexpected message {message:?}"),
            Ok(Some(_)) => {}
            Ok(None) => return,
        }
    }
}

/// The next message with its acknowledgement token (manual acknowledgements), skipping
/// connection events.
pub async fn next_message_with_ack(events: &mut Events) -> (Publish, Option<AckToken>) {
    loop {
        let (event, token) = tokio::time::timeout(WAIT, events.recv_with_ack())
            .await
            .expect("timed out waiting for a message")
            .expect("the client stopped");
        match event {
            Event::Message(message) => return (message, token),
            Event::Connected { .. } | Event::ConnectFailed { .. } | Event::Disconnected { .. } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}
