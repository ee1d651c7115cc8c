//! Pod interfaces the datastore does not know: how the agent finds them and their addresses.
//!
//! A pod's host-side veth may exist before the agent knows the pod: created while the API
//! server was unreachable, or before the pod object reached this node's watch. The agent
//! notices every interface of its network namespace named the way Calico names pod veths
//! (`cali` and 11 lowercase hex digits, [`control::naming`]) that matches no pod it knows,
//! and learns the pod's addresses the way the host knows them: the host routes (/32, /128,
//! `dev caliXXXX`) a CNI plugin installs for each pod address. The config's
//! `[datastore] unknown_pods` says what is done with such an interface (`config::UnknownPods`).
//!
//! Both lists come from `/proc/net` of the agent's namespace (`dev`, `route`, `ipv6_route`):
//! plain file reads each control tick, no netlink socket and no child process.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use control::naming::DEFAULT_PREFIX;

/// Whether `name` is shaped like a Calico pod veth: the prefix and 11 lowercase hex digits.
pub fn is_pod_interface(name: &str) -> bool {
    name.strip_prefix(DEFAULT_PREFIX).is_some_and(|rest| {
        rest.len() == 11 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The interface names of a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Host routes (/32) per interface of a `/proc/net/route` text (the main table). Routes via
/// a gateway are not a pod's address and are skipped.
pub fn parse_route_v4(text: &str) -> Vec<(String, IpAddr)> {
    const RTF_GATEWAY: u32 = 0x2;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(dst), Some(flags), Some(mask)) =
            (f.first(), f.get(1), f.get(3), f.get(7))
        else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dst), Some(flags), Some(mask)) = (hex(dst), hex(flags), hex(mask)) else {
            continue;
        };
        if mask != u32::MAX || flags & RTF_GATEWAY != 0 {
            continue;
        }
        // The kernel prints the network-order address as a native integer.
        let ip = Ipv4Addr::from(dst.to_ne_bytes());
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            continue;
        }
        out.push(((*iface).to_owned(), IpAddr::V4(ip)));
    }
    out
}

/// Host routes (/128) per interface of a `/proc/net/ipv6_route` text. The kernel lists every
/// table there; local routes (the host's own addresses), routes via a gateway, link-local and
/// multicast destinations are skipped.
pub fn parse_route_v6(text: &str) -> Vec<(String, IpAddr)> {
    const RTF_GATEWAY: u32 = 0x2;
    const RTF_LOCAL: u32 = 0x8000_0000;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dst), Some(len), Some(flags), Some(iface)) =
            (f.first(), f.get(1), f.get(8), f.get(9))
        else {
            continue;
        };
        let (Ok(dst), Ok(len), Ok(flags)) = (
            u128::from_str_radix(dst, 16),
            u8::from_str_radix(len, 16),
            u32::from_str_radix(flags, 16),
        ) else {
            continue;
        };
        if len != 128 || flags & (RTF_GATEWAY | RTF_LOCAL) != 0 {
            continue;
        }
        let ip = Ipv6Addr::from(dst);
        if ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_loopback()
            || ip.segments()[0] & 0xffc0 == 0xfe80
        {
            continue;
        }
        out.push(((*iface).to_owned(), IpAddr::V6(ip)));
    }
    out
}

/// The pod-shaped interfaces of the agent's namespace.
pub fn pod_interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| is_pod_interface(n))
        .collect()
}

/// The host routes of the agent's namespace: interface → addresses routed to it alone,
/// IPv4 first, each family in the kernel's order.
pub fn host_routes() -> BTreeMap<String, Vec<IpAddr>> {
    read_host_routes().unwrap_or_default()
}

/// [`host_routes`], failing when the IPv4 table cannot be read (a node without IPv6 has no
/// `/proc/net/ipv6_route`, which counts as no IPv6 routes).
pub fn read_host_routes() -> std::io::Result<BTreeMap<String, Vec<IpAddr>>> {
    let v4 = std::fs::read_to_string("/proc/net/route")?;
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (iface, ip) in parse_route_v4(&v4).into_iter().chain(parse_route_v6(&v6)) {
        let ips = out.entry(iface).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interface_names() {
        for (name, expected) in [
            ("calic440f455693", true),
            ("cali0123456789a", true),
            ("cali0123456789", false),
            ("cali0123456789ab", false),
            ("caliC440F455693", false),
            ("calig440f455693", false),
            ("eth0", false),
            ("tunl0", false),
        ] {
            assert_eq!(is_pod_interface(name), expected, "{name}");
        }
        assert!(is_pod_interface(&control::naming::veth_name("x", "a")));
    }

    #[test]
    fn net_dev_names() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets\n    lo: 0 0 0\n\
                    calic440f455693: 1 2 3\n  eth0:12 3\n";
        assert_eq!(parse_net_dev(text), ["lo", "calic440f455693", "eth0"]);
    }

    #[test]
    fn host_routes_from_proc() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  calic440f455693\t0301010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t0401010A\t010200C0\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  garbage line\n";
        let want: IpAddr = "10.1.1.3".parse().unwrap();
        assert_eq!(
            parse_route_v4(v4),
            [("calic440f455693".to_owned(), want)],
            "only the /32 without a gateway"
        );
        let v6 = "fd000000000000000000000000000003 80 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000400 00000001 00000000 00000001 calic440f455693\n\
                  fe80000000000000000000000000abcd 80 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000000 00000001 00000000 80200001 calic440f455693\n\
                  fd000000000000000000000000000009 80 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000000 00000001 00000000 80200001 calic440f455693\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
                  00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        let want6: IpAddr = "fd00::3".parse().unwrap();
        assert_eq!(
            parse_route_v6(v6),
            [("calic440f455693".to_owned(), want6)],
            "only the /128 that is neither local nor link-local"
        );
    }
}
