//! The seed demo in its two forms (v1 policies, and the 2016 annotation + v1alpha1 policies)
//! must mean the same thing.

use std::path::{Path, PathBuf};

use classifier::policy::model::{NetworkPolicy, Protocol};
use control::manifests::{Manifests, load_dir};
use control::verdicts::Evaluator;

fn example(name: &str) -> Manifests {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    load_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Policies without their names (the isolation policy is named differently in each form),
/// in a canonical order.
fn unnamed(m: &Manifests) -> Vec<NetworkPolicy> {
    let mut ps: Vec<_> = m
        .cluster
        .policies
        .iter()
        .map(|p| NetworkPolicy {
            name: String::new(),
            ..p.clone()
        })
        .collect();
    ps.sort_by_key(|p| format!("{p:?}"));
    ps
}

#[test]
fn legacy_translation_yields_the_v1_policies() {
    let v1 = example("seed-demo");
    let legacy = example("seed-demo-legacy");
    assert!(v1.warnings.is_empty(), "{:?}", v1.warnings);
    assert_eq!(legacy.warnings.len(), 5, "{:?}", legacy.warnings);
    assert_eq!(v1.cluster.namespaces, legacy.cluster.namespaces);
    assert_eq!(v1.cluster.pods, legacy.cluster.pods);
    assert_eq!(unnamed(&v1), unnamed(&legacy));
}

#[test]
fn legacy_and_v1_give_identical_verdicts_on_every_pair_and_port() {
    let v1 = example("seed-demo");
    let legacy = example("seed-demo-legacy");
    let (a, b) = (Evaluator::new(&v1), Evaluator::new(&legacy));
    // Every declared port, plus ones nobody declares, on every protocol.
    let mut ports: Vec<u16> = v1
        .cluster
        .pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|c| c.port))
        .collect();
    ports.extend([22, 8080]);
    let mut checked = 0;
    for protocol in Protocol::ALL {
        for &port in &ports {
            let (ma, mb) = (a.matrix(port, protocol), b.matrix(port, protocol));
            assert_eq!(ma.pods.len(), 4);
            assert_eq!(ma, mb, "{port}/{}", protocol.as_str());
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}
