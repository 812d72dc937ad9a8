//! A shard's threads and group commit. Appends run on the caller's thread under the
//! shard's lock ([`ShardCell::append`]); the shard's own thread takes the other
//! commands from a bounded queue and keeps the sync timer; appends that arrive
//! together share one sync, which runs on the shard's sync thread while the next
//! appends go on.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use tokio::sync::oneshot;

use crate::storage::config::FsyncPolicy;
use crate::storage::error::{AppendError, IoError};
use crate::storage::log::{Deletion, Roll, SpareJob, SyncJob};
use crate::storage::observer::AppendObserver;
use crate::storage::record::NewRecord;
use crate::storage::segment::{CacheRelease, Spare};
use crate::storage::shard::{Appended, Shard};
use crate::storage::store::Ack;

/// Most commands handled in one turn of the shard's thread.
const MAX_GROUP: usize = 256;
/// How often retention is checked.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

type AppendReply = oneshot::Sender<Result<Vec<Appended>, AppendError>>;

/// Work for a shard's thread.
pub(crate) enum Command {
    /// An operation (a read, a subscription's start, a count), run on the shard's
    /// thread with exclusive access (appends wait for it).
    Run(Box<dyn FnOnce(&mut Shard) + Send>),
    /// Sync and stop. (A plain channel: closing must work from any thread, async
    /// runtimes included.)
    Stop {
        reply: crossbeam_channel::Sender<Result<(), IoError>>,
    },
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An append waiting for the sync that covers it, with its result.
type Waiter = (AppendReply, Result<Vec<Appended>, AppendError>);

/// A sync that ended: the job, its result and how long it took.
type Finished = (SyncJob, Result<(), IoError>, Duration);

/// Work for the sync thread, run in the order sent.
enum Work {
    Sync(SyncJob),
    Roll(Roll),
    Spare(SpareJob),
}

/// What the sync thread reports.
enum Done {
    Synced(Finished),
    /// A roll's work ended: the sealed segment's base, the bytes its cut gives
    /// back, and the outcome.
    Sealed(u64, u64, Result<(), IoError>),
    Spare(Result<Spare, IoError>),
}

/// How much of a page-cache release the sync thread does before it looks for a
/// sync to run first.
const RELEASE_PIECE: u64 = 1 << 20;
/// How much of a deleted segment's file the sync thread frees (cuts off) before it
/// looks for a sync to run first.
const DELETE_PIECE: u64 = 4 << 20;

/// The shard's sync thread: it runs one sync at a time while appends (and their
/// live deliveries) go on, so that no append — and no
/// live delivery — waits behind an `fdatasync`, which takes 1–13 ms on the
/// benchmark machine's disk. Appends that need a sync wait for the first one that
/// starts after them; the next sync starts when the running one ends.
///
/// The sync thread also does the disk work of segment rolls ([`Roll`]: sealing
/// the old segment and syncing the directory, in order with the syncs), makes the
/// spare file the next roll starts from, drops released pages from the page
/// cache ([`CacheRelease`]; `posix_fadvise` took 0.3–14 ms per 4 MiB step on the
/// shard's thread), in pieces of 1 MiB, and frees the segments retention dropped
/// ([`Deletion`]), in pieces of 4 MiB. Syncs and rolls go first, then spare
/// files, then page-cache releases and deletions (a spare file or a piece that
/// has started is not interrupted).
struct Syncer {
    jobs: Option<crossbeam_channel::Sender<Work>>,
    releases: Option<crossbeam_channel::Sender<CacheRelease>>,
    deletions: Option<crossbeam_channel::Sender<Deletion>>,
    finished: Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Appends the running sync covers; `None` when no sync runs.
    running: Option<Vec<Waiter>>,
    /// Rolls handed to the sync thread and not yet reported.
    rolls_out: usize,
    /// A spare file is being made.
    spare_out: bool,
}

impl Syncer {
    fn start(shard: u32) -> Syncer {
        let (jobs, pending) = crossbeam_channel::unbounded::<Work>();
        let (releases, to_release) = crossbeam_channel::unbounded::<CacheRelease>();
        let (deletions, to_delete) = crossbeam_channel::unbounded::<Deletion>();
        let (done, finished) = crossbeam_channel::unbounded::<Done>();
        let thread = std::thread::Builder::new()
            .name(format!("sync-{shard}"))
            .spawn(move || sync_thread(&pending, &to_release, &to_delete, &done));
        match thread {
            Ok(thread) => Syncer {
                jobs: Some(jobs),
                releases: Some(releases),
                deletions: Some(deletions),
                finished,
                thread: Some(thread),
                running: None,
                rolls_out: 0,
                spare_out: false,
            },
            Err(error) => {
                // Syncs then run on the thread that finds them due (see `lost`).
                tracing::warn!(shard, %error, "no sync thread; the shard syncs without it");
                Syncer {
                    jobs: None,
                    finished: crossbeam_channel::never(),
                    releases: None,
                    deletions: None,
                    thread: None,
                    running: None,
                    rolls_out: 0,
                    spare_out: false,
                }
            }
        }
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a sync of what the shard has written, covering `waiting`; answers them
    /// at once when everything is on disk already.
    fn begin(&mut self, shard: &mut Shard, waiting: &mut Vec<Waiter>) {
        debug_assert!(!self.is_running());
        if let Some(reason) = failed(shard) {
            answer(waiting.drain(..), Err(&reason), shard.id());
            return;
        }
        let Some(job) = shard.sync_job() else {
            answer(waiting.drain(..), Ok(()), shard.id());
            self.release(shard);
            return;
        };
        let covered = std::mem::take(waiting);
        match &self.jobs {
            Some(jobs) => {
                self.running = Some(covered);
                if let Err(unsent) = jobs.send(Work::Sync(job)) {
                    // The thread is gone (it only ends when this side drops it, so
                    // it panicked): run the job here, after what was lost with it.
                    let covered = self.running.take().unwrap_or_default();
                    self.lost(shard);
                    self.running = Some(covered);
                    if let Work::Sync(job) = unsent.0 {
                        self.run_here(shard, job);
                    }
                }
            }
            None => {
                self.running = Some(covered);
                self.run_here(shard, job);
            }
        }
    }

    fn run_here(&mut self, shard: &mut Shard, job: SyncJob) {
        let started = Instant::now();
        let result = job.run();
        self.finish(shard, (job, result, started.elapsed()));
    }

    /// Hands the sync thread the work of the rolls the last appends made (or does
    /// it here when there is no sync thread), and asks for a spare file when the
    /// shard wants one. Called before any later sync begins.
    fn hand_out(&mut self, shard: &mut Shard) {
        for roll in shard.take_rolls() {
            let unsent = match &self.jobs {
                Some(jobs) => match jobs.send(Work::Roll(roll)) {
                    Ok(()) => {
                        self.rolls_out += 1;
                        continue;
                    }
                    Err(unsent) => unsent.0,
                },
                None => Work::Roll(roll),
            };
            if self.jobs.is_some() {
                self.lost(shard);
            }
            if let Work::Roll(roll) = unsent {
                let (base, freed) = (roll.base(), roll.freed());
                shard.sealed(base, freed, roll.run());
            }
        }
        if self.jobs.is_none() || shard.failure().is_some() {
            // No one to make a spare, or no roll to use it: one wanted stops counting.
            shard.discard_spare();
            return;
        }
        if self.spare_out {
            return;
        }
        if let Some(job) = shard.spare_job() {
            match self.jobs.as_ref().map(|jobs| jobs.send(Work::Spare(job))) {
                Some(Ok(())) => self.spare_out = true,
                _ => {
                    let error = IoError::new(
                        "making a spare segment in",
                        shard.dir(),
                        std::io::Error::other("the sync thread stopped"),
                    );
                    self.lost(shard);
                    shard.spare_made(Err(error));
                }
            }
        }
    }

    /// Takes in what the sync thread reported.
    fn handle(&mut self, shard: &mut Shard, done: Done) {
        match done {
            Done::Synced(finished) => self.finish(shard, finished),
            Done::Sealed(base, freed, result) => {
                self.rolls_out = self.rolls_out.saturating_sub(1);
                shard.sealed(base, freed, result);
            }
            Done::Spare(result) => {
                self.spare_out = false;
                shard.spare_made(result);
            }
        }
    }

    /// Hands the segments retention dropped to the sync thread, or deletes them
    /// here when there is none.
    fn delete(&mut self, shard: &mut Shard) {
        for deletion in shard.take_deletions() {
            send_or_run(&mut self.deletions, deletion, Deletion::run);
        }
    }

    /// Drops what has left the shard's page-cache window (if it has one) from the
    /// page cache: on the sync thread, or here when there is none.
    fn release(&mut self, shard: &mut Shard) {
        for release in shard.release_page_cache() {
            send_or_run(&mut self.releases, release, |release| release.run());
        }
    }

    /// The running sync ended: answers the appends it covered.
    fn finish(&mut self, shard: &mut Shard, (job, result, took): Finished) {
        let covered = self.running.take().unwrap_or_default();
        match (shard.sync_finished(&job, result, took), failed(shard)) {
            (Ok(()), None) => {
                answer(covered.into_iter(), Ok(()), shard.id());
                self.release(shard);
            }
            (Err(error), _) => answer(covered.into_iter(), Err(&error.to_string()), shard.id()),
            // Another sync of the file failed meanwhile (a seal's): the kernel reports
            // a write-back error to one caller only, so this one's success proves
            // nothing.
            (Ok(()), Some(reason)) => answer(covered.into_iter(), Err(&reason), shard.id()),
        }
    }

    /// Waits for the running sync, if any, and answers what it covered; and for
    /// the rolls and the spare file handed out.
    fn settle(&mut self, shard: &mut Shard) {
        while self.is_running() || self.rolls_out > 0 || self.spare_out {
            match self.finished.recv() {
                Ok(done) => self.handle(shard, done),
                Err(_) => {
                    self.lost(shard);
                    break;
                }
            }
        }
    }
}

impl Syncer {
    /// The sync thread is gone (a panic): the running sync's appends are refused,
    /// since nothing says their data is on disk, and from now on syncs, rolls and
    /// deletions run on the thread that finds them due (the shard's, or an
    /// appender's: a degraded mode, not a fast one).
    fn lost(&mut self, shard: &mut Shard) {
        tracing::error!(
            shard = shard.id(),
            "the sync thread stopped; the shard syncs without it"
        );
        self.jobs = None;
        self.releases = None;
        self.deletions = None;
        // What it reported before it stopped still counts.
        let reported: Vec<Done> = self.finished.try_iter().collect();
        for done in reported {
            self.handle(shard, done);
        }
        self.finished = crossbeam_channel::never();
        if std::mem::take(&mut self.rolls_out) > 0 {
            // A sealed segment's data may not be on disk.
            shard.fail("the sync thread stopped before sealing a segment".to_owned());
        }
        if std::mem::take(&mut self.spare_out) {
            shard.spare_made(Err(IoError::new(
                "making a spare segment in",
                shard.dir(),
                std::io::Error::other("the sync thread stopped"),
            )));
        }
        if let Some(covered) = self.running.take() {
            answer(
                covered.into_iter(),
                Err("the sync thread stopped"),
                shard.id(),
            );
        }
    }
}

/// The sync thread's loop: syncs and rolls as asked, in order, one at a time;
/// spare files when none waits; and page-cache releases and deletions in between,
/// a piece at a time so that work and spare files asked for meanwhile go first. Ends when the
/// shard's side is dropped, after the releases and deletions already sent.
fn sync_thread(
    work: &Receiver<Work>,
    releases: &Receiver<CacheRelease>,
    deletions: &Receiver<Deletion>,
    done: &crossbeam_channel::Sender<Done>,
) {
    let mut spares = Vec::new();
    let run = |item: Work, spares: &mut Vec<SpareJob>| match item {
        Work::Sync(job) => {
            let started = Instant::now();
            let result = job.run();
            done.send(Done::Synced((job, result, started.elapsed())))
                .is_ok()
        }
        Work::Roll(roll) => {
            let (base, freed) = (roll.base(), roll.freed());
            done.send(Done::Sealed(base, freed, roll.run())).is_ok()
        }
        Work::Spare(job) => {
            spares.push(job);
            true
        }
    };
    // Before each piece of a release or a deletion: the work asked for meanwhile,
    // then a spare file asked for meanwhile (a roll without one makes its own
    // file on the appending thread).
    let catch_up = |spares: &mut Vec<SpareJob>| {
        while let Ok(item) = work.try_recv() {
            if !run(item, spares) {
                return false;
            }
        }
        match spares.pop() {
            Some(job) => done
                .send(Done::Spare(Spare::create(&job.dir, job.capacity)))
                .is_ok(),
            None => true,
        }
    };
    loop {
        // Syncs and rolls first: appends may be waiting for them.
        match work.try_recv() {
            Ok(item) => {
                if !run(item, &mut spares) {
                    return;
                }
                continue;
            }
            Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if let Some(job) = spares.pop() {
            if done
                .send(Done::Spare(Spare::create(&job.dir, job.capacity)))
                .is_err()
            {
                return;
            }
            continue;
        }
        crossbeam_channel::select! {
            recv(work) -> item => match item {
                Ok(item) => {
                    if !run(item, &mut spares) {
                        return;
                    }
                }
                Err(_) => break,
            },
            recv(releases) -> release => match release {
                Ok(release) => {
                    for piece in release.pieces(RELEASE_PIECE) {
                        if !catch_up(&mut spares) {
                            return;
                        }
                        piece.run();
                    }
                }
                Err(_) => break,
            },
            recv(deletions) -> deletion => match deletion {
                Ok(mut deletion) => loop {
                    if !catch_up(&mut spares) {
                        return;
                    }
                    if !deletion.step(DELETE_PIECE) {
                        break;
                    }
                },
                Err(_) => break,
            },
        }
    }
    for release in releases.try_iter() {
        release.run();
    }
    for deletion in deletions.try_iter() {
        deletion.run();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs = None;
        self.releases = None;
        self.deletions = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `work` to the sync thread on `channel`, or runs it here when the thread
/// is gone (and forgets the channel).
fn send_or_run<T>(
    channel: &mut Option<crossbeam_channel::Sender<T>>,
    work: T,
    run: impl FnOnce(T),
) {
    let unsent = match channel {
        Some(sender) => match sender.send(work) {
            Ok(()) => return,
            Err(unsent) => unsent.0,
        },
        None => work,
    };
    *channel = None;
    run(unsent);
}

/// Answers appends waiting for a sync with its outcome: `Err(reason)` when the
/// sync failed.
fn answer(waiters: impl Iterator<Item = Waiter>, sync: Result<(), &str>, shard: u32) {
    for (reply, result) in waiters {
        let result = match sync {
            Ok(()) => result,
            Err(reason) => Err(AppendError::ShardFailed {
                shard,
                reason: reason.to_owned(),
            }),
        };
        let _ = reply.send(result);
    }
}

/// Why appends can no longer be promised durable, if they cannot: the shard failed
/// (a sync or a write), and after a failed sync a later one may succeed although
/// the kernel dropped data in between.
fn failed(shard: &Shard) -> Option<String> {
    shard
        .failure()
        .map(|reason| format!("the shard failed earlier: {reason}"))
}

/// A shard and the state of its group commit, shared by the shard's thread and the
/// appenders. Appends run on the caller's thread (a connection's task), under the
/// lock: a record goes from the socket into the segment and on to its subscribers'
/// queues without waking another thread — on the two-core benchmark machine each
/// hand-off to the shard's thread and back was a wake-up per batch, and a chance
/// to wait in a run queue behind a busy thread. The shard's thread does the rest:
/// reads and the other operations ([`Command::Run`], in its queue), the sync
/// timer, what the sync thread reports, retention, and stopping.
pub(crate) struct ShardCell {
    /// `None` once the shard stopped: appends are then refused as closed.
    state: Mutex<Option<Owned>>,
    /// Wakes the shard's thread when an append set the sync timer (the thread may be
    /// asleep until the next retention check).
    kick: crossbeam_channel::Sender<()>,
    fsync: FsyncPolicy,
    observer: Arc<OnceLock<Arc<dyn AppendObserver>>>,
}

impl std::fmt::Debug for ShardCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCell")
            .field("fsync", &self.fsync)
            .finish_non_exhaustive()
    }
}

/// The answer to an append: at once, or when the sync covering it ends.
#[derive(Debug)]
pub(crate) enum Answer {
    Now(Result<Vec<Appended>, AppendError>),
    Later(oneshot::Receiver<Result<Vec<Appended>, AppendError>>),
}

/// What the lock guards.
struct Owned {
    shard: Shard,
    syncer: Syncer,
    /// Appends waiting for a sync that has not started yet.
    waiting: Vec<Waiter>,
    sync_due: Option<Instant>,
    /// Timestamps never go backwards within a shard, whatever the wall clock does.
    now_ms: u64,
}

/// Starts the thread of `shard` (and its sync thread); returns the shard's cell, the
/// queue of its thread (`queue_depth` commands before senders wait) and the thread.
pub(crate) fn spawn(
    mut shard: Shard,
    fsync: FsyncPolicy,
    observer: Arc<OnceLock<Arc<dyn AppendObserver>>>,
    queue_depth: usize,
) -> std::io::Result<(
    Arc<ShardCell>,
    crossbeam_channel::Sender<Command>,
    std::thread::JoinHandle<()>,
)> {
    let id = shard.id();
    let syncer = Syncer::start(id);
    if syncer.deletions.is_some() {
        shard.defer_deletions();
    }
    let (kick, kicks) = crossbeam_channel::bounded(1);
    let cell = Arc::new(ShardCell {
        state: Mutex::new(Some(Owned {
            shard,
            syncer,
            waiting: Vec::new(),
            sync_due: None,
            now_ms: wall_clock_ms(),
        })),
        kick,
        fsync,
        observer,
    });
    let (sender, commands) = crossbeam_channel::bounded(queue_depth);
    let thread = std::thread::Builder::new()
        .name(format!("shard-{id}"))
        .spawn({
            let cell = cell.clone();
            move || run(&cell, &commands, &kicks)
        })?;
    Ok((cell, sender, thread))
}

impl ShardCell {
    /// The state, unless the shard stopped (or a panic poisoned the lock: the
    /// shard's state may be half changed, so it counts as stopped).
    fn lock(&self) -> Option<MutexGuard<'_, Option<Owned>>> {
        match self.state.lock() {
            Ok(guard) => Some(guard).filter(|state| state.is_some()),
            Err(poisoned) => {
                // The first to find it poisoned answers the appends still waiting
                // (nothing can be promised for them) and stops the sync thread;
                // later appends are refused as closed, and the store's close
                // reports the shard as not closed cleanly.
                if let Some(owned) = poisoned.into_inner().take() {
                    owned.abandon("a panic while the shard's lock was held");
                }
                None
            }
        }
    }

    /// Appends `records` here and now, hands them to the observer, and answers
    /// at once or, when `ack` (or the fsync policy) wants a sync, once the sync
    /// covering them ends. Holds the shard's lock for the copy into the segment.
    pub(crate) fn append(&self, records: Vec<NewRecord>, ack: Ack) -> Answer {
        let Some(mut guard) = self.lock() else {
            return Answer::Now(Err(AppendError::Closed));
        };
        let owned = guard.as_mut().expect("checked by lock");
        owned.now_ms = owned.now_ms.max(wall_clock_ms());
        let result = owned.shard.append(&records, owned.now_ms);
        if let (Ok(appended), Some(observer)) = (&result, self.observer.get()) {
            observer.appended(owned.shard.id(), records, appended, owned.now_ms);
        }
        let must_wait =
            result.is_ok() && (ack == Ack::Durable || self.fsync == FsyncPolicy::Always);
        let answer = if must_wait {
            let (reply, receiver) = oneshot::channel();
            owned.waiting.push((reply, result));
            Answer::Later(receiver)
        } else {
            Answer::Now(result)
        };
        if owned.follow_up(self.fsync, Instant::now()) {
            // Full: a kick is on its way already.
            let _ = self.kick.try_send(());
        }
        answer
    }
}

impl Owned {
    /// What follows appends and every event of the shard's thread: rolls and the
    /// segments retention dropped go to the sync thread, the sync timer is set, and
    /// a sync that is due begins (a message to the sync thread). Returns whether
    /// the timer was set: the shard's thread must then learn of it.
    fn follow_up(&mut self, fsync: FsyncPolicy, now: Instant) -> bool {
        let Owned {
            shard,
            syncer,
            waiting,
            sync_due,
            ..
        } = self;
        // Rolls go to the sync thread before any sync of the segments after them.
        syncer.hand_out(shard);
        // Segments retention dropped to make room for an append.
        syncer.delete(shard);
        // While a sync runs the data it covers still counts as dirty: the timer is
        // set once it ends, for what was written since. A failed shard syncs no more.
        let mut timer_set = false;
        if let FsyncPolicy::Interval(every) = fsync
            && sync_due.is_none()
            && !syncer.is_running()
            && shard.failure().is_none()
            && shard.is_dirty()
        {
            *sync_due = Some(now + every);
            timer_set = true;
        }
        let sync_now = match fsync {
            FsyncPolicy::Always => !waiting.is_empty() || shard.is_dirty(),
            // Waiters whose data a seal already synced are answered at once.
            FsyncPolicy::Interval(_) => {
                sync_due.is_some_and(|due| now >= due) || (!waiting.is_empty() && !shard.is_dirty())
            }
            // Only durable acknowledgements wait.
            FsyncPolicy::Never => !waiting.is_empty(),
        };
        // One sync at a time: what arrives meanwhile waits for the next, which
        // starts when this one ends (its end wakes the shard's thread).
        if sync_now && !syncer.is_running() {
            *sync_due = None;
            syncer.begin(shard, waiting);
        }
        timer_set
    }

    /// When the shard's thread must wake next, at the latest.
    fn deadline(&self, retention_due: Instant) -> Instant {
        // While a sync runs, its end wakes the thread, and the next is due then.
        match self.sync_due {
            Some(due) if !self.syncer.is_running() => due.min(retention_due),
            _ => retention_due,
        }
    }

    /// Gives up on the shard after a panic: refuses every append waiting for a sync
    /// (the one running included) and stops the sync thread.
    fn abandon(mut self, reason: &str) {
        let id = self.shard.id();
        tracing::error!(shard = id, reason, "shard abandoned");
        answer(self.waiting.drain(..), Err(reason), id);
        if let Some(covered) = self.syncer.running.take() {
            answer(covered.into_iter(), Err(reason), id);
        }
    }

    /// The last sync, when the shard stops: waits for the running one, syncs the
    /// rest, answers every append still waiting, and stops the sync thread.
    fn close(mut self) -> Result<(), IoError> {
        let Owned {
            shard,
            syncer,
            waiting,
            ..
        } = &mut self;
        // The sync thread finishes them before it ends (dropping the syncer waits).
        syncer.delete(shard);
        syncer.settle(shard);
        shard.discard_spare();
        // Also runs the rolls not handed out.
        let synced = shard.sync();
        // A shard that failed a sync earlier must not let the store be marked clean: a
        // later sync can succeed although the earlier data was dropped.
        let result = match (synced, failed(shard)) {
            (Ok(()), Some(reason)) => Err(IoError::new(
                "closing shard",
                shard.dir(),
                std::io::Error::other(reason),
            )),
            (result, _) => result,
        };
        match &result {
            Ok(()) => answer(waiting.drain(..), Ok(()), shard.id()),
            Err(error) => answer(waiting.drain(..), Err(&error.to_string()), shard.id()),
        }
        // Joins the sync thread.
        drop(self);
        result
    }
}

/// What woke the shard's thread.
enum Event {
    Command(Command),
    Done(Done),
    SyncerGone,
    /// A timer, or an append that set the sync timer.
    Timeout,
    Disconnected,
}

/// Runs the shard's thread until it is told to stop or every sender is gone.
fn run(cell: &ShardCell, commands: &Receiver<Command>, kicks: &Receiver<()>) {
    let mut retention_due = Instant::now() + RETENTION_EVERY;
    loop {
        let (timeout, finished) = {
            let Some(guard) = cell.lock() else { return };
            let owned = guard.as_ref().expect("checked by lock");
            let deadline = owned.deadline(retention_due);
            (
                deadline.saturating_duration_since(Instant::now()),
                owned.syncer.finished.clone(),
            )
        };
        let event = crossbeam_channel::select! {
            recv(commands) -> command => match command {
                Ok(command) => Event::Command(command),
                Err(_) => Event::Disconnected,
            },
            recv(finished) -> finished => match finished {
                Ok(done) => Event::Done(done),
                Err(_) => Event::SyncerGone,
            },
            // The cell holds the sender: never disconnected while this runs.
            recv(kicks) -> _ => Event::Timeout,
            default(timeout) => Event::Timeout,
        };
        let first = {
            let Some(mut guard) = cell.lock() else { return };
            let owned = guard.as_mut().expect("checked by lock");
            match event {
                Event::Command(command) => Some(command),
                Event::Done(done) => {
                    owned.syncer.handle(&mut owned.shard, done);
                    // The next sync, if one is due, starts now.
                    owned.follow_up(cell.fsync, Instant::now());
                    None
                }
                Event::SyncerGone => {
                    // An appender may have noticed first (a send that failed).
                    if owned.syncer.jobs.is_some() {
                        owned.syncer.lost(&mut owned.shard);
                    }
                    None
                }
                Event::Timeout => None,
                Event::Disconnected => {
                    // Closed outside the lock: appends meanwhile are refused at once.
                    let owned = guard.take();
                    drop(guard);
                    if let Some(owned) = owned {
                        let _ = owned.close();
                    }
                    return;
                }
            }
        };
        // One command at a time under the lock: appends may take it in between.
        for command in first.into_iter().chain(commands.try_iter().take(MAX_GROUP)) {
            let Some(mut guard) = cell.lock() else { return };
            match command {
                Command::Run(operation) => {
                    operation(&mut guard.as_mut().expect("checked by lock").shard)
                }
                Command::Stop { reply } => {
                    let owned = guard.take();
                    drop(guard);
                    let _ = reply.send(owned.map_or(Ok(()), Owned::close));
                    return;
                }
            }
        }
        let Some(mut guard) = cell.lock() else { return };
        let owned = guard.as_mut().expect("checked by lock");
        let now = Instant::now();
        owned.follow_up(cell.fsync, now);
        if now >= retention_due {
            retention_due = now + RETENTION_EVERY;
            let now_ms = owned.now_ms.max(wall_clock_ms());
            if let Err(error) = owned.shard.enforce_retention(now_ms) {
                tracing::error!(shard = owned.shard.id(), %error, "retention failed");
            }
            owned.syncer.delete(&mut owned.shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::storage::config::StoreConfig;
    use crate::storage::log::{DiskBudget, SyncHold};
    use crate::storage::shard::ShardOptions;

    /// A running shard: its cell and its thread's queue.
    struct Running(Arc<ShardCell>, crossbeam_channel::Sender<Command>);

    fn spawned(shard: Shard) -> Running {
        let (cell, sender, _thread) = spawn(shard, FsyncPolicy::Never, Arc::default(), 16).unwrap();
        Running(cell, sender)
    }

    /// A shard thread whose syncs wait for the returned hold (syncing only for
    /// durable acknowledgements).
    fn start(dir: &Path) -> (Running, Arc<SyncHold>) {
        let options = ShardOptions::from_config(&StoreConfig::new(dir), 0);
        let budget = Arc::new(DiskBudget::new(None));
        let mut shard = Shard::open(dir, options, budget, Arc::default()).unwrap().0;
        let hold = Arc::new(SyncHold::default());
        shard.sync_hold = Some(hold.clone());
        (spawned(shard), hold)
    }

    fn append(shard: &Running, payload: &str, ack: Ack) -> Answer {
        shard
            .0
            .append(vec![NewRecord::new("guild.1", payload.to_owned())], ack)
    }

    /// Whether the append is still waiting for its answer.
    fn unanswered(answer: &mut Answer) -> bool {
        match answer {
            Answer::Now(_) => false,
            Answer::Later(receiver) => receiver.try_recv().is_err(),
        }
    }

    /// The answer, or a panic (releasing the hold, so no thread stays stuck) after
    /// 10 s.
    fn within(answer: Answer, hold: &SyncHold) -> Result<Vec<Appended>, AppendError> {
        let mut answer = match answer {
            Answer::Now(result) => return result,
            Answer::Later(receiver) => receiver,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => {
                    hold.release(false);
                    panic!("no answer in 10 s: {error:?}");
                }
            }
        }
    }

    fn stop(shard: &Running) -> Result<(), IoError> {
        let (reply, stopped) = crossbeam_channel::bounded(1);
        shard.1.send(Command::Stop { reply }).unwrap();
        stopped
            .recv_timeout(Duration::from_secs(10))
            .expect("the shard stopped within 10 s")
    }

    #[test]
    fn appends_go_on_while_a_sync_runs_and_durable_ones_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (shard, hold) = start(dir.path());
        let mut first = append(&shard, "a", Ack::Durable);
        hold.wait_started(1);
        // The sync is running (and held): a written append is answered meanwhile.
        let written = within(append(&shard, "b", Ack::Written), &hold);
        assert_eq!(written.unwrap()[0].offset, 1);
        let mut third = append(&shard, "c", Ack::Durable);
        std::thread::sleep(Duration::from_millis(50));
        assert!(unanswered(&mut first), "answered before its sync ended");
        assert!(unanswered(&mut third));
        hold.release(false);
        assert_eq!(within(first, &hold).unwrap()[0].offset, 0);
        // The third append waited for a sync of its own, started after the first.
        assert_eq!(within(third, &hold).unwrap()[0].offset, 2);
        hold.wait_started(2);
        stop(&shard).unwrap();
    }

    #[test]
    fn a_failed_sync_refuses_what_it_covered_what_waited_behind_it_and_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (shard, hold) = start(dir.path());
        let first = append(&shard, "a", Ack::Durable);
        hold.wait_started(1);
        // Accepted while the failing sync runs. The next sync would succeed (the
        // hold fails only the first), but the kernel may have dropped its data, so
        // it must not be called durable either.
        let second = append(&shard, "b", Ack::Durable);
        std::thread::sleep(Duration::from_millis(50));
        hold.release(true);
        refused_for_a_failed_sync(&shard, &hold, [first, second]);
    }

    #[test]
    fn a_panic_under_the_lock_refuses_the_appends_waiting_and_those_after() {
        let dir = tempfile::tempdir().unwrap();
        let (shard, hold) = start(dir.path());
        let waiting = append(&shard, "a", Ack::Durable);
        hold.wait_started(1);
        shard
            .1
            .send(Command::Run(Box::new(|_| {
                panic!("an operation that panics")
            })))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !shard.0.state.is_poisoned() {
            assert!(Instant::now() < deadline, "the operation never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The held sync may end now: abandoning the shard waits for its thread.
        hold.release(false);
        let later = within(append(&shard, "b", Ack::Written), &hold);
        assert!(matches!(later, Err(AppendError::Closed)), "{later:?}");
        let error = within(waiting, &hold).unwrap_err();
        assert!(
            matches!(&error, AppendError::ShardFailed { reason, .. } if reason.contains("panic")),
            "{error:?}"
        );
    }

    /// `answers` are refused for a failed sync, and so is what follows, and the
    /// shard's close says it failed.
    fn refused_for_a_failed_sync<const N: usize>(
        shard: &Running,
        hold: &SyncHold,
        answers: [Answer; N],
    ) {
        for answer in answers {
            let error = within(answer, hold).unwrap_err();
            assert!(
                matches!(&error, AppendError::ShardFailed { reason, .. } if reason.contains("sync")),
                "{error:?}"
            );
        }
        let later = within(append(shard, "c", Ack::Written), hold);
        assert!(
            matches!(later, Err(AppendError::ShardFailed { .. })),
            "{later:?}"
        );
        let closed = stop(shard).unwrap_err();
        assert!(closed.to_string().contains("failed earlier"), "{closed}");
    }

    /// A shard thread with 64 KiB segments whose rolls wait for the returned hold,
    /// after 100 written appends of 1 KiB: about 60 fill a segment, so one roll
    /// is held, and the appends after it were answered meanwhile.
    fn rolled_and_held(dir: &Path, budget: &Arc<DiskBudget>) -> (Running, Arc<SyncHold>) {
        let mut config = StoreConfig::new(dir);
        config.segment_bytes = 64 << 10;
        config.max_batch_bytes = 32 << 10;
        let options = ShardOptions::from_config(&config, 0);
        let mut shard = Shard::open(dir, options, budget.clone(), Arc::default())
            .unwrap()
            .0;
        let hold = Arc::new(SyncHold::default());
        shard.hold_rolls(hold.clone());
        let running = spawned(shard);
        let payload = "x".repeat(1000);
        for i in 0..100 {
            let written = within(append(&running, &payload, Ack::Written), &hold);
            assert_eq!(written.unwrap()[0].offset, i);
        }
        hold.wait_started(1);
        (running, hold)
    }

    #[test]
    fn a_roll_runs_off_the_shard_thread_and_durable_appends_after_it_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (shard, hold) = rolled_and_held(dir.path(), &Arc::new(DiskBudget::new(None)));
        let mut durable = append(&shard, "after the roll", Ack::Durable);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            unanswered(&mut durable),
            "answered before the roll sealed the segment before it"
        );
        hold.release(false);
        assert_eq!(within(durable, &hold).unwrap()[0].offset, 100);
        stop(&shard).unwrap();
    }

    #[test]
    fn a_failed_roll_stops_the_shard_and_refuses_what_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(DiskBudget::new(None));
        let (shard, hold) = rolled_and_held(dir.path(), &budget);
        let durable = append(&shard, "after the roll", Ack::Durable);
        std::thread::sleep(Duration::from_millis(50));
        hold.release(true);
        refused_for_a_failed_sync(&shard, &hold, [durable]);
        // The stopped shard keeps no spare, and counts just the files it left
        // (the failed roll's segment uncut).
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap())
            .collect();
        assert!(
            files
                .iter()
                .all(|f| !f.file_name().to_string_lossy().ends_with(".tmp")),
            "{files:?}"
        );
        let on_disk: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        assert_eq!(budget.used(), on_disk);
    }
}
