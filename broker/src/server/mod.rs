//! The gRPC server: the `switchyard.v1.Broker` service over a [`Store`].
//!
//! # Layout
//! - [`service`]: the service's handlers.
//! - [`convert`]: wire types ↔ storage types (the only place `pb::` meets storage).
//! - [`status`]: storage errors → gRPC statuses.

pub mod convert;
pub mod service;
pub mod status;

use std::future::Future;

use switchyard_proto::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::storage::Store;

pub use service::BrokerService;

/// Largest gRPC message accepted or sent: a publish batch may hold 16 MiB of records,
/// plus framing.
pub const MAX_MESSAGE_BYTES: usize = 20 << 20;

/// Serves the broker API on `listener` until `shutdown` completes, then stops taking
/// requests and lets those in progress finish. The store is not closed: the caller
/// owns it.
pub async fn run(
    listener: TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let address = listener.local_addr().ok();
    tracing::info!(?address, "serving gRPC");
    let service = BrokerServer::new(BrokerService::new(store))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
