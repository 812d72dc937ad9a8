//! `switchyard`: run a broker, or talk to one from the command line.
//!
//! `main` parses the command line, sets up logging and hands over to `serve` (the
//! broker) or `client` (pub, sub, fetch, topic info).

mod client;
mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc rather than the system allocator: records are allocated on a shard's
/// writer thread and freed on the runtime's threads, which glibc's allocator serves
/// slowly (arena locks, consolidation); measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchyard: a message broker for the real-time gateway of a chat platform.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker: data in a local directory, gRPC and metrics on loopback by
    /// default. Stops cleanly on ctrl-c or SIGTERM (everything synced).
    Serve(serve::ServeArgs),
    /// Publish records to a topic: the PAYLOAD arguments, or else one record per line
    /// of standard input.
    Pub(client::PubArgs),
    /// Subscribe to topics and print each delivery on a line:
    /// `TOPIC OFFSET EPOCH [KEY=VALUE ...] PAYLOAD`.
    Sub(client::SubArgs),
    /// Print a range of a topic's history, one record per line (as `sub`).
    Fetch(client::FetchArgs),
    /// Inspect topics.
    Topic {
        #[command(subcommand)]
        command: client::TopicCommand,
    },
    /// Check, test and reload Lua delivery filters.
    Filter {
        #[command(subcommand)]
        command: client::FilterCommand,
    },
    /// Benchmark against NATS, JetStream and Redis: runs the `switchyard-bench`
    /// binary next to this one with these arguments (`switchyard bench run --help`).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = &cli.command {
        return bench(args);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Before the runtime's threads and the allocator's arenas are made.
    if let Command::Serve(args) = &cli.command {
        serve::transparent_huge_pages(args);
    }
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| match cli.command {
            Command::Serve(args) => runtime.block_on(serve::run(args)),
            Command::Pub(args) => runtime.block_on(client::publish(args)),
            Command::Sub(args) => runtime.block_on(client::subscribe(args)),
            Command::Fetch(args) => runtime.block_on(client::fetch(args)),
            Command::Topic { command } => runtime.block_on(client::topic(command)),
            Command::Filter { command } => runtime.block_on(client::filter(command)),
            Command::Bench { .. } => unreachable!("handled above"),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `switchyard bench ...`: the load generator is a binary of its own (it links the
/// peers' clients, which the broker does not need); run it with the same arguments.
fn bench(args: &[std::ffi::OsString]) -> ExitCode {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("switchyard-bench")))
        .filter(|path| path.is_file());
    let Some(binary) = binary else {
        eprintln!(
            "error: no switchyard-bench next to this binary; build it with \
             `cargo build --release -p switchyard-bench`"
        );
        return ExitCode::FAILURE;
    };
    match std::process::Command::new(&binary).args(args).status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: running {}: {error}", binary.display());
            ExitCode::FAILURE
        }
    }
}
