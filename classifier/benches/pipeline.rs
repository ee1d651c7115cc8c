//! Criterion benches of the whole batch entry point on a scaled-down synthetic cluster
//! (the full-scale figures come from `ocelot-bench pipeline`).

use std::hint::black_box;
use std::sync::Arc;

use classifier::PortId;
use classifier::Verdict;
use classifier::conntrack::{Conntrack, CtConfig};
use classifier::parse::TcpFlags;
use classifier::pipeline::{BURST, Packet, Worker};
use classifier::testing::{self, WorkloadSpec};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let spec = WorkloadSpec {
        namespaces: 100,
        pods: 1000,
        policies: 100,
        routes: 10_000,
        ..WorkloadSpec::default()
    };
    let w = testing::build_workload(&spec);
    let flows = testing::flows(&w, 10_000, true, 3);
    let mut worker = Worker::new(Arc::new(Conntrack::new(CtConfig::default())));
    for f in &flows {
        let mut syn = f.frame(TcpFlags::SYN);
        worker.process_one(&w.snapshot, &mut syn, f.src.port, 1);
        let (mut synack, port) = f.reply_frame(&w, TcpFlags::SYN | TcpFlags::ACK);
        worker.process_one(&w.snapshot, &mut synack, port, 1);
    }
    let templates: Vec<(Vec<u8>, PortId)> = flows
        .iter()
        .map(|f| (f.frame(TcpFlags::ACK), f.src.port))
        .collect();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut next = 0;
    g.bench_function("established_burst64", |b| {
        let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; 128]).collect();
        let mut verdicts = [Verdict::ToHost; BURST];
        b.iter(|| {
            let mut ports = [PortId(0); BURST];
            for (i, buf) in bufs.iter_mut().enumerate() {
                let (t, p) = &templates[next % templates.len()];
                next += 1;
                buf[..t.len()].copy_from_slice(t);
                ports[i] = *p;
            }
            let mut pkts: Vec<Packet<'_>> = bufs
                .iter_mut()
                .zip(ports)
                .map(|(b, ingress)| Packet {
                    data: &mut b[..testing::MIN_FRAME],
                    ingress,
                })
                .collect();
            worker.process_burst(&w.snapshot, &mut pkts, &mut verdicts, 2);
            black_box(&verdicts);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
