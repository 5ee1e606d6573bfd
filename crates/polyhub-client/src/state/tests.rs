//! Unit tests of the state machine: requests and packets in, decoded packets, events and
//! waiter results out.

use bytes::{Bytes, BytesMut};
use polyhub_mqtt::{
    ConnAck, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, SubAck,
    SubscribeFilter, SubscriptionOptions, UnsubAck, decode,
};
use tokio::sync::oneshot;

use super::{Incoming, MqttState, Request, StateConfig};
use crate::client::{AckToken, Published};
use crate::error::{ClientError, StateError};
use crate::eventloop::Event;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

type Outcome<T> = oneshot::Receiver<Result<T, ClientError>>;

fn config(version: ProtocolVersion) -> StateConfig {
    StateConfig {
        version,
        inflight_limit: 10,
        pending_limit: 3,
        topic_alias_maximum: 4,
        manual_acks: false,
    }
}

fn connack(session_present: bool, properties: Properties) -> ConnAck {
    ConnAck {
        session_present,
        reason_code: ReasonCode::SUCCESS,
        properties,
    }
}

/// A state that has just connected to a broker without a session; the Connected event is
/// consumed.
fn online_with(config: StateConfig) -> MqttState {
    let mut state = MqttState::new(config);
    let mut out = BytesMut::new();
    state.connected(&connack(false, Properties::default()), &mut out);
    assert!(out.is_empty());
    assert!(matches!(state.next_event(), Some(Event::Connected { .. })));
    state
}

fn online(version: ProtocolVersion) -> MqttState {
    online_with(config(version))
}

/// Every packet in `out`, which is emptied.
fn written(out: &mut BytesMut, version: ProtocolVersion) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Some(packet) = decode(out, version, usize::MAX).expect("valid packet") {
        packets.push(packet);
    }
    assert!(out.is_empty(), "trailing bytes");
    packets
}

fn message(topic: &str, qos: QoS) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id: 0,
        payload: Bytes::from_static(b"payload"),
        properties: Properties::default(),
    }
}

/// Hand a publish to the state; returns the outcome receiver.
fn publish(state: &mut MqttState, out: &mut BytesMut, topic: &str, qos: QoS) -> Outcome<Published> {
    let (waiter, outcome) = oneshot::channel();
    state.handle_request(
        Request::Publish {
            publish: message(topic, qos),
            waiter: Some(waiter),
        },
        out,
    );
    outcome
}

fn subscribe(
    state: &mut MqttState,
    out: &mut BytesMut,
    filter: &str,
    qos: QoS,
) -> Outcome<Vec<ReasonCode>> {
    let (waiter, outcome) = oneshot::channel();
    state.handle_request(
        Request::Subscribe {
            filters: vec![SubscribeFilter {
                filter: filter.to_owned(),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
            waiter,
        },
        out,
    );
    outcome
}

fn unsubscribe(
    state: &mut MqttState,
    out: &mut BytesMut,
    filter: &str,
) -> Outcome<Vec<ReasonCode>> {
    let (waiter, outcome) = oneshot::channel();
    state.handle_request(
        Request::Unsubscribe {
            filters: vec![filter.to_owned()],
            properties: Properties::default(),
            waiter,
        },
        out,
    );
    outcome
}

fn handle(state: &mut MqttState, out: &mut BytesMut, packet: Packet) -> Incoming {
    state.handle_packet(packet, out).expect("valid packet")
}

fn published(packets: &[Packet]) -> Vec<(u16, bool, String)> {
    packets
        .iter()
        .map(|packet| match packet {
            Packet::Publish(publish) => (publish.packet_id, publish.dup, publish.topic.clone()),
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect()
}

fn single_publish_id(out: &mut BytesMut, version: ProtocolVersion) -> u16 {
    match written(out, version).as_slice() {
        [Packet::Publish(publish)] => publish.packet_id,
        other => panic!("expected one PUBLISH, got {other:?}"),
    }
}

fn pending<T>(outcome: &mut Outcome<T>) -> bool {
    matches!(outcome.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

// --- packet identifiers -------------------------------------------------------------------

#[test]
fn packet_ids_wrap_and_skip_ids_in_use() {
    let mut state = online_with(StateConfig {
        inflight_limit: 100,
        ..config(V311)
    });
    let mut out = BytesMut::new();
    state.next_packet_id = 65_533;
    let _first = publish(&mut state, &mut out, "a", QoS::AtLeastOnce); // 65533
    state.next_packet_id = 65_533;
    let _second = publish(&mut state, &mut out, "a", QoS::AtLeastOnce); // skips 65533
    let _third = publish(&mut state, &mut out, "a", QoS::AtLeastOnce); // 65535
    let _fourth = publish(&mut state, &mut out, "a", QoS::AtLeastOnce); // wraps past 0
    let ids: Vec<u16> = published(&written(&mut out, V311))
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, [65_533, 65_534, 65_535, 1]);

    // Ids are shared with SUBSCRIBE, and a freed id is handed out again only after a full turn.
    let _subscribed = subscribe(&mut state, &mut out, "s", QoS::AtMostOnce);
    match written(&mut out, V311).as_slice() {
        [Packet::Subscribe(subscribe)] => assert_eq!(subscribe.packet_id, 2),
        other => panic!("{other:?}"),
    }
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(65_534)),
    );
    state.next_packet_id = 65_534;
    let _fifth = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    assert_eq!(single_publish_id(&mut out, V311), 65_534);
}

#[test]
fn packet_ids_run_out_only_when_all_are_in_use() {
    let mut state = online_with(StateConfig {
        inflight_limit: u16::MAX,
        pending_limit: 0,
        ..config(V311)
    });
    let mut out = BytesMut::new();
    let mut outcomes = Vec::new();
    for _ in 0..u16::MAX {
        outcomes.push(subscribe(&mut state, &mut out, "s", QoS::AtMostOnce));
    }
    out.clear();
    let mut refused = subscribe(&mut state, &mut out, "s", QoS::AtMostOnce);
    assert_eq!(
        refused.try_recv().unwrap(),
        Err(ClientError::PacketIdsExhausted)
    );
    assert!(out.is_empty());
}

// --- outgoing QoS 1 and 2 -----------------------------------------------------------------

#[test]
fn qos0_publish_is_written_and_completes_at_once() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let mut outcome = publish(&mut state, &mut out, "t", QoS::AtMostOnce);
    assert_eq!(outcome.try_recv().unwrap(), Ok(Published::UNACKNOWLEDGED));
    assert_eq!(
        published(&written(&mut out, V311)),
        [(0, false, "t".into())]
    );
}

#[test]
fn qos1_publish_completes_on_puback() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let mut outcome = publish(&mut state, &mut out, "t", QoS::AtLeastOnce);
    let packet_id = single_publish_id(&mut out, V311);
    assert!(pending(&mut outcome));
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(packet_id)),
    );
    assert_eq!(
        outcome.try_recv().unwrap(),
        Ok(Published::acknowledged(ReasonCode::SUCCESS))
    );
    assert!(out.is_empty());
    assert!(state.outgoing.is_empty());
    assert_eq!(state.in_window, 0);
}

#[test]
fn qos2_publish_goes_through_pubrec_pubrel_pubcomp() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let mut outcome = publish(&mut state, &mut out, "t", QoS::ExactlyOnce);
    let packet_id = single_publish_id(&mut out, V311);

    // A PUBACK is not how QoS 2 completes.
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(packet_id)),
    );
    assert!(pending(&mut outcome));

    handle(
        &mut state,
        &mut out,
        Packet::PubRec(PubResponse::success(packet_id)),
    );
    assert_eq!(
        written(&mut out, V311),
        [Packet::PubRel(PubResponse::success(packet_id))]
    );
    assert!(pending(&mut outcome));

    // A repeated PUBREC (our PUBREL lost) is answered again.
    handle(
        &mut state,
        &mut out,
        Packet::PubRec(PubResponse::success(packet_id)),
    );
    assert_eq!(
        written(&mut out, V311),
        [Packet::PubRel(PubResponse::success(packet_id))]
    );

    handle(
        &mut state,
        &mut out,
        Packet::PubComp(PubResponse::success(packet_id)),
    );
    assert_eq!(
        outcome.try_recv().unwrap(),
        Ok(Published::acknowledged(ReasonCode::SUCCESS))
    );
    assert!(out.is_empty());
    assert!(state.outgoing.is_empty());
    assert_eq!(state.in_window, 0);
}

#[test]
fn v5_failure_codes_refuse_publishes() {
    let mut state = online(V5);
    let mut out = BytesMut::new();
    let mut qos1 = publish(&mut state, &mut out, "t", QoS::AtLeastOnce);
    let mut qos2 = publish(&mut state, &mut out, "t", QoS::ExactlyOnce);
    let ids: Vec<u16> = published(&written(&mut out, V5))
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();

    let mut refusal = PubResponse::success(ids[0]);
    refusal.reason_code = ReasonCode::NOT_AUTHORIZED;
    refusal.properties.reason_string = Some("no".into());
    handle(&mut state, &mut out, Packet::PubAck(refusal));
    assert_eq!(
        qos1.try_recv().unwrap(),
        Err(ClientError::PublishRefused {
            reason_code: ReasonCode::NOT_AUTHORIZED,
            reason_string: Some("no".into()),
        })
    );

    // A failed PUBREC ends the QoS 2 flow: no PUBREL.
    let mut refusal = PubResponse::success(ids[1]);
    refusal.reason_code = ReasonCode::QUOTA_EXCEEDED;
    handle(&mut state, &mut out, Packet::PubRec(refusal));
    assert!(out.is_empty());
    assert!(matches!(
        qos2.try_recv().unwrap(),
        Err(ClientError::PublishRefused {
            reason_code: ReasonCode::QUOTA_EXCEEDED,
            ..
        })
    ));
    assert!(state.outgoing.is_empty());

    // "No matching subscribers" is a success, and the outcome says so.
    let mut outcome = publish(&mut state, &mut out, "t", QoS::AtLeastOnce);
    let packet_id = single_publish_id(&mut out, V5);
    let mut ack = PubResponse::success(packet_id);
    ack.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    handle(&mut state, &mut out, Packet::PubAck(ack));
    let published = outcome.try_recv().unwrap().expect("a success");
    assert!(published.no_matching_subscribers());
    assert_eq!(
        published.reason_code(),
        Some(ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );

    // For QoS 2 the PUBREC says it, and the outcome (at PUBCOMP) still does.
    let mut outcome = publish(&mut state, &mut out, "t", QoS::ExactlyOnce);
    let packet_id = single_publish_id(&mut out, V5);
    let mut rec = PubResponse::success(packet_id);
    rec.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    handle(&mut state, &mut out, Packet::PubRec(rec));
    assert_eq!(
        written(&mut out, V5),
        [Packet::PubRel(PubResponse::success(packet_id))]
    );
    assert!(pending(&mut outcome));
    handle(
        &mut state,
        &mut out,
        Packet::PubComp(PubResponse::success(packet_id)),
    );
    assert!(
        outcome
            .try_recv()
            .unwrap()
            .expect("a success")
            .no_matching_subscribers()
    );

    // A plain success matched someone.
    let mut outcome = publish(&mut state, &mut out, "t", QoS::AtLeastOnce);
    let packet_id = single_publish_id(&mut out, V5);
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(packet_id)),
    );
    assert!(
        !outcome
            .try_recv()
            .unwrap()
            .expect("a success")
            .no_matching_subscribers()
    );
}

// --- incoming QoS 1 and 2 -----------------------------------------------------------------

fn incoming(packet_id: u16, qos: QoS, topic: &str) -> Packet {
    Packet::Publish(Publish {
        packet_id,
        ..message(topic, qos)
    })
}

fn next_message(state: &mut MqttState) -> Option<Publish> {
    match state.next_event() {
        Some(Event::Message(publish)) => Some(publish),
        None => None,
        Some(other) => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn incoming_qos0_and_qos1_are_delivered_and_qos1_acknowledged() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    handle(&mut state, &mut out, incoming(0, QoS::AtMostOnce, "zero"));
    assert!(out.is_empty());
    assert_eq!(next_message(&mut state).unwrap().topic, "zero");

    handle(&mut state, &mut out, incoming(7, QoS::AtLeastOnce, "one"));
    assert_eq!(
        written(&mut out, V311),
        [Packet::PubAck(PubResponse::success(7))]
    );
    assert_eq!(next_message(&mut state).unwrap().topic, "one");
}

#[test]
fn incoming_qos2_is_delivered_once_and_completed() {
    for version in [ProtocolVersion::V31, V311, V5] {
        let mut state = online(version);
        let mut out = BytesMut::new();
        handle(&mut state, &mut out, incoming(9, QoS::ExactlyOnce, "two"));
        assert_eq!(
            written(&mut out, version),
            [Packet::PubRec(PubResponse::success(9))]
        );
        assert_eq!(next_message(&mut state).unwrap().topic, "two");

        // The broker resends before our PUBREC reached it: answered, not delivered again.
        let Packet::Publish(mut again) = incoming(9, QoS::ExactlyOnce, "two") else {
            unreachable!()
        };
        again.dup = true;
        handle(&mut state, &mut out, Packet::Publish(again));
        assert_eq!(
            written(&mut out, version),
            [Packet::PubRec(PubResponse::success(9))]
        );
        assert!(next_message(&mut state).is_none());

        handle(
            &mut state,
            &mut out,
            Packet::PubRel(PubResponse::success(9)),
        );
        assert_eq!(
            written(&mut out, version),
            [Packet::PubComp(PubResponse::success(9))]
        );

        // After PUBREL the id is free: a new message under it is a new message.
        handle(
            &mut state,
            &mut out,
            incoming(9, QoS::ExactlyOnce, "two again"),
        );
        assert_eq!(next_message(&mut state).unwrap().topic, "two again");
    }
}

// --- acknowledgements for unknown identifiers ---------------------------------------------

#[test]
fn acks_for_unknown_ids_are_ignored_or_answered() {
    for version in [V311, V5] {
        let mut state = online(version);
        let mut out = BytesMut::new();
        let mut outcome = publish(&mut state, &mut out, "t", QoS::AtLeastOnce);
        let packet_id = single_publish_id(&mut out, version);
        let unknown = packet_id + 100;

        for ignored in [
            Packet::PubAck(PubResponse::success(unknown)),
            Packet::PubComp(PubResponse::success(unknown)),
            // PUBCOMP for a QoS 1 publish in flight: not its flow.
            Packet::PubComp(PubResponse::success(packet_id)),
            Packet::SubAck(SubAck {
                packet_id: unknown,
                reason_codes: vec![ReasonCode::GRANTED_QOS_0],
                properties: Properties::default(),
            }),
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes: Vec::new(),
                properties: Properties::default(),
            }),
        ] {
            assert_eq!(handle(&mut state, &mut out, ignored), Incoming::Handled);
            assert!(out.is_empty());
        }
        assert!(pending(&mut outcome), "the publish in flight is untouched");

        let mut not_found = PubResponse::success(unknown);
        if version.is_v5() {
            not_found.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        handle(
            &mut state,
            &mut out,
            Packet::PubRec(PubResponse::success(unknown)),
        );
        assert_eq!(
            written(&mut out, version),
            [Packet::PubRel(not_found.clone())]
        );
        handle(
            &mut state,
            &mut out,
            Packet::PubRel(PubResponse::success(unknown)),
        );
        assert_eq!(written(&mut out, version), [Packet::PubComp(not_found)]);

        handle(
            &mut state,
            &mut out,
            Packet::PubAck(PubResponse::success(packet_id)),
        );
        assert_eq!(
            outcome.try_recv().unwrap(),
            Ok(Published::acknowledged(ReasonCode::SUCCESS))
        );
    }
}

#[test]
fn packets_a_server_never_sends_are_protocol_errors() {
    let mut state = online(V5);
    let mut out = BytesMut::new();
    let second_connack = Packet::ConnAck(connack(false, Properties::default()));
    assert_eq!(
        state.handle_packet(second_connack, &mut out),
        Err(StateError::UnexpectedPacket(2))
    );
    assert_eq!(
        state.handle_packet(Packet::PingReq, &mut out),
        Err(StateError::UnexpectedPacket(12))
    );
    assert_eq!(
        state.handle_packet(Packet::PingResp, &mut out),
        Ok(Incoming::PingResp)
    );
}

// --- flow control -------------------------------------------------------------------------

#[test]
fn send_window_follows_the_inflight_limit() {
    let mut state = online_with(StateConfig {
        inflight_limit: 2,
        ..config(V311)
    });
    let mut out = BytesMut::new();
    let _a = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let _b = publish(&mut state, &mut out, "b", QoS::ExactlyOnce);
    let _c = publish(&mut state, &mut out, "c", QoS::AtLeastOnce);
    // QoS 0 needs no window space, and is not held back.
    let _d = publish(&mut state, &mut out, "d", QoS::AtMostOnce);
    let sent = published(&written(&mut out, V311));
    assert_eq!(
        sent.iter()
            .map(|(_, _, topic)| topic.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "d"]
    );
    assert_eq!(state.pending.len(), 1);

    // PUBREC does not free the slot; PUBCOMP does.
    let b_id = sent[1].0;
    handle(
        &mut state,
        &mut out,
        Packet::PubRec(PubResponse::success(b_id)),
    );
    assert_eq!(written(&mut out, V311).len(), 1, "only the PUBREL");
    handle(
        &mut state,
        &mut out,
        Packet::PubComp(PubResponse::success(b_id)),
    );
    assert_eq!(
        published(&written(&mut out, V311))
            .into_iter()
            .map(|(_, _, topic)| topic)
            .collect::<Vec<_>>(),
        ["c"]
    );
}

#[test]
fn send_window_follows_the_brokers_receive_maximum() {
    let mut state = MqttState::new(config(V5));
    let mut out = BytesMut::new();
    let limits = Properties {
        receive_maximum: Some(1),
        ..Properties::default()
    };
    state.connected(&connack(false, limits), &mut out);
    let _a = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let _b = publish(&mut state, &mut out, "b", QoS::AtLeastOnce);
    let a_id = single_publish_id(&mut out, V5);
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(a_id)),
    );
    let sent = published(&written(&mut out, V5));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].2, "b");
}

#[test]
fn online_backpressure_stops_taking_requests_when_pending_is_full() {
    let mut state = online_with(StateConfig {
        inflight_limit: 1,
        pending_limit: 2,
        ..config(V311)
    });
    let mut out = BytesMut::new();
    let _in_flight = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let _p1 = publish(&mut state, &mut out, "b", QoS::AtLeastOnce);
    assert!(state.accepts_requests());
    let _p2 = publish(&mut state, &mut out, "c", QoS::AtLeastOnce);
    assert!(!state.accepts_requests());
}

#[test]
fn broker_limits_refuse_what_it_cannot_take() {
    let mut state = MqttState::new(config(V5));
    let mut out = BytesMut::new();
    let limits = Properties {
        maximum_packet_size: Some(64),
        maximum_qos: Some(1),
        retain_available: Some(0),
        ..Properties::default()
    };
    state.connected(&connack(false, limits), &mut out);

    let (waiter, mut outcome) = oneshot::channel();
    let mut big = message("t", QoS::AtLeastOnce);
    big.payload = Bytes::from(vec![0u8; 100]);
    state.handle_request(
        Request::Publish {
            publish: big,
            waiter: Some(waiter),
        },
        &mut out,
    );
    assert!(matches!(
        outcome.try_recv().unwrap(),
        Err(ClientError::PacketTooLarge { max: 64, .. })
    ));
    assert!(out.is_empty(), "nothing of the refused packet is written");
    assert!(state.outgoing.is_empty(), "its packet id is free again");

    let mut qos2 = publish(&mut state, &mut out, "t", QoS::ExactlyOnce);
    assert_eq!(
        qos2.try_recv().unwrap(),
        Err(ClientError::QoSNotSupported {
            requested: QoS::ExactlyOnce,
            maximum: QoS::AtLeastOnce,
        })
    );

    let (waiter, mut retained) = oneshot::channel();
    let mut retain = message("t", QoS::AtMostOnce);
    retain.retain = true;
    state.handle_request(
        Request::Publish {
            publish: retain,
            waiter: Some(waiter),
        },
        &mut out,
    );
    assert_eq!(
        retained.try_recv().unwrap(),
        Err(ClientError::RetainNotSupported)
    );
    assert!(out.is_empty());
}

// --- offline, reconnect, resubscribe ------------------------------------------------------

#[test]
fn offline_publishes_wait_up_to_the_limit_and_go_out_in_order_on_connect() {
    let mut state = MqttState::new(config(V311));
    let mut out = BytesMut::new();
    let _a = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let mut b = publish(&mut state, &mut out, "b", QoS::AtMostOnce);
    let _c = publish(&mut state, &mut out, "c", QoS::ExactlyOnce);
    let mut refused = publish(&mut state, &mut out, "d", QoS::AtLeastOnce);
    assert!(out.is_empty());
    assert!(
        state.accepts_requests(),
        "offline, requests are still answered"
    );
    assert_eq!(
        refused.try_recv().unwrap(),
        Err(ClientError::OfflineQueueFull { limit: 3 })
    );
    assert!(pending(&mut b));

    state.connected(&connack(false, Properties::default()), &mut out);
    let sent = published(&written(&mut out, V311));
    assert_eq!(
        sent.iter()
            .map(|(_, dup, topic)| (*dup, topic.as_str()))
            .collect::<Vec<_>>(),
        [(false, "a"), (false, "b"), (false, "c")]
    );
    assert_eq!(b.try_recv().unwrap(), Ok(Published::UNACKNOWLEDGED));
}

#[test]
fn reconnect_resends_unacknowledged_publishes_with_dup_and_the_same_ids() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let _first = publish(&mut state, &mut out, "first", QoS::AtLeastOnce);
    let mut released = publish(&mut state, &mut out, "released", QoS::ExactlyOnce);
    let _second = publish(&mut state, &mut out, "second", QoS::ExactlyOnce);
    let sent = published(&written(&mut out, V311));
    let released_id = sent[1].0;
    handle(
        &mut state,
        &mut out,
        Packet::PubRec(PubResponse::success(released_id)),
    );
    out.clear();

    state.connection_lost();
    state.connected(&connack(true, Properties::default()), &mut out);
    let packets = written(&mut out, V311);
    assert_eq!(
        packets,
        [
            Packet::PubRel(PubResponse::success(released_id)),
            Packet::Publish(Publish {
                dup: true,
                packet_id: sent[0].0,
                ..message("first", QoS::AtLeastOnce)
            }),
            Packet::Publish(Publish {
                dup: true,
                packet_id: sent[2].0,
                ..message("second", QoS::ExactlyOnce)
            }),
        ]
    );
    assert!(pending(&mut released));

    // Without the session the broker already owns the released message: it is complete.
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    assert_eq!(
        released.try_recv().unwrap(),
        Ok(Published::acknowledged(ReasonCode::SUCCESS))
    );
    let resent = published(&written(&mut out, V311));
    assert_eq!(resent.len(), 2);
    assert!(resent.iter().all(|(_, dup, _)| *dup));
}

#[test]
fn resends_respect_the_window_of_the_new_connection() {
    let mut state = online(V5);
    let mut out = BytesMut::new();
    let _a = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let _b = publish(&mut state, &mut out, "b", QoS::AtLeastOnce);
    let ids: Vec<u16> = published(&written(&mut out, V5))
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    state.connection_lost();
    let limits = Properties {
        receive_maximum: Some(1),
        ..Properties::default()
    };
    state.connected(&connack(true, limits), &mut out);
    assert_eq!(
        published(&written(&mut out, V5)),
        [(ids[0], true, "a".into())]
    );
    handle(
        &mut state,
        &mut out,
        Packet::PubAck(PubResponse::success(ids[0])),
    );
    assert_eq!(
        published(&written(&mut out, V5)),
        [(ids[1], true, "b".into())]
    );
}

fn suback(packet_id: u16, codes: &[ReasonCode]) -> Packet {
    Packet::SubAck(SubAck {
        packet_id,
        reason_codes: codes.to_vec(),
        properties: Properties::default(),
    })
}

fn single_subscribe(out: &mut BytesMut, version: ProtocolVersion) -> polyhub_mqtt::Subscribe {
    match written(out, version).as_slice() {
        [Packet::Subscribe(subscribe)] => subscribe.clone(),
        other => panic!("expected one SUBSCRIBE, got {other:?}"),
    }
}

#[test]
fn granted_subscriptions_are_renewed_when_the_session_is_lost() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let mut outcome = subscribe(&mut state, &mut out, "a/#", QoS::ExactlyOnce);
    let sent = single_subscribe(&mut out, V311);
    // Granted with a lower QoS.
    handle(
        &mut state,
        &mut out,
        suback(sent.packet_id, &[ReasonCode::GRANTED_QOS_1]),
    );
    assert_eq!(
        outcome.try_recv().unwrap(),
        Ok(vec![ReasonCode::GRANTED_QOS_1])
    );

    let mut refused = subscribe(&mut state, &mut out, "forbidden", QoS::AtMostOnce);
    let sent = single_subscribe(&mut out, V311);
    handle(
        &mut state,
        &mut out,
        suback(sent.packet_id, &[ReasonCode::UNSPECIFIED_ERROR]),
    );
    assert_eq!(
        refused.try_recv().unwrap(),
        Ok(vec![ReasonCode::UNSPECIFIED_ERROR])
    );

    // The session survived: nothing to renew.
    state.connection_lost();
    state.connected(&connack(true, Properties::default()), &mut out);
    assert!(out.is_empty());

    // It did not: the granted subscription (only) is made again, with the granted QoS.
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    let renewed = single_subscribe(&mut out, V311);
    assert_eq!(
        renewed.filters,
        [SubscribeFilter {
            filter: "a/#".into(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        }]
    );

    // If the broker now refuses it, the application hears of it and it is forgotten.
    assert!(matches!(state.next_event(), Some(Event::Connected { .. })));
    assert!(matches!(state.next_event(), Some(Event::Connected { .. })));
    handle(
        &mut state,
        &mut out,
        suback(renewed.packet_id, &[ReasonCode::NOT_AUTHORIZED]),
    );
    match state.next_event() {
        Some(Event::ResubscribeFailed {
            filter,
            reason_code,
        }) => {
            assert_eq!(filter, "a/#");
            assert_eq!(reason_code, ReasonCode::NOT_AUTHORIZED);
        }
        other => panic!("{other:?}"),
    }
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    assert!(out.is_empty());
}

#[test]
fn unsubscribed_filters_are_not_renewed() {
    let mut state = online(V311);
    let mut out = BytesMut::new();
    let _outcome = subscribe(&mut state, &mut out, "a", QoS::AtMostOnce);
    let sent = single_subscribe(&mut out, V311);
    handle(
        &mut state,
        &mut out,
        suback(sent.packet_id, &[ReasonCode::GRANTED_QOS_0]),
    );

    let mut removed = unsubscribe(&mut state, &mut out, "a");
    let packet_id = match written(&mut out, V311).as_slice() {
        [Packet::Unsubscribe(unsubscribe)] => unsubscribe.packet_id,
        other => panic!("{other:?}"),
    };
    // The connection drops before UNSUBACK: the UNSUBSCRIBE is sent again, the filter is not.
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    match written(&mut out, V311).as_slice() {
        [Packet::Unsubscribe(unsubscribe)] => assert_eq!(unsubscribe.packet_id, packet_id),
        other => panic!("{other:?}"),
    }
    handle(
        &mut state,
        &mut out,
        Packet::UnsubAck(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: Properties::default(),
        }),
    );
    assert_eq!(removed.try_recv().unwrap(), Ok(vec![ReasonCode::SUCCESS]));
}

#[test]
fn subscriptions_made_offline_are_sent_on_connect() {
    let mut state = MqttState::new(config(V5));
    let mut out = BytesMut::new();
    let mut outcome = subscribe(&mut state, &mut out, "later", QoS::AtLeastOnce);
    assert!(out.is_empty());
    state.connected(&connack(false, Properties::default()), &mut out);
    let sent = single_subscribe(&mut out, V5);
    assert_eq!(sent.filters[0].filter, "later");
    handle(
        &mut state,
        &mut out,
        suback(sent.packet_id, &[ReasonCode::GRANTED_QOS_1]),
    );
    assert_eq!(
        outcome.try_recv().unwrap(),
        Ok(vec![ReasonCode::GRANTED_QOS_1])
    );
}

#[test]
fn subscription_identifiers_are_kept_for_renewal() {
    let mut state = online(V5);
    let mut out = BytesMut::new();
    let (waiter, _outcome) = oneshot::channel();
    state.handle_request(
        Request::Subscribe {
            filters: vec![SubscribeFilter {
                filter: "with/id".into(),
                options: SubscriptionOptions::default(),
            }],
            properties: Properties {
                subscription_identifiers: vec![42],
                ..Properties::default()
            },
            waiter,
        },
        &mut out,
    );
    let sent = single_subscribe(&mut out, V5);
    handle(
        &mut state,
        &mut out,
        suback(sent.packet_id, &[ReasonCode::GRANTED_QOS_0]),
    );
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    let renewed = single_subscribe(&mut out, V5);
    assert_eq!(renewed.properties.subscription_identifiers, [42]);
}

// --- topic aliases ------------------------------------------------------------------------

fn aliased(topic: &str, alias: u16) -> Packet {
    let Packet::Publish(mut publish) = incoming(0, QoS::AtMostOnce, topic) else {
        unreachable!()
    };
    publish.properties.topic_alias = Some(alias);
    Packet::Publish(publish)
}

#[test]
fn inbound_topic_aliases_are_resolved() {
    let mut state = online(V5);
    let mut out = BytesMut::new();
    handle(&mut state, &mut out, aliased("sensors/a", 4));
    assert_eq!(next_message(&mut state).unwrap().topic, "sensors/a");
    handle(&mut state, &mut out, aliased("", 4));
    assert_eq!(next_message(&mut state).unwrap().topic, "sensors/a");
    // Redefined.
    handle(&mut state, &mut out, aliased("sensors/b", 4));
    handle(&mut state, &mut out, aliased("", 4));
    next_message(&mut state);
    assert_eq!(next_message(&mut state).unwrap().topic, "sensors/b");

    assert_eq!(
        state.handle_packet(aliased("", 1), &mut out),
        Err(StateError::UnknownTopicAlias(1))
    );
    assert_eq!(
        state.handle_packet(aliased("x", 5), &mut out),
        Err(StateError::TopicAliasOutOfRange(5))
    );
    assert_eq!(
        state.handle_packet(aliased("x", 0), &mut out),
        Err(StateError::TopicAliasOutOfRange(0))
    );
    assert_eq!(
        state.handle_packet(incoming(0, QoS::AtMostOnce, ""), &mut out),
        Err(StateError::MissingTopic)
    );

    // Aliases belong to one connection.
    state.connection_lost();
    state.connected(&connack(false, Properties::default()), &mut out);
    assert_eq!(
        state.handle_packet(aliased("", 4), &mut out),
        Err(StateError::UnknownTopicAlias(4))
    );
}

// --- shutting down ------------------------------------------------------------------------

#[test]
fn shutting_down_fails_every_waiter_with_closed() {
    let mut state = online_with(StateConfig {
        inflight_limit: 1,
        ..config(V311)
    });
    let mut out = BytesMut::new();
    let mut in_flight = publish(&mut state, &mut out, "a", QoS::AtLeastOnce);
    let mut waiting = publish(&mut state, &mut out, "b", QoS::AtLeastOnce);
    let mut subscribing = subscribe(&mut state, &mut out, "s", QoS::AtMostOnce);
    state.shut_down();
    for closed in [in_flight.try_recv(), waiting.try_recv()] {
        assert_eq!(closed, Err(oneshot::error::TryRecvError::Closed));
    }
    assert_eq!(
        subscribing.try_recv(),
        Err(oneshot::error::TryRecvError::Closed)
    );
}

// --- manual acknowledgements ------------------------------------------------------------

fn manual(version: ProtocolVersion) -> MqttState {
    online_with(StateConfig {
        manual_acks: true,
        ..config(version)
    })
}

/// The next event, which must be a message, with its token.
fn next_message_with_ack(state: &mut MqttState) -> (Publish, Option<AckToken>) {
    match state.next_event_with_ack() {
        Some((Event::Message(publish), token)) => (publish, token),
        other => panic!("expected a message, got {other:?}"),
    }
}

fn ack(state: &mut MqttState, out: &mut BytesMut, tokens: &[AckToken]) {
    state.handle_request(
        Request::Ack {
            tokens: tokens.to_vec(),
        },
        out,
    );
}

#[test]
fn manual_acks_hold_puback_until_the_application_acks() {
    let mut state = manual(V311);
    let mut out = BytesMut::new();
    handle(&mut state, &mut out, incoming(0, QoS::AtMostOnce, "zero"));
    let (_, token) = next_message_with_ack(&mut state);
    assert!(token.is_none(), "QoS 0 needs no acknowledgement");

    handle(&mut state, &mut out, incoming(7, QoS::AtLeastOnce, "one"));
    handle(&mut state, &mut out, incoming(8, QoS::AtLeastOnce, "two"));
    assert!(out.is_empty(), "nothing acknowledged on receipt");
    let (_, first) = next_message_with_ack(&mut state);
    let (_, second) = next_message_with_ack(&mut state);
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!((first.packet_id(), first.qos()), (7, QoS::AtLeastOnce));

    // Out of order, and twice: the second acknowledgement of a token does nothing.
    ack(&mut state, &mut out, &[second, second]);
    assert_eq!(
        written(&mut out, V311),
        [Packet::PubAck(PubResponse::success(8))]
    );
    ack(&mut state, &mut out, &[first]);
    assert_eq!(
        written(&mut out, V311),
        [Packet::PubAck(PubResponse::success(7))]
    );
}

#[test]
fn manual_acks_of_qos2_send_pubrec_then_complete_on_pubrel() {
    let mut state = manual(V5);
    let mut out = BytesMut::new();
    handle(&mut state, &mut out, incoming(9, QoS::ExactlyOnce, "two"));
    assert!(out.is_empty());
    let (_, token) = next_message_with_ack(&mut state);

    // A resend on the same connection while the application holds it: not delivered twice.
    let Packet::Publish(mut again) = incoming(9, QoS::ExactlyOnce, "two") else {
        unreachable!()
    };
    again.dup = true;
    handle(&mut state, &mut out, Packet::Publish(again.clone()));
    assert!(out.is_empty());
    assert!(state.next_event_with_ack().is_none());

    ack(&mut state, &mut out, &[token.unwrap()]);
    assert_eq!(
        written(&mut out, V5),
        [Packet::PubRec(PubResponse::success(9))]
    );
    // After PUBREC a resend is answered (the broker may have missed it), not delivered.
    handle(&mut state, &mut out, Packet::Publish(again));
    assert_eq!(
        written(&mut out, V5),
        [Packet::PubRec(PubResponse::success(9))]
    );
    assert!(state.next_event_with_ack().is_none());
    handle(
        &mut state,
        &mut out,
        Packet::PubRel(PubResponse::success(9)),
    );
    assert_eq!(
        written(&mut out, V5),
        [Packet::PubComp(PubResponse::success(9))]
    );
}

#[test]
fn tokens_of_an_earlier_connection_are_stale() {
    let mut state = manual(V5);
    let mut out = BytesMut::new();
    handle(&mut state, &mut out, incoming(3, QoS::AtLeastOnce, "a"));
    let (_, old) = next_message_with_ack(&mut state);
    let old = old.unwrap();

    state.connection_lost();
    // Offline: nothing to send it on, and nothing is kept for later.
    ack(&mut state, &mut out, &[old]);
    assert!(out.is_empty());

    state.connected(&connack(true, Properties::default()), &mut out);
    assert!(matches!(state.next_event(), Some(Event::Connected { .. })));
    // The broker redelivers the same message with the same id: a new token.
    let Packet::Publish(mut again) = incoming(3, QoS::AtLeastOnce, "a") else {
        unreachable!()
    };
    again.dup = true;
    handle(&mut state, &mut out, Packet::Publish(again));
    let (redelivered, new) = next_message_with_ack(&mut state);
    assert!(redelivered.dup);
    let new = new.unwrap();
    assert_ne!(new, old);

    // The stale token acknowledges nothing, even though the packet id matches.
    ack(&mut state, &mut out, &[old]);
    assert!(out.is_empty());
    ack(&mut state, &mut out, &[new]);
    assert_eq!(
        written(&mut out, V5),
        [Packet::PubAck(PubResponse::success(3))]
    );
}
