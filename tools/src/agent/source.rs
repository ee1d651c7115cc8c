//! Where the agent's view of the cluster comes from: manifest directories (the embedded
//! datastore) or the Kubernetes API (`control::kube`).
//!
//! Both yield whole [`Manifests`]; the control thread compiles either the same way.
//!
//! - **Directories**: every `*.yaml`, `*.yml`, `*.json` file directly inside each directory,
//!   read as one set (the lab passes the user's directory and one of its own). A change is
//!   noticed by a digest of the files' names and contents ([`digest`]); a set that fails to
//!   load is reported and the previous view stays in force.
//! - **Kubernetes**: the datastore's coalesced updates. Until the first complete list the
//!   agent attaches nothing; when the API server goes away the last view stays in force
//!   (fail-static) and the status file says how stale it is.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use control::kube::{KubeDatastore, KubeOptions};
use control::manifests::Manifests;
use serde_json::{Value, json};

/// Which datastore `ocelot run` follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datastore {
    /// Manifest directories.
    Manifests(Vec<PathBuf>),
    /// The Kubernetes API (in-cluster service account or KUBECONFIG).
    Kubernetes,
}

/// The manifest files of a directory, as `control::load_dir` reads them (sorted).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A digest of the manifest files of `dirs` (names and contents, in order). Equal digests
/// mean the agent would load the same objects. Stable within one build of ocelot.
pub fn digest(dirs: &[PathBuf]) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for dir in dirs {
        for f in manifest_files(dir)? {
            f.file_name().hash(&mut h);
            std::fs::read(&f)?.hash(&mut h);
        }
    }
    Ok(h.finish())
}

/// Loads every manifest file of `dirs` as one set.
pub fn load(dirs: &[PathBuf]) -> Result<Manifests> {
    let mut texts = Vec::new();
    for dir in dirs {
        let files = manifest_files(dir)
            .with_context(|| format!("reading manifests directory {}", dir.display()))?;
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            texts.push((f, text));
        }
    }
    let m = Manifests::from_texts(texts.iter().map(|(p, t)| (p.clone(), t.as_str())))
        .with_context(|| {
            format!(
                "loading manifests from {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    for w in &m.warnings {
        tracing::warn!("{w}");
    }
    Ok(m)
}

/// A followed datastore.
#[derive(Debug)]
pub enum Source {
    /// Directories and the digest of what was last loaded.
    Dirs {
        /// The directories.
        dirs: Vec<PathBuf>,
        /// Digest of the files the current view came from.
        digest: u64,
    },
    /// The Kubernetes datastore.
    Kube {
        /// Its thread and channel.
        datastore: Box<KubeDatastore>,
        /// Views received.
        updates: u64,
    },
}

impl Source {
    /// Opens the datastore and returns its first complete view. For Kubernetes this waits
    /// (until `stop`) for the first full list of every resource.
    pub fn open(ds: &Datastore, node_name: &str, stop: &AtomicBool) -> Result<(Source, Manifests)> {
        match ds {
            Datastore::Manifests(dirs) => {
                let digest = digest(dirs).unwrap_or(0);
                let m = load(dirs)?;
                Ok((
                    Source::Dirs {
                        dirs: dirs.clone(),
                        digest,
                    },
                    m,
                ))
            }
            Datastore::Kubernetes => {
                let mut opts = KubeOptions::from_env();
                opts.node_name = Some(node_name.to_owned());
                let datastore =
                    control::kube::spawn(opts).context("starting the Kubernetes datastore")?;
                let started = Instant::now();
                let mut next_log = Duration::from_secs(10);
                loop {
                    if stop.load(Ordering::Relaxed) {
                        bail!("stopped before the first sync with the API server");
                    }
                    match datastore.updates().recv_timeout(Duration::from_millis(100)) {
                        Ok(m) => {
                            tracing::info!(
                                "first sync with the API server after {:.1} s",
                                started.elapsed().as_secs_f64()
                            );
                            return Ok((
                                Source::Kube {
                                    datastore: Box::new(datastore),
                                    updates: 1,
                                },
                                m,
                            ));
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            return Err(anyhow!("the Kubernetes datastore stopped"));
                        }
                    }
                    if started.elapsed() >= next_log {
                        let s = datastore.status();
                        tracing::warn!(
                            "still waiting for the first sync with the API server ({:.0} s): {}",
                            started.elapsed().as_secs_f64(),
                            s.resources
                                .iter()
                                .map(|r| format!(
                                    "{}: {}",
                                    r.resource,
                                    r.last_error.as_deref().unwrap_or(if r.synced {
                                        "synced"
                                    } else {
                                        "listing"
                                    })
                                ))
                                .collect::<Vec<_>>()
                                .join("; ")
                        );
                        next_log += Duration::from_secs(10);
                    }
                }
            }
        }
    }

    /// A newer view, if there is one. `Err` is a view that failed to load (the caller keeps
    /// the old one).
    pub fn poll(&mut self) -> Option<Result<Manifests>> {
        match self {
            Source::Dirs { dirs, digest: seen } => {
                let now = digest(dirs).ok()?;
                if now == *seen {
                    return None;
                }
                *seen = now;
                Some(load(dirs))
            }
            Source::Kube { datastore, updates } => {
                // Only the newest view matters.
                let mut latest: Option<Manifests> = None;
                while let Ok(m) = datastore.updates().try_recv() {
                    if let Some(older) = latest.replace(m) {
                        datastore.recycle(older);
                    }
                    *updates += 1;
                }
                latest.map(Ok)
            }
        }
    }

    /// As [`Source::poll`], waiting up to `timeout` for a newer view: a Kubernetes update
    /// returns at once (no polling delay on top of the datastore's coalescing); a manifests
    /// directory is looked at after the wait.
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<Manifests>> {
        match self {
            Source::Dirs { .. } => {
                std::thread::sleep(timeout);
                self.poll()
            }
            Source::Kube { datastore, updates } => {
                let first = match datastore.updates().recv_timeout(timeout) {
                    Ok(m) => m,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => return None,
                    // The datastore's thread is gone (its status says why): no busy loop.
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(timeout);
                        return None;
                    }
                };
                *updates += 1;
                // Only the newest view matters.
                let mut latest = first;
                while let Ok(m) = datastore.updates().try_recv() {
                    datastore.recycle(std::mem::replace(&mut latest, m));
                    *updates += 1;
                }
                Some(Ok(latest))
            }
        }
    }

    /// Takes back a view the agent has replaced: the Kubernetes datastore makes its next view
    /// from it (`KubeDatastore::recycle`); a directory's is returned, for the caller to free.
    pub fn give_back(&self, m: Manifests) -> Option<Manifests> {
        match self {
            Source::Dirs { .. } => Some(m),
            Source::Kube { datastore, .. } => {
                datastore.recycle(m);
                None
            }
        }
    }

    /// What the status file says about the view: its digest (directories) or update count
    /// and staleness (Kubernetes).
    pub fn status(&self) -> Value {
        match self {
            Source::Dirs { dirs, digest } => json!({
                "datastore": "manifests",
                "directories": dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
                "manifests_digest": format!("{digest:016x}"),
            }),
            Source::Kube { datastore, updates } => {
                let s = datastore.status();
                json!({
                    "datastore": "kubernetes",
                    "updates": updates,
                    "connected": s.connected(),
                    "synced": s.synced(),
                    "stale_seconds": s.staleness(Instant::now()).as_secs_f64(),
                    "resources": s.resources.iter().map(|r| json!({
                        "resource": r.resource.to_string(),
                        "connected": r.connected,
                        "objects": r.objects,
                        "rejected": r.rejected,
                        "errors": r.errors,
                        "last_error": r.last_error,
                    })).collect::<Vec<_>>(),
                })
            }
        }
    }

    /// The digest of the directories' view (0 for Kubernetes).
    pub fn digest(&self) -> u64 {
        match self {
            Source::Dirs { digest, .. } => *digest,
            Source::Kube { .. } => 0,
        }
    }

    /// Whether the view is the cluster's (pods are local by `spec.nodeName`) rather than a
    /// directory's (pods without a node are local).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Source::Kube { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_manifest_files_only() {
        let dir = std::env::temp_dir().join(format!("ocelot-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dirs = vec![dir.clone()];
        std::fs::write(dir.join("a.yaml"), "kind: Namespace\n").unwrap();
        let d1 = digest(&dirs).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        assert_eq!(digest(&dirs).unwrap(), d1);
        std::fs::write(dir.join("a.yaml"), "kind: Pod\n").unwrap();
        let d2 = digest(&dirs).unwrap();
        assert_ne!(d1, d2);
        std::fs::rename(dir.join("a.yaml"), dir.join("b.yml")).unwrap();
        assert_ne!(digest(&dirs).unwrap(), d2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_directories_load_as_one_set() {
        let base = std::env::temp_dir().join(format!("ocelot-dirs-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            a.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(
            b.join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nstatus: {podIPs: [{ip: 10.9.0.1}]}\n",
        )
        .unwrap();
        let m = load(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(m.cluster.pods.len(), 1);
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        std::fs::write(
            b.join("bad.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: [}\n",
        )
        .unwrap();
        assert!(load(&[a, b]).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
