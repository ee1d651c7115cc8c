//! ocelot-bench — the benchmark harness.
#![forbid(unsafe_code)]

fn main() {}
