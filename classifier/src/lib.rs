//! # classifier — everything the packet path decides, and nothing else
//!
//! The layer under the AF_XDP workers and over nothing: bytes of a frame in, a [`Verdict`] out.
//! It parses frames ([`parse`]), tracks connections ([`conntrack`]), evaluates Kubernetes
//! NetworkPolicy from compiled per-endpoint tables ([`policy`]), routes by longest-prefix
//! match ([`lpm`]) and rewrites headers ([`rewrite`]); [`pipeline`] strings these stages
//! together over a burst of frames against one immutable [`snapshot::Snapshot`].
//!
//! Invariants:
//! - sans-I/O: no sockets, threads, clocks, files or environment. Time comes in as `now`.
//! - no `unsafe`, and no input makes it panic.
//! - the per-burst path does not allocate or lock.
#![forbid(unsafe_code)]

pub mod conntrack;
pub mod lpm;
pub mod net;
pub mod parse;
pub mod pipeline;
pub mod policy;
pub mod rewrite;
pub mod snapshot;
pub mod testing;
pub mod verdict;

pub use verdict::{Counters, DropReason, PortId, Verdict};

/// Monotonic time in nanoseconds, supplied by the caller (the classifier has no clock).
pub type Nanos = u64;
