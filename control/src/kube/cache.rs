//! The datastore's cache: the compact model objects of every watched resource, and the
//! [`Manifests`] sent from them.
//!
//! Input: [`Msg`]s, one per watcher event, each carrying an object already converted into
//! the model (or the reason it was refused). Output: a [`Manifests`] on request.
//!
//! The cache keeps each resource's usable objects as a vector sorted by key — the order a
//! [`Manifests`] lists them in — so an event is one binary search and one insert, replace or
//! remove, and a [`Manifests`] is the vectors as they are, not a rebuild. To send one without
//! cloning every object on the update path, the cache also keeps a *spare*: a copy of the
//! vectors to which every event is applied as well (one object cloned per event).
//! [`Cache::build`] hands the spare out whole; [`Cache::prepare`] makes the next one, which
//! the datastore calls after sending, while it would otherwise wait for the next event. So
//! the cost of an update on its way to the consumer is that of its own events, and the full
//! copy happens off that path (it is on the path only for the first snapshot and after a
//! re-list, which replace a resource's objects wholesale).
//!
//! Invariant: a re-list fills a side table and replaces the live one only when it is
//! complete (`InitDone`), so a [`Manifests`] never holds a half-listed resource; and
//! [`Cache::build`] refuses (returns `None`) until every resource has been listed once, so
//! the first snapshot is never empty or partial. The spare always equals the live vectors
//! (or is absent); the tests check the result against a rebuild from scratch.

use std::collections::{BTreeMap, HashMap};

use classifier::policy::model::{Cluster, Namespace, NetworkPolicy, Pod};

use super::Resource;
use crate::error::ObjectRef;
use crate::manifests::{Manifests, NAMESPACE_NAME_LABEL, NodeInfo};

/// An object as converted on arrival: the model value, or why the converter refused it.
pub(crate) type Converted<T> = Result<T, String>;

/// One watcher event, converted. Keys are `namespace/name` (`name` for cluster objects).
#[derive(Debug)]
pub(crate) enum Update<T> {
    /// A (re-)list begins.
    Init,
    /// An object of the list in progress.
    InitApply(String, Converted<T>),
    /// The list is complete: it replaces the live objects.
    InitDone,
    /// An object was added or changed.
    Apply(String, Converted<T>),
    /// An object was deleted.
    Delete(String),
}

/// An [`Update`] of one resource.
#[derive(Debug)]
pub(crate) enum Msg {
    Namespace(Update<Namespace>),
    Pod(Update<Pod>),
    Policy(Update<NetworkPolicy>),
    Node(Update<NodeInfo>),
}

/// What an update did to a store's usable objects.
#[derive(Debug)]
enum Edit<T> {
    /// Nothing changed.
    Unchanged,
    /// A usable object was inserted at this index.
    Insert(usize),
    /// The usable object at this index was replaced; the old value.
    Replace(usize, T),
    /// The usable object at this index was removed; its value.
    Remove(usize, T),
    /// Only the refused objects changed.
    Refused,
    /// A completed re-list replaced everything.
    Reset,
}

impl<T> Edit<T> {
    fn changed(&self) -> bool {
        !matches!(self, Edit::Unchanged)
    }
}

/// An edit of one resource's usable objects with the value it put in: what is replayed into
/// a [`Manifests`] given back.
#[derive(Debug)]
enum Replay<T> {
    Insert(usize, T),
    Replace(usize, T),
    Remove(usize),
}

impl<T: Clone> Replay<T> {
    /// Applies the edit to `items`; `false` when it does not fit (the vector is not the one
    /// the edit followed).
    fn apply(&self, items: &mut Vec<T>) -> bool {
        match self {
            Replay::Insert(i, v) if *i <= items.len() => items.insert(*i, v.clone()),
            Replay::Replace(i, v) if *i < items.len() => items[*i] = v.clone(),
            Replay::Remove(i) if *i < items.len() => {
                items.remove(*i);
            }
            _ => return false,
        }
        true
    }
}

/// A journal entry: a [`Replay`] of one resource.
#[derive(Debug)]
enum Logged {
    Namespace(Replay<Namespace>),
    Pod(Replay<Pod>),
    Policy(Replay<NetworkPolicy>),
    Node(Replay<NodeInfo>),
}

/// A [`Manifests`] handed out that may come back.
#[derive(Clone, Copy, Debug)]
struct Handout {
    generation: u64,
    /// The journal's length when it was handed out: later entries are newer than it.
    at: usize,
    /// Namespaces only pods named, appended after the spare's.
    implicit: usize,
}

/// Handouts kept for recycling; older ones are forgotten (a consumer that gives nothing back
/// costs a little memory, not a growing journal).
const MAX_HANDOUTS: usize = 4;
/// Journal entries kept at most (a consumer that holds on to one `Manifests` for long).
const MAX_JOURNAL: usize = 100_000;

/// The objects of one resource.
#[derive(Debug)]
struct Store<T> {
    /// Keys of the usable objects, sorted; `keys[i]` is `items[i]`'s.
    keys: Vec<String>,
    /// The usable objects, in key order.
    items: Vec<T>,
    /// Why each refused object was refused, by key. A key is in `keys` or here, not both.
    refused: BTreeMap<String, String>,
    /// The list in progress, if any.
    pending: Option<BTreeMap<String, Converted<T>>>,
    /// Whether a list has completed at least once.
    listed: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            keys: Vec::new(),
            items: Vec::new(),
            refused: BTreeMap::new(),
            pending: None,
            listed: false,
        }
    }
}

impl<T: PartialEq> Store<T> {
    /// Applies `u`; says what changed. An update that converts to the value already held (a
    /// pod's status heartbeat, a node's condition) changes nothing, so it causes no new
    /// snapshot.
    fn apply(&mut self, u: Update<T>) -> Edit<T> {
        match u {
            Update::Init => {
                self.pending = Some(BTreeMap::new());
                Edit::Unchanged
            }
            Update::InitApply(key, value) => {
                self.pending
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, value);
                Edit::Unchanged
            }
            Update::InitDone => {
                let listed = self.pending.take().unwrap_or_default();
                let first = !self.listed;
                self.listed = true;
                let (mut keys, mut items, mut refused) = (Vec::new(), Vec::new(), BTreeMap::new());
                for (key, value) in listed {
                    match value {
                        Ok(v) => {
                            keys.push(key);
                            items.push(v);
                        }
                        Err(why) => {
                            refused.insert(key, why);
                        }
                    }
                }
                let changed =
                    first || keys != self.keys || items != self.items || refused != self.refused;
                self.keys = keys;
                self.items = items;
                self.refused = refused;
                if changed {
                    Edit::Reset
                } else {
                    Edit::Unchanged
                }
            }
            Update::Apply(key, Ok(value)) => {
                let was_refused = self.refused.remove(&key).is_some();
                match self.keys.binary_search(&key) {
                    Ok(i) => {
                        if self.items[i] == value {
                            return Edit::Unchanged;
                        }
                        Edit::Replace(i, std::mem::replace(&mut self.items[i], value))
                    }
                    Err(i) => {
                        debug_assert!(was_refused || !self.refused.contains_key(&key));
                        self.keys.insert(i, key);
                        self.items.insert(i, value);
                        Edit::Insert(i)
                    }
                }
            }
            Update::Apply(key, Err(why)) => {
                let removed = self.remove(&key);
                let same = self.refused.get(&key) == Some(&why);
                self.refused.insert(key, why);
                match removed {
                    Some(edit) => edit,
                    None if same => Edit::Unchanged,
                    None => Edit::Refused,
                }
            }
            Update::Delete(key) => match self.remove(&key) {
                Some(edit) => edit,
                None if self.refused.remove(&key).is_some() => Edit::Refused,
                None => Edit::Unchanged,
            },
        }
    }

    /// Removes the usable object `key`, if held.
    fn remove(&mut self, key: &str) -> Option<Edit<T>> {
        let i = self.keys.binary_search_by(|k| k.as_str().cmp(key)).ok()?;
        self.keys.remove(i);
        Some(Edit::Remove(i, self.items.remove(i)))
    }
}

impl<T: Clone> Store<T> {
    /// Applies `edit` (just made to this store) to a copy of `items` as it was before it.
    fn mirror(&self, edit: &Edit<T>, copy: &mut Vec<T>) {
        match edit {
            Edit::Unchanged | Edit::Refused | Edit::Reset => {}
            Edit::Insert(i) => copy.insert(*i, self.items[*i].clone()),
            Edit::Replace(i, _) => copy[*i] = self.items[*i].clone(),
            Edit::Remove(i, _) => {
                copy.remove(*i);
            }
        }
    }

    /// The edit (just made to this store) as a journal entry.
    fn replay(&self, edit: &Edit<T>) -> Option<Replay<T>> {
        match edit {
            Edit::Unchanged | Edit::Refused | Edit::Reset => None,
            Edit::Insert(i) => Some(Replay::Insert(*i, self.items[*i].clone())),
            Edit::Replace(i, _) => Some(Replay::Replace(*i, self.items[*i].clone())),
            Edit::Remove(i, _) => Some(Replay::Remove(*i)),
        }
    }
}

/// A copy of every store's usable objects, kept equal to them: the next [`Manifests`].
#[derive(Debug, Default)]
struct Spare {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
    nodes: Vec<NodeInfo>,
}

/// Every watched resource's objects.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    nodes: Store<NodeInfo>,
    /// Usable pods per namespace name, to find namespaces only pods name.
    pods_per_namespace: HashMap<String, usize>,
    /// `None` after a re-list (or before the first build): the next build copies the stores.
    spare: Option<Spare>,
    /// Handouts that may be given back, oldest first.
    handouts: std::collections::VecDeque<Handout>,
    /// Every edit since the oldest handout.
    journal: Vec<Logged>,
    /// The last handout's generation.
    generation: u64,
    /// Whether the consumer gives `Manifests` back: then the spare is made from the one
    /// given back rather than copied after each send.
    recycling: bool,
}

/// Object counts of one resource: `(usable, refused)`.
pub(crate) type Counts = (usize, usize);

impl Cache {
    /// Applies one update; returns whether the cluster's state changed. Cost: a binary
    /// search and a vector insert or remove in the store, the same in the spare with one
    /// object cloned (a completed re-list also compares the new objects with the old).
    pub(crate) fn apply(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Namespace(u) => {
                let edit = self.namespaces.apply(u);
                self.follow(
                    edit,
                    |c| &c.namespaces,
                    |s| &mut s.namespaces,
                    Logged::Namespace,
                )
            }
            Msg::Pod(u) => {
                let edit = self.pods.apply(u);
                match &edit {
                    Edit::Insert(i) => {
                        let ns = self.pods.items[*i].namespace.clone();
                        count_pod(&mut self.pods_per_namespace, ns, true);
                    }
                    Edit::Replace(i, old) => {
                        let new = &self.pods.items[*i].namespace;
                        if *new != old.namespace {
                            count_pod(&mut self.pods_per_namespace, new.clone(), true);
                            count_pod(&mut self.pods_per_namespace, old.namespace.clone(), false);
                        }
                    }
                    Edit::Remove(_, old) => {
                        count_pod(&mut self.pods_per_namespace, old.namespace.clone(), false);
                    }
                    Edit::Reset => {
                        self.pods_per_namespace.clear();
                        for p in &self.pods.items {
                            count_pod(&mut self.pods_per_namespace, p.namespace.clone(), true);
                        }
                    }
                    Edit::Unchanged | Edit::Refused => {}
                }
                self.follow(edit, |c| &c.pods, |s| &mut s.pods, Logged::Pod)
            }
            Msg::Policy(u) => {
                let edit = self.policies.apply(u);
                self.follow(edit, |c| &c.policies, |s| &mut s.policies, Logged::Policy)
            }
            Msg::Node(u) => {
                let edit = self.nodes.apply(u);
                self.follow(edit, |c| &c.nodes, |s| &mut s.nodes, Logged::Node)
            }
        }
    }

    /// Applies an edit of one store to the spare and the journal; returns whether anything
    /// changed.
    fn follow<T: Clone>(
        &mut self,
        edit: Edit<T>,
        store: impl Fn(&Cache) -> &Store<T>,
        copy: impl Fn(&mut Spare) -> &mut Vec<T>,
        log: impl Fn(Replay<T>) -> Logged,
    ) -> bool {
        if matches!(edit, Edit::Reset) {
            // Nothing handed out can be brought up to date by replaying edits.
            self.spare = None;
            self.handouts.clear();
            self.journal.clear();
        }
        if let Some(mut spare) = self.spare.take() {
            store(self).mirror(&edit, copy(&mut spare));
            self.spare = Some(spare);
        }
        if !self.handouts.is_empty()
            && let Some(r) = store(self).replay(&edit)
        {
            self.journal.push(log(r));
            if self.journal.len() > MAX_JOURNAL {
                self.handouts.clear();
                self.journal.clear();
            }
        }
        edit.changed()
    }

    /// Takes back a [`Manifests`] this cache handed out and the consumer no longer needs.
    /// If there is no spare yet, it becomes the spare once the edits made since it was
    /// handed out are replayed into it (no copy of the cluster); otherwise, or if it is not
    /// one of the last handouts, it is returned to be dropped. The consumer must not have
    /// changed it.
    pub(crate) fn recycle(&mut self, m: Manifests) -> Option<Manifests> {
        self.recycling = true;
        let Some(generation) = m.generation else {
            return Some(m);
        };
        let Some(pos) = self
            .handouts
            .iter()
            .position(|h| h.generation == generation)
        else {
            return Some(m);
        };
        let handout = self.handouts[pos];
        // This and older handouts are done with.
        self.handouts.drain(..=pos);
        if self.spare.is_some() || !self.listed() {
            self.trim_journal();
            return Some(m);
        }
        let Manifests { cluster, nodes, .. } = m;
        let Cluster {
            mut namespaces,
            pods,
            policies,
        } = cluster;
        let Some(own) = namespaces.len().checked_sub(handout.implicit) else {
            self.trim_journal();
            return None;
        };
        namespaces.truncate(own);
        let mut spare = Spare {
            namespaces,
            pods,
            policies,
            nodes,
        };
        let mut fits = true;
        for entry in self.journal.get(handout.at..).unwrap_or_default() {
            fits &= match entry {
                Logged::Namespace(r) => r.apply(&mut spare.namespaces),
                Logged::Pod(r) => r.apply(&mut spare.pods),
                Logged::Policy(r) => r.apply(&mut spare.policies),
                Logged::Node(r) => r.apply(&mut spare.nodes),
            };
        }
        // Newer handouts still need the entries after their own position.
        self.trim_journal();
        if fits {
            self.spare = Some(spare);
        }
        None
    }

    /// Drops journal entries no remaining handout needs.
    fn trim_journal(&mut self) {
        match self.handouts.front().map(|h| h.at) {
            None => self.journal.clear(),
            Some(0) => {}
            Some(at) => {
                self.journal.drain(..at);
                for h in &mut self.handouts {
                    h.at -= at;
                }
            }
        }
    }

    /// Whether every resource has completed its initial list.
    pub(crate) fn listed(&self) -> bool {
        self.namespaces.listed && self.pods.listed && self.policies.listed && self.nodes.listed
    }

    /// How many objects of `r` are held, usable and refused.
    pub(crate) fn counts(&self, r: Resource) -> Counts {
        fn count<T>(s: &Store<T>) -> Counts {
            (s.items.len(), s.refused.len())
        }
        match r {
            Resource::Namespaces => count(&self.namespaces),
            Resource::Pods => count(&self.pods),
            Resource::NetworkPolicies => count(&self.policies),
            Resource::Nodes => count(&self.nodes),
        }
    }

    /// Makes the spare the next [`Cache::build`] hands out, if there is none: a copy of every
    /// usable object. The datastore calls it once a snapshot is sent, off the update path,
    /// unless the consumer gives snapshots back (`after_send`: the spare will then be made
    /// from the one given back, and only a build that finds none copies).
    pub(crate) fn prepare(&mut self, after_send: bool) {
        if after_send && self.recycling {
            return;
        }
        if self.spare.is_none() && self.listed() {
            self.spare = Some(Spare {
                namespaces: self.namespaces.items.clone(),
                pods: self.pods.items.clone(),
                policies: self.policies.items.clone(),
                nodes: self.nodes.items.clone(),
            });
        }
    }

    /// The full state as [`Manifests`]; `None` until every resource has been listed once.
    /// Objects are in key order, then namespaces that only pods name (in name order, each
    /// with only the `kubernetes.io/metadata.name` label and a warning naming its first pod).
    /// Refused objects are left out, each named in a warning. Hands out the spare (made
    /// here if [`Cache::prepare`] has not made it).
    pub(crate) fn build(&mut self) -> Option<Manifests> {
        if !self.listed() {
            return None;
        }
        self.prepare(false);
        let spare = self.spare.take()?;
        let mut warnings = Vec::new();
        let mut namespaces = spare.namespaces;
        let mut implicit: Vec<&str> = self
            .pods_per_namespace
            .iter()
            .filter(|(ns, n)| **n > 0 && self.namespaces.keys.binary_search(ns).is_err())
            .map(|(ns, _)| ns.as_str())
            .collect();
        implicit.sort_unstable();
        let own = namespaces.len();
        for ns in implicit {
            let first = self.first_pod_key(ns);
            implicit_namespace(&mut namespaces, &mut warnings, first, ns);
        }
        self.generation += 1;
        if self.handouts.len() == MAX_HANDOUTS {
            self.handouts.pop_front();
            self.trim_journal();
        }
        self.handouts.push_back(Handout {
            generation: self.generation,
            at: self.journal.len(),
            implicit: namespaces.len() - own,
        });
        refused_warnings(
            &mut warnings,
            [
                ("Namespace", &self.namespaces.refused),
                ("Pod", &self.pods.refused),
                ("NetworkPolicy", &self.policies.refused),
                ("Node", &self.nodes.refused),
            ],
        );
        Some(Manifests {
            cluster: Cluster {
                namespaces,
                pods: spare.pods,
                policies: spare.policies,
            },
            warnings,
            nodes: spare.nodes,
            generation: Some(self.generation),
        })
    }

    /// The key of the first pod (in key order) of namespace `ns`. Pod keys are
    /// `namespace/name`, so that is the first key at or after `ns/`.
    fn first_pod_key(&self, ns: &str) -> &str {
        let prefix = format!("{ns}/");
        let pods = &self.pods;
        let i = pods.keys.partition_point(|k| k.as_str() < prefix.as_str());
        match pods.items.get(i) {
            Some(p) if p.namespace == ns => &pods.keys[i],
            // A key not of that form: look the pod up by its field.
            _ => pods
                .items
                .iter()
                .position(|p| p.namespace == ns)
                .map_or("", |i| pods.keys[i].as_str()),
        }
    }
}

/// Counts a pod in (or out of) its namespace.
fn count_pod(counts: &mut HashMap<String, usize>, ns: String, add: bool) {
    if add {
        *counts.entry(ns).or_insert(0) += 1;
    } else if let Some(n) = counts.get_mut(&ns) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&ns);
        }
    }
}

/// Adds namespace `ns`, which only pods name, with its warning naming pod `first`: a cluster
/// cannot hold a pod in a namespace that does not exist, so it is merely not known yet (a
/// watch delivered the pod first).
fn implicit_namespace(
    namespaces: &mut Vec<Namespace>,
    warnings: &mut Vec<String>,
    first: &str,
    ns: &str,
) {
    warnings.push(format!(
        "{}: namespace {ns:?} has no Namespace object; assuming one with only the \
         {NAMESPACE_NAME_LABEL} label",
        ObjectRef::api("Pod", first.to_owned())
    ));
    namespaces.push(Namespace {
        name: ns.to_owned(),
        labels: [(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned())].into(),
    });
}

/// One warning per refused object, by kind then key.
fn refused_warnings<'a>(
    warnings: &mut Vec<String>,
    refused: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) {
    for (kind, list) in refused {
        for (key, why) in list {
            warnings.push(format!(
                "{}: skipped: {why}",
                ObjectRef::api(kind, key.clone())
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use classifier::policy::model::{
        LabelSelector, Labels, NamespaceScope, Peer, PortRef, PortSpec, Protocol, Rule,
    };
    use classifier::policy::{CompileOptions, PolicyTable};
    use proptest::prelude::*;

    fn ns(name: &str) -> Namespace {
        Namespace {
            name: name.to_owned(),
            labels: [(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())].into(),
        }
    }

    fn pod(namespace: &str, name: &str) -> Pod {
        Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ..Pod::default()
        }
    }

    fn listed_empty() -> Cache {
        let mut c = Cache::default();
        c.apply(Msg::Namespace(Update::InitDone));
        c.apply(Msg::Pod(Update::InitDone));
        c.apply(Msg::Policy(Update::InitDone));
        c.apply(Msg::Node(Update::InitDone));
        c
    }

    /// Applies `msgs` to `cache`; checks which of them changed the state and the pods then
    /// held (by key).
    fn check(cache: &mut Cache, msgs: Vec<Msg>, changed: &[bool], pods: &[&str]) {
        let got: Vec<bool> = msgs.into_iter().map(|m| cache.apply(m)).collect();
        assert_eq!(got, changed);
        let m = cache.build().expect("listed");
        let names: Vec<String> = m
            .cluster
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        assert_eq!(names, pods);
    }

    #[test]
    fn nothing_is_built_before_every_resource_is_listed() {
        let mut c = Cache::default();
        c.apply(Msg::Pod(Update::Init));
        c.apply(Msg::Pod(Update::InitApply("a/p".into(), Ok(pod("a", "p")))));
        c.apply(Msg::Pod(Update::InitDone));
        c.apply(Msg::Namespace(Update::InitDone));
        c.apply(Msg::Policy(Update::InitDone));
        assert!(c.build().is_none(), "nodes not listed yet");
        assert!(
            c.apply(Msg::Node(Update::InitDone)),
            "first list is a change"
        );
        assert_eq!(c.build().expect("listed").cluster.pods.len(), 1);
    }

    #[test]
    fn updates_and_relists() {
        let mut c = listed_empty();
        c.apply(Msg::Namespace(Update::Apply("a".into(), Ok(ns("a")))));
        check(
            &mut c,
            vec![
                Msg::Pod(Update::Apply("a/p".into(), Ok(pod("a", "p")))),
                // The same converted value again: no change.
                Msg::Pod(Update::Apply("a/p".into(), Ok(pod("a", "p")))),
                Msg::Pod(Update::Apply("a/q".into(), Ok(pod("a", "q")))),
                Msg::Pod(Update::Delete("a/p".into())),
                Msg::Pod(Update::Delete("a/p".into())),
            ],
            &[true, false, true, true, false],
            &["a/q"],
        );
        // A re-list in progress leaves the live state alone until it completes.
        check(
            &mut c,
            vec![
                Msg::Pod(Update::Init),
                Msg::Pod(Update::InitApply("a/r".into(), Ok(pod("a", "r")))),
            ],
            &[false, false],
            &["a/q"],
        );
        check(&mut c, vec![Msg::Pod(Update::InitDone)], &[true], &["a/r"]);
        // A re-list that finds what is held changes nothing.
        check(
            &mut c,
            vec![
                Msg::Pod(Update::Init),
                Msg::Pod(Update::InitApply("a/r".into(), Ok(pod("a", "r")))),
                Msg::Pod(Update::InitDone),
            ],
            &[false, false, false],
            &["a/r"],
        );
    }

    #[test]
    fn refused_objects_are_named_and_left_out() {
        let mut c = listed_empty();
        c.apply(Msg::Pod(Update::Apply("a/bad".into(), Err("no".into()))));
        c.apply(Msg::Pod(Update::Apply("b/p".into(), Ok(pod("b", "p")))));
        let m = c.build().expect("listed");
        assert_eq!(m.cluster.pods, vec![pod("b", "p")]);
        // b has no Namespace object: one is assumed, as the manifests loader does.
        assert_eq!(m.cluster.namespaces, vec![ns("b")]);
        assert!(
            m.warnings
                .iter()
                .any(|w| w == "kubernetes API (Pod a/bad): skipped: no"),
            "{:?}",
            m.warnings
        );
        assert_eq!(c.counts(Resource::Pods), (1, 1));
    }

    /// The reference: each resource's objects as a plain map, updated as the API describes
    /// (a list replaces everything when done), and a [`Manifests`] assembled from scratch.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Model {
        namespaces: BTreeMap<String, Converted<Namespace>>,
        pods: BTreeMap<String, Converted<Pod>>,
        policies: BTreeMap<String, Converted<NetworkPolicy>>,
        nodes: BTreeMap<String, Converted<NodeInfo>>,
    }

    fn model_update<T: Clone>(
        map: &mut BTreeMap<String, Converted<T>>,
        pending: &mut Option<BTreeMap<String, Converted<T>>>,
        listed: &mut bool,
        u: &Update<T>,
    ) -> bool {
        match u {
            Update::Init => {
                *pending = Some(BTreeMap::new());
                false
            }
            Update::InitApply(k, v) => {
                pending
                    .get_or_insert_with(BTreeMap::new)
                    .insert(k.clone(), v.clone());
                false
            }
            Update::InitDone => {
                let first = !*listed;
                *listed = true;
                *map = pending.take().unwrap_or_default();
                first
            }
            Update::Apply(k, v) => {
                map.insert(k.clone(), v.clone());
                false
            }
            Update::Delete(k) => {
                map.remove(k);
                false
            }
        }
    }

    /// Assembles the full `Manifests` from the maps, the way the cache documents it.
    fn reference_build(m: &Model) -> Manifests {
        fn ok<T: Clone>(map: &BTreeMap<String, Converted<T>>) -> Vec<T> {
            map.values()
                .filter_map(|v| v.as_ref().ok())
                .cloned()
                .collect()
        }
        fn refused<T>(map: &BTreeMap<String, Converted<T>>) -> BTreeMap<String, String> {
            map.iter()
                .filter_map(|(k, v)| v.as_ref().err().map(|w| (k.clone(), w.clone())))
                .collect()
        }
        let mut namespaces = ok(&m.namespaces);
        let pods = ok(&m.pods);
        let known: std::collections::BTreeSet<String> =
            namespaces.iter().map(|n| n.name.clone()).collect();
        let mut implicit = std::collections::BTreeMap::new();
        for (key, p) in m
            .pods
            .iter()
            .filter_map(|(k, v)| Some((k, v.as_ref().ok()?)))
        {
            if !known.contains(&p.namespace) {
                implicit.entry(p.namespace.clone()).or_insert(key.clone());
            }
        }
        let mut warnings = Vec::new();
        for (ns, first) in &implicit {
            implicit_namespace(&mut namespaces, &mut warnings, first, ns);
        }
        refused_warnings(
            &mut warnings,
            [
                ("Namespace", &refused(&m.namespaces)),
                ("Pod", &refused(&m.pods)),
                ("NetworkPolicy", &refused(&m.policies)),
                ("Node", &refused(&m.nodes)),
            ],
        );
        Manifests {
            cluster: Cluster {
                namespaces,
                pods,
                policies: ok(&m.policies),
            },
            warnings,
            nodes: ok(&m.nodes),
            generation: None,
        }
    }

    /// Small universes, so that events hit the same objects again.
    const NAMESPACES: [&str; 3] = ["a", "a-b", "c"];
    const VALUES: [&str; 3] = ["x", "y", "z"];

    fn labels() -> impl Strategy<Value = Labels> {
        proptest::collection::btree_map(
            prop::sample::select(vec!["app", "tier"]).prop_map(str::to_owned),
            prop::sample::select(VALUES.to_vec()).prop_map(str::to_owned),
            0..3,
        )
    }

    fn converted<T: std::fmt::Debug>(
        ok: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Converted<T>> {
        prop_oneof![
            9 => ok.prop_map(Ok),
            1 => prop::sample::select(vec!["bad", "worse"]).prop_map(|w| Err(w.to_owned())),
        ]
    }

    fn any_namespace() -> impl Strategy<Value = (String, Converted<Namespace>)> {
        (prop::sample::select(NAMESPACES.to_vec()), labels()).prop_flat_map(|(name, mut l)| {
            l.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
            let n = Namespace {
                name: name.to_owned(),
                labels: l,
            };
            converted(Just(n)).prop_map(move |v| (name.to_owned(), v))
        })
    }

    fn any_pod() -> impl Strategy<Value = (String, Converted<Pod>)> {
        (
            prop::sample::select(NAMESPACES.to_vec()),
            0..4u8,
            labels(),
            0..3u8,
            prop::option::of(0..2u8),
        )
            .prop_flat_map(|(ns, i, labels, ip, node)| {
                let p = Pod {
                    namespace: ns.to_owned(),
                    name: format!("p{i}"),
                    labels,
                    ips: vec![std::net::IpAddr::from([10, 0, 0, ip])],
                    node: node.map(|n| format!("n{n}")),
                    ..Pod::default()
                };
                converted(Just(p)).prop_map(move |v| (format!("{ns}/p{i}"), v))
            })
    }

    fn any_policy() -> impl Strategy<Value = (String, Converted<NetworkPolicy>)> {
        (
            prop::sample::select(NAMESPACES.to_vec()),
            0..3u8,
            labels(),
            labels(),
            labels(),
            any::<bool>(),
        )
            .prop_flat_map(|(ns, i, sel, from_ns, from_pods, egress)| {
                let selector = |match_labels| LabelSelector {
                    match_labels,
                    match_expressions: Vec::new(),
                };
                // Ingress from selected pods of selected namespaces on TCP 80, so verdicts
                // depend on namespace labels, pod labels and the policy alike.
                let rule = Rule {
                    peers: vec![Peer::Pods {
                        namespaces: NamespaceScope::Selector(selector(from_ns)),
                        pods: selector(from_pods),
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(80)),
                        end_port: None,
                    }],
                };
                let p = NetworkPolicy {
                    namespace: ns.to_owned(),
                    name: format!("np{i}"),
                    pod_selector: selector(sel),
                    ingress_isolation: true,
                    egress_isolation: egress,
                    ingress: vec![rule.clone()],
                    egress: vec![rule],
                };
                converted(Just(p)).prop_map(move |v| (format!("{ns}/np{i}"), v))
            })
    }

    fn any_node() -> impl Strategy<Value = (String, Converted<NodeInfo>)> {
        (0..3u8, 0..2u8).prop_flat_map(|(i, ip)| {
            let n = NodeInfo {
                name: format!("n{i}"),
                pod_cidrs: Vec::new(),
                internal_ips: vec![std::net::IpAddr::from([192, 168, 0, ip])],
            };
            converted(Just(n)).prop_map(move |v| (format!("n{i}"), v))
        })
    }

    /// One step: an event of a resource (`Init`/`InitApply`/`InitDone` included), or a build.
    #[derive(Clone, Debug)]
    enum Step {
        Msg(u8, u8, usize),
        Build,
        Prepare,
        /// Gives back one of the `Manifests` built so far (by index among those held).
        Recycle(usize),
    }

    fn update<T>(kind: u8, key: String, value: Converted<T>) -> Update<T> {
        match kind {
            0 => Update::Init,
            1 => Update::InitApply(key, value),
            2 => Update::InitDone,
            3 => Update::Delete(key),
            _ => Update::Apply(key, value),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random events, builds in between: every build equals the reference's, and
        /// `apply` says "changed" exactly when the reference's state changed.
        #[test]
        fn incremental_manifests_equal_a_rebuild(
            namespaces in proptest::collection::vec(any_namespace(), 8),
            pods in proptest::collection::vec(any_pod(), 16),
            policies in proptest::collection::vec(any_policy(), 8),
            nodes in proptest::collection::vec(any_node(), 4),
            steps in proptest::collection::vec(
                prop_oneof![
                    20 => (0..4u8, 0..8u8, 0..16usize).prop_map(|(r, k, i)| Step::Msg(r, k, i)),
                    2 => Just(Step::Build),
                    1 => Just(Step::Prepare),
                    2 => (0..4usize).prop_map(Step::Recycle),
                ],
                1..120,
            ),
        ) {
            let mut cache = Cache::default();
            let mut model = Model::default();
            let mut pending = (None, None, None, None);
            let mut listed = [false; 4];
            // The `Manifests` built and not given back yet.
            let mut held: Vec<Manifests> = Vec::new();
            // Every resource is listed first (as the watchers do), so builds are possible.
            let mut all = vec![
                Step::Msg(0, 2, 0),
                Step::Msg(1, 2, 0),
                Step::Msg(2, 2, 0),
                Step::Msg(3, 2, 0),
            ];
            all.extend(steps);
            all.push(Step::Build);
            for step in all {
                match step {
                    Step::Msg(r, kind, i) => {
                        let before = model.clone();
                        let (msg, first) = match r {
                            0 => {
                                let (k, v) = namespaces[i % namespaces.len()].clone();
                                let u = update(kind, k, v);
                                let f = model_update(&mut model.namespaces, &mut pending.0, &mut listed[0], &u);
                                (Msg::Namespace(u), f)
                            }
                            1 => {
                                let (k, v) = pods[i % pods.len()].clone();
                                let u = update(kind, k, v);
                                let f = model_update(&mut model.pods, &mut pending.1, &mut listed[1], &u);
                                (Msg::Pod(u), f)
                            }
                            2 => {
                                let (k, v) = policies[i % policies.len()].clone();
                                let u = update(kind, k, v);
                                let f = model_update(&mut model.policies, &mut pending.2, &mut listed[2], &u);
                                (Msg::Policy(u), f)
                            }
                            _ => {
                                let (k, v) = nodes[i % nodes.len()].clone();
                                let u = update(kind, k, v);
                                let f = model_update(&mut model.nodes, &mut pending.3, &mut listed[3], &u);
                                (Msg::Node(u), f)
                            }
                        };
                        let changed = cache.apply(msg);
                        prop_assert_eq!(changed, first || model != before);
                    }
                    Step::Build => {
                        let got = cache.build().expect("listed");
                        let want = reference_build(&model);
                        prop_assert_eq!(&got.cluster, &want.cluster);
                        prop_assert_eq!(&got.nodes, &want.nodes);
                        prop_assert_eq!(&got.warnings, &want.warnings);
                        // And what the node would enforce: the verdicts of both compiles for
                        // every pair of addresses the pods can have, per local node.
                        for node in [None, Some("n0".to_owned())] {
                            let opts = CompileOptions { local_node: node };
                            let (a, a_errors) = PolicyTable::compile(&got.cluster, &opts);
                            let (b, b_errors) = PolicyTable::compile(&want.cluster, &opts);
                            prop_assert_eq!(a_errors, b_errors);
                            prop_assert_eq!(
                                a.endpoints().map(|(_, i)| i.clone()).collect::<Vec<_>>(),
                                b.endpoints().map(|(_, i)| i.clone()).collect::<Vec<_>>()
                            );
                            for src in 0..4u8 {
                                for dst in 0..4u8 {
                                    let (s, d) = (
                                        std::net::IpAddr::from([10, 0, 0, src]),
                                        std::net::IpAddr::from([10, 0, 0, dst]),
                                    );
                                    for dport in [Some(80), None] {
                                        prop_assert_eq!(
                                            a.check(s, d, 6, dport),
                                            b.check(s, d, 6, dport)
                                        );
                                    }
                                }
                            }
                        }
                        held.push(got);
                        for r in Resource::ALL {
                            let (ok, bad) = cache.counts(r);
                            let (want_ok, want_bad) = match r {
                                Resource::Namespaces => count(&model.namespaces),
                                Resource::Pods => count(&model.pods),
                                Resource::NetworkPolicies => count(&model.policies),
                                Resource::Nodes => count(&model.nodes),
                            };
                            prop_assert_eq!((ok, bad), (want_ok, want_bad), "{}", r);
                        }
                    }
                    Step::Prepare => cache.prepare(true),
                    Step::Recycle(i) => {
                        if !held.is_empty() {
                            let m = held.remove(i % held.len());
                            let _ = cache.recycle(m);
                        }
                    }
                }
            }
        }
    }

    fn count<T>(map: &BTreeMap<String, Converted<T>>) -> Counts {
        let bad = map.values().filter(|v| v.is_err()).count();
        (map.len() - bad, bad)
    }
}
