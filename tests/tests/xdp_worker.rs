//! The classifier-driven worker loop (`dataplane::worker`) over real AF_XDP sockets, with a
//! stand-in classifier that forwards between the two pods and sets MACs (the real classifier
//! is still being written, so its verdicts are not what this test checks): proves the burst
//! view of UMEM frames, the verdict handling and the rings work together on real traffic.
//!
//! Needs root (CI runs it as root); all in namespaces the test made and removes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use classifier::verdict::{DropReason, PortId, Verdict};
use dataplane::rawfwd::Idle;
use dataplane::sys::{self, SocketOpts, UmemOpts};
use dataplane::worker::{Classify, Worker, WorkerCounters, WorkerPort};
use ocelot_tests::netns::VirtualNode;

/// Forwards port 0 ↔ port 1, writing the egress link's MACs, as the classifier's rewrite
/// stage will.
#[derive(Debug, Clone, Copy)]
struct CrossConnect {
    /// (destination, source) MACs for frames leaving by port 0 and by port 1.
    macs: [([u8; 6], [u8; 6]); 2],
}

impl Classify for CrossConnect {
    fn classify_burst(
        &mut self,
        frames: &mut [&mut [u8]],
        ingress: PortId,
        verdicts: &mut [Verdict],
    ) {
        let egress = 1 - ingress.0.min(1);
        let (dst, src) = self.macs[usize::from(egress)];
        for (frame, verdict) in frames.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = if frame.len() >= 14 {
                frame[..6].copy_from_slice(&dst);
                frame[6..12].copy_from_slice(&src);
                Verdict::Forward(PortId(egress))
            } else {
                Verdict::Drop(DropReason::Truncated)
            };
        }
    }
}

/// The worker on its own thread in the node namespace; stopped and joined on drop.
struct WorkerThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<WorkerCounters>>,
}

impl WorkerThread {
    fn start(vn: &VirtualNode, classify: CrossConnect) -> WorkerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let netns = vn.node.name().to_owned();
        let devs: Vec<String> = vn.pods.iter().map(|p| p.host_dev.clone()).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            sys::enter_netns(&netns).expect("enter node");
            let (mut umem, frames) = sys::XskUmem::new(UmemOpts::default()).expect("umem");
            let mut ports = Vec::new();
            for (i, dev) in devs.iter().enumerate() {
                let (rx, tx) = umem.open(dev, 0, &SocketOpts::default()).expect("socket");
                ports.push(WorkerPort {
                    id: PortId(i as u16),
                    rx,
                    tx,
                });
            }
            let mut worker = Worker::new(umem, frames, ports, classify).expect("worker");
            ready_tx.send(()).unwrap();
            worker
                .run(
                    &thread_stop,
                    Idle::Poll {
                        after_empty_polls: 1000,
                        timeout_ms: 10,
                    },
                )
                .expect("worker ran");
            *worker.counters()
        });
        ready_rx.recv().expect("worker started");
        WorkerThread {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> WorkerCounters {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("worker thread"))
            .unwrap_or_default()
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn worker_forwards_ping_through_a_classifier() {
    let vn = VirtualNode::new(&[("pod-a", "10.67.0.1", "vA"), ("pod-b", "10.67.0.2", "vB")]);
    let macs = [
        (vn.pods[0].mac, vn.node.mac("vA")),
        (vn.pods[1].mac, vn.node.mac("vB")),
    ];
    let worker = WorkerThread::start(&vn, CrossConnect { macs });
    let out = vn.pods[0]
        .ns
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.67.0.2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {stdout}");
    let c = worker.stop();
    assert!(c.rx >= 6 && c.tx >= 6, "{c:?}");
    assert_eq!(c.dropped(DropReason::TxFull), 0, "{c:?}");
    for dev in ["vA", "vB"] {
        assert!(!vn.node.has_xdp(dev), "XDP program left on {dev}");
    }
}
