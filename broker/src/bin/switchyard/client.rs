//! The command-line client: `pub`, `sub`, `fetch`, `topic info`, on the
//! `switchyard-client` library (the producer batches and pipelines; the subscriber
//! reconnects and resumes by itself).

use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use switchyard_client::{
    Ack, Client, Delivery, Position, Producer, ProducerConfig, Record, Start, Subscriber,
    SubscriberEvent,
};

#[derive(Debug, clap::Args)]
pub struct BrokerArg {
    /// The broker's gRPC address.
    #[arg(
        long,
        env = "SWITCHYARD_BROKER",
        default_value = "http://127.0.0.1:7400"
    )]
    broker: String,
}

#[derive(Debug, clap::Args)]
pub struct PubArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// The topic, e.g. guild.123.
    topic: String,
    /// Payloads, one record each; without any, each line of standard input is one.
    payloads: Vec<String>,
    /// A header for every record, KEY=VALUE (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Wait until the records are synced to disk.
    #[arg(long)]
    durable: bool,
}

#[derive(Debug, clap::Args)]
pub struct SubArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// Topics to follow.
    #[arg(required = true)]
    topics: Vec<String>,
    /// Where to start: latest, earliest, or OFFSET@EPOCH to resume.
    #[arg(long, default_value = "latest")]
    from: String,
    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// A delivery filter loaded in the broker (e.g. channel_permissions).
    #[arg(long)]
    filter: Option<String>,
    /// What the filter knows of the subscriber, KEY=VALUE (repeatable).
    #[arg(long = "context", short = 'c')]
    context: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    #[command(flatten)]
    broker: BrokerArg,
    topic: String,
    /// First offset.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Most records.
    #[arg(long, default_value_t = 100)]
    max: u32,
}

#[derive(Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// A topic's epoch, retained offsets and latest timestamp.
    Info {
        #[command(flatten)]
        broker: BrokerArg,
        topic: String,
    },
}

fn parse_headers(headers: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|h| match h.split_once('=') {
            Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
            None => bail!("header {h:?} must be KEY=VALUE"),
        })
        .collect()
}

fn connect_hint(broker: &str) -> String {
    format!("connecting to the broker at {broker} (is `switchyard serve` running?)")
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let headers = parse_headers(&args.headers)?;
    let config = ProducerConfig {
        ack: if args.durable {
            Ack::Durable
        } else {
            Ack::Written
        },
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(&args.broker.broker, config)
        .await
        .with_context(|| connect_hint(&args.broker.broker))?;
    let make = |payload: String| {
        let mut record = Record::new(args.topic.clone(), payload);
        record.headers = headers.clone();
        record
    };
    let mut pending = Vec::new();
    if args.payloads.is_empty() {
        for line in std::io::stdin().lock().lines() {
            pending.push(
                producer
                    .send(make(line.context("reading standard input")?))
                    .await?,
            );
        }
    } else {
        for payload in &args.payloads {
            pending.push(producer.send(make(payload.clone())).await?);
        }
    }
    let count = pending.len();
    let mut range: Option<(Position, Position)> = None;
    for position in pending {
        let position = position.await?;
        range = Some(range.map_or((position, position), |(first, _)| (first, position)));
    }
    if let Some((first, last)) = range {
        println!(
            "published {count} to {} at offsets {}..={} (epoch {})",
            args.topic, first.offset, last.offset, last.epoch
        );
    }
    Ok(())
}

fn start_position(from: &str) -> anyhow::Result<Start> {
    Ok(match from {
        "latest" => Start::Latest,
        "earliest" => Start::Earliest,
        position => {
            let Some((offset, epoch)) = position.split_once('@') else {
                bail!("--from must be latest, earliest or OFFSET@EPOCH, not {position:?}");
            };
            Start::At(Position {
                offset: offset.parse().context("the offset in --from")?,
                epoch: epoch.parse().context("the epoch in --from")?,
            })
        }
    })
}

fn print_record(out: &mut impl Write, record: &Delivery) -> std::io::Result<()> {
    write!(out, "{} {} {}", record.topic, record.offset, record.epoch)?;
    for (key, value) in &record.headers {
        write!(out, " {key}={value}")?;
    }
    writeln!(out, " {}", String::from_utf8_lossy(&record.payload))
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let start = start_position(&args.from)?;
    let mut subscriber = Subscriber::connect(&args.broker.broker)
        .await
        .with_context(|| connect_hint(&args.broker.broker))?;
    let context: std::collections::HashMap<String, String> =
        parse_headers(&args.context)?.into_iter().collect();
    for (id, topic) in args.topics.iter().enumerate() {
        match &args.filter {
            Some(filter) => {
                subscriber
                    .subscribe_filtered(
                        id as u64,
                        topic.clone(),
                        start,
                        filter.clone(),
                        context.clone(),
                    )
                    .await?
            }
            None => {
                subscriber
                    .subscribe(id as u64, topic.clone(), start)
                    .await?
            }
        }
    }
    let mut delivered = 0u64;
    while let Some(event) = subscriber.next().await {
        match event {
            SubscriberEvent::Delivery(record) => {
                let mut out = std::io::stdout().lock();
                print_record(&mut out, &record)?;
                out.flush()?;
                delivered += 1;
                if args.count.is_some_and(|count| delivered >= count) {
                    return Ok(());
                }
            }
            SubscriberEvent::Started { id, next } => {
                tracing::info!(topic = %args.topics[id as usize], offset = next.offset, epoch = next.epoch, "subscribed");
            }
            SubscriberEvent::Disconnected { error } => {
                tracing::warn!(%error, "disconnected; resuming")
            }
            SubscriberEvent::Reconnected => tracing::info!("reconnected"),
            SubscriberEvent::HistoryLost {
                id,
                current_epoch,
                earliest_offset,
                next_offset,
            } => bail!(
                "{}: history lost; the topic is at epoch {current_epoch} with offsets {earliest_offset}..{next_offset} \
                 (start again with --from earliest or latest)",
                args.topics[id as usize]
            ),
            SubscriberEvent::Refused { id, error } => {
                bail!("{}: {error}", args.topics[id as usize])
            }
            SubscriberEvent::Removed { .. } => {}
        }
    }
    Ok(())
}

pub async fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let client = Client::connect(&args.broker.broker)
        .await
        .with_context(|| connect_hint(&args.broker.broker))?;
    let (records, _) = client.fetch(&args.topic, args.offset, args.max).await?;
    let mut out = std::io::stdout().lock();
    for record in &records {
        print_record(&mut out, record)?;
    }
    Ok(())
}

pub async fn topic(command: TopicCommand) -> anyhow::Result<()> {
    let TopicCommand::Info { broker, topic } = command;
    let client = Client::connect(&broker.broker)
        .await
        .with_context(|| connect_hint(&broker.broker))?;
    match client.topic_info(&topic).await? {
        Some(info) => println!(
            "{topic}: epoch {} offsets {}..{}, latest at {} ms",
            info.epoch, info.earliest_offset, info.next_offset, info.latest_timestamp_ms
        ),
        None => println!("{topic}: no records"),
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum FilterCommand {
    /// Compile a filter file as the broker would; prints the error with its line.
    Check {
        /// The filter file (NAME.lua).
        file: std::path::PathBuf,
    },
    /// Run a filter against a JSON file of cases and report each.
    Test {
        file: std::path::PathBuf,
        /// The cases: [{"name", "event": {topic, headers, payload}, "subscription":
        /// {id, context}, "expect": true|false}, ...]
        #[arg(long)]
        cases: std::path::PathBuf,
    },
    /// Ask the broker to reload its filter directory now.
    Reload {
        #[command(flatten)]
        broker: BrokerArg,
    },
}

pub async fn filter(command: FilterCommand) -> anyhow::Result<()> {
    use switchyard_broker::filter::{FilterLimits, cases, check_source};
    match command {
        FilterCommand::Check { file } => {
            let source = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            check_source(
                &file.display().to_string(),
                &source,
                FilterLimits::default(),
            )?;
            println!("{}: ok", file.display());
        }
        FilterCommand::Test {
            file,
            cases: cases_file,
        } => {
            let results = cases::run(&file, &cases_file, FilterLimits::default())
                .map_err(anyhow::Error::msg)?;
            let failed = results.iter().filter(|r| !r.passed).count();
            for result in &results {
                if result.passed {
                    println!("ok    {}", result.name);
                } else {
                    println!("FAIL  {}: {}", result.name, result.detail);
                }
            }
            println!("{} passed, {failed} failed", results.len() - failed);
            if failed > 0 {
                bail!("{failed} of {} cases failed", results.len());
            }
        }
        FilterCommand::Reload { broker } => {
            let client = Client::connect(&broker.broker)
                .await
                .with_context(|| connect_hint(&broker.broker))?;
            let (serving, failed) = client.reload_filters().await?;
            println!("serving: {}", serving.join(", "));
            for failure in &failed {
                println!("refused: {failure}");
            }
            if !failed.is_empty() {
                bail!(
                    "{} filter files were refused (their previous versions keep serving)",
                    failed.len()
                );
            }
        }
    }
    Ok(())
}
