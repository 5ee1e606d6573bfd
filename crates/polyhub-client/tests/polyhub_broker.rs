//! The client against polyhub's own broker, in process, in MQTT 3.1, 3.1.1 and 5.0.

#[macro_use]
mod common;

use common::PolyhubBroker;

scenario_tests!(
    connect_and_disconnect,
    qos_round_trips,
    retained,
    will_on_abrupt_close,
    no_will_on_clean_disconnect,
    dropping_handles_disconnects_cleanly,
    reconnect_and_resubscribe,
    persistent_session,
    manual_acks,
);

async fn start_broker() -> PolyhubBroker {
    PolyhubBroker::start().await
}

#[tokio::test]
async fn manual_acks_hold_the_receive_window() {
    common::bounded(async {
        let mut broker = PolyhubBroker::start().await;
        common::scenarios::manual_acks_hold_the_receive_window(&mut broker, true).await;
    })
    .await;
}
