//! ocelotctl — the operator's CLI.
//!
//! `ocelotctl policy verdicts --manifests DIR [--probes FILE|-] [--ascii]` answers probes
//! (JSON lines in, JSON lines out) or, without probes, prints a pod-to-pod matrix per
//! declared port; `ocelotctl policy compile --manifests DIR` summarizes what the policy
//! compiler made of a directory. `ocelotctl status --file FILE` reads a running agent's
//! status file (counters, drops by reason) and exits non-zero when the agent is not ready.
//! Results go to stdout, warnings to stderr; any invalid input exits non-zero with the chain
//! of what failed.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use control::manifests::{Manifests, load_dir};
use control::verdicts::{Evaluator, parse_probes};

#[derive(Debug, Parser)]
#[command(name = "ocelotctl", version, about = "ocelot's operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// NetworkPolicy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Reads a running agent's status file (`ocelot run --status FILE`): the snapshot in
    /// force, the datastore's health and every worker's counters with drops by reason. Exits
    /// non-zero when the agent is not ready: the file is older than `--max-age-seconds`, the
    /// agent has stopped, or (Kubernetes datastore) its view is staler than
    /// `--max-stale-seconds`. Fit for a readiness probe.
    Status {
        /// The status file.
        #[arg(long)]
        file: PathBuf,
        /// How old the file may be (the agent rewrites it every second).
        #[arg(long, default_value_t = 10)]
        max_age_seconds: u64,
        /// How stale the Kubernetes view may be (ignored for a manifests datastore).
        #[arg(long)]
        max_stale_seconds: Option<f64>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Answers "would this connection be allowed?" from manifests, through the compiled table.
    Verdicts {
        /// Directory of manifests (*.yaml, *.yml, *.json; not recursive).
        #[arg(long)]
        manifests: PathBuf,
        /// JSON-lines probes ({"src","dst","port","protocol"}); `-` reads stdin. Without it,
        /// prints a matrix per declared port.
        #[arg(long)]
        probes: Option<PathBuf>,
        /// Draw the matrix with `.` and `X` instead of ✓ and ✗.
        #[arg(long)]
        ascii: bool,
    },
    /// Compiles the manifests and prints a summary.
    Compile {
        /// Directory of manifests (*.yaml, *.yml, *.json; not recursive).
        #[arg(long)]
        manifests: PathBuf,
    },
}

fn load(dir: &Path) -> Result<Manifests> {
    let m = load_dir(dir).with_context(|| format!("loading manifests from {}", dir.display()))?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    Ok(m)
}

fn read_probes(path: &Path) -> Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading probes from stdin")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading probes from {}", path.display()))?;
    }
    Ok(text)
}

fn verdicts(dir: &Path, probes: Option<&Path>, ascii: bool) -> Result<()> {
    let manifests = load(dir)?;
    let evaluator = Evaluator::new(&manifests);
    for e in &evaluator.compile_errors {
        eprintln!("warning: compile error (selected pods fail closed): {e}");
    }
    let mut out = std::io::stdout().lock();
    match probes {
        Some(path) => {
            let text = read_probes(path)?;
            let what = || format!("probes from {}", path.display());
            let probes = parse_probes(&text).with_context(what)?;
            // Every probe is answered before anything is printed, so a bad line yields no
            // partial output that a script might mistake for a complete answer.
            let results = probes
                .iter()
                .map(|p| evaluator.probe(p))
                .collect::<Result<Vec<_>, _>>()
                .with_context(what)?;
            for r in results {
                writeln!(out, "{}", r.to_json_line())?;
            }
        }
        None => {
            let matrices = evaluator.matrices();
            if matrices.is_empty() {
                eprintln!("warning: no pod declares a container port; nothing to show");
            }
            for (i, m) in matrices.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                write!(out, "{}", m.render(ascii))?;
            }
        }
    }
    Ok(())
}

fn compile(dir: &Path) -> Result<()> {
    let manifests = load(dir)?;
    let evaluator = Evaluator::new(&manifests);
    let c = &manifests.cluster;
    let endpoints = c
        .pods
        .iter()
        .flat_map(|p| p.ips.iter())
        .filter(|ip| evaluator.endpoint(**ip).is_some())
        .count();
    let mut out = std::io::stdout().lock();
    writeln!(out, "namespaces: {}", c.namespaces.len())?;
    writeln!(out, "pods: {}", c.pods.len())?;
    writeln!(out, "policies: {}", c.policies.len())?;
    writeln!(out, "endpoints: {endpoints}")?;
    writeln!(out, "compile errors: {}", evaluator.compile_errors.len())?;
    for e in &evaluator.compile_errors {
        writeln!(out, "  {e}")?;
    }
    Ok(())
}

/// Prints the status file and checks readiness.
/// A status file's `drops` object as `reason=n …`, or `none`.
fn drops_text(drops: &serde_json::Value) -> String {
    tools::agent::status::pairs_text(drops.as_object().into_iter().flatten())
}

fn status(file: &Path, max_age: u64, max_stale: Option<f64>) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let s: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a status file", file.display()))?;
    let age = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(0, |d| d.as_secs());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "node {} · epoch {} · datastore {} · written {age} s ago{}",
        s["node"].as_str().unwrap_or("?"),
        s["epoch"],
        s["datastore"]["datastore"].as_str().unwrap_or("?"),
        if s["stopped"] == true {
            " · STOPPED"
        } else {
            ""
        }
    )?;
    if let Some(e) = s["last_error"].as_str() {
        writeln!(out, "last load error ({} so far): {e}", s["load_errors"])?;
    }
    for w in s["workers"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "worker on core {}: rx {} tx {} forwarded {} replied {} · drops: {}",
            w["core"],
            w["rx"],
            w["tx"],
            w["forwarded"],
            w["replied"],
            drops_text(&w["drops"])
        )?;
    }
    let report = &s["report"];
    for key in [
        "pods_without_port",
        "pods_without_mac",
        "orphan_ports",
        "unresolved_next_hops",
        "compile_errors",
    ] {
        if let Some(list) = report[key].as_array().filter(|l| !l.is_empty()) {
            writeln!(out, "{key}: {}", serde_json::Value::Array(list.clone()))?;
        }
    }
    let h = &s["host_path"];
    if h.is_object() {
        writeln!(
            out,
            "host path {}: node → pods {} (forwarded {}) · pods → node {} · drops: {}",
            h["interface"].as_str().unwrap_or("?"),
            h["rx"],
            h["handoff_out"],
            h["handoff_in"],
            drops_text(&h["drops"])
        )?;
    }
    for u in s["unknown_pods"].as_array().into_iter().flatten() {
        let addresses: Vec<&str> = u["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        writeln!(
            out,
            "unknown pod interface {} (port {}, {}, addresses: {}): pending its pod for {:.0} s",
            u["interface"].as_str().unwrap_or("?"),
            u["port"],
            u["treatment"].as_str().unwrap_or("?"),
            if addresses.is_empty() {
                "none".to_owned()
            } else {
                addresses.join(" ")
            },
            u["pending_seconds"].as_f64().unwrap_or(0.0)
        )?;
    }
    if s["stopped"] == true {
        anyhow::bail!("the agent has stopped");
    }
    if age > max_age {
        anyhow::bail!(
            "the status file is {age} s old (more than {max_age}): is the agent running?"
        );
    }
    if let (Some(limit), Some(stale)) = (max_stale, s["datastore"]["stale_seconds"].as_f64())
        && stale > limit
    {
        anyhow::bail!("the Kubernetes view is {stale:.0} s stale (more than {limit})");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OCELOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Policy(PolicyCommand::Verdicts {
            manifests,
            probes,
            ascii,
        }) => verdicts(manifests, probes.as_deref(), *ascii),
        Command::Policy(PolicyCommand::Compile { manifests }) => compile(manifests),
        Command::Status {
            file,
            max_age_seconds,
            max_stale_seconds,
        } => status(file, *max_age_seconds, *max_stale_seconds),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
