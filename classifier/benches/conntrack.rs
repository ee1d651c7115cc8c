//! Conntrack costs: `track` hits on 100 K and 1 M live flows in random order, misses, and
//! insert of new flows, against the same lookups on a single-threaded `ahash::AHashMap` (what
//! a per-worker sharded table would cost).
//!
//! Run: `cargo bench -p classifier --bench conntrack -- --quick`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use ahash::AHashMap;
use classifier::conntrack::{Conntrack, CtConfig, CtTimeouts, CtVerdict, FlowKey};
use classifier::parse::L4;
use criterion::{Criterion, criterion_group, criterion_main};

const NOW: u64 = 1_000_000_000_000;
const UDP: L4 = L4::Udp { sport: 0, dport: 0 };

/// Deterministic xorshift, so every run measures the same flows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_keys(n: usize, rng: &mut Rng) -> Vec<FlowKey> {
    (0..n)
        .map(|_| {
            let r = rng.next();
            FlowKey {
                src: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (r as u32 & 0x00ff_ffff))),
                dst: IpAddr::V4(Ipv4Addr::from(0x0a80_0000 | ((r >> 24) as u32 & 0xffff))),
                sport: (r >> 40) as u16,
                dport: 80,
                proto: 17,
            }
        })
        .collect()
}

/// Fisher-Yates, so lookups visit the flows in an order unrelated to insertion.
fn shuffled(keys: &[FlowKey], rng: &mut Rng) -> Vec<FlowKey> {
    let mut v = keys.to_vec();
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    v
}

fn bench(c: &mut Criterion) {
    for (label, n) in [("100k", 100_000usize), ("1m", 1_000_000)] {
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ n as u64);
        let keys = random_keys(n, &mut rng);
        let order = shuffled(&keys, &mut rng);
        let absent = random_keys(n, &mut Rng(0xdead_beef));

        // Twice the flows in slots: a load factor of 0.38 (100 K) and 0.48 (1 M).
        let ct = Conntrack::new(CtConfig {
            capacity: 2 * n,
            timeouts: CtTimeouts::default(),
        });
        for k in &keys {
            ct.insert(k, &UDP, 1, NOW)
                .expect("bench table sized for its flows");
        }

        let mut g = c.benchmark_group(format!("conntrack_{label}"));
        let mut i = 0;
        g.bench_function("track_hit", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                let v = ct.track(black_box(&order[i]), &UDP, NOW);
                debug_assert!(matches!(v, CtVerdict::Hit { .. }));
                v
            })
        });
        let mut i = 0;
        g.bench_function("track_miss", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                ct.track(black_box(&absent[i]), &UDP, NOW)
            })
        });
        let mut i = 0;
        g.bench_function("insert_then_remove_new", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                let k = black_box(&absent[i]);
                let r = ct.insert(k, &UDP, 1, NOW);
                ct.remove(k);
                r
            })
        });

        // Baseline: one worker's private map, same keys, same work (find, maybe update).
        let mut map: AHashMap<FlowKey, u64> = AHashMap::with_capacity(2 * n);
        for k in &keys {
            map.insert(*k, NOW);
        }
        let mut i = 0;
        g.bench_function("ahashmap_hit", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                match map.get_mut(black_box(&order[i])) {
                    Some(last) if *last != NOW => {
                        *last = NOW;
                        true
                    }
                    Some(_) => true,
                    None => false,
                }
            })
        });
        let mut i = 0;
        g.bench_function("ahashmap_miss", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                map.get(black_box(&absent[i])).is_some()
            })
        });
        let mut i = 0;
        g.bench_function("ahashmap_insert_then_remove_new", |b| {
            b.iter(|| {
                i = (i + 1) % n;
                let k = black_box(absent[i]);
                map.insert(k, NOW);
                map.remove(&k)
            })
        });
        g.finish();
    }
}

/// The shared table from two threads at once, as two workers use it: one tracks the flows'
/// original direction, the other their replies (`FlowKey::reversed`), in different orders.
/// Compared with one thread doing the same lookups alone: if the table scales, the per-thread
/// time per lookup stays the same with two threads.
fn bench_two_workers(c: &mut Criterion) {
    let n = 100_000usize;
    let mut rng = Rng(0x0ce1_07fa_ce0f_f1ce);
    let keys = random_keys(n, &mut rng);
    let forward = shuffled(&keys, &mut rng);
    let replies: Vec<FlowKey> = shuffled(&keys, &mut rng)
        .iter()
        .map(FlowKey::reversed)
        .collect();
    let ct = Conntrack::new(CtConfig {
        capacity: 2 * n,
        timeouts: CtTimeouts::default(),
    });
    for k in &keys {
        ct.insert(k, &UDP, 1, NOW)
            .expect("bench table sized for its flows");
    }
    let run = |keys: &[FlowKey], iters: u64| {
        let start = std::time::Instant::now();
        for i in 0..iters as usize {
            black_box(ct.track(&keys[i % keys.len()], &UDP, NOW));
        }
        start.elapsed()
    };
    let mut g = c.benchmark_group("conntrack_100k_shared");
    g.bench_function("one_thread_per_lookup", |b| {
        b.iter_custom(|iters| run(&forward, iters))
    });
    g.bench_function("two_threads_per_lookup_per_thread", |b| {
        b.iter_custom(|iters| {
            std::thread::scope(|s| {
                let a = s.spawn(|| run(&forward, iters));
                let b = s.spawn(|| run(&replies, iters));
                let (a, b) = (a.join(), b.join());
                match (a, b) {
                    (Ok(a), Ok(b)) => a.max(b),
                    _ => std::time::Duration::MAX,
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_two_workers);
criterion_main!(benches);
