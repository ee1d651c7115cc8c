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

use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::Nanos;
use crate::conntrack::{Conntrack, CtPrefetch, CtVerdict, Direction, FlowKey, Load, Touch};
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
///
/// `T` is how the burst's slot pass brings each tracked flow's conntrack slot in
/// ([`Touch`]): plain loads by default; the AF_XDP workers use the CPU's prefetch
/// instruction (`dataplane::sys::Prefetch`).
pub struct Worker<T: Touch = Load> {
    engine: Engine<T>,
    /// Sum of the words the prefetch stage loaded; kept only so the loads are not optimised
    /// away.
    touched: u64,
    /// Whether bursts run the conntrack prefetch stages (on by default; off only to measure
    /// what they are worth).
    prefetch: bool,
    /// Whether the slot pass uses `T` (on by default) or plain loads (off only to measure
    /// what `T` is worth).
    touch: bool,
    /// The first prefetch pass's results, one per frame of the burst. Kept between bursts
    /// (read only where the burst's `staged` flag says this burst wrote them) so that no
    /// burst spends 5 KiB of stores initialising them: measured ~1.3 ns per packet.
    touches: [CtPrefetch; BURST],
}

/// What classifying one frame needs: the shared conntrack table and the counters. Apart
/// from [`Worker`]'s burst arrays, so that a frame's prefetch can be lent from those while
/// this is borrowed mutably.
///
/// Generic over the worker's `T` only so that it is compiled where the worker is (as a
/// non-generic type in this crate, the lookups were no longer inlined into it: +55
/// instructions per packet).
#[derive(Debug)]
struct Engine<T> {
    ct: Arc<Conntrack>,
    counters: Counters,
    _touch: PhantomData<T>,
}

impl<T: Touch> std::fmt::Debug for Worker<T> {
    /// The state that means something between bursts (not the burst's scratch array).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("conntrack", &self.engine.ct)
            .field("counters", &self.engine.counters)
            .field("prefetch", &self.prefetch)
            .field("touch", &self.touch)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker over a conntrack table shared with the other workers, whose prefetch passes
    /// use plain loads.
    pub fn new(ct: Arc<Conntrack>) -> Worker {
        Worker::with_touch(ct)
    }
}

impl<T: Touch> Worker<T> {
    /// A worker over a conntrack table shared with the other workers, whose slot pass
    /// brings slots in by `T`.
    pub fn with_touch(ct: Arc<Conntrack>) -> Worker<T> {
        Worker {
            engine: Engine {
                ct,
                counters: Counters::default(),
                _touch: PhantomData,
            },
            touched: 0,
            prefetch: true,
            touch: true,
            touches: [CtPrefetch::default(); BURST],
        }
    }

    /// Turns the burst's conntrack prefetch stages on or off (for A/B benchmarks).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// Makes the slot pass use plain loads instead of `T` when `on` is false (for A/B
    /// benchmarks).
    pub fn set_touch(&mut self, on: bool) {
        self.touch = on;
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Counters {
        &self.engine.counters
    }

    /// The shared conntrack table.
    pub fn conntrack(&self) -> &Arc<Conntrack> {
        &self.engine.ct
    }

    /// Classifies a burst. `verdicts[i]` receives the verdict for `pkts[i]`; frames to
    /// forward or reply are rewritten in place. Extra entries of the longer slice are left
    /// untouched. Bursts longer than [`BURST`] are processed [`BURST`] frames at a time.
    ///
    /// The stages run over the whole burst before the next one starts (VPP's vector model):
    /// parse every frame, then load the conntrack tag words of every flow, then the slots
    /// they point at, then classify. The middle stages issue independent memory loads for
    /// all frames at once, so their cache misses overlap instead of being paid one after
    /// another in the last stage.
    pub fn process_burst(
        &mut self,
        snap: &Snapshot,
        pkts: &mut [Packet<'_>],
        verdicts: &mut [Verdict],
        now: Nanos,
    ) {
        for (pkts, verdicts) in pkts.chunks_mut(BURST).zip(verdicts.chunks_mut(BURST)) {
            let n = pkts.len().min(verdicts.len());
            // `metas` is filled for the first `n` frames before it is read, and only those are
            // read; a frame's prefetch record is read only where this burst's `staged` flag
            // says this burst wrote it (the array outlives the burst). So a frame never sees
            // a meta or a prefetch of another frame.
            let mut metas = [Err(DropReason::Truncated); BURST];
            for (meta, pkt) in metas.iter_mut().zip(pkts.iter()).take(n) {
                parse::parse_into(pkt.data, meta);
            }
            let touches = &mut self.touches;
            let mut staged = [false; BURST];
            let upto = if self.prefetch { n } else { 0 };
            for ((touch, has), meta) in touches.iter_mut().zip(&mut staged).zip(&metas).take(upto) {
                if let Ok(PacketMeta {
                    net: Net::Ip(ip), ..
                }) = meta
                {
                    self.engine.ct.prefetch_ip_into(ip, touch);
                    *has = true;
                }
            }
            let touched = if self.touch {
                slot_pass::<T>(&self.engine.ct, touches, &staged, upto)
            } else {
                slot_pass::<Load>(&self.engine.ct, touches, &staged, upto)
            };
            self.touched = self.touched.wrapping_add(touched);
            // Iterated by reference: moving the arrays into the iterator copied them whole.
            let frames = pkts.iter_mut().zip(verdicts.iter_mut());
            let staged = touches.iter().zip(&staged);
            for ((pkt, verdict), (meta, (touch, has))) in frames.zip(metas.iter().zip(staged)) {
                *verdict = self
                    .engine
                    .finish(snap, pkt, meta, has.then_some(touch), now);
            }
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
        let meta = parse::parse(frame);
        let mut pkt = Packet {
            data: frame,
            ingress,
        };
        self.engine.finish(snap, &mut pkt, &meta, None, now)
    }
}

impl<T> Engine<T> {
    /// Everything after parsing, and the counting. `ct` is the frame's conntrack prefetch,
    /// made from the flow key of this `meta`, when the burst ran the prefetch stages.
    #[inline]
    fn finish(
        &mut self,
        snap: &Snapshot,
        pkt: &mut Packet<'_>,
        meta: &Result<PacketMeta, DropReason>,
        ct: Option<&CtPrefetch>,
        now: Nanos,
    ) -> Verdict {
        self.counters.rx += 1;
        // The meta is read in place, never copied: it is 72 bytes, and each copy of it (and of
        // its `IpMeta`) cost a dozen instructions per packet.
        let classified = match meta {
            Ok(meta) => self.classify(snap, pkt.data, meta, pkt.ingress, ct, now),
            Err(reason) => Err(*reason),
        };
        // Counted where the verdict is still a `Result`: turning it into a `Verdict` first
        // and then matching that again cost a jump table per packet.
        match classified {
            Ok(Verdict::Forward(port)) => {
                self.counters.forwarded += 1;
                Verdict::Forward(port)
            }
            Ok(verdict) => {
                self.counters.count(verdict);
                verdict
            }
            Err(reason) => {
                let verdict = Verdict::Drop(reason);
                self.counters.count(verdict);
                verdict
            }
        }
    }

    fn classify(
        &mut self,
        snap: &Snapshot,
        frame: &mut [u8],
        meta: &PacketMeta,
        ingress: PortId,
        ct: Option<&CtPrefetch>,
        now: Nanos,
    ) -> Result<Verdict, DropReason> {
        let port = snap.port(ingress).ok_or(DropReason::UnknownIngress)?;
        let ip = match &meta.net {
            Net::Arp(_) => return Ok(handle_arp(frame, meta, port)),
            Net::Ip(ip) => ip,
        };
        let origin = match &port.kind {
            PortKind::Pod {
                ip4, ip6, pod_mac, ..
            } => {
                check_pod_source(meta, ip, ip4, ip6, pod_mac)?;
                if is_neighbor_discovery(ip) {
                    return answer_ndp(frame, meta, ip, port.mac, *ip6);
                }
                Origin::Pod
            }
            PortKind::Uplink => Origin::Uplink,
            PortKind::Host => Origin::Host,
        };
        if !is_unicast(ip.dst) {
            return match origin {
                Origin::Uplink => Ok(Verdict::ToHost),
                Origin::Pod | Origin::Host => Err(DropReason::NotUnicast),
            };
        }
        // Held by reference: a copy of the 16-byte hop lived in registers spilled across the
        // conntrack call.
        let hop = snap.routes.lookup(ip.dst).ok_or(DropReason::NoRoute)?;
        match hop.kind {
            HopKind::Unresolved => return Err(DropReason::NeighborUnresolved),
            HopKind::Isolated => return Err(DropReason::UnknownPod),
            HopKind::Port | HopKind::Host => {}
        }
        self.admit(snap, frame, meta, ip, ct, now, (origin, hop.kind))?;
        match hop.kind {
            HopKind::Host => Ok(Verdict::ToHost),
            HopKind::Unresolved => Err(DropReason::NeighborUnresolved),
            HopKind::Isolated => Err(DropReason::UnknownPod),
            HopKind::Port => {
                rewrite::route_in_place(frame, ip, meta.l3_offset, &hop.src_mac, &hop.dst_mac)?;
                Ok(Verdict::Forward(hop.port))
            }
        }
    }

    /// Conntrack and policy: decides whether this packet may pass at all. `ct`, when given,
    /// was made by [`Conntrack::prefetch_tags`] from `FlowKey::from_ip(ip)`. `path` is where
    /// the packet came from and what its route leads to (only new connections look at it).
    #[allow(clippy::too_many_arguments)] // The hot path's arguments, passed in registers.
    fn admit(
        &mut self,
        snap: &Snapshot,
        frame: &[u8],
        meta: &PacketMeta,
        ip: &IpMeta,
        ct: Option<&CtPrefetch>,
        now: Nanos,
        path: (Origin, HopKind),
    ) -> Result<(), DropReason> {
        if let Fragment::Later { id } = ip.fragment {
            return self.admit_later_fragment(snap, ip, id, now, path.0);
        }
        // The flow key is built only where a path needs it: with a prefetch, the common hit
        // and the insert work from the prefetch's normalised key instead.
        let tracked = match ct {
            Some(p) => self.ct.track_prefetched(p, &ip.l4, now),
            None => self.ct.track(&FlowKey::from_ip(ip), &ip.l4, now),
        };
        match tracked {
            CtVerdict::Hit { dir, epoch } => {
                if epoch != snap.epoch {
                    self.revalidate(snap, &FlowKey::from_ip(ip), dir)?;
                }
                self.counters.ct_hits += 1;
            }
            CtVerdict::Invalid => return Err(DropReason::CtInvalid),
            CtVerdict::Miss => self.admit_new(snap, frame, meta, ip, ct, now, path)?,
        }
        if let Fragment::First { id } = ip.fragment {
            self.track_first_fragment(snap, ip, id, now);
        }
        Ok(())
    }

    /// A packet that belongs to no tracked connection: policy decides, and an allowed
    /// connection is inserted. Out of line (as are the other rare paths below) so that the
    /// established path, which never comes here, keeps its registers and a short prologue.
    ///
    /// The node's own traffic: a connection from one of the node's addresses that came from
    /// its stack (the host port) is admitted without policy (Kubernetes: pods cannot block
    /// their own node); one that claims such a source from anywhere else is spoofed. A pod's
    /// connection to the node meets the pod's egress policy first, then the node's
    /// [`PodToHost`] default.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)] // As `admit`.
    fn admit_new(
        &mut self,
        snap: &Snapshot,
        frame: &[u8],
        meta: &PacketMeta,
        ip: &IpMeta,
        ct: Option<&CtPrefetch>,
        now: Nanos,
        (origin, to): (Origin, HopKind),
    ) -> Result<(), DropReason> {
        if !Conntrack::can_open(&ip.l4, ip.src.is_ipv6()) {
            return self.admit_related(frame, meta, ip, now);
        }
        let from_node = is_host_address(snap, ip.src);
        match (origin, from_node) {
            (Origin::Host, true) => {}
            (_, true) => return Err(DropReason::SpoofedHostSource),
            (_, false) => {
                decide(snap.policy.check(ip.src, ip.dst, ip.proto, dport(&ip.l4)))?;
                if to == HopKind::Host
                    && origin == Origin::Pod
                    && snap.config.pod_to_host == PodToHost::Drop
                {
                    return Err(DropReason::PodToHostDenied);
                }
            }
        }
        match ct {
            Some(p) => self.ct.insert_prefetched(p, &ip.l4, snap.epoch, now),
            None => self
                .ct
                .insert(&FlowKey::from_ip(ip), &ip.l4, snap.epoch, now),
        }
        .map_err(|_| DropReason::CtFull)?;
        self.counters.ct_created += 1;
        Ok(())
    }

    /// Puts the fragment entry later fragments of this first fragment's datagram follow.
    #[cold]
    #[inline(never)]
    fn track_first_fragment(&mut self, snap: &Snapshot, ip: &IpMeta, id: u32, now: Nanos) {
        // Best effort: if the table is full, later fragments fall back to port-less
        // policy, which is still safe.
        let _ = self
            .ct
            .insert(&fragment_key(ip, id), &L4::None, snap.epoch, now);
    }

    /// Re-checks a tracked connection after a policy change, in its original direction.
    #[cold]
    #[inline(never)]
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
        // A connection the node opened was admitted without policy (see `admit_new`); only
        // the host port can have inserted one with a node source.
        let decision = if is_host_address(snap, src) {
            PolicyDecision::Allow
        } else {
            snap.policy.check(src, dst, key.proto, dport)
        };
        match decide(decision) {
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

    #[cold]
    #[inline(never)]
    fn admit_later_fragment(
        &mut self,
        snap: &Snapshot,
        ip: &IpMeta,
        id: u32,
        now: Nanos,
        origin: Origin,
    ) -> Result<(), DropReason> {
        if let CtVerdict::Hit { .. } = self.ct.track(&fragment_key(ip, id), &L4::None, now) {
            self.counters.ct_hits += 1;
            return Ok(());
        }
        if is_host_address(snap, ip.src) {
            return match origin {
                Origin::Host => Ok(()),
                _ => Err(DropReason::SpoofedHostSource),
            };
        }
        match snap.policy.check(ip.src, ip.dst, ip.proto, None) {
            PolicyDecision::Allow => Ok(()),
            _ => Err(DropReason::FragmentUnmatched),
        }
    }

    /// An ICMP error passes when the packet it quotes belongs to a tracked connection.
    #[inline(never)]
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
        if self.ct.get(&quoted, now).is_some() {
            Ok(())
        } else {
            Err(DropReason::IcmpUnrelated)
        }
    }
}

/// Where a packet entered the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Pod,
    Uplink,
    Host,
}

/// Whether `addr` is one of the node's own addresses (routed to the host stack).
fn is_host_address(snap: &Snapshot, addr: IpAddr) -> bool {
    snap.routes
        .lookup(addr)
        .is_some_and(|h| h.kind == HopKind::Host)
}

fn decide(decision: PolicyDecision) -> Result<(), DropReason> {
    match decision {
        PolicyDecision::Allow => Ok(()),
        PolicyDecision::DenyEgress => Err(DropReason::PolicyEgress),
        PolicyDecision::DenyIngress => Err(DropReason::PolicyIngress),
    }
}

#[inline(never)]
fn handle_arp(frame: &mut [u8], meta: &PacketMeta, port: &Port) -> Verdict {
    match port.kind {
        PortKind::Uplink => Verdict::ToHost,
        // The node's stack asks for the pods it routes to the host port (the agent installs
        // permanent neighbour entries, so only when one is missing): every answer is the host
        // port's MAC, and the frame then meets the route and policy as any other.
        PortKind::Host => match meta.net {
            Net::Arp(arp)
                if arp.operation == 1 && rewrite::arp_reply_in_place(frame, meta, port.mac) =>
            {
                Verdict::Reply
            }
            _ => Verdict::Drop(DropReason::UnsupportedArp),
        },
        PortKind::Pod {
            ip4, ip6, pod_mac, ..
        } => {
            let Net::Arp(arp) = meta.net else {
                return Verdict::Drop(DropReason::UnsupportedArp);
            };
            if ip4.is_none() && ip6.is_none() {
                // No address: a port whose pod the datastore does not know (or no longer).
                return Verdict::Drop(DropReason::UnknownPod);
            }
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

/// A pod's neighbour discovery: solicitations are answered with the host side's MAC
/// (whatever address they ask for, as proxy-ARP does); the rest — router solicitations,
/// advertisements, duplicate-address probes — has no one to go to on a routed veth.
#[inline(never)]
fn answer_ndp(
    frame: &mut [u8],
    meta: &PacketMeta,
    ip: &IpMeta,
    our_mac: [u8; 6],
    own: Option<Ipv6Addr>,
) -> Result<Verdict, DropReason> {
    if rewrite::ndp_advert_in_place(frame, meta, ip, our_mac, own) {
        Ok(Verdict::Reply)
    } else {
        Err(DropReason::NdpUnanswered)
    }
}

/// The burst's second prefetch pass: brings in, by `T`, the conntrack slot each frame's tag
/// word points at. Returns the sum of what was loaded (see [`Touch::touch`]).
#[inline]
fn slot_pass<T: Touch>(
    ct: &Conntrack,
    touches: &[CtPrefetch; BURST],
    staged: &[bool; BURST],
    n: usize,
) -> u64 {
    let mut touched = 0u64;
    for (touch, has) in touches.iter().zip(staged).take(n) {
        if *has {
            touched = touched.wrapping_add(ct.prefetch_slot_with::<T>(touch));
        }
    }
    touched
}

fn check_pod_source(
    meta: &PacketMeta,
    ip: &IpMeta,
    ip4: &Option<Ipv4Addr>,
    ip6: &Option<Ipv6Addr>,
    pod_mac: &Option<[u8; 6]>,
) -> Result<(), DropReason> {
    // By reference, IPv4 first: the port's IPv6 fields are read only for IPv6 packets.
    let ok = match ip.src {
        IpAddr::V4(a) => *ip4 == Some(a),
        IpAddr::V6(a) => source_v6_ok(a, ip4, ip6),
    };
    if !ok {
        return Err(spoofed_source(ip4, ip6));
    }
    match pod_mac {
        Some(m) if *m != meta.src_mac => Err(DropReason::SpoofedSourceMac),
        _ => Ok(()),
    }
}

/// Link-local sources are how NDP works; they are never routed.
fn source_v6_ok(a: Ipv6Addr, ip4: &Option<Ipv4Addr>, ip6: &Option<Ipv6Addr>) -> bool {
    *ip6 == Some(a) || ((ip4.is_some() || ip6.is_some()) && a.segments()[0] & 0xffc0 == 0xfe80)
}

/// Why a source address is refused: a port with no address at all has no pod behind it that
/// the datastore knows.
#[cold]
fn spoofed_source(ip4: &Option<Ipv4Addr>, ip6: &Option<Ipv6Addr>) -> DropReason {
    if ip4.is_none() && ip6.is_none() {
        DropReason::UnknownPod
    } else {
        DropReason::SpoofedSourceIp
    }
}

fn is_neighbor_discovery(ip: &IpMeta) -> bool {
    // The address family first: one compare settles it for every IPv4 packet.
    ip.src.is_ipv6() && matches!(ip.l4, L4::Icmp { ty: 133..=137, .. })
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use etherparse::{Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header};

    use super::*;
    use crate::conntrack::CtConfig;
    use crate::net::Cidr;
    use crate::parse::TcpFlags;
    use crate::policy::PolicyTable;
    use crate::policy::compile::CompileOptions;
    use crate::policy::model::*;
    use crate::snapshot::{NextHop, PathConfig, RouteTable};
    use crate::testing::{FrameSpec, L4Spec};

    const A_IP: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 1);
    const B_IP: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
    const C_IP: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 3);
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
    const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const C_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    const GW_A: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xa];
    const GW_B: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xb];
    const GW_C: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xc];
    const PA: PortId = PortId(0);
    const PB: PortId = PortId(1);
    const PC: PortId = PortId(2);
    const PH: PortId = PortId(3);
    const PU: PortId = PortId(4);
    const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0x0];
    const NOW: Nanos = 5_000_000_000;

    fn pod(name: &str, ip: Ipv4Addr, app: &str) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![IpAddr::V4(ip)],
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            host_network: false,
            node: Some("node-0".into()),
        }
    }

    /// `b` accepts TCP 80 only from `a`; `c` is not isolated; `a` may only talk to 10/8.
    fn policies(b_port: u16) -> Vec<NetworkPolicy> {
        vec![
            NetworkPolicy {
                namespace: "default".into(),
                name: "b-from-a".into(),
                pod_selector: LabelSelector {
                    match_labels: [("app".to_string(), "b".to_string())].into(),
                    match_expressions: vec![],
                },
                ingress_isolation: true,
                egress_isolation: false,
                ingress: vec![Rule {
                    peers: vec![Peer::Pods {
                        namespaces: NamespaceScope::PolicyNamespace,
                        pods: LabelSelector {
                            match_labels: [("app".to_string(), "a".to_string())].into(),
                            match_expressions: vec![],
                        },
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(b_port)),
                        end_port: None,
                    }],
                }],
                egress: vec![],
            },
            NetworkPolicy {
                namespace: "default".into(),
                name: "a-egress".into(),
                pod_selector: LabelSelector {
                    match_labels: [("app".to_string(), "a".to_string())].into(),
                    match_expressions: vec![],
                },
                ingress_isolation: false,
                egress_isolation: true,
                ingress: vec![],
                egress: vec![Rule {
                    peers: vec![Peer::IpBlock {
                        cidr: "10.0.0.0/8".parse().unwrap(),
                        except: vec![],
                    }],
                    ports: vec![],
                }],
            },
        ]
    }

    fn snapshot(epoch: u32, b_port: u16, pod_to_host: PodToHost) -> Snapshot {
        let cluster = Cluster {
            namespaces: vec![Namespace {
                name: "default".into(),
                labels: BTreeMap::new(),
            }],
            pods: vec![
                pod("a", A_IP, "a"),
                pod("b", B_IP, "b"),
                pod("c", C_IP, "c"),
            ],
            policies: policies(b_port),
        };
        let (policy, errors) = PolicyTable::compile(&cluster, &CompileOptions::default());
        assert!(errors.is_empty(), "{errors:?}");
        let mut routes = RouteTable::new();
        let mut ports = Vec::new();
        for (ip, mac, gw, port) in [
            (A_IP, A_MAC, GW_A, PA),
            (B_IP, B_MAC, GW_B, PB),
            (C_IP, C_MAC, GW_C, PC),
        ] {
            routes.insert(
                Cidr::host(IpAddr::V4(ip)),
                NextHop {
                    kind: HopKind::Port,
                    port,
                    src_mac: gw,
                    dst_mac: mac,
                },
            );
            ports.push(Port {
                name: format!("cali{}", port.0),
                mac: gw,
                kind: PortKind::Pod {
                    endpoint: policy.endpoint(IpAddr::V4(ip)),
                    ip4: Some(ip),
                    ip6: None,
                    pod_mac: Some(mac),
                },
            });
        }
        ports.push(Port {
            name: "ocelot0".into(),
            mac: HOST_MAC,
            kind: PortKind::Host,
        });
        ports.push(Port {
            name: "eth0".into(),
            mac: HOST_MAC,
            kind: PortKind::Uplink,
        });
        routes.insert(
            Cidr::host(IpAddr::V4(NODE_IP)),
            NextHop {
                kind: HopKind::Host,
                port: PortId(0),
                src_mac: [0; 6],
                dst_mac: [0; 6],
            },
        );
        Snapshot {
            epoch,
            policy,
            routes,
            ports,
            config: PathConfig { pod_to_host },
        }
    }

    fn worker() -> Worker {
        Worker::new(Arc::new(Conntrack::new(CtConfig::default())))
    }

    fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
        match ip {
            A_IP => A_MAC,
            B_IP => B_MAC,
            _ => C_MAC,
        }
    }

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        FrameSpec {
            src_mac: mac_of(src),
            dst_mac: GW_A,
            src: IpAddr::V4(src),
            dst: IpAddr::V4(dst),
            ttl: 64,
            l4: L4Spec::Tcp {
                sport,
                dport,
                flags,
            },
        }
        .build()
    }

    fn send(
        w: &mut Worker,
        snap: &Snapshot,
        mut frame: Vec<u8>,
        port: PortId,
    ) -> (Verdict, Vec<u8>) {
        let v = w.process_one(snap, &mut frame, port, NOW);
        (v, frame)
    }

    const SYN: u8 = TcpFlags::SYN;
    const SYNACK: u8 = TcpFlags::SYN | TcpFlags::ACK;
    const ACK: u8 = TcpFlags::ACK;

    #[test]
    fn allowed_handshake_is_forwarded_and_rewritten() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let (v, out) = send(&mut w, &snap, tcp(A_IP, B_IP, 40000, 80, SYN), PA);
        assert_eq!(v, Verdict::Forward(PB));
        let meta = parse::parse(&out).unwrap();
        assert_eq!(meta.dst_mac, B_MAC);
        assert_eq!(meta.src_mac, GW_B);
        assert_eq!(meta.ip().unwrap().ttl, 63);
        let (v, _) = send(&mut w, &snap, tcp(B_IP, A_IP, 80, 40000, SYNACK), PB);
        assert_eq!(v, Verdict::Forward(PA), "reply allowed through conntrack");
        let (v, _) = send(&mut w, &snap, tcp(A_IP, B_IP, 40000, 80, ACK), PA);
        assert_eq!(v, Verdict::Forward(PB));
        assert_eq!(w.counters().ct_created, 1);
        assert_eq!(w.counters().ct_hits, 2);
        assert_eq!(w.counters().forwarded, 3);
    }

    #[test]
    fn policy_denials_name_the_direction() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        // c → b:80: b's ingress admits only a.
        let (v, _) = send(&mut w, &snap, tcp(C_IP, B_IP, 40000, 80, SYN), PC);
        assert_eq!(v, Verdict::Drop(DropReason::PolicyIngress));
        // a → b:81: wrong port.
        let (v, _) = send(&mut w, &snap, tcp(A_IP, B_IP, 40000, 81, SYN), PA);
        assert_eq!(v, Verdict::Drop(DropReason::PolicyIngress));
        assert_eq!(w.counters().drops_for(DropReason::PolicyIngress), 2);
        // c is not isolated: a → c is fine; c → a too (a is not ingress-isolated).
        let (v, _) = send(&mut w, &snap, tcp(A_IP, C_IP, 40000, 9999, SYN), PA);
        assert_eq!(v, Verdict::Forward(PC));
    }

    #[test]
    fn egress_policy_applies_to_host_traffic_before_the_host_default() {
        let accept = snapshot(1, 80, PodToHost::Accept);
        let mut w = worker();
        // a may only reach 10/8: the node's 192.168 address is refused by egress policy even
        // though pod-to-host traffic is accepted.
        let (v, _) = send(&mut w, &accept, tcp(A_IP, NODE_IP, 40000, 22, SYN), PA);
        assert_eq!(v, Verdict::Drop(DropReason::PolicyEgress));
        // c has no egress policy: accepted to the host.
        let (v, _) = send(&mut w, &accept, tcp(C_IP, NODE_IP, 40000, 22, SYN), PC);
        assert_eq!(v, Verdict::ToHost);
        let drop = snapshot(1, 80, PodToHost::Drop);
        let (v, _) = send(&mut w, &drop, tcp(C_IP, NODE_IP, 40001, 22, SYN), PC);
        assert_eq!(v, Verdict::Drop(DropReason::PodToHostDenied));
    }

    #[test]
    fn the_node_reaches_its_pods_whatever_their_policy_and_gets_its_replies() {
        // b admits only a on port 80; the node is not a pod, and pods cannot block it.
        let mut w = worker();
        let drop = snapshot(1, 80, PodToHost::Drop);
        let (v, out) = send(&mut w, &drop, tcp(NODE_IP, B_IP, 50000, 81, SYN), PH);
        assert_eq!(v, Verdict::Forward(PB));
        let meta = parse::parse(&out).unwrap();
        assert_eq!((meta.src_mac, meta.dst_mac), (GW_B, B_MAC));
        // The reply goes to the host even though new pod → node connections are dropped.
        let (v, _) = send(&mut w, &drop, tcp(B_IP, NODE_IP, 81, 50000, SYNACK), PB);
        assert_eq!(v, Verdict::ToHost);
        let (v, _) = send(&mut w, &drop, tcp(B_IP, NODE_IP, 40000, 22, SYN), PB);
        assert_eq!(v, Verdict::Drop(DropReason::PodToHostDenied));
        // A policy change revalidates the connection: the node's still passes.
        let later = snapshot(2, 8080, PodToHost::Drop);
        let (v, _) = send(&mut w, &later, tcp(NODE_IP, B_IP, 50000, 81, ACK), PH);
        assert_eq!(v, Verdict::Forward(PB));
        let (v, _) = send(&mut w, &later, tcp(B_IP, NODE_IP, 81, 50000, ACK), PB);
        assert_eq!(v, Verdict::ToHost);
    }

    #[test]
    fn only_the_host_port_speaks_for_the_node() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        // The node's address arriving on the uplink is spoofed: no policy bypass.
        let (v, _) = send(&mut w, &snap, tcp(NODE_IP, B_IP, 50000, 81, SYN), PU);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedHostSource));
        // Another source the kernel forwards to the host port meets b's policy.
        let outsider = Ipv4Addr::new(192, 0, 2, 9);
        let (v, _) = send(&mut w, &snap, tcp(outsider, B_IP, 50000, 80, SYN), PH);
        assert_eq!(v, Verdict::Drop(DropReason::PolicyIngress));
        assert_eq!(w.counters().ct_created, 0);
    }

    #[test]
    fn multicast_from_pods_and_the_node_is_dropped_and_arp_from_the_node_answered() {
        let snap = snapshot(1, 80, PodToHost::Accept);
        let mut w = worker();
        let mcast = Ipv4Addr::new(224, 0, 0, 251);
        let (v, _) = send(&mut w, &snap, tcp(A_IP, mcast, 5353, 5353, SYN), PA);
        assert_eq!(v, Verdict::Drop(DropReason::NotUnicast));
        let (v, _) = send(&mut w, &snap, tcp(NODE_IP, mcast, 5353, 5353, SYN), PH);
        assert_eq!(v, Verdict::Drop(DropReason::NotUnicast));
        let (v, out) = send(&mut w, &snap, arp_request(HOST_MAC, NODE_IP, B_IP), PH);
        assert_eq!(v, Verdict::Reply);
        let Net::Arp(arp) = parse::parse(&out).unwrap().net else {
            panic!("not ARP")
        };
        assert_eq!(
            (arp.operation, arp.sender_ip, arp.sender_mac),
            (2, B_IP, HOST_MAC)
        );
    }

    #[test]
    fn unresolved_next_hop_drops_without_creating_a_connection() {
        let mut snap = snapshot(1, 80, PodToHost::Drop);
        let remote = Ipv4Addr::new(10, 70, 1, 5);
        snap.routes.insert(
            "10.70.1.0/24".parse().unwrap(),
            NextHop {
                kind: HopKind::Unresolved,
                port: PA,
                src_mac: GW_A,
                dst_mac: [0; 6],
            },
        );
        let mut w = worker();
        let (v, _) = send(&mut w, &snap, tcp(C_IP, remote, 40000, 80, SYN), PC);
        assert_eq!(v, Verdict::Drop(DropReason::NeighborUnresolved));
        assert_eq!(w.counters().ct_created, 0);
    }

    #[test]
    fn unknown_pod_ports_and_isolated_routes_drop_as_unknown_pod() {
        let mut snap = snapshot(1, 80, PodToHost::Drop);
        // c's interface as the agent holds one whose pod it does not know: no address, no
        // endpoint, and its address routed to an isolated hop.
        if let Some(p) = snap.ports.get_mut(PC.0 as usize) {
            p.kind = PortKind::Pod {
                endpoint: None,
                ip4: None,
                ip6: None,
                pod_mac: None,
            };
        }
        snap.routes.insert(
            Cidr::host(IpAddr::V4(C_IP)),
            NextHop {
                kind: HopKind::Isolated,
                port: PC,
                src_mac: GW_C,
                dst_mac: [0; 6],
            },
        );
        let mut w = worker();
        let (v, _) = send(&mut w, &snap, tcp(C_IP, A_IP, 40000, 80, SYN), PC);
        assert_eq!(v, Verdict::Drop(DropReason::UnknownPod));
        let (v, _) = send(&mut w, &snap, tcp(A_IP, C_IP, 40000, 80, SYN), PA);
        assert_eq!(v, Verdict::Drop(DropReason::UnknownPod));
        assert_eq!(w.counters().drops_for(DropReason::UnknownPod), 2);
        assert_eq!(w.counters().ct_created, 0);
        // A known pod's spoofed source keeps its own reason.
        let (v, _) = send(&mut w, &snap, tcp(C_IP, B_IP, 40000, 80, SYN), PA);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSourceIp));
    }

    #[test]
    fn mid_stream_packet_without_entry_is_invalid() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let (v, _) = send(&mut w, &snap, tcp(A_IP, B_IP, 40000, 80, ACK), PA);
        assert_eq!(v, Verdict::Drop(DropReason::CtInvalid));
    }

    #[test]
    fn spoofed_sources_are_dropped() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        // a's frame arriving on b's port.
        let (v, _) = send(&mut w, &snap, tcp(A_IP, C_IP, 40000, 80, SYN), PB);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSourceIp));
        // Right IP, wrong MAC.
        let mut f = tcp(A_IP, C_IP, 40000, 80, SYN);
        f[6..12].copy_from_slice(&C_MAC);
        let (v, _) = send(&mut w, &snap, f, PA);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSourceMac));
    }

    #[test]
    fn unknown_port_no_route_and_ttl_expiry() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let (v, _) = send(&mut w, &snap, tcp(A_IP, B_IP, 1, 80, SYN), PortId(9));
        assert_eq!(v, Verdict::Drop(DropReason::UnknownIngress));
        let (v, _) = send(
            &mut w,
            &snap,
            tcp(A_IP, Ipv4Addr::new(10, 99, 0, 1), 1, 80, SYN),
            PA,
        );
        assert_eq!(v, Verdict::Drop(DropReason::NoRoute));
        let mut f = FrameSpec {
            src_mac: A_MAC,
            dst_mac: GW_A,
            src: IpAddr::V4(A_IP),
            dst: IpAddr::V4(C_IP),
            ttl: 1,
            l4: L4Spec::Tcp {
                sport: 1,
                dport: 80,
                flags: SYN,
            },
        }
        .build();
        let v = w.process_one(&snap, &mut f, PA, NOW);
        assert_eq!(v, Verdict::Drop(DropReason::TtlExpired));
    }

    #[test]
    fn proxy_arp_answers_with_the_host_side_mac() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let req = arp_request(A_MAC, A_IP, crate::snapshot::POD_GATEWAY_V4);
        let (v, out) = send(&mut w, &snap, req, PA);
        assert_eq!(v, Verdict::Reply);
        let meta = parse::parse(&out).unwrap();
        let Net::Arp(arp) = meta.net else {
            panic!("not ARP: {meta:?}")
        };
        assert_eq!(arp.operation, 2);
        assert_eq!(arp.sender_mac, GW_A);
        assert_eq!(arp.sender_ip, crate::snapshot::POD_GATEWAY_V4);
        assert_eq!(arp.target_ip, A_IP);
        assert_eq!(meta.dst_mac, A_MAC);
        // A pod asking with someone else's address is spoofing.
        let (v, _) = send(
            &mut w,
            &snap,
            arp_request(A_MAC, B_IP, crate::snapshot::POD_GATEWAY_V4),
            PA,
        );
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSourceIp));
    }

    fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ip.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f.resize(60, 0);
        f
    }

    #[test]
    fn policy_change_applies_to_existing_connections() {
        let before = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        assert_eq!(
            send(&mut w, &before, tcp(A_IP, B_IP, 40000, 80, SYN), PA).0,
            Verdict::Forward(PB)
        );
        assert_eq!(
            send(&mut w, &before, tcp(B_IP, A_IP, 80, 40000, SYNACK), PB).0,
            Verdict::Forward(PA)
        );
        // Same policy, new generation: the connection is re-checked and survives.
        let same = snapshot(2, 80, PodToHost::Drop);
        assert_eq!(
            send(&mut w, &same, tcp(A_IP, B_IP, 40000, 80, ACK), PA).0,
            Verdict::Forward(PB)
        );
        // b now accepts only port 8080: the established connection to 80 is cut, from either side.
        let after = snapshot(3, 8080, PodToHost::Drop);
        assert_eq!(
            send(&mut w, &after, tcp(B_IP, A_IP, 80, 40000, ACK), PB).0,
            Verdict::Drop(DropReason::PolicyIngress)
        );
        // The entry is gone, so the next packet is a mid-stream packet without an entry.
        assert_eq!(
            send(&mut w, &after, tcp(A_IP, B_IP, 40000, 80, ACK), PA).0,
            Verdict::Drop(DropReason::CtInvalid)
        );
    }

    #[test]
    fn icmp_echo_is_a_pseudo_connection() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let echo = |src: Ipv4Addr, dst: Ipv4Addr, reply: bool| {
            FrameSpec {
                src_mac: mac_of(src),
                dst_mac: GW_A,
                src: IpAddr::V4(src),
                dst: IpAddr::V4(dst),
                ttl: 64,
                l4: L4Spec::IcmpEcho { id: 7, reply },
            }
            .build()
        };
        // A reply nobody asked for.
        assert_eq!(
            send(&mut w, &snap, echo(C_IP, A_IP, true), PC).0,
            Verdict::Drop(DropReason::CtInvalid)
        );
        // b's ingress has only a port rule, so ICMP to b is refused; c accepts anything.
        assert_eq!(
            send(&mut w, &snap, echo(A_IP, B_IP, false), PA).0,
            Verdict::Drop(DropReason::PolicyIngress)
        );
        assert_eq!(
            send(&mut w, &snap, echo(A_IP, C_IP, false), PA).0,
            Verdict::Forward(PC)
        );
        assert_eq!(
            send(&mut w, &snap, echo(C_IP, A_IP, true), PC).0,
            Verdict::Forward(PA)
        );
    }

    fn ipv4_fragment(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        offset: u16,
        more: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut ip = Ipv4Header::new(
            payload.len() as u16,
            64,
            IpNumber::UDP,
            src.octets(),
            dst.octets(),
        )
        .unwrap();
        ip.identification = id;
        ip.more_fragments = more;
        ip.fragment_offset = IpFragOffset::try_new(offset).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut f = Vec::new();
        Ethernet2Header {
            source: mac_of(src),
            destination: GW_A,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut f)
        .unwrap();
        ip.write(&mut f).unwrap();
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    #[test]
    fn later_fragments_follow_their_first_fragment_and_never_bypass_ports() {
        let snap = snapshot(1, 53, PodToHost::Drop);
        let mut w = worker();
        // UDP header (a:5000 → c:53) plus data, split in two.
        let mut udp = vec![0x13, 0x88, 0, 53, 0, 24, 0, 0];
        udp.extend_from_slice(&[0xab; 16]);
        let first = ipv4_fragment(A_IP, C_IP, 77, 0, true, &udp[..16]);
        let later = ipv4_fragment(A_IP, C_IP, 77, 2, false, &udp[16..]);
        assert_eq!(send(&mut w, &snap, first, PA).0, Verdict::Forward(PC));
        assert_eq!(send(&mut w, &snap, later, PA).0, Verdict::Forward(PC));
        // To b (port rule only): a later fragment with no first fragment seen is refused.
        let orphan = ipv4_fragment(A_IP, B_IP, 78, 2, false, &udp[16..]);
        assert_eq!(
            send(&mut w, &snap, orphan, PA).0,
            Verdict::Drop(DropReason::FragmentUnmatched)
        );
        // To c (no policy: every port allowed), an orphan is allowed by the port-less check.
        let orphan = ipv4_fragment(A_IP, C_IP, 79, 2, false, &udp[16..]);
        assert_eq!(send(&mut w, &snap, orphan, PA).0, Verdict::Forward(PC));
    }

    #[test]
    fn icmp_errors_pass_only_for_tracked_flows() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let mut w = worker();
        let syn = tcp(A_IP, C_IP, 40000, 5555, SYN);
        assert_eq!(send(&mut w, &snap, syn.clone(), PA).0, Verdict::Forward(PC));
        // c answers with port unreachable quoting a's SYN.
        let unreachable = |quoted: &[u8]| {
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&quoted[14..14 + 28]);
            let mut ip = Ipv4Header::new(
                icmp.len() as u16,
                64,
                IpNumber::ICMP,
                C_IP.octets(),
                A_IP.octets(),
            )
            .unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            let mut f = Vec::new();
            Ethernet2Header {
                source: C_MAC,
                destination: GW_C,
                ether_type: etherparse::EtherType::IPV4,
            }
            .write(&mut f)
            .unwrap();
            ip.write(&mut f).unwrap();
            f.extend_from_slice(&icmp);
            f
        };
        assert_eq!(
            send(&mut w, &snap, unreachable(&syn), PC).0,
            Verdict::Forward(PA)
        );
        let stranger = tcp(A_IP, C_IP, 41000, 5555, SYN);
        assert_eq!(
            send(&mut w, &snap, unreachable(&stranger), PC).0,
            Verdict::Drop(DropReason::IcmpUnrelated)
        );
    }

    #[test]
    fn burst_equals_one_by_one() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let frames = vec![
            (tcp(A_IP, B_IP, 1, 80, SYN), PA),
            (tcp(C_IP, B_IP, 2, 80, SYN), PC),
            (vec![0u8; 10], PA),
            (tcp(B_IP, A_IP, 80, 1, SYNACK), PB),
            (tcp(A_IP, C_IP, 3, 1, ACK), PA),
        ];
        let mut one = worker();
        let expected: Vec<_> = frames
            .iter()
            .map(|(f, p)| send(&mut one, &snap, f.clone(), *p))
            .collect();
        let mut burst = worker();
        let (verdicts, bufs) = run_burst(&mut burst, &snap, &frames);
        for (i, (v, out)) in expected.iter().enumerate() {
            assert_eq!(verdicts[i], *v, "frame {i}");
            assert_eq!(&bufs[i], out, "frame {i} bytes");
        }
        assert_eq!(one.counters(), burst.counters());
    }

    thread_local! {
        static TOUCHED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A [`Touch`] that counts its calls (and loads, as [`Load`] does).
    struct Counting;

    impl Touch for Counting {
        fn touch(word: &std::sync::atomic::AtomicU64) -> u64 {
            TOUCHED.with(|t| t.set(t.get() + 1));
            Load::touch(word)
        }
    }

    /// One `process_burst` over copies of `frames`: the verdicts and the frames as it left
    /// them.
    fn run_burst<T: Touch>(
        w: &mut Worker<T>,
        snap: &Snapshot,
        frames: &[(Vec<u8>, PortId)],
    ) -> (Vec<Verdict>, Vec<Vec<u8>>) {
        let mut bufs: Vec<_> = frames.iter().map(|(f, _)| f.clone()).collect();
        let mut pkts: Vec<_> = bufs
            .iter_mut()
            .zip(frames)
            .map(|(b, (_, p))| Packet {
                data: b.as_mut_slice(),
                ingress: *p,
            })
            .collect();
        let mut verdicts = vec![Verdict::ToHost; pkts.len()];
        w.process_burst(snap, &mut pkts, &mut verdicts, NOW);
        drop(pkts);
        (verdicts, bufs)
    }

    #[test]
    fn the_slot_pass_touches_each_tracked_flow_by_t_and_changes_no_verdict() {
        let snap = snapshot(1, 80, PodToHost::Drop);
        let opens = vec![
            (tcp(A_IP, B_IP, 1, 80, SYN), PA),
            (tcp(A_IP, B_IP, 2, 80, SYN), PA),
            (tcp(C_IP, B_IP, 3, 80, SYN), PC),
        ];
        let replies = vec![
            (tcp(B_IP, A_IP, 80, 1, SYNACK), PB),
            (tcp(B_IP, A_IP, 80, 2, SYNACK), PB),
            (tcp(B_IP, C_IP, 80, 3, SYNACK), PB),
            (tcp(A_IP, C_IP, 9, 1, ACK), PA),
        ];
        let mut plain = worker();
        let mut counted =
            Worker::<Counting>::with_touch(Arc::new(Conntrack::new(CtConfig::default())));
        let want: Vec<_> = [&opens, &replies]
            .iter()
            .map(|b| run_burst(&mut plain, &snap, b).0)
            .collect();
        TOUCHED.with(|t| t.set(0));
        let (got_opens, _) = run_burst(&mut counted, &snap, &opens);
        // New flows: no tag matches, their groups are loaded, not touched by `T`.
        assert_eq!(TOUCHED.with(std::cell::Cell::get), 0);
        let (got_replies, _) = run_burst(&mut counted, &snap, &replies);
        // The two allowed flows' replies are tracked; the denied flow and the stray ACK are not.
        assert_eq!(TOUCHED.with(std::cell::Cell::get), 2);
        assert_eq!(want, [got_opens, got_replies]);
        assert_eq!(plain.counters(), counted.counters());
        counted.set_touch(false);
        let acks = vec![
            (tcp(A_IP, B_IP, 1, 80, ACK), PA),
            (tcp(A_IP, B_IP, 2, 80, ACK), PA),
        ];
        let (verdicts, _) = run_burst(&mut counted, &snap, &acks);
        assert_eq!(
            TOUCHED.with(std::cell::Cell::get),
            2,
            "plain loads when turned off"
        );
        assert!(
            verdicts.iter().all(|v| matches!(v, Verdict::Forward(_))),
            "{verdicts:?}"
        );
    }
}
