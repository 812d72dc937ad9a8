//! Lua delivery filters: the broker decides, per subscription, whether a record may
//! be delivered (a member who cannot see a channel never receives its messages).
//!
//! # Layout
//! - this file: the narrow interface — [`FilterSet`] (the filters loaded from a
//!   directory, reloadable), [`Context`], [`EventView`], [`evaluate`].
//! - [`cases`]: running a filter's test cases (`switchyard filter test`).
//! - [`engine`] (private): one sandboxed Lua 5.4 state per thread; the only place
//!   that knows mlua.
//!
//! The filter API, the sandbox and the limits are documented in `docs/filters.md`.

pub mod cases;
mod engine;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Bounds on every filter call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Lua instructions one call may run (checked every 1,000).
    pub instructions: u32,
    /// Bytes the Lua state of one thread may allocate.
    pub memory_bytes: usize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            instructions: 100_000,
            memory_bytes: 64 << 20,
        }
    }
}

/// Why a filter could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct CompileError {
    pub file: String,
    /// The message, with `file:line:` where Lua gives one.
    pub message: String,
}

/// Why a filter call failed; the record is then not delivered to that subscription.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("no filter named {0:?} is loaded")]
    Unknown(String),
    #[error("{0}")]
    Compile(String),
    #[error("{0}")]
    Runtime(String),
    #[error("the Lua state could not be created: {0}")]
    Engine(String),
}

/// A record as a filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    /// Names this record for the engine: calls with the same key must carry the same
    /// record (its Lua table and decoded JSON are then reused). Take a fresh one from
    /// [`EventView::new_key`] for every record.
    pub key: u64,
    pub topic: &'a str,
    pub offset: u64,
    pub timestamp_ms: u64,
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
}

static NEXT_EVENT: AtomicU64 = AtomicU64::new(1);

impl EventView<'_> {
    /// A key no other record has.
    pub fn new_key() -> u64 {
        NEXT_EVENT.fetch_add(1, Ordering::Relaxed)
    }
}

/// What a filter knows of a subscriber (roles, user id, ...). Immutable; a context
/// update makes a new one. Contexts with equal values compare and hash equal, so
/// subscriptions with the same filter and context share one evaluation per record.
#[derive(Debug, Clone)]
pub struct Context {
    /// Unique per context made: the key of its Lua table in each thread's cache.
    id: u64,
    values: Arc<Values>,
    hash: u64,
}

/// A context's values, shared by every equal context alive.
#[derive(Debug)]
struct Values {
    map: BTreeMap<String, String>,
    /// The context without one field (the first a filter's `share` names), made on
    /// first use: `None` when the context has no such field.
    without: std::sync::OnceLock<(String, Option<(String, Context)>)>,
}

impl PartialEq for Values {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

static NEXT_CONTEXT: AtomicU64 = AtomicU64::new(1);

/// Live contexts by content hash, so that equal contexts share one map and compare
/// by pointer.
type Interned = std::sync::Mutex<HashMap<u64, Vec<std::sync::Weak<Values>>>>;
static INTERNED: std::sync::LazyLock<Interned> = std::sync::LazyLock::new(Default::default);

impl Context {
    pub fn new(values: impl IntoIterator<Item = (String, String)>) -> Self {
        let values: BTreeMap<String, String> = values.into_iter().collect();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        values.hash(&mut hasher);
        let hash = hasher.finish();
        let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
        // Every so often, forget contexts nobody holds any more.
        if NEXT_CONTEXT.load(Ordering::Relaxed).is_multiple_of(4096) {
            interned.retain(|_, same| {
                same.retain(|weak| weak.strong_count() > 0);
                !same.is_empty()
            });
        }
        let same = interned.entry(hash).or_default();
        same.retain(|weak| weak.strong_count() > 0);
        let values = match same
            .iter()
            .filter_map(|weak| weak.upgrade())
            .find(|v| v.map == values)
        {
            Some(existing) => existing,
            None => {
                let values = Arc::new(Values {
                    map: values,
                    without: std::sync::OnceLock::new(),
                });
                same.push(Arc::downgrade(&values));
                values
            }
        };
        Context {
            id: NEXT_CONTEXT.fetch_add(1, Ordering::Relaxed),
            values,
            hash,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn values(&self) -> &BTreeMap<String, String> {
        &self.values.map
    }

    /// The context to judge in this one's place when a filter shares verdicts over
    /// `field` (see `share` in `docs/filters.md`): the context without `field` when it
    /// has the field and `named` says the record does not name its value, else this
    /// context. The context without the field is made once (for the first field
    /// asked; for another field this context is judged as it is).
    pub fn shared_form(&self, field: &str, named: impl Fn(&str) -> bool) -> &Context {
        let (cached_field, without) = self.values.without.get_or_init(|| {
            let without = self.values.map.get(field).map(|value| {
                let rest = self
                    .values
                    .map
                    .iter()
                    .filter(|(k, _)| k.as_str() != field)
                    .map(|(k, v)| (k.clone(), v.clone()));
                (value.clone(), Context::new(rest))
            });
            (field.to_owned(), without)
        });
        match without {
            Some((value, without)) if cached_field == field && !named(value) => without,
            _ => self,
        }
    }

    pub fn content_hash(&self) -> u64 {
        self.hash
    }
}

impl PartialEq for Context {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.values, &other.values) || self.values == other.values)
    }
}

impl Eq for Context {}

/// Counters of one filter.
#[derive(Debug, Default)]
pub struct FilterStats {
    pub evaluations: AtomicU64,
    pub denials: AtomicU64,
    pub errors: AtomicU64,
    /// When an error was last logged (milliseconds since the Unix epoch).
    last_logged_ms: AtomicU64,
}

/// A filter as loaded: its source and version. Threads compile it on first use.
#[derive(Debug)]
pub struct LoadedFilter {
    pub name: String,
    pub file: String,
    pub source: String,
    /// Changes whenever the source does.
    pub version: u64,
    pub stats: Arc<FilterStats>,
}

/// What a (re)load did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Filters now serving a new version.
    pub loaded: Vec<String>,
    /// Files refused; an older version of the same filter, if any, keeps serving.
    pub failed: Vec<CompileError>,
    /// Filters whose file disappeared.
    pub removed: Vec<String>,
}

/// The filters of a directory (`NAME.lua` is filter `NAME`).
#[derive(Debug)]
pub struct FilterSet {
    dir: Option<PathBuf>,
    limits: FilterLimits,
    filters: RwLock<HashMap<String, Arc<LoadedFilter>>>,
    /// A hash of each file's content as last read, to reload on change (read through
    /// symlinks, so files mounted from a config map are followed).
    seen: RwLock<HashMap<PathBuf, u64>>,
    /// One reload at a time (the watcher and a request may ask together).
    reloading: std::sync::Mutex<()>,
    next_version: AtomicU64,
}

/// Compiles `source` in a scratch state: `Ok` when it would load.
pub fn check_source(file: &str, source: &str, limits: FilterLimits) -> Result<(), CompileError> {
    let compiled = engine::with_engine(limits, |engine| engine.compile(file, source).map(|_| ()));
    match compiled {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(CompileError {
            file: file.to_owned(),
            message,
        }),
        Err(error) => Err(CompileError {
            file: file.to_owned(),
            message: error.to_string(),
        }),
    }
}

impl FilterSet {
    /// An empty set (no directory): every named filter is unknown.
    pub fn empty(limits: FilterLimits) -> Self {
        FilterSet {
            dir: None,
            limits,
            filters: RwLock::new(HashMap::new()),
            seen: RwLock::new(HashMap::new()),
            reloading: std::sync::Mutex::new(()),
            next_version: AtomicU64::new(1),
        }
    }

    /// Loads every `*.lua` file of `dir`. Files that fail to compile are reported
    /// (file and line) and left out.
    pub fn load(dir: impl Into<PathBuf>, limits: FilterLimits) -> (Self, LoadReport) {
        let set = FilterSet {
            dir: Some(dir.into()),
            ..FilterSet::empty(limits)
        };
        let report = set.reload();
        (set, report)
    }

    pub fn limits(&self) -> FilterLimits {
        self.limits
    }

    pub fn get(&self, name: &str) -> Option<Arc<LoadedFilter>> {
        self.filters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Names and counters of the loaded filters.
    pub fn stats(&self) -> Vec<(String, Arc<FilterStats>)> {
        let filters = self.filters.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = filters
            .values()
            .map(|f| (f.name.clone(), f.stats.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Adds or replaces filter `name` from `source` (after a compile check).
    pub fn insert(&self, name: &str, file: &str, source: String) -> Result<(), CompileError> {
        check_source(file, &source, self.limits)?;
        let mut filters = self.filters.write().unwrap_or_else(|e| e.into_inner());
        let stats = filters
            .get(name)
            .map(|f| f.stats.clone())
            .unwrap_or_default();
        filters.insert(
            name.to_owned(),
            Arc::new(LoadedFilter {
                name: name.to_owned(),
                file: file.to_owned(),
                source,
                version: self.next_version.fetch_add(1, Ordering::Relaxed),
                stats,
            }),
        );
        Ok(())
    }

    /// Loads what changed in the directory since the last (re)load. A file that now
    /// fails to compile is reported and its previous version keeps serving.
    pub fn reload(&self) -> LoadReport {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = LoadReport::default();
        let Some(dir) = &self.dir else { return report };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                report.failed.push(CompileError {
                    file: dir.display().to_string(),
                    message: format!("cannot read the filter directory: {error}"),
                });
                return report;
            }
        };
        let mut present = Vec::new();
        let mut seen_paths = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = filter_name(&path) else {
                continue;
            };
            let file = path.display().to_string();
            // Read through symlinks; compare content, not timestamps.
            let source = match std::fs::read_to_string(&path) {
                Ok(source) => source,
                Err(error) => {
                    report.failed.push(CompileError {
                        file,
                        message: format!("cannot read: {error}"),
                    });
                    present.push(name);
                    continue;
                }
            };
            present.push(name.clone());
            seen_paths.push(path.clone());
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            source.hash(&mut hasher);
            let hash = hasher.finish();
            if self
                .seen
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&path)
                == Some(&hash)
            {
                continue;
            }
            self.seen
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path, hash);
            match self.insert(&name, &file, source) {
                Ok(()) => report.loaded.push(name),
                Err(error) => {
                    tracing::error!(%error, "filter refused; the previous version (if any) keeps serving");
                    report.failed.push(error);
                }
            }
        }
        // Files that went away are forgotten, so that putting one back loads it again.
        self.seen
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|path, _| seen_paths.contains(path));
        let mut filters = self.filters.write().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = filters
            .keys()
            .filter(|n| !present.contains(n))
            .cloned()
            .collect();
        for name in gone {
            filters.remove(&name);
            report.removed.push(name);
        }
        report.loaded.sort();
        report
    }

    /// Reloads every `every` until `stop` completes (changes are picked up by
    /// modification time and size).
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {
                    let set = self.clone();
                    let report = tokio::task::spawn_blocking(move || set.reload()).await.unwrap_or_default();
                    if !report.loaded.is_empty() || !report.removed.is_empty() {
                        tracing::info!(loaded = ?report.loaded, removed = ?report.removed, "filters reloaded");
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}

fn filter_name(path: &Path) -> Option<String> {
    if path.extension()? != "lua" {
        return None;
    }
    Some(path.file_stem()?.to_str()?.to_owned())
}

/// Runs `filter` on `event` for one subscription, on this thread's Lua state:
/// `true` to deliver. Errors are counted per filter and logged at most once per
/// second per filter; the caller withholds the record.
pub fn evaluate(
    filter: &LoadedFilter,
    limits: FilterLimits,
    event: &EventView<'_>,
    subscription_id: u64,
    context: &Context,
) -> Result<bool, EvalError> {
    let result = engine::with_engine(limits, |engine| {
        engine.evaluate(filter, event, subscription_id, context)
    })
    .and_then(|r| r);
    count(filter, event, std::slice::from_ref(&result));
    result
}

/// Runs `filter` on `event` for many subscriptions (id, context) at once, in one
/// call into this thread's Lua state, and appends their verdicts to `verdicts` in
/// order. Each subscription's call is bounded and contained on its own: one that
/// fails withholds the record from that subscription only. Counted and logged as
/// [`evaluate`] does.
pub fn evaluate_many(
    filter: &LoadedFilter,
    limits: FilterLimits,
    event: &EventView<'_>,
    subscriptions: &[(u64, &Context)],
    verdicts: &mut Vec<Result<bool, EvalError>>,
) {
    let first = verdicts.len();
    let engine = engine::with_engine(limits, |engine| {
        engine.evaluate_many(filter, event, subscriptions, verdicts)
    });
    if let Err(error) = engine {
        verdicts.extend(subscriptions.iter().map(|_| Err(error.clone())));
    }
    count(filter, event, &verdicts[first..]);
}

/// The context field `filter` shares verdicts over (its `share.field`) and the
/// values of it `event` names, sorted; `None` when the filter declares no `share`, or
/// its `share.named` fails (counted and logged as a failed call: nothing is shared).
pub fn named(
    filter: &LoadedFilter,
    limits: FilterLimits,
    event: &EventView<'_>,
) -> Option<(String, Vec<String>)> {
    let named = engine::with_engine(limits, |engine| engine.named(filter, event)).and_then(|r| r);
    match named {
        Ok(Some((field, mut values))) => {
            values.sort_unstable();
            Some((field, values))
        }
        Ok(None) => None,
        Err(error) => {
            filter.stats.errors.fetch_add(1, Ordering::Relaxed);
            log_failure(filter, event, &error);
            None
        }
    }
}

/// Counts a filter's verdicts and logs a failure at most once a second per filter.
fn count(filter: &LoadedFilter, event: &EventView<'_>, verdicts: &[Result<bool, EvalError>]) {
    let stats = &filter.stats;
    stats
        .evaluations
        .fetch_add(verdicts.len() as u64, Ordering::Relaxed);
    let denials = verdicts.iter().filter(|v| matches!(v, Ok(false))).count();
    if denials > 0 {
        stats.denials.fetch_add(denials as u64, Ordering::Relaxed);
    }
    let mut errors = verdicts.iter().filter_map(|v| v.as_ref().err());
    let Some(error) = errors.next() else { return };
    stats
        .errors
        .fetch_add(1 + errors.count() as u64, Ordering::Relaxed);
    log_failure(filter, event, error);
}

/// Logs a filter's failure, at most once a second per filter.
fn log_failure(filter: &LoadedFilter, event: &EventView<'_>, error: &EvalError) {
    let stats = &filter.stats;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let last = stats.last_logged_ms.load(Ordering::Relaxed);
    if now >= last + 1000
        && stats
            .last_logged_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(filter = %filter.name, topic = event.topic, offset = event.offset, %error, "filter failed; record withheld from the subscription");
    }
}

/// A verdict known for a record, or the index of the pending judgement that makes it.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Known(bool),
    Pending(usize),
}

/// Keyed by a context's hash, used as it is.
type ByHash = HashMap<u64, (Context, Verdict), crate::hash::BuildIdentityHasher>;

/// The verdicts of one filter for one record.
struct FilterVerdicts {
    name: String,
    /// The filter, looked up once per record.
    filter: Option<Arc<LoadedFilter>>,
    /// The filter's `share` field and the values of it the record names (sorted).
    share: Option<(String, Vec<String>)>,
    /// Context hash → the context judged and its verdict.
    by_hash: ByHash,
    /// Contexts whose hash another context already holds (rare).
    collisions: Vec<(Context, Verdict)>,
}

/// Verdicts for one record across many subscriptions: subscriptions with the same
/// filter and equal contexts share one evaluation. Make one per record.
#[derive(Default)]
pub struct SharedVerdicts {
    known: Vec<FilterVerdicts>,
}

impl std::fmt::Debug for SharedVerdicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVerdicts")
            .field("filters", &self.known.len())
            .finish()
    }
}

/// A (filter, context) that [`SharedVerdicts::judge`] is to evaluate.
struct Pending<'c> {
    known: usize,
    hash: u64,
    /// Where its verdict goes: its index in `collisions`, or `by_hash[hash]`.
    collision: Option<usize>,
    subscription_id: u64,
    context: &'c Context,
}

impl FilterVerdicts {
    /// The context judged for a subscription with `context`: itself, or the context
    /// without the filter's `share` field when the record does not name its value.
    fn judged<'c>(&self, context: &'c Context) -> &'c Context {
        match &self.share {
            None => context,
            Some((field, names)) => context.shared_form(field, |value| {
                names.binary_search_by(|n| n.as_str().cmp(value)).is_ok()
            }),
        }
    }
}

impl SharedVerdicts {
    fn known(&mut self, filters: &FilterSet, name: &str, event: &EventView<'_>) -> usize {
        // Most records meet one filter: try the last one first.
        if let Some(last) = self.known.last()
            && last.name.len() == name.len()
            && last.name == name
        {
            return self.known.len() - 1;
        }
        match self.known.iter().position(|k| k.name == name) {
            Some(index) => index,
            None => {
                let filter = filters.get(name);
                let share = filter
                    .as_ref()
                    .and_then(|f| named(f, filters.limits(), event));
                self.known.push(FilterVerdicts {
                    name: name.to_owned(),
                    filter,
                    share,
                    by_hash: ByHash::default(),
                    collisions: Vec::new(),
                });
                self.known.len() - 1
            }
        }
    }

    /// Whether each of `subscriptions` (filter name, context, subscription id) may
    /// receive `event`, in order. Subscriptions with the same filter and equal
    /// contexts (or, under the filter's `share`, equal contexts without its field)
    /// share one evaluation, made for the first of them; the distinct contexts of
    /// each filter not judged yet for this record go to Lua together, in one call. A
    /// filter that fails, or is no longer loaded, withholds the record.
    pub fn judge<'c>(
        &mut self,
        filters: &FilterSet,
        event: &EventView<'_>,
        subscriptions: impl IntoIterator<Item = (&'c str, &'c Context, u64)>,
    ) -> Vec<bool> {
        let mut pending: Vec<Pending<'c>> = Vec::new();
        let mut tickets: Vec<Verdict> = Vec::new();
        for (name, context, subscription_id) in subscriptions {
            let known = self.known(filters, name, event);
            let verdicts = &mut self.known[known];
            let context = verdicts.judged(context);
            let hash = context.content_hash();
            let mut pend = |collision| {
                pending.push(Pending {
                    known,
                    hash,
                    collision,
                    subscription_id,
                    context,
                });
                Verdict::Pending(pending.len() - 1)
            };
            let ticket = match verdicts.by_hash.entry(hash) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let ticket = pend(None);
                    slot.insert((context.clone(), ticket));
                    ticket
                }
                std::collections::hash_map::Entry::Occupied(seen) if seen.get().0 == *context => {
                    seen.get().1
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    match verdicts.collisions.iter().find(|(c, _)| c == context) {
                        Some((_, verdict)) => *verdict,
                        None => {
                            let ticket = pend(Some(verdicts.collisions.len()));
                            verdicts.collisions.push((context.clone(), ticket));
                            ticket
                        }
                    }
                }
            };
            tickets.push(ticket);
        }
        let mut decided = vec![false; pending.len()];
        let mut order: Vec<usize> = (0..pending.len()).collect();
        order.sort_by_key(|&i| pending[i].known);
        let mut results = Vec::new();
        let mut batch = Vec::new();
        for group in order.chunk_by(|&a, &b| pending[a].known == pending[b].known) {
            let verdicts = &mut self.known[pending[group[0]].known];
            if let Some(filter) = &verdicts.filter {
                batch.clear();
                batch.extend(
                    group
                        .iter()
                        .map(|&i| (pending[i].subscription_id, pending[i].context)),
                );
                results.clear();
                evaluate_many(filter, filters.limits(), event, &batch, &mut results);
                for (&i, result) in group.iter().zip(&results) {
                    decided[i] = *result.as_ref().unwrap_or(&false);
                }
            } // else not loaded: withheld (false)
            for &i in group {
                let verdict = Verdict::Known(decided[i]);
                match pending[i].collision {
                    Some(c) => verdicts.collisions[c].1 = verdict,
                    None => {
                        if let Some(slot) = verdicts.by_hash.get_mut(&pending[i].hash) {
                            slot.1 = verdict;
                        }
                    }
                }
            }
        }
        tickets
            .into_iter()
            .map(|ticket| match ticket {
                Verdict::Known(verdict) => verdict,
                Verdict::Pending(i) => decided[i],
            })
            .collect()
    }

    /// Whether a subscription with filter `name` and `context` may receive `event`
    /// (see [`SharedVerdicts::judge`]).
    pub fn allows(
        &mut self,
        filters: &FilterSet,
        name: &str,
        context: &Context,
        subscription_id: u64,
        event: &EventView<'_>,
    ) -> bool {
        self.judge(filters, event, [(name, context, subscription_id)])[0]
    }
}

/// Times one call, for benchmarks and the `filter test` command.
pub fn time_evaluation(
    filter: &LoadedFilter,
    limits: FilterLimits,
    event: &EventView<'_>,
    context: &Context,
) -> (Result<bool, EvalError>, Duration) {
    let started = Instant::now();
    let result = evaluate(filter, limits, event, 0, context);
    (result, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FilterLimits = FilterLimits {
        instructions: 100_000,
        memory_bytes: 16 << 20,
    };

    fn set_with(name: &str, source: &str) -> FilterSet {
        let set = FilterSet::empty(LIMITS);
        set.insert(name, &format!("{name}.lua"), source.to_owned())
            .unwrap();
        set
    }

    fn event<'a>(headers: &'a [(String, String)], payload: &'a [u8]) -> EventView<'a> {
        EventView {
            key: EventView::new_key(),
            topic: "guild.1",
            offset: 7,
            timestamp_ms: 1,
            headers,
            payload,
        }
    }

    fn run(set: &FilterSet, name: &str, context: &Context) -> Result<bool, EvalError> {
        let headers = vec![("type".to_owned(), "MESSAGE_CREATE".to_owned())];
        evaluate(
            &set.get(name).unwrap(),
            LIMITS,
            &event(&headers, br#"{"author":{"id":"5"}}"#),
            1,
            context,
        )
    }

    #[test]
    fn a_filter_sees_the_event_and_the_subscription() {
        let set = set_with(
            "f",
            r#"return function(event, sub)
                 return event.topic == "guild.1" and event.offset == 7
                   and event.headers.type == "MESSAGE_CREATE"
                   and event:json().author.id == sub.context.user and sub.id == 1
               end"#,
        );
        let me = Context::new([("user".to_owned(), "5".to_owned())]);
        let other = Context::new([("user".to_owned(), "6".to_owned())]);
        assert_eq!(run(&set, "f", &me), Ok(true));
        assert_eq!(run(&set, "f", &other), Ok(false));
        let stats = &set.get("f").unwrap().stats;
        assert_eq!(stats.evaluations.load(Ordering::Relaxed), 2);
        assert_eq!(stats.denials.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn compile_errors_name_file_and_line() {
        let set = FilterSet::empty(LIMITS);
        let error = set
            .insert(
                "bad",
                "bad.lua",
                "return function(e)\n  if then end\nend".into(),
            )
            .unwrap_err();
        assert!(error.message.contains("bad.lua:2:"), "{error}");
        let error = set
            .insert("notfn", "notfn.lua", "return 42".into())
            .unwrap_err();
        assert!(
            error.message.contains("must return the filter function"),
            "{error}"
        );
        assert!(set.get("bad").is_none());
    }

    #[test]
    fn hostile_filters_are_contained_and_the_state_keeps_serving() {
        let hostile = [
            ("loop", "return function() while true do end end", "budget"),
            (
                "memory",
                "return function() local t = {} for i = 1, 1000 do t[i] = string.rep('x', 1048576) .. i end end",
                "memory limit",
            ),
            (
                "rep_gigabyte",
                "return function() return #string.rep('x', 1 << 30) > 0 end",
                "16 MiB",
            ),
            (
                "rep_method",
                "return function() return #(('x'):rep(1 << 30)) > 0 end",
                "16 MiB",
            ),
            (
                "rep_empty",
                "return function() return #string.rep('', 1 << 62) >= 0 end",
                "16 MiB",
            ),
            (
                "pcall_loop",
                "return function() while true do pcall(function() while true do end end) end end",
                "budget",
            ),
            (
                "xpcall_loop",
                "return function() while true do xpcall(function() while true do end end, error) end end",
                "budget",
            ),
            (
                "find_loop",
                "return function() while true do ('a'):find('a', 1, true) end end",
                "budget",
            ),
            (
                "global_g",
                "return function() _G.string = nil return true end",
                "read-only",
            ),
            (
                "gc",
                "return function() setmetatable({}, {__gc = function() end}) return true end",
                "__gc",
            ),
            (
                "dump",
                "return function() return ('').dump(function() end) ~= nil end",
                "dump",
            ),
            (
                "table_move",
                "return function() table.move({}, 1, 1e15, 2) return true end",
                "move",
            ),
            (
                "pattern_bomb",
                "return function() return ('a'):rep(5000):find(('a*'):rep(30) .. 'b') ~= nil end",
                "quantifiers",
            ),
            (
                "long_subject",
                "return function() return string.find(string.rep('a', 1 << 20), 'b') ~= nil end",
                "64 KiB",
            ),
            (
                "os",
                "return function() os.execute('true') return true end",
                "os",
            ),
            (
                "io",
                "return function() io.open('/etc/passwd') return true end",
                "io",
            ),
            (
                "require",
                "return function() require('socket') return true end",
                "require",
            ),
            (
                "load",
                "return function() load(string.dump(function() end)) return true end",
                "",
            ),
            (
                "string_lib",
                "return function() string.upper = nil return true end",
                "read-only",
            ),
            ("runtime", "return function() error('boom') end", "boom"),
            (
                "not_boolean",
                "return function() return 'yes' end",
                "not a boolean",
            ),
        ];
        let set = FilterSet::empty(LIMITS);
        let good = "return function(event) return event.topic == 'guild.1' end";
        set.insert("good", "good.lua", good.into()).unwrap();
        let context = Context::new([]);
        for (name, source, expected) in hostile {
            set.insert(name, &format!("{name}.lua"), source.into())
                .unwrap();
            match run(&set, name, &context) {
                Err(EvalError::Runtime(message)) => {
                    assert!(message.contains(expected), "{name}: {message}")
                }
                other => panic!("{name}: expected a contained error, got {other:?}"),
            }
            assert_eq!(run(&set, "good", &context), Ok(true), "after {name}");
        }
        // Deep recursion with a budget that lets it run: the stack or the memory limit
        // stops it.
        let generous = FilterLimits {
            instructions: 500_000_000,
            memory_bytes: 16 << 20,
        };
        set.insert(
            "recursion",
            "recursion.lua",
            "local function f(n) return f(n + 1) + 1 end return function() return f(1) end".into(),
        )
        .unwrap();
        let headers = Vec::new();
        let deep = evaluate(
            &set.get("recursion").unwrap(),
            generous,
            &event(&headers, b""),
            1,
            &context,
        );
        match deep {
            Err(EvalError::Runtime(message)) => {
                assert!(
                    message.contains("stack overflow") || message.contains("memory limit"),
                    "{message}"
                )
            }
            other => panic!("recursion: expected a contained error, got {other:?}"),
        }
        // A file whose top level never ends is refused at load, not a hung loader.
        let error = set
            .insert(
                "hang",
                "hang.lua",
                "while true do pcall(function() while true do end end) end return function() end"
                    .into(),
            )
            .unwrap_err();
        assert!(error.message.contains("budget"), "{error}");
        // Metatables of strings cannot be reached to break other filters.
        set.insert(
            "meta",
            "meta.lua",
            "return function() return getmetatable('') == false end".into(),
        )
        .unwrap();
        assert_eq!(run(&set, "meta", &context), Ok(true));
    }

    #[test]
    fn one_filter_cannot_change_what_another_sees() {
        let set = FilterSet::empty(LIMITS);
        set.insert(
            "poison",
            "poison.lua",
            "return function(e, s) e.headers.channel_id = nil; e._overwrites = {}; s.context.roles = 'admin'; \
             s.context._member = {sees_all = true}; return true end"
                .into(),
        )
        .unwrap();
        set.insert(
            "reader",
            "reader.lua",
            "return function(e, s) return e.headers.channel_id == '10' and e._overwrites == nil \
             and s.context.roles == 'none' and s.context._member == nil end"
                .into(),
        )
        .unwrap();
        let headers = vec![("channel_id".to_owned(), "10".to_owned())];
        let view = event(&headers, b"");
        let context = Context::new([("roles".to_owned(), "none".to_owned())]);
        assert_eq!(
            evaluate(&set.get("poison").unwrap(), LIMITS, &view, 1, &context),
            Ok(true)
        );
        assert_eq!(
            evaluate(&set.get("reader").unwrap(), LIMITS, &view, 2, &context),
            Ok(true)
        );
    }

    #[test]
    fn loading_a_directory_keeps_the_old_version_when_the_new_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("allow.lua");
        std::fs::write(&file, "return function() return true end").unwrap();
        std::fs::write(dir.path().join("README.txt"), "not a filter").unwrap();
        let (set, report) = FilterSet::load(dir.path(), LIMITS);
        assert_eq!(report.loaded, vec!["allow".to_owned()]);
        assert!(report.failed.is_empty());
        let context = Context::new([]);
        assert_eq!(run(&set, "allow", &context), Ok(true));
        // A broken edit is refused and the old version keeps serving.
        std::fs::write(&file, "return function() return (end").unwrap();
        let report = set.reload();
        assert_eq!(report.failed.len(), 1);
        assert!(
            report.failed[0].message.contains("allow.lua:1:"),
            "{:?}",
            report.failed
        );
        assert_eq!(run(&set, "allow", &context), Ok(true));
        // A good edit replaces it.
        std::fs::write(&file, "return function() return false end -- now deny").unwrap();
        assert_eq!(set.reload().loaded, vec!["allow".to_owned()]);
        assert_eq!(run(&set, "allow", &context), Ok(false));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(set.reload().removed, vec!["allow".to_owned()]);
        assert!(set.get("allow").is_none());
    }

    #[test]
    fn a_batch_keeps_each_failure_to_its_own_subscription() {
        let set = set_with(
            "mixed",
            r#"return function(event, sub)
                 local mode = sub.context.mode
                 if mode == "error" then error("boom " .. sub.id) end
                 if mode == "loop" then while true do end end
                 if mode == "number" then return 42 end
                 if mode == "nil_error" then error(nil) end
                 if mode == "memory" then
                   local t = {} for i = 1, 1000 do t[i] = string.rep('x', 1048576) .. i end
                 end
                 return mode == "yes"
               end"#,
        );
        // 200 subscriptions (four words of verdicts) with failures first in a word,
        // last in a word, twice in one word, and in the last, partial word.
        let failing = [
            (0, "error"),
            (63, "loop"),
            (64, "number"),
            (70, "error"),
            (71, "memory"),
            (127, "loop"),
            (130, "nil_error"),
            (199, "error"),
        ];
        let contexts: Vec<Context> = (0..200)
            .map(|i| {
                let mode = failing
                    .iter()
                    .find(|(at, _)| *at == i)
                    .map_or(if i % 3 == 0 { "yes" } else { "no" }, |(_, mode)| mode);
                Context::new([
                    ("mode".to_owned(), mode.to_owned()),
                    ("n".to_owned(), i.to_string()),
                ])
            })
            .collect();
        let subscriptions: Vec<(u64, &Context)> = contexts
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u64, c))
            .collect();
        let headers = Vec::new();
        let filter = set.get("mixed").unwrap();
        // From the first subscription (the first call fails), and from the second
        // (the first failure is in the middle of a word).
        for skip in [0, 1] {
            let mut verdicts = Vec::new();
            evaluate_many(
                &filter,
                LIMITS,
                &event(&headers, b""),
                &subscriptions[skip..],
                &mut verdicts,
            );
            assert_eq!(verdicts.len(), 200 - skip);
            for (i, verdict) in verdicts.iter().enumerate() {
                let i = i + skip;
                match failing.iter().find(|(at, _)| *at == i) {
                    Some((_, mode)) => {
                        let expected = match *mode {
                            "error" => format!("boom {i}"),
                            "loop" => "budget".to_owned(),
                            "number" => "returned number, not a boolean".to_owned(),
                            "nil_error" => "raised nil".to_owned(),
                            _ => "memory limit".to_owned(),
                        };
                        match verdict {
                            Err(EvalError::Runtime(message)) => {
                                assert!(message.contains(&expected), "{i}: {message}")
                            }
                            other => panic!("{i}: expected {expected}, got {other:?}"),
                        }
                    }
                    None => assert_eq!(verdict, &Ok(i % 3 == 0), "subscription {i}"),
                }
            }
        }
        let stats = &filter.stats;
        assert_eq!(stats.evaluations.load(Ordering::Relaxed), 399);
        assert_eq!(
            stats.errors.load(Ordering::Relaxed),
            2 * failing.len() as u64 - 1
        );
        // The state serves the next batch normally.
        let mut verdicts = Vec::new();
        evaluate_many(
            &filter,
            LIMITS,
            &event(&headers, b""),
            &subscriptions[1..63],
            &mut verdicts,
        );
        assert!(
            verdicts
                .iter()
                .enumerate()
                .all(|(i, v)| *v == Ok((i + 1) % 3 == 0))
        );
    }

    #[test]
    fn shared_verdicts_judge_each_distinct_context_once() {
        let set = set_with(
            "count",
            r#"local calls = 0
               return function(event, sub)
                 calls = calls + 1
                 sub.context._calls = calls
                 return sub.context.role == "mod" and calls < 1000
               end"#,
        );
        let roles = ["mod", "member", "mod", "guest", "member", "mod"];
        let contexts: Vec<Context> = roles
            .iter()
            .map(|r| Context::new([("role".to_owned(), (*r).to_owned())]))
            .collect();
        let headers = Vec::new();
        let view = event(&headers, b"");
        let mut verdicts = SharedVerdicts::default();
        let judged = verdicts.judge(
            &set,
            &view,
            contexts
                .iter()
                .enumerate()
                .map(|(i, c)| ("count", c, i as u64))
                .chain([("missing", &contexts[0], 99)]),
        );
        let expected: Vec<bool> = roles.iter().map(|r| *r == "mod").chain([false]).collect();
        assert_eq!(judged, expected);
        let stats = &set.get("count").unwrap().stats;
        assert_eq!(stats.evaluations.load(Ordering::Relaxed), 3);
        // Later questions about the same record are answered without evaluating.
        for (i, context) in contexts.iter().enumerate() {
            assert_eq!(
                verdicts.allows(&set, "count", context, i as u64, &view),
                roles[i] == "mod"
            );
        }
        assert!(!verdicts.allows(&set, "missing", &contexts[0], 99, &view));
        assert_eq!(stats.evaluations.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_full_context_cache_is_emptied_between_batches_not_during_one() {
        let set = set_with(
            "parity",
            "return function(e, sub) return tonumber(sub.context.n) % 2 == 0 end",
        );
        let filter = set.get("parity").unwrap();
        let headers = Vec::new();
        // 15,000 contexts, then 10,000 others: more than the 20,000 a thread keeps.
        for range in [0..15_000u64, 15_000..25_000] {
            let contexts: Vec<Context> = range
                .clone()
                .map(|n| Context::new([("n".to_owned(), n.to_string())]))
                .collect();
            let subscriptions: Vec<(u64, &Context)> = range.clone().zip(contexts.iter()).collect();
            let mut verdicts = Vec::new();
            evaluate_many(
                &filter,
                LIMITS,
                &event(&headers, b""),
                &subscriptions,
                &mut verdicts,
            );
            for (n, verdict) in range.zip(&verdicts) {
                assert_eq!(verdict, &Ok(n % 2 == 0), "context {n}");
            }
        }
    }

    #[test]
    fn a_named_list_with_a_gap_shares_nothing() {
        let set = set_with(
            "gap",
            r#"return {
                 filter = function(e, sub) return sub.context.user ~= "3" end,
                 share = { field = "user", named = function() return { [1] = "1", [3] = "3" } end },
               }"#,
        );
        let contexts: Vec<Context> = (1..=4)
            .map(|u| {
                Context::new([
                    ("role".to_owned(), "a".to_owned()),
                    ("user".to_owned(), u.to_string()),
                ])
            })
            .collect();
        let headers = Vec::new();
        let judged = SharedVerdicts::default().judge(
            &set,
            &event(&headers, b""),
            contexts
                .iter()
                .enumerate()
                .map(|(i, c)| ("gap", c, i as u64)),
        );
        assert_eq!(judged, vec![true, true, false, true]);
        let stats = &set.get("gap").unwrap().stats;
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
        assert_eq!(stats.evaluations.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn equal_contexts_are_equal() {
        let a = Context::new([("roles".to_owned(), "1,2".to_owned())]);
        let b = Context::new([("roles".to_owned(), "1,2".to_owned())]);
        let c = Context::new([("roles".to_owned(), "1".to_owned())]);
        assert_eq!(a, b);
        assert_ne!(a.id(), b.id());
        assert_ne!(a, c);
    }
}
