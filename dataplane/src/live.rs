//! Counters a running worker publishes for the control thread and operators.
//!
//! A worker counts in plain integers on the packet path (no atomics per frame) and copies
//! them into its [`LiveCounters`] between polls (see `worker::PUBLISH_EVERY_POLLS`), with
//! relaxed stores: a reader sees each counter at most one publication old, and counters only
//! grow. Readers never block the worker.

use std::sync::atomic::{AtomicU64, Ordering};

use classifier::verdict::{Counters, DropReason};

use crate::worker::WorkerCounters;

/// One worker's published counters: its I/O counters and its classifier's.
#[derive(Debug)]
pub struct LiveCounters {
    io: [AtomicU64; IO_FIELDS],
    io_drops: [AtomicU64; DropReason::COUNT],
    class: [AtomicU64; CLASS_FIELDS],
    class_drops: [AtomicU64; DropReason::COUNT],
    publications: AtomicU64,
}

const IO_FIELDS: usize = 13;
const CLASS_FIELDS: usize = 6;

impl Default for LiveCounters {
    fn default() -> Self {
        LiveCounters {
            io: std::array::from_fn(|_| AtomicU64::new(0)),
            io_drops: std::array::from_fn(|_| AtomicU64::new(0)),
            class: std::array::from_fn(|_| AtomicU64::new(0)),
            class_drops: std::array::from_fn(|_| AtomicU64::new(0)),
            publications: AtomicU64::new(0),
        }
    }
}

fn store_all(dst: &[AtomicU64], src: &[u64]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
}

fn load_all<const N: usize>(src: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| src.get(i).map_or(0, |a| a.load(Ordering::Relaxed)))
}

impl LiveCounters {
    /// Called by the worker: copies its counters in.
    pub fn store(&self, io: &WorkerCounters, class: Option<&Counters>) {
        store_all(
            &self.io,
            &[
                io.rx,
                io.tx,
                io.not_local,
                io.to_host_dropped,
                io.to_host,
                io.handoff_out,
                io.handoff_in,
                io.handoff_dropped,
                io.frames_retired,
                io.xsk_rx_dropped,
                io.xsk_rx_ring_full,
                io.xsk_fill_ring_empty,
                io.xsk_invalid_descs,
            ],
        );
        store_all(&self.io_drops, &io.drops);
        if let Some(c) = class {
            store_all(
                &self.class,
                &[
                    c.rx,
                    c.forwarded,
                    c.to_host,
                    c.replied,
                    c.ct_hits,
                    c.ct_created,
                ],
            );
            store_all(&self.class_drops, &c.drops);
        }
        self.publications.fetch_add(1, Ordering::Release);
    }

    /// The last published values: the worker's I/O counters and its classifier's.
    pub fn load(&self) -> (WorkerCounters, Counters) {
        let [
            rx,
            tx,
            not_local,
            to_host_dropped,
            to_host,
            handoff_out,
            handoff_in,
            handoff_dropped,
            frames_retired,
            xsk_rx_dropped,
            xsk_rx_ring_full,
            xsk_fill_ring_empty,
            xsk_invalid_descs,
        ] = load_all(&self.io);
        let io = WorkerCounters {
            rx,
            tx,
            not_local,
            to_host_dropped,
            to_host,
            handoff_out,
            handoff_in,
            handoff_dropped,
            frames_retired,
            xsk_rx_dropped,
            xsk_rx_ring_full,
            xsk_fill_ring_empty,
            xsk_invalid_descs,
            drops: load_all(&self.io_drops),
        };
        let [rx, forwarded, to_host, replied, ct_hits, ct_created] = load_all(&self.class);
        let class = Counters {
            rx,
            forwarded,
            to_host,
            replied,
            ct_hits,
            ct_created,
            drops: load_all(&self.class_drops),
        };
        (io, class)
    }

    /// How many times the worker has published (0: not yet running).
    pub fn publications(&self) -> u64 {
        self.publications.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_load_round_trips() {
        let live = LiveCounters::default();
        assert_eq!(live.publications(), 0);
        let mut io = WorkerCounters {
            rx: 1,
            tx: 2,
            not_local: 3,
            to_host_dropped: 4,
            to_host: 9,
            handoff_out: 5,
            handoff_in: 6,
            handoff_dropped: 7,
            frames_retired: 16,
            xsk_rx_dropped: 17,
            xsk_rx_ring_full: 18,
            xsk_fill_ring_empty: 19,
            xsk_invalid_descs: 20,
            ..WorkerCounters::default()
        };
        io.drops[DropReason::TxFull.index()] = 8;
        let mut class = Counters {
            rx: 9,
            forwarded: 10,
            to_host: 11,
            replied: 12,
            ct_hits: 13,
            ct_created: 14,
            ..Counters::default()
        };
        class.drops[DropReason::SpoofedSourceIp.index()] = 15;
        live.store(&io, Some(&class));
        assert_eq!(live.load(), (io, class));
        assert_eq!(live.publications(), 1);
    }
}
