//! The Kubernetes datastore: the cluster's Pods, Namespaces, NetworkPolicies
//! (networking.k8s.io/v1) and Nodes, followed with kube's watchers, as [`Manifests`].
//!
//! Input: a [`::kube::Config`] (in-cluster service account or KUBECONFIG, or a test server's
//! URL) and [`KubeOptions`]. Output: full [`Manifests`] — the type
//! [`crate::manifests::load_dir`] returns, so the agent compiles either source the same way —
//! on [`KubeDatastore::updates`], and the health of the view on [`KubeDatastore::status`].
//!
//! The datastore runs on its own thread with a single-threaded tokio runtime: one task per
//! resource drives a [`::kube::runtime::watcher`] and converts every object on arrival into
//! the classifier's model (the k8s object is dropped at once; only what policy and routing
//! need is kept), and one task owns the [`cache::Cache`] and publishes. The cache applies
//! each event to sorted vectors in place, so a snapshot costs the events it holds, not a
//! rebuild of the cluster. Bursts of events are coalesced: a snapshot is sent once no change
//! has arrived for [`KubeOptions::coalesce_quiet`], and at the latest
//! [`KubeOptions::coalesce`] after the first change that follows the previous snapshot,
//! whatever arrives in between, so the delay is bounded.
//!
//! Fail-static:
//! - no [`Manifests`] is sent before every resource has completed its initial list, and a
//!   re-list replaces a resource's objects only once complete, so no snapshot is empty or
//!   partial;
//! - on any watch error (API server unreachable, connection refused, `410 Gone`) the
//!   resource's watcher is dropped and, after an exponential backoff with jitter (none after
//!   a 410: that server answers), started afresh: a full re-list, which also covers
//!   "re-list on 410" and "resync on reconnect".
//!   Meanwhile nothing is sent, so the consumer keeps forwarding on its last snapshot;
//! - [`SyncStatus`] says which resources are connected and since when the view may be stale.
//!
//! An object the converter refuses (one the API would not have admitted, or ocelot cannot
//! express) is logged with its kind and `namespace/name`, counted in
//! [`ResourceStatus::rejected`], named in [`Manifests::warnings`] and left out; the rest of
//! the cluster still applies.
//!
//! **Architecture Invariant**: the datastore never keeps whole Kubernetes objects; its
//! state is the compact model plus one converted value per refused object's reason.

mod cache;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::kube::runtime::watcher;
use ::kube::{Api, Client, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use tokio::sync::mpsc;

use self::cache::{Cache, Converted, Msg, Update};
use crate::error::{Error, ObjectRef};
use crate::manifests::{self, Manifests};

/// A watched resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `/api/v1/namespaces`.
    Namespaces,
    /// `/api/v1/pods`.
    Pods,
    /// `/apis/networking.k8s.io/v1/networkpolicies`.
    NetworkPolicies,
    /// `/api/v1/nodes`.
    Nodes,
}

impl Resource {
    /// Every watched resource, in [`SyncStatus::resources`] order.
    pub const ALL: [Resource; 4] = [
        Resource::Namespaces,
        Resource::Pods,
        Resource::NetworkPolicies,
        Resource::Nodes,
    ];

    /// The resource's plural name in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::Nodes => "nodes",
        }
    }

    const fn index(self) -> usize {
        match self {
            Resource::Namespaces => 0,
            Resource::Pods => 1,
            Resource::NetworkPolicies => 2,
            Resource::Nodes => 3,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the datastore connects and publishes.
#[derive(Clone)]
pub struct KubeOptions {
    /// The client configuration; `None` infers it (in-cluster service account, else
    /// KUBECONFIG) on the datastore's thread.
    pub config: Option<::kube::Config>,
    /// This node's name (`NODE_NAME`, from the downward API).
    pub node_name: Option<String>,
    /// The longest a change waits for others to join its snapshot: a snapshot is sent at
    /// most this long after the first change it holds, however busy the cluster.
    pub coalesce: Duration,
    /// A snapshot is sent once no change has arrived for this long (and `coalesce` has not
    /// passed first): one API write's events, and a burst of writes, arrive well inside it,
    /// so they make one snapshot, while a lone change waits only this long.
    pub coalesce_quiet: Duration,
    /// The first retry delay after a watch error; doubled per failure up to `backoff_max`.
    pub backoff_min: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
    /// Objects per list page (`limit`).
    pub page_size: u32,
}

impl fmt::Debug for KubeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config holds credentials; show only where it points.
        f.debug_struct("KubeOptions")
            .field("cluster_url", &self.config.as_ref().map(|c| &c.cluster_url))
            .field("node_name", &self.node_name)
            .field("coalesce", &self.coalesce)
            .field("coalesce_quiet", &self.coalesce_quiet)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            config: None,
            node_name: None,
            coalesce: Duration::from_millis(50),
            coalesce_quiet: Duration::from_millis(5),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            page_size: 500,
        }
    }
}

impl KubeOptions {
    /// Defaults, the client configuration inferred, and the node's name from `NODE_NAME`.
    pub fn from_env() -> KubeOptions {
        KubeOptions {
            node_name: std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()),
            ..KubeOptions::default()
        }
    }

    /// Defaults with an explicit client configuration (a test server, a chosen context).
    pub fn with_config(config: ::kube::Config) -> KubeOptions {
        KubeOptions {
            config: Some(config),
            ..KubeOptions::default()
        }
    }
}

/// The health of one resource's watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceStatus {
    /// Which resource.
    pub resource: Resource,
    /// Whether an initial list has completed (at least once).
    pub synced: bool,
    /// Whether the watch is up: set by a completed list or a watch event, cleared by an
    /// error (and not set again until a re-list completes).
    pub connected: bool,
    /// When the last full list completed.
    pub last_list: Option<Instant>,
    /// Since when the watch has been failing (`None` while connected).
    pub disconnected_since: Option<Instant>,
    /// Completed lists, the first included (so re-lists are `lists - 1`).
    pub lists: u64,
    /// Watch and list errors.
    pub errors: u64,
    /// The last error, as text.
    pub last_error: Option<String>,
    /// Objects in the last snapshot sent.
    pub objects: usize,
    /// Objects the converter refused, as of the last snapshot sent (left out of it).
    pub rejected: usize,
}

impl ResourceStatus {
    fn new(resource: Resource, started: Instant) -> ResourceStatus {
        ResourceStatus {
            resource,
            synced: false,
            connected: false,
            last_list: None,
            disconnected_since: Some(started),
            lists: 0,
            errors: 0,
            last_error: None,
            objects: 0,
            rejected: 0,
        }
    }
}

/// The health of the datastore's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// One entry per [`Resource::ALL`], in that order.
    pub resources: [ResourceStatus; 4],
    /// Snapshots sent on [`KubeDatastore::updates`].
    pub updates: u64,
    /// When the last snapshot was sent.
    pub last_update: Option<Instant>,
}

impl SyncStatus {
    fn new(started: Instant) -> SyncStatus {
        SyncStatus {
            resources: Resource::ALL.map(|r| ResourceStatus::new(r, started)),
            updates: 0,
            last_update: None,
        }
    }

    /// The status of `r`.
    pub fn resource(&self, r: Resource) -> &ResourceStatus {
        // `index` covers every variant and `resources` has one entry per variant.
        &self.resources[r.index()]
    }

    /// Whether every resource completed its initial list (a snapshot has been built).
    pub fn synced(&self) -> bool {
        self.resources.iter().all(|r| r.synced)
    }

    /// Whether every resource's watch is up.
    pub fn connected(&self) -> bool {
        self.resources.iter().all(|r| r.connected)
    }

    /// How long the view may have missed changes: zero while every watch is up, else the
    /// time since the earliest resource lost its watch (or since start, before the first
    /// sync).
    pub fn staleness(&self, now: Instant) -> Duration {
        self.resources
            .iter()
            .filter_map(|r| r.disconnected_since)
            .min()
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// Gives [`Manifests`] back to the datastore that sent them, unchanged, once the consumer has
/// a newer one. The datastore then makes its next snapshot from it — replaying the few edits
/// made since it was sent — instead of copying every object and leaving the consumer to free
/// the old copy: on a large cluster both take milliseconds per update. A consumer that gives
/// nothing back still gets every snapshot; the datastore copies instead.
#[derive(Clone, Debug)]
pub struct Recycler {
    tx: tokio::sync::mpsc::UnboundedSender<Manifests>,
}

impl Recycler {
    /// Gives `m` back (dropped here if the datastore has stopped).
    pub fn recycle(&self, m: Manifests) {
        // A send fails only once the datastore is gone; the value is then dropped.
        let _ = self.tx.send(m);
    }
}

/// A running Kubernetes datastore; dropping it stops the thread.
pub struct KubeDatastore {
    updates: crossbeam_channel::Receiver<Manifests>,
    recycle: Recycler,
    status: Arc<Mutex<SyncStatus>>,
    node_name: Option<String>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for KubeDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeDatastore")
            .field("node_name", &self.node_name)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl KubeDatastore {
    /// Full snapshots of the cluster, one per coalesced burst of changes. The channel is
    /// unbounded; a consumer that falls behind should use only the newest
    /// (`try_iter().last()`), as each snapshot is complete.
    pub fn updates(&self) -> &crossbeam_channel::Receiver<Manifests> {
        &self.updates
    }

    /// Gives back a [`Manifests`] received from [`KubeDatastore::updates`] that the consumer
    /// no longer needs (see [`Recycler`]).
    pub fn recycle(&self, m: Manifests) {
        self.recycle.recycle(m);
    }

    /// A handle for giving `Manifests` back from another thread.
    pub fn recycler(&self) -> Recycler {
        self.recycle.clone()
    }

    /// The health of the view (a copy, taken under a lock held only for updates).
    pub fn status(&self) -> SyncStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This node's name, from [`KubeOptions::node_name`].
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the datastore on its own thread. Returns once the client is built (so a missing
/// configuration is an error here); the watches then connect, and retry, in the background.
///
/// The client is built on the datastore's own runtime rather than passed in, because a
/// `kube::Client` lives on the runtime it was created on.
pub fn spawn(opts: KubeOptions) -> Result<KubeDatastore, Error> {
    let started = Instant::now();
    let status = Arc::new(Mutex::new(SyncStatus::new(started)));
    let (updates_tx, updates) = crossbeam_channel::unbounded();
    let (recycle_tx, recycle_rx) = tokio::sync::mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let node_name = opts.node_name.clone();
    let thread_status = Arc::clone(&status);
    let thread = std::thread::Builder::new()
        .name("ocelot-kube".to_owned())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(Error::KubeDatastore {
                        what: format!("tokio runtime: {e}"),
                    }));
                    return;
                }
            };
            rt.block_on(async move {
                let client = match make_client(opts.config.clone()).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                run(
                    client,
                    opts,
                    thread_status,
                    (updates_tx, recycle_rx),
                    shutdown_rx,
                )
                .await;
            });
        })
        .map_err(|e| Error::KubeDatastore {
            what: format!("thread: {e}"),
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(KubeDatastore {
            updates,
            recycle: Recycler { tx: recycle_tx },
            status,
            node_name,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(Error::KubeDatastore {
                what: "the datastore thread exited while starting".to_owned(),
            })
        }
    }
}

async fn make_client(config: Option<::kube::Config>) -> Result<Client, Error> {
    let config = match config {
        Some(c) => c,
        None => ::kube::Config::infer()
            .await
            .map_err(|e| Error::KubeClient {
                what: "no in-cluster service account or usable KUBECONFIG",
                source: Box::new(e),
            })?,
    };
    Client::try_from(config).map_err(|e| Error::KubeClient {
        what: "building the HTTP client",
        source: Box::new(e),
    })
}

/// Runs the watches and the cache until `shutdown` fires.
async fn run(
    client: Client,
    opts: KubeOptions,
    status: Arc<Mutex<SyncStatus>>,
    (updates, mut recycled): (
        crossbeam_channel::Sender<Manifests>,
        mpsc::UnboundedReceiver<Manifests>,
    ),
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cfg = watcher::Config::default().page_size(opts.page_size);
    let w = Watch {
        cfg,
        tx,
        status: Arc::clone(&status),
        backoff: (opts.backoff_min, opts.backoff_max),
    };
    let tasks = [
        tokio::spawn(w.clone().run(
            Api::<core::Namespace>::all(client.clone()),
            Resource::Namespaces,
            |ns: &core::Namespace| Ok(manifests::convert_namespace(ns)),
            Msg::Namespace,
        )),
        tokio::spawn(w.clone().run(
            Api::<core::Pod>::all(client.clone()),
            Resource::Pods,
            |p: &core::Pod| manifests::convert_pod(&api_ref("Pod", p), p),
            Msg::Pod,
        )),
        tokio::spawn(w.clone().run(
            Api::<net::NetworkPolicy>::all(client.clone()),
            Resource::NetworkPolicies,
            |p: &net::NetworkPolicy| manifests::convert_policy(&api_ref("NetworkPolicy", p), p),
            Msg::Policy,
        )),
        tokio::spawn(w.run(
            Api::<core::Node>::all(client),
            Resource::Nodes,
            |n: &core::Node| manifests::convert_node(&api_ref("Node", n), n),
            Msg::Node,
        )),
    ];
    let mut cache = Cache::default();
    let mut window = Window::default();
    // Frees what is given back too late to be the next spare: not on this task, which would
    // hold up the next change meanwhile.
    let reaper = crate::reap::Reaper::spawn("ocelot-kube-reap").ok();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if cache.apply(msg) {
                    window.change(tokio::time::Instant::now(), &opts);
                }
            }
            () = sleep_until(window.deadline()) => {
                // Until every resource is listed nothing is sent (the window closes); the
                // list that completes the set is itself a change and opens it again.
                window = Window::default();
                if let Some(m) = cache.build() {
                    // The status is updated first, so a consumer that has the snapshot sees
                    // the status that goes with it.
                    {
                        let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
                        for r in Resource::ALL {
                            let (objects, rejected) = cache.counts(r);
                            let rs = &mut s.resources[r.index()];
                            rs.objects = objects;
                            rs.rejected = rejected;
                        }
                        s.updates += 1;
                        s.last_update = Some(Instant::now());
                    }
                    if updates.send(m).is_err() {
                        tracing::debug!("kube datastore: the consumer is gone");
                    }
                    // The copy for the next snapshot, made now rather than when the next
                    // change is waiting for it (unless the consumer gives snapshots back:
                    // then the one it returns becomes the next).
                    cache.prepare(true);
                }
            }
            Some(m) = recycled.recv() => {
                // Not adopted (a spare exists, or it is too old): freed elsewhere.
                if let Some(m) = cache.recycle(m)
                    && let Some(r) = &reaper
                {
                    r.drop_later(m);
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    for t in tasks {
        t.abort();
    }
}

/// When the pending changes are sent: once no change has arrived for `coalesce_quiet`, and
/// at the latest `coalesce` after the first of them.
#[derive(Debug, Default)]
struct Window {
    /// `(first change + coalesce, last change + coalesce_quiet)`, while a change is pending.
    pending: Option<(tokio::time::Instant, tokio::time::Instant)>,
}

impl Window {
    fn change(&mut self, now: tokio::time::Instant, opts: &KubeOptions) {
        let quiet = now + opts.coalesce_quiet.min(opts.coalesce);
        self.pending = Some(match self.pending {
            None => (now + opts.coalesce, quiet),
            Some((limit, _)) => (limit, quiet),
        });
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.pending.map(|(limit, quiet)| limit.min(quiet))
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The reference a converter error names: kind and `namespace/name` (or `name`).
fn api_ref<K: ResourceExt>(kind: &str, obj: &K) -> ObjectRef {
    ObjectRef::api(kind, key(obj))
}

/// The cache key: `namespace/name`, or `name` for cluster objects.
fn key<K: ResourceExt>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// What every resource's watch task shares.
#[derive(Clone)]
struct Watch {
    cfg: watcher::Config,
    tx: mpsc::UnboundedSender<Msg>,
    status: Arc<Mutex<SyncStatus>>,
    backoff: (Duration, Duration),
}

impl Watch {
    /// Watches one resource forever: converts each object on arrival and forwards it; on
    /// an error, drops the watcher and starts a fresh one (a full re-list) after a backoff.
    async fn run<K, T>(
        self,
        api: Api<K>,
        resource: Resource,
        convert: fn(&K) -> Result<T, Error>,
        wrap: fn(Update<T>) -> Msg,
    ) where
        K: ::kube::Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
        T: Send + 'static,
    {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1);
        let converted = |obj: &K| -> (String, Converted<T>) {
            let value = convert(obj).map_err(|e| {
                tracing::warn!(resource = %resource, "object refused: {e}");
                match e {
                    Error::Invalid { why, .. } => why,
                    other => other.to_string(),
                }
            });
            (key(obj), value)
        };
        loop {
            let mut stream = watcher(api.clone(), self.cfg.clone()).boxed();
            let mut gone = false;
            while let Some(item) = stream.next().await {
                let update = match item {
                    Ok(watcher::Event::Init) => Update::Init,
                    Ok(watcher::Event::InitApply(obj)) => {
                        let (k, v) = converted(&obj);
                        Update::InitApply(k, v)
                    }
                    Ok(watcher::Event::InitDone) => Update::InitDone,
                    Ok(watcher::Event::Apply(obj)) => {
                        let (k, v) = converted(&obj);
                        Update::Apply(k, v)
                    }
                    Ok(watcher::Event::Delete(obj)) => Update::Delete(key(&obj)),
                    Err(e) => {
                        tracing::warn!(resource = %resource, "watch failed, will re-list: {e}");
                        gone = is_gone(&e);
                        self.record(resource, |r| {
                            r.errors += 1;
                            r.last_error = Some(e.to_string());
                            if r.connected || r.disconnected_since.is_none() {
                                r.disconnected_since = Some(Instant::now());
                            }
                            r.connected = false;
                        });
                        break;
                    }
                };
                // `Init` is sent before any request, and a list in progress has not yet
                // replaced the stale objects: the view is current again only from `InitDone`
                // (or an event of a watch, which only follows one).
                if !matches!(update, Update::Init | Update::InitApply(..)) {
                    let done = matches!(update, Update::InitDone);
                    self.record(resource, |r| {
                        r.connected = true;
                        r.disconnected_since = None;
                        if done {
                            r.synced = true;
                            r.lists += 1;
                            r.last_list = Some(Instant::now());
                        }
                    });
                    if done {
                        backoff.reset();
                    }
                }
                if self.tx.send(wrap(update)).is_err() {
                    return;
                }
            }
            // 410 Gone comes from a server that answers: re-list at once. Anything else may
            // be a server that is down or overloaded, so wait.
            if !gone {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    fn record(&self, resource: Resource, f: impl FnOnce(&mut ResourceStatus)) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s.resources[resource.index()]);
    }
}

/// Whether the server said the version the watcher asked for has been compacted away
/// (`410 Gone`, as a watch event or as the answer to a list's `continue`).
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
        | watcher::Error::WatchFailed(::kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window that
/// doubles per failure, so agents on every node do not retry in lockstep after an API
/// server restart.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    window: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            window: min,
            random: RandomState::new(),
            draws: 0,
        }
    }

    fn reset(&mut self) {
        self.window = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let mut h = self.random.build_hasher();
        h.write_u64(self.draws);
        self.draws = self.draws.wrapping_add(1);
        let fraction = 0.5 + (h.finish() % 1024) as f64 / 2048.0;
        let delay = self.window.mul_f64(fraction).max(self.min);
        self.window = self.window.saturating_mul(2).min(self.max);
        delay
    }
}

/// Converts a Pod the way the datastore does on arrival; what ocelot keeps of it.
pub fn convert_pod(pod: &core::Pod) -> Result<classifier::policy::model::Pod, Error> {
    manifests::convert_pod(&api_ref("Pod", pod), pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(800);
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        // Window 100, 200, 400, 800, 800, 800 ms; each delay is in [window/2, window] and
        // never below the minimum.
        for (d, w) in delays.iter().zip([100, 200, 400, 800, 800, 800]) {
            let w = Duration::from_millis(w);
            assert!(
                *d >= min && *d >= w / 2 && *d <= w,
                "{d:?} for window {w:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn a_snapshot_waits_for_quiet_but_never_past_the_bound() {
        let opts = KubeOptions {
            coalesce: Duration::from_millis(50),
            coalesce_quiet: Duration::from_millis(5),
            ..KubeOptions::default()
        };
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let mut w = Window::default();
        assert_eq!(w.deadline(), None, "nothing pending");
        // (change at, deadline after it): each change pushes the quiet period on, up to the
        // bound counted from the first.
        for (at, deadline) in [(0, 5), (3, 8), (7, 12), (44, 49), (48, 50), (49, 50)] {
            w.change(t0 + ms(at), &opts);
            assert_eq!(w.deadline(), Some(t0 + ms(deadline)), "change at {at} ms");
        }
        // A quiet period longer than the bound is the bound.
        let long = KubeOptions {
            coalesce_quiet: Duration::from_millis(80),
            ..opts
        };
        let mut w = Window::default();
        w.change(t0, &long);
        assert_eq!(w.deadline(), Some(t0 + ms(50)));
    }

    #[test]
    fn only_410_is_gone() {
        use ::kube::core::Status;
        let status = |code| Status::failure("x", "Expired").with_code(code).boxed();
        let check = |e: watcher::Error, expected: bool| assert_eq!(is_gone(&e), expected, "{e:?}");
        check(watcher::Error::WatchError(status(410)), true);
        check(watcher::Error::WatchError(status(500)), false);
        check(
            watcher::Error::InitialListFailed(::kube::Error::Api(status(410))),
            true,
        );
        check(
            watcher::Error::WatchStartFailed(::kube::Error::Api(status(403))),
            false,
        );
        check(watcher::Error::NoResourceVersion, false);
    }

    #[test]
    fn staleness_is_zero_only_when_every_watch_is_up() {
        let t0 = Instant::now();
        let mut s = SyncStatus::new(t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(s.staleness(later), Duration::from_secs(5));
        for r in &mut s.resources {
            r.connected = true;
            r.disconnected_since = None;
        }
        assert_eq!(s.staleness(later), Duration::ZERO);
        s.resources[2].disconnected_since = Some(t0 + Duration::from_secs(1));
        assert_eq!(s.staleness(later), Duration::from_secs(4));
    }
}
