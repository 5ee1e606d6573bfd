//! The snapshot file format: a pure encoder and decoder, bytes in and bytes out.
//!
//! ```text
//! header   magic "PHBROKER" (8) | format version u32 | saved_at u64 | crc32 u32 (of the 20 bytes before)
//! record   kind u8 | body length u32 | body | crc32 u32 (of kind, length and body)
//! ...      message records, then retained, then session records, then one end record
//! ```
//!
//! Integers are big-endian. In bodies a string or byte string is a u32 length then its bytes
//! (strings are UTF-8), an optional value is a u8 0 (absent) or 1 followed by the value, and a
//! list is a u32 count then its items. The n-th message record (from 0) is message n; retained
//! entries, deliveries and wills refer to messages by that number, so a message queued for many
//! sessions is stored once. The end record repeats the record counts, so a file cut exactly at
//! a record boundary is still detected. `docs/persistence.md` lists every field.
//!
//! Version 2 adds message sequence numbers: each message record ends with the message's
//! `seq` (u64), and the end record with the snapshot's `last_seq` (u64). Version 1 files
//! still load, with 0 for both (restoring gives their messages new numbers).
//!
//! Version 3 adds the persistent sessions of in-process clients: each session record ends
//! with an optional local part (queue bound and the deliveries handed out and not
//! acknowledged). Version 1 and 2 files still load, with network sessions only.
//!
//! Design: the decoder trusts nothing. Every length is checked against the bytes left before
//! anything is allocated, every enum byte and reference is validated, and errors carry the byte
//! offset of the record at fault, so a damaged file gives one precise error instead of a panic.

use std::io::{self, Write};

use bytes::Bytes;
use polyhub_mqtt::{ProtocolVersion, QoS, RetainHandling, SubscriptionOptions, topic};

use crate::message::MessageProperties;

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"PHBROKER";

/// The format version this build writes; it reads this one and [`OLDEST_READABLE_VERSION`]
/// onwards.
pub const FORMAT_VERSION: u32 = 3;

/// The oldest format version this build reads (version 1: no sequence numbers).
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// Header length: magic, version, saved_at, CRC.
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Record kind, length and CRC around each body.
const RECORD_OVERHEAD: usize = 1 + 4 + 4;

const KIND_MESSAGE: u8 = 1;
const KIND_RETAINED: u8 = 2;
const KIND_SESSION: u8 = 3;
const KIND_END: u8 = 0xFF;

/// Everything the broker saves: messages (stored once), the retained ones, and persistent
/// sessions. Message references are indexes into `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// When the snapshot was taken, in seconds since the Unix epoch (informational: expiry
    /// times are stored as what remained at that moment).
    pub saved_at: u64,
    /// The highest message sequence number the broker had handed out when the snapshot was
    /// taken (0: unknown, from a version 1 file); a restored broker numbers above it.
    pub last_seq: u64,
    /// Every message referenced by `retained` or a session.
    pub messages: Vec<StoredMessage>,
    /// Retained messages, one per topic (the message's topic).
    pub retained: Vec<u32>,
    /// Persistent sessions.
    pub sessions: Vec<StoredSession>,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The broker's sequence number of the message (0: unknown, from a version 1 file).
    pub seq: u64,
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// Forwarded MQTT 5 properties; `message_expiry_interval` is what remained of it when the
    /// snapshot was taken.
    pub properties: MessageProperties,
}

/// A persistent session, not connected once restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Client identifier.
    pub client_id: String,
    /// Protocol version of the last connection.
    pub protocol: ProtocolVersion,
    /// Seconds the session still had to live when the snapshot was taken; `u32::MAX` = never
    /// expires.
    pub expiry: u32,
    /// Packet id the next outbound QoS 1/2 message tries first (1..=65535).
    pub next_packet_id: u16,
    /// Subscriptions with their options.
    pub subscriptions: Vec<StoredSubscription>,
    /// Deliveries not yet sent, oldest first.
    pub queue: Vec<StoredDelivery>,
    /// Outbound QoS 1/2 messages sent and not fully acknowledged, in send order.
    pub inflight: Vec<StoredInflight>,
    /// Inbound QoS 2 packet ids answered with PUBREC and awaiting PUBREL.
    pub awaiting_release: Vec<u16>,
    /// A will waiting for its delay (MQTT 5 will delay interval).
    pub will: Option<StoredWill>,
    /// `Some` for the persistent session of an in-process client (format version 3 on). Such
    /// a session has no connection: `protocol`, `expiry` and `next_packet_id` are written as
    /// 5, `u32::MAX` and 1, and `inflight`, `awaiting_release` and `will` are empty.
    pub local: Option<StoredLocal>,
}

/// What only the persistent session of an in-process client has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLocal {
    /// The queue bound its client chose (0: unbounded).
    pub max_queued: u32,
    /// Deliveries handed out to the client and not acknowledged, in the order they are to be
    /// handed out again (before the queue, marked redelivered).
    pub unacknowledged: Vec<StoredDelivery>,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// Topic filter, possibly `$share/<group>/<filter>`.
    pub filter: String,
    /// Options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// MQTT 5 subscription identifier.
    pub identifier: Option<u32>,
}

/// One message on its way to one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// Index into [`Snapshot::messages`].
    pub message: u32,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag to send.
    pub retain: bool,
    /// Identifiers of the matching subscriptions (MQTT 5).
    pub subscription_ids: Vec<u32>,
}

/// An outbound QoS 1/2 message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInflight {
    /// Its packet id (never 0).
    pub packet_id: u16,
    /// The acknowledgement it waits for.
    pub stage: InflightStage,
    /// The delivery.
    pub delivery: StoredDelivery,
}

/// What an inflight message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightStage {
    /// QoS 1 PUBLISH sent; PUBACK expected (resent with DUP).
    AwaitingPuback = 0,
    /// QoS 2 PUBLISH sent; PUBREC expected (resent with DUP).
    AwaitingPubrec = 1,
    /// PUBREL sent; PUBCOMP expected (PUBREL resent).
    AwaitingPubcomp = 2,
}

/// A will waiting for its delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// Index into [`Snapshot::messages`].
    pub message: u32,
    /// Seconds of the delay that remained when the snapshot was taken (0: due).
    pub delay: u32,
}

/// Why bytes are not a usable snapshot. Offsets are from the start of the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The file does not start with [`MAGIC`].
    #[error("not a polyhub broker snapshot (bad magic bytes)")]
    BadMagic,
    /// Written by a polyhub with another format version.
    #[error(
        "snapshot format version {found} is not supported (this polyhub reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
    },
    /// The file ends inside the header or a record.
    #[error("truncated: the file ends inside the {what} starting at byte {offset}")]
    Truncated {
        /// Which part.
        what: &'static str,
        /// Where that part starts.
        offset: usize,
    },
    /// A CRC does not match: the bytes were damaged.
    #[error("checksum mismatch in the {what} at byte {offset}")]
    Checksum {
        /// Which part.
        what: &'static str,
        /// Where that part starts.
        offset: usize,
    },
    /// A record passed its CRC but its content is not valid.
    #[error("invalid record at byte {offset}: {detail}")]
    Invalid {
        /// Where the record starts.
        offset: usize,
        /// What is wrong.
        detail: String,
    },
    /// The file ends without an end record.
    #[error("truncated: no end record after byte {offset}")]
    MissingEnd {
        /// Where the end record should be.
        offset: usize,
    },
    /// Bytes follow the end record.
    #[error("{count} unexpected bytes after the end record at byte {offset}")]
    TrailingData {
        /// Where they start.
        offset: usize,
        /// How many.
        count: usize,
    },
    /// A snapshot to encode refers to a message that does not exist.
    #[error("{what} refers to message {index}, but there are only {count} messages")]
    DanglingReference {
        /// What refers to it.
        what: String,
        /// The index.
        index: u32,
        /// Messages in the snapshot.
        count: usize,
    },
}

impl Snapshot {
    /// Check that every message reference is in range (a snapshot that fails this encodes
    /// into a file that does not decode).
    pub fn check(&self) -> Result<(), SnapshotError> {
        let count = self.messages.len();
        let check = |index: u32, what: &dyn Fn() -> String| {
            if (index as usize) < count {
                Ok(())
            } else {
                Err(SnapshotError::DanglingReference {
                    what: what(),
                    index,
                    count,
                })
            }
        };
        for &index in &self.retained {
            check(index, &|| "a retained entry".into())?;
        }
        for session in &self.sessions {
            let what = || format!("session {:?}", session.client_id);
            let deliveries = session
                .queue
                .iter()
                .chain(session.inflight.iter().map(|entry| &entry.delivery))
                .chain(session.local.iter().flat_map(|local| &local.unacknowledged));
            for delivery in deliveries {
                check(delivery.message, &what)?;
            }
            if let Some(will) = &session.will {
                check(will.message, &what)?;
            }
        }
        Ok(())
    }
}

/// Encode `snapshot` into bytes.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    match write_to(&mut out, snapshot) {
        Ok(()) => out,
        Err(error) => unreachable!("writing to a Vec cannot fail: {error}"),
    }
}

/// Encode `snapshot` into `out`, record by record, so that a large state is never held twice
/// in memory.
pub fn write_to(out: &mut impl Write, snapshot: &Snapshot) -> io::Result<()> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    header.extend_from_slice(&snapshot.saved_at.to_be_bytes());
    let crc = crc32(&header);
    header.extend_from_slice(&crc.to_be_bytes());
    out.write_all(&header)?;

    let mut record = Record::default();
    for message in &snapshot.messages {
        record.start(KIND_MESSAGE);
        record.message(message);
        record.finish(out)?;
    }
    for &index in &snapshot.retained {
        record.start(KIND_RETAINED);
        record.u32(index);
        record.finish(out)?;
    }
    for session in &snapshot.sessions {
        record.start(KIND_SESSION);
        record.session(session);
        record.finish(out)?;
    }
    record.start(KIND_END);
    record.count(snapshot.messages.len());
    record.count(snapshot.retained.len());
    record.count(snapshot.sessions.len());
    record.u64(snapshot.last_seq);
    record.finish(out)
}

/// One record being encoded; the buffer is reused from record to record.
#[derive(Default)]
struct Record {
    buf: Vec<u8>,
}

impl Record {
    fn start(&mut self, kind: u8) {
        self.buf.clear();
        self.buf.push(kind);
        self.buf.extend_from_slice(&[0; 4]);
    }

    /// Fill in the length, append the CRC and write the record.
    fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        let body_len = self.buf.len() - 5;
        let body_len = u32::try_from(body_len)
            .map_err(|_| io::Error::other("a snapshot record is larger than 4 GiB"))?;
        self.buf[1..5].copy_from_slice(&body_len.to_be_bytes());
        let crc = crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        out.write_all(&self.buf)
    }

    fn u8(&mut self, value: u8) {
        self.buf.push(value);
    }

    fn u16(&mut self, value: u16) {
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    /// A length or count. Anything in memory that the format counts (list items, string
    /// bytes) is far below 4 G in practice; saturating keeps the encoder total, and such a
    /// file would fail to decode rather than decode wrongly.
    fn count(&mut self, count: usize) {
        self.u32(u32::try_from(count).unwrap_or(u32::MAX));
    }

    fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    fn bytes(&mut self, value: &[u8]) {
        self.count(value.len());
        self.buf.extend_from_slice(value);
    }

    fn str(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    fn option<T>(&mut self, value: Option<T>, mut write: impl FnMut(&mut Self, T)) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                write(self, value);
            }
        }
    }

    fn message(&mut self, message: &StoredMessage) {
        let properties = &message.properties;
        self.str(&message.topic);
        self.bytes(&message.payload);
        self.u8(message.qos as u8);
        self.bool(message.retain);
        self.option(properties.message_expiry_interval, Self::u32);
        self.option(properties.payload_format_indicator, Self::u8);
        self.option(properties.content_type.as_deref(), Self::str);
        self.option(properties.response_topic.as_deref(), Self::str);
        self.option(properties.correlation_data.as_deref(), Self::bytes);
        self.count(properties.user_properties.len());
        for (name, value) in &properties.user_properties {
            self.str(name);
            self.str(value);
        }
        self.u64(message.seq);
    }

    fn session(&mut self, session: &StoredSession) {
        self.str(&session.client_id);
        self.u8(session.protocol.level());
        self.u32(session.expiry);
        self.u16(session.next_packet_id);
        self.count(session.subscriptions.len());
        for subscription in &session.subscriptions {
            self.str(&subscription.filter);
            self.u8(options_byte(subscription.options));
            self.option(subscription.identifier, Self::u32);
        }
        self.count(session.queue.len());
        for delivery in &session.queue {
            self.delivery(delivery);
        }
        self.count(session.inflight.len());
        for entry in &session.inflight {
            self.u16(entry.packet_id);
            self.u8(entry.stage as u8);
            self.delivery(&entry.delivery);
        }
        self.count(session.awaiting_release.len());
        for &packet_id in &session.awaiting_release {
            self.u16(packet_id);
        }
        self.option(session.will.as_ref(), |record, will| {
            record.u32(will.message);
            record.u32(will.delay);
        });
        self.option(session.local.as_ref(), |record, local| {
            record.u32(local.max_queued);
            record.count(local.unacknowledged.len());
            for delivery in &local.unacknowledged {
                record.delivery(delivery);
            }
        });
    }

    fn delivery(&mut self, delivery: &StoredDelivery) {
        self.u32(delivery.message);
        self.u8(delivery.qos as u8);
        self.bool(delivery.retain);
        self.count(delivery.subscription_ids.len());
        for &id in &delivery.subscription_ids {
            self.u32(id);
        }
    }
}

/// Subscription options as in an MQTT 5 SUBSCRIBE: QoS in bits 0-1, no local bit 2, retain
/// as published bit 3, retain handling bits 4-5.
fn options_byte(options: SubscriptionOptions) -> u8 {
    options.qos as u8
        | u8::from(options.no_local) << 2
        | u8::from(options.retain_as_published) << 3
        | (options.retain_handling as u8) << 4
}

/// Decode a snapshot. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A file too short to hold the magic is only "truncated" if what it has matches.
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
            return Err(SnapshotError::Truncated {
                what: "header",
                offset: 0,
            });
        }
        return Err(SnapshotError::BadMagic);
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(SnapshotError::Truncated {
            what: "header",
            offset: 0,
        });
    };
    let version = u32::from_be_bytes(fixed(&header[8..12]));
    let saved_at = u64::from_be_bytes(fixed(&header[12..20]));
    let crc = u32::from_be_bytes(fixed(&header[20..24]));
    if crc32(&header[..20]) != crc {
        return Err(SnapshotError::Checksum {
            what: "header",
            offset: 0,
        });
    }
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion { found: version });
    }
    let has_seq = version >= 2;
    let has_local = version >= 3;

    let mut snapshot = Snapshot {
        saved_at,
        ..Snapshot::default()
    };
    let mut offset = HEADER_LEN;
    loop {
        if offset == bytes.len() {
            return Err(SnapshotError::MissingEnd { offset });
        }
        let (kind, body, next) = split_record(bytes, offset)?;
        let invalid = |detail: String| SnapshotError::Invalid { offset, detail };
        let mut reader = Reader::new(body);
        match kind {
            KIND_MESSAGE => {
                if !snapshot.retained.is_empty() || !snapshot.sessions.is_empty() {
                    return Err(invalid(
                        "message record after retained or session records".into(),
                    ));
                }
                snapshot
                    .messages
                    .push(reader.message(has_seq).map_err(invalid)?);
            }
            KIND_RETAINED => {
                if !snapshot.sessions.is_empty() {
                    return Err(invalid("retained record after session records".into()));
                }
                let index = reader.u32().map_err(invalid)?;
                reader
                    .message_ref(index, snapshot.messages.len())
                    .map_err(invalid)?;
                snapshot.retained.push(index);
            }
            KIND_SESSION => {
                let session = reader
                    .session(snapshot.messages.len(), has_local)
                    .map_err(invalid)?;
                snapshot.sessions.push(session);
            }
            KIND_END => {
                let counts = [
                    (
                        reader.u32().map_err(invalid)?,
                        snapshot.messages.len(),
                        "message",
                    ),
                    (
                        reader.u32().map_err(invalid)?,
                        snapshot.retained.len(),
                        "retained",
                    ),
                    (
                        reader.u32().map_err(invalid)?,
                        snapshot.sessions.len(),
                        "session",
                    ),
                ];
                if has_seq {
                    snapshot.last_seq = reader.u64().map_err(invalid)?;
                }
                reader.end().map_err(invalid)?;
                for (expected, found, what) in counts {
                    if expected as usize != found {
                        return Err(invalid(format!(
                            "the end record counts {expected} {what} records, the file has {found}"
                        )));
                    }
                }
                if next != bytes.len() {
                    return Err(SnapshotError::TrailingData {
                        offset: next,
                        count: bytes.len() - next,
                    });
                }
                return Ok(snapshot);
            }
            other => return Err(invalid(format!("unknown record kind {other}"))),
        }
        reader.end().map_err(invalid)?;
        offset = next;
    }
}

/// The record at `offset`: its kind, its body (CRC checked) and where the next one starts.
fn split_record(bytes: &[u8], offset: usize) -> Result<(u8, &[u8], usize), SnapshotError> {
    let truncated = SnapshotError::Truncated {
        what: "record",
        offset,
    };
    let rest = &bytes[offset..];
    let Some(prefix) = rest.get(..5) else {
        return Err(truncated);
    };
    let body_len = u32::from_be_bytes(fixed(&prefix[1..5])) as usize;
    let Some(total) = body_len.checked_add(RECORD_OVERHEAD) else {
        return Err(truncated);
    };
    let Some(record) = rest.get(..total) else {
        return Err(truncated);
    };
    let (checked, crc) = record.split_at(total - 4);
    if crc32(checked) != u32::from_be_bytes(fixed(crc)) {
        return Err(SnapshotError::Checksum {
            what: "record",
            offset,
        });
    }
    Ok((prefix[0], &checked[5..], offset + total))
}

/// A fixed-size array from a slice of that size (callers slice exactly).
fn fixed<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(slice);
    out
}

/// Reads one record body; errors are plain descriptions, given an offset by the caller.
struct Reader<'a> {
    body: &'a [u8],
}

type Read<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn new(body: &'a [u8]) -> Self {
        Reader { body }
    }

    fn take(&mut self, len: usize, what: &str) -> Read<&'a [u8]> {
        if len > self.body.len() {
            return Err(format!(
                "{what} needs {len} bytes, the record has {} left",
                self.body.len()
            ));
        }
        let (taken, rest) = self.body.split_at(len);
        self.body = rest;
        Ok(taken)
    }

    fn end(&self) -> Read<()> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes at the end", self.body.len()))
        }
    }

    fn u8(&mut self) -> Read<u8> {
        Ok(self.take(1, "a byte")?[0])
    }

    fn u16(&mut self) -> Read<u16> {
        Ok(u16::from_be_bytes(fixed(self.take(2, "a u16")?)))
    }

    fn u32(&mut self) -> Read<u32> {
        Ok(u32::from_be_bytes(fixed(self.take(4, "a u32")?)))
    }

    fn u64(&mut self) -> Read<u64> {
        Ok(u64::from_be_bytes(fixed(self.take(8, "a u64")?)))
    }

    /// A count of items of at least `min_item_len` bytes each, checked against what is left
    /// so that a damaged count cannot make us allocate or loop for nothing.
    fn count(&mut self, min_item_len: usize, what: &str) -> Read<usize> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_item_len) > self.body.len() {
            return Err(format!(
                "{count} {what} cannot fit in the {} bytes left",
                self.body.len()
            ));
        }
        Ok(count)
    }

    fn bool(&mut self, what: &str) -> Read<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what}: {other} is not a boolean")),
        }
    }

    fn bytes(&mut self, what: &str) -> Read<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Read<String> {
        let bytes = self.bytes(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn option<T>(
        &mut self,
        what: &str,
        read: impl FnOnce(&mut Self) -> Read<T>,
    ) -> Read<Option<T>> {
        if self.bool(what)? {
            read(self).map(Some)
        } else {
            Ok(None)
        }
    }

    fn qos(&mut self, what: &str) -> Read<QoS> {
        let value = self.u8()?;
        QoS::from_u8(value).ok_or_else(|| format!("{what}: {value} is not a QoS"))
    }

    fn message_ref(&mut self, index: u32, count: usize) -> Read<u32> {
        if (index as usize) < count {
            Ok(index)
        } else {
            Err(format!(
                "refers to message {index}, but only {count} come before it"
            ))
        }
    }

    /// A message record's body; `has_seq` from format version 2 on.
    fn message(&mut self, has_seq: bool) -> Read<StoredMessage> {
        let topic_name = self.string("topic")?;
        if topic::validate_topic_name(&topic_name).is_err() {
            return Err(format!("{topic_name:?} is not a valid topic name"));
        }
        let payload = Bytes::copy_from_slice(self.bytes("payload")?);
        let qos = self.qos("message QoS")?;
        let retain = self.bool("retain flag")?;
        let message_expiry_interval = self.option("expiry", Self::u32)?;
        let payload_format_indicator = self.option("payload format", Self::u8)?;
        let content_type = self.option("content type", |r| r.string("content type"))?;
        let response_topic = self.option("response topic", |r| r.string("response topic"))?;
        let correlation_data = self.option("correlation data", |r| {
            r.bytes("correlation data").map(Bytes::copy_from_slice)
        })?;
        let count = self.count(8, "user properties")?;
        let mut user_properties = Vec::new();
        for _ in 0..count {
            let name = self.string("user property name")?;
            let value = self.string("user property value")?;
            user_properties.push((name, value));
        }
        let seq = if has_seq { self.u64()? } else { 0 };
        Ok(StoredMessage {
            seq,
            topic: topic_name,
            payload,
            qos,
            retain,
            properties: MessageProperties {
                payload_format_indicator,
                message_expiry_interval,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            },
        })
    }

    /// A session record's body; `has_local` from format version 3 on.
    fn session(&mut self, messages: usize, has_local: bool) -> Read<StoredSession> {
        let client_id = self.string("client id")?;
        let protocol = match self.u8()? {
            3 => ProtocolVersion::V31,
            4 => ProtocolVersion::V311,
            5 => ProtocolVersion::V5,
            other => return Err(format!("{other} is not an MQTT protocol level")),
        };
        let expiry = self.u32()?;
        let next_packet_id = self.u16()?;
        if next_packet_id == 0 {
            return Err("next packet id is 0".into());
        }

        let count = self.count(4 + 1 + 1, "subscriptions")?;
        let mut subscriptions = Vec::new();
        for _ in 0..count {
            let filter = self.string("topic filter")?;
            if topic::validate_topic_filter(&filter).is_err() {
                return Err(format!("{filter:?} is not a valid topic filter"));
            }
            let options = self.options()?;
            let identifier = self.option("subscription identifier", Self::u32)?;
            subscriptions.push(StoredSubscription {
                filter,
                options,
                identifier,
            });
        }

        let count = self.count(DELIVERY_MIN_LEN, "queued deliveries")?;
        let mut queue = Vec::new();
        for _ in 0..count {
            queue.push(self.delivery(messages)?);
        }

        let count = self.count(2 + 1 + DELIVERY_MIN_LEN, "inflight messages")?;
        let mut inflight = Vec::new();
        for _ in 0..count {
            let packet_id = self.u16()?;
            if packet_id == 0 {
                return Err("inflight message with packet id 0".into());
            }
            let stage = match self.u8()? {
                0 => InflightStage::AwaitingPuback,
                1 => InflightStage::AwaitingPubrec,
                2 => InflightStage::AwaitingPubcomp,
                other => return Err(format!("{other} is not an inflight stage")),
            };
            let delivery = self.delivery(messages)?;
            inflight.push(StoredInflight {
                packet_id,
                stage,
                delivery,
            });
        }

        let count = self.count(2, "packet ids awaiting PUBREL")?;
        let mut awaiting_release = Vec::new();
        for _ in 0..count {
            awaiting_release.push(self.u16()?);
        }

        let will = self.option("will", |r| {
            let message = r.u32()?;
            let message = r.message_ref(message, messages)?;
            Ok(StoredWill {
                message,
                delay: r.u32()?,
            })
        })?;

        let local = if has_local {
            self.option("local session", |r| {
                let max_queued = r.u32()?;
                let count = r.count(DELIVERY_MIN_LEN, "unacknowledged deliveries")?;
                let mut unacknowledged = Vec::new();
                for _ in 0..count {
                    unacknowledged.push(r.delivery(messages)?);
                }
                Ok(StoredLocal {
                    max_queued,
                    unacknowledged,
                })
            })?
        } else {
            None
        };

        Ok(StoredSession {
            client_id,
            protocol,
            expiry,
            next_packet_id,
            subscriptions,
            queue,
            inflight,
            awaiting_release,
            will,
            local,
        })
    }

    fn options(&mut self) -> Read<SubscriptionOptions> {
        let byte = self.u8()?;
        let qos = QoS::from_u8(byte & 0b11)
            .ok_or_else(|| format!("subscription options {byte:#04x}: QoS 3"))?;
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNewSubscription,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(format!(
                    "subscription options {byte:#04x}: retain handling 3"
                ));
            }
        };
        if byte & 0b1100_0000 != 0 {
            return Err(format!(
                "subscription options {byte:#04x}: reserved bits set"
            ));
        }
        Ok(SubscriptionOptions {
            qos,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }

    fn delivery(&mut self, messages: usize) -> Read<StoredDelivery> {
        let message = self.u32()?;
        let message = self.message_ref(message, messages)?;
        let qos = self.qos("delivery QoS")?;
        let retain = self.bool("delivery retain flag")?;
        let count = self.count(4, "subscription identifiers")?;
        let mut subscription_ids = Vec::new();
        for _ in 0..count {
            subscription_ids.push(self.u32()?);
        }
        Ok(StoredDelivery {
            message,
            qos,
            retain,
            subscription_ids,
        })
    }
}

/// Smallest encoded delivery: message, QoS, retain, identifier count.
const DELIVERY_MIN_LEN: usize = 4 + 1 + 1 + 4;

/// CRC-32 (IEEE 802.3, as in zlib and PNG) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Lookup table of the reflected polynomial 0xEDB88320, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut value = index as u32;
        let mut bit = 0;
        while bit < 8 {
            value = if value & 1 != 0 {
                (value >> 1) ^ 0xEDB8_8320
            } else {
                value >> 1
            };
            bit += 1;
        }
        table[index] = value;
        index += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn message(topic_name: &str, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            seq: 1_000 + payload.len() as u64,
            topic: topic_name.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: MessageProperties::default(),
        }
    }

    fn delivery(message: u32) -> StoredDelivery {
        StoredDelivery {
            message,
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![7],
        }
    }

    fn sample() -> Snapshot {
        let mut retained = message("sensors/temp", b"21.5");
        retained.retain = true;
        retained.properties = MessageProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        };
        Snapshot {
            saved_at: 1_700_000_000,
            last_seq: 1_700_000_000_000_123,
            messages: vec![
                retained,
                message("cmd/x", b"go"),
                message("dead/c1", b"bye"),
            ],
            retained: vec![0],
            sessions: vec![StoredSession {
                client_id: "c1".into(),
                protocol: ProtocolVersion::V5,
                expiry: 120,
                next_packet_id: 9,
                subscriptions: vec![StoredSubscription {
                    filter: "$share/g/cmd/+".into(),
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: false,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                    identifier: Some(7),
                }],
                queue: vec![delivery(1)],
                inflight: vec![StoredInflight {
                    packet_id: 8,
                    stage: InflightStage::AwaitingPubcomp,
                    delivery: delivery(1),
                }],
                awaiting_release: vec![3, 65_535],
                will: Some(StoredWill {
                    message: 2,
                    delay: 30,
                }),
                local: None,
            }],
        }
    }

    /// [`sample`] plus the persistent session of an in-process client (version 3 only).
    fn sample_with_local() -> Snapshot {
        let mut snapshot = sample();
        snapshot.sessions.push(StoredSession {
            client_id: "polyhub-parser-h1".into(),
            protocol: ProtocolVersion::V5,
            expiry: u32::MAX,
            next_packet_id: 1,
            subscriptions: vec![StoredSubscription {
                filter: "/h1/d1/data".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
                identifier: None,
            }],
            queue: vec![delivery(1)],
            inflight: Vec::new(),
            awaiting_release: Vec::new(),
            will: None,
            local: Some(StoredLocal {
                max_queued: 0,
                unacknowledged: vec![delivery(2), delivery(1)],
            }),
        });
        snapshot
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn sample_round_trips() {
        for snapshot in [sample(), sample_with_local()] {
            snapshot.check().unwrap();
            assert_eq!(decode(&encode(&snapshot)), Ok(snapshot));
        }
    }

    #[test]
    fn unacknowledged_local_deliveries_are_checked_for_dangling_references() {
        let mut snapshot = sample_with_local();
        if let Some(local) = &mut snapshot.sessions[1].local {
            local.unacknowledged.push(delivery(9));
        }
        assert!(matches!(
            snapshot.check(),
            Err(SnapshotError::DanglingReference { index: 9, .. })
        ));
        let error = decode(&encode(&snapshot)).unwrap_err();
        assert!(
            matches!(&error, SnapshotError::Invalid { detail, .. } if detail.contains("refers to message 9")),
            "{error}"
        );
    }

    #[test]
    fn empty_snapshot_is_a_header_and_an_end_record() {
        let bytes = encode(&Snapshot::default());
        assert_eq!(bytes.len(), HEADER_LEN + RECORD_OVERHEAD + 12 + 8);
        assert_eq!(&bytes[..8], b"PHBROKER");
        assert_eq!(&bytes[8..12], &[0, 0, 0, 3]);
        assert_eq!(bytes[HEADER_LEN], KIND_END);
        assert_eq!(decode(&bytes), Ok(Snapshot::default()));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample_with_local());
        for len in 0..bytes.len() {
            let error = decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    error,
                    SnapshotError::Truncated { .. } | SnapshotError::MissingEnd { .. }
                ),
                "length {len}: {error}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode(&sample_with_local());
        for index in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[index] ^= 1 << bit;
                assert!(decode(&damaged).is_err(), "bit {bit} of byte {index}");
            }
        }
    }

    #[test]
    fn header_problems_are_named() {
        assert_eq!(
            decode(b"hello world, not a snapshot"),
            Err(SnapshotError::BadMagic)
        );
        assert_eq!(
            decode(b""),
            Err(SnapshotError::Truncated {
                what: "header",
                offset: 0
            })
        );
        let mut bytes = encode(&Snapshot::default());
        for version in [0u32, 4] {
            bytes[8..12].copy_from_slice(&version.to_be_bytes());
            let crc = crc32(&bytes[..20]);
            bytes[20..24].copy_from_slice(&crc.to_be_bytes());
            assert_eq!(
                decode(&bytes),
                Err(SnapshotError::UnsupportedVersion { found: version })
            );
        }
    }

    /// Rewrite a version 3 file without local sessions as an older `version` wrote it:
    /// version 2 has no local part at the end of session records (the "absent" byte), and
    /// version 1 also no `seq` at the end of message records and no `last_seq` at the end of
    /// the end record.
    fn as_version(bytes: &[u8], version: u32) -> Vec<u8> {
        let mut header = bytes[..HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&version.to_be_bytes());
        let crc = crc32(&header[..20]);
        header[20..24].copy_from_slice(&crc.to_be_bytes());
        let mut out = header;
        let mut offset = HEADER_LEN;
        while offset < bytes.len() {
            let (kind, body, next) = split_record(bytes, offset).unwrap();
            let body = match kind {
                KIND_MESSAGE | KIND_END if version < 2 => &body[..body.len() - 8],
                KIND_SESSION => {
                    assert_eq!(body.last(), Some(&0), "a session with a local part");
                    &body[..body.len() - 1]
                }
                _ => body,
            };
            let mut record = vec![kind];
            record.extend_from_slice(&(body.len() as u32).to_be_bytes());
            record.extend_from_slice(body);
            let crc = crc32(&record);
            record.extend_from_slice(&crc.to_be_bytes());
            out.extend_from_slice(&record);
            offset = next;
        }
        out
    }

    #[test]
    fn version_1_files_load_without_sequence_numbers() {
        let snapshot = sample();
        let old = as_version(&encode(&snapshot), 1);
        assert_eq!(&old[8..12], &[0, 0, 0, 1]);
        let mut expected = snapshot;
        expected.last_seq = 0;
        for message in &mut expected.messages {
            message.seq = 0;
        }
        assert_eq!(decode(&old), Ok(expected));
    }

    #[test]
    fn version_2_files_load_with_network_sessions_only() {
        let snapshot = sample();
        let old = as_version(&encode(&snapshot), 2);
        assert_eq!(&old[8..12], &[0, 0, 0, 2]);
        assert_eq!(old.len(), encode(&snapshot).len() - 1);
        assert_eq!(decode(&old), Ok(snapshot));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&sample());
        let end = bytes.len();
        bytes.extend_from_slice(b"junk");
        assert_eq!(
            decode(&bytes),
            Err(SnapshotError::TrailingData {
                offset: end,
                count: 4
            })
        );
    }

    /// A record with a valid CRC but content that does not make sense (as a buggy writer
    /// could produce) is refused with its offset.
    #[test]
    fn invalid_content_with_a_valid_crc_is_refused() {
        let mut snapshot = Snapshot::default();
        snapshot.retained.push(0);
        assert!(matches!(
            snapshot.check(),
            Err(SnapshotError::DanglingReference {
                index: 0,
                count: 0,
                ..
            })
        ));
        let error = decode(&encode(&snapshot)).unwrap_err();
        assert_eq!(
            error,
            SnapshotError::Invalid {
                offset: HEADER_LEN,
                detail: "refers to message 0, but only 0 come before it".into()
            }
        );

        let mut snapshot = sample();
        snapshot.messages[1].topic = "bad/#".into();
        let error = decode(&encode(&snapshot)).unwrap_err();
        assert!(
            matches!(&error, SnapshotError::Invalid { detail, .. } if detail.contains("not a valid topic name")),
            "{error}"
        );
    }

    #[test]
    fn options_byte_matches_mqtt5() {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        };
        assert_eq!(options_byte(options), 0b0010_1101);
        let mut reader = Reader::new(&[0b0010_1101]);
        assert_eq!(reader.options(), Ok(options));
        assert!(Reader::new(&[0b0100_0000]).options().is_err());
        assert!(Reader::new(&[0b0011_0000]).options().is_err());
        assert!(Reader::new(&[3]).options().is_err());
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    /// Valid topic names: a non-empty first level, then levels that may be empty.
    fn topic_name() -> impl Strategy<Value = String> {
        (
            "[a-z0-9é]{1,4}",
            prop::collection::vec("[a-z0-9é ]{0,4}", 0..3),
        )
            .prop_map(|(first, rest)| {
                std::iter::once(first)
                    .chain(rest)
                    .collect::<Vec<_>>()
                    .join("/")
            })
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        prop_oneof![
            topic_name(),
            topic_name().prop_map(|t| format!("{t}/#")),
            topic_name().prop_map(|t| format!("+/{t}")),
            topic_name().prop_map(|t| format!("$share/g/{t}")),
        ]
    }

    fn properties() -> impl Strategy<Value = MessageProperties> {
        (
            prop::option::of(0u8..=1),
            prop::option::of(any::<u32>()),
            prop::option::of("[ -~]{0,8}"),
            prop::option::of(topic_name()),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from)),
            prop::collection::vec(("[a-z]{0,3}", "[a-z]{0,3}"), 0..3),
        )
            .prop_map(
                |(format, expiry, content_type, response_topic, correlation, user)| {
                    MessageProperties {
                        payload_format_indicator: format,
                        message_expiry_interval: expiry,
                        content_type,
                        response_topic,
                        correlation_data: correlation,
                        user_properties: user,
                    }
                },
            )
    }

    fn stored_message() -> impl Strategy<Value = StoredMessage> {
        (
            topic_name(),
            prop::collection::vec(any::<u8>(), 0..32),
            qos(),
            any::<bool>(),
            properties(),
            any::<u64>(),
        )
            .prop_map(
                |(topic, payload, qos, retain, properties, seq)| StoredMessage {
                    seq,
                    topic,
                    payload: Bytes::from(payload),
                    qos,
                    retain,
                    properties,
                },
            )
    }

    fn delivery_to(messages: u32) -> impl Strategy<Value = StoredDelivery> {
        (
            0..messages,
            qos(),
            any::<bool>(),
            prop::collection::vec(any::<u32>(), 0..3),
        )
            .prop_map(|(message, qos, retain, subscription_ids)| StoredDelivery {
                message,
                qos,
                retain,
                subscription_ids,
            })
    }

    fn options() -> impl Strategy<Value = SubscriptionOptions> {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                Just(RetainHandling::SendAtSubscribe),
                Just(RetainHandling::SendIfNewSubscription),
                Just(RetainHandling::DoNotSend)
            ],
        )
            .prop_map(|(qos, no_local, retain_as_published, retain_handling)| {
                SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                }
            })
    }

    /// Sessions referring to `messages` messages (none refers to anything when it is 0).
    fn session(messages: u32) -> impl Strategy<Value = StoredSession> {
        let delivery = move || delivery_to(messages.max(1));
        let refs = if messages == 0 { 0..1usize } else { 0..4usize };
        let stage = prop_oneof![
            Just(InflightStage::AwaitingPuback),
            Just(InflightStage::AwaitingPubrec),
            Just(InflightStage::AwaitingPubcomp)
        ];
        (
            "[ -~]{0,12}",
            prop_oneof![
                Just(ProtocolVersion::V31),
                Just(ProtocolVersion::V311),
                Just(ProtocolVersion::V5)
            ],
            any::<u32>(),
            1..=u16::MAX,
            prop::collection::vec(
                (topic_filter(), options(), prop::option::of(any::<u32>())),
                0..4,
            ),
            prop::collection::vec(delivery(), refs.clone()),
            prop::collection::vec((1..=u16::MAX, stage, delivery()), refs.clone()),
            prop::collection::vec(any::<u16>(), 0..4),
            prop::option::of((0..messages.max(1), any::<u32>())),
            prop::option::of((
                any::<u32>(),
                prop::collection::vec(delivery(), refs.clone()),
            )),
        )
            .prop_map(
                move |(
                    client_id,
                    protocol,
                    expiry,
                    next_packet_id,
                    subscriptions,
                    queue,
                    inflight,
                    awaiting_release,
                    will,
                    local,
                )| StoredSession {
                    client_id,
                    protocol,
                    expiry,
                    next_packet_id,
                    subscriptions: subscriptions
                        .into_iter()
                        .map(|(filter, options, identifier)| StoredSubscription {
                            filter,
                            options,
                            identifier,
                        })
                        .collect(),
                    queue,
                    inflight: inflight
                        .into_iter()
                        .map(|(packet_id, stage, delivery)| StoredInflight {
                            packet_id,
                            stage,
                            delivery,
                        })
                        .collect(),
                    awaiting_release,
                    will: will
                        .filter(|_| messages > 0)
                        .map(|(message, delay)| StoredWill { message, delay }),
                    local: local.map(|(max_queued, unacknowledged)| StoredLocal {
                        max_queued,
                        unacknowledged,
                    }),
                },
            )
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(stored_message(), 0..5),
        )
            .prop_flat_map(|(saved_at, last_seq, messages)| {
                let count = messages.len() as u32;
                let retained = if count == 0 {
                    prop::collection::vec(0..1u32, 0..1).boxed()
                } else {
                    prop::collection::vec(0..count, 0..4).boxed()
                };
                (
                    Just(saved_at),
                    Just(messages),
                    retained,
                    prop::collection::vec(session(count), 0..3),
                )
                    .prop_map(move |(saved_at, messages, retained, sessions)| {
                        Snapshot {
                            saved_at,
                            last_seq,
                            messages,
                            retained,
                            sessions,
                        }
                    })
            })
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(snapshot in snapshot()) {
            prop_assert!(snapshot.check().is_ok());
            prop_assert_eq!(decode(&encode(&snapshot)), Ok(snapshot));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let mut with_header = MAGIC.to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = decode(&with_header);
        }

        /// Damage a valid file: flip, overwrite, insert or cut bytes. The decoder must
        /// return (anything but a panic), and damage anywhere is never taken for the original.
        #[test]
        fn mutated_snapshots_never_panic(
            snapshot in snapshot(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        ) {
            let original = encode(&snapshot);
            let mut bytes = original.clone();
            for (at, value, how) in edits {
                if bytes.is_empty() {
                    break;
                }
                let index = at.index(bytes.len());
                match how {
                    0 => bytes[index] ^= value | 1,
                    1 => bytes[index] = value,
                    2 => bytes.insert(index, value),
                    _ => bytes.truncate(index),
                }
            }
            let decoded = decode(&bytes);
            if bytes != original {
                prop_assert_ne!(decoded, Ok(snapshot));
            }
        }

        /// Records with valid CRCs around arbitrary bodies: exercises the body parser itself,
        /// which CRC-damaged input never reaches.
        #[test]
        fn arbitrary_bodies_with_valid_crcs_never_panic(
            bodies in prop::collection::vec((prop_oneof![Just(1u8), Just(2), Just(3), Just(0xFF), any::<u8>()], prop::collection::vec(any::<u8>(), 0..64)), 0..6),
        ) {
            let mut bytes = encode(&Snapshot::default());
            bytes.truncate(HEADER_LEN);
            for (kind, body) in bodies {
                let mut record = Record::default();
                record.start(kind);
                record.buf.extend_from_slice(&body);
                record.finish(&mut bytes).unwrap();
            }
            let _ = decode(&bytes);
        }
    }
}
