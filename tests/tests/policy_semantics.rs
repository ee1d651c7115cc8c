//! Kubernetes NetworkPolicy semantics, as truth tables over the upstream e2e "netpol" model
//! (see `ocelot_tests::netpol`): three namespaces x, y, z, pods a, b, c in each, serving TCP
//! and UDP on 80 and 81.
//!
//! Every case writes the full 9×9 table for a port/protocol the way the e2e suite's
//! `Reachability` does: rows are sources, columns destinations, both in the order
//! `xa xb xc  ya yb yc  za zb zc`; `.` is allowed, `X` denied. The expectations come from the
//! Kubernetes documentation (concepts/services-networking/network-policies and the
//! networking.k8s.io/v1 API reference), not from running the code:
//! - a pod is isolated for ingress (egress) when some policy selecting it has `Ingress`
//!   (`Egress`) in its `policyTypes`; an isolated pod accepts only what the union of those
//!   policies' rules allows, a non-isolated pod everything;
//! - a connection needs both the source's egress and the destination's ingress to allow it;
//! - a rule allows traffic matching any of its peers and any of its ports; a missing or empty
//!   `from`/`to` matches every peer, missing `ports` every port;
//! - a peer with `podSelector` and `namespaceSelector` is their AND; two peers are an OR.
//!
//! The diagonal (a pod to itself) is always allowed: such traffic never leaves the pod's
//! network namespace (the kernel delivers it over loopback), so no dataplane sees it, and
//! `policy verdicts` says so rather than predicting a refusal real traffic would not show.
//! (The upstream suite ignores loopback for the same reason.)

use classifier::policy::model::Protocol::{self, Tcp, Udp};
use ocelot_tests::netpol::{check, policy};

/// Everything allowed.
const ALL: &str = "
xa ... ... ...
xb ... ... ...
xc ... ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
";

/// Nothing reaches x/a; everything else is allowed.
const DENY_TO_XA: &str = "
xa ... ... ...
xb X.. ... ...
xc X.. ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
";

/// x/a reaches nothing; everything else is allowed.
const DENY_FROM_XA: &str = "
xa .XX XXX XXX
xb ... ... ...
xc ... ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
";

/// Checks one policy set against the same grid on TCP 80, TCP 81, UDP 80 and UDP 81.
fn check_all_ports(policies: &str, grid: &str) {
    let tables: Vec<(u16, Protocol, &str)> = [(80, Tcp), (81, Tcp), (80, Udp), (81, Udp)]
        .into_iter()
        .map(|(port, proto)| (port, proto, grid))
        .collect();
    check(policies, &tables);
}

#[test]
fn no_policies_allow_everything() {
    check_all_ports("", ALL);
}

#[test]
fn allow_all_ingress() {
    let p = policy(
        "x",
        "allow-all",
        "
podSelector: {}
ingress:
- {}
",
    );
    check_all_ports(&p, ALL);
}

#[test]
fn default_deny_ingress() {
    let p = policy(
        "x",
        "default-deny-ingress",
        "
podSelector: {}
policyTypes: [Ingress]
",
    );
    check_all_ports(
        &p,
        "
xa .XX ... ...
xb X.X ... ...
xc XX. ... ...
ya XXX ... ...
yb XXX ... ...
yc XXX ... ...
za XXX ... ...
zb XXX ... ...
zc XXX ... ...
",
    );
}

#[test]
fn empty_ingress_list_without_policy_types_denies_ingress() {
    // policyTypes defaults to [Ingress]; `ingress: []` allows nothing.
    let p = policy(
        "x",
        "deny",
        "
podSelector: {matchLabels: {pod: a}}
ingress: []
",
    );
    check_all_ports(&p, DENY_TO_XA);
}

#[test]
fn default_deny_egress() {
    let p = policy(
        "x",
        "default-deny-egress",
        "
podSelector: {}
policyTypes: [Egress]
",
    );
    check_all_ports(
        &p,
        "
xa .XX XXX XXX
xb X.X XXX XXX
xc XX. XXX XXX
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn deny_all_ingress_and_egress() {
    let p = policy(
        "x",
        "deny-all",
        "
podSelector: {}
policyTypes: [Ingress, Egress]
",
    );
    check_all_ports(
        &p,
        "
xa .XX XXX XXX
xb X.X XXX XXX
xc XX. XXX XXX
ya XXX ... ...
yb XXX ... ...
yc XXX ... ...
za XXX ... ...
zb XXX ... ...
zc XXX ... ...
",
    );
}

#[test]
fn pod_selector_peer_is_the_policy_namespace() {
    // `podSelector` alone selects pods of the policy's namespace only: y/b and z/b are out.
    let p = policy(
        "x",
        "allow-xb",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb ... ... ...
xc X.. ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn namespace_selector_peer_is_every_pod_there() {
    let p = policy(
        "x",
        "allow-ns-y",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.. ... ...
xc X.. ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and() {
    let p = policy(
        "x",
        "allow-yb",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: y}}
    podSelector: {matchLabels: {pod: b}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.. ... ...
xc X.. ... ...
ya X.. ... ...
yb ... ... ...
yc X.. ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn pod_and_namespace_selector_in_two_peers_is_or() {
    let p = policy(
        "x",
        "allow-ns-y-or-xb",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: y}}
  - podSelector: {matchLabels: {pod: b}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb ... ... ...
xc X.. ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn match_expressions_in() {
    let p = policy(
        "x",
        "allow-ns-in-y-z",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector:
      matchExpressions:
      - {key: ns, operator: In, values: [y, z]}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.. ... ...
xc X.. ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn match_expressions_not_in() {
    // Every namespace (`{}`), pods whose `pod` label is neither a nor b.
    let p = policy(
        "x",
        "allow-pod-not-a-b",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {}
    podSelector:
      matchExpressions:
      - {key: pod, operator: NotIn, values: [a, b]}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.. ... ...
xc ... ... ...
ya X.. ... ...
yb X.. ... ...
yc ... ... ...
za X.. ... ...
zb X.. ... ...
zc ... ... ...
",
    );
}

#[test]
fn match_expressions_exists() {
    // Every pod of x has a `pod` label; podSelector alone stays in the policy's namespace.
    let p = policy(
        "x",
        "allow-labelled",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - podSelector:
      matchExpressions:
      - {key: pod, operator: Exists}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb ... ... ...
xc ... ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn match_expressions_does_not_exist_in_the_policy_selector() {
    // No pod has an `app` label, so the policy selects all of x; only x/a is let in.
    let p = policy(
        "x",
        "isolate-unlabelled",
        "
podSelector:
  matchExpressions:
  - {key: app, operator: DoesNotExist}
ingress:
- from:
  - podSelector: {matchLabels: {pod: a}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.X ... ...
xc XX. ... ...
ya XXX ... ...
yb XXX ... ...
yc XXX ... ...
za XXX ... ...
zb XXX ... ...
zc XXX ... ...
",
    );
}

#[test]
fn match_expressions_does_not_exist_selecting_nothing_isolates_nothing() {
    // Every pod has a `pod` label, so this policy selects no pod and changes nothing.
    let p = policy(
        "x",
        "selects-nobody",
        "
podSelector:
  matchExpressions:
  - {key: pod, operator: DoesNotExist}
policyTypes: [Ingress, Egress]
",
    );
    check_all_ports(&p, ALL);
}

#[test]
fn ip_block_with_except() {
    // 10.1.0.0/16 holds every pod; the except removes namespace y (10.1.2.0/24).
    let p = policy(
        "x",
        "allow-cidr",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - ipBlock:
      cidr: 10.1.0.0/16
      except: [10.1.2.0/24]
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb ... ... ...
xc ... ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn ip_block_single_pod_address_for_egress() {
    // x/a may only send to 10.1.3.2, which is z/b.
    let p = policy(
        "x",
        "egress-to-zb",
        "
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- to:
  - ipBlock: {cidr: 10.1.3.2/32}
",
    );
    check_all_ports(
        &p,
        "
xa .XX XXX X.X
xb ... ... ...
xc ... ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn named_port_ingress() {
    // serve-80-tcp is TCP 80 on every pod; the rule has no `from`, so any source.
    let p = policy(
        "x",
        "allow-serve-80-tcp",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - port: serve-80-tcp
",
    );
    check(
        &p,
        &[
            (80, Tcp, ALL),
            (81, Tcp, DENY_TO_XA),
            (80, Udp, DENY_TO_XA),
            (81, Udp, DENY_TO_XA),
        ],
    );
}

#[test]
fn named_port_resolves_with_the_rule_protocol() {
    // The rule's protocol defaults to TCP, and serve-80-udp names a UDP port: a named port
    // matches a container port with that name *and* the rule's protocol, so nothing does.
    let p = policy(
        "x",
        "tcp-serve-80-udp",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - port: serve-80-udp
",
    );
    check(&p, &[(80, Tcp, DENY_TO_XA), (80, Udp, DENY_TO_XA)]);
    let p = policy(
        "x",
        "udp-serve-80-udp",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - {protocol: UDP, port: serve-80-udp}
",
    );
    check(&p, &[(80, Tcp, DENY_TO_XA), (80, Udp, ALL)]);
}

#[test]
fn named_port_egress() {
    // Egress named ports resolve against the destination pod's ports.
    let p = policy(
        "x",
        "egress-serve-81-udp",
        "
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
egress:
- ports:
  - {protocol: UDP, port: serve-81-udp}
",
    );
    check(
        &p,
        &[
            (81, Udp, ALL),
            (80, Udp, DENY_FROM_XA),
            (81, Tcp, DENY_FROM_XA),
            (80, Tcp, DENY_FROM_XA),
        ],
    );
}

#[test]
fn end_port_range() {
    let p = policy(
        "x",
        "allow-80-81",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - {protocol: TCP, port: 80, endPort: 81}
",
    );
    check(&p, &[(80, Tcp, ALL), (81, Tcp, ALL), (80, Udp, DENY_TO_XA)]);
    let p = policy(
        "x",
        "allow-81-90",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - {port: 81, endPort: 90}
",
    );
    check(
        &p,
        &[(80, Tcp, DENY_TO_XA), (81, Tcp, ALL), (81, Udp, DENY_TO_XA)],
    );
}

#[test]
fn protocol_udp_allowed_tcp_denied() {
    let p = policy(
        "x",
        "allow-udp-80",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - {protocol: UDP, port: 80}
",
    );
    check(
        &p,
        &[(80, Udp, ALL), (80, Tcp, DENY_TO_XA), (81, Udp, DENY_TO_XA)],
    );
}

#[test]
fn egress_to_a_namespace() {
    let p = policy(
        "x",
        "egress-to-y",
        "
podSelector: {}
policyTypes: [Egress]
egress:
- to:
  - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    check_all_ports(
        &p,
        "
xa .XX ... XXX
xb X.X ... XXX
xc XX. ... XXX
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn both_ends_must_allow() {
    // x may send only to y, and y accepts nothing: x reaches nobody, nobody reaches y.
    let p = [
        policy(
            "x",
            "egress-to-y",
            "
podSelector: {}
policyTypes: [Egress]
egress:
- to:
  - namespaceSelector: {matchLabels: {ns: y}}
",
        ),
        policy(
            "y",
            "deny-ingress",
            "
podSelector: {}
policyTypes: [Ingress]
",
        ),
    ]
    .concat();
    check_all_ports(
        &p,
        "
xa .XX XXX XXX
xb X.X XXX XXX
xc XX. XXX XXX
ya ... .XX ...
yb ... X.X ...
yc ... XX. ...
za ... XXX ...
zb ... XXX ...
zc ... XXX ...
",
    );
}

#[test]
fn multiple_policies_are_a_union() {
    let p = [
        policy(
            "x",
            "allow-xb",
            "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}
",
        ),
        policy(
            "x",
            "allow-ns-z",
            "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {ns: z}}
",
        ),
    ]
    .concat();
    check_all_ports(
        &p,
        "
xa ... ... ...
xb ... ... ...
xc X.. ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn allow_policy_wins_over_default_deny() {
    let p = [
        policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]\n"),
        policy("x", "allow-all", "podSelector: {}\ningress:\n- {}\n"),
    ]
    .concat();
    check_all_ports(&p, ALL);
}

#[test]
fn policy_in_another_namespace_does_not_apply() {
    // A policy selects pods of its own namespace only: y/a is isolated, x/a is not.
    let p = policy(
        "y",
        "deny-pod-a",
        "
podSelector: {matchLabels: {pod: a}}
policyTypes: [Ingress]
",
    );
    check_all_ports(
        &p,
        "
xa ... X.. ...
xb ... X.. ...
xc ... X.. ...
ya ... ... ...
yb ... X.. ...
yc ... X.. ...
za ... X.. ...
zb ... X.. ...
zc ... X.. ...
",
    );
}

const ONLY_80_TO_XA: [(u16, Protocol, &str); 3] =
    [(80, Tcp, ALL), (81, Tcp, DENY_TO_XA), (80, Udp, DENY_TO_XA)];

#[test]
fn empty_from_matches_every_source() {
    let p = policy(
        "x",
        "empty-from",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from: []
  ports:
  - port: 80
",
    );
    check(&p, &ONLY_80_TO_XA);
}

#[test]
fn missing_from_matches_every_source() {
    let p = policy(
        "x",
        "missing-from",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- ports:
  - port: 80
",
    );
    check(&p, &ONLY_80_TO_XA);
}

#[test]
fn policy_types_egress_only_ignores_ingress_rules() {
    // With policyTypes [Egress] the pod is not isolated for ingress: its ingress rules are
    // ignored and everyone still reaches it.
    let p = policy(
        "x",
        "egress-only",
        "
podSelector: {matchLabels: {pod: a}}
policyTypes: [Egress]
ingress:
- from:
  - podSelector: {matchLabels: {pod: b}}
egress:
- to:
  - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    check_all_ports(
        &p,
        "
xa .XX ... XXX
xb ... ... ...
xc ... ... ...
ya ... ... ...
yb ... ... ...
yc ... ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn missing_policy_types_with_egress_rules_isolate_both_ways() {
    // policyTypes defaults to [Ingress, Egress] here: x/a accepts nothing and sends only to
    // x/b.
    let p = policy(
        "x",
        "egress-to-xb",
        "
podSelector: {matchLabels: {pod: a}}
egress:
- to:
  - podSelector: {matchLabels: {pod: b}}
",
    );
    check_all_ports(
        &p,
        "
xa ..X XXX XXX
xb X.. ... ...
xc X.. ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za X.. ... ...
zb X.. ... ...
zc X.. ... ...
",
    );
}

#[test]
fn namespace_name_label_is_defaulted() {
    // The manifests never set kubernetes.io/metadata.name; the API server (and ocelot) does.
    let p = policy(
        "x",
        "allow-ns-z-by-name",
        "
podSelector: {matchLabels: {pod: a}}
ingress:
- from:
  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}
",
    );
    check_all_ports(
        &p,
        "
xa ... ... ...
xb X.. ... ...
xc X.. ... ...
ya X.. ... ...
yb X.. ... ...
yc X.. ... ...
za ... ... ...
zb ... ... ...
zc ... ... ...
",
    );
}

#[test]
fn egress_ip_block_everything_plus_default_deny_is_open() {
    let p = [
        policy(
            "x",
            "deny-egress",
            "podSelector: {}\npolicyTypes: [Egress]\n",
        ),
        policy(
            "x",
            "egress-anywhere",
            "
podSelector: {}
policyTypes: [Egress]
egress:
- to:
  - ipBlock: {cidr: 0.0.0.0/0}
",
        ),
    ]
    .concat();
    check_all_ports(&p, ALL);
}

#[test]
fn seed_demo_matches_its_readme() {
    use control::manifests::load_dir;
    use control::verdicts::Evaluator;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-demo");
    let m = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let ev = Evaluator::new(&m);
    // Rows/columns: frontend, backend, client, management-ui (examples/seed-demo/README.md).
    let others = ["✓✗✗✓", "✗✓✗✓", "✗✗✓✓", "✓✓✗✓"].map(String::from);
    let cases = [
        (80, ["✓✗✗✓", "✗✓✗✓", "✓✗✓✓", "✓✓✗✓"].map(String::from)),
        (6379, ["✓✓✗✓", "✗✓✗✓", "✗✗✓✓", "✓✓✗✓"].map(String::from)),
        (9000, others.clone()),
        (9001, others),
    ];
    for (port, rows) in cases {
        let mx = ev.matrix(port, Tcp);
        let observed: Vec<String> = mx
            .allowed
            .iter()
            .map(|r| r.iter().map(|ok| if *ok { '✓' } else { '✗' }).collect())
            .collect();
        assert_eq!(observed, rows, "{port}/TCP\n{}", mx.render(false));
    }
}
