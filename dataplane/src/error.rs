//! The crate's error type: one enum naming what failed and with which input.

use std::io;

/// Everything that can fail in the dataplane's I/O layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The UMEM (the frame memory shared with the kernel) could not be created.
    #[error("creating a UMEM of {frames} frames of {frame_size} bytes")]
    Umem {
        /// Requested frame count.
        frames: u32,
        /// Requested frame size in bytes.
        frame_size: u32,
        /// What xsk-rs / libxdp reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A UMEM, socket or ring configuration value was refused (e.g. not a power of two).
    #[error("invalid AF_XDP configuration: {0}")]
    Config(String),
    /// An AF_XDP socket could not be created or bound on an interface queue.
    #[error("creating an AF_XDP socket on {interface} queue {queue}")]
    Socket {
        /// Interface name.
        interface: String,
        /// Queue id.
        queue: u32,
        /// What xsk-rs / libxdp reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A second socket on an (interface, queue) pair of the same UMEM: it would not get its own
    /// fill and completion rings, which this crate's port model requires.
    #[error("{interface} queue {queue} is already bound on this UMEM")]
    AlreadyBound {
        /// Interface name.
        interface: String,
        /// Queue id.
        queue: u32,
    },
    /// The interface already has an XDP program that this process did not attach; it is
    /// someone else's and is left alone.
    #[error("{interface} already has an XDP program (id {prog}) that ocelot did not attach")]
    XdpBusy {
        /// Interface name.
        interface: String,
        /// The program's id (`bpftool prog show id …`).
        prog: u32,
    },
    /// A syscall on an AF_XDP socket failed (wakeup, poll, statistics).
    #[error("{syscall} on the AF_XDP socket of {interface}")]
    SocketIo {
        /// The operation that failed.
        syscall: &'static str,
        /// Interface the socket is bound to.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A frame of one UMEM was handed to a ring of another; refused because the kernel would
    /// read or write memory that the other UMEM's owner still holds.
    #[error("frame of UMEM {frame_umem} handed to a ring of UMEM {ring_umem}")]
    ForeignFrame {
        /// UMEM id the frame came from.
        frame_umem: u32,
        /// UMEM id of the ring it was handed to.
        ring_umem: u32,
    },
    /// Entering a network namespace failed.
    #[error("{syscall} for network namespace {name}")]
    Netns {
        /// Namespace name (under /var/run/netns).
        name: String,
        /// The operation that failed.
        syscall: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Looking up or querying an interface failed.
    #[error("{what} for interface {interface}")]
    Interface {
        /// Interface name.
        interface: String,
        /// The operation that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A forwarding table named a port that does not exist.
    #[error("forwarding entry {entry}: {reason}")]
    Table {
        /// Index of the offending entry.
        entry: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A command (`ip`, `ethtool`, `sysctl`) that builds a topology failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and stderr, or why it could not start.
        detail: String,
    },
}
