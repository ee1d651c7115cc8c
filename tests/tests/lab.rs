//! `ocelot lab` and `ocelot run` end to end: real traffic through the AF_XDP dataplane on a
//! virtual node, checked probe by probe against `ocelotctl policy verdicts`.
//!
//! Needs root (CI runs it as root) and the `ocelot` and `ocelotctl` binaries, which
//! `scripts/test.sh` builds before running the tests. Every topology lives in namespaces the
//! lab creates and removes (also on panic).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use classifier::policy::Protocol;
use control::verdicts::{Evaluator, ProbeResult, Verdict};
use ocelot_tests::TempDir;
use ocelot_tests::bins::{binary, repo, run, serial, write_atomic};
use ocelot_tests::netpol::{model_yaml, policy};
use tools::lab::{Lab, LabOptions, matrix_probes};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn seed_demo_probes_from_traffic_equal_policy_verdicts() {
    let _serial = serial();
    let manifests = repo("examples/seed-demo");
    let probes = repo("examples/seed-demo/probes.jsonl");
    let lab = run(
        "ocelot",
        &["lab", "--manifests", &manifests, "--probes", &probes],
    );
    let stderr = String::from_utf8_lossy(&lab.stderr);
    assert!(lab.status.success(), "ocelot lab failed: {stderr}");
    let expected = run(
        "ocelotctl",
        &[
            "policy",
            "verdicts",
            "--manifests",
            &manifests,
            "--probes",
            &probes,
        ],
    );
    assert!(expected.status.success());
    assert_eq!(stdout(&lab), stdout(&expected));
    // The probe file includes an outside address, so the uplink carried traffic too.
    assert!(stdout(&lab).contains("192.0.2.1"));
    assert!(
        stderr.contains("0 differ from the compiled policy"),
        "{stderr}"
    );
}

#[test]
fn seed_demo_matrix_from_traffic_equals_policy_matrix() {
    let _serial = serial();
    let manifests = repo("examples/seed-demo");
    let lab = run("ocelot", &["lab", "--manifests", &manifests, "--ascii"]);
    assert!(
        lab.status.success(),
        "{}",
        String::from_utf8_lossy(&lab.stderr)
    );
    let expected = run(
        "ocelotctl",
        &["policy", "verdicts", "--manifests", &manifests, "--ascii"],
    );
    assert_eq!(stdout(&lab), stdout(&expected));
    assert!(stdout(&lab).contains("6379/TCP"));
}

/// Every pod pair on TCP and UDP 80 and 81, plus SCTP 80 when `sctp`.
fn model_probes(dir: &Path, sctp: bool) -> (Vec<ProbeResult>, Evaluator<'static>) {
    let manifests = Box::leak(Box::new(control::load_dir(dir).expect("manifests")));
    let evaluator = Evaluator::new(manifests);
    let mut matrices = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for port in [80, 81] {
            matrices.push(evaluator.matrix(port, protocol));
        }
    }
    if sctp {
        matrices.push(evaluator.matrix(80, Protocol::Sctp));
    }
    let expected = matrix_probes(&matrices)
        .iter()
        .map(|p| evaluator.probe(p).expect("probe resolves"))
        .collect();
    (expected, evaluator)
}

fn serve_model() -> BTreeSet<(Protocol, u16)> {
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .flat_map(|p| [(p, 80), (p, 81)])
        .collect()
}

/// Probes the lab and returns the probes whose traffic disagreed with the compiled policy.
fn disagreements(lab: &Lab, expected: &[ProbeResult]) -> Vec<String> {
    let stop = AtomicBool::new(false);
    let seen = lab
        .probe_all(expected, Duration::from_millis(1000), &stop)
        .expect("probes run");
    expected
        .iter()
        .zip(seen)
        .filter(|(e, s)| e.verdict != s.verdict)
        .map(|(e, s)| {
            format!(
                "{} -> {} {}/{}: policy {:?}, traffic {:?}",
                e.probe.src,
                e.probe.dst,
                e.probe.port,
                e.probe.protocol.as_str(),
                e.verdict,
                s.verdict
            )
        })
        .collect()
}

/// The 3×3 model's policy shapes, applied one after another to one running agent by
/// editing its manifests directory: each must take effect without a restart, and traffic
/// must then agree with the compiled policy on every probe.
#[test]
fn three_by_three_policy_shapes_apply_live_and_traffic_matches_verdicts() {
    let _serial = serial();
    let dir = TempDir::new("ocelot-lab-3x3").expect("temp dir");
    write_atomic(dir.path(), "model.yaml", &model_yaml());
    write_atomic(dir.path(), "policies.yaml", "");
    let lab = Lab::start(&LabOptions {
        manifests: dir.path().to_path_buf(),
        workers: 1,
        agent: binary("ocelot"),
        verbose: false,
        serve: serve_model(),
        outside: Vec::new(),
        nodes: 1,
        uplink_queues: 1,
        pod_to_host_accept: false,
    })
    .expect("lab starts");
    let cases: Vec<(&str, String)> = vec![
        ("allow-all (no policy)", String::new()),
        (
            "default deny ingress in x",
            policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]"),
        ),
        (
            "deny all ingress and egress in y",
            policy(
                "y",
                "deny",
                "podSelector: {}\npolicyTypes: [Ingress, Egress]",
            ),
        ),
        (
            "ingress to x/a from pods of x only",
            policy(
                "x",
                "from-x",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector: {}",
            ),
        ),
        (
            "ingress to x/a from namespace y",
            policy(
                "x",
                "from-y",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}",
            ),
        ),
        (
            "ingress to x/a from pod b of namespace z (AND)",
            policy(
                "x",
                "from-zb",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: z}\n    podSelector:\n      matchLabels: {pod: b}",
            ),
        ),
        (
            "egress from x only to namespace z",
            policy(
                "x",
                "to-z",
                "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: z}",
            ),
        ),
        (
            "ingress to x/a from ipBlock 10.1.0.0/16 except y",
            policy(
                "x",
                "ipblock",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.1.0.0/16\n      except: [10.1.2.0/24]",
            ),
        ),
        (
            "named port serve-80-tcp to x/a",
            policy(
                "x",
                "named",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - port: serve-80-tcp",
            ),
        ),
        (
            "UDP 81 only to pods of y, endPort range on TCP 80-81 to z",
            policy(
                "y",
                "udp81",
                "podSelector: {}\ningress:\n- ports:\n  - protocol: UDP\n    port: 81",
            ) + &policy(
                "z",
                "range",
                "podSelector: {}\ningress:\n- ports:\n  - protocol: TCP\n    port: 80\n    endPort: 81",
            ),
        ),
        (
            "egress from z/c to x/a on TCP 80 only",
            policy(
                "z",
                "zc-egress",
                "podSelector:\n  matchLabels: {pod: c}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: x}\n    podSelector:\n      matchLabels: {pod: a}\n  ports:\n  - protocol: TCP\n    port: 80",
            ),
        ),
        ("back to allow-all", String::new()),
    ];
    let mut report = String::new();
    for (name, policies) in &cases {
        write_atomic(dir.path(), "policies.yaml", policies);
        lab.wait_applied(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let (expected, _) = model_probes(dir.path(), false);
        let wrong = disagreements(&lab, &expected);
        if !wrong.is_empty() {
            report.push_str(&format!("== {name} ==\n{}\n", wrong.join("\n")));
        }
    }
    let log = lab.agent_log();
    lab.stop()
        .expect("agent stops cleanly, leaving no XDP program");
    assert!(report.is_empty(), "{report}\nagent log:\n{log}");
}

/// SCTP (judged by a crafted INIT reaching the destination), spoofed sources, and two
/// workers on the two cores with the pods split between them.
#[test]
fn sctp_spoofing_and_two_workers() {
    let _serial = serial();
    let dir = TempDir::new("ocelot-lab-sctp").expect("temp dir");
    write_atomic(dir.path(), "model.yaml", &model_yaml());
    write_atomic(
        dir.path(),
        "policies.yaml",
        &policy(
            "x",
            "sctp",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n  ports:\n  - protocol: SCTP\n    port: 80",
        ),
    );
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len());
    let workers = cores.min(2);
    let mut serve = serve_model();
    serve.insert((Protocol::Sctp, 80));
    let lab = Lab::start(&LabOptions {
        manifests: dir.path().to_path_buf(),
        workers,
        agent: binary("ocelot"),
        verbose: false,
        serve,
        outside: Vec::new(),
        nodes: 1,
        uplink_queues: 1,
        pod_to_host_accept: false,
    })
    .expect("lab starts");
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    // SCTP to x/a from every pod: only y's arrive. (All pairs would take long: SCTP probes
    // run one at a time.)
    let (all, _) = model_probes(dir.path(), true);
    let sctp: Vec<ProbeResult> = all
        .into_iter()
        .filter(|p| p.probe.protocol == Protocol::Sctp && p.probe.dst == "x/a")
        .collect();
    assert_eq!(sctp.len(), 9);
    let wrong = disagreements(&lab, &sctp);
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", lab.agent_log());
    assert!(
        sctp.iter()
            .any(|p| p.verdict == Verdict::Allow && p.probe.src != "x/a")
    );

    // Spoofing: x/b sends from z/c's address; nothing may arrive, and the agent counts it.
    let before = spoof_drops(&lab);
    let xb = lab.pod("x/b").expect("x/b");
    xb.pod
        .ns
        .addr_add("eth0", "10.1.3.3/32")
        .expect("second address");
    let out = xb
        .pod
        .ns
        .exec(&[
            "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "10.1.3.3", "10.1.2.1",
        ])
        .expect("ping runs");
    assert!(!out.status.success(), "a spoofed ping got an answer");
    xb.pod
        .ns
        .ip(&["addr", "del", "10.1.3.3/32", "dev", "eth0"])
        .expect("address removed");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        spoof_drops(&lab) >= before + 3,
        "spoofed frames not counted: {}",
        lab.status().expect("status")
    );

    // Traffic between pods of different workers crossed the hand-off.
    let (tcp, _) = model_probes(dir.path(), false);
    let tcp: Vec<ProbeResult> = tcp
        .into_iter()
        .filter(|p| p.probe.protocol == Protocol::Tcp && p.probe.port == 80)
        .collect();
    let wrong = disagreements(&lab, &tcp);
    assert!(wrong.is_empty(), "{wrong:#?}");
    if workers == 2 {
        std::thread::sleep(Duration::from_millis(1500));
        let status = lab.status().expect("status");
        let handed: u64 = status["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["handoff_out"].as_u64().unwrap_or(0))
            .sum();
        assert!(handed > 0, "no frame crossed the hand-off: {status}");
    }
    lab.stop().expect("agent stops cleanly");
}

fn spoof_drops(lab: &Lab) -> u64 {
    let status = lab.status().expect("status");
    status["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["drops"]["spoofed_source_ip"].as_u64().unwrap_or(0))
        .sum()
}

/// Misconfigurations are refused before anything is attached, naming the entry.
#[test]
fn wrong_config_is_refused_before_attaching() {
    let _serial = serial();
    use ocelot_tests::netns::{Netns, VethPair};
    let node = Netns::new("cfg").expect("netns");
    let pod = Netns::new("cfgpod").expect("netns");
    let veth = control::naming::veth_name("x", "a");
    let _pair = VethPair::new(&pod, "eth0", &node, &veth).expect("veth");
    let dir = TempDir::new("ocelot-cfg").expect("temp dir");
    write_atomic(dir.path(), "model.yaml", &model_yaml());
    let cases = [
        (
            "[[workers]]\ncore = 4096\n",
            "workers[0].core: core 4096 does not exist",
        ),
        (
            "[[workers]]\ncore = 0\ninterfaces = [\"nosuchif\"]\n",
            "workers[0].interfaces[0]: interface \"nosuchif\" does not exist",
        ),
        (
            &format!("[[workers]]\ncore = 0\ninterfaces = [\"{veth}:3\"]\n"),
            "workers[0].interfaces[0]: queue 3 is out of range",
        ),
        ("[node]\nbogus = 1\n", "unknown field `bogus`"),
    ];
    for (config, want) in cases {
        let file = dir.path().join("ocelot.toml.txt");
        std::fs::write(&file, config).expect("config");
        let out = Command::new("ip")
            .args(["netns", "exec", node.name()])
            .arg(binary("ocelot"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--manifests")
            .arg(dir.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{config} accepted");
        assert!(stderr.contains(want), "{config}: {stderr}");
        assert!(
            !node.has_xdp(&veth).expect("ip link"),
            "{config}: XDP attached"
        );
    }
}

/// A pod whose veth and manifest appear while the agent runs is attached and reachable; when
/// its manifest goes, its port is retired and its traffic stops; it comes back when it does.
#[test]
fn pods_are_attached_and_retired_live() {
    let _serial = serial();
    use ocelot_tests::netns::{Netns, Pod, VethPair};
    let dir = TempDir::new("ocelot-lab-live").expect("temp dir");
    write_atomic(dir.path(), "model.yaml", &model_yaml());
    let lab = Lab::start(&LabOptions {
        manifests: dir.path().to_path_buf(),
        workers: 1,
        agent: binary("ocelot"),
        verbose: false,
        serve: serve_model(),
        outside: Vec::new(),
        nodes: 1,
        uplink_queues: 1,
        pod_to_host_accept: false,
    })
    .expect("lab starts");
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    let pod_yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: d\n  namespace: x\n  labels:\n    pod: d\nstatus:\n  podIPs:\n  - ip: 10.1.1.4\n";
    let ns = Netns::new("d").expect("netns");
    ns.disable_ipv6().expect("sysctl");
    let host = control::naming::veth_name("x", "d");
    let _veth = VethPair::new(&ns, "eth0", &lab.node, &host).expect("veth");
    let d = Pod::configure_proxy_arp(ns, "10.1.1.4", &host).expect("pod");
    let ping = |to: &str| {
        d.ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", to])
            .expect("ping runs")
            .status
            .success()
    };
    assert!(!ping("10.1.2.1"), "reachable before it is in the datastore");

    write_atomic(dir.path(), "d.yaml", pod_yaml);
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    assert!(
        ping("10.1.2.1"),
        "new pod cannot reach y/a\n{}",
        lab.agent_log()
    );
    assert!(
        lab.status().expect("status")["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["interface"] == host.as_str())
    );

    std::fs::remove_file(dir.path().join("d.yaml")).expect("remove");
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    assert!(!ping("10.1.2.1"), "reachable after its pod was deleted");
    assert!(
        !lab.node.has_xdp(&host).expect("ip link"),
        "XDP left on a retired port"
    );

    write_atomic(dir.path(), "d.yaml", pod_yaml);
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    assert!(ping("10.1.2.1"), "pod not reattached\n{}", lab.agent_log());
    lab.stop().expect("agent stops cleanly");
}

/// An agent killed with SIGKILL leaves its XDP programs behind; the next start removes them
/// and runs; SIGTERM then leaves nothing.
#[test]
fn a_crashed_run_is_cleaned_up_by_the_next_start() {
    let _serial = serial();
    use ocelot_tests::netns::{Netns, VethPair};
    let node = Netns::new("crash").expect("netns");
    let pod = Netns::new("crashpod").expect("netns");
    let veth = control::naming::veth_name("x", "a");
    let _pair = VethPair::new(&pod, "eth0", &node, &veth).expect("veth");
    let dir = TempDir::new("ocelot-crash").expect("temp dir");
    write_atomic(dir.path(), "model.yaml", &model_yaml());
    let config = dir.path().join("ocelot.toml.txt");
    std::fs::write(&config, "[[workers]]\ncore = 0\n").expect("config");
    let start = || {
        Command::new("ip")
            .args(["netns", "exec", node.name()])
            .arg(binary("ocelot"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--manifests")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts")
    };
    let wait_ready = |child: &mut std::process::Child| -> String {
        use std::io::{BufRead, BufReader};
        let stderr = child.stderr.take().expect("stderr");
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with(tools::agent::READY_LINE) {
                return seen;
            }
        }
        panic!("agent never became ready:\n{seen}");
    };
    let mut first = start();
    wait_ready(&mut first);
    assert!(node.has_xdp(&veth).expect("ip link"));
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    assert!(
        node.has_xdp(&veth).expect("ip link"),
        "a killed agent cannot clean up"
    );
    let mut second = start();
    let log = wait_ready(&mut second);
    assert!(log.contains("removed XDP program"), "{log}");
    let pid = second.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = second.wait().expect("exits");
    assert!(status.success(), "{status}");
    assert!(
        !node.has_xdp(&veth).expect("ip link"),
        "SIGTERM left XDP behind"
    );
}

/// Dual-stack pods: IPv6 through the dataplane — the pods resolve their IPv6 gateway with
/// neighbour discovery, which the dataplane answers (proxy NDP) — under the same policy as
/// IPv4: b admits only a, on port 80.
#[test]
fn ipv6_pods_resolve_the_gateway_and_meet_policy() {
    let _serial = serial();
    let dir = TempDir::new("ocelot-lab-v6").expect("temp dir");
    let mut pods = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: v6}\n");
    for (name, k) in [("a", 1), ("b", 2), ("c", 3)] {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: v6, labels: {{pod: {name}}}}}\n\
             spec:\n  containers:\n  - name: c\n    ports: [{{containerPort: 80}}]\n\
             status:\n  podIPs: [{{ip: 10.67.0.{k}}}, {{ip: \"fd00:67::{k}\"}}]\n"
        ));
    }
    write_atomic(dir.path(), "pods.yaml", &pods);
    write_atomic(
        dir.path(),
        "policies.yaml",
        &policy(
            "v6",
            "b-from-a",
            "podSelector:\n  matchLabels: {pod: b}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: a}\n  ports:\n  - port: 80",
        ),
    );
    let lab = Lab::start(&LabOptions {
        manifests: dir.path().to_path_buf(),
        workers: 1,
        agent: binary("ocelot"),
        verbose: false,
        serve: BTreeSet::new(),
        outside: Vec::new(),
        nodes: 1,
        uplink_queues: 1,
        pod_to_host_accept: false,
    })
    .expect("lab starts");
    lab.wait_applied(Duration::from_secs(20)).expect("applied");
    let ns = |key: &str| lab.pod(key).expect("pod").pod.ns.name().to_owned();
    let b6: std::net::Ipv6Addr = "fd00:67::2".parse().unwrap();
    // Listeners on b's IPv6 address (a connect completes in the kernel's backlog).
    let _listeners: Vec<std::net::TcpListener> = [80u16, 81]
        .iter()
        .map(|port| {
            dataplane::sys::in_netns(&ns("v6/b"), || {
                std::net::TcpListener::bind((b6, *port)).expect("listen on b")
            })
            .expect("enter b")
        })
        .collect();
    let connect = |from: &str, port: u16| {
        dataplane::sys::in_netns(&ns(from), || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((b6, port)),
                Duration::from_secs(2),
            )
            .is_ok()
        })
        .expect("enter pod")
    };
    // The first connect may wait for neighbour discovery; retry it briefly.
    let allowed = (0..5).any(|_| connect("v6/a", 80));
    assert!(allowed, "a → b:80 over IPv6:\n{}", lab.agent_log());
    assert!(!connect("v6/a", 81), "a → b:81 is not in b's policy");
    assert!(!connect("v6/c", 80), "c is not admitted by b's policy");
    let neigh = lab
        .pod("v6/a")
        .expect("a")
        .pod
        .ns
        .ip(&["-6", "neigh", "show", "dev", "eth0"])
        .expect("ip neigh");
    assert!(
        neigh.contains("fe80::ecee:eeff:feee:eeee") && neigh.contains("lladdr"),
        "a resolved its IPv6 gateway: {neigh}"
    );
}
