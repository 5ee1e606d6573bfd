//! MQTT 3.1, 3.1.1 and 5.0 as pure data: packet types, a codec over bytes, and topic rules.
//!
//! Nothing here performs I/O or depends on a runtime; the broker, the SDK and the fuzzer all drive
//! it with byte buffers.
//!
//! # Layout
//! - [`packet`]: one type per control packet, shared by all three protocol versions. Fields that
//!   only MQTT 5 carries (properties, reason codes) are simply left at their defaults for 3.x.
//! - [`reason`]: MQTT 5 reason codes, and their mapping onto 3.x CONNACK return codes.
//! - [`codec`]: [`decode`] turns the front of a buffer into a [`Packet`] (or asks for more bytes);
//!   [`encode`] appends a packet's wire form to a buffer, and [`encoded_len`] tells its size
//!   beforehand (to compare with a peer's maximum packet size).
//! - [`topic`]: topic name and filter validation, wildcard matching, shared subscriptions.
//! - [`error`]: [`DecodeError`] and [`EncodeError`], each mapped to the reason code the spec
//!   prescribes for it.

pub mod codec;
pub mod error;
pub mod packet;
pub mod reason;
pub mod topic;

pub use codec::{decode, encode, encode_publish, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use reason::ReasonCode;
