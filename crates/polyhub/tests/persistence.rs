//! `polyhub run` keeps the broker's state in its data directory: a retained message published
//! before a SIGTERM is there after a restart with the same `--data-dir`, and a damaged
//! snapshot stops the start with one line (or is moved aside when configured so).
//!
//! The MQTT side is a few hand-made MQTT 3.1.1 packets over TCP, so the test needs nothing but
//! the binary. Every wait is bounded; a hung child is killed when its handle is dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus};

use polyhub_testkit::process::{self, PolyhubProcess, TIMEOUT, polyhub_command};

const POLYHUB: &str = env!("CARGO_BIN_EXE_polyhub");

/// `polyhub` with `args` in `dir`, with no `POLYHUB_*` variables from our environment.
fn polyhub(dir: &Path, args: &[&str]) -> Command {
    polyhub_command(POLYHUB, dir, args)
}

/// Runs a polyhub that is expected to stop by itself; returns its exit status and stderr.
fn finish(command: Command) -> (ExitStatus, String) {
    let output = process::finish(command);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status, stderr)
}

/// An MQTT 3.1.1 packet: fixed header byte, remaining length, then `body`.
fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A length-prefixed MQTT string.
fn string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// A connected MQTT 3.1.1 client (clean session), CONNACK checked.
fn mqtt_connect(address: SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut body = string("MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    body.extend_from_slice(&string(client_id));
    stream.write_all(&packet(0x10, &body)).unwrap();
    assert_eq!(read_exact::<4>(&mut stream), [0x20, 2, 0, 0], "CONNACK");
    stream
}

fn read_exact<const N: usize>(stream: &mut TcpStream) -> [u8; N] {
    let mut buf = [0; N];
    stream.read_exact(&mut buf).expect("read from polyhub");
    buf
}

/// Publish a retained QoS 1 message and wait for its PUBACK.
fn publish_retained(address: SocketAddr, topic: &str, payload: &[u8]) {
    let mut stream = mqtt_connect(address, "publisher");
    let mut body = string(topic);
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    stream.write_all(&packet(0x33, &body)).unwrap();
    assert_eq!(read_exact::<4>(&mut stream), [0x40, 2, 0, 1], "PUBACK");
    stream.write_all(&[0xE0, 0]).unwrap();
}

/// Subscribe to `filter` at QoS 0 and return the first message: (retain flag, topic, payload).
fn first_message(address: SocketAddr, filter: &str) -> (bool, String, Vec<u8>) {
    let mut stream = mqtt_connect(address, "subscriber");
    let mut body = vec![0, 1];
    body.extend_from_slice(&string(filter));
    body.push(0);
    stream.write_all(&packet(0x82, &body)).unwrap();
    assert_eq!(read_exact::<5>(&mut stream), [0x90, 3, 0, 1, 0], "SUBACK");
    let [first_byte] = read_exact::<1>(&mut stream);
    assert_eq!(
        first_byte & 0xF6,
        0x30,
        "a QoS 0 PUBLISH, got {first_byte:#x}"
    );
    let mut length = 0usize;
    let mut shift = 0;
    loop {
        let [byte] = read_exact::<1>(&mut stream);
        length |= usize::from(byte & 0x7F) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut rest = vec![0; length];
    stream.read_exact(&mut rest).unwrap();
    let topic_length = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let topic = String::from_utf8(rest[2..2 + topic_length].to_vec()).unwrap();
    (
        first_byte & 1 == 1,
        topic,
        rest[2 + topic_length..].to_vec(),
    )
}

#[test]
fn retained_message_survives_sigterm_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["run", "--mqtt-listen", "127.0.0.1:0", "--data-dir", "state"];

    let mut first = PolyhubProcess::start(polyhub(dir.path(), &args));
    let address = first.listening_address("MQTT");
    publish_retained(address, "home/door", b"closed");
    let (status, _) = first.stop_with("TERM", TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", first.log());
    first.wait_for_line("saved 1 retained messages");
    let snapshot = dir.path().join("state").join("broker.db");
    assert!(snapshot.is_file());

    let mut second = PolyhubProcess::start(polyhub(dir.path(), &args));
    let address = second.listening_address("MQTT");
    second.wait_for_line("restored 1 retained messages and 0 sessions");
    let (retain, topic, payload) = first_message(address, "home/#");
    assert!(retain);
    assert_eq!(topic, "home/door");
    assert_eq!(payload, b"closed");
    assert_eq!(second.stop_with("TERM", TIMEOUT).0.code(), Some(0));
}

#[test]
fn corrupt_snapshot_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/broker.db"),
        b"PHBROKER\0\0\0\x01garbage",
    )
    .unwrap();
    let (status, stderr) = finish(polyhub(
        dir.path(),
        &["run", "--mqtt-listen", "127.0.0.1:0", "--data-dir", "state"],
    ));
    assert_eq!(status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("error: state/broker.db is not a usable broker snapshot: truncated"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("on_corrupt = \"move_aside\""),
        "{}",
        errors[0]
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert!(
        dir.path().join("state/broker.db").is_file(),
        "the file stays"
    );
}

#[test]
fn corrupt_snapshot_is_moved_aside_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/broker.db"), b"not a snapshot").unwrap();
    std::fs::write(
        dir.path().join("polyhub.toml"),
        "data_dir = \"state\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [mqtt.persistence]\non_corrupt = \"move_aside\"\nautosave_interval = 0\n",
    )
    .unwrap();
    let mut running =
        PolyhubProcess::start(polyhub(dir.path(), &["run", "--config", "polyhub.toml"]));
    running.listening_address("MQTT");
    running.wait_for_line("moved it aside");
    // The hub's database lives in the same directory; only the broker's files matter here.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("broker.db"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("broker.db.corrupt-"), "{names:?}");
    assert_eq!(running.stop_with("TERM", TIMEOUT).0.code(), Some(0));
    // The shutdown wrote a fresh, valid snapshot.
    assert!(dir.path().join("state/broker.db").is_file());
}

#[test]
fn persistence_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("polyhub.toml"),
        "data_dir = \"state\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[mqtt.persistence]\nenabled = false\n",
    )
    .unwrap();
    let mut running =
        PolyhubProcess::start(polyhub(dir.path(), &["run", "--config", "polyhub.toml"]));
    let address = running.listening_address("MQTT");
    publish_retained(address, "a/b", b"x");
    assert_eq!(running.stop_with("TERM", TIMEOUT).0.code(), Some(0));
    assert!(!dir.path().join("state/broker.db").exists());
}
