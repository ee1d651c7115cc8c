//! `ocelot lab`: one virtual node, built from a manifests directory, probed with real traffic.
//!
//! In network namespaces it creates (unique names, removed on every exit path by RAII, also
//! on Ctrl-C and panic) the lab builds a node namespace and, for every pod of the manifests
//! with an IPv4 address, a pod namespace shaped the way Calico shapes one: `eth0` with the
//! pod's /32, a link route to 169.254.1.1 and the default route via it, transmit checksum
//! offload off, and the host side of the veth in the node namespace under Calico's name
//! ([`control::naming::veth_name`]). Pods resolve the gateway with ARP, so the dataplane's
//! proxy-ARP answers them. It then runs the real agent (`ocelot run`, a separate process) in
//! the node namespace, a TCP listener and a UDP echo responder in every pod on every port
//! probed, and the probes:
//!
//! - TCP: a connect from the source pod's namespace; established (or refused by the peer's
//!   kernel, which also proves the path) is `allow`, a timeout is `deny`;
//! - UDP: a datagram to the echo responder; an echo (or an ICMP port unreachable) is
//!   `allow`, silence after three tries is `deny`;
//! - SCTP: this kernel has no SCTP sockets, so a crafted SCTP INIT is sent from the source
//!   pod through a raw socket, and the probe is `allow` when the destination pod's kernel
//!   counts an arrival (`/proc/net/snmp` `InUnknownProtos`, or SCTP's own counter where the
//!   module exists). The output says so.
//!
//! Output is exactly `ocelotctl policy verdicts`'s: JSON lines echoing each probe with the
//! `"verdict"` the traffic showed, or (without probes) one matrix per declared port. A summary
//! line on stderr counts probes, allowed, denied, probes where traffic disagreed with the
//! compiled policy, and the time taken; any disagreement makes the exit status non-zero.

mod multinode;
mod probe;
mod topology;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use classifier::policy::Protocol;
use control::manifests::{Manifests, load_dir};
use control::verdicts::{Evaluator, Matrix, OrderedObject, Probe, ProbeResult, Verdict};

pub use self::probe::ProbeOutcome;
pub use self::topology::{Endpoint, Lab, LabOptions, UPLINK};

/// `ocelot lab` arguments.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Directory of manifests (pods with `status.podIPs`, namespaces, policies).
    #[arg(long)]
    pub manifests: PathBuf,
    /// JSON-lines probes, as for `ocelotctl policy verdicts`; `-` reads stdin. Without it,
    /// every pod pair on every declared port, printed as matrices.
    #[arg(long)]
    pub probes: Option<PathBuf>,
    /// Draw matrices with `.` and `X`.
    #[arg(long)]
    pub ascii: bool,
    /// Workers of the agent (each pinned to its own core; pods are spread over them).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// How long a probe waits for an answer, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Virtual nodes: with 2 or more, each node runs its own agent and the nodes are
    /// joined by a router (the plain-L3 fabric), which also plays the outside world.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Queues of each node's uplink (with --nodes 2 or more); spread over the workers.
    #[arg(long, default_value_t = 1)]
    pub uplink_queues: u32,
    /// The agents' treatment of a pod's new connections to its own node (after the pod's
    /// egress policy): `drop` (Calico's default) or `accept`.
    #[arg(long, value_enum, default_value_t = PodToHostArg::Drop)]
    pub pod_to_host: PodToHostArg,
    /// Show the agent's log.
    #[arg(long)]
    pub verbose: bool,
}

/// `--pod-to-host`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodToHostArg {
    /// Calico's default.
    Drop,
    /// After the pod's egress policy.
    Accept,
}

/// Runs `ocelot lab`.
pub fn run(args: &LabArgs, stop: &Arc<AtomicBool>) -> Result<()> {
    let started = Instant::now();
    let mut manifests = load_dir(&args.manifests)
        .with_context(|| format!("loading manifests from {}", args.manifests.display()))?;
    // (pod address, its node's address).
    let mut own_node: Vec<(IpAddr, IpAddr)> = Vec::new();
    if args.nodes > 1 {
        // Expected verdicts come from the same objects the agents read: the user's manifests
        // and the lab's Node objects (so probes may name `node:NAME`).
        let plan = multinode::plan(&manifests, args.nodes)?;
        let mut texts = Vec::new();
        for f in crate::agent::source::manifest_files(&args.manifests)? {
            texts.push((f.clone(), std::fs::read_to_string(&f)?));
        }
        // A pod's traffic to its own node's address meets the node's pod-to-host setting
        // after policy; the node's traffic to its own pods is always allowed.
        for p in &manifests.cluster.pods {
            if let Some(k) = plan.pod_node.get(&format!("{}/{}", p.namespace, p.name)) {
                for ip in &p.ips {
                    own_node.push((*ip, IpAddr::V4(multinode::node_ip(*k))));
                }
            }
        }
        texts.push((PathBuf::from("lab-nodes.yaml"), plan.yaml));
        manifests = Manifests::from_texts(texts.iter().map(|(p, t)| (p.clone(), t.as_str())))?;
    }
    for w in &manifests.warnings {
        eprintln!("warning: {w}");
    }
    let evaluator = Evaluator::new(&manifests);
    for e in &evaluator.compile_errors {
        eprintln!("warning: compile error (selected pods fail closed): {e}");
    }
    let probes = match &args.probes {
        Some(path) => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("reading probes from stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading probes from {}", path.display()))?
            };
            control::verdicts::parse_probes(&text)
                .with_context(|| format!("probes from {}", path.display()))?
        }
        None => matrix_probes(&evaluator.matrices()),
    };
    // Every probe must resolve before anything is built.
    let mut expected = probes
        .iter()
        .map(|p| evaluator.probe(p))
        .collect::<Result<Vec<_>, _>>()
        .context("probes")?;
    let accept = args.pod_to_host == PodToHostArg::Accept;
    let (mut to_own_node, mut from_own_node) = (0, 0);
    for e in &mut expected {
        if own_node.contains(&(e.src_ip, e.dst_ip)) && e.verdict == Verdict::Allow && !accept {
            e.verdict = Verdict::Deny;
            to_own_node += 1;
        }
        if own_node.contains(&(e.dst_ip, e.src_ip)) && e.verdict == Verdict::Deny {
            e.verdict = Verdict::Allow;
            from_own_node += 1;
        }
    }
    if to_own_node > 0 {
        eprintln!(
            "note: {to_own_node} probes go from a pod to its own node's address: policy allows \
             them, and the node's pod-to-host default (drop, as Calico's) refuses them"
        );
    }
    if from_own_node > 0 {
        eprintln!(
            "note: {from_own_node} probes go from a node to its own pods, which Kubernetes \
             always allows (pods cannot block their node); policy alone would refuse them"
        );
    }
    let ports = probe::ports_to_serve(&manifests, &probes);
    let outside = outside_addresses(&manifests, &expected)?;
    let lab = Lab::start(&LabOptions {
        manifests: args.manifests.clone(),
        workers: args.workers,
        agent: agent_binary()?,
        verbose: args.verbose,
        serve: ports,
        outside,
        nodes: args.nodes.max(1),
        uplink_queues: args.uplink_queues.max(1),
        pod_to_host_accept: accept,
    })?;
    if probes.iter().any(|p| p.protocol == Protocol::Sctp) {
        eprintln!(
            "note: this kernel has no SCTP sockets; SCTP probes send a crafted SCTP INIT and \
             report allow when it reaches the destination pod"
        );
    }
    let outcomes = lab.probe_all(&expected, Duration::from_millis(args.timeout_ms), stop)?;
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let observed: Vec<ProbeResult> = expected
        .iter()
        .zip(&outcomes)
        .map(|(e, o)| ProbeResult {
            verdict: o.verdict,
            ..e.clone()
        })
        .collect();
    let status = lab.stop()?;
    let mut out = std::io::stdout().lock();
    match &args.probes {
        Some(_) => {
            for r in &observed {
                writeln!(out, "{}", r.to_json_line())?;
            }
        }
        None => {
            let matrices = evaluator.matrices();
            if matrices.is_empty() {
                eprintln!("warning: no pod declares a container port; nothing to show");
            }
            let mut k = 0;
            for (i, m) in matrices.iter().enumerate() {
                let mut seen = m.clone();
                for row in &mut seen.allowed {
                    for cell in row.iter_mut() {
                        *cell = observed.get(k).is_some_and(|r| r.verdict == Verdict::Allow);
                        k += 1;
                    }
                }
                if i > 0 {
                    writeln!(out)?;
                }
                write!(out, "{}", seen.render(args.ascii))?;
            }
        }
    }
    out.flush()?;
    let allowed = observed
        .iter()
        .filter(|r| r.verdict == Verdict::Allow)
        .count();
    let differ: Vec<&ProbeResult> = observed
        .iter()
        .zip(&expected)
        .filter(|(o, e)| o.verdict != e.verdict)
        .map(|(o, _)| o)
        .collect();
    eprintln!(
        "lab: {} probes, {allowed} allowed, {} denied, {} differ from the compiled policy, {:.1} s \
         (agent: {})",
        observed.len(),
        observed.len() - allowed,
        differ.len(),
        started.elapsed().as_secs_f64(),
        status
    );
    if !differ.is_empty() {
        for d in &differ {
            eprintln!("differs: {} (policy says otherwise)", d.to_json_line());
        }
        bail!(
            "traffic disagreed with the compiled policy on {} probes",
            differ.len()
        );
    }
    Ok(())
}

/// Addresses probes use that belong to no pod: the outside host gets them.
pub fn outside_addresses(manifests: &Manifests, probes: &[ProbeResult]) -> Result<Vec<Ipv4Addr>> {
    let pod_ips: BTreeSet<IpAddr> = manifests
        .cluster
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().copied())
        .chain(
            manifests
                .nodes
                .iter()
                .flat_map(|n| n.internal_ips.iter().copied()),
        )
        .collect();
    let mut out = BTreeSet::new();
    for p in probes {
        for ip in [p.src_ip, p.dst_ip] {
            if pod_ips.contains(&ip) {
                continue;
            }
            match ip {
                IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() && !a.is_multicast() => {
                    out.insert(a);
                }
                _ => bail!(
                    "probe line {}: {ip} cannot be given to the lab's outside host",
                    p.probe.line
                ),
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// The probes behind a set of matrices, row by row.
pub fn matrix_probes(matrices: &[Matrix]) -> Vec<Probe> {
    let mut probes = Vec::new();
    for m in matrices {
        for src in &m.pods {
            for dst in &m.pods {
                let fields = OrderedObject(vec![
                    ("src".into(), serde_json::Value::String(src.clone())),
                    ("dst".into(), serde_json::Value::String(dst.clone())),
                    ("port".into(), serde_json::Value::from(m.port)),
                    (
                        "protocol".into(),
                        serde_json::Value::String(m.protocol.as_str().into()),
                    ),
                ]);
                probes.push(Probe {
                    line: probes.len() + 1,
                    src: src.clone(),
                    dst: dst.clone(),
                    port: m.port,
                    protocol: m.protocol,
                    fields,
                });
            }
        }
    }
    probes
}

/// The `ocelot` binary to run the agent with: this executable when it is `ocelot`, else
/// `ocelot` next to it.
pub fn agent_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the running executable")?;
    if me.file_name().is_some_and(|n| n == "ocelot") {
        return Ok(me);
    }
    let next = me.with_file_name("ocelot");
    if next.is_file() {
        Ok(next)
    } else {
        Err(anyhow!("no ocelot binary next to {}", me.display()))
    }
}

/// Loads a manifests directory (for callers that drive a [`Lab`] themselves).
pub fn load(dir: &Path) -> Result<Manifests> {
    load_dir(dir).with_context(|| format!("loading manifests from {}", dir.display()))
}
