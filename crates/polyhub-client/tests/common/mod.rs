//! Test harness: Mosquitto and polyhub brokers on free loopback ports, a test PKI made with
//! rcgen, and bounded waits on client events.
//!
//! Every wait is bounded: event waits give up after [`WAIT`], and tests wrap themselves in
//! [`bounded`].

#![allow(dead_code, unreachable_pub, unused_macros)]

pub mod scenarios;

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use polyhub_broker::{Broker, BrokerConfig};
use polyhub_client::{AckToken, ClientOptions, Event, Events, ProtocolVersion, Publish};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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

/// A broker the scenarios can run against.
pub trait TestBroker {
    /// Where it listens.
    fn addr(&self) -> SocketAddr;

    /// Kill it (abruptly, losing every session) and start it again on the same port.
    fn restart(&mut self) -> impl Future<Output = ()>;

    /// Test client options: fast reconnects, bounded connect.
    fn options(&self, client_id: &str, version: ProtocolVersion) -> ClientOptions {
        ClientOptions::new(client_id, "127.0.0.1", self.addr().port())
            .protocol(version)
            .keep_alive(Duration::from_secs(10))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .connect_timeout(Duration::from_secs(5))
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

// --- Mosquitto ----------------------------------------------------------------------------

/// A Mosquitto process with its own configuration directory; killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    dir: tempfile::TempDir,
}

/// TLS settings of a Mosquitto listener.
pub struct MosquittoTls<'a> {
    pub pki: &'a Pki,
    pub require_certificate: bool,
}

impl Mosquitto {
    /// A plain listener on a free port.
    pub async fn start() -> Mosquitto {
        Mosquitto::start_with(None).await
    }

    /// A TLS listener on a free port.
    pub async fn start_tls(tls: MosquittoTls<'_>) -> Mosquitto {
        Mosquitto::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<MosquittoTls<'_>>) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest file {}\nlog_type all\nmax_keepalive 65535\n",
            dir.path().join("mosquitto.log").display()
        );
        if let Some(tls) = tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.pki.ca_file.display(),
                tls.pki.server_cert_file.display(),
                tls.pki.server_key_file.display(),
                tls.require_certificate,
            ));
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let mut mosquitto = Mosquitto {
            child: None,
            port,
            conf: conf_path,
            dir,
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

    /// Kill the process (SIGKILL: no goodbye to anyone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The broker's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("mosquitto is running")
    }
}

impl TestBroker for Mosquitto {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
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

/// Wait until something accepts TCP connections on the port.
async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- polyhub's broker ---------------------------------------------------------------------

/// polyhub's broker, in process, on a free port.
pub struct PolyhubBroker {
    broker: Broker,
    addr: SocketAddr,
    serve: Option<JoinHandle<()>>,
}

impl PolyhubBroker {
    pub async fn start() -> PolyhubBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (broker, serve) = PolyhubBroker::serve(listener);
        PolyhubBroker {
            broker,
            addr,
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

    async fn stop(&mut self) {
        tokio::time::timeout(WAIT, self.broker.shutdown())
            .await
            .expect("broker shutdown finishes");
        if let Some(serve) = self.serve.take() {
            let _ = tokio::time::timeout(WAIT, serve).await;
        }
    }
}

impl TestBroker for PolyhubBroker {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind the same port");
        let (broker, serve) = PolyhubBroker::serve(listener);
        self.broker = broker;
        self.serve = Some(serve);
    }
}

impl Drop for PolyhubBroker {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }
}

// --- PKI ----------------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };

        let dir = tempfile::tempdir().expect("temporary directory");
        let write = |name: &str, contents: String| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).expect("write PEM file");
            path
        };

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "polyhub test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.use_authority_key_identifier_extension = true;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::new()).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "polyhub-test-client");
        client_params.use_authority_key_identifier_extension = true;
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("client certificate");

        let ca_file = write("ca.pem", ca_cert.pem());
        let server_cert_file = write("server.pem", server_cert.pem());
        let server_key_file = write("server-key.pem", server_key.serialize_pem());
        let client_cert_file = write("client.pem", client_cert.pem());
        let client_key_file = write("client-key.pem", client_key.serialize_pem());
        Pki {
            dir,
            ca_file,
            server_cert_file,
            server_key_file,
            client_cert_file,
            client_key_file,
        }
    }

    /// A directory laid out as sgframework expects (CA, client certificate and key).
    pub fn certificate_directory(&self, into: &Path) {
        std::fs::copy(&self.ca_file, into.join("ca_public_certificate.pem")).expect("copy");
        std::fs::copy(&self.client_cert_file, into.join("public_certificate.pem")).expect("copy");
        std::fs::copy(&self.client_key_file, into.join("private_key.pem")).expect("copy");
    }
}

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
