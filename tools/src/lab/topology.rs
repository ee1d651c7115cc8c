//! The lab's namespaces, its agent process and its pods' servers.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use classifier::policy::Protocol;
use control::naming::veth_name;
use control::verdicts::ProbeResult;
use dataplane::netns::{Netns, Pod, VethPair};

use super::probe::{self, ProbeOutcome, Servers};
use crate::agent::READY_LINE;
use crate::agent::source;

/// How long the agent may take to become ready.
const AGENT_START: Duration = Duration::from_secs(60);

/// What a lab is built from.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The manifests directory (the agent watches it: edits apply live).
    pub manifests: PathBuf,
    /// Agent workers (1 or more, each on its own core).
    pub workers: usize,
    /// The `ocelot` binary.
    pub agent: PathBuf,
    /// Copy the agent's log to stderr.
    pub verbose: bool,
    /// (protocol, port) pairs every pod serves (TCP listener, UDP echo).
    pub serve: BTreeSet<(Protocol, u16)>,
    /// Addresses that belong to no pod but that probes use: the lab gives them to an
    /// "outside" host behind the node's uplink (behind the router with several nodes).
    pub outside: Vec<Ipv4Addr>,
    /// Virtual nodes (1: pods and the outside host on one node; 2 or more: nodes joined by
    /// a router, see [`super::multinode`]).
    pub nodes: usize,
    /// Receive/transmit queues of each node's uplink (with several nodes).
    pub uplink_queues: u32,
    /// The agents' `node.pod_to_host`: accept a pod's traffic to its own node (after its
    /// egress policy) instead of Calico's default, drop.
    pub pod_to_host_accept: bool,
}

/// Where the lab sends from and serves on: a pod, or an address of the outside host.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `namespace/name`, or the address for the outside host.
    pub key: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// The network namespace it lives in.
    pub netns: String,
}

/// The name of the node's uplink interface in the lab.
pub const UPLINK: &str = "uplink0";

/// One pod of the lab.
#[derive(Debug)]
pub struct LabPod {
    /// The node it runs on (index into the lab's nodes).
    pub node: usize,
    /// `namespace/name`.
    pub key: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its namespace and interface.
    pub pod: Pod,
}

/// The agent process, stopped with SIGTERM on drop.
#[derive(Debug)]
pub(super) struct Agent {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let start = log.len().saturating_sub(30);
        log.get(start..).unwrap_or_default().join("\n")
    }

    /// Sends SIGTERM and waits; returns the exit status.
    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
    }
}

/// A running lab. Dropping it stops everything and deletes its namespaces.
#[derive(Debug)]
pub struct Lab {
    // Field order is drop order: servers and agent stop before the namespaces go.
    pub(super) servers: Servers,
    pub(super) agents: Vec<Agent>,
    pub(super) status_paths: Vec<PathBuf>,
    pub(super) dirs: Vec<PathBuf>,
    pub(super) workdir: TempDir,
    /// The pods, in manifest order.
    pub pods: Vec<LabPod>,
    /// Pods, outside addresses and node addresses, as probes see them.
    pub endpoints: Vec<Endpoint>,
    /// Held for their `Drop`: removed before the namespaces.
    #[allow(dead_code)] // Never read: only dropped.
    pub(super) veths: Vec<VethPair>,
    /// The outside host (one node), or the router (several nodes).
    pub outside: Option<Netns>,
    /// Nodes after the first.
    pub more_nodes: Vec<Netns>,
    /// The (first) node's namespace.
    pub node: Netns,
}

/// A directory removed on drop.
#[derive(Debug)]
pub(super) struct TempDir(pub(super) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    /// Builds the node and its pods, starts the agent and the servers.
    pub fn start(opts: &LabOptions) -> Result<Lab> {
        if opts.nodes > 1 {
            return super::multinode::start(opts);
        }
        let manifests = super::load(&opts.manifests)?;
        let node = Netns::new("node")?;
        node.disable_ipv6()?;
        let mut veths = Vec::new();
        let mut pods = Vec::new();
        for p in &manifests.cluster.pods {
            if p.host_network {
                continue;
            }
            let Some(ip) = first_ipv4(p) else {
                if !p.ips.is_empty() {
                    eprintln!(
                        "warning: pod {}/{} has no IPv4 address; the lab builds IPv4 pods only",
                        p.namespace, p.name
                    );
                }
                continue;
            };
            let (veth, pod) = build_pod(p, ip, &node)?;
            veths.push(veth);
            pods.push(LabPod {
                node: 0,
                key: format!("{}/{}", p.namespace, p.name),
                ip,
                pod,
            });
        }
        if pods.is_empty() {
            bail!(
                "no pod of {} has an IPv4 address (status.podIPs): nothing to build",
                opts.manifests.display()
            );
        }
        let mut endpoints: Vec<Endpoint> = pods
            .iter()
            .map(|p| Endpoint {
                key: p.key.clone(),
                ip: p.ip,
                netns: p.pod.ns.name().to_owned(),
            })
            .collect();
        let mut uplink = None;
        let outside = if opts.outside.is_empty() {
            None
        } else {
            let ns = Netns::new("outside")?;
            ns.disable_ipv6()?;
            veths.push(VethPair::new(&ns, "eth0", &node, UPLINK)?);
            for ip in &opts.outside {
                ns.addr_add("eth0", &format!("{ip}/32"))?;
                endpoints.push(Endpoint {
                    key: ip.to_string(),
                    ip: *ip,
                    netns: ns.name().to_owned(),
                });
            }
            ns.tx_checksum_off("eth0")?;
            ns.route_add(&[dataplane::netns::GATEWAY, "dev", "eth0", "scope", "link"])?;
            ns.route_add(&["default", "via", dataplane::netns::GATEWAY, "dev", "eth0"])?;
            ns.neigh_add("eth0", dataplane::netns::GATEWAY, node.mac(UPLINK)?)?;
            uplink = Some(ns.mac("eth0")?);
            Some(ns)
        };
        let dir =
            std::env::temp_dir().join(format!("ocelot-lab-{}-{}", std::process::id(), node.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let workdir = TempDir(dir.clone());
        let config = dir.join("ocelot.toml");
        std::fs::write(&config, agent_config(opts, uplink)?)
            .with_context(|| format!("writing {}", config.display()))?;
        let status_path = dir.join("status.json");
        let servers = Servers::start(&endpoints, &opts.serve)?;
        let dirs = vec![opts.manifests.clone()];
        let agent = start_agent(opts, &node, &config, &dirs, &status_path)?;
        Ok(Lab {
            servers,
            agents: vec![agent],
            status_paths: vec![status_path],
            dirs,
            workdir,
            pods,
            endpoints,
            veths,
            outside,
            more_nodes: Vec::new(),
            node,
        })
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&LabPod> {
        self.pods.iter().find(|p| p.key == key)
    }

    /// The endpoint (pod or outside address) that owns `ip`.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.ip == ip)
    }

    /// The (first) agent's status file, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.status_of(0)
    }

    /// Node `k`'s agent's status file, parsed.
    pub fn status_of(&self, k: usize) -> Result<serde_json::Value> {
        let path = self
            .status_paths
            .get(k)
            .ok_or_else(|| anyhow!("no node {k}"))?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Waits until every agent has applied the manifests directories as they are now.
    pub fn wait_applied(&self, timeout: Duration) -> Result<()> {
        let want = format!("{:016x}", source::digest(&self.dirs)?);
        let deadline = Instant::now() + timeout;
        loop {
            let applied = (0..self.agents.len()).all(|k| {
                self.status_of(k)
                    .is_ok_and(|s| s["manifests_digest"] == want)
            });
            if applied {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agents did not apply the manifests within {timeout:?}; their log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs probes (whose addresses are resolved already) with real traffic.
    pub fn probe_all(
        &self,
        probes: &[ProbeResult],
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Vec<ProbeOutcome>> {
        probe::run_all(self, probes, timeout, stop)
    }

    /// Stops the agent with SIGTERM; fails unless it exits 0 and leaves no XDP program on the
    /// pods' veths. Returns a one-line summary of its counters.
    pub fn stop(mut self) -> Result<String> {
        self.servers.stop();
        for agent in self.agents.iter_mut().filter(|a| a.child.is_some()) {
            let status = agent.terminate()?;
            if !status.success() {
                bail!(
                    "an agent exited with {status}; its log:\n{}",
                    agent.log_tail()
                );
            }
        }
        let nodes: Vec<&Netns> = std::iter::once(&self.node)
            .chain(self.more_nodes.iter())
            .collect();
        for (k, node) in nodes.iter().enumerate() {
            let mut devs: Vec<&str> = self
                .pods
                .iter()
                .filter(|p| p.node == k)
                .map(|p| p.pod.host_dev.as_str())
                .collect();
            if self.outside.is_some() {
                devs.push(UPLINK);
            }
            for dev in devs {
                if node.has_xdp(dev)? {
                    bail!("an XDP program was left on {dev}");
                }
            }
        }
        let summary = self
            .status()
            .map(|s| summarize(&s))
            .unwrap_or_else(|e| format!("no status: {e}"));
        let _ = &self.workdir;
        Ok(summary)
    }

    /// Kills node `k`'s agent with SIGKILL (a crash: nothing is cleaned up).
    pub fn kill_agent(&mut self, k: usize) -> Result<()> {
        let agent = self
            .agents
            .get_mut(k)
            .ok_or_else(|| anyhow!("no node {k}"))?;
        if let Some(mut child) = agent.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Whether node `k`'s agent is still running.
    pub fn agent_running(&mut self, k: usize) -> bool {
        self.agents
            .get_mut(k)
            .and_then(|a| a.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agents' recent log lines.
    pub fn agent_log(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(k, a)| format!("-- node {k}:\n{}", a.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A pod's first IPv4 address: the lab builds IPv4 pods only.
pub(super) fn first_ipv4(p: &classifier::policy::model::Pod) -> Option<Ipv4Addr> {
    p.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    })
}

/// A pod's namespace, wired to `node` the Calico way: `eth0` the peer of the host-side veth
/// named after the pod, its /32 address, the link-local gateway resolved by ARP, and on the
/// node the host route to the pod's address through its veth that Calico's CNI plugin
/// installs (the agent learns an unknown pod's addresses from it).
pub(super) fn build_pod(
    p: &classifier::policy::model::Pod,
    ip: Ipv4Addr,
    node: &Netns,
) -> Result<(VethPair, Pod)> {
    let role: String = p
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(20)
        .collect();
    let ns = Netns::new(&role)?;
    ns.disable_ipv6()?;
    let host = veth_name(&p.namespace, &p.name);
    let veth = VethPair::new(&ns, "eth0", node, &host)?;
    let pod = Pod::configure_proxy_arp(ns, &ip.to_string(), &host)?;
    // A dual-stack pod: its IPv6 address too (probes use IPv4; IPv6 is for tests and for
    // whoever runs traffic in the pod's namespace).
    if let Some(ip6) = p.ips.iter().find(|a| a.is_ipv6()) {
        pod.add_ipv6(&ip6.to_string())?;
    }
    node.route_add(&[&format!("{ip}/32"), "dev", &host, "scope", "link"])?;
    Ok((veth, pod))
}

/// `rx N, forwarded N, drops {reason: n}` over all workers.
fn summarize(status: &serde_json::Value) -> String {
    let mut rx = 0;
    let mut fwd = 0;
    let mut drops = std::collections::BTreeMap::<String, u64>::new();
    for w in status["workers"].as_array().into_iter().flatten() {
        rx += w["rx"].as_u64().unwrap_or(0);
        fwd += w["forwarded"].as_u64().unwrap_or(0);
        for (k, v) in w["drops"].as_object().into_iter().flatten() {
            *drops.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
        }
    }
    let drops: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "epoch {}, rx {rx}, forwarded {fwd}, drops: {}",
        status["epoch"],
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(" ")
        }
    )
}

/// The agent's config for `opts.workers` workers: cores from the last one down, so one
/// worker on a two-core machine leaves core 0 to the lab's own threads.
pub(super) fn agent_config(opts: &LabOptions, uplink_gateway: Option<[u8; 6]>) -> Result<String> {
    let workers = opts.workers;
    let cores = core_affinity::get_core_ids().map_or(1, |ids| ids.len());
    if workers == 0 || workers > cores {
        bail!("--workers {workers}: this machine has {cores} cores");
    }
    let mut text = String::from("[node]\nname = \"lab\"\n");
    if opts.pod_to_host_accept {
        text.push_str("pod_to_host = \"accept\"\n");
    }
    if let Some(mac) = uplink_gateway {
        text.push_str(&format!(
            "\n[uplink]\ninterface = \"{UPLINK}\"\ngateway_mac = \"{}\"\n",
            crate::agent::ports::format_mac(mac)
        ));
    }
    for k in 0..workers {
        text.push_str(&format!("\n[[workers]]\ncore = {}\n", cores - 1 - k));
    }
    Ok(text)
}

pub(super) fn start_agent(
    opts: &LabOptions,
    node: &Netns,
    config: &std::path::Path,
    dirs: &[PathBuf],
    status: &std::path::Path,
) -> Result<Agent> {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", node.name()])
        .arg(&opts.agent)
        .arg("run")
        .arg("--config")
        .arg(config);
    for d in dirs {
        command.arg("--manifests").arg(d);
    }
    let mut child = command
        .arg("--status")
        .arg(status)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", opts.agent.display()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let verbose = opts.verbose;
    let thread_log = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if verbose {
                eprintln!("  agent| {line}");
            }
            if line.starts_with(READY_LINE) {
                let _ = ready_tx.send(());
            }
            thread_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line);
        }
    });
    let mut agent = Agent {
        child: Some(child),
        log,
    };
    let deadline = Instant::now() + AGENT_START;
    loop {
        if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            return Ok(agent);
        }
        let exited = match agent.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => None,
        };
        if let Some(status) = exited {
            std::thread::sleep(Duration::from_millis(100));
            agent.child = None;
            bail!(
                "the agent exited ({status}) before it was ready; its log:\n{}",
                agent.log_tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the agent was not ready within {AGENT_START:?}; its log:\n{}",
                agent.log_tail()
            );
        }
    }
}

/// Whether `flag` asks to stop.
pub(super) fn stopped(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed)
}
