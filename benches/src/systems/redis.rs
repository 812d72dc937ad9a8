//! Redis Pub/Sub and Redis Streams through the `redis` crate (tokio, multiplexed,
//! pipelined).

use std::collections::VecDeque;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

/// Pipelines sent and not yet answered, at most.
const IN_FLIGHT: usize = 8;

type Answer = tokio::task::JoinHandle<redis::RedisResult<()>>;

/// PUBLISH or XADD, pipelined: each call is one pipeline, several in flight.
pub struct Publisher {
    connection: MultiplexedConnection,
    streams: bool,
    pending: VecDeque<Answer>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("streams", &self.streams)
            .finish()
    }
}

pub async fn connect(url: &str) -> Result<MultiplexedConnection> {
    // The client's default gives a reply 500 ms, which a saturated machine (100
    // subscribers being fed on two cores) exceeds: the run would fail, not measure.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to Redis at {url}"))
}

/// One attempt to find stream key `key` (the restart scenario's "serving again":
/// Redis answers LOADING until its append-only file is read).
pub async fn has_key(url: &str, key: &str) -> Result<()> {
    let mut connection = connect(url).await?;
    let exists: bool = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut connection)
        .await?;
    if !exists {
        bail!("key {key} is missing");
    }
    Ok(())
}

impl Publisher {
    /// `streams`: XADD to a stream key; otherwise PUBLISH to a channel.
    pub async fn connect(url: &str, streams: bool) -> Result<Self> {
        Ok(Publisher {
            connection: connect(url).await?,
            streams,
            pending: VecDeque::new(),
        })
    }

    pub async fn publish(&mut self, key: &str, payloads: Vec<Bytes>) -> Result<()> {
        let mut pipe = redis::pipe();
        for payload in &payloads {
            self.command(&mut pipe, key, payload);
        }
        self.send(pipe).await
    }

    /// `count` commands with `payload`, in one pipeline.
    pub async fn publish_copies(&mut self, key: &str, payload: &Bytes, count: usize) -> Result<()> {
        let mut pipe = redis::pipe();
        for _ in 0..count {
            self.command(&mut pipe, key, payload);
        }
        self.send(pipe).await
    }

    /// One payload to each of many channels or keys, in one pipeline.
    pub async fn publish_many(&mut self, records: Vec<(String, Bytes)>) -> Result<()> {
        let mut pipe = redis::pipe();
        for (key, payload) in &records {
            self.command(&mut pipe, key, payload);
        }
        self.send(pipe).await
    }

    fn command(&self, pipe: &mut redis::Pipeline, key: &str, payload: &Bytes) {
        if self.streams {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("d")
                .arg(payload.as_ref());
        } else {
            pipe.cmd("PUBLISH").arg(key).arg(payload.as_ref());
        }
        pipe.ignore();
    }

    async fn send(&mut self, pipe: redis::Pipeline) -> Result<()> {
        if self.pending.len() >= IN_FLIGHT {
            self.pending.pop_front().expect("full").await??;
        }
        let mut connection = self.connection.clone();
        self.pending.push_back(tokio::spawn(async move {
            pipe.query_async::<()>(&mut connection).await
        }));
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        while let Some(answer) = self.pending.pop_front() {
            answer.await??;
        }
        Ok(())
    }
}

/// SUBSCRIBE to channels on one connection.
pub struct PubSubConsumer {
    messages: futures_util::stream::BoxStream<'static, redis::Msg>,
}

impl std::fmt::Debug for PubSubConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PubSubConsumer")
    }
}

impl PubSubConsumer {
    pub async fn subscribe(url: &str, channels: &[String]) -> Result<Self> {
        let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
        // One SUBSCRIBE per 10,000 channels; each returns once Redis confirmed it.
        for chunk in channels.chunks(10_000) {
            pubsub.subscribe(chunk).await?;
        }
        Ok(PubSubConsumer {
            messages: pubsub.into_on_message().boxed(),
        })
    }

    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        super::take_ready(&mut self.messages, |message| {
            f(message.get_payload_bytes(), 1);
            Ok(())
        })
        .await
    }
}

/// XREAD BLOCK on one stream key, from the entries added after it started.
pub struct StreamConsumer {
    connection: MultiplexedConnection,
    key: String,
    last_id: String,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("key", &self.key)
            .finish()
    }
}

impl StreamConsumer {
    pub async fn subscribe(url: &str, key: &str) -> Result<Self> {
        // A connection of its own: XREAD BLOCK holds it.
        let mut connection = connect(url).await?;
        // Start after the stream's current last entry ("$" would race with the
        // first XADD between two XREADs).
        let last: Option<redis::streams::StreamRangeReply> = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .ok();
        let last_id = last
            .and_then(|r| r.ids.first().map(|e| e.id.clone()))
            .unwrap_or_else(|| "0-0".to_owned());
        Ok(StreamConsumer {
            connection,
            key: key.to_owned(),
            last_id,
        })
    }

    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id)
            .query_async(&mut self.connection)
            .await?;
        for key in reply.into_iter().flat_map(|r| r.keys) {
            for entry in key.ids {
                if let Some(redis::Value::BulkString(payload)) = entry.map.get("d") {
                    f(payload, 1);
                }
                self.last_id = entry.id;
            }
        }
        Ok(true)
    }
}
