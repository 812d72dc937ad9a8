//! The scenarios. Each runs against every system that supports it, `reps` times,
//! and adds one [`Measurement`] per metric (all repetitions' samples in it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::procfs;
use crate::report::{Measurement, Results};
use crate::systems::{Consumer, Kind, Systems};

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub reps: usize,
    /// Payload sizes of the throughput scenario.
    pub payloads: Vec<usize>,
    /// How long each throughput or latency run publishes.
    pub duration: Duration,
    /// Most records a throughput run publishes.
    pub max_records: u64,
    pub fanout_streams: usize,
    /// Topic counts of the many-topics scenario (peers run only the smallest).
    pub many_topics: Vec<u64>,
    pub filtered_subscriptions: usize,
    pub filter_events: u64,
    /// Topic counts of the restart scenario.
    pub restart_topics: Vec<u64>,
    /// Where each latency repetition writes one line per batch its consumer got
    /// (see [`write_latency_trace`]), if anywhere.
    pub latency_trace: Option<PathBuf>,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            reps: 3,
            payloads: vec![100, 1024],
            duration: Duration::from_secs(3),
            max_records: 20_000_000,
            fanout_streams: 100,
            many_topics: vec![1_000_000, 10_000_000],
            filtered_subscriptions: 10_000,
            filter_events: 200,
            restart_topics: vec![1_000_000, 10_000_000],
            latency_trace: None,
        }
    }

    /// A few seconds per scenario: proves each still works, measures nothing.
    pub fn smoke() -> Sizes {
        Sizes {
            reps: 1,
            payloads: vec![100, 1024],
            duration: Duration::from_millis(300),
            max_records: 20_000,
            fanout_streams: 3,
            many_topics: vec![500],
            filtered_subscriptions: 100,
            filter_events: 5,
            restart_topics: vec![500],
            latency_trace: None,
        }
    }
}

/// Records in a throughput or latency run go out in chunks of this many.
const CHUNK: usize = 1000;
/// How far behind schedule a latency run's publisher may be before its records
/// are stamped with their scheduled time.
const STALL: Duration = Duration::from_millis(2);
/// Records a many-topics publisher may be ahead of its subscriber.
const BACKLOG: u64 = 200_000;
/// How long a consumer may take to catch up after the publisher is done.
const DRAIN: Duration = Duration::from_secs(20);

/// Counts (and times) what a consumer receives, in a task of its own.
struct Counter {
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<Outcome>>,
}

struct Outcome {
    /// Deliveries to subscriptions (a record delivered for 3 subscriptions counts 3).
    deliveries: u64,
    last: Option<Instant>,
    latency: Option<Histogram<u64>>,
    /// With a latency histogram: each batch handed out, in order (see [`Batch`]).
    batches: Vec<Batch>,
    /// Kept alive until the scenario has read what it needs (e.g. the server's RSS
    /// with every subscription still in place).
    _consumer: Consumer,
}

/// One batch a latency run's consumer was handed.
struct Batch {
    /// When it arrived, µs since the run's start.
    arrived_us: u64,
    records: u32,
    /// Latency of its oldest record, µs.
    max_latency_us: u64,
}

impl Counter {
    /// Consumes until `expected` deliveries or `deadline`; with `base`, the first 8
    /// bytes of each payload are its intended send time (ns since `base`) and a
    /// latency histogram (µs) is kept for payloads sent after `warmup`; with
    /// `trace` too, every batch's arrival, size and worst latency.
    fn spawn(
        mut consumer: Consumer,
        mut expected: watch::Receiver<u64>,
        deadline: Instant,
        base: Option<(Instant, Duration)>,
        trace: bool,
    ) -> Counter {
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            let mut deliveries = 0u64;
            let mut last = None;
            let mut latency = base.map(|_| {
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
            });
            // Reserved ahead, so that growing it stalls the consumer rarely.
            let mut batches = Vec::with_capacity(if trace { 1 << 16 } else { 0 });
            let deadline = tokio::time::Instant::from_std(deadline);
            while deliveries < *expected.borrow_and_update() {
                // One clock read per batch handed out: records that arrived together
                // get the same arrival time.
                let mut arrived = None;
                let (mut records, mut max_latency_us) = (0u32, 0u64);
                let mut on = |payload: &[u8], subscriptions: usize| {
                    deliveries += subscriptions as u64;
                    let now = *arrived.get_or_insert_with(Instant::now);
                    last = Some(now);
                    if let (Some((base, warmup)), Some(histogram)) = (base, latency.as_mut())
                        && payload.len() >= 8
                    {
                        let sent = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                        let latency_us = (now.duration_since(base).as_nanos() as u64)
                            .saturating_sub(sent)
                            / 1000;
                        if sent >= warmup.as_nanos() as u64 {
                            histogram.saturating_record(latency_us);
                        }
                        records += 1;
                        max_latency_us = max_latency_us.max(latency_us);
                    }
                };
                // Wakes up when the publisher says how many to expect (all may be
                // here already).
                tokio::select! {
                    next = tokio::time::timeout_at(deadline, consumer.next_batch(&mut on)) => match next {
                        Ok(Ok(true)) => {
                            count.store(deliveries, Ordering::Relaxed);
                            if let (true, Some((base, _)), Some(at)) = (trace, base, arrived)
                                && records > 0
                            {
                                batches.push(Batch {
                                    arrived_us: at.duration_since(base).as_micros() as u64,
                                    records,
                                    max_latency_us,
                                });
                            }
                        }
                        Ok(Ok(false)) => bail!("the consumer's stream ended"),
                        Ok(Err(error)) => return Err(error),
                        Err(_) => break,
                    },
                    changed = expected.changed() => if changed.is_err() {
                        // The scenario gave up (its publisher failed).
                        break;
                    }
                }
            }
            Ok(Outcome {
                deliveries,
                last,
                latency,
                batches,
                _consumer: consumer,
            })
        });
        Counter { received, task }
    }

    async fn finish(self) -> Result<Outcome> {
        self.task.await?
    }
}

/// Writes a latency repetition's batches as tab-separated lines: arrival (µs since
/// the run's start), records, and the worst latency in the batch (µs), after a
/// header and a comment saying which records the histogram left out (the lines
/// count them all). Gaps in `arrived_us` followed by large batches are the stalls
/// behind a p99.
fn write_latency_trace(
    path: &Path,
    started: SystemTime,
    warmup: Duration,
    batches: &[Batch],
) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    // The wall-clock time of arrived_us = 0, to lay the trace over other
    // recordings of the machine (CPU steal, scheduling) made at the same time.
    let since_epoch = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    writeln!(
        out,
        "# started: {} µs since the Unix epoch",
        since_epoch.as_micros()
    )?;
    writeln!(
        out,
        "# warm-up: records sent in the first {} µs are in these lines, not in the histogram",
        warmup.as_micros()
    )?;
    writeln!(out, "arrived_us\trecords\tmax_latency_us")?;
    for batch in batches {
        writeln!(
            out,
            "{}\t{}\t{}",
            batch.arrived_us, batch.records, batch.max_latency_us
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

fn payload(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size])
}

fn cpu(systems: &Systems, kind: Kind) -> Duration {
    systems
        .pid(kind)
        .and_then(procfs::cpu_time)
        .unwrap_or_default()
}

/// CPU time this process (the load generator) has used so far.
fn own_cpu() -> Duration {
    procfs::cpu_time(std::process::id()).unwrap_or_default()
}

fn progress(line: &str) {
    eprintln!("  {line}");
}

/// 1 producer → 1 subscriber as fast as it goes, for `sizes.duration`.
pub async fn throughput(
    systems: &Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    results: &mut Results,
) -> Result<()> {
    for size in sizes.payloads.clone() {
        let case = format!("{size}B");
        for &kind in kinds {
            let mut rate =
                Measurement::new("throughput", &case, kind, "records_per_s", "records/s");
            let mut mbs = Measurement::new("throughput", &case, kind, "mb_per_s", "MB/s");
            let mut cpu_us = Measurement::new(
                "throughput",
                &case,
                kind,
                "server_cpu_us_per_record",
                "µs/record",
            );
            // The load generator's CPU (this process: the system's client library
            // publishing and consuming, and the harness around it), since it shares
            // the cores with the server.
            let mut client_cpu_us = Measurement::new(
                "throughput",
                &case,
                kind,
                "client_cpu_us_per_record",
                "µs/record",
            );
            let mut delivered =
                Measurement::new("throughput", &case, kind, "delivered", "fraction");
            for rep in 0..sizes.reps {
                systems.prepare(kind).await?;
                let topic = kind.topic(&format!("tp.{size}.{rep}"));
                let consumer = systems.consumer(kind, std::slice::from_ref(&topic)).await?;
                let mut publisher = systems.publisher(kind).await?;
                let (expected, expecting) = watch::channel(u64::MAX);
                let started = Instant::now();
                let counter = Counter::spawn(
                    consumer,
                    expecting.clone(),
                    started + sizes.duration + DRAIN,
                    None,
                    false,
                );
                let cpu_before = cpu(systems, kind);
                let client_cpu_before = own_cpu();
                let body = payload(size);
                let mut sent = 0u64;
                while started.elapsed() < sizes.duration && sent < sizes.max_records {
                    publisher.publish_copies(&topic, &body, CHUNK).await?;
                    sent += CHUNK as u64;
                }
                publisher.flush().await?;
                // How far the consumer trails when the last acknowledgement is in (a
                // consumer that cannot keep up shows here, and in the rate).
                let behind = sent.saturating_sub(counter.received.load(Ordering::Relaxed));
                let published = started.elapsed();
                expected.send_replace(sent);
                let outcome = counter.finish().await?;
                let server_cpu = cpu(systems, kind).saturating_sub(cpu_before);
                let client_cpu = own_cpu().saturating_sub(client_cpu_before);
                let elapsed = outcome
                    .last
                    .map_or(Duration::MAX, |last| last.duration_since(started));
                let per_s = outcome.deliveries as f64 / elapsed.as_secs_f64();
                rate.push(per_s);
                mbs.push(per_s * size as f64 / 1e6);
                cpu_us.push(server_cpu.as_secs_f64() * 1e6 / outcome.deliveries.max(1) as f64);
                client_cpu_us
                    .push(client_cpu.as_secs_f64() * 1e6 / outcome.deliveries.max(1) as f64);
                delivered.push(outcome.deliveries as f64 / sent as f64);
                progress(&format!(
                    "throughput {case} {} rep {}: {:.0} records/s, {} of {sent} delivered; {behind} behind after {:.2} s of publishing",
                    kind.label(),
                    rep + 1,
                    per_s,
                    outcome.deliveries,
                    published.as_secs_f64(),
                ));
            }
            results.add(rate);
            results.add(mbs);
            results.add(cpu_us);
            results.add(client_cpu_us);
            results.add(delivered);
        }
    }
    Ok(())
}

/// Publish-to-delivery latency at 10%, 50% and 80% of each system's measured
/// 100 B maximum (from the throughput scenario in this run).
pub async fn latency(
    systems: &Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    results: &mut Results,
) -> Result<()> {
    for &kind in kinds {
        let Some(max) = results.median("throughput", "100B", kind, "records_per_s") else {
            progress(&format!(
                "latency {}: no throughput figure, skipped",
                kind.label()
            ));
            continue;
        };
        for percent in [10u32, 50, 80] {
            let case = format!("{percent}%");
            let target = max * f64::from(percent) / 100.0;
            let mut p50 = Measurement::new("latency", &case, kind, "p50_us", "µs");
            let mut p99 = Measurement::new("latency", &case, kind, "p99_us", "µs");
            let mut p999 = Measurement::new("latency", &case, kind, "p999_us", "µs");
            let mut rate = Measurement::new("latency", &case, kind, "records_per_s", "records/s");
            for rep in 0..sizes.reps {
                systems.prepare(kind).await?;
                let topic = kind.topic(&format!("lat.{percent}.{rep}"));
                let consumer = systems.consumer(kind, std::slice::from_ref(&topic)).await?;
                let mut publisher = systems.publisher(kind).await?;
                let (expected, expecting) = watch::channel(u64::MAX);
                let base = Instant::now();
                let base_wall = SystemTime::now();
                let warmup = sizes.duration / 10;
                let counter = Counter::spawn(
                    consumer,
                    expecting.clone(),
                    base + sizes.duration + DRAIN,
                    Some((base, warmup)),
                    sizes.latency_trace.is_some(),
                );
                let mut sent = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while base.elapsed() < sizes.duration {
                    // Each tick sends what the rate makes due by then, stamped with
                    // the time it is sent — or, when the publisher is more than
                    // STALL behind its schedule, with the scheduled time, so that a
                    // stall shows as latency (no coordinated omission). Tokio's timer
                    // fires up to a millisecond late, which is not the system's doing.
                    let scheduled = tick.tick().await.into_std();
                    let now = Instant::now();
                    let stamp = if now.duration_since(scheduled) > STALL {
                        scheduled
                    } else {
                        now
                    };
                    let due = (now.duration_since(base).as_secs_f64() * target) as u64;
                    let intended = stamp.duration_since(base).as_nanos() as u64;
                    // The records of one tick carry the same stamp, so they share one
                    // payload (a reference count each, for every system alike): the load
                    // generator shares the two cores with the server under test.
                    let count = due.saturating_sub(sent) as usize;
                    if count > 0 {
                        let mut body = BytesMut::with_capacity(100);
                        body.put_u64_le(intended);
                        body.put_bytes(b'x', 92);
                        publisher
                            .publish(&topic, vec![body.freeze(); count])
                            .await?;
                        sent = due;
                    }
                }
                publisher.flush().await?;
                expected.send_replace(sent);
                let outcome = counter.finish().await?;
                if let Some(dir) = &sizes.latency_trace {
                    let path = dir.join(format!(
                        "latency-{}-{percent}-{}.tsv",
                        kind.label(),
                        rep + 1
                    ));
                    write_latency_trace(&path, base_wall, warmup, &outcome.batches)?;
                }
                let histogram = outcome.latency.expect("latency kept");
                if histogram.is_empty() {
                    bail!(
                        "latency {}: nothing delivered after the warm-up",
                        kind.label()
                    );
                }
                p50.push(histogram.value_at_quantile(0.5) as f64);
                p99.push(histogram.value_at_quantile(0.99) as f64);
                p999.push(histogram.value_at_quantile(0.999) as f64);
                rate.push(target);
                progress(&format!(
                    "latency {case} ({target:.0}/s) {} rep {}: min {} p50 {} µs, p99 {} µs, p999 {} µs, max {}, {} of {sent} delivered",
                    kind.label(),
                    rep + 1,
                    histogram.min(),
                    histogram.value_at_quantile(0.5),
                    histogram.value_at_quantile(0.99),
                    histogram.value_at_quantile(0.999),
                    histogram.max(),
                    outcome.deliveries,
                ));
            }
            results.add(p50);
            results.add(p99);
            results.add(p999);
            results.add(rate);
        }
    }
    Ok(())
}

/// One topic → `sizes.fanout_streams` subscriber streams (each its own connection).
pub async fn fanout(
    systems: &Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    results: &mut Results,
) -> Result<()> {
    let streams = sizes.fanout_streams;
    let case = format!("{streams} streams");
    for &kind in kinds {
        let mut rate = Measurement::new("fanout", &case, kind, "deliveries_per_s", "deliveries/s");
        let mut cpu_us = Measurement::new(
            "fanout",
            &case,
            kind,
            "server_cpu_us_per_delivery",
            "µs/delivery",
        );
        let mut delivered = Measurement::new("fanout", &case, kind, "delivered", "fraction");
        for rep in 0..sizes.reps {
            systems.prepare(kind).await?;
            let topic = kind.topic(&format!("fan.{rep}"));
            let (expected, expecting) = watch::channel(u64::MAX);
            let mut consumers = Vec::with_capacity(streams);
            for _ in 0..streams {
                consumers.push(systems.consumer(kind, std::slice::from_ref(&topic)).await?);
            }
            let mut publisher = systems.publisher(kind).await?;
            let started = Instant::now();
            let counters: Vec<Counter> = consumers
                .into_iter()
                .map(|c| {
                    Counter::spawn(
                        c,
                        expecting.clone(),
                        started + sizes.duration + DRAIN,
                        None,
                        false,
                    )
                })
                .collect();
            let cpu_before = cpu(systems, kind);
            let body = payload(100);
            let mut sent = 0u64;
            // Bounded so the subscribers can keep up: fan-out multiplies the work.
            let max = sizes.max_records / streams as u64;
            while started.elapsed() < sizes.duration && sent < max {
                publisher.publish_copies(&topic, &body, CHUNK).await?;
                sent += CHUNK as u64;
            }
            publisher.flush().await?;
            expected.send_replace(sent);
            let mut total = 0u64;
            let mut last = started;
            for counter in counters {
                let outcome = counter.finish().await?;
                total += outcome.deliveries;
                if let Some(at) = outcome.last {
                    last = last.max(at);
                }
            }
            let server_cpu = cpu(systems, kind).saturating_sub(cpu_before);
            let per_s = total as f64 / last.duration_since(started).as_secs_f64();
            rate.push(per_s);
            cpu_us.push(server_cpu.as_secs_f64() * 1e6 / total.max(1) as f64);
            delivered.push(total as f64 / (sent * streams as u64) as f64);
            progress(&format!(
                "fanout {case} {} rep {}: {per_s:.0} deliveries/s, {total} of {} delivered",
                kind.label(),
                rep + 1,
                sent * streams as u64
            ));
        }
        results.add(rate);
        results.add(cpu_us);
        results.add(delivered);
    }
    Ok(())
}

/// Many topics, each subscribed on one stream, one record each: subscribe time,
/// records/s, and the server's memory per topic (growth of its own resident
/// memory over the run, on a freshly started server: see `procfs::own_memory_bytes`).
pub async fn many_topics(
    systems: &mut Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    results: &mut Results,
) -> Result<()> {
    let smallest = sizes.many_topics.iter().copied().min().unwrap_or(0);
    for &count in &sizes.many_topics {
        let case = format!("{count} topics");
        for &kind in kinds {
            if !matches!(kind, Kind::Switchyard | Kind::Nats | Kind::RedisPubSub) {
                // JetStream consumers and Redis Streams readers are per subject/key
                // and do not scale to a million here; see docs/benchmarks.md.
                continue;
            }
            if count > smallest && !kind.is_switchyard() {
                continue;
            }
            let mut subscribe_s = Measurement::new("many_topics", &case, kind, "subscribe_s", "s");
            let mut rate =
                Measurement::new("many_topics", &case, kind, "records_per_s", "records/s");
            let mut bytes =
                Measurement::new("many_topics", &case, kind, "rss_bytes_per_topic", "B/topic");
            let mut cpu_us = Measurement::new(
                "many_topics",
                &case,
                kind,
                "server_cpu_us_per_record",
                "µs/record",
            );
            let mut delivered =
                Measurement::new("many_topics", &case, kind, "delivered", "fraction");
            for rep in 0..sizes.reps {
                if kind.is_switchyard() {
                    systems.fresh_switchyard()?;
                } else if let Some(peers) = systems.peers.as_mut() {
                    peers.restart()?;
                }
                let pid = systems.pid(kind).expect("running");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let rss_before = procfs::own_memory_bytes(pid).unwrap_or(0);
                let topics: Vec<String> = (0..count)
                    .map(|i| kind.topic(&format!("user.{i}")))
                    .collect();
                let started = Instant::now();
                let consumer = systems.consumer(kind, &topics).await?;
                let subscribed = started.elapsed();
                let mut publisher = systems.publisher(kind).await?;
                let (_expected, expecting) = watch::channel(count);
                let counter =
                    Counter::spawn(consumer, expecting, Instant::now() + DRAIN * 3, None, false);
                let cpu_before = cpu(systems, kind);
                let publish_start = Instant::now();
                let body = payload(100);
                let mut sent = 0u64;
                for chunk in topics.chunks(CHUNK) {
                    // At most BACKLOG records ahead of the subscriber: the rate is
                    // what a system sustains, not how fast its buffers fill.
                    // A peer that drops records (NATS core) never catches up:
                    // after a second without progress, publishing goes on.
                    let mut seen = (counter.received.load(Ordering::Relaxed), Instant::now());
                    while sent.saturating_sub(seen.0) > BACKLOG
                        && seen.1.elapsed() < Duration::from_secs(1)
                        && !counter.task.is_finished()
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let now = counter.received.load(Ordering::Relaxed);
                        if now != seen.0 {
                            seen = (now, Instant::now());
                        }
                    }
                    let records = chunk.iter().map(|t| (t.clone(), body.clone())).collect();
                    publisher.publish_many(records).await?;
                    sent += chunk.len() as u64;
                }
                publisher.flush().await?;
                let outcome = counter.finish().await?;
                let server_cpu = cpu(systems, kind).saturating_sub(cpu_before);
                let rss_after = procfs::own_memory_bytes(pid).unwrap_or(0);
                // A system that drops records for a slow subscriber (NATS core does)
                // is reported with the fraction it delivered, not left out.
                let Some(last) = outcome.last else {
                    bail!("many topics {}: nothing delivered", kind.label());
                };
                let elapsed = last.duration_since(publish_start);
                delivered.push(outcome.deliveries as f64 / count as f64);
                subscribe_s.push(subscribed.as_secs_f64());
                rate.push(outcome.deliveries as f64 / elapsed.as_secs_f64());
                bytes.push(rss_after.saturating_sub(rss_before) as f64 / count as f64);
                cpu_us.push(server_cpu.as_secs_f64() * 1e6 / count as f64);
                progress(&format!(
                    "many topics {case} {} rep {}: subscribed in {:.2} s, {:.0} records/s, {:.0} B/topic RSS, {} of {count} delivered",
                    kind.label(),
                    rep + 1,
                    subscribed.as_secs_f64(),
                    outcome.deliveries as f64 / elapsed.as_secs_f64(),
                    rss_after.saturating_sub(rss_before) as f64 / count as f64,
                    outcome.deliveries
                ));
            }
            results.add(subscribe_s);
            results.add(rate);
            results.add(bytes);
            results.add(cpu_us);
            results.add(delivered);
        }
    }
    Ok(())
}

/// The `channel_permissions` context of member `i` (as in the broker's criterion
/// bench): 20 role sets, and with `distinct` a user id each (member overwrites).
fn member_context(i: usize, distinct: bool) -> HashMap<String, String> {
    let roles = match i % 20 {
        0 => "23".to_owned(),
        n => format!("{},{}", 20 + n % 3, 24 + n / 3),
    };
    let mut context = HashMap::from([
        ("guild_id".to_owned(), "1".to_owned()),
        ("roles".to_owned(), roles),
        (
            "role_permissions".to_owned(),
            "1:0,20:1024,21:2048,22:1024,23:8,24:0".to_owned(),
        ),
    ]);
    if distinct {
        context.insert("user_id".to_owned(), (1000 + i).to_string());
    }
    context
}

/// One event to many filtered subscriptions (Switchyard only: the peers have no
/// per-subscriber filters): (a) a distinct context each, (b) 20 role sets.
pub async fn filters(systems: &Systems, sizes: &Sizes, results: &mut Results) -> Result<()> {
    let kind = Kind::Switchyard;
    let subscriptions = sizes.filtered_subscriptions;
    for (case, distinct) in [("distinct contexts", true), ("20 role sets", false)] {
        let case = format!("{subscriptions} subscriptions, {case}");
        let mut per_event = Measurement::new("filters", &case, kind, "events_per_s", "events/s");
        let mut per_sub = Measurement::new(
            "filters",
            &case,
            kind,
            "server_cpu_ns_per_subscription",
            "ns/subscription",
        );
        for rep in 0..sizes.reps {
            let topic = format!("guild.filters.{distinct}.{rep}");
            let topics = vec![topic.clone(); subscriptions];
            let consumer = systems
                .filtered_consumer(&topics, "channel_permissions", &|i| {
                    member_context(i, distinct)
                })
                .await?;
            let mut publisher = crate::systems::switchyard::Publisher::connect(
                systems.switchyard_address()?,
                false,
            )
            .await?;
            // Who may see channel 10: roles 20 and 22 (VIEW_CHANNEL), not 21
            // (denied by an overwrite), administrators (role 23), and member 1005.
            let event = |n: u64| {
                switchyard_client::Record::new(topic.clone(), format!(r#"{{"n":{n}}}"#))
                    .header("type", "MESSAGE_CREATE")
                    .header("channel_id", "10")
                    .header("overwrites", "1:0:1024,21:1024:0,1005:0:1024")
            };
            // Find out how many deliveries one event makes.
            let (expected, expecting) = watch::channel(u64::MAX);
            let counter = Counter::spawn(
                consumer,
                expecting.clone(),
                Instant::now() + DRAIN,
                None,
                false,
            );
            let cpu_before = cpu(systems, kind);
            let started = Instant::now();
            publisher.publish_records(&[event(0)]).await?;
            publisher.flush().await?;
            // Wait until the first event's deliveries stop growing.
            let mut per_event_deliveries = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = counter.received.load(Ordering::Relaxed);
                if now > 0 && now == per_event_deliveries {
                    break;
                }
                per_event_deliveries = now;
                if started.elapsed() > DRAIN {
                    bail!("filters: the first event was never delivered");
                }
            }
            let events = sizes.filter_events;
            let timed = Instant::now();
            for n in 1..events {
                publisher.publish_records(&[event(n)]).await?;
            }
            publisher.flush().await?;
            expected.send_replace(per_event_deliveries * events);
            let outcome = counter.finish().await?;
            let server_cpu = cpu(systems, kind).saturating_sub(cpu_before);
            if outcome.deliveries != per_event_deliveries * events {
                bail!(
                    "filters: {} deliveries, expected {}",
                    outcome.deliveries,
                    per_event_deliveries * events
                );
            }
            let elapsed = outcome.last.expect("delivered").duration_since(timed);
            let rate = (events - 1) as f64 / elapsed.as_secs_f64();
            per_event.push(rate);
            per_sub.push(server_cpu.as_nanos() as f64 / (events as f64 * subscriptions as f64));
            progress(&format!(
                "filters {case} rep {}: {rate:.0} events/s, {per_event_deliveries} of {subscriptions} pass, {:.0} ns server CPU per subscription",
                rep + 1,
                server_cpu.as_nanos() as f64 / (events as f64 * subscriptions as f64)
            ));
        }
        results.add(per_event);
        results.add(per_sub);
    }
    Ok(())
}

/// How long a restarted server may take to serve again before the run fails.
const RESTART_LIMIT: Duration = Duration::from_secs(600);

/// Retries `probe` until it succeeds (every 5 ms) and gives the time since `since`.
async fn until_serving<F, Fut>(since: Instant, what: &str, mut probe: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        match probe().await {
            Ok(()) => return Ok(since.elapsed()),
            Err(error) if since.elapsed() > RESTART_LIMIT => {
                bail!("{what} not serving {RESTART_LIMIT:?} after a restart: {error:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Time to serve again after a clean stop and after SIGKILL, with many topics
/// holding one record each: from the new process's start until a read of the last
/// topic's record answers. Switchyard at every count; the peers that keep data
/// across a restart (JetStream with file storage; Redis Streams with an
/// append-only file, fsynced every second) at the smallest.
pub async fn restart(
    systems: &mut Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    results: &mut Results,
) -> Result<()> {
    let smallest = sizes.restart_topics.iter().copied().min().unwrap_or(0);
    for &count in &sizes.restart_topics {
        if kinds.iter().any(|k| k.is_switchyard()) {
            restart_switchyard(systems, count, sizes.reps, results).await?;
        }
        for kind in [Kind::JetStream, Kind::RedisStreams] {
            if count == smallest && kinds.contains(&kind) {
                restart_peer(&systems.work_dir, kind, count, sizes.reps, results).await?;
            }
        }
    }
    Ok(())
}

fn restart_progress(case: &str, kind: Kind, rep: usize, kill: bool, took: Duration) {
    progress(&format!(
        "restart {case} {} rep {} ({}): serving after {:.3} s",
        kind.label(),
        rep + 1,
        if kill { "SIGKILL" } else { "clean" },
        took.as_secs_f64()
    ));
}

async fn restart_switchyard(
    systems: &mut Systems,
    count: u64,
    reps: usize,
    results: &mut Results,
) -> Result<()> {
    let kind = Kind::Switchyard;
    let case = format!("{count} topics");
    let mut clean = Measurement::new("restart", &case, kind, "clean_s", "s");
    let mut killed = Measurement::new("restart", &case, kind, "sigkill_s", "s");
    systems.fresh_switchyard()?;
    {
        let mut publisher = systems.publisher(Kind::SwitchyardDurable).await?;
        let body = payload(100);
        let mut i = 0;
        while i < count {
            let end = (i + CHUNK as u64).min(count);
            let records = (i..end)
                .map(|t| (format!("user.{t}"), body.clone()))
                .collect();
            publisher.publish_many(records).await?;
            i = end;
        }
        publisher.flush().await?;
    }
    let last = format!("user.{}", count - 1);
    for rep in 0..reps {
        for (kill, measurement) in [(false, &mut clean), (true, &mut killed)] {
            let server = systems.switchyard.take().expect("running");
            // `started`: from the new process's spawn to its listen line.
            let (server, started) = server.restart(kill)?;
            let address = server.address.clone();
            systems.switchyard = Some(server);
            let took = until_serving(Instant::now(), "switchyard", || async {
                match switchyard_client::Client::connect(&address)
                    .await?
                    .topic_info(&last)
                    .await?
                {
                    Some(_) => Ok(()),
                    None => bail!("topic {last} is gone"),
                }
            })
            .await?;
            measurement.push((started + took).as_secs_f64());
            restart_progress(&case, kind, rep, kill, started + took);
        }
    }
    results.add(clean);
    results.add(killed);
    Ok(())
}

/// A peer of its own (`peers.sh serve`), loaded with `count` subjects or keys of
/// one record each, restarted `reps` times each way.
async fn restart_peer(
    work_dir: &std::path::Path,
    kind: Kind,
    count: u64,
    reps: usize,
    results: &mut Results,
) -> Result<()> {
    use crate::systems::{PeerServer, nats, redis};
    let case = format!("{count} topics");
    let mut clean = Measurement::new("restart", &case, kind, "clean_s", "s");
    let mut killed = Measurement::new("restart", &case, kind, "sigkill_s", "s");
    let name = if kind == Kind::JetStream {
        "nats"
    } else {
        "redis"
    };
    let dir = work_dir.join(format!("restart-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut server = PeerServer::spawn(name, &dir)?;
    let url = server.url();
    let body = payload(100);
    let topics = (0..count).map(|i| kind.topic(&format!("user.{i}")));
    if kind == Kind::JetStream {
        until_serving(Instant::now(), name, || nats::reset_stream(&url)).await?;
        let mut publisher = nats::JetStreamPublisher::connect(&url).await?;
        for subject in topics {
            publisher.publish(&subject, vec![body.clone()]).await?;
        }
        publisher.flush().await?;
    } else {
        until_serving(Instant::now(), name, || async {
            redis::connect(&url).await.map(drop)
        })
        .await?;
        let mut publisher = redis::Publisher::connect(&url, true).await?;
        let topics: Vec<String> = topics.collect();
        for chunk in topics.chunks(CHUNK) {
            let records = chunk.iter().map(|t| (t.clone(), body.clone())).collect();
            publisher.publish_many(records).await?;
        }
        publisher.flush().await?;
        // What was written is on disk before the first stop (appendfsync everysec).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let last = kind.topic(&format!("user.{}", count - 1));
    for rep in 0..reps {
        for (kill, measurement) in [(false, &mut clean), (true, &mut killed)] {
            server = server.restart(kill)?;
            let since = Instant::now();
            let took = if kind == Kind::JetStream {
                until_serving(since, name, || nats::last_message(&url, &last)).await?
            } else {
                until_serving(since, name, || redis::has_key(&url, &last)).await?
            };
            measurement.push(took.as_secs_f64());
            restart_progress(&case, kind, rep, kill, took);
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    results.add(clean);
    results.add(killed);
    Ok(())
}
