use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::parse::TcpFlags;

const SEC: Nanos = 1_000_000_000;
const T0: Nanos = 1_000 * SEC;
const SYN: u8 = TcpFlags::SYN;
const ACK: u8 = TcpFlags::ACK;
const FIN: u8 = TcpFlags::FIN;
const RST: u8 = TcpFlags::RST;
const PSH: u8 = TcpFlags::PSH;

use Direction::{Original as O, Reply as R};

fn small() -> Conntrack {
    Conntrack::new(CtConfig {
        capacity: 1024,
        timeouts: CtTimeouts::default(),
    })
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
}

/// Client 10.0.0.9:40000 → server 10.0.0.2:80. The client is the *higher* endpoint, so the
/// tests also cover an initiator that is not the normalised key's first endpoint.
fn tcp_key() -> FlowKey {
    FlowKey {
        src: v4(9),
        dst: v4(2),
        sport: 40000,
        dport: 80,
        proto: 6,
    }
}

fn tcp(flags: u8) -> L4 {
    L4::Tcp {
        sport: 40000,
        dport: 80,
        flags: TcpFlags(flags),
    }
}

fn key_for(dir: Direction, key: FlowKey) -> FlowKey {
    match dir {
        O => key,
        R => key.reversed(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Hit,
    Miss,
    Invalid,
}

fn kind(v: CtVerdict, dir: Direction) -> Expect {
    match v {
        CtVerdict::Hit { dir: d, .. } => {
            assert_eq!(d, dir, "direction");
            Expect::Hit
        }
        CtVerdict::Miss => Expect::Miss,
        CtVerdict::Invalid => Expect::Invalid,
    }
}

/// Inserts a TCP connection with the client's SYN, then feeds `steps` one second apart and
/// checks each verdict and the state after it (`None`: no live entry).
fn check_tcp(steps: &[(Direction, u8, Expect, Option<CtState>)]) {
    let ct = small();
    let key = tcp_key();
    ct.insert(&key, &tcp(SYN), 7, T0).unwrap();
    for (i, &(dir, flags, expect, state)) in steps.iter().enumerate() {
        let now = T0 + (i as u64 + 1) * SEC;
        let got = kind(ct.track(&key_for(dir, key), &tcp(flags), now), dir);
        assert_eq!(got, expect, "step {i}: {dir:?} flags {flags:#x}");
        assert_eq!(ct.get(&key, now).map(|e| e.state), state, "step {i} state");
    }
}

use CtState::*;
use Expect::{Hit, Invalid, Miss};

#[test]
fn tcp_full_lifecycle() {
    check_tcp(&[
        (O, SYN, Hit, Some(SynSent)),
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (O, ACK, Hit, Some(Established)),
        (O, ACK | PSH, Hit, Some(Established)),
        (R, ACK, Hit, Some(Established)),
        (R, SYN | ACK, Hit, Some(Established)),
        (O, ACK, Hit, Some(Established)),
        (O, FIN | ACK, Hit, Some(FinWait)),
        (O, FIN | ACK, Hit, Some(FinWait)),
        (R, ACK, Hit, Some(FinWait)),
        (R, FIN | ACK, Hit, Some(Closing)),
        (O, ACK, Hit, Some(Closing)),
        (O, SYN, Hit, Some(SynSent)),
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (O, ACK | FIN, Hit, Some(FinWait)),
    ]);
}

#[test]
fn tcp_reset_and_reopen() {
    check_tcp(&[
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (O, ACK, Hit, Some(Established)),
        (R, RST, Hit, Some(Closed)),
        (O, ACK, Hit, Some(Closed)),
        (R, SYN | ACK, Invalid, Some(Closed)),
        (O, SYN, Hit, Some(SynSent)),
        (R, RST | ACK, Hit, Some(Closed)),
        (R, SYN, Miss, Some(Closed)),
    ]);
    // RST straight from SYN_SENT (connection refused) and from the initiator.
    check_tcp(&[(R, RST | ACK, Hit, Some(Closed))]);
    check_tcp(&[(O, RST, Hit, Some(Closed))]);
}

#[test]
fn tcp_simultaneous_open() {
    check_tcp(&[
        (R, SYN, Hit, Some(SynRecv)),
        (O, SYN | ACK, Hit, Some(SynRecv)),
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (R, ACK, Hit, Some(SynRecv)),
        (O, ACK, Hit, Some(Established)),
    ]);
}

#[test]
fn tcp_invalid_packets() {
    // SYN-ACK from the initiator, and anything but SYN before the SYN-ACK.
    check_tcp(&[(O, SYN | ACK, Invalid, Some(SynSent))]);
    check_tcp(&[(R, ACK, Invalid, Some(SynSent))]);
    check_tcp(&[(R, ACK | PSH, Invalid, Some(SynSent))]);
    check_tcp(&[(O, ACK, Invalid, Some(SynSent))]);
    // Never-legitimate flag combinations.
    check_tcp(&[(O, SYN | FIN, Invalid, Some(SynSent))]);
    check_tcp(&[(R, SYN | RST, Invalid, Some(SynSent))]);
    // Segments without ACK after the handshake; the responder's SYN on an open connection.
    let established = [
        (R, SYN | ACK, Hit, Some(SynRecv)),
        (O, ACK, Hit, Some(Established)),
    ];
    for (dir, flags, expect, state) in [
        (O, FIN, Invalid, Established),
        (R, 0, Invalid, Established),
        (R, PSH, Invalid, Established),
        (R, SYN, Invalid, Established),
        (O, SYN | ACK, Invalid, Established),
        // The client reconnecting on an open 5-tuple passes (challenge-ACK recovery).
        (O, SYN, Hit, Established),
    ] {
        let mut steps = established.to_vec();
        steps.push((dir, flags, expect, Some(state)));
        check_tcp(&steps);
    }
    // A non-TCP packet on a TCP entry.
    let ct = small();
    ct.insert(&tcp_key(), &tcp(SYN), 0, T0).unwrap();
    assert_eq!(ct.track(&tcp_key(), &L4::None, T0), CtVerdict::Invalid);
}

#[test]
fn tcp_reverse_syn_on_closing_needs_policy() {
    let ct = small();
    let key = tcp_key();
    ct.insert(&key, &tcp(SYN), 1, T0).unwrap();
    for (dir, flags) in [(R, SYN | ACK), (O, ACK), (O, FIN | ACK), (R, FIN | ACK)] {
        assert!(matches!(
            ct.track(&key_for(dir, key), &tcp(flags), T0),
            CtVerdict::Hit { .. }
        ));
    }
    assert_eq!(ct.track(&key.reversed(), &tcp(SYN), T0), CtVerdict::Miss);
    // The pipeline then evaluates policy and inserts the connection the other way round.
    ct.insert(&key.reversed(), &tcp(SYN), 2, T0).unwrap();
    let e = ct.get(&key.reversed(), T0).unwrap();
    assert_eq!((e.state, e.dir, e.epoch), (SynSent, O, 2));
    assert_eq!(ct.get(&key, T0).unwrap().dir, R);
    assert_eq!(ct.len(), 1);
}

/// Drives a connection into a state with `steps` at `T0`, then checks it is alive one tick
/// before `timeout` and gone two ticks after it.
fn check_timeout(open: (FlowKey, L4), steps: &[(FlowKey, L4)], state: CtState, timeout: Duration) {
    for probe_alive in [true, false] {
        let ct = small();
        ct.insert(&open.0, &open.1, 0, T0).unwrap();
        for (k, l4) in steps {
            assert!(matches!(ct.track(k, l4, T0), CtVerdict::Hit { .. }));
        }
        assert_eq!(ct.get(&open.0, T0).unwrap().state, state);
        let t = timeout.as_nanos() as u64;
        if probe_alive {
            let now = T0 + t - TICK_NS;
            assert_eq!(ct.get(&open.0, now).map(|e| e.state), Some(state));
            assert!(ct.track(&open.0, &open.1, now) != CtVerdict::Miss || state == Closing);
        } else {
            let now = T0 + t + 2 * TICK_NS;
            assert_eq!(ct.get(&open.0, now), None, "{state:?} should expire");
            assert_eq!(ct.track(&open.0, &open.1, now), CtVerdict::Miss);
            assert_eq!(ct.sweep(now, ct.capacity()).freed, 1);
            assert_eq!(ct.len(), 0);
        }
    }
}

#[test]
fn every_state_times_out() {
    let t = CtTimeouts::default();
    let k = tcp_key();
    let r = k.reversed();
    let syn = (k, tcp(SYN));
    let synack = (r, tcp(SYN | ACK));
    let ack = (k, tcp(ACK));
    check_timeout(syn, &[], SynSent, t.tcp_syn);
    check_timeout(syn, &[synack], SynRecv, t.tcp_syn);
    check_timeout(syn, &[synack, ack], Established, t.tcp_established);
    check_timeout(syn, &[synack, ack, (k, tcp(FIN | ACK))], FinWait, t.tcp_fin);
    check_timeout(
        syn,
        &[synack, ack, (k, tcp(FIN | ACK)), (r, tcp(FIN | ACK))],
        Closing,
        t.tcp_fin,
    );
    check_timeout(syn, &[(r, tcp(RST))], Closed, t.tcp_rst);

    let u = FlowKey {
        src: v4(1),
        dst: v4(2),
        sport: 5353,
        dport: 53,
        proto: 17,
    };
    let udp = L4::Udp {
        sport: 5353,
        dport: 53,
    };
    check_timeout((u, udp), &[], UdpNew, t.udp);
    check_timeout((u, udp), &[(u.reversed(), udp)], UdpAssured, t.udp);

    let i = FlowKey {
        src: v4(1),
        dst: v4(2),
        sport: 77,
        dport: 77,
        proto: 1,
    };
    let req = L4::Icmp {
        ty: 8,
        code: 0,
        id: 77,
    };
    let rep = L4::Icmp {
        ty: 0,
        code: 0,
        id: 77,
    };
    check_timeout((i, req), &[], IcmpNew, t.icmp);
    check_timeout((i, req), &[(i.reversed(), rep)], IcmpAssured, t.icmp);

    let g = FlowKey {
        src: v6(1),
        dst: v6(2),
        sport: 0,
        dport: 0,
        proto: 47,
    };
    check_timeout((g, L4::None), &[], OtherNew, t.other);
    check_timeout(
        (g, L4::None),
        &[(g.reversed(), L4::None)],
        OtherAssured,
        t.other,
    );
}

#[test]
fn refresh_extends_life_and_closed_does_not_refresh() {
    let ct = small();
    let k = tcp_key();
    let udp = L4::Udp { sport: 1, dport: 2 };
    let u = FlowKey { proto: 17, ..k };
    ct.insert(&u, &udp, 0, T0).unwrap();
    // A packet every 50 s keeps a 60 s UDP flow alive for ten minutes.
    for i in 1..=12 {
        let now = T0 + i * 50 * SEC;
        assert!(
            matches!(ct.track(&u, &udp, now), CtVerdict::Hit { .. }),
            "{i}"
        );
    }
    // Packets after a RST do not extend the RST timeout.
    ct.insert(&k, &tcp(SYN), 0, T0).unwrap();
    assert!(matches!(ct.track(&k, &tcp(RST), T0), CtVerdict::Hit { .. }));
    assert!(matches!(
        ct.track(&k, &tcp(ACK), T0 + 30 * SEC),
        CtVerdict::Hit { .. }
    ));
    assert_eq!(ct.track(&k, &tcp(ACK), T0 + 41 * SEC), CtVerdict::Miss);
    // A clock slightly behind neither expires nor rewinds an entry.
    ct.insert(&k, &tcp(SYN), 0, T0).unwrap();
    assert!(matches!(
        ct.track(&k, &tcp(SYN), T0 - SEC),
        CtVerdict::Hit { .. }
    ));
    assert_eq!(ct.get(&k, T0).unwrap().last_seen, T0 / TICK_NS * TICK_NS);
}

#[test]
fn directions_and_icmp_echo() {
    let ct = small();
    // Initiator is the lower endpoint here, the higher one in `tcp_key`.
    let u = FlowKey {
        src: v4(1),
        dst: v4(200),
        sport: 9999,
        dport: 53,
        proto: 17,
    };
    let udp = L4::Udp {
        sport: 9999,
        dport: 53,
    };
    ct.insert(&u, &udp, 3, T0).unwrap();
    assert_eq!(ct.track(&u, &udp, T0), CtVerdict::Hit { dir: O, epoch: 3 });
    assert_eq!(
        ct.track(&u.reversed(), &udp, T0),
        CtVerdict::Hit { dir: R, epoch: 3 }
    );
    // Another port of the same hosts is another flow.
    assert_eq!(
        ct.track(&FlowKey { sport: 9998, ..u }, &udp, T0),
        CtVerdict::Miss
    );

    for (v6, src, dst, req, rep) in [(false, v4(5), v4(6), 8, 0), (true, v6(5), v6(6), 128, 129)] {
        let proto = if v6 { 58 } else { 1 };
        let l4 = |ty| L4::Icmp {
            ty,
            code: 0,
            id: 42,
        };
        let ip = IpMeta {
            src,
            dst,
            proto,
            ttl: 64,
            fragment: Fragment::None,
            l4: l4(req),
        };
        let key = FlowKey::from_ip(&ip);
        let reply = FlowKey::from_ip(&IpMeta {
            src: dst,
            dst: src,
            l4: l4(rep),
            ..ip
        });
        assert!(Conntrack::can_open_ip(&ip));
        ct.insert(&key, &l4(req), 1, T0).unwrap();
        assert_eq!(
            ct.track(&reply, &l4(rep), T0),
            CtVerdict::Hit { dir: R, epoch: 1 }
        );
        assert_eq!(ct.get(&key, T0).unwrap().state, IcmpAssured);
        assert_eq!(
            ct.track(&key, &l4(req), T0),
            CtVerdict::Hit { dir: O, epoch: 1 }
        );
        // The responder may not ping back through the entry, nor send replies as requests.
        assert_eq!(ct.track(&reply, &l4(req), T0), CtVerdict::Invalid);
        assert_eq!(ct.track(&key, &l4(rep), T0), CtVerdict::Invalid);
        assert_eq!(ct.track(&key, &L4::None, T0), CtVerdict::Invalid);
    }

    // A flow whose two endpoints are equal is always Original.
    let own = FlowKey {
        src: v4(1),
        dst: v4(1),
        sport: 7,
        dport: 7,
        proto: 17,
    };
    ct.insert(&own, &udp, 0, T0).unwrap();
    assert_eq!(
        ct.track(&own, &udp, T0),
        CtVerdict::Hit { dir: O, epoch: 0 }
    );
}

#[test]
fn can_open_table() {
    fn check(l4: L4, v6: bool, expected: bool) {
        assert_eq!(Conntrack::can_open(&l4, v6), expected, "{l4:?} v6={v6}");
    }
    let icmp = |ty| L4::Icmp { ty, code: 0, id: 1 };
    for (flags, expected) in [
        (SYN, true),
        (SYN | PSH, true),
        // ECN-setup SYN (ECE | CWR).
        (SYN | 0xc0, true),
        (SYN | ACK, false),
        (SYN | RST, false),
        (SYN | FIN, false),
        (ACK, false),
        (RST, false),
        (FIN | ACK, false),
        (0, false),
    ] {
        check(tcp(flags), false, expected);
        check(tcp(flags), true, expected);
    }
    check(L4::Udp { sport: 1, dport: 2 }, false, true);
    check(L4::Sctp { sport: 1, dport: 2 }, true, true);
    check(icmp(8), false, true);
    check(icmp(0), false, false);
    check(icmp(3), false, false);
    check(icmp(11), false, false);
    check(icmp(128), false, false);
    check(icmp(128), true, true);
    check(icmp(8), true, false);
    check(icmp(129), true, false);
    check(icmp(1), true, false);
    check(L4::None, false, true);

    let later = IpMeta {
        src: v4(1),
        dst: v4(2),
        proto: 17,
        ttl: 64,
        fragment: Fragment::Later { id: 9 },
        l4: L4::None,
    };
    assert!(!Conntrack::can_open_ip(&later));
    assert!(Conntrack::can_open_ip(&IpMeta {
        fragment: Fragment::First { id: 9 },
        l4: L4::Udp { sport: 1, dport: 2 },
        ..later
    }));
}

#[test]
fn remove_set_epoch_and_counts() {
    let ct = small();
    let k = tcp_key();
    assert!(!ct.remove(&k));
    assert!(!ct.set_epoch(&k, 5));
    ct.insert(&k, &tcp(SYN), 1, T0).unwrap();
    assert_eq!(ct.len(), 1);
    assert!(ct.set_epoch(&k.reversed(), 5));
    assert_eq!(
        ct.track(&k, &tcp(SYN), T0),
        CtVerdict::Hit { dir: O, epoch: 5 }
    );
    // Re-inserting replaces the entry instead of adding a second one.
    ct.insert(&k, &tcp(SYN), 6, T0).unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct.get(&k, T0).unwrap().epoch, 6);
    assert!(ct.remove(&k.reversed()));
    assert!(!ct.remove(&k));
    assert_eq!(ct.track(&k, &tcp(ACK), T0), CtVerdict::Miss);
    assert!(ct.is_empty());
    let v6_key = FlowKey {
        src: v6(1),
        dst: v6(2),
        ..k
    };
    ct.insert(&v6_key, &tcp(SYN), 1, T0).unwrap();
    assert_eq!(ct.stats().v6.live, 1);
    assert_eq!(ct.stats().v4.live, 0);
    assert_eq!(ct.capacity(), 2048);
}

#[test]
fn entry_sizes() {
    // A slot plus its byte of the group's tag word.
    let tag = std::mem::size_of::<std::sync::atomic::AtomicU64>() / 8;
    assert_eq!(ENTRY_BYTES_V4, std::mem::size_of::<table::Slot<2>>() + tag);
    assert_eq!(ENTRY_BYTES_V6, std::mem::size_of::<table::Slot<5>>() + tag);
    assert_eq!(ENTRY_BYTES_V4, 33);
    assert_eq!(ENTRY_BYTES_V6, 57);
}

#[test]
fn sweep_is_incremental() {
    let ct = small();
    for i in 0..100u16 {
        let k = FlowKey {
            sport: i,
            ..tcp_key()
        };
        ct.insert(&k, &tcp(SYN), 0, T0).unwrap();
    }
    let late = T0 + 21 * SEC;
    // The one flow refreshed just before the sweep survives.
    let keep = FlowKey {
        sport: 0,
        ..tcp_key()
    };
    assert!(matches!(
        ct.track(&keep, &tcp(SYN), late - SEC),
        CtVerdict::Hit { .. }
    ));
    let mut freed = 0;
    let mut scanned = 0;
    while scanned < ct.capacity() {
        let s = ct.sweep(late, 100);
        assert!(s.scanned <= 100);
        scanned += s.scanned;
        freed += s.freed;
    }
    assert_eq!(freed, 99);
    assert_eq!(ct.len(), 1);
    assert!(ct.get(&keep, late).is_some());
}

/// Keys that all hash into one window of a 16-slot table.
fn one_window() -> Conntrack {
    Conntrack::new(CtConfig {
        capacity: WINDOW,
        timeouts: CtTimeouts::default(),
    })
}

fn nth_key(i: u16) -> FlowKey {
    FlowKey {
        sport: 1000 + i,
        ..tcp_key()
    }
}

#[test]
fn eviction_keeps_established_flows() {
    let ct = one_window();
    let (syn, synack, ack) = (tcp(SYN), tcp(SYN | ACK), tcp(ACK));
    // Half the window established, half half-open.
    for i in 0..WINDOW as u16 {
        let k = nth_key(i);
        ct.insert(&k, &syn, 0, T0 + u64::from(i) * SEC).unwrap();
        if i % 2 == 0 {
            ct.track(&k.reversed(), &synack, T0 + u64::from(i) * SEC);
            ct.track(&k, &ack, T0 + u64::from(i) * SEC);
        }
    }
    // A SYN flood: every new flow evicts the oldest half-open one, never an established one.
    for j in 0..200u16 {
        let now = T0 + 17 * SEC + u64::from(j) * TICK_NS;
        ct.insert(&nth_key(100 + j), &syn, 0, now).unwrap();
        let previous = nth_key(100 + j - 1);
        if j > 0 {
            assert!(ct.get(&previous, now).is_some());
        }
    }
    for i in (0..WINDOW as u16).step_by(2) {
        assert_eq!(
            ct.get(&nth_key(i), T0 + 20 * SEC).unwrap().state,
            Established
        );
    }
    for i in (1..WINDOW as u16).step_by(2) {
        assert_eq!(ct.get(&nth_key(i), T0 + 20 * SEC), None);
    }
    assert_eq!(ct.stats().v4.evictions, 200);

    // Assured UDP is kept too; with only kept flows left, inserts fail.
    let ct = one_window();
    let udp = L4::Udp { sport: 1, dport: 2 };
    for i in 0..WINDOW as u16 {
        let k = FlowKey {
            proto: 17,
            ..nth_key(i)
        };
        ct.insert(&k, &udp, 0, T0).unwrap();
        ct.track(&k.reversed(), &udp, T0);
    }
    assert_eq!(ct.insert(&nth_key(99), &syn, 0, T0), Err(CtFull));
    assert_eq!(ct.stats().v4.insert_failures, 1);
    // Once they expire, their slots are reused without a sweep.
    ct.insert(&nth_key(99), &syn, 0, T0 + 61 * SEC).unwrap();
    assert_eq!(ct.stats().v4.evictions, 0);
}

#[test]
fn oldest_half_open_is_evicted_first() {
    let ct = one_window();
    for i in 0..WINDOW as u16 {
        // Flow 5 is the oldest.
        let t = if i == 5 { T0 } else { T0 + SEC };
        ct.insert(&nth_key(i), &tcp(SYN), 0, t).unwrap();
    }
    ct.insert(&nth_key(50), &tcp(SYN), 0, T0 + 2 * SEC).unwrap();
    assert_eq!(ct.get(&nth_key(5), T0 + 2 * SEC), None);
    for i in (0..WINDOW as u16).filter(|&i| i != 5) {
        assert!(ct.get(&nth_key(i), T0 + 2 * SEC).is_some(), "{i}");
    }
}

// ---- Model-based property test ----

/// A normalised key: lower endpoint, higher endpoint, protocol.
type ModelKey = (IpAddr, u16, IpAddr, u16, u8);
/// State, initiator is the lower endpoint, flags, last-seen tick, epoch.
type ModelEntry = (CtState, bool, u8, u64, u32);

/// The naive model: one map from the normalised key to the entry.
#[derive(Default)]
struct Model {
    map: HashMap<ModelKey, ModelEntry>,
    timeouts: CtTimeouts,
}

impl Model {
    /// (normalised key, packet comes from the lower endpoint).
    fn norm(k: &FlowKey) -> (ModelKey, bool) {
        let a = (k.src, k.sport);
        let b = (k.dst, k.dport);
        if a <= b {
            ((a.0, a.1, b.0, b.1, k.proto), true)
        } else {
            ((b.0, b.1, a.0, a.1, k.proto), false)
        }
    }

    fn live(&self, k: &FlowKey, now: Nanos) -> Option<ModelEntry> {
        let (n, _) = Self::norm(k);
        let e = *self.map.get(&n)?;
        let limit =
            e.0.timeout(&self.timeouts)
                .as_nanos()
                .div_ceil(TICK_NS.into()) as u64;
        let age = (now / TICK_NS).saturating_sub(e.3);
        (age <= limit).then_some(e)
    }

    fn track(&mut self, k: &FlowKey, l4: &L4, now: Nanos) -> CtVerdict {
        let Some((state, init_lo, flags, last, epoch)) = self.live(k, now) else {
            return CtVerdict::Miss;
        };
        let (n, from_lo) = Self::norm(k);
        let dir = if from_lo == init_lo { O } else { R };
        let v6 = k.src.is_ipv6();
        match step(state, flags, dir, l4, v6) {
            Step::Update {
                state,
                flags,
                refresh,
            } => {
                let last = if refresh {
                    last.max(now / TICK_NS)
                } else {
                    last
                };
                self.map.insert(n, (state, init_lo, flags, last, epoch));
                CtVerdict::Hit { dir, epoch }
            }
            Step::Invalid => CtVerdict::Invalid,
            Step::Miss => CtVerdict::Miss,
        }
    }

    fn insert(&mut self, k: &FlowKey, l4: &L4, epoch: u32, now: Nanos) {
        let (n, from_lo) = Self::norm(k);
        let flags = if from_lo { F_INIT_LO } else { 0 };
        self.map.insert(
            n,
            (CtState::initial(l4), from_lo, flags, now / TICK_NS, epoch),
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, bool, L4, u32),
    Track(usize, bool, L4),
    Remove(usize),
    SetEpoch(usize, u32),
    Advance(u64),
    Sweep,
}

/// A small pool of flows: TCP, UDP and ICMP, IPv4 and IPv6, some sharing addresses.
fn pool() -> Vec<FlowKey> {
    let mut keys = Vec::new();
    for (a, b) in [(v4(1), v4(2)), (v6(1), v6(2))] {
        for (proto, sport, dport) in [
            (6, 1000, 80),
            (6, 80, 1000),
            (17, 53, 53),
            (1, 9, 9),
            (58, 9, 9),
        ] {
            keys.push(FlowKey {
                src: a,
                dst: b,
                sport,
                dport,
                proto,
            });
        }
    }
    keys
}

fn l4_strategy() -> impl Strategy<Value = L4> {
    prop_oneof![
        prop::sample::select(vec![
            SYN,
            SYN | ACK,
            ACK,
            ACK | PSH,
            FIN | ACK,
            RST,
            RST | ACK,
            FIN,
            SYN | FIN
        ])
        .prop_map(|f| L4::Tcp {
            sport: 0,
            dport: 0,
            flags: TcpFlags(f)
        }),
        Just(L4::Udp { sport: 0, dport: 0 }),
        prop::sample::select(vec![0u8, 8, 128, 129, 3]).prop_map(|ty| L4::Icmp {
            ty,
            code: 0,
            id: 9
        }),
        Just(L4::None),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let n = pool().len();
    prop_oneof![
        2 => (0..n, any::<bool>(), l4_strategy(), 0..4u32)
            .prop_map(|(k, r, l, e)| Op::Insert(k, r, l, e)),
        6 => (0..n, any::<bool>(), l4_strategy()).prop_map(|(k, r, l)| Op::Track(k, r, l)),
        1 => (0..n).prop_map(Op::Remove),
        1 => (0..n, 0..4u32).prop_map(|(k, e)| Op::SetEpoch(k, e)),
        2 => prop_oneof![0..2 * SEC, 0..70 * SEC, 0..4000 * SEC].prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

proptest! {
    #[test]
    fn matches_naive_model(ops in prop::collection::vec(op_strategy(), 1..200)) {
        let keys = pool();
        let ct = small();
        let mut model = Model::default();
        let mut now = T0;
        for op in ops {
            match op {
                Op::Insert(i, rev, l4, epoch) => {
                    let k = if rev { keys[i].reversed() } else { keys[i] };
                    prop_assert_eq!(ct.insert(&k, &l4, epoch, now), Ok(()));
                    model.insert(&k, &l4, epoch, now);
                }
                Op::Track(i, rev, l4) => {
                    let k = if rev { keys[i].reversed() } else { keys[i] };
                    prop_assert_eq!(ct.track(&k, &l4, now), model.track(&k, &l4, now), "{:?}", k);
                }
                Op::Remove(i) => {
                    let live = model.live(&keys[i], now).is_some();
                    let removed = ct.remove(&keys[i]);
                    // An expired entry may or may not have been swept already.
                    if live {
                        prop_assert!(removed);
                    }
                    model.map.remove(&Model::norm(&keys[i]).0);
                }
                Op::SetEpoch(i, epoch) => {
                    let set = ct.set_epoch(&keys[i], epoch);
                    let n = Model::norm(&keys[i]).0;
                    if model.live(&keys[i], now).is_some() {
                        prop_assert!(set);
                    }
                    if let Some(e) = model.map.get_mut(&n).filter(|_| set) {
                        e.4 = epoch;
                    }
                }
                Op::Advance(d) => now += d,
                Op::Sweep => {
                    ct.sweep(now, ct.capacity());
                }
            }
            for k in &keys {
                let got = ct.get(k, now).map(|e| (e.state, e.epoch));
                let want = model.live(k, now).map(|e| (e.0, e.4));
                prop_assert_eq!(got, want, "{:?}", k);
            }
        }
    }
}

// ---- Concurrency ----

/// Four threads insert, track and remove flows from one pool in a small table, while
/// probing keys mixed from two pool keys (addresses of one, ports of another): a reader that
/// acted on a torn key would report a hit for one of those.
#[test]
fn concurrent_lookups_never_see_torn_keys() {
    const N: u16 = 24;
    let ct = Conntrack::new(CtConfig {
        capacity: 32,
        timeouts: CtTimeouts::default(),
    });
    fn v4_key(a: u16, p: u16) -> FlowKey {
        FlowKey {
            src: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + u32::from(a))),
            dst: IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + u32::from(a))),
            sport: 2000 + p,
            dport: 3000 + p,
            proto: 17,
        }
    }
    fn v6_key(a: u16, p: u16) -> FlowKey {
        FlowKey {
            src: IpAddr::V6(Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, 0, 1)),
            dst: IpAddr::V6(Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, a, 2)),
            ..v4_key(a, p)
        }
    }
    let udp = L4::Udp { sport: 0, dport: 0 };
    let hits: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let ct = &ct;
                s.spawn(move || {
                    let mut hits = 0;
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut next = || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for _ in 0..20_000 {
                        let r = next();
                        let i = (r % u64::from(N)) as u16;
                        let j = ((r >> 8) % u64::from(N)) as u16;
                        let key: fn(u16, u16) -> FlowKey =
                            if r & (1 << 20) == 0 { v4_key } else { v6_key };
                        let now = T0 + (r >> 40) % SEC;
                        match (r >> 16) % 4 {
                            0 => {
                                let _ = ct.insert(&key(i, i), &udp, i.into(), now);
                            }
                            1 => {
                                ct.remove(&key(i, i));
                            }
                            _ => {
                                if let CtVerdict::Hit { epoch, .. } =
                                    ct.track(&key(i, i), &udp, now)
                                {
                                    assert_eq!(epoch, u32::from(i));
                                    hits += 1;
                                }
                            }
                        }
                        if i != j {
                            assert_eq!(ct.track(&key(i, j), &udp, now), CtVerdict::Miss);
                            assert_eq!(ct.track(&key(i, j).reversed(), &udp, now), CtVerdict::Miss);
                        }
                    }
                    hits
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).sum()
    });
    // The threads did find each other's entries (the test is not vacuous).
    assert!(hits > 1000, "{hits}");
    // No two live copies of one flow survive the races.
    for i in 0..N {
        for key in [v4_key(i, i), v6_key(i, i)] {
            if ct.remove(&key) {
                assert!(!ct.remove(&key), "duplicate entry for {key:?}");
            }
        }
    }
    assert_eq!(ct.len(), 0);
}

/// Threads released together insert the same new flow: exactly one live copy remains.
#[test]
fn racing_inserts_leave_one_entry() {
    let ct = small();
    let barrier = std::sync::Barrier::new(3);
    for round in 0..300u16 {
        let key = nth_key(round);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    barrier.wait();
                    ct.insert(&key, &tcp(SYN), 0, T0).unwrap();
                });
            }
        });
        assert!(ct.remove(&key), "round {round}");
        assert!(
            !ct.remove(&key),
            "round {round}: a second live copy remained"
        );
    }
    assert_eq!(ct.len(), 0);
}

/// The two sides of the duplicate-insert race, replayed deterministically: whichever writer
/// notices the other, the copy later in probe order is the one freed.
#[test]
fn dedupe_frees_the_later_copy() {
    let udp = L4::Udp { sport: 1, dport: 2 };
    for later_writer_notices in [true, false] {
        let ct = small();
        let k = FlowKey {
            proto: 17,
            ..tcp_key()
        };
        let Normalised::V4(words, _) = normalise(&k) else {
            unreachable!()
        };
        // The first writer lands at window position 0 of an empty table.
        ct.insert(&k, &udp, 4, T0).unwrap();
        let (copy, seq) = ct.v4.force_copy(&words, 3, tick_of(T0));
        assert_eq!(ct.len(), 2);
        if later_writer_notices {
            ct.v4.dedupe(&words, &ct.v4.probe(&words), 3, copy, seq);
        } else {
            let (first, first_seq) = {
                let (_, s, c, _) = ct.v4.find(&words).unwrap();
                (s, table_seq(c))
            };
            ct.v4
                .dedupe(&words, &ct.v4.probe(&words), 0, first, first_seq);
        }
        assert_eq!(ct.len(), 1);
        // The survivor is the first copy (its epoch, 4, not the forged copy's 0).
        assert_eq!(ct.get(&k, T0).unwrap().epoch, 4);
        assert!(ct.remove(&k));
        assert!(!ct.remove(&k));
    }
}

fn table_seq(c: u64) -> u64 {
    c >> 40
}

/// The `n`th of a family of distinct DNS flows from `10.0.0.0/8` to one server.
fn dns_flow(n: u32) -> FlowKey {
    FlowKey {
        src: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)),
        dst: v4(1),
        sport: 1234,
        dport: 53,
        proto: 17,
    }
}

/// Non-evictable flows fill a table to a known load before the first `CtFull` (0.78 with
/// the seed of `Conntrack::new`; 0.46 with a contiguous 16-slot window, 0.48 with two
/// groups filled first-fit): sizing `capacity` for a load of 0.75 is safe.
#[test]
fn fills_to_high_load_before_first_failure() {
    let ct = Conntrack::new(CtConfig {
        capacity: 1 << 14,
        timeouts: CtTimeouts::default(),
    });
    let udp = L4::Udp { sport: 0, dport: 0 };
    let mut n = 0u32;
    loop {
        let k = dns_flow(n);
        if ct.insert(&k, &udp, 0, T0).is_err() {
            break;
        }
        ct.track(&k.reversed(), &udp, T0);
        n += 1;
    }
    let load = f64::from(n) / (1 << 14) as f64;
    assert!(load > 0.75, "{load}");
    assert_eq!(ct.stats().v4.evictions, 0);
}

/// The insert path's bit-mask and raw-code shortcuts agree with the `CtState` methods they
/// stand in for, for every code (including the codes that name no state).
#[test]
fn code_shortcuts_match_state_methods() {
    let t = Timeouts::new(&CtTimeouts::default());
    for code in 0..16u8 {
        let state = CtState::from_code(code);
        let evictable = (CtState::EVICTABLE_CODES >> code) & 1 != 0;
        assert_eq!(
            evictable,
            state.is_some_and(CtState::evictable),
            "code {code}"
        );
        let Some(state) = state else { continue };
        for (last, now) in [
            (100, 100),
            (100, 101),
            (100, 100 + (1 << 20)),
            (100, 99),
            (u32::MAX, 5),
        ] {
            assert_eq!(
                t.expired_code(u64::from(code), last, now),
                t.expired(state, last, now),
                "{state:?} last {last} now {now}"
            );
        }
    }
}

/// The packed-word IPv4 normalisation orders endpoints exactly as `(address, port)` tuples.
fn check_normalise_v4(src: u32, sport: u16, dst: u32, dport: u16) {
    let a = (src, sport);
    let b = (dst, dport);
    let from_lo = a <= b;
    let (lo, hi) = if from_lo { (a, b) } else { (b, a) };
    let expected = [
        (u64::from(lo.0) << 16) | u64::from(lo.1),
        ((u64::from(hi.0) << 16) | u64::from(hi.1)) << 8,
    ];
    assert_eq!(normalise_v4(src, sport, dst, dport), (expected, from_lo));
}

#[test]
fn normalise_v4_table() {
    check_normalise_v4(1, 2, 1, 2);
    check_normalise_v4(1, 9, 2, 1);
    check_normalise_v4(2, 1, 1, 9);
    check_normalise_v4(5, 80, 5, 79);
    check_normalise_v4(u32::MAX, u16::MAX, 0, 0);
}

proptest! {
    #[test]
    fn normalise_v4_matches_tuple_order(src: u32, sport: u16, dst: u32, dport: u16) {
        check_normalise_v4(src, sport, dst, dport);
    }
}

/// `prefetch_ip` computes exactly what `prefetch_tags` does for the packet's `FlowKey`, and
/// so does `prefetch_ip_into` over a slot that held another packet's prefetch (the burst
/// array is reused from frame to frame).
fn check_prefetch_ip(ct: &Conntrack, ip: &IpMeta) {
    let direct = format!("{:?}", ct.prefetch_ip(ip));
    let via_key = format!("{:?}", ct.prefetch_tags(&FlowKey::from_ip(ip)));
    assert_eq!(direct, via_key, "{ip:?}");
    let mut reused = ct.prefetch_tags(&FlowKey {
        src: IpAddr::V6(Ipv6Addr::from(u128::MAX - 1)),
        dst: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        sport: 7,
        dport: 9,
        proto: 17,
    });
    ct.prefetch_ip_into(ip, &mut reused);
    if !reused.v6 {
        // Not written for an IPv4 key, and never read for one (`key4`).
        reused.key[2..].fill(0);
    }
    assert_eq!(format!("{reused:?}"), via_key, "{ip:?} into a used slot");
}

proptest! {
    #[test]
    fn prefetch_ip_matches_prefetch_tags(
        src: u32,
        dst: u32,
        sport: u16,
        dport: u16,
        l4 in l4_strategy(),
        v6 in any::<bool>(),
    ) {
        let ct = small();
        let l4 = match l4 {
            L4::Tcp { flags, .. } => L4::Tcp { sport, dport, flags },
            L4::Udp { .. } => L4::Udp { sport, dport },
            other => other,
        };
        let (src, dst) = if v6 {
            (IpAddr::V6(Ipv6Addr::from(u128::from(src))), IpAddr::V6(Ipv6Addr::from(u128::from(dst) << 64)))
        } else {
            (IpAddr::V4(Ipv4Addr::from(src)), IpAddr::V4(Ipv4Addr::from(dst)))
        };
        // An entry in the table makes the loaded tag word part of the comparison.
        let ip = IpMeta { src, dst, proto: 6, ttl: 64, fragment: Fragment::None, l4 };
        let _ = ct.insert(&FlowKey::from_ip(&ip), &l4, 1, T0);
        check_prefetch_ip(&ct, &ip);
    }
}

/// A flow whose home slot is free when it is inserted into a lightly loaded table lands
/// there (window position 0), so `track` finds it without the tag scan; either way it is
/// found. (At 1/32 of the table full, no group here is more than half full, the one case in
/// which a free home slot is passed over.)
#[test]
fn flows_take_their_home_slot_while_it_is_free() {
    let ct = Conntrack::new(CtConfig {
        capacity: 1 << 12,
        timeouts: CtTimeouts::default(),
    });
    let (mut homed, mut elsewhere) = (0, 0);
    for i in 0..128u16 {
        let k = nth_key(i);
        let Normalised::V4(words, _) = normalise(&k) else {
            unreachable!()
        };
        let free = ct.v4.home_is_free(&words);
        ct.insert(&k, &tcp(SYN), 0, T0).unwrap();
        let (p, _, _, _) = ct.v4.find(&words).unwrap();
        if free {
            assert_eq!(p, 0, "flow {i}");
            homed += 1;
        } else {
            assert_ne!(p, 0, "flow {i}");
            elsewhere += 1;
        }
        assert_eq!(
            ct.track(&k.reversed(), &tcp(SYN | ACK), T0),
            CtVerdict::Hit { dir: R, epoch: 0 }
        );
    }
    // Most homes are still free.
    assert!(
        homed > 7 * elsewhere,
        "{homed} at home, {elsewhere} elsewhere"
    );
}

thread_local! {
    static TOUCHED_AT: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A [`Touch`] that records the address it was given.
struct Recording;

impl Touch for Recording {
    fn touch(word: &AtomicU64) -> u64 {
        TOUCHED_AT.with(|t| t.borrow_mut().push(std::ptr::from_ref(word) as usize));
        0
    }
}

/// The slot pass brings in, by its `Touch`, the slot a live flow lives in, whether in its
/// first group or in its second (one slot per packet, and the flow's own but for a tag byte
/// that collides earlier in the window, 1 in 256 per occupied slot); a new flow's lines are
/// loaded instead.
#[test]
fn the_slot_pass_touches_the_flows_own_slot_in_either_group() {
    let ct = Conntrack::new(CtConfig {
        capacity: 1 << 13,
        timeouts: CtTimeouts::default(),
    });
    let udp = L4::Udp { sport: 0, dport: 0 };
    let key = dns_flow;
    let flows = 3_000u32;
    for n in 0..flows {
        ct.insert(&key(n), &udp, 0, T0).expect("room");
    }
    let (mut second, mut other) = (0, 0);
    for n in 0..flows {
        let k = key(n);
        let Normalised::V4(words, _) = normalise(&k) else {
            unreachable!("an IPv4 key")
        };
        let (pos, ctl) = ct.v4.position_and_ctl(&words).expect("inserted");
        second += usize::from(pos >= WINDOW / 2);
        TOUCHED_AT.with(|t| t.borrow_mut().clear());
        // Either direction's packet.
        for k in [k, k.reversed()] {
            let p = ct.prefetch_tags(&k);
            ct.prefetch_slot_with::<Recording>(&p);
        }
        let touched = TOUCHED_AT.with(|t| t.borrow().clone());
        assert_eq!(touched.len(), 2, "flow {n}: {touched:?}");
        assert_eq!(touched[0], touched[1], "flow {n}: both directions alike");
        other += usize::from(touched[0] != ctl);
    }
    assert!(
        second > flows as usize / 20,
        "only {second} flows in their second group"
    );
    assert!(
        other < flows as usize / 50,
        "{other} of {flows} flows touched another slot"
    );
    TOUCHED_AT.with(|t| t.borrow_mut().clear());
    let p = ct.prefetch_tags(&key(flows + 1));
    ct.prefetch_slot_with::<Recording>(&p);
    assert!(
        TOUCHED_AT.with(|t| t.borrow().is_empty()),
        "a new flow is loaded, not touched"
    );
}
