//! Runs the real `ocelotctl` binary: output shapes, exit codes and error messages. Verdict
//! values are the policy compiler's business and are tested in `tests/policy_semantics.rs`;
//! here only their form is checked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A scratch directory removed on drop, even when the test panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ocelotctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> &Self {
        std::fs::write(self.0.join(file), text).unwrap();
        self
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn seed_demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-demo")
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocelotctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Runs and checks success or failure, returning (stdout, stderr).
fn check(args: &[&str], stdin: Option<&str>, success: bool) -> (String, String) {
    let out = run(args, stdin);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.success(),
        success,
        "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn probes_give_json_lines_in_input_order_with_fields_kept() {
    let dir = seed_demo();
    let probes = dir.join("probes.jsonl");
    let (stdout, stderr) = check(
        &[
            "policy",
            "verdicts",
            "--manifests",
            dir.to_str().unwrap(),
            "--probes",
            probes.to_str().unwrap(),
        ],
        None,
        true,
    );
    assert_eq!(stderr, "");
    let inputs: Vec<String> = std::fs::read_to_string(&probes)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.to_owned())
        .collect();
    let outputs: Vec<&str> = stdout.lines().collect();
    assert_eq!(outputs.len(), inputs.len());
    for (input, output) in inputs.iter().zip(&outputs) {
        // The output is the input object, compacted, with the verdict appended.
        let compact: serde_json::Value = serde_json::from_str(input).unwrap();
        let compact_text = input.replace(": ", ":").replace(", ", ",");
        let prefix = compact_text.strip_suffix('}').unwrap();
        assert!(
            output == &format!("{prefix},\"verdict\":\"allow\"}}")
                || output == &format!("{prefix},\"verdict\":\"deny\"}}"),
            "{input} -> {output}"
        );
        let parsed: serde_json::Value = serde_json::from_str(output).unwrap();
        assert_eq!(parsed["src"], compact["src"]);
    }
}

#[test]
fn probes_from_stdin() {
    let dir = seed_demo();
    let (stdout, _) = check(
        &[
            "policy",
            "verdicts",
            "--manifests",
            dir.to_str().unwrap(),
            "--probes",
            "-",
        ],
        Some(
            "{\"dst\":\"default/frontend\",\"src\":\"10.65.0.20\",\"port\":80,\"protocol\":\"TCP\"}\n",
        ),
        true,
    );
    let line = stdout.trim_end();
    assert_eq!(stdout.lines().count(), 1);
    assert!(
        line.starts_with(
            "{\"dst\":\"default/frontend\",\"src\":\"10.65.0.20\",\"port\":80,\"protocol\":\"TCP\",\"verdict\":\""
        ),
        "{line}"
    );
}

#[test]
fn matrix_names_each_port_and_pod() {
    let dir = seed_demo();
    for (ascii, yes, no) in [(false, '✓', '✗'), (true, '.', 'X')] {
        let mut args = vec!["policy", "verdicts", "--manifests", dir.to_str().unwrap()];
        if ascii {
            args.push("--ascii");
        }
        let (stdout, _) = check(&args, None, true);
        let headers: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("rows = source"))
            .map(|l| l.split(':').next().unwrap())
            .collect();
        assert_eq!(headers, ["80/TCP", "6379/TCP", "9000/TCP", "9001/TCP"]);
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains('/') && !l.contains("rows = source"))
            .collect();
        assert_eq!(rows.len(), 16);
        for row in &rows[..4] {
            let cells: Vec<char> = row
                .split_whitespace()
                .skip(2)
                .flat_map(|c| c.chars())
                .collect();
            assert_eq!(cells.len(), 4, "{row}");
            assert!(cells.iter().all(|c| *c == yes || *c == no), "{row}");
        }
        assert!(rows[3].contains("management-ui/management-ui"));
    }
}

#[test]
fn compile_prints_a_summary() {
    let legacy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed-demo-legacy");
    let (stdout, stderr) = check(
        &["policy", "compile", "--manifests", legacy.to_str().unwrap()],
        None,
        true,
    );
    for line in [
        "namespaces: 3",
        "pods: 4",
        "policies: 5",
        "compile errors: ",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }
    assert!(stdout.contains("endpoints: "));
    assert_eq!(stderr.lines().count(), 5, "{stderr}");
    assert!(
        stderr.lines().all(|l| l.starts_with("warning: ")),
        "{stderr}"
    );
}

#[test]
fn invalid_manifest_fails_naming_file_and_object() {
    let dir = TempDir::new("invalid");
    dir.write(
        "a.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )
    .write(
        "b.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: bad, namespace: x}\n\
         spec: {ingress: [{ports: [{port: 80, protocol: ICMP}]}]}\n",
    );
    let (stdout, stderr) = check(
        &["policy", "verdicts", "--manifests", dir.0.to_str().unwrap()],
        None,
        false,
    );
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("error: loading manifests from "),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "b.yaml document 2 (NetworkPolicy x/bad): spec.ingress[0].ports[0]: protocol \"ICMP\""
        ),
        "{stderr}"
    );
}

#[test]
fn unknown_kind_warns_and_continues() {
    let dir = TempDir::new("unknown");
    dir.write(
        "all.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n\
         spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n\
         status: {podIP: 10.0.0.1}\n",
    );
    let (stdout, stderr) = check(
        &[
            "policy",
            "verdicts",
            "--manifests",
            dir.0.to_str().unwrap(),
            "--probes",
            "-",
        ],
        Some("{\"src\":\"x/a\",\"dst\":\"x/a\",\"port\":80}\n"),
        true,
    );
    assert_eq!(stdout.lines().count(), 1);
    assert!(stderr.contains("warning: "), "{stderr}");
    assert!(stderr.contains("(Service x/s): skipped"), "{stderr}");
    assert!(
        stderr.contains("namespace \"x\" has no Namespace object"),
        "{stderr}"
    );
}

#[test]
fn probe_with_unknown_pod_fails_naming_the_line() {
    let dir = seed_demo();
    let (stdout, stderr) = check(
        &[
            "policy",
            "verdicts",
            "--manifests",
            dir.to_str().unwrap(),
            "--probes",
            "-",
        ],
        Some(
            "# a comment\n\
             {\"src\":\"client/client\",\"dst\":\"default/frontend\",\"port\":80}\n\
             {\"src\":\"client/client\",\"dst\":\"default/nope\",\"port\":80}\n",
        ),
        false,
    );
    assert_eq!(stdout, "", "no partial output");
    assert!(
        stderr.contains("probes from -: probe line 3: dst: unknown pod \"default/nope\""),
        "{stderr}"
    );
}

#[test]
fn bad_probe_line_and_missing_directory_fail() {
    let dir = seed_demo();
    let (_, stderr) = check(
        &[
            "policy",
            "verdicts",
            "--manifests",
            dir.to_str().unwrap(),
            "--probes",
            "-",
        ],
        Some("\n{\"src\":\"client/client\",\"dst\":\"default/frontend\",\"port\":99999}\n"),
        false,
    );
    assert!(stderr.contains("probe line 2: port 99999"), "{stderr}");
    let (_, stderr) = check(
        &["policy", "verdicts", "--manifests", "/nonexistent/ocelot"],
        None,
        false,
    );
    assert!(
        stderr.contains("cannot read /nonexistent/ocelot"),
        "{stderr}"
    );
}

#[test]
fn status_prints_counters_and_judges_readiness() {
    let dir = TempDir::new("status");
    let file = dir.0.join("status.json");
    let write = |stopped: bool, stale: f64| {
        let doc = serde_json::json!({
            "node": "n1", "epoch": 7, "stopped": stopped,
            "datastore": {"datastore": "kubernetes", "stale_seconds": stale},
            "report": {"pods_without_port": ["x/a"], "unresolved_next_hops": []},
            "workers": [{"core": 1, "rx": 10, "tx": 9, "forwarded": 8, "replied": 1,
                         "drops": {"policy_ingress": 1}}],
        });
        std::fs::write(&file, doc.to_string()).unwrap();
    };
    let path = file.to_str().unwrap().to_owned();
    write(false, 0.5);
    let (out, _) = check(&["status", "--file", &path], None, true);
    assert!(
        out.contains("node n1 · epoch 7 · datastore kubernetes"),
        "{out}"
    );
    assert!(out.contains("drops: policy_ingress=1"), "{out}");
    assert!(out.contains("pods_without_port: [\"x/a\"]"), "{out}");
    let (_, err) = check(
        &["status", "--file", &path, "--max-stale-seconds", "0.1"],
        None,
        false,
    );
    assert!(err.contains("stale"), "{err}");
    write(true, 0.5);
    let (_, err) = check(&["status", "--file", &path], None, false);
    assert!(err.contains("stopped"), "{err}");
    let (_, err) = check(
        &["status", "--file", "/nonexistent/status.json"],
        None,
        false,
    );
    assert!(err.contains("reading /nonexistent/status.json"), "{err}");
}
