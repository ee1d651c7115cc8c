//! Fuzzes the frame parser and the in-place rewrites that consume its output.
//!
//! For any input `parse` must return without panicking, and answer exactly as `parse_full`
//! (the same parser without its fast path for common frames). When it accepts a frame, every
//! rewrite applied to a copy must also not panic and must leave a frame that parses to
//! exactly the meta the rewrite promises: the TTL one lower, the new MACs, or the ARP reply.
//! A rewrite that refuses (TTL expired, not an answerable ARP request) must leave the frame
//! unchanged.
#![no_main]

use classifier::DropReason;
use classifier::parse::{ArpMeta, Net, PacketMeta, parse, parse_full};
use classifier::rewrite::{arp_reply_in_place, decrement_ttl, set_macs};
use libfuzzer_sys::fuzz_target;

const OUR_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
const NEW_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const NEW_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

fuzz_target!(|data: &[u8]| {
    let parsed = parse(data);
    assert_eq!(parsed, parse_full(data), "fast path vs full parser");
    let Ok(meta) = parsed else {
        return;
    };

    // The MAC rewrite changes nothing but the two addresses.
    let mut frame = data.to_vec();
    assert!(set_macs(&mut frame, &NEW_SRC, &NEW_DST));
    let expected = PacketMeta {
        src_mac: NEW_SRC,
        dst_mac: NEW_DST,
        ..meta
    };
    assert_eq!(parse(&frame), Ok(expected));

    match meta.net {
        Net::Ip(ip) => {
            let mut frame = data.to_vec();
            match decrement_ttl(&mut frame, &meta) {
                Ok(()) => {
                    let mut expected = meta;
                    if let Net::Ip(e) = &mut expected.net {
                        e.ttl = ip.ttl - 1;
                    }
                    assert_eq!(parse(&frame), Ok(expected));
                }
                Err(DropReason::TtlExpired) => {
                    assert!(ip.ttl <= 1);
                    assert_eq!(frame, data);
                }
                Err(other) => panic!("decrement_ttl failed on a parsed frame: {other}"),
            }
        }
        Net::Arp(arp) => {
            let mut frame = data.to_vec();
            if arp_reply_in_place(&mut frame, &meta, OUR_MAC) {
                assert_eq!(arp.operation, 1);
                let expected = PacketMeta {
                    dst_mac: arp.sender_mac,
                    src_mac: OUR_MAC,
                    net: Net::Arp(ArpMeta {
                        operation: 2,
                        sender_mac: OUR_MAC,
                        sender_ip: arp.target_ip,
                        target_mac: arp.sender_mac,
                        target_ip: arp.sender_ip,
                    }),
                    ..meta
                };
                assert_eq!(parse(&frame), Ok(expected));
            } else {
                assert_eq!(frame, data);
            }
        }
    }
});
