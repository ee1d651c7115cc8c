//! ocelotctl — the operator's CLI.
#![forbid(unsafe_code)]

fn main() {}
