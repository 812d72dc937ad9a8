//! One Subscribe stream driven by hand through the generated client, for tests of
//! the broker's subscription semantics.

use std::time::Duration;

use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

use pb::start_position::Start;
use pb::subscribe_response::Event;

/// One Subscribe stream, driven by hand.
pub struct Subscriber {
    requests: mpsc::Sender<pb::SubscribeRequest>,
    responses: Streaming<pb::SubscribeResponse>,
}

impl Subscriber {
    pub async fn open(client: &mut BrokerClient<Channel>) -> Subscriber {
        let (requests, receiver) = mpsc::channel(64);
        let responses = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        Subscriber {
            requests,
            responses,
        }
    }

    pub async fn add(&self, id: u64, topic: &str, start: Start) {
        self.add_filtered(id, topic, start, "", &[]).await;
    }

    /// Adds a subscription naming a delivery filter and its context.
    pub async fn add_filtered(
        &self,
        id: u64,
        topic: &str,
        start: Start,
        filter: &str,
        context: &[(&str, &str)],
    ) {
        let command = pb::subscribe_request::Command::Add(pb::Subscription {
            id,
            topic: topic.into(),
            start: Some(pb::StartPosition { start: Some(start) }),
            filter: filter.into(),
            context: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        });
        self.send(command).await;
    }

    /// Replaces the context of subscription `id`.
    pub async fn update_context(&self, id: u64, context: &[(&str, &str)]) {
        let command = pb::subscribe_request::Command::UpdateContext(pb::UpdateContext {
            id,
            context: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        });
        self.send(command).await;
    }

    async fn send(&self, command: pb::subscribe_request::Command) {
        self.requests
            .send(pb::SubscribeRequest {
                command: Some(command),
            })
            .await
            .unwrap();
    }

    pub async fn remove(&self, id: u64) {
        let command = pb::subscribe_request::Command::Remove(pb::Unsubscribe { id });
        self.send(command).await;
    }

    /// The next event, within ten seconds.
    pub async fn next(&mut self) -> Result<Event, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response.event.expect("an event")),
            Ok(Ok(None)) => panic!("the stream ended"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no event within 10 s"),
        }
    }

    pub async fn update(&mut self) -> pb::SubscriptionUpdate {
        match self.next().await.unwrap() {
            Event::Update(update) => update,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    /// Deliveries until `count` have arrived.
    pub async fn deliveries(&mut self, count: usize) -> Vec<pb::Delivery> {
        let mut all = Vec::new();
        while all.len() < count {
            match self.next().await.unwrap() {
                Event::Deliveries(batch) => all.extend(batch.deliveries),
                Event::Update(update) => panic!("unexpected update {update:?}"),
            }
        }
        all
    }
}
