//! The subscriber: many subscriptions on one `Subscribe` stream, all handled by one
//! dispatcher task that keeps a small table entry per subscription (topic, start,
//! last position) — an edge holds hundreds of thousands of them, so there is no task
//! or channel per subscription. Events reach the application through one channel,
//! in the order the broker sent them.
//!
//! When the stream breaks (the broker restarted, shut down, or cut the stream off as
//! a slow consumer), the dispatcher reconnects with backoff and adds every
//! subscription again from the position after the last record it delivered: nothing
//! is lost and nothing repeats. If that history is gone, the subscription ends with
//! [`SubscriberEvent::HistoryLost`].

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use switchyard_proto::{self as pb, ReceivedDelivery, SubscriptionIds, Topic};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::client::Grpc;
use tonic::transport::Channel;

use crate::codec::Incoming;
use crate::error::ClientError;

/// Where a record is, or (to resume) the next offset wanted and the epoch of the last
/// record seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub offset: u64,
    pub epoch: u64,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the next record published.
    Latest,
    /// With the oldest record retained.
    Earliest,
    /// Exactly at a position saved earlier.
    At(Position),
}

/// A delivered record. Its payload shares the buffer the broker's response arrived
/// in (no copy; keeping it keeps that buffer); its topic is held inline (a name
/// longer than 38 bytes is one copy shared by the response's run of deliveries of
/// that topic); its subscription ids are held inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Topic,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// The subscriptions (of this subscriber) the record is for.
    pub subscription_ids: SubscriptionIds,
}

impl Delivery {
    /// The position to resume from after this record.
    pub fn next_position(&self) -> Position {
        Position {
            offset: self.offset + 1,
            epoch: self.epoch,
        }
    }
}

pub(crate) fn delivery_from_proto(d: pb::Delivery) -> Delivery {
    Delivery {
        topic: d.topic.into(),
        offset: d.offset,
        epoch: d.epoch,
        timestamp_ms: d.timestamp_ms,
        headers: d.headers.into_iter().map(|h| (h.key, h.value)).collect(),
        payload: d.payload,
        subscription_ids: d.subscription_ids.into(),
    }
}

impl From<ReceivedDelivery> for Delivery {
    fn from(d: ReceivedDelivery) -> Delivery {
        Delivery {
            topic: d.topic,
            offset: d.offset,
            epoch: d.epoch,
            timestamp_ms: d.timestamp_ms,
            headers: d.headers,
            payload: d.payload,
            subscription_ids: d.subscription_ids,
        }
    }
}

/// What the subscriber tells the application.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriberEvent {
    Delivery(Delivery),
    /// A subscription is live; its first record will be at `next`.
    Started {
        id: u64,
        next: Position,
    },
    /// A subscription ended: the history it needs is gone. The topic is at
    /// `current_epoch`, holding offsets `earliest_offset..next_offset`.
    HistoryLost {
        id: u64,
        current_epoch: u64,
        earliest_offset: u64,
        next_offset: u64,
    },
    /// The broker refused a subscription (or a change to it); it is gone.
    Refused {
        id: u64,
        error: ClientError,
    },
    /// A subscription was removed as asked.
    Removed {
        id: u64,
    },
    /// The stream broke; the subscriber is reconnecting.
    Disconnected {
        error: ClientError,
    },
    /// The stream is back and every subscription was added again.
    Reconnected,
}

enum Command {
    Add {
        id: u64,
        topic: String,
        start: Start,
        filter: String,
        context: HashMap<String, String>,
    },
    Remove {
        id: u64,
    },
    UpdateContext {
        id: u64,
        context: HashMap<String, String>,
    },
}

/// A subscription as the dispatcher knows it.
struct Entry {
    topic: String,
    start: Start,
    filter: String,
    context: HashMap<String, String>,
    /// Where to resume: after the last record delivered (or the live start).
    resume: Option<Position>,
    /// Asked to be removed; gone once the broker confirms (or the stream breaks).
    removing: bool,
}

/// Batches of events buffered for the application (a batch gathers the broker
/// responses already received: under 2,000 events, as a response carries at most
/// 1,000 deliveries; at most ~32,000 events wait in all). When it lags, the
/// dispatcher waits, the broker's buffer for the stream fills, and past its cap the
/// broker cuts the stream off — the dispatcher then reconnects and resumes.
const EVENT_BUFFER: usize = 16;
/// Responses already received are gathered into one send up to this many events.
const MAX_EVENTS_PER_SEND: usize = 1000;

/// Subscriptions on one broker stream.
#[derive(Debug)]
pub struct Subscriber {
    commands: mpsc::UnboundedSender<Command>,
    /// Events travel in batches (one channel operation per broker response, not
    /// per record); `next` hands them out one by one.
    events: mpsc::Receiver<Vec<SubscriberEvent>>,
    ready: std::vec::IntoIter<SubscriberEvent>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Subscriber {
    /// Connects to the broker at `address` and starts the dispatcher.
    pub async fn connect(address: &str) -> Result<Subscriber, ClientError> {
        let grpc = crate::connect_grpc(address).await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::channel(EVENT_BUFFER);
        let dispatcher = Dispatcher {
            grpc,
            entries: HashMap::new(),
            events: event_tx,
            stream: None,
        };
        tokio::spawn(dispatcher.run(command_rx));
        Ok(Subscriber {
            commands,
            events,
            ready: Vec::new().into_iter(),
        })
    }

    /// Adds subscription `id` (chosen by the caller, unique on this subscriber) to
    /// `topic` from `start`. The broker answers with [`SubscriberEvent::Started`] or a
    /// refusal.
    pub async fn subscribe(
        &self,
        id: u64,
        topic: impl Into<String>,
        start: Start,
    ) -> Result<(), ClientError> {
        self.subscribe_filtered(id, topic, start, String::new(), HashMap::new())
            .await
    }

    /// Like [`Subscriber::subscribe`], with a delivery filter loaded in the broker and
    /// what it knows of the subscriber (see `docs/filters.md`).
    pub async fn subscribe_filtered(
        &self,
        id: u64,
        topic: impl Into<String>,
        start: Start,
        filter: impl Into<String>,
        context: HashMap<String, String>,
    ) -> Result<(), ClientError> {
        self.commands
            .send(Command::Add {
                id,
                topic: topic.into(),
                start,
                filter: filter.into(),
                context,
            })
            .map_err(|_| ClientError::Closed)
    }

    /// Removes subscription `id`.
    pub async fn unsubscribe(&self, id: u64) -> Result<(), ClientError> {
        self.commands
            .send(Command::Remove { id })
            .map_err(|_| ClientError::Closed)
    }

    /// Replaces the context a delivery filter sees for subscription `id`.
    pub async fn update_context(
        &self,
        id: u64,
        context: HashMap<String, String>,
    ) -> Result<(), ClientError> {
        self.commands
            .send(Command::UpdateContext { id, context })
            .map_err(|_| ClientError::Closed)
    }

    /// The next event; `None` once the subscriber is closed.
    pub async fn next(&mut self) -> Option<SubscriberEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.events.recv().await?.into_iter();
        }
    }

    /// The events already received (at least one: waits when there are none), in
    /// order; `None` once the subscriber is closed. Where [`Subscriber::next`] hands
    /// out one event per call, this hands out what arrived together (what the
    /// dispatcher gathered from the responses it had received, about a thousand
    /// events at most), for applications that work in batches — a gateway that
    /// writes to each socket once per batch, say.
    pub async fn next_events(&mut self) -> Option<Vec<SubscriberEvent>> {
        if self.ready.len() == 0 {
            return self.events.recv().await;
        }
        Some(std::mem::take(&mut self.ready).collect())
    }
}

type Stream = (
    mpsc::UnboundedSender<pb::SubscribeRequest>,
    Streaming<Incoming>,
);

/// The one task behind a [`Subscriber`].
struct Dispatcher {
    grpc: Grpc<Channel>,
    entries: HashMap<u64, Entry>,
    events: mpsc::Sender<Vec<SubscriberEvent>>,
    stream: Option<Stream>,
}

fn add_request(id: u64, entry: &Entry) -> pb::SubscribeRequest {
    use pb::start_position::Start as S;
    let start = match entry.resume.map(Start::At).unwrap_or(entry.start) {
        Start::Latest => S::Latest(pb::Latest {}),
        Start::Earliest => S::Earliest(pb::Earliest {}),
        Start::At(p) => S::Resume(pb::Position {
            offset: p.offset,
            epoch: p.epoch,
        }),
    };
    pb::SubscribeRequest {
        command: Some(pb::subscribe_request::Command::Add(pb::Subscription {
            id,
            topic: entry.topic.clone(),
            start: Some(pb::StartPosition { start: Some(start) }),
            filter: entry.filter.clone(),
            context: entry.context.clone(),
        })),
    }
}

impl Dispatcher {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(()) => backoff = Duration::from_millis(50),
                    Err(error) => {
                        tracing::debug!(%error, "subscribe stream: connecting failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        if commands.is_closed() || self.events.is_closed() {
                            return;
                        }
                        continue;
                    }
                }
            }
            let (_, responses) = self.stream.as_mut().expect("opened above");
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => {
                        if !self.command(command).await {
                            return;
                        }
                    }
                    None => return,
                },
                response = responses.message() => {
                    // This response and those already here go to the application
                    // in one send.
                    let mut events = Vec::new();
                    let mut next = Some(response);
                    let mut ended = None;
                    while let Some(response) = next.take() {
                        match response {
                            Ok(Some(response)) => self.response(response, &mut events),
                            Ok(None) => ended = Some(ClientError::Unreachable("the broker ended the stream".into())),
                            Err(status) => ended = Some(status.into()),
                        }
                        if ended.is_none() && events.len() < MAX_EVENTS_PER_SEND {
                            let (_, responses) = self.stream.as_mut().expect("open");
                            next = responses.message().now_or_never();
                        }
                    }
                    if !self.emit(events).await {
                        return;
                    }
                    if let Some(error) = ended
                        && !self.broken(error).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Opens a stream and adds every subscription again.
    async fn open(&mut self) -> Result<(), ClientError> {
        // Removals the broken stream never confirmed are done: the new stream will
        // not have those subscriptions.
        let removed: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.removing)
            .map(|(id, _)| *id)
            .collect();
        for id in removed {
            self.entries.remove(&id);
            self.emit(vec![SubscriberEvent::Removed { id }]).await;
        }
        let (requests, receiver) = mpsc::unbounded_channel();
        for (id, entry) in &self.entries {
            let _ = requests.send(add_request(*id, entry));
        }
        let responses = crate::codec::subscribe(
            &mut self.grpc,
            tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
        )
        .await?;
        let reconnect = self.stream.is_none() && !self.entries.is_empty();
        self.stream = Some((requests, responses));
        if reconnect {
            self.emit(vec![SubscriberEvent::Reconnected]).await;
        }
        Ok(())
    }

    fn send(&self, request: pb::SubscribeRequest) {
        if let Some((requests, _)) = &self.stream {
            let _ = requests.send(request);
        }
    }

    async fn command(&mut self, command: Command) -> bool {
        match command {
            Command::Add {
                id,
                topic,
                start,
                filter,
                context,
            } => {
                if self.entries.contains_key(&id) {
                    // Still in use (or its removal is not confirmed yet): refused here, so
                    // the subscription that has the id keeps its state.
                    let error = ClientError::Refused {
                        code: tonic::Code::AlreadyExists,
                        message: format!(
                            "subscription id {id} is in use; wait for Removed before using it again"
                        ),
                    };
                    return self
                        .emit(vec![SubscriberEvent::Refused { id, error }])
                        .await;
                }
                let entry = Entry {
                    topic,
                    start,
                    filter,
                    context,
                    resume: None,
                    removing: false,
                };
                self.send(add_request(id, &entry));
                self.entries.insert(id, entry);
            }
            Command::Remove { id } => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.removing = true;
                }
                self.send(pb::SubscribeRequest {
                    command: Some(pb::subscribe_request::Command::Remove(pb::Unsubscribe {
                        id,
                    })),
                });
            }
            Command::UpdateContext { id, context } => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.context = context.clone();
                }
                self.send(pb::SubscribeRequest {
                    command: Some(pb::subscribe_request::Command::UpdateContext(
                        pb::UpdateContext { id, context },
                    )),
                });
            }
        }
        true
    }

    async fn broken(&mut self, error: ClientError) -> bool {
        tracing::info!(%error, "subscribe stream broke; reconnecting and resuming");
        self.stream = None;
        self.emit(vec![SubscriberEvent::Disconnected { error }])
            .await
    }

    /// Handles one response: what the application is to be told goes to `events`.
    fn response(&mut self, response: Incoming, events: &mut Vec<SubscriberEvent>) {
        use pb::subscription_update::State;
        let response = match response {
            Incoming::Deliveries(deliveries) => return self.deliveries(deliveries, events),
            Incoming::Other(response) => response,
        };
        match response.event {
            Some(pb::subscribe_response::Event::Deliveries(batch)) => {
                let batch = batch
                    .deliveries
                    .into_iter()
                    .map(|d| SubscriberEvent::Delivery(delivery_from_proto(d)))
                    .collect();
                self.deliveries(batch, events);
            }
            Some(pb::subscribe_response::Event::Update(update)) => {
                let id = update.id;
                let event = match update.state {
                    Some(State::Started(started)) => {
                        let next = started
                            .next
                            .map(|p| Position {
                                offset: p.offset,
                                epoch: p.epoch,
                            })
                            .unwrap_or_default();
                        // A live start resumes from where it went live, not from "latest
                        // at the time of the reconnect" (that would skip records).
                        if let Some(entry) = self.entries.get_mut(&id)
                            && entry.resume.is_none()
                            && entry.start == Start::Latest
                        {
                            entry.resume = Some(next);
                        }
                        SubscriberEvent::Started { id, next }
                    }
                    Some(State::HistoryLost(lost)) => {
                        self.entries.remove(&id);
                        SubscriberEvent::HistoryLost {
                            id,
                            current_epoch: lost.current_epoch,
                            earliest_offset: lost.earliest_offset,
                            next_offset: lost.next_offset,
                        }
                    }
                    Some(State::Error(error)) => {
                        self.entries.remove(&id);
                        SubscriberEvent::Refused {
                            id,
                            error: ClientError::Refused {
                                code: tonic::Code::from_i32(error.code),
                                message: error.message,
                            },
                        }
                    }
                    Some(State::Removed(_)) => {
                        self.entries.remove(&id);
                        SubscriberEvent::Removed { id }
                    }
                    None => return,
                };
                events.push(event);
            }
            None => {}
        }
    }

    /// Records where each subscription resumes after `deliveries` and queues them.
    /// Runs of deliveries for one subscription (the usual case) update its entry
    /// once, at the end of the run.
    /// Takes a batch of delivery events: each subscription's resume position
    /// moves past its last record, and the events join `events` (the batch itself
    /// becomes `events` when it is the first: no event is moved).
    fn deliveries(&mut self, mut batch: Vec<SubscriberEvent>, events: &mut Vec<SubscriberEvent>) {
        let mut run: Option<(u64, Position)> = None;
        for event in &batch {
            let SubscriberEvent::Delivery(delivery) = event else {
                continue;
            };
            let next = delivery.next_position();
            let ids = delivery.subscription_ids.as_slice();
            // A run ends at a delivery that is not for its subscription alone.
            if let Some((run_id, position)) = run
                && ids != [run_id]
            {
                self.resume_at(run_id, position);
                run = None;
            }
            match ids {
                [id] => run = Some((*id, next)),
                ids => ids.iter().for_each(|&id| self.resume_at(id, next)),
            }
        }
        if let Some((id, position)) = run {
            self.resume_at(id, position);
        }
        if events.is_empty() {
            *events = batch;
        } else {
            events.append(&mut batch);
        }
    }

    fn resume_at(&mut self, id: u64, position: Position) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.resume = Some(position);
        }
    }

    /// Hands events to the application; false when it is gone.
    async fn emit(&self, events: Vec<SubscriberEvent>) -> bool {
        events.is_empty() || self.events.send(events).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_subscription_resumes_after_its_own_last_delivery_whatever_the_interleaving() {
        // No connection is made: only the dispatcher's bookkeeping runs.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let (events, _receiver) = mpsc::channel(1);
        let mut dispatcher = Dispatcher {
            grpc: Grpc::new(channel),
            entries: HashMap::new(),
            events,
            stream: None,
        };
        for id in 1..=4 {
            let entry = Entry {
                topic: format!("guild.{id}"),
                start: Start::Earliest,
                filter: String::new(),
                context: HashMap::new(),
                resume: None,
                removing: false,
            };
            dispatcher.entries.insert(id, entry);
        }
        // Runs of one subscription, a run cut by another's, a delivery for two, and
        // subscription 2's last delivery in the middle of the batch.
        let sent: [(&[u64], u64); 8] = [
            (&[1], 0),
            (&[1], 1),
            (&[2], 0),
            (&[2], 1),
            (&[1], 2),
            (&[3, 4], 7),
            (&[1], 3),
            (&[4], 8),
        ];
        let delivery = |ids: &[u64], offset| {
            SubscriberEvent::Delivery(Delivery {
                topic: "t".into(),
                offset,
                epoch: 5,
                timestamp_ms: 0,
                headers: Vec::new(),
                payload: Bytes::new(),
                subscription_ids: ids.to_vec().into(),
            })
        };
        let batch = sent
            .iter()
            .map(|&(ids, offset)| delivery(ids, offset))
            .collect();
        let mut events = Vec::new();
        dispatcher.deliveries(batch, &mut events);
        assert_eq!(events.len(), sent.len());
        let resume = |d: &Dispatcher, id: u64| d.entries[&id].resume.map(|p| (p.offset, p.epoch));
        assert_eq!(
            [1, 2, 3, 4].map(|id| resume(&dispatcher, id)),
            [Some((4, 5)), Some((2, 5)), Some((8, 5)), Some((9, 5))]
        );
        // A second batch joins the events after the first.
        dispatcher.deliveries(vec![delivery(&[2], 2)], &mut events);
        assert_eq!(events.len(), sent.len() + 1);
        assert!(matches!(&events[sent.len()], SubscriberEvent::Delivery(d) if d.offset == 2));
        assert!(matches!(&events[0], SubscriberEvent::Delivery(d) if d.offset == 0));
        assert_eq!(resume(&dispatcher, 2), Some((3, 5)));
    }
}
