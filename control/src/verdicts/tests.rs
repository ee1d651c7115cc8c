use std::path::PathBuf;

use super::*;

const CLUSTER: &str = "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIPs: [{ip: 'fd00::2'}, {ip: 10.0.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: x}
spec: {containers: [{name: c}]}
";

fn manifests() -> Manifests {
    match Manifests::from_texts([(PathBuf::from("m.yaml"), CLUSTER)]) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    }
}

/// Parses `input` and checks the error message (or `None` for success).
fn check_parse(input: &str, expected_err: Option<&str>) {
    match (parse_probes(input), expected_err) {
        (Ok(_), None) => {}
        (Err(e), Some(frag)) => {
            let msg = e.to_string();
            assert!(msg.contains(frag), "{msg:?} should contain {frag:?}");
        }
        (got, want) => panic!("{input:?}: got {got:?}, want error {want:?}"),
    }
}

#[test]
fn probe_lines_parse_or_name_their_line() {
    check_parse("", None);
    check_parse("# comment\n\n   \n", None);
    check_parse(r#"{"src":"x/a","dst":"10.0.0.2","port":80}"#, None);
    check_parse(
        "\n# c\n{\"src\":\"x/a\",\"dst\":\"y/b\"}\n",
        Some("probe line 3: missing \"port\""),
    );
    check_parse("{\"src\":\"x/a\"", Some("probe line 1: not a JSON object"));
    check_parse("[1]", Some("probe line 1: not a JSON object"));
    check_parse(
        r#"{"src":1,"dst":"y/b","port":80}"#,
        Some("\"src\" must be a string"),
    );
    check_parse(r#"{"src":"x/a","port":80}"#, Some("missing \"dst\""));
    check_parse(
        r#"{"src":"x/a","dst":"y/b","port":65536}"#,
        Some("port 65536 is not in 1..=65535"),
    );
    check_parse(
        r#"{"src":"x/a","dst":"y/b","port":"80"}"#,
        Some("port \"80\" is not in 1..=65535"),
    );
    check_parse(
        r#"{"src":"x/a","dst":"y/b","port":0}"#,
        Some("port 0 is not in"),
    );
    check_parse(
        r#"{"src":"x/a","dst":"y/b","port":80,"protocol":"tcp"}"#,
        Some("protocol \"tcp\" is not one of"),
    );
}

#[test]
fn probe_fields_and_defaults() {
    let probes = parse_probes(
        "# header\n{\"port\":53,\"dst\":\"y/b\",\"src\":\"x/a\",\"protocol\":\"UDP\",\"note\":[1]}\n\
         {\"src\":\"x/a\",\"dst\":\"y/b\",\"port\":80}\n",
    )
    .unwrap();
    assert_eq!(probes.len(), 2);
    assert_eq!(
        (probes[0].line, probes[0].port, probes[0].protocol),
        (2, 53, Protocol::Udp)
    );
    assert_eq!((probes[1].line, probes[1].protocol), (3, Protocol::Tcp));
}

#[test]
fn results_echo_the_probe_in_order_plus_verdict() {
    let m = manifests();
    let probes = parse_probes(
        "{\"port\":53,\"dst\":\"y/b\",\"src\":\"x/a\",\"protocol\":\"UDP\",\"verdict\":\"?\",\"note\":[1]}\n",
    )
    .unwrap();
    let results = evaluate(&m, &probes).unwrap();
    let line = results[0].to_json_line();
    let verdict = results[0].verdict.as_str();
    assert_eq!(
        line,
        format!(
            "{{\"port\":53,\"dst\":\"y/b\",\"src\":\"x/a\",\"protocol\":\"UDP\",\"note\":[1],\
             \"verdict\":\"{verdict}\"}}"
        )
    );
    // The dual-stack destination is checked in the source's family.
    assert_eq!(results[0].src_ip, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(results[0].dst_ip, "10.0.0.2".parse::<IpAddr>().unwrap());
}

#[test]
fn unresolvable_endpoints_name_the_line() {
    let m = manifests();
    let cases = [
        (
            "{\"src\":\"x/zz\",\"dst\":\"y/b\",\"port\":80}",
            "probe line 2: src: unknown pod \"x/zz\"",
        ),
        (
            "{\"src\":\"x/a\",\"dst\":\"x/pending\",\"port\":80}",
            "probe line 2: dst: pod \"x/pending\" has no IP address (status.podIPs)",
        ),
        (
            "{\"src\":\"a\",\"dst\":\"y/b\",\"port\":80}",
            "probe line 2: src: \"a\" is neither an IP address, node:NAME nor namespace/pod",
        ),
        (
            "{\"src\":\"node:n9\",\"dst\":\"y/b\",\"port\":80}",
            "probe line 2: src: unknown node \"n9\" (no Node object)",
        ),
    ];
    for (line, expected) in cases {
        let probes = parse_probes(&format!("# first line\n{line}\n")).unwrap();
        let err = evaluate(&m, &probes).unwrap_err().to_string();
        assert_eq!(err, expected);
    }
}

#[test]
fn matrices_cover_declared_ports_and_addressed_pods() {
    let m = manifests();
    let ev = Evaluator::new(&m);
    let ms = ev.matrices();
    let keys: Vec<_> = ms.iter().map(|m| (m.protocol, m.port)).collect();
    assert_eq!(keys, [(Protocol::Tcp, 80), (Protocol::Udp, 53)]);
    for mx in &ms {
        assert_eq!(mx.pods, ["x/a", "y/b"]);
        assert_eq!(mx.allowed.len(), 2);
        assert!(mx.allowed.iter().all(|row| row.len() == 2));
    }
}

#[test]
fn matrix_renders_header_rows_and_cells() {
    let mx = Matrix {
        port: 80,
        protocol: Protocol::Tcp,
        pods: vec!["x/a".into(), "y/bb".into()],
        allowed: vec![vec![true, false], vec![false, true]],
    };
    assert_eq!(
        mx.render(true),
        "80/TCP: rows = source, columns = destination (. allowed, X denied)\n\
         \x20        1  2\n\
         \x201 x/a   .  X\n\
         \x202 y/bb  X  .\n"
    );
    assert!(mx.render(false).contains(" 1 x/a   ✓  ✗\n"));
}
