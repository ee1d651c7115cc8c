//! The control crate's one error type: every input it refuses, named by file, object and line.

use std::fmt;
use std::path::PathBuf;

/// Where an object came from: the file, the document in it (1-based), the item inside a
/// `kind: List` (1-based) when there is one, and the object's kind and `namespace/name`.
/// Objects read from the Kubernetes API have no file: [`ObjectRef::api`] makes their
/// reference, with document 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based index inside a `kind: List`, if the object is a list item.
    pub item: Option<usize>,
    /// `kind` as written (or `?` when missing).
    pub kind: String,
    /// `namespace/name` for namespaced objects, `name` for namespaces.
    pub name: String,
}

impl ObjectRef {
    /// The reference of an object read from the Kubernetes API.
    pub fn api(kind: &str, name: String) -> ObjectRef {
        ObjectRef {
            file: PathBuf::new(),
            document: 0,
            item: None,
            kind: kind.to_owned(),
            name,
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            return write!(f, "kubernetes API ({} {})", self.kind, self.name);
        }
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        write!(f, " ({} {})", self.kind, self.name)
    }
}

/// Everything the control plane can refuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory or file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A document is not YAML (or JSON).
    #[error("{} document {document}: not valid YAML: {source}", file.display())]
    Yaml {
        /// The manifest file.
        file: PathBuf,
        /// 1-based index of the document.
        document: usize,
        /// The parser's reason.
        #[source]
        source: serde_yaml::Error,
    },
    /// An object that Kubernetes would reject, or that ocelot cannot represent.
    #[error("{at}: {why}")]
    Invalid {
        /// The object (boxed to keep `Result`s small).
        at: Box<ObjectRef>,
        /// What is wrong with it.
        why: String,
    },
    /// Two objects of the same kind with the same namespace and name.
    #[error("{at}: duplicate object, first defined at {first}")]
    Duplicate {
        /// The second definition.
        at: Box<ObjectRef>,
        /// The first definition.
        first: Box<ObjectRef>,
    },
    /// The Kubernetes client could not be configured (no in-cluster service account, no
    /// usable KUBECONFIG), or its HTTP stack could not be built.
    #[error("kubernetes client: {what}: {source}")]
    KubeClient {
        /// What was being set up.
        what: &'static str,
        /// The kube crate's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The Kubernetes datastore's thread or runtime could not be started.
    #[error("kubernetes datastore: {what}")]
    KubeDatastore {
        /// What failed.
        what: String,
    },
    /// A probe line that cannot be parsed or resolved.
    #[error("probe line {line}: {why}")]
    Probe {
        /// 1-based line number in the probe input.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
}

/// The name the manifest loader's contract uses for [`Error`].
pub type ManifestError = Error;
