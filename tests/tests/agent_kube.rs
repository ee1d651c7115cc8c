//! `ocelot run --datastore kubernetes`: the agent follows the (test) API server with the real
//! kube client, forwards real traffic between two pods, applies a policy created through the
//! API, and keeps forwarding on its last view while the API server is gone (fail-static).
//!
//! Needs root and the `ocelot` binary (built by `scripts/test.sh` before the tests). The API
//! server runs inside the node's network namespace, where the agent can reach it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ocelot_tests::TempDir;
use ocelot_tests::apiserver::ApiServer;
use ocelot_tests::bins::binary;
use ocelot_tests::netns::{Netns, Pod, VethPair};
use serde_json::{Value, json};

fn pod_object(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "x", "labels": { "pod": name } },
        "spec": { "nodeName": "n1", "containers": [{ "name": "c", "image": "i" }] },
        "status": { "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

/// The agent process; SIGTERM and wait on drop.
struct Agent(Option<Child>);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

fn status(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Waits until the status file satisfies `ok`.
fn wait_status(path: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let s = status(path);
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_follows_the_api_server_and_keeps_forwarding_without_it() {
    let node = Netns::new("knode").expect("netns");
    node.disable_ipv6().expect("sysctl");
    let mut pods = Vec::new();
    let mut veths = Vec::new();
    for (name, ip) in [("a", "10.1.1.1"), ("b", "10.1.1.2")] {
        let ns = Netns::new(&format!("k{name}")).expect("netns");
        ns.disable_ipv6().expect("sysctl");
        let host = control::naming::veth_name("x", name);
        veths.push(VethPair::new(&ns, "eth0", &node, &host).expect("veth"));
        pods.push(Pod::configure_proxy_arp(ns, ip, &host).expect("pod"));
    }
    // The API server's threads are created inside the node's namespace, so it listens there.
    let mut api = dataplane::sys::in_netns(node.name(), ApiServer::start).expect("enter node");
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"ns": "x"}}}));
    api.apply(
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.1.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.11"}]}}),
    );
    api.apply(&pod_object("a", "10.1.1.1"));
    api.apply(&pod_object("b", "10.1.1.2"));
    // A pod of another node: not attached here.
    let mut other = pod_object("c", "10.1.2.1");
    other["spec"]["nodeName"] = json!("n2");
    api.apply(&other);

    let dir = TempDir::new("ocelot-kube-agent").expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n\
             contexts:\n- name: t\n  context:\n    cluster: t\n    user: u\n\
             current-context: t\nusers:\n- name: u\n  user: {{}}\n",
            api.url()
        ),
    )
    .expect("kubeconfig");
    let config = dir.path().join("ocelot.toml");
    std::fs::write(&config, "[[workers]]\ncore = 0\n").expect("config");
    let status_file = dir.path().join("status.json");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node.name(), "env"])
        .arg(format!("KUBECONFIG={}", kubeconfig.display()))
        .arg("NODE_NAME=n1")
        .arg(binary("ocelot"))
        .args(["run", "--datastore", "kubernetes", "--config"])
        .arg(&config)
        .arg("--status")
        .arg(&status_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent starts");
    let stderr = child.stderr.take().expect("stderr");
    let agent = Agent(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("agent not ready:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if line.starts_with(tools::agent::READY_LINE) {
            break;
        }
    }
    assert!(
        log.contains("2 ports"),
        "only this node's pods are attached:\n{log}"
    );
    let ping = |from: &Pod, to: &str| {
        from.ns
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", to])
            .expect("ping runs")
            .status
            .success()
    };
    assert!(ping(&pods[0], "10.1.1.2"), "a cannot reach b:\n{log}");

    // A policy created through the API takes effect.
    let epoch = wait_status(&status_file, "a status", |s| s["epoch"].is_u64())["epoch"]
        .as_u64()
        .unwrap_or(0);
    api.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}}),
    );
    wait_status(&status_file, "the policy's epoch", |s| {
        s["epoch"].as_u64().is_some_and(|e| e > epoch)
    });
    assert!(!ping(&pods[0], "10.1.1.2"), "the policy did not apply");
    assert!(ping(&pods[1], "10.1.1.1"), "b's egress is not isolated");

    // The API server goes away: forwarding continues on the last view, and the status says
    // the view is stale.
    api.stop();
    let s = wait_status(&status_file, "disconnected", |s| {
        s["datastore"]["connected"] == json!(false)
    });
    assert_eq!(s["datastore"]["datastore"], "kubernetes");
    assert!(
        ping(&pods[1], "10.1.1.1"),
        "forwarding stopped with the API server"
    );
    assert!(
        !ping(&pods[0], "10.1.1.2"),
        "policy forgotten with the API server"
    );

    // It comes back and the policy is deleted: the agent re-lists, and a reaches b again.
    dataplane::sys::in_netns(node.name(), || api.restart(true)).expect("enter node");
    api.delete("NetworkPolicy", "x", "deny");
    wait_status(&status_file, "reconnected", |s| {
        s["datastore"]["connected"] == json!(true)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ping(&pods[0], "10.1.1.2") {
        assert!(Instant::now() < deadline, "the deletion never applied");
    }
    drop(agent);
    for p in &pods {
        assert!(
            !node.has_xdp(&p.host_dev).expect("ip link"),
            "XDP left behind"
        );
    }
    drop(veths);
}
