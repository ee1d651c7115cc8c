//! In-memory ports: the [`crate::port`] traits without a kernel, for tests of forwarding
//! loops, with fault injection (a small or full tx ring, a starved fill ring, late
//! completions, bounded transmit batches, failing syscalls).
//!
//! [`wire`] returns the loop's side ([`MemRx`], [`MemTx`]) and the test's side ([`Wire`]) of
//! one simulated interface: the test injects frames that "arrive" and collects the frames
//! that were "transmitted". The simulation follows AF_XDP's rules: a frame arrives only
//! into a buffer given on the fill ring (otherwise it is dropped and counted, as the kernel
//! does), the tx ring has a size, transmission happens when the loop flushes, and a
//! transmitted buffer comes back only through the completion ring.
//!
//! Test code: allocates freely and is single-threaded (`Rc<RefCell<_>>` shares the state
//! between the two sides).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use crate::Error;
use crate::port::{BURST, FrameMem, Rx, Tx};

/// One in-memory frame buffer; owning it is owning the buffer (it is never cloned).
#[derive(Debug)]
pub struct MemFrame {
    buf: Box<[u8]>,
    len: usize,
}

/// Creates `count` frames of `size` bytes, the in-memory stand-in for a UMEM's frames.
pub fn frames(count: usize, size: usize) -> Vec<MemFrame> {
    (0..count)
        .map(|_| MemFrame {
            buf: vec![0; size].into_boxed_slice(),
            len: 0,
        })
        .collect()
}

/// The [`FrameMem`] of in-memory frames: each frame carries its own buffer.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemFrames;

impl FrameMem for MemFrames {
    type Frame = MemFrame;

    fn with_bytes_mut<R>(&self, frame: &mut MemFrame, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let len = frame.len.min(frame.buf.len());
        f(frame.buf.get_mut(..len).unwrap_or_default())
    }

    fn with_burst_mut<R>(
        &self,
        frames: &mut [MemFrame],
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> R {
        let mut slices: [&mut [u8]; BURST] = std::array::from_fn(|_| <&mut [u8]>::default());
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(frames.iter_mut()) {
            let len = frame.len.min(frame.buf.len());
            *slot = frame.buf.get_mut(..len).unwrap_or_default();
            n += 1;
        }
        f(slices.get_mut(..n).unwrap_or_default())
    }

    fn len(&self, frame: &MemFrame) -> usize {
        frame.len
    }

    fn set_len(&self, frame: &mut MemFrame, len: usize) -> usize {
        frame.len = len.min(frame.buf.len());
        frame.len
    }
}

/// Faults and limits of one simulated interface. The default behaves like a roomy, healthy
/// AF_XDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Fill ring size.
    pub fill_size: usize,
    /// tx ring size.
    pub tx_size: usize,
    /// Frames transmitted per flush (copy mode transmits at most 32 per syscall).
    pub tx_batch: usize,
    /// While true, transmitted frames are not put on the completion ring yet.
    pub hold_completions: bool,
    /// The next this-many `send` calls fail.
    pub fail_sends: usize,
    /// The next this-many `recv` calls fail.
    pub fail_recvs: usize,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fill_size: 1024,
            tx_size: 1024,
            tx_batch: usize::MAX,
            hold_completions: false,
            fail_sends: 0,
            fail_recvs: 0,
        }
    }
}

/// What happened on a simulated interface, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames that arrived while the fill ring was empty, dropped (kernel: fill ring empty).
    pub rx_no_buffer: u64,
    /// Frames transmitted.
    pub transmitted: u64,
    /// Flush calls.
    pub flushes: u64,
}

#[derive(Debug)]
struct State {
    faults: Faults,
    arriving: VecDeque<Vec<u8>>,
    fill: VecDeque<MemFrame>,
    received: VecDeque<MemFrame>,
    tx_ring: VecDeque<MemFrame>,
    completed: VecDeque<MemFrame>,
    held: VecDeque<MemFrame>,
    sent: Vec<Vec<u8>>,
    stats: WireStats,
}

impl State {
    /// Delivers arriving frames into fill-ring buffers, as the kernel does on receive.
    fn deliver(&mut self) {
        while let Some(pkt) = self.arriving.pop_front() {
            match self.fill.pop_front() {
                Some(mut frame) => {
                    let n = pkt.len().min(frame.buf.len());
                    if let (Some(dst), Some(src)) = (frame.buf.get_mut(..n), pkt.get(..n)) {
                        dst.copy_from_slice(src);
                    }
                    frame.len = n;
                    self.received.push_back(frame);
                }
                None => self.stats.rx_no_buffer += 1,
            }
        }
    }
}

/// The receive side of a simulated interface.
#[derive(Debug)]
pub struct MemRx(Rc<RefCell<State>>);

/// The transmit side of a simulated interface.
#[derive(Debug)]
pub struct MemTx(Rc<RefCell<State>>);

/// The test's handle on a simulated interface.
#[derive(Debug, Clone)]
pub struct Wire(Rc<RefCell<State>>);

/// Creates one simulated interface.
pub fn wire(faults: Faults) -> (MemRx, MemTx, Wire) {
    let state = Rc::new(RefCell::new(State {
        faults,
        arriving: VecDeque::new(),
        fill: VecDeque::new(),
        received: VecDeque::new(),
        tx_ring: VecDeque::new(),
        completed: VecDeque::new(),
        held: VecDeque::new(),
        sent: Vec::new(),
        stats: WireStats::default(),
    }));
    (
        MemRx(Rc::clone(&state)),
        MemTx(Rc::clone(&state)),
        Wire(state),
    )
}

impl Wire {
    /// A frame arrives on the interface; it lands in a fill-ring buffer if one is there.
    pub fn inject(&self, frame: &[u8]) {
        let mut s = self.0.borrow_mut();
        s.arriving.push_back(frame.to_vec());
        s.deliver();
    }

    /// Takes the frames transmitted so far, in order.
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.0.borrow_mut().sent)
    }

    /// The interface's counters.
    pub fn stats(&self) -> WireStats {
        self.0.borrow().stats
    }

    /// Changes the faults; releasing held completions puts them on the completion ring.
    pub fn set_faults(&self, faults: Faults) {
        let mut s = self.0.borrow_mut();
        s.faults = faults;
        if !faults.hold_completions {
            let held = std::mem::take(&mut s.held);
            s.completed.extend(held);
        }
    }

    /// The current faults.
    pub fn faults(&self) -> Faults {
        self.0.borrow().faults
    }

    /// Buffers currently on the fill ring.
    pub fn fill_level(&self) -> usize {
        self.0.borrow().fill.len()
    }

    /// Frames the simulated kernel holds in any ring (fill, rx, tx, completion, held).
    pub fn frames_in_kernel(&self) -> usize {
        let s = self.0.borrow();
        s.fill.len() + s.received.len() + s.tx_ring.len() + s.completed.len() + s.held.len()
    }
}

fn injected(what: &str) -> Error {
    Error::SocketIo {
        syscall: "injected fault",
        interface: what.into(),
        source: std::io::Error::other("fault injected by the test"),
    }
}

impl Rx for MemRx {
    type Frame = MemFrame;

    fn fill(&mut self, free: &mut Vec<MemFrame>, max: usize) -> Result<usize, Error> {
        let mut s = self.0.borrow_mut();
        let room = s.faults.fill_size.saturating_sub(s.fill.len());
        let n = room.min(free.len()).min(max);
        for frame in free.drain(free.len() - n..) {
            s.fill.push_back(frame);
        }
        s.deliver();
        Ok(n)
    }

    fn recv(&mut self, out: &mut Vec<MemFrame>, max: usize) -> Result<usize, Error> {
        let mut s = self.0.borrow_mut();
        if s.faults.fail_recvs > 0 {
            s.faults.fail_recvs -= 1;
            return Err(injected("mem rx"));
        }
        let n = max.min(out.capacity() - out.len()).min(s.received.len());
        out.extend(s.received.drain(..n));
        Ok(n)
    }

    fn in_kernel(&self) -> usize {
        let s = self.0.borrow();
        s.fill.len() + s.received.len()
    }
}

impl Tx for MemTx {
    type Frame = MemFrame;

    fn send(&mut self, frames: &mut Vec<MemFrame>) -> Result<usize, Error> {
        let mut s = self.0.borrow_mut();
        if s.faults.fail_sends > 0 {
            s.faults.fail_sends -= 1;
            return Err(injected("mem tx"));
        }
        let room = s.faults.tx_size.saturating_sub(s.tx_ring.len());
        let n = room.min(frames.len());
        s.tx_ring.extend(frames.drain(..n));
        Ok(n)
    }

    fn reclaim(&mut self, free: &mut Vec<MemFrame>) -> Result<usize, Error> {
        let mut s = self.0.borrow_mut();
        let n = (free.capacity() - free.len()).min(s.completed.len());
        free.extend(s.completed.drain(..n));
        Ok(n)
    }

    fn flush(&mut self) -> Result<(), Error> {
        let mut s = self.0.borrow_mut();
        s.stats.flushes += 1;
        let n = s.faults.tx_batch.min(s.tx_ring.len());
        for _ in 0..n {
            let Some(frame) = s.tx_ring.pop_front() else {
                break;
            };
            let bytes = frame.buf.get(..frame.len).unwrap_or_default().to_vec();
            s.sent.push(bytes);
            s.stats.transmitted += 1;
            if s.faults.hold_completions {
                s.held.push_back(frame);
            } else {
                s.completed.push_back(frame);
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        let s = self.0.borrow();
        s.tx_ring.len() + s.completed.len() + s.held.len()
    }
}
