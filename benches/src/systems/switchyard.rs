//! Switchyard: a `switchyard serve` child process, driven through the Rust client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use switchyard_client::{
    Ack, PendingBatch, Producer, ProducerConfig, Record, Start, Subscriber, SubscriberEvent,
};

/// A broker process with its data directory.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub address: String,
    pub data_dir: PathBuf,
    binary: PathBuf,
    filters_dir: PathBuf,
}

impl Server {
    /// Starts `binary serve` on loopback ports chosen by the kernel, data in
    /// `data_dir`, and waits until it listens; returns it with how long that took.
    pub fn start(binary: &Path, data_dir: &Path, filters_dir: &Path) -> Result<(Server, Duration)> {
        let started = Instant::now();
        let mut child = super::machine_thp(&mut Command::new(binary))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--filters-dir")
            .arg(filters_dir)
            .env("RUST_LOG", "warn")
            // As the peers are run (Redis: no output buffer limit; NATS: 64 MB per
            // subscriber), a generous buffer per subscriber stream, so that the
            // benchmark's own subscriber lagging for a moment is not cut off.
            .env("SWITCHYARD_MAX_PENDING_MIB_PER_STREAM", "256")
            // The many-topics scenario holds up to 10M subscriptions on one stream.
            .env("SWITCHYARD_MAX_SUBSCRIPTIONS_PER_STREAM", "20000000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(address) = line
            .strip_prefix("switchyard listening on ")
            .and_then(|rest| rest.split_whitespace().next())
        else {
            let _ = child.kill();
            bail!("switchyard did not start: {line:?}");
        };
        let server = Server {
            address: format!("http://{address}"),
            child,
            data_dir: data_dir.to_owned(),
            binary: binary.to_owned(),
            filters_dir: filters_dir.to_owned(),
        };
        Ok((server, started.elapsed()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the broker: SIGTERM (clean: synced, CLEAN marker) or SIGKILL.
    pub fn stop(mut self, kill: bool) -> Result<()> {
        let signal = if kill { "-KILL" } else { "-TERM" };
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !kill && !status.success() {
            bail!("switchyard exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// Stops the broker and starts it again on the same data; returns the new server
    /// and the time from the start of the new process until it listened.
    pub fn restart(self, kill: bool) -> Result<(Server, Duration)> {
        let (binary, data_dir, filters_dir) = (
            self.binary.clone(),
            self.data_dir.clone(),
            self.filters_dir.clone(),
        );
        self.stop(kill)?;
        Server::start(&binary, &data_dir, &filters_dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's producer, with a batch of acknowledgements awaited at a time.
#[derive(Debug)]
pub struct Publisher {
    producer: Producer,
    pending: std::collections::VecDeque<PendingBatch>,
}

/// Batches sent and not yet acknowledged, at most: 256 batches of 1,000 records
/// cover a durable acknowledgement's wait for its sync (tens of ms when the machine
/// is saturated and the kernel's journal thread waits for a core) at over 2M
/// records/s. With 64, durable throughput was capped near 64,000 records per ack
/// latency (about 1M/s here) while written acks ran at 1.6M/s.
const IN_FLIGHT: usize = 256;

impl Publisher {
    pub async fn connect(address: &str, durable: bool) -> Result<Publisher> {
        let config = ProducerConfig {
            ack: if durable { Ack::Durable } else { Ack::Written },
            max_in_flight: IN_FLIGHT,
            // A refusal (a full disk) ends the run with the broker's reason, and
            // so does a broken stream: a measurement with resends in it would
            // mean nothing.
            max_retries: 0,
            ..ProducerConfig::default()
        };
        Ok(Publisher {
            producer: Producer::connect(address, config).await?,
            pending: Default::default(),
        })
    }

    pub async fn publish(&mut self, topic: &str, payloads: Vec<Bytes>) -> Result<()> {
        let records: Vec<Record> = payloads
            .into_iter()
            .map(|payload| Record::new(topic, payload))
            .collect();
        self.publish_records(&records).await
    }

    /// Sends `count` records of `payload` to `topic`. The records are built for
    /// each batch, as a producer with a new event each time builds them: reusing
    /// one vector (`send_batch` borrows it) would spare this load generator work
    /// that a real producer does and that the peers' load generators still do per
    /// message.
    pub async fn publish_copies(
        &mut self,
        topic: &str,
        payload: &Bytes,
        count: usize,
    ) -> Result<()> {
        let records: Vec<Record> = (0..count)
            .map(|_| Record::new(topic, payload.clone()))
            .collect();
        self.publish_records(&records).await
    }

    pub async fn publish_records(&mut self, records: &[Record]) -> Result<()> {
        if self.pending.len() >= IN_FLIGHT {
            let oldest = self.pending.pop_front().expect("full");
            oldest.await?;
        }
        self.pending
            .push_back(self.producer.send_batch(records).await?);
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        while let Some(batch) = self.pending.pop_front() {
            batch.await?;
        }
        Ok(())
    }
}

/// The filter context of the i-th subscription.
pub type ContextOf<'a> = dyn Fn(usize) -> HashMap<String, String> + 'a;

/// One subscriber stream with any number of subscriptions.
#[derive(Debug)]
pub struct Consumer {
    subscriber: Subscriber,
}

impl Consumer {
    /// Subscribes to every topic (from `start`) on one stream and waits until the
    /// broker has started them all.
    pub async fn subscribe(
        address: &str,
        topics: &[String],
        start: Start,
        filter: Option<(&str, &ContextOf<'_>)>,
    ) -> Result<Consumer> {
        let mut subscriber = Subscriber::connect(address).await?;
        for (id, topic) in topics.iter().enumerate() {
            match filter {
                Some((name, context)) => {
                    subscriber
                        .subscribe_filtered(id as u64, topic.clone(), start, name, context(id))
                        .await?
                }
                None => {
                    subscriber
                        .subscribe(id as u64, topic.clone(), start)
                        .await?
                }
            }
        }
        let mut started = 0;
        while started < topics.len() {
            match subscriber.next().await {
                Some(SubscriberEvent::Started { .. }) => started += 1,
                Some(SubscriberEvent::Refused { id, error }) => {
                    bail!("subscription {id} refused: {error}")
                }
                Some(_) => {}
                None => bail!("subscriber closed while subscribing"),
            }
        }
        Ok(Consumer { subscriber })
    }

    /// Hands each payload delivered so far (waiting for one) to `f` with the number
    /// of subscriptions it is for; false once the stream is gone.
    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        let Some(events) = self.subscriber.next_events().await else {
            return Ok(false);
        };
        // By reference: moving each ~150-byte event out of the vector was a
        // measurable share of the load generator's CPU.
        for event in &events {
            match event {
                SubscriberEvent::Delivery(d) => f(&d.payload, d.subscription_ids.len()),
                SubscriberEvent::Refused { id, error } => bail!("subscription {id}: {error}"),
                _ => {}
            }
        }
        Ok(true)
    }
}
