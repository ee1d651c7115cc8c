//! `deploy/ocelot.yaml` as Kubernetes would read it.
//!
//! Every document is deserialised into its k8s-openapi type and serialised back; a key of the
//! file that does not survive the round trip is a field the type does not have (a typo the
//! API server would reject or, worse, silently drop), so it fails the test. Then the parts
//! that must agree with the code are checked: the ClusterRole grants get/list/watch on
//! exactly the resources `control::kube` watches, the DaemonSet gives the agent its node's
//! name and the command the agent understands, the ConfigMap's TOML parses with the
//! agent's own config parser, the probes are `ocelotctl status` commands that the real
//! `ocelotctl` accepts and answers correctly against real status files, and the image
//! (`deploy/Dockerfile`) installs every program the DaemonSet runs.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

fn manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ocelot.yaml")
}

/// Every YAML document of the file, as JSON values (empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).expect("a YAML document");
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The paths of `original` that are missing from, or differ in, `round_trip`.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        _ => out.push(format!("{path} ({original} became {round_trip})")),
    }
}

/// Deserialises `doc` as `T` and fails on any key or value the type does not keep.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let name = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name} is not a valid object: {e}"));
    let back = serde_json::to_value(&obj).expect("serialise");
    let mut missing = Vec::new();
    lost(doc, &back, "", &mut missing);
    assert!(
        missing.is_empty(),
        "{name}: fields the Kubernetes type does not have (typos?): {missing:?}"
    );
    obj
}

struct Deploy {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn parse(text: &str) -> Deploy {
    let mut d = Deploy {
        namespaces: Vec::new(),
        service_accounts: Vec::new(),
        roles: Vec::new(),
        bindings: Vec::new(),
        config_maps: Vec::new(),
        daemon_sets: Vec::new(),
    };
    for doc in documents(text) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let api = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => d.namespaces.push(typed(&doc)),
            ("v1", "ServiceAccount") => d.service_accounts.push(typed(&doc)),
            ("v1", "ConfigMap") => d.config_maps.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => d.roles.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                d.bindings.push(typed(&doc));
            }
            ("apps/v1", "DaemonSet") => d.daemon_sets.push(typed(&doc)),
            _ => panic!("unexpected object {api} {kind} in deploy/ocelot.yaml"),
        }
    }
    d
}

fn deploy() -> Deploy {
    let text = std::fs::read_to_string(manifest_path()).expect("deploy/ocelot.yaml");
    parse(&text)
}

/// The API group of each resource the datastore watches.
fn api_group(r: control::kube::Resource) -> &'static str {
    match r {
        control::kube::Resource::NetworkPolicies => "networking.k8s.io",
        control::kube::Resource::Namespaces
        | control::kube::Resource::Pods
        | control::kube::Resource::Nodes => "",
    }
}

#[test]
fn every_document_is_a_valid_kubernetes_object() {
    let d = deploy();
    assert_eq!(d.namespaces.len(), 1);
    assert_eq!(d.service_accounts.len(), 1);
    assert_eq!(d.roles.len(), 1);
    assert_eq!(d.bindings.len(), 1);
    assert_eq!(d.config_maps.len(), 1);
    assert_eq!(d.daemon_sets.len(), 1);
}

#[test]
fn a_misspelt_field_fails_the_round_trip() {
    let text = std::fs::read_to_string(manifest_path()).expect("deploy/ocelot.yaml");
    for (right, wrong) in [
        ("hostNetwork: true", "hostNetwrok: true"),
        (
            "mountPropagation: HostToContainer",
            "mountPropagaton: HostToContainer",
        ),
        ("fieldPath: spec.nodeName", "fieldpath: spec.nodeName"),
    ] {
        assert!(text.contains(right), "the file no longer has {right:?}");
        let broken = text.replacen(right, wrong, 1);
        let r = std::panic::catch_unwind(|| parse(&broken));
        assert!(r.is_err(), "{wrong:?} was accepted");
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_the_datastore_watches() {
    let d = deploy();
    let want: BTreeSet<(String, String, String)> = control::kube::Resource::ALL
        .iter()
        .flat_map(|r| {
            ["get", "list", "watch"].map(|v| {
                (
                    api_group(*r).to_owned(),
                    r.as_str().to_owned(),
                    v.to_owned(),
                )
            })
        })
        .collect();
    let mut granted = BTreeSet::new();
    for rule in d.roles[0].rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "unexpected rule {rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(
                        granted.insert((g.clone(), r.clone(), v.clone())),
                        "{g}/{r} {v} granted twice"
                    );
                }
            }
        }
    }
    assert_eq!(granted, want);
}

#[test]
fn the_binding_gives_the_role_to_the_daemon_sets_service_account() {
    let d = deploy();
    let sa = &d.service_accounts[0].metadata;
    let ns = d.namespaces[0].metadata.name.as_deref();
    assert_eq!(sa.namespace.as_deref(), ns);
    let b = &d.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), d.roles[0].metadata.name.as_ref());
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.namespace);
    let ds = &d.daemon_sets[0];
    assert_eq!(ds.metadata.namespace.as_deref(), ns);
    let pod = ds.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name, sa.name);
}

#[test]
fn the_daemon_set_runs_the_agent_as_the_node_needs() {
    let d = deploy();
    let cm = &d.config_maps[0];
    let spec = &d.daemon_sets[0].spec;
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(
        c.command.as_deref().unwrap_or_default(),
        [
            "ocelot",
            "run",
            "--datastore",
            "kubernetes",
            "--config",
            "/etc/ocelot/ocelot.toml",
            "--status",
            "/run/ocelot/status.json",
            "--metrics",
            "0.0.0.0:9471"
        ]
    );
    // The metrics port is declared, and announced to Prometheus, as the agent binds it.
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a metrics port");
    assert_eq!(port.container_port, 9471);
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .expect("pod annotations");
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("9471")
    );
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(node_name.value.is_none());

    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref().unwrap_or_default(), ["ALL"]);
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "NET_RAW", "BPF", "SYS_ADMIN", "IPC_LOCK"])
    );
    assert!(
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
        "resource requests"
    );
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());

    // The host paths, shared from the host with HostToContainer propagation.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    for host in ["/sys/fs/bpf", "/var/run/netns"] {
        let v = volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host))
            .unwrap_or_else(|| panic!("hostPath {host}"));
        let m = mounts
            .iter()
            .find(|m| m.name == v.name)
            .unwrap_or_else(|| panic!("{host} is not mounted"));
        assert_eq!(m.mount_path, host);
        assert_eq!(m.mount_propagation.as_deref(), Some("HostToContainer"));
    }
    // The host path's tap is created through the host's /dev/net/tun.
    let tun = volumes
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/dev/net/tun")
        })
        .expect("hostPath /dev/net/tun");
    assert_eq!(
        tun.host_path.as_ref().and_then(|h| h.type_.as_deref()),
        Some("CharDevice")
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.name == tun.name && m.mount_path == "/dev/net/tun"),
        "/dev/net/tun is not mounted"
    );

    // The config file the command names is the ConfigMap's key.
    let config = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref())
        })
        .expect("the ConfigMap as a volume");
    let m = mounts
        .iter()
        .find(|m| m.name == config.name)
        .expect("the config volume is mounted");
    assert_eq!(m.mount_path, "/etc/ocelot");
    assert!(
        cm.data
            .as_ref()
            .is_some_and(|d| d.contains_key("ocelot.toml")),
        "the ConfigMap holds ocelot.toml"
    );
    assert!(
        mounts.iter().any(|m| m.mount_path == "/run/ocelot"),
        "the status file's directory is writable"
    );
}

#[test]
fn the_config_map_is_a_valid_agent_config() {
    let d = deploy();
    let text = d.config_maps[0]
        .data
        .as_ref()
        .and_then(|d| d.get("ocelot.toml"))
        .expect("ocelot.toml");
    let config = tools::agent::config::Config::parse(text)
        .unwrap_or_else(|e| panic!("the ConfigMap's ocelot.toml: {e}"));
    // The node's name must come from NODE_NAME, not be fixed for every node.
    assert_eq!(config.node.name, None);
    // Pods the agent does not know stay isolated (the documented default, said explicitly).
    assert_eq!(
        config.datastore.unknown_pods,
        tools::agent::config::UnknownPods::Isolate
    );
    // And the parser does refuse a typo, so the check above means something.
    assert!(tools::agent::config::Config::parse(&format!("{text}\n[xdp2]\n")).is_err());
}

/// The argv of a probe's exec command.
fn probe_argv(probe: Option<&k8s_openapi::api::core::v1::Probe>, which: &str) -> Vec<String> {
    probe
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap_or_else(|| panic!("the {which} probe is an exec probe"))
}

/// A status file as the agent writes it, `age` seconds old.
fn write_status(
    path: &std::path::Path,
    stale_seconds: f64,
    stopped: bool,
    age: std::time::Duration,
) {
    let mut s =
        tools::agent::status::Status::new("n1", &[], 3, 0, &control::node::BuildReport::default());
    s.datastore = serde_json::json!({
        "datastore": "kubernetes",
        "connected": stale_seconds <= 0.0,
        "stale_seconds": stale_seconds,
    });
    s.stopped = stopped;
    s.write(path).expect("write status");
    let mtime = std::time::SystemTime::now() - age;
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
}

/// Runs a probe's argv with the real `ocelotctl`, its status file replaced by `file`.
fn run_probe(argv: &[String], file: &std::path::Path) -> bool {
    let (program, args) = argv.split_first().expect("a command");
    assert_eq!(program, "ocelotctl", "probes run ocelotctl");
    let mut args = args.to_vec();
    let at = args
        .iter()
        .position(|a| a == "--file")
        .expect("the probe names the status file");
    let named = args.get_mut(at + 1).expect("a value for --file");
    assert_eq!(
        named, "/run/ocelot/status.json",
        "the probe reads the file the agent writes (--status)"
    );
    *named = file.display().to_string();
    let out = std::process::Command::new(ocelot_tests::bins::binary("ocelotctl"))
        .args(&args)
        .output()
        .expect("ocelotctl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Usage:"),
        "ocelotctl refused the probe's arguments {argv:?}: {stderr}"
    );
    out.status.success()
}

#[test]
fn the_probes_are_ocelotctl_status_commands_that_answer_right() {
    let d = deploy();
    let pod = d.daemon_sets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    let c = &pod.containers[0];
    let live = probe_argv(c.liveness_probe.as_ref(), "liveness");
    let ready = probe_argv(c.readiness_probe.as_ref(), "readiness");
    let dir = ocelot_tests::TempDir::new("ocelot-deploy-probe").expect("temp dir");
    let file = dir.path().join("status.json");
    let fresh = std::time::Duration::ZERO;
    // A fresh, current agent: alive and ready.
    write_status(&file, 0.0, false, fresh);
    assert!(run_probe(&live, &file) && run_probe(&ready, &file));
    // Cut off from the API server for 10 minutes: still alive (fail-static; a restart would
    // lose its view), no longer ready.
    write_status(&file, 600.0, false, fresh);
    assert!(
        run_probe(&live, &file),
        "liveness must not depend on the API server"
    );
    assert!(!run_probe(&ready, &file), "readiness ignores a stale view");
    // A wedged agent (the file stopped changing) and a stopped one: neither.
    write_status(&file, 0.0, false, std::time::Duration::from_secs(120));
    assert!(!run_probe(&live, &file) && !run_probe(&ready, &file));
    write_status(&file, 0.0, true, fresh);
    assert!(!run_probe(&live, &file) && !run_probe(&ready, &file));
    // No file yet (the first sync is not done): not ready.
    std::fs::remove_file(&file).expect("remove");
    assert!(!run_probe(&ready, &file));
}

#[test]
fn the_image_installs_every_program_the_daemon_set_runs() {
    let dockerfile = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile"),
    )
    .expect("deploy/Dockerfile");
    // The final stage: after the last FROM.
    let lines: Vec<&str> = dockerfile.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    let installed: BTreeSet<String> = lines
        .iter()
        .skip(last)
        .filter(|l| l.starts_with("COPY ") && l.trim_end().ends_with(" /usr/local/bin/"))
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|w| w.rsplit('/').next().map(str::to_owned))
        .collect();
    let d = deploy();
    let pod = d.daemon_sets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    let c = &pod.containers[0];
    let programs = [
        c.command.as_ref().and_then(|c| c.first()).cloned(),
        probe_argv(c.liveness_probe.as_ref(), "liveness")
            .first()
            .cloned(),
        probe_argv(c.readiness_probe.as_ref(), "readiness")
            .first()
            .cloned(),
    ];
    for program in programs.into_iter().flatten() {
        assert!(
            installed.contains(&program),
            "{program} is run by the DaemonSet but not installed in /usr/local/bin by \
             deploy/Dockerfile (installed: {installed:?})"
        );
    }
    // And the build stage builds them.
    for bin in ["ocelot", "ocelotctl"] {
        assert!(
            dockerfile.contains(&format!("--bin {bin}")),
            "the image does not build {bin}"
        );
    }
}
