//! # dataplane — AF_XDP workers (arrives with the dataplane issue)
//!
//! This crate will own the kernel-facing half of ocelot: UMEM, AF_XDP rings, XDP attach and
//! pinned polling workers, with all `unsafe` confined to one `sys` module. Today it holds only
//! the in-memory frame source the benchmark harness and tests share.
#![forbid(unsafe_code)]
