//! The traits a forwarding loop runs over: [`Rx`] (receive ring plus the fill ring that feeds
//! it), [`Tx`] (transmit ring plus the completion ring that returns its frames) and
//! [`FrameMem`] (access to a frame's bytes).
//!
//! A *frame* (`Self::Frame`) is a moved value standing for one buffer of frame memory. Whoever
//! holds it owns the buffer; handing it to [`Rx::fill`] or [`Tx::send`] gives it to the
//! kernel, and [`Rx::recv`] / [`Tx::reclaim`] give it back. Implementations never clone a
//! frame, so a buffer cannot be in two places at once.
//!
//! All methods move frames between caller-provided `Vec`s whose capacity the caller reserved
//! at start-up; implementations only push within the spare capacity (never allocating) and
//! pop, so the hot loop does not allocate.
//!
//! Implementations: [`crate::sys`] (AF_XDP over a shared UMEM) and [`crate::mem`] (in memory,
//! with fault injection for tests).

use std::os::fd::BorrowedFd;

use crate::Error;

/// The largest number of frames moved per ring operation; the same burst size the
/// classifier's pipeline works in.
pub const BURST: usize = classifier::pipeline::BURST;

/// Access to the bytes of frames. One per UMEM (one per worker): every port of a worker
/// shares it, which is what lets a frame received on one port be sent on another untouched.
pub trait FrameMem {
    /// The frame handle this memory hands out.
    type Frame;

    /// Runs `f` over the packet bytes of `frame` (exactly its current length) and returns its
    /// result. A closure rather than a returned slice because the AF_XDP implementation
    /// derives the slice from the UMEM mapping for the duration of one borrow.
    fn with_bytes_mut<R>(&self, frame: &mut Self::Frame, f: impl FnOnce(&mut [u8]) -> R) -> R;

    /// Runs `f` over the packet bytes of up to [`BURST`] frames at once (the first `BURST`
    /// of `frames`), one slice per frame in order: the shape the classifier's
    /// `process_burst` wants. Allocation-free: the slices live in a stack array.
    fn with_burst_mut<R>(
        &self,
        frames: &mut [Self::Frame],
        f: impl FnOnce(&mut [&mut [u8]]) -> R,
    ) -> R;

    /// The packet length of `frame` in bytes.
    fn len(&self, frame: &Self::Frame) -> usize;

    /// Sets the packet length of `frame` (for frames built or resized in place), clamped to
    /// the buffer's capacity; returns the new length.
    fn set_len(&self, frame: &mut Self::Frame, len: usize) -> usize;
}

/// The receive side of one (interface, queue): the rx ring and the fill ring feeding it.
pub trait Rx {
    /// The frame handle, shared with the [`FrameMem`] and [`Tx`] of the same worker.
    type Frame;

    /// Hands up to `max` frames popped from the end of `free` to the kernel to receive into,
    /// as many as the fill ring has room for. Returns how many were handed over.
    fn fill(&mut self, free: &mut Vec<Self::Frame>, max: usize) -> Result<usize, Error>;

    /// Pushes up to `max` received frames onto `out` (never beyond its spare capacity).
    /// Returns how many.
    fn recv(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> Result<usize, Error>;

    /// Frames handed to the kernel by [`Rx::fill`] and not yet received back (in the fill
    /// or rx ring). Used to account for frames when a port is retired.
    fn in_kernel(&self) -> usize;

    /// The kernel's counters for the socket (frames it dropped before user space saw them),
    /// if it keeps any. Read between polls, not per burst: it is a system call.
    fn socket_stats(&self) -> Option<crate::sys::KernelStats> {
        None
    }

    /// A descriptor that polls readable when frames are waiting, so an idle loop can sleep in
    /// `poll` instead of spinning. `None` (the default) for ports that have none.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// The transmit side of one (interface, queue): the tx ring and the completion ring that
/// returns transmitted frames.
pub trait Tx {
    /// The frame handle, shared with the [`FrameMem`] and [`Rx`] of the same worker.
    type Frame;

    /// Queues frames from the front of `frames` for transmission, in order, as many as the tx
    /// ring has room for; the rest stay in `frames` (the caller decides whether to retry or
    /// drop them). Returns how many were queued.
    fn send(&mut self, frames: &mut Vec<Self::Frame>) -> Result<usize, Error>;

    /// Pushes frames whose transmission completed onto `free`. Returns how many.
    fn reclaim(&mut self, free: &mut Vec<Self::Frame>) -> Result<usize, Error>;

    /// Makes the kernel process queued frames if it needs telling (in copy mode it always
    /// does: transmission happens inside the wakeup syscall, a bounded batch per call).
    fn flush(&mut self) -> Result<(), Error>;

    /// Frames handed to [`Tx::send`] and not yet returned by [`Tx::reclaim`].
    fn in_flight(&self) -> usize;
}
