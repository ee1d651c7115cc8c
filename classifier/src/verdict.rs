//! Verdicts and drop reasons: what the packet path decided about one frame.

use std::fmt;

/// Index of an interface (pod veth, uplink queue set, host) in a snapshot's port table.
///
/// Ports are numbered by the control plane when it compiles a snapshot; the dataplane maps
/// them to sockets. They are small so that a burst's verdicts stay in one or two cache lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// What happens to one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (already rewritten) frame on this port.
    Forward(PortId),
    /// Hand the frame to the host's own network stack unchanged.
    ToHost,
    /// Transmit the frame, rewritten in place as a reply, back out of the port it came in on
    /// (proxy-ARP answers for the pod gateway).
    Reply,
    /// Drop the frame; the reason is counted.
    Drop(DropReason),
}

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// Why a frame was dropped. Every drop is counted per worker under its reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )*
        }

        impl DropReason {
            /// Every reason, in counter-index order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            /// Number of reasons; the length of a counter array.
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name used in metrics and CLI output.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }

            /// Index into a counter array.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

drop_reasons! {
    /// Shorter than an Ethernet header, or a header's length field points past the frame.
    Truncated = "truncated",
    /// A header is present but its fields are invalid (bad IHL, bad version, bad length).
    Malformed = "malformed",
    /// An EtherType the dataplane does not handle (e.g. LLDP, MPLS, stacked VLANs beyond two).
    UnsupportedEthertype = "unsupported_ethertype",
    /// An ARP packet that is not an Ethernet/IPv4 request or reply.
    UnsupportedArp = "unsupported_arp",
    /// The frame's source IP is not the address of the pod that owns the ingress interface.
    SpoofedSourceIp = "spoofed_source_ip",
    /// The frame's source MAC is not the MAC of the pod that owns the ingress interface.
    SpoofedSourceMac = "spoofed_source_mac",
    /// No route matches the destination address.
    NoRoute = "no_route",
    /// The TTL or hop limit would reach zero at this hop.
    TtlExpired = "ttl_expired",
    /// The source pod's egress policy does not allow the connection.
    PolicyEgress = "policy_egress",
    /// The destination pod's ingress policy does not allow the connection.
    PolicyIngress = "policy_ingress",
    /// A new connection claims one of the node's own addresses as its source but did not come
    /// from the node's stack (e.g. spoofed on the uplink).
    SpoofedHostSource = "spoofed_host_source",
    /// Traffic from a pod to its own node, refused by the node's configured default.
    PodToHostDenied = "pod_to_host_denied",
    /// A packet that cannot start a connection and belongs to none (e.g. a TCP ACK with no
    /// conntrack entry), or is invalid for the tracked state.
    CtInvalid = "ct_invalid",
    /// The conntrack table has no free slot and nothing that may be evicted for a new flow.
    CtFull = "ct_full",
    /// A non-first fragment whose first fragment was not seen (or was refused), and which no
    /// port-less rule allows.
    FragmentUnmatched = "fragment_unmatched",
    /// The frame is addressed to a reserved or impossible destination (multicast source,
    /// broadcast IP to a pod, IPv4 martian).
    Martian = "martian",
    /// A multicast or broadcast packet from a pod or the node's stack: ocelot routes unicast
    /// only, and such packets must not reach the host unfiltered.
    NotUnicast = "not_unicast",
    /// IPv6 neighbour discovery from a pod that the dataplane does not answer: router
    /// solicitations, advertisements, duplicate-address probes (solicitations are answered).
    NdpUnanswered = "ndp_unanswered",
    /// The egress port has no room (transmit ring or cross-worker hand-off full).
    TxFull = "tx_full",
    /// The next hop's MAC is not yet known.
    NeighborUnresolved = "neighbor_unresolved",
    /// The frame arrived on a port the current snapshot does not know (an interface that was
    /// just removed, or a dataplane bug).
    UnknownIngress = "unknown_ingress",
    /// An ICMP error (unreachable, time exceeded, …) that refers to no tracked connection.
    IcmpUnrelated = "icmp_unrelated",
    /// To or from a pod interface the datastore has no pod for: an interface that appeared
    /// while the agent did not know its pod, held isolated until the pod object arrives (the
    /// agent's `unknown_pods = "isolate"`), or a port whose pod is gone.
    UnknownPod = "unknown_pod",
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-worker counters. Owned by one worker and incremented without atomics on the packet
/// path; the worker publishes a copy for operators between bursts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames seen by `process_burst`.
    pub rx: u64,
    /// Frames forwarded to a port.
    pub forwarded: u64,
    /// Frames handed to the host stack.
    pub to_host: u64,
    /// Frames answered in place (proxy ARP).
    pub replied: u64,
    /// Frames whose verdict came from an existing conntrack entry (no policy evaluation).
    pub ct_hits: u64,
    /// Connections created after a policy evaluation allowed them.
    pub ct_created: u64,
    /// Drops per reason, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
}

impl Counters {
    /// Counts one verdict.
    #[inline]
    pub fn count(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Forward(_) => self.forwarded += 1,
            Verdict::ToHost => self.to_host += 1,
            Verdict::Reply => self.replied += 1,
            Verdict::Drop(reason) => self.drops[reason.index()] += 1,
        }
    }

    /// Total drops over every reason.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Drops for one reason.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Adds another worker's counters into these (for totals across workers).
    pub fn merge(&mut self, other: &Counters) {
        self.rx += other.rx;
        self.forwarded += other.forwarded;
        self.to_host += other.to_host;
        self.replied += other.replied;
        self.ct_hits += other.ct_hits;
        self.ct_created += other.ct_created;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_and_indexed_in_order() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn counters_count_and_merge() {
        let mut a = Counters::default();
        a.count(Verdict::Forward(PortId(1)));
        a.count(Verdict::Drop(DropReason::NoRoute));
        a.count(Verdict::Drop(DropReason::NoRoute));
        let mut b = Counters::default();
        b.count(Verdict::ToHost);
        b.merge(&a);
        assert_eq!(b.forwarded, 1);
        assert_eq!(b.to_host, 1);
        assert_eq!(b.drops_for(DropReason::NoRoute), 2);
        assert_eq!(b.dropped(), 2);
    }
}
