//! One subscriber stream: subscriptions come and go on it, deliveries go out batched.
//!
//! Joining the live tail without a gap or a repeat: a subscription is registered
//! with the hub on its shard's own thread, under the shard's lock, in the same step that reads the topic's
//! next offset `N`, so every record from `N` on reaches the stream live. Records
//! before `N` that the start position asks for are replayed from the log; live
//! records for the subscription that arrive meanwhile are held back and delivered
//! once the replay is done.
//!
//! A subscription id can be removed and added again while records for its old use
//! are still on their way: every use gets a new generation, carried by live records
//! (through the hub) and by replay events, and anything of another generation is
//! dropped.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;

use switchyard_proto as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Code, Status, Streaming};

use crate::filter::{Context, EventView, FilterSet, SharedVerdicts};
use crate::server::convert::{self, RecordView};
use crate::server::hub::{LiveBatch, LiveEvent, StreamSink, SubscriptionHub, record_bytes};
use crate::server::status::read_status;
use crate::storage::{ReadError, ReadLimits, Store, validate_topic_name};

/// Records read from the log per replay step.
const REPLAY_CHUNK: usize = 1000;
/// Most deliveries in one response message.
const MAX_BATCH_DELIVERIES: usize = 1000;
/// Most bytes of deliveries in one response message.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Limits of one stream.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    pub max_subscriptions: usize,
    /// The filters subscriptions may name.
    pub filters: Arc<FilterSet>,
}

/// A subscription of this stream.
#[derive(Debug)]
struct Subscription {
    topic: String,
    shard: u32,
    /// Which use of the id this is.
    generation: u64,
    /// While history is being replayed.
    replaying: Option<Replay>,
    /// The delivery filter it names, if any, and what the filter knows of the
    /// subscriber.
    filter: Option<String>,
    context: Context,
}

/// A replay in progress.
#[derive(Debug)]
struct Replay {
    /// Live deliveries held back until the replay is done, with their byte counts.
    held: Vec<(pb::Delivery, usize)>,
    /// The task reading the history.
    task: JoinHandle<()>,
}

/// What a replay task reports, for subscription `id` in its `generation`.
#[derive(Debug)]
struct ReplayEvent {
    id: u64,
    generation: u64,
    kind: ReplayKind,
}

#[derive(Debug)]
enum ReplayKind {
    Records(Vec<pb::Delivery>),
    Done,
    Failed(ReadError),
}

/// A response on its way to the client, with the bytes of the stream's cap it
/// releases once gRPC takes it (queued responses hold copies of their records).
#[derive(Debug)]
pub struct Outgoing {
    pub response: pb::SubscribeResponse,
    pub releases: usize,
}

/// The channels of one Subscribe call.
#[derive(Debug)]
pub struct StreamChannels {
    /// The client's commands.
    pub inbound: Streaming<pb::SubscribeRequest>,
    /// Responses to the client.
    pub out: mpsc::Sender<Outgoing>,
    /// The status the stream ends with, when it is not the client that ends it.
    pub final_status: oneshot::Sender<Status>,
    /// The hub's side of the stream and its live deliveries.
    pub sink: Arc<StreamSink>,
    pub live: mpsc::UnboundedReceiver<LiveEvent>,
    /// Turns true when the server shuts down.
    pub stopping: watch::Receiver<bool>,
}

fn update(id: u64, state: pb::subscription_update::State) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        event: Some(pb::subscribe_response::Event::Update(
            pb::SubscriptionUpdate {
                id,
                state: Some(state),
            },
        )),
    }
}

fn refusal(id: u64, code: Code, message: String) -> pb::SubscribeResponse {
    update(
        id,
        pb::subscription_update::State::Error(pb::Error {
            code: code as i32,
            message,
        }),
    )
}

/// The update for a subscription that cannot go on because of `error`.
fn ended(id: u64, error: &ReadError) -> pb::SubscribeResponse {
    match error {
        ReadError::HistoryLost {
            offset,
            epoch,
            current_epoch,
            earliest,
            next,
            ..
        } => update(
            id,
            pb::subscription_update::State::HistoryLost(pb::HistoryLost {
                requested: Some(pb::Position {
                    offset: *offset,
                    epoch: *epoch,
                }),
                current_epoch: *current_epoch,
                earliest_offset: *earliest,
                next_offset: *next,
            }),
        ),
        _ => {
            let status = read_status(error);
            refusal(id, status.code(), status.message().to_owned())
        }
    }
}

fn slow_consumer() -> Status {
    Status::resource_exhausted(
        "slow consumer: more deliveries were waiting for this stream than its cap allows; \
         reconnect and resume each subscription from the last position it received",
    )
}

fn shutting_down() -> Status {
    Status::unavailable(
        "the broker is shutting down; reconnect (to it or another broker) and resume each \
         subscription from the last position it received",
    )
}

/// The state of one Subscribe call.
struct SubscriberStream {
    store: Store,
    hub: Arc<SubscriptionHub>,
    sink: Arc<StreamSink>,
    limits: StreamLimits,
    /// Keyed by the client's own ids (a fast hash: colliding ids slow only this stream).
    subscriptions: HashMap<u64, Subscription, crate::hash::BuildIntHasher>,
    next_generation: u64,
    replay_tx: mpsc::Sender<ReplayEvent>,
    out: mpsc::Sender<Outgoing>,
    stopping: watch::Receiver<bool>,
    /// Deliveries gathered for the next response, written in their wire form, and
    /// the hub bytes they release.
    batch: pb::DeliveryWriter,
    released: usize,
    /// The live subscriptions a record goes to, kept from record to record (a
    /// list per record was an allocation and a free per delivery).
    live_ids: Vec<u64>,
}

impl Drop for SubscriberStream {
    fn drop(&mut self) {
        for (id, subscription) in self.subscriptions.drain() {
            self.hub
                .unfollow(subscription.shard, &subscription.topic, self.sink.id(), id);
            if let Some(Replay { task, .. }) = subscription.replaying {
                task.abort();
            }
        }
        self.hub.close_stream();
    }
}

/// Why the stream ends.
enum End {
    /// The client went away (or cancelled).
    ClientGone,
    /// Cut off or shut down: the status tells the client what happened.
    Status(Status),
}

/// Serves one Subscribe call until the client goes away, the stream is cut off or
/// the server shuts down.
pub async fn serve(
    store: Store,
    hub: Arc<SubscriptionHub>,
    limits: StreamLimits,
    channels: StreamChannels,
) {
    let StreamChannels {
        mut inbound,
        out,
        final_status,
        sink,
        mut live,
        stopping,
    } = channels;
    let (replay_tx, mut replay_rx) = mpsc::channel(64);
    let mut stream = SubscriberStream {
        store,
        hub,
        sink,
        limits,
        subscriptions: HashMap::default(),
        next_generation: 1,
        replay_tx,
        out,
        stopping: stopping.clone(),
        batch: pb::DeliveryWriter::new(),
        released: 0,
        live_ids: Vec::new(),
    };
    let mut stop = stopping;
    let mut inbound_open = true;
    let end = loop {
        let step = tokio::select! {
            request = inbound.message(), if inbound_open => match request {
                Ok(Some(request)) => {
                    let (result, open) = commands(&mut stream, &mut inbound, request).await;
                    inbound_open = open;
                    result
                }
                // The client has nothing more to ask; deliveries go on.
                Ok(None) => { inbound_open = false; Ok(()) }
                Err(_) => Err(End::ClientGone),
            },
            event = live.recv() => match event {
                Some(event) => {
                    let mut result = stream.live(event).await;
                    // Gather what else is waiting into the same response.
                    while result.is_ok() && !stream.batch_full() {
                        match live.try_recv() {
                            Ok(event) => result = stream.live(event).await,
                            Err(_) => break,
                        }
                    }
                    result
                }
                None => Err(End::ClientGone),
            },
            Some(event) = replay_rx.recv() => stream.replay(event).await,
            _ = stream.out.closed() => Err(End::ClientGone),
            () = crate::server::stopped(&mut stop) => Err(End::Status(shutting_down())),
        };
        if let Err(end) = step {
            break end;
        }
        if let Err(end) = stream.flush().await {
            break end;
        }
    };
    if let End::Status(status) = end {
        // Not through `out`, which may be full: the response stream merges this in.
        let _ = final_status.send(status);
    }
}

/// Subscriptions added together at most (see [`SubscriberStream::add_many`]).
const MAX_ADD_GROUP: usize = 1024;
/// Shard steps of one group in flight at once.
const JOIN_CONCURRENCY: usize = 64;

/// Handles `first` and, when it adds a subscription, the adds already waiting
/// behind it as one group; any other command pulled meanwhile is handled after the
/// group. Says whether the client's side of the stream is still open.
async fn commands(
    stream: &mut SubscriberStream,
    inbound: &mut Streaming<pb::SubscribeRequest>,
    first: pb::SubscribeRequest,
) -> (Result<(), End>, bool) {
    use futures_util::FutureExt;
    use pb::subscribe_request::Command;
    let Some(Command::Add(subscription)) = first.command else {
        return (stream.command(first).await, true);
    };
    let mut adds = vec![subscription];
    let mut after = None;
    let mut open = true;
    while adds.len() < MAX_ADD_GROUP {
        match inbound.message().now_or_never() {
            Some(Ok(Some(pb::SubscribeRequest {
                command: Some(Command::Add(subscription)),
            }))) => adds.push(subscription),
            Some(Ok(Some(other))) => {
                after = Some(other);
                break;
            }
            Some(Ok(None)) => {
                open = false;
                break;
            }
            Some(Err(_)) => return (Err(End::ClientGone), false),
            None => break,
        }
    }
    let mut result = stream.add_many(adds).await;
    if let (Ok(()), Some(request)) = (&result, after) {
        result = stream.command(request).await;
    }
    (result, open)
}

impl SubscriberStream {
    /// Sends a response; gives up if the stream is cut off or the server stops
    /// meanwhile (a client that stopped reading must not hold the stream forever).
    async fn send(&mut self, response: pb::SubscribeResponse) -> Result<(), End> {
        self.send_releasing(response, 0).await
    }

    /// Sends a response that releases `releases` bytes of the cap when gRPC takes it.
    async fn send_releasing(
        &mut self,
        response: pb::SubscribeResponse,
        releases: usize,
    ) -> Result<(), End> {
        let outgoing = Outgoing { response, releases };
        tokio::select! {
            sent = self.out.send(outgoing) => sent.map_err(|_| End::ClientGone),
            () = self.sink.cut_off() => Err(End::Status(slow_consumer())),
            () = crate::server::stopped(&mut self.stopping) => Err(End::Status(shutting_down())),
        }
    }

    fn batch_full(&self) -> bool {
        self.batch.len() >= MAX_BATCH_DELIVERIES || self.batch.encoded_len() >= MAX_BATCH_BYTES
    }

    /// Sends the gathered deliveries as one response. The hub bytes they stand for
    /// stay counted against the stream's cap until gRPC takes the response.
    async fn flush(&mut self) -> Result<(), End> {
        let released = std::mem::take(&mut self.released);
        if self.batch.is_empty() {
            self.sink.release(released);
            return Ok(());
        }
        let deliveries = self.batch.finish();
        self.send_releasing(
            pb::SubscribeResponse {
                event: Some(pb::subscribe_response::Event::Deliveries(deliveries)),
            },
            released,
        )
        .await
    }

    /// Forgets subscription `id`: unfollows it, stops its replay, releases what it
    /// held back.
    fn forget(&mut self, id: u64) -> bool {
        let Some(subscription) = self.subscriptions.remove(&id) else {
            return false;
        };
        self.hub
            .unfollow(subscription.shard, &subscription.topic, self.sink.id(), id);
        if let Some(Replay { held, task }) = subscription.replaying {
            task.abort();
            self.released += held.iter().map(|(_, bytes)| bytes).sum::<usize>();
        }
        true
    }

    async fn command(&mut self, request: pb::SubscribeRequest) -> Result<(), End> {
        use pb::subscribe_request::Command;
        match request.command {
            Some(Command::Add(subscription)) => self.add_many(vec![subscription]).await,
            Some(Command::Remove(pb::Unsubscribe { id })) => {
                if self.forget(id) {
                    self.send(update(
                        id,
                        pb::subscription_update::State::Removed(pb::Removed {}),
                    ))
                    .await
                } else {
                    self.send(refusal(
                        id,
                        Code::NotFound,
                        format!("no subscription {id} on this stream"),
                    ))
                    .await
                }
            }
            Some(Command::UpdateContext(pb::UpdateContext { id, context })) => {
                match self.subscriptions.get_mut(&id) {
                    Some(subscription) => {
                        // Takes effect with the next record evaluated.
                        subscription.context = Context::new(context);
                        Ok(())
                    }
                    None => {
                        self.send(refusal(
                            id,
                            Code::NotFound,
                            format!("no subscription {id} on this stream"),
                        ))
                        .await
                    }
                }
            }
            None => Ok(()),
        }
    }

    /// Adds subscriptions: each is checked in order, the shard steps of those
    /// accepted run concurrently (a shard thread takes them back to back, instead
    /// of one round trip per subscription; at most JOIN_CONCURRENCY at a time), and
    /// the answers go out in request order. A repeated id ends a group: the repeat
    /// is checked against the outcome of the first.
    async fn add_many(&mut self, requests: Vec<pb::Subscription>) -> Result<(), End> {
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            // Ok: accepted (request, generation); Err: the refusal to send.
            let mut group: Vec<Result<(pb::Subscription, u64), pb::SubscribeResponse>> = Vec::new();
            let mut accepted = 0;
            while let Some(request) = requests.next_if(|r| {
                !group
                    .iter()
                    .any(|g| matches!(g, Ok((a, _)) if a.id == r.id))
            }) {
                match self.check_add(&request, accepted) {
                    Some(refusal) => group.push(Err(refusal)),
                    None => {
                        let generation = self.next_generation;
                        self.next_generation += 1;
                        accepted += 1;
                        group.push(Ok((request, generation)));
                    }
                }
            }
            let joins: Vec<_> = futures_util::stream::iter(
                group
                    .iter()
                    .filter_map(|g| g.as_ref().ok())
                    .map(|(request, generation)| self.join(request, *generation))
                    .collect::<Vec<_>>(),
            )
            .buffered(JOIN_CONCURRENCY)
            .collect()
            .await;
            let mut joins = joins.into_iter();
            // Every joined subscription is recorded (so that the stream's end
            // unfollows it) even when an answer can no longer be sent.
            let mut result = Ok(());
            for entry in group {
                let answer = match entry {
                    Err(refusal) => refusal,
                    Ok((request, generation)) => {
                        let joined = joins.next().expect("one join per accepted add");
                        self.record(request, generation, joined)
                    }
                };
                if result.is_ok() {
                    result = self.send(answer).await;
                }
            }
            result?;
        }
        Ok(())
    }

    /// Why subscription `request` is refused, if it is; `pending` says how many of
    /// its group are accepted so far.
    fn check_add(
        &self,
        request: &pb::Subscription,
        pending: usize,
    ) -> Option<pb::SubscribeResponse> {
        let id = request.id;
        if self.subscriptions.contains_key(&id) {
            let message = format!("subscription id {id} is already in use on this stream");
            return Some(refusal(id, Code::AlreadyExists, message));
        }
        if self.subscriptions.len() + pending >= self.limits.max_subscriptions {
            let max = self.limits.max_subscriptions;
            let message = format!("a stream holds at most {max} subscriptions");
            return Some(refusal(id, Code::ResourceExhausted, message));
        }
        if let Err(error) = validate_topic_name(&request.topic) {
            let message = format!("invalid topic name {:?}: {error}", request.topic);
            return Some(refusal(id, Code::InvalidArgument, message));
        }
        if !request.filter.is_empty() && self.limits.filters.get(&request.filter).is_none() {
            let loaded: Vec<String> = self
                .limits
                .filters
                .stats()
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            let message = format!(
                "no delivery filter named {:?} is loaded (loaded: {loaded:?})",
                request.filter
            );
            return Some(refusal(id, Code::NotFound, message));
        }
        None
    }

    /// Validates the start, reads the topic's state and follows it, in one step on
    /// its shard's thread, under the shard's lock: no append can fall in between. Gives the shard, the
    /// first position to deliver and the topic's next offset.
    fn join(
        &self,
        request: &pb::Subscription,
        generation: u64,
    ) -> impl std::future::Future<Output = Result<(u32, pb::Position, u64), ReadError>> + use<>
    {
        use pb::start_position::Start;
        let start = request
            .start
            .and_then(|s| s.start)
            .unwrap_or(Start::Latest(pb::Latest {}));
        let id = request.id;
        let topic = request.topic.clone();
        let hub = self.hub.clone();
        let sink = self.sink.clone();
        let store = self.store.clone();
        async move {
            let name = topic.clone();
            store
                .on_shard_of(&name, move |shard| {
                    if let Start::Resume(position) = &start {
                        shard.validate_position(&topic, position.offset, position.epoch)?;
                    }
                    let info = shard.topic_info(&topic)?;
                    hub.follow(shard.id(), &topic, &sink, id, generation);
                    let (epoch, earliest, next) =
                        info.map_or((0, 0, 0), |i| (i.epoch, i.earliest_offset, i.next_offset));
                    // Where the subscription starts; for a resume, the position given.
                    let first = match start {
                        Start::Latest(_) => pb::Position {
                            offset: next,
                            epoch,
                        },
                        Start::Earliest(_) => pb::Position {
                            offset: earliest,
                            epoch,
                        },
                        Start::Resume(position) => position,
                    };
                    Ok::<_, ReadError>((shard.id(), first, next))
                })
                .await?
        }
    }

    /// Records a joined subscription (starting its replay if it needs one) and
    /// gives its Started answer — or the answer that ends it, when the join failed.
    fn record(
        &mut self,
        request: pb::Subscription,
        generation: u64,
        joined: Result<(u32, pb::Position, u64), ReadError>,
    ) -> pb::SubscribeResponse {
        let id = request.id;
        let (shard, first, next) = match joined {
            Ok(joined) => joined,
            Err(error) => return ended(id, &error),
        };
        let replaying = (first.offset < next).then(|| {
            let task = tokio::spawn(replay(
                self.store.clone(),
                request.topic.clone(),
                (id, generation),
                first.offset,
                next,
                self.replay_tx.clone(),
            ));
            Replay {
                held: Vec::new(),
                task,
            }
        });
        self.subscriptions.insert(
            id,
            Subscription {
                topic: request.topic,
                shard,
                generation,
                replaying,
                filter: (!request.filter.is_empty()).then_some(request.filter),
                context: Context::new(request.context),
            },
        );
        update(
            id,
            pb::subscription_update::State::Started(pb::Started { next: Some(first) }),
        )
    }

    /// Live records: each goes straight out for subscriptions that are live, is
    /// held back for those still replaying, and is dropped for uses of an id that
    /// are over. A full response goes out before the event's next record.
    async fn live(&mut self, event: LiveEvent) -> Result<(), End> {
        let (batch, items) = match event {
            LiveEvent::Records { batch, items } => (batch, items),
            LiveEvent::CutOff { pending_bytes } => {
                tracing::debug!(
                    stream = self.sink.id(),
                    pending_bytes,
                    "ending a cut-off stream"
                );
                return Err(End::Status(slow_consumer()));
            }
        };
        for item in &items {
            for index in item.indices() {
                if self.batch_full() {
                    self.flush().await?;
                }
                // Released with the response that carries it (or drops it).
                let record = &batch.records[index];
                self.released += record_bytes(record, item.subscribers.len());
                self.live_record(&batch, index, &item.subscribers)?;
            }
        }
        Ok(())
    }

    fn live_record(
        &mut self,
        batch: &LiveBatch,
        index: usize,
        subscribers: &[(u64, u64)],
    ) -> Result<(), End> {
        let record = RecordView::live(batch, index);
        let mut live_ids = std::mem::take(&mut self.live_ids);
        live_ids.clear();
        let mut verdicts = Verdicts::default();
        // The filtered subscriptions' verdicts, in order, judged together (one call
        // into Lua per filter) before the record is handed out.
        let subscriptions = &self.subscriptions;
        let allowed = verdicts.judge(
            &self.limits.filters,
            record,
            subscribers.iter().filter_map(|&(id, generation)| {
                let subscription = subscriptions.get(&id)?;
                let filter = subscription.filter.as_deref()?;
                (subscription.generation == generation).then_some((
                    filter,
                    &subscription.context,
                    id,
                ))
            }),
        );
        let mut allowed = allowed.into_iter();
        for &(id, generation) in subscribers {
            let Some(subscription) = self.subscriptions.get_mut(&id) else {
                continue;
            };
            if subscription.generation != generation {
                continue;
            }
            if subscription.filter.is_some() && !allowed.next().unwrap_or(false) {
                continue;
            }
            match &mut subscription.replaying {
                Some(Replay { held, .. }) => {
                    let copy = record.to_delivery(vec![id]);
                    let copy_bytes = delivery_bytes(&copy);
                    if !self.sink.hold(copy_bytes) {
                        self.sink.cut(copy_bytes, self.hub.stats());
                        return Err(End::Status(slow_consumer()));
                    }
                    held.push((copy, copy_bytes));
                }
                None => live_ids.push(id),
            }
        }
        if !live_ids.is_empty() {
            self.batch.push(record.fields(&live_ids));
        }
        self.live_ids = live_ids;
        Ok(())
    }

    async fn replay(&mut self, event: ReplayEvent) -> Result<(), End> {
        let ReplayEvent {
            id,
            generation,
            kind,
        } = event;
        if self
            .subscriptions
            .get(&id)
            .is_none_or(|s| s.generation != generation)
        {
            return Ok(()); // for a use of the id that is over
        }
        match kind {
            ReplayKind::Records(records) => {
                let subscription = self.subscriptions.get(&id).expect("checked above");
                let allowed: Vec<pb::Delivery> = if subscription.filter.is_some() {
                    records
                        .into_iter()
                        .filter(|delivery| {
                            Verdicts::default().allows(
                                &self.limits.filters,
                                subscription,
                                id,
                                RecordView::of(delivery),
                            )
                        })
                        .collect()
                } else {
                    records
                };
                for delivery in &allowed {
                    self.batch.push_delivery(delivery);
                }
                Ok(())
            }
            ReplayKind::Done => {
                let subscription = self.subscriptions.get_mut(&id).expect("checked above");
                if let Some(Replay { held, .. }) = subscription.replaying.take() {
                    for (delivery, bytes) in held {
                        self.released += bytes;
                        self.batch.push_delivery(&delivery);
                        if self.batch_full() {
                            self.flush().await?;
                        }
                    }
                }
                Ok(())
            }
            ReplayKind::Failed(error) => {
                self.forget(id);
                self.flush().await?;
                self.send(ended(id, &error)).await
            }
        }
    }
}

/// Bytes a delivery counts for against a stream's cap (as
/// [`crate::server::hub::record_bytes`] counts a live record).
fn delivery_bytes(delivery: &pb::Delivery) -> usize {
    let headers: usize = delivery
        .headers
        .iter()
        .map(|h| h.key.len() + h.value.len() + 8)
        .sum();
    delivery.payload.len()
        + delivery.topic.len()
        + headers
        + 8 * delivery.subscription_ids.len()
        + 48
}

/// Filter verdicts for one record (see [`SharedVerdicts`]), with the record in the
/// form the filter API takes, made once.
#[derive(Default)]
struct Verdicts {
    shared: SharedVerdicts,
    /// The record's headers and its key for the filter engine.
    headers: Option<(Vec<(String, String)>, u64)>,
}

impl Verdicts {
    /// `record` as the filter API sees it.
    fn event<'a>(
        headers: &'a mut Option<(Vec<(String, String)>, u64)>,
        record: RecordView<'a>,
    ) -> EventView<'a> {
        let (headers, key) = headers.get_or_insert_with(|| {
            let headers = record
                .headers
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            (headers, EventView::new_key())
        });
        EventView {
            key: *key,
            topic: record.topic,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            headers,
            payload: record.payload,
        }
    }

    /// Whether each of the filtered `subscriptions` (filter, context, id) may
    /// receive `record`, in order, judged together.
    fn judge<'c>(
        &mut self,
        filters: &FilterSet,
        record: RecordView<'_>,
        subscriptions: impl Iterator<Item = (&'c str, &'c Context, u64)>,
    ) -> Vec<bool> {
        let mut subscriptions = subscriptions.peekable();
        if subscriptions.peek().is_none() {
            return Vec::new();
        }
        let event = Self::event(&mut self.headers, record);
        self.shared.judge(filters, &event, subscriptions)
    }

    /// Whether `subscription` (id `id`) may receive `record`.
    fn allows(
        &mut self,
        filters: &FilterSet,
        subscription: &Subscription,
        id: u64,
        record: RecordView<'_>,
    ) -> bool {
        let Some(name) = &subscription.filter else {
            return true;
        };
        let event = Self::event(&mut self.headers, record);
        self.shared
            .allows(filters, name, &subscription.context, id, &event)
    }
}

/// Reads `topic` from `from` up to (not including) `until` and reports it in chunks.
async fn replay(
    store: Store,
    topic: String,
    (id, generation): (u64, u64),
    mut from: u64,
    until: u64,
    events: mpsc::Sender<ReplayEvent>,
) {
    let report = |kind| ReplayEvent {
        id,
        generation,
        kind,
    };
    while from < until {
        let limits = ReadLimits {
            max_records: REPLAY_CHUNK.min((until - from) as usize),
            max_bytes: MAX_BATCH_BYTES,
        };
        let error = match store.read_async(&topic, from, limits).await {
            Ok(batch) if !batch.records.is_empty() => {
                from = batch.next_offset;
                let records = batch
                    .records
                    .into_iter()
                    .map(|r| convert::delivery(r, vec![id]))
                    .collect();
                if events
                    .send(report(ReplayKind::Records(records)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            // Retention removed what the replay was about to read (or the whole topic).
            Ok(_) | Err(ReadError::OffsetNotRetained { .. }) => {
                let current = store.topic_info_async(&topic).await.ok().flatten();
                ReadError::HistoryLost {
                    topic: topic.clone(),
                    offset: from,
                    epoch: 0,
                    current_epoch: current.map_or(0, |i| i.epoch),
                    earliest: current.map_or(0, |i| i.earliest_offset),
                    next: current.map_or(0, |i| i.next_offset),
                }
            }
            Err(error) => error,
        };
        let _ = events.send(report(ReplayKind::Failed(error))).await;
        return;
    }
    let _ = events.send(report(ReplayKind::Done)).await;
}
