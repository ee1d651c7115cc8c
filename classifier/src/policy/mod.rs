//! Kubernetes NetworkPolicy: the model, its compilation into per-endpoint tables, and the
//! lookups the packet path makes.

pub mod compile;
pub mod model;

pub use compile::{CompileError, EndpointId, PolicyDecision, PolicyTable};
pub use model::*;
