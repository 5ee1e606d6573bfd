//! The taxi sign resource of sgframework's tutorial: `taxisignservice` accepts the command
//! `state` (`True`/`False`), "turns the sign" and echoes the new state, retained, on
//! `data/taxisignservice/state` (default `False`, re-sent on every reconnect).
//!
//! ```text
//! polyhub run --mqtt-listen 127.0.0.1:1883 &
//! cargo run -p polyhub-sdk --example taxi_sign -- 127.0.0.1 1883
//! ```
//!
//! Ctrl-C stops it cleanly (presence `False`); killing it makes the broker publish the will.

use polyhub_sdk::{CommandOptions, Framework, MessageType, Resource};

fn on_state_command(
    _sign: &Framework,
    _kind: MessageType,
    _service: &str,
    _signal: &str,
    payload: &str,
) -> &'static str {
    if payload == "True" {
        println!("Turning on my taxi sign.");
        "True"
    } else {
        println!("Turning off my taxi sign.");
        "False"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let host = args.next().unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = args
        .next()
        .map(|port| port.parse())
        .transpose()?
        .unwrap_or(1883);

    let resource = Resource::new("taxisignservice", &host, port);
    resource.register_incoming_command(
        "state",
        CommandOptions::new()
            .default_value("False")
            .echo_as_retained(true),
        on_state_command,
    )?;
    resource.on_broker_connectionstatus(|_, connected| {
        println!("Broker connected: {connected}");
    });
    println!("{resource}");
    let task = resource.start()?;
    tokio::signal::ctrl_c().await?;
    resource.stop().await?;
    task.join().await;
    Ok(())
}
