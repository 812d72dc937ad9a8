//! The gRPC server: the `switchyard.v1.Broker` service over a [`Store`].
//!
//! # Layout
//! - [`service`]: the service's handlers and the server's limits.
//! - [`hub`]: which streams follow which topics; the live tail (the store's append
//!   observer), metered per stream.
//! - [`metrics`]: the Prometheus `/metrics` and `/health` endpoint.
//! - [`subscribe`]: one subscriber stream: replay joined to the live tail, batching.
//! - [`convert`]: wire types ↔ storage types (the only place `pb::` meets storage).
//! - [`status`]: storage errors → gRPC statuses.

pub mod convert;
pub mod hub;
pub mod metrics;
pub mod service;
pub mod status;
pub mod subscribe;

use std::future::Future;

use switchyard_proto::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::storage::Store;

pub use service::{AlreadyServed, BrokerService, ServerConfig};

/// Largest gRPC message accepted or sent: a publish batch may hold 16 MiB of records,
/// plus framing.
pub const MAX_MESSAGE_BYTES: usize = 20 << 20;

/// Completes once `stopping` turns true, or once nothing can set it any more (the
/// server is gone).
pub(crate) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        if stopping.changed().await.is_err() {
            return;
        }
    }
}

/// HTTP/2 pings find peers that vanished without closing their connection.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Accepted connections, with Nagle's algorithm off: deliveries are small writes
/// that must leave at once (with it on, they wait for the peer's delayed ACK, ~40 ms).
fn accept(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|socket| {
            if let Err(error) = socket.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        })
    })
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    AlreadyServed(#[from] AlreadyServed),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the broker API on `listener` (and, when given, Prometheus metrics on
/// `metrics`) until `shutdown` completes; then stops taking requests, ends subscriber
/// and publish streams (subscribers get UNAVAILABLE and resume from their last
/// positions) and lets unary calls in progress finish. The store is not closed: the
/// caller owns it.
pub async fn run(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    store: Store,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr().ok();
    tracing::info!(?address, "serving gRPC");
    let service = BrokerService::new(store.clone(), config)?;
    // Long-lived streams end when shutdown begins; otherwise the graceful stop would
    // wait for them forever.
    let stopping = service.stopping_sender();
    let stopping_receiver = stopping.subscribe();
    let metrics_task = metrics.map(|listener| {
        let source = metrics::MetricsSource {
            store,
            hub: service.hub_stats(),
            filters: service.config().filters.clone(),
        };
        let mut stop = stopping.subscribe();
        tokio::spawn(async move {
            metrics::serve(listener, source, async move { stopped(&mut stop).await }).await
        })
    });
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams");
        let _ = stopping.send(true);
    };
    let mut grace = stopping_receiver;
    let grace_period = service.config().shutdown_grace;
    let service = BrokerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_frame_size(switchyard_proto::MAX_FRAME_BYTES)
        .add_service(service)
        .serve_with_incoming_shutdown(accept(listener), shutdown);
    // Streams end on their own at shutdown; a connection that still does not close
    // (a peer that stopped reading) is dropped after the grace period.
    let served = tokio::select! {
        served = serving => served,
        () = async {
            stopped(&mut grace).await;
            tokio::time::sleep(grace_period).await;
        } => {
            tracing::warn!(grace = ?grace_period, "connections did not close in time; dropping them");
            Ok(())
        }
    };
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served?;
    Ok(())
}
