//! Frame parsing: borrowed bytes in, a small `Copy` summary out.
//!
//! SKELETON — the parser helper replaces the body of [`parse`] and adds tests; the types
//! below are the contract the rest of the crate uses.

use std::net::{IpAddr, Ipv4Addr};

use crate::verdict::DropReason;

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
}

/// Parses an Ethernet frame.
pub fn parse(frame: &[u8]) -> Result<PacketMeta, DropReason> {
    let _ = frame;
    Err(DropReason::Malformed)
}
