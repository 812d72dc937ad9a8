//! End to end through the client: 1 producer → 1 subscriber, 100-byte records, via
//! a broker started in this process on loopback (data in a temporary directory).
//!
//! `cargo run --release -p switchyard-client --example end_to_end`
//!
//! Phase 1 publishes as fast as the producer goes (records/s from first send to last
//! delivery); phase 2 publishes at fixed rates and reports publish-to-delivery
//! latency percentiles. Bounded in count and time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_broker::server::{self, ServerConfig};
use switchyard_broker::storage::{FsyncPolicy, Store, StoreConfig};
use switchyard_client::{
    Ack, Producer, ProducerConfig, Record, Start, Subscriber, SubscriberEvent,
};

const PAYLOAD: usize = 100;

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

/// A payload of `PAYLOAD` bytes starting with the send time (ns since `origin`).
fn payload(origin: Instant) -> Vec<u8> {
    let mut payload = vec![b'x'; PAYLOAD];
    payload[..8].copy_from_slice(&(origin.elapsed().as_nanos() as u64).to_le_bytes());
    payload
}

/// Receives `count` deliveries; returns their latencies (µs·1000 = ns) and when the
/// last one arrived.
async fn receive(
    subscriber: &mut Subscriber,
    count: usize,
    origin: Instant,
) -> (Vec<u64>, Instant) {
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(30), subscriber.next())
            .await
            .expect("deliveries keep coming")
            .expect("subscriber open");
        if let SubscriberEvent::Delivery(delivery) = event {
            let sent = u64::from_le_bytes(delivery.payload[..8].try_into().expect("8 bytes"));
            latencies.push((origin.elapsed().as_nanos() as u64).saturating_sub(sent));
        }
    }
    (latencies, Instant::now())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let records: usize = std::env::var("E2E_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let mut config = StoreConfig::new(dir.path());
    config.fsync = FsyncPolicy::Interval(Duration::from_millis(5));
    let store = Store::open(config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = store.clone();
    let server = tokio::spawn(async move {
        let _ = server::run(listener, None, serving, ServerConfig::default(), async {
            let _ = stopped.await;
        })
        .await;
    });
    let origin = Instant::now();
    println!(
        "1 producer -> 1 subscriber, {PAYLOAD} B records, in-process broker on loopback, fsync every 5 ms"
    );

    // Phase 1: as fast as it goes.
    let producer = Arc::new(
        Producer::connect(
            &url,
            ProducerConfig {
                ack: Ack::Written,
                ..ProducerConfig::default()
            },
        )
        .await?,
    );
    let mut subscriber = Subscriber::connect(&url).await?;
    subscriber
        .subscribe(1, "guild.bench", Start::Latest)
        .await?;
    while !matches!(
        subscriber.next().await,
        Some(SubscriberEvent::Started { .. })
    ) {}
    let started = Instant::now();
    let sending = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut last = None;
            for _ in 0..records {
                last = Some(
                    producer
                        .send(Record::new("guild.bench", payload(origin)))
                        .await
                        .expect("queued"),
                );
            }
            last.expect("records > 0").await.expect("acknowledged");
        })
    };
    let (mut latencies, finished) = receive(&mut subscriber, records, origin).await;
    sending.await?;
    let seconds = finished.duration_since(started).as_secs_f64();
    latencies.sort_unstable();
    println!(
        "throughput: {records} records in {seconds:.2} s = {:.0} records/s ({:.1} MB/s of payload); latency under saturation p50 {:.0} µs p99 {:.0} µs",
        records as f64 / seconds,
        records as f64 * PAYLOAD as f64 / seconds / 1e6,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
    );

    // Phase 2: fixed rates, 3 s each, sent in 1 ms ticks.
    for rate in [10_000usize, 50_000, 200_000] {
        let per_tick = rate / 1000;
        let total = per_tick * 3000;
        let sending = {
            let producer = producer.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_millis(1));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for _ in 0..3000 {
                    ticks.tick().await;
                    for _ in 0..per_tick {
                        // The subscriber measures delivery; acknowledgements are not awaited.
                        drop(
                            producer
                                .send(Record::new("guild.bench", payload(origin)))
                                .await
                                .expect("queued"),
                        );
                    }
                }
            })
        };
        let (mut latencies, _) = receive(&mut subscriber, total, origin).await;
        sending.await?;
        latencies.sort_unstable();
        println!(
            "at {rate} records/s: p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs ({total} records)",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 0.999),
        );
    }
    let _ = stop.send(());
    drop(subscriber);
    server.await?;
    tokio::task::spawn_blocking(move || store.close()).await??;
    Ok(())
}
