//! What 10,000 pods cost in the Kubernetes datastore's cache, against keeping the whole
//! k8s-openapi objects (what a kube reflector store would hold).
//!
//! A counting global allocator measures the heap bytes live after building each form, and
//! the heap a running datastore holds after syncing the same pods from the test API server;
//! run with `--nocapture` to see the figures (docs/BENCHMARKS.md records them). The
//! assertions only check the point of converting on arrival (the compact form is several
//! times smaller) and that all 10,000 pods arrive.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1 as core;
use serde_json::json;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PODS: usize = 10_000;

/// A pod as the API server returns it for a Deployment replica: owner reference, managed
/// fields, one container with ports, env, resources, probes' worth of status.
fn api_pod(i: usize) -> core::Pod {
    let ns = format!("ns-{}", i % 1000);
    let name = format!("app-{}-5d9f8c7b6-{i:05}", i % 1000);
    let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("6f1c2e7a-0b8d-4c55-9a1e-{i:012}"),
            "resourceVersion": format!("{}", 100_000 + i),
            "creationTimestamp": "2026-11-27T10:00:00Z",
            "generateName": format!("app-{}-5d9f8c7b6-", i % 1000),
            "labels": {
                "app": format!("app-{}", i % 1000),
                "pod-template-hash": "5d9f8c7b6",
                "tier": if i.is_multiple_of(2) { "frontend" } else { "backend" },
                "version": "v1",
            },
            "annotations": { "kubectl.kubernetes.io/restartedAt": "2026-11-27T09:59:00Z" },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{}-5d9f8c7b6", i % 1000),
                "uid": "0a0b0c0d-0000-0000-0000-000000000000", "controller": true, "blockOwnerDeletion": true,
            }],
            "managedFields": [
                { "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                  "time": "2026-11-27T10:00:00Z", "fieldsType": "FieldsV1",
                  "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:app": {}, "f:tier": {} } },
                                "f:spec": { "f:containers": { "k:{\"name\":\"app\"}": { ".": {}, "f:image": {} } } } } },
                { "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                  "time": "2026-11-27T10:00:05Z", "fieldsType": "FieldsV1",
                  "fieldsV1": { "f:status": { "f:conditions": {}, "f:podIP": {}, "f:podIPs": {} } } },
            ],
        },
        "spec": {
            "nodeName": format!("node-{}", i % 100),
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "containers": [{
                "name": "app",
                "image": "registry.example.com/team/app:1.2.3",
                "ports": [
                    { "name": "http", "containerPort": 8080, "protocol": "TCP" },
                    { "name": "metrics", "containerPort": 9090, "protocol": "TCP" },
                ],
                "env": [
                    { "name": "LOG_LEVEL", "value": "info" },
                    { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                ],
                "resources": { "requests": { "cpu": "100m", "memory": "128Mi" }, "limits": { "memory": "256Mi" } },
                "volumeMounts": [{ "name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true }],
            }],
            "volumes": [{ "name": "kube-api-access", "projected": { "sources": [{ "serviceAccountToken": { "path": "token", "expirationSeconds": 3607 } }] } }],
            "tolerations": [
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 },
                { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300 },
            ],
        },
        "status": {
            "phase": "Running",
            "hostIP": format!("192.168.{}.{}", (i % 100) / 256, i % 100),
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "startTime": "2026-11-27T10:00:01Z",
            "conditions": [
                { "type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-27T10:00:01Z" },
                { "type": "Ready", "status": "True", "lastTransitionTime": "2026-11-27T10:00:05Z" },
                { "type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-27T10:00:05Z" },
                { "type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-27T10:00:00Z" },
            ],
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.example.com/team/app:1.2.3",
                "imageID": "registry.example.com/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "state": { "running": { "startedAt": "2026-11-27T10:00:04Z" } },
            }],
        },
    }))
    .expect("pod")
}

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

#[test]
fn ten_thousand_pods_in_the_cache() {
    let before = live();
    let objects: Vec<core::Pod> = (0..PODS).map(api_pod).collect();
    let full = live() - before;

    let before = live();
    // The datastore's pod store: key `namespace/name` to the converted pod (or the reason it
    // was refused), exactly the map `control::kube` keeps.
    let cache: BTreeMap<String, Result<classifier::policy::model::Pod, String>> = objects
        .iter()
        .map(|p| {
            let key = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            (
                key,
                control::kube::convert_pod(p).map_err(|e| e.to_string()),
            )
        })
        .collect();
    let compact = live() - before;
    assert!(cache.values().all(Result::is_ok));
    assert_eq!(cache.len(), PODS);
    drop(objects);

    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "{PODS} pods: whole k8s-openapi objects {:.1} MiB ({} B/pod); datastore cache {:.1} MiB \
         ({} B/pod)",
        mib(full),
        full / PODS,
        mib(compact),
        compact / PODS
    );
    assert!(
        compact * 3 < full,
        "the cache ({compact} B) is not much smaller than the objects ({full} B)"
    );
    drop(cache);

    // The whole datastore (cache, kube client, runtime, the watches' buffers) after syncing
    // the same pods from the test API server. The server's own memory is live before and
    // after, so it cancels out, except what its open watches hold (small).
    let server = ocelot_tests::apiserver::ApiServer::start();
    for i in 0..PODS {
        let pod = api_pod(i);
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        if i < 1000 {
            server.apply(
                &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
            );
        }
        server.apply(&pod);
    }
    let before = live();
    let ds = control::kube::spawn(control::kube::KubeOptions::with_config(server.config()))
        .expect("datastore");
    let first = ds
        .updates()
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("first update");
    assert_eq!(first.cluster.pods.len(), PODS);
    // The snapshot sent is the consumer's, not the datastore's.
    drop(first);
    let datastore = live().saturating_sub(before);
    println!(
        "{PODS} pods, 1,000 namespaces: the running datastore holds {:.1} MiB of heap",
        mib(datastore)
    );
    drop(ds);
}
