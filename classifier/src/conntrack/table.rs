//! The lock-free slot table behind [`super::Conntrack`], one per address family.
//!
//! # Layout
//!
//! A table is a power-of-two array of [`Slot`]s, each made of `AtomicU64` words: a control
//! word, `K` key words (2 for IPv4: the lower endpoint's address and port, then the higher
//! one's and the protocol; 5 for IPv6) and an epoch word; beside the slots, one tag word per
//! group of [`GROUP`] slots holds a byte of each slot's key hash so that a lookup reads two
//! tag words and then only the slots whose byte matches. IPv4 entries cost 32 + 1 bytes,
//! IPv6 entries 56 + 1.
//!
//! A key's window is its two groups in probe order: first its *home slot* (a slot of the
//! first group chosen by the hash), then the rest of the first group from there, wrapping,
//! then the second group. An insert takes the home slot whenever it is free or expired and
//! its group is no more than half full (or no fuller than the other), so most live flows sit
//! in their home slot, and `track` compares the home slot's key before it reads any tag word.
//!
//! The control word packs
//!
//! | bits | field |
//! |---|---|
//! | 0..32 | last-seen, in ticks of [`super::TICK_NS`] |
//! | 32..36 | state code (0 = free slot) |
//! | 36..40 | flags (initiator side, FINs seen) |
//! | 40..64 | sequence number; odd while a writer owns the slot |
//!
//! and the epoch word packs the policy epoch (bits 0..32) with the sequence number of the
//! generation that wrote it (bits 32..56).
//!
//! # Concurrency
//!
//! - **Readers** (`track`, `get`, `set_epoch`, `remove`) take no lock. They load the control
//!   word, skip the slot if it is free or owned by a writer, compare the key words, load the
//!   epoch word and load the control word again: if the sequence number changed, the key may
//!   be torn and the read is retried (a seqlock). A reader therefore never acts on a key that
//!   was not stored whole.
//! - **State changes** are a `compare_exchange` on the control word from the value the
//!   reader validated. The sequence number is part of that word, so an update can never land
//!   on a slot that was freed or given to another flow in between (no ABA). Last-seen is only
//!   rewritten when the tick changes, so a busy established flow writes about fifteen times
//!   a second, not once per packet; a packet that changes nothing in the entry's own tick
//!   is answered from the validated control word without a write (`quiet_hit`).
//! - **Writers** (`insert`) judge the window's slots (comparing keys only where the tag byte
//!   matches, as lookups do), claim a slot by a `compare_exchange` from the exact control value
//!   they judged (free, expired or evictable) to the odd sequence number, store the key and
//!   epoch, and publish with a release store of the next even sequence number. A slot that
//!   changed since it was judged (say a half-open flow got its SYN-ACK) is not taken.
//! - **Epoch updates** are a `compare_exchange` on the epoch word that requires its
//!   sequence number to be the validated generation's, so a late `set_epoch` cannot mark a
//!   different flow that has since taken the slot.
//! - **Two workers inserting the same new flow** may each claim a different slot. After
//!   publishing, each writer rescans the window (after a `SeqCst` fence, so at least one of
//!   them sees the other) and frees the copy that sits later in probe order; lookups probe in
//!   that order, so they already preferred the surviving copy. A state change applied to the
//!   losing copy in the short window before it is freed is lost; the next packet of the
//!   handshake (or its retransmission) redoes it. The copies hold the same key; they may
//!   name different initiators only if the two inserts came from opposite directions, and
//!   then policy allowed each direction to open the flow, so whichever copy survives lets
//!   through nothing that policy refused.
//! - **A lookup racing with the replacement of its own entry** (an `insert` of a key that is
//!   already present) finds the slot owned by the writer and answers `Miss`; the pipeline
//!   then evaluates policy for that one packet.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};

use super::{
    CtEntry, CtState, CtTableStats, CtVerdict, Direction, F_FINS, F_INIT_LO, Step, Timeouts, Touch,
};
use crate::parse::{L4, TcpFlags};

/// Slots in one of the two aligned groups a flow may occupy.
const GROUP: usize = 8;
/// Bytes of tag word per slot.
pub(super) const TAG_BYTES: usize = std::mem::size_of::<AtomicU64>() / GROUP;
/// Slots a flow may occupy (its two groups): lookups and inserts examine this many.
pub const WINDOW: usize = 2 * GROUP;

/// Normalised IPv4 key: the lower endpoint as `address << 16 | port`, then the higher one
/// shifted up a byte with the protocol in its low byte.
pub(super) type Key4 = [u64; 2];
/// Normalised IPv6 key: two words per address, then ports and protocol.
pub(super) type Key6 = [u64; 5];

const TIME_MASK: u64 = 0xffff_ffff;
const STATE_SHIFT: u32 = 32;
const FLAGS_SHIFT: u32 = 36;
const SEQ_SHIFT: u32 = 40;
const SEQ_MASK: u64 = 0xff_ffff;
/// Attempts at a contended compare-and-swap or a torn read before giving up.
const RETRIES: usize = 8;

fn ctl_seq(c: u64) -> u64 {
    c >> SEQ_SHIFT
}

fn ctl_busy(c: u64) -> bool {
    ctl_seq(c) & 1 == 1
}

fn ctl_state(c: u64) -> Option<CtState> {
    CtState::from_code(((c >> STATE_SHIFT) & 0xf) as u8)
}

fn ctl_flags(c: u64) -> u8 {
    ((c >> FLAGS_SHIFT) & 0xf) as u8
}

fn ctl_time(c: u64) -> u32 {
    (c & TIME_MASK) as u32
}

fn make_ctl(seq: u64, state: Option<CtState>, flags: u8, time: u32) -> u64 {
    let code = state.map_or(0, |s| s as u64);
    ((seq & SEQ_MASK) << SEQ_SHIFT)
        | (code << STATE_SHIFT)
        | (u64::from(flags & 0xf) << FLAGS_SHIFT)
        | u64::from(time)
}

/// The later of two ticks, in wrapping order.
fn later(a: u32, b: u32) -> u32 {
    if b.wrapping_sub(a) <= u32::MAX / 2 {
        b
    } else {
        a
    }
}

/// The bytes of a group's tag `word` equal to `tag`, as the high bit of each such byte. The
/// classic SWAR zero-byte test: it may also flag a byte just above a flagged one, which only
/// costs a harmless extra slot read.
fn tag_hits(word: u64, tag: u8) -> u64 {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let x = word ^ (u64::from(tag) * LOW);
    x.wrapping_sub(LOW) & !x & HIGH
}

/// The common case of [`Table::track`], decided from the validated control word alone: a
/// packet that [`super::step`] would accept without changing the entry, arriving in the
/// tick the entry was last refreshed in, so that nothing needs writing. That is an ACK
/// without SYN, RST or FIN on an established TCP connection, or any packet of an assured
/// UDP or other-protocol flow. Same-tick means age 0, which no timeout expires. Returns the
/// packet's direction, or `None` when the full path must judge it.
#[inline]
fn quiet_hit(c: u64, from_lo: bool, l4: &L4, now: u32) -> Option<Direction> {
    if ctl_time(c) != now {
        return None;
    }
    let code = (c >> STATE_SHIFT) & 0xf;
    let flags = ctl_flags(c);
    let quiet = if code == CtState::Established as u64 {
        const MASK: u8 = TcpFlags::SYN | TcpFlags::RST | TcpFlags::FIN | TcpFlags::ACK;
        matches!(l4, L4::Tcp { flags: f, .. } if f.0 & MASK == TcpFlags::ACK) && flags & F_FINS == 0
    } else {
        code == CtState::UdpAssured as u64 || code == CtState::OtherAssured as u64
    };
    if !quiet {
        return None;
    }
    Some(if from_lo == (flags & F_INIT_LO != 0) {
        Direction::Original
    } else {
        Direction::Reply
    })
}

/// One entry. `K` key words between a control word and an epoch word.
#[derive(Debug)]
pub(super) struct Slot<const K: usize> {
    ctl: AtomicU64,
    key: [AtomicU64; K],
    epoch: AtomicU64,
}

impl<const K: usize> Slot<K> {
    fn empty() -> Self {
        Slot {
            ctl: AtomicU64::new(0),
            key: std::array::from_fn(|_| AtomicU64::new(0)),
            epoch: AtomicU64::new(0),
        }
    }

    /// The control word, for [`Table::touch`]: a plain load that brings the slot's cache
    /// line in.
    fn peek(&self) -> u64 {
        self.ctl.load(Ordering::Relaxed)
    }

    /// The slot's control word and epoch if it is live and holds `key`; the pair is from one
    /// consistent generation (see the module docs).
    fn read_match(&self, key: &[u64; K]) -> Option<(u64, u32)> {
        for _ in 0..RETRIES {
            let c1 = self.ctl.load(Ordering::Acquire);
            if ctl_busy(c1) || ctl_state(c1).is_none() {
                return None;
            }
            // A mismatch needs no validation: a stable slot with another key is a mismatch,
            // and a slot being rewritten did not hold this key stably either.
            if self
                .key
                .iter()
                .zip(key)
                .any(|(w, k)| w.load(Ordering::Relaxed) != *k)
            {
                return None;
            }
            let e = self.epoch.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let c2 = self.ctl.load(Ordering::Relaxed);
            if ctl_seq(c1) == ctl_seq(c2) {
                return Some((c2, e as u32));
            }
        }
        None
    }

    /// Frees the slot if it still holds generation `seq`. Returns whether this call freed it.
    fn free_if_seq(&self, seq: u64) -> bool {
        let mut c = self.ctl.load(Ordering::Acquire);
        loop {
            if ctl_seq(c) != seq || ctl_state(c).is_none() {
                return false;
            }
            let freed = make_ctl(seq.wrapping_add(2), None, 0, 0);
            match self
                .ctl
                .compare_exchange(c, freed, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => c = actual,
            }
        }
    }
}

/// Where a key may live; see [`Table::probe`].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Probe {
    /// First slot of each of the two groups.
    groups: [usize; 2],
    /// The key's tag byte.
    tag: u8,
    /// The key's home slot in its first group (`0..GROUP`): window position 0.
    home: u8,
}

impl Probe {
    /// The table index of window position `p`. The first group is rotated so that its
    /// position 0 is the home slot; the second group is in index order.
    fn index(&self, p: usize) -> Option<usize> {
        let base = *self.groups.get(p / GROUP)?;
        let rot = if p < GROUP { usize::from(self.home) } else { 0 };
        Some(base + (p + rot) % GROUP)
    }

    /// The table index of the home slot.
    fn home_index(&self) -> usize {
        self.groups[0] + usize::from(self.home)
    }
}

/// How an insert obtained its slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// The slot already held the key (live or expired): replaced in place.
    Same,
    /// A free slot.
    Free,
    /// Another flow's expired entry.
    Expired,
    /// Another flow's live, evictable entry.
    Evict,
}

/// A fixed-capacity open-addressing table of flows with `K`-word keys.
pub(super) struct Table<const K: usize> {
    slots: Box<[Slot<K>]>,
    /// One word per group: a byte of the key's hash for each of its slots, written before
    /// the slot is published. A hint only: lookups read the slots whose byte matches.
    tags: Box<[AtomicU64]>,
    mask: usize,
    seed: u64,
    live: AtomicUsize,
    evictions: AtomicU64,
    insert_failures: AtomicU64,
}

impl<const K: usize> Table<K> {
    pub(super) fn new(capacity: usize, seed: u64) -> Self {
        let n = capacity
            .max(WINDOW)
            .checked_next_power_of_two()
            .unwrap_or(1 << 40);
        let slots: Box<[Slot<K>]> = (0..n).map(|_| Slot::empty()).collect();
        Table {
            mask: n - 1,
            tags: (0..n / GROUP).map(|_| AtomicU64::new(0)).collect(),
            slots,
            seed,
            live: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            insert_failures: AtomicU64::new(0),
        }
    }

    pub(super) fn slots(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub(super) fn stats(&self) -> CtTableStats {
        CtTableStats {
            live: self.live(),
            capacity: self.slots(),
            evictions: self.evictions.load(Ordering::Relaxed),
            insert_failures: self.insert_failures.load(Ordering::Relaxed),
        }
    }

    /// A keyed multiply-xorshift mix of the key words: cheap, and the seed keeps remote
    /// peers from predicting windows.
    fn hash(&self, key: &[u64; K]) -> u64 {
        let mut h = self.seed ^ 0x243f_6a88_85a3_08d3;
        for &w in key {
            h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^ (h >> 32)
    }

    /// Where a key may live: two aligned groups of [`GROUP`] slots chosen by two parts of
    /// the hash (never the same group twice, so that one crowded neighbourhood does not
    /// refuse a flow), and the key's tag byte.
    pub(super) fn probe(&self, key: &[u64; K]) -> Probe {
        let h = self.hash(key);
        let first = (h as usize) & self.mask & !(GROUP - 1);
        let mut second = ((h >> 32) as usize) & self.mask & !(GROUP - 1);
        if second == first {
            second ^= GROUP;
        }
        // The low three bits of the hash are not part of either group index.
        Probe {
            groups: [first, second],
            tag: (h >> 56) as u8,
            home: (h as usize % GROUP) as u8,
        }
    }

    /// The slots of the key's window, in probe order, with their position in it and their
    /// index in the table.
    #[cfg(test)]
    fn window(&self, probe: &Probe) -> impl Iterator<Item = (usize, usize, &Slot<K>)> {
        (0..WINDOW).filter_map(move |p| {
            let index = probe.index(p)?;
            self.slots.get(index).map(|s| (p, index, s))
        })
    }

    /// Sets the tag byte of slot `index`.
    fn set_tag(&self, index: usize, tag: u8) {
        let shift = (index % GROUP) * 8;
        if let Some(word) = self.tags.get(index / GROUP) {
            let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((w & !(0xff << shift)) | (u64::from(tag) << shift))
            });
        }
    }

    /// The tag word of the group starting at slot `base`.
    fn tag_word(&self, base: usize) -> u64 {
        self.tags
            .get(base / GROUP)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// The first live copy of `key` in probe order, other than the one at window position
    /// `skip`: its window position, slot, validated control word and epoch. Only the slots
    /// whose tag byte matches are read. A live entry's tag was written before the entry was
    /// published and stays until the slot is rewritten, so no stable entry is skipped; the
    /// second group's tag word is only loaded when the first group holds no copy.
    #[inline(always)]
    fn scan(
        &self,
        key: &[u64; K],
        probe: &Probe,
        skip: usize,
    ) -> Option<(usize, &Slot<K>, u64, u32)> {
        let mut g = 0;
        let mut rot = u32::from(probe.home);
        for base in probe.groups {
            // Rotated so that bytes come in window order (the home slot first).
            let mut hits = tag_hits(self.tag_word(base), probe.tag).rotate_right(8 * rot);
            while hits != 0 {
                let i = (hits.trailing_zeros() / 8) as usize;
                hits &= hits - 1;
                let p = g + i;
                if p == skip {
                    continue;
                }
                let index = base + (i + rot as usize) % GROUP;
                if let Some(slot) = self.slots.get(index)
                    && let Some((c, e)) = slot.read_match(key)
                {
                    return Some((p, slot, c, e));
                }
            }
            g += GROUP;
            rot = 0;
        }
        None
    }

    /// First half of a burst prefetch: finds the key's first group and loads its tag word.
    /// The burst pipeline calls this for every frame, then [`Table::touch_slot`] for every
    /// frame, then looks them up: each pass issues independent loads, so the cache misses
    /// of a whole burst overlap instead of being paid one after another. The tag word is
    /// loaded, not prefetched: the next pass needs its value (and a prefetch instruction
    /// here measured no faster).
    ///
    /// Not loaded here: the home slot, although its address is known without the tag word.
    /// Measured (see docs/BENCHMARKS.md, 2026-11-27 ~19:50 UTC), loading it in this pass
    /// made the 100k-flow case ~20 % slower: for the flows that live elsewhere it is one
    /// more line from memory, and with a whole burst's loads in flight the number of lines
    /// counts, not the depth of the chain that leads to them.
    pub(super) fn touch_tags(&self, probe: &Probe) -> u64 {
        self.tags
            .get(probe.groups[0] / GROUP)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Second half of a burst prefetch: brings in, by `T`, the first slot in window order
    /// whose tag matches (usually the home slot); with no match in the first group, see
    /// [`Table::touch_second`].
    #[inline]
    pub(super) fn touch_slot<T: Touch>(&self, probe: &Probe, word: u64) -> u64 {
        let hits = tag_hits(word, probe.tag).rotate_right(8 * u32::from(probe.home));
        if hits != 0 {
            let p = (hits.trailing_zeros() / 8) as usize;
            return probe
                .index(p)
                .and_then(|i| self.slots.get(i))
                .map_or(0, |s| T::touch(&s.ctl));
        }
        self.touch_second::<T>(probe)
    }

    /// Whether the first group's tag `word` (as [`Table::touch_tags`] loaded it) may hold the
    /// key's tag at the home slot. A hint for [`Table::track`]: when it says no, the home slot
    /// holds another flow (or none), and reading it first would cost a cache line the prefetch
    /// passes did not load, for about one flow in four.
    pub(super) fn home_tag_matches(probe: &Probe, word: u64) -> bool {
        (tag_hits(word, probe.tag) >> (8 * u32::from(probe.home))) & 0x80 != 0
    }

    /// No tag of the first group matches: the flow lives in its second group (about one
    /// established flow in six: inserts balance the two groups) or is new. The second
    /// group's tag word tells which; a match brings in that slot by `T`, otherwise the
    /// insert's lines are loaded ([`Table::touch_window`]).
    #[inline(never)]
    fn touch_second<T: Touch>(&self, probe: &Probe) -> u64 {
        let base = probe.groups[1];
        let word = self
            .tags
            .get(base / GROUP)
            .map_or(0, |w| w.load(Ordering::Relaxed));
        let hits = tag_hits(word, probe.tag);
        if hits != 0 {
            let i = (hits.trailing_zeros() / 8) as usize;
            return self.slots.get(base + i).map_or(0, |s| T::touch(&s.ctl));
        }
        self.touch_window(probe)
    }

    /// The likely-new-flow case: an insert will read every slot of both groups, so those are
    /// loaded (independent loads, overlapping across the burst; prefetch instructions for
    /// these eight lines per frame measured slower on the new-flow path).
    #[inline(never)]
    fn touch_window(&self, probe: &Probe) -> u64 {
        // Two 32-byte slots share a cache line (more for IPv4 than IPv6, but every line of
        // the groups is touched either way by stepping one slot at a time).
        let mut sum = 0u64;
        for base in probe.groups {
            for slot in self.slots.get(base..base + GROUP).unwrap_or_default() {
                sum = sum.wrapping_add(slot.peek());
            }
        }
        sum
    }

    /// The window position of `key`'s first live copy and the address of its control word
    /// (what [`Table::touch_slot`] should bring in).
    #[cfg(test)]
    pub(super) fn position_and_ctl(&self, key: &[u64; K]) -> Option<(usize, usize)> {
        self.find(key)
            .map(|(p, slot, _, _)| (p, std::ptr::from_ref(&slot.ctl) as usize))
    }

    /// The first live copy of `key` in probe order.
    pub(super) fn find(&self, key: &[u64; K]) -> Option<(usize, &Slot<K>, u64, u32)> {
        self.scan(key, &self.probe(key), WINDOW)
    }

    #[allow(clippy::too_many_arguments)] // Why: the hot path passes the prefetched parts as they are.
    pub(super) fn track(
        &self,
        key: &[u64; K],
        probe: &Probe,
        from_lo: bool,
        l4: &L4,
        v6: bool,
        now: u32,
        timeouts: &Timeouts,
        home_first: bool,
    ) -> CtVerdict {
        // The home slot first (when `home_first`), without reading its tag word: most flows
        // live there (see `choose_slot`), and it is window position 0, so a copy there is also
        // the one `scan` would prefer. A mismatch costs one key comparison before the tag
        // scan. Either order finds the same copy, since the scan reads the tag words afresh.
        let home = if home_first {
            self.slots
                .get(probe.home_index())
                .and_then(|s| Some((s, s.read_match(key)?)))
        } else {
            None
        };
        let skip = if home_first { 0 } else { WINDOW };
        let found = match home {
            Some((slot, (c, e))) => Some((slot, c, e)),
            None => self.scan(key, probe, skip).map(|(_, s, c, e)| (s, c, e)),
        };
        let Some((slot, c, epoch)) = found else {
            return CtVerdict::Miss;
        };
        if let Some(dir) = quiet_hit(c, from_lo, l4, now) {
            return CtVerdict::Hit { dir, epoch };
        }
        self.update(slot, c, epoch, from_lo, l4, v6, now, timeouts)
    }

    /// The full path of [`Table::track`]: judges the packet against the entry whose validated
    /// control word is `c` and applies the change. Kept out of line so that the quiet path
    /// above stays small (no spilled registers for this loop's state).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)] // Why: the parts of one lookup, passed as they are.
    fn update(
        &self,
        slot: &Slot<K>,
        mut c: u64,
        epoch: u32,
        from_lo: bool,
        l4: &L4,
        v6: bool,
        now: u32,
        timeouts: &Timeouts,
    ) -> CtVerdict {
        let mut verdict = CtVerdict::Miss;
        for _ in 0..RETRIES {
            let Some(state) = ctl_state(c) else {
                return CtVerdict::Miss;
            };
            if timeouts.expired(state, ctl_time(c), now) {
                return CtVerdict::Miss;
            }
            let flags = ctl_flags(c);
            let dir = if from_lo == (flags & F_INIT_LO != 0) {
                Direction::Original
            } else {
                Direction::Reply
            };
            let (state, flags, refresh) = match super::step(state, flags, dir, l4, v6) {
                Step::Update {
                    state,
                    flags,
                    refresh,
                } => (state, flags, refresh),
                Step::Invalid => return CtVerdict::Invalid,
                Step::Miss => return CtVerdict::Miss,
            };
            verdict = CtVerdict::Hit { dir, epoch };
            let time = if refresh {
                later(ctl_time(c), now)
            } else {
                ctl_time(c)
            };
            let new = make_ctl(ctl_seq(c), Some(state), flags, time);
            if new == c {
                return verdict;
            }
            match slot
                .ctl
                .compare_exchange(c, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return verdict,
                // Another generation took the slot: this flow's entry is gone.
                Err(actual) if ctl_seq(actual) != ctl_seq(c) => return CtVerdict::Miss,
                // Another worker updated the same entry: judge the packet again.
                Err(actual) => c = actual,
            }
        }
        // Persistent contention on one flow: the packet was valid for the last state seen.
        verdict
    }

    pub(super) fn get(
        &self,
        key: &[u64; K],
        from_lo: bool,
        now: u32,
        timeouts: &Timeouts,
    ) -> Option<CtEntry> {
        let (_, _, c, epoch) = self.find(key)?;
        let state = ctl_state(c)?;
        if timeouts.expired(state, ctl_time(c), now) {
            return None;
        }
        let dir = if from_lo == (ctl_flags(c) & F_INIT_LO != 0) {
            Direction::Original
        } else {
            Direction::Reply
        };
        Some(CtEntry {
            state,
            dir,
            epoch,
            last_seen: u64::from(ctl_time(c)) * super::TICK_NS,
        })
    }

    #[allow(clippy::too_many_arguments)] // Why: the hot path passes the prefetched parts as they are.
    pub(super) fn insert(
        &self,
        key: &[u64; K],
        probe: &Probe,
        from_lo: bool,
        state: CtState,
        epoch: u32,
        now: u32,
        timeouts: &Timeouts,
    ) -> Result<(), super::CtFull> {
        let flags = if from_lo { F_INIT_LO } else { 0 };
        for _ in 0..RETRIES {
            let Some((pos, index, slot, take, c)) = self.choose_slot(key, probe, now, timeouts)
            else {
                break;
            };
            let owned = make_ctl(ctl_seq(c).wrapping_add(1), None, 0, 0);
            if slot
                .ctl
                .compare_exchange(c, owned, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                // The slot changed since it was judged; judge the window again.
                continue;
            }
            fence(Ordering::Release);
            self.set_tag(index, probe.tag);
            for (w, k) in slot.key.iter().zip(key) {
                w.store(*k, Ordering::Relaxed);
            }
            let seq = ctl_seq(c).wrapping_add(2) & SEQ_MASK;
            slot.epoch
                .store(u64::from(epoch) | (seq << 32), Ordering::Relaxed);
            slot.ctl
                .store(make_ctl(seq, Some(state), flags, now), Ordering::Release);
            match take {
                Take::Free => {
                    self.live.fetch_add(1, Ordering::Relaxed);
                }
                Take::Evict => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                Take::Same | Take::Expired => {}
            }
            self.dedupe(key, probe, pos, slot, seq);
            return Ok(());
        }
        self.insert_failures.fetch_add(1, Ordering::Relaxed);
        Err(super::CtFull)
    }

    /// Picks the slot for a new entry: the key's own slot, else its home slot if free or
    /// expired, else the first free or expired slot of the group with more of them, else
    /// the least recently seen evictable entry.
    /// Returns its window position and table index, the slot, how it is taken, and the
    /// control value it was judged by.
    fn choose_slot(
        &self,
        key: &[u64; K],
        probe: &Probe,
        now: u32,
        timeouts: &Timeouts,
    ) -> Option<(usize, usize, &Slot<K>, Take, u64)> {
        // Per group: its first free or expired slot (window position, control value, how it
        // is taken), and how many it has.
        let mut reusable: [Option<(usize, u64, Take)>; 2] = [None, None];
        let mut room = [0u32; 2];
        let mut victim: Option<(usize, u64)> = None;
        let mut home: Option<(usize, u64, Take)> = None;
        for (g, base) in probe.groups.into_iter().enumerate() {
            let Some(group) = self.slots.get(base..base + GROUP) else {
                continue;
            };
            // Only a slot whose tag byte matches can hold the key (see `scan`), so only those
            // pay for a key comparison.
            let hits = tag_hits(self.tag_word(base), probe.tag);
            for (i, slot) in group.iter().enumerate() {
                // Window position: the first group is rotated to start at the home slot.
                let p = if g == 0 {
                    (i + GROUP - usize::from(probe.home)) % GROUP
                } else {
                    GROUP + i
                };
                let c = slot.ctl.load(Ordering::Acquire);
                if ctl_busy(c) {
                    continue;
                }
                let code = (c >> STATE_SHIFT) & 0xf;
                let take = if code == 0 || code >= CtState::CODES as u64 {
                    Take::Free
                } else {
                    if (hits >> (8 * i)) & 0x80 != 0
                        && let Some((c, _)) = slot.read_match(key)
                    {
                        // The key's own entry is replaced, from the validated control value.
                        return Some((p, base + i, slot, Take::Same, c));
                    }
                    if timeouts.expired_code(code, ctl_time(c), now) {
                        Take::Expired
                    } else {
                        // Keep the least recently seen evictable entry (wrapping tick order).
                        if (CtState::EVICTABLE_CODES >> code) & 1 != 0
                            && victim.is_none_or(|(_, v)| {
                                ctl_time(c).wrapping_sub(ctl_time(v)) > u32::MAX / 2
                            })
                        {
                            victim = Some((p, c));
                        }
                        continue;
                    }
                };
                if p == 0 {
                    home = Some((p, c, take));
                }
                if let (Some(first), Some(n)) = (reusable.get_mut(g), room.get_mut(g)) {
                    *n += 1;
                    first.get_or_insert((p, c, take));
                }
            }
        }
        // The emptier group, so that both fill evenly and the table reaches a high load
        // before any flow finds both its groups full.
        let [a, b] = reusable;
        // The home slot before either: a lookup reaches it without reading the tag word.
        // The home slot comes first while its group is at most half full or no fuller than
        // the other: a lookup finds it without the tag scan. Preferring it unconditionally
        // crowded the first groups and lowered the load at the first refusal from 0.78 to
        // 0.72 (`fills_to_high_load_before_first_failure`).
        let home = home.filter(|_| room[0] * 2 > GROUP as u32 || room[0] >= room[1]);
        let chosen = home.or(if room[1] > room[0] { b.or(a) } else { a.or(b) });
        let (p, c, take) = chosen.or(victim.map(|(p, c)| (p, c, Take::Evict)))?;
        let index = probe.index(p)?;
        let slot = self.slots.get(index)?;
        Some((p, index, slot, take, c))
    }

    /// Frees whichever of two live copies of `key` sits later in probe order (see the module
    /// docs). `mine` is the copy this thread just published at window position `pos`.
    pub(super) fn dedupe(
        &self,
        key: &[u64; K],
        probe: &Probe,
        pos: usize,
        mine: &Slot<K>,
        seq: u64,
    ) {
        // Each writer set its tag and published its slot before this fence, so of two racing
        // writers at least one sees the other's tag and entry below.
        fence(Ordering::SeqCst);
        if let Some((p, slot, c, _)) = self.scan(key, probe, pos) {
            let loser_freed = if p < pos {
                mine.free_if_seq(seq)
            } else {
                slot.free_if_seq(ctl_seq(c))
            };
            if loser_freed {
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Publishes a copy of `key` at window position `pos` without looking for an existing
    /// one, as a racing writer would; returns the slot and its sequence number.
    #[cfg(test)]
    pub(super) fn force_copy(&self, key: &[u64; K], pos: usize, now: u32) -> (&Slot<K>, u64) {
        let probe = self.probe(key);
        let (_, index, slot) = self.window(&probe).nth(pos).expect("window position");
        self.set_tag(index, probe.tag);
        let seq = (ctl_seq(slot.ctl.load(Ordering::Relaxed)) + 2) & SEQ_MASK;
        for (w, k) in slot.key.iter().zip(key) {
            w.store(*k, Ordering::Relaxed);
        }
        slot.epoch.store(seq << 32, Ordering::Relaxed);
        slot.ctl.store(
            make_ctl(seq, Some(CtState::UdpNew), F_INIT_LO, now),
            Ordering::Release,
        );
        self.live.fetch_add(1, Ordering::Relaxed);
        (slot, seq)
    }

    pub(super) fn remove(&self, key: &[u64; K]) -> bool {
        let Some((_, slot, c, _)) = self.find(key) else {
            return false;
        };
        let freed = slot.free_if_seq(ctl_seq(c));
        if freed {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        freed
    }

    pub(super) fn set_epoch(&self, key: &[u64; K], epoch: u32) -> bool {
        let Some((_, slot, c, _)) = self.find(key) else {
            return false;
        };
        let seq = ctl_seq(c);
        let mut e = slot.epoch.load(Ordering::Acquire);
        loop {
            if (e >> 32) & SEQ_MASK != seq {
                return false;
            }
            let new = u64::from(epoch) | (seq << 32);
            match slot
                .epoch
                .compare_exchange(e, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => e = actual,
            }
        }
    }

    /// Whether the home slot of `key` is free (for tests of the placement rule).
    #[cfg(test)]
    pub(super) fn home_is_free(&self, key: &[u64; K]) -> bool {
        let probe = self.probe(key);
        self.slots
            .get(probe.home_index())
            .is_some_and(|s| ctl_state(s.peek()).is_none())
    }

    /// Frees slot `index` if it holds an expired entry. Returns whether it did.
    pub(super) fn sweep_slot(&self, index: usize, now: u32, timeouts: &Timeouts) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        let c = slot.ctl.load(Ordering::Acquire);
        let Some(state) = ctl_state(c) else {
            return false;
        };
        if ctl_busy(c) || !timeouts.expired(state, ctl_time(c), now) {
            return false;
        }
        // Free only from the exact value judged expired: a packet that refreshed the entry
        // meanwhile makes the exchange fail and keeps it.
        let freed = make_ctl(ctl_seq(c).wrapping_add(2), None, 0, 0);
        let ok = slot
            .ctl
            .compare_exchange(c, freed, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if ok {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        ok
    }
}
