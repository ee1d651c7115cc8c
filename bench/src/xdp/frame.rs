//! The test frames: Ethernet / IPv4 / UDP from the generator pod to the sink pod, whose
//! payload carries what the sink needs to count and time each frame.
//!
//! Layout (offsets in bytes): 0 Ethernet, 14 IPv4 (20 bytes, no options), 34 UDP (checksum 0,
//! which IPv4 allows, so per-frame fields can change without touching a checksum), 42 the
//! [`Stamp`]: sequence number (u64), send time (u64, ns since the run's epoch), trial (u16,
//! top bit set on warm-up frames). 60 bytes at least (64 on the wire with the FCS).

use std::net::Ipv4Addr;

/// Bytes before the stamp.
const HEADERS: usize = 42;
/// Bytes of the stamp.
const STAMP: usize = 18;
/// The shortest frame the generator builds (64 bytes on the wire with the FCS).
pub const MIN_FRAME: usize = HEADERS + STAMP;
/// The longest (an MTU-1500 frame: 1,518 bytes on the wire).
pub const MAX_FRAME: usize = 1514;
/// The UDP ports flows are spread over: source ports from here…
const SRC_PORT_BASE: u16 = 1024;
/// …and this many of them per destination port.
const SRC_PORTS: u32 = 64_000;
/// The first destination port; flow `i` goes to `DST_PORT_BASE + i / SRC_PORTS`, so 1,000,000
/// flows use 16 destination ports.
pub const DST_PORT_BASE: u16 = 5001;
/// The last destination port policies must allow (room for 6,400,000 flows).
pub const DST_PORT_LAST: u16 = 5100;
/// Warm-up frames carry this bit in their trial number.
const WARMUP_BIT: u16 = 0x8000;

/// What the generator writes into each frame and the sink reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Sequence number within the measured part of a trial (warm-up frames count apart).
    pub seq: u64,
    /// Send time in ns since the run's epoch (one clock, one process: one-way latency is a
    /// plain difference).
    pub sent_ns: u64,
    /// The trial this frame belongs to (15 bits); frames of an older trial are stale.
    pub trial: u16,
    /// A warm-up frame: received, but not counted.
    pub warmup: bool,
}

/// Addresses of the generator and sink pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Destination MAC (the node's side of the generator's veth).
    pub dst_mac: [u8; 6],
    /// Source MAC (the generator pod's eth0).
    pub src_mac: [u8; 6],
    /// The generator pod's IP.
    pub src_ip: Ipv4Addr,
    /// The sink pod's IP.
    pub dst_ip: Ipv4Addr,
}

/// The frame template of `len` bytes (clamped to [`MIN_FRAME`]..=[`MAX_FRAME`]); flow and
/// stamp fields are zero and filled by [`set_flow`] and [`write_stamp`].
pub fn template(ep: &Endpoints, len: usize) -> Vec<u8> {
    let len = len.clamp(MIN_FRAME, MAX_FRAME);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&ep.dst_mac);
    f[6..12].copy_from_slice(&ep.src_mac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64; // TTL
    f[23] = 17; // UDP
    f[26..30].copy_from_slice(&ep.src_ip.octets());
    f[30..34].copy_from_slice(&ep.dst_ip.octets());
    let sum = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// The IPv4 header checksum of `header` (whose checksum field is zero).
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The (source port, destination port) of flow `flow`.
pub fn flow_ports(flow: u32) -> (u16, u16) {
    let src = SRC_PORT_BASE + (flow % SRC_PORTS) as u16;
    let dst = DST_PORT_BASE.saturating_add((flow / SRC_PORTS) as u16);
    (src, dst)
}

/// Writes flow `flow`'s UDP ports into a frame built from [`template`].
pub fn set_flow(frame: &mut [u8], flow: u32) {
    let (src, dst) = flow_ports(flow);
    if let Some(ports) = frame.get_mut(34..38) {
        ports[0..2].copy_from_slice(&src.to_be_bytes());
        ports[2..4].copy_from_slice(&dst.to_be_bytes());
    }
}

/// Writes `stamp` into a frame built from [`template`].
pub fn write_stamp(frame: &mut [u8], stamp: &Stamp) {
    let Some(s) = frame.get_mut(HEADERS..HEADERS + STAMP) else {
        return;
    };
    s[0..8].copy_from_slice(&stamp.seq.to_le_bytes());
    s[8..16].copy_from_slice(&stamp.sent_ns.to_le_bytes());
    let trial = (stamp.trial & !WARMUP_BIT) | if stamp.warmup { WARMUP_BIT } else { 0 };
    s[16..18].copy_from_slice(&trial.to_le_bytes());
}

/// Reads the stamp of a received frame, if it is one of ours: IPv4, UDP, to `dst_ip`, long
/// enough. Anything else (a stray ARP or IPv6 frame, a mangled one) is `None`.
pub fn read_stamp(frame: &[u8], dst_ip: Ipv4Addr) -> Option<Stamp> {
    if frame.get(12..14)? != [0x08, 0x00] || *frame.get(23)? != 17 {
        return None;
    }
    if frame.get(30..34)? != dst_ip.octets() {
        return None;
    }
    let s = frame.get(HEADERS..HEADERS + STAMP)?;
    let seq = u64::from_le_bytes(s.get(0..8)?.try_into().ok()?);
    let sent_ns = u64::from_le_bytes(s.get(8..16)?.try_into().ok()?);
    let trial = u16::from_le_bytes(s.get(16..18)?.try_into().ok()?);
    Some(Stamp {
        seq,
        sent_ns,
        trial: trial & !WARMUP_BIT,
        warmup: trial & WARMUP_BIT != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Endpoints {
        Endpoints {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 70, 0, 1),
            dst_ip: Ipv4Addr::new(10, 70, 1, 1),
        }
    }

    #[test]
    fn frames_parse_as_ipv4_udp_with_the_stamp_back() {
        fn check(len: usize, flow: u32, stamp: Stamp, want_len: usize, want_ports: (u16, u16)) {
            let ep = endpoints();
            let mut f = template(&ep, len);
            set_flow(&mut f, flow);
            write_stamp(&mut f, &stamp);
            assert_eq!(f.len(), want_len);
            let eth = etherparse::SlicedPacket::from_ethernet(&f).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = eth.net else {
                panic!("not IPv4")
            };
            assert_eq!(ip.header().source_addr(), ep.src_ip);
            assert_eq!(ip.header().destination_addr(), ep.dst_ip);
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let Some(etherparse::TransportSlice::Udp(udp)) = eth.transport else {
                panic!("not UDP")
            };
            assert_eq!(
                (udp.source_port(), udp.destination_port()),
                want_ports,
                "{flow}"
            );
            assert_eq!(usize::from(udp.length()), want_len - 34);
            assert_eq!(read_stamp(&f, ep.dst_ip), Some(stamp));
            assert_eq!(read_stamp(&f, Ipv4Addr::new(1, 2, 3, 4)), None);
        }
        let s = Stamp {
            seq: 7,
            sent_ns: 123_456_789,
            trial: 3,
            warmup: false,
        };
        check(60, 0, s, 60, (1024, 5001));
        check(10, 63_999, s, 60, (65_023, 5001));
        check(
            1514,
            64_000,
            Stamp { warmup: true, ..s },
            1514,
            (1024, 5002),
        );
        check(9000, 999_999, s, 1514, (1024 + 39_999, 5016));
    }

    #[test]
    fn foreign_and_short_frames_are_not_ours() {
        let ep = endpoints();
        let f = template(&ep, 60);
        assert!(read_stamp(&f, ep.dst_ip).is_some());
        assert_eq!(read_stamp(&f[..50], ep.dst_ip), None);
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(read_stamp(&arp, ep.dst_ip), None);
        assert_eq!(read_stamp(&[], ep.dst_ip), None);
    }
}
