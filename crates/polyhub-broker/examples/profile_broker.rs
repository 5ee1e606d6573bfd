//! A bare broker for profiling: the benchmark's limits (no queue or inflight bound), one
//! current-thread runtime like `polyhub run` on one CPU, no hub platform around it.
//!
//! `cargo run --release -p polyhub-broker --example profile_broker -- 127.0.0.1:1883` serves
//! until stdin closes (or the process is killed); callgrind and `perf stat` then see only the
//! broker's own work.

use std::net::SocketAddr;

use polyhub_broker::{Broker, BrokerConfig};
use std::io::Read;

use tokio::net::TcpListener;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".to_owned())
        .parse()?;
    let config = BrokerConfig {
        max_queued_messages: 0,
        max_inflight: 0,
        max_connections: 1_000_000,
        ..BrokerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(address).await?;
        println!("MQTT listening on {}", listener.local_addr()?);
        let broker = Broker::new(config);
        // Stdin closing is the stop signal (no signal handling to install), watched by a
        // plain thread so the runtime keeps its single thread to itself.
        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
        let stop = async {
            let _ = stdin_closed.await;
        };
        broker.serve(listener, stop).await?;
        broker.shutdown().await;
        Ok(())
    })
}
