//! The generator and the sink: one AF_XDP socket each, on the generator pod's and the sink
//! pod's eth0, each on its own thread that entered the pod's namespace and pinned itself.
//!
//! Both live for the whole run (all devices, all rounds), so every device sees the same
//! sender and receiver. The main thread drives them by trial: it tells the sink which trial
//! is current, asks the generator to send one (a warm-up, then the measured part, paced or as
//! fast as the tx ring takes frames), waits for the stragglers, then moves the sink to the
//! next trial and takes the finished counts.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dataplane::port::{BURST, FrameMem, Rx, Tx};
use dataplane::sys::{self, SocketOpts, UmemOpts};
use hdrhistogram::Histogram;

use super::frame::{self, Endpoints, Stamp};

/// Highest latency the histograms hold (longer ones are clamped to it): 10 s.
const MAX_LATENCY_NS: u64 = 10_000_000_000;

/// One trial the generator sends.
#[derive(Debug, Clone, Copy)]
pub struct GenCmd {
    /// Trial number (15 bits; 0 is never used, so a fresh sink counts nothing as current).
    pub trial: u16,
    /// Offered rate in frames per second; `None` = as fast as the tx ring takes them.
    pub rate: Option<u64>,
    /// Warm-up time (frames sent but not counted).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Distinct flows, sent round robin.
    pub flows: u32,
}

/// What the generator did in a trial.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenResult {
    /// Measured frames put on the tx ring (sequence numbers `0..sent`).
    pub sent: u64,
    /// Measured seconds (the trial's duration).
    pub secs: f64,
}

/// What the sink counted in a trial (measured frames only).
#[derive(Debug, Clone)]
pub struct SinkCounts {
    /// Distinct measured frames received.
    pub received: u64,
    /// Frames whose sequence number had already been received.
    pub duplicated: u64,
    /// Frames that arrived after a higher sequence number.
    pub reordered: u64,
    /// Frames of an earlier trial, or not ours at all.
    pub stale: u64,
    /// One-way latency of each distinct measured frame, ns.
    pub latency: Histogram<u64>,
}

impl SinkCounts {
    fn new() -> Result<SinkCounts> {
        Ok(SinkCounts {
            received: 0,
            duplicated: 0,
            reordered: 0,
            stale: 0,
            latency: new_histogram()?,
        })
    }
}

/// A latency histogram: 1 ns to 10 s, 3 significant digits.
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("creating a histogram")
}

/// Per-trial bookkeeping of the sink; allocates only when a trial starts and when the
/// sequence bitmap grows.
struct SinkTrial {
    trial: u16,
    counts: SinkCounts,
    seen: Vec<u64>,
    highest: Option<u64>,
}

/// The most sequence numbers the sink tracks per trial (a 128 MiB bitmap); frames beyond are
/// counted as stale rather than letting a corrupt number allocate without bound.
const MAX_SEQ: u64 = 1 << 30;

impl SinkTrial {
    fn record(&mut self, stamp: Option<Stamp>, now_ns: u64) {
        let Some(s) = stamp else {
            self.counts.stale += 1;
            return;
        };
        if s.trial != self.trial || s.seq >= MAX_SEQ {
            self.counts.stale += 1;
            return;
        }
        if s.warmup {
            return;
        }
        let word = (s.seq / 64) as usize;
        let bit = 1u64 << (s.seq % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit != 0 {
            self.counts.duplicated += 1;
            return;
        }
        self.seen[word] |= bit;
        match self.highest {
            Some(h) if s.seq < h => self.counts.reordered += 1,
            _ => self.highest = Some(s.seq),
        }
        self.counts.received += 1;
        let latency = now_ns.saturating_sub(s.sent_ns).clamp(1, MAX_LATENCY_NS);
        // In bounds by the clamp above.
        let _ = self.counts.latency.record(latency);
    }
}

/// State the sink shares with the main thread.
#[derive(Debug)]
struct SinkShared {
    /// The trial the main thread wants counted.
    want: AtomicU16,
    /// The trial the sink is counting now (it has switched when this equals `want`).
    current: AtomicU16,
    /// The counts of the trial the sink switched away from last.
    finished: Mutex<Option<(u16, SinkCounts)>>,
}

/// Options both threads use.
#[derive(Debug, Clone, Copy)]
pub struct XskSetup {
    /// Socket options.
    pub socket: SocketOpts,
    /// Frames per UMEM.
    pub frames: u32,
}

/// The running generator and sink.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    gen_tx: Option<mpsc::Sender<GenCmd>>,
    gen_rx: mpsc::Receiver<Result<GenResult>>,
    sink: Arc<SinkShared>,
    threads: Vec<JoinHandle<Result<()>>>,
    next_trial: u16,
}

/// Where the two threads run.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The generator pod's namespace.
    pub gen_ns: String,
    /// The sink pod's namespace.
    pub sink_ns: String,
    /// Core of the generator thread.
    pub gen_core: Option<usize>,
    /// Core of the sink thread.
    pub sink_core: Option<usize>,
}

impl Traffic {
    /// Starts the sink and the generator; returns once both sockets are open.
    pub fn start(
        place: &Placement,
        ep: Endpoints,
        frame_len: usize,
        setup: XskSetup,
        epoch: Instant,
    ) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let sink = Arc::new(SinkShared {
            want: AtomicU16::new(0),
            current: AtomicU16::new(0),
            finished: Mutex::new(None),
        });
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();

        let (ns, core, s, shared, ready) = (
            place.sink_ns.clone(),
            place.sink_core,
            Arc::clone(&stop),
            Arc::clone(&sink),
            ready_tx.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name("xbench-sink".into())
                .spawn(move || sink_thread(&ns, core, setup, ep.dst_ip, epoch, &s, &shared, ready))
                .context("spawning the sink thread")?,
        );
        wait_ready(&ready_rx, "sink")?;

        let (gen_tx, gen_cmds) = mpsc::channel::<GenCmd>();
        let (gen_res_tx, gen_rx) = mpsc::channel::<Result<GenResult>>();
        let (ns, core, s) = (place.gen_ns.clone(), place.gen_core, Arc::clone(&stop));
        threads.push(
            std::thread::Builder::new()
                .name("xbench-gen".into())
                .spawn(move || {
                    gen_thread(
                        &ns, core, setup, ep, frame_len, epoch, &s, gen_cmds, gen_res_tx, ready_tx,
                    )
                })
                .context("spawning the generator thread")?,
        );
        let traffic = Traffic {
            stop,
            gen_tx: Some(gen_tx),
            gen_rx,
            sink,
            threads,
            next_trial: 1,
        };
        wait_ready(&ready_rx, "generator")?;
        Ok(traffic)
    }

    /// Starts a trial: the sink counts it, the generator sends it. Returns its number.
    fn begin(
        &mut self,
        flows: u32,
        rate: Option<u64>,
        warmup: Duration,
        duration: Duration,
    ) -> Result<u16> {
        let trial = self.next_trial;
        self.next_trial = if trial >= 0x7fff { 1 } else { trial + 1 };
        self.switch_sink(trial)?;
        let gen_tx = self
            .gen_tx
            .as_ref()
            .ok_or_else(|| anyhow!("generator stopped"))?;
        gen_tx
            .send(GenCmd {
                trial,
                rate,
                warmup,
                duration,
                flows,
            })
            .map_err(|_| anyhow!("the generator thread has exited"))?;
        Ok(trial)
    }

    /// Waits for the generator to finish the current trial.
    fn wait_sent(&mut self) -> Result<GenResult> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            match self.gen_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the generator thread has exited")
                }
            }
        }
    }

    /// Moves the sink on from `trial` and returns what it counted.
    fn collect(&mut self, trial: u16) -> Result<SinkCounts> {
        let next = self.next_trial;
        self.switch_sink(next)?;
        let finished = self
            .sink
            .finished
            .lock()
            .map_err(|_| anyhow!("sink state poisoned"))?
            .take();
        match finished {
            Some((t, counts)) if t == trial => Ok(counts),
            _ => bail!("the sink did not hand back trial {trial}"),
        }
    }

    /// Makes the sink count trial `n` and waits until it does.
    fn switch_sink(&self, n: u16) -> Result<()> {
        self.sink.want.store(n, Ordering::Release);
        let start = Instant::now();
        while self.sink.current.load(Ordering::Acquire) != n {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("the sink thread does not answer");
            }
            if self.stop.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Stops both threads and reports the first error either had.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.gen_tx = None;
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = t
                .join()
                .map_err(|_| anyhow!("a traffic thread panicked"))
                .and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // The threads' sockets must be closed (and libxdp's programs detached) before the
        // namespaces go; joining here guarantees it on every exit path.
        let _ = self.shutdown();
    }
}

fn wait_ready(rx: &mpsc::Receiver<Result<()>>, what: &str) -> Result<()> {
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r.with_context(|| format!("starting the {what}")),
        Err(_) => bail!("the {what} thread did not start"),
    }
}

/// Enters `ns`, pins to `core`, and opens a UMEM and a socket on eth0 queue 0.
fn open_eth0(
    ns: &str,
    core: Option<usize>,
    setup: XskSetup,
) -> Result<(sys::XskUmem, Vec<sys::XskFrame>, sys::XskRx, sys::XskTx)> {
    if let Some(core) = core {
        sys::pin_current_thread(core)?;
    }
    sys::enter_netns(ns)?;
    let (mut umem, frames) = sys::XskUmem::new(UmemOpts {
        frames: setup.frames,
        ..UmemOpts::default()
    })?;
    let (rx, tx) = umem.open("eth0", 0, &setup.socket)?;
    Ok((umem, frames, rx, tx))
}

#[allow(clippy::too_many_arguments)] // A thread body: everything it owns, passed once.
fn sink_thread(
    ns: &str,
    core: Option<usize>,
    setup: XskSetup,
    dst_ip: Ipv4Addr,
    epoch: Instant,
    stop: &AtomicBool,
    shared: &SinkShared,
    ready: mpsc::Sender<Result<()>>,
) -> Result<()> {
    let (umem, mut free, mut rx, _tx) = match open_eth0(ns, core, setup) {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow!("{e:#}")));
            return Ok(());
        }
    };
    let mut burst = Vec::with_capacity(BURST);
    let mut trial = SinkTrial {
        trial: 0,
        counts: SinkCounts::new()?,
        seen: Vec::new(),
        highest: None,
    };
    let mut empty = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let want = shared.want.load(Ordering::Acquire);
        if want != trial.trial {
            let old = std::mem::replace(
                &mut trial,
                SinkTrial {
                    trial: want,
                    counts: SinkCounts::new()?,
                    seen: Vec::with_capacity(1 << 16),
                    highest: None,
                },
            );
            *shared
                .finished
                .lock()
                .map_err(|_| anyhow!("sink state poisoned"))? = Some((old.trial, old.counts));
            shared.current.store(want, Ordering::Release);
        }
        rx.fill(&mut free, usize::MAX)?;
        let n = rx.recv(&mut burst, BURST)?;
        if n == 0 {
            // Spin a little, then sleep in poll: the sink shares cores with the generator and
            // the device, and must not take their time when there is nothing to count.
            empty += 1;
            if empty > 256
                && let Some(fd) = rx.fd()
            {
                sys::poll_readable([fd], 1)?;
            }
            continue;
        }
        empty = 0;
        let now = epoch.elapsed().as_nanos() as u64;
        for f in burst.iter_mut() {
            let stamp = umem.with_bytes_mut(f, |b| frame::read_stamp(b, dst_ip));
            trial.record(stamp, now);
        }
        free.append(&mut burst);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // A thread body: everything it owns, passed once.
fn gen_thread(
    ns: &str,
    core: Option<usize>,
    setup: XskSetup,
    ep: Endpoints,
    frame_len: usize,
    epoch: Instant,
    stop: &AtomicBool,
    cmds: mpsc::Receiver<GenCmd>,
    results: mpsc::Sender<Result<GenResult>>,
    ready: mpsc::Sender<Result<()>>,
) -> Result<()> {
    let (umem, mut free, _rx, mut tx) = match open_eth0(ns, core, setup) {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow!("{e:#}")));
            return Ok(());
        }
    };
    let template = frame::template(&ep, frame_len);
    for f in free.iter_mut() {
        umem.set_len(f, template.len());
        umem.with_bytes_mut(f, |b| b.copy_from_slice(&template));
    }
    let mut pending: Vec<sys::XskFrame> = Vec::with_capacity(BURST);
    // The round robin over flows continues from trial to trial (restarting only when the
    // number of flows changes), so a device's trials together reach every flow even when
    // one trial sends fewer frames than there are flows.
    let mut flow = 0u32;
    let mut flows = 0u32;
    while let Ok(cmd) = cmds.recv() {
        if cmd.flows != flows {
            flows = cmd.flows;
            flow = 0;
        }
        let result = send_trial(
            &cmd,
            &umem,
            &mut tx,
            &mut free,
            &mut pending,
            &mut flow,
            cmd.flows.max(1),
            epoch,
            stop,
            template.len(),
        );
        if results.send(result).is_err() {
            break;
        }
    }
    Ok(())
}

/// Sends one trial. Frames keep the template's bytes between uses (the completion ring hands
/// them back untouched), so only the ports and the stamp are written per frame.
#[allow(clippy::too_many_arguments)] // The generator's loop state, borrowed for one trial.
fn send_trial(
    cmd: &GenCmd,
    umem: &sys::XskUmem,
    tx: &mut sys::XskTx,
    free: &mut Vec<sys::XskFrame>,
    pending: &mut Vec<sys::XskFrame>,
    flow: &mut u32,
    flows: u32,
    epoch: Instant,
    stop: &AtomicBool,
    len: usize,
) -> Result<GenResult> {
    let start = Instant::now();
    let warm_end = start + cmd.warmup;
    let end = warm_end + cmd.duration;
    // Paced bursts hold at most 50 µs of frames, so pacing adds little queueing latency.
    let max_burst = match cmd.rate {
        None => BURST,
        Some(r) => ((r / 20_000) as usize).clamp(1, BURST),
    };
    let mut offered = 0u64; // frames due so far, warm-up included
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= end || stop.load(Ordering::Relaxed) {
            break;
        }
        tx.reclaim(free)?;
        if pending.is_empty() {
            let want = match cmd.rate {
                None => max_burst,
                Some(r) => {
                    let due = (u128::from(r) * now.duration_since(start).as_nanos() / 1_000_000_000)
                        as u64;
                    let behind = due.saturating_sub(offered) as usize;
                    if behind == 0 {
                        // Ahead of schedule: sleep until the next frame is due, however short
                        // that is. Spinning instead would starve the sink, which shares the
                        // generator's core on a small machine; the timer's slack (~50 µs) is
                        // made up by the next, slightly larger burst.
                        let next_ns = (offered + 1) * 1_000_000_000 / r.max(1);
                        let wait =
                            Duration::from_nanos(next_ns).saturating_sub(now.duration_since(start));
                        std::thread::sleep(wait.max(Duration::from_micros(5)));
                        continue;
                    }
                    behind.min(max_burst)
                }
            };
            let warmup = now < warm_end;
            let sent_ns = epoch.elapsed().as_nanos() as u64;
            let take = want.min(free.len());
            for mut f in free.drain(free.len() - take..) {
                umem.set_len(&mut f, len);
                let stamp = Stamp {
                    seq: if warmup { 0 } else { seq },
                    sent_ns,
                    trial: cmd.trial,
                    warmup,
                };
                umem.with_bytes_mut(&mut f, |b| {
                    frame::set_flow(b, *flow);
                    frame::write_stamp(b, &stamp);
                });
                *flow = if *flow + 1 >= flows { 0 } else { *flow + 1 };
                if !warmup {
                    seq += 1;
                }
                pending.push(f);
            }
            offered += take as u64;
            if let Some(r) = cmd.rate {
                // A paced generator that fell more than a millisecond behind (the ring or
                // the free list was short) does not try to make up for it in one go: frames
                // beyond that backlog are forgiven, not owed.
                let due =
                    (u128::from(r) * now.duration_since(start).as_nanos() / 1_000_000_000) as u64;
                let slack = r / 1000 + BURST as u64;
                offered = offered.max(due.saturating_sub(slack));
            }
        }
        tx.send(pending)?;
        tx.flush()?;
    }
    // Frames stamped but not yet queued are part of the trial: send them before reporting.
    let drain_start = Instant::now();
    while !pending.is_empty() || tx.in_flight() > 0 {
        if drain_start.elapsed() > Duration::from_secs(1) {
            bail!(
                "the generator's tx ring did not drain ({} frames unsent, {} in flight)",
                pending.len(),
                tx.in_flight()
            );
        }
        tx.reclaim(free)?;
        tx.send(pending)?;
        tx.flush()?;
    }
    Ok(GenResult {
        sent: seq,
        secs: cmd.duration.as_secs_f64(),
    })
}

/// Runs one trial on every generator/sink pair at once, each offering `rate / pairs`: all
/// sinks count it, all generators send it (a warm-up, then the measured part), then after
/// `drain` the sinks move on. Returns the sums over the pairs (latencies merged).
#[allow(clippy::too_many_arguments)] // One trial's parameters.
pub fn trial(
    pairs: &mut [Traffic],
    flows: u32,
    rate: Option<u64>,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    mut at_measure_start: impl FnMut(),
) -> Result<(GenResult, SinkCounts)> {
    let n = pairs.len().max(1) as u64;
    let mut trials = Vec::with_capacity(pairs.len());
    for p in pairs.iter_mut() {
        trials.push(p.begin(flows, rate.map(|r| (r / n).max(1)), warmup, duration)?);
    }
    std::thread::sleep(warmup);
    at_measure_start();
    let mut sent = GenResult::default();
    for p in pairs.iter_mut() {
        let g = p.wait_sent()?;
        sent.sent += g.sent;
        sent.secs = sent.secs.max(g.secs);
    }
    std::thread::sleep(drain);
    let mut total = SinkCounts::new()?;
    for (p, t) in pairs.iter_mut().zip(trials) {
        let c = p.collect(t)?;
        total.received += c.received;
        total.duplicated += c.duplicated;
        total.reordered += c.reordered;
        total.stale += c.stale;
        total
            .latency
            .add(&c.latency)
            .context("merging histograms")?;
    }
    Ok((sent, total))
}
