//! The store: a data directory of shards, each behind its own lock and with its own
//! threads, behind one cloneable handle.
//!
//! ```no_run
//! use switchyard_broker::storage::{Ack, NewRecord, ReadLimits, Store, StoreConfig};
//!
//! let store = Store::open(StoreConfig::new("data"))?;
//! let appended = store.append(
//!     vec![NewRecord::new("guild.1", &b"{\"op\":0}"[..]).with_header("type", "MESSAGE_CREATE")],
//!     Ack::Durable,
//! )?;
//! let batch = store.read("guild.1", appended[0].offset, ReadLimits::default())?;
//! assert_eq!(batch.records.len(), 1);
//! store.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use crate::storage::config::StoreConfig;
use crate::storage::error::{AppendError, IoError, OpenError, ReadError};
use crate::storage::log::DiskBudget;
use crate::storage::manifest::{
    CLEAN_FILE, DirLock, MANIFEST_FILE, Manifest, STATE_FILE, State, read_optional, shard_dir,
    write_atomic,
};
use crate::storage::observer::AppendObserver;
use crate::storage::record::NewRecord;
use crate::storage::recovery::RecoveryReport;
use crate::storage::segment::sync_dir;
use crate::storage::shard::{
    Appended, ReadBatch, ReadLimits, Shard, ShardOptions, TopicInfo, check_batch,
};
use crate::storage::stats::{ShardStats, StatsSnapshot};
use crate::storage::topic::shard_for_topic;
use crate::storage::worker::{self, Answer, Command, ShardCell};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// Once the records are in the log (page cache): readable by subscribers, lost if
    /// the machine (not only the process) stops before the next sync.
    #[default]
    Written,
    /// Once the sync covering the records has completed.
    Durable,
}

#[derive(Debug)]
struct Inner {
    config: StoreConfig,
    shard_count: u32,
    /// Appends go straight to a shard's cell, under its lock.
    cells: Vec<Arc<ShardCell>>,
    /// The other operations go to a shard's thread.
    senders: Vec<Sender<Command>>,
    stats: Vec<Arc<ShardStats>>,
    reports: Vec<RecoveryReport>,
    budget: Arc<DiskBudget>,
    /// Worker threads; taken by the first close.
    threads: Mutex<Option<Vec<JoinHandle<()>>>>,
    generation: u64,
    /// Held while open: a second process must not write the same files. Released by
    /// close.
    lock: Mutex<Option<DirLock>>,
    /// Told of every append (under its shard's lock), once set.
    observer: Arc<OnceLock<Arc<dyn AppendObserver>>>,
}

/// An open data directory. Cheap to clone; every clone talks to the same shards.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads or creates the manifest.
fn load_manifest(config: &StoreConfig) -> Result<Manifest, OpenError> {
    let path = config.data_dir.join(MANIFEST_FILE);
    if let Some(bytes) = read_optional(&path)? {
        let manifest = Manifest::decode(&path, &bytes)?;
        if manifest.shard_count != config.shard_count {
            tracing::warn!(
                configured = config.shard_count,
                existing = manifest.shard_count,
                "the data directory's shard count is fixed; using the existing one"
            );
        }
        return Ok(manifest);
    }
    let manifest = Manifest {
        shard_count: config.shard_count,
        created_ms: now_ms(),
    };
    write_atomic(&config.data_dir, MANIFEST_FILE, &manifest.encode())?;
    Ok(manifest)
}

impl Store {
    /// Opens (creating if needed) the data directory, recovers every shard and starts
    /// its threads.
    pub fn open(config: StoreConfig) -> Result<Store, OpenError> {
        config.validate()?;
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| IoError::new("creating data directory", &dir, e))?;
        let lock = DirLock::acquire(&dir)?;
        let fresh = read_optional(&dir.join(MANIFEST_FILE))?.is_none();
        let manifest = load_manifest(&config)?;
        let state_path = dir.join(STATE_FILE);
        let state = match read_optional(&state_path)? {
            Some(bytes) => State::decode(&state_path, &bytes)?,
            None => State::default(),
        };
        let clean = fresh || dir.join(CLEAN_FILE).exists();
        // Forget the clean mark before recovery repairs anything: if this open fails
        // or crashes half-way, the next one must still treat the stop as unclean.
        match std::fs::remove_file(dir.join(CLEAN_FILE)) {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("removing", dir.join(CLEAN_FILE), e).into()),
        }
        let generation = state.generation + 1;
        let budget = Arc::new(DiskBudget::new(config.disk_budget_bytes));
        let opened = Self::recover_shards(
            &config,
            &manifest,
            generation,
            state.epoch_floor,
            clean,
            &budget,
        )?;
        let damaged = opened.iter().any(|(_, report, _)| report.found_damage());
        // Epochs made before an unclean stop may be missing records: retire them.
        let epoch_floor = if !clean || damaged {
            generation << 32
        } else {
            state.epoch_floor
        };
        write_atomic(
            &dir,
            STATE_FILE,
            &State {
                generation,
                epoch_floor,
            }
            .encode(),
        )?;
        let observer: Arc<OnceLock<Arc<dyn AppendObserver>>> = Arc::new(OnceLock::new());
        let mut cells = Vec::new();
        let mut senders = Vec::new();
        let mut stats = Vec::new();
        let mut reports = Vec::new();
        let mut threads = Vec::new();
        for (mut shard, report, shard_stats) in opened {
            shard.set_epoch_floor(epoch_floor);
            let (cell, sender, thread) = worker::spawn(
                shard,
                config.fsync,
                observer.clone(),
                config.shard_queue_depth,
            )
            .map_err(|e| IoError::new("starting shard thread for", &dir, e))?;
            cells.push(cell);
            senders.push(sender);
            stats.push(shard_stats);
            reports.push(report);
            threads.push(thread);
        }
        let total: u64 = reports.iter().map(|r| r.records).sum();
        tracing::info!(
            data_dir = %dir.display(),
            shards = manifest.shard_count,
            generation,
            clean,
            records = total,
            "store open"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                config,
                shard_count: manifest.shard_count,
                cells,
                senders,
                stats,
                reports,
                budget,
                threads: Mutex::new(Some(threads)),
                generation,
                lock: Mutex::new(Some(lock)),
                observer,
            }),
        })
    }

    /// Recovers all shards, several at a time.
    fn recover_shards(
        config: &StoreConfig,
        manifest: &Manifest,
        generation: u64,
        epoch_floor: u64,
        clean: bool,
        budget: &Arc<DiskBudget>,
    ) -> Result<Vec<(Shard, RecoveryReport, Arc<ShardStats>)>, OpenError> {
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let ids: Vec<u32> = (0..manifest.shard_count).collect();
        let mut opened = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(parallel) {
            let results: Vec<_> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&id| {
                        scope.spawn(move || {
                            let options = ShardOptions {
                                generation,
                                epoch_floor,
                                clean,
                                ..ShardOptions::from_config(config, id)
                            };
                            let stats = Arc::new(ShardStats::default());
                            Shard::open(
                                &shard_dir(&config.data_dir, id),
                                options,
                                budget.clone(),
                                stats.clone(),
                            )
                            .map(|(shard, report)| (shard, report, stats))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("shard recovery panicked"))
                    .collect()
            });
            for result in results {
                opened.push(result?);
            }
        }
        Ok(opened)
    }

    /// Installs the observer every append is told to (see
    /// [`AppendObserver`]). It can be set once; a second call returns it back.
    pub fn set_append_observer(
        &self,
        observer: Arc<dyn AppendObserver>,
    ) -> Result<(), Arc<dyn AppendObserver>> {
        self.inner.observer.set(observer)
    }

    /// Number of shards (fixed when the data directory was created).
    pub fn shard_count(&self) -> u32 {
        self.inner.shard_count
    }

    /// Generation of this opening of the store.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }

    /// The shard that holds `topic`.
    pub fn shard_of(&self, topic: &str) -> u32 {
        shard_for_topic(topic, self.inner.shard_count)
    }

    /// What recovery found in each shard at open.
    pub fn recovery_reports(&self) -> &[RecoveryReport] {
        &self.inner.reports
    }

    /// Counters summed over the shards.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner
            .stats
            .iter()
            .map(|s| s.snapshot())
            .fold(StatsSnapshot::default(), |a, b| a + b)
    }

    /// Bytes of segment files reserved on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.budget.used()
    }

    /// Checks a batch and splits it by shard: `(shard, indexes in the batch, records)`.
    fn partition(&self, records: Vec<NewRecord>) -> Result<Vec<ShardPart>, AppendError> {
        let config = &self.inner.config;
        check_batch(
            &records,
            config.max_record_bytes,
            config.max_batch_bytes,
            config.max_batch_records,
        )?;
        let count = records.len();
        let first_shard = self.shard_of(&records[0].topic);
        // A name equal to the record before's is not hashed again.
        if records.windows(2).all(|pair| {
            pair[1].topic == pair[0].topic || self.shard_of(&pair[1].topic) == first_shard
        }) {
            return Ok(vec![(first_shard, (0..count).collect(), records)]);
        }
        let mut by_shard: Vec<Option<(Vec<usize>, Vec<NewRecord>)>> =
            vec![None; self.inner.shard_count as usize];
        for (index, record) in records.into_iter().enumerate() {
            let shard = self.shard_of(&record.topic) as usize;
            let (indexes, part) = by_shard[shard].get_or_insert_with(Default::default);
            indexes.push(index);
            part.push(record);
        }
        Ok(by_shard
            .into_iter()
            .enumerate()
            .filter_map(|(shard, part)| {
                part.map(|(indexes, records)| (shard as u32, indexes, records))
            })
            .collect())
    }

    /// Appends `records` to their shards and returns a handle to wait on for the
    /// acknowledgement.
    ///
    /// A batch whose records all live in one shard is written contiguously and
    /// becomes durable as one. A batch spanning shards is checked whole first (a bad
    /// record refuses all of it); each shard's part is then atomic, but a disk error in
    /// one shard does not undo the others. The append runs on the calling thread,
    /// under the shard's lock (a copy into the mapped segment: microseconds); it
    /// waits while the shard's thread runs an operation (a read) on the shard.
    pub fn submit(&self, records: Vec<NewRecord>, ack: Ack) -> Result<PendingAppend, AppendError> {
        let count = records.len();
        let mut waits = Vec::new();
        for (shard, indexes, records) in self.partition(records)? {
            match self.inner.cells[shard as usize].append(records, ack) {
                Answer::Now(Err(AppendError::Closed)) => return Err(AppendError::Closed),
                answer => waits.push((indexes, answer)),
            }
        }
        Ok(PendingAppend { count, waits })
    }

    /// [`Store::submit`] for async code (the same call: appending does not wait for
    /// a sync).
    pub async fn submit_async(
        &self,
        records: Vec<NewRecord>,
        ack: Ack,
    ) -> Result<PendingAppend, AppendError> {
        self.submit(records, ack)
    }

    /// [`Store::append`] for async code.
    pub async fn append_async(
        &self,
        records: Vec<NewRecord>,
        ack: Ack,
    ) -> Result<Vec<Appended>, AppendError> {
        self.submit_async(records, ack).await?.wait_async().await
    }

    /// Appends `records` and waits for the acknowledgement `ack` asks for. Returns each
    /// record's offset and epoch, in the order given. See [`Store::submit`].
    pub fn append(&self, records: Vec<NewRecord>, ack: Ack) -> Result<Vec<Appended>, AppendError> {
        self.submit(records, ack)?.wait()
    }

    /// A command that runs `operation` on a shard's thread, and where its result comes.
    fn command<T: Send + 'static>(
        operation: impl FnOnce(&mut Shard) -> T + Send + 'static,
    ) -> (Command, oneshot::Receiver<T>) {
        let (reply, receiver) = oneshot::channel();
        let command = Command::Run(Box::new(move |shard: &mut Shard| {
            let _ = reply.send(operation(shard));
        }));
        (command, receiver)
    }

    /// Runs `operation` on the thread of the shard holding `topic` and waits for it.
    fn call<T: Send + 'static>(
        &self,
        topic: &str,
        operation: impl FnOnce(&mut Shard) -> T + Send + 'static,
    ) -> Result<T, ReadError> {
        let (command, receiver) = Self::command(operation);
        self.inner.senders[self.shard_of(topic) as usize]
            .send(command)
            .map_err(|_| ReadError::Closed)?;
        receiver.blocking_recv().map_err(|_| ReadError::Closed)
    }

    /// Runs `operation` on the thread of the shard holding `topic`, for async code.
    pub async fn on_shard_of<T: Send + 'static>(
        &self,
        topic: &str,
        operation: impl FnOnce(&mut Shard) -> T + Send + 'static,
    ) -> Result<T, ReadError> {
        let (command, receiver) = Self::command(operation);
        send_async(&self.inner.senders[self.shard_of(topic) as usize], command)
            .await
            .map_err(|()| ReadError::Closed)?;
        receiver.await.map_err(|_| ReadError::Closed)
    }

    /// [`Store::read`] for async code.
    pub async fn read_async(
        &self,
        topic: &str,
        from: u64,
        limits: ReadLimits,
    ) -> Result<ReadBatch, ReadError> {
        let name = topic.to_owned();
        self.on_shard_of(topic, move |shard| shard.read(&name, from, limits))
            .await?
    }

    /// [`Store::topic_info`] for async code.
    pub async fn topic_info_async(&self, topic: &str) -> Result<Option<TopicInfo>, ReadError> {
        let name = topic.to_owned();
        self.on_shard_of(topic, move |shard| shard.topic_info(&name))
            .await?
    }

    /// Reads `topic` forward from offset `from`.
    pub fn read(&self, topic: &str, from: u64, limits: ReadLimits) -> Result<ReadBatch, ReadError> {
        let name = topic.to_owned();
        self.call(topic, move |shard| shard.read(&name, from, limits))?
    }

    /// The newest `count` retained records of `topic`.
    pub fn read_latest(
        &self,
        topic: &str,
        count: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, ReadError> {
        let name = topic.to_owned();
        self.call(topic, move |shard| {
            shard.read_latest(&name, count, max_bytes)
        })?
    }

    /// Offsets, epoch and retained range of `topic`; `None` when it holds nothing.
    pub fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, ReadError> {
        let name = topic.to_owned();
        self.call(topic, move |shard| shard.topic_info(&name))?
    }

    /// Checks that a reader can resume `topic` exactly at `offset`, where `epoch` is
    /// the epoch of the last record it saw (`offset - 1`). Fails with
    /// [`ReadError::HistoryLost`] when that record is gone or was replaced.
    pub fn validate_position(&self, topic: &str, offset: u64, epoch: u64) -> Result<(), ReadError> {
        let name = topic.to_owned();
        self.call(topic, move |shard| {
            shard.validate_position(&name, offset, epoch)
        })?
    }

    /// Runs `operation` on every shard's thread, in shard order.
    pub fn for_each_shard<T: Send + 'static>(
        &self,
        operation: impl Fn(&mut Shard) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, ReadError> {
        let operation = Arc::new(operation);
        let mut receivers = Vec::new();
        for sender in &self.inner.senders {
            let (reply, receiver) = oneshot::channel();
            let operation = operation.clone();
            sender
                .send(Command::Run(Box::new(move |shard: &mut Shard| {
                    let _ = reply.send(operation(shard));
                })))
                .map_err(|_| ReadError::Closed)?;
            receivers.push(receiver);
        }
        receivers
            .into_iter()
            .map(|r| r.blocking_recv().map_err(|_| ReadError::Closed))
            .collect()
    }

    /// Topics held, over all shards.
    pub fn topic_count(&self) -> Result<u64, ReadError> {
        Ok(self
            .for_each_shard(|s| s.topic_count() as u64)?
            .into_iter()
            .sum())
    }

    /// Heap bytes of the topic registries, over all shards.
    pub fn registry_memory_bytes(&self) -> Result<u64, ReadError> {
        Ok(self
            .for_each_shard(|s| s.registry_memory_bytes() as u64)?
            .into_iter()
            .sum())
    }

    /// Applies retention now in every shard (it also runs every second); returns the
    /// number of segments dropped.
    pub fn enforce_retention(&self) -> Result<usize, ReadError> {
        let now = now_ms();
        Ok(self
            .for_each_shard(move |s| match s.enforce_retention(now) {
                Ok(dropped) => dropped,
                Err(error) => {
                    tracing::error!(shard = s.id(), %error, "retention failed");
                    0
                }
            })?
            .into_iter()
            .sum())
    }

    /// Syncs every shard, stops their threads and marks the directory as cleanly
    /// closed. Later calls on any clone fail with `Closed`. Idempotent. Dropping the
    /// last clone closes the store too.
    pub fn close(&self) -> Result<(), IoError> {
        self.inner.shutdown()
    }
}

impl Inner {
    fn shutdown(&self) -> Result<(), IoError> {
        let Some(threads) = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let mut receivers = Vec::new();
        for (id, sender) in self.senders.iter().enumerate() {
            let (reply, receiver) = crossbeam_channel::bounded(1);
            // A shard whose thread is gone (a panic) was not closed: no answer.
            let _ = sender.send(Command::Stop { reply });
            receivers.push((id as u32, receiver));
        }
        let mut result = Ok(());
        for (id, receiver) in receivers {
            let closed = receiver.recv().unwrap_or_else(|_| {
                Err(IoError::new(
                    "closing shard",
                    shard_dir(&self.config.data_dir, id),
                    std::io::Error::other("the shard stopped without closing (a panic)"),
                ))
            });
            if let Err(error) = closed
                && result.is_ok()
            {
                result = Err(error);
            }
        }
        for thread in threads {
            let _ = thread.join();
        }
        // Only a store whose every shard synced is marked clean.
        let dir = &self.config.data_dir;
        let result =
            result.and_then(|()| write_atomic(dir, CLEAN_FILE, &self.generation.to_le_bytes()));
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        if result.is_ok() {
            tracing::info!(data_dir = %dir.display(), "store closed cleanly");
        }
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "closing the store on drop failed");
        }
    }
}

/// One shard's part of a batch: the shard, the records' indexes in the batch, the
/// records.
type ShardPart = (u32, Vec<usize>, Vec<NewRecord>);

/// Sends a command without blocking an async runtime's thread: when the queue is
/// full, the send waits on the blocking pool (that is the back-pressure).
async fn send_async(sender: &Sender<Command>, command: Command) -> Result<(), ()> {
    match sender.try_send(command) {
        Ok(()) => Ok(()),
        Err(TrySendError::Disconnected(_)) => Err(()),
        Err(TrySendError::Full(command)) => {
            let sender = sender.clone();
            tokio::task::spawn_blocking(move || sender.send(command).map_err(|_| ()))
                .await
                .map_err(|_| ())?
        }
    }
}

/// An append handed to the shards; wait for its acknowledgement.
#[derive(Debug)]
pub struct PendingAppend {
    count: usize,
    /// Per shard: the indexes of its records in the batch, and its answer.
    waits: Vec<(Vec<usize>, Answer)>,
}

impl PendingAppend {
    fn assemble(count: usize, parts: Vec<(Vec<usize>, Vec<Appended>)>) -> Vec<Appended> {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part").1;
        }
        let mut out = vec![
            Appended {
                offset: 0,
                epoch: 0
            };
            count
        ];
        for (indexes, appended) in parts {
            for (index, appended) in indexes.into_iter().zip(appended) {
                out[index] = appended;
            }
        }
        out
    }

    /// Blocks until every shard has acknowledged. Not for async contexts: use
    /// [`PendingAppend::wait_async`] there.
    pub fn wait(self) -> Result<Vec<Appended>, AppendError> {
        let mut parts = Vec::with_capacity(self.waits.len());
        for (indexes, answer) in self.waits {
            let result = match answer {
                Answer::Now(result) => result,
                Answer::Later(receiver) => {
                    receiver.blocking_recv().map_err(|_| AppendError::Closed)?
                }
            };
            parts.push((indexes, result?));
        }
        Ok(Self::assemble(self.count, parts))
    }

    /// Waits asynchronously until every shard has acknowledged.
    pub async fn wait_async(self) -> Result<Vec<Appended>, AppendError> {
        let mut parts = Vec::with_capacity(self.waits.len());
        for (indexes, answer) in self.waits {
            let result = match answer {
                Answer::Now(result) => result,
                Answer::Later(receiver) => receiver.await.map_err(|_| AppendError::Closed)?,
            };
            parts.push((indexes, result?));
        }
        Ok(Self::assemble(self.count, parts))
    }
}
