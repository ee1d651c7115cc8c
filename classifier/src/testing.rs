//! Deterministic frames and synthetic clusters for tests, benchmarks and fuzzing.
//!
//! Not part of the packet path: this module allocates freely. It lives in the library (not
//! under `cfg(test)`) because the criterion benches, `ocelot-bench` and the integration tests
//! all need the same workloads, and a benchmark is only comparable to another if both ran the
//! same generated cluster.
#![doc(hidden)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use etherparse::{PacketBuilder, TcpHeader};

use crate::net::Cidr;
use crate::policy::compile::CompileOptions;
use crate::policy::model::*;
use crate::policy::{PolicyDecision, PolicyTable};
use crate::snapshot::{HopKind, NextHop, PathConfig, Port, PortKind, RouteTable, Snapshot};
use crate::verdict::PortId;

/// A small, fast, deterministic PRNG (SplitMix64): benchmarks must generate the same
/// workload on every run and every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Transport part of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Spec {
    /// TCP with flags (`TcpFlags` bits).
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flag bits.
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP echo request (or reply) with an identifier.
    IcmpEcho {
        /// Identifier.
        id: u16,
        /// Reply instead of request.
        reply: bool,
    },
}

/// A frame to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src: IpAddr,
    /// Destination address (same family as `src`).
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// Transport.
    pub l4: L4Spec,
}

/// Minimum Ethernet frame without the FCS: a "64-byte frame" on the wire.
pub const MIN_FRAME: usize = 60;

impl FrameSpec {
    /// Serialises the frame, padded to the Ethernet minimum.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let mut out = Vec::with_capacity(128);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("FrameSpec with mixed address families"),
        };
        let written = match self.l4 {
            L4Spec::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = TcpHeader::new(sport, dport, 1000, 64240);
                h.fin = flags & 0x01 != 0;
                h.syn = flags & 0x02 != 0;
                h.rst = flags & 0x04 != 0;
                h.psh = flags & 0x08 != 0;
                h.ack = flags & 0x10 != 0;
                if h.ack {
                    h.acknowledgment_number = 1;
                }
                ip.tcp_header(h).write(&mut out, &[])
            }
            L4Spec::Udp { sport, dport } => ip.udp(sport, dport).write(&mut out, &[0; 4]),
            L4Spec::IcmpEcho { id, reply } => match (self.src.is_ipv4(), reply) {
                (true, false) => ip.icmpv4_echo_request(id, 1).write(&mut out, &[0; 4]),
                (true, true) => ip.icmpv4_echo_reply(id, 1).write(&mut out, &[0; 4]),
                (false, false) => ip.icmpv6_echo_request(id, 1).write(&mut out, &[0; 4]),
                (false, true) => ip.icmpv6_echo_reply(id, 1).write(&mut out, &[0; 4]),
            },
        };
        written.expect("writing to a Vec cannot fail");
        if out.len() < MIN_FRAME {
            out.resize(MIN_FRAME, 0);
        }
        out
    }
}

/// Shape of a synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadSpec {
    /// Namespaces.
    pub namespaces: usize,
    /// Pods over all nodes.
    pub pods: usize,
    /// NetworkPolicies.
    pub policies: usize,
    /// Routes in the table (local pods, remote blocks, then random prefixes to fill).
    pub routes: usize,
    /// Pods per node (the first node is the local one).
    pub pods_per_node: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for WorkloadSpec {
    /// The scale: 10,000 pods, 1,000 namespaces, 1,000 policies, 100,000 routes.
    fn default() -> WorkloadSpec {
        WorkloadSpec {
            namespaces: 1000,
            pods: 10_000,
            policies: 1000,
            routes: 100_000,
            pods_per_node: 128,
            seed: 0x000c_e107,
        }
    }
}

/// A local pod of the synthetic node.
#[derive(Clone, Copy, Debug)]
pub struct LocalPod {
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its port (host-side veth).
    pub port: PortId,
    /// The pod's eth0 MAC.
    pub mac: [u8; 6],
    /// The host-side veth MAC (the pod's gateway).
    pub gateway_mac: [u8; 6],
}

/// A generated cluster, compiled for its first node.
#[derive(Debug)]
pub struct Workload {
    /// The cluster objects.
    pub cluster: Cluster,
    /// The compiled snapshot for node `node-0`.
    pub snapshot: Snapshot,
    /// Pods on `node-0`.
    pub local: Vec<LocalPod>,
    /// Addresses of every pod, in cluster order.
    pub pod_ips: Vec<Ipv4Addr>,
}

/// Address of the `k`-th pod: 10.64.0.0/14 upwards.
pub fn pod_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + k as u32)
}

fn mac(kind: u8, n: u32) -> [u8; 6] {
    let b = n.to_be_bytes();
    [0x02, kind, b[0], b[1], b[2], b[3]]
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Generates a cluster and compiles its snapshot (the expensive part of a bench's setup).
pub fn build_workload(spec: &WorkloadSpec) -> Workload {
    let mut rng = Rng::new(spec.seed);
    let namespaces: Vec<Namespace> = (0..spec.namespaces)
        .map(|i| Namespace {
            name: format!("ns-{i}"),
            labels: labels(&[
                ("kubernetes.io/metadata.name", format!("ns-{i}")),
                ("team", format!("team-{}", i % 50)),
                ("env", if i % 3 == 0 { "dev" } else { "prod" }.to_string()),
            ]),
        })
        .collect();
    let per_node = spec.pods_per_node.max(1);
    let pod_ips: Vec<Ipv4Addr> = (0..spec.pods).map(pod_ip).collect();
    let pods: Vec<Pod> = (0..spec.pods)
        .map(|k| {
            let ns = k % spec.namespaces.max(1);
            Pod {
                namespace: format!("ns-{ns}"),
                name: format!("pod-{k}"),
                labels: labels(&[
                    ("app", format!("app-{}", (k / spec.namespaces.max(1)) % 5)),
                    ("tier", if k % 2 == 0 { "fe" } else { "be" }.to_string()),
                ]),
                ips: vec![IpAddr::V4(pod_ips[k])],
                ports: vec![
                    ContainerPort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    ContainerPort {
                        name: Some("alt".into()),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    },
                    ContainerPort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: Protocol::Udp,
                    },
                ],
                host_network: false,
                node: Some(format!("node-{}", k / per_node)),
            }
        })
        .collect();
    let policies: Vec<NetworkPolicy> = (0..spec.policies)
        .map(|i| {
            let ns = i % spec.namespaces.max(1);
            let mut sel = BTreeMap::new();
            sel.insert("app".to_string(), format!("app-{}", i % 5));
            let ingress = vec![Rule {
                peers: vec![
                    Peer::Pods {
                        namespaces: NamespaceScope::PolicyNamespace,
                        pods: LabelSelector {
                            match_labels: [("tier".to_string(), "fe".to_string())].into(),
                            match_expressions: vec![],
                        },
                    },
                    Peer::Pods {
                        namespaces: NamespaceScope::Selector(LabelSelector {
                            match_labels: [("team".to_string(), format!("team-{}", ns % 50))]
                                .into(),
                            match_expressions: vec![],
                        }),
                        pods: LabelSelector::default(),
                    },
                    Peer::IpBlock {
                        cidr: Cidr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16)
                            .expect("valid"),
                        except: vec![],
                    },
                ],
                ports: vec![
                    PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Name("http".into())),
                        end_port: None,
                    },
                    PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(8080)),
                        end_port: Some(8090),
                    },
                    PortSpec {
                        protocol: Protocol::Udp,
                        port: Some(PortRef::Number(53)),
                        end_port: None,
                    },
                ],
            }];
            let egress_isolation = i % 4 == 0;
            let egress = if egress_isolation {
                vec![
                    Rule {
                        peers: vec![Peer::Pods {
                            namespaces: NamespaceScope::Selector(LabelSelector::default()),
                            pods: LabelSelector::default(),
                        }],
                        ports: vec![],
                    },
                    Rule {
                        peers: vec![Peer::IpBlock {
                            cidr: "0.0.0.0/0".parse().expect("valid"),
                            except: vec!["10.0.0.0/8".parse().expect("valid")],
                        }],
                        ports: vec![PortSpec {
                            protocol: Protocol::Tcp,
                            port: Some(PortRef::Number(443)),
                            end_port: None,
                        }],
                    },
                ]
            } else {
                vec![]
            };
            NetworkPolicy {
                namespace: format!("ns-{ns}"),
                name: format!("policy-{i}"),
                pod_selector: LabelSelector {
                    match_labels: sel,
                    match_expressions: vec![],
                },
                ingress_isolation: true,
                egress_isolation,
                ingress,
                egress,
            }
        })
        .collect();
    let cluster = Cluster {
        namespaces,
        pods,
        policies,
    };
    let (policy, _errors) = PolicyTable::compile(
        &cluster,
        &CompileOptions {
            local_node: Some("node-0".into()),
        },
    );

    // Ports: 0 is the uplink, then one per local pod.
    let uplink_mac = mac(0xee, 0);
    let mut ports = vec![Port {
        name: "uplink".into(),
        mac: uplink_mac,
        kind: PortKind::Uplink,
    }];
    let mut routes = RouteTable::new();
    let mut local = Vec::new();
    for (k, &ip) in pod_ips.iter().enumerate().take(per_node) {
        let port = PortId(ports.len() as u16);
        let pod = LocalPod {
            ip,
            port,
            mac: mac(0x0a, k as u32),
            gateway_mac: mac(0xca, k as u32),
        };
        ports.push(Port {
            name: format!("cali{k:011x}"),
            mac: pod.gateway_mac,
            kind: PortKind::Pod {
                endpoint: policy.endpoint(IpAddr::V4(pod.ip)),
                ip4: Some(pod.ip),
                ip6: None,
                pod_mac: Some(pod.mac),
            },
        });
        routes.insert(
            Cidr::host(IpAddr::V4(pod.ip)),
            NextHop {
                kind: HopKind::Port,
                port,
                src_mac: pod.gateway_mac,
                dst_mac: pod.mac,
            },
        );
        local.push(pod);
    }
    // Remote nodes' pod blocks, via each node's MAC on the uplink.
    let block_len = 32 - (per_node.next_power_of_two().trailing_zeros() as u8).min(32);
    let nodes = spec.pods.div_ceil(per_node);
    for n in 1..nodes {
        let base = pod_ip(n * per_node);
        routes.insert(
            Cidr::new(IpAddr::V4(base), block_len).expect("valid"),
            NextHop {
                kind: HopKind::Port,
                port: PortId(0),
                src_mac: uplink_mac,
                dst_mac: mac(0x0b, n as u32),
            },
        );
    }
    let gateway = NextHop {
        kind: HopKind::Port,
        port: PortId(0),
        src_mac: uplink_mac,
        dst_mac: mac(0x0c, 0),
    };
    routes.insert("0.0.0.0/0".parse().expect("valid"), gateway);
    routes.insert(
        "192.168.0.10/32".parse().expect("valid"),
        NextHop {
            kind: HopKind::Host,
            port: PortId(0),
            src_mac: [0; 6],
            dst_mac: [0; 6],
        },
    );
    // Fill with external prefixes (outside 10/8) until the table has the requested size.
    let mut count = local.len() + nodes + 1;
    while count < spec.routes {
        let len = 8 + rng.below(17) as u8;
        let addr = Ipv4Addr::from((11 + rng.below(212) as u32) << 24 | rng.next_u64() as u32 >> 8);
        let prefix = Cidr::new(IpAddr::V4(addr), len).expect("valid");
        routes.insert(prefix, gateway);
        count += 1;
    }
    let snapshot = Snapshot {
        epoch: 1,
        policy,
        routes,
        ports,
        config: PathConfig::default(),
    };
    Workload {
        cluster,
        snapshot,
        local,
        pod_ips,
    }
}

/// A TCP connection between two pods of a workload, as the first packet sees it.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// Source pod (always local: it sends the frames).
    pub src: LocalPod,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

impl Flow {
    /// A frame of this flow, from the source pod, with the given TCP flags.
    pub fn frame(&self, flags: u8) -> Vec<u8> {
        FrameSpec {
            src_mac: self.src.mac,
            dst_mac: self.src.gateway_mac,
            src: IpAddr::V4(self.src.ip),
            dst: IpAddr::V4(self.dst),
            ttl: 64,
            l4: L4Spec::Tcp {
                sport: self.sport,
                dport: self.dport,
                flags,
            },
        }
        .build()
    }
}

/// Picks `n` distinct TCP flows from local pods that the snapshot's policy allows (or denies,
/// with `allowed = false`). Distinct means distinct connections: no two flows share a 5-tuple
/// in either direction. Returns fewer if the cluster has too few such pairs after a bounded
/// search.
pub fn flows(w: &Workload, n: usize, allowed: bool, seed: u64) -> Vec<Flow> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    let mut seen = ahash::AHashSet::with_capacity(n * 2);
    let ports = [80u16, 8080, 8085, 443, 22];
    let mut attempts = 0usize;
    while out.len() < n && attempts < n.saturating_mul(50).max(10_000) {
        attempts += 1;
        let Some(src) = w
            .local
            .get(rng.below(w.local.len() as u64) as usize)
            .copied()
        else {
            break;
        };
        let dst = w.pod_ips[rng.below(w.pod_ips.len() as u64) as usize];
        let dport = ports[rng.below(ports.len() as u64) as usize];
        let sport = 1024 + rng.below(60_000) as u16;
        if dst == src.ip {
            continue;
        }
        let decision = w
            .snapshot
            .policy
            .check(IpAddr::V4(src.ip), IpAddr::V4(dst), 6, Some(dport));
        if (decision == PolicyDecision::Allow) != allowed {
            continue;
        }
        if seen.contains(&(dst, dport, src.ip, sport)) || !seen.insert((src.ip, sport, dst, dport))
        {
            continue;
        }
        out.push(Flow {
            src,
            dst,
            sport,
            dport,
        });
    }
    out
}

impl Workload {
    /// The local pod with this address, if any.
    pub fn local_pod(&self, ip: Ipv4Addr) -> Option<LocalPod> {
        self.local.iter().find(|p| p.ip == ip).copied()
    }
}

impl Flow {
    /// A frame of the reply direction and the port it arrives on: the destination pod's port
    /// when it is local, the uplink (port 0) otherwise.
    pub fn reply_frame(&self, w: &Workload, flags: u8) -> (Vec<u8>, PortId) {
        let (src_mac, dst_mac, port) = match w.local_pod(self.dst) {
            Some(p) => (p.mac, p.gateway_mac, p.port),
            None => (mac(0x0b, 1), mac(0xee, 0), PortId(0)),
        };
        let frame = FrameSpec {
            src_mac,
            dst_mac,
            src: IpAddr::V4(self.dst),
            dst: IpAddr::V4(self.src.ip),
            ttl: 64,
            l4: L4Spec::Tcp {
                sport: self.dport,
                dport: self.sport,
                flags,
            },
        }
        .build();
        (frame, port)
    }
}
