//! A node's view of the cluster → the snapshot its workers forward with.
//!
//! Input: the cluster (a [`Manifests`] from any datastore), the node's ports as the agent
//! found them ([`PortSpec`]: interface name, our MAC on it, and for a pod's veth which pod it
//! serves and the MAC of the pod's `eth0`), node settings and an epoch. Output: a complete
//! [`Snapshot`] — compiled policy, routes, ports — and a [`BuildReport`] of what could not be
//! wired (pods whose veth is missing, policies the compiler refused).
//!
//! Routes today are the node-local part of Calico's model: each local pod's addresses as
//! host routes (/32, /128) out of its veth, with our MAC as source and the pod's as
//! destination, and default routes out of the uplink to its gateway when one is configured.
//! Routes to other nodes' pod blocks come with the multi-node work.
//!
//! **Architecture Invariant**: port ids are the agent's, stable for the life of the process;
//! this module never renumbers them, so conntrack entries and in-flight frames keep meaning
//! across snapshots.

use std::collections::HashMap;
use std::net::IpAddr;

use classifier::net::Cidr;
use classifier::policy::{CompileError, CompileOptions, CompileReuse, PolicyCompiler};
use classifier::snapshot::{HopKind, NextHop, PathConfig, Port, PortKind, RouteTable, Snapshot};
use classifier::verdict::PortId;

use crate::manifests::Manifests;

/// What a port is, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRole {
    /// The host side of pod `namespace/name`'s veth.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The MAC of the pod's `eth0`, if resolved; without it the pod cannot be sent to
        /// (its route is left out) and the source-MAC check is skipped.
        pod_mac: Option<[u8; 6]>,
    },
    /// The host side of a pod veth that matches no pod of the datastore: one that appeared
    /// while the agent did not know its pod (the API server unreachable, or the pod object
    /// not arrived yet). Its addresses are what the kernel routes to the interface (the host
    /// routes a CNI plugin installs).
    UnknownPod {
        /// The learned addresses.
        ips: Vec<IpAddr>,
        /// The MAC of the pod's `eth0`, if resolved.
        pod_mac: Option<[u8; 6]>,
        /// `true`: forwarded as a pod no policy selects, with no identity (no labels, so no
        /// selector of any policy matches it; ipBlock rules do), source address and MAC
        /// still checked. `false`: isolated — every frame from it and every packet routed to
        /// its addresses drops as `unknown_pod`.
        allow: bool,
    },
    /// The node's uplink. With a gateway MAC, the default routes (`0.0.0.0/0`, `::/0`) lead
    /// out of it to that MAC: everything that is not a local pod.
    Uplink {
        /// The next hop's MAC for routes off the node.
        gateway_mac: Option<[u8; 6]>,
    },
    /// The agent's tap device into the node's own stack: where `ToHost` frames go and the
    /// kernel's frames to local pods come from.
    Host,
}

/// One port of the node, indexed by its [`PortId`] (the position in the slice given to
/// [`build_snapshot`]). A `None` in that slice is a retired id: its pod is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Interface name.
    pub name: String,
    /// Our MAC on the link.
    pub mac: [u8; 6],
    /// What it is.
    pub role: PortRole,
}

/// Node-level inputs of a build.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Compile only pods scheduled on this node (`spec.nodeName`); `None` enforces every pod
    /// of the datastore (a single-node datastore such as a manifests directory).
    pub local_node: Option<String>,
    /// This node's name: its own `Node` object is not a route to elsewhere.
    pub node_name: Option<String>,
    /// Settings the packet path reads.
    pub path: PathConfig,
    /// The node's own addresses (every interface's): host routes to the node's stack.
    pub host_addresses: Vec<IpAddr>,
    /// The default gateway on the uplink, if any (its MAC from `neighbors`, unless the
    /// uplink's `gateway_mac` is set).
    pub gateway: Option<IpAddr>,
    /// MACs of next hops on the uplink, as resolved (the kernel's neighbour table).
    pub neighbors: HashMap<IpAddr, [u8; 6]>,
}

/// What a build could not do. The snapshot is complete regardless: a missing piece fails
/// closed (no route, no port), never open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildReport {
    /// Ports whose pod is not (or no longer) in the datastore: traffic from them drops.
    pub orphan_ports: Vec<String>,
    /// Pods with a port but no resolved MAC: unreachable until it is resolved.
    pub pods_without_mac: Vec<String>,
    /// Policies the compiler refused (the pods they select fail closed).
    pub compile_errors: Vec<CompileError>,
    /// Local pods with an address whose interface the agent has not found.
    pub pods_without_port: Vec<String>,
    /// Next hops (other nodes, the gateway) routed to but not resolved yet: their traffic
    /// drops as `neighbor_unresolved` until they are.
    pub unresolved_next_hops: Vec<IpAddr>,
}

/// The next hop for `via` out of the uplink: resolved, or marked unresolved.
fn uplink_hop(
    via: IpAddr,
    uplink: (PortId, [u8; 6]),
    static_mac: Option<[u8; 6]>,
    opts: &NodeOptions,
    report: &mut BuildReport,
) -> NextHop {
    let (port, src_mac) = uplink;
    match static_mac.or_else(|| opts.neighbors.get(&via).copied()) {
        Some(dst_mac) => NextHop {
            kind: HopKind::Port,
            port,
            src_mac,
            dst_mac,
        },
        None => {
            if !report.unresolved_next_hops.contains(&via) {
                report.unresolved_next_hops.push(via);
            }
            NextHop {
                kind: HopKind::Unresolved,
                port,
                src_mac,
                dst_mac: [0; 6],
            }
        }
    }
}

/// Builds the snapshot for `epoch` from scratch (see [`SnapshotBuilder`] for a sequence).
pub fn build_snapshot(
    manifests: &Manifests,
    ports: &[Option<PortSpec>],
    opts: &NodeOptions,
    epoch: u32,
) -> (Snapshot, BuildReport) {
    SnapshotBuilder::default().build(manifests, ports, opts, epoch)
}

/// Builds a node's snapshots one after another, keeping the policy compile's
/// pods-and-namespaces half ([`PolicyCompiler`]) between builds: a new snapshot recompiles
/// the pods that changed and the policy rules, not the whole cluster. Each snapshot is still
/// complete and the same as [`build_snapshot`]'s.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    compiler: PolicyCompiler,
}

impl SnapshotBuilder {
    /// Builds the snapshot for `epoch`.
    pub fn build(
        &mut self,
        manifests: &Manifests,
        ports: &[Option<PortSpec>],
        opts: &NodeOptions,
        epoch: u32,
    ) -> (Snapshot, BuildReport) {
        let (policy, compile_errors) = self.compiler.compile(
            &manifests.cluster,
            &CompileOptions {
                local_node: opts.local_node.clone(),
            },
        );
        wire(manifests, ports, opts, epoch, policy, compile_errors)
    }

    /// What the last build's policy compile reused.
    pub fn last_reuse(&self) -> CompileReuse {
        self.compiler.last_reuse()
    }
}

/// The node's side of a snapshot around a compiled policy table.
fn wire(
    manifests: &Manifests,
    ports: &[Option<PortSpec>],
    opts: &NodeOptions,
    epoch: u32,
    policy: classifier::policy::PolicyTable,
    compile_errors: Vec<CompileError>,
) -> (Snapshot, BuildReport) {
    let mut report = BuildReport {
        compile_errors,
        ..BuildReport::default()
    };
    // The pods the ports serve, found in one pass without indexing every pod of the cluster
    // (a later pod of the same name wins, as in the cluster's own order).
    let mut pods: ahash::AHashMap<(&str, &str), Option<&classifier::policy::model::Pod>> = ports
        .iter()
        .flatten()
        .filter_map(|spec| match &spec.role {
            PortRole::Pod {
                namespace, name, ..
            } => Some(((namespace.as_str(), name.as_str()), None)),
            _ => None,
        })
        .collect();
    if !pods.is_empty() {
        for p in &manifests.cluster.pods {
            if let Some(slot) = pods.get_mut(&(p.namespace.as_str(), p.name.as_str())) {
                *slot = Some(p);
            }
        }
    }
    let mut routes = RouteTable::new();
    let mut out = Vec::with_capacity(ports.len());
    let mut served = std::collections::HashSet::new();
    for (index, spec) in ports.iter().enumerate() {
        let id = PortId(index as u16);
        let Some(spec) = spec else {
            out.push(Port {
                name: String::new(),
                mac: [0; 6],
                kind: PortKind::Pod {
                    endpoint: None,
                    ip4: None,
                    ip6: None,
                    pod_mac: None,
                },
            });
            continue;
        };
        let kind = match &spec.role {
            PortRole::Uplink { gateway_mac } => {
                let uplink = (id, spec.mac);
                // Default routes: to the gateway (static MAC, or resolved by IP).
                let default_hop = match (opts.gateway, gateway_mac) {
                    (_, Some(mac)) => Some(NextHop {
                        kind: HopKind::Port,
                        port: id,
                        src_mac: spec.mac,
                        dst_mac: *mac,
                    }),
                    (Some(gw), None) => Some(uplink_hop(gw, uplink, None, opts, &mut report)),
                    (None, None) => None,
                };
                if let Some(hop) = default_hop {
                    for prefix in ["0.0.0.0/0", "::/0"] {
                        if let Ok(prefix) = prefix.parse::<Cidr>() {
                            routes.insert(prefix, hop);
                        }
                    }
                }
                // Other nodes' pod blocks, via each node's address (Calico's plain L3).
                for node in &manifests.nodes {
                    if opts.node_name.as_deref() == Some(node.name.as_str()) {
                        continue;
                    }
                    for cidr in &node.pod_cidrs {
                        let via = node
                            .internal_ips
                            .iter()
                            .find(|ip| ip.is_ipv4() == cidr.addr().is_ipv4());
                        if let Some(via) = via {
                            let hop = uplink_hop(*via, uplink, None, opts, &mut report);
                            routes.insert(*cidr, hop);
                        }
                    }
                }
                PortKind::Uplink
            }
            PortRole::Host => PortKind::Host,
            PortRole::Pod {
                namespace,
                name,
                pod_mac,
            } => {
                let pod = pods
                    .get(&(namespace.as_str(), name.as_str()))
                    .copied()
                    .flatten()
                    .filter(|p| !p.host_network);
                let Some(pod) = pod else {
                    report.orphan_ports.push(spec.name.clone());
                    out.push(Port {
                        name: spec.name.clone(),
                        mac: spec.mac,
                        kind: PortKind::Pod {
                            endpoint: None,
                            ip4: None,
                            ip6: None,
                            pod_mac: *pod_mac,
                        },
                    });
                    continue;
                };
                served.insert((namespace.as_str(), name.as_str()));
                let ip4 = pod.ips.iter().find_map(|ip| match ip {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                });
                let ip6 = pod.ips.iter().find_map(|ip| match ip {
                    IpAddr::V6(a) => Some(*a),
                    IpAddr::V4(_) => None,
                });
                match pod_mac {
                    Some(mac) => {
                        for ip in &pod.ips {
                            routes.insert(
                                Cidr::host(*ip),
                                NextHop {
                                    kind: HopKind::Port,
                                    port: id,
                                    src_mac: spec.mac,
                                    dst_mac: *mac,
                                },
                            );
                        }
                    }
                    None => report.pods_without_mac.push(format!("{namespace}/{name}")),
                }
                let endpoint = pod.ips.first().and_then(|ip| policy.endpoint(*ip));
                PortKind::Pod {
                    endpoint,
                    ip4,
                    ip6,
                    pod_mac: *pod_mac,
                }
            }
            PortRole::UnknownPod {
                ips,
                pod_mac,
                allow,
            } => {
                // An address the datastore gives to a pod stays that pod's: an unknown
                // interface never takes over its identity or its route.
                let ips: Vec<IpAddr> = ips
                    .iter()
                    .copied()
                    .filter(|ip| policy.endpoint(*ip).is_none())
                    .collect();
                unknown_pod_port(id, spec, &ips, *pod_mac, *allow, &mut routes)
            }
        };
        out.push(Port {
            name: spec.name.clone(),
            mac: spec.mac,
            kind,
        });
    }
    // The node's own addresses: its stack (whatever ports there are: a pod's traffic to them
    // is `ToHost`, or `pod_to_host_denied`, never routed elsewhere).
    for ip in &opts.host_addresses {
        routes.insert(
            Cidr::host(*ip),
            NextHop {
                kind: HopKind::Host,
                port: PortId(0),
                src_mac: [0; 6],
                dst_mac: [0; 6],
            },
        );
    }
    for pod in &manifests.cluster.pods {
        let local = match &opts.local_node {
            Some(node) => pod.node.as_deref() == Some(node.as_str()),
            None => true,
        };
        if local
            && !pod.host_network
            && !pod.ips.is_empty()
            && !served.contains(&(pod.namespace.as_str(), pod.name.as_str()))
        {
            report
                .pods_without_port
                .push(format!("{}/{}", pod.namespace, pod.name));
        }
    }
    let snapshot = Snapshot {
        epoch,
        policy,
        routes,
        ports: out,
        config: opts.path,
    };
    (snapshot, report)
}

/// The port, and routes, of an interface whose pod the datastore does not know.
///
/// Allowed: the port has the learned addresses for the source check and no policy endpoint;
/// the policy table, which resolves endpoints by address, finds none for it, so its egress
/// and ingress are not isolated and other pods' rules match it only through ipBlocks.
/// Isolated: the port has no address (every frame from it fails the source check as
/// `unknown_pod`) and its addresses route to an isolated hop, so traffic to it drops in the
/// dataplane instead of reaching it through the kernel.
fn unknown_pod_port(
    id: PortId,
    spec: &PortSpec,
    ips: &[IpAddr],
    pod_mac: Option<[u8; 6]>,
    allow: bool,
    routes: &mut RouteTable,
) -> PortKind {
    let hop = match (allow, pod_mac) {
        (true, Some(mac)) => Some((HopKind::Port, mac)),
        (true, None) => None,
        (false, _) => Some((HopKind::Isolated, [0; 6])),
    };
    if let Some((kind, dst_mac)) = hop {
        for ip in ips {
            routes.insert(
                Cidr::host(*ip),
                NextHop {
                    kind,
                    port: id,
                    src_mac: spec.mac,
                    dst_mac,
                },
            );
        }
    }
    if !allow {
        return PortKind::Pod {
            endpoint: None,
            ip4: None,
            ip6: None,
            pod_mac: None,
        };
    }
    PortKind::Pod {
        endpoint: None,
        ip4: ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }),
        ip6: ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }),
        pod_mac,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
status: {podIPs: [{ip: 10.1.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
status: {podIPs: [{ip: 10.1.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x}
status: {podIPs: [{ip: 10.1.0.3}]}
"#;

    fn manifests() -> Manifests {
        Manifests::from_texts([(PathBuf::from("c.yaml"), CLUSTER)]).expect("valid manifests")
    }

    fn pod_port(name: &str, mac_byte: u8, pod_mac: Option<[u8; 6]>) -> Option<PortSpec> {
        Some(PortSpec {
            name: format!("cali-{name}"),
            mac: [0xee; 6].map(|b| b ^ mac_byte),
            role: PortRole::Pod {
                namespace: "x".into(),
                name: name.into(),
                pod_mac,
            },
        })
    }

    #[test]
    fn pods_get_ports_routes_and_endpoints() {
        let ports = vec![
            pod_port("a", 1, Some([2, 0, 0, 0, 0, 1])),
            None,
            pod_port("b", 2, Some([2, 0, 0, 0, 0, 2])),
            pod_port("gone", 3, Some([2, 0, 0, 0, 0, 3])),
            pod_port("c", 4, None),
            Some(PortSpec {
                name: "eth0".into(),
                mac: [0xaa; 6],
                role: PortRole::Uplink {
                    gateway_mac: Some([0xbb; 6]),
                },
            }),
        ];
        let (snap, report) = build_snapshot(&manifests(), &ports, &NodeOptions::default(), 7);
        assert_eq!(snap.epoch, 7);
        assert_eq!(snap.ports.len(), 6);
        let out = snap.routes.lookup("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(
            (out.port, out.src_mac, out.dst_mac),
            (PortId(5), [0xaa; 6], [0xbb; 6])
        );
        let hop = snap.routes.lookup("10.1.0.2".parse().unwrap()).unwrap();
        assert_eq!((hop.port, hop.dst_mac), (PortId(2), [2, 0, 0, 0, 0, 2]));
        assert_eq!(hop.src_mac, [0xee ^ 2; 6]);
        let hop6 = snap.routes.lookup("fd00::2".parse().unwrap()).unwrap();
        assert_eq!(hop6.port, PortId(2));
        // No MAC yet: no route of its own (the default route applies).
        assert_eq!(
            snap.routes
                .lookup("10.1.0.3".parse().unwrap())
                .unwrap()
                .port,
            PortId(5)
        );
        match snap.ports[0].kind {
            PortKind::Pod { endpoint, ip4, .. } => {
                assert!(endpoint.is_some());
                assert_eq!(ip4, Some("10.1.0.1".parse().unwrap()));
            }
            PortKind::Uplink | PortKind::Host => panic!("pod port"),
        }
        assert!(matches!(
            snap.ports[1].kind,
            PortKind::Pod {
                endpoint: None,
                ip4: None,
                ..
            }
        ));
        assert_eq!(report.orphan_ports, vec!["cali-gone".to_owned()]);
        assert_eq!(report.pods_without_mac, vec!["x/c".to_owned()]);
        assert!(report.pods_without_port.is_empty());
    }

    #[test]
    fn unknown_pod_interfaces_are_isolated_or_allowed_without_identity() {
        let unknown = |allow: bool, ips: &[&str]| {
            Some(PortSpec {
                name: "cali-unknown".into(),
                mac: [0xee; 6],
                role: PortRole::UnknownPod {
                    ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                    pod_mac: Some([2, 0, 0, 0, 0, 9]),
                    allow,
                },
            })
        };
        // 10.1.0.1 is pod a's: never taken by an unknown interface.
        let learned = ["10.1.0.9", "fd00::9", "10.1.0.1"];
        let ports = vec![
            pod_port("a", 1, Some([2, 0, 0, 0, 0, 1])),
            unknown(true, &learned),
        ];
        let (snap, report) = build_snapshot(&manifests(), &ports, &NodeOptions::default(), 1);
        assert!(report.orphan_ports.is_empty());
        assert_eq!(
            snap.ports[1].kind,
            PortKind::Pod {
                endpoint: None,
                ip4: Some("10.1.0.9".parse().unwrap()),
                ip6: Some("fd00::9".parse().unwrap()),
                pod_mac: Some([2, 0, 0, 0, 0, 9]),
            }
        );
        for ip in ["10.1.0.9", "fd00::9"] {
            let hop = snap.routes.lookup(ip.parse().unwrap()).unwrap();
            assert_eq!((hop.kind, hop.port), (HopKind::Port, PortId(1)), "{ip}");
        }
        assert_eq!(
            snap.routes
                .lookup("10.1.0.1".parse().unwrap())
                .unwrap()
                .port,
            PortId(0)
        );

        let ports = vec![
            pod_port("a", 1, Some([2, 0, 0, 0, 0, 1])),
            unknown(false, &learned),
        ];
        let (snap, _) = build_snapshot(&manifests(), &ports, &NodeOptions::default(), 1);
        assert_eq!(
            snap.ports[1].kind,
            PortKind::Pod {
                endpoint: None,
                ip4: None,
                ip6: None,
                pod_mac: None,
            }
        );
        let hop = snap.routes.lookup("10.1.0.9".parse().unwrap()).unwrap();
        assert_eq!((hop.kind, hop.port), (HopKind::Isolated, PortId(1)));
        let a = snap.routes.lookup("10.1.0.1".parse().unwrap()).unwrap();
        assert_eq!((a.kind, a.port), (HopKind::Port, PortId(0)));
    }

    #[test]
    fn other_nodes_blocks_go_via_their_addresses_and_unknown_macs_are_unresolved() {
        const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDRs: [10.1.0.0/24]}
status: {addresses: [{type: InternalIP, address: 192.168.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDRs: [10.2.0.0/24]}
status: {addresses: [{type: InternalIP, address: 192.168.0.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {podCIDRs: [10.3.0.0/24]}
status: {addresses: [{type: InternalIP, address: 192.168.0.13}]}
"#;
        let m = Manifests::from_texts([
            (PathBuf::from("c.yaml"), CLUSTER),
            (PathBuf::from("n.yaml"), NODES),
        ])
        .expect("valid");
        let ports = vec![
            pod_port("a", 1, Some([2, 0, 0, 0, 0, 1])),
            Some(PortSpec {
                name: "eth0".into(),
                mac: [0xaa; 6],
                role: PortRole::Uplink { gateway_mac: None },
            }),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let opts = NodeOptions {
            node_name: Some("n1".into()),
            host_addresses: vec![ip("192.168.0.11")],
            gateway: Some(ip("192.168.0.1")),
            neighbors: [
                (ip("192.168.0.12"), [0xb2; 6]),
                (ip("192.168.0.1"), [0xb0; 6]),
            ]
            .into_iter()
            .collect(),
            ..NodeOptions::default()
        };
        let (snap, report) = build_snapshot(&m, &ports, &opts, 1);
        let n2 = snap.routes.lookup(ip("10.2.0.7")).unwrap();
        assert_eq!(
            (n2.kind, n2.port, n2.dst_mac),
            (HopKind::Port, PortId(1), [0xb2; 6])
        );
        let n3 = snap.routes.lookup(ip("10.3.0.7")).unwrap();
        assert_eq!(n3.kind, HopKind::Unresolved);
        assert_eq!(report.unresolved_next_hops, vec![ip("192.168.0.13")]);
        // Our own block is not routed to ourselves: our pods are /32s, the rest is default.
        let own = snap.routes.lookup(ip("10.1.0.200")).unwrap();
        assert_eq!(own.dst_mac, [0xb0; 6], "default route via the gateway");
        assert_eq!(snap.routes.lookup(ip("10.1.0.1")).unwrap().port, PortId(0));
        assert_eq!(
            snap.routes.lookup(ip("192.168.0.11")).unwrap().kind,
            HopKind::Host
        );
        assert_eq!(
            snap.routes.lookup(ip("8.8.8.8")).unwrap().dst_mac,
            [0xb0; 6]
        );
    }

    #[test]
    fn a_pod_without_a_port_is_reported() {
        let ports = vec![pod_port("a", 1, Some([2, 0, 0, 0, 0, 1]))];
        let (_, report) = build_snapshot(&manifests(), &ports, &NodeOptions::default(), 1);
        assert_eq!(report.pods_without_port, vec!["x/b", "x/c"]);
    }

    /// A builder kept across updates gives the snapshot a fresh build gives.
    #[test]
    fn a_kept_builder_builds_what_a_fresh_build_does() {
        let ports = vec![
            pod_port("a", 1, Some([2, 0, 0, 0, 0, 1])),
            pod_port("b", 2, Some([2, 0, 0, 0, 0, 2])),
        ];
        let opts = NodeOptions::default();
        let deny_to_a = classifier::policy::NetworkPolicy {
            namespace: "x".into(),
            name: "deny-a".into(),
            pod_selector: classifier::policy::LabelSelector {
                match_labels: [("app".to_string(), "a".to_string())].into(),
                ..Default::default()
            },
            ingress_isolation: true,
            ..Default::default()
        };
        let mut m = manifests();
        let mut builder = SnapshotBuilder::default();
        let steps: [&dyn Fn(&mut Manifests); 4] = [
            &|_| {},
            &|m| m.cluster.policies.push(deny_to_a.clone()),
            &|m| {
                if let Some(p) = m.cluster.pods.iter_mut().find(|p| p.name == "b") {
                    p.labels.insert("app".into(), "a".into());
                }
            },
            &|m| m.cluster.pods.retain(|p| p.name != "a"),
        ];
        let addrs: Vec<IpAddr> = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "192.0.2.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for (epoch, step) in steps.iter().enumerate() {
            step(&mut m);
            let (kept, kept_report) = builder.build(&m, &ports, &opts, epoch as u32);
            let (fresh, fresh_report) = build_snapshot(&m, &ports, &opts, epoch as u32);
            assert_eq!(kept_report, fresh_report, "step {epoch}");
            assert_eq!(format!("{:?}", kept.ports), format!("{:?}", fresh.ports));
            for &src in &addrs {
                for &dst in &addrs {
                    assert_eq!(
                        kept.policy.check(src, dst, 6, Some(80)),
                        fresh.policy.check(src, dst, 6, Some(80)),
                        "step {epoch}: {src} -> {dst}"
                    );
                }
            }
            assert_eq!(builder.last_reuse().rebuilt, epoch == 0);
        }
        // The relabelled pod's verdict did change along the way.
        let (snap, _) = builder.build(&m, &ports, &opts, 9);
        let b: IpAddr = "10.1.0.2".parse().unwrap();
        let c: IpAddr = "10.1.0.3".parse().unwrap();
        assert_eq!(
            snap.policy.check(c, b, 6, Some(80)),
            classifier::policy::PolicyDecision::DenyIngress
        );
    }
}
