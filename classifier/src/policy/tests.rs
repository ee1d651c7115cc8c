//! Tests of the compiled policy table against Kubernetes semantics and the reference walk.
//!
//! Every expectation is checked twice: against [`PolicyTable`] and against
//! [`reference::allowed_on_node`], so the unit tests pin the reference to the Kubernetes
//! documentation and the property test pins the table to the reference.

use std::net::IpAddr;

use proptest::prelude::*;

use super::compile::{CompileOptions, PolicyCompiler, PolicyDecision, PolicyTable};
use super::model::*;
use super::reference;
use crate::net::Cidr;

use PolicyDecision::{Allow, DenyEgress, DenyIngress};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;

fn labels(s: &str) -> Labels {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A selector from `k=v,...` match labels.
fn sel(s: &str) -> LabelSelector {
    LabelSelector {
        match_labels: labels(s),
        match_expressions: Vec::new(),
    }
}

/// A selector with one requirement.
fn expr(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn pods_in_ns(pods: &str) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::PolicyNamespace,
        pods: sel(pods),
    }
}

fn pods_in(ns: &str, pods: &str) -> Peer {
    Peer::Pods {
        namespaces: NamespaceScope::Selector(sel(ns)),
        pods: sel(pods),
    }
}

fn block(c: &str, except: &[&str]) -> Peer {
    Peer::IpBlock {
        cidr: cidr(c),
        except: except.iter().map(|e| cidr(e)).collect(),
    }
}

fn port(protocol: Protocol, p: u16) -> PortSpec {
    PortSpec {
        protocol,
        port: Some(PortRef::Number(p)),
        end_port: None,
    }
}

fn range(protocol: Protocol, p: u16, end: u16) -> PortSpec {
    PortSpec {
        protocol,
        port: Some(PortRef::Number(p)),
        end_port: Some(end),
    }
}

fn named(protocol: Protocol, name: &str) -> PortSpec {
    PortSpec {
        protocol,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn all_ports(protocol: Protocol) -> PortSpec {
    PortSpec {
        protocol,
        port: None,
        end_port: None,
    }
}

fn rule(peers: Vec<Peer>, ports: Vec<PortSpec>) -> Rule {
    Rule { peers, ports }
}

fn ingress(ns: &str, name: &str, pods: LabelSelector, rules: Vec<Rule>) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: pods,
        ingress_isolation: true,
        egress_isolation: false,
        ingress: rules,
        egress: Vec::new(),
    }
}

fn egress(ns: &str, name: &str, pods: LabelSelector, rules: Vec<Rule>) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pod_selector: pods,
        ingress_isolation: false,
        egress_isolation: true,
        ingress: Vec::new(),
        egress: rules,
    }
}

fn pod(ns: &str, name: &str, l: &str, ips: &[&str], ports: &[(&str, u16)]) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(l),
        ips: ips.iter().map(|s| ip(s)).collect(),
        ports: ports
            .iter()
            .map(|(n, p)| ContainerPort {
                name: Some(n.to_string()),
                port: *p,
                protocol: Protocol::Tcp,
            })
            .collect(),
        host_network: false,
        node: Some("n1".into()),
    }
}

// Addresses of the base cluster.
const WEB: &str = "10.0.0.1";
const DB: &str = "10.0.0.2";
const DEV_WEB: &str = "10.0.0.3";
const PROM: &str = "10.0.0.4";
const HOST: &str = "10.0.0.5";
const EXTERNAL: &str = "192.168.1.1";

/// Three namespaces, four pod endpoints, a hostNetwork pod and a pod without an address.
fn base(policies: Vec<NetworkPolicy>) -> Cluster {
    let ns = |name: &str, l: &str| Namespace {
        name: name.into(),
        labels: labels(l),
    };
    let mut host = pod("prod", "host-agent", "app=web,tier=fe", &[HOST], &[]);
    host.host_network = true;
    Cluster {
        namespaces: vec![
            ns("prod", "team=a,env=prod"),
            ns("dev", "team=b,env=dev"),
            ns("mon", "team=ops"),
        ],
        pods: vec![
            pod(
                "prod",
                "web",
                "app=web,tier=fe",
                &[WEB],
                &[("http", 80), ("metrics", 9090)],
            ),
            pod("prod", "db", "app=db,tier=be", &[DB], &[("sql", 5432)]),
            pod(
                "dev",
                "web",
                "app=web,tier=fe",
                &[DEV_WEB],
                &[("http", 8080)],
            ),
            pod("mon", "prom", "app=prom", &[PROM], &[]),
            host,
            pod("prod", "pending", "app=web,tier=fe", &[], &[]),
        ],
        policies,
    }
}

/// A connection attempt and its expected decision.
type Probe<'s> = (&'s str, &'s str, u8, Option<u16>, PolicyDecision);

/// Checks every probe against the compiled table and the reference, on `node`.
fn check_on(cluster: &Cluster, node: Option<&str>, probes: &[Probe<'_>]) {
    let opts = CompileOptions {
        local_node: node.map(str::to_string),
    };
    let (table, _) = PolicyTable::compile(cluster, &opts);
    for &(src, dst, proto, dport, expected) in probes {
        let (s, d) = (ip(src), ip(dst));
        let want = format!("{src} -> {dst} proto {proto} port {dport:?}");
        assert_eq!(
            reference::allowed_on_node(cluster, node, s, d, proto, dport),
            expected,
            "reference: {want}"
        );
        assert_eq!(table.check(s, d, proto, dport), expected, "table: {want}");
    }
}

fn check(cluster: &Cluster, probes: &[Probe<'_>]) {
    check_on(cluster, None, probes);
}

#[test]
fn no_policy_allows_everything() {
    check(
        &base(vec![]),
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (EXTERNAL, DB, ICMP, None, Allow),
            (DB, EXTERNAL, UDP, Some(53), Allow),
        ],
    );
}

#[test]
fn deny_all_ingress_isolates_only_its_namespace() {
    let c = base(vec![ingress("prod", "deny", sel(""), vec![])]);
    check(
        &c,
        &[
            (PROM, WEB, TCP, Some(80), DenyIngress),
            (WEB, DB, TCP, Some(5432), DenyIngress),
            (EXTERNAL, DB, ICMP, None, DenyIngress),
            // Egress of isolated pods stays open, and other namespaces are untouched.
            (WEB, DEV_WEB, TCP, Some(8080), Allow),
            (WEB, EXTERNAL, TCP, Some(443), Allow),
            (PROM, DEV_WEB, TCP, Some(8080), Allow),
        ],
    );
}

#[test]
fn allow_all_rule_matches_every_peer_and_protocol() {
    let c = base(vec![ingress(
        "prod",
        "all",
        sel(""),
        vec![rule(vec![], vec![])],
    )]);
    check(
        &c,
        &[
            (PROM, WEB, TCP, Some(80), Allow),
            (EXTERNAL, DB, ICMP, None, Allow),
            (HOST, DB, 47, None, Allow),
        ],
    );
}

#[test]
fn pod_selector_peer_stays_in_policy_namespace() {
    let c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(vec![pods_in_ns("app=web")], vec![])],
    )]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (DEV_WEB, DB, TCP, Some(5432), DenyIngress),
            (PROM, DB, TCP, Some(5432), DenyIngress),
            // hostNetwork pods are never pod peers, even with matching labels.
            (HOST, DB, TCP, Some(5432), DenyIngress),
            (EXTERNAL, DB, TCP, Some(5432), DenyIngress),
            // The policy selects db only.
            (PROM, WEB, TCP, Some(80), Allow),
        ],
    );
}

#[test]
fn namespace_selector_peer() {
    let c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(vec![pods_in("team=ops", "")], vec![])],
    )]);
    check(
        &c,
        &[
            (PROM, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(5432), DenyIngress),
            (DEV_WEB, DB, TCP, Some(5432), DenyIngress),
        ],
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_two_peers_is_or() {
    let and = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(vec![pods_in("env=dev", "app=web")], vec![])],
    )]);
    check(
        &and,
        &[
            (DEV_WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(5432), DenyIngress),
            (PROM, DB, TCP, Some(5432), DenyIngress),
        ],
    );
    let or = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(
            vec![pods_in("env=dev", ""), pods_in_ns("app=web")],
            vec![],
        )],
    )]);
    check(
        &or,
        &[
            (DEV_WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(5432), Allow),
            (PROM, DB, TCP, Some(5432), DenyIngress),
        ],
    );
}

#[test]
fn match_expressions_select_peers() {
    let with = |pods: LabelSelector| {
        base(vec![ingress(
            "prod",
            "db",
            sel("app=db"),
            vec![rule(
                vec![Peer::Pods {
                    namespaces: NamespaceScope::Selector(sel("")),
                    pods,
                }],
                vec![],
            )],
        )])
    };
    let probes = |web: PolicyDecision, prom: PolicyDecision| {
        [
            (WEB, DB, TCP, Some(5432), web),
            (DEV_WEB, DB, TCP, Some(5432), web),
            (PROM, DB, TCP, Some(5432), prom),
        ]
    };
    check(
        &with(expr("app", Operator::In, &["web", "x"])),
        &probes(Allow, DenyIngress),
    );
    check(
        &with(expr("app", Operator::NotIn, &["web"])),
        &probes(DenyIngress, Allow),
    );
    check(
        &with(expr("tier", Operator::Exists, &[])),
        &probes(Allow, DenyIngress),
    );
    check(
        &with(expr("tier", Operator::DoesNotExist, &[])),
        &probes(DenyIngress, Allow),
    );
    // Namespace selectors take expressions too.
    let c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(
            vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(expr("env", Operator::DoesNotExist, &[])),
                pods: sel(""),
            }],
            vec![],
        )],
    )]);
    check(&c, &probes(DenyIngress, Allow));
}

#[test]
fn ip_block_with_except_applies_to_pods_and_others() {
    let c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(
            vec![
                block("10.0.0.0/24", &["10.0.0.0/30"]),
                block("192.168.0.0/16", &[]),
            ],
            vec![],
        )],
    )]);
    check(
        &c,
        &[
            // 10.0.0.1 is inside the except.
            (WEB, DB, TCP, Some(5432), DenyIngress),
            (DEV_WEB, DB, TCP, Some(5432), DenyIngress),
            (PROM, DB, TCP, Some(5432), Allow),
            (HOST, DB, TCP, Some(5432), Allow),
            (EXTERNAL, DB, TCP, Some(5432), Allow),
            ("172.16.0.1", DB, TCP, Some(5432), DenyIngress),
            ("fd00::1", DB, TCP, Some(5432), DenyIngress),
        ],
    );
    // Egress ipBlocks match pod destinations as well.
    let c = base(vec![egress(
        "prod",
        "web",
        sel("app=web"),
        vec![rule(vec![block("10.0.0.4/32", &[])], vec![])],
    )]);
    check(
        &c,
        &[
            (WEB, PROM, TCP, Some(9090), Allow),
            (WEB, DB, TCP, Some(5432), DenyEgress),
            (WEB, EXTERNAL, TCP, Some(443), DenyEgress),
        ],
    );
}

#[test]
fn numbered_ranged_and_any_ports_with_protocols() {
    let c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(
            vec![],
            vec![
                port(Protocol::Tcp, 5432),
                range(Protocol::Tcp, 7000, 7010),
                all_ports(Protocol::Udp),
                range(Protocol::Sctp, 9, 9),
            ],
        )],
    )]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(5433), DenyIngress),
            (WEB, DB, TCP, Some(6999), DenyIngress),
            (WEB, DB, TCP, Some(7000), Allow),
            (WEB, DB, TCP, Some(7010), Allow),
            (WEB, DB, TCP, Some(7011), DenyIngress),
            (WEB, DB, UDP, Some(1), Allow),
            (WEB, DB, UDP, Some(65535), Allow),
            (WEB, DB, SCTP, Some(9), Allow),
            (WEB, DB, SCTP, Some(5432), DenyIngress),
            // A rule with ports never matches a packet without one, nor another protocol.
            (WEB, DB, UDP, None, DenyIngress),
            (WEB, DB, ICMP, None, DenyIngress),
            (WEB, DB, 47, None, DenyIngress),
        ],
    );
}

#[test]
fn named_ports_resolve_against_the_destination() {
    // Ingress: the selected pod's own ports. prod/web names 80 "http"; dev/web names 8080.
    let c = base(vec![
        ingress(
            "prod",
            "web",
            sel("app=web"),
            vec![rule(
                vec![],
                vec![
                    named(Protocol::Tcp, "http"),
                    named(Protocol::Udp, "metrics"),
                ],
            )],
        ),
        ingress(
            "dev",
            "web",
            sel("app=web"),
            vec![rule(vec![], vec![named(Protocol::Tcp, "http")])],
        ),
    ]);
    check(
        &c,
        &[
            (PROM, WEB, TCP, Some(80), Allow),
            (PROM, WEB, TCP, Some(8080), DenyIngress),
            (PROM, WEB, UDP, Some(80), DenyIngress),
            // "metrics" is a TCP port; the rule names it for UDP.
            (PROM, WEB, UDP, Some(9090), DenyIngress),
            (PROM, WEB, TCP, Some(9090), DenyIngress),
            (PROM, DEV_WEB, TCP, Some(8080), Allow),
            (PROM, DEV_WEB, TCP, Some(80), DenyIngress),
        ],
    );
    // Egress: the destination pod's ports; never a non-pod destination.
    let c = base(vec![egress(
        "prod",
        "web",
        sel("app=web"),
        vec![rule(
            vec![],
            vec![named(Protocol::Tcp, "sql"), named(Protocol::Tcp, "http")],
        )],
    )]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(80), DenyEgress),
            (WEB, DEV_WEB, TCP, Some(8080), Allow),
            (WEB, DEV_WEB, TCP, Some(5432), DenyEgress),
            (WEB, EXTERNAL, TCP, Some(5432), DenyEgress),
            (WEB, HOST, TCP, Some(80), DenyEgress),
            // A pod may reach its own named port through its own egress.
            (WEB, WEB, TCP, Some(80), Allow),
        ],
    );
}

#[test]
fn egress_only_policy_leaves_ingress_open() {
    let c = base(vec![egress(
        "prod",
        "web",
        sel("app=web"),
        vec![rule(
            vec![pods_in_ns("app=db")],
            vec![port(Protocol::Tcp, 5432)],
        )],
    )]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(22), DenyEgress),
            (WEB, PROM, TCP, Some(9090), DenyEgress),
            (WEB, EXTERNAL, UDP, Some(53), DenyEgress),
            (PROM, WEB, TCP, Some(80), Allow),
            (DB, PROM, TCP, Some(9090), Allow),
        ],
    );
}

#[test]
fn policy_types_decide_which_rules_count() {
    let with = |ingress_isolation: bool, egress_isolation: bool| {
        base(vec![NetworkPolicy {
            namespace: "prod".into(),
            name: "web".into(),
            pod_selector: sel("app=web"),
            ingress_isolation,
            egress_isolation,
            ingress: vec![rule(vec![pods_in("team=ops", "")], vec![])],
            egress: vec![rule(vec![pods_in_ns("app=db")], vec![])],
        }])
    };
    let probes = |in_ok: PolicyDecision, out_ok: PolicyDecision| {
        [
            (PROM, WEB, TCP, Some(80), Allow),
            (DEV_WEB, WEB, TCP, Some(80), in_ok),
            (WEB, DB, TCP, Some(5432), Allow),
            (WEB, PROM, TCP, Some(9090), out_ok),
        ]
    };
    check(&with(true, false), &probes(DenyIngress, Allow));
    check(&with(false, true), &probes(Allow, DenyEgress));
    check(&with(true, true), &probes(DenyIngress, DenyEgress));
    check(&with(false, false), &probes(Allow, Allow));
}

#[test]
fn policies_selecting_a_pod_add_up() {
    let c = base(vec![
        ingress(
            "prod",
            "from-web",
            sel("app=db"),
            vec![rule(
                vec![pods_in_ns("app=web")],
                vec![port(Protocol::Tcp, 5432)],
            )],
        ),
        ingress(
            "prod",
            "from-mon",
            sel("tier=be"),
            vec![rule(
                vec![pods_in("team=ops", "")],
                vec![port(Protocol::Tcp, 9187)],
            )],
        ),
        // A deny-all that also selects db takes nothing away.
        ingress("prod", "deny", sel(""), vec![]),
    ]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), Allow),
            (WEB, DB, TCP, Some(9187), DenyIngress),
            (PROM, DB, TCP, Some(9187), Allow),
            (PROM, DB, TCP, Some(5432), DenyIngress),
            (PROM, WEB, TCP, Some(80), DenyIngress),
        ],
    );
}

#[test]
fn egress_is_checked_before_ingress() {
    let c = base(vec![
        egress("prod", "web-out", sel("app=web"), vec![]),
        ingress("prod", "db-in", sel("app=db"), vec![]),
    ]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), DenyEgress),
            (PROM, DB, TCP, Some(5432), DenyIngress),
            (DB, WEB, TCP, Some(80), Allow),
        ],
    );
}

#[test]
fn host_network_and_addressless_pods_are_not_endpoints() {
    let c = base(vec![ingress("prod", "deny", sel(""), vec![])]);
    let (table, errors) = PolicyTable::compile(&c, &CompileOptions::default());
    assert!(errors.is_empty());
    assert_eq!(table.endpoint(ip(HOST)), None);
    let names: Vec<&str> = table.endpoints().map(|(_, i)| i.name.as_str()).collect();
    assert_eq!(names, ["web", "db", "web", "prom"]);
    // The hostNetwork pod is selected by no policy: traffic to it is not policed here.
    check(
        &c,
        &[
            (PROM, HOST, TCP, Some(80), Allow),
            (PROM, WEB, TCP, Some(80), DenyIngress),
        ],
    );
    let ep = table.endpoint(ip(DB)).unwrap();
    let info = table.endpoint_info(ep);
    assert_eq!(
        (info.namespace.as_str(), info.name.as_str()),
        ("prod", "db")
    );
    assert_eq!(info.ips, [ip(DB)]);
    assert!(table.is_local(ep));
    assert_eq!(table.isolation(ep), (true, false));
    let stats = table.stats();
    assert_eq!((stats.endpoints, stats.local_endpoints), (4, 4));
    // web and dev/web share labels but not a namespace.
    assert_eq!(stats.identities, 4);
}

#[test]
fn local_node_scopes_enforcement() {
    let mut c = base(vec![
        ingress("prod", "deny-in", sel(""), vec![]),
        egress("mon", "deny-out", sel(""), vec![]),
    ]);
    for p in &mut c.pods {
        if p.name == "db" || p.name == "prom" {
            p.node = Some("n2".into());
        }
    }
    // On n1, web's ingress is enforced; db's ingress and prom's egress are n2's job.
    check_on(
        &c,
        Some("n1"),
        &[
            (DEV_WEB, WEB, TCP, Some(80), DenyIngress),
            (DEV_WEB, DB, TCP, Some(5432), Allow),
            (PROM, DEV_WEB, TCP, Some(80), Allow),
        ],
    );
    check_on(
        &c,
        Some("n2"),
        &[
            (DEV_WEB, WEB, TCP, Some(80), Allow),
            (DEV_WEB, DB, TCP, Some(5432), DenyIngress),
            (PROM, DEV_WEB, TCP, Some(80), DenyEgress),
        ],
    );
    let opts = CompileOptions {
        local_node: Some("n2".into()),
    };
    let (table, _) = PolicyTable::compile(&c, &opts);
    // Remote pods are still endpoints (peers), just not enforced.
    let web = table.endpoint(ip(WEB)).unwrap();
    assert!(!table.is_local(web));
    assert!(!table.endpoint_info(web).local);
    assert!(table.is_local(table.endpoint(ip(DB)).unwrap()));
}

#[test]
fn compile_errors_fail_closed_for_the_selected_pods_only() {
    let allow_all = |name: &str, ports: Vec<PortSpec>, peers: Vec<Peer>| {
        ingress("prod", name, sel("app=db"), vec![rule(peers, ports)])
    };
    let broken = [
        (
            "named-range",
            "ingress rule 0: endPort 6000 with named port",
            allow_all(
                "x",
                vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Name("sql".into())),
                    end_port: Some(6000),
                }],
                vec![],
            ),
        ),
        (
            "backwards-range",
            "endPort 5000 below port 6000",
            allow_all("x", vec![range(Protocol::Tcp, 6000, 5000)], vec![]),
        ),
        (
            "range-without-port",
            "endPort 6000 without a port",
            allow_all(
                "x",
                vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: None,
                    end_port: Some(6000),
                }],
                vec![],
            ),
        ),
        (
            "except-outside",
            "not a strict subset",
            allow_all("x", vec![], vec![block("10.0.0.0/24", &["10.1.0.0/30"])]),
        ),
        (
            "except-equal",
            "10.0.0.0/24 is not a strict subset of 10.0.0.0/24",
            allow_all("x", vec![], vec![block("10.0.0.0/24", &["10.0.0.0/24"])]),
        ),
        (
            "mixed-family",
            "mixes address families",
            allow_all("x", vec![], vec![block("10.0.0.0/24", &["fd00::/64"])]),
        ),
    ];
    for (what, why, mut bad) in broken {
        bad.name = what.into();
        let c = base(vec![
            bad,
            // A valid policy for db still contributes its allows.
            ingress(
                "prod",
                "ok",
                sel("app=db"),
                vec![rule(vec![pods_in_ns("app=web")], vec![])],
            ),
        ]);
        let (_, errors) = PolicyTable::compile(&c, &CompileOptions::default());
        assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        assert_eq!(
            (errors[0].namespace.as_str(), errors[0].name.as_str()),
            ("prod", what)
        );
        assert!(errors[0].why.contains(why), "{what}: {}", errors[0]);
        assert!(!reference::policy_is_valid(&c.policies[0]), "{what}");
        check(
            &c,
            &[
                (WEB, DB, TCP, Some(5432), Allow),
                (PROM, DB, TCP, Some(5432), DenyIngress),
                (HOST, DB, TCP, Some(5432), DenyIngress),
                (PROM, WEB, TCP, Some(80), Allow),
            ],
        );
    }
    // Alone, a broken policy leaves its pods isolated with nothing allowed.
    let c = base(vec![allow_all(
        "lonely",
        vec![],
        vec![block("10.0.0.0/24", &["fd00::/64"])],
    )]);
    check(
        &c,
        &[
            (WEB, DB, TCP, Some(5432), DenyIngress),
            (DB, WEB, TCP, Some(80), Allow),
        ],
    );
}

#[test]
fn dual_stack_pods_are_one_endpoint() {
    let mut c = base(vec![ingress(
        "prod",
        "db",
        sel("app=db"),
        vec![rule(vec![block("fd00::/64", &["fd00::1/128"])], vec![])],
    )]);
    c.pods[1].ips.push(ip("fd00::2"));
    c.pods[3].ips.push(ip("fd00::4"));
    let (table, _) = PolicyTable::compile(&c, &CompileOptions::default());
    assert_eq!(table.endpoint(ip("fd00::2")), table.endpoint(ip(DB)));
    check(
        &c,
        &[
            ("fd00::4", "fd00::2", TCP, Some(5432), Allow),
            ("fd00::1", "fd00::2", TCP, Some(5432), DenyIngress),
            (PROM, DB, TCP, Some(5432), DenyIngress),
            ("fd00::4", DB, TCP, Some(5432), Allow),
        ],
    );
}

#[test]
fn shared_addresses_belong_to_the_first_pod() {
    let mut c = base(vec![ingress("dev", "deny", sel(""), vec![])]);
    c.pods
        .push(pod("dev", "imposter", "app=web", &[DB], &[("sql", 5432)]));
    let (table, _) = PolicyTable::compile(&c, &CompileOptions::default());
    let ep = table.endpoint(ip(DB)).unwrap();
    assert_eq!(table.endpoint_info(ep).name, "db");
    check(&c, &[(WEB, DB, TCP, Some(5432), Allow)]);
}

#[test]
fn unknown_ids_do_not_panic() {
    let (table, _) = PolicyTable::compile(&base(vec![]), &CompileOptions::default());
    let bogus = super::EndpointId(u32::MAX);
    assert_eq!(table.endpoint_info(bogus).name, "");
    assert!(!table.is_local(bogus));
    assert_eq!(
        table.check_endpoints(Some(bogus), ip(WEB), Some(bogus), ip(DB), TCP, Some(1)),
        Allow
    );
}

#[test]
fn identities_and_tables_are_shared() {
    // Fifty replicas of one deployment: one identity, one table per direction.
    let mut c = base(vec![
        ingress(
            "prod",
            "db",
            sel("app=db"),
            vec![rule(vec![pods_in_ns("app=web")], vec![])],
        ),
        egress("prod", "db-out", sel("app=db"), vec![]),
    ]);
    for i in 0..50 {
        c.pods.push(pod(
            "prod",
            &format!("db-{i}"),
            "app=db,tier=be",
            &[&format!("10.1.0.{i}")],
            &[],
        ));
    }
    let (table, _) = PolicyTable::compile(&c, &CompileOptions::default());
    let stats = table.stats();
    assert_eq!(stats.endpoints, 54);
    assert_eq!(stats.identities, 4);
    assert_eq!(stats.tables, 2);
    assert_eq!(stats.identity_sets, 1);
    check(
        &c,
        &[
            (WEB, "10.1.0.7", TCP, Some(1), Allow),
            (PROM, "10.1.0.7", TCP, Some(1), DenyIngress),
        ],
    );
}

// ---- Property test: the compiled table against the reference walk. ----

const KEYS: [&str; 2] = ["a", "b"];
const VALUES: [&str; 2] = ["x", "y"];
const PORT_NAMES: [&str; 3] = ["p", "q", "r"];
const PORTS: [u16; 3] = [53, 80, 443];

fn arb_labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(str::to_string),
        prop::sample::select(&VALUES[..]).prop_map(str::to_string),
        0..=2,
    )
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    let op = prop::sample::select(vec![
        Operator::In,
        Operator::NotIn,
        Operator::Exists,
        Operator::DoesNotExist,
    ]);
    let req = (
        prop::sample::select(&KEYS[..]),
        op,
        prop::collection::vec(prop::sample::select(&VALUES[..]), 0..=2),
    )
        .prop_map(|(k, operator, values)| Requirement {
            key: k.into(),
            operator,
            values: match operator {
                Operator::In | Operator::NotIn => values.iter().map(|v| v.to_string()).collect(),
                Operator::Exists | Operator::DoesNotExist => Vec::new(),
            },
        });
    (arb_labels(), prop::collection::vec(req, 0..=1)).prop_map(
        |(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        },
    )
}

fn arb_cidr() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        4 => (0u8..9, prop::sample::select(vec![24u8, 29, 30, 31, 32]))
            .prop_map(|(host, len)| Cidr::new(IpAddr::from([10, 0, 0, host]), len).unwrap()),
        1 => Just(cidr("0.0.0.0/0")),
        1 => Just(cidr("192.168.0.0/16")),
        1 => Just(cidr("fd00::/64")),
    ]
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        2 => arb_selector().prop_map(|pods| Peer::Pods {
            namespaces: NamespaceScope::PolicyNamespace,
            pods,
        }),
        2 => (arb_selector(), arb_selector()).prop_map(|(ns, pods)| Peer::Pods {
            namespaces: NamespaceScope::Selector(ns),
            pods,
        }),
        2 => (arb_cidr(), prop::collection::vec(arb_cidr(), 0..=1))
            .prop_map(|(cidr, except)| Peer::IpBlock { cidr, except }),
    ]
}

fn arb_protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(&Protocol::ALL[..])
}

fn arb_port_spec() -> impl Strategy<Value = PortSpec> {
    let port = prop_oneof![
        1 => Just(None),
        2 => prop::sample::select(&PORTS[..]).prop_map(|p| Some(PortRef::Number(p))),
        2 => prop::sample::select(&PORT_NAMES[..]).prop_map(|n| Some(PortRef::Name(n.into()))),
    ];
    let end_port = prop_oneof![3 => Just(None), 1 => Just(Some(80u16)), 1 => Just(Some(500u16))];
    (arb_protocol(), port, end_port).prop_map(|(protocol, port, end_port)| PortSpec {
        protocol,
        port,
        end_port,
    })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(arb_peer(), 0..=2),
        prop::collection::vec(arb_port_spec(), 0..=2),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn ns_name(i: u8) -> String {
    format!("ns{i}")
}

fn arb_policy() -> impl Strategy<Value = NetworkPolicy> {
    (
        0u8..3,
        arb_selector(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(arb_rule(), 0..=2),
        prop::collection::vec(arb_rule(), 0..=2),
    )
        .prop_map(
            |(ns, pod_selector, ingress_isolation, egress_isolation, ingress, egress)| {
                NetworkPolicy {
                    namespace: ns_name(ns),
                    name: "p".into(),
                    pod_selector,
                    ingress_isolation,
                    egress_isolation,
                    ingress,
                    egress,
                }
            },
        )
}

fn arb_pod() -> impl Strategy<Value = Pod> {
    let container_port = (
        prop::option::of(prop::sample::select(&PORT_NAMES[..])),
        prop::sample::select(&PORTS[..]),
        arb_protocol(),
    )
        .prop_map(|(name, port, protocol)| ContainerPort {
            name: name.map(str::to_string),
            port,
            protocol,
        });
    (
        0u8..3,
        arb_labels(),
        prop::collection::vec(0u8..9, 0..=2),
        prop::collection::vec(container_port, 0..=2),
        prop::bool::weighted(0.15),
        prop::sample::select(vec![None, Some("n1"), Some("n2")]),
    )
        .prop_map(|(ns, labels, hosts, ports, host_network, node)| Pod {
            namespace: ns_name(ns),
            name: "pod".into(),
            labels,
            ips: hosts
                .into_iter()
                .map(|h| IpAddr::from([10, 0, 0, h]))
                .collect(),
            ports,
            host_network,
            node: node.map(str::to_string),
        })
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(arb_labels(), 2..=3),
        prop::collection::vec(arb_pod(), 2..=6),
        prop::collection::vec(arb_policy(), 0..=4),
    )
        .prop_map(|(ns_labels, pods, policies)| Cluster {
            // With two namespaces, pods and policies in "ns2" name a namespace with no
            // object, which must behave as one without labels.
            namespaces: ns_labels
                .into_iter()
                .enumerate()
                .map(|(i, labels)| Namespace {
                    name: ns_name(i as u8),
                    labels,
                })
                .collect(),
            pods,
            policies,
        })
}

fn arb_probe() -> impl Strategy<Value = (IpAddr, IpAddr, u8, Option<u16>)> {
    let addr = prop_oneof![
        4 => (0u8..9).prop_map(|h| IpAddr::from([10, 0, 0, h])),
        1 => Just(ip(EXTERNAL)),
        1 => Just(ip("fd00::1")),
    ];
    (
        addr.clone(),
        addr,
        prop::sample::select(vec![TCP, UDP, SCTP, ICMP]),
        prop::sample::select(vec![None, Some(53), Some(80), Some(100), Some(443)]),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn table_agrees_with_reference(
        cluster in arb_cluster(),
        node in prop::sample::select(vec![None, Some("n1")]),
        probes in prop::collection::vec(arb_probe(), 24),
    ) {
        let opts = CompileOptions { local_node: node.map(str::to_string) };
        let (table, errors) = PolicyTable::compile(&cluster, &opts);
        let invalid = cluster.policies.iter().filter(|p| !reference::policy_is_valid(p)).count();
        prop_assert_eq!(errors.len(), invalid);
        for (src, dst, proto, dport) in probes {
            prop_assert_eq!(
                table.check(src, dst, proto, dport),
                reference::allowed_on_node(&cluster, node, src, dst, proto, dport),
                "{} -> {} proto {} port {:?}", src, dst, proto, dport
            );
        }
    }
}

/// A change to the cluster, as the datastore sees one.
#[derive(Clone, Debug)]
enum Event {
    AddPod(Pod),
    ReplacePod(usize, Pod),
    RelabelPod(usize, Labels),
    /// Moves a pod to another node (or none): its locality changes.
    MovePod(usize, Option<&'static str>),
    RemovePod(usize),
    AddPolicy(NetworkPolicy),
    ReplacePolicy(usize, NetworkPolicy),
    RemovePolicy(usize),
    /// Sets a namespace's labels, adding it when absent.
    SetNamespace(u8, Labels),
    /// Adds a policy in namespace `.0` that isolates all its pods both ways and admits only
    /// pods of namespaces labelled `a=.1`: namespace label changes then decide verdicts.
    AddNamespacePolicy(u8, &'static str),
    RemoveNamespace(u8),
    /// Nothing changes (a node event: the same cluster compiled again).
    Nothing,
}

fn arb_event() -> impl Strategy<Value = Event> {
    let named_pod = || {
        (arb_pod(), 0u8..4).prop_map(|(mut p, n)| {
            p.name = format!("pod{n}");
            p
        })
    };
    prop_oneof![
        2 => named_pod().prop_map(Event::AddPod),
        2 => (any::<usize>(), named_pod()).prop_map(|(i, p)| Event::ReplacePod(i, p)),
        3 => (any::<usize>(), arb_labels()).prop_map(|(i, l)| Event::RelabelPod(i, l)),
        1 => (any::<usize>(), prop::sample::select(vec![None, Some("n1"), Some("n2")]))
            .prop_map(|(i, n)| Event::MovePod(i, n)),
        2 => any::<usize>().prop_map(Event::RemovePod),
        2 => arb_policy().prop_map(Event::AddPolicy),
        2 => (any::<usize>(), arb_policy()).prop_map(|(i, p)| Event::ReplacePolicy(i, p)),
        1 => any::<usize>().prop_map(Event::RemovePolicy),
        2 => (0u8..4, arb_labels()).prop_map(|(i, l)| Event::SetNamespace(i, l)),
        2 => (0u8..4, prop::sample::select(vec!["", "x", "y"])).prop_map(|(i, v)| {
            let labels = if v.is_empty() { Labels::new() } else { labels(&format!("a={v}")) };
            Event::SetNamespace(i, labels)
        }),
        1 => (0u8..3, prop::sample::select(vec!["x", "y"]))
            .prop_map(|(i, v)| Event::AddNamespacePolicy(i, v)),
        1 => (0u8..4).prop_map(Event::RemoveNamespace),
        1 => Just(Event::Nothing),
    ]
}

fn apply(c: &mut Cluster, event: &Event) {
    fn at(len: usize, i: usize) -> Option<usize> {
        (len > 0).then(|| i % len)
    }
    match event {
        // Kept sorted by (namespace, name), as the kube datastore keeps them, so that an
        // addition shifts the pods after it.
        Event::AddPod(p) => {
            let at = c
                .pods
                .partition_point(|q| (&q.namespace, &q.name) <= (&p.namespace, &p.name));
            c.pods.insert(at, p.clone());
        }
        Event::ReplacePod(i, p) => {
            if let Some(i) = at(c.pods.len(), *i) {
                c.pods[i] = p.clone();
            }
        }
        Event::RelabelPod(i, l) => {
            if let Some(i) = at(c.pods.len(), *i) {
                c.pods[i].labels = l.clone();
            }
        }
        Event::MovePod(i, n) => {
            if let Some(i) = at(c.pods.len(), *i) {
                c.pods[i].node = n.map(str::to_string);
            }
        }
        Event::RemovePod(i) => {
            if let Some(i) = at(c.pods.len(), *i) {
                c.pods.remove(i);
            }
        }
        Event::AddPolicy(p) => c.policies.push(p.clone()),
        Event::ReplacePolicy(i, p) => {
            if let Some(i) = at(c.policies.len(), *i) {
                c.policies[i] = p.clone();
            }
        }
        Event::RemovePolicy(i) => {
            if let Some(i) = at(c.policies.len(), *i) {
                c.policies.remove(i);
            }
        }
        Event::SetNamespace(i, l) => {
            let name = ns_name(*i);
            match c.namespaces.iter_mut().find(|n| n.name == name) {
                Some(n) => n.labels = l.clone(),
                None => c.namespaces.push(Namespace {
                    name,
                    labels: l.clone(),
                }),
            }
        }
        Event::RemoveNamespace(i) => c.namespaces.retain(|n| n.name != ns_name(*i)),
        Event::AddNamespacePolicy(i, v) => {
            let from = rule(vec![pods_in(&format!("a={v}"), "")], vec![]);
            let mut p = ingress(&ns_name(*i), "ns-policy", sel(""), vec![from.clone()]);
            p.egress_isolation = true;
            p.egress = vec![from];
            c.policies.push(p);
        }
        Event::Nothing => {}
    }
}

/// Every address the generators give pods, plus one outside and one IPv6.
fn probe_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0u8..9).map(|h| IpAddr::from([10, 0, 0, h])).collect();
    out.push(ip(EXTERNAL));
    out.push(ip("fd00::1"));
    out
}

/// Asserts two tables decide every connection the same way and describe every endpoint the
/// same way (their numbering may differ).
fn assert_same_decisions(a: &PolicyTable, b: &PolicyTable) -> Result<(), TestCaseError> {
    let addrs = probe_addresses();
    for &x in &addrs {
        let (ea, eb) = (a.endpoint(x), b.endpoint(x));
        prop_assert_eq!(ea.is_some(), eb.is_some(), "endpoint of {}", x);
        if let (Some(ea), Some(eb)) = (ea, eb) {
            prop_assert_eq!(a.endpoint_info(ea), b.endpoint_info(eb), "info of {}", x);
            prop_assert_eq!(a.isolation(ea), b.isolation(eb), "isolation of {}", x);
            prop_assert_eq!(a.is_local(ea), b.is_local(eb), "locality of {}", x);
        }
    }
    for &src in &addrs {
        for &dst in &addrs {
            for proto in [TCP, UDP, SCTP, ICMP] {
                for dport in [None, Some(53), Some(80), Some(100), Some(443)] {
                    prop_assert_eq!(
                        a.check(src, dst, proto, dport),
                        b.check(src, dst, proto, dport),
                        "{} -> {} proto {} port {:?}",
                        src,
                        dst,
                        proto,
                        dport
                    );
                }
            }
        }
    }
    let (sa, sb) = (a.stats(), b.stats());
    prop_assert_eq!(
        (sa.endpoints, sa.local_endpoints, sa.identities),
        (sb.endpoints, sb.local_endpoints, sb.identities)
    );
    let infos = |t: &PolicyTable| t.endpoints().map(|(_, i)| i.clone()).collect::<Vec<_>>();
    prop_assert_eq!(infos(a), infos(b));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A compiler that keeps its base between compiles gives, after every event of a random
    /// sequence, the table a fresh compile gives.
    #[test]
    fn incremental_compile_equals_a_fresh_one(
        cluster in arb_cluster(),
        node in prop::sample::select(vec![None, Some("n1")]),
        events in prop::collection::vec(arb_event(), 1..10),
    ) {
        let opts = CompileOptions { local_node: node.map(str::to_string) };
        let mut compiler = PolicyCompiler::default();
        let mut cluster = cluster;
        cluster.pods.sort_by(|p, q| (&p.namespace, &p.name).cmp(&(&q.namespace, &q.name)));
        let _ = compiler.compile(&cluster, &opts);
        for event in &events {
            apply(&mut cluster, event);
            let (inc, inc_errors) = compiler.compile(&cluster, &opts);
            let (fresh, fresh_errors) = PolicyTable::compile(&cluster, &opts);
            prop_assert_eq!(inc_errors, fresh_errors);
            assert_same_decisions(&inc, &fresh)?;
        }
    }
}

/// What one change costs the incremental compiler: only the endpoints it touches are derived
/// again, and a change to policies or nodes derives none.
#[test]
fn incremental_compile_derives_only_changed_endpoints() {
    let opts = CompileOptions {
        local_node: Some("n1".into()),
    };
    let mut cluster = base(vec![ingress(
        "prod",
        "p",
        sel("app=db"),
        vec![rule(vec![pods_in("team=c", "")], vec![])],
    )]);
    let mut compiler = PolicyCompiler::default();
    let endpoints = 4;
    let check = |compiler: &mut PolicyCompiler, cluster: &Cluster, rebuilt, derived| {
        let (inc, _) = compiler.compile(cluster, &opts);
        let (fresh, _) = PolicyTable::compile(cluster, &opts);
        assert_same_decisions(&inc, &fresh).expect("same decisions");
        let reuse = compiler.last_reuse();
        assert_eq!(
            (
                reuse.rebuilt,
                reuse.endpoints_derived,
                reuse.endpoints_reused
            ),
            (rebuilt, derived, endpoints - derived),
            "{reuse:?}"
        );
    };
    check(&mut compiler, &cluster, true, endpoints);
    // The same cluster (a node event): nothing derived.
    check(&mut compiler, &cluster, false, 0);
    // A policy added: nothing derived.
    cluster.policies.push(ingress("dev", "q", sel(""), vec![]));
    check(&mut compiler, &cluster, false, 0);
    // One pod relabelled: that pod only.
    cluster.pods[1].labels = labels("app=db,tier=be,rev=1");
    check(&mut compiler, &cluster, false, 1);
    // A namespace's labels: no endpoint derived, and its pods are now admitted.
    assert_eq!(
        compiler
            .compile(&cluster, &opts)
            .0
            .check(ip(DEV_WEB), ip(DB), TCP, Some(80)),
        DenyIngress
    );
    cluster.namespaces[1].labels = labels("team=c");
    check(&mut compiler, &cluster, false, 0);
    assert_eq!(
        compiler
            .compile(&cluster, &opts)
            .0
            .check(ip(DEV_WEB), ip(DB), TCP, Some(80)),
        Allow
    );
    // A namespace added: a rebuild.
    cluster.namespaces.push(Namespace {
        name: "new".into(),
        labels: Labels::new(),
    });
    check(&mut compiler, &cluster, true, endpoints);
}
