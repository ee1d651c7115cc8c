//! # dataplane — AF_XDP I/O and workers
//!
//! The kernel-facing half of ocelot. It moves Ethernet frames between interfaces through
//! AF_XDP sockets; deciding what happens to a frame is the classifier's job, not this crate's.
//!
//! - [`sys`] is the one choke point for the kernel: UMEM, the four AF_XDP rings, socket
//!   creation and XDP program lifetime, and entering a network namespace. It is the only
//!   module allowed to use `unsafe`.
//! - [`port`] defines the small traits ([`port::Rx`], [`port::Tx`], [`port::FrameMem`]) every
//!   forwarding loop runs over, so the loop can be tested against [`mem`]'s in-memory and
//!   fault-injecting ports without a kernel.
//! - [`rawfwd`] is the bare rx→tx forwarder: frames received on one interface are transmitted
//!   on another from the same UMEM without a copy, with MACs rewritten from a static table.
//!   It is the baseline the full pipeline is measured against (`raw-xsk`).
//! - [`worker`] is the same loop with a classifier in the middle (one verdict per frame of a
//!   burst): the skeleton of ocelot's forwarding worker. [`handoff`] carries frames (as
//!   copies) to ports another worker owns.
//!
//! What a pod interface must look like in front of this dataplane: transmit checksum
//! offload off on the pod's eth0 (`ethtool -K eth0 tx off`). The kernel leaves checksums of
//! locally sent UDP/TCP to "hardware" (`CHECKSUM_PARTIAL`), and AF_XDP hands user space the
//! bare frame without that mark, so a forwarded frame would reach the other pod with a wrong
//! checksum and be dropped there (`InCsumErrors` in its `/proc/net/snmp`).
//!
//! **Invariant:** every UMEM frame is owned by exactly one side at a time — the kernel (while it
//! sits in a fill or tx ring) or this process (on a free list, in a burst, or on a pending tx
//! list). The [`sys`] module documents the hand-off; the types make a frame a moved value so
//! the compiler tracks the user-space half of it.
// The `sys` module needs `unsafe` to talk to the kernel; everything else must stay safe, so the
// crate denies it and only `sys` opts back in.
#![deny(unsafe_code)]

mod error;
pub mod handoff;
pub mod live;
pub mod mem;
pub mod netns;
pub mod port;
pub mod rawfwd;
#[allow(unsafe_code)] // The only module that touches UMEM memory, rings and syscalls.
pub mod sys;
pub mod worker;

pub use error::Error;
