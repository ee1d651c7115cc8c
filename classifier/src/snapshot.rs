//! The immutable table set one burst is classified against.
//!
//! The control plane compiles a [`Snapshot`] (policy, routes, ports, node settings) and
//! publishes it with one atomic pointer swap; a worker loads the current snapshot once per
//! burst and never sees a half-built one. Nothing in here changes after construction, so a
//! snapshot can be shared by every worker without synchronisation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::lpm::Lpm;
use crate::net::Cidr;
use crate::policy::{EndpointId, PolicyTable};
use crate::verdict::PortId;

/// The link-local gateway every pod's default route points at (Calico's convention). The
/// dataplane answers ARP for it with the host-side MAC of the pod's veth.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What kind of interface a port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// The host side of a pod's veth. Frames arriving here must come from the pod's own
    /// addresses (workload reverse-path filtering).
    Pod {
        /// The pod's endpoint in the policy table, if it has one.
        endpoint: Option<EndpointId>,
        /// The pod's IPv4 address.
        ip4: Option<Ipv4Addr>,
        /// The pod's IPv6 address.
        ip6: Option<Ipv6Addr>,
        /// The MAC of the pod's `eth0`, when known; `None` skips the MAC check.
        pod_mac: Option<[u8; 6]>,
    },
    /// The node's uplink towards other nodes and the outside world.
    Uplink,
    /// The node's own stack, through the agent's tap device: frames the kernel sends to local
    /// pods arrive here, and `ToHost` frames leave here. A new connection from one of the
    /// node's own addresses (a [`HopKind::Host`] route) to a pod is admitted without policy,
    /// as Kubernetes specifies ("pods cannot block access from their resident node"); any
    /// other source the kernel forwards this way meets policy as usual.
    Host,
}

/// One interface of the node, as the packet path sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Interface name (for counters and logs).
    pub name: String,
    /// The MAC of our side of the link: the source MAC of frames we transmit on it, and the
    /// MAC proxy-ARP answers with.
    pub mac: [u8; 6],
    /// The kind of interface.
    pub kind: PortKind,
}

/// What a route leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HopKind {
    /// Out of a port to a directly attached host (a local pod): rewrite MACs, decrement TTL.
    Port,
    /// To the node's own stack (its own addresses).
    Host,
    /// Out of a port to a next hop whose MAC is not known yet (another node or the gateway
    /// being resolved): dropped as `neighbor_unresolved` until the control plane publishes
    /// the MAC.
    Unresolved,
    /// To a local pod interface the datastore does not know (yet), held isolated: dropped as
    /// `unknown_pod`, so that neither ocelot nor the kernel delivers to it.
    Isolated,
}

/// A resolved next hop: everything needed to rewrite and transmit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// What kind of hop this is.
    pub kind: HopKind,
    /// Egress port (ignored for `Host`).
    pub port: PortId,
    /// Source MAC to write (our MAC on the egress link).
    pub src_mac: [u8; 6],
    /// Destination MAC to write (the pod's or the gateway's MAC).
    pub dst_mac: [u8; 6],
}

/// Routes: an LPM table whose values index `hops`.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    lpm: Lpm,
    hops: Vec<NextHop>,
    hop_index: ahash::AHashMap<NextHop, u32>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    /// Adds (or replaces) a route. Identical next hops are stored once.
    pub fn insert(&mut self, prefix: Cidr, hop: NextHop) {
        let next = self.hops.len() as u32;
        let index = *self.hop_index.entry(hop).or_insert(next);
        if index == next {
            self.hops.push(hop);
        }
        self.lpm.insert(prefix, index);
    }

    /// The next hop for a destination.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<&NextHop> {
        self.lpm.lookup(dst).and_then(|i| self.hops.get(i as usize))
    }

    /// Removes a route; returns whether it existed. (Its next hop stays in the hop array
    /// until the table is rebuilt; hops are few and small.)
    pub fn remove(&mut self, prefix: Cidr) -> bool {
        self.lpm.remove(prefix).is_some()
    }

    /// Distinct next hops.
    pub fn hops(&self) -> &[NextHop] {
        &self.hops
    }

    /// The LPM table (for inspection and statistics).
    pub fn lpm(&self) -> &Lpm {
        &self.lpm
    }
}

/// What happens to traffic from a pod to its own node (Calico's
/// `DefaultEndpointToHostAction`). In every case the pod's egress policy is applied first:
/// this setting never lets a pod reach the host when its policy says no.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodToHost {
    /// Drop it (Calico's default): pods reach node services only through their service IPs.
    #[default]
    Drop,
    /// Hand it to the host stack when the pod's egress policy allows it.
    Accept,
}

/// Node-wide settings the packet path reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathConfig {
    /// Pod-to-node traffic.
    pub pod_to_host: PodToHost,
}

/// One immutable generation of every table the packet path reads.
#[derive(Debug)]
pub struct Snapshot {
    /// Generation number. Conntrack entries remember the policy epoch they were admitted
    /// under; a packet of an older connection re-checks policy once after a change.
    pub epoch: u32,
    /// Compiled NetworkPolicy.
    pub policy: PolicyTable,
    /// Routes.
    pub routes: RouteTable,
    /// Ports, indexed by [`PortId`].
    pub ports: Vec<Port>,
    /// Node settings.
    pub config: PathConfig,
}

impl Snapshot {
    /// The port a frame arrived on.
    #[inline]
    pub fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id.0 as usize)
    }
}
