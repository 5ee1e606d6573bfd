//! The hub: what turns the broker into an IoT platform.
//!
//! Groups own hubs, hubs own devices, each device has its own MQTT channel, and each running hub
//! is ingested by its own parser that the [`manager`] starts, stops and supervises.
//!
//! - [`bus`]: the broker as the hub sees it (traits; the binary supplies implementations).

pub mod bus;
