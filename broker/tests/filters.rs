//! Delivery filters through a real broker and the generated client.

mod common;

use std::sync::Arc;

use common::broker::{Broker, publish};
use common::subscriber::Subscriber;
use switchyard_broker::filter::{FilterLimits, FilterSet};
use switchyard_broker::server::ServerConfig;
use switchyard_proto as pb;
use tonic::Code;

use pb::subscription_update::State;

/// Adds a filtered subscription from the latest record and returns the broker's answer.
async fn add(
    subscriber: &mut Subscriber,
    id: u64,
    topic: &str,
    filter: &str,
    context: &[(&str, &str)],
) -> pb::SubscriptionUpdate {
    let latest = pb::start_position::Start::Latest(pb::Latest {});
    subscriber
        .add_filtered(id, topic, latest, filter, context)
        .await;
    subscriber.update().await
}

const CHANNEL_FILTER: &str = r#"
-- Deliver messages of the channels listed in the context (comma-separated).
return function(event, sub)
  local channel = event.headers.channel_id
  if channel == nil then return true end
  for allowed in string.gmatch(sub.context.channels or "", "[^,]+") do
    if allowed == channel then return true end
  end
  return false
end
"#;

async fn broker_with(filters: &[(&str, &str)]) -> Broker {
    let set = FilterSet::empty(FilterLimits {
        instructions: 100_000,
        memory_bytes: 16 << 20,
    });
    for (name, source) in filters {
        set.insert(name, &format!("{name}.lua"), (*source).to_owned())
            .unwrap();
    }
    Broker::start_with(ServerConfig {
        filters: Arc::new(set),
        ..ServerConfig::default()
    })
    .await
}

fn message(channel: &str, text: &str) -> pb::PublishRecord {
    pb::PublishRecord {
        topic: "guild.1".into(),
        headers: vec![
            pb::Header {
                key: "type".into(),
                value: "MESSAGE_CREATE".into(),
            },
            pb::Header {
                key: "channel_id".into(),
                value: channel.into(),
            },
        ],
        payload: text.to_owned().into(),
    }
}

fn ids(delivery: &pb::Delivery) -> Vec<u64> {
    let mut ids = delivery.subscription_ids.clone();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn one_delivery_per_stream_lists_exactly_the_subscriptions_whose_filter_passes() {
    let broker = broker_with(&[("channels", CHANNEL_FILTER)]).await;
    let mut client = broker.client().await;
    let mut stream = Subscriber::open(&mut client).await;
    assert!(matches!(
        add(&mut stream, 1, "guild.1", "", &[]).await.state,
        Some(State::Started(_))
    ));
    add(
        &mut stream,
        2,
        "guild.1",
        "channels",
        &[("channels", "10,11")],
    )
    .await;
    add(&mut stream, 3, "guild.1", "channels", &[("channels", "11")]).await;
    add(
        &mut stream,
        4,
        "guild.1",
        "channels",
        &[("channels", "10,11")],
    )
    .await;
    let records = vec![message("10", "a"), message("11", "b"), message("12", "c")];
    client
        .publish(publish(1, records, pb::AckLevel::Written))
        .await
        .unwrap();
    let got = stream.deliveries(3).await;
    assert_eq!(ids(&got[0]), vec![1, 2, 4], "channel 10");
    assert_eq!(ids(&got[1]), vec![1, 2, 3, 4], "channel 11");
    assert_eq!(
        ids(&got[2]),
        vec![1],
        "channel 12: only the unfiltered subscription"
    );

    // A role change: the context update applies from the next record on.
    stream.update_context(3, &[("channels", "12")]).await;
    client
        .publish(publish(
            2,
            vec![message("12", "d"), message("11", "e")],
            pb::AckLevel::Written,
        ))
        .await
        .unwrap();
    let got = stream.deliveries(2).await;
    assert_eq!(ids(&got[0]), vec![1, 3]);
    assert_eq!(ids(&got[1]), vec![1, 2, 4]);

    // Evaluations were shared: subscriptions 2 and 4 have equal contexts.
    let stats = &broker_filters_stats(&broker, "channels");
    assert_eq!(
        stats.0,
        3 + 3 + 2 * 2,
        "evaluations (shared for equal contexts)"
    );
    broker.stop().await;
}

/// `lua-filters/channel_permissions.lua` declares `share` over `user_id`: members a
/// record's overwrites do not name share one evaluation per role set, and one the
/// overwrites name is judged on their own.
#[tokio::test]
async fn members_a_record_does_not_name_share_one_evaluation() {
    let source = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lua-filters/channel_permissions.lua"),
    )
    .unwrap();
    let broker = broker_with(&[("channel_permissions", &source)]).await;
    let mut client = broker.client().await;
    let mut stream = Subscriber::open(&mut client).await;
    // @everyone (role 1) sees nothing; role 20 may view channels.
    let permissions = "1:0,20:1024,21:0";
    for (id, user, roles) in [
        (1, "101", "20"),
        (2, "102", "20"),
        (3, "103", "21"),
        (4, "104", "21"),
        (5, "105", "20"),
        (6, "106", "20,21"),
    ] {
        let update = add(
            &mut stream,
            id,
            "guild.1",
            "channel_permissions",
            &[
                ("guild_id", "1"),
                ("user_id", user),
                ("roles", roles),
                ("role_permissions", permissions),
            ],
        )
        .await;
        assert!(
            matches!(update.state, Some(State::Started(_))),
            "{update:?}"
        );
    }
    let mut record = message("10", "hi");
    // Role 21 is denied the channel; member 105 too, member 103 is allowed it.
    record.headers.push(pb::Header {
        key: "overwrites".into(),
        value: "21:0:1024,105:0:1024,103:1024:0".into(),
    });
    client
        .publish(publish(1, vec![record], pb::AckLevel::Written))
        .await
        .unwrap();
    let got = stream.deliveries(1).await;
    assert_eq!(ids(&got[0]), vec![1, 2, 3]);
    // Judged: {roles 20}, {roles 21}, {roles 20,21} without user_id, plus members 103
    // and 105 whom the overwrites name.
    assert_eq!(broker_filters_stats(&broker, "channel_permissions").0, 5);
    broker.stop().await;
}

/// (evaluations, errors) of filter `name`.
fn broker_filters_stats(broker: &Broker, name: &str) -> (u64, u64) {
    let stats = broker.filters().stats();
    let (_, stats) = stats
        .iter()
        .find(|(n, _)| n == name)
        .expect("the filter is loaded");
    use std::sync::atomic::Ordering::Relaxed;
    (stats.evaluations.load(Relaxed), stats.errors.load(Relaxed))
}

#[tokio::test]
async fn unknown_filters_are_refused() {
    let broker = broker_with(&[("channels", CHANNEL_FILTER)]).await;
    let mut client = broker.client().await;
    let mut stream = Subscriber::open(&mut client).await;
    match add(&mut stream, 1, "guild.1", "nope", &[]).await.state {
        Some(State::Error(error)) => {
            assert_eq!(Code::from_i32(error.code), Code::NotFound);
            assert!(error.message.contains("channels"), "{}", error.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filters_withhold_only_their_own_deliveries() {
    let hostile = [
        ("syntax", "return function(e) return ( end"),
        ("runtime", "return function() error('boom') end"),
        ("spin", "return function() while true do end end"),
        (
            "memory",
            "return function() local t = {} for i = 1, 1000 do t[i] = string.rep('x', 1048576) .. i end end",
        ),
        (
            "os",
            "return function() os.execute('touch /tmp/switchyard-pwned') return true end",
        ),
        (
            "io",
            "return function() return io.open('/etc/passwd') ~= nil end",
        ),
        (
            "require",
            "return function() return require('os') ~= nil end",
        ),
        (
            "bytecode",
            "return function() return load(string.dump(function() return true end))() end",
        ),
        (
            "rep",
            "return function() return #string.rep('x', 1 << 32) > 0 end",
        ),
        (
            "recursion",
            "local function f(n) return f(n + 1) + 1 end return function() return f(1) end",
        ),
    ];
    let set = FilterSet::empty(FilterLimits {
        instructions: 100_000,
        memory_bytes: 16 << 20,
    });
    // The syntax error is refused at load, with file and line.
    let error = set
        .insert("syntax", "syntax.lua", hostile[0].1.into())
        .unwrap_err();
    assert!(error.message.contains("syntax.lua:1:"), "{error}");
    for (name, source) in &hostile[1..] {
        set.insert(name, &format!("{name}.lua"), (*source).to_owned())
            .unwrap();
    }
    set.insert(
        "allow",
        "allow.lua",
        "return function() return true end".into(),
    )
    .unwrap();
    let broker = Broker::start_with(ServerConfig {
        filters: Arc::new(set),
        ..ServerConfig::default()
    })
    .await;
    let mut client = broker.client().await;
    let mut stream = Subscriber::open(&mut client).await;
    for (i, (name, _)) in hostile[1..].iter().enumerate() {
        assert!(matches!(
            add(&mut stream, i as u64 + 10, "guild.1", name, &[])
                .await
                .state,
            Some(State::Started(_))
        ));
    }
    add(&mut stream, 1, "guild.1", "allow", &[]).await;
    add(&mut stream, 2, "guild.1", "", &[]).await;
    for round in 0..3 {
        client
            .publish(publish(
                round,
                vec![message("10", "x")],
                pb::AckLevel::Written,
            ))
            .await
            .unwrap();
        let got = stream.deliveries(1).await;
        assert_eq!(
            ids(&got[0]),
            vec![1, 2],
            "only the sound subscriptions receive it"
        );
    }
    assert!(!std::path::Path::new("/tmp/switchyard-pwned").exists());
    for (name, _) in &hostile[1..] {
        let (evaluations, errors) = broker_filters_stats(&broker, name);
        assert_eq!(
            (evaluations, errors),
            (3, 3),
            "{name}: every call failed and was counted"
        );
    }
    // The broker still serves everything else.
    let health = client
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), pb::health_response::Status::Serving);
    broker.stop().await;
}
