//! The producer: records are queued, gathered into batches (by count, bytes and a
//! linger time), and sent pipelined on one `PublishStream`; each record's position
//! comes back through the future [`Producer::send`] returns.
//!
//! Retries: a batch refused with a retryable code (`UNAVAILABLE`,
//! `RESOURCE_EXHAUSTED`, …) is sent again after a backoff, and when the stream
//! breaks, every batch still waiting for its answer is sent again, in order, on a
//! new stream. A batch the broker wrote before the stream broke can so be written
//! twice (at-least-once), and a batch retried after a refusal can land after batches
//! sent later; with `max_in_flight = 1` order is kept whatever happens.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;
use switchyard_proto::{self as pb, EncodedPublishRequest, PublishRecords, PublishWriter};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Streaming;
use tonic::client::Grpc;
use tonic::transport::Channel;

use crate::error::{ClientError, is_retryable_code};
use crate::subscriber::Position;

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Record {
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Record {
            topic: topic.into(),
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Adds a header (e.g. `type`, `channel_id`).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Bytes of the record's wire form.
    fn wire_len(&self) -> usize {
        PublishWriter::record_len(
            &self.topic,
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &self.payload,
        )
    }

    fn size(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
    }

    /// Writes the record in its wire form (it is not kept: once queued, a batch
    /// is sent and resent from those bytes).
    fn write_to(&self, writer: &mut PublishWriter) {
        writer.push(
            &self.topic,
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &self.payload,
        );
    }
}

/// When the broker acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// In the broker's log (survives a broker crash, not a machine crash).
    #[default]
    Written,
    /// Synced to disk.
    Durable,
}

/// How the producer batches and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Records per batch at most.
    pub max_batch_records: usize,
    /// Bytes of records per batch at most (the broker takes up to 16 MiB).
    pub max_batch_bytes: usize,
    /// How long the first record of a batch may wait for company.
    pub linger: Duration,
    pub ack: Ack,
    /// Batches sent and not yet answered, at most.
    pub max_in_flight: usize,
    /// Attempts at a batch beyond the first before its records fail.
    pub max_retries: u32,
    /// Wait before the first retry; doubles up to two seconds.
    pub retry_backoff: Duration,
    /// Records queued before [`Producer::send`] waits (back-pressure).
    pub queue_records: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            max_batch_records: 1000,
            max_batch_bytes: 1 << 20,
            linger: Duration::from_millis(1),
            ack: Ack::Written,
            max_in_flight: 64,
            max_retries: 10,
            retry_backoff: Duration::from_millis(50),
            queue_records: 100_000,
        }
    }
}

type Reply = oneshot::Sender<Result<Position, ClientError>>;
type BatchReply = oneshot::Sender<Result<Vec<Position>, ClientError>>;

/// Largest batch sent (the broker's limit), in record bytes.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Largest record that fits a gRPC message with room for framing.
const MAX_RECORD_BYTES: usize = crate::MAX_MESSAGE_BYTES - (1 << 20);

/// What waits in the queue: a record for the batcher to gather, or a batch the
/// caller gathered, sent as it is.
enum Queued {
    One {
        record: Record,
        reply: Reply,
    },
    Whole {
        records: PublishRecords,
        reply: BatchReply,
        /// Holds the records' share of the queue until the batch is sent.
        _permit: OwnedSemaphorePermit,
    },
}

/// Who waits for a batch's answer.
enum Replies {
    /// One waiter per record (records sent with [`Producer::send`]).
    Each(Vec<Reply>),
    /// One waiter for the batch ([`Producer::send_batch`]).
    Whole(BatchReply),
}

impl Replies {
    fn succeed(self, positions: Vec<Position>) {
        let positions = positions.into_iter();
        match self {
            Replies::Each(replies) => {
                for (reply, position) in replies.into_iter().zip(positions) {
                    let _ = reply.send(Ok(position));
                }
            }
            Replies::Whole(reply) => {
                let _ = reply.send(Ok(positions.collect()));
            }
        }
    }

    fn fail(self, error: ClientError) {
        match self {
            Replies::Each(replies) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            Replies::Whole(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A batch sent and not yet answered.
struct InFlight {
    request_id: u64,
    records: PublishRecords,
    replies: Replies,
    attempts: u32,
    /// Refused with a retryable code: sent again at this time. Each refused batch
    /// waits out its own backoff while the others' answers are taken, so how long
    /// the producer takes to give up does not grow with the batches in flight.
    retry_at: Option<Instant>,
}

/// A record's acknowledgement, to await.
#[derive(Debug)]
pub struct PendingPosition(oneshot::Receiver<Result<Position, ClientError>>);

impl std::future::Future for PendingPosition {
    type Output = Result<Position, ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// The acknowledgement of a batch sent with [`Producer::send_batch`], to await: the
/// positions of its records, in order.
///
/// A batch larger than the batch limits travels in parts; if a part fails, the
/// error is returned and parts before it may have been written (at-least-once, as
/// for retries: resending the whole batch can write those records twice).
#[derive(Debug)]
pub struct PendingBatch {
    parts: Vec<oneshot::Receiver<Result<Vec<Position>, ClientError>>>,
    done: usize,
    positions: Vec<Position>,
}

impl std::future::Future for PendingBatch {
    type Output = Result<Vec<Position>, ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        assert!(
            this.done != usize::MAX,
            "PendingBatch polled after it completed"
        );
        while this.done < this.parts.len() {
            match std::pin::Pin::new(&mut this.parts[this.done]).poll(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Ok(Ok(positions))) => {
                    this.positions.extend(positions);
                    this.done += 1;
                }
                std::task::Poll::Ready(Ok(Err(error))) => {
                    this.done = usize::MAX;
                    return std::task::Poll::Ready(Err(error));
                }
                std::task::Poll::Ready(Err(_)) => {
                    this.done = usize::MAX;
                    return std::task::Poll::Ready(Err(ClientError::Closed));
                }
            }
        }
        this.done = usize::MAX;
        std::task::Poll::Ready(Ok(std::mem::take(&mut this.positions)))
    }
}

/// Publishes records in batches. Cheap to clone; clones share the batching task.
#[derive(Debug, Clone)]
pub struct Producer {
    queue: mpsc::Sender<Queued>,
    /// Records queued by [`Producer::send_batch`], bounded like the queue.
    batch_room: Arc<Semaphore>,
    queue_records: usize,
    max_batch_records: usize,
    max_batch_bytes: usize,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queued::One { record, .. } => f.debug_struct("One").field("record", record).finish(),
            Queued::Whole { records, .. } => f
                .debug_struct("Whole")
                .field("records", &records.len())
                .finish(),
        }
    }
}

impl Producer {
    /// Connects to the broker at `address` and starts the batching task.
    pub async fn connect(address: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let grpc = crate::connect_grpc(address).await?;
        let mut config = config;
        config.max_in_flight = config.max_in_flight.max(1);
        config.max_batch_records = config.max_batch_records.max(1);
        // A batch must fit one gRPC message and the broker's batch limit.
        config.max_batch_bytes = config.max_batch_bytes.clamp(1, MAX_BATCH_BYTES);
        let queue_records = config.queue_records.max(1);
        let (queue, records) = mpsc::channel(queue_records);
        let producer = Producer {
            queue,
            batch_room: Arc::new(Semaphore::new(queue_records)),
            queue_records,
            max_batch_records: config.max_batch_records,
            max_batch_bytes: config.max_batch_bytes,
        };
        tokio::spawn(Batcher::new(grpc, config).run(records));
        Ok(producer)
    }

    /// Queues `record` (waiting while the queue is full) and returns its
    /// acknowledgement to await.
    ///
    /// The topic name is checked here, by the broker's rules, so that one bad name
    /// fails its own record instead of the batch it would have travelled in.
    pub async fn send(&self, record: Record) -> Result<PendingPosition, ClientError> {
        check_record(&record)?;
        let (reply, receiver) = oneshot::channel();
        self.queue
            .send(Queued::One { record, reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(PendingPosition(receiver))
    }

    /// Queues records gathered by the caller, to be sent as they are — in as few
    /// batches as the batch limits allow, after any records queued before, without
    /// waiting for the linger time — and returns one acknowledgement for all of them.
    ///
    /// This is the fast path for producers that have many records at hand: no
    /// per-record bookkeeping. Every record is checked first; if one is invalid,
    /// nothing is sent and that record's error is returned.
    ///
    /// The records are borrowed: they are written into requests here, and what
    /// travels (and is resent after a reconnect) is that written form. A producer
    /// may send the same records again, or refill its vector, without cloning.
    pub async fn send_batch(&self, records: &[Record]) -> Result<PendingBatch, ClientError> {
        for record in records {
            check_record(record)?;
        }
        let mut parts = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            // As many records as the batch limits allow (at least one), in a
            // buffer of exactly their wire size.
            let (mut count, mut bytes, mut wire) = (0, 0, 0);
            for record in rest {
                if count > 0
                    && (count == self.max_batch_records
                        || bytes + record.size() > self.max_batch_bytes)
                {
                    break;
                }
                count += 1;
                bytes += record.size();
                wire += record.wire_len();
            }
            let mut part = PublishWriter::with_capacity(wire);
            for record in &rest[..count] {
                record.write_to(&mut part);
            }
            rest = &rest[count..];
            let part = part.finish();
            let permits = part.len().min(self.queue_records) as u32;
            let permit = self
                .batch_room
                .clone()
                .acquire_many_owned(permits)
                .await
                .map_err(|_| ClientError::Closed)?;
            let (reply, receiver) = oneshot::channel();
            self.queue
                .send(Queued::Whole {
                    records: part,
                    reply,
                    _permit: permit,
                })
                .await
                .map_err(|_| ClientError::Closed)?;
            parts.push(receiver);
        }
        Ok(PendingBatch {
            parts,
            done: 0,
            positions: Vec::new(),
        })
    }

    /// Publishes `record` and waits for its position.
    pub async fn publish(&self, record: Record) -> Result<Position, ClientError> {
        self.send(record).await?.await
    }
}

/// Requests to a `PublishStream` and its answers.
type PublishStream = (
    mpsc::Sender<EncodedPublishRequest>,
    Streaming<pb::PublishResponse>,
);

/// The batching task.
struct Batcher {
    grpc: Grpc<Channel>,
    config: ProducerConfig,
    /// Requests to the current stream and its answers.
    stream: Option<PublishStream>,
    in_flight: VecDeque<InFlight>,
    /// In-flight batches waiting out a backoff (`retry_at` set).
    waiting: usize,
    next_request: u64,
}

impl Batcher {
    fn new(grpc: Grpc<Channel>, config: ProducerConfig) -> Self {
        Batcher {
            grpc,
            config,
            stream: None,
            in_flight: VecDeque::new(),
            waiting: 0,
            next_request: 1,
        }
    }

    async fn run(mut self, mut queue: mpsc::Receiver<Queued>) {
        let mut batch: Vec<(Record, Reply)> = Vec::new();
        let mut batch_bytes = 0;
        let mut deadline: Option<Instant> = None;
        let mut queue_open = true;
        // A caller's batch, sent once the records gathered before it are.
        let mut whole: Option<(PublishRecords, BatchReply, OwnedSemaphorePermit)> = None;
        loop {
            if !queue_open && batch.is_empty() && whole.is_none() && self.in_flight.is_empty() {
                return;
            }
            let room = self.in_flight.len() < self.config.max_in_flight;
            if whole.is_some() && room {
                if batch.is_empty() {
                    let (records, reply, permit) = whole.take().expect("checked");
                    self.dispatch(records, Replies::Whole(reply)).await;
                    // The records now count against the in-flight bound instead.
                    drop(permit);
                } else {
                    self.dispatch_gathered(std::mem::take(&mut batch)).await;
                    batch_bytes = 0;
                    deadline = None;
                }
                continue;
            }
            let full = batch.len() >= self.config.max_batch_records
                || batch_bytes >= self.config.max_batch_bytes;
            if (full || (!queue_open && !batch.is_empty())) && room {
                self.dispatch_gathered(std::mem::take(&mut batch)).await;
                batch_bytes = 0;
                deadline = None;
                continue;
            }
            let retry = self.next_retry();
            tokio::select! {
                queued = queue.recv(), if queue_open && room && !full && whole.is_none() => match queued {
                    Some(Queued::One { record, reply }) => {
                        batch_bytes += record.size();
                        batch.push((record, reply));
                        deadline.get_or_insert_with(|| Instant::now() + self.config.linger);
                    }
                    Some(Queued::Whole { records, reply, _permit }) => whole = Some((records, reply, _permit)),
                    None => queue_open = false,
                },
                () = sleep_until(deadline), if deadline.is_some() && room => {
                    self.dispatch_gathered(std::mem::take(&mut batch)).await;
                    batch_bytes = 0;
                    deadline = None;
                }
                answer = next_answer(&mut self.stream), if !self.in_flight.is_empty() => self.answered(answer).await,
                () = sleep_until(retry), if retry.is_some() => self.retry_due().await,
            }
        }
    }

    /// Sends the records gathered from [`Producer::send`].
    async fn dispatch_gathered(&mut self, batch: Vec<(Record, Reply)>) {
        if batch.is_empty() {
            return;
        }
        let mut writer =
            PublishWriter::with_capacity(batch.iter().map(|(record, _)| record.wire_len()).sum());
        let replies = batch
            .into_iter()
            .map(|(record, reply)| {
                record.write_to(&mut writer);
                reply
            })
            .collect();
        self.dispatch(writer.finish(), Replies::Each(replies)).await;
    }

    /// Sends a new batch.
    async fn dispatch(&mut self, records: PublishRecords, replies: Replies) {
        let request_id = self.next_request;
        self.next_request += 1;
        self.in_flight.push_back(InFlight {
            request_id,
            records,
            replies,
            attempts: 0,
            retry_at: None,
        });
        let index = self.in_flight.len() - 1;
        if self.send(index).await.is_err() {
            self.reconnect().await;
        }
    }

    fn request(&self, index: usize) -> EncodedPublishRequest {
        let batch = &self.in_flight[index];
        let ack = match self.config.ack {
            Ack::Written => pb::AckLevel::Written,
            Ack::Durable => pb::AckLevel::Durable,
        };
        EncodedPublishRequest {
            request_id: batch.request_id,
            ack,
            // A reference count: the records were written once, when queued.
            records: batch.records.clone(),
            // One run per topic in the batch, rather than a position per record.
            want_position_runs: true,
        }
    }

    /// Sends in-flight batch `index` on the current stream (opening one if needed).
    async fn send(&mut self, index: usize) -> Result<(), ClientError> {
        if self.stream.is_none() {
            let (requests, receiver) = mpsc::channel(self.config.max_in_flight.max(1) * 2);
            let responses = crate::codec::publish_stream(
                &mut self.grpc,
                tokio_stream::wrappers::ReceiverStream::new(receiver),
            )
            .await?;
            self.stream = Some((requests, responses));
        }
        let request = self.request(index);
        let (requests, _) = self.stream.as_ref().expect("opened above");
        requests
            .send(request)
            .await
            .map_err(|_| ClientError::Unreachable("publish stream closed".into()))
    }

    /// The stream broke: open a new one and send every unanswered batch again, in
    /// order, with backoff; batches out of attempts fail.
    async fn reconnect(&mut self) {
        self.stream = None;
        let mut backoff = self.config.retry_backoff;
        loop {
            for batch in &mut self.in_flight {
                batch.attempts += 1;
                // Sent again below with the rest, whatever its own backoff.
                batch.retry_at = None;
            }
            self.waiting = 0;
            // Every batch out of attempts fails, not only those at the front: one
            // refused before may have used more than the batches ahead of it.
            let max_retries = self.config.max_retries;
            let (failed, kept): (VecDeque<InFlight>, VecDeque<InFlight>) = self
                .in_flight
                .drain(..)
                .partition(|b| b.attempts > max_retries);
            self.in_flight = kept;
            for batch in failed {
                batch
                    .replies
                    .fail(ClientError::Unreachable("gave up after retries".into()));
            }
            if self.in_flight.is_empty() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            let mut sent = Ok(());
            for index in 0..self.in_flight.len() {
                sent = self.send(index).await;
                if sent.is_err() {
                    break;
                }
            }
            match sent {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, "reconnecting the publish stream failed");
                    self.stream = None;
                }
            }
        }
    }

    /// When the next refused batch is due to be sent again.
    fn next_retry(&self) -> Option<Instant> {
        if self.waiting == 0 {
            return None;
        }
        self.in_flight.iter().filter_map(|b| b.retry_at).min()
    }

    /// Sends again, in order and under new request ids, the refused batches whose
    /// backoff is over.
    async fn retry_due(&mut self) {
        let now = Instant::now();
        for index in 0..self.in_flight.len() {
            if self.in_flight[index].retry_at.is_some_and(|at| at <= now) {
                self.in_flight[index].retry_at = None;
                self.waiting -= 1;
                self.in_flight[index].request_id = self.next_request;
                self.next_request += 1;
                if self.send(index).await.is_err() {
                    // Sends every batch still in flight again, these included.
                    return self.reconnect().await;
                }
            }
        }
    }

    async fn answered(&mut self, answer: Option<Result<pb::PublishResponse, tonic::Status>>) {
        let response = match answer {
            Some(Ok(response)) => response,
            Some(Err(status)) => {
                tracing::debug!(%status, "publish stream broke");
                return self.reconnect().await;
            }
            None => return self.reconnect().await,
        };
        let Some(index) = self
            .in_flight
            .iter()
            .position(|b| b.request_id == response.request_id)
        else {
            return;
        };
        match response.error {
            None => {
                let batch = self.in_flight.remove(index).expect("found");
                match positions(response, batch.records.len()) {
                    Ok(positions) => batch.replies.succeed(positions),
                    Err(error) => batch.replies.fail(error),
                }
            }
            Some(error) => {
                let code = tonic::Code::from_i32(error.code);
                let batch = &mut self.in_flight[index];
                batch.attempts += 1;
                if is_retryable_code(code) && batch.attempts <= self.config.max_retries {
                    let wait = self.config.retry_backoff * 2u32.saturating_pow(batch.attempts - 1);
                    batch.retry_at = Some(Instant::now() + wait.min(Duration::from_secs(2)));
                    self.waiting += 1;
                } else {
                    let batch = self.in_flight.remove(index).expect("found");
                    batch.replies.fail(ClientError::Refused {
                        code,
                        message: error.message,
                    });
                }
            }
        }
    }
}

/// The positions of a written batch of `count` records, from runs (or, from a
/// broker that does not send runs, one by one).
fn positions(response: pb::PublishResponse, count: usize) -> Result<Vec<Position>, ClientError> {
    let answered = if response.position_runs.is_empty() {
        response.positions.len() as u64
    } else {
        response
            .position_runs
            .iter()
            .fold(0u64, |total, run| total.saturating_add(run.count))
    };
    if answered != count as u64 {
        // The batch was written, but where is unknown: not worth a retry.
        return Err(ClientError::Refused {
            code: tonic::Code::Internal,
            message: format!(
                "the broker answered a batch of {count} records with {answered} positions"
            ),
        });
    }
    let mut positions = Vec::with_capacity(count);
    if response.position_runs.is_empty() {
        positions.extend(response.positions.iter().map(|p| Position {
            offset: p.offset,
            epoch: p.epoch,
        }));
    }
    for run in &response.position_runs {
        positions.extend((0..run.count).map(|i| Position {
            offset: run.offset.wrapping_add(i),
            epoch: run.epoch,
        }));
    }
    Ok(positions)
}

/// The broker's topic name rules (docs/storage-format.md): 1 to 255 bytes of ASCII
/// letters, digits and `.` `_` `-` `:`, with no empty dot-separated segment.
fn check_topic(topic: &str) -> Result<(), ClientError> {
    // One pass (this runs for every record sent): a dot may not start or end the
    // name, nor follow another.
    let bytes = topic.as_bytes();
    let mut previous = b'.';
    let valid = !bytes.is_empty()
        && bytes.len() <= 255
        && bytes.iter().all(|&b| {
            let ok = match b {
                b'.' => previous != b'.',
                b => b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'),
            };
            previous = b;
            ok
        })
        && previous != b'.';
    if valid {
        Ok(())
    } else {
        Err(ClientError::Refused {
            code: tonic::Code::InvalidArgument,
            message: format!(
                "invalid topic name {topic:?}: 1 to 255 bytes of ASCII letters, digits and . _ - :, \
                 with no empty dot-separated segment"
            ),
        })
    }
}

/// The checks made before a record is queued.
fn check_record(record: &Record) -> Result<(), ClientError> {
    check_topic(&record.topic)?;
    if record.size() > MAX_RECORD_BYTES {
        return Err(ClientError::Refused {
            code: tonic::Code::InvalidArgument,
            message: format!(
                "record for {:?} is {} bytes; no broker accepts more than {MAX_RECORD_BYTES}",
                record.topic,
                record.size()
            ),
        });
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next_answer(
    stream: &mut Option<PublishStream>,
) -> Option<Result<pb::PublishResponse, tonic::Status>> {
    match stream {
        Some((_, responses)) => responses.message().await.transpose(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, epoch: u64, count: u64) -> pb::PositionRun {
        pb::PositionRun {
            offset,
            epoch,
            count,
        }
    }

    #[test]
    fn topic_names_are_checked_by_the_brokers_rules() {
        let longest = "a".repeat(255);
        for good in ["guild.1", "a", "user:1_x-y.Z9", "a.b.c", longest.as_str()] {
            assert!(check_topic(good).is_ok(), "{good:?}");
        }
        let too_long = "a".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            ".a",
            "a.",
            "a..b",
            "a b",
            "a/b",
            "gu\u{e9}ld",
            too_long.as_str(),
        ] {
            let error = check_topic(bad).unwrap_err();
            assert!(!error.is_retryable(), "{bad:?}");
        }
    }

    #[test]
    fn positions_come_from_runs_or_one_by_one_and_a_wrong_count_is_an_error() {
        let runs = pb::PublishResponse {
            position_runs: vec![run(5, 1, 2), run(0, 3, 1)],
            ..Default::default()
        };
        let expected = [(5, 1), (6, 1), (0, 3)].map(|(offset, epoch)| Position { offset, epoch });
        assert_eq!(positions(runs.clone(), 3).unwrap(), expected);
        let one_by_one = pb::PublishResponse {
            positions: expected
                .iter()
                .map(|p| pb::Position {
                    offset: p.offset,
                    epoch: p.epoch,
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(positions(one_by_one, 3).unwrap(), expected);
        // Too few, too many, or a count that would not fit in memory: refused
        // before anything is expanded.
        for (response, count) in [
            (runs.clone(), 4),
            (runs, 2),
            (
                pb::PublishResponse {
                    position_runs: vec![run(0, 1, u64::MAX), run(0, 1, 2)],
                    ..Default::default()
                },
                1,
            ),
        ] {
            let error = positions(response, count).unwrap_err();
            assert!(!error.is_retryable(), "{error}");
        }
    }
}
