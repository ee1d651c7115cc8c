use super::*;

fn load(yaml: &str) -> Manifests {
    match Manifests::from_texts([(PathBuf::from("m.yaml"), yaml)]) {
        Ok(m) => m,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Loads `yaml` and checks the error message contains every fragment of `expected`.
fn check_err(yaml: &str, expected: &[&str]) {
    match Manifests::from_texts([(PathBuf::from("m.yaml"), yaml)]) {
        Ok(m) => panic!("expected an error containing {expected:?}, got {m:?}"),
        Err(e) => {
            let msg = e.to_string();
            for frag in expected {
                assert!(msg.contains(frag), "{msg:?} should contain {frag:?}");
            }
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  \
         namespace: x\nspec:\n{spec}"
    )
}

const POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec:
  nodeName: n1
  containers:
    - name: c
      ports:
        - {name: http, containerPort: 80}
        - {containerPort: 53, protocol: UDP}
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]
";

#[test]
fn pod_fields_and_kubernetes_defaults() {
    let m = load(POD);
    let pod = &m.cluster.pods[0];
    assert_eq!(pod.namespace, "default");
    assert_eq!(pod.name, "a");
    assert_eq!(pod.labels, labels(&[("app", "web")]));
    assert_eq!(pod.node.as_deref(), Some("n1"));
    assert!(!pod.host_network);
    assert_eq!(
        pod.ips,
        vec![
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(
        pod.ports,
        vec![
            ContainerPort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp
            },
            ContainerPort {
                name: None,
                port: 53,
                protocol: Protocol::Udp
            },
        ]
    );
    // The pod's namespace has no object: one is assumed, with a warning.
    assert_eq!(
        m.cluster.namespaces,
        vec![Namespace {
            name: "default".into(),
            labels: labels(&[(NAMESPACE_NAME_LABEL, "default")]),
        }]
    );
    assert_eq!(m.warnings.len(), 1);
    assert!(m.warnings[0].contains("has no Namespace object"));
    assert_eq!(m.resolve("default/a").unwrap().len(), 2);
    assert!(m.resolve("default/b").unwrap_err().contains("unknown pod"));
    assert!(m.resolve("a").unwrap_err().contains("namespace/pod"));
}

#[test]
fn namespace_gets_its_name_label() {
    let m = load("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n");
    assert_eq!(
        m.cluster.namespaces[0].labels,
        labels(&[("ns", "x"), (NAMESPACE_NAME_LABEL, "x")])
    );
    assert!(m.warnings.is_empty());
}

#[test]
fn policy_types_default_from_rules() {
    // (spec, ingress isolation, egress isolation)
    let cases = [
        ("  podSelector: {}\n", true, false),
        ("  podSelector: {}\n  egress: [{}]\n", true, true),
        ("  podSelector: {}\n  egress: []\n", true, false),
        ("  podSelector: {}\n  policyTypes: [Egress]\n", false, true),
        (
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
            true,
            true,
        ),
    ];
    for (spec, ingress, egress) in cases {
        let m = load(&policy(spec));
        let p = &m.cluster.policies[0];
        assert_eq!(
            (p.ingress_isolation, p.egress_isolation),
            (ingress, egress),
            "{spec}"
        );
    }
}

#[test]
fn peers_and_ports_convert() {
    let m = load(&policy(
        "  podSelector: {matchLabels: {app: web}}
  ingress:
    - from:
        - podSelector: {matchLabels: {pod: a}}
        - namespaceSelector: {matchLabels: {ns: y}}
        - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [z]}]}
          podSelector: {matchExpressions: [{key: pod, operator: Exists}]}
        - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}
      ports:
        - port: 80
        - {protocol: UDP, port: dns}
        - {port: 1000, endPort: 2000}
        - protocol: SCTP
    - {}
",
    ));
    let p = &m.cluster.policies[0];
    let sel = |k: &str, v: &str| LabelSelector {
        match_labels: labels(&[(k, v)]),
        match_expressions: vec![],
    };
    let expr = |k: &str, operator, values: &[&str]| LabelSelector {
        match_labels: Labels::new(),
        match_expressions: vec![Requirement {
            key: k.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    };
    assert_eq!(p.namespace, "x");
    assert_eq!(p.pod_selector, sel("app", "web"));
    assert_eq!(
        p.ingress[0].peers,
        vec![
            Peer::Pods {
                namespaces: NamespaceScope::PolicyNamespace,
                pods: sel("pod", "a")
            },
            Peer::Pods {
                namespaces: NamespaceScope::Selector(sel("ns", "y")),
                pods: LabelSelector::default()
            },
            Peer::Pods {
                namespaces: NamespaceScope::Selector(expr("ns", Operator::In, &["z"])),
                pods: expr("pod", Operator::Exists, &[])
            },
            Peer::IpBlock {
                cidr: "10.0.0.0/16".parse().unwrap(),
                except: vec!["10.0.1.0/24".parse().unwrap()]
            },
        ]
    );
    let port = |protocol, port, end_port| PortSpec {
        protocol,
        port,
        end_port,
    };
    assert_eq!(
        p.ingress[0].ports,
        vec![
            port(Protocol::Tcp, Some(PortRef::Number(80)), None),
            port(Protocol::Udp, Some(PortRef::Name("dns".into())), None),
            port(Protocol::Tcp, Some(PortRef::Number(1000)), Some(2000)),
            port(Protocol::Sctp, None, None),
        ]
    );
    // `- {}`: a rule with neither `from` nor `ports` matches everything.
    assert_eq!(p.ingress[1], Rule::default());
}

#[test]
fn invalid_objects_name_file_object_and_problem() {
    let cases: &[(&str, &[&str])] = &[
        (
            "  ingress: [{ports: [{protocol: ICMP}]}]\n",
            &["m.yaml document 1", "NetworkPolicy x/p", "\"ICMP\""],
        ),
        (
            "  ingress: [{ports: [{port: 70000}]}]\n",
            &["spec.ingress[0].ports[0]", "70000 out of range"],
        ),
        (
            "  ingress: [{ports: [{port: 0}]}]\n",
            &["port 0 out of range"],
        ),
        (
            "  ingress: [{ports: [{port: http, endPort: 90}]}]\n",
            &["endPort 90 needs a numeric port"],
        ),
        (
            "  ingress: [{ports: [{endPort: 90}]}]\n",
            &["endPort 90 needs a numeric port"],
        ),
        (
            "  ingress: [{ports: [{port: 100, endPort: 90}]}]\n",
            &["endPort 90 must be in 100..=65535"],
        ),
        (
            "  ingress: [{ports: [{port: 'HTTP'}]}]\n",
            &["\"HTTP\" is neither a number nor a valid port name"],
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
            &["spec.ingress[0].from[0].ipBlock", "10.0.0.0/33"],
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: banana}}]}]\n",
            &["ipBlock", "banana"],
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]\n",
            &["except \"10.1.0.0/24\" is not strictly inside cidr"],
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]\n",
            &["not strictly inside"],
        ),
        (
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
            &["spec.egress[0].to[0]", "cannot be combined"],
        ),
        (
            "  ingress: [{from: [{}]}]\n",
            &["needs podSelector, namespaceSelector or ipBlock"],
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: Like, values: [b]}]}\n",
            &["spec.podSelector", "\"Like\""],
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
            &["operator In on key \"a\" needs values"],
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: NotIn, values: []}]}\n",
            &["NotIn", "needs values"],
        ),
        (
            "  ingress: [{from: [{namespaceSelector: {matchExpressions: \
             [{key: a, operator: Exists, values: [b]}]}}]}]\n",
            &[
                "namespaceSelector",
                "Exists on key \"a\" must not have values",
            ],
        ),
        (
            "  policyTypes: [Sideways]\n",
            &["policyTypes", "\"Sideways\""],
        ),
        ("  podSelector: 7\n", &["NetworkPolicy x/p"]),
    ];
    for (spec, expected) in cases {
        check_err(&policy(spec), expected);
    }
}

#[test]
fn invalid_pods_and_documents() {
    let pod = |extra: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\n{extra}")
    };
    let cases: &[(String, &[&str])] = &[
        (
            pod("spec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.300}\n"),
            &["Pod x/a", "pod IP \"10.0.0.300\" is not an IP address"],
        ),
        (
            pod("spec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n"),
            &["containerPort 0 out of range"],
        ),
        (
            pod("spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: tcp}]}]}\n"),
            &["protocol \"tcp\""],
        ),
        (
            format!("{}---\n{}", pod(""), pod("")),
            &[
                "m.yaml document 2 (Pod x/a): duplicate object",
                "first defined at m.yaml document 1",
            ],
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n".to_owned(),
            &["missing metadata.name"],
        ),
        (
            "apiVersion: v1\nmetadata: {name: a}\n".to_owned(),
            &["missing `kind`"],
        ),
        ("- 1\n- 2\n".to_owned(), &["must be an object"]),
        (
            "kind: Pod\n  bad: [indent\n".to_owned(),
            &["m.yaml document 1: not valid YAML"],
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Namespace\n    \
             metadata: {name: x, labels: 3}\n"
                .to_owned(),
            &["m.yaml document 1 item 1 (Namespace x)"],
        ),
    ];
    for (yaml, expected) in cases {
        check_err(yaml, expected);
    }
}

#[test]
fn lists_json_and_unknown_kinds() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: x}}
  - {apiVersion: v1, kind: Service, metadata: {name: s, namespace: x}}
---
apiVersion: v1
kind: NamespaceList
items: [{apiVersion: v1, kind: Namespace, metadata: {name: w}}]
---
{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
"#;
    let m = load(yaml);
    let names: Vec<_> = m.cluster.namespaces.iter().map(|n| &n.name).collect();
    assert_eq!(names, ["x", "w", "y"]);
    assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
    assert!(m.warnings[0].contains("document 1 item 2 (Service x/s): skipped"));
    assert!(m.warnings[1].contains("document 4 (Deployment default/d): skipped"));
}

const LEGACY_NS: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: iso
  annotations: {net.alpha.kubernetes.io/network-isolation: 'yes'}
---
apiVersion: v1
kind: Namespace
metadata: {name: open}
";

fn legacy_policy(ns: &str) -> String {
    format!(
        "---
kind: NetworkPolicy
apiVersion: net.alpha.kubernetes.io/v1alpha1
metadata: {{namespace: {ns}, name: lp}}
spec:
  podSelector:
    tier: backend
  ingress:
    - from:
        - pods: {{tier: frontend}}
        - namespaces: {{role: ui}}
      ports:
        - {{protocol: TCP, port: 6379}}
"
    )
}

#[test]
fn legacy_policies_in_isolated_namespaces_translate() {
    let m = load(&format!("{LEGACY_NS}{}", legacy_policy("iso")));
    let sel = |k: &str, v: &str| LabelSelector {
        match_labels: labels(&[(k, v)]),
        match_expressions: vec![],
    };
    assert_eq!(
        m.cluster.policies,
        vec![
            NetworkPolicy {
                namespace: "iso".into(),
                name: LEGACY_ISOLATION_POLICY.into(),
                ingress_isolation: true,
                ..NetworkPolicy::default()
            },
            NetworkPolicy {
                namespace: "iso".into(),
                name: "lp".into(),
                pod_selector: sel("tier", "backend"),
                ingress_isolation: true,
                egress_isolation: false,
                ingress: vec![Rule {
                    peers: vec![
                        Peer::Pods {
                            namespaces: NamespaceScope::PolicyNamespace,
                            pods: sel("tier", "frontend"),
                        },
                        Peer::Pods {
                            namespaces: NamespaceScope::Selector(sel("role", "ui")),
                            pods: LabelSelector::default(),
                        },
                    ],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(6379)),
                        end_port: None,
                    }],
                }],
                egress: vec![],
            },
        ]
    );
    assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
    assert!(m.warnings[0].contains("deprecated annotation"));
    assert!(m.warnings[1].contains("deprecated net.alpha.kubernetes.io/v1alpha1 policy"));
}

#[test]
fn legacy_policies_elsewhere_are_skipped() {
    let m = load(&format!("{LEGACY_NS}{}", legacy_policy("open")));
    // Only the isolation of `iso` remains; the policy in `open` would isolate pods in v1.
    assert_eq!(m.cluster.policies.len(), 1);
    assert_eq!(m.cluster.policies[0].namespace, "iso");
    assert!(m.warnings[1].contains("skipped: namespace \"open\" is not annotated"));
}

#[test]
fn legacy_errors() {
    let cases: &[(String, &[&str])] = &[
        (
            format!(
                "{LEGACY_NS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{namespace: iso, name: lp}}\n{}",
                legacy_policy("iso")
            ),
            &[
                "document 4",
                "iso/lp): duplicate object",
                "first defined at m.yaml document 3",
            ],
        ),
        (
            format!(
                "{LEGACY_NS}---\nkind: NetworkPolicy\napiVersion: {LEGACY_API_VERSION}\n\
                 metadata: {{namespace: iso, name: lp}}\n\
                 spec: {{ingress: [{{from: [{{pods: {{a: b}}, namespaces: {{c: d}}}}]}}]}}\n"
            ),
            &["lp", "exactly one of pods, namespaces"],
        ),
        (
            format!(
                "{LEGACY_NS}---\nkind: NetworkPolicy\napiVersion: {LEGACY_API_VERSION}\n\
                 metadata: {{namespace: iso, name: lp}}\nspec: {{egress: []}}\n"
            ),
            &["iso/lp", "unknown field `egress`"],
        ),
        (
            format!(
                "{LEGACY_NS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{namespace: iso, name: {LEGACY_ISOLATION_POLICY}}}\n"
            ),
            &["iso/legacy-isolation", "reserved"],
        ),
    ];
    for (yaml, expected) in cases {
        check_err(yaml, expected);
    }
}

#[test]
fn load_dir_reads_manifest_files_sorted_and_not_recursively() {
    let dir = std::env::temp_dir().join(format!("ocelot-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let ns = |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
    std::fs::write(dir.join("b.yml"), ns("b")).unwrap();
    std::fs::write(dir.join("a.yaml"), ns("a")).unwrap();
    std::fs::write(
        dir.join("c.json"),
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"c"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("d.txt"), ns("d")).unwrap();
    std::fs::write(dir.join("sub/e.yaml"), ns("e")).unwrap();
    let m = load_dir(&dir);
    let missing = load_dir(&dir.join("missing"));
    std::fs::remove_dir_all(&dir).unwrap();
    let names: Vec<_> = m
        .unwrap()
        .cluster
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(missing.unwrap_err().to_string().contains("cannot read"));
}

/// Loads one Node document with `spec` and `status` (block YAML at column 0) and checks what
/// is kept of it.
fn check_node(spec: &str, status: &str, cidrs: &[&str], ips: &[&str]) {
    let indent = |s: &str| s.lines().map(|l| format!("  {l}\n")).collect::<String>();
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nspec:\n{}status:\n{}",
        indent(spec),
        indent(status)
    );
    let m = load(&yaml);
    let expected = NodeInfo {
        name: "n1".to_owned(),
        pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
        internal_ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
    };
    assert_eq!(m.nodes, vec![expected], "{yaml}");
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
}

#[test]
fn nodes_keep_pod_cidrs_and_internal_ips() {
    check_node("{}", "{}", &[], &[]);
    check_node(
        "podCIDR: 10.0.1.0/24\npodCIDRs: [10.0.1.0/24, 'fd00:1::/64']",
        "addresses:\n- {type: Hostname, address: n1}\n- {type: InternalIP, address: 192.168.0.1}\n\
         - {type: ExternalIP, address: 203.0.113.1}\n- {type: InternalIP, address: 'fd00::1'}",
        &["10.0.1.0/24", "fd00:1::/64"],
        &["192.168.0.1", "fd00::1"],
    );
    // Clusters from before dual-stack set only the singular field.
    check_node("podCIDR: 10.0.2.0/24", "{}", &["10.0.2.0/24"], &[]);
}

#[test]
fn invalid_nodes_name_the_field() {
    check_err(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.0.1.0/33]}",
        &["(Node n1)", "spec.podCIDRs", "10.0.1.0/33"],
    );
    check_err(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, \
         address: nope}]}",
        &["(Node n1)", "InternalIP \"nope\""],
    );
}
