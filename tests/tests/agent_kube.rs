//! `ocelot run --datastore kubernetes`: the agent follows the (test) API server with the real
//! kube client, forwards real traffic between two pods, applies a policy created through the
//! API, and keeps forwarding on its last view while the API server is gone (fail-static).
//! A pod interface that appears while the API server is away is isolated or allowed as
//! configured (`[datastore] unknown_pods`), and takes its pod's identity when the pod
//! object arrives.
//!
//! Needs root and the `ocelot` binary (built by `scripts/test.sh` before the tests). The API
//! server runs inside the node's network namespace, where the agent can reach it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ocelot_tests::TempDir;
use ocelot_tests::apiserver::ApiServer;
use ocelot_tests::bins::{binary, serial};
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

/// A pod of the node: its namespace wired the Calico way, with the host route to its
/// address through its veth that the CNI plugin installs on the node.
fn add_pod(node: &Netns, name: &str, ip: &str) -> (VethPair, Pod) {
    let ns = Netns::new(&format!("k{name}")).expect("netns");
    ns.disable_ipv6().expect("sysctl");
    let host = control::naming::veth_name("x", name);
    let veth = VethPair::new(&ns, "eth0", node, &host).expect("veth");
    let pod = Pod::configure_proxy_arp(ns, ip, &host).expect("pod");
    node.route_add(&[&format!("{ip}/32"), "dev", &host, "scope", "link"])
        .expect("host route");
    (veth, pod)
}

/// A node namespace with an API server listening inside it, holding namespace `x` and node
/// `n1` (the agent's).
fn node_with_api_server() -> (Netns, ApiServer) {
    let node = Netns::new("knode").expect("netns");
    node.disable_ipv6().expect("sysctl");
    // The API server's threads are created inside the node's namespace, so it listens there.
    let api = dataplane::sys::in_netns(node.name(), ApiServer::start).expect("enter node");
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"ns": "x"}}}));
    api.apply(
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.1.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.11"}]}}),
    );
    (node, api)
}

/// A running agent, the lines of its log as they come, and its status file.
struct Running {
    _agent: Agent,
    lines: Receiver<String>,
    log: String,
    status_file: PathBuf,
    _dir: TempDir,
}

impl Running {
    /// Starts `ocelot run --datastore kubernetes` in `node` against `api` with `config`,
    /// and waits for its ready line.
    fn start(node: &Netns, api: &ApiServer, config: &str, extra: &[&str]) -> Running {
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
        let config_file = dir.path().join("ocelot.toml");
        std::fs::write(&config_file, config).expect("config");
        let status_file = dir.path().join("status.json");
        let mut child = Command::new("ip")
            .args(["netns", "exec", node.name(), "env"])
            .arg(format!("KUBECONFIG={}", kubeconfig.display()))
            .arg("NODE_NAME=n1")
            .arg(binary("ocelot"))
            .args(["run", "--datastore", "kubernetes", "--config"])
            .arg(&config_file)
            .arg("--status")
            .arg(&status_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts");
        let stderr = child.stderr.take().expect("stderr");
        let agent = Agent(Some(child));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut running = Running {
            _agent: agent,
            lines,
            log: String::new(),
            status_file,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = running
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("agent not ready:\n{}", running.log));
            running.log.push_str(&line);
            running.log.push('\n');
            if line.starts_with(tools::agent::READY_LINE) {
                return running;
            }
        }
    }

    /// The log so far.
    fn log(&mut self) -> &str {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        &self.log
    }
}

/// Whether `from` reaches `to` with ping.
fn ping(from: &Pod, to: &str) -> bool {
    from.ns
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", to])
        .expect("ping runs")
        .status
        .success()
}

/// Waits (up to 30 s) until `from` reaching `to` is `expected`.
fn wait_ping(from: &Pod, to: &str, expected: bool, what: &str, log: &mut Running) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ping(from, to) != expected {
        assert!(Instant::now() < deadline, "{what}:\n{}", log.log());
    }
}

/// Where the agent of the unknown-pod tests serves metrics, inside the node's namespace.
const METRICS: &str = "127.0.0.1:9464";

/// Scrapes the agent's metrics from inside `node`: `name{labels}` → value.
fn scrape(node: &Netns) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut stream =
        dataplane::sys::in_netns(node.name(), || std::net::TcpStream::connect(METRICS))
            .expect("enter node")
            .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ocelot\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Drops counted under `reason` by every worker.
fn drops(s: &Value, reason: &str) -> u64 {
    s["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
        .sum()
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
    let _serial = serial();
    let (node, mut api) = node_with_api_server();
    let (veths, pods): (Vec<_>, Vec<_>) = [("a", "10.1.1.1"), ("b", "10.1.1.2")]
        .into_iter()
        .map(|(name, ip)| add_pod(&node, name, ip))
        .unzip();
    api.apply(&pod_object("a", "10.1.1.1"));
    api.apply(&pod_object("b", "10.1.1.2"));
    // A pod of another node: not attached here.
    let mut other = pod_object("c", "10.1.2.1");
    other["spec"]["nodeName"] = json!("n2");
    api.apply(&other);

    let mut agent = Running::start(&node, &api, "[[workers]]\ncore = 0\n", &[]);
    let status_file = agent.status_file.clone();
    assert!(
        agent.log().contains("2 ports"),
        "only this node's pods are attached:\n{}",
        agent.log()
    );
    assert!(
        ping(&pods[0], "10.1.1.2"),
        "a cannot reach b:\n{}",
        agent.log()
    );

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
    wait_ping(
        &pods[0],
        "10.1.1.2",
        true,
        "the deletion never applied",
        &mut agent,
    );
    drop(agent);
    for p in &pods {
        assert!(
            !node.has_xdp(&p.host_dev).expect("ip link"),
            "XDP left behind"
        );
    }
    drop(veths);
}

/// A pod interface appears while the API server is away (pod `c`, 10.1.1.3, with the host
/// route the CNI plugin installs). Policies in force: `b` admits only pods labelled
/// `pod: c` (a selector), `a` admits only 10.1.1.3/32 (an ipBlock). Then the API server
/// comes back with `c`'s object and a policy isolating `c`'s ingress.
fn unknown_pod_interface(treatment: &str) {
    let _serial = serial();
    let (node, mut api) = node_with_api_server();
    let (mut veths, mut pods): (Vec<_>, Vec<_>) = [("a", "10.1.1.1"), ("b", "10.1.1.2")]
        .into_iter()
        .map(|(name, ip)| add_pod(&node, name, ip))
        .unzip();
    api.apply(&pod_object("a", "10.1.1.1"));
    api.apply(&pod_object("b", "10.1.1.2"));
    api.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-from-c", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}}),
    );
    api.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "a-from-block", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.1.3/32"}}]}]}}),
    );
    let config = format!("[datastore]\nunknown_pods = \"{treatment}\"\n[[workers]]\ncore = 0\n");
    // Metrics on the node namespace's loopback only.
    let mut agent = Running::start(&node, &api, &config, &["--metrics", METRICS]);
    let status_file = agent.status_file.clone();

    api.stop();
    wait_status(&status_file, "disconnected", |s| {
        s["datastore"]["connected"] == json!(false)
    });
    let (veth, c) = add_pod(&node, "c", "10.1.1.3");
    veths.push(veth);
    let host = c.host_dev.clone();
    pods.push(c);
    let (a, c) = (&pods[0], &pods[2]);
    let s = wait_status(&status_file, "the unknown interface", |s| {
        s["unknown_pods"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|u| u["interface"] == host.as_str() && u["addresses"] == json!(["10.1.1.3"]))
    });
    let pending = &s["unknown_pods"][0];
    assert_eq!(pending["treatment"], treatment);
    let port = pending["port"].clone();
    let log = agent.log().to_owned();
    assert_eq!(
        log.lines()
            .filter(
                |l| l.contains(&format!("pod interface {host} (")) && l.contains("matches no pod")
            )
            .count(),
        1,
        "logged once:\n{log}"
    );
    let before = drops(&s, "unknown_pod");
    match treatment {
        "isolate" => {
            assert!(!ping(c, "10.1.1.1"), "an isolated pod reached a");
            assert!(!ping(a, "10.1.1.3"), "a reached an isolated pod");
            let s = wait_status(&status_file, "unknown_pod drops", |s| {
                drops(s, "unknown_pod") > before
            });
            assert_eq!(s["unknown_pods"][0]["interface"], host.as_str());
            // The same, scraped (the metrics follow the status file's second).
            let deadline = Instant::now() + Duration::from_secs(10);
            let m = loop {
                let m = scrape(&node);
                let dropped = m
                    .get("ocelot_drops_total{worker=\"0\",core=\"0\",reason=\"unknown_pod\"}")
                    .copied()
                    .unwrap_or(0.0);
                if dropped > 0.0 || Instant::now() > deadline {
                    break m;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            for (name, expected) in [
                (
                    "ocelot_unknown_pod_interfaces{treatment=\"isolate\"}",
                    Some(1.0),
                ),
                (
                    "ocelot_datastore_connected{datastore=\"kubernetes\"}",
                    Some(0.0),
                ),
                (
                    "ocelot_drops_total{worker=\"0\",core=\"0\",reason=\"unknown_pod\"}",
                    None,
                ),
                (
                    "ocelot_datastore_stale_seconds{datastore=\"kubernetes\"}",
                    None,
                ),
                ("ocelot_snapshot_epoch", None),
                (
                    "ocelot_worker_rx_frames_total{worker=\"0\",core=\"0\"}",
                    None,
                ),
            ] {
                let got = m.get(name).copied();
                match expected {
                    Some(v) => assert_eq!(got, Some(v), "{name} in {m:?}"),
                    None => assert!(got.is_some_and(|v| v > 0.0), "{name} in {m:?}"),
                }
            }
        }
        _ => {
            wait_status(&status_file, "the pod's MAC", |s| {
                s["unknown_pods"][0]["pod_mac"].is_string()
            });
            assert!(ping(c, "10.1.1.1"), "a's ipBlock admits the unknown pod");
            assert!(
                ping(a, "10.1.1.3"),
                "an allowed pod has no policy of its own"
            );
            assert!(
                !ping(c, "10.1.1.2"),
                "b's selector matched a pod without labels"
            );
            let s = status(&status_file);
            assert_eq!(drops(&s, "unknown_pod"), before, "{s}");
        }
    }

    // The API server comes back with the pod and a policy for it: the same port takes the
    // pod's identity (b's selector now matches it) and its policy (a cannot reach it).
    dataplane::sys::in_netns(node.name(), || api.restart(true)).expect("enter node");
    api.apply(&pod_object("c", "10.1.1.3"));
    api.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "c-deny", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"]}}),
    );
    let s = wait_status(&status_file, "the pod object", |s| {
        s["datastore"]["connected"] == json!(true)
            && s["unknown_pods"].as_array().is_some_and(Vec::is_empty)
    });
    let ports: Vec<&Value> = s["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["interface"] == host.as_str())
        .collect();
    assert_eq!(ports.len(), 1, "{s}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&node);
        let unknown = m.get(&format!(
            "ocelot_unknown_pod_interfaces{{treatment=\"{treatment}\"}}"
        ));
        let connected = m.get("ocelot_datastore_connected{datastore=\"kubernetes\"}");
        if unknown == Some(&0.0) && connected == Some(&1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics after the pod arrived: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_ping(
        c,
        "10.1.1.2",
        true,
        "b's selector never matched c",
        &mut agent,
    );
    wait_ping(a, "10.1.1.3", false, "c's policy never applied", &mut agent);
    assert!(
        agent.log().contains(&format!("{host}: pod x/c arrived")),
        "adoption not logged (port {port}):\n{}",
        agent.log()
    );
    drop(agent);
    for p in &pods {
        assert!(
            !node.has_xdp(&p.host_dev).expect("ip link"),
            "XDP left behind"
        );
    }
    drop(veths);
}

#[test]
fn an_unknown_pod_interface_is_isolated_until_its_pod_arrives() {
    unknown_pod_interface("isolate");
}

#[test]
fn an_unknown_pod_interface_may_be_allowed_without_identity() {
    unknown_pod_interface("allow");
}

#[test]
fn a_wrong_unknown_pods_value_is_refused_naming_the_entry() {
    let node = Netns::new("kcfg").expect("netns");
    let dir = TempDir::new("ocelot-kube-cfg").expect("temp dir");
    let config = dir.path().join("ocelot.toml");
    std::fs::write(&config, "[datastore]\nunknown_pods = \"open\"\n").expect("config");
    let out = Command::new("ip")
        .args(["netns", "exec", node.name(), "env", "NODE_NAME=n1"])
        .arg(binary("ocelot"))
        .args(["run", "--datastore", "kubernetes", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains("datastore.unknown_pods: \"open\" is neither \"isolate\" nor \"allow\""),
        "{stderr}"
    );
    assert!(!stderr.contains(tools::agent::READY_LINE), "{stderr}");
}
