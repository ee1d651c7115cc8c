//! The cluster objects policy is written about, in the shape the classifier needs.
//!
//! These are plain values: the control plane converts Kubernetes objects (or manifest files)
//! into them, after Kubernetes' own defaulting (a missing protocol is TCP; missing
//! `policyTypes` become `Ingress`, plus `Egress` when egress rules exist). The classifier never
//! sees YAML or the API.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::net::Cidr;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// L4 protocols NetworkPolicy can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP, IP protocol 6 (the Kubernetes default).
    Tcp,
    /// UDP, IP protocol 17.
    Udp,
    /// SCTP, IP protocol 132.
    Sctp,
}

impl Protocol {
    /// Every protocol policy can name.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IANA protocol number.
    pub const fn ip_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol for an IANA number, if policy can name it.
    pub const fn from_ip_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes spelling: `TCP`, `UDP`, `SCTP`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the Kubernetes spelling (case-sensitive, as the API is).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// A set-based selector operator (`matchExpressions[].operator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent, or its value is not one of `values`.
    NotIn,
    /// The label is present (any value).
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// How the key is tested.
    pub operator: Operator,
    /// Values for `In` / `NotIn`; empty for `Exists` / `DoesNotExist`.
    pub values: Vec<String>,
}

/// A Kubernetes label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    /// Every key must be present with exactly this value.
    pub match_labels: BTreeMap<String, String>,
    /// Every requirement must hold.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether the selector selects an object with these labels. This is the reference
    /// semantics; the compiler resolves selectors once per snapshot, never per packet.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// True for `{}`, which selects every object.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// A namespace: its name and labels (`kubernetes.io/metadata.name` is added by the API
/// server; the control plane adds it too when a manifest lacks it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
}

/// A port a pod's container declares (`spec.containers[].ports[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// The port's name, which policies may reference instead of the number.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol`, TCP by default.
    pub protocol: Protocol,
}

/// A pod as policy sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP`). A pod without an address has no traffic yet.
    pub ips: Vec<IpAddr>,
    /// Declared container ports, for named-port resolution.
    pub ports: Vec<ContainerPort>,
    /// `spec.hostNetwork`: such pods share the node's address, are not selected by
    /// NetworkPolicy and are peers only through ipBlock.
    pub host_network: bool,
    /// `spec.nodeName`, when scheduled.
    pub node: Option<String>,
}

/// Which namespaces a pod peer's `podSelector` looks in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NamespaceScope {
    /// Only the policy's own namespace (a peer with `podSelector` alone).
    PolicyNamespace,
    /// Namespaces matching this selector (`namespaceSelector`, possibly with `podSelector`).
    Selector(LabelSelector),
}

/// One peer of a rule (`from[]` / `to[]` entry).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` names (both conditions: AND).
    Pods {
        /// Where to look.
        namespaces: NamespaceScope,
        /// Which pods there (empty selector: all of them).
        pods: LabelSelector,
    },
    /// Addresses inside `cidr` but outside every `except` prefix.
    IpBlock {
        /// The block.
        cidr: Cidr,
        /// Holes in the block.
        except: Vec<Cidr>,
    },
}

/// A port reference: a number or a container port name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// A numeric port; with `end_port`, the first of a range.
    Number(u16),
    /// A named port, resolved against the destination pod's declared container ports.
    Name(String),
}

/// One `ports[]` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// The protocol (TCP when the manifest omits it).
    pub protocol: Protocol,
    /// The port; `None` means every port of `protocol`.
    pub port: Option<PortRef>,
    /// Inclusive end of a range starting at a numeric `port`.
    pub end_port: Option<u16>,
}

/// One ingress or egress rule: traffic matching any peer AND any port is allowed.
/// An empty `peers` list matches every peer; an empty `ports` list matches every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress).
    pub peers: Vec<Peer>,
    /// `ports`.
    pub ports: Vec<PortSpec>,
}

/// A NetworkPolicy (networking.k8s.io/v1) after defaulting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Which pods of the namespace the policy applies to.
    pub pod_selector: LabelSelector,
    /// Whether the policy isolates selected pods for ingress (`policyTypes` contains Ingress).
    pub ingress_isolation: bool,
    /// Whether the policy isolates selected pods for egress (`policyTypes` contains Egress).
    pub egress_isolation: bool,
    /// Ingress rules (meaningful only with `ingress_isolation`).
    pub ingress: Vec<Rule>,
    /// Egress rules (meaningful only with `egress_isolation`).
    pub egress: Vec<Rule>,
}

/// Everything policy compilation reads: the cluster's namespaces, pods and policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// All namespaces.
    pub namespaces: Vec<Namespace>,
    /// All pods, on every node.
    pub pods: Vec<Pod>,
    /// All NetworkPolicies.
    pub policies: Vec<NetworkPolicy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn selector_operators_follow_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        let check = |sel: LabelSelector, expected: bool| assert_eq!(sel.matches(&l), expected);
        check(LabelSelector::default(), true);
        check(req("app", Operator::In, &["web", "db"]), true);
        check(req("app", Operator::In, &["db"]), false);
        check(req("missing", Operator::In, &["x"]), false);
        check(req("app", Operator::NotIn, &["db"]), true);
        check(req("app", Operator::NotIn, &["web"]), false);
        check(req("missing", Operator::NotIn, &["x"]), true);
        check(req("tier", Operator::Exists, &[]), true);
        check(req("missing", Operator::Exists, &[]), false);
        check(req("missing", Operator::DoesNotExist, &[]), true);
        check(req("tier", Operator::DoesNotExist, &[]), false);
        let mut both = req("tier", Operator::Exists, &[]);
        both.match_labels.insert("app".into(), "db".into());
        check(both, false);
    }

    #[test]
    fn protocol_numbers_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_ip_number(p.ip_number()), Some(p));
            assert_eq!(Protocol::parse(p.as_str()), Some(p));
        }
        assert_eq!(Protocol::from_ip_number(1), None);
        assert_eq!(Protocol::parse("tcp"), None);
    }
}
