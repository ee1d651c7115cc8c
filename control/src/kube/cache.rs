//! The datastore's cache: the compact model objects of every watched resource, and the full
//! [`Manifests`] built from them.
//!
//! Input: [`Msg`]s, one per watcher event, each carrying an object already converted into
//! the model (or the reason it was refused). Output: a [`Manifests`] on request.
//!
//! Invariant: a re-list fills a side table and replaces the live one only when it is
//! complete (`InitDone`), so a [`Manifests`] never holds a half-listed resource; and
//! [`Cache::build`] refuses (returns `None`) until every resource has been listed once, so
//! the first snapshot is never empty or partial.

use std::collections::BTreeMap;

use classifier::policy::model::{Cluster, Namespace, NetworkPolicy, Pod};

use super::Resource;
use crate::error::ObjectRef;
use crate::manifests::{Manifests, NodeInfo, add_implicit_namespace};

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

/// The objects of one resource.
#[derive(Debug)]
struct Store<T> {
    live: BTreeMap<String, Converted<T>>,
    /// The list in progress, if any.
    pending: Option<BTreeMap<String, Converted<T>>>,
    /// Whether a list has completed at least once.
    listed: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            live: BTreeMap::new(),
            pending: None,
            listed: false,
        }
    }
}

impl<T: PartialEq> Store<T> {
    /// Applies `u`; returns whether the live objects changed. An update that converts to the
    /// value already held (a pod's status heartbeat, a node's condition) changes nothing,
    /// so it causes no new snapshot.
    fn apply(&mut self, u: Update<T>) -> bool {
        match u {
            Update::Init => {
                self.pending = Some(BTreeMap::new());
                false
            }
            Update::InitApply(key, value) => {
                self.pending
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, value);
                false
            }
            Update::InitDone => {
                let listed = self.pending.take().unwrap_or_default();
                let first = !self.listed;
                self.listed = true;
                let changed = listed != self.live;
                self.live = listed;
                first || changed
            }
            Update::Apply(key, value) => {
                if self.live.get(&key) == Some(&value) {
                    return false;
                }
                self.live.insert(key, value);
                true
            }
            Update::Delete(key) => self.live.remove(&key).is_some(),
        }
    }

    fn ok(&self) -> impl Iterator<Item = &T> {
        self.live.values().filter_map(|v| v.as_ref().ok())
    }

    fn rejected(&self) -> impl Iterator<Item = (&String, &String)> {
        self.live
            .iter()
            .filter_map(|(k, v)| v.as_ref().err().map(|why| (k, why)))
    }
}

/// Every watched resource's objects.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    nodes: Store<NodeInfo>,
}

/// Object counts of one resource: `(usable, refused)`.
pub(crate) type Counts = (usize, usize);

impl Cache {
    /// Applies one update; returns whether the cluster's state changed. Cost: one map
    /// operation (a completed re-list also compares the new objects with the old).
    pub(crate) fn apply(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Namespace(u) => self.namespaces.apply(u),
            Msg::Pod(u) => self.pods.apply(u),
            Msg::Policy(u) => self.policies.apply(u),
            Msg::Node(u) => self.nodes.apply(u),
        }
    }

    /// Whether every resource has completed its initial list.
    pub(crate) fn listed(&self) -> bool {
        self.namespaces.listed && self.pods.listed && self.policies.listed && self.nodes.listed
    }

    /// How many objects of `r` are held, usable and refused.
    pub(crate) fn counts(&self, r: Resource) -> Counts {
        fn count<T>(s: &Store<T>) -> Counts {
            let bad = s.live.values().filter(|v| v.is_err()).count();
            (s.live.len() - bad, bad)
        }
        match r {
            Resource::Namespaces => count(&self.namespaces),
            Resource::Pods => count(&self.pods),
            Resource::NetworkPolicies => count(&self.policies),
            Resource::Nodes => count(&self.nodes),
        }
    }

    /// The full state as [`Manifests`], objects sorted by key; `None` until every resource
    /// has been listed once. Refused objects are left out, each named in a warning.
    pub(crate) fn build(&self) -> Option<Manifests> {
        if !self.listed() {
            return None;
        }
        let mut warnings = Vec::new();
        let mut cluster = Cluster {
            namespaces: self.namespaces.ok().cloned().collect(),
            ..Cluster::default()
        };
        let mut known: std::collections::HashSet<String> =
            cluster.namespaces.iter().map(|n| n.name.clone()).collect();
        for pod in self.pods.ok() {
            if known.contains(&pod.namespace) {
                cluster.pods.push(pod.clone());
                continue;
            }
            let at = ObjectRef::api("Pod", format!("{}/{}", pod.namespace, pod.name));
            add_implicit_namespace(&mut cluster, &mut known, &mut warnings, &at, pod);
            cluster.pods.push(pod.clone());
        }
        cluster.policies = self.policies.ok().cloned().collect();
        let refused = [
            ("Namespace", self.namespaces.rejected().collect::<Vec<_>>()),
            ("Pod", self.pods.rejected().collect()),
            ("NetworkPolicy", self.policies.rejected().collect()),
            ("Node", self.nodes.rejected().collect()),
        ];
        for (kind, list) in refused {
            for (key, why) in list {
                warnings.push(format!(
                    "{}: skipped: {why}",
                    ObjectRef::api(kind, key.clone())
                ));
            }
        }
        Some(Manifests {
            cluster,
            warnings,
            nodes: self.nodes.ok().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Namespace {
        Namespace {
            name: name.to_owned(),
            labels: [("kubernetes.io/metadata.name".to_owned(), name.to_owned())].into(),
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
}
