//! The systems under test, behind one small interface: a publisher (publish a batch
//! of payloads to a topic without waiting, flush = wait for every acknowledgement)
//! and a consumer (subscribed to topics before it is returned; hands each delivered
//! payload to a callback).

pub mod nats;
pub mod redis;
pub mod switchyard;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;

/// A system and the way it is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Switchyard, acknowledged once written to the broker's log.
    Switchyard,
    /// Switchyard, acknowledged once synced to disk.
    SwitchyardDurable,
    Nats,
    JetStream,
    RedisPubSub,
    RedisStreams,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Switchyard,
        Kind::SwitchyardDurable,
        Kind::Nats,
        Kind::JetStream,
        Kind::RedisPubSub,
        Kind::RedisStreams,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Switchyard => "switchyard",
            Kind::SwitchyardDurable => "switchyard-durable",
            Kind::Nats => "nats",
            Kind::JetStream => "jetstream",
            Kind::RedisPubSub => "redis-pubsub",
            Kind::RedisStreams => "redis-streams",
        }
    }

    pub fn parse(label: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.label() == label)
            .with_context(|| {
                let known: Vec<_> = Kind::ALL.iter().map(|k| k.label()).collect();
                format!("unknown system {label:?} (known: {})", known.join(", "))
            })
    }

    pub fn is_switchyard(self) -> bool {
        matches!(self, Kind::Switchyard | Kind::SwitchyardDurable)
    }

    /// The name this system gives benchmark topic `name`.
    pub fn topic(self, name: &str) -> String {
        match self {
            Kind::JetStream => format!("{}{name}", nats::JS_PREFIX),
            _ => name.to_owned(),
        }
    }
}

/// The peers' addresses and PIDs (from `benches/peers.sh start`).
#[derive(Debug, Clone)]
pub struct Peers {
    pub dir: PathBuf,
    pub nats_url: String,
    pub redis_url: String,
    pub nats_pid: u32,
    pub redis_pid: u32,
}

/// Whether transparent huge pages were off for the load generator as started,
/// before `main` turned them off.
static THP_OFF_AT_START: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes the load generator's transparent-huge-page setting as started (call it
/// before turning them off).
pub fn remember_thp() {
    let off = rustix::thread::transparent_huge_pages_are_disabled().unwrap_or(false);
    THP_OFF_AT_START.store(off, std::sync::atomic::Ordering::Relaxed);
}

/// `command` run with the transparent-huge-page setting the load generator was
/// started with (the machine's, normally): it turns them off for itself (`main`),
/// and a child would inherit that. Each server then runs as it would on its own
/// (Switchyard's broker turns them off for itself, as Redis does).
pub fn machine_thp(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    let off = THP_OFF_AT_START.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: between fork and exec the closure makes one system call (prctl) and
    // neither allocates nor takes a lock.
    unsafe {
        command.pre_exec(move || {
            let _ = rustix::thread::disable_transparent_huge_pages(off);
            Ok(())
        })
    }
}

impl Peers {
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("peers.sh")
    }

    /// Installs (if missing) and starts nats-server and redis-server, data in `dir`.
    pub fn start(dir: &Path) -> Result<Peers> {
        std::fs::create_dir_all(dir)?;
        let output = machine_thp(&mut Command::new("bash"))
            .arg(Self::script())
            .arg("start")
            .arg(dir)
            .output()
            .context("running benches/peers.sh")?;
        if !output.status.success() {
            bail!(
                "benches/peers.sh start failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let env: HashMap<String, String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |key: &str| {
            env.get(key)
                .cloned()
                .with_context(|| format!("peers.sh printed no {key}"))
        };
        Ok(Peers {
            dir: dir.to_owned(),
            nats_url: get("NATS_URL")?,
            redis_url: get("REDIS_URL")?,
            nats_pid: get("NATS_PID")?.parse()?,
            redis_pid: get("REDIS_PID")?.parse()?,
        })
    }

    pub fn stop(&self) -> Result<()> {
        Self::stop_dir(&self.dir)
    }

    /// Stops the peers whose PID files are in `dir`.
    pub fn stop_dir(dir: &Path) -> Result<()> {
        let status = Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .arg(dir)
            .status()?;
        if !status.success() {
            bail!("benches/peers.sh stop failed");
        }
        Ok(())
    }

    /// Stops and starts both peers on fresh data (for memory measurements).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let _ = std::fs::remove_dir_all(self.dir.join("nats"));
        let _ = std::fs::remove_dir_all(self.dir.join("redis"));
        *self = Peers::start(&self.dir)?;
        Ok(())
    }
}

/// One peer run on its own through `benches/peers.sh serve` (the restart
/// scenario): its data stays in `dir` across restarts, and it is stopped by signal.
#[derive(Debug)]
pub struct PeerServer {
    child: std::process::Child,
    /// `nats` or `redis`.
    name: &'static str,
    dir: PathBuf,
    port: u16,
}

impl PeerServer {
    /// Starts `name` (`nats` or `redis`) on a free loopback port, data in `dir`.
    pub fn spawn(name: &'static str, dir: &Path) -> Result<PeerServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::spawn_on(name, dir, port)
    }

    fn spawn_on(name: &'static str, dir: &Path, port: u16) -> Result<PeerServer> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))?;
        let child = machine_thp(&mut Command::new("bash"))
            .arg(Peers::script())
            .args(["serve", name])
            .arg(dir)
            .arg(port.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} through benches/peers.sh serve"))?;
        Ok(PeerServer {
            child,
            name,
            dir: dir.to_owned(),
            port,
        })
    }

    pub fn url(&self) -> String {
        match self.name {
            "nats" => format!("nats://127.0.0.1:{}", self.port),
            _ => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// Stops the server (a clean exit, or SIGKILL) and starts it again on the same
    /// port and data. A clean stop is SIGTERM for Redis and SIGINT for NATS (both
    /// shut down gracefully on either, but nats-server exits with status 1 on
    /// SIGTERM).
    pub fn restart(mut self, kill: bool) -> Result<PeerServer> {
        let signal = match (kill, self.name) {
            (true, _) => "-KILL",
            (false, "nats") => "-INT",
            (false, _) => "-TERM",
        };
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !kill && !status.success() {
            bail!("{} exited with {status} after {signal}", self.name);
        }
        Self::spawn_on(self.name, &self.dir, self.port)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where every system runs.
#[derive(Debug)]
pub struct Systems {
    pub switchyard: Option<switchyard::Server>,
    pub peers: Option<Peers>,
    /// The `switchyard` binary and the filters it serves.
    pub switchyard_binary: PathBuf,
    pub filters_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Bytes that must be free in `work_dir` before each measurement.
    pub min_free: u64,
}

impl Systems {
    /// The PID of the server process behind `kind`.
    pub fn pid(&self, kind: Kind) -> Option<u32> {
        match kind {
            Kind::Switchyard | Kind::SwitchyardDurable => self.switchyard.as_ref().map(|s| s.pid()),
            Kind::Nats | Kind::JetStream => self.peers.as_ref().map(|p| p.nats_pid),
            Kind::RedisPubSub | Kind::RedisStreams => self.peers.as_ref().map(|p| p.redis_pid),
        }
    }

    pub fn switchyard_address(&self) -> Result<&str> {
        Ok(&self
            .switchyard
            .as_ref()
            .context("switchyard is not running")?
            .address)
    }

    fn peers(&self) -> Result<&Peers> {
        self.peers.as_ref().context("the peers are not running")
    }

    /// Starts a fresh Switchyard broker (a new, empty data directory).
    pub fn fresh_switchyard(&mut self) -> Result<()> {
        self.switchyard = None;
        let dir = self.work_dir.join("switchyard");
        let _ = std::fs::remove_dir_all(&dir);
        check_free_space(&self.work_dir, self.min_free)?;
        let (server, _) =
            switchyard::Server::start(&self.switchyard_binary, &dir, &self.filters_dir)?;
        self.switchyard = Some(server);
        Ok(())
    }

    /// Gets `kind` ready for a new scenario (JetStream: an empty stream).
    /// Readies a measurement of `kind`: the page cache's dirty data is written out
    /// first (`sync`), so that no system pays for the writeback of the one measured
    /// before it. A Switchyard run leaves gigabytes of it (3 s at 2M records/s), and
    /// the next run's syncs (Switchyard's durable acknowledgements, JetStream's)
    /// would otherwise wait behind it.
    pub async fn prepare(&self, kind: Kind) -> Result<()> {
        check_free_space(&self.work_dir, self.min_free)?;
        let synced =
            tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await??;
        if !synced.success() {
            anyhow::bail!("sync failed: {synced}");
        }
        if kind == Kind::JetStream {
            nats::reset_stream(&self.peers()?.nats_url).await?;
        }
        Ok(())
    }

    pub async fn publisher(&self, kind: Kind) -> Result<Publisher> {
        Ok(match kind {
            Kind::Switchyard | Kind::SwitchyardDurable => Publisher::Switchyard(
                switchyard::Publisher::connect(
                    self.switchyard_address()?,
                    kind == Kind::SwitchyardDurable,
                )
                .await?,
            ),
            Kind::Nats => {
                Publisher::Nats(nats::CorePublisher::connect(&self.peers()?.nats_url).await?)
            }
            Kind::JetStream => Publisher::JetStream(
                nats::JetStreamPublisher::connect(&self.peers()?.nats_url).await?,
            ),
            Kind::RedisPubSub | Kind::RedisStreams => Publisher::Redis(
                redis::Publisher::connect(&self.peers()?.redis_url, kind == Kind::RedisStreams)
                    .await?,
            ),
        })
    }

    /// A consumer of new records on `topics` (system-specific names), subscribed
    /// when this returns. JetStream and Redis Streams take one topic per consumer.
    pub async fn consumer(&self, kind: Kind, topics: &[String]) -> Result<Consumer> {
        Ok(match kind {
            Kind::Switchyard | Kind::SwitchyardDurable => Consumer::Switchyard(
                switchyard::Consumer::subscribe(
                    self.switchyard_address()?,
                    topics,
                    switchyard_client::Start::Latest,
                    None,
                )
                .await?,
            ),
            Kind::Nats => Consumer::Nats(
                nats::CoreConsumer::subscribe(&self.peers()?.nats_url, topics).await?,
            ),
            Kind::JetStream => {
                let [topic] = topics else {
                    bail!("a JetStream consumer here reads one subject");
                };
                Consumer::JetStream(Box::new(
                    nats::JetStreamConsumer::subscribe(&self.peers()?.nats_url, topic).await?,
                ))
            }
            Kind::RedisPubSub => Consumer::RedisPubSub(
                redis::PubSubConsumer::subscribe(&self.peers()?.redis_url, topics).await?,
            ),
            Kind::RedisStreams => {
                let [topic] = topics else {
                    bail!("a Redis Streams consumer here reads one key");
                };
                Consumer::RedisStreams(
                    redis::StreamConsumer::subscribe(&self.peers()?.redis_url, topic).await?,
                )
            }
        })
    }

    /// A Switchyard consumer of `topics` whose subscriptions use delivery filter
    /// `filter` with the contexts `context(i)`.
    pub async fn filtered_consumer(
        &self,
        topics: &[String],
        filter: &str,
        context: &dyn Fn(usize) -> HashMap<String, String>,
    ) -> Result<Consumer> {
        Ok(Consumer::Switchyard(
            switchyard::Consumer::subscribe(
                self.switchyard_address()?,
                topics,
                switchyard_client::Start::Latest,
                Some((filter, context)),
            )
            .await?,
        ))
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    let stat = rustix::fs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Fails, naming the directory and both figures, when less than `needed` bytes
/// are free where the servers keep their data: a full disk would refuse writes
/// mid-measurement (or stall a peer) instead of measuring anything.
pub fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    let free = free_space(dir)?;
    if free < needed {
        bail!(
            "{} has {:.1} GiB free; this needs {:.1} GiB (free space, or pass --work-dir \
             on a larger file system)",
            dir.display(),
            free as f64 / (1u64 << 30) as f64,
            needed as f64 / (1u64 << 30) as f64,
        );
    }
    Ok(())
}

#[derive(Debug)]
pub enum Publisher {
    Switchyard(switchyard::Publisher),
    Nats(nats::CorePublisher),
    JetStream(nats::JetStreamPublisher),
    Redis(redis::Publisher),
}

impl Publisher {
    /// Sends `payloads` to `topic`; acknowledgements are awaited by later calls
    /// (bounded in flight) and by [`Publisher::flush`].
    pub async fn publish(&mut self, topic: &str, payloads: Vec<Bytes>) -> Result<()> {
        match self {
            Publisher::Switchyard(p) => p.publish(topic, payloads).await,
            Publisher::Nats(p) => p.publish(topic, payloads).await,
            Publisher::JetStream(p) => p.publish(topic, payloads).await,
            Publisher::Redis(p) => p.publish(topic, payloads).await,
        }
    }

    /// Sends `count` records of the same `payload` to `topic`: the load of the
    /// throughput and fan-out scenarios. No vector of payload clones; each
    /// publisher does per message what its client needs for a new message (a
    /// payload clone; for Switchyard, a `Record` per message, built per batch).
    pub async fn publish_copies(
        &mut self,
        topic: &str,
        payload: &Bytes,
        count: usize,
    ) -> Result<()> {
        match self {
            Publisher::Switchyard(p) => p.publish_copies(topic, payload, count).await,
            Publisher::Nats(p) => p.publish_copies(topic, payload, count).await,
            Publisher::JetStream(p) => p.publish_copies(topic, payload, count).await,
            Publisher::Redis(p) => p.publish_copies(topic, payload, count).await,
        }
    }

    /// Sends one payload to each of many topics (system-specific names).
    pub async fn publish_many(&mut self, records: Vec<(String, Bytes)>) -> Result<()> {
        match self {
            Publisher::Switchyard(p) => {
                let records: Vec<_> = records
                    .into_iter()
                    .map(|(topic, payload)| switchyard_client::Record::new(topic, payload))
                    .collect();
                p.publish_records(&records).await
            }
            Publisher::Nats(p) => {
                for (subject, payload) in records {
                    p.publish(&subject, vec![payload]).await?;
                }
                Ok(())
            }
            Publisher::JetStream(p) => {
                for (subject, payload) in records {
                    p.publish(&subject, vec![payload]).await?;
                }
                Ok(())
            }
            Publisher::Redis(p) => p.publish_many(records).await,
        }
    }

    /// Waits until everything published is acknowledged (NATS core: flushed).
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            Publisher::Switchyard(p) => p.flush().await,
            Publisher::Nats(p) => p.flush().await,
            Publisher::JetStream(p) => p.flush().await,
            Publisher::Redis(p) => p.flush().await,
        }
    }
}

#[derive(Debug)]
pub enum Consumer {
    Switchyard(switchyard::Consumer),
    Nats(nats::CoreConsumer),
    JetStream(Box<nats::JetStreamConsumer>),
    RedisPubSub(redis::PubSubConsumer),
    RedisStreams(redis::StreamConsumer),
}

/// Most messages a consumer hands out per [`Consumer::next_batch`] call when its
/// client gives them one by one. Every consumer hands out what has already arrived
/// in one call, so that the harness's per-call work (a timer, a clock read) is not
/// counted per record for one system and per batch for another.
pub const MAX_READY: usize = 1000;

/// For clients that give messages one by one: waits for the next message of
/// `messages`, then takes the ones already there, up to [`MAX_READY`], handing each
/// to `each`; false once the stream has ended.
pub async fn take_ready<S: futures_util::Stream + Unpin>(
    messages: &mut S,
    mut each: impl FnMut(S::Item) -> Result<()>,
) -> Result<bool> {
    use futures_util::{FutureExt, StreamExt};
    let Some(first) = messages.next().await else {
        return Ok(false);
    };
    each(first)?;
    for _ in 1..MAX_READY {
        match messages.next().now_or_never() {
            Some(Some(message)) => each(message)?,
            Some(None) => return Ok(false),
            None => break,
        }
    }
    Ok(true)
}

impl Consumer {
    /// Waits for the next deliveries and hands each payload that has arrived to `f`
    /// with the number of subscriptions it is for; false once the consumer's stream
    /// is gone.
    pub async fn next_batch(&mut self, f: &mut (dyn FnMut(&[u8], usize) + Send)) -> Result<bool> {
        match self {
            Consumer::Switchyard(c) => c.next_batch(f).await,
            Consumer::Nats(c) => c.next_batch(f).await,
            Consumer::JetStream(c) => c.next_batch(f).await,
            Consumer::RedisPubSub(c) => c.next_batch(f).await,
            Consumer::RedisStreams(c) => c.next_batch(f).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `THP_enabled` line of a shell started by `command`.
    fn thp_line(command: &mut Command) -> String {
        let output = command
            .args(["-c", "grep THP_enabled /proc/self/status"])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn servers_get_the_machines_transparent_huge_page_setting_back() {
        let machine = thp_line(&mut Command::new("sh"));
        if machine.trim_end() != "THP_enabled:\t1" {
            eprintln!("skipped: transparent huge pages are not on here ({machine:?})");
            return;
        }
        remember_thp();
        rustix::thread::disable_transparent_huge_pages(true).unwrap();
        let inherited = thp_line(&mut Command::new("sh"));
        let restored = thp_line(machine_thp(&mut Command::new("sh")));
        rustix::thread::disable_transparent_huge_pages(false).unwrap();
        assert!(inherited.trim_end().ends_with('0'), "{inherited:?}");
        assert_eq!(restored, machine);
    }

    #[test]
    fn too_little_free_space_is_refused_with_the_directory_and_both_figures() {
        let dir = tempfile::tempdir().unwrap();
        check_free_space(dir.path(), 0).unwrap();
        let error = check_free_space(dir.path(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&dir.path().display().to_string()), "{error}");
        assert!(error.contains("GiB free; this needs"), "{error}");
        let missing = dir.path().join("missing");
        let error = check_free_space(&missing, 0).unwrap_err().to_string();
        assert!(error.contains("reading the free space of"), "{error}");
    }
}
