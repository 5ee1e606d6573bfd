//! Feeds arbitrary bytes to the MQTT decoder in every protocol version.
//!
//! The decoder must never panic. Each packet it accepts must re-encode, and the re-encoding
//! must decode to the same packet: the codec's round-trip promise, checked on inputs no
//! strategy would think of.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use polyhub_mqtt::{ProtocolVersion, decode, encode};

fuzz_target!(|data: &[u8]| {
    for version in [
        ProtocolVersion::V31,
        ProtocolVersion::V311,
        ProtocolVersion::V5,
    ] {
        let mut buf = BytesMut::from(data);
        // Each successful decode consumes at least the two-byte fixed header, so this ends.
        while let Ok(Some(packet)) = decode(&mut buf, version, usize::MAX) {
            let mut encoded = BytesMut::new();
            encode(&packet, version, &mut encoded).expect("a decoded packet re-encodes");
            let again = decode(&mut encoded, version, usize::MAX)
                .expect("a re-encoded packet decodes")
                .expect("a re-encoded packet is complete");
            assert_eq!(again, packet, "round trip changed the packet");
            assert!(encoded.is_empty(), "re-encoding left bytes over");
        }
    }
});
