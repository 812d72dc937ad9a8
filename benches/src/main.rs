//! `switchyard-bench`: Switchyard side by side with NATS core, NATS JetStream,
//! Redis Pub/Sub and Redis Streams, on one machine, in one invocation.
//!
//! `switchyard-bench run` starts a Switchyard broker (the `switchyard` binary next
//! to this one) and the peers (`benches/peers.sh`, which installs them from Debian
//! when missing), runs the scenarios against every system that supports them, and
//! writes `results.json`, `results.md` and SVG charts. `--smoke` runs every scenario
//! for a moment (CI: proves each still works; its figures mean nothing).

mod procfs;
mod report;
mod scenarios;
mod systems;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use report::Results;
use scenarios::Sizes;
use systems::{Kind, Peers, Systems};

/// The load generator allocates as the broker does (mimalloc), so that the system
/// allocator does not eat into the CPU that client and servers share.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "switchyard-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenarios against the systems and write the results.
    Run(Box<RunArgs>),
    /// Rewrite results.md and the charts from a results.json.
    Report {
        /// The results.json of an earlier run.
        #[arg(long)]
        from: PathBuf,
        /// Where to write results.md and the charts (default: next to --from).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

const SCENARIOS: [&str; 6] = [
    "throughput",
    "latency",
    "fanout",
    "filters",
    "many-topics",
    "restart",
];

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A few seconds per scenario, one repetition: proves every scenario works.
    #[arg(long)]
    smoke: bool,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    scenarios: Vec<String>,
    /// Systems to run, comma-separated (switchyard, switchyard-durable, nats,
    /// jetstream, redis-pubsub, redis-streams).
    #[arg(long, value_delimiter = ',', default_values_t = Kind::ALL.map(|k| k.label().to_owned()))]
    systems: Vec<String>,
    /// Repetitions of each measurement (default 3; smoke 1).
    #[arg(long)]
    reps: Option<usize>,
    /// How long each throughput and latency run publishes (default 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Payload sizes (bytes) of the throughput scenario.
    #[arg(long, value_delimiter = ',')]
    payloads: Option<Vec<usize>>,
    /// Topic counts for the many-topics scenario (the peers run the smallest).
    #[arg(long, value_delimiter = ',')]
    many_topics: Option<Vec<u64>>,
    /// Topic counts for the restart scenario.
    #[arg(long, value_delimiter = ',')]
    restart_topics: Option<Vec<u64>>,
    /// Subscriber streams in the fan-out scenario (default 100).
    #[arg(long)]
    fanout_streams: Option<usize>,
    /// Where results.json, results.md and the charts go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The switchyard binary (default: the one next to this binary).
    #[arg(long, env = "SWITCHYARD_BIN")]
    switchyard_bin: Option<PathBuf>,
    /// Where the servers keep their data (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Writes every latency repetition's batches to DIR/latency-SYSTEM-LOAD-REP.tsv:
    /// when each arrived, how many records, and its worst latency (to find the
    /// stalls behind a p99).
    #[arg(long, value_name = "DIR")]
    latency_trace: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The load generator turns transparent huge pages off for itself: mimalloc asks
    // for them on its arenas, and khugepaged, collapsing them, held the process's
    // memory map for milliseconds at a time, stalling the load generator's page
    // faults — the same for every system measured (docs/benchmarks.md, "Nineteenth
    // session"). The servers it starts get the machine's setting back
    // (`systems::machine_thp`).
    systems::remember_thp();
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("could not turn transparent huge pages off: {error}");
    }
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(run(*args))),
        Command::Report { from, out } => report(&from, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(from: &Path, out: Option<&Path>) -> Result<()> {
    let results = Results::load(from)?;
    let dir = out
        .map(Path::to_path_buf)
        .or_else(|| from.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    results.write(&dir)?;
    print!("{}", results.markdown());
    Ok(())
}

/// Broker settings read from the environment by `switchyard serve` that the harness
/// leaves to whoever runs it (it sets the listen addresses, directories, and the
/// per-stream limits itself).
const BROKER_SETTINGS: &[&str] = &[
    "SWITCHYARD_SHARDS",
    "SWITCHYARD_SEGMENT_MIB",
    "SWITCHYARD_FSYNC",
    "SWITCHYARD_RETENTION_MIB",
    "SWITCHYARD_RETENTION_AGE",
    "SWITCHYARD_MAX_RECORD_KIB",
    "SWITCHYARD_DISK_BUDGET_MIB",
    "SWITCHYARD_PAGE_CACHE_MIB_PER_SHARD",
    "SWITCHYARD_MAX_STREAMS",
    "SWITCHYARD_FILTERS_RELOAD",
    "SWITCHYARD_FILTER_INSTRUCTIONS",
    "SWITCHYARD_FILTER_MEMORY_MIB",
];

/// The command that reproduces the run: the broker settings given in the
/// environment, then the arguments, each quoted for a shell where it needs it.
fn command_line(
    vars: impl Iterator<Item = (String, String)>,
    args: impl Iterator<Item = String>,
) -> String {
    fn quoted(word: &str) -> String {
        let plain = !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
        if plain {
            word.to_owned()
        } else {
            format!("'{}'", word.replace('\'', "'\\''"))
        }
    }
    let mut settings: Vec<String> = vars
        .filter(|(name, _)| BROKER_SETTINGS.contains(&name.as_str()))
        .map(|(name, value)| format!("{name}={}", quoted(&value)))
        .collect();
    settings.sort();
    settings
        .into_iter()
        .chain(args.map(|arg| quoted(&arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Free space in the work directory before each measurement of a measured run: a
/// throughput repetition writes up to 3 s of records (about 2 GB at 1 KiB), kept
/// with the earlier repetitions' until the scenario ends, and JetStream and Redis
/// keep theirs too.
const MIN_FREE_MEASURED: u64 = 6 << 30;
/// The same for a smoke run, which writes a few megabytes.
const MIN_FREE_SMOKE: u64 = 256 << 20;

fn switchyard_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .join("switchyard"),
    };
    if !path.is_file() {
        bail!(
            "no switchyard binary at {} (build it: cargo build --release --bin switchyard, or pass --switchyard-bin)",
            path.display()
        );
    }
    Ok(path)
}

async fn run(args: RunArgs) -> Result<()> {
    let mut sizes = if args.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    if let Some(reps) = args.reps {
        sizes.reps = reps.max(1);
    }
    if let Some(duration) = args.duration {
        sizes.duration = duration;
    }
    if let Some(payloads) = args.payloads {
        sizes.payloads = payloads;
    }
    if let Some(counts) = args.many_topics {
        sizes.many_topics = counts;
    }
    if let Some(counts) = args.restart_topics {
        sizes.restart_topics = counts;
    }
    if sizes.many_topics.contains(&0) || sizes.restart_topics.contains(&0) {
        bail!("--many-topics and --restart-topics take topic counts of at least 1");
    }
    if let Some(streams) = args.fanout_streams {
        sizes.fanout_streams = streams.max(1);
    }
    if let Some(dir) = &args.latency_trace {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        sizes.latency_trace = Some(dir.clone());
    }
    for scenario in &args.scenarios {
        if !SCENARIOS.contains(&scenario.as_str()) {
            bail!(
                "unknown scenario {scenario:?} (known: {})",
                SCENARIOS.join(", ")
            );
        }
    }
    let kinds = args
        .systems
        .iter()
        .map(|s| Kind::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);

    let mut signals = StopSignals::install()?;
    let temp = tempfile::Builder::new()
        .prefix("switchyard-bench")
        .tempdir()?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let filters_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua-filters");
    let mut systems = Systems {
        switchyard: None,
        peers: None,
        switchyard_binary: switchyard_binary(args.switchyard_bin.clone())?,
        filters_dir,
        work_dir: work_dir.clone(),
        min_free: if args.smoke {
            MIN_FREE_SMOKE
        } else {
            MIN_FREE_MEASURED
        },
    };
    systems::check_free_space(&work_dir, systems.min_free)?;
    // Stops the peers however the run ends (an error, a panic): by the PIDs in
    // their directory, which restarts keep current.
    let _peers_guard = PeersGuard(work_dir.join("peers"));
    if kinds.iter().any(|k| !k.is_switchyard()) {
        eprintln!("starting the peers (benches/peers.sh)");
        systems.peers = Some(Peers::start(&work_dir.join("peers"))?);
    }
    // A run stopped by a signal stops its servers and removes its temporary
    // directory like one that failed: each leaves gigabytes behind otherwise.
    let result = tokio::select! {
        biased;
        signal = signals.recv() => Err(anyhow::anyhow!("stopped by {signal}")),
        result = run_scenarios(&mut systems, &kinds, &sizes, &wants, args.smoke) => result,
    };
    if let Some(peers) = &systems.peers {
        peers.stop()?;
    }
    systems.switchyard = None;
    let mut results = result?;
    results.command = command_line(std::env::vars(), std::env::args());
    results.write(&args.out)?;
    print!("{}", results.markdown());
    eprintln!("results in {}", args.out.display());
    Ok(())
}

/// SIGINT and SIGTERM, caught from the start of a run: one that arrives while the
/// peers are being installed or a server is starting is acted on as soon as the
/// run gets back to its scenarios. (SIGHUP is left alone, so that a run started
/// with `nohup` outlives its terminal.)
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
        })
    }

    /// The first of them to arrive.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Stops the peers started in a directory when dropped.
struct PeersGuard(PathBuf);

impl Drop for PeersGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Peers::stop_dir(&self.0);
        }
    }
}

async fn run_scenarios(
    systems: &mut Systems,
    kinds: &[Kind],
    sizes: &Sizes,
    wants: &dyn Fn(&str) -> bool,
    smoke: bool,
) -> Result<Results> {
    let mut results = Results {
        smoke,
        machine: procfs::machine(),
        ..Default::default()
    };
    let switchyard = kinds.iter().any(|k| k.is_switchyard());
    if switchyard {
        systems.fresh_switchyard()?;
    }
    let started = Instant::now();
    let stage = |name: &str| eprintln!("== {name} ({:.0} s in)", started.elapsed().as_secs_f64());
    if wants("throughput") || wants("latency") {
        stage("throughput");
        scenarios::throughput(systems, kinds, sizes, &mut results).await?;
    }
    if wants("latency") {
        stage("latency");
        scenarios::latency(systems, kinds, sizes, &mut results).await?;
    }
    if wants("fanout") {
        stage("fanout");
        scenarios::fanout(systems, kinds, sizes, &mut results).await?;
    }
    if wants("filters") && switchyard {
        stage("filters");
        scenarios::filters(systems, sizes, &mut results).await?;
    }
    if wants("many-topics") {
        stage("many-topics");
        scenarios::many_topics(systems, kinds, sizes, &mut results).await?;
    }
    if wants("restart") {
        stage("restart");
        scenarios::restart(systems, kinds, sizes, &mut results).await?;
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_broker_settings_and_quotes_words() {
        let vars = [
            ("SWITCHYARD_PAGE_CACHE_MIB_PER_SHARD", "64"),
            ("SWITCHYARD_FSYNC", "interval:5ms"),
            // Set by the harness itself, or not a broker setting: left out.
            ("SWITCHYARD_MAX_PENDING_MIB_PER_STREAM", "1"),
            ("SWITCHYARD_BIN", "/x"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let args = ["./switchyard-bench", "run", "--out", "it's here"].map(String::from);
        assert_eq!(
            command_line(vars.into_iter(), args.into_iter()),
            "SWITCHYARD_FSYNC=interval:5ms SWITCHYARD_PAGE_CACHE_MIB_PER_SHARD=64 \
             ./switchyard-bench run --out 'it'\\''s here'"
        );
    }
}
