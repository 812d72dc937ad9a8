//! `switchyard serve`: flags (each with an environment variable), their validation
//! into the store's and server's settings, and the broker's life.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use std::sync::Arc;

use switchyard_broker::filter::{FilterLimits, FilterSet};
use switchyard_broker::server::{self, ServerConfig};
use switchyard_broker::storage::{FsyncPolicy, Retention, Store, StoreConfig};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Address for the gRPC API.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address for Prometheus metrics (/metrics) and /health; "off" to disable.
    #[arg(
        long,
        env = "SWITCHYARD_METRICS_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    metrics_listen: String,
    /// Shards of a new data directory (fixed once it exists).
    #[arg(long, env = "SWITCHYARD_SHARDS", default_value_t = 16)]
    shards: u32,
    /// Size of a segment file, in MiB.
    #[arg(long, env = "SWITCHYARD_SEGMENT_MIB", default_value_t = 64)]
    segment_mib: u64,
    /// When data is synced to disk: "always", "never", or "interval:DURATION" (e.g.
    /// interval:5ms). Durable acknowledgements always wait for a sync.
    #[arg(long, env = "SWITCHYARD_FSYNC", default_value = "interval:5ms")]
    fsync: String,
    /// Keep at most this many MiB of segments per shard; 0 for no limit.
    #[arg(long, env = "SWITCHYARD_RETENTION_MIB", default_value_t = 4096)]
    retention_mib: u64,
    /// Drop segments whose newest record is older than this (e.g. 7d, 12h); "off" for
    /// no limit.
    #[arg(long, env = "SWITCHYARD_RETENTION_AGE", default_value = "7d")]
    retention_age: String,
    /// Largest record accepted (encoded), in KiB.
    #[arg(long, env = "SWITCHYARD_MAX_RECORD_KIB", default_value_t = 1024)]
    max_record_kib: u64,
    /// Page-cache window per shard, in MiB: after each sync, synced data further
    /// behind the shard's tail is dropped from the page cache (in steps of 4 MiB; a
    /// reader that needs it reads it back from disk). "off" leaves the page cache to
    /// the kernel. See docs/storage-format.md, "Page cache".
    #[arg(
        long,
        env = "SWITCHYARD_PAGE_CACHE_MIB_PER_SHARD",
        default_value = "off"
    )]
    page_cache_mib_per_shard: String,
    /// Refuse appends once segment files would take more than this many MiB in all.
    #[arg(long, env = "SWITCHYARD_DISK_BUDGET_MIB")]
    disk_budget_mib: Option<u64>,
    /// MiB of deliveries that may wait for one subscriber stream before it is cut off
    /// as a slow consumer.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_PENDING_MIB_PER_STREAM",
        default_value_t = 8
    )]
    max_pending_mib_per_stream: usize,
    /// Subscriber streams served at once.
    #[arg(long, env = "SWITCHYARD_MAX_STREAMS", default_value_t = 10_000)]
    max_streams: usize,
    /// Subscriptions one stream may hold.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_SUBSCRIPTIONS_PER_STREAM",
        default_value_t = 1_000_000
    )]
    max_subscriptions_per_stream: usize,
    /// Directory of Lua delivery filters (NAME.lua is filter NAME); missing is fine.
    #[arg(long, env = "SWITCHYARD_FILTERS_DIR", default_value = "lua-filters")]
    filters_dir: PathBuf,
    /// How often to look for changed filter files (e.g. 2s); "off" to reload only on
    /// request (`switchyard filter reload`).
    #[arg(long, env = "SWITCHYARD_FILTERS_RELOAD", default_value = "2s")]
    filters_reload: String,
    /// Lua instructions one filter call may run.
    #[arg(
        long,
        env = "SWITCHYARD_FILTER_INSTRUCTIONS",
        default_value_t = 100_000
    )]
    filter_instructions: u32,
    /// Memory of each thread's Lua state, in MiB.
    #[arg(long, env = "SWITCHYARD_FILTER_MEMORY_MIB", default_value_t = 64)]
    filter_memory_mib: usize,
    /// Keep transparent huge pages on for the broker's process. By default the broker
    /// turns them off for itself (as Redis does): the kernel's khugepaged, collapsing
    /// the allocator's pages into huge ones, holds the process's memory map and
    /// stalls every thread that faults a page meanwhile (milliseconds, measured in
    /// docs/benchmarks.md, "Nineteenth session").
    #[arg(long, env = "SWITCHYARD_TRANSPARENT_HUGE_PAGES")]
    transparent_huge_pages: bool,
}

/// The settings, checked.
#[derive(Debug)]
struct Settings {
    store: StoreConfig,
    server: ServerConfig,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    filters_dir: PathBuf,
    filters_reload: Option<Duration>,
    filter_limits: FilterLimits,
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{text:?} is not a duration (try 5ms, 10s, 7d)"))
}

/// A duration, or `None` for "off".
fn optional_duration(text: &str) -> anyhow::Result<Option<Duration>> {
    match text {
        "off" => Ok(None),
        duration => parse_duration(duration).map(Some),
    }
}

impl ServeArgs {
    fn validate(self) -> anyhow::Result<Settings> {
        let fsync = match self.fsync.as_str() {
            "always" => FsyncPolicy::Always,
            "never" => FsyncPolicy::Never,
            other => match other.strip_prefix("interval:") {
                Some(every) => FsyncPolicy::Interval(parse_duration(every)?),
                None => bail!("--fsync must be always, never or interval:DURATION, not {other:?}"),
            },
        };
        let retention_age = optional_duration(&self.retention_age)?;
        let filters_reload = optional_duration(&self.filters_reload)?;
        let metrics_listen = match self.metrics_listen.as_str() {
            "off" => None,
            address => Some(
                address
                    .parse()
                    .with_context(|| format!("--metrics-listen {address:?} is not an address"))?,
            ),
        };
        let mut store = StoreConfig::new(self.data_dir);
        store.shard_count = self.shards;
        store.segment_bytes = self.segment_mib << 20;
        store.max_record_bytes = self.max_record_kib << 10;
        store.max_batch_bytes = store
            .max_batch_bytes
            .min(switchyard_broker::storage::config::batch_room(
                store.segment_bytes,
            ))
            .max(store.max_record_bytes);
        store.fsync = fsync;
        store.retention = Retention {
            max_bytes: (self.retention_mib > 0).then_some(self.retention_mib << 20),
            max_age: retention_age,
        };
        store.disk_budget_bytes = self.disk_budget_mib.map(|mib| mib << 20);
        store.page_cache_per_shard = match self.page_cache_mib_per_shard.as_str() {
            "off" => None,
            mib => Some(
                mib.parse::<u64>()
                    .ok()
                    .and_then(|mib| mib.checked_mul(1 << 20))
                    .with_context(|| {
                        format!("--page-cache-mib-per-shard must be a number of MiB or \"off\", not {mib:?}")
                    })?,
            ),
        };
        store.validate()?;
        Ok(Settings {
            store,
            server: ServerConfig {
                max_pending_bytes_per_stream: self.max_pending_mib_per_stream << 20,
                max_streams: self.max_streams,
                max_subscriptions_per_stream: self.max_subscriptions_per_stream,
                ..ServerConfig::default()
            },
            listen: self.listen,
            metrics_listen,
            filters_dir: self.filters_dir,
            filters_reload,
            filter_limits: FilterLimits {
                instructions: self.filter_instructions,
                memory_bytes: self.filter_memory_mib << 20,
            },
        })
    }
}

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("ctrl-c: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`; the
/// processes it starts inherit it). mimalloc asks for huge pages on its arenas
/// (`MADV_HUGEPAGE`), so on a machine set to `madvise` or `always` khugepaged keeps
/// collapsing the broker's freshly freed and reused pages, each time holding the
/// memory-map lock that every page fault of the process needs.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(%error, "could not turn transparent huge pages off");
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() {}

/// Turns transparent huge pages off for the broker unless `--transparent-huge-pages`.
pub fn transparent_huge_pages(args: &ServeArgs) {
    if !args.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = args.validate()?;
    let (filters, report) = FilterSet::load(&settings.filters_dir, settings.filter_limits);
    for error in &report.failed {
        tracing::error!(%error, "filter refused");
    }
    tracing::info!(dir = %settings.filters_dir.display(), loaded = ?report.loaded, "delivery filters");
    let filters = Arc::new(filters);
    settings.server.filters = filters.clone();
    let watcher = settings
        .filters_reload
        .map(|every| tokio::spawn(filters.clone().watch(every, std::future::pending())));
    let data_dir = settings.store.data_dir.clone();
    let store = Store::open(settings.store)
        .with_context(|| format!("opening the data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the gRPC address {}", settings.listen))?;
    let metrics = match settings.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the metrics address {address}"))?,
        ),
        None => None,
    };
    let grpc = listener.local_addr()?;
    let metrics_address = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(%grpc, ?metrics_address, data_dir = %data_dir.display(), "switchyard broker ready");
    // One plain line on stdout for people and scripts (tests read the address here).
    let metrics_text = metrics_address.map_or("off".to_owned(), |a| a.to_string());
    println!(
        "switchyard listening on {grpc} (metrics {metrics_text}), data in {}",
        data_dir.display()
    );
    server::run(
        listener,
        metrics,
        store.clone(),
        settings.server,
        shutdown_signal(),
    )
    .await?;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    tokio::task::spawn_blocking(move || store.close()).await??;
    Ok(())
}
