//! Frame parsing: borrowed bytes in, a small `Copy` summary out.
//!
//! [`parse`] reads one Ethernet frame and returns a [`PacketMeta`]: MAC addresses, the outer
//! VLAN id, the network layer (ARP or IP) and, for IP, the transport summary the packet path
//! needs (ports, TCP flags, ICMP type/code/identifier) together with the byte offsets of the
//! network and transport headers, which the rewrite code and ICMP-error handling use.
//!
//! It is built from etherparse's zero-copy header slices (`Ethernet2Slice`,
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

use std::net::{IpAddr, Ipv4Addr};

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
#[inline]
pub fn parse(frame: &[u8]) -> Result<PacketMeta, DropReason> {
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
    let l3_offset = ETH_LEN + tags * VLAN_LEN;

    let (net, l4_rel) = match ether_type {
        EtherType::IPV4 => {
            let (ip, l4) = parse_ipv4(rest)?;
            (Net::Ip(ip), l4)
        }
        EtherType::IPV6 => {
            let (ip, l4) = parse_ipv6(rest)?;
            (Net::Ip(ip), l4)
        }
        EtherType::ARP => (Net::Arp(parse_arp(rest)?), 0),
        _ => return Err(DropReason::UnsupportedEthertype),
    };
    // The transport offset is relative to the network header; 0 means "none" and stays 0.
    let l4_offset = if l4_rel == 0 { 0 } else { l3_offset + l4_rel };
    Ok(PacketMeta {
        dst_mac: eth.destination(),
        src_mac: eth.source(),
        vlan,
        // l3_offset is at most 22; l4_offset at most 22 + 60 + 1028 for IPv4 and
        // 22 + 40 + MAX_IPV6_EXT_HEADERS * 2048 for IPv6, so neither can overflow a u16.
        l3_offset: l3_offset as u16,
        l4_offset: u16::try_from(l4_offset).map_err(|_| DropReason::Malformed)?,
        net,
    })
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
fn parse_arp(packet: &[u8]) -> Result<ArpMeta, DropReason> {
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
    Ok(ArpMeta {
        operation: operation.0,
        sender_mac: mac(arp.sender_hw_addr())?,
        sender_ip: ip(arp.sender_protocol_addr())?,
        target_mac: mac(arp.target_hw_addr())?,
        target_ip: ip(arp.target_protocol_addr())?,
    })
}

/// Parses an IPv4 packet; returns its summary and the transport header's offset from the
/// start of the IPv4 header (0 when there is none).
#[inline]
fn parse_ipv4(packet: &[u8]) -> Result<(IpMeta, usize), DropReason> {
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
    let fragment = if header.fragments_offset().value() != 0 {
        Fragment::Later { id }
    } else if header.more_fragments() {
        Fragment::First { id }
    } else {
        Fragment::None
    };
    let mut ip = IpMeta {
        src: IpAddr::V4(header.source_addr()),
        dst: IpAddr::V4(header.destination_addr()),
        proto: header.protocol().0,
        ttl: header.ttl(),
        fragment,
        l4: L4::None,
    };
    if let Fragment::Later { .. } = fragment {
        // The payload of a later fragment starts mid-datagram: nothing in it is a header.
        return Ok((ip, 0));
    }

    let mut l4_start = header_len;
    if ip.proto == PROTO_AUTH {
        let auth = IpAuthHeaderSlice::from_slice(packet.get(l4_start..).unwrap_or_default())
            .map_err(map_auth_error)?;
        ip.proto = auth.next_header().0;
        l4_start += auth.slice().len();
    }
    let l4_bytes = packet.get(l4_start..).unwrap_or_default();
    ip.l4 = parse_l4(ip.proto, false, l4_bytes, fragment != Fragment::None)?;
    Ok((ip, if ip.l4 == L4::None { 0 } else { l4_start }))
}

/// Parses an IPv6 packet and its extension headers; returns its summary and the transport
/// header's offset from the start of the IPv6 header (0 when there is none).
#[inline]
fn parse_ipv6(packet: &[u8]) -> Result<(IpMeta, usize), DropReason> {
    let header = Ipv6HeaderSlice::from_slice(packet).map_err(|e| match e {
        ipv6::HeaderSliceError::Len(_) => DropReason::Truncated,
        ipv6::HeaderSliceError::Content(_) => DropReason::Malformed,
    })?;
    // The payload length is taken literally, 0 included: a jumbogram (RFC 2675) cannot
    // cross an Ethernet link, so a 0 here means an empty payload, not "see hop-by-hop".
    let end = IPV6_LEN + usize::from(header.payload_length());
    let packet = packet.get(..end).ok_or(DropReason::Truncated)?;

    let mut ip = IpMeta {
        src: IpAddr::V6(header.source_addr()),
        dst: IpAddr::V6(header.destination_addr()),
        proto: header.next_header().0,
        ttl: header.hop_limit(),
        fragment: Fragment::None,
        l4: L4::None,
    };
    let mut offset = IPV6_LEN;
    let mut walked = 0;
    loop {
        let rest = packet.get(offset..).unwrap_or_default();
        let (len, next) = match ip.proto {
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
                    ip.fragment = Fragment::Later { id };
                    ip.proto = frag.next_header().0;
                    return Ok((ip, 0));
                }
                // Offset 0 without more-fragments is an atomic fragment (RFC 6946): the
                // whole datagram is here, so it is not a fragment for the packet path.
                if frag.more_fragments() {
                    ip.fragment = Fragment::First { id };
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
        ip.proto = next;
    }
    let l4_bytes = packet.get(offset..).unwrap_or_default();
    ip.l4 = parse_l4(ip.proto, true, l4_bytes, ip.fragment != Fragment::None)?;
    Ok((ip, if ip.l4 == L4::None { 0 } else { offset }))
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
