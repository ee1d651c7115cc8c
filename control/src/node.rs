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
use classifier::policy::{CompileError, CompileOptions, PolicyTable};
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
    /// The node's uplink. With a gateway MAC, the default routes (`0.0.0.0/0`, `::/0`) lead
    /// out of it to that MAC: everything that is not a local pod.
    Uplink {
        /// The next hop's MAC for routes off the node.
        gateway_mac: Option<[u8; 6]>,
    },
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
    /// Settings the packet path reads.
    pub path: PathConfig,
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
}

/// Builds the snapshot for `epoch`.
pub fn build_snapshot(
    manifests: &Manifests,
    ports: &[Option<PortSpec>],
    opts: &NodeOptions,
    epoch: u32,
) -> (Snapshot, BuildReport) {
    let (policy, compile_errors) = PolicyTable::compile(
        &manifests.cluster,
        &CompileOptions {
            local_node: opts.local_node.clone(),
        },
    );
    let mut report = BuildReport {
        compile_errors,
        ..BuildReport::default()
    };
    let pods: HashMap<(&str, &str), &classifier::policy::model::Pod> = manifests
        .cluster
        .pods
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        .collect();
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
                if let Some(gw) = gateway_mac {
                    for prefix in ["0.0.0.0/0", "::/0"] {
                        if let Ok(prefix) = prefix.parse::<Cidr>() {
                            routes.insert(
                                prefix,
                                NextHop {
                                    kind: HopKind::Port,
                                    port: id,
                                    src_mac: spec.mac,
                                    dst_mac: *gw,
                                },
                            );
                        }
                    }
                }
                PortKind::Uplink
            }
            PortRole::Pod {
                namespace,
                name,
                pod_mac,
            } => {
                let pod = pods
                    .get(&(namespace.as_str(), name.as_str()))
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
        };
        out.push(Port {
            name: spec.name.clone(),
            mac: spec.mac,
            kind,
        });
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
            PortKind::Uplink => panic!("pod port"),
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
    fn a_pod_without_a_port_is_reported() {
        let ports = vec![pod_port("a", 1, Some([2, 0, 0, 0, 0, 1]))];
        let (_, report) = build_snapshot(&manifests(), &ports, &NodeOptions::default(), 1);
        assert_eq!(report.pods_without_port, vec!["x/b", "x/c"]);
    }
}
