//! The agent's configuration file (TOML) and its validation.
//!
//! ```toml
//! [node]
//! name = "node-1"            # default: $NODE_NAME, then the host name
//! pod_to_host = "drop"       # Calico's default; or "accept" (after the pod's egress policy)
//! host_interface = "ocelot0" # the tap into the node's own stack; "" for none (no pod ↔ node)
//! conntrack_capacity = 262144
//!
//! [xdp]
//! mode = "generic"           # "native" | "generic" | "auto"; veth runs copy mode either way
//! need_wakeup = true
//! busy_poll_us = 0           # 0: off
//! frames_per_worker = 8192
//! idle = "sleep"             # or "spin": never sleep (lowest latency, the core always busy)
//! sleep_after_us = 50        # "sleep": keep polling this long after the last frame
//!
//! [uplink]                  # optional: the node's link to everything that is not a local pod
//! interface = "eth0"
//! gateway = "192.168.0.1"   # default: the kernel's default route on the interface
//! gateway_mac = "02:00:00:00:00:01"   # optional static MAC; default: the kernel's neighbour table
//!
//! [datastore]
//! unknown_pods = "isolate"  # or "allow": pod interfaces that match no pod of the datastore
//!
//! [[workers]]
//! core = 1
//! interfaces = ["calic440f455693", "cali0123456789a:0"]   # "name" (queue 0) or "name:queue"
//! ```
//!
//! Without `[[workers]]`, the default is one worker per core except core 0, which is left to
//! the control thread (one worker on core 0 on a one-core machine). Pod interfaces named in
//! no worker's list are spread over the workers in sorted-name order.
//!
//! Validation happens before anything is attached, and every refusal names the entry: a
//! core that does not exist, the same core twice, an interface named twice (two workers on
//! one queue), a queue the interface does not have, an interface that does not exist,
//! unknown keys (typos are errors, not silently ignored settings).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use classifier::snapshot::PodToHost;
use dataplane::sys::{BusyPoll, SocketOpts, XdpMode};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node settings.
    #[serde(default)]
    pub node: NodeConfig,
    /// AF_XDP settings.
    #[serde(default)]
    pub xdp: XdpConfig,
    /// Workers; empty means the default layout.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
    /// The uplink, if any.
    pub uplink: Option<UplinkConfig>,
    /// Datastore settings.
    #[serde(default)]
    pub datastore: DatastoreConfig,
}

/// `[datastore]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// What happens to a pod interface that matches no pod of the datastore.
    #[serde(default)]
    pub unknown_pods: UnknownPods,
}

/// `unknown_pods`: the treatment of a host-side pod interface (`cali` + 11 hex digits) that
/// matches no pod the agent knows — created while the API server was unreachable, or before
/// the pod object arrived. Either way it takes the pod's identity and policy at the first
/// snapshot after the pod object arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum UnknownPods {
    /// Attached, every frame from it and every packet to its addresses dropped (counted as
    /// `unknown_pod`), listed as pending in the status file. The default: no policy is
    /// known to hold for it, and Calico's CNI plugin would not have created the pod at all
    /// without its datastore.
    #[default]
    Isolate,
    /// Attached and forwarded as a pod no policy selects, with no labels (only ipBlock
    /// rules of other pods' policies match it); its source address and MAC still checked.
    Allow,
}

impl UnknownPods {
    /// The value as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            UnknownPods::Isolate => "isolate",
            UnknownPods::Allow => "allow",
        }
    }
}

impl TryFrom<String> for UnknownPods {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<UnknownPods, ConfigError> {
        match s.as_str() {
            "isolate" => Ok(UnknownPods::Isolate),
            "allow" => Ok(UnknownPods::Allow),
            _ => Err(ConfigError {
                entry: "datastore.unknown_pods".into(),
                why: format!("{s:?} is neither \"isolate\" nor \"allow\""),
            }),
        }
    }
}

/// `[uplink]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Interface name (queue 0 unless a worker lists `name:queue`).
    pub interface: String,
    /// The default gateway's address (default: the kernel's default route on the
    /// interface).
    pub gateway: Option<std::net::IpAddr>,
    /// A static MAC for the default routes' next hop (default: resolved by the kernel).
    pub gateway_mac: Option<String>,
}

impl UplinkConfig {
    /// The gateway MAC, parsed.
    pub fn gateway(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        self.gateway_mac
            .as_deref()
            .map(|m| {
                super::ports::parse_mac(m).ok_or_else(|| ConfigError {
                    entry: "uplink.gateway_mac".into(),
                    why: format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                })
            })
            .transpose()
    }
}

/// `[node]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name.
    pub name: Option<String>,
    /// Pod-to-node traffic.
    #[serde(default)]
    pub pod_to_host: PodToHostConfig,
    /// Conntrack entries (shared by all workers).
    #[serde(default = "default_ct_capacity")]
    pub conntrack_capacity: usize,
    /// The tap device through which the node's own stack reaches its pods and they reach
    /// it; empty: no host path (the node cannot reach its pods, pod → node traffic drops).
    #[serde(default = "default_host_interface")]
    pub host_interface: String,
}

fn default_host_interface() -> String {
    "ocelot0".to_owned()
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            pod_to_host: PodToHostConfig::default(),
            conntrack_capacity: default_ct_capacity(),
            host_interface: default_host_interface(),
        }
    }
}

fn default_ct_capacity() -> usize {
    1 << 18
}

/// `pod_to_host`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodToHostConfig {
    /// Calico's default.
    #[default]
    Drop,
    /// After egress policy.
    Accept,
}

impl From<PodToHostConfig> for PodToHost {
    fn from(c: PodToHostConfig) -> PodToHost {
        match c {
            PodToHostConfig::Drop => PodToHost::Drop,
            PodToHostConfig::Accept => PodToHost::Accept,
        }
    }
}

/// `[xdp]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// Attach mode.
    #[serde(default)]
    pub mode: XdpModeConfig,
    /// `XDP_USE_NEED_WAKEUP`.
    #[serde(default = "yes")]
    pub need_wakeup: bool,
    /// Busy polling in microseconds; 0 is off.
    #[serde(default)]
    pub busy_poll_us: u32,
    /// UMEM frames per worker.
    #[serde(default = "default_frames")]
    pub frames_per_worker: u32,
    /// What an idle worker does.
    #[serde(default)]
    pub idle: IdleConfig,
    /// With `idle = "sleep"`: microseconds a worker keeps polling after its last frame before
    /// it sleeps (and at least 256 empty polls). Frames that come closer together than this
    /// never wait for a wakeup; the price is up to this much busy time after each burst.
    #[serde(default = "default_sleep_after_us")]
    pub sleep_after_us: u32,
}

fn default_sleep_after_us() -> u32 {
    50
}

/// The largest `sleep_after_us`: beyond a second, `idle = "spin"` says what is meant.
pub const MAX_SLEEP_AFTER_US: u32 = 1_000_000;

/// `idle`: how a worker waits when no frames arrive.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdleConfig {
    /// After `sleep_after_us` without work (and at least 256 empty polls), sleep in poll(2)
    /// until a socket or a hand-off wakes it: the core is free for others, and a frame after a
    /// quiet spell waits for the wakeup (tens of µs).
    #[default]
    Sleep,
    /// Never sleep: the lowest latency, and the worker's core at 100 % whatever the traffic
    /// (for cores dedicated to the dataplane).
    Spin,
}

impl XdpConfig {
    /// The worker loop's idle policy.
    pub fn worker_idle(&self) -> dataplane::rawfwd::Idle {
        match self.idle {
            IdleConfig::Sleep => dataplane::rawfwd::Idle::Poll {
                after_empty_polls: 256,
                linger_us: self.sleep_after_us,
                timeout_ms: 10,
            },
            IdleConfig::Spin => dataplane::rawfwd::Idle::Spin,
        }
    }
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            mode: XdpModeConfig::default(),
            need_wakeup: true,
            busy_poll_us: 0,
            frames_per_worker: default_frames(),
            idle: IdleConfig::default(),
            sleep_after_us: default_sleep_after_us(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_frames() -> u32 {
    8192
}

/// `mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native where the driver has it.
    #[default]
    Auto,
    /// Generic (skb) mode.
    Generic,
    /// Native (driver) mode.
    Native,
}

impl XdpConfig {
    /// Socket options from these settings.
    pub fn socket_opts(&self) -> SocketOpts {
        SocketOpts {
            xdp_mode: match self.mode {
                XdpModeConfig::Auto => XdpMode::Auto,
                XdpModeConfig::Generic => XdpMode::Generic,
                XdpModeConfig::Native => XdpMode::Native,
            },
            need_wakeup: self.need_wakeup,
            busy_poll: (self.busy_poll_us > 0).then_some(BusyPoll {
                timeout_us: self.busy_poll_us,
                budget: 64,
            }),
            ..SocketOpts::default()
        }
    }
}

/// `[[workers]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The core it is pinned to.
    pub core: usize,
    /// `name` or `name:queue` entries it owns.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// A refusal, naming the entry.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where (`workers[1].core`, `workers[0].interfaces[2]`, `xdp.frames_per_worker`).
    pub entry: String,
    /// What is wrong.
    pub why: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.entry, self.why)
    }
}

impl std::error::Error for ConfigError {}

/// One (interface, queue) a worker owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Queue {
    /// Interface name.
    pub interface: String,
    /// Queue index.
    pub queue: u32,
}

/// What the machine has, for validation (a trait so tests can describe any machine).
pub trait Machine {
    /// Number of CPU cores usable by this process.
    fn cores(&self) -> usize;
    /// Receive queues of an interface in the agent's namespace; `None` if it does not exist.
    fn rx_queues(&self, interface: &str) -> Option<u32>;
}

/// A validated worker layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Per worker: its core and the queues it owns.
    pub workers: Vec<(usize, Vec<Queue>)>,
}

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the config against the machine and assigns `pod_interfaces` (the pod veths the
    /// agent will attach to, queue 0) to workers. Every error names its entry.
    pub fn layout(
        &self,
        machine: &dyn Machine,
        pod_interfaces: &[String],
    ) -> Result<Layout, ConfigError> {
        let err = |entry: String, why: String| ConfigError { entry, why };
        if !(64..=1 << 20).contains(&self.xdp.frames_per_worker) {
            return Err(err(
                "xdp.frames_per_worker".into(),
                format!("{} is not in 64..=1048576", self.xdp.frames_per_worker),
            ));
        }
        if self.xdp.sleep_after_us > MAX_SLEEP_AFTER_US {
            return Err(err(
                "xdp.sleep_after_us".into(),
                format!(
                    "{} is more than {MAX_SLEEP_AFTER_US} (a second); for a worker that never sleeps, say idle = \"spin\"",
                    self.xdp.sleep_after_us
                ),
            ));
        }
        let host = &self.node.host_interface;
        if host.len() > 15 || host.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(err(
                "node.host_interface".into(),
                format!(
                    "{host:?} is not an interface name (at most 15 characters, no '/' or spaces)"
                ),
            ));
        }
        if host.is_empty() && self.node.pod_to_host == PodToHostConfig::Accept {
            return Err(err(
                "node.pod_to_host".into(),
                "\"accept\" needs the host path, and node.host_interface is empty".into(),
            ));
        }
        if !host.is_empty() && machine.rx_queues(host).is_some() {
            return Err(err(
                "node.host_interface".into(),
                format!("{host:?} already exists: another agent, or another program's interface"),
            ));
        }
        if self.node.conntrack_capacity < 1024 {
            return Err(err(
                "node.conntrack_capacity".into(),
                format!("{} is below 1024", self.node.conntrack_capacity),
            ));
        }
        let cores = machine.cores();
        let mut workers: Vec<(usize, Vec<Queue>)> = Vec::new();
        if self.workers.is_empty() {
            let first = usize::from(cores > 1);
            for core in first..cores.max(1) {
                workers.push((core, Vec::new()));
            }
        }
        let mut owner: BTreeMap<Queue, String> = BTreeMap::new();
        let mut core_owner: BTreeMap<usize, usize> = BTreeMap::new();
        for (w, wc) in self.workers.iter().enumerate() {
            if wc.core >= cores {
                return Err(err(
                    format!("workers[{w}].core"),
                    format!(
                        "core {} does not exist (this machine has cores 0..={})",
                        wc.core,
                        cores.saturating_sub(1)
                    ),
                ));
            }
            if let Some(other) = core_owner.insert(wc.core, w) {
                return Err(err(
                    format!("workers[{w}].core"),
                    format!("core {} is already workers[{other}]'s", wc.core),
                ));
            }
            let mut queues = Vec::new();
            for (i, entry) in wc.interfaces.iter().enumerate() {
                let here = format!("workers[{w}].interfaces[{i}]");
                let queue = parse_queue(entry).map_err(|why| err(here.clone(), why))?;
                let Some(n) = machine.rx_queues(&queue.interface) else {
                    return Err(err(
                        here,
                        format!("interface {:?} does not exist", queue.interface),
                    ));
                };
                if queue.queue >= n {
                    return Err(err(
                        here,
                        format!(
                            "queue {} is out of range: {} has queues 0..={}",
                            queue.queue,
                            queue.interface,
                            n.saturating_sub(1)
                        ),
                    ));
                }
                if let Some(prev) = owner.insert(queue.clone(), here.clone()) {
                    return Err(err(
                        here,
                        format!(
                            "{}:{} is already owned by {prev} (one worker per queue)",
                            queue.interface, queue.queue
                        ),
                    ));
                }
                queues.push(queue);
            }
            workers.push((wc.core, queues));
        }
        if let Some(up) = &self.uplink {
            up.gateway()?;
            let Some(n) = machine.rx_queues(&up.interface) else {
                return Err(err(
                    "uplink.interface".into(),
                    format!("interface {:?} does not exist", up.interface),
                ));
            };
            let listed = owner.keys().any(|q| q.interface == up.interface);
            if !listed {
                // Every queue of the uplink, spread over the workers like pods.
                for queue in 0..n {
                    let k = queue as usize % workers.len().max(1);
                    if let Some((_, queues)) = workers.get_mut(k) {
                        let q = Queue {
                            interface: up.interface.clone(),
                            queue,
                        };
                        owner.insert(q.clone(), "uplink.interface".into());
                        queues.push(q);
                    }
                }
            }
        }
        // Pod veths not placed explicitly: spread them in sorted order, so a restart with the
        // same pods gives the same layout.
        let mut rest: Vec<&String> = pod_interfaces
            .iter()
            .filter(|name| {
                !owner.contains_key(&Queue {
                    interface: (*name).clone(),
                    queue: 0,
                })
            })
            .collect();
        rest.sort();
        rest.dedup();
        let n = workers.len();
        for (k, name) in rest.into_iter().enumerate() {
            if let Some((_, queues)) = workers.get_mut(k % n) {
                queues.push(Queue {
                    interface: name.clone(),
                    queue: 0,
                });
            }
        }
        Ok(Layout { workers })
    }
}

/// `name` or `name:queue`.
fn parse_queue(entry: &str) -> Result<Queue, String> {
    let (name, queue) = match entry.rsplit_once(':') {
        Some((name, q)) => (
            name,
            q.parse::<u32>()
                .map_err(|_| format!("{entry:?}: queue {q:?} is not a number"))?,
        ),
        None => (entry, 0),
    };
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{entry:?} is not an interface name"));
    }
    Ok(Queue {
        interface: name.to_owned(),
        queue,
    })
}

/// This machine, as seen from the agent's network namespace.
#[derive(Debug, Default)]
pub struct Host;

impl Machine for Host {
    fn cores(&self) -> usize {
        core_affinity::get_core_ids().map_or(1, |ids| ids.len())
    }

    fn rx_queues(&self, interface: &str) -> Option<u32> {
        dataplane::sys::ifindex(interface).ok()?;
        // `ip netns exec` mounts the namespace's own sysfs, so this is the right device.
        let dir = std::fs::read_dir(format!("/sys/class/net/{interface}/queues")).ok();
        let n = dir.map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        });
        Some((n as u32).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeMachine;

    impl Machine for FakeMachine {
        fn cores(&self) -> usize {
            2
        }
        fn rx_queues(&self, interface: &str) -> Option<u32> {
            match interface {
                "eth0" => Some(4),
                "vA" | "vB" | "vC" => Some(1),
                _ => None,
            }
        }
    }

    fn pods() -> Vec<String> {
        vec!["vB".into(), "vA".into(), "vC".into()]
    }

    fn check(text: &str, expected: Result<Vec<(usize, Vec<&str>)>, &str>) {
        let layout = Config::parse(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.layout(&FakeMachine, &pods()).map_err(|e| e.to_string()));
        let got = layout.map(|l| {
            l.workers
                .into_iter()
                .map(|(core, qs)| {
                    (
                        core,
                        qs.into_iter()
                            .map(|q| format!("{}:{}", q.interface, q.queue))
                            .collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        });
        match (got, expected) {
            (Ok(got), Ok(want)) => {
                let want: Vec<(usize, Vec<String>)> = want
                    .into_iter()
                    .map(|(c, qs)| (c, qs.into_iter().map(String::from).collect()))
                    .collect();
                assert_eq!(got, want, "{text}");
            }
            (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}"),
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn layouts_and_refusals() {
        // Default: one worker on core 1 (core 0 left to control), pods in sorted order.
        check("", Ok(vec![(1, vec!["vA:0", "vB:0", "vC:0"])]));
        check(
            "[[workers]]\ncore = 0\n[[workers]]\ncore = 1\ninterfaces = [\"vC\", \"eth0:3\"]\n",
            Ok(vec![(0, vec!["vA:0"]), (1, vec!["vC:0", "eth0:3", "vB:0"])]),
        );
        check(
            "[[workers]]\ncore = 7\n",
            Err("workers[0].core: core 7 does not exist"),
        );
        check(
            "[[workers]]\ncore = 1\n[[workers]]\ncore = 1\n",
            Err("workers[1].core: core 1 is already workers[0]'s"),
        );
        check(
            "[[workers]]\ncore = 0\ninterfaces = [\"eth0:4\"]\n",
            Err("workers[0].interfaces[0]: queue 4 is out of range"),
        );
        check(
            "[[workers]]\ncore = 0\ninterfaces = [\"nope\"]\n",
            Err("workers[0].interfaces[0]: interface \"nope\" does not exist"),
        );
        check(
            "[[workers]]\ncore = 0\ninterfaces = [\"vA\"]\n[[workers]]\ncore = 1\ninterfaces = [\"vA:0\"]\n",
            Err("workers[1].interfaces[0]: vA:0 is already owned by workers[0].interfaces[0]"),
        );
        check(
            "[[workers]]\ncore = 0\ninterfaces = [\"eth0:x\"]\n",
            Err("queue \"x\" is not a number"),
        );
        check("[node]\nnmae = \"typo\"\n", Err("unknown field `nmae`"));
        check(
            "[xdp]\nframes_per_worker = 1\n",
            Err("xdp.frames_per_worker: 1 is not in 64..=1048576"),
        );
        check("[xdp]\nmode = \"turbo\"\n", Err("unknown variant `turbo`"));
        check(
            "[xdp]\nidle = \"spin\"\n",
            Ok(vec![(1, vec!["vA:0", "vB:0", "vC:0"])]),
        );
        check("[xdp]\nidle = \"nap\"\n", Err("unknown variant `nap`"));
        check(
            "[xdp]\nsleep_after_us = 0\n",
            Ok(vec![(1, vec!["vA:0", "vB:0", "vC:0"])]),
        );
        check(
            "[xdp]\nsleep_after_us = 2000000\n",
            Err("xdp.sleep_after_us: 2000000 is more than 1000000"),
        );
        check("[xdp]\nsleep_after_us = -1\n", Err("sleep_after_us"));
        check(
            "[datastore]\nunknown_pods = \"open\"\n",
            Err("datastore.unknown_pods: \"open\" is neither \"isolate\" nor \"allow\""),
        );
        check(
            "[datastore]\nunknwon_pods = \"allow\"\n",
            Err("unknown field `unknwon_pods`"),
        );
        assert_eq!(
            Config::parse("[datastore]\nunknown_pods = \"allow\"\n")
                .ok()
                .map(|c| c.datastore.unknown_pods),
            Some(UnknownPods::Allow)
        );
        assert_eq!(
            Config::parse("").ok().map(|c| c.datastore.unknown_pods),
            Some(UnknownPods::Isolate)
        );
        check(
            "[node]\npod_to_host = \"accept\"\n",
            Ok(vec![(1, vec!["vA:0", "vB:0", "vC:0"])]),
        );
        check(
            "[node]\npod_to_host = \"accept\"\nhost_interface = \"\"\n",
            Err("node.pod_to_host: \"accept\" needs the host path"),
        );
        check(
            "[node]\nhost_interface = \"eth0\"\n",
            Err("node.host_interface: \"eth0\" already exists"),
        );
        check(
            "[node]\nhost_interface = \"a/b\"\n",
            Err("node.host_interface: \"a/b\" is not an interface name"),
        );
        check(
            "[uplink]\ninterface = \"eth0\"\n[[workers]]\ncore = 0\n[[workers]]\ncore = 1\n",
            Ok(vec![
                (0, vec!["eth0:0", "eth0:2", "vA:0", "vC:0"]),
                (1, vec!["eth0:1", "eth0:3", "vB:0"]),
            ]),
        );
        check(
            "[uplink]\ninterface = \"eth9\"\n",
            Err("uplink.interface: interface \"eth9\" does not exist"),
        );
        check(
            "[uplink]\ninterface = \"eth0\"\ngateway_mac = \"nope\"\n",
            Err("uplink.gateway_mac: \"nope\" is not a MAC address"),
        );
    }
}
