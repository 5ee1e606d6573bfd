//! MQTT brokers for client and SDK tests, each on a free loopback port and restartable on it.
//!
//! - [`PolyhubBroker`]: polyhub's broker in this process (no `$SYS` messages).
//! - [`Mosquitto`]: an independent broker, `/usr/sbin/mosquitto` with its own configuration
//!   and log in a temporary directory; killed when dropped.
//!
//! Both implement [`TestBroker`], so one scenario runs against either. Every wait here is
//! bounded by [`START_TIMEOUT`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use polyhub_broker::{Broker, BrokerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use crate::free_port;
use crate::pki::Pki;

/// How long a broker may take to listen, or to shut down.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker a test scenario can run against.
pub trait TestBroker {
    /// Where it listens (always on 127.0.0.1).
    fn addr(&self) -> SocketAddr;

    /// Its port on 127.0.0.1.
    fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Stops it abruptly (every session and retained message lost) and starts it again on the
    /// same port.
    fn restart(&mut self) -> impl Future<Output = ()>;

    /// polyhub's in-process broker, for tests that attach in-process clients; `None` for an
    /// external broker.
    fn in_process(&self) -> Option<&Broker> {
        None
    }
}

/// Waits until something accepts TCP connections on the loopback `port`; panics after
/// [`START_TIMEOUT`].
pub async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- polyhub's broker ---------------------------------------------------------------------

/// polyhub's broker, in process, on a free loopback port. Must be created inside a tokio
/// runtime; its accept loop is aborted when dropped.
#[derive(Debug)]
pub struct PolyhubBroker {
    broker: Broker,
    addr: SocketAddr,
    serve: Option<JoinHandle<()>>,
}

impl PolyhubBroker {
    /// Binds 127.0.0.1:0 and serves.
    pub async fn start() -> PolyhubBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (broker, serve) = serve(listener);
        PolyhubBroker {
            broker,
            addr,
            serve: Some(serve),
        }
    }

    /// The broker handle, for in-process clients.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Shuts the broker down and waits for its accept loop, both bounded.
    pub async fn stop(&mut self) {
        tokio::time::timeout(START_TIMEOUT, self.broker.shutdown())
            .await
            .expect("broker shutdown finishes");
        if let Some(serve) = self.serve.take() {
            let _ = tokio::time::timeout(START_TIMEOUT, serve).await;
        }
    }
}

/// A fresh broker serving `listener` until shut down.
fn serve(listener: TcpListener) -> (Broker, JoinHandle<()>) {
    let broker = Broker::new(BrokerConfig {
        // Tests count messages; periodic `$SYS` traffic would only add noise.
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

impl TestBroker for PolyhubBroker {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind the same port");
        let (broker, serve) = serve(listener);
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

// --- Mosquitto ----------------------------------------------------------------------------

/// Where the tests expect Mosquitto (Debian's package).
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A Mosquitto process with its own configuration directory; killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    dir: tempfile::TempDir,
}

/// TLS settings of a Mosquitto listener: the server certificate of `pki`.
#[derive(Debug, Clone, Copy)]
pub struct MosquittoTls<'a> {
    /// Where the CA, server certificate and key come from.
    pub pki: &'a Pki,
    /// Whether clients must present a certificate signed by the CA.
    pub require_certificate: bool,
}

impl Mosquitto {
    /// A plain listener on a free port.
    pub async fn start() -> Mosquitto {
        Mosquitto::start_with("", None).await
    }

    /// A TLS listener on a free port.
    pub async fn start_tls(tls: MosquittoTls<'_>) -> Mosquitto {
        Mosquitto::start_with("", Some(tls)).await
    }

    /// A listener on a free port, TLS when `tls` is given, with `extra` configuration lines
    /// (further listeners, say) appended.
    pub async fn start_with(extra: &str, tls: Option<MosquittoTls<'_>>) -> Mosquitto {
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
        // Started as root, Mosquitto switches to its own user, which may not open files in
        // our root-owned temporary directory (its log): stay root.
        if is_root() {
            conf.push_str("user root\n");
        }
        conf.push_str(extra);
        conf.push('\n');
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
        let child = Command::new(MOSQUITTO)
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

    /// Kills the process (SIGKILL: no goodbye to anyone).
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

    /// The process id, for signals; panics once killed.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("mosquitto is running")
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
