//! ocelotctl — the operator's CLI.
//!
//! `ocelotctl policy verdicts --manifests DIR [--probes FILE|-] [--ascii]` answers probes
//! (JSON lines in, JSON lines out) or, without probes, prints a pod-to-pod matrix per
//! declared port; `ocelotctl policy compile --manifests DIR` summarizes what the policy
//! compiler made of a directory. Results go to stdout, warnings to stderr; any invalid input
//! exits non-zero with the chain of what failed.
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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
