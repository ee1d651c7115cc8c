//! Routing-table benchmarks at a cluster node's scale (100,000 routes per family): lookups
//! of a mixed address stream and bulk builds, for [`classifier::lpm::Lpm`] and for the
//! `prefix-trie` crate as a baseline. Table memory (live heap bytes, counted by a wrapper
//! around the system allocator) is printed once before the timed runs.
//!
//! Route mix, IPv4: a default route; 10,000 /32 pod routes inside five /16 pod CIDRs; 1,000
//! /26 remote-node blocks inside the same CIDRs; 89,000 random prefixes of uniformly random
//! length /8–/24. IPv6: a default route; 10,000 /128 pod routes inside five /64s; 1,000 /122
//! node blocks inside them; 89,000 random prefixes under 2000::/3 with the lengths real
//! tables use (/32–/64 in steps of 4). Lookups: half are addresses inside a random route,
//! half are uniformly random.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use classifier::lpm::Lpm;
use classifier::net::{Cidr, mask4, mask6};
use criterion::{Criterion, Throughput, criterion_group};
use prefix_trie::PrefixMap;

/// Bytes currently allocated through [`Counting`].
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes so the bench can report table sizes.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping on the side, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller checks `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUTES: usize = 100_000;
const BATCH: usize = 1024;

/// splitmix64: deterministic, so every run benchmarks the same tables.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn u128(&mut self) -> u128 {
        u128::from(self.next()) << 64 | u128::from(self.next())
    }
}

fn routes_v4() -> Vec<(u32, u8, u32)> {
    let mut rng = Rng(4);
    let pod_cidrs: Vec<u32> = (0..5).map(|i| (10 << 24) | ((244 + i) << 16)).collect();
    let mut routes = vec![(0, 0, 0)];
    let mut next_hop = 1u32;
    let mut push = |routes: &mut Vec<(u32, u8, u32)>, addr: u32, len: u8| {
        routes.push((addr & mask4(len), len, next_hop % 4096));
        next_hop += 1;
    };
    for _ in 0..10_000 {
        let cidr = pod_cidrs[rng.below(5) as usize];
        push(&mut routes, cidr | rng.below(1 << 16) as u32, 32);
    }
    for _ in 0..1_000 {
        let cidr = pod_cidrs[rng.below(5) as usize];
        push(&mut routes, cidr | rng.below(1 << 16) as u32, 26);
    }
    while routes.len() < ROUTES {
        let len = 8 + rng.below(17) as u8;
        push(&mut routes, rng.next() as u32, len);
    }
    routes
}

fn routes_v6() -> Vec<(u128, u8, u32)> {
    let mut rng = Rng(6);
    let pod_cidrs: Vec<u128> = (0..5u128)
        .map(|i| (0xfd00_0010_0244_0000u128 | i) << 64)
        .collect();
    let mut routes = vec![(0, 0, 0)];
    let mut next_hop = 1u32;
    let mut push = |routes: &mut Vec<(u128, u8, u32)>, addr: u128, len: u8| {
        routes.push((addr & mask6(len), len, next_hop % 4096));
        next_hop += 1;
    };
    for _ in 0..10_000 {
        let cidr = pod_cidrs[rng.below(5) as usize];
        push(&mut routes, cidr | u128::from(rng.below(1 << 16)), 128);
    }
    for _ in 0..1_000 {
        let cidr = pod_cidrs[rng.below(5) as usize];
        push(&mut routes, cidr | u128::from(rng.below(1 << 16)), 122);
    }
    while routes.len() < ROUTES {
        let len = 32 + 4 * rng.below(9) as u8;
        let addr = (rng.u128() >> 3) | (1 << 125); // 2000::/3
        push(&mut routes, addr, len);
    }
    routes
}

/// Half addresses inside a random route, half uniformly random.
fn probes<A: Copy>(
    routes: &[(A, u8, u32)],
    rng: &mut Rng,
    inside: impl Fn(A, u8, &mut Rng) -> A,
    uniform: impl Fn(&mut Rng) -> A,
) -> Vec<A> {
    (0..BATCH)
        .map(|i| {
            if i % 2 == 0 {
                let (a, l, _) = routes[rng.below(routes.len() as u64) as usize];
                inside(a, l, rng)
            } else {
                uniform(rng)
            }
        })
        .collect()
}

fn cidrs4(routes: &[(u32, u8, u32)]) -> Vec<(Cidr, u32)> {
    routes
        .iter()
        .map(|&(a, l, v)| (Cidr::new(IpAddr::V4(a.into()), l).expect("valid"), v))
        .collect()
}

fn cidrs6(routes: &[(u128, u8, u32)]) -> Vec<(Cidr, u32)> {
    routes
        .iter()
        .map(|&(a, l, v)| (Cidr::new(IpAddr::V6(a.into()), l).expect("valid"), v))
        .collect()
}

fn trie<R>(routes: &[(R, u8, u32)]) -> PrefixMap<(R, u8), u32>
where
    R: Copy,
    (R, u8): prefix_trie::Prefix,
{
    let mut map = PrefixMap::new();
    for &(a, l, v) in routes {
        map.insert((a, l), v);
    }
    map
}

fn bench_v4(c: &mut Criterion) {
    let routes = routes_v4();
    let cidrs = cidrs4(&routes);
    let probes = probes(
        &routes,
        &mut Rng(40),
        |a, l, rng| a | (rng.next() as u32 & !mask4(l)),
        |rng| rng.next() as u32,
    );
    let lpm = Lpm::from_routes(cidrs.iter().copied());
    let map = trie(&routes);
    // Both must agree before their speed means anything.
    for &p in &probes {
        assert_eq!(
            lpm.lookup_v4(p),
            map.get_lpm(&(p, 32)).map(|(_, &v)| v),
            "{p:#x}"
        );
    }

    let mut g = c.benchmark_group("lpm_v4_lookup");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ocelot_dir24_8", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &p in &probes {
                acc = acc.wrapping_add(lpm.lookup_v4(black_box(p)).unwrap_or(0));
            }
            acc
        })
    });
    g.bench_function("prefix_trie", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &p in &probes {
                acc = acc.wrapping_add(map.get_lpm(&(black_box(p), 32)).map_or(0, |(_, &v)| v));
            }
            acc
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lpm_v4_build");
    g.sample_size(10);
    g.bench_function("ocelot_from_routes", |b| {
        b.iter(|| Lpm::from_routes(cidrs.iter().copied()))
    });
    g.bench_function("ocelot_insert_each", |b| {
        b.iter(|| {
            let mut lpm = Lpm::new();
            for &(c, v) in &cidrs {
                lpm.insert(c, v);
            }
            lpm
        })
    });
    g.bench_function("prefix_trie", |b| b.iter(|| trie(&routes)));
    g.bench_function("ocelot_clone", |b| b.iter(|| lpm.clone()));
    // The control plane's update: copy the live snapshot, add one pod route, publish.
    let pod: Cidr = "10.244.7.7/32".parse().expect("valid");
    g.bench_function("ocelot_clone_insert_pod", |b| {
        b.iter(|| {
            let mut next = lpm.clone();
            next.insert(pod, 1);
            next
        })
    });
    g.bench_function("prefix_trie_clone", |b| b.iter(|| map.clone()));
    g.finish();
}

fn bench_v6(c: &mut Criterion) {
    let routes = routes_v6();
    let cidrs = cidrs6(&routes);
    let probes = probes(
        &routes,
        &mut Rng(60),
        |a, l, rng| a | (rng.u128() & !mask6(l)),
        |rng| rng.u128(),
    );
    let lpm = Lpm::from_routes(cidrs.iter().copied());
    let map = trie(&routes);
    for &p in &probes {
        assert_eq!(
            lpm.lookup_v6(p),
            map.get_lpm(&(p, 128)).map(|(_, &v)| v),
            "{p:#x}"
        );
    }

    let mut g = c.benchmark_group("lpm_v6_lookup");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ocelot_hash_per_length", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &p in &probes {
                acc = acc.wrapping_add(lpm.lookup_v6(black_box(p)).unwrap_or(0));
            }
            acc
        })
    });
    g.bench_function("prefix_trie", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &p in &probes {
                acc = acc.wrapping_add(map.get_lpm(&(black_box(p), 128)).map_or(0, |(_, &v)| v));
            }
            acc
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lpm_v6_build");
    g.sample_size(10);
    g.bench_function("ocelot_from_routes", |b| {
        b.iter(|| Lpm::from_routes(cidrs.iter().copied()))
    });
    g.bench_function("ocelot_insert_each", |b| {
        b.iter(|| {
            let mut lpm = Lpm::new();
            for &(c, v) in &cidrs {
                lpm.insert(c, v);
            }
            lpm
        })
    });
    g.bench_function("prefix_trie", |b| b.iter(|| trie(&routes)));
    g.finish();
}

/// Prints the live heap bytes of each structure built from the 100,000 routes.
fn report_memory() {
    fn measure<T>(name: &str, build: impl FnOnce() -> T, describe: impl Fn(&T) -> String) {
        let before = LIVE.load(Ordering::Relaxed);
        let table = build();
        let bytes = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        eprintln!(
            "memory {name}: {:.1} MiB heap; {}",
            bytes as f64 / f64::from(1 << 20),
            describe(&table)
        );
    }
    let (r4, r6) = (routes_v4(), routes_v6());
    let (c4, c6) = (cidrs4(&r4), cidrs6(&r6));
    measure(
        "v4 ocelot",
        || Lpm::from_routes(c4),
        |t| format!("{:?}", t.stats()),
    );
    measure(
        "v4 prefix-trie",
        || trie(&r4),
        |t| format!("{} routes", t.len()),
    );
    measure(
        "v6 ocelot",
        || Lpm::from_routes(c6),
        |t| format!("{:?}", t.stats()),
    );
    measure(
        "v6 prefix-trie",
        || trie(&r6),
        |t| format!("{} routes", t.len()),
    );
}

criterion_group!(benches, bench_v4, bench_v6);

fn main() {
    report_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
