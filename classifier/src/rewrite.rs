//! In-place header rewrites: MAC addresses, TTL / hop limit, proxy-ARP replies, and the
//! incremental checksum update (RFC 1624) that NAT will reuse.
//!
//! Every function takes the frame as `&mut [u8]` together with the [`PacketMeta`] that
//! [`crate::parse::parse`] produced for it, and touches only the bytes it documents. None
//! of them allocates or panics: when the frame is shorter than the meta claims (or does not
//! hold the header the meta names) they leave the frame unchanged and report failure
//! (`false` or `Err`). Each rewrite is all-or-nothing: length checks happen before the
//! first byte is written.
//!
//! Checksums are updated incrementally, never recomputed: the cost does not depend on the
//! header length, and a checksum that was wrong on arrival stays wrong, so the receiving
//! host still drops a corrupt packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::parse::{IpMeta, Net, PacketMeta};
use crate::verdict::DropReason;

/// Length of an IPv4 header without options: the TTL and checksum lie inside it.
const IPV4_MIN_LEN: usize = 20;
/// Length of the fixed IPv6 header.
const IPV6_LEN: usize = 40;
/// Length of an Ethernet/IPv4 ARP packet.
const ARP_LEN: usize = 28;
/// The first six bytes of an Ethernet/IPv4 ARP packet: hardware type 1, protocol 0x0800,
/// hardware address length 6, protocol address length 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
/// ARP operation codes.
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// Updates a one's complement checksum (IPv4 header, TCP, UDP, ICMP) after one 16-bit word
/// of the data it covers changed from `old` to `new`: RFC 1624 eqn. 3,
/// `HC' = ~(~HC + ~m + m')`, in one's complement arithmetic.
///
/// Eqn. 3 rather than RFC 1141's `HC' = HC + m - m'` (or eqn. 2) because it gives the same
/// result as recomputing the checksum from scratch in the corner case RFC 1624 §4 works
/// through, where the new sum is `0xFFFF` and the right checksum is `0x0000` (eqn. 2 yields
/// `0xFFFF` there). The result differs from a full recompute only when every covered word
/// is zero after the change (the recompute gives `0xFFFF`, this `0x0000`); an IPv4 header
/// never is, since its version nibble is 4.
///
/// For UDP over IPv4 a checksum of 0 means "no checksum": callers must skip the update when
/// `csum == 0` and must send a result of `0x0000` as `0xFFFF` (RFC 768).
#[inline]
pub const fn checksum_adjust(csum: u16, old: u16, new: u16) -> u16 {
    // At most 3 * 0xFFFF = 0x2_FFFD, so two end-around-carry folds reach 16 bits.
    let sum = (!csum) as u32 + (!old) as u32 + new as u32;
    let sum = (sum & 0xFFFF) + (sum >> 16);
    let sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// [`checksum_adjust`] for a 32-bit field, e.g. an IPv4 address rewritten by NAT (which the
/// IPv4 header checksum and the TCP/UDP pseudo-header both cover).
#[inline]
pub const fn checksum_adjust_u32(csum: u16, old: u32, new: u32) -> u16 {
    let csum = checksum_adjust(csum, (old >> 16) as u16, (new >> 16) as u16);
    checksum_adjust(csum, old as u16, new as u16)
}

/// Writes the Ethernet source and destination MAC addresses. Returns `false`, leaving the
/// frame unchanged, if it is shorter than an Ethernet header.
#[inline]
pub fn set_macs(frame: &mut [u8], src: &[u8; 6], dst: &[u8; 6]) -> bool {
    let Some(header) = frame.get_mut(..14) else {
        return false;
    };
    let (dst_bytes, rest) = header.split_at_mut(6);
    dst_bytes.copy_from_slice(dst);
    if let Some(src_bytes) = rest.get_mut(..6) {
        src_bytes.copy_from_slice(src);
    }
    true
}

/// Decrements the IPv4 TTL (updating the header checksum incrementally) or the IPv6 hop
/// limit, as a router does before forwarding.
///
/// The value is read from the frame, not from `meta`, so the function stays right even if
/// an earlier stage changed it. Errors, all leaving the frame unchanged:
/// - `TtlExpired` when the TTL / hop limit is 0 or 1: a router must not forward a packet
///   whose TTL would reach 0 (RFC 1812 §5.3.1, RFC 8200 §3);
/// - `Truncated` when the frame is shorter than `meta.l3_offset` plus the fixed IP header;
/// - `Malformed` when `meta` is not IP, or the byte at `l3_offset` is not of its IP version.
#[inline]
pub fn decrement_ttl(frame: &mut [u8], meta: &PacketMeta) -> Result<(), DropReason> {
    let Net::Ip(IpMeta { src, .. }) = meta.net else {
        return Err(DropReason::Malformed);
    };
    decrement_ttl_at(frame, usize::from(meta.l3_offset), src.is_ipv4())
}

/// The rewrite of a routed packet: [`decrement_ttl`], then [`set_macs`] with the next hop's
/// MACs. The same checks and errors as the two calls in that order (a frame too short for
/// the MACs is `Truncated`), but inlined into the packet path with the IP version the caller
/// already knows, instead of two calls that each take the meta apart again.
#[inline(always)]
pub fn route_in_place(
    frame: &mut [u8],
    ip: &IpMeta,
    l3_offset: u16,
    src_mac: &[u8; 6],
    dst_mac: &[u8; 6],
) -> Result<(), DropReason> {
    decrement_ttl_at(frame, usize::from(l3_offset), ip.src.is_ipv4())?;
    if !set_macs(frame, src_mac, dst_mac) {
        return Err(DropReason::Truncated);
    }
    Ok(())
}

/// [`decrement_ttl`] for an IP header of version 4 (`v4`) or 6 at `l3`.
#[inline(always)]
fn decrement_ttl_at(frame: &mut [u8], l3: usize, v4: bool) -> Result<(), DropReason> {
    if v4 {
        let Some(
            [
                version_ihl,
                _,
                _,
                _,
                _,
                _,
                _,
                _,
                ttl,
                _,
                csum_hi,
                csum_lo,
                ..,
            ],
        ) = frame.get_mut(l3..l3 + IPV4_MIN_LEN)
        else {
            return Err(DropReason::Truncated);
        };
        if *version_ihl >> 4 != 4 {
            return Err(DropReason::Malformed);
        }
        if *ttl <= 1 {
            return Err(DropReason::TtlExpired);
        }
        // The TTL shares its checksum word with the protocol byte: the word goes from
        // `ttl << 8 | proto` to that minus 0x0100. In eqn. 3 only `~old + new` depends on the
        // word, and it is 0xFEFF for every TTL and protocol, as it is for the change
        // 0x0100 -> 0x0000, so that constant change gives the same checksum without reading
        // the protocol byte. One's complement sums commute with swapping the bytes of every
        // word (RFC 1071 §2(B)), so the checksum is adjusted as it lies in memory (the change
        // byte-swapped: 0x0001 -> 0x0000) and written back the same way, with no swaps.
        *ttl -= 1;
        let csum = checksum_adjust(u16::from_le_bytes([*csum_hi, *csum_lo]), 0x0001, 0x0000);
        [*csum_hi, *csum_lo] = csum.to_le_bytes();
    } else {
        let Some([version, _, _, _, _, _, _, hop_limit, ..]) = frame.get_mut(l3..l3 + IPV6_LEN)
        else {
            return Err(DropReason::Truncated);
        };
        if *version >> 4 != 6 {
            return Err(DropReason::Malformed);
        }
        if *hop_limit <= 1 {
            return Err(DropReason::TtlExpired);
        }
        // IPv6 has no header checksum, and the hop limit is not in any pseudo-header.
        *hop_limit -= 1;
    }
    Ok(())
}

/// Turns an ARP request into the reply "`target_ip` is-at `our_mac`", in place, for
/// Calico-style proxy ARP: every pod's default gateway is 169.254.1.1 and the host answers
/// for it (and for any other address the pod asks about, since all its traffic goes through
/// the host).
///
/// The Ethernet destination becomes the requester's MAC and the source `our_mac`; in the
/// ARP body the operation becomes reply, the sender becomes (`our_mac`, old target IP) and
/// the target becomes the requester (old sender MAC and IP). VLAN tags are kept, so the
/// reply leaves on the VLAN the request came from.
///
/// Returns `false`, leaving the frame unchanged, when `meta` is not an ARP request, when the
/// frame does not hold an Ethernet/IPv4 ARP packet at `meta.l3_offset`, and for the two
/// requests that must not be answered, following Linux's proxy ARP:
/// - an ARP probe (sender IP 0.0.0.0, RFC 5227): the pod is checking that its own address
///   is unused, and an answer would make it see a conflict;
/// - a gratuitous ARP (sender IP = target IP): the pod announces its own address; answering
///   would claim that address for the host.
pub fn arp_reply_in_place(frame: &mut [u8], meta: &PacketMeta, our_mac: [u8; 6]) -> bool {
    let Net::Arp(arp) = meta.net else {
        return false;
    };
    if arp.operation != ARP_REQUEST
        || arp.sender_ip == Ipv4Addr::UNSPECIFIED
        || arp.sender_ip == arp.target_ip
    {
        return false;
    }
    let l3 = usize::from(meta.l3_offset);
    // Check every byte that will be written before writing the first one.
    if l3 < 12 || frame.len() < l3 + ARP_LEN {
        return false;
    }
    if frame.get(l3..l3 + ARP_ETH_IPV4.len()) != Some(&ARP_ETH_IPV4[..]) {
        return false;
    }
    if !set_macs(frame, &our_mac, &arp.sender_mac) {
        return false;
    }
    let Some(body) = frame.get_mut(l3 + 6..l3 + ARP_LEN) else {
        return false;
    };
    let mut reply = [0u8; ARP_LEN - 6];
    let fields: [&[u8]; 5] = [
        &ARP_REPLY.to_be_bytes(),
        &our_mac,
        &arp.target_ip.octets(),
        &arp.sender_mac,
        &arp.sender_ip.octets(),
    ];
    let mut at = 0;
    for field in fields {
        if let Some(dst) = reply.get_mut(at..at + field.len()) {
            dst.copy_from_slice(field);
        }
        at += field.len();
    }
    body.copy_from_slice(&reply);
    true
}

/// ICMPv6 neighbour solicitation and advertisement (RFC 4861).
const NDP_SOLICIT: u8 = 135;
const NDP_ADVERT: u8 = 136;
/// A solicitation's and an advertisement's body: type, code, checksum, flags/reserved,
/// target address.
const NDP_BODY_LEN: usize = 24;
/// One link-layer address option for Ethernet: type, length (in 8-byte units), MAC.
const NDP_LLADDR_OPT_LEN: usize = 8;

/// Turns a pod's neighbour solicitation into the advertisement "`target` is at `our_mac`",
/// in place: the IPv6 counterpart of [`arp_reply_in_place`] (Calico's pods resolve their
/// IPv6 gateway, a link-local address of the host side, this way, and the kernel that would
/// answer on a veth does not see frames AF_XDP takes).
///
/// The answer goes from the target address to the solicitation's source, with the Router,
/// Solicited and Override flags and a target link-layer address option; the solicitation's
/// option (its source link-layer address, as Linux always sends it) is overwritten, so the
/// frame keeps its length (any bytes after the 32-byte answer are Ethernet padding: the IPv6
/// payload length says where the packet ends).
///
/// Returns `false`, leaving the frame unchanged, for anything else — not a solicitation, a
/// hop limit other than 255 (RFC 4861 requires it: the packet crossed a router), extension
/// headers, a solicitation without room for the option, a duplicate-address probe (from the
/// unspecified address: answering would make the pod see a conflict), a multicast target,
/// or one of `own` (the pod's own address).
pub fn ndp_advert_in_place(
    frame: &mut [u8],
    meta: &PacketMeta,
    ip: &IpMeta,
    our_mac: [u8; 6],
    own: Option<Ipv6Addr>,
) -> bool {
    let IpAddr::V6(src) = ip.src else {
        return false;
    };
    if !matches!(
        ip.l4,
        crate::parse::L4::Icmp {
            ty: NDP_SOLICIT,
            code: 0,
            ..
        }
    ) || ip.ttl != 255
        || src.is_unspecified()
    {
        return false;
    }
    let l3 = usize::from(meta.l3_offset);
    let l4 = usize::from(meta.l4_offset);
    let end = l4 + NDP_BODY_LEN + NDP_LLADDR_OPT_LEN;
    // No extension headers, and room for the answer: checked before anything is written.
    if l3 < 12 || l4 != l3 + IPV6_LEN || frame.len() < end || frame.get(l3 + 6) != Some(&58) {
        return false;
    }
    let payload_len = frame
        .get(l3 + 4..l3 + 6)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if payload_len < NDP_BODY_LEN + NDP_LLADDR_OPT_LEN {
        return false;
    }
    let Some(target) = frame
        .get(l4 + 8..l4 + 24)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(Ipv6Addr::from)
    else {
        return false;
    };
    if target.is_multicast() || target.is_unspecified() || Some(target) == own {
        return false;
    }
    if !set_macs(frame, &our_mac, &meta.src_mac) {
        return false;
    }
    let answer_len = (NDP_BODY_LEN + NDP_LLADDR_OPT_LEN) as u16;
    if let Some(h) = frame.get_mut(l3 + 4..l3 + IPV6_LEN) {
        h[0..2].copy_from_slice(&answer_len.to_be_bytes());
        h[3] = 255;
        h[4..20].copy_from_slice(&target.octets());
        h[20..36].copy_from_slice(&src.octets());
    }
    let Some(body) = frame.get_mut(l4..end) else {
        return false;
    };
    body[0] = NDP_ADVERT;
    body[1] = 0;
    body[2..4].copy_from_slice(&[0, 0]);
    // Router, Solicited, Override.
    body[4..8].copy_from_slice(&[0xe0, 0, 0, 0]);
    body[24] = 2;
    body[25] = 1;
    body[26..32].copy_from_slice(&our_mac);
    let csum = icmpv6_checksum(target, src, body);
    body[2..4].copy_from_slice(&csum.to_be_bytes());
    true
}

/// The ICMPv6 checksum of `body` (its checksum field zero) from `src` to `dst`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair.first().copied().unwrap_or(0));
            let lo = u32::from(pair.get(1).copied().unwrap_or(0));
            sum += (hi << 8) | lo;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{ArpMeta, parse};
    use etherparse::{
        ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpHeaders, IpNumber, Ipv4Extensions,
        Ipv4Header, PacketBuilder,
    };
    use proptest::prelude::*;

    const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

    /// One's complement sum of big-endian 16-bit words, folded, as a full recompute does.
    fn ones_sum(words: &[u16]) -> u16 {
        let mut sum: u32 = words.iter().map(|&w| u32::from(w)).sum();
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    fn udp_v4(ttl: u8) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], ttl)
            .udp(1000, 53)
            .write(&mut frame, &[1, 2, 3, 4])
            .unwrap();
        frame
    }

    fn udp_v6(hop_limit: u8) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
            .single_vlan(7.try_into().unwrap())
            .ipv6([0xfd; 16], [0xfe; 16], hop_limit)
            .udp(1000, 53)
            .write(&mut frame, &[1, 2, 3, 4])
            .unwrap();
        frame
    }

    const POD6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const POD_LL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0, 0, 0, 0, 0, 1];
    const GW6: [u8; 16] = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0xec, 0xee, 0xee, 0xff, 0xfe, 0xee, 0xee, 0xee,
    ];

    /// A neighbour solicitation from `src` for `target` (to its solicited-node group), with
    /// the source link-layer option when `option`.
    fn solicitation(src: [u8; 16], target: [u8; 16], hop_limit: u8, option: bool) -> Vec<u8> {
        let mut group = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
        group[13..].copy_from_slice(&target[13..]);
        let mut payload = target.to_vec();
        if option {
            payload.extend_from_slice(&[1, 1]);
            payload.extend_from_slice(&POD_MAC);
        }
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, [0x33, 0x33, 0xff, 0xee, 0xee, 0xee])
            .ipv6(src, group, hop_limit)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut frame, &payload)
            .unwrap();
        frame
    }

    fn ndp(frame: &mut [u8]) -> bool {
        let meta = parse(frame).unwrap();
        let ip = *meta.ip().unwrap();
        ndp_advert_in_place(frame, &meta, &ip, HOST_MAC, Some(Ipv6Addr::from(POD6)))
    }

    #[test]
    fn neighbour_solicitation_becomes_a_checksummed_advertisement() {
        let mut frame = solicitation(POD_LL, GW6, 255, true);
        assert!(ndp(&mut frame));
        let sliced = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = sliced.link else {
            panic!("not Ethernet")
        };
        assert_eq!((eth.source(), eth.destination()), (HOST_MAC, POD_MAC));
        let Some(etherparse::NetSlice::Ipv6(ip)) = sliced.net else {
            panic!("not IPv6")
        };
        let h = ip.header();
        assert_eq!((h.source(), h.destination()), (GW6, POD_LL));
        assert_eq!(h.hop_limit(), 255);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else {
            panic!("not ICMPv6")
        };
        let body = icmp.slice();
        assert_eq!(body[0], 136);
        assert_eq!(body[4], 0xe0, "router, solicited, override");
        assert_eq!(&body[8..24], &GW6);
        assert_eq!(&body[24..32], &[2, 1, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
        // etherparse's own checksum of what we wrote.
        let want = icmp
            .icmp_type()
            .calc_checksum(GW6, POD_LL, icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
    }

    #[test]
    fn what_proxy_ndp_must_not_answer() {
        // Duplicate-address detection (unspecified source), the pod's own address, a hop
        // limit that crossed a router, no room for the option.
        for mut frame in [
            solicitation([0; 16], GW6, 255, false),
            solicitation(POD_LL, POD6, 255, true),
            solicitation(POD_LL, GW6, 254, true),
            solicitation(POD_LL, GW6, 255, false),
        ] {
            let before = frame.clone();
            assert!(!ndp(&mut frame));
            assert_eq!(frame, before, "left unchanged");
        }
    }

    fn arp_frame(op: ArpOperation, sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        let arp = ArpPacket::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            op,
            &POD_MAC,
            &sender_ip,
            &[0; 6],
            &target_ip,
        )
        .unwrap();
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, [0xff; 6])
            .arp(arp)
            .write(&mut frame)
            .unwrap();
        frame
    }

    /// The IPv4 header of a frame, with the checksum as found in the frame.
    fn ipv4_header(frame: &[u8], l3: usize) -> Ipv4Header {
        Ipv4Header::from_slice(&frame[l3..]).unwrap().0
    }

    /// `route_in_place` leaves the same bytes and answers the same as `decrement_ttl` followed
    /// by `set_macs`, for IPv4 and IPv6, TTLs around expiry, and every truncation.
    #[test]
    fn route_in_place_equals_decrement_then_set_macs() {
        const SRC: [u8; 6] = [0xee, 0, 0, 0, 0, 1];
        const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 9];
        let check = |frame: &[u8]| {
            let meta = parse(frame).unwrap();
            let ip = *meta.ip().unwrap();
            for len in 0..=frame.len() {
                let mut two = frame[..len].to_vec();
                let expected = decrement_ttl(&mut two, &meta).and_then(|()| {
                    if set_macs(&mut two, &SRC, &DST) {
                        Ok(())
                    } else {
                        Err(DropReason::Truncated)
                    }
                });
                let mut one = frame[..len].to_vec();
                let got = route_in_place(&mut one, &ip, meta.l3_offset, &SRC, &DST);
                assert_eq!(got, expected, "result, {len} of {} bytes", frame.len());
                assert_eq!(one, two, "bytes, {len} of {} bytes", frame.len());
            }
        };
        for ttl in [0, 1, 2, 64, 255] {
            check(&udp_v4(ttl));
            check(&udp_v6(ttl));
        }
    }

    /// The TTL decrement's shortcut (a constant change, applied to the checksum as it lies in
    /// memory) gives the RFC 1624 eqn. 3 result of the real word change, for every checksum
    /// (TTLs and protocols sampled: the argument does not depend on them).
    #[test]
    fn ttl_checksum_shortcut_is_exact() {
        for ttl in [2u8, 3, 64, 128, 200, 255] {
            for proto in [0u8, 1, 6, 17, 58, 132, 255] {
                let old = u16::from_be_bytes([ttl, proto]);
                let new = u16::from_be_bytes([ttl - 1, proto]);
                for csum in 0..=u16::MAX {
                    let [hi, lo] = csum.to_be_bytes();
                    let shortcut = checksum_adjust(u16::from_le_bytes([hi, lo]), 0x0001, 0x0000);
                    assert_eq!(
                        shortcut.to_le_bytes(),
                        checksum_adjust(csum, old, new).to_be_bytes(),
                        "csum {csum:#06x}, ttl {ttl}, proto {proto}"
                    );
                }
            }
        }
    }

    #[test]
    fn checksum_adjust_table() {
        let check = |csum: u16, old: u16, new: u16, expected: u16| {
            assert_eq!(
                checksum_adjust(csum, old, new),
                expected,
                "adjust({csum:#06x}, {old:#06x} -> {new:#06x})"
            );
        };
        // RFC 1624 §4: other words sum to 0xCD7A; m = 0x5555 -> m' = 0x3285. HC = 0xDD2F and
        // the recomputed HC' = ~(0xCD7A + 0x3285) = ~0xFFFF = 0x0000, which eqn. 3 matches.
        check(0xDD2F, 0x5555, 0x3285, 0x0000);
        // ... and back again.
        check(0x0000, 0x3285, 0x5555, 0xDD2F);
        // No change leaves the checksum alone, including a checksum of 0x0000 (sum 0xFFFF).
        check(0x1234, 0xABCD, 0xABCD, 0x1234);
        check(0x0000, 0x1234, 0x1234, 0x0000);
        // A word going 0x0000 <-> 0xFFFF (both one's complement zero) is no change either
        // (the sum of the other words, 0x0001, is not zero).
        check(0xFFFE, 0x0000, 0xFFFF, 0xFFFE);
        check(0xFFFE, 0xFFFF, 0x0000, 0xFFFE);
        // The documented difference from a full recompute: every word becomes zero.
        check(!0x0001, 0x0001, 0x0000, 0x0000);
        assert_eq!(!ones_sum(&[0x0000]), 0xFFFF);
    }

    proptest! {
        /// checksum_adjust agrees with recomputing the checksum over random words.
        #[test]
        fn checksum_adjust_matches_recompute(
            mut words in proptest::collection::vec(any::<u16>(), 1..40),
            index in any::<prop::sample::Index>(),
            new in prop_oneof![Just(0x0000u16), Just(0xFFFF), any::<u16>()],
        ) {
            let i = index.index(words.len());
            let before = !ones_sum(&words);
            let old = words[i];
            words[i] = new;
            // The one documented disagreement (all words zero) is covered by the table test.
            prop_assume!(words.iter().any(|&w| w != 0));
            prop_assert_eq!(checksum_adjust(before, old, new), !ones_sum(&words));
        }

        /// The 32-bit form equals two 16-bit updates and a full recompute.
        #[test]
        fn checksum_adjust_u32_matches_recompute(
            mut words in proptest::collection::vec(any::<u16>(), 2..20),
            new in any::<u32>(),
        ) {
            let before = !ones_sum(&words);
            let old = (u32::from(words[0]) << 16) | u32::from(words[1]);
            words[0] = (new >> 16) as u16;
            words[1] = new as u16;
            prop_assume!(words.iter().any(|&w| w != 0));
            prop_assert_eq!(checksum_adjust_u32(before, old, new), !ones_sum(&words));
        }

        /// After decrement_ttl the IPv4 header checksum equals a full recompute, for random
        /// headers with options.
        #[test]
        fn decrement_ttl_keeps_ipv4_checksum_valid(
            ttl in 2u8..=255,
            id in any::<u16>(),
            dont_fragment in any::<bool>(),
            dscp in 0u8..64,
            ecn in 0u8..4,
            // Protocols whose header parse does not look into, so random payload bytes
            // cannot make the frame unparseable.
            proto in any::<u8>().prop_filter("no parsed transport", |p| ![1, 6, 17, 51, 132].contains(p)),
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            option_words in 0usize..=10,
            option_byte in any::<u8>(),
        ) {
            let mut header = Ipv4Header::new(0, ttl, IpNumber(proto), src, dst).unwrap();
            header.identification = id;
            header.dont_fragment = dont_fragment;
            header.dscp = dscp.try_into().unwrap();
            header.ecn = ecn.try_into().unwrap();
            header.options = vec![option_byte; option_words * 4].as_slice().try_into().unwrap();
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
                .ip(IpHeaders::Ipv4(header, Ipv4Extensions::default()))
                .write(&mut frame, IpNumber(proto), &[0xab; 9])
                .unwrap();
            let meta = parse(&frame).unwrap();
            prop_assert_eq!(decrement_ttl(&mut frame, &meta), Ok(()));
            let after = ipv4_header(&frame, 14);
            prop_assert_eq!(after.time_to_live, ttl - 1);
            prop_assert_eq!(after.header_checksum, after.calc_header_checksum());
        }
    }

    #[test]
    fn decrement_ttl_ipv4_and_ipv6() {
        let mut frame = udp_v4(64);
        let meta = parse(&frame).unwrap();
        assert_eq!(decrement_ttl(&mut frame, &meta), Ok(()));
        let header = ipv4_header(&frame, 14);
        assert_eq!(header.time_to_live, 63);
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        // The rewritten frame parses to the same meta but for the TTL.
        let mut expected = meta;
        if let Net::Ip(ip) = &mut expected.net {
            ip.ttl = 63;
        }
        assert_eq!(parse(&frame), Ok(expected));

        let mut frame = udp_v6(2);
        let meta = parse(&frame).unwrap();
        assert_eq!(decrement_ttl(&mut frame, &meta), Ok(()));
        assert_eq!(parse(&frame).unwrap().ip().unwrap().ttl, 1);
        assert_eq!(frame[18 + 7], 1);
    }

    #[test]
    fn decrement_ttl_errors_leave_frame_unchanged() {
        let check = |frame: Vec<u8>, meta: PacketMeta, expected: DropReason| {
            let mut copy = frame.clone();
            assert_eq!(decrement_ttl(&mut copy, &meta), Err(expected));
            assert_eq!(copy, frame);
        };
        for ttl in [0, 1] {
            check(
                udp_v4(ttl),
                parse(&udp_v4(ttl)).unwrap(),
                DropReason::TtlExpired,
            );
            check(
                udp_v6(ttl),
                parse(&udp_v6(ttl)).unwrap(),
                DropReason::TtlExpired,
            );
        }
        // The frame is shorter than the meta says.
        let meta = parse(&udp_v4(64)).unwrap();
        check(udp_v4(64)[..14 + 19].to_vec(), meta, DropReason::Truncated);
        let meta6 = parse(&udp_v6(64)).unwrap();
        check(udp_v6(64)[..18 + 39].to_vec(), meta6, DropReason::Truncated);
        // The meta does not describe this frame.
        check(udp_v6(64), meta, DropReason::Malformed);
        let arp = arp_frame(ArpOperation::REQUEST, [10, 0, 0, 1], [169, 254, 1, 1]);
        check(arp.clone(), parse(&arp).unwrap(), DropReason::Malformed);
    }

    #[test]
    fn set_macs_writes_both_or_nothing() {
        let mut frame = udp_v4(64);
        assert!(set_macs(&mut frame, &HOST_MAC, &[1, 2, 3, 4, 5, 6]));
        let meta = parse(&frame).unwrap();
        assert_eq!(meta.src_mac, HOST_MAC);
        assert_eq!(meta.dst_mac, [1, 2, 3, 4, 5, 6]);
        for len in [0, 6, 12, 13] {
            let mut short = vec![0x55; len];
            assert!(!set_macs(&mut short, &HOST_MAC, &POD_MAC), "len {len}");
            assert_eq!(short, vec![0x55; len]);
        }
    }

    #[test]
    fn arp_reply_round_trips_through_parse() {
        let mut frame = arp_frame(ArpOperation::REQUEST, [10, 0, 0, 1], [169, 254, 1, 1]);
        let meta = parse(&frame).unwrap();
        assert!(arp_reply_in_place(&mut frame, &meta, HOST_MAC));
        let reply = parse(&frame).unwrap();
        assert_eq!(reply.dst_mac, POD_MAC);
        assert_eq!(reply.src_mac, HOST_MAC);
        assert_eq!(
            reply.net,
            Net::Arp(ArpMeta {
                operation: 2,
                sender_mac: HOST_MAC,
                sender_ip: Ipv4Addr::new(169, 254, 1, 1),
                target_mac: POD_MAC,
                target_ip: Ipv4Addr::new(10, 0, 0, 1),
            })
        );
        // The reply is not a request, so it is not answered again.
        let mut again = frame.clone();
        assert!(!arp_reply_in_place(&mut again, &reply, HOST_MAC));
        assert_eq!(again, frame);
    }

    #[test]
    fn arp_reply_keeps_vlan_tag() {
        let arp = ArpPacket::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            ArpOperation::REQUEST,
            &POD_MAC,
            &[10, 0, 0, 1],
            &[0; 6],
            &[10, 0, 0, 9],
        )
        .unwrap();
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, [0xff; 6])
            .single_vlan(42.try_into().unwrap())
            .arp(arp)
            .write(&mut frame)
            .unwrap();
        let meta = parse(&frame).unwrap();
        assert!(arp_reply_in_place(&mut frame, &meta, HOST_MAC));
        let reply = parse(&frame).unwrap();
        assert_eq!(reply.vlan, Some(42));
        assert_eq!(reply.arp().unwrap().sender_ip, Ipv4Addr::new(10, 0, 0, 9));
    }

    #[test]
    fn arp_reply_refusals_leave_frame_unchanged() {
        let check = |frame: Vec<u8>, meta: PacketMeta| {
            let mut copy = frame.clone();
            assert!(!arp_reply_in_place(&mut copy, &meta, HOST_MAC));
            assert_eq!(copy, frame);
        };
        let request = arp_frame(ArpOperation::REQUEST, [10, 0, 0, 1], [169, 254, 1, 1]);
        let meta = parse(&request).unwrap();
        // Replies, probes and gratuitous requests are not answered.
        let reply = arp_frame(ArpOperation::REPLY, [10, 0, 0, 1], [169, 254, 1, 1]);
        check(reply.clone(), parse(&reply).unwrap());
        let probe = arp_frame(ArpOperation::REQUEST, [0, 0, 0, 0], [10, 0, 0, 1]);
        check(probe.clone(), parse(&probe).unwrap());
        let gratuitous = arp_frame(ArpOperation::REQUEST, [10, 0, 0, 1], [10, 0, 0, 1]);
        check(gratuitous.clone(), parse(&gratuitous).unwrap());
        // Not ARP at all.
        check(udp_v4(64), parse(&udp_v4(64)).unwrap());
        // Shorter than the meta says, at every length.
        for len in 0..request.len().min(14 + ARP_LEN) {
            check(request[..len].to_vec(), meta);
        }
        // The meta says ARP but the frame holds something else.
        check(udp_v4(64), meta);
    }
}
