//! The `switchyard.v1.Broker` service over a [`Store`].

use std::pin::Pin;
use std::sync::Arc;

use switchyard_proto as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::filter::{FilterLimits, FilterSet};
use crate::server::convert;
use crate::server::hub::{HubStats, SubscriptionHub};
use crate::server::status::{append_code, append_status, read_status};
use crate::server::subscribe::{self, StreamChannels, StreamLimits};
use crate::storage::{AppendError, ReadLimits, Store};

/// Publish requests of one PublishStream that may wait for their acknowledgement at
/// once; past it the stream stops reading requests (back-pressure to the producer).
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 1024;
/// Most records one Fetch returns.
pub const MAX_FETCH_RECORDS: usize = 10_000;
/// Most payload bytes one Fetch returns (and its default).
pub const MAX_FETCH_BYTES: usize = 4 << 20;

/// Limits of the server (defaults in [`ServerConfig::default`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bytes of deliveries that may wait for one subscriber stream before it is cut
    /// off as a slow consumer.
    pub max_pending_bytes_per_stream: usize,
    /// Subscriber streams served at once.
    pub max_streams: usize,
    /// Subscriptions one stream may hold.
    pub max_subscriptions_per_stream: usize,
    /// How long a shutdown waits for connections to close before dropping them.
    pub shutdown_grace: std::time::Duration,
    /// The delivery filters subscriptions may name.
    pub filters: Arc<FilterSet>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_pending_bytes_per_stream: 8 << 20,
            max_streams: 10_000,
            max_subscriptions_per_stream: 1_000_000,
            shutdown_grace: std::time::Duration::from_secs(10),
            filters: Arc::new(FilterSet::empty(FilterLimits::default())),
        }
    }
}

/// Responses buffered per subscriber stream before gRPC flow control holds them.
const SUBSCRIBE_OUT_BUFFER: usize = 16;

/// Serves the broker API from a store.
#[derive(Debug, Clone)]
pub struct BrokerService {
    store: Store,
    hub: Arc<SubscriptionHub>,
    config: ServerConfig,
    /// Becomes true when the server begins to shut down; streams end then.
    stopping: watch::Sender<bool>,
}

impl BrokerService {
    /// A service over `store`; it becomes the store's append observer, which a store
    /// has at most one of.
    pub fn new(store: Store, config: ServerConfig) -> Result<Self, AlreadyServed> {
        let hub = Arc::new(SubscriptionHub::new(
            store.shard_count(),
            config.max_pending_bytes_per_stream,
            config.max_streams,
        ));
        store
            .set_append_observer(hub.clone())
            .map_err(|_| AlreadyServed)?;
        let (stopping, _) = watch::channel(false);
        Ok(BrokerService {
            store,
            hub,
            config,
            stopping,
        })
    }

    /// Set to true to end every stream (the server does when shutdown begins).
    pub fn stopping_sender(&self) -> watch::Sender<bool> {
        self.stopping.clone()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Counters of the subscriptions.
    pub fn hub_stats(&self) -> Arc<HubStats> {
        self.hub.stats().clone()
    }
}

/// A store can feed one service's subscriptions only.
#[derive(Debug, thiserror::Error)]
#[error("this store already feeds a broker service")]
pub struct AlreadyServed;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn refused(request_id: u64, error: &AppendError) -> pb::PublishResponse {
    pb::PublishResponse {
        request_id,
        error: Some(pb::Error {
            code: append_code(error) as i32,
            message: error.to_string(),
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let request = request.into_inner();
        let (request_id, runs) = (request.request_id, request.want_position_runs);
        let (records, ack) = convert::publish_request(request);
        let appended = self
            .store
            .append_async(records, ack)
            .await
            .map_err(|e| append_status(&e))?;
        Ok(Response::new(convert::publish_response(
            request_id, &appended, runs,
        )))
    }

    type PublishStreamStream = ResponseStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let store = self.store.clone();
        let mut stopping = self.stopping.subscribe();
        // Requests are handed to the shards in the order they arrive (so per-topic
        // order follows the stream), then acknowledged in that same order.
        let (pending_tx, mut pending_rx) = mpsc::channel(MAX_PUBLISHES_IN_FLIGHT);
        let (out_tx, out_rx) = mpsc::channel(MAX_PUBLISHES_IN_FLIGHT);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    // Stop reading at shutdown; what was read is still answered.
                    () = crate::server::stopped(&mut stopping) => break,
                };
                let request: pb::PublishRequest = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "publish stream ended by the client");
                        break;
                    }
                };
                let (request_id, runs) = (request.request_id, request.want_position_runs);
                let (records, ack) = convert::publish_request(request);
                let pending = store.submit_async(records, ack).await;
                let handed = tokio::select! {
                    handed = pending_tx.send((request_id, runs, pending)) => handed.is_ok(),
                    () = crate::server::stopped(&mut stopping) => false,
                };
                if !handed {
                    break;
                }
            }
        });
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            while let Some((request_id, runs, pending)) = pending_rx.recv().await {
                let response = match pending {
                    Ok(pending) => match pending.wait_async().await {
                        Ok(appended) => convert::publish_response(request_id, &appended, runs),
                        Err(error) => refused(request_id, &error),
                    },
                    Err(error) => refused(request_id, &error),
                };
                // A producer that stopped reading answers must not hold shutdown up.
                let sent = tokio::select! {
                    sent = out_tx.send(Ok(response)) => sent.is_ok(),
                    () = crate::server::stopped(&mut stopping) => false,
                };
                if !sent {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let Some((sink, live)) = self.hub.open_stream() else {
            return Err(Status::resource_exhausted(format!(
                "this broker serves at most {} subscriber streams; multiplex subscriptions on fewer streams or try another broker",
                self.config.max_streams
            )));
        };
        let (out_tx, out_rx) = mpsc::channel(SUBSCRIBE_OUT_BUFFER);
        let (status_tx, status_rx) = oneshot::channel::<Status>();
        let limits = StreamLimits {
            max_subscriptions: self.config.max_subscriptions_per_stream,
            filters: self.config.filters.clone(),
        };
        let sink_for_release = sink.clone();
        let channels = StreamChannels {
            inbound: request.into_inner(),
            out: out_tx,
            final_status: status_tx,
            sink,
            live,
            stopping: self.stopping.subscribe(),
        };
        tokio::spawn(subscribe::serve(
            self.store.clone(),
            self.hub.clone(),
            limits,
            channels,
        ));
        // The stream's final status (a cut-off) must not queue behind responses the
        // client is not reading.
        let final_status = futures_util::stream::once(status_rx).filter_map(|s| s.ok().map(Err));
        let responses = ReceiverStream::new(out_rx)
            .map(move |outgoing: subscribe::Outgoing| {
                sink_for_release.release(outgoing.releases);
                Ok(outgoing.response)
            })
            .merge(final_status);
        Ok(Response::new(Box::pin(responses)))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let request = request.into_inner();
        let limits = ReadLimits {
            max_records: match request.max_records as usize {
                0 => MAX_FETCH_RECORDS,
                n => n.min(MAX_FETCH_RECORDS),
            },
            max_bytes: match request.max_bytes as usize {
                0 => MAX_FETCH_BYTES,
                n => n.min(MAX_FETCH_BYTES),
            },
        };
        let batch = self
            .store
            .read_async(&request.topic, request.offset, limits)
            .await
            .map_err(|e| read_status(&e))?;
        Ok(Response::new(pb::FetchResponse {
            records: batch
                .records
                .into_iter()
                .map(|r| convert::delivery(r, Vec::new()))
                .collect(),
            next_offset: batch.next_offset,
        }))
    }

    async fn get_topic_info(
        &self,
        request: Request<pb::TopicInfoRequest>,
    ) -> Result<Response<pb::TopicInfoResponse>, Status> {
        let info = self
            .store
            .topic_info_async(&request.into_inner().topic)
            .await
            .map_err(|e| read_status(&e))?;
        Ok(Response::new(convert::topic_info(info)))
    }

    async fn reload_filters(
        &self,
        _request: Request<pb::ReloadFiltersRequest>,
    ) -> Result<Response<pb::ReloadFiltersResponse>, Status> {
        let filters = self.config.filters.clone();
        let report = tokio::task::spawn_blocking(move || filters.reload())
            .await
            .map_err(|e| Status::internal(format!("reloading filters: {e}")))?;
        tracing::info!(loaded = ?report.loaded, failed = report.failed.len(), removed = ?report.removed, "filters reloaded on request");
        Ok(Response::new(pb::ReloadFiltersResponse {
            loaded: report.loaded,
            failed: report
                .failed
                .into_iter()
                .map(|e| pb::FilterError {
                    file: e.file,
                    message: e.message,
                })
                .collect(),
            removed: report.removed,
            serving: self
                .config
                .filters
                .stats()
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
        }))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            status: pb::health_response::Status::Serving as i32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }
}
