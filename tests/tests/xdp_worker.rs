//! The classifier-driven worker loop (`dataplane::worker`) over real AF_XDP sockets, with a
//! stand-in classifier that forwards between the two pods and sets MACs (the real classifier
//! is still being written, so its verdicts are not what this test checks): proves the burst
//! view of UMEM frames, the verdict handling and the rings work together on real traffic.
//! Also two workers pinned to the two cores, each owning one pod's port, so every frame
//! crosses the hand-off between them.
//!
//! Needs root (CI runs it as root); all in namespaces the test made and removes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use classifier::verdict::{DropReason, PortId};
use dataplane::handoff::{self, HandoffRx, HandoffTx};
use dataplane::rawfwd::Idle;
use dataplane::sys::{self, SocketOpts, UmemOpts};
use dataplane::worker::{Worker, WorkerCounters, WorkerPort};
use ocelot_tests::netns::VirtualNode;
use ocelot_tests::xdp::CrossConnect;

/// The worker on its own thread in the node namespace; stopped and joined on drop.
struct WorkerThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<WorkerCounters>>,
}

/// What one worker thread gets.
struct WorkerSetup {
    /// (host-side interface, its port id) pairs this worker owns.
    ports: Vec<(String, PortId)>,
    /// CPU core to pin to.
    core: Option<usize>,
    /// Hand-offs to other workers, with the ports they lead to.
    outs: Vec<(HandoffTx, Vec<PortId>)>,
    /// Hand-offs from other workers.
    ins: Vec<HandoffRx>,
}

impl WorkerThread {
    fn start(vn: &VirtualNode, classify: CrossConnect, setup: WorkerSetup) -> WorkerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let netns = vn.node.name().to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            if let Some(core) = setup.core {
                sys::pin_current_thread(core).expect("pin");
            }
            sys::enter_netns(&netns).expect("enter node");
            let (mut umem, frames) = sys::XskUmem::new(UmemOpts::default()).expect("umem");
            let mut ports = Vec::new();
            for (dev, id) in &setup.ports {
                let (rx, tx) = umem.open(dev, 0, &SocketOpts::default()).expect("socket");
                ports.push(WorkerPort { id: *id, rx, tx });
            }
            let mut worker = Worker::new(umem, frames, ports, classify).expect("worker");
            for (tx, ports) in setup.outs {
                worker.add_handoff_out(tx, &ports).expect("hand-off route");
            }
            for rx in setup.ins {
                worker.add_handoff_in(rx);
            }
            ready_tx.send(()).unwrap();
            worker
                .run(
                    &thread_stop,
                    Idle::Poll {
                        after_empty_polls: 1000,
                        linger_us: 0,
                        timeout_ms: 1,
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

/// The cross-connect's (destination, source) MACs for the two pods of `vn`: each pod's
/// `eth0` and the node's side of its veth (`vA`, `vB`).
fn pod_macs(vn: &VirtualNode) -> [([u8; 6], [u8; 6]); 2] {
    [
        (vn.pods[0].mac, vn.node.mac("vA").unwrap()),
        (vn.pods[1].mac, vn.node.mac("vB").unwrap()),
    ]
}

/// One unpinned worker owning `vA` (port 0) and `vB` (port 1), cross-connecting the pods.
fn one_worker(vn: &VirtualNode) -> WorkerThread {
    WorkerThread::start(
        vn,
        CrossConnect { macs: pod_macs(vn) },
        WorkerSetup {
            ports: vec![("vA".into(), PortId(0)), ("vB".into(), PortId(1))],
            core: None,
            outs: Vec::new(),
            ins: Vec::new(),
        },
    )
}

#[test]
fn worker_forwards_ping_through_a_classifier() {
    let vn =
        VirtualNode::new(&[("pod-a", "10.67.0.1", "vA"), ("pod-b", "10.67.0.2", "vB")]).unwrap();
    let worker = one_worker(&vn);
    let out = vn.pods[0]
        .ns
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.67.0.2"])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {stdout}");
    let c = worker.stop();
    assert!(c.rx >= 6 && c.tx >= 6, "{c:?}");
    assert_eq!(c.dropped(DropReason::TxFull), 0, "{c:?}");
    for dev in ["vA", "vB"] {
        assert!(!vn.node.has_xdp(dev).unwrap(), "XDP program left on {dev}");
    }
}

#[test]
fn two_pinned_workers_forward_across_the_handoff() {
    let vn =
        VirtualNode::new(&[("pod-a", "10.68.0.1", "vA"), ("pod-b", "10.68.0.2", "vB")]).unwrap();
    let macs = pod_macs(&vn);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (a_to_b, b_from_a) = handoff::channel(256, 2048);
    let (b_to_a, a_from_b) = handoff::channel(256, 2048);
    // Worker 0 owns pod-a's port, worker 1 pod-b's: every frame crosses the hand-off.
    let w0 = WorkerThread::start(
        &vn,
        CrossConnect { macs },
        WorkerSetup {
            ports: vec![("vA".into(), PortId(0))],
            core: Some(0),
            outs: vec![(a_to_b, vec![PortId(1)])],
            ins: vec![a_from_b],
        },
    );
    let w1 = WorkerThread::start(
        &vn,
        CrossConnect { macs },
        WorkerSetup {
            ports: vec![("vB".into(), PortId(1))],
            core: Some(1 % cores),
            outs: vec![(b_to_a, vec![PortId(0)])],
            ins: vec![b_from_a],
        },
    );
    let out = vn.pods[0]
        .ns
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.68.0.2"])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {stdout}");
    let (c0, c1) = (w0.stop(), w1.stop());
    // Requests: received by worker 0, handed to worker 1, sent on vB; replies the other way.
    assert!(c0.handoff_out >= 3 && c1.handoff_in >= 3, "{c0:?} {c1:?}");
    assert!(c1.handoff_out >= 3 && c0.handoff_in >= 3, "{c0:?} {c1:?}");
    assert_eq!(c0.handoff_dropped + c1.handoff_dropped, 0);
    for dev in ["vA", "vB"] {
        assert!(!vn.node.has_xdp(dev).unwrap(), "XDP program left on {dev}");
    }
}

/// Pod churn does not shrink a worker's frame pool: the frames a retired port's socket held
/// (its fill ring's share, and anything on its rings) come back when the socket is closed,
/// also after traffic went through it.
#[test]
fn retired_ports_give_their_frames_back() {
    let vn =
        VirtualNode::new(&[("pod-a", "10.68.0.1", "vA"), ("pod-b", "10.68.0.2", "vB")]).unwrap();
    let macs = pod_macs(&vn);
    let node = vn.node.name().to_owned();
    let (tx_done, rx_done) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        sys::enter_netns(&node).expect("enter node");
        let opts = UmemOpts {
            frames: 512,
            ..UmemOpts::default()
        };
        let (mut umem, frames) = sys::XskUmem::new(opts).expect("umem");
        let mut ports = Vec::new();
        for (dev, id) in [("vA", PortId(0)), ("vB", PortId(1))] {
            let (rx, tx) = umem.open(dev, 0, &SocketOpts::default()).expect("socket");
            ports.push(WorkerPort { id, rx, tx });
        }
        let mut worker = Worker::new(umem, frames, ports, CrossConnect { macs }).expect("worker");
        let mut lost_without_recovery = 0;
        for round in 0..8 {
            // Fill rings get their shares; let traffic (the pods' own IPv6/ARP chatter and
            // the test's pings) pass for a moment.
            let until = std::time::Instant::now() + std::time::Duration::from_millis(100);
            while std::time::Instant::now() < until {
                worker.poll_once().expect("poll");
            }
            let (rx, tx) = worker.retire_port(PortId(1)).expect("port 1 retired");
            lost_without_recovery += worker.counters().frames_retired;
            let back = worker.mem_mut().release(rx, tx);
            assert!(!back.is_empty(), "round {round}: the fill ring held frames");
            worker.recover_frames(back);
            assert_eq!(worker.total_frames(), 512, "round {round}");
            assert_eq!(worker.counters().frames_retired, 0, "round {round}");
            // The kernel releases the closed socket's binding asynchronously: the same queue
            // is busy for a moment.
            let mut again = None;
            for _ in 0..100 {
                match worker.mem_mut().open("vB", 0, &SocketOpts::default()) {
                    Ok(pair) => {
                        again = Some(pair);
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            let (rx, tx) = again.expect("socket again");
            worker
                .add_port(WorkerPort {
                    id: PortId(1),
                    rx,
                    tx,
                })
                .expect("port 1 again");
        }
        let _ = tx_done.send(lost_without_recovery);
        worker.counters().rx
    });
    let out = vn.pods[0]
        .ns
        .exec(&["ping", "-c", "5", "-i", "0.15", "-W", "1", "10.68.0.2"])
        .unwrap();
    let lost = rx_done.recv().expect("worker finished");
    let rx = thread.join().expect("worker thread");
    assert!(lost > 0, "the retired sockets held frames each round");
    assert!(
        rx > 0,
        "traffic went through the ports: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Frames the kernel drops before the worker sees them are counted too: a frame larger than
/// a UMEM frame (a pod whose MTU is above what the frame size holds) is `xsk_rx_dropped`.
#[test]
fn frames_too_big_for_a_umem_frame_are_counted() {
    let vn =
        VirtualNode::new(&[("pod-a", "10.69.0.1", "vA"), ("pod-b", "10.69.0.2", "vB")]).unwrap();
    // A pod with a 3,000-byte MTU (veth allows native XDP up to ~3,500): 2,500-byte pings
    // do not fit 2,048-byte frames.
    vn.pods[0]
        .ns
        .ip(&["link", "set", "eth0", "mtu", "3000"])
        .unwrap();
    vn.node.ip(&["link", "set", "vA", "mtu", "3000"]).unwrap();
    let worker = one_worker(&vn);
    let small = vn.pods[0]
        .ns
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.69.0.2"])
        .unwrap();
    assert!(small.status.success(), "small pings pass");
    let big = vn.pods[0]
        .ns
        .exec(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-s",
            "2500",
            "10.69.0.2",
        ])
        .unwrap();
    assert!(!big.status.success(), "2,500-byte pings cannot pass");
    let c = worker.stop();
    assert!(c.xsk_rx_dropped >= 3, "{c:?}");
}
