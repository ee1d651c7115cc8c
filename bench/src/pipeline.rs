//! `ocelot-bench pipeline`: the classifier's batch entry point, in memory, on one core.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use classifier::Verdict;
use classifier::conntrack::{Conntrack, CtConfig, Load, Touch};
use classifier::parse::TcpFlags;
use classifier::pipeline::{BURST, Packet};
use classifier::snapshot::Snapshot;
use classifier::testing::{self, Flow, Workload, WorkloadSpec};
use classifier::{Nanos, PortId};
use dataplane::sys::Prefetch;
use hdrhistogram::Histogram;
use serde_json::json;

/// Options of `ocelot-bench pipeline`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Scenarios to run (default: all but floor): established, new, denied, established-1m,
    /// floor (the memory floor: one random 32-byte slot's cache line per packet, nothing else).
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Live flows for the `established` and `denied` scenarios.
    #[arg(long, default_value_t = 100_000)]
    flows: usize,
    /// Live flows for `established-1m`.
    #[arg(long, default_value_t = 1_000_000)]
    big_flows: usize,
    /// Pods in the synthetic cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Namespaces.
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Routes.
    #[arg(long, default_value_t = 100_000)]
    routes: usize,
    /// Conntrack slots per address family (default: the smallest power of two that keeps
    /// the live flows at a load factor of at most 0.5).
    #[arg(long)]
    ct_capacity: Option<usize>,
    /// Keep the tables on 4 KiB pages (the baseline huge pages are measured against).
    #[arg(long)]
    no_huge_pages: bool,
    /// Run without the conntrack prefetch stages (the baseline they are measured against).
    #[arg(long)]
    no_prefetch: bool,
    /// Bring conntrack slots in with plain loads in the burst's slot pass, as the classifier
    /// alone does, instead of the CPU's prefetch instruction the AF_XDP workers use
    /// (`dataplane::sys::Prefetch`; the baseline it is measured against).
    #[arg(long)]
    slot_loads: bool,
    /// For the established scenarios, also time the first stages alone on the same bursts:
    /// parsing only, then parsing and the conntrack lookup (with its prefetch passes), so
    /// that the full figure can be split into parse, conntrack and the rest.
    #[arg(long)]
    breakdown: bool,
    /// Packets measured per scenario.
    #[arg(long, default_value_t = 20_000_000)]
    packets: usize,
    /// Rounds: every chosen scenario runs once per round (set-up included), scenarios
    /// alternating, and the round with the median ns/packet is reported (with every
    /// round's figure), so that a stretch of noise from the rest of the machine moves one
    /// round, not the result. Default 3, or 1 with `--quick`.
    #[arg(long)]
    rounds: Option<usize>,
    /// A small, fast run for smoke tests (scale and packet counts divided by 100).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Outcome {
    scenario: &'static str,
    packets: u64,
    total_ns: u64,
    hist: Histogram<u64>,
    expected: &'static str,
    matched: u64,
    /// ns/packet of every round, in round order, when there was more than one.
    rounds: Vec<f64>,
}

impl Outcome {
    fn ns_per_packet(&self) -> f64 {
        self.total_ns as f64 / self.packets.max(1) as f64
    }
}

pub fn run(args: &Args) -> Result<()> {
    dataplane::sys::HUGE_PAGES.store(!args.no_huge_pages, std::sync::atomic::Ordering::Relaxed);
    let div = if args.quick { 100 } else { 1 };
    let spec = WorkloadSpec {
        namespaces: args.namespaces.div_ceil(div),
        pods: args.pods.div_ceil(div).max(256),
        policies: args.policies.div_ceil(div),
        routes: args.routes.div_ceil(div),
        ..WorkloadSpec::default()
    };
    let flows = args.flows.div_ceil(div);
    let big_flows = args.big_flows.div_ceil(div);
    let packets = args.packets.div_ceil(div);
    let all = ["established", "new", "denied", "established-1m", "floor"];
    let chosen: Vec<&str> = if args.scenario.is_empty() {
        all[..4].to_vec()
    } else {
        for s in &args.scenario {
            if !all.contains(&s.as_str()) {
                bail!("unknown scenario {s:?}; expected one of {}", all.join(", "));
            }
        }
        all.iter()
            .copied()
            .filter(|s| args.scenario.iter().any(|a| a == s))
            .collect()
    };

    let t = Instant::now();
    let w = testing::build_workload(&spec);
    eprintln!(
        "workload: {} pods, {} namespaces, {} policies, {} routes, {} local pods; built in {:.0} ms",
        spec.pods,
        spec.namespaces,
        spec.policies,
        spec.routes,
        w.local.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let cap = args.ct_capacity;
    PREFETCH.store(!args.no_prefetch, std::sync::atomic::Ordering::Relaxed);
    SLOT_HINTS.store(!args.slot_loads, std::sync::atomic::Ordering::Relaxed);
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let mut runs: Vec<Vec<(Outcome, Vec<Outcome>)>> = chosen.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (scenario, runs) in chosen.iter().zip(&mut runs) {
            let run = match *scenario {
                "established" => {
                    established(&w, flows, packets, "established", cap, args.breakdown)?
                }
                "established-1m" => established(
                    &w,
                    big_flows,
                    packets,
                    "established-1m",
                    cap,
                    args.breakdown,
                )?,
                "new" => (new_flows(&w, packets.min(1_000_000), cap)?, Vec::new()),
                "denied" => (denied(&w, flows.min(10_000), packets, cap)?, Vec::new()),
                "floor" => (floor(&w, flows, packets, cap)?, Vec::new()),
                _ => unreachable!("checked above"),
            };
            if rounds > 1 {
                eprintln!(
                    "round {round}/{rounds}: {scenario} {:.1} ns/packet",
                    run.0.ns_per_packet()
                );
            }
            runs.push(run);
        }
    }
    let mut outcomes = Vec::new();
    for runs in runs {
        let (outcome, stages) = median_round(runs);
        print_outcome(&outcome);
        outcomes.push(outcome);
        for stage in stages {
            print_outcome(&stage);
            outcomes.push(stage);
        }
    }
    if let Some(path) = &args.json {
        let results: Vec<_> = outcomes
            .iter()
            .map(|o| {
                let ns = o.ns_per_packet();
                json!({
                    "scenario": o.scenario,
                    "ns_per_packet": round2(ns),
                    "mpps": round2(1e3 / ns),
                    "p50_ns": o.hist.value_at_quantile(0.5),
                    "p99_ns": o.hist.value_at_quantile(0.99),
                    "p999_ns": o.hist.value_at_quantile(0.999),
                    "packets": o.packets,
                    "burst": BURST,
                    "frame_bytes": testing::MIN_FRAME + 4,
                    "rounds_ns_per_packet": o.rounds.iter().map(|&r| round2(r)).collect::<Vec<_>>(),
                })
            })
            .collect();
        crate::write_json(path, &json!({ "results": results }))?;
    }
    Ok(())
}

/// The run whose ns/packet is the median of `runs` (the upper one of an even count), with
/// every run's figure, in round order, in its `rounds` when there was more than one.
fn median_round(mut runs: Vec<(Outcome, Vec<Outcome>)>) -> (Outcome, Vec<Outcome>) {
    let all: Vec<f64> = runs.iter().map(|(o, _)| o.ns_per_packet()).collect();
    runs.sort_by(|a, b| a.0.ns_per_packet().total_cmp(&b.0.ns_per_packet()));
    let mut run = runs.swap_remove(runs.len() / 2);
    if all.len() > 1 {
        run.0.rounds = all;
    }
    run
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn print_outcome(o: &Outcome) {
    let ns = o.ns_per_packet();
    println!(
        "{:<16} {:>8.1} ns/pkt {:>7.2} Mpps   burst of {BURST}: p50 {:>6} ns  p99 {:>6} ns  p99.9 {:>6} ns   ({} pkts, {}/{} {})",
        o.scenario,
        ns,
        1e3 / ns,
        o.hist.value_at_quantile(0.5),
        o.hist.value_at_quantile(0.99),
        o.hist.value_at_quantile(0.999),
        o.packets,
        o.matched,
        o.packets,
        o.expected,
    );
    if !o.rounds.is_empty() {
        let each: Vec<String> = o.rounds.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "{:<16} the median of {} rounds (ns/packet, in order: {})",
            "",
            o.rounds.len(),
            each.join(", ")
        );
    }
}

/// Whether workers run the prefetch stages (`--no-prefetch` turns them off).
static PREFETCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the slot pass prefetches (`--slot-loads` makes it load instead).
static SLOT_HINTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The classifier as the AF_XDP workers run it.
type Worker = classifier::pipeline::Worker<Prefetch>;

fn new_worker(flows: usize, capacity: Option<usize>) -> Worker {
    let mut w = Worker::with_touch(conntrack(flows, capacity));
    w.set_prefetch(PREFETCH.load(std::sync::atomic::Ordering::Relaxed));
    w.set_touch(SLOT_HINTS.load(std::sync::atomic::Ordering::Relaxed));
    w
}

fn conntrack(flows: usize, capacity: Option<usize>) -> Arc<Conntrack> {
    let cfg = CtConfig {
        // Room for the live flows at a load factor that keeps probes short.
        capacity: capacity.unwrap_or((flows * 2).next_power_of_two().max(1024)),
        ..CtConfig::default()
    };
    Arc::new(Conntrack::new(cfg))
}

fn now() -> Nanos {
    1_000_000_000
}

/// Runs every frame of `frames` once through the worker (setup, untimed).
fn feed(worker: &mut Worker, snap: &Snapshot, frames: &mut [(Vec<u8>, PortId)]) -> Vec<Verdict> {
    frames
        .iter_mut()
        .map(|(f, port)| worker.process_one(snap, f, *port, now()))
        .collect()
}

/// Opens every flow with a real handshake through the pipeline.
fn establish(w: &Workload, worker: &mut Worker, flows: &[Flow]) -> Result<()> {
    let mut failed = 0usize;
    for f in flows {
        let mut steps = vec![
            (f.frame(TcpFlags::SYN), f.src.port),
            f.reply_frame(w, TcpFlags::SYN | TcpFlags::ACK),
            (f.frame(TcpFlags::ACK), f.src.port),
        ];
        let verdicts = feed(worker, &w.snapshot, &mut steps);
        if !verdicts.iter().all(|v| matches!(v, Verdict::Forward(_))) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} handshakes did not complete; refusing to report",
            flows.len()
        );
    }
    Ok(())
}

/// Measures bursts drawn round-robin from `templates`, restoring each frame before its burst
/// (untimed), and timing only `process_burst`.
fn measure(
    worker: &mut Worker,
    snap: &Snapshot,
    templates: &[(Vec<u8>, PortId)],
    packets: usize,
    scenario: &'static str,
    expected: &'static str,
    want: impl Fn(&Verdict) -> bool,
) -> Result<Outcome> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3)?;
    let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; 2048]).collect();
    let mut verdicts = [Verdict::ToHost; BURST];
    let mut total_ns = 0u64;
    let mut done = 0usize;
    let mut matched = 0u64;
    let mut next = 0usize;
    let bursts = packets.div_ceil(BURST);
    for _ in 0..bursts {
        let mut lens = [0usize; BURST];
        let mut ports = [PortId(0); BURST];
        for i in 0..BURST {
            let (t, port) = &templates[next % templates.len()];
            next += 1;
            bufs[i][..t.len()].copy_from_slice(t);
            lens[i] = t.len();
            ports[i] = *port;
        }
        let mut pkts: [Packet<'_>; BURST] = {
            let mut it = bufs.iter_mut().zip(lens).zip(ports);
            std::array::from_fn(|_| {
                let ((b, len), ingress) = it.next().expect("BURST buffers");
                Packet {
                    data: &mut b[..len],
                    ingress,
                }
            })
        };
        let t0 = Instant::now();
        worker.process_burst(snap, &mut pkts, &mut verdicts, now());
        let ns = t0.elapsed().as_nanos() as u64;
        total_ns += ns;
        // Saturating: a burst descheduled for longer than the histogram spans (a busy
        // machine, or a run under valgrind) must not abort the run.
        hist.saturating_record(ns.max(1));
        matched += verdicts.iter().filter(|v| want(v)).count() as u64;
        done += BURST;
    }
    if matched < done as u64 * 99 / 100 {
        bail!(
            "{scenario}: only {matched} of {done} frames were {expected}; the workload is broken, refusing to report"
        );
    }
    Ok(Outcome {
        scenario,
        packets: done as u64,
        total_ns,
        hist,
        expected,
        matched,
        rounds: Vec::new(),
    })
}

fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut v = items.to_vec();
    let mut rng = testing::Rng::new(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

fn established(
    w: &Workload,
    n: usize,
    packets: usize,
    name: &'static str,
    cap: Option<usize>,
    breakdown: bool,
) -> Result<(Outcome, Vec<Outcome>)> {
    let flows = testing::flows(w, n, true, 7);
    if flows.len() < n {
        bail!(
            "{name}: the workload allows only {} of {n} requested flows",
            flows.len()
        );
    }
    let mut worker = new_worker(n, cap);
    let t = Instant::now();
    establish(w, &mut worker, &flows)?;
    let live = worker.conntrack().len();
    eprintln!(
        "{name}: {} flows established in {:.0} ms ({live} conntrack entries)",
        flows.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    if live < flows.len() {
        bail!(
            "{name}: only {live} distinct connections for {} flows; refusing to report",
            flows.len()
        );
    }
    let templates: Vec<_> = shuffled(&flows, 11)
        .iter()
        .map(|f| (f.frame(TcpFlags::ACK | TcpFlags::PSH), f.src.port))
        .collect();
    let full = measure(
        &mut worker,
        &w.snapshot,
        &templates,
        packets,
        name,
        "forwarded",
        |v| matches!(v, Verdict::Forward(_)),
    )?;
    let mut stages = Vec::new();
    if breakdown {
        let ct = worker.conntrack().clone();
        let prefetch = PREFETCH.load(std::sync::atomic::Ordering::Relaxed);
        let (parse_name, ct_name) = if name == "established" {
            ("established/parse", "established/parse+ct")
        } else {
            ("established-1m/parse", "established-1m/parse+ct")
        };
        stages.push(measure_stage(&templates, packets, parse_name, |bufs| {
            let mut parsed = 0u64;
            for b in bufs {
                // Kept whole: judged only by `is_ok()`, the parse would be optimised down
                // to its length checks.
                let meta = std::hint::black_box(classifier::parse::parse(b));
                parsed += u64::from(meta.is_ok());
            }
            parsed
        })?);
        let hints = SLOT_HINTS.load(std::sync::atomic::Ordering::Relaxed);
        stages.push(measure_stage(&templates, packets, ct_name, |bufs| {
            if hints {
                parse_and_track::<Prefetch>(&ct, bufs, prefetch)
            } else {
                parse_and_track::<Load>(&ct, bufs, prefetch)
            }
        })?);
    }
    Ok((full, stages))
}

/// The pipeline's first stages on one burst, written as `Worker::process_burst` runs them:
/// parse every frame into an array of metas, the two conntrack prefetch passes (unless
/// `--no-prefetch`; the slot pass by `T`), then the lookups. Returns the number of conntrack
/// hits.
#[inline(never)]
fn parse_and_track<T: Touch>(ct: &Conntrack, bufs: &[&mut [u8]], prefetch: bool) -> u64 {
    use classifier::DropReason;
    use classifier::conntrack::{CtPrefetch, CtVerdict, FlowKey};
    use classifier::parse::{self, Net, PacketMeta};
    let mut metas = [Err(DropReason::Truncated); BURST];
    for (meta, buf) in metas.iter_mut().zip(bufs) {
        parse::parse_into(buf, meta);
    }
    let mut touches = [CtPrefetch::default(); BURST];
    let mut staged = [false; BURST];
    for ((touch, has), meta) in touches
        .iter_mut()
        .zip(&mut staged)
        .zip(&metas)
        .take(if prefetch { BURST } else { 0 })
    {
        if let Ok(PacketMeta {
            net: Net::Ip(ip), ..
        }) = meta
        {
            ct.prefetch_ip_into(ip, touch);
            *has = true;
        }
    }
    let mut touched = 0u64;
    for (touch, has) in touches.iter().zip(&staged) {
        if *has {
            touched = touched.wrapping_add(ct.prefetch_slot_with::<T>(touch));
        }
    }
    std::hint::black_box(touched);
    let mut hits = 0u64;
    for (meta, (touch, has)) in metas.iter().zip(touches.iter().zip(&staged)) {
        let Ok(PacketMeta {
            net: Net::Ip(ip), ..
        }) = meta
        else {
            continue;
        };
        let verdict = if *has {
            ct.track_prefetched(touch, &ip.l4, now())
        } else {
            ct.track(&FlowKey::from_ip(ip), &ip.l4, now())
        };
        hits += u64::from(matches!(verdict, CtVerdict::Hit { .. }));
    }
    hits
}

/// Times `stage` over bursts drawn from `templates` as [`measure`] does (frames restored
/// before each burst, untimed). `stage` returns how many frames it judged as expected; the
/// figure is refused unless that is at least 99 % of them.
fn measure_stage(
    templates: &[(Vec<u8>, PortId)],
    packets: usize,
    scenario: &'static str,
    mut stage: impl FnMut(&[&mut [u8]]) -> u64,
) -> Result<Outcome> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3)?;
    let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; 2048]).collect();
    let mut total_ns = 0u64;
    let mut matched = 0u64;
    let mut next = 0usize;
    let bursts = packets.div_ceil(BURST);
    for _ in 0..bursts {
        let mut lens = [0usize; BURST];
        for (buf, len) in bufs.iter_mut().zip(lens.iter_mut()) {
            let (t, _) = &templates[next % templates.len()];
            next += 1;
            buf[..t.len()].copy_from_slice(t);
            *len = t.len();
        }
        let frames: [&mut [u8]; BURST] = {
            let mut it = bufs.iter_mut().zip(lens);
            std::array::from_fn(|_| {
                let (b, len) = it.next().expect("BURST buffers");
                &mut b[..len]
            })
        };
        let t0 = Instant::now();
        let n = stage(&frames);
        let ns = t0.elapsed().as_nanos() as u64;
        total_ns += ns;
        // Saturating: a burst descheduled for longer than the histogram spans (a busy
        // machine, or a run under valgrind) must not abort the run.
        hist.saturating_record(ns.max(1));
        matched += n;
    }
    let done = (bursts * BURST) as u64;
    if matched < done * 99 / 100 {
        bail!("{scenario}: only {matched} of {done} frames passed the stage; refusing to report");
    }
    Ok(Outcome {
        scenario,
        packets: done,
        total_ns,
        hist,
        expected: "passed the stage",
        matched,
        rounds: Vec::new(),
    })
}

fn new_flows(w: &Workload, packets: usize, cap: Option<usize>) -> Result<Outcome> {
    let flows = testing::flows(w, packets, true, 13);
    let mut worker = new_worker(flows.len(), cap);
    let templates: Vec<_> = flows
        .iter()
        .map(|f| (f.frame(TcpFlags::SYN), f.src.port))
        .collect();
    // Each template is used once: every packet opens a new connection.
    measure(
        &mut worker,
        &w.snapshot,
        &templates,
        templates.len(),
        "new",
        "forwarded",
        |v| matches!(v, Verdict::Forward(_)),
    )
}

fn denied(w: &Workload, n: usize, packets: usize, cap: Option<usize>) -> Result<Outcome> {
    let flows = testing::flows(w, n, false, 17);
    if flows.is_empty() {
        bail!("denied: the workload's policy denies nothing; refusing to report");
    }
    let mut worker = new_worker(1024, cap);
    let templates: Vec<_> = flows
        .iter()
        .map(|f| (f.frame(TcpFlags::SYN), f.src.port))
        .collect();
    measure(
        &mut worker,
        &w.snapshot,
        &templates,
        packets,
        "denied",
        "dropped by policy",
        |v| matches!(v, Verdict::Drop(_)),
    )
}

/// The memory floor of the established path on this machine: per packet, one 32-byte slot
/// of a table sized as the conntrack table for `n` flows, at a random index fixed per flow
/// (as a flow's hash fixes its slot), and nothing else. Measured as the pipeline is: bursts
/// of 64, frames restored before each burst (untimed), one `Instant` pair per burst; the slot
/// loads of a burst are issued in one pass (as the prefetch passes do), then each slot's key
/// word is compared (as the lookup does). The table comes from the same allocator (huge
/// pages unless `--no-huge-pages`).
fn floor(w: &Workload, n: usize, packets: usize, cap: Option<usize>) -> Result<Outcome> {
    let slots = cap.unwrap_or((n * 2).next_power_of_two().max(1024));
    // Word 1 of each slot holds its own index, so the comparison can be checked.
    let table: Vec<[u64; 4]> = (0..slots as u64).map(|i| [i, i, 0, 0]).collect();
    let mut rng = testing::Rng::new(19);
    let index: Vec<usize> = (0..n).map(|_| rng.below(slots as u64) as usize).collect();
    let flows = testing::flows(w, BURST, true, 7);
    let templates: Vec<_> = flows
        .iter()
        .map(|f| (f.frame(TcpFlags::ACK | TcpFlags::PSH), f.src.port))
        .collect();
    let mut next = 0usize;
    measure_stage(&templates, packets, "floor", |bufs| {
        let mut at = [0usize; BURST];
        let mut sum = 0u64;
        for a in at.iter_mut().take(bufs.len()) {
            *a = index[next % index.len()];
            next += 1;
            sum = sum.wrapping_add(table.get(*a).map_or(0, |s| s[0]));
        }
        std::hint::black_box(sum);
        at.iter()
            .take(bufs.len())
            .filter(|&&a| table.get(a).is_some_and(|s| s[1] == a as u64))
            .count() as u64
    })
}
