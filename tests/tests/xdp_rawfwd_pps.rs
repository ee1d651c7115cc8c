//! Packet rate through the bare AF_XDP forwarder on the pod-a / node / pod-b veth topology:
//! a bounded UDP flood (64-byte frames) from pod-a to pod-b, counted at pod-b's eth0.
//! Ignored by default (it measures, it does not check); run it with an optimised dataplane:
//!
//! ```text
//! nice -n 15 cargo test -p ocelot-tests --test xdp_rawfwd_pps \
//!     --config 'profile.dev.package.dataplane.opt-level=3' -- --ignored --nocapture
//! ```
//!
//! Two generators: one thread doing one `sendto` per datagram through pod-a's kernel stack
//! (realistic, but slow: it bounds the figure), and an AF_XDP transmitter on pod-a's eth0
//! that sends prebuilt frames in bursts (built on `dataplane::sys`, so it needs no other
//! tool). The test prints the offered and the delivered rate and the forwarder's and
//! kernel's drop counters, so the limit can be told apart.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use classifier::verdict::{DropReason, PortId};
use dataplane::port::{BURST, FrameMem, Tx};
use dataplane::rawfwd::{self, FwdConfig, Idle, MacRewrite, Side};
use dataplane::sys::{self, BindMode, SocketOpts, UmemOpts, XdpMode};
use dataplane::worker::{Worker, WorkerPort};
use ocelot_tests::netns::{Netns, VirtualNode};
use ocelot_tests::xdp::CrossConnect;

const POD_A: &str = "10.66.0.1";
const POD_B: &str = "10.66.0.2";
const PACKETS: u64 = 300_000;

fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns
        .exec_ok(&[
            "cat",
            &format!("/sys/class/net/{dev}/statistics/rx_packets"),
        ])
        .unwrap();
    out.trim().parse().expect("a number")
}

/// How the flood is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generator {
    /// `sendto` on a UDP socket in pod-a.
    Socket,
    /// Prebuilt frames through an AF_XDP socket on pod-a's eth0.
    Xsk,
}

/// A 60-byte Ethernet/IPv4/UDP frame from pod-a to pod-b's port 9 (UDP checksum 0, which
/// IPv4 allows).
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let src: std::net::Ipv4Addr = POD_A.parse().unwrap();
    let dst: std::net::Ipv4Addr = POD_B.parse().unwrap();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&46u16.to_be_bytes()); // 20 + 8 + 18
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0u8; 18]);
    f
}

/// Sends `count` copies of `frame` through an AF_XDP socket on `dev` in namespace `ns`, as
/// fast as the tx ring takes them. Returns how long it took.
fn xsk_blast(ns: &str, dev: &str, frame: Vec<u8>, count: u64) -> Duration {
    let ns = ns.to_owned();
    let dev = dev.to_owned();
    std::thread::spawn(move || {
        sys::enter_netns(&ns).unwrap();
        let (mut umem, mut free) = sys::XskUmem::new(UmemOpts {
            frames: 4096,
            ..UmemOpts::default()
        })
        .unwrap();
        let opts = SocketOpts {
            xdp_mode: XdpMode::Generic,
            ..SocketOpts::default()
        };
        let (_rx, mut tx) = umem.open(&dev, 0, &opts).unwrap();
        for f in &mut free {
            umem.set_len(f, frame.len());
            umem.with_bytes_mut(f, |b| b.copy_from_slice(&frame));
        }
        let mut pending = Vec::with_capacity(BURST);
        let mut sent = 0u64;
        let start = Instant::now();
        while sent < count {
            tx.reclaim(&mut free).unwrap();
            let want = (count - sent).min(BURST as u64) as usize;
            let take = want.min(free.len());
            // A reclaimed frame comes back with length 0 (its contents are stale as far as
            // the rings know); the bytes written at start are still there.
            for mut f in free.drain(free.len() - take..) {
                umem.set_len(&mut f, frame.len());
                pending.push(f);
            }
            sent += tx.send(&mut pending).unwrap() as u64;
            free.append(&mut pending);
            tx.flush().unwrap();
        }
        while tx.in_flight() > 0 && start.elapsed() < Duration::from_secs(10) {
            tx.flush().unwrap();
            tx.reclaim(&mut free).unwrap();
        }
        start.elapsed()
    })
    .join()
    .expect("generator thread")
}

/// What forwards between vA and vB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    /// `dataplane::rawfwd`: the trivial rx→tx forwarder (the `raw-xsk` baseline).
    RawXsk,
    /// `dataplane::worker` with a stand-in classifier that forwards and sets MACs: the
    /// worker loop's own cost over the baseline (swap in `worker::Pipeline` once the
    /// classifier is done).
    Worker,
    /// `dataplane::worker` with the real classifier (`worker::Pipeline`): parse, RPF,
    /// route, conntrack, policy (allow-all: two pods, no policy), rewrite — what `ocelot run`
    /// does per frame.
    Pipeline,
}

/// The two pods as manifests, and the snapshot `ocelot run` would build for them.
fn pipeline_snapshot(vn: &VirtualNode) -> classifier::snapshot::Snapshot {
    use control::node::{NodeOptions, PortRole, PortSpec, build_snapshot};
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: default}}\nstatus: {{podIPs: [{{ip: {POD_A}}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: default}}\nstatus: {{podIPs: [{{ip: {POD_B}}}]}}\n"
    );
    let manifests =
        control::Manifests::from_texts([(std::path::PathBuf::from("pods.yaml"), yaml.as_str())])
            .expect("manifests");
    let ports: Vec<Option<PortSpec>> = vn
        .pods
        .iter()
        .zip(["a", "b"])
        .map(|(pod, name)| {
            Some(PortSpec {
                name: pod.host_dev.clone(),
                mac: vn.node.mac(&pod.host_dev).unwrap(),
                role: PortRole::Pod {
                    namespace: "default".into(),
                    name: name.into(),
                    pod_mac: Some(pod.mac),
                },
            })
        })
        .collect();
    build_snapshot(&manifests, &ports, &NodeOptions::default(), 1).0
}

/// Starts a worker owning vA (port 0) and vB (port 1) on its own thread; the returned
/// closure stops it and reports its counters.
fn start_worker<C: dataplane::worker::Classify + Send + 'static>(
    netns: &str,
    config: FwdConfig,
    classify: C,
) -> Box<dyn FnOnce() -> String> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let netns = netns.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        if let Some(core) = config.core {
            sys::pin_current_thread(core).unwrap();
        }
        sys::enter_netns(&netns).unwrap();
        let (mut umem, frames) = sys::XskUmem::new(config.umem).unwrap();
        let mut ports = Vec::new();
        for (i, dev) in ["vA", "vB"].into_iter().enumerate() {
            let (rx, tx) = umem.open(dev, 0, &config.socket).unwrap();
            ports.push(WorkerPort {
                id: PortId(i as u16),
                rx,
                tx,
            });
        }
        let mut worker = Worker::new(umem, frames, ports, classify).unwrap();
        ready_tx.send(()).unwrap();
        worker.run(&thread_stop, config.idle).unwrap();
        *worker.counters()
    });
    ready_rx.recv().expect("worker started");
    Box::new(move || {
        stop.store(true, Ordering::Relaxed);
        let c = handle.join().expect("worker thread");
        format!(
            "  worker: rx {} tx {} tx_full {}",
            c.rx,
            c.tx,
            c.dropped(DropReason::TxFull)
        )
    })
}

fn measure(label: &str, device: Device, generator: Generator, socket: SocketOpts, idle: Idle) {
    let vn = VirtualNode::new(&[("pod-a", POD_A, "vA"), ("pod-b", POD_B, "vB")]).unwrap();
    let (node, pod_a, pod_b) = (&vn.node, &vn.pods[0].ns, &vn.pods[1].ns);
    let side = |host: &str, pod: &Netns| Side {
        interface: host.into(),
        queue: 0,
        rewrite: MacRewrite {
            dst: pod.mac("eth0").unwrap(),
            src: node.mac(host).unwrap(),
        },
    };
    // The forwarder on the last core; the generator and the kernel's receive work share the
    // rest.
    let last_core = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    let config = FwdConfig {
        socket,
        idle,
        core: Some(last_core),
        ..FwdConfig::default()
    };
    let stop_device: Box<dyn FnOnce() -> String> = match device {
        Device::RawXsk => {
            let fwd = rawfwd::spawn_pair(node.name(), side("vA", pod_a), side("vB", pod_b), config)
                .expect("forwarder starts");
            Box::new(move || {
                let report = fwd.stop().expect("forwarder ran cleanly");
                report
                    .iter()
                    .map(|(name, c, k)| format!("  {name}: {c:?} {k:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Device::Worker => {
            let macs = [
                (pod_a.mac("eth0").unwrap(), node.mac("vA").unwrap()),
                (pod_b.mac("eth0").unwrap(), node.mac("vB").unwrap()),
            ];
            start_worker(node.name(), config, CrossConnect { macs })
        }
        Device::Pipeline => {
            let ct = Arc::new(classifier::conntrack::Conntrack::new(Default::default()));
            let clock: fn() -> classifier::Nanos = || {
                static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
            };
            let pipeline = dataplane::worker::Pipeline::fixed(ct, pipeline_snapshot(&vn), clock);
            start_worker(node.name(), config, pipeline)
        }
    };

    // A bound socket in pod-b that is never read: datagrams are counted at eth0 and no ICMP
    // port-unreachable flows back.
    let _sink = sys::in_netns(pod_b.name(), || UdpSocket::bind((POD_B, 9)))
        .unwrap()
        .unwrap();
    let sender = sys::in_netns(pod_a.name(), || UdpSocket::bind((POD_A, 0)))
        .unwrap()
        .unwrap();
    sender.connect((POD_B, 9)).unwrap();
    let payload = [0u8; 18]; // 14 + 20 + 8 + 18 = 60-byte frames (64 on a wire with FCS).
    // Warm up (and let the first fills settle), then measure.
    for _ in 0..1000 {
        let _ = sender.send(&payload);
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = rx_packets(pod_b, "eth0");
    let mut send_errors = 0u64;
    let sent_in = match generator {
        Generator::Socket => {
            let start = Instant::now();
            for _ in 0..PACKETS {
                if sender.send(&payload).is_err() {
                    send_errors += 1;
                }
            }
            start.elapsed()
        }
        Generator::Xsk => {
            let frame = udp_frame(node.mac("vA").unwrap(), pod_a.mac("eth0").unwrap());
            xsk_blast(pod_a.name(), "eth0", frame, PACKETS)
        }
    };
    // Let the forwarder drain, then count.
    std::thread::sleep(Duration::from_millis(300));
    let received = rx_packets(pod_b, "eth0") - before;
    if std::env::var_os("OCELOT_PPS_DEBUG").is_some() {
        eprintln!("{}", pod_a.ip(&["-s", "link", "show", "eth0"]).unwrap());
        eprintln!("{}", node.ip(&["-s", "link", "show", "vA"]).unwrap());
        eprintln!(
            "{}",
            node.exec_ok(&["cat", "/proc/net/softnet_stat"]).unwrap()
        );
    }
    let report = stop_device();
    let secs = sent_in.as_secs_f64();
    eprintln!(
        "{label}: offered {PACKETS} in {:.3} s = {:.0} pps (send errors {send_errors}); \
         delivered {received} = {:.1}% → {:.0} pps forwarded",
        secs,
        PACKETS as f64 / secs,
        100.0 * received as f64 / PACKETS as f64,
        received as f64 / secs,
    );
    eprintln!("{report}");
}

/// raw-xsk, the worker loop with a stand-in classifier, and the real pipeline, alternated
/// (A B C A B C A B C) on the same topology so the machine's drift cancels.
#[test]
#[ignore = "measurement: run explicitly with --ignored --nocapture"]
fn pod_to_pod_pps_interleaved() {
    let generic = SocketOpts {
        bind: BindMode::Copy,
        xdp_mode: XdpMode::Generic,
        need_wakeup: true,
        ..SocketOpts::default()
    };
    for round in 1..=3 {
        for (label, device) in [
            ("raw-xsk", Device::RawXsk),
            ("worker loop, stand-in classifier", Device::Worker),
            ("pipeline (real classifier)", Device::Pipeline),
        ] {
            measure(
                &format!("round {round}: {label}; xsk generator; generic, need_wakeup, spin"),
                device,
                Generator::Xsk,
                generic,
                Idle::Spin,
            );
        }
    }
}

#[test]
#[ignore = "measurement: run explicitly with --ignored --nocapture"]
fn rawfwd_pps() {
    let spin = Idle::Spin;
    let base = SocketOpts {
        bind: BindMode::Copy,
        ..SocketOpts::default()
    };
    let generic = SocketOpts {
        xdp_mode: XdpMode::Generic,
        need_wakeup: true,
        ..base
    };
    measure(
        "raw-xsk; udp sendto; generic, need_wakeup, spin",
        Device::RawXsk,
        Generator::Socket,
        generic,
        spin,
    );
    measure(
        "raw-xsk; xsk; generic, need_wakeup, spin",
        Device::RawXsk,
        Generator::Xsk,
        generic,
        spin,
    );
    measure(
        "worker; xsk; generic, need_wakeup, spin",
        Device::Worker,
        Generator::Xsk,
        generic,
        spin,
    );
    measure(
        "pipeline (ocelot's worker + classifier); xsk; generic, need_wakeup, spin",
        Device::Pipeline,
        Generator::Xsk,
        generic,
        spin,
    );
    measure(
        "raw-xsk; xsk; generic, no need_wakeup, spin",
        Device::RawXsk,
        Generator::Xsk,
        SocketOpts {
            need_wakeup: false,
            ..generic
        },
        spin,
    );
    measure(
        "raw-xsk; xsk; native, need_wakeup, spin",
        Device::RawXsk,
        Generator::Xsk,
        SocketOpts {
            xdp_mode: XdpMode::Native,
            ..generic
        },
        spin,
    );
    measure(
        "raw-xsk; xsk; generic, need_wakeup, poll when idle",
        Device::RawXsk,
        Generator::Xsk,
        generic,
        Idle::Poll {
            after_empty_polls: 1000,
            linger_us: 0,
            timeout_ms: 10,
        },
    );
}
