//! RAII network-namespace topologies for `ocelot lab`, the benchmark testbed and the tests.
//!
//! Everything built here lives in namespaces created here: [`Netns::new`] makes one with a
//! unique name (`ocl-<pid>-<counter>-<role>`) and its `Drop` kills the processes started in it
//! and deletes it, also when the owner panics. Veth pairs are created directly inside
//! namespaces (`ip -n`), never in the root namespace, so nothing here touches the host's
//! interfaces, addresses, routes or XDP programs.
//!
//! The helpers shell out to iproute2 (`ip`), `ethtool` and `sysctl`; a failing command is an
//! [`Error::Command`] with its command line and stderr.

use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args…` and returns its output.
fn run(program: &str, args: &[&str]) -> Result<Output, Error> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: command_line(program, args),
            detail: format!("cannot start: {e}"),
        })
}

/// Runs a command and fails with its stderr unless it succeeds; returns its stdout.
fn run_ok(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = run(program, args)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: command_line(program, args),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace we created; deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates a namespace named `ocl-<pid>-<counter>-<role>` with its loopback up.
    pub fn new(role: &str) -> Result<Netns, Error> {
        let name = format!(
            "ocl-{}-{}-{role}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_ok("ip", &["netns", "add", &name])?;
        let ns = Netns {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` and `dataplane::sys::enter_netns` know it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args…`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`) and returns its output.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output, Error> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// Runs a command inside the namespace, failing unless it succeeds; returns stdout.
    pub fn exec_ok(&self, cmd: &[&str]) -> Result<String, Error> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run_ok("ip", &full)
    }

    /// Starts a command inside the namespace in the background; it is killed when the
    /// namespace is dropped, if it has not exited by then. Returns its pid.
    pub fn spawn(&self, cmd: &[&str]) -> Result<u32, Error> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.name.as_str()])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.adopt(command, cmd)
    }

    /// Starts a prepared command (whose program is `ip netns exec <this namespace> …`, or
    /// one that enters the namespace itself) and kills it when the namespace is dropped, if
    /// it has not exited by then. `what` names it in errors. Returns its pid.
    pub fn adopt(&self, mut command: Command, what: &[&str]) -> Result<u32, Error> {
        let child = command.spawn().map_err(|e| Error::Command {
            command: format!("{} (in {})", what.join(" "), self.name),
            detail: format!("cannot start: {e}"),
        })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Adds an address (`10.65.0.1/32`) to a device and brings it up.
    pub fn addr_add(&self, dev: &str, cidr: &str) -> Result<(), Error> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.link_up(dev)
    }

    /// Brings a device up.
    pub fn link_up(&self, dev: &str) -> Result<(), Error> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Adds a route: `route_add(&["default", "via", "169.254.1.1", "dev", "eth0"])`.
    pub fn route_add(&self, spec: &[&str]) -> Result<(), Error> {
        let mut full = vec!["route", "add"];
        full.extend_from_slice(spec);
        self.ip(&full).map(drop)
    }

    /// Adds a permanent neighbour entry: `ip` has MAC `mac` on `dev`.
    pub fn neigh_add(&self, dev: &str, ip: &str, mac: [u8; 6]) -> Result<(), Error> {
        let mac = format_mac(mac);
        self.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    }

    /// The MAC address of a device.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6], Error> {
        let out = self.ip(&["-o", "link", "show", dev])?;
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .and_then(parse_mac)
            .ok_or_else(|| Error::Command {
                command: format!("ip -n {} -o link show {dev}", self.name),
                detail: format!("no MAC address in {out:?}"),
            })
    }

    /// Whether an XDP program is attached to a device (as `ip link` reports it).
    pub fn has_xdp(&self, dev: &str) -> Result<bool, Error> {
        let out = self.ip(&["-d", "link", "show", dev])?;
        Ok(out.contains("xdp") || out.contains("prog/xdp"))
    }

    /// Turns off transmit checksum offload (and the segmentation offloads that depend on it)
    /// on a device. A pod interface in front of an AF_XDP dataplane needs this: the stack
    /// leaves checksums for "hardware" to fill in, but AF_XDP hands user space the raw
    /// frame without that metadata, so a forwarded frame would arrive with a wrong UDP/TCP
    /// checksum.
    pub fn tx_checksum_off(&self, dev: &str) -> Result<(), Error> {
        self.exec_ok(&["ethtool", "-K", dev, "tx", "off"]).map(drop)
    }

    /// Disables IPv6 in the namespace, so router solicitations and DAD do not add frames.
    pub fn disable_ipv6(&self) -> Result<(), Error> {
        self.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
        self.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])
            .map(drop)
    }

    /// Kills what [`Netns::spawn`] started and is still running, and anything else left in
    /// the namespace (only this test can have put it there).
    fn kill_all(&self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        // Deleting the namespace destroys its veths (and so their XDP programs) too.
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// A veth pair with each end in a namespace: `a_dev` in `a`, `b_dev` in `b`. Both ends are
/// up. Removed on drop (deleting one end removes both); deleting either namespace would
/// remove it as well.
#[derive(Debug)]
pub struct VethPair {
    a_ns: String,
    a_dev: String,
}

impl VethPair {
    /// Creates the pair inside `a` and moves its peer straight into `b`.
    pub fn new(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<VethPair, Error> {
        a.ip(&[
            "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
        ])?;
        let pair = VethPair {
            a_ns: a.name.clone(),
            a_dev: a_dev.into(),
        };
        a.link_up(a_dev)?;
        b.link_up(b_dev)?;
        Ok(pair)
    }
}

impl VethPair {
    /// As [`VethPair::new`], with `queues` receive and transmit queues on each end (veth
    /// delivers a frame on the receive queue matching the sender's transmit queue, which the
    /// sender's stack picks per flow).
    pub fn with_queues(
        a: &Netns,
        a_dev: &str,
        b: &Netns,
        b_dev: &str,
        queues: u32,
    ) -> Result<VethPair, Error> {
        let q = queues.max(1).to_string();
        a.ip(&[
            "link",
            "add",
            a_dev,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &b.name,
        ])?;
        let pair = VethPair {
            a_ns: a.name.clone(),
            a_dev: a_dev.into(),
        };
        a.link_up(a_dev)?;
        b.link_up(b_dev)?;
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = run("ip", &["-n", &self.a_ns, "link", "del", &self.a_dev]);
    }
}

/// The link-local gateway every pod routes through, as in Calico.
pub const GATEWAY: &str = "169.254.1.1";

/// The link-local next hop of a pod's IPv6 default route: Calico's, the EUI-64 address of
/// the host side's MAC `ee:ee:ee:ee:ee:ee`. Whatever runs on the node answers its neighbour
/// solicitations (ocelot's dataplane does).
pub const GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

/// One pod of a [`VirtualNode`].
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace.
    pub ns: Netns,
    /// Its address (a /32).
    pub ip: std::net::Ipv4Addr,
    /// The host-side veth in the node's namespace.
    pub host_dev: String,
    /// The MAC of the pod's eth0.
    pub mac: [u8; 6],
}

impl Pod {
    /// Gives a pod namespace whose `eth0` is already the peer of `host_dev` in `node` the
    /// Calico shape: its /32 address, transmit checksum offload off, a link route to
    /// [`GATEWAY`], the default route via it, and a permanent neighbour entry resolving the
    /// gateway to the host-side MAC (what proxy-ARP would answer).
    pub fn configure(ns: Netns, ip: &str, host_dev: &str, node: &Netns) -> Result<Pod, Error> {
        let pod = Pod::configure_proxy_arp(ns, ip, host_dev)?;
        pod.ns.neigh_add("eth0", GATEWAY, node.mac(host_dev)?)?;
        Ok(pod)
    }

    /// Gives the pod's `eth0` an IPv6 address too (/128, no duplicate-address detection)
    /// and the IPv6 default route via [`GATEWAY6`], which the pod resolves with neighbour
    /// discovery.
    pub fn add_ipv6(&self, ip: &str) -> Result<(), Error> {
        let addr: std::net::Ipv6Addr = ip.parse().map_err(|e| Error::Command {
            command: format!("configure pod {ip}"),
            detail: format!("not an IPv6 address: {e}"),
        })?;
        // DAD off first, so the link-local address is usable at once.
        for key in [
            "net.ipv6.conf.eth0.accept_dad=0",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.eth0.disable_ipv6=0",
        ] {
            self.ns.exec_ok(&["sysctl", "-q", "-w", key])?;
        }
        self.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        self.ns
            .ip(&[
                "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
            ])
            .map(drop)
    }

    /// As [`Pod::configure`], without the static neighbour entry: the pod resolves the
    /// gateway with ARP, so whatever runs on the node must answer it (Calico's proxy-ARP).
    pub fn configure_proxy_arp(ns: Netns, ip: &str, host_dev: &str) -> Result<Pod, Error> {
        let addr: std::net::Ipv4Addr = ip.parse().map_err(|e| Error::Command {
            command: format!("configure pod {ip}"),
            detail: format!("not an IPv4 address: {e}"),
        })?;
        ns.addr_add("eth0", &format!("{ip}/32"))?;
        ns.tx_checksum_off("eth0")?;
        ns.route_add(&[GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.route_add(&["default", "via", GATEWAY, "dev", "eth0"])?;
        let mac = ns.mac("eth0")?;
        Ok(Pod {
            ns,
            ip: addr,
            host_dev: host_dev.into(),
            mac,
        })
    }
}

/// A node shaped the way Calico shapes one: a `node` namespace and one namespace per pod,
/// each pod's eth0 a veth whose peer (`host_dev`) is in the node namespace; the pod has its
/// /32 address, a default route via [`GATEWAY`] and a permanent neighbour entry resolving
/// the gateway to the host-side veth's MAC (what Calico's proxy-ARP would answer). The node
/// has no addresses or routes: whatever dataplane runs in it connects the pods. Pod eth0s
/// have IPv6 and transmit checksum offload off (see [`Netns::tx_checksum_off`]).
///
/// Dropped in order: veths, pods, node.
#[derive(Debug)]
pub struct VirtualNode {
    _veths: Vec<VethPair>,
    /// The pods, in the order given.
    pub pods: Vec<Pod>,
    /// The node's namespace.
    pub node: Netns,
}

impl VirtualNode {
    /// Builds the node with one pod per `(role, ip, host_dev)`.
    pub fn new(pods: &[(&str, &str, &str)]) -> Result<VirtualNode, Error> {
        let node = Netns::new("node")?;
        node.disable_ipv6()?;
        let mut veths = Vec::new();
        let mut built = Vec::new();
        for &(role, ip, host_dev) in pods {
            let ns = Netns::new(role)?;
            ns.disable_ipv6()?;
            veths.push(VethPair::new(&ns, "eth0", &node, host_dev)?);
            let pod = Pod::configure(ns, ip, host_dev, &node)?;
            built.push(pod);
        }
        Ok(VirtualNode {
            _veths: veths,
            pods: built,
            node,
        })
    }

    /// Names of every namespace of this node.
    pub fn namespace_names(&self) -> Vec<String> {
        std::iter::once(self.node.name().to_owned())
            .chain(self.pods.iter().map(|p| p.ns.name().to_owned()))
            .collect()
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Namespace names currently listed by `ip netns list`.
pub fn list() -> Result<Vec<String>, Error> {
    let out = run_ok("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_table() {
        fn check(s: &str, expected: Option<[u8; 6]>) {
            assert_eq!(parse_mac(s), expected, "{s}");
            if let Some(mac) = expected {
                assert_eq!(format_mac(mac), s.to_lowercase());
            }
        }
        check("02:fc:00:00:00:01", Some([2, 0xfc, 0, 0, 0, 1]));
        check(
            "AA:BB:CC:DD:EE:FF",
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
        );
        check("02:fc:00:00:00", None);
        check("02:fc:00:00:00:01:02", None);
        check("zz:fc:00:00:00:01", None);
    }

    #[test]
    fn namespace_is_created_and_removed() {
        let ns = Netns::new("life").unwrap();
        let name = ns.name().to_owned();
        assert!(list().unwrap().contains(&name));
        drop(ns);
        assert!(!list().unwrap().contains(&name));
    }

    #[test]
    fn panic_inside_a_closure_still_removes_the_namespace_and_its_processes() {
        let seen = Mutex::new(None);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = Netns::new("panic").unwrap();
            let pid = ns.spawn(&["sleep", "600"]).unwrap();
            *seen.lock().unwrap() = Some((ns.name().to_owned(), pid));
            panic!("test panic while the namespace exists");
        }));
        assert!(result.is_err());
        let (name, pid) = seen.lock().unwrap().clone().expect("closure ran");
        assert!(!list().unwrap().contains(&name), "{name} left behind");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left running"
        );
    }

    #[test]
    fn virtual_node_pods_are_isolated_without_a_dataplane() {
        let vn = VirtualNode::new(&[("pa", "10.78.0.1", "hA"), ("pb", "10.78.0.2", "hB")]).unwrap();
        let names = vn.namespace_names();
        assert_eq!(names.len(), 3);
        let a = &vn.pods[0];
        assert_eq!(a.mac, a.ns.mac("eth0").unwrap());
        assert!(
            a.ns.ip(&["route", "show"])
                .unwrap()
                .contains("default via 169.254.1.1")
        );
        // Nothing in the node forwards, so the pods cannot reach each other.
        let out =
            a.ns.exec(&["ping", "-c", "1", "-W", "1", "10.78.0.2"])
                .unwrap();
        assert!(!out.status.success());
        drop(vn);
        let left = list().unwrap();
        assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
    }

    #[test]
    fn veth_pair_connects_two_namespaces() {
        let a = Netns::new("va").unwrap();
        let b = Netns::new("vb").unwrap();
        let _veth = VethPair::new(&a, "x0", &b, "y0").unwrap();
        a.addr_add("x0", "10.77.0.1/24").unwrap();
        b.addr_add("y0", "10.77.0.2/24").unwrap();
        assert_ne!(a.mac("x0").unwrap(), b.mac("y0").unwrap());
        let out = a
            .exec(&["ping", "-c", "1", "-W", "2", "10.77.0.2"])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}
