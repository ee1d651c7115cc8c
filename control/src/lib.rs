//! # control — from cluster objects to classifier snapshots
//!
//! The only layer that reads Kubernetes objects. Its inputs are manifest files
//! ([`manifests`]) or a live cluster followed with kube's watchers ([`kube`]); both are
//! converted into the classifier's policy model with the API server's defaulting, into the
//! same [`Manifests`] type. Its output is the compiled `PolicyTable` queried offline by
//! [`verdicts`] (the library behind `ocelotctl policy verdicts`).
//!
//! **Architecture Invariant**: verdicts come from the compiled table only; control never
//! evaluates NetworkPolicy rules itself, so what the CLI shows is what the dataplane enforces.
#![forbid(unsafe_code)]

pub mod error;
pub mod kube;
pub mod manifests;
pub mod naming;
pub mod node;
pub mod reap;
pub mod verdicts;

pub use error::{Error, ManifestError, ObjectRef};
pub use manifests::{Manifests, NodeInfo, load_dir};
