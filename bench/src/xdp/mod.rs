//! `ocelot-bench xdp`: pps, loss, CPU and one-way latency of three devices under test on a
//! real veth testbed — the ocelot agent, the kernel's forwarding with nftables (a Calico
//! iptables-style node) and the bare AF_XDP forwarder (`raw-xsk`) — with the same generator
//! and sink, in rounds that alternate the devices (A B C A B C …) so the machine's drift
//! cancels in the medians.
//!
//! Per device and round: a sanity trial at a low rate (a device whose testbed delivers less
//! than half of it is refused, with the reason, rather than reported), an unpaced trial, a
//! short bisection over offered rates for the highest rate with at most 0.1 % loss, and a
//! trial at the fixed `--rate` for loss, CPU per packet and latency. CPU is the testbed's:
//! this process's and the agent's user + system time (`/proc/<pid>/stat`) plus the machine's
//! softirq time (`/proc/stat`), where the kernel path and veth do their work; it is taken
//! for every trial and reported at the fixed rate and at the trial that set the max rate.
//! Outputs: a table, a conditions line, `--json`, one `.hgrm` per device and an SVG
//! percentile plot in `--out-dir`. `--sweep-flows` / `--sweep-rules` repeat all of it per
//! value (scaling runs); `--workers 2` splits ocelot's veths over two workers;
//! `--swap-every-ms` replaces the device's tables under load.
//!
//! Safety: everything runs in namespaces this process creates ([`testbed`]), removed by RAII;
//! SIGINT and SIGTERM only set a stop flag, so the destructors run.

mod frame;
mod report;
mod testbed;
mod traffic;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dataplane::sys::{SocketOpts, XdpMode};
use serde_json::json;

use report::{DeviceResult, RoundFigures};
use testbed::{Device, DeviceOpts, PolicySet, Testbed};
use traffic::{Placement, Traffic, XskSetup};

/// XDP attach mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Generic (skb) mode.
    Generic,
    /// Native (driver) mode.
    Native,
}

/// How the raw-xsk forwarder idles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdleMode {
    /// Sleep in poll(2) after 1,000 empty polls (10 ms at most).
    Poll,
    /// Busy-poll.
    Spin,
}

/// Options of `ocelot-bench xdp`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Devices under test, in the order each round runs them.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Device::Ocelot, Device::Kernel, Device::RawXsk])]
    devices: Vec<Device>,
    /// Frame size on the wire in bytes, FCS included (64 = the minimum Ethernet frame).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(64..=1518))]
    size: u16,
    /// Distinct UDP flows (source/destination port pairs), sent round robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    flows: u32,
    /// The fixed offered rate (pps) for loss, CPU and latency; keep it below every device's
    /// saturation.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1000..=100_000_000))]
    rate: u64,
    /// The low rate (pps) of the sanity trial and the bottom of the search.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=100_000_000))]
    low_rate: u64,
    /// Bisection steps of the search for the highest rate with ≤ 0.1 % loss.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
    search_steps: u32,
    /// Measured seconds per trial.
    #[arg(long, default_value_t = 2.0, value_parser = positive_secs)]
    duration: f64,
    /// Warm-up seconds per trial (sent, not counted).
    #[arg(long, default_value_t = 0.5, value_parser = non_negative_secs)]
    warmup: f64,
    /// Rounds (each runs every device once).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Policy set the device enforces.
    #[arg(long, value_enum, default_value_t = PolicySet::Demo)]
    policy: PolicySet,
    /// Policies of `--policy generated`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    rules: u32,
    /// Core of the generator thread (default 0).
    #[arg(long)]
    gen_core: Option<usize>,
    /// Core of the sink thread (default: not pinned, the scheduler places it).
    #[arg(long)]
    sink_core: Option<usize>,
    /// Core of the device's worker (default: the last core).
    #[arg(long)]
    device_core: Option<usize>,
    /// XDP attach mode for every AF_XDP socket (generator, sink, devices).
    #[arg(long, value_enum, default_value_t = Mode::Generic)]
    xdp_mode: Mode,
    /// How the raw-xsk forwarder and ocelot's worker idle: `poll` sleeps in poll(2) after
    /// 1,000 (raw-xsk) or 256 (ocelot) empty polls, `spin` never sleeps (the device's core is
    /// then always busy; ocelot's config gets `idle = "spin"`).
    #[arg(long, value_enum, default_value_t = IdleMode::Poll)]
    idle: IdleMode,
    /// ocelot's `[xdp] sleep_after_us` with `--idle poll`: how long its worker keeps polling
    /// after the last frame before it sleeps (default: the agent's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    sleep_after_us: Option<u32>,
    /// Scaling run over the number of flows (e.g. 1,1000,100000,1000000): every device at
    /// every value.
    #[arg(long, value_delimiter = ',', conflicts_with = "sweep_rules", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    sweep_flows: Vec<u32>,
    /// Scaling run over the number of generated policies (e.g. 0,10,100,1000); implies
    /// `--policy generated`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(0..=100_000))]
    sweep_rules: Vec<u32>,
    /// Generator/sink pod pairs; each pair gets `--rate / pairs` and its own flows.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    pairs: u32,
    /// ocelot workers: 1 (one worker owns every veth) or 2 (on two cores: with one pair, one
    /// veth per worker, so every frame crosses the hand-off; with more pairs, pairs alternate
    /// between the workers and frames stay on theirs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    workers: u32,
    /// Replace the device's tables every this many ms during the fixed-rate trial (kernel:
    /// `nft -f`; ocelot: a manifest change, which the agent notices within its 200 ms watch
    /// interval).
    #[arg(long, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    swap_every_ms: Option<u64>,
    /// A smoke run of a few seconds per device: 1 round, short trials, 2 search steps.
    #[arg(long)]
    quick: bool,
    /// Directory for the `.hgrm` files, the SVG plot and the devices' config files (the
    /// default is inside the build directory, which git ignores).
    #[arg(long, default_value = "target/xbench")]
    out_dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0, 3600]")),
    }
}

/// Trial timing after `--quick` is applied.
#[derive(Debug, Clone, Copy)]
struct Timing {
    warmup: Duration,
    duration: Duration,
    sanity: Duration,
    drain: Duration,
    steps: u32,
    rounds: u32,
}

impl Args {
    fn timing(&self) -> Timing {
        if self.quick {
            Timing {
                warmup: Duration::from_millis(200),
                duration: Duration::from_millis(500),
                sanity: Duration::from_millis(300),
                drain: Duration::from_millis(100),
                steps: self.search_steps.min(2),
                rounds: 1,
            }
        } else {
            Timing {
                warmup: Duration::from_secs_f64(self.warmup),
                duration: Duration::from_secs_f64(self.duration),
                sanity: Duration::from_secs_f64(self.duration.min(1.0)),
                drain: Duration::from_millis(200),
                steps: self.search_steps,
                rounds: self.rounds,
            }
        }
    }
}

/// Clock ticks to ns: USER_HZ is 100 on every Linux architecture this runs on.
const TICK_NS: u64 = 10_000_000;

/// CPU time in ns, sampled before and after the fixed-rate trial.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSample {
    /// The testbed: this process (generator, sink, raw-xsk threads), the agent's process if
    /// any, and the whole machine's softirq time (where the kernel forwards and where veth
    /// and generic XDP do their work).
    testbed: u64,
    /// The whole machine's user + nice + system + softirq (includes other users' work).
    machine: u64,
}

/// utime + stime of a process, in ticks, from `/proc/<pid>/stat`.
fn process_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    stat_ticks(&stat).with_context(|| format!("{path}: not a stat line"))
}

/// utime + stime from the text of a `/proc/<pid>/stat` file.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses; the fields follow the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    // After the name: state (field 3) … utime (14) and stime (15), so the 12th and 13th here.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn cpu_sample(agent: Option<u32>) -> Result<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq …
    let softirq = get(6);
    let machine = get(0) + get(1) + get(2) + softirq;
    let mut testbed = process_ticks("self")? + softirq;
    if let Some(pid) = agent {
        testbed += process_ticks(&pid.to_string()).unwrap_or(0);
    }
    Ok(CpuSample {
        testbed: testbed * TICK_NS,
        machine: machine * TICK_NS,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// What one trial showed.
#[derive(Debug, Clone, Copy)]
struct TrialFigures {
    sent: u64,
    received: u64,
    /// Testbed CPU during the measured part, ns.
    cpu_ns: u64,
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
}

/// Runs the devices and reports.
pub fn run(args: &Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    if args.devices.is_empty() {
        bail!("--devices names no device");
    }
    if args.devices.contains(&Device::Ocelot) {
        testbed::ocelot_binary()?;
    }
    let t = args.timing();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gen_core = args.gen_core.unwrap_or(0);
    let sink_core = args.sink_core;
    let device_core = args.device_core.unwrap_or(cores - 1);
    for (what, c) in [
        ("--gen-core", Some(gen_core)),
        ("--sink-core", sink_core),
        ("--device-core", Some(device_core)),
    ] {
        if let Some(c) = c
            && c >= cores
        {
            bail!("{what} {c}: this machine has cores 0..{}", cores - 1);
        }
    }
    testbed::ensure_dir(&args.out_dir)?;
    let work_dir = args.out_dir.join("work");
    testbed::ensure_dir(&work_dir)?;
    let xdp_mode = match args.xdp_mode {
        Mode::Generic => XdpMode::Generic,
        Mode::Native => XdpMode::Native,
    };
    let socket = SocketOpts {
        xdp_mode,
        ..SocketOpts::default()
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let load_start = loadavg();
    let policy = if args.sweep_rules.is_empty() {
        args.policy
    } else {
        PolicySet::Generated
    };
    let policy_desc = match policy {
        PolicySet::None => "none".to_owned(),
        PolicySet::Demo => "demo".to_owned(),
        PolicySet::Generated if !args.sweep_rules.is_empty() => "generated".to_owned(),
        PolicySet::Generated => format!("generated ({} policies)", args.rules),
    };
    let sink = sink_core.map_or("unpinned".to_owned(), |c| c.to_string());
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let sweep_desc = if !args.sweep_flows.is_empty() {
        format!(" (sweeping flows {})", list(&args.sweep_flows))
    } else if !args.sweep_rules.is_empty() {
        format!(" (sweeping policies {})", list(&args.sweep_rules))
    } else {
        String::new()
    };
    let sweep_desc = if args.pairs > 1 {
        format!("{sweep_desc}, {} generator/sink pairs", args.pairs)
    } else {
        sweep_desc
    };
    let sweep_desc = if args.workers > 1 {
        format!("{sweep_desc}, ocelot with {} workers", args.workers)
    } else {
        sweep_desc
    };
    let sweep_desc = match (args.idle, args.sleep_after_us) {
        (IdleMode::Spin, _) => format!("{sweep_desc}, devices spin when idle"),
        (IdleMode::Poll, Some(us)) => format!("{sweep_desc}, ocelot sleeps after {us} µs idle"),
        (IdleMode::Poll, None) => sweep_desc,
    };
    let conditions = format!(
        "{} B frames, {} flow(s), fixed rate {} pps, policy {policy_desc}{sweep_desc}, {:?} XDP, copy mode; \
         cores: generator {gen_core}, device {device_core}, sink {sink} (of {cores}); \
         {} rounds × {:?} + {:?} warm-up per trial; kernel {kernel}; {}; load average {load_start} at start",
        args.size,
        args.flows,
        args.rate,
        args.xdp_mode,
        t.rounds,
        t.duration,
        t.warmup,
        cpu_model(),
    );
    eprintln!("xdp: {conditions}");

    let tb = Testbed::new(args.pairs as usize).context("building the testbed")?;
    let names = tb.namespace_names();
    let epoch = Instant::now();
    let setup = XskSetup {
        socket,
        frames: 4096,
    };

    // The points of a scaling run; one point when nothing is swept.
    let points: Vec<(u32, u32)> = if !args.sweep_flows.is_empty() {
        args.sweep_flows.iter().map(|&f| (f, args.rules)).collect()
    } else if !args.sweep_rules.is_empty() {
        args.sweep_rules.iter().map(|&r| (args.flows, r)).collect()
    } else {
        vec![(args.flows, args.rules)]
    };
    let mut dopts = DeviceOpts {
        policy,
        rules: args.rules as usize,
        core: Some(device_core),
        flows: args.flows,
        workers: args.workers,
        xdp_mode,
        socket,
        idle: match args.idle {
            IdleMode::Spin => dataplane::rawfwd::Idle::Spin,
            IdleMode::Poll => dataplane::rawfwd::FwdConfig::default().idle,
        },
        sleep_after_us: args.sleep_after_us,
        work_dir,
    };
    let swap = args.swap_every_ms.map(Duration::from_millis);
    let mut traffic = Vec::new();
    for (g, k) in tb.gens.iter().zip(&tb.sinks) {
        let placement = Placement {
            gen_ns: g.pod.ns.name().to_owned(),
            sink_ns: k.pod.ns.name().to_owned(),
            gen_core: Some(gen_core),
            sink_core,
        };
        let ep = tb.endpoints(g, k)?;
        traffic.push(
            Traffic::start(&placement, ep, usize::from(args.size) - 4, setup, epoch)
                .context("starting a generator and a sink")?,
        );
    }
    let mut sweep = Vec::new();
    let mut first: Option<PointResult> = None;
    let mut first_label = String::new();
    for &(flows, rules) in &points {
        dopts.rules = rules as usize;
        dopts.flows = flows;
        let label = if args.sweep_rules.is_empty() {
            format!("{flows} flow(s), policy {policy_desc}")
        } else {
            format!("{flows} flow(s), {rules} generated policies")
        };
        if points.len() > 1 {
            eprintln!("point: {label}");
        }
        let (results, refused) = measure_point(
            &args.devices,
            &tb,
            &dopts,
            &mut traffic,
            args,
            t,
            swap,
            &stop,
        )?;
        if points.len() > 1 {
            sweep.push(json!({
                "flows": flows,
                "rules": rules,
                "devices": results.iter().map(DeviceResult::json).collect::<Vec<_>>(),
                "refused": refused.iter().map(|(n, r)| json!({"name": n, "reason": r})).collect::<Vec<_>>(),
            }));
            println!("## {label}");
            print!("{}", report::table(&results, args.rate));
            for r in &results {
                let path = args
                    .out_dir
                    .join(format!("{}-flows{flows}-rules{rules}.hgrm", r.name));
                std::fs::write(&path, report::hgrm(&r.latency))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        if first.is_none() {
            first = Some((results, refused));
            first_label = label;
        }
    }
    for t in traffic {
        t.stop()?;
    }
    drop(tb);
    let left = dataplane::netns::list()?;
    if let Some(n) = names.iter().find(|n| left.contains(n)) {
        bail!("namespace {n} was not removed");
    }
    let Some((results, refused)) = first else {
        bail!("nothing was measured");
    };

    let load_end = loadavg();
    println!("{conditions}; load average {load_end} at end");
    if points.len() > 1 {
        println!("## the first point again ({first_label}): its table, plot and JSON");
    }
    print!("{}", report::table(&results, args.rate));
    let vs_kernel = report::ratio(&results, "ocelot", "kernel");
    let vs_raw = report::ratio(&results, "ocelot", "raw-xsk");
    let fmt_ratio = |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{r:.2}"));
    println!(
        "max pps ratios: ocelot/kernel {}, ocelot/raw-xsk {}",
        fmt_ratio(vs_kernel),
        fmt_ratio(vs_raw)
    );
    for (name, reason) in &refused {
        println!("{name}: not reported: {reason}");
    }
    for r in results
        .iter()
        .filter(|r| r.rounds.iter().any(|x| x.swaps > 0))
    {
        let swaps: u64 = r.rounds.iter().map(|x| x.swaps).sum();
        let lost: u64 = r.rounds.iter().map(|x| x.lost_at_rate).sum();
        println!(
            "{}: {swaps} table swaps under load, {lost} allowed frames lost{}",
            r.name,
            if lost == 0 { "" } else { " (must be 0)" }
        );
    }
    for r in &results {
        let path = args.out_dir.join(format!("{}.hgrm", r.name));
        std::fs::write(&path, report::hgrm(&r.latency))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let svg = args.out_dir.join("latency.svg");
    report::svg(
        &svg,
        &results,
        &format!(
            "one-way latency at {} pps, {} B, {} flow(s), policy {policy_desc}",
            args.rate, args.size, points[0].0
        ),
    )?;
    eprintln!(
        "wrote {} and {}/<device>.hgrm",
        svg.display(),
        args.out_dir.display()
    );
    if let Some(path) = &args.json {
        let value = json!({
            "devices": results.iter().map(DeviceResult::json).collect::<Vec<_>>(),
            "ratios": { "ocelot_vs_kernel": vs_kernel, "ocelot_vs_raw": vs_raw },
            "refused": refused.iter().map(|(n, r)| json!({"name": n, "reason": r})).collect::<Vec<_>>(),
            "sweep": sweep,
            "conditions": {
                "size": args.size, "flows": points[0].0, "rate_pps": args.rate,
                "policy": policy_desc, "xdp_mode": format!("{:?}", args.xdp_mode),
                "gen_core": gen_core, "device_core": device_core, "sink_core": sink_core,
                "ocelot_workers": args.workers, "pairs": args.pairs, "swap_every_ms": args.swap_every_ms,
                "cores": cores, "kernel": kernel, "cpu": cpu_model(),
                "rounds": t.rounds, "duration_s": t.duration.as_secs_f64(),
                "load_start": load_start, "load_end": load_end,
            },
        });
        crate::write_json(path, &value)?;
    }
    if !refused.is_empty() {
        bail!("{} device(s) refused: see above", refused.len());
    }
    Ok(())
}

/// Devices that refused, with the reason.
type Refused = Vec<(&'static str, String)>;

/// What one point of a run measured: the devices reported and those refused.
type PointResult = (Vec<DeviceResult>, Refused);

/// One point: `rounds` rounds of every device, alternating.
#[allow(clippy::too_many_arguments)] // The run's whole context, passed once per point.
fn measure_point(
    devices: &[Device],
    tb: &Testbed,
    dopts: &DeviceOpts,
    traffic: &mut [Traffic],
    args: &Args,
    t: Timing,
    swap: Option<Duration>,
    stop: &AtomicBool,
) -> Result<PointResult> {
    let mut results: Vec<DeviceResult> = Vec::new();
    for d in devices {
        if !results.iter().any(|r| r.name == d.name()) {
            results.push(DeviceResult {
                name: d.name(),
                rounds: Vec::new(),
                latency: traffic::new_histogram()?,
            });
        }
    }
    let mut refused: Refused = Vec::new();
    for round in 1..=t.rounds {
        for &device in devices {
            if refused.iter().any(|(n, _)| *n == device.name()) {
                continue;
            }
            let progress = |what: &str| {
                eprintln!("round {round}/{} {:<7} {what}", t.rounds, device.name());
            };
            match measure(device, tb, dopts, traffic, args, t, swap, stop, &progress)? {
                Outcome::Refused(reason) => {
                    eprintln!("REFUSED {}: {reason}", device.name());
                    refused.push((device.name(), reason));
                }
                Outcome::Measured(fig, hist) => {
                    if let Some(r) = results.iter_mut().find(|r| r.name == device.name()) {
                        r.rounds.push(fig);
                        r.latency.add(&hist).context("merging histograms")?;
                    }
                }
            }
        }
    }
    results.retain(|r| !r.rounds.is_empty());
    Ok((results, refused))
}

/// Why a device whose testbed delivered less than half of the lowest rate's frames is not
/// reported: at a rate far below any device's saturation, that is a broken testbed (a
/// policy that denies the traffic, a missing route, an unattached interface), and any figure
/// measured on it would be meaningless. `None` when the delivery is plausible.
fn misconfigured(sent: u64, received: u64, rate: u64) -> Option<String> {
    if sent > 0 && received.saturating_mul(2) >= sent {
        return None;
    }
    Some(format!(
        "its testbed delivered {received} of {sent} frames ({:.1} %) at {rate} pps, the \
         lowest rate: a misconfiguration, not a speed",
        100.0 * received as f64 / sent.max(1) as f64,
    ))
}

enum Outcome {
    Refused(String),
    Measured(RoundFigures, hdrhistogram::Histogram<u64>),
}

#[allow(clippy::too_many_arguments)] // One round of one device: the run's whole context.
fn measure(
    device: Device,
    tb: &Testbed,
    dopts: &DeviceOpts,
    traffic: &mut [Traffic],
    args: &Args,
    t: Timing,
    swap: Option<Duration>,
    stop: &AtomicBool,
    progress: &dyn Fn(&str),
) -> Result<Outcome> {
    let running = testbed::start(device, tb, dopts)
        .with_context(|| format!("starting device {}", device.name()))?;
    // Let libxdp's programs and the first fills settle.
    std::thread::sleep(Duration::from_millis(100));
    let agent = running.pid();
    let mut trial = |rate: Option<u64>,
                     dur: Duration,
                     cpu: Option<&mut CpuSample>|
     -> Result<(TrialFigures, traffic::SinkCounts)> {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let mut cpu_start = CpuSample::default();
        let (g, c) = traffic::trial(traffic, dopts.flows, rate, t.warmup, dur, t.drain, || {
            cpu_start = cpu_sample(agent).unwrap_or_default();
        })?;
        let end = cpu_sample(agent)?;
        let used = CpuSample {
            testbed: end.testbed.saturating_sub(cpu_start.testbed),
            machine: end.machine.saturating_sub(cpu_start.machine),
        };
        if let Some(cpu) = cpu {
            *cpu = used;
        }
        let secs = g.secs.max(1e-9);
        let fig = TrialFigures {
            sent: g.sent,
            received: c.received,
            cpu_ns: used.testbed,
            offered_pps: g.sent as f64 / secs,
            delivered_pps: c.received as f64 / secs,
            loss: if g.sent == 0 {
                1.0
            } else {
                1.0 - c.received as f64 / g.sent as f64
            },
        };
        progress(&format!(
            "offered {:>9} → sent {:>9.0} pps, delivered {:>9.0} pps, loss {:>7.3}%{}",
            rate.map_or("max".to_owned(), |r| r.to_string()),
            fig.offered_pps,
            fig.delivered_pps,
            100.0 * fig.loss,
            if c.duplicated + c.reordered + c.stale > 0 {
                format!(
                    " (dup {} reord {} stale {})",
                    c.duplicated, c.reordered, c.stale
                )
            } else {
                String::new()
            }
        ));
        Ok((fig, c))
    };
    let (sanity, _) = trial(Some(args.low_rate), t.sanity, None)?;
    if let Some(reason) = misconfigured(sanity.sent, sanity.received, args.low_rate) {
        drop(running);
        return Ok(Outcome::Refused(reason));
    }
    const MAX_LOSS: f64 = 0.001;
    let mut fig = RoundFigures::default();
    let note = |f: &TrialFigures, fig: &mut RoundFigures| {
        if f.loss <= MAX_LOSS && f.delivered_pps > fig.max_pps {
            fig.max_pps = f.delivered_pps;
            // At the highest loss-free rate the device is busy rather than idling, so its
            // CPU per packet is work, not polling.
            fig.cpu_ns_per_packet_at_max = f.cpu_ns as f64 / f.received.max(1) as f64;
        }
        if f.received == f.sent {
            fig.max_pps_zero_loss = fig.max_pps_zero_loss.max(f.delivered_pps);
        }
    };
    note(&sanity, &mut fig);
    let (unpaced, _) = trial(None, t.duration, None)?;
    fig.max_delivered_pps = unpaced.delivered_pps;
    note(&unpaced, &mut fig);
    let (mut lo, mut hi) = (args.low_rate as f64, unpaced.offered_pps);
    for _ in 0..t.steps {
        if unpaced.loss <= MAX_LOSS || hi <= lo {
            break;
        }
        let mid = (lo + hi) / 2.0;
        let (f, _) = trial(Some(mid as u64), t.duration, None)?;
        note(&f, &mut fig);
        if f.loss <= MAX_LOSS {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut cpu = CpuSample::default();
    // Table swaps run during the fixed-rate trial only, so its loss and latency tail are the
    // swaps' (a swapper's own CPU time is the kernel's or the agent's work, and counts).
    let swapper = match swap {
        Some(period) => testbed::Swapper::start(device, tb, dopts, period)?,
        None => None,
    };
    let (fixed, counts) = trial(Some(args.rate), t.duration, Some(&mut cpu))?;
    if let Some(s) = swapper {
        let swaps = s.stop()?;
        progress(&format!("{swaps} table swaps during the fixed-rate trial"));
        fig.swaps = swaps;
    }
    note(&fixed, &mut fig);
    fig.loss_at_rate = fixed.loss;
    fig.cpu_ns_per_packet = cpu.testbed as f64 / fixed.received.max(1) as f64;
    fig.machine_cpu_ns_per_packet = cpu.machine as f64 / fixed.received.max(1) as f64;
    fig.reordered = counts.reordered;
    fig.duplicated = counts.duplicated;
    fig.lost_at_rate = fixed.sent.saturating_sub(fixed.received);
    let summary = running
        .stop()
        .with_context(|| format!("stopping device {}", device.name()))?;
    if !summary.is_empty() {
        progress(&summary);
    }
    Ok(Outcome::Measured(fig, counts.latency))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_testbed_that_loses_half_at_the_lowest_rate_is_refused() {
        fn check(sent: u64, received: u64, refused: bool) {
            let got = misconfigured(sent, received, 10_000);
            assert_eq!(got.is_some(), refused, "{sent} {received}: {got:?}");
            if let Some(reason) = got {
                assert!(
                    reason.contains(&format!("{received} of {sent} frames")),
                    "{reason}"
                );
                assert!(reason.contains("10000 pps"), "{reason}");
            }
        }
        check(10_000, 10_000, false);
        check(10_000, 5_000, false);
        check(10_000, 4_999, true);
        check(10_000, 0, true);
        // Nothing sent at all (the generator could not transmit) is refused as well.
        check(0, 0, true);
    }

    #[test]
    fn stat_ticks_adds_utime_and_stime_after_any_command_name() {
        fn check(stat: &str, want: Option<u64>) {
            assert_eq!(stat_ticks(stat), want, "{stat}");
        }
        let tail = "S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        check(&format!("42 (ocelot) {tail}"), Some(333));
        check(&format!("42 (a b) c)) {tail}"), Some(333));
        check("42 (short) S 1 2", None);
        check("no parenthesis", None);
        assert!(process_ticks("self").is_ok());
    }
}
