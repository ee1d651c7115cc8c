//! The one choke point for the kernel: UMEM, AF_XDP sockets and their four rings, the XDP
//! program's lifetime, `poll`, and entering a network namespace. Everything `unsafe` in the
//! crate lives here; the rest of the crate sees [`XskUmem`], [`XskRx`] and [`XskTx`] through
//! the safe traits of [`crate::port`].
//!
//! # Frame ownership
//!
//! A UMEM is one `mmap`ed region cut into equal frames, shared by the worker and the kernel.
//! Each frame belongs to exactly one side at a time, and moves like this:
//!
//! ```text
//!   worker free list ──fill()──▶ fill ring ──▶ KERNEL writes a received packet
//!          ▲                                          │
//!          │                                      rx ring
//!          │                                          ▼
//!   reclaim() ◀── completion ring ◀── KERNEL ◀── tx ring ◀──send()── worker (recv(): burst,
//!                (frame transmitted)  reads frame                     rewrite, pick egress)
//! ```
//!
//! - On the free list, in a burst or in a pending-tx list: owned by the worker, which may read
//!   and write it through [`XskUmem::with_bytes_mut`](crate::port::FrameMem::with_bytes_mut).
//! - From [`Rx::fill`] until [`Rx::recv`] returns it: owned by the kernel, which writes into it.
//! - From [`Tx::send`] until [`Tx::reclaim`] returns it: owned by the kernel, which reads it.
//!
//! In user space a frame is an [`XskFrame`]: not `Clone`, not `Copy`, created only by
//! [`XskUmem::new`] and by consuming the rx and completion rings, and consumed by the fill and
//! tx rings. So the compiler enforces the user-space half of the hand-off: a frame that was
//! given to the kernel is no longer in the worker's hands. Each frame also carries the id of
//! its UMEM, and every ring refuses a frame of another UMEM, which is what makes the xsk-rs
//! calls (whose contract is "frames of this UMEM, owned by the caller") sound.
//!
//! Every ring of a worker's sockets refers to the same UMEM, so a frame received on one
//! interface can be put on another interface's tx ring as it is: forwarding moves a
//! descriptor, never packet bytes.
//!
//! # Namespaces and XDP programs
//!
//! Interface indexes, and hence the XDP program libxdp attaches when the first socket binds
//! to an interface, are relative to the network namespace of the *calling thread*. So the
//! socket types here are `!Send`: they are created, used and dropped on the thread that
//! entered the namespace ([`enter_netns`]), and their `Drop` cannot detach a program from an
//! interface of the same index in another namespace. libxdp detaches its program when the
//! last socket on an interface goes; an [`XdpGuard`] checks afterwards and detaches the
//! program it recorded if it is somehow still there.
//!
//! The node's uplink is different: it also carries the node's own traffic, so it gets
//! ocelot's own program ([`UplinkProgram`], `bpf/ocelot_xdp.c`), which redirects only frames
//! for local pods and passes everything else to the kernel. Sockets there are opened with
//! [`SocketOpts::load_default_prog`] off and registered in that program's XSKMAP.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::Error;
use crate::port::{BURST, FrameMem, Rx, Tx};

/// Marker that makes a type `!Send` and `!Sync`: its `Drop` depends on the calling thread's
/// network namespace.
type NotSend = PhantomData<*const ()>;

/// Upper bound on tx wakeups per [`Tx::flush`]: enough for two ports' bursts at 32 frames
/// per copy-mode wakeup, with one to spare.
const MAX_KICKS_PER_FLUSH: usize = 2 * BURST / 32 + 1;

/// Hands out a distinct id per UMEM so frames can be checked against the rings they are
/// given to.
static NEXT_UMEM_ID: AtomicU32 = AtomicU32::new(1);

/// Sizes of a UMEM and of its first fill and completion rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemOpts {
    /// Number of frames. Must cover every ring that can hold frames at once.
    pub frames: u32,
    /// Bytes per frame (a power of two, at least 2048); the kernel keeps 256 bytes of it as
    /// XDP headroom.
    pub frame_size: u32,
    /// Fill ring size per (interface, queue), a power of two.
    pub fill_size: u32,
    /// Completion ring size per (interface, queue), a power of two.
    pub comp_size: u32,
}

impl Default for UmemOpts {
    fn default() -> Self {
        // Two ports' fill rings (2 × 2048) plus room for frames in flight on tx rings.
        UmemOpts {
            frames: 8192,
            frame_size: 2048,
            fill_size: 2048,
            comp_size: 2048,
        }
    }
}

/// Where the XDP program that redirects into the socket runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Let the kernel choose (native if the driver has it, veth does).
    Auto,
    /// Generic (SKB) mode: works on any device, after the kernel built an skb.
    Generic,
    /// Native (driver) mode.
    Native,
}

/// How the socket binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// Let the kernel choose: zero-copy where the driver supports it, copy otherwise.
    Auto,
    /// Force copy mode (the only mode veth has).
    Copy,
    /// Force zero-copy; binding fails where the driver lacks it.
    ZeroCopy,
}

/// Options of one AF_XDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOpts {
    /// rx ring size, a power of two.
    pub rx_size: u32,
    /// tx ring size, a power of two.
    pub tx_size: u32,
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// Bind mode.
    pub bind: BindMode,
    /// `XDP_USE_NEED_WAKEUP`: the kernel says when it needs a syscall to make progress,
    /// saving syscalls when it does not. OVS recommends it off for virtual devices.
    pub need_wakeup: bool,
    /// Preferred busy polling (`SO_PREFER_BUSY_POLL` + `SO_BUSY_POLL` +
    /// `SO_BUSY_POLL_BUDGET`): the driver's NAPI runs in the worker's syscalls instead of in
    /// softirq. Helps real NICs; veth in copy mode has no NAPI of its own to poll.
    pub busy_poll: Option<BusyPoll>,
    /// Whether binding the first socket on an interface makes libxdp attach its default
    /// program (which redirects every frame of the queue into the socket). False where
    /// another program owns the interface's XDP hook and directs frames to the socket
    /// through its own XSKMAP: ocelot's [`UplinkProgram`] on the uplink
    /// ([`UplinkProgram::register_socket`]). Then the socket receives nothing until it is
    /// registered.
    pub load_default_prog: bool,
}

/// Busy-poll settings of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL`: microseconds to busy-poll in a blocking call.
    pub timeout_us: u32,
    /// `SO_BUSY_POLL_BUDGET`: packets per busy-poll round.
    pub budget: u32,
}

impl Default for SocketOpts {
    fn default() -> Self {
        SocketOpts {
            rx_size: 2048,
            tx_size: 2048,
            xdp_mode: XdpMode::Auto,
            bind: BindMode::Copy,
            need_wakeup: true,
            busy_poll: None,
            load_default_prog: true,
        }
    }
}

/// One frame of a UMEM, owned by whoever holds this value (see the module docs).
#[derive(Debug)]
pub struct XskFrame {
    desc: FrameDesc,
    umem: u32,
}

impl XskFrame {
    /// The frame's offset in its UMEM (for diagnostics).
    pub fn addr(&self) -> usize {
        self.desc.addr()
    }
}

/// Which socket of a UMEM holds each frame the kernel has (on a fill, rx, tx or completion
/// ring), so the frames of a closed socket can be taken back: the kernel returns a frame only
/// through the rings of the socket it was given to, and a retired pod's socket has none left.
/// Shared by a UMEM and its sockets (one thread: `XskUmem` is not `Send`).
#[derive(Debug)]
struct Ledger {
    frame_size: usize,
    /// By frame index: the socket holding it (0: user space) and its descriptor as given.
    slots: Vec<(u32, FrameDesc)>,
}

impl Ledger {
    fn index(&self, desc: &FrameDesc) -> usize {
        desc.addr() / self.frame_size.max(1)
    }

    fn given(&mut self, socket: u32, descs: &[FrameDesc]) {
        for d in descs {
            let i = self.index(d);
            if let Some(slot) = self.slots.get_mut(i) {
                *slot = (socket, *d);
            }
        }
    }

    fn returned(&mut self, descs: &[FrameDesc]) {
        for d in descs {
            let i = self.index(d);
            if let Some(slot) = self.slots.get_mut(i) {
                slot.0 = 0;
            }
        }
    }
}

/// A UMEM: the frame memory one worker shares with the kernel and with all its sockets.
#[derive(Debug)]
pub struct XskUmem {
    umem: Umem,
    id: u32,
    ledger: Rc<std::cell::RefCell<Ledger>>,
    /// The id of the next socket opened on this UMEM (0 is "user space" in the ledger).
    next_socket: u32,
    opts: UmemOpts,
    /// (ifindex, queue) pairs bound on this UMEM; binding one twice would share its fill and
    /// completion rings, which the port model does not allow.
    bound: Vec<(u32, u32)>,
    /// XDP guards per interface, shared by the ports on it.
    guards: Vec<Rc<XdpGuard>>,
    _not_send: NotSend,
}

fn queue_size(what: &str, size: u32) -> Result<QueueSize, Error> {
    QueueSize::new(size).map_err(|e| Error::Config(format!("{what}: {e}")))
}

impl XskUmem {
    /// Creates a UMEM and returns it with all its frames, which start out owned by the caller.
    pub fn new(opts: UmemOpts) -> Result<(XskUmem, Vec<XskFrame>), Error> {
        let umem_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Umem {
            frames: opts.frames,
            frame_size: opts.frame_size,
            source,
        };
        let frame_size = FrameSize::new(opts.frame_size).map_err(|e| umem_err(Box::new(e)))?;
        let config = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(queue_size("fill ring", opts.fill_size)?)
            .comp_queue_size(queue_size("completion ring", opts.comp_size)?)
            .build()
            .map_err(|e| umem_err(Box::new(e)))?;
        let count = std::num::NonZeroU32::new(opts.frames)
            .ok_or_else(|| Error::Config("a UMEM needs at least one frame".into()))?;
        let (umem, descs) = Umem::new(config, count, false).map_err(|e| umem_err(Box::new(e)))?;
        let id = NEXT_UMEM_ID.fetch_add(1, Ordering::Relaxed);
        let ledger = Ledger {
            frame_size: opts.frame_size as usize,
            slots: vec![(0, FrameDesc::default()); descs.len()],
        };
        let frames = descs
            .into_iter()
            .map(|desc| XskFrame { desc, umem: id })
            .collect();
        let umem = XskUmem {
            umem,
            id,
            ledger: Rc::new(std::cell::RefCell::new(ledger)),
            next_socket: 1,
            opts,
            bound: Vec::new(),
            guards: Vec::new(),
            _not_send: PhantomData,
        };
        Ok((umem, frames))
    }

    /// Closes a socket of this UMEM (its port was retired): the (interface, queue) can be
    /// bound again, and the XDP program is detached when it was the interface's last socket.
    /// Returns the frames that were still in the socket's rings: once the socket is closed
    /// the kernel cannot touch them, so they are the caller's again (`Worker::recover_frames`).
    pub fn release(&mut self, rx: XskRx, tx: XskTx) -> Vec<XskFrame> {
        let bound = rx.bound;
        let socket = rx.socket;
        drop(tx);
        drop(rx);
        self.bound.retain(|b| *b != bound);
        // The UMEM's own reference is the last one once no socket uses the interface.
        self.guards
            .retain(|g| g.ifindex != bound.0 || Rc::strong_count(g) > 1);
        let mut ledger = self.ledger.borrow_mut();
        ledger
            .slots
            .iter_mut()
            .filter(|slot| slot.0 == socket)
            .map(|slot| {
                slot.0 = 0;
                XskFrame {
                    desc: slot.1,
                    umem: self.id,
                }
            })
            .collect()
    }

    /// This UMEM's id, carried by each of its frames.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The options it was created with.
    pub fn opts(&self) -> UmemOpts {
        self.opts
    }

    /// Binds an AF_XDP socket to `queue` of `interface` (in the calling thread's network
    /// namespace) on this UMEM, and returns its receive and transmit sides.
    ///
    /// The first socket on an interface makes libxdp attach its default XDP program, which
    /// redirects the queue's frames into the socket (through an XSKMAP). An XDP program that
    /// is already on the interface and was not attached through this UMEM is another
    /// owner's: it is reported as an error, never replaced.
    ///
    /// With [`SocketOpts::load_default_prog`] off, no program is attached or checked here:
    /// the interface's program (an [`UplinkProgram`]) belongs to someone else in this
    /// process, who registers the socket in its XSKMAP.
    pub fn open(
        &mut self,
        interface: &str,
        queue: u32,
        opts: &SocketOpts,
    ) -> Result<(XskRx, XskTx), Error> {
        let ifindex = ifindex(interface)?;
        if self.bound.contains(&(ifindex, queue)) {
            return Err(Error::AlreadyBound {
                interface: interface.into(),
                queue,
            });
        }
        let xdp_flags = match opts.xdp_mode {
            XdpMode::Auto => XdpFlags::empty(),
            XdpMode::Generic => XdpFlags::XDP_FLAGS_SKB_MODE,
            XdpMode::Native => XdpFlags::XDP_FLAGS_DRV_MODE,
        };
        let guard = match self.guards.iter().find(|g| g.ifindex == ifindex) {
            // The program is the caller's (an `UplinkProgram`): a guard that records no
            // program, so it never detaches anything, and is not shared with sockets that
            // do use libxdp's program.
            _ if !opts.load_default_prog => Rc::new(XdpGuard {
                ifindex,
                interface: interface.into(),
                netns: current_netns()?,
                prog: std::cell::Cell::new(None),
            }),
            Some(guard) => Rc::clone(guard),
            None => {
                // Flags 0 asks for the program in whichever single mode it is attached: a
                // device cannot have native and generic programs at once.
                if let Some(prog) = xdp_prog_id(ifindex, 0, interface)? {
                    return Err(Error::XdpBusy {
                        interface: interface.into(),
                        prog,
                    });
                }
                Rc::new(XdpGuard {
                    ifindex,
                    interface: interface.into(),
                    netns: current_netns()?,
                    prog: std::cell::Cell::new(None),
                })
            }
        };
        let mut bind = BindFlags::empty();
        match opts.bind {
            BindMode::Auto => {}
            BindMode::Copy => bind |= BindFlags::XDP_COPY,
            BindMode::ZeroCopy => bind |= BindFlags::XDP_ZEROCOPY,
        }
        if opts.need_wakeup {
            bind |= BindFlags::XDP_USE_NEED_WAKEUP;
        }
        let config = SocketConfig::builder()
            .rx_queue_size(queue_size("rx ring", opts.rx_size)?)
            .tx_queue_size(queue_size("tx ring", opts.tx_size)?)
            .libxdp_flags(if opts.load_default_prog {
                LibxdpFlags::empty()
            } else {
                LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD
            })
            .xdp_flags(xdp_flags)
            .bind_flags(bind)
            .build();
        let name: Interface = interface.parse().map_err(|e| Error::Socket {
            interface: interface.into(),
            queue,
            source: Box::new(e),
        })?;
        // SAFETY: xsk-rs requires XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD when this (interface,
        // queue) pair is already bound on this UMEM; `self.bound` rules that case out above.
        let (txq, rxq, rings) =
            unsafe { Socket::new(config, &self.umem, &name, queue) }.map_err(|e| {
                Error::Socket {
                    interface: interface.into(),
                    queue,
                    source: Box::new(e),
                }
            })?;
        // A pair not yet bound on this UMEM always gets its own fill and completion rings.
        let (fq, cq) = rings.ok_or_else(|| Error::AlreadyBound {
            interface: interface.into(),
            queue,
        })?;
        if let Some(busy) = opts.busy_poll {
            let fd = rxq.fd().as_raw_fd();
            for (option, name, value) in [
                (SO_PREFER_BUSY_POLL, "setsockopt(SO_PREFER_BUSY_POLL)", 1),
                (
                    libc::SO_BUSY_POLL,
                    "setsockopt(SO_BUSY_POLL)",
                    busy.timeout_us,
                ),
                (
                    SO_BUSY_POLL_BUDGET,
                    "setsockopt(SO_BUSY_POLL_BUDGET)",
                    busy.budget,
                ),
            ] {
                set_socket_option(fd, option, value as libc::c_int).map_err(|source| {
                    Error::SocketIo {
                        syscall: name,
                        interface: interface.into(),
                        source,
                    }
                })?;
            }
        }
        if opts.load_default_prog {
            if guard.prog.get().is_none() {
                guard
                    .prog
                    .set(xdp_prog_id(ifindex, xdp_flags.bits(), interface)?);
            }
            if !self.guards.iter().any(|g| g.ifindex == ifindex) {
                self.guards.push(Rc::clone(&guard));
            }
        }
        self.bound.push((ifindex, queue));
        let socket = self.next_socket;
        self.next_socket = self.next_socket.wrapping_add(1).max(1);
        let rx = XskRx {
            rxq,
            fq,
            socket,
            ledger: Rc::clone(&self.ledger),
            umem: self.id,
            need_wakeup: opts.need_wakeup,
            interface: interface.into(),
            scratch: [FrameDesc::default(); BURST],
            in_kernel: 0,
            bound: (ifindex, queue),
            _guard: Rc::clone(&guard),
        };
        let tx = XskTx {
            txq,
            cq,
            socket,
            ledger: Rc::clone(&self.ledger),
            umem: self.id,
            need_wakeup: opts.need_wakeup,
            in_flight: 0,
            tx_size: opts.tx_size,
            interface: interface.into(),
            scratch: [FrameDesc::default(); BURST],
            _guard: guard,
        };
        Ok((rx, tx))
    }
}

impl FrameMem for XskUmem {
    type Frame = XskFrame;

    fn with_bytes_mut<R>(&self, frame: &mut XskFrame, f: impl FnOnce(&mut [u8]) -> R) -> R {
        // A frame of another UMEM would index this UMEM's memory at a frame someone else may
        // own; that is a bug in the caller, not something a packet can cause.
        assert_eq!(frame.umem, self.id, "frame used with another UMEM");
        // SAFETY: the frame belongs to this UMEM (checked above) and the caller holds the
        // only `XskFrame` for it, which the kernel does not own while it is in user space
        // (module docs), so no other reference to these bytes exists for this borrow.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        f(data.contents_mut())
    }

    fn with_burst_mut<R>(
        &self,
        frames: &mut [XskFrame],
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> R {
        // Two stack arrays: the xsk-rs views (each borrowing its own frame's descriptor, so
        // they are disjoint) and the byte slices borrowed from them.
        let mut views: [Option<xsk_rs::umem::frame::DataMut<'_>>; BURST] =
            std::array::from_fn(|_| None);
        for (view, frame) in views.iter_mut().zip(frames.iter_mut()) {
            assert_eq!(frame.umem, self.id, "frame used with another UMEM");
            // SAFETY: as in `with_bytes_mut`; each frame is a distinct `XskFrame` held only by
            // the caller, so the views do not overlap.
            *view = Some(unsafe { self.umem.data_mut(&mut frame.desc) });
        }
        let mut slices: [&mut [u8]; BURST] = std::array::from_fn(|_| <&mut [u8]>::default());
        let mut n = 0;
        for (slot, view) in slices.iter_mut().zip(views.iter_mut().flatten()) {
            *slot = view.contents_mut();
            n += 1;
        }
        f(slices.get_mut(..n).unwrap_or_default())
    }

    fn len(&self, frame: &XskFrame) -> usize {
        frame.desc.lengths().data()
    }

    fn set_len(&self, frame: &mut XskFrame, len: usize) -> usize {
        assert_eq!(frame.umem, self.id, "frame used with another UMEM");
        // SAFETY: as in `with_bytes_mut`: a frame of this UMEM, held only by the caller.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        // The cursor clamps the position to the frame's data capacity.
        data.cursor().set_pos(len);
        frame.desc.lengths().data()
    }
}

/// Counters the kernel keeps per AF_XDP socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Frames dropped for reasons other than a full ring.
    pub rx_dropped: u64,
    /// Frames dropped because the rx ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty: u64,
    /// Invalid descriptors seen on the rx / fill side.
    pub rx_invalid_descs: u64,
    /// Invalid descriptors seen on the tx ring.
    pub tx_invalid_descs: u64,
    /// Times the kernel found the tx ring empty.
    pub tx_ring_empty: u64,
}

impl KernelStats {
    /// Adds another socket's counters.
    pub fn add(&mut self, other: &KernelStats) {
        self.rx_dropped += other.rx_dropped;
        self.rx_ring_full += other.rx_ring_full;
        self.rx_fill_ring_empty += other.rx_fill_ring_empty;
        self.rx_invalid_descs += other.rx_invalid_descs;
        self.tx_invalid_descs += other.tx_invalid_descs;
        self.tx_ring_empty += other.tx_ring_empty;
    }
}

/// The receive side of one AF_XDP socket: its rx ring and its (interface, queue)'s fill ring.
#[derive(Debug)]
pub struct XskRx {
    rxq: RxQueue,
    fq: FillQueue,
    /// This socket's id in its UMEM's ledger.
    socket: u32,
    ledger: Rc<std::cell::RefCell<Ledger>>,
    umem: u32,
    need_wakeup: bool,
    interface: String,
    scratch: [FrameDesc; BURST],
    /// Frames on the fill ring or the rx ring (given to the kernel, not yet received).
    in_kernel: usize,
    /// The (ifindex, queue) this socket is bound to on its UMEM.
    bound: (u32, u32),
    // Last field: dropped after the socket's queues, so libxdp has detached first.
    _guard: Rc<XdpGuard>,
}

/// What another thread needs to put a socket into an [`UplinkProgram`]'s XSKMAP: the
/// socket's queue, interface index and descriptor number. The descriptor stays valid while
/// the socket's owner keeps it open; the owner unregisters it before closing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketHandle {
    /// The queue it is bound to.
    pub queue: u32,
    /// The interface index it is bound to.
    pub ifindex: u32,
    fd: i32,
}

impl XskRx {
    /// A handle for registering this socket from another thread
    /// ([`UplinkProgram::register_handle`]).
    pub fn handle(&self) -> SocketHandle {
        SocketHandle {
            queue: self.bound.1,
            ifindex: self.bound.0,
            fd: self.rxq.fd().as_raw_fd(),
        }
    }

    /// The interface this socket is bound to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The kernel's counters for this socket.
    pub fn kernel_stats(&self) -> Result<KernelStats, Error> {
        let s = self
            .rxq
            .fd()
            .xdp_statistics()
            .map_err(|source| Error::SocketIo {
                syscall: "getsockopt(XDP_STATISTICS)",
                interface: self.interface.clone(),
                source,
            })?;
        Ok(KernelStats {
            rx_dropped: s.rx_dropped(),
            rx_ring_full: s.rx_ring_full(),
            rx_fill_ring_empty: s.rx_fill_ring_empty_descs(),
            rx_invalid_descs: s.rx_invalid_descs(),
            tx_invalid_descs: s.tx_invalid_descs(),
            tx_ring_empty: s.tx_ring_empty_descs(),
        })
    }
}

/// Checks that every frame of `frames` belongs to UMEM `umem`.
fn check_umem<'a>(frames: impl Iterator<Item = &'a XskFrame>, umem: u32) -> Result<(), Error> {
    for f in frames {
        if f.umem != umem {
            return Err(Error::ForeignFrame {
                frame_umem: f.umem,
                ring_umem: umem,
            });
        }
    }
    Ok(())
}

impl Rx for XskRx {
    type Frame = XskFrame;

    fn fill(&mut self, free: &mut Vec<XskFrame>, max: usize) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let want = free.len().min(max - total).min(BURST) as u32;
            // Reserving is all-or-nothing in libxdp, so ask how much room there is first.
            let n = self.fq.nb_free(want).min(want) as usize;
            if n == 0 {
                break;
            }
            let start = free.len() - n;
            let chunk = free.get(start..).unwrap_or_default();
            check_umem(chunk.iter(), self.umem)?;
            for (slot, f) in self.scratch.iter_mut().zip(chunk) {
                *slot = f.desc;
            }
            // SAFETY: the descriptors are of frames of this socket's UMEM (checked above)
            // that the caller owned; they leave the caller's hands by the truncate below, so
            // no frame is given to the kernel while user space can still reach it.
            let produced = unsafe { self.fq.produce(self.scratch.get(..n).unwrap_or_default()) };
            self.ledger.borrow_mut().given(
                self.socket,
                self.scratch.get(..produced).unwrap_or_default(),
            );
            free.truncate(free.len() - produced);
            total += produced;
            self.in_kernel += produced;
            if produced < n {
                break;
            }
        }
        if total > 0 && self.need_wakeup && self.fq.needs_wakeup() {
            let interface = &self.interface;
            self.fq
                .wakeup(self.rxq.fd_mut(), 0)
                .map_err(|source| Error::SocketIo {
                    syscall: "poll (fill ring wakeup)",
                    interface: interface.clone(),
                    source,
                })?;
        }
        Ok(total)
    }

    fn recv(&mut self, out: &mut Vec<XskFrame>, max: usize) -> Result<usize, Error> {
        let n = max.min(out.capacity() - out.len()).min(BURST);
        let Some(scratch) = self.scratch.get_mut(..n) else {
            return Ok(0);
        };
        // SAFETY: the rx ring of this socket only returns frames of its UMEM; the descriptors
        // consumed are of frames the kernel hands back to user space, wrapped below into
        // `XskFrame`s tagged with this UMEM.
        let got = unsafe { self.rxq.consume(scratch) };
        self.ledger
            .borrow_mut()
            .returned(scratch.get(..got).unwrap_or_default());
        out.extend(scratch.iter().take(got).map(|&desc| XskFrame {
            desc,
            umem: self.umem,
        }));
        self.in_kernel = self.in_kernel.saturating_sub(got);
        Ok(got)
    }

    fn in_kernel(&self) -> usize {
        self.in_kernel
    }

    fn socket_stats(&self) -> Option<KernelStats> {
        self.kernel_stats().ok()
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the descriptor stays open while `self.rxq` holds the socket, and the
        // returned borrow cannot outlive `self`.
        Some(unsafe { BorrowedFd::borrow_raw(self.rxq.fd().as_raw_fd()) })
    }
}

/// The transmit side of one AF_XDP socket: its tx ring and its (interface, queue)'s
/// completion ring.
#[derive(Debug)]
pub struct XskTx {
    txq: TxQueue,
    cq: CompQueue,
    /// This socket's id in its UMEM's ledger.
    socket: u32,
    ledger: Rc<std::cell::RefCell<Ledger>>,
    umem: u32,
    need_wakeup: bool,
    in_flight: usize,
    tx_size: u32,
    interface: String,
    scratch: [FrameDesc; BURST],
    // Last field: dropped after the socket's queues, so libxdp has detached first.
    _guard: Rc<XdpGuard>,
}

impl XskTx {
    /// The interface this socket is bound to.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

impl Tx for XskTx {
    type Frame = XskFrame;

    fn send(&mut self, frames: &mut Vec<XskFrame>) -> Result<usize, Error> {
        // Checked up front: an error after some frames were queued would leave them both in
        // `frames` and on the ring.
        check_umem(frames.iter(), self.umem)?;
        let mut total = 0;
        while total < frames.len() {
            let want = (frames.len() - total).min(BURST) as u32;
            let n = self.txq.nb_free(want).min(want) as usize;
            if n == 0 {
                break;
            }
            let chunk = frames.get(total..total + n).unwrap_or_default();
            for (slot, f) in self.scratch.iter_mut().zip(chunk) {
                *slot = f.desc;
            }
            // SAFETY: frames of this socket's UMEM (checked on entry), owned by the caller; the
            // ones produced are drained from `frames` below, before user space can touch them
            // again.
            let produced = unsafe { self.txq.produce(self.scratch.get(..n).unwrap_or_default()) };
            self.ledger.borrow_mut().given(
                self.socket,
                self.scratch.get(..produced).unwrap_or_default(),
            );
            total += produced;
            if produced < n {
                break;
            }
        }
        frames.drain(..total);
        self.in_flight += total;
        Ok(total)
    }

    fn reclaim(&mut self, free: &mut Vec<XskFrame>) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let n = (free.capacity() - free.len()).min(BURST);
            let Some(scratch) = self.scratch.get_mut(..n) else {
                break;
            };
            // SAFETY: the completion ring of this socket only returns frames of its UMEM
            // that it was given through this socket's tx ring; they are wrapped into
            // `XskFrame`s tagged with this UMEM below.
            let got = unsafe { self.cq.consume(scratch) };
            self.ledger
                .borrow_mut()
                .returned(scratch.get(..got).unwrap_or_default());
            free.extend(scratch.iter().take(got).map(|&desc| XskFrame {
                desc,
                umem: self.umem,
            }));
            total += got;
            if got < n || got == 0 {
                break;
            }
        }
        self.in_flight = self.in_flight.saturating_sub(total);
        Ok(total)
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.in_flight == 0 {
            return Ok(());
        }
        // Copy mode transmits only inside the syscall, at most 32 frames per call
        // (TX_BATCH_SIZE in net/xdp/xsk.c), while a poll can queue a burst of 64 from each
        // port: one kick per poll would let the tx ring fill up. So kick while frames remain
        // on the ring, a bounded number of times (the kernel may be unable to make progress,
        // e.g. when the device queue is full). Without need_wakeup the kernel never asks,
        // but still needs the kick.
        for _ in 0..MAX_KICKS_PER_FLUSH {
            let on_ring = self.tx_size.saturating_sub(self.txq.nb_free_exact());
            if on_ring == 0 || (self.need_wakeup && !self.txq.needs_wakeup()) {
                break;
            }
            self.txq.wakeup().map_err(|source| Error::SocketIo {
                syscall: "sendto (tx wakeup)",
                interface: self.interface.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Makes sure the XDP program libxdp attached to an interface for this process's sockets is
/// gone once they are. libxdp detaches it itself when its last socket is deleted; this is
/// the safety net for an exit path where that did not happen. It only detaches the program
/// id it recorded, and only from the namespace it was created in.
#[derive(Debug)]
pub struct XdpGuard {
    ifindex: u32,
    interface: String,
    netns: u64,
    prog: std::cell::Cell<Option<u32>>,
}

impl Drop for XdpGuard {
    fn drop(&mut self) {
        let Some(prog) = self.prog.get() else {
            return;
        };
        // Interface indexes are per namespace: never act on a same-numbered interface of
        // another one (the types are !Send, so this is a second line of defence).
        if current_netns().ok() != Some(self.netns) {
            return;
        }
        // There is no way to report from a destructor; a program left behind is found by
        // `detach_stale_xsk_prog` at the next start.
        let _ = detach_prog(self.ifindex, prog, &self.interface);
    }
}

/// The name libxdp gives the default program it attaches for AF_XDP sockets.
pub const XSK_DEFAULT_PROG: &str = "xsk_def_prog";

/// An open file descriptor of a BPF program, closed on drop.
struct ProgFd(std::os::fd::OwnedFd);

impl ProgFd {
    fn by_id(prog: u32, interface: &str) -> Result<ProgFd, Error> {
        // SAFETY: a syscall wrapper taking a plain id.
        let fd = unsafe { libxdp_sys::bpf_prog_get_fd_by_id(prog) };
        if fd < 0 {
            return Err(Error::Interface {
                interface: interface.into(),
                what: "opening the XDP program by id",
                source: io::Error::from_raw_os_error(-fd),
            });
        }
        // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
        Ok(ProgFd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn name(&self, interface: &str) -> Result<String, Error> {
        // SAFETY: `bpf_prog_info` is a plain C struct of integers, arrays and u64
        // "pointers"; all zeroes is a valid value (and what the kernel expects on input).
        let mut info: libxdp_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libxdp_sys::bpf_prog_info>() as u32;
        // SAFETY: `info` and `len` are valid for writes and `len` is `info`'s size.
        let rc =
            unsafe { libxdp_sys::bpf_prog_get_info_by_fd(self.0.as_raw_fd(), &mut info, &mut len) };
        if rc < 0 {
            return Err(Error::Interface {
                interface: interface.into(),
                what: "reading the XDP program's info",
                source: io::Error::from_raw_os_error(-rc),
            });
        }
        let bytes: Vec<u8> = info
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Detaches program `prog` from `ifindex` in whichever mode it is attached, and only if it
/// is still that program (checked by id just before the detach; the window between the check
/// and the syscall is the only time another owner's program could be removed). Returns
/// whether it detached anything.
fn detach_prog(ifindex: u32, prog: u32, interface: &str) -> Result<bool, Error> {
    let fd = ProgFd::by_id(prog, interface)?;
    for mode in [XdpFlags::XDP_FLAGS_SKB_MODE, XdpFlags::XDP_FLAGS_DRV_MODE] {
        if xdp_prog_id(ifindex, mode.bits(), interface)? != Some(prog) {
            continue;
        }
        // No options: libbpf's check of an options struct (bytes past the fields it knows
        // must be zero) failed in release builds, where the Rust struct's trailing padding
        // is not guaranteed to be zero, and the program stayed attached. Without
        // `old_prog_fd` the kernel detaches whatever is attached in this mode, which was
        // checked to be `prog` just above; `fd` keeps that program alive meanwhile.
        let _ = &fd;
        // SAFETY: a syscall wrapper taking plain integers; null options are allowed.
        let rc =
            unsafe { libxdp_sys::bpf_xdp_detach(ifindex as i32, mode.bits(), std::ptr::null()) };
        if rc < 0 {
            return Err(Error::Interface {
                interface: interface.into(),
                what: "detaching the XDP program",
                source: io::Error::from_raw_os_error(-rc),
            });
        }
        return Ok(true);
    }
    Ok(false)
}

/// Removes an AF_XDP program left on `interface` (in the calling thread's namespace) by a
/// run that died without cleaning up: libxdp's default program ([`XSK_DEFAULT_PROG`]) or
/// ocelot's uplink program ([`UPLINK_PROG`]) is detached; any other program is someone
/// else's and is reported as [`Error::XdpBusy`], never touched. Returns the id of the
/// program removed, if any.
///
/// Only call it for interfaces this node agent owns (its pod veths and its uplink), before
/// opening sockets or attaching [`UplinkProgram`] on them: another live AF_XDP user of the
/// same interface would lose its program.
pub fn detach_stale_xsk_prog(interface: &str) -> Result<Option<u32>, Error> {
    let ifindex = ifindex(interface)?;
    let Some(prog) = xdp_prog_id(ifindex, 0, interface)? else {
        return Ok(None);
    };
    let name = ProgFd::by_id(prog, interface)?.name(interface)?;
    if name != XSK_DEFAULT_PROG && name != UPLINK_PROG {
        return Err(Error::XdpBusy {
            interface: interface.into(),
            prog,
        });
    }
    Ok(detach_prog(ifindex, prog, interface)?.then_some(prog))
}

/// The id of the XDP program attached to `ifindex` in the mode `flags` selects, if any.
pub fn xdp_prog_id(ifindex: u32, flags: u32, interface: &str) -> Result<Option<u32>, Error> {
    let mut id: u32 = 0;
    // SAFETY: `id` is a valid, writable u32 for the duration of the call.
    let rc = unsafe { libxdp_sys::bpf_xdp_query_id(ifindex as i32, flags as i32, &mut id) };
    if rc < 0 && rc != -libc::ENOENT {
        return Err(Error::Interface {
            interface: interface.into(),
            what: "querying the XDP program",
            source: io::Error::from_raw_os_error(-rc),
        });
    }
    Ok((rc >= 0 && id != 0).then_some(id))
}

/// The index of `interface` in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, Error> {
    let err = |source| Error::Interface {
        interface: interface.into(),
        what: "if_nametoindex",
        source,
    };
    let name =
        CString::new(interface).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(index)
}

/// One address of an interface, as `getifaddrs(3)` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The interface's name.
    pub interface: String,
    /// The address.
    pub addr: std::net::IpAddr,
    /// Its prefix length (from the netmask).
    pub prefix_len: u8,
}

/// Every IPv4 and IPv6 address of the calling thread's network namespace. glibc answers
/// this over netlink, so unlike `ip addr` it spawns no process: the agent's control loop
/// calls it every tick without disturbing the workers' cores.
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, Error> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::Interface {
            interface: "(all)".into(),
            what: "getifaddrs",
            source: io::Error::last_os_error(),
        });
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; its
        // pointers are null or point at data that lives as long as the list. A sockaddr's
        // family says which sockaddr_in/_in6 it is, and it is at least that long.
        let found = unsafe {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            let addr = |sa: *const libc::sockaddr| -> Option<IpAddr> {
                if sa.is_null() {
                    return None;
                }
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*sa.cast::<libc::sockaddr_in>();
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            match (addr(ifa.ifa_addr), ifa.ifa_name.is_null()) {
                (Some(a), false) => Some((
                    std::ffi::CStr::from_ptr(ifa.ifa_name)
                        .to_string_lossy()
                        .into_owned(),
                    a,
                    addr(ifa.ifa_netmask),
                )),
                _ => None,
            }
        };
        if let Some((interface, addr, mask)) = found {
            let prefix_len = match mask {
                Some(IpAddr::V4(m)) => u32::from(m).count_ones() as u8,
                Some(IpAddr::V6(m)) => u128::from(m).count_ones() as u8,
                None if addr.is_ipv4() => 32,
                None => 128,
            };
            out.push(InterfaceAddress {
                interface,
                addr,
                prefix_len,
            });
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Identifies the calling thread's network namespace (the inode of its nsfs file).
pub fn current_netns() -> Result<u64, Error> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|source| Error::Netns {
            name: "(current)".into(),
            syscall: "stat /proc/thread-self/ns/net",
            source,
        })
}

fn setns(file: &File, name: &str) -> Result<(), Error> {
    // SAFETY: `file` is an open namespace file for the duration of the call; setns has no
    // memory-safety preconditions and changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::Netns {
            name: name.into(),
            syscall: "setns",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn open_netns(name: &str) -> Result<File, Error> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::Netns {
            name: name.into(),
            syscall: "validating the name",
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a namespace name"),
        });
    }
    File::open(format!("/var/run/netns/{name}")).map_err(|source| Error::Netns {
        name: name.into(),
        syscall: "open /var/run/netns",
        source,
    })
}

/// Moves the calling thread (only it) into the network namespace `name` (as created by
/// `ip netns add`, under /var/run/netns), for the rest of its life. Sockets it opens from
/// then on, and interface names it resolves, are that namespace's.
pub fn enter_netns(name: &str) -> Result<(), Error> {
    setns(&open_netns(name)?, name)
}

/// Runs `f` on the calling thread inside the network namespace `name`, then moves the thread
/// back, also when `f` panics. Sockets `f` opens stay in `name`.
pub fn in_netns<R>(name: &str, f: impl FnOnce() -> R) -> Result<R, Error> {
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            // Failing to return would leave the thread in a namespace that may soon be
            // deleted; there is no way to report it from a destructor, and the next
            // namespace-relative call on this thread fails loudly instead.
            let _ = setns(&self.0, "(original)");
        }
    }
    let original = File::open("/proc/thread-self/ns/net").map_err(|source| Error::Netns {
        name: name.into(),
        syscall: "open /proc/thread-self/ns/net",
        source,
    })?;
    let target = open_netns(name)?;
    let restore = Restore(original);
    setns(&target, name)?;
    let out = f();
    drop(restore);
    Ok(out)
}

// The asm-generic values (x86, arm, aarch64, riscv); libc does not export these two on
// every target yet.
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;

/// Sets an integer `SOL_SOCKET` option.
fn set_socket_option(fd: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call and its size is passed;
    // an invalid `fd` only makes the call fail.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to CPU `core`. Refuses a core this machine does not have (naming
/// it), so a misconfigured worker fails at start instead of floating.
pub fn pin_current_thread(core: usize) -> Result<(), Error> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let Some(id) = cores.into_iter().find(|c| c.id == core) else {
        return Err(Error::Config(format!("CPU core {core} does not exist")));
    };
    if !core_affinity::set_for_current(id) {
        return Err(Error::Config(format!(
            "cannot pin a thread to CPU core {core}"
        )));
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (`-1`: forever); returns
/// whether any is. Used by an idle worker to sleep until frames arrive instead of spinning.
/// At most 16 descriptors are watched (more than a worker has sockets).
pub fn poll_readable<'a>(
    fds: impl IntoIterator<Item = BorrowedFd<'a>>,
    timeout_ms: i32,
) -> Result<bool, Error> {
    // A worker with more ports than this sleeps on the first ones only; the rest are seen
    // when the timeout ends the sleep.
    const MAX: usize = 256;
    let mut set = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; MAX];
    let mut n = 0;
    for (slot, fd) in set.iter_mut().zip(fds) {
        slot.fd = fd.as_raw_fd();
        slot.events = libc::POLLIN;
        n += 1;
    }
    // SAFETY: `set` is a valid array of at least `n` pollfd entries that outlives the call.
    let rc = unsafe { libc::poll(set.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::SocketIo {
            syscall: "poll",
            interface: "(worker sockets)".into(),
            source: err,
        });
    }
    Ok(rc > 0)
}

// ---------------------------------------------------------------------------------------------
// ocelot's own XDP program for the uplink.

/// The name the kernel knows ocelot's uplink program by (the C function's name, which libbpf
/// gives the program): how [`detach_stale_xsk_prog`] recognises one a crashed run left.
pub const UPLINK_PROG: &str = "ocelot_uplink";

/// `bpf/ocelot_xdp.c`, compiled by build.rs.
static UPLINK_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ocelot_xdp.o"));

/// The XDP action code for "pass to the kernel" (`XDP_PASS`).
pub const XDP_PASS: u32 = 2;
/// The XDP action code for "redirected" (`XDP_REDIRECT`).
pub const XDP_REDIRECT: u32 = 4;

/// `XDP_FLAGS_UPDATE_IF_NOEXIST`: attach only if the hook is empty, atomically.
const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;

/// A transport protocol of a failsafe port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Proto {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl L4Proto {
    fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => 6,
            L4Proto::Udp => 17,
        }
    }
}

/// Which port of a frame a failsafe entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailsafeDir {
    /// The destination port: a service the node itself offers (sshd on 22, BGP on 179).
    In,
    /// The source port: the reply of a server the node talks to as a client (DNS on 53).
    Out,
}

/// One failsafe entry: frames with this port always reach the kernel, even when they are
/// addressed to a local pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FailsafePort {
    /// TCP or UDP.
    pub proto: L4Proto,
    /// Destination (in) or source (out) port.
    pub dir: FailsafeDir,
    /// The port number.
    pub port: u16,
}

impl FailsafePort {
    /// The map key the program looks up: `{proto, dir, port in network order}`.
    fn key(self) -> [u8; 4] {
        let [hi, lo] = self.port.to_be_bytes();
        let dir = match self.dir {
            FailsafeDir::In => 0,
            FailsafeDir::Out => 1,
        };
        [self.proto.number(), dir, hi, lo]
    }
}

/// Calico's default failsafe ports, ranges expanded: inbound tcp 22, udp 68, tcp 179, tcp
/// 2379-2380, tcp 5473, tcp 6443, tcp 6666-6667; outbound udp 53, udp 67 and the same TCP
/// ports. [`UplinkProgram::attach`] installs them.
pub fn default_failsafe() -> Vec<FailsafePort> {
    const TCP: &[(u16, u16)] = &[
        (22, 22),
        (179, 179),
        (2379, 2380),
        (5473, 5473),
        (6443, 6443),
        (6666, 6667),
    ];
    let mut ports = Vec::new();
    for dir in [FailsafeDir::In, FailsafeDir::Out] {
        for &(lo, hi) in TCP {
            ports.extend((lo..=hi).map(|port| FailsafePort {
                proto: L4Proto::Tcp,
                dir,
                port,
            }));
        }
    }
    ports.push(FailsafePort {
        proto: L4Proto::Udp,
        dir: FailsafeDir::In,
        port: 68,
    });
    for port in [53, 67] {
        ports.push(FailsafePort {
            proto: L4Proto::Udp,
            dir: FailsafeDir::Out,
            port,
        });
    }
    ports
}

/// The uplink program's counters, summed over CPUs: what happened to each frame the uplink
/// received while it was attached. Same order as `enum counter` in `bpf/ocelot_xdp.c`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// To a local pod: handed to the AF_XDP socket of the receiving queue.
    pub redirected: u64,
    /// IP, but not to a local pod (the node's own addresses, or unknown): to the kernel.
    pub passed_not_pod: u64,
    /// A failsafe port: to the kernel.
    pub passed_failsafe: u64,
    /// ARP or IPv6 neighbour discovery: to the kernel.
    pub passed_arp_ndp: u64,
    /// Truncated or malformed headers: to the kernel.
    pub passed_unparsed: u64,
    /// Neither IPv4, IPv6 nor ARP (LLDP, a second VLAN tag, …): to the kernel.
    pub passed_other: u64,
    /// To a local pod, but no socket is registered for the receiving queue: to the kernel.
    pub no_socket: u64,
}

impl UplinkCounters {
    const COUNT: u32 = 7;

    fn slot(&mut self, index: u32) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.redirected,
            1 => &mut self.passed_not_pod,
            2 => &mut self.passed_failsafe,
            3 => &mut self.passed_arp_ndp,
            4 => &mut self.passed_unparsed,
            5 => &mut self.passed_other,
            6 => &mut self.no_socket,
            _ => return None,
        })
    }
}

/// Where the program is attached; detached from there on drop.
#[derive(Debug)]
struct UplinkAttachment {
    ifindex: u32,
    interface: String,
    netns: u64,
    prog: u32,
}

/// File descriptors of the program's maps. They belong to the libbpf object and are closed
/// with it.
#[derive(Debug, Clone, Copy)]
struct UplinkMaps {
    xsks: libc::c_int,
    local_pods_v4: libc::c_int,
    local_pods_v6: libc::c_int,
    failsafe: libc::c_int,
    counters: libc::c_int,
}

/// ocelot's XDP program ([`UPLINK_PROG`], `bpf/ocelot_xdp.c`) loaded into the kernel, with
/// its maps, and attached to the node's uplink by [`UplinkProgram::attach`]. It redirects to
/// the AF_XDP socket of the receiving queue only frames addressed to a local pod
/// ([`UplinkProgram::set_local_pod`]) that are not on the failsafe list; everything else
/// (ARP, NDP, the node's own traffic, anything unknown) goes to the kernel.
///
/// Sockets on the uplink are opened with [`SocketOpts::load_default_prog`] off and put into
/// the program's XSKMAP with [`UplinkProgram::register_socket`]. The program is detached on
/// drop (also when the owner unwinds from a panic), from the namespace it was attached in;
/// one a crashed run left behind is removed by [`detach_stale_xsk_prog`]. `!Send`, like the
/// sockets: interface indexes are relative to the calling thread's namespace.
pub struct UplinkProgram {
    obj: std::ptr::NonNull<libxdp_sys::bpf_object>,
    prog_fd: libc::c_int,
    maps: UplinkMaps,
    attached: Option<UplinkAttachment>,
    /// The object file libbpf opened, 8-byte aligned for libelf; kept for the object's
    /// lifetime.
    _image: Vec<u64>,
    _not_send: NotSend,
}

impl std::fmt::Debug for UplinkProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkProgram")
            .field("prog_fd", &self.prog_fd)
            .field("maps", &self.maps)
            .field("attached", &self.attached)
            .finish()
    }
}

/// A negative libbpf return value (`-errno`) as an error about `interface`.
fn bpf_err(interface: &str, what: &'static str, rc: libc::c_int) -> Error {
    Error::Interface {
        interface: interface.into(),
        what,
        source: io::Error::from_raw_os_error(rc.saturating_neg()),
    }
}

impl UplinkProgram {
    /// Loads the program and creates its maps, without attaching it anywhere: enough to fill
    /// maps or [`UplinkProgram::test_run`] it. The maps start empty except `failsafe`, which
    /// holds [`default_failsafe`]. Needs `CAP_BPF` (root).
    pub fn load() -> Result<UplinkProgram, Error> {
        const WHAT: &str = "(ocelot XDP object)";
        let words = UPLINK_OBJECT.len().div_ceil(8);
        let mut image = vec![0u64; words];
        for (word, chunk) in image.iter_mut().zip(UPLINK_OBJECT.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes
                .get_mut(..chunk.len())
                .unwrap_or_default()
                .copy_from_slice(chunk);
            *word = u64::from_ne_bytes(bytes);
        }
        let name = c"ocelot_xdp";
        // SAFETY: all-zero is a valid `bpf_object_open_opts` (null pointers, false, 0):
        // libbpf's "option not set" for every field.
        let mut opts: libxdp_sys::bpf_object_open_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libxdp_sys::bpf_object_open_opts>();
        opts.object_name = name.as_ptr();
        // SAFETY: `image` holds the object's bytes (the length passed) and lives as long as
        // the returned object (it is moved into `UplinkProgram`, whose drop closes the object
        // first); `opts` and `name` outlive the call, which copies the name.
        let obj = unsafe {
            libxdp_sys::bpf_object__open_mem(
                image.as_ptr().cast(),
                UPLINK_OBJECT.len(),
                &raw const opts,
            )
        };
        let Some(obj) = std::ptr::NonNull::new(obj) else {
            return Err(Error::Interface {
                interface: WHAT.into(),
                what: "opening the embedded BPF object",
                source: io::Error::last_os_error(),
            });
        };
        // From here the object is closed by `UplinkProgram::drop`, also on the error paths.
        let mut program = UplinkProgram {
            obj,
            prog_fd: -1,
            maps: UplinkMaps {
                xsks: -1,
                local_pods_v4: -1,
                local_pods_v6: -1,
                failsafe: -1,
                counters: -1,
            },
            attached: None,
            _image: image,
            _not_send: PhantomData,
        };
        // SAFETY: `obj` is an open object that no one else uses.
        let rc = unsafe { libxdp_sys::bpf_object__load(obj.as_ptr()) };
        if rc < 0 {
            return Err(bpf_err(
                WHAT,
                "loading the XDP program (verifier, maps)",
                rc,
            ));
        }
        let prog_name = c"ocelot_uplink";
        // SAFETY: `obj` is a loaded object; the name is NUL-terminated and outlives the call.
        let prog = unsafe {
            libxdp_sys::bpf_object__find_program_by_name(obj.as_ptr(), prog_name.as_ptr())
        };
        if prog.is_null() {
            return Err(bpf_err(
                WHAT,
                "finding the program ocelot_uplink",
                -libc::ENOENT,
            ));
        }
        // SAFETY: `prog` belongs to the loaded object, which is alive.
        program.prog_fd = unsafe { libxdp_sys::bpf_program__fd(prog) };
        if program.prog_fd < 0 {
            return Err(bpf_err(
                WHAT,
                "the program's file descriptor",
                program.prog_fd,
            ));
        }
        let map_fd = |name: &std::ffi::CStr| -> Result<libc::c_int, Error> {
            // SAFETY: `obj` is a loaded object; `name` is NUL-terminated and outlives the
            // call.
            let fd =
                unsafe { libxdp_sys::bpf_object__find_map_fd_by_name(obj.as_ptr(), name.as_ptr()) };
            if fd < 0 {
                return Err(bpf_err(WHAT, "finding a map of the XDP program", fd));
            }
            Ok(fd)
        };
        program.maps = UplinkMaps {
            xsks: map_fd(c"xsks")?,
            local_pods_v4: map_fd(c"local_pods_v4")?,
            local_pods_v6: map_fd(c"local_pods_v6")?,
            failsafe: map_fd(c"failsafe")?,
            counters: map_fd(c"counters")?,
        };
        for port in default_failsafe() {
            program.set_failsafe(port, true)?;
        }
        Ok(program)
    }

    /// Loads the program (as [`UplinkProgram::load`]) and attaches it to `interface` (in the
    /// calling thread's network namespace) in `mode`, with Calico's default failsafe ports,
    /// no local pods and no sockets: until pods and sockets are added, every frame goes to
    /// the kernel.
    ///
    /// An XDP program already on the interface is another owner's (or a crashed run's,
    /// which [`detach_stale_xsk_prog`] removes first): it is reported as
    /// [`Error::XdpBusy`], never replaced. The attachment itself is atomic in that respect
    /// (`XDP_FLAGS_UPDATE_IF_NOEXIST`).
    pub fn attach(interface: &str, mode: XdpMode) -> Result<UplinkProgram, Error> {
        let ifindex = ifindex(interface)?;
        if let Some(prog) = xdp_prog_id(ifindex, 0, interface)? {
            return Err(Error::XdpBusy {
                interface: interface.into(),
                prog,
            });
        }
        let mut program = UplinkProgram::load()?;
        let netns = current_netns()?;
        let prog = prog_id_of_fd(program.prog_fd, interface)?;
        let mode_flags = match mode {
            XdpMode::Auto => XdpFlags::empty(),
            XdpMode::Generic => XdpFlags::XDP_FLAGS_SKB_MODE,
            XdpMode::Native => XdpFlags::XDP_FLAGS_DRV_MODE,
        };
        // SAFETY: a syscall wrapper taking plain integers and no options (null is allowed).
        let rc = unsafe {
            libxdp_sys::bpf_xdp_attach(
                ifindex as libc::c_int,
                program.prog_fd,
                mode_flags.bits() | XDP_FLAGS_UPDATE_IF_NOEXIST,
                std::ptr::null(),
            )
        };
        if rc == -libc::EBUSY || rc == -libc::EEXIST {
            // Someone attached a program between the check above and now.
            return Err(Error::XdpBusy {
                interface: interface.into(),
                prog: xdp_prog_id(ifindex, 0, interface)?.unwrap_or(0),
            });
        }
        if rc < 0 {
            return Err(bpf_err(interface, "attaching ocelot's XDP program", rc));
        }
        program.attached = Some(UplinkAttachment {
            ifindex,
            interface: interface.into(),
            netns,
            prog,
        });
        Ok(program)
    }

    /// The id of the loaded program (`bpftool prog show id …`).
    pub fn prog_id(&self) -> Result<u32, Error> {
        prog_id_of_fd(self.prog_fd, "(ocelot XDP object)")
    }

    /// The interface it is attached to, if any.
    pub fn interface(&self) -> Option<&str> {
        self.attached.as_ref().map(|a| a.interface.as_str())
    }

    fn what(&self) -> &str {
        self.interface().unwrap_or("(ocelot XDP object)")
    }

    /// Puts an AF_XDP socket into the program's XSKMAP under its queue: from now on, frames
    /// for local pods received on that queue go to this socket. Returns the queue. The socket
    /// must be bound to the interface the program is attached to (with
    /// [`SocketOpts::load_default_prog`] off). The kernel drops the entry by itself when the
    /// socket is closed.
    pub fn register_socket(&self, rx: &XskRx) -> Result<u32, Error> {
        let (ifindex, queue) = rx.bound;
        if let Some(a) = &self.attached
            && a.ifindex != ifindex
        {
            return Err(Error::Config(format!(
                "a socket of {} cannot be registered with the XDP program of {}",
                rx.interface, a.interface
            )));
        }
        let fd: u32 = rx.rxq.fd().as_raw_fd() as u32;
        self.update(
            self.maps.xsks,
            &queue.to_ne_bytes(),
            &fd.to_ne_bytes(),
            "registering an AF_XDP socket",
        )?;
        Ok(queue)
    }

    /// As [`UplinkProgram::register_socket`], for a socket another thread owns.
    pub fn register_handle(&self, h: SocketHandle) -> Result<u32, Error> {
        if let Some(a) = &self.attached
            && a.ifindex != h.ifindex
        {
            return Err(Error::Config(format!(
                "a socket of interface {} cannot be registered with the XDP program of {}",
                h.ifindex, a.interface
            )));
        }
        let fd = h.fd as u32;
        self.update(
            self.maps.xsks,
            &h.queue.to_ne_bytes(),
            &fd.to_ne_bytes(),
            "registering an AF_XDP socket",
        )?;
        Ok(h.queue)
    }

    /// Removes the socket of `queue` from the XSKMAP (a missing entry is not an error): its
    /// frames go to the kernel again.
    pub fn unregister_socket(&self, queue: u32) -> Result<(), Error> {
        self.delete(
            self.maps.xsks,
            &queue.to_ne_bytes(),
            "unregistering an AF_XDP socket",
        )
    }

    /// Marks `ip` as a local pod's address (redirected to the dataplane) or not (to the
    /// kernel).
    pub fn set_local_pod(&self, ip: std::net::IpAddr, local: bool) -> Result<(), Error> {
        let (fd, v4, v6);
        let key: &[u8] = match ip {
            std::net::IpAddr::V4(a) => {
                fd = self.maps.local_pods_v4;
                v4 = a.octets();
                &v4
            }
            std::net::IpAddr::V6(a) => {
                fd = self.maps.local_pods_v6;
                v6 = a.octets();
                &v6
            }
        };
        if local {
            self.update(fd, key, &[1], "adding a local pod address")
        } else {
            self.delete(fd, key, "removing a local pod address")
        }
    }

    /// Adds (`on`) or removes a failsafe port.
    pub fn set_failsafe(&self, port: FailsafePort, on: bool) -> Result<(), Error> {
        if on {
            self.update(
                self.maps.failsafe,
                &port.key(),
                &[1],
                "adding a failsafe port",
            )
        } else {
            self.delete(self.maps.failsafe, &port.key(), "removing a failsafe port")
        }
    }

    /// The program's counters, summed over all CPUs.
    pub fn counters(&self) -> Result<UplinkCounters, Error> {
        // SAFETY: a libbpf function without arguments (it reads a sysfs file once).
        let cpus = unsafe { libbpf_sys::libbpf_num_possible_cpus() };
        if cpus <= 0 {
            return Err(bpf_err(self.what(), "counting possible CPUs", cpus));
        }
        // A per-CPU map's lookup from user space writes one 8-byte-aligned value per possible
        // CPU.
        let mut values = vec![0u64; cpus as usize];
        let mut counters = UplinkCounters::default();
        for index in 0..UplinkCounters::COUNT {
            // SAFETY: the key is a u32 (the map's key size); `values` has room for one u64
            // (the map's value size) per possible CPU, which is what the kernel writes.
            let rc = unsafe {
                libxdp_sys::bpf_map_lookup_elem(
                    self.maps.counters,
                    (&raw const index).cast(),
                    values.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                return Err(bpf_err(
                    self.what(),
                    "reading the XDP program's counters",
                    rc,
                ));
            }
            if let Some(slot) = counters.slot(index) {
                *slot = values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v));
            }
        }
        Ok(counters)
    }

    /// Runs the loaded program once over `frame` in the kernel (`BPF_PROG_TEST_RUN`, queue 0)
    /// and returns its XDP action ([`XDP_PASS`], [`XDP_REDIRECT`], …). The counters move as
    /// for a received frame. For tests and diagnostics: nothing is sent or received.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, Error> {
        // SAFETY: all-zero is a valid `bpf_test_run_opts` (no buffers, no context).
        let mut opts: libxdp_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libxdp_sys::bpf_test_run_opts>();
        opts.data_in = frame.as_ptr().cast();
        opts.data_size_in = u32::try_from(frame.len())
            .map_err(|_| Error::Config(format!("a frame of {} bytes", frame.len())))?;
        opts.repeat = 1;
        // SAFETY: `opts` is initialised, its `data_in` points to `frame`'s `data_size_in`
        // bytes (only read), no output buffer is given, and both outlive the call.
        let rc = unsafe { libxdp_sys::bpf_prog_test_run_opts(self.prog_fd, &raw mut opts) };
        if rc < 0 {
            return Err(bpf_err(self.what(), "BPF_PROG_TEST_RUN", rc));
        }
        Ok(opts.retval)
    }

    fn update(
        &self,
        fd: libc::c_int,
        key: &[u8],
        value: &[u8],
        what: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: `key` and `value` are exactly the map's key and value sizes (each caller
        // passes the type the C map declares; the kernel reads that many bytes) and outlive
        // the call.
        let rc = unsafe {
            libxdp_sys::bpf_map_update_elem(fd, key.as_ptr().cast(), value.as_ptr().cast(), 0)
        };
        if rc < 0 {
            return Err(bpf_err(self.what(), what, rc));
        }
        Ok(())
    }

    fn delete(&self, fd: libc::c_int, key: &[u8], what: &'static str) -> Result<(), Error> {
        // SAFETY: `key` is exactly the map's key size and outlives the call.
        let rc = unsafe { libxdp_sys::bpf_map_delete_elem(fd, key.as_ptr().cast()) };
        if rc < 0 && rc != -libc::ENOENT {
            return Err(bpf_err(self.what(), what, rc));
        }
        Ok(())
    }
}

impl Drop for UplinkProgram {
    fn drop(&mut self) {
        if let Some(a) = &self.attached
            // Never act on a same-numbered interface of another namespace (the type is
            // !Send; this is a second line of defence).
            && current_netns().ok() == Some(a.netns)
        {
            // No way to report from a destructor; a program left behind is found by
            // `detach_stale_xsk_prog` at the next start.
            let _ = detach_prog(a.ifindex, a.prog, &a.interface);
        }
        // SAFETY: `obj` was opened by `load` and is closed exactly once, here; the map and
        // program descriptors it owns are not used after this.
        unsafe { libxdp_sys::bpf_object__close(self.obj.as_ptr()) };
    }
}

/// The id of the BPF program behind `fd`.
fn prog_id_of_fd(fd: libc::c_int, interface: &str) -> Result<u32, Error> {
    // SAFETY: `bpf_prog_info` is a plain C struct of integers, arrays and u64 "pointers";
    // all zeroes is a valid value (and what the kernel expects on input).
    let mut info: libxdp_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libxdp_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` and `len` are valid for writes and `len` is `info`'s size.
    let rc = unsafe { libxdp_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    if rc < 0 {
        return Err(bpf_err(interface, "reading the XDP program's info", rc));
    }
    Ok(info.id)
}

// ---------------------------------------------------------------------------------------------
// The prefetch instruction, for the classifier's burst passes.

/// [`classifier::conntrack::Touch`] by the CPU's prefetch instruction (`prefetcht0` on
/// x86_64): the AF_XDP workers' choice for the burst's conntrack slot pass.
///
/// The classifier cannot issue it (no `unsafe` there, and the intrinsic is `unsafe` to
/// call), so its default is a plain load. A load that misses keeps its place in the reorder
/// buffer until its line arrives; a prefetch retires at once, so a whole burst's slot lines
/// are in flight together. On other architectures this falls back to the load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prefetch;

impl classifier::conntrack::Touch for Prefetch {
    #[inline]
    fn touch(word: &std::sync::atomic::AtomicU64) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let line = std::ptr::from_ref(word).cast::<i8>();
            // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has (it is part of the
            // target's baseline). A prefetch is only a hint: it never faults, reads nothing
            // into the program and writes no memory; the address is a live reference anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line) };
            0
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            word.load(std::sync::atomic::Ordering::Relaxed)
        }
    }
}

// Huge pages for the big tables.

/// Allocations at least this large are backed by transparent huge pages when the kernel allows.
pub const HUGE_PAGE_MIN: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;

/// Whether [`HugePageAlloc`] asks for huge pages (on by default; benchmarks turn it off to
/// measure what it is worth).
pub static HUGE_PAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// A global allocator that asks the kernel to back large allocations with transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`), for binaries that hold the classifier's tables.
///
/// The conntrack table (tens of MiB) and the DIR-24-8 route table (up to 64 MiB) are read at
/// random addresses on every packet. With 4 KiB pages almost every such read is also a TLB
/// miss, and in a virtual machine a TLB miss costs a two-dimensional page walk. Where the
/// kernel's THP mode is `madvise` (the common default), only advised ranges get huge pages;
/// the classifier, which does no I/O, cannot ask, so the binary's allocator does.
///
/// Allocations of [`HUGE_PAGE_MIN`] bytes or more (with at most page alignment) get their own
/// anonymous mapping, aligned to 2 MiB and advised before anything touches it, so its pages
/// fault in huge. (Going through `malloc` would not do: it may serve the block from memory it
/// already touched, or zero it with `memset` before the advice.) Which path a block took is
/// decided by its layout alone, so `dealloc` and `realloc` always know. Smaller allocations go
/// to the system allocator unchanged. [`HUGE_PAGES`] turns only the advice off.
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePageAlloc;

impl HugePageAlloc {
    const PAGE: usize = 4096;

    fn is_large(layout: &std::alloc::Layout) -> bool {
        layout.size() >= HUGE_PAGE_MIN && layout.align() <= Self::PAGE
    }

    fn mapped_len(size: usize) -> usize {
        size.next_multiple_of(Self::PAGE)
    }

    /// Maps `size` bytes at a 2 MiB boundary, advised for huge pages; null on failure.
    fn map(size: usize) -> *mut u8 {
        let len = Self::mapped_len(size);
        let Some(over) = len.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it
        // aliases nothing, and the result is checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(HUGE_PAGE);
        let head = start - raw;
        let tail = over - head - len;
        // SAFETY: the head [raw, start) and the tail [start + len, raw + over) are parts of the
        // mapping just made that the caller will never see; unmapping them leaves exactly
        // [start, start + len) mapped.
        unsafe {
            if head > 0 {
                libc::munmap(raw as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        if HUGE_PAGES.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: [start, start + len) is our mapping, untouched so far; MADV_HUGEPAGE
            // only changes how the kernel backs it. A failure (THP off) is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
        start as *mut u8
    }
}

// SAFETY: large blocks are whole private mappings of at least `size` bytes, aligned to 2 MiB
// (so to any alignment up to a page, which `is_large` requires), zero-filled by the kernel,
// and unmapped exactly once by `dealloc`; everything else is forwarded to `System` unchanged.
// A block's path depends only on its layout, which `dealloc`/`realloc` receive unchanged.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::is_large(&layout) {
            return Self::map(layout.size());
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::is_large(&layout) {
            // Fresh anonymous memory is already zero.
            return Self::map(layout.size());
        }
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::is_large(&layout) {
            // SAFETY: `ptr` came from `map` with this layout's size, so it starts a mapping of
            // `mapped_len(size)` bytes that nothing else refers to any more.
            unsafe {
                libc::munmap(ptr as *mut libc::c_void, Self::mapped_len(layout.size()));
            }
            return;
        }
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = std::alloc::Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        if !Self::is_large(&layout) && !Self::is_large(&new_layout) {
            // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract; both layouts
            // belong to `System`.
            return unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_layout` has a non-zero size (the contract forbids 0) and a valid
        // alignment; on success the old block is copied and then freed with its own layout.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// Sends one IPv4 datagram of IP protocol `proto` carrying `payload` to `dst`, through a raw
/// socket in the calling thread's network namespace; the kernel writes the IP header (with
/// the source address its routing picks). `ocelot lab` uses it to craft SCTP INIT chunks on
/// a kernel without SCTP sockets. Needs `CAP_NET_RAW`.
pub fn send_raw_ipv4(proto: u8, dst: std::net::Ipv4Addr, payload: &[u8]) -> Result<(), Error> {
    let err = |what: &'static str| Error::Interface {
        interface: format!("raw IPv4 socket, protocol {proto}"),
        what,
        source: io::Error::last_os_error(),
    };
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(err("socket"));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else; `OwnedFd`
    // closes it exactly once.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `payload` is valid for `payload.len()` bytes and `addr` is a fully initialised
    // sockaddr_in whose size is passed alongside; both outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(err("sendto"));
    }
    Ok(())
}

/// Silences libxdp's and libbpf's messages on stderr ("No bpffs found", "skipping
/// unrecognized data section", …): they describe fallbacks libxdp takes on its own, and every
/// failure still reaches the caller as an error value. Call once, before opening sockets.
pub fn quiet_libxdp() {
    // SAFETY: setting the print callback to none only changes a global function pointer in
    // libxdp; no memory is passed.
    unsafe {
        libxdp_sys::libxdp_set_print(None);
    }
}

/// An eventfd: a counter one thread signals and another sleeps on with `poll` (a worker's
/// doorbell, rung when another worker hands it frames or the control thread has commands).
#[derive(Debug)]
pub struct EventFd {
    fd: std::os::fd::OwnedFd,
}

impl EventFd {
    /// A new, non-blocking eventfd.
    pub fn new() -> Result<EventFd, Error> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::SocketIo {
                syscall: "eventfd",
                interface: "(doorbell)".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by eventfd(2) and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Makes the descriptor readable (wakes a `poll` on it). Never blocks.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call, to our descriptor. A
        // failure can only be EAGAIN (the counter is saturated: already readable), which is
        // what we want anyway.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the counter (after a wakeup). Never blocks.
    pub fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into `value`, which outlives the call; EAGAIN (not
        // signalled) leaves it untouched.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut value).cast(), 8) };
    }

    /// The descriptor, to poll on.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A TAP device: an Ethernet interface of this process's network namespace whose frames
/// the process reads and writes (the agent's path into and out of the node's own stack).
/// The interface exists while the descriptor is open: dropping the `Tap` (or the process
/// dying, even by SIGKILL) removes it, and with it the kernel's routes and neighbour entries
/// through it.
#[derive(Debug)]
pub struct Tap {
    fd: std::os::fd::OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP interface `name` (down; bring it up with `ip link`), non-blocking,
    /// without packet-information headers: reads and writes are whole Ethernet frames.
    pub fn open(name: &str) -> Result<Tap, Error> {
        let fail = |syscall: &'static str, source: io::Error| Error::SocketIo {
            syscall,
            interface: name.to_owned(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(fail(
                "open",
                io::Error::new(io::ErrorKind::InvalidInput, "not an interface name"),
            ));
        }
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string that outlives the call; the result is
        // checked before use.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail("open /dev/net/tun", io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by open(2) and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: `ifreq` is plain old data (a name array and a union of integers, arrays and
        // pointers); all zeroes is a valid value of it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and which outlives
        // the call; the name is NUL-terminated (shorter than IFNAMSIZ, zero-filled).
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        if rc < 0 {
            return Err(fail("ioctl TUNSETIFF", io::Error::last_os_error()));
        }
        Ok(Tap {
            fd,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`: `Ok(None)` when none is waiting. A frame longer than
    /// `buf` is truncated by the kernel (the interface's MTU keeps frames shorter).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`, which is exclusively
        // borrowed for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Hands one frame to the kernel, as if received on the interface. `Ok(false)` when the
    /// kernel would block (its queue is full): the frame is not sent.
    pub fn write(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: write(2) reads `frame.len()` bytes from `frame`, borrowed for the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        }
    }

    /// The descriptor, to poll on.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns which are readable.
/// Interrupted waits count as a timeout.
pub fn poll_fds(fds: &[BorrowedFd<'_>], timeout_ms: i32, readable: &mut Vec<bool>) {
    let mut set: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `set` is a valid array of `set.len()` pollfds that outlives the call; the
    // descriptors are borrowed (open) for its duration.
    let rc = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, timeout_ms) };
    readable.clear();
    readable.extend(set.iter().map(|p| rc > 0 && p.revents != 0));
}

#[cfg(test)]
mod tests {

    /// The AnonHugePages figure of the mapping that contains `addr`, in KiB.
    fn anon_huge_kib(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
            if inside && let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
    }

    #[test]
    fn prefetch_touches_without_changing_anything() {
        use classifier::conntrack::Touch;
        let words: Vec<std::sync::atomic::AtomicU64> =
            (0..1024).map(std::sync::atomic::AtomicU64::new).collect();
        let sum: u64 = words.iter().map(Prefetch::touch).sum();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(sum, 0, "a prefetch returns no value");
        } else {
            assert_eq!(sum, (0..1024).sum::<u64>(), "the fallback loads");
        }
        for (i, w) in words.iter().enumerate() {
            assert_eq!(w.load(std::sync::atomic::Ordering::Relaxed), i as u64);
        }
    }

    #[test]
    fn huge_page_allocator_keeps_contents_across_size_classes() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = HugePageAlloc;
        let small = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: non-zero layouts; every block is freed once with the layout it has.
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            // Small → large (own mapping) → larger → small again.
            let mut len = 1000;
            let mut ptr = p;
            for new_len in [HUGE_PAGE_MIN + 123, 3 * HUGE_PAGE_MIN, 500] {
                let old = Layout::from_size_align(len, 8).unwrap();
                ptr = a.realloc(ptr, old, new_len);
                assert!(!ptr.is_null());
                for i in 0..500 {
                    assert_eq!(*ptr.add(i), i as u8, "byte {i} after realloc to {new_len}");
                }
                len = new_len;
            }
            a.dealloc(ptr, Layout::from_size_align(len, 8).unwrap());
            // Zeroed large blocks are zero.
            let big = Layout::from_size_align(HUGE_PAGE_MIN, 64).unwrap();
            let z = a.alloc_zeroed(big);
            assert!(!z.is_null());
            assert!(
                std::slice::from_raw_parts(z, HUGE_PAGE_MIN)
                    .iter()
                    .all(|b| *b == 0)
            );
            a.dealloc(z, big);
        }
    }

    #[test]
    fn large_allocations_get_huge_pages_when_the_kernel_allows() {
        use std::alloc::{GlobalAlloc, Layout};
        let len = 16 << 20;
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero layout; the block is freed below with the same layout.
        let ptr = unsafe { HugePageAlloc.alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` points to `len` writable bytes we own.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        for page in bytes.chunks_mut(4096) {
            page[0] = 1;
        }
        assert!(bytes.iter().step_by(4096).all(|b| *b == 1));
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let huge = anon_huge_kib(ptr as usize + len / 2);
        // SAFETY: allocated above with this layout.
        unsafe { HugePageAlloc.dealloc(ptr, layout) };
        if mode.contains("[never]") || mode.is_empty() {
            return; // THP is off on this machine: nothing to check beyond correctness.
        }
        assert!(
            huge.unwrap_or(0) > 0,
            "no huge pages in a 16 MiB advised block (THP mode {mode:?})"
        );
    }
    use super::*;

    // ocelot's uplink program, run by the kernel over crafted frames (BPF_PROG_TEST_RUN):
    // loaded, never attached. Needs CAP_BPF (root), as the UMEM tests do.

    const POD4: [u8; 4] = [10, 71, 0, 5];
    const NODE4: [u8; 4] = [10, 70, 0, 2];
    const PEER4: [u8; 4] = [10, 70, 0, 1];
    const POD6: [u8; 16] = [0xfd, 0, 0, 0x71, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    const PEER6: [u8; 16] = [0xfd, 0, 0, 0x70, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// TCP (20 bytes) or UDP (8 bytes) header with the two ports, padded with zeroes.
    fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.resize(if proto == 6 { 20 } else { 8 }, 0);
        h
    }

    /// Ethernet + IPv4 (with `options` extra 4-byte words and the raw frag_off field) +
    /// `payload`.
    fn ipv4(dst: [u8; 4], proto: u8, options: u8, frag_off: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(0x0800);
        let total = (20 + 4 * options as usize + payload.len()) as u16;
        f.push(0x45 + options);
        f.push(0);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag_off.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&PEER4);
        f.extend_from_slice(&dst);
        f.extend(std::iter::repeat_n(1u8, 4 * options as usize)); // NOP options
        f.extend_from_slice(payload);
        f
    }

    /// Ethernet + IPv6 (next header `nh`) + `payload`.
    fn ipv6(dst: [u8; 16], nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(0x86dd);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[nh, 64]);
        f.extend_from_slice(&PEER6);
        f.extend_from_slice(&dst);
        f.extend_from_slice(payload);
        f
    }

    #[derive(Debug, Clone, Copy)]
    enum Went {
        NotPod,
        Failsafe,
        ArpNdp,
        Unparsed,
        Other,
        NoSocket,
    }

    /// Runs `frame` through the program and checks the action is XDP_PASS and exactly the
    /// counter `went` moved, by one.
    fn check(prog: &UplinkProgram, name: &str, frame: &[u8], went: Went) {
        let before = prog.counters().unwrap();
        let action = prog.test_run(frame).unwrap();
        let after = prog.counters().unwrap();
        assert_eq!(action, XDP_PASS, "{name}");
        let mut expected = before;
        let slot = match went {
            Went::NotPod => &mut expected.passed_not_pod,
            Went::Failsafe => &mut expected.passed_failsafe,
            Went::ArpNdp => &mut expected.passed_arp_ndp,
            Went::Unparsed => &mut expected.passed_unparsed,
            Went::Other => &mut expected.passed_other,
            Went::NoSocket => &mut expected.no_socket,
        };
        *slot += 1;
        assert_eq!(after, expected, "{name}: expected {went:?}");
    }

    #[test]
    fn uplink_program_passes_all_but_local_pod_traffic() {
        let prog = UplinkProgram::load().unwrap();
        assert_eq!(prog.counters().unwrap(), UplinkCounters::default());
        prog.set_local_pod(std::net::Ipv4Addr::from(POD4).into(), true)
            .unwrap();
        prog.set_local_pod(std::net::Ipv6Addr::from(POD6).into(), true)
            .unwrap();
        let udp = |s, d| l4(17, s, d);
        let tcp = |s, d| l4(6, s, d);
        // A local pod's frame with no socket on queue 0 (test runs have none) is passed and
        // counted as `no_socket`: the only thing the program would have redirected.
        let table: Vec<(&str, Vec<u8>, Went)> = vec![
            (
                "udp to a pod",
                ipv4(POD4, 17, 0, 0, &udp(40000, 9999)),
                Went::NoSocket,
            ),
            (
                "udp to the node",
                ipv4(NODE4, 17, 0, 0, &udp(40000, 9999)),
                Went::NotPod,
            ),
            (
                "icmp to the node",
                ipv4(NODE4, 1, 0, 0, &[8, 0, 0, 0, 0, 0, 0, 0]),
                Went::NotPod,
            ),
            (
                "arp",
                {
                    let mut f = eth(0x0806);
                    f.resize(42, 0);
                    f
                },
                Went::ArpNdp,
            ),
            (
                "lldp",
                {
                    let mut f = eth(0x88cc);
                    f.resize(60, 0);
                    f
                },
                Went::Other,
            ),
            // A local pod is the dataplane's on every port, failsafe ones included.
            (
                "ssh to a pod",
                ipv4(POD4, 6, 0, 0, &tcp(40000, 22)),
                Went::NoSocket,
            ),
            (
                "ssh to the node",
                ipv4(NODE4, 6, 0, 0, &tcp(40000, 22)),
                Went::Failsafe,
            ),
            (
                "api server reply",
                ipv4(NODE4, 6, 0, 0, &tcp(6443, 40000)),
                Went::Failsafe,
            ),
            (
                "etcd 2380 in",
                ipv4(NODE4, 6, 0, 0, &tcp(40000, 2380)),
                Went::Failsafe,
            ),
            (
                "dhcp client in",
                ipv4(NODE4, 17, 0, 0, &udp(67, 68)),
                Went::Failsafe,
            ),
            (
                "dns reply",
                ipv4(NODE4, 17, 0, 0, &udp(53, 40000)),
                Went::Failsafe,
            ),
            // udp 53 is failsafe outbound only: a query *to* the node's port 53 is not.
            (
                "dns query to the node",
                ipv4(NODE4, 17, 0, 0, &udp(40000, 53)),
                Went::NotPod,
            ),
            // tcp 22 is failsafe, udp 22 is not.
            (
                "udp 22 to the node",
                ipv4(NODE4, 17, 0, 0, &udp(40000, 22)),
                Went::NotPod,
            ),
            (
                "ssh with ip options",
                ipv4(NODE4, 6, 2, 0, &tcp(40000, 22)),
                Went::Failsafe,
            ),
            // A later fragment has no ports: bytes that look like port 22 are payload.
            (
                "later fragment",
                ipv4(NODE4, 6, 0, 185, &tcp(40000, 22)),
                Went::NotPod,
            ),
            (
                "first fragment",
                ipv4(NODE4, 6, 0, 0x2000, &tcp(40000, 22)),
                Went::Failsafe,
            ),
            (
                "vlan udp to a pod",
                {
                    let mut f = eth(0x8100);
                    f.extend_from_slice(&[0, 42, 0x08, 0x00]);
                    f.extend_from_slice(ipv4(POD4, 17, 0, 0, &udp(1, 2)).get(14..).unwrap());
                    f
                },
                Went::NoSocket,
            ),
            (
                "truncated ipv4",
                {
                    let mut f = eth(0x0800);
                    f.extend_from_slice(&[0x45; 10]);
                    f
                },
                Went::Unparsed,
            ),
            (
                "ihl below 5",
                {
                    let mut f = ipv4(POD4, 17, 0, 0, &udp(1, 2));
                    f[14] = 0x44;
                    f
                },
                Went::Unparsed,
            ),
            (
                "truncated tcp",
                ipv4(POD4, 6, 0, 0, &[0, 1, 0, 22]),
                Went::NoSocket,
            ),
            (
                "truncated vlan",
                {
                    let mut f = eth(0x8100);
                    f.extend_from_slice(&[0, 1]);
                    f
                },
                Went::Unparsed,
            ),
            (
                "udp6 to a pod",
                ipv6(POD6, 17, &udp(40000, 9999)),
                Went::NoSocket,
            ),
            (
                "udp6 elsewhere",
                ipv6(PEER6, 17, &udp(40000, 9999)),
                Went::NotPod,
            ),
            (
                "neighbour solicitation",
                ipv6(POD6, 58, &[135, 0, 0, 0, 0, 0, 0, 0]),
                Went::ArpNdp,
            ),
            (
                "echo6 to a pod",
                ipv6(POD6, 58, &[128, 0, 0, 0, 0, 0, 0, 0]),
                Went::NoSocket,
            ),
            (
                "ssh6 after hop-by-hop",
                ipv6(
                    PEER6,
                    0,
                    &[[6, 0, 1, 4, 0, 0, 0, 0].as_slice(), &tcp(40000, 22)].concat(),
                ),
                Went::Failsafe,
            ),
            (
                "udp6 later fragment",
                ipv6(
                    POD6,
                    44,
                    &[[17, 0, 0, 8, 0, 0, 0, 1].as_slice(), &udp(40000, 68)].concat(),
                ),
                Went::NoSocket,
            ),
            (
                "truncated ipv6",
                {
                    let mut f = eth(0x86dd);
                    f.extend_from_slice(&[0x60; 30]);
                    f
                },
                Went::Unparsed,
            ),
        ];
        for (name, frame, went) in &table {
            check(&prog, name, frame, *went);
        }

        // The lists are live: a port taken off the failsafe list, an address no longer a pod.
        let ssh = FailsafePort {
            proto: L4Proto::Tcp,
            dir: FailsafeDir::In,
            port: 22,
        };
        prog.set_failsafe(ssh, false).unwrap();
        check(
            &prog,
            "ssh, not failsafe",
            &ipv4(NODE4, 6, 0, 0, &tcp(40000, 22)),
            Went::NotPod,
        );
        prog.set_failsafe(ssh, true).unwrap();
        check(
            &prog,
            "ssh, failsafe again",
            &ipv4(NODE4, 6, 0, 0, &tcp(40000, 22)),
            Went::Failsafe,
        );
        prog.set_local_pod(std::net::Ipv4Addr::from(POD4).into(), false)
            .unwrap();
        check(
            &prog,
            "pod removed",
            &ipv4(POD4, 17, 0, 0, &udp(40000, 9999)),
            Went::NotPod,
        );
        // Removing what is not there is not an error.
        prog.set_local_pod(std::net::Ipv4Addr::from(POD4).into(), false)
            .unwrap();
    }

    #[test]
    fn default_failsafe_list_has_calicos_ports() {
        let list = default_failsafe();
        let has = |proto, dir, port| list.contains(&FailsafePort { proto, dir, port });
        use FailsafeDir::{In, Out};
        use L4Proto::{Tcp, Udp};
        for port in [22, 179, 2379, 2380, 5473, 6443, 6666, 6667] {
            assert!(has(Tcp, In, port) && has(Tcp, Out, port), "tcp {port}");
        }
        assert!(has(Udp, In, 68) && has(Udp, Out, 53) && has(Udp, Out, 67));
        assert!(!has(Udp, In, 53) && !has(Tcp, In, 2381) && !has(Udp, In, 22));
        assert_eq!(list.len(), 2 * 8 + 3);
    }

    #[test]
    fn netns_names_that_could_escape_the_directory_are_refused() {
        fn check(name: &str, refused_before_open: bool) {
            match open_netns(name) {
                Err(Error::Netns { syscall, .. }) => assert_eq!(
                    syscall == "validating the name",
                    refused_before_open,
                    "{name:?}: {syscall}"
                ),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        check("", true);
        check(".", true);
        check("..", true);
        check("../../proc/1/ns/net", true);
        check("a/b", true);
        check("ocl-no-such-namespace-for-sure", false);
    }

    #[test]
    fn pinning_to_a_core_that_does_not_exist_is_refused() {
        let err = pin_current_thread(usize::MAX).unwrap_err().to_string();
        assert!(err.contains(&usize::MAX.to_string()), "{err}");
    }

    #[test]
    fn in_netns_returns_to_the_original_namespace() {
        // A namespace that does not exist: refused before switching, the thread stays put.
        let before = current_netns().unwrap();
        assert!(in_netns("ocl-no-such-namespace-for-sure", || ()).is_err());
        assert_eq!(current_netns().unwrap(), before);
    }

    // UMEM tests below need CAP_NET_RAW (root), as the whole dataplane does; CI runs as root.

    #[test]
    fn umem_hands_out_all_frames_with_distinct_addresses() {
        let opts = UmemOpts {
            frames: 64,
            ..UmemOpts::default()
        };
        let (umem, frames) = XskUmem::new(opts).unwrap();
        assert_eq!(frames.len(), 64);
        let mut addrs: Vec<usize> = frames.iter().map(XskFrame::addr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(addrs.len(), 64);
        assert!(frames.iter().all(|f| f.umem == umem.id()));
        let (other, _) = XskUmem::new(opts).unwrap();
        assert_ne!(umem.id(), other.id());
    }

    #[test]
    fn frame_bytes_round_trip_and_length_is_clamped() {
        let (umem, mut frames) = XskUmem::new(UmemOpts {
            frames: 4,
            ..UmemOpts::default()
        })
        .unwrap();
        let (a, rest) = frames.split_first_mut().unwrap();
        let b = rest.first_mut().unwrap();
        assert_eq!(umem.set_len(a, 60), 60);
        assert_eq!(umem.set_len(b, 60), 60);
        umem.with_bytes_mut(a, |bytes| bytes.fill(0xaa));
        umem.with_bytes_mut(b, |bytes| bytes.fill(0xbb));
        assert!(umem.with_bytes_mut(a, |bytes| bytes.iter().all(|&x| x == 0xaa)));
        assert_eq!(umem.len(a), 60);
        // 2048-byte frames minus the kernel's 256 bytes of XDP headroom.
        assert_eq!(umem.set_len(a, 100_000), 2048 - 256);
    }

    #[test]
    fn burst_view_gives_one_disjoint_slice_per_frame() {
        let (umem, mut frames) = XskUmem::new(UmemOpts {
            frames: 80,
            ..UmemOpts::default()
        })
        .unwrap();
        for (i, f) in frames.iter_mut().enumerate() {
            umem.set_len(f, 60 + i);
        }
        let seen = umem.with_burst_mut(&mut frames, |slices| {
            for (i, s) in slices.iter_mut().enumerate() {
                s.fill(i as u8);
            }
            slices.iter().map(|s| s.len()).collect::<Vec<_>>()
        });
        // At most one burst, lengths in frame order.
        assert_eq!(seen, (0..BURST).map(|i| 60 + i).collect::<Vec<_>>());
        for (i, f) in frames.iter_mut().take(BURST).enumerate() {
            assert!(umem.with_bytes_mut(f, |b| b.iter().all(|&x| x == i as u8)));
        }
    }

    #[test]
    #[should_panic(expected = "another UMEM")]
    fn a_frame_of_another_umem_is_refused() {
        let opts = UmemOpts {
            frames: 4,
            ..UmemOpts::default()
        };
        let (umem, _) = XskUmem::new(opts).unwrap();
        let (_other, mut frames) = XskUmem::new(opts).unwrap();
        umem.with_bytes_mut(&mut frames[0], |_| ());
    }

    #[test]
    fn bad_sizes_are_refused_with_the_value() {
        fn check(opts: UmemOpts, needle: &str) {
            let err = XskUmem::new(opts).unwrap_err();
            let text = format!("{err} {:?}", std::error::Error::source(&err));
            assert!(text.contains(needle), "{text}");
        }
        let ok = UmemOpts::default();
        check(UmemOpts { frames: 0, ..ok }, "at least one frame");
        check(
            UmemOpts {
                fill_size: 1000,
                ..ok
            },
            "1000",
        );
        check(
            UmemOpts {
                frame_size: 1024,
                ..ok
            },
            "1024",
        );
        check(
            UmemOpts {
                frame_size: 3000,
                ..ok
            },
            "3000",
        );
    }
}
