//! The Kubernetes datastore (`control::kube`) against the test API server: the real kube
//! client and watchers over HTTP, driven as a cluster would be.
//!
//! Waits are bounded (`recv_timeout` with generous limits) and never assert timing: a test
//! waits for the first update that satisfies a condition and fails if none comes.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use classifier::policy::compile::PolicyDecision;
use classifier::policy::model::{Cluster, Protocol};
use control::kube::{KubeDatastore, KubeOptions, Resource, SyncStatus};
use control::manifests::{Manifests, NodeInfo, load_dir};
use control::verdicts::Evaluator;
use ocelot_tests::apiserver::ApiServer;
use serde_json::{Value, json};

/// Long enough for a loaded CI machine; only reached when a test is failing.
const WAIT: Duration = Duration::from_secs(30);

fn seed_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-demo")
}

/// Every object of the seed demo, as JSON.
fn seed_objects() -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(seed_dir())
        .expect("seed-demo")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn node(name: &str, cidr: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": { "addresses": [
            { "type": "Hostname", "address": name },
            { "type": "InternalIP", "address": ip },
        ] },
    })
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "nodeName": "node-1", "containers": [
            { "name": "c", "image": "x", "ports": [{ "containerPort": 80 }] },
        ] },
        "status": { "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
    })
}

/// A server holding the seed demo and two nodes.
fn seeded_server() -> ApiServer {
    let server = ApiServer::start();
    for o in seed_objects() {
        server.apply(&o);
    }
    server.apply(&node("node-1", "10.65.0.0/26", "192.168.0.1"));
    server.apply(&node("node-2", "10.65.0.64/26", "192.168.0.2"));
    server
}

fn start(server: &ApiServer) -> KubeDatastore {
    let opts = KubeOptions {
        node_name: Some("node-1".to_owned()),
        coalesce: Duration::from_millis(20),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        // Small pages, so the initial list of the seed demo takes several.
        page_size: 2,
        ..KubeOptions::with_config(server.config())
    };
    control::kube::spawn(opts).expect("datastore")
}

/// The cluster in a canonical order.
fn sorted(mut c: Cluster) -> Cluster {
    c.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    c.pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c.policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c
}

/// Receives updates until one satisfies `pred`; panics with `what` if none comes in time.
fn wait_for(ds: &KubeDatastore, what: &str, pred: impl Fn(&Manifests) -> bool) -> Manifests {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ds.updates().recv_timeout(left) {
            Ok(m) if pred(&m) => return m,
            Ok(_) => {}
            Err(e) => panic!("no update with {what}: {e}; status {:#?}", ds.status()),
        }
    }
}

/// Polls the status until `pred` holds; panics with `what` if it does not in time.
fn wait_status(ds: &KubeDatastore, what: &str, pred: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = ds.status();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const CLIENT: &str = "10.65.0.20";
const FRONTEND: &str = "10.65.0.10";

fn client_to_frontend(m: &Manifests) -> PolicyDecision {
    Evaluator::new(m).check(ip(CLIENT), ip(FRONTEND), 80, Protocol::Tcp)
}

fn has_pod(m: &Manifests, ns: &str, name: &str) -> bool {
    m.pod(ns, name).is_some()
}

#[test]
fn initial_sync_is_what_the_manifests_loader_reads() {
    let server = seeded_server();
    let ds = start(&server);
    let live = ds.updates().recv_timeout(WAIT).expect("first update");
    let files = load_dir(&seed_dir()).expect("seed-demo");
    assert_eq!(sorted(live.cluster.clone()), sorted(files.cluster));
    assert!(live.warnings.is_empty(), "{:?}", live.warnings);
    assert_eq!(
        live.nodes,
        vec![
            NodeInfo {
                name: "node-1".to_owned(),
                pod_cidrs: vec!["10.65.0.0/26".parse().expect("cidr")],
                internal_ips: vec![ip("192.168.0.1")],
            },
            NodeInfo {
                name: "node-2".to_owned(),
                pod_cidrs: vec!["10.65.0.64/26".parse().expect("cidr")],
                internal_ips: vec![ip("192.168.0.2")],
            },
        ]
    );
    assert_eq!(client_to_frontend(&live), PolicyDecision::Allow);
    let s = ds.status();
    assert!(s.synced() && s.connected(), "{s:#?}");
    assert_eq!(s.staleness(Instant::now()), Duration::ZERO);
    assert_eq!(s.resource(Resource::Pods).objects, 4);
    assert_eq!(ds.node_name(), Some("node-1"));
    // The initial lists were paginated (page size 2).
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("continue=")),
        "{:#?}",
        server.requests()
    );
}

#[test]
fn changes_reach_the_next_update_and_the_verdicts() {
    let server = seeded_server();
    let ds = start(&server);
    let first = ds.updates().recv_timeout(WAIT).expect("first update");
    assert_eq!(client_to_frontend(&first), PolicyDecision::Allow);

    // Relabel the client namespace: frontend-policy no longer admits it.
    server.apply(&namespace("client", json!({ "role": "other" })));
    let m = wait_for(&ds, "namespace client relabelled", |m| {
        m.cluster.namespaces.iter().any(|n| {
            n.name == "client" && n.labels.get("role").map(String::as_str) == Some("other")
        })
    });
    assert_eq!(client_to_frontend(&m), PolicyDecision::DenyIngress);

    // A policy admitting role=other brings it back.
    server.apply(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": "allow-other", "namespace": "default" },
        "spec": {
            "podSelector": { "matchLabels": { "tier": "frontend" } },
            "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "role": "other" } } }] }],
        },
    }));
    let m = wait_for(&ds, "policy allow-other", |m| {
        m.cluster.policies.iter().any(|p| p.name == "allow-other")
    });
    assert_eq!(client_to_frontend(&m), PolicyDecision::Allow);

    // A new pod, then relabelled, then deleted.
    server.apply(&pod(
        "default",
        "extra",
        json!({ "tier": "frontend" }),
        "10.65.0.12",
    ));
    let m = wait_for(&ds, "pod default/extra", |m| has_pod(m, "default", "extra"));
    assert_eq!(
        Evaluator::new(&m).check(ip(CLIENT), ip("10.65.0.12"), 80, Protocol::Tcp),
        PolicyDecision::Allow
    );
    server.apply(&pod(
        "default",
        "extra",
        json!({ "tier": "backend" }),
        "10.65.0.12",
    ));
    let m = wait_for(&ds, "pod default/extra relabelled", |m| {
        m.pod("default", "extra")
            .is_some_and(|p| p.labels.get("tier").map(String::as_str) == Some("backend"))
    });
    assert_eq!(
        Evaluator::new(&m).check(ip(CLIENT), ip("10.65.0.12"), 80, Protocol::Tcp),
        PolicyDecision::DenyIngress
    );
    server.delete("Pod", "default", "extra");
    wait_for(&ds, "pod default/extra gone", |m| {
        !has_pod(m, "default", "extra")
    });

    // Delete the policy again, and a namespace with its pod.
    server.delete("NetworkPolicy", "default", "allow-other");
    let m = wait_for(&ds, "policy allow-other gone", |m| {
        !m.cluster.policies.iter().any(|p| p.name == "allow-other")
    });
    assert_eq!(client_to_frontend(&m), PolicyDecision::DenyIngress);
    server.delete("Pod", "management-ui", "management-ui");
    server.delete("Namespace", "", "management-ui");
    wait_for(&ds, "namespace management-ui gone", |m| {
        !has_pod(m, "management-ui", "management-ui")
            && !m
                .cluster
                .namespaces
                .iter()
                .any(|n| n.name == "management-ui")
    });

    // Nodes come and go.
    server.apply(&node("node-3", "10.65.0.128/26", "192.168.0.3"));
    wait_for(&ds, "node-3", |m| {
        m.nodes.iter().any(|n| n.name == "node-3")
    });
    server.delete("Node", "", "node-1");
    let m = wait_for(&ds, "node-1 gone", |m| {
        !m.nodes.iter().any(|n| n.name == "node-1")
    });
    let names: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node-2", "node-3"]);
}

#[test]
fn server_down_keeps_the_last_state_and_the_restart_brings_changes() {
    let mut server = seeded_server();
    let ds = start(&server);
    let first = ds.updates().recv_timeout(WAIT).expect("first update");

    server.stop();
    let down = wait_status(&ds, "disconnected", |s| !s.connected());
    assert!(down.synced(), "the first sync stays done: {down:#?}");
    // While the server is down the view only gets staler, and nothing is sent: the
    // consumer keeps its last snapshot.
    let later = wait_status(&ds, "errors on every resource", |s| {
        s.resources.iter().all(|r| r.errors > 0)
    });
    assert!(later.staleness(Instant::now()) > Duration::ZERO);
    assert!(
        ds.updates()
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "an update was sent while the API server was down"
    );

    // Changes made while the agent could not see them.
    server.apply(&pod(
        "client",
        "late",
        json!({ "role": "client" }),
        "10.65.0.21",
    ));
    server.delete("NetworkPolicy", "default", "frontend-policy");
    server.restart(true);
    let m = wait_for(&ds, "the changes made while down", |m| {
        has_pod(m, "client", "late")
            && !m
                .cluster
                .policies
                .iter()
                .any(|p| p.name == "frontend-policy")
    });
    assert_eq!(client_to_frontend(&first), PolicyDecision::Allow);
    assert_eq!(client_to_frontend(&m), PolicyDecision::DenyIngress);
    let s = wait_status(&ds, "connected again", |s| s.connected());
    assert_eq!(s.staleness(Instant::now()), Duration::ZERO);
    // Reconnecting is a full re-list.
    assert!(s.resource(Resource::Pods).lists >= 2, "{s:#?}");
}

#[test]
fn an_expired_version_makes_the_datastore_relist() {
    let mut server = seeded_server();
    let ds = start(&server);
    ds.updates().recv_timeout(WAIT).expect("first update");
    // Changes the watches miss, then compaction: resuming from the old version is 410.
    server.stop();
    server.apply(&pod(
        "default",
        "after",
        json!({ "tier": "x" }),
        "10.65.0.13",
    ));
    server.compact();
    server.restart(true);
    wait_for(&ds, "pod default/after", |m| has_pod(m, "default", "after"));
    let s = ds.status();
    assert!(s.resource(Resource::Pods).lists >= 2, "{s:#?}");

    // An API server that lost its state: the datastore follows it after a re-list.
    server.restart(false);
    for o in seed_objects()
        .into_iter()
        .filter(|o| o["kind"] == "Namespace")
    {
        server.apply(&o);
    }
    // The resources re-list independently and the namespaces may arrive across a list and
    // watch events, so intermediate snapshots are legitimate; wait for the final one.
    wait_for(&ds, "the emptied cluster", |m| {
        m.cluster.pods.is_empty()
            && m.cluster.policies.is_empty()
            && m.nodes.is_empty()
            && m.cluster.namespaces.len() == 3
    });
}

#[test]
fn a_refused_object_is_named_and_the_rest_applies() {
    let server = seeded_server();
    let mut bad = pod("default", "bad", json!({ "tier": "x" }), "10.65.0.14");
    bad["status"]["podIPs"] = json!([{ "ip": "not-an-ip" }]);
    server.apply(&bad);
    let ds = start(&server);
    let m = ds.updates().recv_timeout(WAIT).expect("first update");
    assert!(!has_pod(&m, "default", "bad"));
    assert_eq!(m.cluster.pods.len(), 4);
    assert_eq!(
        m.warnings,
        ["kubernetes API (Pod default/bad): skipped: pod IP \"not-an-ip\" is not an IP address"]
    );
    assert_eq!(ds.status().resource(Resource::Pods).rejected, 1);
    // Fixing it brings it in.
    server.apply(&pod("default", "bad", json!({ "tier": "x" }), "10.65.0.14"));
    let m = wait_for(&ds, "pod default/bad fixed", |m| {
        has_pod(m, "default", "bad")
    });
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
}

#[test]
fn nothing_is_sent_before_every_resource_is_listed() {
    // No server at all: the datastore starts (the client is built), but never sends.
    let server = ApiServer::start();
    let mut config = server.config();
    drop(server);
    config.connect_timeout = Some(Duration::from_secs(1));
    let ds = control::kube::spawn(KubeOptions {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..KubeOptions::with_config(config)
    })
    .expect("datastore");
    wait_status(&ds, "errors on every resource", |s| {
        s.resources.iter().all(|r| r.errors >= 2)
    });
    assert!(ds.updates().try_recv().is_err());
    let s = ds.status();
    assert!(!s.synced() && !s.connected(), "{s:#?}");
}

#[test]
fn dropped_connections_lose_no_change() {
    let server = seeded_server();
    let ds = start(&server);
    ds.updates().recv_timeout(WAIT).expect("first update");
    for i in 0..3 {
        server.drop_connections();
        let name = format!("after-drop-{i}");
        server.apply(&pod("default", &name, json!({ "tier": "x" }), "10.65.0.40"));
        wait_for(&ds, &format!("pod default/{name}"), |m| {
            has_pod(m, "default", &name)
        });
    }
    // A watch stream that ends while the server is up is resumed from its resourceVersion:
    // no error, no re-list.
    let s = ds.status();
    assert!(
        s.resources.iter().all(|r| r.lists == 1 && r.errors == 0),
        "{s:#?}"
    );
}

#[test]
fn ten_thousand_pods_list_in_pages() {
    let server = ApiServer::start();
    for n in 0..100 {
        server.apply(&namespace(&format!("ns-{n}"), json!({})));
    }
    for i in 0..10_000u32 {
        let ip = format!("10.64.{}.{}", i / 256, i % 256);
        server.apply(&pod(
            &format!("ns-{}", i % 100),
            &format!("p-{i}"),
            json!({ "app": format!("a{}", i % 50) }),
            &ip,
        ));
    }
    // The default page size (500): twenty pages of pods.
    let ds = control::kube::spawn(KubeOptions::with_config(server.config())).expect("datastore");
    let m = ds.updates().recv_timeout(WAIT).expect("first update");
    assert_eq!(m.cluster.pods.len(), 10_000);
    assert_eq!(m.cluster.namespaces.len(), 100);
    let pages = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    assert_eq!(pages, 20, "{:#?}", server.requests());
}

/// Every document of a manifest text, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("yaml"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn the_netpol_model_compiles_alike_from_both_datastores() {
    use ocelot_tests::netpol::{model_yaml, policy};
    let policies = [
        policy(
            "x",
            "allow-y-to-named-port",
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - namespaceSelector: \
             {matchLabels: {ns: y}}\n  ports:\n  - port: serve-80-tcp",
        ),
        policy(
            "y",
            "egress-ipblock",
            "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock: {cidr: \
             10.1.0.0/16, except: [10.1.3.0/24]}\n  ports:\n  - {protocol: UDP, port: 81}",
        ),
        policy(
            "z",
            "expressions",
            "podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}\n\
             ingress:\n- from:\n  - podSelector: {matchExpressions: [{key: pod, operator: \
             NotIn, values: [c]}]}\n    namespaceSelector: {}",
        ),
    ]
    .concat();
    let text = format!("{}{policies}", model_yaml());
    let server = ApiServer::start();
    for o in documents(&text) {
        server.apply(&o);
    }
    let ds = start(&server);
    let mut live = ds.updates().recv_timeout(WAIT).expect("first update");
    let mut files = Manifests::from_texts([(std::path::PathBuf::from("m.yaml"), text.as_str())])
        .expect("manifests");
    live.cluster = sorted(live.cluster);
    files.cluster = sorted(files.cluster);
    assert_eq!(live.cluster, files.cluster);
    let render = |m: &Manifests| {
        Evaluator::new(m)
            .matrices()
            .iter()
            .map(|x| x.render(true))
            .collect::<Vec<_>>()
    };
    // The policies do decide: z/a may not reach x/a; y/a may not send TCP; z/b accepts
    // x/a but not x/c.
    let e = Evaluator::new(&live);
    for (src, dst, expected) in [
        ("10.1.3.1", "10.1.1.1", PolicyDecision::DenyIngress),
        ("10.1.2.1", "10.1.1.1", PolicyDecision::DenyEgress),
        ("10.1.1.1", "10.1.3.2", PolicyDecision::Allow),
        ("10.1.1.3", "10.1.3.2", PolicyDecision::DenyIngress),
    ] {
        let got = e.check(ip(src), ip(dst), 80, Protocol::Tcp);
        assert_eq!(got, expected, "{src} -> {dst}");
    }
    let matrices = render(&live);
    assert_eq!(matrices.len(), 4, "80/81 over TCP/UDP");
    assert_eq!(matrices, render(&files));
}

#[test]
fn churn_across_drops_and_restarts_loses_no_change() {
    let mut server = seeded_server();
    let ds = start(&server);
    ds.updates().recv_timeout(WAIT).expect("first update");
    let mut expected: std::collections::BTreeSet<String> = ["backend", "frontend"]
        .map(|p| format!("default/{p}"))
        .into_iter()
        .chain([
            "client/client".to_owned(),
            "management-ui/management-ui".to_owned(),
        ])
        .collect();
    let mut churn = |server: &ApiServer, round: usize| {
        for i in 0..25 {
            let name = format!("churn-{round}-{i}");
            let ip = format!("10.66.{round}.{i}");
            server.apply(&pod(
                "default",
                &name,
                json!({ "round": round.to_string() }),
                &ip,
            ));
            expected.insert(format!("default/{name}"));
            if round > 0 && i % 3 == 0 {
                let old = format!("churn-{}-{i}", round - 1);
                server.delete("Pod", "default", &old);
                expected.remove(&format!("default/{old}"));
            }
        }
    };
    for round in 0..6 {
        // The changes stream to the watches while the connections drop or the server
        // restarts right behind them.
        churn(&server, round);
        match round % 3 {
            0 => server.drop_connections(),
            1 => server.restart(true),
            _ => {
                server.stop();
                churn(&server, round + 100);
                server.restart(true);
            }
        }
    }
    let m = wait_for(&ds, "every churned pod, and no deleted one", |m| {
        let got: std::collections::BTreeSet<String> = m
            .cluster
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        got == expected
    });
    assert!(m.cluster.pods.len() > 100);
}
