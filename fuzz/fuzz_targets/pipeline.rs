//! The whole classify path: arbitrary bytes become a burst of frames on arbitrary ingress
//! ports, classified against a small synthetic cluster whose conntrack table persists across
//! inputs (so later inputs meet entries earlier ones created). Nothing may panic, and every
//! frame must get exactly one verdict that the counters account for.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use classifier::conntrack::{Conntrack, CtConfig};
use classifier::pipeline::{BURST, Packet, Worker};
use classifier::testing::{self, Workload, WorkloadSpec};
use classifier::{PortId, Verdict};
use libfuzzer_sys::fuzz_target;

struct State {
    workload: Workload,
    worker: Mutex<Worker>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let spec = WorkloadSpec {
            namespaces: 10,
            pods: 256,
            policies: 10,
            routes: 1000,
            pods_per_node: 16,
            ..WorkloadSpec::default()
        };
        let mut cfg = CtConfig::default();
        cfg.capacity = 4096;
        State {
            workload: testing::build_workload(&spec),
            worker: Mutex::new(Worker::new(Arc::new(Conntrack::new(cfg)))),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let st = state();
    let snap = &st.workload.snapshot;
    // Input format: repeated [port: u8][len: u8][len bytes]; a valid frame template of a local
    // pod is used as the base when the first byte is odd, so that deep paths are reached.
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut ports = Vec::new();
    let mut rest = data;
    while let [port, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        let mut frame = if port & 1 == 1 {
            let flows = &st.workload.local;
            let pod = flows[(*port as usize / 2) % flows.len()];
            let dst = st.workload.pod_ips[*len as usize % st.workload.pod_ips.len()];
            testing::Flow { src: pod, dst, sport: 1000 + *len as u16, dport: 80 }.frame(*len)
        } else {
            Vec::new()
        };
        // Overlay the fuzzer's bytes on the template past its Ethernet header (XOR or
        // overwrite), or use them alone.
        if frame.is_empty() {
            frame.extend_from_slice(bytes);
        } else {
            for (i, b) in bytes.iter().enumerate() {
                let at = i + 14;
                if at >= frame.len() {
                    frame.push(*b);
                } else if port & 2 == 2 {
                    frame[at] ^= b;
                } else {
                    frame[at] = *b;
                }
            }
        }
        bufs.push(frame);
        ports.push(PortId(u16::from(*port / 4) % (snap.ports.len() as u16 + 2)));
        rest = next;
        if bufs.len() == BURST {
            break;
        }
    }
    let mut pkts: Vec<Packet<'_>> = bufs
        .iter_mut()
        .zip(&ports)
        .map(|(b, p)| Packet { data: b.as_mut_slice(), ingress: *p })
        .collect();
    let mut verdicts = vec![Verdict::ToHost; pkts.len()];
    let mut worker = st.worker.lock().expect("not poisoned");
    let before = worker.counters().clone();
    worker.process_burst(snap, &mut pkts, &mut verdicts, 1_000_000_000);
    let after = worker.counters();
    let accounted = (after.forwarded + after.to_host + after.replied + after.dropped())
        - (before.forwarded + before.to_host + before.replied + before.dropped());
    assert_eq!(accounted, pkts.len() as u64);
    assert_eq!(after.rx - before.rx, pkts.len() as u64);
});
