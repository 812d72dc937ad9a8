//! One-off calls: read history, look at a topic, check health.

use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tonic::transport::Channel;

use crate::error::ClientError;
use crate::subscriber::{Delivery, delivery_from_proto};

/// A topic's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicInfo {
    pub epoch: u64,
    pub earliest_offset: u64,
    pub next_offset: u64,
    pub latest_timestamp_ms: u64,
}

/// Unary calls to a broker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    inner: BrokerClient<Channel>,
}

impl Client {
    /// Connects to the broker at `address` (e.g. `http://127.0.0.1:7400`).
    pub async fn connect(address: &str) -> Result<Client, ClientError> {
        Ok(Client {
            inner: crate::connect(address).await?,
        })
    }

    /// Up to `max_records` records of `topic` from `offset`, and the offset to read
    /// next.
    pub async fn fetch(
        &self,
        topic: &str,
        offset: u64,
        max_records: u32,
    ) -> Result<(Vec<Delivery>, u64), ClientError> {
        let response = self
            .inner
            .clone()
            .fetch(pb::FetchRequest {
                topic: topic.to_owned(),
                offset,
                max_records,
                max_bytes: 0,
            })
            .await?
            .into_inner();
        Ok((
            response
                .records
                .into_iter()
                .map(delivery_from_proto)
                .collect(),
            response.next_offset,
        ))
    }

    /// The state of `topic`, or `None` when it holds no record.
    pub async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, ClientError> {
        let info = self
            .inner
            .clone()
            .get_topic_info(pb::TopicInfoRequest {
                topic: topic.to_owned(),
            })
            .await?
            .into_inner();
        Ok(info.exists.then_some(TopicInfo {
            epoch: info.epoch,
            earliest_offset: info.earliest_offset,
            next_offset: info.next_offset,
            latest_timestamp_ms: info.latest_timestamp_ms,
        }))
    }

    /// Asks the broker to reload its filter directory now. Returns the filters
    /// serving afterwards and the files refused (`file: message`).
    pub async fn reload_filters(&self) -> Result<(Vec<String>, Vec<String>), ClientError> {
        let report = self
            .inner
            .clone()
            .reload_filters(pb::ReloadFiltersRequest {})
            .await?
            .into_inner();
        let failed = report
            .failed
            .into_iter()
            .map(|e| format!("{}: {}", e.file, e.message))
            .collect();
        Ok((report.serving, failed))
    }

    /// Whether the broker is serving, and its version.
    pub async fn health(&self) -> Result<(bool, String), ClientError> {
        let health = self
            .inner
            .clone()
            .health(pb::HealthRequest {})
            .await?
            .into_inner();
        Ok((
            health.status() == pb::health_response::Status::Serving,
            health.version,
        ))
    }
}
