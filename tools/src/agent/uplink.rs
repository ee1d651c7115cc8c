//! The node's uplink: ocelot's XDP program on it, the local pods it redirects, and next-hop
//! resolution through the kernel.
//!
//! The uplink carries the node's own traffic too (SSH, kubelet, the API server, BGP, DHCP),
//! so ocelot's program (`dataplane::sys::UplinkProgram`) redirects to the workers only
//! frames addressed to a local pod and passes everything else — ARP and NDP included — to the
//! kernel. That keeps the kernel's own neighbour resolution working, and ocelot uses it
//! instead of running ARP itself: for the gateway and for every other node's address on the
//! uplink's subnets it asks for a *managed* neighbour entry (the kernel resolves and refreshes
//! it on its own), and it reads the table every control tick. A next hop not resolved yet
//! makes its routes `Unresolved` (frames drop as `neighbor_unresolved`) until it is.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::{Context, Result};
use control::manifests::Manifests;
use dataplane::sys::{self, SocketHandle, UplinkProgram, XdpMode};
use serde_json::{Value, json};

use super::config::UplinkConfig;
use super::ports;

/// What the snapshot needs from the uplink, refreshed every tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UplinkView {
    /// The node's own addresses on the uplink.
    pub host_addresses: Vec<IpAddr>,
    /// The default gateway.
    pub gateway: Option<IpAddr>,
    /// Resolved next hops.
    pub neighbors: HashMap<IpAddr, [u8; 6]>,
}

/// The attached uplink.
#[derive(Debug)]
pub struct Uplink {
    /// Interface name.
    pub interface: String,
    program: UplinkProgram,
    local: BTreeSet<IpAddr>,
    managed: BTreeSet<IpAddr>,
    configured_gateway: Option<IpAddr>,
}

impl Uplink {
    /// Attaches ocelot's program to the uplink (after removing one a crashed run left).
    pub fn attach(cfg: &UplinkConfig, mode: XdpMode) -> Result<Uplink> {
        if let Some(prog) = sys::detach_stale_xsk_prog(&cfg.interface)
            .with_context(|| format!("uplink {}", cfg.interface))?
        {
            tracing::warn!(
                "removed XDP program {prog} a previous run left on {}",
                cfg.interface
            );
        }
        let program = UplinkProgram::attach(&cfg.interface, mode)
            .with_context(|| format!("attaching ocelot's XDP program to {}", cfg.interface))?;
        Ok(Uplink {
            interface: cfg.interface.clone(),
            program,
            local: BTreeSet::new(),
            managed: BTreeSet::new(),
            configured_gateway: cfg.gateway,
        })
    }

    /// Puts the workers' uplink sockets into the program's XSKMAP.
    pub fn register(&self, handles: &[SocketHandle]) -> Result<()> {
        for h in handles {
            self.program
                .register_handle(*h)
                .with_context(|| format!("registering the socket of queue {}", h.queue))?;
        }
        Ok(())
    }

    /// Makes the program redirect exactly `ips` (the attached local pods' addresses).
    pub fn sync_local_pods(&mut self, ips: &BTreeSet<IpAddr>) {
        for gone in self.local.difference(ips) {
            if let Err(e) = self.program.set_local_pod(*gone, false) {
                tracing::error!("removing local pod {gone} from the uplink program: {e}");
            }
        }
        for new in ips.difference(&self.local) {
            if let Err(e) = self.program.set_local_pod(*new, true) {
                tracing::error!("adding local pod {new} to the uplink program: {e}");
            }
        }
        self.local = ips.clone();
    }

    /// Reads the node's addresses, gateway and neighbours; asks the kernel to resolve the
    /// gateway and the other nodes' addresses that are on the uplink's subnets.
    pub fn refresh(&mut self, manifests: &Manifests, node_name: &str) -> UplinkView {
        let addrs = ports::interface_addresses(&self.interface);
        let gateway = self
            .configured_gateway
            .or_else(|| ports::default_gateway(&self.interface));
        let mut wanted: BTreeSet<IpAddr> = manifests
            .nodes
            .iter()
            .filter(|n| n.name != node_name)
            .flat_map(|n| n.internal_ips.iter().copied())
            .collect();
        wanted.extend(gateway);
        wanted.retain(|ip| ports::on_link(&addrs, *ip) && !addrs.iter().any(|(a, _)| a == ip));
        let neighbors = ports::neighbors(&self.interface, wanted.iter().any(IpAddr::is_ipv6));
        for ip in &wanted {
            if !self.managed.contains(ip) && ports::manage_neighbor(&self.interface, *ip) {
                self.managed.insert(*ip);
            }
        }
        for gone in self
            .managed
            .difference(&wanted)
            .copied()
            .collect::<Vec<_>>()
        {
            ports::forget_neighbor(&self.interface, gone);
            self.managed.remove(&gone);
        }
        UplinkView {
            host_addresses: addrs.iter().map(|(a, _)| *a).collect(),
            gateway,
            neighbors: neighbors
                .into_iter()
                .filter(|(ip, _)| wanted.contains(ip))
                .collect(),
        }
    }

    /// Refreshes until every wanted next hop is resolved or `limit` passes (at start, so the
    /// first snapshot does not drop traffic to other nodes while the kernel resolves them).
    pub fn wait_resolved(
        &mut self,
        manifests: &Manifests,
        node_name: &str,
        limit: std::time::Duration,
    ) -> UplinkView {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let view = self.refresh(manifests, node_name);
            let all = self
                .managed
                .iter()
                .all(|ip| view.neighbors.contains_key(ip));
            if all || std::time::Instant::now() >= deadline {
                return view;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The program's counters, for the status file.
    pub fn status(&self) -> Value {
        match self.program.counters() {
            Ok(c) => json!({
                "interface": self.interface,
                "redirected": c.redirected,
                "passed_not_pod": c.passed_not_pod,
                "passed_failsafe": c.passed_failsafe,
                "passed_arp_ndp": c.passed_arp_ndp,
                "passed_unparsed": c.passed_unparsed,
                "passed_other": c.passed_other,
                "no_socket": c.no_socket,
                "local_pods": self.local.len(),
                "managed_neighbors": self.managed.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            }),
            Err(e) => json!({"interface": self.interface, "error": e.to_string()}),
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        for ip in &self.managed {
            ports::forget_neighbor(&self.interface, *ip);
        }
    }
}
