//! NATS core and JetStream through async-nats, the official Rust client.

use std::collections::VecDeque;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::stream::SelectAll;

/// The JetStream stream every benchmark subject belongs to.
pub const STREAM: &str = "BENCH";
/// JetStream subjects start with this (the stream captures `js.>`).
pub const JS_PREFIX: &str = "js.";

/// Acknowledgements awaited at a time by the JetStream publisher (the issue's
/// reference figures used 256–4,096).
const JS_IN_FLIGHT: usize = 4096;

pub async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        // Room for a benchmark's worth of messages before the client drops any.
        .subscription_capacity(1 << 20)
        .client_capacity(1 << 16)
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// Creates (or empties) the file-backed benchmark stream.
pub async fn reset_stream(url: &str) -> Result<()> {
    let context = jetstream::new(connect(url).await?);
    let _ = context.delete_stream(STREAM).await;
    context
        .create_stream(jetstream::stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{JS_PREFIX}>")],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    Ok(())
}

/// One attempt to read the last message of `subject` from the benchmark stream
/// (the restart scenario's "serving again"); short timeouts, as the caller retries.
pub async fn last_message(url: &str, subject: &str) -> Result<()> {
    let timeout = std::time::Duration::from_millis(500);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(timeout)
        .connect(url)
        .await?;
    let mut context = jetstream::new(client);
    context.set_timeout(timeout);
    let stream = context.get_stream(STREAM).await?;
    stream.get_last_raw_message_by_subject(subject).await?;
    Ok(())
}

#[derive(Debug)]
pub struct CorePublisher {
    client: async_nats::Client,
}

impl CorePublisher {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(CorePublisher {
            client: connect(url).await?,
        })
    }

    pub async fn publish(&mut self, subject: &str, payloads: Vec<Bytes>) -> Result<()> {
        let subject = async_nats::Subject::from(subject);
        for payload in payloads {
            self.client.publish(subject.clone(), payload).await?;
        }
        Ok(())
    }

    /// `count` messages of `payload` (the client takes each by value: one
    /// reference-count increment per message).
    pub async fn publish_copies(
        &mut self,
        subject: &str,
        payload: &Bytes,
        count: usize,
    ) -> Result<()> {
        let subject = async_nats::Subject::from(subject);
        for _ in 0..count {
            self.client
                .publish(subject.clone(), payload.clone())
                .await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.client.flush().await?;
        Ok(())
    }
}

pub struct JetStreamPublisher {
    context: jetstream::Context,
    pending: VecDeque<jetstream::context::PublishAckFuture>,
}

impl std::fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JetStreamPublisher")
    }
}

impl JetStreamPublisher {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(JetStreamPublisher {
            context: jetstream::new(connect(url).await?),
            pending: VecDeque::new(),
        })
    }

    pub async fn publish(&mut self, subject: &str, payloads: Vec<Bytes>) -> Result<()> {
        let subject = async_nats::Subject::from(subject);
        for payload in payloads {
            self.publish_one(&subject, payload).await?;
        }
        Ok(())
    }

    pub async fn publish_copies(
        &mut self,
        subject: &str,
        payload: &Bytes,
        count: usize,
    ) -> Result<()> {
        let subject = async_nats::Subject::from(subject);
        for _ in 0..count {
            self.publish_one(&subject, payload.clone()).await?;
        }
        Ok(())
    }

    async fn publish_one(&mut self, subject: &async_nats::Subject, payload: Bytes) -> Result<()> {
        if self.pending.len() >= JS_IN_FLIGHT {
            self.pending.pop_front().expect("full").await?;
        }
        self.pending
            .push_back(self.context.publish(subject.clone(), payload).await?);
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        while let Some(ack) = self.pending.pop_front() {
            ack.await?;
        }
        Ok(())
    }
}

/// Core subscriptions on one connection, merged.
pub struct CoreConsumer {
    _client: async_nats::Client,
    messages: SelectAll<async_nats::Subscriber>,
}

impl std::fmt::Debug for CoreConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreConsumer")
    }
}

impl CoreConsumer {
    pub async fn subscribe(url: &str, subjects: &[String]) -> Result<Self> {
        let client = connect(url).await?;
        let mut messages = SelectAll::new();
        for subject in subjects {
            messages.push(client.subscribe(subject.clone()).await?);
        }
        // The server has every SUB once it answers the PING behind them.
        client.flush().await?;
        Ok(CoreConsumer {
            _client: client,
            messages,
        })
    }

    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        super::take_ready(&mut self.messages, |message| {
            f(&message.payload, 1);
            Ok(())
        })
        .await
    }
}

type Ordered = jetstream::consumer::pull::Ordered;

/// An ordered (ack-less, flow-controlled) JetStream consumer of new messages.
pub struct JetStreamConsumer {
    messages: Ordered,
}

impl std::fmt::Debug for JetStreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JetStreamConsumer")
    }
}

impl JetStreamConsumer {
    pub async fn subscribe(url: &str, subject: &str) -> Result<Self> {
        let context = jetstream::new(connect(url).await?);
        let stream = context.get_stream(STREAM).await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let messages = consumer.messages().await?;
        Ok(JetStreamConsumer { messages })
    }

    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        super::take_ready(&mut self.messages, |message| match message {
            Ok(message) => {
                f(&message.payload, 1);
                Ok(())
            }
            Err(error) => bail!("JetStream consumer: {error}"),
        })
        .await
    }
}
