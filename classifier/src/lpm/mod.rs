//! Longest-prefix-match routing table: prefixes ([`Cidr`]) to `u32` values, which the caller
//! uses as indices into its own next-hop array.
//!
//! - IPv4 ([`v4`]) is DIR-24-8 as in DPDK's `rte_lpm`: a lookup is one load, or two for the
//!   /24 blocks that hold longer prefixes. The first level is 2^24 `u32`s (64 MiB) split
//!   into 256 copy-on-write chunks, one per /8, materialised only where routes are, so that
//!   cloning a table for the next snapshot is cheap.
//! - IPv6 ([`v6`]) is one hash table per prefix length present, probed longest-first.
//!
//! Invariants:
//! - The set of prefixes is the source of truth and the lookup tables are derived from it, so
//!   removing a prefix restores exactly what the next-shorter covering prefix says.
//! - `lookup`, `lookup_v4` and `lookup_v6` neither allocate nor panic on any address; updates
//!   allocate and belong to the control plane, which builds a table and publishes it as an
//!   immutable snapshot.
//! - [`Lpm::iter`] lists IPv4 routes before IPv6 ones, each by network address and then by
//!   prefix length (the order of [`Cidr`]'s `Ord`), whatever the order of insertion.

mod v4;
mod v6;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::net::Cidr;

/// Longest-prefix-match table from prefixes to `u32` values (next-hop indices).
#[derive(Debug, Default, Clone)]
pub struct Lpm {
    v4: v4::Lpm4,
    v6: v6::Lpm6,
}

/// Sizes of a table, for operators and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpmStats {
    /// IPv4 prefixes.
    pub routes_v4: usize,
    /// IPv6 prefixes.
    pub routes_v6: usize,
    /// IPv4 first-level chunks (256 KiB each, one per /8) materialised because a route
    /// covers part of their /8.
    pub chunks: usize,
    /// IPv4 second-level groups holding prefixes longer than /24.
    pub groups_in_use: usize,
    /// IPv4 second-level groups allocated, including freed ones kept for reuse.
    pub groups_allocated: usize,
    /// Bytes allocated for the lookup tables of both families (the IPv4 first level counts
    /// in full although only touched pages are backed); the route sets are not included.
    pub table_bytes: usize,
}

impl Lpm {
    /// An empty table. Allocates nothing until the first insert.
    pub fn new() -> Lpm {
        Lpm::default()
    }

    /// Builds a table from a whole route set; a prefix given twice keeps its last value.
    /// Faster than repeated [`Lpm::insert`]: the IPv4 first level is written in one sweep
    /// instead of once per prefix it lies under.
    pub fn from_routes(routes: impl IntoIterator<Item = (Cidr, u32)>) -> Lpm {
        let mut r4 = Vec::new();
        let mut r6 = Vec::new();
        for (cidr, value) in routes {
            match cidr.addr() {
                IpAddr::V4(a) => r4.push(((u32::from(a), cidr.len()), value)),
                IpAddr::V6(a) => r6.push(((u128::from(a), cidr.len()), value)),
            }
        }
        // Collecting sorts once and builds the tree bottom-up, much faster than inserting
        // one by one; of equal keys it keeps the last, as repeated inserts would.
        Lpm {
            v4: v4::Lpm4::from_routes(r4.into_iter().collect::<BTreeMap<_, _>>()),
            v6: v6::Lpm6::from_routes(r6.into_iter().collect::<BTreeMap<_, _>>()),
        }
    }

    /// Inserts or replaces a prefix.
    pub fn insert(&mut self, prefix: Cidr, value: u32) {
        self.replace(prefix, value);
    }

    /// Inserts or replaces a prefix; returns the value it replaced.
    pub fn replace(&mut self, prefix: Cidr, value: u32) -> Option<u32> {
        match prefix.addr() {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), prefix.len(), value),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), prefix.len(), value),
        }
    }

    /// Removes a prefix; returns its value.
    pub fn remove(&mut self, prefix: Cidr) -> Option<u32> {
        match prefix.addr() {
            IpAddr::V4(a) => self.v4.remove(u32::from(a), prefix.len()),
            IpAddr::V6(a) => self.v6.remove(u128::from(a), prefix.len()),
        }
    }

    /// The value stored for exactly this prefix (no longest-match search).
    pub fn get(&self, prefix: Cidr) -> Option<u32> {
        match prefix.addr() {
            IpAddr::V4(a) => self.v4.get(u32::from(a), prefix.len()),
            IpAddr::V6(a) => self.v6.get(u128::from(a), prefix.len()),
        }
    }

    /// The value of the longest prefix containing `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// The value of the longest IPv4 prefix containing `ip` (host byte order, as
    /// `u32::from(Ipv4Addr)` gives it).
    #[inline]
    pub fn lookup_v4(&self, ip: u32) -> Option<u32> {
        self.v4.lookup(ip)
    }

    /// The value of the longest IPv6 prefix containing `ip` (as `u128::from(Ipv6Addr)`).
    #[inline]
    pub fn lookup_v6(&self, ip: u128) -> Option<u32> {
        self.v6.lookup(ip)
    }

    /// Number of prefixes of both families.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True if the table has no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every prefix and its value: IPv4 first, then IPv6, each ordered by address and then
    /// length.
    pub fn iter(&self) -> impl Iterator<Item = (Cidr, u32)> + '_ {
        let v4 = self.v4.iter().filter_map(|(addr, len, v)| {
            Cidr::new(IpAddr::V4(Ipv4Addr::from(addr)), len)
                .ok()
                .map(|c| (c, v))
        });
        let v6 = self.v6.iter().filter_map(|(addr, len, v)| {
            Cidr::new(IpAddr::V6(Ipv6Addr::from(addr)), len)
                .ok()
                .map(|c| (c, v))
        });
        v4.chain(v6)
    }

    /// Sizes of the table.
    pub fn stats(&self) -> LpmStats {
        LpmStats {
            routes_v4: self.v4.len(),
            routes_v6: self.v6.len(),
            chunks: self.v4.chunks(),
            groups_in_use: self.v4.groups_in_use(),
            groups_allocated: self.v4.groups_allocated(),
            table_bytes: self.v4.table_bytes() + self.v6.table_bytes(),
        }
    }
}

impl FromIterator<(Cidr, u32)> for Lpm {
    fn from_iter<I: IntoIterator<Item = (Cidr, u32)>>(iter: I) -> Lpm {
        Lpm::from_routes(iter)
    }
}

#[cfg(test)]
mod tests;
