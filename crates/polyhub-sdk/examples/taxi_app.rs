//! The taxi app of sgframework's tutorial: `taxiapp` listens to `data/taxisignservice/state`
//! and, after four seconds, turns the sign on. It drives its own loop (sgframework's
//! `start()` + `loop()`), unlike the taxi sign, which runs on a background task.
//!
//! ```text
//! cargo run -p polyhub-sdk --example taxi_app -- 127.0.0.1 1883
//! ```

use std::time::Duration;

use polyhub_sdk::{App, Framework, MessageType};

fn on_state_data(
    _app: &Framework,
    _kind: MessageType,
    _service: &str,
    _signal: &str,
    payload: &str,
) {
    if payload == "True" {
        println!("The taxi sign is now on.");
    } else {
        println!("The taxi sign is now off.");
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

    let app = App::new("taxiapp", &host, port);
    app.register_incoming_data("taxisignservice", "state", false, on_state_data)?;
    let mut runner = app.event_loop()?;
    let start = tokio::time::Instant::now();
    let mut command_sent = false;
    loop {
        tokio::select! {
            _ = runner.poll_timeout(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if start.elapsed() > Duration::from_secs(4) && !command_sent {
            println!("Turning on the taxi sign from the app...");
            app.send_command("taxisignservice", "state", "True", false)?;
            command_sent = true;
        }
    }
    runner.stop().await?;
    Ok(())
}
