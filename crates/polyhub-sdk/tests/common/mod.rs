//! Test harness: the test kit's brokers on free loopback ports (Mosquitto started with extra
//! configuration lines), an observer client that records every message, and bounded waits.

#![allow(dead_code, unreachable_pub, unused_macros, unused_imports)]

pub mod scenarios;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use polyhub_client::{Client, ClientOptions, Event, ProtocolVersion, QoS};

pub use polyhub_testkit::brokers::{PolyhubBroker, TestBroker, free_port};

/// How long to wait for something expected.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long to wait to be confident that nothing (more) arrives.
pub const QUIET: Duration = Duration::from_millis(400);

/// Run a test body with an overall time limit.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test took longer than 60 s");
}

/// One test per scenario, each with a fresh broker from `crate::start_broker()`.
macro_rules! scenario_tests {
    ($($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                crate::common::bounded(async {
                    let mut broker = crate::start_broker().await;
                    crate::common::scenarios::$scenario(&mut broker).await;
                })
                .await;
            }
        )*
    };
}
pub(crate) use scenario_tests;

/// A Mosquitto process on a free port ([`polyhub_testkit::brokers::Mosquitto`]) whose `start`
/// takes extra configuration lines, as the SDK's tests want.
pub struct Mosquitto(polyhub_testkit::brokers::Mosquitto);

impl Mosquitto {
    /// A plain listener on a free port, plus `extra` configuration lines.
    pub async fn start(extra: &str) -> Mosquitto {
        Mosquitto(polyhub_testkit::brokers::Mosquitto::start_with(extra, None).await)
    }
}

impl TestBroker for Mosquitto {
    fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    async fn restart(&mut self) {
        self.0.restart().await;
    }
}

/// One message as an observer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
}

/// A plain MQTT client subscribed to a filter, recording everything.
pub struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    client: Client,
}

/// Options of a test client: fast reconnects.
pub fn options(client_id: &str, port: u16) -> ClientOptions {
    ClientOptions::new(client_id, "127.0.0.1", port)
        .protocol(ProtocolVersion::V311)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(5))
}

impl Observer {
    pub async fn start(port: u16, filter: &str) -> Observer {
        let id = format!("observer-{}", free_port());
        let (client, mut events) = Client::connect(options(&id, port))
            .await
            .expect("observer connects");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Message(message) = event {
                    recorder.lock().push(Seen {
                        topic: message.topic.clone(),
                        payload: String::from_utf8_lossy(&message.payload).into_owned(),
                        retain: message.retain,
                    });
                }
            }
        });
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("observer subscribes");
        Observer { seen, client }
    }

    /// Wait until `topic` carried `payload`.
    pub async fn wait_for(&self, topic: &str, payload: &str) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(seen) = self
                .seen
                .lock()
                .iter()
                .find(|seen| seen.topic == topic && seen.payload == payload)
            {
                return seen.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{topic} = {payload:?} never arrived; seen: {:#?}",
                self.seen.lock()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every payload seen on `topic`, in order.
    pub fn payloads(&self, topic: &str) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter(|seen| seen.topic == topic)
            .map(|seen| seen.payload.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The retained messages under `filter` now: a fresh subscription's retained deliveries.
pub async fn retained(port: u16, filter: &str) -> BTreeMap<String, String> {
    let observer = Observer::start(port, filter).await;
    tokio::time::sleep(QUIET).await;
    observer
        .all()
        .into_iter()
        .filter(|seen| seen.retain)
        .map(|seen| (seen.topic, seen.payload))
        .collect()
}

/// Wait until the retained message on `topic` is `payload`.
pub async fn wait_retained(port: u16, topic: &str, payload: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let store = retained(port, topic).await;
        if store.get(topic).map(String::as_str) == Some(payload) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retained {topic} is {:?}, not {payload:?}",
            store.get(topic)
        );
    }
}
