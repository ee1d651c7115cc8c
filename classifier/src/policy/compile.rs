//! Compiling Kubernetes NetworkPolicy into per-endpoint tables, and the packet-path check.
//!
//! Input: a [`Cluster`] (namespaces, pods, policies) and [`CompileOptions`] (which node's pods
//! are enforced here). Output: an immutable [`PolicyTable`] answering "may `src` open a
//! connection to `dst` with this protocol and destination port?" without walking policies or
//! evaluating selectors, plus a [`CompileError`] for every policy the table cannot express.
//!
//! The compiled form follows Cilium:
//! - Pods with an address that are not `hostNetwork` are **endpoints**. Endpoints are grouped
//!   into **identities**: distinct (namespace, labels) pairs. Everything NetworkPolicy decides
//!   depends on a pod only through its identity, except named ports.
//! - Every pod-peer selector is resolved once into an **identity set** (sorted ids, or a bitmap
//!   when large), interned so that equal sets share storage and table entries.
//! - Each local identity gets, per isolated direction, a **table**: an "any peer" port set,
//!   a list of (identity set → port set) entries and a list of ipBlock entries. Tables are
//!   interned by the list of policies they merge, so identities selected by the same policies
//!   share one table. A direction with no table is not isolated and allows everything.
//!   Entries are keyed by identity *set* rather than expanded into a per-identity map: a peer
//!   such as "any pod in any namespace with app=x" stays one entry in every table that uses
//!   it instead of one entry per identity per table, so memory and compile time follow
//!   (sets + tables), and a check walks the few entries of one table.
//! - Selectors are resolved through label indexes (see `select`), so compile cost follows
//!   the candidates a selector names rather than identities × policies.
//! - Named ports are kept as (name, protocol) in port sets and resolved at check time against
//!   the *destination* endpoint's declared ports, for both directions. For ingress that is the
//!   table's own pod; resolving it at check time rather than compile time is what lets pods
//!   that share labels but declare different ports (a rollout) share one table, so compile
//!   cost follows identities, not pods. The check-time cost is a scan of the destination's
//!   few named ports, only when a matching rule has named ports.
//!
//! Recompiling: [`PolicyCompiler`] keeps what namespaces and pods compile into (identities,
//! label indexes, endpoints) between compilations and updates it from the next cluster, so a
//! change recompiles the pods it touches and the policy half, not the whole cluster;
//! [`PolicyTable::compile`] is a compiler used once.
//!
//! Semantics are networking.k8s.io/v1 exactly; `super::reference` is the executable
//! specification the tests compare against. Invariants: [`PolicyTable::check`] and
//! [`PolicyTable::check_endpoints`] neither allocate nor panic on any input; a policy with a
//! [`CompileError`] still isolates the pods it selects but allows nothing (fail closed).

use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::Arc;

use ahash::AHashMap;

use super::model::{
    Cluster, ContainerPort, LabelSelector, Labels, Namespace, NamespaceScope, NetworkPolicy, Peer,
    Pod, PortRef, Rule,
};
use super::select::LabelIndex;
use crate::net::Cidr;

/// Dense index of a pod endpoint in a [`PolicyTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// The outcome of a policy check for one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyDecision {
    /// Both the source's egress and the destination's ingress allow it.
    Allow,
    /// The source pod's egress policy refuses it.
    DenyEgress,
    /// The destination pod's ingress policy refuses it.
    DenyIngress,
}

/// Which endpoints get compiled tables.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Compile only pods scheduled on this node (a node agent); `None` compiles every pod
    /// (offline verdicts, tests).
    pub local_node: Option<String>,
}

/// An object the compiler could not express; it is reported and the pods it selects fail
/// closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {namespace}/{name}: {why}")]
pub struct CompileError {
    /// Namespace of the offending policy.
    pub namespace: String,
    /// Name of the offending policy.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

/// What operators and tools want to know about an endpoint (not used by the packet path).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Whether this table enforces the pod's own ingress and egress.
    pub local: bool,
}

/// Sizes of a compiled table, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Pod endpoints (pods with an address, not `hostNetwork`).
    pub endpoints: usize,
    /// Endpoints this table enforces.
    pub local_endpoints: usize,
    /// Distinct (namespace, labels) pairs among endpoints.
    pub identities: usize,
    /// Distinct per-direction tables (shared between identities).
    pub tables: usize,
    /// Entries over all tables (any-peer, identity-set and ipBlock entries).
    pub rules: usize,
    /// Distinct resolved identity sets.
    pub identity_sets: usize,
    /// Rough heap footprint of the packet-path structures, in bytes.
    pub bytes: usize,
}

/// An endpoint's info for an id this table did not issue.
static UNKNOWN_ENDPOINT: EndpointInfo = EndpointInfo {
    namespace: String::new(),
    name: String::new(),
    ips: Vec::new(),
    local: false,
};

/// The packet-path view of an endpoint.
#[derive(Debug)]
struct Endpoint {
    identity: u32,
    local: bool,
    /// Table for the endpoint's ingress; `None` when not isolated (or not local).
    ingress: Option<u32>,
    /// Table for the endpoint's egress; `None` when not isolated (or not local).
    egress: Option<u32>,
    /// Declared named ports, for resolving policies' named ports (shared with the
    /// [`PolicyCompiler`]'s cache of the pod).
    named: Arc<[NamedPort]>,
}

/// A declared container port with a name, the name interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct NamedPort {
    name: u32,
    proto: u8,
    port: u16,
}

/// An inclusive range of ports of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PortRange {
    proto: u8,
    lo: u16,
    hi: u16,
}

/// A named port of one protocol, resolved against the destination endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct NamedRef {
    proto: u8,
    name: u32,
}

/// What a rule (or a union of rules) allows of a packet's protocol and destination port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PortSet {
    /// Every protocol, with or without ports (a rule without `ports`).
    any: bool,
    /// Sorted, merged ranges.
    ranges: Box<[PortRange]>,
    /// Sorted named ports.
    named: Box<[NamedRef]>,
}

impl PortSet {
    #[inline]
    fn matches(&self, proto: u8, dport: Option<u16>, dst_named: &[NamedPort]) -> bool {
        if self.any {
            return true;
        }
        // A rule that lists ports never matches a packet without one.
        let Some(port) = dport else {
            return false;
        };
        self.ranges
            .iter()
            .any(|r| r.proto == proto && r.lo <= port && port <= r.hi)
            || (!self.named.is_empty()
                && dst_named.iter().any(|p| {
                    p.proto == proto
                        && p.port == port
                        && self
                            .named
                            .iter()
                            .any(|n| n.name == p.name && n.proto == proto)
                }))
    }

    fn is_empty(&self) -> bool {
        !self.any && self.ranges.is_empty() && self.named.is_empty()
    }

    fn bytes(&self) -> usize {
        size_of_val(&*self.ranges) + size_of_val(&*self.named)
    }
}

/// A port set under construction: a union of rules' ports.
#[derive(Clone, Debug, Default)]
struct PortSetBuilder {
    any: bool,
    ranges: Vec<PortRange>,
    named: Vec<NamedRef>,
}

impl PortSetBuilder {
    fn union(&mut self, other: &PortSetBuilder) {
        self.any |= other.any;
        self.ranges.extend_from_slice(&other.ranges);
        self.named.extend_from_slice(&other.named);
    }

    fn finish(mut self) -> PortSet {
        if self.any {
            return PortSet {
                any: true,
                ..PortSet::default()
            };
        }
        self.ranges.sort_unstable();
        let mut merged: Vec<PortRange> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges {
            match merged.last_mut() {
                Some(m) if m.proto == r.proto && u32::from(r.lo) <= u32::from(m.hi) + 1 => {
                    m.hi = m.hi.max(r.hi);
                }
                _ => merged.push(r),
            }
        }
        self.named.sort_unstable();
        self.named.dedup();
        PortSet {
            any: false,
            ranges: merged.into_boxed_slice(),
            named: self.named.into_boxed_slice(),
        }
    }
}

/// A resolved set of identities.
#[derive(Debug)]
enum IdSet {
    /// Few members: sorted ids, searched by bisection.
    Sorted(Box<[u32]>),
    /// Many members: one bit per identity.
    Bits(Box<[u64]>),
}

impl IdSet {
    fn new(ids: &[u32], universe: usize) -> IdSet {
        // A bitmap costs universe/8 bytes, a sorted list 4 bytes per member.
        if ids.len().saturating_mul(32) >= universe {
            let mut bits = vec![0u64; universe.div_ceil(64)];
            for &id in ids {
                if let Some(w) = bits.get_mut(id as usize / 64) {
                    *w |= 1 << (id % 64);
                }
            }
            IdSet::Bits(bits.into_boxed_slice())
        } else {
            IdSet::Sorted(ids.into())
        }
    }

    #[inline]
    fn contains(&self, id: u32) -> bool {
        match self {
            IdSet::Sorted(ids) => ids.binary_search(&id).is_ok(),
            IdSet::Bits(bits) => bits
                .get(id as usize / 64)
                .is_some_and(|w| w & (1 << (id % 64)) != 0),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            IdSet::Sorted(ids) => size_of_val(&**ids),
            IdSet::Bits(bits) => size_of_val(&**bits),
        }
    }
}

/// An ipBlock peer with what it allows.
#[derive(Debug)]
struct CidrEntry {
    cidr: Cidr,
    except: Box<[Cidr]>,
    ports: PortSet,
}

/// One direction of one identity's policy: the union of every rule that applies.
#[derive(Debug, Default)]
struct DirTable {
    /// Rules without peers.
    any_peer: PortSet,
    /// Pod-peer rules: identity set index → ports, sorted by set index.
    by_set: Box<[(u32, PortSet)]>,
    /// ipBlock rules.
    cidrs: Box<[CidrEntry]>,
}

impl DirTable {
    #[inline]
    fn allows(
        &self,
        sets: &[IdSet],
        peer: Option<u32>,
        peer_ip: IpAddr,
        proto: u8,
        dport: Option<u16>,
        dst_named: &[NamedPort],
    ) -> bool {
        if self.any_peer.matches(proto, dport, dst_named) {
            return true;
        }
        if let Some(id) = peer {
            for (set, ports) in self.by_set.iter() {
                if ports.matches(proto, dport, dst_named)
                    && sets.get(*set as usize).is_some_and(|s| s.contains(id))
                {
                    return true;
                }
            }
        }
        self.cidrs.iter().any(|c| {
            c.ports.matches(proto, dport, dst_named)
                && c.cidr.contains(peer_ip)
                && !c.except.iter().any(|e| e.contains(peer_ip))
        })
    }

    fn entries(&self) -> usize {
        usize::from(!self.any_peer.is_empty()) + self.by_set.len() + self.cidrs.len()
    }

    fn bytes(&self) -> usize {
        size_of::<DirTable>()
            + self.any_peer.bytes()
            + self
                .by_set
                .iter()
                .map(|(_, p)| size_of::<(u32, PortSet)>() + p.bytes())
                .sum::<usize>()
            + self
                .cidrs
                .iter()
                .map(|c| size_of::<CidrEntry>() + size_of_val(&*c.except) + c.ports.bytes())
                .sum::<usize>()
    }
}

/// Compiled policy for a set of endpoints.
#[derive(Debug, Default)]
pub struct PolicyTable {
    /// Address owners, split by family so that the key hashes as one integer.
    by_v4: AHashMap<u32, EndpointId>,
    by_v6: AHashMap<u128, EndpointId>,
    endpoints: Vec<Endpoint>,
    infos: Vec<Arc<EndpointInfo>>,
    tables: Vec<DirTable>,
    sets: Vec<IdSet>,
    identities: usize,
}

impl PolicyTable {
    /// Compiles a cluster. Every policy that cannot be expressed is reported; the pods it
    /// selects stay isolated in its directions but it allows nothing for them.
    pub fn compile(cluster: &Cluster, opts: &CompileOptions) -> (PolicyTable, Vec<CompileError>) {
        PolicyCompiler::default().compile(cluster, opts)
    }

    /// The pod endpoint that owns an address. When pods share an address, the first in the
    /// cluster's pod list owns it.
    #[inline]
    pub fn endpoint(&self, ip: IpAddr) -> Option<EndpointId> {
        match ip {
            IpAddr::V4(a) => self.by_v4.get(&u32::from(a)).copied(),
            IpAddr::V6(a) => self.by_v6.get(&u128::from(a)).copied(),
        }
    }

    /// Checks a connection attempt; `dport` is `None` when the packet carries no port.
    #[inline]
    pub fn check(&self, src: IpAddr, dst: IpAddr, proto: u8, dport: Option<u16>) -> PolicyDecision {
        self.check_endpoints(
            self.endpoint(src),
            src,
            self.endpoint(dst),
            dst,
            proto,
            dport,
        )
    }

    /// Checks a connection attempt whose endpoints the caller already resolved with
    /// [`PolicyTable::endpoint`]. The source's egress is enforced when it is a local endpoint,
    /// then the destination's ingress when it is a local endpoint.
    #[inline]
    pub fn check_endpoints(
        &self,
        src_ep: Option<EndpointId>,
        src: IpAddr,
        dst_ep: Option<EndpointId>,
        dst: IpAddr,
        proto: u8,
        dport: Option<u16>,
    ) -> PolicyDecision {
        let src_e = src_ep.and_then(|e| self.endpoints.get(e.0 as usize));
        let dst_e = dst_ep.and_then(|e| self.endpoints.get(e.0 as usize));
        // Named ports always name the destination's container ports, in both directions.
        let dst_named: &[NamedPort] = dst_e.map_or(&[], |e| &e.named);
        if let Some(s) = src_e
            && s.local
            && let Some(t) = s.egress
        {
            let peer = dst_e.map(|e| e.identity);
            let allowed = self
                .tables
                .get(t as usize)
                .is_some_and(|t| t.allows(&self.sets, peer, dst, proto, dport, dst_named));
            if !allowed {
                return PolicyDecision::DenyEgress;
            }
        }
        if let Some(d) = dst_e
            && d.local
            && let Some(t) = d.ingress
        {
            let peer = src_e.map(|e| e.identity);
            let allowed = self
                .tables
                .get(t as usize)
                .is_some_and(|t| t.allows(&self.sets, peer, src, proto, dport, dst_named));
            if !allowed {
                return PolicyDecision::DenyIngress;
            }
        }
        PolicyDecision::Allow
    }

    /// What is known about an endpoint; an id this table did not issue gets an empty info.
    pub fn endpoint_info(&self, ep: EndpointId) -> &EndpointInfo {
        self.infos
            .get(ep.0 as usize)
            .map_or(&UNKNOWN_ENDPOINT, |i| &**i)
    }

    /// Every endpoint, in id order.
    pub fn endpoints(&self) -> impl Iterator<Item = (EndpointId, &EndpointInfo)> + '_ {
        self.infos
            .iter()
            .enumerate()
            .map(|(i, info)| (EndpointId(i as u32), &**info))
    }

    /// Whether this table enforces the endpoint's own policy.
    pub fn is_local(&self, ep: EndpointId) -> bool {
        self.endpoints.get(ep.0 as usize).is_some_and(|e| e.local)
    }

    /// Whether a local endpoint is isolated for (ingress, egress).
    pub fn isolation(&self, ep: EndpointId) -> (bool, bool) {
        self.endpoints
            .get(ep.0 as usize)
            .map_or((false, false), |e| {
                (e.ingress.is_some(), e.egress.is_some())
            })
    }

    /// Sizes of the table.
    pub fn stats(&self) -> PolicyStats {
        let bytes = self.endpoints.len() * size_of::<Endpoint>()
            + self
                .endpoints
                .iter()
                .map(|e| size_of_val(&*e.named))
                .sum::<usize>()
            + self.by_v4.capacity() * (size_of::<(u32, EndpointId)>() + 1)
            + self.by_v6.capacity() * (size_of::<(u128, EndpointId)>() + 1)
            + self.tables.iter().map(DirTable::bytes).sum::<usize>()
            + self
                .sets
                .iter()
                .map(|s| size_of::<IdSet>() + s.bytes())
                .sum::<usize>();
        PolicyStats {
            endpoints: self.endpoints.len(),
            local_endpoints: self.endpoints.iter().filter(|e| e.local).count(),
            identities: self.identities,
            tables: self.tables.len(),
            rules: self.tables.iter().map(DirTable::entries).sum(),
            identity_sets: self.sets.len(),
            bytes,
        }
    }
}

/// Checks what the table cannot express; the first problem found, if any.
///
/// Only rules of the directions the policy isolates are read, as only those take effect.
/// The ipBlock test follows Kubernetes validation: each `except` must be a strict subset of
/// its `cidr`.
fn validate(policy: &NetworkPolicy) -> Result<(), String> {
    let ingress = policy
        .ingress
        .iter()
        .enumerate()
        .filter(|_| policy.ingress_isolation)
        .map(|(i, r)| ("ingress", i, r));
    let egress = policy
        .egress
        .iter()
        .enumerate()
        .filter(|_| policy.egress_isolation)
        .map(|(i, r)| ("egress", i, r));
    for (dir, i, rule) in ingress.chain(egress) {
        for p in &rule.ports {
            match (&p.port, p.end_port) {
                (_, None) => {}
                (None, Some(end)) => {
                    return Err(format!("{dir} rule {i}: endPort {end} without a port"));
                }
                (Some(PortRef::Name(n)), Some(end)) => {
                    return Err(format!(
                        "{dir} rule {i}: endPort {end} with named port {n:?}"
                    ));
                }
                (Some(PortRef::Number(port)), Some(end)) if end < *port => {
                    return Err(format!("{dir} rule {i}: endPort {end} below port {port}"));
                }
                (Some(PortRef::Number(_)), Some(_)) => {}
            }
        }
        for peer in &rule.peers {
            if let Peer::IpBlock { cidr, except } = peer {
                for e in except {
                    if e.addr().is_ipv4() != cidr.addr().is_ipv4() {
                        return Err(format!(
                            "{dir} rule {i}: ipBlock {cidr} except {e} mixes address families"
                        ));
                    }
                    if !(cidr.covers(e) && e.len() > cidr.len()) {
                        return Err(format!(
                            "{dir} rule {i}: ipBlock except {e} is not a strict subset of {cidr}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// How a rule's peers were resolved.
#[derive(Debug)]
enum PeerRef<'a> {
    /// Pods in this identity set.
    Set(u32),
    /// Addresses in an ipBlock.
    Block(Cidr, &'a [Cidr]),
}

/// A rule with its selectors resolved.
#[derive(Debug)]
struct CompiledRule<'a> {
    /// `None` when the rule has no peers (every peer).
    peers: Option<Vec<PeerRef<'a>>>,
    ports: PortSetBuilder,
}

/// The key of a pod-peer resolution, to resolve each distinct peer once.
#[derive(Debug, PartialEq, Eq, Hash)]
enum PeerKey<'a> {
    /// `podSelector` alone, in the policy's namespace (by index).
    InNamespace(u32, &'a LabelSelector),
    /// `namespaceSelector` and `podSelector`.
    Selected(&'a LabelSelector, &'a LabelSelector),
}

/// A compiler that keeps what namespaces and pods compile into between compilations, so that
/// the next compilation redoes only what changed.
///
/// A [`PolicyTable`] has two halves. The *base* depends only on namespaces, pods and the local
/// node: namespace and identity numbering, the label indexes selectors are resolved through,
/// and each endpoint's identity, addresses and named ports. The *policy half* — which
/// policies isolate which local identities, the resolved identity sets, the tables — depends
/// on the base and the policies. `compile` keeps the base and updates it from the new
/// cluster: a pod whose namespace, name, labels, addresses, named ports and locality are
/// unchanged keeps its derived endpoint (found at its old position, else by name), any other
/// pod is derived afresh (a new identity is appended to the indexes when its labels are new),
/// and namespaces whose names are unchanged only re-index their labels. The policy half is
/// rebuilt every time from the base: on a node agent it covers the node's few local
/// identities, and rebuilding it whole is what keeps it exact.
///
/// The result is the table a fresh [`PolicyTable::compile`] gives, up to numbering: every
/// check, endpoint, isolation and error is the same (a property test applies random event
/// sequences and compares). The base is rebuilt from scratch when the local node or the list
/// of namespace names changes, and when identities no pod holds any more (old label sets)
/// outnumber the live ones, so the indexes do not grow with churn.
#[derive(Debug, Default)]
pub struct PolicyCompiler {
    base: Option<Base>,
    last: CompileReuse,
}

/// What the last [`PolicyCompiler::compile`] reused, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileReuse {
    /// The base was built from scratch (the first compile, or a change that needs it).
    pub rebuilt: bool,
    /// Endpoints carried over unchanged from the previous compile.
    pub endpoints_reused: usize,
    /// Endpoints derived afresh.
    pub endpoints_derived: usize,
}

/// The half of a compilation that depends only on namespaces, pods and the local node.
#[derive(Debug)]
struct Base {
    local_node: Option<String>,
    /// The `Namespace` objects the base was built from, to tell what changed.
    namespaces: Vec<Namespace>,
    /// Distinct namespace names with an object, in order; then the ones only pods name.
    ns_by_name: AHashMap<String, u32>,
    /// Namespaces with an object (indexes below this); the rest only pods name.
    explicit_ns: usize,
    ns_index: LabelIndex,
    /// Per namespace, its identities by labels.
    ns_ident: Vec<AHashMap<Arc<Labels>, u32>>,
    /// Identities of each namespace, in increasing order.
    ns_identities: Vec<Vec<u32>>,
    identity_ns: Vec<u32>,
    id_index: LabelIndex,
    port_names: AHashMap<String, u32>,
    /// `port_names` by id, to compare a pod's port names without hashing them.
    port_name_list: Vec<String>,
    /// The endpoints of the last compile, in the cluster's pod order.
    pods: Vec<CachedPod>,
    /// Identities some endpoint held at the last compile.
    live_identities: usize,
    /// Hashes pod names for the by-name lookup of moved pods.
    hasher: ahash::RandomState,
}

/// An endpoint as derived from its pod.
#[derive(Debug)]
struct CachedPod {
    info: Arc<EndpointInfo>,
    identity: u32,
    named: Arc<[NamedPort]>,
}

fn is_local(pod: &Pod, opts: &CompileOptions) -> bool {
    opts.local_node
        .as_deref()
        .is_none_or(|n| pod.node.as_deref() == Some(n))
}

/// Whether `named` is what `ports` intern to (the named ones, in order); `names` lists the
/// interned names by id.
fn same_named_ports(named: &[NamedPort], ports: &[ContainerPort], names: &[String]) -> bool {
    let mut cached = named.iter();
    for p in ports {
        let Some(name) = &p.name else { continue };
        let Some(c) = cached.next() else {
            return false;
        };
        if c.port != p.port
            || c.proto != p.protocol.ip_number()
            || names.get(c.name as usize) != Some(name)
        {
            return false;
        }
    }
    cached.next().is_none()
}

impl Base {
    fn new(cluster: &Cluster, opts: &CompileOptions) -> Base {
        let mut base = Base {
            local_node: opts.local_node.clone(),
            namespaces: cluster.namespaces.clone(),
            ns_by_name: AHashMap::new(),
            explicit_ns: 0,
            ns_index: LabelIndex::default(),
            ns_ident: Vec::new(),
            ns_identities: Vec::new(),
            identity_ns: Vec::new(),
            id_index: LabelIndex::default(),
            port_names: AHashMap::new(),
            port_name_list: Vec::new(),
            pods: Vec::new(),
            live_identities: 0,
            hasher: ahash::RandomState::new(),
        };
        for ns in &cluster.namespaces {
            if !base.ns_by_name.contains_key(ns.name.as_str()) {
                base.push_namespace(ns.name.clone(), Arc::new(ns.labels.clone()));
            }
        }
        base.explicit_ns = base.ns_identities.len();
        base
    }

    fn push_namespace(&mut self, name: String, labels: Arc<Labels>) -> u32 {
        let i = self.ns_index.push(labels);
        self.ns_by_name.insert(name, i);
        self.ns_ident.push(AHashMap::new());
        self.ns_identities.push(Vec::new());
        i
    }

    /// Brings the base to `cluster`'s namespaces; `false` when only a rebuild can (the
    /// names changed, so identities would change namespace).
    fn update_namespaces(&mut self, namespaces: &[Namespace]) -> bool {
        if self.namespaces == namespaces {
            return true;
        }
        if self.namespaces.len() != namespaces.len()
            || self
                .namespaces
                .iter()
                .zip(namespaces)
                .any(|(a, b)| a.name != b.name)
        {
            return false;
        }
        // Same names, new labels: re-index the namespaces' labels (implicit ones have none).
        let mut labels: Vec<Arc<Labels>> = Vec::with_capacity(self.ns_identities.len());
        let mut seen: ahash::AHashSet<&str> = ahash::AHashSet::new();
        for ns in namespaces {
            if seen.insert(ns.name.as_str()) {
                labels.push(Arc::new(ns.labels.clone()));
            }
        }
        while labels.len() < self.ns_identities.len() {
            labels.push(Arc::new(Labels::new()));
        }
        self.ns_index = LabelIndex::new(labels);
        self.namespaces = namespaces.to_vec();
        true
    }

    /// The namespace index of a name, adding a namespace only pods name.
    fn namespace(&mut self, name: &str) -> u32 {
        match self.ns_by_name.get(name) {
            Some(&ns) => ns,
            None => self.push_namespace(name.to_owned(), Arc::new(Labels::new())),
        }
    }

    fn identity(&mut self, ns: u32, labels: &Labels) -> u32 {
        if let Some(&id) = self.ns_ident.get(ns as usize).and_then(|m| m.get(labels)) {
            return id;
        }
        let labels = Arc::new(labels.clone());
        let id = self.id_index.push(Arc::clone(&labels));
        self.identity_ns.push(ns);
        if let Some(m) = self.ns_ident.get_mut(ns as usize) {
            m.insert(labels, id);
        }
        if let Some(list) = self.ns_identities.get_mut(ns as usize) {
            list.push(id);
        }
        id
    }

    /// Derives an endpoint from its pod (an endpoint: has an address, not `hostNetwork`).
    fn derive(&mut self, pod: &Pod, local: bool) -> CachedPod {
        let ns = self.namespace(&pod.namespace);
        let identity = self.identity(ns, &pod.labels);
        let mut named: Vec<NamedPort> = Vec::new();
        for p in &pod.ports {
            if let Some(name) = &p.name {
                let next = self.port_names.len() as u32;
                let name = match self.port_names.get(name.as_str()) {
                    Some(&id) => id,
                    None => {
                        self.port_names.insert(name.clone(), next);
                        self.port_name_list.push(name.clone());
                        next
                    }
                };
                named.push(NamedPort {
                    name,
                    proto: p.protocol.ip_number(),
                    port: p.port,
                });
            }
        }
        CachedPod {
            info: Arc::new(EndpointInfo {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ips: pod.ips.clone(),
                local,
            }),
            identity,
            named: named.into(),
        }
    }

    /// Whether `cached` is exactly what `pod` derives to (so it can be kept). The identity's
    /// namespace needs no check: within one base a namespace name keeps its index.
    fn same(&self, cached: &CachedPod, pod: &Pod, local: bool) -> bool {
        cached.info.local == local
            && cached.info.name == pod.name
            && cached.info.ips == pod.ips
            && cached.info.namespace == pod.namespace
            && self
                .id_index
                .labels(cached.identity)
                .is_some_and(|l| *l == pod.labels)
            && same_named_ports(&cached.named, &pod.ports, &self.port_name_list)
    }

    fn name_hash(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    /// Brings the endpoints to `pods`, reusing what is unchanged; returns them in pod order
    /// and what was reused.
    fn update_pods(&mut self, pods: &[Pod], opts: &CompileOptions) -> (usize, usize) {
        let mut old: Vec<Option<CachedPod>> = std::mem::take(&mut self.pods)
            .into_iter()
            .map(Some)
            .collect();
        // Built on the first pod not found at its old position (one was added or removed).
        let mut by_name: Option<AHashMap<u64, u32>> = None;
        let mut cursor = 0usize;
        let mut out = Vec::with_capacity(pods.len());
        let (mut reused, mut derived) = (0, 0);
        for pod in pods {
            if pod.host_network || pod.ips.is_empty() {
                continue;
            }
            let local = is_local(pod, opts);
            let mut found = None;
            if let Some(Some(c)) = old.get(cursor)
                && self.same(c, pod, local)
            {
                found = Some(cursor);
            } else {
                let map = by_name.get_or_insert_with(|| {
                    let mut m = AHashMap::with_capacity(old.len());
                    for (i, c) in old.iter().enumerate() {
                        if let Some(c) = c {
                            m.entry(self.name_hash(&c.info.namespace, &c.info.name))
                                .or_insert(i as u32);
                        }
                    }
                    m
                });
                let h = self.name_hash(&pod.namespace, &pod.name);
                if let Some(&i) = map.get(&h)
                    && let Some(Some(c)) = old.get(i as usize)
                    && self.same(c, pod, local)
                {
                    found = Some(i as usize);
                }
            }
            let entry = match found.and_then(|i| {
                cursor = i + 1;
                old.get_mut(i).and_then(Option::take)
            }) {
                Some(c) => {
                    reused += 1;
                    c
                }
                None => {
                    derived += 1;
                    self.derive(pod, local)
                }
            };
            out.push(entry);
        }
        let mut live = vec![false; self.identity_ns.len()];
        for c in &out {
            if let Some(l) = live.get_mut(c.identity as usize) {
                *l = true;
            }
        }
        self.live_identities = live.iter().filter(|l| **l).count();
        self.pods = out;
        (reused, derived)
    }
}

impl PolicyCompiler {
    /// Compiles `cluster`, reusing what the previous call derived from namespaces and pods
    /// that did not change. The table is the one [`PolicyTable::compile`] would give.
    pub fn compile(
        &mut self,
        cluster: &Cluster,
        opts: &CompileOptions,
    ) -> (PolicyTable, Vec<CompileError>) {
        let kept = self.base.take().filter(|b| {
            // Old identities no pod holds any more: compact them away by rebuilding.
            b.local_node == opts.local_node && b.identity_ns.len() <= 2 * b.live_identities + 64
        });
        let kept = kept.and_then(|mut b| b.update_namespaces(&cluster.namespaces).then_some(b));
        let mut base = match kept {
            Some(b) => {
                self.last.rebuilt = false;
                b
            }
            None => {
                self.last.rebuilt = true;
                Base::new(cluster, opts)
            }
        };
        let (reused, derived) = base.update_pods(&cluster.pods, opts);
        self.last.endpoints_reused = reused;
        self.last.endpoints_derived = derived;
        let out = Compiler::new(cluster, &base).run();
        self.base = Some(base);
        out
    }

    /// What the last compile reused.
    pub fn last_reuse(&self) -> CompileReuse {
        self.last
    }
}

/// The policy half of one compilation, over a [`Base`]; borrows the cluster's policies.
struct Compiler<'a> {
    cluster: &'a Cluster,
    base: &'a Base,
    /// Whether any local endpoint has the identity.
    identity_local: Vec<bool>,
    ns_memo: AHashMap<&'a LabelSelector, Vec<u32>>,
    peer_memo: AHashMap<PeerKey<'a>, Option<u32>>,
    set_memo: AHashMap<Vec<u32>, u32>,
    sets: Vec<IdSet>,
}

impl<'a> Compiler<'a> {
    fn new(cluster: &'a Cluster, base: &'a Base) -> Compiler<'a> {
        Compiler {
            cluster,
            base,
            identity_local: Vec::new(),
            ns_memo: AHashMap::new(),
            peer_memo: AHashMap::new(),
            set_memo: AHashMap::new(),
            sets: Vec::new(),
        }
    }

    fn run(mut self) -> (PolicyTable, Vec<CompileError>) {
        let cluster = self.cluster;
        let base = self.base;

        // Endpoints, from the base.
        let n_identities = base.identity_ns.len();
        let mut table = PolicyTable {
            endpoints: Vec::with_capacity(base.pods.len()),
            infos: Vec::with_capacity(base.pods.len()),
            ..PolicyTable::default()
        };
        self.identity_local = vec![false; n_identities];
        for (i, pod) in base.pods.iter().enumerate() {
            let id = EndpointId(i as u32);
            for ip in &pod.info.ips {
                match ip {
                    IpAddr::V4(a) => table.by_v4.entry(u32::from(*a)).or_insert(id),
                    IpAddr::V6(a) => table.by_v6.entry(u128::from(*a)).or_insert(id),
                };
            }
            if pod.info.local
                && let Some(l) = self.identity_local.get_mut(pod.identity as usize)
            {
                *l = true;
            }
            table.endpoints.push(Endpoint {
                identity: pod.identity,
                local: pod.info.local,
                ingress: None,
                egress: None,
                named: Arc::clone(&pod.named),
            });
            table.infos.push(Arc::clone(&pod.info));
        }
        table.identities = base.live_identities;

        // Which policies isolate each local identity, per direction. `None`: not isolated;
        // `Some(list)`: isolated, allowing the union of the valid policies in `list`.
        let mut ingress_of: Vec<Option<Vec<u32>>> = vec![None; n_identities];
        let mut egress_of: Vec<Option<Vec<u32>>> = vec![None; n_identities];
        let mut errors = Vec::new();
        let mut valid = vec![false; cluster.policies.len()];
        for (pi, policy) in cluster.policies.iter().enumerate() {
            match validate(policy) {
                Ok(()) => valid[pi] = true,
                Err(why) => errors.push(CompileError {
                    namespace: policy.namespace.clone(),
                    name: policy.name.clone(),
                    why,
                }),
            }
            if !policy.ingress_isolation && !policy.egress_isolation {
                continue;
            }
            let Some(&ns) = base.ns_by_name.get(policy.namespace.as_str()) else {
                continue;
            };
            let Some(members) = base.ns_identities.get(ns as usize) else {
                continue;
            };
            for &id in members {
                let local = self.identity_local.get(id as usize).copied() == Some(true);
                if !local || !base.id_index.matches(&policy.pod_selector, id) {
                    continue;
                }
                for (isolates, of) in [
                    (policy.ingress_isolation, &mut ingress_of),
                    (policy.egress_isolation, &mut egress_of),
                ] {
                    if let (true, Some(slot)) = (isolates, of.get_mut(id as usize)) {
                        let list = slot.get_or_insert_with(Vec::new);
                        if valid[pi] {
                            list.push(pi as u32);
                        }
                    }
                }
            }
        }

        // Tables, shared by identities isolated by the same policies.
        let mut compiled: AHashMap<u32, (Vec<CompiledRule<'a>>, Vec<CompiledRule<'a>>)> =
            AHashMap::new();
        let mut table_memo: AHashMap<(bool, Vec<u32>), u32> = AHashMap::new();
        let mut ingress_table: Vec<Option<u32>> = vec![None; n_identities];
        let mut egress_table: Vec<Option<u32>> = vec![None; n_identities];
        for (is_ingress, of, out) in [
            (true, ingress_of, &mut ingress_table),
            (false, egress_of, &mut egress_table),
        ] {
            for (id, list) in of.into_iter().enumerate() {
                let Some(list) = list else { continue };
                let t = match table_memo.entry((is_ingress, list)) {
                    Entry::Occupied(o) => *o.get(),
                    Entry::Vacant(v) => {
                        for &pi in &v.key().1 {
                            if !compiled.contains_key(&pi) {
                                let c = self.compile_policy(pi);
                                compiled.insert(pi, c);
                            }
                        }
                        let rules =
                            v.key().1.iter().filter_map(|pi| compiled.get(pi)).flat_map(
                                |(ing, eg)| if is_ingress { ing.iter() } else { eg.iter() },
                            );
                        table.tables.push(build_table(rules));
                        *v.insert((table.tables.len() - 1) as u32)
                    }
                };
                if let Some(slot) = out.get_mut(id) {
                    *slot = Some(t);
                }
            }
        }
        for e in table.endpoints.iter_mut().filter(|e| e.local) {
            e.ingress = ingress_table.get(e.identity as usize).copied().flatten();
            e.egress = egress_table.get(e.identity as usize).copied().flatten();
        }
        table.sets = self.sets;
        (table, errors)
    }

    /// Resolves the selectors of a (valid) policy's rules: (ingress, egress).
    fn compile_policy(&mut self, pi: u32) -> (Vec<CompiledRule<'a>>, Vec<CompiledRule<'a>>) {
        let Some(policy) = self.cluster.policies.get(pi as usize) else {
            return (Vec::new(), Vec::new());
        };
        let ns = self.base.ns_by_name.get(policy.namespace.as_str()).copied();
        let ingress = policy
            .ingress
            .iter()
            .map(|r| self.compile_rule(r, ns))
            .collect();
        let egress = policy
            .egress
            .iter()
            .map(|r| self.compile_rule(r, ns))
            .collect();
        (ingress, egress)
    }

    fn compile_rule(&mut self, rule: &'a Rule, policy_ns: Option<u32>) -> CompiledRule<'a> {
        let mut ports = PortSetBuilder {
            any: rule.ports.is_empty(),
            ..PortSetBuilder::default()
        };
        for p in &rule.ports {
            let proto = p.protocol.ip_number();
            match &p.port {
                None => ports.ranges.push(PortRange {
                    proto,
                    lo: 0,
                    hi: u16::MAX,
                }),
                Some(PortRef::Number(n)) => ports.ranges.push(PortRange {
                    proto,
                    lo: *n,
                    hi: p.end_port.unwrap_or(*n),
                }),
                // A name no endpoint declares can never match; it is left out.
                Some(PortRef::Name(name)) => {
                    if let Some(&name) = self.base.port_names.get(name.as_str()) {
                        ports.named.push(NamedRef { proto, name });
                    }
                }
            }
        }
        let peers = if rule.peers.is_empty() {
            None
        } else {
            let mut out = Vec::with_capacity(rule.peers.len());
            for peer in &rule.peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        let key = match namespaces {
                            NamespaceScope::PolicyNamespace => match policy_ns {
                                Some(ns) => PeerKey::InNamespace(ns, pods),
                                // No pod lives in the policy's namespace.
                                None => continue,
                            },
                            NamespaceScope::Selector(ns_sel) => PeerKey::Selected(ns_sel, pods),
                        };
                        if let Some(set) = self.resolve(key) {
                            out.push(PeerRef::Set(set));
                        }
                    }
                    Peer::IpBlock { cidr, except } => out.push(PeerRef::Block(*cidr, except)),
                }
            }
            Some(out)
        };
        CompiledRule { peers, ports }
    }

    /// The interned identity set a pod peer selects; `None` when it selects nobody.
    fn resolve(&mut self, key: PeerKey<'a>) -> Option<u32> {
        if let Some(&set) = self.peer_memo.get(&key) {
            return set;
        }
        let base = self.base;
        let ids: Vec<u32> = match &key {
            PeerKey::InNamespace(ns, sel) => self
                .base
                .ns_identities
                .get(*ns as usize)
                .map(|ids| {
                    ids.iter()
                        .copied()
                        .filter(|&id| base.id_index.matches(sel, id))
                        .collect()
                })
                .unwrap_or_default(),
            PeerKey::Selected(ns_sel, pod_sel) => {
                let nss = self
                    .ns_memo
                    .entry(ns_sel)
                    .or_insert_with(|| base.ns_index.select(ns_sel));
                let via_ns: usize = nss
                    .iter()
                    .map(|&ns| base.ns_identities.get(ns as usize).map_or(0, Vec::len))
                    .sum();
                // Start from whichever side names fewer identities.
                if via_ns <= base.id_index.estimate(pod_sel) {
                    let mut ids: Vec<u32> = nss
                        .iter()
                        .filter_map(|&ns| base.ns_identities.get(ns as usize))
                        .flatten()
                        .copied()
                        .filter(|&id| base.id_index.matches(pod_sel, id))
                        .collect();
                    ids.sort_unstable();
                    ids
                } else {
                    base.id_index
                        .select(pod_sel)
                        .into_iter()
                        .filter(|&id| {
                            base.identity_ns
                                .get(id as usize)
                                .is_some_and(|ns| nss.binary_search(ns).is_ok())
                        })
                        .collect()
                }
            }
        };
        let set = if ids.is_empty() {
            None
        } else {
            let universe = base.identity_ns.len();
            let sets = &mut self.sets;
            Some(*self.set_memo.entry(ids).or_insert_with_key(|ids| {
                sets.push(IdSet::new(ids, universe));
                (sets.len() - 1) as u32
            }))
        };
        self.peer_memo.insert(key, set);
        set
    }
}

/// Merges rules into one table: entries with the same peer share one port set.
fn build_table<'r, 'a: 'r>(rules: impl Iterator<Item = &'r CompiledRule<'a>>) -> DirTable {
    let mut any_peer = PortSetBuilder::default();
    let mut by_set: AHashMap<u32, PortSetBuilder> = AHashMap::new();
    let mut cidrs: Vec<(Cidr, &[Cidr], PortSetBuilder)> = Vec::new();
    for rule in rules {
        let Some(peers) = &rule.peers else {
            any_peer.union(&rule.ports);
            continue;
        };
        for peer in peers {
            match peer {
                PeerRef::Set(set) => by_set.entry(*set).or_default().union(&rule.ports),
                PeerRef::Block(cidr, except) => {
                    match cidrs
                        .iter_mut()
                        .find(|(c, e, _)| c == cidr && *e == *except)
                    {
                        Some((_, _, ports)) => ports.union(&rule.ports),
                        None => cidrs.push((*cidr, except, rule.ports.clone())),
                    }
                }
            }
        }
    }
    let mut by_set: Vec<(u32, PortSet)> = by_set
        .into_iter()
        .map(|(s, p)| (s, p.finish()))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    by_set.sort_unstable_by_key(|(s, _)| *s);
    DirTable {
        any_peer: any_peer.finish(),
        by_set: by_set.into_boxed_slice(),
        cidrs: cidrs
            .into_iter()
            .map(|(cidr, except, ports)| CidrEntry {
                cidr,
                except: except.into(),
                ports: ports.finish(),
            })
            .filter(|c| !c.ports.is_empty())
            .collect(),
    }
}
