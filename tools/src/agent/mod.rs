//! `ocelot run`: the node agent — a control thread and pinned polling workers.
//!
//! Start-up, in an order that attaches nothing until everything has been checked:
//! 1. read and validate the config ([`config`]), load the manifests, find the host-side veths
//!    of the pods (Calico's names, [`control::naming`]) and the worker layout; any error
//!    stops here, naming the entry;
//! 2. remove AF_XDP programs a crashed run left on those interfaces (another owner's program
//!    is an error, never replaced), build the first snapshot ([`control::node`]);
//! 3. start one thread per worker: pinned to its core, it creates its UMEM, opens its
//!    sockets, wires the hand-offs to the other workers and polls;
//! 4. print `ocelot: ready` on stderr when every worker polls.
//!
//! Then the control thread (the caller's thread) watches the manifests directory: a change
//! is loaded, compiled into a new snapshot with the next epoch and published with one atomic
//! swap; workers use it from their next burst. A directory that fails to load keeps the
//! previous snapshot in force (logged and counted). The control thread also sweeps
//! conntrack and writes the status file. SIGINT/SIGTERM (or a worker's I/O error) stop the
//! workers, whose sockets detach the XDP programs as they are dropped.

pub mod config;
pub mod hostpath;
pub mod metrics;
pub mod ports;
pub mod source;
pub mod status;
pub mod unknown;
pub mod uplink;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use classifier::Nanos;
use classifier::conntrack::{Conntrack, CtConfig};
use classifier::snapshot::{PathConfig, Snapshot};
use classifier::verdict::PortId;
use control::manifests::Manifests;
use control::naming::veth_name;
use control::node::{BuildReport, NodeOptions, PortRole, PortSpec, SnapshotBuilder};
use control::reap::Reaper;
use dataplane::handoff::{self, Doorbell, HandoffRx, HandoffTx};
use dataplane::live::LiveCounters;
use dataplane::sys::{self, UmemOpts};
use dataplane::worker::{Pipeline, Worker, WorkerPort};

use self::config::{Config, Host, Layout, UnknownPods};
use self::hostpath::{HostLinks, HostPath, HostTap, HostThread};
use self::status::Status;

/// The line printed on stderr once every worker polls.
pub const READY_LINE: &str = "ocelot: ready";

/// How often the control thread looks at the manifests directory.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Frames a hand-off between two workers can hold.
const HANDOFF_CAPACITY: usize = 1024;

/// Conntrack slots swept per control tick.
const SWEEP_SLOTS: usize = 16 * 1024;

/// Monotonic nanoseconds since the agent started: the clock the classifier is given.
pub fn now() -> Nanos {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as Nanos
}

/// What `ocelot run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The TOML config.
    pub config: PathBuf,
    /// The datastore: manifest directories, or the Kubernetes API.
    pub datastore: source::Datastore,
    /// Where to write the status JSON (atomically, every second and after each change).
    pub status: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

/// One port the agent attached to.
#[derive(Debug, Clone)]
struct AgentPort {
    spec: PortSpec,
    worker: usize,
    queue: u32,
    /// More (worker, queue) pairs of the same interface (a multi-queue uplink).
    more_queues: Vec<(usize, u32)>,
    /// The interface's index when it was attached: a pod recreated under the same name gets
    /// a new veth, which must be attached anew.
    ifindex: u32,
}

/// What the control thread asks of a running worker.
#[derive(Debug)]
enum WorkerCmd {
    /// Open a socket on (interface, queue) of this worker's UMEM as port `id`.
    Attach {
        name: String,
        queue: u32,
        id: PortId,
    },
    /// Close port `id` (its pod is gone).
    Retire { id: PortId },
    /// Frames for port `id` go to the worker at the other end of hand-off `out`.
    Route { id: PortId, out: usize },
}

/// A running worker thread and the control thread's lines to it.
#[derive(Debug)]
struct WorkerHandle {
    core: usize,
    live: Arc<LiveCounters>,
    thread: JoinHandle<Result<()>>,
    cmds: mpsc::Sender<WorkerCmd>,
    acks: mpsc::Receiver<Result<(), String>>,
    attention: Arc<AtomicBool>,
    doorbell: Arc<Doorbell>,
    /// Index of the hand-off to each other worker, by that worker's index.
    outs: Vec<Option<usize>>,
}

impl WorkerHandle {
    /// Sends commands and waits for every answer.
    fn command(&self, cmds: Vec<WorkerCmd>) -> Result<()> {
        let n = cmds.len();
        for c in cmds {
            self.cmds
                .send(c)
                .map_err(|_| anyhow!("worker on core {} is gone", self.core))?;
        }
        self.attention.store(true, Ordering::SeqCst);
        self.doorbell.ring();
        let mut first_error = None;
        for _ in 0..n {
            match self.acks.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(anyhow!(e));
                }
                Err(_) => {
                    return Err(anyhow!(
                        "worker on core {} did not answer within 10 s",
                        self.core
                    ));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The pods of the datastore that should have a port here: veth name → (namespace, name).
///
/// From the Kubernetes API a pod is this node's when its `spec.nodeName` says so. A
/// manifests directory describes pods wherever they run (the lab builds them on its own
/// nodes), so there every pod is a candidate and its veth's presence decides.
fn wanted_pods(
    manifests: &Manifests,
    node: &str,
    cluster_view: bool,
) -> BTreeMap<String, (String, String)> {
    manifests
        .cluster
        .pods
        .iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .filter(|p| !cluster_view || p.node.as_deref() == Some(node))
        .map(|p| {
            (
                veth_name(&p.namespace, &p.name),
                (p.namespace.clone(), p.name.clone()),
            )
        })
        .collect()
}

/// Runs the agent until `stop` is set. Returns an error for anything that prevented a clean
/// start or stopped a worker.
pub fn run(opts: &RunOptions, stop: &Arc<AtomicBool>) -> Result<()> {
    now();
    if std::env::var_os("OCELOT_LIBXDP_LOG").is_none() {
        sys::quiet_libxdp();
    }
    let config = Config::load(&opts.config)?;
    // Bound first: a bad address stops the start-up before anything is attached, and the
    // endpoint answers while the agent waits for its first sync.
    let metrics = match opts.metrics {
        Some(addr) => {
            let m = Arc::new(metrics::Metrics::new());
            let server = metrics::serve(addr, Arc::clone(&m), Arc::clone(stop))?;
            tracing::info!("metrics at http://{addr}/metrics");
            Some((m, server))
        }
        None => None,
    };
    let node_name = config
        .node
        .name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .unwrap_or_else(hostname);
    let (mut source, mut manifests) = source::Source::open(&opts.datastore, &node_name, stop)?;
    let cluster_view = source.is_cluster();

    // Which pods have a veth here: the names CNI (or `ocelot lab`) gave them. Pods whose veth
    // appears later are attached when it does.
    let wanted = wanted_pods(&manifests, &node_name, cluster_view);
    let present: Vec<String> = wanted
        .keys()
        .filter(|name| sys::ifindex(name).is_ok())
        .cloned()
        .collect();
    if present.len() < wanted.len() {
        tracing::info!(
            "{} of {} pods have no interface here yet; they are attached when it appears",
            wanted.len() - present.len(),
            wanted.len()
        );
    }
    let layout = config
        .layout(&Host, &present)
        .map_err(|e| anyhow!("config {}: {e}", opts.config.display()))?;
    let gateway = match &config.uplink {
        Some(up) => up
            .gateway()
            .map_err(|e| anyhow!("config {}: {e}", opts.config.display()))?,
        None => None,
    };
    let mut ports = assign_ports(&layout, &wanted, gateway)?;
    for p in &ports {
        if let Some(prog) = sys::detach_stale_xsk_prog(&p.spec.name)
            .with_context(|| format!("interface {}", p.spec.name))?
        {
            tracing::warn!(
                "removed XDP program {prog} a previous run left on {}",
                p.spec.name
            );
        }
    }
    // The host path's tap: a port id like any other, owned by no worker.
    let host_tap = match config.node.host_interface.as_str() {
        "" => None,
        name => {
            let tap = HostTap::open(name)?;
            ports.push(AgentPort {
                spec: PortSpec {
                    name: name.to_owned(),
                    mac: hostpath::HOST_PATH_MAC,
                    role: PortRole::Host,
                },
                worker: NO_WORKER,
                queue: 0,
                more_queues: Vec::new(),
                ifindex: sys::ifindex(name)?,
            });
            Some((tap, PortId((ports.len() - 1) as u16)))
        }
    };
    for p in ports.iter().filter(|p| p.worker != NO_WORKER) {
        ports::check_mtu(&p.spec.name, UmemOpts::default().frame_size);
    }
    let mut specs: Vec<Option<PortSpec>> = ports.iter().map(|p| Some(p.spec.clone())).collect();
    let mut uplink = match &config.uplink {
        Some(up) => Some(uplink::Uplink::attach(
            up,
            config.xdp.socket_opts().xdp_mode,
        )?),
        None => None,
    };
    let mut view = uplink::UplinkView::default();
    if let Some(up) = uplink.as_mut() {
        view = up.wait_resolved(&manifests, &node_name, Duration::from_secs(3));
    }
    let node_options = |view: &uplink::UplinkView| NodeOptions {
        local_node: cluster_view.then(|| node_name.clone()),
        node_name: Some(node_name.clone()),
        path: PathConfig {
            pod_to_host: config.node.pod_to_host.into(),
        },
        host_addresses: {
            let mut all = view.host_addresses.clone();
            all.extend(ports::node_addresses());
            all.sort();
            all.dedup();
            all
        },
        gateway: view.gateway,
        neighbors: view.neighbors.clone(),
    };
    let mut node_opts = node_options(&view);
    let mut epoch = 1;
    // Keeps the policy compile's pods-and-namespaces half between snapshots, so an update
    // recompiles what changed.
    let mut builder = SnapshotBuilder::default();
    // Replaced `Manifests` and snapshots are freed here, off the control thread's path from
    // one update to the next.
    let reaper = Reaper::spawn("ocelot-reaper").context("starting the reaper thread")?;
    let (snapshot, report) = builder.build(&manifests, &specs, &node_opts, epoch);
    log_report(&report);
    let published = Arc::new(ArcSwap::from_pointee(snapshot));
    let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0);
    let ct = Arc::new(Conntrack::with_seed(
        CtConfig {
            capacity: config.node.conntrack_capacity,
            ..CtConfig::default()
        },
        seed,
    ));

    let uplink_name = uplink.as_ref().map(|u| u.interface.clone());
    let host_bell = match host_tap {
        Some(_) => Some(Doorbell::new().context("creating the host path's doorbell")?),
        None => None,
    };
    let (workers, handles, links) = start_workers(
        &config,
        &layout,
        &ports,
        uplink_name.as_deref(),
        &published,
        &ct,
        stop,
        host_bell.as_ref(),
    )?;
    let mut host = match (host_tap, host_bell) {
        (Some((tap, id)), Some(doorbell)) => {
            let mut host = HostPath::start(HostThread {
                tap,
                id,
                links,
                doorbell,
                published: Arc::clone(&published),
                ct: Arc::clone(&ct),
                stop: Arc::clone(stop),
            })?;
            host.set_owners(owners(&ports, &specs));
            host.sync_routes(&host_path_ips(&published.load(), &specs));
            Some(host)
        }
        _ => None,
    };
    if let Some(up) = uplink.as_mut() {
        up.register(&handles)?;
        up.sync_local_pods(&local_pod_ips(&published.load(), &specs));
    }
    say(format_args!(
        "{READY_LINE} (node {node_name}, epoch {epoch}, {} ports, {} workers on cores {:?}{})",
        ports.iter().filter(|p| p.worker != NO_WORKER).count(),
        workers.len(),
        workers.iter().map(|w| w.core).collect::<Vec<_>>(),
        match &host {
            Some(h) => format!(", host path {}", h.name()),
            None => String::new(),
        }
    ));

    let mut status = Status::new(
        &node_name,
        &ports_summary(&ports),
        epoch,
        source.digest(),
        &report,
    );
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut retry_after: BTreeMap<String, Instant> = BTreeMap::new();
    // Interfaces retired because their pod was deleted (name → ifindex): not adopted as
    // unknown while that same interface lives.
    let mut retired: BTreeMap<String, u32> = BTreeMap::new();
    // Unknown pod interfaces attached, and since when.
    let mut unknown_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut result = Ok(());
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // A datastore update is applied as soon as it arrives (a Kubernetes view wakes this
        // wait); the rest of the housekeeping — neighbours, addresses, conntrack sweep — runs
        // once per WATCH_INTERVAL.
        let polled = source.wait(WATCH_INTERVAL.saturating_sub(last_tick.elapsed()));
        let tick = last_tick.elapsed() >= WATCH_INTERVAL;
        if tick {
            last_tick = Instant::now();
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(dead) = workers.iter().position(|w| w.thread.is_finished()) {
            result = Err(anyhow!("worker {dead} stopped unexpectedly"));
            break;
        }
        if host.as_ref().is_some_and(HostPath::is_finished) {
            result = Err(anyhow!("the host path stopped unexpectedly"));
            break;
        }
        if tick {
            ct.sweep(now(), SWEEP_SLOTS);
            if let Some(h) = host.as_mut() {
                h.check_routes();
            }
        }
        let mut changed = false;
        match polled {
            Some(Ok(m)) => {
                let old = std::mem::replace(&mut manifests, m);
                if let Some(old) = source.give_back(old) {
                    reaper.drop_later(old);
                }
                changed = true;
            }
            Some(Err(e)) => {
                tracing::error!("{e:#}; keeping epoch {epoch}");
                status.load_errors += 1;
                status.last_error = Some(format!("{e:#}"));
            }
            None => {}
        }
        // Ports follow the pods: retire those whose pod or veth is gone, give an unknown
        // interface whose pod arrived that pod's identity, attach new ones.
        let wanted = wanted_pods(&manifests, &node_name, cluster_view);
        for (id, port) in ports.iter().enumerate() {
            let Some(spec) = specs.get(id).and_then(Option::as_ref) else {
                continue;
            };
            let name = spec.name.clone();
            let here = sys::ifindex(&name).ok() == Some(port.ifindex);
            let adopt = match (&spec.role, wanted.get(&name)) {
                (PortRole::UnknownPod { pod_mac, .. }, Some((namespace, pod))) if here => {
                    Some(PortRole::Pod {
                        namespace: namespace.clone(),
                        name: pod.clone(),
                        pod_mac: *pod_mac,
                    })
                }
                _ => None,
            };
            let gone = match &spec.role {
                PortRole::Uplink { .. } | PortRole::Host => false,
                PortRole::Pod { .. } => !here || !wanted.contains_key(&name),
                PortRole::UnknownPod { .. } => !here,
            };
            if let Some(role) = adopt {
                // Same port, same socket: the pod's identity and policy from the next
                // snapshot on.
                let pending = unknown_since
                    .remove(&name)
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                if let PortRole::Pod {
                    namespace,
                    name: pod,
                    ..
                } = &role
                {
                    tracing::info!(
                        "{name}: pod {namespace}/{pod} arrived after {pending:.1} s as an \
                         unknown interface; its identity and policy apply from the next snapshot"
                    );
                }
                if let Some(Some(s)) = specs.get_mut(id) {
                    s.role = role;
                }
                changed = true;
                continue;
            }
            if gone {
                if here {
                    // Its pod was deleted: not an unknown interface to adopt (the CNI plugin
                    // is about to remove it).
                    retired.insert(name.clone(), port.ifindex);
                }
                let owner = workers.get(port.worker).context("worker index")?;
                if let Err(e) = owner.command(vec![WorkerCmd::Retire {
                    id: PortId(id as u16),
                }]) {
                    tracing::error!("retiring {name}: {e:#}");
                }
                tracing::info!("retired port {id} ({name})");
                unknown_since.remove(&name);
                if let Some(slot) = specs.get_mut(id) {
                    *slot = None;
                }
                changed = true;
            }
        }
        for (name, (namespace, pod)) in &wanted {
            let attached = specs.iter().flatten().any(|s| s.name == *name);
            let waiting = retry_after.get(name).is_some_and(|t| Instant::now() < *t);
            let Ok(ifindex) = sys::ifindex(name) else {
                continue;
            };
            if attached || waiting {
                continue;
            }
            let role = PortRole::Pod {
                namespace: namespace.clone(),
                name: pod.clone(),
                pod_mac: ports::peer_mac(name),
            };
            match attach(&workers, &ports, name, role, ifindex) {
                Ok(port) => {
                    tracing::info!(
                        "attached {name} ({namespace}/{pod}) as port {} on worker {}",
                        ports.len(),
                        port.worker
                    );
                    specs.push(Some(port.spec.clone()));
                    ports.push(port);
                    retry_after.remove(name);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!("attaching {name} ({namespace}/{pod}): {e:#}; retrying in 5 s");
                    retry_after.insert(name.clone(), Instant::now() + Duration::from_secs(5));
                }
            }
        }
        changed |= follow_unknown_pods(
            &workers,
            &mut ports,
            &mut specs,
            &UnknownState {
                wanted: &wanted,
                uplink: uplink_name.as_deref(),
                treatment: config.datastore.unknown_pods,
            },
            &mut retired,
            &mut retry_after,
            &mut unknown_since,
        );
        if tick && let Some(up) = uplink.as_mut() {
            view = up.refresh(&manifests, &node_name);
        }
        let fresh = if tick {
            node_options(&view)
        } else {
            node_opts.clone()
        };
        if (&fresh.host_addresses, &fresh.gateway, &fresh.neighbors)
            != (
                &node_opts.host_addresses,
                &node_opts.gateway,
                &node_opts.neighbors,
            )
        {
            node_opts = fresh;
            changed = true;
        }
        // Pods whose MAC could not be read yet: retry (their route appears when it can).
        for spec in specs.iter_mut().flatten() {
            if let PortRole::Pod {
                pod_mac: mac @ None,
                ..
            }
            | PortRole::UnknownPod {
                pod_mac: mac @ None,
                ..
            } = &mut spec.role
                && let Some(found) = ports::peer_mac(&spec.name)
            {
                *mac = Some(found);
                changed = true;
            }
        }
        if changed {
            epoch += 1;
            let (snapshot, report) = builder.build(&manifests, &specs, &node_opts, epoch);
            log_report(&report);
            let local_ips = local_pod_ips(&snapshot, &specs);
            reaper.drop_shared_later(published.swap(Arc::new(snapshot)));
            if let Some(up) = uplink.as_mut() {
                up.sync_local_pods(&local_ips);
            }
            if let Some(host) = host.as_mut() {
                host.set_owners(owners(&ports, &specs));
                host.sync_routes(&host_path_ips(&published.load(), &specs));
            }
            tracing::info!("epoch {epoch} published");
            status.set_ports(&ports_summary_live(&ports, &specs));
            status.applied(epoch, source.digest(), &report);
            last_status = Instant::now() - Duration::from_secs(10);
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            status.unknown_pods =
                unknown_pods_status(&specs, &unknown_since, config.datastore.unknown_pods);
            status.datastore = source.status();
            status.workers = workers.iter().map(|w| (w.core, w.live.load())).collect();
            status.host = host
                .as_ref()
                .map(|h| (h.name().to_owned(), h.live.load(), h.route_errors()));
            if let Some((m, _)) = &metrics {
                let ds = &status.datastore;
                m.update(&metrics::Sample {
                    workers: &status.workers,
                    epoch,
                    datastore: ds["datastore"].as_str().unwrap_or("manifests"),
                    connected: ds["connected"].as_bool().unwrap_or(true),
                    stale_seconds: ds["stale_seconds"].as_f64().unwrap_or(0.0),
                    load_errors: status.load_errors,
                    unknown_pods: status.unknown_pods.as_array().map_or(0, Vec::len),
                    treatment: config.datastore.unknown_pods.name(),
                    host_path: status.host.as_ref().map(|(_, counters, _)| counters),
                });
            }
            if let Some(path) = &opts.status {
                status.uplink = uplink.as_ref().map(uplink::Uplink::status);
                if let Err(e) = status.write(path) {
                    tracing::warn!("writing status {}: {e}", path.display());
                }
            }
            last_status = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut totals = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        match w.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e.context(format!("worker {i}")));
                }
            }
            Err(_) => {
                if result.is_ok() {
                    result = Err(anyhow!("worker {i} panicked"));
                }
            }
        }
        totals.push((w.core, w.live.load()));
    }
    if let Some(h) = host.as_mut() {
        if let Err(e) = h.join()
            && result.is_ok()
        {
            result = Err(e.context("host path"));
        }
        status.host = Some((h.name().to_owned(), h.live.load(), h.route_errors()));
    }
    if let Some(path) = &opts.status {
        status.workers = totals.clone();
        status.stopped = true;
        let _ = status.write(path);
    }
    if let Some((_, server)) = metrics {
        // It polls the stop flag, set above.
        let _ = server.join();
    }
    for (core, (io, class)) in &totals {
        say(format_args!(
            "ocelot: worker on core {core}: rx {} tx {} forwarded {} replied {} drops {}",
            io.rx,
            io.tx,
            class.forwarded,
            class.replied,
            status::drops_line(io, class)
        ));
    }
    result
}

/// `AgentPort::worker` of a port no worker owns (the host path's tap).
const NO_WORKER: usize = usize::MAX;

/// Port id → owning worker (`u16::MAX`: none, or retired), for the host path.
fn owners(ports: &[AgentPort], specs: &[Option<PortSpec>]) -> Vec<u16> {
    ports
        .iter()
        .zip(specs)
        .map(|(p, s)| match s {
            Some(_) if p.worker != NO_WORKER => u16::try_from(p.worker).unwrap_or(u16::MAX),
            _ => u16::MAX,
        })
        .collect()
}

/// What [`follow_unknown_pods`] needs to know besides the ports.
struct UnknownState<'a> {
    /// The pods that should have a port here, by interface name.
    wanted: &'a BTreeMap<String, (String, String)>,
    /// The uplink's name: never a pod.
    uplink: Option<&'a str>,
    /// What is done with an unknown pod interface.
    treatment: UnknownPods,
}

/// Attaches pod interfaces that match no known pod (isolated or allowed, as configured) and
/// keeps the addresses of those attached in step with the kernel's host routes. Returns
/// whether a port changed. An attach that fails is logged and retried after 5 s.
fn follow_unknown_pods(
    workers: &[WorkerHandle],
    ports: &mut Vec<AgentPort>,
    specs: &mut Vec<Option<PortSpec>>,
    state: &UnknownState<'_>,
    retired: &mut BTreeMap<String, u32>,
    retry_after: &mut BTreeMap<String, Instant>,
    unknown_since: &mut BTreeMap<String, Instant>,
) -> bool {
    let mut changed = false;
    let mut routes: Option<BTreeMap<String, Vec<std::net::IpAddr>>> = None;
    let interfaces = unknown::pod_interfaces();
    let present: std::collections::HashSet<&str> = interfaces.iter().map(String::as_str).collect();
    retired.retain(|name, ifindex| {
        present.contains(name.as_str()) && sys::ifindex(name).ok() == Some(*ifindex)
    });
    // Once per tick, not per interface: a node may have thousands of pods.
    let attached_names: std::collections::HashSet<String> =
        specs.iter().flatten().map(|s| s.name.clone()).collect();
    for name in interfaces.iter().cloned() {
        let attached = attached_names.contains(&name);
        let waiting = retry_after.get(&name).is_some_and(|t| Instant::now() < *t);
        if attached
            || waiting
            || state.wanted.contains_key(&name)
            || state.uplink == Some(name.as_str())
            || retired.contains_key(&name)
        {
            continue;
        }
        let Ok(ifindex) = sys::ifindex(&name) else {
            continue;
        };
        let ips = routes
            .get_or_insert_with(unknown::host_routes)
            .get(&name)
            .cloned()
            .unwrap_or_default();
        let role = PortRole::UnknownPod {
            ips: ips.clone(),
            pod_mac: ports::peer_mac(&name),
            allow: state.treatment == UnknownPods::Allow,
        };
        match attach(workers, ports, &name, role, ifindex) {
            Ok(port) => {
                let what = match state.treatment {
                    UnknownPods::Isolate => {
                        "isolated: its traffic drops as unknown_pod until its pod object arrives"
                    }
                    UnknownPods::Allow => {
                        "allowed as a pod without labels or policy until its pod object arrives"
                    }
                };
                tracing::warn!(
                    "pod interface {name} ({}) matches no pod of the datastore; attached as \
                     port {} and {what} (datastore.unknown_pods = \"{}\")",
                    if ips.is_empty() {
                        "no host route yet".to_owned()
                    } else {
                        ips.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    ports.len(),
                    state.treatment.name(),
                );
                specs.push(Some(port.spec.clone()));
                ports.push(port);
                retry_after.remove(&name);
                unknown_since.insert(name, Instant::now());
                changed = true;
            }
            Err(e) => {
                tracing::error!("attaching unknown pod interface {name}: {e:#}; retrying in 5 s");
                retry_after.insert(name, Instant::now() + Duration::from_secs(5));
            }
        }
    }
    // The CNI plugin adds the host routes after it creates the veth: follow them.
    if specs
        .iter()
        .flatten()
        .any(|s| matches!(s.role, PortRole::UnknownPod { .. }))
    {
        let routes = routes.get_or_insert_with(unknown::host_routes);
        for spec in specs.iter_mut().flatten() {
            if let PortRole::UnknownPod { ips, .. } = &mut spec.role {
                let now = routes.get(&spec.name).cloned().unwrap_or_default();
                if *ips != now {
                    tracing::info!("unknown pod interface {}: addresses now {now:?}", spec.name);
                    *ips = now;
                    changed = true;
                }
            }
        }
    }
    changed
}

/// The status file's `unknown_pods`: every attached interface that matches no known pod.
fn unknown_pods_status(
    specs: &[Option<PortSpec>],
    since: &BTreeMap<String, Instant>,
    treatment: UnknownPods,
) -> serde_json::Value {
    specs
        .iter()
        .enumerate()
        .filter_map(|(id, s)| {
            let s = s.as_ref()?;
            let PortRole::UnknownPod { ips, pod_mac, .. } = &s.role else {
                return None;
            };
            Some(serde_json::json!({
                "interface": s.name,
                "port": id,
                "treatment": treatment.name(),
                "addresses": ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "pod_mac": pod_mac.map(ports::format_mac),
                "pending_seconds": since.get(&s.name).map_or(0.0, |t| t.elapsed().as_secs_f64()),
            }))
        })
        .collect()
}

/// The addresses of the local pods a snapshot has ports for: what the uplink program
/// redirects and the host path routes into its tap. That includes unknown pod interfaces: an allowed one is forwarded to, and the
/// traffic of an isolated one must reach the dataplane (which drops it) rather than the
/// kernel (which would route it to the pod past any policy).
fn local_pod_ips(
    snapshot: &Snapshot,
    specs: &[Option<PortSpec>],
) -> std::collections::BTreeSet<std::net::IpAddr> {
    let ports = snapshot.ports.iter().filter_map(|p| match p.kind {
        classifier::snapshot::PortKind::Pod { ip4, ip6, .. } => Some(
            ip4.map(std::net::IpAddr::V4)
                .into_iter()
                .chain(ip6.map(std::net::IpAddr::V6)),
        ),
        classifier::snapshot::PortKind::Uplink | classifier::snapshot::PortKind::Host => None,
    });
    let isolated = specs.iter().flatten().filter_map(|s| match &s.role {
        PortRole::UnknownPod {
            ips, allow: false, ..
        } => Some(
            ips.iter()
                .copied()
                .filter(|ip| snapshot.policy.endpoint(*ip).is_none()),
        ),
        _ => None,
    });
    ports.flatten().chain(isolated.flatten()).collect()
}

/// The addresses the host path routes into its tap: the known local pods'. An unknown pod
/// interface keeps the host route its CNI plugin made (`dev caliX`): that route is where the
/// agent learns the interface's addresses until the pod object arrives.
fn host_path_ips(
    snapshot: &Snapshot,
    specs: &[Option<PortSpec>],
) -> std::collections::BTreeSet<std::net::IpAddr> {
    let unknown: std::collections::BTreeSet<std::net::IpAddr> = specs
        .iter()
        .flatten()
        .filter_map(|s| match &s.role {
            PortRole::UnknownPod { ips, .. } => Some(ips.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    local_pod_ips(snapshot, specs)
        .difference(&unknown)
        .copied()
        .collect()
}

/// Attaches a new pod veth to the worker with the fewest ports and routes the other workers'
/// hand-offs to it.
fn attach(
    workers: &[WorkerHandle],
    ports: &[AgentPort],
    name: &str,
    role: PortRole,
    ifindex: u32,
) -> Result<AgentPort> {
    if ports.len() >= usize::from(u16::MAX) {
        bail!("port ids exhausted ({}); restart the agent", ports.len());
    }
    let load = |w: usize| ports.iter().filter(|p| p.worker == w).count();
    let owner = (0..workers.len())
        .min_by_key(|&w| load(w))
        .context("no workers")?;
    let id = PortId(ports.len() as u16);
    let mac = ports::interface_mac(name).ok_or_else(|| anyhow!("cannot read its MAC"))?;
    ports::check_mtu(name, UmemOpts::default().frame_size);
    workers
        .get(owner)
        .context("worker index")?
        .command(vec![WorkerCmd::Attach {
            name: name.to_owned(),
            queue: 0,
            id,
        }])?;
    for (w, handle) in workers.iter().enumerate() {
        if w == owner {
            continue;
        }
        if let Some(out) = handle.outs.get(owner).copied().flatten() {
            handle.command(vec![WorkerCmd::Route { id, out }])?;
        }
    }
    Ok(AgentPort {
        spec: PortSpec {
            name: name.to_owned(),
            mac,
            role,
        },
        worker: owner,
        queue: 0,
        more_queues: Vec::new(),
        ifindex,
    })
}

/// A line on stderr. Unlike `eprintln!`, a closed stderr (the reader went away) is not a
/// reason to panic: the agent keeps forwarding.
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "node".to_owned())
}

fn log_report(report: &BuildReport) {
    for e in &report.compile_errors {
        tracing::error!("policy not compiled (the pods it selects fail closed): {e}");
    }
    if !report.pods_without_mac.is_empty() {
        tracing::warn!(
            "pods whose MAC is not known yet (unreachable until it is): {}",
            report.pods_without_mac.join(", ")
        );
    }
    if !report.orphan_ports.is_empty() {
        tracing::warn!(
            "interfaces whose pod is gone (their traffic drops): {}",
            report.orphan_ports.join(", ")
        );
    }
}

/// Gives every attached interface a port id, in layout order.
fn assign_ports(
    layout: &Layout,
    pods: &BTreeMap<String, (String, String)>,
    gateway_mac: Option<[u8; 6]>,
) -> Result<Vec<AgentPort>> {
    let mut ports: Vec<AgentPort> = Vec::new();
    for (w, (_, queues)) in layout.workers.iter().enumerate() {
        for q in queues {
            if let Some(p) = ports.iter_mut().find(|p| p.spec.name == q.interface) {
                if matches!(p.spec.role, PortRole::Pod { .. }) {
                    bail!(
                        "pod interface {} is configured on more than one queue",
                        q.interface
                    );
                }
                p.more_queues.push((w, q.queue));
                continue;
            }
            let mac = ports::interface_mac(&q.interface)
                .ok_or_else(|| anyhow!("interface {}: cannot read its MAC", q.interface))?;
            let ifindex = sys::ifindex(&q.interface)?;
            let role = match pods.get(&q.interface) {
                Some((namespace, pod)) => PortRole::Pod {
                    namespace: namespace.clone(),
                    name: pod.clone(),
                    pod_mac: ports::peer_mac(&q.interface),
                },
                None => PortRole::Uplink { gateway_mac },
            };
            ports.push(AgentPort {
                spec: PortSpec {
                    name: q.interface.clone(),
                    mac,
                    role,
                },
                worker: w,
                queue: q.queue,
                more_queues: Vec::new(),
                ifindex,
            });
        }
    }
    if ports.len() > usize::from(u16::MAX) {
        bail!(
            "{} interfaces: at most {} are supported",
            ports.len(),
            u16::MAX
        );
    }
    Ok(ports)
}

fn ports_summary(ports: &[AgentPort]) -> Vec<(String, usize)> {
    ports
        .iter()
        .filter(|p| p.worker != NO_WORKER)
        .map(|p| (p.spec.name.clone(), p.worker))
        .collect()
}

fn ports_summary_live(ports: &[AgentPort], specs: &[Option<PortSpec>]) -> Vec<(String, usize)> {
    ports
        .iter()
        .zip(specs)
        .filter(|(p, s)| s.is_some() && p.worker != NO_WORKER)
        .map(|(p, _)| (p.spec.name.clone(), p.worker))
        .collect()
}

/// What one worker thread is given.
struct WorkerSetup {
    core: usize,
    ports: Vec<(String, u32, PortId)>,
    outs: Vec<(HandoffTx, Vec<PortId>)>,
    out_index: Vec<Option<usize>>,
    ins: Vec<HandoffRx>,
    to_host: Option<HandoffTx>,
    live: Arc<LiveCounters>,
    doorbell: Arc<Doorbell>,
}

#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
fn start_workers(
    config: &Config,
    layout: &Layout,
    ports: &[AgentPort],
    uplink: Option<&str>,
    published: &Arc<ArcSwap<Snapshot>>,
    ct: &Arc<Conntrack>,
    stop: &Arc<AtomicBool>,
    host_bell: Option<&Arc<Doorbell>>,
) -> Result<(Vec<WorkerHandle>, Vec<sys::SocketHandle>, HostLinks)> {
    let n = layout.workers.len();
    let doorbells = (0..n)
        .map(|_| Doorbell::new())
        .collect::<Result<Vec<_>, _>>()
        .context("creating worker doorbells")?;
    let mut setups: Vec<WorkerSetup> = layout
        .workers
        .iter()
        .enumerate()
        .zip(&doorbells)
        .map(|((w, (core, _)), doorbell)| WorkerSetup {
            doorbell: Arc::clone(doorbell),
            core: *core,
            ports: ports
                .iter()
                .enumerate()
                .flat_map(|(i, p)| {
                    std::iter::once((p.worker, p.queue))
                        .chain(p.more_queues.iter().copied())
                        .filter(move |(owner, _)| *owner == w)
                        .map(move |(_, q)| (p.spec.name.clone(), q, PortId(i as u16)))
                })
                .collect(),
            outs: Vec::new(),
            out_index: vec![None; n],
            ins: Vec::new(),
            to_host: None,
            live: Arc::new(LiveCounters::default()),
        })
        .collect();
    // A hand-off for every ordered pair of workers (ports can be added to any worker later).
    let capacity = if n <= 4 {
        HANDOFF_CAPACITY
    } else {
        HANDOFF_CAPACITY / 4
    };
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            // Ports `to` owns that `from` does not (a multi-queue uplink is local to both).
            let own: Vec<PortId> = setups
                .get(from)
                .map(|s| s.ports.iter().map(|p| p.2).collect())
                .unwrap_or_default();
            let mut targets: Vec<PortId> = setups
                .get(to)
                .map(|s| s.ports.iter().map(|p| p.2).collect())
                .unwrap_or_default();
            targets.retain(|id| !own.contains(id));
            targets.dedup();
            let (tx, rx) = handoff::channel(capacity, 2048);
            let tx = match doorbells.get(to) {
                Some(bell) => tx.with_doorbell(Arc::clone(bell)),
                None => tx,
            };
            if let Some(s) = setups.get_mut(from) {
                if let Some(slot) = s.out_index.get_mut(to) {
                    *slot = Some(s.outs.len());
                }
                s.outs.push((tx, targets));
            }
            if let Some(s) = setups.get_mut(to) {
                s.ins.push(rx);
            }
        }
    }
    // The host path: a hand-off each way between it and every worker.
    let mut links = HostLinks::default();
    if let Some(bell) = host_bell {
        for (setup, worker_bell) in setups.iter_mut().zip(&doorbells) {
            let (tx, rx) = handoff::channel(capacity, 2048);
            links
                .to_workers
                .push(tx.with_doorbell(Arc::clone(worker_bell)));
            setup.ins.push(rx);
            let (tx, rx) = handoff::channel(capacity, 2048);
            setup.to_host = Some(tx.with_doorbell(Arc::clone(bell)));
            links.from_workers.push(rx);
        }
    }
    let socket = config.xdp.socket_opts();
    let frames = config.xdp.frames_per_worker;
    let worker_idle = config.xdp.worker_idle();
    let netns = std::fs::read_link("/proc/thread-self/ns/net").ok();
    let mut handles = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<sys::SocketHandle>>>();
    let uplink_name = uplink.map(str::to_owned);
    for (w, setup) in setups.into_iter().enumerate() {
        let published = Arc::clone(published);
        let ct = Arc::clone(ct);
        let stop = Arc::clone(stop);
        let ready = ready_tx.clone();
        let core = setup.core;
        let live = Arc::clone(&setup.live);
        let outs = setup.out_index.clone();
        let expected_netns = netns.clone();
        let (cmd_tx, cmd_rx) = mpsc::channel::<WorkerCmd>();
        let (ack_tx, ack_rx) = mpsc::channel::<Result<(), String>>();
        let attention = Arc::new(AtomicBool::new(false));
        let doorbell = Arc::clone(&setup.doorbell);
        let thread_attention = Arc::clone(&attention);
        let uplink_name = uplink_name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ocelot-worker-{w}"))
            .spawn(move || -> Result<()> {
                let started = (|| -> Result<_> {
                    // Threads inherit the process's namespace; check it, since sockets open
                    // in whichever namespace the thread is in.
                    if std::fs::read_link("/proc/thread-self/ns/net").ok() != expected_netns {
                        bail!("worker thread is in another network namespace");
                    }
                    sys::pin_current_thread(setup.core)
                        .with_context(|| format!("pinning to core {}", setup.core))?;
                    let umem_opts = UmemOpts {
                        frames,
                        ..UmemOpts::default()
                    };
                    let (mut umem, free) = sys::XskUmem::new(umem_opts)?;
                    let mut wports = Vec::new();
                    let mut handles = Vec::new();
                    for (name, queue, id) in &setup.ports {
                        // The uplink's frames are steered by ocelot's own program; pod veths
                        // get libxdp's default one (everything to the socket).
                        let is_uplink = uplink_name.as_deref() == Some(name.as_str());
                        let opts = dataplane::sys::SocketOpts {
                            load_default_prog: !is_uplink,
                            ..socket
                        };
                        let (rx, tx) = umem
                            .open(name, *queue, &opts)
                            .with_context(|| format!("AF_XDP socket on {name} queue {queue}"))?;
                        if is_uplink {
                            handles.push(rx.handle());
                        }
                        wports.push(WorkerPort { id: *id, rx, tx });
                    }
                    let pipeline = Pipeline {
                        worker: classifier::pipeline::Worker::with_touch(ct),
                        snapshot: published,
                        clock: now,
                    };
                    let mut worker = Worker::new(umem, free, wports, pipeline)?;
                    for (tx, ports) in setup.outs {
                        worker.add_handoff_out(tx, &ports)?;
                    }
                    for rx in setup.ins {
                        worker.add_handoff_in(rx);
                    }
                    if let Some(tx) = setup.to_host {
                        worker.set_to_host(tx);
                    }
                    worker.publish_to(setup.live);
                    worker.set_doorbell(setup.doorbell);
                    Ok((worker, handles))
                })();
                let mut worker = match started {
                    Ok((w, handles)) => {
                        let _ = ready.send(Ok(handles));
                        w
                    }
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("worker {w} on core {core}: {e:#}")));
                        return Ok(());
                    }
                };
                drop(ready);
                let idle = worker_idle;
                loop {
                    worker
                        .run_until(&stop, &thread_attention, idle)
                        .map_err(|e| anyhow!("worker {w} on core {core}: {e}"))?;
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    // Clear first: a command sent after this point sets it again.
                    thread_attention.store(false, Ordering::SeqCst);
                    while let Ok(cmd) = cmd_rx.try_recv() {
                        let done = match cmd {
                            WorkerCmd::Attach { name, queue, id } => {
                                sys::detach_stale_xsk_prog(&name)
                                    .and_then(|_| worker.mem_mut().open(&name, queue, &socket))
                                    .and_then(|(rx, tx)| worker.add_port(WorkerPort { id, rx, tx }))
                                    .map_err(|e| format!("{name}: {e}"))
                            }
                            WorkerCmd::Retire { id } => {
                                if let Some((rx, tx)) = worker.retire_port(id) {
                                    let back = worker.mem_mut().release(rx, tx);
                                    worker.recover_frames(back);
                                }
                                Ok(())
                            }
                            WorkerCmd::Route { id, out } => {
                                worker.route_handoff(id, out).map_err(|e| e.to_string())
                            }
                        };
                        let _ = ack_tx.send(done);
                    }
                }
            })
            .context("spawning a worker thread")?;
        handles.push(WorkerHandle {
            core,
            live,
            thread,
            cmds: cmd_tx,
            acks: ack_rx,
            attention,
            doorbell,
            outs,
        });
    }
    drop(ready_tx);
    let mut failure = None;
    let mut sockets = Vec::new();
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(h)) => sockets.extend(h),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(anyhow!("a worker thread died while starting"));
            }
        }
    }
    if let Some(e) = failure {
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            let _ = h.thread.join();
        }
        return Err(e);
    }
    Ok((handles, sockets, links))
}

/// Per-reason drop totals of a set of workers, by reason name.
pub fn drop_totals(
    counters: &[(
        usize,
        (dataplane::worker::WorkerCounters, classifier::Counters),
    )],
) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for (_, (io, class)) in counters {
        for reason in classifier::DropReason::ALL {
            let n = io.dropped(*reason) + class.drops.get(reason.index()).copied().unwrap_or(0);
            if n > 0 {
                *out.entry(reason.name()).or_insert(0) += n;
            }
        }
    }
    out
}
