//! Kubernetes NetworkPolicy: the model, its compilation into per-endpoint tables, and the
//! lookups the packet path makes.

pub mod compile;
pub mod model;
#[doc(hidden)]
pub mod reference;
mod select;
#[cfg(test)]
mod tests;

pub use compile::{
    CompileError, CompileOptions, CompileReuse, EndpointId, EndpointInfo, PolicyCompiler,
    PolicyDecision, PolicyStats, PolicyTable,
};
pub use model::*;
