//! SKELETON — the conntrack helper replaces this file. The public signatures are the contract.

use std::net::IpAddr;
use std::time::Duration;

use crate::Nanos;
use crate::parse::{IpMeta, L4};

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

/// Table configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtConfig {
    /// Maximum entries.
    pub capacity: usize,
    /// Timeouts.
    pub timeouts: CtTimeouts,
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

/// Connection tracking table.
#[derive(Debug)]
pub struct Conntrack {}

impl Conntrack {
    /// A new, empty table.
    pub fn new(cfg: CtConfig) -> Conntrack {
        let _ = cfg;
        Conntrack {}
    }
    /// Looks up the packet's connection and advances its state.
    pub fn track(&self, key: &FlowKey, l4: &L4, now: Nanos) -> CtVerdict {
        let _ = (key, l4, now);
        CtVerdict::Miss
    }
    /// Whether this packet may open a connection.
    pub fn can_open(l4: &L4, v6: bool) -> bool {
        let _ = (l4, v6);
        true
    }
    /// Admits a new connection.
    pub fn insert(&self, key: &FlowKey, l4: &L4, epoch: u32, now: Nanos) -> Result<(), CtFull> {
        let _ = (key, l4, epoch, now);
        Ok(())
    }
}

impl Conntrack {
    /// Whether a live entry exists for the key, in either direction (no state change).
    pub fn contains(&self, key: &FlowKey, now: Nanos) -> bool {
        let _ = (key, now);
        false
    }
    /// Removes an entry.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let _ = key;
        false
    }
    /// Updates an entry's policy epoch.
    pub fn set_epoch(&self, key: &FlowKey, epoch: u32) -> bool {
        let _ = (key, epoch);
        false
    }
}
impl Default for CtConfig {
    fn default() -> Self {
        let s = Duration::from_secs(1);
        CtConfig {
            capacity: 1 << 19,
            timeouts: CtTimeouts {
                tcp_syn: s * 20,
                tcp_established: s * 3600,
                tcp_fin: s * 30,
                tcp_rst: s * 40,
                udp: s * 60,
                icmp: s * 5,
                other: s * 600,
            },
        }
    }
}
