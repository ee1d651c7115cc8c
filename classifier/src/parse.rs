//! Frame parsing: borrowed bytes in, a small `Copy` summary out.
//!
//! [`parse`] reads one Ethernet frame and returns a [`PacketMeta`]: MAC addresses, the outer
//! VLAN id, the network layer (ARP or IP) and, for IP, the transport summary the packet path
//! needs (ports, TCP flags, ICMP type/code/identifier) together with the byte offsets of the
//! network and transport headers, which the rewrite code and ICMP-error handling use.
//!
//! Frames of the common shape (Ethernet with at most one VLAN tag, IPv4 without options or
//! IPv6 without extension headers, unfragmented, TCP or UDP, every length consistent) are read
//! by a fast path at fixed offsets; it answers only for frames it has checked completely and
//! hands every other frame, and every error, to [`parse_full`], so the two always agree.
//!
//! [`parse_full`] is built from etherparse's zero-copy header slices (`Ethernet2Slice`,
//! `SingleVlanSlice`, `ArpPacketSlice`, `Ipv4HeaderSlice`, `Ipv6HeaderSlice`, the IPv6
//! extension header slices, `TcpHeaderSlice`, `UdpHeaderSlice`) rather than
//! `SlicedPacket`: the layered walk lets the parser stop at a later fragment before
//! it looks at payload bytes, read the IPv6 fragment header's identification while it walks
//! the extension headers (once, not twice), and skip building slices it never reads. Two
//! headers etherparse does not give us the way we need are read by hand after an explicit
//! length check: SCTP (etherparse has no SCTP) and ICMP (we need only its first 8 bytes,
//! and `Icmpv4Slice` rejects timestamp messages whose length is not exactly 20 bytes).
//!
//! # What is accepted
//! - Ethernet II, with up to [`MAX_VLAN_TAGS`] 802.1Q / 802.1ad / 0x9100 tags; `vlan` is the
//!   outer tag's VLAN id (priority-tagged frames report `Some(0)`). A frame is parsed without
//!   an FCS, as AF_XDP delivers it.
//! - ARP for Ethernet/IPv4 (hardware type 1, protocol 0x0800, lengths 6 and 4), operation
//!   request or reply.
//! - IPv4 with options and an optional authentication header (AH); IPv6 with hop-by-hop
//!   (first only), routing, destination options, fragment and AH extension headers, at most
//!   [`MAX_IPV6_EXT_HEADERS`] of them.
//! - TCP, UDP, SCTP (ports from the 12-byte common header), ICMPv4 in IPv4 and ICMPv6 in
//!   IPv6. Any other protocol (and ICMP of the other IP version) gives `L4::None` with
//!   `proto` set.
//!
//! # Invariants of the result
//! - The IP packet's length field is honoured: bytes after it (Ethernet padding) are never
//!   read as headers, and a frame shorter than it is `Truncated`, so every prefix of a
//!   frame that is shorter than its IP packet is an error.
//! - `l4_offset != 0` exactly when `l4` is not `L4::None`; then
//!   `frame[l4_offset..]` starts with the transport header named by `l4`, and the whole
//!   header (TCP with its options, UDP's 8 bytes, SCTP's 12, ICMP's 8) lies inside the frame.
//! - A non-first fragment is `Fragment::Later` with `L4::None`: its bytes are never read as
//!   ports. Its `proto` is the protocol the fragment header announces.
//! - `proto` is the upper-layer protocol after IPv6 extension headers and after an IPv4
//!   AH (unless the packet is a later fragment, where the parser cannot see past the AH).
//!
//! # Error mapping
//! Every etherparse error is either a length problem or a bad field value:
//!
//! | Condition | Result |
//! |---|---|
//! | frame shorter than Ethernet (14) or a VLAN tag (4) | `Truncated` |
//! | a third VLAN tag, or an EtherType other than ARP/IPv4/IPv6 | `UnsupportedEthertype` |
//! | ARP shorter than its address lengths say (`LenError`) | `Truncated` |
//! | ARP not Ethernet/IPv4, or operation not 1/2 | `UnsupportedArp` |
//! | IPv4/IPv6 header `LenError` (slice shorter than 20/40 or IHL·4) | `Truncated` |
//! | IPv4/IPv6 `Content` error: version does not match the EtherType, IHL < 5 | `Malformed` |
//! | IPv4 total length < header length | `Malformed` |
//! | IPv4 total length or IPv6 payload length > bytes present | `Truncated` |
//! | extension header / AH `LenError` | `Truncated` |
//! | AH payload length 0, hop-by-hop not first, > `MAX_IPV6_EXT_HEADERS` headers | `Malformed` |
//! | TCP `LenError` (< 20 bytes, or < data offset·4) | `Truncated` |
//! | TCP `Content` error (data offset < 5) | `Malformed` |
//! | UDP < 8 bytes, SCTP < 12, ICMP < 8 | `Truncated` |
//! | UDP length field < 8 (unfragmented; IPv6 jumbograms cannot occur on Ethernet) | `Malformed` |
//! | UDP length field > bytes of the IP payload (unfragmented) | `Truncated` |
//!
//! The parser does not verify checksums: the receiving host does, and the incremental
//! updates in [`crate::rewrite`] preserve a bad checksum as bad, so nothing the dataplane
//! forwards turns a corrupt header into a valid one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::err::{ip_auth, ipv4, ipv6, tcp};
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Slice, IpAuthHeaderSlice,
    Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice,
    SingleVlanSlice, TcpHeaderSlice, UdpHeaderSlice, ip_number,
};

use crate::verdict::DropReason;

/// Most VLAN tags accepted on one frame (802.1Q, or QinQ with an outer 802.1ad tag).
pub const MAX_VLAN_TAGS: usize = 2;

/// Most IPv6 extension headers walked before the packet is called `Malformed`.
///
/// Real traffic carries one or two; the bound keeps the cost of a hostile chain of tiny
/// headers (one per 8 bytes of a jumbo frame) small and predictable.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Length of an Ethernet II header without FCS.
const ETH_LEN: usize = 14;
/// Length of one VLAN tag.
const VLAN_LEN: usize = 4;
/// Length of the fixed IPv6 header.
const IPV6_LEN: usize = 40;

const PROTO_HOP_BY_HOP: u8 = ip_number::IPV6_HOP_BY_HOP.0;
const PROTO_ROUTE: u8 = ip_number::IPV6_ROUTE.0;
const PROTO_FRAG: u8 = ip_number::IPV6_FRAG.0;
const PROTO_DEST_OPTIONS: u8 = ip_number::IPV6_DEST_OPTIONS.0;
const PROTO_AUTH: u8 = ip_number::AUTH.0;
const PROTO_TCP: u8 = ip_number::TCP.0;
const PROTO_UDP: u8 = ip_number::UDP.0;
const PROTO_SCTP: u8 = ip_number::SCTP.0;
const PROTO_ICMP: u8 = ip_number::ICMP.0;
const PROTO_ICMPV6: u8 = ip_number::IPV6_ICMP.0;

/// TCP flag bits as they appear in byte 13 of the TCP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;

    /// Whether all bits of `mask` are set.
    pub const fn has(self, mask: u8) -> bool {
        self.0 & mask == mask
    }
}

/// The transport part of a packet, as far as the packet path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with its ports and flags.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags byte.
        flags: TcpFlags,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// SCTP (common header only: ports).
    Sctp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMPv4 or ICMPv6 (the IP version tells which).
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Identifier for echo request/reply; 0 for other types.
        id: u16,
    },
    /// No transport header available: a non-first fragment, or a protocol the parser does
    /// not look into (GRE, ESP, …). `L4::None` never carries ports, so it can never match a
    /// port rule.
    None,
}

/// Fragmentation state of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment.
    None,
    /// First fragment (offset 0, more-fragments set): transport header present.
    First {
        /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
        id: u32,
    },
    /// A later fragment: no transport header.
    Later {
        /// Identification, as for `First`.
        id: u32,
    },
}

/// The IP part of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpMeta {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol after IPv6 extension headers (IANA number).
    pub proto: u8,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// Fragmentation.
    pub fragment: Fragment,
    /// Transport summary.
    pub l4: L4,
}

/// An ARP packet (Ethernet/IPv4 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpMeta {
    /// 1 = request, 2 = reply.
    pub operation: u16,
    /// Sender hardware address.
    pub sender_mac: [u8; 6],
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: [u8; 6],
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// The network layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// ARP.
    Arp(ArpMeta),
    /// IPv4 or IPv6.
    Ip(IpMeta),
}

/// Summary of one frame. `Copy`, no borrow: the burst stages keep one per frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Outer 802.1Q VLAN id, if tagged.
    pub vlan: Option<u16>,
    /// Offset of the network header in the frame.
    pub l3_offset: u16,
    /// Offset of the transport header (0 when there is none).
    pub l4_offset: u16,
    /// Network layer summary.
    pub net: Net,
}

impl PacketMeta {
    /// The IP summary, if this is an IP packet.
    pub fn ip(&self) -> Option<&IpMeta> {
        match &self.net {
            Net::Ip(ip) => Some(ip),
            Net::Arp(_) => None,
        }
    }

    /// The ARP summary, if this is an ARP packet.
    pub fn arp(&self) -> Option<&ArpMeta> {
        match &self.net {
            Net::Arp(arp) => Some(arp),
            Net::Ip(_) => None,
        }
    }
}

impl L4 {
    /// Source and destination port for TCP, UDP and SCTP; `None` otherwise (ICMP has an
    /// identifier, not ports).
    pub const fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } | L4::Sctp { sport, dport } => {
                Some((sport, dport))
            }
            L4::Icmp { .. } | L4::None => None,
        }
    }
}

impl Fragment {
    /// The fragment identification, if this is a fragment.
    pub const fn id(&self) -> Option<u32> {
        match *self {
            Fragment::None => None,
            Fragment::First { id } | Fragment::Later { id } => Some(id),
        }
    }
}

/// Parses an Ethernet frame.
///
/// Never panics and never allocates. See the module docs for what is accepted, the
/// invariants of the result and how malformed input maps to a [`DropReason`].
///
/// The common case — Ethernet with at most one VLAN tag, IPv4 without options or IPv6
/// without extension headers, not fragmented, TCP or UDP, every length consistent — is read
/// at fixed offsets by a fast path; everything else, every error included, goes to
/// [`parse_full`]. The fast path answers only when it is sure the full parser would give the
/// same `Ok` value (a differential property test and the `parse` fuzz target check that).
#[inline]
pub fn parse(frame: &[u8]) -> Result<PacketMeta, DropReason> {
    parse_fast_or(frame, parse_full, Ok)
}

/// [`parse`], written into `out` (the burst's array) and inlined into its caller: the fast
/// path's result is stored in place, field by field. Calling `parse` and storing its result
/// built the 72-byte meta in a stack temporary with narrow stores and copied it with 16-byte
/// loads, which cannot be forwarded from those stores: measured 58.4 -> 52.8 ns per packet
/// on the established path (docs/BENCHMARKS.md, round six). Frames the fast path does not
/// take go to [`parse_full`], out of line.
#[inline(always)]
pub fn parse_into(frame: &[u8], out: &mut Result<PacketMeta, DropReason>) {
    let fast = parse_fast_or(
        frame,
        |_| false,
        |m| {
            *out = Ok(m);
            true
        },
    );
    if !fast {
        *out = parse_full(frame);
    }
}

/// The fast path of [`parse`]: frames of the common shape it describes are read here, every
/// other frame is handed to `slow`. (A parameter rather than a call to [`parse_full`] only so
/// that tests can see which frames took the fast path.)
///
/// Each header is viewed as a fixed-size array after one length check, so its fields are
/// read without further bounds checks; etherparse's slices checked and built a slice per
/// layer (about 100 instructions for a TCP/IPv4 frame against about 45 here, callgrind).
#[inline(always)]
fn parse_fast_or<R>(
    frame: &[u8],
    slow: impl FnOnce(&[u8]) -> R,
    ok: impl FnOnce(PacketMeta) -> R,
) -> R {
    // Every way out of the fast path is a tail call to the full parser, so that the common
    // result is built once, where the caller wants it (an `Option` that was then turned into
    // the `Result` cost a copy of the 72-byte meta per frame).
    macro_rules! fast {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return slow(frame),
            }
        };
    }
    let eth: &[u8; ETH_LEN] = fast!(frame.first_chunk());
    let mut ether_type = EtherType(u16::from_be_bytes([eth[12], eth[13]]));
    let mut l3 = ETH_LEN;
    let mut vlan = None;
    if ether_type != EtherType::IPV4 && is_vlan_tpid(ether_type) {
        let tag: &[u8; VLAN_LEN] = fast!(frame.get(ETH_LEN..).and_then(<[u8]>::first_chunk));
        vlan = Some(u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff);
        ether_type = EtherType(u16::from_be_bytes([tag[2], tag[3]]));
        l3 += VLAN_LEN;
    }
    let packet = fast!(frame.get(l3..));
    let (dst_mac, rest) = fast!(eth.split_first_chunk::<6>());
    let src_mac: &[u8; 6] = fast!(rest.first_chunk());
    // The result is built in each family's arm: built once after a shared tail, both
    // addresses went through the stack as 17-byte `IpAddr`s (callgrind: 10 more instructions
    // per IPv4 frame).
    let meta = |src, dst, proto, ttl, ip_len: usize, l4| PacketMeta {
        dst_mac: *dst_mac,
        src_mac: *src_mac,
        vlan,
        l3_offset: l3 as u16,
        l4_offset: (l3 + ip_len) as u16,
        net: Net::Ip(IpMeta {
            src,
            dst,
            proto,
            ttl,
            fragment: Fragment::None,
            l4,
        }),
    };
    // The transport bytes end where the IP packet ends (Ethernet padding excluded).
    match ether_type {
        EtherType::IPV4 => {
            let h: &[u8; 20] = fast!(packet.first_chunk());
            // Version 4, IHL 5 (no options), and neither a later fragment nor a first one
            // (more-fragments set).
            if h[0] != 0x45 || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return slow(frame);
            }
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let l4_bytes = fast!(packet.get(20..total));
            let l4 = fast!(fast_l4(h[9], l4_bytes));
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            ok(meta(IpAddr::V4(src), IpAddr::V4(dst), h[9], h[8], 20, l4))
        }
        EtherType::IPV6 => {
            let h: &[u8; IPV6_LEN] = fast!(packet.first_chunk());
            if h[0] >> 4 != 6 {
                return slow(frame);
            }
            let end = IPV6_LEN + usize::from(u16::from_be_bytes([h[4], h[5]]));
            let l4_bytes = fast!(packet.get(IPV6_LEN..end));
            let l4 = fast!(fast_l4(h[6], l4_bytes));
            let src: &[u8; 16] = fast!(h[8..].first_chunk());
            let dst: &[u8; 16] = fast!(h[24..].first_chunk());
            let (src, dst) = (Ipv6Addr::from(*src), Ipv6Addr::from(*dst));
            ok(meta(
                IpAddr::V6(src),
                IpAddr::V6(dst),
                h[6],
                h[7],
                IPV6_LEN,
                l4,
            ))
        }
        _ => slow(frame),
    }
}

/// The transport header of the fast path: TCP or UDP whose header (and UDP length) fits in
/// `l4_bytes`; `None` sends the frame to the full parser.
#[inline(always)]
fn fast_l4(proto: u8, l4_bytes: &[u8]) -> Option<L4> {
    match proto {
        PROTO_TCP => {
            let t: &[u8; 20] = l4_bytes.first_chunk()?;
            let header_len = usize::from(t[12] >> 4) * 4;
            if header_len < 20 || header_len > l4_bytes.len() {
                return None;
            }
            Some(L4::Tcp {
                sport: u16::from_be_bytes([t[0], t[1]]),
                dport: u16::from_be_bytes([t[2], t[3]]),
                flags: TcpFlags(t[13]),
            })
        }
        PROTO_UDP => {
            let u: &[u8; 8] = l4_bytes.first_chunk()?;
            let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
            if len < 8 || len > l4_bytes.len() {
                return None;
            }
            Some(L4::Udp {
                sport: u16::from_be_bytes([u[0], u[1]]),
                dport: u16::from_be_bytes([u[2], u[3]]),
            })
        }
        _ => None,
    }
}

/// [`parse`] without its fast path: every frame through etherparse's slices. Public so that
/// tests and the fuzz targets can hold the fast path to it.
#[inline(never)]
pub fn parse_full(frame: &[u8]) -> Result<PacketMeta, DropReason> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame).map_err(|_| DropReason::Truncated)?;
    let mut ether_type = eth.ether_type();
    let mut rest = eth.payload_slice();
    let mut vlan = None;
    let mut tags = 0;
    while is_vlan_tpid(ether_type) {
        if tags == MAX_VLAN_TAGS {
            return Err(DropReason::UnsupportedEthertype);
        }
        let tag = SingleVlanSlice::from_slice(rest).map_err(|_| DropReason::Truncated)?;
        if vlan.is_none() {
            vlan = Some(tag.vlan_identifier().value());
        }
        ether_type = tag.ether_type();
        rest = tag.payload_slice();
        tags += 1;
    }
    let link = Link {
        // Read as two 6-byte copies rather than through `Ethernet2Slice::destination()` and
        // `source()`, which load and shift one byte at a time.
        dst_mac: mac_at(frame, 0),
        src_mac: mac_at(frame, 6),
        vlan,
        l3_offset: ETH_LEN + tags * VLAN_LEN,
    };
    match ether_type {
        EtherType::IPV4 => parse_ipv4(&link, rest),
        EtherType::IPV6 => parse_ipv6(&link, rest),
        EtherType::ARP => parse_arp(&link, rest),
        _ => Err(DropReason::UnsupportedEthertype),
    }
}

/// The link-layer facts gathered before the network header.
struct Link {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    l3_offset: usize,
}

/// The network-layer facts of an IP packet, as scalars.
///
/// The parsers collect these and build the [`PacketMeta`] once, in [`Link::ip_meta`]:
/// filling an `IpMeta` field by field on the stack and then copying it into the result
/// made the compiler read back bytes it had just written with wider loads, which stalls
/// store forwarding and cost more than the rest of the parse.
struct IpFacts {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ttl: u8,
    fragment: Fragment,
    l4: L4,
    /// Offset of the transport header from the start of the IP header; 0 when none.
    l4_rel: usize,
}

impl Link {
    #[inline(always)]
    fn ip_meta(&self, ip: IpFacts) -> Result<PacketMeta, DropReason> {
        // The transport offset is relative to the network header; 0 means "none".
        let l4_offset = if ip.l4_rel == 0 {
            0
        } else {
            self.l3_offset + ip.l4_rel
        };
        Ok(PacketMeta {
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
            vlan: self.vlan,
            // l3_offset is at most 22; l4_offset at most 22 + 60 + 1028 for IPv4 and
            // 22 + 40 + MAX_IPV6_EXT_HEADERS * 2048 for IPv6, so neither overflows a u16.
            l3_offset: self.l3_offset as u16,
            l4_offset: u16::try_from(l4_offset).map_err(|_| DropReason::Malformed)?,
            net: Net::Ip(IpMeta {
                src: ip.src,
                dst: ip.dst,
                proto: ip.proto,
                ttl: ip.ttl,
                fragment: ip.fragment,
                l4: ip.l4,
            }),
        })
    }
}

/// The six bytes at `at` as a MAC address; zeros if out of range (the caller has checked
/// the Ethernet header's length).
#[inline(always)]
fn mac_at(frame: &[u8], at: usize) -> [u8; 6] {
    frame
        .get(at..at + 6)
        .and_then(|b| <[u8; 6]>::try_from(b).ok())
        .unwrap_or_default()
}

/// The tag protocol identifiers of 802.1Q, 802.1ad and the pre-standard QinQ 0x9100.
#[inline]
fn is_vlan_tpid(ether_type: EtherType) -> bool {
    matches!(
        ether_type,
        EtherType::VLAN_TAGGED_FRAME
            | EtherType::PROVIDER_BRIDGING
            | EtherType::VLAN_DOUBLE_TAGGED_FRAME
    )
}

/// Parses an Ethernet/IPv4 ARP request or reply.
fn parse_arp(link: &Link, packet: &[u8]) -> Result<PacketMeta, DropReason> {
    let arp = ArpPacketSlice::from_slice(packet).map_err(|_| DropReason::Truncated)?;
    let operation = arp.operation();
    if arp.hw_addr_type() != ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
        || !(operation == ArpOperation::REQUEST || operation == ArpOperation::REPLY)
    {
        return Err(DropReason::UnsupportedArp);
    }
    // The sizes were checked just above, so these conversions cannot fail; mapping the
    // impossible error keeps the function free of panics all the same.
    let mac = |b: &[u8]| <[u8; 6]>::try_from(b).map_err(|_| DropReason::UnsupportedArp);
    let ip = |b: &[u8]| {
        <[u8; 4]>::try_from(b)
            .map(Ipv4Addr::from)
            .map_err(|_| DropReason::UnsupportedArp)
    };
    Ok(PacketMeta {
        dst_mac: link.dst_mac,
        src_mac: link.src_mac,
        vlan: link.vlan,
        l3_offset: link.l3_offset as u16,
        l4_offset: 0,
        net: Net::Arp(ArpMeta {
            operation: operation.0,
            sender_mac: mac(arp.sender_hw_addr())?,
            sender_ip: ip(arp.sender_protocol_addr())?,
            target_mac: mac(arp.target_hw_addr())?,
            target_ip: ip(arp.target_protocol_addr())?,
        }),
    })
}

/// Parses an IPv4 packet that starts at `link.l3_offset`.
#[inline]
fn parse_ipv4(link: &Link, packet: &[u8]) -> Result<PacketMeta, DropReason> {
    let header = Ipv4HeaderSlice::from_slice(packet).map_err(|e| match e {
        ipv4::HeaderSliceError::Len(_) => DropReason::Truncated,
        ipv4::HeaderSliceError::Content(_) => DropReason::Malformed,
    })?;
    let header_len = header.slice().len();
    let total_len = usize::from(header.total_len());
    if total_len < header_len {
        return Err(DropReason::Malformed);
    }
    // Cut at the total length so that Ethernet padding is never read as payload.
    let packet = packet.get(..total_len).ok_or(DropReason::Truncated)?;

    let id = u32::from(header.identification());
    let src = IpAddr::V4(header.source_addr());
    let dst = IpAddr::V4(header.destination_addr());
    let ttl = header.ttl();
    let mut proto = header.protocol().0;
    let fragment = if header.fragments_offset().value() != 0 {
        Fragment::Later { id }
    } else if header.more_fragments() {
        Fragment::First { id }
    } else {
        Fragment::None
    };
    if let Fragment::Later { .. } = fragment {
        // The payload of a later fragment starts mid-datagram: nothing in it is a header.
        let l4 = L4::None;
        return link.ip_meta(IpFacts {
            src,
            dst,
            proto,
            ttl,
            fragment,
            l4,
            l4_rel: 0,
        });
    }

    let mut l4_start = header_len;
    if proto == PROTO_AUTH {
        let auth = IpAuthHeaderSlice::from_slice(packet.get(l4_start..).unwrap_or_default())
            .map_err(map_auth_error)?;
        proto = auth.next_header().0;
        l4_start += auth.slice().len();
    }
    let l4_bytes = packet.get(l4_start..).unwrap_or_default();
    let l4 = parse_l4(proto, false, l4_bytes, fragment != Fragment::None)?;
    let l4_rel = if l4 == L4::None { 0 } else { l4_start };
    link.ip_meta(IpFacts {
        src,
        dst,
        proto,
        ttl,
        fragment,
        l4,
        l4_rel,
    })
}

/// Parses an IPv6 packet, walking its extension headers, that starts at `link.l3_offset`.
#[inline]
fn parse_ipv6(link: &Link, packet: &[u8]) -> Result<PacketMeta, DropReason> {
    let header = Ipv6HeaderSlice::from_slice(packet).map_err(|e| match e {
        ipv6::HeaderSliceError::Len(_) => DropReason::Truncated,
        ipv6::HeaderSliceError::Content(_) => DropReason::Malformed,
    })?;
    // The payload length is taken literally, 0 included: a jumbogram (RFC 2675) cannot
    // cross an Ethernet link, so a 0 here means an empty payload, not "see hop-by-hop".
    let end = IPV6_LEN + usize::from(header.payload_length());
    let packet = packet.get(..end).ok_or(DropReason::Truncated)?;

    // Held as u128 until the result is built: kept as byte arrays across the extension
    // header loop, the addresses were spilled and copied into the result one byte at a time.
    let src = u128::from_be_bytes(header.source());
    let dst = u128::from_be_bytes(header.destination());
    let ttl = header.hop_limit();
    let mut proto = header.next_header().0;
    let mut fragment = Fragment::None;
    let mut offset = IPV6_LEN;
    let mut walked = 0;
    loop {
        let rest = packet.get(offset..).unwrap_or_default();
        let (len, next) = match proto {
            // RFC 8200 §4.1: hop-by-hop options may only directly follow the IPv6 header.
            PROTO_HOP_BY_HOP if offset != IPV6_LEN => return Err(DropReason::Malformed),
            PROTO_HOP_BY_HOP | PROTO_ROUTE | PROTO_DEST_OPTIONS => {
                let ext =
                    Ipv6RawExtHeaderSlice::from_slice(rest).map_err(|_| DropReason::Truncated)?;
                (ext.slice().len(), ext.next_header().0)
            }
            PROTO_FRAG => {
                let frag =
                    Ipv6FragmentHeaderSlice::from_slice(rest).map_err(|_| DropReason::Truncated)?;
                let id = frag.identification();
                if frag.fragment_offset().value() != 0 {
                    // A later fragment: what follows is mid-datagram, not headers.
                    return link.ip_meta(IpFacts {
                        src: IpAddr::V6(Ipv6Addr::from(src)),
                        dst: IpAddr::V6(Ipv6Addr::from(dst)),
                        proto: frag.next_header().0,
                        ttl,
                        fragment: Fragment::Later { id },
                        l4: L4::None,
                        l4_rel: 0,
                    });
                }
                // Offset 0 without more-fragments is an atomic fragment (RFC 6946): the
                // whole datagram is here, so it is not a fragment for the packet path.
                if frag.more_fragments() {
                    fragment = Fragment::First { id };
                }
                (frag.slice().len(), frag.next_header().0)
            }
            PROTO_AUTH => {
                let auth = IpAuthHeaderSlice::from_slice(rest).map_err(map_auth_error)?;
                (auth.slice().len(), auth.next_header().0)
            }
            _ => break,
        };
        walked += 1;
        if walked > MAX_IPV6_EXT_HEADERS {
            return Err(DropReason::Malformed);
        }
        offset += len;
        proto = next;
    }
    let l4_bytes = packet.get(offset..).unwrap_or_default();
    let l4 = parse_l4(proto, true, l4_bytes, fragment != Fragment::None)?;
    let l4_rel = if l4 == L4::None { 0 } else { offset };
    link.ip_meta(IpFacts {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        proto,
        ttl,
        fragment,
        l4,
        l4_rel,
    })
}

/// Maps an authentication header error: a zero payload length is a bad field value.
fn map_auth_error(e: ip_auth::HeaderSliceError) -> DropReason {
    match e {
        ip_auth::HeaderSliceError::Len(_) => DropReason::Truncated,
        ip_auth::HeaderSliceError::Content(_) => DropReason::Malformed,
    }
}

/// Summarises the transport header at the start of `bytes` (which end where the IP packet
/// ends). `fragmented` is set for a first fragment, whose UDP length field describes the
/// whole datagram rather than the bytes present.
#[inline]
fn parse_l4(proto: u8, is_v6: bool, bytes: &[u8], fragmented: bool) -> Result<L4, DropReason> {
    match proto {
        PROTO_TCP => {
            let tcp = TcpHeaderSlice::from_slice(bytes).map_err(|e| match e {
                tcp::HeaderSliceError::Len(_) => DropReason::Truncated,
                tcp::HeaderSliceError::Content(_) => DropReason::Malformed,
            })?;
            Ok(L4::Tcp {
                sport: tcp.source_port(),
                dport: tcp.destination_port(),
                // Byte 13 holds CWR..FIN; the slice is at least 20 bytes long.
                flags: TcpFlags(tcp.slice().get(13).copied().unwrap_or(0)),
            })
        }
        PROTO_UDP => {
            let udp = UdpHeaderSlice::from_slice(bytes).map_err(|_| DropReason::Truncated)?;
            if !fragmented {
                let len = usize::from(udp.length());
                if len < udp.slice().len() {
                    return Err(DropReason::Malformed);
                }
                if len > bytes.len() {
                    return Err(DropReason::Truncated);
                }
            }
            Ok(L4::Udp {
                sport: udp.source_port(),
                dport: udp.destination_port(),
            })
        }
        PROTO_SCTP => {
            // RFC 9260 §3.1 common header: ports, verification tag, checksum (12 bytes).
            let Some(&[s_hi, s_lo, d_hi, d_lo, ..]) = bytes.get(..12) else {
                return Err(DropReason::Truncated);
            };
            Ok(L4::Sctp {
                sport: u16::from_be_bytes([s_hi, s_lo]),
                dport: u16::from_be_bytes([d_hi, d_lo]),
            })
        }
        PROTO_ICMP if !is_v6 => parse_icmp(bytes, ECHO_TYPES_V4),
        PROTO_ICMPV6 if is_v6 => parse_icmp(bytes, ECHO_TYPES_V6),
        _ => Ok(L4::None),
    }
}

/// ICMPv4 echo reply and echo request.
const ECHO_TYPES_V4: [u8; 2] = [0, 8];
/// ICMPv6 echo request and echo reply.
const ECHO_TYPES_V6: [u8; 2] = [128, 129];

/// Summarises an ICMP header: both versions share type, code, checksum and 4 bytes whose
/// first two are the echo identifier for echo messages.
#[inline]
fn parse_icmp(bytes: &[u8], echo_types: [u8; 2]) -> Result<L4, DropReason> {
    let Some(&[ty, code, _, _, id_hi, id_lo, _, _]) = bytes.get(..8) else {
        return Err(DropReason::Truncated);
    };
    let id = if echo_types.contains(&ty) {
        u16::from_be_bytes([id_hi, id_lo])
    } else {
        0
    };
    Ok(L4::Icmp { ty, code, id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{
        ArpHardwareId, ArpOperation, ArpPacket, IpAuthHeader, IpFragOffset, IpHeaders, IpNumber,
        Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header,
        Ipv6RawExtHeader, Ipv6RoutingExtensions, PacketBuilder, PacketBuilderStep,
    };
    use proptest::prelude::*;

    const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
    const V4_SRC: [u8; 4] = [10, 0, 0, 1];
    const V4_DST: [u8; 4] = [10, 0, 0, 2];
    const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6_DST: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn check(frame: &[u8], expected: Result<PacketMeta, DropReason>) {
        let got = parse(frame);
        assert_eq!(got, expected, "frame {frame:02x?}");
        same_as_full(frame);
        if let Ok(meta) = got {
            assert_invariants(frame, &meta);
        }
    }

    /// Asserts that `parse` (fast path first), and `parse_into` over a slot that held another
    /// frame's result, answer exactly as `parse_full`; returns whether the frame took the
    /// fast path.
    fn same_as_full(frame: &[u8]) -> bool {
        let mut slow = false;
        let got = parse_fast_or(
            frame,
            |f| {
                slow = true;
                parse_full(f)
            },
            Ok,
        );
        assert_eq!(
            got,
            parse_full(frame),
            "fast path vs full parser, frame {frame:02x?}"
        );
        for held in [Err(DropReason::Truncated), parse(&tcp_v4())] {
            let mut out = held;
            parse_into(frame, &mut out);
            assert_eq!(out, got, "parse_into vs parse, frame {frame:02x?}");
        }
        !slow
    }

    fn check_err(frame: &[u8], expected: DropReason) {
        check(frame, Err(expected));
    }

    /// The promises the module docs make about every `Ok` result.
    fn assert_invariants(frame: &[u8], meta: &PacketMeta) {
        let l3 = usize::from(meta.l3_offset);
        let l4 = usize::from(meta.l4_offset);
        assert!(l3 == 14 || l3 == 18 || l3 == 22, "l3_offset {l3}");
        match meta.net {
            Net::Arp(_) => {
                assert_eq!(l4, 0);
                assert!(frame.len() >= l3 + 28);
            }
            Net::Ip(ip) => {
                let min = match ip.l4 {
                    L4::None => 0,
                    L4::Tcp { .. } => 20,
                    L4::Udp { .. } | L4::Icmp { .. } => 8,
                    L4::Sctp { .. } => 12,
                };
                assert_eq!(l4 == 0, ip.l4 == L4::None, "l4_offset {l4} vs {:?}", ip.l4);
                if l4 != 0 {
                    assert!(l4 >= l3 + 20, "l4_offset {l4} inside the IP header");
                    assert!(
                        frame.len() >= l4 + min,
                        "transport header outside the frame"
                    );
                }
                if let Fragment::Later { .. } = ip.fragment {
                    assert_eq!(ip.l4, L4::None);
                }
                if let L4::Tcp {
                    sport,
                    dport,
                    flags,
                } = ip.l4
                {
                    assert_eq!(sport, u16::from_be_bytes([frame[l4], frame[l4 + 1]]));
                    assert_eq!(dport, u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]));
                    assert_eq!(flags.0, frame[l4 + 13]);
                }
            }
        }
    }

    fn eth() -> PacketBuilderStep<etherparse::Ethernet2Header> {
        PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
    }

    fn write(step: PacketBuilderStep<IpHeaders>, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        step.write(&mut frame, IpNumber(proto), payload).unwrap();
        frame
    }

    fn v4_header(proto: u8, ttl: u8) -> Ipv4Header {
        Ipv4Header::new(0, ttl, IpNumber(proto), V4_SRC, V4_DST).unwrap()
    }

    fn v6_header(hop_limit: u8) -> Ipv6Header {
        Ipv6Header {
            hop_limit,
            source: V6_SRC,
            destination: V6_DST,
            ..Default::default()
        }
    }

    fn tcp_v4() -> Vec<u8> {
        let mut frame = Vec::new();
        eth()
            .ipv4(V4_SRC, V4_DST, 64)
            .tcp(40000, 80, 7, 1024)
            .syn()
            .write(&mut frame, &[0; 10])
            .unwrap();
        frame
    }

    fn udp_v6() -> Vec<u8> {
        let mut frame = Vec::new();
        eth()
            .ipv6(V6_SRC, V6_DST, 63)
            .udp(5353, 53)
            .write(&mut frame, &[1, 2, 3])
            .unwrap();
        frame
    }

    fn arp(op: ArpOperation) -> Vec<u8> {
        let packet = ArpPacket::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            op,
            &SRC_MAC,
            &V4_SRC,
            &[0; 6],
            &[169, 254, 1, 1],
        )
        .unwrap();
        let mut frame = Vec::new();
        eth().arp(packet).write(&mut frame).unwrap();
        frame
    }

    fn meta(l4_offset: u16, ip: IpMeta) -> PacketMeta {
        PacketMeta {
            dst_mac: DST_MAC,
            src_mac: SRC_MAC,
            vlan: None,
            l3_offset: 14,
            l4_offset,
            net: Net::Ip(ip),
        }
    }

    fn ip4(proto: u8, ttl: u8, fragment: Fragment, l4: L4) -> IpMeta {
        IpMeta {
            src: IpAddr::from(V4_SRC),
            dst: IpAddr::from(V4_DST),
            proto,
            ttl,
            fragment,
            l4,
        }
    }

    fn ip6(proto: u8, ttl: u8, fragment: Fragment, l4: L4) -> IpMeta {
        IpMeta {
            src: IpAddr::from(V6_SRC),
            dst: IpAddr::from(V6_DST),
            ..ip4(proto, ttl, fragment, l4)
        }
    }

    const TCP_SYN: L4 = L4::Tcp {
        sport: 40000,
        dport: 80,
        flags: TcpFlags(TcpFlags::SYN),
    };
    const UDP_DNS: L4 = L4::Udp {
        sport: 5353,
        dport: 53,
    };

    #[test]
    fn ipv4_transports() {
        check(&tcp_v4(), Ok(meta(34, ip4(6, 64, Fragment::None, TCP_SYN))));
        let mut frame = Vec::new();
        eth()
            .ipv4(V4_SRC, V4_DST, 5)
            .udp(5353, 53)
            .write(&mut frame, &[9; 4])
            .unwrap();
        check(&frame, Ok(meta(34, ip4(17, 5, Fragment::None, UDP_DNS))));

        let mut frame = Vec::new();
        eth()
            .ipv4(V4_SRC, V4_DST, 64)
            .icmpv4_echo_request(0xbeef, 1)
            .write(&mut frame, &[])
            .unwrap();
        let echo = L4::Icmp {
            ty: 8,
            code: 0,
            id: 0xbeef,
        };
        check(&frame, Ok(meta(34, ip4(1, 64, Fragment::None, echo))));

        // Destination unreachable (type 3, code 3): bytes 4..6 are not an identifier.
        let icmp = [3, 3, 0, 0, 0x12, 0x34, 0, 0];
        let frame = write(eth().ipv4(V4_SRC, V4_DST, 64), 1, &icmp);
        let unreachable = L4::Icmp {
            ty: 3,
            code: 3,
            id: 0,
        };
        check(
            &frame,
            Ok(meta(34, ip4(1, 64, Fragment::None, unreachable))),
        );

        // SCTP: ports from the common header.
        let sctp = [0x0b, 0x59, 0x0e, 0x1c, 1, 2, 3, 4, 0, 0, 0, 0, 0xaa];
        let frame = write(eth().ipv4(V4_SRC, V4_DST, 64), 132, &sctp);
        let ports = L4::Sctp {
            sport: 2905,
            dport: 3612,
        };
        check(&frame, Ok(meta(34, ip4(132, 64, Fragment::None, ports))));

        // GRE, and ICMPv6 carried in IPv4: not looked into.
        let frame = write(eth().ipv4(V4_SRC, V4_DST, 64), 47, &[0; 8]);
        check(&frame, Ok(meta(0, ip4(47, 64, Fragment::None, L4::None))));
        let frame = write(
            eth().ipv4(V4_SRC, V4_DST, 64),
            58,
            &[128, 0, 0, 0, 0, 1, 0, 0],
        );
        check(&frame, Ok(meta(0, ip4(58, 64, Fragment::None, L4::None))));
    }

    #[test]
    fn ipv4_options_and_auth_header() {
        let mut header = v4_header(6, 64);
        header.options = [1u8; 12].as_slice().try_into().unwrap();
        let mut frame = Vec::new();
        eth()
            .ip(IpHeaders::Ipv4(header, Ipv4Extensions::default()))
            .tcp(40000, 80, 7, 1024)
            .syn()
            .write(&mut frame, &[])
            .unwrap();
        check(
            &frame,
            Ok(meta(14 + 32, ip4(6, 64, Fragment::None, TCP_SYN))),
        );

        let exts = Ipv4Extensions {
            auth: Some(IpAuthHeader::new(IpNumber::UDP, 1, 2, &[0; 8]).unwrap()),
        };
        let mut frame = Vec::new();
        eth()
            .ip(IpHeaders::Ipv4(v4_header(17, 64), exts))
            .udp(5353, 53)
            .write(&mut frame, &[])
            .unwrap();
        // AH of 12 + 8 bytes; proto is the protocol after it.
        check(
            &frame,
            Ok(meta(14 + 20 + 20, ip4(17, 64, Fragment::None, UDP_DNS))),
        );
    }

    #[test]
    fn ipv6_transports_and_extension_headers() {
        check(
            &udp_v6(),
            Ok(meta(54, ip6(17, 63, Fragment::None, UDP_DNS))),
        );

        let mut frame = Vec::new();
        eth()
            .ipv6(V6_SRC, V6_DST, 64)
            .icmpv6_echo_reply(7, 1)
            .write(&mut frame, &[])
            .unwrap();
        let reply = L4::Icmp {
            ty: 129,
            code: 0,
            id: 7,
        };
        check(&frame, Ok(meta(54, ip6(58, 64, Fragment::None, reply))));

        // Neighbour solicitation: not an echo, so no identifier.
        let ns = [135, 0, 0, 0, 0xff, 0xff, 0, 0];
        let frame = write(
            eth().ip(IpHeaders::Ipv6(v6_header(255), Default::default())),
            58,
            &ns,
        );
        let ns_meta = L4::Icmp {
            ty: 135,
            code: 0,
            id: 0,
        };
        check(&frame, Ok(meta(54, ip6(58, 255, Fragment::None, ns_meta))));

        // ICMPv4 carried in IPv6 is not looked into.
        let frame = write(eth().ipv6(V6_SRC, V6_DST, 64), 1, &[8, 0, 0, 0, 0, 1, 0, 0]);
        check(&frame, Ok(meta(0, ip6(1, 64, Fragment::None, L4::None))));

        // Hop-by-hop, destination options, routing, final destination options and AH.
        let raw = |len: usize| Ipv6RawExtHeader::new_raw(IpNumber(0), &vec![0; len]).unwrap();
        let exts = Ipv6Extensions {
            hop_by_hop_options: Some(raw(6)),
            destination_options: Some(raw(14)),
            routing: Some(Ipv6RoutingExtensions {
                routing: raw(6),
                final_destination_options: Some(raw(6)),
            }),
            fragment: None,
            auth: Some(IpAuthHeader::new(IpNumber(0), 1, 2, &[0; 4]).unwrap()),
        };
        let mut frame = Vec::new();
        eth()
            .ip(IpHeaders::Ipv6(v6_header(9), exts))
            .tcp(40000, 80, 7, 1024)
            .syn()
            .write(&mut frame, &[])
            .unwrap();
        let ext_len = 8 + 16 + 8 + 8 + 16;
        check(
            &frame,
            Ok(meta(54 + ext_len, ip6(6, 9, Fragment::None, TCP_SYN))),
        );

        // ESP and "no next header" end the walk with no transport.
        for proto in [50, 59] {
            let frame = write(eth().ipv6(V6_SRC, V6_DST, 64), proto, &[0; 16]);
            check(
                &frame,
                Ok(meta(0, ip6(proto, 64, Fragment::None, L4::None))),
            );
        }
    }

    fn v4_fragment(more: bool, offset: u16, id: u16) -> Ipv4Header {
        let mut header = v4_header(6, 64);
        header.identification = id;
        header.more_fragments = more;
        header.fragment_offset = IpFragOffset::try_new(offset).unwrap();
        header
    }

    #[test]
    fn ipv4_fragments() {
        // First fragment: transport header parsed.
        let mut frame = Vec::new();
        eth()
            .ip(IpHeaders::Ipv4(
                v4_fragment(true, 0, 0xabcd),
                Default::default(),
            ))
            .tcp(40000, 80, 7, 1024)
            .syn()
            .write(&mut frame, &[0; 16])
            .unwrap();
        let first = Fragment::First { id: 0xabcd };
        check(&frame, Ok(meta(34, ip4(6, 64, first, TCP_SYN))));

        // A first UDP fragment's length field covers the whole datagram: not checked.
        let mut udp = vec![0x14, 0xe9, 0, 53, 0x05, 0xdc, 0, 0];
        udp.extend_from_slice(&[0; 8]);
        let mut header = v4_fragment(true, 0, 1);
        header.protocol = IpNumber::UDP;
        let frame = write(
            eth().ip(IpHeaders::Ipv4(header, Default::default())),
            17,
            &udp,
        );
        check(
            &frame,
            Ok(meta(34, ip4(17, 64, Fragment::First { id: 1 }, UDP_DNS))),
        );

        // Later fragments: never ports, even if the payload looks like a TCP header.
        for (more, offset) in [(true, 1), (false, 185), (false, 8191)] {
            let payload = &tcp_v4()[34..];
            let frame = write(
                eth().ip(IpHeaders::Ipv4(
                    v4_fragment(more, offset, 0xabcd),
                    Default::default(),
                )),
                6,
                payload,
            );
            let later = Fragment::Later { id: 0xabcd };
            check(&frame, Ok(meta(0, ip4(6, 64, later, L4::None))));
        }

        // A first fragment too short for its TCP header (RFC 1858 tiny fragment).
        let frame = write(
            eth().ip(IpHeaders::Ipv4(v4_fragment(true, 0, 5), Default::default())),
            6,
            &[0; 8],
        );
        check_err(&frame, DropReason::Truncated);
    }

    fn v6_with_fragment(offset: u16, more: bool, id: u32, proto: u8, payload: &[u8]) -> Vec<u8> {
        let exts = Ipv6Extensions {
            fragment: Some(Ipv6FragmentHeader::new(
                IpNumber(0),
                IpFragOffset::try_new(offset).unwrap(),
                more,
                id,
            )),
            ..Default::default()
        };
        write(
            eth().ip(IpHeaders::Ipv6(v6_header(64), exts)),
            proto,
            payload,
        )
    }

    #[test]
    fn ipv6_fragments() {
        let udp = [0x14, 0xe9, 0, 53, 0x05, 0xdc, 0, 0, 1, 2, 3, 4];
        let first = Fragment::First { id: 0xdead_beef };
        check(
            &v6_with_fragment(0, true, 0xdead_beef, 17, &udp),
            Ok(meta(62, ip6(17, 64, first, UDP_DNS))),
        );
        let later = Fragment::Later { id: 0xdead_beef };
        check(
            &v6_with_fragment(100, true, 0xdead_beef, 17, &udp),
            Ok(meta(0, ip6(17, 64, later, L4::None))),
        );
        check(
            &v6_with_fragment(100, false, 0xdead_beef, 17, &udp),
            Ok(meta(0, ip6(17, 64, later, L4::None))),
        );
        // An atomic fragment (offset 0, no more fragments) is a whole datagram; its UDP
        // length is then checked like any other.
        let udp = [0x14, 0xe9, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4];
        check(
            &v6_with_fragment(0, false, 1, 17, &udp),
            Ok(meta(62, ip6(17, 64, Fragment::None, UDP_DNS))),
        );
    }

    #[test]
    fn vlan_tags() {
        let mut frame = Vec::new();
        eth()
            .single_vlan(100.try_into().unwrap())
            .ipv4(V4_SRC, V4_DST, 64)
            .tcp(40000, 80, 7, 1024)
            .syn()
            .write(&mut frame, &[])
            .unwrap();
        let expected = PacketMeta {
            vlan: Some(100),
            l3_offset: 18,
            ..meta(38, ip4(6, 64, Fragment::None, TCP_SYN))
        };
        check(&frame, Ok(expected));

        let mut frame = Vec::new();
        eth()
            .double_vlan(200.try_into().unwrap(), 4095.try_into().unwrap())
            .ipv6(V6_SRC, V6_DST, 63)
            .udp(5353, 53)
            .write(&mut frame, &[])
            .unwrap();
        let expected = PacketMeta {
            vlan: Some(200),
            l3_offset: 22,
            ..meta(62, ip6(17, 63, Fragment::None, UDP_DNS))
        };
        check(&frame, Ok(expected));

        // A third tag.
        let mut triple = frame[..12].to_vec();
        triple.extend_from_slice(&[0x81, 0x00, 0x00, 0x01]);
        triple.extend_from_slice(&frame[12..]);
        check_err(&triple, DropReason::UnsupportedEthertype);
        // A tag cut short.
        check_err(&frame[..16], DropReason::Truncated);
    }

    #[test]
    fn arp_requests_and_replies() {
        let expected = |operation| PacketMeta {
            dst_mac: DST_MAC,
            src_mac: SRC_MAC,
            vlan: None,
            l3_offset: 14,
            l4_offset: 0,
            net: Net::Arp(ArpMeta {
                operation,
                sender_mac: SRC_MAC,
                sender_ip: Ipv4Addr::from(V4_SRC),
                target_mac: [0; 6],
                target_ip: Ipv4Addr::new(169, 254, 1, 1),
            }),
        };
        check(&arp(ArpOperation::REQUEST), Ok(expected(1)));
        check(&arp(ArpOperation::REPLY), Ok(expected(2)));
        // Padded to the Ethernet minimum.
        let mut padded = arp(ArpOperation::REQUEST);
        padded.resize(60, 0);
        check(&padded, Ok(expected(1)));

        check_err(&arp(ArpOperation(3)), DropReason::UnsupportedArp);
        // Byte offsets in the frame: hardware type, protocol type, the two lengths.
        for (at, value) in [(15, 6), (16, 0x86), (18, 8), (19, 16)] {
            let mut frame = arp(ArpOperation::REQUEST);
            frame[at] = value;
            frame.resize(80, 0);
            check_err(&frame, DropReason::UnsupportedArp);
        }
        check_err(&arp(ArpOperation::REQUEST)[..41], DropReason::Truncated);
    }

    #[test]
    fn drop_reasons() {
        let with = |base: Vec<u8>, at: usize, value: u8| {
            let mut frame = base;
            frame[at] = value;
            frame
        };
        let tcp = tcp_v4();
        // Ethernet.
        check_err(&[], DropReason::Truncated);
        check_err(&tcp[..13], DropReason::Truncated);
        check_err(
            &with(tcp.clone(), 12, 0x88),
            DropReason::UnsupportedEthertype,
        );
        let lldp = with(with(tcp.clone(), 12, 0x88), 13, 0xcc);
        check_err(&lldp, DropReason::UnsupportedEthertype);
        let ieee802_3 = with(with(tcp.clone(), 12, 0x00), 13, 0x2e);
        check_err(&ieee802_3, DropReason::UnsupportedEthertype);
        // IPv4 header.
        check_err(&tcp[..14 + 19], DropReason::Truncated);
        check_err(&with(tcp.clone(), 14, 0x44), DropReason::Malformed); // IHL 4
        check_err(&with(tcp.clone(), 14, 0x65), DropReason::Malformed); // version 6
        check_err(&with(tcp.clone(), 14, 0x4f), DropReason::Truncated); // IHL 15 > frame
        check_err(&with(tcp.clone(), 17, 19), DropReason::Malformed); // total < header
        check_err(&with(tcp.clone(), 17, 100), DropReason::Truncated); // total > frame
        check_err(&tcp[..tcp.len() - 1], DropReason::Truncated);
        // TCP: data offset 4 and 15.
        check_err(&with(tcp.clone(), 46, 0x40), DropReason::Malformed);
        check_err(&with(tcp.clone(), 46, 0xf0), DropReason::Truncated);
        // IPv6.
        let udp = udp_v6();
        check_err(&with(udp.clone(), 14, 0x45), DropReason::Malformed);
        check_err(&udp[..14 + 39], DropReason::Truncated);
        check_err(&with(udp.clone(), 19, 200), DropReason::Truncated); // payload length
        check_err(&with(udp.clone(), 19, 7), DropReason::Truncated); // UDP cut by length
        // UDP length field.
        check_err(&with(udp.clone(), 59, 7), DropReason::Malformed);
        check_err(&with(udp.clone(), 59, 12), DropReason::Truncated);
        // Ethernet padding after the IP packet is ignored, and a shorter UDP length is fine.
        let mut padded = udp.clone();
        padded.resize(100, 0xee);
        assert_eq!(parse(&padded), parse(&udp));
        check(
            &with(udp.clone(), 59, 8),
            Ok(meta(54, ip6(17, 63, Fragment::None, UDP_DNS))),
        );
        // SCTP and ICMP headers cut short by the IP length.
        check_err(
            &write(eth().ipv4(V4_SRC, V4_DST, 1), 132, &[0; 11]),
            DropReason::Truncated,
        );
        check_err(
            &write(eth().ipv4(V4_SRC, V4_DST, 1), 1, &[0; 7]),
            DropReason::Truncated,
        );
        check_err(
            &write(eth().ipv6(V6_SRC, V6_DST, 1), 58, &[0; 7]),
            DropReason::Truncated,
        );
    }

    #[test]
    fn bad_extension_headers() {
        // AH with a zero payload length.
        let zero_ah = [17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        check_err(
            &write(eth().ipv6(V6_SRC, V6_DST, 1), 51, &zero_ah),
            DropReason::Malformed,
        );
        check_err(
            &write(eth().ipv4(V4_SRC, V4_DST, 1), 51, &zero_ah),
            DropReason::Malformed,
        );
        // Hop-by-hop after a destination options header.
        let hop_by_hop_late = [0, 0, 0, 0, 0, 0, 0, 0, 59, 0, 0, 0, 0, 0, 0, 0];
        let frame = write(eth().ipv6(V6_SRC, V6_DST, 1), 60, &hop_by_hop_late);
        check_err(&frame, DropReason::Malformed);
        // An extension header longer than the payload.
        let frame = write(
            eth().ipv6(V6_SRC, V6_DST, 1),
            60,
            &[59, 1, 0, 0, 0, 0, 0, 0],
        );
        check_err(&frame, DropReason::Truncated);
        // A chain of MAX_IPV6_EXT_HEADERS destination options headers is fine, one more is not.
        let chain = |n: usize| {
            let mut payload = Vec::new();
            for i in 0..n {
                let next = if i + 1 == n { 59 } else { 60 };
                payload.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
            }
            write(eth().ipv6(V6_SRC, V6_DST, 1), 60, &payload)
        };
        check(
            &chain(MAX_IPV6_EXT_HEADERS),
            Ok(meta(0, ip6(59, 1, Fragment::None, L4::None))),
        );
        check_err(&chain(MAX_IPV6_EXT_HEADERS + 1), DropReason::Malformed);
    }

    /// Every prefix of a valid frame parses to Ok or Err without panicking; prefixes that cut
    /// the IP packet (or ARP body) are errors, and longer ones parse like the whole frame.
    #[test]
    fn every_prefix() {
        let mut padded_udp = udp_v6();
        let ip_end = padded_udp.len();
        padded_udp.resize(ip_end + 6, 0);
        let mut ah_frame = Vec::new();
        eth()
            .single_vlan(3.try_into().unwrap())
            .ip(IpHeaders::Ipv4(
                v4_header(6, 64),
                Ipv4Extensions {
                    auth: Some(IpAuthHeader::new(IpNumber::TCP, 1, 2, &[0; 4]).unwrap()),
                },
            ))
            .tcp(1, 2, 3, 4)
            .write(&mut ah_frame, &[5; 5])
            .unwrap();
        let fragment = v6_with_fragment(0, true, 9, 6, &tcp_v4()[34..]);
        let cases = [
            (tcp_v4(), tcp_v4().len()),
            (padded_udp, ip_end),
            (arp(ArpOperation::REQUEST), 42),
            (fragment.clone(), fragment.len()),
            (ah_frame.clone(), ah_frame.len()),
        ];
        for (frame, complete_at) in cases {
            let whole = parse(&frame);
            assert!(whole.is_ok(), "{whole:?}");
            for n in 0..=frame.len() {
                let got = parse(&frame[..n]);
                if n < complete_at {
                    assert!(got.is_err(), "prefix {n} of {frame:02x?}: {got:?}");
                } else {
                    assert_eq!(got, whole, "prefix {n}");
                }
            }
        }
    }

    fn valid_frames() -> Vec<Vec<u8>> {
        vec![
            tcp_v4(),
            udp_v6(),
            arp(ArpOperation::REQUEST),
            v6_with_fragment(0, true, 9, 6, &tcp_v4()[34..]),
            v6_with_fragment(8, false, 9, 6, &[0; 8]),
        ]
    }

    /// Transport choices for the round-trip property.
    #[derive(Clone, Debug)]
    enum Proto {
        /// TCP with these FIN/SYN/RST/PSH/ACK bits.
        Tcp(u8),
        Udp,
        IcmpEcho {
            request: bool,
        },
    }

    fn proto_strategy() -> impl Strategy<Value = Proto> {
        prop_oneof![
            (0u8..32).prop_map(Proto::Tcp),
            Just(Proto::Udp),
            any::<bool>().prop_map(|request| Proto::IcmpEcho { request }),
        ]
    }

    fn addrs_strategy() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<[u8; 4]>())
                .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d))),
            (any::<[u8; 16]>(), any::<[u8; 16]>())
                .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d))),
        ]
    }

    /// Builds a frame from the round-trip inputs; returns it with the transport summary and
    /// protocol number the parser must report.
    fn build(
        src: IpAddr,
        dst: IpAddr,
        (sport, dport): (u16, u16),
        proto: &Proto,
        vlan: Option<u16>,
        ttl: u8,
        payload: &[u8],
    ) -> (Vec<u8>, u8, L4) {
        let headers = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
                Ipv4Header::new(0, ttl, IpNumber::TCP, s.octets(), d.octets()).unwrap(),
                Default::default(),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    hop_limit: ttl,
                    source: s.octets(),
                    destination: d.octets(),
                    ..Default::default()
                },
                Default::default(),
            ),
            _ => panic!("the strategy pairs addresses of one family"),
        };
        let step = match vlan {
            Some(id) => eth().single_vlan(id.try_into().unwrap()).ip(headers),
            None => eth().ip(headers),
        };
        let mut frame = Vec::new();
        let (ip_proto, l4) = match *proto {
            Proto::Tcp(bits) => {
                let mut tcp = step.tcp(sport, dport, 1, 2);
                if bits & 1 != 0 {
                    tcp = tcp.fin();
                }
                if bits & 2 != 0 {
                    tcp = tcp.syn();
                }
                if bits & 4 != 0 {
                    tcp = tcp.rst();
                }
                if bits & 8 != 0 {
                    tcp = tcp.psh();
                }
                if bits & 16 != 0 {
                    tcp = tcp.ack(3);
                }
                tcp.write(&mut frame, payload).unwrap();
                let flags = TcpFlags(bits);
                (
                    6,
                    L4::Tcp {
                        sport,
                        dport,
                        flags,
                    },
                )
            }
            Proto::Udp => {
                step.udp(sport, dport).write(&mut frame, payload).unwrap();
                (17, L4::Udp { sport, dport })
            }
            Proto::IcmpEcho { request } => {
                // The identifier is `sport`; `dport` serves as the sequence number.
                let (proto, ty) = match (src.is_ipv6(), request) {
                    (false, true) => {
                        let icmp = step.icmpv4_echo_request(sport, dport);
                        icmp.write(&mut frame, payload).unwrap();
                        (1, 8)
                    }
                    (false, false) => {
                        let icmp = step.icmpv4_echo_reply(sport, dport);
                        icmp.write(&mut frame, payload).unwrap();
                        (1, 0)
                    }
                    (true, true) => {
                        let icmp = step.icmpv6_echo_request(sport, dport);
                        icmp.write(&mut frame, payload).unwrap();
                        (58, 128)
                    }
                    (true, false) => {
                        let icmp = step.icmpv6_echo_reply(sport, dport);
                        icmp.write(&mut frame, payload).unwrap();
                        (58, 129)
                    }
                };
                let l4 = L4::Icmp {
                    ty,
                    code: 0,
                    id: sport,
                };
                (proto, l4)
            }
        };
        (frame, ip_proto, l4)
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            same_as_full(&bytes);
            if let Ok(meta) = parse(&bytes) {
                assert_invariants(&bytes, &meta);
            }
        }

        /// Likely EtherTypes after a MAC header, so that random bytes reach the IP parsers.
        #[test]
        fn never_panics_on_arbitrary_payloads(
            ether_type in prop_oneof![
                Just(0x0800u16), Just(0x86dd), Just(0x0806), Just(0x8100), any::<u16>()
            ],
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&ether_type.to_be_bytes());
            frame.extend_from_slice(&body);
            same_as_full(&frame);
            if let Ok(meta) = parse(&frame) {
                assert_invariants(&frame, &meta);
            }
        }

        #[test]
        fn never_panics_on_mutated_frames(
            which in any::<prop::sample::Index>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let frames = valid_frames();
            let mut frame = which.get(&frames).clone();
            for (at, value) in edits {
                let i = at.index(frame.len());
                frame[i] = value;
            }
            frame.truncate(cut.index(frame.len() + 1));
            same_as_full(&frame);
            if let Ok(meta) = parse(&frame) {
                assert_invariants(&frame, &meta);
            }
        }

        /// Frames built by etherparse parse back to the fields they were built from.
        #[test]
        fn round_trip(
            (src, dst) in addrs_strategy(),
            sport in any::<u16>(),
            dport in any::<u16>(),
            proto in proto_strategy(),
            vlan in proptest::option::of(0u16..4096),
            ttl in any::<u8>(),
            payload_len in 0usize..64,
        ) {
            let payload = vec![0x5a; payload_len];
            let (frame, ip_proto, l4) =
                build(src, dst, (sport, dport), &proto, vlan, ttl, &payload);
            let l3_offset = if vlan.is_some() { 18 } else { 14 };
            let ip_len = if src.is_ipv4() { 20 } else { 40 };
            let expected = PacketMeta {
                dst_mac: DST_MAC,
                src_mac: SRC_MAC,
                vlan,
                l3_offset,
                l4_offset: l3_offset + ip_len,
                net: Net::Ip(IpMeta {
                    src,
                    dst,
                    proto: ip_proto,
                    ttl,
                    fragment: Fragment::None,
                    l4,
                }),
            };
            prop_assert_eq!(parse(&frame), Ok(expected));
            // The common shapes take the fast path (ICMP goes to the full parser).
            let fast = same_as_full(&frame);
            prop_assert_eq!(fast, !matches!(proto, Proto::IcmpEcho { .. }));
        }

        /// The fast path against the full parser on frames of the fast path's own shapes
        /// (IPv4 or IPv6, TCP or UDP, with or without one tag of any of the three TPIDs)
        /// with header bytes overwritten, cut short or padded: every answer, `Ok` or `Err`,
        /// must be the full parser's.
        #[test]
        fn fast_path_equals_full_parser_on_mutated_frames(
            (src, dst) in addrs_strategy(),
            ports in any::<(u16, u16)>(),
            tcp in any::<bool>(),
            flags in 0u8..32,
            vlan in proptest::option::of(0u16..4096),
            tpid in prop_oneof![Just(0x8100u16), Just(0x88a8), Just(0x9100)],
            ttl in any::<u8>(),
            payload_len in 0usize..40,
            edits in proptest::collection::vec(
                (0usize..80, prop_oneof![
                    any::<u8>(),
                    Just(0u8), Just(0x45), Just(0x46), Just(0x60), Just(0x06), Just(0x11),
                    Just(0x20), Just(0x40), Just(0x50), Just(0xff),
                ]),
                0..4,
            ),
            cut in any::<prop::sample::Index>(),
            pad in 0usize..20,
        ) {
            let proto = if tcp { Proto::Tcp(flags) } else { Proto::Udp };
            let payload = vec![0x5a; payload_len];
            let (mut frame, _, _) = build(src, dst, ports, &proto, vlan, ttl, &payload);
            if vlan.is_some() {
                frame[12..14].copy_from_slice(&tpid.to_be_bytes());
            }
            prop_assert!(same_as_full(&frame), "unedited frames take the fast path");
            for (at, value) in edits {
                if let Some(b) = frame.get_mut(at) {
                    *b = value;
                }
            }
            frame.resize(frame.len() + pad, 0);
            same_as_full(&frame);
            frame.truncate(cut.index(frame.len() + 1));
            same_as_full(&frame);
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(TCP_SYN.ports(), Some((40000, 80)));
        assert_eq!(UDP_DNS.ports(), Some((5353, 53)));
        let echo = L4::Icmp {
            ty: 8,
            code: 0,
            id: 1,
        };
        assert_eq!(echo.ports(), None);
        assert_eq!(L4::None.ports(), None);
        assert_eq!(Fragment::Later { id: 3 }.id(), Some(3));
        assert_eq!(Fragment::First { id: 4 }.id(), Some(4));
        assert_eq!(Fragment::None.id(), None);
        let arp_meta = parse(&arp(ArpOperation::REQUEST)).unwrap();
        assert!(arp_meta.arp().is_some() && arp_meta.ip().is_none());
        let tcp_meta = parse(&tcp_v4()).unwrap();
        assert!(tcp_meta.arp().is_none() && tcp_meta.ip().is_some());
    }
}
