//! The node's interfaces as the agent finds them: which pod veths exist, their MACs, and
//! the MAC of the pod's end of each veth.
//!
//! The pod's MAC is read from the other end of the veth: `ip -j link show` gives the peer's
//! namespace id (`link_netnsid`) and interface index (`link_index`), `ip -j netns list-id`
//! maps the id to a named namespace (CNI plugins and `ocelot lab` name them under
//! `/var/run/netns`), and the peer's address is read there. Nothing is changed in either
//! namespace. A pod whose peer cannot be read is reported and retried; until then the
//! snapshot has no route to it (fail closed).

use std::process::Command;

use serde::Deserialize;

pub use dataplane::netns::{format_mac, parse_mac};

#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    link_index: Option<u32>,
    #[serde(default)]
    link_netnsid: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct NsId {
    nsid: i64,
    #[serde(default)]
    name: Option<String>,
}

fn ip_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Option<T> {
    let out = Command::new("ip").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The MAC of an interface in the agent's namespace.
pub fn interface_mac(interface: &str) -> Option<[u8; 6]> {
    let links: Vec<Link> = ip_json(&["-j", "link", "show", "dev", interface])?;
    links.first()?.address.as_deref().and_then(parse_mac)
}

/// The MTU of an interface in the agent's namespace.
pub fn interface_mtu(interface: &str) -> Option<u32> {
    let links: Vec<Link> = ip_json(&["-j", "link", "show", "dev", interface])?;
    links.first()?.mtu
}

/// The largest MTU whose frames (with an Ethernet header and one VLAN tag) fit a UMEM frame
/// of `frame_size` bytes after the kernel's 256 bytes of XDP headroom.
pub fn max_mtu(frame_size: u32) -> u32 {
    frame_size.saturating_sub(256 + 14 + 4)
}

/// Warns when `interface`'s MTU lets through frames a UMEM frame cannot hold: the kernel
/// drops them before the dataplane sees them (counted as `xsk_rx_dropped`).
pub fn check_mtu(interface: &str, frame_size: u32) {
    if let Some(mtu) = interface_mtu(interface)
        && mtu > max_mtu(frame_size)
    {
        tracing::warn!(
            "{interface}: MTU {mtu} is larger than a {frame_size}-byte UMEM frame holds ({}); \
             larger frames are dropped by the kernel and counted as xsk_rx_dropped",
            max_mtu(frame_size)
        );
    }
}

/// The MAC of the other end of veth `interface`, if it lives in a named namespace.
pub fn peer_mac(interface: &str) -> Option<[u8; 6]> {
    let links: Vec<Link> = ip_json(&["-j", "link", "show", "dev", interface])?;
    let link = links.first()?;
    let (peer, nsid) = (link.link_index?, link.link_netnsid?);
    let ids: Vec<NsId> = ip_json(&["-j", "netns", "list-id"])?;
    let name = ids.into_iter().find(|n| n.nsid == nsid)?.name?;
    let peers: Vec<Link> = ip_json(&["-n", &name, "-j", "link", "show"])?;
    peers
        .into_iter()
        .find(|l| l.ifindex == peer)?
        .address
        .as_deref()
        .and_then(parse_mac)
}

/// Whether an address is of global scope as the agent counts it: not loopback, not
/// link-local (IPv4 169.254.0.0/16, IPv6 fe80::/10). (`ip addr` prints the scope the address
/// was configured with; these are the kernel's defaults for those ranges.)
fn is_global(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        std::net::IpAddr::V6(a) => {
            !a.is_loopback() && !a.is_unspecified() && a.segments()[0] & 0xffc0 != 0xfe80
        }
    }
}

/// Every address of the agent's namespace (getifaddrs: no process spawned, so the control
/// loop can ask every tick). A failure reads as no addresses, logged.
fn all_addresses() -> Vec<dataplane::sys::InterfaceAddress> {
    dataplane::sys::interface_addresses().unwrap_or_else(|e| {
        tracing::warn!("reading the interfaces' addresses: {e:#}");
        Vec::new()
    })
}

/// The global addresses of an interface with their prefix lengths.
pub fn interface_addresses(interface: &str) -> Vec<(std::net::IpAddr, u8)> {
    all_addresses()
        .into_iter()
        .filter(|a| a.interface == interface && is_global(a.addr))
        .map(|a| (a.addr, a.prefix_len))
        .collect()
}

/// The node's own addresses: the global addresses of every interface in the agent's
/// namespace (the uplink's, a loopback service address, any other NIC's).
pub fn node_addresses() -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = all_addresses()
        .into_iter()
        .map(|a| a.addr)
        .filter(|a| is_global(*a))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The IPv4 default gateway out of `interface` in a `/proc/net/route` text (the main table,
/// as `ip route show default` reads it).
pub fn parse_default_gateway(text: &str, interface: &str) -> Option<std::net::IpAddr> {
    const RTF_GATEWAY: u32 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let hex = |i: usize| u32::from_str_radix(f.get(i)?, 16).ok();
        let (dst, gw, flags, mask) = (hex(1)?, hex(2)?, hex(3)?, hex(7)?);
        (*f.first()? == interface && dst == 0 && mask == 0 && flags & RTF_GATEWAY != 0)
            // The kernel prints the network-order address as a native integer.
            .then(|| std::net::IpAddr::V4(std::net::Ipv4Addr::from(gw.to_ne_bytes())))
    })
}

/// The kernel's default gateway out of `interface` (IPv4), if it has one.
pub fn default_gateway(interface: &str) -> Option<std::net::IpAddr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&text, interface)
}

/// The usable IPv4 neighbours on `interface` in a `/proc/net/arp` text: entries the kernel
/// flags complete (`ATF_COM`: a valid state — reachable, stale, delay, probe, permanent), i.e.
/// not incomplete or failed.
pub fn parse_arp(text: &str, interface: &str) -> Vec<(std::net::IpAddr, [u8; 6])> {
    const ATF_COM: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            if *f.get(5)? != interface || flags & ATF_COM == 0 {
                return None;
            }
            let mac = parse_mac(f.get(3)?)?;
            (mac != [0; 6]).then_some(())?;
            Some((f.first()?.parse().ok()?, mac))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct NeighEntry {
    dst: String,
    #[serde(default)]
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// The kernel's neighbour table on `interface`: addresses with a usable MAC (states other
/// than INCOMPLETE and FAILED). IPv4 from `/proc/net/arp` (no process spawned); IPv6, which
/// has no such file, from `ip -6 neigh` and only when `ipv6` is asked for.
pub fn neighbors(
    interface: &str,
    ipv6: bool,
) -> std::collections::HashMap<std::net::IpAddr, [u8; 6]> {
    let mut out: std::collections::HashMap<_, _> = std::fs::read_to_string("/proc/net/arp")
        .map(|t| parse_arp(&t, interface))
        .unwrap_or_default()
        .into_iter()
        .collect();
    if ipv6 {
        let entries: Vec<NeighEntry> =
            ip_json(&["-6", "-j", "neigh", "show", "dev", interface]).unwrap_or_default();
        out.extend(
            entries
                .into_iter()
                .filter(|e| {
                    !e.state
                        .iter()
                        .any(|s| s == "INCOMPLETE" || s == "FAILED" || s == "NOARP")
                })
                .filter_map(|e| Some((e.dst.parse().ok()?, parse_mac(e.lladdr.as_deref()?)?))),
        );
    }
    out
}

/// Asks the kernel to resolve `ip` on `interface` and keep it resolved: a *managed*
/// neighbour entry (Linux ≥ 5.16), which the kernel probes on its own, with its own ARP/NDP —
/// the agent only reads the table. Returns whether the entry could be created.
pub fn manage_neighbor(interface: &str, ip: std::net::IpAddr) -> bool {
    Command::new("ip")
        .args([
            "neigh",
            "replace",
            &ip.to_string(),
            "dev",
            interface,
            "managed",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Removes a neighbour entry the agent asked for.
pub fn forget_neighbor(interface: &str, ip: std::net::IpAddr) {
    let _ = Command::new("ip")
        .args(["neigh", "del", &ip.to_string(), "dev", interface])
        .output();
}

/// Whether `ip` is on a subnet of `addrs` (so the kernel can resolve it on the link).
pub fn on_link(addrs: &[(std::net::IpAddr, u8)], ip: std::net::IpAddr) -> bool {
    addrs
        .iter()
        .any(|(a, len)| classifier::net::Cidr::new(*a, *len).is_ok_and(|c| c.contains(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth2\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
";

    #[test]
    fn default_gateway_of_each_interface_from_proc_net_route() {
        let gw = |i| parse_default_gateway(ROUTE, i);
        assert_eq!(gw("eth0"), Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
        assert_eq!(gw("eth1"), Some(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))));
        // A default route without a gateway (a point-to-point link) names none.
        assert_eq!(gw("eth2"), None);
        assert_eq!(gw("eth3"), None);
        assert_eq!(parse_default_gateway("", "eth0"), None);
        assert_eq!(parse_default_gateway("Iface\nbroken line\n", "eth0"), None);
    }

    #[test]
    fn arp_entries_with_a_usable_mac_only() {
        let arp = "IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
192.0.2.2        0x1         0x0         00:00:00:00:00:00     *        eth0
192.0.2.3        0x1         0x6         02:fc:00:00:00:07     *        eth0
10.0.0.9         0x1         0x2         02:fc:00:00:00:09     *        eth1
garbage
";
        let mut got = parse_arp(arp, "eth0");
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                    [0x02, 0xfc, 0, 0, 0, 5]
                ),
                (
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)),
                    [0x02, 0xfc, 0, 0, 0, 7]
                ),
            ]
        );
        assert!(parse_arp(arp, "eth9").is_empty());
    }

    #[test]
    fn the_namespace_addresses_include_loopback_but_count_it_not_global() {
        let all = dataplane::sys::interface_addresses().expect("getifaddrs");
        assert!(
            all.iter().any(|a| a.interface == "lo"
                && a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)
                && a.prefix_len == 8),
            "{all:?}"
        );
        assert!(!node_addresses().contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(interface_addresses("lo").is_empty());
    }

    #[derive(Debug, Deserialize)]
    struct AddrInfo {
        #[serde(default)]
        addr_info: Vec<AddrEntry>,
    }

    #[derive(Debug, Deserialize)]
    struct AddrEntry {
        local: String,
        #[serde(default)]
        scope: Option<String>,
    }

    #[test]
    fn node_addresses_are_what_ip_calls_global() {
        let infos: Vec<AddrInfo> = ip_json(&["-j", "addr", "show"]).expect("ip -j addr show");
        let mut want: Vec<IpAddr> = infos
            .into_iter()
            .flat_map(|i| i.addr_info)
            .filter(|a| a.scope.as_deref() == Some("global"))
            .filter_map(|a| a.local.parse().ok())
            .collect();
        want.sort();
        want.dedup();
        assert_eq!(node_addresses(), want);
    }
}
