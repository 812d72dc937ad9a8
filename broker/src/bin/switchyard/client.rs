//! The command-line client: `pub`, `sub`, `fetch`, `topic info`.

use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tonic::transport::Channel;

/// Records per publish request when reading standard input.
const STDIN_BATCH: usize = 1000;

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

impl BrokerArg {
    async fn connect(&self) -> anyhow::Result<BrokerClient<Channel>> {
        let client = BrokerClient::connect(self.broker.clone())
            .await
            .with_context(|| {
                format!(
                    "connecting to the broker at {} (is `switchyard serve` running?)",
                    self.broker
                )
            })?;
        Ok(client
            .max_decoding_message_size(switchyard_broker::server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(switchyard_broker::server::MAX_MESSAGE_BYTES))
    }
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

fn parse_headers(headers: &[String]) -> anyhow::Result<Vec<pb::Header>> {
    headers
        .iter()
        .map(|h| match h.split_once('=') {
            Some((key, value)) => Ok(pb::Header {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
            None => bail!("header {h:?} must be KEY=VALUE"),
        })
        .collect()
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let headers = parse_headers(&args.headers)?;
    let mut client = args.broker.connect().await?;
    let ack = if args.durable {
        pb::AckLevel::Durable
    } else {
        pb::AckLevel::Written
    };
    let make = |payload: String| pb::PublishRecord {
        topic: args.topic.clone(),
        headers: headers.clone(),
        payload: payload.into(),
    };
    let mut send = async |records: Vec<pb::PublishRecord>| -> anyhow::Result<()> {
        let count = records.len();
        let response = client
            .publish(pb::PublishRequest {
                request_id: 0,
                records,
                ack: ack as i32,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if let (Some(first), Some(last)) = (response.positions.first(), response.positions.last()) {
            println!(
                "published {count} to {} at offsets {}..={} (epoch {})",
                args.topic, first.offset, last.offset, last.epoch
            );
        }
        Ok(())
    };
    if !args.payloads.is_empty() {
        return send(args.payloads.iter().cloned().map(make).collect()).await;
    }
    let mut batch = Vec::new();
    for line in std::io::stdin().lock().lines() {
        batch.push(make(line.context("reading standard input")?));
        if batch.len() == STDIN_BATCH {
            send(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        send(batch).await?;
    }
    Ok(())
}

fn start_position(from: &str) -> anyhow::Result<pb::start_position::Start> {
    use pb::start_position::Start;
    Ok(match from {
        "latest" => Start::Latest(pb::Latest {}),
        "earliest" => Start::Earliest(pb::Earliest {}),
        position => {
            let Some((offset, epoch)) = position.split_once('@') else {
                bail!("--from must be latest, earliest or OFFSET@EPOCH, not {position:?}");
            };
            Start::Resume(pb::Position {
                offset: offset.parse().context("the offset in --from")?,
                epoch: epoch.parse().context("the epoch in --from")?,
            })
        }
    })
}

fn print_record(out: &mut impl Write, record: &pb::Delivery) -> std::io::Result<()> {
    write!(out, "{} {} {}", record.topic, record.offset, record.epoch)?;
    for header in &record.headers {
        write!(out, " {}={}", header.key, header.value)?;
    }
    writeln!(out, " {}", String::from_utf8_lossy(&record.payload))
}

pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let start = start_position(&args.from)?;
    let mut client = args.broker.connect().await?;
    let commands: Vec<pb::SubscribeRequest> = args
        .topics
        .iter()
        .enumerate()
        .map(|(id, topic)| pb::SubscribeRequest {
            command: Some(pb::subscribe_request::Command::Add(pb::Subscription {
                id: id as u64,
                topic: topic.clone(),
                start: Some(pb::StartPosition { start: Some(start) }),
                filter: String::new(),
                context: Default::default(),
            })),
        })
        .collect();
    // Keep the request side open: closing it is fine, but there is nothing to add.
    let requests =
        tokio_stream::StreamExt::chain(tokio_stream::iter(commands), tokio_stream::pending());
    let mut responses = client
        .subscribe(requests)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut delivered = 0u64;
    let stdout = std::io::stdout();
    while let Some(response) = responses.message().await.map_err(status_error)? {
        match response.event {
            Some(pb::subscribe_response::Event::Deliveries(batch)) => {
                let mut out = stdout.lock();
                for record in &batch.deliveries {
                    print_record(&mut out, record)?;
                    delivered += 1;
                    if args.count.is_some_and(|count| delivered >= count) {
                        return Ok(());
                    }
                }
                out.flush()?;
            }
            Some(pb::subscribe_response::Event::Update(update)) => match update.state {
                Some(pb::subscription_update::State::Started(started)) => {
                    let next = started.next.unwrap_or_default();
                    tracing::info!(topic = %args.topics[update.id as usize], offset = next.offset, epoch = next.epoch, "subscribed");
                }
                other => bail!(
                    "subscription to {} ended: {other:?}",
                    args.topics[update.id as usize]
                ),
            },
            None => {}
        }
    }
    Ok(())
}

pub async fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let mut client = args.broker.connect().await?;
    let response = client
        .fetch(pb::FetchRequest {
            topic: args.topic,
            offset: args.offset,
            max_records: args.max,
            max_bytes: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    for record in &response.records {
        print_record(&mut out, record)?;
    }
    Ok(())
}

pub async fn topic(command: TopicCommand) -> anyhow::Result<()> {
    let TopicCommand::Info { broker, topic } = command;
    let mut client = broker.connect().await?;
    let info = client
        .get_topic_info(pb::TopicInfoRequest {
            topic: topic.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if info.exists {
        println!(
            "{topic}: epoch {} offsets {}..{} (next {}), latest at {} ms",
            info.epoch,
            info.earliest_offset,
            info.next_offset,
            info.next_offset,
            info.latest_timestamp_ms
        );
    } else {
        println!("{topic}: no records");
    }
    Ok(())
}
