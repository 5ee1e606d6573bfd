//! The SDK against Mosquitto, started on a free loopback port.

mod common;

use common::{Mosquitto, scenario_tests};

async fn start_broker() -> Mosquitto {
    Mosquitto::start("").await
}

scenario_tests!(
    presence_availability_and_will,
    stop_publishes_presence_false,
    echo_rules,
    change_only_and_app_callbacks,
    defaults_resent_after_restart,
    caller_driven_loop,
    error_cases,
    service_manager_withdraws_signals,
    persistent_session_keeps_commands,
);
