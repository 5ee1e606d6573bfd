//! Test harness: Mosquitto and polyhub's broker on free loopback ports, an observer client
//! that records every message, and bounded waits.

#![allow(dead_code, unreachable_pub, unused_macros, unused_imports)]

pub mod scenarios;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use polyhub_broker::{Broker, BrokerConfig};
use polyhub_client::{Client, ClientOptions, Event, ProtocolVersion, QoS};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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

/// A broker the scenarios run against.
pub trait TestBroker {
    /// Its loopback port.
    fn port(&self) -> u16;
    /// Kill it (losing sessions and retained messages) and start it again on the same port.
    fn restart(&mut self) -> impl Future<Output = ()>;
    /// polyhub's in-process broker, for in-process clients.
    fn in_process(&self) -> Option<&Broker> {
        None
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Mosquitto process with its own configuration; killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// A plain listener on a free port, plus `extra` configuration lines.
    pub async fn start(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
        );
        if is_root() {
            conf.push_str("user root\n");
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let mut mosquitto = Mosquitto {
            child: None,
            port,
            conf: conf_path,
            _dir: dir,
        };
        mosquitto.spawn().await;
        mosquitto
    }

    async fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_for_port(self.port).await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl TestBroker for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }

    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// polyhub's broker, in process, on a free port.
pub struct PolyhubBroker {
    broker: Broker,
    port: u16,
    serve: Option<JoinHandle<()>>,
}

impl PolyhubBroker {
    pub async fn start() -> PolyhubBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let (broker, serve) = PolyhubBroker::serve(listener);
        PolyhubBroker {
            broker,
            port,
            serve: Some(serve),
        }
    }

    fn serve(listener: TcpListener) -> (Broker, JoinHandle<()>) {
        let broker = Broker::new(BrokerConfig {
            sys_interval: 0,
            ..BrokerConfig::default()
        });
        let serving = broker.clone();
        let serve = tokio::spawn(async move {
            serving
                .serve(listener, std::future::pending::<()>())
                .await
                .expect("broker serves");
        });
        (broker, serve)
    }
}

impl TestBroker for PolyhubBroker {
    fn port(&self) -> u16 {
        self.port
    }

    async fn restart(&mut self) {
        tokio::time::timeout(WAIT, self.broker.shutdown())
            .await
            .expect("broker shutdown finishes");
        if let Some(serve) = self.serve.take() {
            let _ = tokio::time::timeout(WAIT, serve).await;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the same port");
        let (broker, serve) = PolyhubBroker::serve(listener);
        self.broker = broker;
        self.serve = Some(serve);
    }

    fn in_process(&self) -> Option<&Broker> {
        Some(&self.broker)
    }
}

impl Drop for PolyhubBroker {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
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
