//! SKELETON — the LPM helper replaces this file. The public signatures are the contract.

use std::net::IpAddr;

use crate::net::Cidr;

/// Longest-prefix-match table from prefixes to `u32` values (next-hop indices).
#[derive(Debug, Default, Clone)]
pub struct Lpm {}

impl Lpm {
    /// An empty table.
    pub fn new() -> Lpm {
        Lpm {}
    }
    /// Inserts or replaces a prefix.
    pub fn insert(&mut self, prefix: Cidr, value: u32) {
        let _ = (prefix, value);
    }
    /// Removes a prefix; returns its value.
    pub fn remove(&mut self, prefix: Cidr) -> Option<u32> {
        let _ = prefix;
        None
    }
    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let _ = ip;
        None
    }
}
