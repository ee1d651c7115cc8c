//! The library behind ocelot's binaries: the node agent (`ocelot run`, [`agent`]) and the
//! virtual-node lab (`ocelot lab`, [`lab`]). `ocelotctl` is `src/main.rs`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod lab;
