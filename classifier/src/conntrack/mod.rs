//! Connection tracking: one shared, lock-free table of flows per address family.
//!
//! Input: a packet's [`FlowKey`] and [`L4`] summary and the caller's clock `now`. Output: a
//! [`CtVerdict`] — `Hit { dir, epoch }` for a packet of a tracked connection (the pipeline
//! lets a `Reply` through without policy, and re-checks policy when `epoch` is not the
//! snapshot's), `Miss` when no live entry exists, `Invalid` when an entry exists but the
//! packet makes no sense in its state. New connections are admitted with
//! [`Conntrack::insert`] after policy allowed them; [`Conntrack::can_open`] says which
//! packets may open one.
//!
//! # Keys and direction
//!
//! Both directions of a connection share one entry: the key is normalised so that the lower
//! `(address, port)` endpoint comes first, and the entry remembers which endpoint initiated.
//! A packet from the initiator is [`Direction::Original`], one towards it is
//! [`Direction::Reply`]. ICMP echo puts the identifier in both ports
//! ([`FlowKey::from_ip`]), so a request and its reply meet in one entry. A flow whose two
//! endpoints are equal (a socket talking to itself) cannot tell its directions apart: every
//! packet of it is `Original`.
//!
//! # States
//!
//! TCP: `SynSent` → (SYN-ACK in reply) `SynRecv` → (ACK in original) `Established` → (a FIN)
//! `FinWait` → (the other FIN) `Closing`; a RST in either direction from any state →
//! `Closed`. Each state expires after its [`CtTimeouts`] value without packets: `tcp_syn`
//! for the two handshake states, `tcp_established`, `tcp_fin` for both FIN states, `tcp_rst`
//! for `Closed`. UDP, ICMP echo and other protocols have a `New` (only the initiator has
//! spoken) and an `Assured` (a reply was seen) state, both expiring after `udp`, `icmp` or
//! `other`. SCTP is tracked as an "other" protocol (ports only, no chunk state).
//!
//! An expired entry behaves exactly as an absent one: `track` returns `Miss` and `insert`
//! reuses its slot. Expiry is measured in ticks of [`TICK_NS`] (≈ 67 ms): an entry is
//! expired once more than `ceil(timeout / TICK_NS)` whole ticks separate the tick of its last
//! refreshing packet from the tick of `now`, i.e. somewhere between `timeout - 1 tick` and
//! `timeout + 2 ticks` after that packet. A clock that steps back (workers' `now` differ a
//! little) never expires an entry and never moves last-seen backwards.
//!
//! ## Which packets are `Invalid` for an existing TCP entry
//!
//! The rule of thumb: a packet that no correct TCP stack sends in that state, judged from
//! flags and direction only (no sequence-number tracking). Everything else passes, so that
//! retransmissions, simultaneous open, window probes, keep-alives and the RFC 5961
//! challenge-ACK recovery keep working.
//!
//! | state | packet | result |
//! |---|---|---|
//! | any | SYN+RST or SYN+FIN | `Invalid` (never legitimate; a scan) |
//! | any | RST, either direction | `Closed` (refreshed unless already `Closed`) |
//! | any | no SYN, no RST, no ACK (bare FIN, null) | `Invalid`: every segment after the first SYN carries ACK |
//! | `SynSent` | SYN, original | retransmission, stays |
//! | `SynSent` | SYN, reply | simultaneous open → `SynRecv` |
//! | `SynSent` | SYN-ACK, reply | → `SynRecv` |
//! | `SynSent` | SYN-ACK, original | `Invalid` |
//! | `SynSent` | ACK/data/FIN either direction | `Invalid` (nothing may precede the SYN-ACK) |
//! | `SynRecv` | SYN or SYN-ACK, either direction | retransmission / simultaneous open, stays |
//! | `SynRecv` | ACK, original | → `Established` (→ `FinWait` if it carries a FIN) |
//! | `SynRecv` | ACK, reply | passes, stays (the initiator's ACK is still to come) |
//! | `Established`, `FinWait`, `Closing` | ACK, either direction | passes; a FIN records its direction: one direction → `FinWait`, both → `Closing` |
//! | `Established`, `FinWait`, `Closing` | SYN-ACK, reply | passes unchanged, not refreshed (retransmitted SYN-ACK) |
//! | `Established`, `FinWait`, `Closing` | SYN-ACK, original | `Invalid` |
//! | `Established` | SYN, original | passes unchanged, not refreshed: the peer answers with a challenge ACK, the initiator's RST then closes the entry and its next SYN re-opens it |
//! | `Established` | SYN, reply | `Invalid` (the responder opening towards the initiator needs policy) |
//! | `FinWait`, `Closing`, `Closed` | SYN, original | re-opens: → `SynSent`, FIN marks cleared |
//! | `FinWait`, `Closing`, `Closed` | SYN, reply | `Miss`: a new connection the other way round must pass policy; `insert` then replaces the entry |
//! | `Closed` | SYN-ACK, either direction | `Invalid` |
//! | `Closed` | ACK | passes unchanged, not refreshed (segments in flight behind the RST) |
//!
//! A TCP entry answers `Invalid` to a packet without a TCP header (`L4` other than `Tcp`).
//! An ICMP entry accepts only echo requests (v4 type 8, v6 128) in the original direction
//! and echo replies (v4 0, v6 129) in the reply direction. UDP and other entries accept any
//! packet.
//!
//! # Concurrency
//!
//! Worker threads share one [`Conntrack`] and use it without locks; the `table` submodule
//! documents the slot layout, the seqlock that keeps readers from acting on a torn key, and
//! what happens when two workers insert the same flow at once. [`Conntrack::sweep`]
//! (incremental aging) is run by the control thread only.
//!
//! # Capacity and eviction
//!
//! Each family has a fixed table of `capacity` slots (rounded up to a power of two). A flow
//! lives in a window of [`WINDOW`] slots determined by its hash. A new flow takes, in order:
//! the slot already holding its key (it is replaced), a free or expired slot, else
//! the least recently seen *evictable* entry — TCP in `SynSent`, `SynRecv`, `Closing` or
//! `Closed`, and unreplied UDP/other, and any ICMP. Established (and `FinWait`) TCP and
//! assured UDP/other entries are never evicted for a new flow: when only those remain in
//! the window, `insert` fails with [`CtFull`]. Because a flow is confined to its window,
//! inserts can fail before every slot is used: the window is two aligned groups of eight
//! slots picked by two hashes, and a new flow goes to the emptier group, which lets a table
//! of never-evictable flows reach a load of about 0.78 before the first `CtFull` (a
//! contiguous 16-slot window managed 0.46). Size `capacity` for at most 0.75.

mod table;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::Nanos;
use crate::parse::{Fragment, IpMeta, L4, TcpFlags};

use table::{Key4, Key6, Table};

pub use table::WINDOW;

/// Length of the coarse clock tick that last-seen times are stored in, in nanoseconds
/// (2^26 ns ≈ 67 ms). Coarse ticks let a busy flow skip the write on most packets.
pub const TICK_NS: u64 = 1 << 26;

/// Bytes one IPv4 slot costs: a control word, two key words, an epoch word, and its byte of
/// the group's tag word.
pub const ENTRY_BYTES_V4: usize = std::mem::size_of::<table::Slot<2>>() + table::TAG_BYTES;
/// Bytes one IPv6 slot costs: a control word, five key words, an epoch word, and its byte of
/// the group's tag word.
pub const ENTRY_BYTES_V6: usize = std::mem::size_of::<table::Slot<5>>() + table::TAG_BYTES;

/// A connection's 5-tuple as seen in one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP echo: the identifier).
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier).
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl FlowKey {
    /// The key of a parsed IP packet.
    pub fn from_ip(ip: &IpMeta) -> FlowKey {
        let (sport, dport) = match ip.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } | L4::Sctp { sport, dport } => {
                (sport, dport)
            }
            L4::Icmp { id, .. } => (id, id),
            L4::None => (0, 0),
        };
        FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto: ip.proto,
        }
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// Which way a packet travels relative to the connection's initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the initiator.
    Original,
    /// Towards the initiator.
    Reply,
}

/// Per-state timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// SYN seen, handshake not complete.
    pub tcp_syn: Duration,
    /// Handshake complete.
    pub tcp_established: Duration,
    /// FIN seen.
    pub tcp_fin: Duration,
    /// RST seen.
    pub tcp_rst: Duration,
    /// UDP.
    pub udp: Duration,
    /// ICMP echo.
    pub icmp: Duration,
    /// Any other protocol.
    pub other: Duration,
}

impl Default for CtTimeouts {
    /// Calico's defaults.
    fn default() -> Self {
        CtTimeouts {
            tcp_syn: Duration::from_secs(20),
            tcp_established: Duration::from_secs(3600),
            tcp_fin: Duration::from_secs(30),
            tcp_rst: Duration::from_secs(40),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(5),
            other: Duration::from_secs(600),
        }
    }
}

/// Table configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtConfig {
    /// Maximum entries, per address family (rounded up to a power of two, at least
    /// [`WINDOW`]).
    pub capacity: usize,
    /// Timeouts.
    pub timeouts: CtTimeouts,
}

impl Default for CtConfig {
    /// 512 Ki slots per family: 16.5 MiB for IPv4 and 28.5 MiB for IPv6.
    fn default() -> Self {
        CtConfig {
            capacity: 512 * 1024,
            timeouts: CtTimeouts::default(),
        }
    }
}

/// How the burst's slot pass ([`Conntrack::prefetch_slot_with`]) brings a tracked flow's slot
/// toward the core.
///
/// A plain load ([`Load`]) is all this crate can issue: it has no `unsafe`, and the prefetch
/// intrinsics are `unsafe` to call. A load that misses holds its place in the reorder buffer
/// until the line arrives, so a pass of loads keeps only as many misses in flight as the
/// buffer holds packets' worth of instructions; a prefetch instruction retires at once.
/// `dataplane::sys::Prefetch` implements this trait with the CPU's prefetch instruction, and
/// the workers use it (`ocelot-bench pipeline --slot-loads` measures the difference).
pub trait Touch {
    /// Brings `word`'s cache line in. Returns a value of no meaning that callers sum and
    /// keep, so that an implementation made of a load is not optimised away.
    fn touch(word: &AtomicU64) -> u64;
}

/// [`Touch`] by a relaxed load: the default, and the fallback on targets without a
/// prefetch instruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load;

impl Touch for Load {
    #[inline]
    fn touch(word: &AtomicU64) -> u64 {
        word.load(Ordering::Relaxed)
    }
}

/// What [`Conntrack::prefetch_tags`] computed for one packet's key: the normalised key
/// words, which endpoint sent the packet, where the key lives and the first group's tag word.
///
/// The pipeline keeps one per frame from the prefetch passes to the lookup, so that the key
/// is normalised and hashed once per packet ([`Conntrack::track_prefetched`],
/// [`Conntrack::insert_prefetched`]). Everything but `word` is a pure function of the key;
/// `word` is only a prefetch hint, and lookups load the tag word again, so a flow another
/// worker (or an earlier frame of the same burst) inserted meanwhile is still found.
#[derive(Clone, Copy, Debug, Default)]
pub struct CtPrefetch {
    v6: bool,
    from_lo: bool,
    /// Normalised key words; an IPv4 key uses the first two.
    key: [u64; 5],
    probe: table::Probe,
    word: u64,
}

impl CtPrefetch {
    fn key4(&self) -> Key4 {
        [self.key[0], self.key[1]]
    }
}

/// Result of tracking one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtVerdict {
    /// Part of a tracked connection; `epoch` is the policy epoch it was admitted under.
    Hit {
        /// Direction of the packet.
        dir: Direction,
        /// Policy epoch stored with the entry.
        epoch: u32,
    },
    /// No entry.
    Miss,
    /// Entry exists but the packet is invalid for its state.
    Invalid,
}

/// The table is full and nothing may be evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("conntrack table full")]
pub struct CtFull;

/// State of a tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CtState {
    /// TCP: the initiator's SYN was seen.
    SynSent = 1,
    /// TCP: the responder's SYN-ACK (or, in a simultaneous open, its SYN) was seen.
    SynRecv = 2,
    /// TCP: the handshake completed.
    Established = 3,
    /// TCP: one direction sent a FIN.
    FinWait = 4,
    /// TCP: both directions sent a FIN.
    Closing = 5,
    /// TCP: a RST was seen.
    Closed = 6,
    /// UDP: only the initiator has sent.
    UdpNew = 7,
    /// UDP: a reply was seen.
    UdpAssured = 8,
    /// ICMP echo: only requests seen.
    IcmpNew = 9,
    /// ICMP echo: a reply was seen.
    IcmpAssured = 10,
    /// Another protocol (SCTP, GRE, ESP, …): only the initiator has sent.
    OtherNew = 11,
    /// Another protocol: a reply was seen.
    OtherAssured = 12,
}

impl CtState {
    /// Number of state codes, including the free-slot code 0.
    const CODES: usize = 13;

    fn from_code(code: u8) -> Option<CtState> {
        use CtState::*;
        Some(match code {
            1 => SynSent,
            2 => SynRecv,
            3 => Established,
            4 => FinWait,
            5 => Closing,
            6 => Closed,
            7 => UdpNew,
            8 => UdpAssured,
            9 => IcmpNew,
            10 => IcmpAssured,
            11 => OtherNew,
            12 => OtherAssured,
            _ => return None,
        })
    }

    /// Bit `code` is set for each evictable state's code: [`CtState::evictable`] as one
    /// shift and mask, for the insert path's window scan.
    const EVICTABLE_CODES: u16 = {
        use CtState::*;
        let mut m = 0u16;
        let all = [
            SynSent,
            SynRecv,
            Established,
            FinWait,
            Closing,
            Closed,
            UdpNew,
            UdpAssured,
            IcmpNew,
            IcmpAssured,
            OtherNew,
            OtherAssured,
        ];
        let mut i = 0;
        while i < all.len() {
            if all[i].evictable() {
                m |= 1 << all[i] as u16;
            }
            i += 1;
        }
        m
    };

    /// Whether a new flow may take this entry's slot when its window is full. Established
    /// TCP and replied UDP/other flows are the connections worth keeping; handshakes,
    /// dying TCP connections, unreplied datagrams and pings are cheap to lose.
    pub const fn evictable(self) -> bool {
        use CtState::*;
        match self {
            SynSent | SynRecv | Closing | Closed | UdpNew | IcmpNew | IcmpAssured | OtherNew => {
                true
            }
            Established | FinWait | UdpAssured | OtherAssured => false,
        }
    }

    fn timeout(self, t: &CtTimeouts) -> Duration {
        use CtState::*;
        match self {
            SynSent | SynRecv => t.tcp_syn,
            Established => t.tcp_established,
            FinWait | Closing => t.tcp_fin,
            Closed => t.tcp_rst,
            UdpNew | UdpAssured => t.udp,
            IcmpNew | IcmpAssured => t.icmp,
            OtherNew | OtherAssured => t.other,
        }
    }

    /// The state a connection opened by a packet with this transport summary starts in.
    fn initial(l4: &L4) -> CtState {
        match l4 {
            L4::Tcp { .. } => CtState::SynSent,
            L4::Udp { .. } => CtState::UdpNew,
            L4::Icmp { .. } => CtState::IcmpNew,
            L4::Sctp { .. } | L4::None => CtState::OtherNew,
        }
    }
}

/// What [`Conntrack::get`] reports about one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Connection state.
    pub state: CtState,
    /// Direction of the queried key relative to the initiator.
    pub dir: Direction,
    /// Policy epoch stored with the entry.
    pub epoch: u32,
    /// Start of the tick of the last refreshing packet, in nanoseconds.
    pub last_seen: Nanos,
}

/// Counters of one family's table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTableStats {
    /// Occupied slots, including expired entries the sweep has not freed yet; approximate
    /// while workers insert and remove concurrently.
    pub live: usize,
    /// Slots.
    pub capacity: usize,
    /// Live entries evicted to make room for a new flow.
    pub evictions: u64,
    /// Inserts refused with [`CtFull`].
    pub insert_failures: u64,
}

/// Counters of both tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStats {
    /// IPv4 table.
    pub v4: CtTableStats,
    /// IPv6 table.
    pub v6: CtTableStats,
}

/// What one [`Conntrack::sweep`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Slots examined.
    pub scanned: usize,
    /// Expired entries freed.
    pub freed: usize,
}

/// Ticks of one state's timeout, rounded up, and kept below 2^31 so that wrapping tick
/// arithmetic stays unambiguous.
fn timeout_ticks(d: Duration) -> u32 {
    let ticks = d.as_nanos().div_ceil(u128::from(TICK_NS));
    ticks.clamp(1, (1 << 30) as u128) as u32
}

/// The coarse tick of `now`, as stored in an entry. Truncation to 32 bits wraps after about
/// nine years of uptime; every comparison uses wrapping arithmetic.
fn tick_of(now: Nanos) -> u32 {
    (now / TICK_NS) as u32
}

/// Outcome of one packet against one entry's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The packet belongs; the entry moves to `state` with `flags`, and last-seen is set to
    /// `now` when `refresh`.
    Update {
        state: CtState,
        flags: u8,
        refresh: bool,
    },
    /// The packet makes no sense in this state.
    Invalid,
    /// The packet starts a different connection that must pass policy first.
    Miss,
}

/// Entry flag: the lower endpoint of the normalised key initiated the connection.
const F_INIT_LO: u8 = 1;
/// Entry flag: a FIN was seen in the original direction.
const F_FIN_ORIG: u8 = 2;
/// Entry flag: a FIN was seen in the reply direction.
const F_FIN_REPLY: u8 = 4;
const F_FINS: u8 = F_FIN_ORIG | F_FIN_REPLY;

/// Applies one packet to an entry in `state` with `flags`. Pure: the table calls it inside a
/// compare-and-swap loop, the model in the tests calls it directly.
fn step(state: CtState, flags: u8, dir: Direction, l4: &L4, v6: bool) -> Step {
    use CtState::*;
    let update = |state, flags, refresh| Step::Update {
        state,
        flags,
        refresh,
    };
    match state {
        SynSent | SynRecv | Established | FinWait | Closing | Closed => match l4 {
            L4::Tcp { flags: f, .. } => tcp_step(state, flags, dir, *f),
            _ => Step::Invalid,
        },
        UdpNew | UdpAssured => match dir {
            Direction::Original => update(state, flags, true),
            Direction::Reply => update(UdpAssured, flags, true),
        },
        OtherNew | OtherAssured => match dir {
            Direction::Original => update(state, flags, true),
            Direction::Reply => update(OtherAssured, flags, true),
        },
        IcmpNew | IcmpAssured => {
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            match (l4, dir) {
                (L4::Icmp { ty, .. }, Direction::Original) if *ty == request => {
                    update(state, flags, true)
                }
                (L4::Icmp { ty, .. }, Direction::Reply) if *ty == reply => {
                    update(IcmpAssured, flags, true)
                }
                _ => Step::Invalid,
            }
        }
    }
}

/// The TCP part of [`step`]; the module docs list every case.
fn tcp_step(state: CtState, flags: u8, dir: Direction, f: TcpFlags) -> Step {
    use CtState::*;
    use Direction::{Original, Reply};
    let update = |state, flags, refresh| Step::Update {
        state,
        flags,
        refresh,
    };
    let (syn, ack, rst, fin) = (
        f.has(TcpFlags::SYN),
        f.has(TcpFlags::ACK),
        f.has(TcpFlags::RST),
        f.has(TcpFlags::FIN),
    );
    if syn && (rst || fin) {
        return Step::Invalid;
    }
    if rst {
        return update(Closed, flags, state != Closed);
    }
    if syn && !ack {
        return match (state, dir) {
            (SynSent, Original) | (SynRecv, _) => update(state, flags, true),
            (SynSent, Reply) => update(SynRecv, flags, true),
            (Established, Original) => update(state, flags, false),
            (Established, Reply) => Step::Invalid,
            (FinWait | Closing | Closed, Original) => update(SynSent, flags & !F_FINS, true),
            (FinWait | Closing | Closed, Reply) => Step::Miss,
            _ => Step::Invalid,
        };
    }
    if syn {
        return match (state, dir) {
            (SynSent | SynRecv, Reply) | (SynRecv, Original) => update(SynRecv, flags, true),
            (Established | FinWait | Closing, Reply) => update(state, flags, false),
            _ => Step::Invalid,
        };
    }
    if !ack {
        return Step::Invalid;
    }
    match (state, dir) {
        (SynSent, _) => Step::Invalid,
        (SynRecv, Reply) => update(SynRecv, flags, true),
        (Closed, _) => update(Closed, flags, false),
        (SynRecv, Original) | (Established | FinWait | Closing, _) => {
            let flags = match (fin, dir) {
                (false, _) => flags,
                (true, Original) => flags | F_FIN_ORIG,
                (true, Reply) => flags | F_FIN_REPLY,
            };
            let state = match flags & F_FINS {
                0 => Established,
                F_FINS => Closing,
                _ => FinWait,
            };
            update(state, flags, true)
        }
        _ => Step::Invalid,
    }
}

/// A flow key in table form: normalised key words, and whether the packet's source is the
/// lower endpoint.
enum Normalised {
    V4(Key4, bool),
    V6(Key6, bool),
}

fn normalise(key: &FlowKey) -> Normalised {
    match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let (k, from_lo) = normalise_v4(u32::from(s), key.sport, u32::from(d), key.dport);
            Normalised::V4([k[0], k[1] | u64::from(key.proto)], from_lo)
        }
        (s, d) => {
            // A mixed-family key cannot come from a parsed packet; it is filed in the IPv6
            // table under the IPv4-mapped address so that it still behaves consistently.
            let a = (u128::from(to_v6(s)), key.sport);
            let b = (u128::from(to_v6(d)), key.dport);
            let from_lo = a <= b;
            let (lo, hi) = if from_lo { (a, b) } else { (b, a) };
            let key = [
                (lo.0 >> 64) as u64,
                lo.0 as u64,
                (hi.0 >> 64) as u64,
                hi.0 as u64,
                ports_word(lo.1, hi.1, key.proto),
            ];
            Normalised::V6(key, from_lo)
        }
    }
}

/// The IPv4 part of [`normalise`], without the protocol byte. Each endpoint is packed into
/// one `u64` as `(address << 16) | port`, whose integer order is the `(address, port)` tuple
/// order, so ordering the endpoints is one compare and two conditional moves instead of a
/// tuple comparison. The packed endpoints are the key words themselves (the higher one
/// shifted up a byte to leave room for the protocol): no repacking per packet.
#[inline]
fn normalise_v4(src: u32, sport: u16, dst: u32, dport: u16) -> (Key4, bool) {
    let a = (u64::from(src) << 16) | u64::from(sport);
    let b = (u64::from(dst) << 16) | u64::from(dport);
    ([a.min(b), a.max(b) << 8], a <= b)
}

fn ports_word(lo_port: u16, hi_port: u16, proto: u8) -> u64 {
    (u64::from(lo_port) << 24) | (u64::from(hi_port) << 8) | u64::from(proto)
}

fn to_v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Per-state timeouts in ticks, indexed by the 4-bit state code (codes that name no state
/// get a limit no age reaches, so a lookup by a masked code needs no validity check).
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    ticks: [u32; 16],
}

impl Timeouts {
    fn new(t: &CtTimeouts) -> Timeouts {
        let mut ticks = [u32::MAX >> 2; 16];
        for (code, slot) in ticks.iter_mut().enumerate() {
            if let Some(state) = CtState::from_code(code as u8) {
                *slot = timeout_ticks(state.timeout(t));
            }
        }
        Timeouts { ticks }
    }

    /// Whether an entry in `state` last seen at tick `last` is expired at tick `now`.
    fn expired(&self, state: CtState, last: u32, now: u32) -> bool {
        let age = now.wrapping_sub(last);
        // A "negative" age means another worker's clock ran slightly ahead: not expired.
        if age > u32::MAX / 2 {
            return false;
        }
        let limit = self.ticks.get(state as usize).copied().unwrap_or(0);
        age > limit
    }

    /// [`Timeouts::expired`] by raw state code, for the insert path's window scan.
    #[inline]
    fn expired_code(&self, code: u64, last: u32, now: u32) -> bool {
        let age = now.wrapping_sub(last);
        let limit = self.ticks.get((code & 0xf) as usize).copied().unwrap_or(0);
        age <= u32::MAX / 2 && age > limit
    }
}

/// Connection tracking table: one lock-free table per address family.
pub struct Conntrack {
    v4: Table<2>,
    v6: Table<5>,
    timeouts: Timeouts,
    /// Next slot [`Conntrack::sweep`] examines; IPv4 slots first, then IPv6 slots.
    sweep_cursor: AtomicUsize,
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Conntrack {
    /// A new, empty table.
    pub fn new(cfg: CtConfig) -> Conntrack {
        Conntrack::with_seed(cfg, 0x6f63_656c_6f74_6374)
    }

    /// A new, empty table whose slot hash is keyed with `seed`. The control plane should pass
    /// a random seed so that remote peers cannot aim many flows at one probe window.
    pub fn with_seed(cfg: CtConfig, seed: u64) -> Conntrack {
        Conntrack {
            v4: Table::new(cfg.capacity, seed),
            v6: Table::new(cfg.capacity, seed.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15),
            timeouts: Timeouts::new(&cfg.timeouts),
            sweep_cursor: AtomicUsize::new(0),
        }
    }

    /// Looks up the packet's connection and advances its state.
    pub fn track(&self, key: &FlowKey, l4: &L4, now: Nanos) -> CtVerdict {
        // No tag word loaded: the home slot first, where most flows live.
        self.track_with(&self.prepare(key), l4, now, true)
    }

    /// [`Conntrack::track`] for the key `p` was made from by [`Conntrack::prefetch_tags`]:
    /// the same answer, without normalising and hashing the key again.
    #[inline]
    pub fn track_prefetched(&self, p: &CtPrefetch, l4: &L4, now: Nanos) -> CtVerdict {
        // The prefetched tag word says whether the home slot can hold the key; when it
        // cannot, the lookup goes straight to the tag scan, whose slot the prefetch loaded.
        let home_first = if p.v6 {
            Table::<5>::home_tag_matches(&p.probe, p.word)
        } else {
            Table::<2>::home_tag_matches(&p.probe, p.word)
        };
        self.track_with(p, l4, now, home_first)
    }

    #[inline(always)]
    fn track_with(&self, p: &CtPrefetch, l4: &L4, now: Nanos, home_first: bool) -> CtVerdict {
        let now = tick_of(now);
        if p.v6 {
            self.v6.track(
                &p.key,
                &p.probe,
                p.from_lo,
                l4,
                true,
                now,
                &self.timeouts,
                home_first,
            )
        } else {
            self.v4.track(
                &p.key4(),
                &p.probe,
                p.from_lo,
                l4,
                false,
                now,
                &self.timeouts,
                home_first,
            )
        }
    }

    /// Whether this packet may open a connection.
    ///
    /// TCP needs a SYN without ACK, RST or FIN; UDP and SCTP may open; ICMP only with an echo
    /// request (v4 type 8, v6 type 128) — ICMP errors are "related" traffic the pipeline
    /// handles. `L4::None` may open (a protocol the parser does not look into), because this
    /// function cannot see fragmentation: use [`Conntrack::can_open_ip`], which also refuses
    /// non-first fragments.
    pub fn can_open(l4: &L4, v6: bool) -> bool {
        match l4 {
            L4::Tcp { flags, .. } => {
                flags.has(TcpFlags::SYN)
                    && flags.0 & (TcpFlags::ACK | TcpFlags::RST | TcpFlags::FIN) == 0
            }
            L4::Udp { .. } | L4::Sctp { .. } | L4::None => true,
            L4::Icmp { ty, .. } => *ty == if v6 { 128 } else { 8 },
        }
    }

    /// [`Conntrack::can_open`] for a parsed IP packet: a non-first fragment carries no
    /// transport header and may never open a connection.
    pub fn can_open_ip(ip: &IpMeta) -> bool {
        !matches!(ip.fragment, Fragment::Later { .. }) && Self::can_open(&ip.l4, ip.src.is_ipv6())
    }

    /// Admits a new connection initiated by the packet's source, in the state its transport
    /// header opens (a TCP packet always starts in `SynSent`: call this only when
    /// [`Conntrack::can_open`] holds). An existing entry for the key, live or expired, is
    /// replaced.
    pub fn insert(&self, key: &FlowKey, l4: &L4, epoch: u32, now: Nanos) -> Result<(), CtFull> {
        self.insert_prefetched(&self.prepare(key), l4, epoch, now)
    }

    /// [`Conntrack::insert`] for the key `p` was made from by [`Conntrack::prefetch_tags`].
    pub fn insert_prefetched(
        &self,
        p: &CtPrefetch,
        l4: &L4,
        epoch: u32,
        now: Nanos,
    ) -> Result<(), CtFull> {
        let state = CtState::initial(l4);
        let now = tick_of(now);
        if p.v6 {
            self.v6.insert(
                &p.key,
                &p.probe,
                p.from_lo,
                state,
                epoch,
                now,
                &self.timeouts,
            )
        } else {
            self.v4.insert(
                &p.key4(),
                &p.probe,
                p.from_lo,
                state,
                epoch,
                now,
                &self.timeouts,
            )
        }
    }

    /// The normalised key, direction and probe of `key`, without touching the table.
    #[inline]
    fn prepare(&self, key: &FlowKey) -> CtPrefetch {
        // The IPv4 case is spelled out rather than taken from `normalise` so that it
        // compiles to a few register operations (no `Normalised` built in memory).
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (&key.src, &key.dst) {
            let ([k0, k1], from_lo) =
                normalise_v4(u32::from(*s), key.sport, u32::from(*d), key.dport);
            let k1 = k1 | u64::from(key.proto);
            return CtPrefetch {
                v6: false,
                from_lo,
                key: [k0, k1, 0, 0, 0],
                probe: self.v4.probe(&[k0, k1]),
                word: 0,
            };
        }
        match normalise(key) {
            Normalised::V4([k0, k1], from_lo) => CtPrefetch {
                v6: false,
                from_lo,
                key: [k0, k1, 0, 0, 0],
                probe: self.v4.probe(&[k0, k1]),
                word: 0,
            },
            Normalised::V6(key, from_lo) => CtPrefetch {
                v6: true,
                from_lo,
                key,
                probe: self.v6.probe(&key),
                word: 0,
            },
        }
    }

    /// Removes the connection's entry (either direction's key finds it). Returns whether an
    /// entry, live or expired but not yet swept, was removed.
    pub fn remove(&self, key: &FlowKey) -> bool {
        match normalise(key) {
            Normalised::V4(k, _) => self.v4.remove(&k),
            Normalised::V6(k, _) => self.v6.remove(&k),
        }
    }

    /// Stores a new policy epoch in the connection's entry, after the pipeline re-checked
    /// policy for it. Returns false when there is no entry (it may have been removed or
    /// replaced meanwhile, in which case nothing is written).
    pub fn set_epoch(&self, key: &FlowKey, epoch: u32) -> bool {
        match normalise(key) {
            Normalised::V4(k, _) => self.v4.set_epoch(&k, epoch),
            Normalised::V6(k, _) => self.v6.set_epoch(&k, epoch),
        }
    }

    /// First pass of the burst prefetch: normalises and hashes `key` and loads the tag word
    /// a lookup of it reads first. The pipeline runs this over a whole burst, then
    /// [`Conntrack::prefetch_slot_with`] over the whole burst, then the lookups
    /// ([`Conntrack::track_prefetched`]), so that the burst's cache misses overlap.
    #[inline]
    pub fn prefetch_tags(&self, key: &FlowKey) -> CtPrefetch {
        let mut p = self.prepare(key);
        p.word = if p.v6 {
            self.v6.touch_tags(&p.probe)
        } else {
            self.v4.touch_tags(&p.probe)
        };
        p
    }

    /// [`Conntrack::prefetch_tags`] for the key of a parsed IP packet
    /// ([`FlowKey::from_ip`]), without building the `FlowKey`.
    pub fn prefetch_ip(&self, ip: &IpMeta) -> CtPrefetch {
        let mut p = CtPrefetch::default();
        self.prefetch_ip_into(ip, &mut p);
        p
    }

    /// [`Conntrack::prefetch_ip`], written field by field into `out` (the burst's array):
    /// returning the 80-byte value made the compiler build it on the stack and copy it
    /// twice per frame. Every field a lookup or insert reads is written, whatever `out` held
    /// before.
    #[inline(always)]
    pub fn prefetch_ip_into(&self, ip: &IpMeta, out: &mut CtPrefetch) {
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (&ip.src, &ip.dst) {
            let (sport, dport) = match ip.l4 {
                L4::Tcp { sport, dport, .. }
                | L4::Udp { sport, dport }
                | L4::Sctp { sport, dport } => (sport, dport),
                L4::Icmp { id, .. } => (id, id),
                L4::None => (0, 0),
            };
            let ([k0, k1], from_lo) = normalise_v4(u32::from(*s), sport, u32::from(*d), dport);
            let k1 = k1 | u64::from(ip.proto);
            out.probe = self.v4.probe(&[k0, k1]);
            out.v6 = false;
            out.from_lo = from_lo;
            // An IPv4 key is read from its first two words only; the other three are left
            // as they were (three stores per frame, measured at ~1 % of the established path).
            out.key[0] = k0;
            out.key[1] = k1;
            out.word = self.v4.touch_tags(&out.probe);
            return;
        }
        *out = self.prefetch_tags(&FlowKey::from_ip(ip));
    }

    /// Second pass of the burst prefetch: brings in, by `T`, the slot the tag word points
    /// at, in either of the key's groups (a flow in its second group costs one more tag-word
    /// load here). A likely new flow (no tag matches) still loads every line of its two
    /// groups, which its insert reads and writes: prefetch instructions for those eight lines
    /// per frame measured slower on the new-flow path than loads. Returns a value of no
    /// meaning that the caller keeps so that loads are not optimised away.
    #[inline]
    pub fn prefetch_slot_with<T: Touch>(&self, p: &CtPrefetch) -> u64 {
        if p.v6 {
            self.v6.touch_slot::<T>(&p.probe, p.word)
        } else {
            self.v4.touch_slot::<T>(&p.probe, p.word)
        }
    }

    /// The live entry of a connection, without changing it; `None` when absent or expired.
    pub fn get(&self, key: &FlowKey, now: Nanos) -> Option<CtEntry> {
        let now = tick_of(now);
        match normalise(key) {
            Normalised::V4(k, from_lo) => self.v4.get(&k, from_lo, now, &self.timeouts),
            Normalised::V6(k, from_lo) => self.v6.get(&k, from_lo, now, &self.timeouts),
        }
    }

    /// Incremental aging: examines up to `max_slots` slots from where the previous call
    /// stopped (IPv4 table, then IPv6 table, then around) and frees the expired entries.
    /// Meant for the control thread; workers never call it. An entry refreshed while the
    /// sweep looks at it is kept.
    pub fn sweep(&self, now: Nanos, max_slots: usize) -> SweepStats {
        let now = tick_of(now);
        let n4 = self.v4.slots();
        let total = n4 + self.v6.slots();
        let mut stats = SweepStats::default();
        let mut cursor = self.sweep_cursor.load(Ordering::Relaxed) % total;
        for _ in 0..max_slots.min(total) {
            let freed = if cursor < n4 {
                self.v4.sweep_slot(cursor, now, &self.timeouts)
            } else {
                self.v6.sweep_slot(cursor - n4, now, &self.timeouts)
            };
            stats.scanned += 1;
            stats.freed += usize::from(freed);
            cursor = (cursor + 1) % total;
        }
        self.sweep_cursor.store(cursor, Ordering::Relaxed);
        stats
    }

    /// Occupied slots in both tables, including expired entries not yet swept. Approximate
    /// while other threads insert or remove: it is a relaxed counter, not a scan.
    pub fn len(&self) -> usize {
        self.v4.live() + self.v6.live()
    }

    /// Whether no slot is occupied (same caveat as [`Conntrack::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots in both tables together.
    pub fn capacity(&self) -> usize {
        self.v4.slots() + self.v6.slots()
    }

    /// Per-family counters.
    pub fn stats(&self) -> CtStats {
        CtStats {
            v4: self.v4.stats(),
            v6: self.v6.stats(),
        }
    }
}
