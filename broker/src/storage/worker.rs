//! The thread that owns a shard: it takes commands from a bounded queue, appends, and
//! runs group commit — appends that arrive together share one sync.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use crate::storage::config::FsyncPolicy;
use crate::storage::error::{AppendError, IoError};
use crate::storage::observer::AppendObserver;
use crate::storage::record::NewRecord;
use crate::storage::shard::{Appended, Shard};
use crate::storage::store::Ack;

/// Most commands handled between two syncs.
const MAX_GROUP: usize = 256;
/// How often retention is checked.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

pub(crate) type AppendReply = oneshot::Sender<Result<Vec<Appended>, AppendError>>;

/// Work for a shard's thread.
pub(crate) enum Command {
    Append {
        records: Vec<NewRecord>,
        ack: Ack,
        reply: AppendReply,
    },
    /// Any other operation, run on the shard's thread with exclusive access.
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

/// Runs the shard until it is told to stop or every sender is gone.
pub(crate) fn run(
    mut shard: Shard,
    commands: Receiver<Command>,
    fsync: FsyncPolicy,
    observer: Arc<OnceLock<Arc<dyn AppendObserver>>>,
) {
    // Appends waiting for the sync that covers them, with their result.
    let mut waiting: Vec<(AppendReply, Result<Vec<Appended>, AppendError>)> = Vec::new();
    let mut sync_due: Option<Instant> = None;
    let mut retention_due = Instant::now() + RETENTION_EVERY;
    // Timestamps never go backwards within a shard, whatever the wall clock does.
    let mut now_ms = wall_clock_ms();
    loop {
        let deadline = sync_due.map_or(retention_due, |due| due.min(retention_due));
        let first = match commands.recv_deadline(deadline) {
            Ok(command) => Some(command),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = shard.sync();
                return;
            }
        };
        let mut stop = None;
        let mut sync_requested = false;
        for command in first.into_iter().chain(commands.try_iter().take(MAX_GROUP)) {
            match command {
                Command::Append {
                    records,
                    ack,
                    reply,
                } => {
                    now_ms = now_ms.max(wall_clock_ms());
                    let result = shard.append(&records, now_ms);
                    if let (Ok(appended), Some(observer)) = (&result, observer.get()) {
                        observer.appended(shard.id(), records, appended, now_ms);
                    }
                    let must_wait =
                        result.is_ok() && (ack == Ack::Durable || fsync == FsyncPolicy::Always);
                    if must_wait {
                        sync_requested |= ack == Ack::Durable;
                        waiting.push((reply, result));
                    } else {
                        let _ = reply.send(result);
                    }
                }
                Command::Run(operation) => operation(&mut shard),
                Command::Stop { reply } => {
                    stop = Some(reply);
                    break;
                }
            }
        }
        let now = Instant::now();
        if let FsyncPolicy::Interval(every) = fsync
            && sync_due.is_none()
            && shard.is_dirty()
        {
            sync_due = Some(now + every);
        }
        let sync_now = stop.is_some()
            || match fsync {
                FsyncPolicy::Always => !waiting.is_empty() || shard.is_dirty(),
                // Waiters whose data a seal already synced are answered at once.
                FsyncPolicy::Interval(_) => {
                    sync_due.is_some_and(|due| now >= due)
                        || (!waiting.is_empty() && !shard.is_dirty())
                }
                FsyncPolicy::Never => sync_requested,
            };
        let mut sync_result = Ok(());
        if sync_now {
            sync_due = None;
            sync_result = shard.sync();
            for (reply, result) in waiting.drain(..) {
                let result = match &sync_result {
                    Ok(()) => result,
                    Err(error) => Err(AppendError::ShardFailed {
                        shard: shard.id(),
                        reason: error.to_string(),
                    }),
                };
                let _ = reply.send(result);
            }
            if sync_result.is_ok() {
                shard.release_page_cache();
            }
        }
        if now >= retention_due {
            retention_due = now + RETENTION_EVERY;
            if let Err(error) = shard.enforce_retention(now_ms.max(wall_clock_ms())) {
                tracing::error!(shard = shard.id(), %error, "retention failed");
            }
        }
        if let Some(reply) = stop {
            // A shard that failed a sync earlier must not let the store be marked
            // clean: a later sync can succeed although the earlier data was dropped.
            let result = match (sync_result, shard.failure()) {
                (Ok(()), Some(reason)) => Err(IoError::new(
                    "closing shard",
                    shard.dir(),
                    std::io::Error::other(format!("an earlier sync failed: {reason}")),
                )),
                (result, _) => result,
            };
            let _ = reply.send(result);
            return;
        }
    }
}
