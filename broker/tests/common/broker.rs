//! A broker on a real loopback port, for tests that go through gRPC.

use std::net::SocketAddr;

use switchyard_broker::server;
use switchyard_broker::storage::Store;
use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A broker serving a fresh store on 127.0.0.1:0.
pub struct Broker {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    store: Store,
    filters: std::sync::Arc<switchyard_broker::filter::FilterSet>,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub async fn start() -> Broker {
        Self::start_with(server::ServerConfig::default()).await
    }

    pub async fn start_with(config: server::ServerConfig) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = super::small_config(dir.path());
        storage.segment_bytes = 8 << 20;
        storage.max_record_bytes = 64 << 10;
        storage.max_batch_bytes = 4 << 20;
        let store = Store::open(storage).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = store.clone();
        let filters = config.filters.clone();
        let task = tokio::spawn(async move {
            server::run(listener, None, serving, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Broker {
            address,
            stop: Some(stop),
            task: Some(task),
            store,
            filters,
            _dir: dir,
        }
    }

    pub fn filters(&self) -> &std::sync::Arc<switchyard_broker::filter::FilterSet> {
        &self.filters
    }

    pub fn store_handle(&self) -> &Store {
        &self.store
    }

    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::connect(format!("http://{}", self.address))
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        self.store.close().unwrap();
    }
}

pub fn record(topic: &str, payload: &str) -> pb::PublishRecord {
    pb::PublishRecord {
        topic: topic.into(),
        headers: vec![pb::Header {
            key: "type".into(),
            value: "MESSAGE_CREATE".into(),
        }],
        payload: payload.to_owned().into(),
    }
}

pub fn publish(
    request_id: u64,
    records: Vec<pb::PublishRecord>,
    ack: pb::AckLevel,
) -> pb::PublishRequest {
    pb::PublishRequest {
        request_id,
        records,
        ack: ack as i32,
        want_position_runs: false,
    }
}
