//! ocelot-bench — the benchmark harness.
//!
//! `ocelot-bench pipeline` measures the classifier's batch entry point in memory on one core:
//! bursts of 64 frames of 64 bytes against a synthetic cluster (10,000 pods, 1,000 policies,
//! 100,000 routes by default), for established flows, new flows, denied flows and a table of
//! 1,000,000 live flows. It reports ns/packet, Mpps and a histogram of per-burst latency.
//!
//! `ocelot-bench control` measures the control path at cluster scale: the time from a write to
//! the (test) Kubernetes API server to the new snapshot being loaded by a worker, the full
//! list and compile, and resident memory (see `control`).
//!
//! `ocelot-bench xdp` measures whole devices on a veth testbed in network namespaces: the
//! ocelot agent, the kernel path and a bare AF_XDP forwarder, side by side (see `xdp`).
#![forbid(unsafe_code)]

mod control;
mod pipeline;
mod xdp;

/// Large tables (conntrack, routes) on transparent huge pages, as the agent will have them.
#[global_allocator]
static GLOBAL: dataplane::sys::HugePageAlloc = dataplane::sys::HugePageAlloc;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ocelot-bench", version, about = "ocelot's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The classifier pipeline in memory, one core, bursts of 64.
    Pipeline(pipeline::Args),
    /// pps, loss, CPU and latency of ocelot, the kernel path and a bare AF_XDP forwarder on a
    /// veth testbed in network namespaces it creates and removes (needs root).
    Xdp(xdp::Args),
    /// Update latency at cluster scale: API write to snapshot in the workers, through the
    /// real Kubernetes datastore against the in-process test API server.
    Control(control::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Pipeline(args) => pipeline::run(&args),
        Command::Xdp(args) => xdp::run(&args),
        Command::Control(args) => control::run(&args),
    }
}

/// Writes a subcommand's `--json` output.
fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(())
}
