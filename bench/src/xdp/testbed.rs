//! The testbed and the devices under test.
//!
//! Three network namespaces, all created here and removed by RAII (also on a panic or
//! Ctrl-C, which only sets a stop flag): `gen` and `sink` are pods shaped as Calico shapes
//! them (`dataplane::netns::Pod::configure`), `node` holds their host-side veths, named as
//! the agent names them (`control::naming::veth_name`). The node namespace starts with no
//! forwarding at all; a [`Device`] turns it into a forwarding node and [`Running`]'s `Drop`
//! undoes exactly that, so the next device starts from the same empty node.
//!
//! **Invariant:** nothing here touches the root namespace: every command runs with
//! `ip -n <ours>` / `ip netns exec <ours>`, and AF_XDP sockets are opened by threads that
//! entered one of our namespaces.

use std::fmt::Write as _;
use std::io::{BufRead as _, Read as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dataplane::netns::{Netns, Pod, VethPair};
use dataplane::rawfwd::{self, FwdConfig, FwdThread, MacRewrite, Side};
use dataplane::sys::{SocketOpts, XdpMode};

use super::frame::{DST_PORT_BASE, DST_PORT_LAST, Endpoints};

/// The Kubernetes namespace of the generator pods (labelled `role: client`, as the seed
/// demo's client namespace).
pub const GEN_K8S_NS: &str = "client";
/// The Kubernetes namespace of the sink pods.
pub const SINK_K8S_NS: &str = "default";
/// Addresses of generator pod `i`: 10.71.0.(i+1); sink pod `i`: 10.71.1.(i+1).
fn pod_ip(sink: bool, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 71, u8::from(sink), (i + 1) as u8)
}

/// A device under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The ocelot agent (`ocelot run`) with the chosen policy set and conntrack.
    Ocelot,
    /// The kernel's forwarding with nftables rules and conntrack, as a Calico iptables node.
    Kernel,
    /// The bare AF_XDP rx→tx forwarder with MAC rewrite, no classification.
    #[value(name = "raw-xsk")]
    RawXsk,
}

impl Device {
    /// The name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Device::Ocelot => "ocelot",
            Device::Kernel => "kernel",
            Device::RawXsk => "raw-xsk",
        }
    }
}

/// Which policies the device enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicySet {
    /// No NetworkPolicy (conntrack still on).
    None,
    /// Like the seed demo: the sink's namespace denies ingress by default and allows the
    /// client namespace on the benchmark's UDP ports.
    Demo,
    /// `--rules` generated policies on the sink that do not match the traffic, then the one
    /// that does.
    Generated,
}

/// One pod of the testbed.
#[derive(Debug)]
pub struct BenchPod {
    /// Its Kubernetes name.
    pub name: String,
    /// The Calico-shaped pod namespace.
    pub pod: Pod,
}

/// The namespaces and veths; dropped veths first, then pods, then the node.
#[derive(Debug)]
pub struct Testbed {
    _veths: Vec<VethPair>,
    /// Generator pod(s).
    pub gens: Vec<BenchPod>,
    /// Sink pod(s).
    pub sinks: Vec<BenchPod>,
    /// The node.
    pub node: Netns,
}

impl Testbed {
    /// Builds `pairs` generator and sink pods around an empty node.
    pub fn new(pairs: usize) -> Result<Testbed> {
        let node = Netns::new("xb-node")?;
        node.disable_ipv6()?;
        let mut veths = Vec::new();
        let mut build = |sink: bool, i: usize| -> Result<BenchPod> {
            let (k8s_ns, role) = if sink {
                (SINK_K8S_NS, "xb-sink")
            } else {
                (GEN_K8S_NS, "xb-gen")
            };
            let name = format!("{}-{i}", if sink { "sink" } else { "gen" });
            let host_dev = control::naming::veth_name(k8s_ns, &name);
            let ns = Netns::new(role)?;
            ns.disable_ipv6()?;
            veths.push(VethPair::new(&ns, "eth0", &node, &host_dev)?);
            let pod = Pod::configure(ns, &pod_ip(sink, i).to_string(), &host_dev, &node)?;
            // Calico programs a static neighbour entry for each local workload, so the node
            // never has to ARP for a pod.
            node.neigh_add(&host_dev, &pod.ip.to_string(), pod.mac)?;
            Ok(BenchPod { name, pod })
        };
        let mut gens = Vec::new();
        let mut sinks = Vec::new();
        for i in 0..pairs.max(1) {
            gens.push(build(false, i)?);
            sinks.push(build(true, i)?);
        }
        Ok(Testbed {
            _veths: veths,
            gens,
            sinks,
            node,
        })
    }

    /// Addresses generator `g` writes into its frames for sink `k`.
    pub fn endpoints(&self, g: &BenchPod, k: &BenchPod) -> Result<Endpoints> {
        let (g, s) = (&g.pod, &k.pod);
        Ok(Endpoints {
            dst_mac: self.node.mac(&g.host_dev)?,
            src_mac: g.mac,
            src_ip: g.ip,
            dst_ip: s.ip,
        })
    }

    /// Every namespace name (for the leak check).
    pub fn namespace_names(&self) -> Vec<String> {
        std::iter::once(self.node.name().to_owned())
            .chain(self.gens.iter().map(|p| p.pod.ns.name().to_owned()))
            .chain(self.sinks.iter().map(|p| p.pod.ns.name().to_owned()))
            .collect()
    }
}

/// How a device is started.
#[derive(Debug, Clone)]
pub struct DeviceOpts {
    /// Policy set.
    pub policy: PolicySet,
    /// Generated policies for [`PolicySet::Generated`].
    pub rules: usize,
    /// Core of the device's worker (raw-xsk, ocelot).
    pub core: Option<usize>,
    /// Flows the generator sends (the agent's conntrack is sized for them).
    pub flows: u32,
    /// ocelot's workers: 1, or 2 (the generator's veth on `core`, the sink's on the next).
    pub workers: u32,
    /// XDP attach mode for the AF_XDP devices.
    pub xdp_mode: XdpMode,
    /// Socket options of raw-xsk.
    pub socket: SocketOpts,
    /// How raw-xsk and ocelot's worker idle.
    pub idle: rawfwd::Idle,
    /// ocelot's `[xdp] sleep_after_us`, when not the agent's default.
    pub sleep_after_us: Option<u32>,
    /// Where the ocelot config, manifests and log go.
    pub work_dir: PathBuf,
}

/// A device running on the testbed's node; `Drop` stops it and undoes its configuration.
#[derive(Debug)]
pub enum Running<'a> {
    /// nftables, routes and sysctls in the node namespace.
    Kernel(KernelNode<'a>),
    /// The raw forwarders' threads, one per generator/sink pair.
    RawXsk(Vec<FwdThread>),
    /// The agent's process.
    Ocelot(OcelotProc),
}

impl Running<'_> {
    /// The process id of an out-of-process device (the agent), whose CPU time counts.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Running::Ocelot(o) => o.child.as_ref().map(Child::id),
            _ => None,
        }
    }

    /// Stops the device and reports whether it stopped cleanly.
    pub fn stop(self) -> Result<String> {
        match self {
            Running::Kernel(k) => k.stop(),
            Running::RawXsk(fwds) => {
                let mut lines = Vec::new();
                for f in fwds {
                    for (name, c, k) in f.stop()? {
                        lines.push(format!("{name}: {c:?}; kernel {k:?}"));
                    }
                }
                Ok(lines.join("; "))
            }
            Running::Ocelot(o) => o.stop(),
        }
    }
}

/// Starts `device` on the testbed's node.
pub fn start<'a>(device: Device, tb: &'a Testbed, opts: &DeviceOpts) -> Result<Running<'a>> {
    match device {
        Device::Kernel => KernelNode::start(tb, opts).map(Running::Kernel),
        Device::RawXsk => {
            let side = |p: &BenchPod| -> Result<Side> {
                Ok(Side {
                    interface: p.pod.host_dev.clone(),
                    queue: 0,
                    rewrite: MacRewrite {
                        dst: p.pod.mac,
                        src: tb.node.mac(&p.pod.host_dev)?,
                    },
                })
            };
            let config = FwdConfig {
                socket: SocketOpts {
                    xdp_mode: opts.xdp_mode,
                    ..opts.socket
                },
                core: opts.core,
                idle: opts.idle,
                ..FwdConfig::default()
            };
            // One forwarder per pair, all on the device core: each pair's two veths share a
            // UMEM, as one ocelot worker's ports do.
            let mut fwds = Vec::new();
            for (g, k) in tb.gens.iter().zip(&tb.sinks) {
                fwds.push(rawfwd::spawn_pair(
                    tb.node.name(),
                    side(g)?,
                    side(k)?,
                    config,
                )?);
            }
            Ok(Running::RawXsk(fwds))
        }
        Device::Ocelot => OcelotProc::start(tb, opts).map(Running::Ocelot),
    }
}

// ---------------------------------------------------------------------------------------------
// kernel

/// The node namespace configured as a Calico iptables-mode node (with nftables).
#[derive(Debug)]
pub struct KernelNode<'a> {
    tb: &'a Testbed,
    stopped: bool,
}

const NFT_TABLE: &str = "ocelot_bench";

/// The nftables ruleset for `policy`: conntrack's verdict first, then the policy.
pub fn nft_ruleset(
    policy: PolicySet,
    rules: usize,
    gen_ips: &[Ipv4Addr],
    sink_ips: &[Ipv4Addr],
) -> String {
    let set = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (gens, sinks) = (set(gen_ips), set(sink_ips));
    let mut s = String::new();
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(s, "  chain forward {{");
    let default = if policy == PolicySet::None {
        "accept"
    } else {
        "drop"
    };
    let _ = writeln!(
        s,
        "    type filter hook forward priority filter; policy {default};"
    );
    let _ = writeln!(s, "    ct state established,related accept");
    let _ = writeln!(s, "    ct state invalid drop");
    if policy == PolicySet::Generated {
        // Rules that look like ipBlock ingress rules of other policies on the sink and do
        // not match the traffic, evaluated one by one as iptables evaluates them.
        for i in 0..rules {
            let _ = writeln!(
                s,
                "    ip daddr {{ {sinks} }} ip saddr 10.99.{}.{} udp dport {} accept",
                (i / 250) % 250,
                i % 250 + 1,
                6000 + i % 1000
            );
        }
    }
    if policy != PolicySet::None {
        let _ = writeln!(
            s,
            "    ip daddr {{ {sinks} }} ip saddr {{ {gens} }} udp dport {DST_PORT_BASE}-{DST_PORT_LAST} accept"
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}

impl<'a> KernelNode<'a> {
    fn start(tb: &'a Testbed, opts: &DeviceOpts) -> Result<KernelNode<'a>> {
        let node = &tb.node;
        // From here on, `Drop` undoes whatever was done, even if a later step fails.
        let k = KernelNode { tb, stopped: false };
        node.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        for p in tb.gens.iter().chain(&tb.sinks) {
            let dev = &p.pod.host_dev;
            node.route_add(&[&format!("{}/32", p.pod.ip), "dev", dev, "scope", "link"])?;
            node.exec_ok(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{dev}.proxy_arp=1"),
            ])?;
        }
        let gen_ips: Vec<Ipv4Addr> = tb.gens.iter().map(|p| p.pod.ip).collect();
        let sink_ips: Vec<Ipv4Addr> = tb.sinks.iter().map(|p| p.pod.ip).collect();
        let ruleset = nft_ruleset(opts.policy, opts.rules, &gen_ips, &sink_ips);
        let file = opts.work_dir.join("kernel.nft");
        std::fs::write(&file, &ruleset).with_context(|| format!("writing {}", file.display()))?;
        let path = file.to_string_lossy().into_owned();
        node.exec_ok(&["nft", "-f", &path])?;
        Ok(k)
    }

    fn teardown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let node = &self.tb.node;
        // Each step is attempted even if an earlier one failed; the first error is reported.
        let mut first: Result<()> = Ok(());
        let mut note = |r: Result<String, dataplane::Error>| {
            if let (Err(e), true) = (r, first.is_ok()) {
                first = Err(e.into());
            }
        };
        let _ = node.exec(&["nft", "delete", "table", "inet", NFT_TABLE]);
        for p in self.tb.gens.iter().chain(&self.tb.sinks) {
            let _ = node.ip(&["route", "del", &format!("{}/32", p.pod.ip)]);
            let _ = node.exec(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{}.proxy_arp=0", p.pod.host_dev),
            ]);
        }
        note(node.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"]));
        // Connections tracked under this device must not leak into the next one's run.
        let _ = node.exec(&["conntrack", "-F"]);
        first
    }

    fn stop(mut self) -> Result<String> {
        self.teardown()?;
        Ok(String::new())
    }
}

impl Drop for KernelNode<'_> {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

// ---------------------------------------------------------------------------------------------
// ocelot

/// The agent's process, started with `ip netns exec <node> ocelot run …`.
#[derive(Debug)]
pub struct OcelotProc {
    child: Option<Child>,
    log: PathBuf,
}

/// What the agent prints on stderr once every worker polls (followed by details).
const READY_LINE: &str = "ocelot: ready";

/// Where `ocelot` must be: next to this binary (both are built into the same target dir).
pub fn ocelot_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating ocelot-bench")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
    // Test binaries live in target/<profile>/deps; the agent is one level up.
    let candidates = [dir.join("ocelot"), dir.join("../ocelot")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "ocelot binary not found next to ocelot-bench ({}): build it with cargo build --release -p tools",
                dir.display()
            )
        })
}

/// The agent's TOML config for the testbed.
pub fn ocelot_config(tb: &Testbed, opts: &DeviceOpts) -> String {
    let mode = match opts.xdp_mode {
        XdpMode::Native => "native",
        XdpMode::Generic | XdpMode::Auto => "generic",
    };
    let veths: Vec<&str> = tb
        .gens
        .iter()
        .chain(&tb.sinks)
        .map(|p| p.pod.host_dev.as_str())
        .collect();
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let core = opts.core.unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Room for every flow at a load factor of at most 0.5, as a node expecting this many
    // connections would be configured; never below the agent's default.
    let ct = (u64::from(opts.flows) * 2).next_power_of_two().max(1 << 18);
    let idle = match opts.idle {
        rawfwd::Idle::Spin => "spin",
        rawfwd::Idle::Poll { .. } => "sleep",
    };
    let mut s = format!(
        "[node]\nname = \"bench\"\nconntrack_capacity = {ct}\n\n[xdp]\nmode = \"{mode}\"\nidle = \"{idle}\"\n"
    );
    if let Some(us) = opts.sleep_after_us {
        let _ = writeln!(s, "sleep_after_us = {us}");
    }
    if opts.workers >= 2 {
        let (gens, sinks) = veths.split_at(tb.gens.len());
        let (w0, w1): (Vec<&str>, Vec<&str>) = if gens.len() == 1 {
            // One pair: the generator's veth on one worker, the sink's on the other, so
            // every frame crosses the hand-off.
            (gens.to_vec(), sinks.to_vec())
        } else {
            // Several pairs: whole pairs alternate between the workers, so frames stay on
            // the worker that received them.
            let mut w = (Vec::new(), Vec::new());
            for (i, (g, k)) in gens.iter().zip(sinks).enumerate() {
                let side = if i % 2 == 0 { &mut w.0 } else { &mut w.1 };
                side.push(*g);
                side.push(*k);
            }
            w
        };
        for (c, v) in [(core, w0), ((core + 1) % cores, w1)] {
            let _ = write!(
                s,
                "\n[[workers]]\ncore = {c}\ninterfaces = [{}]\n",
                quoted(&v)
            );
        }
    } else {
        let _ = write!(
            s,
            "\n[[workers]]\ncore = {core}\ninterfaces = [{}]\n",
            quoted(&veths)
        );
    }
    s
}

/// The manifests: namespaces, the pods (with their IPs in `status.podIPs`) and the policies.
pub fn ocelot_manifests(tb: &Testbed, policy: PolicySet, rules: usize) -> String {
    let pods = |v: &[BenchPod]| -> Vec<(String, Ipv4Addr)> {
        v.iter().map(|p| (p.name.clone(), p.pod.ip)).collect()
    };
    manifests_text(&pods(&tb.gens), &pods(&tb.sinks), policy, rules)
}

/// [`ocelot_manifests`] for generator and sink pods given by (name, IP).
pub fn manifests_text(
    gens: &[(String, Ipv4Addr)],
    sinks: &[(String, Ipv4Addr)],
    policy: PolicySet,
    rules: usize,
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {GEN_K8S_NS}\n  labels:\n    role: client\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SINK_K8S_NS}\n"
    );
    for (ns, role, pods) in [(GEN_K8S_NS, "gen", gens), (SINK_K8S_NS, "sink", sinks)] {
        for (name, ip) in pods {
            let _ = write!(
                s,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {role}\n\
                 spec:\n  nodeName: bench\n  containers:\n    - name: {role}\n      image: ocelot/bench\n\
                 status:\n  podIP: {ip}\n  podIPs:\n    - ip: {ip}\n",
            );
        }
    }
    let allow = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-client\n  namespace: {SINK_K8S_NS}\n\
         spec:\n  podSelector:\n    matchLabels:\n      app: sink\n  ingress:\n    - from:\n        - namespaceSelector:\n            matchLabels:\n              role: client\n\
         \x20     ports:\n        - protocol: UDP\n          port: {DST_PORT_BASE}\n          endPort: {DST_PORT_LAST}\n"
    );
    match policy {
        PolicySet::None => {}
        PolicySet::Demo => {
            let _ = write!(
                s,
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny-ingress\n  namespace: {SINK_K8S_NS}\n\
                 spec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n{allow}"
            );
        }
        PolicySet::Generated => {
            for i in 0..rules {
                let _ = write!(
                    s,
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: gen-{i}\n  namespace: {SINK_K8S_NS}\n\
                     spec:\n  podSelector:\n    matchLabels:\n      app: sink\n  ingress:\n    - from:\n        - ipBlock:\n            cidr: 10.99.{}.{}/32\n\
                     \x20     ports:\n        - protocol: UDP\n          port: {}\n",
                    (i / 250) % 250,
                    i % 250 + 1,
                    6000 + i % 1000
                );
            }
            s.push_str(&allow);
        }
    }
    s
}

impl OcelotProc {
    fn start(tb: &Testbed, opts: &DeviceOpts) -> Result<OcelotProc> {
        let exe = ocelot_binary()?;
        let cfg = opts.work_dir.join("ocelot.toml");
        let manifests = opts.work_dir.join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        std::fs::write(&cfg, ocelot_config(tb, opts))
            .with_context(|| format!("writing {}", cfg.display()))?;
        // A previous run's table-swap file must not leak into this one.
        let _ = std::fs::remove_file(manifests.join("swap.yaml"));
        let file = manifests.join("bench.yaml");
        std::fs::write(&file, ocelot_manifests(tb, opts.policy, opts.rules))
            .with_context(|| format!("writing {}", file.display()))?;
        let log = opts.work_dir.join("ocelot.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", tb.node.name()])
            .arg(&exe)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--manifests")
            .arg(&manifests)
            .arg("--status")
            .arg(opts.work_dir.join("ocelot-status.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut proc = OcelotProc {
            child: Some(child),
            log,
        };
        proc.wait_ready(Duration::from_secs(20))?;
        Ok(proc)
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(f) = std::fs::File::open(&self.log)
                && std::io::BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .any(|l| l.trim_start().starts_with(READY_LINE))
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for ocelot")?
            {
                self.child = None;
                bail!(
                    "ocelot exited before it was ready ({status}); its stderr ({}):\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "ocelot did not print `ocelot: ready` within {timeout:?}; its stderr ({}):\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERMs the agent and checks that it exits 0 within 10 s.
    fn stop(mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            bail!("ocelot already exited");
        };
        terminate(&mut child, Duration::from_secs(10)).and_then(|status| {
            if status.success() {
                // The agent's last status (counters by drop reason) says where frames went.
                let path = self.log.with_file_name("ocelot-status.json");
                Ok(std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .map(|v| format!("agent epoch {}, workers: {}", v["epoch"], v["workers"]))
                    .unwrap_or_default())
            } else {
                Err(anyhow!(
                    "ocelot exited with {status} after SIGTERM; its stderr ({}):\n{}",
                    self.log.display(),
                    self.log_text()
                ))
            }
        })
    }
}

/// Sends SIGTERM (through `kill(1)`: the harness has no unsafe code) and waits; SIGKILL after
/// `timeout`.
fn terminate(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let pid = child.id().to_string();
    let _ = Command::new("kill")
        .args(["-TERM", &pid])
        .stdin(Stdio::null())
        .status();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for ocelot")? {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ocelot did not exit within {timeout:?} of SIGTERM; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for OcelotProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Duration::from_secs(5));
        }
    }
}

/// Whether `path` looks writable as a work directory (for an early, clear error).
pub fn ensure_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// table swaps under load

/// The port of the `n`th swap's extra rule: different from the previous swap's.
fn swap_port(n: u64) -> u64 {
    7000 + n % 1000
}

/// A thread that makes the device replace its tables every `period` while traffic flows:
/// the kernel reloads its nftables ruleset atomically (`nft -f` of a `flush chain` + the
/// rules), the agent sees its manifests directory change (a policy on another pod that
/// names a new port each time, written atomically by a rename) and swaps in a new
/// snapshot. The policy the benchmark traffic needs is in every version, so no frame of it
/// may be lost. raw-xsk has no tables: no swapper.
#[derive(Debug)]
pub struct Swapper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64>>>,
}

impl Swapper {
    /// Starts swapping for `device`, if it has tables.
    pub fn start(
        device: Device,
        tb: &Testbed,
        opts: &DeviceOpts,
        period: Duration,
    ) -> Result<Option<Swapper>> {
        // Every swap writes a version that differs from the one before (a port that counts
        // up): two alternating versions would alias with the agent's 200 ms directory poll
        // and look unchanged to it.
        let (path, version): (PathBuf, Box<dyn Fn(u64) -> String + Send>) = match device {
            Device::RawXsk => return Ok(None),
            Device::Kernel => {
                let gen_ips: Vec<Ipv4Addr> = tb.gens.iter().map(|p| p.pod.ip).collect();
                let sink_ips: Vec<Ipv4Addr> = tb.sinks.iter().map(|p| p.pod.ip).collect();
                let base = nft_ruleset(opts.policy, opts.rules, &gen_ips, &sink_ips);
                (
                    opts.work_dir.join("swap.nft"),
                    Box::new(move |n| {
                        // `nft -f` applies a file as one transaction: the chain is emptied
                        // and refilled atomically, as iptables-restore does for Calico.
                        let body = base.replacen(
                            "ct state invalid drop\n",
                            &format!(
                                "ct state invalid drop\n    ip daddr 10.98.0.1 udp dport {} accept\n",
                                swap_port(n)
                            ),
                            1,
                        );
                        format!("flush chain inet {NFT_TABLE} forward\n{body}")
                    }),
                )
            }
            Device::Ocelot => (
                opts.work_dir.join("manifests").join("swap.yaml"),
                Box::new(|n| {
                    format!(
                        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: swap\n  namespace: {GEN_K8S_NS}\n\
                         spec:\n  podSelector:\n    matchLabels:\n      app: nobody\n  ingress:\n    - ports:\n        - protocol: TCP\n          port: {}\n",
                        swap_port(n)
                    )
                }),
            ),
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = std::sync::Arc::clone(&stop);
        let node = tb.node.name().to_owned();
        let thread = std::thread::Builder::new()
            .name("xbench-swap".into())
            .spawn(move || -> Result<u64> {
                let mut swaps = 0u64;
                let mut next = Instant::now();
                while !thread_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let text = version(swaps);
                    // Written aside and renamed into place, so the agent never reads half a
                    // file (the `.tmp` extension is not one it loads).
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &text)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("renaming to {}", path.display()))?;
                    if device == Device::Kernel {
                        let out = Command::new("ip")
                            .args(["netns", "exec", &node, "nft", "-f"])
                            .arg(&path)
                            .stdin(Stdio::null())
                            .output()
                            .context("running nft")?;
                        if !out.status.success() {
                            bail!(
                                "nft -f {}: {}",
                                path.display(),
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                    }
                    swaps += 1;
                    next += period;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(swaps)
            })
            .context("spawning the swap thread")?;
        Ok(Some(Swapper {
            stop,
            thread: Some(thread),
        }))
    }

    /// Stops swapping; returns how many swaps were made.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the swap thread panicked"),
            None => Ok(0),
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use classifier::policy::compile::PolicyDecision;
    use classifier::policy::model::Protocol;
    use control::verdicts::Evaluator;

    /// The manifests load with the control plane's own loader, and its policy evaluator
    /// allows the benchmark's traffic (every destination port a flow can use) under every
    /// policy set, while the demo and generated sets still deny other traffic to the sink.
    #[test]
    fn manifests_load_and_allow_exactly_the_benchmark_traffic() {
        fn check(policy: PolicySet, rules: usize, policies: usize, other_denied: bool) {
            let gen_ip = Ipv4Addr::new(10, 71, 0, 1);
            let sink = Ipv4Addr::new(10, 71, 1, 1);
            let text = manifests_text(
                &[("gen-0".into(), gen_ip)],
                &[("sink-0".into(), sink)],
                policy,
                rules,
            );
            let dir = std::env::temp_dir().join(format!(
                "xbench-manifests-{}-{policy:?}-{rules}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("bench.yaml"), &text).unwrap();
            let m = control::manifests::load_dir(&dir).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            assert_eq!(m.cluster.namespaces.len(), 2, "{policy:?}");
            assert_eq!(m.cluster.pods.len(), 2, "{policy:?}");
            assert_eq!(m.cluster.policies.len(), policies, "{policy:?}");
            let eval = Evaluator::new(&m);
            for port in [DST_PORT_BASE, DST_PORT_BASE + 15, DST_PORT_LAST] {
                assert_eq!(
                    eval.check(gen_ip.into(), sink.into(), port, Protocol::Udp),
                    PolicyDecision::Allow,
                    "{policy:?} port {port}"
                );
            }
            let other = eval.check(gen_ip.into(), sink.into(), 80, Protocol::Tcp);
            assert_eq!(other != PolicyDecision::Allow, other_denied, "{policy:?}");
        }
        check(PolicySet::None, 0, 0, false);
        check(PolicySet::Demo, 0, 2, true);
        check(PolicySet::Generated, 3, 4, true);
        check(PolicySet::Generated, 0, 1, true);
    }

    #[test]
    fn nft_ruleset_puts_conntrack_first_and_the_allow_last() {
        fn check(policy: PolicySet, rules: usize, default: &str, lines: usize) {
            let text = nft_ruleset(
                policy,
                rules,
                &[Ipv4Addr::new(10, 71, 0, 1)],
                &[Ipv4Addr::new(10, 71, 1, 1)],
            );
            let body: Vec<&str> = text.lines().map(str::trim).collect();
            assert!(
                body.iter()
                    .any(|l| l.ends_with(&format!("policy {default};"))),
                "{text}"
            );
            let ct = body
                .iter()
                .position(|l| *l == "ct state established,related accept")
                .unwrap();
            let rule_lines: Vec<_> = body.iter().filter(|l| l.starts_with("ip daddr")).collect();
            assert_eq!(rule_lines.len(), lines, "{text}");
            if let Some(last) = rule_lines.last() {
                assert!(
                    last.contains("10.71.0.1") && last.contains("5001-5100"),
                    "{text}"
                );
                let at = body.iter().position(|l| l == *last).unwrap();
                assert!(ct < at);
            }
        }
        check(PolicySet::None, 5, "accept", 0);
        check(PolicySet::Demo, 5, "drop", 1);
        check(PolicySet::Generated, 5, "drop", 6);
    }
}
