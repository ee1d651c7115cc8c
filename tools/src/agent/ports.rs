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

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    addr_info: Vec<AddrEntry>,
}

#[derive(Debug, Deserialize)]
struct AddrEntry {
    local: String,
    prefixlen: u8,
    #[serde(default)]
    scope: Option<String>,
}

/// The global addresses of an interface with their prefix lengths.
pub fn interface_addresses(interface: &str) -> Vec<(std::net::IpAddr, u8)> {
    let infos: Vec<AddrInfo> =
        ip_json(&["-j", "addr", "show", "dev", interface]).unwrap_or_default();
    infos
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter(|a| a.scope.as_deref() != Some("link") && a.scope.as_deref() != Some("host"))
        .filter_map(|a| Some((a.local.parse().ok()?, a.prefixlen)))
        .collect()
}

/// The node's own addresses: the global addresses of every interface in the agent's
/// namespace (the uplink's, a loopback service address, any other NIC's).
pub fn node_addresses() -> Vec<std::net::IpAddr> {
    let infos: Vec<AddrInfo> = ip_json(&["-j", "addr", "show"]).unwrap_or_default();
    let mut out: Vec<std::net::IpAddr> = infos
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter(|a| a.scope.as_deref() == Some("global"))
        .filter_map(|a| a.local.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[derive(Debug, Deserialize)]
struct RouteEntry {
    #[serde(default)]
    gateway: Option<String>,
}

/// The kernel's default gateway out of `interface` (IPv4), if it has one.
pub fn default_gateway(interface: &str) -> Option<std::net::IpAddr> {
    let routes: Vec<RouteEntry> = ip_json(&["-j", "route", "show", "default", "dev", interface])?;
    routes.into_iter().find_map(|r| r.gateway?.parse().ok())
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
/// than INCOMPLETE and FAILED).
pub fn neighbors(interface: &str) -> std::collections::HashMap<std::net::IpAddr, [u8; 6]> {
    let entries: Vec<NeighEntry> =
        ip_json(&["-j", "neigh", "show", "dev", interface]).unwrap_or_default();
    entries
        .into_iter()
        .filter(|e| {
            !e.state
                .iter()
                .any(|s| s == "INCOMPLETE" || s == "FAILED" || s == "NOARP")
        })
        .filter_map(|e| Some((e.dst.parse().ok()?, parse_mac(e.lladdr.as_deref()?)?)))
        .collect()
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
