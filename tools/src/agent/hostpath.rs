//! The host path: the node's own stack ↔ its pods, through a tap device and one thread.
//!
//! AF_XDP takes a pod's frames away from the kernel, so the node's stack can neither send to
//! its pods (kubelet probes, `kubectl exec`'s port-forward, node-local agents) nor receive
//! what pods send to it unless the dataplane gives it a way. The agent creates a tap device
//! (`node.host_interface`, default `ocelot0`) in the node's namespace and:
//!
//! - routes every known local pod address into it (`ip route replace 10.x.y.z/32 dev
//!   ocelot0`, taking over the CNI plugin's `dev caliX` route) with a permanent neighbour
//!   entry (`ee:ee:ee:ee:ee:ee`, Calico's host-side MAC), so the kernel writes its frames for
//!   pods into the tap without ARP (an unknown pod interface keeps its CNI route: that is
//!   where the agent learns its addresses until the pod object arrives);
//! - a host thread reads them, classifies each with its own classifier worker (the shared
//!   conntrack, the published snapshot; ingress = the host port, [`PortKind::Host`]) and
//!   copies what is forwarded into the hand-off of the worker that owns the pod's port;
//! - workers copy their `ToHost` frames (a pod's traffic to one of the node's addresses,
//!   after its egress policy and `node.pod_to_host`, or replies of connections the node
//!   opened) into a hand-off to the host thread, which writes them into the tap with the
//!   tap's MAC as destination: the kernel receives them as if from a neighbour on `ocelot0`.
//!
//! The tap exists only while the agent holds it: when the agent exits, even by SIGKILL, the
//! kernel removes the interface and every route and neighbour entry through it. Nothing is
//! left to clean at the next start.
//!
//! [`PortKind::Host`]: classifier::snapshot::PortKind::Host

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use classifier::conntrack::Conntrack;
use classifier::snapshot::Snapshot;
use classifier::verdict::{DropReason, PortId, Verdict};
use dataplane::handoff::{Doorbell, HandoffRx, HandoffTx};
use dataplane::live::LiveCounters;
use dataplane::sys::{self, Tap};
use dataplane::worker::WorkerCounters;

use super::ports;

/// The MAC the dataplane uses on the host path: the neighbour entry of every pod address on
/// the tap, the source of frames written into it and the answer to ARP from the kernel.
pub const HOST_PATH_MAC: [u8; 6] = [0xee; 6];

/// The tap's MTU. Hand-off buffers hold 2048 bytes, so frames of this size always fit.
pub const HOST_PATH_MTU: u32 = 1500;

/// Frames the host thread takes from the tap, and from each worker, per round.
const ROUND: usize = 64;

/// Sleep bound of an idle host thread (it also wakes on its doorbell and on the tap).
const IDLE_POLL_MS: i32 = 100;

/// The tap, opened and configured, before the host thread starts.
#[derive(Debug)]
pub struct HostTap {
    tap: Tap,
    /// The tap's own MAC (the kernel's side): the destination of frames written into it.
    pub mac: [u8; 6],
    /// Whether the node's stack has IPv6 on the tap (a node with IPv6 disabled gets IPv4
    /// routes only).
    pub ipv6: bool,
}

impl HostTap {
    /// Creates the tap `name`, sets its MTU and brings it up.
    pub fn open(name: &str) -> Result<HostTap> {
        let tap = Tap::open(name).with_context(|| {
            format!("creating the host path's tap {name} (node.host_interface; needs /dev/net/tun and CAP_NET_ADMIN)")
        })?;
        ip(&[
            "link",
            "set",
            "dev",
            name,
            "mtu",
            &HOST_PATH_MTU.to_string(),
            "up",
        ])?;
        let mac =
            ports::interface_mac(name).ok_or_else(|| anyhow!("cannot read the MAC of {name}"))?;
        // `/proc/sys/net` is the calling thread's namespace's: the tap's.
        let ipv6 = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"))
            .is_ok_and(|v| v.trim() == "0");
        Ok(HostTap { tap, mac, ipv6 })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.tap.name()
    }
}

/// What connects the host thread to the workers.
#[derive(Debug, Default)]
pub struct HostLinks {
    /// Host → worker `w`, for frames to ports it owns (rings `w`'s doorbell).
    pub to_workers: Vec<HandoffTx>,
    /// Worker `w` → host: its `ToHost` frames (ring the host thread's doorbell).
    pub from_workers: Vec<HandoffRx>,
}

/// The running host path.
#[derive(Debug)]
pub struct HostPath {
    name: String,
    ipv6: bool,
    /// Port id → index of the worker that owns it (`u16::MAX`: none), as the control
    /// thread last published it.
    owners: Arc<ArcSwap<Vec<u16>>>,
    /// The host thread's counters (its I/O and its classifier's).
    pub live: Arc<LiveCounters>,
    thread: Option<JoinHandle<Result<()>>>,
    /// Pod addresses routed into the tap.
    routed: BTreeSet<IpAddr>,
    /// Pod addresses that should be (the last `sync_routes`).
    wanted: BTreeSet<IpAddr>,
    /// Route changes the kernel refused (logged; retried at the next tick).
    route_errors: u64,
}

/// What the host thread needs.
#[derive(Debug)]
pub struct HostThread {
    /// The tap.
    pub tap: HostTap,
    /// The host port's id in the snapshots.
    pub id: PortId,
    /// Hand-offs to and from the workers.
    pub links: HostLinks,
    /// The thread's doorbell (the workers' `to_host` hand-offs ring it).
    pub doorbell: Arc<Doorbell>,
    /// The published snapshot.
    pub published: Arc<ArcSwap<Snapshot>>,
    /// The shared conntrack table.
    pub ct: Arc<Conntrack>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
}

impl HostPath {
    /// Starts the host thread.
    pub fn start(setup: HostThread) -> Result<HostPath> {
        let name = setup.tap.name().to_owned();
        let ipv6 = setup.tap.ipv6;
        let owners = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let live = Arc::new(LiveCounters::default());
        let thread_owners = Arc::clone(&owners);
        let thread_live = Arc::clone(&live);
        let thread = std::thread::Builder::new()
            .name("ocelot-host".into())
            .spawn(move || run(setup, &thread_owners, &thread_live))
            .context("spawning the host path thread")?;
        Ok(HostPath {
            name,
            ipv6,
            owners,
            live,
            thread: Some(thread),
            routed: BTreeSet::new(),
            wanted: BTreeSet::new(),
            route_errors: 0,
        })
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes which worker owns each port (by port id).
    pub fn set_owners(&self, owners: Vec<u16>) {
        self.owners.store(Arc::new(owners));
    }

    /// Routes exactly `pods` (the local pods' addresses) into the tap: new ones get a
    /// permanent neighbour entry and a host route, gone ones lose both.
    pub fn sync_routes(&mut self, pods: &BTreeSet<IpAddr>) {
        let pods: BTreeSet<IpAddr> = pods
            .iter()
            .filter(|ip| self.ipv6 || ip.is_ipv4())
            .copied()
            .collect();
        self.wanted = pods.clone();
        let pods = &pods;
        let mut batch = String::new();
        let mac = ports::format_mac(HOST_PATH_MAC);
        // `ip` tells the family from the address (a batch line takes no `-4`/`-6`).
        let name = &self.name;
        for ip in pods.difference(&self.routed) {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            batch.push_str(&format!(
                "neigh replace {ip} dev {name} lladdr {mac} nud permanent\n"
            ));
            batch.push_str(&format!("route replace {ip}/{len} dev {name}\n"));
        }
        for ip in self.routed.difference(pods) {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            batch.push_str(&format!("route del {ip}/{len} dev {name}\n"));
            batch.push_str(&format!("neigh del {ip} dev {name}\n"));
        }
        if batch.is_empty() {
            return;
        }
        match ip_batch(&batch) {
            Ok(()) => self.routed = pods.clone(),
            Err(e) => {
                // `-force` ran every line it could; the next sync retries from scratch.
                self.route_errors += 1;
                tracing::warn!("host path routes on {}: {e:#}", self.name);
                self.routed = pods.intersection(&self.routed).copied().collect();
            }
        }
    }

    /// Puts back routes the kernel lost — a link going down (someone flapped the tap)
    /// removes every route through it — and retries ones it refused. Run once per control
    /// tick; reads `/proc/net/route` and `/proc/net/ipv6_route` (no process spawned: a fork
    /// and exec of `ip` five times a second showed in the workers' latency tail).
    pub fn check_routes(&mut self) {
        // Unreadable, nothing is known to be lost: the next tick looks again.
        let Ok(mut routes) = super::unknown::read_host_routes() else {
            return;
        };
        let present: BTreeSet<IpAddr> = routes
            .remove(&self.name)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let lost: Vec<IpAddr> = self.routed.difference(&present).copied().collect();
        if lost.is_empty() && self.routed == self.wanted {
            return;
        }
        if !lost.is_empty() {
            tracing::warn!(
                "{} lost the routes of {} pods (the link went down?); putting them back",
                self.name,
                lost.len()
            );
        }
        for ip in lost {
            self.routed.remove(&ip);
        }
        let wanted = self.wanted.clone();
        self.sync_routes(&wanted);
    }

    /// Route changes the kernel refused so far.
    pub fn route_errors(&self) -> u64 {
        self.route_errors
    }

    /// Whether the host thread has stopped (an I/O error on the tap).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread (after `stop` is set) and returns its result. The tap goes with
    /// it.
    pub fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("host path thread panicked"))?,
            None => Ok(()),
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_batch(batch: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .context("writing to ip -batch")?;
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The host thread: tap → classifier → workers, and workers → tap.
fn run(setup: HostThread, owners: &ArcSwap<Vec<u16>>, live: &LiveCounters) -> Result<()> {
    let HostThread {
        tap,
        id,
        links,
        doorbell,
        published,
        ct,
        stop,
    } = setup;
    let mut worker = classifier::pipeline::Worker::new(ct);
    let mut io = WorkerCounters::default();
    // One frame at a time: the host path carries the node's own traffic, not the pods'
    // bulk, and this keeps it free of allocation without a burst of borrowed buffers.
    let mut buf = vec![0u8; 2048];
    let mut readable = Vec::with_capacity(2);
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        // The kernel's frames for pods.
        io_round(&tap.tap, &mut buf, ROUND, |frame| {
            busy = true;
            io.rx += 1;
            let snapshot = published.load();
            match worker.process_one(&snapshot, frame, id, super::now()) {
                Verdict::Forward(port) => {
                    let owner = owners.load().get(port.0 as usize).copied();
                    match owner.and_then(|w| links.to_workers.get(usize::from(w))) {
                        Some(out) => match out.push(port, frame) {
                            Ok(()) => io.handoff_out += 1,
                            Err(_) => io.handoff_dropped += 1,
                        },
                        None => io.not_local += 1,
                    }
                }
                Verdict::Reply => match tap.tap.write(frame) {
                    Ok(true) => io.tx += 1,
                    _ => io.add_drops(DropReason::TxFull, 1),
                },
                // The kernel sent its own address to the tap: nothing to do with it.
                Verdict::ToHost => io.to_host_dropped += 1,
                // Counted by the classifier.
                Verdict::Drop(_) => {}
            }
        })?;
        // The pods' frames for the node.
        for from in &links.from_workers {
            for _ in 0..ROUND {
                let mut wrote = None;
                let got = from.pop(|b| {
                    let bytes = b.bytes();
                    let Some(out) = buf.get_mut(..bytes.len()) else {
                        return;
                    };
                    out.copy_from_slice(bytes);
                    if let Some(macs) = out.get_mut(..12) {
                        macs[..6].copy_from_slice(&tap.mac);
                        macs[6..].copy_from_slice(&HOST_PATH_MAC);
                    }
                    wrote = Some(tap.tap.write(out));
                });
                if !got {
                    break;
                }
                busy = true;
                io.handoff_in += 1;
                match wrote {
                    Some(Ok(true)) => io.tx += 1,
                    Some(Ok(false)) => io.add_drops(DropReason::TxFull, 1),
                    Some(Err(e)) => {
                        tracing::warn!("writing to {}: {e}", tap.name());
                        io.add_drops(DropReason::TxFull, 1);
                    }
                    None => io.add_drops(DropReason::Truncated, 1),
                }
            }
        }
        if busy {
            live.store(&io, Some(worker.counters()));
            continue;
        }
        live.store(&io, Some(worker.counters()));
        doorbell.going_to_sleep();
        if links.from_workers.iter().any(|r| !r.is_empty()) {
            doorbell.woke();
            continue;
        }
        sys::poll_fds(&[tap.tap.fd(), doorbell.fd()], IDLE_POLL_MS, &mut readable);
        doorbell.woke();
    }
    live.store(&io, Some(worker.counters()));
    Ok(())
}

/// Reads up to `max` frames from the tap, running `f` on each.
fn io_round(tap: &Tap, buf: &mut [u8], max: usize, mut f: impl FnMut(&mut [u8])) -> Result<()> {
    for _ in 0..max {
        match tap.read(buf) {
            Ok(Some(n)) => {
                if let Some(frame) = buf.get_mut(..n) {
                    f(frame);
                }
            }
            Ok(None) => break,
            Err(e) => return Err(anyhow!("reading {}: {e}", tap.name())),
        }
    }
    Ok(())
}
