//! The client against a real broker on a loopback port: batching, order, refusals,
//! reconnect and resume after a broker restart and after a slow-consumer cut-off.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use switchyard_broker::server::{self, ServerConfig};
use switchyard_broker::storage::{FsyncPolicy, Store, StoreConfig};
use switchyard_client::{
    ClientError, Producer, ProducerConfig, Record, Start, Subscriber, SubscriberEvent,
};
use tokio::sync::oneshot;

/// A broker serving `data_dir` on `address` (port 0 for any).
struct Broker {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    store: Store,
}

impl Broker {
    async fn start(data_dir: &Path, address: &str, config: ServerConfig) -> Broker {
        let mut storage = StoreConfig::new(data_dir);
        storage.shard_count = 4;
        storage.segment_bytes = 8 << 20;
        storage.max_batch_bytes = 4 << 20;
        storage.fsync = FsyncPolicy::Never;
        Broker::start_store(storage, address, config).await
    }

    async fn start_store(storage: StoreConfig, address: &str, config: ServerConfig) -> Broker {
        let store = Store::open(storage).unwrap();
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = store.clone();
        let task = tokio::spawn(async move {
            server::run(listener, None, serving, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Broker {
            address,
            stop,
            task,
            store,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close().unwrap())
            .await
            .unwrap();
    }
}

/// The next delivery, skipping other events, within ten seconds.
async fn next_delivery(subscriber: &mut Subscriber) -> switchyard_client::Delivery {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .expect("an event within 10 s")
            .expect("the subscriber is open");
        if let SubscriberEvent::Delivery(delivery) = event {
            return delivery;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_batches_pipelines_and_keeps_per_topic_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let producer = Producer::connect(&broker.url(), ProducerConfig::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..10_000u32 {
        let topic = format!("guild.{}", i % 10);
        pending.push((
            topic.clone(),
            i,
            producer
                .send(Record::new(topic, i.to_string()))
                .await
                .unwrap(),
        ));
    }
    let mut next = [0u64; 10];
    for (_, i, position) in pending {
        let position = position.await.unwrap();
        assert_eq!(position.offset, next[(i % 10) as usize], "record {i}");
        next[(i % 10) as usize] += 1;
    }
    // A bad topic fails its own record only.
    let bad = producer
        .send(Record::new("bad topic", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            bad,
            ClientError::Refused {
                code: tonic::Code::InvalidArgument,
                ..
            }
        ),
        "{bad}"
    );
    assert!(!bad.is_retryable());
    let good = producer
        .publish(Record::new("guild.0", "after").header("type", "X"))
        .await
        .unwrap();
    assert_eq!(good.offset, 1000);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_sends_in_order_after_earlier_records_and_checks_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let config = ProducerConfig {
        max_batch_records: 300,
        // A long linger: the batch must not wait for it, nor overtake this record.
        linger: Duration::from_secs(30),
        queue_records: 500,
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(&broker.url(), config).await.unwrap();
    let first = producer
        .send(Record::new("guild.1", "first"))
        .await
        .unwrap();
    // 2,500 records over two topics: split into batches of at most 300, and
    // queued past the 500-record queue bound as earlier batches go out.
    let records: Vec<Record> = (0..2_500u32)
        .map(|i| Record::new(format!("guild.{}", 1 + i % 2), i.to_string()))
        .collect();
    let positions = tokio::time::timeout(Duration::from_secs(10), async {
        producer.send_batch(&records).await.unwrap().await.unwrap()
    })
    .await
    .expect("a batch does not wait for the linger time");
    assert_eq!(first.await.unwrap().offset, 0);
    assert_eq!(positions.len(), 2_500);
    for (i, position) in positions.iter().enumerate() {
        // guild.1 had "first" at offset 0.
        let expected = if i % 2 == 0 { 1 + i / 2 } else { i / 2 };
        assert_eq!(position.offset, expected as u64, "record {i}");
    }
    // The same records again (borrowed, not consumed): they follow the first copies.
    let again = producer.send_batch(&records).await.unwrap().await.unwrap();
    assert_eq!(again.len(), 2_500);
    for (i, position) in again.iter().enumerate() {
        let expected = if i % 2 == 0 {
            1_251 + i / 2
        } else {
            1_250 + i / 2
        };
        assert_eq!(position.offset, expected as u64, "record {i} sent again");
    }
    // One bad record: an error naming it, and nothing of the batch is sent.
    let error = producer
        .send_batch(&[Record::new("guild.3", "ok"), Record::new("guild 3", "bad")])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Refused { code: tonic::Code::InvalidArgument, message } if message.contains("guild 3")),
        "{error}"
    );
    let after = producer
        .send_batch(&[Record::new("guild.3", "after")])
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        after[0].offset, 0,
        "guild.3 got nothing from the refused batch"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_events_hands_out_what_arrived_together_in_order_with_next() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let producer = Producer::connect(&broker.url(), ProducerConfig::default())
        .await
        .unwrap();
    let mut subscriber = Subscriber::connect(&broker.url()).await.unwrap();
    subscriber
        .subscribe(1, "guild.1", Start::Earliest)
        .await
        .unwrap();
    let records: Vec<Record> = (0..3_000u32)
        .map(|i| Record::new("guild.1", i.to_string()))
        .collect();
    producer.send_batch(&records).await.unwrap().await.unwrap();
    // `next` and `next_events` mixed: every record once, in order.
    let mut offsets = Vec::new();
    let mut batches = 0;
    while offsets.len() < 3_000 {
        if offsets.len() == 10 {
            offsets.push(next_delivery(&mut subscriber).await.offset);
            continue;
        }
        let events = tokio::time::timeout(Duration::from_secs(10), subscriber.next_events())
            .await
            .expect("events within 10 s")
            .expect("the subscriber is open");
        assert!(!events.is_empty());
        batches += 1;
        for event in events {
            if let SubscriberEvent::Delivery(delivery) = event {
                assert_eq!(delivery.payload, delivery.offset.to_string().as_bytes());
                offsets.push(delivery.offset);
            }
        }
    }
    assert_eq!(offsets, (0..3_000).collect::<Vec<u64>>());
    assert!(
        batches < 1_000,
        "{batches} calls for 3,000 records: not batched"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let producer = Producer::connect(&broker.url(), ProducerConfig::default())
        .await
        .unwrap();
    let error = producer
        .publish(Record::new("guild.1", vec![0u8; 2 << 20]))
        .await
        .unwrap_err();
    match error {
        ClientError::Refused { code, message } => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_wait_out_their_backoffs_together_and_then_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = StoreConfig::new(dir.path());
    storage.shard_count = 1;
    storage.segment_bytes = 1 << 20;
    storage.max_batch_bytes = 512 << 10;
    storage.max_record_bytes = 512 << 10;
    storage.fsync = FsyncPolicy::Never;
    // One segment, and nothing old enough to be deleted: the disk is full for the
    // broker once the segment is.
    storage.disk_budget_bytes = Some(1 << 20);
    let broker = Broker::start_store(storage, "127.0.0.1:0", ServerConfig::default()).await;
    let no_retries = ProducerConfig {
        max_retries: 0,
        ..ProducerConfig::default()
    };
    let filler = Producer::connect(&broker.url(), no_retries).await.unwrap();
    let mut written = 0;
    let full = loop {
        match filler
            .publish(Record::new("guild.1", vec![7u8; 100 << 10]))
            .await
        {
            Ok(_) => written += 1,
            Err(error) => break error,
        }
        assert!(
            written < 20,
            "a 1 MiB budget took {written} records of 100 KiB"
        );
    };
    assert!(written >= 5, "only {written} records fit: {full}");

    // Eight batches in flight, each refused, retried once after 2 s (the longest
    // backoff), refused again. Waiting out one backoff after another takes 16 s.
    let backoff = Duration::from_secs(2);
    let config = ProducerConfig {
        max_in_flight: 8,
        max_retries: 1,
        retry_backoff: backoff,
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(&broker.url(), config).await.unwrap();
    let started = std::time::Instant::now();
    let mut pending = Vec::new();
    for i in 0..8 {
        let record = Record::new(format!("guild.{i}"), vec![1u8; 200 << 10]);
        pending.push(producer.send_batch(&[record]).await.unwrap());
    }
    for batch in pending {
        match batch.await.unwrap_err() {
            ClientError::Refused { code, message } => {
                assert_eq!(code, tonic::Code::ResourceExhausted);
                assert!(message.contains("disk budget"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= backoff,
        "gave up after {took:?}, before the backoff"
    );
    assert!(
        took < backoff * 4,
        "eight refused batches took {took:?} to fail: their backoffs were waited out one after another"
    );

    // What was written before the budget ran out is all there.
    let mut subscriber = Subscriber::connect(&broker.url()).await.unwrap();
    subscriber
        .subscribe(1, "guild.1", Start::Earliest)
        .await
        .unwrap();
    for offset in 0..written {
        let delivery = next_delivery(&mut subscriber).await;
        assert_eq!(delivery.offset, offset);
        assert_eq!(delivery.payload.len(), 100 << 10);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_reconnects_and_resumes_after_the_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let address = broker.address.to_string();
    let url = broker.url();
    let producer = Producer::connect(&url, ProducerConfig::default())
        .await
        .unwrap();
    for i in 0..100u32 {
        producer
            .send(Record::new("guild.1", i.to_string()))
            .await
            .unwrap();
    }
    producer
        .publish(Record::new("guild.1", "100"))
        .await
        .unwrap();

    let mut subscriber = Subscriber::connect(&url).await.unwrap();
    subscriber
        .subscribe(1, "guild.1", Start::Earliest)
        .await
        .unwrap();
    for offset in 0..=100u64 {
        assert_eq!(next_delivery(&mut subscriber).await.offset, offset);
    }
    // The broker goes away and comes back on the same address and data.
    broker.stop().await;
    let broker = Broker::start(dir.path(), &address, ServerConfig::default()).await;
    let producer = Producer::connect(&url, ProducerConfig::default())
        .await
        .unwrap();
    for i in 101..200u32 {
        producer
            .publish(Record::new("guild.1", i.to_string()))
            .await
            .unwrap();
    }
    // Exactly the records after the last one delivered, once each.
    for offset in 101..200u64 {
        let delivery = next_delivery(&mut subscriber).await;
        assert_eq!(delivery.offset, offset);
        assert_eq!(delivery.payload, offset.to_string().as_bytes());
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_cut_off_as_slow_resumes_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_pending_bytes_per_stream: 512 << 10,
        ..ServerConfig::default()
    };
    let broker = Broker::start(dir.path(), "127.0.0.1:0", config).await;
    let mut subscriber = Subscriber::connect(&broker.url()).await.unwrap();
    subscriber
        .subscribe(1, "guild.1", Start::Latest)
        .await
        .unwrap();
    assert!(matches!(
        subscriber.next().await,
        Some(SubscriberEvent::Started { id: 1, .. })
    ));
    // 20 MB published while the application reads nothing.
    let producer = Producer::connect(&broker.url(), ProducerConfig::default())
        .await
        .unwrap();
    let payload = "y".repeat(4000);
    let mut last = None;
    for _ in 0..5000 {
        last = Some(
            producer
                .send(Record::new("guild.1", payload.clone()))
                .await
                .unwrap(),
        );
    }
    last.unwrap().await.unwrap();
    let mut disconnected = false;
    let mut expected = 0u64;
    while expected < 5000 {
        match tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .unwrap()
            .unwrap()
        {
            SubscriberEvent::Delivery(delivery) => {
                assert_eq!(delivery.offset, expected, "no gap, no repeat");
                expected += 1;
            }
            SubscriberEvent::Disconnected { error } => {
                assert!(error.to_string().contains("slow consumer"), "{error}");
                disconnected = true;
            }
            SubscriberEvent::Reconnected | SubscriberEvent::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(disconnected, "the broker should have cut the stream off");
    assert!(broker.store.stats().records_appended >= 5000);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_each_keep_their_order_and_offsets_have_no_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let mut tasks = Vec::new();
    for producer_id in 0..4u32 {
        let url = broker.url();
        tasks.push(tokio::spawn(async move {
            let producer = Producer::connect(&url, ProducerConfig::default())
                .await
                .unwrap();
            let mut pending = Vec::new();
            for seq in 0..2000u32 {
                let record =
                    Record::new(format!("guild.{}", seq % 3), format!("{producer_id}:{seq}"));
                pending.push(producer.send(record).await.unwrap());
            }
            for position in pending {
                position.await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut subscriber = Subscriber::connect(&broker.url()).await.unwrap();
    for topic in 0..3u64 {
        subscriber
            .subscribe(topic, format!("guild.{topic}"), Start::Earliest)
            .await
            .unwrap();
    }
    let mut next_offset = [0u64; 3];
    let mut last_seq = std::collections::HashMap::new();
    for _ in 0..8000 {
        let delivery = next_delivery(&mut subscriber).await;
        let topic: usize = delivery.topic.trim_start_matches("guild.").parse().unwrap();
        assert_eq!(
            delivery.offset, next_offset[topic],
            "gap-free offsets on {}",
            delivery.topic
        );
        next_offset[topic] += 1;
        let text = String::from_utf8(delivery.payload.to_vec()).unwrap();
        let (producer, seq) = text.split_once(':').unwrap();
        let seq: u32 = seq.parse().unwrap();
        if let Some(previous) = last_seq.insert((producer.to_owned(), topic), seq) {
            assert!(
                previous < seq,
                "producer {producer} on {topic}: {previous} before {seq}"
            );
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_id_is_reused_only_after_its_removal() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let mut subscriber = Subscriber::connect(&broker.url()).await.unwrap();
    subscriber
        .subscribe(1, "guild.1", Start::Latest)
        .await
        .unwrap();
    assert!(matches!(
        subscriber.next().await,
        Some(SubscriberEvent::Started { id: 1, .. })
    ));
    // The id is in use: refused here, and the subscription keeps working.
    subscriber
        .subscribe(1, "guild.2", Start::Latest)
        .await
        .unwrap();
    match subscriber.next().await {
        Some(SubscriberEvent::Refused { id: 1, error }) => {
            assert!(
                matches!(
                    error,
                    ClientError::Refused {
                        code: tonic::Code::AlreadyExists,
                        ..
                    }
                ),
                "{error}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let producer = Producer::connect(&broker.url(), ProducerConfig::default())
        .await
        .unwrap();
    producer.publish(Record::new("guild.1", "a")).await.unwrap();
    assert_eq!(next_delivery(&mut subscriber).await.topic, "guild.1");
    // Removed, then reused for another topic.
    subscriber.unsubscribe(1).await.unwrap();
    assert!(matches!(
        subscriber.next().await,
        Some(SubscriberEvent::Removed { id: 1 })
    ));
    subscriber
        .subscribe(1, "guild.2", Start::Latest)
        .await
        .unwrap();
    assert!(matches!(
        subscriber.next().await,
        Some(SubscriberEvent::Started { id: 1, .. })
    ));
    producer.publish(Record::new("guild.1", "b")).await.unwrap();
    producer.publish(Record::new("guild.2", "c")).await.unwrap();
    let delivery = next_delivery(&mut subscriber).await;
    assert_eq!(
        (delivery.topic.as_str(), &delivery.payload[..]),
        ("guild.2", &b"c"[..])
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_headers_and_ids_arrive_as_sent_and_each_subscription_resumes_from_its_own_last_record()
 {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "127.0.0.1:0", ServerConfig::default()).await;
    let address = broker.address.to_string();
    let url = broker.url();
    // Runs of one topic and single records, mixed; some with headers.
    let topic_of = |i: u32| {
        if (i / 7).is_multiple_of(2) || i.is_multiple_of(5) {
            "guild.1"
        } else {
            "guild.2"
        }
    };
    let record = |i: u32| {
        let record = Record::new(topic_of(i), format!("payload {i}"));
        match i % 3 {
            0 => record,
            1 => record.header("type", "MESSAGE_CREATE"),
            _ => record
                .header("type", "")
                .header("channel_id", i.to_string()),
        }
    };
    let producer = Producer::connect(&url, ProducerConfig::default())
        .await
        .unwrap();
    producer
        .send_batch(&(0..300).map(record).collect::<Vec<_>>())
        .await
        .unwrap()
        .await
        .unwrap();

    // guild.1 twice (ids 1 and 3), guild.2 once. Each subscription gets each of its
    // topic's records once, in order; a delivery names every subscription it is for.
    let mut subscriber = Subscriber::connect(&url).await.unwrap();
    let subscriptions = [(1, "guild.1"), (2, "guild.2"), (3, "guild.1")];
    for (id, topic) in subscriptions {
        subscriber
            .subscribe(id, topic, Start::Earliest)
            .await
            .unwrap();
    }
    let mut next_offset = std::collections::HashMap::new();
    let mut expected = |delivery: &switchyard_client::Delivery| {
        let i: u32 = std::str::from_utf8(&delivery.payload).unwrap()[8..]
            .parse()
            .unwrap();
        let sent = record(i);
        assert_eq!(delivery.topic, sent.topic);
        assert_eq!(delivery.headers, sent.headers);
        assert!(!delivery.subscription_ids.is_empty());
        for id in &delivery.subscription_ids {
            let (_, topic) = subscriptions[*id as usize - 1];
            assert_eq!(delivery.topic, topic);
            let next = next_offset.entry(*id).or_insert(0);
            assert_eq!(delivery.offset, *next, "subscription {id}");
            *next += 1;
        }
        delivery.subscription_ids.len()
    };
    let on_guild_1 = (0..300).filter(|&i| topic_of(i) == "guild.1").count();
    let mut wanted = 300 + on_guild_1;
    while wanted > 0 {
        wanted -= expected(&next_delivery(&mut subscriber).await);
    }

    // After a restart, each subscription goes on from its own last record.
    broker.stop().await;
    let broker = Broker::start(dir.path(), &address, ServerConfig::default()).await;
    let producer = Producer::connect(&url, ProducerConfig::default())
        .await
        .unwrap();
    producer
        .send_batch(&(300..320).map(record).collect::<Vec<_>>())
        .await
        .unwrap()
        .await
        .unwrap();
    let on_guild_1 = (300..320).filter(|&i| topic_of(i) == "guild.1").count();
    let mut wanted = 20 + on_guild_1;
    while wanted > 0 {
        wanted -= expected(&next_delivery(&mut subscriber).await);
    }
    broker.stop().await;
}
