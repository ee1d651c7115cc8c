//! The executable specification of NetworkPolicy, for tests only.
//!
//! A direct walk of the cluster's policies for one connection attempt, written from the
//! Kubernetes documentation (networking.k8s.io/v1) as plainly as possible, with no indexes
//! and no caching. Tests compare [`super::PolicyTable`] against it; it is far too slow for
//! the packet path. It is kept in non-test code because other crates' tests use it.
//!
//! Conventions it shares with the compiler (the model allows them, Kubernetes would not):
//! - When pods share an address, the first matching pod in `cluster.pods` owns it.
//! - A namespace that no `Namespace` object describes has no labels.
//! - A policy Kubernetes validation would reject (see [`policy_is_valid`]) still isolates the
//!   pods it selects but allows nothing.

use std::net::IpAddr;

use super::compile::PolicyDecision;
use super::model::{Cluster, Labels, NamespaceScope, NetworkPolicy, Peer, Pod, PortRef, Rule};

/// Whether `src` may open a connection to `dst`, every pod being enforced.
pub fn allowed(
    cluster: &Cluster,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    dport: Option<u16>,
) -> PolicyDecision {
    allowed_on_node(cluster, None, src, dst, proto, dport)
}

/// Whether `src` may open a connection to `dst`, as enforced by the agent of `node`: only
/// pods on that node have their own policy applied (`None`: every pod).
pub fn allowed_on_node(
    cluster: &Cluster,
    node: Option<&str>,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    dport: Option<u16>,
) -> PolicyDecision {
    let src_pod = pod_with_ip(cluster, src);
    let dst_pod = pod_with_ip(cluster, dst);
    let enforced = |pod: &Pod| match node {
        None => true,
        Some(n) => pod.node.as_deref() == Some(n),
    };

    if let Some(pod) = src_pod
        && enforced(pod)
    {
        let ok = direction_allows(
            cluster,
            pod,
            Direction::Egress,
            dst,
            dst_pod,
            proto,
            dport,
            dst_pod,
        );
        if !ok {
            return PolicyDecision::DenyEgress;
        }
    }
    if let Some(pod) = dst_pod
        && enforced(pod)
    {
        let ok = direction_allows(
            cluster,
            pod,
            Direction::Ingress,
            src,
            src_pod,
            proto,
            dport,
            dst_pod,
        );
        if !ok {
            return PolicyDecision::DenyIngress;
        }
    }
    PolicyDecision::Allow
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// The pod that owns an address: not hostNetwork (those share the node's address and are
/// peers only through ipBlock).
fn pod_with_ip(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    cluster
        .pods
        .iter()
        .find(|p| !p.host_network && p.ips.contains(&ip))
}

/// Whether `pod`'s policy in one direction allows traffic with a peer.
#[allow(clippy::too_many_arguments)] // Each argument is one fact about the connection.
fn direction_allows(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    dport: Option<u16>,
    dst_pod: Option<&Pod>,
) -> bool {
    // The policies that apply: same namespace, isolating this direction, selecting the pod.
    let applying: Vec<&NetworkPolicy> = cluster
        .policies
        .iter()
        .filter(|pol| pol.namespace == pod.namespace)
        .filter(|pol| match direction {
            Direction::Ingress => pol.ingress_isolation,
            Direction::Egress => pol.egress_isolation,
        })
        .filter(|pol| pol.pod_selector.matches(&pod.labels))
        .collect();

    // A pod no policy isolates in this direction is open.
    if applying.is_empty() {
        return true;
    }

    // Otherwise the union of the rules of all applying (valid) policies.
    applying.iter().any(|pol| {
        if !policy_is_valid(pol) {
            return false;
        }
        let rules = match direction {
            Direction::Ingress => &pol.ingress,
            Direction::Egress => &pol.egress,
        };
        rules
            .iter()
            .any(|rule| rule_matches(cluster, pol, rule, peer_ip, peer_pod, proto, dport, dst_pod))
    })
}

#[allow(clippy::too_many_arguments)] // Each argument is one fact about the connection.
fn rule_matches(
    cluster: &Cluster,
    pol: &NetworkPolicy,
    rule: &Rule,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    proto: u8,
    dport: Option<u16>,
    dst_pod: Option<&Pod>,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|peer| peer_matches(cluster, pol, peer, peer_ip, peer_pod));
    let port_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|spec| {
            if spec.protocol.ip_number() != proto {
                return false;
            }
            let Some(port) = dport else {
                return false;
            };
            match &spec.port {
                None => true,
                Some(PortRef::Number(first)) => {
                    let last = spec.end_port.unwrap_or(*first);
                    *first <= port && port <= last
                }
                Some(PortRef::Name(name)) => match dst_pod {
                    None => false,
                    Some(d) => d.ports.iter().any(|cp| {
                        cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol == spec.protocol
                            && cp.port == port
                    }),
                },
            }
        });
    peer_ok && port_ok
}

fn peer_matches(
    cluster: &Cluster,
    pol: &NetworkPolicy,
    peer: &Peer,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(peer_ip) && !except.iter().any(|e| e.contains(peer_ip))
        }
        Peer::Pods { namespaces, pods } => {
            let Some(q) = peer_pod else {
                return false;
            };
            let namespace_ok = match namespaces {
                NamespaceScope::PolicyNamespace => q.namespace == pol.namespace,
                NamespaceScope::Selector(sel) => {
                    sel.matches(namespace_labels(cluster, &q.namespace))
                }
            };
            namespace_ok && pods.matches(&q.labels)
        }
    }
}

fn namespace_labels<'c>(cluster: &'c Cluster, name: &str) -> &'c Labels {
    static NONE: Labels = Labels::new();
    cluster
        .namespaces
        .iter()
        .find(|ns| ns.name == name)
        .map_or(&NONE, |ns| &ns.labels)
}

/// Whether Kubernetes validation would accept the rules of the directions `pol` isolates:
/// `endPort` needs a numeric `port` not above it, and every ipBlock `except` must be a
/// strict subset of its `cidr` (same family, longer prefix, inside).
pub fn policy_is_valid(pol: &NetworkPolicy) -> bool {
    let mut rules: Vec<&Rule> = Vec::new();
    if pol.ingress_isolation {
        rules.extend(&pol.ingress);
    }
    if pol.egress_isolation {
        rules.extend(&pol.egress);
    }
    rules.iter().all(|rule| {
        let ports_ok = rule.ports.iter().all(|spec| match spec.end_port {
            None => true,
            Some(end) => matches!(spec.port, Some(PortRef::Number(first)) if first <= end),
        });
        let blocks_ok = rule.peers.iter().all(|peer| match peer {
            Peer::Pods { .. } => true,
            Peer::IpBlock { cidr, except } => except.iter().all(|e| {
                e.addr().is_ipv4() == cidr.addr().is_ipv4()
                    && e.len() > cidr.len()
                    && cidr.contains(e.addr())
            }),
        });
        ports_ok && blocks_ok
    })
}
