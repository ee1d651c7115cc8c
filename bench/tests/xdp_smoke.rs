//! Smoke test of `ocelot-bench xdp --quick` (needs root and network namespaces, as CI has):
//! every device runs for a few seconds and the report keeps its invariants. Nothing here
//! checks a speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ocelot-bench");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("ocelot-bench starts")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xbench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Whether the agent is built next to the harness (it is built by `-p tools`).
fn ocelot_built() -> bool {
    let bin = Path::new(BIN);
    bin.parent().is_some_and(|d| d.join("ocelot").is_file())
}

/// Namespaces a finished run of ours could have left (names start `ocl-<pid>-`).
fn leftover_namespaces(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("ocl-{pid}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn quick_run_reports_every_device_with_consistent_figures() {
    let dir = out_dir("quick");
    let json = dir.join("r.json");
    let mut devices = vec!["kernel", "raw-xsk"];
    if ocelot_built() {
        devices.insert(0, "ocelot");
    }
    let child = Command::new(BIN)
        .args([
            "xdp",
            "--quick",
            "--devices",
            &devices.join(","),
            "--out-dir",
            dir.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        leftover_namespaces(pid).is_empty(),
        "namespaces left behind"
    );
    // The conditions line comes with the figures.
    assert!(
        stdout.contains("B frames") && stdout.contains("kernel "),
        "{stdout}"
    );
    assert!(stderr.contains("round 1/1"), "no progress lines: {stderr}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let reported = v["devices"].as_array().unwrap();
    assert_eq!(reported.len(), devices.len(), "{v}");
    for (d, name) in reported.iter().zip(&devices) {
        assert_eq!(d["name"], *name);
        let f = |k: &str| {
            d[k].as_f64()
                .unwrap_or_else(|| panic!("{name}: no {k} in {d}"))
        };
        assert!(f("max_pps") > 0.0, "{d}");
        assert!(f("max_delivered_pps") > 0.0, "{d}");
        assert!((0.0..=1.0).contains(&f("loss_at_rate")), "{d}");
        assert!(f("cpu_ns_per_packet") >= 0.0, "{d}");
        assert!(f("p50_us") > 0.0, "{d}");
        assert!(
            f("p50_us") <= f("p99_us") && f("p99_us") <= f("p999_us"),
            "{d}"
        );
        assert!(dir.join(format!("{name}.hgrm")).is_file());
    }
    assert!(v["ratios"].get("ocelot_vs_kernel").is_some());
    assert!(v["ratios"].get("ocelot_vs_raw").is_some());
    let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && devices.iter().all(|d| svg.contains(d)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_agent_missing_is_an_error_not_a_skip() {
    if ocelot_built() {
        return; // The quick run above covers the agent then.
    }
    let dir = out_dir("noagent");
    let out = run(&[
        "xdp",
        "--quick",
        "--devices",
        "ocelot",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ocelot binary not found next to ocelot-bench")
            && stderr.contains("cargo build --release -p tools"),
        "{stderr}"
    );
}

#[test]
fn bad_options_are_refused_with_the_value() {
    fn check(args: &[&str], needle: &str) {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    check(&["xdp", "--size", "20"], "20");
    check(&["xdp", "--flows", "0"], "0");
    check(&["xdp", "--flows", "2000000"], "2000000");
    check(&["xdp", "--devices", "dpdk"], "dpdk");
    check(&["xdp", "--duration", "-1"], "-1");
    check(&["xdp", "--policy", "everything"], "everything");
}
