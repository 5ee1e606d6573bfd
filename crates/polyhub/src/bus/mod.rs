//! Implementations of the hub's bus traits (`polyhub_hub::bus`) over the embedded broker and
//! over an MQTT connection. (Being written.)
