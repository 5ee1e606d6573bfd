//! A scriptable Rust resource or app for the sgframework interop tests
//! (`tests/sgframework/`): it registers a fixed set of signals, prints what its callbacks
//! receive on stdout, and obeys commands read from stdin.
//!
//! ```text
//! sgframework_peer resource HOST PORT    # resource "rustsign"
//! sgframework_peer app HOST PORT         # app "rustapp", listening to resource "pysign"
//! sgframework_peer servicemanager HOST PORT
//! ```
//!
//! stdout lines: `READY` once connected and subscribed, `CALL <messagetype> <service>
//! <signal> <payload>` per callback, `STATUS <True|False>` per connection change.
//! stdin lines: `data <signal> <value>`, `command <service> <signal> <value> [retained]`,
//! `stop` (clean exit), `exit` (no goodbye: the process ends, the broker publishes the will).

use std::io::Write;
use std::time::Duration;

use polyhub_sdk::{App, CommandOptions, Framework, MessageType, Resource, ServiceManager};
use tokio::io::{AsyncBufReadExt, BufReader};

fn print_line(line: String) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn polyhub_client_options(host: &str, port: u16) -> polyhub_sdk::ClientOptions {
    polyhub_sdk::ClientOptions::new(format!("servicemanager-{}", std::process::id()), host, port)
        .protocol(polyhub_sdk::ProtocolVersion::V31)
}

fn record(_: &Framework, kind: MessageType, service: &str, signal: &str, payload: &str) {
    print_line(format!("CALL {kind} {service} {signal} {payload}"));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, host, port] = args.as_slice() else {
        return Err("usage: sgframework_peer resource|app|servicemanager HOST PORT".into());
    };
    let port: u16 = port.parse()?;
    if mode == "servicemanager" {
        // Runs until killed; prints READY once its subscriptions are likely in place.
        let options = polyhub_client_options(host, port);
        let manager = tokio::spawn(ServiceManager::new().run(options));
        tokio::time::sleep(Duration::from_millis(500)).await;
        print_line("READY".to_owned());
        manager.await??;
        return Ok(());
    }
    let framework: Framework = match mode.as_str() {
        "resource" => {
            let sign = Resource::new("rustsign", host, port);
            sign.register_incoming_command(
                "state",
                CommandOptions::new()
                    .default_value("False")
                    .echo_as_retained(true),
                record,
            )?;
            sign.register_incoming_command(
                "upper",
                CommandOptions::new(),
                |framework: &Framework,
                 kind: MessageType,
                 service: &str,
                 signal: &str,
                 payload: &str| {
                    record(framework, kind, service, signal, payload);
                    payload.to_uppercase()
                },
            )?;
            sign.register_incoming_command(
                "mode",
                CommandOptions::new().on_change_only(true),
                record,
            )?;
            sign.register_incoming_command("silent", CommandOptions::new().echo(false), record)?;
            sign.register_outgoing_data("speed", Some("0"), false)?;
            sign.register_outgoing_data("odometer", None, true)?;
            (*sign).clone()
        }
        "app" => {
            let app = App::new("rustapp", host, port);
            app.register_incoming_data("pysign", "state", false, record)?;
            app.register_incoming_data("pysign", "upper", false, record)?;
            app.register_incoming_data("pysign", "speed", true, record)?;
            app.register_incoming_availability(
                MessageType::ResourceAvailable,
                "pysign",
                "x",
                record,
            )?;
            app.register_incoming_availability(
                MessageType::CommandAvailable,
                "pysign",
                "state",
                record,
            )?;
            app.register_incoming_availability(
                MessageType::DataAvailable,
                "pysign",
                "speed",
                record,
            )?;
            (*app).clone()
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    framework.on_broker_connectionstatus(|_, connected| {
        print_line(format!(
            "STATUS {}",
            if connected { "True" } else { "False" }
        ));
    });
    let task = framework.start()?;
    if !framework.wait_ready(Duration::from_secs(20)).await {
        return Err("not connected within 20 s".into());
    }
    print_line("READY".to_owned());

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let outcome = match words.as_slice() {
            ["data", signal, value] => framework.send_data(signal, value),
            ["command", service, signal, value] => {
                framework.send_command(service, signal, value, false)
            }
            ["command", service, signal, value, "retained"] => {
                framework.send_command(service, signal, value, true)
            }
            ["flush"] => {
                framework.wait_ready(Duration::from_secs(10)).await;
                Ok(())
            }
            ["stop"] => {
                framework.stop().await?;
                task.join().await;
                print_line("STOPPED".to_owned());
                return Ok(());
            }
            ["exit"] => std::process::exit(0),
            _ => {
                print_line(format!("ERROR unknown request {line:?}"));
                continue;
            }
        };
        match outcome {
            Ok(()) => print_line("OK".to_owned()),
            Err(error) => print_line(format!("ERROR {error}")),
        }
    }
    Ok(())
}
