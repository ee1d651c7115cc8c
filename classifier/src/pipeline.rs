//! The batch entry point: a burst of frames in, one [`Verdict`] per frame out.
//!
//! For every frame, in order:
//! 1. **parse** ([`crate::parse`]); malformed frames drop with their reason.
//! 2. **ingress checks**: the port must exist in the snapshot; a frame from a pod port must
//!    carry that pod's source IP and MAC (Calico's workload RPF). ARP from a pod is answered
//!    in place by proxy-ARP ([`Verdict::Reply`]); ARP on the uplink goes to the host.
//! 3. **route** ([`crate::snapshot::RouteTable`]): no route drops; a host route means the
//!    node's own stack.
//! 4. **conntrack** ([`crate::conntrack`]): a packet of a tracked connection (either
//!    direction) is allowed without evaluating policy, unless the policy epoch changed since
//!    the connection was admitted, in which case the original direction is re-checked once.
//!    A packet that cannot open a connection and belongs to none drops as `ct_invalid`; an
//!    ICMP error is allowed only when the flow it quotes is tracked ("related").
//! 5. **policy** ([`crate::policy`]) for a new connection: source egress AND destination
//!    ingress; allowed connections are inserted into conntrack.
//! 6. **rewrite** ([`crate::rewrite`]): TTL / hop limit decremented (with an incremental
//!    checksum update), MACs set for the egress link.
//!
//! Fragments: the first fragment carries the ports and takes the normal path; when it is
//! forwarded, a fragment entry keyed by (source, destination, identification) is put into
//! conntrack, and later fragments of the same datagram follow it. A later fragment without such
//! an entry (reordered, or its first fragment was refused) is allowed only if policy allows the
//! address pair with a rule that names no port — so fragments can never bypass a port rule.
//!
//! Invariant: the per-burst path neither allocates nor locks. The snapshot is passed in by the
//! caller, who loads it once per burst.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::Nanos;
use crate::conntrack::{Conntrack, CtVerdict, Direction, FlowKey};
use crate::parse::{self, Fragment, IpMeta, L4, Net, PacketMeta};
use crate::policy::PolicyDecision;
use crate::rewrite;
use crate::snapshot::{HopKind, PodToHost, Port, PortKind, Snapshot};
use crate::verdict::{Counters, DropReason, PortId, Verdict};

/// The largest burst a worker hands to [`Worker::process_burst`] at once.
pub const BURST: usize = 64;

/// IP protocol number used for fragment-tracking entries in conntrack. 255 is reserved by
/// IANA, so no real flow can collide with it.
pub const FRAGMENT_PROTO: u8 = 255;

/// One received frame: its bytes (rewritten in place) and the port it arrived on.
#[derive(Debug)]
pub struct Packet<'a> {
    /// The frame, from the Ethernet header on.
    pub data: &'a mut [u8],
    /// The port it arrived on.
    pub ingress: PortId,
}

/// Per-worker classification state: the shared conntrack table and this worker's counters.
#[derive(Debug)]
pub struct Worker {
    ct: Arc<Conntrack>,
    counters: Counters,
}

impl Worker {
    /// A worker over a conntrack table shared with the other workers.
    pub fn new(ct: Arc<Conntrack>) -> Worker {
        Worker {
            ct,
            counters: Counters::default(),
        }
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The shared conntrack table.
    pub fn conntrack(&self) -> &Arc<Conntrack> {
        &self.ct
    }

    /// Classifies a burst. `verdicts[i]` receives the verdict for `pkts[i]`; frames to
    /// forward or reply are rewritten in place. Extra entries of the longer slice are left
    /// untouched.
    pub fn process_burst(
        &mut self,
        snap: &Snapshot,
        pkts: &mut [Packet<'_>],
        verdicts: &mut [Verdict],
        now: Nanos,
    ) {
        for (pkt, verdict) in pkts.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = self.process_one(snap, pkt.data, pkt.ingress, now);
        }
    }

    /// Classifies one frame (the entry point tests and tools use).
    pub fn process_one(
        &mut self,
        snap: &Snapshot,
        frame: &mut [u8],
        ingress: PortId,
        now: Nanos,
    ) -> Verdict {
        self.counters.rx += 1;
        let verdict = match self.classify(snap, frame, ingress, now) {
            Ok(v) => v,
            Err(reason) => Verdict::Drop(reason),
        };
        self.counters.count(verdict);
        verdict
    }

    fn classify(
        &mut self,
        snap: &Snapshot,
        frame: &mut [u8],
        ingress: PortId,
        now: Nanos,
    ) -> Result<Verdict, DropReason> {
        let meta = parse::parse(frame)?;
        let port = snap.port(ingress).ok_or(DropReason::UnknownIngress)?;
        let ip = match meta.net {
            Net::Arp(_) => return Ok(handle_arp(frame, &meta, port)),
            Net::Ip(ip) => ip,
        };
        if let PortKind::Pod {
            ip4, ip6, pod_mac, ..
        } = port.kind
        {
            check_pod_source(&meta, &ip, ip4, ip6, pod_mac)?;
            if is_neighbor_discovery(&ip) {
                // Pods resolve the gateway with NDP; the host stack answers (proxy NDP on the
                // host-side veth), as with Calico.
                return Ok(Verdict::ToHost);
            }
        }
        if !is_unicast(ip.dst) {
            return Ok(Verdict::ToHost);
        }
        let hop = *snap.routes.lookup(ip.dst).ok_or(DropReason::NoRoute)?;
        let from_pod = matches!(port.kind, PortKind::Pod { .. });
        self.admit(snap, frame, &meta, &ip, now)?;
        match hop.kind {
            HopKind::Host => {
                if from_pod && snap.config.pod_to_host == PodToHost::Drop {
                    return Err(DropReason::PodToHostDenied);
                }
                Ok(Verdict::ToHost)
            }
            HopKind::Port => {
                rewrite::decrement_ttl(frame, &meta)?;
                if !rewrite::set_macs(frame, hop.src_mac, hop.dst_mac) {
                    return Err(DropReason::Truncated);
                }
                Ok(Verdict::Forward(hop.port))
            }
        }
    }

    /// Conntrack and policy: decides whether this packet may pass at all.
    fn admit(
        &mut self,
        snap: &Snapshot,
        frame: &[u8],
        meta: &PacketMeta,
        ip: &IpMeta,
        now: Nanos,
    ) -> Result<(), DropReason> {
        if let Fragment::Later { id } = ip.fragment {
            return self.admit_later_fragment(snap, ip, id, now);
        }
        let key = FlowKey::from_ip(ip);
        match self.ct.track(&key, &ip.l4, now) {
            CtVerdict::Hit { dir, epoch } => {
                if epoch != snap.epoch {
                    self.revalidate(snap, &key, dir)?;
                }
                self.counters.ct_hits += 1;
            }
            CtVerdict::Invalid => return Err(DropReason::CtInvalid),
            CtVerdict::Miss => {
                if !Conntrack::can_open(&ip.l4, ip.src.is_ipv6()) {
                    return self.admit_related(frame, meta, ip, now);
                }
                decide(snap.policy.check(ip.src, ip.dst, ip.proto, dport(&ip.l4)))?;
                self.ct
                    .insert(&key, &ip.l4, snap.epoch, now)
                    .map_err(|_| DropReason::CtFull)?;
                self.counters.ct_created += 1;
            }
        }
        if let Fragment::First { id } = ip.fragment {
            // Best effort: if the table is full, later fragments fall back to port-less
            // policy, which is still safe.
            let _ = self
                .ct
                .insert(&fragment_key(ip, id), &L4::None, snap.epoch, now);
        }
        Ok(())
    }

    /// Re-checks a tracked connection after a policy change, in its original direction.
    fn revalidate(
        &mut self,
        snap: &Snapshot,
        key: &FlowKey,
        dir: Direction,
    ) -> Result<(), DropReason> {
        let (src, dst, dport) = match dir {
            Direction::Original => (key.src, key.dst, key.dport),
            Direction::Reply => (key.dst, key.src, key.sport),
        };
        let dport = Some(dport).filter(|_| has_ports(key.proto));
        match decide(snap.policy.check(src, dst, key.proto, dport)) {
            Ok(()) => {
                self.ct.set_epoch(key, snap.epoch);
                Ok(())
            }
            Err(reason) => {
                self.ct.remove(key);
                Err(reason)
            }
        }
    }

    fn admit_later_fragment(
        &mut self,
        snap: &Snapshot,
        ip: &IpMeta,
        id: u32,
        now: Nanos,
    ) -> Result<(), DropReason> {
        if let CtVerdict::Hit { .. } = self.ct.track(&fragment_key(ip, id), &L4::None, now) {
            self.counters.ct_hits += 1;
            return Ok(());
        }
        match snap.policy.check(ip.src, ip.dst, ip.proto, None) {
            PolicyDecision::Allow => Ok(()),
            _ => Err(DropReason::FragmentUnmatched),
        }
    }

    /// An ICMP error passes when the packet it quotes belongs to a tracked connection.
    fn admit_related(
        &mut self,
        frame: &[u8],
        meta: &PacketMeta,
        ip: &IpMeta,
        now: Nanos,
    ) -> Result<(), DropReason> {
        let L4::Icmp { ty, .. } = ip.l4 else {
            return Err(DropReason::CtInvalid);
        };
        if !is_icmp_error(ip.src.is_ipv6(), ty) {
            return Err(DropReason::CtInvalid);
        }
        let quoted = frame
            .get(meta.l4_offset as usize + 8..)
            .and_then(|inner| quoted_flow(inner, ip.src.is_ipv6()))
            .ok_or(DropReason::IcmpUnrelated)?;
        if self.ct.contains(&quoted, now) {
            Ok(())
        } else {
            Err(DropReason::IcmpUnrelated)
        }
    }
}

fn decide(decision: PolicyDecision) -> Result<(), DropReason> {
    match decision {
        PolicyDecision::Allow => Ok(()),
        PolicyDecision::DenyEgress => Err(DropReason::PolicyEgress),
        PolicyDecision::DenyIngress => Err(DropReason::PolicyIngress),
    }
}

fn handle_arp(frame: &mut [u8], meta: &PacketMeta, port: &Port) -> Verdict {
    match port.kind {
        PortKind::Uplink => Verdict::ToHost,
        PortKind::Pod { ip4, pod_mac, .. } => {
            let Net::Arp(arp) = meta.net else {
                return Verdict::Drop(DropReason::UnsupportedArp);
            };
            if Some(arp.sender_ip) != ip4 && !arp.sender_ip.is_unspecified() {
                return Verdict::Drop(DropReason::SpoofedSourceIp);
            }
            if pod_mac.is_some_and(|m| m != meta.src_mac || m != arp.sender_mac) {
                return Verdict::Drop(DropReason::SpoofedSourceMac);
            }
            // Calico answers every ARP request from a pod with the host-side MAC: the pod's
            // only neighbour is the gateway, whatever address it asks for.
            if arp.operation == 1
                && Some(arp.target_ip) != ip4
                && rewrite::arp_reply_in_place(frame, meta, port.mac)
            {
                Verdict::Reply
            } else {
                Verdict::Drop(DropReason::UnsupportedArp)
            }
        }
    }
}

fn check_pod_source(
    meta: &PacketMeta,
    ip: &IpMeta,
    ip4: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    pod_mac: Option<[u8; 6]>,
) -> Result<(), DropReason> {
    let ok = match ip.src {
        IpAddr::V4(a) => Some(a) == ip4,
        // Link-local sources are how NDP works; they are never routed.
        IpAddr::V6(a) => Some(a) == ip6 || (a.segments()[0] & 0xffc0 == 0xfe80),
    };
    if !ok {
        return Err(DropReason::SpoofedSourceIp);
    }
    if pod_mac.is_some_and(|m| m != meta.src_mac) {
        return Err(DropReason::SpoofedSourceMac);
    }
    Ok(())
}

fn is_neighbor_discovery(ip: &IpMeta) -> bool {
    matches!(ip.l4, L4::Icmp { ty: 133..=137, .. }) && ip.src.is_ipv6()
}

fn is_unicast(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    }
}

fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

fn dport(l4: &L4) -> Option<u16> {
    match *l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } | L4::Sctp { dport, .. } => Some(dport),
        L4::Icmp { .. } | L4::None => None,
    }
}

fn fragment_key(ip: &IpMeta, id: u32) -> FlowKey {
    FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport: (id >> 16) as u16,
        dport: id as u16,
        proto: FRAGMENT_PROTO,
    }
}

/// The flow key of the packet an ICMP error quotes (its IP header and first 8 bytes).
fn quoted_flow(inner: &[u8], v6: bool) -> Option<FlowKey> {
    let (src, dst, proto, l4) = if v6 {
        let h = inner.get(..40)?;
        let src: [u8; 16] = h.get(8..24)?.try_into().ok()?;
        let dst: [u8; 16] = h.get(24..40)?.try_into().ok()?;
        (
            IpAddr::from(src),
            IpAddr::from(dst),
            *h.get(6)?,
            inner.get(40..)?,
        )
    } else {
        let ihl = usize::from(inner.first()? & 0x0f) * 4;
        let h = inner.get(..ihl.max(20))?;
        let src: [u8; 4] = h.get(12..16)?.try_into().ok()?;
        let dst: [u8; 4] = h.get(16..20)?.try_into().ok()?;
        (
            IpAddr::from(src),
            IpAddr::from(dst),
            *h.get(9)?,
            inner.get(ihl..)?,
        )
    };
    let word = |i: usize| Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?]));
    let (sport, dport) = match proto {
        6 | 17 | 132 => (word(0)?, word(2)?),
        // The quoted packet of an echo: the identifier is bytes 4..6.
        1 | 58 => {
            let id = word(4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Some(FlowKey {
        src,
        dst,
        sport,
        dport,
        proto,
    })
}
