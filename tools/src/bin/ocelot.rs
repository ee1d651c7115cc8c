//! ocelot — the node agent.
//!
//! `ocelot run --config FILE --manifests DIR [--status FILE]` runs the AF_XDP dataplane on
//! this node's pod interfaces with the manifests directory as its datastore (watched and
//! applied live). `ocelot lab --manifests DIR [--probes FILE]` builds a virtual node in
//! network namespaces, runs the agent on it, and probes with real traffic.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ocelot", version, about = "ocelot's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the dataplane on this node (in the current network namespace).
    Run {
        /// The TOML config (workers, cores, interfaces, AF_XDP settings).
        #[arg(long)]
        config: PathBuf,
        /// A manifests directory: the embedded datastore, watched for changes. May be given
        /// more than once (the directories are read as one set).
        #[arg(long, conflicts_with = "datastore")]
        manifests: Vec<PathBuf>,
        /// `kubernetes`: follow the API server (in-cluster service account or KUBECONFIG;
        /// the node's name from NODE_NAME). The default when running in a cluster and no
        /// `--manifests` is given.
        #[arg(long, value_parser = ["kubernetes"])]
        datastore: Option<String>,
        /// Writes the status JSON (epoch, counters) here every second.
        #[arg(long)]
        status: Option<PathBuf>,
        /// Serves Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Builds a virtual node with the manifests' pods and probes it with real traffic.
    Lab(tools::lab::LabArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OCELOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "ocelot: error: {e:#}");
        std::process::exit(1);
    }
}

/// Sets `stop` on SIGINT and SIGTERM.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    Ok(stop)
}

fn run(cli: Cli) -> Result<()> {
    let stop = stop_flag()?;
    match cli.command {
        Command::Run {
            config,
            manifests,
            datastore,
            status,
            metrics,
        } => {
            use tools::agent::source::Datastore;
            let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let datastore = match (datastore, manifests.is_empty()) {
                (Some(_), _) => Datastore::Kubernetes,
                (None, false) => Datastore::Manifests(manifests),
                (None, true) if in_cluster => Datastore::Kubernetes,
                (None, true) => {
                    anyhow::bail!("no datastore: give --manifests DIR, or --datastore kubernetes")
                }
            };
            tools::agent::run(
                &tools::agent::RunOptions {
                    config,
                    datastore,
                    status,
                    metrics,
                },
                &stop,
            )
        }
        Command::Lab(args) => tools::lab::run(&args, &stop),
    }
}
