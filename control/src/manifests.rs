//! Manifest files → the classifier's policy model.
//!
//! Input: a directory of Kubernetes manifests. Every `*.yaml`, `*.yml` and `*.json` file
//! directly inside it is read, in sorted file-name order; subdirectories are **not** descended
//! into, so a directory of examples can keep unrelated files below it. A file may hold several
//! YAML documents (`---`), JSON (which is YAML), and `kind: List` objects with `items`.
//!
//! Output: [`Manifests`], the [`Cluster`] the policy compiler reads, the warnings met on the
//! way, and a lookup from `namespace/pod` to the pod's addresses.
//!
//! Objects are deserialized into the k8s-openapi types, so a file is accepted exactly when it
//! is what the Kubernetes API writes, and then converted with the API server's defaulting:
//! namespace `default`, protocol `TCP`, missing `policyTypes` become `Ingress` plus `Egress`
//! when egress rules exist, and every namespace carries `kubernetes.io/metadata.name`. A pod
//! whose namespace has no Namespace object gets one implicitly (with a warning), because a
//! cluster cannot hold a pod in a namespace that does not exist. `Node` objects become
//! [`NodeInfo`] (name, `spec.podCIDRs`, `InternalIP` addresses). Kinds other than
//! `Namespace`, `Pod`, `NetworkPolicy`, `Node` and `List` are skipped with a warning.
//!
//! The per-object conversions (`convert_*`) are shared with the Kubernetes datastore
//! ([`crate::kube`]), so a manifest directory and a live cluster holding the same objects
//! produce the same [`Manifests`].
//!
//! Invariant: an object Kubernetes' validation would reject is an [`Error`] naming the file,
//! the document, the kind and `namespace/name`; nothing invalid reaches the [`Cluster`]. Two
//! objects of one kind with one `namespace/name` are an error too, as the API would keep only
//! one of them and which one would depend on file order.
//!
//! # The legacy (2016) form
//!
//! Calico's 2016 demo used the alpha API: a namespace annotated
//! `net.alpha.kubernetes.io/network-isolation: "yes"` and policies of
//! `apiVersion: net.alpha.kubernetes.io/v1alpha1` whose `spec.podSelector` is a plain label
//! map (empty or missing: every pod) and whose `ingress[].from[]` entries are
//! `pods: {labels}` (pods of the policy's namespace) or `namespaces: {labels}` (every pod of
//! the matching namespaces), with `ports: [{protocol, port}]`.
//!
//! In the alpha API only *isolated* namespaces enforce anything, and there policies only add
//! allows. The translation keeps exactly that meaning in v1 terms, with a deprecation warning:
//! - an isolated namespace gets a synthesized default-deny-ingress policy named
//!   [`LEGACY_ISOLATION_POLICY`] that selects every pod of the namespace;
//! - each legacy policy in an isolated namespace becomes an ingress-only v1 policy with the
//!   same selector, peers and ports;
//! - a legacy policy in a namespace that is *not* isolated is skipped with a warning: in v1 it
//!   would isolate the pods it selects, which the alpha API never did.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use classifier::net::Cidr;
use classifier::policy::model::{
    Cluster, ContainerPort, LabelSelector, Labels, Namespace, NamespaceScope, NetworkPolicy,
    Operator, Peer, Pod, PortRef, PortSpec, Protocol, Requirement, Rule,
};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

pub use crate::error::{Error, ManifestError, ObjectRef};

/// The namespace label the API server sets to the namespace's name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The alpha API's namespace isolation annotation.
pub const LEGACY_ISOLATION_ANNOTATION: &str = "net.alpha.kubernetes.io/network-isolation";
/// The alpha NetworkPolicy API version.
pub const LEGACY_API_VERSION: &str = "net.alpha.kubernetes.io/v1alpha1";
/// The name of the default-deny-ingress policy synthesized for an isolated legacy namespace.
pub const LEGACY_ISOLATION_POLICY: &str = "legacy-isolation";

/// A loaded manifest directory, or a snapshot of a live cluster.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Namespaces, pods and policies after defaulting (and legacy translation).
    pub cluster: Cluster,
    /// Objects skipped or completed, in the order met; the CLI prints them to stderr.
    pub warnings: Vec<String>,
    /// The cluster's nodes (`kind: Node`), sorted by name.
    pub nodes: Vec<NodeInfo>,
    /// Which of the Kubernetes datastore's snapshots this is, so that one given back
    /// (`KubeDatastore::recycle`) can be brought up to date instead of copied anew; `None`
    /// for one from elsewhere.
    pub(crate) generation: Option<u64>,
}

/// What ocelot keeps of a `Node`: where its pods' addresses come from and how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDRs` (or the older single `spec.podCIDR`), in the API's order.
    pub pod_cidrs: Vec<Cidr>,
    /// `status.addresses` of type `InternalIP`, in the API's order.
    pub internal_ips: Vec<IpAddr>,
}

impl Manifests {
    /// The pod `namespace/name`, if declared.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.cluster
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Resolves a probe endpoint: an IP address as is, `node:NAME` to the node's InternalIP
    /// addresses, or `namespace/pod` to the pod's addresses. The error says why (no slash, unknown pod, pod without an address).
    pub fn resolve(&self, endpoint: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = endpoint.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if let Some(node) = endpoint.strip_prefix("node:") {
            let info = self
                .nodes
                .iter()
                .find(|n| n.name == node)
                .ok_or_else(|| format!("unknown node {node:?} (no Node object)"))?;
            if info.internal_ips.is_empty() {
                return Err(format!("node {node:?} has no InternalIP address"));
            }
            return Ok(info.internal_ips.clone());
        }
        let Some((ns, name)) = endpoint.split_once('/') else {
            return Err(format!(
                "{endpoint:?} is neither an IP address, node:NAME nor namespace/pod"
            ));
        };
        let pod = self
            .pod(ns, name)
            .ok_or_else(|| format!("unknown pod {endpoint:?}"))?;
        if pod.ips.is_empty() {
            return Err(format!(
                "pod {endpoint:?} has no IP address (status.podIPs)"
            ));
        }
        Ok(pod.ips.clone())
    }

    /// Parses manifests from in-memory text, as if read from a file named `file`. The files
    /// must be given in the order [`load_dir`] would read them.
    pub fn from_texts<'a>(
        files: impl IntoIterator<Item = (PathBuf, &'a str)>,
    ) -> Result<Manifests, Error> {
        let mut loader = Loader::default();
        for (file, text) in files {
            loader.load_text(&file, text)?;
        }
        loader.finish()
    }
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file directly inside `dir` (sorted, not
/// recursive).
pub fn load_dir(dir: &Path) -> Result<Manifests, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut loader = Loader::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        tracing::debug!(file = %file.display(), "loading manifests");
        loader.load_text(&file, &text)?;
    }
    loader.finish()
}

/// The alpha NetworkPolicy, as the 2016 demo wrote it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacyPolicy {
    #[serde(default)]
    #[allow(dead_code)]
    // Read by serde to accept the field; the dispatcher already checked it.
    api_version: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // As above.
    kind: Option<String>,
    #[serde(default)]
    metadata: meta::ObjectMeta,
    #[serde(default)]
    spec: Option<LegacySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacySpec {
    #[serde(default)]
    pod_selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ingress: Option<Vec<LegacyRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacyRule {
    #[serde(default)]
    from: Option<Vec<LegacyPeer>>,
    #[serde(default)]
    ports: Option<Vec<LegacyPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacyPeer {
    #[serde(default)]
    pods: Option<BTreeMap<String, String>>,
    #[serde(default)]
    namespaces: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacyPort {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<IntOrString>,
}

/// Objects collected from every file; conversion waits until all are read because a legacy
/// policy's meaning depends on its namespace's annotation, wherever that is declared.
#[derive(Default)]
struct Loader {
    namespaces: Vec<(ObjectRef, core::Namespace)>,
    pods: Vec<(ObjectRef, core::Pod)>,
    policies: Vec<(ObjectRef, net::NetworkPolicy)>,
    legacy: Vec<(ObjectRef, LegacyPolicy)>,
    nodes: Vec<(ObjectRef, core::Node)>,
    seen: HashMap<(String, String), ObjectRef>,
    warnings: Vec<String>,
}

fn invalid(at: &ObjectRef, why: impl Into<String>) -> Error {
    Error::Invalid {
        at: Box::new(at.clone()),
        why: why.into(),
    }
}

fn str_field<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

impl Loader {
    fn load_text(&mut self, file: &Path, text: &str) -> Result<(), Error> {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            let value = serde_yaml::Value::deserialize(doc).map_err(|source| Error::Yaml {
                file: file.to_path_buf(),
                document,
                source,
            })?;
            self.load_value(file, document, None, value)?;
        }
        Ok(())
    }

    fn load_value(
        &mut self,
        file: &Path,
        document: usize,
        item: Option<usize>,
        value: serde_yaml::Value,
    ) -> Result<(), Error> {
        // An empty document (a trailing `---`, a file of comments) holds no object.
        if value.is_null() {
            return Ok(());
        }
        let kind = str_field(&value, "kind").unwrap_or("?").to_owned();
        let api_version = str_field(&value, "apiVersion").unwrap_or("").to_owned();
        let metadata = value.get("metadata");
        let name = metadata
            .and_then(|m| str_field(m, "name"))
            .unwrap_or("?")
            .to_owned();
        let namespace = metadata
            .and_then(|m| str_field(m, "namespace"))
            .unwrap_or("default")
            .to_owned();
        let mut at = ObjectRef {
            file: file.to_path_buf(),
            document,
            item,
            kind: kind.clone(),
            name: if kind == "Namespace" || kind == "Node" {
                name.clone()
            } else {
                format!("{namespace}/{name}")
            },
        };
        if !value.is_mapping() {
            return Err(invalid(&at, "a document must be an object"));
        }
        if kind == "?" {
            return Err(invalid(&at, "missing `kind`"));
        }
        match (kind.as_str(), api_version.as_str()) {
            // `kubectl get -o yaml` writes `kind: List`; the API's typed lists (`PodList`, …)
            // have the same shape.
            (k, _) if k == "List" || (k.ends_with("List") && value.get("items").is_some()) => {
                let items = match value.get("items") {
                    None => return Ok(()),
                    Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                    Some(_) => return Err(invalid(&at, "`items` must be a list")),
                };
                if item.is_some() {
                    return Err(invalid(&at, "a List inside a List"));
                }
                for (j, v) in items.into_iter().enumerate() {
                    self.load_value(file, document, Some(j + 1), v)?;
                }
                return Ok(());
            }
            ("Namespace", "v1")
            | ("Pod", "v1")
            | ("Node", "v1")
            | ("NetworkPolicy", "networking.k8s.io/v1") => {}
            ("NetworkPolicy", LEGACY_API_VERSION) => {}
            _ => {
                self.warnings.push(format!(
                    "{at}: skipped: apiVersion {api_version:?} kind {kind:?} is not a policy \
                     input (Namespace v1, Pod v1, Node v1, NetworkPolicy networking.k8s.io/v1)"
                ));
                return Ok(());
            }
        }
        if name == "?" {
            return Err(invalid(&at, "missing metadata.name"));
        }
        let legacy = api_version == LEGACY_API_VERSION;
        if legacy {
            at.kind = format!("NetworkPolicy ({LEGACY_API_VERSION})");
        }
        // Both NetworkPolicy forms share one key: a legacy and a v1 policy of one name would
        // be one object in the API.
        let key = (kind.clone(), at.name.clone());
        if let Some(first) = self.seen.get(&key) {
            return Err(Error::Duplicate {
                at: Box::new(at),
                first: Box::new(first.clone()),
            });
        }
        self.seen.insert(key, at.clone());
        let bad = |e: serde_yaml::Error| invalid(&at, e.to_string());
        match kind.as_str() {
            "Namespace" => {
                let ns = serde_yaml::from_value(value).map_err(bad)?;
                self.namespaces.push((at, ns));
            }
            "Pod" => {
                let pod = serde_yaml::from_value(value).map_err(bad)?;
                self.pods.push((at, pod));
            }
            "Node" => {
                let node = serde_yaml::from_value(value).map_err(bad)?;
                self.nodes.push((at, node));
            }
            _ if legacy => {
                let p = serde_yaml::from_value(value).map_err(bad)?;
                self.legacy.push((at, p));
            }
            _ => {
                let p = serde_yaml::from_value(value).map_err(bad)?;
                self.policies.push((at, p));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Manifests, Error> {
        let mut warnings = self.warnings;
        let mut cluster = Cluster::default();
        let mut isolated = BTreeSet::new();
        for (at, ns) in &self.namespaces {
            let namespace = convert_namespace(ns);
            let name = namespace.name.clone();
            if let Some(value) = ns
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEGACY_ISOLATION_ANNOTATION))
            {
                match value.as_str() {
                    "yes" => {
                        warnings.push(format!(
                            "{at}: deprecated annotation {LEGACY_ISOLATION_ANNOTATION}=yes \
                             translated to a default-deny-ingress NetworkPolicy \
                             {name}/{LEGACY_ISOLATION_POLICY}"
                        ));
                        isolated.insert(name.clone());
                    }
                    "no" => {}
                    other => warnings.push(format!(
                        "{at}: annotation {LEGACY_ISOLATION_ANNOTATION}={other:?} not \
                         understood (expected \"yes\" or \"no\"); namespace not isolated"
                    )),
                }
            }
            cluster.namespaces.push(namespace);
        }
        let mut known: std::collections::HashSet<String> =
            cluster.namespaces.iter().map(|n| n.name.clone()).collect();
        for (at, pod) in &self.pods {
            let pod = convert_pod(at, pod)?;
            add_implicit_namespace(&mut cluster, &mut known, &mut warnings, at, &pod);
            cluster.pods.push(pod);
        }
        for (at, p) in &self.policies {
            cluster.policies.push(convert_policy(at, p)?);
        }
        for ns in &isolated {
            if let Some((at, _)) = self
                .policies
                .iter()
                .find(|(at, _)| at.name == format!("{ns}/{LEGACY_ISOLATION_POLICY}"))
            {
                return Err(invalid(
                    at,
                    format!(
                        "the name is reserved for the policy synthesized from namespace \
                         {ns:?}'s {LEGACY_ISOLATION_ANNOTATION} annotation"
                    ),
                ));
            }
            cluster.policies.push(NetworkPolicy {
                namespace: ns.clone(),
                name: LEGACY_ISOLATION_POLICY.to_owned(),
                pod_selector: LabelSelector::default(),
                ingress_isolation: true,
                ..NetworkPolicy::default()
            });
        }
        for (at, p) in &self.legacy {
            let policy = convert_legacy(at, p)?;
            if isolated.contains(&policy.namespace) {
                warnings.push(format!(
                    "{at}: deprecated {LEGACY_API_VERSION} policy translated to \
                     networking.k8s.io/v1 (ingress only)"
                ));
                cluster.policies.push(policy);
            } else {
                warnings.push(format!(
                    "{at}: skipped: namespace {:?} is not annotated \
                     {LEGACY_ISOLATION_ANNOTATION}=yes, so the alpha API enforced nothing \
                     there, while the same policy in v1 would isolate the pods it selects",
                    policy.namespace
                ));
            }
        }
        let mut nodes = Vec::new();
        for (at, node) in &self.nodes {
            nodes.push(convert_node(at, node)?);
        }
        nodes.sort_by(|a: &NodeInfo, b| a.name.cmp(&b.name));
        Ok(Manifests {
            cluster,
            warnings,
            nodes,
            generation: None,
        })
    }
}

/// A namespace with the label the API server always sets to its name (overwriting what was
/// sent).
pub(crate) fn convert_namespace(ns: &core::Namespace) -> Namespace {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
    Namespace { name, labels }
}

/// Gives `pod`'s namespace an implicit Namespace object (with a warning) when the cluster has
/// none: a cluster cannot hold a pod in a namespace that does not exist, so the namespace is
/// merely not known yet (a manifest left it out, or a watch delivered the pod first).
///
/// `known` holds the names of `cluster.namespaces` (kept in step here), so a cluster of
/// thousands of pods and namespaces is not scanned once per pod.
pub(crate) fn add_implicit_namespace(
    cluster: &mut Cluster,
    known: &mut std::collections::HashSet<String>,
    warnings: &mut Vec<String>,
    at: &dyn std::fmt::Display,
    pod: &Pod,
) {
    if known.contains(&pod.namespace) {
        return;
    }
    known.insert(pod.namespace.clone());
    warnings.push(format!(
        "{at}: namespace {:?} has no Namespace object; assuming one with only the \
         {NAMESPACE_NAME_LABEL} label",
        pod.namespace
    ));
    cluster.namespaces.push(Namespace {
        name: pod.namespace.clone(),
        labels: Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())]),
    });
}

/// What ocelot keeps of a Node; a pod CIDR or InternalIP that does not parse is an error.
pub(crate) fn convert_node(at: &ObjectRef, node: &core::Node) -> Result<NodeInfo, Error> {
    let mut out = NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        ..NodeInfo::default()
    };
    if let Some(spec) = &node.spec {
        // `podCIDRs` supersedes `podCIDR`; when both are set the first entries agree.
        let cidrs: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
            (Some(list), _) if !list.is_empty() => list.iter().collect(),
            (_, Some(one)) => vec![one],
            _ => Vec::new(),
        };
        for text in cidrs {
            let cidr = text
                .parse::<Cidr>()
                .map_err(|e| invalid(at, format!("spec.podCIDRs: {text:?}: {e}")))?;
            if !out.pod_cidrs.contains(&cidr) {
                out.pod_cidrs.push(cidr);
            }
        }
    }
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
    {
        let ip = a.address.parse::<IpAddr>().map_err(|_| {
            invalid(
                at,
                format!(
                    "status.addresses: InternalIP {:?} is not an IP address",
                    a.address
                ),
            )
        })?;
        if !out.internal_ips.contains(&ip) {
            out.internal_ips.push(ip);
        }
    }
    Ok(out)
}

pub(crate) fn convert_pod(at: &ObjectRef, pod: &core::Pod) -> Result<Pod, Error> {
    let mut out = Pod {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ..Pod::default()
    };
    if let Some(spec) = &pod.spec {
        out.host_network = spec.host_network.unwrap_or(false);
        out.node = spec.node_name.clone();
        for c in &spec.containers {
            for p in c.ports.iter().flatten() {
                let port = u16::try_from(p.container_port)
                    .ok()
                    .filter(|&n| n != 0)
                    .ok_or_else(|| {
                        invalid(
                            at,
                            format!(
                                "container {:?}: containerPort {} out of range 1..=65535",
                                c.name, p.container_port
                            ),
                        )
                    })?;
                let protocol = parse_protocol(
                    at,
                    &format!("container {:?} port {}", c.name, p.container_port),
                    p.protocol.as_deref(),
                )?;
                out.ports.push(ContainerPort {
                    name: p.name.clone(),
                    port,
                    protocol,
                });
            }
        }
    }
    if let Some(status) = &pod.status {
        let texts: Vec<&str> = match (&status.pod_ips, &status.pod_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(|i| i.ip.as_str()).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => Vec::new(),
        };
        for text in texts {
            let ip: IpAddr = text
                .parse()
                .map_err(|_| invalid(at, format!("pod IP {text:?} is not an IP address")))?;
            if !out.ips.contains(&ip) {
                out.ips.push(ip);
            }
        }
    }
    Ok(out)
}

fn parse_protocol(at: &ObjectRef, field: &str, p: Option<&str>) -> Result<Protocol, Error> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            invalid(
                at,
                format!("{field}: protocol {s:?} is not one of \"TCP\", \"UDP\", \"SCTP\""),
            )
        }),
    }
}

fn convert_selector(
    at: &ObjectRef,
    field: &str,
    s: Option<&meta::LabelSelector>,
) -> Result<LabelSelector, Error> {
    let Some(s) = s else {
        return Ok(LabelSelector::default());
    };
    let mut out = LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let operator = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(invalid(
                    at,
                    format!("{field}: operator {other:?} is not In, NotIn, Exists or DoesNotExist"),
                ));
            }
        };
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values && values.is_empty() {
            return Err(invalid(
                at,
                format!(
                    "{field}: operator {} on key {:?} needs values",
                    e.operator, e.key
                ),
            ));
        }
        if !needs_values && !values.is_empty() {
            return Err(invalid(
                at,
                format!(
                    "{field}: operator {} on key {:?} must not have values",
                    e.operator, e.key
                ),
            ));
        }
        out.match_expressions.push(Requirement {
            key: e.key.clone(),
            operator,
            values,
        });
    }
    Ok(out)
}

fn convert_peer(at: &ObjectRef, field: &str, p: &net::NetworkPolicyPeer) -> Result<Peer, Error> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => Err(invalid(
            at,
            format!("{field}: a peer needs podSelector, namespaceSelector or ipBlock"),
        )),
        (pods, nss, None) => {
            let pods = convert_selector(at, &format!("{field}.podSelector"), pods.as_ref())?;
            let namespaces = match nss {
                None => NamespaceScope::PolicyNamespace,
                Some(s) => NamespaceScope::Selector(convert_selector(
                    at,
                    &format!("{field}.namespaceSelector"),
                    Some(s),
                )?),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
        (None, None, Some(block)) => {
            let parse = |s: &str| {
                s.parse::<Cidr>()
                    .map_err(|e| invalid(at, format!("{field}.ipBlock: {e}")))
            };
            let cidr = parse(&block.cidr)?;
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                let hole = parse(e)?;
                if !cidr.covers(&hole) || hole.len() == cidr.len() {
                    return Err(invalid(
                        at,
                        format!(
                            "{field}.ipBlock: except {e:?} is not strictly inside cidr {:?}",
                            block.cidr
                        ),
                    ));
                }
                except.push(hole);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
        _ => Err(invalid(
            at,
            format!("{field}: ipBlock cannot be combined with podSelector or namespaceSelector"),
        )),
    }
}

/// Whether `s` is a valid port name (IANA_SVC_NAME): 1–15 lowercase letters, digits and
/// dashes, with at least one letter, no leading, trailing or double dash.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn convert_port(
    at: &ObjectRef,
    field: &str,
    protocol: Option<&str>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
) -> Result<PortSpec, Error> {
    let protocol = parse_protocol(at, field, protocol)?;
    let port = match port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortRef::Number(
            u16::try_from(*n)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| invalid(at, format!("{field}: port {n} out of range 1..=65535")))?,
        )),
        Some(IntOrString::String(s)) if is_port_name(s) => Some(PortRef::Name(s.clone())),
        Some(IntOrString::String(s)) => {
            return Err(invalid(
                at,
                format!(
                    "{field}: port {s:?} is neither a number nor a valid port name \
                     (1-15 lowercase letters, digits, '-', with a letter)"
                ),
            ));
        }
    };
    let end_port = match (end_port, &port) {
        (None, _) => None,
        (Some(end), Some(PortRef::Number(start))) => {
            let end = u16::try_from(end)
                .ok()
                .filter(|e| e >= start)
                .ok_or_else(|| {
                    invalid(
                        at,
                        format!("{field}: endPort {end} must be in {start}..=65535"),
                    )
                })?;
            Some(end)
        }
        (Some(end), _) => {
            return Err(invalid(
                at,
                format!("{field}: endPort {end} needs a numeric port"),
            ));
        }
    };
    Ok(PortSpec {
        protocol,
        port,
        end_port,
    })
}

fn convert_rule(
    at: &ObjectRef,
    field: &str,
    peer_field: &str,
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    ports: Option<&Vec<net::NetworkPolicyPort>>,
) -> Result<Rule, Error> {
    let mut rule = Rule::default();
    for (i, p) in peers.into_iter().flatten().enumerate() {
        rule.peers
            .push(convert_peer(at, &format!("{field}.{peer_field}[{i}]"), p)?);
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        rule.ports.push(convert_port(
            at,
            &format!("{field}.ports[{i}]"),
            p.protocol.as_deref(),
            p.port.as_ref(),
            p.end_port,
        )?);
    }
    Ok(rule)
}

pub(crate) fn convert_policy(
    at: &ObjectRef,
    p: &net::NetworkPolicy,
) -> Result<NetworkPolicy, Error> {
    let default_spec = net::NetworkPolicySpec::default();
    let spec = p.spec.as_ref().unwrap_or(&default_spec);
    let mut out = NetworkPolicy {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: p.metadata.name.clone().unwrap_or_default(),
        pod_selector: convert_selector(at, "spec.podSelector", spec.pod_selector.as_ref())?,
        ..NetworkPolicy::default()
    };
    match &spec.policy_types {
        None => {
            out.ingress_isolation = true;
            out.egress_isolation = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for t in types {
                match t.as_str() {
                    "Ingress" => out.ingress_isolation = true,
                    "Egress" => out.egress_isolation = true,
                    other => {
                        return Err(invalid(
                            at,
                            format!("policyTypes: {other:?} is not \"Ingress\" or \"Egress\""),
                        ));
                    }
                }
            }
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        out.ingress.push(convert_rule(
            at,
            &format!("spec.ingress[{i}]"),
            "from",
            r.from.as_ref(),
            r.ports.as_ref(),
        )?);
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        out.egress.push(convert_rule(
            at,
            &format!("spec.egress[{i}]"),
            "to",
            r.to.as_ref(),
            r.ports.as_ref(),
        )?);
    }
    Ok(out)
}

fn convert_legacy(at: &ObjectRef, p: &LegacyPolicy) -> Result<NetworkPolicy, Error> {
    let spec = p.spec.as_ref();
    let mut out = NetworkPolicy {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: p.metadata.name.clone().unwrap_or_default(),
        pod_selector: LabelSelector {
            match_labels: spec
                .and_then(|s| s.pod_selector.clone())
                .unwrap_or_default(),
            match_expressions: Vec::new(),
        },
        ingress_isolation: true,
        ..NetworkPolicy::default()
    };
    for (i, r) in spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let mut rule = Rule::default();
        for (j, peer) in r.from.iter().flatten().enumerate() {
            let selector = |labels: &BTreeMap<String, String>| LabelSelector {
                match_labels: labels.clone(),
                match_expressions: Vec::new(),
            };
            rule.peers.push(match (&peer.pods, &peer.namespaces) {
                (Some(pods), None) => Peer::Pods {
                    namespaces: NamespaceScope::PolicyNamespace,
                    pods: selector(pods),
                },
                (None, Some(nss)) => Peer::Pods {
                    namespaces: NamespaceScope::Selector(selector(nss)),
                    pods: LabelSelector::default(),
                },
                _ => {
                    return Err(invalid(
                        at,
                        format!("spec.ingress[{i}].from[{j}]: exactly one of pods, namespaces"),
                    ));
                }
            });
        }
        for (j, port) in r.ports.iter().flatten().enumerate() {
            rule.ports.push(convert_port(
                at,
                &format!("spec.ingress[{i}].ports[{j}]"),
                port.protocol.as_deref(),
                port.port.as_ref(),
                None,
            )?);
        }
        out.ingress.push(rule);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
