//! Switchyard's gRPC API, `switchyard.v1`: the messages, the `Broker` service's
//! client (`broker_client::BrokerClient`) and server (`broker_server`) generated from
//! `proto/switchyard/v1/broker.proto`. The semantics are in `docs/protocol.md`.
//!
//! Payloads are `bytes::Bytes`, so records pass from the wire to storage and back
//! without copies.
//!
//! The record path is written by hand, with the same bytes on the wire (see
//! `docs/protocol.md`, Encoding): [`DeliveryBatch`] and [`DeliveryWriter`] (batch.rs),
//! [`PublishRequest`], [`PublishWriter`] and [`EncodedPublishRequest`]
//! (publish.rs), and [`read_deliveries`] (read.rs).

#![allow(missing_debug_implementations)]

/// The `switchyard.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
    tonic::include_proto!("switchyard.v1");
}

pub use v1::*;

mod batch;
mod publish;
mod read;
mod wire;
pub use batch::{DeliveryBatch, DeliveryFields, DeliveryWriter};
pub use publish::{
    EncodedPublishRequest, PublishRecord, PublishRecords, PublishRequest, PublishWriter,
};
pub use read::{ReceivedDelivery, SubscriptionIds, Topic, read_deliveries, read_deliveries_as};
pub use wire::WireError;

/// Largest HTTP/2 frame each side accepts (`SETTINGS_MAX_FRAME_SIZE`; the broker's
/// server and the client both advertise it). At HTTP/2's default of 16 KiB, a batch
/// of 1,000 100-byte records (~120 KB) leaves in eight frames, each its own `writev`
/// and each waking the reader on the other side; in one frame it is one write and
/// one wake-up. Frames of different streams on a connection take turns whole, so
/// this also bounds how long one stream's batch holds the others back (1 MiB: at
/// most about a millisecond on loopback). The cost: a reader reserves room for a
/// whole frame once its header has arrived, so a peer can make a connection hold up
/// to 1 MiB instead of 16 KiB.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn publish_request_round_trips_with_bytes_payloads() {
        let request = PublishRequest {
            request_id: 7,
            records: vec![PublishRecord {
                topic: "guild.1".into(),
                headers: vec![Header {
                    key: "type".into(),
                    value: "MESSAGE_CREATE".into(),
                }],
                payload: prost::bytes::Bytes::from_static(b"{}"),
            }],
            ack: AckLevel::Durable as i32,
            want_position_runs: false,
        };
        let decoded = PublishRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(decoded.ack(), AckLevel::Durable);
    }

    #[test]
    fn start_positions_and_updates_are_oneofs() {
        let add = SubscribeRequest {
            command: Some(subscribe_request::Command::Add(Subscription {
                id: 1,
                topic: "user.2".into(),
                start: Some(StartPosition {
                    start: Some(start_position::Start::Resume(Position {
                        offset: 10,
                        epoch: 3,
                    })),
                }),
                filter: String::new(),
                context: [("roles".to_owned(), "1,2".to_owned())].into(),
            })),
        };
        let decoded = SubscribeRequest::decode(add.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, add);
    }
}
