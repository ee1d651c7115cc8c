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
    /// "outside" host behind the node's uplink.
    pub outside: Vec<Ipv4Addr>,
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
    /// `namespace/name`.
    pub key: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its namespace and interface.
    pub pod: Pod,
}

/// The agent process, stopped with SIGTERM on drop.
#[derive(Debug)]
struct Agent {
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
    servers: Servers,
    agent: Agent,
    status_path: PathBuf,
    manifests: PathBuf,
    workdir: TempDir,
    /// The pods, in manifest order.
    pub pods: Vec<LabPod>,
    /// Pods and outside addresses, as probes see them.
    pub endpoints: Vec<Endpoint>,
    _veths: Vec<VethPair>,
    /// The outside host, if probes need one.
    pub outside: Option<Netns>,
    /// The node's namespace.
    pub node: Netns,
}

/// A directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    /// Builds the node and its pods, starts the agent and the servers.
    pub fn start(opts: &LabOptions) -> Result<Lab> {
        let manifests = super::load(&opts.manifests)?;
        let node = Netns::new("node")?;
        node.disable_ipv6()?;
        let mut veths = Vec::new();
        let mut pods = Vec::new();
        for p in &manifests.cluster.pods {
            if p.host_network {
                continue;
            }
            let Some(ip) = p.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            }) else {
                if !p.ips.is_empty() {
                    eprintln!(
                        "warning: pod {}/{} has no IPv4 address; the lab builds IPv4 pods only",
                        p.namespace, p.name
                    );
                }
                continue;
            };
            let role: String = p
                .name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(20)
                .collect();
            let ns = Netns::new(&role)?;
            ns.disable_ipv6()?;
            let host = veth_name(&p.namespace, &p.name);
            veths.push(VethPair::new(&ns, "eth0", &node, &host)?);
            let pod = Pod::configure_proxy_arp(ns, &ip.to_string(), &host)?;
            pods.push(LabPod {
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
        std::fs::write(&config, agent_config(opts.workers, uplink)?)
            .with_context(|| format!("writing {}", config.display()))?;
        let status_path = dir.join("status.json");
        let servers = Servers::start(&endpoints, &opts.serve)?;
        let agent = start_agent(opts, &node, &config, &status_path)?;
        Ok(Lab {
            servers,
            agent,
            status_path,
            manifests: opts.manifests.clone(),
            workdir,
            pods,
            endpoints,
            _veths: veths,
            outside,
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

    /// The agent's status file, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.status_path)
            .with_context(|| format!("reading {}", self.status_path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Waits until the agent has applied the manifests directory as it is now.
    pub fn wait_applied(&self, timeout: Duration) -> Result<()> {
        let want = format!(
            "{:016x}",
            source::digest(std::slice::from_ref(&self.manifests))?
        );
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status()
                && s["manifests_digest"] == want
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not apply {} within {timeout:?}; its log:\n{}",
                    self.manifests.display(),
                    self.agent.log_tail()
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
        let status = self.agent.terminate()?;
        if !status.success() {
            bail!(
                "the agent exited with {status}; its log:\n{}",
                self.agent.log_tail()
            );
        }
        let mut devs: Vec<&str> = self.pods.iter().map(|p| p.pod.host_dev.as_str()).collect();
        if self.outside.is_some() {
            devs.push(UPLINK);
        }
        for dev in devs {
            if self.node.has_xdp(dev)? {
                bail!("an XDP program was left on {dev}");
            }
        }
        let summary = self
            .status()
            .map(|s| summarize(&s))
            .unwrap_or_else(|e| format!("no status: {e}"));
        let _ = &self.workdir;
        Ok(summary)
    }

    /// The agent's recent log lines.
    pub fn agent_log(&self) -> String {
        self.agent.log_tail()
    }
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

/// The agent's config for `workers` workers: cores from the last one down, so one worker
/// on a two-core machine leaves core 0 to the lab's own threads.
fn agent_config(workers: usize, uplink_gateway: Option<[u8; 6]>) -> Result<String> {
    let cores = core_affinity::get_core_ids().map_or(1, |ids| ids.len());
    if workers == 0 || workers > cores {
        bail!("--workers {workers}: this machine has {cores} cores");
    }
    let mut text = String::from("[node]\nname = \"lab\"\n");
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

fn start_agent(
    opts: &LabOptions,
    node: &Netns,
    config: &std::path::Path,
    status: &std::path::Path,
) -> Result<Agent> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node.name()])
        .arg(&opts.agent)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--manifests")
        .arg(&opts.manifests)
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
