//! IPv4 longest-prefix match as DIR-24-8 (the layout of DPDK's `rte_lpm`).
//!
//! A lookup is one load from the first-level table `tbl24`, indexed by the top 24 bits of the
//! address (after the chunk pointer, see below), and for the few /24 blocks that hold
//! prefixes longer than /24 a second load from a 256-entry group of `tbl8`, indexed by the low
//! 8 bits. Both tables hold `u32` entries whose
//! top two bits are a tag:
//!
//! | tag  | meaning                                                             |
//! |------|---------------------------------------------------------------------|
//! | `00` | no route                                                            |
//! | `01` | a value below 2^30, stored inline                                   |
//! | `10` | (`tbl24` only) the payload is the index of a `tbl8` group           |
//! | `11` | a value of 2^30 or more; the payload indexes the `big` value array  |
//!
//! Next-hop indices are small, so the inline case is the one the packet path takes; the
//! indirect case only exists so that every `u32` value round-trips.
//!
//! The set of prefixes (`routes`, a `BTreeMap` keyed by network address and length) is the
//! source of truth; the tables are derived from it. An insert or remove of a prefix of length
//! `l <= 24` recomputes exactly the `2^(24-l)` first-level entries the prefix spans by sweeping
//! the prefixes inside it in address order, so a removal restores whatever the next-shorter
//! covering prefix says without the per-entry depth bytes `rte_lpm` keeps. A prefix longer
//! than /24 recomputes only its /24 block. Groups are allocated when a /24 block first gets a
//! longer prefix and returned to a free list when its last one goes; the sweep frees any group
//! whose block it writes a plain value into, so no group outlives its prefixes.
//!
//! Memory and snapshots: `tbl24` is 2^24 `u32`s (64 MiB) cut into 256 chunks of 2^16
//! entries (256 KiB), one per /8, each an `Arc<[u32]>` or `None` while the /8 has no route.
//! Cloning a table (the control plane clones the live snapshot, edits it and publishes the
//! copy) therefore costs 256 reference-count increments plus copies of `tbl8` and of the
//! route set (about 1 ms at 77,000 routes), instead of a 64 MiB `memcpy`; the first write to a shared chunk copies that chunk only
//! (`Arc::make_mut`). A chunk whose /8 loses its last route goes back to `None`. The price is
//! one load of the chunk pointer per lookup, from a 4 KiB array that stays in L1. A route
//! that spans much of the space (a default route, many /8s) still materialises every chunk
//! it covers. Nothing is allocated before the first IPv4 insert.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::net::mask4;

const TAG_MASK: u32 = 3 << 30;
const PAYLOAD: u32 = (1 << 30) - 1;
const EMPTY: u32 = 0;
const TAG_VALUE: u32 = 1 << 30;
const TAG_GROUP: u32 = 2 << 30;
const TAG_BIG: u32 = 3 << 30;
const CHUNKS: usize = 256;
const CHUNK_BITS: u32 = 16;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;
const CHUNK_MASK: usize = CHUNK_LEN - 1;
const GROUP_LEN: usize = 256;

/// Values of 2^30 or more, which do not fit inline in a table entry. Each distinct value gets
/// one slot, reference-counted by the number of prefixes that map to it.
#[derive(Debug, Clone, Default)]
struct BigValues {
    slots: Vec<u32>,
    by_value: BTreeMap<u32, (u32, u32)>,
    free: Vec<u32>,
}

impl BigValues {
    fn acquire(&mut self, value: u32) {
        if value <= PAYLOAD {
            return;
        }
        if let Some((_, refs)) = self.by_value.get_mut(&value) {
            *refs = refs.saturating_add(1);
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    *s = value;
                }
                slot
            }
            None => {
                self.slots.push(value);
                // More than 2^30 distinct values cannot be allocated in memory anyway.
                (self.slots.len() - 1) as u32
            }
        };
        self.by_value.insert(value, (slot, 1));
    }

    fn release(&mut self, value: u32) {
        if value <= PAYLOAD {
            return;
        }
        if let Some((slot, refs)) = self.by_value.get_mut(&value) {
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.free.push(*slot);
                self.by_value.remove(&value);
            }
        }
    }

    /// The table entry that stands for `value`.
    fn encode(&self, value: u32) -> u32 {
        if value <= PAYLOAD {
            TAG_VALUE | value
        } else {
            // Every stored value was acquired first, so the slot exists.
            self.by_value
                .get(&value)
                .map_or(EMPTY, |&(slot, _)| TAG_BIG | slot)
        }
    }
}

/// The IPv4 half of [`super::Lpm`].
#[derive(Clone)]
pub(crate) struct Lpm4 {
    routes: BTreeMap<(u32, u8), u32>,
    /// How many routes there are of each length, so that the covering-prefix search skips
    /// lengths that are absent.
    len_count: [u32; 33],
    /// Empty until the first insert; then `CHUNKS` chunks of `CHUNK_LEN` entries, `None`
    /// standing for a chunk of `EMPTY`.
    tbl24: Vec<Option<Arc<[u32]>>>,
    tbl8: Vec<u32>,
    free_groups: Vec<u32>,
    big: BigValues,
}

impl Default for Lpm4 {
    fn default() -> Lpm4 {
        Lpm4 {
            routes: BTreeMap::new(),
            len_count: [0; 33],
            tbl24: Vec::new(),
            tbl8: Vec::new(),
            free_groups: Vec::new(),
            big: BigValues::default(),
        }
    }
}

impl fmt::Debug for Lpm4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tables are tens of MiB; print their shape, not their contents.
        f.debug_struct("Lpm4")
            .field("routes", &self.routes.len())
            .field("groups_in_use", &self.groups_in_use())
            .field("big_values", &self.big.by_value.len())
            .finish()
    }
}

impl Lpm4 {
    /// Builds the tables for a whole route set in one sweep of the first level.
    pub(crate) fn from_routes(routes: BTreeMap<(u32, u8), u32>) -> Lpm4 {
        let mut lpm = Lpm4 {
            routes,
            ..Lpm4::default()
        };
        for (&(_, len), &value) in &lpm.routes {
            if let Some(c) = lpm.len_count.get_mut(len as usize) {
                *c = c.saturating_add(1);
            }
            lpm.big.acquire(value);
        }
        if !lpm.routes.is_empty() {
            lpm.tbl24 = vec![None; CHUNKS];
            lpm.rebuild(0, 0);
        }
        lpm
    }

    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, u8, u32)> + '_ {
        self.routes.iter().map(|(&(addr, len), &v)| (addr, len, v))
    }

    pub(crate) fn get(&self, addr: u32, len: u8) -> Option<u32> {
        self.routes.get(&(addr & mask4(len), len)).copied()
    }

    /// Second-level groups currently holding prefixes longer than /24.
    pub(crate) fn groups_in_use(&self) -> usize {
        (self.tbl8.len() / GROUP_LEN).saturating_sub(self.free_groups.len())
    }

    /// First-level chunks (one per /8) that hold at least one route.
    pub(crate) fn chunks(&self) -> usize {
        self.tbl24.iter().flatten().count()
    }

    /// Second-level groups ever allocated (in use or on the free list).
    pub(crate) fn groups_allocated(&self) -> usize {
        self.tbl8.len() / GROUP_LEN
    }

    /// Bytes of table memory allocated. Chunks shared with clones count in full.
    pub(crate) fn table_bytes(&self) -> usize {
        (self.chunks() * CHUNK_LEN + self.tbl8.capacity()) * 4 + self.tbl24.len() * 16
    }

    /// Returns the previous value of the prefix. `len` must be at most 32; longer lengths are
    /// ignored.
    pub(crate) fn insert(&mut self, addr: u32, len: u8, value: u32) -> Option<u32> {
        let count = self.len_count.get_mut(len as usize)?;
        let key = (addr & mask4(len), len);
        let old = self.routes.insert(key, value);
        match old {
            Some(old) if old == value => return Some(old),
            Some(old) => self.big.release(old),
            None => *count = count.saturating_add(1),
        }
        self.big.acquire(value);
        if self.tbl24.is_empty() {
            self.tbl24 = vec![None; CHUNKS];
        }
        self.rebuild(key.0, len);
        old
    }

    pub(crate) fn remove(&mut self, addr: u32, len: u8) -> Option<u32> {
        let key = (addr & mask4(len), len);
        let old = self.routes.remove(&key)?;
        if let Some(count) = self.len_count.get_mut(len as usize) {
            *count = count.saturating_sub(1);
        }
        self.big.release(old);
        self.rebuild(key.0, len);
        Some(old)
    }

    /// The value of the longest prefix containing `ip`: the chunk pointer (in L1), the
    /// first-level entry, and for blocks with longer prefixes a second-level entry. No
    /// allocation.
    #[inline]
    pub(crate) fn lookup(&self, ip: u32) -> Option<u32> {
        let index = (ip >> 8) as usize;
        let chunk = self.tbl24.get(index >> CHUNK_BITS)?.as_deref()?;
        let mut entry = *chunk.get(index & CHUNK_MASK)?;
        if entry & TAG_MASK == TAG_GROUP {
            let at = ((entry & PAYLOAD) as usize) * GROUP_LEN + (ip & 0xff) as usize;
            entry = *self.tbl8.get(at)?;
        }
        if entry & TAG_MASK == TAG_VALUE {
            Some(entry & PAYLOAD)
        } else if entry & TAG_MASK == TAG_BIG {
            self.big.slots.get((entry & PAYLOAD) as usize).copied()
        } else {
            None
        }
    }

    /// The encoded value of the longest route strictly shorter than `len` containing `addr`,
    /// or `EMPTY`.
    fn covering(&self, addr: u32, len: u8) -> u32 {
        (0..len)
            .rev()
            .filter(|&l| self.len_count.get(l as usize).is_some_and(|&c| c > 0))
            .find_map(|l| self.routes.get(&(addr & mask4(l), l)))
            .map_or(EMPTY, |&v| self.big.encode(v))
    }

    /// Recomputes every table entry the prefix `addr/len` spans from `routes`. A prefix
    /// longer than /24 recomputes its whole /24 block, because a block's group is built from
    /// all of the block's prefixes at once.
    fn rebuild(&mut self, addr: u32, len: u8) {
        let (addr, len) = if len > 24 {
            (addr & mask4(24), 24)
        } else {
            (addr & mask4(len), len)
        };
        let base = self.covering(addr, len);
        let lo = (addr >> 8) as usize;
        let hi = lo + (1usize << (24 - len));
        let last = addr | !mask4(len);
        let Lpm4 {
            routes,
            tbl24,
            tbl8,
            free_groups,
            big,
            ..
        } = self;
        let mut sweep = Sweep {
            tbl24,
            tbl8,
            free_groups,
            cursor: lo,
            stack: Vec::with_capacity(25),
            base,
            group: None,
        };
        // Every key in this range lies inside `addr/len` (a shorter prefix starting after
        // `addr` would have to be aligned beyond the block), and the order (address, then
        // length) lists enclosing prefixes before the ones they enclose.
        for (&(a, l), &v) in routes.range((addr, len)..=(last, 32)) {
            sweep.visit(a, l, big.encode(v));
        }
        sweep.advance(hi);
    }
}

/// One left-to-right pass over a range of `tbl24` that writes every entry once. `stack` holds
/// the prefixes (end index, encoded value) enclosing the cursor, innermost last.
struct Sweep<'a> {
    tbl24: &'a mut [Option<Arc<[u32]>>],
    tbl8: &'a mut Vec<u32>,
    free_groups: &'a mut Vec<u32>,
    cursor: usize,
    stack: Vec<(usize, u32)>,
    base: u32,
    /// The /24 block whose group the long prefixes being visited go into, and that group.
    group: Option<(usize, usize)>,
}

impl Sweep<'_> {
    fn current(&self) -> u32 {
        self.stack.last().map_or(self.base, |&(_, v)| v)
    }

    /// Writes `entry` into `tbl24[cursor..to]`, returning any groups it overwrites.
    fn fill(&mut self, to: usize, entry: u32) {
        let mut at = self.cursor;
        while at < to {
            let end = to.min((at | CHUNK_MASK) + 1);
            if let Some(chunk) = self.tbl24.get_mut(at >> CHUNK_BITS) {
                fill_chunk(chunk, at & CHUNK_MASK, end - at, entry, self.free_groups);
            }
            at = end;
        }
        self.cursor = self.cursor.max(to);
    }

    /// Moves the cursor to `to`, closing the prefixes that end on the way.
    fn advance(&mut self, to: usize) {
        while let Some(&(end, entry)) = self.stack.last() {
            if end > to {
                break;
            }
            self.fill(end, entry);
            self.stack.pop();
        }
        let entry = self.current();
        self.fill(to, entry);
    }

    fn visit(&mut self, addr: u32, len: u8, entry: u32) {
        if len <= 24 {
            let start = (addr >> 8) as usize;
            self.advance(start);
            self.stack.push((start + (1usize << (24 - len)), entry));
            return;
        }
        let block = (addr >> 8) as usize;
        let group = match self.group {
            Some((b, g)) if b == block => g,
            _ => {
                self.advance(block);
                let g = self.open_group(block);
                self.group = Some((block, g));
                g
            }
        };
        // Within a block, prefixes come enclosing-first, so painting each over the group in
        // order leaves every entry with its longest match.
        let start = group * GROUP_LEN + (addr & 0xff) as usize;
        let size = 1usize << (32 - u32::from(len.min(32)));
        if let Some(slots) = self.tbl8.get_mut(start..start + size) {
            slots.fill(entry);
        }
    }

    /// Points `tbl24[block]` at a group filled with the value enclosing the block, reusing the
    /// block's old group or a freed one when there is one.
    fn open_group(&mut self, block: usize) -> usize {
        let base = self.current();
        let old = self
            .tbl24
            .get(block >> CHUNK_BITS)
            .and_then(|c| c.as_deref()?.get(block & CHUNK_MASK).copied())
            .unwrap_or(EMPTY);
        let group = if old & TAG_MASK == TAG_GROUP {
            (old & PAYLOAD) as usize
        } else if let Some(g) = self.free_groups.pop() {
            g as usize
        } else {
            self.tbl8.resize(self.tbl8.len() + GROUP_LEN, EMPTY);
            self.tbl8.len() / GROUP_LEN - 1
        };
        if let Some(slots) = self
            .tbl8
            .get_mut(group * GROUP_LEN..(group + 1) * GROUP_LEN)
        {
            slots.fill(base);
        }
        if let Some(chunk) = self.tbl24.get_mut(block >> CHUNK_BITS) {
            let entry = TAG_GROUP | (group as u32 & PAYLOAD);
            fill_chunk(chunk, block & CHUNK_MASK, 1, entry, &mut Vec::new());
        }
        self.cursor = block + 1;
        group
    }
}

/// Writes `entry` into `count` entries of a chunk from `offset`, pushing the groups it
/// overwrites onto `freed`. Copies the chunk first if a clone shares it, materialises a
/// `None` chunk only to write a route into it, and turns a chunk that becomes all `EMPTY`
/// back into `None`.
fn fill_chunk(
    chunk: &mut Option<Arc<[u32]>>,
    offset: usize,
    count: usize,
    entry: u32,
    freed: &mut Vec<u32>,
) {
    let range = offset..offset + count;
    let changes = match chunk.as_deref() {
        None => entry != EMPTY,
        Some(c) => c
            .get(range.clone())
            .is_some_and(|s| s.iter().any(|&e| e != entry)),
    };
    if !changes {
        return;
    }
    // Collecting a `TrustedLen` iterator allocates the `Arc` once and writes it in place;
    // `Arc::from(vec![..])` would allocate twice and copy.
    let data = chunk.get_or_insert_with(|| std::iter::repeat_n(EMPTY, CHUNK_LEN).collect());
    if let Some(slots) = Arc::make_mut(data).get_mut(range) {
        for slot in slots {
            if *slot & TAG_MASK == TAG_GROUP {
                freed.push(*slot & PAYLOAD);
            }
            *slot = entry;
        }
    }
    if entry == EMPTY && (count == CHUNK_LEN || data.iter().all(|&e| e == EMPTY)) {
        *chunk = None;
    }
}
