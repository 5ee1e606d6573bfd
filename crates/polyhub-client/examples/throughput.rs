//! Rough client throughput against a running broker, on one core (current-thread runtime).
//!
//! ```text
//! cargo run --release -p polyhub-client --example throughput -- [PORT] [MESSAGES] [PAYLOAD_BYTES]
//! ```
//!
//! Three runs: QoS 0 publishes alone (closed by a QoS 1 publish, so that the broker has read
//! them all), QoS 0 from a publisher to a subscriber on the same runtime, and QoS 1 publishes
//! kept in flight with `begin_publish`. Not a benchmark of record: one machine, one broker, no
//! repetitions.

use std::time::Instant;

use polyhub_client::{Client, ClientOptions, Event, Message, ProtocolVersion, QoS};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().map_or(Ok(1883), |arg| arg.parse())?;
    let messages: usize = args.next().map_or(Ok(200_000), |arg| arg.parse())?;
    let payload_size: usize = args.next().map_or(Ok(16), |arg| arg.parse())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(port, messages, payload_size))
}

async fn run(
    port: u16,
    messages: usize,
    payload_size: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let payload = bytes::Bytes::from(vec![b'x'; payload_size]);
    let options = |id: &str| {
        ClientOptions::new(id, "127.0.0.1", port)
            .protocol(ProtocolVersion::V311)
            .request_capacity(4096)
            .event_capacity(4096)
    };

    // 1. QoS 0 publishes, nobody subscribed.
    let (publisher, _events) = Client::connect(options("tp-pub")).await?;
    let started = Instant::now();
    for _ in 0..messages {
        publisher
            .publish("tp/alone", QoS::AtMostOnce, false, payload.clone())
            .await?;
    }
    publisher
        .publish("tp/alone", QoS::AtLeastOnce, false, "end")
        .await?;
    report("QoS 0 publish only", messages, started);

    // 2. QoS 0 through the broker to a subscriber.
    let (subscriber, mut inbox) = Client::connect(options("tp-sub")).await?;
    subscriber.subscribe("tp/through", QoS::AtMostOnce).await?;
    let started = Instant::now();
    let sending = tokio::spawn({
        let publisher = publisher.clone();
        let payload = payload.clone();
        async move {
            for _ in 0..messages {
                if publisher
                    .publish("tp/through", QoS::AtMostOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    let mut received = 0;
    while received < messages {
        match tokio::time::timeout(std::time::Duration::from_secs(5), inbox.recv()).await {
            Ok(Some(Event::Message(_))) => received += 1,
            Ok(Some(_)) => {}
            // QoS 0 may be dropped by a broker under load; report what arrived.
            Ok(None) | Err(_) => break,
        }
    }
    sending.await?;
    report(
        &format!("QoS 0 end to end ({received} received)"),
        received,
        started,
    );

    // 3. QoS 1, pipelined.
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..messages {
        let message = Message::new("tp/acked", payload.clone()).qos(QoS::AtLeastOnce);
        acks.push_back(publisher.begin_publish(message).await?);
        if acks.len() >= 1000
            && let Some(ack) = acks.pop_front()
        {
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    report("QoS 1 publish, acknowledged", messages, started);

    publisher.disconnect().await?;
    subscriber.disconnect().await?;
    Ok(())
}

fn report(what: &str, messages: usize, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{what}: {messages} messages in {seconds:.3} s = {:.0} msg/s",
        messages as f64 / seconds
    );
}
