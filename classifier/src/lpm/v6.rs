//! IPv6 longest-prefix match as one hash table per prefix length, probed longest-first over
//! only the lengths that hold routes.
//!
//! A node's IPv6 routes use a handful of lengths (/128 pod routes, a /122 or /64–/120 block
//! per node, a few aggregates and a default), so a lookup is at most a dozen or so probes, and
//! a pod address usually hits on the first one. Tries spend a dependent load per stride on
//! every lookup; Waldvogel's binary search on lengths saves probes but needs markers whose
//! best-match values must be recomputed under every changed prefix. `benches/lpm.rs`
//! compares this structure with `prefix-trie` at 100,000 routes.
//!
//! The `BTreeMap` of routes is the source of truth and gives `iter` its order; the hash tables
//! mirror it. The default route is kept apart so that a miss everywhere costs no hash.
//!
//! Before probing, a lookup reads `bucket_max`, the longest route length under the address's
//! top 16 bits (64 KiB, one byte per bucket), and skips the levels longer than that. An
//! address under no route but the default (most of the space) then costs one byte load,
//! and one under only short aggregates skips the pod levels. A bucket's byte only ever
//! rises on insert; a remove recomputes the buckets the removed prefix touched from the
//! route set.
//!
//! Hashing uses `ahash` with fixed seeds: the classifier takes no randomness from its
//! environment, and the keys are routes chosen by the control plane, not by senders.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::net::mask6;

type Hasher = ahash::RandomState;

fn hasher() -> Hasher {
    ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
}

/// The routes of one prefix length.
#[derive(Clone)]
struct Level {
    len: u8,
    mask: u128,
    routes: HashMap<u128, u32, Hasher>,
}

/// The IPv6 half of [`super::Lpm`].
#[derive(Clone, Default)]
pub(crate) struct Lpm6 {
    routes: BTreeMap<(u128, u8), u32>,
    /// Lengths 1..=128 that hold routes, longest first.
    levels: Vec<Level>,
    default: Option<u32>,
    /// For each value of the top 16 address bits, the longest route length (1..=128) under
    /// or covering it, 0 if none. Empty until the first non-default route.
    bucket_max: Vec<u8>,
}

const BUCKET_BITS: u32 = 16;

/// The buckets a prefix touches: one for lengths of 16 or more, several for shorter ones.
fn buckets(addr: u128, len: u8) -> std::ops::Range<usize> {
    let first = (addr >> (128 - BUCKET_BITS)) as usize;
    let count = 1usize << (BUCKET_BITS.saturating_sub(u32::from(len)));
    first..first + count
}

impl fmt::Debug for Lpm6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lens: Vec<u8> = self.levels.iter().map(|l| l.len).collect();
        f.debug_struct("Lpm6")
            .field("routes", &self.routes.len())
            .field("lengths", &lens)
            .field("default", &self.default)
            .finish()
    }
}

impl Lpm6 {
    pub(crate) fn from_routes(routes: BTreeMap<(u128, u8), u32>) -> Lpm6 {
        // Sizing each table up front avoids rehashing while the routes go in.
        let mut counts = [0usize; 129];
        for &(_, len) in routes.keys() {
            if let Some(c) = counts.get_mut(len as usize) {
                *c = c.saturating_add(1);
            }
        }
        let mut lpm = Lpm6::default();
        for (len, &count) in counts.iter().enumerate().rev() {
            if count > 0 && len > 0 {
                lpm.levels.push(Level {
                    len: len as u8,
                    mask: mask6(len as u8),
                    routes: HashMap::with_capacity_and_hasher(count, hasher()),
                });
            }
        }
        for (&(addr, len), &value) in &routes {
            lpm.put(addr, len, value);
        }
        lpm.routes = routes;
        lpm
    }

    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u128, u8, u32)> + '_ {
        self.routes.iter().map(|(&(addr, len), &v)| (addr, len, v))
    }

    pub(crate) fn get(&self, addr: u128, len: u8) -> Option<u32> {
        self.routes.get(&(addr & mask6(len), len)).copied()
    }

    /// Bytes allocated by the hash tables (an estimate: key, value and control byte per slot)
    /// and the bucket filter.
    pub(crate) fn table_bytes(&self) -> usize {
        let tables: usize = self
            .levels
            .iter()
            .map(|l| l.routes.capacity() * (16 + 4 + 1))
            .sum();
        tables + self.bucket_max.len()
    }

    /// Returns the previous value of the prefix. Lengths above 128 are ignored.
    pub(crate) fn insert(&mut self, addr: u128, len: u8, value: u32) -> Option<u32> {
        if len > 128 {
            return None;
        }
        let addr = addr & mask6(len);
        self.put(addr, len, value);
        self.routes.insert((addr, len), value)
    }

    pub(crate) fn remove(&mut self, addr: u128, len: u8) -> Option<u32> {
        let addr = addr & mask6(len);
        let old = self.routes.remove(&(addr, len))?;
        if len == 0 {
            self.default = None;
        } else if let Some(i) = self.levels.iter().position(|l| l.len == len)
            && let Some(level) = self.levels.get_mut(i)
        {
            level.routes.remove(&addr);
            if level.routes.is_empty() {
                self.levels.remove(i);
            }
            self.recompute_buckets(addr, len);
        }
        Some(old)
    }

    /// Writes a route into the hash tables, creating its level if needed.
    fn put(&mut self, addr: u128, len: u8, value: u32) {
        if len == 0 {
            self.default = Some(value);
            return;
        }
        let i = match self.levels.iter().position(|l| l.len <= len) {
            Some(i) if self.levels.get(i).is_some_and(|l| l.len == len) => i,
            found => {
                let i = found.unwrap_or(self.levels.len());
                self.levels.insert(
                    i,
                    Level {
                        len,
                        mask: mask6(len),
                        routes: HashMap::with_hasher(hasher()),
                    },
                );
                i
            }
        };
        if let Some(level) = self.levels.get_mut(i) {
            level.routes.insert(addr, value);
        }
        if self.bucket_max.is_empty() {
            self.bucket_max = vec![0; 1 << BUCKET_BITS];
        }
        if let Some(maxes) = self.bucket_max.get_mut(buckets(addr, len)) {
            for m in maxes {
                *m = (*m).max(len);
            }
        }
    }

    /// Recomputes the bucket maxima a removed prefix may have set, from the route set.
    fn recompute_buckets(&mut self, addr: u128, len: u8) {
        for b in buckets(addr, len) {
            let lo = (b as u128) << (128 - BUCKET_BITS);
            let hi = lo | !mask6(BUCKET_BITS as u8);
            let under = self
                .routes
                .range((lo, BUCKET_BITS as u8)..=(hi, 128))
                .map(|(&(_, l), _)| l)
                .max();
            let covering = (1..BUCKET_BITS as u8)
                .rev()
                .find(|&l| self.routes.contains_key(&(lo & mask6(l), l)));
            if let Some(m) = self.bucket_max.get_mut(b) {
                *m = under.max(covering).unwrap_or(0);
            }
        }
    }

    /// The value of the longest prefix containing `ip`: one hash probe per length present,
    /// longest first, stopping at the first hit. No allocation.
    #[inline]
    pub(crate) fn lookup(&self, ip: u128) -> Option<u32> {
        let max = self
            .bucket_max
            .get((ip >> (128 - BUCKET_BITS)) as usize)
            .copied()
            .unwrap_or(0);
        for level in &self.levels {
            if level.len > max {
                continue;
            }
            if let Some(&v) = level.routes.get(&(ip & level.mask)) {
                return Some(v);
            }
        }
        self.default
    }
}
