//! Subscribe streams through a real broker: live tail, replay joining it, resume,
//! lost history, limits and slow consumers.

mod common;

use std::time::Duration;

use common::broker::{Broker, publish, record};
use common::subscriber::Subscriber;
use switchyard_broker::server::ServerConfig;
use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

use pb::start_position::Start;
use pb::subscribe_response::Event;
use pb::subscription_update::State;

fn latest() -> Start {
    Start::Latest(pb::Latest {})
}

fn earliest() -> Start {
    Start::Earliest(pb::Earliest {})
}

async fn publish_n(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    range: std::ops::Range<u32>,
) -> Vec<pb::Position> {
    let records = range.map(|i| record(topic, &i.to_string())).collect();
    client
        .publish(publish(0, records, pb::AckLevel::Written))
        .await
        .unwrap()
        .into_inner()
        .positions
}

fn started(update: &pb::SubscriptionUpdate) -> pb::Position {
    match &update.state {
        Some(State::Started(started)) => started.next.unwrap(),
        other => panic!("expected Started, got {other:?}"),
    }
}

#[tokio::test]
async fn live_records_arrive_in_order_once_per_stream_with_every_matching_id() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let mut subscriber = Subscriber::open(&mut client).await;
    subscriber.add(1, "guild.1", latest()).await;
    assert_eq!(started(&subscriber.update().await).offset, 0);
    subscriber.add(2, "guild.1", latest()).await;
    subscriber.update().await;
    subscriber.add(3, "user.9", latest()).await;
    subscriber.update().await;

    for chunk in 0..10 {
        publish_n(&mut client, "guild.1", chunk * 50..(chunk + 1) * 50).await;
    }
    publish_n(&mut client, "user.9", 0..1).await;
    let deliveries = subscriber.deliveries(501).await;
    let guild: Vec<&pb::Delivery> = deliveries.iter().filter(|d| d.topic == "guild.1").collect();
    assert_eq!(
        guild.len(),
        500,
        "one delivery per record, not one per subscription"
    );
    for (i, delivery) in guild.iter().enumerate() {
        assert_eq!(delivery.offset, i as u64);
        assert_eq!(delivery.payload, i.to_string().as_bytes());
        let mut ids = delivery.subscription_ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
    }
    let user = deliveries.iter().find(|d| d.topic == "user.9").unwrap();
    assert_eq!(user.subscription_ids, vec![3]);

    // After removal, only subscription 2 is named.
    subscriber.remove(1).await;
    assert!(matches!(
        subscriber.update().await.state,
        Some(State::Removed(_))
    ));
    publish_n(&mut client, "guild.1", 500..501).await;
    let after = subscriber.deliveries(1).await;
    assert_eq!(after[0].subscription_ids, vec![2]);
    broker.stop().await;
}

#[tokio::test]
async fn one_published_batch_for_many_subscriptions_goes_out_in_bounded_responses() {
    // 3,000 subscriptions to one topic on one stream, plus one to another topic:
    // each delivery of guild.1 names 3,000 ids (8-byte varints: 24 KB), so one
    // published batch of 400 records makes ~7 MB of deliveries, more than a client
    // accepts in one message (4 MiB by default). They must come in several
    // responses, in order.
    const BIG: u64 = 1 << 50;
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let mut subscriber = Subscriber::open(&mut client).await;
    for id in 1..=3000 {
        subscriber.add(BIG + id, "guild.1", latest()).await;
    }
    subscriber.add(9000, "user.9", latest()).await;
    for _ in 0..3001 {
        subscriber.update().await;
    }
    // One request with both topics interleaved: one append on the shard.
    let records = (0..400u32)
        .map(|i| match i % 4 {
            3 => record("user.9", &i.to_string()),
            _ => record("guild.1", &i.to_string()),
        })
        .collect();
    client
        .publish(publish(0, records, pb::AckLevel::Written))
        .await
        .unwrap();
    let mut responses = 0;
    let mut deliveries = Vec::new();
    while deliveries.len() < 400 {
        match subscriber
            .next()
            .await
            .expect("no response over the size limit")
        {
            Event::Deliveries(batch) => {
                responses += 1;
                deliveries.extend(batch.deliveries);
            }
            Event::Update(update) => panic!("unexpected update {update:?}"),
        }
    }
    assert!(responses >= 3, "{responses} responses");
    let (guild, user): (Vec<_>, Vec<_>) = deliveries.iter().partition(|d| d.topic == "guild.1");
    assert_eq!((guild.len(), user.len()), (300, 100));
    for (i, delivery) in guild.iter().enumerate() {
        assert_eq!(delivery.offset, i as u64);
        assert_eq!(delivery.subscription_ids.len(), 3000);
        assert!(delivery.subscription_ids.iter().all(|id| *id > BIG));
    }
    for (i, delivery) in user.iter().enumerate() {
        assert_eq!(delivery.offset, i as u64);
        assert_eq!(delivery.subscription_ids, vec![9000]);
        assert_eq!(delivery.payload, (i * 4 + 3).to_string().as_bytes());
    }
    broker.stop().await;
}

#[tokio::test]
async fn replay_from_earliest_joins_the_live_tail_without_gap_or_repeat() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    publish_n(&mut client, "guild.7", 0..3000).await;
    // A producer keeps writing while the subscription replays.
    let mut producer = broker.client().await;
    let writing = tokio::spawn(async move {
        for chunk in 0..40u32 {
            publish_n(
                &mut producer,
                "guild.7",
                3000 + chunk * 50..3000 + (chunk + 1) * 50,
            )
            .await;
        }
    });
    let mut subscriber = Subscriber::open(&mut client).await;
    subscriber.add(5, "guild.7", earliest()).await;
    assert_eq!(started(&subscriber.update().await).offset, 0);
    let deliveries = subscriber.deliveries(5000).await;
    writing.await.unwrap();
    let offsets: Vec<u64> = deliveries.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (0..5000).collect::<Vec<u64>>());
    assert!(
        deliveries
            .iter()
            .all(|d| d.payload == d.offset.to_string().as_bytes())
    );
    broker.stop().await;
}

#[tokio::test]
async fn resume_continues_exactly_and_lost_history_is_reported() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let positions = publish_n(&mut client, "user.3", 0..10).await;
    let epoch = positions[0].epoch;
    let mut subscriber = Subscriber::open(&mut client).await;
    subscriber
        .add(
            1,
            "user.3",
            Start::Resume(pb::Position { offset: 6, epoch }),
        )
        .await;
    assert_eq!(started(&subscriber.update().await).offset, 6);
    let replayed = subscriber.deliveries(4).await;
    assert_eq!(
        replayed.iter().map(|d| d.offset).collect::<Vec<_>>(),
        vec![6, 7, 8, 9]
    );

    // A position from another epoch, or past the end, is lost history.
    subscriber
        .add(
            2,
            "user.3",
            Start::Resume(pb::Position {
                offset: 6,
                epoch: epoch + 1,
            }),
        )
        .await;
    match subscriber.update().await.state {
        Some(State::HistoryLost(lost)) => {
            assert_eq!(lost.current_epoch, epoch);
            assert_eq!((lost.earliest_offset, lost.next_offset), (0, 10));
        }
        other => panic!("expected HistoryLost, got {other:?}"),
    }
    subscriber
        .add(
            3,
            "user.3",
            Start::Resume(pb::Position { offset: 50, epoch }),
        )
        .await;
    assert!(matches!(
        subscriber.update().await.state,
        Some(State::HistoryLost(_))
    ));
    // The subscription that resumed is live.
    publish_n(&mut client, "user.3", 10..11).await;
    assert_eq!(subscriber.deliveries(1).await[0].subscription_ids, vec![1]);
    broker.stop().await;
}

#[tokio::test]
async fn bad_subscriptions_are_refused_one_by_one() {
    let config = ServerConfig {
        max_subscriptions_per_stream: 2,
        max_streams: 1,
        ..ServerConfig::default()
    };
    let broker = Broker::start_with(config).await;
    let mut client = broker.client().await;
    let mut subscriber = Subscriber::open(&mut client).await;
    let code = |update: pb::SubscriptionUpdate| match update.state {
        Some(State::Error(error)) => (Code::from_i32(error.code), error.message),
        other => panic!("expected an error, got {other:?}"),
    };
    subscriber.add(1, "guild 1", latest()).await;
    let (c, message) = code(subscriber.update().await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(message.contains("guild 1"), "{message}");
    subscriber.add(1, "guild.1", latest()).await;
    subscriber.update().await;
    subscriber.add(1, "guild.2", latest()).await;
    assert_eq!(code(subscriber.update().await).0, Code::AlreadyExists);
    subscriber.add(2, "guild.2", latest()).await;
    subscriber.update().await;
    subscriber.add(3, "guild.3", latest()).await;
    assert_eq!(code(subscriber.update().await).0, Code::ResourceExhausted);
    subscriber.remove(42).await;
    assert_eq!(code(subscriber.update().await).0, Code::NotFound);
    // The stream still works, and a second stream is over the broker's limit.
    publish_n(&mut client, "guild.2", 0..1).await;
    assert_eq!(subscriber.deliveries(1).await[0].subscription_ids, vec![2]);
    let (_requests, receiver) = mpsc::channel::<pb::SubscribeRequest>(1);
    let refused = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    broker.stop().await;
}

#[tokio::test]
async fn a_burst_of_adds_is_answered_in_request_order() {
    let config = ServerConfig {
        max_subscriptions_per_stream: 300,
        ..ServerConfig::default()
    };
    let broker = Broker::start_with(config).await;
    let mut client = broker.client().await;
    let mut subscriber = Subscriber::open(&mut client).await;
    // Sent without waiting, so the broker takes them in groups: 250 good adds,
    // a repeated id, a bad topic, a removal and a re-add of the removed id, then
    // more adds than the stream may hold.
    for id in 0..250 {
        subscriber.add(id, &format!("user.{id}"), latest()).await;
    }
    subscriber.add(7, "user.other", latest()).await;
    subscriber.add(250, "bad topic", latest()).await;
    subscriber.remove(3).await;
    subscriber.add(3, "user.3b", latest()).await;
    for id in 251..320 {
        subscriber.add(id, &format!("user.{id}"), latest()).await;
    }
    let mut kinds = Vec::new();
    for _ in 0..(250 + 4 + 69) {
        let update = subscriber.update().await;
        kinds.push(match update.state {
            Some(State::Started(_)) => (update.id, "started"),
            Some(State::Removed(_)) => (update.id, "removed"),
            Some(State::Error(error)) => (
                update.id,
                match Code::from_i32(error.code) {
                    Code::AlreadyExists => "exists",
                    Code::InvalidArgument => "invalid",
                    Code::ResourceExhausted => "full",
                    other => panic!("unexpected refusal {other:?}"),
                },
            ),
            other => panic!("unexpected update {other:?}"),
        });
    }
    let mut expected: Vec<(u64, &str)> = (0..250).map(|id| (id, "started")).collect();
    expected.extend([
        (7, "exists"),
        (250, "invalid"),
        (3, "removed"),
        (3, "started"),
    ]);
    // 250 live after the removal and re-add: 50 more fit.
    expected.extend((251..301).map(|id| (id, "started")));
    expected.extend((301..320).map(|id| (id, "full")));
    assert_eq!(kinds, expected);
    // Every started subscription is live.
    publish_n(&mut client, "user.249", 0..1).await;
    assert_eq!(
        subscriber.deliveries(1).await[0].subscription_ids,
        vec![249]
    );
    publish_n(&mut client, "user.3b", 0..1).await;
    assert_eq!(subscriber.deliveries(1).await[0].subscription_ids, vec![3]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_while_a_fast_one_keeps_receiving() {
    let config = ServerConfig {
        max_pending_bytes_per_stream: 1 << 20,
        ..ServerConfig::default()
    };
    let broker = Broker::start_with(config).await;
    let mut client = broker.client().await;
    let mut slow = Subscriber::open(&mut broker.client().await).await;
    slow.add(1, "guild.1", latest()).await;
    slow.update().await;
    let mut fast = Subscriber::open(&mut broker.client().await).await;
    fast.add(1, "guild.1", latest()).await;
    fast.update().await;

    // 8 MB in batches of 200 KB. The fast subscriber reads each batch before the next
    // is published (it is never more than one batch behind); the slow one reads
    // nothing.
    let payload = "x".repeat(4000);
    let mut received = Vec::new();
    for batch in 0..40u64 {
        let records = (0..50).map(|_| record("guild.1", &payload)).collect();
        let response = client
            .publish(publish(batch, records, pb::AckLevel::Written))
            .await;
        assert!(
            response.is_ok(),
            "producers are never blocked by a slow subscriber"
        );
        received.extend(fast.deliveries(50).await);
    }
    assert_eq!(received.len(), 2000);
    assert!(
        received
            .iter()
            .enumerate()
            .all(|(i, d)| d.offset == i as u64)
    );

    // The slow subscriber finds, after what was already on its way, a clear status.
    let status = loop {
        match slow.next().await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("slow consumer"),
        "{}",
        status.message()
    );
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let mut subscriber = Subscriber::open(&mut client).await;
    subscriber.add(1, "guild.1", latest()).await;
    subscriber.update().await;
    // A graceful stop must not wait for the subscriber to leave.
    tokio::time::timeout(Duration::from_secs(10), broker.stop())
        .await
        .expect("the server stopped although a stream was open");
    let status = subscriber.next().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("resume"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_subscription_id_never_gets_records_of_its_old_use() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    publish_n(&mut client, "guild.a", 0..3000).await;
    let mut subscriber = Subscriber::open(&mut client).await;
    // Id 1 replays guild.a (3,000 records), and is removed and reused for guild.b
    // before it can have finished.
    subscriber.add(1, "guild.a", earliest()).await;
    subscriber.remove(1).await;
    subscriber.add(1, "guild.b", latest()).await;
    // Until Removed, records of guild.a may come; after it, only guild.b's. guild.b is
    // published once the new use has started, so that `latest` is offset 0 (the add is
    // only queued when `add` returns); guild.a's live records race the remove.
    let mut producer = broker.client().await;
    publish_n(&mut producer, "guild.a", 3000..3100).await;
    let mut removed = false;
    let mut started = false;
    let mut from_b = Vec::new();
    while from_b.len() < 5 {
        match subscriber.next().await.unwrap() {
            Event::Update(update) => match &update.state {
                Some(State::Removed(_)) => removed = true,
                Some(State::Started(next)) if removed => {
                    assert!(!started, "the new use started twice");
                    assert_eq!(next.next.as_ref().unwrap().offset, 0);
                    started = true;
                    publish_n(&mut producer, "guild.b", 0..5).await;
                }
                Some(State::Error(_) | State::HistoryLost(_)) => panic!("{update:?}"),
                _ => {}
            },
            Event::Deliveries(batch) => {
                for delivery in batch.deliveries {
                    if removed {
                        assert_eq!(
                            delivery.topic, "guild.b",
                            "a record of the id's old use after Removed"
                        );
                        from_b.push(delivery.offset);
                    }
                }
            }
        }
    }
    assert_eq!(from_b, vec![0, 1, 2, 3, 4]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_subscriber_that_stopped_reading() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let broker = Broker::start_with(config).await;
    let mut client = broker.client().await;
    let mut stalled = Subscriber::open(&mut broker.client().await).await;
    stalled.add(1, "guild.1", latest()).await;
    stalled.update().await;
    // 4 MB waiting for a subscriber that reads nothing (under its 8 MiB cap).
    let payload = "z".repeat(4000);
    for batch in 0..20 {
        let records = (0..50).map(|_| record("guild.1", &payload)).collect();
        client
            .publish(publish(batch, records, pb::AckLevel::Written))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), broker.stop())
        .await
        .expect("shutdown finished although a subscriber stopped reading");
}
