//! ocelot's own XDP program on a node's uplink (`dataplane::sys::UplinkProgram`), with real
//! traffic: a `router` namespace and a `node` namespace joined by a veth (`up0` in the router,
//! 10.70.0.1/24; `eth0` in the node, its uplink, 10.70.0.2/24). The router routes the pod
//! block 10.71.0.0/24 via the node. 10.71.0.5 is a "local pod": in the program's
//! `local_pods`, and also an address on the node's `lo`, so that a frame for it that wrongly
//! reached the node's kernel would be delivered to a kernel socket and be seen. The IPv6
//! test adds fd00:70::1/64 and fd00:70::2/64 on the link and the pod fd00:71::5.
//!
//! Needs root (CI runs it as root). Everything lives in namespaces the test creates and
//! removes (RAII, also on panic); the program is attached only to the node namespace's
//! `eth0`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use dataplane::port::{FrameMem, Rx};
use dataplane::sys::{
    self, FailsafeDir, FailsafePort, L4Proto, SocketOpts, UmemOpts, UplinkCounters, UplinkProgram,
    XdpMode, XskFrame, XskRx, XskUmem,
};
use ocelot_tests::netns::{self, Netns};

const ROUTER: &str = "10.70.0.1";
const NODE: &str = "10.70.0.2";
const POD: &str = "10.71.0.5";
const POD_PORT: u16 = 9999;
const ROUTER6: &str = "fd00:70::1";
const NODE6: &str = "fd00:70::2";
const POD6: &str = "fd00:71::5";

/// The router and the node, joined by the node's uplink.
struct Topology {
    router: Netns,
    node: Netns,
}

impl Topology {
    /// Builds it with `queues` rx and tx queues on each end of the veth. Deleting the
    /// namespaces (on drop) deletes the veth and any XDP program on it.
    fn new(queues: u32) -> Topology {
        Topology::build(queues, false)
    }

    /// As [`Topology::new`], with IPv6 too: fd00:70::1/64 and fd00:70::2/64 on the link,
    /// fd00:71::5 the pod (on the node's `lo`), fd00:71::/64 routed via the node.
    fn new_dual_stack() -> Topology {
        Topology::build(1, true)
    }

    fn build(queues: u32, ipv6: bool) -> Topology {
        let router = Netns::new("router").unwrap();
        let node = Netns::new("node").unwrap();
        if !ipv6 {
            for ns in [&router, &node] {
                ns.disable_ipv6().unwrap();
            }
        }
        let q = queues.to_string();
        router
            .ip(&[
                "link",
                "add",
                "up0",
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                node.name(),
            ])
            .unwrap();
        router.addr_add("up0", &format!("{ROUTER}/24")).unwrap();
        node.addr_add("eth0", &format!("{NODE}/24")).unwrap();
        node.ip(&["addr", "add", &format!("{POD}/32"), "dev", "lo"])
            .unwrap();
        router
            .route_add(&["10.71.0.0/24", "via", NODE, "dev", "up0"])
            .unwrap();
        if ipv6 {
            // No duplicate address detection: the addresses are usable at once.
            router
                .ip(&[
                    "addr",
                    "add",
                    &format!("{ROUTER6}/64"),
                    "dev",
                    "up0",
                    "nodad",
                ])
                .unwrap();
            node.ip(&[
                "addr",
                "add",
                &format!("{NODE6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
            node.ip(&["addr", "add", &format!("{POD6}/128"), "dev", "lo"])
                .unwrap();
            router
                .route_add(&["fd00:71::/64", "via", NODE6, "dev", "up0"])
                .unwrap();
        }
        Topology { router, node }
    }

    /// Makes the router forget the node's MAC, so its next frame starts with an ARP request.
    fn flush_router_arp(&self) {
        self.router
            .ip(&["neigh", "flush", "dev", "up0"])
            .map(drop)
            .unwrap();
    }
}

/// Sends one UDP datagram from the router (source port `sport`, 0 for any) to `dst`.
fn send_udp(topo: &Topology, sport: u16, dst: &str, payload: &[u8]) {
    let dst: IpAddr = dst.parse().unwrap();
    let src = if dst.is_ipv4() { ROUTER } else { ROUTER6 };
    let socket = sys::in_netns(topo.router.name(), || UdpSocket::bind((src, sport)))
        .unwrap()
        .unwrap();
    socket.send_to(payload, (dst, POD_PORT)).unwrap();
}

/// A UDP socket of the node's kernel on the pod's address.
fn kernel_udp() -> UdpSocket {
    kernel_udp_on(POD)
}

/// A UDP socket of the node's kernel on `addr`, port [`POD_PORT`].
fn kernel_udp_on(addr: &str) -> UdpSocket {
    let socket = UdpSocket::bind((addr.parse::<IpAddr>().unwrap(), POD_PORT)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    socket
}

/// The payloads the kernel socket receives within its timeout (until it times out once).
fn kernel_received(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

/// Connects from the router to `dst` port 22 (answered by the node's kernel listener),
/// exchanges a line, and closes.
fn ssh_like(topo: &Topology, listener: &TcpListener, dst: &str) {
    let addr: SocketAddr = (dst.parse::<IpAddr>().unwrap(), 22).into();
    let mut client = sys::in_netns(topo.router.name(), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("TCP to {dst}:22: {e}"));
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), ROUTER.parse::<IpAddr>().unwrap());
    client.write_all(b"hello\n").unwrap();
    let mut line = [0u8; 6];
    server.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"hello\n");
}

fn ping(from: &Netns, to: &str, count: u32) -> String {
    let out = from
        .exec(&["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", to])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ping {to}: {stdout}");
    stdout
}

/// A UMEM with sockets on queues of the node's uplink, opened without libxdp's default
/// program (the uplink program owns the interface).
struct Sockets {
    umem: XskUmem,
    free: Vec<XskFrame>,
    rxs: Vec<XskRx>,
    _txs: Vec<sys::XskTx>,
}

impl Sockets {
    fn open(queues: &[u32]) -> Sockets {
        let (mut umem, mut free) = XskUmem::new(UmemOpts::default()).unwrap();
        let opts = SocketOpts {
            load_default_prog: false,
            ..SocketOpts::default()
        };
        let mut rxs = Vec::new();
        let mut txs = Vec::new();
        for &q in queues {
            let (mut rx, tx) = umem.open("eth0", q, &opts).unwrap();
            rx.fill(&mut free, 512).unwrap();
            rxs.push(rx);
            txs.push(tx);
        }
        free.reserve(4096);
        Sockets {
            umem,
            free,
            rxs,
            _txs: txs,
        }
    }

    /// Collects frames from every socket until `want` arrived in total or two seconds pass;
    /// returns each socket's frames (bytes), in socket order.
    fn receive(&mut self, want: usize) -> Vec<Vec<Vec<u8>>> {
        let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.rxs.len()];
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut burst = Vec::with_capacity(64);
        while got.iter().map(Vec::len).sum::<usize>() < want && Instant::now() < deadline {
            let fds = self.rxs.iter().filter_map(Rx::fd);
            sys::poll_readable(fds, 50).unwrap();
            for (rx, frames) in self.rxs.iter_mut().zip(got.iter_mut()) {
                rx.recv(&mut burst, 64).unwrap();
                for mut f in burst.drain(..) {
                    frames.push(self.umem.with_bytes_mut(&mut f, |b| b.to_vec()));
                    self.free.push(f);
                }
                rx.fill(&mut self.free, 64).unwrap();
            }
        }
        got
    }
}

/// The IPv4 destination and the UDP payload of an untagged Ethernet/IPv4/UDP frame.
fn udp_of(frame: &[u8]) -> (Ipv4Addr, &[u8]) {
    assert_eq!(frame[12..14], [0x08, 0x00], "not IPv4: {frame:02x?}");
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    (dst, &frame[14 + ihl + 8..])
}

/// What moved between two counter readings.
fn delta(before: UplinkCounters, after: UplinkCounters) -> UplinkCounters {
    UplinkCounters {
        redirected: after.redirected - before.redirected,
        passed_not_pod: after.passed_not_pod - before.passed_not_pod,
        passed_failsafe: after.passed_failsafe - before.passed_failsafe,
        passed_arp_ndp: after.passed_arp_ndp - before.passed_arp_ndp,
        passed_unparsed: after.passed_unparsed - before.passed_unparsed,
        passed_other: after.passed_other - before.passed_other,
        no_socket: after.no_socket - before.no_socket,
    }
}

#[test]
fn uplink_redirects_local_pod_traffic_and_the_kernel_keeps_the_rest() {
    let topo = Topology::new(1);
    let names = [topo.router.name().to_owned(), topo.node.name().to_owned()];
    // The test thread works in the node namespace (where the program, the AF_XDP sockets and
    // the kernel's listeners live) and dips into the router's for the client side.
    sys::in_netns(topo.node.name(), || {
        let kernel = kernel_udp();
        let listener = TcpListener::bind(("0.0.0.0", 22)).unwrap();

        // Without the program, the node's kernel gets the pod's datagram: the check below
        // that it does not while the program is attached can fail.
        send_udp(&topo, 0, POD, b"before");
        assert_eq!(kernel_received(&kernel), vec![b"before".to_vec()]);

        let program = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        assert!(topo.node.has_xdp("eth0").unwrap());
        assert_eq!(program.interface(), Some("eth0"));
        program
            .set_local_pod(POD.parse::<IpAddr>().unwrap(), true)
            .unwrap();

        // A local pod but no socket for the queue yet: the kernel gets it, counted.
        let c0 = program.counters().unwrap();
        send_udp(&topo, 0, POD, b"no socket yet");
        assert_eq!(kernel_received(&kernel), vec![b"no socket yet".to_vec()]);
        let d = delta(c0, program.counters().unwrap());
        assert_eq!((d.no_socket, d.redirected), (1, 0), "{d:?}");

        // (b) With the socket registered, pod traffic goes to the AF_XDP socket and not to
        // the kernel.
        let mut sockets = Sockets::open(&[0]);
        assert_eq!(program.register_socket(&sockets.rxs[0]).unwrap(), 0);
        let c1 = program.counters().unwrap();
        for i in 0..5 {
            send_udp(&topo, 0, POD, format!("to the pod {i}").as_bytes());
        }
        let got = sockets.receive(5);
        assert_eq!(got[0].len(), 5, "AF_XDP socket got {} frames", got[0].len());
        for (i, frame) in got[0].iter().enumerate() {
            let (dst, payload) = udp_of(frame);
            assert_eq!(dst, POD.parse::<Ipv4Addr>().unwrap());
            assert_eq!(payload, format!("to the pod {i}").as_bytes());
        }
        assert!(
            kernel_received(&kernel).is_empty(),
            "the kernel saw pod traffic"
        );
        let d = delta(c1, program.counters().unwrap());
        assert_eq!((d.redirected, d.no_socket), (5, 0), "{d:?}");

        // (a) The node's own address answers ping and TCP on port 22 while the program is
        // attached; the router's ARP for it reaches the kernel too.
        topo.flush_router_arp();
        let c2 = program.counters().unwrap();
        let out = ping(&topo.router, NODE, 3);
        assert!(out.contains("3 received"), "{out}");
        let d = delta(c2, program.counters().unwrap());
        assert!(d.passed_arp_ndp >= 1, "{d:?}");
        assert!(d.passed_not_pod >= 3, "{d:?}");
        assert_eq!(d.redirected, 0, "{d:?}");
        let c3 = program.counters().unwrap();
        ssh_like(&topo, &listener, NODE);
        let d = delta(c3, program.counters().unwrap());
        // SYN, ACK, data, …: all on the failsafe list before anything else is looked at.
        assert!(d.passed_failsafe >= 3, "{d:?}");

        // (c) A local pod is the dataplane's on every port, 22 included: the failsafe list
        // protects the node's own services, not pod addresses (the SYN arrives on the socket;
        // nothing answers it).
        let c4 = program.counters().unwrap();
        let addr: SocketAddr = (POD.parse::<IpAddr>().unwrap(), 22).into();
        let refused = sys::in_netns(topo.router.name(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        })
        .unwrap();
        assert!(refused.is_err(), "TCP to the pod answered by the kernel");
        let syns = sockets.receive(1);
        assert!(!syns[0].is_empty());
        let d = delta(c4, program.counters().unwrap());
        assert!(d.redirected >= 1 && d.passed_failsafe == 0, "{d:?}");

        // (d) The failsafe list is live: with tcp 22 off it, the node's own port 22 still
        // reaches the kernel (everything not for a pod does), counted as not-pod instead.
        let ssh = FailsafePort {
            proto: L4Proto::Tcp,
            dir: FailsafeDir::In,
            port: 22,
        };
        program.set_failsafe(ssh, false).unwrap();
        let c5 = program.counters().unwrap();
        ssh_like(&topo, &listener, NODE);
        let d = delta(c5, program.counters().unwrap());
        assert_eq!((d.passed_failsafe, d.redirected), (0, 0), "{d:?}");
        assert!(d.passed_not_pod >= 3, "{d:?}");
        program.set_failsafe(ssh, true).unwrap();

        // Totals are consistent with all of the above.
        let total = program.counters().unwrap();
        assert!(total.redirected >= 6 && total.no_socket == 1, "{total:?}");
        assert_eq!(total.passed_unparsed, 0, "{total:?}");

        // (e) Dropping the owner detaches the program.
        drop(sockets);
        drop(program);
        assert!(!topo.node.has_xdp("eth0").unwrap(), "program left behind");
        // And the kernel gets the pod's traffic again.
        send_udp(&topo, 0, POD, b"after");
        assert_eq!(kernel_received(&kernel), vec![b"after".to_vec()]);
    })
    .unwrap();
    drop(topo);
    let left = netns::list().unwrap();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
}

#[test]
fn stale_uplink_program_is_found_by_name_and_removed() {
    let topo = Topology::new(1);
    sys::in_netns(topo.node.name(), || {
        let kernel = kernel_udp();
        // A run that dies without detaching (abort, SIGKILL) leaves its program attached,
        // with its maps; its sockets are closed by the kernel.
        let program = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        let id = program.prog_id().unwrap();
        program
            .set_local_pod(POD.parse::<IpAddr>().unwrap(), true)
            .unwrap();
        let sockets = Sockets::open(&[0]);
        program.register_socket(&sockets.rxs[0]).unwrap();
        std::mem::forget(program);
        drop(sockets);
        assert!(topo.node.has_xdp("eth0").unwrap());
        // Meanwhile the pod's traffic is not lost into a dead socket: the closed socket left
        // the XSKMAP, so the program passes the frame to the kernel.
        send_udp(&topo, 0, POD, b"orphaned");
        assert_eq!(kernel_received(&kernel), vec![b"orphaned".to_vec()]);

        // The next start cannot attach over it…
        let err = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap_err();
        assert!(
            matches!(&err, dataplane::Error::XdpBusy { prog, .. } if *prog == id),
            "{err}"
        );
        // …so it removes it first, recognised by its name.
        assert_eq!(sys::detach_stale_xsk_prog("eth0").unwrap(), Some(id));
        assert!(!topo.node.has_xdp("eth0").unwrap());
        assert_eq!(sys::detach_stale_xsk_prog("eth0").unwrap(), None);
        let again = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        assert_ne!(again.prog_id().unwrap(), id);
        drop(again);
        assert!(!topo.node.has_xdp("eth0").unwrap());
    })
    .unwrap();
}

#[test]
fn uplink_program_and_default_program_refuse_each_other() {
    let topo = Topology::new(1);
    sys::in_netns(topo.node.name(), || {
        // A socket with libxdp's default program owns the uplink: ours is refused.
        let (mut umem, _frames) = XskUmem::new(UmemOpts::default()).unwrap();
        let sockets = umem.open("eth0", 0, &SocketOpts::default()).unwrap();
        let err = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap_err();
        assert!(matches!(err, dataplane::Error::XdpBusy { .. }), "{err}");
        drop(sockets);
        drop(umem);
        assert!(!topo.node.has_xdp("eth0").unwrap());

        // Ours owns it: a socket that wants libxdp's program is refused, and the program
        // stays.
        let program = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        let (mut umem, _frames) = XskUmem::new(UmemOpts::default()).unwrap();
        let err = umem
            .open("eth0", 0, &SocketOpts::default())
            .expect_err("refused");
        assert!(matches!(err, dataplane::Error::XdpBusy { .. }), "{err}");
        assert_eq!(
            sys::xdp_prog_id(sys::ifindex("eth0").unwrap(), 0, "eth0").unwrap(),
            Some(program.prog_id().unwrap())
        );
    })
    .unwrap();
}

/// (f) Two rx queues, one socket each: veth delivers a frame on the receiver's rx queue with
/// the index of the sender's tx queue, which the router's stack picks per flow (a hash of
/// the addresses and ports, with no XPS configured). 32 flows land on both queues unless
/// the hash puts all 32 on one (a chance of 2^-31).
#[test]
fn two_queue_uplink_spreads_flows_over_both_sockets() {
    let topo = Topology::new(2);
    sys::in_netns(topo.node.name(), || {
        // Native mode: veth runs the program per rx queue there (in generic mode every frame
        // would report queue 0).
        let program = UplinkProgram::attach("eth0", XdpMode::Native).unwrap();
        program
            .set_local_pod(POD.parse::<IpAddr>().unwrap(), true)
            .unwrap();
        let mut sockets = Sockets::open(&[0, 1]);
        for rx in &sockets.rxs {
            program.register_socket(rx).unwrap();
        }
        let flows = 32;
        for i in 0..flows {
            send_udp(&topo, 40000 + i, POD, format!("flow {i}").as_bytes());
        }
        let got = sockets.receive(usize::from(flows));
        let per_queue: Vec<usize> = got.iter().map(Vec::len).collect();
        eprintln!("frames per queue: {per_queue:?}");
        assert_eq!(
            per_queue.iter().sum::<usize>(),
            usize::from(flows),
            "{per_queue:?}"
        );
        assert!(per_queue.iter().all(|&n| n > 0), "{per_queue:?}");
        let d = program.counters().unwrap();
        assert_eq!((d.redirected, d.no_socket), (u64::from(flows), 0), "{d:?}");
    })
    .unwrap();
}

#[test]
fn ipv6_neighbour_discovery_reaches_the_kernel_and_pod_traffic_the_socket() {
    let topo = Topology::new_dual_stack();
    sys::in_netns(topo.node.name(), || {
        let kernel = kernel_udp_on(POD6);
        // Without the program the kernel gets it (so the check below can fail).
        send_udp(&topo, 0, POD6, b"before");
        assert_eq!(kernel_received(&kernel), vec![b"before".to_vec()]);
        topo.router
            .ip(&["neigh", "flush", "dev", "up0"])
            .map(drop)
            .unwrap();
        let program = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        program
            .set_local_pod(POD6.parse::<IpAddr>().unwrap(), true)
            .unwrap();
        let mut sockets = Sockets::open(&[0]);
        program.register_socket(&sockets.rxs[0]).unwrap();

        // The router resolves the node's address with neighbour discovery, which the
        // node's kernel answers, and the node answers ping on it.
        let c0 = program.counters().unwrap();
        let out = ping(&topo.router, NODE6, 3);
        assert!(out.contains("3 received"), "{out}");
        let d = delta(c0, program.counters().unwrap());
        assert!(d.passed_arp_ndp >= 1 && d.passed_not_pod >= 3, "{d:?}");
        assert_eq!(d.redirected, 0, "{d:?}");

        // UDP to the pod's IPv6 address goes to the socket, not to the kernel.
        let c1 = program.counters().unwrap();
        for i in 0..3 {
            send_udp(&topo, 0, POD6, format!("v6 pod {i}").as_bytes());
        }
        let got = sockets.receive(3);
        assert_eq!(got[0].len(), 3);
        for (i, frame) in got[0].iter().enumerate() {
            assert_eq!(frame[12..14], [0x86, 0xdd]);
            let dst: [u8; 16] = frame[38..54].try_into().unwrap();
            assert_eq!(
                std::net::Ipv6Addr::from(dst),
                POD6.parse::<std::net::Ipv6Addr>().unwrap()
            );
            assert!(frame.ends_with(format!("v6 pod {i}").as_bytes()));
        }
        assert!(
            kernel_received(&kernel).is_empty(),
            "the kernel saw pod traffic"
        );
        let d = delta(c1, program.counters().unwrap());
        assert_eq!((d.redirected, d.no_socket), (3, 0), "{d:?}");
    })
    .unwrap();
}

/// Set in the child process of `node_stays_reachable_after_the_dataplane_is_sigkilled`: the
/// node namespace in which to attach the program, register a socket and wait to be killed.
const CHILD_ENV: &str = "OCELOT_TEST_UPLINK_CHILD_NETNS";

/// A child process, SIGKILLed and reaped on drop if it is still running (also on panic).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn node_stays_reachable_after_the_dataplane_is_sigkilled() {
    if let Ok(ns) = std::env::var(CHILD_ENV) {
        // Child: the dataplane that will be killed.
        sys::enter_netns(&ns).expect("enter node");
        let program = UplinkProgram::attach("eth0", XdpMode::Auto).expect("attach");
        program
            .set_local_pod(POD.parse::<IpAddr>().unwrap(), true)
            .unwrap();
        let sockets = Sockets::open(&[0]);
        program.register_socket(&sockets.rxs[0]).unwrap();
        println!("ready");
        std::thread::sleep(Duration::from_secs(60));
        // Not reached: the parent kills this process first.
        std::process::exit(2);
    }
    let topo = Topology::new(1);
    let mut child = Child(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "node_stays_reachable_after_the_dataplane_is_sigkilled",
                "--nocapture",
            ])
            .env(CHILD_ENV, topo.node.name())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the dataplane child"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|line| line.contains("ready"));
    assert!(ready, "the child did not get ready");
    assert!(topo.node.has_xdp("eth0").unwrap());

    sys::in_netns(topo.node.name(), || {
        let kernel = kernel_udp();
        let listener = TcpListener::bind(("0.0.0.0", 22)).unwrap();
        // While the dataplane runs: pod traffic is its, the node answers for itself.
        send_udp(&topo, 0, POD, b"to the live dataplane");
        assert!(
            kernel_received(&kernel).is_empty(),
            "the kernel saw pod traffic"
        );
        ping(&topo.router, NODE, 2);
        ssh_like(&topo, &listener, NODE);

        // SIGKILL: no destructor runs, the program stays attached, the sockets are closed.
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert!(
            topo.node.has_xdp("eth0").unwrap(),
            "the program went with the process?"
        );
        // The node is still reachable: ARP, ping and TCP 22 never depended on the dataplane.
        topo.flush_router_arp();
        ping(&topo.router, NODE, 2);
        ssh_like(&topo, &listener, NODE);
        // Pod traffic falls back to the node's kernel (its socket left the XSKMAP), which
        // here delivers it to the pod address on `lo`; on a real node it would route it.
        send_udp(&topo, 0, POD, b"after the kill");
        assert_eq!(kernel_received(&kernel), vec![b"after the kill".to_vec()]);

        // The next start removes the leftover, recognised by name, and can attach again.
        assert!(sys::detach_stale_xsk_prog("eth0").unwrap().is_some());
        assert!(!topo.node.has_xdp("eth0").unwrap());
        let program = UplinkProgram::attach("eth0", XdpMode::Auto).unwrap();
        drop(program);
        assert!(!topo.node.has_xdp("eth0").unwrap());
    })
    .unwrap();
}
