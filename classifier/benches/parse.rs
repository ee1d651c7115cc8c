//! Parser and rewrite throughput on the frame shapes the dataplane sees most.
//!
//! Run with `cargo bench -p classifier --bench parse -- --quick`. The frames are built once
//! with etherparse's `PacketBuilder`; each iteration parses (or rewrites) one frame.
//!
//! Wall-clock figures from a shared machine move with its load. For a figure that does not,
//! count instructions per call with callgrind (`parse` is not inlined into the bench loop):
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=cg.out \
//!     target/release/deps/parse-<hash> --bench --profile-time 1 parse/tcp_v4_64B
//! ```
//!
//! and divide the inclusive cost of `classifier::parse::parse` by its call count.

use std::hint::black_box;

use classifier::parse::parse;
use classifier::rewrite::{checksum_adjust, decrement_ttl};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpHeaders, Ipv6Extensions, Ipv6Header,
    Ipv6RawExtHeader, PacketBuilder, ip_number,
};

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// A 64-byte TCP/IPv4 frame (14 + 20 + 20 + 10 bytes of payload, FCS excluded: 64 on the wire).
fn tcp_v4() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 65535)
        .ack(1)
        .write(&mut frame, &[0; 10])
        .expect("build tcp/ipv4");
    frame
}

/// UDP/IPv6 behind a destination options header.
fn udp_v6_ext() -> Vec<u8> {
    let header = Ipv6Header {
        hop_limit: 64,
        source: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        destination: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        ..Default::default()
    };
    let exts = Ipv6Extensions {
        destination_options: Some(
            Ipv6RawExtHeader::new_raw(ip_number::UDP, &[0; 6]).expect("dest options"),
        ),
        ..Default::default()
    };
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ip(IpHeaders::Ipv6(header, exts))
        .udp(5353, 53)
        .write(&mut frame, &[0; 16])
        .expect("build udp/ipv6");
    frame
}

/// TCP/IPv4 behind one 802.1Q tag.
fn tcp_v4_vlan() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .single_vlan(100.try_into().expect("vlan id"))
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 65535)
        .write(&mut frame, &[0; 10])
        .expect("build vlan tcp/ipv4");
    frame
}

/// An ARP request for the pod gateway.
fn arp_request() -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &SRC_MAC,
        &[10, 0, 0, 1],
        &[0; 6],
        &[169, 254, 1, 1],
    )
    .expect("arp packet");
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut frame)
        .expect("build arp");
    frame
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in [
        ("tcp_v4_64B", tcp_v4()),
        ("udp_v6_dstopts", udp_v6_ext()),
        ("tcp_v4_vlan", tcp_v4_vlan()),
        ("arp_request", arp_request()),
    ] {
        assert!(parse(&frame).is_ok(), "{name} must parse");
        group.bench_function(name, |b| b.iter(|| parse(black_box(&frame))));
    }
    group.finish();
}

fn bench_rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite");
    let frame = tcp_v4();
    let meta = parse(&frame).expect("tcp/ipv4 parses");
    group.bench_function("decrement_ttl_v4", |b| {
        let mut f = frame.clone();
        b.iter(|| {
            // Reset the TTL so that every iteration does the same work and never expires.
            if let Some(ttl) = f.get_mut(22) {
                *ttl = 64;
            }
            decrement_ttl(black_box(&mut f), &meta)
        })
    });
    group.bench_function("checksum_adjust", |b| {
        b.iter(|| checksum_adjust(black_box(0x1234), black_box(0x4006), black_box(0x3f06)))
    });
    group.finish();
}

criterion_group!(benches, bench_parse, bench_rewrite);
criterion_main!(benches);
