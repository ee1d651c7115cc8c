//! Real frames through the bare AF_XDP forwarder (`dataplane::rawfwd`) on a Calico-shaped
//! virtual node: namespaces `pod-a`, `node` and `pod-b`; veth pairs pod-a/eth0 ↔ node/vA and
//! pod-b/eth0 ↔ node/vB; each pod has a /32 address and a default route via 169.254.1.1,
//! whose MAC is statically the host-side veth's (as Calico's proxy-ARP answers). The node has
//! no addresses or routes: only the forwarder, in a thread that entered `node`, connects vA
//! and vB. Pod interfaces have transmit checksum offload off (see
//! `Netns::tx_checksum_off`): AF_XDP sees frames without the "checksum still to do" mark.
//!
//! Needs root (CI runs it as root). Every namespace is the test's own and is removed by RAII
//! guards, also on panic; nothing touches the root namespace.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataplane::rawfwd::{self, FwdConfig, FwdDrop, FwdThread, MacRewrite, Side};
use dataplane::sys::{self, BusyPoll, SocketOpts, UmemOpts, XdpMode};
use ocelot_tests::netns::{self, Netns, VirtualNode};

const POD_A: &str = "10.65.0.1";
const POD_B: &str = "10.65.0.2";
const ECHO_PORT: u16 = 7777;

/// The virtual node with pod-a behind vA and pod-b behind vB.
struct Topology {
    vn: VirtualNode,
}

impl Topology {
    fn new() -> Topology {
        Topology {
            vn: VirtualNode::new(&[("pod-a", POD_A, "vA"), ("pod-b", POD_B, "vB")]).unwrap(),
        }
    }

    fn pod_a(&self) -> &Netns {
        &self.vn.pods[0].ns
    }

    fn pod_b(&self) -> &Netns {
        &self.vn.pods[1].ns
    }

    fn node(&self) -> &Netns {
        &self.vn.node
    }

    /// The forwarder's sides: frames leaving by a pod's host veth go to the pod's eth0 from
    /// that veth.
    fn sides(&self) -> (Side, Side) {
        let side = |pod: &netns::Pod| Side {
            interface: pod.host_dev.clone(),
            queue: 0,
            rewrite: MacRewrite {
                dst: pod.mac,
                src: self.vn.node.mac(&pod.host_dev).unwrap(),
            },
        };
        (side(&self.vn.pods[0]), side(&self.vn.pods[1]))
    }

    fn start(&self, socket: SocketOpts) -> FwdThread {
        let (a, b) = self.sides();
        let config = FwdConfig {
            socket,
            ..FwdConfig::default()
        };
        rawfwd::spawn_pair(self.node().name(), a, b, config).expect("forwarder starts")
    }

    fn assert_no_xdp(&self) {
        for dev in ["vA", "vB"] {
            assert!(
                !self.node().has_xdp(dev).unwrap(),
                "XDP program left on {dev}"
            );
        }
    }
}

/// A UDP echo responder on `addr` inside `ns`, on its own thread, until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, addr: SocketAddr) -> Echo {
        let socket = sys::in_netns(ns.name(), || UdpSocket::bind(addr))
            .expect("enter namespace")
            .expect("bind echo socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !thread_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        });
        Echo {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends `count` UDP requests from pod-a to pod-b's echo port and returns how many came back
/// with the same payload.
fn udp_round_trips(topo: &Topology, count: usize) -> usize {
    let client = sys::in_netns(topo.pod_a().name(), || UdpSocket::bind((POD_A, 0)))
        .expect("enter namespace")
        .expect("bind client");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut ok = 0;
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let payload = format!("ocelot echo {i}");
        client
            .send_to(payload.as_bytes(), (POD_B, ECHO_PORT))
            .expect("send");
        if let Ok((n, _)) = client.recv_from(&mut buf)
            && &buf[..n] == payload.as_bytes()
        {
            ok += 1;
        }
    }
    ok
}

fn ping(from: &Netns, to: &str, count: u32) -> std::process::Output {
    from.exec(&["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", to])
        .unwrap()
}

fn forwards_ping_and_udp(socket: SocketOpts) {
    let topo = Topology::new();
    let names = topo.vn.namespace_names();

    // Without the forwarder nothing connects the pods.
    let out = ping(topo.pod_a(), POD_B, 1);
    assert!(!out.status.success(), "ping worked without a forwarder");

    let fwd = topo.start(socket);
    assert!(topo.node().has_xdp("vA").unwrap() && topo.node().has_xdp("vB").unwrap());

    let out = ping(topo.pod_a(), POD_B, 3);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {stdout}");
    assert!(stdout.contains("3 received"), "{stdout}");

    let echo = Echo::start(
        topo.pod_b(),
        (POD_B.parse::<std::net::IpAddr>().unwrap(), ECHO_PORT).into(),
    );
    assert_eq!(udp_round_trips(&topo, 5), 5);
    drop(echo);

    let report = fwd.stop().expect("forwarder ran cleanly");
    let (name_a, a, _) = &report[0];
    let (name_b, b, _) = &report[1];
    assert_eq!((name_a.as_str(), name_b.as_str()), ("vA", "vB"));
    // 3 echo requests + 5 UDP requests went a→b; their replies b→a.
    assert!(a.rx >= 8 && b.tx >= 8, "{report:?}");
    assert!(b.rx >= 8 && a.tx >= 8, "{report:?}");
    for (_, c, _) in &report {
        assert_eq!(c.dropped(FwdDrop::TxRingFull), 0, "{report:?}");
    }
    eprintln!("forwarder report: {report:?}");

    // The forwarder's sockets are gone, and libxdp's program with them.
    topo.assert_no_xdp();
    drop(topo);
    let left = netns::list().unwrap();
    for name in names {
        assert!(!left.contains(&name), "namespace {name} left behind");
    }
}

#[test]
fn forwards_ping_and_udp_generic_xdp_need_wakeup() {
    forwards_ping_and_udp(SocketOpts {
        xdp_mode: XdpMode::Generic,
        need_wakeup: true,
        ..SocketOpts::default()
    });
}

#[test]
fn forwards_ping_and_udp_native_xdp_no_need_wakeup() {
    forwards_ping_and_udp(SocketOpts {
        xdp_mode: XdpMode::Native,
        need_wakeup: false,
        ..SocketOpts::default()
    });
}

#[test]
fn forwards_ping_and_udp_with_busy_poll() {
    forwards_ping_and_udp(SocketOpts {
        busy_poll: Some(BusyPoll {
            timeout_us: 20,
            budget: 64,
        }),
        ..SocketOpts::default()
    });
}

#[test]
fn xdp_program_is_detached_when_the_forwarder_thread_panics() {
    let topo = Topology::new();
    let (a, b) = topo.sides();
    let node = topo.node().name().to_owned();
    let joined = std::thread::spawn(move || {
        sys::enter_netns(&node).expect("enter node");
        let _fwd =
            rawfwd::open_pair(UmemOpts::default(), &SocketOpts::default(), &a, &b).expect("open");
        assert!(
            sys::xdp_prog_id(sys::ifindex("vA").unwrap(), 0, "vA")
                .unwrap()
                .is_some()
        );
        panic!("forwarder thread panics with its sockets open");
    })
    .join();
    assert!(joined.is_err());
    topo.assert_no_xdp();
}

#[test]
fn a_core_that_does_not_exist_is_refused_before_anything_is_attached() {
    let topo = Topology::new();
    let (a, b) = topo.sides();
    let config = FwdConfig {
        core: Some(4096),
        ..FwdConfig::default()
    };
    let err = rawfwd::spawn_pair(topo.node().name(), a, b, config).expect_err("refused");
    assert!(err.to_string().contains("4096"), "{err}");
    topo.assert_no_xdp();
}

#[test]
fn a_foreign_xdp_program_is_reported_not_replaced() {
    let topo = Topology::new();
    let (a, b) = topo.sides();
    // Someone else's forwarder owns the interfaces.
    let first = topo.start(SocketOpts::default());
    let second = rawfwd::spawn_pair(topo.node().name(), a, b, FwdConfig::default());
    let err = second.expect_err("second forwarder refused");
    assert!(
        matches!(&err, dataplane::Error::XdpBusy { interface, .. } if interface == "vA"),
        "{err}"
    );
    // The first one still works.
    let out = ping(topo.pod_a(), POD_B, 1);
    assert!(out.status.success(), "{out:?}");
    drop(first);
    topo.assert_no_xdp();
}

/// Set in the child process of `stale_program_of_a_crashed_run_is_cleaned_at_the_next_start`:
/// the namespace in which to open a socket and then die without cleaning up.
const CRASH_ENV: &str = "OCELOT_TEST_CRASH_IN_NETNS";

#[test]
fn stale_program_of_a_crashed_run_is_cleaned_at_the_next_start() {
    if let Ok(ns) = std::env::var(CRASH_ENV) {
        // Child: the "crashed run". Opens a socket on vA (libxdp attaches its program) and
        // dies: the kernel closes the socket, nothing detaches the program.
        sys::enter_netns(&ns).expect("enter node");
        let (mut umem, _frames) = sys::XskUmem::new(UmemOpts::default()).expect("umem");
        let _sockets = umem.open("vA", 0, &SocketOpts::default()).expect("socket");
        // `exit` runs no destructors: the sockets are closed by the kernel, not by libxdp.
        std::process::exit(101);
    }
    let topo = Topology::new();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stale_program_of_a_crashed_run_is_cleaned_at_the_next_start",
            "--nocapture",
        ])
        .env(CRASH_ENV, topo.node().name())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the crashing child");
    assert_eq!(
        status.code(),
        Some(101),
        "the child was meant to die after opening"
    );
    assert!(
        topo.node().has_xdp("vA").unwrap(),
        "the crash left no program behind?"
    );

    let node = topo.node().name();
    let removed = sys::in_netns(node, || sys::detach_stale_xsk_prog("vA")).unwrap();
    assert!(matches!(removed, Ok(Some(_))), "{removed:?}");
    topo.assert_no_xdp();
    // Nothing left: a second cleanup is a no-op.
    let again = sys::in_netns(node, || sys::detach_stale_xsk_prog("vA")).unwrap();
    assert!(matches!(again, Ok(None)), "{again:?}");
    // And the interface is usable again.
    let fwd = topo.start(SocketOpts::default());
    let out = ping(topo.pod_a(), POD_B, 1);
    assert!(out.status.success(), "{out:?}");
    drop(fwd);
    topo.assert_no_xdp();
}
