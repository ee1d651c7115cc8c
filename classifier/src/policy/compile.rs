//! SKELETON — the policy helper replaces this file. The public signatures are the contract.

use std::net::IpAddr;

use super::model::Cluster;

/// Dense index of a pod endpoint in a [`PolicyTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// The outcome of a policy check for one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyDecision {
    /// Both the source's egress and the destination's ingress allow it.
    Allow,
    /// The source pod's egress policy refuses it.
    DenyEgress,
    /// The destination pod's ingress policy refuses it.
    DenyIngress,
}

/// Which endpoints get compiled tables.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Compile only pods scheduled on this node (a node agent); `None` compiles every pod
    /// (offline verdicts, tests).
    pub local_node: Option<String>,
}

/// An object the compiler could not express; it is reported and the pods it selects fail
/// closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {namespace}/{name}: {why}")]
pub struct CompileError {
    /// Namespace of the offending policy.
    pub namespace: String,
    /// Name of the offending policy.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

/// Compiled policy for a set of endpoints.
#[derive(Debug, Default)]
pub struct PolicyTable {}

impl PolicyTable {
    /// Compiles a cluster.
    pub fn compile(cluster: &Cluster, opts: &CompileOptions) -> (PolicyTable, Vec<CompileError>) {
        let _ = (cluster, opts);
        (PolicyTable {}, Vec::new())
    }

    /// The pod endpoint that owns an address.
    pub fn endpoint(&self, ip: IpAddr) -> Option<EndpointId> {
        let _ = ip;
        None
    }

    /// Checks a connection attempt; `dport` is `None` when the packet carries no port.
    pub fn check(&self, src: IpAddr, dst: IpAddr, proto: u8, dport: Option<u16>) -> PolicyDecision {
        let _ = (src, dst, proto, dport);
        PolicyDecision::Allow
    }
}
