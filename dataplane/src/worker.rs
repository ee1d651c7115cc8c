//! The worker loop with a classifier in it: the skeleton of ocelot's forwarding worker.
//!
//! Like [`crate::rawfwd`], one worker owns one frame memory (UMEM) and some ports, and one
//! [`Worker::poll_once`] is: reclaim completions → refill fill rings → per port, receive a
//! burst → classify it → act on each verdict → send per egress port → flush. The difference
//! is the middle: instead of a static table, a [`Classify`] gives one [`Verdict`] per frame,
//! over the whole burst at once (the classifier's `process_burst` shape):
//!
//! - `Forward(port)`: onto that port's tx ring if this worker owns the port; if another
//!   worker owns it, copied into the [`crate::handoff`] to that worker (which sends it on at
//!   its next poll; dropped and counted as `handoff_dropped` when the hand-off is full);
//!   otherwise dropped and counted as `not_local`. An idle worker sleeps on its rx sockets
//!   only, so a hand-off can wait up to the idle timeout when its receiver is idle.
//! - `Reply`: back out of the ingress port (proxy-ARP answers).
//! - `ToHost`: AF_XDP cannot give a frame back to the kernel's stack, so it is copied into
//!   the host hand-off ([`Worker::set_to_host`]): the agent's host path writes it into its
//!   tap device. Without a host path, or when that hand-off is full, dropped and counted as
//!   `to_host_dropped`.
//! - `Drop(reason)`: back to the free list, counted under the reason.
//!
//! Frames the egress tx ring has no room for are counted as [`DropReason::TxFull`]. The loop
//! allocates nothing; frames are conserved as in `rawfwd`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use classifier::Nanos;
use classifier::conntrack::Conntrack;
use classifier::pipeline::Packet;
use classifier::snapshot::Snapshot;
use classifier::verdict::{Counters, DropReason, PortId, Verdict};

use crate::Error;
use crate::handoff::{Doorbell, HandoffRx, HandoffTx};
use crate::live::LiveCounters;
use crate::port::{BURST, FrameMem, Rx, Tx};
use crate::rawfwd::Idle;
use crate::sys;

/// Decides what happens to each frame of a burst that arrived on one port.
pub trait Classify {
    /// Writes `verdicts[i]` for `frames[i]` (same length), rewriting frames to forward or
    /// reply in place. All frames arrived on `ingress`.
    fn classify_burst(
        &mut self,
        frames: &mut [&mut [u8]],
        ingress: PortId,
        verdicts: &mut [Verdict],
    );

    /// The classifier's own counters, if it keeps any (published with the worker's).
    fn counters(&self) -> Option<&Counters> {
        None
    }
}

/// The real classifier: `classifier::pipeline::Worker` over the snapshot currently
/// published, with time from a clock function (the classifier itself never reads a clock).
#[derive(Debug)]
pub struct Pipeline {
    /// The classifier's per-worker state and counters; its burst's conntrack slot pass
    /// prefetches ([`crate::sys::Prefetch`]).
    pub worker: classifier::pipeline::Worker<crate::sys::Prefetch>,
    /// Where the control thread publishes table snapshots: loaded once per burst, so a
    /// new snapshot is in force from the next burst on and a burst never mixes two.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Monotonic nanoseconds.
    pub clock: fn() -> Nanos,
}

impl Pipeline {
    /// A pipeline over a snapshot that never changes (tests, benchmarks).
    pub fn fixed(ct: Arc<Conntrack>, snapshot: Snapshot, clock: fn() -> Nanos) -> Pipeline {
        Pipeline {
            worker: classifier::pipeline::Worker::with_touch(ct),
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            clock,
        }
    }
}

impl Classify for Pipeline {
    fn classify_burst(
        &mut self,
        frames: &mut [&mut [u8]],
        ingress: PortId,
        verdicts: &mut [Verdict],
    ) {
        let mut pkts: [Packet<'_>; BURST] = std::array::from_fn(|_| Packet {
            data: <&mut [u8]>::default(),
            ingress,
        });
        let mut n = 0;
        for (pkt, frame) in pkts.iter_mut().zip(frames.iter_mut()) {
            pkt.data = std::mem::take(frame);
            n += 1;
        }
        let now = (self.clock)();
        let pkts = pkts.get_mut(..n).unwrap_or_default();
        // One snapshot load per burst: a `Guard` borrows the current snapshot without
        // touching its reference count in the common case.
        let snapshot = self.snapshot.load();
        self.worker.process_burst(&snapshot, pkts, verdicts, now);
    }

    fn counters(&self) -> Option<&Counters> {
        Some(self.worker.counters())
    }
}

/// How often (in polls) a running worker copies its counters to its [`LiveCounters`].
pub const PUBLISH_EVERY_POLLS: u32 = 1024;

/// Counters of one worker's I/O: what it did with the verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Frames received.
    pub rx: u64,
    /// Frames queued on tx rings (forwarded and replies).
    pub tx: u64,
    /// `Forward` to a port another worker owns (no hand-off yet).
    pub not_local: u64,
    /// `ToHost` verdicts dropped: no host path, or its hand-off full.
    pub to_host_dropped: u64,
    /// `ToHost` frames copied into the host hand-off.
    pub to_host: u64,
    /// Frames copied to another worker for a port it owns.
    pub handoff_out: u64,
    /// Frames copied in from another worker and queued on a local port.
    pub handoff_in: u64,
    /// Frames for another worker dropped because its hand-off was full.
    pub handoff_dropped: u64,
    /// UMEM frames that sat in retired ports' rings and have not been given back yet
    /// ([`Worker::recover_frames`] takes them off again).
    pub frames_retired: u64,
    /// Frames the kernel dropped on the worker's sockets before user space saw them: too big
    /// for a frame, or no frame to receive into (`XDP_STATISTICS` rx_dropped), summed over its
    /// ports, retired ones included.
    pub xsk_rx_dropped: u64,
    /// Frames the kernel dropped because a socket's rx ring was full (the worker fell behind).
    pub xsk_rx_ring_full: u64,
    /// Times the kernel found a fill ring empty (frame starvation; its drops are in
    /// `xsk_rx_dropped`).
    pub xsk_fill_ring_empty: u64,
    /// Invalid descriptors the kernel saw on the worker's rings (a dataplane bug if non-zero).
    pub xsk_invalid_descs: u64,
    /// Drops by classifier reason, plus [`DropReason::TxFull`] for full tx rings; indexed by
    /// [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            rx: 0,
            tx: 0,
            not_local: 0,
            to_host_dropped: 0,
            to_host: 0,
            handoff_out: 0,
            handoff_in: 0,
            handoff_dropped: 0,
            frames_retired: 0,
            xsk_rx_dropped: 0,
            xsk_rx_ring_full: 0,
            xsk_fill_ring_empty: 0,
            xsk_invalid_descs: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

impl WorkerCounters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// Counts `n` drops for `reason`.
    pub fn add_drops(&mut self, reason: DropReason, n: u64) {
        if let Some(c) = self.drops.get_mut(reason.index()) {
            *c += n;
        }
    }
}

/// One port of a worker: the classifier's id for it and its two sides.
#[derive(Debug)]
pub struct WorkerPort<R, T> {
    /// The port's id in the table snapshot.
    pub id: PortId,
    /// Its receive side.
    pub rx: R,
    /// Its transmit side.
    pub tx: T,
}

#[derive(Debug)]
struct Port<R, T, F> {
    id: PortId,
    rx: R,
    tx: T,
    pending: Vec<F>,
}

/// A worker over frame memory `M`, ports `R`/`T` and classifier `C`.
#[derive(Debug)]
pub struct Worker<M: FrameMem, R, T, C> {
    mem: M,
    classify: C,
    ports: Vec<Port<R, T, M::Frame>>,
    /// Local port index by `PortId.0`.
    local: Vec<Option<usize>>,
    /// Index into `handoff_out` by `PortId.0`, for ports other workers own.
    remote: Vec<Option<usize>>,
    handoff_out: Vec<HandoffTx>,
    handoff_in: Vec<HandoffRx>,
    to_host: Option<HandoffTx>,
    free: Vec<M::Frame>,
    burst: Vec<M::Frame>,
    verdicts: [Verdict; BURST],
    counters: WorkerCounters,
    frames: usize,
    live: Option<Arc<LiveCounters>>,
    doorbell: Option<Arc<Doorbell>>,
    /// Socket counters of retired ports (their sockets are gone; their counts stay).
    xsk_retired: sys::KernelStats,
}

impl<M, R, T, C> Worker<M, R, T, C>
where
    M: FrameMem,
    R: Rx<Frame = M::Frame>,
    T: Tx<Frame = M::Frame>,
    C: Classify,
{
    /// Builds a worker owning `frames` and `ports`. Several ports may share one id: they are
    /// queues of one interface (a multi-queue uplink); all of them receive, and frames
    /// forwarded to the id leave by the first.
    pub fn new(
        mem: M,
        frames: Vec<M::Frame>,
        ports: Vec<WorkerPort<R, T>>,
        classify: C,
    ) -> Result<Self, Error> {
        let n = ports.len();
        let max_id = ports.iter().map(|p| p.id.0 as usize).max().unwrap_or(0);
        let mut local = vec![None; max_id + 1];
        for (entry, p) in ports.iter().enumerate() {
            if let Some(slot @ None) = local.get_mut(p.id.0 as usize) {
                *slot = Some(entry);
            }
        }
        let count = frames.len();
        let mut free = Vec::with_capacity(count);
        free.extend(frames);
        let ports = ports
            .into_iter()
            .map(|p| Port {
                id: p.id,
                rx: p.rx,
                tx: p.tx,
                pending: Vec::with_capacity(BURST * n),
            })
            .collect();
        Ok(Worker {
            mem,
            classify,
            ports,
            local,
            remote: Vec::new(),
            handoff_out: Vec::new(),
            to_host: None,
            handoff_in: Vec::new(),
            free,
            burst: Vec::with_capacity(BURST),
            verdicts: [Verdict::Drop(DropReason::Truncated); BURST],
            counters: WorkerCounters::default(),
            frames: count,
            live: None,
            doorbell: None,
            xsk_retired: sys::KernelStats::default(),
        })
    }

    /// Sends frames forwarded to any of `ports` (owned by another worker) through `tx`.
    /// Refuses a port this worker owns or one already routed elsewhere.
    pub fn add_handoff_out(&mut self, tx: HandoffTx, ports: &[PortId]) -> Result<(), Error> {
        let index = self.handoff_out.len();
        for (entry, id) in ports.iter().enumerate() {
            let slot = id.0 as usize;
            if matches!(self.local.get(slot), Some(Some(_))) {
                return Err(Error::Table {
                    entry,
                    reason: "hand-off to a port this worker owns",
                });
            }
            if self.remote.len() <= slot {
                self.remote.resize(slot + 1, None);
            }
            match self.remote.get_mut(slot) {
                Some(s @ None) => *s = Some(index),
                _ => {
                    return Err(Error::Table {
                        entry,
                        reason: "port already handed off to another worker",
                    });
                }
            }
        }
        self.handoff_out.push(tx);
        Ok(())
    }

    /// Adds a port while the worker is stopped between runs (the agent attaches a new pod's
    /// veth this way). Refuses an id the worker already owns.
    pub fn add_port(&mut self, port: WorkerPort<R, T>) -> Result<(), Error> {
        let slot = port.id.0 as usize;
        if self.local.len() <= slot {
            self.local.resize(slot + 1, None);
        }
        match self.local.get_mut(slot) {
            Some(s @ None) => *s = Some(self.ports.len()),
            _ => {
                return Err(Error::Table {
                    entry: slot,
                    reason: "port id used twice",
                });
            }
        }
        if let Some(r) = self.remote.get_mut(slot) {
            *r = None;
        }
        let n = self.ports.len() + 1;
        self.ports.push(Port {
            id: port.id,
            rx: port.rx,
            tx: port.tx,
            pending: Vec::new(),
        });
        // Every port may receive a burst from every port and every inbound hand-off in one
        // poll; reserve now so the poll loop never allocates.
        let cap = BURST * (n + self.handoff_in.len());
        for p in &mut self.ports {
            p.pending.reserve(cap.saturating_sub(p.pending.len()));
        }
        Ok(())
    }

    /// Gives back frames that were in a retired port's kernel rings (the frame memory
    /// returns them once the socket is closed: `XskUmem::release`), so pod churn does not
    /// shrink the worker's pool. They were counted in [`WorkerCounters::frames_retired`] and
    /// are taken off it again.
    pub fn recover_frames(&mut self, frames: Vec<M::Frame>) {
        let n = frames.len();
        self.free.extend(frames);
        self.frames += n;
        self.counters.frames_retired = self.counters.frames_retired.saturating_sub(n as u64);
    }

    /// Removes a port (its pod is gone) and returns its two sides, so the caller decides
    /// when the socket closes. Frames still in the port's kernel rings are counted in
    /// [`WorkerCounters::frames_retired`] until [`Worker::recover_frames`] gives them back.
    pub fn retire_port(&mut self, id: PortId) -> Option<(R, T)> {
        let slot = id.0 as usize;
        let index = self.local.get(slot).copied().flatten()?;
        if let Some(s) = self.local.get_mut(slot) {
            *s = None;
        }
        if index >= self.ports.len() {
            return None;
        }
        let mut port = self.ports.remove(index);
        if let Some(stats) = port.rx.socket_stats() {
            self.xsk_retired.add(&stats);
        }
        // Ports after it moved down by one.
        for l in self.local.iter_mut().flatten() {
            if *l > index {
                *l -= 1;
            }
        }
        self.free.append(&mut port.pending);
        let _ = port.tx.reclaim(&mut self.free);
        let in_user_space =
            self.free.len() + self.ports.iter().map(|p| p.pending.len()).sum::<usize>();
        let in_kernel: usize = self
            .ports
            .iter()
            .map(|p| p.rx.in_kernel() + p.tx.in_flight())
            .sum();
        let lost = self.frames.saturating_sub(in_user_space + in_kernel);
        self.counters.frames_retired += lost as u64;
        self.frames -= lost;
        Some((port.rx, port.tx))
    }

    /// Sends frames forwarded to `id` (a port another worker owns) through the hand-off
    /// added `out`-th by [`Worker::add_handoff_out`].
    pub fn route_handoff(&mut self, id: PortId, out: usize) -> Result<(), Error> {
        let slot = id.0 as usize;
        if out >= self.handoff_out.len() {
            return Err(Error::Table {
                entry: out,
                reason: "no such hand-off",
            });
        }
        if matches!(self.local.get(slot), Some(Some(_))) {
            return Err(Error::Table {
                entry: slot,
                reason: "hand-off to a port this worker owns",
            });
        }
        if self.remote.len() <= slot {
            self.remote.resize(slot + 1, None);
        }
        if let Some(r) = self.remote.get_mut(slot) {
            *r = Some(out);
        }
        Ok(())
    }

    /// The frame memory (the agent opens new sockets on the worker's UMEM through it).
    pub fn mem_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Sleeps on `doorbell` too when idle, so hand-offs (whose senders ring it, see
    /// [`HandoffTx::with_doorbell`]) and the owner's commands wake the worker at once.
    pub fn set_doorbell(&mut self, doorbell: Arc<Doorbell>) {
        self.doorbell = Some(doorbell);
    }

    /// Publishes this worker's counters (and its classifier's) to `live` from [`Worker::run`]:
    /// every [`PUBLISH_EVERY_POLLS`] polls, whenever it goes idle, and when it stops.
    pub fn publish_to(&mut self, live: Arc<LiveCounters>) {
        self.live = Some(live);
    }

    fn publish(&self) {
        if let Some(live) = &self.live {
            live.store(&self.counters, self.classify.counters());
        }
    }

    /// Reads the kernel's counters of every socket into [`WorkerCounters`]'s `xsk_*`.
    pub fn refresh_socket_stats(&mut self) {
        let mut sum = self.xsk_retired;
        for p in &self.ports {
            if let Some(s) = p.rx.socket_stats() {
                sum.add(&s);
            }
        }
        self.counters.xsk_rx_dropped = sum.rx_dropped;
        self.counters.xsk_rx_ring_full = sum.rx_ring_full;
        self.counters.xsk_fill_ring_empty = sum.rx_fill_ring_empty;
        self.counters.xsk_invalid_descs = sum.rx_invalid_descs + sum.tx_invalid_descs;
    }

    /// Sends `ToHost` frames into `tx` (copied; the buffer's port is the ingress port), for
    /// the agent's host path to hand to the kernel.
    pub fn set_to_host(&mut self, tx: HandoffTx) {
        self.to_host = Some(tx);
    }

    /// Takes frames other workers hand over through `rx` and sends them on local ports.
    pub fn add_handoff_in(&mut self, rx: HandoffRx) {
        // Each poll may queue up to a burst from every inbound hand-off on one port.
        for p in &mut self.ports {
            p.pending.reserve(BURST);
        }
        self.handoff_in.push(rx);
    }

    /// One round over all ports (see the module docs). Returns the frames received.
    pub fn poll_once(&mut self) -> Result<usize, Error> {
        for p in &mut self.ports {
            p.tx.reclaim(&mut self.free)?;
        }
        // Keep a burst of free frames per inbound hand-off out of the fill rings, or frames
        // handed over could never be copied in when the fill rings can hold every frame.
        let reserve = BURST * self.handoff_in.len();
        // Each port's fill ring is topped up to an equal share of the frames, leaving one
        // share free: frames in flight on tx rings come from it, and a port added later
        // (a new pod) can be filled at once instead of waiting for traffic to free frames.
        let target = self.frames / (self.ports.len() + 1);
        for p in &mut self.ports {
            let want = target.saturating_sub(p.rx.in_kernel());
            let can = self.free.len().saturating_sub(reserve);
            if want > 0 && can > 0 {
                p.rx.fill(&mut self.free, want.min(can))?;
            }
        }
        let mut received = 0;
        for i in 0..self.ports.len() {
            let Some(port) = self.ports.get_mut(i) else {
                continue;
            };
            let got = port.rx.recv(&mut self.burst, BURST)?;
            if got == 0 {
                continue;
            }
            let ingress = port.id;
            received += got;
            self.counters.rx += got as u64;
            let verdicts = self.verdicts.get_mut(..got).unwrap_or_default();
            let classify = &mut self.classify;
            self.mem.with_burst_mut(&mut self.burst, |frames| {
                classify.classify_burst(frames, ingress, verdicts);
            });
            for (frame, verdict) in self.burst.drain(..).zip(self.verdicts.iter()) {
                let egress = match *verdict {
                    Verdict::Forward(id) => match self.local.get(id.0 as usize) {
                        Some(Some(index)) => Some(*index),
                        _ => {
                            match self
                                .remote
                                .get(id.0 as usize)
                                .copied()
                                .flatten()
                                .and_then(|k| self.handoff_out.get(k))
                            {
                                Some(out) => {
                                    let mut frame = frame;
                                    let pushed =
                                        self.mem.with_bytes_mut(&mut frame, |b| out.push(id, b));
                                    match pushed {
                                        Ok(()) => self.counters.handoff_out += 1,
                                        Err(_) => self.counters.handoff_dropped += 1,
                                    }
                                    self.free.push(frame);
                                    continue;
                                }
                                None => self.counters.not_local += 1,
                            }
                            None
                        }
                    },
                    Verdict::Reply => Some(i),
                    Verdict::ToHost => {
                        match &self.to_host {
                            Some(out) => {
                                let mut frame = frame;
                                let pushed = self
                                    .mem
                                    .with_bytes_mut(&mut frame, |b| out.push(ingress, b));
                                match pushed {
                                    Ok(()) => self.counters.to_host += 1,
                                    Err(_) => self.counters.to_host_dropped += 1,
                                }
                                self.free.push(frame);
                                continue;
                            }
                            None => self.counters.to_host_dropped += 1,
                        }
                        None
                    }
                    Verdict::Drop(reason) => {
                        self.counters.add_drops(reason, 1);
                        None
                    }
                };
                match egress.and_then(|e| self.ports.get_mut(e)) {
                    Some(out) => out.pending.push(frame),
                    None => self.free.push(frame),
                }
            }
        }
        received += self.poll_handoffs_in();
        for p in &mut self.ports {
            if !p.pending.is_empty() {
                let sent = p.tx.send(&mut p.pending)?;
                self.counters.tx += sent as u64;
                self.counters
                    .add_drops(DropReason::TxFull, p.pending.len() as u64);
                self.free.append(&mut p.pending);
            }
            p.tx.flush()?;
        }
        Ok(received)
    }

    /// Copies up to a burst per inbound hand-off into free frames, queued on their egress
    /// ports. Returns how many frames were taken off the hand-offs.
    fn poll_handoffs_in(&mut self) -> usize {
        let mut taken = 0;
        for inbound in &self.handoff_in {
            for _ in 0..BURST {
                // Without a free frame the buffers wait in the hand-off (whose sender drops
                // when it is full), so nothing here blocks.
                let Some(mut frame) = self.free.pop() else {
                    break;
                };
                let mut egress = None;
                let got = inbound.pop(|buf| {
                    let bytes = buf.bytes();
                    if let Some(Some(e)) = self.local.get(buf.egress().0 as usize)
                        && self.mem.set_len(&mut frame, bytes.len()) == bytes.len()
                    {
                        self.mem
                            .with_bytes_mut(&mut frame, |b| b.copy_from_slice(bytes));
                        egress = Some(*e);
                    }
                });
                if !got {
                    self.free.push(frame);
                    break;
                }
                taken += 1;
                match egress.and_then(|e| self.ports.get_mut(e)) {
                    Some(port) => {
                        port.pending.push(frame);
                        self.counters.handoff_in += 1;
                    }
                    None => {
                        self.free.push(frame);
                        self.counters.not_local += 1;
                    }
                }
            }
        }
        taken
    }

    /// Polls until `stop` is set, idling as `idle` says. Returns the first I/O error.
    pub fn run(&mut self, stop: &AtomicBool, idle: Idle) -> Result<(), Error> {
        self.run_until(stop, &AtomicBool::new(false), idle)
    }

    /// As [`Worker::run`], also returning (with `Ok`) as soon as `attention` is set: the
    /// owner has commands for the worker (ports to add or retire) and calls `run_until`
    /// again afterwards.
    pub fn run_until(
        &mut self,
        stop: &AtomicBool,
        attention: &AtomicBool,
        idle: Idle,
    ) -> Result<(), Error> {
        let result = self.run_loop(stop, attention, idle);
        self.refresh_socket_stats();
        self.publish();
        result
    }

    fn run_loop(
        &mut self,
        stop: &AtomicBool,
        attention: &AtomicBool,
        idle: Idle,
    ) -> Result<(), Error> {
        let mut empty = 0u32;
        let mut idle_since = None;
        let mut published_idle = false;
        let mut polls = 0u32;
        while !stop.load(Ordering::Relaxed) && !attention.load(Ordering::Relaxed) {
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(PUBLISH_EVERY_POLLS) {
                self.refresh_socket_stats();
                self.publish();
            }
            if self.poll_once()? > 0 {
                empty = 0;
                idle_since = None;
                published_idle = false;
                continue;
            }
            if let Idle::Poll {
                after_empty_polls,
                linger_us,
                timeout_ms,
            } = idle
            {
                empty = empty.saturating_add(1);
                let in_flight = self.ports.iter().any(|p| p.tx.in_flight() > 0);
                if empty >= after_empty_polls
                    && !in_flight
                    && crate::rawfwd::lingered(&mut idle_since, linger_us)
                {
                    // The first sleep after work publishes the counters (a sleeping worker's
                    // figures are then current).
                    if !published_idle {
                        self.refresh_socket_stats();
                        self.publish();
                        published_idle = true;
                    }
                    if let Some(bell) = &self.doorbell {
                        bell.going_to_sleep();
                        // Checked after announcing the sleep: a frame handed over before it
                        // is seen here, one handed over after it rings the bell.
                        let waiting = self.handoff_in.iter().any(|h| !h.is_empty());
                        if !waiting && !attention.load(Ordering::SeqCst) {
                            // The bell first: `poll_readable` takes a bounded number.
                            let fds = std::iter::once(bell.fd())
                                .chain(self.ports.iter().filter_map(|p| p.rx.fd()));
                            sys::poll_readable(fds, timeout_ms)?;
                        }
                        bell.woke();
                    } else {
                        let fds = self.ports.iter().filter_map(|p| p.rx.fd());
                        sys::poll_readable(fds, timeout_ms)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The worker's counters.
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// The classifier (e.g. to read its counters or give it a new snapshot).
    pub fn classify_mut(&mut self) -> &mut C {
        &mut self.classify
    }

    /// Frames on the free list now.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Frames the worker was built with.
    pub fn total_frames(&self) -> usize {
        self.frames
    }

    /// The ids of the ports, in order.
    pub fn port_ids(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().map(|p| p.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{self, Faults, MemFrames, MemRx, MemTx, Wire};

    /// A classifier that reads its verdict from byte 14 of the frame (right after the
    /// Ethernet header) and marks frames it forwards by setting byte 15 to the ingress id.
    #[derive(Debug, Default)]
    struct ByteVerdict {
        bursts: usize,
    }

    const FORWARD_TO_1: u8 = 0;
    const DROP_POLICY: u8 = 1;
    const REPLY: u8 = 2;
    const TO_HOST: u8 = 3;
    const FORWARD_TO_9: u8 = 4;
    const FORWARD_TO_0: u8 = 5;

    impl Classify for ByteVerdict {
        fn classify_burst(
            &mut self,
            frames: &mut [&mut [u8]],
            ingress: PortId,
            verdicts: &mut [Verdict],
        ) {
            self.bursts += 1;
            assert_eq!(frames.len(), verdicts.len());
            for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
                *v = match f.get(14).copied() {
                    Some(FORWARD_TO_1) => Verdict::Forward(PortId(1)),
                    Some(DROP_POLICY) => Verdict::Drop(DropReason::PolicyIngress),
                    Some(REPLY) => Verdict::Reply,
                    Some(TO_HOST) => Verdict::ToHost,
                    Some(FORWARD_TO_9) => Verdict::Forward(PortId(9)),
                    Some(FORWARD_TO_0) => Verdict::Forward(PortId(0)),
                    _ => Verdict::Drop(DropReason::Truncated),
                };
                if let Some(b) = f.get_mut(15) {
                    *b = ingress.0 as u8;
                }
            }
        }
    }

    type MemWorker<C> = Worker<MemFrames, MemRx, MemTx, C>;

    fn worker<C: Classify>(classify: C, frames: usize) -> (MemWorker<C>, Wire, Wire) {
        let (rx0, tx0, w0) = mem::wire(Faults::default());
        let (rx1, tx1, w1) = mem::wire(Faults::default());
        let w = Worker::new(
            MemFrames,
            mem::frames(frames, 2048),
            vec![
                WorkerPort {
                    id: PortId(0),
                    rx: rx0,
                    tx: tx0,
                },
                WorkerPort {
                    id: PortId(1),
                    rx: rx1,
                    tx: tx1,
                },
            ],
            classify,
        )
        .expect("valid ports");
        (w, w0, w1)
    }

    fn frame(verdict_byte: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[14] = verdict_byte;
        f
    }

    #[test]
    fn verdicts_are_acted_on_table() {
        // (verdict byte injected on port 0, frames out of port 0, frames out of port 1,
        //  counter check)
        fn check(byte: u8, out0: usize, out1: usize, counted: fn(&WorkerCounters) -> u64) {
            let (mut w, w0, w1) = worker(ByteVerdict::default(), 32);
            w.poll_once().unwrap();
            w0.inject(&frame(byte));
            w.poll_once().unwrap();
            let (s0, s1) = (w0.take_sent(), w1.take_sent());
            assert_eq!((s0.len(), s1.len()), (out0, out1), "byte {byte}");
            for s in s0.iter().chain(&s1) {
                assert_eq!(s[15], 0, "classified as arriving on port 0");
            }
            assert_eq!(counted(w.counters()), 1, "byte {byte}: {:?}", w.counters());
            assert_eq!(w.counters().rx, 1);
        }
        check(FORWARD_TO_1, 0, 1, |c| c.tx);
        check(FORWARD_TO_0, 1, 0, |c| c.tx);
        check(REPLY, 1, 0, |c| c.tx);
        check(DROP_POLICY, 0, 0, |c| c.dropped(DropReason::PolicyIngress));
        check(TO_HOST, 0, 0, |c| c.to_host_dropped);
        check(FORWARD_TO_9, 0, 0, |c| c.not_local);
    }

    #[test]
    fn to_host_frames_are_copied_into_the_host_hand_off_until_it_is_full() {
        let (mut w, w0, w1) = worker(ByteVerdict::default(), 64);
        let (tx, rx) = crate::handoff::channel(2, 2048);
        w.set_to_host(tx);
        w.poll_once().unwrap();
        for _ in 0..3 {
            w0.inject(&frame(TO_HOST));
        }
        w.poll_once().unwrap();
        assert_eq!((w.counters().to_host, w.counters().to_host_dropped), (2, 1));
        let mut got = Vec::new();
        while rx.pop(|b| got.push((b.egress(), b.bytes().to_vec()))) {}
        assert_eq!(got.len(), 2);
        for (ingress, bytes) in got {
            assert_eq!(ingress, PortId(0), "tagged with the ingress port");
            assert_eq!(bytes.get(14), Some(&TO_HOST));
        }
        // Every frame went back to the free list.
        assert_eq!(
            w.free_frames() + w0.frames_in_kernel() + w1.frames_in_kernel(),
            w.total_frames()
        );
    }

    #[test]
    fn ports_added_and_retired_while_stopped_keep_frames_accounted() {
        let (mut w, w0, w1) = worker(ByteVerdict::default(), 256);
        let (rx2, tx2, w2) = mem::wire(Faults::default());
        w.add_port(WorkerPort {
            id: PortId(2),
            rx: rx2,
            tx: tx2,
        })
        .unwrap();
        let (rx, tx, _) = mem::wire(Faults::default());
        assert!(
            w.add_port(WorkerPort {
                id: PortId(2),
                rx,
                tx
            })
            .is_err(),
            "an id twice"
        );
        w.poll_once().unwrap();
        w2.inject(&frame(FORWARD_TO_1));
        w2.inject(&frame(FORWARD_TO_0));
        w.poll_once().unwrap();
        assert_eq!(w1.take_sent().len(), 1);
        let sent0 = w0.take_sent();
        assert_eq!(sent0.len(), 1);
        assert_eq!(sent0[0][15], 2, "classified as arriving on port 2");
        w.poll_once().unwrap();
        let stuck = w2.fill_level();
        assert!(stuck > 0);
        // A fill share per port (256 frames / 4), one share left free.
        assert!(w.free_frames() >= 256 / 4, "{}", w.free_frames());
        let total = w.total_frames();
        let (rx2, tx2) = w.retire_port(PortId(2)).expect("port 2 is local");
        drop((rx2, tx2));
        assert!(w.retire_port(PortId(2)).is_none());
        assert_eq!(w.counters().frames_retired, stuck as u64);
        assert_eq!(w.total_frames(), total - stuck);
        // Port 1 still works, and every remaining frame is accounted for.
        w0.inject(&frame(FORWARD_TO_1));
        w.poll_once().unwrap();
        w.poll_once().unwrap();
        assert_eq!(w1.take_sent().len(), 1);
        assert_eq!(
            w.free_frames() + w0.frames_in_kernel() + w1.frames_in_kernel(),
            w.total_frames()
        );
    }

    #[test]
    fn one_classify_call_per_burst() {
        // 512 frames over two ports: a fill share of 170 each, room for the 100 below.
        let (mut w, w0, _w1) = worker(ByteVerdict::default(), 512);
        w.poll_once().unwrap();
        for _ in 0..100 {
            w0.inject(&frame(FORWARD_TO_1));
        }
        w.poll_once().unwrap();
        w.poll_once().unwrap();
        // 100 frames: a burst of 64, then 36.
        assert_eq!(w.classify_mut().bursts, 2);
        assert_eq!(w.counters().tx, 100);
    }

    #[test]
    fn queues_of_one_interface_share_an_id_and_transmit_by_the_first() {
        let (rx0, tx0, w0) = mem::wire(Faults::default());
        let (rx1, tx1, w1) = mem::wire(Faults::default());
        let (rx2, tx2, w2) = mem::wire(Faults::default());
        let mut w = Worker::new(
            MemFrames,
            mem::frames(512, 2048),
            vec![
                WorkerPort {
                    id: PortId(0),
                    rx: rx0,
                    tx: tx0,
                },
                // Two queues of interface 1.
                WorkerPort {
                    id: PortId(1),
                    rx: rx1,
                    tx: tx1,
                },
                WorkerPort {
                    id: PortId(1),
                    rx: rx2,
                    tx: tx2,
                },
            ],
            ByteVerdict::default(),
        )
        .expect("two queues of one interface");
        w.poll_once().unwrap();
        // Both queues receive; what they forward to port 0 leaves by port 0.
        w1.inject(&frame(FORWARD_TO_0));
        w2.inject(&frame(FORWARD_TO_0));
        // Port 0's frames to port 1 leave by its first queue.
        w0.inject(&frame(FORWARD_TO_1));
        w.poll_once().unwrap();
        assert_eq!(w0.take_sent().len(), 2);
        assert_eq!((w1.take_sent().len(), w2.take_sent().len()), (1, 0));
    }

    #[test]
    fn full_tx_ring_counts_tx_full() {
        let (mut w, w0, w1) = worker(ByteVerdict::default(), 64);
        w1.set_faults(Faults {
            tx_size: 2,
            hold_completions: true,
            ..Faults::default()
        });
        w.poll_once().unwrap();
        for _ in 0..5 {
            w0.inject(&frame(FORWARD_TO_1));
        }
        w.poll_once().unwrap();
        assert_eq!(w.counters().tx, 2);
        assert_eq!(w.counters().dropped(DropReason::TxFull), 3);
        assert_eq!(
            w.free_frames() + w0.frames_in_kernel() + w1.frames_in_kernel(),
            w.total_frames()
        );
    }

    /// A worker owning only `port`, over a fresh simulated interface.
    fn single(port: u16, frames: usize) -> (MemWorker<ByteVerdict>, Wire) {
        let (rx, tx, wire) = mem::wire(Faults::default());
        let w = Worker::new(
            MemFrames,
            mem::frames(frames, 2048),
            vec![WorkerPort {
                id: PortId(port),
                rx,
                tx,
            }],
            ByteVerdict::default(),
        )
        .expect("valid ports");
        (w, wire)
    }

    #[test]
    fn frames_for_another_workers_port_cross_the_handoff() {
        use crate::handoff;
        let (mut a, wire_a) = single(0, 128);
        let (mut b, wire_b) = single(1, 128);
        let (a_to_b, b_from_a) = handoff::channel(4, 2048);
        let (b_to_a, a_from_b) = handoff::channel(4, 2048);
        a.add_handoff_out(a_to_b, &[PortId(1)]).unwrap();
        b.add_handoff_in(b_from_a);
        b.add_handoff_out(b_to_a, &[PortId(0)]).unwrap();
        a.add_handoff_in(a_from_b);
        a.poll_once().unwrap();
        b.poll_once().unwrap();

        // Six frames for port 1 arrive at worker a; the hand-off holds four.
        for _ in 0..6 {
            wire_a.inject(&frame(FORWARD_TO_1));
        }
        a.poll_once().unwrap();
        assert_eq!(a.counters().handoff_out, 4);
        assert_eq!(a.counters().handoff_dropped, 2);
        b.poll_once().unwrap();
        let sent = wire_b.take_sent();
        assert_eq!(sent.len(), 4);
        assert!(sent.iter().all(|f| f[14] == FORWARD_TO_1 && f[15] == 0));
        assert_eq!(b.counters().handoff_in, 4);

        // And back: b forwards to port 0, a transmits.
        wire_b.inject(&frame(FORWARD_TO_0));
        b.poll_once().unwrap();
        a.poll_once().unwrap();
        assert_eq!(wire_a.take_sent().len(), 1);

        for (w, wire) in [(&a, &wire_a), (&b, &wire_b)] {
            assert_eq!(w.free_frames() + wire.frames_in_kernel(), w.total_frames());
        }
    }

    #[test]
    fn handoff_routes_are_checked() {
        use crate::handoff;
        let (mut a, _) = single(0, 8);
        let (t1, _r1) = handoff::channel(1, 64);
        let (t2, _r2) = handoff::channel(1, 64);
        let (t3, _r3) = handoff::channel(1, 64);
        assert!(matches!(
            a.add_handoff_out(t1, &[PortId(0)]),
            Err(Error::Table { .. })
        ));
        a.add_handoff_out(t2, &[PortId(5)]).unwrap();
        assert!(matches!(
            a.add_handoff_out(t3, &[PortId(5)]),
            Err(Error::Table { .. })
        ));
    }

    /// The real classifier in the loop, on an empty snapshot. What it decides is not this
    /// test's business (the classifier is still being written); that every frame is
    /// accounted for and returned, whatever the verdicts, is.
    #[test]
    fn real_pipeline_frames_are_conserved_whatever_the_verdicts() {
        let snapshot = Snapshot {
            epoch: 1,
            policy: Default::default(),
            routes: classifier::snapshot::RouteTable::new(),
            ports: Vec::new(),
            config: Default::default(),
        };
        let pipeline = Pipeline {
            worker: classifier::pipeline::Worker::with_touch(Arc::new(
                classifier::conntrack::Conntrack::new(Default::default()),
            )),
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            clock: || 0,
        };
        let (mut w, w0, w1) = worker(pipeline, 256);
        w.poll_once().unwrap();
        for i in 0..40u8 {
            w0.inject(&frame(i));
            w1.inject(&frame(i));
        }
        for _ in 0..4 {
            w.poll_once().unwrap();
        }
        let c = *w.counters();
        let dropped: u64 = c.drops.iter().sum();
        assert_eq!(c.rx, 80);
        assert_eq!(
            c.rx,
            c.tx + dropped + c.not_local + c.to_host_dropped + c.to_host
        );
        assert_eq!(w.classify_mut().worker.counters().rx, 80);
        assert_eq!(
            w.free_frames() + w0.frames_in_kernel() + w1.frames_in_kernel(),
            w.total_frames()
        );
    }
}
