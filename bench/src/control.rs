//! `ocelot-bench control`: how long a change in the cluster takes to reach the workers.
//!
//! The harness starts the in-process test API server (`ocelot_tests::apiserver`), loads a
//! synthetic cluster into it (10,000 pods in 1,000 namespaces on 100 nodes with podCIDRs,
//! 1,000 NetworkPolicies whose selectors match those pods' labels), and runs the agent's
//! control path against it: the real `control::kube` datastore (kube watchers over HTTP,
//! conversion, coalescing), then on every `Manifests` it sends, a snapshot for one node
//! (`node-0`: its pods are the local ports, with made-up MACs) built with a
//! `control::node::SnapshotBuilder` and published into an `ArcSwap<Snapshot>`, as the agent
//! does: the replaced `Manifests` goes back to the datastore (`KubeDatastore::recycle`) and the
//! replaced snapshot to a reaper thread. `--full-compile` builds every snapshot from scratch
//! and `--drop-inline` frees both on the control thread, to compare within one binary. A "worker" thread loads the snapshot in a loop, as
//! workers do once per burst, and notes when it first sees each epoch.
//!
//! For each kind of event (a new policy, a pod's label change, a pod added to the node, a
//! node added) it writes one object at a time to the server and measures the time from the
//! write to the worker first seeing a snapshot built from a `Manifests` that contains the
//! change, split into three legs: to the `Manifests` arriving (watch, conversion, the
//! coalescing delay, the cache's `Manifests`), the snapshot build, and publication to the
//! worker seeing it. Events are sequential: the next is written only once the previous is
//! visible, so every figure is one change's latency, not a queue's.
//!
//! Then bursts: `--burst-size` pod label changes written `--burst-gap-us` apart, timed from the first
//! write to the worker seeing them all, with the number of snapshots the datastore sent for
//! the burst — what the coalescing settings (`--coalesce-quiet-ms`, `--coalesce-ms`) trade.
//!
//! It also reports the time from starting the datastore to the first snapshot in the workers
//! (the full list, conversion and compile: `full_compile_ms`), the compile and snapshot build
//! alone, and the resident memory after the initial sync. A run in which an event never
//! becomes visible (within `--timeout-ms`) is an error, not a figure.
//!
//! The API server runs in this process, so its objects (as JSON) count in the resident
//! memory; `rss_before_datastore_mb` is the figure with the server loaded and no datastore,
//! so the difference is what the control path holds.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use classifier::policy::{CompileOptions, PolicyCompiler, PolicyTable};
use classifier::snapshot::Snapshot;
use control::kube::KubeOptions;
use control::manifests::Manifests;
use control::node::{NodeOptions, PortRole, PortSpec, SnapshotBuilder, build_snapshot};
use control::reap::Reaper;
use hdrhistogram::Histogram;
use ocelot_tests::apiserver::ApiServer;
use serde_json::{Value, json};

/// Options of `ocelot-bench control`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pods in the cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Namespaces.
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Nodes (each with a /20 podCIDR); the benchmark's node is `node-0`.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Events measured per kind.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// The datastore's longest coalescing delay (`KubeOptions::coalesce`), in ms.
    #[arg(long, default_value_t = 50)]
    coalesce_ms: u64,
    /// The datastore's quiet period (`KubeOptions::coalesce_quiet`), in ms: a snapshot is
    /// sent once no change has arrived for this long.
    #[arg(long, default_value_t = 5)]
    coalesce_quiet_ms: u64,
    /// Bursts measured after the single events: each writes `--burst-size` pod label changes
    /// back to back, as fast as the server takes them.
    #[arg(long, default_value_t = 20)]
    bursts: usize,
    /// Writes per burst.
    #[arg(long, default_value_t = 20)]
    burst_size: usize,
    /// Pause between two writes of a burst, in µs (0: back to back). A controller's writes
    /// (a rollout's pods) come spaced like this rather than all at once.
    #[arg(long, default_value_t = 0)]
    burst_gap_us: u64,
    /// How long the worker thread waits between two loads of the snapshot (a burst's
    /// period), in µs. It sleeps rather than spins so as not to take a core from the control
    /// path on a small machine; the figures' resolution is this period.
    #[arg(long, default_value_t = 50)]
    worker_poll_us: u64,
    /// An event not visible after this long fails the run.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// A small, fast run for smoke tests: 1/20 of the objects (at least 2 nodes) and 5
    /// events per kind.
    #[arg(long)]
    quick: bool,
    /// Compile every snapshot from scratch (`control::node::build_snapshot`) instead of
    /// keeping the compiler's pods-and-namespaces half between builds (`SnapshotBuilder`),
    /// to compare the two in one binary.
    #[arg(long)]
    full_compile: bool,
    /// Drop the previous `Manifests` and snapshot on the control thread, as it used to,
    /// instead of giving the `Manifests` back to the datastore (`KubeDatastore::recycle`)
    /// and freeing the snapshot on a reaper thread.
    #[arg(long)]
    drop_inline: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The cluster's shape.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    pods: usize,
    namespaces: usize,
    policies: usize,
    nodes: usize,
    events: usize,
}

impl Sizes {
    fn from_args(args: &Args) -> Result<Sizes> {
        let (div, events) = if args.quick {
            (20, args.events.min(5))
        } else {
            (1, args.events)
        };
        let s = Sizes {
            pods: args.pods.div_ceil(div),
            namespaces: args.namespaces.div_ceil(div).max(1),
            policies: args.policies.div_ceil(div),
            nodes: args.nodes.div_ceil(div).max(2),
            events,
        };
        if s.events == 0 {
            bail!("--events must be at least 1");
        }
        // Pod addresses are host numbers inside the node's /20.
        if s.pods_per_node() + s.events + 2 > 4094 {
            bail!("too many pods per node for a /20: raise --nodes");
        }
        // Node /20s are carved from 10.64.0.0/10.
        if s.nodes + s.events > 1024 {
            bail!("too many nodes for 10.64.0.0/10 in /20s");
        }
        Ok(s)
    }

    fn pods_per_node(&self) -> usize {
        self.pods.div_ceil(self.nodes)
    }
}

/// The event kinds, in the order they are measured.
const KINDS: [&str; 4] = ["new_policy", "pod_label_change", "pod_added", "node_added"];

/// The node whose snapshot is built.
const LOCAL_NODE: &str = "node-0";

fn node_cidr(n: usize) -> (u8, u8) {
    // Node n owns 10.(64 + n/16).((n%16)*16).0/20.
    ((64 + n / 16) as u8, ((n % 16) * 16) as u8)
}

fn node_cidr_text(n: usize) -> String {
    let (b, c) = node_cidr(n);
    format!("10.{b}.{c}.0/20")
}

/// The address of host `h` (1-based) inside node `n`'s /20.
fn pod_address(n: usize, h: usize) -> String {
    let (b, c) = node_cidr(n);
    format!("10.{b}.{}.{}", c as usize + h / 256, h % 256)
}

fn namespace(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": format!("ns-{i}"), "labels": {
            "kubernetes.io/metadata.name": format!("ns-{i}"),
            "team": format!("team-{}", i % 50),
            "env": if i.is_multiple_of(3) { "dev" } else { "prod" },
        } },
    })
}

fn node(n: usize) -> Value {
    let cidr = node_cidr_text(n);
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": format!("node-{n}"), "labels": {
            "kubernetes.io/hostname": format!("node-{n}"),
        } },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": { "addresses": [
            { "type": "Hostname", "address": format!("node-{n}") },
            { "type": "InternalIP", "address": format!("192.168.{}.{}", n / 250, n % 250 + 1) },
        ] },
    })
}

/// A pod as the agent reads it: labels the policies select on, named container ports, node
/// and address. `rev` adds a label used to make each label change distinct.
fn pod(
    ns: &str,
    name: &str,
    app: usize,
    tier: &str,
    rev: Option<usize>,
    node: usize,
    host: usize,
) -> Value {
    let ip = pod_address(node, host);
    let mut labels = json!({ "app": format!("app-{app}"), "tier": tier });
    if let Some(rev) = rev {
        labels["rev"] = json!(rev.to_string());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": format!("node-{node}"), "containers": [{
            "name": "app",
            "image": "registry.example.com/app:1",
            "ports": [
                { "name": "http", "containerPort": 80, "protocol": "TCP" },
                { "name": "alt", "containerPort": 8080, "protocol": "TCP" },
                { "name": "dns", "containerPort": 53, "protocol": "UDP" },
            ],
        }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

/// Pod `k` of the initial cluster: namespace `k % namespaces`, node `k / pods_per_node`.
fn cluster_pod(s: &Sizes, k: usize, rev: Option<usize>) -> Value {
    let per_node = s.pods_per_node();
    let tier = if k.is_multiple_of(2) { "fe" } else { "be" };
    pod(
        &format!("ns-{}", k % s.namespaces),
        &format!("pod-{k}"),
        (k / s.namespaces) % 5,
        tier,
        rev,
        k / per_node,
        k % per_node + 1,
    )
}

/// A policy shaped like the classifier's synthetic workload: it selects `app-{app}` in its
/// namespace and admits `tier: fe` pods of the namespace, every pod of the namespaces of its
/// team, and 192.168.0.0/16, on a named port, a port range and UDP 53; one in four also
/// isolates egress.
fn policy(ns: usize, name: &str, app: usize, egress: bool) -> Value {
    let mut spec = json!({
        "podSelector": { "matchLabels": { "app": format!("app-{app}") } },
        "ingress": [{
            "from": [
                { "podSelector": { "matchLabels": { "tier": "fe" } } },
                { "namespaceSelector": { "matchLabels": { "team": format!("team-{}", ns % 50) } } },
                { "ipBlock": { "cidr": "192.168.0.0/16" } },
            ],
            "ports": [
                { "protocol": "TCP", "port": "http" },
                { "protocol": "TCP", "port": 8080, "endPort": 8090 },
                { "protocol": "UDP", "port": 53 },
            ],
        }],
        "policyTypes": ["Ingress"],
    });
    if egress {
        spec["egress"] = json!([
            { "to": [{ "namespaceSelector": {} }] },
            { "to": [{ "ipBlock": { "cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"] } }],
              "ports": [{ "protocol": "TCP", "port": 443 }] },
        ]);
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": format!("ns-{ns}") },
        "spec": spec,
    })
}

/// What a `Manifests` must contain for an event to count as arrived.
#[derive(Clone, Debug)]
enum Expect {
    Policy {
        ns: String,
        name: String,
    },
    PodLabel {
        ns: String,
        name: String,
        rev: String,
    },
    Pod {
        ns: String,
        name: String,
    },
    Node {
        name: String,
    },
    /// Every one of these (a burst).
    All(Vec<Expect>),
}

impl Expect {
    fn met_by(&self, m: &Manifests) -> bool {
        match self {
            Expect::Policy { ns, name } => m
                .cluster
                .policies
                .iter()
                .any(|p| &p.namespace == ns && &p.name == name),
            Expect::PodLabel { ns, name, rev } => m
                .pod(ns, name)
                .is_some_and(|p| p.labels.get("rev") == Some(rev)),
            Expect::Pod { ns, name } => m.pod(ns, name).is_some(),
            Expect::Node { name } => m.nodes.iter().any(|n| &n.name == name),
            Expect::All(all) => all.iter().all(|e| e.met_by(m)),
        }
    }
}

/// When the control thread handled one epoch.
#[derive(Clone, Copy, Debug)]
struct EpochTimes {
    /// The `Manifests` arrived from the datastore.
    received: Instant,
    /// The snapshot was built and stored.
    published: Instant,
}

/// State shared between the harness, the control thread and the worker thread.
#[derive(Debug, Default)]
struct Shared {
    /// The pending event's expectation and, once met, the epoch that met it.
    pending: Mutex<Option<(Expect, Option<u32>)>>,
    /// Per epoch, the control thread's times.
    epochs: Mutex<HashMap<u32, EpochTimes>>,
    /// Per epoch, when the worker first loaded it.
    seen: Mutex<HashMap<u32, Instant>>,
    /// Snapshot builds (`build_snapshot`), in µs.
    builds_us: Mutex<Vec<u64>>,
    /// The newest `Manifests` (the agent keeps it too, to rebuild when ports change).
    last: Mutex<Option<Manifests>>,
    /// Local pods without a port (the control thread's own check that ports follow pods).
    unwired: Mutex<usize>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Made-up MACs: ours is 02:..., the pod's 0a:..., both from the port's index.
fn port_for(namespace: &str, name: &str, index: usize) -> PortSpec {
    let [a, b] = (index as u16).to_be_bytes();
    PortSpec {
        name: control::naming::veth_name(namespace, name),
        mac: [0x02, 0, 0, 0, a, b],
        role: PortRole::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pod_mac: Some([0x0a, 0, 0, 0, a, b]),
        },
    }
}

/// The agent's control loop, reduced to what the benchmark needs: for every `Manifests`,
/// give each new local pod a port (ids are never reused), build the snapshot for the next
/// epoch and publish it.
fn control_loop(
    (updates, recycler): (
        crossbeam_channel::Receiver<Manifests>,
        control::kube::Recycler,
    ),
    published: Arc<ArcSwap<Snapshot>>,
    shared: Arc<Shared>,
    mode: ControlMode,
) {
    let opts = NodeOptions {
        local_node: Some(LOCAL_NODE.to_owned()),
        ..NodeOptions::default()
    };
    let mut builder = SnapshotBuilder::default();
    // The agent frees replaced `Manifests` and snapshots on a thread of its own too.
    let reaper = if mode.drop_inline {
        None
    } else {
        Reaper::spawn("bench-reaper").ok()
    };
    let reap = |value: Box<dyn std::any::Any + Send>| match &reaper {
        Some(r) => r.drop_later(value),
        None => drop(value),
    };
    // As the agent does: a `Manifests` no longer needed goes back to the datastore, which
    // makes its next one from it.
    let give_back = |m: Manifests| {
        if mode.drop_inline {
            drop(m);
        } else {
            recycler.recycle(m);
        }
    };
    let mut ports: Vec<Option<PortSpec>> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut epoch = published.load().epoch;
    while let Ok(first) = updates.recv() {
        let received = Instant::now();
        // As the agent does: only the newest snapshot matters, each is complete.
        let mut m = first;
        for newer in updates.try_iter() {
            give_back(std::mem::replace(&mut m, newer));
        }
        // The previous one is not needed any more: given back at once, as the agent does, so
        // the datastore has its next spare before the next change can arrive.
        let previous = lock(&shared.last).take();
        if let Some(previous) = previous {
            give_back(previous);
        }
        for p in &m.cluster.pods {
            if p.node.as_deref() == Some(LOCAL_NODE) && !p.host_network {
                let key = (p.namespace.clone(), p.name.clone());
                if let std::collections::hash_map::Entry::Vacant(e) = index.entry(key) {
                    e.insert(ports.len());
                    ports.push(Some(port_for(&p.namespace, &p.name, ports.len())));
                }
            }
        }
        epoch += 1;
        let t = Instant::now();
        let (snapshot, report) = if mode.full_compile {
            build_snapshot(&m, &ports, &opts, epoch)
        } else {
            builder.build(&m, &ports, &opts, epoch)
        };
        let build = t.elapsed();
        // Taken before the store: a worker may load the snapshot before this thread runs on.
        let done = Instant::now();
        let old = published.swap(Arc::new(snapshot));
        reap(Box::new(old));
        lock(&shared.builds_us).push(build.as_micros() as u64);
        *lock(&shared.unwired) = report.pods_without_port.len();
        lock(&shared.epochs).insert(
            epoch,
            EpochTimes {
                received,
                published: done,
            },
        );
        if let Some((expect, met @ None)) = lock(&shared.pending).as_mut()
            && expect.met_by(&m)
        {
            *met = Some(epoch);
        }
        *lock(&shared.last) = Some(m);
    }
}

/// How the control thread builds and frees (see `Args::full_compile`, `Args::drop_inline`).
#[derive(Clone, Copy, Debug)]
struct ControlMode {
    full_compile: bool,
    drop_inline: bool,
}

/// A worker: loads the snapshot once per "burst" and notes each new epoch's first sight.
fn worker_loop(published: Arc<ArcSwap<Snapshot>>, shared: Arc<Shared>, period: Duration) {
    let mut last = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let snap = published.load();
        if snap.epoch != last {
            let now = Instant::now();
            last = snap.epoch;
            lock(&shared.seen).entry(last).or_insert(now);
        }
        drop(snap);
        std::thread::sleep(period);
    }
}

/// One measured event.
#[derive(Clone, Copy, Debug)]
struct Sample {
    total: Duration,
    to_sent: Duration,
    to_manifests: Duration,
    build: Duration,
    to_worker: Duration,
    /// Snapshots the datastore sent meanwhile (more than one when a burst was split).
    snapshots: u64,
}

/// Writes `objs` back to back, waits for the worker to see a snapshot containing them all,
/// returns the legs.
fn measure_event(
    server: &ApiServer,
    ds: &control::kube::KubeDatastore,
    shared: &Shared,
    objs: &[Value],
    gap: Duration,
    expect: Expect,
    timeout: Duration,
) -> Result<Sample> {
    *lock(&shared.pending) = Some((expect.clone(), None));
    let updates_before = ds.status().updates;
    let t0 = Instant::now();
    for (i, obj) in objs.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        server.apply(obj);
    }
    loop {
        let met = lock(&shared.pending).as_ref().and_then(|(_, e)| *e);
        if let Some(epoch) = met
            && let Some(seen) = lock(&shared.seen).get(&epoch).copied()
        {
            let times = lock(&shared.epochs)
                .get(&epoch)
                .copied()
                .ok_or_else(|| anyhow!("epoch {epoch} seen but never published"))?;
            *lock(&shared.pending) = None;
            // Nothing else changes in the cluster, so the datastore's last update is this
            // event's: when it was built and sent.
            let status = ds.status();
            let sent = status.last_update.unwrap_or(times.received);
            return Ok(Sample {
                snapshots: status.updates.saturating_sub(updates_before),
                total: seen.saturating_duration_since(t0),
                to_sent: sent.saturating_duration_since(t0),
                to_manifests: times.received.saturating_duration_since(t0),
                build: times.published.saturating_duration_since(times.received),
                to_worker: seen.saturating_duration_since(times.published),
            });
        }
        if t0.elapsed() > timeout {
            bail!(
                "{expect:?} never became visible to the worker within {timeout:?}; refusing to report"
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The object and expectation of event `i` of `kind`.
fn event(s: &Sizes, kind: &str, i: usize) -> (Value, Expect) {
    let per_node = s.pods_per_node().max(1);
    // Changes concern node-0's pods and namespaces, so they matter to the node built.
    let local = i % per_node.min(s.pods.max(1));
    let ns = local % s.namespaces;
    match kind {
        "new_policy" => {
            let name = format!("bench-policy-{i}");
            (
                policy(ns, &name, i % 5, i.is_multiple_of(4)),
                Expect::Policy {
                    ns: format!("ns-{ns}"),
                    name,
                },
            )
        }
        "pod_label_change" => (
            cluster_pod(s, local, Some(i)),
            Expect::PodLabel {
                ns: format!("ns-{ns}"),
                name: format!("pod-{local}"),
                rev: i.to_string(),
            },
        ),
        "pod_added" => {
            let name = format!("bench-pod-{i}");
            let ns = format!("ns-{}", i % s.namespaces);
            let tier = if i.is_multiple_of(2) { "fe" } else { "be" };
            (
                pod(&ns, &name, i % 5, tier, None, 0, per_node + 1 + i),
                Expect::Pod { ns, name },
            )
        }
        _ => {
            let n = s.nodes + i;
            (
                node(n),
                Expect::Node {
                    name: format!("node-{n}"),
                },
            )
        }
    }
}

fn vm_rss_mb() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Percentiles of a leg, in ms, from a µs histogram.
struct Leg {
    hist: Histogram<u64>,
}

impl Leg {
    fn new() -> Result<Leg> {
        Ok(Leg {
            hist: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        })
    }

    fn record(&mut self, d: Duration) {
        self.hist.saturating_record((d.as_micros() as u64).max(1));
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e3
    }
}

struct KindResult {
    kind: &'static str,
    total: Leg,
    to_sent: Leg,
    to_manifests: Leg,
    build: Leg,
    to_worker: Leg,
}

/// Stops the worker thread on every exit path.
struct WorkerGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    // The agent does not use the huge-page allocator; neither does its control path here,
    // so the resident memory is the agent's.
    dataplane::sys::HUGE_PAGES.store(false, Ordering::Relaxed);
    let s = Sizes::from_args(args)?;
    let coalesce = Duration::from_millis(args.coalesce_ms);
    let timeout = Duration::from_millis(args.timeout_ms);
    let load_start = loadavg();

    let server = ApiServer::start();
    let t = Instant::now();
    for i in 0..s.namespaces {
        server.apply(&namespace(i));
    }
    for n in 0..s.nodes {
        server.apply(&node(n));
    }
    for k in 0..s.pods {
        server.apply(&cluster_pod(&s, k, None));
    }
    for i in 0..s.policies {
        policy_apply(&server, &s, i);
    }
    // The load is history the datastore never needs (it lists); dropping it keeps the
    // server's memory to the objects themselves.
    server.compact();
    eprintln!(
        "cluster: {} pods, {} namespaces, {} policies, {} nodes ({} pods on {LOCAL_NODE}); loaded into the test API server in {:.0} ms",
        s.pods,
        s.namespaces,
        s.policies,
        s.nodes,
        s.pods_per_node().min(s.pods),
        ms(t.elapsed())
    );
    let rss_before = vm_rss_mb()?;

    let shared = Arc::new(Shared::default());
    // Epoch 0: the empty snapshot a worker holds before the first sync.
    let empty = build_snapshot(&Manifests::default(), &[], &NodeOptions::default(), 0).0;
    let published = Arc::new(ArcSwap::from_pointee(empty));
    let worker = WorkerGuard {
        shared: Arc::clone(&shared),
        thread: Some(
            std::thread::Builder::new()
                .name("bench-worker".to_owned())
                .spawn({
                    let (p, sh) = (Arc::clone(&published), Arc::clone(&shared));
                    let period = Duration::from_micros(args.worker_poll_us);
                    move || worker_loop(p, sh, period)
                })
                .context("spawning the worker thread")?,
        ),
    };

    let t_spawn = Instant::now();
    let ds = control::kube::spawn(KubeOptions {
        node_name: Some(LOCAL_NODE.to_owned()),
        coalesce,
        coalesce_quiet: Duration::from_millis(args.coalesce_quiet_ms),
        ..KubeOptions::with_config(server.config())
    })
    .context("starting the kube datastore")?;
    let updates = (ds.updates().clone(), ds.recycler());
    let control = std::thread::Builder::new()
        .name("bench-control".to_owned())
        .spawn({
            let (p, sh) = (Arc::clone(&published), Arc::clone(&shared));
            let mode = ControlMode {
                full_compile: args.full_compile,
                drop_inline: args.drop_inline,
            };
            move || control_loop(updates, p, sh, mode)
        })
        .context("spawning the control thread")?;

    // The initial sync: the first epoch in the worker.
    let first_seen = loop {
        // The worker may load the snapshot before the control thread has noted its times.
        let published = lock(&shared.epochs).contains_key(&1);
        if let Some(t) = lock(&shared.seen).get(&1).copied()
            && published
        {
            break t;
        }
        if t_spawn.elapsed() > timeout.max(Duration::from_secs(120)) {
            bail!(
                "the initial sync never reached the worker; datastore status: {:?}",
                ds.status()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let first = lock(&shared.epochs)
        .get(&1)
        .copied()
        .ok_or_else(|| anyhow!("epoch 1 seen but never published"))?;
    let full_compile = first_seen.saturating_duration_since(t_spawn);
    let relist = first.received.saturating_duration_since(t_spawn);
    let first_build = first.published.saturating_duration_since(first.received);
    let rss = vm_rss_mb()?;
    let status = ds.status();
    let objects: Vec<String> = status
        .resources
        .iter()
        .map(|r| format!("{} {}", r.resource, r.objects))
        .collect();
    let expected_pods = s.pods;
    let pods_seen = status.resource(control::kube::Resource::Pods).objects;
    if pods_seen != expected_pods {
        bail!("the first snapshot holds {pods_seen} pods of {expected_pods}; refusing to report");
    }
    if *lock(&shared.unwired) != 0 {
        bail!("local pods without a port in the first snapshot; the harness is broken");
    }
    eprintln!(
        "initial sync: {} in the worker {:.0} ms after start (list + convert + coalesce {:.0} ms, build {:.0} ms); RSS {:.0} MB",
        objects.join(", "),
        ms(full_compile),
        ms(relist),
        ms(first_build),
        rss
    );

    let mut results = Vec::new();
    for kind in KINDS {
        let mut r = KindResult {
            kind,
            total: Leg::new()?,
            to_sent: Leg::new()?,
            to_manifests: Leg::new()?,
            build: Leg::new()?,
            to_worker: Leg::new()?,
        };
        for i in 0..s.events {
            let (obj, expect) = event(&s, kind, i);
            let sample = measure_event(
                &server,
                &ds,
                &shared,
                &[obj],
                Duration::ZERO,
                expect,
                timeout,
            )
            .with_context(|| format!("event {kind} #{i}"))?;
            r.total.record(sample.total);
            r.to_sent.record(sample.to_sent);
            r.to_manifests.record(sample.to_manifests);
            r.build.record(sample.build);
            r.to_worker.record(sample.to_worker);
        }
        eprintln!(
            "{kind}: {} events, p50 {:.1} ms, p99 {:.1} ms",
            s.events,
            r.total.ms(0.5),
            r.total.ms(0.99)
        );
        results.push(r);
    }
    let burst = measure_bursts(&server, &ds, &shared, &s, args, timeout)?;
    // The control thread gives the previous `Manifests` back when a newer one arrives and
    // keeps the newer once its snapshot is built: wait out a build in progress.
    let t_parts = Instant::now();
    let parts = loop {
        if let Some(parts) = lock(&shared.last).as_ref().map(time_parts) {
            break parts;
        }
        if t_parts.elapsed() > timeout {
            bail!("no Manifests kept");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let builds = lock(&shared.builds_us).clone();
    let mut build_hist = Leg::new()?;
    for b in &builds {
        build_hist.hist.saturating_record((*b).max(1));
    }
    let load_end = loadavg();
    drop(worker);
    drop(ds);
    let _ = control.join();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ocelot-bench control: {} pods, {} namespaces, {} policies, {} nodes; {} events per kind; coalesce after {} ms quiet, at most {} ms; worker loads every {} µs",
        s.pods,
        s.namespaces,
        s.policies,
        s.nodes,
        s.events,
        args.coalesce_quiet_ms,
        args.coalesce_ms,
        args.worker_poll_us
    );
    println!(
        "machine: {cpus} CPUs, {}; load average {load_start} at start, {load_end} at end",
        cpu_model()
    );
    println!();
    println!(
        "{:<18} {:>9} {:>9} | {:>15} {:>15} {:>15} {:>15}",
        "event", "p50 ms", "p99 ms", "datastore sent", "control got", "built", "worker saw"
    );
    println!(
        "{:<18} {:>9} {:>9} | {:>15} {:>15} {:>15} {:>15}",
        "", "(API write", "→ worker)", "p50 / p99", "p50 / p99", "p50 / p99", "p50 / p99"
    );
    for r in &results {
        println!(
            "{:<18} {:>9.1} {:>9.1} | {:>6.1} / {:>6.1} {:>6.1} / {:>6.1} {:>6.1} / {:>6.1} {:>6.3} / {:>6.3}",
            r.kind,
            r.total.ms(0.5),
            r.total.ms(0.99),
            r.to_sent.ms(0.5),
            r.to_sent.ms(0.99),
            r.to_manifests.ms(0.5),
            r.to_manifests.ms(0.99),
            r.build.ms(0.5),
            r.build.ms(0.99),
            r.to_worker.ms(0.5),
            r.to_worker.ms(0.99),
        );
    }
    println!(
        "(datastore sent: from the API write to the datastore sending its Manifests: watch, conversion,"
    );
    println!(
        " the coalescing ({} ms quiet, at most {} ms) and the cache's Manifests; control got: from the write to the",
        args.coalesce_quiet_ms, args.coalesce_ms
    );
    println!(
        " control thread receiving it; built: the control thread's build_snapshot and store; worker saw:"
    );
    println!(" from the store to the worker's first load)");
    if !burst.snapshots.is_empty() {
        let n = burst.snapshots.len();
        let mean = burst.snapshots.iter().sum::<u64>() as f64 / n as f64;
        println!(
            "bursts of {} pod label changes, {} µs apart ({n} bursts): first write → worker saw all p50 {:.1} ms, p99 {:.1} ms; snapshots per burst mean {mean:.2}, max {}",
            burst.size,
            args.burst_gap_us,
            burst.total.ms(0.5),
            burst.total.ms(0.99),
            burst.snapshots.iter().max().copied().unwrap_or(0),
        );
    }
    println!();
    println!(
        "full re-list + compile (datastore start → first snapshot in the worker): {:.0} ms",
        ms(full_compile)
    );
    println!(
        "  list + convert + coalesce + Manifests: {:.0} ms; first build_snapshot: {:.0} ms",
        ms(relist),
        ms(first_build)
    );
    println!(
        "every build_snapshot ({} builds, {}): p50 {:.1} ms, p99 {:.1} ms; PolicyTable::compile from scratch {:.1} ms, again with the base kept {:.1} ms",
        builds.len(),
        if args.full_compile {
            "each compiled from scratch"
        } else {
            "the compiler's base kept"
        },
        build_hist.ms(0.5),
        build_hist.ms(0.99),
        ms(parts.compile),
        ms(parts.compile_kept),
    );
    println!(
        "cloning a full Manifests: {:.1} ms (what the datastore's cache does after each send for a consumer that gives nothing back)",
        ms(parts.clone),
    );
    println!(
        "resident memory after sync: {rss:.0} MB ({rss_before:.0} MB with the API server loaded, before the datastore: the control path holds {:.0} MB)",
        rss - rss_before
    );

    if let Some(path) = &args.json {
        let results: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({
                    "event": r.kind,
                    "p50_ms": round2(r.total.ms(0.5)),
                    "p99_ms": round2(r.total.ms(0.99)),
                    "events": s.events,
                    "sent_p50_ms": round2(r.to_sent.ms(0.5)),
                    "to_manifests_p50_ms": round2(r.to_manifests.ms(0.5)),
                    "build_p50_ms": round2(r.build.ms(0.5)),
                    "to_worker_p50_ms": r.to_worker.ms(0.5),
                })
            })
            .collect();
        crate::write_json(
            path,
            &json!({
                "results": results,
                "full_compile_ms": round2(ms(full_compile)),
                "rss_mb": round2(rss),
                "relist_ms": round2(ms(relist)),
                "first_build_ms": round2(ms(first_build)),
                "build_p50_ms": round2(build_hist.ms(0.5)),
                "policy_compile_ms": round2(ms(parts.compile)),
                "policy_compile_kept_ms": round2(ms(parts.compile_kept)),
                "full_compile_mode": args.full_compile,
                "drop_inline": args.drop_inline,
                "manifests_clone_ms": round2(ms(parts.clone)),
                "rss_before_datastore_mb": round2(rss_before),
                "pods": s.pods,
                "namespaces": s.namespaces,
                "policies": s.policies,
                "nodes": s.nodes,
                "coalesce_ms": args.coalesce_ms,
                "coalesce_quiet_ms": args.coalesce_quiet_ms,
                "burst_size": burst.size,
                "burst_gap_us": args.burst_gap_us,
                "burst_p50_ms": round2(burst.total.ms(0.5)),
                "burst_p99_ms": round2(burst.total.ms(0.99)),
                "burst_snapshots_mean": round2(
                    burst.snapshots.iter().sum::<u64>() as f64 / burst.snapshots.len().max(1) as f64
                ),
                "cpus": cpus,
                "load_start": load_start,
                "load_end": load_end,
            }),
        )?;
    }
    Ok(())
}

/// What the bursts gave: time from the first write to the worker seeing them all, and
/// snapshots per burst.
struct BurstResult {
    size: usize,
    total: Leg,
    snapshots: Vec<u64>,
}

/// Writes `--bursts` bursts of `--burst-size` label changes to distinct `node-0` pods, each
/// burst back to back, the next once the worker has seen the previous.
fn measure_bursts(
    server: &ApiServer,
    ds: &control::kube::KubeDatastore,
    shared: &Shared,
    s: &Sizes,
    args: &Args,
    timeout: Duration,
) -> Result<BurstResult> {
    let per_node = s.pods_per_node().min(s.pods).max(1);
    let size = args.burst_size.clamp(1, per_node);
    let mut out = BurstResult {
        size,
        total: Leg::new()?,
        snapshots: Vec::new(),
    };
    for b in 0..args.bursts {
        let mut objs = Vec::with_capacity(size);
        let mut expect = Vec::with_capacity(size);
        for j in 0..size {
            // Revisions past the single events' so every write is a change.
            let rev = 1_000_000 + b * size + j;
            let local = (b * size + j) % per_node;
            objs.push(cluster_pod(s, local, Some(rev)));
            expect.push(Expect::PodLabel {
                ns: format!("ns-{}", local % s.namespaces),
                name: format!("pod-{local}"),
                rev: rev.to_string(),
            });
        }
        let gap = Duration::from_micros(args.burst_gap_us);
        let sample = measure_event(server, ds, shared, &objs, gap, Expect::All(expect), timeout)
            .with_context(|| format!("burst #{b}"))?;
        out.total.record(sample.total);
        out.snapshots.push(sample.snapshots);
    }
    Ok(out)
}

fn policy_apply(server: &ApiServer, s: &Sizes, i: usize) {
    server.apply(&policy(
        i % s.namespaces,
        &format!("policy-{i}"),
        i % 5,
        i.is_multiple_of(4),
    ));
}

/// The parts of an update that the harness can time alone, on the newest `Manifests`.
#[derive(Clone, Copy, Debug, Default)]
struct Parts {
    /// `PolicyTable::compile`, the bulk of `build_snapshot`.
    compile: Duration,
    /// Cloning a full `Manifests`: what the datastore's cache does after each send to make
    /// its next one, for a consumer that gives nothing back (`--drop-inline` here).
    clone: Duration,
    /// `PolicyCompiler::compile` of the same cluster again, its base kept: what a snapshot
    /// that changes no pod or namespace costs.
    compile_kept: Duration,
}

fn time_parts(m: &Manifests) -> Parts {
    let t = Instant::now();
    let copy = m.clone();
    let clone = t.elapsed();
    drop(copy);
    let t = Instant::now();
    let (table, _errors) = PolicyTable::compile(
        &m.cluster,
        &CompileOptions {
            local_node: Some(LOCAL_NODE.to_owned()),
        },
    );
    let compile = t.elapsed();
    drop(table);
    let opts = CompileOptions {
        local_node: Some(LOCAL_NODE.to_owned()),
    };
    let mut compiler = PolicyCompiler::default();
    drop(compiler.compile(&m.cluster, &opts));
    let t = Instant::now();
    let kept = compiler.compile(&m.cluster, &opts);
    let compile_kept = t.elapsed();
    drop(kept);
    Parts {
        compile,
        clone,
        compile_kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick_args(json: Option<PathBuf>) -> Args {
        Args {
            pods: 10_000,
            namespaces: 1000,
            policies: 1000,
            nodes: 100,
            events: 3,
            coalesce_ms: 20,
            coalesce_quiet_ms: 5,
            bursts: 2,
            burst_size: 5,
            burst_gap_us: 100,
            worker_poll_us: 50,
            timeout_ms: 10_000,
            quick: true,
            full_compile: false,
            drop_inline: false,
            json,
        }
    }

    #[test]
    fn pod_addresses_fall_in_their_nodes_cidr() {
        fn check(node: usize, host: usize) {
            let cidr: classifier::net::Cidr = node_cidr_text(node).parse().expect("a CIDR");
            let ip: std::net::IpAddr = pod_address(node, host).parse().expect("an address");
            assert!(cidr.contains(ip), "{ip} outside {cidr}");
        }
        for (node, host) in [
            (0, 1),
            (0, 255),
            (0, 256),
            (15, 4000),
            (16, 1),
            (1023, 4094),
        ] {
            check(node, host);
        }
    }

    #[test]
    fn every_event_is_met_only_once_written() {
        let s = Sizes::from_args(&quick_args(None)).expect("sizes");
        for kind in KINDS {
            let (_, expect) = event(&s, kind, 1);
            assert!(!expect.met_by(&Manifests::default()), "{kind}");
        }
    }

    /// The whole harness on a small cluster: it reports, and the JSON has the agreed shape.
    #[test]
    fn quick_run_writes_the_agreed_json() {
        let dir = ocelot_tests::TempDir::new("bench-control").expect("temp dir");
        let path = dir.path().join("control.json");
        run(&quick_args(Some(path.clone()))).expect("a quick run");
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("json")).expect("parse");
        let results = v["results"].as_array().expect("results");
        let events: Vec<&str> = results.iter().filter_map(|r| r["event"].as_str()).collect();
        assert_eq!(events, KINDS);
        for r in results {
            let (p50, p99) = (r["p50_ms"].as_f64(), r["p99_ms"].as_f64());
            assert!(p50.is_some_and(|p| p > 0.0) && p99 >= p50, "{r}");
        }
        assert!(v["full_compile_ms"].as_f64().is_some_and(|x| x > 0.0));
        assert!(v["rss_mb"].as_f64().is_some_and(|x| x > 0.0));
    }
}
