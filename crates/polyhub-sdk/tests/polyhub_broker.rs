//! The SDK against polyhub's broker, in process.

mod common;

use common::{PolyhubBroker, scenario_tests};

async fn start_broker() -> PolyhubBroker {
    PolyhubBroker::start().await
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
    service_manager_in_process,
);
