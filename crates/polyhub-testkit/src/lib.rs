//! polyhub's test kit: the support code that several crates' tests share, in one place.
//!
//! This crate is test support. It is only ever a `[dev-dependencies]` entry (`publish =
//! false`); no shipped crate may depend on it. It panics freely on setup failures, because a
//! test that cannot set up should fail loudly.
//!
//! Each part sits behind a feature, so a crate's tests compile only what they use:
//!
//! - [`store`] (feature `store`): [`store::MemoryStore`], an in-memory `Store` with the
//!   trait's documented semantics and two ways to inject failures (the whole store down, or
//!   `write_batch` misbehaving for one hub).
//! - [`brokers`] (feature `brokers`): [`brokers::PolyhubBroker`] (polyhub's broker in process)
//!   and [`brokers::Mosquitto`] (a Mosquitto process) on free loopback ports, both restartable
//!   on the same port through [`brokers::TestBroker`]; [`pki::Pki`], a throw-away CA with
//!   server and client certificates for TLS tests.
//! - [`process`] (feature `process`): [`process::PolyhubProcess`], the `polyhub` binary as a
//!   child process with a clean environment, its standard error read line by line, every wait
//!   bounded.
//!
//! [`free_port`] needs no feature.

#[cfg(feature = "brokers")]
pub mod brokers;
#[cfg(feature = "brokers")]
pub mod pki;
#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "store")]
pub mod store;

/// A loopback port that was free a moment ago, for a process that cannot report the port it
/// bound (Mosquitto, a second listener). Prefer binding 127.0.0.1:0 where the bound address
/// can be read back.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
