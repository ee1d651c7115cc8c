//! Policy compilation and the packet-path check on a large synthetic cluster.
//!
//! The cluster: 1,000 namespaces (team / env / name labels), 10 pods each (frontend ×3,
//! backend ×3, db ×2, cache ×2 with app / tier / version labels and named ports), and one
//! policy per namespace, cycling through four shapes real clusters use: db ingress from the
//! backend and from monitoring namespaces; backend ingress from the frontend plus egress to
//! the db, DNS and the internet outside the cluster (ipBlock with except); frontend ingress
//! from anywhere on 80/443 and from gateways in prod namespaces; namespace default-deny with
//! same-namespace allow. Probes check that the allowed and denied pairs really are, against
//! the reference walk, before timing them.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use classifier::net::Cidr;
use classifier::policy::reference;
use classifier::policy::{
    Cluster, CompileOptions, ContainerPort, LabelSelector, Labels, Namespace, NamespaceScope,
    NetworkPolicy, Operator, Peer, Pod, PolicyDecision, PolicyTable, PortRef, PortSpec, Protocol,
    Requirement, Rule,
};
use criterion::{Criterion, criterion_group, criterion_main};

const NAMESPACES: u32 = 1_000;
const PODS_PER_NS: u32 = 10;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

/// Namespace 0 is kube-system, where the cluster DNS runs.
fn ns_name(n: u32) -> String {
    if n == 0 {
        "kube-system".into()
    } else {
        format!("ns-{n}")
    }
}

/// Address of pod `p` of namespace `n`.
fn pod_ip(n: u32, p: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n * 16 + p))
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

fn pods_here(pairs: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::PolicyNamespace,
        pods: sel(pairs),
    }
}

fn pods_where(ns: &[(&str, &str)], pods: &[(&str, &str)]) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Selector(sel(ns)),
        pods: sel(pods),
    }
}

fn policy(n: u32) -> NetworkPolicy {
    let base = NetworkPolicy {
        namespace: ns_name(n),
        name: format!("policy-{n}"),
        ..NetworkPolicy::default()
    };
    let rule = |peers, ports| Rule { peers, ports };
    match n % 4 {
        0 => NetworkPolicy {
            pod_selector: sel(&[("app", "db")]),
            ingress_isolation: true,
            ingress: vec![
                rule(vec![pods_here(&[("app", "backend")])], vec![tcp(5432)]),
                rule(
                    vec![pods_where(&[("team", "monitoring")], &[("app", "prom")])],
                    vec![tcp(9187)],
                ),
            ],
            ..base
        },
        1 => NetworkPolicy {
            pod_selector: sel(&[("app", "backend")]),
            ingress_isolation: true,
            egress_isolation: true,
            ingress: vec![rule(
                vec![pods_here(&[("app", "frontend")])],
                vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Name("http".into())),
                    end_port: None,
                }],
            )],
            egress: vec![
                rule(vec![pods_here(&[("app", "db")])], vec![tcp(5432)]),
                rule(
                    vec![pods_where(
                        &[("kubernetes.io/metadata.name", "kube-system")],
                        &[("k8s-app", "kube-dns")],
                    )],
                    vec![PortSpec {
                        protocol: Protocol::Udp,
                        port: Some(PortRef::Number(53)),
                        end_port: None,
                    }],
                ),
                rule(
                    vec![Peer::IpBlock {
                        cidr: "0.0.0.0/0".parse::<Cidr>().unwrap(),
                        except: vec!["10.0.0.0/8".parse().unwrap()],
                    }],
                    vec![tcp(443)],
                ),
            ],
            ..base
        },
        2 => NetworkPolicy {
            pod_selector: sel(&[("app", "frontend")]),
            ingress_isolation: true,
            ingress: vec![
                rule(vec![], vec![tcp(80), tcp(443)]),
                rule(
                    vec![pods_where(&[("env", "prod")], &[("app", "gateway")])],
                    vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(8000)),
                        end_port: Some(8100),
                    }],
                ),
            ],
            ..base
        },
        _ => NetworkPolicy {
            pod_selector: LabelSelector::default(),
            ingress_isolation: true,
            ingress: vec![rule(vec![pods_here(&[])], vec![])],
            ..base
        },
    }
}

/// App, tier and the named port of pod `p` in its namespace.
fn role(p: u32) -> (&'static str, &'static str, u16) {
    match p {
        0..=2 => ("frontend", "fe", 8080),
        3..=5 => ("backend", "be", 8080),
        6..=7 => ("db", "data", 5432),
        _ => ("cache", "data", 6379),
    }
}

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    for n in 0..NAMESPACES {
        let env = ["prod", "staging", "dev"][(n % 3) as usize];
        let team = if n % 100 == 7 {
            "monitoring".to_string()
        } else {
            format!("team-{}", n % 50)
        };
        let name = ns_name(n);
        c.namespaces.push(Namespace {
            labels: labels(&[
                ("kubernetes.io/metadata.name", &name),
                ("env", env),
                ("team", &team),
            ]),
            name,
        });
        for p in 0..PODS_PER_NS {
            let (app, tier, port) = role(p);
            // A few namespaces run the cluster-wide services the policies name.
            let app = match (n, n % 100, p) {
                (0, _, 9) => "kube-dns",
                (_, 7, 9) => "prom",
                (_, 11, 9) => "gateway",
                _ => app,
            };
            let mut l = labels(&[("app", app), ("tier", tier), ("version", "v1")]);
            if app == "kube-dns" {
                l.insert("k8s-app".into(), "kube-dns".into());
            }
            c.pods.push(Pod {
                namespace: ns_name(n),
                name: format!("{app}-{p}"),
                labels: l,
                ips: vec![pod_ip(n, p)],
                ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port,
                    protocol: Protocol::Tcp,
                }],
                host_network: false,
                node: Some(format!("node-{}", (n * PODS_PER_NS + p) % 100)),
            });
        }
        c.policies.push(policy(n));
    }
    c
}

/// The cluster with one extra peer per policy that selects by `NotIn` only.
fn with_unindexable_peers(cluster: &Cluster) -> Cluster {
    let mut c = cluster.clone();
    for (i, p) in c.policies.iter_mut().enumerate() {
        let peer = Peer::Pods {
            namespaces: NamespaceScope::Selector(LabelSelector::default()),
            pods: LabelSelector {
                match_labels: Labels::new(),
                match_expressions: vec![Requirement {
                    key: "app".into(),
                    operator: Operator::NotIn,
                    values: vec![format!("app-{i}")],
                }],
            },
        };
        p.ingress.push(Rule {
            peers: vec![peer],
            ports: vec![tcp(9)],
        });
    }
    c
}

fn bench(c: &mut Criterion) {
    let cluster = cluster();
    let all = CompileOptions::default();
    let node = CompileOptions {
        local_node: Some("node-3".into()),
    };

    let mut g = c.benchmark_group("policy_compile");
    g.sample_size(10);
    g.bench_function("10k_pods_1k_ns_1k_policies_all_local", |b| {
        b.iter(|| PolicyTable::compile(black_box(&cluster), &all))
    });
    g.bench_function("10k_pods_1k_ns_1k_policies_one_node", |b| {
        b.iter(|| PolicyTable::compile(black_box(&cluster), &node))
    });
    // Worst case for selector resolution: every policy also has a distinct peer that no
    // label index can narrow (`NotIn` across all namespaces), so each is a full scan.
    let scans = with_unindexable_peers(&cluster);
    g.bench_function("10k_pods_1k_ns_1k_policies_unindexable_peers", |b| {
        b.iter(|| PolicyTable::compile(black_box(&scans), &all))
    });
    g.finish();

    let (table, errors) = PolicyTable::compile(&cluster, &all);
    assert!(errors.is_empty());
    eprintln!("policy stats: {:?}", table.stats());

    // (name, src, dst, proto, dport, expected)
    let probes = [
        // ns-1: backend (kind 1) reaching its db on 5432: egress rule by identity set.
        (
            "egress_allowed",
            pod_ip(1, 3),
            pod_ip(1, 6),
            6,
            Some(5432),
            PolicyDecision::Allow,
        ),
        // ns-1: frontend to backend's named port "http" (8080).
        (
            "ingress_named_allowed",
            pod_ip(1, 0),
            pod_ip(1, 3),
            6,
            Some(8080),
            PolicyDecision::Allow,
        ),
        // ns-4: db ingress from prometheus in a monitoring namespace.
        (
            "ingress_ns_selector_allowed",
            pod_ip(7, 9),
            pod_ip(4, 6),
            6,
            Some(9187),
            PolicyDecision::Allow,
        ),
        // ns-4: db ingress from a frontend: denied after walking every entry.
        (
            "ingress_denied",
            pod_ip(4, 0),
            pod_ip(4, 6),
            6,
            Some(5432),
            PolicyDecision::DenyIngress,
        ),
        // ns-1: backend to a cluster address on 443 (excepted from the ipBlock).
        (
            "egress_denied",
            pod_ip(1, 3),
            pod_ip(2, 0),
            6,
            Some(443),
            PolicyDecision::DenyEgress,
        ),
        // Unisolated pods (ns-2 cache to ns-6 cache): the common fast path.
        (
            "unisolated_allowed",
            pod_ip(2, 8),
            pod_ip(6, 8),
            6,
            Some(6379),
            PolicyDecision::Allow,
        ),
    ];
    let mut g = c.benchmark_group("policy_check");
    for (name, src, dst, proto, dport, expected) in probes {
        assert_eq!(
            reference::allowed(&cluster, src, dst, proto, dport),
            expected,
            "{name}"
        );
        assert_eq!(table.check(src, dst, proto, dport), expected, "{name}");
        g.bench_function(format!("check/{name}"), |b| {
            b.iter(|| table.check(black_box(src), black_box(dst), proto, black_box(dport)))
        });
        let (s, d) = (table.endpoint(src), table.endpoint(dst));
        g.bench_function(format!("check_endpoints/{name}"), |b| {
            b.iter(|| {
                table.check_endpoints(
                    black_box(s),
                    src,
                    black_box(d),
                    dst,
                    proto,
                    black_box(dport),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
