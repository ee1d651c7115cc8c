//! The bare rx→tx forwarder: one thread, one UMEM, a static table saying which port each
//! port's frames leave by and which MACs they leave with. No classifier: this is the floor
//! the real pipeline is measured against (the benchmark's `raw-xsk` device), and the first
//! thing that moves real frames.
//!
//! Input: frames received on each port. Output: the same frames (same UMEM buffers, no copy)
//! on the egress port's tx ring, with destination and source MAC replaced by the egress
//! port's [`MacRewrite`]. Frames shorter than an Ethernet header are dropped as
//! [`FwdDrop::Runt`]; frames the egress tx ring has no room for are dropped as
//! [`FwdDrop::TxRingFull`] (never queued behind: a forwarder that waits turns overload into
//! latency). Dropped frames go straight back to the free list.
//!
//! One [`RawFwd::poll_once`] is: reclaim completions → refill fill rings → receive a burst per
//! port and rewrite → send per egress port → flush (kick) the tx rings. It allocates
//! nothing: every list it moves frames through was reserved in [`RawFwd::new`] large enough
//! for all of them.
//!
//! **Invariant:** frames are conserved — every frame handed to [`RawFwd::new`] is, at any
//! time, on the free list or held by one of the ports (see the tests).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use crate::Error;
use crate::port::{BURST, FrameMem, Rx, Tx};
use crate::sys;

/// Ethernet destination and source addresses written into every frame leaving a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacRewrite {
    /// Destination MAC (the neighbour behind the egress interface).
    pub dst: [u8; 6],
    /// Source MAC (the egress interface's own).
    pub src: [u8; 6],
}

/// Why the forwarder dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdDrop {
    /// Shorter than an Ethernet header (counted on the ingress port).
    Runt,
    /// The egress tx ring was full (counted on the egress port).
    TxRingFull,
}

impl FwdDrop {
    /// Number of reasons, the length of [`PortCounters::drops`].
    pub const COUNT: usize = 2;
    /// All reasons, in [`PortCounters::drops`] order.
    pub const ALL: [FwdDrop; FwdDrop::COUNT] = [FwdDrop::Runt, FwdDrop::TxRingFull];

    /// A stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            FwdDrop::Runt => "runt",
            FwdDrop::TxRingFull => "tx_ring_full",
        }
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received on this port.
    pub rx: u64,
    /// Frames queued for transmission on this port.
    pub tx: u64,
    /// Drops by [`FwdDrop`] reason, indexed by `reason as usize`.
    pub drops: [u64; FwdDrop::COUNT],
}

impl PortCounters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: FwdDrop) -> u64 {
        self.drops.get(reason as usize).copied().unwrap_or(0)
    }

    fn drop(&mut self, reason: FwdDrop, n: u64) {
        if let Some(c) = self.drops.get_mut(reason as usize) {
            *c += n;
        }
    }
}

/// One port as the caller describes it.
#[derive(Debug)]
pub struct PortSpec<R, T> {
    /// A name for diagnostics (the interface).
    pub name: String,
    /// Its receive side.
    pub rx: R,
    /// Its transmit side.
    pub tx: T,
    /// Index of the port its received frames leave by.
    pub egress: usize,
    /// MACs written into frames leaving by this port.
    pub rewrite: MacRewrite,
}

#[derive(Debug)]
struct Port<R, T, F> {
    name: String,
    rx: R,
    tx: T,
    egress: usize,
    rewrite: MacRewrite,
    /// Frames bound for this port's tx ring in the current poll.
    pending: Vec<F>,
    counters: PortCounters,
}

/// What the forwarder does when a poll found nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Keep polling: lowest latency, one core at 100%.
    Spin,
    /// After `after_empty_polls` empty polls in a row, and at least `linger_us` microseconds
    /// since the last work, sleep in `poll(2)` on the rx sockets for at most `timeout_ms`;
    /// frames arriving wake it at once.
    Poll {
        /// Empty polls before sleeping.
        after_empty_polls: u32,
        /// Microseconds without work before sleeping (0: the poll count alone decides). A
        /// frame that arrives while the loop lingers is taken without a wakeup; at rates
        /// whose frames come closer together than this, the worker never sleeps.
        linger_us: u32,
        /// Longest sleep; also how late a stop request may be noticed.
        timeout_ms: i32,
    },
}

/// Whether an idle loop has gone `linger_us` microseconds without work, counting from the
/// first call since the last work (`since`, reset by the caller when work is found). Reads
/// the clock only while idle.
pub(crate) fn lingered(since: &mut Option<std::time::Instant>, linger_us: u32) -> bool {
    if linger_us == 0 {
        return true;
    }
    let start = *since.get_or_insert_with(std::time::Instant::now);
    start.elapsed() >= std::time::Duration::from_micros(u64::from(linger_us))
}

/// What one [`RawFwd::poll_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollWork {
    /// Frames received.
    pub received: usize,
    /// Frames queued on tx rings.
    pub sent: usize,
    /// Frames reclaimed from completion rings.
    pub reclaimed: usize,
}

impl PollWork {
    /// Whether nothing moved.
    pub fn is_empty(&self) -> bool {
        self.received == 0 && self.sent == 0 && self.reclaimed == 0
    }
}

/// The forwarder over one frame memory `M` and ports of receive side `R` and transmit side `T`.
#[derive(Debug)]
pub struct RawFwd<M: FrameMem, R, T> {
    mem: M,
    ports: Vec<Port<R, T, M::Frame>>,
    free: Vec<M::Frame>,
    burst: Vec<M::Frame>,
    frames: usize,
}

/// Writes `rewrite` into the Ethernet header of `frame`; false if there is none.
fn rewrite_macs(frame: &mut [u8], rewrite: &MacRewrite) -> bool {
    let Some(header) = frame.get_mut(..14) else {
        return false;
    };
    let (dst, rest) = header.split_at_mut(6);
    dst.copy_from_slice(&rewrite.dst);
    if let Some(src) = rest.get_mut(..6) {
        src.copy_from_slice(&rewrite.src);
    }
    true
}

impl<M, R, T> RawFwd<M, R, T>
where
    M: FrameMem,
    R: Rx<Frame = M::Frame>,
    T: Tx<Frame = M::Frame>,
{
    /// Builds a forwarder owning `frames` (all of its frame memory, initially free) and
    /// `ports`. Refuses a table whose egress names a port that does not exist.
    pub fn new(mem: M, frames: Vec<M::Frame>, ports: Vec<PortSpec<R, T>>) -> Result<Self, Error> {
        let n = ports.len();
        for (entry, p) in ports.iter().enumerate() {
            if p.egress >= n {
                return Err(Error::Table {
                    entry,
                    reason: "egress port index out of range",
                });
            }
        }
        let count = frames.len();
        let mut free = Vec::with_capacity(count);
        free.extend(frames);
        let ports = ports
            .into_iter()
            .map(|p| Port {
                name: p.name,
                rx: p.rx,
                tx: p.tx,
                egress: p.egress,
                rewrite: p.rewrite,
                // Every port can receive one burst per poll, all bound for the same egress.
                pending: Vec::with_capacity(BURST * n),
                counters: PortCounters::default(),
            })
            .collect();
        Ok(RawFwd {
            mem,
            ports,
            free,
            burst: Vec::with_capacity(BURST),
            frames: count,
        })
    }

    /// One round over all ports (see the module docs).
    pub fn poll_once(&mut self) -> Result<PollWork, Error> {
        let mut work = PollWork::default();
        for p in &mut self.ports {
            work.reclaimed += p.tx.reclaim(&mut self.free)?;
        }
        // Split the free frames evenly among the ports still to be filled, so the first
        // port's fill ring cannot take every frame and starve the others.
        let n = self.ports.len();
        for (k, p) in self.ports.iter_mut().enumerate() {
            let share = self.free.len().div_ceil(n - k);
            p.rx.fill(&mut self.free, share)?;
        }
        for i in 0..self.ports.len() {
            let Some(port) = self.ports.get_mut(i) else {
                continue;
            };
            let got = port.rx.recv(&mut self.burst, BURST)?;
            port.counters.rx += got as u64;
            let egress = port.egress;
            work.received += got;
            for mut frame in self.burst.drain(..) {
                let Some(out) = self.ports.get_mut(egress) else {
                    // Unreachable: `new` checked every egress index.
                    self.free.push(frame);
                    continue;
                };
                let rewrite = out.rewrite;
                if self
                    .mem
                    .with_bytes_mut(&mut frame, |b| rewrite_macs(b, &rewrite))
                {
                    out.pending.push(frame);
                } else {
                    self.free.push(frame);
                    if let Some(port) = self.ports.get_mut(i) {
                        port.counters.drop(FwdDrop::Runt, 1);
                    }
                }
            }
        }
        for p in &mut self.ports {
            if !p.pending.is_empty() {
                let sent = p.tx.send(&mut p.pending)?;
                p.counters.tx += sent as u64;
                work.sent += sent;
                p.counters.drop(FwdDrop::TxRingFull, p.pending.len() as u64);
                self.free.append(&mut p.pending);
            }
            p.tx.flush()?;
        }
        Ok(work)
    }

    /// Polls until `stop` is set, idling as `idle` says. Returns the first I/O error.
    pub fn run(&mut self, stop: &AtomicBool, idle: Idle) -> Result<(), Error> {
        let mut empty = 0u32;
        let mut idle_since = None;
        while !stop.load(Ordering::Relaxed) {
            let work = self.poll_once()?;
            if !work.is_empty() {
                empty = 0;
                idle_since = None;
                continue;
            }
            match idle {
                Idle::Spin => {}
                Idle::Poll {
                    after_empty_polls,
                    linger_us,
                    timeout_ms,
                } => {
                    empty = empty.saturating_add(1);
                    let in_flight = self.ports.iter().any(|p| p.tx.in_flight() > 0);
                    if empty >= after_empty_polls
                        && !in_flight
                        && lingered(&mut idle_since, linger_us)
                    {
                        let fds = self.ports.iter().filter_map(|p| p.rx.fd());
                        sys::poll_readable(fds, timeout_ms)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Counters of port `index` (in the order given to [`RawFwd::new`]).
    pub fn counters(&self, index: usize) -> Option<PortCounters> {
        self.ports.get(index).map(|p| p.counters)
    }

    /// Name and counters of every port.
    pub fn all_counters(&self) -> impl Iterator<Item = (&str, PortCounters)> {
        self.ports.iter().map(|p| (p.name.as_str(), p.counters))
    }

    /// Frames on the free list now.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Frames the forwarder was built with.
    pub fn total_frames(&self) -> usize {
        self.frames
    }

    /// The receive side of port `index` (e.g. for kernel statistics).
    pub fn rx(&self, index: usize) -> Option<&R> {
        self.ports.get(index).map(|p| &p.rx)
    }

    /// Descriptors the forwarder sleeps on when idle (for callers running their own loop).
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.ports.iter().filter_map(|p| p.rx.fd())
    }
}

/// An AF_XDP forwarder between two interfaces of the calling thread's namespace, sharing
/// one UMEM: frames received on `a` leave by `b` with `b_rewrite`, and the other way round.
pub type XskFwd = RawFwd<sys::XskUmem, sys::XskRx, sys::XskTx>;

/// One side of [`open_pair`]: an interface and the MACs frames leaving by it get.
#[derive(Debug, Clone)]
pub struct Side {
    /// Interface name.
    pub interface: String,
    /// Queue id.
    pub queue: u32,
    /// MACs for frames transmitted on this interface.
    pub rewrite: MacRewrite,
}

/// Opens AF_XDP sockets on two interfaces over one new UMEM and returns a forwarder moving
/// frames between them. Must run on the thread that will run the forwarder, in the
/// interfaces' namespace (the socket types are `!Send`).
pub fn open_pair(
    umem: sys::UmemOpts,
    socket: &sys::SocketOpts,
    a: &Side,
    b: &Side,
) -> Result<XskFwd, Error> {
    let (mut mem, frames) = sys::XskUmem::new(umem)?;
    let (a_rx, a_tx) = mem.open(&a.interface, a.queue, socket)?;
    let (b_rx, b_tx) = mem.open(&b.interface, b.queue, socket)?;
    RawFwd::new(
        mem,
        frames,
        vec![
            PortSpec {
                name: a.interface.clone(),
                rx: a_rx,
                tx: a_tx,
                egress: 1,
                rewrite: a.rewrite,
            },
            PortSpec {
                name: b.interface.clone(),
                rx: b_rx,
                tx: b_tx,
                egress: 0,
                rewrite: b.rewrite,
            },
        ],
    )
}

/// Final figures of a forwarder thread: per port, its name, the forwarder's counters and
/// the kernel's counters for its socket.
pub type FwdReport = Vec<(String, PortCounters, sys::KernelStats)>;

/// A forwarder running on its own thread inside a network namespace. Dropping it stops the
/// thread and waits for it, so its sockets, and with them the XDP programs, are gone when
/// the drop returns — before the caller can delete the namespace.
#[derive(Debug)]
pub struct FwdThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<FwdReport, Error>>>,
}

/// How a forwarder thread is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwdConfig {
    /// UMEM sizes.
    pub umem: sys::UmemOpts,
    /// Socket options, the same for both interfaces.
    pub socket: sys::SocketOpts,
    /// What to do when idle.
    pub idle: Idle,
    /// CPU core to pin the thread to; `None` leaves it to the scheduler.
    pub core: Option<usize>,
}

impl Default for FwdConfig {
    fn default() -> Self {
        FwdConfig {
            umem: sys::UmemOpts::default(),
            socket: sys::SocketOpts::default(),
            idle: Idle::Poll {
                after_empty_polls: 1000,
                linger_us: 0,
                timeout_ms: 10,
            },
            core: None,
        }
    }
}

/// Starts [`open_pair`] + [`RawFwd::run`] on a new thread that first pins itself (if asked)
/// and enters the network namespace `netns`. Returns once the sockets are open (or with the
/// error that prevented it).
pub fn spawn_pair(netns: &str, a: Side, b: Side, config: FwdConfig) -> Result<FwdThread, Error> {
    let FwdConfig {
        umem,
        socket,
        idle,
        core,
    } = config;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
    let netns = netns.to_owned();
    let thread_stop = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name(format!("rawfwd-{}-{}", a.interface, b.interface))
        .spawn(move || {
            let opened = core
                .map_or(Ok(()), sys::pin_current_thread)
                .and_then(|()| sys::enter_netns(&netns))
                .and_then(|()| open_pair(umem, &socket, &a, &b));
            let mut fwd = match opened {
                Ok(fwd) => {
                    let _ = ready_tx.send(Ok(()));
                    fwd
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(Vec::new());
                }
            };
            fwd.run(&thread_stop, idle)?;
            let mut report = Vec::new();
            for (i, (name, counters)) in fwd.all_counters().enumerate() {
                let kernel = match fwd.rx(i) {
                    Some(rx) => rx.kernel_stats()?,
                    None => sys::KernelStats::default(),
                };
                report.push((name.to_owned(), counters, kernel));
            }
            Ok(report)
        })
        .map_err(|source| Error::SocketIo {
            syscall: "spawning the forwarder thread",
            interface: String::new(),
            source,
        })?;
    let mut thread = FwdThread {
        stop,
        handle: Some(handle),
    };
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            thread.join();
            Err(e)
        }
        Err(_) => {
            // The thread died before reporting: it panicked while opening.
            thread.join();
            Err(Error::Config(
                "forwarder thread panicked while opening".into(),
            ))
        }
    }
}

impl FwdThread {
    /// Stops the forwarder and returns its final counters.
    pub fn stop(mut self) -> Result<FwdReport, Error> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Config("forwarder thread panicked".into())),
            None => Ok(Vec::new()),
        }
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for FwdThread {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{self, Faults, MemFrames, MemRx, MemTx, Wire};

    const MAC_A: MacRewrite = MacRewrite {
        dst: [0xaa; 6],
        src: [0x0a; 6],
    };
    const MAC_B: MacRewrite = MacRewrite {
        dst: [0xbb; 6],
        src: [0x0b; 6],
    };

    type MemFwd = RawFwd<MemFrames, MemRx, MemTx>;

    #[test]
    fn lingering_counts_from_the_first_idle_poll() {
        let mut since = None;
        // No linger: sleep as soon as the poll count allows, without reading the clock.
        assert!(lingered(&mut since, 0));
        assert!(since.is_none());
        // A second's linger has not passed on the first idle poll, nor on the next.
        assert!(!lingered(&mut since, 1_000_000));
        let first = since.expect("the clock was read");
        assert!(!lingered(&mut since, 1_000_000));
        assert_eq!(since, Some(first), "counted from the first idle poll");
        // A short one has once that much time went by (work resets `since` to None).
        let mut since = None;
        assert!(!lingered(&mut since, 2_000));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(lingered(&mut since, 2_000));
    }

    /// Two simulated interfaces a and b, forwarding a↔b, over `frames` frames.
    fn fwd(frames: usize, fa: Faults, fb: Faults) -> (MemFwd, Wire, Wire) {
        let (a_rx, a_tx, a) = mem::wire(fa);
        let (b_rx, b_tx, b) = mem::wire(fb);
        let f = RawFwd::new(
            MemFrames,
            mem::frames(frames, 2048),
            vec![
                PortSpec {
                    name: "a".into(),
                    rx: a_rx,
                    tx: a_tx,
                    egress: 1,
                    rewrite: MAC_A,
                },
                PortSpec {
                    name: "b".into(),
                    rx: b_rx,
                    tx: b_tx,
                    egress: 0,
                    rewrite: MAC_B,
                },
            ],
        )
        .expect("valid table");
        (f, a, b)
    }

    /// A frame of `len` bytes whose every byte is `tag`.
    fn frame(len: usize, tag: u8) -> Vec<u8> {
        vec![tag; len]
    }

    /// Frames are conserved: all of them are free or held by a simulated kernel.
    fn assert_conserved(f: &MemFwd, a: &Wire, b: &Wire) {
        assert_eq!(
            f.free_frames() + a.frames_in_kernel() + b.frames_in_kernel(),
            f.total_frames()
        );
    }

    #[test]
    fn rewrite_macs_table() {
        fn check(len: usize, expected: Option<Vec<u8>>) {
            let mut buf = vec![0x11; len];
            let ok = rewrite_macs(&mut buf, &MAC_B);
            assert_eq!(ok.then_some(buf), expected, "len {len}");
        }
        check(0, None);
        check(13, None);
        let mut want = [[0xbb; 6], [0x0b; 6]].concat();
        want.extend([0x11; 2]);
        check(14, Some(want.clone()));
        want.extend([0x11; 50]);
        check(64, Some(want));
    }

    #[test]
    fn refuses_an_egress_out_of_range() {
        let (rx, tx, _) = mem::wire(Faults::default());
        let r = RawFwd::new(
            MemFrames,
            mem::frames(4, 2048),
            vec![PortSpec {
                name: "a".into(),
                rx,
                tx,
                egress: 1,
                rewrite: MAC_A,
            }],
        );
        assert!(matches!(r, Err(Error::Table { entry: 0, .. })));
    }

    #[test]
    fn forwards_both_ways_with_macs_rewritten_and_payload_intact() {
        let (mut f, a, b) = fwd(64, Faults::default(), Faults::default());
        f.poll_once().unwrap(); // fill
        a.inject(&frame(60, 1));
        b.inject(&frame(100, 2));
        f.poll_once().unwrap();
        let to_b = b.take_sent();
        let to_a = a.take_sent();
        assert_eq!(to_b.len(), 1);
        assert_eq!(to_a.len(), 1);
        assert_eq!(
            to_b[0].get(..12),
            Some(&[[0xbb; 6], [0x0b; 6]].concat()[..])
        );
        assert_eq!(to_b[0].len(), 60);
        assert!(to_b[0][12..].iter().all(|&x| x == 1));
        assert_eq!(
            to_a[0].get(..12),
            Some(&[[0xaa; 6], [0x0a; 6]].concat()[..])
        );
        assert!(to_a[0][12..].iter().all(|&x| x == 2));
        assert_eq!(f.counters(0).unwrap().rx, 1);
        assert_eq!(f.counters(1).unwrap().tx, 1);
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn runts_are_dropped_and_counted_on_ingress() {
        let (mut f, a, b) = fwd(16, Faults::default(), Faults::default());
        f.poll_once().unwrap();
        a.inject(&frame(10, 1));
        a.inject(&frame(14, 1));
        f.poll_once().unwrap();
        assert_eq!(b.take_sent().len(), 1);
        assert_eq!(f.counters(0).unwrap().dropped(FwdDrop::Runt), 1);
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn full_tx_ring_drops_and_counts_and_returns_frames() {
        let small_tx = Faults {
            tx_size: 3,
            hold_completions: true,
            ..Faults::default()
        };
        let (mut f, a, b) = fwd(64, Faults::default(), small_tx);
        f.poll_once().unwrap();
        for i in 0..10 {
            a.inject(&frame(60, i));
        }
        f.poll_once().unwrap();
        let c = f.counters(1).unwrap();
        assert_eq!(c.tx, 3);
        assert_eq!(c.dropped(FwdDrop::TxRingFull), 7);
        assert_eq!(b.take_sent().len(), 3);
        assert_conserved(&f, &a, &b);
        // Completions released: the frames come back and forwarding resumes.
        b.set_faults(Faults::default());
        f.poll_once().unwrap();
        a.inject(&frame(60, 42));
        f.poll_once().unwrap();
        assert_eq!(b.take_sent().len(), 1);
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn bounded_tx_batches_are_kicked_until_drained() {
        // Copy mode transmits at most 32 frames per wakeup; frames beyond that must not wait
        // for the next received frame.
        let copy_mode = Faults {
            tx_batch: 32,
            ..Faults::default()
        };
        let (mut f, a, b) = fwd(256, Faults::default(), copy_mode);
        f.poll_once().unwrap();
        for i in 0..100 {
            a.inject(&frame(60, i));
        }
        for _ in 0..10 {
            f.poll_once().unwrap();
        }
        let sent = b.take_sent();
        assert_eq!(sent.len(), 100);
        // In order.
        for (i, s) in sent.iter().enumerate() {
            assert_eq!(s[20], i as u8);
        }
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn starved_fill_ring_drops_in_the_kernel_not_here() {
        // With fewer frames than arrive, the simulated kernel drops for lack of buffers, and
        // the forwarder recovers once frames come back. The 4 frames are split 2 / 2
        // between the two fill rings.
        let (mut f, a, b) = fwd(4, Faults::default(), Faults::default());
        f.poll_once().unwrap();
        assert_eq!((a.fill_level(), b.fill_level()), (2, 2));
        for i in 0..10 {
            a.inject(&frame(60, i));
        }
        assert_eq!(a.stats().rx_no_buffer, 8);
        f.poll_once().unwrap();
        assert_eq!(b.take_sent().len(), 2);
        f.poll_once().unwrap();
        a.inject(&frame(60, 99));
        f.poll_once().unwrap();
        assert_eq!(b.take_sent().len(), 1);
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn io_errors_are_returned_and_frames_stay_conserved() {
        let failing = Faults {
            fail_sends: 1,
            ..Faults::default()
        };
        let (mut f, a, b) = fwd(32, Faults::default(), failing);
        f.poll_once().unwrap();
        a.inject(&frame(60, 1));
        assert!(f.poll_once().is_err());
        // The frame that could not be sent is still owned by the forwarder (pending), and
        // the next poll sends it.
        f.poll_once().unwrap();
        assert_eq!(b.take_sent().len(), 1);
        assert_conserved(&f, &a, &b);
    }

    #[test]
    fn set_len_is_clamped_to_the_buffer() {
        fn check(len: usize, expected: usize) {
            let mut f = mem::frames(1, 64).pop().unwrap();
            assert_eq!(MemFrames.set_len(&mut f, len), expected);
            assert_eq!(MemFrames.with_bytes_mut(&mut f, |b| b.len()), expected);
        }
        check(0, 0);
        check(60, 60);
        check(64, 64);
        check(65, 64);
    }

    #[test]
    fn mem_burst_view_matches_frames() {
        let mut fs = mem::frames(3, 64);
        for (i, f) in fs.iter_mut().enumerate() {
            MemFrames.set_len(f, 10 * (i + 1));
        }
        let lens =
            MemFrames.with_burst_mut(&mut fs, |s| s.iter().map(|b| b.len()).collect::<Vec<_>>());
        assert_eq!(lens, vec![10, 20, 30]);
    }

    #[test]
    fn stop_flag_ends_run() {
        let (mut f, _a, _b) = fwd(8, Faults::default(), Faults::default());
        let stop = AtomicBool::new(true);
        f.run(&stop, Idle::Spin).unwrap();
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Inject {
                to_a: bool,
                len: usize,
            },
            Poll,
            Faults {
                on_b: bool,
                tx_size: usize,
                hold: bool,
                batch: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (any::<bool>(), 0usize..200).prop_map(|(to_a, len)| Op::Inject { to_a, len }),
                Just(Op::Poll),
                (any::<bool>(), 0usize..8, any::<bool>(), 1usize..40).prop_map(
                    |(on_b, tx_size, hold, batch)| Op::Faults {
                        on_b,
                        tx_size,
                        hold,
                        batch
                    }
                ),
            ]
        }

        proptest! {
            /// Whatever arrives and whatever faults occur, no frame is lost or duplicated,
            /// and every received frame is either sent or dropped with a reason.
            #[test]
            fn frames_are_conserved_and_accounted(ops in proptest::collection::vec(op(), 0..200)) {
                let (mut f, a, b) = fwd(24, Faults::default(), Faults::default());
                for op in ops {
                    match op {
                        Op::Inject { to_a, len } => {
                            let w = if to_a { &a } else { &b };
                            w.inject(&frame(len, 7));
                        }
                        Op::Poll => { f.poll_once().unwrap(); }
                        Op::Faults { on_b, tx_size, hold, batch } => {
                            let w = if on_b { &b } else { &a };
                            w.set_faults(Faults { tx_size, hold_completions: hold, tx_batch: batch, ..Faults::default() });
                        }
                    }
                    assert_conserved(&f, &a, &b);
                }
                // Release everything and drain.
                a.set_faults(Faults::default());
                b.set_faults(Faults::default());
                for _ in 0..4 { f.poll_once().unwrap(); }
                assert_conserved(&f, &a, &b);
                let (ca, cb) = (f.counters(0).unwrap(), f.counters(1).unwrap());
                prop_assert_eq!(ca.rx, cb.tx + cb.dropped(FwdDrop::TxRingFull) + ca.dropped(FwdDrop::Runt));
                prop_assert_eq!(cb.rx, ca.tx + ca.dropped(FwdDrop::TxRingFull) + cb.dropped(FwdDrop::Runt));
                prop_assert_eq!(a.stats().transmitted, ca.tx);
                prop_assert_eq!(b.stats().transmitted, cb.tx);
            }
        }
    }
}
