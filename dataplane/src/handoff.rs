//! The hand-off between workers: how a frame received by one worker reaches a port another
//! worker owns.
//!
//! Each worker has its own UMEM, so a frame cannot move to another worker's tx ring as a
//! descriptor; it is copied. One [`channel`] carries frames in one direction between two
//! workers: the sender copies the frame's bytes into a [`HandoffBuf`] and frees its UMEM
//! frame at once; the receiver copies the bytes into one of its own UMEM frames and sends
//! it on the egress port, then returns the buffer.
//!
//! Both queues are bounded, lock-free (crossbeam's array channels) and allocation-free after
//! setup: `capacity` buffers are made once and cycle between the two sides. When none is free
//! (the receiver is behind), the frame is dropped and counted by the sender
//! ([`HandoffDrop::Full`]); a worker never waits for another.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::Error;
use crate::sys::EventFd;

use classifier::verdict::PortId;

/// One frame in transit between workers.
#[derive(Debug)]
pub struct HandoffBuf {
    bytes: Box<[u8]>,
    len: usize,
    egress: PortId,
}

impl HandoffBuf {
    /// The port the frame leaves by.
    pub fn egress(&self) -> PortId {
        self.egress
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

/// Why a frame could not be handed off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffDrop {
    /// Every buffer is in flight: the receiving worker is behind.
    Full,
    /// The frame is larger than the buffers.
    TooBig,
}

/// A worker's doorbell: senders ring it when they hand frames to a worker that sleeps, so an
/// idle worker forwards a handed-over frame at once instead of at the end of its sleep.
///
/// Lost wakeups cannot happen: the sleeper sets `sleeping` and then checks its queues; a
/// sender enqueues and then reads `sleeping` (both sequentially consistent), so either the
/// sleeper sees the frame or the sender sees it asleep and rings.
#[derive(Debug)]
pub struct Doorbell {
    efd: EventFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    /// A new doorbell.
    pub fn new() -> Result<Arc<Doorbell>, Error> {
        Ok(Arc::new(Doorbell {
            efd: EventFd::new()?,
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Rings if the owner sleeps (or is about to).
    pub fn ring_if_asleep(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.efd.signal();
        }
    }

    /// Rings unconditionally.
    pub fn ring(&self) {
        self.efd.signal();
    }

    /// Called by the owner before it checks its queues one last time and sleeps.
    pub fn going_to_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Called by the owner when it wakes.
    pub fn woke(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        self.efd.drain();
    }

    /// The descriptor the owner sleeps on.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.efd.fd()
    }
}

/// The sending side of one direction.
#[derive(Debug)]
pub struct HandoffTx {
    to_peer: Sender<HandoffBuf>,
    returned: Receiver<HandoffBuf>,
    buf_size: usize,
    doorbell: Option<Arc<Doorbell>>,
}

/// The receiving side of one direction.
#[derive(Debug)]
pub struct HandoffRx {
    from_peer: Receiver<HandoffBuf>,
    give_back: Sender<HandoffBuf>,
}

/// Creates one direction of a hand-off with `capacity` buffers of `buf_size` bytes.
pub fn channel(capacity: usize, buf_size: usize) -> (HandoffTx, HandoffRx) {
    let capacity = capacity.max(1);
    let (to_peer, from_peer) = crossbeam_channel::bounded(capacity);
    let (give_back, returned) = crossbeam_channel::bounded(capacity);
    for _ in 0..capacity {
        // Cannot fail: the channel has room for exactly `capacity` buffers.
        let _ = give_back.try_send(HandoffBuf {
            bytes: vec![0; buf_size].into_boxed_slice(),
            len: 0,
            egress: PortId(0),
        });
    }
    (
        HandoffTx {
            to_peer,
            returned,
            buf_size,
            doorbell: None,
        },
        HandoffRx {
            from_peer,
            give_back,
        },
    )
}

impl HandoffTx {
    /// Rings `doorbell` (the receiving worker's) after each push that finds it asleep.
    pub fn with_doorbell(mut self, doorbell: Arc<Doorbell>) -> HandoffTx {
        self.doorbell = Some(doorbell);
        self
    }

    /// Copies `frame` into a free buffer bound for `egress` and passes it to the peer.
    pub fn push(&self, egress: PortId, frame: &[u8]) -> Result<(), HandoffDrop> {
        // Checked before taking a buffer: only the receiving side can put one back.
        if frame.len() > self.buf_size {
            return Err(HandoffDrop::TooBig);
        }
        let mut buf = self.returned.try_recv().map_err(|_| HandoffDrop::Full)?;
        if let Some(dst) = buf.bytes.get_mut(..frame.len()) {
            dst.copy_from_slice(frame);
        }
        buf.len = frame.len();
        buf.egress = egress;
        // The channel has room for every buffer, so it cannot be full; a disconnected peer
        // (a worker that stopped) loses the frame, as a drop.
        match self.to_peer.try_send(buf) {
            Ok(()) => {
                if let Some(d) = &self.doorbell {
                    d.ring_if_asleep();
                }
                Ok(())
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(HandoffDrop::Full),
        }
    }
}

impl HandoffRx {
    /// Takes the next frame handed over, if any, runs `f` on it and returns the buffer to
    /// the sender. Returns whether there was one.
    pub fn pop(&self, f: impl FnOnce(&HandoffBuf)) -> bool {
        let Ok(buf) = self.from_peer.try_recv() else {
            return false;
        };
        f(&buf);
        let _ = self.give_back.try_send(buf);
        true
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.from_peer.len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.from_peer.is_empty()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn doorbell_rings_only_for_a_sleeping_receiver() {
        let bell = Doorbell::new().unwrap();
        let (tx, rx) = channel(4, 64);
        let tx = tx.with_doorbell(std::sync::Arc::clone(&bell));
        let readable = || crate::sys::poll_readable([bell.fd()], 0).unwrap();
        tx.push(PortId(1), &[1, 2, 3]).unwrap();
        assert!(!readable(), "an awake receiver is not rung");
        bell.going_to_sleep();
        tx.push(PortId(1), &[4]).unwrap();
        assert!(readable(), "a sleeping receiver is rung");
        bell.woke();
        assert!(!readable(), "waking drains the bell");
        assert_eq!(rx.len(), 2);
    }

    use super::*;

    #[test]
    fn frames_cross_in_order_with_their_egress() {
        let (tx, rx) = channel(4, 64);
        tx.push(PortId(7), &[1, 2, 3]).unwrap();
        tx.push(PortId(8), &[4; 64]).unwrap();
        let mut seen = Vec::new();
        while rx.pop(|b| seen.push((b.egress(), b.bytes().to_vec()))) {}
        assert_eq!(
            seen,
            vec![(PortId(7), vec![1, 2, 3]), (PortId(8), vec![4; 64])]
        );
    }

    #[test]
    fn full_when_every_buffer_is_in_flight_and_recovers() {
        let (tx, rx) = channel(2, 64);
        assert_eq!(tx.push(PortId(1), &[0; 10]), Ok(()));
        assert_eq!(tx.push(PortId(1), &[0; 10]), Ok(()));
        assert_eq!(tx.push(PortId(1), &[0; 10]), Err(HandoffDrop::Full));
        assert!(rx.pop(|_| ()));
        assert_eq!(tx.push(PortId(1), &[0; 10]), Ok(()));
        assert_eq!(rx.len(), 2);
    }

    #[test]
    fn too_big_is_refused() {
        let (tx, rx) = channel(2, 16);
        assert_eq!(tx.push(PortId(1), &[0; 17]), Err(HandoffDrop::TooBig));
        assert!(rx.is_empty());
    }

    #[test]
    fn works_across_threads() {
        let (tx, rx) = channel(8, 64);
        let sender = std::thread::spawn(move || {
            let mut sent = 0u32;
            let mut i = 0u32;
            while sent < 1000 {
                if tx.push(PortId(1), &i.to_be_bytes()).is_ok() {
                    sent += 1;
                    i += 1;
                }
            }
        });
        let mut next = 0u32;
        while next < 1000 {
            rx.pop(|b| {
                assert_eq!(b.bytes(), next.to_be_bytes());
                next += 1;
            });
        }
        sender.join().unwrap();
    }
}
