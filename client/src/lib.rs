//! Rust client for the Switchyard broker.
//!
//! # Layout
//! - [`producer`]: [`Producer`] — batches records by size and linger, pipelines
//!   batches on one stream, retries what can be retried.
//! - [`subscriber`]: [`Subscriber`] — many subscriptions on one stream, one
//!   dispatcher task for all of them, automatic reconnect that resumes every
//!   subscription from the last record it delivered.
//! - [`reader`]: [`Client`] — fetch history, topic info, health.
//! - [`error`]: the error type, [`ClientError`].
//!
//! ```no_run
//! use switchyard_client::{Producer, ProducerConfig, Record, Start, Subscriber, SubscriberEvent};
//!
//! # async fn example() -> Result<(), switchyard_client::ClientError> {
//! let producer = Producer::connect("http://127.0.0.1:7400", ProducerConfig::default()).await?;
//! let position = producer
//!     .publish(Record::new("guild.1", r#"{"content":"hi"}"#).header("type", "MESSAGE_CREATE"))
//!     .await?;
//!
//! let mut subscriber = Subscriber::connect("http://127.0.0.1:7400").await?;
//! subscriber.subscribe(1, "guild.1", Start::Earliest).await?;
//! while let Some(event) = subscriber.next().await {
//!     if let SubscriberEvent::Delivery(delivery) = event {
//!         println!("{} #{}: {:?}", delivery.topic, delivery.offset, delivery.payload);
//!     }
//! }
//! # let _ = position;
//! # Ok(())
//! # }
//! ```

mod codec;
pub mod error;
pub mod producer;
pub mod reader;
pub mod subscriber;

pub use error::ClientError;
pub use producer::{Ack, PendingBatch, PendingPosition, Producer, ProducerConfig, Record};
pub use reader::{Client, TopicInfo};
pub use subscriber::{Delivery, Position, Start, Subscriber, SubscriberEvent};
pub use switchyard_proto as proto;
pub use switchyard_proto::{SubscriptionIds, Topic};

use std::time::Duration;
use switchyard_proto::broker_client::BrokerClient;

use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message the client sends or accepts (matches the broker's).
pub const MAX_MESSAGE_BYTES: usize = 20 << 20;

/// Connects to a broker at `address` (e.g. `http://127.0.0.1:7400`).
pub(crate) async fn connect(address: &str) -> Result<BrokerClient<Channel>, ClientError> {
    Ok(BrokerClient::new(connect_channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// [`connect`] for the calls made with the client's own codecs (`codec`).
pub(crate) async fn connect_grpc(address: &str) -> Result<Grpc<Channel>, ClientError> {
    Ok(Grpc::new(connect_channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

async fn connect_channel(address: &str) -> Result<Channel, ClientError> {
    let endpoint =
        Endpoint::from_shared(address.to_owned()).map_err(|e| ClientError::InvalidAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
    // Pings find a broker that vanished without closing the connection.
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .max_frame_size(switchyard_proto::MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await?)
}
