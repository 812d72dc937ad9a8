//! The gRPC server on a real loopback port, driven by the generated client.

mod common;

use common::broker::{Broker, publish, record};
use switchyard_proto as pb;
use tonic::Code;

#[tokio::test]
async fn publish_then_fetch_and_topic_info() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let response = client
        .publish(publish(
            9,
            vec![
                record("guild.1", "a"),
                record("guild.1", "b"),
                record("user.2", "c"),
            ],
            pb::AckLevel::Durable,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.request_id, 9);
    let offsets: Vec<u64> = response.positions.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![0, 1, 0]);

    let fetched = client
        .fetch(pb::FetchRequest {
            topic: "guild.1".into(),
            offset: 0,
            max_records: 0,
            max_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.next_offset, 2);
    assert_eq!(fetched.records[1].payload, "b".as_bytes());
    assert_eq!(fetched.records[0].headers[0].value, "MESSAGE_CREATE");
    assert_eq!(fetched.records[0].epoch, response.positions[0].epoch);

    let info = client
        .get_topic_info(pb::TopicInfoRequest {
            topic: "guild.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.exists);
    assert_eq!((info.earliest_offset, info.next_offset), (0, 2));
    let missing = client
        .get_topic_info(pb::TopicInfoRequest {
            topic: "guild.404".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!missing.exists);

    let health = client
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), pb::health_response::Status::Serving);
    broker.stop().await;
}

#[tokio::test]
async fn bad_requests_get_statuses_a_person_can_act_on() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let status = client
        .publish(publish(
            1,
            vec![record("guild 1", "x")],
            pb::AckLevel::Written,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("guild 1"), "{}", status.message());

    let big = "x".repeat(100 << 10);
    let status = client
        .publish(publish(
            2,
            vec![record("guild.1", &big)],
            pb::AckLevel::Written,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("limit"), "{}", status.message());

    let status = client
        .publish(publish(3, vec![], pb::AckLevel::Written))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Batch limits: record count, then bytes.
    let many = (0..10_001).map(|_| record("guild.1", "")).collect();
    let status = client
        .publish(publish(4, many, pb::AckLevel::Written))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("10000"), "{}", status.message());
    let chunk = "x".repeat(60 << 10);
    let heavy = (0..80).map(|_| record("guild.1", &chunk)).collect();
    let status = client
        .publish(publish(5, heavy, pb::AckLevel::Written))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("batch"), "{}", status.message());

    // A header over its limit.
    let mut with_header = record("guild.1", "x");
    with_header.headers.push(pb::Header {
        key: "k".into(),
        value: "v".repeat(2000),
    });
    let status = client
        .publish(publish(6, vec![with_header], pb::AckLevel::Written))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .fetch(pb::FetchRequest {
            topic: "guild.1".into(),
            offset: 5,
            max_records: 10,
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("next offset is 0"),
        "{}",
        status.message()
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_request_that_asks_for_runs_is_answered_with_runs_of_the_same_positions() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let records = || {
        let mut records: Vec<pb::PublishRecord> =
            (0..5).map(|i| record("guild.1", &i.to_string())).collect();
        records.push(record("user.2", "x"));
        records.push(record("guild.1", "5"));
        records
    };
    let one_by_one = client
        .publish(publish(1, records(), pb::AckLevel::Written))
        .await
        .unwrap()
        .into_inner();
    assert!(one_by_one.position_runs.is_empty());
    let mut request = publish(2, records(), pb::AckLevel::Durable);
    request.want_position_runs = true;
    let mut runs = client
        .publish_stream(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let runs = runs.message().await.unwrap().expect("an answer");
    assert!(runs.positions.is_empty());
    let epoch = |i: usize| one_by_one.positions[i].epoch;
    let expected = [(6, epoch(0), 5), (1, epoch(5), 1), (11, epoch(0), 1)];
    let got: Vec<_> = runs
        .position_runs
        .iter()
        .map(|r| (r.offset, r.epoch, r.count))
        .collect();
    assert_eq!(got, expected);
    broker.stop().await;
}

#[tokio::test]
async fn pipelined_publishes_are_answered_in_order_and_refusals_do_not_end_the_stream() {
    let broker = Broker::start().await;
    let mut client = broker.client().await;
    let requests: Vec<pb::PublishRequest> = (0..200u64)
        .map(|i| {
            let topic = if i == 100 {
                "bad topic".to_owned()
            } else {
                format!("guild.{}", i % 3)
            };
            publish(
                i,
                vec![record(&topic, &i.to_string())],
                pb::AckLevel::Written,
            )
        })
        .collect();
    let mut responses = client
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut next_offset = [0u64; 3];
    let mut count = 0;
    while let Some(response) = responses.message().await.unwrap() {
        assert_eq!(response.request_id, count);
        if count == 100 {
            let error = response.error.expect("the bad topic is refused");
            assert_eq!(error.code, Code::InvalidArgument as i32);
        } else {
            let topic = (count % 3) as usize;
            assert_eq!(
                response.positions[0].offset, next_offset[topic],
                "request {count}"
            );
            next_offset[topic] += 1;
        }
        count += 1;
    }
    assert_eq!(count, 200);
    // The records landed in the order they were sent.
    let fetched = client
        .fetch(pb::FetchRequest {
            topic: "guild.0".into(),
            offset: 0,
            max_records: 0,
            max_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let sent: Vec<String> = (0..200u64)
        .filter(|i| i % 3 == 0 && *i != 100)
        .map(|i| i.to_string())
        .collect();
    let got: Vec<String> = fetched
        .records
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(got, sent);
    broker.stop().await;
}

#[tokio::test]
async fn metrics_endpoint_reports_appends_topics_and_health() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let store = switchyard_broker::storage::Store::open(common::small_config(dir.path())).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_address, metrics_address) =
        (grpc.local_addr().unwrap(), metrics.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = store.clone();
    let server = tokio::spawn(async move {
        switchyard_broker::server::run(grpc, Some(metrics), serving, Default::default(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let mut client =
        switchyard_proto::broker_client::BrokerClient::connect(format!("http://{grpc_address}"))
            .await
            .unwrap();
    client
        .publish(publish(
            1,
            vec![record("guild.1", "a"), record("guild.2", "b")],
            pb::AckLevel::Durable,
        ))
        .await
        .unwrap();
    let get = |path: &'static str| async move {
        let mut socket = tokio::net::TcpStream::connect(metrics_address)
            .await
            .unwrap();
        socket
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        response
    };
    let body = get("/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("\nswitchyard_records_appended_total 2\n"),
        "{body}"
    );
    assert!(body.contains("\nswitchyard_topics 2\n"), "{body}");
    assert!(
        body.contains("# TYPE switchyard_slow_consumer_cutoffs_total counter"),
        "{body}"
    );
    assert!(body.contains("switchyard_fsync_seconds_total"), "{body}");
    assert!(get("/health").await.ends_with("SERVING\n"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let _ = stop.send(());
    server.await.unwrap();
    store.close().unwrap();
}
